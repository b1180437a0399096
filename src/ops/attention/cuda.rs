//! Launches of the fused kernels in `kernels/attention.cu` (see its header for the design).
//! Only the driver (libcuda, already linked by candle's CUDA backend) is needed at run time: the
//! PTX is compiled by the driver when the module is first loaded.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Storage, Tensor};
use half::{bf16, f16};

use super::cpu::Dims;

/// Module name under which the PTX is cached by the device.
const MODULE: &str = "phasekit_attention";
const THREADS: u32 = 128;
const PAD: usize = 8;

/// Kernel parameters; the same layout as `struct AttnParams` in `kernels/attention.cu` (both
/// sides assert its size).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct AttnParams {
    q: [i64; 3],
    k: [i64; 3],
    v: [i64; 3],
    o: [i64; 3],
    g: [i64; 3],
    bias_sb: i64,
    b: i32,
    h: i32,
    sq: i32,
    sk: i32,
    has_bias: i32,
    pad0: i32,
    scale: f32,
    scale_log2: f32,
}
const _: () = assert!(std::mem::size_of::<AttnParams>() == 160);

// SAFETY: plain old data with the C layout the kernels declare.
unsafe impl DeviceRepr for AttnParams {}

/// Dynamic shared memory per kernel, in bytes (the same formulas as `attn::*_smem` in the .cu).
fn fwd_smem(d: usize) -> u32 {
    (2 * 64 * (d + PAD) * 2) as u32
}
fn dq_smem(d: usize) -> u32 {
    (64 * (d + PAD) * 2) as u32
}
fn dkdv_smem(d: usize) -> u32 {
    ((2 * 64 + 2 * 32) * (d + PAD) * 2 + 2 * 32 * 4) as u32
}

/// bf16 or f16 inputs, head size 64 or 128, compute capability ≥ 8.0.
pub fn supported(dev: &CudaDevice, dtype: DType, d: usize) -> bool {
    let major = dev.cuda_stream().context().attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR).unwrap_or(0);
    matches!(dtype, DType::BF16 | DType::F16) && matches!(d, 64 | 128) && major >= 8
}

/// Whether a `[B, S, H, D]` tensor can be read with 16-byte loads in place: every row starts on
/// a multiple of 8 elements and D is contiguous.
fn is_aligned(l: &Layout) -> bool {
    let st = l.stride();
    l.start_offset() % 8 == 0 && st[0] % 8 == 0 && st[1] % 8 == 0 && st[2] % 8 == 0 && (st[3] == 1 || l.dims()[3] == 1)
}

/// `x`, copied to a contiguous tensor only if the kernels cannot read it in place.
pub fn aligned(x: &Tensor) -> Result<Tensor> {
    if is_aligned(x.layout()) {
        Ok(x.clone())
    } else {
        x.contiguous()
    }
}

fn strides(l: &Layout) -> Result<[i64; 3]> {
    if !is_aligned(l) {
        candle_core::bail!("attention (fused): input not 16-byte aligned (offset {}, strides {:?})", l.start_offset(), l.stride());
    }
    let st = l.stride();
    Ok([st[0] as i64, st[1] as i64, st[2] as i64])
}

fn params(dims: Dims, scale: f64, has_bias: bool, bias_sb: usize) -> Result<AttnParams> {
    let Dims { b, sq, sk, h, .. } = dims;
    let small = |x: usize, what: &str| {
        i32::try_from(x).map_err(|_| candle_core::Error::Msg(format!("attention (fused): {what} = {x} is too large")))
    };
    Ok(AttnParams {
        b: small(b, "batch")?,
        h: small(h, "heads")?,
        sq: small(sq, "query length")?,
        sk: small(sk, "key length")?,
        has_bias: has_bias as i32,
        bias_sb: bias_sb as i64,
        scale: scale as f32,
        scale_log2: (scale * std::f64::consts::LOG2_E) as f32,
        ..AttnParams::default()
    })
}

fn dtype_name(dt: DType) -> Result<&'static str> {
    match dt {
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        dt => candle_core::bail!("attention (fused): no kernel for {dt:?}"),
    }
}

fn cfg(grid: (u32, u32, u32), smem: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: grid, block_dim: (THREADS, 1, 1), shared_mem_bytes: smem }
}

