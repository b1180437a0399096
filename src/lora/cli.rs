//! `phasekit lora merge|extract|convert|inspect` (`crate::cli` dispatches here).

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::svd::SvdOptions;
use super::{ExtractOptions, MergeOptions, Style, WriteOptions};
use crate::cli::args::DTypeArg;
use crate::cli::printer::Printer;
use crate::error::{Error, Result};

/// LoRA files: merge into a base, extract from two checkpoints, convert between key styles, inspect (docs/lora.md).
#[derive(Subcommand, Debug)]
pub enum LoraCommand {
    /// Bake LoRAs into a base checkpoint: W' = W + S·(α/r)·up·down, in f32, streamed per tensor.
    ///
    /// The output keeps the base's layout, names and dtype (unless --dtype). OUT ending in
    /// .safetensors is one file; anything else is a model folder with the base's config.json.
    #[command(
        after_help = "Examples:\n  phasekit lora merge Wan2.2-T2V-A14B/high_noise_model lightning_high.safetensors -o wan-high-merged.safetensors\n  phasekit lora merge qwen_image/transformer a.safetensors b.safetensors --strength 0.8 --strength 0.5 -o merged.safetensors"
    )]
    Merge(MergeArgs),
    /// Extract a LoRA from two checkpoints: truncated SVD (f64) of TUNED − BASE for every 2-D weight that differs.
    #[command(
        after_help = "Example:\n  phasekit lora extract base.safetensors tuned.safetensors --rank 64 -o lora.safetensors --style kohya --prefix"
    )]
    Extract(ExtractArgs),
    /// Rewrite a LoRA file in the other key style (tensor bytes unchanged).
    Convert(ConvertArgs),
    /// Show a LoRA file's key style, family, modules, ranks, alphas and dtypes.
    Inspect(InspectArgs),
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The base checkpoint (file, sharded folder or diffusers folder).
    pub base: PathBuf,
    /// LoRA files (kohya/Lightning or diffusers/PEFT keys, any prefix).
    #[arg(required = true)]
    pub loras: Vec<PathBuf>,
    /// Output .safetensors file (or model folder).
    #[arg(short, long)]
    pub out: PathBuf,
    /// Strength S: once for every LoRA, or once per LoRA in order.
    #[arg(long, allow_negative_numbers = true)]
    pub strength: Vec<f64>,
    /// Dtype of floating-point tensors of the output.
    #[arg(long, value_parser = DTypeArg::without_fp8(), default_value = "keep")]
    pub dtype: DTypeArg,
    /// Replace OUT if it exists.
    #[arg(long)]
    pub force: bool,
    /// Skip the fsync before the final rename.
    #[arg(long)]
    pub no_sync: bool,
}

#[derive(Args, Debug)]
pub struct ExtractArgs {
    pub base: PathBuf,
    pub tuned: PathBuf,
    /// Rank of every module (clamped to the weight's smaller dimension); α = rank.
    #[arg(long)]
    pub rank: usize,
    /// Output LoRA file.
    #[arg(short, long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "kohya")]
    pub style: Style,
    /// kohya: prefix keys with `diffusion_model.`.
    #[arg(long)]
    pub prefix: bool,
    /// Dtype of the LoRA tensors (keep = the base weight's).
    #[arg(long, value_parser = DTypeArg::without_fp8(), default_value = "keep")]
    pub dtype: DTypeArg,
    /// Power (subspace) iterations of the randomized SVD.
    #[arg(long, default_value_t = 2)]
    pub power_iters: usize,
    /// Extra random columns of the randomized SVD.
    #[arg(long, default_value_t = 10)]
    pub oversample: usize,
    #[arg(long)]
    pub force: bool,
    #[arg(long)]
    pub no_sync: bool,
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    pub input: PathBuf,
    #[arg(short, long)]
    pub out: PathBuf,
    #[arg(long, value_enum)]
    pub style: Style,
    /// kohya: prefix keys with `diffusion_model.` (PEFT keys always start with `transformer.`).
    #[arg(long)]
    pub prefix: bool,
    /// Model family for the names (default: detected from the keys).
    #[arg(long)]
    pub family: Option<String>,
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    pub path: PathBuf,
    /// Model family for the names (default: detected from the keys).
    #[arg(long)]
    pub family: Option<String>,
}

