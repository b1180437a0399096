//! The phase loop: the one place where a Phased DMD run walks its phases, whatever the student.
//!
//! For each phase `p` (from the resume point on) it asks the [`Student`] for a fresh generator
//! and fake (trainable variables by name), builds their AdamW optimisers, restores both and the
//! run's generator from the newest checkpoint when resuming inside `p`, then runs the phase's
//! generator updates: each is [`Student::iteration`] (TTUR fake updates and one generator
//! update), followed by the bookkeeping every run shares — refuse non-finite losses, log,
//! report progress, checkpoint when due (trainable tensors, optimiser moments, every rank's RNG
//! state), stop when `--stop-after` says so. At the phase end the student hands over the
//! expert's tensors, which every rank checks are the same (data parallelism) and rank 0 writes.
//!
//! A resumed run replays exactly what an uninterrupted one would: the checkpoint holds every
//! number the loop's future depends on (weights, moments, step counters, RNG states).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;

use super::dist::{self, Communicator};
use super::dmd::StepLosses;
use super::memory::{self, PhaseMemory};
use super::optim::{AdamW, ParamsAdamW, Trainable};
use super::recipe::Recipe;
use super::rundir::{CheckpointInfo, Event, LogLine, RunDir, RunLog, Summary, CHECKPOINT_FORMAT};
use super::schedule::Schedule;
use super::TrainOptions;
use crate::error::{Error, Result};
use crate::hash::sha256_hex;
use crate::rng::Rng;

/// What a family of students (the toy MLP, the transformers) gives the phase loop.
pub trait Student {
    /// A fresh generator and fake score for phase `p`, as named trainable variables (the loop
    /// overwrites their values from a checkpoint when it resumes inside `p`).
    fn start_phase(&mut self, p: usize) -> Result<(Trainable, Trainable)>;
    /// One iteration of phase `p`: `ttur` fake updates, then one generator update.
    fn iteration(&mut self, p: usize, rng: &mut Rng, gen_opt: &mut AdamW, fake_opt: &mut AdamW) -> Result<StepLosses>;
    /// Phase `p` is done: the tensors of its expert file; the generator becomes expert `p`
    /// (frozen) for the later phases.
    fn end_phase(&mut self, p: usize) -> Result<Vec<(String, Tensor)>>;
    /// Resuming after phase `k` ended: expert `k` from its file.
    fn load_expert(&mut self, k: usize, path: &Path) -> Result<()>;
    /// What the current iteration trains on (e.g. its latent size), for error messages.
    fn describe(&self) -> String {
        String::new()
    }
}

/// Everything the loop needs besides the student.
pub struct LoopConfig<'a> {
    pub recipe: &'a Recipe,
    pub schedule: &'a Schedule,
    pub run: &'a RunDir,
    pub recipe_sha: &'a str,
    /// Identity of the teacher; a checkpoint of another teacher is refused.
    pub teacher_sha: &'a str,
    /// `resume`, `stop_after`, and the device the memory figures are read from.
    pub opts: &'a TrainOptions,
    pub on: &'a dyn Fn(&Event),
    pub comm: Arc<dyn Communicator>,
    pub t0: Instant,
    /// Each expert's routed σ range (written into its file's metadata).
    pub ranges: Vec<(f64, f64)>,
}

impl<'a> LoopConfig<'a> {
    /// A one-rank loop over `run` started at `t0`, with the recipe and teacher identities given.
    pub fn new(
        recipe: &'a Recipe,
        schedule: &'a Schedule,
        run: &'a RunDir,
        ids: (&'a str, &'a str),
        opts: &'a TrainOptions,
        on: &'a dyn Fn(&Event),
        t0: Instant,
    ) -> Self {
        let ranges = schedule.expert_ranges(None, &|_| 0);
        LoopConfig { recipe, schedule, run, recipe_sha: ids.0, teacher_sha: ids.1, opts, on, comm: dist::single(), t0, ranges }
    }
}

/// How the loop ended.
pub struct LoopEnd {
    /// The summary to return (`completed` false when `--stop-after` stopped the run).
    pub summary: Summary,
    /// Digest of each expert this process finished (the same on every rank), in phase order.
    pub expert_digests: Vec<String>,
}

