//! `phasekit assemble`: experts (full weights or LoRA, from a trainer run or from anywhere) →
//! one routed `phasekit.moe/1` checkpoint.
//!
//! 1. Every input is opened through the tensor store (mmap; safetensors, sharded folders,
//!    diffusers folders) and checked: same parameters and shapes across full experts (and the
//!    base), LoRA targets present in the base with fitting shapes, one model family.
//! 2. Tensors equal across experts are found by comparing their bytes in the map (same
//!    parameter, dtype and shape; differing tensors differ within their first bytes, so this
//!    costs almost nothing) and stored once: `shared.<param>` when every expert has it, else
//!    under the first expert's name plus an alias.
//! 3. The header is planned first (hashes as zero placeholders of their final length; files
//!    that copy ≥ 64 MiB in source order with `padding.<k>` tensors that keep each copied run
//!    at its source offset modulo 64 KiB), then data streams straight from the maps into a
//!    temporary file (`copy_file_range` for plain copies, casts and LoRA merges in bounded
//!    windows) while the sha256 of every tensor is computed from the same bytes on the other
//!    cores; durable outputs start their writeback as they are written (`crate::writeback`).
//!    The header is then rewritten in place
//!    with the real hashes and digest (same length), the file synced and renamed; the
//!    `<file>.sha256` sidecar is written last. Any error leaves nothing under the final name.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::format::{self, expert_prefix, lora_part, LoraPart, ModelInfo, MoeMeta, Provenance, TensorHash, MAX_PADDING, PADDING, SHARED};
use super::loader::{apply_lora_delta, Lora};
use super::routing::{ExpertKind, Routing};
use crate::atomic::AtomicFile;
use crate::cast;
use crate::convert::{shard_name, split_shards, Sink, Written};
use crate::dtype::DType;
use crate::error::{clean, Error, IoContext, Kind, Result};
use crate::progress::Progress;
use crate::store::{Checkpoint, Encoding};

/// One expert to assemble.
#[derive(Debug, Clone)]
pub struct ExpertInput {
    pub path: PathBuf,
    pub sigma_lo: f64,
    pub sigma_hi: f64,
    pub name: Option<String>,
    pub guidance: Option<f64>,
    /// Expected kind (from a manifest); `None` = detect from the tensor names.
    pub kind: Option<ExpertKind>,
    /// The base this LoRA expert applies to, when not [`Options::base`] (Wan2.2 A14B: the
    /// high-noise LoRA on the high-noise model, the low-noise LoRA on the low-noise model).
    pub base: Option<PathBuf>,
    /// α of the LoRA modules whose file states none (neither an `.alpha` tensor nor
    /// `__metadata__`): the trainer's configured `lora_alpha` (a LightX2V run's config.yaml).
    pub lora_alpha: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub experts: Vec<ExpertInput>,
    pub base: Option<PathBuf>,
    pub steps: u32,
    pub shift: f64,
    pub solver: String,
    pub guidance: f64,
    pub num_train_timesteps: f64,
    /// Cast floating-point tensors (LoRA `alpha` scalars stay as they are).
    pub dtype: Option<DType>,
    /// Bake LoRA experts into full experts (base + (alpha/rank)·up·down, in f32).
    pub merge_lora: bool,
    pub shard_size: Option<u64>,
    pub title: Option<String>,
    pub teacher_digests: Vec<String>,
    pub recipe_digest: Option<String>,
    pub sidecar: bool,
    /// fsync outputs before renaming them into place (default).
    pub sync: bool,
    pub force: bool,
    pub quiet: bool,
    /// The model description stored when the layout registry recognises no family (the toy's
    /// `toy-mlp` kind and config, from the run manifest).
    pub model: Option<ModelInfo>,
    /// Default latent size of `sample --moe`, stored as `phasekit.moe.sample`.
    pub latent: Option<[usize; 3]>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            experts: Vec::new(),
            base: None,
            steps: 4,
            shift: 1.0,
            solver: "euler".into(),
            guidance: 1.0,
            num_train_timesteps: 1000.0,
            dtype: None,
            merge_lora: false,
            shard_size: None,
            title: None,
            teacher_digests: Vec::new(),
            recipe_digest: None,
            sidecar: true,
            sync: true,
            force: false,
            quiet: true,
            model: None,
            latent: None,
        }
    }
}

/// What `assemble` did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub output: PathBuf,
    pub experts: usize,
    pub tensors: usize,
    /// Tensors stored once for all experts (`shared.`) and extra references (aliases).
    pub shared: usize,
    pub aliased: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub seconds: f64,
    pub digest: String,
    pub files: Vec<Written>,
    pub notes: Vec<String>,
}

/// The trainer's run manifest (`RUN_DIR/manifest.json`, schema `phasekit.run/1`, see
/// `docs/moe-format.md`). Paths are relative to the run folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub experts: Vec<ManifestExpert>,
    #[serde(default)]
    pub base: Option<String>,
    pub shift: f64,
    pub steps: u32,
    #[serde(default = "euler")]
    pub solver: String,
    #[serde(default = "one")]
    pub guidance: f64,
    #[serde(default = "thousand")]
    pub num_train_timesteps: f64,
    #[serde(default)]
    pub teacher_digests: Vec<String>,
    #[serde(default)]
    pub recipe_digest: Option<String>,
    #[serde(default)]
    pub title: Option<String>,
    /// Model description for models no layout family covers (the toy: `kind = "toy-mlp"`).
    #[serde(default)]
    pub model: Option<ModelInfo>,
    /// The latent size `[frames, height, width]` the run trained at (stored as
    /// `phasekit.moe.sample`, the default of `sample --moe`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latent: Option<[usize; 3]>,
}

