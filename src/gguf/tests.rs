//! Reader and writer tests. Hostile files are built byte by byte, one test per rejection rule.

use std::path::Path;

use super::limits::*;
use super::*;
use crate::error::Kind;

const P: &str = "t.gguf";

/// A GGUF file under construction, little-endian.
#[derive(Clone)]
struct B(Vec<u8>);

impl B {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> B {
        let mut b = B(b"GGUF".to_vec());
        b.u32(version).u64(n_tensors).u64(n_kv);
        b
    }
    fn u32(&mut self, v: u32) -> &mut B {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut B {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn raw(&mut self, v: &[u8]) -> &mut B {
        self.0.extend_from_slice(v);
        self
    }
    fn str(&mut self, s: &str) -> &mut B {
        self.u64(s.len() as u64).raw(s.as_bytes())
    }
    fn kv_u32(&mut self, k: &str, v: u32) -> &mut B {
        self.str(k).u32(4).u32(v)
    }
    /// A tensor info with `ne` in ggml order.
    fn tensor(&mut self, name: &str, ne: &[u64], ty: u32, offset: u64) -> &mut B {
        self.str(name).u32(ne.len() as u32);
        for &d in ne {
            self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
    /// Zero padding to `align`, then `n` data bytes.
    fn data(&mut self, align: usize, n: usize) -> &mut B {
        let len = self.0.len().div_ceil(align) * align + n;
        self.0.resize(len, 0);
        self
    }
    fn done(&self) -> Vec<u8> {
        self.0.clone()
    }
}

fn parse_ok(bytes: &[u8]) -> GgufFile {
    parse(Path::new(P), bytes).unwrap_or_else(|e| panic!("{e}"))
}

#[track_caller]
fn rejects(bytes: &[u8], kind: Kind, needle: &str) {
    let e = parse(Path::new(P), bytes).expect_err("must be rejected");
    assert_eq!(e.kind(), kind, "{e}");
    let msg = e.to_string();
    assert!(msg.starts_with("t.gguf: "), "{msg}");
    assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
    assert!(!msg.contains('\n'));
}

/// One F32 tensor of 4 elements, valid.
fn one_tensor() -> B {
    let mut b = B::header(3, 1, 1);
    b.kv_u32("general.alignment", 32).tensor("w", &[4], 0, 0).data(32, 16);
    b
}

// ---------------------------------------------------------------- accepted files

#[test]
fn minimal_files() {
    let f = parse_ok(&B::header(3, 0, 0).done());
    assert_eq!((f.version, f.alignment, f.data_offset), (3, 32, 32));
    assert!(f.kv.is_empty() && f.tensors.is_empty());
    let f = parse_ok(&B::header(2, 0, 0).done());
    assert_eq!(f.version, 2);
    let f = parse_ok(&one_tensor().done());
    assert_eq!(f.tensors[0], GgufTensor { name: "w".into(), shape: vec![4], ty: GgmlType::F32, offset: 96, size: 16 });
    assert_eq!(f.data_offset, 96);
}

#[test]
fn five_d_tensor_in_torch_order() {
    // Wan patch_embedding.weight [5120, 16, 1, 2, 2] in torch order, scaled down.
    let mut b = B::header(3, 1, 0);
    b.tensor("patch_embedding.weight", &[2, 2, 1, 4, 8], 0, 0).data(32, 2 * 2 * 4 * 8 * 4);
    let f = parse_ok(&b.done());
    assert_eq!(f.tensors[0].shape, vec![8, 4, 1, 2, 2]);
    assert_eq!(f.tensors[0].size, 512);
    // 8 dimensions is the cap.
    let mut b = B::header(3, 1, 0);
    b.tensor("x", &[1; 8], 0, 0).data(32, 4);
    assert_eq!(parse_ok(&b.done()).tensors[0].shape.len(), 8);
}

#[test]
fn every_value_type_and_nested_arrays() {
    let mut b = B::header(3, 0, 14);
    b.str("u8").u32(0).raw(&[200]);
    b.str("i8").u32(1).raw(&[0xff]);
    b.str("u16").u32(2).raw(&0xbeefu16.to_le_bytes());
    b.str("i16").u32(3).raw(&(-2i16).to_le_bytes());
    b.str("u32").u32(4).u32(7);
    b.str("i32").u32(5).raw(&(-3i32).to_le_bytes());
    b.str("f32").u32(6).raw(&1.5f32.to_le_bytes());
    b.str("bool").u32(7).raw(&[1]);
    b.str("str").u32(8).str("wan");
    b.str("u64").u32(10).u64(u64::MAX);
    b.str("i64").u32(11).raw(&i64::MIN.to_le_bytes());
    b.str("f64").u32(12).raw(&0.25f64.to_le_bytes());
    b.str("arr").u32(9).u32(9).u64(2); // array of 2 arrays
    b.u32(5).u64(2).raw(&1i32.to_le_bytes()).raw(&2i32.to_le_bytes());
    b.u32(8).u64(1).str("x");
    b.str("bad_utf8").u32(8).u64(2).raw(&[b'a', 0xff]);
    let f = parse_ok(&b.done());
    let v = |k| f.get(k).unwrap().clone();
    assert_eq!(v("u8"), Value::U8(200));
    assert_eq!(v("i8"), Value::I8(-1));
    assert_eq!(v("u16"), Value::U16(0xbeef));
    assert_eq!(v("i16"), Value::I16(-2));
    assert_eq!(v("u32"), Value::U32(7));
    assert_eq!(v("i32"), Value::I32(-3));
    assert_eq!(v("f32"), Value::F32(1.5));
    assert_eq!(v("bool"), Value::Bool(true));
    assert_eq!(v("str").as_str(), Some("wan"));
    assert_eq!(v("u64"), Value::U64(u64::MAX));
    assert_eq!(v("i64"), Value::I64(i64::MIN));
    assert_eq!(v("f64"), Value::F64(0.25));
    assert_eq!(v("arr"), Value::Array(Array::Array(vec![Array::I32(vec![1, 2]), Array::String(vec!["x".into()])])));
    // Non-UTF-8 string values are kept with U+FFFD.
    assert_eq!(v("bad_utf8").as_str(), Some("a\u{fffd}"));
    assert_eq!(f.kv.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>()[..3], ["u8", "i8", "u16"]);
}

#[test]
fn non_packed_layouts_are_accepted_when_disjoint_and_aligned() {
    // Out of info order, with a gap, and a zero-size tensor sharing an offset.
    let mut b = B::header(3, 3, 0);
    b.tensor("a", &[8], 0, 64).tensor("b", &[8], 0, 0).tensor("empty", &[0, 3], 0, 0).data(32, 96);
    let f = parse_ok(&b.done());
    let d = f.data_offset;
    assert_eq!(f.tensors.iter().map(|t| t.offset - d).collect::<Vec<_>>(), [64, 0, 0]);
    assert_eq!(f.tensors[2].size, 0);
    assert_eq!(f.tensors[2].shape, vec![3, 0]);
}

#[test]
fn custom_alignment_and_scalar_tensor() {
    let mut b = B::header(3, 2, 1);
    b.kv_u32("general.alignment", 64).tensor("s", &[], 0, 0).tensor("q", &[32, 2], 8, 64).data(64, 64 + 68);
    let f = parse_ok(&b.done());
    assert_eq!(f.alignment, 64);
    assert_eq!(f.data_offset % 64, 0);
    assert_eq!(f.tensors[0].shape, Vec::<u64>::new());
    assert_eq!(f.tensors[0].size, 4);
    assert_eq!((f.tensors[1].ty, f.tensors[1].size), (GgmlType::Q8_0, 68));
}

// ---------------------------------------------------------------- one test per rejection

#[test]
fn rejects_short_and_bad_magic() {
    rejects(b"GGU", Kind::Truncated, "magic");
    rejects(b"GGML\x03\0\0\0", Kind::Malformed, "not a GGUF file");
}

#[test]
fn rejects_versions() {
    rejects(&B::header(1, 0, 0).done(), Kind::Unsupported, "version 1");
    rejects(&B::header(4, 0, 0).done(), Kind::Unsupported, "version 4");
    rejects(&B::header(0, 0, 0).done(), Kind::Malformed, "version 0");
    rejects(&B::header(0x0300_0000, 0, 0).done(), Kind::Unsupported, "big-endian");
}

#[test]
fn rejects_truncated_counts() {
    let b = B::header(3, 0, 0).done();
    rejects(&b[..20], Kind::Truncated, "key-value count");
}

#[test]
fn rejects_counts_beyond_the_file() {
    rejects(&B::header(3, 0, 2).done(), Kind::Truncated, "2 key-value pairs");
    rejects(&B::header(3, 1000, 0).done(), Kind::Truncated, "1000 tensors");
    let mut b = B::header(3, 2, 1);
    b.kv_u32("k", 1).raw(&[0; 44]);
    rejects(&b.done(), Kind::Truncated, "descriptions");
}

#[test]
fn rejects_counts_over_the_caps() {
    rejects(&B::header(3, MAX_TENSORS + 1, 0).done(), Kind::Limit, "tensors, over the limit");
    rejects(&B::header(3, 0, MAX_KV + 1).done(), Kind::Limit, "key-value pairs, over the limit");
}

#[test]
fn rejects_string_longer_than_the_file() {
    let mut b = B::header(3, 0, 1);
    b.u64(1 << 40).raw(&[b'a'; 16]);
    rejects(&b.done(), Kind::Limit, "over the limit");
    let mut b = B::header(3, 0, 1);
    b.u64(100).raw(&[b'a'; 20]);
    rejects(&b.done(), Kind::Truncated, "key #0");
    let mut b = B::header(3, 0, 1);
    b.str("k").u32(8).u64(1000).raw(b"short");
    rejects(&b.done(), Kind::Truncated, "the value of key 'k'");
}

#[test]
fn rejects_bad_keys() {
    let mut b = B::header(3, 0, 1);
    b.u64(2).raw(&[0xc3, 0x28]).u32(4).u32(0);
    rejects(&b.done(), Kind::Malformed, "not valid UTF-8");
    let mut b = B::header(3, 0, 1);
    b.str("").u32(4).u32(0);
    rejects(&b.done(), Kind::Malformed, "empty");
    let mut b = B::header(3, 0, 2);
    b.kv_u32("a.b", 1).kv_u32("a.b", 2);
    rejects(&b.done(), Kind::Malformed, "duplicate key 'a.b'");
}

#[test]
fn rejects_unknown_value_types() {
    let mut b = B::header(3, 0, 1);
    b.str("k").u32(13).raw(&[0; 8]);
    rejects(&b.done(), Kind::Malformed, "unknown value type 13");
    let mut b = B::header(3, 0, 1);
    b.str("k").u32(9).u32(77).u64(0);
    rejects(&b.done(), Kind::Malformed, "array of unknown value type 77");
}

#[test]
fn rejects_arrays_beyond_the_file_or_caps() {
    let mut b = B::header(3, 0, 1);
    b.str("k").u32(9).u32(4).u64(1000).raw(&[0; 16]);
    rejects(&b.done(), Kind::Truncated, "array of 1000 UINT32");
    let mut b = B::header(3, 0, 1);
    b.str("k").u32(9).u32(8).u64(u64::MAX / 2).raw(&[0; 16]);
    rejects(&b.done(), Kind::Limit, "over the limit");
}

#[test]
fn rejects_deep_nesting() {
    let mut b = B::header(3, 0, 1);
    b.str("k").u32(9);
    for _ in 0..MAX_NESTING {
        b.u32(9).u64(1);
    }
    b.u32(4).u64(0);
    rejects(&b.done(), Kind::Limit, "nested deeper");
    // One level less is fine.
    let mut b = B::header(3, 0, 1);
    b.str("k").u32(9);
    for _ in 0..MAX_NESTING - 1 {
        b.u32(9).u64(1);
    }
    b.u32(4).u64(0);
    parse_ok(&b.done());
}

#[test]
fn rejects_bool_that_is_not_0_or_1() {
    let mut b = B::header(3, 0, 1);
    b.str("k").u32(7).raw(&[2]);
    rejects(&b.done(), Kind::Malformed, "BOOL byte is 2");
    let mut b = B::header(3, 0, 1);
    b.str("k").u32(9).u32(7).u64(3).raw(&[0, 1, 9]);
    rejects(&b.done(), Kind::Malformed, "BOOL byte is 9");
}

#[test]
fn rejects_bad_alignment() {
    let mut b = B::header(3, 0, 1);
    b.str("general.alignment").u32(10).u64(32);
    rejects(&b.done(), Kind::Malformed, "must be a UINT32, found a UINT64");
    let mut b = B::header(3, 0, 1);
    b.kv_u32("general.alignment", 0);
    rejects(&b.done(), Kind::Malformed, "not a non-zero power of two");
    let mut b = B::header(3, 0, 1);
    b.kv_u32("general.alignment", 48);
    rejects(&b.done(), Kind::Malformed, "48");
    // Found by the fuzz target: 2^31 is a valid ggml alignment, but re-planning such a file
    // would allocate a 2 GiB header.
    let mut b = B::header(3, 0, 1);
    b.kv_u32("general.alignment", 1 << 31);
    rejects(&b.done(), Kind::Limit, "over the limit of 16777216");
    let mut b = B::header(3, 0, 1);
    b.kv_u32("general.alignment", 1 << 24);
    parse_ok(&b.done());
}

#[test]
fn rejects_bad_tensor_names() {
    let mut b = B::header(3, 1, 0);
    b.u64(1).raw(&[0x80]).u32(1).u64(4).u32(0).u64(0).data(32, 16);
    rejects(&b.done(), Kind::Malformed, "tensor info #0 at offset 24 is not valid UTF-8");
    let mut b = B::header(3, 2, 0);
    b.tensor("w", &[4], 0, 0).tensor("w", &[4], 0, 32).data(32, 48);
    rejects(&b.done(), Kind::Malformed, "duplicate tensor name 'w' (tensors #0 and #1)");
}

#[test]
fn rejects_too_many_dims() {
    let mut b = B::header(3, 1, 0);
    b.tensor("x", &[1; 9], 0, 0).data(32, 4);
    rejects(&b.done(), Kind::Limit, "9 dimensions");
}

#[test]
fn rejects_negative_dim() {
    let mut b = B::header(3, 1, 0);
    b.tensor("x", &[1 << 63], 0, 0).data(32, 4);
    rejects(&b.done(), Kind::Malformed, "over 2^63 - 1");
}

#[test]
fn rejects_element_count_overflow() {
    let mut b = B::header(3, 1, 0);
    b.tensor("x", &[1 << 32, 1 << 32], 0, 0).data(32, 4);
    rejects(&b.done(), Kind::Malformed, "element count");
}

#[test]
fn zero_element_tensor_with_huge_dims_is_empty_both_ways() {
    // Found by the fuzz target: the product of the other dims overflows, but a zero dim makes
    // the tensor empty (ggml checks the element count only when it is positive). Reader and
    // writer must agree whatever the order of the dims.
    let mut b = B::header(3, 1, 0);
    b.tensor("x", &[0, 1 << 60, 1 << 60, 3], 0, 0).data(32, 0);
    let f = parse_ok(&b.done());
    assert_eq!((f.tensors[0].size, f.tensors[0].numel()), (0, 0));
    assert_round_trip(&f, &b.done());
}

#[test]
fn rejects_byte_size_overflow() {
    // 2^62 elements fit in i64, but 2^62 × 8 bytes does not fit in u64.
    let mut b = B::header(3, 1, 0);
    b.tensor("x", &[1 << 31, 1 << 31], 28, 0).data(32, 4);
    rejects(&b.done(), Kind::Malformed, "byte size");
}

#[test]
fn rejects_unknown_ggml_types() {
    for id in [4u32, 5, 31, 99, u32::MAX] {
        let mut b = B::header(3, 1, 0);
        b.tensor("x", &[32], id, 0).data(32, 64);
        rejects(&b.done(), Kind::Unsupported, &format!("unknown ggml type id {id}"));
    }
}

#[test]
fn rejects_rows_not_a_multiple_of_the_block() {
    let mut b = B::header(3, 1, 0);
    b.tensor("x", &[16, 2], 2, 0).data(32, 64);
    rejects(&b.done(), Kind::Malformed, "rows of 16 elements, not a multiple of the Q4_0 block size 32");
}

#[test]
fn rejects_misaligned_offset() {
    let mut b = B::header(3, 1, 0);
    b.tensor("x", &[4], 0, 8).data(32, 64);
    rejects(&b.done(), Kind::Malformed, "data offset 8 is not a multiple of the alignment 32");
}

#[test]
fn rejects_offset_overflow() {
    let mut b = B::header(3, 1, 0);
    b.tensor("x", &[4], 0, u64::MAX - 31).data(32, 64);
    rejects(&b.done(), Kind::Malformed, "overflows");
}

#[test]
fn rejects_data_beyond_eof() {
    let b = one_tensor().done();
    rejects(&b[..b.len() - 1], Kind::Truncated, "tensor 'w' data is bytes 96..112, past the end of the file (111 bytes)");
    let mut b = B::header(3, 1, 0);
    b.tensor("x", &[4], 0, 0);
    rejects(&b.done(), Kind::Truncated, "data section would start at byte 64");
}

#[test]
fn rejects_overlapping_tensors() {
    let mut b = B::header(3, 2, 0);
    b.tensor("a", &[16], 0, 0).tensor("b", &[4], 0, 32).data(32, 64);
    rejects(&b.done(), Kind::Malformed, "tensors 'a' (bytes 96..160) and 'b' (bytes 128..144) overlap");
}

#[test]
fn every_prefix_of_a_valid_file_is_truncated() {
    let mut b = B::header(3, 2, 3);
    b.kv_u32("general.alignment", 32).str("general.architecture").u32(8).str("wan");
    b.str("arr").u32(9).u32(8).u64(2).str("a").str("bc");
    b.tensor("blocks.0.w", &[32, 2], 8, 0).tensor("patch", &[2, 2, 1, 2, 2], 30, 96).data(32, 96 + 32);
    let full = b.done();
    let f = parse_ok(&full);
    let end_of_data = f.tensors.iter().map(|t| t.offset + t.size).max().unwrap() as usize;
    for cut in 0..end_of_data {
        let e = parse(Path::new(P), &full[..cut]).expect_err("prefix must fail");
        assert_eq!(e.kind(), Kind::Truncated, "cut at {cut}: {e}");
    }
}

/// Flip bytes of a valid file at pseudo-random places: the reader must return, never panic,
/// and whatever it accepts must describe byte ranges inside the file.
#[test]
fn mutated_files_never_panic() {
    let mut b = B::header(3, 2, 2);
    b.kv_u32("general.alignment", 32).str("arr").u32(9).u32(9).u64(1).u32(8).u64(1).str("s");
    b.tensor("a", &[32, 2], 8, 0).tensor("b", &[2, 2, 1, 2, 2], 30, 96).data(32, 160);
    let base = b.done();
    let mut s = 0x1234_5678u32;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        s
    };
    let mut accepted = 0;
    for _ in 0..20_000 {
        let mut m = base.clone();
        for _ in 0..1 + next() % 4 {
            let i = next() as usize % m.len();
            m[i] = match next() % 4 {
                0 => 0xff,
                1 => 0,
                2 => m[i].wrapping_add(1),
                _ => next() as u8,
            };
        }
        if let Ok(f) = parse(Path::new(P), &m) {
            accepted += 1;
            assert_round_trip(&f, &m);
        }
    }
    assert!(accepted > 100, "only {accepted} mutants parsed");
}

/// What the fuzz target (`fuzz/fuzz_targets/gguf_parse.rs`) asserts for every file the reader
/// accepts: its tensors lie inside the file, the writer can re-plan it, the planned file reads
/// back with the same tensors, and re-planning that gives the same header bytes.
fn assert_round_trip(f: &GgufFile, bytes: &[u8]) {
    for t in &f.tensors {
        assert!(t.data(bytes).is_some());
    }
    let plans: Vec<TensorPlan> = f.tensors.iter().map(TensorPlan::from).collect();
    let p = plan(&f.kv, &plans, f.alignment).unwrap_or_else(|e| panic!("re-plan: {e}"));
    let mut file = p.header.clone();
    file.resize(p.total_len as usize, 0);
    let g = parse(Path::new(P), &file).unwrap_or_else(|e| panic!("re-read: {e}"));
    assert_eq!((g.version, g.alignment, g.data_offset), (3, f.alignment, p.header.len() as u64));
    assert_eq!(g.tensors.iter().map(TensorPlan::from).collect::<Vec<_>>(), plans);
    for (t, off) in g.tensors.iter().zip(&p.offsets) {
        assert_eq!(t.offset, g.data_offset + off);
    }
    assert_eq!(plan(&g.kv, &plans, g.alignment).unwrap().header, p.header);
}

// ---------------------------------------------------------------- writer

fn sample_kv() -> Vec<(String, Value)> {
    vec![
        ("general.architecture".into(), Value::from("wan")),
        ("general.file_type".into(), Value::U32(file_type::MOSTLY_BF16)),
        ("comfy.gguf.orig_shape.x".into(), Value::Array(Array::I32(vec![3, 5]))),
        ("nested".into(), Value::Array(Array::Array(vec![Array::Bool(vec![true]), Array::F64(vec![])]))),
    ]
}

fn sample_tensors() -> Vec<TensorPlan> {
    vec![
        TensorPlan { name: "patch_embedding.weight".into(), shape: vec![8, 4, 1, 2, 2], ty: GgmlType::F32 },
        TensorPlan { name: "blocks.0.ffn.0.weight".into(), shape: vec![3, 256], ty: GgmlType::Q4_K },
        TensorPlan { name: "bf".into(), shape: vec![3], ty: GgmlType::BF16 },
        TensorPlan { name: "empty".into(), shape: vec![0], ty: GgmlType::F16 },
    ]
}

#[test]
fn plan_then_parse_round_trip() {
    let kv = sample_kv();
    let ts = sample_tensors();
    let p = plan(&kv, &ts, 32).unwrap();
    assert_eq!(p.header.len() % 32, 0);
    assert_eq!(p.offsets, [0, 512, 512 + 3 * 144 + 16, 512 + 448 + 32]);
    assert_eq!(p.sizes, [512, 432, 6, 0]);
    assert_eq!(p.total_len, p.header.len() as u64 + 512 + 448 + 32);
    let mut file = Vec::new();
    write_all(Path::new("out.gguf"), &mut file, &p, |i, w| {
        use std::io::Write;
        w.write_all(&vec![i as u8 + 1; p.sizes[i] as usize]).unwrap();
        Ok(())
    })
    .unwrap();
    assert_eq!(file.len() as u64, p.total_len);
    let f = parse_ok(&file);
    assert_eq!(f.version, 3);
    assert_eq!(f.data_offset, p.header.len() as u64);
    let mut want_kv = kv.clone();
    want_kv.push(("general.alignment".into(), Value::U32(32)));
    assert_eq!(f.kv, want_kv);
    assert_eq!(f.tensors.iter().map(TensorPlan::from).collect::<Vec<_>>(), ts);
    for (i, t) in f.tensors.iter().enumerate() {
        assert_eq!(t.offset, f.data_offset + p.offsets[i]);
        assert!(t.data(&file).unwrap().iter().all(|&b| b == i as u8 + 1));
    }
    assert_eq!(f.orig_shape("x"), Some(vec![3, 5]));
    assert_eq!(f.architecture(), Some("wan"));
    // Re-planning what was read gives the same header.
    let p2 = plan(&f.kv, &ts, f.alignment).unwrap();
    assert_eq!(p2.header, p.header);
}

#[test]
fn plan_with_explicit_alignment_key() {
    let kv = vec![("general.alignment".into(), Value::U32(64))];
    let p = plan(&kv, &sample_tensors(), 64).unwrap();
    let mut file = p.header.clone();
    file.resize(p.total_len as usize, 0);
    let f = parse_ok(&file);
    assert_eq!((f.alignment, f.kv.len()), (64, 1));
    let e = plan(&kv, &[], 32).unwrap_err();
    assert_eq!(e.kind(), Kind::Unsupported);
    let e = plan(&[("general.alignment".into(), Value::U64(32))], &[], 32).unwrap_err();
    assert_eq!(e.kind(), Kind::Unsupported);
}

#[test]
fn plan_rejections() {
    let t = |name: &str, shape: Vec<u64>, ty| TensorPlan { name: name.into(), shape, ty };
    type Case = (Vec<(String, Value)>, Vec<TensorPlan>, u64, Kind, &'static str);
    let cases: Vec<Case> = vec![
        (vec![], vec![], 0, Kind::Unsupported, "power of two"),
        (vec![], vec![], 24, Kind::Unsupported, "power of two"),
        (vec![], vec![], 1 << 25, Kind::Unsupported, "power of two"),
        (vec![("".into(), Value::U8(1))], vec![], 32, Kind::Unsupported, "empty"),
        (vec![("a".into(), Value::U8(1)), ("a".into(), Value::U8(2))], vec![], 32, Kind::Inconsistent, "duplicate GGUF key"),
        (vec![], vec![t("x", vec![1], GgmlType::F32), t("x", vec![1], GgmlType::F32)], 32, Kind::Inconsistent, "duplicate tensor"),
        (vec![], vec![t("x", vec![1; 9], GgmlType::F32)], 32, Kind::Unsupported, "9 dimensions"),
        (vec![], vec![t("x", vec![2, 100], GgmlType::Q4_K)], 32, Kind::Unsupported, "rows of 100 elements"),
        (vec![], vec![t("x", vec![1 << 32, 1 << 32], GgmlType::F32)], 32, Kind::Unsupported, "too many elements"),
    ];
    for (i, (kv, ts, align, kind, needle)) in cases.into_iter().enumerate() {
        let e = plan(&kv, &ts, align).expect_err(&format!("case {i}"));
        assert_eq!(e.kind(), kind, "case {i}: {e}");
        assert!(e.to_string().contains(needle), "case {i}: {e}");
    }
    let mut deep = Array::U8(vec![]);
    for _ in 0..MAX_NESTING {
        deep = Array::Array(vec![deep]);
    }
    let e = plan(&[("k".into(), Value::Array(deep))], &[], 32).unwrap_err();
    assert!(e.to_string().contains("nested deeper"), "{e}");
}

#[test]
fn write_all_checks_byte_counts() {
    let p = plan(&[], &[TensorPlan { name: "x".into(), shape: vec![4], ty: GgmlType::F32 }], 32).unwrap();
    let mut out = Vec::new();
    let e = write_all(Path::new("o"), &mut out, &p, |_, w| {
        use std::io::Write;
        w.write_all(&[0; 8]).map_err(|e| crate::Error::io("o", e))
    })
    .unwrap_err();
    assert_eq!(e.kind(), Kind::Internal);
    assert!(e.to_string().contains("8 of its 16 bytes"), "{e}");
    let mut out = Vec::new();
    let e = write_all(Path::new("o"), &mut out, &p, |_, w| {
        use std::io::Write;
        w.write_all(&[0; 20]).map_err(|e| crate::Error::io("o", e))
    })
    .unwrap_err();
    assert!(e.to_string().contains("20 bytes written to a tensor with 16 bytes left"), "{e}");
}

#[test]
fn padding_writes_zeros() {
    let mut v = vec![1u8];
    write_padding(&mut v, 10_000).unwrap();
    assert_eq!(v.len(), 10_001);
    assert!(v[1..].iter().all(|&b| b == 0));
}
