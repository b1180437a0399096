//! Sampling a trained transformer run ([`TransformerRun`], `sample --run`) or a routed checkpoint
//! of transformer experts ([`RoutedTransformer`], `sample --moe`) with one few-step sampler
//! ([`sample_latents`]).
//!
//! A routed checkpoint's full experts are models built from their own tensors (`shared.`,
//! `experts.<i>.`, aliases); each base LoRA experts apply to (`base.`, or `bases.<j>.` for a
//! routing row with `base: j`) is built once, and each LoRA expert is a view of its own base with
//! the expert's adapters attached, exactly as the trainer computes it, so a run and its
//! assembled checkpoint sample the same latents bit for bit. Tensors stay in the memory map
//! until a module asks for one.
//!
//! The experts compute in f32, bf16 or f16 (`sample --dtype`): the weights (full experts and
//! LoRA bases) are decoded to that dtype, the adapters stay f32, and the sampler's state (noise,
//! latents, Euler updates) stays f32 whatever the experts' dtype.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::data::{latent_geometry, Embeddings, Geometry};
use super::net::{parse_dtype, Net};
use super::outputs::{RunInfo, INFO};
use crate::error::{clean, Error, IoContext, Kind, Result};
use crate::model::denoiser::Cond;
use crate::model::weights::Weights;
use crate::moe::format::{lora_part, KEY_SAMPLE};
use crate::moe::loader::{decode, MoeCheckpoint};
use crate::moe::routing::{ExpertKind, Routing};
use crate::rng::Rng;
use crate::store::Checkpoint;
use crate::train::dmd;
use crate::train::schedule;

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
        let ranges: Vec<(f64, f64)> = self.info.experts.iter().map(|e| (e.sigma_range[0], e.sigma_range[1])).collect();
        schedule::route(&ranges, sigma).unwrap_or(self.experts.len() - 1)
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
            Some(k) => schedule::sigmas(k, self.info.shift),
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
    let z = dmd::noise_on(&mut rng, n, &geo.item, &dev)?;
    let idx: Vec<u32> = (0..n).map(|i| (i % emb.count()) as u32).collect();
    sample_from(experts, route, sigmas, z, &emb.cond(&idx, geo.latent)?)
}

/// [`sample_latents`] from the noise `z` and conditions `cond` (one per sample): Euler over
/// `sigmas`, step `i` by `experts[route(sigmas[i])]`; a first-frame image condition is written
/// over the result's first frame at the end, as diffusers' pipeline does.
pub fn sample_from(experts: &[Net], route: &dyn Fn(f64) -> usize, sigmas: &[f64], z: Tensor, cond: &Cond) -> Result<Tensor> {
    let mut x = z;
    for i in 0..sigmas.len() - 1 {
        x = dmd::euler(&experts[route(sigmas[i])], &x, sigmas[i], sigmas[i + 1], cond)?;
    }
    cond.fill_fixed(&x).map_err(Error::from)
}

/// A routed checkpoint of transformer experts, opened for sampling.
pub struct RoutedTransformer {
    pub path: PathBuf,
    pub routing: Routing,
    /// `wan22` or `qwen_image`.
    pub family: String,
    /// One model per expert, in routing order (frozen views).
    pub experts: Vec<Net>,
    /// `phasekit.moe.sample`'s latent size `[frames, height, width]`, when the file has one.
    pub latent: Option<[usize; 3]>,
}

