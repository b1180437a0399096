//! LightX2V Phased DMD run folders (`tests/fixtures/lightx2v/make.py`: the trainer's layout,
//! LoRA files made by PEFT and diffusers, full students by torch.save and by DCP from two ranks)
//! assembled into routed checkpoints, checked against PEFT's own merge, and exported back into
//! the layout LightX2V's runtime reads.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{read_safetensors, s};
use serde_json::Value;

fn fx(rel: &str) -> PathBuf {
    common::tests_dir("fixtures/lightx2v").join(rel)
}

/// Run phasekit inside the fixture folder (the configs name the teacher as the trainer's
/// working directory saw it: `teacher/high_noise_model`).
fn run_in_fixture(args: &[&str]) -> common::Out {
    let o = Command::new(common::bin()).args(args).current_dir(fx("")).output().expect("spawn");
    common::Out {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        timed_out: false,
    }
}

fn ok_in_fixture(args: &[&str]) -> common::Out {
    let o = run_in_fixture(args);
    assert_eq!(o.code, Some(0), "phasekit {}: {}", args.join(" "), o.both());
    o
}

fn inspect(p: &Path) -> Value {
    serde_json::from_str(&common::run_ok(&["--json", "inspect", &s(p)]).stdout).unwrap()
}

/// Expert `i`'s parameter `p` of a single-file MoE checkpoint (own, shared or aliased).
fn expert_tensor(f: &common::StFile, i: usize, p: &str) -> common::StTensor {
    let md = f.metadata.as_ref().unwrap();
    let aliases: Value = serde_json::from_str(&md["phasekit.moe.aliases"]).unwrap();
    let own = format!("experts.{i}.{p}");
    let name = f
        .tensors
        .contains_key(&own)
        .then_some(own.clone())
        .or_else(|| aliases.get(&own).and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| format!("shared.{p}"));
    f.tensors.get(&name).unwrap_or_else(|| panic!("no tensor for expert {i} param {p}")).clone()
}

fn f32s(t: &common::StTensor) -> Vec<f64> {
    assert_eq!(t.dtype, "F32");
    t.data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect()
}

/// The σ of LightX2V's sampler for a raw step (its table: `linspace(1, 0, 1001)[:-1]`, shifted).
fn lightx2v_sigma(raw: f64, shift: f64) -> f64 {
    let s = raw / 1000.0;
    shift * s / (1.0 + (shift - 1.0) * s)
}

#[test]
fn lora_run_routes_as_its_config_says() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("lora.safetensors");
    let o = ok_in_fixture(&["assemble", "--lightx2v-run", "run_lora", "-o", &s(&out)]);
    // The newest finished checkpoint; the unfinished .tmp one is not a checkpoint.
    assert!(o.stdout.contains("checkpoint-000000002"), "{}", o.stdout);
    assert!(o.stdout.contains("alpha 8"), "{}", o.stdout);
    common::run_ok(&["verify", &s(&out)]);
    let v = inspect(&out);
    let moe = &v["moe"];
    assert_eq!(moe["format"], "phasekit.moe/2", "each LoRA on its own teacher expert");
    assert_eq!(moe["steps"], 4);
    assert_eq!(moe["shift"], 7.0);
    // match_timestep 500 is step 2 of [1000, 750, 500, 250]: the high-noise student serves the
    // steps before it. σ as LightX2V's runtime computes them.
    let sig: Vec<f64> = [1000.0, 750.0, 500.0, 250.0].iter().map(|&r| lightx2v_sigma(r, 7.0)).collect();
    let e = moe["experts"].as_array().unwrap();
    let ts = |i: usize| e[i]["timesteps"].as_array().unwrap().iter().map(|t| t.as_f64().unwrap()).collect::<Vec<_>>();
    assert_eq!(e[0]["name"], "high_noise");
    assert_eq!(e[0]["kind"], "lora");
    for (got, want) in ts(0).iter().zip(&sig[..2]) {
        assert!((got - want * 1000.0).abs() < 1e-9, "{got} vs {want}");
    }
    for (got, want) in ts(1).iter().zip(&sig[2..]) {
        assert!((got - want * 1000.0).abs() < 1e-9, "{got} vs {want}");
    }
    assert_eq!(ts(0).len() + ts(1).len(), 4);
    let b = &moe["boundaries"][0];
    assert_eq!(b["step_index"], 2);
    assert!((b["sigma"].as_f64().unwrap() - sig[1]).abs() < 1e-15);
    assert!((b["timestep"].as_f64().unwrap() - sig[1] * 1000.0).abs() < 1e-9);
    // The LoRA α of the config is stored (the file has none): F32 8.
    let f = read_safetensors(&out);
    let a = expert_tensor(&f, 0, "blocks.0.self_attn.q.alpha");
    assert_eq!(f32s(&a), vec![8.0]);
}

