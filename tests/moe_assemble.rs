//! `phasekit assemble` / `verify` / `export` / `pack` on the tiny Wan2.2 fixture: full and LoRA
//! experts, dedup, sharding, the run manifest, hostile inputs, single-bit flips, Python readers.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{read_safetensors, run, run_ok, s, tests_dir};
use phasekit::moe::MoeCheckpoint;

fn wan() -> PathBuf {
    tests_dir("fixtures/wan22_t2v_tiny/original/diffusion_pytorch_model.safetensors")
}

type T = (String, &'static str, Vec<u64>, Vec<u8>);

/// Write a safetensors file with phasekit's planner (independent of the code under test).
fn write_st(path: &Path, tensors: &[T]) {
    let planned = tensors
        .iter()
        .map(|(n, d, s, _)| phasekit::safetensors::Planned { name: n.clone(), dtype: phasekit::DType::parse(d).unwrap(), shape: s.clone() })
        .collect();
    let plan = phasekit::safetensors::plan(planned, None).unwrap();
    let mut out = plan.bytes.clone();
    for p in &plan.order {
        out.extend_from_slice(&tensors.iter().find(|t| t.0 == p.name).unwrap().3);
    }
    std::fs::write(path, out).unwrap();
}

fn load(path: &Path) -> Vec<T> {
    read_safetensors(path).tensors.into_iter().map(|(n, t)| (n, if t.dtype == "F32" { "F32" } else { "BF16" }, t.shape, t.data)).collect()
}

fn f32s(v: &[u8]) -> Vec<f32> {
    v.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}
fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A second expert: the fixture with every block weight perturbed (other tensors equal).
fn perturbed(dir: &Path, name: &str, delta: f32) -> PathBuf {
    let mut ts = load(&wan());
    for t in &mut ts {
        if t.0.starts_with("blocks.") && t.0.ends_with(".weight") {
            t.3 = bytes(&f32s(&t.3).iter().map(|x| x + delta).collect::<Vec<_>>());
        }
    }
    let p = dir.join(name);
    write_st(&p, &ts);
    p
}

/// A rank-4 LoRA on the self-attention q/k of both blocks, deterministic values.
fn lora(dir: &Path, name: &str, seed: f32, prefix: bool) -> PathBuf {
    let mut ts = Vec::new();
    for b in 0..2 {
        for m in ["q", "k"] {
            let p = format!("{}blocks.{b}.self_attn.{m}", if prefix { "diffusion_model." } else { "" });
            let down: Vec<f32> = (0..4 * 32).map(|i| ((i as f32 * 0.37 + seed).sin()) * 0.1).collect();
            let up: Vec<f32> = (0..32 * 4).map(|i| ((i as f32 * 0.11 + seed).cos()) * 0.1).collect();
            ts.push((format!("{p}.lora_down.weight"), "F32", vec![4, 32], bytes(&down)));
            ts.push((format!("{p}.lora_up.weight"), "F32", vec![32, 4], bytes(&up)));
            ts.push((format!("{p}.alpha"), "F32", vec![], bytes(&[2.0])));
        }
    }
    let p = dir.join(name);
    write_st(&p, &ts);
    p
}

fn two_full(dir: &Path) -> PathBuf {
    let e1 = perturbed(dir, "low.safetensors", 0.5);
    let out = dir.join("moe.safetensors");
    run_ok(&[
        "assemble",
        "--expert",
        &s(&wan()),
        "--sigma-range",
        "0.875:1",
        "--expert",
        &s(&e1),
        "--sigma-range",
        "0:0.875",
        "--shift",
        "5",
        "--steps",
        "4",
        "-o",
        &s(&out),
    ]);
    out
}

fn python_has(module: &str) -> bool {
    Command::new("python3").args(["-c", &format!("import {module}")]).output().is_ok_and(|o| o.status.success())
}

#[test]
fn full_experts_assemble_dedup_verify_and_load() {
    let d = tempfile::tempdir().unwrap();
    let out = two_full(d.path());
    let f = read_safetensors(&out);
    let md = f.metadata.clone().unwrap();
    assert_eq!(md["phasekit.moe.format"], "phasekit.moe/1");
    assert_eq!(md["modelspec.timestep_range"], "0,1000");
    // Non-block tensors are equal in both experts: stored once.
    assert!(f.tensors.contains_key("shared.patch_embedding.weight"));
    assert!(f.tensors.contains_key("experts.0.blocks.0.self_attn.q.weight"));
    assert!(f.tensors.contains_key("experts.1.blocks.0.self_attn.q.weight"));
    assert!(!f.tensors.contains_key("experts.1.patch_embedding.weight"));
    // verify passes; sha256sum -c accepts the sidecar.
    let o = run_ok(&["verify", &s(&out)]);
    assert!(o.stdout.contains("moe"), "{}", o.stdout);
    let st = Command::new("sha256sum").arg("-c").arg("moe.safetensors.sha256").current_dir(d.path()).output().unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stdout));
    // Loader: routes by σ and gives back the input bytes.
    let m = MoeCheckpoint::open(&out).unwrap();
    assert_eq!(m.expert_for_sigma(1.0), Some(0));
    assert_eq!(m.expert_for_sigma(0.9), Some(0));
    assert_eq!(m.expert_for_sigma(0.5), Some(1));
    assert_eq!(m.routing().experts[0].timesteps, vec![1000.0, 937.5]);
    let src = load(&d.path().join("low.safetensors"));
    for (n, _, shape, data) in &src {
        let t = m.expert_tensor(1, n).unwrap();
        assert_eq!(t.bytes, &data[..], "{n}");
        assert_eq!(t.shape, &shape[..]);
    }
    assert_eq!(m.weight_names(0).len(), 69);
}

