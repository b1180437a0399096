//! What the element-wise ops ([`super::norm`], [`super::rope`], [`super::gated`],
//! [`super::gelu`]) share: which implementation runs ([`Impl`]), the CPU element types, and the
//! launch of their CUDA kernels (`kernels/{norm,rope,gated,gelu}.cu`), on a GPU or, for CPU
//! tensors, in the emulator of `kernels/emu/` loaded as a shared library ([`emu`]).
//!
//! Each op has three implementations:
//! - **cpu**: one pass over the data in Rust (rayon over rows), for CPU tensors;
//! - **kernels**: the CUDA kernels. On CUDA tensors they run on the GPU; on CPU tensors the same
//!   kernel source, launched by the same host code (parameters, grid, argument order), runs in
//!   the emulator — that is how the kernels are tested without a GPU;
//! - **composed**: the unfused candle composition the models used before (every device; the
//!   reference in tests, and what runs where neither of the others applies, e.g. f64 on CUDA).
//!
//! [`Impl::Auto`] (what the models use) takes cpu on the CPU and kernels on CUDA.
//! `PHASEKIT_ELEMENTWISE=auto|composed|kernels` overrides it, to compare whole runs; `kernels` on
//! CPU tensors needs the emulator (`PHASEKIT_KERNEL_EMULATOR=/path/to/libpk_emu.so`).

use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, Layout, Result, Shape, Storage, Tensor};
use half::{bf16, f16};

/// Which implementation of an element-wise op runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Impl {
    /// The single-pass CPU implementation on the CPU, the kernels on CUDA, composed elsewhere.
    Auto,
    /// The unfused candle composition (every device).
    Composed,
    /// The CUDA kernels: on the GPU for CUDA tensors, in the emulator for CPU tensors.
    Kernels,
}

impl Impl {
    /// [`Impl::Auto`], unless `PHASEKIT_ELEMENTWISE` names another.
    pub fn from_env() -> Result<Impl> {
        match std::env::var("PHASEKIT_ELEMENTWISE").ok().as_deref().map(str::trim) {
            None | Some("") | Some("auto") => Ok(Impl::Auto),
            Some("composed") => Ok(Impl::Composed),
            Some("kernels") => Ok(Impl::Kernels),
            Some(other) => candle_core::bail!("PHASEKIT_ELEMENTWISE={other}: use auto, composed or kernels"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Impl::Auto => "auto",
            Impl::Composed => "composed",
            Impl::Kernels => "kernels",
        }
    }
}

/// What actually runs for one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Run {
    Composed,
    /// The Rust single-pass implementation (CPU tensors).
    Cpu,
    /// The CUDA kernels on the GPU.
    Cuda,
    /// The CUDA kernels in the emulator (CPU tensors).
    Emulated,
}

/// Whether the kernels take a tensor of this dtype (they compute in f32).
pub(crate) fn kernel_dtype(dt: DType) -> bool {
    matches!(dt, DType::F32 | DType::BF16 | DType::F16)
}

/// The implementation that runs for `imp` on `device`, when the fused ones can take the call
/// (`fusable`: dtypes and shapes they support; `kernels`: whether the kernels do).
pub(crate) fn resolve(imp: Impl, device: &Device, fusable: bool, kernels: bool) -> Result<Run> {
    Ok(match imp {
        Impl::Composed => Run::Composed,
        _ if !fusable => Run::Composed,
        Impl::Auto if device.is_cpu() => Run::Cpu,
        Impl::Auto if device.is_cuda() && kernels => Run::Cuda,
        Impl::Auto => Run::Composed,
        Impl::Kernels if !kernels => Run::Composed,
        Impl::Kernels if device.is_cuda() => Run::Cuda,
        Impl::Kernels if device.is_cpu() => {
            emu::ensure_loaded()?;
            Run::Emulated
        }
        Impl::Kernels => Run::Composed,
    })
}

/// `f32` for f32 and 16-bit tensors, `f64` for f64: the precision the ops compute in.
pub(crate) fn wide(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// The arithmetic type of the CPU implementations (f32, or f64 for f64 tensors).
pub(crate) trait Real:
    Copy
    + Send
    + Sync
    + 'static
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + MulAssign
    + candle_core::WithDType
{
    const ZERO: Self;
    const ONE: Self;
    fn of(v: f64) -> Self;
    fn sqrt(self) -> Self;
    fn tanh(self) -> Self;
}

macro_rules! real {
    ($t:ty) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            fn of(v: f64) -> Self {
                v as $t
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
        }
    };
}
real!(f32);
real!(f64);

