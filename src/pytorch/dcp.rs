//! `torch.distributed.checkpoint` folders: `.metadata` (a pickled `Metadata` dataclass tree)
//! and `__<rank>_<n>.distcp` data files.
//!
//! What `dcp.save` writes (found with torch 2.15, see `tests/fixtures/pytorch/make.py`):
//! - `.metadata`: `Metadata(state_dict_metadata, planner_data, storage_data, storage_meta,
//!   version)`, pickle protocol 4. `state_dict_metadata` maps each flattened name
//!   (`model.blocks.0.attn1.to_q.weight`, `optimizer.param_groups.0.lr`) to a
//!   `TensorStorageMetadata(properties=TensorProperties(dtype, layout, ...), size, chunks)` or a
//!   `BytesStorageMetadata()` (any other Python value, saved with `torch.save`). Each chunk is a
//!   `ChunkStorageMetadata(offsets, sizes)`: the box of the full tensor one rank wrote (FSDP
//!   shards dimension 0; a `DTensor` may shard any dimension). `storage_data` maps
//!   `MetadataIndex(fqn, offset)` to `_StorageInfo(relative_path, offset, length)`.
//! - each `.distcp` file is the concatenation of items; a tensor item is a complete
//!   `torch.save` archive of the chunk (root: the tensor itself), stored uncompressed.
//!
//! A tensor with one chunk covering it is served from its item's storage entry in place. The
//! chunks of a sharded tensor must tile it exactly (inside it, no overlap, every element once);
//! they are then copied, run by run, into a temporary file ([`consolidate`]). Items with
//! `transform_descriptors` (compression or other transforms) are refused.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::pickle::{self, Id, Node, Pickle, Policy};
use super::torch;
use crate::dtype::DType;
use crate::error::{clean, Error, IoContext, Kind, Result};

const META: &str = "torch.distributed.checkpoint.metadata";

fn allowed(module: &str, name: &str) -> bool {
    match module {
        META => matches!(
            name,
            "Metadata"
                | "TensorStorageMetadata"
                | "TensorProperties"
                | "ChunkStorageMetadata"
                | "BytesStorageMetadata"
                | "MetadataIndex"
                | "StorageMeta"
                | "_MEM_FORMAT_ENCODING"
        ),
        "torch.distributed.checkpoint.filesystem" => name == "_StorageInfo",
        "torch" => name == "Size" || torch::dtype_of(name).is_some(),
        "torch.serialization" => name == "_get_layout",
        // `StorageMeta.checkpoint_id`: the path the checkpoint was saved to.
        "pathlib" => matches!(name, "PosixPath" | "WindowsPath" | "PurePosixPath" | "PureWindowsPath"),
        "collections" => name == "OrderedDict",
        _ => false,
    }
}

/// The globals a DCP `.metadata` pickle may name: its dataclasses, dtypes, `torch.Size`,
/// the layout and memory-format decoders and `pathlib` paths.
pub const POLICY: Policy = Policy { purpose: "the torch.distributed.checkpoint metadata dataclasses", allowed };

/// Most chunks one tensor may have (one per rank and shard dimension).
pub const MAX_CHUNKS: usize = 1 << 16;

/// One chunk of a tensor and the item that holds it.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub offsets: Vec<u64>,
    pub sizes: Vec<u64>,
    /// Index into [`Index::files`].
    pub file: usize,
    pub item_offset: u64,
    pub item_len: u64,
}

/// A tensor of the checkpoint as `.metadata` describes it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub chunks: Vec<Chunk>,
}

/// What `.metadata` says.
#[derive(Debug, Clone, Default)]
pub struct Index {
    /// Data files, relative to the folder, in first-use order.
    pub files: Vec<String>,
    pub tensors: Vec<Entry>,
    /// Names of non-tensor values (`BytesStorageMetadata`).
    pub values: Vec<String>,
    /// The `version` field.
    pub version: Option<String>,
}

/// A located tensor: its dtype, shape and where each chunk's bytes are.
#[derive(Debug, Clone)]
pub struct Located {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// (chunk, file, absolute offset of its data, length) in chunk order.
    pub parts: Vec<(Chunk, usize, u64, u64)>,
}

impl Located {
    /// The single part covering the whole tensor, when it is stored in one piece.
    pub fn whole(&self) -> Option<(usize, u64, u64)> {
        match self.parts.as_slice() {
            [(c, f, o, l)] if c.sizes == self.shape && c.offsets.iter().all(|&x| x == 0) => Some((*f, *o, *l)),
            [] if crate::dtype::numel(&self.shape) == Some(0) => Some((0, 0, 0)),
            _ => None,
        }
    }
    pub fn bytes(&self) -> u64 {
        crate::dtype::numel(&self.shape).and_then(|n| self.dtype.byte_size(n)).unwrap_or(0)
    }
}

