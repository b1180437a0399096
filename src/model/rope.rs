//! Rotary position tables: per token and per rotated pair `(x[2i], x[2i+1])`, the cosine and
//! sine that [`super::ops::apply_rope`] applies.
//!
//! * Wan (`WanRotaryPosEmbed`): the head splits into frame, row and column parts of widths
//!   `t = D − 4⌊D/6⌋`, `h = w = 2⌊D/6⌋` (44/42/42 for D = 128, 8/4/4 for D = 16); part `a` rotates
//!   its pairs by `pos / 10000^(2k/a)`, computed in f64 and rounded to f32. (Some later diffusers
//!   versions re-split the table by `[D − 2⌊D/3⌋, ⌊D/3⌋, ⌊D/3⌋]`, identical for D = 128; the
//!   0.42.1 reference output matches this split for D = 16 to 2e-7 and the other to only 3e-5.)
//! * Qwen-Image (`QwenEmbedRope`, `scale_rope=True`): f32 frequencies `1/10000^(2k/a)` for axis
//!   widths `a ∈ axes_dims_rope`; frame positions from 0, row/column positions centred
//!   (`−(n − ⌊n/2⌋) … ⌊n/2⌋ − 1`), text token `j` at `max(⌊h/2⌋, ⌊w/2⌋) + j` on every axis.

use candle_core::{Device, Result, Tensor};

/// Cosine and sine tables, each `[tokens, head_dim / 2]` f32.
#[derive(Debug, Clone)]
pub struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
}

fn tables(cos: Vec<f32>, sin: Vec<f32>, tokens: usize, pairs: usize, device: &Device) -> Result<RopeTables> {
    Ok(RopeTables { cos: Tensor::from_vec(cos, (tokens, pairs), device)?, sin: Tensor::from_vec(sin, (tokens, pairs), device)? })
}

/// The Wan per-column frequency (f64) and axis (0 frame, 1 row, 2 column) of each of the
/// `head_dim` columns.
fn wan_columns(head_dim: usize, theta: f64) -> (Vec<f64>, Vec<usize>) {
    let hw = 2 * (head_dim / 6);
    let t = head_dim - 2 * hw;
    let mut freq = Vec::with_capacity(head_dim);
    for a in [t, hw, hw] {
        for k in 0..a / 2 {
            let f = 1.0 / theta.powf((2 * k) as f64 / a as f64);
            freq.push(f);
            freq.push(f);
        }
    }
    let axis = (0..head_dim)
        .map(|c| {
            if c < t {
                0
            } else if c < t + hw {
                1
            } else {
                2
            }
        })
        .collect();
    (freq, axis)
}

/// Wan's tables for a latent grid of `frames × height × width` patches (tokens in that order).
pub fn wan(head_dim: usize, frames: usize, height: usize, width: usize, device: &Device) -> Result<RopeTables> {
    let (freq, axis) = wan_columns(head_dim, 10000.0);
    let pairs = head_dim / 2;
    let n = frames * height * width;
    let (mut cos, mut sin) = (Vec::with_capacity(n * pairs), Vec::with_capacity(n * pairs));
    for f in 0..frames {
        for h in 0..height {
            for w in 0..width {
                let pos = [f as f64, h as f64, w as f64];
                for p in 0..pairs {
                    let (c0, c1) = (2 * p, 2 * p + 1);
                    cos.push((pos[axis[c0]] * freq[c0]).cos() as f32);
                    sin.push((pos[axis[c1]] * freq[c1]).sin() as f32);
                }
            }
        }
    }
    tables(cos, sin, n, pairs, device)
}

