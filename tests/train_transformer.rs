//! Phased DMD on the transformer teachers, with the tiny Wan2.2 and Qwen-Image fixtures on the
//! CPU: runs complete with finite losses, the base is never touched, the generator starts as the
//! teacher, resume is bit-exact, routing and the phase-1 re-noise range, assemble/verify/sample.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::train::{recipe, repo, setup};
use common::{run_ok, s, sha, tests_dir};
use phasekit::model::denoiser::{Cond, Denoiser};
use phasekit::model::linear::LoraConfig;
use phasekit::model::Param;
use phasekit::model::Parameters;
use phasekit::rng::Rng;
use phasekit::train::dmd::Phase;
use phasekit::train::optim::{AdamW, ParamsAdamW};
use phasekit::train::rundir as run;
use phasekit::train::transformer::net::Net;
use phasekit::train::transformer::routing::{is_high_noise, Routed};
use phasekit::train::transformer::sample::TransformerRun;
use phasekit::train::TrainOptions;
use phasekit::Kind;

fn wan_base_file() -> PathBuf {
    tests_dir("fixtures/wan22_t2v_tiny/diffusers/diffusion_pytorch_model.safetensors")
}

fn tensors(p: &Path) -> Vec<(String, Vec<f32>)> {
    let (t, _) = run::read_tensors(p).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = t.into_iter().map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn log_losses(dir: &Path) -> Vec<(f64, f64)> {
    std::fs::read_to_string(dir.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["gen_loss"].as_f64().unwrap(), v["fake_loss"].as_f64().unwrap())
        })
        .collect()
}

#[test]
fn wan_tiny_two_phase_runs_assembles_verifies_and_samples() {
    setup();
    let before = sha(&wan_base_file());
    let (r, text) = recipe("wan2.2-tiny-2phase.toml");
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run");
    let t0 = std::time::Instant::now();
    let sum = phasekit::train::train(&r, &text, &out, &TrainOptions::default(), &|_| {}).unwrap();
    eprintln!("tiny Wan 2-phase run: {:.2} s", t0.elapsed().as_secs_f64());
    assert!(sum.completed);
    assert_eq!(sum.global_step, 6);
    let losses = log_losses(&out);
    assert_eq!(losses.len(), 6);
    assert!(losses.iter().all(|(g, f)| g.is_finite() && f.is_finite()), "{losses:?}");
    // The base file is untouched; every expert is a LoRA whose up moved away from zero.
    assert_eq!(sha(&wan_base_file()), before);
    for k in 0..2 {
        let t = tensors(&out.join(format!("experts/expert-{k}.safetensors")));
        assert!(t.iter().all(|(n, _)| n.ends_with(".lora_down.weight") || n.ends_with(".lora_up.weight") || n.ends_with(".alpha")));
        assert!(t.iter().any(|(n, _)| n == "blocks.0.attn1.to_q.lora_up.weight"));
        let up: f32 = t.iter().filter(|(n, _)| n.ends_with(".lora_up.weight")).flat_map(|(_, v)| v.iter().map(|x| x.abs())).sum();
        assert!(up > 0.0, "expert {k}: LoRA up is still zero");
    }
    // The loss curves, as a PNG.
    assert!(std::fs::read(out.join("plots/losses.png")).unwrap().starts_with(b"\x89PNG\r\n\x1a\n"));
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["format"], "phasekit.run/1");
    assert_eq!(m["base"], "base.safetensors");
    assert_eq!(m["experts"][0]["kind"], "lora");
    // The assembler consumes the run; the result verifies.
    let moe = d.path().join("moe.safetensors");
    run_ok(&["assemble", "--run", &s(&out), "-o", &s(&moe)]);
    run_ok(&["verify", &s(&moe)]);
    // sample --run writes latents [N, C, F, H, W].
    let smp = d.path().join("samples.safetensors");
    run_ok(&["sample", "--run", &s(&out), "--n", "3", "--out", &s(&smp)]);
    let (t, _) = run::read_tensors(&smp).unwrap();
    assert_eq!(t[0].0, "samples");
    assert_eq!(t[0].1.dims(), &[3, 4, 1, 4, 4]);
    assert!(t[0].1.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|x| x.is_finite()));
}

