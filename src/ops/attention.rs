//! Scaled dot-product attention as one op with its own backward pass, in O(S) memory.
//!
//! `o = softmax(q·kᵀ/√D + bias)·v` per batch and head, for
//! - `q [B, Sq, H, D]` and `k, v [B, Sk, H, D]`: the layout the projections produce. Any strides
//!   are accepted (a transposed `[B, H, S, D]` tensor is read in place); only the last dimension
//!   must be contiguous, or it is made so;
//! - an optional key mask `[B, Sk]`: a key is kept where the mask is non-zero and dropped where it
//!   is 0 (Qwen-Image's joint attention drops padded prompt tokens; Wan takes none);
//! - dtypes bf16, f16, f32 (arithmetic in f32) and f64 (arithmetic in f64). The output `[B, Sq, H,
//!   D]` (contiguous) has `q`'s dtype; the log-sum-exp of the scaled scores `[B, H, Sq]` is f32
//!   (f64 for f64) and is what the backward pass recomputes the probabilities from.
//!
//! **A row whose keys are all masked** has output 0 (not NaN), log-sum-exp +∞, and zero
//! gradients for its query; masked keys get zero gradients.
//!
//! No implementation ever holds the `Sq × Sk` matrix: the forward runs the online-softmax
//! recurrence over key tiles, the backward recomputes each probability tile from the saved
//! log-sum-exp with `dS = P ∘ (dP − Δ)`, `Δ = rowsum(dO ∘ O)`.
//!
//! Implementations ([`Path`]): [`Path::Cpu`], tiled and multi-threaded (rayon + `gemm`);
//! [`Path::Chunked`], the same algorithm as candle tensor ops on chunks, on any device; and
//! [`Path::Fused`], the CUDA kernels of `kernels/attention.cu` (bf16/f16, D = 64 or 128, sm_80+).
//! `Cpu` and `Chunked` are the portable reference (DESIGN decision 9); `docs/ops.md` has the
//! details and how each path is tested.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor};

mod chunked;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;

pub use cpu::Dims;

/// Which implementation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Path {
    /// `Cpu` on the CPU; on CUDA `Fused` where it applies, else `Chunked`.
    Auto,
    /// Tiled rayon + gemm implementation (CPU tensors only).
    Cpu,
    /// candle tensor ops over query × key chunks (any device).
    Chunked,
    /// The CUDA kernels (bf16/f16, head size 64 or 128, compute capability ≥ 8.0).
    Fused,
}

impl Path {
    /// [`Path::Auto`], unless the environment variable `PHASEKIT_ATTENTION` names another path
    /// (`cpu`, `chunked`, `fused`): a switch for comparing paths inside whole runs.
    pub fn from_env() -> Result<Path> {
        match std::env::var("PHASEKIT_ATTENTION").ok().as_deref().map(str::trim) {
            None | Some("") | Some("auto") => Ok(Path::Auto),
            Some("cpu") => Ok(Path::Cpu),
            Some("chunked") => Ok(Path::Chunked),
            Some("fused") => Ok(Path::Fused),
            Some(other) => candle_core::bail!("PHASEKIT_ATTENTION={other}: use auto, cpu, chunked or fused"),
        }
    }

    /// Lowercase name, as in `--path`.
    pub fn name(self) -> &'static str {
        match self {
            Path::Auto => "auto",
            Path::Cpu => "cpu",
            Path::Chunked => "chunked",
            Path::Fused => "fused",
        }
    }
}

/// Whether the fused CUDA kernels take this call (`dtype` of q, k, v and head size `d`).
pub fn fused_supported(device: &Device, dtype: DType, d: usize) -> bool {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        return cuda::supported(dev, dtype, d);
    }
    let _ = (device, dtype, d);
    false
}

/// The path [`Path::Auto`] takes for these inputs, or the one asked for if it can run them.
pub fn resolve(path: Path, device: &Device, dtype: DType, d: usize) -> Result<Path> {
    let fused = fused_supported(device, dtype, d);
    Ok(match path {
        Path::Auto if device.is_cpu() => Path::Cpu,
        Path::Auto if fused => Path::Fused,
        Path::Auto => Path::Chunked,
        Path::Cpu if !device.is_cpu() => candle_core::bail!("attention: the cpu path needs CPU tensors"),
        Path::Fused if !fused => candle_core::bail!(
            "attention: the fused path needs CUDA (built with --features cuda, compute capability ≥ 8.0), bf16 or f16 and head size 64 or 128 (got {dtype:?}, {d})"
        ),
        p => p,
    })
}

