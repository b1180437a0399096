//! The Wan recipes of the paper's remaining settings, on the tiny fixtures on the CPU:
//! - Wan2.1 T2V-14B (one model, the paper's T2I teacher): Phased DMD 4-step 2-phase and vanilla
//!   few-step DMD train, assemble, verify, sample and export; a Wan2.1 recipe refuses a Wan2.2
//!   expert and a two-expert setting, a Wan2.2 recipe refuses a Wan2.1 file.
//! - Wan2.2 T2V-A14B 4-step 4-phase (Table 6): one expert per step, each on the teacher expert
//!   serving its first step, routed at the boundary; train, assemble, verify, sample.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use common::train::{recipe, repo, setup};
use common::{run, run_ok, s, sha, tests_dir};
use phasekit::train::rundir as rd;
use phasekit::train::schedule::{shift, Schedule};
use phasekit::train::TrainOptions;
use serde_json::Value;

fn json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The smallest f64 above `x` (x > 0): where an expert's σ range starts above its phase's end.
fn next_up(x: f64) -> f64 {
    f64::from_bits(x.to_bits() + 1)
}

fn ranges(manifest: &Value) -> Vec<(f64, f64)> {
    manifest["experts"].as_array().unwrap().iter().map(|e| (e["sigma_lo"].as_f64().unwrap(), e["sigma_hi"].as_f64().unwrap())).collect()
}

fn losses_finite(dir: &Path, n: usize) {
    let text = std::fs::read_to_string(dir.join("log.jsonl")).unwrap();
    assert_eq!(text.lines().count(), n, "{text}");
    for l in text.lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        assert!(v["gen_loss"].as_f64().unwrap().is_finite() && v["fake_loss"].as_f64().unwrap().is_finite(), "{l}");
    }
}

fn samples(p: &Path) -> Tensor {
    let (t, _) = rd::read_tensors(p).unwrap();
    t.into_iter().next().unwrap().1
}

fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    phasekit::model::rel_l2(a, b).unwrap()
}

/// `sample --run` and `sample --moe` (the assembled file, the run's embeddings) give the same latents.
fn run_and_moe_sample_alike(run_dir: &Path, moe: &Path, dir: &Path, latent: [usize; 3]) -> Tensor {
    let a = dir.join("run-samples.safetensors");
    run_ok(&["sample", "--run", &s(run_dir), "--n", "3", "--out", &s(&a)]);
    let b = dir.join("moe-samples.safetensors");
    let emb = s(&run_dir.join("embeddings.safetensors"));
    let [f, h, w] = latent.map(|x| x.to_string());
    run_ok(&["sample", "--moe", &s(moe), "--cond", &emb, "--n", "3", "--frames", &f, "--height", &h, "--width", &w, "--out", &s(&b)]);
    let (x, y) = (samples(&a), samples(&b));
    assert!(x.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite()));
    let e = rel_l2(&y, &x);
    assert!(e < 1e-5, "sample --moe vs --run: relative L2 {e:.3e}");
    x
}

#[test]
fn wan21_tiny_two_phase_runs_assembles_verifies_samples_and_exports() {
    setup();
    let base = tests_dir("fixtures/wan21_t2v_tiny/diffusers/diffusion_pytorch_model.safetensors");
    let before = sha(&base);
    let (r, text) = recipe("wan2.1-tiny-2phase.toml");
    assert_eq!(r.model, "wan2.1-t2v-14b");
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run");
    let sum = phasekit::train::train(&r, &text, &out, &TrainOptions::default(), &|_| {}).unwrap();
    assert!(sum.completed);
    assert_eq!(sum.global_step, 6);
    losses_finite(&out, 6);
    assert_eq!(sha(&base), before, "the teacher file changed");
    // One model: both experts are LoRAs over it; expert 0 serves its phase (σ 1 and 0.9375, down
    // to just above σ₂ = 0.8333), expert 1 the rest.
    let info = json(&out.join("transformer.json"));
    assert_eq!((info["model"].as_str(), info["family"].as_str()), (Some("wan2.1-t2v-14b"), Some("wan22")));
    assert!(info["expert_boundary"].is_null());
    assert_eq!(info["teachers"].as_array().unwrap().len(), 1);
    let m = json(&out.join("manifest.json"));
    let s2 = shift(0.5, 5.0);
    assert_eq!(ranges(&m), vec![(next_up(s2), 1.0), (0.0, next_up(s2))]);
    assert_eq!(m["base"], "base.safetensors");
    assert!(m["experts"].as_array().unwrap().iter().all(|e| e["base"].is_null() && e["kind"] == "lora"), "{m}");
    for k in 0..2 {
        let (t, _) = rd::read_tensors(&out.join(format!("experts/expert-{k}.safetensors"))).unwrap();
        let up: f32 = t
            .iter()
            .filter(|(n, _)| n.ends_with(".lora_up.weight"))
            .map(|(_, v)| v.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap())
            .sum();
        assert!(up > 0.0, "expert {k}: LoRA up is still zero");
    }
    let moe = d.path().join("moe.safetensors");
    run_ok(&["assemble", "--run", &s(&out), "-o", &s(&moe)]);
    run_ok(&["verify", &s(&moe)]);
    let x = run_and_moe_sample_alike(&out, &moe, d.path(), [1, 4, 4]);
    assert_eq!(x.dims(), &[3, 16, 1, 4, 4]);
    // diffusers layout: two transformers, switching at expert 1's upper σ.
    let exp = d.path().join("diffusers");
    run_ok(&["export", &s(&moe), "--to", "diffusers", "-o", &s(&exp)]);
    let index = json(&exp.join("model_index.json"));
    assert_eq!(index["boundary_ratio"].as_f64(), Some(next_up(s2)));
    let cfg = json(&exp.join("transformer/config.json"));
    assert_eq!((cfg["in_channels"].as_u64(), cfg["num_attention_heads"].as_u64()), (Some(16), Some(4)));
}

