//! `phasekit bench block`: one full-width teacher block, forward + backward on the CPU with
//! random weights, against candle's own matmul rate measured in the same run.
//!
//! FLOPs count the matmuls only: linear layers `2·rows·in·out`, attention `4·B·H·Sq·Sk·D`; the
//! backward pass counts twice the forward (input and weight gradients).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::linear::Linear;
use super::qwen::{QwenAttention, QwenAux, QwenBlock, QwenConfig};
use super::rope;
use super::wan::{WanAttention, WanBlock, WanConfig};
use super::{vars_of, TrainMode};
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchModel {
    /// Wan2.2 A14B block: dim 5120, 40 heads, FFN 13824.
    Wan,
    /// Qwen-Image block: dim 3072, 24 heads, MLP 12288.
    Qwen,
}

#[derive(clap::Args, Debug, Clone)]
pub struct BlockArgs {
    #[arg(long, value_enum)]
    pub model: BenchModel,
    /// Image/video tokens.
    #[arg(long, default_value_t = 256)]
    pub tokens: usize,
    /// Text tokens.
    #[arg(long, default_value_t = 64)]
    pub text_tokens: usize,
    /// Timed runs (the best is kept), after one warm-up.
    #[arg(long, default_value_t = 2)]
    pub repeats: usize,
    /// Device: cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weights and activations dtype (norms, softmax and RoPE compute in f32 either way).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: super::cli::ComputeDtype,
    /// Attention heads (of 128): a narrower block of the same shape for quick checks; the FFN
    /// keeps its ratio to the width. Default: the model's (Wan2.2 A14B 40, Qwen-Image 24).
    #[arg(long)]
    pub heads: Option<usize>,
    /// Time each stage of the block on its own, forward and backward (norm + modulation, QKV
    /// projections, q/k norms, RoPE, attention, output projections, FFN, gated residuals,
    /// layout copies), medians after a warm-up (at least 3 repeats), and the rest of the block.
    #[arg(long)]
    pub breakdown: bool,
    /// With --breakdown: print beside ours the stages of `benches/block_torch.py --breakdown`
    /// (its JSON output, saved to a file), and the ratio PyTorch time / phasekit time.
    #[arg(long, value_name = "FILE", requires = "breakdown")]
    pub against: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BlockReport {
    pub model: BenchModel,
    pub device: String,
    pub dtype: String,
    pub tokens: usize,
    pub text_tokens: usize,
    pub params: usize,
    pub gflop: f64,
    pub seconds: f64,
    pub gflops: f64,
    pub matmul_gflops: f64,
    pub ratio: f64,
    /// Peak resident memory of the process over the block's runs (`VmHWM`, weights included).
    pub peak_rss_bytes: Option<u64>,
    /// On CUDA: the high-water mark of the device's memory pool over the block's runs.
    pub peak_device_bytes: Option<u64>,
}

thread_local! {
    /// Where the bench's tensors live and in which dtype (set once per run by [`bench`]).
    static PLACE: std::cell::RefCell<(Device, DType)> = const { std::cell::RefCell::new((Device::Cpu, DType::F32)) };
}

fn place() -> (Device, DType) {
    PLACE.with_borrow(|p| p.clone())
}

/// Random values of `shape` on the bench's device and dtype.
pub(super) fn rnd(shape: &[usize], std: f64) -> candle_core::Result<Tensor> {
    let (dev, dt) = place();
    Tensor::randn(0f32, std as f32, shape, &dev)?.to_dtype(dt)
}

fn lin(i: usize, o: usize) -> candle_core::Result<Linear> {
    Ok(Linear::new(rnd(&[o, i], 1.0 / (i as f64).sqrt())?, Some(rnd(&[o], 0.01)?)))
}

fn ones(n: usize) -> candle_core::Result<Tensor> {
    let (dev, dt) = place();
    Tensor::ones(n, dt, &dev)
}

fn wan_attn(d: usize) -> candle_core::Result<WanAttention> {
    Ok(WanAttention { to_q: lin(d, d)?, to_k: lin(d, d)?, to_v: lin(d, d)?, to_out: lin(d, d)?, norm_q: ones(d)?, norm_k: ones(d)? })
}

fn linear_flops(rows: usize, i: usize, o: usize) -> f64 {
    2.0 * rows as f64 * i as f64 * o as f64
}

fn attn_flops(sq: usize, sk: usize, dim: usize) -> f64 {
    4.0 * sq as f64 * sk as f64 * dim as f64
}

fn best(repeats: usize, mut f: impl FnMut() -> candle_core::Result<()>) -> candle_core::Result<f64> {
    let dev = place().0;
    f()?;
    dev.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        f()?;
        dev.synchronize()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn bench(a: &BlockArgs, device: &Device) -> candle_core::Result<BlockReport> {
    crate::device::reset_host_peak();
    crate::device::reset_peak(device);
    let (t, l) = (a.tokens.max(1), a.text_tokens.max(1));
    let setup = setup(a.model, t, l, a.heads, device, a.dtype.dtype())?;
    let (params, fwd, secs, dim, ffn) = match setup {
        Setup::Wan { mut block, cfg: c, x, enc, tproj, rope } => {
            let d = c.dim();
            let vars = vars_of(block.params("block"), TrainMode::Full)?;
            let params: usize = vars.iter().map(|v| v.elem_count()).sum();
            let secs = best(a.repeats, || {
                let y = block.forward(&x, &enc, &tproj, &rope, &c)?;
                let _g = y.sum_all()?.backward()?;
                Ok(())
            })?;
            let fwd = 4.0 * linear_flops(t, d, d)
                + 2.0 * linear_flops(t, d, d)
                + 2.0 * linear_flops(l, d, d)
                + attn_flops(t, t, d)
                + attn_flops(t, l, d)
                + linear_flops(t, d, c.ffn_dim) * 2.0;
            (params, fwd, secs, d, c.ffn_dim)
        }
        Setup::Qwen { mut block, cfg: c, img, txt, temb, aux } => {
            let d = c.dim();
            let vars = vars_of(block.params("block"), TrainMode::Full)?;
            let params: usize = vars.iter().map(|v| v.elem_count()).sum();
            let secs = best(a.repeats, || {
                let (i, x) = block.forward(&img, &txt, &temb, &aux, &c)?;
                let _g = (i.sum_all()? + x.sum_all()?)?.backward()?;
                Ok(())
            })?;
            let n = t + l;
            let fwd = 2.0 * linear_flops(1, d, 6 * d) + 4.0 * linear_flops(n, d, d) + attn_flops(n, n, d) + 2.0 * linear_flops(n, d, 4 * d);
            (params, fwd, secs, d, 4 * d)
        }
    };
    // The block's peaks, before the matmul below adds its own buffers.
    device.synchronize()?;
    let (peak_rss_bytes, peak_device_bytes) = (crate::device::host_peak(), crate::device::memory(device).1);
    // candle's own rate on the FFN's matmul shape.
    let xa = rnd(&[t, dim], 1.0)?;
    let wb = rnd(&[dim, ffn], 1.0)?;
    let mm = best(a.repeats, || xa.matmul(&wb).map(|_| ()))?;
    let matmul_gflops = linear_flops(t, dim, ffn) / mm / 1e9;
    let total = 3.0 * fwd;
    let gflops = total / secs / 1e9;
    Ok(BlockReport {
        model: a.model,
        device: crate::device::name(device),
        dtype: format!("{:?}", a.dtype.dtype()).to_lowercase(),
        tokens: t,
        text_tokens: l,
        params,
        gflop: total / 1e9,
        seconds: secs,
        gflops,
        matmul_gflops,
        ratio: gflops / matmul_gflops,
        peak_rss_bytes,
        peak_device_bytes,
    })
}

/// A full-width block with random weights and its inputs, on the bench's device and dtype.
pub(super) enum Setup {
    Wan { block: WanBlock, cfg: WanConfig, x: Tensor, enc: Tensor, tproj: Tensor, rope: rope::RopeTables },
    Qwen { block: QwenBlock, cfg: QwenConfig, img: Tensor, txt: Tensor, temb: Tensor, aux: QwenAux },
}

/// Wan2.2 A14B's or Qwen-Image's block at `t` image/video tokens and `l` text tokens.
pub(super) fn setup(
    model: BenchModel,
    t: usize,
    l: usize,
    heads: Option<usize>,
    device: &Device,
    dtype: DType,
) -> candle_core::Result<Setup> {
    PLACE.with_borrow_mut(|p| *p = (device.clone(), dtype));
    Ok(match model {
        BenchModel::Wan => {
            let h = heads.unwrap_or(40).max(1);
            let c = WanConfig {
                patch: [1, 2, 2],
                heads: h,
                head_dim: 128,
                in_channels: 16,
                out_channels: 16,
                text_dim: 4096,
                freq_dim: 256,
                // 13824 at 40 heads.
                ffn_dim: 13824 * h / 40,
                num_layers: 1,
                cross_attn_norm: true,
                eps: 1e-6,
            };
            let d = c.dim();
            let block = WanBlock {
                attn1: wan_attn(d)?,
                attn2: wan_attn(d)?,
                norm2: Some((ones(d)?, rnd(&[d], 0.01)?)),
                ffn_in: lin(d, c.ffn_dim)?,
                ffn_out: lin(c.ffn_dim, d)?,
                // The loader keeps modulation tables in f32 whatever the compute dtype.
                scale_shift_table: rnd(&[1, 6, d], 0.02)?.to_dtype(DType::F32)?,
            };
            let x = rnd(&[1, t, d], 1.0)?;
            let enc = rnd(&[1, l, d], 1.0)?;
            let tproj = rnd(&[1, 6, d], 0.1)?.to_dtype(DType::F32)?;
            let rope = rope::wan(c.head_dim, 1, 1, t, device)?;
            Setup::Wan { block, cfg: c, x, enc, tproj, rope }
        }
        BenchModel::Qwen => {
            let c = QwenConfig {
                patch: 2,
                in_channels: 64,
                out_channels: 16,
                num_layers: 1,
                head_dim: 128,
                heads: heads.unwrap_or(24).max(1),
                joint_dim: 3584,
                axes: [16, 56, 56],
            };
            let d = c.dim();
            let hd = ones(c.head_dim)?;
            let block = QwenBlock {
                img_mod: lin(d, 6 * d)?,
                txt_mod: lin(d, 6 * d)?,
                attn: QwenAttention {
                    to_q: lin(d, d)?,
                    to_k: lin(d, d)?,
                    to_v: lin(d, d)?,
                    to_out: lin(d, d)?,
                    add_q: lin(d, d)?,
                    add_k: lin(d, d)?,
                    add_v: lin(d, d)?,
                    to_add_out: lin(d, d)?,
                    norm_q: hd.clone(),
                    norm_k: hd.clone(),
                    norm_added_q: hd.clone(),
                    norm_added_k: hd,
                },
                img_mlp_in: lin(d, 4 * d)?,
                img_mlp_out: lin(4 * d, d)?,
                txt_mlp_in: lin(d, 4 * d)?,
                txt_mlp_out: lin(4 * d, d)?,
            };
            let img = rnd(&[1, t, d], 1.0)?;
            let txt = rnd(&[1, l, d], 1.0)?;
            let temb = rnd(&[1, d], 1.0)?;
            let (img_rope, txt_rope) = rope::qwen(c.axes, 1, 1, t, l, device)?;
            Setup::Qwen { block, cfg: c, img, txt, temb, aux: QwenAux { img_rope, txt_rope, mask: None } }
        }
    })
}

/// The `bench block` command.
pub fn run(a: &BlockArgs, json: bool) -> Result<()> {
    let device = crate::device::parse(&a.device)?;
    let r = bench(a, &device).map_err(Error::from)?;
    if json {
        crate::cli::printer::print_json(&r);
    } else {
        println!(
            "{:?} block, {} tokens + {} text, {:.0}M params: forward+backward {:.1} GFLOP in {:.3} s = {:.1} GFLOP/s; candle matmul {:.1} GFLOP/s; ratio {:.2}; peak {}",
            a.model,
            r.tokens,
            r.text_tokens,
            r.params as f64 / 1e6,
            r.gflop,
            r.seconds,
            r.gflops,
            r.matmul_gflops,
            r.ratio,
            match (r.peak_device_bytes, r.peak_rss_bytes) {
                (Some(d), _) => format!("{:.2} GiB on the device", d as f64 / (1u64 << 30) as f64),
                (None, Some(h)) => format!("{:.2} GiB resident", h as f64 / (1u64 << 30) as f64),
                _ => "unknown".into(),
            }
        );
    }
    Ok(())
}