#[test]
fn python_safe_open_and_docs_loader() {
    if !python_has("safetensors") || !python_has("numpy") {
        println!("skipped: python3 with safetensors and numpy not available");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let out = two_full(d.path());
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/moe-format.md")).unwrap();
    let block = doc.split("<!-- loader:begin -->").nth(1).unwrap().split("<!-- loader:end -->").next().unwrap();
    let code = block.split("```python").nth(1).unwrap().split("```").next().unwrap();
    assert!(code.trim().lines().count() <= 21, "the docs loader should stay about 20 lines");
    let script = d.path().join("loader.py");
    std::fs::write(&script, code).unwrap();
    let m = MoeCheckpoint::open(&out).unwrap();
    for sigma in ["1.0", "0.9", "0.875", "0.3"] {
        let o = Command::new("python3").arg(&script).arg(&out).arg(sigma).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = String::from_utf8_lossy(&o.stdout);
        let parts: Vec<&str> = text.split_whitespace().collect();
        let e = m.expert_for_sigma(sigma.parse().unwrap()).unwrap();
        assert_eq!(parts[0], e.to_string(), "σ {sigma}");
        assert_eq!(parts[2], "69");
        let sum: f64 = m.weight_names(e).iter().map(|n| m.weight_f32(e, n, false).unwrap().1.iter().map(|&x| x as f64).sum::<f64>()).sum();
        let py: f64 = parts[3].parse().unwrap();
        assert!((py - sum).abs() < 1e-6 * sum.abs().max(1.0), "{py} vs {sum}");
        assert_eq!(parts[4], "base.", "a phasekit.moe/1 file has one base prefix");
    }
}

#[test]
fn lora_experts_with_base_merge_and_export() {
    let d = tempfile::tempdir().unwrap();
    let hi = lora(d.path(), "high_noise_model.safetensors", 0.3, true);
    let lo = lora(d.path(), "low_noise_model.safetensors", 1.7, false);
    let out = d.path().join("lightning.safetensors");
    let args = |o: &Path, extra: &[&str]| {
        let mut v: Vec<String> = [
            "assemble",
            "--base",
            &s(&wan()),
            "--expert",
            &s(&hi),
            "--sigma-range",
            "0.875:1",
            "--expert",
            &s(&lo),
            "--sigma-range",
            "0:0.875",
            "--shift",
            "5",
            "--steps",
            "4",
            "-o",
            &s(o),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    run_ok(&args(&out, &[]));
    run_ok(&["verify", &s(&out)]);
    let m = MoeCheckpoint::open(&out).unwrap();
    assert_eq!(m.kind(0), phasekit::moe::routing::ExpertKind::Lora);
    // LoRA applied = base + (alpha/r)·up·down.
    let (_, base) = m.weight_f32(0, "blocks.1.self_attn.k.weight", false).unwrap();
    let (_, merged) = m.weight_f32(0, "blocks.1.self_attn.k.weight", true).unwrap();
    let l = load(&hi);
    let get = |n: &str| f32s(&l.iter().find(|t| t.0 == n).unwrap().3);
    let (down, up) =
        (get("diffusion_model.blocks.1.self_attn.k.lora_down.weight"), get("diffusion_model.blocks.1.self_attn.k.lora_up.weight"));
    for o in 0..32 {
        for i in 0..32 {
            let dlt: f32 = (0..4).map(|k| up[o * 4 + k] * down[k * 32 + i]).sum::<f32>() * 0.5;
            assert!((merged[o * 32 + i] - base[o * 32 + i] - dlt).abs() < 1e-5);
        }
    }
    // --merge-lora stores full experts equal to the applied LoRA.
    let out2 = d.path().join("merged.safetensors");
    run_ok(&args(&out2, &["--merge-lora"]));
    let m2 = MoeCheckpoint::open(&out2).unwrap();
    assert_eq!(m2.kind(0), phasekit::moe::routing::ExpertKind::Full);
    assert_eq!(m2.weight_f32(0, "blocks.1.self_attn.k.weight", false).unwrap().1, merged);
    assert!(read_safetensors(&out2).tensors.contains_key("shared.patch_embedding.weight"));
    // Lightning LoRA export: upstream names, prefix, nothing else.
    let ex = d.path().join("lora_out");
    run_ok(&["export", &s(&out), "--to", "lora", "-o", &s(&ex)]);
    let h = read_safetensors(&ex.join("high_noise_model.safetensors"));
    assert_eq!(h.tensors.len(), 12);
    assert!(h.tensors.keys().all(|k| k.starts_with("diffusion_model.blocks.")
        && (k.ends_with(".lora_down.weight") || k.ends_with(".lora_up.weight") || k.ends_with(".alpha"))));
    assert_eq!(
        h.tensors["diffusion_model.blocks.1.self_attn.k.lora_up.weight"].data,
        l.iter().find(|t| t.0 == "diffusion_model.blocks.1.self_attn.k.lora_up.weight").unwrap().3
    );
    assert_eq!(h.metadata.unwrap()["modelspec.timestep_range"], "875,1000");
    let readme = std::fs::read_to_string(ex.join("README.md")).unwrap();
    assert!(readme.contains("steps: **4**") && readme.contains("shift: **5**") && readme.contains("boundary_ratio **0.875**"), "{readme}");
}

#[test]
fn exports_comfy_diffusers_and_gguf() {
    let d = tempfile::tempdir().unwrap();
    let out = two_full(d.path());
    let c = d.path().join("comfy");
    run_ok(&["export", &s(&out), "--to", "comfy", "--comfy-prefix", "-o", &s(&c)]);
    let hi = read_safetensors(&c.join("moe_high_noise.safetensors"));
    assert_eq!(hi.tensors.len(), 69);
    assert_eq!(
        hi.tensors["model.diffusion_model.blocks.0.self_attn.q.weight"].data,
        load(&wan()).iter().find(|t| t.0 == "blocks.0.self_attn.q.weight").unwrap().3
    );
    let df = d.path().join("diffusers");
    run_ok(&["export", &s(&out), "--to", "diffusers", "-o", &s(&df)]);
    let idx: serde_json::Value = serde_json::from_slice(&std::fs::read(df.join("model_index.json")).unwrap()).unwrap();
    assert_eq!(idx["boundary_ratio"], 0.875);
    assert_eq!(idx["transformer_2"][1], "WanTransformer3DModel");
    let sc: serde_json::Value = serde_json::from_slice(&std::fs::read(df.join("scheduler/scheduler_config.json")).unwrap()).unwrap();
    assert_eq!(sc["shift"], 5.0);
    // transformer/ is the high-noise expert in diffusers names: equal to the fixture's diffusers file.
    let want = read_safetensors(&tests_dir("fixtures/wan22_t2v_tiny/diffusers/diffusion_pytorch_model.safetensors"));
    let got = read_safetensors(&df.join("transformer/diffusion_pytorch_model.safetensors"));
    assert_eq!(got.tensors.keys().collect::<Vec<_>>(), want.tensors.keys().collect::<Vec<_>>());
    for (k, t) in &want.tensors {
        assert_eq!(got.tensors[k].data, t.data, "{k}");
    }
    assert!(df.join("transformer_2/config.json").is_file());
    let g = d.path().join("gguf");
    run_ok(&["export", &s(&out), "--to", "gguf", "-o", &s(&g)]);
    assert!(g.join("moe_high_noise.gguf").is_file() && g.join("moe_low_noise.gguf").is_file());
    run_ok(&["inspect", &s(&g.join("moe_low_noise.gguf"))]);
}

#[test]
fn shards_with_index_and_run_manifest() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("run")).unwrap();
    let run_dir = d.path().join("run");
    perturbed(&run_dir, "p1.safetensors", 0.25);
    std::fs::copy(wan(), run_dir.join("p0.safetensors")).unwrap();
    let manifest = serde_json::json!({
        "format": "phasekit.run/1",
        "experts": [
            {"path": "p0.safetensors", "sigma_lo": 0.875, "sigma_hi": 1.0, "timesteps": [1000.0, 937.5], "kind": "full"},
            {"path": "p1.safetensors", "sigma_lo": 0.0, "sigma_hi": 0.875, "kind": "full"}
        ],
        "shift": 5.0, "steps": 4, "teacher_digests": ["sha256:00"], "recipe_digest": "sha256:11"
    });
    std::fs::write(run_dir.join("manifest.json"), manifest.to_string()).unwrap();
    let out = d.path().join("model.safetensors");
    run_ok(&["assemble", "--run", &s(&run_dir), "--shard-size", "20KB", "-o", &s(&out)]);
    assert!(!out.exists());
    let index = d.path().join("model.safetensors.index.json");
    assert!(index.is_file());
    let shards: Vec<String> = files_in(d.path()).into_iter().filter(|n| n.starts_with("model-0") && n.ends_with(".safetensors")).collect();
    assert!(shards.len() >= 2, "{shards:?}");
    for sh in &shards {
        assert!(d.path().join(format!("{sh}.sha256")).is_file());
    }
    run_ok(&["verify", &s(&index)]);
    let m = MoeCheckpoint::open(&index).unwrap();
    assert_eq!(m.meta().provenance.recipe_digest.as_deref(), Some("sha256:11"));
    assert_eq!(
        m.expert_tensor(1, "blocks.1.ffn.2.weight").unwrap().bytes,
        &load(&run_dir.join("p1.safetensors")).iter().find(|t| t.0 == "blocks.1.ffn.2.weight").unwrap().3[..]
    );
    // A manifest whose timesteps disagree with steps and shift is refused.
    let mut bad = manifest.clone();
    bad["experts"][0]["timesteps"] = serde_json::json!([1000.0, 750.0]);
    std::fs::write(run_dir.join("manifest.json"), bad.to_string()).unwrap();
    let o = run(&["assemble", "--run", &s(&run_dir), "-o", &s(&d.path().join("x.safetensors"))]);
    assert_eq!(o.code, Some(6), "{}", o.both());
}

fn files_in(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn hostile_inputs_fail_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let good = perturbed(d.path(), "good.safetensors", 0.1);
    // Different shapes: ffn.0 cut to 40 rows.
    let mut ts = load(&wan());
    for t in &mut ts {
        if t.0 == "blocks.0.ffn.0.weight" {
            t.2 = vec![40, 32];
            t.3.truncate(40 * 32 * 4);
        }
    }
    let shaped = d.path().join("shaped.safetensors");
    write_st(&shaped, &ts);
    let missing = d.path().join("missing.safetensors");
    write_st(&missing, &load(&wan()).into_iter().filter(|t| t.0 != "head.head.weight").collect::<Vec<_>>());
    let truncated = d.path().join("truncated.safetensors");
    let b = std::fs::read(wan()).unwrap();
    std::fs::write(&truncated, &b[..b.len() - 100]).unwrap();
    let qwen = tests_dir("fixtures/qwen_image_tiny/diffusers/diffusion_pytorch_model.safetensors");
    let lo = lora(d.path(), "l.safetensors", 0.5, false);
    let before = files_in(d.path());
    let w = s(&wan());
    let cases: Vec<(Vec<String>, i32, &str)> = vec![
        (vec![w.clone(), "0.9:1".into(), s(&good), "0:0.875".into()], 6, "gap"),
        (vec![w.clone(), "0.8:1".into(), s(&good), "0:0.875".into()], 6, "overlap"),
        (vec![w.clone(), "0.875:0.99".into(), s(&good), "0:0.875".into()], 6, "does not cover"),
        (vec![w.clone(), "0.875:1".into(), s(&shaped), "0:0.875".into()], 6, "shape"),
        (vec![w.clone(), "0.875:1".into(), s(&missing), "0:0.875".into()], 6, "head.head.weight"),
        (vec![w.clone(), "0.875:1".into(), s(&qwen), "0:0.875".into()], 6, "qwen_image"),
        (vec![w.clone(), "0.875:1".into(), s(&truncated), "0:0.875".into()], 4, "truncated"),
        (vec![s(&lo), "0.875:1".into(), s(&good), "0:0.875".into()], 2, "--base"),
        (vec![w.clone(), "0.875:x".into(), s(&good), "0:0.875".into()], 2, "--sigma-range"),
    ];
    let out = d.path().join("out.safetensors");
    for (pairs, code, needle) in cases {
        let mut args = vec!["assemble".to_string()];
        for p in pairs.chunks(2) {
            args.extend(["--expert".into(), p[0].clone(), "--sigma-range".into(), p[1].clone()]);
        }
        args.extend(["--shift", "5", "--steps", "4", "-o"].iter().map(|x| x.to_string()));
        args.push(s(&out));
        let o = run(&args);
        assert_eq!(o.code, Some(code), "{needle}: {}", o.both());
        assert!(o.stderr.contains(needle), "{needle}: {}", o.stderr);
        assert_eq!(o.stderr.trim().lines().count(), 1, "one-line error: {}", o.stderr);
        assert!(!o.panicked());
        assert_eq!(files_in(d.path()), before, "{needle}: leftovers");
    }
}

/// xorshift, deterministic.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn every_single_bit_flip_is_caught() {
    let d = tempfile::tempdir().unwrap();
    let hi = lora(d.path(), "h.safetensors", 0.3, true);
    let lo = lora(d.path(), "l.safetensors", 0.9, false);
    let out = d.path().join("m.safetensors");
    run_ok(&[
        "assemble",
        "--base",
        &s(&wan()),
        "--expert",
        &s(&hi),
        "--sigma-range",
        "0.875:1",
        "--expert",
        &s(&lo),
        "--sigma-range",
        "0:0.875",
        "--shift",
        "5",
        "--steps",
        "4",
        "--no-sidecar",
        "-o",
        &s(&out),
    ]);
    let orig = std::fs::read(&out).unwrap();
    let hlen = 8 + u64::from_le_bytes(orig[..8].try_into().unwrap()) as usize;
    let text = std::str::from_utf8(&orig[8..hlen]).unwrap();
    let md_start = 8 + text.find("__metadata__").unwrap();
    let md_end = 8 + text.find("\"base.").unwrap_or(hlen - 8).min(text.rfind('}').unwrap());
    assert!(phasekit::verify::verify(&out, true).unwrap().ok);
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let f = d.path().join("flipped.safetensors");
    let (mut header_flips, mut meta_flips, mut data_flips) = (0, 0, 0);
    for k in 0..1500 {
        let pos = match k % 3 {
            0 => md_start + (rng.next() as usize) % (md_end - md_start),
            1 => (rng.next() as usize) % hlen,
            _ => hlen + (rng.next() as usize) % (orig.len() - hlen),
        };
        let bit = rng.next() % 8;
        let mut b = orig.clone();
        b[pos] ^= 1 << bit;
        std::fs::write(&f, &b).unwrap();
        let caught = match phasekit::verify::verify(&f, true) {
            Ok(r) => !r.ok,
            Err(_) => true,
        };
        assert!(caught, "flip of bit {bit} at byte {pos} (header ends at {hlen}) not caught");
        match k % 3 {
            0 => meta_flips += 1,
            1 => header_flips += 1,
            _ => data_flips += 1,
        }
    }
    assert_eq!((meta_flips, header_flips, data_flips), (500, 500, 500));
}

