//! The embedded default, end to end: pretrain the toy teacher, distil it with Phased DMD (4
//! steps, 4 experts) and with DMD2 for comparison (side by side, one thread each), assemble the
//! Phased DMD run into one routed checkpoint and verify every hash, sample through the
//! checkpoint, and measure each sampler against the exact mixture (`metrics.md`, plots).

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::metrics::{self, Metrics};
use super::mixture::Mixture;
use super::recipe::Recipe;
use super::rundir::{self, Event, Summary};
use super::toy::sample::{sample_denoiser, LoadedMoe, LoadedRun};
use super::toy::{self, mlp::ExactMixture};
use super::TrainOptions;
use crate::error::{Error, IoContext, Kind, Result};
use crate::rng::Rng;

const QUICK_PHASED: &str = include_str!("../../recipes/toy-phased-4step-4phase.toml");
const QUICK_DMD2: &str = include_str!("../../recipes/toy-dmd2-4step.toml");

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Output folder (replaced with `force`).
    pub out: PathBuf,
    pub force: bool,
    pub seed: u64,
}

/// How quickstart reports its progress (the CLI draws progress bars; tests pass [`Silent`]).
pub trait Progress: Sync {
    /// A stage starts (one line, e.g. "1/4 pretraining the toy teacher").
    fn stage(&self, msg: &str);
    /// Progress of one job (`teacher`, `phased`, `dmd2`): its events, until it ends.
    fn job(&self, label: &str) -> Box<dyn Fn(&Event) + Send + Sync + '_>;
}

/// No output.
pub struct Silent;

impl Progress for Silent {
    fn stage(&self, _: &str) {}
    fn job(&self, _: &str) -> Box<dyn Fn(&Event) + Send + Sync + '_> {
        Box::new(|_| {})
    }
}

/// What quickstart made and measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub out: PathBuf,
    pub seconds: f64,
    /// The routed checkpoint of the Phased DMD run.
    pub checkpoint: PathBuf,
    pub experts: usize,
    pub tensors: usize,
    /// Tensor hashes `verify` checked (besides the metadata digest).
    pub tensors_verified: usize,
    /// One row per sampler: its name and its metrics against the exact mixture.
    pub rows: Vec<(String, Metrics)>,
    /// The rows as a Markdown table (also written to `metrics.md`).
    pub table: String,
    /// The HTML report of the folder (`report.html`).
    pub report: PathBuf,
}

