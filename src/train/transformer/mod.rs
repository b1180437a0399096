//! Phased DMD on the transformer teachers (Wan2.2, Qwen-Image): the transformer student of the
//! phase loop ([`crate::train::phases`]), driven by the same [`crate::train::dmd::Phase`] code
//! as the toy.
//!
//! One copy of each base is loaded ([`net`]); the teacher, each generator `G_k` (base + a fresh
//! LoRA) and each fake (base + a fresh LoRA, or a full trainable copy) are views of it.
//! Two-expert teachers (Wan2.2 A14B) are routed by σ ([`routing`]), the teacher and the fakes
//! alike, one fake per teacher expert the phase's re-noise range reaches; each generator expert
//! sits on the teacher expert that serves its first step. Conditions and training resolutions
//! are in [`data`], what the run leaves for the sampler and the assembler in [`outputs`], and
//! the samplers of runs and routed checkpoints in [`sample`].

pub mod data;
pub mod net;
pub mod outputs;
pub mod routing;
pub mod sample;
pub mod teachers;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;

use self::data::{geometries, Embeddings, Geometry};
use self::net::{activation_dtype, parse_dtype, Net};
use self::outputs::{teacher_digest, write_outputs};
use self::routing::{expert_of, fakes_used, phase_t_range, GuidedExpert, Routed};
use super::dist;
use super::dmd::{Phase, StepLosses, Views};
use super::optim::{AdamW, Trainable};
use super::phases::{self, LoopConfig, Student};
use super::recipe::{FakeKind, Recipe, TransformerConfig};
use super::rundir::{self, Event, RunDir, Summary};
use super::schedule::Schedule;
use super::TrainOptions;
use crate::error::{Error, IoContext, Kind, Result};
use crate::hash::sha256_hex;
use crate::model::denoiser::{Cond, Denoiser};
use crate::model::linear::{self, LoraConfig};
use crate::rng::Rng;

fn gen_lora(t: &TransformerConfig, seed: u64) -> LoraConfig {
    LoraConfig {
        rank: t.lora_rank,
        alpha: t.lora_alpha,
        targets: if t.lora_targets.is_empty() { linear::default_targets() } else { t.lora_targets.clone() },
        seed,
    }
}

/// Draws the conditions of a batch.
type Sampler<'a> = Box<dyn Fn(&mut Rng, usize) -> candle_core::Result<Cond> + 'a>;

/// The generator and fakes of the phase in progress.
struct PhaseNets {
    gen: Net,
    gen_frozen: Net,
    /// One fake per teacher expert (`None` where the phase's re-noise range does not reach it).
    fakes: Vec<Option<Net>>,
    fake_frozen: Vec<Option<Net>>,
    t_range: Option<(f64, f64)>,
}

/// The transformer student: LoRA generators on the loaded bases, LoRA or full fakes.
struct TransformerStudent<'a> {
    recipe: &'a Recipe,
    tc: &'a TransformerConfig,
    sched: &'a Schedule,
    bases: &'a [Net],
    /// Frozen views of the bases: the teacher experts.
    teacher: &'a [Net],
    geos: &'a [Geometry],
    geo_weights: &'a [f64],
    /// One condition sampler per training resolution (image conditions depend on it).
    samplers: Vec<Sampler<'a>>,
    device: &'a Device,
    /// Frozen generator experts of the finished phases.
    experts: Vec<Net>,
    current: Option<PhaseNets>,
    /// The training resolution of the latest iteration.
    last_geo: usize,
}

impl TransformerStudent<'_> {
    /// The teacher expert phase `p`'s generator sits on (the one serving its first step).
    fn gen_base(&self, p: usize) -> usize {
        expert_of(self.sched.sigmas[self.sched.phases[p].start], self.tc.expert_boundary)
    }
}

fn as_dyn(v: &Option<Net>) -> Option<&dyn Denoiser> {
    v.as_ref().map(|x| x as &dyn Denoiser)
}

