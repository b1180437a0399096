//! Phased DMD on the transformer teachers (Wan2.2, Qwen-Image), driven by the same
//! [`super::dmd::Phase`] code as the toy.
//!
//! **One copy of the base weights.** candle tensors are reference-counted views of their
//! storage, so a *view* of a model ([`Net::base_view`]) is a new module tree whose linear
//! layers point at the same weight storage, with their own adapter slot. The teacher, each
//! generator `G_k` (base + its LoRA, zero `up`, so it starts as the teacher) and each LoRA fake
//! score (base + its own fresh LoRA at each phase start) are views of the one loaded base;
//! "switching adapters" is calling another view. A frozen view ([`Net::frozen_view`]) computes
//! with the same variables without recording gradients (rollouts, the fake's frozen copy in the
//! generator update) and sees every optimiser update in place. A full-parameter fake
//! (`fake = "full"`) is the one thing that copies weights: its trainable copy of its expert.
//! Base tensors are never variables, so no optimiser can update them.
//!
//! Two-expert teachers (Wan2.2 A14B) are routed by σ ([`Routed`]: σ ≥ boundary → high-noise
//! expert), the teacher and the fake alike, one fake per teacher expert the phase's re-noise
//! range reaches; each generator expert sits on the teacher expert that serves its first step.

use std::cell::Cell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::denoiser::{Cond, Denoiser, ImageMode};
use super::dist;
use super::dmd::{self, Phase, Views};
use super::optim::{AdamW, ParamsAdamW};
use super::recipe::{FakeKind, Recipe, ResolutionSpace, Task, TransformerConfig};
use super::run::{self, CheckpointInfo, Event, Summary, TrainOptions};
use super::schedule::{shift, Schedule};
use super::{ce, Rng};
use crate::error::{Error, IoContext, Kind, Result};
use crate::hash::sha256_hex;
use crate::model::linear::{self, LoraConfig};
use crate::model::lora::LoraAdapter;
use crate::model::qwen::QwenImageTransformer;
use crate::model::wan::WanTransformer;
use crate::model::weights::Weights;
use crate::model::{Param, Parameters};

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
        let n = self.attach_lora(cfg).map_err(ce)?;
        if n == 0 {
            return Err(Error::usage(format!("recipe: lora_targets {:?} match no linear layer of the model", cfg.targets)));
        }
        for (_, p) in self.params() {
            if let Param::Linear(l) = p {
                if let Some(a) = l.lora.take() {
                    l.lora = Some(if a.down.dtype() == DType::F32 {
                        a
                    } else {
                        let (d, u) =
                            (a.down.as_tensor().to_dtype(DType::F32).map_err(ce)?, a.up.as_tensor().to_dtype(DType::F32).map_err(ce)?);
                        LoraAdapter::from_tensors(&d, &u, a.alpha).map_err(ce)?
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
                    l.weight = l.weight.to_dtype(DType::F32).map_err(ce)?;
                    l.bias = l.bias.as_ref().map(|b| b.to_dtype(DType::F32)).transpose().map_err(ce)?;
                    let vs = l.make_trainable().map_err(ce)?;
                    t.names.push(format!("{name}.weight"));
                    if has_bias {
                        t.names.push(format!("{name}.bias"));
                    }
                    t.vars.extend(vs);
                }
                Param::Tensor(x) => {
                    let v = Var::from_tensor(&x.detach().to_dtype(DType::F32).map_err(ce)?).map_err(ce)?;
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
                    out.push((format!("{name}.alpha"), Tensor::new(a.alpha as f32, a.down.device()).map_err(ce)?));
                }
            }
        }
        Ok(out)
    }

    /// Attach the adapters of a LoRA file written by [`Net::lora_file_tensors`].
    pub fn load_lora_file(&mut self, path: &Path) -> Result<usize> {
        let (t, _) = run::read_tensors(path)?;
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
                        a.flatten_all().and_then(|a| a.to_vec1::<f32>()).map_err(ce)?.first().copied().unwrap_or(1.0) as f64
                    }
                    None => d.dim(0).map_err(ce)? as f64,
                };
                let dev = l.weight.device().clone();
                let a = LoraAdapter::from_tensors(&d.to_device(&dev).map_err(ce)?, &u.to_device(&dev).map_err(ce)?, alpha)
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

/// Trainable variables with their names (checkpoint keys).
#[derive(Default, Clone)]
pub struct Trainable {
    pub names: Vec<String>,
    pub vars: Vec<Var>,
}

impl Trainable {
    fn tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        self.names.iter().zip(&self.vars).map(|(n, v)| (format!("{prefix}{n}"), v.as_tensor().detach())).collect()
    }

    fn restore(&self, prefix: &str, t: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
        for (n, v) in self.names.iter().zip(&self.vars) {
            let key = format!("{prefix}{n}");
            let src = t.get(&key).ok_or_else(|| Error::inconsistent(path, format!("checkpoint lacks '{key}'")))?;
            v.set(&src.to_device(v.device()).map_err(ce)?).map_err(|e| Error::inconsistent(path, format!("'{key}': {e}")))?;
        }
        Ok(())
    }

    fn extend(&mut self, prefix: &str, o: Trainable) {
        self.names.extend(o.names.into_iter().map(|n| format!("{prefix}{n}")));
        self.vars.extend(o.vars);
    }
}

/// `f32`, `bf16` or `f16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        o => Err(Error::usage(format!("recipe: [transformer] dtype '{}' is not f32, bf16 or f16", crate::error::clean(o)))),
    }
}

/// Whether σ goes to the high-noise expert of a two-expert teacher (Wan2.2: `t ≥ boundary·1000`).
pub fn is_high_noise(sigma: f64, boundary: f64) -> bool {
    sigma >= boundary
}

/// Routes each sample of a batch by its σ: `high` for σ ≥ `boundary`, `low` below; a dense
/// teacher has `boundary = None` and only `high`. A sample routed to a missing expert is an error.
pub struct Routed<'a> {
    pub high: Option<&'a dyn Denoiser>,
    pub low: Option<&'a dyn Denoiser>,
    pub boundary: Option<f64>,
}

impl Routed<'_> {
    fn pick(&self, high: bool) -> CResult<&dyn Denoiser> {
        let d = if high { self.high } else { self.low };
        d.ok_or_else(|| candle_core::Error::Msg(format!("no {} expert for this σ", if high { "high-noise" } else { "low-noise" })))
    }
}

