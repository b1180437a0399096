//! `WanTransformer`: diffusers `WanTransformer3DModel` (Wan2.2 T2V/I2V-A14B experts, TI2V-5B).
//!
//! Patchify (Conv3d with kernel = stride, done as one matmul over `C·pt·ph·pw` patch vectors) →
//! condition embedding (sinusoidal `freq_dim` with cos first → Linear-SiLU-Linear → SiLU →
//! Linear to 6·dim; text Linear-GELU(tanh)-Linear) → blocks (modulated self-attention with
//! RMSNorm over the whole inner dim on q/k and 3-D RoPE, affine-normed cross-attention,
//! modulated GELU-tanh FFN) → modulated output norm, projection, unpatchify.
//!
//! The timestep is `[B]` (one per sample) or, as Wan2.2 TI2V-5B's pipelines pass it with
//! `expand_timesteps`, `[B, S]`: one per patch token (the image-conditioned first latent frame
//! gets 0). diffusers then embeds every token's timestep and modulates every token with its own
//! `scale_shift_table + temb`. Here the condition embedder runs once per distinct timestep value
//! (a TI2V step has two: 0 and t) and each token picks its row of that table ([`WanAux::token_rows`]);
//! the values are the same, without a `[B, S, 6, dim]` tensor or `B·S` rows through `time_proj`.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};

use super::checkpoint::Staged;
use super::linear::Linear;
use super::ops::{gated_residual, gelu_tanh, layer_norm, layer_norm_modulate, rms_norm, sdpa, silu, timestep_embedding, wide, widen};
use super::rope::{self, RopeTables};
use super::weights::Weights;
use super::{Param, Parameters};
use crate::error::{Error, Kind};
use crate::model::denoiser::{Cond, Denoiser, ImageMode};
use crate::ops::checkpoint::{run_block, Block, BlockFn, Context};

#[derive(Debug, Clone, PartialEq)]
pub struct WanConfig {
    pub patch: [usize; 3],
    pub heads: usize,
    pub head_dim: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub text_dim: usize,
    pub freq_dim: usize,
    pub ffn_dim: usize,
    pub num_layers: usize,
    pub cross_attn_norm: bool,
    pub eps: f64,
}

impl WanConfig {
    pub fn dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// From a diffusers-dialect config.
    pub fn from_weights(w: &Weights) -> crate::Result<WanConfig> {
        if w.cfg("added_kv_proj_dim").is_some() || w.cfg("image_dim").is_some() {
            return Err(Error::at(
                Kind::Unsupported,
                w.path(),
                "Wan2.1 I2V/FLF2V image conditioning (CLIP image embedding `image_dim`, image key/value projections `added_kv_proj_dim`) is not supported; Wan2.1 T2V and every Wan2.2 model are",
            ));
        }
        let patch = match w.cfg("patch_size").and_then(|v| v.as_array()) {
            Some(a) if a.len() == 3 && a.iter().all(|x| x.as_u64().is_some()) => {
                [a[0].as_u64().unwrap_or(1) as usize, a[1].as_u64().unwrap_or(2) as usize, a[2].as_u64().unwrap_or(2) as usize]
            }
            _ => [1, 2, 2],
        };
        let in_channels = w.cfg_usize("in_channels")?;
        Ok(WanConfig {
            patch,
            heads: w.cfg_usize("num_attention_heads")?,
            head_dim: w.cfg_usize("attention_head_dim")?,
            in_channels,
            out_channels: w.cfg_usize("out_channels").unwrap_or(in_channels),
            text_dim: w.cfg_usize("text_dim")?,
            freq_dim: w.cfg_usize("freq_dim")?,
            ffn_dim: w.cfg_usize("ffn_dim")?,
            num_layers: w.cfg_usize("num_layers")?,
            cross_attn_norm: w.cfg("cross_attn_norm").and_then(|v| v.as_bool()).unwrap_or(true),
            eps: w.cfg("eps").and_then(|v| v.as_f64()).unwrap_or(1e-6),
        })
    }
}

#[derive(Debug, Clone)]
pub struct WanAttention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    pub norm_q: Tensor,
    pub norm_k: Tensor,
}

