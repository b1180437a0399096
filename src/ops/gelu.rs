//! GELU with the tanh approximation (torch `approximate="tanh"`), the FFN activation of Wan2.2 and
//! Qwen-Image, as one op with its own backward pass:
//!
//! ```text
//! y  = ½·x·(1 + tanh(u)),   u = √(2/π)·(x + 0.044715·x³)
//! ∂x = ∂y·(½·(1 + t) + ½·x·(1 − t²)·√(2/π)·(1 + 3·0.044715·x²)),   t = tanh(u)
//! ```
//!
//! in f32 (f64 for f64), in and out in `x`'s dtype. The forward pass is what candle's own `gelu`
//! computes; its backward pass is the difference: candle's is a composition of about a dozen
//! tensor ops over the FFN's hidden activations (13 824 wide in Wan2.2), each a full pass over
//! memory and a temporary, computed in the activations' dtype. Here it is one pass, in f32, that
//! reads `x` and `∂y` and writes `∂x`.
//!
//! Implementations: [`super::fused`].

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fused::{self, contiguous, cpu_slice, kernel_dtype, resolve, tag, vec8, Elem, Exec, Impl, Launch, Module, Out, Real, Run};

/// The op through [`Impl::from_env`].
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    gelu_with(x, Impl::from_env()?)
}

/// The unfused candle composition: candle's `gelu` (tanh approximation) and its backward.
pub fn composed(x: &Tensor) -> Result<Tensor> {
    x.gelu()
}

/// The op through a chosen implementation.
pub fn gelu_with(x: &Tensor, imp: Impl) -> Result<Tensor> {
    let fusable = matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16 | DType::F64) && x.elem_count() > 0;
    let run = resolve(imp, x.device(), fusable, kernel_dtype(x.dtype()))?;
    if run == Run::Composed {
        return composed(x);
    }
    contiguous(x)?.apply_op1(GeluOp { shape: x.shape().clone(), run })
}

/// Kernel parameters; the layout of `struct GeluParams` in `kernels/gelu.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct GeluParams {
    n: i64,
    pad: i64,
}
const _: () = assert!(std::mem::size_of::<GeluParams>() == 16);
#[cfg(feature = "cuda")]
// SAFETY: plain old data with the C layout the kernels declare.
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for GeluParams {}
impl fused::Params for GeluParams {}

const THREADS: u32 = 256;
const K: f64 = 0.797_884_560_802_865_4; // √(2/π)
const A: f64 = 0.044715;

struct GeluOp {
    shape: Shape,
    run: Run,
}

/// `∂x` from `x` and `∂y` (the backward pass as a forward op of its own).
struct GeluBwd {
    shape: Shape,
    run: Run,
}

fn v_of(n: usize, offsets: &[usize]) -> usize {
    if n % 8 == 0 && vec8(8, offsets) {
        8
    } else {
        1
    }
}