#[test]
fn wan21_vanilla_dmd_backprops_through_every_step() {
    setup();
    let (mut r, text) = recipe("wan2.1-tiny-2phase.toml");
    r.schedule.phases = vec![4];
    r.schedule.sgts = false;
    r.schedule.backprop = phasekit::train::recipe::Backprop::All;
    r.train.updates_per_phase = 2;
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run");
    assert!(phasekit::train::train(&r, &text, &out, &TrainOptions::default(), &|_| {}).unwrap().completed);
    losses_finite(&out, 2);
    let m = json(&out.join("manifest.json"));
    assert_eq!(ranges(&m), vec![(0.0, 1.0)]);
    let smp = d.path().join("samples.safetensors");
    run_ok(&["sample", "--run", &s(&out), "--n", "2", "--out", &s(&smp)]);
    assert_eq!(samples(&smp).dims(), &[2, 16, 1, 4, 4]);
}

/// A recipe file from the shipped tiny recipe with `from` → `to` replaced, in `dir`.
/// The fixed-t DMD ablation on the tiny Wan2.1 fixture (App. C.2: vanilla DMD with every
/// re-noise at σ = 0.357 or 0.882): both recipes train, assemble and verify, and the level
/// reaches the transformer trainer (each gives other experts than the other level and than the
/// same recipe drawing t from (0, 1]).
#[test]
fn wan21_fixed_t_recipes_train_at_their_level() {
    setup();
    let d = tempfile::tempdir().unwrap();
    let mut experts = Vec::new();
    for (file, t) in [
        ("wan2.1-tiny-vanilla-t357.toml", Some(0.357)),
        ("wan2.1-tiny-vanilla-t882.toml", Some(0.882)),
        ("wan2.1-tiny-vanilla-t882.toml", None),
    ] {
        let (mut r, text) = recipe(file);
        assert!(t.is_none() || r.schedule.renoise_fixed == t, "{file}");
        assert_eq!((r.schedule.phases.as_slice(), r.schedule.backprop), (&[4][..], phasekit::train::recipe::Backprop::All));
        r.schedule.renoise_fixed = t;
        let out = d.path().join(format!("run-{t:?}"));
        assert!(phasekit::train::train(&r, &text, &out, &TrainOptions::default(), &|_| {}).unwrap().completed);
        losses_finite(&out, r.train.updates_per_phase as usize);
        if t.is_some() {
            let moe = d.path().join(format!("moe-{t:?}.safetensors"));
            run_ok(&["assemble", "--run", &s(&out), "--out", &s(&moe)]);
            run_ok(&["verify", &s(&moe)]);
        }
        experts.push(sha(&out.join("experts/expert-0.safetensors")));
    }
    assert!(experts[0] != experts[1] && experts[1] != experts[2] && experts[0] != experts[2], "{experts:?}");
}

fn edited(name: &str, dir: &Path, edits: &[(&str, &str)]) -> PathBuf {
    let mut text = std::fs::read_to_string(repo().join("recipes").join(name)).unwrap();
    text = text.replace("../tests/fixtures", &s(&tests_dir("fixtures")));
    for (a, b) in edits {
        assert!(text.contains(a), "{a}");
        text = text.replace(a, b);
    }
    let p = dir.join(format!("edited-{}", name));
    std::fs::write(&p, text).unwrap();
    p
}

