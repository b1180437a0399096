//! `phasekit bench`: benchmarks that print ratios against baselines measured in the same run
//! (DESIGN: "how we know it works"). Timed tests are not used: `cargo test` checks correctness.
//!
//! Every bench registers here, as a [`BenchCommand`]:
//! - [`io`]: conversion throughput against `cp` and the PyPI `gguf` package, peak RSS on sparse
//!   full-size replicas;
//! - [`replica`]: write a full-size replica of a real checkpoint, sparse or seeded random
//!   (`crate::replica`);
//! - [`moe`]: MoE assemble against `cp`, verify against cores × `sha256sum`, pack against `zstd`
//!   and `zipnn`;
//! - `block` (`crate::model::bench`): one teacher block forward + backward against candle's matmul;
//! - `train-toy` and `toy-step` (`crate::train::cli`, `crate::train::speed`): the toy trainer over
//!   seeds, and one generator update against its PyTorch twin.
//!
//! Python baselines are files under `benches/`, embedded with `include_str!` and run with `python3`.

pub mod io;
pub mod moe;
pub mod replica;
pub mod report;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use clap::Subcommand;

use crate::cli::printer::Printer;
use crate::error::{Error, Result};
pub use report::{print, render, Line};

/// `phasekit bench` subcommands.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Phased DMD and its baselines on the toy mixture over several seeds (writes docs/results.md tables).
    TrainToy(crate::train::cli::BenchTrainToyArgs),
    /// Milliseconds per toy generator update (with its TTUR fake updates, one thread) vs the
    /// same update in PyTorch on the CPU (`benches/toy_torch.py`, when python3 has torch).
    ToyStep(crate::train::cli::BenchToyStepArgs),
    /// One full-width teacher block forward+backward on the CPU: GFLOP/s vs candle's matmul.
    Block(crate::model::bench::BlockArgs),
    /// The attention op: its paths checked against each other (--check), or timed against
    /// PyTorch's SDPA backends (`benches/attention_torch.py`, when python3 has torch).
    Attention(crate::ops::bench::AttentionArgs),
    /// The fused element-wise ops (norm + modulation, RoPE, gated residual, GELU-tanh): checked
    /// against the candle composition on this device (--check), or timed against it.
    Elementwise(crate::ops::ew_bench::ElementwiseArgs),
    /// Where the time of a Phased DMD update goes: one recipe's updates (TTUR fake updates + a
    /// generator update) on this device, in seconds per part (generator rollout, teacher, fake
    /// score, backward passes, optimiser steps)
    Train(crate::train::bench_train::BenchTrainArgs),
    /// MoE assemble vs `cp`, verify vs cores × `sha256sum`, pack vs `zstd` and `zipnn`.
    Moe(moe::BenchMoeArgs),
    /// Conversion throughput vs `cp` and the PyPI `gguf` package, and peak RSS on sparse
    /// full-size Qwen-Image and Wan2.2 A14B replicas (they cost no disk).
    Io(io::IoArgs),
    /// Write a full-size replica of a real checkpoint: every tensor name and shape, data all
    /// zeros in a sparse file (costs no disk), or seeded random values with --random (costs the
    /// full size on disk; zeros run faster than real data). For memory and speed at real scale.
    Replica(replica::ReplicaArgs),
}

/// Run one bench.
pub fn run(cmd: BenchCommand, p: &Printer) -> Result<()> {
    match cmd {
        BenchCommand::TrainToy(a) => crate::train::cli::bench_train_toy(&a, p.json(), p.quiet()),
        BenchCommand::ToyStep(a) => crate::train::cli::bench_toy_step(&a, p.json(), p.quiet()),
        BenchCommand::Block(a) if a.breakdown => crate::model::breakdown::run(&a, a.against.as_deref(), p.json()),
        BenchCommand::Block(a) => crate::model::bench::run(&a, p.json()),
        BenchCommand::Attention(a) => crate::ops::bench::run(&a, p.json()),
        BenchCommand::Elementwise(a) => crate::ops::ew_bench::run(&a, p.json()),
        BenchCommand::Train(a) => crate::train::bench_train::run(&a, p.json()),
        BenchCommand::Moe(a) => moe::run(a, p),
        BenchCommand::Io(a) => io::run(a, p),
        BenchCommand::Replica(a) => replica::run(a, p),
    }
}

/// Best wall time of `repeats` runs of `f`. Before each run (untimed) the paths in `clear` are
/// removed and dirty pages are flushed, so no contender pays for freeing or writing back an
/// earlier run's output (with `discard` mounts, freeing a GB file is not free).
pub(crate) fn best<F: FnMut() -> Result<()>>(repeats: usize, clear: &[&Path], mut f: F) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        for p in clear {
            rm(p);
        }
        unsafe { libc::sync() };
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

pub(crate) fn rm(p: &Path) {
    let _ = if p.is_dir() { std::fs::remove_dir_all(p) } else { std::fs::remove_file(p) };
}

pub(crate) fn sh(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().map_err(|e| Error::io(what, e))?;
    if !out.status.success() {
        return Err(Error::internal(format!("{what} failed: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(())
}
