//! Detecting family, layout, prefix and variant from tensor names and shapes.
//!
//! 1. **Prefix.** For each family, the empty prefix and each of its `prefixes` that *every*
//!    tensor name starts with are tried.
//! 2. **Names.** For each layout that owns its names, all of its `markers` must be present
//!    (after the prefix). Among the candidates that pass, the one under which most tensor names
//!    are known to the family's tensor table wins; a config.json `_class_name` of the family
//!    breaks ties, then rule-file order.
//! 3. **Layout.** Layouts that share those names (Wan original/comfy, Qwen diffusers/comfy) are
//!    told apart by the prefix: the layout that lists the prefix found, else the name owner.
//! 4. **Shapes.** The tensor table is solved for the family's quantities; config.json values
//!    must agree with them; the first known variant whose values match supplies what shapes
//!    cannot (heads); lookups and defaults fill the rest (see `docs/layouts.md`).

use super::family::{Family, FieldQ};
use super::{Layout, Registry};
use crate::error::{clean, Error, Kind, Result};
use serde_json::Value;
use std::collections::HashSet;

/// What [`Registry::detect`] found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Detection {
    /// Family name (`wan22`, `qwen_image`).
    pub family: String,
    /// A known variant ("T2V-A14B expert", "I2V-A14B expert", "TI2V-5B", "Qwen-Image") or
    /// the family's custom template ("custom (dim 32, 2 layers)").
    pub variant: String,
    pub layout: Layout,
    /// The prefix every tensor name carries (`model.diffusion_model.`), or "".
    pub prefix: String,
    /// The config in the detected layout's dialect: from shapes, config.json, the known variant
    /// and defaults. Values nothing determines are null (see `notes`).
    pub config: Value,
    pub num_layers: usize,
    /// Number of elements over all tensors given.
    pub params: u64,
    /// Tensors the family expects for this config that are absent (layout names, no prefix).
    pub missing: Vec<String>,
    /// Tensors given (without prefix) that the family's tensor table does not know.
    pub unmatched: Vec<String>,
    /// Where values came from when not from shapes, and what stayed unknown.
    pub notes: Vec<String>,
}

struct Candidate<'a> {
    family: &'a Family,
    names: Layout,
    prefix: &'a str,
    known: usize,
    class_match: bool,
}

struct Near {
    score: (usize, usize),
    text: String,
}

