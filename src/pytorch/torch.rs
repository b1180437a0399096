//! A `torch.save` archive → tensor descriptors.
//!
//! The archive holds `<name>/data.pkl` (the pickled object), `<name>/data/<key>` (one entry per
//! storage, the raw little-endian bytes), `<name>/byteorder`, `<name>/version` and a few small
//! files. A tensor in the pickle is `torch._utils._rebuild_tensor_v2(storage, storage_offset,
//! size, stride, requires_grad, backward_hooks)` (or `_v3`, which adds the dtype: torch writes it
//! for dtypes without a typed storage class, such as fp8), where `storage` is a persistent id
//! `('storage', <storage class>, <key>, <location>, <numel>)`. Parameters wrap that call in
//! `_rebuild_parameter`. Several tensors may share one storage (views): each is a byte range of
//! the same entry.
//!
//! Checked for every tensor: the storage entry exists, is stored uncompressed and has exactly the
//! storage's size; offset, sizes and strides are non-negative; the strides are row-major
//! contiguous (dimensions of size 1 may have any stride, as torch writes them); the range
//! `[offset, offset + numel) · element size` lies inside the storage.

use std::collections::HashSet;
use std::path::Path;

use super::pickle::{self, Id, Node, Pickle, Policy};
use super::zip::{self, Archive};
use crate::dtype::DType;
use crate::error::{clean, Error, Kind, Result};

/// Storage classes of `torch.save` (typed storages) and the dtype of their elements.
const STORAGES: [(&str, Option<DType>); 13] = [
    ("FloatStorage", Some(DType::F32)),
    ("DoubleStorage", Some(DType::F64)),
    ("HalfStorage", Some(DType::F16)),
    ("BFloat16Storage", Some(DType::BF16)),
    ("ByteStorage", Some(DType::U8)),
    ("CharStorage", Some(DType::I8)),
    ("ShortStorage", Some(DType::I16)),
    ("IntStorage", Some(DType::I32)),
    ("LongStorage", Some(DType::I64)),
    ("BoolStorage", Some(DType::Bool)),
    ("ComplexFloatStorage", Some(DType::C64)),
    ("ComplexDoubleStorage", None),
    ("UntypedStorage", None),
];

/// `torch.<dtype>` globals (the dtype argument of `_rebuild_tensor_v3`, DCP tensor properties).
const DTYPES: [(&str, Option<DType>); 29] = [
    ("float32", Some(DType::F32)),
    ("float", Some(DType::F32)),
    ("float64", Some(DType::F64)),
    ("double", Some(DType::F64)),
    ("float16", Some(DType::F16)),
    ("half", Some(DType::F16)),
    ("bfloat16", Some(DType::BF16)),
    ("uint8", Some(DType::U8)),
    ("int8", Some(DType::I8)),
    ("int16", Some(DType::I16)),
    ("short", Some(DType::I16)),
    ("int32", Some(DType::I32)),
    ("int", Some(DType::I32)),
    ("int64", Some(DType::I64)),
    ("long", Some(DType::I64)),
    ("bool", Some(DType::Bool)),
    ("uint16", Some(DType::U16)),
    ("uint32", Some(DType::U32)),
    ("uint64", Some(DType::U64)),
    ("complex64", Some(DType::C64)),
    ("float8_e4m3fn", Some(DType::F8E4M3)),
    ("float8_e5m2", Some(DType::F8E5M2)),
    ("float8_e4m3fnuz", Some(DType::F8E4M3Fnuz)),
    ("float8_e5m2fnuz", Some(DType::F8E5M2Fnuz)),
    ("float8_e8m0fnu", Some(DType::F8E8M0)),
    ("complex128", None),
    ("float4_e2m1fn_x2", None),
    ("complex32", None),
    ("cfloat", Some(DType::C64)),
];

/// The dtype a `torch.<name>` dtype global stands for: `Some(None)` for a dtype phasekit knows
/// by name but cannot hold, `None` for a name that is no dtype.
pub fn dtype_of(name: &str) -> Option<Option<DType>> {
    DTYPES.iter().find(|(n, _)| *n == name).map(|(_, d)| *d)
}

fn storage_dtype(name: &str) -> Option<Option<DType>> {
    STORAGES.iter().find(|(n, _)| *n == name).map(|(_, d)| *d)
}

fn allowed(module: &str, name: &str) -> bool {
    match module {
        "collections" => name == "OrderedDict",
        "torch._utils" => {
            matches!(name, "_rebuild_tensor_v2" | "_rebuild_tensor_v3" | "_rebuild_parameter" | "_rebuild_parameter_with_state")
        }
        "torch" => storage_dtype(name).is_some() || dtype_of(name).is_some(),
        "torch.storage" => name == "UntypedStorage",
        _ => false,
    }
}

