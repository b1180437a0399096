//! Tiny Wan2.2 / Qwen-Image runs → `assemble --run` (LoRA experts, and `--merge-lora`) →
//! `verify` → `sample --moe`: the routed checkpoint samples what `sample --run` samples, bit for
//! bit with LoRA experts (the same adapters on the same base, the same Euler loop), and within a
//! float-rounding tolerance when the LoRA is merged; `--dtype bf16|f16` stays within a measured
//! bound of f32, and `--cond random:N` draws from `--cond-seed`, not from the noise seed. A
//! Wan2.2-A14B-like run with two different teacher experts keeps each generator LoRA on its own
//! base through manifest, assembler, loader, merge and sampler.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use common::{run, run_ok, s};
use phasekit::moe::format::{MoeMeta, FORMAT_TAG, FORMAT_TAG_2};
use phasekit::moe::MoeCheckpoint;
use phasekit::train::recipe::Recipe;
use phasekit::train::rundir as trun;
use phasekit::train::transformer::sample::TransformerRun;
use phasekit::train::TrainOptions;
use phasekit::Kind;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn train(r: &Recipe, out: &Path) {
    phasekit::train::single_threaded_kernels();
    let sum = phasekit::train::train(r, &r.to_toml(), out, &TrainOptions::default(), &|_| {}).unwrap();
    assert!(sum.completed);
}

fn samples(path: &Path) -> Tensor {
    let (t, _) = trun::read_tensors(path).unwrap();
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].0, "samples");
    t[0].1.clone()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
}

/// `sample` with `args` into `dir/<name>.safetensors`, returning the latents.
fn sample(dir: &Path, name: &str, args: &[&str]) -> Tensor {
    sample_seed(dir, name, "5", args)
}

/// [`sample`] with noise seed `seed`.
fn sample_seed(dir: &Path, name: &str, seed: &str, args: &[&str]) -> Tensor {
    let out = dir.join(format!("samples-{name}.safetensors"));
    let mut v = vec!["sample", "--seed", seed, "--force"];
    v.extend_from_slice(args);
    let o = s(&out);
    v.extend(["--out", o.as_str()]);
    run_ok(&v);
    samples(&out)
}

/// Relative L2 distance of two latents.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    phasekit::model::rel_l2(a, b).unwrap()
}

/// Merged experts compute x·(W + s·up·down)ᵀ where LoRA experts compute x·Wᵀ + s·(x·downᵀ)·upᵀ:
/// the same math in another f32 rounding order (each weight rounded once more), a few ulp
/// (~1e-7 relative) per layer, compounded over 2 blocks × 4 steps: we measure 1.1e-7 to 1.7e-7
/// (Wan, Qwen, two-base Wan). 1e-5 leaves a ~60× margin and is still far below any real
/// difference (the LoRAs on the wrong base move the latents by 0.27, checked below).
const MERGE_TOL: f64 = 1e-5;

