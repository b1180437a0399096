//! The embedded Phased DMD trainer (arXiv 2510.27684, as `shared/research/paper.md` transcribes it).
//!
//! Levels, each using only the ones above it:
//! - the method's parts: [`recipe`] (TOML recipes), [`schedule`] (σ grid, shift, phases),
//!   [`mixture`] and [`metrics`] (the exact toy target and distances to it), [`dist`] (ranks and
//!   their collectives), [`optim`] (AdamW with visible state, named trainable variables),
//!   [`dmd`] (generator and fake-score updates, every variant, against
//!   [`crate::model::denoiser::Denoiser`] only), [`memory`] (peak memory per phase);
//! - [`rundir`]: the run folder (recipe, log, checkpoints, experts) and its file types;
//! - [`phases`]: **the** phase loop (resume, optimisers, checkpoints, stop, expert files),
//!   generic over a [`phases::Student`];
//! - the students: [`toy`] (the MLP on the mixture, the embedded default) and [`transformer`]
//!   (Wan2.2, Qwen-Image with LoRA experts), each with its sampler;
//! - around them: [`plot`], [`quickstart`], [`experiments`] and [`speed`] (the toy tables and
//!   timings), [`cli`] (commands).
//!
//! One seeded generator ([`crate::rng::Rng`]) per rank, whose state is part of every
//! checkpoint, so a resumed run equals an uninterrupted one bit for bit on the CPU.

pub mod bench_train;
pub mod cli;
pub mod dist;
pub mod dmd;
pub mod experiments;
pub mod memory;
pub mod metrics;
pub mod mixture;
pub mod optim;
pub mod phases;
pub mod plan;
pub mod plot;
pub mod quickstart;
pub mod recipe;
pub mod rundir;
pub mod schedule;
pub mod speed;
pub mod timing;
pub mod toy;
pub mod transformer;

use std::path::Path;

use candle_core::Device;

use self::dist::DistConfig;
use self::recipe::Recipe;
use self::rundir::{Event, Summary};
use crate::error::Result;

/// Options of one `train` call.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub resume: bool,
    /// Stop (as if killed) after this many generator updates in total; for resume tests.
    pub stop_after: Option<u64>,
    /// Samples drawn for the final metrics (0: skip metrics and plots).
    pub eval_samples: usize,
    /// This process's rank and how to reach the others (default: one rank).
    pub dist: DistConfig,
    /// Where transformer runs compute (the toy always runs on the CPU).
    pub device: Device,
    /// Bytes the device offers (default: what it reports; see [`plan::capacity`]).
    pub device_memory: Option<u64>,
    /// Refuse (exit 9) a transformer run whose memory plan does not fit the device, before
    /// loading anything.
    pub check_memory: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            resume: false,
            stop_after: None,
            eval_samples: 0,
            dist: DistConfig::default(),
            device: Device::Cpu,
            device_memory: None,
            check_memory: true,
        }
    }
}

/// Train a recipe into the run folder `out`: the toy or a transformer student, through the one
/// phase loop; `on` hears the progress.
pub fn train(r: &Recipe, recipe_text: &str, out: &Path, opts: &TrainOptions, on: &dyn Fn(&Event)) -> Result<Summary> {
    memory::start(&opts.device);
    if r.is_toy() {
        toy::train(r, recipe_text, out, opts, on)
    } else {
        transformer::train(r, recipe_text, out, opts, on)
    }
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
