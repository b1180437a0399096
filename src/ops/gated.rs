//! The gated residual add `out = x + y·gate` (or `x + y` without a gate) as one op with its own
//! backward pass, computed in f32 (f64 for f64) and written in `x`'s dtype: the residual stream
//! `x` (f32 in the models) takes a branch output `y` in the compute dtype (bf16 on a GPU) without
//! a cast of `y` first. Wan2.2's three residual adds and Qwen-Image's four run through it.
//!
//! `x, y [.., d]` of one shape (made contiguous; `y` may have another dtype), `gate` broadcasting
//! by rows (`[B, 1, d]` per sample, `[B, S, d]` per token, `[d]`; see
//! [`super::fused::row_groups`]). Gradients: `∂x = ∂out`, `∂y = ∂out·gate` (in `y`'s dtype),
//! `∂gate = Σ ∂out·y` over the rows that share a gate row. The backward pass keeps `y` and the
//! gate (its inputs); candle's composition keeps the widened `x` and `y` and their product too.
//!
//! Implementations: [`super::fused`].

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::fused::{
    self, contiguous, cpu_slice, kernel_dtype, resolve, row_chunks, row_groups, tag, vec8, Elem, Exec, Impl, Launch, Module, Out, Real, Run,
};

/// The op through [`Impl::from_env`].
pub fn gated(x: &Tensor, y: &Tensor, gate: Option<&Tensor>) -> Result<Tensor> {
    gated_with(x, y, gate, Impl::from_env()?)
}

/// The unfused candle composition (the reference; every device).
pub fn composed(x: &Tensor, y: &Tensor, gate: Option<&Tensor>) -> Result<Tensor> {
    let wide = fused::wide(x.dtype());
    let xf = x.to_dtype(wide)?;
    let yf = y.to_dtype(wide)?;
    let r = match gate {
        Some(g) => xf.broadcast_add(&yf.broadcast_mul(&g.to_dtype(wide)?)?)?,
        None => (xf + yf)?,
    };
    r.to_dtype(x.dtype())
}

/// The op through a chosen implementation.
pub fn gated_with(x: &Tensor, y: &Tensor, gate: Option<&Tensor>, imp: Impl) -> Result<Tensor> {
    if x.dims() != y.dims() {
        candle_core::bail!("gated residual: x {:?} and y {:?} differ in shape", x.dims(), y.dims());
    }
    let dims = x.dims().to_vec();
    let Some(&d) = dims.last() else { candle_core::bail!("gated residual: scalar input") };
    let groups = match gate {
        Some(g) => row_groups(g.dims(), &dims),
        None => Some((0, 0)),
    };
    let f64s = x.dtype() == DType::F64 && y.dtype() == DType::F64;
    let kernels = kernel_dtype(x.dtype()) && kernel_dtype(y.dtype());
    let fusable = d > 0 && groups.is_some() && (f64s || kernels);
    let run = resolve(imp, x.device(), fusable, kernels)?;
    let Some((m, group)) = groups.filter(|_| run != Run::Composed) else { return composed(x, y, gate) };
    let rows = x.elem_count() / d;
    let op = GatedOp { rows, d, group: if gate.is_some() { group } else { 0 }, m, shape: Shape::from(dims), run };
    let (xc, yc) = (contiguous(x)?, contiguous(y)?);
    match gate {
        None => xc.apply_op2(&yc, op),
        Some(g) => xc.apply_op3(&yc, &contiguous(&g.to_dtype(fused::wide(x.dtype()))?)?.reshape((m, d))?, op),
    }
}

/// Kernel parameters; the layout of `struct GatedParams` in `kernels/gated.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct GatedParams {
    rows: i64,
    group: i64,
    chunk: i64,
    d: i32,
    chunks: i32,
}
const _: () = assert!(std::mem::size_of::<GatedParams>() == 32);
#[cfg(feature = "cuda")]
// SAFETY: plain old data with the C layout the kernels declare.
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for GatedParams {}
impl fused::Params for GatedParams {}

const THREADS: u32 = 256;
/// Rows per partial sum of `∂gate` in the CPU implementation (fixed: results do not depend on the
/// thread count).
const CPU_CHUNK: usize = 64;

