//! The conversion pipeline end to end through the library: fp8 scale conventions, GGUF export
//! read back by us and by the PyPI `gguf` reader, sharded inputs, prefixes, sparse inputs.

use std::path::{Path, PathBuf};
use std::process::Command;

use phasekit::convert::{self, DTypeChoice, Fp8Scale, Options, OutFormat};
use phasekit::layout::Layout;
use phasekit::quant::GgmlType;
use phasekit::store::{Checkpoint, Encoding};
use phasekit::DType;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

fn opts() -> Options {
    Options { force: true, ..Default::default() }
}

/// Every tensor of a checkpoint decoded to f32 (with fp8 scales applied), by name.
fn values(path: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let ck = Checkpoint::open(path).unwrap();
    let mut out = std::collections::BTreeMap::new();
    for t in &ck.tensors {
        if phasekit::store::is_scale_companion(&t.name) {
            continue;
        }
        let n = t.numel() as usize;
        let mut v = vec![0f32; n];
        match t.encoding {
            Encoding::Dense(d) => phasekit::cast::decode_f32(d, ck.bytes(t), &mut v, 1.0).unwrap(),
            Encoding::Ggml(g) => phasekit::quant::dequantize(g, ck.bytes(t), &mut v).unwrap(),
        }
        let base = t.name.strip_suffix(".weight").unwrap_or(&t.name);
        for s in [".scale_weight", ".weight_scale"] {
            if let Some(sc) = ck.get(&format!("{base}{s}")) {
                let mut f = [0f32];
                phasekit::cast::decode_f32(sc.encoding.dense().unwrap(), ck.bytes(sc), &mut f, 1.0).unwrap();
                v.iter_mut().for_each(|x| *x *= f[0]);
            }
        }
        out.insert(t.name.clone(), v);
    }
    out
}

fn max_rel_err(a: &[f32], b: &[f32]) -> f32 {
    let amax = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / amax
}

#[test]
fn fp8_conventions_round_trip_within_fp8_precision() {
    let src = fixture("wan22_t2v_tiny/original");
    let orig = values(&src);
    let d = tempfile::tempdir().unwrap();
    for (dt, conv, suffix, tol) in [
        (DType::F8E4M3, Fp8Scale::Comfy, Some(".scale_weight"), 1.0 / 16.0),
        (DType::F8E4M3, Fp8Scale::WeightScale, Some(".weight_scale"), 1.0 / 16.0),
        (DType::F8E5M2, Fp8Scale::Comfy, Some(".scale_weight"), 1.0 / 8.0),
        (DType::F8E4M3, Fp8Scale::None, None, 1.0 / 16.0),
    ] {
        let out = d.path().join(format!("{dt}-{conv:?}.safetensors"));
        convert::convert(&src, &out, &Options { dtype: DTypeChoice::To(dt), fp8_scale: conv, ..opts() }).unwrap();
        let ck = Checkpoint::open(&out).unwrap();
        let w = ck.get("blocks.0.ffn.0.weight").unwrap();
        assert_eq!(w.encoding, Encoding::Dense(dt));
        // 1-D tensors and the 5-D patch embedding keep their dtype.
        assert_eq!(ck.get("blocks.0.ffn.0.bias").unwrap().encoding, Encoding::Dense(DType::F32));
        assert_eq!(ck.get("patch_embedding.weight").unwrap().encoding, Encoding::Dense(DType::F32));
        match suffix {
            Some(s) => {
                let sc = ck.get(&format!("blocks.0.ffn.0{s}")).expect("scale tensor");
                assert!(sc.shape.is_empty(), "per-tensor scalar scale");
                // With a scale, the largest magnitude maps to the fp8 maximum.
                let mut raw = vec![0f32; w.numel() as usize];
                phasekit::cast::decode_f32(dt, ck.bytes(w), &mut raw, 1.0).unwrap();
                let amax = raw.iter().fold(0f32, |m, x| m.max(x.abs()));
                assert_eq!(amax, phasekit::cast::fp8_max(dt).unwrap());
            }
            None => assert!(ck.get("blocks.0.ffn.0.scale_weight").is_none() && ck.get("blocks.0.ffn.0.weight_scale").is_none()),
        }
        assert_eq!(ck.get("scaled_fp8").is_some(), conv == Fp8Scale::Comfy);
        // Casting up applies the scale (forgetting it would be off by orders of magnitude).
        let back = d.path().join("back.safetensors");
        convert::convert(&out, &back, &Options { dtype: DTypeChoice::To(DType::F32), ..opts() }).unwrap();
        let bck = Checkpoint::open(&back).unwrap();
        assert!(bck.tensors.iter().all(|t| !phasekit::store::is_scale_companion(&t.name)), "scale tensors dropped after casting up");
        let got = values(&back);
        assert_eq!(got.keys().collect::<Vec<_>>(), orig.keys().collect::<Vec<_>>());
        for (k, v) in &orig {
            let e = max_rel_err(&got[k], v);
            assert!(e <= tol, "{dt} {conv:?} {k}: relative error {e} > {tol}");
        }
    }
}

