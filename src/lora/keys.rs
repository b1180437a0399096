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

const SUFFIXES: [(&str, LoraPart, SuffixStyle); 7] = [
    (".lora_down.weight", LoraPart::Down, SuffixStyle::Kohya),
    (".lora_up.weight", LoraPart::Up, SuffixStyle::Kohya),
    (".lora_A.weight", LoraPart::Down, SuffixStyle::Peft),
    (".lora_B.weight", LoraPart::Up, SuffixStyle::Peft),
    // PEFT keys after diffusers' `convert_state_dict_to_diffusers` (LightX2V's
    // `pytorch_lora_weights.safetensors`): α is not stored either.
    (".lora.down.weight", LoraPart::Down, SuffixStyle::Peft),
    (".lora.up.weight", LoraPart::Up, SuffixStyle::Peft),
    (".alpha", LoraPart::Alpha, SuffixStyle::Kohya),
];

/// The value of a LoRA `alpha` tensor of any integer or float dtype (one element). Lightning
/// files store it as I64 in places: a reader that only takes floats drops it and applies the
/// LoRA at α = rank, 8× too strong for rank 64 / α 8.
pub fn alpha_value(dtype: crate::dtype::DType, bytes: &[u8]) -> Option<f64> {
    use crate::dtype::DType as D;
    if dtype.size() != Some(bytes.len()) {
        return None;
    }
    let b = bytes;
    Some(match dtype {
        D::U8 => b[0] as f64,
        D::I8 => b[0] as i8 as f64,
        D::I16 => i16::from_le_bytes([b[0], b[1]]) as f64,
        D::U16 => u16::from_le_bytes([b[0], b[1]]) as f64,
        D::I32 => i32::from_le_bytes(b.try_into().ok()?) as f64,
        D::U32 => u32::from_le_bytes(b.try_into().ok()?) as f64,
        D::I64 => i64::from_le_bytes(b.try_into().ok()?) as f64,
        D::U64 => u64::from_le_bytes(b.try_into().ok()?) as f64,
        D::F64 => f64::from_le_bytes(b.try_into().ok()?),
        d if d.is_castable_float() => {
            let mut v = [0f32];
            crate::cast::decode_f32(d, b, &mut v, 1.0).ok()?;
            v[0] as f64
        }
        _ => return None,
    })
}

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
        assert_eq!(lora_part_styled("b.0.q.lora.down.weight"), Some(("b.0.q", LoraPart::Down, SuffixStyle::Peft)));
        assert_eq!(lora_part("b.0.q.lora.up.weight"), Some(("b.0.q", LoraPart::Up)));
        for p in [LoraPart::Down, LoraPart::Up, LoraPart::Alpha] {
            assert_eq!(lora_part(&format!("m{}", p.suffix())), Some(("m", p)));
            if let Some(s) = p.peft_suffix() {
                assert_eq!(lora_part(&format!("m{s}")), Some(("m", p)));
            }
        }
    }

    #[test]
    fn alpha_of_every_dtype() {
        use crate::dtype::DType;
        assert_eq!(alpha_value(DType::I64, &8i64.to_le_bytes()), Some(8.0));
        assert_eq!(alpha_value(DType::I32, &(-3i32).to_le_bytes()), Some(-3.0));
        assert_eq!(alpha_value(DType::U8, &[16]), Some(16.0));
        assert_eq!(alpha_value(DType::F32, &8.5f32.to_le_bytes()), Some(8.5));
        assert_eq!(alpha_value(DType::F64, &0.25f64.to_le_bytes()), Some(0.25));
        assert_eq!(alpha_value(DType::BF16, &half::bf16::from_f32(64.0).to_le_bytes()), Some(64.0));
        assert_eq!(alpha_value(DType::F16, &half::f16::from_f32(4.0).to_le_bytes()), Some(4.0));
        assert_eq!(alpha_value(DType::I64, &[0; 4]), None, "wrong byte count");
        assert_eq!(alpha_value(DType::Bool, &[1]), None);
    }
}
