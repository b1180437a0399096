//! `phasekit report`: arguments (doc comments are the help text) and the command.

use std::path::PathBuf;

use clap::Args;

use crate::error::Result;

/// `phasekit report`.
#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// A run folder (`phasekit train --out`) or a folder of runs (`phasekit quickstart --out`).
    pub run_dir: PathBuf,
    /// The HTML file to write (default: RUN_DIR/report.html).
    #[arg(short, long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// The assembled checkpoint to show (default: a routed checkpoint beside the run whose
    /// recipe digest is the run's, in RUN_DIR or its parent).
    #[arg(long, value_name = "FILE")]
    pub checkpoint: Option<PathBuf>,
    /// Replace the output if it exists.
    #[arg(long)]
    pub force: bool,
}

/// Write the report; print where (or, with `--json`, `{"ok": true, "report": {...}}`).
pub fn run(a: &ReportArgs, json: bool) -> Result<()> {
    let out = a.out.clone().unwrap_or_else(|| a.run_dir.join("report.html"));
    let s = super::write(&a.run_dir, &out, a.checkpoint.as_deref(), a.force)?;
    if json {
        let v = serde_json::json!({ "ok": true, "report": s });
        println!("{}", serde_json::to_string_pretty(&v).map_err(|e| crate::error::Error::internal(e.to_string()))?);
    } else {
        let ck = s.checkpoint.as_ref().map(|p| format!(", checkpoint {}", p.display())).unwrap_or_default();
        println!(
            "wrote {} ({} run{}, {} images inlined{ck}, {:.0} KB)",
            s.out.display(),
            s.runs,
            if s.runs == 1 { "" } else { "s" },
            s.images,
            s.bytes as f64 / 1024.0
        );
    }
    Ok(())
}
