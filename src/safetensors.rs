//! safetensors: header parsing with every rule of the official crate, and a streaming writer.
//!
//! Layout: `u64 LE N`, `N` bytes of UTF-8 JSON, then the data buffer. `data_offsets` are relative
//! to the start of the data buffer. The rules checked by [`parse`] follow
//! `SafeTensors::read_metadata` / `Metadata::validate` in huggingface/safetensors, plus two the
//! crate does not enforce: duplicate names are an error (JSON maps silently keep the last), and
//! the header must be a JSON object.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::dtype::{self, DType};
use crate::error::{clean, Error, Result};

/// `MAX_HEADER_SIZE` of the official crate (decimal 100 MB).
pub const MAX_HEADER_SIZE: u64 = 100_000_000;

/// One tensor of a safetensors header.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// Offsets relative to the data buffer.
    pub begin: u64,
    pub end: u64,
}

/// A parsed and validated header.
#[derive(Debug, Clone)]
pub struct Header {
    /// N, the JSON length.
    pub header_len: u64,
    /// 8 + N: where the data buffer starts in the file.
    pub data_start: u64,
    /// Tensors in file order (sorted by offset).
    pub tensors: Vec<Record>,
    /// `__metadata__`, in the order it was written.
    pub metadata: Option<Vec<(String, String)>>,
}

impl Header {
    /// Bytes of tensor data (the sum of tensor sizes).
    pub fn data_len(&self) -> u64 {
        self.tensors.last().map_or(0, |t| t.end)
    }
}

/// Parse and validate the header of a safetensors file whose full contents are `bytes`
/// (typically a memory map). `file_len` checks are made against `bytes.len()`.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Header> {
    parse_prefix(path, bytes, bytes.len() as u64, true)
}

