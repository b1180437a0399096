//! `phasekit bench attention`: the attention op's correctness across paths (`--check`) and its
//! speed against PyTorch's SDPA backends measured in the same run (`benches/attention_torch.py`).
//!
//! **Check.** Random inputs for self, cross and masked joint attention (one batch with every key
//! dropped), in bf16, f16 and f32; every path this device has ([`Path::Fused`] on CUDA where it
//! applies, [`Path::Chunked`] everywhere) against the reference, [`Path::Cpu`] on CPU copies of
//! the same inputs (itself checked against f64 by `cargo test`; the chunked path runs with 256 × 384
//! chunks here, so that it crosses chunk edges): relative L2 of the output and of
//! the gradients of q, k and v for the loss `Σ o ∘ g` with random `g`. Bounds: 1e-2 for bf16,
//! 2e-3 for f16, 1e-5 for f32; NaN never passes.
//!
//! **Speed.** Self-attention `[1, S, H, D]` for every `--tokens` × `--heads`: median time of the
//! forward pass and of forward + backward (after a warm-up), and TFLOP/s counted as
//! `4·H·S²·D` for the forward and 3.5× that for forward + backward (FlashAttention's convention:
//! the backward's five products). The PyTorch twin prints the same rows for its backends.

use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::attention::{attention_opts, fused_supported, resolve, Options, Path};
use crate::error::{Error, IoContext, Result};

/// The PyTorch twin, written to a temporary file and run with `python3`.
const TORCH_TWIN: &str = include_str!("../../benches/attention_torch.py");

#[derive(clap::Args, Debug, Clone)]
pub struct AttentionArgs {
    /// Device: cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Input dtype of the timings (the check runs bf16, f16 and f32 regardless).
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: crate::model::cli::ComputeDtype,
    /// Sequence lengths to time (self-attention, batch 1), comma-separated [default: 4096,16384,32760
    /// on CUDA, 512,1024 on the CPU].
    #[arg(long, value_delimiter = ',')]
    pub tokens: Option<Vec<usize>>,
    /// Head counts to time, comma-separated (Wan2.2: 40, Qwen-Image: 24) [default: 40,24 on CUDA, 2 on
    /// the CPU].
    #[arg(long, value_delimiter = ',')]
    pub heads: Option<Vec<usize>>,
    /// Head size.
    #[arg(long, default_value_t = 128)]
    pub head_dim: usize,
    /// Implementations to time, comma-separated: auto (what the models use), cpu, chunked, fused.
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    pub paths: Vec<Path>,
    /// Timed runs per row (the median is kept), after one warm-up.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Run the correctness check instead of the timings (exit 1 if a path is off its bound).
    #[arg(long)]
    pub check: bool,
    /// Sequence length of the check's self-attention case (cross and joint cases scale with it).
    #[arg(long, default_value_t = 1000)]
    pub check_tokens: usize,
    /// Skip the PyTorch comparison.
    #[arg(long)]
    pub no_python: bool,
}

/// One row of the timing table (phasekit's or PyTorch's).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    #[serde(rename = "impl")]
    pub implementation: String,
    pub tokens: usize,
    pub heads: usize,
    #[serde(default)]
    pub fwd_ms: Option<f64>,
    #[serde(default)]
    pub fwd_bwd_ms: Option<f64>,
    #[serde(default)]
    pub fwd_tflops: Option<f64>,
    #[serde(default)]
    pub fwd_bwd_tflops: Option<f64>,
    #[serde(default)]
    pub peak_bytes: Option<u64>,
    #[serde(default)]
    pub error: Option<String>,
}

/// One line of the check: a path against the reference on one case.
#[derive(Debug, Clone, Serialize)]
pub struct CheckLine {
    pub case: String,
    pub dtype: String,
    pub path: String,
    pub o: f64,
    pub dq: f64,
    pub dk: f64,
    pub dv: f64,
    pub bound: f64,
    pub pass: bool,
}

#[derive(Debug, Clone, Deserialize)]
struct TorchOut {
    torch: String,
    device: String,
    rows: Vec<Row>,
}

#[derive(Debug, Clone, Serialize)]
struct Report {
    device: String,
    dtype: String,
    head_dim: usize,
    torch: Option<String>,
    torch_note: Option<String>,
    rows: Vec<Row>,
}

fn cerr(e: candle_core::Error) -> Error {
    crate::Error::from(e)
}

/// `‖a − b‖ / ‖b‖` in f64 (∞ if `a` has a NaN).
fn rel(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let a = a.to_dtype(DType::F64)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f64>()?;
    let b = b.to_dtype(DType::F64)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f64>()?;
    if a.iter().any(|x| !x.is_finite()) {
        return Ok(f64::INFINITY);
    }
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    Ok((num / den.max(1e-30)).sqrt())
}

