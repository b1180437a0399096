//! `phasekit bench replica`: write a full-size replica of a real checkpoint (`crate::replica`),
//! the input of memory and speed measurements at real scale: sparse zeros by default (no disk),
//! or seeded random values (`--random`, the full size on disk).

use std::path::PathBuf;

use clap::Args;

use crate::cli::args::DTypeArg;
use crate::cli::printer::Printer;
use crate::dtype::DType;
use crate::error::{Error, Kind, Result};
use crate::replica::{self, Model};

/// Arguments of `phasekit bench replica`.
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  phasekit bench replica wan-t2v-a14b /tmp/wan-high.safetensors             # sparse zeros: no disk\n  phasekit bench replica wan-t2v-a14b /data/wan-high.safetensors --random --seed 1   # 28.6 GB on disk"
)]
pub struct ReplicaArgs {
    #[arg(value_enum)]
    pub model: Model,
    /// Output .safetensors file.
    pub out: PathBuf,
    /// Element type of the replica.
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: DTypeArg,
    /// Fill the tensors with seeded random values instead of leaving a hole: N(0, std²) (1-D norm
    /// scales N(1, std²)) in the replica's dtype. Zeros run faster than real data, so speed
    /// measurements need this. It costs real disk, the replica's full size (28.6 GB for a Wan2.2
    /// A14B expert in bf16, 40.9 GB for Qwen-Image): refused (exit 9) when the output's file
    /// system has less free space than that plus --keep-free.
    #[arg(long)]
    pub random: bool,
    /// Seed of --random (the same seed writes the same bytes).
    #[arg(long, default_value_t = 0, requires = "random")]
    pub seed: u64,
    /// Standard deviation of --random's values (real transformer weights: about 0.02).
    #[arg(long, default_value_t = 0.02, requires = "random")]
    pub std: f32,
    /// With --random: free space to leave on the output's file system, e.g. 1GB or 0.
    #[arg(long, default_value = "1GB", requires = "random")]
    pub keep_free: String,
}

pub fn run(a: ReplicaArgs, p: &Printer) -> Result<()> {
    let tensors = replica::tensors(a.model);
    let dtype = a.dtype.dtype().unwrap_or(DType::BF16);
    let len = if a.random {
        if !(a.std.is_finite() && a.std >= 0.0) {
            return Err(Error::usage(format!("--std {} must be a finite number ≥ 0", a.std)));
        }
        let keep = crate::cli::args::parse_size(&a.keep_free)?;
        let need = replica::data_bytes(&tensors, dtype);
        let dir = match a.out.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let free = replica::free_space(&dir)?;
        if free < need.saturating_add(keep) {
            return Err(Error::at(
                Kind::Limit,
                &dir,
                format!(
                    "--random writes {:.2} GB of data, and {:.2} GB are free (keeping {:.2} GB free, --keep-free); the sparse replica (without --random) costs no disk",
                    need as f64 / 1e9,
                    free as f64 / 1e9,
                    keep as f64 / 1e9
                ),
            ));
        }
        let mut fill = replica::random_fill(a.seed, a.std, dtype, &tensors)?;
        replica::write(&a.out, &tensors, dtype, Some(&mut fill))?
    } else {
        replica::write(&a.out, &tensors, dtype, None)?
    };
    let kind = if a.random { "random" } else { "sparse" };
    p.value(
        &serde_json::json!({ "ok": true, "path": a.out, "tensors": tensors.len(), "bytes": len, "values": kind, "seed": a.random.then_some(a.seed) }),
        |o| writeln!(o, "wrote {} ({} tensors, {:.2} GB {kind})", a.out.display(), tensors.len(), len as f64 / 1e9),
    );
    Ok(())
}