#[test]
fn fp8_keep_copies_scales_and_marker_unchanged() {
    let d = tempfile::tempdir().unwrap();
    let f8 = d.path().join("f8.safetensors");
    convert::convert(&fixture("wan22_t2v_tiny/original"), &f8, &Options { dtype: DTypeChoice::To(DType::F8E4M3), ..opts() }).unwrap();
    let renamed = d.path().join("renamed");
    convert::convert(&f8, &renamed, &Options { layout: Some(Layout::Diffusers), ..opts() }).unwrap();
    let ck = Checkpoint::open(&renamed).unwrap();
    let src = Checkpoint::open(&f8).unwrap();
    assert_eq!(ck.tensors.len(), src.tensors.len());
    assert!(ck.get("scaled_fp8").is_some());
    let w = ck.get("blocks.0.ffn.net.0.proj.weight").unwrap();
    assert_eq!(ck.bytes(w), src.bytes(src.get("blocks.0.ffn.0.weight").unwrap()));
    let s = ck.get("blocks.0.ffn.net.0.proj.scale_weight").expect("scale renamed with its weight");
    assert_eq!(ck.bytes(s), src.bytes(src.get("blocks.0.ffn.0.scale_weight").unwrap()));
}

fn python_gguf() -> bool {
    let ok = Command::new("python3").args(["-c", "import gguf, numpy"]).output().is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipped: python3 with the gguf package is not available");
    }
    ok
}

