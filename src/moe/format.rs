//! Tensor naming and the `__metadata__` schema of `phasekit.moe/1` (`docs/moe-format.md`).
//!
//! Names: `experts.<i>.<param>` (expert i's own tensors), `shared.<param>` (equal in every
//! expert, stored once), `base.<param>` (the base model LoRA experts apply to). A tensor equal
//! in some but not all experts is stored under the first one's name and listed in
//! `phasekit.moe.aliases`. Metadata values are compact JSON strings (safetensors allows only
//! string values).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::routing::Routing;
use crate::error::{clean, Error, Kind, Result};

/// The format tag and version.
pub const FORMAT_TAG: &str = "phasekit.moe/1";
/// The tag of files whose LoRA experts apply to more than one base (`bases.<j>.`, a routing
/// row's `base`): a `phasekit.moe/1` reader would apply them all to `base.`, so it must refuse them.
pub const FORMAT_TAG_2: &str = "phasekit.moe/2";
pub const KEY_FORMAT: &str = "phasekit.moe.format";
pub const KEY_ROUTING: &str = "phasekit.moe.routing";
pub const KEY_MODEL: &str = "phasekit.moe.model";
pub const KEY_PROVENANCE: &str = "phasekit.moe.provenance";
pub const KEY_TENSORS: &str = "phasekit.moe.tensors";
pub const KEY_ALIASES: &str = "phasekit.moe.aliases";
pub use super::digest::KEY_DIGEST;
/// Optional: `{"latent": [frames, height, width]}`, the latent size `sample --moe` defaults to.
pub const KEY_SAMPLE: &str = "phasekit.moe.sample";

pub const SHARED: &str = "shared.";
pub const BASE: &str = "base.";
pub const BASES: &str = "bases.";
/// Padding tensors (`padding.<k>`, U8 zeros, shorter than 64 KiB): they keep the copied runs of
/// a large file at their source offset modulo 64 KiB. Not in the hash table; `verify` checks
/// that they are zero; loaders skip them.
pub const PADDING: &str = "padding.";
/// The longest padding tensor (the writer's, `crate::write::Layout::PaddingTensors`).
pub const MAX_PADDING: u64 = crate::write::MAX_PADDING;

/// Where base `j` is stored: `base.` for 0, `bases.<j>.` otherwise.
pub fn base_prefix(j: usize) -> String {
    if j == 0 {
        BASE.to_string()
    } else {
        format!("{BASES}{j}.")
    }
}

/// `experts.<i>.`
pub fn expert_prefix(i: usize) -> String {
    format!("experts.{i}.")
}

/// Model description stored under `phasekit.moe.model`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    /// Layout family (`wan22`, `qwen_image`) when detected.
    pub family: Option<String>,
    pub variant: Option<String>,
    /// The layout the parameter names are in (`original`, `diffusers`).
    pub layout: Option<String>,
    /// config.json of the experts (or base), in that layout's dialect; for `kind` models, that
    /// kind's own configuration.
    pub config: Option<serde_json::Value>,
    /// A model that is no layout family: `toy-mlp` (the toy trainer's MLP experts; `config` holds
    /// the Gaussian mixture and the MLP shape). Absent for Wan2.2, Qwen-Image and unknown models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// [`ModelInfo::kind`] of the toy trainer's MLP experts.
pub const KIND_TOY_MLP: &str = "toy-mlp";

/// Provenance stored under `phasekit.moe.provenance`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// `phasekit <version>`.
    pub tool: String,
    /// Digests of the teacher's files (`sha256:<hex>`), as the trainer recorded them.
    pub teacher_digests: Vec<String>,
    pub recipe_digest: Option<String>,
    /// File name (no folder) each expert was read from, in expert order, and the base's.
    pub sources: Vec<String>,
    pub base_source: Option<String>,
    /// File names of every stored base in order (`base.`, `bases.1.`, ...), when there are several.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub base_sources: Vec<String>,
}

/// One stored tensor's entry of `phasekit.moe.tensors`: dtype, shape and sha256 of its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorHash(pub String, pub Vec<u64>, pub String);

/// Everything phasekit reads from and writes to `__metadata__`.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeMeta {
    pub routing: Routing,
    pub model: ModelInfo,
    pub provenance: Provenance,
    /// Stored tensor name → (dtype, shape, sha256).
    pub tensors: BTreeMap<String, TensorHash>,
    /// Logical name (`experts.<i>.<param>`) → stored name.
    pub aliases: BTreeMap<String, String>,
    /// ModelSpec 1.0.1 keys (`modelspec.*`) and any other keys, kept as they are.
    pub extra: Vec<(String, String)>,
    pub digest: String,
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("serialisable")
}

