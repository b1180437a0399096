//! K-quants (256-element super-blocks): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K dequantisation, Q8_K
//! dequantisation, and the shared scale packing.
//!
//! Dequantisation follows gguf-py's `dequantize_blocks` expression by expression (f32, no fused
//! multiply-add), which computes the same products in the same order as ggml's
//! `dequantize_row_*`. Block layouts are those of ggml `ggml-common.h`:
//!
//! | type | bytes | layout |
//! |---|---|---|
//! | Q2_K | 84 | `scales[16]` (low nibble scale, high nibble min), `qs[64]`, `d`, `dmin` |
//! | Q3_K | 110 | `hmask[32]`, `qs[64]`, `scales[12]` (16 six-bit scales), `d` |
//! | Q4_K | 144 | `d`, `dmin`, `scales[12]` (8 six-bit scales and 8 six-bit mins), `qs[128]` |
//! | Q5_K | 176 | `d`, `dmin`, `scales[12]`, `qh[32]`, `qs[128]` |
//! | Q6_K | 210 | `ql[128]`, `qh[64]`, `scales[16]` (i8), `d` |
//! | Q8_K | 292 | `d` (f32), `qs[256]` (i8), `bsums[16]` (i16, unused here) |
//!
//! `d`/`dmin` are little-endian f16 unless noted.

use super::dense::f16_to_f32;

pub(crate) const QK_K: usize = 256;

#[inline]
pub(crate) fn rd16(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// Scale and min `j` (0..8) of a Q4_K/Q5_K block (ggml `get_scale_min_k4`).
#[inline]
pub(crate) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// The 16 signed six-bit scales of a Q3_K block.
#[inline]
pub(crate) fn q3k_scales(s: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let lo = (s[i % 8] >> (4 * (i / 8))) & 0x0f;
        let hi = (s[8 + i % 4] >> (2 * (i / 4))) & 0x03;
        *o = ((lo | (hi << 4)) as i8).wrapping_sub(32);
    }
    out
}

pub(crate) fn dequant_q2_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(84).zip(dst.chunks_exact_mut(QK_K)) {
        let scales = &b[0..16];
        let qs = &b[16..80];
        let d = rd16(b, 80);
        let dmin = rd16(b, 82);
        for (g, yg) in y.chunks_exact_mut(16).enumerate() {
            let sc = scales[g];
            let dl = d * (sc & 0x0f) as f32;
            let ml = dmin * (sc >> 4) as f32;
            // Element e = 128h + 32s + l holds bits 2s..2s+2 of qs[32h + l].
            let (h, s) = (g / 8, (g / 2) % 4);
            let base = 32 * h + 16 * (g % 2);
            for (l, v) in yg.iter_mut().enumerate() {
                let q = (qs[base + l] >> (2 * s)) & 3;
                *v = dl * q as f32 - ml;
            }
        }
    }
}

pub(crate) fn dequant_q3_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(110).zip(dst.chunks_exact_mut(QK_K)) {
        let hmask = &b[0..32];
        let qs = &b[32..96];
        let scales = q3k_scales(&b[96..108]);
        let d = rd16(b, 108);
        for (g, yg) in y.chunks_exact_mut(16).enumerate() {
            let dl = d * scales[g] as f32;
            let (h, s) = (g / 8, (g / 2) % 4);
            let base = 32 * h + 16 * (g % 2);
            // The high bit of element e is bit e/32 of hmask[e % 32]; a clear bit subtracts 4.
            let hbit = g / 2;
            let hbase = 16 * (g % 2);
            for (l, v) in yg.iter_mut().enumerate() {
                let lo = ((qs[base + l] >> (2 * s)) & 3) as i8;
                let hi = ((hmask[hbase + l] >> hbit) & 1) ^ 1;
                *v = dl * (lo - ((hi << 2) as i8)) as f32;
            }
        }
    }
}

pub(crate) fn dequant_q4_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(144).zip(dst.chunks_exact_mut(QK_K)) {
        let d = rd16(b, 0);
        let dmin = rd16(b, 2);
        let scales = &b[4..16];
        let qs = &b[16..144];
        for (k, yk) in y.chunks_exact_mut(32).enumerate() {
            let (sc, m) = scale_min_k4(k, scales);
            let dl = d * sc as f32;
            let ml = dmin * m as f32;
            let q = &qs[32 * (k / 2)..32 * (k / 2) + 32];
            let shift = 4 * (k % 2);
            for (v, &q) in yk.iter_mut().zip(q) {
                *v = dl * ((q >> shift) & 0x0f) as f32 - ml;
            }
        }
    }
}

pub(crate) fn dequant_q5_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(176).zip(dst.chunks_exact_mut(QK_K)) {
        let d = rd16(b, 0);
        let dmin = rd16(b, 2);
        let scales = &b[4..16];
        let qh = &b[16..48];
        let qs = &b[48..176];
        for (k, yk) in y.chunks_exact_mut(32).enumerate() {
            let (sc, m) = scale_min_k4(k, scales);
            let dl = d * sc as f32;
            let ml = dmin * m as f32;
            let q = &qs[32 * (k / 2)..32 * (k / 2) + 32];
            let shift = 4 * (k % 2);
            for ((v, &q), &h) in yk.iter_mut().zip(q).zip(qh) {
                let val = ((q >> shift) & 0x0f) | (((h >> k) & 1) << 4);
                *v = dl * val as f32 - ml;
            }
        }
    }
}

pub(crate) fn dequant_q6_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(210).zip(dst.chunks_exact_mut(QK_K)) {
        let ql = &b[0..128];
        let qh = &b[128..192];
        let scales = &b[192..208];
        let d = rd16(b, 208);
        // Element e = 128h + 32s + l: low nibble from ql[64h + 32(s % 2) + l] (shifted by
        // 4(s / 2)), high two bits from qh[32h + l] (shifted by 2s).
        for (g, yg) in y.chunks_exact_mut(16).enumerate() {
            let dl = d * scales[g] as i8 as f32;
            let (h, s) = (g / 8, (g / 2) % 4);
            let off = 16 * (g % 2);
            let lq = &ql[64 * h + 32 * (s % 2) + off..][..16];
            let hq = &qh[32 * h + off..][..16];
            for ((v, &lo), &hi) in yg.iter_mut().zip(lq).zip(hq) {
                let q = (((lo >> (4 * (s / 2))) & 0x0f) | (((hi >> (2 * s)) & 3) << 4)) as i8 - 32;
                *v = dl * q as f32;
            }
        }
    }
}

pub(crate) fn dequant_q8_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(292).zip(dst.chunks_exact_mut(QK_K)) {
        let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        for (v, &q) in y.iter_mut().zip(&b[4..260]) {
            *v = d * q as i8 as f32;
        }
    }
}
