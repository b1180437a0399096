//! Wan2.1 T2V-14B: phasekit's Wan transformer against diffusers 0.42.1 on the tiny Wan2.1
//! fixture (tests/fixtures/wan21_t2v_tiny/make.py: the class and config diffusers uses for
//! Wan-AI/Wan2.1-T2V-14B-Diffusers, tiny widths), in its three layouts; the layouts convert into
//! each other byte for byte; Wan2.1's image-to-video models are refused (exit 7); a full-size
//! Wan2.1 file is told from a Wan2.2 A14B expert by what its folder, name or metadata say.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{read_model, run, run_ok, s};
use phasekit::model::rel_l2;
use phasekit::model::wan::WanTransformer;
use serde_json::Value;

fn fixture(p: &str) -> PathBuf {
    common::fixture("wan21_t2v_tiny").join(p)
}

fn parity(model: &Path, dtype: DType) -> f64 {
    let i = common::model::load(&fixture("forward.safetensors"));
    let m = WanTransformer::open(model, dtype, &Device::Cpu).unwrap();
    let out: Tensor = m.forward(&i["hidden_states"], &i["timestep"], &i["encoder_hidden_states"]).unwrap();
    rel_l2(&out.to_dtype(DType::F32).unwrap(), &i["output"]).unwrap()
}

/// The ComfyUI file has no config.json (nothing gives the number of heads); a copy of it beside
/// the original config, as a user would place it.
fn comfy_with_config(dir: &Path) -> PathBuf {
    let f = dir.join("wan2.1_t2v_tiny_fp32.safetensors");
    std::fs::copy(fixture("comfy/wan2.1_t2v_tiny_fp32.safetensors"), &f).unwrap();
    std::fs::copy(fixture("original/config.json"), dir.join("config.json")).unwrap();
    f
}

#[test]
fn f32_matches_diffusers_in_every_layout() {
    let d = tempfile::tempdir().unwrap();
    let comfy = comfy_with_config(d.path());
    for model in [fixture("diffusers"), fixture("original"), comfy] {
        let e = parity(&model, DType::F32);
        eprintln!("wan2.1 {} f32 rel L2 = {e:.3e}", model.display());
        assert!(e < 1e-5, "{}: {e}", model.display());
    }
}

#[test]
fn bf16_close() {
    let e = parity(&fixture("diffusers"), DType::BF16);
    eprintln!("wan2.1 bf16 rel L2 = {e:.3e}");
    assert!(e < 1e-2, "{e}");
}

#[test]
fn cli_forward_reproduces_output() {
    let d = tempfile::tempdir().unwrap();
    let v =
        common::model::forward_matches(&fixture("original"), &fixture("forward.safetensors"), &d.path().join("out.safetensors"), "wan22");
    assert_eq!(v["report"]["layout"], "original");
}

/// Each layout converts into the others with the same bytes as the files diffusers' converter
/// accepted (make.py checks its original and ComfyUI names through
/// `convert_wan_transformer_to_diffusers`).
#[test]
fn layouts_convert_into_each_other_byte_for_byte() {
    let d = tempfile::tempdir().unwrap();
    let diffusers = read_model(&fixture("diffusers"));
    let original = read_model(&fixture("original"));
    let comfy = read_model(&fixture("comfy/wan2.1_t2v_tiny_fp32.safetensors"));
    let cases: [(&str, PathBuf, &str, &std::collections::BTreeMap<String, common::StTensor>); 4] = [
        ("original→diffusers", fixture("original"), "diffusers", &diffusers),
        ("diffusers→original", fixture("diffusers"), "original", &original),
        ("comfy→diffusers", fixture("comfy/wan2.1_t2v_tiny_fp32.safetensors"), "diffusers", &diffusers),
        ("diffusers→comfy", fixture("diffusers"), "comfy", &comfy),
    ];
    for (i, (what, from, layout, want)) in cases.into_iter().enumerate() {
        let out = d.path().join(format!("out{i}.safetensors"));
        let mut args = vec!["convert".to_string(), s(&from), s(&out), "--layout".into(), layout.into()];
        if layout == "comfy" {
            args.push("--comfy-prefix".into());
        }
        run_ok(&args);
        common::assert_same_tensors(&read_model(&out), want, what);
    }
    // Detection names each layout.
    for (p, layout) in [(fixture("diffusers"), "diffusers"), (fixture("original"), "original"), (fixture("comfy"), "comfy")] {
        let v: Value = serde_json::from_str(&run_ok(&["--json", "inspect", &s(&p)]).stdout).unwrap();
        let m = &v;
        assert_eq!((m["detection"]["family"].as_str(), m["detection"]["layout"].as_str()), (Some("wan22"), Some(layout)), "{v}");
    }
}

/// Wan2.1 I2V (CLIP image embedding, image key/value projections): refused with exit 7 by
/// `forward` and by a training run, naming the file and the reason.
#[test]
fn wan21_image_to_video_is_refused_with_exit_7() {
    let d = tempfile::tempdir().unwrap();
    let o = run(&[
        "forward",
        "--model",
        &s(&fixture("i2v")),
        "--inputs",
        &s(&fixture("forward.safetensors")),
        "--out",
        &s(&d.path().join("o.safetensors")),
    ]);
    assert_eq!(o.code, Some(7), "{}", o.both());
    assert!(o.stderr.contains("i2v") && o.stderr.contains("Wan2.1 I2V"), "{}", o.stderr);
    assert_eq!(o.stderr.trim().lines().count(), 1, "{}", o.stderr);
    assert!(!d.path().join("o.safetensors").exists());
    let recipe = d.path().join("r.toml");
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/wan2.1-tiny-2phase.toml"))
        .unwrap()
        .replace("../tests/fixtures/wan21_t2v_tiny/diffusers", &s(&fixture("i2v")));
    std::fs::write(&recipe, text).unwrap();
    let o = run(&["train", "--recipe", &s(&recipe), "--out", &s(&d.path().join("run")), "-q"]);
    assert_eq!(o.code, Some(7), "{}", o.both());
    assert!(o.stderr.contains("Wan2.1 I2V"), "{}", o.stderr);
}

