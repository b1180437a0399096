//! The method options of issue 15: a guidance scale per teacher expert, a fixed re-noise level,
//! DMD2's plain fake loss on the baselines, Eq. 10's generator weight, and the bench's
//! `--mixture`. Each test fails when its option is parsed but not applied.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::run_with_timeout;
use phasekit::model::denoiser::{Cond, Denoiser};
use phasekit::rng::Rng;
use phasekit::train::dmd::Phase;
use phasekit::train::experiments::{bench_recipe, methods, BenchOptions};
use phasekit::train::recipe::{FakeWeight, GeneratorWeight, Recipe};
use phasekit::train::rundir as run;
use phasekit::train::transformer::routing::fakes_used;
use phasekit::train::transformer::routing::{GuidedExpert, Routed};
use phasekit::train::TrainOptions;
use phasekit::Kind;

fn setup() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(phasekit::train::single_threaded_kernels);
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn recipe(name: &str) -> (Recipe, String) {
    Recipe::load(&repo().join("recipes").join(name)).unwrap()
}

fn tensors(p: &Path) -> Vec<(String, Vec<f32>)> {
    let (t, _) = run::read_tensors(p).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = t.into_iter().map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn log(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("log.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn train(r: &Recipe, out: &Path) {
    phasekit::train::train(r, &r.to_toml(), out, &TrainOptions::default(), &|_| {}).unwrap();
}

/// The error of parsing `r` (as its TOML), which must be a usage error.
fn refused(r: &Recipe) -> String {
    let e = Recipe::parse(&r.to_toml(), Path::new("r.toml")).unwrap_err();
    assert_eq!(e.kind(), Kind::Usage, "{e}");
    e.to_string()
}

/// A toy recipe small enough for a test (as `tests/train_toy.rs`).
fn tiny_toy(file: &str, updates: u64) -> Recipe {
    let (mut r, _) = recipe(file);
    r.mlp.width = 32;
    r.mlp.depth = 2;
    r.teacher.pretrain.steps = 60;
    r.teacher.pretrain.batch = 128;
    r.train.updates_per_phase = updates;
    r.train.batch = 64;
    r.train.ttur = 1;
    r.train.checkpoint_every = 0;
    r.train.log_every = 1;
    r
}

/// Velocity = the mean of the text embedding: 1 for the prompts below, 0 for the null prompt, so
/// a guided call returns its scale.
struct Probe;

impl Denoiser for Probe {
    fn velocity(&self, x: &Tensor, _sigma: &Tensor, cond: &Cond) -> candle_core::Result<Tensor> {
        let Cond::Embedding(e) = cond else { unreachable!() };
        x.ones_like()?.broadcast_mul(&e.flatten_from(1)?.mean_keepdim(1)?)
    }
    fn null_cond(&self, n: usize) -> candle_core::Result<Cond> {
        Ok(Cond::Embedding(Tensor::zeros((n, 1, 1), DType::F32, &Device::Cpu)?))
    }
}

#[test]
fn each_sample_is_guided_by_the_scale_of_the_expert_serving_its_sigma() {
    let (h, l) = (Probe, Probe);
    let (gh, gl) = (GuidedExpert { inner: &h, scale: 4.0 }, GuidedExpert { inner: &l, scale: 3.0 });
    let teacher = Routed { high: Some(&gh), low: Some(&gl), boundary: Some(0.875) };
    let x = Tensor::zeros((5, 2), DType::F32, &Device::Cpu).unwrap();
    let sig = Tensor::new(&[0.95f32, 0.5, 0.875, 0.8749, 1.0], &Device::Cpu).unwrap();
    let cond = Cond::Embedding(Tensor::ones((5, 1, 1), DType::F32, &Device::Cpu).unwrap());
    let v = teacher.velocity(&x, &sig, &cond).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(v.iter().map(|r| r[0]).collect::<Vec<_>>(), vec![4.0, 3.0, 4.0, 3.0, 4.0]);
}

/// The tiny two-expert Wan2.2 recipe (one fixture model serving as both experts, so only the
/// scales tell them apart) with `guidance_experts = [4, 3]`: phase 1 re-noises only inside the
/// high-noise range and trains exactly the expert a `guidance = 4` run trains; phase 2 re-noises
/// across the boundary and trains an expert that neither `guidance = 4` nor `guidance = 3` gives.
#[test]
fn tiny_wan_guidance_experts_guide_each_phase_by_its_experts() {
    setup();
    let d = tempfile::tempdir().unwrap();
    let (base, _) = recipe("wan2.2-tiny-2phase.toml");
    let with = |f: &dyn Fn(&mut Recipe), name: &str| {
        let mut r = base.clone();
        f(&mut r);
        Recipe::parse(&r.to_toml(), Path::new(name)).unwrap();
        let out = d.path().join(name);
        train(&r, &out);
        out
    };
    let per = with(
        &|r| {
            r.teacher.guidance = 1.0;
            r.teacher.guidance_experts = vec![4.0, 3.0];
        },
        "per-expert",
    );
    let g4 = with(&|r| r.teacher.guidance = 4.0, "g4");
    let g3 = with(&|r| r.teacher.guidance = 3.0, "g3");
    let expert = |run: &Path, k: usize| tensors(&run.join(format!("experts/expert-{k}.safetensors")));
    assert!(expert(&per, 0) == expert(&g4, 0), "phase 1 sees only the high-noise expert: guidance 4");
    assert!(expert(&per, 0) != expert(&g3, 0));
    assert!(expert(&per, 1) != expert(&g4, 1), "phase 2's low-noise samples are guided by 3");
    assert!(expert(&per, 1) != expert(&g3, 1), "phase 2's high-noise samples are guided by 4");
    let info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(per.join("transformer.json")).unwrap()).unwrap();
    assert_eq!(info["teacher_guidance_experts"], serde_json::json!([4.0, 3.0]));
}

#[test]
fn guidance_experts_need_two_experts_and_replace_guidance() {
    let (toy, _) = recipe("toy-phased-4step-4phase.toml");
    let mut r = toy.clone();
    r.teacher.guidance_experts = vec![4.0, 3.0];
    assert!(refused(&r).contains("two-expert teacher"));
    let (wan, _) = recipe("wan2.2-tiny-2phase.toml");
    let mut r = wan.clone();
    r.teacher.guidance = 1.0;
    r.teacher.guidance_experts = vec![4.0];
    assert!(refused(&r).contains("two finite scales"));
    r.teacher.guidance_experts = vec![4.0, f64::NAN];
    assert!(Recipe::parse(&r.to_toml(), Path::new("r.toml")).is_err());
    let mut r = wan.clone();
    r.teacher.guidance = 3.0;
    r.teacher.guidance_experts = vec![4.0, 3.0];
    assert!(refused(&r).contains("both set"));
    // The full-size Wan2.2 A14B recipes carry the official per-expert scales [high, low].
    assert_eq!(recipe("wan2.2-t2v-a14b-4step-2phase.toml").0.guidance_per_expert(), Some([4.0, 3.0]));
    assert_eq!(recipe("wan2.2-i2v-a14b-4step-2phase.toml").0.guidance_per_expert(), Some([3.5, 3.5]));
}

/// `renoise_fixed`: every re-noise level of every phase is the fixed σ (no draw), and the
/// transformer fakes follow it (a level above the boundary needs only the high-noise fake).
#[test]
fn a_fixed_renoise_level_replaces_the_interval() {
    let (mut r, _) = recipe("wan2.2-tiny-2phase.toml");
    let sched = r.schedule.build().unwrap();
    let tc = r.transformer.clone().unwrap();
    assert_eq!(fakes_used(&r, &tc, &sched, 1, 2), vec![true, true], "phase 2's interval crosses the boundary");
    r.schedule.renoise_fixed = Some(0.9);
    Recipe::parse(&r.to_toml(), Path::new("r.toml")).unwrap();
    assert_eq!(fakes_used(&r, &tc, &sched, 0, 2), vec![true, false]);
    assert_eq!(fakes_used(&r, &tc, &sched, 1, 2), vec![true, false]);
    let t = Probe;
    let sampler = |_: &mut Rng, n: usize| Ok(Cond::Embedding(Tensor::zeros((n, 1, 1), DType::F32, &Device::Cpu)?));
    for (p, t_range) in [(0, Some((0.875, 1.0))), (1, None)] {
        let phase = Phase {
            sched: &sched,
            scfg: &r.schedule,
            tcfg: &r.train,
            phase: p,
            teacher: &t,
            guidance: 1.0,
            experts: &[],
            sample_cond: &sampler,
            item: &[2],
            t_range,
            device: &Device::Cpu,
        };
        assert!(phase.renoise_levels(&mut Rng::new(1), 100).iter().all(|t| *t == 0.9), "phase {p}");
    }
    // Refused: at or below a phase boundary, above 1, with disjoint intervals, outside phase1_t_range.
    let (toy, _) = recipe("toy-phased-4step-4phase.toml");
    for bad in [0.75, 0.5, 1.5, 0.0, f64::NAN] {
        let mut r = toy.clone();
        r.schedule.renoise_fixed = Some(bad);
        assert!(Recipe::parse(&r.to_toml(), Path::new("r.toml")).is_err(), "{bad}");
    }
    let mut r = toy.clone();
    r.schedule.renoise_fixed = Some(0.8);
    Recipe::parse(&r.to_toml(), Path::new("r.toml")).unwrap();
    r.schedule.renoise = phasekit::train::schedule::Renoise::Disjoint;
    assert!(refused(&r).contains("renoise = \"nested\""));
    let (mut r, _) = recipe("wan2.2-tiny-2phase.toml");
    r.schedule.renoise_fixed = Some(0.86);
    assert!(refused(&r).contains("phase1_t_range"));
}

/// The App. C.2 recipes train (fixed t = 0.357 and 0.882), are named for it, and differ.
#[test]
fn the_fixed_t_recipes_train_at_their_level() {
    setup();
    let d = tempfile::tempdir().unwrap();
    let mut outs = Vec::new();
    for (file, t) in [("toy-dmd2-4step-t357.toml", 0.357), ("toy-dmd2-4step-t882.toml", 0.882)] {
        let r = tiny_toy(file, 3);
        assert_eq!(r.schedule.renoise_fixed, Some(t));
        let out = d.path().join(file);
        train(&r, &out);
        let info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("toy.json")).unwrap()).unwrap();
        assert!(info["method"].as_str().unwrap().contains(&format!(", fixed t = {t}")), "{}", info["method"]);
        outs.push(tensors(&out.join("experts/expert-0.safetensors")));
    }
    assert!(outs[0] != outs[1]);
}

