//! Gradient checkpointing: forward block by block keeping only each block's input, then
//! backward in reverse, recomputing one block at a time from a variable copy of its input.
//!
//! For block `i` with recomputed output `o` and incoming gradient `g`, the backward pass of
//! `Σ o·g` gives the parameter gradients of the block and the gradient of its input (and of the
//! shared context: text embedding, modulation), which flows to block `i − 1`. At the end the
//! accumulated input and context gradients are pushed through the stem (patch/text/time
//! embedders) the same way. Activation memory is one block's graph plus the block inputs.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, TensorId, Var};

/// A model cut into a stem (done by the caller), `num_blocks` blocks over a state that shares
/// one context, and a head.
pub trait Staged {
    /// Non-differentiable data the blocks need (RoPE tables, shapes).
    type Aux;
    fn num_blocks(&self) -> usize;
    /// Block `i`: new state from `state` and `ctx`.
    fn block(&self, i: usize, state: &[Tensor], ctx: &[Tensor], aux: &Self::Aux) -> Result<Vec<Tensor>>;
    /// The model output from the last state.
    fn finish(&self, state: &[Tensor], ctx: &[Tensor], aux: &Self::Aux) -> Result<Tensor>;
}

fn var_copies(ts: &[Tensor]) -> Result<Vec<Var>> {
    ts.iter().map(|t| Var::from_tensor(&t.detach())).collect()
}

/// `Σ_j (a_j · g_j).sum()` over pairs with a gradient.
fn surrogate(outs: &[Tensor], grads: &[Option<Tensor>]) -> Result<Option<Tensor>> {
    let mut total: Option<Tensor> = None;
    for (o, g) in outs.iter().zip(grads) {
        if let Some(g) = g {
            let s = (o * g.to_dtype(o.dtype())?)?.sum_all()?.to_dtype(candle_core::DType::F32)?;
            total = Some(match total {
                Some(t) => (t + s)?,
                None => s,
            });
        }
    }
    Ok(total)
}

fn add(acc: &mut HashMap<TensorId, Tensor>, id: TensorId, g: &Tensor) -> Result<()> {
    let v = match acc.remove(&id) {
        Some(old) => (old + g)?,
        None => g.clone(),
    };
    acc.insert(id, v.detach());
    Ok(())
}

/// Gradients of `loss(model.finish(...))` with respect to `vars`, recomputing blocks.
/// `state` and `ctx` are the stem's outputs with their graph (so stem parameters get gradients).
pub fn checkpointed_grads<M: Staged>(
    model: &M,
    state: Vec<Tensor>,
    ctx: Vec<Tensor>,
    aux: &M::Aux,
    loss: impl Fn(&Tensor) -> Result<Tensor>,
    vars: &[Var],
) -> Result<GradStore> {
    let want: Vec<TensorId> = vars.iter().map(|v| v.as_tensor().id()).collect();
    let mut acc: HashMap<TensorId, Tensor> = HashMap::new();
    let collect = |g: &GradStore, acc: &mut HashMap<TensorId, Tensor>| -> Result<()> {
        for (v, id) in vars.iter().zip(&want) {
            if let Some(t) = g.get(v.as_tensor()) {
                add(acc, *id, t)?;
            }
        }
        Ok(())
    };
    let ctx_d: Vec<Tensor> = ctx.iter().map(|t| t.detach()).collect();
    // Forward, keeping block inputs only.
    let mut inputs: Vec<Vec<Tensor>> = Vec::with_capacity(model.num_blocks() + 1);
    inputs.push(state.iter().map(|t| t.detach()).collect());
    for i in 0..model.num_blocks() {
        let out = model.block(i, &inputs[i], &ctx_d, aux)?;
        inputs.push(out.iter().map(|t| t.detach()).collect());
    }
    // Head.
    let mut ctx_grads: Vec<Option<Tensor>> = vec![None; ctx.len()];
    let acc_ctx = |cg: &mut Vec<Option<Tensor>>, g: &GradStore, cv: &[Var]| -> Result<()> {
        for (slot, v) in cg.iter_mut().zip(cv) {
            if let Some(t) = g.get(v.as_tensor()) {
                *slot = Some(match slot.take() {
                    Some(o) => (o + t)?.detach(),
                    None => t.detach(),
                });
            }
        }
        Ok(())
    };
    let last = inputs.pop().unwrap_or_default();
    let sv = var_copies(&last)?;
    let cv = var_copies(&ctx_d)?;
    let st: Vec<Tensor> = sv.iter().map(|v| v.as_tensor().clone()).collect();
    let ct: Vec<Tensor> = cv.iter().map(|v| v.as_tensor().clone()).collect();
    let g = loss(&model.finish(&st, &ct, aux)?)?.backward()?;
    collect(&g, &mut acc)?;
    acc_ctx(&mut ctx_grads, &g, &cv)?;
    let mut state_grads: Vec<Option<Tensor>> = sv.iter().map(|v| g.get(v.as_tensor()).map(|t| t.detach())).collect();
    drop(g);
    // Blocks in reverse.
    for i in (0..model.num_blocks()).rev() {
        let input = inputs.pop().unwrap_or_default();
        let sv = var_copies(&input)?;
        let cv = var_copies(&ctx_d)?;
        let st: Vec<Tensor> = sv.iter().map(|v| v.as_tensor().clone()).collect();
        let ct: Vec<Tensor> = cv.iter().map(|v| v.as_tensor().clone()).collect();
        let out = model.block(i, &st, &ct, aux)?;
        let Some(s) = surrogate(&out, &state_grads)? else { break };
        let g = s.backward()?;
        collect(&g, &mut acc)?;
        acc_ctx(&mut ctx_grads, &g, &cv)?;
        state_grads = sv.iter().map(|v| g.get(v.as_tensor()).map(|t| t.detach())).collect();
    }
    // Stem.
    let mut outs = state.clone();
    outs.extend(ctx.iter().cloned());
    let mut grads = state_grads;
    grads.extend(ctx_grads);
    if let Some(s) = surrogate(&outs, &grads)? {
        if s.track_op() {
            collect(&s.backward()?, &mut acc)?;
        }
    }
    let mut store = GradStore::default();
    for v in vars {
        if let Some(t) = acc.remove(&v.as_tensor().id()) {
            store.insert(v.as_tensor(), t);
        }
    }
    Ok(store)
}
