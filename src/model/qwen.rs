//! `QwenImageTransformer`: diffusers `QwenImageTransformer2DModel`, the dual-stream MMDiT.
//!
//! `img_in` on packed 2×2 latents, text RMSNorm + `txt_in`, timestep (0..1, ×1000 inside the
//! sinusoidal embedding, cos first) → Linear-SiLU-Linear; blocks: `img_mod`/`txt_mod` (SiLU →
//! Linear to shift, scale, gate ×2), no-affine LayerNorm, joint attention over `[text, image]`
//! with per-head RMSNorm on q/k (and added q/k) and `QwenEmbedRope`, key mask on padded text,
//! GELU-tanh MLPs; AdaLayerNormContinuous out (scale first, then shift), `proj_out`.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};

use super::checkpoint::Staged;
use super::linear::Linear;
use super::ops::{apply_rope, gated_residual, gelu_tanh, layer_norm_modulate, rms_norm, sdpa, silu, timestep_embedding, widen};
use super::rope::{self, RopeTables};
use super::weights::Weights;
use super::{Param, Parameters};
use crate::error::{Error, Kind};
use crate::model::denoiser::{Cond, Denoiser};
use crate::ops::checkpoint::{run_block, Block, BlockFn, Context};

const EPS: f64 = 1e-6;

#[derive(Debug, Clone, PartialEq)]
pub struct QwenConfig {
    pub patch: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub num_layers: usize,
    pub head_dim: usize,
    pub heads: usize,
    pub joint_dim: usize,
    pub axes: [usize; 3],
}

impl QwenConfig {
    pub fn dim(&self) -> usize {
        self.heads * self.head_dim
    }

    pub fn from_weights(w: &Weights) -> crate::Result<QwenConfig> {
        for flag in ["zero_cond_t", "use_additional_t_cond", "use_layer3d_rope", "guidance_embeds"] {
            if w.cfg(flag).and_then(|v| v.as_bool()) == Some(true) {
                return Err(Error::at(Kind::Unsupported, w.path(), format!("Qwen-Image variant with `{flag}` is not supported")));
            }
        }
        let axes = match w.cfg("axes_dims_rope").and_then(|v| v.as_array()) {
            Some(a) if a.len() == 3 && a.iter().all(|x| x.as_u64().is_some()) => {
                [a[0].as_u64().unwrap_or(16) as usize, a[1].as_u64().unwrap_or(56) as usize, a[2].as_u64().unwrap_or(56) as usize]
            }
            _ => [16, 56, 56],
        };
        let c = QwenConfig {
            patch: w.cfg_usize("patch_size").unwrap_or(2),
            in_channels: w.cfg_usize("in_channels")?,
            out_channels: w.cfg_usize("out_channels")?,
            num_layers: w.cfg_usize("num_layers")?,
            head_dim: w.cfg_usize("attention_head_dim")?,
            heads: w.cfg_usize("num_attention_heads")?,
            joint_dim: w.cfg_usize("joint_attention_dim")?,
            axes,
        };
        if c.axes.iter().sum::<usize>() != c.head_dim || c.axes.iter().any(|a| a % 2 == 1) {
            return Err(Error::at(
                Kind::Inconsistent,
                w.path(),
                format!("axes_dims_rope {:?} do not split head_dim {}", c.axes, c.head_dim),
            ));
        }
        Ok(c)
    }
}

#[derive(Debug, Clone)]
pub struct QwenAttention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    pub add_q: Linear,
    pub add_k: Linear,
    pub add_v: Linear,
    pub to_add_out: Linear,
    pub norm_q: Tensor,
    pub norm_k: Tensor,
    pub norm_added_q: Tensor,
    pub norm_added_k: Tensor,
}

#[derive(Debug, Clone)]
pub struct QwenBlock {
    pub img_mod: Linear,
    pub txt_mod: Linear,
    pub attn: QwenAttention,
    pub img_mlp_in: Linear,
    pub img_mlp_out: Linear,
    pub txt_mlp_in: Linear,
    pub txt_mlp_out: Linear,
}