/// A stored element: read as its arithmetic type [`Elem::A`], written back rounded to nearest even.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    type A: Real;
    fn ld(self) -> Self::A;
    fn st(a: Self::A) -> Self;
}

impl Elem for f32 {
    type A = f32;
    fn ld(self) -> f32 {
        self
    }
    fn st(a: f32) -> f32 {
        a
    }
}
impl Elem for f64 {
    type A = f64;
    fn ld(self) -> f64 {
        self
    }
    fn st(a: f64) -> f64 {
        a
    }
}
impl Elem for bf16 {
    type A = f32;
    fn ld(self) -> f32 {
        self.to_f32()
    }
    fn st(a: f32) -> bf16 {
        bf16::from_f32(a)
    }
}
impl Elem for f16 {
    type A = f32;
    fn ld(self) -> f32 {
        self.to_f32()
    }
    fn st(a: f32) -> f16 {
        f16::from_f32(a)
    }
}

/// The elements of a CPU storage from a layout's start (the ops make their inputs contiguous).
pub(crate) fn cpu_slice<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let v = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("element-wise op: expected a contiguous input"),
    }
}

/// `t` as a contiguous tensor (a copy only when it is not).
pub(crate) fn contiguous(t: &Tensor) -> Result<Tensor> {
    if t.is_contiguous() {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// How the rows of `x [.., d]` take the rows of `t` when `t` broadcasts against `x`: `t`'s leading
/// dimensions equal `x`'s up to some point and are 1 after it, so that `t` has `M` rows of `d`
/// and row `r` of `x` takes row `r / group` of `t`. Returns `(M, group)`, or `None` for other
/// broadcasts (which the composed path handles).
pub(crate) fn row_groups(t: &[usize], x: &[usize]) -> Option<(usize, usize)> {
    let (d, lead) = x.split_last()?;
    if t.len() > x.len() || t.last() != Some(d) {
        return None;
    }
    let mut padded = vec![1; x.len() - t.len()];
    padded.extend_from_slice(t);
    let tl = &padded[..lead.len()];
    let k = tl.iter().zip(lead).take_while(|(a, b)| a == b).count();
    if tl[k..].iter().any(|&a| a != 1) {
        return None;
    }
    let m: usize = lead[..k].iter().product();
    let n: usize = lead.iter().product();
    if m == 0 {
        return None;
    }
    Some((m, n / m))
}

/// A CPU output of `n` elements of `dt` filled with NaN (so that an element no kernel writes
/// shows up), with its address for a kernel in the emulator.
pub(crate) fn cpu_poisoned(dt: DType, n: usize) -> Result<(CpuStorage, u64)> {
    Ok(match dt {
        DType::F32 => {
            let v = vec![f32::NAN; n];
            let p = v.as_ptr() as u64;
            (CpuStorage::F32(v), p)
        }
        DType::BF16 => {
            let v = vec![bf16::NAN; n];
            let p = v.as_ptr() as u64;
            (CpuStorage::BF16(v), p)
        }
        DType::F16 => {
            let v = vec![f16::NAN; n];
            let p = v.as_ptr() as u64;
            (CpuStorage::F16(v), p)
        }
        dt => candle_core::bail!("element-wise kernels: no {dt:?} output"),
    })
}

/// Address of element 0 of a CPU tensor's layout.
pub(crate) fn cpu_addr(s: &CpuStorage, l: &Layout) -> Result<u64> {
    let off = l.start_offset();
    Ok(match s {
        CpuStorage::F32(v) => v[off..].as_ptr() as u64,
        CpuStorage::BF16(v) => v[off..].as_ptr() as u64,
        CpuStorage::F16(v) => v[off..].as_ptr() as u64,
        _ => candle_core::bail!("element-wise kernels: unsupported dtype {:?}", s.dtype()),
    })
}

/// The kernels' name for a dtype.
pub(crate) fn tag(dt: DType) -> Result<&'static str> {
    Ok(match dt {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        dt => candle_core::bail!("element-wise kernels: no kernel for {dt:?}"),
    })
}

/// Whether 16-byte vector accesses apply: rows of `d` elements, every tensor starting on a
/// multiple of 8 elements.
pub(crate) fn vec8(d: usize, offsets: &[usize]) -> bool {
    d % 8 == 0 && offsets.iter().all(|o| o % 8 == 0)
}

/// Chunks of rows for a reduction over `per` rows in each of `m` groups with `d` columns and
/// `threads` columns per block: enough blocks to fill a large GPU (≥ 1024), chunks of ≥ 16 rows.
/// Returns `(chunk, chunks)`.
pub(crate) fn row_chunks(per: usize, m: usize, d: usize, threads: usize) -> (usize, usize) {
    let blocks = m.max(1) * d.div_ceil(threads).max(1);
    let want = 1024usize.div_ceil(blocks).max(1);
    let chunk = per.div_ceil(want).max(16).min(per.max(1));
    (chunk, per.max(1).div_ceil(chunk))
}

/// One kernel launch: name, grid, threads per block, pointer arguments and the parameter struct
/// (the kernels take their pointers first, then the struct by value).
pub(crate) struct Launch<'a, P> {
    pub module: Module,
    pub name: String,
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub ptrs: &'a [u64],
    pub params: &'a P,
}

