//! Multiplication by a frozen weight, `z = W·xᵀ`, with a backward pass that gives the input's
//! gradient only.
//!
//! Why an op of its own: candle's `matmul` backward computes the gradient of *both* operands,
//! whether or not anything needs them, and keeps the gradient of a leaf tensor until the
//! backward pass ends. For a LoRA run that is one dense gradient per base weight — a second copy
//! of the whole model, in f32 when the weight was widened first. Base weights are never trained
//! (adapters and full fakes are separate variables), so here only `∂/∂xᵀ = Wᵀ·∂z` is computed.
//!
//! Precision (DESIGN decision 10: base weights stay in their storage dtype):
//! - same dtypes: candle's own matmul on the device (cuBLAS on CUDA: bf16 × bf16 with f32
//!   accumulation on the tensor cores); for f32 the result is bit for bit candle's
//!   `W.matmul(xᵀ)`, forward and backward;
//! - a 16-bit weight with f32 activations on the CPU: the weight is widened to f32 one block of
//!   [`BLOCK_ROWS`] rows at a time and multiplied with `gemm`, forward and backward, so no f32
//!   copy of the whole weight ever exists (candle's CPU bf16 matmul widens both operands whole);
//! - elsewhere (CUDA) the activations are rounded to the weight's dtype for the product and the
//!   result is returned in the activations' dtype.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// Rows of a 16-bit weight widened to f32 at a time on the CPU (128 rows × 5120 inputs × 4 B =
/// 2.5 MiB).
pub const BLOCK_ROWS: usize = 128;

/// `W·xᵀ` for `w [out, in]` (not trained) and `xt [in, n]` (usually the transposed view of an
/// activation `x [n, in]`); `[out, n]` in `xt`'s dtype. Gradients flow to `xt` only.
pub fn frozen_matmul(w: &Tensor, xt: &Tensor) -> Result<Tensor> {
    let (_, k) = w.dims2()?;
    let (k2, _) = xt.dims2()?;
    if k != k2 {
        candle_core::bail!("frozen matmul: weight {:?} and input {:?} do not fit", w.dims(), xt.dims());
    }
    let narrow = matches!(w.dtype(), DType::BF16 | DType::F16);
    if w.dtype() != xt.dtype() && !(narrow && w.device().is_cpu()) {
        // Accelerators multiply in the weight's dtype (bf16 tensor cores, f32 accumulation).
        return frozen_matmul(w, &xt.to_dtype(w.dtype())?)?.to_dtype(xt.dtype());
    }
    w.apply_op2(xt, FrozenMatmul)
}

struct FrozenMatmul;

fn bmnk(l1: &Layout, l2: &Layout) -> (usize, usize, usize, usize) {
    (1, l1.dims()[0], l2.dims()[1], l1.dims()[1])
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, w: &CpuStorage, wl: &Layout, x: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let shape = Shape::from((wl.dims()[0], xl.dims()[1]));
        match w {
            CpuStorage::BF16(_) | CpuStorage::F16(_) => Ok((blocked_fwd(w, wl, x, xl)?, shape)),
            _ => Ok((w.matmul(x, bmnk(wl, xl), wl, xl)?, shape)),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        w: &candle_core::CudaStorage,
        wl: &Layout,
        x: &candle_core::CudaStorage,
        xl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((w.matmul(x, bmnk(wl, xl), wl, xl)?, Shape::from((wl.dims()[0], xl.dims()[1]))))
    }

    fn bwd(&self, w: &Tensor, xt: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((None, Some(input_grad(w, grad)?.to_dtype(xt.dtype())?)))
    }
}

