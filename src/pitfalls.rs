//! Mistakes that render "silently wrong": checks that turn them into errors or warnings.
//!
//! - **A lone Wan2.2 A14B expert taken for Wan2.1-14B.** A Wan2.2 T2V-A14B expert has exactly
//!   the tensors and shapes of Wan2.1 T2V-14B; it was trained for half of the noise range only.
//!   The files can tell them apart only by what surrounds the tensors: the expert folders
//!   (`high_noise_model/`, `low_noise_model/`), a diffusers pipeline with `transformer_2` and
//!   `boundary_ratio`, file names (`wan2.2_t2v_high_noise_14B_fp16.safetensors`,
//!   `Wan2.2-T2V-A14B-LowNoise-Q4_K_M.gguf`, `wan2.1_t2v_14B_bf16.safetensors`), metadata or GGUF
//!   keys naming the release. I2V is decidable from the keys: Wan2.1 I2V-14B has the CLIP image
//!   embedder (`img_emb.*`), the Wan2.2 I2V-A14B experts do not. [`wan_release`] collects the
//!   evidence; `inspect` shows it and says so when there is none; [`check_experts`] refuses an
//!   assembly that routes a known expert to the wrong noise range, uses one expert twice, or
//!   makes a whole model of one expert.
//! - **Scaled fp8 with a missing or empty scale** ([`check_scaled_fp8`]): a scaled-fp8 file
//!   (ComfyUI's `scaled_fp8` marker, or `.scale_weight` / `.weight_scale` companions) must give
//!   every fp8 weight a finite, positive scale; a missing one would be read as scale 1.
//! - **A LoRA trained on a bf16 base, stored next to an fp8 base** ([`lora_on_fp8_base`]):
//!   known to give grid artifacts (LightX2V-Qwen-Image-Lightning#32, LightX2V#703).

use std::path::{Component, Path};

use serde::Serialize;

use crate::dtype::DType;
use crate::error::{clean, Error, Kind, Result};
use crate::layout::Detection;
use crate::store::Checkpoint;

/// Which half of Wan2.2 A14B an expert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    HighNoise,
    LowNoise,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::HighNoise => "high-noise",
            Role::LowNoise => "low-noise",
        }
    }
}

/// What the files say about a 14B Wan checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WanRelease {
    /// `Wan2.2 A14B expert`, `Wan2.1-14B`, or `undetermined`.
    pub release: String,
    pub role: Option<Role>,
    /// Where the answer comes from (folder, file name, metadata, keys), or why there is none.
    pub evidence: Vec<String>,
}

impl WanRelease {
    pub fn is_wan22_expert(&self) -> bool {
        self.release.starts_with("Wan2.2")
    }
    pub fn undetermined(&self) -> bool {
        self.release == "undetermined"
    }
    /// One line for `inspect`.
    pub fn summary(&self) -> String {
        let what = match (self.release.as_str(), self.role) {
            (r, Some(role)) => format!("{r} ({} expert)", role.as_str()),
            (r, None) => r.to_string(),
        };
        format!("{what}: {}", self.evidence.join("; "))
    }
}

fn role_in(text: &str) -> Option<Role> {
    let t = text.to_ascii_lowercase().replace(['-', ' '], "_");
    if t.contains("high_noise") || t.contains("highnoise") {
        return Some(Role::HighNoise);
    }
    if t.contains("low_noise") || t.contains("lownoise") {
        return Some(Role::LowNoise);
    }
    // TurboDiffusion: `TurboWan2.2-I2V-A14B-high-720P.pth`; a bare `high`/`low` word counts only
    // beside the A14B name.
    let words: Vec<&str> = t.split(|c: char| !c.is_ascii_alphanumeric()).collect();
    if words.contains(&"a14b") {
        if words.contains(&"high") {
            return Some(Role::HighNoise);
        }
        if words.contains(&"low") {
            return Some(Role::LowNoise);
        }
    }
    None
}

fn release_in(text: &str) -> Option<&'static str> {
    let t = text.to_ascii_lowercase().replace(['-', '_', ' '], ".");
    let wan21 = t.contains("wan2.1") || t.contains("wan21");
    let wan22 = t.contains("wan2.2") || t.contains("wan22") || t.contains("a14b");
    // A text naming both (`T2V-A14B expert or Wan2.1 T2V-14B`, what `convert` writes as a GGUF
    // `general.name` when the release is undetermined) is no evidence.
    match (wan21, wan22) {
        (true, false) => Some("Wan2.1"),
        (false, true) => Some("Wan2.2"),
        _ => None,
    }
}

