//! Verification of a `phasekit.moe/1` checkpoint, called by `phasekit verify` when the
//! `__metadata__` carries the format tag.
//!
//! In order: the metadata digest (any edit of routing, config, provenance, hashes or ModelSpec
//! keys), the schema and routing rules, the tensor table against the header (names, dtypes,
//! shapes), aliases and each expert's completeness, every shard's metadata equal to the first's,
//! then the sha256 of every tensor recomputed from the map on all cores. Every problem is
//! reported, not only the first.

use std::collections::BTreeSet;
use std::path::Path;

use rayon::prelude::*;
use serde::Serialize;

use super::format::{base_prefix, expert_prefix, lora_part, MoeMeta, BASE, KEY_DIGEST, KEY_FORMAT, MAX_PADDING, PADDING};
use super::routing::ExpertKind;
use crate::error::{clean, Kind, Result};
use crate::store::{Checkpoint, Encoding};

/// A tensor whose bytes do not hash to the recorded value.
#[derive(Debug, Clone, Serialize)]
pub struct Mismatch {
    pub tensor: String,
    pub expected: String,
    pub found: String,
}

/// A structural or metadata fault.
#[derive(Debug, Clone, Serialize)]
pub struct Fault {
    pub kind: &'static str,
    pub message: String,
    #[serde(skip)]
    pub class: Kind,
}

#[derive(Debug, Clone, Serialize)]
pub struct MoeReport {
    pub ok: bool,
    pub format: String,
    pub experts: usize,
    pub tensors_checked: usize,
    pub bytes_hashed: u64,
    pub digest_expected: Option<String>,
    pub digest_found: String,
    pub mismatches: Vec<Mismatch>,
    pub faults: Vec<Fault>,
}

impl MoeReport {
    /// The exit class of the first problem (integrity before structure).
    pub fn failure(&self) -> Option<Kind> {
        self.faults.first().map(|f| f.class).or((!self.mismatches.is_empty()).then_some(Kind::Integrity))
    }
}

/// Whether a checkpoint's metadata says it is a MoE checkpoint: any `phasekit.moe.*` key, so
/// that damage to the format tag's own key is reported rather than taken for a plain file.
pub fn is_moe(ck: &Checkpoint) -> bool {
    ck.metadata.iter().any(|(k, _)| k == KEY_FORMAT || k.starts_with("phasekit.moe."))
}

