//! AdamW with its state in view, and global-norm gradient clipping.
//!
//! The update is `candle_nn::AdamW`'s, operation for operation (decoupled weight decay, bias
//! correction, `m̂/(√v̂ + ε)`), configured with `candle_nn::ParamsAdamW`. It is re-stated here
//! because candle keeps the moments private, and a checkpoint must hold them for a bit-exact
//! resume. The paper uses β = (0, 0.999) for both generator and fake score.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
pub use candle_nn::ParamsAdamW;

use super::dist::{self, Communicator};
use crate::error::{Error, Result};

/// Trainable variables with their names (the checkpoint keys, after a prefix).
#[derive(Default, Clone)]
pub struct Trainable {
    pub names: Vec<String>,
    pub vars: Vec<Var>,
}

impl Trainable {
    /// The current values, named `<prefix><name>` (detached).
    pub fn tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        self.names.iter().zip(&self.vars).map(|(n, v)| (format!("{prefix}{n}"), v.as_tensor().detach())).collect()
    }

    /// Set every variable from `t[<prefix><name>]` (a checkpoint read from `path`).
    pub fn restore(&self, prefix: &str, t: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
        restore_vars(prefix, &self.names, &self.vars, t, path)
    }

    /// Append `o`'s variables, their names prefixed.
    pub fn extend(&mut self, prefix: &str, o: Trainable) {
        self.names.extend(o.names.into_iter().map(|n| format!("{prefix}{n}")));
        self.vars.extend(o.vars);
    }
}

fn restore_vars(prefix: &str, names: &[String], vars: &[Var], t: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    for (n, v) in names.iter().zip(vars) {
        let key = format!("{prefix}{n}");
        let src = t.get(&key).ok_or_else(|| Error::inconsistent(path, format!("checkpoint lacks '{key}'")))?;
        v.set(&src.to_device(v.device())?).map_err(|e| Error::inconsistent(path, format!("'{key}': {}", Error::from(e).message())))?;
    }
    Ok(())
}

/// AdamW over a fixed list of variables.
pub struct AdamW {
    pub params: ParamsAdamW,
    pub vars: Vec<Var>,
    /// First moments, one per variable.
    pub m: Vec<Var>,
    /// Second moments, one per variable.
    pub v: Vec<Var>,
    /// Number of updates taken.
    pub step_t: u64,
    /// The ranks the gradients are averaged over before each update (one rank by default).
    pub comm: Arc<dyn Communicator>,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, params: ParamsAdamW) -> candle_core::Result<AdamW> {
        let m = vars.iter().map(|x| Var::zeros(x.shape(), x.dtype(), x.device())).collect::<Result<Vec<_>, _>>()?;
        let v = vars.iter().map(|x| Var::zeros(x.shape(), x.dtype(), x.device())).collect::<Result<Vec<_>, _>>()?;
        Ok(AdamW { params, vars, m, v, step_t: 0, comm: dist::single() })
    }

    /// The moments, named `<prefix>m.<name>` and `<prefix>v.<name>` for the variables' `names`.
    pub fn state_tensors(&self, prefix: &str, names: &[String]) -> Vec<(String, Tensor)> {
        let mut v = Vec::new();
        for (i, n) in names.iter().enumerate() {
            v.push((format!("{prefix}m.{n}"), self.m[i].as_tensor().detach()));
            v.push((format!("{prefix}v.{n}"), self.v[i].as_tensor().detach()));
        }
        v
    }

    /// Set the moments from a checkpoint written by [`AdamW::state_tensors`].
    pub fn restore(&mut self, prefix: &str, names: &[String], t: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
        restore_vars(&format!("{prefix}m."), names, &self.m, t, path)?;
        restore_vars(&format!("{prefix}v."), names, &self.v, t, path)
    }

    /// Average the gradients over `comm`'s ranks before every update (data parallelism).
    pub fn with_comm(mut self, comm: Arc<dyn Communicator>) -> AdamW {
        self.comm = comm;
        self
    }

    /// One update from `grads` averaged over the ranks, after clipping their global L2 norm to
    /// `clip` (0 = no clipping). Returns the norm (of the averaged gradients) before clipping.
    pub fn step(&mut self, grads: &GradStore, clip: f64) -> candle_core::Result<f64> {
        let mut gs: Vec<Option<Tensor>> = self.vars.iter().map(|x| grads.get(x).cloned()).collect();
        dist::reduce_grads(&*self.comm, &self.vars, &mut gs)?;
        let mut sq = 0f64;
        for g in gs.iter().flatten() {
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        let norm = sq.sqrt();
        let scale = if clip > 0.0 && norm > clip { clip / (norm + 1e-6) } else { 1.0 };
        self.step_t += 1;
        let p = &self.params;
        let lr_lambda = p.lr * p.weight_decay;
        let scale_m = 1f64 / (1f64 - p.beta1.powi(self.step_t as i32));
        let scale_v = 1f64 / (1f64 - p.beta2.powi(self.step_t as i32));
        for (i, g) in gs.iter().enumerate() {
            let Some(g) = g else { continue };
            let g = if scale != 1.0 { (g * scale)? } else { g.clone() };
            let (theta, m, v) = (&self.vars[i], &self.m[i], &self.v[i]);
            let next_m = ((m.as_tensor() * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
            let next_v = ((v.as_tensor() * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let m_hat = (&next_m * scale_m)?;
            let v_hat = (&next_v * scale_v)?;
            let next_theta = (theta.as_tensor() * (1f64 - lr_lambda))?;
            let adjusted = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
            let next_theta = (next_theta - (adjusted * p.lr)?)?;
            m.set(&next_m)?;
            v.set(&next_v)?;
            theta.set(&next_theta)?;
        }
        Ok(norm)
    }
}