impl Student for TransformerStudent<'_> {
    fn start_phase(&mut self, p: usize) -> Result<(Trainable, Trainable)> {
        let (r, tc) = (self.recipe, self.tc);
        let t_range = phase_t_range(tc, p);
        // Generator: its teacher expert's base + a fresh LoRA (zero up: starts as the teacher).
        let mut gen = self.bases[self.gen_base(p)].base_view();
        gen.attach(&gen_lora(tc, r.seed ^ (0x6E4E_0000 + p as u64)))?;
        let gen_tr = gen.lora_vars();
        // Fakes: one per teacher expert that the phase's re-noise range reaches.
        let used = fakes_used(r, tc, self.sched, p, self.bases.len());
        let mut fakes: Vec<Option<Net>> = Vec::new();
        let mut fake_tr = Trainable::default();
        for (e, base) in self.bases.iter().enumerate() {
            if !used[e] {
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
                        ..gen_lora(tc, 0)
                    })?;
                    f.lora_vars()
                }
                FakeKind::Full => f.full_vars()?,
            };
            fake_tr.extend(&format!("{e}."), tr);
            fakes.push(Some(f));
        }
        let gen_frozen = gen.frozen_view();
        let fake_frozen = fakes.iter().map(|f| f.as_ref().map(|f| f.frozen_view())).collect();
        self.current = Some(PhaseNets { gen, gen_frozen, fakes, fake_frozen, t_range });
        Ok((gen_tr, fake_tr))
    }

    fn iteration(&mut self, p: usize, rng: &mut Rng, gen_opt: &mut AdamW, fake_opt: &mut AdamW) -> Result<StepLosses> {
        let nets = self.current.as_ref().ok_or_else(|| Error::internal("transformer iteration outside a phase"))?;
        // One resolution per iteration (drawn only when there are several, so a single-
        // resolution run's random stream does not depend on this).
        let gi = if self.geos.len() > 1 { rng.categorical(self.geo_weights) } else { 0 };
        self.last_geo = gi;
        crate::alloc::set_activity(&format!("training phase {}{}", p + 1, self.describe()));
        for b in self.bases {
            b.set_img_shape(self.geos[gi].img_shape);
        }
        let boundary = self.tc.expert_boundary;
        // The real score: with per-expert guidance scales each expert guides its own samples
        // (and the phase applies none on top); otherwise the phase guides the routed teacher.
        let per_expert = self.recipe.guidance_per_expert().map(|[h, l]| {
            [GuidedExpert { inner: &self.teacher[0], scale: h }, GuidedExpert { inner: &self.teacher[self.teacher.len() - 1], scale: l }]
        });
        let (teacher, guidance) = match &per_expert {
            Some([h, l]) => (Routed { high: Some(h), low: Some(l), boundary }, 1.0),
            None => (
                Routed { high: Some(&self.teacher[0]), low: self.teacher.get(1).map(|t| t as &dyn Denoiser), boundary },
                self.recipe.teacher.guidance,
            ),
        };
        let fake = Routed { high: as_dyn(&nets.fakes[0]), low: nets.fakes.get(1).and_then(as_dyn), boundary };
        let fake_frozen = Routed { high: as_dyn(&nets.fake_frozen[0]), low: nets.fake_frozen.get(1).and_then(as_dyn), boundary };
        let expert_refs: Vec<&dyn Denoiser> = self.experts.iter().map(|e| e as &dyn Denoiser).collect();
        let phase = Phase {
            sched: self.sched,
            scfg: &self.recipe.schedule,
            tcfg: &self.recipe.train,
            phase: p,
            teacher: &teacher,
            guidance,
            experts: &expert_refs,
            sample_cond: &self.samplers[gi],
            item: &self.geos[gi].item,
            t_range: nets.t_range,
            device: self.device,
        };
        let views = Views { gen: &nets.gen, gen_frozen: &nets.gen_frozen, fake: &fake, fake_frozen: &fake_frozen };
        Ok(phase.iteration_views(rng, &views, gen_opt, fake_opt)?)
    }

    fn end_phase(&mut self, _p: usize) -> Result<Vec<(String, candle_core::Tensor)>> {
        let mut nets = self.current.take().ok_or_else(|| Error::internal("transformer phase ended twice"))?;
        let expert = nets.gen.lora_file_tensors()?;
        self.experts.push(nets.gen_frozen);
        Ok(expert)
    }

    fn describe(&self) -> String {
        format!(", latent {:?}, batch {}", self.geos[self.last_geo].latent, self.recipe.train.batch)
    }

    fn load_expert(&mut self, k: usize, path: &Path) -> Result<()> {
        let mut e = self.bases[self.gen_base(k)].base_view();
        e.load_lora_file(path)?;
        self.experts.push(e.frozen_view());
        Ok(())
    }
}

