//! The 32-element block types Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0.
//!
//! Quantisers follow gguf-py's numpy code (`gguf/quants.py`, gguf 0.19.0) operation by operation,
//! in f32, so that blocks are bit-identical to `gguf.quants.quantize`. gguf-py itself ports ggml's
//! `quantize_row_*_ref`; for finite input the two agree. Where numpy has its own rules they are
//! reproduced here:
//! - `argmax` of |x| takes the first maximum, and the first NaN wins;
//! - `max`/`min` propagate NaN; among equal values (+0.0 and -0.0) the last one wins. numpy's
//!   SIMD reductions decide this tie by lane order, so for a block whose extreme is a zero of
//!   both signs, the sign of the stored zero can differ from gguf-py's (never the value);
//! - a float → uint8/int8 cast truncates through a 32-bit integer and keeps the low byte, and a
//!   value out of the i32 range or NaN becomes 0 (x86-64 `cvttss2si`). This only matters for
//!   blocks with non-finite values or a subnormal scale.
//!
//! Block layouts (ggml `ggml-common.h`): `d` and `m` are little-endian f16, `qh` a little-endian
//! u32 with bit j the fifth bit of element j, and byte j of `qs` holds element j in its low nibble
//! and element j + 16 in its high nibble.

use super::dense::{f16_to_f32, f32_to_f16};

pub(crate) const QK: usize = 32;

#[inline]
fn rd16(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

#[inline]
fn wr16(b: &mut [u8], at: usize, x: f32) {
    b[at..at + 2].copy_from_slice(&f32_to_f16(x).to_le_bytes());
}

/// numpy's float32 → uint8 cast on x86-64 (see the module doc). It truncates toward zero, so
/// gguf-py's `np.trunc` before the cast is implied.
#[inline]
fn np_u8(v: f32) -> u8 {
    if (-2_147_483_648.0..2_147_483_648.0).contains(&v) {
        v as i32 as u8
    } else {
        0
    }
}

/// gguf-py `np_roundf` (`sign(n) * (floor(a) + floor(2 * (a - floor(a))))`, a = |n|): round
/// half away from zero; infinity gives NaN (which the cast then turns into 0). Written without
/// `floor`, a libm call on baseline x86-64: for 0 <= a < 2^23 truncation is floor, and above
/// that every f32 is an integer.
#[inline]
fn np_roundf(n: f32) -> f32 {
    let a = n.abs();
    let b = if a < 8_388_608.0 {
        let fl = a as i32 as f32;
        fl + (2.0 * (a - fl)) as i32 as f32
    } else if a.is_finite() {
        a
    } else {
        f32::NAN
    };
    if n < 0.0 {
        -b
    } else {
        b
    }
}

/// numpy `abs(x).argmax()`: index of the first largest magnitude, or of the first NaN.
#[inline]
fn np_argmax_abs(x: &[f32]) -> usize {
    let mut best = x[0].abs();
    if best.is_nan() {
        return 0;
    }
    let mut idx = 0;
    for (i, v) in x.iter().enumerate().skip(1) {
        let a = v.abs();
        if a.is_nan() {
            return i;
        }
        if a > best {
            best = a;
            idx = i;
        }
    }
    idx
}

/// numpy `max`/`min` over a block: NaN propagates, the last of equal values wins.
#[inline]
fn np_min_max(x: &[f32]) -> (f32, f32) {
    let (mut lo, mut hi) = (x[0], x[0]);
    for &v in &x[1..] {
        if !lo.is_nan() && (v.is_nan() || v <= lo) {
            lo = v;
        }
        if !hi.is_nan() && (v.is_nan() || v >= hi) {
            hi = v;
        }
    }
    (lo, hi)
}

/// numpy `abs(x).max()`.
#[inline]
fn np_amax(x: &[f32]) -> f32 {
    let mut hi = x[0].abs();
    for &v in &x[1..] {
        let a = v.abs();
        if !hi.is_nan() && (a.is_nan() || a >= hi) {
            hi = a;
        }
    }
    hi
}

#[inline]
fn inv(d: f32) -> f32 {
    if d == 0.0 {
        0.0
    } else {
        1.0 / d
    }
}

// ---------------------------------------------------------------- dequantize

pub(crate) fn dequant_q4_0(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(18).zip(dst.chunks_exact_mut(QK)) {
        let d = rd16(b, 0);
        let qs = &b[2..18];
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            lo[j] = d * ((qs[j] & 0x0f) as i32 - 8) as f32;
            hi[j] = d * ((qs[j] >> 4) as i32 - 8) as f32;
        }
    }
}

