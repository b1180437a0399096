//! The quantisation kernels against references.
//!
//! - gguf-py (PyPI `gguf`, with numpy): our blocks must be byte-identical to
//!   `gguf.quants.quantize` for every type it can quantise, and our dequantised values bit-equal
//!   to `gguf.quants.dequantize` (on its blocks, on ours, and on random bytes). Skipped, with a
//!   message, when `python3 -c 'import gguf'` fails.
//! - ggml's C reference (`quantize_row_*_ref`), when `PHASEKIT_GGML_QUANTS_LIB` names a shared
//!   library built from ggml's `src/ggml-quants.c` (recipe in `docs/gguf.md`): our K-quant
//!   blocks must be byte-identical.
//! - Golden SHA-256 digests of our blocks for the same inputs, recorded when the two checks
//!   above passed, so that a change to a kernel shows up without python or a C compiler.
//!
//! The Python side is `tests/py/quant_oracle.py`.

use std::path::Path;
use std::process::Command;

use phasekit::quant::{self, GgmlType};
use sha2::{Digest, Sha256};

const COLS: usize = 512;
const ROWS: usize = 8;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    /// Roughly normal, mean 0, deviation about 0.58.
    fn normal(&mut self) -> f32 {
        (self.uniform() + self.uniform() + self.uniform()) * 0.5
    }
}

