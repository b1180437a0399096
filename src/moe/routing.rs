//! The routing table: which expert serves which noise level σ.
//!
//! σ is the noise level the denoiser is called with (after the sampler's shift), in [0, 1];
//! the timestep is t = σ · `num_train_timesteps`. Expert *e* serves σ with
//! `sigma_lo ≤ σ < sigma_hi`; the expert whose `sigma_hi` is 1 also serves σ = 1. Sorted by
//! `sigma_lo`, the ranges must start at 0, end at 1 and touch exactly (no gap, no overlap), so
//! every σ in (0, 1] has exactly one expert. This is Wan2.2's rule (`t >= boundary` → high-noise
//! expert) generalised to any number of experts.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Kind, Result};

/// How an expert's weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpertKind {
    /// Full weights under `experts.<i>.` (and `shared.`).
    Full,
    /// Kohya-style LoRA (`<param>.lora_down.weight`, `.lora_up.weight`, `.alpha`) over `base.`.
    Lora,
}

impl ExpertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ExpertKind::Full => "full",
            ExpertKind::Lora => "lora",
        }
    }
}

/// One expert's row of the routing table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpertRoute {
    /// Human name (`high_noise`, `low_noise`, `e2`, ...); unique.
    pub name: String,
    pub kind: ExpertKind,
    pub sigma_lo: f64,
    pub sigma_hi: f64,
    /// The sampler timesteps (t = σ·T) this expert serves, in sampling order.
    pub timesteps: Vec<f64>,
    /// Classifier-free guidance scale for this expert's steps (default: the table's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f64>,
    /// The base a LoRA expert applies to: `j ≥ 1` is stored under `bases.<j>.`; absent is the
    /// base under `base.` (`phasekit.moe/2`; see `docs/moe-format.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<usize>,
}

/// The routing table stored under `phasekit.moe.routing`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Routing {
    /// Experts in storage order (`experts.<i>.` is `experts[i]`).
    pub experts: Vec<ExpertRoute>,
    /// Flow-matching shift s of the sampler: σ' = s·σ / (1 + (s−1)·σ).
    pub shift: f64,
    /// Sampler the experts were distilled for (`euler`).
    pub solver: String,
    /// Default CFG scale (1 for distilled students).
    pub guidance: f64,
    /// Number of sampling steps.
    pub steps: u32,
    /// T in t = σ·T (1000 for Wan2.2 and Qwen-Image).
    pub num_train_timesteps: f64,
    /// The σ of each sampling step (shifted), in sampling order.
    pub sigmas: Vec<f64>,
}

/// The shifted σ schedule of an Euler flow sampler: `linspace(1, 0, steps+1)` without the final
/// 0, each mapped through σ' = s·σ/(1+(s−1)·σ) (Wan2.2-Lightning: 4 steps, shift 5 →
/// t = 1000, 937.5, 833.3, 625).
pub fn schedule(steps: u32, shift: f64) -> Vec<f64> {
    (0..steps)
        .map(|k| {
            let s = 1.0 - k as f64 / steps as f64;
            shift * s / (1.0 + (shift - 1.0) * s)
        })
        .collect()
}

fn bad(msg: String) -> Error {
    Error::new(Kind::Inconsistent, msg)
}

impl Routing {
    /// Build a table from σ ranges, computing each expert's timesteps from the schedule.
    pub fn new(
        experts: Vec<(String, ExpertKind, f64, f64, Option<f64>)>,
        steps: u32,
        shift: f64,
        solver: &str,
        guidance: f64,
        num_train_timesteps: f64,
    ) -> Result<Routing> {
        if steps == 0 || steps > 10_000 {
            return Err(Error::usage(format!("--steps must be 1..=10000, got {steps}")));
        }
        if !(shift.is_finite() && shift > 0.0) {
            return Err(Error::usage(format!("--shift must be a positive number, got {shift}")));
        }
        let sigmas = schedule(steps, shift);
        let mut r = Routing {
            experts: experts
                .into_iter()
                .map(|(name, kind, lo, hi, g)| ExpertRoute {
                    name,
                    kind,
                    sigma_lo: lo,
                    sigma_hi: hi,
                    timesteps: Vec::new(),
                    guidance: g,
                    base: None,
                })
                .collect(),
            shift,
            solver: solver.to_string(),
            guidance,
            steps,
            num_train_timesteps,
            sigmas: sigmas.clone(),
        };
        r.validate_ranges()?;
        for s in sigmas {
            let e = r.expert_for_sigma(s).ok_or_else(|| Error::internal(format!("σ {s} has no expert")))?;
            r.experts[e].timesteps.push(s * num_train_timesteps);
        }
        Ok(r)
    }

