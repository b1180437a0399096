//! One tensor store for every source (DESIGN decision 1).
//!
//! [`Checkpoint::open`] accepts a safetensors file, a sharded folder or its
//! `*.safetensors.index.json`, a diffusers model folder, or a GGUF file. It maps every file
//! (nothing is read into memory), validates the structure, and yields [`TensorEntry`]
//! descriptors: name, encoding, shape and the byte range inside one mapped file.
//! [`open_models`] also understands folders holding several models (a Wan2.2 original repo with
//! `high_noise_model/` and `low_noise_model/`, a diffusers pipeline with `transformer/` and
//! `transformer_2/`).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::{Advice, Mmap, UncheckedAdvice};

use crate::dtype::DType;
use crate::error::{clean, Error, IoContext, Kind, Result};
use crate::quant::GgmlType;

/// On-disk container format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Safetensors,
    ShardedSafetensors,
    Gguf,
    /// A `torch.save` zip archive (`crate::pytorch`).
    Pytorch,
    /// A `torch.distributed.checkpoint` folder (`crate::pytorch::dcp`).
    Dcp,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Safetensors => "safetensors",
            Format::ShardedSafetensors => "safetensors (sharded)",
            Format::Gguf => "gguf",
            Format::Pytorch => "pytorch (torch.save)",
            Format::Dcp => "pytorch (torch.distributed.checkpoint)",
        }
    }
}

/// How a tensor's bytes encode its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Dense(DType),
    /// A ggml block-quantised type (never one of the dense ggml types).
    Ggml(GgmlType),
}

impl Encoding {
    pub fn name(&self) -> String {
        match self {
            Encoding::Dense(d) => d.to_string(),
            Encoding::Ggml(g) => g.to_string(),
        }
    }
    pub fn dense(&self) -> Option<DType> {
        match self {
            Encoding::Dense(d) => Some(*d),
            Encoding::Ggml(_) => None,
        }
    }
}

/// A mapped input file.
pub struct SourceFile {
    pub path: PathBuf,
    pub len: u64,
    map: Option<Mmap>,
    /// The open file, for kernel copies (`copy_file_range`) and hole queries.
    file: File,
}

impl SourceFile {
    pub fn open(path: &Path) -> Result<SourceFile> {
        let file = File::open(path).with_file(path)?;
        Self::from_file(path, file)
    }
    /// Map a file that is already open (`path` names it in messages).
    pub fn from_file(path: &Path, file: File) -> Result<SourceFile> {
        let meta = file.metadata().with_file(path)?;
        if meta.is_dir() {
            return Err(Error::at(Kind::Usage, path, "is a folder, expected a file"));
        }
        let len = meta.len();
        let map = if len == 0 {
            None
        } else {
            // Safety: the map is read-only. Like ripgrep and candle, we accept that another
            // process truncating or rewriting the file while we read it is undefined
            // behaviour; checkpoints are not edited in place while being converted.
            let m = unsafe { Mmap::map(&file) }.with_file(path)?;
            let _ = m.advise(Advice::Sequential);
            Some(m)
        };
        Ok(SourceFile { path: path.to_path_buf(), len, map, file })
    }
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
    /// The open file (read-only), e.g. for `copy_file_range`.
    pub fn file(&self) -> &File {
        &self.file
    }
    /// Drop our page-table references to `[offset, offset+len)` so resident memory stays
    /// bounded while streaming a large file (the page cache keeps the data).
    pub fn release(&self, offset: u64, len: u64) {
        if let Some(m) = &self.map {
            let page = 4096u64;
            let start = offset / page * page;
            let end = (offset + len).min(self.len);
            if end > start {
                // Safety: DONTNEED on a private read-only file mapping only drops cached PTEs;
                // later reads fault the same file bytes back in.
                let _ = unsafe { m.unchecked_advise_range(UncheckedAdvice::DontNeed, start as usize, (end - start) as usize) };
            }
        }
    }
}

/// Suffixes of fp8 weight scales (ComfyUI's `scale_weight`, diffusers-style `weight_scale`).
pub const SCALE_SUFFIXES: [&str; 2] = [".scale_weight", ".weight_scale"];
/// Suffixes of fp8 input scales (kept only when the weights are copied as they are).
pub const INPUT_SCALE_SUFFIXES: [&str; 2] = [".scale_input", ".input_scale"];
/// ComfyUI's scaled-fp8 marker tensor (its dtype names the fp8 type).
pub const SCALED_FP8_MARKER: &str = "scaled_fp8";

