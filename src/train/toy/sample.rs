//! A finished toy run, and a routed checkpoint of toy experts, opened for sampling; the files
//! they read (`toy.json`, written by the toy trainer; the `toy-mlp` model config of an
//! assembled checkpoint).
//!
//! Both sample through one routed sampler (noise and classes from a seed, one step of the
//! run's solver per σ interval, each by the expert whose σ range holds it), so a run and the
//! checkpoint assembled from it draw the same samples bit for bit.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::mlp::{class_cond, Mlp, MlpConfig};
use crate::error::{Error, IoContext, Kind, Result};
use crate::hash::sha256_hex;
use crate::model::denoiser::Denoiser;
use crate::rng::Rng;
use crate::train::dmd;
use crate::train::mixture::{Mixture, MixtureConfig};
use crate::train::schedule::{self, Rollout};

/// One expert in the manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExpertEntry {
    pub index: usize,
    pub file: String,
    pub sha256: String,
    /// Routed σ range [lo, hi) (the first expert's range includes σ = 1).
    pub sigma_range: [f64; 2],
    /// σ of the phase boundary the expert lands on.
    pub boundary_sigma: f64,
    /// Steps [start, end) of the step list it runs.
    pub steps: [usize; 2],
    /// Timesteps (1000σ) it is evaluated at.
    pub timesteps: Vec<f64>,
}

/// `toy.json`: what `sample --run` and the plots need (runs before the assembler existed wrote
/// it as `manifest.json`, which `LoadedRun::open` still reads).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub name: String,
    pub model: String,
    pub method: String,
    pub steps: usize,
    pub shift: f64,
    pub solver: String,
    pub sigmas: Vec<f64>,
    pub timesteps: Vec<f64>,
    /// Guidance the distilled experts are meant to be sampled with.
    pub inference_guidance: f64,
    pub teacher: TeacherEntry,
    pub recipe_sha256: String,
    pub mixture: MixtureConfig,
    pub mlp: MlpConfig,
    pub experts: Vec<ExpertEntry>,
}

/// Format tag of `toy.json`.
pub const TOY_FORMAT: &str = "phasekit-toy-run/1";
/// The toy run's own manifest file.
pub const TOY_INFO: &str = "toy.json";

/// What a routed checkpoint of toy experts needs besides their weights: stored as the
/// `config` of model kind `toy-mlp` (`phasekit.moe.model`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToyModelConfig {
    /// The run's method (e.g. `Phased DMD 4-step 4-phase`).
    pub method: String,
    pub mixture: MixtureConfig,
    pub mlp: MlpConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TeacherEntry {
    pub kind: String,
    pub file: String,
    pub sha256: String,
    pub guidance: f64,
}

/// A finished run, opened for sampling.
pub struct LoadedRun {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub mixture: Mixture,
    pub experts: Vec<Mlp>,
}

