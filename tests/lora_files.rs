//! Checkpoint-level LoRA files: both key styles, merge, extract and convert, on the tiny Wan2.2
//! and Qwen-Image fixtures. Expected values are computed here in f64 from bytes read with the
//! `safetensors` crate (and, when available, by numpy).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use common::{python_ok, read_safetensors, run, run_ok, s, tests_dir};
use phasekit::lora::{self, LoraModule, LoraSet, Raw, Style, WriteOptions};
use phasekit::DType;
use safetensors::tensor::{serialize_to_file, TensorView};
use safetensors::{Dtype, SafeTensors};

fn wan(layout: &str) -> PathBuf {
    tests_dir(&format!("fixtures/wan22_t2v_tiny/{layout}/diffusion_pytorch_model.safetensors"))
}

fn qwen() -> PathBuf {
    tests_dir("fixtures/qwen_image_tiny/diffusers/diffusion_pytorch_model.safetensors")
}

/// Deterministic values in [-1, 1).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn module(rng: &mut Lcg, out: usize, inn: usize, r: usize, alpha: f64, dtype: DType) -> LoraModule {
    LoraModule {
        down: Raw::from_f32(&rng.vec(r * inn), vec![r as u64, inn as u64], dtype).unwrap(),
        up: Raw::from_f32(&rng.vec(out * r).iter().map(|v| v * 0.1).collect::<Vec<_>>(), vec![out as u64, r as u64], dtype).unwrap(),
        alpha,
        alpha_given: true,
    }
}

/// A Wan LoRA in canonical (diffusers) names with known random tensors.
fn wan_set() -> LoraSet {
    let mut rng = Lcg(11);
    let mut modules = BTreeMap::new();
    modules.insert("blocks.0.attn1.to_q.weight".to_string(), module(&mut rng, 32, 32, 4, 8.0, DType::F32));
    modules.insert("blocks.0.attn2.to_out.0.weight".to_string(), module(&mut rng, 32, 32, 4, 4.0, DType::F32));
    modules.insert("blocks.1.ffn.net.0.proj.weight".to_string(), module(&mut rng, 48, 32, 2, 1.5, DType::BF16));
    modules.insert("blocks.1.ffn.net.2.weight".to_string(), module(&mut rng, 32, 48, 3, 3.0, DType::F16));
    LoraSet { family: Some("wan22".into()), modules }
}

fn qwen_set() -> LoraSet {
    let mut rng = Lcg(12);
    let mut modules = BTreeMap::new();
    modules.insert("transformer_blocks.0.attn.to_q.weight".to_string(), module(&mut rng, 32, 32, 4, 4.0, DType::F32));
    modules.insert("transformer_blocks.0.img_mlp.net.0.proj.weight".to_string(), module(&mut rng, 128, 32, 4, 2.0, DType::F32));
    modules.insert("transformer_blocks.1.attn.add_k_proj.weight".to_string(), module(&mut rng, 32, 32, 2, 2.0, DType::F32));
    LoraSet { family: Some("qwen_image".into()), modules }
}

fn write_set(set: &LoraSet, path: &Path, style: Style, prefix: bool) {
    lora::write(set, path, &WriteOptions { style, prefix, ..WriteOptions::default() }).unwrap();
}

fn keys(path: &Path) -> Vec<String> {
    read_safetensors(path).tensors.keys().cloned().collect()
}