fn object_state<'p>(pk: &'p Pickle, id: Id, class: &str) -> Option<(Option<Id>, &'p Node)> {
    match pk.node(id) {
        Node::Object { class: c, state, .. } if pk.global(*c).is_some_and(|(_, n)| n == class) => Some((*state, pk.node(id))),
        _ => None,
    }
}

/// Fields of a dataclass object (`BUILD` with a dict of fields).
fn fields<'p>(pk: &'p Pickle, id: Id, class: &str) -> Option<HashMap<&'p str, Id>> {
    let (state, _) = object_state(pk, id, class)?;
    match state {
        None => Some(HashMap::new()),
        Some(s) => pk.str_dict(s).map(|v| v.into_iter().collect()),
    }
}

fn size_of(pk: &Pickle, id: Id) -> Option<Vec<u64>> {
    let Node::Call { func, args } = pk.node(id) else {
        return pk.items(id)?.iter().map(|&i| pk.int(i).and_then(|v| u64::try_from(v).ok())).collect();
    };
    if pk.global(*func) != Some(("torch", "Size")) {
        return None;
    }
    let inner = *pk.items(*args)?.first()?;
    pk.items(inner)?.iter().map(|&i| pk.int(i).and_then(|v| u64::try_from(v).ok())).collect()
}

