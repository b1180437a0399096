//! One model family, compiled from its rule file: key maps, the tensor table, config dialects,
//! known variants and GGUF rules. Nothing in here names a family; everything comes from the
//! `formats/*.toml` data (see `docs/layouts.md`).

use super::expr::{self, Equation, Expr, Lhs, Origin, Quantities};
use super::pattern::{self, Pattern};
use super::Layout;
use crate::error::{clean, Error, Kind, Result};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// How one layout names its tensors and writes its config.
#[derive(Clone, Debug)]
pub(crate) struct LayoutInfo {
    pub layout: Layout,
    /// The layout whose tensor names this one uses (itself for a name owner).
    pub names: Layout,
    /// The layout whose config.json dialect this one uses.
    pub config: Layout,
    /// Prefixes whose presence means this layout (when several share names).
    pub prefixes: Vec<String>,
    /// Tensor names (in this layout's names) that must all be present to detect it.
    pub markers: Vec<String>,
}

#[derive(Clone, Debug)]
pub(crate) struct QuantityDef {
    pub default: Option<Value>,
}

#[derive(Clone, Debug)]
pub(crate) struct Lookup {
    pub quantity: String,
    pub from: String,
    pub table: BTreeMap<String, Value>,
}

/// A row of the tensor table, in canonical names.
#[derive(Clone, Debug)]
pub(crate) struct TensorRule {
    pub pattern: Pattern,
    pub shape: Vec<Expr>,
    /// For optional groups: the quantity whose presence makes the tensor expected.
    pub when: Option<String>,
}

/// A key map between two name-owning layouts.
#[derive(Clone, Debug)]
pub(crate) struct KeyMap {
    pub from: Layout,
    pub to: Layout,
    /// Upstream `str.replace` list for the from → to direction (may be empty).
    pub replace: Vec<(String, String)>,
    /// Anchored segment rules `[from, to]`, prefix-free on both sides.
    pub rules: Vec<(Pattern, Pattern)>,
}

#[derive(Clone, Debug)]
pub(crate) enum FieldQ {
    One(String),
    Many(Vec<String>),
}

#[derive(Clone, Debug)]
pub(crate) struct Field {
    pub key: String,
    pub q: Option<FieldQ>,
    pub value: Option<Value>,
    pub nullable: bool,
}

/// One config.json dialect.
#[derive(Clone, Debug)]
pub(crate) struct Dialect {
    pub class_name: Option<String>,
    pub fields: Vec<Field>,
}

#[derive(Clone, Debug)]
pub(crate) struct Variant {
    pub name: String,
    pub matches: Quantities,
    pub require: Vec<String>,
    pub set: Quantities,
    pub note: Option<String>,
    /// The release the variant belongs to (`Wan2.1`, `Wan2.2`), for variants whose shapes two
    /// releases share: see [`Family::release_twins`].
    pub release: Option<String>,
}

#[derive(Clone, Debug)]
pub(crate) struct Gguf {
    pub arch: String,
    pub keep_f32: Vec<String>,
    pub keep_f32_max_elements: u64,
    pub keep_unquantized: Vec<String>,
}

/// A model family loaded from a rule file.
#[derive(Clone, Debug)]
pub struct Family {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) source: PathBuf,
    pub(crate) layouts: Vec<Layout>,
    pub(crate) info: Vec<LayoutInfo>,
    pub(crate) canonical: Layout,
    pub(crate) prefixes: Vec<String>,
    pub(crate) layer_quantity: String,
    pub(crate) custom_variant: String,
    pub(crate) quantities: BTreeMap<String, QuantityDef>,
    pub(crate) relations: Vec<Equation>,
    pub(crate) lookups: Vec<Lookup>,
    pub(crate) tensors: Vec<TensorRule>,
    pub(crate) maps: Vec<KeyMap>,
    pub(crate) dialects: BTreeMap<Layout, Dialect>,
    pub(crate) variants: Vec<Variant>,
    pub(crate) gguf: Gguf,
}

/// What the tensor shapes say, before config.json, variants and defaults are applied.
#[derive(Clone, Debug)]
pub(crate) struct Analysis {
    pub quantities: Quantities,
    pub equations: Vec<Equation>,
    /// Canonical names of the tensors that matched the table.
    pub present: BTreeSet<String>,
    /// Input names that match no row of the table.
    pub unmatched: Vec<String>,
    pub num_layers: usize,
    pub params: u64,
}

