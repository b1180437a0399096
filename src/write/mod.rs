//! write: the one safetensors writer (DESIGN decision 3). Every command that writes a safetensors
//! file goes through [`safetensors`] (or [`tensors`] for a small file): convert, assemble,
//! export, LoRA merge / extract / convert, forward, replicas, and the benches' inputs.
//!
//! 1. The caller describes every output tensor up front ([`Tensor`]): name, dtype, shape and
//!    where its bytes come from ([`Data`]): a byte range of a memory-mapped source, bytes in
//!    memory, or a producer the writer calls when it reaches the tensor (whole bytes, or bytes
//!    streamed into the [`Sink`] window by window). Nothing holds the whole file in memory.
//! 2. Tensors are split into shards like `huggingface_hub` ([`Options::shard_size`]).
//! 3. Per file, the header is planned from the descriptors first (`crate::safetensors::plan`), in
//!    the data order of [`Layout`]: the official writer's, or for large copies the source's order
//!    with page-congruent padding (`layout` module).
//! 4. Data streams into a temporary file (`crate::atomic`): runs of copies that are contiguous in
//!    one source go to the kernel as one `copy_file_range`, everything else through one 8 MiB
//!    buffer; durable outputs start their writeback as they go (`crate::writeback`). Every
//!    tensor's byte count is checked against its plan, and the file's length against the header.
//! 5. Optionally, the sha256 of every tensor is computed from the same bytes on the other cores
//!    while this thread writes ([`Options::tensor_hashes`]), and the header is then rewritten in
//!    place with metadata that holds them ([`Metadata::AfterHashes`]; same length). The sha256 of
//!    every file, for `<file>.sha256` sidecars, is computed while writing or read back while the
//!    fsync runs ([`FileHash`]).
//! 6. [`Output::commit`] fsyncs and renames every file into place, then writes the sidecars; an
//!    output dropped before that leaves nothing under the final names.
//!
//! ## Writing tensors one by one (the trainer's checkpoints)
//!
//! ```no_run
//! use phasekit::write::{self, Tensor};
//! use phasekit::DType;
//! # fn f32_bytes(v: &[f32]) -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() }
//! let weights: Vec<(String, Vec<u64>, Vec<f32>)> = vec![("w".into(), vec![2, 2], vec![1.0, 2.0, 3.0, 4.0])];
//! let tensors = weights
//!     .iter()
//!     // Each producer runs when the writer reaches its tensor: one tensor's bytes in memory at a time.
//!     .map(|(name, shape, v)| Tensor::computed(name.clone(), DType::F32, shape.clone(), move || Ok(f32_bytes(v))))
//!     .collect();
//! let metadata = vec![("format".to_string(), "pt".to_string())];
//! let bytes = write::tensors(std::path::Path::new("checkpoint.safetensors"), tensors, Some(&metadata))?;
//! # Ok::<(), phasekit::Error>(())
//! ```

mod layout;
mod shards;
mod sink;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

pub use layout::{CONGRUENCE, CONGRUENT_MIN_BYTES, MAX_PADDING};
pub use shards::{index_path, shard_name, split_shards};
pub use sink::{Sink, KERNEL_COPY_MIN};

use crate::atomic::AtomicFile;
use crate::dtype::DType;
use crate::error::{clean, Error, IoContext, Result};
use crate::progress::Progress;
use crate::store::SourceFile;
use layout::Item;

/// The weights file of a diffusers model folder.
pub const WEIGHTS_NAME: &str = "diffusion_pytorch_model.safetensors";

/// A producer that writes one tensor's bytes into the sink.
pub type Producer<'a> = dyn FnOnce(&mut Sink) -> Result<()> + 'a;