struct GatedOp {
    rows: usize,
    d: usize,
    /// Rows per gate row (0: no gate).
    group: usize,
    /// Gate rows.
    m: usize,
    shape: Shape,
    run: Run,
}

impl GatedOp {
    fn params(&self) -> GatedParams {
        GatedParams { rows: self.rows as i64, group: self.group as i64, d: self.d as i32, ..GatedParams::default() }
    }

    fn v(&self, offsets: &[usize]) -> usize {
        if vec8(self.d, offsets) {
            8
        } else {
            1
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn kernel_fwd(&self, exec: &Exec, x: u64, xl: &Layout, xdt: DType, y: u64, yl: &Layout, ydt: DType, gate: u64) -> Result<Out> {
        let out = Out::alloc(exec, xdt, self.rows * self.d)?;
        let v = self.v(&[xl.start_offset(), yl.start_offset()]);
        exec.launch(&Launch {
            module: Module::Gated,
            name: format!("gated_fwd_{}_{}_v{v}", tag(xdt)?, tag(ydt)?),
            grid: (fused::grid1(self.rows * self.d / v, THREADS as usize)?, 1, 1),
            block: THREADS,
            ptrs: &[x, y, gate, out.addr],
            params: &self.params(),
        })?;
        Ok(out)
    }

    fn cpu_fwd_any(
        &self,
        x: (&CpuStorage, &Layout),
        y: (&CpuStorage, &Layout),
        gate: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        match self.run {
            Run::Cpu => {}
            Run::Emulated => {
                let g = gate.map(|(s, l)| fused::cpu_addr(s, l)).transpose()?.unwrap_or(0);
                let out = self.kernel_fwd(
                    &Exec::Emu,
                    fused::cpu_addr(x.0, x.1)?,
                    x.1,
                    x.0.dtype(),
                    fused::cpu_addr(y.0, y.1)?,
                    y.1,
                    y.0.dtype(),
                    g,
                )?;
                return Ok((out.cpu()?, self.shape.clone()));
            }
            r => candle_core::bail!("gated residual: {r:?} does not run on the CPU"),
        }
        macro_rules! go {
            ($tx:ty, $ty:ty, $variant:ident) => {{
                type A = <$tx as Elem>::A;
                let g = gate.map(|(s, l)| cpu_slice::<A>(s, l)).transpose()?;
                let o = cpu_forward::<$tx, $ty>(cpu_slice::<$tx>(x.0, x.1)?, cpu_slice::<$ty>(y.0, y.1)?, g, self);
                Ok((CpuStorage::$variant(o), self.shape.clone()))
            }};
        }
        use half::{bf16, f16};
        match (x.0.dtype(), y.0.dtype()) {
            (DType::F32, DType::F32) => go!(f32, f32, F32),
            (DType::F32, DType::BF16) => go!(f32, bf16, F32),
            (DType::F32, DType::F16) => go!(f32, f16, F32),
            (DType::BF16, DType::F32) => go!(bf16, f32, BF16),
            (DType::BF16, DType::BF16) => go!(bf16, bf16, BF16),
            (DType::BF16, DType::F16) => go!(bf16, f16, BF16),
            (DType::F16, DType::F32) => go!(f16, f32, F16),
            (DType::F16, DType::BF16) => go!(f16, bf16, F16),
            (DType::F16, DType::F16) => go!(f16, f16, F16),
            (DType::F64, DType::F64) => go!(f64, f64, F64),
            (a, b) => candle_core::bail!("gated residual: no CPU implementation for {a:?} + {b:?}"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd_any(
        &self,
        x: (&candle_core::CudaStorage, &Layout),
        y: (&candle_core::CudaStorage, &Layout),
        gate: Option<(&candle_core::CudaStorage, &Layout)>,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        if self.run != Run::Cuda {
            candle_core::bail!("gated residual: {:?} does not run on CUDA", self.run);
        }
        let exec = Exec::Cuda(x.0.device().clone());
        let g = gate.map(|(s, l)| fused::cuda::addr(s, l)).transpose()?.unwrap_or(0);
        let out =
            self.kernel_fwd(&exec, fused::cuda::addr(x.0, x.1)?, x.1, x.0.dtype(), fused::cuda::addr(y.0, y.1)?, y.1, y.0.dtype(), g)?;
        Ok((out.cuda()?, self.shape.clone()))
    }

    /// `(∂y, ∂gate)`; `∂x` is `∂out` itself.
    fn backward(&self, y: &Tensor, gate: Option<&Tensor>, g: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let g = contiguous(g)?;
        let Some(gate) = gate else { return Ok((g.to_dtype(y.dtype())?, None)) };
        let want_gate = gate.track_op();
        match self.run {
            Run::Cpu => self.cpu_backward(y, gate, &g, want_gate),
            Run::Emulated | Run::Cuda => self.kernel_backward(y, gate, &g, want_gate),
            Run::Composed => candle_core::bail!("gated residual: the composed path has no op node"),
        }
    }

    fn cpu_backward(&self, y: &Tensor, gate: &Tensor, g: &Tensor, want_gate: bool) -> Result<(Tensor, Option<Tensor>)> {
        let (ys, yl) = y.storage_and_layout();
        let (gts, gtl) = gate.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (Storage::Cpu(ys), Storage::Cpu(gts), Storage::Cpu(gs)) = (&*ys, &*gts, &*gs) else {
            candle_core::bail!("gated residual: backward inputs are not on the CPU")
        };
        let dev = candle_core::Device::Cpu;
        macro_rules! go {
            ($tg:ty, $ty:ty, $variant:ident) => {{
                type A = <$tg as Elem>::A;
                let (dy, dgate) = cpu_backward::<$tg, $ty>(
                    cpu_slice::<$tg>(gs, gl)?,
                    cpu_slice::<$ty>(ys, yl)?,
                    cpu_slice::<A>(gts, gtl)?,
                    self,
                    want_gate,
                );
                let dy = Tensor::from_storage(
                    Storage::Cpu(CpuStorage::$variant(dy)),
                    self.shape.clone(),
                    candle_core::op::BackpropOp::none(),
                    false,
                );
                (dy, dgate.map(|v| Tensor::from_vec(v, (self.m, self.d), &dev)).transpose()?)
            }};
        }
        use half::{bf16, f16};
        Ok(match (g.dtype(), y.dtype()) {
            (DType::F32, DType::F32) => go!(f32, f32, F32),
            (DType::F32, DType::BF16) => go!(f32, bf16, BF16),
            (DType::F32, DType::F16) => go!(f32, f16, F16),
            (DType::BF16, DType::F32) => go!(bf16, f32, F32),
            (DType::BF16, DType::BF16) => go!(bf16, bf16, BF16),
            (DType::BF16, DType::F16) => go!(bf16, f16, F16),
            (DType::F16, DType::F32) => go!(f16, f32, F32),
            (DType::F16, DType::BF16) => go!(f16, bf16, BF16),
            (DType::F16, DType::F16) => go!(f16, f16, F16),
            (DType::F64, DType::F64) => go!(f64, f64, F64),
            (a, b) => candle_core::bail!("gated residual: no CPU backward for {a:?}, {b:?}"),
        })
    }

    fn kernel_backward(&self, y: &Tensor, gate: &Tensor, g: &Tensor, want_gate: bool) -> Result<(Tensor, Option<Tensor>)> {
        let exec = fused::exec_for(y.device())?;
        let (ys, yl) = y.storage_and_layout();
        let (gts, gtl) = gate.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (ya, ga, gta) = (fused::addr(&ys, yl)?, fused::addr(&gs, gl)?, fused::addr(&gts, gtl)?);
        let (gt, yt) = (tag(g.dtype())?, tag(y.dtype())?);
        let (rows, d, m) = (self.rows, self.d, self.m);
        let dy = Out::alloc(&exec, y.dtype(), rows * d)?;
        let v = self.v(&[gl.start_offset()]);
        let mut p = self.params();
        exec.launch(&Launch {
            module: Module::Gated,
            name: format!("gated_dy_{gt}_{yt}_v{v}"),
            grid: (fused::grid1(rows * d / v, THREADS as usize)?, 1, 1),
            block: THREADS,
            ptrs: &[ga, gta, dy.addr],
            params: &p,
        })?;
        let mut dgate = None;
        if want_gate {
            let (chunk, chunks) = row_chunks(self.group, m, d, THREADS as usize);
            p.chunk = chunk as i64;
            p.chunks = chunks as i32;
            let part = Out::alloc(&exec, DType::F32, m * chunks * d)?;
            exec.launch(&Launch {
                module: Module::Gated,
                name: format!("gated_cols_{gt}_{yt}"),
                grid: (fused::grid1(m * chunks, 1)?, fused::grid1(d, THREADS as usize)?, 1),
                block: THREADS,
                ptrs: &[ga, ya, part.addr],
                params: &p,
            })?;
            dgate = Some(part.tensor((m, chunks, d)).sum(1)?);
        }
        Ok((dy.tensor(self.shape.clone()), dgate))
    }
}

impl CustomOp2 for GatedOp {
    fn name(&self) -> &'static str {
        "gated-residual"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_fwd_any((s1, l1), (s2, l2), None)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_fwd_any((s1, l1), (s2, l2), None)
    }
    fn bwd(&self, x: &Tensor, y: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dy, _) = self.backward(y, None, g)?;
        Ok((Some(g.to_dtype(x.dtype())?), Some(dy)))
    }
}

impl CustomOp3 for GatedOp {
    fn name(&self) -> &'static str {
        "gated-residual"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_fwd_any((s1, l1), (s2, l2), Some((s3, l3)))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_fwd_any((s1, l1), (s2, l2), Some((s3, l3)))
    }
    fn bwd(
        &self,
        x: &Tensor,
        y: &Tensor,
        gate: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dy, dgate) = self.backward(y, Some(gate), g)?;
        Ok((Some(g.to_dtype(x.dtype())?), Some(dy), dgate))
    }
}

fn cpu_forward<X: Elem, Y: Elem<A = X::A>>(x: &[X], y: &[Y], gate: Option<&[X::A]>, op: &GatedOp) -> Vec<X> {
    let d = op.d;
    let mut out = vec![X::st(X::A::ZERO); x.len()];
    out.par_chunks_mut(d).enumerate().with_min_len(16).for_each(|(r, o)| {
        let (xr, yr) = (&x[r * d..(r + 1) * d], &y[r * d..(r + 1) * d]);
        match gate {
            Some(gt) => {
                let gr = &gt[(r / op.group) * d..][..d];
                for c in 0..d {
                    o[c] = X::st(xr[c].ld() + yr[c].ld() * gr[c]);
                }
            }
            None => {
                for c in 0..d {
                    o[c] = X::st(xr[c].ld() + yr[c].ld());
                }
            }
        }
    });
    out
}

/// `(∂y, ∂gate [M, d])` from `∂out` on the CPU.
fn cpu_backward<G: Elem, Y: Elem<A = G::A>>(g: &[G], y: &[Y], gate: &[G::A], op: &GatedOp, want_gate: bool) -> (Vec<Y>, Option<Vec<G::A>>) {
    let d = op.d;
    let mut dy = vec![Y::st(G::A::ZERO); y.len()];
    dy.par_chunks_mut(d).enumerate().with_min_len(16).for_each(|(r, o)| {
        let gr = &gate[(r / op.group) * d..][..d];
        for c in 0..d {
            o[c] = Y::st(g[r * d + c].ld() * gr[c]);
        }
    });
    let dgate = want_gate.then(|| {
        let sums = |r0: usize, r1: usize| -> Vec<G::A> {
            let mut s = vec![G::A::ZERO; d];
            for r in r0..r1 {
                for c in 0..d {
                    s[c] += g[r * d + c].ld() * y[r * d + c].ld();
                }
            }
            s
        };
        let mut out = Vec::with_capacity(op.m * d);
        if op.m == 1 {
            let parts: Vec<Vec<G::A>> =
                (0..op.rows).step_by(CPU_CHUNK).collect::<Vec<_>>().par_iter().map(|&a| sums(a, (a + CPU_CHUNK).min(op.rows))).collect();
            let mut acc = vec![G::A::ZERO; d];
            for p in parts {
                for c in 0..d {
                    acc[c] += p[c];
                }
            }
            out = acc;
        } else {
            let per: Vec<Vec<G::A>> = (0..op.m).into_par_iter().map(|k| sums(k * op.group, (k + 1) * op.group)).collect();
            for p in per {
                out.extend_from_slice(&p);
            }
        }
        out
    });
    (dy, dgate)
}