/// Run the quickstart into `o.out` (see the module docs).
pub fn run(o: &Options, progress: &dyn Progress) -> Result<Report> {
    let t0 = Instant::now();
    let out = &o.out;
    if out.exists() {
        if !o.force {
            return Err(Error::at(Kind::Usage, out, "output already exists (use --force to replace it)"));
        }
        std::fs::remove_dir_all(out).with_file(out)?;
    }
    std::fs::create_dir_all(out).with_file(out)?;
    // 1. Teacher: flow matching on mixture samples.
    let mut phased = Recipe::parse(QUICK_PHASED, Path::new("recipes/toy-phased-4step-4phase.toml"))?;
    phased.seed = o.seed;
    let mix = Mixture::new(&phased.mixture)?;
    progress.stage("1/4 pretraining the toy teacher (flow matching on the 8-mode mixture)");
    let job = progress.job("teacher");
    let teacher = toy::pretrain_teacher(&phased, &mix, &|step, total, loss| job(&Event::Pretrain { step, total, loss }))?;
    drop(job);
    let teacher_file = out.join("teacher.safetensors");
    toy::write_teacher(&teacher_file, &teacher)?;
    let teacher_abs = std::fs::canonicalize(&teacher_file).with_file(&teacher_file)?;
    // 2. Distil: Phased DMD (4 steps, 4 phases) and the DMD2 baseline, same budget.
    // The two runs are independent and single-threaded: run them side by side.
    let opts = TrainOptions { eval_samples: 0, ..Default::default() };
    let mut jobs = Vec::new();
    for (name, text) in [("phased", QUICK_PHASED), ("dmd2", QUICK_DMD2)] {
        let mut r = Recipe::parse(text, Path::new(name))?;
        r.seed = o.seed;
        r.teacher.checkpoint = Some(teacher_abs.clone());
        progress.stage(&format!("2/4 distilling: {}", toy::method_name(&r, &r.schedule.build()?)));
        jobs.push((name, r));
    }
    let results: Vec<Result<Summary>> = std::thread::scope(|sc| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|(name, r)| {
                let dir = out.join(name);
                let on = progress.job(name);
                let opts = &opts;
                sc.spawn(move || super::train(r, &r.to_toml(), &dir, opts, &*on))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(Error::internal("training thread panicked")))).collect()
    });
    let mut runs = Vec::new();
    for (res, (name, _)) in results.into_iter().zip(&jobs) {
        res?;
        runs.push(out.join(name));
    }
    // 3. Assemble the Phased DMD run into one routed checkpoint and verify every hash.
    let moe_file = out.join("phased-moe.safetensors");
    progress.stage(&format!("3/4 assembling {} → {}", runs[0].display(), moe_file.display()));
    let rep = crate::moe::assemble::assemble_run(&runs[0], &moe_file, false)?;
    let v = crate::moe::verify::verify_path(&moe_file)?;
    if let Some(k) = v.failure() {
        let why = v.faults.first().map(|f| f.message.clone()).unwrap_or_else(|| format!("{} tensor hashes differ", v.mismatches.len()));
        return Err(Error::at(k, &moe_file, format!("the assembled checkpoint does not verify: {why}")));
    }
    progress.stage(&format!(
        "    {} experts, {} tensors, verified ({} tensor hashes and the metadata digest)",
        rep.experts, rep.tensors, v.tensors_checked
    ));
    // 4. Sample and measure against the exact mixture.
    progress.stage("4/4 sampling and measuring against the exact mixture");
    let n = 2000;
    let seed = o.seed ^ 0xE7A1;
    let exact = ExactMixture { mixture: mix.clone() };
    let tf = teacher.frozen();
    let mut rows = Vec::new();
    let (ex, _, _) = mix.sample(n, &mut Rng::new(seed));
    rows.push(("exact mixture (independent draw)".to_string(), metrics::evaluate_rows(&ex, &mix, seed ^ 0x5EED)));
    let x = sample_denoiser(&exact, &mix, n, 100, 1.0, seed)?;
    rows.push(("exact velocity, 100 Euler steps".into(), metrics::evaluate(&x, &mix, seed ^ 0x5EED)));
    for steps in [100, 4] {
        let x = sample_denoiser(&tf, &mix, n, steps, 1.0, seed)?;
        rows.push((format!("MLP teacher, {steps} Euler steps"), metrics::evaluate(&x, &mix, seed ^ 0x5EED)));
    }
    for (i, dir) in runs.iter().enumerate() {
        let r = LoadedRun::open(dir)?;
        // The Phased DMD row samples through the assembled checkpoint (the loader and its
        // routing table); DMD2 from its run folder.
        let x = if i == 0 { LoadedMoe::open(&moe_file)?.sample(n, None, seed, None)? } else { r.sample(n, None, seed, None)? };
        rundir::write_tensors(&dir.join("samples.safetensors"), &[("samples".into(), x.clone())], &[])?;
        rows.push((r.manifest.method.clone(), metrics::evaluate(&x, &mix, seed ^ 0x5EED)));
        let plots = dir.join("plots");
        std::fs::create_dir_all(&plots).with_file(&plots)?;
        super::plot::run_plots(&r, &plots, o.seed)?;
    }
    let table = metrics::table(&rows);
    crate::atomic::write_file(&out.join("metrics.md"), table.as_bytes())?;
    super::plot::metrics_plot(&rows, &out.join("metrics.png"))?;
    let report = crate::report::quickstart(out, &rows)?;
    Ok(Report {
        out: out.clone(),
        seconds: t0.elapsed().as_secs_f64(),
        checkpoint: moe_file,
        experts: rep.experts,
        tensors: rep.tensors,
        tensors_verified: v.tensors_checked,
        rows,
        table,
        report,
    })
}