#[test]
fn qwen_tiny_run_completes_and_samples_packed_latents() {
    setup();
    let base = tests_dir("fixtures/qwen_image_tiny/diffusers/diffusion_pytorch_model.safetensors");
    let before = sha(&base);
    let (r, text) = recipe("qwen-image-tiny.toml");
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run");
    let t0 = std::time::Instant::now();
    let sum = phasekit::train::train(&r, &text, &out, &TrainOptions::default(), &|_| {}).unwrap();
    eprintln!("tiny Qwen run: {:.2} s", t0.elapsed().as_secs_f64());
    assert!(sum.completed);
    let losses = log_losses(&out);
    assert_eq!(losses.len(), 4);
    assert!(losses.iter().all(|(g, f)| g.is_finite() && f.is_finite()), "{losses:?}");
    assert_eq!(sha(&base), before);
    let smp = d.path().join("samples.safetensors");
    run_ok(&["sample", "--run", &s(&out), "--n", "2", "--out", &s(&smp)]);
    let (t, _) = run::read_tensors(&smp).unwrap();
    assert_eq!(t[0].1.dims(), &[2, 4, 16]);
}

#[test]
fn resume_after_a_stop_is_bit_identical() {
    setup();
    let (r, text) = recipe("wan2.2-tiny-2phase.toml");
    let d = tempfile::tempdir().unwrap();
    let full = d.path().join("full");
    phasekit::train::train(&r, &text, &full, &TrainOptions::default(), &|_| {}).unwrap();
    // Stop mid-phase 0 (at a checkpoint), at the end of phase 0 (checkpoint written, expert
    // file not yet) and in phase 1 (after the last checkpoint: resume repeats the lost updates
    // from the phase-0 checkpoint).
    for stop in [2, 3, 4] {
        let part = d.path().join(format!("stop{stop}"));
        let s1 = phasekit::train::train(&r, &text, &part, &TrainOptions { stop_after: Some(stop), ..Default::default() }, &|_| {}).unwrap();
        assert!(!s1.completed);
        let s2 = phasekit::train::train(&r, &text, &part, &TrainOptions { resume: true, ..Default::default() }, &|_| {}).unwrap();
        assert!(s2.completed);
        assert!(s2.resumed_from.is_some());
        for k in 0..2 {
            let f = format!("experts/expert-{k}.safetensors");
            assert_eq!(tensors(&full.join(&f)), tensors(&part.join(&f)), "stop {stop}, expert {k}");
        }
        assert_eq!(log_losses(&full), log_losses(&part), "stop {stop}");
    }
}

#[test]
fn with_no_updates_and_no_guidance_the_generator_is_the_teacher() {
    setup();
    let (mut r, _) = recipe("wan2.2-tiny-2phase.toml");
    r.train.updates_per_phase = 0;
    r.teacher.guidance = 1.0;
    let text = format!("# zero steps\n{}", std::fs::read_to_string(repo().join("recipes/wan2.2-tiny-2phase.toml")).unwrap());
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run");
    phasekit::train::train(&r, &text, &out, &TrainOptions::default(), &|_| {}).unwrap();
    let dev = Device::Cpu;
    let run = TransformerRun::open(&out, &dev).unwrap();
    let teacher = Net::open(&wan_base_file(), &dev).unwrap();
    let mut rng = Rng::new(3);
    let x = Tensor::from_vec(rng.normals_f32(2 * 4 * 16), (2, 4, 1, 4, 4), &dev).unwrap();
    let sig = Tensor::new(&[0.95f32, 0.5], &dev).unwrap();
    let cond = run.emb.cond(&[0, 1], [1, 4, 4]).unwrap();
    let want = teacher.velocity(&x, &sig, &cond).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for e in &run.experts {
        let got = e.velocity(&x, &sig, &cond).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, want);
    }
}

