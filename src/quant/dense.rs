//! Dense ggml types (F32, F16, BF16, F64, I8..I64) to and from f32, with the exact bits of
//! numpy / gguf-py.
//!
//! Two details differ from the `half` crate and matter for bit equality with gguf-py:
//! - numpy keeps a NaN's payload as it is (a signalling NaN stays signalling) when it converts
//!   between f16 and f32, where `half` (and the F16C instructions) set the quiet bit;
//! - an f32 NaN whose payload does not survive the narrowing becomes f16 `0x7c01`, not `0x7e00`.
//!
//! Finite values and infinities go through `half`, which rounds to nearest-even like numpy.

use half::f16;

/// f16 bits to f32, as numpy's `astype(np.float32)` does (exact; NaN payloads kept).
#[inline]
pub fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7fff;
    let bits = if em >= 0x7c00 {
        // Infinity or NaN: the payload moves up unchanged, the quiet bit is not forced.
        0x7f80_0000 | ((em & 0x03ff) << 13)
    } else if em >= 0x0400 {
        // Normal: rebias the exponent from 15 to 127.
        (em << 13) + (112 << 23)
    } else {
        // Zero or subnormal: em × 2⁻²⁴ is exact in f32.
        (em as f32 * f32::from_bits(0x3380_0000)).to_bits()
    };
    f32::from_bits(sign | bits)
}

/// f32 to f16 bits, rounding to nearest-even, as numpy's `astype(np.float16)` does.
#[inline]
pub fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    if b & 0x7fff_ffff > 0x7f80_0000 {
        let sign = ((b >> 16) & 0x8000) as u16;
        let sig = ((b & 0x007f_ffff) >> 13) as u16;
        // numpy: 0x7c00 + the top payload bits, bumped to 0x7c01 when they are all zero.
        sign | 0x7c00 | sig.max(1)
    } else {
        f16::from_f32(x).to_bits()
    }
}

/// f32 to bf16 bits: NaN forced quiet, then round to nearest-even. This is gguf-py's
/// `BF16.quantize_blocks` and ggml's `ggml_compute_fp32_to_bf16`.
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    let mut n = x.to_bits();
    if n & 0x7fff_ffff > 0x7f80_0000 {
        n = (n & 0xffff_0000) | (64 << 16);
    }
    ((n as u64 + (0x7fff + ((n >> 16) & 1) as u64)) >> 16) as u16
}

/// bf16 bits to f32 (exact).
#[inline]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

pub(crate) fn dequant_f32(src: &[u8], dst: &mut [f32]) {
    for (c, y) in src.chunks_exact(4).zip(dst.iter_mut()) {
        *y = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

pub(crate) fn dequant_f16(src: &[u8], dst: &mut [f32]) {
    for (c, y) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *y = f16_to_f32(u16::from_le_bytes([c[0], c[1]]));
    }
}

pub(crate) fn dequant_bf16(src: &[u8], dst: &mut [f32]) {
    for (c, y) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *y = bf16_to_f32(u16::from_le_bytes([c[0], c[1]]));
    }
}

pub(crate) fn dequant_f64(src: &[u8], dst: &mut [f32]) {
    for (c, y) in src.chunks_exact(8).zip(dst.iter_mut()) {
        *y = f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32;
    }
}

pub(crate) fn dequant_i8(src: &[u8], dst: &mut [f32]) {
    for (&c, y) in src.iter().zip(dst.iter_mut()) {
        *y = c as i8 as f32;
    }
}

pub(crate) fn dequant_i16(src: &[u8], dst: &mut [f32]) {
    for (c, y) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *y = i16::from_le_bytes([c[0], c[1]]) as f32;
    }
}

pub(crate) fn dequant_i32(src: &[u8], dst: &mut [f32]) {
    for (c, y) in src.chunks_exact(4).zip(dst.iter_mut()) {
        *y = i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32;
    }
}

pub(crate) fn dequant_i64(src: &[u8], dst: &mut [f32]) {
    for (c, y) in src.chunks_exact(8).zip(dst.iter_mut()) {
        *y = i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32;
    }
}

pub(crate) fn quant_f32(src: &[f32], dst: &mut [u8]) {
    for (x, c) in src.iter().zip(dst.chunks_exact_mut(4)) {
        c.copy_from_slice(&x.to_le_bytes());
    }
}

pub(crate) fn quant_f16(src: &[f32], dst: &mut [u8]) {
    for (&x, c) in src.iter().zip(dst.chunks_exact_mut(2)) {
        c.copy_from_slice(&f32_to_f16(x).to_le_bytes());
    }
}

pub(crate) fn quant_bf16(src: &[f32], dst: &mut [u8]) {
    for (&x, c) in src.iter().zip(dst.chunks_exact_mut(2)) {
        c.copy_from_slice(&f32_to_bf16(x).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_to_f32_matches_half_except_nan_quieting() {
        for h in 0..=u16::MAX {
            let ours = f16_to_f32(h).to_bits();
            let theirs = f16::from_bits(h).to_f32().to_bits();
            if h & 0x7c00 == 0x7c00 && h & 0x03ff != 0 {
                // half sets the quiet bit; we keep the payload as numpy does.
                assert_eq!(ours | 0x0040_0000, theirs, "{h:#06x}");
                assert!(f32::from_bits(ours).is_nan());
            } else {
                assert_eq!(ours, theirs, "{h:#06x}");
            }
        }
        assert_eq!(f16_to_f32(0x7c01).to_bits(), 0x7f80_2000);
        assert_eq!(f16_to_f32(0xfe00).to_bits(), 0xffc0_0000);
    }

    #[test]
    fn f32_to_f16_round_trips_and_nan_rules() {
        for h in 0..=u16::MAX {
            let f = f16_to_f32(h);
            assert_eq!(f32_to_f16(f), h, "{h:#06x}");
        }
        // numpy: a payload lost in the narrowing gives 0x7c01, the sign is kept.
        assert_eq!(f32_to_f16(f32::from_bits(0x7f80_0001)), 0x7c01);
        assert_eq!(f32_to_f16(f32::from_bits(0xff80_0001)), 0xfc01);
        assert_eq!(f32_to_f16(f32::from_bits(0x7fc0_0000)), 0x7e00);
        assert_eq!(f32_to_f16(f32::from_bits(0x7fff_ffff)), 0x7fff);
        // Rounding at the top and at the bottom of the range.
        assert_eq!(f32_to_f16(f32::from_bits(0x477f_efff)), 0x7bff);
        assert_eq!(f32_to_f16(f32::from_bits(0x477f_f000)), 0x7c00);
        assert_eq!(f32_to_f16(f32::from_bits(0x3300_0000)), 0x0000);
        assert_eq!(f32_to_f16(f32::from_bits(0x3300_0001)), 0x0001);
    }

    #[test]
    fn bf16_rounds_to_nearest_even_and_quiets_nan() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80); // tie, even stays
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82); // tie, odd rounds up
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(f32_to_bf16(f32::from_bits(0x7f80_0001)), 0x7fc0);
        assert_eq!(f32_to_bf16(f32::from_bits(0xff81_0000)), 0xffc1);
        assert_eq!(f32_to_bf16(f32::INFINITY), 0x7f80);
        assert_eq!(f32_to_bf16(f32::from_bits(0x7f7f_ffff)), 0x7f80); // rounds up to infinity
        for h in [0u16, 0x8000, 0x0001, 0x3f80, 0x7f80, 0xff80, 0x7fc1] {
            assert_eq!(f32_to_bf16(bf16_to_f32(h)), h);
        }
    }
}