/// `x + y·gate` in the residual stream's precision (f32 for f32/bf16/f16 compute).
fn gated_add(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
    gated_residual(x, y, gate)
}

/// Per-call data: RoPE tables and the key mask `[B, L + S]` (1 keeps, 0 drops a padded prompt token).
#[derive(Debug, Clone)]
pub struct QwenAux {
    pub img_rope: RopeTables,
    pub txt_rope: RopeTables,
    pub mask: Option<Tensor>,
}

impl QwenBlock {
    fn load(w: &Weights, p: &str, c: &QwenConfig) -> crate::Result<Self> {
        let d = c.dim();
        let l = |n: &str, i: usize, o: usize| Linear::load(w, &format!("{p}.{n}"), i, o);
        let t = |n: &str| w.get(&format!("{p}.attn.{n}.weight"), &[c.head_dim]);
        Ok(QwenBlock {
            img_mod: l("img_mod.1", d, 6 * d)?,
            txt_mod: l("txt_mod.1", d, 6 * d)?,
            attn: QwenAttention {
                to_q: l("attn.to_q", d, d)?,
                to_k: l("attn.to_k", d, d)?,
                to_v: l("attn.to_v", d, d)?,
                to_out: l("attn.to_out.0", d, d)?,
                add_q: l("attn.add_q_proj", d, d)?,
                add_k: l("attn.add_k_proj", d, d)?,
                add_v: l("attn.add_v_proj", d, d)?,
                to_add_out: l("attn.to_add_out", d, d)?,
                norm_q: t("norm_q")?,
                norm_k: t("norm_k")?,
                norm_added_q: t("norm_added_q")?,
                norm_added_k: t("norm_added_k")?,
            },
            img_mlp_in: l("img_mlp.net.0.proj", d, 4 * d)?,
            img_mlp_out: l("img_mlp.net.2", 4 * d, d)?,
            txt_mlp_in: l("txt_mlp.net.0.proj", d, 4 * d)?,
            txt_mlp_out: l("txt_mlp.net.2", 4 * d, d)?,
        })
    }

    /// `img [B, S, dim]`, `txt [B, L, dim]`, `temb [B, dim]` → new `(img, txt)`.
    pub fn forward(&self, img: &Tensor, txt: &Tensor, temb: &Tensor, aux: &QwenAux, c: &QwenConfig) -> Result<(Tensor, Tensor)> {
        let (im, tm) = self.modulations(temb)?;
        let (img, txt) = self.attention_segment(img, txt, &im, &tm, aux, c)?;
        self.mlp_segment(&img, &txt, &im, &tm, c)
    }

    /// [`QwenBlock::forward`] with its two segments (joint attention, MLPs) checkpointed on
    /// their own ([`run_block`]): inside a block's recompute one segment's graph is alive at a
    /// time.
    pub fn forward_segmented(&self, img: &Tensor, txt: &Tensor, temb: &Tensor, aux: &QwenAux, c: &QwenConfig) -> Result<(Tensor, Tensor)> {
        // The modulations once per block (their gradient reaches `temb` once, as without segments).
        let (im, tm) = self.modulations(temb)?;
        let ctx = Context::new(vec![im, tm]);
        let mut s = vec![img.clone(), txt.clone()];
        for k in 0..2 {
            let (b, aux, c) = (self.clone(), aux.clone(), c.clone());
            let f: BlockFn = Arc::new(move |s: &[Tensor], cx: &[Tensor]| {
                let (i, t) = if k == 0 {
                    b.attention_segment(&s[0], &s[1], &cx[0], &cx[1], &aux, &c)?
                } else {
                    b.mlp_segment(&s[0], &s[1], &cx[0], &cx[1], &c)?
                };
                Ok(vec![i, t])
            });
            s = run_block(&Block { f, anchor: None }, &s, &ctx, true)?;
        }
        let t = s.pop().ok_or_else(|| candle_core::Error::Msg("segment without output".into()))?;
        let i = s.pop().ok_or_else(|| candle_core::Error::Msg("segment without output".into()))?;
        Ok((i, t))
    }

