//! `phasekit bench elementwise`: the fused element-wise ops ([`super::norm`], [`super::rope`],
//! [`super::gated`], [`super::gelu`]) checked against the unfused candle composition on this
//! device (`--check`), or timed against it.
//!
//! **Check.** For each op at the shapes the models use (a `[1, S, d]` residual stream, its
//! per-sample modulation and gate, q/k heads `[1, S, H, 128]` with Wan2.2's 3-D RoPE tables), in
//! f32, bf16 and f16: the op as the models run it ([`Impl::from_env`]; by default the kernels on
//! CUDA, the single-pass implementation on the CPU; `PHASEKIT_ELEMENTWISE=kernels` with
//! `PHASEKIT_KERNEL_EMULATOR` runs the kernels on the CPU through the emulator) on this device, against the composition on CPU copies
//! of the same values computed in f32 (the reference), by relative L2 of the output and of every
//! input's gradient for the loss `Σ y ∘ g` with random `g`. Bounds: 1e-5 f32, 2e-3 f16, 1e-2
//! bf16 (the largest of the op's dtypes); NaN never passes. This is the GPU correctness check of
//! `scripts/gpu-speed.sh`; `cargo test --test ops_elementwise` does the same on the CPU for both
//! fused implementations (the kernels through the emulator).
//!
//! **Speed.** Median time of the forward pass and of forward + backward (after a warm-up, with
//! the device synchronised around each run) of each op as the models run it and through the
//! composition, at `--tokens` × `--dim`, and the ratio (composed / fused).

use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;

use super::bench::median_ms;
use super::fused::Impl;
use super::{gated, gelu, norm, rope};
use crate::error::{Error, Result};

#[derive(clap::Args, Debug, Clone)]
pub struct ElementwiseArgs {
    /// Device: cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Dtype of the timings (the check runs f32, bf16 and f16 regardless).
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: crate::model::cli::ComputeDtype,
    /// Tokens of the timed tensors [default: 32760 on CUDA, 1024 on the CPU].
    #[arg(long)]
    pub tokens: Option<usize>,
    /// Model width of the timed tensors (Wan2.2 5120, Qwen-Image 3072; heads of 128).
    #[arg(long, default_value_t = 5120)]
    pub dim: usize,
    /// Timed runs per row (the median is kept), after one warm-up.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Run the correctness check instead of the timings (exit 1 if an op is off its bound).
    #[arg(long)]
    pub check: bool,
    /// Tokens of the check's tensors (width 256, two heads of 128).
    #[arg(long, default_value_t = 300)]
    pub check_tokens: usize,
}

/// One line of the check.
#[derive(Debug, Clone, Serialize)]
pub struct CheckLine {
    pub op: String,
    pub dtype: String,
    /// Relative L2 of the output, then of each input's gradient.
    pub errors: Vec<f64>,
    pub bound: f64,
    pub pass: bool,
}

/// One row of the timings.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub op: String,
    pub fused_fwd_ms: f64,
    pub composed_fwd_ms: f64,
    pub fused_fwd_bwd_ms: f64,
    pub composed_fwd_bwd_ms: f64,
    /// composed / fused, forward + backward.
    pub ratio: f64,
}

fn bound(dt: DType) -> f64 {
    match dt {
        DType::F32 | DType::F64 => 1e-5,
        DType::F16 => 2e-3,
        _ => 1e-2,
    }
}

fn rel(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let a = a.to_dtype(DType::F64)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f64>()?;
    let b = b.to_dtype(DType::F64)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f64>()?;
    if a.len() != b.len() || a.iter().any(|x| !x.is_finite()) {
        return Ok(f64::INFINITY);
    }
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    Ok((num / den.max(1e-30)).sqrt())
}

/// An op on its inputs, through an implementation.
type OpFn = Box<dyn Fn(&[Tensor], Impl) -> candle_core::Result<Tensor>>;

/// An op under test: its name, input shapes with their standard deviations and dtypes (given
/// the compute dtype), and the call.
struct Case {
    name: &'static str,
    inputs: Vec<(Vec<usize>, f32, f32, DTypeOf)>,
    call: OpFn,
}

/// An input's dtype: the compute dtype, or f32 (the models' residual stream and modulation).
#[derive(Clone, Copy)]
enum DTypeOf {
    Compute,
    F32,
}

