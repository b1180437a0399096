//! Checkpoint-level LoRA files: read and write both key styles, merge into a base, extract
//! from two checkpoints, convert between styles (`docs/lora.md`).
//!
//! A [`LoraSet`] maps the canonical (diffusers) name of a base parameter, e.g.
//! `blocks.0.attn1.to_q.weight` (Wan2.2) or `transformer_blocks.0.attn.to_q.weight`
//! (Qwen-Image), to one [`LoraModule`]: `down [r, in]`, `up [out, r]` and α, so that the update
//! is `ΔW = (α / r) · up · down` (the shapes and scale of [`crate::model::lora::LoraAdapter`]).
//!
//! Two file styles:
//! - **kohya / Lightning**: `[diffusion_model.]<upstream name>.lora_down.weight`,
//!   `.lora_up.weight` and a scalar `.alpha`. Upstream names are the model's own module names
//!   (Wan: `blocks.0.self_attn.q`; Qwen-Image: the diffusers names, which ComfyUI uses too); the
//!   rename goes through the family's layout rules (`formats/*.toml`).
//! - **diffusers / PEFT**: `transformer.<diffusers name>.lora_A.weight` / `.lora_B.weight`. PEFT
//!   has no α tensor: α is written to `__metadata__` (`phasekit.lora.alpha`, a JSON object per
//!   module, and diffusers' `lora_adapter_metadata`) and read back from either; when neither has
//!   it, α = r (scale 1), which is what PEFT assumes when `lora_alpha` equals the rank.

pub mod cli;
pub mod delta;
mod extract;
pub mod keys;
mod merge;
pub mod svd;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::cast;
use crate::dtype::{self, DType};
use crate::error::{clean, Error, Kind, Result};
use crate::layout::{Family, Layout, Registry};
use crate::store::{Checkpoint, Encoding};
use crate::write;

pub use extract::{extract, ExtractOptions, ExtractReport};
pub use keys::{lora_part, LoraPart};
pub use merge::{merge, MergeOptions, MergeReport};

/// `__metadata__` key holding α per module (JSON object: module name without `.weight` → α).
pub const META_ALPHA: &str = "phasekit.lora.alpha";
/// diffusers' `__metadata__` key for the PEFT `LoraConfig` of each component.
pub const META_DIFFUSERS: &str = "lora_adapter_metadata";

/// A tensor held in memory: dtype, shape (torch order) and little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Raw {
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub data: Vec<u8>,
}

impl Raw {
    /// Encode f32 values as `dtype`.
    pub fn from_f32(values: &[f32], shape: Vec<u64>, dtype: DType) -> Result<Raw> {
        let size = dtype.size().ok_or_else(|| Error::unsupported(format!("cannot store LoRA tensors as {dtype}")))?;
        let mut data = vec![0u8; values.len() * size];
        cast::encode_f32(dtype, values, &mut data)?;
        Ok(Raw { dtype, shape, data })
    }
    /// Decode to f32.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        if !self.dtype.is_castable_float() {
            return Err(Error::unsupported(format!("LoRA tensor of {} is not a float tensor", self.dtype)));
        }
        let n = dtype::numel(&self.shape).unwrap_or(0) as usize;
        let mut out = vec![0f32; n];
        cast::decode_f32(self.dtype, &self.data, &mut out, 1.0)?;
        Ok(out)
    }
    pub fn numel(&self) -> usize {
        dtype::numel(&self.shape).unwrap_or(0) as usize
    }
}

/// One adapted parameter: `ΔW = (alpha / rank) · up · down`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraModule {
    /// `[r, in]` (`[r, in, k…]` for convolutions).
    pub down: Raw,
    /// `[out, r]` (`[out, r, 1…]` for convolutions).
    pub up: Raw,
    pub alpha: f64,
    /// Whether the file stated α (otherwise α = r was assumed).
    pub alpha_given: bool,
}