/// Which expert a checkpoint says it is, and where it says so: folder and file names (the file,
/// then up to three folders), a diffusers pipeline's `transformer` / `transformer_2` beside a
/// `model_index.json` with `boundary_ratio`, metadata (safetensors `__metadata__`, GGUF
/// `general.*`). Also the release its names or metadata mention (`Wan2.1`, `Wan2.2`).
fn evidence(ck: &Checkpoint) -> (Option<Role>, Option<&'static str>, Vec<String>) {
    let mut evidence = Vec::new();
    let mut role = None;
    let mut release = None;
    let path = ck.path.canonicalize().unwrap_or_else(|_| ck.path.clone());
    let names: Vec<String> = path
        .components()
        .rev()
        .take(4)
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    for n in &names {
        if role.is_none() {
            if let Some(r) = role_in(n) {
                role = Some(r);
                evidence.push(format!("the name '{}'", clean(n)));
            }
        }
        if release.is_none() {
            if let Some(r) = release_in(n) {
                release = Some(r);
                evidence.push(format!("the name '{}'", clean(n)));
            }
        }
    }
    let dir = if path.is_dir() { path.clone() } else { path.parent().map(Path::to_path_buf).unwrap_or_default() };
    if let (Some(sub), Some(parent)) = (dir.file_name().and_then(|n| n.to_str()), dir.parent()) {
        if (sub == "transformer" || sub == "transformer_2") && parent.join("transformer_2").is_dir() {
            let index =
                std::fs::read(parent.join("model_index.json")).ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
            if index.as_ref().is_some_and(|v| v.get("boundary_ratio").is_some_and(|b| !b.is_null())) {
                release = Some("Wan2.2");
                role.get_or_insert(if sub == "transformer" { Role::HighNoise } else { Role::LowNoise });
                evidence.push(format!("diffusers pipeline folder '{sub}' with boundary_ratio in model_index.json"));
            }
        }
    }
    let mut texts: Vec<String> = ck.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if let Some(g) = &ck.gguf {
        texts.extend(g.kv.iter().filter(|(k, _)| k.starts_with("general.")).map(|(k, v)| format!("{k}={}", v.to_json())));
    }
    for t in &texts {
        let key = t.split('=').next().unwrap_or("");
        if role.is_none() {
            if let Some(r) = role_in(t) {
                role = Some(r);
                evidence.push(format!("metadata '{}'", clean(key)));
            }
        }
        if release.is_none() {
            if let Some(r) = release_in(t) {
                release = Some(r);
                evidence.push(format!("metadata '{}'", clean(key)));
            }
        }
    }
    (role, release, evidence)
}

/// The release of a Wan checkpoint whose shapes are a 14B model's, from what surrounds its
/// tensors. `None` when the checkpoint is not such a model. `det` is a detection from the
/// tensors alone ([`crate::layout::Registry::detect`]) or with the variant the files name
/// ([`detect`]).
pub fn wan_release(ck: &Checkpoint, det: Option<&Detection>) -> Option<WanRelease> {
    let det = det?;
    if det.family != "wan22" {
        return None;
    }
    // The first of release twins (`T2V-A14B expert or Wan2.1 T2V-14B`) stands for all of them.
    let named = det.variant.split(" or ").next().unwrap_or_default();
    let variant = match named {
        "Wan2.1 T2V-14B" => "T2V-A14B expert",
        v => v,
    };
    match variant {
        "Wan2.1 I2V-14B" | "Wan2.1 FLF2V-14B" => {
            return Some(WanRelease {
                release: "Wan2.1-14B".into(),
                role: None,
                evidence: vec!["the CLIP image embedder (img_emb.*) only Wan2.1 I2V and FLF2V have".into()],
            })
        }
        "T2V-A14B expert" | "I2V-A14B expert" => {}
        _ => return None,
    }
    let (role, mut release, mut evidence) = evidence(ck);
    if variant == "I2V-A14B expert" {
        release = Some("Wan2.2");
        evidence.insert(0, "I2V shapes without Wan2.1's image embedder (img_emb.*)".into());
    }
    if role.is_some() && release.is_none() {
        release = Some("Wan2.2");
    }
    let release = match release {
        Some("Wan2.1") => "Wan2.1-14B".to_string(),
        Some(_) => "Wan2.2 A14B expert".to_string(),
        None => {
            evidence.push(
                "the tensors and shapes are those of a Wan2.2 T2V-A14B expert and of Wan2.1 T2V-14B alike, and no folder, \
                 file name or metadata says which (a lone Wan2.2 expert covers only half of the noise range)"
                    .into(),
            );
            "undetermined".to_string()
        }
    };
    Some(WanRelease { release, role, evidence })
}

