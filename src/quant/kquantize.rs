//! K-quant quantisers: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.
//!
//! gguf-py 0.19.0 has no quantiser for these types (`gguf.quants.quantize` raises
//! `NotImplementedError`), so these implement ggml's reference algorithm, the one
//! `llama-quantize` uses when no importance matrix is given (`quantize_row_q*_K_ref` in
//! `ggml-quants.c`, with `make_qkx2_quants`, `make_qx_quants` and `make_q3_quants`). Every float
//! operation is done in f32 in the reference's order, and `nearest_int` uses the same
//! add-1.5·2²³ trick, so blocks equal those of the reference compiled without floating-point
//! contraction (`-ffp-contract=off`). A build of ggml that fuses multiply-adds (GCC's default
//! for GNU C on a CPU with FMA) can round a scale differently and pick a neighbouring level.
//!
//! The search itself: each sub-block gets a scale (and for the "qkx" types a min) chosen by
//! trying a small grid of candidate scales and keeping the one with the smallest weighted
//! error; the sub-block scales are then quantised to 4, 6 or 8 bits against one f16 super-block
//! scale, and the elements re-quantised against the stored (rounded) scales.

use super::dense::{f16_to_f32, f32_to_f16};
use super::kquants::{scale_min_k4, QK_K};

/// ggml `GROUP_MAX_EPS`: a sub-block whose largest magnitude is below this is all zero.
const GROUP_MAX_EPS: f32 = 1e-15;

