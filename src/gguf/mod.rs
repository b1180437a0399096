//! GGUF v2/v3 reader and streaming v3 writer (our own; see `docs/gguf.md` for why not
//! `gguf-rs` or candle, the checks, the limits and the ComfyUI-GGUF conventions).
//!
//! File layout (little-endian):
//! ```text
//! "GGUF"  u32 version  u64 n_tensors  u64 n_kv
//! n_kv × (string key, u32 value_type, value)
//! n_tensors × (string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset)
//! zero padding to the alignment, then the data section; each tensor starts at
//! data_start + offset, a multiple of the alignment (`general.alignment`, default 32)
//! string = u64 length + bytes (UTF-8, no terminator)
//! ```
//! `ne[0]` is the innermost dimension, so GGUF dims are the reverse of torch's shape.
//! [`GgufTensor::shape`] and [`TensorPlan::shape`] are in torch order.

mod read;
mod value;
mod write;

pub use read::parse;
pub use value::{Array, Value, ValueType};
pub use write::{plan, write_all, write_padding, GgufPlan, TensorPlan, TensorWriter};

use crate::quant::GgmlType;

/// The four bytes every GGUF file starts with.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// The version [`plan`] writes.
pub const VERSION: u32 = 3;
/// `GGUF_DEFAULT_ALIGNMENT`.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Well-known keys.
pub const KEY_ALIGNMENT: &str = "general.alignment";
pub const KEY_ARCHITECTURE: &str = "general.architecture";
pub const KEY_FILE_TYPE: &str = "general.file_type";
pub const KEY_QUANTIZATION_VERSION: &str = "general.quantization_version";
pub const KEY_NAME: &str = "general.name";
/// ComfyUI-GGUF: `comfy.gguf.orig_shape.<tensor>` = ARRAY of INT32, the torch shape before a
/// reshape done to make a tensor quantisable.
pub const ORIG_SHAPE_PREFIX: &str = "comfy.gguf.orig_shape.";

/// Safety limits of the reader (the writer refuses to write what the reader would refuse).
pub mod limits {
    /// `general.alignment`. ggml accepts any power of two that fits in u32, but the padding
    /// after the header is part of [`super::GgufPlan::header`], so the writer caps it, and the
    /// reader refuses what the writer could not write back.
    pub const MAX_ALIGNMENT: u64 = 1 << 24;
    /// Dimensions of one tensor. ggml allows 4; ComfyUI-GGUF Wan files have 5-D tensors.
    pub const MAX_DIMS: usize = 8;
    /// Arrays inside arrays (a top-level array is depth 1).
    pub const MAX_NESTING: usize = 8;
    /// Elements of one metadata array (LLM vocabularies have about 2^18).
    pub const MAX_ARRAY_LEN: u64 = 1 << 24;
    /// Bytes of a key or a tensor name (the spec caps keys at 65535).
    pub const MAX_NAME_LEN: u64 = 65_535;
    /// Bytes of a string value (ggml `GGUF_MAX_STRING_LENGTH`).
    pub const MAX_STRING_LEN: u64 = 1 << 30;
    /// Tensors in one file.
    pub const MAX_TENSORS: u64 = 1 << 20;
    /// Key-value pairs in one file.
    pub const MAX_KV: u64 = 1 << 20;
    /// The smallest key-value pair: empty key length, type, a 1-byte value.
    pub(crate) const MIN_KV_BYTES: u64 = 8 + 4 + 1;
    /// The smallest tensor info: name length, n_dims, type, offset.
    pub(crate) const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;
}

/// Elements of a shape: 0 when any dimension is 0 (whatever the others are, as in ggml),
/// otherwise the product if it fits in i64. Each dimension must fit in i64 (ggml's `int64_t ne`).
pub(crate) fn numel(dims: &[u64]) -> Option<u64> {
    if dims.iter().any(|&d| d > i64::MAX as u64) {
        return None;
    }
    if dims.contains(&0) {
        return Some(0);
    }
    crate::dtype::numel(dims).filter(|&n| n <= i64::MAX as u64)
}

/// A parsed, validated GGUF file. Tensor data stays in the caller's byte slice.
#[derive(Debug, Clone)]
pub struct GgufFile {
    pub version: u32,
    /// `general.alignment`, or 32.
    pub alignment: u64,
    /// Metadata in file order.
    pub kv: Vec<(String, Value)>,
    /// Tensors in file (info) order.
    pub tensors: Vec<GgufTensor>,
    /// Absolute offset of the data section.
    pub data_offset: u64,
}

/// One tensor: a byte range of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensor {
    pub name: String,
    /// Torch order (the reverse of ggml's `ne`).
    pub shape: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute file offset of the first byte.
    pub offset: u64,
    /// Bytes of data (without padding).
    pub size: u64,
}

impl GgufFile {
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kv.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// `general.architecture`, when it is a string.
    pub fn architecture(&self) -> Option<&str> {
        self.get(KEY_ARCHITECTURE).and_then(Value::as_str)
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The torch shape recorded by ComfyUI-GGUF in `comfy.gguf.orig_shape.<name>`, if any.
    pub fn orig_shape(&self, name: &str) -> Option<Vec<i64>> {
        self.get(&format!("{ORIG_SHAPE_PREFIX}{name}"))?.as_array()?.to_i64s()
    }
}

impl GgufTensor {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        // Checked when parsed.
        numel(&self.shape).unwrap_or(0)
    }

    /// This tensor's bytes in `file` (the slice [`parse`] was given); `None` if `file` is
    /// shorter than the tensor's range.
    pub fn data<'a>(&self, file: &'a [u8]) -> Option<&'a [u8]> {
        let start = usize::try_from(self.offset).ok()?;
        let end = start.checked_add(usize::try_from(self.size).ok()?)?;
        file.get(start..end)
    }
}

impl From<&GgufTensor> for TensorPlan {
    fn from(t: &GgufTensor) -> TensorPlan {
        TensorPlan { name: t.name.clone(), shape: t.shape.clone(), ty: t.ty }
    }
}

/// `general.file_type` values (llama.h `llama_ftype`, gguf-py `LlamaFileType`).
pub mod file_type {
    pub const ALL_F32: u32 = 0;
    pub const MOSTLY_F16: u32 = 1;
    pub const MOSTLY_Q4_0: u32 = 2;
    pub const MOSTLY_Q4_1: u32 = 3;
    pub const MOSTLY_Q8_0: u32 = 7;
    pub const MOSTLY_Q5_0: u32 = 8;
    pub const MOSTLY_Q5_1: u32 = 9;
    pub const MOSTLY_Q2_K: u32 = 10;
    pub const MOSTLY_Q3_K_M: u32 = 12;
    pub const MOSTLY_Q4_K_M: u32 = 15;
    pub const MOSTLY_Q5_K_M: u32 = 17;
    pub const MOSTLY_Q6_K: u32 = 18;
    pub const MOSTLY_BF16: u32 = 32;
}

#[cfg(test)]
mod tests;