/// Where one output tensor's bytes come from.
pub enum Data<'a> {
    /// `len` bytes at `offset` of a memory-mapped source: copied by the kernel (runs of
    /// contiguous copies as one call) or from the map, then released from the page tables.
    Mapped { file: &'a SourceFile, offset: u64, len: u64 },
    /// Bytes already in memory.
    Bytes(Cow<'a, [u8]>),
    /// Bytes computed when the writer reaches the tensor (several at once on the thread pool
    /// when [`Options::tensor_hashes`] is on, so the producer must be `Send`).
    Computed(Box<dyn FnOnce() -> Result<Vec<u8>> + Send + 'a>),
    /// Bytes the producer writes into the sink itself, in as many pieces as it likes (a large
    /// tensor cast window by window). Not available with [`Options::tensor_hashes`].
    Streamed(Box<Producer<'a>>),
    /// All zeros (a hole in the file where it is long enough).
    Zeros,
}

/// One tensor of an output.
pub struct Tensor<'a> {
    pub name: String,
    pub dtype: DType,
    /// Row-major (torch) order.
    pub shape: Vec<u64>,
    pub data: Data<'a>,
    /// Where the bytes are read from: (source file number, byte offset). Layouts that keep a
    /// source's order sort by it (tensors without one go last).
    pub origin: Option<(usize, u64)>,
}

impl<'a> Tensor<'a> {
    pub fn new(name: impl Into<String>, dtype: DType, shape: Vec<u64>, data: Data<'a>) -> Self {
        Tensor { name: name.into(), dtype, shape, data, origin: None }
    }
    /// `len` bytes at `offset` of a mapped source, copied as they are; `source` numbers the file
    /// among the output's sources (layouts keep their order).
    pub fn mapped(
        name: impl Into<String>,
        dtype: DType,
        shape: Vec<u64>,
        source: usize,
        file: &'a SourceFile,
        offset: u64,
        len: u64,
    ) -> Self {
        Tensor::new(name, dtype, shape, Data::Mapped { file, offset, len }).at(source, offset)
    }
    /// Bytes computed when the writer reaches the tensor.
    pub fn computed(name: impl Into<String>, dtype: DType, shape: Vec<u64>, f: impl FnOnce() -> Result<Vec<u8>> + Send + 'a) -> Self {
        Tensor::new(name, dtype, shape, Data::Computed(Box::new(f)))
    }
    /// Bytes the producer writes into the sink.
    pub fn streamed(name: impl Into<String>, dtype: DType, shape: Vec<u64>, f: impl FnOnce(&mut Sink) -> Result<()> + 'a) -> Self {
        Tensor::new(name, dtype, shape, Data::Streamed(Box::new(f)))
    }
    /// Set where the bytes are read from (see [`Tensor::origin`]).
    pub fn at(mut self, source: usize, offset: u64) -> Self {
        self.origin = Some((source, offset));
        self
    }
    /// The data's size in bytes (shape × dtype).
    pub fn size(&self) -> Result<u64> {
        layout::planned(self).size()
    }
}

/// The data order of every file (see the `layout` module for why it matters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// The official writer's order: widest dtype first, then by name. For small files and files
    /// written from memory.
    Official,
    /// From [`CONGRUENT_MIN_BYTES`] of kernel copies on, the sources' order ([`Tensor::origin`])
    /// with the JSON header padded so that most copied bytes sit at their source offset modulo
    /// [`CONGRUENCE`]; the official order below. Conversions, whose copies come from one source.
    SourceOrder,
    /// From [`CONGRUENT_MIN_BYTES`] of copies on, computed tensors first, then the copies in
    /// source order with a zero U8 tensor `<prefix><k>` of under 64 KiB before each run of copies,
    /// so that every run lands at its source offset modulo [`CONGRUENCE`]; the official order
    /// below. MoE checkpoints, whose copies come from several sources.
    PaddingTensors { prefix: &'static str },
}

/// How the sha256 of every file (for `<file>.sha256` sidecars) is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileHash {
    None,
    /// By the sink, from the bytes it writes (copies then go through the buffer).
    WhileWriting,
    /// By reading each file back once it is complete, while its fsync runs (needed when the
    /// header is rewritten at the end).
    AfterWriting,
}

/// How [`safetensors`] writes.
#[derive(Debug, Clone)]
pub struct Options {
    pub layout: Layout,
    /// Shard the output: no file holds more than this many bytes of tensors (unless one tensor
    /// is larger); the files get the Hugging Face shard names and an index.
    pub shard_size: Option<u64>,
    /// fsync every file before renaming it into place (and start the writeback early).
    pub sync: bool,
    pub file_hash: FileHash,
    /// Compute the sha256 of every tensor's bytes ([`Output::hashes`]).
    pub tensor_hashes: bool,
    /// Entries added to a sharded output's index `metadata`, after `total_size`.
    pub index_metadata: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            layout: Layout::Official,
            shard_size: None,
            sync: true,
            file_hash: FileHash::None,
            tensor_hashes: false,
            index_metadata: Vec::new(),
        }
    }
}