fn blocks(n: usize, per: usize, what: &str) -> Result<u32> {
    u32::try_from(n.div_ceil(per)).map_err(|_| candle_core::Error::Msg(format!("attention (fused): {what} = {n} is too large")))
}

fn func(dev: &CudaDevice, name: &str, smem: u32) -> Result<CudaFunction> {
    let f = dev.get_or_load_custom_func(name, MODULE, crate::ops::kernels::ATTENTION)?.into_cuda_function();
    // Above 48 KiB a kernel must opt in to more dynamic shared memory.
    if smem > 48 * 1024 {
        f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32).w()?;
    }
    Ok(f)
}

/// A view of a tensor's device memory from its first element.
fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
}

fn cuda_storage(t: &Tensor) -> Result<(candle_core::StorageRef<'_>, &Layout)> {
    let (s, l) = t.storage_and_layout();
    if !matches!(&*s, Storage::Cuda(_)) {
        candle_core::bail!("attention (fused): a tensor is not on the CUDA device");
    }
    Ok((s, l))
}

fn as_cuda(s: &Storage) -> &CudaStorage {
    match s {
        Storage::Cuda(c) => c,
        _ => unreachable!("checked by cuda_storage"),
    }
}

fn wrap<T: CudaDType>(slice: CudaSlice<T>, dev: &CudaDevice, shape: (usize, usize, usize, usize)) -> Tensor {
    Tensor::from_storage(Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone())), shape, BackpropOp::none(), false)
}

/// Forward pass on device storages: the output storage (`[B, Sq, H, D]`, contiguous) and the
/// log-sum-exp tensor (f32 `[B, H, Sq]`).
pub fn forward(
    (q, lq): (&CudaStorage, &Layout),
    (k, lk): (&CudaStorage, &Layout),
    (v, lv): (&CudaStorage, &Layout),
    bias: Option<&Tensor>,
    dims: Dims,
    scale: f64,
) -> Result<(CudaStorage, Tensor)> {
    let dev = q.device().clone();
    let Dims { b, sq, h, d, .. } = dims;
    let dt = q.dtype();
    if k.dtype() != dt || v.dtype() != dt {
        candle_core::bail!("attention (fused): q, k and v dtypes differ");
    }
    let bias_guard = bias.map(cuda_storage).transpose()?;
    let mut p = params(dims, scale, bias.is_some(), dims.sk)?;
    (p.q, p.k, p.v) = (strides(lq)?, strides(lk)?, strides(lv)?);
    let name = format!("attn_fwd_{}_d{d}", dtype_name(dt)?);
    let smem = fwd_smem(d);
    let f = func(&dev, &name, smem)?;
    let grid = (blocks(sq, 64, "query length")?, h as u32, b as u32);
    let lse = dev.alloc_zeros::<f32>(b * h * sq)?;
    macro_rules! go {
        ($t:ty) => {{
            // SAFETY: written in full by the kernel (every row < Sq of every (b, h)).
            let o = unsafe { dev.alloc::<$t>(b * sq * h * d)? };
            let (qv, kv, vv) = (view::<$t>(q, lq)?, view::<$t>(k, lk)?, view::<$t>(v, lv)?);
            let bias_view = match &bias_guard {
                Some((s, l)) => Some(view::<f32>(as_cuda(s), l)?),
                None => None,
            };
            let stream = dev.cuda_stream();
            let mut builder = stream.launch_builder(&f);
            builder.arg(&qv).arg(&kv).arg(&vv);
            match &bias_view {
                Some(bv) => builder.arg(bv),
                // Never read when has_bias = 0; any device pointer will do.
                None => builder.arg(&lse),
            };
            builder.arg(&o).arg(&lse).arg(&p);
            // SAFETY: the argument list matches attn_fwd_*'s signature; sizes were checked above.
            unsafe { builder.launch(cfg(grid, smem)) }.w()?;
            CudaStorage::wrap_cuda_slice(o, dev.clone())
        }};
    }
    let o = match dt {
        DType::BF16 => go!(bf16),
        _ => go!(f16),
    };
    let lse = Tensor::from_storage(Storage::Cuda(CudaStorage::wrap_cuda_slice(lse, dev.clone())), (b, h, sq), BackpropOp::none(), false);
    Ok((o, lse))
}