#[test]
fn merged_lora_matches_peft_and_full_runs_are_bit_exact() {
    let d = tempfile::tempdir().unwrap();
    let reference = read_safetensors(&fx("reference.safetensors")).tensors;
    let params: Vec<String> = reference.keys().filter_map(|k| k.strip_prefix("lora.high.")).map(str::to_string).collect();
    assert_eq!(params.len(), 69);
    // LoRA: merged by phasekit (f32) vs PEFT's merge (f32), relative L2 per tensor.
    let merged = d.path().join("merged.safetensors");
    ok_in_fixture(&["assemble", "--lightx2v-run", "run_lora/checkpoint-000000002", "--merge-lora", "-o", &s(&merged)]);
    let f = read_safetensors(&merged);
    let mut worst: f64 = 0.0;
    for (i, role) in [(0, "high"), (1, "low")] {
        for p in &params {
            let got = f32s(&expert_tensor(&f, i, p));
            let want = f32s(&reference[&format!("lora.{role}.{p}")]);
            let num: f64 = got.iter().zip(&want).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt();
            let den: f64 = want.iter().map(|b| b * b).sum::<f64>().sqrt().max(1e-30);
            worst = worst.max(num / den);
        }
    }
    eprintln!("merged LoRA vs PEFT: worst relative L2 {worst:.2e}");
    assert!(worst < 1e-6, "merged LoRA differs from PEFT's merge: {worst:e}");
    // A different α would show: the same run assembled at α = rank (scale 1 instead of 2).
    // Full students: torch.save and DCP shards (through --run, detected) give the same bytes.
    for (run, via) in [("run_full", "--lightx2v-run"), ("run_fsdp", "--run")] {
        let out = d.path().join(format!("{run}.safetensors"));
        ok_in_fixture(&["assemble", via, run, "-o", &s(&out)]);
        common::run_ok(&["verify", &s(&out)]);
        let f = read_safetensors(&out);
        for (i, role) in [(0, "high"), (1, "low")] {
            for p in &params {
                assert_eq!(expert_tensor(&f, i, p).data, reference[&format!("full.{role}.{p}")].data, "{run} {role} {p}");
            }
        }
    }
}

#[test]
fn export_gives_lightx2v_its_config() {
    let d = tempfile::tempdir().unwrap();
    let moe = d.path().join("lora.safetensors");
    ok_in_fixture(&["assemble", "--lightx2v-run", "run_lora", "-o", &s(&moe)]);
    let out = d.path().join("export");
    common::run_ok(&["export", &s(&moe), "--to", "lightx2v", "-o", &s(&out)]);
    let c: Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(c["denoising_step_list"], serde_json::json!([1000, 750, 500, 250]));
    assert_eq!(c["boundary_step_index"], 2);
    assert_eq!(c["infer_steps"], 4);
    assert_eq!(c["sample_shift"], 7.0);
    assert_eq!(c["enable_cfg"], false);
    let loras = c["lora_configs"].as_array().unwrap();
    assert_eq!(loras[0]["name"], "high_noise_model");
    assert_eq!(loras[1]["name"], "low_noise_model");
    // The files it names exist and hold Lightning keys with the config's α.
    let hi = read_safetensors(&out.join(loras[0]["path"].as_str().unwrap()));
    assert!(hi.tensors.keys().all(|k| k.starts_with("diffusion_model.blocks.")), "{:?}", hi.tensors.keys().next());
    assert_eq!(f32s(&hi.tensors["diffusion_model.blocks.0.ffn.0.alpha"]), vec![8.0]);
    // LightX2V's runtime rule, in its own terms: steps below boundary_step_index go to the
    // high-noise model; its σ (table lookup of the shifted grid) are phasekit's routing σ.
    let v = inspect(&moe);
    let sig: Vec<f64> = v["moe"]["experts"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|e| e["timesteps"].as_array().unwrap().iter().map(|t| t.as_f64().unwrap() / 1000.0))
        .collect();
    for (k, raw) in [1000.0, 750.0, 500.0, 250.0].iter().enumerate() {
        assert!((lightx2v_sigma(*raw, 7.0) - sig[k]).abs() < 1e-12, "step {k}");
    }
    // Full experts: the *_original_ckpt keys.
    let full = d.path().join("full.safetensors");
    ok_in_fixture(&["assemble", "--lightx2v-run", "run_full", "-o", &s(&full)]);
    let out2 = d.path().join("export-full");
    common::run_ok(&["export", &s(&full), "--to", "lightx2v", "-o", &s(&out2)]);
    let c: Value = serde_json::from_slice(&std::fs::read(out2.join("config.json")).unwrap()).unwrap();
    assert!(out2.join(c["high_noise_original_ckpt"].as_str().unwrap()).is_file());
    assert!(out2.join(c["low_noise_original_ckpt"].as_str().unwrap()).is_file());
}