fn euler() -> String {
    "euler".into()
}
fn one() -> f64 {
    1.0
}
fn thousand() -> f64 {
    1000.0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestExpert {
    pub path: String,
    pub sigma_lo: f64,
    pub sigma_hi: f64,
    /// Timesteps the trainer distilled this expert for; checked against the routing.
    #[serde(default)]
    pub timesteps: Option<Vec<f64>>,
    pub kind: ExpertKind,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub guidance: Option<f64>,
    /// The base this LoRA expert applies to, when not the manifest's `base`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
}

pub const MANIFEST_TAG: &str = "phasekit.run/1";

/// Read `RUN_DIR/manifest.json` into assemble options (other fields at their defaults).
pub fn options_from_run(run: &Path) -> Result<(Options, Manifest)> {
    let p = run.join("manifest.json");
    let text = std::fs::read(&p).with_file(&p)?;
    if text.len() > 16 << 20 {
        return Err(Error::limit(&p, "manifest larger than 16 MiB"));
    }
    let m: Manifest = serde_json::from_slice(&text).map_err(|e| Error::malformed(&p, format!("invalid manifest: {e}")))?;
    if m.format != MANIFEST_TAG {
        return Err(Error::at(Kind::Unsupported, &p, format!("manifest format '{}' is not {MANIFEST_TAG}", clean(&m.format))));
    }
    let rel = |s: &str| -> Result<PathBuf> {
        let q = Path::new(s);
        if s.is_empty() || q.is_absolute() || q.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            return Err(Error::malformed(&p, format!("path '{}' must be relative and inside the run folder", clean(s))));
        }
        Ok(run.join(q))
    };
    let experts = m
        .experts
        .iter()
        .map(|e| {
            Ok(ExpertInput {
                path: rel(&e.path)?,
                sigma_lo: e.sigma_lo,
                sigma_hi: e.sigma_hi,
                name: e.name.clone(),
                guidance: e.guidance,
                kind: Some(e.kind),
                base: e.base.as_deref().map(rel).transpose()?,
                lora_alpha: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let opts = Options {
        experts,
        base: m.base.as_deref().map(rel).transpose()?,
        steps: m.steps,
        shift: m.shift,
        solver: m.solver.clone(),
        guidance: m.guidance,
        num_train_timesteps: m.num_train_timesteps,
        teacher_digests: m.teacher_digests.clone(),
        recipe_digest: m.recipe_digest.clone(),
        title: m.title.clone(),
        model: m.model.clone(),
        latent: m.latent,
        ..Options::default()
    };
    Ok((opts, m))
}

/// Check a manifest's declared timesteps against the routing that `opts` (built from it, maybe
/// with overrides) gives.
pub fn check_run_options(m: &Manifest, opts: &Options) -> Result<()> {
    let names = opts
        .experts
        .iter()
        .enumerate()
        .map(|(i, e)| (e.name.clone().unwrap_or(format!("e{i}")), ExpertKind::Full, e.sigma_lo, e.sigma_hi, None))
        .collect();
    let r = Routing::new(names, opts.steps, opts.shift, &opts.solver, opts.guidance, opts.num_train_timesteps)?;
    check_manifest_timesteps(m, &r)
}

/// Assemble a trainer run folder (`RUN_DIR/manifest.json`) into `output` with default options.
pub fn assemble_run(run: &Path, output: &Path, force: bool) -> Result<Report> {
    let (opts, m) = options_from_run(run)?;
    let opts = Options { force, ..opts };
    check_run_options(&m, &opts)?;
    assemble(&opts, output)
}

/// Check a manifest's declared timesteps against the routing built from its ranges.
pub fn check_manifest_timesteps(m: &Manifest, r: &Routing) -> Result<()> {
    for (i, e) in m.experts.iter().enumerate() {
        if let Some(ts) = &e.timesteps {
            let have = &r.experts[i].timesteps;
            let same = ts.len() == have.len() && ts.iter().zip(have).all(|(a, b)| (a - b).abs() <= 1e-6 * r.num_train_timesteps);
            if !same {
                return Err(Error::new(
                    Kind::Inconsistent,
                    format!("manifest expert {i} lists timesteps {ts:?} but steps {} with shift {} route {have:?} to it", r.steps, r.shift),
                ));
            }
        }
    }
    Ok(())
}

/// How one output tensor's bytes are produced.
#[derive(Debug, Clone)]
pub(crate) enum Src {
    /// A tensor of `cks[ck]`, copied or cast.
    Copy { ck: usize, t: usize },
    /// Base weight + LoRA delta, in f32, encoded to the output dtype; `alpha` is the LoRA's α
    /// (`None`: α = rank).
    Merge { base: (usize, usize), ck: usize, down: usize, up: usize, alpha: Option<f32> },
    /// Bytes computed while planning (a LoRA α stored as an F32 scalar).
    Const(Vec<u8>),
}

#[derive(Debug, Clone)]
pub(crate) struct OutT {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub src: Src,
}

fn dense(ck: &Checkpoint, t: usize) -> Result<DType> {
    match ck.tensors[t].encoding {
        Encoding::Dense(d) => Ok(d),
        Encoding::Ggml(g) => Err(Error::at(
            Kind::Unsupported,
            &ck.path,
            format!("tensor '{}' is GGUF-quantized ({g}); convert the expert to safetensors first", clean(&ck.tensors[t].name)),
        )),
    }
}

fn out_dtype(src: DType, want: Option<DType>, name: &str) -> DType {
    match want {
        Some(d) if src.is_castable_float() && !name.ends_with(".alpha") && src != d => d,
        _ => src,
    }
}

/// A LoRA file's tensors by normalised name (`<param>.lora_down.weight`, ...).
fn lora_names(ck: &Checkpoint) -> Result<BTreeMap<String, usize>> {
    let mut out = BTreeMap::new();
    for (i, t) in ck.tensors.iter().enumerate() {
        let n = crate::lora::keys::strip_key_prefix(&t.name).1;
        let (p, part) = lora_part(n)
            .ok_or_else(|| Error::malformed(&ck.path, format!("'{}' is not a LoRA tensor (.lora_down/.lora_up/.alpha)", clean(&t.name))))?;
        let key = format!("{p}{}", part.suffix());
        if out.insert(key, i).is_some() {
            return Err(Error::inconsistent(
                &ck.path,
                format!("LoRA tensor for '{}' appears twice (with and without prefix, or lora_A and lora_down)", clean(p)),
            ));
        }
    }
    for k in out.keys() {
        if let Some((p, LoraPart::Down)) = lora_part(k) {
            if !out.contains_key(&format!("{p}.lora_up.weight")) {
                return Err(Error::inconsistent(&ck.path, format!("LoRA '{}' has lora_down but no lora_up", clean(p))));
            }
        }
        if let Some((p, LoraPart::Up)) = lora_part(k) {
            if !out.contains_key(&format!("{p}.lora_down.weight")) {
                return Err(Error::inconsistent(&ck.path, format!("LoRA '{}' has lora_up but no lora_down", clean(p))));
            }
        }
    }
    Ok(out)
}

fn kind_of(ck: &Checkpoint) -> Result<ExpertKind> {
    let n = ck.tensors.iter().filter(|t| lora_part(&t.name).is_some()).count();
    if ck.tensors.is_empty() {
        return Err(Error::malformed(&ck.path, "expert holds no tensors"));
    }
    match n {
        0 => Ok(ExpertKind::Full),
        n if n == ck.tensors.len() => Ok(ExpertKind::Lora),
        _ => Err(Error::malformed(&ck.path, format!("mixes {n} LoRA tensors with {} full weights", ck.tensors.len() - n))),
    }
}

fn detect(ck: &Checkpoint) -> Option<crate::layout::Detection> {
    crate::layout::Registry::builtin().detect(&ck.names_and_shapes(), ck.config.as_ref().map(|c| &c.json)).ok()
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Assemble the experts into `output`.
pub fn assemble(opts: &Options, output: &Path) -> Result<Report> {
    let start = Instant::now();
    crate::atomic::check_target(output, opts.force)?;
    if !output.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(".safetensors")) {
        return Err(Error::at(Kind::Usage, output, "the output must be named *.safetensors"));
    }
    if opts.experts.is_empty() {
        return Err(Error::usage("no experts given (use --expert PATH --sigma-range LO:HI, or --run RUN_DIR)"));
    }
    // Routing first: a bad table fails before any file is opened.
    let two = opts.experts.len() == 2;
    let mut cks = Vec::with_capacity(opts.experts.len() + 1);
    let mut kinds = Vec::new();
    for (i, e) in opts.experts.iter().enumerate() {
        let ck = Checkpoint::open(&e.path)?;
        let k = kind_of(&ck)?;
        if let Some(want) = e.kind {
            if want != k {
                return Err(Error::inconsistent(
                    &e.path,
                    format!("the manifest says expert {i} is {} but the file holds {} weights", want.as_str(), k.as_str()),
                ));
            }
        }
        kinds.push(k);
        cks.push(ck);
    }
    let stored_kinds: Vec<ExpertKind> = kinds.iter().map(|&k| if opts.merge_lora { ExpertKind::Full } else { k }).collect();
    let names: Vec<String> = opts
        .experts
        .iter()
        .enumerate()
        .map(|(i, e)| {
            e.name.clone().unwrap_or_else(|| {
                if two {
                    let hi = e.sigma_lo > opts.experts[1 - i].sigma_lo;
                    if hi { "high_noise" } else { "low_noise" }.to_string()
                } else {
                    format!("e{i}")
                }
            })
        })
        .collect();
    let routing = Routing::new(
        opts.experts.iter().zip(&names).zip(&stored_kinds).map(|((e, n), &k)| (n.clone(), k, e.sigma_lo, e.sigma_hi, e.guidance)).collect(),
        opts.steps,
        opts.shift,
        &opts.solver,
        opts.guidance,
        opts.num_train_timesteps,
    )?;
    let any_lora = kinds.contains(&ExpertKind::Lora);
    // The bases (opened once each, after the experts in `cks`): --base, then each expert's own.
    let mut base_paths: Vec<PathBuf> = Vec::new();
    let mut base_of: Vec<Option<usize>> = Vec::new();
    let same = |a: &Path, b: &Path| a == b || matches!((std::fs::canonicalize(a), std::fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y);
    for p in opts.base.iter().chain(opts.experts.iter().filter_map(|e| e.base.as_ref())) {
        if !base_paths.iter().any(|q| same(q, p)) {
            let ck = Checkpoint::open(p)?;
            if kind_of(&ck)? != ExpertKind::Full {
                return Err(Error::inconsistent(p, "a base must hold full weights, not a LoRA"));
            }
            cks.push(ck);
            base_paths.push(p.clone());
        }
    }
    for (e, k) in opts.experts.iter().zip(&kinds) {
        let p = e.base.as_ref().or(opts.base.as_ref());
        let b = p.map(|p| kinds.len() + base_paths.iter().position(|q| same(q, p)).expect("opened above"));
        if *k == ExpertKind::Lora && b.is_none() {
            return Err(Error::usage("LoRA experts need --base (the model they apply to)"));
        }
        base_of.push(b);
    }
    // Stored bases (LoRA experts kept as LoRA): in order of first use, `base.` then `bases.<j>.`.
    let mut stored_bases: Vec<usize> = Vec::new();
    if !opts.merge_lora {
        for (b, k) in base_of.iter().zip(&kinds) {
            if let (Some(b), ExpertKind::Lora) = (b, k) {
                if !stored_bases.contains(b) {
                    stored_bases.push(*b);
                }
            }
        }
    }
    let mut routing = routing;
    for (i, (b, k)) in base_of.iter().zip(&stored_kinds).enumerate() {
        if *k == ExpertKind::Lora {
            routing.experts[i].base = stored_bases.iter().position(|s| Some(*s) == *b).filter(|&j| j > 0);
        }
    }
    let mut notes = Vec::new();
    // Mistakes the files can reveal (`crate::pitfalls`): a Wan2.2 A14B expert on the wrong σ
    // range, one expert used twice or alone, fp8 scales missing, a LoRA over an fp8 base.
    for ck in &cks {
        crate::pitfalls::check_scaled_fp8(ck)?;
    }
    let served: Vec<crate::pitfalls::Served> = opts
        .experts
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let (ck, lora) = match (kinds[i], base_of[i]) {
                (ExpertKind::Lora, Some(b)) => (&cks[b], Some(&cks[i])),
                _ => (&cks[i], None),
            };
            crate::pitfalls::Served { name: &names[i], sigma_lo: e.sigma_lo, sigma_hi: e.sigma_hi, ck, lora }
        })
        .collect();
    notes.extend(crate::pitfalls::check_experts(&served)?);
    notes.extend(served.iter().filter_map(|s| s.lora.and_then(|l| crate::pitfalls::lora_on_fp8_base(l, s.ck))));
    drop(served);

    // Model family: every full model must be the same family and variant.
    let mut model = ModelInfo::default();
    let mut reference: Option<usize> = None;
    for (i, ck) in cks.iter().enumerate() {
        let full = if i < kinds.len() { kinds[i] == ExpertKind::Full } else { true };
        if !full {
            continue;
        }
        let d = detect(ck);
        match (&model.family, &d) {
            (None, Some(d)) if reference.is_none() => {
                model = ModelInfo {
                    family: Some(d.family.clone()),
                    variant: Some(d.variant.clone()),
                    layout: Some(d.layout.as_str().to_string()),
                    config: ck.config.as_ref().map(|c| c.json.clone()).or_else(|| Some(d.config.clone())),
                    kind: None,
                };
            }
            (Some(f), Some(d)) if *f != d.family || model.layout.as_deref() != Some(d.layout.as_str()) => {
                return Err(Error::inconsistent(
                    &ck.path,
                    format!(
                        "is a {} model in {} layout but {} is {} in {} layout",
                        d.family,
                        d.layout,
                        file_name(&cks[reference.unwrap_or(0)].path),
                        f,
                        model.layout.as_deref().unwrap_or("?")
                    ),
                ));
            }
            _ => {}
        }
        reference.get_or_insert(i);
    }
    match (&model.family, &opts.model) {
        (None, Some(m)) => model = m.clone(),
        (Some(f), Some(_)) => notes.push(format!("the manifest's model description was not used: the experts are {f}")),
        _ => {}
    }
    if model.family.is_none() && model.kind.is_none() {
        notes.push("model family not recognised: names are stored as given (diffusers and GGUF export need a known family)".into());
    }

    // Full experts (and the base) must have the same tensors with the same shapes.
    let shapes_of = |ck: &Checkpoint| -> BTreeMap<String, (Vec<u64>, usize)> {
        ck.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), (t.shape.clone(), i))).collect()
    };
    if let Some(r) = reference {
        let want = shapes_of(&cks[r]);
        for (i, ck) in cks.iter().enumerate() {
            let full = if i < kinds.len() { kinds[i] == ExpertKind::Full } else { true };
            if !full || i == r {
                continue;
            }
            let have = shapes_of(ck);
            let who = |j: usize| if j < kinds.len() { format!("expert {j}") } else { "the base".to_string() };
            for (n, (s, _)) in &want {
                match have.get(n) {
                    None => {
                        return Err(Error::inconsistent(&ck.path, format!("{} lacks tensor '{}' that {} has", who(i), clean(n), who(r))))
                    }
                    Some((s2, _)) if s2 != s => {
                        return Err(Error::inconsistent(
                            &ck.path,
                            format!("tensor '{}' has shape {s2:?} in {} but {s:?} in {}", clean(n), who(i), who(r)),
                        ))
                    }
                    _ => {}
                }
            }
            if let Some(n) = have.keys().find(|n| !want.contains_key(*n)) {
                return Err(Error::inconsistent(&ck.path, format!("{} has tensor '{}' that {} lacks", who(i), clean(n), who(r))));
            }
        }
    }

    // Each expert's logical tensors.
    let mut logical: Vec<BTreeMap<String, OutT>> = Vec::new();
    for (i, ck) in cks.iter().enumerate().take(kinds.len()) {
        let mut m = BTreeMap::new();
        match kinds[i] {
            ExpertKind::Full => {
                for (t, e) in ck.tensors.iter().enumerate() {
                    let d = dense(ck, t)?;
                    m.insert(
                        e.name.clone(),
                        OutT {
                            name: e.name.clone(),
                            dtype: out_dtype(d, opts.dtype, &e.name),
                            shape: e.shape.clone(),
                            src: Src::Copy { ck: i, t },
                        },
                    );
                }
            }
            ExpertKind::Lora => {
                let b = base_of[i].expect("checked above");
                let base = &cks[b];
                let lora = lora_names(ck)?;
                let base_names: HashMap<&str, usize> = base.tensors.iter().enumerate().map(|(j, t)| (t.name.as_str(), j)).collect();
                let mut targets = BTreeMap::new();
                for (k, &t) in &lora {
                    let (p, part) = lora_part(k).expect("normalised");
                    let w = format!("{p}.weight");
                    let Some(&bt) = base_names.get(w.as_str()) else {
                        return Err(Error::inconsistent(
                            &ck.path,
                            format!(
                                "LoRA '{}' targets '{}' which the base does not have (LoRA and base in different layouts?)",
                                clean(p),
                                clean(&w)
                            ),
                        ));
                    };
                    let bshape = &base.tensors[bt].shape;
                    let s = &ck.tensors[t].shape;
                    let ok = match part {
                        LoraPart::Down => s.len() >= 2 && bshape.len() >= 2 && s[1..] == bshape[1..],
                        LoraPart::Up => s.len() >= 2 && s[0] == bshape[0],
                        LoraPart::Alpha => crate::dtype::numel(s) == Some(1),
                    };
                    if !ok {
                        return Err(Error::inconsistent(
                            &ck.path,
                            format!(
                                "LoRA tensor '{}' has shape {s:?} which does not fit base weight '{}' of shape {bshape:?}",
                                clean(k),
                                clean(&w)
                            ),
                        ));
                    }
                    let e: &mut (Option<usize>, Option<usize>, Option<usize>, usize) =
                        targets.entry(p.to_string()).or_insert((None, None, None, bt));
                    match part {
                        LoraPart::Down => e.0 = Some(t),
                        LoraPart::Up => e.1 = Some(t),
                        LoraPart::Alpha => e.2 = Some(t),
                    }
                    let d = dense(ck, t)?;
                    m.insert(
                        k.clone(),
                        OutT { name: k.clone(), dtype: out_dtype(d, opts.dtype, k), shape: s.clone(), src: Src::Copy { ck: i, t } },
                    );
                }
                // α of each module, as an F32 scalar whatever the file stored (I64 in some
                // Lightning files), or from __metadata__ / the trainer's config when no tensor has it.
                let mut alphas: BTreeMap<String, f32> = BTreeMap::new();
                for (p, (_, _, a, _)) in &targets {
                    let value = match a {
                        Some(t) => {
                            let e = &ck.tensors[*t];
                            let v = crate::lora::keys::alpha_value(dense(ck, *t)?, ck.bytes(e)).ok_or_else(|| {
                                Error::malformed(&ck.path, format!("LoRA alpha '{}' is not one integer or float value", clean(&e.name)))
                            })?;
                            Some(v)
                        }
                        None => crate::lora::metadata_alpha(&ck.path, &ck.metadata, p)?.or(opts.experts[i].lora_alpha),
                    };
                    if let Some(v) = value {
                        alphas.insert(p.clone(), v as f32);
                        let k = format!("{p}{}", LoraPart::Alpha.suffix());
                        let shape = a.map(|t| ck.tensors[t].shape.clone()).unwrap_or_default();
                        let normalised = a.is_some_and(|t| dense(ck, t).ok() == Some(DType::F32));
                        if !normalised {
                            m.insert(
                                k.clone(),
                                OutT { name: k, dtype: DType::F32, shape, src: Src::Const((v as f32).to_le_bytes().to_vec()) },
                            );
                        }
                    }
                }
                for (p, (d, u, _, _)) in &targets {
                    if let (Some(d), Some(u)) = (d, u) {
                        if ck.tensors[*d].shape[0] != ck.tensors[*u].shape[1] {
                            return Err(Error::inconsistent(
                                &ck.path,
                                format!(
                                    "LoRA '{}': lora_down rank {} ≠ lora_up rank {}",
                                    clean(p),
                                    ck.tensors[*d].shape[0],
                                    ck.tensors[*u].shape[1]
                                ),
                            ));
                        }
                    }
                }
                if opts.merge_lora {
                    m.clear();
                    for (bt, e) in base.tensors.iter().enumerate() {
                        let d = dense(base, bt)?;
                        let p = e.name.strip_suffix(".weight");
                        let src = match p.and_then(|p| targets.get(p)) {
                            Some(&(Some(down), Some(up), _, _)) => {
                                let alpha = p.and_then(|p| alphas.get(p)).copied();
                                if !d.is_castable_float() {
                                    return Err(Error::at(
                                        Kind::Unsupported,
                                        &base.path,
                                        format!("cannot merge a LoRA into '{}' of {d}", clean(&e.name)),
                                    ));
                                }
                                Src::Merge { base: (b, bt), ck: i, down, up, alpha }
                            }
                            _ => Src::Copy { ck: b, t: bt },
                        };
                        m.insert(
                            e.name.clone(),
                            OutT { name: e.name.clone(), dtype: out_dtype(d, opts.dtype, &e.name), shape: e.shape.clone(), src },
                        );
                    }
                }
            }
        }
        logical.push(m);
    }

    // Dedup: per parameter, experts whose bytes are equal share one stored tensor.
    let n = logical.len();
    let mut params: Vec<&String> = logical.iter().flat_map(|m| m.keys()).collect();
    params.sort();
    params.dedup();
    let classes: Vec<Vec<Vec<usize>>> = params
        .par_iter()
        .map(|p| {
            let holders: Vec<usize> = (0..n).filter(|&i| logical[i].contains_key(*p)).collect();
            let mut classes: Vec<Vec<usize>> = Vec::new();
            for &i in &holders {
                let a = &logical[i][*p];
                match classes.iter_mut().find(|c| same_bytes(&cks, a, &logical[c[0]][*p])) {
                    Some(c) => c.push(i),
                    None => classes.push(vec![i]),
                }
            }
            classes
        })
        .collect();
    // Two experts whose every tensor is equal are one expert given twice.
    for i in 0..n {
        for j in i + 1..n {
            let same = logical[i].len() == logical[j].len()
                && params.iter().zip(&classes).all(|(p, cls)| {
                    logical[i].contains_key(*p) == logical[j].contains_key(*p)
                        && (!logical[i].contains_key(*p) || cls.iter().any(|c| c.contains(&i) && c.contains(&j)))
                });
            let same_base = base_of[i] == base_of[j] || kinds[i] == ExpertKind::Full;
            if same && same_base {
                return Err(Error::inconsistent(
                    &opts.experts[j].path,
                    format!(
                        "experts {} and {} hold identical weights{}: one expert given twice (each σ range needs its own expert)",
                        names[i],
                        names[j],
                        if kinds[i] == ExpertKind::Lora { " over the same base" } else { "" }
                    ),
                ));
            }
        }
    }
    let mut out: Vec<OutT> = Vec::new();
    let mut aliases = BTreeMap::new();
    let (mut shared, mut aliased) = (0, 0);
    for (p, cls) in params.iter().zip(classes) {
        for c in cls {
            let first = &logical[c[0]][*p];
            if c.len() == n && n > 1 {
                out.push(OutT { name: format!("{SHARED}{p}"), ..first.clone() });
                shared += 1;
            } else {
                out.push(OutT { name: format!("{}{p}", expert_prefix(c[0])), ..first.clone() });
                for &j in &c[1..] {
                    aliases.insert(format!("{}{p}", expert_prefix(j)), format!("{}{p}", expert_prefix(c[0])));
                    aliased += 1;
                }
            }
        }
    }
    for (j, &b) in stored_bases.iter().enumerate() {
        for (t, e) in cks[b].tensors.iter().enumerate() {
            let d = dense(&cks[b], t)?;
            out.push(OutT {
                name: format!("{}{}", format::base_prefix(j), e.name),
                dtype: out_dtype(d, opts.dtype, &e.name),
                shape: e.shape.clone(),
                src: Src::Copy { ck: b, t },
            });
        }
    }
    if !base_paths.is_empty() && !any_lora {
        notes.push("--base was used to check the full experts; it is not stored".into());
    }

    let title = opts.title.clone().unwrap_or_else(|| output.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default());
    let base_file = |b: usize| file_name(&base_paths[b - kinds.len()]);
    let provenance = Provenance {
        tool: format!("phasekit {}", env!("CARGO_PKG_VERSION")),
        teacher_digests: opts.teacher_digests.clone(),
        recipe_digest: opts.recipe_digest.clone(),
        sources: opts.experts.iter().map(|e| file_name(&e.path)).collect(),
        base_source: stored_bases.first().map(|&b| base_file(b)).or_else(|| base_paths.first().map(|p| file_name(p))),
        base_sources: if stored_bases.len() > 1 { stored_bases.iter().map(|&b| base_file(b)).collect() } else { Vec::new() },
    };
    let mut extra = format::modelspec(&routing, &model, &title, None, false);
    extra.extend(super::boundary::metadata(&routing));
    if let Some(l) = opts.latent {
        extra.push((format::KEY_SAMPLE.to_string(), serde_json::json!({ "latent": l }).to_string()));
    }
    let mut meta = MoeMeta {
        extra,
        routing,
        model,
        provenance,
        tensors: out.iter().map(|t| (t.name.clone(), TensorHash(t.dtype.as_str().to_string(), t.shape.clone(), "0".repeat(64)))).collect(),
        aliases,
        digest: String::new(),
    };
    let bytes_in: u64 = cks.iter().map(|c| c.data_bytes()).sum();
    let progress = if opts.quiet { Progress::hidden() } else { Progress::bytes(out.iter().map(size_of).sum(), "assemble", false) };
    let wo = WriteOpts { shard_size: opts.shard_size, sidecar: opts.sidecar, sync: opts.sync, pad: true };
    let (files, written, _hashes) = write_outputs(&cks, &out, output, wo, &progress, &mut |h| {
        for (name, hex) in h {
            if let Some(e) = meta.tensors.get_mut(name) {
                e.2 = hex.clone();
            }
        }
        meta.to_metadata()
    })?;
    commit(files, &written, opts.sidecar)?;
    progress.finish();
    let md = meta.to_metadata();
    Ok(Report {
        output: output.to_path_buf(),
        experts: n,
        tensors: out.len(),
        shared,
        aliased,
        bytes_in,
        bytes_out: written.iter().map(|w| w.bytes).sum(),
        seconds: start.elapsed().as_secs_f64(),
        digest: md.last().map(|(_, v)| v.clone()).unwrap_or_default(),
        files: written,
        notes,
    })
}

