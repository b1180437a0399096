//! Mistakes that used to render silently wrong, now refused or flagged (issue 17): a lone Wan2.2
//! A14B expert taken for Wan2.1-14B, one expert given twice, LoRA α stored as I64, scaled fp8
//! without scales, LoRAs over fp8 bases.

mod common;

use std::path::{Path, PathBuf};

use common::{read_safetensors, run, run_ok, s};
use serde_json::{json, Value};

fn wan() -> PathBuf {
    common::tests_dir("fixtures/wan22_t2v_tiny/original")
}

/// A safetensors file from (name, dtype, shape, bytes), as the official writer lays it out.
fn write_st(path: &Path, tensors: &[(&str, &str, Vec<u64>, Vec<u8>)]) {
    let mut head = serde_json::Map::new();
    let mut data = Vec::new();
    for (n, d, shape, b) in tensors {
        head.insert(n.to_string(), json!({"dtype": d, "shape": shape, "data_offsets": [data.len(), data.len() + b.len()]}));
        data.extend_from_slice(b);
    }
    let mut h = serde_json::to_vec(&Value::Object(head)).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

fn f32b(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn a14b_experts_by_their_folders_and_names() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("Wan2.2-T2V-A14B");
    let (hi, lo) = (repo.join("high_noise_model"), repo.join("low_noise_model"));
    for dir in [&hi, &lo] {
        std::fs::create_dir_all(dir).unwrap();
    }
    // Sparse full-size replicas: every tensor name and shape of a T2V-A14B expert, no disk.
    // (Each written by `bench replica`: a plain copy could fill the holes.)
    let plain = d.path().join("model.safetensors");
    let wan21 = d.path().join("wan2.1_t2v_14B_bf16.safetensors");
    for w in [hi.join("diffusion_pytorch_model.safetensors"), lo.join("diffusion_pytorch_model.safetensors"), plain.clone(), wan21.clone()]
    {
        run_ok(&["bench", "replica", "wan-t2v-a14b", &s(&w)]);
    }
    let release = |p: &Path| -> Value {
        let v: Value = serde_json::from_str(&run_ok(&["--json", "inspect", &s(p)]).stdout).unwrap();
        v["wan_release"].clone()
    };
    let r = release(&hi);
    assert_eq!((r["release"].as_str(), r["role"].as_str()), (Some("Wan2.2 A14B expert"), Some("high_noise")), "{r}");
    assert_eq!(release(&lo)["role"], "low_noise");
    assert_eq!(release(&wan21)["release"], "Wan2.1-14B");
    let r = release(&plain);
    assert_eq!(r["release"], "undetermined");
    assert!(r["evidence"].to_string().contains("Wan2.1 T2V-14B alike"), "{r}");
    let text = run_ok(&["inspect", &s(&plain)]).stdout;
    assert!(text.contains("release:    undetermined"), "{text}");

    let out = d.path().join("moe.safetensors");
    let assemble = |args: &[&str]| {
        let mut v: Vec<String> = vec!["assemble".into()];
        v.extend(args.iter().map(|a| a.to_string()));
        v.extend(["--steps", "4", "--shift", "5", "-o"].iter().map(|a| a.to_string()));
        v.push(s(&out));
        run(&v)
    };
    // One expert for every σ.
    let o = assemble(&["--expert", &s(&hi), "--sigma-range", "0:1"]);
    assert_eq!(o.code, Some(6), "{}", o.both());
    assert!(o.stderr.contains("high-noise expert") && o.stderr.contains("needs both experts"), "{}", o.stderr);
    // The experts swapped.
    let o = assemble(&["--expert", &s(&lo), "--sigma-range", "0.875:1", "--expert", &s(&hi), "--sigma-range", "0:0.875"]);
    assert_eq!(o.code, Some(6), "{}", o.both());
    assert!(o.stderr.contains("low-noise expert") && o.stderr.contains("[0.875, 1)"), "{}", o.stderr);
    // The same expert twice (by name).
    let o = assemble(&["--expert", &s(&hi), "--sigma-range", "0.875:1", "--expert", &s(&hi), "--sigma-range", "0:0.875"]);
    assert_eq!(o.code, Some(6), "{}", o.both());
    assert!(o.stderr.contains("both the Wan2.2 A14B high-noise expert"), "{}", o.stderr);
    assert!(!out.exists());
}

#[test]
fn one_expert_given_twice_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let copy = d.path().join("copy.safetensors");
    std::fs::copy(wan().join("diffusion_pytorch_model.safetensors"), &copy).unwrap();
    let out = d.path().join("moe.safetensors");
    let o = run(&[
        "assemble",
        "--expert",
        &s(&wan()),
        "--sigma-range",
        "0.875:1",
        "--expert",
        &s(&copy),
        "--sigma-range",
        "0:0.875",
        "--steps",
        "4",
        "--shift",
        "5",
        "-o",
        &s(&out),
    ]);
    assert_eq!(o.code, Some(6), "{}", o.both());
    assert!(o.stderr.contains("identical weights"), "{}", o.stderr);
    assert!(!out.exists());
}

