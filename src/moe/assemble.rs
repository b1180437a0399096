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
//! 3. The output goes through the one safetensors writer (`crate::write`): the header is
//!    planned first (hashes as zero placeholders of their final length; files that copy ≥ 64 MiB
//!    in source order with `padding.<k>` tensors that keep each copied run at its source offset
//!    modulo 64 KiB), then data streams straight from the maps into a temporary file
//!    (`copy_file_range` for plain copies, casts and LoRA merges computed in bounded batches)
//!    while the sha256 of every tensor is computed from the same bytes on the other cores;
//!    durable outputs start their writeback as they are written. The header is then rewritten in
//!    place with the real hashes and digest (same length), the file synced and renamed; the
//!    `<file>.sha256` sidecar is written last. Any error leaves nothing under the final name.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use super::format::{self, expert_prefix, lora_part, LoraPart, ModelInfo, MoeMeta, Provenance, TensorHash, PADDING, SHARED};
use super::manifest::Manifest;
use super::routing::{ExpertKind, Routing};
use crate::cast;
use crate::dtype::DType;
use crate::error::{clean, Error, Kind, Result};
use crate::lora::delta::{apply_lora_delta, Lora};
use crate::progress::Progress;
use crate::store::{Checkpoint, Encoding};
use crate::write::{self, Written};

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

/// Read `RUN_DIR/manifest.json` into assemble options (other fields at their defaults).
pub fn options_from_run(run: &Path) -> Result<(Options, Manifest)> {
    let m = Manifest::read(run)?;
    let rel = |s: &str| m.path_in(run, s);
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
    m.check_timesteps(&r)
}

/// Assemble a trainer run folder (`RUN_DIR/manifest.json`) into `output` with default options.
pub fn assemble_run(run: &Path, output: &Path, force: bool) -> Result<Report> {
    let (opts, m) = options_from_run(run)?;
    let opts = Options { force, ..opts };
    check_run_options(&m, &opts)?;
    assemble(&opts, output)
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

/// With the release twin the files name (a Wan2.1 T2V-14B file is recorded as such).
fn detect(ck: &Checkpoint) -> Option<crate::layout::Detection> {
    crate::pitfalls::detect(ck).ok()
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
    let wopts = write::Options {
        layout: write::Layout::PaddingTensors { prefix: PADDING },
        shard_size: opts.shard_size,
        sync: opts.sync,
        file_hash: if opts.sidecar { write::FileHash::AfterWriting } else { write::FileHash::None },
        tensor_hashes: true,
        index_metadata: vec![(format::KEY_FORMAT.to_string(), meta.tag().to_string())],
    };
    let mut metadata = |h: &write::Hashes| {
        for (name, hex) in h {
            if let Some(e) = meta.tensors.get_mut(name) {
                e.2 = hex.clone();
            }
        }
        meta.to_metadata()
    };
    let written =
        write::safetensors(output, writer_tensors(&cks, &out), write::Metadata::AfterHashes(&mut metadata), &wopts, &progress)?.commit()?;
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

/// The bytes of a cast or merged output tensor.
fn materialize(cks: &[Checkpoint], t: &OutT) -> Result<Vec<u8>> {
    let ctx = |e: Error| e.context(format!("tensor '{}'", clean(&t.name)));
    match &t.src {
        Src::Copy { ck, t: i } => {
            let e = &cks[*ck].tensors[*i];
            let bytes = cks[*ck].bytes(e);
            let from = dense(&cks[*ck], *i)?;
            if from == t.dtype {
                return Ok(bytes.to_vec());
            }
            let mut out = vec![0u8; size_of(t) as usize];
            cast::cast(from, bytes, t.dtype, &mut out, 1.0).map_err(ctx)?;
            cks[*ck].release(e);
            Ok(out)
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
            Ok(out)
        }
        Src::Const(bytes) => Ok(bytes.clone()),
    }
}

/// The output tensors as the writer takes them: plain copies straight from the maps (every
/// source file numbered in checkpoint order, the order large outputs keep), casts and LoRA
/// merges computed when the writer reaches them.
pub(crate) fn writer_tensors<'c>(cks: &'c [Checkpoint], tensors: &'c [OutT]) -> Vec<write::Tensor<'c>> {
    let mut first_file = Vec::with_capacity(cks.len());
    let mut n = 0;
    for ck in cks {
        first_file.push(n);
        n += ck.files.len();
    }
    tensors
        .iter()
        .map(|t| match &t.src {
            Src::Copy { ck, t: i } if dense(&cks[*ck], *i).ok() == Some(t.dtype) => {
                let e = &cks[*ck].tensors[*i];
                write::Tensor::mapped(
                    t.name.clone(),
                    t.dtype,
                    t.shape.clone(),
                    first_file[*ck] + e.file,
                    &cks[*ck].files[e.file],
                    e.offset,
                    e.len,
                )
            }
            _ => write::Tensor::computed(t.name.clone(), t.dtype, t.shape.clone(), move || materialize(cks, t)),
        })
        .collect()
}
