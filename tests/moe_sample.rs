//! Toy run → `assemble --run` → `verify` → `sample --moe`: the routed checkpoint samples exactly
//! what the run folder samples, routes each σ to the expert of its range, and bad inputs fail
//! cleanly.

mod common;

use std::path::{Path, PathBuf};

use common::{run, run_ok, s, tests_dir};
use phasekit::moe::format::KIND_TOY_MLP;
use phasekit::moe::MoeCheckpoint;
use phasekit::train::recipe::Recipe;
use phasekit::train::rundir as trun;
use phasekit::train::toy::sample::{LoadedMoe, LoadedRun};
use phasekit::train::TrainOptions;

/// A tiny toy recipe (as `tests/train_toy.rs`): narrow MLP, 3 updates per phase.
fn tiny(phases: &[usize]) -> Recipe {
    let text = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("recipes/toy-phased-4step-4phase.toml")).unwrap();
    let mut r = Recipe::parse(&text, Path::new("tiny")).unwrap();
    r.mlp.width = 16;
    r.mlp.depth = 2;
    r.teacher.pretrain.steps = 30;
    r.teacher.pretrain.batch = 64;
    r.schedule.phases = phases.to_vec();
    r.train.updates_per_phase = 3;
    r.train.batch = 32;
    r.train.ttur = 1;
    r.train.checkpoint_every = 0;
    r.train.log_every = 1;
    r
}

fn toy_run(dir: &Path, phases: &[usize]) -> PathBuf {
    phasekit::train::single_threaded_kernels();
    let r = tiny(phases);
    let out = dir.join("run");
    phasekit::train::train(&r, &r.to_toml(), &out, &TrainOptions { eval_samples: 0, ..Default::default() }, &|_| {}).unwrap();
    out
}

fn samples(path: &Path) -> (Vec<usize>, Vec<u32>) {
    let (t, _) = trun::read_tensors(path).unwrap();
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].0, "samples");
    let v = t[0].1.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (t[0].1.dims().to_vec(), v.iter().map(|x| x.to_bits()).collect())
}

