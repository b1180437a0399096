//! LightX2V's Phased DMD trainer (ModelTC/LightX2V `lightx2v_train`, method `video_phased_dmd`):
//! its run folders as an `assemble` input, and its runtime's layout as an `export` target.
//!
//! **Run folders.** The trainer writes `checkpoint-<iteration, 9 digits>/` under its
//! `output_dir`, each finished with a `_SUCCESS` marker, holding a copy of the run's
//! `config.yaml` and per role (`student` is the high-noise student, `student_2` the low-noise
//! one; `fake*` roles are critics, not read):
//!
//! | role | LoRA | full weights, one process | full weights, FSDP |
//! |---|---|---|---|
//! | `student` | `pytorch_lora_weights.safetensors` | `model_state.pt` | `dist_state/student/` (DCP) |
//! | `student_2` | `student_2_lora/pytorch_lora_weights.safetensors` | `student_2_model/model_state.pt` | `dist_state/student_2/` |
//!
//! LoRA files hold PEFT keys as diffusers' `convert_state_dict_to_diffusers` writes them
//! (`blocks.0.self_attn.q.lora.down.weight`, Wan's own module names, no α: α is
//! `training.<role>.lora.alpha` in the config). Full weights are the native `WanModel` state dict
//! (Wan names) in `transformer_param_dtype`. DCP role folders hold `{"model", "optimizer"}`;
//! the tensor store serves the model. `trainer_state.pt` / `training_state.pt` record
//! `phased_match_timestep`, checked against the config when it can be read.
//!
//! **Boundary.** The rollout uses `training.dmd.denoising_step_list` (`[1000, 750, 500, 250]`),
//! warped (`warp_denoising_step`) through the shift of `scheduler.time_shift_settings`
//! (`σ' = s·σ/(1+(s−1)σ)`, s = `time_shift_mu`, or its exponential); the high-noise student
//! serves the steps before `training.dmd.phased.match_timestep`, the low-noise student the rest
//! (the runtime's `boundary_step_index`). phasekit's routing gives the high expert
//! `σ ≥ σ_{k−1}`, the σ of its last step, as phasekit's own trainer does.
//!
//! **Export.** LightX2V's Wan2.2 distill runner (`wan_distill_runner.py`) reads `infer_steps`,
//! `denoising_step_list`, `boundary_step_index` (high-noise model while the step index is below
//! it), `sample_shift`, `enable_cfg`, `sample_guide_scale`, and either
//! `high_noise_original_ckpt` / `low_noise_original_ckpt` (full weights) or `lora_configs`
//! entries named `high_noise_model` / `low_noise_model` (LoRAs over `model_path`'s experts).

use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

use super::assemble::{ExpertInput, Options};
use super::routing::ExpertKind;
use crate::error::{clean, Error, IoContext, Kind, Result};

/// Largest config.yaml read.
const MAX_CONFIG: u64 = 1 << 20;

/// The LightX2V checkpoint folder an assemble reads, and what it found.
#[derive(Debug, Clone)]
pub struct Import {
    pub checkpoint: PathBuf,
    pub options: Options,
    pub notes: Vec<String>,
}

/// Whether `dir` looks like a LightX2V run (`output_dir` with `checkpoint-*` folders) or one
/// of its checkpoints (`config.yaml` and `_SUCCESS`).
pub fn is_run(dir: &Path) -> bool {
    if dir.join("config.yaml").is_file() && dir.join("_SUCCESS").is_file() {
        return true;
    }
    checkpoints(dir).map(|v| !v.is_empty()).unwrap_or(false)
}

/// Finished checkpoints of an output folder, oldest first.
fn checkpoints(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).with_file(dir)?.flatten() {
        let p = e.path();
        let Some(n) = p.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("checkpoint-")) else { continue };
        if let Ok(it) = n.parse::<u64>() {
            if p.join("_SUCCESS").is_file() && p.join("config.yaml").is_file() {
                v.push((it, p));
            }
        }
    }
    v.sort();
    Ok(v)
}

/// The checkpoint to read: `dir` itself, or the newest finished `checkpoint-*` in it.
pub fn checkpoint_of(dir: &Path) -> Result<PathBuf> {
    if dir.join("config.yaml").is_file() {
        if !dir.join("_SUCCESS").is_file() {
            return Err(Error::inconsistent(dir, "has no _SUCCESS marker: the trainer did not finish writing this checkpoint"));
        }
        return Ok(dir.to_path_buf());
    }
    checkpoints(dir)?.pop().map(|(_, p)| p).ok_or_else(|| {
        Error::at(
            Kind::Usage,
            dir,
            "is not a LightX2V run: no config.yaml with _SUCCESS here and no finished checkpoint-<iteration>/ folder inside",
        )
    })
}

