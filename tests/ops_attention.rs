//! `phasekit::ops::attention` against plain `softmax(QKᵀ/√D)·V` computed here in f64 (the whole
//! score matrix, written independently of the op), values and the gradients of Q, K and V,
//! through both portable paths (the tiled CPU one and the chunked candle composition, with small
//! chunks so that every case crosses chunk edges).

use candle_core::{DType, Device, Tensor, Var};
use phasekit::ops::attention::{attention, attention_opts, attention_with, Options, Path};

/// Deterministic values in [-1, 1).
fn pseudo(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9e3779b97f4a7c15) ^ 0x2545f4914f6cdd1d;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect()
}

/// Reference results, all `[B, S, H, D]` / `[B, H, Sq]` row-major.
struct Reference {
    o: Vec<f64>,
    lse: Vec<f64>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
}

/// f64 attention with the full score matrix: `S = QKᵀ/√D` (−∞ for dropped keys), `P = softmax(S)`,
/// `O = PV`; gradients for the loss `Σ O ∘ G`: `dV = PᵀG`, `dP = GVᵀ`,
/// `dS = P ∘ (dP − rowsum(P ∘ dP))`, `dQ = dS·K/√D`, `dK = dSᵀ·Q/√D`. A row with every key
/// dropped has output 0, log-sum-exp +∞ and no gradient.
#[allow(clippy::too_many_arguments)]
fn reference(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    g: &[f64],
    keep: Option<&[bool]>,
    (b, sq, sk, h, d): (usize, usize, usize, usize, usize),
) -> Reference {
    let at = |s: usize, bi: usize, i: usize, hi: usize| ((bi * s + i) * h + hi) * d;
    let scale = 1.0 / (d as f64).sqrt();
    let mut r = Reference {
        o: vec![0.0; b * sq * h * d],
        lse: vec![0.0; b * h * sq],
        dq: vec![0.0; q.len()],
        dk: vec![0.0; k.len()],
        dv: vec![0.0; v.len()],
    };
    for bi in 0..b {
        for hi in 0..h {
            // P [sq][sk]
            let mut p = vec![vec![0.0; sk]; sq];
            for i in 0..sq {
                let s: Vec<f64> = (0..sk)
                    .map(|j| {
                        if keep.is_some_and(|kp| !kp[bi * sk + j]) {
                            return f64::NEG_INFINITY;
                        }
                        (0..d).map(|c| q[at(sq, bi, i, hi) + c] * k[at(sk, bi, j, hi) + c]).sum::<f64>() * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    r.lse[(bi * h + hi) * sq + i] = f64::INFINITY;
                    continue;
                }
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                r.lse[(bi * h + hi) * sq + i] = m + z.ln();
                for j in 0..sk {
                    p[i][j] = (s[j] - m).exp() / z;
                }
            }
            for i in 0..sq {
                for j in 0..sk {
                    for c in 0..d {
                        r.o[at(sq, bi, i, hi) + c] += p[i][j] * v[at(sk, bi, j, hi) + c];
                        r.dv[at(sk, bi, j, hi) + c] += p[i][j] * g[at(sq, bi, i, hi) + c];
                    }
                }
                let dp: Vec<f64> = (0..sk).map(|j| (0..d).map(|c| g[at(sq, bi, i, hi) + c] * v[at(sk, bi, j, hi) + c]).sum()).collect();
                let pdp: f64 = (0..sk).map(|j| p[i][j] * dp[j]).sum();
                for j in 0..sk {
                    let ds = p[i][j] * (dp[j] - pdp);
                    for c in 0..d {
                        r.dq[at(sq, bi, i, hi) + c] += ds * k[at(sk, bi, j, hi) + c] * scale;
                        r.dk[at(sk, bi, j, hi) + c] += ds * q[at(sq, bi, i, hi) + c] * scale;
                    }
                }
            }
        }
    }
    r
}

/// ‖got − want‖ / ‖want‖, with ‖want‖ floored at an RMS of 1e-2 (inputs are O(1)): a reference that is zero up
/// to rounding (Q and K get no gradient when there is one key) is compared absolutely.
fn rel_l2(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    assert!(got.iter().all(|x| x.is_finite()), "non-finite value in the result");
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den.max(1e-4 * want.len() as f64)).sqrt()
}