/// One model an assembly uses: the σ range it serves and its weights (an expert, or the base a
/// LoRA expert applies to).
pub struct Served<'a> {
    pub name: &'a str,
    pub sigma_lo: f64,
    pub sigma_hi: f64,
    pub ck: &'a Checkpoint,
    /// The LoRA file, when the served weights are `ck` plus a LoRA.
    pub lora: Option<&'a Checkpoint>,
}

/// The Wan release a checkpoint's folder and file names or metadata name (`Wan2.1`, `Wan2.2`; a
/// Wan2.2 expert role counts as Wan2.2), whatever its shapes, with the evidence; `None` when
/// they name none.
pub fn named_release(ck: &Checkpoint) -> Option<(&'static str, Vec<String>)> {
    let (role, release, evidence) = evidence(ck);
    release.or(role.map(|_| "Wan2.2")).map(|r| (r, evidence))
}

/// Which of a variant's release twins (`formats/*.toml`: variants with the same shapes, each
/// tagged with its `release`) a checkpoint is, from its folder and file names and metadata (a
/// Wan2.2 expert role counts as Wan2.2): the twin's name when the files name a release other
/// than `variant`'s, the twins' names joined with " or " when they name none, `None` when
/// `variant` has no twin or is already the one named.
pub fn named_variant(ck: &Checkpoint, family: &str, variant: &str) -> Option<String> {
    let fam = crate::layout::Registry::builtin().family(family)?;
    let twins = fam.release_twins(variant);
    if twins.len() < 2 {
        return None;
    }
    match named_release(ck).map(|(r, _)| r) {
        Some(r) => twins.iter().find(|(_, tr)| *tr == Some(r)).map(|(n, _)| n.to_string()).filter(|n| n != variant),
        None => Some(twins.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(" or ")),
    }
}

/// Detect a checkpoint's family, layout and variant from its tensors and config.json, then take
/// the release twin its files name ([`named_variant`]): a file named
/// `wan2.1_t2v_14B_bf16.safetensors` is `Wan2.1 T2V-14B`, one in `high_noise_model/` is a
/// `T2V-A14B expert`, a bare `model.safetensors` of those shapes is `T2V-A14B expert or Wan2.1
/// T2V-14B`. What `inspect`, `assemble`, `convert` and `forward` report and record.
pub fn detect(ck: &Checkpoint) -> Result<Detection> {
    let mut d = crate::layout::Registry::builtin().detect(&ck.names_and_shapes(), ck.config.as_ref().map(|c| &c.json))?;
    if let Some(v) = named_variant(ck, &d.family, &d.variant) {
        d.notes.push(if v.contains(" or ") {
            format!("the tensors are those of {v} alike, and no folder, file name or metadata says which")
        } else {
            format!("{v}: named by {}", evidence(ck).2.join("; "))
        });
        d.variant = v;
    }
    Ok(d)
}