/// Whether a tensor name is an fp8 scale or the scaled-fp8 marker rather than a weight.
pub fn is_scale_companion(name: &str) -> bool {
    SCALE_SUFFIXES.iter().chain(&INPUT_SCALE_SUFFIXES).any(|s| name.ends_with(s))
        || name == SCALED_FP8_MARKER
        || name.ends_with(&format!(".{SCALED_FP8_MARKER}"))
}

/// One tensor of a checkpoint: where its bytes are and what they mean.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub encoding: Encoding,
    /// Shape in row-major (torch) order.
    pub shape: Vec<u64>,
    /// Index into [`Checkpoint::files`].
    pub file: usize,
    /// Absolute byte offset in that file.
    pub offset: u64,
    pub len: u64,
}

impl TensorEntry {
    pub fn numel(&self) -> u64 {
        crate::dtype::numel(&self.shape).unwrap_or(0)
    }
}

/// The `*.safetensors.index.json` of a sharded checkpoint.
#[derive(Debug, Clone)]
pub struct IndexInfo {
    pub path: PathBuf,
    pub total_size: Option<u64>,
    /// Other keys of the index's `metadata` object.
    pub extra_metadata: serde_json::Map<String, serde_json::Value>,
}

/// A `config.json` found beside the weights.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub json: serde_json::Value,
}

/// GGUF header information kept for inspection and re-export.
#[derive(Debug, Clone)]
pub struct GgufInfo {
    pub version: u32,
    pub alignment: u64,
    pub kv: Vec<(String, crate::gguf::Value)>,
}

/// A checkpoint opened for reading.
pub struct Checkpoint {
    /// The path the user gave.
    pub path: PathBuf,
    pub format: Format,
    pub files: Vec<SourceFile>,
    pub tensors: Vec<TensorEntry>,
    /// safetensors `__metadata__` (of the first shard for sharded checkpoints).
    pub metadata: Vec<(String, String)>,
    pub index: Option<IndexInfo>,
    pub config: Option<ConfigFile>,
    pub gguf: Option<GgufInfo>,
    /// What a PyTorch source held besides tensors (`crate::pytorch`).
    pub pytorch: Option<crate::pytorch::Info>,
}

/// Largest index or config JSON we read (they are a few MB at most in practice).
const MAX_JSON: u64 = 64 << 20;

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let len = fs::metadata(path).with_file(path)?.len();
    if len > MAX_JSON {
        return Err(Error::limit(path, format!("JSON file is {len} bytes, over the {MAX_JSON}-byte limit")));
    }
    let bytes = fs::read(path).with_file(path)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::malformed(path, format!("invalid JSON: {e}")))
}

fn is_gguf(path: &Path) -> Result<bool> {
    let mut f = File::open(path).with_file(path)?;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = f.read(&mut magic[got..]).with_file(path)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got == 4 && &magic == b"GGUF")
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir).with_file(dir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    v.sort();
    Ok(v)
}

fn name_ends(p: &Path, suffix: &str) -> bool {
    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(suffix) && !n.starts_with('.'))
}

/// Folders that hold several models, with each model's role.
pub fn sub_models(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for role in ["high_noise_model", "low_noise_model", "transformer", "transformer_2"] {
        let p = dir.join(role);
        if p.is_dir() {
            out.push((role.to_string(), p));
        }
    }
    out
}

/// Open every model under `path`: one for a plain checkpoint, several for a multi-model folder.
pub fn open_models(path: &Path) -> Result<Vec<(String, Checkpoint)>> {
    if path.is_dir() {
        let subs = sub_models(path);
        if !subs.is_empty() {
            return subs.into_iter().map(|(role, p)| Ok((role, Checkpoint::open(&p)?))).collect();
        }
    }
    Ok(vec![(String::new(), Checkpoint::open(path)?)])
}

