//! GGUF reader: one validation pass over a byte slice (normally a memory map).
//!
//! Nothing is allocated from a declared count or length before that count has been compared
//! with the bytes left in the file (and with a named cap, see [`super::limits`]). Tensor data is
//! never copied: a [`GgufTensor`] is a byte range of the file.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::limits::*;
use super::value::{Array, Value, ValueType};
use super::{GgufFile, GgufTensor, DEFAULT_ALIGNMENT, KEY_ALIGNMENT, MAGIC};
use crate::error::{clean, Error, Kind, Result};
use crate::quant::GgmlType;

/// Parse and validate a GGUF file held in `bytes`. `path` is only used in error messages.
///
/// Versions 2 and 3, little-endian. See `docs/gguf.md` for every check and limit.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<GgufFile> {
    let mut r = Reader { path, bytes, pos: 0 };
    let magic = r.take(4, "the magic")?;
    if magic != MAGIC {
        return Err(Error::malformed(path, format!("not a GGUF file: the magic is {:02x?}, expected \"GGUF\" (47 47 55 46)", magic)));
    }
    let version = r.u32("the version")?;
    match version {
        2 | 3 => {}
        1 => return Err(r.err(Kind::Unsupported, "GGUF version 1 is not supported (phasekit reads versions 2 and 3)")),
        v if v != 0 && v & 0xffff == 0 => {
            return Err(r.err(
                Kind::Unsupported,
                format!("GGUF version field is {v:#010x}: a big-endian file? phasekit reads little-endian GGUF only"),
            ))
        }
        0 => return Err(r.err(Kind::Malformed, "GGUF version 0 is not a valid version")),
        v => return Err(r.err(Kind::Unsupported, format!("GGUF version {v} is not supported (phasekit reads versions 2 and 3)"))),
    }
    let n_tensors = r.u64("the tensor count")?;
    let n_kv = r.u64("the key-value count")?;
    if n_tensors > MAX_TENSORS {
        return Err(r.err(Kind::Limit, format!("declares {n_tensors} tensors, over the limit of {MAX_TENSORS}")));
    }
    if n_kv > MAX_KV {
        return Err(r.err(Kind::Limit, format!("declares {n_kv} key-value pairs, over the limit of {MAX_KV}")));
    }
    // Each pair takes at least 13 bytes and each tensor info at least 24.
    let need = n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES;
    if need > r.left() as u64 {
        return Err(r.err(
            Kind::Truncated,
            format!(
                "declares {n_kv} key-value pairs and {n_tensors} tensors, which need at least {need} bytes, but only {} bytes follow",
                r.left()
            ),
        ));
    }

    // Key-value pairs.
    let mut kv: Vec<(String, Value)> = Vec::with_capacity(n_kv as usize);
    let mut keys: HashSet<&str> = HashSet::with_capacity(n_kv as usize);
    for i in 0..n_kv {
        let key = r.name(&format!("key #{i}"))?;
        if key.is_empty() {
            return Err(r.err(Kind::Malformed, format!("key #{i} is empty")));
        }
        if !keys.insert(key) {
            return Err(r.err(Kind::Malformed, format!("duplicate key '{}'", clean(key))));
        }
        let what = format!("the value of key '{}'", clean(key));
        let ty = r.u32(&what)?;
        let value = r.value(ty, 0, &what)?;
        kv.push((key.to_string(), value));
    }

    let alignment = match kv.iter().find(|(k, _)| k == KEY_ALIGNMENT) {
        None => DEFAULT_ALIGNMENT,
        Some((_, Value::U32(a))) if a.is_power_of_two() && *a as u64 <= MAX_ALIGNMENT => *a as u64,
        Some((_, Value::U32(a))) if a.is_power_of_two() => {
            return Err(r.err(Kind::Limit, format!("{KEY_ALIGNMENT} is {a}, over the limit of {MAX_ALIGNMENT}")))
        }
        Some((_, Value::U32(a))) => return Err(r.err(Kind::Malformed, format!("{KEY_ALIGNMENT} is {a}, not a non-zero power of two"))),
        Some((_, v)) => return Err(r.err(Kind::Malformed, format!("{KEY_ALIGNMENT} must be a UINT32, found a {}", v.value_type()))),
    };

    // Tensor infos.
    if n_tensors * MIN_TENSOR_INFO_BYTES > r.left() as u64 {
        return Err(
            r.err(Kind::Truncated, format!("declares {n_tensors} tensors, but only {} bytes are left for their descriptions", r.left()))
        );
    }
    let mut tensors: Vec<GgufTensor> = Vec::with_capacity(n_tensors as usize);
    let mut rel_offsets: Vec<u64> = Vec::with_capacity(n_tensors as usize);
    let mut names: HashMap<&str, usize> = HashMap::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = r.name(&format!("tensor info #{i}"))?;
        if let Some(j) = names.insert(name, i as usize) {
            return Err(r.err(Kind::Malformed, format!("duplicate tensor name '{}' (tensors #{j} and #{i})", clean(name))));
        }
        let ctx = format!("tensor '{}'", clean(name));
        let n_dims = r.u32(&ctx)?;
        if n_dims as usize > MAX_DIMS {
            return Err(r.err(Kind::Limit, format!("{} has {n_dims} dimensions, over the limit of {MAX_DIMS}", ctx)));
        }
        let mut ne = [0u64; MAX_DIMS];
        for d in ne.iter_mut().take(n_dims as usize) {
            *d = r.u64(&ctx)?;
            if *d > i64::MAX as u64 {
                return Err(r.err(Kind::Malformed, format!("{} has a dimension of {}, over 2^63 - 1", ctx, *d)));
            }
        }
        let ne = &ne[..n_dims as usize];
        let type_id = r.u32(&ctx)?;
        let offset = r.u64(&ctx)?;
        let ty =
            GgmlType::from_id(type_id).ok_or_else(|| r.err(Kind::Unsupported, format!("{} has unknown ggml type id {type_id}", ctx)))?;
        let numel =
            super::numel(ne).ok_or_else(|| r.err(Kind::Malformed, format!("{}: the element count of shape {ne:?} overflows", ctx)))?;
        let ne0 = ne.first().copied().unwrap_or(1);
        if ne0 % ty.block_size() != 0 {
            return Err(r.err(
                Kind::Malformed,
                format!("{} has rows of {ne0} elements, not a multiple of the {ty} block size {}", ctx, ty.block_size()),
            ));
        }
        let size =
            ty.byte_size(ne0, numel).ok_or_else(|| r.err(Kind::Malformed, format!("{}: the byte size of shape {ne:?} overflows", ctx)))?;
        if offset % alignment != 0 {
            return Err(r.err(Kind::Malformed, format!("{}: data offset {offset} is not a multiple of the alignment {alignment}", ctx)));
        }
        rel_offsets.push(offset);
        tensors.push(GgufTensor { name: name.to_string(), shape: ne.iter().rev().copied().collect(), ty, offset: 0, size });
    }

    // The data section starts at the next multiple of the alignment.
    let header_end = r.pos as u64;
    let data_offset = header_end.div_ceil(alignment) * alignment;
    let file_len = bytes.len() as u64;
    if !tensors.is_empty() && data_offset > file_len {
        return Err(r.err(Kind::Truncated, format!("the data section would start at byte {data_offset}, past the end of the file")));
    }
    for (t, rel) in tensors.iter_mut().zip(&rel_offsets) {
        let start = data_offset.checked_add(*rel);
        let end = start.and_then(|s| s.checked_add(t.size));
        let (Some(start), Some(end)) = (start, end) else {
            return Err(r.err(Kind::Malformed, format!("tensor '{}': data offset {rel} overflows", clean(&t.name))));
        };
        if end > file_len {
            return Err(r.err(
                Kind::Truncated,
                format!("tensor '{}' data is bytes {start}..{end}, past the end of the file ({file_len} bytes)", clean(&t.name)),
            ));
        }
        t.offset = start;
    }
    check_overlaps(path, &tensors)?;

    Ok(GgufFile { version, alignment, kv, tensors, data_offset })
}