fn load_yaml(path: &Path) -> Result<Yaml> {
    let len = std::fs::metadata(path).with_file(path)?.len();
    if len > MAX_CONFIG {
        return Err(Error::limit(path, format!("config of {len} bytes, over the limit of {MAX_CONFIG}")));
    }
    let text = std::fs::read_to_string(path).with_file(path)?;
    let mut docs = YamlLoader::load_from_str(&text).map_err(|e| Error::malformed(path, format!("invalid YAML: {e}")))?;
    match docs.len() {
        1 => Ok(docs.remove(0)),
        n => Err(Error::malformed(path, format!("holds {n} YAML documents, expected one"))),
    }
}

/// A config value by dotted path (`training.dmd.phased.match_timestep`).
fn at<'y>(y: &'y Yaml, path: &str) -> &'y Yaml {
    path.split('.').fold(y, |v, k| &v[k])
}

fn number(y: &Yaml) -> Option<f64> {
    y.as_i64().map(|v| v as f64).or_else(|| y.as_f64())
}

/// The shift of the rollout's warp (`CausalForcingFlowMatchScheduler` built from
/// `scheduler.time_shift_settings`).
fn warp_shift(cfg: &Yaml, path: &Path) -> Result<f64> {
    let ts = at(cfg, "scheduler.time_shift_settings");
    if !(ts.is_badvalue() || ts.is_null() || ts.is_hash()) {
        return Err(Error::malformed(path, "scheduler.time_shift_settings is not a mapping"));
    }
    if ts["do_time_shift"].as_bool() == Some(false) {
        return Ok(1.0);
    }
    let mu = match &ts["time_shift_mu"] {
        Yaml::BadValue | Yaml::Null => 5.0,
        v => number(v).ok_or_else(|| Error::malformed(path, "scheduler.time_shift_settings.time_shift_mu is not a number"))?,
    };
    let shift = match ts["shift_type"].as_str().unwrap_or("linear") {
        "linear" => mu,
        "exponential" => mu.exp(),
        other => {
            return Err(Error::at(
                Kind::Unsupported,
                path,
                format!("shift_type '{}' (LightX2V knows linear and exponential)", clean(other)),
            ))
        }
    };
    for (key, default, what) in [("time_shift_power", 1.0, "a power other than 1"), ("sigma_min", 0.0, "a σ_min other than 0")] {
        let v = match &ts[key] {
            Yaml::BadValue | Yaml::Null => default,
            v => number(v).ok_or_else(|| Error::malformed(path, format!("scheduler.time_shift_settings.{key} is not a number")))?,
        };
        if v != default {
            return Err(Error::at(
                Kind::Unsupported,
                path,
                format!("the rollout schedule uses {what} ({key} = {v}); phasekit's routing records the plain shifted linear schedule"),
            ));
        }
    }
    if ts["extra_one_step"].as_bool() == Some(false) {
        return Err(Error::at(Kind::Unsupported, path, "extra_one_step: false gives a schedule phasekit's routing does not record"));
    }
    Ok(shift)
}

/// The weights file or folder of a student role, and whether it is a LoRA.
fn role_weights(ck: &Path, role: &str, lora: bool) -> Result<PathBuf> {
    let candidates: Vec<PathBuf> = match (role, lora) {
        ("student", true) => vec![ck.join("pytorch_lora_weights.safetensors"), ck.join("student_lora/pytorch_lora_weights.safetensors")],
        ("student", false) => vec![ck.join("model_state.pt"), ck.join("student_model/model_state.pt"), ck.join("dist_state/student")],
        (r, true) => vec![ck.join(format!("{r}_lora/pytorch_lora_weights.safetensors"))],
        (r, false) => vec![ck.join(format!("{r}_model/model_state.pt")), ck.join(format!("dist_state/{r}"))],
    };
    if let Some(p) = candidates.iter().find(|p| p.exists()) {
        return Ok(p.clone());
    }
    if !lora && ck.join("dist_state/.metadata").is_file() {
        return Err(Error::at(
            Kind::Unsupported,
            ck.join("dist_state"),
            "holds every role in one DCP checkpoint (the older flat layout); phasekit reads per-role folders (dist_state/<role>/)",
        ));
    }
    let shown: Vec<String> = candidates.iter().filter_map(|p| p.strip_prefix(ck).ok()).map(|p| p.display().to_string()).collect();
    Err(Error::inconsistent(
        ck,
        format!(
            "the config trains role '{role}' as {} but none of {} exists",
            if lora { "a LoRA" } else { "full weights" },
            shown.join(", ")
        ),
    ))
}