/// The globals a `torch.save` pickle may name: the tensor rebuild functions, the storage
/// classes, dtypes and `collections.OrderedDict`.
pub const POLICY: Policy = Policy { purpose: "tensors, their storages and plain containers", allowed };

/// One tensor of an archive.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// Absolute offset of the first byte in the file.
    pub offset: u64,
    pub len: u64,
    /// The storage entry (`archive/data/0`): tensors sharing it are views of one storage.
    pub storage: String,
}

/// What a pickled object of tensors held.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub tensors: Vec<Tensor>,
    /// Non-tensor leaves (`iteration` = `500`), at most [`super::MAX_VALUES`].
    pub values: Vec<(String, String)>,
    /// Leaves not kept because there were too many.
    pub values_dropped: usize,
}

/// A tensor reference read from the pickle, before it is placed in the archive.
struct Ref {
    key: String,
    dtype: DType,
    /// Bytes of the whole storage.
    storage_bytes: u64,
    offset: u64,
    shape: Vec<u64>,
    stride: Vec<u64>,
}

/// An archive and its parsed `data.pkl`.
pub struct Parsed {
    pub archive: Archive,
    /// `<name>/`: the folder every entry is under.
    pub prefix: String,
    pub pickle: Pickle,
}

/// Read the archive in `bytes` (which start at `base` in `path`) and parse its `data.pkl`.
pub fn parse(path: &Path, what: &str, bytes: &[u8], base: u64) -> Result<Parsed> {
    let archive = zip::read(path, what, bytes, base)?;
    let err = |kind: Kind, m: String| Error::at(kind, path, format!("{what}: {m}"));
    let pkls: Vec<&zip::Entry> =
        archive.entries.iter().filter(|e| e.name.ends_with("/data.pkl") && e.name.matches('/').count() == 1).collect();
    let pkl = match pkls.as_slice() {
        [one] => *one,
        [] => {
            let script = archive.entries.iter().any(|e| e.name.ends_with("/constants.pkl") || e.name.contains("/code/"));
            return Err(if script {
                err(Kind::Unsupported, "a TorchScript archive (torch.jit.save), not a torch.save state dict".into())
            } else {
                err(Kind::Malformed, "the archive has no <name>/data.pkl: not a torch.save file".into())
            });
        }
        _ => return Err(err(Kind::Malformed, format!("the archive has {} data.pkl entries", pkls.len()))),
    };
    let prefix = pkl.name[..pkl.name.len() - "data.pkl".len()].to_string();
    if let Some(b) = archive.get(&format!("{prefix}byteorder")) {
        let v = entry_bytes(path, what, bytes, b)?;
        if v != b"little" {
            return Err(err(
                Kind::Unsupported,
                format!("byte order '{}' (phasekit reads little-endian archives)", clean(&String::from_utf8_lossy(v))),
            ));
        }
    }
    let data = entry_bytes(path, what, bytes, pkl)?;
    if crc32fast::hash(data) != pkl.crc32 {
        return Err(err(Kind::Integrity, format!("'{}' does not match its CRC-32", clean(&pkl.name))));
    }
    let pickle = pickle::parse(path, &format!("{what} {}", clean(&pkl.name)), data, &POLICY)?;
    Ok(Parsed { archive, prefix, pickle })
}

/// The bytes of a stored entry.
fn entry_bytes<'a>(path: &Path, what: &str, bytes: &'a [u8], e: &zip::Entry) -> Result<&'a [u8]> {
    if !e.stored() {
        return Err(Error::at(
            Kind::Unsupported,
            path,
            format!(
                "{what}: entry '{}' is compressed (method {}); torch.save stores entries uncompressed and phasekit maps them as they are: load and save the file again with torch.save",
                clean(&e.name),
                e.method
            ),
        ));
    }
    Ok(&bytes[e.data_offset as usize..(e.data_offset + e.size) as usize])
}

fn non_negative(pk: &Pickle, id: Id) -> Option<u64> {
    pk.int(id).and_then(|v| u64::try_from(v).ok())
}

fn ints(pk: &Pickle, id: Id) -> Option<Vec<u64>> {
    // `torch.Size(...)` appears in DCP pickles; torch.save writes plain tuples.
    if let Node::Call { func, args } = pk.node(id) {
        if pk.global(*func) == Some(("torch", "Size")) {
            return pk.items(*args).and_then(|a| a.first().copied()).and_then(|t| ints(pk, t));
        }
    }
    pk.items(id)?.iter().map(|&i| non_negative(pk, i)).collect()
}

