//! The conversion pipeline: read → map → write, streaming from the memory map.
//!
//! 1. [`plan`] decides, per input tensor, its output name (layout rules), encoding (dtype cast,
//!    fp8 with scale, GGUF quant type) and the operation that produces its bytes.
//! 2. [`write_safetensors`] hands the plan to the one safetensors writer (`crate::write`): plain
//!    copies as mapped ranges (runs of them go to `copy_file_range`, skipping holes like `cp`),
//!    casts and quantisation as producers that run on all cores in bounded windows.
//!    [`write_gguf`] streams through the same sink. Memory is bounded by the window size,
//!    whatever the checkpoint's size.
//!
//! [`output_policy`] is the command line's policy (container from the extension, GGUF defaults).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::atomic::AtomicDir;
use crate::cast;
use crate::dtype::{self, DType};
use crate::error::{clean, Error, IoContext, Kind, Result};
use crate::layout::{Detection, Family, Layout, Registry};
use crate::progress::Progress;
use crate::quant::{self, GgmlType};
use crate::store::{Checkpoint, Encoding, TensorEntry, INPUT_SCALE_SUFFIXES, SCALED_FP8_MARKER, SCALE_SUFFIXES};
use crate::write::{self, Sink, Written, WEIGHTS_NAME};

/// How fp8 outputs record their per-tensor scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fp8Scale {
    /// ComfyUI "scaled fp8": `<layer>.scale_weight` (F32 scalar) plus a `scaled_fp8` marker.
    Comfy,
    /// `<layer>.weight_scale` (F32 scalar), as diffusers-style and comfy_quant checkpoints.
    WeightScale,
    /// Plain downcast with no scale (values above the fp8 range saturate).
    None,
}

/// Requested output dtype for floating-point tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DTypeChoice {
    Keep,
    To(DType),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutFormat {
    Safetensors,
    Gguf,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub layout: Option<Layout>,
    pub dtype: DTypeChoice,
    pub format: OutFormat,
    pub quant: Option<GgmlType>,
    pub shard_size: Option<u64>,
    pub fp8_scale: Fp8Scale,
    /// Add `model.diffusion_model.` to every name (ComfyUI checkpoints).
    pub comfy_prefix: bool,
    pub keep_metadata: bool,
    pub sha256: bool,
    pub force: bool,
    pub quiet: bool,
    /// fsync every output before renaming it into place (default).
    pub sync: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            layout: None,
            dtype: DTypeChoice::Keep,
            format: OutFormat::Safetensors,
            quant: None,
            shard_size: None,
            fp8_scale: Fp8Scale::Comfy,
            comfy_prefix: false,
            keep_metadata: true,
            sha256: false,
            force: false,
            quiet: true,
            sync: true,
        }
    }
}

/// How one output tensor's bytes are produced.
#[derive(Debug, Clone)]
pub enum Op {
    /// The input bytes unchanged.
    Copy { src: usize },
    /// Decode the input (dense with a scale, or ggml blocks) to f32 and encode it.
    Transcode { src: usize, scale: f32 },
    /// Bytes computed during planning (fp8 scales, markers).
    Literal(Vec<u8>),
}

/// One tensor of the output.
#[derive(Debug, Clone)]
pub struct OutTensor {
    pub name: String,
    pub encoding: Encoding,
    pub shape: Vec<u64>,
    pub op: Op,
}

impl OutTensor {
    pub fn size(&self) -> Result<u64> {
        let n = dtype::numel(&self.shape).ok_or_else(|| Error::unsupported(format!("tensor '{}': shape overflows", self.name)))?;
        match self.encoding {
            Encoding::Dense(d) => d.byte_size(n),
            Encoding::Ggml(g) => g.byte_size(self.shape.last().copied().unwrap_or(1), n),
        }
        .ok_or_else(|| Error::unsupported(format!("tensor '{}': {:?} cannot be stored as {}", self.name, self.shape, self.encoding.name())))
    }
}

/// The full plan of a conversion.
pub struct Plan {
    pub tensors: Vec<OutTensor>,
    pub detection: Option<Detection>,
    pub from_layout: Option<Layout>,
    pub to_layout: Option<Layout>,
    pub config: Option<serde_json::Value>,
    pub metadata: Vec<(String, String)>,
    pub notes: Vec<String>,
}

fn family_of(d: &Option<Detection>) -> Option<&'static Family> {
    d.as_ref().and_then(|d| Registry::builtin().family(&d.family))
}