/// Verify an opened checkpoint (structure already validated by [`Checkpoint::open`]).
pub fn verify_checkpoint(ck: &Checkpoint) -> MoeReport {
    let mut faults = Vec::new();
    let mut fault = |class: Kind, message: String| faults.push(Fault { kind: class.as_str(), message, class });
    let found = super::digest::metadata_digest(&ck.metadata);
    let expected = ck.metadata.iter().find(|(k, _)| k == KEY_DIGEST).map(|(_, v)| v.clone());
    match &expected {
        Some(e) if *e == found => {}
        Some(e) => fault(
            Kind::Integrity,
            format!("metadata digest mismatch: expected {} found {found} (routing, config, hashes or other metadata edited)", clean(e)),
        ),
        None => fault(Kind::Integrity, format!("__metadata__ lacks {KEY_DIGEST}")),
    }
    let format = ck.metadata.iter().find(|(k, _)| k == KEY_FORMAT).map(|(_, v)| clean(v)).unwrap_or_default();
    // Every shard carries the same metadata.
    for f in ck.files.iter().skip(1) {
        match crate::safetensors::parse(&f.path, f.bytes()) {
            Ok(h) if h.metadata.as_deref() == Some(&ck.metadata[..]) => {}
            Ok(_) => fault(Kind::Integrity, format!("shard {} has different __metadata__ than the first shard", f.path.display())),
            Err(e) => fault(e.kind(), e.to_string()),
        }
    }
    let meta = match MoeMeta::from_metadata(&ck.metadata) {
        Ok(m) => Some(m),
        Err(e) => {
            fault(e.kind(), e.message().to_string());
            None
        }
    };
    let mut mismatches = Vec::new();
    let (mut checked, mut bytes) = (0, 0);
    // The switch points, when recorded, must be the routing table's (`moe::boundary`).
    if let (Some(m), Some((_, b))) = (&meta, ck.metadata.iter().find(|(k, _)| k == super::boundary::KEY_BOUNDARIES)) {
        if let Err(e) = super::boundary::check(&m.routing, b) {
            fault(e.kind(), e.message().to_string());
        }
    }
    if let Some(meta) = &meta {
        // Table vs header.
        let mut in_header = BTreeSet::new();
        let mut work = Vec::new();
        for t in &ck.tensors {
            if t.name.starts_with(PADDING) {
                // Padding: U8 zeros below 64 KiB, not in the hash table (docs/moe-format.md §2).
                let ok = t.encoding == Encoding::Dense(crate::dtype::DType::U8)
                    && t.shape.len() == 1
                    && t.len <= MAX_PADDING
                    && !meta.tensors.contains_key(&t.name)
                    && ck.bytes(t).iter().all(|&b| b == 0);
                if !ok {
                    fault(
                        Kind::Integrity,
                        format!("padding tensor '{}' is not {} bytes or fewer of U8 zeros", clean(&t.name), MAX_PADDING),
                    );
                }
                continue;
            }
            in_header.insert(t.name.as_str());
            let dt = match t.encoding {
                Encoding::Dense(d) => d.as_str().to_string(),
                Encoding::Ggml(g) => g.to_string(),
            };
            match meta.tensors.get(&t.name) {
                None => fault(Kind::Integrity, format!("tensor '{}' is not in the hash table", clean(&t.name))),
                Some(h) if h.0 != dt || h.1 != t.shape => fault(
                    Kind::Integrity,
                    format!(
                        "tensor '{}': header says {dt} {:?} but the hash table says {} {:?}",
                        clean(&t.name),
                        t.shape,
                        clean(&h.0),
                        h.1
                    ),
                ),
                Some(h) => work.push((t, h.2.clone())),
            }
        }
        for name in meta.tensors.keys() {
            if !in_header.contains(name.as_str()) {
                fault(Kind::Inconsistent, format!("tensor '{}' is in the hash table but missing from the file", clean(name)));
            }
        }
        let n = meta.routing.experts.len();
        for (logical, stored) in &meta.aliases {
            let valid = (0..n).any(|i| logical.starts_with(&expert_prefix(i)));
            if !valid || !meta.tensors.contains_key(stored) {
                fault(Kind::Inconsistent, format!("alias '{}' → '{}' does not resolve", clean(logical), clean(stored)));
            }
        }
        let bases: Vec<String> = meta.routing.experts.iter().filter_map(|e| e.base).map(base_prefix).collect();
        for name in meta.tensors.keys() {
            let known = name.starts_with(super::format::SHARED)
                || name.starts_with(BASE)
                || bases.iter().any(|b| name.starts_with(b.as_str()))
                || (0..n).any(|i| name.starts_with(&expert_prefix(i)));
            if !known {
                fault(
                    Kind::Inconsistent,
                    format!("tensor '{}' belongs to no expert (expected experts.<i>., shared., base. or a routed bases.<j>.)", clean(name)),
                );
            }
        }
        // Completeness: full experts share one parameter set; LoRA targets exist in their base.
        let mut full_ref: Option<(usize, BTreeSet<String>)> = None;
        for (i, e) in meta.routing.experts.iter().enumerate() {
            let params = meta.expert_tensors(i);
            if params.is_empty() {
                fault(Kind::Inconsistent, format!("expert {i} ({}) has no tensors", e.name));
                continue;
            }
            match e.kind {
                ExpertKind::Full => {
                    let set: BTreeSet<String> = params.into_keys().collect();
                    match &full_ref {
                        None => full_ref = Some((i, set)),
                        Some((j, r)) => {
                            if let Some(p) = r.symmetric_difference(&set).next() {
                                fault(
                                    Kind::Inconsistent,
                                    format!("experts {j} and {i} differ in parameter '{}' (missing tensor)", clean(p)),
                                );
                            }
                        }
                    }
                }
                ExpertKind::Lora => {
                    let base = meta.expert_base_tensors(i);
                    for p in params.keys() {
                        match lora_part(p) {
                            Some((target, _)) if base.contains_key(&format!("{target}.weight")) => {}
                            Some((target, _)) => {
                                fault(Kind::Inconsistent, format!("expert {i}: LoRA target '{}.weight' is not in the base", clean(target)))
                            }
                            None => {
                                fault(Kind::Inconsistent, format!("expert {i} is a LoRA expert but '{}' is not a LoRA tensor", clean(p)))
                            }
                        }
                    }
                }
            }
        }
        // Hashes, all cores, biggest first so one large tensor does not finish last.
        work.sort_by_key(|(t, _)| std::cmp::Reverse(t.len));
        let found: Vec<Option<Mismatch>> = work
            .par_iter()
            .map(|(t, want)| {
                let got = crate::hash::sha256_hex(ck.bytes(t));
                ck.release(t);
                (got != *want).then(|| Mismatch { tensor: clean(&t.name), expected: clean(want), found: got })
            })
            .collect();
        checked = work.len();
        bytes = work.iter().map(|(t, _)| t.len).sum();
        mismatches = found.into_iter().flatten().collect();
        mismatches.sort_by(|a, b| a.tensor.cmp(&b.tensor));
    }
    MoeReport {
        ok: faults.is_empty() && mismatches.is_empty(),
        format,
        experts: meta.as_ref().map_or(0, |m| m.routing.experts.len()),
        tensors_checked: checked,
        bytes_hashed: bytes,
        digest_expected: expected.map(|e| clean(&e)),
        digest_found: found,
        mismatches,
        faults,
    }
}

/// Open and verify a MoE checkpoint at `path`.
pub fn verify_path(path: &Path) -> Result<MoeReport> {
    let ck = Checkpoint::open(path)?;
    Ok(verify_checkpoint(&ck))
}
