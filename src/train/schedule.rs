//! Flow-matching schedule: σ grid, shift, step lists, phases and re-noise intervals.
//!
//! Convention of the teachers (Wan, Qwen-Image, SD3): `x_σ = (1−σ)·x₀ + σ·ε`, σ = 1 is noise,
//! the model predicts `v ≈ ε − x₀`, `timestep = 1000·σ`, Euler steps `x_{σ'} = x_σ + (σ'−σ)·v`.
//! Shift: `σ' = sσ / (1 + (s−1)σ)` applied to `linspace(1, 0, N+1)`.

use serde::Serialize;

use crate::error::{Error, Result};

/// `σ' = sσ/(1+(s−1)σ)`: the timestep shift of Wan / SD3 (Qwen's exponential shift with s = e^μ).
pub fn shift(sigma: f64, s: f64) -> f64 {
    s * sigma / (1.0 + (s - 1.0) * sigma)
}

/// Inverse of [`shift`]: the unshifted σ whose shift is `sigma`.
pub fn unshift(sigma: f64, s: f64) -> f64 {
    sigma / (s - (s - 1.0) * sigma)
}

/// `N+1` σ values `1 = t₀ > t₁ > … > t_N = 0`: `linspace(1, 0, N+1)` warped by the shift.
pub fn sigmas(steps: usize, s: f64) -> Vec<f64> {
    (0..=steps).map(|i| shift(1.0 - i as f64 / steps as f64, s)).collect()
}

/// Rectified-flow transition coefficients from level `s` to `t > s`:
/// `α_{t|s} = (1−t)/(1−s)` and `σ_{t|s} = sqrt(t² − α²_{t|s} s²)`.
pub fn transition(s: f64, t: f64) -> (f64, f64) {
    let a = (1.0 - t) / (1.0 - s);
    let var = t * t - a * a * s * s;
    (a, var.max(0.0).sqrt())
}

/// How re-noise levels are drawn for a phase whose output level is `s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Renoise {
    /// `t ~ T(s, 1]`: each phase's interval contains the previous one (the paper's choice).
    #[default]
    Nested,
    /// `t ~ T(s, t_start]` (TDM-style ablation, App. C.2).
    Disjoint,
}

/// How the generator moves from one step's level to the next (training rollouts and sampling).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Rollout {
    /// Deterministic Euler `x_{t'} = x_t + (t' − t)·v` (the Phased DMD paper's solver).
    #[default]
    Euler,
    /// Predict `x̂₀ = x_t − t·v`, then re-noise it to the next level with fresh Gaussian noise,
    /// `x_{t'} = (1 − t')·x̂₀ + t'·ε` (`x̂₀` itself at `t' = 0`): DMD2's `sample_backward` and its
    /// few-step inference (an LCM-style scheduler).
    X0Renoise,
}

impl Rollout {
    pub fn is_euler(&self) -> bool {
        *self == Rollout::Euler
    }

    /// The `solver` name a run manifest records for this rule.
    pub fn solver(&self) -> &'static str {
        match self {
            Rollout::Euler => "euler",
            Rollout::X0Renoise => "x0-renoise",
        }
    }

    /// The rule a manifest's `solver` names.
    pub fn from_solver(name: &str) -> Option<Rollout> {
        match name {
            "euler" => Some(Rollout::Euler),
            "x0-renoise" => Some(Rollout::X0Renoise),
            _ => None,
        }
    }
}

/// One phase: the steps `[start, end)` of the step list that expert `index` owns.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Phase {
    pub index: usize,
    pub start: usize,
    pub end: usize,
    /// σ at which the phase starts (`t_start`).
    pub sigma_start: f64,
    /// The phase boundary `s = t_end`, where the phase's output lives.
    pub sigma_end: f64,
}

/// The step list of a few-step generator and its split into phases.
#[derive(Debug, Clone, Serialize)]
pub struct Schedule {
    pub shift: f64,
    /// `t₀ = 1 > … > t_N = 0`.
    pub sigmas: Vec<f64>,
    pub phases: Vec<Phase>,
}