#[test]
fn gguf_export_every_type_reads_back_equal_here_and_in_gguf_py() {
    let d = tempfile::tempdir().unwrap();
    let src = fixture("wan22_t2v_tiny/original");
    let orig = values(&src);
    for (q, tol) in
        [("F32", 0.0), ("F16", 1e-3), ("BF16", 8e-3), ("Q8_0", 1e-2), ("Q4_0", 0.15), ("Q4_K", 0.15), ("Q5_K", 0.08), ("Q6_K", 0.04)]
    {
        let g = GgmlType::parse(q).unwrap();
        let out = d.path().join(format!("w-{q}.gguf"));
        convert::convert(&src, &out, &Options { format: OutFormat::Gguf, quant: Some(g), ..opts() }).unwrap();
        let ck = Checkpoint::open(&out).unwrap();
        assert_eq!(ck.tensors.len(), orig.len());
        // ComfyUI-GGUF conventions: arch, F32 for 1-D / small / modulation, 5-D patch embedding.
        let kv = &ck.gguf.as_ref().unwrap().kv;
        let arch = kv.iter().find(|(k, _)| k == "general.architecture").unwrap();
        assert_eq!(arch.1.as_str(), Some("wan"));
        let pe = ck.get("patch_embedding.weight").unwrap();
        assert_eq!(pe.shape, vec![32, 4, 1, 2, 2]);
        assert_eq!(pe.encoding, Encoding::Dense(DType::F32));
        assert_eq!(ck.get("blocks.0.modulation").unwrap().encoding, Encoding::Dense(DType::F32));
        let got = values(&out);
        for (k, v) in &orig {
            let e = max_rel_err(&got[k], v);
            assert!(e <= tol, "{q} {k}: relative error {e} > {tol}");
        }
        if g.is_quantized() && g.block_size() <= 32 {
            // ffn.0 [48, 32] rows are whole blocks of 32: quantized.
            assert_eq!(ck.get("blocks.0.ffn.0.weight").unwrap().encoding, Encoding::Ggml(g));
        }
        if python_gguf() {
            // gguf-py dequantizes our blocks to the same values we do.
            let script = r#"
import sys, numpy as np, gguf
from gguf.quants import dequantize
r = gguf.GGUFReader(sys.argv[1])
out = {}
for t in r.tensors:
    shape = [int(x) for x in reversed(t.shape.tolist())]
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        a = np.asarray(t.data, dtype=np.float32)
    elif t.tensor_type == gguf.GGMLQuantizationType.BF16:
        a = (np.asarray(t.data).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        a = dequantize(t.data, t.tensor_type)
    out[t.name] = (shape, a.reshape(-1).astype(np.float32))
np.savez(sys.argv[2], **{k: v[1] for k, v in out.items()})
print(len(out))
"#;
            let npz = d.path().join(format!("{q}.npz"));
            let o = Command::new("python3").arg("-c").arg(script).arg(&out).arg(&npz).output().unwrap();
            assert!(o.status.success(), "gguf-py failed on our {q} file: {}", String::from_utf8_lossy(&o.stderr));
            let check = r#"
import sys, numpy as np, json
z = np.load(sys.argv[1])
print(json.dumps({k: z[k].tobytes().hex() for k in z.files}))
"#;
            let o = Command::new("python3").arg("-c").arg(check).arg(&npz).output().unwrap();
            let m: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            for (k, v) in &got {
                let hex = m[k].as_str().unwrap_or_else(|| panic!("{q}: gguf-py lacks {k}"));
                let ours: String = v.iter().flat_map(|x| x.to_le_bytes()).map(|b| format!("{b:02x}")).collect();
                assert_eq!(hex, ours, "{q} {k}: gguf-py values differ from ours");
            }
        }
    }
}

#[test]
fn gguf_back_to_safetensors_and_diffusers() {
    let d = tempfile::tempdir().unwrap();
    let gg = d.path().join("w.gguf");
    convert::convert(&fixture("wan22_t2v_tiny/original"), &gg, &Options { format: OutFormat::Gguf, quant: Some(GgmlType::F32), ..opts() })
        .unwrap();
    let out = d.path().join("diffusers");
    convert::convert(&gg, &out, &Options { layout: Some(Layout::Diffusers), ..opts() }).unwrap();
    // F32 GGUF holds the exact values: back in diffusers names they equal the diffusers fixture.
    let a = values(&out.join("diffusion_pytorch_model.safetensors"));
    let b = values(&fixture("wan22_t2v_tiny/diffusers"));
    assert_eq!(a, b);
}

#[test]
fn quantized_gguf_to_safetensors_dequantizes_to_bf16_by_default() {
    let d = tempfile::tempdir().unwrap();
    let gg = d.path().join("w.gguf");
    convert::convert(&fixture("wan22_t2v_tiny/original"), &gg, &Options { format: OutFormat::Gguf, quant: Some(GgmlType::Q8_0), ..opts() })
        .unwrap();
    let st = d.path().join("w.safetensors");
    let r = convert::convert(&gg, &st, &opts()).unwrap();
    assert!(r.notes.iter().any(|n| n.contains("dequantized")), "{:?}", r.notes);
    let ck = Checkpoint::open(&st).unwrap();
    assert_eq!(ck.get("blocks.0.ffn.0.weight").unwrap().encoding, Encoding::Dense(DType::BF16));
    let st32 = d.path().join("w32.safetensors");
    convert::convert(&gg, &st32, &Options { dtype: DTypeChoice::To(DType::F32), ..opts() }).unwrap();
    assert_eq!(values(&st32), values(&gg));
}

#[test]
fn qwen_comfy_prefix_round_trip_and_sharded_input_by_index_path() {
    let d = tempfile::tempdir().unwrap();
    let src = fixture("qwen_image_tiny/diffusers");
    let comfy = d.path().join("qwen_comfy.safetensors");
    convert::convert(&src, &comfy, &Options { layout: Some(Layout::Comfy), comfy_prefix: true, ..opts() }).unwrap();
    let ck = Checkpoint::open(&comfy).unwrap();
    assert!(ck.tensors.iter().all(|t| t.name.starts_with("model.diffusion_model.")));
    let det = phasekit::layout::Registry::builtin().detect(&ck.names_and_shapes(), None).unwrap();
    assert_eq!((det.family.as_str(), det.layout, det.prefix.as_str()), ("qwen_image", Layout::Comfy, "model.diffusion_model."));
    // Back to diffusers, sharded into several files, then read through the index path.
    let back = d.path().join("back");
    convert::convert(&comfy, &back, &Options { layout: Some(Layout::Diffusers), shard_size: Some(100_000), ..opts() }).unwrap();
    let index = back.join("diffusion_pytorch_model.safetensors.index.json");
    assert!(index.is_file());
    assert_eq!(values(&index), values(&src));
    assert_eq!(values(&back), values(&src));
}

#[test]
fn sparse_replica_converts_with_holes_kept() {
    // A 1-block Qwen-Image at full width: 370 MB of zeros that cost no disk, in and out.
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("replica.safetensors");
    let len = phasekit::replica::write(&src, &phasekit::replica::qwen_image(1), DType::BF16, None).unwrap();
    assert!(len > 300_000_000);
    let out = d.path().join("out.safetensors");
    convert::convert(&src, &out, &Options { dtype: DTypeChoice::To(DType::F16), ..opts() }).unwrap();
    let meta = std::fs::metadata(&out).unwrap();
    assert!(meta.len() > 300_000_000 && meta.len() <= len);
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < 16 << 20, "output of zeros should stay sparse, has {} bytes allocated", meta.blocks() * 512);
    let ck = Checkpoint::open(&out).unwrap();
    assert!(ck.tensors.iter().all(|t| t.encoding == Encoding::Dense(DType::F16)));
}

