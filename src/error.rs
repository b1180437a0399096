//! One error type for the whole crate.
//!
//! Every error carries a [`Kind`] (which decides the process exit code), the file it is
//! about (when there is one) and a one-line message. The CLI prints `phasekit: <path>: <message>`
//! and exits with [`Kind::exit_code`]. Messages never contain a newline: untrusted names are
//! cleaned with [`clean`] before they are echoed.

use std::fmt;
use std::path::{Path, PathBuf};

/// The class of a failure; each class has its own exit code (documented in `docs/cli.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The operating system refused: missing file, permission, disk full. Exit 3.
    Io,
    /// The file ends before the data it declares. Exit 4.
    Truncated,
    /// The bytes are not a valid file of the format (header, JSON, offsets, types). Exit 5.
    Malformed,
    /// Files disagree with each other: index vs shards, missing tensors, config vs shapes. Exit 6.
    Inconsistent,
    /// Valid input that this operation cannot handle (unknown family, dtype cast, quant shape). Exit 7.
    Unsupported,
    /// A hash or checksum does not match. Exit 8.
    Integrity,
    /// A declared size or count exceeds a safety limit (or the machine). Exit 9.
    Limit,
    /// The command line is wrong. Exit 2.
    Usage,
    /// A bug in phasekit. Exit 1.
    Internal,
}

impl Kind {
    /// Process exit code for this class of error.
    pub fn exit_code(self) -> i32 {
        match self {
            Kind::Internal => 1,
            Kind::Usage => 2,
            Kind::Io => 3,
            Kind::Truncated => 4,
            Kind::Malformed => 5,
            Kind::Inconsistent => 6,
            Kind::Unsupported => 7,
            Kind::Integrity => 8,
            Kind::Limit => 9,
        }
    }

    /// Short stable name, used in `--json` output.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Io => "io",
            Kind::Truncated => "truncated",
            Kind::Malformed => "malformed",
            Kind::Inconsistent => "inconsistent",
            Kind::Unsupported => "unsupported",
            Kind::Integrity => "integrity",
            Kind::Limit => "limit",
            Kind::Usage => "usage",
            Kind::Internal => "internal",
        }
    }
}

/// phasekit's error: a kind, an optional file and a one-line message.
#[derive(Debug)]
pub struct Error {
    kind: Kind,
    path: Option<PathBuf>,
    msg: String,
    source: Option<std::io::Error>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: Kind, msg: impl Into<String>) -> Self {
        Error { kind, path: None, msg: one_line(msg.into()), source: None }
    }
    pub fn at(kind: Kind, path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::new(kind, msg).with_path(path)
    }
    /// An I/O error about `path`; a missing file or a full disk keeps its OS message.
    pub fn io(path: impl AsRef<Path>, err: std::io::Error) -> Self {
        let msg = err.to_string();
        Error { kind: Kind::Io, path: Some(path.as_ref().to_path_buf()), msg: one_line(msg), source: Some(err) }
    }
    pub fn truncated(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::at(Kind::Truncated, path, msg)
    }
    pub fn malformed(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::at(Kind::Malformed, path, msg)
    }
    pub fn inconsistent(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::at(Kind::Inconsistent, path, msg)
    }
    pub fn unsupported(msg: impl Into<String>) -> Self {
        Error::new(Kind::Unsupported, msg)
    }
    pub fn limit(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::at(Kind::Limit, path, msg)
    }
    pub fn integrity(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::at(Kind::Integrity, path, msg)
    }
    pub fn usage(msg: impl Into<String>) -> Self {
        Error::new(Kind::Usage, msg)
    }
    pub fn internal(msg: impl Into<String>) -> Self {
        Error::new(Kind::Internal, msg)
    }
    /// Attach a file when the error does not name one yet.
    pub fn with_path(mut self, path: impl AsRef<Path>) -> Self {
        if self.path.is_none() {
            self.path = Some(path.as_ref().to_path_buf());
        }
        self
    }
    /// Prefix the message with more context ("tensor blocks.0.q.weight: ...").
    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        self.msg = one_line(format!("{ctx}: {}", self.msg));
        self
    }
    pub fn kind(&self) -> Kind {
        self.kind
    }
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
    pub fn message(&self) -> &str {
        &self.msg
    }
    pub fn exit_code(&self) -> i32 {
        self.kind.exit_code()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(p) => write!(f, "{}: {}", clean(&p.display().to_string()), self.msg),
            None => f.write_str(&self.msg),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

fn one_line(s: String) -> String {
    if s.contains(['\n', '\r']) {
        s.replace(['\n', '\r'], " ")
    } else {
        s
    }
}

/// Make an untrusted string safe to print on one line: control characters are escaped
/// and very long strings are cut (with a note of the full length).
pub fn clean(s: &str) -> String {
    const MAX: usize = 200;
    let mut out = String::with_capacity(s.len().min(MAX + 16));
    for (n, c) in s.chars().enumerate() {
        if n == MAX {
            out.push_str(&format!("…({} bytes)", s.len()));
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Extension to turn `std::io::Result` into ours with a path.
pub trait IoContext<T> {
    fn with_file(self, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn with_file(self, path: &Path) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