/// Train `recipe`, assemble it with LoRA experts and merged, verify both, and check that
/// `sample --moe` equals `sample --run`. Returns (run dir, LoRA checkpoint, merged checkpoint).
fn round_trip(dir: &Path, r: &Recipe, dims: &[usize]) -> (PathBuf, PathBuf, PathBuf) {
    let out = dir.join("run");
    train(r, &out);
    let lora = dir.join("lora.safetensors");
    let merged = dir.join("merged.safetensors");
    run_ok(&["assemble", "--run", &s(&out), "-o", &s(&lora)]);
    run_ok(&["assemble", "--run", &s(&out), "--merge-lora", "-o", &s(&merged)]);
    run_ok(&["verify", &s(&lora)]);
    run_ok(&["verify", &s(&merged)]);
    let (l, m) = (MoeCheckpoint::open(&lora).unwrap(), MoeCheckpoint::open(&merged).unwrap());
    assert_eq!(l.kind(0).as_str(), "lora");
    assert_eq!(m.kind(0).as_str(), "full");

    // The stored routing sends each step's σ to the expert the run uses for it.
    let tr = TransformerRun::open(&out, &candle_core::Device::Cpu).unwrap();
    for &sg in &tr.info.sigmas[..tr.info.steps] {
        assert_eq!(l.expert_for_sigma(sg), Some(tr.route(sg)), "σ = {sg}");
    }

    let cond = s(&out.join("embeddings.safetensors"));
    let c = ["--n", "3", "--cond", cond.as_str()];
    let by_run = sample(dir, "run", &[&["--run", &s(&out)][..], &c[..]].concat());
    let by_lora = sample(dir, "lora", &[&["--moe", &s(&lora)][..], &c[..]].concat());
    let by_merged = sample(dir, "merged", &[&["--moe", &s(&merged)][..], &c[..]].concat());
    assert_eq!(by_run.dims(), dims);
    assert_eq!(by_lora.dims(), dims);
    assert!(bits(&by_run) == bits(&by_lora), "sample --moe (LoRA experts) differs from sample --run");
    let d = rel(&by_merged, &by_lora);
    eprintln!("{}: merged vs LoRA experts, relative L2 {d:.3e}", r.name);
    assert!(d < MERGE_TOL, "merged checkpoint differs by {d}");
    // Other step counts route through expert_for_sigma too, and still agree.
    let k = ["--steps", "6"];
    let a = sample(dir, "run6", &[&["--run", &s(&out)][..], &c[..], &k[..]].concat());
    let b = sample(dir, "lora6", &[&["--moe", &s(&lora)][..], &c[..], &k[..]].concat());
    assert!(bits(&a) == bits(&b), "--steps 6 differs");
    dtypes(dir, &r.name, &out, &lora, &merged, &cond, &by_lora, &by_merged);
    (out, lora, merged)
}

/// bf16 / f16 experts against f32, as relative L2 of the final latents (3 samples, 4 Euler
/// steps, the sampler's state in f32). `--dtype` holds the weights in 16 bits and computes in f32
/// (docs/models.md#dtype, as `forward --dtype`), so the error is that of rounding every weight
/// once: at most 2⁻⁹ (bf16, 8 significant bits) or 2⁻¹² (f16, 11 bits) relative per weight,
/// RMS about 1/√3 of that (1.1e-3, 1.4e-4), adding up incoherently through 2 blocks × 4 steps.
/// Measured on the tiny runs (LoRA experts, merged experts; --run equals --moe bit for bit):
///   bf16: Wan 2.0e-3 / 2.0e-3, two-base Wan 1.3e-3 / 1.6e-3, Qwen 3.3e-3 / 3.5e-3
///   f16:  Wan 2.9e-4 / 3.2e-4, two-base Wan 2.1e-4 / 1.8e-4, Qwen 4.6e-4 / 4.3e-4
/// the ~8× of their 3 mantissa bits apart. The bounds leave a ~3× margin over the largest
/// measurement and stay far below a real fault (the LoRAs on the wrong base move the latents by
/// 0.27, checked below).
const BF16_TOL: f64 = 1e-2;
const F16_TOL: f64 = 1.5e-3;