fn cases(s: usize, d: usize, device: &Device) -> candle_core::Result<Vec<Case>> {
    let heads = (d / 128).max(1);
    let hd = d / heads;
    let tables = crate::model::rope::wan(hd, 1, 1, s, device)?;
    let (cos, sin) = (tables.cos, tables.sin);
    let mut v: Vec<Case> = vec![
        Case {
            name: "layernorm+modulation",
            inputs: vec![
                (vec![1, s, d], 1.0, 0.0, DTypeOf::Compute),
                (vec![1, 1, d], 0.3, 0.0, DTypeOf::F32),
                (vec![1, 1, d], 0.3, 0.0, DTypeOf::F32),
            ],
            call: Box::new(|t, imp| norm::norm_with(&t[0], &norm::Norm::layer(1e-6).modulate(&t[1], &t[2]), imp)),
        },
        Case {
            name: "rmsnorm q/k (heads)",
            inputs: vec![(vec![1, s, heads, hd], 1.0, 0.0, DTypeOf::Compute), (vec![hd], 0.2, 1.0, DTypeOf::Compute)],
            call: Box::new(|t, imp| norm::norm_with(&t[0], &norm::Norm::rms(1e-6).weight(Some(&t[1])), imp)),
        },
        Case {
            name: "layernorm affine",
            inputs: vec![
                (vec![1, s, d], 1.0, 0.0, DTypeOf::Compute),
                (vec![d], 0.2, 1.0, DTypeOf::Compute),
                (vec![d], 0.1, 0.0, DTypeOf::Compute),
            ],
            call: Box::new(|t, imp| norm::norm_with(&t[0], &norm::Norm::layer(1e-6).weight(Some(&t[1])).bias(Some(&t[2])), imp)),
        },
        Case {
            name: "gated residual",
            inputs: vec![
                (vec![1, s, d], 1.0, 0.0, DTypeOf::F32),
                (vec![1, s, d], 1.0, 0.0, DTypeOf::Compute),
                (vec![1, 1, d], 0.5, 0.0, DTypeOf::F32),
            ],
            call: Box::new(|t, imp| gated::gated_with(&t[0], &t[1], Some(&t[2]), imp)),
        },
        Case {
            name: "gelu-tanh",
            inputs: vec![(vec![1, s, d], 2.0, 0.0, DTypeOf::Compute)],
            call: Box::new(|t, imp| gelu::gelu_with(&t[0], imp)),
        },
    ];
    v.push(Case {
        name: "rope (wan 3-D)",
        inputs: vec![(vec![1, s, heads, hd], 1.0, 0.0, DTypeOf::Compute)],
        call: Box::new(move |t, imp| {
            let (c, sn) = (cos.to_device(t[0].device())?, sin.to_device(t[0].device())?);
            rope::rope_with(&t[0], &c, &sn, imp)
        }),
    });
    Ok(v)
}

/// Random inputs of `case` (seeded): normal with the case's standard deviation and mean (norm
/// weights centred on 1, as trained ones are).
fn inputs(case: &Case, dt: DType, device: &Device, seed: u64) -> candle_core::Result<Vec<Tensor>> {
    let mut rng = crate::rng::Rng::new(seed);
    case.inputs
        .iter()
        .map(|(shape, std, mean, of)| {
            let n: usize = shape.iter().product();
            let vals: Vec<f32> = rng.normals_f32(n).into_iter().map(|x| x * std + mean).collect();
            let t = Tensor::from_vec(vals, shape.as_slice(), device)?;
            t.to_dtype(match of {
                DTypeOf::Compute => dt,
                DTypeOf::F32 => DType::F32,
            })
        })
        .collect()
}

/// Output and gradients of `Σ f(inputs) ∘ g`.
fn fwd_bwd(case: &Case, ts: &[Tensor], g: &Tensor, imp: Impl) -> candle_core::Result<Vec<Tensor>> {
    let vars: Vec<Var> = ts.iter().map(Var::from_tensor).collect::<candle_core::Result<_>>()?;
    let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = (case.call)(&xs, imp)?;
    let wide = if y.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
    let grads = (y.to_dtype(wide)? * g.to_dtype(wide)?.to_device(y.device())?)?.sum_all()?.backward()?;
    let mut out = vec![y];
    for v in &vars {
        out.push(grads.get(v.as_tensor()).cloned().ok_or_else(|| candle_core::Error::Msg("elementwise check: missing gradient".into()))?);
    }
    Ok(out)
}