impl Schedule {
    /// `boundaries` are the step indices where phases end, increasing, the last equal to `steps`
    /// (4-step 4-phase: `[1,2,3,4]`; 4-step 2-phase: `[2,4]`; DMD2: `[4]`).
    pub fn new(steps: usize, shift_s: f64, boundaries: &[usize]) -> Result<Schedule> {
        if steps == 0 {
            return Err(Error::usage("recipe: schedule.steps must be at least 1"));
        }
        if shift_s <= 0.0 || !shift_s.is_finite() {
            return Err(Error::usage(format!("recipe: schedule.shift must be positive, not {shift_s}")));
        }
        let b: Vec<usize> = if boundaries.is_empty() { (1..=steps).collect() } else { boundaries.to_vec() };
        if b.last() != Some(&steps) || b.windows(2).any(|w| w[0] >= w[1]) || b[0] == 0 {
            return Err(Error::usage(format!("recipe: schedule.phases {b:?} must be increasing step indices ending at steps = {steps}")));
        }
        let sig = sigmas(steps, shift_s);
        let mut phases = Vec::new();
        let mut start = 0;
        for (index, &end) in b.iter().enumerate() {
            phases.push(Phase { index, start, end, sigma_start: sig[start], sigma_end: sig[end] });
            start = end;
        }
        Ok(Schedule { shift: shift_s, sigmas: sig, phases })
    }

    pub fn steps(&self) -> usize {
        self.sigmas.len() - 1
    }

    /// Which phase owns step `i`.
    pub fn phase_of_step(&self, i: usize) -> usize {
        self.phases.iter().position(|p| i >= p.start && i < p.end).unwrap_or(self.phases.len() - 1)
    }

    /// The unshifted interval `(lo, hi]` from which re-noise levels are drawn uniformly before the shift.
    pub fn renoise_interval(&self, phase: usize, mode: Renoise) -> (f64, f64) {
        let p = &self.phases[phase];
        let lo = unshift(p.sigma_end, self.shift);
        let hi = match mode {
            Renoise::Nested => 1.0,
            Renoise::Disjoint => unshift(p.sigma_start, self.shift),
        };
        (lo, hi)
    }

    /// The σ ranges `[lo, hi)` the experts are routed for (the first also serves σ = 1), one
    /// per phase.
    ///
    /// Phase `k`'s expert learned the steps of its phase interval `(σ_end(k), σ_start(k)]`
    /// (σ_end(k) is the next phase's first step), so it serves σ down to just above σ_end(k):
    /// `lo_k` is the float right above σ_end(k), and a sampler on another grid (`--steps K`)
    /// hands every σ to the expert whose phase it falls in. With a two-expert teacher
    /// (`boundary`, and `base_of(k)`: 0 for the high-noise base, 1 for the low-noise one), the
    /// switch between an expert on the high-noise base and one on the low-noise base is the
    /// boundary itself, so no expert gets a σ its base does not serve. The last expert serves
    /// down to 0.
    pub fn expert_ranges(&self, boundary: Option<f64>, base_of: &dyn Fn(usize) -> usize) -> Vec<(f64, f64)> {
        let n = self.phases.len();
        let switch = |k: usize| -> f64 {
            match boundary {
                Some(b) if base_of(k) != base_of(k + 1) => b,
                _ => next_up(self.phases[k].sigma_end),
            }
        };
        (0..n).map(|k| (if k + 1 == n { 0.0 } else { switch(k) }, if k == 0 { 1.0 } else { switch(k - 1) })).collect()
    }
}

/// The smallest f64 above `x` (for x ≥ 0).
fn next_up(x: f64) -> f64 {
    if x <= 0.0 {
        f64::from_bits(1)
    } else {
        f64::from_bits(x.to_bits() + 1)
    }
}

