//! `phasekit convert`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use super::args::{parse_size, DTypeArg, LayoutArg};
use super::Printer;
use crate::convert::{self, DTypeChoice, Fp8Scale, OutFormat};
use crate::error::{Error, Result};
use crate::quant::GgmlType;

/// Arguments of `phasekit convert`.
#[derive(Args, Debug)]
pub struct ConvertArgs {
    pub input: PathBuf,
    pub out: PathBuf,
    /// Target key layout (default: keep the input's).
    #[arg(long, value_enum)]
    pub layout: Option<LayoutArg>,
    /// Dtype of floating-point tensors. fp8 applies to 2-D weights and writes a per-tensor scale.
    #[arg(long, value_enum, default_value = "keep")]
    pub dtype: DTypeArg,
    /// Output container (default: from OUT's extension).
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
    /// GGUF tensor type for quantizable weights (ComfyUI-GGUF rules: high-precision tensors stay F32).
    #[arg(long, ignore_case = true, value_parser = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])]
    pub quant: Option<String>,
    /// Split safetensors output into shards of at most this size (e.g. 5GB, 500MB, 2GiB).
    #[arg(long, value_name = "SIZE")]
    pub shard_size: Option<String>,
    /// How fp8 outputs store their scale.
    #[arg(long, value_enum, default_value = "comfy")]
    pub fp8_scale: Fp8ScaleArg,
    /// Prefix every name with `model.diffusion_model.` (ComfyUI full checkpoints).
    #[arg(long)]
    pub comfy_prefix: bool,
    /// Drop the input's safetensors __metadata__ (default: preserve it).
    #[arg(long)]
    pub drop_metadata: bool,
    /// Also write a `<file>.sha256` sidecar for every output file (hashed while writing).
    #[arg(long)]
    pub sha256: bool,
    /// Replace OUT if it exists.
    #[arg(long)]
    pub force: bool,
    /// Skip the fsync before the final rename (faster for scratch outputs; after a power
    /// loss the output may be incomplete).
    #[arg(long)]
    pub no_sync: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FormatArg {
    Safetensors,
    Gguf,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Fp8ScaleArg {
    Comfy,
    WeightScale,
    None,
}

/// The library options of a `convert` command line (the output policy is
/// [`convert::output_policy`]).
pub fn options(a: &ConvertArgs, quiet: bool) -> Result<convert::Options> {
    let quant =
        a.quant.as_deref().map(|q| GgmlType::parse(q).ok_or_else(|| Error::usage(format!("unknown GGUF type '{q}'")))).transpose()?;
    let format = a.format.map(|f| match f {
        FormatArg::Safetensors => OutFormat::Safetensors,
        FormatArg::Gguf => OutFormat::Gguf,
    });
    let dtype = a.dtype.dtype().map_or(DTypeChoice::Keep, DTypeChoice::To);
    let (format, dtype, quant) = convert::output_policy(&a.out, format, dtype, quant, a.shard_size.is_some())?;
    let shard_size = a.shard_size.as_deref().map(parse_size).transpose()?;
    Ok(convert::Options {
        layout: a.layout.map(LayoutArg::layout),
        dtype,
        format,
        quant,
        shard_size,
        fp8_scale: match a.fp8_scale {
            Fp8ScaleArg::Comfy => Fp8Scale::Comfy,
            Fp8ScaleArg::WeightScale => Fp8Scale::WeightScale,
            Fp8ScaleArg::None => Fp8Scale::None,
        },
        comfy_prefix: a.comfy_prefix,
        keep_metadata: !a.drop_metadata,
        sha256: a.sha256,
        force: a.force,
        quiet,
        sync: !a.no_sync,
    })
}

pub fn run(a: ConvertArgs, p: &Printer) -> Result<()> {
    let opts = options(&a, p.quiet())?;
    let r = convert::convert(&a.input, &a.out, &opts)?;
    p.report(&r, |o| {
        let fam = match (&r.family, &r.variant) {
            (Some(f), Some(v)) => format!(" [{f}, {v}]"),
            _ => String::new(),
        };
        let lay = match (r.from_layout, r.to_layout) {
            (Some(a), Some(b)) if a != b => format!(", {a:?} → {b:?} names").to_lowercase(),
            _ => String::new(),
        };
        writeln!(
            o,
            "converted {} → {}{fam}: {} tensors, {:.1} MB in {:.2} s ({:.0} MB/s){lay}",
            r.input.display(),
            r.output.display(),
            r.tensors,
            r.bytes_out as f64 / 1e6,
            r.seconds,
            r.bytes_out as f64 / 1e6 / r.seconds.max(1e-9)
        )?;
        for n in &r.notes {
            writeln!(o, "note: {n}")?;
        }
        Ok(())
    });
    Ok(())
}