/// Which `kernels/*.cu` file a kernel is in.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Module {
    Norm,
    Rope,
    Gated,
    Gelu,
}

#[cfg(feature = "cuda")]
impl Module {
    fn ptx(self) -> (&'static str, &'static str) {
        match self {
            Module::Norm => ("phasekit_norm", crate::ops::kernels::NORM),
            Module::Rope => ("phasekit_rope", crate::ops::kernels::ROPE),
            Module::Gated => ("phasekit_gated", crate::ops::kernels::GATED),
            Module::Gelu => ("phasekit_gelu", crate::ops::kernels::GELU),
        }
    }
}

/// The kernels' parameter structs.
#[cfg(feature = "cuda")]
pub(crate) trait Params: Copy + candle_core::cuda_backend::cudarc::driver::DeviceRepr {}
#[cfg(not(feature = "cuda"))]
pub(crate) trait Params: Copy {}

/// `blocks` of `per` items each, as a 1-D grid size.
pub(crate) fn grid1(items: usize, per: usize) -> Result<u32> {
    u32::try_from(items.div_ceil(per).max(1))
        .map_err(|_| candle_core::Error::Msg(format!("element-wise kernels: {items} items is too many")))
}

/// Where kernels run.
pub(crate) enum Exec {
    /// In the emulator, on CPU memory.
    Emu,
    #[cfg(feature = "cuda")]
    Cuda(candle_core::CudaDevice),
}

impl Exec {
    pub fn launch<P: Params>(&self, l: &Launch<'_, P>) -> Result<()> {
        match self {
            Exec::Emu => {
                let _ = l.module; // one library holds every module
                let mut vals: Vec<u64> = l.ptrs.to_vec();
                let mut args: Vec<*mut std::ffi::c_void> = vals.iter_mut().map(|v| v as *mut u64 as *mut std::ffi::c_void).collect();
                let mut p = *l.params;
                args.push(&mut p as *mut P as *mut std::ffi::c_void);
                emu::launch(&l.name, l.grid, l.block, &mut args)
            }
            #[cfg(feature = "cuda")]
            Exec::Cuda(dev) => {
                use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
                use candle_core::cuda_backend::WrapErr;
                let (module, ptx) = l.module.ptx();
                let f = dev.get_or_load_custom_func(&l.name, module, ptx)?;
                let mut b = f.builder();
                for p in l.ptrs {
                    b.arg(p);
                }
                b.arg(l.params);
                let cfg = LaunchConfig { grid_dim: l.grid, block_dim: (l.block, 1, 1), shared_mem_bytes: 0 };
                // SAFETY: every kernel of these modules takes `ptrs.len()` pointers then its
                // parameter struct (mirrored, size asserted on both sides); the ops check sizes
                // and allocate every output before launching.
                unsafe { b.launch(cfg) }.w()?;
                Ok(())
            }
        }
    }
}

/// A kernel output: CPU memory (emulator) or device memory, with its address.
pub(crate) struct Out {
    pub addr: u64,
    storage: Storage,
}

impl Out {
    /// `n` elements of `dt` where `exec` runs (NaN-filled in the emulator).
    pub fn alloc(exec: &Exec, dt: DType, n: usize) -> Result<Out> {
        match exec {
            Exec::Emu => {
                let (s, addr) = cpu_poisoned(dt, n)?;
                Ok(Out { addr, storage: Storage::Cpu(s) })
            }
            #[cfg(feature = "cuda")]
            Exec::Cuda(dev) => cuda::alloc(dev, dt, n),
        }
    }