impl LoraModule {
    pub fn rank(&self) -> usize {
        self.down.shape.first().copied().unwrap_or(0) as usize
    }
    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank().max(1) as f64
    }
    /// `[out, in]` of the dense update (`in` is the product of down's trailing dims).
    pub fn dims(&self) -> (usize, usize) {
        let r = self.rank().max(1);
        (self.up.shape.first().copied().unwrap_or(0) as usize, self.down.numel() / r)
    }
    /// The dense update `(α/r) · up · down` in f32, row-major `[out, in]`.
    pub fn dense_f32(&self) -> Result<Vec<f32>> {
        let (out, inn) = self.dims();
        let mut w = vec![0f32; out * inn];
        let l = self.f32_pair(1.0)?;
        delta::apply_lora_delta(&mut w, &[out as u64, inn as u64], &l)?;
        Ok(w)
    }
    /// The pair in f32 with `strength · α / r` as scale, for [`delta::apply_lora_delta`].
    pub(crate) fn f32_pair(&self, strength: f64) -> Result<delta::Lora> {
        let mut l = delta::Lora::new(self.down.to_f32()?, &self.down.shape, self.up.to_f32()?, &self.up.shape, Some(self.alpha as f32))?;
        l.scale = (strength * self.scale()) as f32;
        Ok(l)
    }
    /// A candle adapter with these weights (2-D modules only).
    pub fn to_adapter(&self, device: &candle_core::Device) -> Result<crate::model::lora::LoraAdapter> {
        let (out, inn) = self.dims();
        let r = self.rank();
        let c = |e: candle_core::Error| Error::internal(format!("candle: {e}"));
        let down = candle_core::Tensor::from_vec(self.down.to_f32()?, (r, inn), device).map_err(c)?;
        let up = candle_core::Tensor::from_vec(self.up.to_f32()?, (out, r), device).map_err(c)?;
        crate::model::lora::LoraAdapter::from_tensors(&down, &up, self.alpha).map_err(c)
    }
    /// A module from a candle adapter, stored as `dtype`.
    pub fn from_adapter(a: &crate::model::lora::LoraAdapter, dtype: DType) -> Result<LoraModule> {
        let c = |e: candle_core::Error| Error::internal(format!("candle: {e}"));
        let get = |v: &candle_core::Var| -> Result<(Vec<u64>, Vec<f32>)> {
            let t = v.as_tensor();
            let shape = t.dims().iter().map(|&d| d as u64).collect();
            let vals = t.to_dtype(candle_core::DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>()).map_err(c)?;
            Ok((shape, vals))
        };
        let (ds, dv) = get(&a.down)?;
        let (us, uv) = get(&a.up)?;
        Ok(LoraModule { down: Raw::from_f32(&dv, ds, dtype)?, up: Raw::from_f32(&uv, us, dtype)?, alpha: a.alpha, alpha_given: true })
    }
}

/// The two key styles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Style {
    /// Lightning / kohya: `[diffusion_model.]<upstream name>.lora_down.weight`, `.lora_up.weight`, `.alpha`.
    Kohya,
    /// diffusers / PEFT: `transformer.<diffusers name>.lora_A.weight`, `.lora_B.weight`, α in `__metadata__`.
    Peft,
}

impl Style {
    pub fn as_str(self) -> &'static str {
        match self {
            Style::Kohya => "kohya",
            Style::Peft => "peft",
        }
    }
}

/// A LoRA: modules by canonical (diffusers) parameter name, with `.weight`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoraSet {
    /// Model family whose layout rules map the names (`wan22`, `qwen_image`), when known.
    pub family: Option<String>,
    pub modules: BTreeMap<String, LoraModule>,
}

/// What reading a file found out.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReadInfo {
    pub path: PathBuf,
    /// The style of the first module (files mixing suffixes are accepted).
    pub style: Style,
    /// Whether some modules used the other style's suffixes.
    pub mixed: bool,
    /// The key prefix of the first tensor (`diffusion_model.`, `transformer.`, or empty).
    pub prefix: String,
    pub family: Option<String>,
    /// Modules whose α was not stated (assumed equal to the rank).
    pub alpha_assumed: usize,
    pub metadata: Vec<(String, String)>,
}

