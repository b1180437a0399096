//! PyTorch checkpoints read without running code: `torch.save` zip archives (`.pt`, `.pth`,
//! `.bin`) and `torch.distributed.checkpoint` (DCP) folders (`.metadata` + `__<rank>_<n>.distcp`).
//!
//! - [`zip`]: the archive's central directory → the byte range of each stored entry;
//! - [`pickle`]: a restricted unpickler (an allow-list of opcodes and globals, caps on sizes);
//! - [`torch`]: a `data.pkl` tree → tensor descriptors (dtype, shape, strides checked for
//!   contiguity, the byte range inside its storage entry);
//! - [`dcp`]: a DCP `.metadata` → where each tensor (or each chunk of a sharded tensor) lives;
//! - `crate::store` opens both as a [`crate::store::Checkpoint`], so that `inspect`, `convert`, `assemble`
//!   and every other command read them like safetensors files.
//!
//! Tensors are served zero-copy from the memory map of the archive: torch stores every entry
//! uncompressed. Tensors a DCP folder splits into chunks (FSDP shards) are copied once, by the
//! kernel, into one temporary file at open. Why phasekit does not use candle's `pickle` module
//! is in `docs/pytorch.md`.

pub mod dcp;
pub mod pickle;
pub mod torch;
pub mod zip;

/// What a PyTorch source held besides its tensors, for `inspect`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Info {
    /// `torch.save` or `torch.distributed.checkpoint`.
    pub container: String,
    /// Non-tensor values of the state dict (`iteration = 500`), at most [`MAX_VALUES`].
    pub values: Vec<(String, String)>,
    /// What the reader decided (subtrees skipped, shards consolidated).
    pub notes: Vec<String>,
}

/// Most non-tensor values kept for `inspect`.
pub const MAX_VALUES: usize = 256;

/// Whether a file is a zip archive (the first bytes of a `torch.save` file).
pub fn is_zip(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == b"PK\x03\x04"
}

/// Whether a file name ends like a PyTorch checkpoint.
pub fn has_torch_extension(path: &std::path::Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e, "pt" | "pth" | "bin" | "ckpt"))
}

/// Whether `dir` is a DCP checkpoint folder.
pub fn is_dcp_dir(dir: &std::path::Path) -> bool {
    dir.join(".metadata").is_file()
}

/// Text lines for `inspect`.
pub fn render(info: &Info) -> String {
    let mut s = format!("pytorch:    {} (read without running code)\n", info.container);
    for n in &info.notes {
        s.push_str(&format!("  note: {n}\n"));
    }
    for (k, v) in &info.values {
        s.push_str(&format!("  {} = {v}\n", crate::error::clean(k)));
    }
    s
}