/// Named inputs of ROWS × COLS values. `signed_zero_min` marks inputs whose blocks may have a
/// minimum of zero with both signs present (numpy's tie-break there depends on the CPU).
fn inputs() -> Vec<(&'static str, Vec<f32>, bool)> {
    let n = ROWS * COLS;
    let mut r = Rng(0x5eed);
    let mut v: Vec<(&'static str, Vec<f32>, bool)> = Vec::new();
    v.push(("uniform", (0..n).map(|_| r.uniform()).collect(), false));
    v.push(("weights", (0..n).map(|_| r.normal() * 0.02).collect(), false));
    let mut out: Vec<f32> = (0..n).map(|_| r.normal() * 0.05).collect();
    for i in (0..n).step_by(97) {
        out[i] *= 60.0;
    }
    v.push(("outliers", out, false));
    v.push(("positive", (0..n).map(|_| r.normal().abs() + 0.01).collect(), false));
    v.push(("negative", (0..n).map(|_| -r.normal().abs()).collect(), false));
    v.push(("tiny", (0..n).map(|_| r.normal() * 1e-6).collect(), false));
    v.push(("subnormal", (0..n).map(|_| r.normal() * 1e-40).collect(), false));
    v.push(("large", (0..n).map(|_| r.normal() * 3e4).collect(), false));
    v.push(("quantized_grid", (0..n).map(|_| ((r.next() % 31) as f32 - 15.0) * 0.125).collect(), false));
    // Blocks of every kind of degenerate content, 32 values each.
    let mut z = vec![0f32; n];
    for (b, chunk) in z.chunks_mut(32).enumerate() {
        match b % 8 {
            0 => {}                                        // all +0
            1 => chunk.iter_mut().for_each(|x| *x = 0.75), // constant
            2 => chunk[b % 32] = -3.0,                     // one nonzero
            3 => chunk.iter_mut().for_each(|x| *x = -0.0), // all -0
            4 => chunk.iter_mut().enumerate().for_each(|(i, x)| *x = if i % 2 == 0 { 1.0 } else { -1.0 }),
            5 => chunk.iter_mut().for_each(|x| *x = r.uniform() * 1e-3),
            6 => chunk.iter_mut().for_each(|x| *x = 65504.0 * r.uniform()),
            _ => chunk.iter_mut().for_each(|x| *x = if r.next() % 3 == 0 { 0.0 } else { r.uniform() }),
        }
    }
    v.push(("degenerate", z, false));
    let mut s: Vec<f32> = (0..n).map(|_| r.normal()).collect();
    for (b, chunk) in s.chunks_mut(32).enumerate() {
        let i = (b * 7) % 32;
        match b % 6 {
            0 => chunk[i] = f32::NAN,
            1 => chunk[i] = f32::INFINITY,
            2 => chunk[i] = f32::NEG_INFINITY,
            3 => chunk[i] = -0.0,
            4 => chunk[i] = 1e-45,
            _ => {}
        }
    }
    v.push(("specials", s, true));
    v
}

const EXACT_QUANT: [GgmlType; 8] =
    [GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0];
const K_QUANT: [GgmlType; 5] = [GgmlType::Q2_K, GgmlType::Q3_K, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K];

fn quantized(t: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut q = vec![0u8; x.len() / t.block_size() as usize * t.type_size() as usize];
    quant::quantize(t, x, &mut q).unwrap();
    q
}

fn dequantized(t: GgmlType, q: &[u8]) -> Vec<f32> {
    let mut y = vec![0f32; q.len() / t.type_size() as usize * t.block_size() as usize];
    quant::dequantize(t, q, &mut y).unwrap();
    y
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn f32_from(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Bit-equal, except that any NaN matches any NaN (Rust does not promise NaN payloads
/// through arithmetic).
#[track_caller]
fn assert_same_f32(ours: &[f32], theirs: &[f32], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths");
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        let same = a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        assert!(same, "{what}: value {i}: ours {a:e} ({:#010x}), reference {b:e} ({:#010x})", a.to_bits(), b.to_bits());
    }
}

#[track_caller]
fn assert_same_blocks(t: GgmlType, ours: &[u8], theirs: &[u8], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths");
    let ts = t.type_size() as usize;
    let bad: Vec<usize> = ours.chunks(ts).zip(theirs.chunks(ts)).enumerate().filter(|(_, (a, b))| a != b).map(|(i, _)| i).collect();
    if let Some(&i) = bad.first() {
        panic!(
            "{what}: {} of {} blocks differ; first is block {i}:\n ours   {:02x?}\n theirs {:02x?}",
            bad.len(),
            ours.len() / ts,
            &ours[i * ts..(i + 1) * ts],
            &theirs[i * ts..(i + 1) * ts]
        );
    }
}

fn have_gguf_py() -> bool {
    let ok = Command::new("python3").args(["-c", "import gguf, numpy"]).output().map(|o| o.status.success()).unwrap_or(false);
    if !ok {
        eprintln!("skipped: python3/gguf not available");
    }
    ok
}

struct Job {
    op: &'static str,
    ty: GgmlType,
    input: String,
    output: String,
}

/// Run the oracle over `jobs` in `dir`; returns the status of each output.
fn run_oracle(dir: &Path, jobs: &[Job], ggml_lib: Option<&str>) -> serde_json::Value {
    let list: Vec<serde_json::Value> = jobs
        .iter()
        .map(|j| serde_json::json!({"op": j.op, "type": j.ty.name(), "cols": COLS, "input": j.input, "output": j.output}))
        .collect();
    std::fs::write(dir.join("jobs.json"), serde_json::to_vec(&list).unwrap()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/quant_oracle.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script).arg(dir);
    if let Some(lib) = ggml_lib {
        cmd.args(["--ggml-lib", lib]);
    }
    let out = cmd.output().expect("run python3");
    assert!(out.status.success(), "quant_oracle.py failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&std::fs::read(dir.join("status.json")).unwrap()).unwrap()
}

#[test]
fn quantize_matches_gguf_py_byte_for_byte() {
    if !have_gguf_py() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut jobs = Vec::new();
    let cases = inputs();
    for (name, x, _) in &cases {
        std::fs::write(dir.path().join(format!("{name}.f32")), f32_bytes(x)).unwrap();
        for t in EXACT_QUANT.iter().chain(&K_QUANT) {
            jobs.push(Job { op: "quantize", ty: *t, input: format!("{name}.f32"), output: format!("{name}.{t}.q") });
        }
    }
    let status = run_oracle(dir.path(), &jobs, None);
    let mut compared = 0;
    for (name, x, signed_zero_min) in &cases {
        for t in EXACT_QUANT.iter().chain(&K_QUANT) {
            let out = format!("{name}.{t}.q");
            let st = status[&out].as_str().unwrap();
            if K_QUANT.contains(t) {
                // gguf-py 0.19.0 has no K-quant quantiser; if a later one gains one, use it.
                if st != "ok" {
                    continue;
                }
            } else {
                assert_eq!(st, "ok", "{out}");
            }
            if *signed_zero_min && matches!(t, GgmlType::Q4_1 | GgmlType::Q5_1) {
                continue;
            }
            let theirs = std::fs::read(dir.path().join(&out)).unwrap();
            assert_same_blocks(*t, &quantized(*t, x), &theirs, &out);
            compared += 1;
        }
    }
    assert!(compared >= EXACT_QUANT.len() * (cases.len() - 1));
}

#[test]
fn dequantize_matches_gguf_py_bit_for_bit() {
    if !have_gguf_py() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut jobs = Vec::new();
    let mut ours = Vec::new();
    let types: Vec<GgmlType> = EXACT_QUANT.iter().chain(&K_QUANT).copied().collect();
    let mut r = Rng(0xb10c);
    for t in &types {
        // Our blocks of every input, and blocks of random bytes (every bit pattern of scales
        // and levels, including NaN and infinite scales).
        let mut blocks = Vec::new();
        for (_, x, _) in inputs() {
            blocks.extend(quantized(*t, &x));
        }
        blocks.extend((0..ROWS * COLS / t.block_size() as usize * t.type_size() as usize).map(|_| r.next() as u8));
        let input = format!("{t}.blocks");
        std::fs::write(dir.path().join(&input), &blocks).unwrap();
        jobs.push(Job { op: "dequantize", ty: *t, input, output: format!("{t}.deq") });
        ours.push((*t, dequantized(*t, &blocks)));
    }
    let status = run_oracle(dir.path(), &jobs, None);
    for (t, y) in ours {
        let out = format!("{t}.deq");
        assert_eq!(status[&out], "ok", "{out}");
        let theirs = f32_from(&std::fs::read(dir.path().join(&out)).unwrap());
        assert_same_f32(&y, &theirs, &out);
    }
}

/// Our K-quant blocks against ggml's C `quantize_row_*_ref`, and Q8_K/K-quant dequantisation
/// against ggml's `dequantize_row_*`. Needs `PHASEKIT_GGML_QUANTS_LIB`.
#[test]
fn k_quants_match_ggml_reference() {
    let Some(lib) = std::env::var_os("PHASEKIT_GGML_QUANTS_LIB") else {
        eprintln!("skipped: PHASEKIT_GGML_QUANTS_LIB is not set (see docs/gguf.md)");
        return;
    };
    if !have_gguf_py() {
        return;
    }
    let lib = lib.to_string_lossy().into_owned();
    let dir = tempfile::tempdir().unwrap();
    let cases = inputs();
    let mut jobs = Vec::new();
    let all: Vec<GgmlType> = K_QUANT.iter().chain(&EXACT_QUANT[3..]).copied().collect();
    for (name, x, _) in &cases {
        std::fs::write(dir.path().join(format!("{name}.f32")), f32_bytes(x)).unwrap();
        for t in &all {
            jobs.push(Job { op: "ggml_quantize", ty: *t, input: format!("{name}.f32"), output: format!("{name}.{t}.c") });
        }
    }
    let mut r = Rng(0xc0de);
    let q8k: Vec<u8> = (0..ROWS * COLS / 256 * 292).map(|_| r.next() as u8).collect();
    std::fs::write(dir.path().join("q8k.blocks"), &q8k).unwrap();
    jobs.push(Job { op: "ggml_dequantize", ty: GgmlType::Q8_K, input: "q8k.blocks".into(), output: "q8k.deq".into() });
    let status = run_oracle(dir.path(), &jobs, Some(&lib));
    for (name, x, _) in &cases {
        for t in &all {
            let out = format!("{name}.{t}.c");
            assert_eq!(status[&out], "ok", "{out}");
            let theirs = std::fs::read(dir.path().join(&out)).unwrap();
            if EXACT_QUANT.contains(t) && matches!(*name, "specials" | "degenerate") {
                // gguf-py is the reference for these types, and it parts from ggml's C on
                // all-(-0.0) blocks (numpy's argmax picks -0.0 as the "max", ggml keeps +0.0, so
                // the f16 scale is +0 vs -0) and on NaN/inf (C casts them to integers
                // differently).
                continue;
            }
            assert_same_blocks(*t, &quantized(*t, x), &theirs, &out);
        }
    }
    assert_eq!(status["q8k.deq"], "ok");
    let theirs = f32_from(&std::fs::read(dir.path().join("q8k.deq")).unwrap());
    assert_same_f32(&dequantized(GgmlType::Q8_K, &q8k), &theirs, "Q8_K");
}

/// SHA-256 of our blocks for every input, recorded when the comparisons above passed (gguf-py
/// 0.19.0 for the legacy types, ggml `d99724f` built with `-ffp-contract=off` for the K-quants).
#[test]
fn golden_digests() {
    let golden: &[(GgmlType, &str)] = &[
        (GgmlType::F16, "648e3a6449437ff60d9104ac33c8e235ccbb1f22760f2dc3cb8a645b12066bab"),
        (GgmlType::BF16, "86854d19298752e226b8d173ae325c647201664505acf6a6d9bd41e5ca5276b6"),
        (GgmlType::Q4_0, "19e55695748e37337b9cb8ddaeaff3b78d8b1b2274542237ddeeafbab2fceb1c"),
        (GgmlType::Q4_1, "e42847e7ec091497c8fd4c1d50ee625edb95a45a9e668e3c44756c50be60095e"),
        (GgmlType::Q5_0, "888c43af05a779e4ab4abb439a239b6fc909ce3a1829f5f292e4aed2938d4610"),
        (GgmlType::Q5_1, "31048975318a5caef86c5f00c4ca8aee11633116140a04b43af4be2ba1e2355f"),
        (GgmlType::Q8_0, "983f135c3d6bcba0b40fd984d1d8c6841c05d9f41d5c8d5d3674652a9d00cf92"),
        (GgmlType::Q2_K, "cfbc53d697a36fd893f967481bc84d1e9ae827c994031c460951fda6e773f58c"),
        (GgmlType::Q3_K, "73c75bce4636e95255331f0e3208eb1357ed43d2d2e3c4b46fec8fe1d6a37f3e"),
        (GgmlType::Q4_K, "73ae918583baed14d5c8503e35e84479338465d49d4c86c6b49a6da42832b822"),
        (GgmlType::Q5_K, "776c7ef415c17647a718312cea41e3d335b53776c4ea684adc387aa348e56d34"),
        (GgmlType::Q6_K, "7b80becafcc1b35e9c62dc8f93a24f29eaa9d9cfddfa120328011b7863a50976"),
    ];
    let cases = inputs();
    let mut report = String::new();
    let mut bad = Vec::new();
    for (t, want) in golden {
        let mut h = Sha256::new();
        for (_, x, _) in &cases {
            h.update(quantized(*t, x));
        }
        let got: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        report.push_str(&format!("        (GgmlType::{t}, \"{got}\"),\n"));
        if got != *want {
            bad.push(t.name());
        }
    }
    assert!(bad.is_empty(), "digests differ for {bad:?}; now:\n{report}");
}
