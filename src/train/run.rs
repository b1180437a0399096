//! Run folders: the recipe it ran, checkpoints (weights, optimiser moments, RNG state, step),
//! a JSONL log, one expert file per phase and `manifest.json`, which the assembler reads.
//!
//! ```text
//! RUN_DIR/recipe.toml                     the recipe, as given
//! RUN_DIR/teacher.safetensors             the MLP teacher (when the run pretrained it)
//! RUN_DIR/log.jsonl                       one line per `log_every` generator updates
//! RUN_DIR/checkpoints/step-NNNNNNN.{safetensors,json}
//! RUN_DIR/experts/expert-K.safetensors    expert of phase K (written when the phase ends)
//! RUN_DIR/manifest.json                   the assembler's `phasekit.run/1` manifest
//! RUN_DIR/toy.json                        schedule, σ ranges, timesteps, digests, mixture, MLP
//! RUN_DIR/summary.json, plots/*.png       final metrics and plots (toy)
//! ```
//!
//! Every file is written atomically; the JSON of a checkpoint is written after its tensors and
//! is what makes it count. `--resume` restores the newest complete checkpoint; on the CPU the
//! continued run is bit-identical to one that never stopped.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::denoiser::{class_cond, Cond, Denoiser, ExactMixture, Mlp, MlpConfig};
use super::dist::{DistConfig, DistReport};
use super::dmd::{self, Phase};
use super::memory::{self, PhaseMemory};
use super::metrics::{self, Metrics};
use super::mixture::{Mixture, MixtureConfig};
use super::optim::{AdamW, ParamsAdamW};
use super::recipe::{Recipe, TeacherKind};
use super::schedule::{Rollout, Schedule};
use super::{ce, Rng};
use crate::atomic::{self, AtomicFile};
use crate::error::{Error, IoContext, Kind, Result};
use crate::hash::sha256_hex;
use crate::safetensors::{self as st, Planned};

/// Tensors with their names, in file order.
pub type NamedTensors = Vec<(String, Tensor)>;

/// Write f32 tensors as a safetensors file (atomically).
pub fn write_tensors(path: &Path, tensors: &[(String, Tensor)], metadata: &[(String, String)]) -> Result<()> {
    let planned = tensors
        .iter()
        .map(|(n, t)| Planned { name: n.clone(), dtype: crate::DType::F32, shape: t.dims().iter().map(|d| *d as u64).collect() })
        .collect();
    let plan = st::plan(planned, if metadata.is_empty() { None } else { Some(metadata) })?;
    let by_name: HashMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut f = AtomicFile::create(path)?;
    let mut buf = plan.bytes.clone();
    for p in &plan.order {
        let v = by_name[p.name.as_str()].flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(ce)?;
        buf.extend_from_slice(bytemuck::cast_slice(&v));
    }
    f.write_all(&buf).with_file(f.temp_path())?;
    f.commit()
}

/// Read every tensor of a safetensors file as f32 (F32 files only), with its metadata.
pub fn read_tensors(path: &Path) -> Result<(NamedTensors, Vec<(String, String)>)> {
    read_decoded(path, |name, dtype, b| {
        if dtype != crate::DType::F32 {
            return Err(Error::unsupported(format!("tensor '{name}' is {dtype}, training files are F32")));
        }
        Ok(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    })
}

/// [`read_tensors`] for condition files written by other tools (diffusers pipelines, numpy): float
/// tensors of any castable dtype (F16, BF16, F64, fp8) and integer or bool tensors (masks), all
/// returned as f32. Integers beyond 2^24 lose precision; a mask's 0 and 1 do not.
pub fn read_tensors_f32(path: &Path) -> Result<(NamedTensors, Vec<(String, String)>)> {
    use crate::DType as D;
    read_decoded(path, |name, dtype, b| {
        Ok(match dtype {
            d if d.is_castable_float() => {
                let mut v = vec![0f32; b.len() / d.size().unwrap_or(1).max(1)];
                crate::cast::decode_f32(d, b, &mut v, 1.0)?;
                v
            }
            D::Bool | D::U8 => b.iter().map(|x| *x as f32).collect(),
            D::I8 => b.iter().map(|x| *x as i8 as f32).collect(),
            D::I16 => b.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]]) as f32).collect(),
            D::U16 => b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as f32).collect(),
            D::I32 => b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap_or_default()) as f32).collect(),
            D::U32 => b.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap_or_default()) as f32).collect(),
            D::I64 => b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default()) as f32).collect(),
            D::U64 => b.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()) as f32).collect(),
            d => return Err(Error::unsupported(format!("tensor '{name}' is {d}, which phasekit cannot read as numbers"))),
        })
    })
}