impl WanAttention {
    fn load(w: &Weights, p: &str, dim: usize) -> crate::Result<Self> {
        Ok(WanAttention {
            to_q: Linear::load(w, &format!("{p}.to_q"), dim, dim)?,
            to_k: Linear::load(w, &format!("{p}.to_k"), dim, dim)?,
            to_v: Linear::load(w, &format!("{p}.to_v"), dim, dim)?,
            to_out: Linear::load(w, &format!("{p}.to_out.0"), dim, dim)?,
            norm_q: w.get(&format!("{p}.norm_q.weight"), &[dim])?,
            norm_k: w.get(&format!("{p}.norm_k.weight"), &[dim])?,
        })
    }

    /// `x [B, S, dim]` attends to `ctx [B, L, dim]` (itself when `None`).
    fn forward(&self, x: &Tensor, ctx: Option<&Tensor>, heads: usize, eps: f64, rope: Option<&RopeTables>) -> Result<Tensor> {
        // The text context is f32 (it is shared by all blocks); keys and values take the
        // activations' dtype.
        let kv = match ctx {
            Some(c) => &c.to_dtype(x.dtype())?,
            None => x,
        };
        let (b, s, dim) = x.dims3()?;
        let l = kv.dim(1)?;
        let hd = dim / heads;
        let q = rms_norm(&self.to_q.forward(x)?, Some(&self.norm_q), eps)?.reshape((b, s, heads, hd))?;
        let k = rms_norm(&self.to_k.forward(kv)?, Some(&self.norm_k), eps)?.reshape((b, l, heads, hd))?;
        let v = self.to_v.forward(kv)?.reshape((b, l, heads, hd))?;
        let (q, k) = match rope {
            Some(r) => (super::ops::apply_rope(&q, &r.cos, &r.sin)?, super::ops::apply_rope(&k, &r.cos, &r.sin)?),
            None => (q, k),
        };
        let o = sdpa(&q, &k, &v, None)?;
        self.to_out.forward(&o.reshape((b, s, dim))?)
    }

    pub fn params(&mut self, p: &str) -> Vec<(String, Param<'_>)> {
        vec![
            (format!("{p}.to_q"), Param::Linear(&mut self.to_q)),
            (format!("{p}.to_k"), Param::Linear(&mut self.to_k)),
            (format!("{p}.to_v"), Param::Linear(&mut self.to_v)),
            (format!("{p}.to_out.0"), Param::Linear(&mut self.to_out)),
            (format!("{p}.norm_q.weight"), Param::Tensor(&mut self.norm_q)),
            (format!("{p}.norm_k.weight"), Param::Tensor(&mut self.norm_k)),
        ]
    }
}

#[derive(Debug, Clone)]
pub struct WanBlock {
    pub attn1: WanAttention,
    pub attn2: WanAttention,
    /// Affine cross-attention norm (`norm2`), when `cross_attn_norm`.
    pub norm2: Option<(Tensor, Tensor)>,
    pub ffn_in: Linear,
    pub ffn_out: Linear,
    /// `[1, 6, dim]`, f32.
    pub scale_shift_table: Tensor,
}

impl WanBlock {
    fn load(w: &Weights, p: &str, c: &WanConfig) -> crate::Result<Self> {
        let dim = c.dim();
        Ok(WanBlock {
            attn1: WanAttention::load(w, &format!("{p}.attn1"), dim)?,
            attn2: WanAttention::load(w, &format!("{p}.attn2"), dim)?,
            norm2: if c.cross_attn_norm {
                Some((w.get_f32(&format!("{p}.norm2.weight"), &[dim])?, w.get_f32(&format!("{p}.norm2.bias"), &[dim])?))
            } else {
                None
            },
            ffn_in: Linear::load(w, &format!("{p}.ffn.net.0.proj"), dim, c.ffn_dim)?,
            ffn_out: Linear::load(w, &format!("{p}.ffn.net.2"), c.ffn_dim, dim)?,
            scale_shift_table: w.get_f32(&format!("{p}.scale_shift_table"), &[1, 6, dim])?,
        })
    }

    /// `x [B, S, dim]`, `enc [B, L, dim]`, `tproj [B, 6, dim]`.
    pub fn forward(&self, x: &Tensor, enc: &Tensor, tproj: &Tensor, rope: &RopeTables, c: &WanConfig) -> Result<Tensor> {
        self.forward_rows(x, enc, tproj, None, rope, c)
    }

