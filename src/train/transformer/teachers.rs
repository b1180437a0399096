//! What a recipe's `model` says about its teacher, checked against the teacher files before any
//! weight loads: the model family, one model or two experts, and for Wan the release the files
//! name. A Wan2.2 T2V-A14B expert has exactly the tensors of Wan2.1 T2V-14B (`crate::pitfalls`),
//! so a Wan2.1 recipe given one Wan2.2 expert (trained for half of the noise range), or a Wan2.2
//! recipe given Wan2.1, would train without an error and distil the wrong teacher.

use std::path::PathBuf;

use crate::error::{clean, Error, Kind, Result};
use crate::store::Checkpoint;
use crate::train::recipe::{Recipe, TransformerConfig};

/// A transformer model name of a recipe (`model = "..."`) and what its teacher is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec {
    pub name: &'static str,
    /// The `formats/*.toml` family its checkpoints are.
    pub family: &'static str,
    /// The Wan release (`Wan2.1`, `Wan2.2`) whose files it takes; `None` for other families.
    pub release: Option<&'static str>,
    /// Whether the teacher is two experts routed by σ (Wan2.2 A14B), always one model (Wan2.1,
    /// TI2V-5B, Qwen-Image), or either (`None`; the tiny recipes give one file as both experts).
    pub two_experts: Option<bool>,
    /// What the upstream release is called, for messages.
    pub upstream: &'static str,
}

/// Every transformer model a recipe can name.
pub const MODELS: &[ModelSpec] = &[
    ModelSpec { name: "wan2.2-t2v-a14b", family: "wan22", release: Some("Wan2.2"), two_experts: None, upstream: "Wan2.2 T2V-A14B" },
    ModelSpec { name: "wan2.2-i2v-a14b", family: "wan22", release: Some("Wan2.2"), two_experts: None, upstream: "Wan2.2 I2V-A14B" },
    ModelSpec { name: "wan2.2-ti2v-5b", family: "wan22", release: Some("Wan2.2"), two_experts: Some(false), upstream: "Wan2.2 TI2V-5B" },
    ModelSpec { name: "wan2.1-t2v-14b", family: "wan22", release: Some("Wan2.1"), two_experts: Some(false), upstream: "Wan2.1 T2V-14B" },
    ModelSpec { name: "qwen-image", family: "qwen_image", release: None, two_experts: Some(false), upstream: "Qwen-Image" },
];

/// The spec of a recipe's model (`None` for `toy` and unknown names, which `Recipe::validate`
/// refuses).
pub fn spec(model: &str) -> Option<&'static ModelSpec> {
    MODELS.iter().find(|m| m.name == model)
}

/// The teacher checkpoints of a recipe (`outputs::teacher_paths`), checked against its model:
/// exit 2 for a two-expert setting on a one-model teacher (before any path is looked at), exit 6
/// for a checkpoint of another family, or one whose folder, file name or metadata name the
/// other Wan release.
pub fn checked_paths(r: &Recipe, tc: &TransformerConfig) -> Result<Vec<PathBuf>> {
    let m = spec(&r.model);
    if let Some(m) = m.filter(|m| m.two_experts == Some(false)) {
        if tc.expert_boundary.is_some() || tc.experts.len() > 1 {
            return Err(Error::usage(format!(
                "recipe: {} ({}) is one model, not two experts routed by σ: remove expert_boundary and give one checkpoint",
                m.name, m.upstream
            )));
        }
    }
    let paths = super::outputs::teacher_paths(tc)?;
    if let Some(m) = m {
        check_files(m, &paths)?;
    }
    Ok(paths)
}

fn check_files(m: &ModelSpec, paths: &[PathBuf]) -> Result<()> {
    for p in paths {
        let ck = Checkpoint::open(p)?;
        let det = crate::pitfalls::detect(&ck).map_err(|e| e.with_path(p))?;
        if det.family != m.family {
            return Err(Error::at(
                Kind::Inconsistent,
                p,
                format!("recipe model {} needs a {} checkpoint; this one is {} ({})", m.name, m.family, det.family, clean(&det.variant)),
            ));
        }
        let (Some(want), Some((named, evidence))) = (m.release, crate::pitfalls::named_release(&ck)) else { continue };
        if named != want {
            let why = if want == "Wan2.1" {
                "a lone Wan2.2 A14B expert has Wan2.1-14B's tensors but was trained for half of the noise range"
            } else {
                "Wan2.1 has the tensors of a Wan2.2 A14B expert but is another model"
            };
            return Err(Error::at(
                Kind::Inconsistent,
                p,
                format!(
                    "recipe model {} ({}) but the files name {named} ({}): {why}; use a {want} checkpoint, or the recipe model of {named}",
                    m.name,
                    m.upstream,
                    evidence.join("; ")
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every model `Recipe::validate` accepts has a spec, and nothing else does.
    #[test]
    fn every_recipe_model_has_a_spec() {
        for m in MODELS {
            let r = Recipe { model: m.name.into(), ..Recipe::default() };
            assert!(r.validate().is_ok(), "{}", m.name);
        }
        let r = Recipe { model: "wan2.1-i2v-14b".into(), ..Recipe::default() };
        assert!(r.validate().is_err());
        assert!(spec("toy").is_none());
    }
}
