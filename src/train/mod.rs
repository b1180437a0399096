//! The embedded Phased DMD trainer (arXiv 2510.27684, as `shared/research/paper.md` transcribes it).
//!
//! One file per concept: [`schedule`] (σ grid, shift, phases), [`mixture`] (the exact toy
//! teacher), [`denoiser`] (the interface the method talks to, and the MLP), [`dmd`] (generator
//! and fake-score updates, every variant), [`optim`] (AdamW with visible state), [`recipe`]
//! (TOML recipes), [`run`] (run folders, checkpoints, resume, experts, manifest), [`metrics`]
//! (distances to the exact mixture), [`plot`] (PNG plots), [`speed`] (update timing and its
//! PyTorch twin), [`cli`] (commands).
//!
//! Everything runs on the CPU in f32 with one seeded generator ([`Rng`]) whose state is part of
//! every checkpoint, so a resumed run equals an uninterrupted one bit for bit.

pub mod cli;
pub mod denoiser;
pub mod dist;
pub mod dmd;
pub mod experiments;
pub mod memory;
pub mod metrics;
pub mod mixture;
pub mod optim;
pub mod plot;
pub mod recipe;
pub mod routed;
pub mod run;
pub mod schedule;
pub mod speed;
pub mod transformer;

use crate::error::Error;

/// candle errors are bugs or resource failures on our side.
pub(crate) fn ce(e: candle_core::Error) -> Error {
    // candle appends a backtrace when RUST_BACKTRACE is set; keep the message.
    let text = e.to_string();
    Error::internal(format!("tensor: {}", text.lines().next().unwrap_or("").trim()))
}

/// Run candle's CPU kernels on one thread. The toy's matrices are small: on two cores, gemm's
/// thread pool costs more than it gains (2.6× slower in our measurement), and one thread per run
/// lets `bench train-toy` run independent runs side by side. candle reads `RAYON_NUM_THREADS` at
/// every kernel call; phasekit's own rayon pool is built from `--threads` before this runs.
///
/// It also keeps freed memory in the process (glibc): candle allocates a fresh buffer for every
/// operation, tens of KiB for the toy, and glibc's default of trimming the heap top back to the
/// kernel made every update page-fault its buffers back in (about a third of a toy update's wall
/// time went to the kernel before this).
pub fn single_threaded_kernels() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    keep_freed_memory();
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // Blocks up to 32 MiB come from the heap, not mmap; the heap top is returned to the kernel
    // only past 256 MiB free; each heap growth asks for 16 MiB more than needed.
    // SAFETY: mallopt only changes glibc's allocator parameters; valid at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TOP_PAD, 16 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

/// A small deterministic generator (SplitMix64) whose whole state is one `u64`, saved in checkpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng {
    pub state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed ^ 0x5851_F42D_4C95_7F2D }
    }
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    /// Uniform in (0, 1].
    pub fn uniform_open0(&mut self) -> f64 {
        1.0 - self.uniform()
    }
    /// Standard normal (Box–Muller, one value per call so the state stays one word).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform_open0();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    pub fn below(&mut self, n: usize) -> usize {
        ((self.uniform() * n as f64) as usize).min(n - 1)
    }
    pub fn categorical(&mut self, w: &[f64]) -> usize {
        let tot: f64 = w.iter().sum();
        let mut u = self.uniform() * tot;
        for (i, x) in w.iter().enumerate() {
            if u < *x {
                return i;
            }
            u -= x;
        }
        w.len() - 1
    }
    pub fn normals_f32(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal() as f32).collect()
    }
    /// An independent generator derived from this one's next output.
    pub fn fork(&mut self) -> Rng {
        Rng { state: self.next_u64() }
    }
}
