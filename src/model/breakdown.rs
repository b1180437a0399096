//! `phasekit bench block --breakdown`: where a block's time goes, stage by stage, forward and
//! backward, on any device.
//!
//! Each stage is the block's own code for that part (the same ops, weights and shapes as
//! `bench block`, every weight trained as in PyTorch's twin), run on its own from random inputs
//! that take gradients: the forward pass is timed, then the backward pass of the sum of the
//! stage's outputs. Times are medians over the repeats after one warm-up, each between two
//! device synchronisations. The whole block is timed the same way; what the stages do not add
//! up to is printed as "rest" (the glue between stages: reshapes, the gradient sums where
//! stages meet, allocations). `benches/block_torch.py --breakdown` prints the same stages for
//! PyTorch eager; `--against FILE` puts its JSON beside ours.

use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::bench::{rnd, setup, BlockArgs, Setup};
use super::ops::{apply_rope, gated_residual, gelu_tanh, layer_norm, layer_norm_modulate, rms_norm, sdpa, silu};
use super::{vars_of, TrainMode};
use crate::error::{Error, Result};
use crate::ops::bench::median;

/// One stage's median times.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stage {
    pub name: String,
    pub forward_ms: f64,
    pub backward_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Breakdown {
    pub model: String,
    pub device: String,
    pub dtype: String,
    pub tokens: usize,
    pub text_tokens: usize,
    pub stages: Vec<Stage>,
    /// The whole block, timed the same way.
    pub block: Stage,
}

type Outs = candle_core::Result<Vec<Tensor>>;

/// Median forward and backward milliseconds of `f` (outputs summed for the backward pass).
fn time(dev: &Device, repeats: usize, f: &dyn Fn() -> Outs) -> candle_core::Result<(f64, f64)> {
    let once = || -> candle_core::Result<(f64, f64)> {
        dev.synchronize()?;
        let t = Instant::now();
        let outs = f()?;
        dev.synchronize()?;
        let fwd = t.elapsed().as_secs_f64() * 1e3;
        let mut loss = outs[0].sum_all()?.to_dtype(candle_core::DType::F32)?;
        for o in &outs[1..] {
            loss = (loss + o.sum_all()?.to_dtype(candle_core::DType::F32)?)?;
        }
        dev.synchronize()?;
        let t = Instant::now();
        let g = loss.backward()?;
        dev.synchronize()?;
        let bwd = t.elapsed().as_secs_f64() * 1e3;
        drop(g);
        Ok((fwd, bwd))
    };
    once()?;
    let (mut fs, mut bs) = (Vec::new(), Vec::new());
    for _ in 0..repeats.max(1) {
        let (f, b) = once()?;
        fs.push(f);
        bs.push(b);
    }
    Ok((median(&mut fs), median(&mut bs)))
}

/// A tensor of `shape` that takes gradients.
fn var(shape: &[usize]) -> candle_core::Result<Tensor> {
    Ok(Var::from_tensor(&rnd(shape, 1.0)?)?.as_tensor().clone())
}

