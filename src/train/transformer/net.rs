//! A transformer teacher as the trainer uses it: one loaded model ([`Net`]) and *views* of it.
//!
//! candle tensors are reference-counted views of their storage, so a view of a model
//! ([`Net::base_view`]) is a new module tree whose linear layers point at the same weight
//! storage, with their own adapter slot. The teacher, each generator `G_k` (base + its LoRA,
//! zero `up`, so it starts as the teacher) and each LoRA fake score (base + its own fresh LoRA
//! at each phase start) are views of the one loaded base; "switching adapters" is calling
//! another view. A frozen view ([`Net::frozen_view`]) computes with the same variables without
//! recording gradients (rollouts, the fake's frozen copy in the generator update) and sees every
//! optimiser update in place. A full-parameter fake (`fake = "full"`) is the one thing that
//! copies weights: its trainable copy of its expert. Base tensors are never variables, so no
//! optimiser can update them.

use std::cell::Cell;
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Kind, Result};
use crate::model::denoiser::{Cond, Denoiser, ImageMode};
use crate::model::linear::LoraConfig;
use crate::model::lora::LoraAdapter;
use crate::model::qwen::QwenImageTransformer;
use crate::model::wan::WanTransformer;
use crate::model::weights::Weights;
use crate::model::{Param, Parameters};
use crate::train::optim::Trainable;

type CResult<T> = candle_core::Result<T>;

/// A transformer teacher (or a view of one).
pub enum Net {
    Wan(WanTransformer),
    /// With the packed image shape `(F, H/2, W/2)` of the current batch, shared by every view
    /// of one loaded model (so one call sets the resolution for the teacher, generators and fakes).
    Qwen(QwenImageTransformer, Rc<Cell<[usize; 3]>>),
}

impl Net {
    /// Load a checkpoint (any layout phasekit reads) in f32 on `device`.
    pub fn open(path: &Path, device: &Device) -> Result<Net> {
        Net::open_as(path, DType::F32, device)
    }

    /// Load a checkpoint with its weights stored as `dtype` (f32, bf16 or f16).
    pub fn open_as(path: &Path, dtype: DType, device: &Device) -> Result<Net> {
        Net::from_weights(&Weights::open(path, dtype, device)?)
    }

    /// Build the model of `w`'s family from its tensors.
    pub fn from_weights(w: &Weights) -> Result<Net> {
        match w.family.as_str() {
            "wan22" => Ok(Net::Wan(WanTransformer::load(w)?)),
            "qwen_image" => Ok(Net::Qwen(QwenImageTransformer::load(w)?, Rc::new(Cell::new([1, 1, 1])))),
            f => Err(Error::at(Kind::Unsupported, w.path(), format!("not a Wan2.2 or Qwen-Image transformer (family {f})"))),
        }
    }

