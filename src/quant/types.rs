//! ggml tensor types (`enum ggml_type`), with block sizes from gguf-py `GGML_QUANT_SIZES`.

use crate::dtype::DType;

/// A ggml tensor type id as stored in GGUF tensor infos.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

use GgmlType::*;

/// (type, id, elements per block, bytes per block, name)
const TABLE: &[(GgmlType, u32, u32, u32, &str)] = &[
    (F32, 0, 1, 4, "F32"),
    (F16, 1, 1, 2, "F16"),
    (Q4_0, 2, 32, 18, "Q4_0"),
    (Q4_1, 3, 32, 20, "Q4_1"),
    (Q5_0, 6, 32, 22, "Q5_0"),
    (Q5_1, 7, 32, 24, "Q5_1"),
    (Q8_0, 8, 32, 34, "Q8_0"),
    (Q8_1, 9, 32, 40, "Q8_1"),
    (Q2_K, 10, 256, 84, "Q2_K"),
    (Q3_K, 11, 256, 110, "Q3_K"),
    (Q4_K, 12, 256, 144, "Q4_K"),
    (Q5_K, 13, 256, 176, "Q5_K"),
    (Q6_K, 14, 256, 210, "Q6_K"),
    (Q8_K, 15, 256, 292, "Q8_K"),
    (IQ2_XXS, 16, 256, 66, "IQ2_XXS"),
    (IQ2_XS, 17, 256, 74, "IQ2_XS"),
    (IQ3_XXS, 18, 256, 98, "IQ3_XXS"),
    (IQ1_S, 19, 256, 50, "IQ1_S"),
    (IQ4_NL, 20, 32, 18, "IQ4_NL"),
    (IQ3_S, 21, 256, 110, "IQ3_S"),
    (IQ2_S, 22, 256, 82, "IQ2_S"),
    (IQ4_XS, 23, 256, 136, "IQ4_XS"),
    (I8, 24, 1, 1, "I8"),
    (I16, 25, 1, 2, "I16"),
    (I32, 26, 1, 4, "I32"),
    (I64, 27, 1, 8, "I64"),
    (F64, 28, 1, 8, "F64"),
    (IQ1_M, 29, 256, 56, "IQ1_M"),
    (BF16, 30, 1, 2, "BF16"),
    (TQ1_0, 34, 256, 54, "TQ1_0"),
    (TQ2_0, 35, 256, 66, "TQ2_0"),
    (MXFP4, 39, 32, 17, "MXFP4"),
];

impl GgmlType {
    fn row(self) -> &'static (GgmlType, u32, u32, u32, &'static str) {
        TABLE.iter().find(|r| r.0 == self).expect("every variant is in TABLE")
    }
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TABLE.iter().find(|r| r.1 == id).map(|r| r.0)
    }
    pub fn id(self) -> u32 {
        self.row().1
    }
    /// Elements per block.
    pub fn block_size(self) -> u64 {
        self.row().2 as u64
    }
    /// Bytes per block.
    pub fn type_size(self) -> u64 {
        self.row().3 as u64
    }
    pub fn name(self) -> &'static str {
        self.row().4
    }
    pub fn parse(s: &str) -> Option<GgmlType> {
        let up = s.to_ascii_uppercase();
        TABLE.iter().find(|r| r.4 == up).map(|r| r.0)
    }
    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }
    /// Byte size of a tensor of `numel` elements whose innermost dim is `ne0`.
    /// `None` if `ne0` is not a multiple of the block size or on overflow.
    pub fn byte_size(self, ne0: u64, numel: u64) -> Option<u64> {
        let b = self.block_size();
        if b > 1 && ne0 % b != 0 {
            return None;
        }
        (numel / b).checked_mul(self.type_size())
    }
    /// The dense dtype with the same bytes, for non-block types.
    pub fn dense(self) -> Option<DType> {
        Some(match self {
            F32 => DType::F32,
            F16 => DType::F16,
            BF16 => DType::BF16,
            F64 => DType::F64,
            I8 => DType::I8,
            I16 => DType::I16,
            I32 => DType::I32,
            I64 => DType::I64,
            _ => return None,
        })
    }
    /// The ggml type that stores a dense dtype unchanged.
    pub fn from_dense(d: DType) -> Option<GgmlType> {
        Some(match d {
            DType::F32 => F32,
            DType::F16 => F16,
            DType::BF16 => BF16,
            DType::F64 => F64,
            DType::I8 => I8,
            DType::I16 => I16,
            DType::I32 => I32,
            DType::I64 => I64,
            _ => return None,
        })
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
