//! Activation checkpointing as an op: a transformer block whose activations are not kept for the
//! backward pass, but recomputed there from the block's input.
//!
//! [`run_block`] runs a block; when its result is part of a backward pass (it tracks gradients)
//! and checkpointing is on, the block's graph is dropped at once and replaced by one op node
//! that holds only the block's inputs (the residual stream and the shared context) and its output
//! (a [`super::graft`]: the output is not kept twice). The node's
//! backward recomputes the block from copies of those inputs, backpropagates `Σ out ∘ ∂out`
//! through the recomputed graph, and hands back the inputs' gradients. A block's own trainable
//! variables (LoRA adapters, a full fake's weights) are no inputs of the node: their gradients go
//! to a per-thread sink that [`backward`] opens before the pass and merges into the returned
//! [`GradStore`] after it. Activation memory is then the block inputs plus one block's graph
//! at a time.
//!
//! The recomputed forward is the same computation on the same values, and each gradient is
//! accumulated in the same order as without checkpointing, so on the CPU the results are the
//! same bits (tested on the tiny teachers).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{Result, Shape, Tensor, TensorId, Var};

use super::graft::{graft, Backward};

/// One block: new state from `(state, ctx)`.
pub type BlockFn = Arc<dyn Fn(&[Tensor], &[Tensor]) -> Result<Vec<Tensor>> + Send + Sync>;

/// A block to run: the function and one of its trainable tensors, if it has any (the node is
/// made to depend on it, so that a block whose inputs need no gradient, the first one, still
/// has its backward run; that tensor gets a zero gradient from the link).
pub struct Block {
    pub f: BlockFn,
    pub anchor: Option<Tensor>,
}

struct Sink {
    wanted: HashSet<TensorId>,
    grads: HashMap<TensorId, Tensor>,
}

thread_local! {
    static SINK: RefCell<Option<Sink>> = const { RefCell::new(None) };
}

/// `loss.backward()`, plus the gradients of `vars` that checkpointed blocks computed during the
/// pass (added to what the pass itself found for the same variable).
pub fn backward(loss: &Tensor, vars: &[Var]) -> Result<GradStore> {
    let wanted = vars.iter().map(|v| v.as_tensor().id()).collect();
    let outer = SINK.with(|s| s.borrow_mut().replace(Sink { wanted, grads: HashMap::new() }));
    let r = loss.backward();
    let sink = SINK.with(|s| std::mem::replace(&mut *s.borrow_mut(), outer));
    let mut g = r?;
    if let Some(sink) = sink {
        for (id, t) in sink.grads {
            let t = match g.get_id(id) {
                Some(old) => (old + t)?,
                None => t,
            };
            g.insert_id(id, t);
        }
    }
    Ok(g)
}

/// The context every block of a forward pass shares (embeddings, modulation).
///
/// Each checkpointed block holds its own packed copy of it (one flat view when the context is
/// one tensor; a copy of a few `[B, L, dim]` rows otherwise): with one copy shared by all
/// blocks, its gradient would be summed over the blocks before reaching the embedders, in
/// another order than without checkpointing, and a full-parameter fake would train to other bits.
pub struct Context {
    pub tensors: Vec<Tensor>,
}

impl Context {
    pub fn new(tensors: Vec<Tensor>) -> Context {
        Context { tensors }
    }

    fn packed(&self) -> Result<Tensor> {
        pack(&self.tensors)
    }
}

/// Run `block` on `(state, ctx)`, checkpointed when `enabled` and its result needs gradients.
pub fn run_block(block: &Block, state: &[Tensor], context: &Context, enabled: bool) -> Result<Vec<Tensor>> {
    let f = &block.f;
    let ctx = &context.tensors;
    let out = f(state, ctx)?;
    if !enabled || !out.iter().any(|t| t.track_op()) {
        return Ok(out);
    }
    let inputs_track = state.iter().chain(ctx).any(|t| t.track_op());
    // One element of a trainable tensor of the block (a view: no copy).
    let anchor = match &block.anchor {
        Some(a) if a.track_op() => a.flatten_all()?.narrow(0, 0, 1)?,
        // Nothing links the node to the gradients the block needs: keep the plain graph.
        _ if !inputs_track => return Ok(out),
        _ => Tensor::zeros(1, out[0].dtype(), out[0].device())?,
    };
    let out_shapes: Vec<Shape> = out.iter().map(|t| t.shape().clone()).collect();
    // The values, without the graph that produced them (dropped with `out`).
    let values = pack(&out)?.detach();
    let dtype = values.dtype();
    drop(out);
    let (f, state_shapes, ctx_shapes) =
        (f.clone(), state.iter().map(|t| t.shape().clone()).collect::<Vec<_>>(), ctx.iter().map(|t| t.shape().clone()).collect::<Vec<_>>());
    let bwd: Backward = Arc::new(move |inputs: &[Tensor], grad: &Tensor| recompute(&f, &state_shapes, &ctx_shapes, dtype, inputs, grad));
    let y = graft(values, &[pack(state)?, context.packed()?, anchor], "checkpoint", bwd)?;
    unpack(&y, &out_shapes)
}