impl LoadedRun {
    pub fn open(dir: &Path) -> Result<LoadedRun> {
        let mut mp = dir.join(TOY_INFO);
        if !mp.is_file() {
            // Runs from before the assembler wrote their toy manifest as manifest.json.
            mp = dir.join("manifest.json");
        }
        let text = std::fs::read_to_string(&mp).with_file(&mp)?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| Error::malformed(&mp, format!("not a toy run manifest: {e}")))?;
        if manifest.format != TOY_FORMAT && manifest.format != "phasekit-run/1" {
            return Err(Error::at(Kind::Unsupported, &mp, format!("toy run manifest format '{}' is not {TOY_FORMAT}", manifest.format)));
        }
        let mixture = Mixture::new(&manifest.mixture)?;
        let mut experts = Vec::new();
        for e in &manifest.experts {
            let p = dir.join(&e.file);
            let bytes = std::fs::read(&p).with_file(&p)?;
            if sha256_hex(&bytes) != e.sha256 {
                return Err(Error::integrity(&p, "expert file does not match the sha256 in manifest.json"));
            }
            experts.push(Mlp::load(&p, &manifest.mlp, mixture.dim, mixture.classes)?.frozen());
        }
        Ok(LoadedRun { dir: dir.into(), manifest, mixture, experts })
    }

    /// The expert routed for σ: the one whose [lo, hi) holds σ (σ = 1 goes to the first).
    pub fn route(&self, sigma: f64) -> usize {
        let ranges: Vec<(f64, f64)> = self.manifest.experts.iter().map(|e| (e.sigma_range[0], e.sigma_range[1])).collect();
        schedule::route(&ranges, sigma).unwrap_or(self.experts.len() - 1)
    }

    /// The σ grid for `steps` (the run's own when `None`).
    pub fn sigmas(&self, steps: Option<usize>) -> Vec<f64> {
        match steps {
            None => self.manifest.sigmas.clone(),
            Some(k) => schedule::sigmas(k, self.manifest.shift),
        }
    }

    /// Draw `n` samples; `class = None` draws classes from the prior. Returns `[n, dim]`.
    pub fn sample(&self, n: usize, steps: Option<usize>, seed: u64, class: Option<u32>) -> Result<Tensor> {
        Ok(self.trajectory(n, steps, seed, class)?.pop().expect("at least one state"))
    }

    /// States at every σ of the grid (`[0]` is the noise, the last is the sample), stepped by the
    /// run's `solver`.
    pub fn trajectory(&self, n: usize, steps: Option<usize>, seed: u64, class: Option<u32>) -> Result<Vec<Tensor>> {
        let rule = solver_rule(&self.manifest.solver, &self.dir)?;
        routed_trajectory(&self.experts, &|s| self.route(s), &self.mixture, &self.sigmas(steps), n, seed, class, rule)
    }
}

/// The step rule a manifest's `solver` names (`euler`, `x0-renoise`); others are refused (exit 7).
fn solver_rule(solver: &str, path: &Path) -> Result<Rollout> {
    Rollout::from_solver(solver).ok_or_else(|| {
        Error::at(
            Kind::Unsupported,
            path,
            format!("solver '{}' is not one the toy sampler runs (euler, x0-renoise)", crate::error::clean(solver)),
        )
    })
}

/// The routed sampler shared by run folders and routed checkpoints: noise and classes from
/// `seed`, then one step of `rule` per interval of `sig`, each by the expert `route(σ)` picks
/// (`x0-renoise` draws each step's fresh noise from the same generator, after the classes).
#[allow(clippy::too_many_arguments)]
fn routed_trajectory(
    experts: &[Mlp],
    route: &dyn Fn(f64) -> usize,
    mixture: &Mixture,
    sig: &[f64],
    n: usize,
    seed: u64,
    class: Option<u32>,
    rule: Rollout,
) -> Result<Vec<Tensor>> {
    let mut rng = Rng::new(seed);
    let z = dmd::noise(&mut rng, n, &[mixture.dim])?;
    let cls = match class {
        Some(c) => vec![c; n],
        None => mixture.sample_classes(n, &mut rng),
    };
    let cond = class_cond(cls)?;
    let mut out = vec![z.clone()];
    let mut x = z;
    for i in 0..sig.len() - 1 {
        x = dmd::step(&experts[route(sig[i])], &x, sig[i], sig[i + 1], &cond, rule, &mut rng)?;
        out.push(x.clone());
    }
    Ok(out)
}

/// A routed `phasekit.moe/1` checkpoint of toy experts, opened for sampling through the loader
/// (`MoeCheckpoint`): experts rebuilt from their stored tensors, σ routed by the stored table.
pub struct LoadedMoe {
    pub path: PathBuf,
    pub routing: crate::moe::routing::Routing,
    pub config: ToyModelConfig,
    pub mixture: Mixture,
    pub experts: Vec<Mlp>,
}