/// Tensor name → hex sha256 of its bytes.
pub type Hashes = HashMap<String, String>;

/// The `__metadata__` of every file of an output.
pub enum Metadata<'m> {
    Fixed(Option<Vec<(String, String)>>),
    /// Called with no hashes to plan the headers, then with every tensor's hash once the data is
    /// written; the headers are rewritten in place, so both results must serialise to the same
    /// length (hashes as zero placeholders of their final length). Needs [`Options::tensor_hashes`]
    /// (and, for sidecars, [`FileHash::AfterWriting`]).
    AfterHashes(&'m mut dyn FnMut(&Hashes) -> Vec<(String, String)>),
}

/// One written file: its path (final name), length and sha256 when one was computed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Written {
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: Option<String>,
}

/// Files written under temporary names, to be committed.
#[must_use = "an output appears under its final name only when committed"]
pub struct Output {
    files: Vec<AtomicFile>,
    pub written: Vec<Written>,
    /// With [`Options::tensor_hashes`]: every tensor's sha256.
    pub hashes: Hashes,
    sidecars: bool,
}

impl Output {
    /// Files written elsewhere (a GGUF file) that commit the same way: `sidecars` writes
    /// `<file>.sha256` for every written file with a digest.
    pub fn new(files: Vec<AtomicFile>, written: Vec<Written>, sidecars: bool) -> Self {
        Output { files, written, hashes: Hashes::new(), sidecars }
    }

    /// Rename every file into place (fsynced unless the options said not to), then write the
    /// `<file>.sha256` sidecars.
    pub fn commit(self) -> Result<Vec<Written>> {
        for f in self.files {
            f.commit()?;
        }
        if self.sidecars {
            for w in &self.written {
                if let Some(h) = &w.sha256 {
                    crate::atomic::write_file(&crate::hash::sidecar_path(&w.path), crate::hash::sidecar_line(h, &w.path).as_bytes())?;
                }
            }
        }
        Ok(self.written)
    }
}

/// A new output file at `path` (written under a temporary name), fsynced on commit when `sync`.
pub fn create(path: &Path, sync: bool) -> Result<AtomicFile> {
    let f = AtomicFile::create(path)?;
    Ok(if sync { f } else { f.without_sync() })
}

/// Write a small safetensors file at `path` in the official order, atomically and durably;
/// returns its length. Each tensor's bytes are produced when the writer reaches it.
pub fn tensors(path: &Path, tensors: Vec<Tensor>, metadata: Option<&[(String, String)]>) -> Result<u64> {
    let out = safetensors(path, tensors, Metadata::Fixed(metadata.map(<[_]>::to_vec)), &Options::default(), &Progress::hidden())?;
    Ok(out.commit()?.iter().map(|w| w.bytes).sum())
}

/// Bytes of computed data materialised per batch when hashing tensors.
const BATCH_BYTES: u64 = 256 << 20;