#[test]
fn views_share_the_base_and_training_never_updates_it() {
    setup();
    let dev = Device::Cpu;
    let base = Net::open(&wan_base_file(), &dev).unwrap();
    let mut gen = base.base_view();
    gen.attach(&LoraConfig { rank: 2, alpha: 2.0, ..Default::default() }).unwrap();
    let mut fake = base.base_view();
    fake.attach(&LoraConfig { rank: 2, alpha: 2.0, seed: 9, ..Default::default() }).unwrap();
    let snapshot = |n: &mut Net| -> Vec<(String, Vec<f32>, candle_core::TensorId)> {
        let mut v = Vec::new();
        for (name, p) in n.params() {
            let t = match p {
                Param::Linear(l) => l.weight.clone(),
                Param::Tensor(t) => t.clone(),
            };
            v.push((name, t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), t.id()));
        }
        v
    };
    let mut base_v = base.base_view();
    let b0 = snapshot(&mut base_v);
    // One storage: the generator's and the fake's linear weights are the base's tensors.
    let g0 = snapshot(&mut gen);
    let f0 = snapshot(&mut fake);
    for ((a, g), f) in b0.iter().zip(&g0).zip(&f0) {
        assert_eq!(a.2, g.2, "{}", a.0);
        assert_eq!(a.2, f.2, "{}", a.0);
    }
    let tr = gen.lora_vars();
    assert!(!tr.vars.is_empty());
    let mut opt = AdamW::new(tr.vars.clone(), ParamsAdamW { lr: 1e-2, beta1: 0.0, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }).unwrap();
    let mut rng = Rng::new(1);
    let x = Tensor::from_vec(rng.normals_f32(4 * 16), (1, 4, 1, 4, 4), &dev).unwrap();
    let cond = Cond::Embedding(Tensor::from_vec(rng.normals_f32(3 * 24), (1, 3, 24), &dev).unwrap());
    let sig = Tensor::new(&[0.7f32], &dev).unwrap();
    let frozen = gen.frozen_view();
    for _ in 0..3 {
        let loss = gen.velocity(&x, &sig, &cond).unwrap().sqr().unwrap().mean_all().unwrap();
        let g = loss.backward().unwrap();
        // Gradients reach only the adapters; the frozen view records none.
        let fl = frozen.velocity(&x, &sig, &cond).unwrap().sqr().unwrap().mean_all().unwrap();
        assert!(fl.backward().unwrap().get(&tr.vars[1]).is_none());
        opt.step(&g, 0.0).unwrap();
    }
    let up: f32 =
        tr.vars.iter().skip(1).step_by(2).map(|v| v.as_tensor().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()).sum();
    assert!(up > 0.0);
    // The frozen view sees the update in place.
    let a = gen.velocity(&x, &sig, &cond).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = frozen.velocity(&x, &sig, &cond).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a, b);
    // The base (and the teacher, a view of it) are unchanged, value for value.
    let b1 = snapshot(&mut base_v);
    for (x, y) in b0.iter().zip(&b1) {
        assert_eq!(x.1, y.1, "{}", x.0);
    }
    let teacher = base.base_view();
    let t = teacher.velocity(&x, &sig, &cond).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_ne!(t, a);
}

/// A denoiser that returns a constant velocity (to see which expert answered).
struct Constant(f32);

impl Denoiser for Constant {
    fn velocity(&self, x: &Tensor, _sigma: &Tensor, _cond: &Cond) -> candle_core::Result<Tensor> {
        x.ones_like()? * self.0 as f64
    }
    fn null_cond(&self, n: usize) -> candle_core::Result<Cond> {
        Ok(Cond::Embedding(Tensor::zeros((n, 1, 1), candle_core::DType::F32, &Device::Cpu)?))
    }
}