/// `sample --dtype bf16|f16` through the LoRA and the merged checkpoint and the run folder: close
/// to f32 within the bounds above, never bit-equal to it (the dtype is used), bf16 further than
/// f16; `--run` and `--moe` still agree bit for bit in each dtype; the file and `--json` say
/// which dtype computed.
#[allow(clippy::too_many_arguments)]
fn dtypes(dir: &Path, name: &str, run_dir: &Path, lora: &Path, merged: &Path, cond: &str, f32_lora: &Tensor, f32_merged: &Tensor) {
    let c = ["--n", "3", "--cond", cond];
    // --dtype f32 is the default.
    let x = sample(dir, "lora-f32", &[&["--moe", &s(lora), "--dtype", "f32"][..], &c[..]].concat());
    assert!(bits(&x) == bits(f32_lora), "--dtype f32 differs from the default");
    let mut err = Vec::new();
    for (dt, tol) in [("bf16", BF16_TOL), ("f16", F16_TOL)] {
        let by_lora = sample(dir, &format!("lora-{dt}"), &[&["--moe", &s(lora), "--dtype", dt][..], &c[..]].concat());
        let by_merged = sample(dir, &format!("merged-{dt}"), &[&["--moe", &s(merged), "--dtype", dt][..], &c[..]].concat());
        let by_run = sample(dir, &format!("run-{dt}"), &[&["--run", &s(run_dir), "--dtype", dt][..], &c[..]].concat());
        assert!(bits(&by_run) == bits(&by_lora), "{dt}: sample --moe (LoRA experts) differs from sample --run");
        let (dl, dm) = (rel(&by_lora, f32_lora), rel(&by_merged, f32_merged));
        eprintln!("{name}: {dt} vs f32, relative L2 {dl:.3e} (LoRA experts), {dm:.3e} (merged)");
        for (d, what) in [(dl, "LoRA experts"), (dm, "merged")] {
            assert!(d < tol, "{dt} ({what}) is {d} from f32 (bound {tol})");
        }
        assert!(bits(&by_lora) != bits(f32_lora) && bits(&by_merged) != bits(f32_merged), "{dt} computed what f32 computes");
        err.push(dl);
    }
    assert!(err[0] > err[1], "bf16 ({}) should be further from f32 than f16 ({})", err[0], err[1]);
    // The samples file and --json name the dtype.
    let out = dir.join("samples-json.safetensors");
    let o =
        run_ok(&[&["--json", "sample", "--moe", &s(lora), "--dtype", "bf16", "--force"][..], &c[..], &["--out", &s(&out)][..]].concat());
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["dtype"], "bf16", "{}", o.both());
    let (_, md) = trun::read_tensors(&out).unwrap();
    assert!(md.iter().any(|(k, v)| k == "phasekit.dtype" && v == "bf16"), "{md:?}");
}