/// Output and gradients of q, k, v for the loss `Σ o ∘ g`, through `path` on `q`'s device.
fn forward_backward(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, g: &Tensor, path: Path) -> candle_core::Result<[Tensor; 4]> {
    let (qv, kv, vv) = (Var::from_tensor(q)?, Var::from_tensor(k)?, Var::from_tensor(v)?);
    // Chunks smaller than the check's sizes, so that the chunked path crosses chunk edges.
    let (o, _) = attention_opts(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), mask, &Options { path, chunks: (256, 384) })?;
    let grads = (o.to_dtype(DType::F32)? * g.to_dtype(DType::F32)?)?.sum_all()?.backward()?;
    let get =
        |v: &Var| grads.get(v.as_tensor()).cloned().ok_or_else(|| candle_core::Error::Msg("attention check: missing gradient".into()));
    Ok([o, get(&qv)?, get(&kv)?, get(&vv)?])
}

/// The correctness check on `device`.
pub fn check(device: &Device, tokens: usize) -> Result<Vec<CheckLine>> {
    let n = tokens.max(16);
    // (name, batch, Sq, Sk, heads, head dim, mask)
    let cases: Vec<(&str, usize, usize, usize, usize, usize, bool)> = vec![
        ("self d128", 1, n, n, 4, 128, false),
        ("self d64", 1, n, n, 4, 64, false),
        ("cross d128", 1, n, (n / 2).max(8), 4, 128, false),
        ("joint+mask d128", 2, n, n, 3, 128, true),
    ];
    let mut lines = Vec::new();
    for (name, b, sq, sk, h, d, masked) in cases {
        for dt in [DType::BF16, DType::F16, DType::F32] {
            let cpu = Device::Cpu;
            let rnd = |s: usize| Tensor::randn(0f32, 1.0, (b, s, h, d), &cpu).and_then(|t| t.to_dtype(dt));
            let (q, k, v, g) = (rnd(sq).map_err(cerr)?, rnd(sk).map_err(cerr)?, rnd(sk).map_err(cerr)?, rnd(sq).map_err(cerr)?);
            // Joint attention: the first quarter of the keys is a prompt, padded from 3/4 of it
            // in batch 0; batch 1 keeps no key at all (fully masked rows: output and gradients 0).
            let mask = masked.then(|| {
                let keep: Vec<f32> =
                    (0..b * sk).map(|i| if i >= sk || (i % sk < sk / 4 && i % sk >= 3 * sk / 16) { 0.0 } else { 1.0 }).collect();
                Tensor::from_vec(keep, (b, sk), &cpu)
            });
            let mask = mask.transpose().map_err(cerr)?;
            let want = forward_backward(&q, &k, &v, mask.as_ref(), &g, Path::Cpu).map_err(cerr)?;
            let mut paths = vec![Path::Chunked];
            if fused_supported(device, dt, d) {
                paths.insert(0, Path::Fused);
            }
            let on = |t: &Tensor| t.to_device(device);
            let (qd, kd, vd, gd) = (on(&q).map_err(cerr)?, on(&k).map_err(cerr)?, on(&v).map_err(cerr)?, on(&g).map_err(cerr)?);
            let md = mask.as_ref().map(on).transpose().map_err(cerr)?;
            for path in paths {
                let got = forward_backward(&qd, &kd, &vd, md.as_ref(), &gd, path).map_err(cerr)?;
                let e: Vec<f64> = got.iter().zip(&want).map(|(a, w)| rel(a, w)).collect::<candle_core::Result<_>>().map_err(cerr)?;
                let bound = match dt {
                    DType::BF16 => 1e-2,
                    DType::F16 => 2e-3,
                    _ => 1e-5,
                };
                let pass = e.iter().all(|&x| x <= bound);
                lines.push(CheckLine {
                    case: name.into(),
                    dtype: format!("{dt:?}").to_lowercase(),
                    path: path.name().into(),
                    o: e[0],
                    dq: e[1],
                    dk: e[2],
                    dv: e[3],
                    bound,
                    pass,
                });
            }
        }
    }
    Ok(lines)
}

/// Median of `repeats` timed calls of `f` after one warm-up, in milliseconds.
pub(crate) fn median_ms(device: &Device, repeats: usize, mut f: impl FnMut() -> candle_core::Result<()>) -> candle_core::Result<f64> {
    f()?;
    device.synchronize()?;
    let mut t: Vec<f64> = Vec::new();
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        f()?;
        device.synchronize()?;
        t.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(&mut t))
}