pub(crate) fn dequant_q4_1(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(20).zip(dst.chunks_exact_mut(QK)) {
        let d = rd16(b, 0);
        let m = rd16(b, 2);
        let qs = &b[4..20];
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            lo[j] = d * (qs[j] & 0x0f) as f32 + m;
            hi[j] = d * (qs[j] >> 4) as f32 + m;
        }
    }
}

pub(crate) fn dequant_q5_0(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(22).zip(dst.chunks_exact_mut(QK)) {
        let d = rd16(b, 0);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..22];
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            let h0 = ((qh >> j) & 1) << 4;
            let h1 = ((qh >> (j + 16)) & 1) << 4;
            lo[j] = d * (((qs[j] & 0x0f) as u32 | h0) as i32 - 16) as f32;
            hi[j] = d * (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32;
        }
    }
}

pub(crate) fn dequant_q5_1(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(24).zip(dst.chunks_exact_mut(QK)) {
        let d = rd16(b, 0);
        let m = rd16(b, 2);
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let qs = &b[8..24];
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            let h0 = ((qh >> j) & 1) << 4;
            let h1 = ((qh >> (j + 16)) & 1) << 4;
            lo[j] = d * ((qs[j] & 0x0f) as u32 | h0) as f32 + m;
            hi[j] = d * ((qs[j] >> 4) as u32 | h1) as f32 + m;
        }
    }
}

pub(crate) fn dequant_q8_0(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(34).zip(dst.chunks_exact_mut(QK)) {
        let d = rd16(b, 0);
        for (q, v) in b[2..34].iter().zip(y.iter_mut()) {
            *v = *q as i8 as f32 * d;
        }
    }
}

// ---------------------------------------------------------------- quantize

pub(crate) fn quant_q4_0(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(18)) {
        let max = x[np_argmax_abs(x)];
        let d = max / -8.0;
        let id = inv(d);
        let mut q = [0u8; QK];
        for (q, &v) in q.iter_mut().zip(x) {
            *q = np_u8(v * id + 8.5).min(15);
        }
        wr16(b, 0, d);
        for j in 0..16 {
            b[2 + j] = q[j] | (q[j + 16] << 4);
        }
    }
}

pub(crate) fn quant_q4_1(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(20)) {
        let (min, max) = np_min_max(x);
        let d = (max - min) / 15.0;
        let id = inv(d);
        let mut q = [0u8; QK];
        for (q, &v) in q.iter_mut().zip(x) {
            *q = np_u8((v - min) * id + 0.5).min(15);
        }
        wr16(b, 0, d);
        wr16(b, 2, min);
        for j in 0..16 {
            b[4 + j] = q[j] | (q[j + 16] << 4);
        }
    }
}

/// Pack 32 five-bit values into `qh` (the fifth bits) and `qs` (the low nibbles).
#[inline]
fn pack5(q: &[u8; QK], qh: &mut [u8], qs: &mut [u8]) {
    let mut h = 0u32;
    for (j, &v) in q.iter().enumerate() {
        h |= (((v >> 4) & 1) as u32) << j;
    }
    qh.copy_from_slice(&h.to_le_bytes());
    for j in 0..16 {
        qs[j] = (q[j] & 0x0f) | ((q[j + 16] & 0x0f) << 4);
    }
}