/// Refuse an assembly of Wan2.2 A14B experts that is known to be wrong; return warnings for
/// what the files cannot decide. `models` are the weights serving each expert's σ range (an
/// expert's own checkpoint, or its base when it is a LoRA).
pub fn check_experts(models: &[Served]) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    // Every Wan model: its release when its shapes are 14B's, else just the expert role its
    // names give (Wan2.2's expert folders name the role whatever the size).
    let found: Vec<Option<WanRelease>> = models
        .iter()
        .map(|m| {
            let det = detect(m.ck).ok()?;
            wan_release(m.ck, Some(&det)).or_else(|| {
                let (role, _, evidence) = evidence(m.ck);
                (det.family == "wan22" && role.is_some()).then(|| WanRelease { release: "Wan2.2 expert".into(), role, evidence })
            })
        })
        .collect();
    let label = |m: &Served| if m.lora.is_some() { format!("the base of expert {}", m.name) } else { format!("expert {}", m.name) };
    // One expert used for two σ ranges. Several LoRA students on one base are not that: a 4-step
    // 4-phase run puts two on each Wan2.2 expert.
    for i in 0..models.len() {
        for j in i + 1..models.len() {
            let (a, b) = (&models[i], &models[j]);
            if a.lora.is_some() && b.lora.is_some() && (std::ptr::eq(a.ck, b.ck) || a.ck.path == b.ck.path) {
                continue;
            }
            let (Some(wa), Some(wb)) = (&found[i], &found[j]) else { continue };
            if wa.is_wan22_expert()
                && wb.is_wan22_expert()
                && wa.role.is_some()
                && wa.role == wb.role
                && a.lora.is_none() == b.lora.is_none()
            {
                return Err(Error::at(
                    Kind::Inconsistent,
                    &b.ck.path,
                    format!(
                        "{} and {} are both the Wan2.2 A14B {} expert ({} / {}); the other σ range needs the other expert",
                        label(a),
                        label(b),
                        wa.role.map_or("", Role::as_str),
                        wa.evidence.join("; "),
                        wb.evidence.join("; ")
                    ),
                ));
            }
        }
    }
    for (m, w) in models.iter().zip(&found) {
        let Some(w) = w else { continue };
        if w.release == "Wan2.1-14B" {
            continue;
        }
        let whole = m.sigma_lo == 0.0 && m.sigma_hi == 1.0;
        match (w.role, whole) {
            (Some(role), true) if w.is_wan22_expert() => {
                return Err(Error::at(
                    Kind::Inconsistent,
                    &m.ck.path,
                    format!(
                        "{} serves every σ but is the Wan2.2 A14B {} expert ({}); a Wan2.2 A14B model needs both experts, each on its own σ range",
                        label(m),
                        role.as_str(),
                        w.evidence.join("; ")
                    ),
                ));
            }
            (None, true) if w.is_wan22_expert() => {
                return Err(Error::at(
                    Kind::Inconsistent,
                    &m.ck.path,
                    format!("{} serves every σ but is one Wan2.2 A14B expert ({}); give both experts", label(m), w.evidence.join("; ")),
                ));
            }
            (Some(role), false) => {
                // The high-noise expert serves the top of the range, the low-noise one the bottom.
                // Several models may sit on one expert (a 4-step 4-phase run has two students on
                // each, e.g. [0.9375, 1) and [0.875, 0.9375) on the high-noise one): none on the
                // high-noise expert serves σ = 0 or lies below one on the low-noise expert, none
                // on the low-noise expert serves σ = 1.
                let other = |want: Role| {
                    models
                        .iter()
                        .zip(&found)
                        .filter(move |(_, o)| o.as_ref().is_some_and(|o| o.release != "Wan2.1-14B" && o.role == Some(want)))
                };
                let wrong = match role {
                    Role::HighNoise => m.sigma_lo <= 0.0 || other(Role::LowNoise).any(|(l, _)| l.sigma_lo >= m.sigma_hi),
                    Role::LowNoise => m.sigma_hi >= 1.0 || other(Role::HighNoise).any(|(h, _)| h.sigma_hi <= m.sigma_lo),
                };
                if wrong {
                    return Err(Error::at(
                        Kind::Inconsistent,
                        &m.ck.path,
                        format!(
                            "{} is the Wan2.2 A14B {} expert ({}) but serves σ ∈ [{}, {})",
                            label(m),
                            role.as_str(),
                            w.evidence.join("; "),
                            m.sigma_lo,
                            m.sigma_hi
                        ),
                    ));
                }
            }
            _ => {}
        }
        if w.undetermined() {
            notes.push(format!(
                "warning: {} ({}) has the shapes of a Wan2.2 T2V-A14B expert and of Wan2.1 T2V-14B; the files do not say which. If it is Wan2.2, check that it is the {} expert",
                label(m),
                m.ck.path.display(),
                if m.sigma_hi == 1.0 { "high-noise" } else { "low-noise" }
            ));
        }
    }
    Ok(notes)
}

