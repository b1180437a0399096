//! Name patterns made of dot-separated segments, where `{n}` (any `{name}`) stands for one
//! all-digit segment such as a block index.
//!
//! Patterns are *anchored*: they match whole segments from the start of a tensor name, never a
//! substring inside a segment. That is what makes a table of `[from, to]` pattern pairs provably
//! invertible (see [`check_prefix_free`]), unlike sequential `str.replace`, where `cross_attn.k`
//! also rewrites `cross_attn.k_img`.

#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    Lit(String),
    Var(String),
}

/// A parsed pattern such as `blocks.{n}.self_attn.q`.
#[derive(Clone, Debug)]
pub(crate) struct Pattern {
    text: String,
    segs: Vec<Seg>,
}

/// Values captured by the `{name}` segments of a match.
pub(crate) type Captures<'a> = Vec<(&'a str, &'a str)>;

impl Pattern {
    pub(crate) fn parse(text: &str) -> Result<Pattern, String> {
        if text.is_empty() {
            return Err("empty name pattern".into());
        }
        let mut segs = Vec::new();
        for s in text.split('.') {
            if s.is_empty() {
                return Err(format!("empty segment in `{text}`"));
            }
            if let Some(inner) = s.strip_prefix('{') {
                let name = inner.strip_suffix('}').ok_or_else(|| format!("unclosed `{{` in `{text}`"))?;
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                    return Err(format!("placeholder `{s}` in `{text}`: use a lower-case name such as {{n}}"));
                }
                if segs.iter().any(|x| x == &Seg::Var(name.to_string())) {
                    return Err(format!("placeholder `{s}` appears twice in `{text}`"));
                }
                segs.push(Seg::Var(name.to_string()));
            } else if s.contains(['{', '}']) {
                return Err(format!("segment `{s}` of `{text}`: a placeholder must be a whole segment"));
            } else {
                segs.push(Seg::Lit(s.to_string()));
            }
        }
        Ok(Pattern { text: text.to_string(), segs })
    }

    pub(crate) fn text(&self) -> &str {
        &self.text
    }

    /// Placeholder names, in order.
    pub(crate) fn vars(&self) -> Vec<&str> {
        self.segs
            .iter()
            .filter_map(|s| match s {
                Seg::Var(v) => Some(v.as_str()),
                Seg::Lit(_) => None,
            })
            .collect()
    }

    pub(crate) fn has_vars(&self) -> bool {
        self.segs.iter().any(|s| matches!(s, Seg::Var(_)))
    }

    /// Match the leading segments of `parts`; returns the captures and the number of segments used.
    pub(crate) fn match_prefix<'a>(&'a self, parts: &[&'a str]) -> Option<Captures<'a>> {
        if parts.len() < self.segs.len() {
            return None;
        }
        let mut caps = Vec::new();
        for (seg, part) in self.segs.iter().zip(parts) {
            match seg {
                Seg::Lit(l) if l == part => {}
                Seg::Var(v) if is_index(part) => caps.push((v.as_str(), *part)),
                _ => return None,
            }
        }
        Some(caps)
    }

    /// Match all of `parts`.
    pub(crate) fn match_full<'a>(&'a self, parts: &[&'a str]) -> Option<Captures<'a>> {
        if parts.len() != self.segs.len() {
            return None;
        }
        self.match_prefix(parts)
    }

    pub(crate) fn len(&self) -> usize {
        self.segs.len()
    }

    /// Write the pattern with captured values; `None` if a placeholder has no value.
    pub(crate) fn render(&self, caps: &[(&str, &str)]) -> Option<String> {
        let mut out = String::with_capacity(self.text.len() + 8);
        for (i, seg) in self.segs.iter().enumerate() {
            if i > 0 {
                out.push('.');
            }
            match seg {
                Seg::Lit(l) => out.push_str(l),
                Seg::Var(v) => out.push_str(caps.iter().find(|(k, _)| k == v)?.1),
            }
        }
        Some(out)
    }

    /// True when some name could match both patterns as a prefix (one is, segment by segment,
    /// a prefix of the other once placeholders are allowed to take digit values).
    pub(crate) fn overlaps(&self, other: &Pattern) -> bool {
        self.segs.iter().zip(&other.segs).all(|(a, b)| match (a, b) {
            (Seg::Lit(x), Seg::Lit(y)) => x == y,
            (Seg::Var(_), Seg::Lit(y)) => is_index(y),
            (Seg::Lit(x), Seg::Var(_)) => is_index(x),
            (Seg::Var(_), Seg::Var(_)) => true,
        })
    }
}

/// A block index: one or more ASCII digits.
pub(crate) fn is_index(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Index of the first pattern (after position `i`) that overlaps pattern `i`, if any.
pub(crate) fn first_overlap(patterns: &[&Pattern]) -> Option<(usize, usize)> {
    for j in 0..patterns.len() {
        for i in 0..j {
            if patterns[i].overlaps(patterns[j]) {
                return Some((i, j));
            }
        }
    }
    None
}

/// Apply `[from, to]` rules to `name`: the rule whose `from` matches the leading segments is
/// used and the remaining segments are appended unchanged. The rules must be prefix-free on the
/// `from` side (checked when the rule file is loaded), so at most one rule matches.
pub(crate) fn map_name(rules: &[(Pattern, Pattern)], forward: bool, name: &str) -> Option<String> {
    let parts: Vec<&str> = name.split('.').collect();
    for (a, b) in rules {
        let (from, to) = if forward { (a, b) } else { (b, a) };
        if let Some(caps) = from.match_prefix(&parts) {
            let mut out = to.render(&caps)?;
            for p in &parts[from.len()..] {
                out.push('.');
                out.push_str(p);
            }
            return Some(out);
        }
    }
    None
}

/// Sequential whole-key `str.replace`, as the diffusers conversion scripts do it.
pub(crate) fn replace_all(rules: &[(String, String)], name: &str) -> String {
    let mut out = name.to_string();
    for (from, to) in rules {
        if out.contains(from.as_str()) {
            out = out.replace(from.as_str(), to);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::parse(s).unwrap()
    }

    #[test]
    fn parse_rejects() {
        for bad in ["", "a..b", "a.{n", "a.{N}", "a.x{n}", "{n}.{n}", "a.{}"] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn anchored_matching() {
        let rules = vec![
            (p("blocks.{n}.cross_attn.k"), p("blocks.{n}.attn2.to_k")),
            (p("blocks.{n}.cross_attn.k_img"), p("blocks.{n}.attn2.add_k_proj")),
        ];
        assert_eq!(map_name(&rules, true, "blocks.12.cross_attn.k_img.weight").unwrap(), "blocks.12.attn2.add_k_proj.weight");
        assert_eq!(map_name(&rules, true, "blocks.3.cross_attn.k.bias").unwrap(), "blocks.3.attn2.to_k.bias");
        assert_eq!(map_name(&rules, false, "blocks.3.attn2.to_k.bias").unwrap(), "blocks.3.cross_attn.k.bias");
        assert!(map_name(&rules, true, "blocks.x.cross_attn.k.bias").is_none());
        assert!(map_name(&rules, true, "xblocks.1.cross_attn.k").is_none());
    }

    #[test]
    fn overlap() {
        assert!(p("blocks.{n}.norm2").overlaps(&p("blocks.3.norm2.weight")));
        assert!(p("head").overlaps(&p("head.head")));
        assert!(!p("head.head").overlaps(&p("head.modulation")));
        assert!(!p("blocks.{n}.a").overlaps(&p("blocks.x.a")));
        assert_eq!(first_overlap(&[&p("a.b"), &p("a.c"), &p("a")]), Some((0, 2)));
    }
}
