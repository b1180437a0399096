//! Recipes: one TOML file holds everything a run needs. Every field has a default; unknown
//! fields are errors (a typo must not silently fall back to a default). `docs/recipes.md`
//! documents each field; the doc comments below are the source of that page.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::mixture::MixtureConfig;
use super::schedule::{Renoise, Rollout, Schedule};
use super::toy::mlp::MlpConfig;
use crate::error::{Error, IoContext, Result};

/// A whole recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Recipe {
    /// Free-form name, copied into logs and the manifest.
    pub name: String,
    /// `toy` (the embedded mixture + MLP), or a transformer family: `wan2.2-t2v-a14b`,
    /// `wan2.2-i2v-a14b`, `wan2.2-ti2v-5b`, `wan2.1-t2v-14b`, `qwen-image` (these need the
    /// transformer denoisers).
    pub model: String,
    /// Seed of the run's generator (initialisation, noise, classes, timesteps).
    pub seed: u64,
    pub mixture: MixtureConfig,
    pub mlp: MlpConfig,
    pub teacher: TeacherConfig,
    pub schedule: ScheduleConfig,
    pub train: TrainConfig,
    /// Settings only transformer recipes use.
    pub transformer: Option<TransformerConfig>,
}

impl Default for Recipe {
    fn default() -> Self {
        Recipe {
            name: "toy".into(),
            model: "toy".into(),
            seed: 0,
            mixture: MixtureConfig::default(),
            mlp: MlpConfig::default(),
            teacher: TeacherConfig::default(),
            schedule: ScheduleConfig::default(),
            train: TrainConfig::default(),
            transformer: None,
        }
    }
}

/// What the real score is (recipe section `[teacher]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TeacherConfig {
    /// `mlp`: the flow-matching MLP teacher is the real score; `exact`: the analytic mixture
    /// velocity is (the generator and fake still start from the MLP teacher's weights).
    pub kind: TeacherKind,
    /// Teacher MLP weights (safetensors written by an earlier run or `quickstart`); relative to
    /// the recipe file. When absent the run pretrains the teacher itself (`pretrain`) and
    /// saves it as `RUN_DIR/teacher.safetensors`.
    pub checkpoint: Option<PathBuf>,
    /// Classifier-free guidance scale of the teacher during distillation (1 = none). The fake
    /// score always uses the plain condition.
    pub guidance: f64,
    /// A two-expert teacher's guidance scale per expert, `[high_noise, low_noise]` (the order of
    /// `[transformer] experts`); each sample is guided by the scale of the expert that serves its
    /// re-noise level. Empty: `guidance` for both. The official Wan2.2 configs sample T2V-A14B
    /// with 4.0 (high noise) and 3.0 (low noise), I2V-A14B with 3.5 and 3.5.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub guidance_experts: Vec<f64>,
    pub pretrain: PretrainConfig,
}