#[test]
fn broken_runs_fail_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let copy = d.path().join("run");
    // A checkpoint without _SUCCESS is not finished.
    let ck = copy.join("checkpoint-000000002");
    std::fs::create_dir_all(ck.join("student_2_lora")).unwrap();
    let src = fx("run_lora/checkpoint-000000002");
    for f in ["config.yaml", "pytorch_lora_weights.safetensors", "student_2_lora/pytorch_lora_weights.safetensors"] {
        std::fs::copy(src.join(f), ck.join(f)).unwrap();
    }
    let out = d.path().join("o.safetensors");
    let o = run_in_fixture(&["assemble", "--lightx2v-run", &s(&ck), "-o", &s(&out)]);
    assert_eq!(o.code, Some(6), "{}", o.both());
    assert!(o.stderr.contains("_SUCCESS"), "{}", o.stderr);
    std::fs::write(ck.join("_SUCCESS"), b"").unwrap();
    // Run from elsewhere: the config's relative teacher paths do not resolve.
    let o = common::run(&["assemble", "--lightx2v-run", &s(&ck), "-o", &s(&out)]);
    assert_eq!(o.code, Some(2), "{}", o.both());
    assert!(o.stderr.contains("--expert-base"), "{}", o.stderr);
    // ... unless the bases are given.
    let (hb, lb) = (s(&fx("teacher/high_noise_model")), s(&fx("teacher/low_noise_model")));
    common::run_ok(&["assemble", "--lightx2v-run", &s(&ck), "--expert-base", &hb, "--expert-base", &lb, "-o", &s(&out)]);
    // A match_timestep that is not a step.
    let cfg = std::fs::read_to_string(ck.join("config.yaml")).unwrap();
    std::fs::write(ck.join("config.yaml"), cfg.replace("match_timestep: 500", "match_timestep: 600")).unwrap();
    let o = common::run(&["assemble", "--lightx2v-run", &s(&ck), "--expert-base", &hb, "--expert-base", &lb, "-o", &s(&out), "--force"]);
    assert_eq!(o.code, Some(6), "{}", o.both());
    assert!(o.stderr.contains("match_timestep 600"), "{}", o.stderr);
    // The bases swapped: the low-noise teacher under the high-noise LoRA is refused by name.
    std::fs::write(ck.join("config.yaml"), &cfg).unwrap();
    let o = common::run(&["assemble", "--lightx2v-run", &s(&ck), "--expert-base", &lb, "--expert-base", &hb, "-o", &s(&out), "--force"]);
    assert_eq!(o.code, Some(6), "{}", o.both());
    assert!(o.stderr.contains("low-noise"), "{}", o.stderr);
    // Not YAML.
    std::fs::write(ck.join("config.yaml"), "model: [unclosed").unwrap();
    let o = common::run(&["assemble", "--lightx2v-run", &s(&ck), "-o", &s(&out), "--force"]);
    assert_eq!(o.code, Some(5), "{}", o.both());
    assert!(!o.panicked());
}
