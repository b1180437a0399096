//! The embedded default: Phased DMD on an 8-mode Gaussian mixture with a small MLP student.
//!
//! The teacher is an MLP pretrained by flow matching on mixture samples ([`pretrain_teacher`],
//! or a teacher file), or the exact mixture velocity; each phase's generator starts as a copy
//! of the teacher MLP, and so does each fake (or it carries over from the previous phase when
//! `fake_reinit = false`). The phase loop is [`crate::train::phases`]; this module adds what the
//! toy writes besides it: `teacher.safetensors`, `toy.json` (read by [`sample::LoadedRun`]), the
//! assembler's manifest, and, with `eval_samples`, `summary.json` and the plots.

pub mod mlp;
pub mod sample;

use std::path::Path;
use std::time::Instant;

use candle_core::Device;

use self::mlp::{class_cond, ExactMixture, Mlp};
use self::sample::{ExpertEntry, LoadedRun, Manifest, TeacherEntry, ToyModelConfig, TOY_FORMAT, TOY_INFO};
use super::dmd::{self, Phase, StepLosses};
use super::metrics;
use super::mixture::Mixture;
use super::optim::{AdamW, ParamsAdamW, Trainable};
use super::phases::{self, LoopConfig, Student};
use super::recipe::{Recipe, TeacherKind};
use super::rundir::{self, Event, RunDir, Summary};
use super::schedule::Schedule;
use super::TrainOptions;
use crate::error::{Error, IoContext, Result};
use crate::hash::sha256_hex;
use crate::model::denoiser::{Cond, Denoiser};
use crate::rng::Rng;

/// Pretrain the MLP teacher by flow matching on mixture samples.
pub fn pretrain_teacher(r: &Recipe, mix: &Mixture, progress: &dyn Fn(u64, u64, f64)) -> Result<Mlp> {
    let p = &r.teacher.pretrain;
    let mut rng = Rng::new(r.seed ^ 0x7EAC_4E55);
    let model = Mlp::new(&r.mlp, mix.dim, mix.classes, &mut rng)?;
    let params = ParamsAdamW { lr: p.lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
    let mut opt = AdamW::new(model.vars.clone(), params)?;
    for step in 0..p.steps {
        let (x, mut cls, _) = mix.sample(p.batch, &mut rng);
        for c in cls.iter_mut() {
            if rng.uniform() < p.cond_dropout {
                *c = mix.classes as u32;
            }
        }
        let x0 = candle_core::Tensor::from_vec(x.iter().map(|a| *a as f32).collect::<Vec<f32>>(), (p.batch, mix.dim), &Device::Cpu)?;
        let cond = class_cond(cls)?;
        let loss = dmd::flow_matching_loss(&model, &x0, &cond, &mut rng)?;
        let frac = step as f64 / p.steps as f64;
        opt.params.lr = if frac < 0.5 { p.lr } else { p.lr * 2.0 * (1.0 - frac) };
        let g = loss.backward()?;
        opt.step(&g, 1.0)?;
        if step % 50 == 0 || step + 1 == p.steps {
            progress(step + 1, p.steps, loss.to_scalar::<f32>()? as f64);
        }
    }
    Ok(model)
}

/// Write a teacher MLP as `RUN_DIR/teacher.safetensors` (or anywhere).
pub fn write_teacher(path: &Path, m: &Mlp) -> Result<()> {
    rundir::write_tensors(path, &m.named_tensors(), &[("phasekit.format".into(), "phasekit-teacher/1".into())])
}

/// The toy's condition sampler (classes from the class prior).
pub fn class_sampler(mix: &Mixture) -> impl Fn(&mut Rng, usize) -> candle_core::Result<Cond> + '_ {
    move |rng: &mut Rng, n: usize| class_cond(mix.sample_classes(n, rng))
}

/// The MLP student: each phase's generator is a fresh copy of the teacher; the fake too, or
/// the previous phase's (`fake_reinit = false`).
struct ToyStudent<'a> {
    recipe: &'a Recipe,
    schedule: &'a Schedule,
    mixture: &'a Mixture,
    teacher: Mlp,
    /// The real score: the teacher MLP (frozen) or the exact mixture.
    real: &'a dyn Denoiser,
    /// Frozen experts of the finished phases.
    experts: Vec<Mlp>,
    current: Option<(Mlp, Mlp)>,
    carried_fake: Option<Mlp>,
}