    pub fn family(&self) -> &'static str {
        match self {
            Net::Wan(_) => "wan22",
            Net::Qwen(..) => "qwen_image",
        }
    }

    /// Width of the text embeddings the model takes.
    pub fn text_dim(&self) -> usize {
        match self {
            Net::Wan(m) => m.cfg.text_dim,
            Net::Qwen(m, _) => m.cfg.joint_dim,
        }
    }

    pub fn in_channels(&self) -> usize {
        match self {
            Net::Wan(m) => m.cfg.in_channels,
            Net::Qwen(m, _) => m.cfg.in_channels,
        }
    }

    /// Channels of the velocity (and of the generated latent).
    pub fn out_channels(&self) -> usize {
        match self {
            Net::Wan(m) => m.cfg.out_channels,
            Net::Qwen(m, _) => m.cfg.out_channels,
        }
    }

    /// How the model takes an image condition: Wan with extra input channels (I2V-A14B) by
    /// concatenation, Wan with equal channels (TI2V-5B) as its first latent frame; Qwen-Image
    /// takes none.
    pub fn image_mode(&self) -> Option<ImageMode> {
        match self {
            Net::Wan(m) if m.cfg.in_channels > m.cfg.out_channels => Some(ImageMode::Channels),
            Net::Wan(_) => Some(ImageMode::FirstFrame),
            Net::Qwen(..) => None,
        }
    }

    /// The same module tree over the same tensors (no weight is copied); adapters are shared
    /// too until a slot is replaced.
    fn shallow(&self) -> Net {
        // Listed field by field on purpose: a field added to a model must be considered here.
        match self {
            Net::Wan(m) => Net::Wan(WanTransformer {
                cfg: m.cfg.clone(),
                patch_embedding: m.patch_embedding.clone(),
                time_1: m.time_1.clone(),
                time_2: m.time_2.clone(),
                time_proj: m.time_proj.clone(),
                text_1: m.text_1.clone(),
                text_2: m.text_2.clone(),
                blocks: m.blocks.clone(),
                scale_shift_table: m.scale_shift_table.clone(),
                proj_out: m.proj_out.clone(),
                null_text: m.null_text.clone(),
                checkpoint: m.checkpoint,
                checkpoint_segments: m.checkpoint_segments,
                activations: m.activations,
                dtype: m.dtype,
                device: m.device.clone(),
            }),
            Net::Qwen(m, shape) => Net::Qwen(
                QwenImageTransformer {
                    cfg: m.cfg.clone(),
                    img_in: m.img_in.clone(),
                    txt_norm: m.txt_norm.clone(),
                    txt_in: m.txt_in.clone(),
                    time_1: m.time_1.clone(),
                    time_2: m.time_2.clone(),
                    blocks: m.blocks.clone(),
                    norm_out: m.norm_out.clone(),
                    proj_out: m.proj_out.clone(),
                    img_shape: m.img_shape,
                    null_text: m.null_text.clone(),
                    checkpoint: m.checkpoint,
                    checkpoint_segments: m.checkpoint_segments,
                    activations: m.activations,
                    dtype: m.dtype,
                    device: m.device.clone(),
                },
                shape.clone(),
            ),
        }
    }

    /// A view of the base weights without adapters (the teacher, or the start of G_k / a fake).
    pub fn base_view(&self) -> Net {
        let mut v = self.shallow();
        for (_, p) in v.params() {
            if let Param::Linear(l) = p {
                l.lora = None;
                l.frozen = false;
            }
        }
        v
    }

    /// A view that computes with the same weights and adapters without recording gradients.
    pub fn frozen_view(&self) -> Net {
        let mut v = self.shallow();
        for (_, p) in v.params() {
            match p {
                Param::Linear(l) => l.frozen = true,
                Param::Tensor(t) => *t = t.detach(),
            }
        }
        v
    }

    /// Recompute blocks in the backward pass (activation checkpointing) in this view and the
    /// views made from it afterwards.
    pub fn set_checkpoint(&mut self, on: bool) {
        match self {
            Net::Wan(m) => m.checkpoint = on,
            Net::Qwen(m, _) => m.checkpoint = on,
        }
    }

    /// With checkpointing on: checkpoint each block's segments too (attention / FFN parts), so
    /// that a block's recompute holds one segment's graph at a time.
    pub fn set_checkpoint_segments(&mut self, on: bool) {
        match self {
            Net::Wan(m) => m.checkpoint_segments = on,
            Net::Qwen(m, _) => m.checkpoint_segments = on,
        }
    }

    /// The dtype of the residual stream and kept activations (see the models' `activations`) in
    /// this view and the views made from it afterwards.
    pub fn set_activations(&mut self, dt: DType) {
        match self {
            Net::Wan(m) => m.activations = dt,
            Net::Qwen(m, _) => m.activations = dt,
        }
    }

    pub fn set_null_text(&mut self, t: Option<Tensor>) {
        match self {
            Net::Wan(m) => m.null_text = t,
            Net::Qwen(m, _) => m.null_text = t,
        }
    }

    /// Set the packed image shape of this model and every view of it (Qwen; no-op for Wan).
    pub fn set_img_shape(&self, s: [usize; 3]) {
        if let Net::Qwen(_, shape) = self {
            shape.set(s);
        }
    }

    /// Attach fresh adapters (zero `up`) per `cfg`, kept in f32 whatever the base dtype (a
    /// 16-bit base gives `down` its initial values rounded to 16 bits); returns how many.
    pub fn attach(&mut self, cfg: &LoraConfig) -> Result<usize> {
        let n = self.attach_lora(cfg)?;
        if n == 0 {
            return Err(Error::usage(format!("recipe: lora_targets {:?} match no linear layer of the model", cfg.targets)));
        }
        for (_, p) in self.params() {
            if let Param::Linear(l) = p {
                if let Some(a) = l.lora.take() {
                    l.lora = Some(if a.down.dtype() == DType::F32 {
                        a
                    } else {
                        let (d, u) = (a.down.as_tensor().to_dtype(DType::F32)?, a.up.as_tensor().to_dtype(DType::F32)?);
                        LoraAdapter::from_tensors(&d, &u, a.alpha)?
                    });
                }
            }
        }
        Ok(n)
    }

    /// The adapters as named variables: `<module>.lora_down.weight`, `<module>.lora_up.weight`.
    pub fn lora_vars(&mut self) -> Trainable {
        let mut t = Trainable::default();
        for (name, p) in self.params() {
            if let Param::Linear(l) = p {
                if let Some(a) = &l.lora {
                    t.names.push(format!("{name}.lora_down.weight"));
                    t.vars.push(a.down.clone());
                    t.names.push(format!("{name}.lora_up.weight"));
                    t.vars.push(a.up.clone());
                }
            }
        }
        t
    }

    /// Make every weight trainable (a full copy of this view's weights); returns them by
    /// diffusers parameter name.
    pub fn full_vars(&mut self) -> Result<Trainable> {
        let mut t = Trainable::default();
        for (name, p) in self.params() {
            match p {
                Param::Linear(l) => {
                    let has_bias = l.bias.is_some();
                    l.weight = l.weight.to_dtype(DType::F32)?;
                    l.bias = l.bias.as_ref().map(|b| b.to_dtype(DType::F32)).transpose()?;
                    let vs = l.make_trainable()?;
                    t.names.push(format!("{name}.weight"));
                    if has_bias {
                        t.names.push(format!("{name}.bias"));
                    }
                    t.vars.extend(vs);
                }
                Param::Tensor(x) => {
                    let v = Var::from_tensor(&x.detach().to_dtype(DType::F32)?)?;
                    *x = v.as_tensor().clone();
                    t.names.push(name);
                    t.vars.push(v);
                }
            }
        }
        Ok(t)
    }

    /// The adapters as a kohya/Lightning LoRA file's tensors (`.lora_down.weight`,
    /// `.lora_up.weight`, `.alpha`), in diffusers module names.
    pub fn lora_file_tensors(&mut self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (name, p) in self.params() {
            if let Param::Linear(l) = p {
                if let Some(a) = &l.lora {
                    out.push((format!("{name}.lora_down.weight"), a.down.as_tensor().detach()));
                    out.push((format!("{name}.lora_up.weight"), a.up.as_tensor().detach()));
                    out.push((format!("{name}.alpha"), Tensor::new(a.alpha as f32, a.down.device())?));
                }
            }
        }
        Ok(out)
    }

    /// Attach the adapters of a LoRA file written by [`Net::lora_file_tensors`].
    pub fn load_lora_file(&mut self, path: &Path) -> Result<usize> {
        let (t, _) = crate::train::rundir::read_tensors(path)?;
        self.attach_lora_tensors(&t.into_iter().collect(), path)
    }

    /// Attach adapters given as `<module>.lora_down.weight`, `.lora_up.weight` and optional
    /// `.alpha` (absent: alpha = rank) in diffusers module names; every tensor must fit a module.
    pub fn attach_lora_tensors(&mut self, t: &HashMap<String, Tensor>, path: &Path) -> Result<usize> {
        let (mut n, mut used) = (0, 0);
        for (name, p) in self.params() {
            if let Param::Linear(l) = p {
                let (Some(d), Some(u)) = (t.get(&format!("{name}.lora_down.weight")), t.get(&format!("{name}.lora_up.weight"))) else {
                    continue;
                };
                let alpha = match t.get(&format!("{name}.alpha")) {
                    Some(a) => {
                        used += 1;
                        a.flatten_all().and_then(|a| a.to_vec1::<f32>())?.first().copied().unwrap_or(1.0) as f64
                    }
                    None => d.dim(0)? as f64,
                };
                let dev = l.weight.device().clone();
                let a = LoraAdapter::from_tensors(&d.to_device(&dev)?, &u.to_device(&dev)?, alpha)
                    .map_err(|e| Error::inconsistent(path, format!("{name}: {e}")))?;
                l.lora = Some(a);
                n += 1;
                used += 2;
            }
        }
        if used != t.len() {
            return Err(Error::inconsistent(path, format!("{} tensors, of which {} adapters fit the model", t.len(), n)));
        }
        Ok(n)
    }
}

