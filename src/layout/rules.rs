//! Reading and checking one rule file (`formats/<family>.toml`).
//!
//! Every error names the file and the line: TOML syntax and schema errors through the span
//! `toml` reports, semantic errors (an undeclared quantity, overlapping key rules, a replace list
//! that disagrees with the segment rules) through `toml::Spanned` fields. The schema is
//! documented field by field in `docs/layouts.md`.

use super::expr::{Equation, Expr, Lhs, Origin, Quantities};
use super::family::{Dialect, Family, Field, FieldQ, Gguf, KeyMap, LayoutInfo, Lookup, QuantityDef, TensorRule, Variant};
use super::pattern::{first_overlap, replace_all, Pattern};
use super::Layout;
use crate::error::{Error, Result};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use toml::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    family: RawFamily,
    layouts: BTreeMap<String, Spanned<RawLayout>>,
    #[serde(default)]
    quantities: BTreeMap<String, Spanned<RawQuantity>>,
    #[serde(default)]
    relations: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    lookups: Vec<Spanned<RawLookup>>,
    tensors: BTreeMap<String, Spanned<Vec<RawDim>>>,
    #[serde(default)]
    optional: Vec<Spanned<RawOptional>>,
    #[serde(default)]
    maps: Vec<Spanned<RawMap>>,
    configs: BTreeMap<String, Spanned<RawDialect>>,
    #[serde(default)]
    variants: Vec<Spanned<RawVariant>>,
    gguf: RawGguf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFamily {
    name: Spanned<String>,
    #[serde(default)]
    description: String,
    canonical: Spanned<String>,
    #[serde(default)]
    prefixes: Vec<Spanned<String>>,
    layer_quantity: Spanned<String>,
    custom_variant: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLayout {
    names: Option<Spanned<String>>,
    config: Option<Spanned<String>>,
    #[serde(default)]
    prefixes: Vec<Spanned<String>>,
    #[serde(default)]
    markers: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuantity {
    default: Option<toml::Value>,
    #[serde(default)]
    #[allow(dead_code)] // documentation for people reading the rule file
    about: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLookup {
    quantity: String,
    from: String,
    table: BTreeMap<String, toml::Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawDim {
    Int(u64),
    Expr(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOptional {
    when: Spanned<String>,
    #[serde(default)]
    #[allow(dead_code)] // documentation for people reading the rule file
    about: String,
    tensors: BTreeMap<String, Spanned<Vec<RawDim>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMap {
    from: String,
    to: String,
    #[serde(default)]
    #[allow(dead_code)] // provenance, for people reading the rule file
    source: String,
    #[serde(default)]
    replace: Vec<Spanned<Vec<String>>>,
    segments: Vec<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDialect {
    class_name: Option<String>,
    fields: Vec<Spanned<RawField>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawQ {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawField {
    key: String,
    q: Option<RawQ>,
    value: Option<toml::Value>,
    #[serde(default)]
    nullable: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVariant {
    name: String,
    #[serde(rename = "match")]
    matches: BTreeMap<String, toml::Value>,
    #[serde(default)]
    require: Vec<String>,
    #[serde(default)]
    set: BTreeMap<String, toml::Value>,
    note: Option<String>,
    release: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGguf {
    arch: String,
    #[serde(default)]
    keep_f32: Vec<String>,
    keep_f32_max_elements: Option<u64>,
    #[serde(default)]
    keep_unquantized: Vec<String>,
}

/// Error reporting for one rule file.
struct Ctx<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Ctx<'_> {
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
    }
    /// Where the `[name]` (or `[name.…]`) table header is; `toml` gives header tables no span.
    fn header(&self, name: &str) -> Range<usize> {
        let mut offset = 0;
        for line in self.text.split_inclusive('\n') {
            let t = line.trim_start();
            if let Some(rest) = t.strip_prefix('[').and_then(|r| r.strip_prefix(name)) {
                if rest.starts_with(']') || rest.starts_with('.') {
                    return offset..offset + line.len();
                }
            }
            offset += line.len();
        }
        0..0
    }
    fn at(&self, span: Range<usize>, msg: impl std::fmt::Display) -> Error {
        Error::malformed(self.path, format!("line {}: {msg}", self.line(span.start)))
    }
}

fn is_ident(s: &str) -> bool {
    s.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_') && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// TOML to JSON (datetimes become strings).
pub(crate) fn to_json(v: &toml::Value) -> Value {
    match v {
        toml::Value::String(s) => Value::String(s.clone()),
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        toml::Value::Table(t) => Value::Object(t.iter().map(|(k, v)| (k.clone(), to_json(v))).collect()),
    }
}

/// Parse and check one rule file. `path` is only used in messages.
pub(crate) fn parse_family(path: &Path, text: &str) -> Result<Family> {
    let cx = Ctx { path, text };
    let raw: RawFile = toml::from_str(text).map_err(|e| match e.span() {
        Some(span) => cx.at(span, e.message()),
        None => Error::malformed(path, e.message().to_string()),
    })?;

    let layout_key = |key: &str, span: Range<usize>| -> Result<Layout> {
        key.parse::<Layout>().map_err(|_| cx.at(span, format!("unknown layout `{key}`: expected original, diffusers or comfy")))
    };
    let mut raw_layouts: BTreeMap<Layout, &Spanned<RawLayout>> = BTreeMap::new();
    for (k, v) in &raw.layouts {
        raw_layouts.insert(layout_key(k, v.span())?, v);
    }
    let mut raw_configs: BTreeMap<Layout, &Spanned<RawDialect>> = BTreeMap::new();
    for (k, v) in &raw.configs {
        raw_configs.insert(layout_key(k, v.span())?, v);
    }

    // [family]
    let fam = raw.family;
    let name = fam.name.get_ref().clone();
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
        return Err(cx.at(fam.name.span(), format!("family name `{name}`: use lower-case letters, digits and `_`")));
    }
    for p in &fam.prefixes {
        check_prefix(&cx, p)?;
    }

    // [quantities] and [relations]
    let mut quantities = BTreeMap::new();
    for (qname, def) in &raw.quantities {
        if !is_ident(qname) {
            return Err(cx.at(def.span(), format!("quantity name `{qname}` is not an identifier")));
        }
        quantities.insert(qname.clone(), QuantityDef { default: def.get_ref().default.as_ref().map(to_json) });
    }
    let declared = |span: Range<usize>, q: &str| -> Result<()> {
        if quantities.contains_key(q) {
            Ok(())
        } else {
            Err(cx.at(span, format!("`{q}` is not declared in [quantities]")))
        }
    };
    let parse_expr = |span: Range<usize>, text: &str| -> Result<Expr> {
        let e = Expr::parse(text).map_err(|why| cx.at(span.clone(), why))?;
        for v in e.vars() {
            declared(span.clone(), v)?;
        }
        Ok(e)
    };
    if !quantities.contains_key(fam.layer_quantity.get_ref()) {
        return Err(cx.at(fam.layer_quantity.span(), format!("`{}` is not declared in [quantities]", fam.layer_quantity.get_ref())));
    }
    check_template(&cx, &fam.custom_variant, &quantities)?;
    let mut relations = Vec::new();
    for (lhs, rhs) in &raw.relations {
        declared(rhs.span(), lhs)?;
        relations.push(Equation { lhs: Lhs::Quantity(lhs.clone()), rhs: parse_expr(rhs.span(), rhs.get_ref())?, origin: Origin::Relation });
    }
    let mut lookups = Vec::new();
    for l in &raw.lookups {
        let r = l.get_ref();
        declared(l.span(), &r.quantity)?;
        declared(l.span(), &r.from)?;
        lookups.push(Lookup {
            quantity: r.quantity.clone(),
            from: r.from.clone(),
            table: r.table.iter().map(|(k, v)| (k.clone(), to_json(v))).collect(),
        });
    }

    // [tensors] and [[optional]]
    let mut tensors = Vec::new();
    let mut tensor_spans = Vec::new();
    let mut add_tensor = |pat: &str, dims: &Spanned<Vec<RawDim>>, when: Option<String>| -> Result<()> {
        let pattern = Pattern::parse(pat).map_err(|why| cx.at(dims.span(), why))?;
        if pattern.vars().iter().any(|v| *v != "n") {
            return Err(cx.at(dims.span(), format!("`{pat}`: the only placeholder in tensor names is {{n}}, the block index")));
        }
        let mut shape = Vec::new();
        for d in dims.get_ref() {
            shape.push(match d {
                RawDim::Int(0) => return Err(cx.at(dims.span(), format!("`{pat}`: zero dimension"))),
                RawDim::Int(v) => Expr::constant(*v),
                RawDim::Expr(e) => parse_expr(dims.span(), e)?,
            });
        }
        tensors.push(TensorRule { pattern, shape, when });
        tensor_spans.push(dims.span());
        Ok(())
    };
    for (pat, dims) in &raw.tensors {
        add_tensor(pat, dims, None)?;
    }
    for group in &raw.optional {
        let g = group.get_ref();
        declared(g.when.span(), g.when.get_ref())?;
        for (pat, dims) in &g.tensors {
            add_tensor(pat, dims, Some(g.when.get_ref().clone()))?;
        }
    }
    if tensors.is_empty() {
        return Err(cx.at(cx.header("tensors"), "[tensors] is empty"));
    }
    for j in 0..tensors.len() {
        for i in 0..j {
            let (a, b) = (&tensors[i].pattern, &tensors[j].pattern);
            if a.len() == b.len() && a.overlaps(b) {
                return Err(cx.at(tensor_spans[j].clone(), format!("tensor `{}` can match the same names as `{}`", b.text(), a.text())));
            }
        }
    }

    // [layouts]
    let opt_layout = |v: &Option<Spanned<String>>, dflt: Layout| -> Result<(Layout, Range<usize>)> {
        match v {
            None => Ok((dflt, 0..0)),
            Some(s) => Ok((layout_key(s.get_ref(), s.span())?, s.span())),
        }
    };
    let mut info = Vec::new();
    for (layout, l) in &raw_layouts {
        let r = l.get_ref();
        for p in &r.prefixes {
            check_prefix(&cx, p)?;
        }
        info.push(LayoutInfo {
            layout: *layout,
            names: opt_layout(&r.names, *layout)?.0,
            config: opt_layout(&r.config, *layout)?.0,
            prefixes: r.prefixes.iter().map(|p| p.get_ref().clone()).collect(),
            markers: r.markers.iter().map(|m| m.get_ref().clone()).collect(),
        });
    }
    if info.is_empty() {
        return Err(cx.at(cx.header("layouts"), "[layouts] is empty"));
    }
    let owner = |l: Layout| info.iter().any(|i| i.layout == l && i.names == l);
    for (layout, l) in &raw_layouts {
        let r = l.get_ref();
        if r.names.is_some() {
            let (n, span) = opt_layout(&r.names, *layout)?;
            if !owner(n) {
                return Err(cx.at(span, format!("layout {layout} takes its names from {n}, which is not a layout with its own names")));
            }
            if n != *layout && !r.markers.is_empty() {
                return Err(cx.at(l.span(), format!("layout {layout} shares the names of {n}; give markers there")));
            }
        }
        if owner(*layout) && r.markers.is_empty() {
            return Err(cx.at(l.span(), format!("layout {layout} has its own names and needs `markers`")));
        }
        let (dialect, span) = opt_layout(&r.config, *layout)?;
        if !raw_configs.contains_key(&dialect) {
            let span = if r.config.is_some() { span } else { l.span() };
            return Err(cx.at(span, format!("layout {layout} uses the {dialect} config dialect, but there is no [configs.{dialect}]")));
        }
    }
    let canonical = layout_key(fam.canonical.get_ref(), fam.canonical.span())?;
    if !owner(canonical) {
        return Err(cx.at(fam.canonical.span(), format!("canonical layout {canonical} is not a layout with its own names")));
    }

    // [[maps]]
    let mut maps: Vec<KeyMap> = Vec::new();
    for m in &raw.maps {
        let r = m.get_ref();
        let (from, to) = (layout_key(&r.from, m.span())?, layout_key(&r.to, m.span())?);
        for l in [from, to] {
            if !owner(l) {
                return Err(cx.at(m.span(), format!("map between {from} and {to}: {l} is not a layout with its own names")));
            }
        }
        if from == to || maps.iter().any(|x| (x.from, x.to) == (from, to) || (x.from, x.to) == (to, from)) {
            return Err(cx.at(m.span(), format!("a second map between {from} and {to}")));
        }
        let mut replace = Vec::new();
        for pair in &r.replace {
            match pair.get_ref().as_slice() {
                [a, b] if !a.is_empty() => replace.push((a.clone(), b.clone())),
                _ => return Err(cx.at(pair.span(), "a replace rule is [\"from\", \"to\"] with a non-empty \"from\"")),
            }
        }
        let mut rules: Vec<(Pattern, Pattern)> = Vec::new();
        for pair in &r.segments {
            let (a, b) = match pair.get_ref().as_slice() {
                [a, b] => {
                    (Pattern::parse(a).map_err(|why| cx.at(pair.span(), why))?, Pattern::parse(b).map_err(|why| cx.at(pair.span(), why))?)
                }
                _ => return Err(cx.at(pair.span(), format!("a segment rule is [\"{from}\", \"{to}\"]"))),
            };
            let (mut va, mut vb) = (a.vars(), b.vars());
            va.sort_unstable();
            vb.sort_unstable();
            if va != vb {
                return Err(cx.at(pair.span(), format!("`{}` and `{}` must use the same placeholders", a.text(), b.text())));
            }
            rules.push((a, b));
        }
        if rules.is_empty() {
            return Err(cx.at(m.span(), "a map needs `segments`"));
        }
        for side in 0..2 {
            let pats: Vec<&Pattern> = rules.iter().map(|(a, b)| if side == 0 { a } else { b }).collect();
            if let Some((i, j)) = first_overlap(&pats) {
                return Err(cx.at(
                    r.segments[j].span(),
                    format!(
                        "segment rule `{}` overlaps `{}` (a name could match both); the map would not be invertible",
                        pats[j].text(),
                        pats[i].text()
                    ),
                ));
            }
        }
        // The replace list must agree with every segment rule, with and without a tail.
        if !replace.is_empty() {
            for ((a, b), span) in rules.iter().zip(r.segments.iter().map(|s| s.span())) {
                let caps: Vec<(&str, &str)> = a.vars().into_iter().map(|v| (v, "0")).collect();
                let (Some(ka), Some(kb)) = (a.render(&caps), b.render(&caps)) else { continue };
                for tail in ["", ".weight", ".bias"] {
                    let got = replace_all(&replace, &format!("{ka}{tail}"));
                    if got != format!("{kb}{tail}") {
                        return Err(cx.at(span, format!("the replace list maps `{ka}{tail}` to `{got}`, but this rule says `{kb}{tail}`")));
                    }
                }
            }
        }
        maps.push(KeyMap { from, to, replace, rules });
    }
    for i in &info {
        if i.names == i.layout
            && i.layout != canonical
            && !maps.iter().any(|m| (m.from, m.to) == (i.layout, canonical) || (m.from, m.to) == (canonical, i.layout))
        {
            return Err(cx.at(
                cx.header("layouts"),
                format!("layout {} has its own names but no [[maps]] entry links it to the canonical {canonical} names", i.layout),
            ));
        }
    }

    // [configs.*]
    let mut dialects = BTreeMap::new();
    for (layout, d) in &raw_configs {
        if !info.iter().any(|i| i.config == *layout) {
            return Err(cx.at(d.span(), format!("[configs.{layout}] is used by no layout")));
        }
        let mut fields: Vec<Field> = Vec::new();
        for f in &d.get_ref().fields {
            let r = f.get_ref();
            if fields.iter().any(|x| x.key == r.key) || r.key == "_class_name" {
                return Err(cx.at(f.span(), format!("config field `{}` twice", r.key)));
            }
            let q = match &r.q {
                None => None,
                Some(RawQ::One(n)) => {
                    declared(f.span(), n)?;
                    Some(FieldQ::One(n.clone()))
                }
                Some(RawQ::Many(ns)) => {
                    for n in ns {
                        declared(f.span(), n)?;
                    }
                    Some(FieldQ::Many(ns.clone()))
                }
            };
            match (&q, &r.value, r.nullable) {
                (Some(_), None, _) | (None, Some(_), false) => {}
                _ => return Err(cx.at(f.span(), format!("config field `{}`: give either `q` (optionally `nullable`) or `value`", r.key))),
            }
            fields.push(Field { key: r.key.clone(), q, value: r.value.as_ref().map(to_json), nullable: r.nullable });
        }
        dialects.insert(*layout, Dialect { class_name: d.get_ref().class_name.clone(), fields });
    }

    // [[variants]]
    let mut variants = Vec::new();
    for v in &raw.variants {
        let r = v.get_ref();
        let mut matches = Quantities::new();
        let mut set = Quantities::new();
        for (k, val) in &r.matches {
            declared(v.span(), k)?;
            matches.insert(k.clone(), to_json(val));
        }
        for (k, val) in &r.set {
            declared(v.span(), k)?;
            set.insert(k.clone(), to_json(val));
        }
        if r.name.is_empty() || matches.is_empty() {
            return Err(cx.at(v.span(), "a variant needs a `name` and a non-empty `match`"));
        }
        for t in &r.require {
            let parts: Vec<&str> = t.split('.').collect();
            if !tensors.iter().any(|rule| rule.pattern.match_full(&parts).is_some()) {
                return Err(cx.at(v.span(), format!("required tensor `{t}` is not in the tensor table")));
            }
        }
        variants.push(Variant {
            name: r.name.clone(),
            matches,
            require: r.require.clone(),
            set,
            note: r.note.clone(),
            release: r.release.clone(),
        });
    }

    // [gguf]
    let g = &raw.gguf;
    if g.arch.is_empty() {
        return Err(cx.at(cx.header("gguf"), "[gguf] needs an `arch`"));
    }
    let gguf = Gguf {
        arch: g.arch.clone(),
        keep_f32: g.keep_f32.clone(),
        keep_f32_max_elements: g.keep_f32_max_elements.unwrap_or(1024),
        keep_unquantized: g.keep_unquantized.clone(),
    };

    let mut layouts: Vec<Layout> = info.iter().map(|i| i.layout).collect();
    layouts.sort();
    let family = Family {
        name,
        description: fam.description,
        source: path.to_path_buf(),
        layouts,
        info,
        canonical,
        prefixes: fam.prefixes.iter().map(|p| p.get_ref().clone()).collect(),
        layer_quantity: fam.layer_quantity.get_ref().clone(),
        custom_variant: fam.custom_variant.get_ref().clone(),
        quantities,
        relations,
        lookups,
        tensors,
        maps,
        dialects,
        variants,
        gguf,
    };

    // Markers must be tensors the family knows, in their layout's names.
    for (layout, l) in &raw_layouts {
        for m in &l.get_ref().markers {
            let known = family.to_canonical(*layout, m.get_ref()).is_some_and(|c| family.match_tensor(&c).is_some());
            if !known {
                return Err(cx.at(m.span(), format!("marker `{}` is not a {layout} name of a tensor in the table", m.get_ref())));
            }
        }
    }
    Ok(family)
}

fn check_prefix(cx: &Ctx<'_>, p: &Spanned<String>) -> Result<()> {
    let s = p.get_ref();
    if s.is_empty() || !s.ends_with('.') || s.starts_with('.') {
        return Err(cx.at(p.span(), format!("prefix `{s}` must be non-empty and end with `.`")));
    }
    Ok(())
}

fn check_template(cx: &Ctx<'_>, t: &Spanned<String>, quantities: &BTreeMap<String, QuantityDef>) -> Result<()> {
    let mut rest = t.get_ref().as_str();
    while let Some(open) = rest.find('{') {
        let close = rest[open..].find('}').ok_or_else(|| cx.at(t.span(), "unclosed `{` in custom_variant"))?;
        let key = &rest[open + 1..open + close];
        if !quantities.contains_key(key) {
            return Err(cx.at(t.span(), format!("custom_variant uses `{{{key}}}`, which is not declared in [quantities]")));
        }
        rest = &rest[open + close + 1..];
    }
    Ok(())
}
