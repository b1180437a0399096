//! The command line as a library layer over the other modules (STYLE: uv's split, ripgrep's
//! `main`): `src/main.rs` parses [`Cli`], calls [`run`] and maps the outcome to an exit code.
//!
//! - [`args`]: argument types shared by several commands (one `--dtype`, one `--layout`, sizes);
//! - [`printer`]: the one place that decides JSON, text or quiet output, and prints errors;
//! - one `Args` struct with doc-comment help and one `run` per command: [`inspect`],
//!   [`convert`] and [`verify`] here; `assemble`, `export`, `pack`, `unpack` in `crate::moe::cli`;
//!   `lora ...` in `crate::lora::cli`; `train`, `sample`, `quickstart` in `crate::train::cli`;
//!   `forward` in `crate::model::cli`; `bench ...` in `crate::bench`.
//!
//! Exit codes (see `docs/cli.md`): 0 success, 1 internal error, 2 usage, 3 I/O, 4 truncated
//! input, 5 malformed input, 6 inconsistent files, 7 unsupported, 8 integrity mismatch,
//! 9 limit exceeded.

pub mod args;
pub mod convert;
pub mod inspect;
pub mod printer;
pub mod verify;

use clap::{Parser, Subcommand};

pub use printer::Printer;

use crate::error::{Kind, Result};

#[derive(Parser, Debug)]
#[command(
    name = "phasekit",
    version,
    about = "Import, convert, verify and package few-step diffusion checkpoints (Qwen-Image, Wan2.2)",
    long_about = "phasekit reads diffusion-model checkpoints as they exist in the wild — safetensors files, sharded \
folders with an index, diffusers and Wan2.2 original folders, GGUF files (quantized, 5-D tensors), fp8 with scales — \
through memory maps with bounded memory, and converts them between layouts, dtypes and formats.\n\n\
Exit codes: 0 ok, 1 internal error, 2 usage, 3 I/O, 4 truncated input, 5 malformed input, 6 inconsistent files, \
7 unsupported, 8 integrity mismatch, 9 limit exceeded.",
    after_help = "Examples:\n  phasekit inspect Wan2.2-T2V-A14B/high_noise_model\n  phasekit convert Wan2.2-T2V-A14B wan-diffusers --layout diffusers\n  phasekit convert qwen_image/transformer qwen-Q8_0.gguf --format gguf --quant Q8_0\n  phasekit verify model.safetensors"
)]
pub struct Cli {
    /// Print one JSON object on stdout instead of text (errors too).
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress bars.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Worker threads for casting, quantizing and hashing (default: all cores).
    #[arg(long, global = true, value_name = "N")]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show format, model family and variant, layout, parameters, dtypes, shards, metadata and config.
    ///
    /// PATH may be a .safetensors file, a sharded folder or its *.safetensors.index.json, a diffusers
    /// model folder, a Wan2.2 repo folder (high_noise_model/ + low_noise_model/) or a .gguf file.
    /// Only headers are read.
    Inspect(inspect::InspectArgs),
    /// Convert between layouts, dtypes and formats, streaming with bounded memory.
    ///
    /// OUT ending in .safetensors or .gguf is a file; anything else is a model folder
    /// (diffusion_pytorch_model.safetensors + config.json, sharded with an index when --shard-size
    /// asks). A Wan2.2 repo folder converts to a folder of the same shape (high_noise_model/ ↔
    /// transformer/, low_noise_model/ ↔ transformer_2/). Outputs appear only when complete.
    Convert(convert::ConvertArgs),
    /// Validate structure (every safetensors rule, index vs shards, GGUF offsets) and .sha256 sidecars.
    ///
    /// Exit 0 only when everything holds. With --signature, check an OpenSSF Model Signing
    /// bundle instead: its signature with --key, then every file of PATH against it (exit 8 on
    /// any difference).
    Verify(verify::VerifyArgs),
    /// Sign a model folder or file with a local key: an OpenSSF Model Signing bundle (model.sig)
    /// that `model_signing verify key` and `phasekit verify --signature` check.
    Sign(crate::sign::SignArgs),
    /// Benchmarks that print ratios against baselines measured in the same run.
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
    /// Distil a teacher into few-step experts with Phased DMD (recipes/*.toml, docs/recipes.md).
    Train(crate::train::cli::TrainArgs),
    /// Draw samples from a trained run (--run) or a routed MoE checkpoint (--moe) into a safetensors file (tensor `samples`).
    Sample(crate::train::cli::SampleArgs),
    /// Pretrain the toy teacher, distil it with Phased DMD and DMD2, sample, compare, plot (CPU, < 3 min).
    Quickstart(crate::train::cli::QuickstartArgs),
    /// Assemble experts (full or LoRA) into one routed, hashed MoE checkpoint (docs/moe-format.md).
    Assemble(crate::moe::cli::AssembleArgs),
    /// Export a MoE checkpoint to the per-expert files runtimes load (ComfyUI, diffusers, LoRA, GGUF).
    Export(crate::moe::cli::ExportArgs),
    /// Compress a checkpoint losslessly (zstd with byte planes for 16-bit floats).
    Pack(crate::moe::cli::PackArgs),
    /// Restore a packed checkpoint bit for bit, checked against its hashes.
    Unpack(crate::moe::cli::UnpackArgs),
    /// Run one forward pass of a Wan2.2 or Qwen-Image transformer on saved inputs (docs/models.md).
    Forward(crate::model::cli::ForwardArgs),
    /// LoRA files: merge into a base, extract from two checkpoints, convert key styles, inspect (docs/lora.md).
    #[command(subcommand)]
    Lora(crate::lora::cli::LoraCommand),
    /// Write one self-contained HTML page about a run: recipe, phases (σ ranges, experts and their
    /// sha256), time and peak memory per phase, loss curves, samples, metrics, checkpoint digest.
    ///
    /// Images are inlined; the page has no script and loads nothing. RUN_DIR may also be a folder of
    /// runs (the quickstart's), which adds the comparison of their metrics.
    Report(crate::report::cli::ReportArgs),
}