/// The correctness check on `device`.
pub fn check(device: &Device, tokens: usize) -> Result<Vec<CheckLine>> {
    let imp = Impl::from_env()?;
    let mut lines = Vec::new();
    for case in cases(tokens.max(1), 256, device)? {
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let ts = inputs(&case, dt, device, 7)?;
            let exact: Vec<Tensor> =
                ts.iter().map(|t| t.to_device(&Device::Cpu)?.to_dtype(DType::F32)).collect::<candle_core::Result<_>>()?;
            let probe = (case.call)(&exact, Impl::Composed)?;
            let g = Tensor::from_vec(crate::rng::Rng::new(11).normals_f32(probe.elem_count()), probe.dims(), &Device::Cpu)?;
            let want = fwd_bwd(&case, &exact, &g, Impl::Composed)?;
            let got = fwd_bwd(&case, &ts, &g, imp)?;
            let errors: Vec<f64> = got.iter().zip(&want).map(|(a, b)| rel(a, b)).collect::<candle_core::Result<_>>()?;
            let b = ts.iter().map(|t| bound(t.dtype())).fold(bound(got[0].dtype()), f64::max);
            let pass = errors.iter().all(|e| *e <= b);
            lines.push(CheckLine { op: case.name.into(), dtype: format!("{dt:?}").to_lowercase(), errors, bound: b, pass });
        }
    }
    Ok(lines)
}

/// The timings on `device`.
pub fn timings(device: &Device, dt: DType, tokens: usize, dim: usize, repeats: usize) -> Result<Vec<Row>> {
    let fused = Impl::from_env()?;
    let mut rows = Vec::new();
    for case in cases(tokens, dim, device)? {
        let ts = inputs(&case, dt, device, 3)?;
        let probe = (case.call)(&ts, Impl::Composed)?;
        let g = Tensor::ones(probe.dims(), DType::F32, device)?;
        let mut ms = [0.0; 4];
        for (k, imp) in [fused, Impl::Composed].into_iter().enumerate() {
            ms[k] = median_ms(device, repeats, || (case.call)(&ts, imp).map(|_| ()))?;
            ms[2 + k] = median_ms(device, repeats, || fwd_bwd(&case, &ts, &g, imp).map(|_| ()))?;
        }
        rows.push(Row {
            op: case.name.into(),
            fused_fwd_ms: ms[0],
            composed_fwd_ms: ms[1],
            fused_fwd_bwd_ms: ms[2],
            composed_fwd_bwd_ms: ms[3],
            ratio: ms[3] / ms[2].max(1e-9),
        });
    }
    Ok(rows)
}

pub fn run(a: &ElementwiseArgs, json: bool) -> Result<()> {
    let device = crate::device::parse(&a.device)?;
    if a.check {
        if a.check_tokens == 0 {
            return Err(Error::usage("--check-tokens must be positive"));
        }
        let lines = check(&device, a.check_tokens)?;
        let failed = lines.iter().filter(|l| !l.pass).count();
        if json {
            print_json(&lines)?;
        } else {
            println!(
                "element-wise check on {}: each fused op against the candle composition in f32 on CPU copies (rel L2: output, then each input's gradient)",
                crate::device::name(&device)
            );
            for l in &lines {
                let errs: Vec<String> = l.errors.iter().map(|e| format!("{e:.1e}")).collect();
                println!(
                    "{:<22} {:<5} {:<44} bound {:.0e}  {}",
                    l.op,
                    l.dtype,
                    errs.join(" "),
                    l.bound,
                    if l.pass { "ok" } else { "FAIL" }
                );
            }
        }
        if failed > 0 {
            return Err(Error::internal(format!("element-wise check: {failed} of {} lines beyond their bound", lines.len())));
        }
        return Ok(());
    }
    let tokens = a.tokens.unwrap_or(if device.is_cuda() { 32760 } else { 1024 });
    if tokens == 0 || a.dim == 0 || a.dim % 128 != 0 {
        return Err(Error::usage("--tokens must be positive and --dim a positive multiple of 128"));
    }
    let rows = timings(&device, a.dtype.dtype(), tokens, a.dim, a.repeats)?;
    if json {
        return print_json(&rows);
    }
    println!(
        "element-wise ops on {}, {} tokens x {}, {:?}: median ms (fused = what the models run, composed = the candle composition)",
        crate::device::name(&device),
        tokens,
        a.dim,
        a.dtype.dtype()
    );
    println!("{:<22} {:>10} {:>10} {:>12} {:>12} {:>7}", "op", "fused fwd", "comp fwd", "fused f+b", "comp f+b", "ratio");
    for r in &rows {
        println!(
            "{:<22} {:>10.3} {:>10.3} {:>12.3} {:>12.3} {:>6.2}x",
            r.op, r.fused_fwd_ms, r.composed_fwd_ms, r.fused_fwd_bwd_ms, r.composed_fwd_bwd_ms, r.ratio
        );
    }
    Ok(())
}

fn print_json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v).map_err(|e| Error::internal(e.to_string()))?);
    Ok(())
}
