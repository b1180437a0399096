//! The analytic class-conditional Gaussian mixture: sampling and the exact flow velocity.
//!
//! `p₀ = Σ_k π_k N(μ_k, s_k² I)`; under the flow `x_σ = (1−σ)x₀ + σε` every component stays
//! Gaussian: `p_σ = Σ_k π_k N((1−σ)μ_k, τ_k² I)` with `τ_k² = (1−σ)² s_k² + σ²`. The velocity
//! `v(x, σ) = E[ε − x₀ | x_σ = x]` is the responsibility-weighted sum of the per-component
//! posterior means, in closed form. Mode `k` belongs to class `k mod classes`; the null class
//! (`classes`) means "any class", so classifier-free guidance has something to act on.

use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// Shape of the mixture (recipe section `[mixture]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MixtureConfig {
    /// Dimension of the data.
    pub dim: usize,
    /// Number of modes (placed on a ring in the first two coordinates).
    pub modes: usize,
    /// Radius of the ring.
    pub radius: f64,
    /// Standard deviation of each mode (isotropic).
    pub std: f64,
    /// Number of classes; mode k has class k mod classes.
    pub classes: usize,
    /// Relative mode weights (empty: uniform). Normalised.
    pub weights: Vec<f64>,
}

impl Default for MixtureConfig {
    fn default() -> Self {
        MixtureConfig { dim: 2, modes: 8, radius: 2.0, std: 0.2, classes: 2, weights: Vec::new() }
    }
}

/// The mixture itself.
#[derive(Debug, Clone)]
pub struct Mixture {
    pub dim: usize,
    pub classes: usize,
    pub means: Vec<Vec<f64>>,
    pub stds: Vec<f64>,
    pub weights: Vec<f64>,
}

impl Mixture {
    pub fn new(c: &MixtureConfig) -> crate::Result<Mixture> {
        if c.dim < 2 || c.modes == 0 || c.classes == 0 || c.classes > c.modes || c.std <= 0.0 {
            return Err(crate::Error::usage("recipe: mixture needs dim >= 2, modes >= 1, 1 <= classes <= modes and std > 0"));
        }
        if !c.weights.is_empty() && (c.weights.len() != c.modes || c.weights.iter().any(|w| w.is_nan() || *w <= 0.0)) {
            return Err(crate::Error::usage("recipe: mixture.weights must hold one positive weight per mode"));
        }
        let means = (0..c.modes)
            .map(|k| {
                let a = 2.0 * std::f64::consts::PI * k as f64 / c.modes as f64;
                let mut m = vec![0.0; c.dim];
                m[0] = c.radius * a.cos();
                m[1] = c.radius * a.sin();
                m
            })
            .collect();
        let w: Vec<f64> = if c.weights.is_empty() { vec![1.0; c.modes] } else { c.weights.clone() };
        let tot: f64 = w.iter().sum();
        Ok(Mixture { dim: c.dim, classes: c.classes, means, stds: vec![c.std; c.modes], weights: w.iter().map(|x| x / tot).collect() })
    }

    pub fn modes(&self) -> usize {
        self.means.len()
    }

    pub fn class_of(&self, k: usize) -> usize {
        k % self.classes
    }

    /// Probability of each class under the mixture.
    pub fn class_weights(&self) -> Vec<f64> {
        let mut c = vec![0.0; self.classes];
        for (k, w) in self.weights.iter().enumerate() {
            c[self.class_of(k)] += w;
        }
        c
    }

    /// Draw `n` samples: (row-major `[n, dim]`, class of each, mode of each).
    pub fn sample(&self, n: usize, rng: &mut Rng) -> (Vec<f64>, Vec<u32>, Vec<usize>) {
        let mut x = Vec::with_capacity(n * self.dim);
        let mut cls = Vec::with_capacity(n);
        let mut modes = Vec::with_capacity(n);
        for _ in 0..n {
            let k = rng.categorical(&self.weights);
            for d in 0..self.dim {
                x.push(self.means[k][d] + self.stds[k] * rng.normal());
            }
            cls.push(self.class_of(k) as u32);
            modes.push(k);
        }
        (x, cls, modes)
    }

    /// Draw a class per sample from the class prior.
    pub fn sample_classes(&self, n: usize, rng: &mut Rng) -> Vec<u32> {
        let cw = self.class_weights();
        (0..n).map(|_| rng.categorical(&cw) as u32).collect()
    }