/// Parse `.metadata` (`path`, its bytes) into an index of tensors and their chunks.
pub fn read_metadata(path: &Path, bytes: &[u8]) -> Result<Index> {
    let pk = pickle::parse(path, ".metadata", bytes, &POLICY)?;
    let bad = |m: String| Error::malformed(path, m);
    let top =
        fields(&pk, pk.root, "Metadata").ok_or_else(|| bad(format!("the pickle holds a {}, not a DCP Metadata", pk.describe(pk.root))))?;
    let sdm = top
        .get("state_dict_metadata")
        .and_then(|&i| pk.node(i).clone().into_dict())
        .ok_or_else(|| bad("Metadata has no state_dict_metadata dict".into()))?;
    let sd = top
        .get("storage_data")
        .and_then(|&i| pk.node(i).clone().into_dict())
        .ok_or_else(|| bad("Metadata has no storage_data dict".into()))?;
    let version = top.get("version").and_then(|&i| pk.str(i)).map(str::to_string);
    // (fqn, chunk offsets) → (file, offset, length).
    let mut files: Vec<String> = Vec::new();
    let mut storage: HashMap<(String, Vec<u64>), (usize, u64, u64)> = HashMap::new();
    for (k, v) in sd {
        let mi = fields(&pk, k, "MetadataIndex").ok_or_else(|| bad(format!("a storage_data key is a {}", pk.describe(k))))?;
        let fqn = mi.get("fqn").and_then(|&i| pk.str(i)).ok_or_else(|| bad("a MetadataIndex has no fqn".into()))?;
        let offset = match mi.get("offset") {
            Some(&o) if pk.node(o) != &Node::None => {
                size_of(&pk, o).ok_or_else(|| bad(format!("MetadataIndex '{}': offset is not a torch.Size", clean(fqn))))?
            }
            _ => Vec::new(),
        };
        let si = fields(&pk, v, "_StorageInfo").ok_or_else(|| bad(format!("storage_data['{}'] is a {}", clean(fqn), pk.describe(v))))?;
        let rel = si
            .get("relative_path")
            .and_then(|&i| pk.str(i))
            .ok_or_else(|| bad(format!("storage_data['{}'] has no relative_path", clean(fqn))))?;
        if rel.is_empty() || rel.contains('/') || rel.contains('\\') || rel == "." || rel == ".." {
            return Err(bad(format!("storage_data['{}'] points outside the folder: '{}'", clean(fqn), clean(rel))));
        }
        let num = |k: &str| si.get(k).and_then(|&i| pk.int(i)).and_then(|v| u64::try_from(v).ok());
        let (Some(off), Some(len)) = (num("offset"), num("length")) else {
            return Err(bad(format!("storage_data['{}'] has no non-negative offset and length", clean(fqn))));
        };
        if let Some(&t) = si.get("transform_descriptors") {
            if pk.items(t).is_some_and(|v| !v.is_empty()) {
                return Err(Error::at(
                    Kind::Unsupported,
                    path,
                    format!("item '{}' was saved with transforms (compression); phasekit reads plain DCP items", clean(fqn)),
                ));
            }
        }
        let file = match files.iter().position(|f| f == rel) {
            Some(i) => i,
            None => {
                files.push(rel.to_string());
                files.len() - 1
            }
        };
        storage.insert((fqn.to_string(), offset), (file, off, len));
    }
    let mut index = Index { files, version, ..Index::default() };
    for (k, v) in sdm {
        let name = pk.str(k).ok_or_else(|| bad(format!("a state_dict_metadata key is a {}", pk.describe(k))))?.to_string();
        if object_state(&pk, v, "BytesStorageMetadata").is_some() {
            index.values.push(name);
            continue;
        }
        let t = fields(&pk, v, "TensorStorageMetadata")
            .ok_or_else(|| bad(format!("'{}' is described by a {}", clean(&name), pk.describe(v))))?;
        let ctx = |m: &str| bad(format!("tensor '{}': {m}", clean(&name)));
        let props = *t.get("properties").ok_or_else(|| ctx("no properties"))?;
        let (pstate, _) = object_state(&pk, props, "TensorProperties").ok_or_else(|| ctx("properties are not TensorProperties"))?;
        let pstate = pstate.ok_or_else(|| ctx("TensorProperties without state"))?;
        // Saved as a tuple (dtype, layout, requires_grad, memory_format, pin_memory[, strides])
        // by TensorProperties.__getstate__, or as a field dict by older versions.
        let (dtype_id, layout_id) = match pk.node(pstate) {
            Node::Tuple(v) if v.len() >= 2 => (v[0], Some(v[1])),
            Node::Dict(_) => {
                let d: HashMap<&str, Id> = pk.str_dict(pstate).unwrap_or_default().into_iter().collect();
                (*d.get("dtype").ok_or_else(|| ctx("TensorProperties without dtype"))?, d.get("layout").copied())
            }
            _ => return Err(ctx("TensorProperties state is neither a tuple nor a dict")),
        };
        if let Some(l) = layout_id {
            if let Node::Call { args, .. } = pk.node(l) {
                let arg = pk.items(*args).and_then(|a| a.first().copied()).and_then(|a| pk.str(a));
                if arg.is_some_and(|s| s != "torch.strided") {
                    return Err(Error::at(
                        Kind::Unsupported,
                        path,
                        format!("tensor '{}' has layout {} (phasekit reads strided tensors)", clean(&name), clean(arg.unwrap_or("?"))),
                    ));
                }
            }
        }
        let dname =
            pk.global(dtype_id).filter(|(m, _)| *m == "torch").map(|(_, n)| n).ok_or_else(|| ctx("its dtype is not a torch dtype"))?;
        let dtype = match torch::dtype_of(dname) {
            Some(Some(d)) => d,
            _ => {
                return Err(Error::at(
                    Kind::Unsupported,
                    path,
                    format!("tensor '{}' has dtype torch.{dname}, which phasekit cannot hold", clean(&name)),
                ))
            }
        };
        let shape = t.get("size").and_then(|&s| size_of(&pk, s)).ok_or_else(|| ctx("its size is not a torch.Size"))?;
        let chunk_ids = t.get("chunks").and_then(|&c| pk.items(c)).ok_or_else(|| ctx("its chunks are not a list"))?;
        if chunk_ids.len() > MAX_CHUNKS {
            return Err(Error::limit(
                path,
                format!("tensor '{}' has {} chunks, over the limit of {MAX_CHUNKS}", clean(&name), chunk_ids.len()),
            ));
        }
        let mut chunks = Vec::with_capacity(chunk_ids.len());
        for &c in chunk_ids {
            let f = fields(&pk, c, "ChunkStorageMetadata").ok_or_else(|| ctx("a chunk is not a ChunkStorageMetadata"))?;
            let offsets = f.get("offsets").and_then(|&o| size_of(&pk, o)).ok_or_else(|| ctx("a chunk has no offsets"))?;
            let sizes = f.get("sizes").and_then(|&o| size_of(&pk, o)).ok_or_else(|| ctx("a chunk has no sizes"))?;
            let &(file, item_offset, item_len) = storage.get(&(name.clone(), offsets.clone())).ok_or_else(|| {
                Error::inconsistent(path, format!("tensor '{}': chunk at {offsets:?} has no entry in storage_data", clean(&name)))
            })?;
            chunks.push(Chunk { offsets, sizes, file, item_offset, item_len });
        }
        check_tiling(path, &name, &shape, &chunks)?;
        index.tensors.push(Entry { name, dtype, shape, chunks });
    }
    Ok(index)
}

