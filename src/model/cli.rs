//! `phasekit forward`: one forward pass of a teacher on saved inputs.
//!
//! Inputs use the reference conventions (`../shared/reference/README.md`): Wan `hidden_states
//! [B, C, F, H, W]`, `timestep [B]` or per-token `[B, S]` (0..1000, TI2V-5B's `expand_timesteps`
//! form), `encoder_hidden_states`; Qwen-Image packed
//! `hidden_states [B, S, C]`, `encoder_hidden_states`, optional `encoder_hidden_states_mask`,
//! `timestep [B]` (0..1) and `img_shapes` from `forward.json` beside the inputs or `--img-shapes`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::qwen::QwenImageTransformer;
use super::wan::WanTransformer;
use super::weights::Weights;
use crate::error::{clean, Error, Kind, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ComputeDtype {
    F32,
    Bf16,
    F16,
}

impl ComputeDtype {
    pub fn dtype(self) -> DType {
        match self {
            ComputeDtype::F32 => DType::F32,
            ComputeDtype::Bf16 => DType::BF16,
            ComputeDtype::F16 => DType::F16,
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct ForwardArgs {
    /// Model file or folder (safetensors, sharded, diffusers folder, GGUF; any layout).
    #[arg(long)]
    pub model: PathBuf,
    /// safetensors file with the input tensors (and optionally `output`, to compare against).
    #[arg(long)]
    pub inputs: PathBuf,
    /// Output safetensors file (tensor `output`, f32), written atomically.
    #[arg(long)]
    pub out: PathBuf,
    /// Compute dtype.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: ComputeDtype,
    /// Qwen-Image `img_shapes` as JSON, e.g. `[[1, 32, 32]]` (default: from forward.json).
    #[arg(long, value_name = "JSON")]
    pub img_shapes: Option<String>,
    /// Device: cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// What one forward pass did.
#[derive(Debug, Clone, Serialize)]
pub struct ForwardReport {
    pub model: PathBuf,
    pub family: String,
    pub variant: String,
    pub layout: String,
    pub dtype: String,
    pub device: String,
    pub output_shape: Vec<usize>,
    pub seconds: f64,
    /// Relative L2 error against the inputs' `output`, when present.
    pub rel_l2: Option<f64>,
}

fn load_inputs(path: &Path, dev: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, dev).map_err(|e| Error::malformed(path, clean(&e.to_string())))
}

fn need<'a>(m: &'a HashMap<String, Tensor>, name: &str, path: &Path) -> Result<&'a Tensor> {
    m.get(name).ok_or_else(|| Error::at(Kind::Inconsistent, path, format!("the inputs have no tensor `{name}`")))
}

/// `img_shapes` from JSON: `[[f, h, w], ...]` or `[f, h, w]` (the first image is used).
pub fn parse_img_shapes(v: &serde_json::Value) -> Result<[usize; 3]> {
    let first = match v.as_array() {
        Some(a) if a.first().is_some_and(|x| x.is_array()) => &a[0],
        _ => v,
    };
    let a = first
        .as_array()
        .filter(|a| a.len() == 3)
        .ok_or_else(|| Error::usage(format!("img_shapes should be [[frames, h, w]], found {v}")))?;
    let mut out = [0usize; 3];
    for (o, x) in out.iter_mut().zip(a) {
        *o = x.as_u64().ok_or_else(|| Error::usage(format!("img_shapes should hold integers, found {v}")))? as usize;
    }
    Ok(out)
}

fn img_shapes(a: &ForwardArgs) -> Result<[usize; 3]> {
    if let Some(s) = &a.img_shapes {
        let v: serde_json::Value = serde_json::from_str(s).map_err(|e| Error::usage(format!("--img-shapes is not JSON: {e}")))?;
        return parse_img_shapes(&v);
    }
    let j = a.inputs.parent().unwrap_or(Path::new(".")).join("forward.json");
    let text = std::fs::read_to_string(&j).map_err(|_| {
        Error::usage(format!("Qwen-Image needs img_shapes: pass --img-shapes or put forward.json beside {}", a.inputs.display()))
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::malformed(&j, format!("invalid JSON: {e}")))?;
    parse_img_shapes(v.get("img_shapes").ok_or_else(|| Error::at(Kind::Malformed, &j, "no `img_shapes`"))?)
}

/// Run the forward pass; returns the output (f32) and the report.
pub fn forward(a: &ForwardArgs) -> Result<(Tensor, ForwardReport)> {
    let start = Instant::now();
    let dev = crate::device::parse(&a.device)?;
    let w = Weights::open(&a.model, a.dtype.dtype(), &dev)?;
    let inputs = load_inputs(&a.inputs, &dev)?;
    let p = &a.inputs;
    // Inputs that do not fit the model (shapes, img_shapes) are the inputs' fault, not a bug.
    let bad = |e: candle_core::Error| Error::at(Kind::Inconsistent, p, format!("forward pass failed: {}", clean(&e.to_string())));
    let out = match w.family.as_str() {
        "wan22" => {
            let m = WanTransformer::load(&w)?;
            m.forward(need(&inputs, "hidden_states", p)?, need(&inputs, "timestep", p)?, need(&inputs, "encoder_hidden_states", p)?)
                .map_err(bad)?
        }
        "qwen_image" => {
            let shape = img_shapes(a)?;
            let m = QwenImageTransformer::load(&w)?;
            m.forward(
                need(&inputs, "hidden_states", p)?,
                need(&inputs, "encoder_hidden_states", p)?,
                inputs.get("encoder_hidden_states_mask"),
                need(&inputs, "timestep", p)?,
                shape,
            )
            .map_err(bad)?
        }
        f => return Err(Error::at(Kind::Unsupported, w.path(), format!("no forward pass for model family {f}"))),
    };
    let out = out.to_dtype(DType::F32).map_err(Error::from)?;
    let rel_l2 = match inputs.get("output") {
        Some(want) => Some(super::rel_l2(&out, want).map_err(Error::from)?),
        None => None,
    };
    let report = ForwardReport {
        model: a.model.clone(),
        family: w.family.clone(),
        variant: w.variant.clone(),
        layout: w.layout.to_string(),
        dtype: format!("{:?}", a.dtype.dtype()).to_lowercase(),
        device: crate::device::name(&dev),
        output_shape: out.dims().to_vec(),
        seconds: start.elapsed().as_secs_f64(),
        rel_l2,
    };
    Ok((out, report))
}

/// `t` as an f32 tensor of a safetensors file.
pub fn f32_tensor(name: &str, t: &Tensor) -> Result<crate::write::Tensor<'static>> {
    let vals = t.to_dtype(DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>()).map_err(Error::from)?;
    let shape = t.dims().iter().map(|&d| d as u64).collect();
    let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    Ok(crate::write::Tensor::new(name, crate::DType::F32, shape, crate::write::Data::Bytes(bytes.into())))
}

/// The `forward` command.
pub fn run(a: &ForwardArgs, p: &crate::cli::printer::Printer) -> Result<()> {
    let (out, r) = forward(a)?;
    crate::write::tensors(&a.out, vec![f32_tensor("output", &out)?], None)?;
    p.report(&r, |o| {
        let cmp = r.rel_l2.map(|e| format!(", relative L2 vs `output` {e:.3e}")).unwrap_or_default();
        writeln!(
            o,
            "{} [{} {}, {} layout] {} → {} {:?} in {:.2} s{cmp}",
            r.model.display(),
            r.family,
            r.variant,
            r.layout,
            r.dtype,
            a.out.display(),
            r.output_shape,
            r.seconds
        )
    });
    Ok(())
}
