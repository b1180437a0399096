//! `phasekit._native`: the Rust side of the Python package. The Python modules in
//! `python/phasekit/` are the public API; this module gives them the phasekit library:
//! routed checkpoints ([`MoeCheckpoint`]), tensors as buffers viewed without a copy, `inspect`,
//! `convert`, `verify`, layout renames and the trainer's noise generator.
//!
//! **Zero copy.** [`Mapping`] maps every file of a checkpoint copy-on-write
//! (`MAP_PRIVATE | MAP_NORESERVE`) and hands out [`Buffer`]s, which numpy views through the
//! array interface protocol (`__array_interface__`; the buffer protocol is not in the stable ABI
//! before Python 3.11, and this is one abi3 wheel for 3.9+). An array keeps its buffer, and so
//! the map, alive. The arrays are writable: a write copies that page into the process and never
//! reaches the file, and since each [`Moe::mapping`] call makes new maps, tensors of different
//! `state_dict()` calls never share pages. Decoded values (bf16 or fp8 for numpy, merged LoRA
//! experts) are new buffers owned by Rust.
//!
//! **Errors.** Every phasekit error becomes the exception class of its kind
//! (`phasekit.errors`, one class per CLI exit code), with `path`, `kind` and `exit_code`.

use std::path::PathBuf;
use std::sync::Arc;

use memmap2::{MmapMut, MmapOptions};
use pyo3::exceptions::{PyIndexError, PyKeyError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use phasekit::dtype::DType;
use phasekit::layout::{Layout, Registry};
use phasekit::moe::format::lora_part;
use phasekit::moe::routing::ExpertKind;
use phasekit::moe::MoeCheckpoint;
use phasekit::{Error, Kind};

/// A phasekit error as the exception of its kind (`phasekit.errors`).
fn to_py(e: Error) -> PyErr {
    Python::attach(|py| {
        let make = || -> PyResult<PyErr> {
            let m = py.import("phasekit.errors")?;
            let path = e.path().map(|p| p.display().to_string());
            let exc = m.getattr("_from_native")?.call1((e.kind().as_str(), e.message(), path, e.exit_code()))?;
            Ok(PyErr::from_value(exc))
        };
        make().unwrap_or_else(|x| x)
    })
}

trait OrPy<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> OrPy<T> for phasekit::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}

fn json<T: serde::Serialize>(v: &T) -> PyResult<String> {
    serde_json::to_string(v).map_err(|e| to_py(Error::internal(e.to_string())))
}

/// The numpy type string of a dtype's values, or of its raw bits when numpy has no such type
/// (bf16 and the fp8 kinds as unsigned integers of their width; sub-byte and unknown types as
/// bytes). The second value says whether it is raw bits.
fn typestr(d: DType) -> (String, bool) {
    let (s, raw) = match d {
        DType::Bool => ("|b1", false),
        DType::U8 => ("|u1", false),
        DType::I8 => ("|i1", false),
        DType::I16 => ("<i2", false),
        DType::U16 => ("<u2", false),
        DType::F16 => ("<f2", false),
        DType::I32 => ("<i4", false),
        DType::U32 => ("<u4", false),
        DType::F32 => ("<f4", false),
        DType::F64 => ("<f8", false),
        DType::I64 => ("<i8", false),
        DType::U64 => ("<u8", false),
        DType::C64 => ("<c8", false),
        DType::BF16 => ("<u2", true),
        DType::F8E5M2 | DType::F8E4M3 | DType::F8E8M0 | DType::F8E4M3Fnuz | DType::F8E5M2Fnuz => ("|u1", true),
        DType::F4 | DType::F6E2M3 | DType::F6E3M2 | DType::Opaque(..) => ("|u1", true),
    };
    (s.to_string(), raw)
}

/// The bytes behind a [`Buffer`].
enum Data {
    /// `len` bytes at `offset` in file `file` of a copy-on-write mapping.
    Mapped { maps: Arc<CowMaps>, file: usize, offset: usize, len: usize },
    /// Bytes Rust decoded (in u64 words, so that any element type is aligned).
    Owned { words: Vec<u64>, len: usize },
}