/// Families with distinct upstream names first: their rules can reject a name, while a family
/// whose layouts share names accepts any name.
fn families_to_try(hint: Option<&str>) -> Result<Vec<&'static Family>> {
    let reg = Registry::builtin();
    if let Some(h) = hint {
        return Ok(vec![reg.require(h)?]);
    }
    let mut v: Vec<&Family> = reg.families().iter().collect();
    v.sort_by_key(|f| if renames(f) { 0 } else { 1 });
    Ok(v)
}

/// Whether the family's upstream names differ from its diffusers names.
fn renames(f: &Family) -> bool {
    match (f.names_layout(f.comfy_names_layout()), f.names_layout(Layout::Diffusers)) {
        (Ok(a), Ok(b)) => a != b,
        _ => false,
    }
}

/// Canonical (diffusers) name of `name` (with `.weight`) in family `f`, trying upstream names
/// first when `upstream_first` (kohya keys) and diffusers names first otherwise (PEFT keys).
fn canonical(f: &Family, name: &str, upstream_first: bool) -> Option<String> {
    if !renames(f) {
        return Some(name.to_string());
    }
    let up = f.comfy_names_layout();
    let from_up = || f.rename(up, Layout::Diffusers, name).ok();
    let as_diffusers = || f.rename(Layout::Diffusers, up, name).ok().map(|_| name.to_string());
    if upstream_first {
        from_up().or_else(as_diffusers)
    } else {
        as_diffusers().or_else(from_up)
    }
}

/// The upstream (kohya) name of a canonical name.
fn upstream_name(family: Option<&str>, canonical: &str) -> Result<String> {
    match family {
        Some(fam) => {
            let f = Registry::builtin().require(fam)?;
            f.rename(Layout::Diffusers, f.comfy_names_layout(), canonical)
        }
        None => Ok(canonical.to_string()),
    }
}

#[derive(Default)]
struct Parts {
    down: Option<Raw>,
    up: Option<Raw>,
    alpha: Option<f64>,
    style: Option<keys::SuffixStyle>,
}

fn scalar(path: &Path, key: &str, r: &Raw) -> Result<f64> {
    match keys::alpha_value(r.dtype, &r.data) {
        Some(v) if r.numel() == 1 => Ok(v),
        _ => Err(Error::malformed(path, format!("'{}' must be one integer or float value, found {} {:?}", clean(key), r.dtype, r.shape))),
    }
}

/// α per module from `__metadata__`: phasekit's exact map, else diffusers' LoraConfig.
pub(crate) fn metadata_alpha(path: &Path, md: &[(String, String)], module: &str) -> Result<Option<f64>> {
    let get = |k: &str| md.iter().find(|(m, _)| m == k).map(|(_, v)| v.as_str());
    if let Some(text) = get(META_ALPHA) {
        let v: Value =
            serde_json::from_str(text).map_err(|e| Error::malformed(path, format!("__metadata__ {META_ALPHA} is not JSON: {e}")))?;
        if let Some(a) = v.get(module).and_then(Value::as_f64) {
            return Ok(Some(a));
        }
    }
    if let Some(text) = get(META_DIFFUSERS) {
        let v: Value =
            serde_json::from_str(text).map_err(|e| Error::malformed(path, format!("__metadata__ {META_DIFFUSERS} is not JSON: {e}")))?;
        let field = |k: &str| v.get(format!("transformer.{k}")).or_else(|| v.get(k));
        if let Some(Value::Object(pat)) = field("alpha_pattern") {
            for (p, a) in pat {
                if (module == p || module.ends_with(&format!(".{p}"))) && a.is_number() {
                    return Ok(a.as_f64());
                }
            }
        }
        if let Some(a) = field("lora_alpha").and_then(Value::as_f64) {
            return Ok(Some(a));
        }
    }
    Ok(None)
}

