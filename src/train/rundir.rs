//! A run folder: where everything a run writes lives, and the files every run has.
//!
//! ```text
//! RUN_DIR/recipe.toml                     the recipe, as given (resume checks it is the same)
//! RUN_DIR/log.jsonl                       one [`LogLine`] per `log_every` generator updates
//! RUN_DIR/checkpoints/step-NNNNNNN.{safetensors,json}
//!                                         trainable tensors + optimiser moments, then the
//!                                         [`CheckpointInfo`] (step, RNG states) that makes it count
//! RUN_DIR/experts/expert-K.safetensors    the expert of phase K (written when the phase ends)
//! RUN_DIR/manifest.json                   the assembler's `phasekit.run/1` manifest
//! ```
//! plus what each student family adds (`toy.json`, `teacher.safetensors`, `summary.json`,
//! `plots/` for the toy; `transformer.json`, `embeddings.safetensors`, `base*.safetensors` for
//! transformers).
//!
//! Every file is written atomically; the JSON of a checkpoint is written after its tensors and
//! is what makes it count.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::dist::DistReport;
use super::memory::PhaseMemory;
use super::metrics::Metrics;
use crate::atomic;
use crate::error::{Error, IoContext, Kind, Result};
use crate::hash::sha256_hex;
use crate::safetensors as st;

/// Tensors with their names, in file order.
pub type NamedTensors = Vec<(String, Tensor)>;

/// Format tag of a checkpoint's JSON half.
pub const CHECKPOINT_FORMAT: &str = "phasekit-checkpoint/1";
/// Format tag of an expert file's metadata.
pub const EXPERT_FORMAT: &str = "phasekit-expert/1";

/// A run folder (see the module docs).
#[derive(Debug, Clone)]
pub struct RunDir {
    pub path: PathBuf,
}

impl RunDir {
    pub fn new(path: &Path) -> RunDir {
        RunDir { path: path.to_path_buf() }
    }

    pub fn checkpoints(&self) -> PathBuf {
        self.path.join("checkpoints")
    }

    /// `experts/expert-K.safetensors`, relative to the run folder.
    pub fn expert_rel(k: usize) -> String {
        format!("experts/expert-{k}.safetensors")
    }

    pub fn expert(&self, k: usize) -> PathBuf {
        self.path.join(RunDir::expert_rel(k))
    }

    /// Create the folder (or, with `resume`, reopen it) and store the recipe; returns the
    /// recipe's sha256. A non-empty folder without `resume` is a usage error; resuming with
    /// another recipe is an inconsistency.
    pub fn prepare(&self, resume: bool, recipe_text: &str) -> Result<String> {
        let out = &self.path;
        let recipe_sha = sha256_hex(recipe_text.as_bytes());
        if out.exists() && !resume {
            let busy = std::fs::read_dir(out).with_file(out)?.next().is_some();
            if busy {
                return Err(Error::at(Kind::Usage, out, "run folder is not empty (use --resume to continue it, or another --out)"));
            }
        }
        for d in [out.to_path_buf(), self.checkpoints(), out.join("experts")] {
            std::fs::create_dir_all(&d).with_file(&d)?;
        }
        let recipe_copy = out.join("recipe.toml");
        if resume && recipe_copy.exists() {
            let old = std::fs::read_to_string(&recipe_copy).with_file(&recipe_copy)?;
            if sha256_hex(old.as_bytes()) != recipe_sha {
                return Err(Error::inconsistent(&recipe_copy, "the run was started with a different recipe; resume with the same file"));
            }
        } else {
            atomic::write_file(&recipe_copy, recipe_text.as_bytes())?;
        }
        Ok(recipe_sha)
    }

    /// The newest complete checkpoint (its JSON half exists and names a tensor file that exists).
    pub fn latest_checkpoint(&self) -> Result<Option<(CheckpointInfo, PathBuf)>> {
        let dir = self.checkpoints();
        if !dir.is_dir() {
            return Ok(None);
        }
        let mut best: Option<(CheckpointInfo, PathBuf)> = None;
        for e in std::fs::read_dir(&dir).with_file(&dir)? {
            let p = e.with_file(&dir)?.path();
            if p.extension().is_some_and(|x| x == "json") && !p.file_name().unwrap_or_default().to_string_lossy().starts_with('.') {
                let text = std::fs::read_to_string(&p).with_file(&p)?;
                let info: CheckpointInfo = serde_json::from_str(&text).map_err(|e| Error::malformed(&p, e.to_string()))?;
                let tensors = p.with_extension("safetensors");
                if tensors.exists() && best.as_ref().is_none_or(|(b, _)| info.global_step > b.global_step) {
                    best = Some((info, tensors));
                }
            }
        }
        Ok(best)
    }

