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

/// phasekit's error: a kind, an optional file and a one-line message, with structured fields
/// where a caller (or a test, or `--json`) needs them: the tensor it is about, and what was
/// expected and found.
#[derive(Debug)]
pub struct Error {
    kind: Kind,
    path: Option<PathBuf>,
    msg: String,
    source: Option<std::io::Error>,
    detail: Option<Box<Detail>>,
}

/// Structured fields of an [`Error`] (each also said in its message).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Detail {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tensor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub found: Option<String>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: Kind, msg: impl Into<String>) -> Self {
        Error { kind, path: None, msg: one_line(msg.into()), source: None, detail: None }
    }
    pub fn at(kind: Kind, path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::new(kind, msg).with_path(path)
    }
    /// An I/O error about `path`; a missing file or a full disk keeps its OS message.
    pub fn io(path: impl AsRef<Path>, err: std::io::Error) -> Self {
        let msg = err.to_string();
        Error { kind: Kind::Io, path: Some(path.as_ref().to_path_buf()), msg: one_line(msg), source: Some(err), detail: None }
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
    /// Name the tensor the error is about (kept as a field; the message should say it too).
    pub fn with_tensor(mut self, name: impl Into<String>) -> Self {
        self.detail.get_or_insert_with(Default::default).tensor = Some(name.into());
        self
    }
    /// Record what was expected and what was found (shapes, dtypes, sizes).
    pub fn with_expected_found(mut self, expected: impl Into<String>, found: impl Into<String>) -> Self {
        let d = self.detail.get_or_insert_with(Default::default);
        d.expected = Some(expected.into());
        d.found = Some(found.into());
        self
    }
    /// The structured fields, when the error has any.
    pub fn detail(&self) -> Option<&Detail> {
        self.detail.as_deref()
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

/// candle's errors keep their cause and get the kind that fits it: running out of memory (a
/// CUDA out-of-memory, a failed allocation) is [`Kind::Limit`] (exit 9), an op candle was not
/// built for is [`Kind::Unsupported`], everything else is a bug on our side ([`Kind::Internal`])
/// with candle's whole message (the op, the shapes) on one line, without a backtrace.
impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Error {
        use candle_core::Error as C;
        let mut e = e;
        // Unwrap the layers that only add a backtrace or a path.
        let path = loop {
            match e {
                C::WithBacktrace { inner, .. } => e = *inner,
                C::WithPath { inner, path } => {
                    let inner = Error::from(*inner);
                    return inner.with_path(path);
                }
                other => break other,
            }
        };
        let e = path;
        let text = candle_message(&e);
        let kind = match &e {
            _ if is_out_of_memory(&text) => Kind::Limit,
            C::NotCompiledWithCudaSupport | C::NotCompiledWithMetalSupport | C::BackwardNotSupported { .. } => Kind::Unsupported,
            C::UnsupportedDTypeForOp(..) => Kind::Unsupported,
            C::Io(_) => Kind::Io,
            _ => Kind::Internal,
        };
        let msg = match kind {
            Kind::Limit => format!("out of memory: {text}"),
            _ => format!("tensor: {text}"),
        };
        let mut out = Error::new(kind, clean_long(&msg));
        if let C::ShapeMismatchBinaryOp { lhs, rhs, .. } = &e {
            out = out.with_expected_found(format!("{lhs:?}"), format!("{rhs:?}"));
        }
        if let C::UnexpectedShape { expected, got, .. } = &e {
            out = out.with_expected_found(format!("{expected:?}"), format!("{got:?}"));
        }
        out
    }
}

/// candle's message without the stack-frame list some backends append (and one line).
fn candle_message(e: &candle_core::Error) -> String {
    let text = e.to_string();
    let mut keep = Vec::new();
    for l in text.lines() {
        let t = l.trim();
        // Backtraces: "   0: <unknown>", "at src/...", "stack backtrace:".
        let frame = t.split_once(':').is_some_and(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
        if frame || t.starts_with("at ") || t.starts_with("stack backtrace") || t.is_empty() {
            continue;
        }
        keep.push(t.to_string());
    }
    keep.join(" ")
}

/// Whether a (candle or driver) message reports an allocation failure.
pub fn is_out_of_memory(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    t.contains("out_of_memory") || t.contains("out of memory") || t.contains("memory allocation of") || t.contains("cannot allocate")
}

/// [`clean`] with a larger cap, for messages that carry shapes.
fn clean_long(s: &str) -> String {
    if s.chars().count() <= 200 {
        return clean(s);
    }
    let cut: String = s.chars().take(600).filter(|c| !c.is_control()).collect();
    if cut.len() < s.len() {
        format!("{cut}…")
    } else {
        cut
    }
}