fn size_of(t: &OutT) -> u64 {
    crate::dtype::numel(&t.shape).and_then(|n| t.dtype.byte_size(n)).unwrap_or(0)
}

fn same_bytes(cks: &[Checkpoint], a: &OutT, b: &OutT) -> bool {
    match (&a.src, &b.src) {
        (Src::Copy { ck: c1, t: t1 }, Src::Copy { ck: c2, t: t2 }) => {
            let (e1, e2) = (&cks[*c1].tensors[*t1], &cks[*c2].tensors[*t2]);
            if a.dtype != b.dtype || a.shape != b.shape || e1.encoding != e2.encoding {
                return false;
            }
            if c1 == c2 && t1 == t2 {
                return true;
            }
            let eq = cks[*c1].bytes(e1) == cks[*c2].bytes(e2);
            cks[*c1].release(e1);
            cks[*c2].release(e2);
            eq
        }
        (Src::Merge { base: b1, ck: c1, down: d1, up: u1, alpha: a1 }, Src::Merge { base: b2, ck: c2, down: d2, up: u2, alpha: a2 }) => {
            let eqt = |x: (usize, usize), y: (usize, usize)| {
                x == y || cks[x.0].bytes(&cks[x.0].tensors[x.1]) == cks[y.0].bytes(&cks[y.0].tensors[y.1])
            };
            a.dtype == b.dtype && b1 == b2 && eqt((*c1, *d1), (*c2, *d2)) && eqt((*c1, *u1), (*c2, *u2)) && a1 == a2
        }
        (Src::Const(x), Src::Const(y)) => a.dtype == b.dtype && a.shape == b.shape && x == y,
        _ => false,
    }
}