/// Write `tensors` as a safetensors file at `path`, or as shards with an index when they exceed
/// [`Options::shard_size`]. Returns the files under temporary names: [`Output::commit`] puts them
/// in place.
pub fn safetensors<'a>(
    path: &Path,
    tensors: Vec<Tensor<'a>>,
    mut metadata: Metadata,
    opts: &Options,
    progress: &Progress,
) -> Result<Output> {
    if matches!(metadata, Metadata::AfterHashes(_)) && (!opts.tensor_hashes || opts.file_hash == FileHash::WhileWriting) {
        // The sink would hash the placeholder header, not the final one.
        return Err(Error::internal("metadata after hashes needs tensor hashes and a file hash after writing"));
    }
    let sizes: Vec<u64> = tensors.iter().map(Tensor::size).collect::<Result<_>>()?;
    let mut shards = match opts.shard_size {
        Some(max) => split_shards(&sizes, max),
        None => vec![(0..tensors.len()).collect()],
    };
    if shards.is_empty() {
        shards.push(Vec::new());
    }
    let paths: Vec<PathBuf> =
        if shards.len() == 1 { vec![path.to_path_buf()] } else { (0..shards.len()).map(|i| shard_name(path, i, shards.len())).collect() };
    let md0 = match &mut metadata {
        Metadata::Fixed(m) => m.clone(),
        Metadata::AfterHashes(f) => Some(f(&Hashes::new())),
    };
    // The producers, taken out one by one as the writer reaches their tensors; the descriptors
    // keep their mapped sources (the layout reads their offsets) and a placeholder otherwise.
    let mut data: Vec<Option<Data<'a>>> = Vec::with_capacity(tensors.len());
    let mut descs: Vec<Tensor<'a>> = Vec::with_capacity(tensors.len());
    for (mut t, &size) in tensors.into_iter().zip(&sizes) {
        let d = match t.data {
            Data::Mapped { len, .. } if len != size => return Err(size_mismatch(&t, len)),
            Data::Mapped { file, offset, len } => Data::Mapped { file, offset, len },
            _ => std::mem::replace(&mut t.data, Data::Zeros),
        };
        data.push(Some(d));
        descs.push(t);
    }
    let mut hashes = Hashes::new();
    let mut files = Vec::with_capacity(paths.len());
    let mut layouts = Vec::with_capacity(paths.len());
    let mut written = Vec::with_capacity(paths.len() + 1);
    for (shard, path) in shards.iter().zip(&paths) {
        let layout = layout::plan(&descs, shard, md0.as_deref(), &opts.layout)?;
        let header = layout.header(md0.as_deref())?;
        let mut f = create(path, opts.sync)?;
        let tmp = f.temp_path().to_path_buf();
        let digest = {
            let mut sink = Sink::new(f.file(), &tmp, opts.file_hash == FileHash::WhileWriting, progress).with_writeback(opts.sync);
            sink.write(&header.bytes)?;
            if opts.tensor_hashes {
                stream_hashed(&descs, &mut data, &layout.items, &mut sink, &mut hashes)?;
            } else {
                stream(&descs, &mut data, &layout.items, &mut sink)?;
            }
            sink.finish()?
        };
        let len = f.file().metadata().with_file(&tmp)?.len();
        if len != header.file_len() {
            return Err(Error::internal(format!("wrote {len} bytes, planned {}", header.file_len())).with_path(path));
        }
        written.push(Written { path: path.clone(), bytes: len, sha256: digest });
        files.push(f);
        layouts.push((layout, header.bytes.len()));
    }
    if let Metadata::AfterHashes(f) = &mut metadata {
        // The real header, same length, over the placeholder.
        let md = f(&hashes);
        for (file, (layout, hlen)) in files.iter_mut().zip(&layouts) {
            let header = layout.header(Some(&md))?;
            let tmp = file.temp_path().to_path_buf();
            if header.bytes.len() != *hlen {
                return Err(
                    Error::internal(format!("final header is {} bytes, planned {hlen}", header.bytes.len())).with_path(file.target())
                );
            }
            file.file().seek(SeekFrom::Start(0)).with_file(&tmp)?;
            file.file().write_all(&header.bytes).with_file(&tmp)?;
            file.file().flush().with_file(&tmp)?;
        }
    }
    if opts.file_hash == FileHash::AfterWriting {
        for (w, d) in written.iter_mut().zip(hash_files(&mut files, opts.sync)?) {
            w.sha256 = Some(d);
        }
    }
    if shards.len() > 1 {
        let file_name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mut weight_map = BTreeMap::new();
        for (s, p) in shards.iter().zip(&paths) {
            for &i in s {
                weight_map.insert(descs[i].name.clone(), file_name(p));
            }
        }
        let text = shards::index_text(sizes.iter().sum(), &opts.index_metadata, &weight_map);
        let ipath = index_path(path);
        let mut f = create(&ipath, opts.sync)?;
        f.write_all(text.as_bytes()).with_file(&ipath)?;
        files.push(f);
        let sha256 = (opts.file_hash != FileHash::None).then(|| crate::hash::sha256_hex(text.as_bytes()));
        written.push(Written { path: ipath, bytes: text.len() as u64, sha256 });
    }
    Ok(Output { files, written, hashes, sidecars: opts.file_hash != FileHash::None })
}