/// Tensors may be laid out in any order and with gaps (ggml insists on a packed layout in info
/// order; files that ggml wrote satisfy that), but no two may share a byte.
fn check_overlaps(path: &Path, tensors: &[GgufTensor]) -> Result<()> {
    let mut order: Vec<usize> = (0..tensors.len()).filter(|&i| tensors[i].size > 0).collect();
    order.sort_by_key(|&i| tensors[i].offset);
    for w in order.windows(2) {
        let (a, b) = (&tensors[w[0]], &tensors[w[1]]);
        if a.offset + a.size > b.offset {
            return Err(Error::malformed(
                path,
                format!(
                    "tensors '{}' (bytes {}..{}) and '{}' (bytes {}..{}) overlap",
                    clean(&a.name),
                    a.offset,
                    a.offset + a.size,
                    clean(&b.name),
                    b.offset,
                    b.offset + b.size
                ),
            ));
        }
    }
    Ok(())
}

struct Reader<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn err(&self, kind: Kind, msg: impl Into<String>) -> Error {
        Error::at(kind, self.path, msg)
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.left() {
            return Err(self.err(
                Kind::Truncated,
                format!("file ends at byte {} inside {what}, which needs {n} bytes from offset {}", self.bytes.len(), self.pos),
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A length-prefixed string's bytes, with the length bounded by `cap` and by the file.
    fn string_bytes(&mut self, cap: u64, what: &str) -> Result<&'a [u8]> {
        let len = self.u64(what)?;
        if len > cap {
            return Err(self.err(Kind::Limit, format!("{what}: string of {len} bytes, over the limit of {cap}")));
        }
        self.take(len as usize, what)
    }

    /// A key or a tensor name: UTF-8 required.
    fn name(&mut self, what: &str) -> Result<&'a str> {
        let at = self.pos;
        let b = self.string_bytes(MAX_NAME_LEN, what)?;
        std::str::from_utf8(b).map_err(|_| self.err(Kind::Malformed, format!("{what} at offset {at} is not valid UTF-8")))
    }

    fn value(&mut self, ty: u32, depth: usize, what: &str) -> Result<Value> {
        let t = ValueType::from_id(ty).ok_or_else(|| self.err(Kind::Malformed, format!("{} has unknown value type {ty}", what)))?;
        Ok(match t {
            ValueType::U8 => Value::U8(self.array::<1>(what)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(what)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array(what)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array(what)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            ValueType::Bool => Value::Bool(self.bool(what)?),
            ValueType::String => Value::String(self.string_value(what)?),
            ValueType::Array => Value::Array(self.array_value(depth + 1, what)?),
        })
    }

    fn bool(&mut self, what: &str) -> Result<bool> {
        match self.array::<1>(what)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.err(Kind::Malformed, format!("{}: BOOL byte is {b}, not 0 or 1", what))),
        }
    }