/// Attention output `[B, Sq, H, D]` for `q [B, Sq, H, D]`, `k, v [B, Sk, H, D]` and an optional
/// key mask `[B, Sk]` (non-zero keeps), through [`Path::from_env`]. See the module doc.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    Ok(attention_with(q, k, v, mask, Path::from_env()?)?.0)
}

/// [`attention`] through a chosen path; returns the output and the log-sum-exp `[B, H, Sq]`
/// (detached: only the output carries gradients).
pub fn attention_with(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, path: Path) -> Result<(Tensor, Tensor)> {
    attention_opts(q, k, v, mask, &Options { path, ..Options::default() })
}

/// Everything a call can choose besides its inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    pub path: Path,
    /// Queries × keys per chunk of [`Path::Chunked`] (tests make them small to cross chunk edges).
    pub chunks: (usize, usize),
}

impl Default for Options {
    fn default() -> Self {
        Options { path: Path::Auto, chunks: (chunked::CQ, chunked::CK) }
    }
}

/// [`attention_with`] with every option.
pub fn attention_opts(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, opts: &Options) -> Result<(Tensor, Tensor)> {
    let dims = check(q, k, v, mask)?;
    let path = resolve(opts.path, q.device(), q.dtype(), dims.d)?;
    if opts.chunks.0 == 0 || opts.chunks.1 == 0 {
        candle_core::bail!("attention: chunk sizes must be positive, got {:?}", opts.chunks);
    }
    let scale = 1.0 / (dims.d as f64).sqrt();
    let (q, k, v) = (last_dim_contiguous(q)?, last_dim_contiguous(k)?, last_dim_contiguous(v)?);
    let lse = Arc::new(Mutex::new(None));
    let mut op = AttnOp { path, dims, scale, chunks: opts.chunks, keep: None, bias: None, lse: lse.clone(), out: Mutex::new(None) };
    let (q, k, v) = match path {
        Path::Cpu => {
            op.keep = match mask {
                Some(m) => Some(m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.into_iter().map(|x| x != 0.0).collect()),
                None => None,
            };
            (q, k, v)
        }
        Path::Chunked => {
            let wide = if q.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
            op.bias = mask.map(|m| additive_bias(m, wide)?.reshape((dims.b, 1, 1, dims.sk))).transpose()?;
            let (o, l) = chunked::forward(&q, &k, &v, op.bias.as_ref(), scale, opts.chunks)?;
            if !(q.track_op() || k.track_op() || v.track_op()) {
                return Ok((o, l));
            }
            *op.out.lock().unwrap_or_else(|e| e.into_inner()) = Some(o);
            *lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(l);
            (q, k, v)
        }
        Path::Fused => {
            op.bias = mask.map(|m| additive_bias(m, DType::F32)).transpose()?;
            #[cfg(feature = "cuda")]
            let (q, k, v) = (cuda::aligned(&q)?, cuda::aligned(&k)?, cuda::aligned(&v)?);
            (q, k, v)
        }
        Path::Auto => unreachable!("resolved above"),
    };
    let o = q.apply_op3_arc(&k, &v, Arc::new(Box::new(op)))?;
    let l = lse.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let l = l.ok_or_else(|| candle_core::Error::Msg("attention: the forward pass left no log-sum-exp".into()))?;
    Ok((o, l))
}