/// Parse a header from the first bytes of a file of length `file_len`. `bytes` must hold at
/// least the 8-byte prefix and the JSON. With `check_end`, the data must end exactly at EOF.
pub fn parse_prefix(path: &Path, bytes: &[u8], file_len: u64, check_end: bool) -> Result<Header> {
    if file_len < 8 || bytes.len() < 8 {
        return Err(Error::truncated(path, format!("file is {file_len} bytes, too short for the 8-byte safetensors header length")));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER_SIZE {
        return Err(Error::limit(
            path,
            format!("safetensors header length {n} exceeds the 100 MB limit (truncated download or not a safetensors file?)"),
        ));
    }
    let data_start = 8 + n;
    if data_start > file_len {
        return Err(Error::truncated(path, format!("header declares {n} bytes of JSON but the file has only {file_len} bytes")));
    }
    if (bytes.len() as u64) < data_start {
        return Err(Error::internal("parse_prefix: header bytes not provided").with_path(path));
    }
    let json = &bytes[8..data_start as usize];
    let text = std::str::from_utf8(json)
        .map_err(|e| Error::malformed(path, format!("header is not UTF-8 (invalid byte at header offset {})", e.valid_up_to())))?;
    let raw = parse_json(text).map_err(|m| Error::malformed(path, format!("header is not valid safetensors JSON: {m}")))?;
    let mut tensors = Vec::with_capacity(raw.tensors.len());
    for t in raw.tensors {
        let dtype = match DType::parse(&t.dtype) {
            Some(d) => d,
            None => {
                let numel = dtype::numel(&t.shape).unwrap_or(0);
                DType::opaque(&t.dtype, numel, t.offsets[1].saturating_sub(t.offsets[0])).ok_or_else(|| {
                    Error::malformed(
                        path,
                        format!("tensor '{}': unknown dtype '{}' of undeterminable bit width", clean(&t.name), clean(&t.dtype)),
                    )
                })?
            }
        };
        tensors.push(Record { name: t.name, dtype, shape: t.shape, begin: t.offsets[0], end: t.offsets[1] });
    }
    tensors.sort_by_key(|t| (t.begin, t.end));
    let mut expected = 0u64;
    for t in &tensors {
        let name = clean(&t.name);
        if t.begin != expected || t.end < t.begin {
            let what = if t.begin > expected {
                format!("gap: data_offsets [{}, {}] start after the previous tensor ends at {expected}", t.begin, t.end)
            } else if t.end < t.begin {
                format!("data_offsets [{}, {}] end before they begin", t.begin, t.end)
            } else {
                format!("overlap: data_offsets [{}, {}] start before the previous tensor ends at {expected}", t.begin, t.end)
            };
            return Err(Error::malformed(path, format!("tensor '{name}': {what}")));
        }
        let numel =
            dtype::numel(&t.shape).ok_or_else(|| Error::malformed(path, format!("tensor '{name}': shape {:?} overflows", t.shape)))?;
        let bits = numel
            .checked_mul(t.dtype.bits() as u64)
            .ok_or_else(|| Error::malformed(path, format!("tensor '{name}': shape {:?} × {} bits overflows", t.shape, t.dtype.bits())))?;
        if bits % 8 != 0 {
            return Err(Error::malformed(path, format!("tensor '{name}': {numel} elements of {} do not fill whole bytes", t.dtype)));
        }
        if t.end - t.begin != bits / 8 {
            return Err(Error::malformed(
                path,
                format!(
                    "tensor '{name}': shape {:?} of {} needs {} bytes but data_offsets [{}, {}] give {}",
                    t.shape,
                    t.dtype,
                    bits / 8,
                    t.begin,
                    t.end,
                    t.end - t.begin
                ),
            ));
        }
        expected = t.end;
    }
    if check_end {
        let want = data_start.checked_add(expected).ok_or_else(|| Error::malformed(path, "data offsets overflow"))?;
        if want > file_len {
            return Err(Error::truncated(path, format!("tensor data ends at byte {want} but the file has only {file_len} bytes")));
        }
        if want < file_len {
            return Err(Error::malformed(
                path,
                format!("{} trailing bytes after the last tensor (data ends at {want}, file is {file_len})", file_len - want),
            ));
        }
    }
    Ok(Header { header_len: n, data_start, tensors, metadata: raw.metadata })
}

struct RawTensor {
    name: String,
    dtype: String,
    shape: Vec<u64>,
    offsets: [u64; 2],
}

struct RawHeader {
    tensors: Vec<RawTensor>,
    metadata: Option<Vec<(String, String)>>,
}

fn parse_json(text: &str) -> std::result::Result<RawHeader, String> {
    if !text.trim_start().starts_with('{') {
        return Err("the header must be a JSON object starting with '{'".into());
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let raw = de.deserialize_map(HeaderVisitor).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(raw)
}

struct HeaderVisitor;

impl<'de> Visitor<'de> for HeaderVisitor {
    type Value = RawHeader;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a map of tensor names to {dtype, shape, data_offsets}")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<RawHeader, A::Error> {
        let mut seen = HashSet::new();
        let mut tensors = Vec::new();
        let mut metadata = None;
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format!("duplicate name '{}'", clean(&key))));
            }
            if key == "__metadata__" {
                let m: MetadataMap = map.next_value()?;
                metadata = Some(m.0);
            } else {
                let info: TensorJson = map.next_value().map_err(|e| de::Error::custom(format!("tensor '{}': {e}", clean(&key))))?;
                tensors.push(RawTensor { name: key, dtype: info.dtype, shape: info.shape, offsets: info.data_offsets });
            }
        }
        Ok(RawHeader { tensors, metadata })
    }
}

#[derive(serde::Deserialize)]
struct TensorJson {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// `__metadata__`: string → string only, no duplicate keys, order kept.
struct MetadataMap(Vec<(String, String)>);

impl<'de> serde::Deserialize<'de> for MetadataMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MetadataMap;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("__metadata__ as a map of strings to strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<MetadataMap, A::Error> {
                let mut seen = HashSet::new();
                let mut out = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    if !seen.insert(k.clone()) {
                        return Err(de::Error::custom(format!("duplicate __metadata__ key '{}'", clean(&k))));
                    }
                    let v: String = map
                        .next_value()
                        .map_err(|_| de::Error::custom(format!("__metadata__ value of '{}' is not a string", clean(&k))))?;
                    out.push((k, v));
                }
                Ok(MetadataMap(out))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> std::result::Result<MetadataMap, A::Error> {
                Err(de::Error::custom("__metadata__ must be a map of strings to strings"))
            }
        }
        d.deserialize_map(V)
    }
}