fn copy_model(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["diffusion_pytorch_model.safetensors", "config.json"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

#[test]
fn wan21_and_wan22_recipes_refuse_each_others_files() {
    let d = tempfile::tempdir().unwrap();
    let train = |recipe: &Path| run(&["train", "--recipe", &s(recipe), "--out", &s(&d.path().join("run")), "-q"]);
    // The Wan2.1 fixture's weights, in a Wan2.2 A14B expert folder: the names say Wan2.2.
    let hi = d.path().join("Wan2.2-T2V-A14B/high_noise_model");
    copy_model(&tests_dir("fixtures/wan21_t2v_tiny/diffusers"), &hi);
    let r = edited("wan2.1-tiny-2phase.toml", d.path(), &[(&s(&tests_dir("fixtures/wan21_t2v_tiny/diffusers")), &s(&hi))]);
    let o = train(&r);
    assert_eq!(o.code, Some(6), "{}", o.both());
    assert!(
        o.stderr.contains("wan2.1-t2v-14b") && o.stderr.contains("name Wan2.2") && o.stderr.contains("high_noise_model"),
        "{}",
        o.stderr
    );
    assert_eq!(o.stderr.trim().lines().count(), 1, "{}", o.stderr);
    assert!(!d.path().join("run").exists());
    // Two experts on a one-model teacher.
    let r =
        edited("wan2.1-tiny-2phase.toml", d.path(), &[("embeddings = \"random:4\"", "embeddings = \"random:4\"\nexpert_boundary = 0.875")]);
    let o = train(&r);
    assert_eq!(o.code, Some(2), "{}", o.both());
    assert!(o.stderr.contains("one model"), "{}", o.stderr);
    // A Wan2.2 recipe given the Wan2.1 fixture (its folder says wan21).
    let w21 = s(&tests_dir("fixtures/wan21_t2v_tiny/diffusers"));
    let r = edited("wan2.2-tiny-2phase.toml", d.path(), &[(&s(&tests_dir("fixtures/wan22_t2v_tiny/diffusers")), &w21)]);
    let o = train(&r);
    assert_eq!(o.code, Some(6), "{}", o.both());
    assert!(o.stderr.contains("wan2.2-t2v-a14b") && o.stderr.contains("name Wan2.1"), "{}", o.stderr);
    // A Qwen-Image file under a Wan recipe.
    let q = s(&tests_dir("fixtures/qwen_image_tiny/diffusers"));
    let r = edited("wan2.1-tiny-2phase.toml", d.path(), &[(&w21, &q)]);
    let o = train(&r);
    assert_eq!(o.code, Some(6), "{}", o.both());
    assert!(o.stderr.contains("needs a wan22 checkpoint"), "{}", o.stderr);
}

#[test]
fn wan22_tiny_four_phase_recipe_runs_assembles_verifies_and_samples() {
    setup();
    let (r, text) = recipe("wan2.2-tiny-4phase.toml");
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run");
    let sum = phasekit::train::train(&r, &text, &out, &TrainOptions::default(), &|_| {}).unwrap();
    assert!(sum.completed);
    assert_eq!(sum.global_step, 8);
    losses_finite(&out, 8);
    let m = json(&out.join("manifest.json"));
    assert_eq!(m["experts"].as_array().unwrap().len(), 4);
    let moe = d.path().join("moe.safetensors");
    run_ok(&["assemble", "--run", &s(&out), "-o", &s(&moe)]);
    run_ok(&["verify", &s(&moe)]);
    run_and_moe_sample_alike(&out, &moe, d.path(), [1, 4, 4]);
}

/// 4 steps at shift 5 are σ 1, 0.9375, 0.8333, 0.625; the boundary 0.875 falls between steps 1
/// and 2. With two different expert files, experts 0-1 sit on the high-noise one and 2-3 on the
/// low-noise one, the routed ranges switch bases at 0.875 exactly, phase 1 trains only a
/// high-noise fake, and the assembled checkpoint samples like the run (which it would not if a
/// LoRA were put on the wrong base: the low-noise file here is the high-noise one rounded to bf16).
#[test]
fn wan22_four_phase_experts_sit_on_the_base_serving_their_first_step() {
    setup();
    let d = tempfile::tempdir().unwrap();
    let repo_dir = d.path().join("Wan2.2-T2V-A14B-tiny");
    let (hi, lo) = (repo_dir.join("high_noise_model"), repo_dir.join("low_noise_model"));
    copy_model(&tests_dir("fixtures/wan22_t2v_tiny/diffusers"), &hi);
    let bf16 = d.path().join("bf16.safetensors");
    run_ok(&["convert", &s(&hi.join("diffusion_pytorch_model.safetensors")), &s(&bf16), "--dtype", "bf16"]);
    run_ok(&["convert", &s(&bf16), &s(&lo), "--dtype", "f32"]);
    std::fs::copy(hi.join("config.json"), lo.join("config.json")).unwrap();
    assert_ne!(sha(&hi.join("diffusion_pytorch_model.safetensors")), sha(&lo.join("diffusion_pytorch_model.safetensors")));

    let (mut r, text) = recipe("wan2.2-tiny-4phase.toml");
    let tc = r.transformer.as_mut().unwrap();
    tc.checkpoint = s(&repo_dir);
    tc.experts = vec![];
    let sched: Schedule = r.schedule.build().unwrap();
    assert_eq!(sched.sigmas, vec![1.0, shift(0.75, 5.0), shift(0.5, 5.0), shift(0.25, 5.0), 0.0]);
    // One fake per teacher expert the phase's re-noise range (nested, from its end σ to 1) reaches.
    let tc = r.transformer.clone().unwrap();
    let used: Vec<Vec<bool>> = (0..4).map(|p| phasekit::train::transformer::routing::fakes_used(&r, &tc, &sched, p, 2)).collect();
    assert_eq!(used, vec![vec![true, false], vec![true, true], vec![true, true], vec![true, true]]);

    let out = d.path().join("run");
    assert!(phasekit::train::train(&r, &text, &out, &TrainOptions::default(), &|_| {}).unwrap().completed);
    losses_finite(&out, 8);
    let info = json(&out.join("transformer.json"));
    let bases: Vec<u64> = info["experts"].as_array().unwrap().iter().map(|e| e["base"].as_u64().unwrap()).collect();
    assert_eq!(bases, vec![0, 0, 1, 1]);
    let m = json(&out.join("manifest.json"));
    let sg = &sched.sigmas;
    assert_eq!(ranges(&m), vec![(next_up(sg[1]), 1.0), (0.875, next_up(sg[1])), (next_up(sg[3]), 0.875), (0.0, next_up(sg[3]))]);
    let expert_bases: Vec<Value> = m["experts"].as_array().unwrap().iter().map(|e| e["base"].clone()).collect();
    assert_eq!(expert_bases, vec![Value::Null, Value::Null, "base-1/base.safetensors".into(), "base-1/base.safetensors".into()]);
    // Assembled (the Wan2.2 expert checks of `assemble` accept two students per expert), verified,
    // the routing table as trained, and sampled like the run.
    let moe = d.path().join("moe.safetensors");
    run_ok(&["assemble", "--run", &s(&out), "-o", &s(&moe)]);
    run_ok(&["verify", &s(&moe)]);
    let v: Value = serde_json::from_str(&run_ok(&["--json", "inspect", &s(&moe)]).stdout).unwrap();
    let ex = v["moe"]["experts"].as_array().unwrap();
    let got: Vec<(f64, f64)> = ex.iter().map(|e| (e["sigma_lo"].as_f64().unwrap(), e["sigma_hi"].as_f64().unwrap())).collect();
    assert_eq!(got, ranges(&m));
    let moe_bases: Vec<u64> = ex.iter().map(|e| e["base"].as_u64().unwrap_or(0)).collect();
    assert_eq!(moe_bases[0], moe_bases[1]);
    assert_eq!(moe_bases[2], moe_bases[3]);
    assert_ne!(moe_bases[0], moe_bases[2], "{v}");
    run_and_moe_sample_alike(&out, &moe, d.path(), [1, 4, 4]);

    // The same students assembled by hand: two per teacher expert in the trained order are
    // accepted; a student on the high-noise expert below one on the low-noise expert is refused.
    let e = |k: usize| s(&out.join(format!("experts/expert-{k}.safetensors")));
    let assemble = |bases: [&Path; 4], to: &Path| {
        let mut a: Vec<String> = vec!["assemble".into()];
        for (k, range) in ["0.9375:1", "0.875:0.9375", "0.625:0.875", "0:0.625"].iter().enumerate() {
            a.extend(["--expert".into(), e(k), "--sigma-range".into(), range.to_string(), "--expert-base".into(), s(bases[k])]);
        }
        a.extend(["--steps", "4", "--shift", "5", "-o"].iter().map(|x| x.to_string()));
        a.push(s(to));
        run(&a)
    };
    let by_hand = d.path().join("by-hand.safetensors");
    let o = assemble([&hi, &hi, &lo, &lo], &by_hand);
    assert_eq!(o.code, Some(0), "{}", o.both());
    let bad = d.path().join("interleaved.safetensors");
    let o = assemble([&hi, &lo, &hi, &lo], &bad);
    assert_eq!(o.code, Some(6), "{}", o.both());
    assert!(o.stderr.contains("e1 is the Wan2.2 A14B low-noise expert") && o.stderr.contains("[0.875, 0.9375)"), "{}", o.stderr);
    assert!(!bad.exists());
}
