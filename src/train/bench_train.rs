//! `phasekit bench train`: where the time of a Phased DMD update goes, on any device. Runs the
//! real trainer on a recipe with `--updates` generator updates per phase (each with its TTUR
//! fake updates), nothing saved but the run's end, and prints the seconds per part
//! ([`super::timing`]): the generator's rollouts, the teacher, the fake score, each backward
//! pass and optimiser step, per generator update; the rest of the run (loading, phase ends,
//! expert files) is "other".

use std::path::PathBuf;

use serde::Serialize;

use super::recipe::Recipe;
use super::{timing, TrainOptions};
use crate::error::{Error, Result};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchTrainArgs {
    /// Recipe to time (a transformer recipe, or a toy one on the CPU)
    #[arg(long)]
    pub recipe: PathBuf,
    /// Device: cpu, cuda or cuda:N (cuda needs a build with `--features cuda`)
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Generator updates per phase (each with the recipe's TTUR fake updates)
    #[arg(long, default_value_t = 1)]
    pub updates: u64,
    /// Train at this size only, `F,H,W` in the recipe's `resolution_space` (default: the
    /// recipe's sizes)
    #[arg(long, value_delimiter = ',')]
    pub resolution: Option<Vec<usize>>,
    /// Start even when the memory plan says the run does not fit
    #[arg(long)]
    pub skip_memory_check: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct PartTime {
    pub part: String,
    /// Seconds over the whole run.
    pub seconds: f64,
    /// Seconds per generator update.
    pub per_update: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainTiming {
    pub recipe: String,
    pub model: String,
    pub device: String,
    pub updates: u64,
    pub ttur: u32,
    pub batch: usize,
    /// Wall time of the `train` call.
    pub run_seconds: f64,
    /// The parts' seconds per generator update, summed.
    pub seconds_per_update: f64,
    pub parts: Vec<PartTime>,
    /// `run_seconds` less the parts: loading, phase ends, expert files.
    pub other_seconds: f64,
    /// Peak memory per phase, as `train` reports it.
    pub memory: Vec<super::memory::PhaseMemory>,
}

/// Time the recipe's updates (see the module docs).
pub fn time(a: &BenchTrainArgs) -> Result<TrainTiming> {
    if a.updates == 0 {
        return Err(Error::usage("bench train: --updates must be at least 1"));
    }
    let (mut r, text) = Recipe::load(&a.recipe)?;
    r.train.updates_per_phase = a.updates;
    r.train.checkpoint_every = 0;
    if let Some(res) = &a.resolution {
        if res.len() != 3 {
            return Err(Error::usage(format!("bench train: --resolution takes F,H,W (three numbers), not {res:?}")));
        }
        let t = r.transformer.as_mut().ok_or_else(|| Error::usage("bench train: --resolution is for transformer recipes"))?;
        t.resolutions = vec![[res[0], res[1], res[2]]];
        t.resolution_weights.clear();
    }
    let device = crate::device::parse(&a.device)?;
    let opts = TrainOptions { eval_samples: 0, device: device.clone(), check_memory: !a.skip_memory_check, ..TrainOptions::default() };
    let dir = super::rundir::scratch_dir("bench-train");
    timing::start(&device);
    let t0 = std::time::Instant::now();
    let run = super::train(&r, &text, &dir, &opts, &|_| {});
    let run_seconds = t0.elapsed().as_secs_f64();
    let parts = timing::finish();
    let _ = std::fs::remove_dir_all(&dir);
    let summary = run?;
    let updates = summary.global_step.max(1);
    let total: f64 = parts.iter().map(|(_, s)| s).sum();
    Ok(TrainTiming {
        recipe: a.recipe.display().to_string(),
        model: r.model.clone(),
        device: crate::device::name(&device),
        updates: summary.global_step,
        ttur: r.train.ttur,
        batch: r.train.batch,
        run_seconds,
        seconds_per_update: total / updates as f64,
        parts: parts.into_iter().map(|(p, s)| PartTime { part: p.to_string(), seconds: s, per_update: s / updates as f64 }).collect(),
        other_seconds: (run_seconds - total).max(0.0),
        memory: summary.memory.clone(),
    })
}

/// The `bench train` command.
pub fn run(a: &BenchTrainArgs, json: bool) -> Result<()> {
    let t = time(a)?;
    if json {
        crate::cli::printer::print_json(&t);
        return Ok(());
    }
    println!(
        "{} ({}) on {}: {} generator updates (batch {}, {} fake updates each), {:.3} s per update; the whole run {:.2} s",
        t.recipe, t.model, t.device, t.updates, t.batch, t.ttur, t.seconds_per_update, t.run_seconds
    );
    println!("{:<40} {:>12} {:>8}", "part", "s / update", "share");
    for p in &t.parts {
        println!("{:<40} {:>12.4} {:>7.1}%", p.part, p.per_update, 100.0 * p.per_update / t.seconds_per_update.max(1e-12));
    }
    println!("{:<40} {:>12.4}  (whole run, not per update)", "other: loading, phase ends, files", t.other_seconds);
    Ok(())
}
