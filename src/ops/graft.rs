//! A graph node for a value computed without a graph: [`graft`] takes a tensor computed from
//! detached inputs and a backward function, and returns the same value as a node whose parents
//! are the (tracked) inputs and whose backward pass is that function.
//!
//! Why: candle keeps every input of every op alive until the backward pass ends, so a composed
//! layer keeps all its intermediates (a LoRA linear layer `x·Wᵀ + b + s·(x·Dᵀ)·Uᵀ` keeps the
//! product, the biased product, the adapter's product, its scaled copy and the sum: five tensors
//! of the output's size). A grafted node keeps its inputs and its own output only; its backward
//! recomputes whatever small intermediates it needs. Activation checkpointing
//! ([`super::checkpoint`]) is a graft whose backward recomputes a whole block.
//!
//! The value is moved into the node: the node's forward hands out a copy of its storage and
//! drops the original at once, so a grafted value costs one transient copy (bandwidth, not
//! memory) and nothing after.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};

/// The backward function of a grafted node: the inputs (as given to [`graft`], detached values
/// of them are fine to use) and the gradient of the output, to the gradients of the inputs
/// (`None` for an input that gets none). Only inputs that track gradients are asked for.
pub type Backward = Arc<dyn Fn(&[Tensor], &Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync>;

/// `value` as a node of the graph with parents `inputs` (one to three tensors) and backward
/// `bwd`. When no input tracks gradients the value is returned as it is.
pub fn graft(value: Tensor, inputs: &[Tensor], name: &'static str, bwd: Backward) -> Result<Tensor> {
    if inputs.is_empty() || inputs.len() > 3 {
        candle_core::bail!("graft: one to three inputs, got {}", inputs.len());
    }
    if !inputs.iter().any(|t| t.track_op()) {
        return Ok(value);
    }
    let value = value.detach();
    // The node's storage is a copy of exactly the value's elements.
    let value = if exact(&value) { value } else { value.copy()? };
    let n = inputs.len();
    let dummy = || Tensor::zeros((), value.dtype(), value.device());
    let a = inputs[0].clone();
    let b = if n > 1 { inputs[1].clone() } else { dummy()? };
    let c = if n > 2 { inputs[2].clone() } else { dummy()? };
    let op = Graft { name, n, value: Mutex::new(Some(value)), bwd };
    a.apply_op3(&b, &c, op)
}

/// A fresh contiguous tensor that owns its whole storage.
fn exact(t: &Tensor) -> bool {
    let (s, l) = t.storage_and_layout();
    let n = t.elem_count();
    if l.contiguous_offsets() != Some((0, n)) {
        return false;
    }
    match &*s {
        Storage::Cpu(c) => cpu_len(c) == n,
        _ => true,
    }
}

fn cpu_len(c: &CpuStorage) -> usize {
    match c {
        CpuStorage::U8(v) => v.len(),
        CpuStorage::U32(v) => v.len(),
        CpuStorage::I64(v) => v.len(),
        CpuStorage::BF16(v) => v.len(),
        CpuStorage::F16(v) => v.len(),
        CpuStorage::F32(v) => v.len(),
        CpuStorage::F64(v) => v.len(),
        _ => usize::MAX,
    }
}

struct Graft {
    name: &'static str,
    n: usize,
    /// The value until the forward hands it out.
    value: Mutex<Option<Tensor>>,
    bwd: Backward,
}

impl Graft {
    fn take(&self) -> Result<(Storage, Shape)> {
        let v = self.value.lock().map_err(|_| candle_core::Error::Msg("graft: poisoned".into()))?.take();
        let Some(v) = v else { candle_core::bail!("graft {}: the forward ran twice", self.name) };
        let (s, l) = v.storage_and_layout();
        Ok((s.try_clone(l)?, v.shape().clone()))
    }
}

impl CustomOp3 for Graft {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        match self.take()? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("graft {}: the value is not on the CPU", self.name),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        match self.take()? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("graft {}: the value is not on the GPU", self.name),
        }
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let inputs: Vec<Tensor> = [a, b, c][..self.n].iter().map(|t| (*t).clone()).collect();
        let mut g = (self.bwd)(&inputs, grad)?;
        if g.len() != self.n {
            candle_core::bail!("graft {}: backward gave {} gradients for {} inputs", self.name, g.len(), self.n);
        }
        // Gradients only where the input tracks them (the others would be dropped anyway).
        for (gi, t) in g.iter_mut().zip(&inputs) {
            if !t.track_op() {
                *gi = None;
            }
        }
        g.resize(3, None);
        let mut it = g.into_iter();
        Ok((it.next().flatten(), it.next().flatten(), it.next().flatten()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn a_grafted_value_carries_its_backward() {
        let dev = Device::Cpu;
        let x = Var::from_vec(vec![1f32, 2.0, 3.0], 3, &dev).unwrap();
        let w = Var::from_vec(vec![0.5f32, -1.0, 2.0], 3, &dev).unwrap();
        // y = x ∘ w, with its backward written out.
        let value = (x.as_tensor().detach() * w.as_tensor().detach()).unwrap();
        let bwd: Backward = Arc::new(|i: &[Tensor], g: &Tensor| Ok(vec![Some((g * &i[1])?), Some((g * &i[0])?)]));
        let y = graft(value, &[x.as_tensor().clone(), w.as_tensor().clone()], "mul", bwd).unwrap();
        assert_eq!(y.to_vec1::<f32>().unwrap(), vec![0.5, -2.0, 6.0]);
        let grads = (y.sqr().unwrap().sum_all().unwrap()).backward().unwrap();
        // ∂/∂x Σ (x w)² = 2 x w², ∂/∂w = 2 x² w.
        assert_eq!(grads.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap(), vec![0.5, 4.0, 24.0]);
        assert_eq!(grads.get(w.as_tensor()).unwrap().to_vec1::<f32>().unwrap(), vec![1.0, -8.0, 36.0]);
        // Untracked inputs: the value itself comes back.
        let plain = graft(
            Tensor::ones(2, candle_core::DType::F32, &dev).unwrap(),
            &[Tensor::ones(2, candle_core::DType::F32, &dev).unwrap()],
            "id",
            Arc::new(|_: &[Tensor], _: &Tensor| Ok(vec![None])),
        )
        .unwrap();
        assert!(!plain.track_op());
    }
}
