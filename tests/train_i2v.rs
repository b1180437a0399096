//! Image-to-video on Wan2.2: the two ways the models take a first frame, checked against
//! diffusers' own `WanImageToVideoPipeline` run on tiny models (tests/fixtures/wan22_i2v_tiny/make.py),
//! and trained end to end.
//!
//! - I2V-A14B (`wan22_i2v_tiny`, 36 channels in, 16 out): a 20-channel condition (first-frame mask
//!   + image latents) concatenated to the latents on every call.
//! - TI2V-5B (`wan22_ti2v_tiny`, 48 in and out): the image latent written over the first latent
//!   frame on every call, that frame's tokens at timestep 0, and written over the result.
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::train::{recipe, setup};
use common::{run_ok, s, tests_dir};
use phasekit::model::denoiser::{guided, Cond, ImageMode};
use phasekit::train::recipe::{Recipe, Task};
use phasekit::train::rundir as run;
use phasekit::train::transformer::data::{Embeddings, IMAGE_CONDITION};
use phasekit::train::transformer::net::Net;
use phasekit::train::transformer::sample::sample_from;
use phasekit::train::TrainOptions;
use phasekit::Kind;

fn fixture(name: &str, file: &str) -> PathBuf {
    tests_dir(&format!("fixtures/{name}/{file}"))
}

fn pipeline(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name, "pipeline.safetensors"), &Device::Cpu).unwrap()
}

fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    let n = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    (d / n).sqrt()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// The fixture's pipeline inputs as an embeddings file (prompts, the negative, the condition).
fn embeddings_file(name: &str, dir: &Path) -> PathBuf {
    let p = pipeline(name);
    let path = dir.join(format!("{name}-emb.safetensors"));
    let neg = p["negative_prompt_embeds"].narrow(0, 0, 1).unwrap();
    run::write_tensors(
        &path,
        &[
            ("prompt_embeds".into(), p["prompt_embeds"].clone()),
            ("negative_prompt_embeds".into(), neg),
            (IMAGE_CONDITION.into(), p["condition"].clone()),
        ],
        &[],
    )
    .unwrap();
    path
}

/// Runs phasekit's sampler on the fixture's pipeline inputs, with guidance 1 (the students'
/// sampler, [`sample_from`]) and 3 (the guided teacher, whose negative call keeps the image).
fn check_pipeline(name: &str, mode: ImageMode) {
    setup();
    let d = tempfile::tempdir().unwrap();
    let p = pipeline(name);
    let net = Net::open(&fixture(name, "diffusers"), &Device::Cpu).unwrap();
    assert_eq!(net.image_mode(), Some(mode));
    let z = &p["latents"];
    let latent = [z.dim(2).unwrap(), z.dim(3).unwrap(), z.dim(4).unwrap()];
    let mut net = net;
    let emb = Embeddings::load(&s(&embeddings_file(name, d.path())), &net, &[latent], Some(Task::I2v), 0, &Device::Cpu).unwrap();
    net.set_null_text(emb.negative.clone());
    let cond = emb.cond(&[0, 1], latent).unwrap();
    assert!(matches!(cond, Cond::Image { mode: m, .. } if m == mode));
    let sigmas: Vec<f64> = values(&p["sigmas"]).into_iter().map(f64::from).collect();
    let out = sample_from(std::slice::from_ref(&net), &|_| 0, &sigmas, z.clone(), &cond).unwrap();
    let e1 = rel_l2(&out, &p["out_g1"]);
    let mut x = z.clone();
    for i in 0..sigmas.len() - 1 {
        let sig = Tensor::full(sigmas[i] as f32, 2, &Device::Cpu).unwrap();
        let v = guided(&net, &x, &sig, &cond, 3.0).unwrap();
        x = (x + (v * (sigmas[i + 1] - sigmas[i])).unwrap()).unwrap();
    }
    let e3 = rel_l2(&cond.fill_fixed(&x).unwrap(), &p["out_g3"]);
    eprintln!("{name}: pipeline parity rel L2 guidance 1 {e1:.2e}, guidance 3 {e3:.2e}");
    assert!(e1 < 1e-4 && e3 < 1e-4, "{name}: {e1:.3e} {e3:.3e}");
    // Without the image the result is another one: the condition is used, not ignored.
    let text_only = Cond::Embedding(emb.prompts.clone());
    let x = match mode {
        ImageMode::Channels => None,
        ImageMode::FirstFrame => Some(sample_from(std::slice::from_ref(&net), &|_| 0, &sigmas, z.clone(), &text_only).unwrap()),
    };
    if let Some(x) = x {
        assert!(rel_l2(&x, &p["out_g1"]) > 1e-2);
    }
}

