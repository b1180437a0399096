//! Phased DMD and its baselines, written against [`Denoiser`] only.
//!
//! One phase trains one expert `G_p` that owns steps `[a, b)` of the step list and maps
//! `p(x_{t_a})` to `p(x_s)`, `s = t_b`. Per generator update (Eq. 10 with DMD2's normaliser):
//! roll out the frozen earlier experts from noise to `t_a` without gradients; pick the
//! gradient step `j` (SGTS: uniform in the phase; otherwise the phase's last step); roll the
//! current expert without gradients to `t_j`; one Euler jump with gradient to the boundary,
//! `x_s = x + (s − t_j)·v`; re-noise `x_t = α_{t|s}·sg(x_s) + σ_{t|s}·ε` with `t ~ U(s, 1]`
//! before the shift (or `(s, t_a]`, disjoint; or one fixed `t`, `renoise_fixed`); the gradient
//! `g = (x̂₀_fake − x̂₀_teacher) / mean|x̂₀ − x̂₀_teacher|` (DMD2's normaliser) or Eq. 10's own
//! `g = w_{t|s}·(v_teacher − v_fake)` ([`generator_grad`]); loss `½·mean(x_s − sg(x_s − g))²` over
//! each sample's generated elements, then the batch.
//! Per fake update (Eq. 11/13): the same rollout without gradients, the same re-noise, and the
//! subinterval target `((1−s)²t + (1−t)s²)/((1−s)²σ_{t|s})·ε − x_s/(1−s)` weighted by
//! `clamp(1/σ²_{t|s}, 0, 10)·σ²_{t|s}` ([`subinterval_target`]), or unweighted (`fake_weight = none`,
//! DMD2's plain MSE).
//!
//! Baselines are settings of the same code: one-step DMD (`steps = 1`; DMD2-style: DMD2's
//! normaliser and plain fake loss, no regression loss), DMD2 (one phase with SGTS over all steps,
//! one fake fed by every truncation point, `rollout = x0-renoise`, plain fake loss), vanilla
//! few-step DMD (one phase, `backprop = all`), the naive fake target `ε − x_s`, disjoint re-noise
//! intervals, a fixed re-noise level.
//!
//! `rollout = x0-renoise` replaces every Euler step above (the rollouts without gradient and the
//! jump to the boundary) by DMD2's rule: `x̂₀ = x − t·v`, then `(1 − t')·x̂₀ + t'·ε` with fresh
//! noise from the run's generator (`x̂₀` itself at `t' = 0`).

use candle_core::{Device, Tensor};

use super::optim::AdamW;
use super::recipe::{Backprop, FakeObjective, FakeSamples, FakeWeight, GeneratorWeight, ScheduleConfig, TrainConfig};
use super::schedule::{shift, transition, unshift, Rollout, Schedule};
use super::timing::part;
use super::toy::mlp::Mlp;
use crate::model::denoiser::{guided, Cond, Denoiser};
use crate::rng::Rng;

type CResult<T> = candle_core::Result<T>;

/// Draws a batch of conditions.
pub type CondSampler<'a> = &'a dyn Fn(&mut Rng, usize) -> CResult<Cond>;

/// One Euler step `x + (to − from)·v(x, from)`.
pub fn euler(d: &dyn Denoiser, x: &Tensor, from: f64, to: f64, cond: &Cond) -> CResult<Tensor> {
    let n = x.dim(0)?;
    let sig = Tensor::full(from as f32, n, x.device())?;
    let v = d.velocity(x, &sig, cond)?;
    x + (v * (to - from))?
}

/// Euler from `sigmas[from]` to `sigmas[to]`, step `i` by `by_step[i]`.
pub fn rollout(by_step: &[&dyn Denoiser], sigmas: &[f64], from: usize, to: usize, x: Tensor, cond: &Cond) -> CResult<Tensor> {
    let mut x = x;
    for i in from..to {
        x = euler(by_step[i], &x, sigmas[i], sigmas[i + 1], cond)?;
    }
    Ok(x)
}

