//! GGUF interoperability with gguf-py (PyPI `gguf`): files its `GGUFWriter` writes are read by
//! us as its `GGUFReader` reads them, and files we write are read by `GGUFReader` with the values
//! we wrote (5-D F32 tensors, BF16 and quantised tensors, every value type, nested arrays).
//! Skipped, with a message, when `python3 -c 'import gguf'` fails.
//!
//! The Python side is `tests/py/gguf_oracle.py`.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use phasekit::gguf::{self, Array, GgufFile, TensorPlan, Value};
use phasekit::quant::{self, GgmlType};
use serde_json::{json, Value as J};
use sha2::{Digest, Sha256};

fn have_gguf_py() -> bool {
    let ok = Command::new("python3").args(["-c", "import gguf, numpy"]).output().map(|o| o.status.success()).unwrap_or(false);
    if !ok {
        eprintln!("skipped: python3/gguf not available");
    }
    ok
}

fn oracle(mode: &str, path: &Path) -> J {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/gguf_oracle.py");
    let out = Command::new("python3").arg(script).arg(mode).arg(path).output().expect("run python3");
    assert!(out.status.success(), "gguf_oracle.py {mode} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("oracle JSON")
}

fn sha256(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

/// gguf-py's `ReaderField.types` for a value: the value's type, then for arrays the type chain
/// of the first element (an empty array has none).
fn types(v: &Value) -> Vec<String> {
    fn arr(a: &Array, out: &mut Vec<String>) {
        if a.is_empty() {
            return;
        }
        out.push(a.elem_type().name().to_string());
        if let Array::Array(inner) = a {
            arr(&inner[0], out);
        }
    }
    let mut out = vec![v.value_type().name().to_string()];
    if let Value::Array(a) = v {
        arr(a, &mut out);
    }
    out
}

/// JSON of a scalar the way Python's `json` writes the value gguf-py returns: floats as the f64
/// of the stored value.
fn scalar_json(v: &Value) -> J {
    match v {
        Value::F32(x) => json!(*x as f64),
        Value::F64(x) => json!(*x),
        other => other.to_json(),
    }
}

/// gguf-py's `ReaderField.contents()`: scalars as they are, arrays flattened to their leaves.
fn contents(v: &Value) -> J {
    fn leaves(a: &Array, out: &mut Vec<J>) {
        match a {
            Array::Array(inner) => inner.iter().for_each(|x| leaves(x, out)),
            _ => (0..a.len()).for_each(|i| out.push(scalar_json(&a.get(i).expect("in range")))),
        }
    }
    match v {
        Value::Array(a) => {
            let mut out = Vec::new();
            leaves(a, &mut out);
            J::Array(out)
        }
        other => scalar_json(other),
    }
}

/// Our view of a file in the oracle's format.
fn describe(f: &GgufFile, bytes: &[u8]) -> J {
    let mut fields = serde_json::Map::new();
    for (k, v) in &f.kv {
        fields.insert(k.clone(), json!({"types": types(v), "value": contents(v)}));
    }
    let tensors: Vec<J> = f
        .tensors
        .iter()
        .map(|t| {
            json!({
                "name": t.name,
                "type": t.ty.name(),
                "shape": t.shape,
                "offset": t.offset,
                "n_bytes": t.size,
                "sha256": sha256(t.data(bytes).expect("in file")),
            })
        })
        .collect();
    json!({
        "version": f.version,
        "alignment": f.alignment,
        "data_offset": f.data_offset,
        "fields": fields,
        "tensors": tensors,
    })
}

#[track_caller]
fn assert_same_view(ours: &J, theirs: &J) {
    for k in ["version", "alignment", "data_offset"] {
        assert_eq!(ours[k], theirs[k], "{k}");
    }
    let (of, tf) = (ours["fields"].as_object().unwrap(), theirs["fields"].as_object().unwrap());
    assert_eq!(of.keys().collect::<Vec<_>>(), tf.keys().collect::<Vec<_>>(), "keys and their order");
    for (k, v) in of {
        assert_eq!(v, &tf[k], "field {k}");
    }
    assert_eq!(ours["tensors"], theirs["tensors"]);
}

#[test]
fn we_read_what_gguf_py_writes() {
    if !have_gguf_py() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("py.gguf");
    let theirs = oracle("write", &path);
    let bytes = std::fs::read(&path).unwrap();
    let f = gguf::parse(&path, &bytes).unwrap();
    assert_same_view(&describe(&f, &bytes), &theirs);
    // Spot checks in our own types.
    assert_eq!(f.architecture(), Some("wan"));
    assert_eq!(f.alignment, 64);
    assert_eq!(f.get("t.f32"), Some(&Value::F32(0.1)));
    assert_eq!(f.get("t.str").and_then(Value::as_str), Some("héllo, wörld"));
    assert_eq!(f.orig_shape("blocks.0.ffn.0.weight"), Some(vec![3, 256]));
    let pe = f.tensor("patch_embedding.weight").unwrap();
    assert_eq!((pe.ty, pe.shape.as_slice()), (GgmlType::F32, &[8u64, 4, 1, 2, 2][..]));
    let bf = f.tensor("blocks.0.ffn.0.weight").unwrap();
    assert_eq!((bf.ty, bf.shape.as_slice(), bf.size), (GgmlType::BF16, &[3u64, 256][..], 3 * 256 * 2));
    // The BF16 and Q8_0 tensors hold the same matrix; our decoders agree on it.
    let q8 = f.tensor("blocks.0.ffn.2.weight").unwrap();
    let mut a = vec![0f32; 768];
    let mut b = vec![0f32; 768];
    quant::dequantize(GgmlType::BF16, bf.data(&bytes).unwrap(), &mut a).unwrap();
    quant::dequantize(GgmlType::Q8_0, q8.data(&bytes).unwrap(), &mut b).unwrap();
    let amax = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= amax / 100.0));
}

