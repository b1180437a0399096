//! The one place that decides what a command prints: one JSON value on stdout with `--json`,
//! text otherwise; no progress bars with `--quiet` or `--json`; errors as JSON or as one line on
//! stderr.
//!
//! A closed stdout (`phasekit inspect ... | head`) is not an error: writes to it are ignored.

use std::io::Write;

use serde::Serialize;

use crate::error::Error;

/// How the command line reports.
#[derive(Debug, Clone, Copy)]
pub struct Printer {
    json: bool,
    quiet: bool,
}

impl Printer {
    /// `--json` implies `--quiet`.
    pub fn new(json: bool, quiet: bool) -> Self {
        Printer { json, quiet: quiet || json }
    }
    /// Whether output is one JSON value.
    pub fn json(&self) -> bool {
        self.json
    }
    /// Whether progress bars (and chatter) are off.
    pub fn quiet(&self) -> bool {
        self.quiet
    }

    /// A command's result: `{"ok": true, "report": REPORT}` with `--json`, else what `text` writes.
    pub fn report<T: Serialize>(&self, report: &T, text: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) {
        if self.json {
            print_json(&serde_json::json!({ "ok": true, "report": report }));
        } else {
            self.text(text);
        }
    }

    /// A value printed as it is with `--json` (no envelope), else what `text` writes.
    pub fn value<T: Serialize>(&self, value: &T, text: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) {
        if self.json {
            print_json(value);
        } else {
            self.text(text);
        }
    }

    /// Text on stdout (nothing with `--json`).
    pub fn text(&self, text: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) {
        if !self.json {
            let mut out = std::io::stdout().lock();
            let _ = text(&mut out);
        }
    }

    /// A progress message on stderr (nothing with `--json`).
    pub fn log(&self, message: &str) {
        if !self.json {
            eprintln!("{message}");
        }
    }

    /// An error: the `--json` error object on stdout (one line), or `phasekit: error: ...` on stderr.
    pub fn error(&self, e: &Error) {
        if self.json {
            print_error_json(e);
        } else {
            eprintln!("phasekit: error: {e}");
        }
    }
}

/// Print one pretty JSON value and a newline on stdout.
pub fn print_json(v: &impl Serialize) {
    let text = match serde_json::to_string_pretty(v) {
        Ok(t) => t,
        Err(e) => error_json(&Error::internal(format!("JSON output: {e}"))).to_string(),
    };
    let _ = writeln!(std::io::stdout().lock(), "{text}");
}

/// The `--json` error object on one line of stdout.
pub fn print_error_json(e: &Error) {
    let _ = writeln!(std::io::stdout().lock(), "{}", error_json(e));
}

/// The `--json` error object: `{"ok": false, "error": {kind, exit_code, path, message}}`, plus
/// `tensor`, `expected` and `found` when the error carries them.
pub fn error_json(e: &Error) -> serde_json::Value {
    let mut o = serde_json::json!({ "kind": e.kind().as_str(), "exit_code": e.exit_code(), "path": e.path(), "message": e.message() });
    if let (Some(d), Some(m)) = (e.detail(), o.as_object_mut()) {
        for (k, v) in [("tensor", &d.tensor), ("expected", &d.expected), ("found", &d.found)] {
            if let Some(v) = v {
                m.insert(k.into(), v.clone().into());
            }
        }
    }
    serde_json::json!({ "ok": false, "error": o })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;

    #[test]
    fn error_json_carries_structured_fields_only_when_present() {
        let plain = error_json(&Error::new(Kind::Usage, "bad"));
        assert_eq!(plain["error"].as_object().unwrap().len(), 4, "{plain}");
        let e = Error::new(Kind::Malformed, "shape").with_tensor("blocks.0.ffn.net.0.proj.weight").with_expected_found("[8, 4]", "[4, 8]");
        let j = error_json(&e);
        assert_eq!(j["error"]["tensor"], "blocks.0.ffn.net.0.proj.weight");
        assert_eq!((j["error"]["expected"].as_str(), j["error"]["found"].as_str()), (Some("[8, 4]"), Some("[4, 8]")));
        assert_eq!(j["ok"], false);
    }
}