/// The x̂₀ rule's move from a clean estimate to level `to`: `(1 − to)·x̂₀ + to·ε` with fresh
/// noise from `rng`, or `x̂₀` itself (no noise drawn) at `to = 0`.
pub fn renoise_x0(x0: &Tensor, to: f64, rng: &mut Rng) -> CResult<Tensor> {
    if to <= 0.0 {
        return Ok(x0.clone());
    }
    let eps = noise_on(rng, x0.dim(0)?, &x0.dims()[1..], x0.device())?;
    (x0 * (1.0 - to))? + (eps * to)?
}

/// One step of `rule` from `from` to `to`: [`euler`] (no noise drawn), or predict
/// `x̂₀ = x − from·v` and [`renoise_x0`] it to `to`.
pub fn step(d: &dyn Denoiser, x: &Tensor, from: f64, to: f64, cond: &Cond, rule: Rollout, rng: &mut Rng) -> CResult<Tensor> {
    match rule {
        Rollout::Euler => euler(d, x, from, to, cond),
        Rollout::X0Renoise => {
            let sig = Tensor::full(from as f32, x.dim(0)?, x.device())?;
            let v = d.velocity(x, &sig, cond)?;
            renoise_x0(&(x - (v * from)?)?, to, rng)
        }
    }
}

/// [`rollout`] by `rule` (one [`step`] per interval); Euler draws nothing from `rng`, so it is
/// [`rollout`] exactly.
#[allow(clippy::too_many_arguments)]
pub fn rollout_with(
    by_step: &[&dyn Denoiser],
    sigmas: &[f64],
    from: usize,
    to: usize,
    x: Tensor,
    cond: &Cond,
    rule: Rollout,
    rng: &mut Rng,
) -> CResult<Tensor> {
    let mut x = x;
    for i in from..to {
        x = step(by_step[i], &x, sigmas[i], sigmas[i + 1], cond, rule, rng)?;
    }
    Ok(x)
}

/// Standard-normal noise `[n, dims…]` from the run's generator.
pub fn noise(rng: &mut Rng, n: usize, item: &[usize]) -> CResult<Tensor> {
    noise_on(rng, n, item, &Device::Cpu)
}

/// [`noise`] on `dev` (drawn on the host from the run's generator, so every device sees the same numbers).
pub fn noise_on(rng: &mut Rng, n: usize, item: &[usize], dev: &Device) -> CResult<Tensor> {
    let mut shape = vec![n];
    shape.extend_from_slice(item);
    let count: usize = shape.iter().product();
    Tensor::from_vec(rng.normals_f32(count), shape, dev)
}

/// Per-sample column `[n, 1]`.
fn col(v: &[f64], dev: &Device) -> CResult<Tensor> {
    Tensor::from_vec(v.iter().map(|x| *x as f32).collect::<Vec<f32>>(), (v.len(), 1), dev)
}

fn row(v: &[f64], dev: &Device) -> CResult<Tensor> {
    Tensor::from_vec(v.iter().map(|x| *x as f32).collect::<Vec<f32>>(), v.len(), dev)
}

/// Per-sample mean `[B]` of `x [B, …]` over the part of each sample the generator makes: all
/// of it, or every latent frame but the first when `cond` gives that frame ([`Cond::free_mask`];
/// the velocities there are 0, so only losses and the normaliser need to leave it out).
fn sample_mean(x: &Tensor, cond: &Cond) -> CResult<Tensor> {
    match cond.free_mask(x)? {
        None => x.flatten_from(1)?.mean(1),
        Some(m) => {
            let f = x.dim(2)?;
            let free = x.dims()[1..].iter().product::<usize>() / f * (f - 1);
            x.broadcast_mul(&m)?.flatten_from(1)?.sum(1)? / free.max(1) as f64
        }
    }
}

/// `[n, 1, …, 1]` of rank `rank` from per-sample values (broadcasts against a batch).
fn bcol(v: &[f64], rank: usize, dev: &Device) -> CResult<Tensor> {
    let mut shape = vec![v.len()];
    shape.extend(std::iter::repeat_n(1, rank.saturating_sub(1)));
    Tensor::from_vec(v.iter().map(|x| *x as f32).collect::<Vec<f32>>(), shape, dev)
}

