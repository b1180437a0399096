//! `phasekit export`: the per-expert files runtimes load today (DESIGN decision 7).
//!
//! - `comfy`: one full-weight file per expert in ComfyUI names (Wan2.2: `*_high_noise` /
//!   `*_low_noise`), LoRA experts baked into their own base, optional `model.diffusion_model.` prefix;
//! - `diffusers`: `transformer/` (+ `transformer_2/` for two experts), `model_index.json` with
//!   `boundary_ratio`, `scheduler/scheduler_config.json` with the distilled shift;
//! - `lora`: Lightning/kohya files per LoRA expert (`high_noise_model.safetensors`, keys
//!   `[diffusion_model.]<param>.lora_down.weight` / `.lora_up.weight` / `.alpha`, nothing else);
//! - `gguf`: one GGUF per expert through the conversion pipeline (ComfyUI-GGUF rules);
//! - `lightx2v`: LightX2V's Wan2.2 distill layout, per-expert files plus the `config.json` keys
//!   its runner reads (`denoising_step_list`, `boundary_step_index`, ...; [`super::lightx2v`]).
//!
//! Every target gets a `README.md` with the sampler settings the experts were distilled for.
//! The folder appears only when complete.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::assemble::{writer_tensors, OutT, Src};
use super::format::{self, lora_part, LoraPart};
use super::loader::MoeCheckpoint;
use super::routing::{ExpertKind, Routing};
use crate::atomic::AtomicDir;
use crate::dtype::DType;
use crate::error::{clean, Error, Kind, Result};
use crate::layout::{Layout, Registry};
use crate::progress::Progress;
use crate::quant::GgmlType;
use crate::store::Encoding;
use crate::write::{self, Written, WEIGHTS_NAME};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Comfy,
    Diffusers,
    Lora,
    Gguf,
    /// LightX2V's Wan2.2 distill runner (`--model_cls wan2.2_moe_distill`).
    Lightx2v,
}

#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub target: Target,
    /// ComfyUI: prefix names with `model.diffusion_model.`.
    pub comfy_prefix: bool,
    /// LoRA: prefix keys with `diffusion_model.` (Lightning's files do).
    pub lora_prefix: bool,
    pub dtype: Option<DType>,
    pub quant: Option<GgmlType>,
    pub sidecar: bool,
    pub force: bool,
    pub quiet: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    pub input: PathBuf,
    pub output: PathBuf,
    pub target: Target,
    pub files: Vec<Written>,
    pub seconds: f64,
}

/// File stem role of expert i: `high_noise` / `low_noise` for Wan-style two-expert routing.
pub fn role(r: &Routing, i: usize) -> String {
    match r.two_expert_boundary() {
        Some((hi, _, _)) => if i == hi { "high_noise" } else { "low_noise" }.to_string(),
        None => r.experts[i].name.clone(),
    }
}

/// Experts in sampling order (highest σ first).
fn sampling_order(r: &Routing) -> Vec<usize> {
    let mut v: Vec<usize> = (0..r.experts.len()).collect();
    v.sort_by(|&a, &b| r.experts[b].sigma_lo.total_cmp(&r.experts[a].sigma_lo));
    v
}