    /// String values that are not UTF-8 are kept, with U+FFFD for the bad bytes.
    fn string_value(&mut self, what: &str) -> Result<String> {
        let b = self.string_bytes(MAX_STRING_LEN, what)?;
        Ok(String::from_utf8_lossy(b).into_owned())
    }

    fn array_value(&mut self, depth: usize, what: &str) -> Result<Array> {
        if depth > MAX_NESTING {
            return Err(self.err(Kind::Limit, format!("{}: arrays nested deeper than {MAX_NESTING}", what)));
        }
        let ty = self.u32(what)?;
        let t =
            ValueType::from_id(ty).ok_or_else(|| self.err(Kind::Malformed, format!("{} is an array of unknown value type {ty}", what)))?;
        let n = self.u64(what)?;
        if n > MAX_ARRAY_LEN {
            return Err(self.err(Kind::Limit, format!("{}: array of {n} elements, over the limit of {MAX_ARRAY_LEN}", what)));
        }
        let min = n * t.min_size() as u64;
        if min > self.left() as u64 {
            return Err(
                self.err(Kind::Truncated, format!("{}: array of {n} {t} needs at least {min} bytes, only {} are left", what, self.left()))
            );
        }
        let n = n as usize;
        fn fixed<T, const N: usize>(r: &mut Reader, n: usize, what: &str, f: fn([u8; N]) -> T) -> Result<Vec<T>> {
            let raw = r.take(n * N, what)?;
            Ok(raw.chunks_exact(N).map(|c| f(c.try_into().unwrap_or([0; N]))).collect())
        }
        Ok(match t {
            ValueType::U8 => Array::U8(self.take(n, what)?.to_vec()),
            ValueType::I8 => Array::I8(self.take(n, what)?.iter().map(|&b| b as i8).collect()),
            ValueType::U16 => Array::U16(fixed(self, n, what, u16::from_le_bytes)?),
            ValueType::I16 => Array::I16(fixed(self, n, what, i16::from_le_bytes)?),
            ValueType::U32 => Array::U32(fixed(self, n, what, u32::from_le_bytes)?),
            ValueType::I32 => Array::I32(fixed(self, n, what, i32::from_le_bytes)?),
            ValueType::F32 => Array::F32(fixed(self, n, what, f32::from_le_bytes)?),
            ValueType::U64 => Array::U64(fixed(self, n, what, u64::from_le_bytes)?),
            ValueType::I64 => Array::I64(fixed(self, n, what, i64::from_le_bytes)?),
            ValueType::F64 => Array::F64(fixed(self, n, what, f64::from_le_bytes)?),
            ValueType::Bool => {
                let raw = self.take(n, what)?;
                if let Some(b) = raw.iter().find(|&&b| b > 1) {
                    return Err(self.err(Kind::Malformed, format!("{what}: BOOL byte is {b}, not 0 or 1")));
                }
                Array::Bool(raw.iter().map(|&b| b == 1).collect())
            }
            ValueType::String => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.string_value(what)?);
                }
                Array::String(v)
            }
            ValueType::Array => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.array_value(depth + 1, what)?);
                }
                Array::Array(v)
            }
        })
    }
}