fn vals(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// Round-trips values through `dt` (so that the reference sees what the op sees).
fn rounded(x: &[f64], dt: DType) -> Vec<f64> {
    vals(&Tensor::new(x, &Device::Cpu).unwrap().to_dtype(dt).unwrap())
}

struct Case {
    name: &'static str,
    dims: (usize, usize, usize, usize, usize),
    mask: Option<Vec<bool>>,
    /// Pass q as a transposed `[B, H, S, D]` tensor (non-contiguous `[B, S, H, D]` view).
    strided_q: bool,
}

/// Runs `case` through `opts` in `dt` and returns (rel L2 of o, lse, dq, dk, dv).
fn run(case: &Case, dt: DType, opts: &Options) -> [f64; 5] {
    let (b, sq, sk, h, d) = case.dims;
    let seed = (sq * 31 + sk * 7 + d) as u64;
    let q = rounded(&pseudo(b * sq * h * d, seed), dt);
    let k = rounded(&pseudo(b * sk * h * d, seed + 1), dt);
    // Values with an offset, so that outputs are not centred on zero.
    let v = rounded(&pseudo(b * sk * h * d, seed + 2).iter().map(|x| x + 0.3).collect::<Vec<_>>(), dt);
    let g = rounded(&pseudo(b * sq * h * d, seed + 3), dt);
    let want = reference(&q, &k, &v, &g, case.mask.as_deref(), case.dims);

    let dev = Device::Cpu;
    let qv = if case.strided_q {
        // Stored as [B, H, S, D], seen as [B, S, H, D].
        let mut bhsd = vec![0.0; q.len()];
        for bi in 0..b {
            for i in 0..sq {
                for hi in 0..h {
                    for c in 0..d {
                        bhsd[((bi * h + hi) * sq + i) * d + c] = q[((bi * sq + i) * h + hi) * d + c];
                    }
                }
            }
        }
        Var::from_tensor(&Tensor::from_vec(bhsd, (b, h, sq, d), &dev).unwrap().to_dtype(dt).unwrap()).unwrap()
    } else {
        Var::from_tensor(&Tensor::from_vec(q, (b, sq, h, d), &dev).unwrap().to_dtype(dt).unwrap()).unwrap()
    };
    let q_in = if case.strided_q { qv.as_tensor().transpose(1, 2).unwrap() } else { qv.as_tensor().clone() };
    assert_eq!(q_in.dims(), [b, sq, h, d]);
    let kv = Var::from_tensor(&Tensor::from_vec(k, (b, sk, h, d), &dev).unwrap().to_dtype(dt).unwrap()).unwrap();
    let vv = Var::from_tensor(&Tensor::from_vec(v, (b, sk, h, d), &dev).unwrap().to_dtype(dt).unwrap()).unwrap();
    let gt = Tensor::from_vec(g, (b, sq, h, d), &dev).unwrap().to_dtype(dt).unwrap();
    let mask = case.mask.as_ref().map(|m| Tensor::from_vec(m.iter().map(|&x| x as u8).collect::<Vec<u8>>(), (b, sk), &dev).unwrap());

    let (o, lse) = attention_opts(&q_in, kv.as_tensor(), vv.as_tensor(), mask.as_ref(), opts).unwrap();
    assert_eq!(o.dims(), [b, sq, h, d]);
    assert_eq!(o.dtype(), dt);
    assert_eq!(lse.dims(), [b, h, sq]);
    let wide = if dt == DType::F64 { DType::F64 } else { DType::F32 };
    let grads = (o.to_dtype(wide).unwrap() * gt.to_dtype(wide).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
    let mut dq = vals(grads.get(qv.as_tensor()).unwrap());
    if case.strided_q {
        let t = Tensor::from_vec(dq, (b, h, sq, d), &dev).unwrap().transpose(1, 2).unwrap();
        dq = vals(&t.contiguous().unwrap());
    }
    let dk = vals(grads.get(kv.as_tensor()).unwrap());
    let dv = vals(grads.get(vv.as_tensor()).unwrap());

    // Log-sum-exp: same +∞ rows, finite rows compared.
    let got_lse = vals(&lse);
    for (i, (a, w)) in got_lse.iter().zip(&want.lse).enumerate() {
        assert_eq!(a.is_infinite(), w.is_infinite(), "{}: lse row {i}: {a} vs {w}", case.name);
    }
    let fin = |x: &[f64]| x.iter().map(|v| if v.is_finite() { *v } else { 0.0 }).collect::<Vec<_>>();
    [
        rel_l2(&vals(&o), &want.o),
        rel_l2(&fin(&got_lse), &fin(&want.lse)),
        rel_l2(&dq, &want.dq),
        rel_l2(&dk, &want.dk),
        rel_l2(&dv, &want.dv),
    ]
}

fn cases() -> Vec<Case> {
    let (b, sk) = (2, 200);
    // Batch 0 drops every third key, batch 1 drops all keys: every row of batch 1 is fully masked.
    let partial: Vec<bool> = (0..b * sk).map(|i| if i < sk { i % 3 != 1 } else { false }).collect();
    let joint = 80 + 40;
    // Joint attention as Qwen-Image does it: 40 prompt tokens (the last 13 padded in batch 0, 5
    // in batch 1) followed by 80 image tokens that are always kept.
    let qwen: Vec<bool> = (0..2 * joint).map(|i| i % joint >= 40 || i % joint < if i < joint { 27 } else { 35 }).collect();
    vec![
        // Self-attention, several heads, S not a multiple of any tile, D not a multiple of 8.
        Case { name: "self", dims: (2, 150, 150, 3, 40), mask: None, strided_q: false },
        // Cross-attention (Sq ≠ Sk) with a partial mask and fully masked rows.
        Case { name: "cross+mask", dims: (b, 70, sk, 2, 64), mask: Some(partial), strided_q: false },
        Case { name: "joint", dims: (2, joint, joint, 2, 32), mask: Some(qwen), strided_q: true },
        Case { name: "one key", dims: (1, 5, 1, 1, 8), mask: None, strided_q: false },
    ]
}

fn check(dt: DType, path: Path, chunks: (usize, usize), bound: [f64; 5]) {
    for case in cases() {
        let errs = run(&case, dt, &Options { path, chunks });
        eprintln!("{} {dt:?} {path:?}: rel L2 o, lse, dq, dk, dv = {}", case.name, errs.map(|e| format!("{e:.1e}")).join(", "));
        for (e, (what, b)) in errs.iter().zip(["o", "lse", "dq", "dk", "dv"].iter().zip(bound)) {
            assert!(*e <= b, "{} {dt:?} {path:?}: {what} rel L2 {e:.3e} > {b:.0e} (all: {errs:?})", case.name);
        }
    }
}

// f32 arithmetic: measured ≤ 4e-7 (3.7e-6 on the one-key case, where dQ and dK are 0 up to
// rounding); 1e-5 is the model parity tests' bound.
#[test]
fn f32_cpu_path_matches_f64_reference() {
    check(DType::F32, Path::Cpu, (1024, 1024), [1e-5; 5]);
}

#[test]
fn f32_chunked_path_matches_f64_reference() {
    check(DType::F32, Path::Chunked, (48, 56), [1e-5; 5]);
}

#[test]
fn f64_both_paths_match_f64_reference() {
    check(DType::F64, Path::Cpu, (1024, 1024), [1e-12; 5]);
    check(DType::F64, Path::Chunked, (32, 64), [1e-12; 5]);
}

// bf16 inputs and outputs (8-bit mantissa, relative rounding 2⁻⁹ ≈ 2e-3 per element), f32
// arithmetic: the reference sees the same rounded inputs, so what is left is the rounding of
// the outputs and gradients to bf16; bound 5e-3 (measured ≤ 2.0e-3). lse stays f32: 1e-5.
#[test]
fn bf16_inputs_within_bound() {
    let b = [5e-3, 1e-5, 5e-3, 5e-3, 5e-3];
    check(DType::BF16, Path::Cpu, (1024, 1024), b);
    check(DType::BF16, Path::Chunked, (48, 56), b);
}

// f16: 11-bit mantissa, rounding 2⁻¹² ≈ 2.4e-4; bound 1e-3 (measured ≤ 2.5e-4).
#[test]
fn f16_inputs_within_bound() {
    let b = [1e-3, 1e-5, 1e-3, 1e-3, 1e-3];
    check(DType::F16, Path::Cpu, (1024, 1024), b);
}

#[test]
fn fully_masked_rows_are_zero_with_zero_gradients() {
    let dev = Device::Cpu;
    let (b, sq, sk, h, d) = (2, 3, 5, 2, 4);
    for path in [Path::Cpu, Path::Chunked] {
        let q = Var::from_tensor(&Tensor::from_vec(pseudo(b * sq * h * d, 1), (b, sq, h, d), &dev).unwrap()).unwrap();
        let k = Var::from_tensor(&Tensor::from_vec(pseudo(b * sk * h * d, 2), (b, sk, h, d), &dev).unwrap()).unwrap();
        let v = Var::from_tensor(&Tensor::from_vec(pseudo(b * sk * h * d, 3), (b, sk, h, d), &dev).unwrap()).unwrap();
        // Batch 1 keeps nothing.
        let mask = Tensor::from_vec(vec![1f32, 0., 1., 1., 0., 0., 0., 0., 0., 0.], (b, sk), &dev).unwrap();
        let (o, lse) = attention_with(q.as_tensor(), k.as_tensor(), v.as_tensor(), Some(&mask), path).unwrap();
        let o1 = vals(&o.narrow(0, 1, 1).unwrap());
        assert!(o1.iter().all(|&x| x == 0.0), "{path:?}: {o1:?}");
        assert!(vals(&lse.narrow(0, 1, 1).unwrap()).iter().all(|&x| x == f64::INFINITY));
        assert!(vals(&o).iter().all(|x| x.is_finite()));
        let g = o.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let dq = vals(&g.get(q.as_tensor()).unwrap().narrow(0, 1, 1).unwrap());
        assert!(dq.iter().all(|&x| x == 0.0), "{path:?}: {dq:?}");
        // Dropped keys get no gradient: batch 1 entirely, batch 0 keys 1 and 4.
        let dk = g.get(k.as_tensor()).unwrap();
        let dv = g.get(v.as_tensor()).unwrap();
        for t in [&dk, &dv] {
            assert!(vals(&t.narrow(0, 1, 1).unwrap()).iter().all(|&x| x == 0.0));
            for j in [1, 4] {
                assert!(vals(&t.narrow(0, 0, 1).unwrap().narrow(1, j, 1).unwrap()).iter().all(|&x| x == 0.0));
            }
            assert!(vals(&t.narrow(0, 0, 1).unwrap().narrow(1, 0, 1).unwrap()).iter().any(|&x| x != 0.0));
        }
    }
}

#[test]
fn paths_agree_and_inference_builds_no_graph() {
    let dev = Device::Cpu;
    let (b, sq, sk, h, d) = (1, 40, 33, 2, 16);
    let q = Tensor::from_vec(pseudo(b * sq * h * d, 7), (b, sq, h, d), &dev).unwrap();
    let k = Tensor::from_vec(pseudo(b * sk * h * d, 8), (b, sk, h, d), &dev).unwrap();
    let v = Tensor::from_vec(pseudo(b * sk * h * d, 9), (b, sk, h, d), &dev).unwrap();
    let a = attention(&q, &k, &v, None).unwrap();
    let (c, _) = attention_opts(&q, &k, &v, None, &Options { path: Path::Chunked, chunks: (16, 8) }).unwrap();
    assert!(!a.track_op() && !c.track_op());
    assert!(rel_l2(&vals(&a), &vals(&c)) < 1e-6);
}

#[test]
fn bad_inputs_are_errors() {
    let dev = Device::Cpu;
    let t = |s: &[usize]| Tensor::zeros(s, DType::F32, &dev).unwrap();
    let q = t(&[1, 4, 2, 8]);
    let k = t(&[1, 6, 2, 8]);
    assert!(attention(&t(&[4, 2, 8]), &k, &k, None).unwrap_err().to_string().contains("[B, S, H, D]"));
    assert!(attention(&q, &t(&[1, 6, 3, 8]), &t(&[1, 6, 3, 8]), None).is_err());
    assert!(attention(&q, &k, &t(&[1, 5, 2, 8]), None).is_err());
    assert!(attention(&q, &k, &k.to_dtype(DType::BF16).unwrap(), None).is_err());
    assert!(attention(&q, &k, &k, Some(&t(&[1, 4]))).unwrap_err().to_string().contains("[B, Sk]"));
    assert!(attention(&t(&[1, 0, 2, 8]), &k, &k, None).is_err());
    let fused = attention_with(&q, &k, &k, None, Path::Fused).unwrap_err().to_string();
    assert!(fused.contains("fused path needs CUDA"), "{fused}");
    assert!(attention_opts(&q, &k, &k, None, &Options { path: Path::Chunked, chunks: (0, 4) }).is_err());
}