/// DMD2's plain fake loss: the DMD2-style baselines train their fake with weight 1 per sample
/// (DMD2's MSE); Eq. 13's weight min(1, 10σ²) shrinks the same first fake loss.
#[test]
fn the_dmd2_baselines_use_dmd2s_plain_fake_loss() {
    setup();
    for f in ["toy-dmd2-4step.toml", "toy-onestep-dmd.toml", "toy-vanilla-4step.toml"] {
        assert_eq!(recipe(f).0.train.fake_weight, FakeWeight::None, "{f}");
    }
    for f in ["toy-phased-4step-4phase.toml", "toy-phased-4step-2phase-sgts.toml"] {
        assert_eq!(recipe(f).0.train.fake_weight, FakeWeight::Eq13, "{f}");
    }
    let d = tempfile::tempdir().unwrap();
    let first_fake_loss = |w: FakeWeight| {
        let mut r = tiny_toy("toy-onestep-dmd.toml", 1);
        r.train.fake_weight = w;
        let out = d.path().join(format!("{w:?}"));
        train(&r, &out);
        let info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("toy.json")).unwrap()).unwrap();
        (log(&out)[0]["fake_loss"].as_f64().unwrap(), info["method"].as_str().unwrap().to_string())
    };
    let (plain, name) = first_fake_loss(FakeWeight::None);
    let (eq13, name13) = first_fake_loss(FakeWeight::Eq13);
    // Same draws, same fake: every per-sample term is weighed by 1 against min(1, 10t²) ≤ 1.
    assert!(plain > eq13, "plain {plain} vs Eq. 13 {eq13}");
    assert_eq!(name, "one-step DMD (DMD2-style, no regression loss)");
    assert_eq!(name13, "one-step DMD (DMD2-style, no regression loss), Eq. 13 fake weight");
}

