//! Expert switch points in the three forms runtimes use: σ, timestep and step index.
//!
//! Runtimes disagree on how to say where the high-noise expert hands over: diffusers and the Wan
//! reference compare the timestep with `boundary_ratio · 1000` (high while `t ≥ 875`), ComfyUI
//! workflows split the step range (steps 0–1 on the high-noise sampler), LightX2V counts steps
//! (`boundary_step_index: 2` over a fixed `denoising_step_list`), TurboDiffusion takes
//! `--boundary 0.9`. The same 4-step schedule can switch at σ 0.875, t 875 or step 2, and a
//! number that is right in one convention is wrong in another.
//!
//! phasekit's routing table holds σ ranges (`σ ≥ b` → the higher expert, `docs/moe-format.md`
//! §4); this module derives, for every switch between consecutive experts (highest σ first),
//! the σ, the timestep `σ·T` and the index of the first sampling step the lower expert serves,
//! and stores them under `phasekit.moe.boundaries`, a JSON list:
//!
//! ```json
//! [{"high": "high_noise", "low": "low_noise", "sigma": 0.875, "timestep": 875.0, "step_index": 2}]
//! ```
//!
//! The key is optional (files written before it stay valid); when present `verify` checks it
//! against the routing table.

use serde::{Deserialize, Serialize};

use super::routing::Routing;
use crate::error::{Error, Kind, Result};

/// `__metadata__` key holding the switch points.
pub const KEY_BOUNDARIES: &str = "phasekit.moe.boundaries";

/// One switch between two experts adjacent in σ.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Boundary {
    /// The expert serving σ ≥ `sigma` (up to its own upper end).
    pub high: String,
    /// The expert serving σ just below `sigma`.
    pub low: String,
    /// The switch point σ: `high` serves `sigma ≤ σ`, `low` serves `σ < sigma`.
    pub sigma: f64,
    /// `sigma · num_train_timesteps` (diffusers `boundary_ratio · 1000`; Wan `t ≥ boundary`).
    pub timestep: f64,
    /// Index of the first sampling step `low` serves (LightX2V `boundary_step_index`; the last
    /// step of a ComfyUI high-noise sampler is `step_index`).
    pub step_index: usize,
}

/// The switch points of a routing table, highest first.
pub fn boundaries(r: &Routing) -> Vec<Boundary> {
    let mut order: Vec<usize> = (0..r.experts.len()).collect();
    order.sort_by(|&a, &b| r.experts[b].sigma_lo.total_cmp(&r.experts[a].sigma_lo));
    order
        .windows(2)
        .map(|w| {
            let (hi, lo) = (&r.experts[w[0]], &r.experts[w[1]]);
            let sigma = hi.sigma_lo;
            Boundary {
                high: hi.name.clone(),
                low: lo.name.clone(),
                sigma,
                timestep: sigma * r.num_train_timesteps,
                step_index: r.sigmas.iter().filter(|&&s| s >= sigma).count(),
            }
        })
        .collect()
}

/// The metadata entry for `r` (`None` for a single expert).
pub fn metadata(r: &Routing) -> Option<(String, String)> {
    let b = boundaries(r);
    (!b.is_empty()).then(|| (KEY_BOUNDARIES.to_string(), serde_json::to_string(&b).expect("json")))
}