impl Checkpoint {
    /// Open a checkpoint file or folder (see the module docs for what is accepted).
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let meta = fs::metadata(path).with_file(path)?;
        if meta.is_dir() {
            return Self::open_dir(path);
        }
        let config = path.parent().map(|d| d.join("config.json")).filter(|c| c.is_file());
        let mut ck = if name_ends(path, ".index.json") {
            Self::open_sharded(path)?
        } else if name_ends(path, ".gguf") || is_gguf(path)? {
            Self::open_gguf(path)?
        } else if crate::pytorch::has_torch_extension(path) || crate::pytorch::is_zip(path) {
            open_torch(path)?
        } else {
            Self::open_safetensors(path)?
        };
        if let Some(c) = config {
            ck.config = Some(ConfigFile { json: read_json(&c)?, path: c });
        }
        Ok(ck)
    }

    fn open_dir(dir: &Path) -> Result<Checkpoint> {
        if crate::pytorch::is_dcp_dir(dir) {
            return open_dcp(dir);
        }
        let entries = list_dir(dir)?;
        let indexes: Vec<&PathBuf> = entries.iter().filter(|p| name_ends(p, ".safetensors.index.json")).collect();
        let singles: Vec<&PathBuf> = entries.iter().filter(|p| name_ends(p, ".safetensors")).collect();
        let ggufs: Vec<&PathBuf> = entries.iter().filter(|p| name_ends(p, ".gguf")).collect();
        let mut ck = match (indexes.len(), singles.len(), ggufs.len()) {
            (1, _, _) => Self::open_sharded(indexes[0])?,
            (0, 1, _) => Self::open_safetensors(singles[0])?,
            (0, 0, 1) => Self::open_gguf(ggufs[0])?,
            (0, 0, 0) if entries.iter().filter(|p| crate::pytorch::has_torch_extension(p)).count() == 1 => {
                open_torch(entries.iter().find(|p| crate::pytorch::has_torch_extension(p)).expect("one"))?
            }
            (n, _, _) if n > 1 => {
                return Err(Error::inconsistent(dir, format!("{n} *.safetensors.index.json files; name the one to use")));
            }
            (0, n, _) if n > 1 => {
                return Err(Error::inconsistent(
                    dir,
                    format!("{n} .safetensors files but no *.safetensors.index.json; name the file to use"),
                ));
            }
            _ => {
                let subs = sub_models(dir);
                return Err(if subs.is_empty() {
                    Error::at(
                        Kind::Unsupported,
                        dir,
                        "no .safetensors, .safetensors.index.json, .gguf or single .pt/.pth file in this folder, and no DCP .metadata",
                    )
                } else {
                    Error::at(
                        Kind::Usage,
                        dir,
                        format!(
                            "holds several models ({}); name one of them",
                            subs.iter().map(|s| s.0.as_str()).collect::<Vec<_>>().join(", ")
                        ),
                    )
                });
            }
        };
        ck.path = dir.to_path_buf();
        let c = dir.join("config.json");
        if c.is_file() {
            ck.config = Some(ConfigFile { json: read_json(&c)?, path: c });
        }
        Ok(ck)
    }

    fn open_safetensors(path: &Path) -> Result<Checkpoint> {
        let f = SourceFile::open(path)?;
        let h = crate::safetensors::parse(path, f.bytes())?;
        let tensors = h
            .tensors
            .iter()
            .map(|r| TensorEntry {
                name: r.name.clone(),
                encoding: Encoding::Dense(r.dtype),
                shape: r.shape.clone(),
                file: 0,
                offset: h.data_start + r.begin,
                len: r.end - r.begin,
            })
            .collect();
        Ok(Checkpoint {
            path: path.to_path_buf(),
            format: Format::Safetensors,
            files: vec![f],
            tensors,
            metadata: h.metadata.unwrap_or_default(),
            index: None,
            config: None,
            gguf: None,
            pytorch: None,
        })
    }

    fn open_gguf(path: &Path) -> Result<Checkpoint> {
        let f = SourceFile::open(path)?;
        let g = crate::gguf::parse(path, f.bytes())?;
        let tensors = g
            .tensors
            .iter()
            .map(|t| TensorEntry {
                name: t.name.clone(),
                encoding: t.ty.dense().map_or(Encoding::Ggml(t.ty), Encoding::Dense),
                shape: t.shape.clone(),
                file: 0,
                offset: t.offset,
                len: t.size,
            })
            .collect();
        Ok(Checkpoint {
            path: path.to_path_buf(),
            format: Format::Gguf,
            files: vec![f],
            tensors,
            metadata: Vec::new(),
            index: None,
            config: None,
            gguf: Some(GgufInfo { version: g.version, alignment: g.alignment, kv: g.kv }),
            pytorch: None,
        })
    }

    fn open_sharded(index_path: &Path) -> Result<Checkpoint> {
        let json = read_json(index_path)?;
        let obj = json.as_object().ok_or_else(|| Error::malformed(index_path, "index is not a JSON object"))?;
        let wm = obj
            .get("weight_map")
            .ok_or_else(|| Error::malformed(index_path, "index has no \"weight_map\""))?
            .as_object()
            .ok_or_else(|| Error::malformed(index_path, "\"weight_map\" is not an object"))?;
        let mut extra = serde_json::Map::new();
        let mut total_size = None;
        if let Some(md) = obj.get("metadata") {
            let md = md.as_object().ok_or_else(|| Error::malformed(index_path, "\"metadata\" is not an object"))?;
            for (k, v) in md {
                if k == "total_size" {
                    // huggingface_hub writes an int; some tools write a float or a string.
                    let n = v
                        .as_u64()
                        .or_else(|| v.as_f64().filter(|f| *f >= 0.0 && f.fract() == 0.0).map(|f| f as u64))
                        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                        .ok_or_else(|| Error::malformed(index_path, format!("metadata.total_size is not a non-negative integer: {v}")))?;
                    total_size = Some(n);
                } else {
                    extra.insert(k.clone(), v.clone());
                }
            }
        }
        let dir = index_path.parent().unwrap_or(Path::new(".")).to_path_buf();
        // Shard names in first-seen order of sorted shard file names.
        let mut shard_of: HashMap<&str, usize> = HashMap::new();
        let mut shard_names: BTreeMap<String, ()> = BTreeMap::new();
        for (name, v) in wm {
            let s =
                v.as_str().ok_or_else(|| Error::malformed(index_path, format!("weight_map entry '{}' is not a file name", clean(name))))?;
            let p = Path::new(s);
            if s.is_empty() || p.is_absolute() || p.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
                return Err(Error::malformed(
                    index_path,
                    format!("weight_map entry '{}' points outside the folder: '{}'", clean(name), clean(s)),
                ));
            }
            shard_names.insert(s.to_string(), ());
        }
        let shard_list: Vec<String> = shard_names.into_keys().collect();
        for (i, s) in shard_list.iter().enumerate() {
            shard_of.insert(s.as_str(), i);
        }
        let mut files = Vec::with_capacity(shard_list.len());
        let mut tensors = Vec::new();
        let mut metadata = None;
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, s) in shard_list.iter().enumerate() {
            let p = dir.join(s);
            if !p.is_file() {
                return Err(Error::inconsistent(index_path, format!("index references shard '{}' which does not exist", clean(s))));
            }
            let f = SourceFile::open(&p)?;
            let h = crate::safetensors::parse(&p, f.bytes())?;
            if metadata.is_none() {
                metadata = h.metadata.clone();
            }
            for r in &h.tensors {
                if let Some(prev) = seen.insert(r.name.clone(), i) {
                    return Err(Error::inconsistent(
                        index_path,
                        format!("tensor '{}' is in both '{}' and '{}'", clean(&r.name), clean(&shard_list[prev]), clean(s)),
                    ));
                }
                match wm.get(&r.name).and_then(|v| v.as_str()) {
                    Some(listed) if listed == s => {}
                    Some(listed) => {
                        return Err(Error::inconsistent(
                            index_path,
                            format!("tensor '{}' is in shard '{}' but the index lists '{}'", clean(&r.name), clean(s), clean(listed)),
                        ))
                    }
                    None => {
                        return Err(Error::inconsistent(
                            index_path,
                            format!("tensor '{}' of shard '{}' is not in the index", clean(&r.name), clean(s)),
                        ))
                    }
                }
                tensors.push(TensorEntry {
                    name: r.name.clone(),
                    encoding: Encoding::Dense(r.dtype),
                    shape: r.shape.clone(),
                    file: i,
                    offset: h.data_start + r.begin,
                    len: r.end - r.begin,
                });
            }
            files.push(f);
        }
        for (name, v) in wm {
            if !seen.contains_key(name) {
                return Err(Error::inconsistent(
                    index_path,
                    format!(
                        "index lists tensor '{}' in '{}' but that shard does not contain it",
                        clean(name),
                        clean(v.as_str().unwrap_or("?"))
                    ),
                ));
            }
        }
        let sum: u64 = tensors.iter().map(|t| t.len).sum();
        if let Some(ts) = total_size {
            if ts != sum {
                return Err(Error::inconsistent(
                    index_path,
                    format!("metadata.total_size is {ts} but the shards hold {sum} bytes of tensors"),
                ));
            }
        }
        Ok(Checkpoint {
            path: index_path.to_path_buf(),
            format: Format::ShardedSafetensors,
            files,
            tensors,
            metadata: metadata.unwrap_or_default(),
            index: Some(IndexInfo { path: index_path.to_path_buf(), total_size, extra_metadata: extra }),
            config: None,
            gguf: None,
            pytorch: None,
        })
    }

    /// The bytes of a tensor, borrowed from the map.
    pub fn bytes(&self, t: &TensorEntry) -> &[u8] {
        &self.files[t.file].bytes()[t.offset as usize..(t.offset + t.len) as usize]
    }

    /// Let the kernel drop a tensor's pages from our resident set once we are done with it.
    pub fn release(&self, t: &TensorEntry) {
        self.files[t.file].release(t.offset, t.len);
    }

    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Total tensor bytes.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.len).sum()
    }

    /// Number of parameters (elements), excluding fp8 scale companions.
    pub fn param_count(&self) -> u64 {
        self.tensors.iter().filter(|t| !is_scale_companion(&t.name)).map(|t| t.numel()).sum()
    }

    /// Names and shapes, as the layout detector wants them.
    pub fn names_and_shapes(&self) -> Vec<(&str, &[u64])> {
        self.tensors.iter().map(|t| (t.name.as_str(), t.shape.as_slice())).collect()
    }
}