/// `phased_match_timestep` from the checkpoint's trainer state, when it can be read.
fn recorded_match(ck: &Path) -> (Option<i64>, Option<String>) {
    for name in ["trainer_state.pt", "training_state.pt"] {
        let p = ck.join(name);
        if !p.is_file() {
            continue;
        }
        return match crate::store::open_torch(&p) {
            Ok(c) => {
                let v = c
                    .pytorch
                    .and_then(|i| i.values.into_iter().find(|(k, _)| k == "phased_match_timestep"))
                    .and_then(|(_, v)| v.parse().ok());
                (v, None)
            }
            Err(e) => (None, Some(format!("{name} not read ({})", e.message()))),
        };
    }
    (None, None)
}

/// Read a LightX2V run (or one checkpoint of it) into assemble options. `expert_bases` (high,
/// low) and `base` override the bases the config names for LoRA students.
pub fn import(dir: &Path, expert_bases: &[PathBuf], base: Option<&Path>) -> Result<Import> {
    let ck = checkpoint_of(dir)?;
    let cfg_path = ck.join("config.yaml");
    let cfg = load_yaml(&cfg_path)?;
    let bad = |m: String| Error::malformed(&cfg_path, m);
    let method = at(&cfg, "training.method").as_str().unwrap_or("");
    if !method.contains("phased_dmd") {
        return Err(Error::at(
            Kind::Unsupported,
            &cfg_path,
            format!("training.method is '{}', not a Phased DMD run (video_phased_dmd)", clean(method)),
        ));
    }
    let mut notes = vec![format!("LightX2V checkpoint {}", ck.display())];
    // The denoising steps (raw, before the warp) and the phase split.
    let dmd = at(&cfg, "training.dmd");
    let steps_list: Vec<i64> = match dmd["denoising_step_list"].as_vec() {
        Some(v) => v
            .iter()
            .map(|x| x.as_i64().ok_or_else(|| bad("training.dmd.denoising_step_list holds a non-integer".into())))
            .collect::<Result<_>>()?,
        None => {
            let n = dmd["num_inference_steps"].as_i64().unwrap_or(4);
            notes.push(format!("no training.dmd.denoising_step_list: the uniform list of num_inference_steps = {n}"));
            (0..n).map(|k| (1000.0 * (1.0 - k as f64 / n as f64)).round() as i64).collect()
        }
    };
    let n = steps_list.len();
    if n < 2 {
        return Err(bad(format!("denoising_step_list {steps_list:?} has fewer than two steps")));
    }
    let uniform: Vec<i64> = (0..n).map(|k| (1000.0 * (1.0 - k as f64 / n as f64)).round() as i64).collect();
    if steps_list != uniform {
        return Err(Error::at(
            Kind::Unsupported,
            &cfg_path,
            format!(
                "denoising_step_list {steps_list:?} is not the uniform grid {uniform:?} that phasekit's routing (steps + shift) records"
            ),
        ));
    }
    let warp = dmd["warp_denoising_step"].as_bool().unwrap_or(true);
    let shift = if warp { warp_shift(&cfg, &cfg_path)? } else { 1.0 };
    let match_t = match &dmd["phased"]["match_timestep"] {
        Yaml::BadValue | Yaml::Null => 500,
        v => v.as_i64().ok_or_else(|| bad("training.dmd.phased.match_timestep is not an integer".into()))?,
    };
    let k = steps_list
        .iter()
        .position(|&t| t == match_t)
        .ok_or_else(|| Error::inconsistent(&cfg_path, format!("match_timestep {match_t} is not in denoising_step_list {steps_list:?}")))?;
    if k == 0 {
        return Err(Error::inconsistent(&cfg_path, format!("match_timestep {match_t} leaves the high-noise student no step")));
    }
    let infer = at(&cfg, "inference");
    if let Some(b) = infer["boundary_step_index"].as_i64() {
        if b != k as i64 {
            return Err(Error::inconsistent(
                &cfg_path,
                format!("inference.boundary_step_index is {b} but match_timestep {match_t} is step {k} of {steps_list:?}"),
            ));
        }
    }
    if let Some(v) = infer["denoising_step_list"].as_vec() {
        let l: Vec<i64> = v.iter().filter_map(Yaml::as_i64).collect();
        if l != steps_list {
            return Err(Error::inconsistent(
                &cfg_path,
                format!("inference.denoising_step_list {l:?} differs from training's {steps_list:?}"),
            ));
        }
    }
    match recorded_match(&ck) {
        (Some(m), _) if m != match_t => {
            return Err(Error::inconsistent(
                &ck,
                format!("the trainer state records phased_match_timestep {m} but config.yaml says {match_t}"),
            ))
        }
        (Some(_), _) => notes.push(format!("trainer state agrees: phased_match_timestep {match_t}")),
        (None, Some(why)) => notes.push(why),
        (None, None) => {}
    }
    let sigma = |raw: i64| {
        let s = raw as f64 / 1000.0;
        shift * s / (1.0 + (shift - 1.0) * s)
    };
    let boundary = sigma(steps_list[k - 1]);
    let guidance = if infer["enable_cfg"].as_bool() == Some(true) { number(&infer["cfg_guidance_scale"]).unwrap_or(1.0) } else { 1.0 };

    // Students.
    let mut experts = Vec::new();
    for (role, name, lo, hi) in [("student", "high_noise", boundary, 1.0), ("student_2", "low_noise", 0.0, boundary)] {
        let rc = at(&cfg, &format!("training.{role}"));
        let kind = match rc["train_type"].as_str() {
            Some("lora") => ExpertKind::Lora,
            Some("full") => ExpertKind::Full,
            other => return Err(bad(format!("training.{role}.train_type is {other:?}, expected 'full' or 'lora'"))),
        };
        let lora = kind == ExpertKind::Lora;
        let path = role_weights(&ck, role, lora)?;
        let (alpha, base) = if lora {
            let r = number(&rc["lora"]["rank"]).ok_or_else(|| bad(format!("training.{role}.lora.rank is missing")))?;
            let a = number(&rc["lora"]["alpha"]).ok_or_else(|| bad(format!("training.{role}.lora.alpha is missing")))?;
            notes.push(format!("{role}: LoRA rank {r}, alpha {a} (from config.yaml; the file stores none)"));
            let i = experts.len();
            let from_cfg = || -> Option<PathBuf> {
                let key = if role == "student" {
                    "model.pretrained_model_name_or_path".to_string()
                } else {
                    format!("model.{role}.pretrained_model_name_or_path")
                };
                at(&cfg, &key).as_str().or_else(|| at(&cfg, "model.pretrained_model_name_or_path").as_str()).map(PathBuf::from)
            };
            let b = expert_bases.get(i).cloned().or_else(|| base.map(Path::to_path_buf)).or_else(from_cfg).ok_or_else(|| {
                Error::usage(format!("no base for LoRA role {role}: the config names none; pass --expert-base (high, then low)"))
            })?;
            if !b.exists() {
                return Err(Error::at(
                    Kind::Usage,
                    &b,
                    format!("base of LoRA role {role} (from config.yaml) does not exist here; pass --expert-base with the teacher's expert folders (high, then low)"),
                ));
            }
            (Some(a), Some(b))
        } else {
            (None, None)
        };
        notes.push(format!("{role} → expert {name}: {}", path.strip_prefix(&ck).unwrap_or(&path).display()));
        experts.push(ExpertInput {
            path,
            sigma_lo: lo,
            sigma_hi: hi,
            name: Some(name.to_string()),
            guidance: None,
            kind: Some(kind),
            base,
            lora_alpha: alpha,
        });
    }
    let title = at(&cfg, "training.output_dir")
        .as_str()
        .and_then(|s| Path::new(s).file_name().map(|n| n.to_string_lossy().into_owned()))
        .or_else(|| ck.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()));
    notes.push(format!(
        "routing: {n} steps, shift {shift} (warp {}), high-noise student while σ ≥ {boundary} (steps 0..{k}), low-noise from step {k} (match_timestep {match_t})",
        if warp { "on" } else { "off" }
    ));
    let options = Options { experts, steps: n as u32, shift, guidance, title, ..Options::default() };
    Ok(Import { checkpoint: ck, options, notes })
}

