//! LayerNorm / RMSNorm over the last dimension with an optional affine weight (and bias) and an
//! optional modulation, as one op with its own backward pass:
//!
//! ```text
//! x̂ = (x − μ)·r  (LayerNorm, biased variance)   or   x·r  (RMSNorm),   r = 1/√(var + ε)
//! z = x̂·w + b     (weight, bias optional)
//! y = z·(1 + scale) + shift   (optional; shift and scale broadcast over rows)
//! ```
//!
//! computed in f32 (f64 for f64 inputs) and written once in the output dtype (by default the
//! input's; a bf16 output from an f32 residual stream saves the cast the next matmul would make).
//! The models' norm + modulation pairs (Wan2.2's `norm1`/`norm3`, Qwen-Image's `img_norm`/
//! `txt_norm`, both output norms), their affine norms (Wan's `norm2`, the q/k RMSNorms of both)
//! all run through it (`src/model/ops.rs`).
//!
//! **What the backward pass keeps**: the input `x` and two values per row (μ, r). candle's
//! composition of the same formula keeps the widened input, `x − μ`, its square, `x̂`, `z` and
//! `z·(1 + scale)`: four to six tensors of the input's size, in f32.
//!
//! Gradients: `∂shift = Σ ∂y`, `∂scale = Σ ∂y·z` over the rows that share them; `g = ∂y·(1 +
//! scale)·w`; `∂w = Σ ∂y·(1 + scale)·x̂`, `∂b = Σ ∂y·(1 + scale)`; `∂x = r·(g − mean(g) −
//! x̂·mean(g·x̂))` (RMSNorm without the `mean(g)` term).
//!
//! Shapes: `x [.., d]` (made contiguous), `weight` and `bias` `[d]`, `shift` and `scale` of one
//! shape that broadcasts against `x` by rows (`[B, 1, d]` per sample, `[B, S, d]` per token,
//! `[d]` for all; see [`super::fused::row_groups`]). Other broadcasts, and dtypes the fused
//! paths do not take, run the composed path. Implementations: [`super::fused`].

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D};
use rayon::prelude::*;

use super::fused::{
    self, contiguous, cpu_slice, kernel_dtype, resolve, row_chunks, row_groups, tag, vec8, Elem, Exec, Impl, Launch, Module, Out, Real, Run,
};

/// Which normalisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `(x − mean)/√(var + ε)`, biased variance.
    Layer,
    /// `x/√(mean(x²) + ε)`.
    Rms,
}

/// What to compute besides the normalisation (see the module docs).
#[derive(Clone, Copy, Debug)]
pub struct Norm<'a> {
    pub kind: Kind,
    pub eps: f64,
    pub weight: Option<&'a Tensor>,
    pub bias: Option<&'a Tensor>,
    /// `(shift, scale)`: `y = z·(1 + scale) + shift`.
    pub modulation: Option<(&'a Tensor, &'a Tensor)>,
    /// Output dtype (default: the input's).
    pub out: Option<DType>,
}

impl<'a> Norm<'a> {
    pub fn layer(eps: f64) -> Self {
        Norm { kind: Kind::Layer, eps, weight: None, bias: None, modulation: None, out: None }
    }
    pub fn rms(eps: f64) -> Self {
        Norm { kind: Kind::Rms, ..Norm::layer(eps) }
    }
    pub fn weight(self, w: Option<&'a Tensor>) -> Self {
        Norm { weight: w, ..self }
    }
    pub fn bias(self, b: Option<&'a Tensor>) -> Self {
        Norm { bias: b, ..self }
    }
    pub fn modulate(self, shift: &'a Tensor, scale: &'a Tensor) -> Self {
        Norm { modulation: Some((shift, scale)), ..self }
    }
    pub fn out(self, dt: DType) -> Self {
        Norm { out: Some(dt), ..self }
    }
}

/// The op through [`Impl::from_env`].
pub fn norm(x: &Tensor, n: &Norm) -> Result<Tensor> {
    norm_with(x, n, Impl::from_env()?)
}