impl Node {
    fn into_dict(self) -> Option<Vec<(Id, Id)>> {
        match self {
            Node::Dict(v) => Some(v),
            _ => None,
        }
    }
}

/// The chunks lie inside the tensor, do not overlap and together hold every element once.
fn check_tiling(path: &Path, name: &str, shape: &[u64], chunks: &[Chunk]) -> Result<()> {
    let bad = |m: String| Error::inconsistent(path, format!("tensor '{}': {m}", clean(name)));
    let mut total: u128 = 0;
    for c in chunks {
        if c.offsets.len() != shape.len() || c.sizes.len() != shape.len() {
            return Err(bad(format!("a chunk has {} offsets and {} sizes for a {}-D tensor", c.offsets.len(), c.sizes.len(), shape.len())));
        }
        if c.offsets.iter().zip(&c.sizes).zip(shape).any(|((&o, &s), &n)| o.checked_add(s).is_none_or(|e| e > n)) {
            return Err(bad(format!("chunk at {:?} of size {:?} reaches past the shape {shape:?}", c.offsets, c.sizes)));
        }
        total += c.sizes.iter().map(|&s| s as u128).product::<u128>();
    }
    for (i, a) in chunks.iter().enumerate() {
        for b in &chunks[i + 1..] {
            let overlap = (0..shape.len()).all(|d| a.offsets[d] < b.offsets[d] + b.sizes[d] && b.offsets[d] < a.offsets[d] + a.sizes[d]);
            if overlap && a.sizes.iter().chain(&b.sizes).all(|&s| s > 0) {
                return Err(bad(format!("chunks at {:?} and {:?} overlap", a.offsets, b.offsets)));
            }
        }
    }
    let numel: u128 = shape.iter().map(|&s| s as u128).product();
    if total != numel {
        return Err(bad(format!("its chunks hold {total} of its {numel} elements")));
    }
    Ok(())
}

/// Find every chunk's bytes: parse each item (a `torch.save` archive) inside its data file.
/// `files` are the index's files, opened, in order.
pub fn locate(index: &Index, files: &[(&Path, &[u8])]) -> Result<Vec<Located>> {
    let mut out = Vec::with_capacity(index.tensors.len());
    for t in &index.tensors {
        let mut parts = Vec::with_capacity(t.chunks.len());
        for c in &t.chunks {
            let (path, bytes) = files[c.file];
            let end = c.item_offset.checked_add(c.item_len).filter(|&e| e <= bytes.len() as u64).ok_or_else(|| {
                Error::truncated(
                    path,
                    format!(
                        "item '{}' ({} bytes at {}) runs past the end ({} bytes)",
                        clean(&t.name),
                        c.item_len,
                        c.item_offset,
                        bytes.len()
                    ),
                )
            })?;
            let what = format!("item '{}' at byte {}", clean(&t.name), c.item_offset);
            let parsed = torch::parse(path, &what, &bytes[c.item_offset as usize..end as usize], c.item_offset)?;
            let tensor = torch::single(path, &what, &parsed, &t.name)?;
            if tensor.dtype != t.dtype || tensor.shape != c.sizes {
                return Err(Error::inconsistent(
                    path,
                    format!("{what}: holds {} {:?} but .metadata says {} {:?}", tensor.dtype, tensor.shape, t.dtype, c.sizes),
                ));
            }
            parts.push((c.clone(), c.file, tensor.offset, tensor.len));
        }
        out.push(Located { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone(), parts });
    }
    Ok(out)
}