/// Check a stored `phasekit.moe.boundaries` value against the routing table.
pub fn check(r: &Routing, stored: &str) -> Result<()> {
    let got: Vec<Boundary> = serde_json::from_str(stored)
        .map_err(|e| Error::new(Kind::Malformed, format!("__metadata__ {KEY_BOUNDARIES} is not valid: {e}")))?;
    let want = boundaries(r);
    if got.len() != want.len() {
        return Err(Error::new(
            Kind::Inconsistent,
            format!("{KEY_BOUNDARIES} lists {} switch points but the routing table has {}", got.len(), want.len()),
        ));
    }
    let close = |a: f64, b: f64, scale: f64| (a - b).abs() <= 1e-9 * scale.max(1.0);
    for (g, w) in got.iter().zip(&want) {
        if g.high != w.high
            || g.low != w.low
            || !close(g.sigma, w.sigma, 1.0)
            || !close(g.timestep, w.timestep, r.num_train_timesteps)
            || g.step_index != w.step_index
        {
            return Err(Error::new(
                Kind::Inconsistent,
                format!(
                    "{KEY_BOUNDARIES} says {} → {} at σ {}, t {}, step {} but the routing table gives σ {}, t {}, step {}",
                    g.high, g.low, g.sigma, g.timestep, g.step_index, w.sigma, w.timestep, w.step_index
                ),
            ));
        }
    }
    Ok(())
}

/// LightX2V's schedule for a routing table: its `denoising_step_list` (timesteps before the
/// shift, integers that index its 1000-entry table) and the largest difference between the σ it
/// samples (`sample_shift` applied to `list/1000`) and the table's σ.
pub fn lightx2v_steps(r: &Routing) -> Result<(Vec<u32>, f64)> {
    let t = r.num_train_timesteps;
    if t != 1000.0 {
        return Err(Error::unsupported(format!("LightX2V schedules have 1000 train timesteps; this checkpoint has {t}")));
    }
    let mut list = Vec::with_capacity(r.sigmas.len());
    let mut worst = 0f64;
    for (k, &sigma) in r.sigmas.iter().enumerate() {
        let raw = 1000.0 * (1.0 - k as f64 / r.steps as f64);
        let x = raw.round().clamp(1.0, 1000.0);
        let s = x / 1000.0;
        let shifted = r.shift * s / (1.0 + (r.shift - 1.0) * s);
        worst = worst.max((shifted - sigma).abs());
        list.push(x as u32);
    }
    Ok((list, worst))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::moe::routing::ExpertKind;

    fn two(b: f64, steps: u32, shift: f64) -> Routing {
        Routing::new(
            vec![("high_noise".into(), ExpertKind::Full, b, 1.0, None), ("low_noise".into(), ExpertKind::Full, 0.0, b, None)],
            steps,
            shift,
            "euler",
            1.0,
            1000.0,
        )
        .unwrap()
    }

    #[test]
    fn lightning_and_lightx2v_views() {
        // Wan2.2-Lightning: shift 5, boundary 0.875: steps at t 1000, 937.5 | 833.3, 625.
        let r = two(0.875, 4, 5.0);
        let b = boundaries(&r);
        assert_eq!(b.len(), 1);
        assert_eq!((b[0].sigma, b[0].timestep, b[0].step_index), (0.875, 875.0, 2));
        let (list, err) = lightx2v_steps(&r).unwrap();
        assert_eq!(list, vec![1000, 750, 500, 250]);
        assert!(err < 1e-12);
        // LightX2V's phased config: shift 7, switch at step 2 (σ 0.875 is the low expert's first
        // step, so the high expert's last step, 0.9545..., is the σ boundary).
        let s1 = 7.0 * 0.75 / (1.0 + 6.0 * 0.75);
        let r = two(s1, 4, 7.0);
        assert_eq!(boundaries(&r)[0].step_index, 2);
        check(&r, &metadata(&r).unwrap().1).unwrap();
        // 3 steps do not fall on integers: the list rounds and says by how much.
        let (list, err) = lightx2v_steps(&two(0.9, 3, 5.0)).unwrap();
        assert_eq!(list, vec![1000, 667, 333]);
        assert!(err > 0.0 && err < 1e-3, "{err}");
    }

    #[test]
    fn check_catches_edits() {
        let r = two(0.875, 4, 5.0);
        let (_, v) = metadata(&r).unwrap();
        let edited = v.replace("\"step_index\":2", "\"step_index\":3");
        assert_eq!(check(&r, &edited).unwrap_err().kind(), Kind::Inconsistent);
        assert_eq!(check(&r, "{").unwrap_err().kind(), Kind::Malformed);
    }
}