fn stages(a: &BlockArgs, device: &Device) -> candle_core::Result<Breakdown> {
    let (t, l) = (a.tokens.max(1), a.text_tokens.max(1));
    let dt = a.dtype.dtype();
    let r = a.repeats.max(3);
    let mut out = Vec::new();
    let mut stage = |name: &str, f: &dyn Fn() -> Outs| -> candle_core::Result<()> {
        let (forward_ms, backward_ms) = time(device, r, f)?;
        out.push(Stage { name: name.into(), forward_ms, backward_ms });
        Ok(())
    };
    let block = match setup(a.model, t, l, a.heads, device, dt)? {
        Setup::Wan { mut block, cfg: c, x, enc, tproj, rope } => {
            vars_of(block.params("block"), TrainMode::Full)?;
            let b = &block;
            let (d, f, h) = (c.dim(), c.ffn_dim, c.heads);
            let hd = d / h;
            let (xv, encv, hv, fv) = (var(&[1, t, d])?, var(&[1, l, d])?, var(&[1, t, d])?, var(&[1, t, f])?);
            let m = var(&[1, 6, d])?;
            let mi = |i: usize| m.narrow(1, i, 1);
            let (qv, kv, vv) = (var(&[1, t, h, hd])?, var(&[1, t, h, hd])?, var(&[1, t, h, hd])?);
            let (kc, vc) = (var(&[1, l, h, hd])?, var(&[1, l, h, hd])?);
            let norm2 = b.norm2.clone();
            stage("norm + modulation", &|| {
                let mut o = vec![layer_norm_modulate(&xv, &mi(0)?, &mi(1)?, c.eps)?, layer_norm_modulate(&xv, &mi(3)?, &mi(4)?, c.eps)?];
                if let Some((w, bb)) = &norm2 {
                    o.push(layer_norm(&xv, Some(w), Some(bb), c.eps)?);
                }
                Ok(o)
            })?;
            stage("qkv projections", &|| {
                Ok(vec![
                    b.attn1.to_q.forward(&hv)?,
                    b.attn1.to_k.forward(&hv)?,
                    b.attn1.to_v.forward(&hv)?,
                    b.attn2.to_q.forward(&hv)?,
                    b.attn2.to_k.forward(&encv)?,
                    b.attn2.to_v.forward(&encv)?,
                ])
            })?;
            stage("q/k norms", &|| {
                Ok(vec![
                    rms_norm(&hv, Some(&b.attn1.norm_q), c.eps)?,
                    rms_norm(&hv, Some(&b.attn1.norm_k), c.eps)?,
                    rms_norm(&hv, Some(&b.attn2.norm_q), c.eps)?,
                    rms_norm(&encv, Some(&b.attn2.norm_k), c.eps)?,
                ])
            })?;
            stage("rope", &|| Ok(vec![apply_rope(&qv, &rope.cos, &rope.sin)?, apply_rope(&kv, &rope.cos, &rope.sin)?]))?;
            stage("attention", &|| Ok(vec![sdpa(&qv, &kv, &vv, None)?, sdpa(&qv, &kc, &vc, None)?]))?;
            stage("output projections", &|| Ok(vec![b.attn1.to_out.forward(&hv)?, b.attn2.to_out.forward(&hv)?]))?;
            stage("ffn linears", &|| Ok(vec![b.ffn_in.forward(&hv)?, b.ffn_out.forward(&fv)?]))?;
            stage("gelu", &|| Ok(vec![gelu_tanh(&fv)?]))?;
            stage("gated residuals", &|| Ok(vec![gated_residual(&xv, &hv, &mi(2)?)?, gated_residual(&xv, &hv, &mi(5)?)?, (&xv + &hv)?]))?;
            // What the block copies that the math does not need: the text context cast to the
            // activations' dtype for the cross-attention's keys and values (f32 context).
            let enc32 = var(&[1, l, d])?.to_dtype(candle_core::DType::F32)?;
            stage("layout copies", &|| Ok(vec![enc32.to_dtype(dt)?]))?;
            let (xb, eb) = (Var::from_tensor(&x)?.as_tensor().clone(), enc.clone());
            let (fw, bw) = time(device, r, &|| Ok(vec![b.forward(&xb, &eb, &tproj, &rope, &c)?]))?;
            Stage { name: "block".into(), forward_ms: fw, backward_ms: bw }
        }
        Setup::Qwen { mut block, cfg: c, img, txt, temb, aux } => {
            vars_of(block.params("block"), TrainMode::Full)?;
            let b = &block;
            let (d, h, hd) = (c.dim(), c.heads, c.head_dim);
            let n = t + l;
            let (iv, tv, tembv) = (var(&[1, t, d])?, var(&[1, l, d])?, var(&[1, d])?);
            let (im, tm) = (var(&[1, 1, 6 * d])?, var(&[1, 1, 6 * d])?);
            let part = |m: &Tensor, i: usize| m.narrow(2, i * d, d);
            let (ih, th) = (var(&[1, t, h, hd])?, var(&[1, l, h, hd])?);
            let (q, k, v) = (var(&[1, n, h, hd])?, var(&[1, n, h, hd])?, var(&[1, n, h, hd])?);
            let (imlp, tmlp) = (var(&[1, t, 4 * d])?, var(&[1, l, 4 * d])?);
            let eps = 1e-6;
            stage("modulation linears", &|| Ok(vec![b.img_mod.forward(&silu(&tembv)?)?, b.txt_mod.forward(&silu(&tembv)?)?]))?;
            stage("norm + modulation", &|| {
                Ok(vec![
                    layer_norm_modulate(&iv, &part(&im, 0)?, &part(&im, 1)?, eps)?,
                    layer_norm_modulate(&tv, &part(&tm, 0)?, &part(&tm, 1)?, eps)?,
                    layer_norm_modulate(&iv, &part(&im, 3)?, &part(&im, 4)?, eps)?,
                    layer_norm_modulate(&tv, &part(&tm, 3)?, &part(&tm, 4)?, eps)?,
                ])
            })?;
            let a_ = &b.attn;
            stage("qkv projections", &|| {
                Ok(vec![
                    a_.to_q.forward(&iv)?,
                    a_.to_k.forward(&iv)?,
                    a_.to_v.forward(&iv)?,
                    a_.add_q.forward(&tv)?,
                    a_.add_k.forward(&tv)?,
                    a_.add_v.forward(&tv)?,
                ])
            })?;
            stage("q/k norms", &|| {
                Ok(vec![
                    rms_norm(&ih, Some(&a_.norm_q), eps)?,
                    rms_norm(&ih, Some(&a_.norm_k), eps)?,
                    rms_norm(&th, Some(&a_.norm_added_q), eps)?,
                    rms_norm(&th, Some(&a_.norm_added_k), eps)?,
                ])
            })?;
            stage("rope", &|| {
                Ok(vec![
                    apply_rope(&ih, &aux.img_rope.cos, &aux.img_rope.sin)?,
                    apply_rope(&ih, &aux.img_rope.cos, &aux.img_rope.sin)?,
                    apply_rope(&th, &aux.txt_rope.cos, &aux.txt_rope.sin)?,
                    apply_rope(&th, &aux.txt_rope.cos, &aux.txt_rope.sin)?,
                ])
            })?;
            // The joint sequence is made by concatenating text and image (three copies).
            stage("layout copies", &|| Ok(vec![Tensor::cat(&[&th, &ih], 1)?, Tensor::cat(&[&th, &ih], 1)?, Tensor::cat(&[&th, &ih], 1)?]))?;
            stage("attention", &|| Ok(vec![sdpa(&q, &k, &v, None)?]))?;
            stage("output projections", &|| Ok(vec![a_.to_out.forward(&iv)?, a_.to_add_out.forward(&tv)?]))?;
            stage("mlp linears", &|| {
                Ok(vec![
                    b.img_mlp_in.forward(&iv)?,
                    b.img_mlp_out.forward(&imlp)?,
                    b.txt_mlp_in.forward(&tv)?,
                    b.txt_mlp_out.forward(&tmlp)?,
                ])
            })?;
            stage("gelu", &|| Ok(vec![gelu_tanh(&imlp)?, gelu_tanh(&tmlp)?]))?;
            stage("gated residuals", &|| {
                Ok(vec![
                    gated_residual(&iv, &iv, &part(&im, 2)?)?,
                    gated_residual(&tv, &tv, &part(&tm, 2)?)?,
                    gated_residual(&iv, &iv, &part(&im, 5)?)?,
                    gated_residual(&tv, &tv, &part(&tm, 5)?)?,
                ])
            })?;
            let ib = Var::from_tensor(&img)?.as_tensor().clone();
            let (fw, bw) = time(device, r, &|| {
                let (i, x) = b.forward(&ib, &txt, &temb, &aux, &c)?;
                Ok(vec![i, x])
            })?;
            Stage { name: "block".into(), forward_ms: fw, backward_ms: bw }
        }
    };
    Ok(Breakdown {
        model: format!("{:?}", a.model).to_lowercase(),
        device: crate::device::name(device),
        dtype: format!("{dt:?}").to_lowercase(),
        tokens: t,
        text_tokens: l,
        stages: out,
        block,
    })
}

