//! What a transformer run reads and leaves besides the phase loop's files: its teacher
//! checkpoints and their identity, `transformer.json` ([`RunInfo`], what `sample --run` needs),
//! the assembler's `manifest.json`, and links to the base weights.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::data::Geometry;
use crate::error::{Error, IoContext, Result};
use crate::hash::sha256_hex;
use crate::train::recipe::{Recipe, Task, TransformerConfig};
use crate::train::rundir::{self, RunDir};
use crate::train::schedule::Schedule;

/// The teacher checkpoints of a recipe: `[high, low]` for a two-expert teacher, `[one]` otherwise.
pub fn teacher_paths(t: &TransformerConfig) -> Result<Vec<PathBuf>> {
    let paths: Vec<PathBuf> = if t.expert_boundary.is_some() {
        match t.experts.as_slice() {
            [h, l] => vec![h.into(), l.into()],
            [] => vec![Path::new(&t.checkpoint).join("high_noise_model"), Path::new(&t.checkpoint).join("low_noise_model")],
            _ => return Err(Error::usage("recipe: [transformer] experts takes two paths, [high_noise, low_noise]")),
        }
    } else {
        match t.experts.as_slice() {
            [one] => vec![one.into()],
            [] => vec![PathBuf::from(&t.checkpoint)],
            _ => return Err(Error::usage("recipe: [transformer] experts needs expert_boundary for two experts")),
        }
    };
    for p in &paths {
        if p.as_os_str().is_empty() {
            return Err(Error::usage("recipe: [transformer] checkpoint is empty"));
        }
        if !p.exists() {
            return Err(Error::io(p, std::io::Error::new(std::io::ErrorKind::NotFound, "teacher checkpoint not found")));
        }
    }
    Ok(paths)
}

/// The single safetensors file of a checkpoint path (a file, or a folder holding exactly one).
fn single_file(p: &Path) -> Option<PathBuf> {
    if p.is_file() {
        return Some(p.to_path_buf());
    }
    let files: Vec<PathBuf> = std::fs::read_dir(p)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|f| f.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    if files.len() == 1 {
        files.into_iter().next()
    } else {
        None
    }
}

/// Identity of a teacher: sha256 of every safetensors file under 2 GiB in total; above that, of
/// each file's name, size and first MiB (the header), marked `header-sha256:`.
pub fn teacher_digest(p: &Path) -> Result<String> {
    let files: Vec<PathBuf> = if p.is_file() {
        vec![p.to_path_buf()]
    } else {
        let mut v: Vec<PathBuf> = std::fs::read_dir(p)
            .with_file(p)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|f| f.extension().is_some_and(|x| x == "safetensors" || x == "gguf" || x == "json"))
            .collect();
        v.sort();
        v
    };
    let total: u64 = files.iter().filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum();
    let full = total < (2 << 30);
    let mut buf = Vec::new();
    for f in &files {
        let name = f.file_name().unwrap_or_default().to_string_lossy().to_string();
        buf.extend_from_slice(name.as_bytes());
        if full {
            buf.extend_from_slice(&std::fs::read(f).with_file(f)?);
        } else {
            use std::io::Read;
            let mut head = vec![0u8; 1 << 20];
            let mut h = std::fs::File::open(f).with_file(f)?;
            let k = h.read(&mut head).with_file(f)?;
            buf.extend_from_slice(&f.metadata().with_file(f)?.len().to_le_bytes());
            buf.extend_from_slice(&head[..k]);
        }
    }
    Ok(format!("{}sha256:{}", if full { "" } else { "header-" }, sha256_hex(&buf)))
}

/// `RUN_DIR/transformer.json`: what `sample --run` needs besides the expert files.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunInfo {
    pub format: String,
    pub name: String,
    pub model: String,
    pub family: String,
    /// Teacher checkpoints (absolute): `[high, low]` or `[one]`.
    pub teachers: Vec<String>,
    pub expert_boundary: Option<f64>,
    /// Embeddings file the conditions come from (`RUN_DIR/embeddings.safetensors` for `random:N`).
    pub embeddings: String,
    /// Text- or image-to-video (runs written before the field: text).
    #[serde(default = "t2v")]
    pub task: Task,
    pub geometry: Geometry,
    pub steps: usize,
    pub shift: f64,
    pub sigmas: Vec<f64>,
    pub teacher_guidance: f64,
    /// Per-expert guidance scales `[high_noise, low_noise]` when the recipe set them
    /// (`teacher.guidance_experts`; `teacher_guidance` is then 1).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub teacher_guidance_experts: Vec<f64>,
    /// Storage dtype of the base weights.
    #[serde(default = "f32_name")]
    pub dtype: String,
    pub experts: Vec<RunExpert>,
    /// Notes (e.g. why `manifest.json` has no base).
    pub notes: Vec<String>,
}

fn t2v() -> Task {
    Task::T2v
}