fn kernel(exec: &Exec, name: &str, ptrs: &[u64], n: usize, v: usize) -> Result<()> {
    exec.launch(&Launch {
        module: Module::Gelu,
        name: format!("{name}_v{v}"),
        grid: (fused::grid1(n / v, THREADS as usize)?, 1, 1),
        block: THREADS,
        ptrs,
        params: &GeluParams { n: n as i64, pad: 0 },
    })
}

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = self.shape.elem_count();
        match self.run {
            Run::Cpu => {}
            Run::Emulated => {
                let y = Out::alloc(&Exec::Emu, s.dtype(), n)?;
                let v = v_of(n, &[l.start_offset()]);
                kernel(&Exec::Emu, &format!("gelu_fwd_{}", tag(s.dtype())?), &[fused::cpu_addr(s, l)?, y.addr], n, v)?;
                return Ok((y.cpu()?, self.shape.clone()));
            }
            r => candle_core::bail!("gelu: {r:?} does not run on the CPU"),
        }
        macro_rules! go {
            ($t:ty, $variant:ident) => {{
                let x = cpu_slice::<$t>(s, l)?;
                let mut y = vec![<$t as Elem>::st(Real::ZERO); x.len()];
                y.par_chunks_mut(4096).zip(x.par_chunks(4096)).for_each(|(yc, xc)| {
                    for (o, v) in yc.iter_mut().zip(xc) {
                        *o = <$t as Elem>::st(gelu_f(v.ld()));
                    }
                });
                CpuStorage::$variant(y)
            }};
        }
        use half::{bf16, f16};
        let y = match s.dtype() {
            DType::F32 => go!(f32, F32),
            DType::BF16 => go!(bf16, BF16),
            DType::F16 => go!(f16, F16),
            DType::F64 => go!(f64, F64),
            dt => candle_core::bail!("gelu: no CPU implementation for {dt:?}"),
        };
        Ok((y, self.shape.clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        if self.run != Run::Cuda {
            candle_core::bail!("gelu: {:?} does not run on CUDA", self.run);
        }
        let exec = Exec::Cuda(s.device().clone());
        let n = self.shape.elem_count();
        let y = Out::alloc(&exec, s.dtype(), n)?;
        kernel(&exec, &format!("gelu_fwd_{}", tag(s.dtype())?), &[fused::cuda::addr(s, l)?, y.addr], n, v_of(n, &[l.start_offset()]))?;
        Ok((y.cuda()?, self.shape.clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let g = contiguous(&g.to_dtype(x.dtype())?)?;
        Ok(Some(x.apply_op2_no_bwd(&g, &GeluBwd { shape: self.shape.clone(), run: self.run })?))
    }
}

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "gelu-tanh-backward"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = self.shape.elem_count();
        match self.run {
            Run::Cpu => {}
            Run::Emulated => {
                let dx = Out::alloc(&Exec::Emu, xs.dtype(), n)?;
                let v = v_of(n, &[xl.start_offset(), gl.start_offset()]);
                let ptrs = [fused::cpu_addr(xs, xl)?, fused::cpu_addr(gs, gl)?, dx.addr];
                kernel(&Exec::Emu, &format!("gelu_bwd_{}", tag(xs.dtype())?), &ptrs, n, v)?;
                return Ok((dx.cpu()?, self.shape.clone()));
            }
            r => candle_core::bail!("gelu: {r:?} does not run on the CPU"),
        }
        macro_rules! go {
            ($t:ty, $variant:ident) => {{
                let (x, g) = (cpu_slice::<$t>(xs, xl)?, cpu_slice::<$t>(gs, gl)?);
                let mut dx = vec![<$t as Elem>::st(Real::ZERO); x.len()];
                dx.par_chunks_mut(4096).zip(x.par_chunks(4096).zip(g.par_chunks(4096))).for_each(|(dc, (xc, gc))| {
                    for ((o, v), gv) in dc.iter_mut().zip(xc).zip(gc) {
                        *o = <$t as Elem>::st(gv.ld() * gelu_grad(v.ld()));
                    }
                });
                CpuStorage::$variant(dx)
            }};
        }
        use half::{bf16, f16};
        let dx = match xs.dtype() {
            DType::F32 => go!(f32, F32),
            DType::BF16 => go!(bf16, BF16),
            DType::F16 => go!(f16, F16),
            DType::F64 => go!(f64, F64),
            dt => candle_core::bail!("gelu: no CPU backward for {dt:?}"),
        };
        Ok((dx, self.shape.clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let exec = Exec::Cuda(xs.device().clone());
        let n = self.shape.elem_count();
        let dx = Out::alloc(&exec, xs.dtype(), n)?;
        let ptrs = [fused::cuda::addr(xs, xl)?, fused::cuda::addr(gs, gl)?, dx.addr];
        kernel(&exec, &format!("gelu_bwd_{}", tag(xs.dtype())?), &ptrs, n, v_of(n, &[xl.start_offset(), gl.start_offset()]))?;
        Ok((dx.cuda()?, self.shape.clone()))
    }
}

fn gelu_f<R: Real>(x: R) -> R {
    let h = R::of(0.5);
    h * x * (R::ONE + (R::of(K) * (x + R::of(A) * x * x * x)).tanh())
}

fn gelu_grad<R: Real>(x: R) -> R {
    let h = R::of(0.5);
    let t = (R::of(K) * (x + R::of(A) * x * x * x)).tanh();
    h * (R::ONE + t) + h * x * (R::ONE - t * t) * R::of(K) * (R::ONE + R::of(3.0 * A) * x * x)
}
