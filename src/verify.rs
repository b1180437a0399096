//! `phasekit verify`: structural validation of a checkpoint plus its `.sha256` sidecars.
//!
//! Structure: every safetensors rule of the official crate (per file and per shard), the
//! index's `weight_map` and `total_size` against the shards, GGUF offsets, alignment and types
//! (all checked by [`Checkpoint::open`]). Integrity: every `<file>.sha256` beside a file of the
//! checkpoint is recomputed, files in parallel.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Kind, Result};
use crate::hash;
use crate::progress::Progress;
use crate::store::{open_models, Checkpoint};

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub check: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub path: PathBuf,
    pub ok: bool,
    pub checks: Vec<Check>,
    /// Exit code class of the first failure.
    #[serde(skip)]
    pub failure: Option<Kind>,
}

fn files_of(ck: &Checkpoint) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = ck.files.iter().map(|f| f.path.clone()).collect();
    if let Some(i) = &ck.index {
        v.push(i.path.clone());
    }
    if let Some(c) = &ck.config {
        v.push(c.path.clone());
    }
    v
}

/// Verify everything under `path`. Structural errors are reported as a failed check (not an
/// `Err`) so that `--json` callers always get a report; `Err` is kept for I/O failures.
pub fn verify(path: &Path, quiet: bool) -> Result<VerifyReport> {
    let mut checks = Vec::new();
    let mut failure = None;
    let is_sidecar = path.is_file() && path.extension().is_some_and(|e| e == "sha256");
    let models = match if is_sidecar { Ok(Vec::new()) } else { open_models(path) } {
        Ok(m) => m,
        Err(e) if e.kind() == Kind::Io || e.kind() == Kind::Usage => return Err(e),
        Err(e) => {
            checks.push(Check { check: "structure".into(), ok: false, detail: e.to_string() });
            return Ok(VerifyReport { path: path.to_path_buf(), ok: false, checks, failure: Some(e.kind()) });
        }
    };
    let mut sidecars = Vec::new();
    for (role, ck) in &models {
        let label = if role.is_empty() { String::new() } else { format!("{role}: ") };
        let detail = match ck.format {
            crate::store::Format::ShardedSafetensors => {
                format!("{label}{} shards, {} tensors; weight_map and total_size match the shards", ck.files.len(), ck.tensors.len())
            }
            crate::store::Format::Gguf => format!(
                "{label}GGUF v{}, {} tensors; offsets, alignment and types valid",
                ck.gguf.as_ref().map_or(0, |g| g.version),
                ck.tensors.len()
            ),
            crate::store::Format::Safetensors => format!("{label}{} tensors; header, offsets and sizes valid", ck.tensors.len()),
            crate::store::Format::Pytorch | crate::store::Format::Dcp => {
                format!("{label}{} tensors; archive, pickle (no code), storages and byte ranges valid", ck.tensors.len())
            }
        };
        checks.push(Check { check: "structure".into(), ok: true, detail });
        // A scaled-fp8 file whose weights lack scales reads silently wrong (`crate::pitfalls`).
        match crate::pitfalls::check_scaled_fp8(ck) {
            Ok(0) => {}
            Ok(n) => checks.push(Check {
                check: "fp8".into(),
                ok: true,
                detail: format!("{label}{n} fp8 weights, each with a finite positive scale"),
            }),
            Err(e) => {
                failure.get_or_insert(e.kind());
                checks.push(Check { check: "fp8".into(), ok: false, detail: e.to_string() });
            }
        }
        if crate::moe::verify::is_moe(ck) {
            let r = crate::moe::verify::verify_checkpoint(ck);
            if let Some(k) = r.failure() {
                failure.get_or_insert(k);
            }
            checks.extend(moe_checks(&r));
        }
        for f in files_of(ck) {
            let sc = hash::sidecar_path(&f);
            if sc.is_file() {
                sidecars.push(sc);
            }
        }
    }
    if is_sidecar {
        sidecars.push(path.to_path_buf());
    }
    sidecars.sort();
    sidecars.dedup();
    if sidecars.is_empty() {
        checks.push(Check { check: "sha256".into(), ok: true, detail: "no .sha256 sidecar found (structure only)".into() });
    }
    let total: u64 = sidecars
        .iter()
        .flat_map(|s| {
            let dir = s.parent().unwrap_or(Path::new(".")).to_path_buf();
            hash::read_sidecar(s).unwrap_or_default().into_iter().map(move |(_, name)| dir.join(name))
        })
        .filter_map(|p| std::fs::metadata(p).ok().map(|m| m.len()))
        .sum();
    let progress = Progress::bytes(total.max(1), "sha256", quiet);
    for sc in &sidecars {
        match hash::check_sidecar(sc, &|n| progress.inc(n)) {
            Ok(results) => {
                for r in results {
                    let detail = match (&r.found, r.ok) {
                        (_, true) => format!("{} matches {}", r.file, sc.display()),
                        (Some(found), false) => format!("{}: expected {} found {}", r.file, r.expected, found),
                        (None, false) => format!("{}: listed in {} but missing", r.file, sc.display()),
                    };
                    if !r.ok && failure.is_none() {
                        failure = Some(Kind::Integrity);
                    }
                    checks.push(Check { check: "sha256".into(), ok: r.ok, detail });
                }
            }
            Err(e) => {
                failure.get_or_insert(e.kind());
                checks.push(Check { check: "sha256".into(), ok: false, detail: e.to_string() });
            }
        }
    }
    progress.finish();
    let ok = checks.iter().all(|c| c.ok);
    Ok(VerifyReport { path: path.to_path_buf(), ok, checks, failure })
}

/// The report as `phasekit verify` checks (one per problem, one summary when all is well).
fn moe_checks(r: &crate::moe::verify::MoeReport) -> Vec<Check> {
    let mut v = Vec::new();
    for f in &r.faults {
        v.push(Check { check: "moe".into(), ok: false, detail: f.message.clone() });
    }
    for m in &r.mismatches {
        v.push(Check {
            check: "moe.sha256".into(),
            ok: false,
            detail: format!("tensor '{}': expected {} found {}", m.tensor, m.expected, m.found),
        });
    }
    if r.ok {
        v.push(Check {
            check: "moe".into(),
            ok: true,
            detail: format!(
                "{}: {} experts, metadata digest ok, {} tensors ({:.1} MB) match their sha256",
                r.format,
                r.experts,
                r.tensors_checked,
                r.bytes_hashed as f64 / 1e6
            ),
        });
    }
    v
}

impl VerifyReport {
    /// The error to exit with when verification failed.
    pub fn error(&self) -> Option<Error> {
        let first = self.checks.iter().find(|c| !c.ok)?;
        Some(Error::new(self.failure.unwrap_or(Kind::Integrity), first.detail.clone()))
    }
}