fn f32_name() -> String {
    "f32".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunExpert {
    pub file: String,
    /// Index into `teachers` of the base the LoRA applies to.
    pub base: usize,
    pub sigma_range: [f64; 2],
    pub steps: [usize; 2],
}

/// The transformer run's own file.
pub const INFO: &str = "transformer.json";

/// `manifest.json` (the assembler's `phasekit.run/1`) and `transformer.json`.
#[allow(clippy::too_many_arguments)]
pub fn write_outputs(
    r: &Recipe,
    tc: &TransformerConfig,
    run: &RunDir,
    sched: &Schedule,
    paths: &[PathBuf],
    digests: &[String],
    recipe_sha: &str,
    geo: &Geometry,
    emb_file: &str,
    gen_base: &dyn Fn(usize) -> usize,
    family: &str,
) -> Result<()> {
    let out = &run.path;
    let mut notes = Vec::new();
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    // Each generator expert's base (its teacher expert; two equal paths are one base), linked
    // into the run: the first phase's as `base.safetensors`, another as `base-<j>/base.safetensors`,
    // each with its config.json (for family detection).
    let one = |j: usize| paths.iter().position(|p| *p == paths[j]).unwrap_or(j);
    let used: Vec<usize> = (0..sched.phases.len()).map(|k| one(gen_base(k))).collect();
    let mut base_rel: Vec<Option<String>> = vec![None; paths.len()];
    for (k, &j) in used.iter().enumerate() {
        if used[..k].contains(&j) {
            continue;
        }
        let Some(f) = single_file(&paths[j]) else {
            notes.push(format!("{} is not a single safetensors file: manifest.json names no base for it", paths[j].display()));
            continue;
        };
        let (dir, rel) =
            if j == used[0] { (out.to_path_buf(), String::new()) } else { (out.join(format!("base-{j}")), format!("base-{j}/")) };
        std::fs::create_dir_all(&dir).with_file(&dir)?;
        let link = dir.join("base.safetensors");
        let _ = std::fs::remove_file(&link);
        link_or_copy(&abs(&f), &link)?;
        if let Some(cfg) = f.parent().map(|d| d.join("config.json")).filter(|c| c.is_file()) {
            let _ = std::fs::remove_file(dir.join("config.json"));
            link_or_copy(&abs(&cfg), &dir.join("config.json"))?;
        }
        base_rel[j] = Some(format!("{rel}base.safetensors"));
    }
    // Without a file for every base, the manifest names none (the assembler then asks for --base).
    let all = used.iter().all(|&j| base_rel[j].is_some());
    let base = if all { base_rel[used[0]].clone() } else { None };
    let ranges = sched.expert_ranges(tc.expert_boundary, gen_base);
    let mut experts = Vec::new();
    let mut info_experts = Vec::new();
    for (k, ph) in sched.phases.iter().enumerate() {
        let (lo, hi) = ranges[k];
        experts.push(serde_json::json!({
            "path": RunDir::expert_rel(k),
            "sigma_lo": lo,
            "sigma_hi": hi,
            "timesteps": sched.sigmas[ph.start..ph.end].iter().map(|s| s * 1000.0).collect::<Vec<f64>>(),
            "kind": "lora",
        }));
        if let (true, true, Some(b)) = (all, used[k] != used[0], &base_rel[used[k]]) {
            experts[k]["base"] = serde_json::Value::String(b.clone());
        }
        info_experts.push(RunExpert { file: RunDir::expert_rel(k), base: used[k], sigma_range: [lo, hi], steps: [ph.start, ph.end] });
    }
    let mut m = serde_json::json!({
        "format": "phasekit.run/1",
        "experts": experts,
        "shift": sched.shift,
        "steps": sched.steps(),
        "solver": "euler",
        "guidance": 1.0,
        "num_train_timesteps": 1000.0,
        "teacher_digests": digests,
        "recipe_digest": format!("sha256:{recipe_sha}"),
        "title": r.name,
        "latent": geo.latent,
    });
    if let Some(b) = base {
        m["base"] = serde_json::Value::String(b);
    }
    rundir::write_json(&out.join("manifest.json"), &m)?;
    let info = RunInfo {
        format: "phasekit-transformer-run/1".into(),
        name: r.name.clone(),
        model: r.model.clone(),
        family: family.to_string(),
        teachers: paths.iter().map(|p| abs(p).display().to_string()).collect(),
        expert_boundary: tc.expert_boundary,
        embeddings: emb_file.to_string(),
        task: r.task(),
        geometry: geo.clone(),
        steps: sched.steps(),
        shift: sched.shift,
        sigmas: sched.sigmas.clone(),
        teacher_guidance: r.teacher.guidance,
        teacher_guidance_experts: r.teacher.guidance_experts.clone(),
        dtype: tc.dtype.clone(),
        experts: info_experts,
        notes,
    };
    rundir::write_json(&out.join(INFO), &info)
}

fn link_or_copy(src: &Path, dst: &Path) -> Result<()> {
    #[cfg(unix)]
    if std::os::unix::fs::symlink(src, dst).is_ok() {
        return Ok(());
    }
    std::fs::copy(src, dst).with_file(dst)?;
    Ok(())
}

/// Whether `dir` is a transformer run (has `transformer.json`).
pub fn is_transformer_run(dir: &Path) -> bool {
    dir.join(INFO).is_file()
}