    /// The modulations of both streams, `[B, 1, 6·dim]` each.
    fn modulations(&self, temb: &Tensor) -> Result<(Tensor, Tensor)> {
        let st = silu(temb)?;
        Ok((self.img_mod.forward(&st)?.unsqueeze(1)?, self.txt_mod.forward(&st)?.unsqueeze(1)?))
    }

    /// Both streams through the joint attention and their gated residual adds.
    fn attention_segment(
        &self,
        img: &Tensor,
        txt: &Tensor,
        im: &Tensor,
        tm: &Tensor,
        aux: &QwenAux,
        c: &QwenConfig,
    ) -> Result<(Tensor, Tensor)> {
        let d = c.dim();
        let part = |m: &Tensor, i: usize| m.narrow(2, i * d, d);
        let img_n = layer_norm_modulate(img, &part(im, 0)?, &part(im, 1)?, EPS)?;
        let txt_n = layer_norm_modulate(txt, &part(tm, 0)?, &part(tm, 1)?, EPS)?;
        let (img_a, txt_a) = self.attention(&img_n, &txt_n, aux, c)?;
        Ok((gated_add(img, &img_a, &part(im, 2)?)?, gated_add(txt, &txt_a, &part(tm, 2)?)?))
    }

    /// Both streams through their MLPs and gated residual adds.
    fn mlp_segment(&self, img: &Tensor, txt: &Tensor, im: &Tensor, tm: &Tensor, c: &QwenConfig) -> Result<(Tensor, Tensor)> {
        let d = c.dim();
        let part = |m: &Tensor, i: usize| m.narrow(2, i * d, d);
        let img_n = layer_norm_modulate(img, &part(im, 3)?, &part(im, 4)?, EPS)?;
        let img_f = self.img_mlp_out.forward(&gelu_tanh(&self.img_mlp_in.forward(&img_n)?)?)?;
        let img = gated_add(img, &img_f, &part(im, 5)?)?;
        let txt_n = layer_norm_modulate(txt, &part(tm, 3)?, &part(tm, 4)?, EPS)?;
        let txt_f = self.txt_mlp_out.forward(&gelu_tanh(&self.txt_mlp_in.forward(&txt_n)?)?)?;
        let txt = gated_add(txt, &txt_f, &part(tm, 5)?)?;
        Ok((img, txt))
    }

    fn attention(&self, img: &Tensor, txt: &Tensor, aux: &QwenAux, c: &QwenConfig) -> Result<(Tensor, Tensor)> {
        let a = &self.attn;
        let (b, s, d) = img.dims3()?;
        let l = txt.dim(1)?;
        let (h, hd) = (c.heads, c.head_dim);
        let heads = |x: Tensor, n: usize| x.reshape((b, n, h, hd));
        let iq = apply_rope(&rms_norm(&heads(a.to_q.forward(img)?, s)?, Some(&a.norm_q), EPS)?, &aux.img_rope.cos, &aux.img_rope.sin)?;
        let ik = apply_rope(&rms_norm(&heads(a.to_k.forward(img)?, s)?, Some(&a.norm_k), EPS)?, &aux.img_rope.cos, &aux.img_rope.sin)?;
        let iv = heads(a.to_v.forward(img)?, s)?;
        let tq =
            apply_rope(&rms_norm(&heads(a.add_q.forward(txt)?, l)?, Some(&a.norm_added_q), EPS)?, &aux.txt_rope.cos, &aux.txt_rope.sin)?;
        let tk =
            apply_rope(&rms_norm(&heads(a.add_k.forward(txt)?, l)?, Some(&a.norm_added_k), EPS)?, &aux.txt_rope.cos, &aux.txt_rope.sin)?;
        let tv = heads(a.add_v.forward(txt)?, l)?;
        let q = Tensor::cat(&[tq, iq], 1)?;
        let k = Tensor::cat(&[tk, ik], 1)?;
        let v = Tensor::cat(&[tv, iv], 1)?;
        let o = sdpa(&q, &k, &v, aux.mask.as_ref())?.reshape((b, l + s, d))?;
        let txt_o = a.to_add_out.forward(&o.narrow(1, 0, l)?)?;
        let img_o = a.to_out.forward(&o.narrow(1, l, s)?)?;
        Ok((img_o, txt_o))
    }