impl Default for TeacherConfig {
    fn default() -> Self {
        TeacherConfig {
            kind: TeacherKind::Mlp,
            checkpoint: None,
            guidance: 1.0,
            guidance_experts: Vec::new(),
            pretrain: PretrainConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TeacherKind {
    Mlp,
    Exact,
}

/// Flow-matching pretraining of the MLP teacher on mixture samples (`[teacher.pretrain]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainConfig {
    /// Optimiser steps.
    pub steps: u64,
    /// Samples per step.
    pub batch: usize,
    /// Peak learning rate (AdamW β = (0.9, 0.999)); decays linearly to 0 over the second half.
    pub lr: f64,
    /// Probability that a sample's class is replaced by the null class (so CFG works).
    pub cond_dropout: f64,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        PretrainConfig { steps: 1500, batch: 256, lr: 2e-3, cond_dropout: 0.1 }
    }
}

/// Steps, phases and re-noise intervals (`[schedule]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Sampling steps N of the student.
    pub steps: usize,
    /// Timestep shift s (σ' = sσ/(1+(s−1)σ)); Wan2.2 uses 5, Qwen-Image 3.
    pub shift: f64,
    /// Step indices where phases end (each phase trains one expert); the last must be `steps`.
    /// Empty: one phase per step. `[steps]`: a single phase (DMD2 / one-step / vanilla DMD).
    pub phases: Vec<usize>,
    /// Stochastic-gradient truncated sampling inside a phase with several steps: one random
    /// step of the phase carries the gradient, earlier ones run without it.
    pub sgts: bool,
    /// `last`: gradient through one step (SGTS or the phase's single step); `all`: vanilla
    /// few-step DMD, backpropagating through every step of the phase.
    pub backprop: Backprop,
    /// `nested`: t ~ U(s, 1] before the shift (reverse nested intervals, the paper);
    /// `disjoint`: t ~ U(s, t_start] (the App. C.2 ablation).
    pub renoise: Renoise,
    /// Which samples train the fake score: `sgts` (the same truncated rollouts that the
    /// generator update uses, as DMD2's code does) or `full` (always the phase's last step).
    pub fake_samples: FakeSamples,
    /// How the generator's steps before the gradient step run, and how a run is sampled:
    /// `euler` (deterministic Euler, the paper's solver) or `x0-renoise` (predict x̂₀ = x − σ·v and
    /// re-noise it to the next step's σ with fresh noise, as DMD2's code trains and samples; the
    /// gradient step of a phase ending at s > 0 re-noises its x̂₀ to s the same way). Recorded as
    /// the run's `solver`, which `sample --run` and assembled checkpoints follow. Toy only.
    #[serde(skip_serializing_if = "Rollout::is_euler")]
    pub rollout: Rollout,
    /// A fixed re-noise level t (σ as the models see it, after the shift) for every re-noise of
    /// every phase, generator and fake updates alike, instead of drawing t from the phase's
    /// interval: the paper's fixed-t DMD ablation (App. C.2: t = 0.357 fails, t = 0.882 works).
    /// Must lie above every phase's boundary σ (and inside `phase1_t_range` when that is set).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renoise_fixed: Option<f64>,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            steps: 4,
            shift: 1.0,
            phases: Vec::new(),
            sgts: false,
            backprop: Backprop::Last,
            renoise: Renoise::Nested,
            fake_samples: FakeSamples::Sgts,
            rollout: Rollout::Euler,
            renoise_fixed: None,
        }
    }
}

impl ScheduleConfig {
    pub fn build(&self) -> Result<Schedule> {
        Schedule::new(self.steps, self.shift, &self.phases)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backprop {
    Last,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FakeSamples {
    Sgts,
    Full,
}

/// The fake score's regression target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FakeObjective {
    /// Eq. 11/13: the subinterval target, weighted by clamp(1/σ²_{t|s}, 0, clamp_max)·σ²_{t|s}.
    Subinterval,
    /// The biased ablation ‖ψ − (ε − x_s)‖² (unweighted).
    Naive,
}

/// The per-sample weight of the fake score's loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FakeWeight {
    /// Eq. 13: clamp(1/σ²_{t|s}, 0, fake_clamp_max)·σ²_{t|s} = min(1, fake_clamp_max·σ²_{t|s}).
    #[default]
    Eq13,
    /// Every sample weighs 1: DMD2's plain MSE (its fake loss is mean‖F − (ε − x̂₀)‖², which is the
    /// subinterval target at s = 0 without Eq. 13's weight).
    None,
}

impl FakeWeight {
    pub fn is_eq13(&self) -> bool {
        *self == FakeWeight::Eq13
    }
}

/// How the generator's distribution-matching gradient is weighted per sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GeneratorWeight {
    /// DMD2's normaliser: `(x̂₀_fake − x̂₀_teacher) / mean|x̂₀ − x̂₀_teacher|` per sample.
    #[default]
    Dmd2,
    /// Eq. 10's own weight: `w_{t|s}·(v_teacher − v_fake)` with
    /// `w_{t|s} = α_t·α_{t|s}/(α_t·σ_t + σ_t²) = (1−t)²/((1−s)·t)`, no normaliser.
    Eq10,
}

impl GeneratorWeight {
    pub fn is_dmd2(&self) -> bool {
        *self == GeneratorWeight::Dmd2
    }
}

