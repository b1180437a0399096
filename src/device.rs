//! Where tensors live: `--device cpu|cuda|cuda:N`, one parser for every command.
//!
//! A CPU build (no `cuda` feature) still accepts the flag and answers `cuda` with a named
//! error, so scripts get exit code 7 ("unsupported") instead of a panic.

use candle_core::Device;

use crate::error::{Error, Result};

/// Parse a device name: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
pub fn parse(name: &str) -> Result<Device> {
    let n = name.trim().to_ascii_lowercase();
    if n == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match n.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|i| i.parse::<usize>().ok())
            .ok_or_else(|| Error::usage(format!("invalid device '{name}' (use cpu, cuda or cuda:N)")))?,
        None => return Err(Error::usage(format!("invalid device '{name}' (use cpu, cuda or cuda:N)"))),
    };
    cuda(ordinal)
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| Error::unsupported(format!("CUDA device {ordinal}: {}", crate::error::clean(&e.to_string()))))
}

#[cfg(not(feature = "cuda"))]
fn cuda(ordinal: usize) -> Result<Device> {
    Err(Error::unsupported(format!(
        "cuda:{ordinal}: this phasekit was built without CUDA; rebuild with `cargo build --release --features cuda`"
    )))
}

/// A short name of a device for reports.
pub fn name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}

/// Wait for queued GPU work (for timings); a no-op on the CPU.
pub fn sync(d: &Device) -> Result<()> {
    d.synchronize().map_err(|e| Error::internal(format!("device sync: {}", crate::error::clean(&e.to_string()))))
}

#[cfg(feature = "cuda")]
fn default_pool(d: &candle_core::CudaDevice) -> Option<candle_core::cuda::cudarc::driver::sys::CUmemoryPool> {
    let stream = d.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().ok()?;
    // SAFETY: the device handle comes from a live context.
    unsafe { candle_core::cuda::cudarc::driver::result::device::get_default_mem_pool(ctx.cu_device()) }.ok()
}

/// The device's memory in use (total − free, all processes) and the high-water mark of its
/// default memory pool (the one candle's stream-ordered allocations come from) since the last
/// [`reset_peak`]; `None` on the CPU.
#[cfg(feature = "cuda")]
pub fn memory(device: &Device) -> (Option<u64>, Option<u64>) {
    use candle_core::cuda::cudarc::driver::{result, sys};
    let Device::Cuda(d) = device else { return (None, None) };
    let used = d.cuda_stream().context().mem_get_info().ok().map(|(free, total)| (total - free) as u64);
    let peak = default_pool(d).and_then(|pool| {
        let mut v: u64 = 0;
        // SAFETY: USED_MEM_HIGH is a cuuint64_t.
        unsafe {
            result::mem_pool::get_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut v as *mut u64 as *mut ::core::ffi::c_void,
            )
        }
        .ok()
        .map(|_| v)
    });
    (used, peak)
}

/// Reset the default pool's high-water mark (see [`memory`]).
#[cfg(feature = "cuda")]
pub fn reset_peak(device: &Device) {
    use candle_core::cuda::cudarc::driver::{result, sys};
    let Device::Cuda(d) = device else { return };
    if let Some(pool) = default_pool(d) {
        let mut zero: u64 = 0;
        // SAFETY: USED_MEM_HIGH is a cuuint64_t and may be reset to zero.
        let _ = unsafe {
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut zero as *mut u64 as *mut ::core::ffi::c_void,
            )
        };
    }
}

#[cfg(not(feature = "cuda"))]
pub fn memory(_: &Device) -> (Option<u64>, Option<u64>) {
    (None, None)
}

#[cfg(not(feature = "cuda"))]
pub fn reset_peak(_: &Device) {}

/// Bytes the device can still give: CUDA's free memory, or the host's `MemAvailable`.
pub fn free_bytes(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => proc_kib("/proc/meminfo", "MemAvailable:").map(|k| k * 1024),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => d.cuda_stream().context().mem_get_info().ok().map(|(free, _)| free as u64),
        _ => None,
    }
}

/// The process's resident set size in bytes (`VmRSS`).
pub fn host_rss() -> Option<u64> {
    proc_kib("/proc/self/status", "VmRSS:").map(|k| k * 1024)
}

/// The value of `key` (`"VmRSS:"`, `"MemAvailable:"`, …) in a `/proc` file of `key  N kB` lines.
fn proc_kib(file: &str, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(file).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()
}

/// Reset `VmHWM` to the current RSS (Linux ≥ 4.0); false when not permitted.
pub fn reset_host_peak() -> bool {
    std::fs::OpenOptions::new().write(true).open("/proc/self/clear_refs").and_then(|mut f| std::io::Write::write_all(&mut f, b"5")).is_ok()
}

/// The process's peak resident set size in bytes (`VmHWM`), since the start or the last
/// [`reset_host_peak`].
pub fn host_peak() -> Option<u64> {
    proc_kib("/proc/self/status", "VmHWM:").map(|k| k * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_cuda_is_refused_without_the_feature() {
        assert!(matches!(parse("cpu").unwrap(), Device::Cpu));
        assert_eq!(parse("gpu").unwrap_err().kind(), crate::Kind::Usage);
        assert_eq!(parse("cuda:x").unwrap_err().kind(), crate::Kind::Usage);
        if cfg!(not(feature = "cuda")) {
            let e = parse("cuda:1").unwrap_err();
            assert_eq!(e.kind(), crate::Kind::Unsupported);
            assert!(e.to_string().contains("--features cuda"), "{e}");
        }
    }

    #[test]
    fn the_host_peak_covers_what_was_resident() {
        let before = host_rss().unwrap();
        // 64 MiB touched: resident now, and within the peak after it is freed.
        let v = vec![1u8; 64 << 20];
        let during = host_rss().unwrap();
        drop(std::hint::black_box(v));
        let peak = host_peak().unwrap();
        assert!(during >= before + (60 << 20), "{before} → {during}");
        // The kernel updates the high-water mark lazily (at unmaps): allow it a little slack.
        assert!(peak + (4 << 20) >= during, "peak {peak} < {during}");
        assert_eq!(memory(&Device::Cpu), (None, None));
    }
}