/// A rank-2 LoRA on `blocks.0.self_attn.q` (32×32) whose α is stored as I64 8, as in some
/// Lightning files; returns (down, up) in f32.
fn i64_alpha_lora(path: &Path) -> (Vec<f32>, Vec<f32>) {
    let down: Vec<f32> = (0..64).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.01).collect();
    let up: Vec<f32> = (0..64).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.02).collect();
    write_st(
        path,
        &[
            ("diffusion_model.blocks.0.self_attn.q.lora_down.weight", "F32", vec![2, 32], f32b(&down)),
            ("diffusion_model.blocks.0.self_attn.q.lora_up.weight", "F32", vec![32, 2], f32b(&up)),
            ("diffusion_model.blocks.0.self_attn.q.alpha", "I64", vec![], 8i64.to_le_bytes().to_vec()),
        ],
    );
    (down, up)
}

#[test]
fn i64_alpha_is_read_not_dropped() {
    let d = tempfile::tempdir().unwrap();
    let (hi, lo) = (d.path().join("hi.safetensors"), d.path().join("lo.safetensors"));
    let (down, up) = i64_alpha_lora(&hi);
    // A second, different LoRA for the low-noise range.
    write_st(
        &lo,
        &[
            ("blocks.1.ffn.0.lora_down.weight", "F32", vec![1, 32], f32b(&[0.1; 32])),
            ("blocks.1.ffn.0.lora_up.weight", "F32", vec![48, 1], f32b(&[0.2; 48])),
        ],
    );
    let info: Value = serde_json::from_str(&run_ok(&["--json", "lora", "inspect", &s(&hi)]).stdout).unwrap();
    assert_eq!(info["alphas"]["8"], 1, "{info}");
    let base = common::read_model(&wan());
    let args = |out: &Path, merge: bool| {
        let mut v = vec![
            "assemble".to_string(),
            "--base".into(),
            s(&wan()),
            "--expert".into(),
            s(&hi),
            "--sigma-range".into(),
            "0.875:1".into(),
            "--expert".into(),
            s(&lo),
            "--sigma-range".into(),
            "0:0.875".into(),
            "--steps".into(),
            "4".into(),
            "--shift".into(),
            "5".into(),
            "-o".into(),
            s(out),
        ];
        if merge {
            v.push("--merge-lora".into());
        }
        v
    };
    // Kept as LoRA: α stored as F32 8.
    let kept = d.path().join("kept.safetensors");
    run_ok(&args(&kept, false));
    run_ok(&["verify", &s(&kept)]);
    let f = read_safetensors(&kept);
    let a = &f.tensors["experts.0.blocks.0.self_attn.q.alpha"];
    assert_eq!((a.dtype.as_str(), a.data.as_slice()), ("F32", 8f32.to_le_bytes().as_slice()));
    // Merged: W + (8/2)·up·down, checked against float64 here.
    let merged = d.path().join("merged.safetensors");
    run_ok(&args(&merged, true));
    let f = read_safetensors(&merged);
    let got = &f.tensors["experts.0.blocks.0.self_attn.q.weight"];
    let w = &base["blocks.0.self_attn.q.weight"];
    let mut worst: f64 = 0.0;
    for o in 0..32 {
        for i in 0..32 {
            let delta: f64 = (0..2).map(|r| up[o * 2 + r] as f64 * down[r * 32 + i] as f64).sum::<f64>() * 4.0;
            let want = f32::from_le_bytes(w.data[(o * 32 + i) * 4..][..4].try_into().unwrap()) as f64 + delta;
            let g = f32::from_le_bytes(got.data[(o * 32 + i) * 4..][..4].try_into().unwrap()) as f64;
            worst = worst.max((g - want).abs());
        }
    }
    assert!(worst < 1e-5, "merged weight off by {worst} (α dropped would be off by ~{:.3})", 3.0 * 0.02);
    // Exported back as a Lightning LoRA: α F32.
    let ex = d.path().join("lora");
    run_ok(&["export", &s(&kept), "--to", "lora", "-o", &s(&ex)]);
    let f = read_safetensors(&ex.join("high_noise_model.safetensors"));
    assert_eq!(f.tensors["diffusion_model.blocks.0.self_attn.q.alpha"].data, 8f32.to_le_bytes());
}