/// Eq. 11's regression target for a velocity model on `(s, 1]` at re-noise level `t`, as the
/// coefficients of `target = eps·ε + xs·x_s` (with `x_t = α_{t|s}·x_s + σ_{t|s}·ε`), and Eq. 13's
/// per-sample weight.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SubintervalTarget {
    /// `((1−s)²t + (1−t)s²) / ((1−s)²σ_{t|s})`, i.e. `(α_s²σ_t + α_tσ_s²)/(α_s²σ_{t|s})`.
    pub eps: f64,
    /// `−1/(1−s)`, i.e. `−1/α_s`.
    pub xs: f64,
    /// Eq. 13: `clamp(1/σ²_{t|s}, 0, clamp_max)·σ²_{t|s}`, which is `min(1, clamp_max·σ²_{t|s})`.
    pub weight: f64,
}

impl SubintervalTarget {
    /// The target for one element.
    pub fn value(&self, eps: f64, xs: f64) -> f64 {
        self.eps * eps + self.xs * xs
    }
}

/// Eq. 11's target and Eq. 13's weight for a phase ending at `s` and a re-noise level `t > s`
/// (rectified flow: `α = 1 − σ`); at `s = 0` the target is `ε − x₀`. The trainer's fake update
/// and every test of the formula call this one function.
pub fn subinterval_target(s: f64, t: f64, clamp_max: f64) -> SubintervalTarget {
    let (_, sg) = transition(s, t);
    SubintervalTarget {
        eps: ((1.0 - s).powi(2) * t + (1.0 - t) * s * s) / ((1.0 - s).powi(2) * sg.max(1e-12)),
        xs: -1.0 / (1.0 - s),
        weight: (1.0 / (sg * sg)).min(clamp_max) * sg * sg,
    }
}

/// Eq. 10's weight `w_{t|s} = α_t·α_{t|s}/(α_t·σ_t + σ_t²)` for rectified flow:
/// `(1−t)²/((1−s)·t)`. With velocity models, `w_{t|s}·(v_teacher − v_fake)` is
/// `α_{t|s}·(∇log p_fake − ∇log p_real)(x_t)`, the gradient of the KL at `x_s` (Eq. 5).
pub fn eq10_weight(s: f64, t: f64) -> f64 {
    (1.0 - t) * (1.0 - t) / ((1.0 - s) * t)
}

/// The generator's distribution-matching gradient `g` at its output `x_s` (the loss is
/// `½·mean(x_s − sg(x_s − g))²`), from the re-noised batch `x_t` at levels `t`, the guided
/// teacher's and the fake's velocities there, and the generator's own clean estimate `x0_gen`:
///
/// - `dmd2`: `(x̂₀_fake − x̂₀_teacher) / max(norm_min, mean|x0_gen − x̂₀_teacher|)` with
///   `x̂₀ = x_t − t·v`, the mean per sample over its generated elements (DMD2's normaliser);
/// - `eq10`: `w_{t|s}·(v_teacher − v_fake)` ([`eq10_weight`]), Eq. 10 as written.
#[allow(clippy::too_many_arguments)]
pub fn generator_grad(
    weight: GeneratorWeight,
    s: f64,
    t: &[f64],
    xt: &Tensor,
    v_teacher: &Tensor,
    v_fake: &Tensor,
    x0_gen: &Tensor,
    cond: &Cond,
    norm_min: f64,
) -> CResult<Tensor> {
    let dev = xt.device();
    match weight {
        GeneratorWeight::Dmd2 => {
            let tc = bcol(t, xt.rank(), dev)?;
            let x0t = (xt - v_teacher.broadcast_mul(&tc)?)?;
            let x0f = (xt - v_fake.broadcast_mul(&tc)?)?;
            // DMD2's per-sample normaliser mean|x̂₀ − x̂₀_teacher| over every non-batch dimension
            // (over the generated part: a given first frame is no part of the sample).
            let norm = sample_mean(&(x0_gen - &x0t)?.abs()?, cond)?;
            let norm = norm.clamp(norm_min as f32, f32::MAX)?;
            let mut shape = vec![t.len()];
            shape.extend(std::iter::repeat_n(1, xt.rank() - 1));
            (x0f - x0t)?.broadcast_div(&norm.reshape(shape)?)
        }
        GeneratorWeight::Eq10 => {
            let w: Vec<f64> = t.iter().map(|t| eq10_weight(s, *t)).collect();
            (v_teacher - v_fake)?.broadcast_mul(&bcol(&w, xt.rank(), dev)?)
        }
    }
}