/// The output policy of `convert`, from what was asked: the container follows OUT's extension
/// (`.gguf`) unless `format` names one; `quant` applies to GGUF only and `sharded` to safetensors
/// only; a GGUF output without `quant` takes its tensor type from `dtype` (F32, F16 or BF16; the
/// fp8 types have no GGUF counterpart) or, with `keep`, from the input (see [`plan`]). Returns the
/// format, dtype and quant of [`Options`].
pub fn output_policy(
    out: &Path,
    format: Option<OutFormat>,
    dtype: DTypeChoice,
    quant: Option<GgmlType>,
    sharded: bool,
) -> Result<(OutFormat, DTypeChoice, Option<GgmlType>)> {
    let format = format.unwrap_or(if out.extension().is_some_and(|e| e == "gguf") { OutFormat::Gguf } else { OutFormat::Safetensors });
    if quant.is_some() && format != OutFormat::Gguf {
        return Err(Error::usage("--quant applies to GGUF output (add --format gguf or name OUT *.gguf)"));
    }
    if format == OutFormat::Gguf && sharded {
        return Err(Error::usage("--shard-size applies to safetensors output"));
    }
    if format == OutFormat::Safetensors {
        return Ok((format, dtype, None));
    }
    let quant = match (quant, dtype) {
        (Some(q), _) => Some(q),
        (None, DTypeChoice::To(DType::F32)) => Some(GgmlType::F32),
        (None, DTypeChoice::To(DType::F16)) => Some(GgmlType::F16),
        (None, DTypeChoice::To(DType::BF16)) => Some(GgmlType::BF16),
        (None, DTypeChoice::To(d)) => return Err(Error::usage(format!("GGUF output cannot hold {d}; use --quant"))),
        (None, DTypeChoice::Keep) => None,
    };
    Ok((format, DTypeChoice::Keep, quant))
}