#[test]
fn a14b_channel_condition_matches_the_diffusers_pipeline() {
    check_pipeline("wan22_i2v_tiny", ImageMode::Channels);
}

#[test]
fn ti2v_first_frame_condition_matches_the_diffusers_pipeline() {
    check_pipeline("wan22_ti2v_tiny", ImageMode::FirstFrame);
}

#[test]
fn i2v_forward_with_36_input_channels_matches_diffusers() {
    setup();
    let i = candle_core::safetensors::load(fixture("wan22_i2v_tiny", "forward.safetensors"), &Device::Cpu).unwrap();
    let net = Net::open(&fixture("wan22_i2v_tiny", "diffusers"), &Device::Cpu).unwrap();
    let Net::Wan(m) = &net else { panic!("not Wan") };
    let out = m.forward(&i["hidden_states"], &i["timestep"], &i["encoder_hidden_states"]).unwrap();
    let e = rel_l2(&out, &i["output"]);
    eprintln!("wan i2v forward rel L2 {e:.2e}");
    assert_eq!(out.dims(), &[2, 16, 3, 4, 6]);
    assert!(e < 1e-5, "{e:.3e}");
}

fn train(r: &Recipe, text: &str, out: &Path, opts: TrainOptions) -> phasekit::train::rundir::Summary {
    phasekit::train::train(r, text, out, &opts, &|_| {}).unwrap()
}

fn tensors(p: &Path) -> Vec<(String, Vec<f32>)> {
    let (t, _) = run::read_tensors(p).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = t.into_iter().map(|(n, t)| (n, values(&t))).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn i2v_a14b_tiny_run_trains_samples_and_resumes_bit_identically() {
    setup();
    let (r, text) = recipe("wan2.2-i2v-tiny-2phase.toml");
    assert_eq!(r.task(), Task::I2v);
    let d = tempfile::tempdir().unwrap();
    let full = d.path().join("full");
    assert!(train(&r, &text, &full, TrainOptions::default()).completed);
    // The run keeps its random conditions, the image ones included; their mask channels are the
    // pipeline's (1 on the first latent frame, 0 after), as in the fixture's real condition.
    let (t, _) = run::read_tensors(&full.join("embeddings.safetensors")).unwrap();
    let t: HashMap<String, Tensor> = t.into_iter().collect();
    let c = &t[IMAGE_CONDITION];
    assert_eq!(c.dims(), &[4, 20, 3, 4, 6]);
    let want = pipeline("wan22_i2v_tiny")["condition"].narrow(1, 0, 4).unwrap();
    for row in 0..4 {
        assert_eq!(values(&c.narrow(0, row, 1).unwrap().narrow(1, 0, 4).unwrap()), values(&want.narrow(0, 0, 1).unwrap()));
    }
    for line in std::fs::read_to_string(full.join("log.jsonl")).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["gen_loss"].as_f64().unwrap().is_finite() && v["fake_loss"].as_f64().unwrap().is_finite(), "{line}");
    }
    // Killed mid-phase 1 and resumed: the same experts bit for bit.
    let part = d.path().join("part");
    assert!(!train(&r, &text, &part, TrainOptions { stop_after: Some(4), ..Default::default() }).completed);
    assert!(train(&r, &text, &part, TrainOptions { resume: true, ..Default::default() }).completed);
    for k in 0..2 {
        let f = format!("experts/expert-{k}.safetensors");
        assert_eq!(tensors(&full.join(&f)), tensors(&part.join(&f)), "expert {k}");
    }
    // sample --run conditions sample i on prompt i mod 4 and its image: 16-channel latents.
    let smp = d.path().join("samples.safetensors");
    run_ok(&["sample", "--run", &s(&full), "--n", "3", "--out", &s(&smp)]);
    let (t, _) = run::read_tensors(&smp).unwrap();
    assert_eq!(t[0].1.dims(), &[3, 16, 3, 4, 6]);
    assert!(values(&t[0].1).iter().all(|x| x.is_finite()));
    // The assembled checkpoint samples the same way from the run's embeddings file.
    let moe = d.path().join("moe.safetensors");
    run_ok(&["assemble", "--run", &s(&full), "-o", &s(&moe)]);
    let smp2 = d.path().join("samples2.safetensors");
    let emb = s(&full.join("embeddings.safetensors"));
    run_ok(&[
        "sample",
        "--moe",
        &s(&moe),
        "--cond",
        &emb,
        "--n",
        "3",
        "--frames",
        "3",
        "--height",
        "4",
        "--width",
        "6",
        "--out",
        &s(&smp2),
    ]);
    let (u, _) = run::read_tensors(&smp2).unwrap();
    assert!(rel_l2(&u[0].1, &t[0].1) < 1e-5, "moe vs run samples differ");
}