#[test]
fn two_expert_routing_sends_sigma_at_or_above_the_boundary_to_high_noise() {
    assert!(is_high_noise(0.875, 0.875));
    assert!(is_high_noise(1.0, 0.875));
    assert!(!is_high_noise(0.8749, 0.875));
    let (h, l) = (Constant(1.0), Constant(2.0));
    let r = Routed { high: Some(&h), low: Some(&l), boundary: Some(0.875) };
    let dev = Device::Cpu;
    let x = Tensor::zeros((5, 2), candle_core::DType::F32, &dev).unwrap();
    let sig = Tensor::new(&[0.2f32, 0.875, 0.9, 0.5, 1.0], &dev).unwrap();
    let cond = Cond::Embedding(Tensor::zeros((5, 1, 1), candle_core::DType::F32, &dev).unwrap());
    let v = r.velocity(&x, &sig, &cond).unwrap().to_vec2::<f32>().unwrap();
    let first: Vec<f32> = v.iter().map(|row| row[0]).collect();
    assert_eq!(first, vec![2.0, 1.0, 1.0, 2.0, 1.0]);
}

/// Regression (issue 15, defect 1): Wan2.2 I2V's boundary is 0.9, and f32(0.9) = 0.89999998.
/// A re-noise level of 0.9 reaches the models as that f32; compared in f64 against 0.9 it went to
/// the low-noise expert, which phase 1 of the I2V recipe does not have (the run aborted, and a
/// resume replayed the same draw).
#[test]
fn the_i2v_boundary_routes_in_the_models_precision() {
    let h = Constant(1.0);
    let r = Routed { high: Some(&h), low: None, boundary: Some(0.9) };
    let dev = Device::Cpu;
    let x = Tensor::zeros((3, 2), candle_core::DType::F32, &dev).unwrap();
    let levels = [0.9f64, 0.900_000_005, 0.95];
    let sig = Tensor::new(levels.iter().map(|t| *t as f32).collect::<Vec<f32>>().as_slice(), &dev).unwrap();
    let cond = Cond::Embedding(Tensor::zeros((3, 1, 1), candle_core::DType::F32, &dev).unwrap());
    let v = r.velocity(&x, &sig, &cond).expect("every level at or above 0.9 has the high-noise expert");
    assert!(v.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|x| *x == 1.0));
    // The f64 schedule, the f32 tensor and the re-noise level agree.
    for t in levels {
        assert!(is_high_noise(t, 0.9) && is_high_noise(t as f32 as f64, 0.9), "{t}");
    }
    assert!(!is_high_noise(0.8999, 0.9));
}

#[test]
fn phase_one_renoise_levels_stay_in_phase1_t_range() {
    let (r, _) = recipe("wan2.2-tiny-2phase.toml");
    let sched = r.schedule.build().unwrap();
    let t = Constant(0.0);
    let sampler = |_: &mut Rng, n: usize| Ok(Cond::Embedding(Tensor::zeros((n, 1, 1), candle_core::DType::F32, &Device::Cpu)?));
    let mk = |phase: usize, t_range| Phase {
        sched: &sched,
        scfg: &r.schedule,
        tcfg: &r.train,
        phase,
        teacher: &t,
        guidance: 1.0,
        experts: &[],
        sample_cond: &sampler,
        item: &[2],
        t_range,
        device: &Device::Cpu,
    };
    let mut rng = Rng::new(5);
    let p1 = mk(0, Some((0.875, 1.0)));
    let ts = p1.renoise_levels(&mut rng, 4000);
    assert!(ts.iter().all(|t| (0.875 - 1e-12..=1.0).contains(t)), "{:?}", ts.iter().cloned().fold(f64::INFINITY, f64::min));
    // It covers the range (not a clamp onto its end).
    assert!(ts.iter().any(|t| *t < 0.9) && ts.iter().any(|t| *t > 0.99));
    // Without the range, phase 1's nested interval starts at its boundary σ = 0.8333 < 0.875.
    let free = mk(0, None).renoise_levels(&mut rng, 4000);
    assert!(free.iter().any(|t| *t < 0.875));
}

