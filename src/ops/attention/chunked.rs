//! The device-independent implementation of [`super`]: the same tiled algorithm as the CPU one,
//! written as candle tensor ops over chunks of queries and keys, so that it runs wherever candle
//! runs (on CUDA it is the reference the fused kernel is compared with, and the fallback for
//! f32/f64 and head sizes the kernel does not cover). It never holds more than one
//! `B × H × CQ × CK` score tile (plus its exp and gradient) at a time.
//!
//! All arithmetic is in f32 (f64 for f64 inputs). Inputs are detached: these functions build no
//! autograd graph; the op's backward is [`backward`], called by the custom op.

use candle_core::{DType, Result, Tensor, D};

/// Queries per chunk.
pub const CQ: usize = 1024;
/// Keys per chunk.
pub const CK: usize = 1024;

fn wide(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `[B, S, H, D]` → chunk `s0..s0+n` as `[B, H, n, D]`, contiguous, in `dt`, times `mul`.
fn chunk(x: &Tensor, s0: usize, n: usize, dt: DType, mul: f64) -> Result<Tensor> {
    let c = x.narrow(1, s0, n)?.transpose(1, 2)?.to_dtype(dt)?.contiguous()?;
    if mul == 1.0 {
        Ok(c)
    } else {
        c.affine(mul, 0.0)
    }
}

/// Scores of a query chunk against a key chunk, `[B, H, n, nk]`, with the additive bias
/// (`[B, 1, 1, Sk]`, 0 or −∞) of keys `j0..j0+nk` added.
fn scores(qi: &Tensor, kj: &Tensor, bias: Option<&Tensor>, j0: usize, nk: usize) -> Result<Tensor> {
    let s = qi.matmul(&kj.t()?)?;
    match bias {
        Some(b) => s.broadcast_add(&b.narrow(3, j0, nk)?),
        None => Ok(s),
    }
}

/// Forward pass. `q [B, Sq, H, D]`, `k, v [B, Sk, H, D]` (any strides), `bias` as in
/// [`scores`] in the wide dtype. Returns the output `[B, Sq, H, D]` (contiguous, `q`'s dtype)
/// and the log-sum-exp `[B, H, Sq]` in the wide dtype (+∞ for a fully masked row).
pub fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
    (cq, ck): (usize, usize),
) -> Result<(Tensor, Tensor)> {
    let (q, k, v) = (q.detach(), k.detach(), v.detach());
    let (b, sq, h, d) = q.dims4()?;
    let sk = k.dim(1)?;
    let dt = wide(q.dtype());
    let dev = q.device();
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    for i0 in (0..sq).step_by(cq) {
        let n = cq.min(sq - i0);
        let qi = chunk(&q, i0, n, dt, scale)?;
        let mut m = Tensor::full(f32::NEG_INFINITY, (b, h, n, 1), dev)?.to_dtype(dt)?;
        let mut l = Tensor::zeros((b, h, n, 1), dt, dev)?;
        let mut acc = Tensor::zeros((b, h, n, d), dt, dev)?;
        for j0 in (0..sk).step_by(ck) {
            let nk = ck.min(sk - j0);
            let kj = chunk(&k, j0, nk, dt, 1.0)?;
            let vj = chunk(&v, j0, nk, dt, 1.0)?;
            let s = scores(&qi, &kj, bias, j0, nk)?;
            let m_new = m.maximum(&s.max_keepdim(D::Minus1)?)?;
            // Rows with no kept key so far: subtract 0 instead of −∞ (exp gives 0, not NaN).
            let m_use = m_new.eq(f32::NEG_INFINITY)?.where_cond(&m_new.zeros_like()?, &m_new)?;
            let p = s.broadcast_sub(&m_use)?.exp()?;
            let alpha = (&m - &m_use)?.exp()?;
            l = ((&l * &alpha)? + p.sum_keepdim(D::Minus1)?)?;
            acc = (acc.broadcast_mul(&alpha)? + p.matmul(&vj)?)?;
            m = m_new;
        }
        let kept = l.gt(0f32)?;
        let safe_l = kept.where_cond(&l, &l.ones_like()?)?;
        let o = kept.broadcast_as(acc.shape())?.where_cond(&acc.broadcast_div(&safe_l)?, &acc.zeros_like()?)?;
        let m_use = m.eq(f32::NEG_INFINITY)?.where_cond(&m.zeros_like()?, &m)?;
        let inf = Tensor::full(f32::INFINITY, l.shape(), dev)?.to_dtype(dt)?;
        let lse = kept.where_cond(&(m_use + safe_l.log()?)?, &inf)?;
        outs.push(o);
        lses.push(lse.squeeze(3)?);
    }
    let o = Tensor::cat(&outs, 2)?.transpose(1, 2)?.contiguous()?.to_dtype(q.dtype())?;
    let lse = Tensor::cat(&lses, 2)?;
    Ok((o, lse))
}