    /// [`WanBlock::forward`] with per-token modulation when `rows` is given: `tproj [K, 6, dim]`
    /// holds the projections of K distinct timesteps and `rows [B·S]` (u32) says which of them
    /// each token takes, so token `n` is modulated with `scale_shift_table + tproj[rows[n]]`.
    pub fn forward_rows(
        &self,
        x: &Tensor,
        enc: &Tensor,
        tproj: &Tensor,
        rows: Option<&Tensor>,
        rope: &RopeTables,
        c: &WanConfig,
    ) -> Result<Tensor> {
        let x = self.self_attention_segment(x, tproj, rows, rope, c)?;
        let x = self.cross_attention_segment(&x, enc, c)?;
        self.ffn_segment(&x, tproj, rows, c)
    }

    /// [`WanBlock::forward_rows`] with each of its three segments (self-attention,
    /// cross-attention, FFN) checkpointed on its own ([`run_block`]): inside a block's
    /// recompute, one segment's graph is alive at a time instead of the block's (one more
    /// forward of each segment).
    pub fn forward_segmented(
        &self,
        x: &Tensor,
        enc: &Tensor,
        tproj: &Tensor,
        rows: Option<&Tensor>,
        rope: &RopeTables,
        c: &WanConfig,
    ) -> Result<Tensor> {
        let ctx = Context::new(vec![enc.clone(), tproj.clone()]);
        let mut s = vec![x.clone()];
        for k in 0..3 {
            let (b, rows, rope, c) = (self.clone(), rows.cloned(), rope.clone(), c.clone());
            let f: BlockFn = Arc::new(move |s: &[Tensor], cx: &[Tensor]| {
                Ok(vec![match k {
                    0 => b.self_attention_segment(&s[0], &cx[1], rows.as_ref(), &rope, &c)?,
                    1 => b.cross_attention_segment(&s[0], &cx[0], &c)?,
                    _ => b.ffn_segment(&s[0], &cx[1], rows.as_ref(), &c)?,
                }])
            });
            s = run_block(&Block { f, anchor: None }, &s, &ctx, true)?;
        }
        Ok(s.remove(0))
    }

    /// The modulation table `scale_shift_table + tproj` (`[K, 6, dim]`, f32), made once per
    /// segment. Each segment takes its own rows of it; their gradients have disjoint supports,
    /// so summing them over the segments is exact in any order.
    fn modulation(&self, tproj: &Tensor) -> Result<Tensor> {
        self.scale_shift_table.broadcast_add(&tproj.to_dtype(self.scale_shift_table.dtype())?)
    }

    /// Row `i` of 6 of the table `m`, per token when `rows` is given.
    fn pick(m: &Tensor, rows: Option<&Tensor>, x: &Tensor, i: usize) -> Result<Tensor> {
        let v = m.narrow(1, i, 1)?;
        match rows {
            None => Ok(v),
            Some(r) => per_token(&v, r, x),
        }
    }

    /// `x + attn1(norm1(x)·(1 + scale) + shift)·gate`.
    fn self_attention_segment(
        &self,
        x: &Tensor,
        tproj: &Tensor,
        rows: Option<&Tensor>,
        rope: &RopeTables,
        c: &WanConfig,
    ) -> Result<Tensor> {
        let m = self.modulation(tproj)?;
        let g = |i: usize| Self::pick(&m, rows, x, i);
        let h = layer_norm_modulate(x, &g(0)?, &g(1)?, c.eps)?;
        let a = self.attn1.forward(&h, None, c.heads, c.eps, Some(rope))?;
        gated_residual(x, &a, &g(2)?)
    }

    /// `x + attn2(norm2(x), enc)`.
    fn cross_attention_segment(&self, x: &Tensor, enc: &Tensor, c: &WanConfig) -> Result<Tensor> {
        let h = match &self.norm2 {
            Some((w, b)) => layer_norm(x, Some(w), Some(b), c.eps)?,
            None => x.clone(),
        };
        x + self.attn2.forward(&h, Some(enc), c.heads, c.eps, None)?.to_dtype(x.dtype())?
    }