/// `generator_weight = "eq10"` trains (finite losses) and moves the generator differently from
/// DMD2's normaliser; the formula itself is checked in `dmd::tests`.
#[test]
fn eq10_generator_weight_trains_another_generator() {
    setup();
    let d = tempfile::tempdir().unwrap();
    let mut experts = Vec::new();
    for w in [GeneratorWeight::Dmd2, GeneratorWeight::Eq10] {
        let mut r = tiny_toy("toy-phased-4step-4phase.toml", 2);
        r.train.generator_weight = w;
        let out = d.path().join(format!("{w:?}"));
        train(&r, &out);
        assert!(log(&out).iter().all(|l| l["gen_loss"].as_f64().unwrap().is_finite()));
        experts.push(tensors(&out.join("experts/expert-3.safetensors")));
    }
    assert!(experts[0] != experts[1]);
}

#[test]
fn bench_mixture_and_method_keys() {
    let o = |mixture| BenchOptions { seeds: 1, updates: 40, eval_samples: 10, dir: PathBuf::new(), only: None, mixture };
    let weighted = recipe("toy-phased-4step-4phase-weighted.toml").0.mixture;
    assert_eq!((weighted.radius, weighted.std, weighted.weights.len()), (4.0, 0.25, 8));
    for m in methods() {
        let r = bench_recipe(&m, 0, &o(Some(weighted.clone())), Path::new("t.safetensors")).unwrap();
        assert_eq!(r.mixture, weighted, "{}", m.key);
        let r = bench_recipe(&m, 0, &o(None), Path::new("t.safetensors")).unwrap();
        assert_eq!(r.mixture, Default::default(), "{}", m.key);
    }
    // Through the binary: an unknown method and a non-toy --mixture are usage errors (exit 2),
    // before any training.
    let t = std::time::Duration::from_secs(60);
    let out = run_with_timeout(&["bench", "train-toy", "--only", "phased4,nope"], t);
    assert_eq!(out.code, Some(2), "{}", out.both());
    assert!(out.stderr.contains("unknown method 'nope'") && out.stderr.lines().count() <= 2, "{}", out.both());
    let wan = repo().join("recipes/wan2.2-tiny-2phase.toml");
    let out = run_with_timeout(&["bench", "train-toy", "--mixture", wan.to_str().unwrap()], t);
    assert_eq!(out.code, Some(2), "{}", out.both());
    assert!(out.stderr.contains("--mixture takes a toy recipe"), "{}", out.both());
}