/// Full-size (sparse) replicas: the variant `inspect`, `forward` and `assemble` record is
/// `Wan2.1 T2V-14B` when the name says Wan2.1, `T2V-A14B expert` in a Wan2.2 expert folder, and
/// both names when nothing says which; a GGUF `general.name` naming both is no evidence.
#[test]
fn a_full_size_wan21_file_is_reported_as_wan21() {
    let d = tempfile::tempdir().unwrap();
    let hi = d.path().join("Wan2.2-T2V-A14B/high_noise_model");
    let w21 = d.path().join("Wan2.1-T2V-14B");
    std::fs::create_dir_all(&hi).unwrap();
    std::fs::create_dir_all(&w21).unwrap();
    let files = [
        (w21.join("diffusion_pytorch_model.safetensors"), "wan2.1-t2v-14b"),
        (d.path().join("wan2.1_t2v_14B_bf16.safetensors"), "wan2.1-t2v-14b"),
        (hi.join("diffusion_pytorch_model.safetensors"), "wan-t2v-a14b"),
        (d.path().join("model.safetensors"), "wan2.1-t2v-14b"),
    ];
    for (f, model) in &files {
        run_ok(&["bench", "replica", model, &s(f)]);
    }
    let inspect = |p: &Path| -> Value {
        let v: Value = serde_json::from_str(&run_ok(&["--json", "inspect", &s(p)]).stdout).unwrap();
        v
    };
    for (f, want, release) in [
        (&files[0].0, "Wan2.1 T2V-14B", "Wan2.1-14B"),
        (&files[1].0, "Wan2.1 T2V-14B", "Wan2.1-14B"),
        (&files[2].0, "T2V-A14B expert", "Wan2.2 A14B expert"),
        (&files[3].0, "T2V-A14B expert or Wan2.1 T2V-14B", "undetermined"),
    ] {
        let m = inspect(f);
        assert_eq!(m["detection"]["variant"], want, "{}: {m}", f.display());
        assert_eq!(m["wan_release"]["release"], release, "{}: {m}", f.display());
    }
    let text = run_ok(&["inspect", &s(&files[1].0)]).stdout;
    assert!(text.contains("family:     wan22 — Wan2.1 T2V-14B") && text.contains("release:    Wan2.1-14B"), "{text}");
}

/// The rule file's release twins: Wan2.2 T2V-A14B expert and Wan2.1 T2V-14B have the same shapes
/// (tensors alone give the first); Wan2.1 I2V and FLF2V are decided by their keys.
#[test]
fn release_twins_and_wan21_image_variants_from_keys() {
    let reg = phasekit::layout::Registry::builtin();
    let wan = reg.family("wan22").unwrap();
    assert_eq!(wan.release_twins("T2V-A14B expert"), vec![("T2V-A14B expert", Some("Wan2.2")), ("Wan2.1 T2V-14B", Some("Wan2.1"))]);
    assert_eq!(wan.release_twins("Wan2.1 T2V-14B").len(), 2);
    assert_eq!(wan.release_twins("I2V-A14B expert"), vec![("I2V-A14B expert", Some("Wan2.2"))]);
    assert!(wan.release_twins("custom").is_empty());
    let t = common::keys::wan_original(5120, 16, 16, 13824, 40);
    let shapes: Vec<(&str, &[u64])> = t.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect();
    assert_eq!(reg.detect(&shapes, None).unwrap().variant, "T2V-A14B expert");
    // FLF2V: I2V's image embedder plus the position embedding of its two images.
    let mut t = common::keys::wan_original(5120, 36, 16, 13824, 40);
    for (n, s) in [
        ("img_emb.proj.0.weight", vec![1280]),
        ("img_emb.proj.0.bias", vec![1280]),
        ("img_emb.proj.1.weight", vec![1280, 1280]),
        ("img_emb.proj.1.bias", vec![1280]),
        ("img_emb.proj.3.weight", vec![5120, 1280]),
        ("img_emb.proj.3.bias", vec![5120]),
        ("img_emb.proj.4.weight", vec![5120]),
        ("img_emb.proj.4.bias", vec![5120]),
    ] {
        t.push((n.to_string(), s));
    }
    for n in 0..40 {
        for (k, s) in [
            ("k_img.weight", vec![5120, 5120]),
            ("k_img.bias", vec![5120]),
            ("v_img.weight", vec![5120, 5120]),
            ("v_img.bias", vec![5120]),
            ("norm_k_img.weight", vec![5120]),
        ] {
            t.push((format!("blocks.{n}.cross_attn.{k}"), s));
        }
    }
    let shapes: Vec<(&str, &[u64])> = t.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect();
    assert_eq!(reg.detect(&shapes, None).unwrap().variant, "Wan2.1 I2V-14B");
    t.push(("img_emb.emb_pos".to_string(), vec![1, 514, 1280]));
    let shapes: Vec<(&str, &[u64])> = t.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect();
    let d = reg.detect(&shapes, None).unwrap();
    assert_eq!(d.variant, "Wan2.1 FLF2V-14B");
    assert_eq!(d.config["model_type"], "flf2v");
    assert_eq!(d.config["num_heads"], 40);
    assert!(d.missing.is_empty() && d.unmatched.is_empty(), "{d:?}");
}
