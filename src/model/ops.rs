//! Operators the two teachers share, written to compute what diffusers computes (including
//! which steps run in float32), from candle primitives that all have a backward pass.

use candle_core::{DType, Result, Tensor, D};

/// The dtype precision-sensitive steps run in: f32, or f64 for an f64 model (a reference mode).
pub fn wide(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `x` in [`wide`] precision.
pub fn widen(x: &Tensor) -> Result<Tensor> {
    x.to_dtype(wide(x.dtype()))
}

/// RMSNorm over the last dimension, computed in f32: `x / sqrt(mean(x²) + eps) · weight`; the
/// result has the input's dtype. One op with its own backward: [`crate::ops::norm`].
pub fn rms_norm(x: &Tensor, weight: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    crate::ops::norm::norm(x, &crate::ops::norm::Norm::rms(eps).weight(weight))
}

/// LayerNorm over the last dimension in f32 (biased variance), with optional affine weight and
/// bias; the result has the input's dtype. One op with its own backward: [`crate::ops::norm`].
pub fn layer_norm(x: &Tensor, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    crate::ops::norm::norm(x, &crate::ops::norm::Norm::layer(eps).weight(weight).bias(bias))
}

/// LayerNorm without affine weights followed by the modulation `· (1 + scale) + shift`, in f32
/// in one pass (diffusers' `norm(x) * (1 + scale) + shift`); the result has `x`'s dtype.
/// One op with its own backward: [`crate::ops::norm`].
pub fn layer_norm_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    crate::ops::norm::norm(x, &crate::ops::norm::Norm::layer(eps).modulate(shift, scale))
}

/// `x · (1 + scale) + shift` in f32 (scale and shift broadcast), result in `x`'s dtype.
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let dt = x.dtype();
    let xf = widen(x)?;
    let s = (scale.to_dtype(xf.dtype())? + 1.0)?;
    xf.broadcast_mul(&s)?.broadcast_add(&shift.to_dtype(xf.dtype())?)?.to_dtype(dt)
}

/// The gated residual `x + y · gate` in f32 (f64 for f64), result in `x`'s dtype; `y` may have
/// another dtype (a bf16 branch into an f32 residual stream). One op with its own backward:
/// [`crate::ops::gated`].
pub fn gated_residual(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
    crate::ops::gated::gated(x, y, Some(gate))
}

/// GELU with the tanh approximation (torch `approximate="tanh"`), in f32 (f64 for f64), result
/// in `x`'s dtype. One op with its own backward: [`crate::ops::gelu`].
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    crate::ops::gelu::gelu(x)
}

/// SiLU, `x · sigmoid(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

/// diffusers `get_timestep_embedding` (max period 10000), step by step in f32 as torch does:
/// `f_i = exp(-ln(10000)·i / (half − shift))`, `arg = scale·(t·f_i)`, `[sin, cos]` (or `[cos, sin]`
/// with `flip_sin_to_cos`), zero-padded when `dim` is odd. Returns `[N, dim]` f32 values.
pub fn timestep_embedding_values(t: &[f32], dim: usize, flip_sin_to_cos: bool, shift: f32, scale: f32) -> Vec<f32> {
    let half = dim / 2;
    let neg_log = -(10000f64.ln()) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| ((neg_log * i as f32) / (half as f32 - shift)).exp()).collect();
    let mut out = Vec::with_capacity(t.len() * dim);
    for &tv in t {
        let args: Vec<f32> = freqs.iter().map(|&f| if scale == 1.0 { tv * f } else { scale * (tv * f) }).collect();
        let sin = args.iter().map(|a| a.sin());
        let cos = args.iter().map(|a| a.cos());
        if flip_sin_to_cos {
            out.extend(cos.chain(sin));
        } else {
            out.extend(sin.chain(cos));
        }
        if dim % 2 == 1 {
            out.push(0.0);
        }
    }
    out
}