/// A tensor to be written: name, dtype, shape and its byte size.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
}

impl Planned {
    pub fn size(&self) -> Result<u64> {
        dtype::numel(&self.shape).and_then(|n| self.dtype.byte_size(n)).ok_or_else(|| {
            Error::unsupported(format!("tensor '{}': shape {:?} of {} has no whole byte size", self.name, self.shape, self.dtype))
        })
    }
}

/// The bytes of a header and where each tensor's data starts.
#[derive(Debug, Clone)]
pub struct HeaderPlan {
    /// The 8-byte length prefix followed by the padded JSON.
    pub bytes: Vec<u8>,
    /// Tensors in write order (the official crate's: widest dtype first, then by name).
    pub order: Vec<Planned>,
    /// `order[i]`'s data offsets, relative to the data buffer.
    pub offsets: Vec<(u64, u64)>,
}

impl HeaderPlan {
    pub fn data_len(&self) -> u64 {
        self.offsets.last().map_or(0, |o| o.1)
    }
    pub fn file_len(&self) -> u64 {
        self.bytes.len() as u64 + self.data_len()
    }
}

impl HeaderPlan {
    /// Add `extra` bytes of spaces to the JSON (a multiple of 8, so data stays 8-aligned);
    /// tensor offsets are relative to the data buffer and do not change.
    pub fn pad_json(&mut self, extra: usize) -> Result<()> {
        if extra % 8 != 0 {
            return Err(Error::internal(format!("header padding {extra} is not a multiple of 8")));
        }
        let json_len = self.bytes.len() - 8 + extra;
        if json_len as u64 > MAX_HEADER_SIZE {
            return Err(Error::unsupported(format!("header would be {json_len} bytes, over the 100 MB limit; shard the output")));
        }
        self.bytes.resize(self.bytes.len() + extra, b' ');
        self.bytes[..8].copy_from_slice(&(json_len as u64).to_le_bytes());
        Ok(())
    }
}

/// Compute the header the official writer would produce: tensors sorted by dtype alignment
/// (widest first) then name, packed without gaps; `__metadata__` first; JSON padded with
/// spaces to a multiple of 8 bytes.
pub fn plan(tensors: Vec<Planned>, metadata: Option<&[(String, String)]>) -> Result<HeaderPlan> {
    let mut order = tensors;
    // Official order: dtype descending in enum order (= increasing alignment), then name.
    let rank = |d: &DType| (d.bits(), crate::dtype::KNOWN.iter().position(|k| k == d).map_or(0, |p| p + 1));
    order.sort_by(|a, b| rank(&b.dtype).cmp(&rank(&a.dtype)).then_with(|| a.name.cmp(&b.name)));
    plan_in_order(order, metadata)
}