#[test]
fn wan_kohya_and_peft_read_back_equal() {
    let d = tempfile::tempdir().unwrap();
    let set = wan_set();
    for (style, prefix) in [(Style::Kohya, false), (Style::Kohya, true), (Style::Peft, false)] {
        let p = d.path().join(format!("{}-{prefix}.safetensors", style.as_str()));
        write_set(&set, &p, style, prefix);
        let (back, info) = lora::read(&p, None).unwrap();
        assert_eq!(back, set, "{style:?} prefix {prefix}");
        assert_eq!(info.style, style);
        assert_eq!(info.alpha_assumed, 0);
        let k = keys(&p);
        // Nothing but LoRA tensors.
        assert!(k.iter().all(|n| lora::lora_part(n).is_some()), "{k:?}");
        match (style, prefix) {
            (Style::Kohya, false) => {
                for want in [
                    "blocks.0.self_attn.q.lora_down.weight",
                    "blocks.0.self_attn.q.lora_up.weight",
                    "blocks.0.self_attn.q.alpha",
                    "blocks.1.ffn.0.lora_down.weight",
                    "blocks.0.cross_attn.o.alpha",
                ] {
                    assert!(k.contains(&want.to_string()), "{want} missing from {k:?}");
                }
                assert_eq!(k.len(), 12);
            }
            (Style::Kohya, true) => {
                assert!(k.contains(&"diffusion_model.blocks.0.self_attn.q.lora_down.weight".to_string()), "{k:?}");
                assert!(k.iter().all(|n| n.starts_with("diffusion_model.")));
                assert_eq!(info.prefix, "diffusion_model.");
            }
            _ => {
                assert!(k.contains(&"transformer.blocks.0.attn1.to_q.lora_A.weight".to_string()), "{k:?}");
                assert!(k.contains(&"transformer.blocks.1.ffn.net.2.lora_B.weight".to_string()), "{k:?}");
                assert_eq!(k.len(), 8, "PEFT has no alpha tensors");
                let md = read_safetensors(&p).metadata.unwrap();
                let a: serde_json::Value = serde_json::from_str(&md["phasekit.lora.alpha"]).unwrap();
                assert_eq!(a["blocks.1.ffn.net.0.proj"], serde_json::json!(1.5));
                let cfg: serde_json::Value = serde_json::from_str(&md["lora_adapter_metadata"]).unwrap();
                assert!(cfg["transformer.lora_alpha"].is_number());
            }
        }
    }
}

#[test]
fn comfy_prefixed_and_upstream_written_by_another_writer() {
    // A kohya file written by the safetensors crate, ComfyUI-prefixed, upstream Wan names.
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("comfy.safetensors");
    let down = f32_bytes(&Lcg(3).vec(2 * 32));
    let up = f32_bytes(&Lcg(4).vec(32 * 2));
    let alpha = f32_bytes(&[2.0]);
    let t = vec![
        ("model.diffusion_model.blocks.1.self_attn.k.lora_down.weight", TensorView::new(Dtype::F32, vec![2, 32], &down).unwrap()),
        ("model.diffusion_model.blocks.1.self_attn.k.lora_up.weight", TensorView::new(Dtype::F32, vec![32, 2], &up).unwrap()),
        ("model.diffusion_model.blocks.1.self_attn.k.alpha", TensorView::new(Dtype::F32, vec![], &alpha).unwrap()),
    ];
    serialize_to_file(t, &None, &p).unwrap();
    let (set, info) = lora::read(&p, None).unwrap();
    assert_eq!(info.prefix, "model.diffusion_model.");
    assert_eq!(set.family.as_deref(), Some("wan22"));
    let m = &set.modules["blocks.1.attn1.to_k.weight"];
    assert_eq!((m.rank(), m.alpha, m.down.data.clone(), m.up.data.clone()), (2, 2.0, down.clone(), up.clone()));

    // PEFT without alpha anywhere: α = rank, and the read says so.
    let p2 = d.path().join("peft-noalpha.safetensors");
    let t = vec![
        ("transformer.blocks.1.attn1.to_k.lora_A.weight", TensorView::new(Dtype::F32, vec![2, 32], &down).unwrap()),
        ("transformer.blocks.1.attn1.to_k.lora_B.weight", TensorView::new(Dtype::F32, vec![32, 2], &up).unwrap()),
    ];
    serialize_to_file(t, &None, &p2).unwrap();
    let (set2, info2) = lora::read(&p2, None).unwrap();
    assert_eq!(info2.alpha_assumed, 1);
    assert_eq!(set2.modules["blocks.1.attn1.to_k.weight"].alpha, 2.0);
}