/// Decide names, encodings and operations for every output tensor.
pub fn plan(ck: &Checkpoint, opts: &Options) -> Result<Plan> {
    crate::pitfalls::check_scaled_fp8(ck)?;
    // With the release twin the files name (GGUF `general.name` records the variant).
    let detection = crate::pitfalls::detect(ck);
    let needs_family = opts.layout.is_some() || opts.format == OutFormat::Gguf;
    let detection = match detection {
        Ok(d) => Some(d),
        Err(e) if needs_family => return Err(e.with_path(&ck.path)),
        Err(_) => None,
    };
    let family = family_of(&detection);
    let from_layout = detection.as_ref().map(|d| d.layout);
    let to_layout = match (opts.format, family) {
        (OutFormat::Gguf, Some(f)) => Some(opts.layout.unwrap_or(f.comfy_names_layout())),
        _ => opts.layout.or(from_layout),
    };
    let prefix = detection.as_ref().map(|d| d.prefix.clone()).unwrap_or_default();
    let mut notes = Vec::new();

    // fp8 scale companions of the input.
    let by_name: HashMap<&str, usize> = ck.tensors.iter().enumerate().map(|(i, t)| (t.name.as_str(), i)).collect();
    let mut scale_of: HashMap<usize, usize> = HashMap::new();
    let mut companions: HashSet<usize> = HashSet::new();
    for (i, t) in ck.tensors.iter().enumerate() {
        if t.name == SCALED_FP8_MARKER || t.name.ends_with(&format!(".{SCALED_FP8_MARKER}")) {
            companions.insert(i);
            continue;
        }
        for s in INPUT_SCALE_SUFFIXES {
            if t.name.ends_with(s) {
                companions.insert(i);
            }
        }
        for s in SCALE_SUFFIXES {
            if let Some(base) = t.name.strip_suffix(s) {
                let w = format!("{base}.weight");
                if let Some(&wi) = by_name.get(w.as_str()) {
                    if t.numel() != 1 {
                        return Err(Error::at(
                            Kind::Unsupported,
                            &ck.path,
                            format!("fp8 scale '{}' has {} elements; only per-tensor scales are supported", clean(&t.name), t.numel()),
                        ));
                    }
                    scale_of.insert(wi, i);
                    companions.insert(i);
                }
            }
        }
    }
    let read_scale = |i: usize| -> Result<f32> {
        let t = &ck.tensors[i];
        let d = t.encoding.dense().ok_or_else(|| Error::unsupported("quantized fp8 scale"))?;
        let mut v = [0f32];
        cast::decode_f32(d, ck.bytes(t), &mut v, 1.0).map_err(|e| e.context(clean(&t.name)))?;
        Ok(v[0])
    };

    let gguf_quant = if opts.format == OutFormat::Gguf {
        Some(opts.quant.unwrap_or_else(|| {
            if ck.tensors.iter().any(|t| t.encoding == Encoding::Dense(DType::BF16)) {
                GgmlType::BF16
            } else {
                GgmlType::F16
            }
        }))
    } else {
        None
    };
    let target_dtype = match opts.dtype {
        DTypeChoice::To(d) => Some(d),
        DTypeChoice::Keep => None,
    };
    let fp8_out = target_dtype.filter(|d| d.is_fp8());
    // Output name of an input name: strip the detected prefix, rename between layouts, add the
    // ComfyUI prefix when asked; with the layout kept, names stay exactly as they are.
    let out_name = |name: &str| -> Result<String> {
        let stripped = name.strip_prefix(prefix.as_str()).unwrap_or(name);
        let mut out = match (family, from_layout, to_layout) {
            (Some(f), Some(a), Some(b)) if a != b || !prefix.is_empty() => {
                if stripped == SCALED_FP8_MARKER {
                    stripped.to_string()
                } else if let Some((base, suffix)) =
                    SCALE_SUFFIXES.iter().chain(&INPUT_SCALE_SUFFIXES).find_map(|s| stripped.strip_suffix(s).map(|b| (b, s)))
                {
                    // A scale companion follows its weight's name.
                    let w = f.rename(a, b, &format!("{base}.weight")).map_err(|e| e.with_path(&ck.path))?;
                    format!("{}{suffix}", w.strip_suffix(".weight").unwrap_or(&w))
                } else {
                    f.rename(a, b, stripped).map_err(|e| e.with_path(&ck.path))?
                }
            }
            _ => name.to_string(),
        };
        if opts.comfy_prefix && !out.starts_with("model.diffusion_model.") {
            out = format!("model.diffusion_model.{out}");
        } else if opts.layout.is_none() && opts.format == OutFormat::Safetensors && !prefix.is_empty() && !out.starts_with(&prefix) {
            out = format!("{prefix}{out}");
        }
        Ok(out)
    };
    let mut tensors = Vec::with_capacity(ck.tensors.len());
    let mut fp8_targets = Vec::new();
    let mut dequantized = 0usize;
    for (i, t) in ck.tensors.iter().enumerate() {
        let in_scale = scale_of.get(&i).map(|&s| read_scale(s)).transpose()?;
        let in_dense = t.encoding.dense();
        // A companion is kept only when the tensor it scales is kept as it is.
        if companions.contains(&i) {
            let keep_as_is = gguf_quant.is_none() && target_dtype.is_none();
            if keep_as_is {
                tensors.push(OutTensor { name: out_name(&t.name)?, encoding: t.encoding, shape: t.shape.clone(), op: Op::Copy { src: i } });
            }
            continue;
        }
        let name = out_name(&t.name)?;
        let scale = in_scale.unwrap_or(1.0);
        let (encoding, op) = if let Some(q) = gguf_quant {
            let g = gguf_type(family, &name, &t.shape, t.encoding, q);
            let same = Encoding::Dense(g.dense().unwrap_or(DType::F32)) == t.encoding && !g.is_quantized() && scale == 1.0;
            let enc = g.dense().map_or(Encoding::Ggml(g), Encoding::Dense);
            (enc, if same { Op::Copy { src: i } } else { Op::Transcode { src: i, scale } })
        } else {
            let float_in = match t.encoding {
                Encoding::Dense(d) => d.is_castable_float(),
                Encoding::Ggml(g) => quant::can_dequantize(g),
            };
            let want = match (target_dtype, t.encoding) {
                (Some(d), _) if float_in && d.is_fp8() => {
                    let eligible = match family {
                        Some(f) => f.gguf_quantizable(&name, &t.shape),
                        None => t.shape.len() == 2 && name.ends_with(".weight"),
                    };
                    if eligible {
                        Some(d)
                    } else {
                        in_dense.filter(|d| !d.is_fp8()).or(Some(DType::BF16))
                    }
                }
                (Some(d), _) if float_in => Some(d),
                (None, Encoding::Ggml(_)) => {
                    dequantized += 1;
                    Some(DType::BF16)
                }
                // fp8 weights with a scale cannot stay fp8 once the scale tensors are dropped.
                (None, Encoding::Dense(d)) if in_scale.is_some() && (target_dtype.is_some() || gguf_quant.is_some()) => Some(d),
                _ => in_dense,
            };
            let want = want.ok_or_else(|| {
                Error::unsupported(format!("tensor '{}': cannot store {} as safetensors", clean(&t.name), t.encoding.name()))
            })?;
            if !float_in && Some(want) != in_dense {
                return Err(Error::at(
                    Kind::Unsupported,
                    &ck.path,
                    format!("tensor '{}' of {} cannot be cast", clean(&t.name), t.encoding.name()),
                ));
            }
            if want.is_fp8() && in_dense != Some(want) || (want.is_fp8() && fp8_out.is_some() && in_dense == Some(want) && scale != 1.0) {
                fp8_targets.push(tensors.len());
            }
            let op = if Encoding::Dense(want) == t.encoding && (scale == 1.0 || (target_dtype.is_none() && gguf_quant.is_none())) {
                Op::Copy { src: i }
            } else {
                Op::Transcode { src: i, scale }
            };
            (Encoding::Dense(want), op)
        };
        tensors.push(OutTensor { name, encoding, shape: t.shape.clone(), op });
    }
    if dequantized > 0 {
        notes.push(format!("{dequantized} quantized tensors dequantized to BF16 (choose with --dtype)"));
    }

    // fp8 outputs: compute per-tensor scales (amax / fp8 max) and add the scale tensors.
    if let Some(fd) = fp8_out {
        if opts.fp8_scale != Fp8Scale::None && !fp8_targets.is_empty() {
            let max = cast::fp8_max(fd).expect("fp8 dtype");
            let amaxes: Vec<Result<f32>> = fp8_targets.par_iter().map(|&j| amax_of(ck, &tensors[j])).collect();
            let mut extra = Vec::new();
            for (&j, a) in fp8_targets.iter().zip(amaxes) {
                let a = a?;
                let s = if a > 0.0 && a.is_finite() { a / max } else { 1.0 };
                let t = &mut tensors[j];
                if let Op::Transcode { scale, .. } = &mut t.op {
                    *scale /= s;
                }
                let base = t.name.strip_suffix(".weight").unwrap_or(&t.name).to_string();
                let sname = match opts.fp8_scale {
                    Fp8Scale::Comfy => format!("{base}.scale_weight"),
                    _ => format!("{base}.weight_scale"),
                };
                extra.push(OutTensor {
                    name: sname,
                    encoding: Encoding::Dense(DType::F32),
                    shape: vec![],
                    op: Op::Literal(s.to_le_bytes().to_vec()),
                });
            }
            if opts.fp8_scale == Fp8Scale::Comfy {
                let marker =
                    if opts.comfy_prefix { format!("model.diffusion_model.{SCALED_FP8_MARKER}") } else { SCALED_FP8_MARKER.to_string() };
                extra.push(OutTensor { name: marker, encoding: Encoding::Dense(fd), shape: vec![0], op: Op::Literal(vec![]) });
            }
            tensors.extend(extra);
        }
    }

    // Config: translated when the layout changes, inferred from shapes when there is none.
    let config = match (family, from_layout, to_layout, &ck.config) {
        (Some(f), Some(a), Some(b), Some(c)) if a != b => Some(f.translate_config(a, b, &c.json)?),
        (_, _, _, Some(c)) => Some(c.json.clone()),
        (Some(f), _, Some(b), None) => {
            let names: Vec<(&str, &[u64])> = tensors.iter().map(|t| (t.name.as_str(), t.shape.as_slice())).collect();
            f.config_from_shapes(b, &names).ok()
        }
        _ => None,
    };
    let mut metadata = if opts.keep_metadata { ck.metadata.clone() } else { Vec::new() };
    if metadata.is_empty() {
        metadata.push(("format".into(), "pt".into()));
    }
    check_unique(&tensors)?;
    Ok(Plan { tensors, detection, from_layout, to_layout, config, metadata, notes })
}

