//! The toy's denoisers: the analytic mixture (exact, no weights) and a small MLP with time and
//! class embeddings, the student and teacher of the embedded default.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Shape, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use crate::model::denoiser::{Cond, Denoiser};
use crate::rng::Rng;
use crate::train::mixture::Mixture;

/// The analytic mixture as a denoiser (computed in f64, returned in f32). Exact; no weights.
pub struct ExactMixture {
    pub mixture: Mixture,
}

impl Denoiser for ExactMixture {
    fn velocity(&self, x: &Tensor, sigma: &Tensor, cond: &Cond) -> candle_core::Result<Tensor> {
        let Cond::Class(c) = cond else {
            candle_core::bail!("the exact mixture takes class conditions");
        };
        let (n, d) = x.dims2()?;
        let xs: Vec<f64> = x.flatten_all()?.to_vec1::<f32>()?.into_iter().map(f64::from).collect();
        let ss: Vec<f64> = sigma.to_vec1::<f32>()?.into_iter().map(f64::from).collect();
        let cs = c.to_vec1::<u32>()?;
        let v = self.mixture.velocity_batch(&xs, &ss, &cs, 1.0);
        Tensor::from_vec(v.into_iter().map(|a| a as f32).collect::<Vec<f32>>(), (n, d), x.device())
    }
    fn null_cond(&self, n: usize) -> candle_core::Result<Cond> {
        Ok(Cond::Class(Tensor::full(self.mixture.classes as u32, n, &Device::Cpu)?))
    }
}

/// Shape of the MLP (recipe section `[mlp]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MlpConfig {
    /// Hidden width.
    pub width: usize,
    /// Number of hidden layers.
    pub depth: usize,
    /// Sinusoidal frequencies of the timestep embedding (2× as many features).
    pub time_freqs: usize,
    /// Width of the learned class embedding.
    pub class_dim: usize,
}

impl Default for MlpConfig {
    fn default() -> Self {
        MlpConfig { width: 64, depth: 3, time_freqs: 8, class_dim: 8 }
    }
}

/// `v = MLP([x, sin/cos(1000σ·f), E[c]])` with SiLU activations. Weights are `[in, out]`.
pub struct Mlp {
    pub cfg: MlpConfig,
    pub dim: usize,
    pub classes: usize,
    /// Parameter names, in the order of `params`.
    pub names: Vec<String>,
    /// Trainable variables (empty for a frozen view).
    pub vars: Vec<Var>,
    params: Vec<Tensor>,
    freqs: Tensor,
}

impl Mlp {
    /// A fresh MLP (weights ~ N(0, 1/fan_in), zero biases).
    pub fn new(cfg: &MlpConfig, dim: usize, classes: usize, rng: &mut Rng) -> candle_core::Result<Mlp> {
        let mut shapes: Vec<(String, Vec<usize>)> = vec![("embed.class".into(), vec![classes + 1, cfg.class_dim])];
        let mut fan_in = dim + 2 * cfg.time_freqs + cfg.class_dim;
        for i in 0..=cfg.depth {
            let out = if i == cfg.depth { dim } else { cfg.width };
            shapes.push((format!("layers.{i}.weight"), vec![fan_in, out]));
            shapes.push((format!("layers.{i}.bias"), vec![out]));
            fan_in = out;
        }
        let mut tensors = Vec::new();
        for (name, shape) in &shapes {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with("bias") {
                vec![0.0; n]
            } else {
                let scale = if name.starts_with("embed") { 1.0 } else { (1.0 / shape[0] as f64).sqrt() };
                (0..n).map(|_| (rng.normal() * scale) as f32).collect()
            };
            tensors.push((name.clone(), Tensor::from_vec(data, shape.as_slice(), &Device::Cpu)?));
        }
        Mlp::from_tensors(cfg, dim, classes, tensors)
    }