/// Qwen-Image's image and text tables for one image of `frames × height × width` patches and
/// `text_len` text tokens.
pub fn qwen(
    axes: [usize; 3],
    frames: usize,
    height: usize,
    width: usize,
    text_len: usize,
    device: &Device,
) -> Result<(RopeTables, RopeTables)> {
    let inv: Vec<Vec<f32>> =
        axes.iter().map(|&a| (0..a / 2).map(|k| 1.0f32 / 10000f32.powf((2 * k) as f32 / a as f32)).collect()).collect();
    let pairs: usize = axes.iter().map(|a| a / 2).sum();
    let centred = |i: usize, n: usize| i as i64 - (n - n / 2) as i64;
    let push = |pos: [i64; 3], cos: &mut Vec<f32>, sin: &mut Vec<f32>| {
        for (ax, fs) in inv.iter().enumerate() {
            for &f in fs {
                let a = pos[ax] as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    };
    let n = frames * height * width;
    let (mut ic, mut is) = (Vec::with_capacity(n * pairs), Vec::with_capacity(n * pairs));
    for f in 0..frames {
        for h in 0..height {
            for w in 0..width {
                push([f as i64, centred(h, height), centred(w, width)], &mut ic, &mut is);
            }
        }
    }
    let start = (height / 2).max(width / 2) as i64;
    let (mut tc, mut ts) = (Vec::with_capacity(text_len * pairs), Vec::with_capacity(text_len * pairs));
    for j in 0..text_len as i64 {
        push([start + j; 3], &mut tc, &mut ts);
    }
    Ok((tables(ic, is, n, pairs, device)?, tables(tc, ts, text_len, pairs, device)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f64::from).collect()
    }

    /// Independent f64 reference of diffusers' WanRotaryPosEmbed: build the concatenated
    /// repeat-interleaved tables per axis position, take each part from its axis' position,
    /// then cos[0::2], sin[1::2].
    fn wan_ref(d: usize, f: usize, h: usize, w: usize) -> (Vec<f64>, Vec<f64>) {
        let hd = 2 * (d / 6);
        let td = d - 2 * hd;
        let table = |pos: f64| -> Vec<f64> {
            let mut row = Vec::new();
            for a in [td, hd, hd] {
                for k in (0..a).step_by(2).take(a / 2) {
                    let ang = pos / 10000f64.powf(k as f64 / a as f64);
                    row.push(ang);
                    row.push(ang);
                }
            }
            row
        };
        let sizes = [td, hd, hd];
        let (mut c, mut s) = (Vec::new(), Vec::new());
        for fi in 0..f {
            for hi in 0..h {
                for wi in 0..w {
                    let mut full = Vec::new();
                    let mut off = 0;
                    for (ax, &n) in sizes.iter().enumerate() {
                        let p = [fi, hi, wi][ax] as f64;
                        full.extend_from_slice(&table(p)[off..off + n]);
                        off += n;
                    }
                    for i in 0..d / 2 {
                        c.push(full[2 * i].cos());
                        s.push(full[2 * i + 1].sin());
                    }
                }
            }
        }
        (c, s)
    }

    #[test]
    fn wan_tables_match_reference_for_several_head_dims_and_odd_frames() {
        for (d, f, h, w) in [(16, 3, 2, 3), (128, 5, 3, 2), (64, 1, 4, 4), (24, 7, 1, 2)] {
            let t = wan(d, f, h, w, &Device::Cpu).unwrap();
            let (c, s) = wan_ref(d, f, h, w);
            for (a, b) in v(&t.cos).iter().zip(&c).chain(v(&t.sin).iter().zip(&s)) {
                assert!((a - b).abs() < 1e-6, "D={d}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn wan_head_dim_128_pairs_share_axis() {
        let (_, axis) = wan_columns(128, 10000.0);
        assert!((0..64).all(|p| axis[2 * p] == axis[2 * p + 1]));
        assert_eq!(axis.iter().filter(|&&a| a == 0).count(), 44);
    }

    #[test]
    fn qwen_tables_match_reference_for_several_text_lengths() {
        for (axes, f, h, w, l) in [([4, 6, 6], 1, 4, 6, 6), ([16, 56, 56], 1, 5, 3, 1), ([8, 4, 4], 2, 3, 7, 13)] {
            let (img, txt) = qwen(axes, f, h, w, l, &Device::Cpu).unwrap();
            let pos = |i: usize, n: usize| -> f64 {
                let v: Vec<i64> = (-((n - n / 2) as i64)..0).chain(0..(n / 2) as i64).collect();
                v[i] as f64
            };
            let mut c = Vec::new();
            let mut s = Vec::new();
            let ang = |p: [f64; 3], c: &mut Vec<f64>, s: &mut Vec<f64>| {
                for (ax, &a) in axes.iter().enumerate() {
                    for k in 0..a / 2 {
                        let x = p[ax] * 10000f64.powf(-(2.0 * k as f64) / a as f64);
                        c.push(x.cos());
                        s.push(x.sin());
                    }
                }
            };
            for fi in 0..f {
                for hi in 0..h {
                    for wi in 0..w {
                        ang([fi as f64, pos(hi, h), pos(wi, w)], &mut c, &mut s);
                    }
                }
            }
            let (mut tc, mut ts) = (Vec::new(), Vec::new());
            let start = (h / 2).max(w / 2);
            for j in 0..l {
                ang([(start + j) as f64; 3], &mut tc, &mut ts);
            }
            for (a, b) in v(&img.cos)
                .iter()
                .zip(&c)
                .chain(v(&img.sin).iter().zip(&s))
                .chain(v(&txt.cos).iter().zip(&tc))
                .chain(v(&txt.sin).iter().zip(&ts))
            {
                assert!((a - b).abs() < 2e-6, "{a} vs {b}");
            }
            assert_eq!(txt.cos.dims(), &[l, axes.iter().sum::<usize>() / 2]);
        }
    }
}
