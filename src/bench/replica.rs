//! `phasekit bench replica`: write a sparse full-size replica of a real checkpoint
//! (`crate::replica`), the input of memory and speed measurements at real scale.

use std::path::PathBuf;

use clap::Args;

use crate::cli::args::DTypeArg;
use crate::cli::printer::Printer;
use crate::dtype::DType;
use crate::error::Result;
use crate::replica::{self, Model};

/// Arguments of `phasekit bench replica`.
#[derive(Args, Debug)]
pub struct ReplicaArgs {
    #[arg(value_enum)]
    pub model: Model,
    /// Output .safetensors file.
    pub out: PathBuf,
    /// Element type of the replica.
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: DTypeArg,
}

pub fn run(a: ReplicaArgs, p: &Printer) -> Result<()> {
    let tensors = replica::tensors(a.model);
    let len = replica::write(&a.out, &tensors, a.dtype.dtype().unwrap_or(DType::BF16), None)?;
    p.value(&serde_json::json!({ "ok": true, "path": a.out, "tensors": tensors.len(), "bytes": len }), |o| {
        writeln!(o, "wrote {} ({} tensors, {:.2} GB sparse)", a.out.display(), tensors.len(), len as f64 / 1e9)
    });
    Ok(())
}
