//! The CPU implementation of [`super`]: tiles of queries × keys, multi-threaded with rayon,
//! each tile product through the `gemm` crate (the kernels candle's own CPU matmul uses).
//!
//! Forward, per (batch, block of [`BQ`] queries), head by head: the query tile is loaded once
//! (converted to the accumulation type and pre-scaled by `scale`), then for each block of [`BK`]
//! keys `S = Q·Kᵀ`, the running max `m`, the running sum `l` and the output accumulator are
//! updated with the online-softmax recurrence. Only a `BQ × BK` score tile exists at a time.
//!
//! Backward, two passes that each own their outputs (no atomics, no partial buffers, the result
//! does not depend on the thread count): per (batch, block of keys) `dK` and `dV`, iterating over
//! query blocks; then per (batch, block of queries) `dQ`, iterating over key blocks. Both
//! recompute `P = exp(S − lse)` from the saved log-sum-exp, and `dS = P ∘ (dP − Δ)` with
//! `Δ = rowsum(dO ∘ O)`. This is the structure of the CUDA kernels in `kernels/attention.cu`.

use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Sub};

use half::{bf16, f16};
use rayon::prelude::*;

/// Queries per tile (128 × 128 tiles: the 16k-token memory test runs in 25 s here, 32 s with 64 × 128).
pub const BQ: usize = 128;
/// Keys per tile.
pub const BK: usize = 128;

/// Accumulation type: f32 for f32/bf16/f16 inputs, f64 for f64.
pub trait Acc:
    Copy
    + Send
    + Sync
    + 'static
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + AddAssign
    + MulAssign
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    const INF: Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn from_f64(x: f64) -> Self;
    fn max(self, o: Self) -> Self;
}

impl Acc for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f32::NEG_INFINITY;
    const INF: Self = f32::INFINITY;
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn max(self, o: Self) -> Self {
        f32::max(self, o)
    }
}

impl Acc for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f64::NEG_INFINITY;
    const INF: Self = f64::INFINITY;
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
    fn from_f64(x: f64) -> Self {
        x
    }
    fn max(self, o: Self) -> Self {
        f64::max(self, o)
    }
}

/// A stored element type and its accumulation type.
pub trait Elem<A: Acc>: Copy + Send + Sync + 'static {
    fn load(self) -> A;
    fn store(a: A) -> Self;
}

impl Elem<f32> for f32 {
    fn load(self) -> f32 {
        self
    }
    fn store(a: f32) -> Self {
        a
    }
}
impl Elem<f32> for bf16 {
    fn load(self) -> f32 {
        self.to_f32()
    }
    fn store(a: f32) -> Self {
        bf16::from_f32(a)
    }
}
impl Elem<f32> for f16 {
    fn load(self) -> f32 {
        self.to_f32()
    }
    fn store(a: f32) -> Self {
        f16::from_f32(a)
    }
}
impl Elem<f64> for f64 {
    fn load(self) -> f64 {
        self
    }
    fn store(a: f64) -> Self {
        a
    }
}

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub b: usize,
    pub sq: usize,
    pub sk: usize,
    pub h: usize,
    pub d: usize,
}

/// A read-only `[B, S, H, D]` view with arbitrary strides for B, S and H and a contiguous last
/// dimension: row `(b, s, h)` is `data[off + b·sb + s·ss + h·sh ..][..d]`.
#[derive(Clone, Copy)]
pub struct Bshd<'a, T> {
    pub data: &'a [T],
    pub off: usize,
    pub sb: usize,
    pub ss: usize,
    pub sh: usize,
    pub d: usize,
}

impl<'a, T> Bshd<'a, T> {
    fn row(&self, b: usize, s: usize, h: usize) -> &'a [T] {
        &self.data[self.off + b * self.sb + s * self.ss + h * self.sh..][..self.d]
    }
}

/// `dst[m × n]` (row-major, row stride `drs`) = `dst`·[`accumulate`] + `lhs · rhs`, where
/// `lhs(i, p) = lhs[i·lrs + p·lcs]` and `rhs(p, j) = rhs[p·rrs + j·rcs]`.
#[allow(clippy::too_many_arguments)]
fn mm<A: Acc>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [A],
    drs: usize,
    accumulate: bool,
    (lhs, lrs, lcs): (&[A], usize, usize),
    (rhs, rrs, rcs): (&[A], usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    // The pointers below are only valid if every element the product touches is inside its slice.
    assert!((m - 1) * drs + n <= dst.len(), "attention tile: dst out of bounds");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * drs..i * drs + n].fill(A::ZERO);
            }
        }
        return;
    }
    assert!((m - 1) * lrs + (k - 1) * lcs < lhs.len(), "attention tile: lhs out of bounds");
    assert!((k - 1) * rrs + (n - 1) * rcs < rhs.len(), "attention tile: rhs out of bounds");
    // SAFETY: the three asserts above bound every index gemm reads or writes; `dst` is borrowed
    // mutably and does not alias `lhs` or `rhs`. `A` is f32 or f64, both supported by gemm.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            drs as isize,
            accumulate,
            lhs.as_ptr(),
            lcs as isize,
            lrs as isize,
            rhs.as_ptr(),
            rcs as isize,
            rrs as isize,
            A::ONE,
            A::ONE,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Copy rows `s0..s0+n` of head `h` of batch `b` into `dst[n × d]`, times `mul`.