/// Private, writable maps of a checkpoint's files.
struct CowMaps {
    /// Held only to keep the maps alive (dropping them unmaps the files).
    _maps: Vec<Option<MmapMut>>,
    /// Start address of each map, taken when it was made (numpy writes through it, Rust never
    /// reads or writes these bytes through a reference after that).
    starts: Vec<usize>,
}

// SAFETY: the maps are only ever accessed through raw addresses handed to Python, which
// serialises access under its own rules; Rust keeps them only to unmap them on drop.
unsafe impl Send for CowMaps {}
unsafe impl Sync for CowMaps {}

/// One tensor's bytes, viewed by numpy through `__array_interface__`.
#[pyclass(frozen, module = "phasekit._native")]
struct Buffer {
    data: Data,
    /// The numpy type string of the exposed elements.
    #[pyo3(get)]
    typestr: String,
    #[pyo3(get)]
    shape: Vec<u64>,
    /// The safetensors dtype of the values (`BF16`, `F32`, ...).
    #[pyo3(get)]
    dtype: String,
    /// Whether the elements are the raw bits of `dtype` (bf16, fp8) rather than its values.
    #[pyo3(get)]
    raw: bool,
    /// Whether the bytes are the file's (through the map) rather than a decoded copy.
    #[pyo3(get)]
    mapped: bool,
}

impl Buffer {
    fn owned_f32(values: Vec<f32>, shape: Vec<u64>) -> Buffer {
        let len = values.len() * 4;
        let mut words = vec![0u64; len.div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..len].copy_from_slice(bytemuck::cast_slice(&values));
        Buffer { data: Data::Owned { words, len }, typestr: "<f4".into(), shape, dtype: "F32".into(), raw: false, mapped: false }
    }

    fn address(&self) -> usize {
        match &self.data {
            Data::Mapped { maps, file, offset, .. } => maps.starts[*file] + offset,
            Data::Owned { words, .. } => words.as_ptr() as usize,
        }
    }
}

#[pymethods]
impl Buffer {
    /// numpy's array interface (version 3): a writable view of the bytes.
    #[getter]
    fn __array_interface__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let len = match &self.data {
            Data::Mapped { len, .. } | Data::Owned { len, .. } => *len,
        };
        // A zero-length view still needs a valid, non-null address.
        let addr = if len == 0 { self.address().max(1) } else { self.address() };
        d.set_item("version", 3)?;
        d.set_item("shape", PyTuple::new(py, &self.shape)?)?;
        d.set_item("typestr", &self.typestr)?;
        d.set_item("data", (addr, false))?;
        d.set_item("strides", py.None())?;
        Ok(d)
    }

    /// Number of bytes.
    #[getter]
    fn nbytes(&self) -> usize {
        match &self.data {
            Data::Mapped { len, .. } | Data::Owned { len, .. } => *len,
        }
    }
}

/// An opened routed checkpoint (`phasekit.moe/1` or `/2`, one file or a sharded set).
#[pyclass(frozen, module = "phasekit._native")]
struct Moe {
    inner: Arc<MoeCheckpoint>,
}

impl Moe {
    fn expert(&self, i: usize) -> PyResult<usize> {
        if i < self.inner.num_experts() {
            Ok(i)
        } else {
            Err(PyIndexError::new_err(format!("expert {i} out of range: the checkpoint has {} experts", self.inner.num_experts())))
        }
    }

    /// The family's rename of `name` from the stored layout to `to`.
    fn rename_one(&self, name: &str, to: Layout) -> phasekit::Result<String> {
        let model = &self.inner.meta().model;
        let (Some(family), Some(from)) = (model.family.as_deref(), model.layout.as_deref()) else {
            return Err(Error::unsupported(format!(
                "this checkpoint's model is no layout family ({}): its names have no {to} form",
                model.kind.as_deref().or(model.family.as_deref()).unwrap_or("unknown")
            )));
        };
        let from: Layout = from.parse()?;
        let fam = Registry::try_builtin()?.require(family)?;
        match lora_part(name) {
            Some((target, part)) => {
                let w = fam.rename(from, to, &format!("{target}.weight"))?;
                let t = w.strip_suffix(".weight").unwrap_or(&w);
                Ok(format!("{t}{}", part.suffix()))
            }
            None => fam.rename(from, to, name),
        }
    }
}