pub(crate) fn quant_q5_0(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(22)) {
        let max = x[np_argmax_abs(x)];
        let d = max / -16.0;
        let id = inv(d);
        let mut q = [0u8; QK];
        for (q, &v) in q.iter_mut().zip(x) {
            *q = np_u8(v * id + 16.5).min(31);
        }
        wr16(b, 0, d);
        let (qh, qs) = b[2..].split_at_mut(4);
        pack5(&q, qh, qs);
    }
}

pub(crate) fn quant_q5_1(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(24)) {
        let (min, max) = np_min_max(x);
        let d = (max - min) / 31.0;
        let id = inv(d);
        let mut q = [0u8; QK];
        for (q, &v) in q.iter_mut().zip(x) {
            *q = np_u8((v - min) * id + 0.5).min(31);
        }
        wr16(b, 0, d);
        wr16(b, 2, min);
        let (qh, qs) = b[4..].split_at_mut(4);
        pack5(&q, qh, qs);
    }
}

pub(crate) fn quant_q8_0(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(34)) {
        // max |x| as the largest magnitude bit pattern: for finite values the order of the
        // bits is the order of the values, so this is `np_amax` without a branch per element.
        let bits = x.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff));
        let (d, id) = (f32::from_bits(bits) / 127.0, inv(f32::from_bits(bits) / 127.0));
        if bits >= 0x7f80_0000 || !id.is_finite() {
            // inf or NaN in the block, or a scale so small that 1/d overflows: numpy's
            // rules, element by element.
            let d = np_amax(x) / 127.0;
            let id = inv(d);
            wr16(b, 0, d);
            for (q, &v) in b[2..34].iter_mut().zip(x) {
                *q = np_u8(np_roundf(v * id));
            }
            continue;
        }
        wr16(b, 0, d);
        // Every |v·id| is at most 127 (plus rounding), far inside both the 2^23 range of
        // `np_roundf`'s truncation trick and i32: the same arithmetic without branches, which
        // the compiler turns into vector code.
        for (q, &v) in b[2..34].iter_mut().zip(x) {
            let n = v * id;
            let a = n.abs();
            let fl = a as i32;
            let r = fl + (2.0 * (a - fl as f32)) as i32;
            *q = if n < 0.0 { r.wrapping_neg() } else { r } as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_cast_rules() {
        assert_eq!(np_u8(300.7), 44);
        assert_eq!(np_u8(-3.7), 253);
        assert_eq!(np_u8(f32::INFINITY), 0);
        assert_eq!(np_u8(f32::NAN), 0);
        assert_eq!(np_u8(1e10), 0);
        assert_eq!(np_roundf(2.5), 3.0);
        assert_eq!(np_roundf(-2.5), -3.0);
        assert_eq!(np_roundf(2.4999998), 2.0);
        assert!(np_roundf(f32::INFINITY).is_nan());
        assert_eq!(np_argmax_abs(&[1.0, -3.0, 3.0]), 1);
        assert_eq!(np_argmax_abs(&[1.0, f32::NAN, 9.0, f32::NAN]), 1);
        let (lo, hi) = np_min_max(&[0.0, -0.0, 1.0]);
        assert!(lo == 0.0 && lo.is_sign_negative() && hi == 1.0);
    }

    #[test]
    fn q8_0_round_trip_is_close() {
        let x: Vec<f32> = (0..64).map(|i| ((i * 37 % 64) as f32 - 31.5) / 7.0).collect();
        let mut q = vec![0u8; 2 * 34];
        quant_q8_0(&x, &mut q);
        let mut y = vec![0f32; 64];
        dequant_q8_0(&q, &mut y);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() <= 4.5 / 127.0 * 0.5 + 1e-3, "{a} {b}");
        }
    }

    #[test]
    fn all_zero_block_keeps_numpy_negative_zero_scale() {
        // argmax picks x[0] = +0.0, so d = +0.0 / -8 = -0.0 (f16 0x8000), as in gguf-py.
        let x = [0f32; QK];
        let mut q = [0u8; 18];
        quant_q4_0(&x, &mut q);
        assert_eq!(&q[..2], &[0x00, 0x80]);
        assert!(q[2..].iter().all(|&b| b == 0x88));
    }
}