/// The bytes of one output tensor: borrowed from the map when copied as is.
pub(crate) fn materialize<'a>(cks: &'a [Checkpoint], t: &OutT) -> Result<Cow<'a, [u8]>> {
    let ctx = |e: Error| e.context(format!("tensor '{}'", clean(&t.name)));
    match &t.src {
        Src::Copy { ck, t: i } => {
            let e = &cks[*ck].tensors[*i];
            let bytes = cks[*ck].bytes(e);
            let from = dense(&cks[*ck], *i)?;
            if from == t.dtype {
                return Ok(Cow::Borrowed(bytes));
            }
            let mut out = vec![0u8; size_of(t) as usize];
            cast::cast(from, bytes, t.dtype, &mut out, 1.0).map_err(ctx)?;
            Ok(Cow::Owned(out))
        }
        Src::Merge { base, ck, down, up, alpha } => {
            let b = &cks[base.0];
            let be = &b.tensors[base.1];
            let f32_of = |c: &Checkpoint, i: usize| -> Result<Vec<f32>> {
                let e = &c.tensors[i];
                super::loader::decode(&super::loader::RawTensor { name: &e.name, dtype: dense(c, i)?, shape: &e.shape, bytes: c.bytes(e) })
            };
            let mut w = f32_of(b, base.1)?;
            let c = &cks[*ck];
            let l = Lora::new(f32_of(c, *down)?, &c.tensors[*down].shape, f32_of(c, *up)?, &c.tensors[*up].shape, *alpha).map_err(ctx)?;
            apply_lora_delta(&mut w, &be.shape, &l).map_err(ctx)?;
            let mut out = vec![0u8; size_of(t) as usize];
            cast::encode_f32(t.dtype, &w, &mut out).map_err(ctx)?;
            Ok(Cow::Owned(out))
        }
        Src::Const(bytes) => Ok(Cow::Owned(bytes.clone())),
    }
}