/// Optimisation (`[train]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Generator updates per phase.
    pub updates_per_phase: u64,
    /// Per-phase override of `updates_per_phase` (one entry per phase).
    pub updates: Vec<u64>,
    /// Samples per update (generator and fake).
    pub batch: usize,
    /// Generator learning rate.
    pub gen_lr: f64,
    /// Fake-score learning rate.
    pub fake_lr: f64,
    /// AdamW β₁ and β₂ (the paper: 0 and 0.999).
    pub betas: [f64; 2],
    /// AdamW ε.
    pub eps: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip (0: none).
    pub grad_clip: f64,
    /// Fake-score updates per generator update (TTUR).
    pub ttur: u32,
    pub fake_objective: FakeObjective,
    /// Upper clamp of 1/σ²_{t|s} in Eq. 13.
    pub fake_clamp_max: f64,
    /// Per-sample weight of the fake loss: `eq13` (the paper's, with `fake_clamp_max`) or `none`
    /// (DMD2's plain MSE; the DMD2 and one-step baselines). The naive target is always unweighted.
    #[serde(skip_serializing_if = "FakeWeight::is_eq13")]
    pub fake_weight: FakeWeight,
    /// Weighting of the generator's gradient: `dmd2` (DMD2's normaliser, what the paper says it
    /// follows) or `eq10` (Eq. 10's `w_{t|s}`).
    #[serde(skip_serializing_if = "GeneratorWeight::is_dmd2")]
    pub generator_weight: GeneratorWeight,
    /// Lower clamp of the DMD2 normaliser mean|x̂₀ − x̂₀_teacher|.
    pub norm_min: f64,
    /// Re-initialise the fake score from the teacher at each phase start (the paper); false
    /// keeps training the previous phase's fake.
    pub fake_reinit: bool,
    /// Write a checkpoint every this many generator updates (0: only at phase ends).
    pub checkpoint_every: u64,
    /// Checkpoints kept (older ones are deleted).
    pub keep_checkpoints: usize,
    /// Log a JSONL line every this many generator updates.
    pub log_every: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            updates_per_phase: 500,
            updates: Vec::new(),
            batch: 256,
            gen_lr: 2e-4,
            fake_lr: 4e-4,
            betas: [0.0, 0.999],
            eps: 1e-8,
            weight_decay: 0.0,
            grad_clip: 1.0,
            ttur: 5,
            fake_objective: FakeObjective::Subinterval,
            fake_clamp_max: 10.0,
            fake_weight: FakeWeight::Eq13,
            generator_weight: GeneratorWeight::Dmd2,
            norm_min: 1e-4,
            fake_reinit: true,
            checkpoint_every: 100,
            keep_checkpoints: 3,
            log_every: 10,
        }
    }
}

/// Transformer-only settings (`[transformer]`), recorded for the Wan2.2 / Qwen-Image recipes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransformerConfig {
    /// Teacher checkpoint folder (a Wan2.2 repo folder or a diffusers transformer folder).
    pub checkpoint: String,
    /// safetensors file of precomputed prompt embeddings plus the negative embedding.
    pub embeddings: String,
    /// σ boundary between a two-expert teacher's high- and low-noise models (Wan2.2 A14B:
    /// 0.875 T2V, 0.9 I2V); none for dense teachers.
    pub expert_boundary: Option<f64>,
    /// Re-noise range of phase 1, clamped to the high-noise expert (App. B), as [lo, hi].
    pub phase1_t_range: Option<[f64; 2]>,
    /// Generator LoRA rank (≥ 1; a full-weight transformer generator is not supported yet).
    pub lora_rank: usize,
    /// Generator LoRA alpha.
    pub lora_alpha: f64,
    /// Teacher expert checkpoints `[high_noise, low_noise]` of a two-expert teacher, overriding
    /// `checkpoint/high_noise_model` and `checkpoint/low_noise_model`; relative to the recipe
    /// file. Two equal paths load one model that serves as both experts (the tiny recipe).
    pub experts: Vec<String>,
    /// Training resolutions (frames, height, width) and their relative weights (empty: equal);
    /// each iteration draws one.
    pub resolutions: Vec<[usize; 3]>,
    pub resolution_weights: Vec<f64>,
    /// `pixel`: `resolutions` are video/image sizes, divided by `vae_stride` (frames as
    /// `(F − 1)/stride + 1`); `latent`: they are latent frames, height and width already.
    pub resolution_space: ResolutionSpace,
    /// VAE downsampling (frames, height, width); default by model: Wan2.2 A14B `[4, 8, 8]`,
    /// TI2V-5B `[4, 16, 16]`, Qwen-Image `[1, 8, 8]`.
    pub vae_stride: Option<[usize; 3]>,
    /// Fake score: `lora` (teacher base + a fresh zero-`up` LoRA per phase, rank
    /// `fake_lora_rank`) or `full` (every weight of a copy of the teacher expert trains, the
    /// paper's setting; costs one full copy of the weights per fake).
    pub fake: FakeKind,
    pub fake_lora_rank: usize,
    pub fake_lora_alpha: f64,
    /// Linear layers that get LoRA adapters (glob patterns over diffusers module names);
    /// empty: every attention projection and FFN linear.
    pub lora_targets: Vec<String>,
    /// Storage dtype of the shared base weights: `f32`, `bf16` or `f16`. Base weights are
    /// multiplied as they are stored (bf16 × bf16 with f32 accumulation on CUDA; widened a block
    /// of rows at a time on the CPU); adapters, full-parameter fakes and optimiser states stay
    /// f32.
    pub dtype: String,
    /// Dtype of the residual stream and of the activations the blocks keep for the backward
    /// pass: `f32`, `bf16` or `f16`; unset: the weights' `dtype` (as a bf16 PyTorch model runs;
    /// norms, softmax, RoPE and residual adds compute in f32 and round once). `f32` with bf16
    /// weights doubles the activation memory for a more precise residual stream.
    pub activations: Option<String>,
    /// Activation checkpointing: keep only each transformer block's input during a forward pass
    /// with gradients and recompute the block in the backward pass (same results; about one
    /// more forward pass of compute for much less memory). On by default.
    pub recompute_blocks: bool,
    /// With `recompute_blocks`: recompute each block's segments on their own too (Wan2.2:
    /// self-attention, cross-attention, FFN; Qwen-Image: joint attention, MLPs), so that the
    /// backward pass holds one segment's graph at a time instead of a block's. Costs one more
    /// forward pass of every block; for runs the memory plan says do not fit otherwise.
    pub recompute_segments: bool,
    /// `t2v` (text only) or `i2v` (every prompt comes with a first-frame image condition,
    /// `image_condition` in the embeddings file); default by model: `i2v` for
    /// `wan2.2-i2v-a14b`, `t2v` otherwise. `wan2.2-ti2v-5b` takes either.
    pub task: Option<Task>,
}