impl RoutedTransformer {
    /// Open `path` with the experts' weights held in `dtype` (f32, bf16 or f16; see
    /// docs/models.md#dtype: activations and norms stay f32) and their LoRA adapters in f32, as
    /// the trainer keeps them; a checkpoint that is not of a transformer family is refused (exit 7).
    pub fn open(path: &Path, dtype: DType, device: &Device) -> Result<RoutedTransformer> {
        let m = MoeCheckpoint::open(path)?;
        let model = &m.meta().model;
        let family = match model.family.as_deref() {
            Some(f @ ("wan22" | "qwen_image")) => f.to_string(),
            _ => {
                let what = model.family.clone().or(model.kind.clone()).unwrap_or_else(|| "unknown".into());
                return Err(Error::at(Kind::Unsupported, path, format!("not a Wan2.2 or Qwen-Image checkpoint (model {what})")));
            }
        };
        let index: HashMap<&str, usize> = m.checkpoint().tensors.iter().enumerate().map(|(i, t)| (t.name.as_str(), i)).collect();
        // The model of one parameter set (param → stored name), from its own mapping of the file.
        let weights = |params: &BTreeMap<String, String>| -> Result<Weights> {
            let entries = params.iter().map(|(p, s)| (p.clone(), index[s.as_str()])).collect();
            Weights::from_entries(Checkpoint::open(path)?, entries, model.config.clone(), dtype, device)
        };
        let mut bases: HashMap<usize, (Weights, Net)> = HashMap::new();
        let mut experts = Vec::new();
        for i in 0..m.num_experts() {
            let net = match m.kind(i) {
                ExpertKind::Full => Net::from_weights(&weights(&m.expert_params(i))?)?,
                ExpertKind::Lora => {
                    let j = m.expert_base(i);
                    if let std::collections::hash_map::Entry::Vacant(v) = bases.entry(j) {
                        let w = weights(&m.base_params(i))?;
                        let net = Net::from_weights(&w)?;
                        v.insert((w, net));
                    }
                    let (w, base) = &bases[&j];
                    let mut net = base.base_view();
                    net.attach_lora_tensors(&lora_tensors(&m, i, w, device)?, path)
                        .map_err(|e| e.context(format!("expert {i} ({})", m.routing().experts[i].name)))?;
                    net
                }
            };
            experts.push(net.frozen_view());
        }
        let latent = m
            .meta()
            .extra
            .iter()
            .find(|(k, _)| k == KEY_SAMPLE)
            .map(|(_, v)| {
                let v: serde_json::Value = serde_json::from_str(v).map_err(|e| Error::malformed(path, format!("{KEY_SAMPLE}: {e}")))?;
                serde_json::from_value::<[usize; 3]>(v["latent"].clone())
                    .map_err(|e| Error::malformed(path, format!("{KEY_SAMPLE} latent is not [frames, height, width]: {e}")))
            })
            .transpose()?;
        Ok(RoutedTransformer { path: path.into(), routing: m.routing().clone(), family, experts, latent })
    }

    /// The expert whose stored σ range holds σ (`expert_for_sigma`).
    pub fn route(&self, sigma: f64) -> usize {
        self.routing.expert_for_sigma(sigma).unwrap_or(self.experts.len() - 1)
    }

    /// The latent shape of one sample: `latent`'s entries where given, else the stored
    /// `phasekit.moe.sample` size's.
    pub fn geometry(&self, latent: [Option<usize>; 3]) -> Result<Geometry> {
        let mut l = [0; 3];
        for (k, (given, what)) in latent.iter().zip(["--frames", "--height", "--width"]).enumerate() {
            l[k] = given.or(self.latent.map(|s| s[k])).ok_or_else(|| {
                Error::usage(format!("{} has no stored latent size (phasekit.moe.sample): give {what}", self.path.display()))
            })?;
        }
        latent_geometry(&self.experts[0], l)
    }

    /// `n` latents, Euler over the checkpoint's σ grid (or `steps` steps at its shift), each
    /// step by the expert `expert_for_sigma` routes its σ to.
    pub fn sample(&self, n: usize, steps: Option<usize>, seed: u64, geo: &Geometry, emb: &Embeddings) -> Result<Tensor> {
        let sig = schedule::sigmas(steps.unwrap_or(self.routing.steps as usize), self.routing.shift);
        sample_latents(&self.experts, &|s| self.route(s), &sig, geo, emb, n, seed)
    }

    /// Width of the text embeddings the experts take.
    pub fn text_dim(&self) -> usize {
        self.experts[0].text_dim()
    }
}

/// Expert `i`'s LoRA tensors in f32 under diffusers module names (`<module>.lora_down.weight`, ...).
fn lora_tensors(m: &MoeCheckpoint, i: usize, base: &Weights, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (param, stored) in m.expert_params(i) {
        let (target, part) = lora_part(&param)
            .ok_or_else(|| Error::inconsistent(&m.checkpoint().path, format!("'{}' is not a LoRA tensor", clean(&param))))?;
        let module =
            base.diffusers_name(&format!("{target}.weight")).and_then(|n| n.strip_suffix(".weight").map(str::to_string)).ok_or_else(
                || Error::inconsistent(&m.checkpoint().path, format!("LoRA target '{}' is no weight of the model", clean(target))),
            )?;
        let raw = m.raw(&stored)?;
        let shape: Vec<usize> = raw.shape.iter().map(|&d| d as usize).collect();
        let t = Tensor::from_vec(decode(&raw)?, shape, device)?;
        out.insert(format!("{module}{}", part.suffix()), t);
    }
    Ok(out)
}
