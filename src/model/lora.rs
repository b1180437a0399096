//! LoRA adapters: `y = W x + (α / r) · up · (down · x)`.
//!
//! `down` is `[r, in]`, `up` is `[out, r]` (the kohya/Lightning `lora_down`/`lora_up` and the
//! PEFT `lora_A`/`lora_B` shapes). `up` starts at zero, so an adapted model equals its base
//! exactly until the first update.

use candle_core::{DType, Device, Result, Tensor, Var};

/// One adapter on one linear layer.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `[r, in]`.
    pub down: Var,
    /// `[out, r]`.
    pub up: Var,
    /// Scale numerator (`alpha / rank` multiplies the update).
    pub alpha: f64,
}

impl LoraAdapter {
    /// A fresh adapter: `down` ~ Kaiming-uniform-like U(−1/√in, 1/√in) from `seed`, `up` = 0.
    pub fn new(in_dim: usize, out_dim: usize, rank: usize, alpha: f64, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let mut rng = crate::rng::Rng::new(seed);
        let bound = 1.0 / (in_dim as f64).sqrt();
        let vals: Vec<f32> = (0..rank * in_dim).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect();
        let down = Tensor::from_vec(vals, (rank, in_dim), device)?.to_dtype(dtype)?;
        let up = Tensor::zeros((out_dim, rank), dtype, device)?;
        Ok(LoraAdapter { down: Var::from_tensor(&down)?, up: Var::from_tensor(&up)?, alpha })
    }

    /// An adapter from stored tensors (`down [r, in]`, `up [out, r]`).
    pub fn from_tensors(down: &Tensor, up: &Tensor, alpha: f64) -> Result<Self> {
        let (r, _) = down.dims2()?;
        let (_, r2) = up.dims2()?;
        if r != r2 {
            candle_core::bail!("LoRA rank mismatch: lora_down has rank {r}, lora_up has rank {r2}");
        }
        Ok(LoraAdapter { down: Var::from_tensor(down)?, up: Var::from_tensor(up)?, alpha })
    }

    pub fn rank(&self) -> usize {
        self.down.dim(0).unwrap_or(0)
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank().max(1) as f64
    }

    /// The adapter's contribution `(α/r) · x · downᵀ · upᵀ` for `x: [..., in]`.
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let h = x.broadcast_matmul(&self.down.as_tensor().t()?)?;
        let h = h.broadcast_matmul(&self.up.as_tensor().t()?)?;
        h * self.scale()
    }

    /// The dense update `(α/r) · up · down`, `[out, in]` (what merging adds to the weight).
    pub fn dense(&self) -> Result<Tensor> {
        self.up.as_tensor().matmul(self.down.as_tensor())? * self.scale()
    }

    /// The trainable parameters.
    pub fn vars(&self) -> Vec<Var> {
        vec![self.down.clone(), self.up.clone()]
    }
}