/// The median of `v` (sorted in place; NaN when empty).
pub(crate) fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let h = v.len() / 2;
    if v.len() % 2 == 1 {
        v[h]
    } else {
        0.5 * (v[h - 1] + v[h])
    }
}

fn time_one(device: &Device, dt: DType, tokens: usize, heads: usize, d: usize, path: Path, repeats: usize) -> candle_core::Result<Row> {
    let resolved = resolve(path, device, dt, d)?;
    let rnd = || Tensor::randn(0f32, 1.0, (1, tokens, heads, d), device).and_then(|t| t.to_dtype(dt));
    let (q, k, v, g) = (rnd()?, rnd()?, rnd()?, rnd()?);
    let opts = Options { path: resolved, ..Options::default() };
    let fwd_ms = median_ms(device, repeats, || attention_opts(&q, &k, &v, None, &opts).map(|_| ()))?;
    let (qv, kv, vv) = (Var::from_tensor(&q)?, Var::from_tensor(&k)?, Var::from_tensor(&v)?);
    let fwd_bwd_ms = median_ms(device, repeats, || {
        let (o, _) = attention_opts(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), None, &opts)?;
        (o * &g)?.sum_all()?.backward().map(|_| ())
    })?;
    let flops = 4.0 * heads as f64 * (tokens as f64).powi(2) * d as f64;
    Ok(Row {
        implementation: format!("phasekit {}", resolved.name()),
        tokens,
        heads,
        fwd_ms: Some(fwd_ms),
        fwd_bwd_ms: Some(fwd_bwd_ms),
        fwd_tflops: Some(flops / fwd_ms / 1e9),
        fwd_bwd_tflops: Some(3.5 * flops / fwd_bwd_ms / 1e9),
        peak_bytes: None,
        error: None,
    })
}

/// `--tokens` and `--heads`, or the device's defaults.
fn sizes(a: &AttentionArgs, device: &Device) -> (Vec<usize>, Vec<usize>) {
    let (t, h) = if device.is_cpu() { (vec![512, 1024], vec![2]) } else { (vec![4096, 16384, 32760], vec![40, 24]) };
    (a.tokens.clone().unwrap_or(t), a.heads.clone().unwrap_or(h))
}

