//! Wall time of one toy generator update (with its TTUR fake updates), for
//! `examples/toy_update.rs` and `phasekit bench toy-step`, and the PyTorch twin of the same
//! update (`benches/toy_torch.py`, run when `python3` has torch).
//!
//! The Rust side is the real trainer: [`super::train`] on a `bench train-toy` method's recipe
//! (exact mixture as the real score), each update timed between two of its progress events.

use std::cell::RefCell;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::experiments::{methods, recipe_for};
use super::mixture::{Mixture, MixtureConfig};
use super::recipe::{Backprop, FakeObjective, Recipe};
use super::rundir::{self, Event};
use super::schedule::Renoise;
use super::toy;
use super::TrainOptions;
use crate::error::{Error, IoContext, Result};

/// The PyTorch twin, embedded so that the installed binary can run it.
pub const TORCH_TWIN: &str = include_str!("../../benches/toy_torch.py");

/// What [`time_updates`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct UpdateTiming {
    /// The `bench train-toy` method key.
    pub method: String,
    /// The recipe the updates ran (teacher kind exact, the method's settings).
    #[serde(skip)]
    pub recipe: Recipe,
    pub pretrain_steps: u64,
    pub pretrain_seconds: f64,
    /// Generator updates run.
    pub updates: u64,
    /// Wall time of the whole `train` call (phase ends, expert files and checkpoints included).
    pub train_seconds: f64,
    /// Seconds of each generator update, in order (the first includes the run's set-up).
    pub per_update: Vec<f64>,
}

impl UpdateTiming {
    /// Median ms per update, leaving out the first `warmup` (all of them when too few remain).
    pub fn median_ms(&self, warmup: usize) -> f64 {
        median_ms(skip_warmup(&self.per_update, warmup))
    }
    /// Mean ms per update after `warmup`.
    pub fn mean_ms(&self, warmup: usize) -> f64 {
        let v = skip_warmup(&self.per_update, warmup);
        1e3 * v.iter().sum::<f64>() / v.len().max(1) as f64
    }
    /// Updates the median is taken over.
    pub fn timed(&self, warmup: usize) -> usize {
        skip_warmup(&self.per_update, warmup).len()
    }
}

fn skip_warmup(v: &[f64], warmup: usize) -> &[f64] {
    if v.len() > warmup {
        &v[warmup..]
    } else {
        v
    }
}

fn median_ms(v: &[f64]) -> f64 {
    crate::ops::bench::median(&mut v.iter().map(|x| 1e3 * x).collect::<Vec<f64>>())
}

/// Pretrain a teacher (`pretrain_steps`, default the recipe's), then train method `key` for
/// `updates` generator updates in a scratch folder, timing each update. Call
/// [`super::single_threaded_kernels`] first to measure what the trainer runs.
pub fn time_updates(key: &str, updates: u64, pretrain_steps: Option<u64>) -> Result<UpdateTiming> {
    let m =
        methods().into_iter().find(|m| m.key == key).ok_or_else(|| Error::usage(format!("'{key}' is not a bench train-toy method key")))?;
    let mut base = Recipe::parse(m.base, Path::new(key))?;
    if let Some(s) = pretrain_steps {
        base.teacher.pretrain.steps = s;
    }
    let dir = rundir::scratch_dir("toy-step");
    std::fs::create_dir_all(&dir).with_file(&dir)?;
    let result = time_in(&dir, key, &m, &base, updates);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn time_in(dir: &Path, key: &str, m: &super::experiments::Method, base: &Recipe, updates: u64) -> Result<UpdateTiming> {
    let mix = Mixture::new(&base.mixture)?;
    let t = Instant::now();
    let teacher = toy::pretrain_teacher(base, &mix, &|_, _, _| {})?;
    let pretrain_seconds = t.elapsed().as_secs_f64();
    let teacher_file = dir.join("teacher.safetensors");
    rundir::write_tensors(&teacher_file, &teacher.named_tensors(), &[])?;
    let r = recipe_for(m, 0, updates, &teacher_file)?;
    let stamps = RefCell::new(Vec::new());
    let t = Instant::now();
    let on = |e: &Event| {
        if matches!(e, Event::Step { .. }) {
            stamps.borrow_mut().push(Instant::now());
        }
    };
    let s = super::train(&r, &r.to_toml(), &dir.join("run"), &TrainOptions::default(), &on)?;
    let train_seconds = t.elapsed().as_secs_f64();
    let mut prev = t;
    let per_update = stamps
        .into_inner()
        .into_iter()
        .map(|x| {
            let d = x.duration_since(prev).as_secs_f64();
            prev = x;
            d
        })
        .collect();
    Ok(UpdateTiming {
        method: key.into(),
        recipe: r,
        pretrain_steps: base.teacher.pretrain.steps,
        pretrain_seconds,
        updates: s.global_step,
        train_seconds,
        per_update,
    })
}

/// `python3 -c "import torch"` succeeds.
pub fn python_has_torch() -> bool {
    Command::new("python3").args(["-c", "import torch"]).output().is_ok_and(|o| o.status.success())
}

/// The JSON line `benches/toy_torch.py` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TorchTiming {
    pub torch: String,
    pub threads: u64,
    pub batch: usize,
    pub ttur: u32,
    pub steps: usize,
    pub updates: u64,
    pub timed: usize,
    pub ms_per_update_median: f64,
    pub ms_per_update_mean: f64,
}