    /// Trainable MLP from named tensors (deep copies: the new variables own their storage).
    pub fn from_tensors(cfg: &MlpConfig, dim: usize, classes: usize, tensors: Vec<(String, Tensor)>) -> candle_core::Result<Mlp> {
        let mut names = Vec::new();
        let mut vars = Vec::new();
        for (n, t) in tensors {
            names.push(n);
            vars.push(Var::from_tensor(&t.copy()?)?);
        }
        let params = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let freqs: Vec<f32> = (0..cfg.time_freqs).map(|i| (-(10000f64.ln()) * i as f64 / cfg.time_freqs as f64).exp() as f32).collect();
        let freqs = Tensor::from_vec(freqs, (1, cfg.time_freqs), &Device::Cpu)?;
        let m = Mlp { cfg: cfg.clone(), dim, classes, names, vars, params, freqs };
        m.check()?;
        Ok(m)
    }

    fn check(&self) -> candle_core::Result<()> {
        let want = 1 + 2 * (self.cfg.depth + 1);
        if self.params.len() != want {
            candle_core::bail!("MLP has {} tensors, its config needs {want}", self.params.len());
        }
        Ok(())
    }

    /// A trainable deep copy (fresh storage, no shared state).
    pub fn deep_copy(&self) -> candle_core::Result<Mlp> {
        Mlp::from_tensors(&self.cfg, self.dim, self.classes, self.named_tensors())
    }

    /// A view that computes with the current weights without recording gradients.
    pub fn frozen(&self) -> Mlp {
        Mlp {
            cfg: self.cfg.clone(),
            dim: self.dim,
            classes: self.classes,
            names: self.names.clone(),
            vars: Vec::new(),
            params: self.params.iter().map(|p| p.detach()).collect(),
            freqs: self.freqs.clone(),
        }
    }

    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.names.iter().cloned().zip(self.params.iter().map(|p| p.detach())).collect()
    }

    /// An MLP from a safetensors file (a teacher or an expert written by a run); a file that
    /// does not fit `cfg` is an inconsistency naming it.
    pub fn load(path: &std::path::Path, cfg: &MlpConfig, dim: usize, classes: usize) -> crate::Result<Mlp> {
        let (mut t, _) = crate::train::rundir::read_tensors(path)?;
        t.sort_by_key(|(n, _)| mlp_order(n));
        Mlp::from_tensors(cfg, dim, classes, t)
            .map_err(|e| crate::Error::inconsistent(path, format!("does not fit the recipe's MLP: {}", crate::Error::from(e).message())))
    }

    pub fn param_count(&self) -> usize {
        self.params.iter().map(|p| p.elem_count()).sum()
    }
}

impl Denoiser for Mlp {
    fn velocity(&self, x: &Tensor, sigma: &Tensor, cond: &Cond) -> candle_core::Result<Tensor> {
        let Cond::Class(c) = cond else {
            candle_core::bail!("the MLP takes class conditions");
        };
        let n = x.dim(0)?;
        let t = (sigma.reshape((n, 1))? * 1000.0)?;
        let arg = t.broadcast_mul(&self.freqs)?;
        let emb = self.params[0].index_select(c, 0)?;
        let mut h = Tensor::cat(&[x, &arg.sin()?, &arg.cos()?, &emb], D::Minus1)?;
        for i in 0..=self.cfg.depth {
            let w = &self.params[1 + 2 * i];
            let b = &self.params[2 + 2 * i];
            h = h.matmul(w)?.broadcast_add(b)?;
            if i < self.cfg.depth {
                h = silu(&h)?;
            }
        }
        Ok(h)
    }
    fn null_cond(&self, n: usize) -> candle_core::Result<Cond> {
        Ok(Cond::Class(Tensor::full(self.classes as u32, n, &Device::Cpu)?))
    }
}

/// SiLU `x·σ(x)`: on the CPU in f32 one fused, vectorisable pass forward and one backward
/// (candle's own costs a libm `expf` per element forward and six tensor ops backward, together
/// about a third of a toy update); elsewhere candle's.
pub fn silu(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.apply_op1(FusedSilu)
    } else {
        x.silu()
    }
}

/// `eˣ` for f32 (Cephes `expf`: range reduction by ln 2, degree-5 polynomial; within 2 ulp of the
/// exact value, inputs clamped to [−87.3, 88.7]). Branch-free so that loops over it vectorise.
#[inline(always)]
fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(-87.33654, 88.72283);
    // k = round(x / ln 2) by the 1.5·2²³ trick (exact for |k| < 2²²).
    let k = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
    let r = x - k * 0.693_359_4 - k * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2ᵏ·e with k in [−126, 128]: scale in two halves so that neither overflows the exponent.
    let k = k as i32;
    let k1 = k >> 1;
    let two = |n: i32| f32::from_bits(((n + 127) as u32) << 23);
    e * two(k1) * two(k - k1)
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: f32 only");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: contiguous input only"),
    }
}