/// Round to nearest, ties to even, by adding 1.5·2²³ (ggml `nearest_int`). Valid for
/// |f| ≤ 2²² − 1; outside that range (or for NaN) it returns a meaningless but harmless value,
/// as the reference does.
#[inline]
fn nearest_int(f: f32) -> i32 {
    let v = f + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

#[inline]
fn fp16_round(x: f32) -> (u16, f32) {
    let h = f32_to_f16(x);
    (h, f16_to_f32(h))
}

/// ggml `make_qkx2_quants`, one sub-block at a time, as the reference writes it: the oracle for
/// [`make_qkx2_quants_lanes`] in the tests. Levels 0..=nmax with a scale and a min (returned as `-min`, the
/// amount subtracted), minimising the weighted squared (or absolute, `use_mad`) error over
/// `nstep + 1` candidate scales.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l_out: &mut [u8],
    l_aux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    // Equal lengths, stated once, let the compiler drop the bounds checks in the loops.
    let n = x.len();
    let (weights, l_out, l_aux) = (&weights[..n], &mut l_out[..n], &mut l_aux[..n]);
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l_out.fill(0);
        return (0.0, -min);
    }
    let nmaxf = nmax as f32;
    let mut iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).max(0).min(nmax);
        l_out[i] = l as u8;
        let mut diff = scale * l as f32 + min - x[i];
        diff = if use_mad { diff.abs() } else { diff * diff };
        best_error += weights[i] * diff;
    }
    if nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmaxf) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).max(0).min(nmax);
            l_aux[i] = l as u8;
            let lf = l as f32;
            let w = weights[i];
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let mut diff = this_scale * l_aux[i] as f32 + this_min - x[i];
                diff = if use_mad { diff.abs() } else { diff * diff };
                cur_error += weights[i] * diff;
            }
            if cur_error < best_error {
                l_out.copy_from_slice(l_aux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml `make_qkx2_quants` on `L` independent sub-blocks of `N` values at once, lane `c` being
/// sub-block `c` (`xt[i][c]` is value `i` of sub-block `c`).
///
/// The reference's search is a chain of dependent f32 sums, so one sub-block is bound by add
/// latency; running `L` sub-blocks side by side lets the compiler use SIMD lanes. Each lane does
/// exactly the scalar operations in the scalar order, with its branches turned into per-lane
/// selects, so the results are bit-identical to the scalar version (checked by a test).
/// Returns each lane's scale and min (the min as the amount subtracted, `-min`).
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
fn make_qkx2_quants_lanes<const N: usize, const L: usize>(
    nmax: i32,
    xt: &[[f32; L]; N],
    wt: &[[f32; L]; N],
    lt: &mut [[u8; L]; N],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> ([f32; L], [f32; L]) {
    let mut min = xt[0];
    let mut max = xt[0];
    let mut sum_w = wt[0];
    let mut sum_x = [0f32; L];
    for c in 0..L {
        sum_x[c] = sum_w[c] * xt[0][c];
    }
    for i in 1..N {
        for c in 0..L {
            let v = xt[i][c];
            if v < min[c] {
                min[c] = v;
            }
            if v > max[c] {
                max[c] = v;
            }
            let w = wt[i][c];
            sum_w[c] += w;
            sum_x[c] += w * v;
        }
    }
    let mut flat = [false; L];
    for c in 0..L {
        if min[c] > 0.0 {
            min[c] = 0.0;
        }
        // The reference returns early here; the lane keeps computing, and its results are
        // ignored below.
        flat[c] = max[c] == min[c];
    }
    let nmaxf = nmax as f32;
    let mut iscale = [0f32; L];
    let mut scale = [0f32; L];
    let mut best_error = [0f32; L];
    for c in 0..L {
        iscale[c] = nmaxf / (max[c] - min[c]);
        scale[c] = 1.0 / iscale[c];
    }
    for i in 0..N {
        for c in 0..L {
            let l = nearest_int(iscale[c] * (xt[i][c] - min[c])).max(0).min(nmax);
            lt[i][c] = l as u8;
            let mut diff = scale[c] * l as f32 + min[c] - xt[i][c];
            diff = if use_mad { diff.abs() } else { diff * diff };
            best_error[c] += wt[i][c] * diff;
        }
    }
    let mut aux = [[0u8; L]; N];
    for is in 0..=nstep {
        let (mut sum_l, mut sum_l2, mut sum_xl) = ([0f32; L], [0f32; L], [0f32; L]);
        for c in 0..L {
            iscale[c] = (rmin + rdelta * is as f32 + nmaxf) / (max[c] - min[c]);
        }
        for i in 0..N {
            for c in 0..L {
                let l = nearest_int(iscale[c] * (xt[i][c] - min[c])).max(0).min(nmax);
                aux[i][c] = l as u8;
                let lf = l as f32;
                let w = wt[i][c];
                sum_l[c] += w * lf;
                sum_l2[c] += w * lf * lf;
                sum_xl[c] += w * lf * xt[i][c];
            }
        }
        let (mut this_scale, mut this_min, mut ok) = ([0f32; L], [0f32; L], [false; L]);
        for c in 0..L {
            let det = sum_w[c] * sum_l2[c] - sum_l[c] * sum_l[c];
            ok[c] = det > 0.0 && !flat[c];
            this_scale[c] = (sum_w[c] * sum_xl[c] - sum_x[c] * sum_l[c]) / det;
            this_min[c] = (sum_l2[c] * sum_x[c] - sum_l[c] * sum_xl[c]) / det;
            if this_min[c] > 0.0 {
                this_min[c] = 0.0;
                this_scale[c] = sum_xl[c] / sum_l2[c];
            }
        }
        let mut cur_error = [0f32; L];
        for i in 0..N {
            for c in 0..L {
                let mut diff = this_scale[c] * aux[i][c] as f32 + this_min[c] - xt[i][c];
                diff = if use_mad { diff.abs() } else { diff * diff };
                cur_error[c] += wt[i][c] * diff;
            }
        }
        let mut take = [false; L];
        for c in 0..L {
            take[c] = ok[c] && cur_error[c] < best_error[c];
            if take[c] {
                best_error[c] = cur_error[c];
                scale[c] = this_scale[c];
                min[c] = this_min[c];
            }
        }
        for i in 0..N {
            for c in 0..L {
                if take[c] {
                    lt[i][c] = aux[i][c];
                }
            }
        }
    }
    let mut neg_min = [0f32; L];
    for c in 0..L {
        if flat[c] {
            scale[c] = 0.0;
            for row in lt.iter_mut() {
                row[c] = 0;
            }
        }
        neg_min[c] = -min[c];
    }
    (scale, neg_min)
}

/// Run [`make_qkx2_quants_lanes`] over the `L` sub-blocks of `N` values of `x` (sub-block `c` is
/// `x[N*c..N*(c+1)]`), with weights laid out the same way; levels go to `levels` in that layout.
#[allow(clippy::too_many_arguments)]
fn qkx2_sub_blocks<const N: usize, const L: usize>(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    levels: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> ([f32; L], [f32; L]) {
    let mut xt = [[0f32; L]; N];
    let mut wt = [[0f32; L]; N];
    for (c, (xs, ws)) in x.chunks_exact(N).zip(weights.chunks_exact(N)).take(L).enumerate() {
        for i in 0..N {
            xt[i][c] = xs[i];
            wt[i][c] = ws[i];
        }
    }
    let mut lt = [[0u8; L]; N];
    let out = make_qkx2_quants_lanes(nmax, &xt, &wt, &mut lt, rmin, rdelta, nstep, use_mad);
    for (c, ls) in levels.chunks_exact_mut(N).take(L).enumerate() {
        for i in 0..N {
            ls[i] = lt[i][c];
        }
    }
    out
}

/// ggml `make_qx_quants` with `rmse_type == 1` and no importance weights (weights x²):
/// symmetric levels -nmax..nmax-1 stored as 0..2·nmax, best of 19 candidate scales.
fn make_qx_quants_rmse1(nmax: i32, x: &[f32], l_out: &mut [i8]) -> f32 {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out.fill(0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let mut iscale = -nmaxf / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for (lo, &v) in l_out.iter_mut().zip(x) {
        let l = nearest_int(iscale * v).max(-nmax).min(nmax - 1);
        *lo = (l + nmax) as i8;
        let w = v * v;
        let lf = l as f32;
        sumlx += w * v * lf;
        suml2 += w * lf * lf;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmaxf + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in x {
            let l = nearest_int(iscale * v).max(-nmax).min(nmax - 1);
            let w = v * v;
            let lf = l as f32;
            sumlx += w * v * lf;
            suml2 += w * lf * lf;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (lo, &v) in l_out.iter_mut().zip(x) {
                let l = nearest_int(iscale * v).max(-nmax).min(nmax - 1);
                *lo = (l + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// ggml `make_q3_quants` with `do_rmse`: symmetric levels refined by coordinate descent.
/// Levels are returned as 0..2·nmax.
fn make_q3_quants(nmax: i32, x: &[f32], l_out: &mut [i8]) -> f32 {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out.fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for (lo, &v) in l_out.iter_mut().zip(x) {
        let l = nearest_int(iscale * v).max(-nmax).min(nmax - 1);
        *lo = l as i8;
        let w = v * v;
        let lf = l as f32;
        sumlx += w * v * lf;
        suml2 += w * lf * lf;
    }
    for _ in 0..5 {
        let mut changed = false;
        for (lo, &v) in l_out.iter_mut().zip(x) {
            let w = v * v;
            let cur = *lo as f32;
            let mut slx = sumlx - w * v * cur;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * cur * cur;
                let new_l = nearest_int(v * sl2 / slx).max(-nmax).min(nmax - 1);
                if new_l != *lo as i32 {
                    let nl = new_l as f32;
                    slx += w * v * nl;
                    sl2 += w * nl * nl;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *lo = new_l as i8;
                        sumlx = slx;
                        suml2 = sl2;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    for lo in l_out.iter_mut() {
        *lo += nmax as i8;
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// Pack 2-bit levels of 256 elements: byte 32h + l holds elements 128h + l + 32s in bits 2s.
#[inline]
fn pack_2bit(levels: &[u8; QK_K], qs: &mut [u8]) {
    for h in 0..2 {
        for l in 0..32 {
            let e = 128 * h + l;
            qs[32 * h + l] = levels[e] | (levels[e + 32] << 2) | (levels[e + 64] << 4) | (levels[e + 96] << 6);
        }
    }
}

pub(crate) fn quant_q2_k(src: &[f32], dst: &mut [u8]) {
    const Q4SCALE: f32 = 15.0;
    let mut levels = [0u8; QK_K];
    let mut weights = [0f32; QK_K];
    for (x, b) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(84)) {
        for (w, v) in weights.iter_mut().zip(x) {
            *w = v.abs();
        }
        let (scales, mins) = qkx2_sub_blocks::<16, 16>(3, x, &weights, &mut levels, -0.5, 0.1, 15, true);
        let mut max_scale = 0.0f32;
        let mut max_min = 0.0f32;
        for (&s, &m) in scales.iter().zip(&mins) {
            if s > max_scale {
                max_scale = s;
            }
            if m > max_min {
                max_min = m;
            }
        }
        let (sc, rest) = b.split_at_mut(16);
        let (qs, dd) = rest.split_at_mut(64);
        let d_bits = if max_scale > 0.0 {
            let iscale = Q4SCALE / max_scale;
            for (s, &v) in sc.iter_mut().zip(&scales) {
                *s = nearest_int(iscale * v) as u8;
            }
            f32_to_f16(max_scale / Q4SCALE)
        } else {
            sc.fill(0);
            f32_to_f16(0.0)
        };
        let dmin_bits = if max_min > 0.0 {
            let iscale = Q4SCALE / max_min;
            for (s, &m) in sc.iter_mut().zip(&mins) {
                *s |= (nearest_int(iscale * m) << 4) as u8;
            }
            f32_to_f16(max_min / Q4SCALE)
        } else {
            f32_to_f16(0.0)
        };
        let d_all = f16_to_f32(d_bits);
        let dmin_all = f16_to_f32(dmin_bits);
        for j in 0..16 {
            let d = d_all * (sc[j] & 0x0f) as f32;
            if d == 0.0 {
                continue;
            }
            let dm = dmin_all * (sc[j] >> 4) as f32;
            for ii in 0..16 {
                let l = nearest_int((x[16 * j + ii] + dm) / d).clamp(0, 3);
                levels[16 * j + ii] = l as u8;
            }
        }
        pack_2bit(&levels, qs);
        dd[0..2].copy_from_slice(&d_bits.to_le_bytes());
        dd[2..4].copy_from_slice(&dmin_bits.to_le_bytes());
    }
}

pub(crate) fn quant_q3_k(src: &[f32], dst: &mut [u8]) {
    let mut l_signed = [0i8; QK_K];
    for (x, b) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(110)) {
        let mut scales = [0f32; 16];
        let mut max_scale = 0.0f32;
        let mut amax = 0.0f32;
        for j in 0..16 {
            scales[j] = make_q3_quants(4, &x[16 * j..16 * j + 16], &mut l_signed[16 * j..16 * j + 16]);
            let s = scales[j].abs();
            if s > amax {
                amax = s;
                max_scale = scales[j];
            }
        }
        let (hmask, rest) = b.split_at_mut(32);
        let (qs, rest) = rest.split_at_mut(64);
        let (sc, dd) = rest.split_at_mut(12);
        sc.fill(0);
        let d_bits = if max_scale != 0.0 {
            let iscale = -32.0 / max_scale;
            for j in 0..16 {
                let l = (nearest_int(iscale * scales[j]) as i8).clamp(-32, 31) + 32;
                let l = l as u8;
                if j < 8 {
                    sc[j] = l & 0x0f;
                } else {
                    sc[j - 8] |= (l & 0x0f) << 4;
                }
                sc[j % 4 + 8] |= (l >> 4) << (2 * (j / 4));
            }
            f32_to_f16(1.0 / iscale)
        } else {
            f32_to_f16(0.0)
        };
        let d_all = f16_to_f32(d_bits);
        for j in 0..16 {
            let lo = if j < 8 { sc[j] & 0x0f } else { sc[j - 8] >> 4 };
            let s = (lo | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) as i8 - 32;
            let d = d_all * s as f32;
            if d == 0.0 {
                continue;
            }
            for ii in 0..16 {
                let l = nearest_int(x[16 * j + ii] / d).clamp(-4, 3);
                l_signed[16 * j + ii] = (l + 4) as i8;
            }
        }
        // High bit of element e goes to bit e/32 of hmask[e % 32]; levels keep their low 2 bits.
        let mut levels = [0u8; QK_K];
        hmask.fill(0);
        for (e, (lv, &ls)) in levels.iter_mut().zip(l_signed.iter()).enumerate() {
            let mut v = ls as u8;
            if v > 3 {
                hmask[e % 32] |= 1 << (e / 32);
                v -= 4;
            }
            *lv = v;
        }
        pack_2bit(&levels, qs);
        dd.copy_from_slice(&d_bits.to_le_bytes());
    }
}

/// Store 8 six-bit scales and 8 six-bit mins in 12 bytes (the inverse of `scale_min_k4`).
#[inline]
fn pack_scale_min_k4(ls: &[u8; 8], lm: &[u8; 8], s: &mut [u8]) {
    for j in 0..8 {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 0x0f) | ((lm[j] & 0x0f) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
}

/// The shared part of Q4_K and Q5_K: sub-block scales and mins for one super-block, and the
/// final levels (0..=nmax) of its 256 elements. Returns the f16 `d` and `dmin` bits.
fn qkx_superblock(x: &[f32], nmax: i32, rmin: f32, nstep: i32, scales_out: &mut [u8], levels: &mut [u8; QK_K]) -> (u16, u16) {
    let mut weights = [0f32; QK_K];
    for (ws, xs) in weights.chunks_exact_mut(32).zip(x.chunks_exact(32)) {
        let mut sum_x2 = 0.0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in ws.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
    }
    let (scales, mins) = qkx2_sub_blocks::<32, 8>(nmax, x, &weights, levels, rmin, 0.1, nstep, false);
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for (&s, &m) in scales.iter().zip(&mins) {
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
    }
    scales_out.fill(0);
    pack_scale_min_k4(&ls, &lm, scales_out);
    let (d_bits, d_all) = fp16_round(max_scale / 63.0);
    let (dmin_bits, dmin_all) = fp16_round(max_min / 63.0);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, scales_out);
        let d = d_all * sc as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * m as f32;
        for ii in 0..32 {
            let l = nearest_int((x[32 * j + ii] + dm) / d).max(0).min(nmax);
            levels[32 * j + ii] = l as u8;
        }
    }
    (d_bits, dmin_bits)
}

pub(crate) fn quant_q4_k(src: &[f32], dst: &mut [u8]) {
    let mut levels = [0u8; QK_K];
    for (x, b) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(144)) {
        let (d, dmin) = qkx_superblock(x, 15, -1.0, 20, &mut b[4..16], &mut levels);
        b[0..2].copy_from_slice(&d.to_le_bytes());
        b[2..4].copy_from_slice(&dmin.to_le_bytes());
        let qs = &mut b[16..144];
        for h in 0..4 {
            for l in 0..32 {
                qs[32 * h + l] = levels[64 * h + l] | (levels[64 * h + l + 32] << 4);
            }
        }
    }
}

pub(crate) fn quant_q5_k(src: &[f32], dst: &mut [u8]) {
    let mut levels = [0u8; QK_K];
    for (x, b) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(176)) {
        let (d, dmin) = qkx_superblock(x, 31, -0.5, 15, &mut b[4..16], &mut levels);
        b[0..2].copy_from_slice(&d.to_le_bytes());
        b[2..4].copy_from_slice(&dmin.to_le_bytes());
        let (qh, qs) = b[16..176].split_at_mut(32);
        qh.fill(0);
        for h in 0..4 {
            for l in 0..32 {
                let mut l1 = levels[64 * h + l];
                if l1 > 15 {
                    l1 -= 16;
                    qh[l] |= 1 << (2 * h);
                }
                let mut l2 = levels[64 * h + l + 32];
                if l2 > 15 {
                    l2 -= 16;
                    qh[l] |= 2 << (2 * h);
                }
                qs[32 * h + l] = l1 | (l2 << 4);
            }
        }
    }
}

pub(crate) fn quant_q6_k(src: &[f32], dst: &mut [u8]) {
    let mut levels = [0i8; QK_K];
    for (x, b) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(210)) {
        let mut scales = [0f32; 16];
        let mut max_scale = 0.0f32;
        let mut max_abs_scale = 0.0f32;
        for ib in 0..16 {
            let s = make_qx_quants_rmse1(32, &x[16 * ib..16 * ib + 16], &mut levels[16 * ib..16 * ib + 16]);
            scales[ib] = s;
            if s.abs() > max_abs_scale {
                max_abs_scale = s.abs();
                max_scale = s;
            }
        }
        if max_abs_scale < GROUP_MAX_EPS {
            b.fill(0);
            continue;
        }
        let (ql, rest) = b.split_at_mut(128);
        let (qh, rest) = rest.split_at_mut(64);
        let (sc, dd) = rest.split_at_mut(16);
        let iscale = -128.0 / max_scale;
        let (d_bits, d_all) = fp16_round(1.0 / iscale);
        for ib in 0..16 {
            sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8 as u8;
        }
        for j in 0..16 {
            let d = d_all * sc[j] as i8 as f32;
            if d == 0.0 {
                continue;
            }
            for ii in 0..16 {
                let l = nearest_int(x[16 * j + ii] / d).clamp(-32, 31);
                levels[16 * j + ii] = (l + 32) as i8;
            }
        }
        for h in 0..2 {
            for l in 0..32 {
                let e = 128 * h + l;
                let q = |k: usize| levels[e + 32 * k] as u8;
                ql[64 * h + l] = (q(0) & 0x0f) | ((q(2) & 0x0f) << 4);
                ql[64 * h + l + 32] = (q(1) & 0x0f) | ((q(3) & 0x0f) << 4);
                qh[32 * h + l] = (q(0) >> 4) | ((q(1) >> 4) << 2) | ((q(2) >> 4) << 4) | ((q(3) >> 4) << 6);
            }
        }
        dd.copy_from_slice(&d_bits.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lane version is the scalar reference, bit for bit, on ordinary and degenerate
    /// sub-blocks (flat, all zero, one outlier, NaN, infinities, subnormals).
    #[test]
    fn lanes_equal_scalar() {
        let mut s = 0x2545_f491u32;
        let mut rnd = move || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s as f32 / u32::MAX as f32 - 0.5
        };
        for round in 0..200 {
            let mut x = [0f32; QK_K];
            for (i, v) in x.iter_mut().enumerate() {
                *v = match (round + i / 32) % 9 {
                    0 => 0.0,
                    1 => 0.25,
                    2 => rnd() * 1e-20,
                    3 if i % 32 == 5 => f32::NAN,
                    4 if i % 32 == 7 => f32::INFINITY,
                    5 => rnd().abs() + 0.1,
                    6 if i % 32 == 3 => 40.0,
                    _ => rnd(),
                };
            }
            for (n, nmax, rmin, nstep, mad) in [(32usize, 15, -1.0f32, 20, false), (32, 31, -0.5, 15, false), (16, 3, -0.5, 15, true)] {
                let weights: Vec<f32> = x.iter().map(|v| if mad { v.abs() } else { 0.3 + v.abs() }).collect();
                let mut lanes = [0u8; QK_K];
                let (ls, lm): (Vec<f32>, Vec<f32>) = if n == 32 {
                    let (a, b) = qkx2_sub_blocks::<32, 8>(nmax, &x, &weights, &mut lanes, rmin, 0.1, nstep, mad);
                    (a.to_vec(), b.to_vec())
                } else {
                    let (a, b) = qkx2_sub_blocks::<16, 16>(nmax, &x, &weights, &mut lanes, rmin, 0.1, nstep, mad);
                    (a.to_vec(), b.to_vec())
                };
                let mut aux = [0u8; 32];
                for c in 0..QK_K / n {
                    let mut lv = [0u8; 32];
                    let (sc, mn) = make_qkx2_quants(
                        nmax,
                        &x[n * c..n * (c + 1)],
                        &weights[n * c..n * (c + 1)],
                        &mut lv[..n],
                        &mut aux[..n],
                        rmin,
                        0.1,
                        nstep,
                        mad,
                    );
                    let what = format!("round {round}, nmax {nmax}, sub-block {c}");
                    assert_eq!(sc.to_bits(), ls[c].to_bits(), "{what}: scale");
                    assert_eq!(mn.to_bits(), lm[c].to_bits(), "{what}: min");
                    assert_eq!(&lv[..n], &lanes[n * c..n * (c + 1)], "{what}: levels");
                }
            }
        }
    }
}