/// The expert of `ranges` (from [`Schedule::expert_ranges`]) serving σ: the one whose `[lo, hi)`
/// holds it, σ = 1 going to the range that ends at 1; `None` outside [0, 1].
pub fn route(ranges: &[(f64, f64)], sigma: f64) -> Option<usize> {
    if !(0.0..=1.0).contains(&sigma) {
        return None;
    }
    ranges.iter().position(|(lo, hi)| (*lo <= sigma && sigma < *hi) || (sigma == 1.0 && *hi == 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (issue 15, defect 3): a Wan2.2 2-phase run (4 steps, shift 5: σ 1, 0.9375,
    /// 0.8333, 0.625) sampled on an 8-step grid. σ = 0.893 lies in phase 1's interval
    /// (0.8333, 1] and above the boundary 0.875: it goes to phase 1's expert, on the high-noise
    /// base (it went to the low-noise expert, which never saw σ above 0.875).
    #[test]
    fn off_grid_sigmas_go_to_the_expert_of_their_phase_and_base() {
        let s = Schedule::new(4, 5.0, &[2, 4]).unwrap();
        let base = |k: usize| if s.sigmas[s.phases[k].start] >= 0.875 { 0 } else { 1 };
        let r = s.expert_ranges(Some(0.875), &base);
        assert_eq!(r, vec![(0.875, 1.0), (0.0, 0.875)]);
        let eight = sigmas(8, 5.0);
        assert!((eight[3] - 0.8929).abs() < 1e-3);
        assert_eq!(route(&r, eight[3]), Some(0));
        // Every σ goes to an expert whose base serves it, on any grid.
        for k in 1..=32 {
            for &sg in &sigmas(k, 5.0)[..k] {
                let e = route(&r, sg).unwrap();
                assert_eq!(base(e), if sg >= 0.875 { 0 } else { 1 }, "{k} steps, σ {sg}");
            }
        }
        // One base, four one-step phases: each trained σ to its phase, off-grid σ to the phase
        // whose interval (σ_end, σ_start] holds it.
        let s = Schedule::new(4, 3.0, &[]).unwrap();
        let r = s.expert_ranges(None, &|_| 0);
        for (i, sg) in s.sigmas[..4].iter().enumerate() {
            assert_eq!(route(&r, *sg), Some(i));
        }
        for (k, ph) in s.phases.iter().enumerate() {
            let mid = 0.5 * (ph.sigma_start + ph.sigma_end);
            assert_eq!(route(&r, mid), Some(k));
            assert_eq!(route(&r, ph.sigma_end), Some((k + 1).min(3)), "σ_end belongs to the next phase");
        }
        assert_eq!(route(&r, 1.0), Some(0));
        assert_eq!(route(&r, 0.0), Some(3));
    }

    #[test]
    fn wan_lightning_steps() {
        let s = sigmas(4, 5.0);
        let ts: Vec<f64> = s.iter().map(|x| (x * 1000.0 * 10.0).round() / 10.0).collect();
        assert_eq!(ts, vec![1000.0, 937.5, 833.3, 625.0, 0.0]);
        let q = sigmas(4, 3.0);
        let ts: Vec<f64> = q.iter().map(|x| (x * 1000.0).round()).collect();
        assert_eq!(ts, vec![1000.0, 900.0, 750.0, 500.0, 0.0]);
        for x in [0.1, 0.5, 0.9] {
            assert!((unshift(shift(x, 5.0), 5.0) - x).abs() < 1e-12);
        }
    }

    #[test]
    fn phases_and_ranges() {
        let s = Schedule::new(4, 5.0, &[2, 4]).unwrap();
        assert_eq!(s.phases.len(), 2);
        assert!((s.phases[0].sigma_end - 0.833333).abs() < 1e-5);
        let r = s.expert_ranges(None, &|_| 0);
        assert_eq!(r[0], (next_up(s.phases[0].sigma_end), 1.0));
        assert_eq!(r[1], (0.0, next_up(s.phases[0].sigma_end)));
        let (lo, hi) = s.renoise_interval(0, Renoise::Nested);
        assert!((lo - 0.5).abs() < 1e-12 && hi == 1.0);
        assert!(Schedule::new(4, 1.0, &[2, 3]).is_err());
        let (a, sg) = transition(0.0, 0.3);
        assert!((a - 0.7).abs() < 1e-12 && (sg - 0.3).abs() < 1e-12);
    }
}