#[test]
fn qwen_kohya_uses_diffusers_names() {
    let d = tempfile::tempdir().unwrap();
    let set = qwen_set();
    for style in [Style::Kohya, Style::Peft] {
        let p = d.path().join(format!("q-{}.safetensors", style.as_str()));
        write_set(&set, &p, style, style == Style::Kohya);
        let (back, _) = lora::read(&p, None).unwrap();
        assert_eq!(back, set);
        let k = keys(&p);
        let want = match style {
            Style::Kohya => "diffusion_model.transformer_blocks.0.attn.to_q.lora_down.weight",
            Style::Peft => "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
        };
        assert!(k.contains(&want.to_string()), "{k:?}");
    }
}

#[test]
fn convert_is_lossless() {
    let d = tempfile::tempdir().unwrap();
    let k = d.path().join("k.safetensors");
    write_set(&wan_set(), &k, Style::Kohya, true);
    let p = d.path().join("p.safetensors");
    let k2 = d.path().join("k2.safetensors");
    run_ok(&["lora", "convert", &s(&k), "-o", &s(&p), "--style", "peft"]);
    run_ok(&["lora", "convert", &s(&p), "-o", &s(&k2), "--style", "kohya", "--prefix"]);
    let (a, b) = (read_safetensors(&k), read_safetensors(&k2));
    common::assert_same_tensors(&a.tensors, &b.tensors, "kohya → peft → kohya");
    // PEFT tensors carry the same bytes under the other names.
    let pt = read_safetensors(&p).tensors;
    assert_eq!(
        pt["transformer.blocks.0.attn1.to_q.lora_A.weight"].data,
        a.tensors["diffusion_model.blocks.0.self_attn.q.lora_down.weight"].data
    );
    let o = run_ok(&["--json", "lora", "inspect", &s(&p)]);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["style"], "peft");
    assert_eq!(v["family"], "wan22");
    assert_eq!(v["modules"], 4);
}

/// All tensors of a file as f64, read with the safetensors crate.
fn load_f64(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let vals: Vec<f64> = match v.dtype() {
                Dtype::F32 => v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
                Dtype::BF16 => {
                    v.data().chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16) as f64).collect()
                }
                Dtype::F16 => v.data().chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
                other => panic!("{name}: unexpected {other:?}"),
            };
            (name, (v.shape().to_vec(), vals))
        })
        .collect()
}

/// (α/r)·up·down in f64 from a module's bytes.
fn dense_f64(m: &LoraModule) -> Vec<f64> {
    let dec = |r: &Raw| r.to_f32().unwrap().into_iter().map(|v| v as f64).collect::<Vec<f64>>();
    let (down, up) = (dec(&m.down), dec(&m.up));
    let (out, inn) = m.dims();
    let r = m.rank();
    let mut w = vec![0f64; out * inn];
    for i in 0..out {
        for j in 0..inn {
            w[i * inn + j] = (0..r).map(|k| up[i * r + k] * down[k * inn + j]).sum::<f64>() * m.alpha / r as f64;
        }
    }
    w
}

