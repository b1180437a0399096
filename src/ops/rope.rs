//! Rotary position embedding on interleaved pairs as one op with its own backward pass:
//! for `x [B, S, H, D]` and per-token tables `cos, sin [S, D/2]` (f32; Wan2.2's 3-D tables and
//! Qwen-Image's, `src/model/rope.rs`),
//!
//! ```text
//! y[2i]   = x[2i]·cos_i − x[2i+1]·sin_i
//! y[2i+1] = x[2i]·sin_i + x[2i+1]·cos_i
//! ```
//!
//! in f32 (f64 for f64 inputs), the result `[B, S, H, D]` contiguous in `x`'s dtype. The backward
//! pass is the rotation by the opposite angle applied to `∂y`; nothing is kept for it (the tables
//! are constants). `x` may have any strides for B, S and H (a reshaped projection, a transposed
//! `[B, H, S, D]` tensor); its last dimension is made contiguous. candle's composition of the
//! same formula keeps the widened input, its two halves and four products.
//!
//! Implementations: [`super::fused`].

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::fused::{self, kernel_dtype, resolve, tag, vec8, Elem, Exec, Impl, Launch, Module, Out, Real, Run};

/// The op through [`Impl::from_env`].
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_with(x, cos, sin, Impl::from_env()?)
}

/// The unfused candle composition (the reference; every device).
pub fn composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, s, h, d) = x.dims4()?;
    let xf = x.to_dtype(fused::wide(x.dtype()))?.reshape((b, s, h, d / 2, 2))?;
    let x1 = xf.narrow(4, 0, 1)?;
    let x2 = xf.narrow(4, 1, 1)?;
    let c = cos.to_dtype(xf.dtype())?.reshape((1, s, 1, d / 2, 1))?;
    let sn = sin.to_dtype(xf.dtype())?.reshape((1, s, 1, d / 2, 1))?;
    let o1 = (x1.broadcast_mul(&c)? - x2.broadcast_mul(&sn)?)?;
    let o2 = (x1.broadcast_mul(&sn)? + x2.broadcast_mul(&c)?)?;
    Tensor::cat(&[o1, o2], 4)?.reshape((b, s, h, d))?.to_dtype(x.dtype())
}

/// The op through a chosen implementation.
pub fn rope_with(x: &Tensor, cos: &Tensor, sin: &Tensor, imp: Impl) -> Result<Tensor> {
    let (b, s, h, d) = x.dims4()?;
    if d % 2 != 0 || cos.dims() != [s, d / 2] || sin.dims() != [s, d / 2] {
        candle_core::bail!("rope: x {:?} needs cos and sin of [{s}, {}], got {:?} and {:?}", x.dims(), d / 2, cos.dims(), sin.dims());
    }
    let fusable = matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16 | DType::F64);
    let run = resolve(imp, x.device(), fusable, kernel_dtype(x.dtype()))?;
    if run == Run::Composed {
        return composed(x, cos, sin);
    }
    let wide = fused::wide(x.dtype());
    let x = if x.dim(3)? > 1 && x.stride()[3] != 1 { x.contiguous()? } else { x.clone() };
    let table = |t: &Tensor| -> Result<Tensor> { fused::contiguous(&t.to_dtype(wide)?.detach()) };
    x.apply_op1(RopeOp { dims: (b, s, h, d), cos: table(cos)?, sin: table(sin)?, run })
}

/// Kernel parameters; the layout of `struct RopeParams` in `kernels/rope.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct RopeParams {
    sb: i64,
    ss: i64,
    sh: i64,
    rows: i64,
    s: i32,
    h: i32,
    d: i32,
    sign: f32,
}
const _: () = assert!(std::mem::size_of::<RopeParams>() == 48);
#[cfg(feature = "cuda")]
// SAFETY: plain old data with the C layout the kernels declare.
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for RopeParams {}
impl fused::Params for RopeParams {}

const THREADS: u32 = 256;

struct RopeOp {
    dims: (usize, usize, usize, usize),
    /// `[S, D/2]`, contiguous, in the arithmetic dtype (f32, f64 for f64 inputs).
    cos: Tensor,
    sin: Tensor,
    run: Run,
}

impl RopeOp {
    fn shape(&self) -> Shape {
        Shape::from(self.dims)
    }

