//! `phasekit verify`.

use std::path::PathBuf;

use clap::Args;

use super::{ExitStatus, Printer};
use crate::error::Result;

/// Arguments of `phasekit verify`.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    pub path: PathBuf,
    /// A model.sig bundle (from `phasekit sign` or `model_signing sign key`) covering PATH.
    #[arg(long, value_name = "SIG", requires = "key")]
    pub signature: Option<PathBuf>,
    /// The signer's public key, PEM (`BEGIN PUBLIC KEY`, ECDSA P-256).
    #[arg(long, value_name = "KEY.pub", requires = "signature")]
    pub key: Option<PathBuf>,
}

/// Print every check. A failed check is not an `Err`: with `--json` the report carries the error
/// object and the command exits with its kind's code ([`ExitStatus::Failure`]); as text the
/// checks are listed and the first failure is returned as the error.
pub fn run(a: VerifyArgs, p: &Printer) -> Result<ExitStatus> {
    if let (Some(sig), Some(key)) = (&a.signature, &a.key) {
        crate::sign::run_verify(&a.path, sig, key, p.json())?;
        return Ok(ExitStatus::Success);
    }
    let r = crate::verify::verify(&a.path, p.quiet())?;
    if p.json() {
        // One object: the report, and on failure the error object as every command has.
        let mut v = serde_json::to_value(&r).map_err(|e| crate::Error::internal(e.to_string()))?;
        if let (Some(e), Some(obj)) = (r.error(), v.as_object_mut()) {
            let err = super::printer::error_json(&e.with_path(&a.path));
            obj.insert("error".into(), err["error"].clone());
        }
        p.value(&v, |_| Ok(()));
        return Ok(r.error().map_or(ExitStatus::Success, |e| ExitStatus::Failure(e.kind())));
    }
    p.text(|o| {
        for c in &r.checks {
            writeln!(o, "{} {:<9} {}", if c.ok { "ok  " } else { "FAIL" }, c.check, c.detail)?;
        }
        Ok(())
    });
    match r.error() {
        None => Ok(ExitStatus::Success),
        Some(e) => Err(e),
    }
}
