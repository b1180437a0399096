//! Command-line arguments and run functions of `assemble`, `pack`, `unpack` and `export`
//! (`crate::cli` dispatches here; `bench moe` is in `crate::bench::moe`).

use std::path::PathBuf;

use clap::Args;

use super::assemble::{self, ExpertInput};
use crate::cli::args::{parse_size, DTypeArg};
use crate::cli::printer::Printer;
use crate::error::{Error, Result};

/// `phasekit assemble`: one routed, hashed MoE checkpoint from per-σ-range experts.
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  phasekit assemble --run runs/wan-4step -o wan-4step.safetensors\n  phasekit assemble \\\n    --expert Wan2.2-Lightning/high_noise_model.safetensors --sigma-range 0.875:1 --expert-base Wan2.2-T2V-A14B/high_noise_model \\\n    --expert Wan2.2-Lightning/low_noise_model.safetensors --sigma-range 0:0.875 --expert-base Wan2.2-T2V-A14B/low_noise_model \\\n    --shift 5 --steps 4 -o wan-lightning.safetensors"
)]
pub struct AssembleArgs {
    /// An expert: full weights or a LoRA (file, sharded folder or diffusers folder). Repeat;
    /// each needs a --sigma-range, in the same order.
    #[arg(long = "expert", value_name = "PATH")]
    pub experts: Vec<PathBuf>,
    /// The σ range [LO, HI) the matching --expert serves; together they must cover (0, 1].
    #[arg(long = "sigma-range", value_name = "LO:HI")]
    pub sigma_ranges: Vec<String>,
    /// Names of the experts, in order (default: high_noise/low_noise for two, else e0, e1, ...).
    #[arg(long = "expert-name", value_name = "NAME")]
    pub names: Vec<String>,
    /// A trainer run folder: experts and routing come from RUN_DIR/manifest.json (phasekit's
    /// trainer), or from a LightX2V Phased DMD run's config.yaml (detected; see --lightx2v-run).
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["experts", "sigma_ranges", "expert_bases"])]
    pub run: Option<PathBuf>,
    /// A LightX2V Phased DMD run (its output_dir, newest finished checkpoint-*, or one
    /// checkpoint): students, their LoRA α, bases and the switch step come from its config.yaml.
    /// LoRA students apply to the teacher experts the config names (relative to the current
    /// folder, as the trainer ran); --expert-base (high, then low) or --base replace them.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["experts", "sigma_ranges", "run"])]
    pub lightx2v_run: Option<PathBuf>,
    /// The model LoRA experts apply to (stored under base.; checks full experts' shapes).
    #[arg(long, value_name = "PATH")]
    pub base: Option<PathBuf>,
    /// The base of each --expert, in order, overriding --base (Wan2.2 A14B: each Lightning
    /// LoRA on its own high- or low-noise model). Give one per --expert, or none.
    #[arg(long = "expert-base", value_name = "PATH")]
    pub expert_bases: Vec<PathBuf>,
    /// Sampler shift s (σ' = sσ/(1+(s−1)σ)).
    #[arg(long)]
    pub shift: Option<f64>,
    /// Number of sampling steps.
    #[arg(long)]
    pub steps: Option<u32>,
    /// Sampler the experts were distilled for.
    #[arg(long)]
    pub solver: Option<String>,
    /// CFG scale (1 for distilled students).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Dtype of floating-point tensors.
    #[arg(long, value_parser = DTypeArg::without_fp8(), default_value = "keep")]
    pub dtype: DTypeArg,
    /// Bake LoRA experts into full experts.
    #[arg(long)]
    pub merge_lora: bool,
    /// Shard the output (e.g. 5GB) with a model.safetensors.index.json.
    #[arg(long, value_name = "SIZE")]
    pub shard_size: Option<String>,
    /// modelspec.title (default: the output's file stem).
    #[arg(long)]
    pub title: Option<String>,
    /// A teacher file digest to record (sha256:<hex>); repeat.
    #[arg(long = "teacher-digest", value_name = "DIGEST")]
    pub teacher_digests: Vec<String>,
    /// The recipe digest to record.
    #[arg(long, value_name = "DIGEST")]
    pub recipe_digest: Option<String>,
    /// Do not write OUT.sha256 (saves one read of the output).
    #[arg(long)]
    pub no_sidecar: bool,
    /// Skip the fsync before renaming the output into place (faster; after a power loss the
    /// file under the final name may be incomplete, though `verify` would say so).
    #[arg(long)]
    pub no_sync: bool,
    /// Replace OUT if it exists.
    #[arg(long)]
    pub force: bool,
    /// Output file (*.safetensors; shards are named after it).
    #[arg(short = 'o', long = "out", value_name = "OUT")]
    pub out: PathBuf,
}

