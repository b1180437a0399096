//! Streaming GGUF v3 writer: [`plan`] computes the whole header and every tensor's offset from
//! names, shapes and types alone, so the caller can write the header and then stream each
//! tensor's bytes in order, never holding more than one chunk in memory and never seeking.
//!
//! Layout (ggml's rule, also gguf-py's): tensors in the order given, each starting at a
//! multiple of the alignment and followed by zero padding up to the next multiple, the last one
//! included.

use std::collections::HashSet;
use std::io::{self, Write};
use std::path::Path;

use super::limits::*;
use super::value::{Array, Value};
use super::{KEY_ALIGNMENT, MAGIC, VERSION};
use crate::error::{clean, Error, IoContext, Kind, Result};
use crate::quant::GgmlType;

/// One tensor to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorPlan {
    pub name: String,
    /// Torch order.
    pub shape: Vec<u64>,
    pub ty: GgmlType,
}

/// The header and the data layout of a GGUF file to write.
#[derive(Debug, Clone)]
pub struct GgufPlan {
    /// Everything before the data section, including the padding after the tensor infos.
    pub header: Vec<u8>,
    /// Each tensor's offset relative to the start of the data section (`header.len()`).
    pub offsets: Vec<u64>,
    /// Each tensor's byte size, without padding.
    pub sizes: Vec<u64>,
    /// The length of the whole file.
    pub total_len: u64,
    pub alignment: u64,
}

impl GgufPlan {
    /// Zero bytes to write after tensor `i`.
    pub fn padding(&self, i: usize) -> u64 {
        pad_len(self.sizes[i], self.alignment)
    }
}

fn pad_len(n: u64, alignment: u64) -> u64 {
    (alignment - n % alignment) % alignment
}

fn plan_err(msg: impl Into<String>) -> Error {
    Error::new(Kind::Unsupported, msg)
}

/// Plan a GGUF v3 file. `general.alignment` is added (as UINT32) when `kv` lacks it; when `kv`
/// has it, it must be a UINT32 equal to `alignment`.
///
/// Errors: [`Kind::Inconsistent`] for duplicate keys or tensor names; [`Kind::Unsupported`] for
/// what GGUF (or phasekit's reader) cannot hold: a bad alignment, an empty key, a name, a
/// dimension count, an array length or a nesting depth over the limits of
/// [`super::limits`], or a row length that is not a multiple of the type's block size.
pub fn plan(kv: &[(String, Value)], tensors: &[TensorPlan], alignment: u64) -> Result<GgufPlan> {
    if !alignment.is_power_of_two() || alignment > MAX_ALIGNMENT {
        return Err(plan_err(format!("GGUF alignment must be a power of two of at most {MAX_ALIGNMENT}, got {alignment}")));
    }
    if tensors.len() as u64 > MAX_TENSORS {
        return Err(plan_err(format!("{} tensors exceed the limit of {MAX_TENSORS}", tensors.len())));
    }
    let mut keys = HashSet::with_capacity(kv.len());
    let mut has_alignment = false;
    for (k, v) in kv {
        check_name(k, "key")?;
        if !keys.insert(k.as_str()) {
            return Err(Error::new(Kind::Inconsistent, format!("duplicate GGUF key '{}'", clean(k))));
        }
        if k == KEY_ALIGNMENT {
            if *v != Value::U32(alignment as u32) {
                return Err(plan_err(format!("{KEY_ALIGNMENT} is {v} but the file is planned with alignment {alignment}")));
            }
            has_alignment = true;
        }
        check_value(k, v, 0)?;
    }

    let n_kv = kv.len() as u64 + u64::from(!has_alignment);
    if n_kv > MAX_KV {
        return Err(plan_err(format!("{n_kv} keys exceed the limit of {MAX_KV}")));
    }

    let mut h = Vec::with_capacity(4096);
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    h.extend_from_slice(&n_kv.to_le_bytes());
    for (k, v) in kv {
        put_str(&mut h, k);
        put_value(&mut h, v);
    }
    if !has_alignment {
        put_str(&mut h, KEY_ALIGNMENT);
        put_value(&mut h, &Value::U32(alignment as u32));
    }

    let mut names = HashSet::with_capacity(tensors.len());
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut sizes = Vec::with_capacity(tensors.len());
    let mut at = 0u64;
    for t in tensors {
        check_name(&t.name, "tensor name")?;
        if !names.insert(t.name.as_str()) {
            return Err(Error::new(Kind::Inconsistent, format!("duplicate tensor name '{}'", clean(&t.name))));
        }
        let ctx = || format!("tensor '{}'", clean(&t.name));
        if t.shape.len() > MAX_DIMS {
            return Err(plan_err(format!("{} has {} dimensions, over the limit of {MAX_DIMS}", ctx(), t.shape.len())));
        }
        let numel = super::numel(&t.shape).ok_or_else(|| plan_err(format!("{}: shape {:?} has too many elements", ctx(), t.shape)))?;
        let ne0 = t.shape.last().copied().unwrap_or(1);
        if ne0 % t.ty.block_size() != 0 {
            return Err(plan_err(format!(
                "{}: rows of {ne0} elements cannot be stored as {} (blocks of {})",
                ctx(),
                t.ty,
                t.ty.block_size()
            )));
        }
        let size = t.ty.byte_size(ne0, numel).ok_or_else(|| plan_err(format!("{}: byte size overflows", ctx())))?;
        put_str(&mut h, &t.name);
        h.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            h.extend_from_slice(&d.to_le_bytes());
        }
        h.extend_from_slice(&t.ty.id().to_le_bytes());
        h.extend_from_slice(&at.to_le_bytes());
        offsets.push(at);
        sizes.push(size);
        at = size
            .checked_add(pad_len(size, alignment))
            .and_then(|s| s.checked_add(at))
            .ok_or_else(|| plan_err("the data section is larger than 2^64 bytes"))?;
    }
    let pad = pad_len(h.len() as u64, alignment) as usize;
    h.resize(h.len() + pad, 0);
    let total_len = (h.len() as u64).checked_add(at).ok_or_else(|| plan_err("the file is larger than 2^64 bytes"))?;
    Ok(GgufPlan { header: h, offsets, sizes, total_len, alignment })
}