#[test]
fn wan_tiny_checkpoint_samples_what_the_run_samples() {
    let d = tempfile::tempdir().unwrap();
    let (r, _) = Recipe::load(&repo().join("recipes/wan2.2-tiny-2phase.toml")).unwrap();
    let (out, lora, _) = round_trip(d.path(), &r, &[3, 4, 1, 4, 4]);
    // One teacher file for both experts: one base, format /1.
    let l = MoeCheckpoint::open(&lora).unwrap();
    assert_eq!(l.routing().experts.iter().map(|e| e.base).collect::<Vec<_>>(), vec![None, None]);
    assert!(l.checkpoint().metadata.iter().any(|(k, v)| k == "phasekit.moe.format" && v == FORMAT_TAG));
    // The latent size comes from the checkpoint (phasekit.moe.sample); flags override it.
    let cond = s(&out.join("embeddings.safetensors"));
    let x = sample(d.path(), "big", &["--moe", &s(&lora), "--n", "1", "--cond", &cond, "--height", "8", "--width", "6"]);
    assert_eq!(x.dims(), &[1, 4, 1, 8, 6]);
    let y = sample(d.path(), "bigrun", &["--run", &s(&out), "--n", "1", "--cond", &cond, "--height", "8", "--width", "6"]);
    assert!(bits(&x) == bits(&y));
    // --cond random:N draws from --cond-seed, not from the noise seed: with the recipe's seed
    // (7) it is the run's own random:4 embeddings whatever --seed is, through --moe and --run.
    let rnd = ["--n", "3", "--cond", "random:4", "--cond-seed", "7"];
    let file = ["--n", "3", "--cond", cond.as_str()];
    for seed in ["5", "6"] {
        let a = sample_seed(d.path(), "rnd", seed, &[&["--moe", &s(&lora)][..], &rnd[..]].concat());
        let b = sample_seed(d.path(), "file", seed, &[&["--moe", &s(&lora)][..], &file[..]].concat());
        assert!(bits(&a) == bits(&b), "--seed {seed}: random:4 with --cond-seed 7 is not the run's embeddings");
    }
    let a = sample(d.path(), "rndrun", &[&["--run", &s(&out)][..], &rnd[..]].concat());
    let b = sample(d.path(), "ownrun", &["--run", &s(&out), "--n", "3"]);
    assert!(bits(&a) == bits(&b), "sample --run: random:4 with --cond-seed 7 is not the run's embeddings");
    // The default --cond-seed is 0: other prompts than seed 7's, the same at any --seed.
    let z = sample(d.path(), "rnd0", &["--moe", &s(&lora), "--n", "3", "--cond", "random:4"]);
    let z0 = sample(d.path(), "rnd00", &["--moe", &s(&lora), "--n", "3", "--cond", "random:4", "--cond-seed", "0"]);
    assert!(bits(&z) == bits(&z0), "--cond-seed does not default to 0");
    assert!(bits(&z) != bits(&b), "--cond-seed 0 drew seed 7's prompts");
    // --cond-seed seeds random:N only.
    let smp = d.path().join("bad.safetensors");
    let (run_dir, moe, bad) = (s(&out), s(&lora), s(&smp));
    for extra in [&["--cond", cond.as_str()][..], &[][..]] {
        let src = if extra.is_empty() { ["--run", run_dir.as_str()] } else { ["--moe", moe.as_str()] };
        let o = run(&[&["sample"][..], &src[..], extra, &["--cond-seed", "3", "--out", bad.as_str()][..]].concat());
        assert_eq!(o.code, Some(2), "{}", o.both());
        assert!(o.stderr.contains("--cond-seed") && !smp.exists(), "{}", o.both());
    }
    // Bad inputs: no --cond, a shape the patch does not divide, conditions of the wrong width.
    let o = run(&["sample", "--moe", &s(&lora), "--out", &s(&smp)]);
    assert_eq!(o.code, Some(2), "{}", o.both());
    let o = run(&["sample", "--moe", &s(&lora), "--cond", &cond, "--height", "3", "--out", &s(&smp)]);
    assert_eq!(o.code, Some(2), "{}", o.both());
    assert!(o.stderr.contains("patch"), "{}", o.both());
    let qcond = d.path().join("q.safetensors");
    trun::write_tensors(
        &qcond,
        &[("prompt_embeds".into(), Tensor::zeros((1, 3, 5), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap())],
        &[],
    )
    .unwrap();
    let o = run(&["sample", "--moe", &s(&lora), "--cond", &s(&qcond), "--out", &s(&smp)]);
    assert_eq!(o.code, Some(6), "{}", o.both());
    assert!(!o.panicked() && !smp.exists(), "{}", o.both());
}

#[test]
fn qwen_tiny_checkpoint_samples_what_the_run_samples() {
    let d = tempfile::tempdir().unwrap();
    let (r, _) = Recipe::load(&repo().join("recipes/qwen-image-tiny.toml")).unwrap();
    round_trip(d.path(), &r, &[3, 4, 16]);
}

/// A copy of the tiny Wan2.2 fixture with every weight scaled by 0.8: a second teacher expert
/// (the low-noise model of a Wan2.2-A14B-like pair).
fn low_noise_teacher(dir: &Path) -> PathBuf {
    let src = repo().join("tests/fixtures/wan22_t2v_tiny/diffusers");
    let dst = dir.join("low_noise_model");
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
    let (t, _) = trun::read_tensors(&src.join("diffusion_pytorch_model.safetensors")).unwrap();
    let t: Vec<(String, Tensor)> = t.into_iter().map(|(n, x)| (n, (x * 0.8).unwrap())).collect();
    trun::write_tensors(&dst.join("diffusion_pytorch_model.safetensors"), &t, &[]).unwrap();
    dst
}

#[test]
fn wan_two_teacher_experts_keep_each_lora_on_its_own_base() {
    let d = tempfile::tempdir().unwrap();
    let high = repo().join("tests/fixtures/wan22_t2v_tiny/diffusers");
    let low = low_noise_teacher(d.path());
    let (mut r, _) = Recipe::load(&repo().join("recipes/wan2.2-tiny-2phase.toml")).unwrap();
    r.transformer.as_mut().unwrap().experts = vec![s(&high), s(&low)];
    let (out, lora, merged) = round_trip(d.path(), &r, &[3, 4, 1, 4, 4]);

    // The manifest names each expert's base: phase 1 (σ ≥ 0.875) on the high-noise model,
    // phase 2 on the low-noise one.
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["base"], "base.safetensors");
    assert!(m["experts"][0].get("base").is_none());
    assert_eq!(m["experts"][1]["base"], "base-1/base.safetensors");
    assert_eq!(m["latent"], serde_json::json!([1, 4, 4]));

    // The checkpoint stores both bases; expert 1's LoRA applies to bases.1. (format /2).
    let l = MoeCheckpoint::open(&lora).unwrap();
    assert_eq!(l.routing().experts.iter().map(|e| e.base).collect::<Vec<_>>(), vec![None, Some(1)]);
    assert_eq!((l.expert_base(0), l.expert_base(1)), (0, 1));
    assert!(l.checkpoint().metadata.iter().any(|(k, v)| k == "phasekit.moe.format" && v == FORMAT_TAG_2));
    assert!(l.checkpoint().tensors.iter().any(|t| t.name == "bases.1.blocks.0.attn1.to_q.weight"));
    assert_eq!(l.meta().provenance.base_sources.len(), 2);
    // A reader of /1 must not take it for a one-base file: the tag and the routing must agree.
    let mut md = l.checkpoint().metadata.clone();
    md.iter_mut().filter(|(k, _)| k == "phasekit.moe.format").for_each(|(_, v)| *v = FORMAT_TAG.into());
    assert_eq!(MoeMeta::from_metadata(&md).unwrap_err().kind(), Kind::Malformed);

    // The docs' Python loader (docs/moe-format.md §8) names each expert's base prefix.
    if std::process::Command::new("python3").args(["-c", "import safetensors, numpy"]).output().is_ok_and(|o| o.status.success()) {
        let doc = std::fs::read_to_string(repo().join("docs/moe-format.md")).unwrap();
        let block = doc.split("<!-- loader:begin -->").nth(1).unwrap().split("<!-- loader:end -->").next().unwrap();
        let script = d.path().join("loader.py");
        std::fs::write(&script, block.split("```python").nth(1).unwrap().split("```").next().unwrap()).unwrap();
        for (sigma, prefix) in [("1.0", "base."), ("0.3", "bases.1.")] {
            let o = std::process::Command::new("python3").arg(&script).arg(&lora).arg(sigma).output().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            assert_eq!(String::from_utf8_lossy(&o.stdout).split_whitespace().nth(4), Some(prefix), "σ {sigma}");
        }
    } else {
        println!("skipped the Python loader: python3 with safetensors and numpy not available");
    }

    // Loader: without LoRA each expert's weight is its own base's; with it, base + delta,
    // which is exactly what --merge-lora stored.
    let file = |dir: &Path| trun::read_tensors(&dir.join("diffusion_pytorch_model.safetensors")).unwrap().0;
    let w = "blocks.0.attn1.to_q.weight";
    let of = |t: &[(String, Tensor)]| t.iter().find(|(n, _)| n == w).unwrap().1.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (hi_w, lo_w) = (of(&file(&high)), of(&file(&low)));
    assert_eq!(l.weight_f32(0, w, false).unwrap().1, hi_w);
    assert_eq!(l.weight_f32(1, w, false).unwrap().1, lo_w);
    let mg = MoeCheckpoint::open(&merged).unwrap();
    assert!(mg.checkpoint().metadata.iter().any(|(k, v)| k == "phasekit.moe.format" && v == FORMAT_TAG));
    for e in 0..2 {
        let with = l.weight_f32(e, w, true).unwrap().1;
        assert_eq!(mg.weight_f32(e, w, true).unwrap().1, with, "expert {e}");
        assert_ne!(&with, if e == 0 { &hi_w } else { &lo_w }, "expert {e}: the LoRA moved nothing");
    }

    // export --to comfy bakes each LoRA into its own base too: the weights --merge-lora stored.
    let comfy = d.path().join("comfy");
    run_ok(&["export", &s(&lora), "--to", "comfy", "-o", &s(&comfy)]);
    for (e, f) in [(0, "lora_high_noise.safetensors"), (1, "lora_low_noise.safetensors")] {
        let (t, _) = trun::read_tensors(&comfy.join(f)).unwrap();
        let q = t.iter().find(|(n, _)| n == "blocks.0.self_attn.q.weight").expect("ComfyUI name").1.flatten_all().unwrap();
        assert_eq!(q.to_vec1::<f32>().unwrap(), mg.weight_f32(e, w, true).unwrap().1, "export of expert {e}");
    }

    // The same LoRAs all on the high-noise base (what a one-base assembler would do) sample
    // something else: the per-expert base matters.
    let wrong = d.path().join("wrong.safetensors");
    let ex = |k: usize| s(&out.join(format!("experts/expert-{k}.safetensors")));
    let hb = s(&out.join("base.safetensors"));
    let lb = s(&out.join("base-1/base.safetensors"));
    let manual = d.path().join("manual.safetensors");
    let args = |bases: [&str; 2], o: &Path| {
        let (e0, e1) = (ex(0), ex(1));
        let v: Vec<String> = [
            "assemble",
            "--expert",
            &e0,
            "--sigma-range",
            "0.875:1",
            "--expert-base",
            bases[0],
            "--expert",
            &e1,
            "--sigma-range",
            "0:0.875",
            "--expert-base",
            bases[1],
            "--steps",
            "4",
            "--shift",
            "5",
            "-o",
            &s(o),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        v
    };
    run_ok(&args([&hb, &lb], &manual));
    run_ok(&args([&hb, &hb], &wrong));
    run_ok(&["verify", &s(&manual)]);
    let cond = s(&out.join("embeddings.safetensors"));
    let shape = ["--frames", "1", "--height", "4", "--width", "4", "--n", "3", "--cond", cond.as_str()];
    let by_run = samples(&d.path().join("samples-run.safetensors"));
    let by_manual = sample(d.path(), "manual", &[&["--moe", &s(&manual)][..], &shape[..]].concat());
    let by_wrong = sample(d.path(), "wrong", &[&["--moe", &s(&wrong)][..], &shape[..]].concat());
    assert!(bits(&by_manual) == bits(&by_run), "--expert-base assembly samples differently from the run");
    let dw = rel(&by_wrong, &by_run);
    eprintln!("LoRAs on the wrong base: relative L2 {dw:.3e}");
    assert!(dw > 1e-2, "the low-noise base made no difference ({dw})");
    // --expert-base needs one per --expert.
    let o = run(&[
        "assemble",
        "--expert",
        &ex(0),
        "--sigma-range",
        "0:1",
        "--expert-base",
        &hb,
        "--expert-base",
        &lb,
        "--steps",
        "4",
        "--shift",
        "5",
        "-o",
        &s(&d.path().join("x.safetensors")),
    ]);
    assert_eq!(o.code, Some(2), "{}", o.both());
}