    pub fn cpu(self) -> Result<CpuStorage> {
        match self.storage {
            Storage::Cpu(s) => Ok(s),
            _ => candle_core::bail!("element-wise kernels: output is not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    pub fn cuda(self) -> Result<candle_core::CudaStorage> {
        match self.storage {
            Storage::Cuda(s) => Ok(s),
            _ => candle_core::bail!("element-wise kernels: output is not on the GPU"),
        }
    }

    pub fn tensor(self, shape: impl Into<Shape>) -> Tensor {
        Tensor::from_storage(self.storage, shape, candle_core::op::BackpropOp::none(), false)
    }
}

/// Address of element 0 of a tensor's layout, for a kernel on `exec`.
pub(crate) fn addr(s: &Storage, l: &Layout) -> Result<u64> {
    match s {
        Storage::Cpu(c) => cpu_addr(c, l),
        #[cfg(feature = "cuda")]
        Storage::Cuda(c) => cuda::addr(c, l),
        _ => candle_core::bail!("element-wise kernels: unsupported device"),
    }
}

/// The executor for tensors on `device` (the emulator for CPU tensors).
pub(crate) fn exec_for(device: &Device) -> Result<Exec> {
    match device {
        Device::Cpu => Ok(Exec::Emu),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => Ok(Exec::Cuda(d.clone())),
        _ => candle_core::bail!("element-wise kernels: unsupported device"),
    }
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    //! Device memory for the kernels. candle runs every op of a device on one stream, so a
    //! pointer's read/write event guard may be dropped before the launch that uses it: the launch
    //! is ordered after everything queued before it on that stream, and a freed buffer is only
    //! reused by work queued later on the same stream.
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
    use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Storage};
    use half::{bf16, f16};

    use super::Out;

    pub fn addr(s: &CudaStorage, l: &Layout) -> Result<u64> {
        let stream = s.device().cuda_stream();
        let off = l.start_offset();
        macro_rules! at {
            ($t:ty) => {{
                let v = s.as_cuda_slice::<$t>()?.slice(off..);
                let (p, _sync) = v.device_ptr(&stream);
                p
            }};
        }
        Ok(match s.dtype() {
            DType::F32 => at!(f32),
            DType::BF16 => at!(bf16),
            DType::F16 => at!(f16),
            dt => candle_core::bail!("element-wise kernels: unsupported dtype {dt:?}"),
        })
    }

    pub fn alloc(dev: &CudaDevice, dt: DType, n: usize) -> Result<Out> {
        let stream = dev.cuda_stream();
        macro_rules! go {
            ($t:ty) => {{
                // SAFETY: every element is written by the kernel the output is allocated for.
                let mut s = unsafe { dev.alloc::<$t>(n.max(1))? };
                let addr = {
                    let (p, _sync) = s.device_ptr_mut(&stream);
                    p
                };
                Out { addr, storage: Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone())) }
            }};
        }
        Ok(match dt {
            DType::F32 => go!(f32),
            DType::BF16 => go!(bf16),
            DType::F16 => go!(f16),
            dt => candle_core::bail!("element-wise kernels: no {dt:?} output"),
        })
    }
}

pub mod emu {
    //! The element-wise kernels on the CPU: `kernels/emu/ops_emu.cpp` built as a shared library
    //! (`c++ -std=c++17 -O2 -shared -fPIC -I kernels kernels/emu/ops_emu.cpp -o libpk_emu.so`)
    //! and loaded here, for [`super::Impl::Kernels`] on CPU tensors. The emulator runs one
    //! launch at a time (one global state), so launches are serialised.
    use std::ffi::{c_char, c_int, c_ulong, c_void, CString};
    use std::path::Path;
    use std::sync::atomic::{AtomicI32, Ordering};
    use std::sync::{Mutex, OnceLock};

    use candle_core::Result;

    type LaunchFn = unsafe extern "C" fn(*const c_char, u32, u32, u32, u32, c_ulong, *mut *mut c_void, c_int) -> c_int;
    type CountFn = unsafe extern "C" fn() -> c_int;

    struct Lib {
        launch: LaunchFn,
        kernels: usize,
    }

    static LIB: OnceLock<std::result::Result<Mutex<Lib>, String>> = OnceLock::new();
    static SCHEDULE: AtomicI32 = AtomicI32::new(0);

    /// How the emulator interleaves the warps of a block (`kernels/emu/README.md`): 0 warps in
    /// step, 1 each warp alone up to its next barrier from the first, 2 from the last.
    pub fn set_schedule(s: i32) {
        SCHEDULE.store(s, Ordering::Relaxed);
    }