#[test]
fn a_missing_teacher_is_a_one_line_io_error_naming_it() {
    setup();
    let (mut r, text) = recipe("wan2.2-tiny-2phase.toml");
    let missing = repo().join("tests/fixtures/no-such-teacher");
    r.transformer.as_mut().unwrap().experts = vec![s(&missing), s(&missing)];
    let d = tempfile::tempdir().unwrap();
    let e = phasekit::train::train(&r, &text, &d.path().join("run"), &TrainOptions::default(), &|_| {}).unwrap_err();
    assert_eq!(e.kind(), Kind::Io);
    assert_eq!(e.kind().exit_code(), 3);
    assert!(e.to_string().contains("no-such-teacher"), "{e}");
    assert_eq!(e.to_string().lines().count(), 1);
}

#[test]
fn embeddings_from_a_file() {
    setup();
    let d = tempfile::tempdir().unwrap();
    let emb = d.path().join("emb.safetensors");
    let mut rng = Rng::new(2);
    let dev = Device::Cpu;
    let p = Tensor::from_vec(rng.normals_f32(3 * 5 * 24), (3, 5, 24), &dev).unwrap();
    let n = Tensor::from_vec(rng.normals_f32(2 * 24), (1, 2, 24), &dev).unwrap();
    run::write_tensors(&emb, &[("prompt_embeds".into(), p), ("negative_prompt_embeds".into(), n)], &[]).unwrap();
    let (mut r, text) = recipe("wan2.2-tiny-2phase.toml");
    r.transformer.as_mut().unwrap().embeddings = s(&emb);
    r.train.updates_per_phase = 1;
    let out = d.path().join("run");
    phasekit::train::train(&r, &text, &out, &TrainOptions::default(), &|_| {}).unwrap();
    assert!(!out.join("embeddings.safetensors").exists());
    // A file of the wrong width is refused, naming it.
    let bad = d.path().join("bad.safetensors");
    run::write_tensors(&bad, &[("prompt_embeds".into(), Tensor::zeros((1, 2, 7), candle_core::DType::F32, &dev).unwrap())], &[]).unwrap();
    r.transformer.as_mut().unwrap().embeddings = s(&bad);
    let e = phasekit::train::train(&r, &text, &d.path().join("run2"), &TrainOptions::default(), &|_| {}).unwrap_err();
    assert_eq!(e.kind(), Kind::Inconsistent);
    assert!(e.to_string().contains("bad.safetensors"), "{e}");
}

#[test]
fn several_resolutions_train_in_one_run() {
    setup();
    for name in ["qwen-image-tiny.toml", "wan2.2-tiny-2phase.toml"] {
        let (mut r, text) = recipe(name);
        let t = r.transformer.as_mut().unwrap();
        t.resolutions = vec![[1, 4, 4], [1, 2, 4], [1, 4, 2]];
        t.resolution_weights = vec![1.0, 1.0, 1.0];
        r.train.updates_per_phase = 4;
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("run");
        assert!(phasekit::train::train(&r, &text, &out, &TrainOptions::default(), &|_| {}).unwrap().completed);
        assert!(log_losses(&out).iter().all(|(g, f)| g.is_finite() && f.is_finite()), "{name}");
        // A size that does not divide by the patch is refused up front.
        r.transformer.as_mut().unwrap().resolutions = vec![[1, 3, 4]];
        r.transformer.as_mut().unwrap().resolution_weights = vec![];
        let e = phasekit::train::train(&r, &text, &d.path().join("bad"), &TrainOptions::default(), &|_| {}).unwrap_err();
        assert_eq!(e.kind(), Kind::Usage, "{e}");
    }
}

#[test]
fn a_bf16_base_trains_f32_adapters_and_resumes_bit_identically() {
    setup();
    let (mut r, text) = recipe("wan2.2-tiny-2phase.toml");
    r.transformer.as_mut().unwrap().dtype = "bf16".into();
    r.transformer.as_mut().unwrap().fake = phasekit::train::recipe::FakeKind::Full;
    let d = tempfile::tempdir().unwrap();
    let full = d.path().join("full");
    phasekit::train::train(&r, &text, &full, &TrainOptions::default(), &|_| {}).unwrap();
    assert!(log_losses(&full).iter().all(|(g, f)| g.is_finite() && f.is_finite()));
    let part = d.path().join("part");
    phasekit::train::train(&r, &text, &part, &TrainOptions { stop_after: Some(2), ..Default::default() }, &|_| {}).unwrap();
    phasekit::train::train(&r, &text, &part, &TrainOptions { resume: true, ..Default::default() }, &|_| {}).unwrap();
    for k in 0..2 {
        let f = format!("experts/expert-{k}.safetensors");
        assert_eq!(tensors(&full.join(&f)), tensors(&part.join(&f)));
    }
    let smp = d.path().join("s.safetensors");
    run_ok(&["sample", "--run", &s(&full), "--n", "2", "--out", &s(&smp)]);
}