#[pymethods]
impl Moe {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Moe> {
        let m = py.detach(|| MoeCheckpoint::open(&path)).py()?;
        Ok(Moe { inner: Arc::new(m) })
    }

    #[getter]
    fn path(&self) -> String {
        self.inner.checkpoint().path.display().to_string()
    }

    /// The files of the checkpoint (shards in order).
    #[getter]
    fn files(&self) -> Vec<String> {
        self.inner.checkpoint().files.iter().map(|f| f.path.display().to_string()).collect()
    }

    /// `__metadata__` as (key, value) pairs, in file order.
    #[getter]
    fn metadata(&self) -> Vec<(String, String)> {
        self.inner.checkpoint().metadata.clone()
    }

    #[getter]
    fn routing_json(&self) -> PyResult<String> {
        json(self.inner.routing())
    }

    #[getter]
    fn model_json(&self) -> PyResult<String> {
        json(&self.inner.meta().model)
    }

    #[getter]
    fn provenance_json(&self) -> PyResult<String> {
        json(&self.inner.meta().provenance)
    }

    #[getter]
    fn digest(&self) -> String {
        self.inner.meta().digest.clone()
    }

    #[getter]
    fn format_tag(&self) -> &'static str {
        self.inner.meta().tag()
    }

    /// The expert whose σ range holds `sigma` (None outside [0, 1]).
    fn expert_for_sigma(&self, sigma: f64) -> Option<usize> {
        self.inner.expert_for_sigma(sigma)
    }

    /// `full` or `lora`.
    fn kind(&self, i: usize) -> PyResult<&'static str> {
        Ok(self.inner.kind(self.expert(i)?).as_str())
    }

    /// The base a LoRA expert applies to (0: `base.`, j: `bases.<j>.`); None for a full expert.
    fn base_index(&self, i: usize) -> PyResult<Option<usize>> {
        let i = self.expert(i)?;
        Ok((self.inner.kind(i) == ExpertKind::Lora).then(|| self.inner.expert_base(i)))
    }

    /// Expert `i`'s own tensors (a LoRA expert's LoRA tensors): (param, stored name), sorted.
    fn expert_params(&self, i: usize) -> PyResult<Vec<(String, String)>> {
        Ok(self.inner.expert_params(self.expert(i)?).into_iter().collect())
    }

    /// The tensors of the base a LoRA expert applies to: (param, stored name), sorted.
    fn base_params(&self, i: usize) -> PyResult<Vec<(String, String)>> {
        let i = self.expert(i)?;
        if self.inner.kind(i) != ExpertKind::Lora {
            return Ok(Vec::new());
        }
        Ok(self.inner.base_params(i).into_iter().collect())
    }

    /// The base params a LoRA expert changes (those with a `lora_down`/`lora_up` pair).
    fn lora_targets(&self, i: usize) -> PyResult<Vec<String>> {
        let i = self.expert(i)?;
        let mut v: Vec<String> = self
            .inner
            .expert_params(i)
            .keys()
            .filter_map(|p| match lora_part(p) {
                Some((t, phasekit::moe::format::LoraPart::Down)) => Some(format!("{t}.weight")),
                _ => None,
            })
            .collect();
        v.sort();
        Ok(v)
    }

    /// (dtype, shape) of a stored tensor.
    fn tensor_info(&self, stored: &str) -> PyResult<(String, Vec<u64>)> {
        let t = self.inner.raw(stored).py()?;
        Ok((t.dtype.as_str().to_string(), t.shape.to_vec()))
    }

    /// New copy-on-write maps of the checkpoint's files, to view tensors from.
    fn mapping(&self, py: Python<'_>) -> PyResult<Mapping> {
        let ck = self.inner.checkpoint();
        let mut maps = Vec::new();
        let mut starts = Vec::new();
        for f in &ck.files {
            if f.len == 0 {
                maps.push(None);
                starts.push(0);
                continue;
            }
            // SAFETY: a private mapping: our writes never reach the file. As with every memory
            // map (and the library's own read-only ones), another process rewriting the file
            // while it is mapped is undefined behaviour; checkpoints are not edited in place.
            let mut m = py
                .detach(|| unsafe { MmapOptions::new().no_reserve_swap().map_copy(f.file()) })
                .map_err(|e| to_py(Error::io(&f.path, e)))?;
            starts.push(m.as_mut_ptr() as usize);
            maps.push(Some(m));
        }
        Ok(Mapping { moe: self.inner.clone(), maps: Arc::new(CowMaps { _maps: maps, starts }) })
    }

    /// A float tensor's values as f32 (a copy), e.g. bf16 for numpy.
    fn decode_f32(&self, py: Python<'_>, stored: &str) -> PyResult<Buffer> {
        let t = self.inner.raw(stored).py()?;
        let shape = t.shape.to_vec();
        let v = py.detach(|| phasekit::moe::loader::decode(&t)).py()?;
        Ok(Buffer::owned_f32(v, shape))
    }

    /// Expert `i`'s weight `param` as f32 with its LoRA (if any) merged: (alpha/rank)·up·down
    /// added to its base's weight, in f32.
    fn merged_f32(&self, py: Python<'_>, i: usize, param: &str) -> PyResult<Buffer> {
        let i = self.expert(i)?;
        let (shape, v) = py.detach(|| self.inner.weight_f32(i, param, true)).py()?;
        Ok(Buffer::owned_f32(v, shape))
    }

    /// Check the checkpoint: structure, digest, routing, every tensor's sha256. Returns the
    /// report as JSON and the exit class of the first failure (None when it verifies).
    fn verify(&self, py: Python<'_>) -> PyResult<(String, Option<&'static str>, Option<String>)> {
        let ck = self.inner.checkpoint();
        let r = py.detach(|| phasekit::moe::verify::verify_checkpoint(ck));
        let first = r.faults.first().map(|f| f.message.clone()).or_else(|| {
            r.mismatches.first().map(|m| format!("tensor '{}': sha256 {} does not match the recorded {}", m.tensor, m.found, m.expected))
        });
        Ok((json(&r)?, r.failure().map(Kind::as_str), first))
    }

    /// `name` (a param of this checkpoint) in layout `to` (`original`, `diffusers`, `comfy`).
    fn rename(&self, name: &str, to: &str) -> PyResult<String> {
        let to: Layout = to.parse().py()?;
        self.rename_one(name, to).py()
    }

    /// The layout the params are stored in (None for models that are no layout family).
    #[getter]
    fn layout(&self) -> Option<String> {
        self.inner.meta().model.layout.clone()
    }
}