/// Read a LoRA file (either style, any of the known prefixes). `family` forces the family
/// whose layout rules map the names; otherwise it is the first family that maps every key.
pub fn read(path: &Path, family: Option<&str>) -> Result<(LoraSet, ReadInfo)> {
    let ck = Checkpoint::open(path)?;
    let path = ck.path.clone();
    if ck.tensors.is_empty() {
        return Err(Error::malformed(&path, "holds no tensors"));
    }
    let mut prefix = None;
    let mut groups: BTreeMap<String, Parts> = BTreeMap::new();
    for t in &ck.tensors {
        let name = t.name.as_str();
        if name.starts_with("lora_unet_") || name.starts_with("lora_te") {
            return Err(Error::at(
                Kind::Unsupported,
                &path,
                format!(
                    "unsupported key style: kohya underscore names ('{}'); convert to dotted names (diffusion_model.<module>.lora_down.weight) first",
                    clean(name)
                ),
            ));
        }
        let (p, rest) = keys::strip_key_prefix(name);
        let Some((module, part, style)) = keys::lora_part_styled(rest) else {
            return Err(Error::at(
                Kind::Unsupported,
                &path,
                format!("unsupported key style: '{}' is not a LoRA tensor (.lora_down/.lora_up/.alpha or .lora_A/.lora_B)", clean(name)),
            ));
        };
        prefix.get_or_insert(p);
        let d = t
            .encoding
            .dense()
            .ok_or_else(|| Error::at(Kind::Unsupported, &path, format!("'{}' is quantized; LoRA tensors must be dense", clean(name))))?;
        let raw = Raw { dtype: d, shape: t.shape.clone(), data: ck.bytes(t).to_vec() };
        let g = groups.entry(module.to_string()).or_default();
        let dup = |what: &str| Error::inconsistent(&path, format!("LoRA module '{}' has two {what} tensors", clean(module)));
        match part {
            LoraPart::Down => {
                if g.down.replace(raw).is_some() {
                    return Err(dup("down"));
                }
                g.style = Some(style);
            }
            LoraPart::Up => {
                if g.up.replace(raw).is_some() {
                    return Err(dup("up"));
                }
                g.style = g.style.or(Some(style));
            }
            LoraPart::Alpha => {
                if g.alpha.replace(scalar(&path, name, &raw)?).is_some() {
                    return Err(dup("alpha"));
                }
            }
        }
    }
    // Names: the first family (or the one asked for) that maps every module.
    let mut chosen: Option<(&Family, Vec<String>)> = None;
    for f in families_to_try(family)? {
        let names: Option<Vec<String>> =
            groups.iter().map(|(m, g)| canonical(f, &format!("{m}.weight"), g.style != Some(keys::SuffixStyle::Peft))).collect();
        if let Some(n) = names {
            chosen = Some((f, n));
            break;
        }
    }
    if family.is_some() && chosen.is_none() {
        let f = families_to_try(family)?[0];
        let bad = groups.iter().find(|(m, g)| canonical(f, &format!("{m}.weight"), g.style != Some(keys::SuffixStyle::Peft)).is_none());
        return Err(Error::at(
            Kind::Unsupported,
            &path,
            format!("LoRA module '{}' is not a parameter of model family {}", clean(bad.map_or("?", |b| b.0)), f.name()),
        ));
    }
    let (fam_name, names) = match chosen {
        Some((f, n)) => (Some(f.name().to_string()), n),
        None => (None, groups.keys().map(|m| format!("{m}.weight")).collect()),
    };
    let mut set = LoraSet { family: fam_name.clone(), modules: BTreeMap::new() };
    let mut kohya = 0;
    let mut peft = 0;
    let mut first_style = None;
    let mut assumed = 0;
    for ((module, g), canon) in groups.into_iter().zip(names) {
        let (Some(down), Some(up)) = (g.down, g.up) else {
            return Err(Error::inconsistent(&path, format!("LoRA module '{}' lacks its {} tensor", clean(&module), "down or up")));
        };
        let r = down.shape.first().copied().unwrap_or(0);
        let up_ok = up.shape.len() >= 2 && up.shape[1] == r && up.shape[2..].iter().all(|&d| d == 1);
        if r == 0 || down.shape.len() < 2 || !up_ok {
            return Err(Error::inconsistent(
                &path,
                format!("LoRA module '{}': down {:?} and up {:?} do not share a rank", clean(&module), down.shape, up.shape),
            ));
        }
        match g.style {
            Some(keys::SuffixStyle::Peft) => peft += 1,
            _ => kohya += 1,
        }
        first_style.get_or_insert(g.style);
        let stem = canon.strip_suffix(".weight").unwrap_or(&canon).to_string();
        let (alpha, given) = match g.alpha {
            Some(a) => (a, true),
            None => match metadata_alpha(&path, &ck.metadata, &stem)? {
                Some(a) => (a, true),
                None => {
                    assumed += 1;
                    (r as f64, false)
                }
            },
        };
        if set.modules.insert(canon.clone(), LoraModule { down, up, alpha, alpha_given: given }).is_some() {
            return Err(Error::inconsistent(&path, format!("two LoRA modules map to the parameter '{}'", clean(&canon))));
        }
    }
    let style = match first_style.flatten() {
        Some(keys::SuffixStyle::Peft) => Style::Peft,
        _ => Style::Kohya,
    };
    let info = ReadInfo {
        path: path.clone(),
        style,
        mixed: kohya > 0 && peft > 0,
        prefix: prefix.unwrap_or("").to_string(),
        family: fam_name,
        alpha_assumed: assumed,
        metadata: ck.metadata.clone(),
    };
    Ok((set, info))
}