/// The tensor a value rebuilds, if it is one.
fn tensor_ref(path: &Path, what: &str, pk: &Pickle, id: Id, name: &str) -> Result<Option<Ref>> {
    let Node::Call { func, args } = pk.node(id) else { return Ok(None) };
    let bad = |m: String| Error::malformed(path, format!("{what}: tensor '{}': {m}", clean(name)));
    let Some((module, f)) = pk.global(*func) else { return Ok(None) };
    let a = pk.items(*args).ok_or_else(|| bad("its arguments are not a tuple".into()))?;
    match (module, f) {
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            let inner = a.first().ok_or_else(|| bad("_rebuild_parameter without a tensor".into()))?;
            return tensor_ref(path, what, pk, *inner, name)?
                .map(Some)
                .ok_or_else(|| bad(format!("_rebuild_parameter of a {}", pk.describe(*inner))));
        }
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor_v3") => {}
        _ => return Ok(None),
    }
    let v3 = f == "_rebuild_tensor_v3";
    if a.len() < if v3 { 7 } else { 6 } {
        return Err(bad(format!("{f} with {} arguments", a.len())));
    }
    let Node::PersId(pid) = pk.node(a[0]) else { return Err(bad(format!("the storage is a {}, not a persistent id", pk.describe(a[0])))) };
    let p = pk
        .items(*pid)
        .filter(|p| p.len() == 5)
        .ok_or_else(|| bad("the storage id is not ('storage', class, key, location, numel)".into()))?;
    if pk.str(p[0]) != Some("storage") {
        return Err(bad(format!("the storage id starts with {}", pk.describe(p[0]))));
    }
    let class = pk.global(p[1]).map(|(_, n)| n).ok_or_else(|| bad(format!("the storage class is a {}", pk.describe(p[1]))))?;
    let key = pk.str(p[2]).ok_or_else(|| bad("the storage key is not a string".into()))?.to_string();
    let numel = non_negative(pk, p[4]).ok_or_else(|| bad("the storage size is not a non-negative integer".into()))?;
    let typed = storage_dtype(class).ok_or_else(|| bad(format!("unknown storage class {}", clean(class))))?;
    let dtype = if v3 {
        let (_, dn) = pk.global(a[6]).ok_or_else(|| bad(format!("the dtype is a {}", pk.describe(a[6]))))?;
        match dtype_of(dn) {
            Some(Some(d)) => d,
            Some(None) => {
                return Err(Error::at(
                    Kind::Unsupported,
                    path,
                    format!("{what}: tensor '{}' has dtype torch.{dn}, which phasekit cannot hold", clean(name)),
                ))
            }
            None => return Err(bad(format!("torch.{} is not a dtype", clean(dn)))),
        }
    } else {
        match typed {
            Some(d) => d,
            None if class == "UntypedStorage" => return Err(bad("_rebuild_tensor_v2 of an UntypedStorage (no dtype)".into())),
            None => {
                return Err(Error::at(
                    Kind::Unsupported,
                    path,
                    format!("{what}: tensor '{}' is in a {class}, which phasekit cannot hold", clean(name)),
                ))
            }
        }
    };
    dtype.size().ok_or_else(|| bad(format!("{dtype} has no whole-byte size")))?;
    // Typed storages count elements, untyped ones bytes.
    let storage_bytes = if class == "UntypedStorage" {
        numel
    } else {
        let e = typed.and_then(|d| d.size()).unwrap_or(1) as u64;
        numel.checked_mul(e).ok_or_else(|| bad("the storage size overflows".into()))?
    };
    let offset = non_negative(pk, a[1]).ok_or_else(|| bad("the storage offset is not a non-negative integer".into()))?;
    let shape = ints(pk, a[2]).ok_or_else(|| bad("the size is not a tuple of non-negative integers".into()))?;
    let stride = ints(pk, a[3]).ok_or_else(|| bad("the stride is not a tuple of non-negative integers".into()))?;
    Ok(Some(Ref { key, dtype, storage_bytes, offset, shape, stride }))
}