    pub fn params(&mut self, p: &str) -> Vec<(String, Param<'_>)> {
        let a = &mut self.attn;
        vec![
            (format!("{p}.img_mod.1"), Param::Linear(&mut self.img_mod)),
            (format!("{p}.txt_mod.1"), Param::Linear(&mut self.txt_mod)),
            (format!("{p}.attn.to_q"), Param::Linear(&mut a.to_q)),
            (format!("{p}.attn.to_k"), Param::Linear(&mut a.to_k)),
            (format!("{p}.attn.to_v"), Param::Linear(&mut a.to_v)),
            (format!("{p}.attn.to_out.0"), Param::Linear(&mut a.to_out)),
            (format!("{p}.attn.add_q_proj"), Param::Linear(&mut a.add_q)),
            (format!("{p}.attn.add_k_proj"), Param::Linear(&mut a.add_k)),
            (format!("{p}.attn.add_v_proj"), Param::Linear(&mut a.add_v)),
            (format!("{p}.attn.to_add_out"), Param::Linear(&mut a.to_add_out)),
            (format!("{p}.attn.norm_q.weight"), Param::Tensor(&mut a.norm_q)),
            (format!("{p}.attn.norm_k.weight"), Param::Tensor(&mut a.norm_k)),
            (format!("{p}.attn.norm_added_q.weight"), Param::Tensor(&mut a.norm_added_q)),
            (format!("{p}.attn.norm_added_k.weight"), Param::Tensor(&mut a.norm_added_k)),
            (format!("{p}.img_mlp.net.0.proj"), Param::Linear(&mut self.img_mlp_in)),
            (format!("{p}.img_mlp.net.2"), Param::Linear(&mut self.img_mlp_out)),
            (format!("{p}.txt_mlp.net.0.proj"), Param::Linear(&mut self.txt_mlp_in)),
            (format!("{p}.txt_mlp.net.2"), Param::Linear(&mut self.txt_mlp_out)),
        ]
    }
}

pub struct QwenImageTransformer {
    pub cfg: QwenConfig,
    pub img_in: Linear,
    pub txt_norm: Tensor,
    pub txt_in: Linear,
    pub time_1: Linear,
    pub time_2: Linear,
    pub blocks: Vec<QwenBlock>,
    pub norm_out: Linear,
    pub proj_out: Linear,
    /// `(frames, H/2, W/2)` of the packed latents, for [`Denoiser::velocity`].
    pub img_shape: [usize; 3],
    /// Unconditional text embedding `[1, L, joint_dim]` (zeros of one token when unset).
    pub null_text: Option<Tensor>,
    /// Recompute each block in the backward pass instead of keeping its activations
    /// ([`crate::ops::checkpoint`]); on for training, no effect without gradients.
    pub checkpoint: bool,
    /// With `checkpoint`: checkpoint each block's segments too ([`QwenBlock::forward_segmented`]).
    pub checkpoint_segments: bool,
    /// The dtype of the residual stream and of the activations the blocks keep: f32 by default
    /// (f64 for an f64 model) whatever the weights' dtype; the weights' 16-bit dtype halves the
    /// activation memory of training (as PyTorch's bf16 models run: norms, softmax, RoPE and
    /// residual adds still compute in f32 and round once).
    pub activations: DType,
    pub dtype: DType,
    pub device: Device,
}

impl QwenImageTransformer {
    pub fn open(path: &Path, dtype: DType, device: &Device) -> crate::Result<Self> {
        let w = Weights::open(path, dtype, device)?;
        Self::load(&w)
    }

