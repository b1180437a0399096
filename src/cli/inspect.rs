//! `phasekit inspect`.

use std::path::PathBuf;

use clap::Args;

use super::Printer;
use crate::error::Result;

/// Show format, model family and variant, layout, parameters, dtypes, shards, metadata and config.
///
/// PATH may be a .safetensors file, a sharded folder or its *.safetensors.index.json, a diffusers
/// model folder, a Wan2.2 repo folder (high_noise_model/ + low_noise_model/) or a .gguf file.
/// Only headers are read.
#[derive(Args, Debug)]
pub struct InspectArgs {
    pub path: PathBuf,
}

/// One report per model (a multi-model folder has several); JSON: the report, or
/// `{"path", "models": [...]}` for several.
pub fn run(a: InspectArgs, p: &Printer) -> Result<()> {
    let reports = crate::inspect::inspect(&a.path)?;
    let text = |o: &mut dyn std::io::Write| {
        for r in &reports {
            write!(o, "{}", crate::inspect::render(r))?;
        }
        Ok(())
    };
    if reports.len() == 1 {
        p.value(&reports[0], text);
    } else {
        p.value(&serde_json::json!({ "path": a.path, "models": reports }), text);
    }
    Ok(())
}
