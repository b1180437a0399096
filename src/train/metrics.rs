//! Distances between generated samples and the exact mixture.
//!
//! - `energy`: energy distance `2E|X−Y| − E|X−X'| − E|Y−Y'|` (U-statistics, so an exact sampler
//!   scores ≈ 0 ± sampling noise) against an equal number of exact mixture samples;
//! - `mmd`: unbiased squared MMD with a Gaussian kernel of bandwidth [`MMD_BANDWIDTH`];
//! - modes: each sample goes to the mode of highest responsibility at σ = 0; it counts only if it
//!   lies within [`MODE_RADIUS`] standard deviations of the mode (else it is an outlier); a
//!   mode is *covered* when it holds at least [`COVER_FRACTION`] of its expected share;
//! - `mode_weight_error`: total variation `½Σ|n_k/n − π_k|` (outliers count as missing mass);
//! - `spread`: within-mode RMS deviation per dimension over the mode's std, averaged over the
//!   covered modes (1 = exact; < 1 = collapsed inside modes);
//! - `diversity`: mean pairwise distance of the samples over that of the exact samples.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::mixture::Mixture;
use crate::rng::Rng;

pub const MMD_BANDWIDTH: f64 = 0.5;
pub const MODE_RADIUS: f64 = 4.0;
pub const COVER_FRACTION: f64 = 0.1;

/// Metrics of one sample set against the mixture.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Metrics {
    pub n: usize,
    pub energy: f64,
    pub mmd: f64,
    pub modes_covered: usize,
    pub modes: usize,
    /// Which modes are covered.
    pub covered: Vec<bool>,
    pub mode_weight_error: f64,
    pub outliers: f64,
    pub spread: f64,
    pub diversity: f64,
}

/// Row-major f64 copy of a `[n, d]` tensor.
pub fn to_rows(x: &Tensor) -> Vec<f64> {
    x.flatten_all().and_then(|t| t.to_vec1::<f32>()).map(|v| v.into_iter().map(f64::from).collect()).unwrap_or_default()
}

fn dist(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt()
}

fn mean_cross(x: &[f64], y: &[f64], d: usize, f: &dyn Fn(f64) -> f64) -> f64 {
    let (nx, ny) = (x.len() / d, y.len() / d);
    let mut s = 0.0;
    for i in 0..nx {
        for j in 0..ny {
            s += f(dist(&x[i * d..(i + 1) * d], &y[j * d..(j + 1) * d]));
        }
    }
    s / (nx * ny) as f64
}

fn mean_within(x: &[f64], d: usize, f: &dyn Fn(f64) -> f64) -> f64 {
    let n = x.len() / d;
    let mut s = 0.0;
    for i in 0..n {
        for j in i + 1..n {
            s += f(dist(&x[i * d..(i + 1) * d], &x[j * d..(j + 1) * d]));
        }
    }
    s / (n * (n - 1) / 2) as f64
}

/// Energy distance (U-statistic) between two samples of `[·, d]` rows.
pub fn energy_distance(x: &[f64], y: &[f64], d: usize) -> f64 {
    let id = |a: f64| a;
    2.0 * mean_cross(x, y, d, &id) - mean_within(x, d, &id) - mean_within(y, d, &id)
}

/// Unbiased squared MMD with a Gaussian kernel.
pub fn mmd2(x: &[f64], y: &[f64], d: usize, h: f64) -> f64 {
    let k = move |r: f64| (-r * r / (2.0 * h * h)).exp();
    mean_within(x, d, &k) + mean_within(y, d, &k) - 2.0 * mean_cross(x, y, d, &k)
}

/// Mode of each row (None for outliers).
pub fn assign(x: &[f64], mix: &Mixture) -> Vec<Option<usize>> {
    let d = mix.dim;
    x.chunks(d)
        .map(|p| {
            let mut best = (f64::NEG_INFINITY, 0);
            for k in 0..mix.modes() {
                let s2 = mix.stds[k] * mix.stds[k];
                let r2: f64 = p.iter().zip(&mix.means[k]).map(|(a, m)| (a - m) * (a - m)).sum();
                let l = mix.weights[k].ln() - 0.5 * d as f64 * s2.ln() - 0.5 * r2 / s2;
                if l > best.0 {
                    best = (l, k);
                }
            }
            let k = best.1;
            (dist(p, &mix.means[k]) <= MODE_RADIUS * mix.stds[k]).then_some(k)
        })
        .collect()
}