/// The unfused candle composition (the reference; every device).
pub fn composed(x: &Tensor, n: &Norm) -> Result<Tensor> {
    let out = n.out.unwrap_or(x.dtype());
    let xf = x.to_dtype(fused::wide(x.dtype()))?;
    let mut y = match n.kind {
        Kind::Layer => {
            let mean = xf.mean_keepdim(D::Minus1)?;
            let xc = xf.broadcast_sub(&mean)?;
            let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
            xc.broadcast_div(&(var + n.eps)?.sqrt()?)?
        }
        Kind::Rms => {
            let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
            xf.broadcast_div(&(ms + n.eps)?.sqrt()?)?
        }
    };
    if let Some(w) = n.weight {
        y = y.broadcast_mul(&w.to_dtype(y.dtype())?)?;
    }
    if let Some(b) = n.bias {
        y = y.broadcast_add(&b.to_dtype(y.dtype())?)?;
    }
    if let Some((shift, scale)) = n.modulation {
        let s = (scale.to_dtype(y.dtype())? + 1.0)?;
        y = y.broadcast_mul(&s)?.broadcast_add(&shift.to_dtype(y.dtype())?)?;
    }
    y.to_dtype(out)
}

fn dtypes_fusable(x: DType, out: DType) -> bool {
    (x == DType::F64 && out == DType::F64) || (kernel_dtype(x) && kernel_dtype(out))
}

/// The op through a chosen implementation.
pub fn norm_with(x: &Tensor, n: &Norm, imp: Impl) -> Result<Tensor> {
    let out = n.out.unwrap_or(x.dtype());
    let dims = x.dims().to_vec();
    let Some(&d) = dims.last() else { candle_core::bail!("norm: the input is a scalar") };
    let groups = match n.modulation {
        Some((sh, sc)) if sh.dims() == sc.dims() => row_groups(sh.dims(), &dims),
        Some(_) => None,
        None => Some((0, 0)),
    };
    let vec_ok = |t: Option<&Tensor>| t.is_none_or(|t| t.dims() == [d]);
    let fusable = d > 0
        && groups.is_some()
        && vec_ok(n.weight)
        && vec_ok(n.bias)
        && !(n.bias.is_some() && n.weight.is_none())
        && dtypes_fusable(x.dtype(), out);
    let run = resolve(imp, x.device(), fusable, kernel_dtype(x.dtype()) && kernel_dtype(out))?;
    let Some((m, group)) = groups.filter(|_| run != Run::Composed) else { return composed(x, n) };
    let wide = fused::wide(x.dtype());
    let rows = x.elem_count() / d;
    let aff = match (n.weight, n.bias) {
        (Some(w), None) => Some(w.to_dtype(wide)?.reshape((1, d))?),
        (Some(w), Some(b)) => Some(Tensor::cat(&[w.to_dtype(wide)?.reshape((1, d))?, b.to_dtype(wide)?.reshape((1, d))?], 0)?),
        _ => None,
    };
    // [M, 2, d]: shift then scale of each modulation row.
    let rows_of = |t: &Tensor| -> Result<Tensor> { contiguous(&t.to_dtype(wide)?)?.reshape((m, 1, d)) };
    let modu = match n.modulation {
        Some((sh, sc)) => Some(Tensor::cat(&[rows_of(sh)?, rows_of(sc)?], 1)?),
        None => None,
    };
    let op = NormOp {
        kind: n.kind,
        affine: aff.as_ref().map_or(0, |a| a.dim(0).unwrap_or(0)),
        rows,
        group: if modu.is_some() { group } else { 0 },
        d,
        eps: n.eps,
        out,
        shape: Shape::from(dims),
        run,
        stats: Mutex::new(None),
    };
    let xc = contiguous(x)?;
    match (aff, modu) {
        (None, None) => xc.apply_op1(op),
        (Some(a), None) => xc.apply_op2(&a, op),
        (None, Some(mo)) => xc.apply_op2(&mo, op),
        (Some(a), Some(mo)) => xc.apply_op3(&a, &mo, op),
    }
}

