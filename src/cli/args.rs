//! Argument types that several commands share: one dtype choice, one layout choice, sizes.
//!
//! They hold what was typed, validated by clap; turning them into library options is each
//! command's `run`.

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::ValueEnum;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;

/// Output dtype of floating-point tensors (`--dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    Keep,
    Bf16,
    F16,
    F32,
    #[value(name = "fp8-e4m3")]
    Fp8E4m3,
    #[value(name = "fp8-e5m2")]
    Fp8E5m2,
}

impl DTypeArg {
    /// The dtype asked for; `None` for `keep`.
    pub fn dtype(self) -> Option<DType> {
        match self {
            DTypeArg::Keep => None,
            DTypeArg::Bf16 => Some(DType::BF16),
            DTypeArg::F16 => Some(DType::F16),
            DTypeArg::F32 => Some(DType::F32),
            DTypeArg::Fp8E4m3 => Some(DType::F8E4M3),
            DTypeArg::Fp8E5m2 => Some(DType::F8E5M2),
        }
    }

    /// The parser of commands that write no fp8 scales (`assemble`, `export`, `lora`): `keep`,
    /// `bf16`, `f16` and `f32` only.
    pub fn without_fp8() -> impl TypedValueParser<Value = DTypeArg> {
        PossibleValuesParser::new(["keep", "bf16", "f16", "f32"])
            .map(|s| <DTypeArg as ValueEnum>::from_str(&s, false).expect("one of the listed values"))
    }
}

/// Key layout (`--layout`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LayoutArg {
    Original,
    Diffusers,
    Comfy,
}

impl LayoutArg {
    pub fn layout(self) -> Layout {
        match self {
            LayoutArg::Original => Layout::Original,
            LayoutArg::Diffusers => Layout::Diffusers,
            LayoutArg::Comfy => Layout::Comfy,
        }
    }
}

/// Parse a size like `5GB`, `500MB`, `10GiB` or a byte count (huggingface_hub's units: GB = 10^9).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.trim().parse().map_err(|_| Error::usage(format!("invalid size '{s}' (examples: 5GB, 500MB, 2GiB)")))?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        "TIB" => 1024f64.powi(4),
        _ => return Err(Error::usage(format!("invalid size unit in '{s}' (use B, KB, MB, GB, KiB, MiB, GiB)"))),
    };
    let v = num * mult;
    if !(1.0..1e18).contains(&v) {
        return Err(Error::usage(format!("size '{s}' out of range")));
    }
    Ok(v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_huggingface_hub() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert!(parse_size("5XB").is_err());
        assert!(parse_size("-1GB").is_err());
    }

    #[test]
    fn dtype_without_fp8_refuses_fp8() {
        #[derive(clap::Parser)]
        struct A {
            #[arg(long, value_parser = DTypeArg::without_fp8(), default_value = "keep")]
            dtype: DTypeArg,
        }
        use clap::Parser;
        assert_eq!(A::try_parse_from(["x"]).unwrap().dtype, DTypeArg::Keep);
        assert_eq!(A::try_parse_from(["x", "--dtype", "bf16"]).unwrap().dtype.dtype(), Some(DType::BF16));
        assert!(A::try_parse_from(["x", "--dtype", "fp8-e4m3"]).is_err());
    }
}