/// `(x_t, ε, t, α_{t|s}, σ_{t|s})` of a re-noised batch.
type Renoised = (Tensor, Tensor, Vec<f64>, Vec<f64>, Vec<f64>);

/// Everything one phase's updates need.
pub struct Phase<'a> {
    pub sched: &'a Schedule,
    pub scfg: &'a ScheduleConfig,
    pub tcfg: &'a TrainConfig,
    pub phase: usize,
    /// The real score (with guidance `guidance`).
    pub teacher: &'a dyn Denoiser,
    pub guidance: f64,
    /// Frozen experts of the earlier phases, one per phase index `< phase`.
    pub experts: &'a [&'a dyn Denoiser],
    pub sample_cond: CondSampler<'a>,
    /// Shape of one sample (toy: `[dim]`).
    pub item: &'a [usize],
    /// Re-noise levels of this phase are restricted to this σ range (after the shift), e.g. the
    /// high-noise expert's range in phase 1 of a two-expert teacher (App. B).
    pub t_range: Option<(f64, f64)>,
    /// Where the batch tensors live.
    pub device: &'a Device,
}

/// The generator and fake score of a phase, each trainable and as a frozen view.
pub struct Views<'a> {
    pub gen: &'a dyn Denoiser,
    pub gen_frozen: &'a dyn Denoiser,
    pub fake: &'a dyn Denoiser,
    pub fake_frozen: &'a dyn Denoiser,
}

/// A generated batch at the phase boundary.
pub struct Generated {
    /// `x_s` (with gradient when asked).
    pub xs: Tensor,
    /// The generator's clean estimate `x − t_j·v` at the gradient step.
    pub x0: Tensor,
    pub cond: Cond,
}

/// Losses of one generator update and the fake updates before it.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepLosses {
    pub gen: f64,
    pub fake: f64,
    pub gen_grad_norm: f64,
}