struct FusedSilu;

impl CustomOp1 for FusedSilu {
    fn name(&self) -> &'static str {
        "fused-silu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "silu")?;
        let y: Vec<f32> = x.iter().map(|&x| x / (1.0 + fast_exp(-x))).collect();
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(arg.contiguous()?.apply_op2_no_bwd(&grad_res.contiguous()?, &FusedSiluGrad)?))
    }
}

/// `g · d silu/dx = g · σ(x)·(1 + x·(1 − σ(x)))`.
struct FusedSiluGrad;

impl CustomOp2 for FusedSiluGrad {
    fn name(&self) -> &'static str {
        "fused-silu-grad"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "silu backward")?;
        let g = f32_slice(s2, l2, "silu backward")?;
        if l1.shape() != l2.shape() {
            candle_core::bail!("silu backward: shapes {:?} and {:?} differ", l1.shape(), l2.shape());
        }
        let d: Vec<f32> = x
            .iter()
            .zip(g)
            .map(|(&x, &g)| {
                let s = 1.0 / (1.0 + fast_exp(-x));
                g * (s * (1.0 + x * (1.0 - s)))
            })
            .collect();
        Ok((CpuStorage::F32(d), l1.shape().clone()))
    }
}

/// The MLP's own tensor order: the class embedding first, then the layers by index (weight
/// before bias).
pub fn mlp_order(n: &str) -> (usize, usize) {
    if n.starts_with("embed") {
        return (0, 0);
    }
    let mut it = n.split('.');
    let i: usize = it.nth(1).and_then(|x| x.parse().ok()).unwrap_or(usize::MAX);
    (1 + i, if n.ends_with("weight") { 0 } else { 1 })
}

/// `[n]` f32 tensor.
pub fn vec_tensor(v: Vec<f32>) -> candle_core::Result<Tensor> {
    let n = v.len();
    Tensor::from_vec(v, n, &Device::Cpu)
}

/// Class ids as a condition.
pub fn class_cond(c: Vec<u32>) -> candle_core::Result<Cond> {
    let n = c.len();
    Ok(Cond::Class(Tensor::from_vec(c, n, &Device::Cpu)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_within_a_few_ulp_of_exp() {
        let mut worst = 0f64;
        for i in -87_000..88_000 {
            let x = i as f32 * 1e-3 + 3.7e-5;
            let want = (x as f64).exp();
            worst = worst.max(((fast_exp(x) as f64 - want) / want).abs());
        }
        assert!(worst < 3.0 * f32::EPSILON as f64, "relative error {worst}");
        assert!(fast_exp(200.0).is_finite() && fast_exp(-200.0) >= 0.0 && fast_exp(-200.0) < 1e-37);
    }

    #[test]
    fn fused_silu_matches_candles_forward_and_backward() {
        let mut rng = Rng::new(1);
        let x: Vec<f32> = (0..600)
            .map(|i| if i < 8 { [-100.0, -30.0, -0.0, 0.0, 1e-6, 30.0, 100.0, -5.0][i] } else { (rng.normal() * 6.0) as f32 })
            .collect();
        let v = Var::from_vec(x, (30, 20), &Device::Cpu).unwrap();
        let w = Tensor::from_vec((0..600).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<f32>>(), (30, 20), &Device::Cpu).unwrap();
        let ours = silu(v.as_tensor()).unwrap();
        let theirs = v.as_tensor().silu().unwrap();
        let diff = |a: &Tensor, b: &Tensor| {
            let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            a.iter().zip(&b).map(|(a, b)| (a - b).abs() / (1.0 + b.abs())).fold(0f32, f32::max)
        };
        assert!(diff(&ours, &theirs) < 1e-6, "forward {}", diff(&ours, &theirs));
        let g1 = (ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (theirs * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let (g1, g2) = (g1.get(&v).unwrap(), g2.get(&v).unwrap());
        assert!(diff(g1, g2) < 1e-6, "backward {}", diff(g1, g2));
    }
}