    /// Write a checkpoint (tensors first, then its JSON) and keep the newest `keep`.
    pub fn save_checkpoint(&self, info: &CheckpointInfo, tensors: &[(String, Tensor)], keep: usize) -> Result<()> {
        let base = self.checkpoints().join(format!("step-{:07}", info.global_step));
        write_tensors(&base.with_extension("safetensors"), tensors, &[])?;
        write_json(&base.with_extension("json"), info)?;
        self.prune_checkpoints(keep)
    }

    fn prune_checkpoints(&self, keep: usize) -> Result<()> {
        let dir = self.checkpoints();
        let mut steps: Vec<PathBuf> = std::fs::read_dir(&dir)
            .with_file(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        steps.sort();
        if steps.len() > keep.max(1) {
            for p in &steps[..steps.len() - keep.max(1)] {
                let _ = std::fs::remove_file(p);
                let _ = std::fs::remove_file(p.with_extension("safetensors"));
            }
        }
        Ok(())
    }

    /// Write expert `k`'s tensors with the expert metadata (its σ range `[lo, hi)`).
    pub fn write_expert(&self, k: usize, tensors: &[(String, Tensor)], range: (f64, f64)) -> Result<()> {
        let (lo, hi) = range;
        let md = vec![
            ("phasekit.format".to_string(), EXPERT_FORMAT.to_string()),
            ("phasekit.expert".to_string(), k.to_string()),
            ("phasekit.sigma_range".to_string(), format!("[{lo},{hi})")),
        ];
        write_tensors(&self.expert(k), tensors, &md)
    }

    /// Keep `log.jsonl` consistent with the checkpoint a run resumes from (drop lines after
    /// `keep_until`) and open it for appending.
    pub fn open_log(&self, resume: bool, keep_until: u64) -> Result<RunLog> {
        let path = self.path.join("log.jsonl");
        let mut text = String::new();
        if resume && path.exists() {
            for l in std::fs::read_to_string(&path).with_file(&path)?.lines() {
                if let Ok(x) = serde_json::from_str::<LogLine>(l) {
                    if x.global_step <= keep_until {
                        text.push_str(l);
                        text.push('\n');
                    }
                }
            }
        }
        atomic::write_file(&path, text.as_bytes())?;
        let file = std::fs::OpenOptions::new().append(true).open(&path).with_file(&path)?;
        Ok(RunLog { file: Some(file), path })
    }

    /// The lines of `log.jsonl` (lines that do not parse are skipped).
    pub fn read_log(&self) -> Result<Vec<LogLine>> {
        let log = self.path.join("log.jsonl");
        Ok(std::fs::read_to_string(&log).with_file(&log)?.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
    }
}

/// `log.jsonl`, open for appending (or a log that writes nothing: ranks other than 0).
pub struct RunLog {
    file: Option<std::fs::File>,
    path: PathBuf,
}

impl RunLog {
    /// A log that drops every line.
    pub fn none() -> RunLog {
        RunLog { file: None, path: PathBuf::new() }
    }

    pub fn append(&mut self, line: &LogLine) -> Result<()> {
        let Some(f) = &mut self.file else { return Ok(()) };
        let text = serde_json::to_string(line).map_err(|e| Error::internal(e.to_string()))?;
        writeln!(f, "{text}").with_file(&self.path)
    }
}

/// One line of `log.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogLine {
    pub phase: usize,
    pub step: u64,
    pub global_step: u64,
    pub gen_loss: f64,
    pub fake_loss: f64,
    pub gen_grad_norm: f64,
    pub seconds: f64,
    /// On the last update of a phase: the phase's peak memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<PhaseMemory>,
}

/// The JSON half of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointInfo {
    pub format: String,
    pub phase: usize,
    /// Generator updates done in `phase`.
    pub step: u64,
    pub global_step: u64,
    pub rng_state: u64,
    pub gen_opt_step: u64,
    pub fake_opt_step: u64,
    pub recipe_sha256: String,
    pub teacher_sha256: String,
    /// Data-parallel runs: every rank's RNG state, in rank order (`rng_state` is rank 0's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rng_states: Vec<u64>,
}

/// Progress of a run, for a progress bar.
#[derive(Debug, Clone)]
pub enum Event {
    Pretrain { step: u64, total: u64, loss: f64 },
    Step { phase: usize, phases: usize, global_step: u64, total: u64, gen_loss: f64, fake_loss: f64 },
}