/// The table: our stages (and the other side's, from `against`, with the ratio theirs / ours:
/// above 1 where we are faster). "rest" is the block's time minus the stages' sum (negative
/// where the stages on their own cost more than inside the block).
fn render(ours: &Breakdown, theirs: Option<&Breakdown>) -> String {
    let mut s = format!(
        "{} block, {} tokens + {} text, {} on {}: median ms per stage (forward / backward){}\n",
        ours.model,
        ours.tokens,
        ours.text_tokens,
        ours.dtype,
        ours.device,
        if theirs.is_some() { ", beside PyTorch eager" } else { "" }
    );
    s.push_str(&format!("{:<20} {:>10} {:>10}", "stage", "fwd", "bwd"));
    if theirs.is_some() {
        s.push_str(&format!(" {:>10} {:>10} {:>8}", "torch fwd", "torch bwd", "ratio"));
    }
    s.push('\n');
    let sum = |b: &Breakdown| -> (f64, f64) { (b.stages.iter().map(|x| x.forward_ms).sum(), b.stages.iter().map(|x| x.backward_ms).sum()) };
    let rest = |b: &Breakdown| {
        let (f, w) = sum(b);
        Stage { name: "rest".into(), forward_ms: b.block.forward_ms - f, backward_ms: b.block.backward_ms - w }
    };
    let mut rows: Vec<Stage> = ours.stages.clone();
    rows.push(rest(ours));
    rows.push(ours.block.clone());
    let their_rows: Vec<Stage> = theirs
        .map(|t| {
            let mut v = t.stages.clone();
            v.push(rest(t));
            v.push(t.block.clone());
            v
        })
        .unwrap_or_default();
    for r in &rows {
        s.push_str(&format!("{:<20} {:>10.3} {:>10.3}", r.name, r.forward_ms, r.backward_ms));
        if theirs.is_some() {
            match their_rows.iter().find(|x| x.name == r.name) {
                Some(o) => {
                    let (mine, other) = (r.forward_ms + r.backward_ms, o.forward_ms + o.backward_ms);
                    let ratio = if mine > 1e-3 && other > 1e-3 && r.name != "rest" { format!("{:.2}×", other / mine) } else { "-".into() };
                    s.push_str(&format!(" {:>10.3} {:>10.3} {:>8}", o.forward_ms, o.backward_ms, ratio));
                }
                None => s.push_str(&format!(" {:>10} {:>10} {:>8}", "-", "-", "-")),
            }
        }
        s.push('\n');
    }
    s
}

/// `bench block --breakdown [--against FILE]`.
pub fn run(a: &BlockArgs, against: Option<&Path>, json: bool) -> Result<()> {
    let theirs: Option<Breakdown> = match against {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
            Some(serde_json::from_str(last).map_err(|e| Error::malformed(p, format!("is not a breakdown JSON line ({e})")))?)
        }
        None => None,
    };
    let device = crate::device::parse(&a.device)?;
    let ours = stages(a, &device).map_err(Error::from)?;
    if json {
        crate::cli::printer::print_json(&serde_json::json!({ "breakdown": ours, "against": theirs }));
    } else {
        print!("{}", render(&ours, theirs.as_ref()));
    }
    Ok(())
}