// ---- PyTorch sources (torch.save archives, torch.distributed.checkpoint folders) ----
// The readers in `crate::pytorch` yield their own descriptors; here they become tensor entries
// of the one store, as GGUF's do above.

/// Open a `torch.save` file: every tensor of its (nested) dict, as a byte range of the map.
pub(crate) fn open_torch(path: &Path) -> Result<Checkpoint> {
    let f = SourceFile::open(path)?;
    let parsed = crate::pytorch::torch::parse(path, "torch.save archive", f.bytes(), 0)?;
    let loaded = crate::pytorch::torch::tensors(path, "torch.save archive", &parsed)?;
    let shared = {
        let mut per: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for t in &loaded.tensors {
            *per.entry(t.storage.as_str()).or_default() += 1;
        }
        per.values().filter(|&&n| n > 1).map(|n| n - 1).sum::<usize>()
    };
    let mut notes = Vec::new();
    if shared > 0 {
        notes.push(format!("{shared} tensors are views of a storage another tensor uses (served from the same bytes)"));
    }
    if loaded.values_dropped > 0 {
        notes.push(format!("{} more non-tensor values not listed", loaded.values_dropped));
    }
    let tensors = loaded
        .tensors
        .into_iter()
        .map(|t| TensorEntry { name: t.name, encoding: Encoding::Dense(t.dtype), shape: t.shape, file: 0, offset: t.offset, len: t.len })
        .collect();
    Ok(Checkpoint {
        path: path.to_path_buf(),
        format: Format::Pytorch,
        files: vec![f],
        tensors,
        metadata: Vec::new(),
        index: None,
        config: None,
        gguf: None,
        pytorch: Some(crate::pytorch::Info { container: "torch.save".into(), values: loaded.values, notes }),
    })
}