/// Copy-on-write maps of one checkpoint; views of its tensors share them.
#[pyclass(frozen, module = "phasekit._native")]
struct Mapping {
    moe: Arc<MoeCheckpoint>,
    maps: Arc<CowMaps>,
}

#[pymethods]
impl Mapping {
    /// The stored tensor `stored`, without a copy (a copy only when its bytes are not aligned
    /// to its element size, which phasekit's own files never are).
    fn view(&self, stored: &str) -> PyResult<Buffer> {
        let ck = self.moe.checkpoint();
        let t = ck.get(stored).ok_or_else(|| PyKeyError::new_err(format!("tensor '{stored}' is not in the checkpoint")))?;
        let dtype = match t.encoding {
            phasekit::store::Encoding::Dense(d) => d,
            phasekit::store::Encoding::Ggml(_) => DType::U8,
        };
        let (typestr, raw) = typestr(dtype);
        let item = dtype.size().unwrap_or(1).max(1);
        let (shape, typestr) = if dtype.size().is_none() { (vec![t.len], "|u1".to_string()) } else { (t.shape.clone(), typestr) };
        let start = self.maps.starts[t.file] + t.offset as usize;
        let data = if start % item == 0 {
            Data::Mapped { maps: self.maps.clone(), file: t.file, offset: t.offset as usize, len: t.len as usize }
        } else {
            let bytes = ck.bytes(t);
            let mut words = vec![0u64; bytes.len().div_ceil(8)];
            bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
            Data::Owned { words, len: bytes.len() }
        };
        let mapped = matches!(data, Data::Mapped { .. });
        Ok(Buffer { data, typestr, shape, dtype: dtype.as_str().to_string(), raw, mapped })
    }
}