/// Place a tensor reference in the archive: its byte range, checked.
fn place(path: &Path, what: &str, parsed: &Parsed, r: Ref, name: String) -> Result<Tensor> {
    let bad = |kind: Kind, m: String| Error::at(kind, path, format!("{what}: tensor '{}' {m}", clean(&name)));
    if r.shape.len() != r.stride.len() {
        return Err(bad(Kind::Malformed, format!("has {} sizes but {} strides", r.shape.len(), r.stride.len())));
    }
    let numel = crate::dtype::numel(&r.shape).ok_or_else(|| bad(Kind::Malformed, format!("has a shape {:?} that overflows", r.shape)))?;
    // Row-major contiguity; a dimension of size 1 may carry any stride.
    let mut want = 1u64;
    for (d, (&n, &s)) in r.shape.iter().zip(&r.stride).enumerate().rev() {
        if n != 1 && s != want && numel != 0 {
            return Err(bad(
                Kind::Unsupported,
                format!(
                    "is a non-contiguous view (shape {:?}, strides {:?}; dimension {d} has stride {s}, row-major needs {want}); save tensor.contiguous() instead",
                    r.shape, r.stride
                ),
            ));
        }
        want = want.saturating_mul(n);
    }
    let entry_name = format!("{}data/{}", parsed.prefix, r.key);
    let e = parsed
        .archive
        .get(&entry_name)
        .ok_or_else(|| bad(Kind::Malformed, format!("refers to storage '{}', which is not in the archive", clean(&entry_name))))?;
    if !e.stored() {
        return Err(bad(
            Kind::Unsupported,
            format!(
                "is in '{}', a compressed entry (method {}); phasekit maps stored entries only: save the file again with torch.save",
                clean(&e.name),
                e.method
            ),
        ));
    }
    if e.size != r.storage_bytes {
        return Err(bad(Kind::Malformed, format!("has a storage of {} bytes but '{}' holds {}", r.storage_bytes, clean(&e.name), e.size)));
    }
    let elem = r.dtype.size().expect("checked") as u64;
    let len = numel * elem;
    let start = if numel == 0 {
        0
    } else {
        r.offset.checked_mul(elem).ok_or_else(|| bad(Kind::Malformed, "has an offset that overflows".into()))?
    };
    if start.checked_add(len).is_none_or(|end| end > r.storage_bytes) {
        return Err(bad(
            Kind::Malformed,
            format!(
                "takes elements {}..{}, past the end of its storage ({} elements)",
                r.offset,
                r.offset.saturating_add(numel),
                r.storage_bytes / elem
            ),
        ));
    }
    Ok(Tensor { name, dtype: r.dtype, shape: r.shape, offset: parsed.archive.base + e.data_offset + start, len, storage: e.name.clone() })
}

fn leaf_text(pk: &Pickle, id: Id) -> Option<String> {
    Some(match pk.node(id) {
        Node::None => "None".into(),
        Node::Bool(b) => if *b { "True" } else { "False" }.into(),
        Node::Int(v) => v.to_string(),
        Node::Float(v) => v.to_string(),
        Node::Str(s) => format!("'{}'", clean(s)),
        _ => return None,
    })
}

/// Every tensor of a parsed archive whose root is a dict (a state dict, or a dict of them:
/// nested names are joined with `.`, list items by index, as DCP names them).
pub fn tensors(path: &Path, what: &str, parsed: &Parsed) -> Result<Loaded> {
    let pk = &parsed.pickle;
    if !matches!(pk.node(pk.root), Node::Dict(_)) {
        let kind = if tensor_ref(path, what, pk, pk.root, "")?.is_some() { "one tensor" } else { "a " };
        return Err(Error::at(
            Kind::Unsupported,
            path,
            format!(
                "{what}: the pickle holds {kind}{}, not a dict of tensors",
                if kind == "a " { pk.describe(pk.root) } else { String::new() }
            ),
        ));
    }
    let mut out = Loaded::default();
    let mut names = HashSet::new();
    let mut stack: Vec<(Id, String, usize)> = vec![(pk.root, String::new(), 0)];
    while let Some((id, name, depth)) = stack.pop() {
        if depth > pickle::MAX_DEPTH {
            return Err(Error::limit(path, format!("{what}: containers nested deeper than {} at '{}'", pickle::MAX_DEPTH, clean(&name))));
        }
        let join = |k: &str| if name.is_empty() { k.to_string() } else { format!("{name}.{k}") };
        match pk.node(id) {
            Node::Dict(kv) => {
                // Reverse, so that the stack pops them in file order.
                for &(k, v) in kv.iter().rev() {
                    let key = match pk.node(k) {
                        Node::Str(s) => s.clone(),
                        Node::Int(i) => i.to_string(),
                        _ => return Err(Error::malformed(path, format!("{what}: a key under '{}' is a {}", clean(&name), pk.describe(k)))),
                    };
                    stack.push((v, join(&key), depth + 1));
                }
            }
            Node::List(items) | Node::Tuple(items) => {
                for (i, &v) in items.iter().enumerate().rev() {
                    stack.push((v, join(&i.to_string()), depth + 1));
                }
            }
            _ => {
                if let Some(r) = tensor_ref(path, what, pk, id, &name)? {
                    if !names.insert(name.clone()) {
                        return Err(Error::malformed(path, format!("{what}: two tensors are named '{}'", clean(&name))));
                    }
                    out.tensors.push(place(path, what, parsed, r, name)?);
                } else if let Some(t) = leaf_text(pk, id) {
                    if out.values.len() < super::MAX_VALUES {
                        out.values.push((name, t));
                    } else {
                        out.values_dropped += 1;
                    }
                } else {
                    return Err(Error::malformed(
                        path,
                        format!("{what}: '{}' is a {}, neither a tensor nor a plain value", clean(&name), pk.describe(id)),
                    ));
                }
            }
        }
    }
    Ok(out)
}

