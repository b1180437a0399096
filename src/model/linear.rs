//! A linear layer with an optional LoRA adapter: `y = x·Wᵀ + b (+ (α/r)·x·downᵀ·upᵀ)`.

use candle_core::{DType, Result, Tensor, Var};

use super::lora::LoraAdapter;
use super::weights::Weights;

#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`.
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
    /// Compute without recording gradients: weight, bias and adapter are detached at each
    /// forward (a frozen view that still sees in-place updates of the variables it shares).
    pub frozen: bool,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Linear {
        Linear { weight, bias, lora: None, frozen: false }
    }

    /// `<name>.weight [out, in]` and `<name>.bias [out]` from a checkpoint.
    pub fn load(w: &Weights, name: &str, in_dim: usize, out_dim: usize) -> crate::Result<Linear> {
        Ok(Linear::new(w.get(&format!("{name}.weight"), &[out_dim, in_dim])?, Some(w.get(&format!("{name}.bias"), &[out_dim])?)))
    }

    pub fn in_dim(&self) -> usize {
        self.weight.dims().get(1).copied().unwrap_or(0)
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dims().first().copied().unwrap_or(0)
    }

    /// `x [..., in]` → `[..., out]` in the wider of the two dtypes.
    ///
    /// A weight that does not train (a base weight, or any weight of a frozen view) is multiplied
    /// as it is stored, through [`crate::ops::linear::frozen_matmul`]: no f32 copy of a 16-bit
    /// weight is made (on the CPU it is widened a block of rows at a time; on CUDA the product
    /// runs in bf16 with f32 accumulation), and the backward pass computes the input's gradient
    /// only. A trainable weight (a full-parameter fake, f32) goes through candle's matmul.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some((&last, lead)) = dims.split_last() else { candle_core::bail!("linear layer input is a scalar") };
        let rows: usize = lead.iter().product();
        let dt = wider(x.dtype(), self.weight.dtype());
        let x2 = x.to_dtype(dt)?.reshape((rows, last))?;
        // y = (W·xᵀ)ᵀ: W stays the contiguous left operand, so its gradient comes out of one
        // matmul as a contiguous [out, in] tensor (x·Wᵀ would produce it through a transpose).
        let fr = |t: &Tensor| if self.frozen { t.detach() } else { t.clone() };
        let trains = self.weight.is_variable() && !self.frozen;
        let mut y = if trains {
            self.weight.to_dtype(dt)?.matmul(&x2.t()?)?.t()?
        } else {
            crate::ops::linear::frozen_matmul(&self.weight.detach(), &x2.t()?)?.t()?
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&fr(b).to_dtype(dt)?)?;
        }
        if let Some(l) = &self.lora {
            let ld = l.down.dtype();
            let xl = x2.to_dtype(ld)?;
            let d = if self.frozen {
                // The same operations as `LoraAdapter::delta`, on detached factors.
                let h = xl.broadcast_matmul(&l.down.as_tensor().detach().t()?)?;
                (h.broadcast_matmul(&l.up.as_tensor().detach().t()?)? * l.scale())?
            } else {
                l.delta(&xl)?
            };
            y = (y + d.to_dtype(dt)?)?;
        }
        let mut out = lead.to_vec();
        out.push(self.out_dim());
        y.reshape(out)
    }

    /// Fold the adapter into the weight (`W += (α/r)·up·down`) and drop it.
    pub fn merge(&mut self) -> Result<()> {
        if let Some(l) = self.lora.take() {
            let d = l.dense()?.to_dtype(self.weight.dtype())?;
            self.weight = (self.weight.detach() + d)?;
        }
        Ok(())
    }

    /// Make weight and bias trainable variables; returns them.
    pub fn make_trainable(&mut self) -> Result<Vec<Var>> {
        let mut vars = Vec::new();
        let w = Var::from_tensor(&self.weight.detach())?;
        self.weight = w.as_tensor().clone();
        vars.push(w);
        if let Some(b) = &self.bias {
            let v = Var::from_tensor(&b.detach())?;
            self.bias = Some(v.as_tensor().clone());
            vars.push(v);
        }
        Ok(vars)
    }
}

fn rank(d: DType) -> u8 {
    match d {
        DType::F64 => 3,
        DType::F32 => 2,
        DType::BF16 | DType::F16 => 1,
        _ => 0,
    }
}

/// The wider float dtype of two.
fn wider(a: DType, b: DType) -> DType {
    if rank(a) >= rank(b) {
        a
    } else {
        b
    }
}

/// Which linear layers get adapters, and their shape.
#[derive(Debug, Clone)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Glob patterns (`*` matches any run of characters) over diffusers module names.
    pub targets: Vec<String>,
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig { rank: 16, alpha: 16.0, targets: default_targets(), seed: 0 }
    }
}

/// Every attention projection (self, cross and added/text ones) and every FFN linear of both
/// teachers, in diffusers names.
pub fn default_targets() -> Vec<String> {
    ["*.to_q", "*.to_k", "*.to_v", "*.to_out.0", "*.add_q_proj", "*.add_k_proj", "*.add_v_proj", "*.to_add_out", "*.net.0.proj", "*.net.2"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// Glob match with `*` wildcards over the whole name.
pub fn glob(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// Attach fresh adapters (zero `up`) to every named linear whose name matches a target;
/// returns how many were attached.
pub fn attach(linears: Vec<(String, &mut Linear)>, cfg: &LoraConfig) -> Result<usize> {
    let mut n = 0;
    for (i, (name, l)) in linears.into_iter().enumerate() {
        if cfg.targets.iter().any(|p| glob(p, &name)) {
            let dev = l.weight.device().clone();
            l.lora = Some(LoraAdapter::new(
                l.in_dim(),
                l.out_dim(),
                cfg.rank,
                cfg.alpha,
                cfg.seed.wrapping_add(i as u64),
                l.weight.dtype(),
                &dev,
            )?);
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn globs() {
        assert!(glob("*.to_q", "blocks.0.attn1.to_q"));
        assert!(!glob("*.to_q", "blocks.0.attn1.to_qq"));
        assert!(glob("blocks.*.attn2.*", "blocks.3.attn2.to_k"));
        assert!(glob("proj_out", "proj_out"));
        assert!(!glob("*.net.2", "blocks.0.ffn.net.0.proj"));
    }

    #[test]
    fn lora_zero_is_exact_and_merge_matches() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (6, 5), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 6, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5), &dev).unwrap();
        let mut l = Linear::new(w, Some(b));
        let base = l.forward(&x).unwrap();
        let mut name = vec![("blocks.0.attn1.to_q".to_string(), &mut l)];
        assert_eq!(attach(std::mem::take(&mut name), &LoraConfig { rank: 2, ..Default::default() }).unwrap(), 1);
        let with = l.forward(&x).unwrap();
        assert_eq!(base.flatten_all().unwrap().to_vec1::<f32>().unwrap(), with.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let lora = l.lora.as_ref().unwrap();
        lora.up.set(&Tensor::randn(0f32, 1.0, (6, 2), &dev).unwrap()).unwrap();
        let adapted = l.forward(&x).unwrap();
        l.merge().unwrap();
        let merged = l.forward(&x).unwrap();
        let diff = (&adapted - &merged).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        let norm = adapted.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        assert!(diff / norm < 1e-6, "{diff} / {norm}");
        assert_eq!(merged.dtype(), DType::F32);
    }
}