pub(crate) fn detect(reg: &Registry, tensors: &[(&str, &[u64])], config: Option<&Value>) -> Result<Detection> {
    let cfg = match config {
        None => None,
        Some(Value::Object(o)) => Some(o),
        Some(_) => return Err(Error::new(Kind::Malformed, "config.json is not a JSON object")),
    };
    let class = cfg.and_then(|o| o.get("_class_name")).and_then(Value::as_str);
    let family_of_class = |f: &Family| class.is_some_and(|c| f.dialects.values().any(|d| d.class_name.as_deref() == Some(c)));
    if tensors.is_empty() {
        return Err(Error::unsupported("unknown model family: there are no tensors"));
    }

    let mut best: Option<Candidate> = None;
    let mut near: Option<Near> = None;
    for fam in reg.families() {
        let class_match = family_of_class(fam);
        let prefixes =
            std::iter::once("").chain(fam.prefixes.iter().map(String::as_str).filter(|p| tensors.iter().all(|(n, _)| n.starts_with(p))));
        for prefix in prefixes {
            let names: HashSet<&str> = tensors.iter().map(|(n, _)| &n[prefix.len()..]).collect();
            for info in fam.info.iter().filter(|i| i.names == i.layout) {
                let found = info.markers.iter().filter(|m| names.contains(m.as_str())).count();
                let known =
                    names.iter().filter(|n| fam.to_canonical(info.layout, n).is_some_and(|c| fam.match_tensor(&c).is_some())).count();
                if found == info.markers.len() {
                    let better = match &best {
                        None => true,
                        Some(b) => (known, class_match) > (b.known, b.class_match),
                    };
                    if better {
                        best = Some(Candidate { family: fam, names: info.layout, prefix, known, class_match });
                    }
                } else if near.as_ref().is_none_or(|n| (found, known) > n.score) && (found > 0 || known > 0) {
                    let missing: Vec<String> =
                        info.markers.iter().filter(|m| !names.contains(m.as_str())).map(|m| format!("`{m}`")).collect();
                    let under = if prefix.is_empty() { String::new() } else { format!(" under `{prefix}`") };
                    near = Some(Near {
                        score: (found, known),
                        text: format!(
                            "closest is {} with {} names{under}: {found} of {} marker tensors present (missing {}), {known} of {} names known",
                            fam.name,
                            info.layout,
                            info.markers.len(),
                            missing.join(", "),
                            names.len()
                        ),
                    });
                }
            }
        }
    }

    let Some(c) = best else {
        let families: Vec<&str> = reg.families().iter().map(|f| f.name()).collect();
        let hint = match (partial_prefix(reg, tensors), near) {
            (Some(p), _) => p,
            (None, Some(n)) => n.text,
            (None, None) => "no family's tensor names were found".to_string(),
        };
        let class_note = match class {
            Some(cl) => format!("; config.json names {}", clean(cl)),
            None => String::new(),
        };
        return Err(Error::unsupported(format!(
            "unknown model family: no rule file ({}) matches these {} tensors; {hint}{class_note}",
            families.join(", "),
            tensors.len()
        )));
    };
    let fam = c.family;
    if let (Some(cl), false) = (class, c.class_match) {
        if let Some(other) = reg.families().iter().find(|f| family_of_class(f)) {
            return Err(Error::new(
                Kind::Inconsistent,
                format!("config.json is a {} config (family {}) but the tensors are {}", clean(cl), other.name, fam.name),
            ));
        }
    }

    let layout = if c.prefix.is_empty() {
        c.names
    } else {
        fam.info.iter().find(|i| i.names == c.names && i.prefixes.iter().any(|p| p == c.prefix)).map_or(c.names, |i| i.layout)
    };
    let info = fam.info(layout)?;
    let stripped: Vec<(&str, &[u64])> = tensors.iter().map(|(n, s)| (&n[c.prefix.len()..], *s)).collect();
    let analysis = fam.analyze(c.names, &stripped)?;

    // The config is read in the dialect its _class_name names, else in the layout's.
    let cfg_dialect =
        class.and_then(|cl| fam.dialects.iter().find(|(_, d)| d.class_name.as_deref() == Some(cl)).map(|(l, _)| *l)).unwrap_or(info.config);
    let resolved = fam.resolve(Some(&analysis), cfg.map(|o| (cfg_dialect, o)))?;
    let (mut config, unknown) = fam.write_config(info.config, &resolved.q)?;
    let mut notes = resolved.notes;
    // With a config.json in the same dialect, keep what it says beyond the derived fields
    // (`_diffusers_version`, flags the rule file writes as constants).
    if let (Some(src), true, Some(out)) = (cfg, cfg_dialect == info.config, config.as_object_mut()) {
        let dialect = fam.dialect(info.config)?;
        for (k, v) in src {
            let constant = dialect.fields.iter().any(|f| &f.key == k && f.q.is_none());
            if constant || !out.contains_key(k) {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    for key in &unknown {
        let field = fam.dialect(info.config)?.fields.iter().find(|f| &f.key == key);
        let from_shapes = field.and_then(|f| f.q.as_ref()).is_some_and(|q| match q {
            FieldQ::One(n) => fam.tensors.iter().any(|t| t.shape.iter().any(|e| e.vars().any(|v| v == n))),
            FieldQ::Many(ns) => ns.iter().any(|n| fam.tensors.iter().any(|t| t.shape.iter().any(|e| e.vars().any(|v| v == n)))),
        });
        notes.push(if from_shapes {
            format!("{key} is unknown: the tensors it is read from are missing")
        } else {
            format!("{key} is unknown: no tensor shape determines it; give a config.json")
        });
    }

    let variant = match resolved.variant {
        Some(i) => fam.variants[i].name.clone(),
        None => fam.custom_variant_name(&resolved.q),
    };

    let mut missing = Vec::new();
    for t in &fam.tensors {
        if t.when.as_ref().is_some_and(|w| resolved.q.get(w).is_none_or(Value::is_null)) {
            continue;
        }
        let blocks: Vec<String> =
            if t.pattern.has_vars() { (0..analysis.num_layers).map(|b| b.to_string()).collect() } else { vec![String::new()] };
        for b in &blocks {
            let caps: Vec<(&str, &str)> = t.pattern.vars().into_iter().map(|v| (v, b.as_str())).collect();
            let Some(canonical) = t.pattern.render(&caps) else { continue };
            if !analysis.present.contains(&canonical) {
                missing.push(fam.rename_names(fam.canonical, c.names, &canonical)?);
            }
        }
    }
    missing.sort();
    let mut unmatched = analysis.unmatched.clone();
    unmatched.sort();

    Ok(Detection {
        family: fam.name.clone(),
        variant,
        layout,
        prefix: c.prefix.to_string(),
        config,
        num_layers: analysis.num_layers,
        params: analysis.params,
        missing,
        unmatched,
        notes,
    })
}

/// A family whose markers are all present under a prefix that only some names carry (a ComfyUI
/// checkpoint bundling the VAE and text encoder): say so, since detection needs every name under
/// the prefix.
fn partial_prefix(reg: &Registry, tensors: &[(&str, &[u64])]) -> Option<String> {
    for fam in reg.families() {
        for p in &fam.prefixes {
            let under: HashSet<&str> = tensors.iter().filter_map(|(n, _)| n.strip_prefix(p.as_str())).collect();
            if under.is_empty() || under.len() == tensors.len() {
                continue;
            }
            if let Some(info) = fam.info.iter().find(|i| i.names == i.layout && i.markers.iter().all(|m| under.contains(m.as_str()))) {
                return Some(format!(
                    "the {} tensors under `{p}` look like {} ({} names), but {} other tensors do not carry that prefix; extract the diffusion model first",
                    under.len(),
                    fam.name,
                    info.layout,
                    tensors.len() - under.len()
                ));
            }
        }
    }
    None
}