/// Quantities after config.json, the known variant, lookups and defaults.
#[derive(Clone, Debug, Default)]
pub(crate) struct Resolved {
    pub q: Quantities,
    pub variant: Option<usize>,
    pub notes: Vec<String>,
}

impl Family {
    /// The family's name (`wan22`, `qwen_image`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// One line describing the family.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The rule file it was loaded from (`formats/<name>.toml` for built-in families).
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The layouts this family has, in [`Layout`] order.
    pub fn layouts(&self) -> &[Layout] {
        &self.layouts
    }

    /// The layout whose names the rule file's tensor table is written in.
    pub fn canonical_layout(&self) -> Layout {
        self.canonical
    }

    /// Names of the known variants, in the order detection tries them.
    pub fn variant_names(&self) -> impl Iterator<Item = &str> {
        self.variants.iter().map(|v| v.name.as_str())
    }

    /// The known variants with the same `match` and `require` as variant `name` (itself
    /// included, in rule-file order), as (name, release): the releases that the tensors alone
    /// cannot tell apart (a Wan2.2 T2V-A14B expert and Wan2.1 T2V-14B). Empty when `name` is not
    /// a known variant; one entry when no other variant shares its shapes.
    pub fn release_twins(&self, name: &str) -> Vec<(&str, Option<&str>)> {
        let Some(v) = self.variants.iter().find(|v| v.name == name) else { return Vec::new() };
        self.variants
            .iter()
            .filter(|w| w.matches == v.matches && w.require == v.require)
            .map(|w| (w.name.as_str(), w.release.as_deref()))
            .collect()
    }

    pub(crate) fn info(&self, layout: Layout) -> Result<&LayoutInfo> {
        self.info.iter().find(|i| i.layout == layout).ok_or_else(|| {
            Error::unsupported(format!(
                "model family {} has no {layout} layout (it has {})",
                self.name,
                self.layouts.iter().map(|l| l.as_str()).collect::<Vec<_>>().join(", ")
            ))
        })
    }

    /// The layout whose tensor names `layout` uses (e.g. Wan `comfy` → `original`).
    pub fn names_layout(&self, layout: Layout) -> Result<Layout> {
        Ok(self.info(layout)?.names)
    }

    /// The layout whose config.json dialect `layout` uses.
    pub fn config_layout(&self, layout: Layout) -> Result<Layout> {
        Ok(self.info(layout)?.config)
    }

    /// Which layout's names the GGUF / ComfyUI files of this family use (wan: original names;
    /// qwen: diffusers names). Families without a comfy layout use their canonical names.
    pub fn comfy_names_layout(&self) -> Layout {
        self.info(Layout::Comfy).map(|i| i.names).unwrap_or(self.canonical)
    }

    /// Map one tensor name (without prefix) from one layout's names to another's.
    ///
    /// Layouts that share names map by identity, for any name. Otherwise the family's key map is
    /// used: forward through the upstream replace list (checked against the segment rules), and
    /// backward through the segment rules (checked by mapping the result forward again), so that
    /// `rename(b, a, rename(a, b, k)) == k` for every name that maps at all. A name no rule
    /// covers is `Kind::Unsupported`.
    pub fn rename(&self, from: Layout, to: Layout, name: &str) -> Result<String> {
        let nf = self.names_layout(from)?;
        let nt = self.names_layout(to)?;
        self.rename_names(nf, nt, name)
    }

    pub(crate) fn rename_names(&self, nf: Layout, nt: Layout, name: &str) -> Result<String> {
        if nf == nt {
            return Ok(name.to_string());
        }
        let no_map =
            || Error::unsupported(format!("tensor `{}` has no mapping from {nf} to {nt} names in model family {}", clean(name), self.name));
        let (map, forward) = self
            .map_between(nf, nt)
            .ok_or_else(|| Error::unsupported(format!("model family {} has no key map between {nf} and {nt} names", self.name)))?;
        let seg = pattern::map_name(&map.rules, forward, name).ok_or_else(no_map)?;
        if map.replace.is_empty() {
            return Ok(seg);
        }
        // The upstream replace list is the reference for the forward direction; the segment
        // rules are its invertible form. They must agree on every name we map.
        let (orig, mapped) = if forward { (name, seg.as_str()) } else { (seg.as_str(), name) };
        let upstream = pattern::replace_all(&map.replace, orig);
        if upstream != mapped {
            return Err(Error::unsupported(format!(
                "tensor `{}`: the upstream {}→{} rename gives `{}` but the segment rules give `{}`; not mapped",
                clean(orig),
                map.from,
                map.to,
                clean(&upstream),
                clean(mapped)
            )));
        }
        Ok(seg)
    }