impl Denoiser for Routed<'_> {
    fn velocity(&self, x: &Tensor, sigma: &Tensor, cond: &Cond) -> CResult<Tensor> {
        let Some(b) = self.boundary else { return self.pick(true)?.velocity(x, sigma, cond) };
        let s = sigma.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let (hi, lo): (Vec<u32>, Vec<u32>) = (0..s.len() as u32).partition(|&i| is_high_noise(f64::from(s[i as usize]), b));
        if lo.is_empty() {
            return self.pick(true)?.velocity(x, sigma, cond);
        }
        if hi.is_empty() {
            return self.pick(false)?.velocity(x, sigma, cond);
        }
        let dev = x.device();
        let mut parts = Vec::new();
        for (idx, high) in [(&hi, true), (&lo, false)] {
            let it = Tensor::new(idx.as_slice(), dev)?;
            parts.push(self.pick(high)?.velocity(&x.index_select(&it, 0)?, &sigma.index_select(&it, 0)?, &cond.select(&it)?)?);
        }
        // Back to the batch order.
        let order: Vec<u32> = hi.iter().chain(&lo).copied().collect();
        let mut inv = vec![0u32; order.len()];
        for (pos, &i) in order.iter().enumerate() {
            inv[i as usize] = pos as u32;
        }
        Tensor::cat(&parts, 0)?.index_select(&Tensor::new(inv.as_slice(), dev)?, 0)
    }
    fn null_cond(&self, n: usize) -> CResult<Cond> {
        self.high.or(self.low).ok_or_else(|| candle_core::Error::Msg("no expert".into()))?.null_cond(n)
    }
}

/// Precomputed conditions: `prompt_embeds [N, L, C]`, optional `negative_prompt_embeds [1, L', C]`
/// and, for image-to-video, `image_condition` (one per prompt; see [`ImageMode`] for its shape),
/// or one such tensor per training latent size (`image_condition.<anything>`, e.g.
/// `image_condition.21x60x104`), the same images prepared at each size.
pub struct Embeddings {
    pub prompts: Tensor,
    pub negative: Option<Tensor>,
    /// Per-prompt image conditions: one set `[N, …]` per latent size, and how the model takes them.
    pub image: Option<(Vec<Tensor>, ImageMode)>,
    /// Qwen-Image: the key mask `[N, L]` (f32) of prompts padded to one length
    /// (`prompt_embeds_mask`, as the pipeline returns it).
    pub mask: Option<Tensor>,
}

/// Tokens per prompt of `random:N` embeddings.
pub const RANDOM_TOKENS: usize = 8;

/// The name of the image conditions in an embeddings file.
pub const IMAGE_CONDITION: &str = "image_condition";

impl Embeddings {
    /// `random:N` (N prompts of [`RANDOM_TOKENS`] tokens and a negative, standard normal, from
    /// `seed`: the recipe's seed when training, `sample --cond-seed` when sampling; with an image
    /// condition per prompt for image-to-video) or a safetensors file (`seed` unused).
    ///
    /// `task`: `Some(I2v)` needs an image condition per prompt, `Some(T2v)` refuses a file that
    /// has them, `None` decides by the model and the file (a model with extra input channels,
    /// I2V-A14B, needs them; otherwise they are used when the file has them). `latents` are the
    /// latent sizes `[frames, height, width]` the conditions must fit (random ones are drawn at each).
    pub fn load(spec: &str, net: &Net, latents: &[[usize; 3]], task: Option<Task>, seed: u64, dev: &Device) -> Result<Embeddings> {
        let dim = net.text_dim();
        let mode = net.image_mode();
        let wants = |has_image: bool| -> Result<bool> {
            match (task, mode) {
                (Some(Task::I2v), None) => Err(Error::usage("the model takes no image condition (task i2v)")),
                (Some(Task::I2v), Some(_)) | (None, Some(ImageMode::Channels)) => Ok(true),
                (Some(Task::T2v), Some(ImageMode::Channels)) => {
                    Err(Error::usage("the model has image-condition input channels (I2V): it cannot run text-to-video"))
                }
                (None, _) => Ok(has_image && mode.is_some()),
                (Some(Task::T2v), _) => Ok(false),
            }
        };
        if let Some(n) = spec.strip_prefix("random:") {
            let n: usize = n
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| Error::usage(format!("recipe: embeddings '{spec}': N must be a positive integer")))?;
            let mut rng = Rng::new(seed ^ 0xE3BE_DD16);
            let p = Tensor::from_vec(rng.normals_f32(n * RANDOM_TOKENS * dim), (n, RANDOM_TOKENS, dim), dev).map_err(ce)?;
            let q = Tensor::from_vec(rng.normals_f32(RANDOM_TOKENS * dim), (1, RANDOM_TOKENS, dim), dev).map_err(ce)?;
            let image = match (wants(false)?, mode) {
                (true, Some(m)) => {
                    let mut sets: Vec<Tensor> = Vec::new();
                    for l in latents {
                        if !sets.iter().any(|x| fits(x, m, *l)) {
                            sets.push(random_image(net, m, n, *l, &mut rng, dev)?);
                        }
                    }
                    Some((sets, m))
                }
                _ => None,
            };
            return Ok(Embeddings { prompts: p, negative: Some(q), image, mask: None });
        }
        if spec.is_empty() {
            return Err(Error::usage("recipe: [transformer] embeddings is empty (a safetensors file or random:N)"));
        }
        let path = Path::new(spec);
        let (t, _) = run::read_tensors_f32(path)?;
        let t: HashMap<String, Tensor> = t.into_iter().collect();
        let prompts = t.get("prompt_embeds").ok_or_else(|| Error::inconsistent(path, "has no tensor 'prompt_embeds' [N, L, C]"))?;
        let ok = |x: &Tensor, one: bool| x.rank() == 3 && x.dims()[2] == dim && x.dims()[0] > 0 && (!one || x.dims()[0] == 1);
        if !ok(prompts, false) {
            return Err(Error::inconsistent(path, format!("prompt_embeds is {:?}, the model needs [N, L, {dim}]", prompts.dims())));
        }
        let negative = match t.get("negative_prompt_embeds") {
            Some(x) if !ok(x, true) => {
                return Err(Error::inconsistent(path, format!("negative_prompt_embeds is {:?}, the model needs [1, L, {dim}]", x.dims())))
            }
            Some(x) => Some(x.to_device(dev).map_err(ce)?),
            None => None,
        };
        let mut names: Vec<&String> =
            t.keys().filter(|k| *k == IMAGE_CONDITION || k.strip_prefix(IMAGE_CONDITION).is_some_and(|r| r.starts_with('.'))).collect();
        names.sort();
        let given: Vec<&Tensor> = names.iter().map(|k| &t[*k]).collect();
        let image = match (wants(!given.is_empty()).map_err(|e| e.with_path(path))?, given.is_empty(), mode) {
            (true, false, Some(m)) => {
                let sets = given.iter().map(|x| x.to_device(dev)).collect::<CResult<Vec<_>>>().map_err(ce)?;
                let n = prompts.dim(0).map_err(ce)?;
                for (i, (x, name)) in sets.iter().zip(&names).enumerate() {
                    let want = match x.dims() {
                        [_, _, f, h, w] => image_dims(net, m, n, [*f, *h, *w]),
                        _ => image_dims(net, m, n, [0; 3]),
                    };
                    if x.dims() != want.as_slice() {
                        return Err(Error::inconsistent(path, format!("{name} is {:?}; the model needs {:?}", x.dims(), want)));
                    }
                    if let Some(j) = (0..i).find(|&j| size_key(m, &sets[j].dims()[2..]) == size_key(m, &x.dims()[2..])) {
                        return Err(Error::inconsistent(path, format!("{name} and {} are for the same latent size", names[j])));
                    }
                }
                Some((sets, m))
            }
            (true, true, _) => {
                return Err(Error::inconsistent(
                    path,
                    format!("has no '{IMAGE_CONDITION}': image-to-video needs one per prompt (docs/recipes.md, Image-to-video)"),
                ))
            }
            (false, false, _) if task == Some(Task::T2v) => {
                return Err(Error::inconsistent(
                    path,
                    format!("has '{IMAGE_CONDITION}' but the run is text-to-video: set [transformer] task = \"i2v\" to use it"),
                ))
            }
            _ => None,
        };
        let mask = prompt_mask(net, &t, prompts, path)?;
        let negative = match (negative, t.get("negative_prompt_embeds_mask")) {
            (Some(n), Some(m)) => {
                Some(trim_to_mask(&n, m).map_err(|msg| Error::inconsistent(path, format!("negative_prompt_embeds_mask: {msg}")))?)
            }
            (n, _) => n,
        };
        let e = Embeddings {
            prompts: prompts.to_device(dev).map_err(ce)?,
            negative,
            image,
            mask: mask.map(|m| m.to_device(dev)).transpose().map_err(ce)?,
        };
        for l in latents {
            e.check_latent(net, *l).map_err(|m| Error::inconsistent(path, m))?;
        }
        Ok(e)
    }

    pub fn count(&self) -> usize {
        self.prompts.dims()[0]
    }

    /// Whether an image condition fits `net` at latent size `latent` (an explanation if not).
    pub fn check_latent(&self, net: &Net, latent: [usize; 3]) -> std::result::Result<(), String> {
        let Some((sets, mode)) = &self.image else { return Ok(()) };
        let want = image_dims(net, *mode, self.count(), latent);
        if !sets.iter().any(|x| x.dims() == want.as_slice()) {
            let have: Vec<_> = sets.iter().map(|x| x.dims().to_vec()).collect();
            return Err(format!("no {IMAGE_CONDITION} fits latent size {latent:?}, which needs {want:?} (the file has {have:?})"));
        }
        Ok(())
    }

    /// Conditions of prompts `idx` at latent size `latent` (with their images for image-to-video).
    pub fn cond(&self, idx: &[u32], latent: [usize; 3]) -> CResult<Cond> {
        let it = Tensor::new(idx, self.prompts.device())?;
        let text = self.prompts.index_select(&it, 0)?;
        Ok(match (&self.image, &self.mask) {
            (Some((sets, mode)), _) => {
                let x = sets
                    .iter()
                    .find(|x| fits(x, *mode, latent))
                    .ok_or_else(|| candle_core::Error::Msg(format!("no {IMAGE_CONDITION} fits latent size {latent:?}")))?;
                Cond::Image { text, image: x.index_select(&it, 0)?, mode: *mode }
            }
            (None, Some(m)) => Cond::Masked { text, mask: m.index_select(&it, 0)? },
            (None, None) => Cond::Embedding(text),
        })
    }

    /// The tensors of an embeddings file holding these conditions.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut t = vec![("prompt_embeds".to_string(), self.prompts.clone())];
        if let Some(n) = &self.negative {
            t.push(("negative_prompt_embeds".to_string(), n.clone()));
        }
        if let Some((sets, _)) = &self.image {
            for x in sets {
                let name = match sets.len() {
                    1 => IMAGE_CONDITION.to_string(),
                    _ => format!("{IMAGE_CONDITION}.{}", x.dims()[2..].iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x")),
                };
                t.push((name, x.clone()));
            }
        }
        if let Some(m) = &self.mask {
            t.push(("prompt_embeds_mask".to_string(), m.clone()));
        }
        t
    }
}