/// `Wᵀ·∂z`, the gradient of `xt` for `z = W·xt` (`w [out, in]`, `grad [out, n]` → `[in, n]`).
/// A 16-bit weight on the CPU is widened [`BLOCK_ROWS`] rows at a time (the result is f32);
/// elsewhere candle's matmul in the operands' dtype.
pub fn input_grad(w: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let narrow_cpu = w.device().is_cpu() && matches!(w.dtype(), DType::BF16 | DType::F16);
    if !narrow_cpu {
        return w.t()?.matmul(&grad.to_dtype(w.dtype())?);
    }
    // Σ over row blocks of W_blockᵀ·∂z_block, each block widened on its own.
    let (out, k) = w.dims2()?;
    let gf = grad.to_dtype(DType::F32)?;
    let mut acc = Tensor::zeros((k, gf.dim(1)?), DType::F32, w.device())?;
    for a in (0..out).step_by(BLOCK_ROWS) {
        let r = BLOCK_ROWS.min(out - a);
        let wb = w.narrow(0, a, r)?.to_dtype(DType::F32)?;
        acc = (acc + wb.t()?.matmul(&gf.narrow(0, a, r)?.contiguous()?)?)?;
    }
    Ok(acc)
}

/// `W·xᵀ` on the CPU for a 16-bit `W`, widened block by block (see the module docs).
fn blocked_fwd(w: &CpuStorage, wl: &Layout, x: &CpuStorage, xl: &Layout) -> Result<CpuStorage> {
    let (out, k) = (wl.dims()[0], wl.dims()[1]);
    let n = xl.dims()[1];
    let Some((w0, w1)) = wl.contiguous_offsets() else { candle_core::bail!("frozen matmul: the weight must be contiguous") };
    // The activations as f32, read through their strides (an f32 transposed view is used in place).
    let (xs, x_rs, x_cs): (std::borrow::Cow<[f32]>, isize, isize) = match x {
        CpuStorage::F32(v) => (std::borrow::Cow::Borrowed(&v[xl.start_offset()..]), xl.stride()[0] as isize, xl.stride()[1] as isize),
        other => {
            let t = widen_strided(other, xl)?;
            (std::borrow::Cow::Owned(t), n as isize, 1)
        }
    };
    let mut z = vec![0f32; out * n];
    let mut block = vec![0f32; BLOCK_ROWS.min(out) * k];
    let threads = candle_core::utils::get_num_threads();
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    for a in (0..out).step_by(BLOCK_ROWS) {
        let r = BLOCK_ROWS.min(out - a);
        let dst = &mut block[..r * k];
        match w {
            CpuStorage::BF16(v) => v[w0..w1][a * k..(a + r) * k].iter().zip(dst.iter_mut()).for_each(|(s, d)| *d = s.to_f32()),
            CpuStorage::F16(v) => v[w0..w1][a * k..(a + r) * k].iter().zip(dst.iter_mut()).for_each(|(s, d)| *d = s.to_f32()),
            _ => candle_core::bail!("frozen matmul: blocked path is for 16-bit weights"),
        }
        // SAFETY: the pointers cover [r, k] (block, row-major), [k, n] (x through its strides,
        // inside the storage by the layout's construction) and [r, n] rows a.. of z.
        unsafe {
            gemm::gemm(
                r,
                n,
                k,
                z[a * n..].as_mut_ptr(),
                1,
                n as isize,
                false,
                block.as_ptr(),
                1,
                k as isize,
                xs.as_ptr(),
                x_cs,
                x_rs,
                0f32,
                1f32,
                false,
                false,
                false,
                par,
            );
        }
    }
    Ok(match x {
        CpuStorage::F32(_) => CpuStorage::F32(z),
        CpuStorage::BF16(_) => CpuStorage::BF16(z.iter().map(|v| half::bf16::from_f32(*v)).collect()),
        CpuStorage::F16(_) => CpuStorage::F16(z.iter().map(|v| half::f16::from_f32(*v)).collect()),
        CpuStorage::F64(_) => CpuStorage::F64(z.iter().map(|v| *v as f64).collect()),
        _ => candle_core::bail!("frozen matmul: activations must be floats"),
    })
}