/// How a command ended when it did not return an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Success,
    /// The command's output already says what failed (`verify --json`): exit with this kind's
    /// code without printing an error.
    Failure(Kind),
}

impl ExitStatus {
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Success => 0,
            ExitStatus::Failure(k) => k.exit_code(),
        }
    }
}

/// Run one command line.
pub fn run(cli: Cli) -> Result<ExitStatus> {
    let p = Printer::new(cli.json, cli.quiet);
    let (json, quiet) = (p.json(), p.quiet());
    match cli.command {
        Command::Inspect(a) => inspect::run(a, &p)?,
        Command::Convert(a) => convert::run(a, &p)?,
        Command::Verify(a) => return verify::run(a, &p),
        Command::Bench(c) => crate::bench::run(c, &p)?,
        Command::Train(a) => crate::train::cli::train(&a, json, quiet)?,
        Command::Sample(a) => crate::train::cli::sample(&a, json)?,
        Command::Quickstart(a) => crate::train::cli::quickstart(&a, json, quiet)?,
        Command::Assemble(a) => crate::moe::cli::assemble(a, &p)?,
        Command::Export(a) => crate::moe::cli::export(a, &p)?,
        Command::Pack(a) => crate::moe::cli::pack(a, &p)?,
        Command::Unpack(a) => crate::moe::cli::unpack(a, &p)?,
        Command::Forward(a) => crate::model::cli::run(&a, &p)?,
        Command::Lora(c) => crate::lora::cli::run(c, &p)?,
        Command::Sign(a) => crate::sign::run_sign(&a, json)?,
        Command::Report(a) => crate::report::cli::run(&a, json)?,
    }
    Ok(ExitStatus::Success)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::{DTypeChoice, OutFormat};
    use crate::quant::GgmlType;

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn convert_arguments_become_options_through_the_policy() {
        let opts = |args: &[&str]| {
            let cli = Cli::try_parse_from(["phasekit", "--quiet", "convert"].iter().chain(args)).unwrap();
            let Command::Convert(a) = cli.command else { panic!("not convert") };
            convert::options(&a, cli.quiet)
        };
        let o = opts(&["in", "out.gguf", "--dtype", "bf16"]).unwrap();
        assert_eq!((o.format, o.dtype, o.quant), (OutFormat::Gguf, DTypeChoice::Keep, Some(GgmlType::BF16)));
        let o = opts(&["in", "out", "--dtype", "fp8-e4m3", "--shard-size", "2GB", "--no-sync", "--layout", "comfy"]).unwrap();
        assert_eq!(
            (o.format, o.dtype, o.shard_size, o.sync),
            (OutFormat::Safetensors, DTypeChoice::To(crate::DType::F8E4M3), Some(2_000_000_000), false)
        );
        assert_eq!(o.layout, Some(crate::layout::Layout::Comfy));
        let e = opts(&["in", "out.safetensors", "--quant", "Q8_0"]).unwrap_err();
        assert_eq!(e.kind(), Kind::Usage);
        // Sizes are checked after the policy, as before the CLI moved into the library.
        assert!(opts(&["in", "out.gguf", "--shard-size", "huge"]).unwrap_err().to_string().contains("--shard-size applies"));
    }

    #[test]
    fn exit_status_codes() {
        assert_eq!(ExitStatus::Success.code(), 0);
        assert_eq!(ExitStatus::Failure(Kind::Integrity).code(), 8);
    }
}