/// `prompt_embeds_mask [N, L]` of a file, as f32 0/1: used by Qwen-Image (whose pipeline masks
/// padded prompt tokens); for Wan2.2, whose pipeline zero-pads prompts and attends to them, only a
/// mask whose padded positions hold zeros is accepted, and then not used.
fn prompt_mask(net: &Net, t: &HashMap<String, Tensor>, prompts: &Tensor, path: &Path) -> Result<Option<Tensor>> {
    let Some(m) = t.get("prompt_embeds_mask") else { return Ok(None) };
    let bad = |msg: String| Error::inconsistent(path, format!("prompt_embeds_mask: {msg}"));
    let (n, l) = (prompts.dim(0).map_err(ce)?, prompts.dim(1).map_err(ce)?);
    if m.dims() != [n, l] {
        return Err(bad(format!("is {:?}, prompt_embeds needs [{n}, {l}]", m.dims())));
    }
    let m = m.to_dtype(DType::F32).map_err(ce)?;
    let v = m.flatten_all().and_then(|x| x.to_vec1::<f32>()).map_err(ce)?;
    if v.iter().any(|x| *x != 0.0 && *x != 1.0) {
        return Err(bad("holds values other than 0 and 1".into()));
    }
    if let Some(r) = v.chunks(l).position(|row| row.iter().all(|x| *x == 0.0)) {
        return Err(bad(format!("row {r} masks every token")));
    }
    match net {
        Net::Qwen(..) => Ok(Some(m)),
        Net::Wan(_) => {
            let pad = prompts.broadcast_mul(&(1.0 - &m).map_err(ce)?.unsqueeze(2).map_err(ce)?).map_err(ce)?;
            let max = pad.abs().and_then(|x| x.max_all()).and_then(|x| x.to_scalar::<f32>()).map_err(ce)?;
            if max != 0.0 {
                return Err(bad(
                    "masks tokens that are not zeros; Wan2.2's pipeline pads prompts with zeros and attends to them (no mask)".into(),
                ));
            }
            Ok(None)
        }
    }
}

/// A one-prompt embedding `[1, L, C]` cut to its tokens by a mask `[1, L]` of leading ones.
fn trim_to_mask(e: &Tensor, m: &Tensor) -> std::result::Result<Tensor, String> {
    let l = e.dim(1).map_err(|x| x.to_string())?;
    let v = m.to_dtype(DType::F32).and_then(|x| x.flatten_all()).and_then(|x| x.to_vec1::<f32>()).map_err(|x| x.to_string())?;
    let k = v.iter().take_while(|x| **x == 1.0).count();
    if v.len() != l || k == 0 || v[k..].iter().any(|x| *x != 0.0) {
        return Err(format!("must be [1, {l}] with leading ones then zeros"));
    }
    e.narrow(1, 0, k).map_err(|x| x.to_string())
}

/// The part of a latent size `[F, H, W]` (or of an image-condition set's dims after the batch and
/// channel axes) that decides which set serves it: all of it for channels, height and width for a
/// first frame (which serves any frame count).
fn size_key(mode: ImageMode, fhw: &[usize]) -> &[usize] {
    match mode {
        ImageMode::Channels => fhw,
        ImageMode::FirstFrame => fhw.get(1..).unwrap_or(&[]),
    }
}

/// Whether an image-condition set `x` serves latent size `latent`.
fn fits(x: &Tensor, mode: ImageMode, latent: [usize; 3]) -> bool {
    x.rank() == 5 && size_key(mode, &x.dims()[2..]) == size_key(mode, &latent)
}

/// The shape an image-condition set of `n` prompts must have for `net` at latent size `[f, h, w]`:
/// `[n, C', F, H, W]` (channels) or `[n, C, 1, H, W]` (first frame).
fn image_dims(net: &Net, mode: ImageMode, n: usize, [f, h, w]: [usize; 3]) -> Vec<usize> {
    match mode {
        ImageMode::Channels => vec![n, net.in_channels() - net.out_channels(), f, h, w],
        ImageMode::FirstFrame => vec![n, net.in_channels(), 1, h, w],
    }
}