/// Bytes of owned (cast or merged) data materialised per batch.
const BATCH_BYTES: u64 = 256 << 20;

type Hashes = HashMap<String, String>;

/// Write `tensors` as one safetensors file at `output`, or as shards with an index when they
/// exceed `shard_size`. `metadata` is called twice: with zero hashes to plan the header, then
/// with the real ones; both results must serialise to the same length.
/// How [`write_outputs`] writes: shard size, `.sha256` sidecars, fsync before the rename,
/// padding tensors for page-congruent copies.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WriteOpts {
    pub shard_size: Option<u64>,
    pub sidecar: bool,
    pub sync: bool,
    /// Lay large copies out at their source offset modulo 64 KiB, with `padding.<k>` tensors
    /// between runs from different places (MoE checkpoints only: exports stay plain).
    pub pad: bool,
}

/// One entry of a shard's data: a tensor of the output or a padding tensor of this many bytes.
#[derive(Debug, Clone, Copy)]
enum Item {
    T(usize),
    Pad(u64),
}

/// A shard's tensors in data order, as the header planner takes them, and the JSON padding
/// that brings the header to its planned length.
struct ShardLayout {
    items: Vec<Item>,
    planned: Vec<crate::safetensors::Planned>,
    json_pad: usize,
}

impl ShardLayout {
    fn header(&self, md: &[(String, String)]) -> Result<crate::safetensors::HeaderPlan> {
        let mut h = crate::safetensors::plan_in_order(self.planned.clone(), Some(md))?;
        if self.json_pad > 0 {
            h.pad_json(self.json_pad)?;
        }
        Ok(h)
    }
}

