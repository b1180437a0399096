//! Peak memory per phase: resident memory of the process (Linux `VmHWM`, reset at each phase
//! start by writing `5` to `/proc/self/clear_refs`) and, in CUDA builds, device memory.
//!
//! When the reset is not permitted (or not Linux), the figure is the process's running peak and
//! `peak_rss_scope` says `process` instead of `phase`. Runs sharing a process (quickstart's two
//! runs side by side) share one figure.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Device;
use serde::{Deserialize, Serialize};

/// Memory of one phase (or of the part of it this process ran, after a resume).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseMemory {
    pub phase: usize,
    /// Peak resident set size in bytes (`VmHWM`); `None` where the system does not say.
    pub peak_rss_bytes: Option<u64>,
    /// `phase`: since the phase started (phase 0: since the run started, loading included);
    /// `process`: since the process started (the reset was not permitted).
    pub peak_rss_scope: String,
    /// Peak heap bytes in use during the phase (the `phasekit` binary's allocator; `None` in
    /// other programs; for phase 1 of a transformer run, from when the teachers are loaded): the
    /// resident peak without the C allocator's fragmentation and mapped files, what the memory
    /// plan predicts on the CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_heap_bytes: Option<u64>,
    /// CUDA: bytes in use on the device at the phase end (all processes: total − free).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_used_bytes: Option<u64>,
    /// CUDA: peak bytes allocated from the device's default memory pool during the phase (the
    /// pool candle allocates from), reset at each phase start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_peak_bytes: Option<u64>,
}

static PHASE_SCOPED: AtomicBool = AtomicBool::new(false);

/// Start a new measuring window (run start, each phase start): reset the resident peak and the
/// device pool's peak where permitted.
pub fn start(device: &Device) {
    PHASE_SCOPED.store(crate::device::reset_host_peak(), Ordering::Relaxed);
    crate::alloc::reset_peak();
    crate::device::reset_peak(device);
}

/// The window's figures for `phase`, then a new window for the next phase.
pub fn phase_end(phase: usize, device: &Device) -> PhaseMemory {
    let (device_used_bytes, device_peak_bytes) = crate::device::memory(device);
    let m = PhaseMemory {
        phase,
        peak_rss_bytes: crate::device::host_peak(),
        peak_rss_scope: if PHASE_SCOPED.load(Ordering::Relaxed) { "phase" } else { "process" }.to_string(),
        peak_heap_bytes: crate::alloc::peak(),
        device_used_bytes,
        device_peak_bytes,
    };
    start(device);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_covers_an_allocation_of_the_phase() {
        if crate::device::host_rss().is_none() {
            return; // not Linux
        }
        start(&Device::Cpu);
        let before = crate::device::host_rss().unwrap();
        let v = vec![1u8; 64 << 20];
        std::hint::black_box(&v);
        let m = phase_end(3, &Device::Cpu);
        drop(v);
        assert_eq!(m.phase, 3);
        let peak = m.peak_rss_bytes.unwrap();
        assert!(peak >= before + (60 << 20), "peak {peak} before {before}");
        assert!(m.peak_rss_scope == "phase" || m.peak_rss_scope == "process");
        assert_eq!(m.device_used_bytes, None);
    }
}