/// The README snippet with the sampler settings.
pub fn readme(m: &MoeCheckpoint, target: Target, files: &[String]) -> String {
    let r = m.routing();
    let mut s = format!(
        "# {} — exported by phasekit ({target:?})\n\n",
        m.checkpoint().path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
    );
    s.push_str("Use exactly these sampler settings; the experts were distilled for them.\n\n");
    s.push_str(&format!(
        "- steps: **{}**\n- shift: **{}**\n- solver: **{}**\n- CFG / guidance: **{}** (CFG off)\n",
        r.steps, r.shift, r.solver, r.guidance
    ));
    s.push_str(&format!(
        "- timesteps (t = 1000·σ): {:?}\n",
        r.sigmas.iter().map(|x| (x * r.num_train_timesteps * 1000.0).round() / 1000.0).collect::<Vec<_>>()
    ));
    let mut step = 0;
    for &i in &sampling_order(r) {
        let e = &r.experts[i];
        let n = e.timesteps.len();
        s.push_str(&format!(
            "- expert `{}` ({}): σ ∈ [{}, {}){}, steps {}..{} (timesteps {:?})\n",
            role(r, i),
            e.kind.as_str(),
            e.sigma_lo,
            e.sigma_hi,
            if e.sigma_hi == 1.0 { " and σ = 1" } else { "" },
            step,
            step + n,
            e.timesteps
        ));
        step += n;
    }
    if let Some((hi, _, b)) = r.two_expert_boundary() {
        s.push_str(&format!(
            "- switch: boundary_ratio **{b}** (use the high-noise expert while t ≥ {}), i.e. switch after step **{}** of {}\n",
            b * r.num_train_timesteps,
            r.experts[hi].timesteps.len(),
            r.steps
        ));
    }
    s.push_str("\nFiles: ");
    s.push_str(&files.join(", "));
    s.push_str("\n\n");
    s.push_str(match target {
        Target::Comfy => "ComfyUI: put the files in `models/diffusion_models/`, load each with a `UNETLoader`, and run two `KSamplerAdvanced` nodes (sampler `euler`, scheduler `simple`, cfg 1) over the step ranges above, high noise first.\n",
        Target::Diffusers => "diffusers: copy `text_encoder/`, `tokenizer/` and `vae/` from the base pipeline into this folder, then `Pipeline.from_pretrained(folder)` and call it with `num_inference_steps` and `guidance_scale` above. `boundary_ratio` in `model_index.json` routes `transformer` (t ≥ boundary) and `transformer_2`.\n",
        Target::Lora => "LoRA (Lightning/kohya keys): load `high_noise_model.safetensors` on the high-noise model and `low_noise_model.safetensors` on the low-noise model at strength 1 (ComfyUI `LoraLoaderModelOnly`; diffusers `load_lora_weights(..., load_into_transformer_2=True)` for the second).\n",
        Target::Gguf => "GGUF: put the files in `models/unet/` for ComfyUI-GGUF (`UnetLoaderGGUF`), or pass them to stable-diffusion.cpp as `--high-noise-diffusion-model` / `--diffusion-model` with `--steps`, `--high-noise-steps`, `--flow-shift` and `--cfg-scale 1` as above.\n",
        Target::Lightx2v => "LightX2V: `python -m lightx2v.infer --model_cls wan2.2_moe_distill --task t2v --model_path <Wan2.2-A14B folder> --config_json config.json ...` from this folder (the file paths in `config.json` are relative to it; make them absolute to run from elsewhere). `--model_path` supplies the VAE and text encoder, and for LoRA exports the two base experts (`high_noise_model/`, `low_noise_model/`). `boundary_step_index` switches experts by step, `denoising_step_list` with `sample_shift` gives the same σ as above.\n",
    });
    s
}

/// Rename a stored parameter name into `to`'s names (identity without a known family).
pub(super) fn rename(m: &MoeCheckpoint, name: &str, to: Layout) -> Result<String> {
    let info = &m.meta().model;
    let (Some(f), Some(l)) = (info.family.as_deref(), info.layout.as_deref()) else { return Ok(name.to_string()) };
    let fam = Registry::builtin().require(f)?;
    let from: Layout = l.parse()?;
    if fam.names_layout(from)? == fam.names_layout(to).unwrap_or(fam.canonical_layout()) {
        return Ok(name.to_string());
    }
    fam.rename(from, to, name)
}

fn index_of(m: &MoeCheckpoint) -> std::collections::HashMap<&str, usize> {
    m.checkpoint().tensors.iter().enumerate().map(|(i, t)| (t.name.as_str(), i)).collect()
}