/// Where a tensor that goes to the kernel as a plain copy sits: (checkpoint, file, offset, length).
fn kernel_source(cks: &[Checkpoint], t: &OutT) -> Option<(usize, usize, u64, u64)> {
    match &t.src {
        Src::Copy { ck, t: ti } if dense(&cks[*ck], *ti).ok() == Some(t.dtype) => {
            let e = &cks[*ck].tensors[*ti];
            Some((*ck, e.file, e.offset, e.len))
        }
        _ => None,
    }
}

/// Plan the data order of one shard. Small outputs and `pad: false` keep the official writer's
/// order. Otherwise tensors that are computed (casts, merges) come first, then the plain
/// copies in source order, so that whole runs of a source file go to the kernel as one copy,
/// and a `padding.<k>` tensor before each run of at least 1 MiB puts it at its source offset
/// modulo 64 KiB. `copy_file_range` between offsets that disagree within a page measured about
/// 30 % slower, and the fsync of such a copy 30 % slower again (docs/performance.md).
fn layout_shard(cks: &[Checkpoint], tensors: &[OutT], s: &[usize], md0: &[(String, String)], pad: bool) -> Result<ShardLayout> {
    use crate::convert::{CONGRUENCE, CONGRUENT_MIN_BYTES, KERNEL_COPY_MIN};
    use crate::safetensors::Planned;
    let planned = |i: usize| Planned { name: tensors[i].name.clone(), dtype: tensors[i].dtype, shape: tensors[i].shape.clone() };
    let official = || -> Result<ShardLayout> {
        let h = crate::safetensors::plan(s.iter().map(|&i| planned(i)).collect(), Some(md0))?;
        let by_name: HashMap<&str, usize> = s.iter().map(|&i| (tensors[i].name.as_str(), i)).collect();
        let items = h.order.iter().map(|p| Item::T(by_name[p.name.as_str()])).collect();
        Ok(ShardLayout { items, planned: h.order, json_pad: 0 })
    };
    let copied: u64 = s.iter().filter_map(|&i| kernel_source(cks, &tensors[i])).map(|k| k.3).sum();
    if !pad || copied < CONGRUENT_MIN_BYTES {
        return official();
    }
    let (mut copies, computed): (Vec<usize>, Vec<usize>) = s.iter().partition(|&&i| kernel_source(cks, &tensors[i]).is_some());
    let src = |i: usize| kernel_source(cks, &tensors[i]).expect("a copy");
    copies.sort_by_key(|&i| {
        let (ck, file, offset, _) = src(i);
        (ck, file, offset)
    });
    let by_name: HashMap<&str, usize> = computed.iter().map(|&i| (tensors[i].name.as_str(), i)).collect();
    let mut items: Vec<Item> = crate::safetensors::plan(computed.iter().map(|&i| planned(i)).collect(), None)?
        .order
        .iter()
        .map(|p| Item::T(by_name[p.name.as_str()]))
        .collect();
    // Runs of copies that follow each other in one source file; a padding slot before each
    // run long enough to be copied by the kernel.
    let mut k = 0;
    while k < copies.len() {
        let (end, len) = crate::convert::source_run(k, |m| copies.get(m).map(|&i| src(i)).map(|(c, f, o, l)| ((c, f), o, l)));
        if len >= KERNEL_COPY_MIN {
            items.push(Item::Pad(MAX_PADDING));
        }
        items.extend(copies[k..end].iter().map(|&i| Item::T(i)));
        k = end;
    }
    let pad_name = |k: usize| format!("{PADDING}{k}");
    let plan_items = |items: &[Item]| -> Vec<Planned> {
        let mut pads = 0;
        items
            .iter()
            .map(|it| match *it {
                Item::T(i) => planned(i),
                Item::Pad(n) => {
                    pads += 1;
                    Planned { name: pad_name(pads - 1), dtype: DType::U8, shape: vec![n] }
                }
            })
            .collect()
    };
    // Every padding at its longest gives the longest header (every number has at least as
    // many digits); the real header is padded with spaces to that length, and the paddings
    // are sized for data that starts there.
    let longest = crate::safetensors::plan_in_order(plan_items(&items), Some(md0))?.bytes.len() as u64;
    let mut at = longest;
    let mut sized = Vec::with_capacity(items.len());
    for (n, it) in items.iter().enumerate() {
        match *it {
            Item::T(i) => {
                at += size_of(&tensors[i]);
                sized.push(Item::T(i));
            }
            Item::Pad(_) => {
                let Some(Item::T(first)) = items.get(n + 1) else { continue };
                let (_, _, offset, _) = src(*first);
                let want = (offset % CONGRUENCE + CONGRUENCE - at % CONGRUENCE) % CONGRUENCE;
                // The run lands exactly as aligned as in its source.
                if want > 0 {
                    at += want;
                    sized.push(Item::Pad(want));
                }
            }
        }
    }
    let planned_items = plan_items(&sized);
    let real = crate::safetensors::plan_in_order(planned_items.clone(), Some(md0))?.bytes.len() as u64;
    if real > longest {
        return Err(Error::internal(format!("padded header is {real} bytes, over its bound {longest}")));
    }
    Ok(ShardLayout { items: sized, planned: planned_items, json_pad: (longest - real) as usize })
}