/// Kernel parameters; the layout of `struct NormParams` in `kernels/norm.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct NormParams {
    rows: i64,
    group: i64,
    chunk: i64,
    d: i32,
    kind: i32,
    affine: i32,
    chunks: i32,
    eps: f32,
    want: i32,
}
const _: () = assert!(std::mem::size_of::<NormParams>() == 48);
#[cfg(feature = "cuda")]
// SAFETY: plain old data with the C layout the kernels declare.
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for NormParams {}
impl fused::Params for NormParams {}

const THREADS: u32 = 128;
const ROWS_PER_BLOCK: usize = 4;
/// Rows per partial sum in the CPU implementation's reductions (fixed, so that results do not
/// depend on the thread count).
const CPU_CHUNK: usize = 64;

struct NormOp {
    kind: Kind,
    /// 0, 1 (weight) or 2 (weight and bias): rows of the `aff` input.
    affine: usize,
    rows: usize,
    /// Rows per modulation row (0 without modulation).
    group: usize,
    d: usize,
    eps: f64,
    out: DType,
    shape: Shape,
    run: Run,
    /// `[rows, 2]` (μ, r) from the forward pass, in the arithmetic dtype.
    stats: Mutex<Option<Tensor>>,
}

type In<'a, S> = Option<(&'a S, &'a Layout)>;

impl NormOp {
    fn m(&self) -> usize {
        self.rows.checked_div(self.group).unwrap_or(1)
    }

