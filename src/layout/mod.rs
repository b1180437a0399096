//! Model families, layouts and key maps, loaded from `formats/*.toml`.
//!
//! The **map** arrow of the pipeline. A rule file describes one family (Wan2.2, Qwen-Image):
//! how to recognise it from tensor names and shapes, how tensor names map between its layouts
//! (upstream original, diffusers, ComfyUI), how its config.json dialects map, which known
//! variants exist and which tensors keep high precision in GGUF. The code here is generic: a
//! new family is a new rule file (`docs/layouts.md` has the schema and a walkthrough).
//!
//! ```
//! use phasekit::layout::{Layout, Registry};
//! let wan = Registry::builtin().family("wan22").unwrap();
//! let name = wan.rename(Layout::Original, Layout::Diffusers, "blocks.0.cross_attn.k_img.weight").unwrap();
//! assert_eq!(name, "blocks.0.attn2.add_k_proj.weight");
//! ```

mod detect;
mod expr;
mod family;
mod pattern;
mod rules;

pub use detect::Detection;
pub use family::Family;

use crate::error::{Error, IoContext, Kind, Result};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;

/// The rule files compiled into the binary. A family added to `formats/` must be listed here
/// to be built in (a test checks the list against the folder); user rule files need no code.
const BUILTIN: &[(&str, &str)] = &[
    ("formats/qwen_image.toml", include_str!("../../formats/qwen_image.toml")),
    ("formats/wan22.toml", include_str!("../../formats/wan22.toml")),
];

/// A way of laying out one family's checkpoint: tensor names and config dialect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// The upstream training code's names (Wan `WanModel`).
    Original,
    /// diffusers `save_pretrained` names and config.
    Diffusers,
    /// ComfyUI single files (and ComfyUI-GGUF), possibly under `model.diffusion_model.`.
    Comfy,
}

impl Layout {
    pub const ALL: [Layout; 3] = [Layout::Original, Layout::Diffusers, Layout::Comfy];

    pub fn as_str(self) -> &'static str {
        match self {
            Layout::Original => "original",
            Layout::Diffusers => "diffusers",
            Layout::Comfy => "comfy",
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Layout {
    type Err = Error;
    fn from_str(s: &str) -> Result<Layout> {
        Layout::ALL
            .into_iter()
            .find(|l| l.as_str() == s)
            .ok_or_else(|| Error::usage(format!("unknown layout `{}`: expected original, diffusers or comfy", crate::error::clean(s))))
    }
}

/// All known model families.
#[derive(Clone, Debug)]
pub struct Registry {
    families: Vec<Family>,
}

impl Registry {
    /// The families built into the binary (`formats/*.toml`), parsed once.
    ///
    /// # Panics
    /// If a built-in rule file is invalid, which the test suite rules out.
    pub fn builtin() -> &'static Registry {
        match Registry::try_builtin() {
            Ok(r) => r,
            Err(e) => panic!("built-in rule file is invalid: {e}"),
        }
    }

    /// [`Registry::builtin`], returning the error instead of panicking.
    pub fn try_builtin() -> Result<&'static Registry> {
        static BUILTIN_REGISTRY: OnceLock<std::result::Result<Registry, String>> = OnceLock::new();
        BUILTIN_REGISTRY
            .get_or_init(|| {
                let mut families = Vec::new();
                for (path, text) in BUILTIN {
                    families.push(rules::parse_family(Path::new(path), text).map_err(|e| e.to_string())?);
                }
                Ok(Registry { families })
            })
            .as_ref()
            .map_err(|e| Error::internal(e.clone()))
    }

    /// Parse one rule file's text (`path` is used in messages only).
    pub fn parse_family(path: &Path, text: &str) -> Result<Family> {
        rules::parse_family(path, text)
    }

    /// The built-in families plus every `*.toml` in `dir` (in name order). A user family with
    /// the name of a built-in one replaces it; two user files with one name are an error.
    pub fn load_dir(dir: &Path) -> Result<Registry> {
        let mut reg = Registry::try_builtin()?.clone();
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(dir).with_file(dir)?.map(|e| e.map(|e| e.path()).with_file(dir)).collect::<Result<_>>()?;
        files.retain(|p| p.extension().is_some_and(|e| e == "toml") && p.is_file());
        files.sort();
        let mut user: Vec<String> = Vec::new();
        for path in files {
            let text = std::fs::read_to_string(&path).with_file(&path)?;
            let fam = rules::parse_family(&path, &text)?;
            if user.contains(&fam.name) {
                return Err(Error::malformed(&path, format!("a second rule file for model family {}", fam.name)));
            }
            user.push(fam.name.clone());
            match reg.families.iter_mut().find(|f| f.name == fam.name) {
                Some(slot) => *slot = fam,
                None => reg.families.push(fam),
            }
        }
        Ok(reg)
    }