#[test]
fn toy_run_assembles_verifies_and_samples_through_the_checkpoint_bit_for_bit() {
    let d = tempfile::tempdir().unwrap();
    let out = toy_run(d.path(), &[1, 2, 3, 4]);
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["format"], "phasekit.run/1");
    assert_eq!(m["experts"][0]["kind"], "full");
    assert_eq!(m["model"]["kind"], KIND_TOY_MLP);

    let moe = d.path().join("toy-moe.safetensors");
    run_ok(&["assemble", "--run", &s(&out), "-o", &s(&moe)]);
    run_ok(&["verify", &s(&moe)]);
    assert!(d.path().join("toy-moe.safetensors.sha256").is_file());

    // Routing and weights, through the loader API.
    let run_ = LoadedRun::open(&out).unwrap();
    let ck = MoeCheckpoint::open(&moe).unwrap();
    assert_eq!(ck.num_experts(), 4);
    assert_eq!(ck.meta().model.kind.as_deref(), Some(KIND_TOY_MLP));
    assert_eq!(ck.meta().model.family, None);
    let r = ck.routing();
    assert_eq!(r.steps as usize, run_.manifest.steps);
    assert_eq!(r.shift, run_.manifest.shift);
    // The one-step first phase serves its phase interval (σ₁, 1]: from the float above σ₁.
    let s1 = run_.manifest.sigmas[1];
    assert_eq!(run_.manifest.experts[0].sigma_range, [f64::from_bits(s1.to_bits() + 1), 1.0]);
    for (i, e) in run_.manifest.experts.iter().enumerate() {
        // The table round-trips through JSON bit for bit.
        assert_eq!([r.experts[i].sigma_lo, r.experts[i].sigma_hi], e.sigma_range, "expert {i} range");
        assert_eq!(r.experts[i].timesteps, e.timesteps, "expert {i} timesteps");
        // Each step's σ goes to the expert of that phase; so do σ inside its range.
        for &t in &e.timesteps {
            assert_eq!(ck.expert_for_sigma(t / 1000.0), Some(i), "σ = {}", t / 1000.0);
        }
        let (lo, hi) = (r.experts[i].sigma_lo, r.experts[i].sigma_hi);
        assert_eq!(ck.expert_for_sigma(0.5 * (lo + hi)), Some(i));
        assert_eq!(ck.expert_for_sigma(lo), Some(i), "lower end is inclusive");
        if i > 0 {
            assert_eq!(ck.expert_for_sigma(hi), Some(i - 1), "upper end belongs to the previous expert");
        }
        // The stored weights are the expert file's, unchanged.
        let (tensors, _) = trun::read_tensors(&out.join(&e.file)).unwrap();
        for (name, t) in tensors {
            let (shape, w) = ck.weight_f32(i, &name, true).unwrap();
            assert_eq!(shape, t.dims().iter().map(|x| *x as u64).collect::<Vec<_>>());
            assert_eq!(w, t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), "expert {i} tensor {name}");
        }
    }
    assert_eq!(ck.expert_for_sigma(1.0), Some(0));
    assert_eq!(ck.expert_for_sigma(0.0), Some(3));
    let lm = LoadedMoe::open(&moe).unwrap();
    for k in 0..=200 {
        let sg = k as f64 / 200.0;
        assert_eq!(lm.route(sg), run_.route(sg), "σ = {sg}");
    }

    // sample --moe equals sample --run, bit for bit: default steps, other step counts, a class.
    for extra in [vec![], vec!["--steps", "8"], vec!["--steps", "2", "--class", "1"]] {
        let a = d.path().join("a.safetensors");
        let b = d.path().join("b.safetensors");
        let common = |src: &str, p: &Path, out: &Path| {
            let mut v = vec!["sample".to_string(), src.to_string(), s(p), "--n".into(), "300".into(), "--seed".into(), "7".into()];
            v.extend(extra.iter().map(|x| x.to_string()));
            v.extend(["--force".to_string(), "--out".into(), s(out)]);
            v
        };
        run_ok(&common("--run", &out, &a));
        let o = run_ok(&common("--moe", &moe, &b));
        assert!(o.stdout.contains("wrote 300 samples"), "{}", o.both());
        let (sa, va) = samples(&a);
        let (sb, vb) = samples(&b);
        assert_eq!(sa, vec![300, 2]);
        assert_eq!(sa, sb);
        assert!(va == vb, "sample --moe differs from sample --run with {extra:?}");
    }
    // The library samplers agree too (as the quickstart uses them).
    let x = run_.sample(64, None, 3, None).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let y = lm.sample(64, None, 3, None).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(x.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn sample_moe_refuses_bad_inputs_without_writing() {
    let d = tempfile::tempdir().unwrap();
    let out = toy_run(d.path(), &[2, 4]);
    let smp = d.path().join("s.safetensors");

    // A plain safetensors file (an expert of the run) is not a routed checkpoint.
    let o = run(&["sample", "--moe", &s(&out.join("experts/expert-0.safetensors")), "--n", "5", "--out", &s(&smp)]);
    assert_ne!(o.code, Some(0));
    assert_eq!(o.code, Some(7), "{}", o.both());
    assert!(o.stderr.contains("not a phasekit MoE checkpoint"), "{}", o.both());
    assert!(!o.panicked(), "{}", o.both());
    assert!(!smp.exists());

    // A missing file: I/O error.
    let o = run(&["sample", "--moe", &s(&d.path().join("nope.safetensors")), "--n", "5", "--out", &s(&smp)]);
    assert_eq!(o.code, Some(3), "{}", o.both());
    assert!(!smp.exists());

    // --run and --moe together, or neither: usage errors.
    let moe = d.path().join("m.safetensors");
    run_ok(&["assemble", "--run", &s(&out), "-o", &s(&moe)]);
    let o = run(&["sample", "--run", &s(&out), "--moe", &s(&moe), "--n", "5", "--out", &s(&smp)]);
    assert_eq!(o.code, Some(2), "{}", o.both());
    let o = run(&["sample", "--n", "5", "--out", &s(&smp)]);
    assert_eq!(o.code, Some(2), "{}", o.both());
    // A class the mixture does not have.
    let o = run(&["sample", "--moe", &s(&moe), "--class", "99", "--out", &s(&smp)]);
    assert_eq!(o.code, Some(2), "{}", o.both());
    assert!(!smp.exists());

    // A transformer checkpoint (the tiny Wan2.2 fixture, original layout, as one full expert)
    // needs conditions, and a latent size when it stores none; then it samples.
    let wan = tests_dir("fixtures/wan22_t2v_tiny/original/diffusion_pytorch_model.safetensors");
    let wmoe = d.path().join("wan.safetensors");
    run_ok(&["assemble", "--expert", &s(&wan), "--sigma-range", "0:1", "--steps", "4", "--shift", "5", "-o", &s(&wmoe)]);
    let o = run(&["sample", "--moe", &s(&wmoe), "--n", "2", "--out", &s(&smp)]);
    assert_eq!(o.code, Some(2), "{}", o.both());
    assert!(o.stderr.contains("--cond"), "{}", o.both());
    let o = run(&["sample", "--moe", &s(&wmoe), "--n", "2", "--cond", "random:2", "--out", &s(&smp)]);
    assert_eq!(o.code, Some(2), "{}", o.both());
    assert!(o.stderr.contains("--frames"), "{}", o.both());
    let o = run(&["sample", "--moe", &s(&moe), "--n", "2", "--cond", "random:2", "--out", &s(&smp)]);
    assert_eq!(o.code, Some(2), "toy with --cond: {}", o.both());
    let o = run(&["sample", "--moe", &s(&moe), "--n", "2", "--cond-seed", "3", "--out", &s(&smp)]);
    assert_eq!(o.code, Some(2), "toy with --cond-seed: {}", o.both());
    assert!(!smp.exists());
    // The toy MLP samples in f32 only: a 16-bit --dtype is refused in one line, not ignored,
    // from a checkpoint and from a run folder alike.
    for (src, p) in [("--moe", &moe), ("--run", &out)] {
        for dt in ["bf16", "f16"] {
            let o = run(&["sample", src, &s(p), "--n", "2", "--dtype", dt, "--out", &s(&smp)]);
            assert_eq!(o.code, Some(7), "{src} --dtype {dt}: {}", o.both());
            assert!(o.stderr.contains(&format!("--dtype {dt}")) && o.stderr.contains("f32 only"), "{}", o.both());
            assert_eq!(o.stderr.trim().lines().count(), 1, "{}", o.both());
            assert!(!o.panicked() && !smp.exists(), "{}", o.both());
        }
    }
    let shape = ["--frames", "1", "--height", "4", "--width", "4"];
    run_ok(&[&["sample", "--moe", &s(&wmoe), "--n", "2", "--cond", "random:2", "--out", &s(&smp)][..], &shape[..]].concat());
    assert_eq!(samples(&smp).0, vec![2, 4, 1, 4, 4]);
    std::fs::remove_file(&smp).unwrap();

    // The good checkpoint still samples (--dtype f32 is the toy's own, and --json reports it).
    let o = run_ok(&["--json", "sample", "--moe", &s(&moe), "--n", "5", "--dtype", "f32", "--out", &s(&smp)]);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["dtype"], "f32", "{}", o.both());
    assert!(smp.is_file());
}