/// Train a transformer recipe into `out` (see the module docs; called by [`super::train`]).
pub fn train(r: &Recipe, recipe_text: &str, out: &Path, opts: &TrainOptions, on: &dyn Fn(&Event)) -> Result<Summary> {
    let t0 = Instant::now();
    let tc = r.transformer.clone().ok_or_else(|| Error::usage(format!("recipe: model '{}' needs a [transformer] section", r.model)))?;
    let paths = teachers::checked_paths(r, &tc)?;
    let device = opts.device.clone();
    if opts.check_memory {
        let plan = super::plan::plan(r, &device, super::plan::capacity(&device, opts.device_memory))?;
        if let Some(why) = plan.refusal() {
            return Err(Error::new(Kind::Limit, format!("memory plan: {why} (`phasekit train --plan` shows every part)")));
        }
    }
    // Data parallelism: every rank trains its own batches from the same initial weights and
    // averages the gradients (one rank: the communicator does nothing). Only rank 0 writes.
    let comm = dist::connect(&opts.dist, &device)?;
    let lead = comm.rank() == 0;
    let dtype = parse_dtype(&tc.dtype)?;
    let activations = activation_dtype(&tc)?;
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
            let mut b = Net::open_as(p, dtype, &device)?;
            b.set_checkpoint(tc.recompute_blocks);
            b.set_checkpoint_segments(tc.recompute_segments);
            b.set_activations(activations);
            bases.push(b);
        }
    }
    if bases.len() == 2 && bases[0].family() != bases[1].family() {
        return Err(Error::inconsistent(&paths[1], "the two teacher experts are different model families"));
    }
    let (geos, geo_w) = geometries(r, &tc, &bases[0])?;
    let latents: Vec<[usize; 3]> = geos.iter().map(|g| g.latent).collect();
    // A file's image conditions are checked against every training size as they load.
    let emb = Embeddings::load(&tc.embeddings, &bases[0], &latents, Some(r.task()), r.seed, &device)?;
    for b in bases.iter_mut() {
        b.set_null_text(emb.negative.clone());
        b.set_img_shape(geos[0].img_shape);
    }
    let run = RunDir::new(out);
    let recipe_sha = if lead { run.prepare(opts.resume, recipe_text)? } else { sha256_hex(recipe_text.as_bytes()) };
    let emb_file = if tc.embeddings.starts_with("random:") {
        if lead {
            rundir::write_tensors(&out.join("embeddings.safetensors"), &emb.tensors(), &[])?;
        }
        "embeddings.safetensors".to_string()
    } else {
        std::path::absolute(&tc.embeddings).unwrap_or_else(|_| PathBuf::from(&tc.embeddings)).display().to_string()
    };
    let digests = paths.iter().map(|p| teacher_digest(p)).collect::<Result<Vec<_>>>()?;
    let teacher_sha = sha256_hex(digests.join(",").as_bytes());
    let teacher_views: Vec<Net> = bases.iter().map(|b| b.frozen_view()).collect();
    let n_prompts = emb.count();
    let samplers: Vec<Sampler> = geos
        .iter()
        .map(|g| {
            let (emb, latent) = (&emb, g.latent);
            Box::new(move |rng: &mut Rng, n: usize| -> candle_core::Result<Cond> {
                let idx: Vec<u32> = (0..n).map(|_| rng.below(n_prompts) as u32).collect();
                emb.cond(&idx, latent)
            }) as Sampler
        })
        .collect();
    let mut student = TransformerStudent {
        recipe: r,
        tc: &tc,
        sched: &sched,
        bases: &bases,
        teacher: &teacher_views,
        geos: &geos,
        geo_weights: &geo_w,
        samplers,
        device: &device,
        experts: Vec::new(),
        current: None,
        last_geo: 0,
    };
    let gen_base = |p: usize| expert_of(sched.sigmas[sched.phases[p].start], tc.expert_boundary);
    let cfg = LoopConfig {
        comm: comm.clone(),
        ranges: sched.expert_ranges(tc.expert_boundary, &gen_base),
        ..LoopConfig::new(r, &sched, &run, (&recipe_sha, &teacher_sha), opts, on, t0)
    };
    // The heap's high-water mark of phase 1 starts here, loading done (loading holds one
    // tensor's transient copy at a time; what the plan predicts is the training's peak).
    crate::alloc::reset_peak();
    let end = phases::run(&mut student, &cfg)?;
    let report = Some(phases::dist_report(&*comm, &end.expert_digests));
    if !end.summary.completed {
        return Ok(Summary { dist: report, ..end.summary });
    }
    if lead {
        write_outputs(r, &tc, &run, &sched, &paths, &digests, &recipe_sha, &geos[0], &emb_file, &gen_base, bases[0].family())?;
        let plots = out.join("plots");
        std::fs::create_dir_all(&plots).with_file(&plots)?;
        super::plot::loss_plot(out, &plots)?;
    }
    Ok(Summary { dist: report, seconds: t0.elapsed().as_secs_f64(), ..end.summary })
}