/// Read every file back for its sha256 while (with `sync`) another thread fsyncs them: the hash
/// reads from the page cache while the kernel writes the same pages to disk, so the two overlap
/// instead of adding up.
fn hash_files(files: &mut [AtomicFile], sync: bool) -> Result<Vec<String>> {
    let handles: Vec<(std::fs::File, PathBuf)> = if sync {
        files
            .iter_mut()
            .map(|f| Ok((f.file().try_clone().with_file(f.temp_path())?, f.temp_path().to_path_buf())))
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    std::thread::scope(|s| -> Result<Vec<String>> {
        let syncing = s.spawn(move || -> Result<()> {
            for (h, p) in &handles {
                h.sync_all().with_file(p)?;
            }
            Ok(())
        });
        let digests: Vec<Result<String>> = files.par_iter().map(|f| crate::hash::sha256_file(f.temp_path(), &|_| {})).collect();
        syncing.join().map_err(|_| Error::internal("fsync thread panicked"))??;
        digests.into_iter().collect()
    })
}

fn size_mismatch(t: &Tensor, got: u64) -> Error {
    Error::internal(format!("tensor '{}': produced {got} bytes, planned {}", clean(&t.name), t.size().unwrap_or(0)))
}

/// Stream a file's entries in order on this thread.
fn stream(descs: &[Tensor], data: &mut [Option<Data>], items: &[Item], sink: &mut Sink) -> Result<()> {
    let mapped = |k: usize| match items.get(k) {
        Some(&Item::T(i)) => match descs[i].data {
            Data::Mapped { file, offset, len } => Some((file as *const SourceFile as usize, offset, len)),
            _ => None,
        },
        _ => None,
    };
    let mut k = 0;
    while k < items.len() {
        let i = match items[k] {
            Item::Pad(n) => {
                sink.zeros(n)?;
                k += 1;
                continue;
            }
            Item::T(i) => i,
        };
        // Plain copies that follow each other in one source go to the kernel as one copy
        // (one copy_file_range per tensor measured up to 30 % slower on ext4).
        let (end, len) = if sink.hashing() { (k, 0) } else { layout::source_run(k, mapped) };
        if end > k + 1 && len >= KERNEL_COPY_MIN {
            let Data::Mapped { file, offset, .. } = descs[i].data else { unreachable!("a run starts with a copy") };
            sink.copy_from(file, offset, len)?;
            file.release(offset, len);
            for it in &items[k..end] {
                if let Item::T(j) = it {
                    data[*j] = None;
                }
            }
            k = end;
            continue;
        }
        let t = &descs[i];
        let size = t.size()?;
        match data[i].take().ok_or_else(|| Error::internal(format!("tensor '{}' written twice", clean(&t.name))))? {
            Data::Mapped { file, offset, len } => {
                sink.copy_from(file, offset, len)?;
                file.release(offset, len);
            }
            Data::Bytes(b) => {
                if b.len() as u64 != size {
                    return Err(size_mismatch(t, b.len() as u64));
                }
                sink.write(&b)?;
            }
            Data::Computed(f) => {
                let b = f()?;
                if b.len() as u64 != size {
                    return Err(size_mismatch(t, b.len() as u64));
                }
                sink.write(&b)?;
            }
            Data::Streamed(f) => {
                let at = sink.position();
                f(sink)?;
                if sink.position() - at != size {
                    return Err(size_mismatch(t, sink.position() - at));
                }
            }
            Data::Zeros => sink.zeros(size)?,
        }
        k += 1;
    }
    Ok(())
}

/// Stream a file's entries in batches: the batch's computed tensors are produced in parallel,
/// then this thread writes while the other cores hash the same bytes.
fn stream_hashed(descs: &[Tensor], data: &mut [Option<Data>], items: &[Item], sink: &mut Sink, hashes: &mut Hashes) -> Result<()> {
    let mut batch: Vec<usize> = Vec::new();
    let mut owned = 0u64;
    for it in items {
        let i = match *it {
            Item::T(i) => i,
            Item::Pad(n) => {
                hash_batch(descs, data, &batch, sink, hashes)?;
                batch.clear();
                owned = 0;
                sink.zeros(n)?;
                continue;
            }
        };
        if !matches!(descs[i].data, Data::Mapped { .. }) {
            owned += descs[i].size()?;
        }
        batch.push(i);
        if owned >= BATCH_BYTES || batch.len() >= 4096 {
            hash_batch(descs, data, &batch, sink, hashes)?;
            batch.clear();
            owned = 0;
        }
    }
    hash_batch(descs, data, &batch, sink, hashes)
}

/// A tensor's bytes on their way to being hashed and written.
enum Ready<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
    Compute(Box<dyn FnOnce() -> Result<Vec<u8>> + Send + 'a>),
}

/// Write a batch of tensors in order while hashing the same bytes on the other cores.
///
/// One thread (this one) writes; `threads − 1` others hash tensors, taking the next unhashed
/// one from a shared counter, and the writer joins them once its copies are issued. The writer
/// gets a core of its own: with hashing on every core (the rayon pool) the kernel copy shared its
/// core with a hasher and took almost twice `cp`'s time on 2 cores (docs/performance.md).
fn hash_batch<'a>(descs: &[Tensor], data: &mut [Option<Data<'a>>], batch: &[usize], sink: &mut Sink, hashes: &mut Hashes) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let mut ready = Vec::with_capacity(batch.len());
    for &i in batch {
        let t = &descs[i];
        let r = match data[i].take().ok_or_else(|| Error::internal(format!("tensor '{}' written twice", clean(&t.name))))? {
            Data::Mapped { file, offset, len } => Ready::Borrowed(&file.bytes()[offset as usize..(offset + len) as usize]),
            Data::Bytes(Cow::Borrowed(b)) => Ready::Borrowed(b),
            Data::Bytes(Cow::Owned(b)) => Ready::Owned(b),
            Data::Computed(f) => Ready::Compute(f),
            Data::Zeros => Ready::Owned(vec![0; t.size()? as usize]),
            Data::Streamed(_) => {
                return Err(Error::internal(format!("tensor '{}': streamed tensors cannot be hashed one by one", clean(&t.name))))
            }
        };
        ready.push(r);
    }
    let bufs: Vec<Cow<[u8]>> = ready
        .into_par_iter()
        .map(|r| match r {
            Ready::Borrowed(b) => Ok(Cow::Borrowed(b)),
            Ready::Owned(b) => Ok(Cow::Owned(b)),
            Ready::Compute(f) => f().map(Cow::Owned),
        })
        .collect::<Result<_>>()?;
    for (&i, b) in batch.iter().zip(&bufs) {
        if b.len() as u64 != descs[i].size()? {
            return Err(size_mismatch(&descs[i], b.len() as u64));
        }
    }
    let digests: Vec<std::sync::OnceLock<String>> = bufs.iter().map(|_| std::sync::OnceLock::new()).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let hash_rest = || loop {
        let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(b) = bufs.get(k) else { break };
        let _ = digests[k].set(crate::hash::sha256_hex(b));
    };
    let hashers = rayon::current_num_threads().saturating_sub(1).clamp(1, bufs.len());
    let mapped = |k: usize| match batch.get(k).map(|&i| &descs[i].data) {
        Some(&Data::Mapped { file, offset, len }) => Some((file, offset, len)),
        _ => None,
    };
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..hashers).map(|_| s.spawn(hash_rest)).collect();
        let mut k = 0;
        let written = (|| -> Result<()> {
            while k < batch.len() {
                let Some((file, offset, _)) = mapped(k) else {
                    sink.write(&bufs[k])?;
                    k += 1;
                    continue;
                };
                // Plain copies that follow each other in one source go to the kernel as one copy.
                let (end, len) = layout::source_run(k, |m| mapped(m).map(|(f, o, l)| (f as *const SourceFile as usize, o, l)));
                sink.copy_from(file, offset, len)?;
                k = end;
            }
            Ok(())
        })();
        if written.is_err() {
            // Stop the hashers early: nothing they compute will be used.
            next.store(usize::MAX / 2, std::sync::atomic::Ordering::Relaxed);
        } else {
            hash_rest();
        }
        for w in workers {
            w.join().map_err(|_| Error::internal("hashing thread panicked"))?;
        }
        written
    })?;
    for (k, (&i, d)) in batch.iter().zip(digests).enumerate() {
        // The writer hashed whatever the workers had not taken before joining them.
        hashes.insert(descs[i].name.clone(), d.into_inner().expect("every tensor hashed"));
        if let Some((file, offset, len)) = mapped(k) {
            file.release(offset, len);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