fn torch_rows(a: &AttentionArgs, tokens: &[usize], heads: &[usize]) -> Result<TorchOut> {
    let script = std::env::temp_dir().join(format!("phasekit-attention-torch-{}.py", std::process::id()));
    std::fs::write(&script, TORCH_TWIN).with_file(&script)?;
    let device = if a.device.starts_with("cuda") { a.device.as_str() } else { "cpu" };
    let backends = if device == "cpu" { "flash,math" } else { "cudnn,flash,efficient,math" };
    let join = |v: &[usize]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",");
    let dtype = format!("{:?}", a.dtype.dtype()).to_lowercase();
    let out = Command::new("python3")
        .arg(&script)
        .args(["--device", device, "--dtype", &dtype, "--backends", backends])
        .args(["--tokens", &join(tokens), "--heads", &join(heads)])
        .args(["--head-dim", &a.head_dim.to_string(), "--repeats", &a.repeats.to_string()])
        .output();
    let _ = std::fs::remove_file(&script);
    let out = out.map_err(|e| Error::io("python3", e))?;
    if !out.status.success() {
        return Err(Error::internal(format!(
            "benches/attention_torch.py failed: {}",
            crate::error::clean(String::from_utf8_lossy(&out.stderr).trim())
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().rfind(|l| l.trim_start().starts_with('{')).unwrap_or("");
    serde_json::from_str(line).map_err(|e| Error::internal(format!("benches/attention_torch.py printed no JSON ({e})")))
}

fn python_has_torch() -> bool {
    Command::new("python3").args(["-c", "import torch"]).output().is_ok_and(|o| o.status.success())
}

fn fmt(x: Option<f64>, prec: usize) -> String {
    x.map(|v| format!("{v:.prec$}")).unwrap_or_else(|| "-".into())
}

/// Three significant digits (CPU rates are fractions of a TFLOP/s).
fn fmt_rate(x: Option<f64>) -> String {
    match x {
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) if v >= 10.0 => format!("{v:.1}"),
        Some(v) if v >= 1.0 => format!("{v:.2}"),
        Some(v) => format!("{v:.3}"),
        None => "-".into(),
    }
}

/// The `bench attention` command.
pub fn run(a: &AttentionArgs, json: bool) -> Result<()> {
    let device = crate::device::parse(&a.device)?;
    if a.check {
        let lines = check(&device, a.check_tokens)?;
        let failed = lines.iter().filter(|l| !l.pass).count();
        if json {
            println!("{}", serde_json::to_string_pretty(&lines).map_err(|e| Error::internal(e.to_string()))?);
        } else {
            println!(
                "attention check on {}: each path against the cpu path on CPU copies of the inputs (rel L2)",
                crate::device::name(&device)
            );
            println!("{:<16} {:<5} {:<8} {:>9} {:>9} {:>9} {:>9} {:>7}  result", "case", "dtype", "path", "o", "dq", "dk", "dv", "bound");
            for l in &lines {
                println!(
                    "{:<16} {:<5} {:<8} {:>9.2e} {:>9.2e} {:>9.2e} {:>9.2e} {:>7.0e}  {}",
                    l.case,
                    l.dtype,
                    l.path,
                    l.o,
                    l.dq,
                    l.dk,
                    l.dv,
                    l.bound,
                    if l.pass { "ok" } else { "FAIL" }
                );
            }
        }
        if failed > 0 {
            return Err(Error::internal(format!("attention check: {failed} of {} lines beyond their bound", lines.len())));
        }
        return Ok(());
    }
    let dt = a.dtype.dtype();
    let (all_tokens, all_heads) = sizes(a, &device);
    if all_tokens.contains(&0) || all_heads.contains(&0) || a.head_dim == 0 {
        return Err(Error::usage("--tokens, --heads and --head-dim must be positive"));
    }
    let mut rows = Vec::new();
    for &heads in &all_heads {
        for &tokens in &all_tokens {
            for &path in &a.paths {
                rows.push(time_one(&device, dt, tokens, heads, a.head_dim, path, a.repeats).unwrap_or_else(|e| Row {
                    implementation: format!("phasekit {}", path.name()),
                    tokens,
                    heads,
                    fwd_ms: None,
                    fwd_bwd_ms: None,
                    fwd_tflops: None,
                    fwd_bwd_tflops: None,
                    peak_bytes: None,
                    error: Some(crate::error::clean(&e.to_string())),
                }));
            }
        }
    }
    let (mut torch, mut torch_note) = (None, None);
    if a.no_python {
        torch_note = Some("skipped: --no-python".to_string());
    } else if !python_has_torch() {
        torch_note = Some("skipped: torch not available (python3 -c \"import torch\" failed)".to_string());
    } else {
        match torch_rows(a, &all_tokens, &all_heads) {
            Ok(t) => {
                torch = Some(format!("{} on {}", t.torch, t.device));
                rows.extend(t.rows);
            }
            Err(e) => torch_note = Some(e.to_string()),
        }
    }
    let report = Report {
        device: crate::device::name(&device),
        dtype: format!("{dt:?}").to_lowercase(),
        head_dim: a.head_dim,
        torch,
        torch_note,
        rows,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report).map_err(|e| Error::internal(e.to_string()))?);
        return Ok(());
    }
    println!(
        "attention, self, batch 1, head dim {}, {} on {} (fwd+bwd FLOPs = 3.5 × fwd; speed = phasekit's fwd+bwd speed ÷ this row's)",
        a.head_dim, report.dtype, report.device
    );
    if let Some(t) = &report.torch {
        println!("PyTorch {t}");
    }
    if let Some(n) = &report.torch_note {
        println!("PyTorch: {n}");
    }
    println!(
        "{:>6} {:>5}  {:<18} {:>10} {:>8} {:>12} {:>8} {:>7}",
        "tokens", "heads", "impl", "fwd ms", "TFLOP/s", "fwd+bwd ms", "TFLOP/s", "speed"
    );
    for &heads in &all_heads {
        for &tokens in &all_tokens {
            let group: Vec<&Row> = report.rows.iter().filter(|r| r.heads == heads && r.tokens == tokens).collect();
            let ours = group.iter().find(|r| r.implementation.starts_with("phasekit") && r.fwd_bwd_ms.is_some()).and_then(|r| r.fwd_bwd_ms);
            for r in group {
                match &r.error {
                    Some(e) => println!("{:>6} {:>5}  {:<18} {e}", r.tokens, r.heads, r.implementation),
                    None => println!(
                        "{:>6} {:>5}  {:<18} {:>10} {:>8} {:>12} {:>8} {:>7}",
                        r.tokens,
                        r.heads,
                        r.implementation,
                        fmt(r.fwd_ms, 2),
                        fmt_rate(r.fwd_tflops),
                        fmt(r.fwd_bwd_ms, 2),
                        fmt_rate(r.fwd_bwd_tflops),
                        match (ours, r.fwd_bwd_ms) {
                            (Some(o), Some(t)) => format!("{:.2}x", t / o),
                            _ => "-".into(),
                        }
                    ),
                }
            }
        }
    }
    Ok(())
}