/// `inspect(path)`: the report of every model under `path`, as JSON (a list).
#[pyfunction]
fn inspect(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    let r = py.detach(|| phasekit::inspect::inspect(&path)).py()?;
    json(&r)
}

/// `verify(path)`: the report as JSON and the first failure as (kind, message), if any.
#[pyfunction]
fn verify(py: Python<'_>, path: PathBuf) -> PyResult<(String, Option<(&'static str, String)>)> {
    let r = py.detach(|| phasekit::verify::verify(&path, true)).py()?;
    let fail = r.error().map(|e| (e.kind().as_str(), e.message().to_string()));
    Ok((json(&r)?, fail))
}

/// `convert(input, output, ...)`: the report as JSON.
#[pyfunction]
#[pyo3(signature = (input, output, layout=None, dtype=None, format=None, quant=None, shard_size=None, sha256=false, force=false, keep_metadata=true))]
#[allow(clippy::too_many_arguments)]
fn convert(
    py: Python<'_>,
    input: PathBuf,
    output: PathBuf,
    layout: Option<&str>,
    dtype: Option<&str>,
    format: Option<&str>,
    quant: Option<&str>,
    shard_size: Option<&str>,
    sha256: bool,
    force: bool,
    keep_metadata: bool,
) -> PyResult<String> {
    use phasekit::convert::{DTypeChoice, Options, OutFormat};
    let usage = |m: String| to_py(Error::usage(m));
    let format = match format {
        Some("gguf") => OutFormat::Gguf,
        Some("safetensors") => OutFormat::Safetensors,
        Some(f) => return Err(usage(format!("format '{f}': expected 'safetensors' or 'gguf'"))),
        None if output.extension().is_some_and(|e| e == "gguf") => OutFormat::Gguf,
        None => OutFormat::Safetensors,
    };
    let dtype = match dtype.unwrap_or("keep") {
        "keep" => DTypeChoice::Keep,
        "bf16" | "bfloat16" => DTypeChoice::To(DType::BF16),
        "f16" | "float16" => DTypeChoice::To(DType::F16),
        "f32" | "float32" => DTypeChoice::To(DType::F32),
        "fp8-e4m3" => DTypeChoice::To(DType::F8E4M3),
        "fp8-e5m2" => DTypeChoice::To(DType::F8E5M2),
        d => return Err(usage(format!("dtype '{d}': expected keep, bf16, f16, f32, fp8-e4m3 or fp8-e5m2"))),
    };
    let quant = match quant {
        Some(q) => Some(phasekit::quant::GgmlType::parse(q).ok_or_else(|| usage(format!("unknown GGUF type '{q}'")))?),
        None => None,
    };
    if quant.is_some() && format != OutFormat::Gguf {
        return Err(usage("quant applies to GGUF output (format='gguf' or an output named *.gguf)".into()));
    }
    let opts = Options {
        layout: layout.map(str::parse).transpose().py()?,
        dtype,
        format,
        quant,
        shard_size: shard_size.map(phasekit::cli::args::parse_size).transpose().py()?,
        keep_metadata,
        sha256,
        force,
        quiet: true,
        ..Options::default()
    };
    let r = py.detach(|| phasekit::convert::convert(&input, &output, &opts)).py()?;
    json(&r)
}

/// The trainer's standard-normal noise: `count` f32 values from `seed`, exactly the numbers
/// `phasekit sample --seed SEED` starts from (its latents `[n, ...]` are these, row-major).
#[pyfunction]
fn noise(py: Python<'_>, seed: u64, count: usize) -> Buffer {
    let v = py.detach(|| phasekit::rng::Rng::new(seed).normals_f32(count));
    Buffer::owned_f32(v, vec![count as u64])
}