/// Every tensor of a safetensors file, its bytes turned into f32 values by `decode(name, dtype,
/// bytes)` (errors get the file's path), with the file's metadata.
fn read_decoded(
    path: &Path,
    decode: impl Fn(&str, crate::DType, &[u8]) -> Result<Vec<f32>>,
) -> Result<(NamedTensors, Vec<(String, String)>)> {
    let bytes = std::fs::read(path).with_file(path)?;
    let h = st::parse(path, &bytes)?;
    let mut out = Vec::new();
    for r in &h.tensors {
        let b = &bytes[(h.data_start + r.begin) as usize..(h.data_start + r.end) as usize];
        let v = decode(&r.name, r.dtype, b).map_err(|e| e.with_path(path))?;
        let shape: Vec<usize> = r.shape.iter().map(|d| *d as usize).collect();
        out.push((r.name.clone(), Tensor::from_vec(v, shape, &Device::Cpu).map_err(ce)?));
    }
    Ok((out, h.metadata.unwrap_or_default()))
}

pub(crate) fn write_json(path: &Path, v: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::internal(e.to_string()))?;
    atomic::write_file(path, format!("{text}\n").as_bytes())
}

fn load_mlp(path: &Path, cfg: &MlpConfig, dim: usize, classes: usize) -> Result<Mlp> {
    let (mut t, _) = read_tensors(path)?;
    t.sort_by_key(|(n, _)| mlp_order(n));
    Mlp::from_tensors(cfg, dim, classes, t).map_err(|e| Error::inconsistent(path, format!("does not fit the recipe's MLP: {e}")))
}

/// Pretrain the MLP teacher by flow matching on mixture samples.
pub fn pretrain_teacher(r: &Recipe, mix: &Mixture, progress: &dyn Fn(u64, u64, f64)) -> Result<Mlp> {
    let p = &r.teacher.pretrain;
    let mut rng = Rng::new(r.seed ^ 0x7EAC_4E55);
    let model = Mlp::new(&r.mlp, mix.dim, mix.classes, &mut rng).map_err(ce)?;
    let params = ParamsAdamW { lr: p.lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
    let mut opt = AdamW::new(model.vars.clone(), params).map_err(ce)?;
    for step in 0..p.steps {
        let (x, mut cls, _) = mix.sample(p.batch, &mut rng);
        for c in cls.iter_mut() {
            if rng.uniform() < p.cond_dropout {
                *c = mix.classes as u32;
            }
        }
        let x0 = Tensor::from_vec(x.iter().map(|a| *a as f32).collect::<Vec<f32>>(), (p.batch, mix.dim), &Device::Cpu).map_err(ce)?;
        let cond = class_cond(cls).map_err(ce)?;
        let loss = dmd::flow_matching_loss(&model, &x0, &cond, &mut rng).map_err(ce)?;
        let frac = step as f64 / p.steps as f64;
        opt.params.lr = if frac < 0.5 { p.lr } else { p.lr * 2.0 * (1.0 - frac) };
        let g = loss.backward().map_err(ce)?;
        opt.step(&g, 1.0).map_err(ce)?;
        if step % 50 == 0 || step + 1 == p.steps {
            progress(step + 1, p.steps, loss.to_scalar::<f32>().map_err(ce)? as f64);
        }
    }
    Ok(model)
}

/// One line of `log.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogLine {
    pub phase: usize,
    pub step: u64,
    pub global_step: u64,
    pub gen_loss: f64,
    pub fake_loss: f64,
    pub gen_grad_norm: f64,
    pub seconds: f64,
    /// On the last update of a phase: the phase's peak memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<PhaseMemory>,
}

/// The JSON half of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointInfo {
    pub format: String,
    pub phase: usize,
    /// Generator updates done in `phase`.
    pub step: u64,
    pub global_step: u64,
    pub rng_state: u64,
    pub gen_opt_step: u64,
    pub fake_opt_step: u64,
    pub recipe_sha256: String,
    pub teacher_sha256: String,
    /// Data-parallel runs: every rank's RNG state, in rank order (`rng_state` is rank 0's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rng_states: Vec<u64>,
}

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