    /// Exact velocity `E[ε − x₀ | x_σ = x, class]` at one point; `class >= classes` is the null class.
    pub fn velocity(&self, x: &[f64], sigma: f64, class: usize, out: &mut [f64]) {
        let a = 1.0 - sigma;
        let d = self.dim as f64;
        // log responsibilities
        let mut logr = Vec::with_capacity(self.modes());
        for k in 0..self.modes() {
            if class < self.classes && self.class_of(k) != class {
                logr.push(f64::NEG_INFINITY);
                continue;
            }
            let tau2 = a * a * self.stds[k] * self.stds[k] + sigma * sigma;
            let dist2: f64 = x.iter().zip(&self.means[k]).map(|(xi, m)| (xi - a * m).powi(2)).sum();
            logr.push(self.weights[k].ln() - 0.5 * d * tau2.ln() - 0.5 * dist2 / tau2);
        }
        let mx = logr.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = logr.iter().map(|l| (l - mx).exp()).sum();
        out.iter_mut().for_each(|o| *o = 0.0);
        for (k, l) in logr.iter().enumerate() {
            let r = (l - mx).exp() / z;
            if r == 0.0 {
                continue;
            }
            let s2 = self.stds[k] * self.stds[k];
            let tau2 = a * a * s2 + sigma * sigma;
            for i in 0..self.dim {
                let dev = x[i] - a * self.means[k][i];
                let e_eps = sigma / tau2 * dev;
                let e_x0 = self.means[k][i] + a * s2 / tau2 * dev;
                out[i] += r * (e_eps - e_x0);
            }
        }
    }

    /// `log p_σ(x | class)` (for checks by finite differences).
    pub fn log_density(&self, x: &[f64], sigma: f64, class: usize) -> f64 {
        let a = 1.0 - sigma;
        let d = self.dim as f64;
        let mut terms = Vec::new();
        let mut wsum = 0.0;
        for k in 0..self.modes() {
            if class < self.classes && self.class_of(k) != class {
                continue;
            }
            wsum += self.weights[k];
            let tau2 = a * a * self.stds[k] * self.stds[k] + sigma * sigma;
            let dist2: f64 = x.iter().zip(&self.means[k]).map(|(xi, m)| (xi - a * m).powi(2)).sum();
            terms.push(self.weights[k].ln() - 0.5 * d * (2.0 * std::f64::consts::PI * tau2).ln() - 0.5 * dist2 / tau2);
        }
        let mx = terms.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        mx + terms.iter().map(|t| (t - mx).exp()).sum::<f64>().ln() - wsum.ln()
    }

    /// Velocity with classifier-free guidance `v_null + g·(v_c − v_null)` for a batch.
    pub fn velocity_batch(&self, x: &[f64], sigma: &[f64], class: &[u32], guidance: f64) -> Vec<f64> {
        let d = self.dim;
        let mut out = vec![0.0; x.len()];
        let mut vn = vec![0.0; d];
        for (i, o) in out.chunks_mut(d).enumerate() {
            let xi = &x[i * d..(i + 1) * d];
            self.velocity(xi, sigma[i], class[i] as usize, o);
            if guidance != 1.0 {
                self.velocity(xi, sigma[i], self.classes, &mut vn);
                for (oj, nj) in o.iter_mut().zip(&vn) {
                    *oj = nj + guidance * (*oj - nj);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn velocity_matches_score_by_finite_differences() {
        let m = Mixture::new(&MixtureConfig { weights: vec![1., 2., 3., 1., 1., 2., 1., 1.], ..Default::default() }).unwrap();
        let mut rng = Rng::new(7);
        for &sigma in &[0.05, 0.3, 0.6, 0.95] {
            for class in [0usize, 1, 2] {
                for _ in 0..20 {
                    let x = [rng.normal() * 2.0, rng.normal() * 2.0];
                    let mut v = [0.0; 2];
                    m.velocity(&x, sigma, class, &mut v);
                    // score = −(x + (1−σ)v)/σ  ⇔  v = −(σ·score + x)/(1−σ)
                    let h = 1e-5;
                    for i in 0..2 {
                        let mut xp = x;
                        let mut xm = x;
                        xp[i] += h;
                        xm[i] -= h;
                        let score = (m.log_density(&xp, sigma, class) - m.log_density(&xm, sigma, class)) / (2.0 * h);
                        let v_fd = -(sigma * score + x[i]) / (1.0 - sigma);
                        assert!((v_fd - v[i]).abs() < 1e-5 * (1.0 + v[i].abs()), "σ={sigma} c={class}: {v_fd} vs {}", v[i]);
                    }
                }
            }
        }
    }
}