    fn split<'a, S>(&self, second: (&'a S, &'a Layout)) -> (In<'a, S>, In<'a, S>) {
        if self.affine > 0 {
            (Some(second), None)
        } else {
            (None, Some(second))
        }
    }

    fn params(&self) -> NormParams {
        NormParams {
            rows: self.rows as i64,
            group: self.group as i64,
            d: self.d as i32,
            kind: (self.kind == Kind::Rms) as i32,
            affine: self.affine as i32,
            eps: self.eps as f32,
            ..NormParams::default()
        }
    }

    fn set_stats(&self, t: Tensor) {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
    }

    fn cpu_fwd_any(&self, x: (&CpuStorage, &Layout), aff: In<CpuStorage>, modu: In<CpuStorage>) -> Result<(CpuStorage, Shape)> {
        match self.run {
            Run::Cpu => {}
            Run::Emulated => {
                let exec = Exec::Emu;
                let a = |i: In<CpuStorage>| i.map(|(s, l)| fused::cpu_addr(s, l)).transpose();
                let (y, stats) = self.kernel_fwd(&exec, fused::cpu_addr(x.0, x.1)?, x.1.start_offset(), x.0.dtype(), a(aff)?, a(modu)?)?;
                self.set_stats(stats.tensor((self.rows, 2)));
                return Ok((y.cpu()?, self.shape.clone()));
            }
            r => candle_core::bail!("norm: {r:?} does not run on the CPU"),
        }
        macro_rules! go {
            ($i:ty, $o:ty, $variant:ident) => {{
                let xs = cpu_slice::<$i>(x.0, x.1)?;
                type A = <$i as Elem>::A;
                let (y, stats) = cpu_forward::<$i, $o>(xs, opt_slice::<A>(aff)?, opt_slice::<A>(modu)?, self);
                self.set_stats(Tensor::from_vec(stats, (self.rows, 2), &candle_core::Device::Cpu)?);
                Ok((CpuStorage::$variant(y), self.shape.clone()))
            }};
        }
        use half::{bf16, f16};
        match (x.0.dtype(), self.out) {
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
            (a, b) => candle_core::bail!("norm: no CPU implementation from {a:?} to {b:?}"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd_any(
        &self,
        x: (&candle_core::CudaStorage, &Layout),
        aff: In<candle_core::CudaStorage>,
        modu: In<candle_core::CudaStorage>,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        if self.run != Run::Cuda {
            candle_core::bail!("norm: {:?} does not run on CUDA", self.run);
        }
        let exec = Exec::Cuda(x.0.device().clone());
        let a = |i: In<candle_core::CudaStorage>| i.map(|(s, l)| fused::cuda::addr(s, l)).transpose();
        let (y, stats) = self.kernel_fwd(&exec, fused::cuda::addr(x.0, x.1)?, x.1.start_offset(), x.0.dtype(), a(aff)?, a(modu)?)?;
        self.set_stats(stats.tensor((self.rows, 2)));
        Ok((y.cuda()?, self.shape.clone()))
    }

    /// Forward through the kernels: `(y, stats)`.
    fn kernel_fwd(&self, exec: &Exec, x: u64, x_off: usize, xdt: DType, aff: Option<u64>, modu: Option<u64>) -> Result<(Out, Out)> {
        let y = Out::alloc(exec, self.out, self.rows * self.d)?;
        let stats = Out::alloc(exec, DType::F32, self.rows * 2)?;
        let v = if vec8(self.d, &[x_off]) { 8 } else { 1 };
        let p = self.params();
        let ptrs = [x, aff.unwrap_or(0), modu.unwrap_or(0), y.addr, stats.addr];
        exec.launch(&Launch {
            module: Module::Norm,
            name: format!("norm_fwd_{}_{}_v{v}", tag(xdt)?, tag(self.out)?),
            grid: (fused::grid1(self.rows, ROWS_PER_BLOCK)?, 1, 1),
            block: THREADS,
            ptrs: &ptrs,
            params: &p,
        })?;
        Ok((y, stats))
    }

    /// `(∂x, ∂aff, ∂mod)` from the inputs and `∂y`.
    fn backward(
        &self,
        x: &Tensor,
        aff: Option<&Tensor>,
        modu: Option<&Tensor>,
        g: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
        let stats = self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let stats = stats.ok_or_else(|| candle_core::Error::Msg("norm: backward before forward".into()))?;
        let g = contiguous(g)?;
        let want_mod = modu.is_some_and(|t| t.track_op());
        let want_aff = aff.is_some_and(|t| t.track_op());
        match self.run {
            Run::Cpu => self.cpu_backward(x, aff, modu, &stats, &g, want_mod, want_aff),
            Run::Emulated | Run::Cuda => self.kernel_backward(x, aff, modu, &stats, &g, want_mod, want_aff),
            Run::Composed => candle_core::bail!("norm: the composed path has no op node"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn cpu_backward(
        &self,
        x: &Tensor,
        aff: Option<&Tensor>,
        modu: Option<&Tensor>,
        stats: &Tensor,
        g: &Tensor,
        want_mod: bool,
        want_aff: bool,
    ) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
        let (xs_, xl) = x.storage_and_layout();
        let (gs_, gl) = g.storage_and_layout();
        let (ss_, sl) = stats.storage_and_layout();
        let a_ = aff.map(|t| t.storage_and_layout());
        let m_ = modu.map(|t| t.storage_and_layout());
        let dev = candle_core::Device::Cpu;
        let (xs, gs, ss) = (cpu_of(&xs_)?, cpu_of(&gs_)?, cpu_of(&ss_)?);
        macro_rules! go {
            ($i:ty, $o:ty, $variant:ident) => {{
                type A = <$i as Elem>::A;
                let r = cpu_backward::<$i, $o>(
                    cpu_slice::<$i>(xs, xl)?,
                    guard_slice::<A>(&a_)?,
                    guard_slice::<A>(&m_)?,
                    cpu_slice::<A>(ss, sl)?,
                    cpu_slice::<$o>(gs, gl)?,
                    self,
                    want_mod,
                    want_aff,
                );
                let dx = Tensor::from_storage(
                    Storage::Cpu(CpuStorage::$variant(r.0)),
                    self.shape.clone(),
                    candle_core::op::BackpropOp::none(),
                    false,
                );
                let dm = r.1.map(|v| Tensor::from_vec(v, (self.m(), 2, self.d), &dev)).transpose()?;
                let da = r.2.map(|v| Tensor::from_vec(v, (self.affine, self.d), &dev)).transpose()?;
                (dx, da, dm)
            }};
        }
        use half::{bf16, f16};
        let (dx, da, dm) = match (x.dtype(), self.out) {
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
            (a, b) => candle_core::bail!("norm: no CPU backward from {a:?} to {b:?}"),
        };
        Ok((dx, da, dm))
    }

    #[allow(clippy::too_many_arguments)]
    fn kernel_backward(
        &self,
        x: &Tensor,
        aff: Option<&Tensor>,
        modu: Option<&Tensor>,
        stats: &Tensor,
        g: &Tensor,
        want_mod: bool,
        want_aff: bool,
    ) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
        let exec = fused::exec_for(x.device())?;
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (ss, sl) = stats.storage_and_layout();
        let a_ = aff.map(|t| t.storage_and_layout());
        let m_ = modu.map(|t| t.storage_and_layout());
        let addr = |o: &Option<(candle_core::StorageRef<'_>, &Layout)>| -> Result<u64> {
            match o {
                Some((s, l)) => fused::addr(s, l),
                None => Ok(0),
            }
        };
        let (xa, ga, sa, aa, ma) = (fused::addr(&xs, xl)?, fused::addr(&gs, gl)?, fused::addr(&ss, sl)?, addr(&a_)?, addr(&m_)?);
        let (xt, gt) = (tag(x.dtype())?, tag(g.dtype())?);
        let (rows, d, m) = (self.rows, self.d, self.m());
        let dx = Out::alloc(&exec, x.dtype(), rows * d)?;
        let v = if vec8(d, &[xl.start_offset(), gl.start_offset()]) { 8 } else { 1 };
        let mut p = self.params();
        exec.launch(&Launch {
            module: Module::Norm,
            name: format!("norm_bwd_{xt}_{gt}_v{v}"),
            grid: (fused::grid1(rows, ROWS_PER_BLOCK)?, 1, 1),
            block: THREADS,
            ptrs: &[xa, aa, ma, sa, ga, dx.addr],
            params: &p,
        })?;
        let (mut dm, mut da) = (None, None);
        if want_mod || want_aff {
            let per = if self.group > 0 { self.group } else { rows };
            let (chunk, chunks) = row_chunks(per, m, d, THREADS as usize);
            p.chunk = chunk as i64;
            p.chunks = chunks as i32;
            p.want = want_mod as i32 | (want_aff as i32) << 1;
            let part = Out::alloc(&exec, DType::F32, 4 * m * chunks * d)?;
            exec.launch(&Launch {
                module: Module::Norm,
                name: format!("norm_cols_{xt}_{gt}"),
                grid: (fused::grid1(m * chunks, 1)?, fused::grid1(d, THREADS as usize)?, 1),
                block: THREADS,
                ptrs: &[xa, aa, ma, sa, ga, part.addr],
                params: &p,
            })?;
            let part = part.tensor((4, m, chunks, d));
            if want_mod {
                dm = Some(part.narrow(0, 0, 2)?.sum(2)?.permute((1, 0, 2))?.contiguous()?);
            }
            if want_aff {
                da = Some(part.narrow(0, 2, self.affine)?.sum(2)?.sum(1)?);
            }
        }
        Ok((dx.tensor(self.shape.clone()), da, dm))
    }
}

impl CustomOp1 for NormOp {
    fn name(&self) -> &'static str {
        "norm"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_fwd_any((s, l), None, None)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_fwd_any((s, l), None, None)
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.backward(x, None, None, g)?.0))
    }
}