/// Shapes, dtypes and devices of one call.
fn check(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Dims> {
    let (b, sq, h, d) = q.dims4().map_err(|_| candle_core::Error::Msg(format!("attention: q must be [B, S, H, D], got {:?}", q.dims())))?;
    let (bk, sk, hk, dk) =
        k.dims4().map_err(|_| candle_core::Error::Msg(format!("attention: k must be [B, S, H, D], got {:?}", k.dims())))?;
    if (bk, hk, dk) != (b, h, d) || v.dims() != k.dims() {
        candle_core::bail!(
            "attention: q {:?}, k {:?} and v {:?} disagree (want [B, Sq, H, D], [B, Sk, H, D] twice)",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if sq == 0 || sk == 0 || d == 0 || b == 0 || h == 0 {
        candle_core::bail!("attention: empty input (q {:?}, k {:?})", q.dims(), k.dims());
    }
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() || !matches!(q.dtype(), DType::BF16 | DType::F16 | DType::F32 | DType::F64) {
        candle_core::bail!(
            "attention: q, k and v must share one of bf16, f16, f32, f64 (got {:?}, {:?}, {:?})",
            q.dtype(),
            k.dtype(),
            v.dtype()
        );
    }
    if !q.device().same_device(k.device()) || !q.device().same_device(v.device()) {
        candle_core::bail!("attention: q, k and v are on different devices");
    }
    if let Some(m) = mask {
        if m.dims() != [b, sk] {
            candle_core::bail!("attention: the key mask must be [B, Sk] = [{b}, {sk}], got {:?}", m.dims());
        }
        if !m.device().same_device(q.device()) {
            candle_core::bail!("attention: the key mask is on another device than q");
        }
    }
    Ok(Dims { b, sq, sk, h, d })
}

/// `x`, copied only if its last dimension is not contiguous.
fn last_dim_contiguous(x: &Tensor) -> Result<Tensor> {
    if x.dim(3)? == 1 || x.stride()[3] == 1 {
        Ok(x.clone())
    } else {
        x.contiguous()
    }
}

/// The key mask as an additive bias in `dt`: 0 where kept, −∞ where dropped.
fn additive_bias(mask: &Tensor, dt: DType) -> Result<Tensor> {
    let keep = mask.to_dtype(DType::F32)?.ne(0f32)?;
    let zeros = Tensor::zeros(mask.shape(), dt, mask.device())?;
    let neg = Tensor::full(f32::NEG_INFINITY, mask.shape(), mask.device())?.to_dtype(dt)?;
    keep.where_cond(&zeros, &neg)?.contiguous()
}

/// The custom op: forward through the resolved path, backward from the saved log-sum-exp.
struct AttnOp {
    path: Path,
    dims: Dims,
    scale: f64,
    chunks: (usize, usize),
    /// [`Path::Cpu`]: the mask as `[B·Sk]` booleans.
    keep: Option<Vec<bool>>,
    /// [`Path::Chunked`]: additive `[B, 1, 1, Sk]` bias; [`Path::Fused`]: f32 `[B, Sk]`.
    bias: Option<Tensor>,
    /// Set by the forward pass, read by the backward pass.
    lse: Arc<Mutex<Option<Tensor>>>,
    /// [`Path::Chunked`]: the output, computed before the op is applied (candle ops cannot run
    /// inside the op's forward, which holds the inputs' storage locks).
    out: Mutex<Option<Tensor>>,
}

impl AttnOp {
    fn out_shape(&self) -> Shape {
        let Dims { b, sq, h, d, .. } = self.dims;
        Shape::from((b, sq, h, d))
    }

    /// The precomputed output's storage ([`Path::Chunked`]).
    fn take_out(&self) -> Result<Storage> {
        let o = self.out.lock().unwrap_or_else(|e| e.into_inner()).take();
        let o = o.ok_or_else(|| candle_core::Error::Msg("attention: forward run twice".into()))?;
        let (storage, layout) = o.storage_and_layout();
        if layout.contiguous_offsets() != Some((0, o.elem_count())) {
            candle_core::bail!("attention: precomputed output is not contiguous");
        }
        storage.try_clone(layout)
    }

    fn set_lse(&self, t: Tensor) {
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
    }
}

fn view<'a, T>(data: &'a [T], l: &Layout, d: usize) -> Result<cpu::Bshd<'a, T>> {
    let st = l.stride();
    if st.len() != 4 || (l.dims()[3] > 1 && st[3] != 1) {
        candle_core::bail!("attention: expected a [B, S, H, D] layout with contiguous D, got strides {st:?}");
    }
    Ok(cpu::Bshd { data, off: l.start_offset(), sb: st[0], ss: st[1], sh: st[2], d })
}

impl CustomOp3 for AttnOp {
    fn name(&self) -> &'static str {
        "attention"
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
        match self.path {
            Path::Chunked => match self.take_out()? {
                Storage::Cpu(s) => return Ok((s, self.out_shape())),
                _ => candle_core::bail!("attention: output on another device"),
            },
            Path::Cpu => {}
            p => candle_core::bail!("attention: the {} path does not run on the CPU", p.name()),
        }
        let Dims { b, sq, h, d, .. } = self.dims;
        let keep = self.keep.as_deref();
        macro_rules! run {
            ($q:expr, $k:expr, $v:expr, $variant:ident) => {{
                let (o, lse) = cpu::forward(view($q, l1, d)?, view($k, l2, d)?, view($v, l3, d)?, keep, self.dims, self.scale);
                self.set_lse(Tensor::from_vec(lse, (b, h, sq), &Device::Cpu)?);
                Ok((CpuStorage::$variant(o), self.out_shape()))
            }};
        }
        match (s1, s2, s3) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => run!(q, k, v, F32),
            (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => run!(q, k, v, BF16),
            (CpuStorage::F16(q), CpuStorage::F16(k), CpuStorage::F16(v)) => run!(q, k, v, F16),
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => run!(q, k, v, F64),
            _ => candle_core::bail!("attention: q, k and v must share one float dtype"),
        }
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
        match self.path {
            Path::Chunked => match self.take_out()? {
                Storage::Cuda(s) => Ok((s, self.out_shape())),
                _ => candle_core::bail!("attention: output on another device"),
            },
            Path::Fused => {
                let (o, lse) = cuda::forward((s1, l1), (s2, l2), (s3, l3), self.bias.as_ref(), self.dims, self.scale)?;
                self.set_lse(lse);
                Ok((o, self.out_shape()))
            }
            p => candle_core::bail!("attention: the {} path does not run on CUDA", p.name()),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self.lse.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let lse = lse.ok_or_else(|| candle_core::Error::Msg("attention: backward before forward".into()))?;
        let d_o = last_dim_contiguous(grad_res)?;
        let (dq, dk, dv) = match self.path {
            Path::Cpu => cpu_backward(self, q, k, v, res, &d_o, &lse)?,
            Path::Chunked => chunked::backward(q, k, v, res, &d_o, &lse, self.bias.as_ref(), self.scale, self.chunks)?,
            #[cfg(feature = "cuda")]
            Path::Fused => cuda::backward(q, k, v, res, &d_o, &lse, self.bias.as_ref(), self.dims, self.scale)?,
            p => candle_core::bail!("attention: no backward for the {} path here", p.name()),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

fn cpu_backward(
    op: &AttnOp,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    d_o: &Tensor,
    lse: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let Dims { b, sq, sk, h, d } = op.dims;
    let (sq_, lq) = q.storage_and_layout();
    let (sk_, lk) = k.storage_and_layout();
    let (sv_, lv) = v.storage_and_layout();
    let (so_, lo) = o.storage_and_layout();
    let (sg_, lg) = d_o.storage_and_layout();
    let lse = lse.contiguous()?;
    let (sl_, ll) = lse.storage_and_layout();
    let keep = op.keep.as_deref();
    macro_rules! run {
        ($variant:ident, $lse:ident) => {{
            let (
                Storage::Cpu(CpuStorage::$variant(q)),
                Storage::Cpu(CpuStorage::$variant(k)),
                Storage::Cpu(CpuStorage::$variant(v)),
                Storage::Cpu(CpuStorage::$variant(o)),
                Storage::Cpu(CpuStorage::$variant(g)),
                Storage::Cpu(CpuStorage::$lse(l)),
            ) = (&*sq_, &*sk_, &*sv_, &*so_, &*sg_, &*sl_)
            else {
                candle_core::bail!("attention: backward inputs are not all {} CPU tensors", stringify!($variant))
            };
            let l = &l[ll.start_offset()..][..b * h * sq];
            let (dq, dk, dv) = cpu::backward(
                view(q, lq, d)?,
                view(k, lk, d)?,
                view(v, lv, d)?,
                view(o, lo, d)?,
                view(g, lg, d)?,
                l,
                keep,
                op.dims,
                op.scale,
            );
            let dev = Device::Cpu;
            (
                Tensor::from_vec(dq, (b, sq, h, d), &dev)?,
                Tensor::from_vec(dk, (b, sk, h, d), &dev)?,
                Tensor::from_vec(dv, (b, sk, h, d), &dev)?,
            )
        }};
    }
    Ok(match q.dtype() {
        DType::F32 => run!(F32, F32),
        DType::BF16 => run!(BF16, F32),
        DType::F16 => run!(F16, F32),
        DType::F64 => run!(F64, F64),
        dt => candle_core::bail!("attention: unsupported dtype {dt:?}"),
    })
}