/// `n` random image conditions for `net` at latent size `latent`: standard-normal image latents
/// and, for [`ImageMode::Channels`], the pipeline's first-frame mask in front (its mask channels
/// 1 on the first latent frame, 0 on the others).
fn random_image(net: &Net, mode: ImageMode, n: usize, latent: [usize; 3], rng: &mut Rng, dev: &Device) -> Result<Tensor> {
    let [f, h, w] = latent;
    let (c, out) = (net.in_channels(), net.out_channels());
    let t = match mode {
        ImageMode::FirstFrame => Tensor::from_vec(rng.normals_f32(n * c * h * w), (n, c, 1, h, w), dev),
        ImageMode::Channels => {
            let masks = (c - out).checked_sub(out).filter(|m| *m > 0).ok_or_else(|| {
                Error::usage(format!("the model's {c} input channels are not {out} latent + mask + {out} image channels"))
            })?;
            let lat = Tensor::from_vec(rng.normals_f32(n * out * f * h * w), (n, out, f, h, w), dev).map_err(ce)?;
            let mut m = vec![0f32; n * masks * f * h * w];
            for (i, v) in m.iter_mut().enumerate() {
                if (i / (h * w)) % f == 0 {
                    *v = 1.0;
                }
            }
            let m = Tensor::from_vec(m, (n, masks, f, h, w), dev).map_err(ce)?;
            Tensor::cat(&[&m, &lat], 1)
        }
    };
    t.map_err(ce)
}

/// Latent geometry of a run: the shape of one sample and (Qwen) the packed image shape.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Geometry {
    /// Wan: `[C, F, H, W]`; Qwen: packed `[F·H/2·W/2, 4C]`.
    pub item: Vec<usize>,
    /// Latent frames, height, width.
    pub latent: [usize; 3],
    /// Qwen's `img_shapes` entry `(F, H/2, W/2)`.
    pub img_shape: [usize; 3],
}

fn default_vae_stride(model: &str) -> [usize; 3] {
    match model {
        "qwen-image" => [1, 8, 8],
        "wan2.2-ti2v-5b" => [4, 16, 16],
        _ => [4, 8, 8],
    }
}

/// The latent shapes a recipe trains at (one per entry of `resolutions`) and their weights.
pub fn geometries(r: &Recipe, t: &TransformerConfig, net: &Net) -> Result<(Vec<Geometry>, Vec<f64>)> {
    if t.resolutions.is_empty() {
        return Err(Error::usage("recipe: [transformer] resolutions is empty"));
    }
    let w = if t.resolution_weights.is_empty() { vec![1.0; t.resolutions.len()] } else { t.resolution_weights.clone() };
    if w.len() != t.resolutions.len() || w.iter().any(|x| !x.is_finite() || *x < 0.0) || w.iter().sum::<f64>() <= 0.0 {
        return Err(Error::usage("recipe: resolution_weights needs one non-negative weight per resolution, not all zero"));
    }
    let g = t.resolutions.iter().map(|res| geometry(r, t, net, *res)).collect::<Result<Vec<_>>>()?;
    Ok((g, w))
}

/// The latent shape of one training resolution.
pub fn geometry(r: &Recipe, t: &TransformerConfig, net: &Net, res: [usize; 3]) -> Result<Geometry> {
    let latent = match t.resolution_space {
        ResolutionSpace::Latent => res,
        ResolutionSpace::Pixel => {
            let s = t.vae_stride.unwrap_or_else(|| default_vae_stride(&r.model));
            if res[0] == 0 || (res[0] - 1) % s[0] != 0 || res[1] % s[1] != 0 || res[2] % s[2] != 0 {
                return Err(Error::usage(format!(
                    "recipe: resolution {res:?} does not divide by the VAE stride {s:?} (frames as 1 + k·{})",
                    s[0]
                )));
            }
            [(res[0] - 1) / s[0] + 1, res[1] / s[1], res[2] / s[2]]
        }
    };
    latent_geometry(net, latent).map_err(|e| Error::usage(format!("recipe: {}", e.message())))
}

/// The latent shape of one sample of latent size `[frames, height, width]` for `net`.
pub fn latent_geometry(net: &Net, latent: [usize; 3]) -> Result<Geometry> {
    let [f, h, w] = latent;
    match net {
        Net::Wan(m) => {
            let [pt, ph, pw] = m.cfg.patch;
            if f == 0 || f % pt != 0 || h % ph != 0 || w % pw != 0 || h == 0 || w == 0 {
                return Err(Error::usage(format!("latent size {latent:?} does not divide by the patch {:?}", m.cfg.patch)));
            }
            Ok(Geometry { item: vec![m.cfg.out_channels, f, h, w], latent, img_shape: [f, h / ph, w / pw] })
        }
        Net::Qwen(m, _) => {
            let p = m.cfg.patch;
            if f == 0 || h == 0 || w == 0 || h % p != 0 || w % p != 0 {
                return Err(Error::usage(format!("latent size {latent:?} does not divide by the patch {p}")));
            }
            let shape = [f, h / p, w / p];
            Ok(Geometry { item: vec![f * (h / p) * (w / p), m.cfg.in_channels], latent, img_shape: shape })
        }
    }
}

/// The teacher checkpoints of a recipe: `[high, low]` for a two-expert teacher, `[one]` otherwise.
pub fn teacher_paths(t: &TransformerConfig) -> Result<Vec<PathBuf>> {
    let paths: Vec<PathBuf> = if t.expert_boundary.is_some() {
        match t.experts.as_slice() {
            [h, l] => vec![h.into(), l.into()],
            [] => vec![Path::new(&t.checkpoint).join("high_noise_model"), Path::new(&t.checkpoint).join("low_noise_model")],
            _ => return Err(Error::usage("recipe: [transformer] experts takes two paths, [high_noise, low_noise]")),
        }
    } else {
        match t.experts.as_slice() {
            [one] => vec![one.into()],
            [] => vec![PathBuf::from(&t.checkpoint)],
            _ => return Err(Error::usage("recipe: [transformer] experts needs expert_boundary for two experts")),
        }
    };
    for p in &paths {
        if p.as_os_str().is_empty() {
            return Err(Error::usage("recipe: [transformer] checkpoint is empty"));
        }
        if !p.exists() {
            return Err(Error::io(p, std::io::Error::new(std::io::ErrorKind::NotFound, "teacher checkpoint not found")));
        }
    }
    Ok(paths)
}

/// The single safetensors file of a checkpoint path (a file, or a folder holding exactly one).
fn single_file(p: &Path) -> Option<PathBuf> {
    if p.is_file() {
        return Some(p.to_path_buf());
    }
    let files: Vec<PathBuf> = std::fs::read_dir(p)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|f| f.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    if files.len() == 1 {
        files.into_iter().next()
    } else {
        None
    }
}