#[test]
fn large_copies_keep_their_page_offset_and_small_files_match_the_official_writer() {
    // A 1-block Wan A14B replica renamed to diffusers: the names (and so the header length and
    // order) change, yet every large copied tensor must land at the same offset modulo 64 KiB
    // as in its source, through JSON padding that Python's safetensors accepts.
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("wan.safetensors");
    phasekit::replica::write(&src, &phasekit::replica::wan(5120, 13824, 1, 16, 16), DType::BF16, None).unwrap();
    let out = d.path().join("diffusers.safetensors");
    convert::convert(&src, &out, &Options { layout: Some(phasekit::layout::Layout::Diffusers), ..opts() }).unwrap();
    let (a, b) = (Checkpoint::open(&src).unwrap(), Checkpoint::open(&out).unwrap());
    let fam = phasekit::layout::Registry::builtin().require("wan22").unwrap();
    let (mut congruent, mut total) = (0u64, 0u64);
    for t in a.tensors.iter().filter(|t| t.len >= 1 << 20) {
        let name = fam.rename(phasekit::layout::Layout::Original, phasekit::layout::Layout::Diffusers, &t.name).unwrap();
        let o = b.get(&name).unwrap();
        total += t.len;
        if o.offset % 65536 == t.offset % 65536 {
            congruent += t.len;
        }
    }
    assert!(total > 500_000_000, "{total}");
    assert_eq!(congruent, total, "copied bytes keep their offset modulo 64 KiB");
    let hlen = u64::from_le_bytes(std::fs::read(&out).unwrap()[..8].try_into().unwrap());
    assert_eq!(hlen % 8, 0);
    if python_ok("import safetensors, numpy") {
        let code =
            format!("from safetensors import safe_open\nf = safe_open({:?}, 'np')\nprint(len(list(f.keys())))", out.to_str().unwrap());
        let o = std::process::Command::new("python3").args(["-c", &code]).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), b.tensors.len().to_string());
    } else {
        eprintln!("skipped: python3 with safetensors is not available");
    }
    // Below the threshold nothing is padded: the tiny fixture's header is the official one.
    let tiny = d.path().join("tiny.safetensors");
    convert::convert(
        &fixture("wan22_t2v_tiny/original/diffusion_pytorch_model.safetensors"),
        &tiny,
        &Options { layout: Some(phasekit::layout::Layout::Diffusers), ..opts() },
    )
    .unwrap();
    let want = std::fs::read(fixture("wan22_t2v_tiny/diffusers/diffusion_pytorch_model.safetensors")).unwrap();
    let got = std::fs::read(&tiny).unwrap();
    let hl = |b: &[u8]| u64::from_le_bytes(b[..8].try_into().unwrap());
    assert_eq!(hl(&got) % 8, 0);
    assert!(hl(&got) < hl(&want) + 8, "no extra padding on small outputs");
}

fn python_ok(code: &str) -> bool {
    Command::new("python3").args(["-c", code]).output().is_ok_and(|o| o.status.success())
}

#[test]
fn coalesced_kernel_copies_are_byte_equal() {
    // Random bf16 values in a Wan layout whose tensors (0.5–2 MiB) are copied as runs: a rename
    // keeps the data order, so the whole data buffer goes to the kernel in a few calls. Every
    // tensor must come out byte-equal under its new name, and sharding must cut runs correctly.
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("wan.safetensors");
    let mut s = 0x1234_5678u64;
    let mut fill = |_: &str, buf: &mut [u8]| {
        for b in buf.iter_mut() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            *b = (s >> 56) as u8;
        }
    };
    phasekit::replica::write(&src, &phasekit::replica::wan(512, 1024, 3, 16, 16), DType::BF16, Some(&mut fill)).unwrap();
    let a = Checkpoint::open(&src).unwrap();
    let fam = phasekit::layout::Registry::builtin().require("wan22").unwrap();
    for shard in [None, Some(4_000_000)] {
        let out = d.path().join(format!("out-{shard:?}.safetensors"));
        let o = Options { layout: Some(Layout::Diffusers), shard_size: shard, ..opts() };
        convert::convert(&src, &out, &o).unwrap();
        let path = if shard.is_some() { d.path().join(format!("out-{shard:?}.safetensors.index.json")) } else { out };
        let b = Checkpoint::open(&path).unwrap();
        assert_eq!(b.tensors.len(), a.tensors.len());
        for t in &a.tensors {
            let name = fam.rename(Layout::Original, Layout::Diffusers, &t.name).unwrap();
            let e = b.get(&name).unwrap_or_else(|| panic!("{name} missing"));
            assert!(a.bytes(t) == b.bytes(e), "{} differs after conversion (shard {shard:?})", t.name);
        }
    }
}