fn trainable(m: &Mlp) -> Trainable {
    Trainable { names: m.names.clone(), vars: m.vars.clone() }
}

impl Student for ToyStudent<'_> {
    fn start_phase(&mut self, _p: usize) -> Result<(Trainable, Trainable)> {
        let gen = self.teacher.deep_copy()?;
        let fake = match self.carried_fake.take() {
            Some(f) if !self.recipe.train.fake_reinit => f,
            _ => self.teacher.deep_copy()?,
        };
        let tr = (trainable(&gen), trainable(&fake));
        self.current = Some((gen, fake));
        Ok(tr)
    }

    fn iteration(&mut self, p: usize, rng: &mut Rng, gen_opt: &mut AdamW, fake_opt: &mut AdamW) -> Result<StepLosses> {
        let (gen, fake) = self.current.as_ref().ok_or_else(|| Error::internal("toy iteration outside a phase"))?;
        let sampler = class_sampler(self.mixture);
        let expert_refs: Vec<&dyn Denoiser> = self.experts.iter().map(|e| e as &dyn Denoiser).collect();
        let phase = Phase {
            sched: self.schedule,
            scfg: &self.recipe.schedule,
            tcfg: &self.recipe.train,
            phase: p,
            teacher: self.real,
            guidance: self.recipe.teacher.guidance,
            experts: &expert_refs,
            sample_cond: &sampler,
            item: &[self.mixture.dim],
            t_range: None,
            device: &Device::Cpu,
        };
        Ok(phase.iteration(rng, gen, fake, gen_opt, fake_opt)?)
    }

    fn end_phase(&mut self, _p: usize) -> Result<Vec<(String, candle_core::Tensor)>> {
        let (gen, fake) = self.current.take().ok_or_else(|| Error::internal("toy phase ended twice"))?;
        let t = gen.named_tensors();
        self.experts.push(gen.frozen());
        self.carried_fake = Some(fake);
        Ok(t)
    }

    fn load_expert(&mut self, _k: usize, path: &Path) -> Result<()> {
        self.experts.push(Mlp::load(path, &self.recipe.mlp, self.mixture.dim, self.mixture.classes)?.frozen());
        Ok(())
    }
}

/// Train a toy recipe into `out` (called by [`super::train`]).
pub fn train(r: &Recipe, recipe_text: &str, out: &Path, opts: &TrainOptions, on: &dyn Fn(&Event)) -> Result<Summary> {
    let t0 = Instant::now();
    if opts.dist.world_size > 1 {
        return Err(Error::unsupported("data parallel training (WORLD_SIZE > 1) is for transformer recipes; the toy runs on one rank"));
    }
    let sched = r.schedule.build()?;
    let mix = Mixture::new(&r.mixture)?;
    let run = RunDir::new(out);
    let recipe_sha = run.prepare(opts.resume, recipe_text)?;
    // Teacher.
    let teacher_file = match &r.teacher.checkpoint {
        Some(p) => p.clone(),
        None => out.join("teacher.safetensors"),
    };
    let teacher = if teacher_file.exists() {
        Mlp::load(&teacher_file, &r.mlp, mix.dim, mix.classes)?
    } else if r.teacher.checkpoint.is_some() {
        return Err(Error::io(&teacher_file, std::io::Error::new(std::io::ErrorKind::NotFound, "teacher checkpoint not found")));
    } else {
        let m = pretrain_teacher(r, &mix, &|step, total, loss| on(&Event::Pretrain { step, total, loss }))?;
        write_teacher(&teacher_file, &m)?;
        m
    };
    let teacher_sha = sha256_hex(&std::fs::read(&teacher_file).with_file(&teacher_file)?);
    let exact = ExactMixture { mixture: mix.clone() };
    let teacher_frozen = teacher.frozen();
    let real: &dyn Denoiser = match r.teacher.kind {
        TeacherKind::Exact => &exact,
        TeacherKind::Mlp => &teacher_frozen,
    };
    let mut student =
        ToyStudent { recipe: r, schedule: &sched, mixture: &mix, teacher, real, experts: Vec::new(), current: None, carried_fake: None };
    let cfg = LoopConfig::new(r, &sched, &run, (&recipe_sha, &teacher_sha), opts, on, t0);
    let end = phases::run(&mut student, &cfg)?;
    if !end.summary.completed {
        return Ok(end.summary);
    }
    let teacher_entry = TeacherEntry {
        kind: match r.teacher.kind {
            TeacherKind::Exact => "exact-mixture".into(),
            TeacherKind::Mlp => "mlp".into(),
        },
        file: teacher_file.display().to_string(),
        sha256: teacher_sha,
        guidance: r.teacher.guidance,
    };
    write_outputs(r, &sched, &run, teacher_entry, &recipe_sha)?;
    let metrics = if opts.eval_samples > 0 {
        let loaded = LoadedRun::open(out)?;
        let x = loaded.sample(opts.eval_samples, None, r.seed ^ 0xE7A1, None)?;
        let m = metrics::evaluate(&x, &mix, r.seed ^ 0x5EED);
        rundir::write_json(&out.join("summary.json"), &m)?;
        let plots = out.join("plots");
        std::fs::create_dir_all(&plots).with_file(&plots)?;
        super::plot::run_plots(&loaded, &plots, r.seed)?;
        Some(m)
    } else {
        None
    };
    Ok(Summary { metrics, seconds: t0.elapsed().as_secs_f64(), ..end.summary })
}