/// Identity of a teacher: sha256 of every safetensors file under 2 GiB in total; above that, of
/// each file's name, size and first MiB (the header), marked `header-sha256:`.
pub fn teacher_digest(p: &Path) -> Result<String> {
    let files: Vec<PathBuf> = if p.is_file() {
        vec![p.to_path_buf()]
    } else {
        let mut v: Vec<PathBuf> = std::fs::read_dir(p)
            .with_file(p)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|f| f.extension().is_some_and(|x| x == "safetensors" || x == "gguf" || x == "json"))
            .collect();
        v.sort();
        v
    };
    let total: u64 = files.iter().filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum();
    let full = total < (2 << 30);
    let mut buf = Vec::new();
    for f in &files {
        let name = f.file_name().unwrap_or_default().to_string_lossy().to_string();
        buf.extend_from_slice(name.as_bytes());
        if full {
            buf.extend_from_slice(&std::fs::read(f).with_file(f)?);
        } else {
            use std::io::Read;
            let mut head = vec![0u8; 1 << 20];
            let mut h = std::fs::File::open(f).with_file(f)?;
            let k = h.read(&mut head).with_file(f)?;
            buf.extend_from_slice(&f.metadata().with_file(f)?.len().to_le_bytes());
            buf.extend_from_slice(&head[..k]);
        }
    }
    Ok(format!("{}sha256:{}", if full { "" } else { "header-" }, sha256_hex(&buf)))
}

/// `RUN_DIR/transformer.json`: what `sample --run` needs besides the expert files.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunInfo {
    pub format: String,
    pub name: String,
    pub model: String,
    pub family: String,
    /// Teacher checkpoints (absolute): `[high, low]` or `[one]`.
    pub teachers: Vec<String>,
    pub expert_boundary: Option<f64>,
    /// Embeddings file the conditions come from (`RUN_DIR/embeddings.safetensors` for `random:N`).
    pub embeddings: String,
    /// Text- or image-to-video (runs written before the field: text).
    #[serde(default = "t2v")]
    pub task: Task,
    pub geometry: Geometry,
    pub steps: usize,
    pub shift: f64,
    pub sigmas: Vec<f64>,
    pub teacher_guidance: f64,
    /// Storage dtype of the base weights.
    #[serde(default = "f32_name")]
    pub dtype: String,
    pub experts: Vec<RunExpert>,
    /// Notes (e.g. why `manifest.json` has no base).
    pub notes: Vec<String>,
}

fn t2v() -> Task {
    Task::T2v
}