    /// A family by name.
    pub fn family(&self, name: &str) -> Option<&Family> {
        self.families.iter().find(|f| f.name == name)
    }

    /// All families, built-in ones first.
    pub fn families(&self) -> &[Family] {
        &self.families
    }

    /// Detect family, variant, layout and key prefix from tensor names and shapes (torch order;
    /// reverse GGUF dimensions first), and config.json when present. See [`detect`] and
    /// `docs/layouts.md` for the rules. Nothing matching is `Kind::Unsupported`, with the
    /// closest family in the message.
    pub fn detect(&self, tensors: &[(&str, &[u64])], config: Option<&serde_json::Value>) -> Result<Detection> {
        detect::detect(self, tensors, config)
    }

    /// A family by name, or `Kind::Unsupported` listing the known ones.
    pub fn require(&self, name: &str) -> Result<&Family> {
        self.family(name).ok_or_else(|| {
            Error::new(
                Kind::Unsupported,
                format!(
                    "unknown model family `{}` (known: {})",
                    crate::error::clean(name),
                    self.families.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", ")
                ),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_parses_and_lists_every_rule_file() {
        let reg = Registry::try_builtin().unwrap();
        assert_eq!(reg.families().len(), BUILTIN.len());
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("formats");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".toml"))
            .map(|n| format!("formats/{n}"))
            .collect();
        on_disk.sort();
        let listed: Vec<String> = BUILTIN.iter().map(|(p, _)| p.to_string()).collect();
        assert_eq!(on_disk, listed, "every formats/*.toml must be listed in layout::BUILTIN");
        for (path, text) in BUILTIN {
            assert_eq!(&std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap(), text);
        }
    }

    #[test]
    fn layout_names() {
        for l in Layout::ALL {
            assert_eq!(l.as_str().parse::<Layout>().unwrap(), l);
            assert_eq!(serde_json::to_string(&l).unwrap(), format!("\"{l}\""));
        }
        assert_eq!("Diffusers".parse::<Layout>().unwrap_err().kind(), Kind::Usage);
    }

    #[test]
    fn gguf_rules() {
        let reg = Registry::builtin();
        let wan = reg.family("wan22").unwrap();
        assert_eq!(wan.gguf_arch(), "wan");
        assert_eq!(wan.comfy_names_layout(), Layout::Original);
        assert!(wan.gguf_keep_f32("blocks.0.modulation", &[1, 6, 5120]));
        assert!(wan.gguf_keep_f32("blocks.0.self_attn.q.bias", &[5120]));
        assert!(wan.gguf_keep_f32("tiny.weight", &[32, 32]));
        assert!(!wan.gguf_keep_f32("blocks.0.self_attn.q.weight", &[5120, 5120]));
        assert!(wan.gguf_quantizable("blocks.0.self_attn.q.weight", &[5120, 5120]));
        assert!(wan.gguf_quantizable("blocks.0.ffn.0.weight", &[13824, 5120]));
        assert!(!wan.gguf_quantizable("blocks.0.self_attn.q.bias", &[5120]));
        assert!(!wan.gguf_quantizable("blocks.0.modulation", &[1, 6, 5120]));
        assert!(!wan.gguf_quantizable("head.head.weight", &[64, 5120]));
        assert!(!wan.gguf_quantizable("text_embedding.0.weight", &[5120, 4096]));
        assert!(!wan.gguf_quantizable("time_projection.1.weight", &[30720, 5120]));
        assert!(!wan.gguf_quantizable("patch_embedding.weight", &[5120, 16, 1, 2, 2]));
        let qwen = reg.family("qwen_image").unwrap();
        assert_eq!(qwen.gguf_arch(), "qwen_image");
        assert_eq!(qwen.comfy_names_layout(), Layout::Diffusers);
        assert!(qwen.gguf_quantizable("transformer_blocks.0.img_mod.1.weight", &[18432, 3072]));
        assert!(qwen.gguf_quantizable("transformer_blocks.0.attn.to_q.weight", &[3072, 3072]));
        assert!(!qwen.gguf_quantizable("img_in.weight", &[3072, 64]));
        assert!(!qwen.gguf_quantizable("proj_out.weight", &[64, 3072]));
        assert!(!qwen.gguf_quantizable("norm_out.linear.weight", &[6144, 3072]));
        assert!(!qwen.gguf_keep_f32("transformer_blocks.0.img_mod.1.weight", &[18432, 3072]));
        assert!(qwen.gguf_keep_f32("transformer_blocks.0.attn.norm_q.weight", &[128]));
    }
}