/// The `config.json` of LightX2V's Wan2.2 distill runner for a routing table: steps, switch and
/// the expert files (`full`: `*_original_ckpt` paths; LoRA: `lora_configs`).
pub fn runtime_config(r: &super::routing::Routing, files: (&str, &str), lora: bool) -> Result<(serde_json::Value, f64)> {
    let Some((hi, lo, _)) = r.two_expert_boundary() else {
        return Err(Error::unsupported(format!(
            "LightX2V's Wan2.2 runner switches between two experts; this checkpoint has {}",
            r.experts.len()
        )));
    };
    let (list, err) = super::boundary::lightx2v_steps(r)?;
    let b = super::boundary::boundaries(r);
    let g = |i: usize| r.experts[i].guidance.unwrap_or(r.guidance);
    let mut c = serde_json::json!({
        "infer_steps": r.steps,
        "denoising_step_list": list,
        "boundary_step_index": b[0].step_index,
        "sample_shift": r.shift,
        "enable_cfg": g(hi) != 1.0 || g(lo) != 1.0,
        "sample_guide_scale": [g(hi), g(lo)],
    });
    if lora {
        c["lora_configs"] = serde_json::json!([
            {"name": "high_noise_model", "path": files.0, "strength": 1.0},
            {"name": "low_noise_model", "path": files.1, "strength": 1.0},
        ]);
    } else {
        c["high_noise_original_ckpt"] = files.0.into();
        c["low_noise_original_ckpt"] = files.1.into();
    }
    Ok((c, err))
}
