//! LoRA tensor names: the suffixes of the two key styles and the prefixes files carry.
//!
//! Shared with `moe` (assemble/export read and write Lightning-style LoRA experts), so the list
//! of suffixes and prefixes exists once.

/// One of the three tensors of a LoRA module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraPart {
    /// `[r, in]`: `lora_down` / `lora_A`.
    Down,
    /// `[out, r]`: `lora_up` / `lora_B`.
    Up,
    /// Scalar α (kohya style only).
    Alpha,
}

impl LoraPart {
    /// The stored (kohya / Lightning) suffix.
    pub fn suffix(self) -> &'static str {
        match self {
            LoraPart::Down => ".lora_down.weight",
            LoraPart::Up => ".lora_up.weight",
            LoraPart::Alpha => ".alpha",
        }
    }
    /// The diffusers/PEFT suffix (α has none: it lives in `__metadata__`).
    pub fn peft_suffix(self) -> Option<&'static str> {
        match self {
            LoraPart::Down => Some(".lora_A.weight"),
            LoraPart::Up => Some(".lora_B.weight"),
            LoraPart::Alpha => None,
        }
    }
}

/// Which suffix family a key uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuffixStyle {
    /// `.lora_down.weight`, `.lora_up.weight`, `.alpha`.
    Kohya,
    /// `.lora_A.weight`, `.lora_B.weight`.
    Peft,
}

const SUFFIXES: [(&str, LoraPart, SuffixStyle); 5] = [
    (".lora_down.weight", LoraPart::Down, SuffixStyle::Kohya),
    (".lora_up.weight", LoraPart::Up, SuffixStyle::Kohya),
    (".lora_A.weight", LoraPart::Down, SuffixStyle::Peft),
    (".lora_B.weight", LoraPart::Up, SuffixStyle::Peft),
    (".alpha", LoraPart::Alpha, SuffixStyle::Kohya),
];

/// Whether a tensor name is one of the LoRA tensors; gives (module, part).
pub fn lora_part(name: &str) -> Option<(&str, LoraPart)> {
    lora_part_styled(name).map(|(m, p, _)| (m, p))
}

/// [`lora_part`] with the suffix family.
pub fn lora_part_styled(name: &str) -> Option<(&str, LoraPart, SuffixStyle)> {
    SUFFIXES.iter().find_map(|(s, part, style)| name.strip_suffix(s).map(|m| (m, *part, *style)))
}

/// Prefixes a LoRA key may carry before the module name, longest first: ComfyUI full
/// checkpoints, Lightning/kohya files, diffusers pipelines, raw PEFT state dicts.
pub const KEY_PREFIXES: [&str; 4] = ["model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model."];

/// Strip one known prefix; gives (prefix, rest).
pub fn strip_key_prefix(name: &str) -> (&'static str, &str) {
    for p in KEY_PREFIXES {
        if let Some(rest) = name.strip_prefix(p) {
            return (p, rest);
        }
    }
    ("", name)
}

/// Strip the ComfyUI / Lightning prefixes only (`model.diffusion_model.`, `diffusion_model.`).
pub fn strip_comfy_prefix(name: &str) -> &str {
    name.strip_prefix("model.diffusion_model.").or_else(|| name.strip_prefix("diffusion_model.")).unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_and_prefixes() {
        assert_eq!(lora_part("a.b.lora_down.weight"), Some(("a.b", LoraPart::Down)));
        assert_eq!(lora_part_styled("a.lora_B.weight"), Some(("a", LoraPart::Up, SuffixStyle::Peft)));
        assert_eq!(lora_part("a.alpha"), Some(("a", LoraPart::Alpha)));
        assert_eq!(lora_part("a.weight"), None);
        assert_eq!(strip_key_prefix("diffusion_model.blocks.0.x"), ("diffusion_model.", "blocks.0.x"));
        assert_eq!(strip_key_prefix("model.diffusion_model.x"), ("model.diffusion_model.", "x"));
        assert_eq!(strip_key_prefix("transformer.x"), ("transformer.", "x"));
        assert_eq!(strip_comfy_prefix("transformer.x"), "transformer.x");
        for p in [LoraPart::Down, LoraPart::Up, LoraPart::Alpha] {
            assert_eq!(lora_part(&format!("m{}", p.suffix())), Some(("m", p)));
            if let Some(s) = p.peft_suffix() {
                assert_eq!(lora_part(&format!("m{s}")), Some(("m", p)));
            }
        }
    }
}