    pub fn load(w: &Weights) -> crate::Result<Self> {
        if w.family != "qwen_image" {
            return Err(Error::at(Kind::Unsupported, w.path(), format!("not a Qwen-Image checkpoint (family {})", w.family)));
        }
        let c = QwenConfig::from_weights(w)?;
        let d = c.dim();
        let blocks =
            (0..c.num_layers).map(|i| QwenBlock::load(w, &format!("transformer_blocks.{i}"), &c)).collect::<crate::Result<Vec<_>>>()?;
        Ok(QwenImageTransformer {
            img_in: Linear::load(w, "img_in", c.in_channels, d)?,
            txt_norm: w.get("txt_norm.weight", &[c.joint_dim])?,
            txt_in: Linear::load(w, "txt_in", c.joint_dim, d)?,
            time_1: Linear::load(w, "time_text_embed.timestep_embedder.linear_1", 256, d)?,
            time_2: Linear::load(w, "time_text_embed.timestep_embedder.linear_2", d, d)?,
            blocks,
            norm_out: Linear::load(w, "norm_out.linear", d, 2 * d)?,
            proj_out: Linear::load(w, "proj_out", d, c.patch * c.patch * c.out_channels)?,
            cfg: c,
            img_shape: [1, 1, 1],
            null_text: None,
            checkpoint: false,
            checkpoint_segments: false,
            activations: super::ops::wide(w.dtype),
            dtype: w.dtype,
            device: w.device.clone(),
        })
    }

    /// Stem: state `[img, txt]`, context `[temb]`.
    pub fn prepare(
        &self,
        x: &Tensor,
        enc: &Tensor,
        mask: Option<&Tensor>,
        timestep: &Tensor,
        img_shape: [usize; 3],
    ) -> Result<(Vec<Tensor>, Vec<Tensor>, QwenAux)> {
        let (b, s, _) = x.dims3()?;
        let l = enc.dim(1)?;
        let [f, h, w] = img_shape;
        if f * h * w != s {
            candle_core::bail!("img_shapes {img_shape:?} give {} tokens but hidden_states has {s}", f * h * w);
        }
        // The residual streams in their own dtype (`activations`), whatever the weights' dtype.
        let img = self.img_in.forward(x)?.to_dtype(self.activations)?;
        let txt = self.txt_in.forward(&rms_norm(&widen(enc)?, Some(&self.txt_norm), EPS)?)?.to_dtype(self.activations)?;
        let te = timestep_embedding(timestep, 256, true, 0.0, 1000.0)?.to_dtype(super::ops::wide(self.dtype))?;
        let temb = self.time_2.forward(&silu(&self.time_1.forward(&te)?)?)?;
        let (img_rope, txt_rope) = rope::qwen(self.cfg.axes, f, h, w, l, x.device())?;
        let mask = match mask {
            Some(m) => {
                // 1 where kept, 0 where padded; image keys are always kept.
                let txt_keep = m.to_dtype(DType::F32)?.reshape((b, l))?.ne(0f32)?.to_dtype(DType::F32)?;
                let img_keep = Tensor::ones((b, s), DType::F32, x.device())?;
                Some(Tensor::cat(&[txt_keep, img_keep], 1)?)
            }
            None => None,
        };
        Ok((vec![img, txt], vec![temb], QwenAux { img_rope, txt_rope, mask }))
    }

    /// Full forward: packed latents `x [B, S, in]`, `enc [B, L, joint_dim]`, mask `[B, L]`,
    /// `timestep [B]` on 0..1 → `[B, S, patch²·out_channels]`.
    pub fn forward(&self, x: &Tensor, enc: &Tensor, mask: Option<&Tensor>, timestep: &Tensor, img_shape: [usize; 3]) -> Result<Tensor> {
        let (mut state, ctx, aux) = self.prepare(x, enc, mask, timestep, img_shape)?;
        if self.checkpoint {
            let context = Context::new(ctx);
            for i in 0..self.blocks.len() {
                state = run_block(&self.block_fn(i, &aux), &state, &context, true)?;
            }
            return self.finish(&state, &context.tensors, &aux);
        }
        for i in 0..self.blocks.len() {
            state = self.block(i, &state, &ctx, &aux)?;
        }
        self.finish(&state, &ctx, &aux)
    }