/// Options of one `train` call.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    pub resume: bool,
    /// Stop (as if killed) after this many generator updates in total; for resume tests.
    pub stop_after: Option<u64>,
    /// Samples drawn for the final metrics (0: skip metrics and plots).
    pub eval_samples: usize,
    /// This process's rank and how to reach the others (default: one rank).
    pub dist: DistConfig,
}

/// Progress of a run, for a progress bar.
#[derive(Debug, Clone)]
pub enum Event {
    Pretrain { step: u64, total: u64, loss: f64 },
    Step { phase: usize, phases: usize, global_step: u64, total: u64, gen_loss: f64, fake_loss: f64 },
}

/// What `train` returns.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub run_dir: PathBuf,
    pub completed: bool,
    pub global_step: u64,
    pub seconds: f64,
    pub resumed_from: Option<u64>,
    pub metrics: Option<Metrics>,
    /// Peak memory of each phase this process ran.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub memory: Vec<PhaseMemory>,
    /// Data-parallel runs: this rank and a digest of its trained weights.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dist: Option<DistReport>,
}

/// Human name of the method a recipe describes.
pub fn method_name(r: &Recipe, s: &Schedule) -> String {
    use super::recipe::{Backprop, FakeObjective};
    use super::schedule::Renoise;
    let n = s.steps();
    let mut m = if s.phases.len() == 1 {
        if n == 1 {
            "one-step DMD".to_string()
        } else if r.schedule.backprop == Backprop::All {
            format!("vanilla {n}-step DMD (backprop through all steps)")
        } else if r.schedule.sgts {
            format!("{n}-step DMD2 (SGTS)")
        } else {
            format!("{n}-step DMD (last step)")
        }
    } else {
        format!("Phased DMD {n}-step {}-phase{}", s.phases.len(), if r.schedule.sgts { " + SGTS" } else { "" })
    };
    if r.train.fake_objective == FakeObjective::Naive {
        m.push_str(", naive fake target");
    }
    if r.schedule.renoise == Renoise::Disjoint {
        m.push_str(", disjoint intervals");
    }
    if r.schedule.rollout == Rollout::X0Renoise {
        m.push_str(", x0-renoise steps");
    } else if r.schedule.sgts && s.phases.len() == 1 && n > 1 {
        // DMD2's own code steps by x̂₀ + fresh noise; say when this one does not.
        m.push_str(", Euler steps");
    }
    m
}

pub(crate) fn ckpt_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

pub(crate) fn latest_checkpoint(out: &Path) -> Result<Option<(CheckpointInfo, PathBuf)>> {
    let dir = ckpt_dir(out);
    if !dir.is_dir() {
        return Ok(None);
    }
    let mut best: Option<(CheckpointInfo, PathBuf)> = None;
    for e in std::fs::read_dir(&dir).with_file(&dir)? {
        let p = e.with_file(&dir)?.path();
        if p.extension().is_some_and(|x| x == "json") && !p.file_name().unwrap_or_default().to_string_lossy().starts_with('.') {
            let text = std::fs::read_to_string(&p).with_file(&p)?;
            let info: CheckpointInfo = serde_json::from_str(&text).map_err(|e| Error::malformed(&p, e.to_string()))?;
            let tensors = p.with_extension("safetensors");
            if tensors.exists() && best.as_ref().is_none_or(|(b, _)| info.global_step > b.global_step) {
                best = Some((info, tensors));
            }
        }
    }
    Ok(best)
}

