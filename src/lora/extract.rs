//! A LoRA from two checkpoints: for every 2-D weight that differs, the truncated SVD of
//! `TUNED − BASE` (in f64) to rank R gives `up = U·Σ`, `down = Vᵀ`, α = R (scale 1).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::svd::{truncated_svd, SvdOptions};
use super::{dense_of, write, LoraModule, LoraSet, Raw, Style, WriteOptions};
use crate::cast;
use crate::dtype::DType;
use crate::error::{clean, Error, Kind, Result};
use crate::layout::{Detection, Family, Layout, Registry};
use crate::progress::Progress;
use crate::store::Checkpoint;

#[derive(Debug, Clone)]
pub struct ExtractOptions {
    pub rank: usize,
    pub style: Style,
    /// kohya: `diffusion_model.` before every key.
    pub prefix: bool,
    /// dtype of the LoRA tensors (default: the base weight's).
    pub dtype: Option<DType>,
    pub svd: SvdOptions,
    pub force: bool,
    pub quiet: bool,
    pub sync: bool,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            rank: 16,
            style: Style::Kohya,
            prefix: false,
            dtype: None,
            svd: SvdOptions::default(),
            force: false,
            quiet: true,
            sync: true,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ExtractReport {
    pub base: PathBuf,
    pub tuned: PathBuf,
    pub output: PathBuf,
    pub family: Option<String>,
    pub style: Style,
    pub rank: usize,
    /// Modules written.
    pub modules: usize,
    /// Tensors equal in both checkpoints.
    pub unchanged: usize,
    /// Tensors that differ but are not 2-D weights (biases, norms, modulation): not in the LoRA.
    pub skipped: Vec<String>,
    /// max over modules of ‖ΔW − up·down‖_F / ‖ΔW‖_F (before rounding to the output dtype).
    pub max_relative_error: f64,
    pub power_iters: usize,
    pub oversample: usize,
    pub bytes_out: u64,
    pub seconds: f64,
}

fn detect(ck: &Checkpoint) -> Option<(Detection, &'static Family)> {
    let reg = Registry::builtin();
    let d = reg.detect(&ck.names_and_shapes(), ck.config.as_ref().map(|c| &c.json)).ok()?;
    let f = reg.family(&d.family)?;
    Some((d, f))
}

/// Canonical (diffusers) names of a checkpoint's tensors → index.
fn canonical_names(ck: &Checkpoint, det: &Option<(Detection, &'static Family)>) -> Result<BTreeMap<String, usize>> {
    let mut out = BTreeMap::new();
    for (i, t) in ck.tensors.iter().enumerate() {
        let name = match det {
            Some((d, f)) => {
                let stripped = t.name.strip_prefix(d.prefix.as_str()).unwrap_or(&t.name);
                f.rename(d.layout, Layout::Diffusers, stripped).unwrap_or_else(|_| stripped.to_string())
            }
            None => t.name.clone(),
        };
        if out.insert(name.clone(), i).is_some() {
            return Err(Error::inconsistent(&ck.path, format!("two tensors map to the parameter '{}'", clean(&name))));
        }
    }
    Ok(out)
}

fn decode(ck: &Checkpoint, i: usize) -> Result<Vec<f32>> {
    let e = &ck.tensors[i];
    let d = dense_of(ck, i)?;
    let mut v = vec![0f32; e.numel() as usize];
    cast::decode_f32(d, ck.bytes(e), &mut v, 1.0).map_err(|err| err.context(clean(&e.name)).with_path(&ck.path))?;
    ck.release(e);
    Ok(v)
}

/// Extract a rank-`opts.rank` LoRA taking `base` to `tuned` and write it to `out`.
pub fn extract(base: &Path, tuned: &Path, out: &Path, opts: &ExtractOptions) -> Result<ExtractReport> {
    let start = Instant::now();
    crate::atomic::check_target(out, opts.force)?;
    if opts.rank == 0 {
        return Err(Error::usage("--rank must be at least 1"));
    }
    let bck = Checkpoint::open(base)?;
    let tck = Checkpoint::open(tuned)?;
    let bdet = detect(&bck);
    let tdet = detect(&tck);
    if let (Some((a, _)), Some((b, _))) = (&bdet, &tdet) {
        if a.family != b.family {
            return Err(Error::inconsistent(tuned, format!("is a {} checkpoint but {} is {}", b.family, base.display(), a.family)));
        }
    }
    let bnames = canonical_names(&bck, &bdet)?;
    let tnames = canonical_names(&tck, &tdet)?;
    for (n, &ti) in &tnames {
        let Some(&bi) = bnames.get(n) else {
            return Err(Error::inconsistent(
                tuned,
                format!("tensor '{}' has no counterpart in {}", clean(&tck.tensors[ti].name), base.display()),
            ));
        };
        if bck.tensors[bi].shape != tck.tensors[ti].shape {
            return Err(Error::inconsistent(
                tuned,
                format!(
                    "tensor '{}' is {:?} but {} has {:?}",
                    clean(&tck.tensors[ti].name),
                    tck.tensors[ti].shape,
                    base.display(),
                    bck.tensors[bi].shape
                ),
            ));
        }
    }
    let family = bdet.as_ref().or(tdet.as_ref()).map(|(d, _)| d.family.clone());
    let mut unchanged = 0;
    let mut skipped = Vec::new();
    let mut work: Vec<(String, usize, usize)> = Vec::new();
    for (n, &ti) in &tnames {
        let bi = bnames[n];
        let (be, te) = (&bck.tensors[bi], &tck.tensors[ti]);
        if be.encoding == te.encoding && bck.bytes(be) == tck.bytes(te) {
            unchanged += 1;
            continue;
        }
        if te.shape.len() == 2
            && n.ends_with(".weight")
            && dense_of(&bck, bi)?.is_castable_float()
            && dense_of(&tck, ti)?.is_castable_float()
        {
            work.push((n.clone(), bi, ti));
        } else {
            skipped.push(n.clone());
        }
    }
    let total: u64 = work.iter().map(|w| tck.tensors[w.2].len).sum();
    let progress = Progress::bytes(total, "extract", opts.quiet);
    let mut set = LoraSet { family, modules: BTreeMap::new() };
    let mut max_err = 0f64;
    for (n, bi, ti) in work {
        let shape = tck.tensors[ti].shape.clone();
        let (m, k) = (shape[0] as usize, shape[1] as usize);
        let b = decode(&bck, bi)?;
        let t = decode(&tck, ti)?;
        let delta: Vec<f64> = t.iter().zip(&b).map(|(x, y)| *x as f64 - *y as f64).collect();
        drop((b, t));
        let norm2: f64 = delta.iter().map(|v| v * v).sum();
        progress.inc(tck.tensors[ti].len);
        if norm2 == 0.0 {
            unchanged += 1;
            continue;
        }
        let svd = truncated_svd(&delta, m, k, opts.rank, &opts.svd);
        let kept: f64 = svd.s.iter().map(|s| s * s).sum();
        max_err = max_err.max(((norm2 - kept).max(0.0) / norm2).sqrt());
        let r = svd.k;
        let mut up = vec![0f32; m * r];
        for i in 0..m {
            for c in 0..r {
                up[i * r + c] = (svd.u[i * r + c] * svd.s[c]) as f32;
            }
        }
        let down: Vec<f32> = svd.vt.iter().map(|&v| v as f32).collect();
        let dt = match opts.dtype {
            Some(d) => d,
            None => dense_of(&bck, bi)?,
        };
        let ctx = |e: Error| e.with_path(out);
        let module = LoraModule {
            down: Raw::from_f32(&down, vec![r as u64, k as u64], dt).map_err(ctx)?,
            up: Raw::from_f32(&up, vec![m as u64, r as u64], dt).map_err(ctx)?,
            alpha: r as f64,
            alpha_given: true,
        };
        set.modules.insert(n, module);
    }
    progress.finish();
    if set.modules.is_empty() {
        return Err(Error::at(Kind::Inconsistent, tuned, format!("no 2-D weight differs from {}; nothing to extract", base.display())));
    }
    let bytes_out = write(
        &set,
        out,
        &WriteOptions { style: opts.style, prefix: opts.prefix, force: opts.force, sync: opts.sync, metadata: Vec::new() },
    )?;
    Ok(ExtractReport {
        base: base.to_path_buf(),
        tuned: tuned.to_path_buf(),
        output: out.to_path_buf(),
        family: set.family.clone(),
        style: opts.style,
        rank: opts.rank,
        modules: set.modules.len(),
        unchanged,
        skipped,
        max_relative_error: max_err,
        power_iters: opts.svd.power_iters,
        oversample: opts.svd.oversample,
        bytes_out,
        seconds: start.elapsed().as_secs_f64(),
    })
}