fn f32_name() -> String {
    "f32".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunExpert {
    pub file: String,
    /// Index into `teachers` of the base the LoRA applies to.
    pub base: usize,
    pub sigma_range: [f64; 2],
    pub steps: [usize; 2],
}

const INFO: &str = "transformer.json";

fn gen_lora(t: &TransformerConfig, seed: u64) -> LoraConfig {
    LoraConfig {
        rank: t.lora_rank,
        alpha: t.lora_alpha,
        targets: if t.lora_targets.is_empty() { linear::default_targets() } else { t.lora_targets.clone() },
        seed,
    }
}

/// Which teacher expert serves σ (index into the loaded bases).
fn expert_of(sigma: f64, boundary: Option<f64>) -> usize {
    match boundary {
        Some(b) if !is_high_noise(sigma, b) => 1,
        _ => 0,
    }
}

/// The σ range (after the shift) a phase's re-noise levels come from, with `t_range` applied.
fn renoise_sigma_range(sched: &Schedule, p: usize, r: &Recipe, t_range: Option<(f64, f64)>) -> (f64, f64) {
    let (lo, hi) = sched.renoise_interval(p, r.schedule.renoise);
    let (mut a, mut b) = (shift(lo, sched.shift), shift(hi, sched.shift));
    if let Some((x, y)) = t_range {
        a = a.max(x);
        b = b.min(y);
    }
    (a, b)
}

/// Train a transformer recipe into `out` (see the module docs; called by [`run::train`]).
pub fn train(r: &Recipe, recipe_text: &str, out: &Path, opts: &TrainOptions, on: &dyn Fn(&Event)) -> Result<Summary> {
    let t0 = Instant::now();
    let tc = r.transformer.clone().ok_or_else(|| Error::usage(format!("recipe: model '{}' needs a [transformer] section", r.model)))?;
    let paths = teacher_paths(&tc)?;
    let device = device();
    // Data parallelism: every rank trains its own batches from the same initial weights and
    // averages the gradients (one rank: the communicator does nothing). Only rank 0 writes.
    let comm = dist::connect(&opts.dist, &device)?;
    let (rank, lead) = (comm.rank(), comm.rank() == 0);
    let dtype = parse_dtype(&tc.dtype)?;
    let sched = r.schedule.build()?;
    if !r.train.fake_reinit {
        return Err(Error::unsupported(
            "recipe: train.fake_reinit = false is a toy ablation; transformer fakes restart from the teacher each phase",
        ));
    }
    if tc.lora_rank == 0 {
        return Err(Error::unsupported("recipe: lora_rank = 0 (full-weight generator) is not supported for transformers yet"));
    }
    if let (Some(b), Some([lo, hi])) = (tc.expert_boundary, tc.phase1_t_range) {
        if !(lo < hi && lo >= 0.0 && hi <= 1.0) || lo < b {
            return Err(Error::usage(format!("recipe: phase1_t_range [{lo}, {hi}] must be a range inside [expert_boundary = {b}, 1]")));
        }
    }
    // The bases: loaded once; two equal paths share one model.
    let mut bases: Vec<Net> = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        if i == 1 && p == &paths[0] {
            let v = bases[0].base_view();
            bases.push(v);
        } else {
            bases.push(Net::open_as(p, dtype, &device)?);
        }
    }
    if bases.len() == 2 && bases[0].family() != bases[1].family() {
        return Err(Error::inconsistent(&paths[1], "the two teacher experts are different model families"));
    }
    let (geos, geo_w) = geometries(r, &tc, &bases[0])?;
    let task = r.task();
    let latents: Vec<[usize; 3]> = geos.iter().map(|g| g.latent).collect();
    // A file's image conditions are checked against every training size as they load.
    let emb = Embeddings::load(&tc.embeddings, &bases[0], &latents, Some(task), r.seed, &device)?;
    for b in bases.iter_mut() {
        b.set_null_text(emb.negative.clone());
        b.set_img_shape(geos[0].img_shape);
    }
    let recipe_sha = if lead { run::prepare_run_dir(out, opts, recipe_text)? } else { sha256_hex(recipe_text.as_bytes()) };
    let emb_file = if tc.embeddings.starts_with("random:") {
        let p = out.join("embeddings.safetensors");
        if lead {
            run::write_tensors(&p, &emb.tensors(), &[])?;
        }
        "embeddings.safetensors".to_string()
    } else {
        std::path::absolute(&tc.embeddings).unwrap_or_else(|_| PathBuf::from(&tc.embeddings)).display().to_string()
    };
    let digests = paths.iter().map(|p| teacher_digest(p)).collect::<Result<Vec<_>>>()?;
    let teacher_sha = sha256_hex(digests.join(",").as_bytes());
    let teacher_views: Vec<Net> = bases.iter().map(|b| b.frozen_view()).collect();
    let teacher =
        Routed { high: Some(&teacher_views[0]), low: teacher_views.get(1).map(|t| t as &dyn Denoiser), boundary: tc.expert_boundary };
    let n_prompts = emb.count();
    // One condition sampler per training latent size (the image conditions depend on it).
    let samplers: Vec<_> = geos
        .iter()
        .map(|g| {
            let (emb, latent) = (&emb, g.latent);
            move |rng: &mut Rng, n: usize| -> CResult<Cond> {
                let idx: Vec<u32> = (0..n).map(|_| rng.below(n_prompts) as u32).collect();
                emb.cond(&idx, latent)
            }
        })
        .collect();
    let total: u64 = (0..sched.phases.len()).map(|p| r.updates(p)).sum();
    let gen_params = ParamsAdamW {
        lr: r.train.gen_lr,
        beta1: r.train.betas[0],
        beta2: r.train.betas[1],
        eps: r.train.eps,
        weight_decay: r.train.weight_decay,
    };
    let fake_params = ParamsAdamW { lr: r.train.fake_lr, ..gen_params.clone() };

    // Resume state. Each rank draws its own batches (seed + rank; rank 0's stream is the
    // one-rank run's).
    let mut rng = Rng::new(r.seed.wrapping_add(rank as u64));
    let (mut start_phase, mut start_step, mut resumed_from) = (0, 0, None);
    let mut restored: Option<(CheckpointInfo, HashMap<String, Tensor>, PathBuf)> = None;
    if opts.resume {
        if let Some((info, path)) = run::latest_checkpoint(out)? {
            if info.recipe_sha256 != recipe_sha || info.teacher_sha256 != teacher_sha {
                return Err(Error::inconsistent(&path, "checkpoint belongs to another recipe or teacher"));
            }
            let (t, _) = run::read_tensors(&path)?;
            rng.state = dist::resume_rng_state(&info, rank, r.seed);
            start_phase = info.phase;
            start_step = info.step;
            resumed_from = Some(info.global_step);
            restored = Some((info, t.into_iter().collect(), path));
        }
    }
    let at = comm.all_gather_u64(resumed_from.unwrap_or(u64::MAX)).map_err(ce)?;
    if at.iter().any(|g| *g != at[0]) {
        let say = |g: &u64| if *g == u64::MAX { "none".to_string() } else { format!("step {g}") };
        return Err(Error::inconsistent(
            out,
            format!(
                "the ranks found different checkpoints to resume from ({}): every rank must read the same run folder",
                at.iter().map(say).collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    let (mut log, log_path) =
        if lead { run::open_log(out, opts.resume, resumed_from.unwrap_or(0))? } else { (dist::null_file()?, PathBuf::new()) };

    let gen_base = |p: usize| expert_of(sched.sigmas[sched.phases[p].start], tc.expert_boundary);
    // Frozen generator experts of finished phases.
    let mut experts: Vec<Net> = Vec::new();
    for k in 0..start_phase {
        let mut e = bases[gen_base(k)].base_view();
        e.load_lora_file(&run::expert_path(out, k))?;
        experts.push(e.frozen_view());
    }
    let mut updates = run::Updates {
        recipe: r,
        out,
        stop_after: opts.stop_after,
        on,
        t0,
        log: &mut log,
        log_path: &log_path,
        phases: sched.phases.len(),
        total,
        resumed_from,
        memory: Vec::new(),
    };
    let mut digests_done: Vec<String> = Vec::new();
    let report = |d: &[String]| dist::DistReport {
        rank,
        world_size: comm.world_size(),
        backend: comm.backend().to_string(),
        weights_sha256: sha256_hex(d.join(",").as_bytes()),
    };
    let mut global: u64 = (0..start_phase).map(|p| r.updates(p)).sum::<u64>() + start_step;
    for p in start_phase..sched.phases.len() {
        let t_range = if p == 0 { tc.phase1_t_range.map(|[a, b]| (a, b)) } else { None };
        // Generator: its teacher expert's base + a fresh LoRA (zero up: starts as the teacher).
        let mut gen = bases[gen_base(p)].base_view();
        gen.attach(&gen_lora(&tc, r.seed ^ (0x6E4E_0000 + p as u64)))?;
        let gen_tr = gen.lora_vars();
        // Fakes: one per teacher expert that the phase's re-noise range reaches.
        let (a, b) = renoise_sigma_range(&sched, p, r, t_range);
        let mut fakes: Vec<Option<Net>> = Vec::new();
        let mut fake_tr = Trainable::default();
        for (e, base) in bases.iter().enumerate() {
            let used = match tc.expert_boundary {
                None => true,
                Some(bd) => (e == 0 && b >= bd) || (e == 1 && a < bd),
            };
            if !used {
                fakes.push(None);
                continue;
            }
            let mut f = base.base_view();
            let tr = match tc.fake {
                FakeKind::Lora => {
                    f.attach(&LoraConfig {
                        rank: tc.fake_lora_rank,
                        alpha: tc.fake_lora_alpha,
                        seed: r.seed ^ (0xFA6E_0000 + 16 * p as u64 + e as u64),
                        ..gen_lora(&tc, 0)
                    })?;
                    f.lora_vars()
                }
                FakeKind::Full => f.full_vars()?,
            };
            fake_tr.extend(&format!("{e}."), tr);
            fakes.push(Some(f));
        }
        let mut gen_opt = AdamW::new(gen_tr.vars.clone(), gen_params.clone()).map_err(ce)?.with_comm(comm.clone());
        let mut fake_opt = AdamW::new(fake_tr.vars.clone(), fake_params.clone()).map_err(ce)?.with_comm(comm.clone());
        let mut first = 0;
        if let Some((info, t, path)) = restored.take() {
            if info.phase == p {
                gen_tr.restore("gen.", &t, &path)?;
                fake_tr.restore("fake.", &t, &path)?;
                run::restore_opt("gen_opt.", &gen_tr.names, &mut gen_opt, &t, &path)?;
                run::restore_opt("fake_opt.", &fake_tr.names, &mut fake_opt, &t, &path)?;
                gen_opt.step_t = info.gen_opt_step;
                fake_opt.step_t = info.fake_opt_step;
                first = info.step;
            }
        }
        let gen_frozen = gen.frozen_view();
        let fake_frozen: Vec<Option<Net>> = fakes.iter().map(|f| f.as_ref().map(|f| f.frozen_view())).collect();
        let fake_r = Routed { high: as_dyn(&fakes[0]), low: fakes.get(1).and_then(as_dyn), boundary: tc.expert_boundary };
        let fake_fr = Routed { high: as_dyn(&fake_frozen[0]), low: fake_frozen.get(1).and_then(as_dyn), boundary: tc.expert_boundary };
        let expert_refs: Vec<&dyn Denoiser> = experts.iter().map(|e| e as &dyn Denoiser).collect();
        let phase = |gi: usize| Phase {
            sched: &sched,
            scfg: &r.schedule,
            tcfg: &r.train,
            phase: p,
            teacher: &teacher,
            guidance: r.teacher.guidance,
            experts: &expert_refs,
            sample_cond: &samplers[gi],
            item: &geos[gi].item,
            t_range,
            device: &device,
        };
        let views = Views { gen: &gen, gen_frozen: &gen_frozen, fake: &fake_r, fake_frozen: &fake_fr };
        let n = r.updates(p);
        let save = |step: u64, global: u64, rng: &Rng, gen_opt: &AdamW, fake_opt: &AdamW| -> Result<()> {
            let rng_states = comm.all_gather_u64(rng.state).map_err(ce)?;
            if !lead {
                return Ok(());
            }
            let mut t = gen_tr.tensors("gen.");
            t.extend(fake_tr.tensors("fake."));
            t.extend(run::opt_tensors("gen_opt.", &gen_tr.names, gen_opt));
            t.extend(run::opt_tensors("fake_opt.", &fake_tr.names, fake_opt));
            let base = run::ckpt_dir(out).join(format!("step-{global:07}"));
            run::write_tensors(&base.with_extension("safetensors"), &t, &[])?;
            let info = CheckpointInfo {
                format: "phasekit-checkpoint/1".into(),
                phase: p,
                step,
                global_step: global,
                rng_state: rng.state,
                gen_opt_step: gen_opt.step_t,
                fake_opt_step: fake_opt.step_t,
                recipe_sha256: recipe_sha.clone(),
                teacher_sha256: teacher_sha.clone(),
                rng_states: if rng_states.len() > 1 { rng_states } else { Vec::new() },
            };
            run::write_json(&base.with_extension("json"), &info)?;
            run::prune_checkpoints(out, r.train.keep_checkpoints)
        };
        for step in first..n {
            // One resolution per iteration (drawn only when there are several, so a single-
            // resolution run's random stream does not depend on this).
            let gi = if geos.len() > 1 { rng.categorical(&geo_w) } else { 0 };
            for b in &bases {
                b.set_img_shape(geos[gi].img_shape);
            }
            let l = phase(gi).iteration_views(&mut rng, &views, &mut gen_opt, &mut fake_opt).map_err(ce)?;
            global += 1;
            let done = step + 1;
            if let Some(stopped) = updates.after(p, done, n, global, &l, || save(done, global, &rng, &gen_opt, &fake_opt))? {
                return Ok(Summary { dist: Some(report(&digests_done)), ..stopped });
            }
        }
        if first == n && n == 0 {
            save(0, global, &rng, &gen_opt, &fake_opt)?;
        }
        let (lo, hi) = sched.expert_range(p);
        let md = vec![
            ("phasekit.format".to_string(), "phasekit-expert/1".to_string()),
            ("phasekit.expert".to_string(), p.to_string()),
            ("phasekit.sigma_range".to_string(), format!("[{lo},{hi})")),
        ];
        let expert = gen.lora_file_tensors()?;
        // The ranks took the same updates, so they hold the same expert: checked, not assumed.
        let digest = dist::tensors_digest(&expert).map_err(ce)?;
        let short = u64::from_str_radix(&digest[..16], 16).unwrap_or(0);
        let all = comm.all_gather_u64(short).map_err(ce)?;
        if all.iter().any(|d| *d != all[0]) {
            return Err(Error::internal(format!("phase {p}: the ranks' experts differ after the phase (digests {all:x?})")));
        }
        digests_done.push(digest);
        if lead {
            run::write_tensors(&run::expert_path(out, p), &expert, &md)?;
        }
        experts.push(gen_frozen);
    }
    if lead {
        write_outputs(r, &tc, out, &sched, &paths, &digests, &recipe_sha, &geos[0], &emb_file, &gen_base, bases[0].family())?;
        let plots = out.join("plots");
        std::fs::create_dir_all(&plots).with_file(&plots)?;
        super::plot::loss_plot(out, &plots)?;
    }
    Ok(Summary {
        run_dir: out.into(),
        completed: true,
        global_step: global,
        seconds: t0.elapsed().as_secs_f64(),
        resumed_from,
        metrics: None,
        memory: std::mem::take(&mut updates.memory),
        dist: Some(report(&digests_done)),
    })
}

fn as_dyn(v: &Option<Net>) -> Option<&dyn Denoiser> {
    v.as_ref().map(|x| x as &dyn Denoiser)
}

/// `manifest.json` (the assembler's `phasekit.run/1`) and `transformer.json`.
#[allow(clippy::too_many_arguments)]
fn write_outputs(
    r: &Recipe,
    tc: &TransformerConfig,
    out: &Path,
    sched: &Schedule,
    paths: &[PathBuf],
    digests: &[String],
    recipe_sha: &str,
    geo: &Geometry,
    emb_file: &str,
    gen_base: &dyn Fn(usize) -> usize,
    family: &str,
) -> Result<()> {
    let mut notes = Vec::new();
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    // Each generator expert's base (its teacher expert; two equal paths are one base), linked
    // into the run: the first phase's as `base.safetensors`, another as `base-<j>/base.safetensors`,
    // each with its config.json (for family detection).
    let one = |j: usize| paths.iter().position(|p| *p == paths[j]).unwrap_or(j);
    let used: Vec<usize> = (0..sched.phases.len()).map(|k| one(gen_base(k))).collect();
    let mut base_rel: Vec<Option<String>> = vec![None; paths.len()];
    for (k, &j) in used.iter().enumerate() {
        if used[..k].contains(&j) {
            continue;
        }
        let Some(f) = single_file(&paths[j]) else {
            notes.push(format!("{} is not a single safetensors file: manifest.json names no base for it", paths[j].display()));
            continue;
        };
        let (dir, rel) =
            if j == used[0] { (out.to_path_buf(), String::new()) } else { (out.join(format!("base-{j}")), format!("base-{j}/")) };
        std::fs::create_dir_all(&dir).with_file(&dir)?;
        let link = dir.join("base.safetensors");
        let _ = std::fs::remove_file(&link);
        link_or_copy(&abs(&f), &link)?;
        if let Some(cfg) = f.parent().map(|d| d.join("config.json")).filter(|c| c.is_file()) {
            let _ = std::fs::remove_file(dir.join("config.json"));
            link_or_copy(&abs(&cfg), &dir.join("config.json"))?;
        }
        base_rel[j] = Some(format!("{rel}base.safetensors"));
    }
    // Without a file for every base, the manifest names none (the assembler then asks for --base).
    let all = used.iter().all(|&j| base_rel[j].is_some());
    let base = if all { base_rel[used[0]].clone() } else { None };
    let mut experts = Vec::new();
    let mut info_experts = Vec::new();
    for (k, ph) in sched.phases.iter().enumerate() {
        let (lo, hi) = sched.expert_range(k);
        experts.push(serde_json::json!({
            "path": format!("experts/expert-{k}.safetensors"),
            "sigma_lo": lo,
            "sigma_hi": hi,
            "timesteps": sched.sigmas[ph.start..ph.end].iter().map(|s| s * 1000.0).collect::<Vec<f64>>(),
            "kind": "lora",
        }));
        if let (true, true, Some(b)) = (all, used[k] != used[0], &base_rel[used[k]]) {
            experts[k]["base"] = serde_json::Value::String(b.clone());
        }
        info_experts.push(RunExpert {
            file: format!("experts/expert-{k}.safetensors"),
            base: used[k],
            sigma_range: [lo, hi],
            steps: [ph.start, ph.end],
        });
    }
    let mut m = serde_json::json!({
        "format": "phasekit.run/1",
        "experts": experts,
        "shift": sched.shift,
        "steps": sched.steps(),
        "solver": "euler",
        "guidance": 1.0,
        "num_train_timesteps": 1000.0,
        "teacher_digests": digests,
        "recipe_digest": format!("sha256:{recipe_sha}"),
        "title": r.name,
        "latent": geo.latent,
    });
    if let Some(b) = base {
        m["base"] = serde_json::Value::String(b);
    }
    run::write_json(&out.join("manifest.json"), &m)?;
    let info = RunInfo {
        format: "phasekit-transformer-run/1".into(),
        name: r.name.clone(),
        model: r.model.clone(),
        family: family.to_string(),
        teachers: paths.iter().map(|p| abs(p).display().to_string()).collect(),
        expert_boundary: tc.expert_boundary,
        embeddings: emb_file.to_string(),
        task: r.task(),
        geometry: geo.clone(),
        steps: sched.steps(),
        shift: sched.shift,
        sigmas: sched.sigmas.clone(),
        teacher_guidance: r.teacher.guidance,
        dtype: tc.dtype.clone(),
        experts: info_experts,
        notes,
    };
    run::write_json(&out.join(INFO), &info)
}

fn link_or_copy(src: &Path, dst: &Path) -> Result<()> {
    #[cfg(unix)]
    if std::os::unix::fs::symlink(src, dst).is_ok() {
        return Ok(());
    }
    std::fs::copy(src, dst).with_file(dst)?;
    Ok(())
}

/// The device transformer runs compute on: the CPU unless a build with an accelerator picks another.
pub fn device() -> Device {
    DEVICE.get().cloned().unwrap_or(Device::Cpu)
}

static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();

/// Choose the device of transformer runs (`train --device`, `sample --device`), once per
/// process, before the run starts.
pub fn set_device(d: Device) {
    let _ = DEVICE.set(d);
}

/// Whether `dir` is a transformer run (has `transformer.json`).
pub fn is_transformer_run(dir: &Path) -> bool {
    dir.join(INFO).is_file()
}

/// A finished transformer run, opened for sampling.
pub struct TransformerRun {
    pub info: RunInfo,
    pub experts: Vec<Net>,
    pub emb: Embeddings,
    /// The dtype the base weights are held in (the run's `dtype`, or the one asked for).
    pub dtype: DType,
}

impl TransformerRun {
    /// Open `dir` with the base weights in the dtype the run trained in.
    pub fn open(dir: &Path, device: &Device) -> Result<TransformerRun> {
        TransformerRun::open_as(dir, None, device)
    }

    /// Open `dir` with the base weights held in `dtype` (f32, bf16 or f16; `None`: the run's own
    /// `dtype`). The LoRA experts stay f32, as the trainer keeps them.
    pub fn open_as(dir: &Path, dtype: Option<DType>, device: &Device) -> Result<TransformerRun> {
        let p = dir.join(INFO);
        let text = std::fs::read_to_string(&p).with_file(&p)?;
        let info: RunInfo = serde_json::from_str(&text).map_err(|e| Error::malformed(&p, e.to_string()))?;
        let dtype = match dtype {
            Some(d) => d,
            None => parse_dtype(&info.dtype)?,
        };
        let mut bases = Vec::new();
        for (i, t) in info.teachers.iter().enumerate() {
            if i == 1 && *t == info.teachers[0] {
                let v = bases.first().map(Net::base_view).expect("first base");
                bases.push(v);
            } else {
                bases.push(Net::open_as(Path::new(t), dtype, device)?);
            }
        }
        let emb_path = dir.join(&info.embeddings);
        let emb = Embeddings::load(&emb_path.display().to_string(), &bases[0], &[info.geometry.latent], Some(info.task), 0, device)?;
        let mut experts = Vec::new();
        for e in &info.experts {
            let mut n = bases.get(e.base).ok_or_else(|| Error::malformed(&p, "expert base index out of range"))?.base_view();
            n.load_lora_file(&dir.join(&e.file))?;
            n.set_img_shape(info.geometry.img_shape);
            n.set_null_text(emb.negative.clone());
            experts.push(n.frozen_view());
        }
        Ok(TransformerRun { info, experts, emb, dtype })
    }

    /// The expert routed for σ (its `[lo, hi)` holds σ; σ = 1 goes to the first).
    pub fn route(&self, sigma: f64) -> usize {
        self.info
            .experts
            .iter()
            .position(|e| sigma >= e.sigma_range[0] && (sigma < e.sigma_range[1] || e.sigma_range[1] >= 1.0))
            .unwrap_or(self.experts.len() - 1)
    }

    /// `n` latents (`[n, …item]`), sample `i` conditioned on prompt `i mod N`, Euler over the
    /// run's σ grid (or `steps` steps at its shift).
    pub fn sample(&self, n: usize, steps: Option<usize>, seed: u64) -> Result<Tensor> {
        self.sample_with(n, steps, seed, &self.info.geometry, &self.emb)
    }

    /// [`TransformerRun::sample`] at another latent shape or with other conditions.
    pub fn sample_with(&self, n: usize, steps: Option<usize>, seed: u64, geo: &Geometry, emb: &Embeddings) -> Result<Tensor> {
        let sig = match steps {
            None => self.info.sigmas.clone(),
            Some(k) => super::schedule::sigmas(k, self.info.shift),
        };
        sample_latents(&self.experts, &|s| self.route(s), &sig, geo, emb, n, seed)
    }
}

/// The routed few-step sampler: `n` latents `[n, …geo.item]` from `seed`'s noise, sample `i`
/// conditioned on prompt `i mod N`, Euler over `sigmas` (ending at 0) with step `i` by
/// `experts[route(sigmas[i])]`. `sample --run` and `sample --moe` both sample through this.
pub fn sample_latents(
    experts: &[Net],
    route: &dyn Fn(f64) -> usize,
    sigmas: &[f64],
    geo: &Geometry,
    emb: &Embeddings,
    n: usize,
    seed: u64,
) -> Result<Tensor> {
    for e in experts {
        e.set_img_shape(geo.img_shape);
    }
    let dev = emb.prompts.device().clone();
    let mut rng = Rng::new(seed);
    let z = dmd::noise_on(&mut rng, n, &geo.item, &dev).map_err(ce)?;
    let idx: Vec<u32> = (0..n).map(|i| (i % emb.count()) as u32).collect();
    sample_from(experts, route, sigmas, z, &emb.cond(&idx, geo.latent).map_err(ce)?)
}

/// [`sample_latents`] from the noise `z` and conditions `cond` (one per sample): Euler over
/// `sigmas`, step `i` by `experts[route(sigmas[i])]`; a first-frame image condition is written
/// over the result's first frame at the end, as diffusers' pipeline does.
pub fn sample_from(experts: &[Net], route: &dyn Fn(f64) -> usize, sigmas: &[f64], z: Tensor, cond: &Cond) -> Result<Tensor> {
    let mut x = z;
    for i in 0..sigmas.len() - 1 {
        x = dmd::euler(&experts[route(sigmas[i])], &x, sigmas[i], sigmas[i + 1], cond).map_err(ce)?;
    }
    cond.fill_fixed(&x).map_err(ce)
}