/// What `train` returns.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub run_dir: PathBuf,
    pub completed: bool,
    pub global_step: u64,
    pub seconds: f64,
    pub resumed_from: Option<u64>,
    pub metrics: Option<Metrics>,
    /// Peak memory of each phase this process ran.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub memory: Vec<PhaseMemory>,
    /// Data-parallel runs: this rank and a digest of its trained weights.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dist: Option<DistReport>,
}

/// Write f32 tensors as a safetensors file, atomically, through the one streaming writer
/// ([`crate::write`]): each tensor's bytes are produced when the writer reaches it (copied
/// from the device one tensor at a time), never the whole file in memory.
pub fn write_tensors(path: &Path, tensors: &[(String, Tensor)], metadata: &[(String, String)]) -> Result<()> {
    let list = tensors
        .iter()
        .map(|(n, t)| {
            let t = t.clone();
            let shape = t.dims().iter().map(|d| *d as u64).collect();
            crate::write::Tensor::computed(n.clone(), crate::DType::F32, shape, move || {
                let v = t.flatten_all().and_then(|t| t.to_dtype(candle_core::DType::F32)).and_then(|t| t.to_vec1::<f32>())?;
                Ok(bytemuck::cast_slice(&v).to_vec())
            })
        })
        .collect();
    crate::write::tensors(path, list, if metadata.is_empty() { None } else { Some(metadata) })?;
    Ok(())
}

/// Read every tensor of a safetensors file as f32 (F32 files only), with its metadata.
pub fn read_tensors(path: &Path) -> Result<(NamedTensors, Vec<(String, String)>)> {
    read_decoded(path, |name, dtype, b| {
        if dtype != crate::DType::F32 {
            return Err(Error::unsupported(format!("tensor '{name}' is {dtype}, training files are F32")));
        }
        Ok(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    })
}

/// [`read_tensors`] for condition files written by other tools (diffusers pipelines, numpy): float
/// tensors of any castable dtype (F16, BF16, F64, fp8) and integer or bool tensors (masks), all
/// returned as f32. Integers beyond 2^24 lose precision; a mask's 0 and 1 do not.
pub fn read_tensors_f32(path: &Path) -> Result<(NamedTensors, Vec<(String, String)>)> {
    use crate::DType as D;
    read_decoded(path, |name, dtype, b| {
        Ok(match dtype {
            d if d.is_castable_float() => {
                let mut v = vec![0f32; b.len() / d.size().unwrap_or(1).max(1)];
                crate::cast::decode_f32(d, b, &mut v, 1.0)?;
                v
            }
            D::Bool | D::U8 => b.iter().map(|x| *x as f32).collect(),
            D::I8 => b.iter().map(|x| *x as i8 as f32).collect(),
            D::I16 => b.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]]) as f32).collect(),
            D::U16 => b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as f32).collect(),
            D::I32 => b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap_or_default()) as f32).collect(),
            D::U32 => b.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap_or_default()) as f32).collect(),
            D::I64 => b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default()) as f32).collect(),
            D::U64 => b.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()) as f32).collect(),
            d => return Err(Error::unsupported(format!("tensor '{name}' is {d}, which phasekit cannot read as numbers"))),
        })
    })
}

/// Every tensor of a safetensors file, its bytes turned into f32 values by `decode(name, dtype,
/// bytes)` (errors get the file's path), with the file's metadata.
fn read_decoded(
    path: &Path,
    decode: impl Fn(&str, crate::DType, &[u8]) -> Result<Vec<f32>>,
) -> Result<(NamedTensors, Vec<(String, String)>)> {
    let bytes = std::fs::read(path).with_file(path)?;
    let h = st::parse(path, &bytes)?;
    let mut out = Vec::new();
    for r in &h.tensors {
        let b = &bytes[(h.data_start + r.begin) as usize..(h.data_start + r.end) as usize];
        let v = decode(&r.name, r.dtype, b).map_err(|e| e.with_path(path))?;
        let shape: Vec<usize> = r.shape.iter().map(|d| *d as usize).collect();
        out.push((r.name.clone(), Tensor::from_vec(v, shape, &Device::Cpu).map_err(Error::from)?));
    }
    Ok((out, h.metadata.unwrap_or_default()))
}

/// A scratch folder for a bench's runs, not yet made: `phasekit-TAG-PID-N` in the system's temp
/// folder (N counts within the process, so two benches of one process never share one).
pub fn scratch_dir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!("phasekit-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)))
}

/// Write a JSON file (pretty, with a final newline) atomically.
pub fn write_json(path: &Path, v: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::internal(e.to_string()))?;
    atomic::write_file(path, format!("{text}\n").as_bytes())
}