/// `phasekit sample --moe`: `n` samples of a routed checkpoint (toy points `[n, d]`, or latents of a
/// Wan2.2 / Qwen-Image checkpoint with the prompt embeddings `cond`), each step by the expert
/// whose σ range holds its σ, from the noise of `seed`. f32, computed on the CPU.
#[pyfunction]
#[pyo3(signature = (path, n, steps=None, seed=0, class_=None, cond=None, cond_seed=0, latent=None))]
#[allow(clippy::too_many_arguments)]
fn sample(
    py: Python<'_>,
    path: PathBuf,
    n: usize,
    steps: Option<usize>,
    seed: u64,
    class_: Option<u32>,
    cond: Option<String>,
    cond_seed: u64,
    latent: Option<[Option<usize>; 3]>,
) -> PyResult<Buffer> {
    use phasekit::train::transformer::data::Embeddings;
    if n == 0 || steps == Some(0) {
        return Err(to_py(Error::usage("n and steps must be at least 1")));
    }
    let x = py
        .detach(|| -> phasekit::Result<candle_core::Tensor> {
            let m = MoeCheckpoint::open(&path)?;
            if m.meta().model.kind.as_deref() == Some(phasekit::moe::format::KIND_TOY_MLP) {
                if cond.is_some() || latent.is_some() {
                    return Err(Error::usage("cond and latent are for Wan2.2 and Qwen-Image checkpoints, not the toy"));
                }
                let toy = phasekit::train::toy::sample::LoadedMoe::open(&path)?;
                if let Some(c) = class_.filter(|c| *c as usize >= toy.mixture.classes) {
                    return Err(Error::usage(format!("class {c}: the model has {} classes", toy.mixture.classes)));
                }
                return toy.sample(n, steps, seed, class_);
            }
            if class_.is_some() {
                return Err(Error::usage("class is for the toy; a transformer samples prompt i mod N"));
            }
            let dev = candle_core::Device::Cpu;
            let r = phasekit::train::transformer::sample::RoutedTransformer::open(&path, candle_core::DType::F32, &dev)?;
            let cond = cond.ok_or_else(|| {
                Error::usage("a transformer checkpoint needs cond: a safetensors file with prompt_embeds [N, L, C], or random:N")
            })?;
            let geo = r.geometry(latent.unwrap_or([None; 3]))?;
            let emb = Embeddings::load(&cond, &r.experts[0], &[geo.latent], None, cond_seed, &dev)?;
            r.sample(n, steps, seed, &geo, &emb)
        })
        .py()?;
    let shape = x.dims().iter().map(|d| *d as u64).collect();
    let v = x.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| to_py(Error::internal(e.to_string())))?;
    Ok(Buffer::owned_f32(v, shape))
}

/// Every error kind with its exit code (the tests compare them with `phasekit.errors`).
#[pyfunction]
fn kinds() -> Vec<(&'static str, i32)> {
    // A match on every variant, so that a new kind fails to compile here until it is listed.
    let all = |k: Kind| match k {
        Kind::Internal | Kind::Usage | Kind::Io | Kind::Truncated | Kind::Malformed => k,
        Kind::Inconsistent | Kind::Unsupported | Kind::Integrity | Kind::Limit => k,
    };
    [
        Kind::Internal,
        Kind::Usage,
        Kind::Io,
        Kind::Truncated,
        Kind::Malformed,
        Kind::Inconsistent,
        Kind::Unsupported,
        Kind::Integrity,
        Kind::Limit,
    ]
    .into_iter()
    .map(|k| (all(k).as_str(), k.exit_code()))
    .collect()
}

/// The phasekit library's version.
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Moe>()?;
    m.add_class::<Mapping>()?;
    m.add_class::<Buffer>()?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(verify, m)?)?;
    m.add_function(wrap_pyfunction!(convert, m)?)?;
    m.add_function(wrap_pyfunction!(noise, m)?)?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    m.add_function(wrap_pyfunction!(kinds, m)?)?;
    m.add_function(wrap_pyfunction!(sample, m)?)?;
    Ok(())
}
