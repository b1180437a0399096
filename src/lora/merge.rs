//! `W' = W + Σ S · (α/r) · up · down`, streamed per tensor from the base's memory map.
//!
//! Every LoRA file is read and checked against the base before the output is created; then the
//! output header is planned and each base tensor is copied (unchanged, through the kernel),
//! cast, or decoded to f32, updated and encoded. Only one tensor's f32 values are in memory at
//! a time. The update is computed in f32 (the product `up · down` accumulates its `r` terms in
//! f32, rows in parallel), as Lightning's and ComfyUI's merges do.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{dense_of, read, LoraModule};
use crate::atomic::AtomicDir;
use crate::cast;
use crate::dtype::DType;
use crate::error::{clean, Error, Kind, Result};
use crate::layout::{Layout, Registry};
use crate::progress::Progress;
use crate::store::{Checkpoint, Format};
use crate::write::{self, WEIGHTS_NAME};

#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// One strength for every LoRA, or one per LoRA (empty: 1).
    pub strengths: Vec<f64>,
    /// Output dtype of floating-point tensors (default: the base's).
    pub dtype: Option<DType>,
    pub force: bool,
    pub quiet: bool,
    pub sync: bool,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions { strengths: Vec::new(), dtype: None, force: false, quiet: true, sync: true }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct MergeReport {
    pub base: PathBuf,
    pub loras: Vec<PathBuf>,
    pub output: PathBuf,
    pub family: Option<String>,
    pub layout: Option<Layout>,
    pub tensors: usize,
    /// Base tensors that received at least one update.
    pub merged: usize,
    /// LoRA modules applied (over all files).
    pub modules: usize,
    pub strengths: Vec<f64>,
    pub precision: &'static str,
    pub bytes_out: u64,
    pub seconds: f64,
}

struct Update {
    lora: usize,
    module: LoraModule,
    strength: f64,
}