fn check_name(s: &str, what: &str) -> Result<()> {
    if s.is_empty() && what == "key" {
        return Err(plan_err("a GGUF key is empty"));
    }
    if s.len() as u64 > MAX_NAME_LEN {
        return Err(plan_err(format!("{what} '{}' is {} bytes, over the limit of {MAX_NAME_LEN}", clean(s), s.len())));
    }
    Ok(())
}

fn check_value(key: &str, v: &Value, depth: usize) -> Result<()> {
    match v {
        Value::String(s) if s.len() as u64 > MAX_STRING_LEN => {
            Err(plan_err(format!("key '{}': string of {} bytes, over the limit", clean(key), s.len())))
        }
        Value::Array(a) => check_array(key, a, depth + 1),
        _ => Ok(()),
    }
}

fn check_array(key: &str, a: &Array, depth: usize) -> Result<()> {
    if depth > MAX_NESTING {
        return Err(plan_err(format!("key '{}': arrays nested deeper than {MAX_NESTING}", clean(key))));
    }
    if a.len() as u64 > MAX_ARRAY_LEN {
        return Err(plan_err(format!("key '{}': array of {} elements, over the limit of {MAX_ARRAY_LEN}", clean(key), a.len())));
    }
    match a {
        Array::String(v) => match v.iter().find(|s| s.len() as u64 > MAX_STRING_LEN) {
            Some(s) => Err(plan_err(format!("key '{}': string of {} bytes, over the limit", clean(key), s.len()))),
            None => Ok(()),
        },
        Array::Array(v) => v.iter().try_for_each(|inner| check_array(key, inner, depth + 1)),
        _ => Ok(()),
    }
}

fn put_str(h: &mut Vec<u8>, s: &str) {
    h.extend_from_slice(&(s.len() as u64).to_le_bytes());
    h.extend_from_slice(s.as_bytes());
}