/// Backward pass from the forward's output `o`, its gradient `d_o` (both `[B, Sq, H, D]`) and
/// the log-sum-exp `lse [B, H, Sq]`. Returns `(dQ, dK, dV)` shaped and typed like `q, k, v`,
/// contiguous.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    d_o: &Tensor,
    lse: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
    (cq, ck): (usize, usize),
) -> Result<(Tensor, Tensor, Tensor)> {
    let (q, k, v, o, d_o, lse) = (q.detach(), k.detach(), v.detach(), o.detach(), d_o.detach(), lse.detach());
    let (b, sq, h, d) = q.dims4()?;
    let sk = k.dim(1)?;
    let dt = wide(q.dtype());
    let dev = q.device();
    let lse = lse.to_dtype(dt)?.unsqueeze(3)?;
    // Δ = rowsum(dO ∘ O) as [B, H, Sq, 1].
    let delta = (d_o.to_dtype(dt)? * o.to_dtype(dt)?)?.sum_keepdim(D::Minus1)?.transpose(1, 2)?.contiguous()?;
    let key_chunks: Vec<(usize, usize)> = (0..sk).step_by(ck).map(|j0| (j0, ck.min(sk - j0))).collect();
    let mut dk: Vec<Tensor> = Vec::new();
    let mut dv: Vec<Tensor> = Vec::new();
    for &(_, nk) in &key_chunks {
        dk.push(Tensor::zeros((b, h, nk, d), dt, dev)?);
        dv.push(Tensor::zeros((b, h, nk, d), dt, dev)?);
    }
    let mut dq = Vec::new();
    for i0 in (0..sq).step_by(cq) {
        let n = cq.min(sq - i0);
        let qi = chunk(&q, i0, n, dt, scale)?;
        let doi = chunk(&d_o, i0, n, dt, 1.0)?;
        let lse_i = lse.narrow(2, i0, n)?;
        let delta_i = delta.narrow(2, i0, n)?;
        let mut dq_i = Tensor::zeros((b, h, n, d), dt, dev)?;
        for (c, &(j0, nk)) in key_chunks.iter().enumerate() {
            let kj = chunk(&k, j0, nk, dt, 1.0)?;
            let vj = chunk(&v, j0, nk, dt, 1.0)?;
            // lse = +∞ (fully masked row) gives P = 0, as does a masked score.
            let p = scores(&qi, &kj, bias, j0, nk)?.broadcast_sub(&lse_i)?.exp()?;
            let dp = doi.matmul(&vj.t()?)?;
            let ds = (&p * dp.broadcast_sub(&delta_i)?)?;
            dv[c] = (&dv[c] + p.t()?.matmul(&doi)?)?;
            dk[c] = (&dk[c] + ds.t()?.matmul(&qi)?)?;
            dq_i = (dq_i + ds.matmul(&kj)?)?;
        }
        dq.push(dq_i.affine(scale, 0.0)?);
    }
    let back = |parts: &[Tensor]| -> Result<Tensor> { Tensor::cat(parts, 2)?.transpose(1, 2)?.contiguous()?.to_dtype(q.dtype()) };
    Ok((back(&dq)?, back(&dk)?, back(&dv)?))
}