/// What a transformer run generates from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    T2v,
    I2v,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResolutionSpace {
    Pixel,
    Latent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FakeKind {
    Lora,
    Full,
}

impl Default for TransformerConfig {
    fn default() -> Self {
        TransformerConfig {
            checkpoint: String::new(),
            embeddings: String::new(),
            expert_boundary: None,
            phase1_t_range: None,
            lora_rank: 64,
            lora_alpha: 8.0,
            experts: Vec::new(),
            resolutions: Vec::new(),
            resolution_weights: Vec::new(),
            resolution_space: ResolutionSpace::Pixel,
            vae_stride: None,
            fake: FakeKind::Full,
            fake_lora_rank: 64,
            fake_lora_alpha: 64.0,
            lora_targets: Vec::new(),
            dtype: "f32".into(),
            activations: None,
            recompute_blocks: true,
            recompute_segments: false,
            task: None,
        }
    }
}

impl Recipe {
    pub fn parse(text: &str, path: &Path) -> Result<Recipe> {
        let r: Recipe = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(0, |s| text[..s.start.min(text.len())].lines().count().max(1));
            Error::malformed(path, format!("recipe line {line}: {}", e.message()))
        })?;
        r.validate().map_err(|e| e.with_path(path))?;
        Ok(r)
    }

    pub fn load(path: &Path) -> Result<(Recipe, String)> {
        let text = std::fs::read_to_string(path).with_file(path)?;
        let mut r = Recipe::parse(&text, path)?;
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        if let Some(c) = &r.teacher.checkpoint {
            if c.is_relative() {
                r.teacher.checkpoint = Some(dir.join(c));
            }
        }
        if let Some(t) = &mut r.transformer {
            let abs = |s: &str| if s.is_empty() || Path::new(s).is_absolute() { s.to_string() } else { dir.join(s).display().to_string() };
            t.checkpoint = abs(&t.checkpoint);
            if !t.embeddings.starts_with("random:") {
                t.embeddings = abs(&t.embeddings);
            }
            t.experts = t.experts.iter().map(|e| abs(e)).collect();
        }
        Ok((r, text))
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("recipes serialise")
    }

    pub fn is_toy(&self) -> bool {
        self.model == "toy"
    }

    pub fn validate(&self) -> Result<()> {
        let s = self.schedule.build()?;
        if !self.train.updates.is_empty() && self.train.updates.len() != s.phases.len() {
            return Err(Error::usage(format!(
                "recipe: train.updates has {} entries for {} phases",
                self.train.updates.len(),
                s.phases.len()
            )));
        }
        if self.train.batch == 0 || self.train.ttur == 0 {
            return Err(Error::usage("recipe: train.batch and train.ttur must be at least 1"));
        }
        if self.schedule.backprop == Backprop::All && self.schedule.sgts {
            return Err(Error::usage("recipe: schedule.backprop = \"all\" and schedule.sgts exclude each other"));
        }
        if !self.schedule.rollout.is_euler() && !self.is_toy() {
            return Err(Error::usage("recipe: schedule.rollout = \"x0-renoise\" is implemented for the toy only (transformer runs roll out and sample with Euler)"));
        }
        self.validate_method_options(&s)?;
        match self.model.as_str() {
            "toy" | "wan2.2-t2v-a14b" | "wan2.2-i2v-a14b" | "wan2.2-ti2v-5b" | "wan2.1-t2v-14b" | "qwen-image" => {}
            m => return Err(Error::usage(format!("recipe: unknown model '{}'", crate::error::clean(m)))),
        }
        let task = self.transformer.as_ref().and_then(|t| t.task);
        match (self.model.as_str(), task) {
            ("wan2.2-i2v-a14b", Some(Task::T2v)) => {
                Err(Error::usage("recipe: wan2.2-i2v-a14b generates from an image: task = \"t2v\" does not fit it"))
            }
            ("wan2.2-t2v-a14b" | "wan2.1-t2v-14b" | "qwen-image", Some(Task::I2v)) => {
                Err(Error::usage(format!("recipe: {} takes no image condition: task = \"i2v\" does not fit it", self.model)))
            }
            _ => Ok(()),
        }
    }

    /// Checks of `renoise_fixed` and `guidance_experts` (issue 15's settings).
    fn validate_method_options(&self, s: &Schedule) -> Result<()> {
        if let Some(t) = self.schedule.renoise_fixed {
            // The highest phase boundary: phase 1's (σ falls along the step list).
            let top = s.phases.iter().map(|p| p.sigma_end).fold(0.0, f64::max);
            if !(t.is_finite() && t > top && t <= 1.0) {
                return Err(Error::usage(format!(
                    "recipe: schedule.renoise_fixed = {t} must lie in ({top}, 1]: above every phase's boundary σ (re-noising goes up from it)"
                )));
            }
            if self.schedule.renoise != Renoise::Nested {
                return Err(Error::usage(
                    "recipe: schedule.renoise_fixed replaces the re-noise interval; leave schedule.renoise = \"nested\"",
                ));
            }
            if let Some([lo, hi]) = self.transformer.as_ref().and_then(|t| t.phase1_t_range) {
                if t < lo || t > hi {
                    return Err(Error::usage(format!(
                        "recipe: schedule.renoise_fixed = {t} lies outside transformer.phase1_t_range [{lo}, {hi}]"
                    )));
                }
            }
        }
        let g = &self.teacher.guidance_experts;
        if !g.is_empty() {
            if self.transformer.as_ref().and_then(|t| t.expert_boundary).is_none() {
                return Err(Error::usage(
                    "recipe: teacher.guidance_experts needs a two-expert teacher (a transformer recipe with expert_boundary); use teacher.guidance",
                ));
            }
            if g.len() != 2 || g.iter().any(|x| !x.is_finite()) {
                return Err(Error::usage(format!(
                    "recipe: teacher.guidance_experts must hold two finite scales [high_noise, low_noise], not {g:?}"
                )));
            }
            if self.teacher.guidance != 1.0 {
                return Err(Error::usage(
                    "recipe: teacher.guidance and teacher.guidance_experts are both set; guidance_experts replaces guidance, keep one",
                ));
            }
        }
        Ok(())
    }

    /// The teacher's guidance scales `[high_noise, low_noise]` when they differ per expert
    /// (`guidance_experts`); `None`: `guidance` for every sample.
    pub fn guidance_per_expert(&self) -> Option<[f64; 2]> {
        match self.teacher.guidance_experts.as_slice() {
            [high, low] => Some([*high, *low]),
            _ => None,
        }
    }

    /// The transformer task: the recipe's `task`, or by model (`i2v` for I2V-A14B).
    pub fn task(&self) -> Task {
        match self.transformer.as_ref().and_then(|t| t.task) {
            Some(t) => t,
            None if self.model == "wan2.2-i2v-a14b" => Task::I2v,
            None => Task::T2v,
        }
    }

    /// Generator updates of phase `p`.
    pub fn updates(&self, p: usize) -> u64 {
        self.train.updates.get(p).copied().unwrap_or(self.train.updates_per_phase)
    }
}