    /// Rotate `x` (strides of `l`) by `sign`·angle through the kernels; contiguous result.
    fn kernel(&self, exec: &Exec, x: u64, l: &Layout, dt: DType, sign: f32) -> Result<Out> {
        let (b, s, h, d) = self.dims;
        let st = l.stride();
        let (cs, cl) = self.cos.storage_and_layout();
        let (ss, sl) = self.sin.storage_and_layout();
        let v = if vec8(d, &[l.start_offset(), st[0], st[1], st[2]]) { 8 } else { 2 };
        let y = Out::alloc(exec, dt, b * s * h * d)?;
        let p = RopeParams {
            sb: st[0] as i64,
            ss: st[1] as i64,
            sh: st[2] as i64,
            rows: (b * s * h) as i64,
            s: s as i32,
            h: h as i32,
            d: d as i32,
            sign,
        };
        exec.launch(&Launch {
            module: Module::Rope,
            name: format!("rope_{}_v{v}", tag(dt)?),
            grid: (fused::grid1(b * s * h * d / v, THREADS as usize)?, 1, 1),
            block: THREADS,
            ptrs: &[x, fused::addr(&cs, cl)?, fused::addr(&ss, sl)?, y.addr],
            params: &p,
        })?;
        Ok(y)
    }

    fn cpu(&self, x: &CpuStorage, l: &Layout, sign: f64) -> Result<CpuStorage> {
        let (cs, _) = self.cos.storage_and_layout();
        let (ss, _) = self.sin.storage_and_layout();
        let (Storage::Cpu(cs), Storage::Cpu(ss)) = (&*cs, &*ss) else { candle_core::bail!("rope: tables are not on the CPU") };
        macro_rules! go {
            ($t:ty, $variant:ident) => {{
                type A = <$t as Elem>::A;
                let xs = x.as_slice::<$t>()?;
                CpuStorage::$variant(cpu_rotate::<$t>(xs, l, cs.as_slice::<A>()?, ss.as_slice::<A>()?, self.dims, A::of(sign)))
            }};
        }
        use half::{bf16, f16};
        Ok(match x.dtype() {
            DType::F32 => go!(f32, F32),
            DType::BF16 => go!(bf16, BF16),
            DType::F16 => go!(f16, F16),
            DType::F64 => go!(f64, F64),
            dt => candle_core::bail!("rope: no CPU implementation for {dt:?}"),
        })
    }
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        match self.run {
            Run::Cpu => Ok((self.cpu(s, l, 1.0)?, self.shape())),
            Run::Emulated => Ok((self.kernel(&Exec::Emu, fused::cpu_addr(s, l)?, l, s.dtype(), 1.0)?.cpu()?, self.shape())),
            r => candle_core::bail!("rope: {r:?} does not run on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        if self.run != Run::Cuda {
            candle_core::bail!("rope: {:?} does not run on CUDA", self.run);
        }
        let exec = Exec::Cuda(s.device().clone());
        Ok((self.kernel(&exec, fused::cuda::addr(s, l)?, l, s.dtype(), 1.0)?.cuda()?, self.shape()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let g = if g.stride()[3] != 1 && g.dim(3)? > 1 { g.contiguous()? } else { g.clone() };
        let (gs, gl) = g.storage_and_layout();
        let dx = match (self.run, &*gs) {
            (Run::Cpu, Storage::Cpu(c)) => {
                Tensor::from_storage(Storage::Cpu(self.cpu(c, gl, -1.0)?), self.shape(), candle_core::op::BackpropOp::none(), false)
            }
            (Run::Emulated | Run::Cuda, s) => {
                let exec = fused::exec_for(g.device())?;
                self.kernel(&exec, fused::addr(s, gl)?, gl, g.dtype(), -1.0)?.tensor(self.shape())
            }
            (r, _) => candle_core::bail!("rope: no backward for {r:?} here"),
        };
        Ok(Some(dx))
    }
}

/// The CPU rotation of a strided `[B, S, H, D]` input by `sign`·angle; contiguous result.
fn cpu_rotate<T: Elem>(x: &[T], l: &Layout, cos: &[T::A], sin: &[T::A], (b, s, h, d): (usize, usize, usize, usize), sign: T::A) -> Vec<T> {
    let st = l.stride();
    let (off, sb, ss, sh) = (l.start_offset(), st[0], st[1], st[2]);
    let mut y = vec![T::st(T::A::ZERO); b * s * h * d];
    let half = d / 2;
    y.par_chunks_mut(d).enumerate().with_min_len(64).for_each(|(row, yr)| {
        let (hh, t, bb) = (row % h, (row / h) % s, row / (h * s));
        let xr = &x[off + bb * sb + t * ss + hh * sh..][..d];
        let (c, sn) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
        for i in 0..half {
            let (a, bv) = (xr[2 * i].ld(), xr[2 * i + 1].ld());
            let si = sn[i] * sign;
            yr[2 * i] = T::st(a * c[i] - bv * si);
            yr[2 * i + 1] = T::st(a * si + bv * c[i]);
        }
    });
    y
}