/// Copy the chunks of every tensor that is not stored in one piece into `out` (at increasing
/// offsets, in order) and return each tensor's offset there (`None` for tensors served in
/// place). Each chunk is written as runs of whole rows of its box; `release(file, offset, len)`
/// is called for each chunk once copied, so that the map's pages can leave the resident set.
pub fn consolidate(
    located: &[Located],
    files: &[(&Path, &[u8])],
    out: &File,
    out_path: &Path,
    release: &dyn Fn(usize, u64, u64),
) -> Result<Vec<Option<u64>>> {
    let mut at = 0u64;
    let mut offsets = Vec::with_capacity(located.len());
    for t in located {
        if t.whole().is_some() {
            offsets.push(None);
            continue;
        }
        let elem =
            t.dtype.size().ok_or_else(|| Error::unsupported(format!("tensor '{}': {} has no whole-byte size", clean(&t.name), t.dtype)))?
                as u64;
        let nd = t.shape.len();
        // Row-major strides of the full tensor, in elements.
        let mut stride = vec![1u64; nd];
        for d in (0..nd.saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * t.shape[d + 1];
        }
        for (c, file, src, len) in &t.parts {
            let (path, bytes) = files[*file];
            let data = &bytes[*src as usize..(*src + *len) as usize];
            // The innermost dimensions the chunk spans whole form one run with the first
            // dimension (from the inside) that it does not.
            let mut k = nd;
            while k > 0 && c.sizes[k - 1] == t.shape[k - 1] {
                k -= 1;
            }
            let split = k.saturating_sub(1);
            let run: u64 = if nd == 0 { 1 } else { c.sizes[split..].iter().product() };
            let outer: Vec<u64> = c.sizes[..split].to_vec();
            let count: u64 = outer.iter().product();
            let mut idx = vec![0u64; split];
            for r in 0..count {
                let mut dst = if nd == 0 { 0 } else { c.offsets[split] * stride[split] };
                for d in 0..split {
                    dst += (c.offsets[d] + idx[d]) * stride[d];
                }
                let s = (r * run * elem) as usize;
                let piece = &data[s..s + (run * elem) as usize];
                out.write_all_at(piece, at + dst * elem).with_file(out_path)?;
                for d in (0..split).rev() {
                    idx[d] += 1;
                    if idx[d] < outer[d] {
                        break;
                    }
                    idx[d] = 0;
                }
            }
            let _ = path;
            release(*file, *src, *len);
        }
        offsets.push(Some(at));
        at += t.bytes();
    }
    out.set_len(at).with_file(out_path)?;
    Ok(offsets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(offsets: &[u64], sizes: &[u64]) -> Chunk {
        Chunk { offsets: offsets.to_vec(), sizes: sizes.to_vec(), file: 0, item_offset: 0, item_len: 0 }
    }

    #[test]
    fn chunks_must_tile_the_tensor() {
        let p = Path::new(".metadata");
        check_tiling(p, "w", &[4, 6], &[chunk(&[0, 0], &[2, 6]), chunk(&[2, 0], &[2, 6])]).unwrap();
        check_tiling(p, "w", &[4, 6], &[chunk(&[0, 0], &[4, 3]), chunk(&[0, 3], &[4, 3]), chunk(&[4, 0], &[0, 6])]).unwrap();
        for (chunks, want) in [
            (vec![chunk(&[0, 0], &[3, 6]), chunk(&[2, 0], &[2, 6])], "overlap"),
            (vec![chunk(&[0, 0], &[2, 6])], "12 of its 24"),
            (vec![chunk(&[0, 0], &[2, 6]), chunk(&[3, 0], &[2, 6])], "reaches past"),
            (vec![chunk(&[0], &[4])], "1 offsets"),
        ] {
            let e = check_tiling(p, "w", &[4, 6], &chunks).unwrap_err();
            assert_eq!(e.kind(), Kind::Inconsistent);
            assert!(e.message().contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn consolidation_puts_every_element_back() {
        // A [3, 4] tensor of i16 values 0..12 in three chunks: rows 0-1 split by columns, row 2 whole.
        let full: Vec<i16> = (0..12).collect();
        let pick = |r: std::ops::Range<usize>, c: std::ops::Range<usize>| -> Vec<u8> {
            r.flat_map(|i| c.clone().map(move |j| i * 4 + j)).flat_map(|k| full[k].to_le_bytes()).collect()
        };
        let parts = [pick(0..2, 0..1), pick(0..2, 1..4), pick(2..3, 0..4)];
        let mut file = Vec::new();
        let mut located = Located { name: "w".into(), dtype: DType::I16, shape: vec![3, 4], parts: Vec::new() };
        for (c, bytes) in [chunk(&[0, 0], &[2, 1]), chunk(&[0, 1], &[2, 3]), chunk(&[2, 0], &[1, 4])].into_iter().zip(&parts) {
            located.parts.push((c, 0, file.len() as u64, bytes.len() as u64));
            file.extend_from_slice(bytes);
        }
        let whole = Located { name: "b".into(), dtype: DType::I16, shape: vec![2], parts: vec![(chunk(&[0], &[2]), 0, 0, 4)] };
        let out = tempfile::tempfile().unwrap();
        let offs = consolidate(&[whole, located], &[(Path::new("x.distcp"), &file)], &out, Path::new("spill"), &|_, _, _| {}).unwrap();
        assert_eq!(offs, vec![None, Some(0)]);
        let mut got = vec![0u8; 24];
        out.read_exact_at(&mut got, 0).unwrap();
        let want: Vec<u8> = full.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(got, want);
    }
}