/// `toy.json` and the assembler's `manifest.json` of a finished toy run.
fn write_outputs(r: &Recipe, sched: &Schedule, run: &RunDir, teacher: TeacherEntry, recipe_sha: &str) -> Result<()> {
    let mut entries = Vec::new();
    let ranges = sched.expert_ranges(None, &|_| 0);
    for (k, ph) in sched.phases.iter().enumerate() {
        let path = run.expert(k);
        let (lo, hi) = ranges[k];
        entries.push(ExpertEntry {
            index: k,
            file: RunDir::expert_rel(k),
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
        method: method_name(r, sched),
        steps: sched.steps(),
        shift: sched.shift,
        solver: r.schedule.rollout.solver().into(),
        sigmas: sched.sigmas.clone(),
        timesteps: sched.sigmas.iter().map(|s| s * 1000.0).collect(),
        inference_guidance: 1.0,
        teacher,
        recipe_sha256: recipe_sha.to_string(),
        mixture: r.mixture.clone(),
        mlp: r.mlp.clone(),
        experts: entries,
    };
    rundir::write_json(&run.path.join(TOY_INFO), &manifest)?;
    rundir::write_json(&run.path.join("manifest.json"), &assembler_manifest(&manifest))
}

/// Human name of the method a recipe describes.
pub fn method_name(r: &Recipe, s: &Schedule) -> String {
    use super::recipe::{Backprop, FakeObjective, FakeWeight, GeneratorWeight};
    use super::schedule::{Renoise, Rollout};
    let n = s.steps();
    let mut m = if s.phases.len() == 1 {
        if n == 1 {
            // DMD2's recipe at one step: no regression loss (DMD's LPIPS term), no GAN.
            "one-step DMD (DMD2-style, no regression loss)".to_string()
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
    } else {
        // Each method's own fake loss goes unsaid: DMD2's plain MSE for the one-phase
        // baselines, Eq. 13's weight for Phased DMD.
        match (s.phases.len() == 1, r.train.fake_weight) {
            (true, FakeWeight::Eq13) => m.push_str(", Eq. 13 fake weight"),
            (false, FakeWeight::None) => m.push_str(", unweighted fake loss"),
            _ => {}
        }
    }
    if r.train.generator_weight == GeneratorWeight::Eq10 {
        m.push_str(", Eq. 10 weight");
    }
    if let Some(t) = r.schedule.renoise_fixed {
        m.push_str(&format!(", fixed t = {t}"));
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

/// The assembler's `phasekit.run/1` manifest of a toy run: full MLP experts, no base, model kind
/// `toy-mlp` with the mixture and MLP shape as its config.
fn assembler_manifest(m: &Manifest) -> crate::moe::manifest::Manifest {
    use crate::moe::format::{ModelInfo, KIND_TOY_MLP};
    use crate::moe::manifest::{Manifest as RunManifest, ManifestExpert, MANIFEST_TAG};
    use crate::moe::routing::ExpertKind;
    let config = ToyModelConfig { method: m.method.clone(), mixture: m.mixture.clone(), mlp: m.mlp.clone() };
    let ranges: Vec<[f64; 2]> = m.experts.iter().map(|e| e.sigma_range).collect();
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