/// How to write a LoRA file.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    pub style: Style,
    /// kohya: put `diffusion_model.` before every key. (PEFT keys always start with `transformer.`.)
    pub prefix: bool,
    pub force: bool,
    /// fsync before the rename.
    pub sync: bool,
    /// Extra `__metadata__` entries (after `format`).
    pub metadata: Vec<(String, String)>,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions { style: Style::Kohya, prefix: false, force: false, sync: true, metadata: Vec::new() }
    }
}

/// Format α for JSON: integers stay integers (`16`, not `16.0`).
fn alpha_json(a: f64) -> Value {
    if a.fract() == 0.0 && a.abs() < 1e15 {
        Value::from(a as i64)
    } else {
        Value::from(a)
    }
}

/// Tensors (name, data), `__metadata__` and the α scalars (name, F32 bytes) of a file in `opts.style`.
type Encoded<'a> = (Vec<(String, &'a Raw)>, Vec<(String, String)>, Vec<(String, Vec<u8>)>);

/// The tensors and metadata of a LoRA file in `opts.style`.
pub fn encode<'a>(set: &'a LoraSet, opts: &WriteOptions) -> Result<Encoded<'a>> {
    let mut tensors: Vec<(String, &Raw)> = Vec::new();
    let mut alphas: Vec<(String, Vec<u8>)> = Vec::new();
    let mut md = vec![("format".to_string(), "pt".to_string())];
    match opts.style {
        Style::Kohya => {
            let p = if opts.prefix { "diffusion_model." } else { "" };
            for (canon, m) in &set.modules {
                let up = upstream_name(set.family.as_deref(), canon)?;
                let stem = up.strip_suffix(".weight").unwrap_or(&up);
                tensors.push((format!("{p}{stem}{}", LoraPart::Down.suffix()), &m.down));
                tensors.push((format!("{p}{stem}{}", LoraPart::Up.suffix()), &m.up));
                alphas.push((format!("{p}{stem}{}", LoraPart::Alpha.suffix()), (m.alpha as f32).to_le_bytes().to_vec()));
            }
        }
        Style::Peft => {
            let mut per = serde_json::Map::new();
            let mut counts: BTreeMap<(u64, String), usize> = BTreeMap::new();
            for (canon, m) in &set.modules {
                let stem = canon.strip_suffix(".weight").unwrap_or(canon);
                tensors.push((format!("transformer.{stem}.lora_A.weight"), &m.down));
                tensors.push((format!("transformer.{stem}.lora_B.weight"), &m.up));
                per.insert(stem.to_string(), alpha_json(m.alpha));
                *counts.entry((m.rank() as u64, m.alpha.to_string())).or_default() += 1;
            }
            // diffusers' LoraConfig: the most common (r, α), the others as patterns.
            let common = counts.iter().max_by_key(|(_, n)| **n).map(|(k, _)| k.clone());
            if let Some((r, a)) = common {
                let a: f64 = a.parse().unwrap_or(r as f64);
                let mut rank_pattern = serde_json::Map::new();
                let mut alpha_pattern = serde_json::Map::new();
                let mut targets = std::collections::BTreeSet::new();
                for (canon, m) in &set.modules {
                    let stem = canon.strip_suffix(".weight").unwrap_or(canon);
                    targets.insert(stem.to_string());
                    if m.rank() as u64 != r {
                        rank_pattern.insert(stem.to_string(), Value::from(m.rank()));
                    }
                    if m.alpha != a {
                        alpha_pattern.insert(stem.to_string(), alpha_json(m.alpha));
                    }
                }
                let cfg = serde_json::json!({
                    "transformer.r": r,
                    "transformer.lora_alpha": alpha_json(a),
                    "transformer.rank_pattern": rank_pattern,
                    "transformer.alpha_pattern": alpha_pattern,
                    "transformer.target_modules": targets.into_iter().collect::<Vec<_>>(),
                });
                md.push((META_DIFFUSERS.to_string(), serde_json::to_string(&cfg).expect("json")));
            }
            md.push((META_ALPHA.to_string(), serde_json::to_string(&Value::Object(per)).expect("json")));
        }
    }
    for (k, v) in &opts.metadata {
        if !md.iter().any(|(m, _)| m == k) {
            md.push((k.clone(), v.clone()));
        }
    }
    Ok((tensors, md, alphas))
}