    /// `x + ffn(norm3(x)·(1 + c_scale) + c_shift)·c_gate`.
    fn ffn_segment(&self, x: &Tensor, tproj: &Tensor, rows: Option<&Tensor>, c: &WanConfig) -> Result<Tensor> {
        let m = self.modulation(tproj)?;
        let g = |i: usize| Self::pick(&m, rows, x, i);
        let h = layer_norm_modulate(x, &g(3)?, &g(4)?, c.eps)?;
        let f = self.ffn_out.forward(&gelu_tanh(&self.ffn_in.forward(&h)?)?)?;
        gated_residual(x, &f, &g(5)?)
    }

    pub fn params(&mut self, p: &str) -> Vec<(String, Param<'_>)> {
        let mut v = self.attn1.params(&format!("{p}.attn1"));
        v.extend(self.attn2.params(&format!("{p}.attn2")));
        if let Some((w, b)) = &mut self.norm2 {
            v.push((format!("{p}.norm2.weight"), Param::Tensor(w)));
            v.push((format!("{p}.norm2.bias"), Param::Tensor(b)));
        }
        v.push((format!("{p}.ffn.net.0.proj"), Param::Linear(&mut self.ffn_in)));
        v.push((format!("{p}.ffn.net.2"), Param::Linear(&mut self.ffn_out)));
        v.push((format!("{p}.scale_shift_table"), Param::Tensor(&mut self.scale_shift_table)));
        v
    }
}

/// `table [K, 1, dim]` → `[B, S, dim]` (the shape of `like`), row `rows[b·S + s]` for token `(b, s)`.
fn per_token(table: &Tensor, rows: &Tensor, like: &Tensor) -> Result<Tensor> {
    let (b, s, _) = like.dims3()?;
    let t = table.squeeze(1)?.contiguous()?;
    let dim = t.dim(1)?;
    t.index_select(rows, 0)?.reshape((b, s, dim))
}

/// Non-differentiable per-call data: RoPE tables and the token grid.
#[derive(Debug, Clone)]
pub struct WanAux {
    pub rope: RopeTables,
    pub batch: usize,
    /// Post-patch frames, height, width.
    pub grid: [usize; 3],
    /// Per-token timesteps (`[B, S]`): for each of the `B·S` tokens (u32, batch-major), the row
    /// of the context's `tproj` / `temb` (one row per distinct timestep value) that modulates it.
    /// `None` for `[B]` timesteps, where row `b` modulates sample `b`.
    pub token_rows: Option<Tensor>,
}

pub struct WanTransformer {
    pub cfg: WanConfig,
    /// Patch embedding as a matrix `[dim, C·pt·ph·pw]` (Conv3d weight flattened).
    pub patch_embedding: Linear,
    pub time_1: Linear,
    pub time_2: Linear,
    pub time_proj: Linear,
    pub text_1: Linear,
    pub text_2: Linear,
    pub blocks: Vec<WanBlock>,
    /// `[1, 2, dim]`, f32.
    pub scale_shift_table: Tensor,
    pub proj_out: Linear,
    /// The unconditional text embedding for [`Denoiser::null_cond`] (`[1, L, text_dim]`); zeros
    /// of one token when unset.
    pub null_text: Option<Tensor>,
    /// Recompute each block in the backward pass instead of keeping its activations
    /// ([`crate::ops::checkpoint`]); on for training, no effect without gradients.
    pub checkpoint: bool,
    /// With `checkpoint`: checkpoint each block's segments too ([`WanBlock::forward_segmented`]).
    pub checkpoint_segments: bool,
    /// The dtype of the residual stream and of the activations the blocks keep: f32 by default
    /// (f64 for an f64 model) whatever the weights' dtype; the weights' 16-bit dtype halves the
    /// activation memory of training (as PyTorch's bf16 models run: norms, softmax, RoPE and
    /// residual adds still compute in f32 and round once).
    pub activations: DType,
    pub dtype: DType,
    pub device: Device,
}

impl WanTransformer {
    /// Load from any checkpoint phasekit reads (`dtype`: f32, bf16 or f16).
    pub fn open(path: &Path, dtype: DType, device: &Device) -> crate::Result<Self> {
        let w = Weights::open(path, dtype, device)?;
        Self::load(&w)
    }