/// Metadata and tensors (with their bytes) of the sample file.
type Sample = (Vec<(String, Value)>, Vec<(TensorPlan, Vec<u8>)>);

fn our_sample() -> Sample {
    let kv: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::from("qwen_image")),
        ("general.file_type".into(), Value::U32(gguf::file_type::MOSTLY_Q4_K_M)),
        ("general.quantization_version".into(), Value::U32(2)),
        ("t.u8".into(), Value::U8(255)),
        ("t.i8".into(), Value::I8(-128)),
        ("t.u16".into(), Value::U16(1)),
        ("t.i16".into(), Value::I16(-1)),
        ("t.i32".into(), Value::I32(i32::MIN)),
        ("t.f32".into(), Value::F32(-2.5e-8)),
        ("t.bool".into(), Value::Bool(false)),
        ("t.str".into(), Value::from("ünïcode ✓")),
        ("t.empty_str".into(), Value::from("")),
        ("t.u64".into(), Value::U64(u64::MAX)),
        ("t.i64".into(), Value::I64(-1)),
        ("t.f64".into(), Value::F64(std::f64::consts::PI)),
        ("t.arr_u8".into(), Value::Array(Array::U8(vec![0, 1, 255]))),
        ("t.arr_i16".into(), Value::Array(Array::I16(vec![-3, 4]))),
        ("t.arr_f64".into(), Value::Array(Array::F64(vec![0.5, 1e300]))),
        ("t.arr_bool".into(), Value::Array(Array::Bool(vec![true, false]))),
        ("t.arr_str".into(), Value::Array(Array::String(vec!["x".into(), "yz".into()]))),
        ("t.arr_empty".into(), Value::Array(Array::U32(vec![]))),
        ("t.nested".into(), Value::Array(Array::Array(vec![Array::I32(vec![1, 2]), Array::I32(vec![]), Array::I32(vec![3])]))),
        ("comfy.gguf.orig_shape.img_in.weight".into(), Value::Array(Array::I32(vec![3072, 64]))),
    ];
    let mut s = 7u32;
    let mut rnd = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                s as f32 / u32::MAX as f32 - 0.5
            })
            .collect()
    };
    let mut tensors = Vec::new();
    let mut add = |name: &str, shape: Vec<u64>, ty: GgmlType, x: Vec<f32>| {
        let mut b = vec![0u8; x.len() / ty.block_size() as usize * ty.type_size() as usize];
        quant::quantize(ty, &x, &mut b).unwrap();
        tensors.push((TensorPlan { name: name.into(), shape, ty }, b));
    };
    add("patch_embedding.weight", vec![8, 4, 1, 2, 2], GgmlType::F32, rnd(128));
    add("transformer_blocks.0.img_mlp.net.0.proj.weight", vec![4, 512], GgmlType::Q4_K, rnd(2048));
    add("transformer_blocks.0.img_mlp.net.2.weight", vec![2, 256], GgmlType::Q6_K, rnd(512));
    add("transformer_blocks.0.attn.to_q.weight", vec![3, 64], GgmlType::Q8_0, rnd(192));
    add("transformer_blocks.0.attn.to_q.bias", vec![3], GgmlType::BF16, rnd(3));
    add("img_in.weight", vec![5, 7], GgmlType::BF16, rnd(35));
    add("norm_out.linear.weight", vec![2, 3], GgmlType::F16, rnd(6));
    add("empty", vec![0, 4], GgmlType::F32, vec![]);
    let ids: Vec<u8> = (0..5i32).flat_map(|v| v.to_le_bytes()).collect();
    tensors.push((TensorPlan { name: "ids".into(), shape: vec![5], ty: GgmlType::I32 }, ids));
    (kv, tensors)
}

#[test]
fn gguf_py_reads_what_we_write() {
    if !have_gguf_py() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for alignment in [32u64, 64] {
        let path = dir.path().join(format!("ours-{alignment}.gguf"));
        let (kv, tensors) = our_sample();
        let plans: Vec<TensorPlan> = tensors.iter().map(|(p, _)| p.clone()).collect();
        let plan = gguf::plan(&kv, &plans, alignment).unwrap();
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        gguf::write_all(&path, &mut file, &plan, |i, w| w.write_all(&tensors[i].1).map_err(|e| phasekit::Error::io(&path, e))).unwrap();
        file.into_inner().unwrap().sync_all().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, plan.total_len);

        let theirs = oracle("read", &path);
        let f = gguf::parse(&path, &bytes).unwrap();
        assert_same_view(&describe(&f, &bytes), &theirs);
        // And that view is what we meant to write.
        assert_eq!(theirs["alignment"], alignment);
        assert_eq!(theirs["version"], 3);
        assert_eq!(theirs["fields"]["general.alignment"]["value"], alignment);
        assert_eq!(theirs["fields"]["general.architecture"]["value"], "qwen_image");
        assert_eq!(theirs["fields"]["t.nested"]["value"], json!([1, 2, 3]));
        assert_eq!(theirs["fields"]["t.str"]["value"], "ünïcode ✓");
        for (i, (p, data)) in tensors.iter().enumerate() {
            let t = &theirs["tensors"][i];
            assert_eq!(t["name"], p.name.as_str());
            assert_eq!(t["type"], p.ty.name());
            assert_eq!(t["shape"], json!(p.shape));
            assert_eq!(t["sha256"], sha256(data));
            assert_eq!(t["offset"].as_u64().unwrap() % alignment, 0);
        }
    }
}
