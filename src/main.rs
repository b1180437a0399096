//! The `phasekit` command line: parse, run one command, report, exit with its code.
//!
//! Exit codes (see `docs/cli.md`): 0 success, 1 internal error, 2 usage, 3 I/O, 4 truncated
//! input, 5 malformed input, 6 inconsistent files, 7 unsupported, 8 integrity mismatch,
//! 9 limit exceeded.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use phasekit::convert::{self, DTypeChoice, Fp8Scale, OutFormat};
use phasekit::error::Error;
use phasekit::layout::Layout;
use phasekit::quant::GgmlType;
use phasekit::DType;

#[derive(Parser)]
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
struct Cli {
    /// Print one JSON object on stdout instead of text (errors too).
    #[arg(long, global = true)]
    json: bool,
    /// No progress bars.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Worker threads for casting, quantizing and hashing (default: all cores).
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show format, model family and variant, layout, parameters, dtypes, shards, metadata and config.
    ///
    /// PATH may be a .safetensors file, a sharded folder or its *.safetensors.index.json, a diffusers
    /// model folder, a Wan2.2 repo folder (high_noise_model/ + low_noise_model/) or a .gguf file.
    /// Only headers are read.
    Inspect { path: PathBuf },
    /// Convert between layouts, dtypes and formats, streaming with bounded memory.
    ///
    /// OUT ending in .safetensors or .gguf is a file; anything else is a model folder
    /// (diffusion_pytorch_model.safetensors + config.json, sharded with an index when --shard-size
    /// asks). A Wan2.2 repo folder converts to a folder of the same shape (high_noise_model/ ↔
    /// transformer/, low_noise_model/ ↔ transformer_2/). Outputs appear only when complete.
    Convert {
        input: PathBuf,
        out: PathBuf,
        /// Target key layout (default: keep the input's).
        #[arg(long, value_enum)]
        layout: Option<LayoutArg>,
        /// Dtype of floating-point tensors. fp8 applies to 2-D weights and writes a per-tensor scale.
        #[arg(long, value_enum, default_value = "keep")]
        dtype: DTypeArg,
        /// Output container (default: from OUT's extension).
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
        /// GGUF tensor type for quantizable weights (ComfyUI-GGUF rules: high-precision tensors stay F32).
        #[arg(long, ignore_case = true, value_parser = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])]
        quant: Option<String>,
        /// Split safetensors output into shards of at most this size (e.g. 5GB, 500MB, 2GiB).
        #[arg(long, value_name = "SIZE")]
        shard_size: Option<String>,
        /// How fp8 outputs store their scale.
        #[arg(long, value_enum, default_value = "comfy")]
        fp8_scale: Fp8ScaleArg,
        /// Prefix every name with `model.diffusion_model.` (ComfyUI full checkpoints).
        #[arg(long)]
        comfy_prefix: bool,
        /// Drop the input's safetensors __metadata__ (default: preserve it).
        #[arg(long)]
        drop_metadata: bool,
        /// Also write a `<file>.sha256` sidecar for every output file (hashed while writing).
        #[arg(long)]
        sha256: bool,
        /// Replace OUT if it exists.
        #[arg(long)]
        force: bool,
        /// Skip the fsync before the final rename (faster for scratch outputs; after a power
        /// loss the output may be incomplete).
        #[arg(long)]
        no_sync: bool,
    },
    /// Validate structure (every safetensors rule, index vs shards, GGUF offsets) and .sha256 sidecars.
    ///
    /// Exit 0 only when everything holds.
    Verify { path: PathBuf },
    /// Benchmarks that print ratios against baselines measured in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Distil a teacher into few-step experts with Phased DMD (recipes/*.toml, docs/recipes.md).
    Train(phasekit::train::cli::TrainArgs),
    /// Draw samples from a trained run (--run) or a routed MoE checkpoint (--moe) into a safetensors file (tensor `samples`).
    Sample(phasekit::train::cli::SampleArgs),
    /// Pretrain the toy teacher, distil it with Phased DMD and DMD2, sample, compare, plot (CPU, < 3 min).
    Quickstart(phasekit::train::cli::QuickstartArgs),
    /// Assemble experts (full or LoRA) into one routed, hashed MoE checkpoint (docs/moe-format.md).
    Assemble(phasekit::moe::cli::AssembleArgs),
    /// Export a MoE checkpoint to the per-expert files runtimes load (ComfyUI, diffusers, LoRA, GGUF).
    Export(phasekit::moe::cli::ExportArgs),
    /// Compress a checkpoint losslessly (zstd with byte planes for 16-bit floats).
    Pack(phasekit::moe::cli::PackArgs),
    /// Restore a packed checkpoint bit for bit, checked against its hashes.
    Unpack(phasekit::moe::cli::UnpackArgs),
    /// Run one forward pass of a Wan2.2 or Qwen-Image transformer on saved inputs (docs/models.md).
    Forward(phasekit::model::cli::ForwardArgs),
    /// LoRA files: merge into a base, extract from two checkpoints, convert key styles, inspect (docs/lora.md).
    #[command(subcommand)]
    Lora(phasekit::lora::cli::LoraCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Phased DMD and its baselines on the toy mixture over several seeds (writes docs/results.md tables).
    TrainToy(phasekit::train::cli::BenchTrainToyArgs),
    /// Milliseconds per toy generator update (with its TTUR fake updates, one thread) vs the
    /// same update in PyTorch on the CPU (`benches/toy_torch.py`, when python3 has torch).
    ToyStep(phasekit::train::cli::BenchToyStepArgs),
    /// One full-width teacher block forward+backward on the CPU: GFLOP/s vs candle's matmul.
    Block(phasekit::model::bench::BlockArgs),
    /// The attention op: its paths checked against each other (--check), or timed against
    /// PyTorch's SDPA backends (`benches/attention_torch.py`, when python3 has torch).
    Attention(phasekit::ops::bench::AttentionArgs),
    /// MoE assemble vs `cp`, verify vs cores × `sha256sum`, pack vs `zstd` and `zipnn`.
    Moe(phasekit::moe::cli::BenchMoeArgs),
    /// Conversion throughput vs `cp` and the PyPI `gguf` package, and peak RSS on sparse
    /// full-size Qwen-Image and Wan2.2 A14B replicas (they cost no disk).
    Io {
        /// Scratch folder, on the disk you want to measure (default: the system temp folder).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Size of the dense test checkpoint.
        #[arg(long, default_value = "2GB")]
        size: String,
        /// Runs per measurement (the best is kept).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Skip the sparse full-size replicas.
        #[arg(long)]
        no_replicas: bool,
        /// Skip the Python comparison.
        #[arg(long)]
        no_python: bool,
    },
    /// Write a sparse full-size replica of a real checkpoint: every tensor name and shape, data
    /// all zeros in a sparse file (costs no disk). For testing memory and speed at real scale.
    Replica {
        #[arg(value_enum)]
        model: ReplicaModel,
        /// Output .safetensors file.
        out: PathBuf,
        /// Element type of the replica.
        #[arg(long, value_enum, default_value = "bf16")]
        dtype: DTypeArg,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ReplicaModel {
    /// Qwen-Image transformer, 1933 tensors, 20.4B parameters (diffusers names).
    QwenImage,
    /// One Wan2.2 T2V-A14B expert, 1095 tensors, 14.3B parameters (original names).
    WanT2vA14b,
    /// One Wan2.2 I2V-A14B expert (36 input channels).
    WanI2vA14b,
    /// Wan2.2 TI2V-5B.
    WanTi2v5b,
}

#[derive(Clone, Copy, ValueEnum)]
enum LayoutArg {
    Original,
    Diffusers,
    Comfy,
}

#[derive(Clone, Copy, ValueEnum)]
enum DTypeArg {
    Keep,
    Bf16,
    F16,
    F32,
    #[value(name = "fp8-e4m3")]
    Fp8E4m3,
    #[value(name = "fp8-e5m2")]
    Fp8E5m2,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Safetensors,
    Gguf,
}

#[derive(Clone, Copy, ValueEnum)]
enum Fp8ScaleArg {
    Comfy,
    WeightScale,
    None,
}

fn layout(a: LayoutArg) -> Layout {
    match a {
        LayoutArg::Original => Layout::Original,
        LayoutArg::Diffusers => Layout::Diffusers,
        LayoutArg::Comfy => Layout::Comfy,
    }
}

fn quant(q: &str) -> Result<GgmlType, Error> {
    GgmlType::parse(q).ok_or_else(|| Error::usage(format!("unknown GGUF type '{q}'")))
}

fn main() -> ExitCode {
    // Like other Unix tools: a closed pipe (`phasekit inspect ... | head`) ends the process
    // quietly instead of panicking inside println!.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            // Scripts asked for JSON: a usage error is one JSON object too (help stays text).
            if e.use_stderr() && std::env::args_os().any(|a| a == "--json") {
                let message = e.kind().as_str().map(str::to_string).unwrap_or_else(|| "usage error".into());
                let detail = e.to_string();
                let first = detail.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim_start_matches("error: ").to_string();
                println!("{}", error_json(&Error::usage(if first.is_empty() { message } else { first })));
                return ExitCode::from(code);
            }
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if let Some(n) = cli.threads {
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build_global();
    }
    let json = cli.json;
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if json {
                println!("{}", error_json(&e));
            } else {
                eprintln!("phasekit: error: {e}");
            }
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// The `--json` error object: `{"ok": false, "error": {kind, exit_code, path, message}}`.
fn error_json(e: &Error) -> serde_json::Value {
    serde_json::json!({ "ok": false, "error": { "kind": e.kind().as_str(), "exit_code": e.exit_code(), "path": e.path(), "message": e.message() } })
}

fn print_json(v: &impl serde::Serialize) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::internal(e.to_string()))?;
    // A closed pipe (`| head`) is not an error.
    let _ = writeln!(out, "{text}");
    Ok(())
}

fn run(cli: Cli) -> Result<(), Error> {
    let quiet = cli.quiet || cli.json;
    match cli.command {
        Command::Inspect { path } => {
            let reports = phasekit::inspect::inspect(&path)?;
            if cli.json {
                if reports.len() == 1 {
                    print_json(&reports[0])?;
                } else {
                    print_json(&serde_json::json!({ "path": path, "models": reports }))?;
                }
            } else {
                let mut out = std::io::stdout().lock();
                for r in &reports {
                    let _ = write!(out, "{}", phasekit::inspect::render(r));
                }
            }
            Ok(())
        }
        Command::Convert {
            input,
            out,
            layout: l,
            dtype,
            format,
            quant: q,
            shard_size,
            fp8_scale,
            comfy_prefix,
            drop_metadata,
            sha256,
            force,
            no_sync,
        } => {
            let format = match format {
                Some(FormatArg::Gguf) => OutFormat::Gguf,
                Some(FormatArg::Safetensors) => OutFormat::Safetensors,
                None if out.extension().is_some_and(|e| e == "gguf") => OutFormat::Gguf,
                None => OutFormat::Safetensors,
            };
            if q.is_some() && format != OutFormat::Gguf {
                return Err(Error::usage("--quant applies to GGUF output (add --format gguf or name OUT *.gguf)"));
            }
            if format == OutFormat::Gguf && shard_size.is_some() {
                return Err(Error::usage("--shard-size applies to safetensors output"));
            }
            let dtype = match dtype {
                DTypeArg::Keep => DTypeChoice::Keep,
                DTypeArg::Bf16 => DTypeChoice::To(DType::BF16),
                DTypeArg::F16 => DTypeChoice::To(DType::F16),
                DTypeArg::F32 => DTypeChoice::To(DType::F32),
                DTypeArg::Fp8E4m3 => DTypeChoice::To(DType::F8E4M3),
                DTypeArg::Fp8E5m2 => DTypeChoice::To(DType::F8E5M2),
            };
            let quant = match (q, format, dtype) {
                (Some(q), _, _) => Some(quant(&q)?),
                (None, OutFormat::Gguf, DTypeChoice::To(DType::F32)) => Some(GgmlType::F32),
                (None, OutFormat::Gguf, DTypeChoice::To(DType::F16)) => Some(GgmlType::F16),
                (None, OutFormat::Gguf, DTypeChoice::To(DType::BF16)) => Some(GgmlType::BF16),
                (None, OutFormat::Gguf, DTypeChoice::To(d)) => {
                    return Err(Error::usage(format!("GGUF output cannot hold {d}; use --quant")))
                }
                _ => None,
            };
            let opts = convert::Options {
                layout: l.map(layout),
                dtype: if format == OutFormat::Gguf { DTypeChoice::Keep } else { dtype },
                format,
                quant,
                shard_size: shard_size.as_deref().map(convert::parse_size).transpose()?,
                fp8_scale: match fp8_scale {
                    Fp8ScaleArg::Comfy => Fp8Scale::Comfy,
                    Fp8ScaleArg::WeightScale => Fp8Scale::WeightScale,
                    Fp8ScaleArg::None => Fp8Scale::None,
                },
                comfy_prefix,
                keep_metadata: !drop_metadata,
                sha256,
                force,
                quiet,
                sync: !no_sync,
            };
            let r = convert::convert(&input, &out, &opts)?;
            if cli.json {
                print_json(&serde_json::json!({ "ok": true, "report": r }))?;
            } else {
                let fam = match (&r.family, &r.variant) {
                    (Some(f), Some(v)) => format!(" [{f}, {v}]"),
                    _ => String::new(),
                };
                let lay = match (r.from_layout, r.to_layout) {
                    (Some(a), Some(b)) if a != b => format!(", {a:?} → {b:?} names").to_lowercase(),
                    _ => String::new(),
                };
                println!(
                    "converted {} → {}{fam}: {} tensors, {:.1} MB in {:.2} s ({:.0} MB/s){lay}",
                    r.input.display(),
                    r.output.display(),
                    r.tensors,
                    r.bytes_out as f64 / 1e6,
                    r.seconds,
                    r.bytes_out as f64 / 1e6 / r.seconds.max(1e-9)
                );
                for n in &r.notes {
                    println!("note: {n}");
                }
            }
            Ok(())
        }
        Command::Bench(BenchCommand::Io { dir, size, repeats, no_replicas, no_python }) => {
            let opts = phasekit::bench::IoOptions {
                dir: dir.unwrap_or_else(std::env::temp_dir),
                size: convert::parse_size(&size)?,
                repeats,
                replicas: !no_replicas,
                python: !no_python,
            };
            let json = cli.json;
            let lines = phasekit::bench::io(&opts, &mut |m| {
                if !json {
                    eprintln!("{m}");
                }
            })?;
            if json {
                print_json(&lines)?;
            } else {
                print!("{}", phasekit::bench::render(&lines));
            }
            Ok(())
        }
        Command::Bench(BenchCommand::Replica { model, out, dtype }) => {
            use phasekit::replica::{self, Model};
            let m = match model {
                ReplicaModel::QwenImage => Model::QwenImage,
                ReplicaModel::WanT2vA14b => Model::WanT2vA14b,
                ReplicaModel::WanI2vA14b => Model::WanI2vA14b,
                ReplicaModel::WanTi2v5b => Model::WanTi2v5b,
            };
            let dt = match dtype {
                DTypeArg::Keep | DTypeArg::Bf16 => DType::BF16,
                DTypeArg::F16 => DType::F16,
                DTypeArg::F32 => DType::F32,
                DTypeArg::Fp8E4m3 => DType::F8E4M3,
                DTypeArg::Fp8E5m2 => DType::F8E5M2,
            };
            let tensors = replica::tensors(m);
            let len = replica::write(&out, &tensors, dt, None)?;
            if cli.json {
                print_json(&serde_json::json!({ "ok": true, "path": out, "tensors": tensors.len(), "bytes": len }))?;
            } else {
                println!("wrote {} ({} tensors, {:.2} GB sparse)", out.display(), tensors.len(), len as f64 / 1e9);
            }
            Ok(())
        }
        Command::Assemble(a) => phasekit::moe::cli::assemble(a, cli.json, quiet),
        Command::Export(a) => phasekit::moe::cli::export(a, cli.json, quiet),
        Command::Pack(a) => phasekit::moe::cli::pack(a, cli.json, quiet),
        Command::Unpack(a) => phasekit::moe::cli::unpack(a, cli.json, quiet),
        Command::Lora(c) => phasekit::lora::cli::run(c, cli.json, quiet),
        Command::Bench(BenchCommand::Moe(a)) => phasekit::moe::cli::bench(a, cli.json),
        Command::Train(a) => phasekit::train::cli::train(&a, cli.json, quiet),
        Command::Sample(a) => phasekit::train::cli::sample(&a, cli.json),
        Command::Quickstart(a) => phasekit::train::cli::quickstart(&a, cli.json, quiet),
        Command::Forward(a) => phasekit::model::cli::run(&a, cli.json),
        Command::Bench(BenchCommand::Block(a)) => phasekit::model::bench::run(&a, cli.json),
        Command::Bench(BenchCommand::Attention(a)) => phasekit::ops::bench::run(&a, cli.json),
        Command::Bench(BenchCommand::TrainToy(a)) => phasekit::train::cli::bench_train_toy(&a, cli.json, quiet),
        Command::Bench(BenchCommand::ToyStep(a)) => phasekit::train::cli::bench_toy_step(&a, cli.json, quiet),
        Command::Verify { path } => {
            let r = phasekit::verify::verify(&path, quiet)?;
            if cli.json {
                // One object: the report, and on failure the error object as every command has.
                let mut v = serde_json::to_value(&r).map_err(|e| Error::internal(e.to_string()))?;
                if let (Some(e), Some(obj)) = (r.error(), v.as_object_mut()) {
                    let err = error_json(&e.with_path(&path));
                    obj.insert("error".into(), err["error"].clone());
                }
                print_json(&v)?;
            } else {
                for c in &r.checks {
                    println!("{} {:<9} {}", if c.ok { "ok  " } else { "FAIL" }, c.check, c.detail);
                }
            }
            match r.error() {
                None => Ok(()),
                Some(e) if cli.json => {
                    // The report above already says what failed; exit with the class's code.
                    std::process::exit(e.exit_code());
                }
                Some(e) => Err(e),
            }
        }
    }
}