/// Like [`plan`], but the data is laid out in the given order (readers do not care about the
/// order; the official writer's is only a convention). Used to keep a source's layout.
pub fn plan_in_order(tensors: Vec<Planned>, metadata: Option<&[(String, String)]>) -> Result<HeaderPlan> {
    let order = tensors;
    let mut names = HashSet::new();
    let mut offsets = Vec::with_capacity(order.len());
    let mut at = 0u64;
    for t in &order {
        if t.name == "__metadata__" || !names.insert(t.name.as_str()) {
            return Err(Error::new(crate::Kind::Inconsistent, format!("duplicate output tensor name '{}'", clean(&t.name))));
        }
        let end = at.checked_add(t.size()?).ok_or_else(|| Error::unsupported("total size overflows"))?;
        offsets.push((at, end));
        at = end;
    }
    let mut json = String::with_capacity(64 + order.len() * 96);
    json.push('{');
    let mut first = true;
    if let Some(md) = metadata {
        json.push_str("\"__metadata__\":{");
        for (i, (k, v)) in md.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            json.push_str(&serde_json::to_string(k).expect("string"));
            json.push(':');
            json.push_str(&serde_json::to_string(v).expect("string"));
        }
        json.push('}');
        first = false;
    }
    for (t, (b, e)) in order.iter().zip(&offsets) {
        if !first {
            json.push(',');
        }
        first = false;
        json.push_str(&serde_json::to_string(&t.name).expect("string"));
        json.push_str(":{\"dtype\":\"");
        json.push_str(t.dtype.as_str());
        json.push_str("\",\"shape\":");
        json.push_str(&serde_json::to_string(&t.shape).expect("shape"));
        json.push_str(&format!(",\"data_offsets\":[{b},{e}]}}"));
    }
    json.push('}');
    let padded = json.len().next_multiple_of(8);
    let mut bytes = Vec::with_capacity(8 + padded);
    bytes.extend_from_slice(&(padded as u64).to_le_bytes());
    bytes.extend_from_slice(json.as_bytes());
    bytes.resize(8 + padded, b' ');
    if padded as u64 > MAX_HEADER_SIZE {
        return Err(Error::unsupported(format!("header would be {padded} bytes, over the 100 MB limit; shard the output")));
    }
    Ok(HeaderPlan { bytes, order, offsets })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(json: &str, data: usize) -> Vec<u8> {
        let mut v = (json.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        v.resize(v.len() + data, 0);
        v
    }

    #[test]
    fn plan_then_parse_round_trip() {
        let md = vec![("format".to_string(), "pt".to_string())];
        let p = plan(
            vec![
                Planned { name: "b".into(), dtype: DType::BF16, shape: vec![3] },
                Planned { name: "a".into(), dtype: DType::F32, shape: vec![2, 2] },
                Planned { name: "c".into(), dtype: DType::F4, shape: vec![4] },
            ],
            Some(&md),
        )
        .unwrap();
        assert_eq!(p.bytes.len() % 8, 0);
        assert_eq!(p.order.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
        let mut f = p.bytes.clone();
        f.resize(p.file_len() as usize, 0);
        let h = parse(Path::new("x"), &f).unwrap();
        assert_eq!(h.tensors.len(), 3);
        assert_eq!(h.metadata, Some(md));
        assert_eq!(h.tensors[2].end, 16 + 6 + 2);
    }

    #[test]
    fn rejects_each_rule() {
        let p = Path::new("t.safetensors");
        let cases: Vec<(Vec<u8>, crate::Kind, &str)> = vec![
            (vec![1, 2, 3], crate::Kind::Truncated, "too short"),
            (u64::MAX.to_le_bytes().to_vec(), crate::Kind::Limit, "100 MB"),
            (file("{", 0)[..8].to_vec(), crate::Kind::Truncated, "declares"),
            (file("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 3), crate::Kind::Truncated, "ends at"),
            (file("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 5), crate::Kind::Malformed, "trailing"),
            (file("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8), crate::Kind::Malformed, "gap"),
            (file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}", 4), crate::Kind::Malformed, "needs 8"),
            (file("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8), crate::Kind::Malformed, "duplicate"),
            (file("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[2,6]}}", 8), crate::Kind::Malformed, "overlap"),
            (file("[1,2]", 0), crate::Kind::Malformed, "JSON object"),
            (file("{\"__metadata__\":{\"a\":1}}", 0), crate::Kind::Malformed, "not a string"),
            (file("{\"a\":{\"dtype\":\"F4\",\"shape\":[3],\"data_offsets\":[0,2]}}", 2), crate::Kind::Malformed, "whole bytes"),
            (file("{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,4]}}", 4), crate::Kind::Malformed, "overflow"),
        ];
        for (i, (bytes, kind, needle)) in cases.into_iter().enumerate() {
            let e = parse(p, &bytes).expect_err(&format!("case {i} must fail"));
            assert_eq!(e.kind(), kind, "case {i}: {e}");
            assert!(e.to_string().contains(needle), "case {i}: {e}");
            assert!(e.to_string().starts_with("t.safetensors: "), "case {i}: {e}");
        }
        let mut bad = file("{\"a\":1}", 0);
        bad[9] = 0xff;
        assert!(parse(p, &bad).unwrap_err().to_string().contains("UTF-8"));
    }

    #[test]
    fn unknown_dtype_is_opaque() {
        let f = file("{\"a\":{\"dtype\":\"F8_E3M4\",\"shape\":[3],\"data_offsets\":[0,3]}}", 3);
        let h = parse(Path::new("x"), &f).unwrap();
        assert_eq!(h.tensors[0].dtype.as_str(), "F8_E3M4");
        assert_eq!(h.tensors[0].dtype.bits(), 8);
    }
}