fn parse_range(s: &str) -> Result<(f64, f64)> {
    let bad = || Error::usage(format!("--sigma-range '{s}' must be LO:HI with 0 ≤ LO < HI ≤ 1 (e.g. 0.875:1)"));
    let (a, b) = s.split_once(':').ok_or_else(bad)?;
    let lo: f64 = a.trim().parse().map_err(|_| bad())?;
    let hi: f64 = b.trim().parse().map_err(|_| bad())?;
    Ok((lo, hi))
}

/// Build assemble options from the arguments (no I/O apart from reading a manifest).
pub fn assemble_options(a: &AssembleArgs, quiet: bool) -> Result<(assemble::Options, Option<super::manifest::Manifest>)> {
    assemble_options_noted(a, quiet).map(|(o, m, _)| (o, m))
}

/// [`assemble_options`] and what reading a LightX2V run found out.
fn assemble_options_noted(a: &AssembleArgs, quiet: bool) -> Result<(assemble::Options, Option<super::manifest::Manifest>, Vec<String>)> {
    let lightx2v =
        a.lightx2v_run.clone().or_else(|| a.run.clone().filter(|r| !r.join("manifest.json").exists() && super::lightx2v::is_run(r)));
    let mut notes = Vec::new();
    let (mut opts, manifest) = match (&a.run, lightx2v) {
        (_, Some(dir)) => {
            let imp = super::lightx2v::import(&dir, &a.expert_bases, a.base.as_deref())?;
            notes = imp.notes;
            (imp.options, None)
        }
        (Some(run), None) => {
            let (o, m) = assemble::options_from_run(run)?;
            (o, Some(m))
        }
        (None, None) => {
            if a.experts.is_empty() {
                return Err(Error::usage("give experts with --expert PATH --sigma-range LO:HI (repeat), or --run RUN_DIR"));
            }
            if a.experts.len() != a.sigma_ranges.len() {
                return Err(Error::usage(format!(
                    "{} --expert but {} --sigma-range; give one range per expert",
                    a.experts.len(),
                    a.sigma_ranges.len()
                )));
            }
            if !a.names.is_empty() && a.names.len() != a.experts.len() {
                return Err(Error::usage("give one --expert-name per --expert, or none"));
            }
            if !a.expert_bases.is_empty() && a.expert_bases.len() != a.experts.len() {
                return Err(Error::usage("give one --expert-base per --expert, or none"));
            }
            let experts = a
                .experts
                .iter()
                .zip(&a.sigma_ranges)
                .enumerate()
                .map(|(i, (p, r))| {
                    let (lo, hi) = parse_range(r)?;
                    Ok(ExpertInput {
                        path: p.clone(),
                        sigma_lo: lo,
                        sigma_hi: hi,
                        name: a.names.get(i).cloned(),
                        guidance: None,
                        kind: None,
                        base: a.expert_bases.get(i).cloned(),
                        lora_alpha: None,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let steps = a.steps.ok_or_else(|| Error::usage("--steps is required with --expert"))?;
            let shift = a.shift.ok_or_else(|| Error::usage("--shift is required with --expert"))?;
            (assemble::Options { experts, steps, shift, ..assemble::Options::default() }, None)
        }
    };
    if a.base.is_some() {
        opts.base = a.base.clone();
    }
    if let Some(s) = a.shift {
        opts.shift = s;
    }
    if let Some(s) = a.steps {
        opts.steps = s;
    }
    if let Some(s) = &a.solver {
        opts.solver = s.clone();
    }
    if let Some(g) = a.guidance {
        opts.guidance = g;
    }
    if a.title.is_some() {
        opts.title = a.title.clone();
    }
    opts.teacher_digests.extend(a.teacher_digests.iter().cloned());
    if a.recipe_digest.is_some() {
        opts.recipe_digest = a.recipe_digest.clone();
    }
    opts.dtype = a.dtype.dtype();
    opts.merge_lora = a.merge_lora;
    opts.shard_size = a.shard_size.as_deref().map(parse_size).transpose()?;
    opts.sidecar = !a.no_sidecar;
    opts.sync = !a.no_sync;
    opts.force = a.force;
    opts.quiet = quiet;
    Ok((opts, manifest, notes))
}

/// `phasekit assemble`.
pub fn assemble(a: AssembleArgs, p: &Printer) -> Result<()> {
    let (opts, manifest, notes) = assemble_options_noted(&a, p.quiet())?;
    if let Some(m) = &manifest {
        // Timesteps the trainer declared must be the ones the routing gives.
        assemble::check_run_options(m, &opts)?;
    }
    let mut r = assemble::assemble(&opts, &a.out)?;
    r.notes.splice(0..0, notes);
    p.report(&r, |o| {
        writeln!(
            o,
            "assembled {} experts → {}: {} tensors ({} shared, {} aliased), {:.1} MB in {:.2} s ({:.0} MB/s), digest {}",
            r.experts,
            r.output.display(),
            r.tensors,
            r.shared,
            r.aliased,
            r.bytes_out as f64 / 1e6,
            r.seconds,
            r.bytes_out as f64 / 1e6 / r.seconds.max(1e-9),
            r.digest
        )?;
        for n in &r.notes {
            writeln!(o, "note: {n}")?;
        }
        Ok(())
    });
    Ok(())
}

/// `phasekit export`: per-expert files for today's runtimes.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A phasekit MoE checkpoint (file or index).
    pub input: PathBuf,
    /// Target runtime layout.
    #[arg(long = "to", value_enum)]
    pub to: super::export::Target,
    /// Output folder (appears only when complete).
    #[arg(short = 'o', long = "out", value_name = "DIR")]
    pub out: PathBuf,
    /// comfy: prefix names with `model.diffusion_model.`.
    #[arg(long)]
    pub comfy_prefix: bool,
    /// lora: write keys without the `diffusion_model.` prefix.
    #[arg(long)]
    pub no_lora_prefix: bool,
    /// Dtype of floating-point tensors (comfy, diffusers, lora).
    #[arg(long, value_parser = DTypeArg::without_fp8(), default_value = "keep")]
    pub dtype: DTypeArg,
    /// gguf: tensor type of quantizable weights (F16, BF16, Q8_0, Q4_K, ...).
    #[arg(long)]
    pub quant: Option<String>,
    /// Do not write .sha256 sidecars.
    #[arg(long)]
    pub no_sidecar: bool,
    #[arg(long)]
    pub force: bool,
}

pub fn export(a: ExportArgs, p: &Printer) -> Result<()> {
    let quant = a
        .quant
        .as_deref()
        .map(|q| crate::quant::GgmlType::parse(q).ok_or_else(|| Error::usage(format!("unknown GGUF type '{q}'"))))
        .transpose()?;
    if quant.is_some() && a.to != super::export::Target::Gguf {
        return Err(Error::usage("--quant applies to --to gguf"));
    }
    let opts = super::export::ExportOptions {
        target: a.to,
        comfy_prefix: a.comfy_prefix,
        lora_prefix: !a.no_lora_prefix,
        dtype: a.dtype.dtype(),
        quant,
        sidecar: !a.no_sidecar,
        force: a.force,
        quiet: p.quiet(),
    };
    let r = super::export::export(&a.input, &a.out, &opts)?;
    p.report(&r, |o| {
        writeln!(
            o,
            "exported {} → {} ({:?}): {} files in {:.2} s",
            r.input.display(),
            r.output.display(),
            r.target,
            r.files.len(),
            r.seconds
        )?;
        for w in &r.files {
            writeln!(o, "  {} ({:.1} MB)", w.path.display(), w.bytes as f64 / 1e6)?;
        }
        Ok(())
    });
    Ok(())
}

/// `phasekit pack`: lossless zstd with byte planes for 16-bit floats.
#[derive(Args, Debug)]
pub struct PackArgs {
    pub input: PathBuf,
    #[arg(short = 'o', long = "out", value_name = "OUT.pk")]
    pub out: PathBuf,
    /// zstd level (1..=19).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub level: i32,
    #[arg(long)]
    pub force: bool,
}

/// `phasekit unpack`: restore bit-exact, checked against chunk and tensor hashes.
#[derive(Args, Debug)]
pub struct UnpackArgs {
    pub input: PathBuf,
    #[arg(short = 'o', long = "out", value_name = "OUT")]
    pub out: PathBuf,
    #[arg(long)]
    pub force: bool,
}

fn pack_line(o: &mut dyn std::io::Write, verb: &str, r: &super::pack::PackReport) -> std::io::Result<()> {
    let mb = r.bytes_in.max(r.bytes_out) as f64 / 1e6;
    writeln!(
        o,
        "{verb} {} → {}: {:.1} MB → {:.1} MB (ratio {:.3}) in {:.2} s ({:.0} MB/s){}",
        r.input.display(),
        r.output.display(),
        r.bytes_in as f64 / 1e6,
        r.bytes_out as f64 / 1e6,
        r.ratio,
        r.seconds,
        mb / r.seconds.max(1e-9),
        r.tensors_verified.map(|n| format!(", {n} tensor hashes verified")).unwrap_or_default()
    )
}

pub fn pack(a: PackArgs, p: &Printer) -> Result<()> {
    let r = super::pack::pack(&a.input, &a.out, a.level, a.force, p.quiet())?;
    p.report(&r, |o| pack_line(o, "packed", &r));
    Ok(())
}

pub fn unpack(a: UnpackArgs, p: &Printer) -> Result<()> {
    let r = super::pack::unpack(&a.input, &a.out, a.force, p.quiet())?;
    p.report(&r, |o| pack_line(o, "unpacked", &r));
    Ok(())
}