impl Parameters for Net {
    fn params(&mut self) -> Vec<(String, Param<'_>)> {
        match self {
            Net::Wan(m) => m.params(),
            Net::Qwen(m, _) => m.params(),
        }
    }
}

impl Denoiser for Net {
    fn velocity(&self, x: &Tensor, sigma: &Tensor, cond: &Cond) -> CResult<Tensor> {
        match self {
            Net::Wan(m) => m.velocity(x, sigma, cond),
            Net::Qwen(m, shape) => {
                let Some((e, mask)) = cond.text_and_mask() else {
                    candle_core::bail!("the Qwen-Image transformer takes text-embedding conditions")
                };
                m.forward(x, e, mask, &sigma.to_dtype(DType::F32)?, shape.get())?.to_dtype(x.dtype())
            }
        }
    }
    fn null_cond(&self, n: usize) -> CResult<Cond> {
        match self {
            Net::Wan(m) => m.null_cond(n),
            Net::Qwen(m, _) => m.null_cond(n),
        }
    }
}

/// `f32`, `bf16` or `f16`.
/// The activations' dtype of a recipe: `activations`, or the weights' `dtype` when unset.
pub fn activation_dtype(tc: &crate::train::recipe::TransformerConfig) -> Result<DType> {
    parse_dtype(tc.activations.as_deref().unwrap_or(&tc.dtype)).map_err(|_| {
        Error::usage(format!(
            "recipe: [transformer] activations '{}' is not f32, bf16 or f16",
            crate::error::clean(tc.activations.as_deref().unwrap_or(""))
        ))
    })
}

pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        o => Err(Error::usage(format!("recipe: [transformer] dtype '{}' is not f32, bf16 or f16", crate::error::clean(o)))),
    }
}