/// Run one `lora` subcommand.
pub fn run(cmd: LoraCommand, p: &Printer) -> Result<()> {
    let quiet = p.quiet();
    match cmd {
        LoraCommand::Merge(a) => {
            let opts = MergeOptions { strengths: a.strength, dtype: a.dtype.dtype(), force: a.force, quiet, sync: !a.no_sync };
            let r = super::merge(&a.base, &a.loras, &a.out, &opts)?;
            p.report(&r, |o| {
                writeln!(
                    o,
                    "merged {} LoRA file(s) ({} modules into {} of {} tensors) → {}: {:.1} MB in {:.2} s, f32 update",
                    r.loras.len(),
                    r.modules,
                    r.merged,
                    r.tensors,
                    r.output.display(),
                    r.bytes_out as f64 / 1e6,
                    r.seconds
                )
            });
            Ok(())
        }
        LoraCommand::Extract(a) => {
            if a.prefix && a.style == Style::Peft {
                return Err(Error::usage("--prefix applies to --style kohya (PEFT keys always start with `transformer.`)"));
            }
            let opts = ExtractOptions {
                rank: a.rank,
                style: a.style,
                prefix: a.prefix,
                dtype: a.dtype.dtype(),
                svd: SvdOptions { power_iters: a.power_iters, oversample: a.oversample, ..SvdOptions::default() },
                force: a.force,
                quiet,
                sync: !a.no_sync,
            };
            let r = super::extract(&a.base, &a.tuned, &a.out, &opts)?;
            p.report(&r, |o| {
                writeln!(
                    o,
                    "extracted {} modules at rank {} ({} style) → {}: max relative error {:.2e}, {:.2} s",
                    r.modules,
                    r.rank,
                    r.style.as_str(),
                    r.output.display(),
                    r.max_relative_error,
                    r.seconds
                )?;
                if !r.skipped.is_empty() {
                    writeln!(
                        o,
                        "note: {} differing tensors are not 2-D weights and are not in the LoRA (first: {})",
                        r.skipped.len(),
                        r.skipped[0]
                    )?;
                }
                Ok(())
            });
            Ok(())
        }
        LoraCommand::Convert(a) => {
            if a.prefix && a.style == Style::Peft {
                return Err(Error::usage("--prefix applies to --style kohya (PEFT keys always start with `transformer.`)"));
            }
            crate::atomic::check_target(&a.out, a.force)?;
            let (set, info) = super::read(&a.input, a.family.as_deref())?;
            let bytes = super::write(
                &set,
                &a.out,
                &WriteOptions { style: a.style, prefix: a.prefix, force: a.force, sync: true, metadata: Vec::new() },
            )?;
            let v = serde_json::json!({ "ok": true, "input": a.input, "output": a.out, "from": info.style, "to": a.style,
                "family": set.family, "modules": set.modules.len(), "alpha_assumed": info.alpha_assumed, "bytes": bytes });
            p.value(&v, |o| {
                writeln!(
                    o,
                    "converted {} ({}) → {} ({}): {} modules{}",
                    a.input.display(),
                    info.style.as_str(),
                    a.out.display(),
                    a.style.as_str(),
                    set.modules.len(),
                    if info.alpha_assumed > 0 { format!(", α = rank assumed for {}", info.alpha_assumed) } else { String::new() }
                )
            });
            Ok(())
        }
        LoraCommand::Inspect(a) => {
            let (set, info) = super::read(&a.path, a.family.as_deref())?;
            let s = super::summarize(&set, info);
            p.value(&s, |o| {
                writeln!(o, "{}", s.info.path.display())?;
                writeln!(
                    o,
                    "  style     {}{}{}",
                    s.info.style.as_str(),
                    if s.info.mixed { " (mixed suffixes)" } else { "" },
                    if s.info.prefix.is_empty() { String::new() } else { format!(", prefix {}", s.info.prefix) }
                )?;
                writeln!(o, "  family    {}", s.info.family.as_deref().unwrap_or("unknown"))?;
                writeln!(o, "  modules   {} ({} parameters)", s.modules, s.parameters)?;
                writeln!(o, "  ranks     {}", s.ranks.iter().map(|(r, n)| format!("{r}×{n}")).collect::<Vec<_>>().join(", "))?;
                writeln!(o, "  alphas    {}", s.alphas.iter().map(|(a, n)| format!("{a}×{n}")).collect::<Vec<_>>().join(", "))?;
                if s.info.alpha_assumed > 0 {
                    writeln!(o, "            (α = rank assumed for {} modules: the file does not state it)", s.info.alpha_assumed)?;
                }
                writeln!(o, "  dtypes    {}", s.dtypes.iter().map(|(d, n)| format!("{d}×{n}")).collect::<Vec<_>>().join(", "))?;
                for n in &s.first {
                    writeln!(o, "  {n}")?;
                }
                if s.modules > s.first.len() {
                    writeln!(o, "  … {} more", s.modules - s.first.len())?;
                }
                Ok(())
            });
            Ok(())
        }
    }
}