/// Tensors flattened into one 1-D tensor (one tensor: a flat view of it).
fn pack(ts: &[Tensor]) -> Result<Tensor> {
    match ts {
        [one] => one.flatten_all(),
        _ => Tensor::cat(&ts.iter().map(|t| t.flatten_all()).collect::<Result<Vec<_>>>()?, 0),
    }
}

/// The tensors [`pack`] flattened, back in their shapes.
fn unpack(t: &Tensor, shapes: &[Shape]) -> Result<Vec<Tensor>> {
    let mut at = 0;
    let mut out = Vec::with_capacity(shapes.len());
    for s in shapes {
        let n = s.elem_count();
        out.push(t.narrow(0, at, n)?.reshape(s)?);
        at += n;
    }
    Ok(out)
}

/// The backward pass of a checkpointed block: recompute it from variable copies of its inputs
/// `[state, ctx, anchor]` and backpropagate `Σ out ∘ grad` through the recomputed graph.
fn recompute(
    f: &BlockFn,
    state_shapes: &[Shape],
    ctx_shapes: &[Shape],
    dtype: candle_core::DType,
    inputs: &[Tensor],
    grad: &Tensor,
) -> Result<Vec<Option<Tensor>>> {
    let (state, ctx, anchor) = (&inputs[0], &inputs[1], &inputs[2]);
    let sv = Var::from_tensor(&state.detach())?;
    let cv = Var::from_tensor(&ctx.detach())?;
    let st = unpack(sv.as_tensor(), state_shapes)?;
    let ct = unpack(cv.as_tensor(), ctx_shapes)?;
    let out = pack(&f(&st, &ct)?)?;
    let g = (out * grad.to_dtype(dtype)?)?.sum_all()?.backward()?;
    SINK.with(|s| -> Result<()> {
        if let Some(sink) = s.borrow_mut().as_mut() {
            for id in &sink.wanted {
                if let Some(t) = g.get_id(*id) {
                    let t = match sink.grads.remove(id) {
                        Some(old) => (old + t)?,
                        None => t.clone(),
                    };
                    sink.grads.insert(*id, t);
                }
            }
        }
        Ok(())
    })?;
    let take = |arg: &Tensor, v: &Var| if arg.track_op() { g.get(v.as_tensor()).cloned() } else { None };
    let anchor_grad = if anchor.track_op() { Some(anchor.zeros_like()?) } else { None };
    Ok(vec![take(state, &sv), take(ctx, &cv), anchor_grad])
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A "block" with a trainable weight: `(x, y) ← (tanh(x·W + c), 2y)`.
    fn block(w: &Var) -> Block {
        let wt = w.as_tensor().clone();
        let f: BlockFn =
            Arc::new(move |s: &[Tensor], c: &[Tensor]| Ok(vec![(s[0].matmul(&wt)?.broadcast_add(&c[0])?).tanh()?, (&s[1] * 2.0)?]));
        Block { f, anchor: Some(w.as_tensor().clone()) }
    }

    #[test]
    fn checkpointed_blocks_give_the_same_gradients_bit_for_bit() {
        let dev = Device::Cpu;
        let mut r = crate::rng::Rng::new(3);
        let mut t = |shape: &[usize]| {
            let n: usize = shape.iter().product();
            Tensor::from_vec(r.normals_f32(n), shape, &dev).unwrap()
        };
        let (w1, w2) = (Var::from_tensor(&t(&[6, 6])).unwrap(), Var::from_tensor(&t(&[6, 6])).unwrap());
        let x0 = Var::from_tensor(&t(&[4, 6])).unwrap();
        // A first input that needs no gradient (the blocks' own variables still do).
        let x_plain = t(&[4, 6]);
        let side = t(&[2, 3]);
        let c = Var::from_tensor(&t(&[6])).unwrap();
        let vars = [w1.clone(), w2.clone(), x0.clone(), c.clone()];
        let run = |ck: bool, x: &Tensor| {
            let mut s = vec![x.clone(), side.clone()];
            let ctx = Context::new(vec![c.as_tensor().clone()]);
            for w in [&w1, &w2, &w1] {
                s = run_block(&block(w), &s, &ctx, ck).unwrap();
            }
            // A loss after the blocks, with a variable used outside them too.
            let loss = (s[0].matmul(w2.as_tensor()).unwrap().sqr().unwrap().sum_all().unwrap() + s[1].sum_all().unwrap()).unwrap();
            let g = backward(&loss, &vars).unwrap();
            vars.iter().map(|v| g.get(v.as_tensor()).map(|g| g.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect::<Vec<_>>()
        };
        for x in [x0.as_tensor(), &x_plain] {
            let (plain, ck) = (run(false, x), run(true, x));
            assert_eq!(plain, ck);
            // Every block variable has a gradient, and not a zero one.
            assert!(plain[..2].iter().chain(&plain[3..]).all(|g| g.as_ref().is_some_and(|g| g.iter().any(|v| *v != 0.0))));
        }
    }
}