    pub fn load(w: &Weights) -> crate::Result<Self> {
        if w.family != "wan22" {
            return Err(Error::at(Kind::Unsupported, w.path(), format!("not a Wan2.2 checkpoint (family {})", w.family)));
        }
        let c = WanConfig::from_weights(w)?;
        let dim = c.dim();
        let [pt, ph, pw] = c.patch;
        let pe = w.get("patch_embedding.weight", &[dim, c.in_channels, pt, ph, pw])?;
        let pe = pe.reshape((dim, c.in_channels * pt * ph * pw)).map_err(Error::from)?;
        let get_f32_linear = |name: &str, i: usize, o: usize| -> crate::Result<Linear> {
            Ok(Linear::new(w.get_f32(&format!("{name}.weight"), &[o, i])?, Some(w.get_f32(&format!("{name}.bias"), &[o])?)))
        };
        let blocks = (0..c.num_layers).map(|i| WanBlock::load(w, &format!("blocks.{i}"), &c)).collect::<crate::Result<Vec<_>>>()?;
        Ok(WanTransformer {
            patch_embedding: Linear::new(pe, Some(w.get("patch_embedding.bias", &[dim])?)),
            time_1: get_f32_linear("condition_embedder.time_embedder.linear_1", c.freq_dim, dim)?,
            time_2: get_f32_linear("condition_embedder.time_embedder.linear_2", dim, dim)?,
            time_proj: Linear::load(w, "condition_embedder.time_proj", dim, 6 * dim)?,
            text_1: Linear::load(w, "condition_embedder.text_embedder.linear_1", c.text_dim, dim)?,
            text_2: Linear::load(w, "condition_embedder.text_embedder.linear_2", dim, dim)?,
            blocks,
            scale_shift_table: w.get_f32("scale_shift_table", &[1, 2, dim])?,
            proj_out: Linear::load(w, "proj_out", dim, c.out_channels * pt * ph * pw)?,
            cfg: c,
            null_text: None,
            checkpoint: false,
            checkpoint_segments: false,
            activations: super::ops::wide(w.dtype),
            dtype: w.dtype,
            device: w.device.clone(),
        })
    }

    /// Patchify, embed condition and text: block state `[x]`, context `[enc, tproj, temb]`.
    ///
    /// `timestep` is `[B]`, or `[B, S]` with one timestep per patch token (`S = F/pt · H/ph ·
    /// W/pw`, tokens in frame, row, column order, as diffusers flattens them); any other shape is
    /// an error. With `[B]`, `tproj` is `[B, 6, dim]` and `temb` `[B, dim]`. With `[B, S]` they
    /// hold one row per distinct timestep value (`[K, 6, dim]`, `[K, dim]`, in order of first
    /// appearance) and `aux.token_rows` maps each token to its row.
    pub fn prepare(&self, x: &Tensor, timestep: &Tensor, enc: &Tensor) -> Result<(Vec<Tensor>, Vec<Tensor>, WanAux)> {
        let c = &self.cfg;
        let (b, ch, f, h, w) = x.dims5()?;
        let [pt, ph, pw] = c.patch;
        if ch != c.in_channels || f % pt != 0 || h % ph != 0 || w % pw != 0 {
            candle_core::bail!(
                "Wan input [B, C, F, H, W] = {:?} does not fit {} channels and patch {:?}",
                x.dims(),
                c.in_channels,
                c.patch
            );
        }
        let (fp, hp, wp) = (f / pt, h / ph, w / pw);
        let seq = fp * hp * wp;
        let token_t = match timestep.dims() {
            [n] if *n == b => false,
            [n, s] if *n == b && *s == seq => true,
            d => candle_core::bail!(
                "Wan timestep should be [B] = [{b}] or per-token [B, S] = [{b}, {seq}] (S = {fp}·{hp}·{wp} patch tokens of the \
                 {:?} input), found {d:?}",
                x.dims()
            ),
        };
        let patches = x
            .to_dtype(wide(self.dtype))?
            .reshape(vec![b, ch, fp, pt, hp, ph, wp, pw])?
            .permute(vec![0, 2, 4, 6, 1, 3, 5, 7])?
            .contiguous()?
            .reshape((b, seq, ch * pt * ph * pw))?;
        // The residual stream in its own dtype (`activations`), whatever the weights' dtype.
        let hs = self.patch_embedding.forward(&patches)?.to_dtype(self.activations)?;
        let (t, token_rows) = if token_t { distinct_timesteps(timestep)? } else { (timestep.clone(), None) };
        let k = t.elem_count();
        let temb_in = timestep_embedding(&t, c.freq_dim, true, 0.0, 1.0)?.to_dtype(wide(self.dtype))?;
        let temb = self.time_2.forward(&silu(&self.time_1.forward(&temb_in)?)?)?;
        let tproj = self.time_proj.forward(&silu(&temb)?)?.reshape((k, 6, c.dim()))?;
        let e = self.text_2.forward(&gelu_tanh(&self.text_1.forward(&widen(enc)?)?)?)?;
        let rope = rope::wan(c.head_dim, fp, hp, wp, x.device())?;
        Ok((vec![hs], vec![e, tproj, temb], WanAux { rope, batch: b, grid: [fp, hp, wp], token_rows }))
    }