fn check_unique(tensors: &[OutTensor]) -> Result<()> {
    let mut seen = HashSet::new();
    for t in tensors {
        if !seen.insert(t.name.as_str()) {
            return Err(Error::new(Kind::Inconsistent, format!("two input tensors map to the output name '{}'", clean(&t.name))));
        }
    }
    Ok(())
}

/// ComfyUI-GGUF's choice of type for one tensor: F32 for high-precision tensors, the quant
/// type for quantizable 2-D weights whose rows fit whole blocks, else F16/BF16.
fn gguf_type(family: Option<&Family>, name: &str, shape: &[u64], src: Encoding, q: GgmlType) -> GgmlType {
    let src_hi = matches!(src, Encoding::Dense(DType::F32) | Encoding::Dense(DType::BF16) | Encoding::Dense(DType::F64));
    let base = if src == Encoding::Dense(DType::BF16) || q == GgmlType::BF16 { GgmlType::BF16 } else { GgmlType::F16 };
    if let Encoding::Dense(d) = src {
        if !d.is_castable_float() {
            return GgmlType::from_dense(d).unwrap_or(GgmlType::F32);
        }
    }
    let keep_f32 = family.is_some_and(|f| f.gguf_keep_f32(name, shape)) || shape.len() > 4;
    if keep_f32 && (src_hi || shape.len() > 4) {
        return GgmlType::F32;
    }
    if !q.is_quantized() {
        return q;
    }
    let ne0 = shape.last().copied().unwrap_or(0);
    let quantizable = family.is_none_or(|f| f.gguf_quantizable(name, shape)) && shape.len() == 2;
    if quantizable && ne0 % q.block_size() == 0 && quant::can_quantize(q) {
        q
    } else {
        base
    }
}

