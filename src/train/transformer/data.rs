//! What a transformer run trains on: precomputed conditions ([`Embeddings`]: prompt
//! embeddings, the negative, Qwen-Image prompt masks, image-to-video conditions) and the latent
//! shapes of its training resolutions ([`Geometry`]).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::net::Net;
use crate::error::{Error, Result};
use crate::model::denoiser::{Cond, ImageMode};
use crate::rng::Rng;
use crate::train::recipe::{Recipe, ResolutionSpace, Task, TransformerConfig};

type CResult<T> = candle_core::Result<T>;

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
            let p = Tensor::from_vec(rng.normals_f32(n * RANDOM_TOKENS * dim), (n, RANDOM_TOKENS, dim), dev)?;
            let q = Tensor::from_vec(rng.normals_f32(RANDOM_TOKENS * dim), (1, RANDOM_TOKENS, dim), dev)?;
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
        let (t, _) = crate::train::rundir::read_tensors_f32(path)?;
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
            Some(x) => Some(x.to_device(dev)?),
            None => None,
        };
        let mut names: Vec<&String> =
            t.keys().filter(|k| *k == IMAGE_CONDITION || k.strip_prefix(IMAGE_CONDITION).is_some_and(|r| r.starts_with('.'))).collect();
        names.sort();
        let given: Vec<&Tensor> = names.iter().map(|k| &t[*k]).collect();
        let image = match (wants(!given.is_empty()).map_err(|e| e.with_path(path))?, given.is_empty(), mode) {
            (true, false, Some(m)) => {
                let sets = given.iter().map(|x| x.to_device(dev)).collect::<CResult<Vec<_>>>()?;
                let n = prompts.dim(0)?;
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
        let e = Embeddings { prompts: prompts.to_device(dev)?, negative, image, mask: mask.map(|m| m.to_device(dev)).transpose()? };
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
    let (n, l) = (prompts.dim(0)?, prompts.dim(1)?);
    if m.dims() != [n, l] {
        return Err(bad(format!("is {:?}, prompt_embeds needs [{n}, {l}]", m.dims())));
    }
    let m = m.to_dtype(DType::F32)?;
    let v = m.flatten_all().and_then(|x| x.to_vec1::<f32>())?;
    if v.iter().any(|x| *x != 0.0 && *x != 1.0) {
        return Err(bad("holds values other than 0 and 1".into()));
    }
    if let Some(r) = v.chunks(l).position(|row| row.iter().all(|x| *x == 0.0)) {
        return Err(bad(format!("row {r} masks every token")));
    }
    match net {
        Net::Qwen(..) => Ok(Some(m)),
        Net::Wan(_) => {
            let pad = prompts.broadcast_mul(&(1.0 - &m)?.unsqueeze(2)?)?;
            let max = pad.abs().and_then(|x| x.max_all()).and_then(|x| x.to_scalar::<f32>())?;
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
            let lat = Tensor::from_vec(rng.normals_f32(n * out * f * h * w), (n, out, f, h, w), dev)?;
            let mut m = vec![0f32; n * masks * f * h * w];
            for (i, v) in m.iter_mut().enumerate() {
                if (i / (h * w)) % f == 0 {
                    *v = 1.0;
                }
            }
            let m = Tensor::from_vec(m, (n, masks, f, h, w), dev)?;
            Tensor::cat(&[&m, &lat], 1)
        }
    };
    t.map_err(Error::from)
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