    pub(crate) fn map_between(&self, a: Layout, b: Layout) -> Option<(&KeyMap, bool)> {
        self.maps.iter().find_map(|m| {
            if m.from == a && m.to == b {
                Some((m, true))
            } else if m.from == b && m.to == a {
                Some((m, false))
            } else {
                None
            }
        })
    }

    /// The canonical name for `name` in `names` layout's names, without errors.
    pub(crate) fn to_canonical(&self, names: Layout, name: &str) -> Option<String> {
        if names == self.canonical {
            Some(name.to_string())
        } else {
            let (map, forward) = self.map_between(names, self.canonical)?;
            pattern::map_name(&map.rules, forward, name)
        }
    }

    /// The table row a canonical name matches, with its block index.
    pub(crate) fn match_tensor(&self, canonical: &str) -> Option<(&TensorRule, Option<u64>)> {
        let parts: Vec<&str> = canonical.split('.').collect();
        self.tensors.iter().find_map(|t| {
            let caps = t.pattern.match_full(&parts)?;
            let block = caps.first().and_then(|(_, v)| v.parse::<u64>().ok());
            Some((t, block))
        })
    }

    /// Read shapes (names in `names` layout's names, no prefix) into quantities.
    pub(crate) fn analyze(&self, names: Layout, tensors: &[(&str, &[u64])]) -> Result<Analysis> {
        let mut equations = Vec::new();
        let mut present = BTreeSet::new();
        let mut unmatched = Vec::new();
        let mut max_block: Option<u64> = None;
        let mut params: u64 = 0;
        for (name, shape) in tensors {
            params = params.saturating_add(crate::dtype::numel(shape).unwrap_or(u64::MAX));
            let Some(canonical) = self.to_canonical(names, name) else {
                unmatched.push(name.to_string());
                continue;
            };
            let Some((rule, block)) = self.match_tensor(&canonical) else {
                unmatched.push(name.to_string());
                continue;
            };
            if rule.shape.len() != shape.len() {
                return Err(Error::new(
                    Kind::Inconsistent,
                    format!(
                        "tensor `{}` has shape {shape:?}, but model family {} gives it {} dimensions [{}]",
                        clean(name),
                        self.name,
                        rule.shape.len(),
                        rule.shape.iter().map(|e| e.text()).collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
            if let Some(b) = block {
                max_block = Some(max_block.map_or(b, |m| m.max(b)));
            }
            for (axis, (dim, expr)) in shape.iter().zip(&rule.shape).enumerate() {
                equations.push(Equation {
                    lhs: Lhs::Value(*dim),
                    rhs: expr.clone(),
                    origin: Origin::Tensor { tensor: name.to_string(), shape: shape.to_vec(), axis },
                });
            }
            present.insert(canonical);
        }
        let num_layers = match max_block {
            Some(b) => usize::try_from(b)
                .ok()
                .and_then(|b| b.checked_add(1))
                .ok_or_else(|| Error::new(Kind::Limit, format!("block index {b} is too large")))?,
            None => 0,
        };
        let mut quantities = Quantities::new();
        quantities.insert(self.layer_quantity.clone(), Value::from(num_layers as u64));
        let mut all = self.relations.clone();
        all.extend(equations.iter().cloned());
        expr::solve(&all, &mut quantities).map_err(|why| Error::new(Kind::Inconsistent, format!("{}: {why}", self.name)))?;
        Ok(Analysis { quantities, equations, present, unmatched, num_layers, params })
    }

    /// Combine shape-derived quantities with a config (in dialect `cfg.0`), the first matching
    /// variant, lookups and defaults.
    pub(crate) fn resolve(&self, analysis: Option<&Analysis>, cfg: Option<(Layout, &Map<String, Value>)>) -> Result<Resolved> {
        let mut r = Resolved::default();
        let mut eqs = self.relations.clone();
        if let Some(a) = analysis {
            r.q = a.quantities.clone();
            eqs.extend(a.equations.iter().cloned());
        }
        if let Some((dialect, cfg)) = cfg {
            let from_cfg = self.read_config(dialect, cfg)?;
            for (k, v) in from_cfg {
                match r.q.get(&k) {
                    Some(old) if analysis.is_some() && !same_value(old, &v) => {
                        return Err(Error::new(
                            Kind::Inconsistent,
                            format!("config.json gives {k} = {v} but the tensor shapes give {old}"),
                        ));
                    }
                    Some(_) => {}
                    None => {
                        r.q.insert(k, v);
                    }
                }
            }
            expr::solve(&eqs, &mut r.q)
                .map_err(|why| Error::new(Kind::Inconsistent, format!("config.json disagrees with the tensor shapes: {why}")))?;
        }
        let present = analysis.map(|a| &a.present);
        // Variants are matched on what the shapes and config give plus the defaults (Qwen's
        // out_channels needs the default patch size), but their values go in before defaults.
        let mut trial = r.q.clone();
        for (name, def) in &self.quantities {
            if let (false, Some(d)) = (trial.contains_key(name), &def.default) {
                trial.insert(name.clone(), d.clone());
            }
        }
        if expr::solve(&eqs, &mut trial).is_err() {
            trial = r.q.clone();
        }
        r.variant = self.variants.iter().position(|v| {
            v.matches.iter().all(|(k, want)| trial.get(k).is_some_and(|have| same_value(have, want)))
                && match present {
                    Some(p) => v.require.iter().all(|t| p.contains(t)),
                    None => v.require.is_empty(),
                }
        });
        if let Some(v) = r.variant.map(|i| &self.variants[i]) {
            for (k, want) in &v.set {
                match r.q.get(k) {
                    None => {
                        r.q.insert(k.clone(), want.clone());
                    }
                    Some(have) if !same_value(have, want) => {
                        r.notes.push(format!("{k} = {have} differs from the {} value {want}; kept {have}", v.name))
                    }
                    Some(_) => {}
                }
            }
            if let Some(n) = &v.note {
                r.notes.push(format!("{}: {n}", v.name));
            }
        }
        self.finish(&eqs, &mut r)?;
        Ok(r)
    }

    /// Solve, apply lookups and defaults, solve again.
    fn finish(&self, eqs: &[Equation], r: &mut Resolved) -> Result<()> {
        let conflict = |why: String| Error::new(Kind::Inconsistent, format!("{}: {why}", self.name));
        expr::solve(eqs, &mut r.q).map_err(conflict)?;
        for l in &self.lookups {
            if r.q.contains_key(&l.quantity) {
                continue;
            }
            if let Some(v) = r.q.get(&l.from).and_then(|v| l.table.get(&value_key(v))) {
                r.q.insert(l.quantity.clone(), v.clone());
            }
        }
        let mut defaulted = Vec::new();
        for (name, def) in &self.quantities {
            if let (false, Some(d)) = (r.q.contains_key(name), &def.default) {
                r.q.insert(name.clone(), d.clone());
                defaulted.push(name.as_str());
            }
        }
        if !defaulted.is_empty() {
            r.notes.push(format!("defaults used for {}", defaulted.join(", ")));
        }
        expr::solve(eqs, &mut r.q).map_err(conflict)
    }

    /// Quantities named by a config in the given dialect.
    pub(crate) fn read_config(&self, dialect: Layout, cfg: &Map<String, Value>) -> Result<Quantities> {
        let d = self.dialect(dialect)?;
        if let (Some(want), Some(Value::String(have))) = (&d.class_name, cfg.get("_class_name")) {
            if want != have {
                return Err(Error::new(
                    Kind::Inconsistent,
                    format!("config.json is a {} config, not {want} ({} {dialect})", clean(have), self.name),
                ));
            }
        }
        let mut q = Quantities::new();
        for f in &d.fields {
            let (Some(fq), Some(v)) = (&f.q, cfg.get(&f.key)) else { continue };
            if v.is_null() {
                continue;
            }
            match fq {
                FieldQ::One(name) => {
                    q.insert(name.clone(), v.clone());
                }
                FieldQ::Many(names) => match v.as_array() {
                    Some(items) if items.len() == names.len() => {
                        for (n, item) in names.iter().zip(items) {
                            q.insert(n.clone(), item.clone());
                        }
                    }
                    _ => {
                        return Err(Error::new(
                            Kind::Malformed,
                            format!("config field `{}` should be a list of {} values, found {v}", f.key, names.len()),
                        ))
                    }
                },
            }
        }
        Ok(q)
    }

    pub(crate) fn dialect(&self, dialect: Layout) -> Result<&Dialect> {
        self.dialects.get(&dialect).ok_or_else(|| Error::internal(format!("model family {} has no {dialect} config dialect", self.name)))
    }

    /// Write quantities as a config of `dialect`. Returns the config and the keys that had no
    /// value (written as null).
    pub(crate) fn write_config(&self, dialect: Layout, q: &Quantities) -> Result<(Value, Vec<String>)> {
        let d = self.dialect(dialect)?;
        let mut out = Map::new();
        let mut unknown = Vec::new();
        if let Some(c) = &d.class_name {
            out.insert("_class_name".into(), Value::String(c.clone()));
        }
        for f in &d.fields {
            let v = match (&f.q, &f.value) {
                (Some(FieldQ::One(n)), _) => q.get(n).cloned(),
                (Some(FieldQ::Many(ns)), _) => ns.iter().map(|n| q.get(n).cloned()).collect::<Option<Vec<_>>>().map(Value::Array),
                (None, Some(v)) => Some(v.clone()),
                (None, None) => None,
            };
            match v {
                Some(v) => {
                    out.insert(f.key.clone(), v);
                }
                None => {
                    if !f.nullable {
                        unknown.push(f.key.clone());
                    }
                    out.insert(f.key.clone(), Value::Null);
                }
            }
        }
        Ok((Value::Object(out), unknown))
    }

    /// Translate config.json between layout dialects (Wan original ↔ diffusers). Layouts that
    /// share a dialect give the config back unchanged. Fields the target dialect does not have
    /// are dropped; fields the source cannot supply come from the quantity defaults (listed in
    /// `docs/layouts.md`) or are written as null where the rule file allows it.
    pub fn translate_config(&self, from: Layout, to: Layout, cfg: &Value) -> Result<Value> {
        let df = self.config_layout(from)?;
        let dt = self.config_layout(to)?;
        let obj = cfg.as_object().ok_or_else(|| Error::new(Kind::Malformed, "config.json is not a JSON object"))?;
        if df == dt {
            // Still check that the config is of the dialect it claims to be.
            self.read_config(df, obj)?;
            return Ok(cfg.clone());
        }
        let r = self.resolve(None, Some((df, obj)))?;
        let (out, unknown) = self.write_config(dt, &r.q)?;
        if !unknown.is_empty() {
            return Err(Error::new(
                Kind::Malformed,
                format!("config.json ({from}) lacks the values needed for {} of the {to} config", unknown.join(", ")),
            ));
        }
        Ok(out)
    }

    /// The config in `layout`'s dialect, inferred from tensor shapes (names in `layout`'s names;
    /// one of the family's prefixes is stripped when every name has it), for checkpoints without
    /// config.json. Values no shape determines come from the matching known variant, lookups or
    /// defaults; what stays unknown is null (e.g. the number of heads of a custom Wan model).
    pub fn config_from_shapes(&self, layout: Layout, tensors: &[(&str, &[u64])]) -> Result<Value> {
        let info = self.info(layout)?;
        let prefix = self
            .prefixes
            .iter()
            .find(|p| !tensors.is_empty() && tensors.iter().all(|(n, _)| n.starts_with(p.as_str())))
            .map_or(0, |p| p.len());
        let stripped: Vec<(&str, &[u64])> = tensors.iter().map(|(n, s)| (&n[prefix..], *s)).collect();
        let a = self.analyze(info.names, &stripped)?;
        let r = self.resolve(Some(&a), None)?;
        Ok(self.write_config(info.config, &r.q)?.0)
    }

    /// Every tensor a checkpoint of this family with config `cfg` (in `layout`'s dialect) has,
    /// with its shape, in `layout`'s names, in rule-file order with blocks expanded.
    pub fn expected_tensors(&self, layout: Layout, cfg: &Value) -> Result<Vec<(String, Vec<u64>)>> {
        let info = self.info(layout)?;
        let obj = cfg.as_object().ok_or_else(|| Error::new(Kind::Malformed, "config.json is not a JSON object"))?;
        let r = self.resolve(None, Some((info.config, obj)))?;
        let layers = expr::get_u64(&r.q, &self.layer_quantity)
            .ok_or_else(|| Error::new(Kind::Malformed, format!("config gives no value for {}", self.layer_quantity)))?;
        let mut out = Vec::new();
        for t in &self.tensors {
            if t.when.as_ref().is_some_and(|w| r.q.get(w).is_none_or(Value::is_null)) {
                continue;
            }
            let shape = t
                .shape
                .iter()
                .map(|e| match e.eval(&r.q) {
                    Some(Ok(v)) => Ok(v),
                    Some(Err(why)) => Err(why),
                    None => Err(format!("{} is unknown", e.text())),
                })
                .collect::<std::result::Result<Vec<u64>, String>>()
                .map_err(|why| {
                    Error::new(Kind::Malformed, format!("config does not determine the shape of `{}`: {why}", t.pattern.text()))
                })?;
            let blocks: Vec<Option<String>> =
                if t.pattern.has_vars() { (0..layers).map(|b| Some(b.to_string())).collect() } else { vec![None] };
            for b in blocks {
                let caps: Vec<(&str, &str)> = t.pattern.vars().into_iter().map(|v| (v, b.as_deref().unwrap_or("0"))).collect();
                let canonical = t.pattern.render(&caps).ok_or_else(|| Error::internal("unrenderable tensor pattern"))?;
                out.push((self.rename_names(self.canonical, info.names, &canonical)?, shape.clone()));
            }
        }
        Ok(out)
    }

    /// The architecture name ComfyUI-GGUF writes in `general.architecture` (`wan`, `qwen_image`).
    pub fn gguf_arch(&self) -> &str {
        &self.gguf.arch
    }

    /// ComfyUI-GGUF `convert.py` rule for an F32 or BF16 source tensor (name in
    /// [`Family::comfy_names_layout`] names): keep it F32 when it is 1-D, has at most 1024
    /// elements, or its name contains one of the family's `keep_f32` strings (`keys_hiprec`).
    pub fn gguf_keep_f32(&self, name: &str, shape: &[u64]) -> bool {
        shape.len() == 1
            || crate::dtype::numel(shape).is_some_and(|n| n <= self.gguf.keep_f32_max_elements)
            || self.gguf.keep_f32.iter().any(|k| name.contains(k.as_str()))
    }

    /// The patched `llama-quantize` rule: a tensor is quantized only when its name ends in
    /// `weight` (and is no `_norm.weight`), it has two dimensions as ggml counts them (size-1
    /// leading torch dimensions do not count), and its name contains none of the family's
    /// `keep_unquantized` strings.
    pub fn gguf_quantizable(&self, name: &str, shape: &[u64]) -> bool {
        let ggml_dims = shape.iter().position(|&d| d != 1).map_or(1, |first| shape.len() - first);
        name.ends_with("weight")
            && !name.contains("_norm.weight")
            && ggml_dims == 2
            && !self.gguf.keep_unquantized.iter().any(|k| name.contains(k.as_str()))
    }

    /// Fill `{quantity}` placeholders of the custom-variant template.
    pub(crate) fn custom_variant_name(&self, q: &Quantities) -> String {
        let mut out = String::new();
        let mut rest = self.custom_variant.as_str();
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let Some(close) = rest[open..].find('}') else { break };
            let key = &rest[open + 1..open + close];
            match q.get(key) {
                Some(Value::String(s)) => out.push_str(s),
                Some(v) if !v.is_null() => out.push_str(&v.to_string()),
                _ => out.push('?'),
            }
            rest = &rest[open + close + 1..];
        }
        out.push_str(rest);
        out
    }
}

/// Equal as config values: numbers compare by value (5120 == 5120.0).
pub(crate) fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_u64(), y.as_u64()) {
            (Some(x), Some(y)) => x == y,
            _ => x.as_f64() == y.as_f64(),
        },
        _ => a == b,
    }
}

/// How a value is written as a lookup-table key: strings as themselves, others as JSON.
fn value_key(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