/// Prompts of different lengths padded to one: a file's `prompt_embeds_mask` reaches Qwen-Image
/// (padded tokens masked, as its pipeline does); Wan2.2's pipeline attends to zero padding, so a
/// Wan file may carry a mask only over zeros.
#[test]
fn prompt_masks_reach_qwen_and_wan_accepts_only_zero_padding() {
    setup();
    let dev = Device::Cpu;
    let d = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(5);
    // Prompt 0 has 6 tokens, prompt 1 has 4; both padded to 9 with junk.
    let a = Tensor::from_vec(rng.normals_f32(6 * 24), (1, 6, 24), &dev).unwrap();
    let b = Tensor::from_vec(rng.normals_f32(4 * 24), (1, 4, 24), &dev).unwrap();
    let junk = |k: usize, rng: &mut Rng| Tensor::from_vec(rng.normals_f32(k * 24), (1, k, 24), &dev).unwrap();
    let pa = Tensor::cat(&[&a, &junk(3, &mut rng)], 1).unwrap();
    let pb = Tensor::cat(&[&b, &junk(5, &mut rng)], 1).unwrap();
    let prompts = Tensor::cat(&[&pa, &pb], 0).unwrap();
    let mask = Tensor::new(&[[1i64, 1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0, 0]], &dev).unwrap();
    let neg = Tensor::cat(&[&junk(2, &mut rng), &junk(1, &mut rng)], 1).unwrap();
    let neg_mask = Tensor::new(&[[1i64, 1, 0]], &dev).unwrap();
    let file = d.path().join("qwen-emb.safetensors");
    let t = vec![
        ("prompt_embeds".to_string(), prompts.clone()),
        ("prompt_embeds_mask".to_string(), mask.clone()),
        ("negative_prompt_embeds".to_string(), neg.clone()),
        ("negative_prompt_embeds_mask".to_string(), neg_mask),
    ];
    // Written as the pipeline's tensors are saved: the masks stay int64.
    candle_core::safetensors::save(&t.into_iter().collect::<std::collections::HashMap<_, _>>(), &file).unwrap();
    let q = tests_dir("fixtures/qwen_image_tiny/diffusers");
    let net = Net::open(&q, &dev).unwrap();
    let emb = phasekit::train::transformer::data::Embeddings::load(&s(&file), &net, &[[1, 4, 4]], None, 0, &dev).unwrap();
    assert_eq!(emb.negative.as_ref().unwrap().dims(), &[1, 2, 24], "the negative is cut to its 2 tokens");
    net.set_img_shape([1, 2, 2]);
    let x = Tensor::from_vec(rng.normals_f32(2 * 4 * 16), (2, 4, 16), &dev).unwrap();
    let sigma = Tensor::new(&[0.7f32, 0.3], &dev).unwrap();
    let masked = net.velocity(&x, &sigma, &emb.cond(&[0, 1], [1, 4, 4]).unwrap()).unwrap();
    for (i, p) in [(0usize, &a), (1, &b)] {
        let one = net.velocity(&x.narrow(0, i, 1).unwrap(), &sigma.narrow(0, i, 1).unwrap(), &Cond::Embedding(p.clone())).unwrap();
        let e = phasekit::model::rel_l2(&masked.narrow(0, i, 1).unwrap(), &one).unwrap();
        assert!(e < 1e-5, "prompt {i}: padded + mask vs unpadded: {e:.2e}");
    }
    // Unmasked, the junk changes the result: the mask is what makes the two equal.
    let unmasked = net.velocity(&x, &sigma, &Cond::Embedding(prompts.clone())).unwrap();
    assert!(phasekit::model::rel_l2(&unmasked, &masked).unwrap() > 1e-3);
    // A Qwen-Image run trains on the file.
    let (mut r, text) = recipe("qwen-image-tiny.toml");
    r.transformer.as_mut().unwrap().embeddings = s(&file);
    r.train.updates_per_phase = 1;
    assert!(phasekit::train::train(&r, &text, &d.path().join("run"), &TrainOptions::default(), &|_| {}).unwrap().completed);
    // Wan: junk under the mask is refused (naming the file), zero padding is taken as the pipeline does.
    let wan = Net::open(&tests_dir("fixtures/wan22_t2v_tiny/diffusers"), &dev).unwrap();
    let e = phasekit::train::transformer::data::Embeddings::load(&s(&file), &wan, &[[1, 4, 4]], None, 0, &dev).err().unwrap();
    assert_eq!(e.kind(), Kind::Inconsistent);
    assert!(e.to_string().contains("qwen-emb.safetensors") && e.to_string().contains("prompt_embeds_mask"), "{e}");
    let keep = mask.to_dtype(candle_core::DType::F32).unwrap().unsqueeze(2).unwrap();
    let zeroed = prompts.broadcast_mul(&keep).unwrap();
    let wfile = d.path().join("wan-emb.safetensors");
    let wt: std::collections::HashMap<String, Tensor> =
        [("prompt_embeds".to_string(), zeroed), ("prompt_embeds_mask".to_string(), mask)].into();
    candle_core::safetensors::save(&wt, &wfile).unwrap();
    let w = phasekit::train::transformer::data::Embeddings::load(&s(&wfile), &wan, &[[1, 4, 4]], None, 0, &dev).unwrap();
    assert!(w.mask.is_none() && matches!(w.cond(&[0], [1, 4, 4]).unwrap(), Cond::Embedding(_)));
}