impl CustomOp2 for NormOp {
    fn name(&self) -> &'static str {
        "norm"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (a, m) = self.split((s2, l2));
        self.cpu_fwd_any((s1, l1), a, m)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (a, m) = self.split((s2, l2));
        self.cuda_fwd_any((s1, l1), a, m)
    }
    fn bwd(&self, x: &Tensor, t2: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if self.affine > 0 {
            let (dx, da, _) = self.backward(x, Some(t2), None, g)?;
            Ok((Some(dx), da))
        } else {
            let (dx, _, dm) = self.backward(x, None, Some(t2), g)?;
            Ok((Some(dx), dm))
        }
    }
}

impl CustomOp3 for NormOp {
    fn name(&self) -> &'static str {
        "norm"
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
        self.cpu_fwd_any((s1, l1), Some((s2, l2)), Some((s3, l3)))
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
        self.cuda_fwd_any((s1, l1), Some((s2, l2)), Some((s3, l3)))
    }
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        m: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, da, dm) = self.backward(x, Some(a), Some(m), g)?;
        Ok((Some(dx), da, dm))
    }
}

fn opt_slice<'a, T: candle_core::WithDType>(i: In<'a, CpuStorage>) -> Result<Option<&'a [T]>> {
    i.map(|(s, l)| cpu_slice::<T>(s, l)).transpose()
}

