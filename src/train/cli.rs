//! Commands: `train`, `sample`, `quickstart`, `bench train-toy`, `bench toy-step`. Argument types (doc comments
//! are the help text) and one run function per command; `main.rs` only delegates.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::metrics::{self, table};
use super::quickstart;
use super::recipe::Recipe;
use super::rundir::{self, Event, Summary};
use super::toy::sample::{LoadedMoe, LoadedRun};
use super::TrainOptions;
use crate::cli::printer::print_json;
use crate::error::{Error, Result};
use crate::model::cli::ComputeDtype;

/// `phasekit train`.
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Recipe file (see docs/recipes.md and recipes/*.toml).
    #[arg(long)]
    pub recipe: PathBuf,
    /// Run folder (created; must be empty unless --resume). Not needed with --plan.
    #[arg(long, required_unless_present = "plan")]
    pub out: Option<PathBuf>,
    /// Continue from the newest checkpoint in --out (bit-identical on the CPU).
    #[arg(long)]
    pub resume: bool,
    /// Samples drawn for the final metrics and plots (toy; 0 skips them).
    #[arg(long, default_value_t = 2000)]
    pub eval_samples: usize,
    /// Stop after this many generator updates in total, as if killed (for resume tests).
    #[arg(long, hide = true)]
    pub stop_after: Option<u64>,
    /// Device of transformer runs: cpu, cuda or cuda:N (cuda needs `--features cuda`; the toy
    /// runs on the CPU). Resume is bit-identical on the CPU only.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print the memory plan of a transformer recipe (bytes per part, per phase and resolution,
    /// from the recipe and the checkpoint headers) and the device it was checked against, and
    /// stop: nothing is loaded. `train` makes the same plan first and refuses (exit 9) a run that
    /// does not fit.
    #[arg(long)]
    pub plan: bool,
    /// Memory of the device to plan for, e.g. 141GB or 80GiB (default: what the device reports;
    /// on the CPU the available memory).
    #[arg(long, value_name = "SIZE")]
    pub device_memory: Option<String>,
    /// Start the run even when the memory plan says it does not fit.
    #[arg(long)]
    pub skip_memory_check: bool,
    /// Data parallel (transformer runs): where the ranks meet, tcp://HOST:PORT or file:PATH
    /// (default: MASTER_ADDR and MASTER_PORT). Ranks come from RANK, WORLD_SIZE and LOCAL_RANK
    /// (`--device cuda` picks cuda:LOCAL_RANK); see docs/scale.md.
    #[arg(long, value_name = "ADDR")]
    pub rendezvous: Option<String>,
}

/// `phasekit sample`.
#[derive(Args, Debug, Clone)]
pub struct SampleArgs {
    /// A finished run folder (its manifest and experts).
    #[arg(long, required_unless_present = "moe", conflicts_with = "moe")]
    pub run: Option<PathBuf>,
    /// A routed checkpoint made by `phasekit assemble`, of toy or of Wan2.2 / Qwen-Image
    /// experts (full or LoRA), sampled through the loader: each step by the expert whose σ
    /// range holds its σ.
    #[arg(long, value_name = "FILE")]
    pub moe: Option<PathBuf>,
    /// Transformers: the prompt embeddings, a safetensors file with `prompt_embeds` [N, L, C]
    /// (e.g. RUN_DIR/embeddings.safetensors, or the file the recipe names), or random:N (N
    /// standard-normal prompts drawn from --cond-seed, never from --seed). Sample i takes prompt
    /// i mod N. Required with a transformer --moe; --run defaults to the run's. Image-to-video
    /// (Wan2.2): the file's `image_condition` gives sample i the image of prompt i mod N (required
    /// for I2V-A14B; docs/recipes.md, Image-to-video).
    #[arg(long, value_name = "FILE")]
    pub cond: Option<String>,
    /// Transformers: seed of --cond random:N's prompts (default 0), independent of --seed, so
    /// other noise seeds sample the same prompts. random:N with --cond-seed S draws the prompts a
    /// recipe with `embeddings = "random:N"` and `seed = S` trained on (its
    /// RUN_DIR/embeddings.safetensors).
    #[arg(long, value_name = "SEED")]
    pub cond_seed: Option<u64>,
    /// Transformers: compute dtype of the experts, f32, bf16 or f16 (default: f32 for --moe; for
    /// --run the dtype the run trained in). As `forward --dtype`: bf16 and f16 hold the weights
    /// in 16 bits; activations, norms, softmax and LoRA adapters stay f32, and so do the
    /// sampler's noise, latents and Euler updates. The toy samples in f32 only.
    #[arg(long, value_enum)]
    pub dtype: Option<ComputeDtype>,
    /// Transformers: the device the experts compute on, cpu, cuda or cuda:N (cuda needs
    /// `--features cuda`; the toy samples on the CPU).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Transformers: latent frames (default: the run's, or the checkpoint's phasekit.moe.sample).
    #[arg(long)]
    pub frames: Option<usize>,
    /// Transformers: latent height (latent pixels, not image pixels).
    #[arg(long)]
    pub height: Option<usize>,
    /// Transformers: latent width.
    #[arg(long)]
    pub width: Option<usize>,
    /// Number of samples.
    #[arg(long, default_value_t = 1000)]
    pub n: usize,
    /// Euler steps (default: the run's or checkpoint's step list; other counts use its shift
    /// and route each σ to the expert whose range holds it).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Class of every sample (default: drawn from the class prior).
    #[arg(long)]
    pub class: Option<u32>,
    /// Seed of the noise (and the toy's class draws); --cond random:N's prompts do not depend on it.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output safetensors file with tensor `samples` [N, d].
    #[arg(long)]
    pub out: PathBuf,
    /// Replace --out if it exists.
    #[arg(long)]
    pub force: bool,
}

/// `phasekit quickstart`.
#[derive(Args, Debug, Clone)]
pub struct QuickstartArgs {
    /// Output folder (teacher, runs, plots, metrics).
    #[arg(long, default_value = "phasekit-quickstart")]
    pub out: PathBuf,
    /// Replace --out if it exists.
    #[arg(long)]
    pub force: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `phasekit bench train-toy`.
#[derive(Args, Debug, Clone)]
pub struct BenchTrainToyArgs {
    /// Seeds per method.
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Generator updates per run (split evenly over a run's phases).
    #[arg(long, default_value_t = 2000)]
    pub updates: u64,
    /// Samples per evaluation.
    #[arg(long, default_value_t = 2000)]
    pub eval_samples: usize,
    /// Write the Markdown tables here (e.g. docs/results.md).
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Scratch folder for the runs (default: a temporary folder).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Only these methods (comma-separated keys; default: the main table's eight). Ablations:
    /// dmd2-eq13, onestep-eq13 (Eq. 13 fake weight on the baselines), phased4-eq10,
    /// phased2-sgts-eq10, dmd2-eq10 (Eq. 10 generator weight), dmd2-t357, dmd2-t882,
    /// onestep-t357, onestep-t882 (fixed re-noise level).
    #[arg(long)]
    pub only: Option<String>,
    /// Train and evaluate on the `[mixture]` of this recipe instead of the default one (e.g.
    /// recipes/toy-phased-4step-4phase-weighted.toml: unequal mode weights).
    #[arg(long, value_name = "RECIPE")]
    pub mixture: Option<PathBuf>,
}

/// `phasekit bench toy-step`.
#[derive(Args, Debug, Clone)]
pub struct BenchToyStepArgs {
    /// Generator updates per side (split evenly over the 4 phases of `phased4`).
    #[arg(long, default_value_t = 200)]
    pub updates: u64,
    /// First updates left out of the median (per side).
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// Flow-matching steps of the teacher the generator and fake start from (its quality does
    /// not change the work an update does; `bench train-toy` uses 1500).
    #[arg(long, default_value_t = 300)]
    pub pretrain_steps: u64,
    /// Skip the PyTorch comparison.
    #[arg(long)]
    pub no_python: bool,
}

fn bar(total: u64, quiet: bool) -> ProgressBar {
    let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr_with_hz(8));
    if quiet || !std::io::stderr().is_terminal() {
        b.set_draw_target(ProgressDrawTarget::hidden());
    }
    b.set_style(
        ProgressStyle::with_template("{prefix:>9} [{bar:28}] {pos}/{len} {per_sec} ETA {eta} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    b
}

/// Run one recipe with a progress bar.
fn train_with_bar(r: &Recipe, text: &str, out: &Path, opts: &TrainOptions, quiet: bool, label: &str) -> Result<Summary> {
    let b = bar(1, quiet);
    b.set_prefix(label.to_string());
    let on = |e: &Event| match e {
        Event::Pretrain { step, total, loss } => {
            b.set_length(*total);
            b.set_position(*step);
            b.set_message(format!("teacher flow-matching loss {loss:.4}"));
        }
        Event::Step { phase, phases, global_step, total, gen_loss, fake_loss } => {
            if b.length() != Some(*total) {
                b.reset();
                b.set_length(*total);
            }
            b.set_position(*global_step);
            b.set_message(format!("phase {}/{phases} gen {gen_loss:.4} fake {fake_loss:.4}", phase + 1));
        }
    };
    let s = super::train(r, text, out, opts, &on);
    b.finish_and_clear();
    s
}

/// `phasekit train`.
pub fn train(a: &TrainArgs, json: bool, quiet: bool) -> Result<()> {
    super::single_threaded_kernels();
    let (r, text) = Recipe::load(&a.recipe)?;
    let dist = super::dist::DistConfig::from_env(a.rendezvous.as_deref())?;
    if dist.world_size > 1 && r.model == "toy" {
        return Err(Error::unsupported("data parallel training (WORLD_SIZE > 1) is for transformer recipes; the toy runs on one rank"));
    }
    // With several ranks, `--device cuda` means this rank's GPU, cuda:LOCAL_RANK.
    let device = if dist.world_size > 1 && a.device.trim().eq_ignore_ascii_case("cuda") {
        format!("cuda:{}", dist.local_rank)
    } else {
        a.device.clone()
    };
    let dev = crate::device::parse(&device)?;
    if !matches!(dev, candle_core::Device::Cpu) && r.model == "toy" {
        return Err(Error::unsupported("the toy trainer runs on the CPU (its mixture and MLP are too small for a GPU); use --device cpu"));
    }
    let device_memory = a.device_memory.as_deref().map(crate::cli::args::parse_size).transpose()?;
    if a.plan {
        if r.is_toy() {
            return Err(Error::usage("--plan is for transformer recipes (the toy needs a few MiB)"));
        }
        let plan = super::plan::plan(&r, &dev, super::plan::capacity(&dev, device_memory))?;
        if json {
            print_json(&serde_json::json!({ "ok": true, "plan": plan }));
        } else {
            print!("{}", plan.render());
        }
        return Ok(());
    }
    let out = a.out.clone().ok_or_else(|| Error::usage("train needs --out (the run folder)"))?;
    let opts = TrainOptions {
        resume: a.resume,
        stop_after: a.stop_after,
        eval_samples: a.eval_samples,
        dist,
        device: dev,
        device_memory,
        check_memory: !a.skip_memory_check,
    };
    let s = train_with_bar(&r, &text, &out, &opts, quiet || json || opts.dist.rank > 0, "train")?;
    if json {
        print_json(&serde_json::json!({ "ok": true, "summary": s }));
    } else {
        let state = if s.completed { "finished" } else { "stopped" };
        match &s.dist {
            Some(d) if d.world_size > 1 => println!(
                "{state} {} after {} generator updates in {:.1} s on rank {} of {} ({}) → {}",
                r.name,
                s.global_step,
                s.seconds,
                d.rank,
                d.world_size,
                d.backend,
                if d.rank == 0 { out.display().to_string() } else { "rank 0 writes the run".to_string() }
            ),
            _ => println!("{state} {} after {} generator updates in {:.1} s → {}", r.name, s.global_step, s.seconds, out.display()),
        }
        for m in &s.memory {
            let gib = |b: u64| {
                if b < 1 << 30 {
                    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
                } else {
                    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
                }
            };
            let mut line = match m.peak_rss_bytes {
                Some(b) => format!("phase {}: peak resident memory {}", m.phase + 1, gib(b)),
                None => format!("phase {}: peak resident memory unknown", m.phase + 1),
            };
            if m.peak_rss_scope != "phase" {
                line.push_str(" (process peak: the per-phase reset is not permitted here)");
            }
            if let Some(b) = m.device_peak_bytes {
                line.push_str(&format!(", device pool peak {}", gib(b)));
            }
            if let Some(b) = m.device_used_bytes {
                line.push_str(&format!(", device in use at the end {}", gib(b)));
            }
            println!("{line}");
        }
        if let Some(m) = &s.metrics {
            println!("{}", table(&[(r.name.clone(), m.clone())]));
        }
    }
    Ok(())
}

/// `phasekit sample`.
pub fn sample(a: &SampleArgs, json: bool) -> Result<()> {
    super::single_threaded_kernels();
    crate::atomic::check_target(&a.out, a.force)?;
    let (source, key) = match (&a.run, &a.moe) {
        (Some(r), None) => (r, "phasekit.run"),
        (None, Some(m)) => (m, "phasekit.moe"),
        _ => return Err(Error::usage("give exactly one of --run RUN_DIR and --moe FILE")),
    };
    let toy = match (&a.run, &a.moe) {
        (Some(r), _) => !super::transformer::outputs::is_transformer_run(r),
        (_, Some(m)) => crate::moe::MoeCheckpoint::open(m)?.meta().model.kind.as_deref() == Some(crate::moe::format::KIND_TOY_MLP),
        _ => unreachable!("checked above"),
    };
    if !toy {
        return sample_transformer(a, source, key, json);
    }
    if let Some(d) = a.dtype.filter(|d| *d != ComputeDtype::F32) {
        return Err(Error::unsupported(format!(
            "--dtype {}: the toy MLP (toy-mlp) samples in f32 only; --dtype is for Wan2.2 and Qwen-Image runs and checkpoints",
            dtype_name(d.dtype())
        )));
    }
    if a.cond.is_some() || a.cond_seed.is_some() || a.frames.is_some() || a.height.is_some() || a.width.is_some() {
        return Err(Error::usage("--cond, --cond-seed, --frames, --height and --width are for transformer runs and checkpoints"));
    }
    if a.n == 0 || a.steps == Some(0) {
        return Err(Error::usage("--n and --steps must be at least 1"));
    }
    let class_ok = |mix: &super::mixture::Mixture| match a.class {
        Some(c) if c as usize >= mix.classes => Err(Error::usage(format!("--class {c}: the model has {} classes", mix.classes))),
        _ => Ok(()),
    };
    let (x, mixture, method, default_steps) = if a.moe.is_some() {
        let m = LoadedMoe::open(source)?;
        class_ok(&m.mixture)?;
        (m.sample(a.n, a.steps, a.seed, a.class)?, m.mixture, m.config.method, m.routing.steps as usize)
    } else {
        let r = LoadedRun::open(source)?;
        class_ok(&r.mixture)?;
        (r.sample(a.n, a.steps, a.seed, a.class)?, r.mixture, r.manifest.method, r.manifest.steps)
    };
    let md = vec![
        ("phasekit.format".to_string(), "phasekit-samples/1".to_string()),
        (key.to_string(), source.display().to_string()),
        ("phasekit.steps".to_string(), a.steps.unwrap_or(default_steps).to_string()),
    ];
    rundir::write_tensors(&a.out, &[("samples".to_string(), x.clone())], &md)?;
    let m = metrics::evaluate(&x, &mixture, a.seed ^ 0x5EED);
    if json {
        print_json(&serde_json::json!({ "ok": true, "out": a.out, "n": a.n, "dtype": "f32", "metrics": m }));
    } else {
        println!("wrote {} samples → {}", a.n, a.out.display());
        println!("{}", table(&[(method, m)]));
    }
    Ok(())
}

/// `phasekit sample` on a transformer run (`--run`) or routed checkpoint (`--moe`): latents, no metrics.
fn sample_transformer(a: &SampleArgs, source: &Path, key: &str, json: bool) -> Result<()> {
    use super::transformer::data::{latent_geometry, Embeddings};
    use super::transformer::sample::{RoutedTransformer, TransformerRun};
    if a.class.is_some() {
        return Err(Error::usage("--class is for the toy; a transformer run conditions sample i on prompt i mod N"));
    }
    if a.n == 0 || a.steps == Some(0) {
        return Err(Error::usage("--n and --steps must be at least 1"));
    }
    if a.cond.as_deref() == Some("") {
        return Err(Error::usage("--cond is empty (a safetensors file with prompt_embeds, or random:N)"));
    }
    // random:N draws its prompts from --cond-seed (default 0), never from the noise seed.
    let cond_seed = match (a.cond_seed, a.cond.as_deref()) {
        (Some(_), c) if !c.is_some_and(|c| c.starts_with("random:")) => {
            return Err(Error::usage(
                "--cond-seed is the seed of --cond random:N; it has no effect on a file of embeddings or on the run's own",
            ))
        }
        (s, _) => s.unwrap_or(0),
    };
    let dev = crate::device::parse(&a.device)?;
    let shape = [a.frames, a.height, a.width];
    let (x, family, steps, dtype) = if a.run.is_some() {
        let run = TransformerRun::open_as(source, a.dtype.map(|d| d.dtype()), &dev)?;
        let l = run.info.geometry.latent;
        let geo = latent_geometry(&run.experts[0], [0, 1, 2].map(|k| shape[k].unwrap_or(l[k])))?;
        let task = Some(run.info.task);
        // --cond is checked against the size as it loads; the run's own conditions here.
        let given = a.cond.as_deref().map(|c| Embeddings::load(c, &run.experts[0], &[geo.latent], task, cond_seed, &dev)).transpose()?;
        let emb = match &given {
            Some(e) => e,
            None => {
                run.emb.check_latent(&run.experts[0], geo.latent).map_err(Error::usage)?;
                &run.emb
            }
        };
        let x = run.sample_with(a.n, a.steps, a.seed, &geo, emb)?;
        (x, run.info.family, run.info.steps, run.dtype)
    } else {
        let dtype = a.dtype.unwrap_or(ComputeDtype::F32).dtype();
        let m = RoutedTransformer::open(source, dtype, &dev)?;
        let cond = a.cond.as_deref().ok_or_else(|| {
            Error::usage(
                "a transformer checkpoint needs --cond FILE: prompt embeddings (prompt_embeds [N, L, C]), e.g. RUN_DIR/embeddings.safetensors",
            )
        })?;
        let geo = m.geometry(shape)?;
        let emb = Embeddings::load(cond, &m.experts[0], &[geo.latent], None, cond_seed, &dev)?;
        (m.sample(a.n, a.steps, a.seed, &geo, &emb)?, m.family, m.routing.steps as usize, dtype)
    };
    let dtype = dtype_name(dtype);
    let md = vec![
        ("phasekit.format".to_string(), "phasekit-samples/1".to_string()),
        (key.to_string(), source.display().to_string()),
        ("phasekit.steps".to_string(), a.steps.unwrap_or(steps).to_string()),
        ("phasekit.layout".to_string(), if family == "qwen_image" { "packed [N, S, C]" } else { "[N, C, F, H, W]" }.to_string()),
        ("phasekit.dtype".to_string(), dtype.clone()),
    ];
    rundir::write_tensors(&a.out, &[("samples".to_string(), x.clone())], &md)?;
    if json {
        print_json(&serde_json::json!({ "ok": true, "out": a.out, "n": a.n, "shape": x.dims(), "dtype": dtype }));
    } else {
        println!("wrote {} latents {:?} ({dtype} experts) → {}", a.n, x.dims(), a.out.display());
    }
    Ok(())
}

/// `f32`, `bf16` or `f16`.
fn dtype_name(d: candle_core::DType) -> String {
    format!("{d:?}").to_lowercase()
}

/// Progress bars for quickstart's stages and jobs.
struct Bars {
    mp: MultiProgress,
    quiet: bool,
    json: bool,
}

impl quickstart::Progress for Bars {
    fn stage(&self, msg: &str) {
        if self.json {
            return;
        }
        if self.mp.is_hidden() {
            eprintln!("{msg}");
        } else {
            let _ = self.mp.println(msg);
        }
    }
    fn job(&self, label: &str) -> Box<dyn Fn(&Event) + Send + Sync + '_> {
        let b = self.mp.add(bar(1, self.quiet));
        b.set_prefix(label.to_string());
        Box::new(move |e: &Event| match e {
            Event::Pretrain { step, total, loss } => {
                b.set_length(*total);
                b.set_position(*step);
                b.set_message(format!("loss {loss:.4}"));
                if step == total {
                    b.finish_and_clear();
                }
            }
            Event::Step { phase, phases, global_step, total, gen_loss, fake_loss } => {
                b.set_length(*total);
                b.set_position(*global_step);
                b.set_message(format!("phase {}/{phases} gen {gen_loss:.3} fake {fake_loss:.3}", phase + 1));
                if global_step == total {
                    b.finish_and_clear();
                }
            }
        })
    }
}

/// `phasekit quickstart`: teacher → Phased DMD → assemble + verify → sample → metrics and plots.
pub fn quickstart(a: &QuickstartArgs, json: bool, quiet: bool) -> Result<()> {
    super::single_threaded_kernels();
    let quiet = quiet || json;
    let mp = MultiProgress::with_draw_target(if quiet || !std::io::stderr().is_terminal() {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr_with_hz(8)
    });
    let bars = Bars { mp, quiet, json };
    let rep = quickstart::run(&quickstart::Options { out: a.out.clone(), force: a.force, seed: a.seed }, &bars)?;
    if json {
        let v: Vec<_> = rep.rows.iter().map(|(n, m)| serde_json::json!({ "sampler": n, "metrics": m })).collect();
        print_json(&serde_json::json!({ "ok": true, "out": rep.out, "report": rep.report, "seconds": rep.seconds, "rows": v }));
    } else {
        println!("{}", rep.table);
        println!(
            "done in {:.0} s. Report: {}. Plots: {out}/metrics.png, {out}/phased/plots/samples.png, {out}/dmd2/plots/samples.png, losses.png beside them.",
            rep.seconds,
            rep.report.display(),
            out = rep.out.display()
        );
    }
    Ok(())
}

/// `phasekit bench train-toy`.
pub fn bench_train_toy(a: &BenchTrainToyArgs, json: bool, _quiet: bool) -> Result<()> {
    super::single_threaded_kernels();
    let tmp;
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => {
            tmp = super::rundir::scratch_dir("bench-train-toy");
            tmp.clone()
        }
    };
    let o = super::experiments::BenchOptions {
        seeds: a.seeds.max(1),
        updates: a.updates,
        eval_samples: a.eval_samples,
        dir: dir.clone(),
        only: a.only.as_ref().map(|s| s.split(',').map(|x| x.trim().to_string()).collect()),
        mixture: match &a.mixture {
            Some(p) => {
                let r = Recipe::load(p)?.0;
                if !r.is_toy() {
                    return Err(Error::usage(format!(
                        "{}: --mixture takes a toy recipe (model = \"toy\"), not '{}'",
                        p.display(),
                        r.model
                    )));
                }
                Some(r.mixture)
            }
            None => None,
        },
    };
    let md = super::experiments::run_all(&o, &|m| {
        if !json {
            eprintln!("{m}");
        }
    })?;
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if let Some(p) = &a.markdown {
        crate::atomic::write_file(p, md.as_bytes())?;
    }
    if json {
        print_json(&serde_json::json!({ "ok": true, "markdown": md }));
    } else {
        println!("{md}");
    }
    Ok(())
}

/// `phasekit bench toy-step`: ms per toy generator update (phased4 bench settings, one
/// thread) against the PyTorch twin `benches/toy_torch.py` when `python3` has torch.
pub fn bench_toy_step(a: &BenchToyStepArgs, json: bool, quiet: bool) -> Result<()> {
    use super::speed;
    use crate::bench::report::{render, Line};
    super::single_threaded_kernels();
    let log = |m: &str| {
        if !json && !quiet {
            eprintln!("{m}");
        }
    };
    log(&format!("phasekit: {} toy generator updates (teacher pretraining {} steps first) ...", a.updates, a.pretrain_steps));
    let t = speed::time_updates("phased4", a.updates, Some(a.pretrain_steps))?;
    let ours = t.median_ms(a.warmup);
    let r = &t.recipe;
    let name = format!(
        "toy generator update (phased4, batch {}, TTUR {}, MLP {}×{}, 1 thread)",
        r.train.batch, r.train.ttur, r.mlp.width, r.mlp.depth
    );
    let mut line = Line {
        name,
        value: ours,
        unit: "ms".into(),
        baseline: "PyTorch CPU".into(),
        baseline_value: None,
        ratio: None,
        target: "n/a".into(),
        pass: None,
        note: String::new(),
    };
    let median_of = |timed: usize, mean: f64| format!("median of {timed} after {} warm-up, mean {mean:.2} ms", a.warmup);
    let ours_note = median_of(t.timed(a.warmup), t.mean_ms(a.warmup));
    if a.no_python {
        line.note = format!("skipped: --no-python; phasekit {ours_note}");
    } else if !speed::python_has_torch() {
        line.note = format!("skipped: torch not available (python3 -c \"import torch\" failed); phasekit {ours_note}");
    } else {
        log(&format!("PyTorch: the same {} updates (benches/toy_torch.py) ...", a.updates));
        let p = speed::time_torch(r, a.updates, a.warmup)?;
        line.baseline = format!("PyTorch {} CPU ({} thread)", p.torch, p.threads);
        line.baseline_value = Some(p.ms_per_update_median);
        line.ratio = Some(p.ms_per_update_median / ours);
        line.note = format!(
            "ratio = PyTorch ms / phasekit ms (> 1: phasekit faster); phasekit {ours_note}; PyTorch {}",
            median_of(p.timed, p.ms_per_update_mean)
        );
    }
    let lines = vec![line];
    if json {
        print_json(&lines);
    } else {
        print!("{}", render(&lines));
    }
    Ok(())
}