/// Check `merged` = `base` + S·ΔW for the modules of `set` (names mapped by `to_base`); every
/// other tensor byte-equal.
fn check_merge(base: &Path, merged: &Path, set: &LoraSet, strength: f64, to_base: &dyn Fn(&str) -> String) {
    let b = load_f64(base);
    let m = load_f64(merged);
    assert_eq!(b.len(), m.len());
    let mut expect: HashMap<String, Vec<f64>> = HashMap::new();
    for (canon, module) in &set.modules {
        let name = to_base(canon);
        let (_, w) = &b[&name];
        let d = dense_f64(module);
        expect.insert(name, w.iter().zip(&d).map(|(x, y)| x + strength * y).collect());
    }
    let (rb, rm) = (read_safetensors(base).tensors, read_safetensors(merged).tensors);
    for (name, (shape, got)) in &m {
        assert_eq!(&b[name].0, shape, "{name}");
        match expect.get(name) {
            Some(want) => {
                let err = got.iter().zip(want).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
                let norm = want.iter().map(|y| y * y).sum::<f64>().sqrt();
                assert!(err / norm < 2e-7, "{name}: relative error {}", err / norm);
                let max = got.iter().zip(want).map(|(x, y)| (x - y).abs()).fold(0f64, f64::max);
                let top = want.iter().map(|y| y.abs()).fold(0f64, f64::max);
                assert!(max / top < 1e-6, "{name}: max error {max} of max |W'| {top}");
            }
            None => assert!(rb[name].data == rm[name].data, "{name} changed"),
        }
    }
}

#[test]
fn merge_matches_f64_in_every_layout() {
    let d = tempfile::tempdir().unwrap();
    let set = wan_set();
    let k = d.path().join("k.safetensors");
    let p = d.path().join("p.safetensors");
    write_set(&set, &k, Style::Kohya, true);
    write_set(&set, &p, Style::Peft, false);
    let wan_fam = phasekit::layout::Registry::builtin().family("wan22").unwrap();
    let to_orig = |c: &str| wan_fam.rename(phasekit::layout::Layout::Diffusers, phasekit::layout::Layout::Original, c).unwrap();
    // kohya LoRA into the original layout, PEFT LoRA into the diffusers layout: both styles
    // apply to both layouts.
    for (base, lora_file, map) in [
        (wan("original"), &k, &to_orig as &dyn Fn(&str) -> String),
        (wan("diffusers"), &p, &|c: &str| c.to_string()),
        (wan("original"), &p, &to_orig),
    ] {
        let out = d.path().join("merged.safetensors");
        let o = run_ok(&["--json", "lora", "merge", &s(&base), &s(lora_file), "-o", &s(&out), "--strength", "0.7", "--force"]);
        let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
        assert_eq!(v["report"]["merged"], 4, "{}", o.stdout);
        check_merge(&base, &out, &set, 0.7, map);
        let st = read_safetensors(&out);
        assert_eq!(st.tensors.len(), read_safetensors(&base).tensors.len());
    }
    // Qwen-Image.
    let qs = qwen_set();
    let qk = d.path().join("qk.safetensors");
    write_set(&qs, &qk, Style::Kohya, false);
    let out = d.path().join("q-merged.safetensors");
    run_ok(&["lora", "merge", &s(&qwen()), &s(&qk), "-o", &s(&out), "-q"]);
    check_merge(&qwen(), &out, &qs, 1.0, &|c: &str| c.to_string());
    // --dtype bf16 casts every float tensor.
    let out16 = d.path().join("merged-bf16.safetensors");
    run_ok(&["lora", "merge", &s(&wan("original")), &s(&k), "-o", &s(&out16), "--dtype", "bf16"]);
    assert!(read_safetensors(&out16).tensors.values().all(|t| t.dtype == "BF16"));
    // Two LoRAs add; a model folder output gets the base's config.json.
    let dir_out = d.path().join("merged-dir");
    run_ok(&["lora", "merge", &s(&wan("original")), &s(&k), &s(&p), "-o", &s(&dir_out), "--strength", "0.5", "--strength", "0.5"]);
    assert!(dir_out.join("config.json").is_file());
    check_merge(&wan("original"), &dir_out.join("diffusion_pytorch_model.safetensors"), &set, 1.0, &to_orig);
}