#[test]
fn pack_round_trip_is_bit_exact_and_checked() {
    let d = tempfile::tempdir().unwrap();
    // A BF16 copy so the byte planes are used.
    let bf: Vec<T> = load(&wan())
        .into_iter()
        .map(|(n, _, s, b)| (n, "BF16", s, f32s(&b).iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect()))
        .collect();
    let e0 = d.path().join("e0.safetensors");
    write_st(&e0, &bf);
    let out = d.path().join("m.safetensors");
    run_ok(&["assemble", "--expert", &s(&e0), "--sigma-range", "0:1", "--shift", "3", "--steps", "8", "-o", &s(&out)]);
    let pk = d.path().join("m.pk");
    run_ok(&["pack", &s(&out), "-o", &s(&pk)]);
    let back = d.path().join("back.safetensors");
    let o = run_ok(&["unpack", &s(&pk), "-o", &s(&back)]);
    assert!(o.stdout.contains("tensor hashes verified"), "{}", o.stdout);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&back).unwrap());
    // A corrupted pack: no output.
    let mut b = std::fs::read(&pk).unwrap();
    let n = b.len();
    b[n / 2] ^= 0x10;
    std::fs::write(&pk, &b).unwrap();
    let back2 = d.path().join("back2.safetensors");
    let o = run(&["unpack", &s(&pk), "-o", &s(&back2)]);
    assert_ne!(o.code, Some(0));
    assert!(!back2.exists());
    assert!(!o.panicked());
}