/// Merge `loras` into `base`, writing `out` (a `.safetensors` file, or a model folder with the
/// base's config.json when the name does not end in `.safetensors`).
pub fn merge(base: &Path, loras: &[PathBuf], out: &Path, opts: &MergeOptions) -> Result<MergeReport> {
    let start = Instant::now();
    crate::atomic::check_target(out, opts.force)?;
    if loras.is_empty() {
        return Err(Error::usage("no LoRA files given"));
    }
    let strengths: Vec<f64> = match opts.strengths.len() {
        0 => vec![1.0; loras.len()],
        1 => vec![opts.strengths[0]; loras.len()],
        n if n == loras.len() => opts.strengths.clone(),
        n => return Err(Error::usage(format!("{n} --strength values for {} LoRA files (give one, or one per file)", loras.len()))),
    };
    if let Some(s) = strengths.iter().find(|s| !s.is_finite()) {
        return Err(Error::usage(format!("--strength {s} is not a finite number")));
    }
    let ck = Checkpoint::open(base)?;
    if ck.format == Format::Gguf {
        return Err(Error::at(Kind::Unsupported, &ck.path, "merging into GGUF is not supported; convert the base to safetensors first"));
    }
    let detection = Registry::builtin().detect(&ck.names_and_shapes(), ck.config.as_ref().map(|c| &c.json)).ok();
    let family = detection.as_ref().and_then(|d| Registry::builtin().family(&d.family));
    let prefix = detection.as_ref().map(|d| d.prefix.clone()).unwrap_or_default();
    let by_name: HashMap<&str, usize> = ck.tensors.iter().enumerate().map(|(i, t)| (t.name.as_str(), i)).collect();

    // Read and check every LoRA before anything is written.
    let mut updates: HashMap<usize, Vec<Update>> = HashMap::new();
    let mut modules = 0;
    for (li, lp) in loras.iter().enumerate() {
        let (set, _) = read(lp, family.map(|f| f.name()))?;
        for (canon, m) in set.modules {
            let target = match (family, &detection) {
                (Some(f), Some(d)) => {
                    let n = f.rename(Layout::Diffusers, d.layout, &canon).map_err(|e| {
                        Error::inconsistent(
                            lp,
                            format!("LoRA module '{}' has no name in {}'s layout: {}", clean(&canon), ck.path.display(), e.message()),
                        )
                    })?;
                    format!("{prefix}{n}")
                }
                _ => canon.clone(),
            };
            let Some(&bi) = by_name.get(target.as_str()) else {
                return Err(Error::inconsistent(
                    lp,
                    format!(
                        "LoRA module '{}' targets tensor '{}', which {} does not have",
                        clean(&canon),
                        clean(&target),
                        ck.path.display()
                    ),
                ));
            };
            let bt = &ck.tensors[bi];
            let d = dense_of(&ck, bi)?;
            if !d.is_castable_float() {
                return Err(Error::at(Kind::Unsupported, lp, format!("base tensor '{}' is {d}, not a float tensor", clean(&target))));
            }
            let (o, i) = m.dims();
            let base_out = bt.shape.first().copied().unwrap_or(0) as usize;
            let base_in = (bt.numel() as usize).checked_div(base_out).unwrap_or(0);
            if bt.shape.len() < 2 || o != base_out || i != base_in {
                return Err(Error::inconsistent(
                    lp,
                    format!(
                        "LoRA module '{}': lora_up {:?} · lora_down {:?} gives [{o}, {i}] but base tensor '{}' of {} is {:?}",
                        clean(&canon),
                        m.up.shape,
                        m.down.shape,
                        clean(&target),
                        ck.path.display(),
                        bt.shape
                    ),
                ));
            }
            modules += 1;
            updates.entry(bi).or_default().push(Update { lora: li, module: m, strength: strengths[li] });
        }
    }

    // The output: the base's names, order and metadata; dtypes as asked.
    let mut metadata = ck.metadata.clone();
    if metadata.is_empty() {
        metadata.push(("format".into(), "pt".into()));
    }
    let total: u64 = ck.tensors.iter().map(|t| t.len).sum();
    let progress = Progress::bytes(total, "merge", opts.quiet);
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let bytes_out = if name.ends_with(".safetensors") {
        write_file(&ck, &updates, out, opts, metadata, &progress, loras)?
    } else {
        let dir = AtomicDir::create(out)?;
        let n = write_file(&ck, &updates, &dir.path().join(WEIGHTS_NAME), opts, metadata, &progress, loras)?;
        if let Some(c) = &ck.config {
            let mut text = serde_json::to_string_pretty(&c.json).expect("json");
            text.push('\n');
            crate::atomic::write_file(&dir.path().join("config.json"), text.as_bytes())?;
        }
        dir.commit()?;
        n
    };
    progress.finish();
    Ok(MergeReport {
        base: base.to_path_buf(),
        loras: loras.to_vec(),
        output: out.to_path_buf(),
        family: family.map(|f| f.name().to_string()),
        layout: detection.as_ref().map(|d| d.layout),
        tensors: ck.tensors.len(),
        merged: updates.len(),
        modules,
        strengths,
        precision: "f32",
        bytes_out,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Write the merged checkpoint at `path`: unchanged tensors copied from the map, cast ones and
/// updated ones computed one at a time. Returns the file's length.
fn write_file(
    ck: &Checkpoint,
    updates: &HashMap<usize, Vec<Update>>,
    path: &Path,
    opts: &MergeOptions,
    metadata: Vec<(String, String)>,
    progress: &Progress,
    loras: &[PathBuf],
) -> Result<u64> {
    let mut tensors = Vec::with_capacity(ck.tensors.len());
    for (i, e) in ck.tensors.iter().enumerate() {
        let src = dense_of(ck, i)?;
        let dtype = match opts.dtype {
            Some(want) if src.is_castable_float() => want,
            _ => src,
        };
        let size = crate::dtype::numel(&e.shape).and_then(|n| dtype.byte_size(n)).unwrap_or(0) as usize;
        let cx = |err: Error| err.context(clean(&e.name)).with_path(&ck.path);
        tensors.push(match updates.get(&i) {
            None if src == dtype => {
                write::Tensor::mapped(e.name.clone(), dtype, e.shape.clone(), e.file, &ck.files[e.file], e.offset, e.len)
            }
            None => write::Tensor::computed(e.name.clone(), dtype, e.shape.clone(), move || {
                let mut buf = vec![0u8; size];
                cast::cast(src, ck.bytes(e), dtype, &mut buf, 1.0).map_err(cx)?;
                ck.release(e);
                Ok(buf)
            }),
            Some(ups) => write::Tensor::computed(e.name.clone(), dtype, e.shape.clone(), move || {
                let mut w = vec![0f32; e.numel() as usize];
                cast::decode_f32(src, ck.bytes(e), &mut w, 1.0).map_err(cx)?;
                ck.release(e);
                for u in ups {
                    let ctx = |err: Error| err.context(format!("LoRA module for '{}'", clean(&e.name))).with_path(&loras[u.lora]);
                    let l = u.module.f32_pair(u.strength).map_err(ctx)?;
                    let shape2 = [e.shape[0], e.numel() / e.shape[0].max(1)];
                    crate::lora::delta::apply_lora_delta(&mut w, &shape2, &l).map_err(ctx)?;
                }
                let mut buf = vec![0u8; size];
                cast::encode_f32(dtype, &w, &mut buf)?;
                Ok(buf)
            }),
        });
    }
    let wopts = write::Options { sync: opts.sync, ..write::Options::default() };
    let out = write::safetensors(path, tensors, write::Metadata::Fixed(Some(metadata)), &wopts, progress)?;
    Ok(out.commit()?.iter().map(|w| w.bytes).sum())
}