static SPILLS: AtomicU64 = AtomicU64::new(0);

/// An unlinked scratch file in the system temp folder (it disappears with its last handle).
fn scratch() -> Result<(File, PathBuf)> {
    let dir = std::env::temp_dir();
    let n = SPILLS.fetch_add(1, Ordering::Relaxed);
    let p = dir.join(format!(".phasekit-dcp-{}-{n}.tmp", std::process::id()));
    let f = OpenOptions::new().read(true).write(true).create_new(true).open(&p).with_file(&p)?;
    fs::remove_file(&p).with_file(&p)?;
    Ok((f, p))
}

/// Open a DCP folder. When its names are `model.*` plus other subtrees (`optimizer.*`: the
/// state dict of `torch.distributed.checkpoint.state_dict.get_state_dict`), only the model is
/// served, without the `model.` prefix; otherwise every tensor under its full name.
pub(crate) fn open_dcp(dir: &Path) -> Result<Checkpoint> {
    let md_path = dir.join(".metadata");
    let md = SourceFile::open(&md_path)?;
    let mut index = crate::pytorch::dcp::read_metadata(&md_path, md.bytes())?;
    let mut notes = Vec::new();
    let top = |n: &str| n.split('.').next().unwrap_or("").to_string();
    let has_model = index.tensors.iter().any(|t| top(&t.name) == "model");
    let others: std::collections::BTreeSet<String> =
        index.tensors.iter().map(|t| top(&t.name)).chain(index.values.iter().map(|v| top(v))).filter(|t| t != "model").collect();
    let mut strip = "";
    if has_model && !others.is_empty() {
        let before = index.tensors.len();
        index.tensors.retain(|t| top(&t.name) == "model");
        let skipped_values = index.values.iter().filter(|v| top(v) != "model").count();
        notes.push(format!(
            "serving the 'model' subtree ({} tensors) without its prefix; skipped {} tensors and {skipped_values} values under {}",
            index.tensors.len(),
            before - index.tensors.len(),
            others.iter().map(|o| format!("'{}'", clean(o))).collect::<Vec<_>>().join(", ")
        ));
        strip = "model.";
    }
    if !index.values.is_empty() && strip.is_empty() {
        notes.push(format!("{} non-tensor values (torch.save'd Python objects) not read", index.values.len()));
    }
    let mut files = index.files.iter().map(|f| SourceFile::open(&dir.join(f))).collect::<Result<Vec<_>>>()?;
    let views: Vec<(&Path, &[u8])> = files.iter().map(|f| (f.path.as_path(), f.bytes())).collect();
    let located = crate::pytorch::dcp::locate(&index, &views)?;
    let chunked: u64 = located.iter().filter(|t| t.whole().is_none()).map(|t| t.bytes()).sum();
    let spill = if chunked > 0 {
        let (file, p) = scratch()?;
        let offsets = crate::pytorch::dcp::consolidate(&located, &views, &file, &p, &|f, o, l| files[f].release(o, l))?;
        let n = offsets.iter().filter(|o| o.is_some()).count();
        notes.push(format!("{n} tensors are split into chunks (shards); copied once into a temporary file ({chunked} bytes)"));
        Some((file, offsets))
    } else {
        None
    };
    drop(views);
    let spill_index = files.len();
    let mut tensors = Vec::with_capacity(located.len());
    for (i, t) in located.into_iter().enumerate() {
        let (file, offset, len) = match (t.whole(), &spill) {
            (Some(w), _) => w,
            (None, Some((_, offs))) => (spill_index, offs[i].expect("consolidated"), t.bytes()),
            (None, None) => unreachable!("chunked tensors are consolidated"),
        };
        let name = t.name.strip_prefix(strip).unwrap_or(&t.name).to_string();
        tensors.push(TensorEntry { name, encoding: Encoding::Dense(t.dtype), shape: t.shape, file, offset, len });
    }
    if let Some((file, _)) = spill {
        files.push(SourceFile::from_file(&dir.join("(shards consolidated in a temporary file)"), file)?);
    }
    let values = index.version.map(|v| vec![("version".to_string(), format!("'{}'", clean(&v)))]).unwrap_or_default();
    if files.is_empty() {
        return Err(Error::malformed(&md_path, "the checkpoint has no data files"));
    }
    Ok(Checkpoint {
        path: dir.to_path_buf(),
        format: Format::Dcp,
        files,
        tensors,
        metadata: Vec::new(),
        index: None,
        config: None,
        gguf: None,
        pytorch: Some(crate::pytorch::Info { container: "torch.distributed.checkpoint".into(), values, notes }),
    })
}