/// Expert i as full weights (LoRA merged), names mapped by `name`.
pub(super) fn full_tensors(m: &MoeCheckpoint, i: usize, dtype: Option<DType>, name: &dyn Fn(&str) -> Result<String>) -> Result<Vec<OutT>> {
    let idx = index_of(m);
    let ck = m.checkpoint();
    let dt = |t: usize| match ck.tensors[t].encoding {
        Encoding::Dense(d) => d,
        Encoding::Ggml(_) => DType::U8,
    };
    let cast = |d: DType| match dtype {
        Some(x) if d.is_castable_float() => x,
        _ => d,
    };
    let mut out = Vec::new();
    match m.kind(i) {
        ExpertKind::Full => {
            for (p, stored) in m.expert_params(i) {
                let t = idx[stored.as_str()];
                out.push(OutT { name: name(&p)?, dtype: cast(dt(t)), shape: ck.tensors[t].shape.clone(), src: Src::Copy { ck: 0, t } });
            }
        }
        ExpertKind::Lora => {
            let params = m.expert_params(i);
            for (p, stored) in m.meta().expert_base_tensors(i) {
                let bt = idx[stored.as_str()];
                let lp = p.strip_suffix(".weight");
                let get = |part: LoraPart| lp.and_then(|lp| params.get(&format!("{lp}{}", part.suffix()))).map(|s| idx[s.as_str()]);
                let src = match (get(LoraPart::Down), get(LoraPart::Up)) {
                    (Some(down), Some(up)) => {
                        let alpha = match get(LoraPart::Alpha) {
                            Some(a) => {
                                let e = &ck.tensors[a];
                                let v = crate::lora::keys::alpha_value(dt(a), ck.bytes(e)).ok_or_else(|| {
                                    Error::malformed(&ck.path, format!("LoRA alpha '{}' is not one integer or float value", clean(&e.name)))
                                })?;
                                Some(v as f32)
                            }
                            None => None,
                        };
                        Src::Merge { base: (0, bt), ck: 0, down, up, alpha }
                    }
                    _ => Src::Copy { ck: 0, t: bt },
                };
                out.push(OutT { name: name(&p)?, dtype: cast(dt(bt)), shape: ck.tensors[bt].shape.clone(), src });
            }
        }
    }
    Ok(out)
}

pub(super) fn write_one(
    m: &MoeCheckpoint,
    tensors: &[OutT],
    path: &Path,
    md: Vec<(String, String)>,
    opts: &ExportOptions,
    progress: &Progress,
) -> Result<Vec<Written>> {
    let wopts = write::Options {
        file_hash: if opts.sidecar { write::FileHash::AfterWriting } else { write::FileHash::None },
        // The hashes are not stored, but this path computes casts and merges in parallel batches.
        tensor_hashes: true,
        ..write::Options::default()
    };
    let cks = std::slice::from_ref(m.checkpoint());
    write::safetensors(path, writer_tensors(cks, tensors), write::Metadata::Fixed(Some(md)), &wopts, progress)?.commit()
}

pub(super) fn write_json(path: &Path, v: &serde_json::Value) -> Result<Written> {
    let mut text = serde_json::to_string_pretty(v).expect("json");
    text.push('\n');
    crate::atomic::write_file(path, text.as_bytes())?;
    Ok(Written { path: path.to_path_buf(), bytes: text.len() as u64, sha256: None })
}