pub(crate) fn write_outputs(
    cks: &[Checkpoint],
    tensors: &[OutT],
    output: &Path,
    wo: WriteOpts,
    progress: &Progress,
    metadata: &mut dyn FnMut(&Hashes) -> Vec<(String, String)>,
) -> Result<(Vec<AtomicFile>, Vec<Written>, Hashes)> {
    let WriteOpts { shard_size, sidecar, sync, pad } = wo;
    let sizes: Vec<u64> = tensors.iter().map(size_of).collect();
    let shards = match shard_size {
        Some(max) => split_shards(&sizes, max),
        None => vec![(0..tensors.len()).collect()],
    };
    let paths: Vec<PathBuf> = if shards.len() <= 1 {
        vec![output.to_path_buf()]
    } else {
        (0..shards.len()).map(|i| shard_name(output, i, shards.len())).collect()
    };
    let md0 = metadata(&HashMap::new());
    let mut hashes: Hashes = HashMap::new();
    let mut files = Vec::new();
    let mut layouts = Vec::new();
    let zeros = vec![0u8; MAX_PADDING as usize];
    for (s, path) in shards.iter().zip(&paths) {
        let layout = layout_shard(cks, tensors, s, &md0, pad)?;
        let header = layout.header(&md0)?;
        let mut f = AtomicFile::create(path)?;
        if !sync {
            f = f.without_sync();
        }
        let tmp = f.temp_path().to_path_buf();
        {
            let mut sink = Sink::new(f.file(), &tmp, false, progress).with_writeback(sync);
            sink.write(&header.bytes)?;
            let mut batch: Vec<usize> = Vec::new();
            let mut owned = 0u64;
            for it in &layout.items {
                let i = match *it {
                    Item::T(i) => i,
                    Item::Pad(n) => {
                        stream_batch(cks, tensors, &batch, &mut sink, &mut hashes)?;
                        batch.clear();
                        owned = 0;
                        sink.write(&zeros[..n as usize])?;
                        continue;
                    }
                };
                if kernel_source(cks, &tensors[i]).is_none() {
                    owned += sizes[i];
                }
                batch.push(i);
                if owned >= BATCH_BYTES || batch.len() >= 4096 {
                    stream_batch(cks, tensors, &batch, &mut sink, &mut hashes)?;
                    batch.clear();
                    owned = 0;
                }
            }
            stream_batch(cks, tensors, &batch, &mut sink, &mut hashes)?;
            sink.finish()?;
        }
        let len = f.file().metadata().with_file(&tmp)?.len();
        if len != header.file_len() {
            return Err(Error::internal(format!("wrote {len} bytes, planned {}", header.file_len())).with_path(path));
        }
        files.push(f);
        layouts.push((layout, header.bytes.len()));
    }
    // The real header, same length, over the placeholder.
    let md = metadata(&hashes);
    let mut written = Vec::new();
    for (path, (f, (layout, hlen))) in paths.iter().zip(files.iter_mut().zip(&layouts)) {
        let header = layout.header(&md)?;
        if header.bytes.len() != *hlen {
            return Err(Error::internal(format!("final header is {} bytes, planned {hlen}", header.bytes.len())).with_path(path));
        }
        let tmp = f.temp_path().to_path_buf();
        f.file().seek(SeekFrom::Start(0)).with_file(&tmp)?;
        f.file().write_all(&header.bytes).with_file(&tmp)?;
        f.file().flush().with_file(&tmp)?;
        written.push(Written { path: path.clone(), bytes: header.file_len(), sha256: None });
    }
    // The sidecar's whole-file hash reads the output back from the page cache while the
    // kernel writes it to disk: the fsync and the hash overlap instead of adding up.
    let handles: Vec<(std::fs::File, PathBuf)> = if sync {
        files
            .iter_mut()
            .map(|f| Ok((f.file().try_clone().with_file(f.temp_path())?, f.temp_path().to_path_buf())))
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    let digests = std::thread::scope(|s| -> Result<Vec<Result<String>>> {
        let syncing = s.spawn(move || -> Result<()> {
            for (h, p) in &handles {
                h.sync_all().with_file(p)?;
            }
            Ok(())
        });
        let digests =
            if sidecar { files.par_iter().map(|f| crate::hash::sha256_file(f.temp_path(), &|_| {})).collect() } else { Vec::new() };
        syncing.join().map_err(|_| Error::internal("fsync thread panicked"))??;
        Ok(digests)
    })?;
    for (w, d) in written.iter_mut().zip(digests) {
        w.sha256 = Some(d?);
    }
    if shards.len() > 1 {
        let mut weight_map = BTreeMap::new();
        for (s, p) in shards.iter().zip(&paths) {
            for &i in s {
                weight_map.insert(tensors[i].name.clone(), file_name(p));
            }
        }
        let mut meta = serde_json::Map::new();
        meta.insert("total_size".into(), sizes.iter().sum::<u64>().into());
        let tag = md0.iter().find(|(k, _)| k == format::KEY_FORMAT).map_or(format::FORMAT_TAG, |(_, v)| v.as_str());
        meta.insert(format::KEY_FORMAT.into(), tag.into());
        let index = serde_json::json!({ "metadata": meta, "weight_map": weight_map });
        let mut text = serde_json::to_string_pretty(&index).expect("json");
        text.push('\n');
        let ipath = PathBuf::from(format!("{}.index.json", output.display()));
        let mut f = AtomicFile::create(&ipath)?;
        f.write_all(text.as_bytes()).with_file(&ipath)?;
        files.push(f);
        written.push(Written { path: ipath, bytes: text.len() as u64, sha256: sidecar.then(|| crate::hash::sha256_hex(text.as_bytes())) });
    }
    Ok((files, written, hashes))
}

/// Write a batch of tensors in order while hashing the same bytes on the other cores.
///
/// One thread (this one) writes; `threads − 1` others hash tensors, taking the next unhashed
/// one from a shared counter, and the writer joins them once its copies are issued. The writer
/// gets a core of its own: with hashing on every core (the rayon pool) the kernel copy shared its
/// core with a hasher and took almost twice `cp`'s time on 2 cores (docs/performance.md).
fn stream_batch(cks: &[Checkpoint], tensors: &[OutT], batch: &[usize], sink: &mut Sink, hashes: &mut Hashes) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let bufs: Vec<Cow<[u8]>> = batch.par_iter().map(|&i| materialize(cks, &tensors[i])).collect::<Result<_>>()?;
    let digests: Vec<std::sync::OnceLock<String>> = bufs.iter().map(|_| std::sync::OnceLock::new()).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let hash_rest = || loop {
        let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(b) = bufs.get(k) else { break };
        let _ = digests[k].set(crate::hash::sha256_hex(b));
    };
    let hashers = rayon::current_num_threads().saturating_sub(1).clamp(1, bufs.len());
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..hashers).map(|_| s.spawn(hash_rest)).collect();
        // Plain copies that follow each other in one source file go to the kernel as one
        // copy_file_range (one call per tensor measured up to 30 % slower on ext4).
        // (Exactly the tensors `materialize` borrows from the map.)
        let copy_of = |k: usize| kernel_source(cks, &tensors[*batch.get(k)?]);
        let mut k = 0;
        let written = (|| -> Result<()> {
            while k < batch.len() {
                let Some((ck, file, offset, _)) = copy_of(k) else {
                    sink.write(&bufs[k])?;
                    k += 1;
                    continue;
                };
                let (end, len) = crate::convert::source_run(k, |m| copy_of(m).map(|(c, f, o, l)| ((c, f), o, l)));
                sink.copy_from(&cks[ck].files[file], offset, len)?;
                k = end;
            }
            Ok(())
        })();
        if written.is_err() {
            // Stop the hashers early: nothing they compute will be used.
            next.store(usize::MAX / 2, std::sync::atomic::Ordering::Relaxed);
        } else {
            hash_rest();
        }
        for w in workers {
            w.join().map_err(|_| Error::internal("hashing thread panicked"))?;
        }
        written
    })?;
    for (&i, d) in batch.iter().zip(digests) {
        // The writer hashed whatever the workers had not taken before joining them.
        hashes.insert(tensors[i].name.clone(), d.into_inner().expect("every tensor hashed"));
        if let Src::Copy { ck, t } = &tensors[i].src {
            cks[*ck].release(&cks[*ck].tensors[*t]);
        }
    }
    Ok(())
}

/// Rename every file into place, then write the sidecars.
pub(crate) fn commit(files: Vec<AtomicFile>, written: &[Written], sidecar: bool) -> Result<()> {
    for f in files {
        f.commit()?;
    }
    if sidecar {
        for w in written {
            if let Some(h) = &w.sha256 {
                crate::atomic::write_file(&crate::hash::sidecar_path(&w.path), crate::hash::sidecar_line(h, &w.path).as_bytes())?;
            }
        }
    }
    Ok(())
}
