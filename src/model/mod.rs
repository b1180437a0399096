//! Teacher architectures in candle (Wan2.2, Qwen-Image) and the pieces they share.
//!
//! Data flows one way: checkpoint (any format/layout, [`crate::store`]) → canonical diffusers
//! names ([`crate::layout`]) → candle tensors ([`weights`]) → modules ([`wan`], [`qwen`]).
//! Modules never read whole files.

pub mod bench;
pub mod breakdown;
pub mod checkpoint;
pub mod cli;
pub mod denoiser;
pub mod linear;
pub mod lora;
pub mod ops;
pub mod qwen;
pub mod rope;
pub mod wan;
pub mod weights;

use candle_core::{Result, Tensor, Var};

use linear::{Linear, LoraConfig};

/// One parameter of a module, by diffusers name.
pub enum Param<'a> {
    Linear(&'a mut Linear),
    Tensor(&'a mut Tensor),
}

/// What to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainMode {
    /// Only the LoRA adapters.
    Lora,
    /// Every weight (and the adapters, if any).
    Full,
}

/// Modules whose parameters can be listed by name.
pub trait Parameters {
    /// Every parameter with its diffusers name (linear layers as a whole: `<name>.weight/.bias`).
    fn params(&mut self) -> Vec<(String, Param<'_>)>;

    /// Attach fresh LoRA adapters (zero `up`) to the linear layers `cfg.targets` selects.
    fn attach_lora(&mut self, cfg: &LoraConfig) -> Result<usize> {
        let linears = self.params().into_iter().filter_map(|(n, p)| if let Param::Linear(l) = p { Some((n, l)) } else { None }).collect();
        linear::attach(linears, cfg)
    }

    /// Fold every adapter into its weight.
    fn merge_lora(&mut self) -> Result<()> {
        for (_, p) in self.params() {
            if let Param::Linear(l) = p {
                l.merge()?;
            }
        }
        Ok(())
    }

    /// The trainable variables: the adapters, or every weight (made variables in place).
    fn trainable_vars(&mut self, mode: TrainMode) -> Result<Vec<Var>> {
        vars_of(self.params(), mode)
    }
}

/// The trainable variables among `params`: adapters only, or every weight (made variables in
/// place) plus the adapters.
pub fn vars_of(params: Vec<(String, Param<'_>)>, mode: TrainMode) -> Result<Vec<Var>> {
    let mut vars = Vec::new();
    for (_, p) in params {
        match p {
            Param::Linear(l) => {
                if mode == TrainMode::Full {
                    vars.extend(l.make_trainable()?);
                }
                if let Some(a) = &l.lora {
                    vars.extend(a.vars());
                }
            }
            Param::Tensor(t) if mode == TrainMode::Full => {
                let v = Var::from_tensor(&t.detach())?;
                *t = v.as_tensor().clone();
                vars.push(v);
            }
            Param::Tensor(_) => {}
        }
    }
    Ok(vars)
}

/// The smallest tensor among `params` that trains (an adapter factor or a trainable weight not
/// in a frozen view), if any: what a checkpointed block links its node to.
pub fn trainable_anchor(params: Vec<(String, Param<'_>)>) -> Option<Tensor> {
    let mut found: Vec<Tensor> = Vec::new();
    for (_, p) in params {
        match p {
            Param::Linear(l) if !l.frozen => {
                if let Some(a) = &l.lora {
                    found.push(a.down.as_tensor().clone());
                }
                found.extend(std::iter::once(&l.weight).chain(l.bias.as_ref()).filter(|t| t.is_variable()).cloned());
            }
            Param::Tensor(t) if t.is_variable() => found.push(t.clone()),
            _ => {}
        }
    }
    found.into_iter().min_by_key(|t| t.elem_count())
}

/// Relative L2 error `‖a − b‖ / ‖b‖`, computed in f64.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(candle_core::DType::F64)?.flatten_all()?;
    let b = b.to_dtype(candle_core::DType::F64)?.flatten_all()?;
    let d = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let n = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(d / n.max(f64::MIN_POSITIVE))
}