pub(crate) fn prune_checkpoints(out: &Path, keep: usize) -> Result<()> {
    let dir = ckpt_dir(out);
    let mut steps: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_file(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    steps.sort();
    if steps.len() > keep.max(1) {
        for p in &steps[..steps.len() - keep.max(1)] {
            let _ = std::fs::remove_file(p);
            let _ = std::fs::remove_file(p.with_extension("safetensors"));
        }
    }
    Ok(())
}

fn prefixed(prefix: &str, m: &Mlp) -> Vec<(String, Tensor)> {
    m.named_tensors().into_iter().map(|(n, t)| (format!("{prefix}{n}"), t)).collect()
}

pub(crate) fn opt_tensors(prefix: &str, names: &[String], o: &AdamW) -> Vec<(String, Tensor)> {
    let mut v = Vec::new();
    for (i, n) in names.iter().enumerate() {
        v.push((format!("{prefix}m.{n}"), o.m[i].as_tensor().detach()));
        v.push((format!("{prefix}v.{n}"), o.v[i].as_tensor().detach()));
    }
    v
}

pub(crate) fn restore_opt(prefix: &str, names: &[String], o: &mut AdamW, t: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    for (i, n) in names.iter().enumerate() {
        for (which, var) in [("m", &o.m[i]), ("v", &o.v[i])] {
            let key = format!("{prefix}{which}.{n}");
            let src = t.get(&key).ok_or_else(|| Error::inconsistent(path, format!("checkpoint lacks '{key}'")))?;
            var.set(src).map_err(ce)?;
        }
    }
    Ok(())
}

fn take_prefixed(prefix: &str, t: &HashMap<String, Tensor>) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = t.iter().filter_map(|(k, x)| k.strip_prefix(prefix).map(|n| (n.to_string(), x.clone()))).collect();
    // The MLP's own order: embed first, then layers by index.
    v.sort_by_key(|(n, _)| mlp_order(n));
    v
}

fn mlp_order(n: &str) -> (usize, usize) {
    if n.starts_with("embed") {
        return (0, 0);
    }
    let mut it = n.split('.');
    let i: usize = it.nth(1).and_then(|x| x.parse().ok()).unwrap_or(usize::MAX);
    (1 + i, if n.ends_with("weight") { 0 } else { 1 })
}

pub(crate) fn expert_path(out: &Path, k: usize) -> PathBuf {
    out.join("experts").join(format!("expert-{k}.safetensors"))
}

/// The toy's condition sampler (classes from the class prior).
pub fn class_sampler(mix: &Mixture) -> impl Fn(&mut Rng, usize) -> candle_core::Result<Cond> + '_ {
    move |rng: &mut Rng, n: usize| class_cond(mix.sample_classes(n, rng))
}

/// Create (or, with `--resume`, reopen) a run folder and store the recipe; returns its sha256.
pub(crate) fn prepare_run_dir(out: &Path, opts: &TrainOptions, recipe_text: &str) -> Result<String> {
    let recipe_sha = sha256_hex(recipe_text.as_bytes());
    // Run folder.
    if out.exists() && !opts.resume {
        let busy = std::fs::read_dir(out).with_file(out)?.next().is_some();
        if busy {
            return Err(Error::at(Kind::Usage, out, "run folder is not empty (use --resume to continue it, or another --out)"));
        }
    }
    for d in [out.to_path_buf(), ckpt_dir(out), out.join("experts")] {
        std::fs::create_dir_all(&d).with_file(&d)?;
    }
    let recipe_copy = out.join("recipe.toml");
    if opts.resume && recipe_copy.exists() {
        let old = std::fs::read_to_string(&recipe_copy).with_file(&recipe_copy)?;
        if sha256_hex(old.as_bytes()) != recipe_sha {
            return Err(Error::inconsistent(&recipe_copy, "the run was started with a different recipe; resume with the same file"));
        }
    } else {
        atomic::write_file(&recipe_copy, recipe_text.as_bytes())?;
    }
    Ok(recipe_sha)
}

/// Keep `log.jsonl` consistent with the checkpoint a run resumes from (drop later lines) and
/// open it for appending.
pub(crate) fn open_log(out: &Path, resume: bool, keep_until: u64) -> Result<(std::fs::File, PathBuf)> {
    let log_path = out.join("log.jsonl");
    let mut log_text = String::new();
    if resume && log_path.exists() {
        for l in std::fs::read_to_string(&log_path).with_file(&log_path)?.lines() {
            if let Ok(x) = serde_json::from_str::<LogLine>(l) {
                if x.global_step <= keep_until {
                    log_text.push_str(l);
                    log_text.push('\n');
                }
            }
        }
    }
    atomic::write_file(&log_path, log_text.as_bytes())?;
    let log = std::fs::OpenOptions::new().append(true).open(&log_path).with_file(&log_path)?;
    Ok((log, log_path))
}