    fn open(path: &Path) -> std::result::Result<Lib, String> {
        let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
        // SAFETY: dlopen/dlsym with a NUL-terminated path and names; the symbols have the
        // signatures of kernels/emu/ops_emu.cpp. The library stays loaded for the process.
        unsafe {
            let h = libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
            if h.is_null() {
                let e = libc::dlerror();
                let msg =
                    if e.is_null() { "dlopen failed".to_string() } else { std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned() };
                return Err(format!("{}: {msg}", path.display()));
            }
            let l = libc::dlsym(h, c"pk_emu_launch".as_ptr());
            let n = libc::dlsym(h, c"pk_emu_kernels".as_ptr());
            if l.is_null() || n.is_null() {
                return Err(format!("{}: not a kernel emulator library (no pk_emu_launch)", path.display()));
            }
            let launch: LaunchFn = std::mem::transmute::<*mut c_void, LaunchFn>(l);
            let count: CountFn = std::mem::transmute::<*mut c_void, CountFn>(n);
            Ok(Lib { launch, kernels: count() as usize })
        }
    }

    /// Load the emulator library at `path` (once per process; later calls return the first
    /// result). Returns how many kernels it has.
    pub fn load(path: &Path) -> Result<usize> {
        let r = LIB.get_or_init(|| open(path).map(Mutex::new));
        match r {
            Ok(m) => Ok(m.lock().unwrap_or_else(|e| e.into_inner()).kernels),
            Err(e) => candle_core::bail!("kernel emulator: {e}"),
        }
    }

    /// Whether a library is loaded.
    pub fn loaded() -> bool {
        matches!(LIB.get(), Some(Ok(_)))
    }

    /// Load from `PHASEKIT_KERNEL_EMULATOR` unless loaded; an error says how to get one.
    pub(crate) fn ensure_loaded() -> Result<()> {
        if loaded() {
            return Ok(());
        }
        match std::env::var_os("PHASEKIT_KERNEL_EMULATOR") {
            Some(p) => load(Path::new(&p)).map(|_| ()),
            None => candle_core::bail!(
                "the element-wise kernels on CPU tensors run in the emulator: build it with `c++ -std=c++17 -O2 -shared -fPIC \
                 -I kernels kernels/emu/ops_emu.cpp -o libpk_emu.so` and set PHASEKIT_KERNEL_EMULATOR to its path"
            ),
        }
    }

    pub(crate) fn launch(name: &str, grid: (u32, u32, u32), block: u32, args: &mut [*mut c_void]) -> Result<()> {
        ensure_loaded()?;
        let Some(Ok(lib)) = LIB.get() else { candle_core::bail!("kernel emulator: not loaded") };
        let lib = lib.lock().unwrap_or_else(|e| e.into_inner());
        let n = CString::new(name).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        // SAFETY: `args` holds one pointer per kernel argument, each to a live value of the
        // argument's type (u64 addresses of live buffers, then the parameter struct).
        let rc = unsafe { (lib.launch)(n.as_ptr(), grid.0, grid.1, grid.2, block, 0, args.as_mut_ptr(), SCHEDULE.load(Ordering::Relaxed)) };
        if rc != 0 {
            candle_core::bail!("kernel emulator: no kernel named {name}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_groups_of_broadcasts() {
        assert_eq!(row_groups(&[2, 1, 8], &[2, 5, 8]), Some((2, 5)));
        assert_eq!(row_groups(&[1, 1, 8], &[2, 5, 8]), Some((1, 10)));
        assert_eq!(row_groups(&[8], &[2, 5, 8]), Some((1, 10)));
        assert_eq!(row_groups(&[2, 5, 8], &[2, 5, 8]), Some((10, 1)));
        assert_eq!(row_groups(&[1, 5, 8], &[2, 5, 8]), None);
        assert_eq!(row_groups(&[2, 1, 7], &[2, 5, 8]), None);
        assert_eq!(row_groups(&[2, 1, 1, 8], &[2, 3, 5, 8]), Some((2, 15)));
        assert_eq!(row_groups(&[2, 3, 1, 8], &[2, 3, 5, 8]), Some((6, 5)));
    }

    #[test]
    fn chunks_cover_the_rows() {
        for (per, m, d) in [(1, 1, 8), (1000, 1, 5120), (32760, 2, 5120), (7, 3, 100), (1, 40000, 3072)] {
            let (chunk, chunks) = row_chunks(per, m, d, 128);
            assert!(chunk >= 1 && chunk * chunks >= per && chunk * (chunks - 1) < per, "{per} {m} {d}: {chunk} {chunks}");
        }
    }
}
