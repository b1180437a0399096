//! The element types phasekit knows, one enum for the whole crate.
//!
//! Names and bit widths follow the safetensors `Dtype` enum (up to 0.8: MX formats, C64,
//! FNUZ fp8). A dtype string phasekit does not know is kept as [`DType::Opaque`] with its bit
//! width, so that newer files are still copied, renamed and hashed byte for byte.

use std::fmt;

/// Element type of a dense tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    Bool,
    F4,
    F6E2M3,
    F6E3M2,
    U8,
    I8,
    F8E5M2,
    F8E4M3,
    F8E8M0,
    F8E4M3Fnuz,
    F8E5M2Fnuz,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    C64,
    F64,
    I64,
    U64,
    /// A dtype string we do not know, with the bit width inferred from its name or its byte size.
    Opaque(OpaqueName, u16),
}

/// Up to 24 bytes of an unknown dtype name, stored inline so that [`DType`] stays `Copy`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpaqueName {
    len: u8,
    bytes: [u8; 24],
}

impl OpaqueName {
    pub fn new(s: &str) -> Option<Self> {
        if s.is_empty() || s.len() > 24 || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return None;
        }
        let mut bytes = [0u8; 24];
        bytes[..s.len()].copy_from_slice(s.as_bytes());
        Some(OpaqueName { len: s.len() as u8, bytes })
    }
    pub fn as_str(&self) -> &str {
        // Only ASCII is stored (checked in `new`).
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("?")
    }
}

impl fmt::Debug for OpaqueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// Every known dtype, in the safetensors order (increasing alignment).
pub const KNOWN: [DType; 22] = [
    DType::Bool,
    DType::F4,
    DType::F6E2M3,
    DType::F6E3M2,
    DType::U8,
    DType::I8,
    DType::F8E5M2,
    DType::F8E4M3,
    DType::F8E8M0,
    DType::F8E4M3Fnuz,
    DType::F8E5M2Fnuz,
    DType::I16,
    DType::U16,
    DType::F16,
    DType::BF16,
    DType::I32,
    DType::U32,
    DType::F32,
    DType::C64,
    DType::F64,
    DType::I64,
    DType::U64,
];

impl DType {
    /// The safetensors dtype string.
    pub fn as_str(&self) -> &str {
        match self {
            DType::Bool => "BOOL",
            DType::F4 => "F4",
            DType::F6E2M3 => "F6_E2M3",
            DType::F6E3M2 => "F6_E3M2",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::F8E5M2 => "F8_E5M2",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E8M0 => "F8_E8M0",
            DType::F8E4M3Fnuz => "F8_E4M3FNUZ",
            DType::F8E5M2Fnuz => "F8_E5M2FNUZ",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::F32 => "F32",
            DType::C64 => "C64",
            DType::F64 => "F64",
            DType::I64 => "I64",
            DType::U64 => "U64",
            DType::Opaque(n, _) => n.as_str(),
        }
    }

    /// Parse a safetensors dtype string. Unknown names give `None`; see [`DType::opaque`].
    pub fn parse(s: &str) -> Option<DType> {
        KNOWN.iter().copied().find(|d| d.as_str() == s)
    }

    /// An unknown dtype. The bit width comes from the name (`F8_...` → 8, `I4` → 4) when it
    /// names one; otherwise from `bytes`/`numel` when that divides evenly.
    pub fn opaque(name: &str, numel: u64, bytes: u64) -> Option<DType> {
        let n = OpaqueName::new(name)?;
        let digits: String = name.chars().skip_while(|c| !c.is_ascii_digit()).take_while(|c| c.is_ascii_digit()).collect();
        let from_name = digits.parse::<u16>().ok().filter(|b| [1, 2, 3, 4, 5, 6, 8, 16, 32, 64, 128].contains(b));
        let bits = match from_name {
            Some(b) => b,
            None => {
                if numel == 0 {
                    return None;
                }
                let total_bits = bytes.checked_mul(8)?;
                if total_bits % numel != 0 {
                    return None;
                }
                u16::try_from(total_bits / numel).ok()?
            }
        };
        Some(DType::Opaque(n, bits))
    }

    /// Bits per element (safetensors `Dtype::bitsize`).
    pub fn bits(&self) -> u32 {
        match self {
            DType::F4 => 4,
            DType::F6E2M3 | DType::F6E3M2 => 6,
            DType::Bool | DType::U8 | DType::I8 => 8,
            DType::F8E5M2 | DType::F8E4M3 | DType::F8E8M0 | DType::F8E4M3Fnuz | DType::F8E5M2Fnuz => 8,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 16,
            DType::I32 | DType::U32 | DType::F32 => 32,
            DType::C64 | DType::F64 | DType::I64 | DType::U64 => 64,
            DType::Opaque(_, b) => *b as u32,
        }
    }

    /// Bytes per element, for whole-byte types.
    pub fn size(&self) -> Option<usize> {
        let b = self.bits();
        (b % 8 == 0).then_some((b / 8) as usize)
    }

    /// Floating-point types that [`crate::cast`] can convert to and from f32.
    pub fn is_castable_float(&self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64 | DType::F8E4M3 | DType::F8E5M2)
    }

    pub fn is_fp8(&self) -> bool {
        matches!(self, DType::F8E4M3 | DType::F8E5M2 | DType::F8E4M3Fnuz | DType::F8E5M2Fnuz)
    }

    /// Byte size of `numel` elements; `None` on overflow or when the bits do not fill whole bytes.
    pub fn byte_size(&self, numel: u64) -> Option<u64> {
        let bits = numel.checked_mul(self.bits() as u64)?;
        (bits % 8 == 0).then_some(bits / 8)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Number of elements of `shape`, or `None` on overflow.
pub fn numel(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bits() {
        for d in KNOWN {
            assert_eq!(DType::parse(d.as_str()), Some(d));
        }
        assert_eq!(DType::BF16.bits(), 16);
        assert_eq!(DType::F4.byte_size(3), None);
        assert_eq!(DType::F4.byte_size(4), Some(2));
        assert_eq!(DType::F6E2M3.byte_size(4), Some(3));
    }

    #[test]
    fn opaque_widths() {
        let d = DType::opaque("F8_E3M4", 10, 10).unwrap();
        assert_eq!(d.bits(), 8);
        assert_eq!(d.as_str(), "F8_E3M4");
        let d = DType::opaque("FANCY", 4, 16).unwrap();
        assert_eq!(d.bits(), 32);
        assert!(DType::opaque("FANCY", 3, 16).is_none());
        assert!(DType::opaque("bad name\n", 1, 1).is_none());
    }
}