/// The bookkeeping after each generator update, shared by the toy and transformer trainers.
pub(crate) struct Updates<'a> {
    pub recipe: &'a Recipe,
    pub out: &'a Path,
    pub stop_after: Option<u64>,
    pub on: &'a dyn Fn(&Event),
    pub t0: Instant,
    pub log: &'a mut std::fs::File,
    pub log_path: &'a Path,
    pub phases: usize,
    pub total: u64,
    pub resumed_from: Option<u64>,
    /// Peak memory of the phases finished so far.
    pub memory: Vec<PhaseMemory>,
}

impl Updates<'_> {
    /// After update `done` of `n` in phase `p` (`global` in the run): refuse non-finite losses,
    /// log, report, checkpoint when due (`save`), and return the summary to stop with when
    /// `--stop-after` is reached.
    pub(crate) fn after(
        &mut self,
        p: usize,
        done: u64,
        n: u64,
        global: u64,
        l: &dmd::StepLosses,
        save: impl FnOnce() -> Result<()>,
    ) -> Result<Option<Summary>> {
        let r = self.recipe;
        if !l.gen.is_finite() || !l.fake.is_finite() {
            return Err(Error::internal(format!("phase {p} step {done}: loss is not finite (gen {}, fake {})", l.gen, l.fake)));
        }
        let mem = (done == n).then(|| memory::phase_end(p, &super::transformer::device()));
        self.memory.extend(mem.clone());
        if r.train.log_every > 0 && (done % r.train.log_every == 0 || done == n) {
            let line = LogLine {
                phase: p,
                step: done,
                global_step: global,
                gen_loss: l.gen,
                fake_loss: l.fake,
                gen_grad_norm: l.gen_grad_norm,
                seconds: self.t0.elapsed().as_secs_f64(),
                memory: mem,
            };
            let text = serde_json::to_string(&line).map_err(|e| Error::internal(e.to_string()))?;
            writeln!(self.log, "{text}").with_file(self.log_path)?;
        }
        (self.on)(&Event::Step {
            phase: p,
            phases: self.phases,
            global_step: global,
            total: self.total,
            gen_loss: l.gen,
            fake_loss: l.fake,
        });
        let due = r.train.checkpoint_every > 0 && done % r.train.checkpoint_every == 0;
        if due || done == n {
            save()?;
        }
        if self.stop_after.is_some_and(|s| global >= s) {
            return Ok(Some(Summary {
                run_dir: self.out.into(),
                completed: false,
                global_step: global,
                seconds: self.t0.elapsed().as_secs_f64(),
                resumed_from: self.resumed_from,
                metrics: None,
                memory: self.memory.clone(),
                dist: None,
            }));
        }
        Ok(None)
    }
}