/// The tiny T2V method on the dense TI2V-shaped fixture (no expert boundary), latent 3×4×6,
/// with task `task` (None: the model's default, t2v).
fn ti2v_recipe(task: Option<Task>) -> (Recipe, String) {
    let (mut r, text) = recipe("wan2.2-tiny-2phase.toml");
    r.model = "wan2.2-ti2v-5b".into();
    let t = r.transformer.as_mut().unwrap();
    t.checkpoint = s(&fixture("wan22_ti2v_tiny", "diffusers"));
    t.experts = vec![];
    t.expert_boundary = None;
    t.phase1_t_range = None;
    t.resolutions = vec![[3, 4, 6]];
    t.task = task;
    r.train.updates_per_phase = 2;
    (r, text)
}

#[test]
fn ti2v_image_to_video_run_keeps_the_given_first_frame() {
    setup();
    let (r, text) = ti2v_recipe(Some(Task::I2v));
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run");
    assert!(train(&r, &text, &out, TrainOptions::default()).completed);
    let (e, _) = run::read_tensors(&out.join("embeddings.safetensors")).unwrap();
    let e: HashMap<String, Tensor> = e.into_iter().collect();
    assert_eq!(e[IMAGE_CONDITION].dims(), &[4, 48, 1, 4, 6]);
    let smp = d.path().join("samples.safetensors");
    run_ok(&["sample", "--run", &s(&out), "--n", "5", "--out", &s(&smp)]);
    let (t, _) = run::read_tensors(&smp).unwrap();
    let x = &t[0].1;
    assert_eq!(x.dims(), &[5, 48, 3, 4, 6]);
    for i in 0..5 {
        let first = x.narrow(0, i, 1).unwrap().narrow(2, 0, 1).unwrap();
        assert_eq!(values(&first), values(&e[IMAGE_CONDITION].narrow(0, i % 4, 1).unwrap()), "sample {i}");
    }
    let rest = values(&x.narrow(2, 1, 2).unwrap());
    assert!(rest.iter().all(|v| v.is_finite()) && rest.iter().any(|v| *v != 0.0));
}

#[test]
fn image_conditions_that_do_not_fit_are_clear_errors() {
    setup();
    let d = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let file = embeddings_file("wan22_i2v_tiny", d.path());
    // A text-to-video recipe given a file with image conditions: refused, not silently ignored.
    let (mut r, text) = ti2v_recipe(None);
    let ti2v_file = embeddings_file("wan22_ti2v_tiny", d.path());
    r.transformer.as_mut().unwrap().embeddings = s(&ti2v_file);
    let e = phasekit::train::train(&r, &text, &d.path().join("a"), &TrainOptions::default(), &|_| {}).unwrap_err();
    assert_eq!(e.kind(), Kind::Inconsistent, "{e}");
    assert!(e.to_string().contains("wan22_ti2v_tiny-emb.safetensors") && e.to_string().contains("task"), "{e}");
    // With task = "i2v" the same file trains.
    r.transformer.as_mut().unwrap().task = Some(Task::I2v);
    r.train.updates_per_phase = 1;
    assert!(phasekit::train::train(&r, &text, &d.path().join("b"), &TrainOptions::default(), &|_| {}).unwrap().completed);
    // A resolution the image does not fit.
    r.transformer.as_mut().unwrap().resolutions = vec![[3, 4, 4]];
    let e = phasekit::train::train(&r, &text, &d.path().join("c"), &TrainOptions::default(), &|_| {}).unwrap_err();
    assert!(e.to_string().contains(IMAGE_CONDITION), "{e}");
    // I2V-A14B: a file without image conditions, and one of the wrong shape.
    let net = Net::open(&fixture("wan22_i2v_tiny", "diffusers"), &dev).unwrap();
    let p = pipeline("wan22_i2v_tiny");
    let text_only = d.path().join("text.safetensors");
    run::write_tensors(&text_only, &[("prompt_embeds".into(), p["prompt_embeds"].clone())], &[]).unwrap();
    let err = Embeddings::load(&s(&text_only), &net, &[[3, 4, 6]], None, 0, &dev).err().unwrap();
    assert!(err.to_string().contains("text.safetensors") && err.to_string().contains(IMAGE_CONDITION), "{err}");
    let wrong = d.path().join("wrong.safetensors");
    let c = p["condition"].narrow(1, 0, 16).unwrap();
    run::write_tensors(&wrong, &[("prompt_embeds".into(), p["prompt_embeds"].clone()), (IMAGE_CONDITION.into(), c)], &[]).unwrap();
    let err = Embeddings::load(&s(&wrong), &net, &[[3, 4, 6]], None, 0, &dev).err().unwrap();
    assert!(err.to_string().contains("[2, 20, 3, 4, 6]"), "{err}");
    assert!(Embeddings::load(&s(&file), &net, &[[3, 4, 6]], Some(Task::T2v), 0, &dev).is_err());
    assert!(Embeddings::load(&s(&file), &net, &[[3, 4, 6]], None, 0, &dev).unwrap().image.is_some());
    // Recipes: a text-only model cannot take task = "i2v", nor the I2V model "t2v".
    let bad = d.path().join("bad.toml");
    let base = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("recipes/qwen-image-tiny.toml")).unwrap();
    std::fs::write(&bad, base.replace("[transformer]", "[transformer]\ntask = \"i2v\"")).unwrap();
    let e = Recipe::load(&bad).err().unwrap();
    assert!(e.to_string().contains("task"), "{e}");
}