fn put_value(h: &mut Vec<u8>, v: &Value) {
    h.extend_from_slice(&v.value_type().id().to_le_bytes());
    put_payload(h, v);
}

fn put_payload(h: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => h.push(*x),
        Value::I8(x) => h.push(*x as u8),
        Value::U16(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => h.push(*x as u8),
        Value::String(s) => put_str(h, s),
        Value::Array(a) => put_array(h, a),
    }
}

fn put_array(h: &mut Vec<u8>, a: &Array) {
    h.extend_from_slice(&a.elem_type().id().to_le_bytes());
    h.extend_from_slice(&(a.len() as u64).to_le_bytes());
    fn each<T>(h: &mut Vec<u8>, v: &[T], f: impl Fn(&mut Vec<u8>, &T)) {
        for x in v {
            f(h, x);
        }
    }
    match a {
        Array::U8(v) => h.extend_from_slice(v),
        Array::I8(v) => each(h, v, |h, x| h.push(*x as u8)),
        Array::U16(v) => each(h, v, |h, x| h.extend_from_slice(&x.to_le_bytes())),
        Array::I16(v) => each(h, v, |h, x| h.extend_from_slice(&x.to_le_bytes())),
        Array::U32(v) => each(h, v, |h, x| h.extend_from_slice(&x.to_le_bytes())),
        Array::I32(v) => each(h, v, |h, x| h.extend_from_slice(&x.to_le_bytes())),
        Array::F32(v) => each(h, v, |h, x| h.extend_from_slice(&x.to_le_bytes())),
        Array::U64(v) => each(h, v, |h, x| h.extend_from_slice(&x.to_le_bytes())),
        Array::I64(v) => each(h, v, |h, x| h.extend_from_slice(&x.to_le_bytes())),
        Array::F64(v) => each(h, v, |h, x| h.extend_from_slice(&x.to_le_bytes())),
        Array::Bool(v) => each(h, v, |h, x| h.push(*x as u8)),
        Array::String(v) => each(h, v, |h, s| put_str(h, s)),
        Array::Array(v) => each(h, v, put_array),
    }
}

/// Write `n` zero bytes.
pub fn write_padding<W: Write + ?Sized>(w: &mut W, n: u64) -> io::Result<()> {
    const ZEROS: [u8; 4096] = [0; 4096];
    let mut left = n;
    while left > 0 {
        let k = left.min(ZEROS.len() as u64) as usize;
        w.write_all(&ZEROS[..k])?;
        left -= k as u64;
    }
    Ok(())
}

/// The writer handed to [`write_all`]'s callback: it accepts at most the planned size of the
/// current tensor.
pub struct TensorWriter<'w, W: Write> {
    inner: &'w mut W,
    left: u64,
}

impl<W: Write> TensorWriter<'_, W> {
    /// Bytes still expected for this tensor.
    pub fn remaining(&self) -> u64 {
        self.left
    }
}

impl<W: Write> Write for TensorWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.len() as u64 > self.left {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} bytes written to a tensor with {} bytes left in the plan", buf.len(), self.left),
            ));
        }
        let n = self.inner.write(buf)?;
        self.left -= n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Write a whole file: the header, then for each tensor `i` in order whatever `f(i, w)` writes
/// (exactly `plan.sizes[i]` bytes, checked) followed by its padding. `path` names the output in
/// I/O errors.
pub fn write_all<W, F>(path: &Path, w: &mut W, plan: &GgufPlan, mut f: F) -> Result<()>
where
    W: Write,
    F: FnMut(usize, &mut TensorWriter<'_, W>) -> Result<()>,
{
    w.write_all(&plan.header).with_file(path)?;
    for (i, &size) in plan.sizes.iter().enumerate() {
        let mut tw = TensorWriter { inner: w, left: size };
        f(i, &mut tw)?;
        if tw.left != 0 {
            return Err(Error::internal(format!("tensor #{i}: {} of its {size} bytes were written", size - tw.left)));
        }
        write_padding(w, plan.padding(i)).with_file(path)?;
    }
    Ok(())
}