impl LoadedMoe {
    /// Open a checkpoint; one whose model is not of kind `toy-mlp` is refused (exit 7).
    pub fn open(path: &Path) -> Result<LoadedMoe> {
        use crate::moe::format::KIND_TOY_MLP;
        let m = crate::moe::loader::MoeCheckpoint::open(path)?;
        let model = &m.meta().model;
        if model.kind.as_deref() != Some(KIND_TOY_MLP) {
            let what = model.family.clone().or(model.kind.clone()).unwrap_or_else(|| "unknown".into());
            return Err(Error::at(
                Kind::Unsupported,
                path,
                format!("not a toy checkpoint (model kind {KIND_TOY_MLP}) but {what}; transformer checkpoints open with train::routed::RoutedTransformer"),
            ));
        }
        let cfg = model.config.clone().ok_or_else(|| Error::malformed(path, "toy-mlp checkpoint has no model config"))?;
        let config: ToyModelConfig =
            serde_json::from_value(cfg).map_err(|e| Error::malformed(path, format!("toy-mlp model config is not valid: {e}")))?;
        let mixture = Mixture::new(&config.mixture)?;
        let mut experts = Vec::new();
        for i in 0..m.num_experts() {
            let mut t = Vec::new();
            for name in m.weight_names(i) {
                let (shape, w) = m.weight_f32(i, &name, true)?;
                let shape: Vec<usize> = shape.iter().map(|d| *d as usize).collect();
                t.push((name, Tensor::from_vec(w, shape, &Device::Cpu)?));
            }
            t.sort_by_key(|(n, _)| super::mlp::mlp_order(n));
            let mlp = Mlp::from_tensors(&config.mlp, mixture.dim, mixture.classes, t)
                .map_err(|e| Error::inconsistent(path, format!("expert {i} does not fit its toy-mlp config: {e}")))?;
            experts.push(mlp.frozen());
        }
        Ok(LoadedMoe { path: path.into(), routing: m.routing().clone(), config, mixture, experts })
    }

    /// The expert whose stored σ range holds σ (`expert_for_sigma`).
    pub fn route(&self, sigma: f64) -> usize {
        self.routing.expert_for_sigma(sigma).unwrap_or(self.experts.len() - 1)
    }

    /// The σ grid for `steps` (the checkpoint's step count when `None`) at the stored shift,
    /// ending at 0.
    pub fn sigmas(&self, steps: Option<usize>) -> Vec<f64> {
        schedule::sigmas(steps.unwrap_or(self.routing.steps as usize), self.routing.shift)
    }

    /// Draw `n` samples (`[n, dim]`); the same seed gives the same samples as `LoadedRun::sample`
    /// on the run the checkpoint was assembled from, bit for bit.
    pub fn sample(&self, n: usize, steps: Option<usize>, seed: u64, class: Option<u32>) -> Result<Tensor> {
        Ok(self.trajectory(n, steps, seed, class)?.pop().expect("at least one state"))
    }

    /// States at every σ of the grid, stepped by the stored routing's `solver`.
    pub fn trajectory(&self, n: usize, steps: Option<usize>, seed: u64, class: Option<u32>) -> Result<Vec<Tensor>> {
        let rule = solver_rule(&self.routing.solver, &self.path)?;
        routed_trajectory(&self.experts, &|s| self.route(s), &self.mixture, &self.sigmas(steps), n, seed, class, rule)
    }
}

/// Sample a denoiser (the teacher) with `steps` Euler steps at `shift`.
pub fn sample_denoiser(d: &dyn Denoiser, mix: &Mixture, n: usize, steps: usize, shift: f64, seed: u64) -> Result<Tensor> {
    let sig = schedule::sigmas(steps, shift);
    let mut rng = Rng::new(seed);
    let z = dmd::noise(&mut rng, n, &[mix.dim])?;
    let cond = class_cond(mix.sample_classes(n, &mut rng))?;
    let by: Vec<&dyn Denoiser> = vec![d; steps];
    Ok(dmd::sample(&by, &sig, z, &cond)?)
}

/// Load a teacher file written by a run.
pub fn load_teacher(path: &Path, cfg: &MlpConfig, mix: &Mixture) -> Result<Mlp> {
    Ok(Mlp::load(path, cfg, mix.dim, mix.classes)?.frozen())
}