#[test]
fn merge_then_extract_recovers_the_delta() {
    let d = tempfile::tempdir().unwrap();
    let set = wan_set();
    let k = d.path().join("k.safetensors");
    write_set(&set, &k, Style::Kohya, false);
    let merged = d.path().join("merged.safetensors");
    run_ok(&["lora", "merge", &s(&wan("original")), &s(&k), "-o", &s(&merged)]);
    for (rank, style) in [(4, "kohya"), (8, "peft")] {
        let e = d.path().join(format!("e{rank}.safetensors"));
        let o = run_ok(&[
            "--json",
            "lora",
            "extract",
            &s(&wan("original")),
            &s(&merged),
            "--rank",
            &rank.to_string(),
            "-o",
            &s(&e),
            "--style",
            style,
        ]);
        let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
        assert_eq!(v["report"]["modules"], 4, "{}", o.stdout);
        let (got, _) = lora::read(&e, None).unwrap();
        assert_eq!(got.modules.keys().collect::<Vec<_>>(), set.modules.keys().collect::<Vec<_>>());
        for (name, want) in &set.modules {
            let g = &got.modules[name];
            assert_eq!(g.rank(), rank.min(want.dims().0).min(want.dims().1));
            assert_eq!(g.alpha, g.rank() as f64);
            let (a, b) = (dense_f64(g), dense_f64(want));
            let err = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
            let norm = b.iter().map(|y| y * y).sum::<f64>().sqrt();
            // The merged weights are f32, so ΔW carries f32 rounding of W + ΔW.
            assert!(err / norm < 1e-5, "{name} rank {rank}: relative error {}", err / norm);
        }
    }
    // Same checkpoint twice: nothing to extract.
    let e = d.path().join("none.safetensors");
    let o = run(&["lora", "extract", &s(&wan("original")), &s(&wan("original")), "--rank", "4", "-o", &s(&e)]);
    assert_eq!(o.code, Some(6), "{}", o.both());
    assert!(!e.exists());
}

fn assert_fails(args: &[&str], code: i32, file: &Path, out: &Path) {
    let o = run(args);
    assert_eq!(o.code, Some(code), "{args:?}: {}", o.both());
    assert!(!o.panicked(), "{}", o.both());
    let err = o.stderr.trim_end();
    assert_eq!(err.lines().count(), 1, "one-line error expected: {err}");
    assert!(err.contains(&file.display().to_string()), "error should name {}: {err}", file.display());
    assert!(!out.exists(), "no output on failure");
    let dir = out.parent().unwrap();
    let leftovers: Vec<_> =
        std::fs::read_dir(dir).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().contains("phasekit-tmp")).collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn bad_inputs_fail_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out.safetensors");
    let base = wan("original");
    // A module whose base tensor does not exist (the fixture has 2 blocks).
    let mut missing = wan_set();
    let m = missing.modules.values().next().unwrap().clone();
    missing.modules.insert("blocks.7.attn1.to_q.weight".into(), m);
    let pm = d.path().join("missing.safetensors");
    write_set(&missing, &pm, Style::Kohya, true);
    assert_fails(&["lora", "merge", &s(&base), &s(&pm), "-o", &s(&out)], 6, &pm, &out);
    let o = run(&["lora", "merge", &s(&base), &s(&pm), "-o", &s(&out)]);
    assert!(o.stderr.contains("blocks.7.self_attn.q.weight"), "{}", o.stderr);
    // Wrong shape: a [32, 48] update on a [32, 32] weight.
    let mut wrong = LoraSet { family: Some("wan22".into()), modules: BTreeMap::new() };
    wrong.modules.insert("blocks.0.attn1.to_k.weight".into(), module(&mut Lcg(5), 32, 48, 2, 2.0, DType::F32));
    let pw = d.path().join("wrong.safetensors");
    write_set(&wrong, &pw, Style::Peft, false);
    assert_fails(&["lora", "merge", &s(&base), &s(&pw), "-o", &s(&out)], 6, &pw, &out);
    // Truncated LoRA file.
    let good = d.path().join("good.safetensors");
    write_set(&wan_set(), &good, Style::Kohya, false);
    let bytes = std::fs::read(&good).unwrap();
    let pt = d.path().join("truncated.safetensors");
    std::fs::write(&pt, &bytes[..bytes.len() - 100]).unwrap();
    assert_fails(&["lora", "merge", &s(&base), &s(&pt), "-o", &s(&out)], 4, &pt, &out);
    assert_fails(&["lora", "convert", &s(&pt), "-o", &s(&out), "--style", "peft"], 4, &pt, &out);
    // kohya underscore names and non-LoRA tensors: unsupported key style, naming the key.
    let pu = d.path().join("underscore.safetensors");
    let down = f32_bytes(&[0.0; 64]);
    serialize_to_file(
        vec![("lora_unet_blocks_0_self_attn_q.lora_down.weight", TensorView::new(Dtype::F32, vec![2, 32], &down).unwrap())],
        &None,
        &pu,
    )
    .unwrap();
    assert_fails(&["lora", "inspect", &s(&pu)], 7, &pu, &out);
    let o = run(&["lora", "inspect", &s(&pu)]);
    assert!(o.stderr.contains("unsupported key style") && o.stderr.contains("lora_unet_blocks_0_self_attn_q"), "{}", o.stderr);
    assert_fails(&["lora", "merge", &s(&base), &s(&base), "-o", &s(&out)], 7, &base, &out);
    // Existing output is not replaced without --force.
    std::fs::write(&out, b"keep").unwrap();
    let o = run(&["lora", "merge", &s(&base), &s(&good), "-o", &s(&out)]);
    assert_eq!(o.code, Some(2), "{}", o.both());
    assert_eq!(std::fs::read(&out).unwrap(), b"keep");
}