/// Write `set` to `path` (a `.safetensors` file), atomically. Returns the bytes written.
pub fn write(set: &LoraSet, path: &Path, opts: &WriteOptions) -> Result<u64> {
    crate::atomic::check_target(path, opts.force)?;
    if set.modules.is_empty() {
        return Err(Error::at(Kind::Usage, path, "no LoRA modules to write"));
    }
    let (tensors, md, alphas) = encode(set, opts)?;
    let mut out: Vec<write::Tensor> = tensors
        .iter()
        .map(|(n, r)| write::Tensor::new(n.clone(), r.dtype, r.shape.clone(), write::Data::Bytes(r.data.as_slice().into())))
        .collect();
    out.extend(alphas.iter().map(|(n, b)| write::Tensor::new(n.clone(), DType::F32, vec![], write::Data::Bytes(b.as_slice().into()))));
    let wopts = write::Options { sync: opts.sync, ..write::Options::default() };
    let written =
        write::safetensors(path, out, write::Metadata::Fixed(Some(md)), &wopts, &crate::progress::Progress::hidden())?.commit()?;
    Ok(written.iter().map(|w| w.bytes).sum())
}

/// A summary of one LoRA file, for `phasekit lora inspect`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    #[serde(flatten)]
    pub info: ReadInfo,
    pub modules: usize,
    pub ranks: BTreeMap<usize, usize>,
    pub alphas: BTreeMap<String, usize>,
    pub dtypes: BTreeMap<String, usize>,
    pub parameters: u64,
    /// Canonical (diffusers) parameter names of the first modules.
    pub first: Vec<String>,
}

pub fn summarize(set: &LoraSet, info: ReadInfo) -> Summary {
    let mut ranks = BTreeMap::new();
    let mut alphas = BTreeMap::new();
    let mut dtypes = BTreeMap::new();
    let mut parameters = 0u64;
    for m in set.modules.values() {
        *ranks.entry(m.rank()).or_default() += 1;
        *alphas.entry(format!("{}", m.alpha)).or_default() += 1;
        *dtypes.entry(m.down.dtype.to_string()).or_default() += 1;
        parameters += (m.down.numel() + m.up.numel()) as u64;
    }
    Summary { info, modules: set.modules.len(), ranks, alphas, dtypes, parameters, first: set.modules.keys().take(8).cloned().collect() }
}

/// The encoding of a checkpoint tensor as a dense dtype, or `Kind::Unsupported`.
pub(crate) fn dense_of(ck: &Checkpoint, i: usize) -> Result<DType> {
    match ck.tensors[i].encoding {
        Encoding::Dense(d) => Ok(d),
        Encoding::Ggml(g) => Err(Error::at(
            Kind::Unsupported,
            &ck.path,
            format!("tensor '{}' is GGUF-quantized ({g}); convert it to safetensors first", clean(&ck.tensors[i].name)),
        )),
    }
}