fn load<T: Elem<A>, A: Acc>(dst: &mut [A], src: &Bshd<T>, (b, s0, n, h): (usize, usize, usize, usize), mul: A) {
    let d = src.d;
    for i in 0..n {
        for (o, &x) in dst[i * d..(i + 1) * d].iter_mut().zip(src.row(b, s0 + i, h)) {
            *o = x.load() * mul;
        }
    }
}

/// Set masked keys of a `n × nk` score tile to −∞; `keep` is this batch's `[Sk]` row.
fn mask_scores<A: Acc>(s: &mut [A], nk: usize, keep: Option<&[bool]>, j0: usize) {
    if let Some(keep) = keep {
        for row in s.chunks_exact_mut(nk) {
            for (x, &kp) in row.iter_mut().zip(&keep[j0..j0 + nk]) {
                if !kp {
                    *x = A::NEG_INF;
                }
            }
        }
    }
}

/// Forward pass: the output as a contiguous `[B, Sq, H, D]` buffer and the log-sum-exp of the
/// scaled scores per row, `[B, H, Sq]` (+∞ for a row whose keys are all masked; its output is 0).
/// `keep` is `[B, Sk]` (true keeps a key).
pub fn forward<T: Elem<A>, A: Acc>(q: Bshd<T>, k: Bshd<T>, v: Bshd<T>, keep: Option<&[bool]>, dims: Dims, scale: f64) -> (Vec<T>, Vec<A>) {
    let Dims { b, sq, sk, h, d } = dims;
    let scale = A::from_f64(scale);
    let mut o = vec![T::store(A::ZERO); b * sq * h * d];
    let mut lse = vec![A::ZERO; b * h * sq];
    // Tasks: (batch, query block), all heads; each owns a contiguous slice of `o`, and returns
    // its log-sum-exp values [h][rows] to be scattered into `lse` afterwards.
    let tasks: Vec<_> = o
        .chunks_mut(sq * h * d)
        .enumerate()
        .flat_map(|(bi, ob)| ob.chunks_mut(BQ * h * d).enumerate().map(move |(qb, oc)| (bi, qb, oc)))
        .collect();
    let parts: Vec<(usize, usize, Vec<A>)> = tasks
        .into_par_iter()
        .map(|(bi, qb, oc)| {
            let s0 = qb * BQ;
            let n = oc.len() / (h * d);
            let keep_b = keep.map(|kp| &kp[bi * sk..(bi + 1) * sk]);
            let mut qt = vec![A::ZERO; n * d];
            let mut kt = vec![A::ZERO; BK * d];
            let mut vt = vec![A::ZERO; BK * d];
            let mut st = vec![A::ZERO; n * BK];
            let mut acc = vec![A::ZERO; n * d];
            let mut m = vec![A::NEG_INF; n];
            let mut l = vec![A::ZERO; n];
            let mut lse_part = vec![A::ZERO; h * n];
            for hi in 0..h {
                load(&mut qt, &q, (bi, s0, n, hi), scale);
                acc.fill(A::ZERO);
                m.fill(A::NEG_INF);
                l.fill(A::ZERO);
                for j0 in (0..sk).step_by(BK) {
                    let nk = BK.min(sk - j0);
                    load(&mut kt, &k, (bi, j0, nk, hi), A::ONE);
                    load(&mut vt, &v, (bi, j0, nk, hi), A::ONE);
                    let s = &mut st[..n * nk];
                    mm((n, nk, d), s, nk, false, (&qt, d, 1), (&kt, 1, d));
                    mask_scores(s, nk, keep_b, j0);
                    for i in 0..n {
                        let row = &mut s[i * nk..(i + 1) * nk];
                        let mx = row.iter().fold(m[i], |a, &x| a.max(x));
                        // A row with no kept key so far keeps m = −∞; subtracting 0 instead
                        // makes every exp() of it 0 rather than NaN.
                        let mu = if mx == A::NEG_INF { A::ZERO } else { mx };
                        let alpha = (m[i] - mu).exp();
                        let mut sum = A::ZERO;
                        for x in row.iter_mut() {
                            *x = (*x - mu).exp();
                            sum += *x;
                        }
                        l[i] = l[i] * alpha + sum;
                        m[i] = mx;
                        if alpha != A::ONE {
                            acc[i * d..(i + 1) * d].iter_mut().for_each(|a| *a *= alpha);
                        }
                    }
                    mm((n, d, nk), &mut acc, d, true, (s, nk, 1), (&vt, d, 1));
                }
                for i in 0..n {
                    let (inv, ls) = if l[i] > A::ZERO { (A::ONE / l[i], m[i] + l[i].ln()) } else { (A::ZERO, A::INF) };
                    lse_part[hi * n + i] = ls;
                    let orow = &mut oc[(i * h + hi) * d..][..d];
                    for (o, &a) in orow.iter_mut().zip(&acc[i * d..(i + 1) * d]) {
                        *o = T::store(a * inv);
                    }
                }
            }
            (bi, s0, lse_part)
        })
        .collect();
    for (bi, s0, part) in parts {
        let n = part.len() / h;
        for hi in 0..h {
            lse[(bi * h + hi) * sq + s0..][..n].copy_from_slice(&part[hi * n..(hi + 1) * n]);
        }
    }
    (o, lse)
}