#[test]
fn adapter_round_trip_matches_dense() {
    let set = wan_set();
    let m = &set.modules["blocks.0.attn1.to_q.weight"];
    let a = m.to_adapter(&candle_core::Device::Cpu).unwrap();
    let dense: Vec<f32> = a.dense().unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let ours = m.dense_f32().unwrap();
    for (x, y) in dense.iter().zip(&ours) {
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
    }
    let back = LoraModule::from_adapter(&a, DType::F32).unwrap();
    assert_eq!(&back, m);
}

#[test]
fn python_cross_check_of_merge() {
    if !python_ok("import safetensors, numpy") {
        println!("skipped: python3 with safetensors and numpy is not available");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    // numpy has no bfloat16: the same LoRA with every tensor in f32.
    let mut set = wan_set();
    for m in set.modules.values_mut() {
        m.down = Raw::from_f32(&m.down.to_f32().unwrap(), m.down.shape.clone(), DType::F32).unwrap();
        m.up = Raw::from_f32(&m.up.to_f32().unwrap(), m.up.shape.clone(), DType::F32).unwrap();
    }
    let k = d.path().join("k.safetensors");
    write_set(&set, &k, Style::Kohya, true);
    let out = d.path().join("merged.safetensors");
    run_ok(&["lora", "merge", &s(&wan("original")), &s(&k), "-o", &s(&out), "--strength", "0.9"]);
    let script = r#"
import sys, numpy as np
from safetensors.numpy import load_file
base, lora, merged = (load_file(p) for p in sys.argv[1:4])
s = 0.9
seen = 0
for k, w in base.items():
    stem = "diffusion_model." + k[:-len(".weight")] if k.endswith(".weight") else None
    want = w.astype(np.float64)
    if stem and stem + ".lora_down.weight" in lora:
        down = lora[stem + ".lora_down.weight"].astype(np.float64)
        up = lora[stem + ".lora_up.weight"].astype(np.float64)
        alpha = float(lora[stem + ".alpha"])
        want = want + s * alpha / down.shape[0] * (up @ down)
        seen += 1
    got = merged[k].astype(np.float64)
    err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
    assert err < 2e-7, (k, err)
assert seen == 4, seen
print("ok", seen)
"#;
    let o = std::process::Command::new("python3").args(["-c", script, &s(&wan("original")), &s(&k), &s(&out)]).output().unwrap();
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("ok 4"));
}