/// The twin's arguments for recipe `r`; an error when `r` leaves what the twin implements (one
/// phase per step, shift 1, last-step gradient, nested re-noise, the subinterval fake target,
/// no guidance, the default mixture, AdamW β = (0, 0.999) without weight decay).
pub fn torch_args(r: &Recipe, updates: u64, warmup: usize) -> Result<Vec<String>> {
    let sched = r.schedule.build()?;
    let s = &r.schedule;
    let t = &r.train;
    let same = sched.phases.len() == sched.steps()
        && s.shift == 1.0
        && !s.sgts
        && s.backprop == Backprop::Last
        && s.renoise == Renoise::Nested
        && t.fake_objective == FakeObjective::Subinterval
        && t.fake_weight.is_eq13()
        && t.generator_weight.is_dmd2()
        && s.renoise_fixed.is_none()
        && s.rollout.is_euler()
        && r.teacher.guidance == 1.0
        && r.mixture == MixtureConfig::default()
        && t.betas == [0.0, 0.999]
        && t.eps == 1e-8
        && t.weight_decay == 0.0
        && t.fake_reinit;
    if !same {
        return Err(Error::usage(format!("recipe '{}' has settings the PyTorch twin (benches/toy_torch.py) does not implement", r.name)));
    }
    let c = &r.mlp;
    Ok([
        ("--updates", updates.to_string()),
        ("--warmup", warmup.to_string()),
        ("--batch", t.batch.to_string()),
        ("--ttur", t.ttur.to_string()),
        ("--steps", sched.steps().to_string()),
        ("--width", c.width.to_string()),
        ("--depth", c.depth.to_string()),
        ("--time-freqs", c.time_freqs.to_string()),
        ("--class-dim", c.class_dim.to_string()),
        ("--gen-lr", t.gen_lr.to_string()),
        ("--fake-lr", t.fake_lr.to_string()),
        ("--grad-clip", t.grad_clip.to_string()),
        ("--clamp-max", t.fake_clamp_max.to_string()),
        ("--norm-min", t.norm_min.to_string()),
        ("--threads", "1".to_string()),
    ]
    .into_iter()
    .flat_map(|(k, v)| [k.to_string(), v])
    .collect())
}

/// Run the PyTorch twin of recipe `r`'s update (`updates` in all, the median after `warmup`).
pub fn time_torch(r: &Recipe, updates: u64, warmup: usize) -> Result<TorchTiming> {
    let args = torch_args(r, updates, warmup)?;
    let script = rundir::scratch_dir("toy-torch").with_extension("py");
    std::fs::write(&script, TORCH_TWIN).with_file(&script)?;
    let out = Command::new("python3").arg(&script).args(&args).output();
    let _ = std::fs::remove_file(&script);
    let out = out.map_err(|e| Error::io("python3", e))?;
    if !out.status.success() {
        return Err(Error::internal(format!("benches/toy_torch.py failed: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().rfind(|l| l.trim_start().starts_with('{')).unwrap_or("");
    serde_json::from_str(line).map_err(|e| Error::internal(format!("benches/toy_torch.py printed no timing JSON ({e}): {}", text.trim())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_warmup() {
        assert_eq!(median_ms(&[0.003, 0.001, 0.002]), 2.0);
        assert_eq!(median_ms(&[0.004, 0.001, 0.002, 0.003]), 2.5);
        assert_eq!(skip_warmup(&[1.0, 2.0, 3.0], 1), &[2.0, 3.0]);
        assert_eq!(skip_warmup(&[1.0, 2.0], 5), &[1.0, 2.0]);
    }

    #[test]
    fn the_bench_recipe_is_what_the_twin_implements() {
        let m = methods().into_iter().find(|m| m.key == "phased4").unwrap();
        let r = recipe_for(&m, 0, 8, Path::new("teacher.safetensors")).unwrap();
        let a = torch_args(&r, 8, 2).unwrap();
        let at = |k: &str| a[a.iter().position(|x| x == k).unwrap() + 1].clone();
        assert_eq!(
            (at("--batch"), at("--ttur"), at("--steps"), at("--width"), at("--depth")),
            ("256".into(), "5".into(), "4".into(), "64".into(), "3".into())
        );
        let dmd2 = methods().into_iter().find(|m| m.key == "dmd2").unwrap();
        assert!(torch_args(&recipe_for(&dmd2, 0, 8, Path::new("t")).unwrap(), 8, 2).is_err());
    }
}