/// Backward pass: `(dQ [B, Sq, H, D], dK [B, Sk, H, D], dV [B, Sk, H, D])`, contiguous, from the
/// forward's output `o`, its gradient `d_o` and log-sum-exp `lse` (`[B, H, Sq]`).
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Elem<A>, A: Acc>(
    q: Bshd<T>,
    k: Bshd<T>,
    v: Bshd<T>,
    o: Bshd<T>,
    d_o: Bshd<T>,
    lse: &[A],
    keep: Option<&[bool]>,
    dims: Dims,
    scale: f64,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let Dims { b, sq, sk, h, d } = dims;
    let scale_a = A::from_f64(scale);
    // Δ = rowsum(dO ∘ O), [B, H, Sq].
    let mut delta = vec![A::ZERO; b * h * sq];
    delta.par_chunks_mut(sq).enumerate().for_each(|(bh, dr)| {
        let (bi, hi) = (bh / h, bh % h);
        for (i, x) in dr.iter_mut().enumerate() {
            *x = o.row(bi, i, hi).iter().zip(d_o.row(bi, i, hi)).fold(A::ZERO, |a, (&p, &g)| a + p.load() * g.load());
        }
    });

    // P and dS of one (query tile, key tile) pair, in place: on return `s` holds P and `dp` dS.
    #[allow(clippy::too_many_arguments)]
    fn probs_and_ds<A: Acc>(
        s: &mut [A],
        dp: &mut [A],
        (n, nk, d): (usize, usize, usize),
        qt: &[A],
        dot: &[A],
        kt: &[A],
        vt: &[A],
        lse: &[A],
        delta: &[A],
        keep: Option<&[bool]>,
        j0: usize,
    ) {
        mm((n, nk, d), s, nk, false, (qt, d, 1), (kt, 1, d));
        mask_scores(s, nk, keep, j0);
        mm((n, nk, d), dp, nk, false, (dot, d, 1), (vt, 1, d));
        for i in 0..n {
            let (li, di) = (lse[i], delta[i]);
            for (p, g) in s[i * nk..(i + 1) * nk].iter_mut().zip(&mut dp[i * nk..(i + 1) * nk]) {
                // lse = +∞ (fully masked row) gives P = 0; a masked score (−∞) gives 0 too.
                *p = (*p - li).exp();
                *g = *p * (*g - di);
            }
        }
    }

    // Pass 1: dK, dV per (batch, key block), all heads.
    let mut dk = vec![T::store(A::ZERO); b * sk * h * d];
    let mut dv = vec![T::store(A::ZERO); b * sk * h * d];
    let tasks: Vec<_> = dk
        .chunks_mut(sk * h * d)
        .zip(dv.chunks_mut(sk * h * d))
        .enumerate()
        .flat_map(|(bi, (kb, vb))| kb.chunks_mut(BK * h * d).zip(vb.chunks_mut(BK * h * d)).enumerate().map(move |(jb, c)| (bi, jb, c)))
        .collect();
    tasks.into_par_iter().for_each(|(bi, jb, (dkc, dvc))| {
        let j0 = jb * BK;
        let nk = dkc.len() / (h * d);
        let keep_b = keep.map(|kp| &kp[bi * sk..(bi + 1) * sk]);
        let mut kt = vec![A::ZERO; nk * d];
        let mut vt = vec![A::ZERO; nk * d];
        let mut qt = vec![A::ZERO; BQ * d];
        let mut dot = vec![A::ZERO; BQ * d];
        let mut s = vec![A::ZERO; BQ * nk];
        let mut dp = vec![A::ZERO; BQ * nk];
        let mut dk_acc = vec![A::ZERO; nk * d];
        let mut dv_acc = vec![A::ZERO; nk * d];
        for hi in 0..h {
            load(&mut kt, &k, (bi, j0, nk, hi), A::ONE);
            load(&mut vt, &v, (bi, j0, nk, hi), A::ONE);
            dk_acc.fill(A::ZERO);
            dv_acc.fill(A::ZERO);
            let rows = (bi * h + hi) * sq;
            for i0 in (0..sq).step_by(BQ) {
                let n = BQ.min(sq - i0);
                load(&mut qt, &q, (bi, i0, n, hi), scale_a);
                load(&mut dot, &d_o, (bi, i0, n, hi), A::ONE);
                let (s, dp) = (&mut s[..n * nk], &mut dp[..n * nk]);
                let (ls, dl) = (&lse[rows + i0..rows + i0 + n], &delta[rows + i0..rows + i0 + n]);
                probs_and_ds(s, dp, (n, nk, d), &qt[..n * d], &dot[..n * d], &kt, &vt, ls, dl, keep_b, j0);
                // dV += Pᵀ·dO, dK += dSᵀ·(scale·Q).
                mm((nk, d, n), &mut dv_acc, d, true, (s, 1, nk), (&dot, d, 1));
                mm((nk, d, n), &mut dk_acc, d, true, (dp, 1, nk), (&qt, d, 1));
            }
            for j in 0..nk {
                for (o, &a) in dkc[(j * h + hi) * d..][..d].iter_mut().zip(&dk_acc[j * d..(j + 1) * d]) {
                    *o = T::store(a);
                }
                for (o, &a) in dvc[(j * h + hi) * d..][..d].iter_mut().zip(&dv_acc[j * d..(j + 1) * d]) {
                    *o = T::store(a);
                }
            }
        }
    });

    // Pass 2: dQ per (batch, query block), all heads.
    let mut dq = vec![T::store(A::ZERO); b * sq * h * d];
    let tasks: Vec<_> = dq
        .chunks_mut(sq * h * d)
        .enumerate()
        .flat_map(|(bi, qb)| qb.chunks_mut(BQ * h * d).enumerate().map(move |(ib, c)| (bi, ib, c)))
        .collect();
    tasks.into_par_iter().for_each(|(bi, ib, dqc)| {
        let i0 = ib * BQ;
        let n = dqc.len() / (h * d);
        let keep_b = keep.map(|kp| &kp[bi * sk..(bi + 1) * sk]);
        let mut qt = vec![A::ZERO; n * d];
        let mut dot = vec![A::ZERO; n * d];
        let mut kt = vec![A::ZERO; BK * d];
        let mut vt = vec![A::ZERO; BK * d];
        let mut s = vec![A::ZERO; n * BK];
        let mut dp = vec![A::ZERO; n * BK];
        let mut dq_acc = vec![A::ZERO; n * d];
        for hi in 0..h {
            load(&mut qt, &q, (bi, i0, n, hi), scale_a);
            load(&mut dot, &d_o, (bi, i0, n, hi), A::ONE);
            dq_acc.fill(A::ZERO);
            let rows = (bi * h + hi) * sq + i0;
            let (ls, dl) = (&lse[rows..rows + n], &delta[rows..rows + n]);
            for j0 in (0..sk).step_by(BK) {
                let nk = BK.min(sk - j0);
                load(&mut kt, &k, (bi, j0, nk, hi), A::ONE);
                load(&mut vt, &v, (bi, j0, nk, hi), A::ONE);
                let (s, dp) = (&mut s[..n * nk], &mut dp[..n * nk]);
                probs_and_ds(s, dp, (n, nk, d), &qt, &dot, &kt[..nk * d], &vt[..nk * d], ls, dl, keep_b, j0);
                // dQ += dS·K (times scale below).
                mm((n, d, nk), &mut dq_acc, d, true, (dp, nk, 1), (&kt, d, 1));
            }
            for i in 0..n {
                for (o, &a) in dqc[(i * h + hi) * d..][..d].iter_mut().zip(&dq_acc[i * d..(i + 1) * d]) {
                    *o = T::store(a * scale_a);
                }
            }
        }
    });
    (dq, dk, dv)
}
