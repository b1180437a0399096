//! What a denoiser is: a flow-matching velocity predictor `v(x, σ, condition)` ([`Denoiser`]),
//! its conditions ([`Cond`]) and classifier-free guidance ([`guided`]).
//!
//! The Wan2.2 and Qwen-Image transformers implement the trait here; the trainer's toy denoisers
//! (the exact mixture, a small MLP) implement it in `train::toy`. The Phased DMD code
//! (`train::dmd`) talks to this interface only and never sees which model it drives.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// A batch of conditions.
#[derive(Debug, Clone)]
pub enum Cond {
    /// Class ids `[B]` (u32); the null class is `classes`.
    Class(Tensor),
    /// Precomputed text embeddings `[B, L, C]` (transformer denoisers).
    Embedding(Tensor),
    /// Text embeddings `[B, L, C]` and an image condition (Wan2.2 image-to-video), taken as `mode` says.
    Image { text: Tensor, image: Tensor, mode: ImageMode },
    /// Text embeddings `[B, L, C]` padded to one length, with their key mask `[B, L]` (f32, 1 for a
    /// token, 0 for padding) as Qwen-Image's pipeline passes `encoder_hidden_states_mask`.
    Masked { text: Tensor, mask: Tensor },
}

/// How a Wan2.2 model takes its first-frame image (as diffusers' `WanImageToVideoPipeline` does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageMode {
    /// I2V-A14B: `image [B, C', F, H, W]` (a 4-channel first-frame mask and the VAE latents of the
    /// image followed by zero frames) is concatenated after the latent channels on every call.
    Channels,
    /// TI2V-5B (`expand_timesteps`): `image [B, C, 1, H, W]` (the VAE latent of the image) replaces
    /// the first latent frame on every call, whose tokens get timestep 0; the model's velocity
    /// there is 0, and the sampler writes the image over that frame at the end.
    FirstFrame,
}

impl Cond {
    /// The rows `idx` (u32 `[k]`) of the batch.
    pub fn select(&self, idx: &Tensor) -> candle_core::Result<Cond> {
        Ok(match self {
            Cond::Class(c) => Cond::Class(c.index_select(idx, 0)?),
            Cond::Embedding(e) => Cond::Embedding(e.index_select(idx, 0)?),
            Cond::Image { text, image, mode } => {
                Cond::Image { text: text.index_select(idx, 0)?, image: image.index_select(idx, 0)?, mode: *mode }
            }
            Cond::Masked { text, mask } => Cond::Masked { text: text.index_select(idx, 0)?, mask: mask.index_select(idx, 0)? },
        })
    }

    /// Text embeddings and their key mask, for a text-only condition (`Embedding` or `Masked`).
    pub fn text_and_mask(&self) -> Option<(&Tensor, Option<&Tensor>)> {
        match self {
            Cond::Embedding(e) => Some((e, None)),
            Cond::Masked { text, mask } => Some((text, Some(mask))),
            _ => None,
        }
    }

    /// The negative of this condition for guidance: `null`'s text (or class) with this
    /// condition's image, which the unconditional call sees too.
    pub fn negative(&self, null: Cond) -> Cond {
        match (self, null) {
            (Cond::Image { image, mode, .. }, Cond::Embedding(text)) => Cond::Image { text, image: image.clone(), mode: *mode },
            (_, null) => null,
        }
    }

    /// For a first-frame image: `[1, 1, F, 1, 1]` ones with the first frame 0 (in `x`'s dtype),
    /// the part of a latent `x [B, C, F, H, W]` that is generated; `None` when all of it is.
    pub fn free_mask(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let Cond::Image { mode: ImageMode::FirstFrame, .. } = self else { return Ok(None) };
        let f = x.dim(2)?;
        let mut m = vec![1f32; f];
        m[0] = 0.0;
        Ok(Some(Tensor::from_vec(m, (1, 1, f, 1, 1), x.device())?.to_dtype(x.dtype())?))
    }

    /// `x` with a first-frame image written over its first latent frame (as the pipeline does
    /// before every call and after the last step); `x` itself otherwise.
    pub fn fill_fixed(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let Cond::Image { image, mode: ImageMode::FirstFrame, .. } = self else { return Ok(x.clone()) };
        let f = x.dim(2)?;
        let first = image.to_dtype(x.dtype())?.to_device(x.device())?;
        if f == 1 {
            return Ok(first);
        }
        Tensor::cat(&[&first, &x.narrow(2, 1, f - 1)?], 2)
    }
}

/// A flow-matching velocity predictor.
pub trait Denoiser {
    /// `v(x, σ, c)` for `x: [B, …]`, `sigma: [B]` (f32, σ ∈ [0, 1], timestep = 1000σ).
    fn velocity(&self, x: &Tensor, sigma: &Tensor, cond: &Cond) -> candle_core::Result<Tensor>;
    /// The unconditional ("negative") condition for a batch of `n`.
    fn null_cond(&self, n: usize) -> candle_core::Result<Cond>;
}

/// Classifier-free guidance `v_null + g·(v_c − v_null)` (just `v_c` when `g = 1`).
pub fn guided(d: &dyn Denoiser, x: &Tensor, sigma: &Tensor, cond: &Cond, g: f64) -> candle_core::Result<Tensor> {
    let vc = d.velocity(x, sigma, cond)?;
    if g == 1.0 {
        return Ok(vc);
    }
    let vn = d.velocity(x, sigma, &cond.negative(d.null_cond(x.dim(0)?)?))?;
    &vn + ((vc - &vn)? * g)?
}