fn cpu_of(s: &Storage) -> Result<&CpuStorage> {
    match s {
        Storage::Cpu(c) => Ok(c),
        _ => candle_core::bail!("element-wise op: backward inputs are not on the CPU"),
    }
}

/// The elements of an optional locked CPU tensor.
fn guard_slice<'a, T: candle_core::WithDType>(o: &'a Option<(candle_core::StorageRef<'_>, &Layout)>) -> Result<Option<&'a [T]>> {
    match o {
        Some((s, l)) => Ok(Some(cpu_slice::<T>(cpu_of(s)?, l)?)),
        None => Ok(None),
    }
}

/// μ and r of one row.
fn row_stats<I: Elem>(x: &[I], layer: bool, eps: f64) -> (I::A, I::A) {
    let n = I::A::of(x.len() as f64);
    let mean = if layer {
        let mut s = I::A::ZERO;
        for v in x {
            s += v.ld();
        }
        s / n
    } else {
        I::A::ZERO
    };
    let mut ss = I::A::ZERO;
    for v in x {
        let c = v.ld() - mean;
        ss += c * c;
    }
    (mean, I::A::ONE / (ss / n + I::A::of(eps)).sqrt())
}

/// The single-pass CPU forward: `(y, stats)`.
fn cpu_forward<I: Elem, O: Elem<A = I::A>>(x: &[I], aff: Option<&[I::A]>, modu: Option<&[I::A]>, op: &NormOp) -> (Vec<O>, Vec<I::A>) {
    let d = op.d;
    let mut y = vec![O::st(I::A::ZERO); x.len()];
    let mut stats = vec![I::A::ZERO; op.rows * 2];
    let layer = op.kind == Kind::Layer;
    y.par_chunks_mut(d).zip(stats.par_chunks_mut(2)).enumerate().with_min_len(16).for_each(|(r, (yr, st))| {
        let xr = &x[r * d..(r + 1) * d];
        let (mean, rs) = row_stats(xr, layer, op.eps);
        st[0] = mean;
        st[1] = rs;
        let sm = modu.map(|m| &m[(r / op.group) * 2 * d..][..2 * d]);
        for c in 0..d {
            let mut z = (xr[c].ld() - mean) * rs;
            if let Some(a) = aff {
                z *= a[c];
                if op.affine == 2 {
                    z += a[d + c];
                }
            }
            if let Some(m) = sm {
                z = z * (I::A::ONE + m[d + c]) + m[c];
            }
            yr[c] = O::st(z);
        }
    });
    (y, stats)
}

type Grads<I, A> = (Vec<I>, Option<Vec<A>>, Option<Vec<A>>);

/// The CPU backward: `∂x`, `∂mod [M, 2, d]` (if wanted), `∂aff [affine, d]` (if wanted).
#[allow(clippy::too_many_arguments)]
fn cpu_backward<I: Elem, O: Elem<A = I::A>>(
    x: &[I],
    aff: Option<&[I::A]>,
    modu: Option<&[I::A]>,
    stats: &[I::A],
    g: &[O],
    op: &NormOp,
    want_mod: bool,
    want_aff: bool,
) -> Grads<I, I::A> {
    let d = op.d;
    let dn = I::A::of(d as f64);
    let layer = op.kind == Kind::Layer;
    let scale_of = |r: usize| modu.map(|m| &m[(r / op.group) * 2 * d + d..][..d]);
    // g_c = ∂y_c·(1 + scale_c)·w_c
    let gz = |r: usize, c: usize, gv: I::A| -> I::A {
        let mut v = gv;
        if let Some(s) = scale_of(r) {
            v *= I::A::ONE + s[c];
        }
        if let Some(a) = aff {
            v *= a[c];
        }
        v
    };
    let mut dx = vec![I::st(I::A::ZERO); x.len()];
    dx.par_chunks_mut(d).enumerate().with_min_len(16).for_each(|(r, dr)| {
        let (xr, gr) = (&x[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
        let (mean, rs) = (stats[2 * r], stats[2 * r + 1]);
        let (mut a, mut b) = (I::A::ZERO, I::A::ZERO);
        for c in 0..d {
            let gi = gz(r, c, gr[c].ld());
            a += gi;
            b += gi * ((xr[c].ld() - mean) * rs);
        }
        let a = if layer { a / dn } else { I::A::ZERO };
        let b = b / dn;
        for c in 0..d {
            let xh = (xr[c].ld() - mean) * rs;
            dr[c] = I::st(rs * (gz(r, c, gr[c].ld()) - a - xh * b));
        }
    });
    // Column sums over a range of rows: [Σ ∂y, Σ ∂y·z, Σ ∂y·(1 + scale)·x̂, Σ ∂y·(1 + scale)].
    let sums = |r0: usize, r1: usize| -> [Vec<I::A>; 4] {
        let mut s: [Vec<I::A>; 4] = std::array::from_fn(|_| vec![I::A::ZERO; d]);
        for r in r0..r1 {
            let (mean, rs) = (stats[2 * r], stats[2 * r + 1]);
            let sc = scale_of(r);
            for c in 0..d {
                let xh = (x[r * d + c].ld() - mean) * rs;
                let gv = g[r * d + c].ld();
                let z = match aff {
                    Some(a) if op.affine == 2 => xh * a[c] + a[d + c],
                    Some(a) => xh * a[c],
                    None => xh,
                };
                let s1 = sc.map_or(I::A::ONE, |s| I::A::ONE + s[c]);
                s[0][c] += gv;
                s[1][c] += gv * z;
                s[2][c] += gv * s1 * xh;
                s[3][c] += gv * s1;
            }
        }
        s
    };
    // Sum of chunk sums over rows [r0, r1) in chunks of CPU_CHUNK, in chunk order.
    let chunked = |r0: usize, r1: usize| -> [Vec<I::A>; 4] {
        let starts: Vec<usize> = (r0..r1).step_by(CPU_CHUNK).collect();
        let parts: Vec<[Vec<I::A>; 4]> = starts.par_iter().map(|&a| sums(a, (a + CPU_CHUNK).min(r1))).collect();
        let mut acc: [Vec<I::A>; 4] = std::array::from_fn(|_| vec![I::A::ZERO; d]);
        for p in parts {
            for q in 0..4 {
                for c in 0..d {
                    acc[q][c] += p[q][c];
                }
            }
        }
        acc
    };
    let dm = (want_mod && modu.is_some()).then(|| {
        let m = op.m();
        let per: Vec<[Vec<I::A>; 4]> = if m == 1 {
            vec![chunked(0, op.rows)]
        } else {
            (0..m).into_par_iter().map(|k| sums(k * op.group, (k + 1) * op.group)).collect()
        };
        let mut out = Vec::with_capacity(m * 2 * d);
        for s in per {
            out.extend_from_slice(&s[0]);
            out.extend_from_slice(&s[1]);
        }
        out
    });
    let da = (want_aff && aff.is_some()).then(|| {
        let s = chunked(0, op.rows);
        let mut out = s[2].clone();
        if op.affine == 2 {
            out.extend_from_slice(&s[3]);
        }
        out
    });
    (dx, dm, da)
}