/// Train a recipe into `out`.
pub fn train(r: &Recipe, recipe_text: &str, out: &Path, opts: &TrainOptions, on: &dyn Fn(&Event)) -> Result<Summary> {
    let t0 = Instant::now();
    memory::start(&super::transformer::device());
    if !r.is_toy() {
        return super::transformer::train(r, recipe_text, out, opts, on);
    }
    if opts.dist.world_size > 1 {
        return Err(Error::unsupported("data parallel training (WORLD_SIZE > 1) is for transformer recipes; the toy runs on one rank"));
    }
    let sched = r.schedule.build()?;
    let mix = Mixture::new(&r.mixture)?;
    let recipe_sha = prepare_run_dir(out, opts, recipe_text)?;
    // Teacher.
    let teacher_file = match &r.teacher.checkpoint {
        Some(p) => p.clone(),
        None => out.join("teacher.safetensors"),
    };
    let teacher = if teacher_file.exists() {
        load_mlp(&teacher_file, &r.mlp, mix.dim, mix.classes)?
    } else if r.teacher.checkpoint.is_some() {
        return Err(Error::io(&teacher_file, std::io::Error::new(std::io::ErrorKind::NotFound, "teacher checkpoint not found")));
    } else {
        let m = pretrain_teacher(r, &mix, &|step, total, loss| on(&Event::Pretrain { step, total, loss }))?;
        write_tensors(&teacher_file, &m.named_tensors(), &[("phasekit.format".into(), "phasekit-teacher/1".into())])?;
        m
    };
    let teacher_sha = sha256_hex(&std::fs::read(&teacher_file).with_file(&teacher_file)?);
    let exact = ExactMixture { mixture: mix.clone() };
    let teacher_frozen = teacher.frozen();
    let real: &dyn Denoiser = match r.teacher.kind {
        TeacherKind::Exact => &exact,
        TeacherKind::Mlp => &teacher_frozen,
    };
    let sampler = class_sampler(&mix);
    let item = [mix.dim];
    let total: u64 = (0..sched.phases.len()).map(|p| r.updates(p)).sum();
    let gen_params = ParamsAdamW {
        lr: r.train.gen_lr,
        beta1: r.train.betas[0],
        beta2: r.train.betas[1],
        eps: r.train.eps,
        weight_decay: r.train.weight_decay,
    };
    let fake_params = ParamsAdamW { lr: r.train.fake_lr, ..gen_params.clone() };

    // Resume state.
    let mut rng = Rng::new(r.seed);
    let mut start_phase = 0;
    let mut start_step = 0;
    let mut resumed_from = None;
    let mut restored: Option<(CheckpointInfo, HashMap<String, Tensor>, PathBuf)> = None;
    if opts.resume {
        if let Some((info, path)) = latest_checkpoint(out)? {
            if info.recipe_sha256 != recipe_sha || info.teacher_sha256 != teacher_sha {
                return Err(Error::inconsistent(&path, "checkpoint belongs to another recipe or teacher"));
            }
            let (t, _) = read_tensors(&path)?;
            rng.state = info.rng_state;
            start_phase = info.phase;
            start_step = info.step;
            resumed_from = Some(info.global_step);
            restored = Some((info, t.into_iter().collect(), path));
        }
    }
    let (mut log, log_path) = open_log(out, opts.resume, resumed_from.unwrap_or(0))?;

    let mut experts: Vec<Mlp> = Vec::new();
    for k in 0..start_phase {
        experts.push(load_mlp(&expert_path(out, k), &r.mlp, mix.dim, mix.classes)?.frozen());
    }
    let mut carried_fake: Option<Mlp> = None;
    let mut updates = Updates {
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
    let mut global: u64 = (0..start_phase).map(|p| r.updates(p)).sum::<u64>() + start_step;
    for p in start_phase..sched.phases.len() {
        let (gen, fake, mut gen_opt, mut fake_opt, first) = match restored.take() {
            Some((info, t, path)) if info.phase == p => {
                let gen = Mlp::from_tensors(&r.mlp, mix.dim, mix.classes, take_prefixed("gen.", &t)).map_err(ce)?;
                let fake = Mlp::from_tensors(&r.mlp, mix.dim, mix.classes, take_prefixed("fake.", &t)).map_err(ce)?;
                let mut go = AdamW::new(gen.vars.clone(), gen_params.clone()).map_err(ce)?;
                let mut fo = AdamW::new(fake.vars.clone(), fake_params.clone()).map_err(ce)?;
                restore_opt("gen_opt.", &gen.names, &mut go, &t, &path)?;
                restore_opt("fake_opt.", &fake.names, &mut fo, &t, &path)?;
                go.step_t = info.gen_opt_step;
                fo.step_t = info.fake_opt_step;
                (gen, fake, go, fo, info.step)
            }
            _ => {
                let gen = teacher.deep_copy().map_err(ce)?;
                let fake = match carried_fake.take() {
                    Some(f) if !r.train.fake_reinit => f,
                    _ => teacher.deep_copy().map_err(ce)?,
                };
                let go = AdamW::new(gen.vars.clone(), gen_params.clone()).map_err(ce)?;
                let fo = AdamW::new(fake.vars.clone(), fake_params.clone()).map_err(ce)?;
                (gen, fake, go, fo, 0)
            }
        };
        let expert_refs: Vec<&dyn Denoiser> = experts.iter().map(|e| e as &dyn Denoiser).collect();
        let phase = Phase {
            sched: &sched,
            scfg: &r.schedule,
            tcfg: &r.train,
            phase: p,
            teacher: real,
            guidance: r.teacher.guidance,
            experts: &expert_refs,
            sample_cond: &sampler,
            item: &item,
            t_range: None,
            device: &Device::Cpu,
        };
        let n = r.updates(p);
        let save = |step: u64, global: u64, rng: &Rng, gen_opt: &AdamW, fake_opt: &AdamW| -> Result<()> {
            let mut t = prefixed("gen.", &gen);
            t.extend(prefixed("fake.", &fake));
            t.extend(opt_tensors("gen_opt.", &gen.names, gen_opt));
            t.extend(opt_tensors("fake_opt.", &fake.names, fake_opt));
            let base = ckpt_dir(out).join(format!("step-{global:07}"));
            write_tensors(&base.with_extension("safetensors"), &t, &[])?;
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
                rng_states: Vec::new(),
            };
            write_json(&base.with_extension("json"), &info)?;
            prune_checkpoints(out, r.train.keep_checkpoints)
        };
        for step in first..n {
            let l = phase.iteration(&mut rng, &gen, &fake, &mut gen_opt, &mut fake_opt).map_err(ce)?;
            global += 1;
            let done = step + 1;
            if let Some(stopped) = updates.after(p, done, n, global, &l, || save(done, global, &rng, &gen_opt, &fake_opt))? {
                return Ok(stopped);
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
        write_tensors(&expert_path(out, p), &gen.named_tensors(), &md)?;
        experts.push(gen.frozen());
        carried_fake = Some(fake);
    }
    // Manifest.
    let mut entries = Vec::new();
    for (k, ph) in sched.phases.iter().enumerate() {
        let path = expert_path(out, k);
        let (lo, hi) = sched.expert_range(k);
        entries.push(ExpertEntry {
            index: k,
            file: format!("experts/expert-{k}.safetensors"),
            sha256: sha256_hex(&std::fs::read(&path).with_file(&path)?),
            sigma_range: [lo, hi],
            boundary_sigma: ph.sigma_end,
            steps: [ph.start, ph.end],
            timesteps: sched.sigmas[ph.start..ph.end].iter().map(|s| s * 1000.0).collect(),
        });
    }
    let manifest = Manifest {
        format: TOY_FORMAT.into(),
        name: r.name.clone(),
        model: r.model.clone(),
        method: method_name(r, &sched),
        steps: sched.steps(),
        shift: sched.shift,
        solver: r.schedule.rollout.solver().into(),
        sigmas: sched.sigmas.clone(),
        timesteps: sched.sigmas.iter().map(|s| s * 1000.0).collect(),
        inference_guidance: 1.0,
        teacher: TeacherEntry {
            kind: match r.teacher.kind {
                TeacherKind::Exact => "exact-mixture".into(),
                TeacherKind::Mlp => "mlp".into(),
            },
            file: teacher_file.display().to_string(),
            sha256: teacher_sha,
            guidance: r.teacher.guidance,
        },
        recipe_sha256: recipe_sha,
        mixture: r.mixture.clone(),
        mlp: r.mlp.clone(),
        experts: entries,
    };
    write_json(&out.join(TOY_INFO), &manifest)?;
    write_json(&out.join("manifest.json"), &assembler_manifest(&manifest))?;
    let metrics = if opts.eval_samples > 0 {
        let run = LoadedRun::open(out)?;
        let x = run.sample(opts.eval_samples, None, r.seed ^ 0xE7A1, None)?;
        let m = metrics::evaluate(&x, &mix, r.seed ^ 0x5EED);
        write_json(&out.join("summary.json"), &m)?;
        let plots = out.join("plots");
        std::fs::create_dir_all(&plots).with_file(&plots)?;
        super::plot::run_plots(&run, &plots, r.seed)?;
        Some(m)
    } else {
        None
    };
    let memory = std::mem::take(&mut updates.memory);
    Ok(Summary {
        run_dir: out.into(),
        completed: true,
        global_step: global,
        seconds: t0.elapsed().as_secs_f64(),
        resumed_from,
        metrics,
        memory,
        dist: None,
    })
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
            experts.push(load_mlp(&p, &manifest.mlp, mixture.dim, mixture.classes)?.frozen());
        }
        Ok(LoadedRun { dir: dir.into(), manifest, mixture, experts })
    }

    /// The expert routed for σ: the one whose [lo, hi) holds σ (σ = 1 goes to the first).
    pub fn route(&self, sigma: f64) -> usize {
        self.manifest
            .experts
            .iter()
            .position(|e| sigma >= e.sigma_range[0] && (sigma < e.sigma_range[1] || e.index == 0))
            .unwrap_or(self.experts.len() - 1)
    }

    /// The σ grid for `steps` (the run's own when `None`).
    pub fn sigmas(&self, steps: Option<usize>) -> Vec<f64> {
        match steps {
            None => self.manifest.sigmas.clone(),
            Some(k) => super::schedule::sigmas(k, self.manifest.shift),
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
    let z = dmd::noise(&mut rng, n, &[mixture.dim]).map_err(ce)?;
    let cls = match class {
        Some(c) => vec![c; n],
        None => mixture.sample_classes(n, &mut rng),
    };
    let cond = class_cond(cls).map_err(ce)?;
    let mut out = vec![z.clone()];
    let mut x = z;
    for i in 0..sig.len() - 1 {
        x = dmd::step(&experts[route(sig[i])], &x, sig[i], sig[i + 1], &cond, rule, &mut rng).map_err(ce)?;
        out.push(x.clone());
    }
    Ok(out)
}

/// Width of the stored σ range of a one-step first phase (see [`assembler_manifest`]).
pub const TOP_EXPERT_WIDTH: f64 = 1e-9;

/// The assembler's `phasekit.run/1` manifest of a toy run: full MLP experts, no base, model kind
/// `toy-mlp` with the mixture and MLP shape as its config.
fn assembler_manifest(m: &Manifest) -> crate::moe::manifest::Manifest {
    use crate::moe::format::{ModelInfo, KIND_TOY_MLP};
    use crate::moe::manifest::{Manifest as RunManifest, ManifestExpert, MANIFEST_TAG};
    use crate::moe::routing::ExpertKind;
    let config = ToyModelConfig { method: m.method.clone(), mixture: m.mixture.clone(), mlp: m.mlp.clone() };
    // A one-step first phase serves σ = 1 only: its range here is the degenerate [1, 1), σ = 1
    // going to it by the first-expert rule. The routing table needs lo < hi, so it gets
    // [1 − 10⁻⁹, 1) (σ = 1 included) and the next expert ends there: the same expert as in the
    // run folder for every σ a sampler with fewer than 10⁹/shift steps reaches. (10⁻⁹ survives
    // the JSON round trip; the float just below 1 would not.)
    let mut ranges: Vec<[f64; 2]> = m.experts.iter().map(|e| e.sigma_range).collect();
    if let Some(first) = ranges.first().copied().filter(|r| r[0] >= r[1]) {
        let below = first[1] - TOP_EXPERT_WIDTH;
        ranges[0][0] = below;
        for r in ranges.iter_mut().skip(1).filter(|r| r[1] == first[1]) {
            r[1] = below;
        }
    }
    RunManifest {
        format: MANIFEST_TAG.into(),
        experts: m
            .experts
            .iter()
            .zip(&ranges)
            .map(|(e, r)| ManifestExpert {
                path: e.file.clone(),
                sigma_lo: r[0],
                sigma_hi: r[1],
                timesteps: Some(e.timesteps.clone()),
                kind: ExpertKind::Full,
                name: None,
                guidance: None,
                base: None,
            })
            .collect(),
        base: None,
        latent: None,
        shift: m.shift,
        steps: m.steps as u32,
        solver: m.solver.clone(),
        guidance: m.inference_guidance,
        num_train_timesteps: 1000.0,
        teacher_digests: vec![format!("sha256:{}", m.teacher.sha256)],
        recipe_digest: Some(format!("sha256:{}", m.recipe_sha256)),
        title: Some(m.name.clone()),
        model: Some(ModelInfo {
            kind: Some(KIND_TOY_MLP.into()),
            config: Some(serde_json::to_value(&config).expect("serialisable")),
            ..ModelInfo::default()
        }),
    }
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
                t.push((name, Tensor::from_vec(w, shape, &Device::Cpu).map_err(ce)?));
            }
            t.sort_by_key(|(n, _)| mlp_order(n));
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
        super::schedule::sigmas(steps.unwrap_or(self.routing.steps as usize), self.routing.shift)
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
    let sig = super::schedule::sigmas(steps, shift);
    let mut rng = Rng::new(seed);
    let z = dmd::noise(&mut rng, n, &[mix.dim]).map_err(ce)?;
    let cond = class_cond(mix.sample_classes(n, &mut rng)).map_err(ce)?;
    let by: Vec<&dyn Denoiser> = vec![d; steps];
    dmd::sample(&by, &sig, z, &cond).map_err(ce)
}

/// Load a teacher file written by a run.
pub fn load_teacher(path: &Path, cfg: &MlpConfig, mix: &Mixture) -> Result<Mlp> {
    Ok(load_mlp(path, cfg, mix.dim, mix.classes)?.frozen())
}