/// Several training resolutions: one image-condition set per latent size (the same images
/// prepared at each size), drawn with the resolution; TI2V's first-frame images serve any frame count.
#[test]
fn image_to_video_trains_at_several_latent_sizes() {
    setup();
    let d = tempfile::tempdir().unwrap();
    let (mut r, text) = recipe("wan2.2-i2v-tiny-2phase.toml");
    let t = r.transformer.as_mut().unwrap();
    t.resolutions = vec![[3, 4, 6], [3, 4, 4], [1, 4, 6]];
    t.resolution_weights = vec![1.0, 1.0, 1.0];
    r.train.updates_per_phase = 4;
    let out = d.path().join("run");
    assert!(train(&r, &text, &out, TrainOptions::default()).completed);
    let (e, _) = run::read_tensors(&out.join("embeddings.safetensors")).unwrap();
    let mut sets: Vec<(String, Vec<usize>)> =
        e.iter().filter(|(n, _)| n.starts_with(IMAGE_CONDITION)).map(|(n, t)| (n.clone(), t.dims().to_vec())).collect();
    sets.sort();
    assert_eq!(
        sets,
        vec![
            (format!("{IMAGE_CONDITION}.1x4x6"), vec![4, 20, 1, 4, 6]),
            (format!("{IMAGE_CONDITION}.3x4x4"), vec![4, 20, 3, 4, 4]),
            (format!("{IMAGE_CONDITION}.3x4x6"), vec![4, 20, 3, 4, 6]),
        ]
    );
    // Each trained size samples from its own set; a size no set fits is a clear error.
    for (f, w) in [(3, 4), (1, 6)] {
        let smp = d.path().join(format!("s{f}{w}.safetensors"));
        run_ok(&["sample", "--run", &s(&out), "--n", "2", "--frames", &f.to_string(), "--width", &w.to_string(), "--out", &s(&smp)]);
        let (t, _) = run::read_tensors(&smp).unwrap();
        assert_eq!(t[0].1.dims(), &[2, 16, f, 4, w]);
    }
    let o = common::run(&["sample", "--run", &s(&out), "--n", "2", "--frames", "2", "--out", &s(&d.path().join("x.safetensors"))]);
    assert_ne!(o.code, Some(0));
    assert!(o.stderr.contains("no image_condition fits latent size [2, 4, 6]"), "{}", o.stderr);
    // A file whose one set fits only one of two resolutions is refused before training.
    let file = embeddings_file("wan22_i2v_tiny", d.path());
    let t = r.transformer.as_mut().unwrap();
    t.embeddings = s(&file);
    t.resolutions = vec![[3, 4, 6], [3, 4, 4]];
    t.resolution_weights = vec![];
    let e = phasekit::train::train(&r, &text, &d.path().join("bad"), &TrainOptions::default(), &|_| {}).unwrap_err();
    assert!(e.to_string().contains("latent size [3, 4, 4]"), "{e}");
    // TI2V: first-frame images fit every frame count of a height and width: one set for both.
    let (mut r, text) = ti2v_recipe(Some(Task::I2v));
    r.transformer.as_mut().unwrap().resolutions = vec![[3, 4, 6], [1, 4, 6]];
    let out = d.path().join("ti2v");
    assert!(train(&r, &text, &out, TrainOptions::default()).completed);
    let (e, _) = run::read_tensors(&out.join("embeddings.safetensors")).unwrap();
    let names: Vec<&String> = e.iter().map(|(n, _)| n).filter(|n| n.starts_with(IMAGE_CONDITION)).collect();
    assert_eq!(names, vec![IMAGE_CONDITION]);
}