/// Activation checkpointing (`recompute_blocks`, on by default) recomputes each block in the
/// backward pass, and `recompute_segments` each block's segments too; the experts and
/// checkpoints are the same bytes as without either, for a two-expert Wan run with LoRA fakes and
/// a Qwen-Image run with a full-parameter fake. (A checkpointed block or segment that lost its
/// variables' gradients would leave the generator untrained here.)
#[test]
fn recomputing_blocks_changes_no_bit_of_a_run() {
    setup();
    for name in ["wan2.2-tiny-2phase.toml", "qwen-image-tiny.toml"] {
        let (r, text) = recipe(name);
        assert!(r.transformer.as_ref().unwrap().recompute_blocks, "on by default");
        let mut off = r.clone();
        off.transformer.as_mut().unwrap().recompute_blocks = false;
        let mut seg = r.clone();
        seg.transformer.as_mut().unwrap().recompute_segments = true;
        let d = tempfile::tempdir().unwrap();
        let (a, b, c) = (d.path().join("on"), d.path().join("off"), d.path().join("segments"));
        phasekit::train::train(&r, &text, &a, &TrainOptions::default(), &|_| {}).unwrap();
        phasekit::train::train(&off, &text, &b, &TrainOptions::default(), &|_| {}).unwrap();
        phasekit::train::train(&seg, &text, &c, &TrainOptions::default(), &|_| {}).unwrap();
        for f in ["experts/expert-0.safetensors", "experts/expert-1.safetensors"] {
            assert_eq!(sha(&a.join(f)), sha(&b.join(f)), "{name}: {f}");
            assert_eq!(sha(&c.join(f)), sha(&b.join(f)), "{name} with segments: {f}");
        }
        let grads: Vec<f64> = std::fs::read_to_string(a.join("log.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["gen_grad_norm"].as_f64().unwrap())
            .collect();
        assert!(grads.iter().all(|g| *g > 0.0), "{name}: generator gradients {grads:?}");
    }
}