    /// Block `i` as a self-contained function of `(state, ctx)` (for checkpointing).
    fn block_fn(&self, i: usize, aux: &QwenAux) -> Block {
        let (b, cfg, aux) = (self.blocks[i].clone(), self.cfg.clone(), aux.clone());
        let anchor = super::trainable_anchor(self.blocks[i].clone().params(""));
        let segments = self.checkpoint_segments;
        let f: BlockFn = Arc::new(move |s: &[Tensor], c: &[Tensor]| {
            let (img, txt) =
                if segments { b.forward_segmented(&s[0], &s[1], &c[0], &aux, &cfg)? } else { b.forward(&s[0], &s[1], &c[0], &aux, &cfg)? };
            Ok(vec![img, txt])
        });
        Block { f, anchor }
    }
}

impl Staged for QwenImageTransformer {
    type Aux = QwenAux;
    fn num_blocks(&self) -> usize {
        self.blocks.len()
    }
    fn block(&self, i: usize, state: &[Tensor], ctx: &[Tensor], aux: &QwenAux) -> Result<Vec<Tensor>> {
        let (img, txt) = self.blocks[i].forward(&state[0], &state[1], &ctx[0], aux, &self.cfg)?;
        Ok(vec![img, txt])
    }
    fn finish(&self, state: &[Tensor], ctx: &[Tensor], _aux: &QwenAux) -> Result<Tensor> {
        let d = self.cfg.dim();
        let emb = self.norm_out.forward(&silu(&ctx[0])?)?.unsqueeze(1)?;
        let (scale, shift) = (emb.narrow(2, 0, d)?, emb.narrow(2, d, d)?);
        let h = layer_norm_modulate(&state[0], &shift, &scale, EPS)?;
        self.proj_out.forward(&h)
    }
}

impl Parameters for QwenImageTransformer {
    fn params(&mut self) -> Vec<(String, Param<'_>)> {
        let mut v = vec![
            ("img_in".to_string(), Param::Linear(&mut self.img_in)),
            ("txt_norm.weight".to_string(), Param::Tensor(&mut self.txt_norm)),
            ("txt_in".to_string(), Param::Linear(&mut self.txt_in)),
            ("time_text_embed.timestep_embedder.linear_1".to_string(), Param::Linear(&mut self.time_1)),
            ("time_text_embed.timestep_embedder.linear_2".to_string(), Param::Linear(&mut self.time_2)),
        ];
        for (i, b) in self.blocks.iter_mut().enumerate() {
            v.extend(b.params(&format!("transformer_blocks.{i}")));
        }
        v.push(("norm_out.linear".to_string(), Param::Linear(&mut self.norm_out)));
        v.push(("proj_out".to_string(), Param::Linear(&mut self.proj_out)));
        v
    }
}

impl Denoiser for QwenImageTransformer {
    /// `x [B, S, in]` packed latents of shape `img_shape`; σ ∈ [0, 1] is the timestep itself.
    fn velocity(&self, x: &Tensor, sigma: &Tensor, cond: &Cond) -> Result<Tensor> {
        let Some((e, mask)) = cond.text_and_mask() else {
            candle_core::bail!("the Qwen-Image transformer takes text-embedding conditions")
        };
        self.forward(x, e, mask, &sigma.to_dtype(DType::F32)?, self.img_shape)?.to_dtype(x.dtype())
    }
    fn null_cond(&self, n: usize) -> Result<Cond> {
        let e = match &self.null_text {
            Some(t) => t.repeat((n, 1, 1))?,
            None => Tensor::zeros((n, 1, self.cfg.joint_dim), DType::F32, &self.device)?,
        };
        Ok(Cond::Embedding(e))
    }
}