/// Export the checkpoint at `input` into the folder `output`.
pub fn export(input: &Path, output: &Path, opts: &ExportOptions) -> Result<ExportReport> {
    let start = std::time::Instant::now();
    crate::atomic::check_target(output, opts.force)?;
    let m = MoeCheckpoint::open(input)?;
    let r = m.routing().clone();
    let stem = input.file_stem().map(|s| s.to_string_lossy().replace(".safetensors", "")).unwrap_or_else(|| "model".into());
    let stem = stem.strip_suffix(".safetensors").unwrap_or(&stem).to_string();
    let dir = AtomicDir::create(output)?;
    let progress = if opts.quiet { Progress::hidden() } else { Progress::bytes(m.checkpoint().data_bytes(), "export", false) };
    let info = m.meta().model.clone();
    let family = info.family.as_deref().map(|f| Registry::builtin().require(f)).transpose()?;
    let mut files: Vec<Written> = Vec::new();
    let mut extra_readme = String::new();
    let order = sampling_order(&r);
    let ms = |i: usize, lora: bool| -> Vec<(String, String)> {
        let mut v = vec![("format".to_string(), "pt".to_string())];
        v.extend(format::modelspec(&r, &info, &format!("{stem} {}", role(&r, i)), Some(i), lora));
        v
    };
    match opts.target {
        Target::Comfy | Target::Gguf => {
            let names_to = family.map_or(Layout::Comfy, |f| f.comfy_names_layout());
            for &i in &order {
                let prefix = opts.comfy_prefix && opts.target == Target::Comfy;
                let ts = full_tensors(&m, i, opts.dtype, &|p| {
                    let n = rename(&m, p, names_to)?;
                    Ok(if prefix { format!("model.diffusion_model.{n}") } else { n })
                })?;
                let file = dir.path().join(format!("{stem}_{}.safetensors", role(&r, i)));
                let w = write_one(
                    &m,
                    &ts,
                    &file,
                    ms(i, false),
                    &ExportOptions { sidecar: opts.sidecar && opts.target == Target::Comfy, ..opts.clone() },
                    &progress,
                )?;
                if opts.target == Target::Gguf {
                    family.ok_or_else(|| Error::unsupported("GGUF export needs a known model family (the checkpoint records none)"))?;
                    let g = file.with_extension("gguf");
                    let copts = crate::convert::Options {
                        format: crate::convert::OutFormat::Gguf,
                        quant: opts.quant,
                        sha256: opts.sidecar,
                        quiet: true,
                        ..crate::convert::Options::default()
                    };
                    let rep = crate::convert::convert(&file, &g, &copts)?;
                    std::fs::remove_file(&file).map_err(|e| Error::io(&file, e))?;
                    files.extend(rep.files);
                } else {
                    files.extend(w);
                }
            }
        }
        Target::Diffusers => {
            let f =
                family.ok_or_else(|| Error::unsupported("diffusers export needs a known model family (the checkpoint records none)"))?;
            if r.experts.len() > 2 {
                return Err(Error::new(
                    Kind::Unsupported,
                    format!(
                        "diffusers pipelines load at most two experts; this checkpoint has {} (use --to comfy or gguf)",
                        r.experts.len()
                    ),
                ));
            }
            let from: Layout = info.layout.as_deref().unwrap_or("diffusers").parse()?;
            let config = match &info.config {
                Some(c) => Some(f.translate_config(from, Layout::Diffusers, c)?),
                None => None,
            };
            let (pipe, class) = match f.name() {
                "wan22" => ("WanPipeline", "WanTransformer3DModel"),
                "qwen_image" => ("QwenImagePipeline", "QwenImageTransformer2DModel"),
                other => return Err(Error::unsupported(format!("no diffusers pipeline known for family {other}"))),
            };
            let mut index = serde_json::json!({ "_class_name": pipe, "_diffusers_version": "0.35.0", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"] });
            for (k, &i) in order.iter().enumerate() {
                let sub = if k == 0 { "transformer" } else { "transformer_2" };
                let d = dir.path().join(sub);
                std::fs::create_dir(&d).map_err(|e| Error::io(&d, e))?;
                let ts = full_tensors(&m, i, opts.dtype, &|p| rename(&m, p, Layout::Diffusers))?;
                files.extend(write_one(&m, &ts, &d.join(WEIGHTS_NAME), ms(i, false), opts, &progress)?);
                if let Some(c) = &config {
                    let mut c = c.clone();
                    if let Some(o) = c.as_object_mut() {
                        o.insert("_class_name".into(), class.into());
                    }
                    files.push(write_json(&d.join("config.json"), &c)?);
                }
                index[sub] = serde_json::json!(["diffusers", class]);
            }
            if let Some((_, _, b)) = r.two_expert_boundary() {
                index["boundary_ratio"] = serde_json::json!(b);
            }
            let sd = dir.path().join("scheduler");
            std::fs::create_dir(&sd).map_err(|e| Error::io(&sd, e))?;
            files.push(write_json(
                &sd.join("scheduler_config.json"),
                &serde_json::json!({
                    "_class_name": "FlowMatchEulerDiscreteScheduler",
                    "_diffusers_version": "0.35.0",
                    "num_train_timesteps": r.num_train_timesteps.round() as u64,
                    "shift": r.shift,
                    "use_dynamic_shifting": false,
                    "phasekit_num_inference_steps": r.steps,
                    "phasekit_guidance_scale": r.guidance,
                }),
            )?);
            files.push(write_json(&dir.path().join("model_index.json"), &index)?);
        }
        Target::Lightx2v => {
            let f = family.filter(|f| f.name() == "wan22").ok_or_else(|| {
                Error::unsupported(format!(
                    "LightX2V export is for Wan2.2 experts; this checkpoint records family {}",
                    info.family.as_deref().unwrap_or("none")
                ))
            })?;
            let (hi, lo, _) = r.two_expert_boundary().ok_or_else(|| {
                Error::unsupported(format!(
                    "LightX2V's Wan2.2 runner switches between two experts; this checkpoint has {}",
                    r.experts.len()
                ))
            })?;
            let lora = m.kind(hi) == ExpertKind::Lora && m.kind(lo) == ExpertKind::Lora;
            let names_to = f.comfy_names_layout();
            let mut names = Vec::new();
            for (i, tag) in [(hi, "high_noise"), (lo, "low_noise")] {
                let fname = format!("{stem}_{tag}{}.safetensors", if lora { "_lora" } else { "" });
                let ts = if lora {
                    lora_tensors(&m, i, opts, names_to, input)?
                } else {
                    full_tensors(&m, i, opts.dtype, &|p| rename(&m, p, names_to))?
                };
                files.extend(write_one(&m, &ts, &dir.path().join(&fname), ms(i, lora), opts, &progress)?);
                names.push(fname);
            }
            let (cfg, err) = super::lightx2v::runtime_config(&r, (&names[0], &names[1]), lora)?;
            files.push(write_json(&dir.path().join("config.json"), &cfg)?);
            if err > 1e-9 {
                extra_readme.push_str(&format!(
                    "\nNote: `denoising_step_list` rounds the steps to whole timesteps; LightX2V samples σ up to {err:.2e} away from the σ above.\n"
                ));
            }
        }
        Target::Lora => {
            let names_to = family.map_or(Layout::Comfy, |f| f.comfy_names_layout());
            for &i in &order {
                let ts = lora_tensors(&m, i, opts, names_to, input)?;
                let fname = if r.two_expert_boundary().is_some() {
                    format!("{}_model.safetensors", role(&r, i))
                } else {
                    format!("{}.safetensors", r.experts[i].name)
                };
                files.extend(write_one(&m, &ts, &dir.path().join(fname), ms(i, true), opts, &progress)?);
            }
        }
    }
    let names: Vec<String> =
        files.iter().filter_map(|w| w.path.strip_prefix(dir.path()).ok().map(|p| format!("`{}`", p.display()))).collect();
    files.push(write_json_text(&dir.path().join("README.md"), &(readme(&m, opts.target, &names) + &extra_readme))?);
    dir.commit()?;
    progress.finish();
    for w in &mut files {
        if let Ok(rel) = w.path.strip_prefix(dir_tmp_parent(&w.path, output)) {
            w.path = output.join(rel);
        }
    }
    Ok(ExportReport {
        input: input.to_path_buf(),
        output: output.to_path_buf(),
        target: opts.target,
        files,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Expert i's LoRA tensors under Lightning/kohya keys in `names_to` names (`diffusion_model.`
/// prefix when `opts.lora_prefix`).
fn lora_tensors(m: &MoeCheckpoint, i: usize, opts: &ExportOptions, names_to: Layout, input: &Path) -> Result<Vec<OutT>> {
    if m.kind(i) != ExpertKind::Lora {
        return Err(Error::new(
            Kind::Unsupported,
            format!("expert {} holds full weights; LoRA export needs LoRA experts (use --to comfy)", m.routing().experts[i].name),
        ));
    }
    let idx = index_of(m);
    let mut ts = Vec::new();
    for (p, stored) in m.expert_params(i) {
        let (target, part) = lora_part(&p).ok_or_else(|| Error::inconsistent(input, format!("'{}' is not a LoRA tensor", clean(&p))))?;
        let w = rename(m, &format!("{target}.weight"), names_to)?;
        let base = w.strip_suffix(".weight").unwrap_or(&w);
        let key = format!("{}{base}{}", if opts.lora_prefix { "diffusion_model." } else { "" }, part.suffix());
        let t = idx[stored.as_str()];
        let ck = m.checkpoint();
        let d = match ck.tensors[t].encoding {
            Encoding::Dense(d) => d,
            Encoding::Ggml(_) => DType::U8,
        };
        let want = if part == LoraPart::Alpha { d } else { opts.dtype.filter(|_| d.is_castable_float()).unwrap_or(d) };
        ts.push(OutT { name: key, dtype: want, shape: ck.tensors[t].shape.clone(), src: Src::Copy { ck: 0, t } });
    }
    Ok(ts)
}

fn write_json_text(path: &Path, text: &str) -> Result<Written> {
    crate::atomic::write_file(path, text.as_bytes())?;
    Ok(Written { path: path.to_path_buf(), bytes: text.len() as u64, sha256: None })
}

/// The temporary folder a written path lives in (the ancestor that is a sibling of `output`).
fn dir_tmp_parent(p: &Path, output: &Path) -> PathBuf {
    let parent = output.parent().unwrap_or(Path::new(""));
    let mut cur = p;
    while let Some(up) = cur.parent() {
        if up == parent {
            return cur.to_path_buf();
        }
        cur = up;
    }
    p.to_path_buf()
}