/// The data offsets of every tensor in a safetensors file, from its own header (independent of
/// phasekit's parser): name → (dtype, absolute begin, absolute end).
fn absolute_offsets(path: &Path) -> std::collections::BTreeMap<String, (String, u64, u64)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let start = 8 + n as u64;
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let o = v["data_offsets"].as_array().unwrap();
            (k.clone(), (v["dtype"].as_str().unwrap().to_string(), start + o[0].as_u64().unwrap(), start + o[1].as_u64().unwrap()))
        })
        .collect()
}

#[test]
fn large_copies_keep_their_source_offset_modulo_64k() {
    let d = tempfile::tempdir().unwrap();
    // Four experts of 17 MiB (68 MiB of copies: above the 64 MiB from which files are laid
    // out for the kernel), each with a 12-byte F32 tensor first: packed one after another,
    // every expert's run would sit at another offset modulo 64 KiB (and 8) than in its file.
    let mut args = vec!["assemble".to_string()];
    let mut sources = Vec::new();
    for e in 0..4u64 {
        let mut ts: Vec<T> = vec![("norm.bias".into(), "F32", vec![3], vec![e as u8 + 1; 12])];
        for k in 0..17u64 {
            let mut data = vec![0u8; 1 << 20];
            data[..16].copy_from_slice(&[(e * 17 + k) as u8 + 1; 16]);
            data[(1 << 20) - 1] = e as u8 + 7;
            ts.push((format!("blocks.{k}.weight"), "BF16", vec![512, 1024], data));
        }
        let p = d.path().join(format!("e{e}.safetensors"));
        write_st(&p, &ts);
        args.extend(["--expert".into(), s(&p), "--sigma-range".into(), format!("{}:{}", e as f64 / 4.0, (e + 1) as f64 / 4.0)]);
        sources.push(p);
    }
    let out = d.path().join("moe.safetensors");
    args.extend(["--steps", "4", "--shift", "5", "-q", "-o"].map(String::from));
    args.push(s(&out));
    run_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let got = absolute_offsets(&out);
    let mut pads = 0;
    for (e, src) in sources.iter().enumerate() {
        for (name, (_, begin, end)) in absolute_offsets(src) {
            let (_, b, en) = &got[&format!("experts.{e}.{name}")];
            assert_eq!(en - b, end - begin, "{name}");
            if end - begin >= 1 << 20 {
                assert_eq!(b % 65536, begin % 65536, "expert {e} {name}: output offset {b}, source offset {begin}");
            }
        }
    }
    for (name, (dtype, b, e)) in &got {
        if name.starts_with("padding.") {
            pads += 1;
            assert_eq!(dtype, "U8");
            assert!(e - b < 65536);
        }
    }
    assert!(pads >= 3, "the runs of the four experts need padding between them ({pads})");
    // The bytes are the experts', verify and sha256sum accept the file, and readers skip the padding.
    let o = run_ok(&["verify", &s(&out)]);
    assert!(o.stdout.contains("72 tensors"), "{}", o.stdout);
    let st = Command::new("sha256sum").arg("-c").arg("moe.safetensors.sha256").current_dir(d.path()).output().unwrap();
    assert!(st.status.success());
    let m = MoeCheckpoint::open(&out).unwrap();
    for (e, src) in sources.iter().enumerate() {
        let src = load(src);
        assert_eq!(m.expert_params(e).len(), src.len());
        for (n, _, _, data) in &src {
            assert_eq!(m.expert_tensor(e, n).unwrap().bytes, &data[..], "{n}");
        }
    }
    // The official crate (Python's safe_open) accepts the layout (it validates every offset on
    // open) and reads the padding as zeros (numpy has no bfloat16 for the rest).
    if python_has("safetensors") && python_has("numpy") {
        let code = "import sys\nfrom safetensors import safe_open\nf = safe_open(sys.argv[1], 'np')\n\
                    p = [f.get_tensor(k) for k in f.keys() if k.startswith('padding.')]\n\
                    print(len(list(f.keys())), sum(t.nbytes for t in p), int(sum(t.astype('int64').sum() for t in p)))";
        let o = Command::new("python3").args(["-c", code]).arg(&out).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let padded: u64 = got.iter().filter(|(n, _)| n.starts_with("padding.")).map(|(_, (_, b, e))| e - b).sum();
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), format!("{} {padded} 0", got.len()));
    }
    // inspect summarises the routing and where the bytes are, padding included.
    let o = run_ok(&["inspect", &s(&out)]);
    assert!(o.stdout.contains("phasekit.moe/1, 4 experts, 4 steps, shift 5"), "{}", o.stdout);
    let j: serde_json::Value = serde_json::from_str(&run_ok(&["inspect", "--json", &s(&out)]).stdout).unwrap();
    let padded: u64 = got.iter().filter(|(n, _)| n.starts_with("padding.")).map(|(_, (_, b, e))| e - b).sum();
    assert_eq!(j["moe"]["padding_tensors"], pads);
    assert_eq!(j["moe"]["padding_bytes"], padded);
    let experts = j["moe"]["experts"].as_array().unwrap();
    assert_eq!(experts.len(), 4);
    for e in experts {
        assert_eq!(e["params"], 18);
        assert_eq!(e["own_bytes"], 17 * (1 << 20) + 12);
    }
    // pack / unpack keep the layout bit for bit (unpack checks the hashes and the padding).
    let (pk, back) = (d.path().join("moe.pk"), d.path().join("back.safetensors"));
    run_ok(&["pack", &s(&out), "-o", &s(&pk), "-q"]);
    run_ok(&["unpack", &s(&pk), "-o", &s(&back), "-q"]);
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&out).unwrap(), "unpack changed the file");
    // A flipped bit in a padding tensor is caught.
    let (_, b, _) = got.iter().find(|(n, _)| n.starts_with("padding.")).unwrap().1;
    let mut bytes = std::fs::read(&out).unwrap();
    bytes[*b as usize] ^= 0x10;
    let bad = d.path().join("bad.safetensors");
    std::fs::write(&bad, bytes).unwrap();
    let o = run(&["verify", &s(&bad)]);
    assert_ne!(o.code, Some(0));
    assert!(o.both().contains("padding tensor"), "{}", o.both());
}