/// Backward pass: `(dQ, dK, dV)`, contiguous `[B, S, H, D]` in the inputs' dtype.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    d_o: &Tensor,
    lse: &Tensor,
    bias: Option<&Tensor>,
    dims: Dims,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let Dims { b, sq, sk, h, d } = dims;
    let dt = q.dtype();
    let tag = dtype_name(dt)?;
    let (q, k, v, o, d_o) = (aligned(q)?, aligned(k)?, aligned(v)?, aligned(o)?, aligned(d_o)?);
    let lse = lse.contiguous()?;
    let (sq_, lq) = cuda_storage(&q)?;
    let (sk_, lk) = cuda_storage(&k)?;
    let (sv_, lv) = cuda_storage(&v)?;
    let (so_, lo) = cuda_storage(&o)?;
    let (sg_, lg) = cuda_storage(&d_o)?;
    let (sl_, ll) = cuda_storage(&lse)?;
    let bias_guard = bias.map(cuda_storage).transpose()?;
    let dev = as_cuda(&sq_).device().clone();
    let mut p = params(dims, scale, bias.is_some(), sk)?;
    (p.q, p.k, p.v, p.o, p.g) = (strides(lq)?, strides(lk)?, strides(lv)?, strides(lo)?, strides(lg)?);
    let lse_v = view::<f32>(as_cuda(&sl_), ll)?;
    let delta = dev.alloc_zeros::<f32>(b * h * sq)?;

    let f_delta = func(&dev, &format!("attn_bwd_delta_{tag}_d{d}"), 0)?;
    let f_dq = func(&dev, &format!("attn_bwd_dq_{tag}_d{d}"), dq_smem(d))?;
    let f_dkdv = func(&dev, &format!("attn_bwd_dkdv_{tag}_d{d}"), dkdv_smem(d))?;
    let rows = blocks(b * h * sq, (THREADS / 32) as usize, "batch × heads × query length")?;
    let q_grid = (blocks(sq, 64, "query length")?, h as u32, b as u32);
    let k_grid = (blocks(sk, 64, "key length")?, h as u32, b as u32);

    macro_rules! go {
        ($t:ty) => {{
            let (qv, kv, vv) = (view::<$t>(as_cuda(&sq_), lq)?, view::<$t>(as_cuda(&sk_), lk)?, view::<$t>(as_cuda(&sv_), lv)?);
            let (ov, gv) = (view::<$t>(as_cuda(&so_), lo)?, view::<$t>(as_cuda(&sg_), lg)?);
            let bias_view = match &bias_guard {
                Some((s, l)) => Some(view::<f32>(as_cuda(s), l)?),
                None => None,
            };
            // SAFETY (all three launches): argument lists match the kernels' signatures; the
            // outputs are written in full (every row < Sq, respectively < Sk, of every (b, h)).
            let stream = dev.cuda_stream();
            let mut bl = stream.launch_builder(&f_delta);
            bl.arg(&ov).arg(&gv).arg(&delta).arg(&p);
            unsafe { bl.launch(cfg((rows, 1, 1), 0)) }.w()?;

            let dq = unsafe { dev.alloc::<$t>(b * sq * h * d)? };
            let mut bl = stream.launch_builder(&f_dq);
            bl.arg(&qv).arg(&kv).arg(&vv);
            match &bias_view {
                Some(bv) => bl.arg(bv),
                None => bl.arg(&delta),
            };
            bl.arg(&gv).arg(&lse_v).arg(&delta).arg(&dq).arg(&p);
            unsafe { bl.launch(cfg(q_grid, dq_smem(d))) }.w()?;

            let dk = unsafe { dev.alloc::<$t>(b * sk * h * d)? };
            let dv = unsafe { dev.alloc::<$t>(b * sk * h * d)? };
            let mut bl = stream.launch_builder(&f_dkdv);
            bl.arg(&qv).arg(&kv).arg(&vv);
            match &bias_view {
                Some(bv) => bl.arg(bv),
                None => bl.arg(&delta),
            };
            bl.arg(&gv).arg(&lse_v).arg(&delta).arg(&dk).arg(&dv).arg(&p);
            unsafe { bl.launch(cfg(k_grid, dkdv_smem(d))) }.w()?;
            (wrap(dq, &dev, (b, sq, h, d)), wrap(dk, &dev, (b, sk, h, d)), wrap(dv, &dev, (b, sk, h, d)))
        }};
    }
    Ok(match dt {
        DType::BF16 => go!(bf16),
        _ => go!(f16),
    })
}