impl Phase<'_> {
    fn bounds(&self) -> (usize, usize, f64) {
        let p = &self.sched.phases[self.phase];
        (p.start, p.end, p.sigma_end)
    }

    /// Denoiser for each step before the phase (frozen experts).
    fn by_step<'b>(&'b self, gen: &'b dyn Denoiser) -> Vec<&'b dyn Denoiser> {
        (0..self.sched.steps())
            .map(|i| {
                let k = self.sched.phase_of_step(i);
                if k < self.phase {
                    self.experts[k]
                } else {
                    gen
                }
            })
            .collect()
    }

    /// Generate a batch at the boundary. `gen` is the trainable expert (gradients flow through
    /// its variables when `grad`); `frozen` the same weights without gradient tracking.
    pub fn generate(
        &self,
        rng: &mut Rng,
        n: usize,
        gen: &dyn Denoiser,
        frozen: &dyn Denoiser,
        grad: bool,
        for_fake: bool,
    ) -> CResult<Generated> {
        let (a, b, s) = self.bounds();
        let z = noise_on(rng, n, self.item, self.device)?;
        let cond = (self.sample_cond)(rng, n)?;
        let steps = self.by_step(frozen);
        let sig = &self.sched.sigmas;
        let rule = self.scfg.rollout;
        let x = rollout_with(&steps, sig, 0, a, z, &cond, rule, rng)?;
        let g = if grad { gen } else { frozen };
        if self.scfg.backprop == Backprop::All {
            let mut x = x;
            let mut x0 = x.clone();
            for (i, t) in sig.iter().enumerate().take(b).skip(a) {
                let v = g.velocity(&x, &Tensor::full(*t as f32, n, self.device)?, &cond)?;
                x0 = (&x - (&v * *t)?)?;
                x = match rule {
                    Rollout::Euler => (&x + (v * (sig[i + 1] - t))?)?,
                    Rollout::X0Renoise => renoise_x0(&x0, sig[i + 1], rng)?,
                };
            }
            return Ok(Generated { xs: x, x0, cond });
        }
        let full = for_fake && self.scfg.fake_samples == FakeSamples::Full;
        let j = if self.scfg.sgts && !full { a + rng.below(b - a) } else { b - 1 };
        let x = rollout_with(&steps, sig, a, j, x, &cond, rule, rng)?;
        let tj = sig[j];
        let v = g.velocity(&x, &Tensor::full(tj as f32, n, self.device)?, &cond)?;
        let x0 = (&x - (&v * tj)?)?;
        let xs = match rule {
            Rollout::Euler => (&x + (&v * (s - tj))?)?,
            // DMD2: the gradient step predicts x̂₀; a phase ending at s > 0 re-noises it to s.
            Rollout::X0Renoise => renoise_x0(&x0, s, rng)?,
        };
        Ok(Generated { xs, x0, cond })
    }

    /// Re-noise levels for `n` samples: uniform on the phase's interval before the shift, or
    /// the recipe's fixed level (`renoise_fixed`, drawing nothing).
    pub fn renoise_levels(&self, rng: &mut Rng, n: usize) -> Vec<f64> {
        if let Some(t) = self.scfg.renoise_fixed {
            return vec![t; n];
        }
        let (mut lo, mut hi) = self.sched.renoise_interval(self.phase, self.scfg.renoise);
        if let Some((a, b)) = self.t_range {
            // The range is in shifted σ; intersect before the shift so t stays uniform there.
            lo = lo.max(unshift(a, self.sched.shift));
            hi = hi.min(unshift(b, self.sched.shift));
        }
        (0..n).map(|_| shift(lo + (hi - lo) * rng.uniform_open0(), self.sched.shift)).collect()
    }

    /// `x_t = α_{t|s}·x_s + σ_{t|s}·ε`; returns (x_t, ε, t, α, σ) per sample.
    fn renoise(&self, rng: &mut Rng, xs: &Tensor) -> CResult<Renoised> {
        let (_, _, s) = self.bounds();
        let n = xs.dim(0)?;
        let t = self.renoise_levels(rng, n);
        let (al, sg): (Vec<f64>, Vec<f64>) = t.iter().map(|t| transition(s, *t)).unzip();
        let eps = noise_on(rng, n, self.item, self.device)?;
        let r = xs.rank();
        let xt = (xs.broadcast_mul(&bcol(&al, r, self.device)?)? + eps.broadcast_mul(&bcol(&sg, r, self.device)?)?)?;
        Ok((xt, eps, t, al, sg))
    }

    /// One fake-score update (Eq. 13, or the naive target).
    pub fn fake_update(&self, rng: &mut Rng, frozen_gen: &dyn Denoiser, fake: &dyn Denoiser, opt: &mut AdamW) -> CResult<f64> {
        let (_, _, s) = self.bounds();
        let n = self.tcfg.batch;
        let gb = part("fake: generator rollout (no gradient)", || self.generate(rng, n, frozen_gen, frozen_gen, false, true))?;
        let xs = gb.xs.detach();
        let (xt, eps, t, _al, _sg) = self.renoise(rng, &xs)?;
        let (target, w) = match self.tcfg.fake_objective {
            FakeObjective::Subinterval => {
                let tg: Vec<SubintervalTarget> = t.iter().map(|t| subinterval_target(s, *t, self.tcfg.fake_clamp_max)).collect();
                let c: Vec<f64> = tg.iter().map(|x| x.eps).collect();
                let w: Vec<f64> = match self.tcfg.fake_weight {
                    FakeWeight::Eq13 => tg.iter().map(|x| x.weight).collect(),
                    FakeWeight::None => vec![1.0; n],
                };
                // x_s's coefficient is the same for the whole batch (one s per phase).
                ((eps.broadcast_mul(&bcol(&c, xs.rank(), self.device)?)? + xs.affine(tg[0].xs, 0.0)?)?, w)
            }
            FakeObjective::Naive => ((&eps - &xs)?, vec![1.0; n]),
        };
        let loss = part("fake: forward", || {
            let pred = fake.velocity(&xt, &row(&t, self.device)?, &gb.cond)?;
            let per = sample_mean(&(pred - target)?.sqr()?, &gb.cond)?;
            (per * row(&w, self.device)?)?.mean_all()
        })?;
        let grads = part("fake: backward", || crate::ops::checkpoint::backward(&loss, &opt.vars))?;
        part("fake: optimiser", || opt.step(&grads, self.tcfg.grad_clip))?;
        Ok(loss.to_scalar::<f32>()? as f64)
    }

    /// One generator update (Eq. 10, with the DMD2 normaliser or Eq. 10's own weight).
    pub fn gen_update(
        &self,
        rng: &mut Rng,
        gen: &dyn Denoiser,
        frozen_gen: &dyn Denoiser,
        frozen_fake: &dyn Denoiser,
        opt: &mut AdamW,
    ) -> CResult<(f64, f64)> {
        let n = self.tcfg.batch;
        let gb = part("generator: rollout and forward", || self.generate(rng, n, gen, frozen_gen, true, false))?;
        let xs_sg = gb.xs.detach();
        let (xt, _eps, t, _al, _sg) = self.renoise(rng, &xs_sg)?;
        let tr = row(&t, self.device)?;
        let vt = part("teacher (guided)", || guided(self.teacher, &xt, &tr, &gb.cond, self.guidance))?.detach();
        let vf = part("fake score (for the generator)", || frozen_fake.velocity(&xt, &tr, &gb.cond))?.detach();
        let (_, _, s) = self.bounds();
        let x0_gen = gb.x0.detach();
        let g = generator_grad(self.tcfg.generator_weight, s, &t, &xt, &vt, &vf, &x0_gen, &gb.cond, self.tcfg.norm_min)?;
        let target = (xs_sg - g)?.detach();
        // ½ the mean squared distance over the generated elements of each sample, then over the
        // batch (as DMD2, LightX2V and FastVideo average; a sum over elements made the gradient
        // numel× larger, so `grad_clip` clipped every transformer step).
        let loss = (sample_mean(&(&gb.xs - target)?.sqr()?, &gb.cond)?.mean_all()? * 0.5)?;
        let grads = part("generator: backward", || crate::ops::checkpoint::backward(&loss, &opt.vars))?;
        let gn = part("generator: optimiser", || opt.step(&grads, self.tcfg.grad_clip))?;
        Ok((loss.to_scalar::<f32>()? as f64, gn))
    }

    /// `ttur` fake updates then one generator update.
    pub fn iteration(&self, rng: &mut Rng, gen: &Mlp, fake: &Mlp, gen_opt: &mut AdamW, fake_opt: &mut AdamW) -> CResult<StepLosses> {
        let fg = gen.frozen();
        let ff = fake.frozen();
        self.iteration_views(rng, &Views { gen, gen_frozen: &fg, fake, fake_frozen: &ff }, gen_opt, fake_opt)
    }

    /// [`Phase::iteration`] over any denoisers: trainable ones and frozen views of the same
    /// weights (views that compute without recording gradients but see every update).
    pub fn iteration_views(&self, rng: &mut Rng, m: &Views<'_>, gen_opt: &mut AdamW, fake_opt: &mut AdamW) -> CResult<StepLosses> {
        let mut fl = 0.0;
        for _ in 0..self.tcfg.ttur {
            fl += self.fake_update(rng, m.gen_frozen, m.fake, fake_opt)?;
        }
        let (gl, gn) = self.gen_update(rng, m.gen, m.gen_frozen, m.fake_frozen, gen_opt)?;
        Ok(StepLosses { gen: gl, fake: fl / self.tcfg.ttur as f64, gen_grad_norm: gn })
    }
}