/// Run the phases of `cfg.recipe` with `student` (see the module docs).
pub fn run(student: &mut dyn Student, cfg: &LoopConfig) -> Result<LoopEnd> {
    let r = cfg.recipe;
    let sched = cfg.schedule;
    let comm = &cfg.comm;
    let (rank, lead) = (comm.rank(), comm.rank() == 0);
    // Each rank draws its own batches (seed + rank; rank 0's stream is the one-rank run's).
    let mut rng = Rng::new(r.seed.wrapping_add(rank as u64));
    let (mut start_phase, mut start_step, mut resumed_from) = (0, 0, None);
    let mut restored: Option<(CheckpointInfo, std::collections::HashMap<String, Tensor>, std::path::PathBuf)> = None;
    if cfg.opts.resume {
        if let Some((info, path)) = cfg.run.latest_checkpoint()? {
            if info.recipe_sha256 != cfg.recipe_sha || info.teacher_sha256 != cfg.teacher_sha {
                return Err(Error::inconsistent(&path, "checkpoint belongs to another recipe or teacher"));
            }
            let (t, _) = super::rundir::read_tensors(&path)?;
            rng.state = resume_rng_state(&info, rank, r.seed);
            start_phase = info.phase;
            start_step = info.step;
            resumed_from = Some(info.global_step);
            restored = Some((info, t.into_iter().collect(), path));
        }
    }
    let at = comm.all_gather_u64(resumed_from.unwrap_or(u64::MAX))?;
    if at.iter().any(|g| *g != at[0]) {
        let say = |g: &u64| if *g == u64::MAX { "none".to_string() } else { format!("step {g}") };
        return Err(Error::inconsistent(
            &cfg.run.path,
            format!(
                "the ranks found different checkpoints to resume from ({}): every rank must read the same run folder",
                at.iter().map(say).collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    let mut log = if lead { cfg.run.open_log(cfg.opts.resume, resumed_from.unwrap_or(0))? } else { RunLog::none() };
    for k in 0..start_phase {
        student.load_expert(k, &cfg.run.expert(k))?;
    }
    let gen_params = ParamsAdamW {
        lr: r.train.gen_lr,
        beta1: r.train.betas[0],
        beta2: r.train.betas[1],
        eps: r.train.eps,
        weight_decay: r.train.weight_decay,
    };
    let fake_params = ParamsAdamW { lr: r.train.fake_lr, ..gen_params.clone() };
    let phases = sched.phases.len();
    let total: u64 = (0..phases).map(|p| r.updates(p)).sum();
    let mut memory: Vec<PhaseMemory> = Vec::new();
    let mut digests: Vec<String> = Vec::new();
    let mut global: u64 = (0..start_phase).map(|p| r.updates(p)).sum::<u64>() + start_step;
    let summary = |completed: bool, global: u64, memory: &[PhaseMemory]| Summary {
        run_dir: cfg.run.path.clone(),
        completed,
        global_step: global,
        seconds: cfg.t0.elapsed().as_secs_f64(),
        resumed_from,
        metrics: None,
        memory: memory.to_vec(),
        dist: None,
    };
    for p in start_phase..phases {
        let (gen_tr, fake_tr) = student.start_phase(p)?;
        let mut gen_opt = AdamW::new(gen_tr.vars.clone(), gen_params.clone())?.with_comm(comm.clone());
        let mut fake_opt = AdamW::new(fake_tr.vars.clone(), fake_params.clone())?.with_comm(comm.clone());
        let mut first = 0;
        if let Some((info, t, path)) = restored.take().filter(|(info, _, _)| info.phase == p) {
            gen_tr.restore("gen.", &t, &path)?;
            fake_tr.restore("fake.", &t, &path)?;
            gen_opt.restore("gen_opt.", &gen_tr.names, &t, &path)?;
            fake_opt.restore("fake_opt.", &fake_tr.names, &t, &path)?;
            gen_opt.step_t = info.gen_opt_step;
            fake_opt.step_t = info.fake_opt_step;
            first = info.step;
        }
        let save = |step: u64, global: u64, rng: &Rng, gen_opt: &AdamW, fake_opt: &AdamW| -> Result<()> {
            let rng_states = comm.all_gather_u64(rng.state)?;
            if !lead {
                return Ok(());
            }
            let mut t = gen_tr.tensors("gen.");
            t.extend(fake_tr.tensors("fake."));
            t.extend(gen_opt.state_tensors("gen_opt.", &gen_tr.names));
            t.extend(fake_opt.state_tensors("fake_opt.", &fake_tr.names));
            let info = CheckpointInfo {
                format: CHECKPOINT_FORMAT.into(),
                phase: p,
                step,
                global_step: global,
                rng_state: rng.state,
                gen_opt_step: gen_opt.step_t,
                fake_opt_step: fake_opt.step_t,
                recipe_sha256: cfg.recipe_sha.to_string(),
                teacher_sha256: cfg.teacher_sha.to_string(),
                rng_states: if rng_states.len() > 1 { rng_states } else { Vec::new() },
            };
            cfg.run.save_checkpoint(&info, &t, r.train.keep_checkpoints)
        };
        let n = r.updates(p);
        for step in first..n {
            let doing = format!("training phase {}/{phases}, update {}/{n}", p + 1, step + 1);
            crate::alloc::set_activity(&doing);
            let l = student
                .iteration(p, &mut rng, &mut gen_opt, &mut fake_opt)
                .map_err(|e| out_of_memory(e, &format!("{doing}{}", student.describe()), &cfg.opts.device))?;
            global += 1;
            let done = step + 1;
            if !l.gen.is_finite() || !l.fake.is_finite() {
                return Err(Error::internal(format!("phase {p} step {done}: loss is not finite (gen {}, fake {})", l.gen, l.fake)));
            }
            let mem = (done == n).then(|| memory::phase_end(p, &cfg.opts.device));
            memory.extend(mem.clone());
            if r.train.log_every > 0 && (done % r.train.log_every == 0 || done == n) {
                log.append(&LogLine {
                    phase: p,
                    step: done,
                    global_step: global,
                    gen_loss: l.gen,
                    fake_loss: l.fake,
                    gen_grad_norm: l.gen_grad_norm,
                    seconds: cfg.t0.elapsed().as_secs_f64(),
                    memory: mem,
                })?;
            }
            (cfg.on)(&Event::Step { phase: p, phases, global_step: global, total, gen_loss: l.gen, fake_loss: l.fake });
            if (r.train.checkpoint_every > 0 && done % r.train.checkpoint_every == 0) || done == n {
                save(done, global, &rng, &gen_opt, &fake_opt)?;
            }
            if cfg.opts.stop_after.is_some_and(|s| global >= s) {
                return Ok(LoopEnd { summary: summary(false, global, &memory), expert_digests: digests });
            }
        }
        if first == n && n == 0 {
            save(0, global, &rng, &gen_opt, &fake_opt)?;
        }
        let expert = student.end_phase(p)?;
        // The ranks took the same updates, so they hold the same expert: checked, not assumed.
        let digest = dist::tensors_digest(&expert)?;
        let short = u64::from_str_radix(&digest[..16], 16).unwrap_or(0);
        let all = comm.all_gather_u64(short)?;
        if all.iter().any(|d| *d != all[0]) {
            return Err(Error::internal(format!("phase {p}: the ranks' experts differ after the phase (digests {all:x?})")));
        }
        digests.push(digest);
        if lead {
            cfg.run.write_expert(p, &expert, cfg.ranges[p])?;
        }
    }
    Ok(LoopEnd { summary: summary(true, global, &memory), expert_digests: digests })
}

/// An out-of-memory error gets what the run was doing and what the device still has.
fn out_of_memory(e: Error, doing: &str, device: &candle_core::Device) -> Error {
    if e.kind() != crate::Kind::Limit {
        return e;
    }
    let free =
        crate::device::free_bytes(device).map(|b| format!("; {} free on the device", crate::progress::human_bytes(b))).unwrap_or_default();
    Error::new(crate::Kind::Limit, format!("{doing}: {}{free}", e.message()))
}

/// RNG state of `rank` when resuming from `info`: its saved state, or (a rank the checkpoint
/// did not have) a stream derived from `seed + rank` and the checkpoint's step.
pub fn resume_rng_state(info: &CheckpointInfo, rank: usize, seed: u64) -> u64 {
    if let Some(s) = info.rng_states.get(rank) {
        return *s;
    }
    if rank == 0 {
        return info.rng_state;
    }
    Rng::new(seed.wrapping_add(rank as u64) ^ info.global_step.wrapping_mul(0x9E37_79B9_7F4A_7C15)).fork().state
}

/// What a data-parallel run reports about this rank: its digest over the experts it finished.
pub fn dist_report(comm: &dyn Communicator, digests: &[String]) -> dist::DistReport {
    dist::DistReport {
        rank: comm.rank(),
        world_size: comm.world_size(),
        backend: comm.backend().to_string(),
        weights_sha256: sha256_hex(digests.join(",").as_bytes()),
    }
}