/// max |x| of an output tensor's source values (for fp8 scales).
fn amax_of(ck: &Checkpoint, t: &OutTensor) -> Result<f32> {
    let (src, scale) = match t.op {
        Op::Transcode { src, scale } => (src, scale),
        Op::Copy { src } => (src, 1.0),
        Op::Literal(_) => return Ok(0.0),
    };
    let e = &ck.tensors[src];
    let bytes = ck.bytes(e);
    let n = e.numel() as usize;
    let chunk = CHUNK_ELEMS;
    let m = (0..n.div_ceil(chunk))
        .into_par_iter()
        .map(|c| {
            let lo = c * chunk;
            let hi = (lo + chunk).min(n);
            let mut buf = vec![0f32; hi - lo];
            decode_range(e, bytes, lo, hi, scale, &mut buf)?;
            Ok::<f32, Error>(cast::amax(&buf))
        })
        .try_reduce(|| 0f32, |a, b| Ok(a.max(b)))?;
    ck.release(e);
    Ok(m)
}

/// Elements per parallel work item (a multiple of every block size).
const CHUNK_ELEMS: usize = 1 << 18;

thread_local! {
    /// Per-thread f32 scratch, reused across chunks and tensors (no page faults per chunk).
    static F32_BUF: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn decode_range(e: &TensorEntry, bytes: &[u8], lo: usize, hi: usize, scale: f32, out: &mut [f32]) -> Result<()> {
    match e.encoding {
        Encoding::Dense(d) => {
            let sz = d.size().ok_or_else(|| Error::unsupported(format!("cannot decode {d}")))?;
            cast::decode_f32(d, &bytes[lo * sz..hi * sz], out, scale)
        }
        Encoding::Ggml(g) => {
            let (b, ts) = (g.block_size() as usize, g.type_size() as usize);
            quant::dequantize(g, &bytes[lo / b * ts..hi / b * ts], out)?;
            if scale != 1.0 {
                out.iter_mut().for_each(|v| *v *= scale);
            }
            Ok(())
        }
    }
}

fn encode_range(enc: Encoding, vals: &[f32], out: &mut [u8]) -> Result<()> {
    match enc {
        Encoding::Dense(d) => cast::encode_f32(d, vals, out),
        Encoding::Ggml(g) => quant::quantize(g, vals, out),
    }
}

fn out_bytes(enc: Encoding, elems: usize) -> usize {
    match enc {
        Encoding::Dense(d) => d.size().unwrap_or(0) * elems,
        Encoding::Ggml(g) => elems / g.block_size() as usize * g.type_size() as usize,
    }
}

/// The producer of a transcoded tensor: decode the input (dense with a scale, or ggml blocks)
/// to f32 and encode it, in windows of at least 8 MiB of output (whole chunks). Two windows are
/// kept per writer: the pool fills one while this thread writes the other, so the kernel's copy
/// overlaps the casting.
fn transcode(ck: &Checkpoint, t: &OutTensor, src: usize, scale: f32, sink: &mut Sink, window: (&mut Vec<u8>, &mut Vec<u8>)) -> Result<()> {
    let e = &ck.tensors[src];
    let bytes = ck.bytes(e);
    let n = e.numel() as usize;
    let threads = rayon::current_num_threads().max(1);
    let chunk_out = out_bytes(t.encoding, CHUNK_ELEMS).max(1);
    let per_window = CHUNK_ELEMS * threads.max((WINDOW_BYTES / chunk_out).max(1));
    let fill = |lo: usize, buf: &mut Vec<u8>| -> Result<usize> {
        let hi = (lo + per_window).min(n);
        let total = out_bytes(t.encoding, hi - lo);
        if buf.len() < total {
            buf.resize(total, 0);
        }
        buf[..total]
            .par_chunks_mut(chunk_out)
            .enumerate()
            .try_for_each(|(c, out)| -> Result<()> {
                let a = lo + c * CHUNK_ELEMS;
                let b = (a + CHUNK_ELEMS).min(hi);
                F32_BUF.with_borrow_mut(|vals| {
                    vals.resize(CHUNK_ELEMS, 0.0);
                    let vals = &mut vals[..b - a];
                    decode_range(e, bytes, a, b, scale, vals)?;
                    encode_range(t.encoding, vals, out)
                })
            })
            .map_err(|err| err.context(format!("tensor '{}'", clean(&t.name))))?;
        Ok(total)
    };
    let (cur, next) = window;
    let mut lo = 0;
    let mut len = if n > 0 { fill(0, cur)? } else { 0 };
    while lo < n {
        let hi = (lo + per_window).min(n);
        if hi < n {
            let (w, f) = rayon::join(|| sink.write(&cur[..len]), || fill(hi, next));
            w?;
            len = f?;
            std::mem::swap(cur, next);
        } else {
            sink.write(&cur[..len])?;
        }
        lo = hi;
    }
    ck.release(e);
    Ok(())
}

/// Output bytes per transcoding window (two windows are kept per writer).
const WINDOW_BYTES: usize = 8 << 20;

/// Write the plan as safetensors at `weights` (a file path inside the final output location,
/// which may be a temporary folder): one file, or shards with an index. Plain copies come
/// straight from the map; transcoded tensors are produced window by window.
fn write_safetensors(ck: &Checkpoint, plan: &Plan, weights: &Path, opts: &Options, progress: &Progress) -> Result<write::Output> {
    // The transcoding windows, reused from tensor to tensor (allocating them per tensor would
    // fault their pages in again every time).
    let windows = std::cell::RefCell::new((Vec::new(), Vec::new()));
    let tensors = plan
        .tensors
        .iter()
        .map(|t| {
            let Encoding::Dense(d) = t.encoding else {
                return Err(Error::internal(format!("{} in a safetensors plan", t.encoding.name())));
            };
            Ok(match &t.op {
                Op::Copy { src } => {
                    let e = &ck.tensors[*src];
                    write::Tensor::mapped(t.name.clone(), d, t.shape.clone(), e.file, &ck.files[e.file], e.offset, e.len)
                }
                &Op::Transcode { src, scale } => {
                    let e = &ck.tensors[src];
                    let windows = &windows;
                    write::Tensor::streamed(t.name.clone(), d, t.shape.clone(), move |sink| {
                        let (a, b) = &mut *windows.borrow_mut();
                        transcode(ck, t, src, scale, sink, (a, b))
                    })
                    .at(e.file, e.offset)
                }
                Op::Literal(b) => write::Tensor::new(t.name.clone(), d, t.shape.clone(), write::Data::Bytes(b.as_slice().into())),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let wopts = write::Options {
        layout: write::Layout::SourceOrder,
        shard_size: opts.shard_size,
        sync: opts.sync,
        file_hash: if opts.sha256 { write::FileHash::WhileWriting } else { write::FileHash::None },
        ..write::Options::default()
    };
    write::safetensors(weights, tensors, write::Metadata::Fixed(Some(plan.metadata.clone())), &wopts, progress)
}

/// ggml `general.file_type` (llama.h `llama_ftype`) for a uniform quant type.
fn gguf_file_type(q: GgmlType) -> u32 {
    match q {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q8_0 => 7,
        GgmlType::Q5_0 => 8,
        GgmlType::Q5_1 => 9,
        GgmlType::Q2_K => 10,
        GgmlType::Q3_K => 11,
        GgmlType::Q4_K => 14,
        GgmlType::Q5_K => 16,
        GgmlType::Q6_K => 18,
        GgmlType::BF16 => 32,
        _ => 1,
    }
}

fn write_gguf(ck: &Checkpoint, plan: &Plan, path: &Path, opts: &Options, progress: &Progress) -> Result<write::Output> {
    use crate::gguf::{TensorPlan, Value};
    let family = family_of(&plan.detection).ok_or_else(|| Error::unsupported("GGUF export needs a known model family"))?;
    let q = opts.quant.unwrap_or(GgmlType::F16);
    let mut kv: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(family.gguf_arch().to_string())),
        ("general.quantization_version".into(), Value::U32(2)),
        ("general.file_type".into(), Value::U32(gguf_file_type(q))),
    ];
    if let Some(d) = &plan.detection {
        kv.push(("general.name".into(), Value::String(d.variant.clone())));
    }
    let tplans: Vec<TensorPlan> = plan
        .tensors
        .iter()
        .map(|t| TensorPlan {
            name: t.name.clone(),
            shape: t.shape.clone(),
            ty: match t.encoding {
                Encoding::Ggml(g) => g,
                Encoding::Dense(d) => GgmlType::from_dense(d).unwrap_or(GgmlType::F32),
            },
        })
        .collect();
    let gp = crate::gguf::plan(&kv, &tplans, 32)?;
    let mut out = write::create(path, opts.sync)?;
    let tmp = out.temp_path().to_path_buf();
    let (mut win_a, mut win_b) = (Vec::new(), Vec::new());
    let hash;
    {
        let mut sink = Sink::new(out.file(), &tmp, opts.sha256, progress).with_writeback(opts.sync);
        sink.write(&gp.header)?;
        let mut at = 0u64;
        for (i, t) in plan.tensors.iter().enumerate() {
            sink.zeros(gp.offsets[i] - at)?;
            match &t.op {
                Op::Literal(b) => sink.write(b)?,
                Op::Copy { src } => {
                    let e = &ck.tensors[*src];
                    sink.copy_from(&ck.files[e.file], e.offset, e.len)?;
                    ck.release(e);
                }
                &Op::Transcode { src, scale } => transcode(ck, t, src, scale, &mut sink, (&mut win_a, &mut win_b))?,
            }
            at = gp.offsets[i] + gp.sizes[i];
        }
        sink.zeros(gp.total_len - gp.header.len() as u64 - at)?;
        hash = sink.finish()?;
    }
    let w = Written { path: path.to_path_buf(), bytes: gp.total_len, sha256: hash };
    Ok(write::Output::new(vec![out], vec![w], opts.sha256))
}

/// What a conversion did, for people and for `--json`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub input: PathBuf,
    pub output: PathBuf,
    pub family: Option<String>,
    pub variant: Option<String>,
    pub from_layout: Option<Layout>,
    pub to_layout: Option<Layout>,
    pub tensors: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub seconds: f64,
    pub files: Vec<Written>,
    pub notes: Vec<String>,
    /// One entry per model of a multi-model folder (Wan2.2 high/low-noise experts); empty
    /// otherwise. The fields above hold a value only when every model agrees on it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelReport>,
}

/// What was converted for one model of a multi-model folder.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelReport {
    pub role: String,
    pub family: Option<String>,
    pub variant: Option<String>,
    pub from_layout: Option<Layout>,
    pub to_layout: Option<Layout>,
    pub tensors: usize,
    pub bytes_in: u64,
}

/// Convert `input` into `output` (a `.safetensors` / `.gguf` file, or a model folder).
pub fn convert(input: &Path, output: &Path, opts: &Options) -> Result<Report> {
    let start = std::time::Instant::now();
    crate::atomic::check_target(output, opts.force)?;
    let models = crate::store::sub_models(input);
    if input.is_dir() && !models.is_empty() {
        return convert_multi(input, output, &models, opts, start);
    }
    let ck = Checkpoint::open(input)?;
    let plan = plan(&ck, opts)?;
    let total: u64 = plan.tensors.iter().map(|t| t.size()).sum::<Result<u64>>()?;
    let progress = Progress::bytes(total, "convert", opts.quiet);
    let name = output.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let files = match opts.format {
        OutFormat::Gguf => write_gguf(&ck, &plan, output, opts, &progress)?.commit()?,
        OutFormat::Safetensors if name.ends_with(".safetensors") => write_safetensors(&ck, &plan, output, opts, &progress)?.commit()?,
        OutFormat::Safetensors => {
            let dir = AtomicDir::create(output)?;
            let ws = write_model_dir(&ck, &plan, dir.path(), opts, &progress)?;
            dir.commit()?;
            ws.into_iter()
                .map(|mut w| {
                    w.path = output.join(w.path.file_name().expect("name"));
                    w
                })
                .collect()
        }
    };
    progress.finish();
    Ok(report(input, output, &ck, &plan, files, start))
}

fn write_model_dir(ck: &Checkpoint, plan: &Plan, dir: &Path, opts: &Options, progress: &Progress) -> Result<Vec<Written>> {
    let mut ws = write_safetensors(ck, plan, &dir.join(WEIGHTS_NAME), opts, progress)?.commit()?;
    if let Some(cfg) = &plan.config {
        let mut text = serde_json::to_string_pretty(cfg).expect("json");
        text.push('\n');
        let p = dir.join("config.json");
        crate::atomic::write_file(&p, text.as_bytes())?;
        ws.push(Written { path: p, bytes: text.len() as u64, sha256: None });
    }
    Ok(ws)
}

fn report(input: &Path, output: &Path, ck: &Checkpoint, plan: &Plan, files: Vec<Written>, start: std::time::Instant) -> Report {
    Report {
        input: input.to_path_buf(),
        output: output.to_path_buf(),
        family: plan.detection.as_ref().map(|d| d.family.clone()),
        variant: plan.detection.as_ref().map(|d| d.variant.clone()),
        from_layout: plan.from_layout,
        to_layout: plan.to_layout,
        tensors: plan.tensors.len(),
        bytes_in: ck.data_bytes(),
        bytes_out: files.iter().map(|w| w.bytes).sum(),
        seconds: start.elapsed().as_secs_f64(),
        files,
        notes: plan.notes.clone(),
        models: Vec::new(),
    }
}

/// Sub-folder names of a two-expert model in each layout.
fn role_name(role: &str, layout: Option<Layout>) -> String {
    let high = matches!(role, "high_noise_model" | "transformer");
    match layout {
        Some(Layout::Diffusers) => if high { "transformer" } else { "transformer_2" }.into(),
        Some(_) => if high { "high_noise_model" } else { "low_noise_model" }.into(),
        None => role.into(),
    }
}

/// Convert a folder holding several models (Wan2.2 `high_noise_model/` + `low_noise_model/`,
/// or diffusers `transformer/` + `transformer_2/`) into a folder of the same shape.
fn convert_multi(input: &Path, output: &Path, models: &[(String, PathBuf)], opts: &Options, start: std::time::Instant) -> Result<Report> {
    if opts.format == OutFormat::Gguf {
        return Err(Error::at(Kind::Usage, input, "holds several models; convert each to GGUF separately"));
    }
    let dir = AtomicDir::create(output)?;
    let mut files = Vec::new();
    let mut per_model = Vec::new();
    let mut notes = Vec::new();
    for (role, p) in models {
        let ck = Checkpoint::open(p)?;
        let plan = plan(&ck, opts)?;
        let total: u64 = plan.tensors.iter().map(|t| t.size()).sum::<Result<u64>>()?;
        let progress = Progress::bytes(total, role, opts.quiet);
        let sub = dir.path().join(role_name(role, plan.to_layout));
        std::fs::create_dir(&sub).with_file(&sub)?;
        for mut w in write_model_dir(&ck, &plan, &sub, opts, &progress)? {
            w.path = output.join(sub.file_name().expect("name")).join(w.path.file_name().expect("name"));
            files.push(w);
        }
        progress.finish();
        notes.extend(plan.notes.iter().map(|n| format!("{role}: {n}")));
        per_model.push(ModelReport {
            role: role.clone(),
            family: plan.detection.as_ref().map(|d| d.family.clone()),
            variant: plan.detection.as_ref().map(|d| d.variant.clone()),
            from_layout: plan.from_layout,
            to_layout: plan.to_layout,
            tensors: plan.tensors.len(),
            bytes_in: ck.data_bytes(),
        });
    }
    dir.commit()?;
    Ok(multi_report(input, output, per_model, files, notes, start))
}

/// The report of a multi-model conversion: totals, and a shared field only where all agree.
fn multi_report(
    input: &Path,
    output: &Path,
    models: Vec<ModelReport>,
    files: Vec<Written>,
    notes: Vec<String>,
    start: std::time::Instant,
) -> Report {
    fn common<T: Clone + PartialEq>(models: &[ModelReport], f: impl Fn(&ModelReport) -> Option<T>) -> Option<T> {
        let first = f(models.first()?)?;
        models.iter().all(|m| f(m).as_ref() == Some(&first)).then_some(first)
    }
    Report {
        input: input.to_path_buf(),
        output: output.to_path_buf(),
        family: common(&models, |m| m.family.clone()),
        variant: common(&models, |m| m.variant.clone()),
        from_layout: common(&models, |m| m.from_layout),
        to_layout: common(&models, |m| m.to_layout),
        tensors: models.iter().map(|m| m.tensors).sum(),
        bytes_in: models.iter().map(|m| m.bytes_in).sum(),
        bytes_out: files.iter().map(|w| w.bytes).sum(),
        seconds: start.elapsed().as_secs_f64(),
        files,
        notes,
        models,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_policy_follows_the_extension_and_the_dtype() {
        let p = |out: &str, f, d, q, sh| output_policy(Path::new(out), f, d, q, sh);
        let st = OutFormat::Safetensors;
        let gg = OutFormat::Gguf;
        let f16 = DTypeChoice::To(DType::F16);
        assert_eq!(p("m.safetensors", None, f16, None, true).unwrap(), (st, f16, None));
        assert_eq!(p("m.gguf", None, DTypeChoice::Keep, None, false).unwrap(), (gg, DTypeChoice::Keep, None));
        assert_eq!(p("m.gguf", None, f16, None, false).unwrap(), (gg, DTypeChoice::Keep, Some(GgmlType::F16)));
        assert_eq!(p("m.gguf", None, DTypeChoice::To(DType::BF16), None, false).unwrap().2, Some(GgmlType::BF16));
        assert_eq!(p("m.gguf", None, DTypeChoice::To(DType::F32), Some(GgmlType::Q8_0), false).unwrap().2, Some(GgmlType::Q8_0));
        assert_eq!(p("folder", Some(gg), DTypeChoice::To(DType::F32), None, false).unwrap().2, Some(GgmlType::F32));
        assert_eq!(p("m.gguf", Some(st), f16, None, false).unwrap().0, st);
        let usage = |r: Result<(OutFormat, DTypeChoice, Option<GgmlType>)>, needle: &str| {
            let e = r.unwrap_err();
            assert_eq!(e.kind(), Kind::Usage);
            assert!(e.to_string().contains(needle), "{e}");
        };
        usage(p("m.safetensors", None, f16, Some(GgmlType::Q8_0), false), "--quant applies to GGUF");
        usage(p("m.gguf", None, f16, None, true), "--shard-size applies to safetensors");
        usage(p("m.gguf", None, DTypeChoice::To(DType::F8E4M3), None, false), "cannot hold");
    }
}