/// All metrics of `x` (`[n, d]`) against the mixture, using exact reference samples drawn with `seed`.
pub fn evaluate(x: &Tensor, mix: &Mixture, seed: u64) -> Metrics {
    evaluate_rows(&to_rows(x), mix, seed)
}

pub fn evaluate_rows(x: &[f64], mix: &Mixture, seed: u64) -> Metrics {
    let d = mix.dim;
    let n = x.len() / d;
    let (y, _, _) = mix.sample(n, &mut Rng::new(seed));
    let a = assign(x, mix);
    let mut counts = vec![0usize; mix.modes()];
    let mut sq = vec![0f64; mix.modes()];
    for (i, k) in a.iter().enumerate() {
        if let Some(k) = *k {
            counts[k] += 1;
            sq[k] += x[i * d..(i + 1) * d].iter().zip(&mix.means[k]).map(|(p, m)| (p - m) * (p - m)).sum::<f64>();
        }
    }
    let covered: Vec<bool> = counts.iter().zip(&mix.weights).map(|(c, w)| *c as f64 >= COVER_FRACTION * w * n as f64 && *c > 0).collect();
    let tv = 0.5 * counts.iter().zip(&mix.weights).map(|(c, w)| (*c as f64 / n as f64 - w).abs()).sum::<f64>();
    let outliers = a.iter().filter(|k| k.is_none()).count() as f64 / n as f64;
    let (mut sp, mut m) = (0.0, 0);
    for k in 0..mix.modes() {
        if covered[k] && counts[k] > 1 {
            sp += (sq[k] / (counts[k] * d) as f64).sqrt() / mix.stds[k];
            m += 1;
        }
    }
    let id = |a: f64| a;
    Metrics {
        n,
        energy: energy_distance(x, &y, d),
        mmd: mmd2(x, &y, d, MMD_BANDWIDTH),
        modes_covered: covered.iter().filter(|c| **c).count(),
        modes: mix.modes(),
        covered,
        mode_weight_error: tv,
        outliers,
        spread: if m > 0 { sp / m as f64 } else { 0.0 },
        diversity: mean_within(x, d, &id) / mean_within(&y, d, &id),
    }
}

/// A Markdown table of metrics.
pub fn table(rows: &[(String, Metrics)]) -> String {
    let mut s = String::from(
        "| sampler | energy dist. | MMD² | modes | mode-weight err. | outliers | spread | diversity |\n|---|---|---|---|---|---|---|---|\n",
    );
    for (n, m) in rows {
        s.push_str(&format!(
            "| {n} | {:.4} | {:.4} | {}/{} | {:.3} | {:.3} | {:.2} | {:.2} |\n",
            m.energy, m.mmd, m.modes_covered, m.modes, m.mode_weight_error, m.outliers, m.spread, m.diversity
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::mixture::MixtureConfig;

    #[test]
    fn exact_samples_score_near_zero_and_collapse_scores_high() {
        let mix = Mixture::new(&MixtureConfig::default()).unwrap();
        let (x, _, modes) = mix.sample(1000, &mut Rng::new(1));
        let m = evaluate_rows(&x, &mix, 2);
        assert!(m.energy.abs() < 0.02, "{m:?}");
        assert_eq!(m.modes_covered, 8);
        assert!(m.mode_weight_error < 0.05 && (m.spread - 1.0).abs() < 0.1 && (m.diversity - 1.0).abs() < 0.05, "{m:?}");
        // Keep only the first 6 modes: coverage drops, distances grow.
        let y: Vec<f64> = x.chunks(2).zip(&modes).filter(|(_, k)| **k < 6).flat_map(|(p, _)| p.to_vec()).collect();
        let m2 = evaluate_rows(&y, &mix, 2);
        assert_eq!(m2.modes_covered, 6);
        assert!(m2.energy > 0.1 && m2.mode_weight_error > 0.2, "{m2:?}");
    }
}
