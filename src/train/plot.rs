//! The plots of a run, drawn by [`crate::plot`] from the run's data: `samples.png` (the samples
//! after every step, σ in each panel's title), `losses.png` (generator and fake loss per phase)
//! and the quickstart's `metrics.png` (a bar chart of each sampler's metrics).

use std::path::Path;

use super::metrics::{to_rows, Metrics};
use super::rundir::{LogLine, RunDir};
use super::toy::sample::LoadedRun;
use crate::atomic;
use crate::error::Result;
use crate::plot::{self, BarChart, BarPanel, LineChart, LinePanel, Scatter, ScatterPanel, Series};

/// `samples.png` (noise, then the state after each step, the last panel being the samples; each
/// panel names its σ and the expert that made it) and `losses.png`.
pub fn run_plots(run: &LoadedRun, dir: &Path, seed: u64) -> Result<()> {
    let n = 1000;
    let traj = run.trajectory(n, None, seed ^ 0x9107, None)?;
    // The classes the trajectory drew (after its noise), for the colours.
    let mut rng = crate::rng::Rng::new(seed ^ 0x9107);
    let _ = super::dmd::noise(&mut rng, n, &[run.mixture.dim]);
    let cls = run.mixture.sample_classes(n, &mut rng);
    let sig = run.sigmas(None);
    let d = run.mixture.dim;
    let last = traj.len() - 1;
    let panels = traj
        .iter()
        .zip(&sig)
        .enumerate()
        .map(|(k, (x, s))| {
            let title = match k {
                0 => format!("noise: σ = {}", plot::tick(*s)),
                k if k == last => format!("step {k} (expert {}): σ = 0, samples", run.route(sig[k - 1])),
                k => format!("step {k} (expert {}): σ = {}", run.route(sig[k - 1]), plot::tick(*s)),
            };
            ScatterPanel {
                title,
                points: to_rows(x).chunks(d).map(|p| [p[0], p.get(1).copied().unwrap_or(0.0)]).collect(),
                group: cls.iter().map(|c| *c as usize).collect(),
                markers: run.mixture.means.iter().map(|m| [(1.0 - s) * m[0], (1.0 - s) * m.get(1).copied().unwrap_or(0.0)]).collect(),
            }
        })
        .collect();
    let s = Scatter {
        title: format!("{}: {n} samples after each step", run.manifest.method),
        panels,
        groups: (0..run.mixture.classes).map(|c| format!("class {c}")).collect(),
        marker_label: "mode centre × (1 − σ)".into(),
        range: 3.5,
        x_label: "x₁".into(),
        y_label: "x₂".into(),
        columns: 5,
    };
    atomic::write_file(&dir.join("samples.png"), &plot::scatter(&s)?.png()?)?;
    loss_plot(&run.dir, dir)
}

/// `dir/losses.png`: the loss curves of the run in `run_dir` (its `log.jsonl`), one panel per
/// phase (titled with the σ range of its expert when `manifest.json` says it), for any model.
pub fn loss_plot(run_dir: &Path, dir: &Path) -> Result<()> {
    let lines: Vec<LogLine> = RunDir::new(run_dir).read_log()?;
    let manifest: Option<serde_json::Value> =
        std::fs::read_to_string(run_dir.join("manifest.json")).ok().and_then(|t| serde_json::from_str(&t).ok());
    let phases = lines.iter().map(|l| l.phase + 1).max().unwrap_or(0);
    let range = |p: usize| {
        let e = manifest.as_ref()?.get("experts")?.get(p)?;
        let (lo, hi) = (e.get("sigma_lo")?.as_f64()?, e.get("sigma_hi")?.as_f64()?);
        // A one-step first phase's expert serves σ = 1 alone (its stored range is 1e-9 wide).
        Some(if hi - lo < 1e-6 {
            format!(": σ = {}", plot::tick(hi))
        } else {
            // The expert whose range ends at 1 also serves σ = 1: a closed interval.
            format!(": σ ∈ [{}, {}{}", plot::tick(lo), plot::tick(hi), if hi >= 1.0 { "]" } else { ")" })
        })
    };
    let panels = (0..phases)
        .map(|p| {
            let of = |f: fn(&LogLine) -> f64| lines.iter().filter(|l| l.phase == p).map(|l| (l.global_step as f64, f(l))).collect();
            LinePanel {
                title: format!("phase {} of {phases}{}", p + 1, range(p).unwrap_or_default()),
                series: vec![
                    Series { label: "generator".into(), points: of(|l| l.gen_loss) },
                    Series { label: "fake score".into(), points: of(|l| l.fake_loss) },
                ],
            }
        })
        .collect();
    let log_y = lines.iter().all(|l| l.gen_loss > 0.0 && l.fake_loss > 0.0);
    let title = manifest.as_ref().and_then(|m| m.get("title")?.as_str().map(str::to_string)).unwrap_or_else(|| "run".into());
    let c = LineChart {
        title: format!("{title}: losses per phase"),
        panels,
        x_label: "generator update".into(),
        y_label: if log_y { "loss (log scale)" } else { "loss" }.into(),
        log_y,
        columns: 2,
    };
    atomic::write_file(&dir.join("losses.png"), &plot::lines(&c)?.png()?)
}

/// `path` (a PNG): one bar chart panel per metric, one bar per sampler in `rows`.
pub fn metrics_plot(rows: &[(String, Metrics)], path: &Path) -> Result<()> {
    type Get = fn(&Metrics) -> f64;
    let measures: [(&str, Get); 7] = [
        ("energy distance (lower is better)", |m| m.energy),
        ("MMD² (lower is better)", |m| m.mmd),
        ("modes covered", |m| m.modes_covered as f64),
        ("mode-weight error (lower is better)", |m| m.mode_weight_error),
        ("outlier fraction (lower is better)", |m| m.outliers),
        ("spread (1 = exact)", |m| m.spread),
        ("diversity (1 = exact)", |m| m.diversity),
    ];
    let n = rows.first().map(|r| r.1.n).unwrap_or(0);
    let b = BarChart {
        title: format!("Samplers against the exact mixture ({n} samples each)"),
        items: rows.iter().map(|r| r.0.clone()).collect(),
        panels: measures.iter().map(|(t, f)| BarPanel { title: t.to_string(), values: rows.iter().map(|r| f(&r.1)).collect() }).collect(),
        columns: 4,
    };
    atomic::write_file(path, &plot::bars(&b)?.png()?)
}