/// One flow-matching step for the teacher: `‖v(x_σ, σ, c) − (ε − x₀)‖²`, σ ~ U(0, 1).
pub fn flow_matching_loss(model: &Mlp, x0: &Tensor, cond: &Cond, rng: &mut Rng) -> CResult<Tensor> {
    let n = x0.dim(0)?;
    let item: Vec<usize> = x0.dims()[1..].to_vec();
    let sig: Vec<f64> = (0..n).map(|_| rng.uniform()).collect();
    let eps = noise(rng, n, &item)?;
    let sc = col(&sig, &Device::Cpu)?;
    let xt = (x0.broadcast_mul(&(1.0 - &sc)?)? + eps.broadcast_mul(&sc)?)?;
    let v = model.velocity(&xt, &row(&sig, &Device::Cpu)?, cond)?;
    (v - (eps - x0)?)?.sqr()?.mean_all()
}

/// Sample with a list of experts routed per step (`by_step[i]` runs step i), Euler.
pub fn sample(by_step: &[&dyn Denoiser], sigmas: &[f64], z: Tensor, cond: &Cond) -> CResult<Tensor> {
    rollout(by_step, sigmas, 0, sigmas.len() - 1, z, cond)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::denoiser::ImageMode;

    /// The paper's coefficients for a general schedule (α_t, σ_t), evaluated for rectified flow.
    fn alpha_sigma(t: f64) -> (f64, f64) {
        (1.0 - t, t)
    }

    /// Eq. 13 as the paper writes it, `clamp(1/σ²_{t|s}, 0, 10)·‖σ_{t|s}ψ − ((α_s²σ_t + α_tσ_s²)/α_s²·ε
    /// − (σ_{t|s}/α_s)·x_s)‖²`, equals `weight·‖ψ − target‖²` with [`subinterval_target`]'s target
    /// and weight, for any ψ, ε, x_s; and at s = 0 the target is `ε − x₀`.
    #[test]
    fn subinterval_target_is_eq13_as_written() {
        let mut rng = Rng::new(11);
        for &(s, t) in &[(0.0, 0.3), (0.0, 0.95), (0.25, 0.3), (0.5, 0.55), (0.5, 0.9), (0.8333, 0.87), (0.9375, 0.999)] {
            let ((a_s, s_s), (a_t, s_t)) = (alpha_sigma(s), alpha_sigma(t));
            let a_ts = a_t / a_s;
            let sg2 = s_t * s_t - a_ts * a_ts * s_s * s_s;
            let sg = sg2.sqrt();
            let tg = subinterval_target(s, t, 10.0);
            for _ in 0..5 {
                let (psi, eps, xs) = (rng.normal(), rng.normal(), rng.normal());
                let eq13 = (1.0 / sg2).clamp(0.0, 10.0)
                    * (sg * psi - ((a_s * a_s * s_t + a_t * s_s * s_s) / (a_s * a_s) * eps - sg / a_s * xs)).powi(2);
                let ours = tg.weight * (psi - tg.value(eps, xs)).powi(2);
                assert!((eq13 - ours).abs() <= 1e-9 * eq13.abs().max(1.0), "s {s} t {t}: Eq. 13 {eq13} vs {ours}");
            }
            // Eq. 11's target: x_t's own coefficients (α_{t|s}, σ_{t|s}) are the transition's.
            assert!((transition(s, t).0 - a_ts).abs() < 1e-12 && (transition(s, t).1 - sg).abs() < 1e-12);
            if s == 0.0 {
                assert!((tg.eps - 1.0).abs() < 1e-12 && tg.xs == -1.0, "s = 0: ε − x₀, got {tg:?}");
            }
        }
        // The clamp bites only where σ²_{t|s} < 1/10, and then the weight is 10·σ²_{t|s}.
        assert_eq!(subinterval_target(0.0, 0.9, 10.0).weight, 1.0);
        assert!((subinterval_target(0.0, 0.1, 10.0).weight - 0.1).abs() < 1e-12);
    }

    fn t1(v: &[f64], shape: (usize, usize)) -> Tensor {
        Tensor::from_vec(v.iter().map(|x| *x as f32).collect::<Vec<f32>>(), shape, &Device::Cpu).unwrap()
    }

    /// Eq. 10's gradient at x_s is `α_{t|s}·(∇log p_fake − ∇log p_real)(x_t)`, the scores read
    /// from the velocities by Eq. 5, `∇log p_t(x) = −(ψ + x/α_t)/(σ_t + σ_t²/α_t)`; and the DMD2
    /// normaliser is `(x̂₀_fake − x̂₀_teacher)/mean|x̂₀_gen − x̂₀_teacher|`, all in f64 here.
    #[test]
    fn generator_grad_is_eq10_or_dmd2_as_written() {
        let mut rng = Rng::new(12);
        let (n, d) = (3, 4);
        let draw = |rng: &mut Rng| (0..n * d).map(|_| rng.normal()).collect::<Vec<f64>>();
        let (xt, vt, vf, x0g) = (draw(&mut rng), draw(&mut rng), draw(&mut rng), draw(&mut rng));
        let cond = Cond::Embedding(Tensor::zeros((n, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap());
        for s in [0.0, 0.5] {
            let t = [s + 0.05, s + 0.3 * (1.0 - s), 0.97];
            let grad = |w| {
                generator_grad(w, s, &t, &t1(&xt, (n, d)), &t1(&vt, (n, d)), &t1(&vf, (n, d)), &t1(&x0g, (n, d)), &cond, 1e-4)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap()
            };
            let (eq10, dmd2) = (grad(GeneratorWeight::Eq10), grad(GeneratorWeight::Dmd2));
            for i in 0..n {
                let (a_t, s_t) = alpha_sigma(t[i]);
                let a_ts = a_t / alpha_sigma(s).0;
                let score = |v: f64, x: f64| -(v + x / a_t) / (s_t + s_t * s_t / a_t);
                let norm: f64 = (0..d).map(|j| (x0g[i * d + j] - (xt[i * d + j] - t[i] * vt[i * d + j])).abs()).sum::<f64>() / d as f64;
                for j in 0..d {
                    let k = i * d + j;
                    let want = a_ts * (score(vf[k], xt[k]) - score(vt[k], xt[k]));
                    assert!((eq10[i][j] as f64 - want).abs() <= 1e-4 * want.abs().max(1.0), "s {s} t {}: {} vs {want}", t[i], eq10[i][j]);
                    let want = ((xt[k] - t[i] * vf[k]) - (xt[k] - t[i] * vt[k])) / norm;
                    assert!((dmd2[i][j] as f64 - want).abs() <= 1e-4 * want.abs().max(1.0), "s {s} t {}: {} vs {want}", t[i], dmd2[i][j]);
                }
            }
        }
        // Eq. 10's weight itself, α_t·α_{t|s}/(α_t·σ_t + σ_t²), and its zero at t = 1.
        assert!((eq10_weight(0.5, 0.75) - 0.25 * 0.5 / (0.25 * 0.75 + 0.5625)).abs() < 1e-12);
        assert_eq!(eq10_weight(0.0, 1.0), 0.0);
    }

    #[test]
    fn a_given_first_frame_is_left_out_of_per_sample_means() {
        // [B = 2, C = 2, F = 3, H = 1, W = 2]; frame 0 holds values the mean must not see.
        let mut v = Vec::new();
        for b in 0..2 {
            for _c in 0..2 {
                for f in 0..3 {
                    for w in 0..2 {
                        v.push(if f == 0 { 1e6 } else { (b * 10 + f * 2 + w) as f32 });
                    }
                }
            }
        }
        let x = Tensor::from_vec(v, (2, 2, 3, 1, 2), &Device::Cpu).unwrap();
        let text = Tensor::zeros((2, 1, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let image = Tensor::zeros((2, 2, 1, 1, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let first = Cond::Image { text: text.clone(), image: image.clone(), mode: ImageMode::FirstFrame };
        // Frames 1 and 2 of sample b hold b·10 + {2, 3, 4, 5}: mean b·10 + 3.5.
        assert_eq!(sample_mean(&x, &first).unwrap().to_vec1::<f32>().unwrap(), vec![3.5, 13.5]);
        // Text-only and channel conditions generate every frame: the plain mean.
        let plain = x.flatten_from(1).unwrap().mean(1).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(sample_mean(&x, &Cond::Embedding(text.clone())).unwrap().to_vec1::<f32>().unwrap(), plain);
        let ch = Cond::Image { text, image, mode: ImageMode::Channels };
        assert_eq!(sample_mean(&x, &ch).unwrap().to_vec1::<f32>().unwrap(), plain);
    }
}