/// A 2-D strided view of a float storage as a row-major f32 vector.
fn widen_strided(s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    let (rows, cols) = (l.dims()[0], l.dims()[1]);
    let (o, rs, cs) = (l.start_offset(), l.stride()[0], l.stride()[1]);
    let at = |i: usize, j: usize| o + i * rs + j * cs;
    let mut v = Vec::with_capacity(rows * cols);
    for i in 0..rows {
        for j in 0..cols {
            v.push(match s {
                CpuStorage::BF16(x) => x[at(i, j)].to_f32(),
                CpuStorage::F16(x) => x[at(i, j)].to_f32(),
                CpuStorage::F64(x) => x[at(i, j)] as f32,
                CpuStorage::F32(x) => x[at(i, j)],
                _ => candle_core::bail!("frozen matmul: activations must be floats"),
            });
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn pseudo(n: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::rng::Rng::new(seed);
        (0..n).map(|_| r.normal() as f32).collect()
    }

    /// `W·xᵀ` and `∂/∂x Σ g ∘ (W·xᵀ)ᵀ = g·W` in f64 from the (rounded) inputs.
    fn reference(w: &[f64], x: &[f64], g: &[f64], out: usize, k: usize, n: usize) -> (Vec<f64>, Vec<f64>) {
        let mut z = vec![0.0; out * n];
        let mut dx = vec![0.0; n * k];
        for o in 0..out {
            for j in 0..n {
                z[o * n + j] = (0..k).map(|i| w[o * k + i] * x[j * k + i]).sum();
            }
        }
        for j in 0..n {
            for i in 0..k {
                dx[j * k + i] = (0..out).map(|o| g[j * out + o] * w[o * k + i]).sum();
            }
        }
        (z, dx)
    }

    fn rel(a: &[f64], b: &[f64]) -> f64 {
        let d: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
        let n: f64 = b.iter().map(|y| y * y).sum();
        (d / n).sqrt()
    }

    #[test]
    fn frozen_matmul_matches_f64_and_gives_no_weight_gradient() {
        let dev = Device::Cpu;
        // out spans several blocks and a partial one; n, k odd.
        let (out, k, n) = (2 * BLOCK_ROWS + 37, 67, 13);
        for wdt in [DType::F32, DType::BF16, DType::F16] {
            let w = Tensor::from_vec(pseudo(out * k, 1), (out, k), &dev).unwrap().to_dtype(wdt).unwrap();
            let x = Var::from_vec(pseudo(n * k, 2), (n, k), &dev).unwrap();
            let g = Tensor::from_vec(pseudo(n * out, 3), (n, out), &dev).unwrap();
            let y = frozen_matmul(&w, &x.as_tensor().t().unwrap()).unwrap().t().unwrap();
            assert_eq!(y.dtype(), DType::F32);
            let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(grads.get(&w).is_none(), "{wdt:?}: the frozen weight got a gradient");
            let dx = grads.get(x.as_tensor()).unwrap();
            let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let (z, want_dx) = reference(&f(&w), &f(x.as_tensor()), &f(&g), out, k, n);
            let zt: Vec<f64> = (0..n * out).map(|i| z[(i % out) * n + i / out]).collect();
            // f32 accumulation over 67 terms.
            assert!(rel(&f(&y), &zt) < 1e-6, "{wdt:?} forward {}", rel(&f(&y), &zt));
            assert!(rel(&f(dx), &want_dx) < 1e-6, "{wdt:?} backward {}", rel(&f(dx), &want_dx));
        }
    }

    #[test]
    fn f32_is_bit_identical_to_candles_matmul() {
        let dev = Device::Cpu;
        let (out, k, n) = (40, 33, 9);
        let w = Tensor::from_vec(pseudo(out * k, 4), (out, k), &dev).unwrap();
        let x = Var::from_vec(pseudo(n * k, 5), (n, k), &dev).unwrap();
        let g = Tensor::from_vec(pseudo(n * out, 6), (n, out), &dev).unwrap();
        let ours = frozen_matmul(&w, &x.as_tensor().t().unwrap()).unwrap().t().unwrap();
        let theirs = w.matmul(&x.as_tensor().t().unwrap()).unwrap().t().unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(&ours), v(&theirs));
        let g1 = (&ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&theirs * &g).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(v(g1.get(x.as_tensor()).unwrap()), v(g2.get(x.as_tensor()).unwrap()));
    }
}