/// A scaled-fp8 file must give every fp8 weight a usable scale. Returns how many weights have
/// one; errors (exit 5) name the first weight without one, or with an empty, zero or
/// non-finite scale.
pub fn check_scaled_fp8(ck: &Checkpoint) -> Result<usize> {
    const SCALES: [&str; 2] = [".scale_weight", ".weight_scale"];
    // A routed checkpoint stores a scale once when experts share it (`shared.`, aliases): its
    // per-tensor hashes, not names, say that it is whole (`moe::verify`); its inputs were checked.
    if crate::moe::verify::is_moe(ck) {
        return Ok(0);
    }
    let marker = ck.tensors.iter().any(|t| t.name == crate::store::SCALED_FP8_MARKER || t.name.ends_with(".scaled_fp8"));
    let any_scale = ck.tensors.iter().any(|t| SCALES.iter().any(|s| t.name.ends_with(s)));
    if !marker && !any_scale {
        return Ok(0);
    }
    let by_name: std::collections::HashMap<&str, usize> = ck.tensors.iter().enumerate().map(|(i, t)| (t.name.as_str(), i)).collect();
    let mut n = 0;
    for t in &ck.tensors {
        let Some(d) = t.encoding.dense() else { continue };
        let Some(stem) = t.name.strip_suffix(".weight") else { continue };
        if !d.is_fp8() || t.shape.len() < 2 {
            continue;
        }
        let Some(&si) = SCALES.iter().find_map(|s| by_name.get(format!("{stem}{s}").as_str())) else {
            return Err(Error::malformed(
                &ck.path,
                format!(
                    "scaled-fp8 file: fp8 weight '{}' has no scale ('{}.scale_weight' or '{}.weight_scale'); it would be read unscaled",
                    clean(&t.name),
                    clean(stem),
                    clean(stem)
                ),
            ));
        };
        let s = &ck.tensors[si];
        if s.numel() == 0 {
            return Err(Error::malformed(
                &ck.path,
                format!("scaled-fp8 file: scale '{}' of '{}' is empty (shape {:?})", clean(&s.name), clean(&t.name), s.shape),
            ));
        }
        if let Some(sd) = s.encoding.dense() {
            if sd.is_castable_float() && s.numel() == 1 {
                let mut v = [0f32];
                crate::cast::decode_f32(sd, ck.bytes(s), &mut v, 1.0).map_err(|e| e.with_path(&ck.path))?;
                if !(v[0].is_finite() && v[0] > 0.0) {
                    return Err(Error::malformed(
                        &ck.path,
                        format!(
                            "scaled-fp8 file: scale '{}' of '{}' is {} (a scale must be finite and positive)",
                            clean(&s.name),
                            clean(&t.name),
                            v[0]
                        ),
                    ));
                }
            }
        }
        n += 1;
    }
    Ok(n)
}

/// The warning for a LoRA stored next to (or merged into) an fp8 base, unless its file name
/// says it was made for fp8 (`Qwen-Image-fp8-e4m3fn-Lightning-...`).
pub fn lora_on_fp8_base(lora: &Checkpoint, base: &Checkpoint) -> Option<String> {
    let fp8 = base.tensors.iter().filter(|t| t.name.ends_with(".weight") && t.encoding.dense().is_some_and(|d| d.is_fp8())).count();
    if fp8 == 0 {
        return None;
    }
    let name = lora.path.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    if name.contains("fp8") || name.contains("e4m3") || name.contains("e5m2") {
        return None;
    }
    let kind = base.tensors.iter().find_map(|t| t.encoding.dense().filter(|d| d.is_fp8())).unwrap_or(DType::F8E4M3);
    Some(format!(
        "warning: LoRA {} applies to a base with {fp8} {kind} weights ({}). LoRAs trained on a bf16 base show grid artifacts on fp8 weights; use a LoRA trained on the fp8 base, or a bf16 base (--merge-lora bakes it in at the base's precision)",
        lora.path.display(),
        base.path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_give_role_and_release() {
        assert_eq!(role_in("wan2.2_t2v_high_noise_14B_fp16.safetensors"), Some(Role::HighNoise));
        assert_eq!(role_in("Wan2.2-T2V-A14B-LowNoise-Q4_K_M.gguf"), Some(Role::LowNoise));
        assert_eq!(role_in("low_noise_model"), Some(Role::LowNoise));
        assert_eq!(role_in("wan2.1_t2v_14B_bf16.safetensors"), None);
        assert_eq!(role_in("TurboWan2.2-I2V-A14B-high-720P.pth"), Some(Role::HighNoise));
        assert_eq!(role_in("TurboWan2.2-I2V-A14B-low-720P-quant.pth"), Some(Role::LowNoise));
        assert_eq!(role_in("highlights_low_res.safetensors"), None);
        assert_eq!(release_in("wan2.1_t2v_14B_bf16.safetensors"), Some("Wan2.1"));
        assert_eq!(release_in("Wan2.1-T2V-14B"), Some("Wan2.1"));
        assert_eq!(release_in("Wan2.2-T2V-A14B"), Some("Wan2.2"));
        assert_eq!(release_in("diffusion_pytorch_model.safetensors"), None);
    }
}
