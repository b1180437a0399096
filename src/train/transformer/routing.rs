//! Two-expert teachers (Wan2.2 A14B): each sample of a batch goes to the high-noise expert when
//! its σ is at or above the boundary, to the low-noise expert below ([`Routed`]); the teacher
//! and the fake scores are routed alike, and each generator expert sits on the teacher expert
//! that serves its first step ([`expert_of`]).

use candle_core::{DType, Tensor};

use crate::model::denoiser::{guided, Cond, Denoiser};
use crate::train::recipe::{Recipe, TransformerConfig};
use crate::train::schedule::{shift, Schedule};

type CResult<T> = candle_core::Result<T>;

/// Whether σ goes to the high-noise expert of a two-expert teacher (Wan2.2: `t ≥ boundary·1000`).
///
/// Compared in f32, the precision the models receive σ in: every caller (a batch's σ tensor,
/// a schedule's f64 σ, a re-noise level) rounds to the same f32 first, so a level drawn at
/// 0.9 in f64 and the f32 σ the model gets (0.89999998) go to the same expert.
pub fn is_high_noise(sigma: f64, boundary: f64) -> bool {
    sigma as f32 >= boundary as f32
}

/// Routes each sample of a batch by its σ: `high` for σ ≥ `boundary`, `low` below; a dense
/// teacher has `boundary = None` and only `high`. A sample routed to a missing expert is an error.
pub struct Routed<'a> {
    pub high: Option<&'a dyn Denoiser>,
    pub low: Option<&'a dyn Denoiser>,
    pub boundary: Option<f64>,
}

impl Routed<'_> {
    fn pick(&self, high: bool) -> CResult<&dyn Denoiser> {
        let d = if high { self.high } else { self.low };
        d.ok_or_else(|| candle_core::Error::Msg(format!("no {} expert for this σ", if high { "high-noise" } else { "low-noise" })))
    }
}

impl Denoiser for Routed<'_> {
    fn velocity(&self, x: &Tensor, sigma: &Tensor, cond: &Cond) -> CResult<Tensor> {
        let Some(b) = self.boundary else { return self.pick(true)?.velocity(x, sigma, cond) };
        let s = sigma.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let (hi, lo): (Vec<u32>, Vec<u32>) = (0..s.len() as u32).partition(|&i| is_high_noise(f64::from(s[i as usize]), b));
        if lo.is_empty() {
            return self.pick(true)?.velocity(x, sigma, cond);
        }
        if hi.is_empty() {
            return self.pick(false)?.velocity(x, sigma, cond);
        }
        let dev = x.device();
        let mut parts = Vec::new();
        for (idx, high) in [(&hi, true), (&lo, false)] {
            let it = Tensor::new(idx.as_slice(), dev)?;
            parts.push(self.pick(high)?.velocity(&x.index_select(&it, 0)?, &sigma.index_select(&it, 0)?, &cond.select(&it)?)?);
        }
        // Back to the batch order.
        let order: Vec<u32> = hi.iter().chain(&lo).copied().collect();
        let mut inv = vec![0u32; order.len()];
        for (pos, &i) in order.iter().enumerate() {
            inv[i as usize] = pos as u32;
        }
        Tensor::cat(&parts, 0)?.index_select(&Tensor::new(inv.as_slice(), dev)?, 0)
    }
    fn null_cond(&self, n: usize) -> CResult<Cond> {
        self.high.or(self.low).ok_or_else(|| candle_core::Error::Msg("no expert".into()))?.null_cond(n)
    }
}

/// A teacher expert with its own classifier-free guidance scale, `v_null + scale·(v_c − v_null)`
/// ([`guided`]): the official Wan2.2 A14B configs guide each expert by its own scale (T2V: 4.0
/// high noise, 3.0 low noise). Inside a [`Routed`] teacher, each sample is guided by the scale of
/// the expert that serves its σ.
pub struct GuidedExpert<'a> {
    pub inner: &'a dyn Denoiser,
    pub scale: f64,
}

impl Denoiser for GuidedExpert<'_> {
    fn velocity(&self, x: &Tensor, sigma: &Tensor, cond: &Cond) -> CResult<Tensor> {
        guided(self.inner, x, sigma, cond, self.scale)
    }
    fn null_cond(&self, n: usize) -> CResult<Cond> {
        self.inner.null_cond(n)
    }
}

/// Which teacher expert serves σ (index into the loaded bases: 0 high noise, 1 low noise).
pub fn expert_of(sigma: f64, boundary: Option<f64>) -> usize {
    match boundary {
        Some(b) if !is_high_noise(sigma, b) => 1,
        _ => 0,
    }
}

/// The σ range (after the shift) a phase's re-noise levels come from, with `t_range` applied.
/// A fixed re-noise level (`renoise_fixed`) is the one-point range `[t, t]`.
pub fn renoise_sigma_range(sched: &Schedule, p: usize, r: &Recipe, t_range: Option<(f64, f64)>) -> (f64, f64) {
    if let Some(t) = r.schedule.renoise_fixed {
        return (t, t);
    }
    let (lo, hi) = sched.renoise_interval(p, r.schedule.renoise);
    let (mut a, mut b) = (shift(lo, sched.shift), shift(hi, sched.shift));
    if let Some((x, y)) = t_range {
        a = a.max(x);
        b = b.min(y);
    }
    (a, b)
}

/// Phase `p`'s re-noise range after `phase1_t_range` (phase 1 only).
pub fn phase_t_range(tc: &TransformerConfig, p: usize) -> Option<(f64, f64)> {
    if p == 0 {
        tc.phase1_t_range.map(|[a, b]| (a, b))
    } else {
        None
    }
}

/// Which teacher experts (`[high, low]`, or `[one]`) phase `p`'s re-noise range reaches: the
/// phase has one fake score per expert marked.
pub fn fakes_used(r: &Recipe, tc: &TransformerConfig, sched: &Schedule, p: usize, experts: usize) -> Vec<bool> {
    let (a, b) = renoise_sigma_range(sched, p, r, phase_t_range(tc, p));
    (0..experts)
        .map(|e| match tc.expert_boundary {
            None => true,
            Some(bd) => (e == 0 && is_high_noise(b, bd)) || (e == 1 && !is_high_noise(a, bd)),
        })
        .collect()
}