    /// Check names, numbers and coverage of (0, 1].
    pub fn validate_ranges(&self) -> Result<()> {
        if self.experts.is_empty() {
            return Err(bad("the routing table has no experts".into()));
        }
        let mut names = std::collections::HashSet::new();
        for (i, e) in self.experts.iter().enumerate() {
            if e.name.is_empty() || !e.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                return Err(bad(format!(
                    "expert {i}: name '{}' must be non-empty ASCII letters, digits, '_' or '-'",
                    crate::error::clean(&e.name)
                )));
            }
            if !names.insert(e.name.as_str()) {
                return Err(bad(format!("expert name '{}' is used twice", e.name)));
            }
            if !(e.sigma_lo.is_finite() && e.sigma_hi.is_finite() && 0.0 <= e.sigma_lo && e.sigma_lo < e.sigma_hi && e.sigma_hi <= 1.0) {
                return Err(bad(format!("expert {i} ({}): σ range [{}, {}) must satisfy 0 ≤ lo < hi ≤ 1", e.name, e.sigma_lo, e.sigma_hi)));
            }
        }
        let mut order: Vec<usize> = (0..self.experts.len()).collect();
        order.sort_by(|&a, &b| self.experts[a].sigma_lo.total_cmp(&self.experts[b].sigma_lo));
        let first = &self.experts[order[0]];
        if first.sigma_lo != 0.0 {
            return Err(bad(format!(
                "routing does not cover (0, {}]: the lowest expert ({}) starts at σ = {}",
                first.sigma_lo, first.name, first.sigma_lo
            )));
        }
        for w in order.windows(2) {
            let (a, b) = (&self.experts[w[0]], &self.experts[w[1]]);
            if b.sigma_lo < a.sigma_hi {
                return Err(bad(format!(
                    "σ ranges overlap: {} [{}, {}) and {} [{}, {})",
                    a.name, a.sigma_lo, a.sigma_hi, b.name, b.sigma_lo, b.sigma_hi
                )));
            }
            if b.sigma_lo > a.sigma_hi {
                return Err(bad(format!("σ ranges leave a gap [{}, {}) between {} and {}", a.sigma_hi, b.sigma_lo, a.name, b.name)));
            }
        }
        let last = &self.experts[*order.last().expect("non-empty")];
        if last.sigma_hi != 1.0 {
            return Err(bad(format!(
                "routing does not cover ({}, 1]: the highest expert ({}) ends at σ = {}",
                last.sigma_hi, last.name, last.sigma_hi
            )));
        }
        Ok(())
    }

    /// Full validation of a stored table: ranges, then that every step's σ is served by the
    /// expert that lists its timestep, and that the schedule matches steps and shift.
    pub fn validate(&self) -> Result<()> {
        self.validate_ranges()?;
        for e in &self.experts {
            match (e.base, e.kind) {
                (Some(0), _) => return Err(bad(format!("expert {}: base 0 is written as no base", e.name))),
                (Some(_), ExpertKind::Full) => return Err(bad(format!("expert {} holds full weights but names a base", e.name))),
                _ => {}
            }
        }
        if self.sigmas.len() != self.steps as usize {
            return Err(bad(format!("routing lists {} sigmas for {} steps", self.sigmas.len(), self.steps)));
        }
        if !(self.num_train_timesteps.is_finite() && self.num_train_timesteps > 0.0) {
            return Err(bad(format!("num_train_timesteps {} is not positive", self.num_train_timesteps)));
        }
        let mut listed = 0;
        for (i, e) in self.experts.iter().enumerate() {
            for &t in &e.timesteps {
                let s = t / self.num_train_timesteps;
                if self.expert_for_sigma(s) != Some(i) {
                    return Err(bad(format!(
                        "expert {} lists timestep {t} which its σ range [{}, {}) does not contain",
                        e.name, e.sigma_lo, e.sigma_hi
                    )));
                }
                listed += 1;
            }
        }
        for &s in &self.sigmas {
            let t = s * self.num_train_timesteps;
            let e = self.expert_for_sigma(s).ok_or_else(|| bad(format!("sampling σ {s} is outside [0, 1]")))?;
            if !self.experts[e].timesteps.iter().any(|&x| (x - t).abs() <= 1e-9 * self.num_train_timesteps) {
                return Err(bad(format!("sampling step at t = {t} is not listed by expert {}", self.experts[e].name)));
            }
        }
        if listed != self.sigmas.len() {
            return Err(bad(format!("experts list {listed} timesteps but the sampler has {} steps", self.sigmas.len())));
        }
        Ok(())
    }

    /// The expert serving σ (index into [`Routing::experts`]); `None` outside [0, 1].
    pub fn expert_for_sigma(&self, sigma: f64) -> Option<usize> {
        if !(0.0..=1.0).contains(&sigma) {
            return None;
        }
        self.experts.iter().position(|e| (e.sigma_lo <= sigma && sigma < e.sigma_hi) || (sigma == 1.0 && e.sigma_hi == 1.0))
    }

    /// The expert serving timestep t (= σ·T).
    pub fn expert_for_timestep(&self, t: f64) -> Option<usize> {
        self.expert_for_sigma(t / self.num_train_timesteps)
    }

    /// Wan-style two-expert routing: `(high, low, boundary_ratio)` when there are exactly two
    /// experts, one on [b, 1] and one on [0, b).
    pub fn two_expert_boundary(&self) -> Option<(usize, usize, f64)> {
        if self.experts.len() != 2 {
            return None;
        }
        let (a, b) = (&self.experts[0], &self.experts[1]);
        if a.sigma_lo > b.sigma_lo {
            Some((0, 1, a.sigma_lo))
        } else {
            Some((1, 0, b.sigma_lo))
        }
    }

    /// ModelSpec `timestep_range` of one expert (`<min>,<max>` in whole timesteps) or of all.
    pub fn timestep_range(&self, expert: Option<usize>) -> String {
        let (lo, hi) = match expert {
            Some(i) => (self.experts[i].sigma_lo, self.experts[i].sigma_hi),
            None => (0.0, 1.0),
        };
        format!("{},{}", (lo * self.num_train_timesteps).round() as i64, (hi * self.num_train_timesteps).round() as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two(b: f64) -> Vec<(String, ExpertKind, f64, f64, Option<f64>)> {
        vec![("high_noise".into(), ExpertKind::Lora, b, 1.0, None), ("low_noise".into(), ExpertKind::Lora, 0.0, b, None)]
    }

    #[test]
    fn lightning_schedule_and_split() {
        let r = Routing::new(two(0.875), 4, 5.0, "euler", 1.0, 1000.0).unwrap();
        assert_eq!(r.experts[0].timesteps, vec![1000.0, 937.5]);
        assert_eq!(r.experts[1].timesteps.len(), 2);
        assert!((r.experts[1].timesteps[0] - 833.3333333333334).abs() < 1e-9);
        assert_eq!(r.experts[1].timesteps[1], 625.0);
        r.validate().unwrap();
        assert_eq!(r.expert_for_sigma(1.0), Some(0));
        assert_eq!(r.expert_for_sigma(0.875), Some(0));
        assert_eq!(r.expert_for_sigma(0.8749), Some(1));
        assert_eq!(r.expert_for_sigma(0.0), Some(1));
        assert_eq!(r.expert_for_sigma(1.5), None);
        assert_eq!(r.two_expert_boundary(), Some((0, 1, 0.875)));
        assert_eq!(r.timestep_range(Some(0)), "875,1000");
    }

    #[test]
    fn rejects_gaps_overlaps_and_partial_cover() {
        let mk = |v: &[(f64, f64)]| {
            Routing::new(
                v.iter().enumerate().map(|(i, &(a, b))| (format!("e{i}"), ExpertKind::Full, a, b, None)).collect(),
                4,
                1.0,
                "euler",
                1.0,
                1000.0,
            )
        };
        for (ranges, want) in [
            (&[(0.5, 1.0), (0.0, 0.4)][..], "gap"),
            (&[(0.4, 1.0), (0.0, 0.5)][..], "overlap"),
            (&[(0.5, 0.9), (0.0, 0.5)][..], "does not cover"),
            (&[(0.5, 1.0), (0.1, 0.5)][..], "does not cover"),
            (&[(0.5, 0.5), (0.0, 0.5)][..], "0 ≤ lo < hi ≤ 1"),
        ] {
            let e = mk(ranges).unwrap_err();
            assert_eq!(e.kind(), Kind::Inconsistent);
            assert!(e.message().contains(want), "{ranges:?}: {}", e.message());
        }
        mk(&[(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]).unwrap();
    }
}