/// [`timestep_embedding_values`] as a `[N, dim]` f32 tensor on `t`'s device.
pub fn timestep_embedding(t: &Tensor, dim: usize, flip_sin_to_cos: bool, shift: f32, scale: f32) -> Result<Tensor> {
    let tv = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let n = tv.len();
    Tensor::from_vec(timestep_embedding_values(&tv, dim, flip_sin_to_cos, shift, scale), (n, dim), t.device())
}

/// Scaled dot-product attention for `q [B, Sq, H, D]`, `k, v [B, Sk, H, D]` (the layout the
/// projections produce; any strides), scores scaled by 1/√D, softmax and sums in f32 (f64 for
/// f64). `mask [B, Sk]` keeps key j of batch b where it is non-zero. The result `[B, Sq, H, D]`
/// has `q`'s dtype. One op with its own backward, in O(S) memory: [`crate::ops::attention`].
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    crate::ops::attention::attention(q, k, v, mask)
}

/// Numerically stable softmax over the last dimension (differentiable).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Rotate interleaved pairs `(x[2i], x[2i+1])` of `x [B, S, H, D]` by per-token tables
/// `cos, sin [S, D/2]` (f32): `(a·c − b·s, a·s + b·c)`, in f32; result in `x`'s dtype. One op
/// with its own backward: [`crate::ops::rope`].
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    crate::ops::rope::rope(x, cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f64], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.iter().map(|&x| x as f32).collect::<Vec<f32>>(), shape, &Device::Cpu).unwrap()
    }
    fn vals(x: &Tensor) -> Vec<f64> {
        x.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap().into_iter().map(f64::from).collect()
    }
    fn pseudo(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    }
    fn close(a: &[f64], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "element {i}: {x} vs {y}");
        }
    }

    #[test]
    fn rms_and_layer_norm_match_f64() {
        let (rows, n) = (3, 10);
        let x = pseudo(rows * n, 1);
        let w = pseudo(n, 2);
        let bias = pseudo(n, 3);
        let mut rms = Vec::new();
        let mut ln = Vec::new();
        for r in 0..rows {
            let row = &x[r * n..(r + 1) * n];
            let ms = row.iter().map(|v| v * v).sum::<f64>() / n as f64;
            rms.extend(row.iter().zip(&w).map(|(v, w)| v / (ms + 1e-6).sqrt() * w));
            let mean = row.iter().sum::<f64>() / n as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
            ln.extend(row.iter().zip(w.iter().zip(&bias)).map(|(v, (w, b))| (v - mean) / (var + 1e-5).sqrt() * w + b));
        }
        let xt = t(&x, &[rows, n]);
        close(&vals(&rms_norm(&xt, Some(&t(&w, &[n])), 1e-6).unwrap()), &rms, 1e-6);
        close(&vals(&layer_norm(&xt, Some(&t(&w, &[n])), Some(&t(&bias, &[n])), 1e-5).unwrap()), &ln, 1e-6);
    }

    #[test]
    fn timestep_embedding_matches_f64_formula() {
        for (dim, flip, shift, scale, ts) in
            [(32, true, 0.0, 1.0, vec![937.5, 250.0, 0.0]), (256, true, 0.0, 1000.0, vec![0.8125, 0.1]), (9, false, 1.0, 1.0, vec![3.0])]
        {
            let got = timestep_embedding_values(&ts, dim, flip, shift, scale);
            let half = dim / 2;
            let mut want = Vec::new();
            for &tv in &ts {
                let a: Vec<f64> = (0..half)
                    .map(|i| scale as f64 * tv as f64 * (-(10000f64.ln()) * i as f64 / (half as f64 - shift as f64)).exp())
                    .collect();
                let (s, c): (Vec<f64>, Vec<f64>) = (a.iter().map(|x| x.sin()).collect(), a.iter().map(|x| x.cos()).collect());
                if flip {
                    want.extend(c.iter().chain(&s));
                } else {
                    want.extend(s.iter().chain(&c));
                }
                if dim % 2 == 1 {
                    want.push(0.0);
                }
            }
            // f32 arguments up to 1000 carry ~1e-4 absolute rounding, as in torch.
            close(&got.iter().map(|&v| v as f64).collect::<Vec<_>>(), &want, 2e-4);
        }
    }

    #[test]
    fn sdpa_matches_f64_with_mask_and_many_heads() {
        // [B, S, H, D] inputs; batch 0 drops key 2, batch 1 drops key 1.
        let (b, h, sq, sk, d) = (2, 5, 3, 4, 8);
        let q = pseudo(b * sq * h * d, 4);
        let k = pseudo(b * sk * h * d, 5);
        let v = pseudo(b * sk * h * d, 6);
        let keep = [[true, true, false, true], [true, false, true, true]];
        let at = |s: usize, bi: usize, i: usize, hi: usize| ((bi * s + i) * h + hi) * d;
        let mut want = vec![0.0; b * sq * h * d];
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..sq {
                    let qi = &q[at(sq, bi, i, hi)..][..d];
                    let sc: Vec<f64> = (0..sk)
                        .map(|j| {
                            let kj = &k[at(sk, bi, j, hi)..][..d];
                            let s = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt();
                            if keep[bi][j] {
                                s
                            } else {
                                f64::NEG_INFINITY
                            }
                        })
                        .collect();
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|s| (s - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for j in 0..sk {
                        for c in 0..d {
                            want[at(sq, bi, i, hi) + c] += e[j] / z * v[at(sk, bi, j, hi) + c];
                        }
                    }
                }
            }
        }
        let mask: Vec<f64> = keep.iter().flatten().map(|&k| if k { 1.0 } else { 0.0 }).collect();
        let got = sdpa(&t(&q, &[b, sq, h, d]), &t(&k, &[b, sk, h, d]), &t(&v, &[b, sk, h, d]), Some(&t(&mask, &[b, sk]))).unwrap();
        close(&vals(&got), &want, 1e-6);
    }

    #[test]
    fn rope_rotates_interleaved_pairs() {
        let (b, s, h, d) = (1, 3, 4, 6);
        let x = pseudo(b * s * h * d, 7);
        let ang = pseudo(s * d / 2, 8);
        let ang2 = pseudo(s * d / 2, 9);
        let cos: Vec<f64> = ang.iter().map(|a| a.cos()).collect();
        let sin: Vec<f64> = ang2.iter().map(|a| a.sin()).collect();
        let mut want = vec![0.0; x.len()];
        for si in 0..s {
            for hi in 0..h {
                for p in 0..d / 2 {
                    let base = (si * h + hi) * d + 2 * p;
                    let (a, bb) = (x[base], x[base + 1]);
                    let (c, sn) = (cos[si * d / 2 + p], sin[si * d / 2 + p]);
                    want[base] = a * c - bb * sn;
                    want[base + 1] = a * sn + bb * c;
                }
            }
        }
        let got = apply_rope(&t(&x, &[b, s, h, d]), &t(&cos, &[s, d / 2]), &t(&sin, &[s, d / 2])).unwrap();
        close(&vals(&got), &want, 1e-6);
    }

    #[test]
    fn modulate_and_activations() {
        let x = pseudo(6, 10);
        let got = vals(&modulate(&t(&x, &[2, 3]), &t(&[0.5], &[1]), &t(&[2.0], &[1])).unwrap());
        close(&got, &x.iter().map(|v| v * 3.0 + 0.5).collect::<Vec<_>>(), 1e-6);
        let g = vals(&gelu_tanh(&t(&x, &[6])).unwrap());
        let want: Vec<f64> =
            x.iter().map(|v| 0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh())).collect();
        close(&g, &want, 1e-6);
        let sl = vals(&silu(&t(&x, &[6])).unwrap());
        close(&sl, &x.iter().map(|v| v / (1.0 + (-v).exp())).collect::<Vec<_>>(), 1e-6);
    }
}