impl MoeMeta {
    /// `phasekit.moe/2` when some expert applies to a base other than `base.`, else `phasekit.moe/1`.
    pub fn tag(&self) -> &'static str {
        if self.routing.experts.iter().any(|e| e.base.is_some()) {
            FORMAT_TAG_2
        } else {
            FORMAT_TAG
        }
    }

    /// The `__metadata__` entries, digest last (computed over the others).
    pub fn to_metadata(&self) -> Vec<(String, String)> {
        let mut md = vec![
            ("format".to_string(), "pt".to_string()),
            (KEY_FORMAT.to_string(), self.tag().to_string()),
            (KEY_ROUTING.to_string(), json(&self.routing)),
            (KEY_MODEL.to_string(), json(&self.model)),
            (KEY_PROVENANCE.to_string(), json(&self.provenance)),
            (KEY_ALIASES.to_string(), json(&self.aliases)),
            (KEY_TENSORS.to_string(), json(&self.tensors)),
        ];
        for (k, v) in &self.extra {
            if !md.iter().any(|(m, _)| m == k) {
                md.push((k.clone(), v.clone()));
            }
        }
        let d = super::digest::metadata_digest(&md);
        md.push((KEY_DIGEST.to_string(), d));
        md
    }

    /// Parse and check the schema. The digest is read, not checked (see `moe::verify`).
    pub fn from_metadata(md: &[(String, String)]) -> Result<MoeMeta> {
        let get = |k: &str| md.iter().find(|(m, _)| m == k).map(|(_, v)| v.as_str());
        let tag = get(KEY_FORMAT)
            .ok_or_else(|| Error::new(Kind::Unsupported, "not a phasekit MoE checkpoint (no phasekit.moe.format in __metadata__)"))?;
        if tag != FORMAT_TAG && tag != FORMAT_TAG_2 {
            return Err(Error::new(
                Kind::Unsupported,
                format!("MoE format '{}' is not supported (this phasekit reads {FORMAT_TAG} and {FORMAT_TAG_2})", clean(tag)),
            ));
        }
        fn field<T: serde::de::DeserializeOwned>(md: &[(String, String)], k: &str) -> Result<T> {
            let v = md
                .iter()
                .find(|(m, _)| m == k)
                .map(|(_, v)| v.as_str())
                .ok_or_else(|| Error::new(Kind::Malformed, format!("__metadata__ lacks {k}")))?;
            serde_json::from_str(v).map_err(|e| Error::new(Kind::Malformed, format!("__metadata__ {k} is not valid: {e}")))
        }
        let routing: Routing = field(md, KEY_ROUTING)?;
        routing.validate()?;
        let per_expert_bases = routing.experts.iter().any(|e| e.base.is_some());
        if per_expert_bases != (tag == FORMAT_TAG_2) {
            return Err(Error::new(
                Kind::Malformed,
                format!(
                    "format '{tag}' but the routing {} per-expert bases (those need {FORMAT_TAG_2}, and only they)",
                    if per_expert_bases { "has" } else { "has no" }
                ),
            ));
        }
        let known = [KEY_FORMAT, KEY_ROUTING, KEY_MODEL, KEY_PROVENANCE, KEY_TENSORS, KEY_ALIASES, KEY_DIGEST, "format"];
        Ok(MoeMeta {
            routing,
            model: field(md, KEY_MODEL)?,
            provenance: field(md, KEY_PROVENANCE)?,
            tensors: field(md, KEY_TENSORS)?,
            aliases: field(md, KEY_ALIASES)?,
            extra: md.iter().filter(|(k, _)| !known.contains(&k.as_str())).cloned().collect(),
            digest: get(KEY_DIGEST).ok_or_else(|| Error::new(Kind::Malformed, format!("__metadata__ lacks {KEY_DIGEST}")))?.to_string(),
        })
    }

    /// Expert i's parameters: param name → stored tensor name (own, aliased and shared).
    pub fn expert_tensors(&self, i: usize) -> BTreeMap<String, String> {
        let p = expert_prefix(i);
        let mut out = BTreeMap::new();
        for name in self.tensors.keys() {
            if let Some(param) = name.strip_prefix(SHARED) {
                out.insert(param.to_string(), name.clone());
            }
        }
        for name in self.tensors.keys() {
            if let Some(param) = name.strip_prefix(&p) {
                out.insert(param.to_string(), name.clone());
            }
        }
        for (logical, stored) in &self.aliases {
            if let Some(param) = logical.strip_prefix(&p) {
                out.insert(param.to_string(), stored.clone());
            }
        }
        out
    }

    /// The parameters of the base LoRA expert `i` applies to (`base.`, or `bases.<j>.` for a
    /// routing row with `base: j`): param → stored name.
    pub fn expert_base_tensors(&self, i: usize) -> BTreeMap<String, String> {
        let pre = base_prefix(self.routing.experts[i].base.unwrap_or(0));
        self.tensors.keys().filter_map(|n| n.strip_prefix(pre.as_str()).map(|p| (p.to_string(), n.clone()))).collect()
    }
}

/// The ModelSpec 1.0.1 keys of a checkpoint (`expert`: one expert's file on export).
pub fn modelspec(routing: &Routing, model: &ModelInfo, title: &str, expert: Option<usize>, lora: bool) -> Vec<(String, String)> {
    let fam = model.family.clone().unwrap_or_else(|| "unknown".into());
    let arch = match (expert, lora) {
        (None, _) => format!("{fam}/phasekit-moe"),
        (Some(_), true) => format!("{fam}/lora"),
        (Some(_), false) => fam,
    };
    let mut v = vec![
        ("modelspec.sai_model_spec".to_string(), "1.0.1".to_string()),
        ("modelspec.architecture".to_string(), arch),
        ("modelspec.implementation".to_string(), "phasekit".to_string()),
        ("modelspec.title".to_string(), title.to_string()),
        ("modelspec.prediction_type".to_string(), "flow".to_string()),
        ("modelspec.timestep_range".to_string(), routing.timestep_range(expert)),
    ];
    let steps = match expert {
        Some(i) => format!("{} of {} steps", routing.experts[i].timesteps.len(), routing.steps),
        None => format!("{} steps", routing.steps),
    };
    v.push((
        "modelspec.description".to_string(),
        format!("Few-step student: {steps}, shift {}, {} solver, CFG {}", routing.shift, routing.solver, routing.guidance),
    ));
    v
}

/// LoRA key parsing lives in `crate::lora::keys` (shared with `phasekit lora`).
pub use crate::lora::keys::{lora_part, LoraPart};