/// The one tensor of an archive whose root is a tensor (each item of a DCP `.distcp` file).
pub fn single(path: &Path, what: &str, parsed: &Parsed, name: &str) -> Result<Tensor> {
    let pk = &parsed.pickle;
    let r = tensor_ref(path, what, pk, pk.root, name)?
        .ok_or_else(|| Error::malformed(path, format!("{what}: holds a {}, not a tensor", pk.describe(pk.root))))?;
    place(path, what, parsed, r, name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A torch.save-like archive of `{"w": [2, 2] F32, "v": view of the same storage at 2}`.
    fn archive() -> Vec<u8> {
        let s = |t: &str| {
            let mut v = vec![b'X'];
            v.extend_from_slice(&(t.len() as u32).to_le_bytes());
            v.extend_from_slice(t.as_bytes());
            v
        };
        let tensor = |offset: u8, size: &[u8], stride: &[u8]| {
            let mut v = b"ctorch._utils\n_rebuild_tensor_v2\n((".to_vec();
            v.extend(s("storage"));
            v.extend_from_slice(b"ctorch\nFloatStorage\n");
            v.extend(s("0"));
            v.extend(s("cpu"));
            v.extend_from_slice(b"K\x04tQK");
            v.push(offset);
            v.push(b'(');
            for d in size {
                v.extend_from_slice(&[b'K', *d]);
            }
            v.extend_from_slice(b"t(");
            for d in stride {
                v.extend_from_slice(&[b'K', *d]);
            }
            v.extend_from_slice(b"t\x89ccollections\nOrderedDict\n)RtR");
            v
        };
        let mut pkl = b"\x80\x02}(".to_vec();
        pkl.extend(s("w"));
        pkl.extend(tensor(0, &[2, 2], &[2, 1]));
        pkl.extend(s("v"));
        pkl.extend(tensor(2, &[2], &[1]));
        pkl.extend_from_slice(b"u.");
        let data: Vec<u8> = [1f32, 2.0, 3.0, 4.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        crate::pytorch::zip::tests::zip(&[("a/data.pkl", &pkl), ("a/byteorder", b"little"), ("a/data/0", &data)])
    }

    fn read(b: &[u8]) -> Result<Loaded> {
        let p = Path::new("t.pt");
        tensors(p, "archive", &parse(p, "archive", b, 0)?)
    }

    #[test]
    fn views_share_the_storage_bytes() {
        let b = archive();
        let l = read(&b).unwrap();
        assert_eq!(l.tensors.len(), 2);
        let (w, v) = (&l.tensors[0], &l.tensors[1]);
        assert_eq!((w.name.as_str(), w.shape.as_slice(), w.len), ("w", &[2u64, 2][..], 16));
        assert_eq!((v.name.as_str(), v.offset, v.len), ("v", w.offset + 8, 8));
        assert_eq!(
            &b[v.offset as usize..(v.offset + v.len) as usize],
            [3f32, 4.0].iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>()
        );
    }

    /// Every single-byte corruption of a valid archive: an error or tensors inside the input,
    /// never a panic (the fuzz target `torch_archive` does this at scale).
    #[test]
    fn corrupted_bytes_never_panic_or_escape_the_input() {
        let b = archive();
        for i in 0..b.len() {
            for x in [0u8, 0xff, b[i] ^ 1] {
                let mut m = b.clone();
                m[i] = x;
                if let Ok(l) = read(&m) {
                    for t in &l.tensors {
                        assert!(t.offset + t.len <= m.len() as u64, "byte {i} = {x}: {t:?}");
                        assert_eq!(t.dtype.byte_size(crate::dtype::numel(&t.shape).unwrap()), Some(t.len));
                    }
                }
            }
        }
    }
}