    /// Full forward: `x [B, C, F, H, W]`, `timestep [B]` or per-token `[B, S]` on 0..1000 (see
    /// [`WanTransformer::prepare`]), `enc [B, L, text_dim]` → `[B, out_channels, F, H, W]`.
    pub fn forward(&self, x: &Tensor, timestep: &Tensor, enc: &Tensor) -> Result<Tensor> {
        let (mut state, ctx, aux) = self.prepare(x, timestep, enc)?;
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
    fn block_fn(&self, i: usize, aux: &WanAux) -> Block {
        let (b, cfg, rope, rows) = (self.blocks[i].clone(), self.cfg.clone(), aux.rope.clone(), aux.token_rows.clone());
        let anchor = super::trainable_anchor(self.blocks[i].clone().params(""));
        let segments = self.checkpoint_segments;
        let f: BlockFn = Arc::new(move |s: &[Tensor], c: &[Tensor]| {
            Ok(vec![if segments {
                b.forward_segmented(&s[0], &c[0], &c[1], rows.as_ref(), &rope, &cfg)?
            } else {
                b.forward_rows(&s[0], &c[0], &c[1], rows.as_ref(), &rope, &cfg)?
            }])
        });
        Block { f, anchor }
    }
}

impl Staged for WanTransformer {
    type Aux = WanAux;
    fn num_blocks(&self) -> usize {
        self.blocks.len()
    }
    fn block(&self, i: usize, state: &[Tensor], ctx: &[Tensor], aux: &WanAux) -> Result<Vec<Tensor>> {
        Ok(vec![self.blocks[i].forward_rows(&state[0], &ctx[0], &ctx[1], aux.token_rows.as_ref(), &aux.rope, &self.cfg)?])
    }
    fn finish(&self, state: &[Tensor], ctx: &[Tensor], aux: &WanAux) -> Result<Tensor> {
        let c = &self.cfg;
        let temb = ctx[2].to_dtype(self.scale_shift_table.dtype())?.unsqueeze(1)?;
        let m = self.scale_shift_table.broadcast_add(&temb)?;
        let (shift, scale) = (m.narrow(1, 0, 1)?, m.narrow(1, 1, 1)?);
        let (shift, scale) = match &aux.token_rows {
            None => (shift, scale),
            Some(r) => (per_token(&shift, r, &state[0])?, per_token(&scale, r, &state[0])?),
        };
        let h = layer_norm_modulate(&state[0], &shift, &scale, c.eps)?;
        let out = self.proj_out.forward(&h)?;
        let [fp, hp, wp] = aux.grid;
        let [pt, ph, pw] = c.patch;
        let oc = c.out_channels;
        out.reshape(vec![aux.batch, fp, hp, wp, pt, ph, pw, oc])?.permute(vec![0, 7, 1, 4, 2, 5, 3, 6])?.contiguous()?.reshape((
            aux.batch,
            oc,
            fp * pt,
            hp * ph,
            wp * pw,
        ))
    }
}

/// Per-token timesteps `[B, S]` → the distinct values `[K]` (f32, in order of first appearance)
/// and, for each of the `B·S` tokens, the index of its value (`[B·S]`, u32).
fn distinct_timesteps(timestep: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
    let tv = timestep.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut seen: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
    let mut values: Vec<f32> = Vec::new();
    let rows: Vec<u32> = tv
        .iter()
        .map(|&v| {
            *seen.entry(v.to_bits()).or_insert_with(|| {
                values.push(v);
                values.len() as u32 - 1
            })
        })
        .collect();
    let n = rows.len();
    let dev = timestep.device();
    Ok((Tensor::from_vec(values, (seen.len(),), dev)?, Some(Tensor::from_vec(rows, (n,), dev)?)))
}

impl Parameters for WanTransformer {
    fn params(&mut self) -> Vec<(String, Param<'_>)> {
        let mut v = vec![
            ("patch_embedding".to_string(), Param::Linear(&mut self.patch_embedding)),
            ("condition_embedder.time_embedder.linear_1".to_string(), Param::Linear(&mut self.time_1)),
            ("condition_embedder.time_embedder.linear_2".to_string(), Param::Linear(&mut self.time_2)),
            ("condition_embedder.time_proj".to_string(), Param::Linear(&mut self.time_proj)),
            ("condition_embedder.text_embedder.linear_1".to_string(), Param::Linear(&mut self.text_1)),
            ("condition_embedder.text_embedder.linear_2".to_string(), Param::Linear(&mut self.text_2)),
        ];
        for (i, b) in self.blocks.iter_mut().enumerate() {
            v.extend(b.params(&format!("blocks.{i}")));
        }
        v.push(("scale_shift_table".to_string(), Param::Tensor(&mut self.scale_shift_table)));
        v.push(("proj_out".to_string(), Param::Linear(&mut self.proj_out)));
        v
    }
}

impl Denoiser for WanTransformer {
    /// `x [B, C, F, H, W]`, σ ∈ [0, 1] → timestep 1000σ.
    fn velocity(&self, x: &Tensor, sigma: &Tensor, cond: &Cond) -> Result<Tensor> {
        let t = (sigma.to_dtype(DType::F32)? * 1000.0)?;
        match cond {
            Cond::Embedding(e) => self.forward(x, &t, e)?.to_dtype(x.dtype()),
            Cond::Image { text, image, mode: ImageMode::Channels } => {
                let (c, cc) = (x.dim(1)?, image.dim(1)?);
                if c + cc != self.cfg.in_channels || image.dims()[2..] != x.dims()[2..] {
                    candle_core::bail!(
                        "image condition {:?} does not fit latents {:?}: the model takes {} channels",
                        image.dims(),
                        x.dims(),
                        self.cfg.in_channels
                    );
                }
                let input = Tensor::cat(&[x, &image.to_dtype(x.dtype())?], 1)?;
                self.forward(&input, &t, text)?.to_dtype(x.dtype())
            }
            Cond::Image { text, image, mode: ImageMode::FirstFrame } => {
                let (b, _, f, h, w) = x.dims5()?;
                let [pt, ph, pw] = self.cfg.patch;
                if image.dims() != [b, x.dim(1)?, 1, h, w] || pt != 1 {
                    candle_core::bail!(
                        "first-frame image {:?} does not fit latents {:?} (patch {:?})",
                        image.dims(),
                        x.dims(),
                        self.cfg.patch
                    );
                }
                // The pipeline's per-token timesteps: the first frame's tokens 0, the others t.
                let (frame, tokens) = ((h / ph) * (w / pw), f * (h / ph) * (w / pw));
                let mut per = Vec::with_capacity(b * tokens);
                for tb in t.to_vec1::<f32>()? {
                    per.extend((0..tokens).map(|i| if i < frame { 0.0 } else { tb }));
                }
                let per = Tensor::from_vec(per, (b, tokens), x.device())?;
                let v = self.forward(&cond.fill_fixed(x)?, &per, text)?.to_dtype(x.dtype())?;
                // No velocity on the given frame: it is not generated.
                match cond.free_mask(&v)? {
                    Some(m) => v.broadcast_mul(&m),
                    None => Ok(v),
                }
            }
            Cond::Class(_) | Cond::Masked { .. } => {
                candle_core::bail!("the Wan transformer takes text-embedding conditions without a mask (its pipeline zero-pads prompts)")
            }
        }
    }
    fn null_cond(&self, n: usize) -> Result<Cond> {
        let e = match &self.null_text {
            Some(t) => t.repeat((n, 1, 1))?,
            None => Tensor::zeros((n, 1, self.cfg.text_dim), DType::F32, &self.device)?,
        };
        Ok(Cond::Embedding(e))
    }
}
