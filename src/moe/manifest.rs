//! The trainer's run manifest, `RUN_DIR/manifest.json` (schema `phasekit.run/1`, specified in
//! `docs/moe-format.md`): the experts a run produced (paths relative to the run folder, σ ranges,
//! the timesteps each was distilled for, full or LoRA, their bases) and the sampler settings.
//!
//! The trainer writes it (`crate::train`) and `assemble --run` reads it (`super::assemble`): a
//! type of its own, so that neither side depends on the other's insides.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::format::ModelInfo;
use super::routing::{ExpertKind, Routing};
use crate::error::{clean, Error, IoContext, Kind, Result};

/// A run manifest. Paths are relative to the run folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub experts: Vec<ManifestExpert>,
    #[serde(default)]
    pub base: Option<String>,
    pub shift: f64,
    pub steps: u32,
    #[serde(default = "euler")]
    pub solver: String,
    #[serde(default = "one")]
    pub guidance: f64,
    #[serde(default = "thousand")]
    pub num_train_timesteps: f64,
    #[serde(default)]
    pub teacher_digests: Vec<String>,
    #[serde(default)]
    pub recipe_digest: Option<String>,
    #[serde(default)]
    pub title: Option<String>,
    /// Model description for models no layout family covers (the toy: `kind = "toy-mlp"`).
    #[serde(default)]
    pub model: Option<ModelInfo>,
    /// The latent size `[frames, height, width]` the run trained at (stored as
    /// `phasekit.moe.sample`, the default of `sample --moe`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latent: Option<[usize; 3]>,
}

fn euler() -> String {
    "euler".into()
}
fn one() -> f64 {
    1.0
}
fn thousand() -> f64 {
    1000.0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestExpert {
    pub path: String,
    pub sigma_lo: f64,
    pub sigma_hi: f64,
    /// Timesteps the trainer distilled this expert for; checked against the routing.
    #[serde(default)]
    pub timesteps: Option<Vec<f64>>,
    pub kind: ExpertKind,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub guidance: Option<f64>,
    /// The base this LoRA expert applies to, when not the manifest's `base`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
}

pub const MANIFEST_TAG: &str = "phasekit.run/1";

impl Manifest {
    /// Read and check `RUN_DIR/manifest.json`.
    pub fn read(run: &Path) -> Result<Manifest> {
        let p = run.join("manifest.json");
        let text = std::fs::read(&p).with_file(&p)?;
        if text.len() > 16 << 20 {
            return Err(Error::limit(&p, "manifest larger than 16 MiB"));
        }
        let m: Manifest = serde_json::from_slice(&text).map_err(|e| Error::malformed(&p, format!("invalid manifest: {e}")))?;
        if m.format != MANIFEST_TAG {
            return Err(Error::at(Kind::Unsupported, &p, format!("manifest format '{}' is not {MANIFEST_TAG}", clean(&m.format))));
        }
        Ok(m)
    }

    /// A path the manifest gives, inside `run`: relative, without `..`.
    pub fn path_in(&self, run: &Path, s: &str) -> Result<PathBuf> {
        let q = Path::new(s);
        if s.is_empty() || q.is_absolute() || q.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            return Err(Error::malformed(
                run.join("manifest.json"),
                format!("path '{}' must be relative and inside the run folder", clean(s)),
            ));
        }
        Ok(run.join(q))
    }

    /// Check the declared timesteps against the routing built from the ranges.
    pub fn check_timesteps(&self, r: &Routing) -> Result<()> {
        for (i, e) in self.experts.iter().enumerate() {
            if let Some(ts) = &e.timesteps {
                let have = &r.experts[i].timesteps;
                let same = ts.len() == have.len() && ts.iter().zip(have).all(|(a, b)| (a - b).abs() <= 1e-6 * r.num_train_timesteps);
                if !same {
                    return Err(Error::new(
                        Kind::Inconsistent,
                        format!(
                            "manifest expert {i} lists timesteps {ts:?} but steps {} with shift {} route {have:?} to it",
                            r.steps, r.shift
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}