#[test]
fn scaled_fp8_without_scales_is_malformed() {
    let d = tempfile::tempdir().unwrap();
    let fp8 = |n: usize| vec![0x38u8; n]; // 1.0 in e4m3
    let good = vec![
        ("scaled_fp8", "F8_E4M3", vec![0], vec![]),
        ("a.weight", "F8_E4M3", vec![2, 2], fp8(4)),
        ("a.scale_weight", "F32", vec![], f32b(&[0.5])),
        ("b.weight", "F8_E4M3", vec![2, 2], fp8(4)),
        ("b.scale_weight", "F32", vec![], f32b(&[2.0])),
        ("b.bias", "F32", vec![2], f32b(&[0.0, 1.0])),
    ];
    let p = d.path().join("good.safetensors");
    write_st(&p, &good);
    run_ok(&["verify", &s(&p)]);
    run_ok(&["convert", &s(&p), &s(&d.path().join("good-bf16.safetensors")), "--dtype", "bf16"]);
    for (what, edit, want) in [
        ("missing", None, "fp8 weight 'b.weight' has no scale"),
        ("empty", Some(("b.scale_weight", "F32", vec![0u64], vec![])), "scale 'b.scale_weight' of 'b.weight' is empty"),
        ("zero", Some(("b.scale_weight", "F32", vec![], f32b(&[0.0]))), "is 0"),
    ] {
        let mut t = good.clone();
        t.retain(|x| x.0 != "b.scale_weight");
        if let Some(e) = edit {
            t.push(e);
        }
        let p = d.path().join(format!("{what}.safetensors"));
        write_st(&p, &t);
        let out = d.path().join(format!("{what}-out.safetensors"));
        for args in [vec!["convert".to_string(), s(&p), s(&out), "--dtype".into(), "bf16".into()], vec!["verify".into(), s(&p)]] {
            let o = run(&args);
            assert_eq!(o.code, Some(5), "{what} {args:?}: {}", o.both());
            assert!(o.stderr.contains(want) && o.stderr.contains(&format!("{what}.safetensors")), "{what}: {}", o.stderr);
        }
        assert!(!out.exists());
        let text = run_ok(&["inspect", &s(&p)]).stdout;
        assert!(text.contains("PROBLEM:") && text.contains(want), "{text}");
    }
}

#[test]
fn lora_over_an_fp8_base_warns() {
    let d = tempfile::tempdir().unwrap();
    let base8 = d.path().join("base-fp8.safetensors");
    run_ok(&["convert", &s(&wan()), &s(&base8), "--dtype", "fp8-e4m3"]);
    let hi = d.path().join("hi.safetensors");
    i64_alpha_lora(&hi);
    let lo = d.path().join("lo-lightning.safetensors");
    write_st(
        &lo,
        &[
            ("blocks.1.ffn.0.lora_down.weight", "F32", vec![1, 32], f32b(&[0.1; 32])),
            ("blocks.1.ffn.0.lora_up.weight", "F32", vec![48, 1], f32b(&[0.2; 48])),
        ],
    );
    let lo8 = d.path().join("lo-fp8-e4m3fn-lightning.safetensors");
    std::fs::copy(&lo, &lo8).unwrap();
    for (low, warned) in [(&lo, 2), (&lo8, 1)] {
        let out = d.path().join("moe.safetensors");
        let o = run_ok(&[
            "assemble",
            "--base",
            &s(&base8),
            "--expert",
            &s(&hi),
            "--sigma-range",
            "0.875:1",
            "--expert",
            &s(low),
            "--sigma-range",
            "0:0.875",
            "--steps",
            "4",
            "--shift",
            "5",
            "-o",
            &s(&out),
            "--force",
        ]);
        assert_eq!(o.stdout.matches("grid artifacts").count(), warned, "{}", o.stdout);
    }
}

#[test]
fn fp8_experts_assemble_and_verify() {
    let d = tempfile::tempdir().unwrap();
    let teacher = common::tests_dir("fixtures/lightx2v/teacher");
    let (hi, lo) = (d.path().join("hi-fp8.safetensors"), d.path().join("lo-fp8.safetensors"));
    run_ok(&["convert", &s(&teacher.join("high_noise_model")), &s(&hi), "--dtype", "fp8-e4m3"]);
    run_ok(&["convert", &s(&teacher.join("low_noise_model")), &s(&lo), "--dtype", "fp8-e4m3"]);
    let out = d.path().join("moe.safetensors");
    run_ok(&[
        "assemble",
        "--expert",
        &s(&hi),
        "--sigma-range",
        "0.875:1",
        "--expert",
        &s(&lo),
        "--sigma-range",
        "0:0.875",
        "--steps",
        "4",
        "--shift",
        "5",
        "-o",
        &s(&out),
    ]);
    let o = run_ok(&["verify", &s(&out)]);
    assert!(!o.stdout.contains("FAIL"), "{}", o.stdout);
    let f = read_safetensors(&out);
    assert!(f.tensors.contains_key("shared.scaled_fp8"), "the marker is shared");
}
