//! Shape expressions and the solver that reads quantities back out of tensor shapes.
//!
//! An expression is a product of factors, each an integer or a quantity name, joined by `*` and
//! `/` (`"out_dim * patch_t * patch_h * patch_w"`, `"6 * dim"`, `"dim / heads"`). There are no
//! sums and no brackets: every rule in `formats/*.toml` is a product, and products can be solved
//! for any one unknown factor, which is what lets the same rule both check a shape and derive a
//! config value from it. Division must be exact; a remainder is a conflict, never rounded.

use serde_json::Value;
use std::collections::BTreeMap;

/// Named values: integers for everything a shape depends on, any JSON value otherwise.
pub(crate) type Quantities = BTreeMap<String, Value>;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Factor {
    Lit(u64),
    Var(String),
}

/// A parsed expression: numerator and denominator factors.
#[derive(Clone, Debug)]
pub(crate) struct Expr {
    text: String,
    num: Vec<Factor>,
    den: Vec<Factor>,
}

impl Expr {
    pub(crate) fn parse(text: &str) -> Result<Expr, String> {
        let mut num = Vec::new();
        let mut den = Vec::new();
        let mut into_den = false;
        let mut want_factor = true;
        let bytes = text.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let c = bytes[i];
            if c.is_ascii_whitespace() {
                i += 1;
                continue;
            }
            if want_factor {
                let start = i;
                let factor = if c.is_ascii_digit() {
                    while i < bytes.len() && bytes[i].is_ascii_digit() {
                        i += 1;
                    }
                    let lit: u64 = text[start..i].parse().map_err(|_| format!("number `{}` is too large", &text[start..i]))?;
                    if lit == 0 {
                        return Err(format!("zero factor in `{text}`"));
                    }
                    Factor::Lit(lit)
                } else if c.is_ascii_alphabetic() || c == b'_' {
                    while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                        i += 1;
                    }
                    Factor::Var(text[start..i].to_string())
                } else {
                    return Err(format!("expected a number or a quantity name at `{}` in `{text}`", &text[start..]));
                };
                if into_den {
                    den.push(factor);
                } else {
                    num.push(factor);
                }
                want_factor = false;
            } else {
                match c {
                    b'*' => into_den = false,
                    b'/' => into_den = true,
                    _ => return Err(format!("expected `*` or `/` at `{}` in `{text}`", &text[i..])),
                }
                want_factor = true;
                i += 1;
            }
        }
        if want_factor {
            return Err(if num.is_empty() { "empty expression".to_string() } else { format!("`{text}` ends with an operator") });
        }
        Ok(Expr { text: text.trim().to_string(), num, den })
    }

    pub(crate) fn constant(v: u64) -> Expr {
        Expr { text: v.to_string(), num: vec![Factor::Lit(v)], den: Vec::new() }
    }

    pub(crate) fn text(&self) -> &str {
        &self.text
    }

    /// The quantity names the expression uses.
    pub(crate) fn vars(&self) -> impl Iterator<Item = &str> {
        self.num.iter().chain(&self.den).filter_map(|f| match f {
            Factor::Var(v) => Some(v.as_str()),
            Factor::Lit(_) => None,
        })
    }

    /// The value, or `None` while a quantity is unknown. `Err` when it is not a whole number
    /// (or overflows).
    pub(crate) fn eval(&self, q: &Quantities) -> Option<Result<u64, String>> {
        let n = product(&self.num, q)?;
        let d = product(&self.den, q)?;
        Some(match (n, d) {
            (Some(n), Some(d)) if d != 0 && n % d == 0 => Ok(n / d),
            (Some(n), Some(d)) => Err(format!("{} = {n}/{d} is not a whole number", self.text)),
            _ => Err(format!("{} overflows", self.text)),
        })
    }

    /// Find the one unknown quantity that makes the expression equal `target`.
    fn solve(&self, target: u64, q: &Quantities) -> Solved {
        let mut unknown: Option<(&str, bool)> = None;
        for (f, in_num) in self.num.iter().map(|f| (f, true)).chain(self.den.iter().map(|f| (f, false))) {
            if let Factor::Var(v) = f {
                if get_u64(q, v).is_none() {
                    match unknown {
                        None => unknown = Some((v, in_num)),
                        Some(_) => return Solved::Stuck,
                    }
                }
            }
        }
        let Some((var, in_num)) = unknown else {
            return match self.eval(q) {
                Some(Ok(v)) if v == target => Solved::Holds,
                Some(Ok(v)) => Solved::Conflict(format!("{} = {v}", self.text)),
                Some(Err(e)) => Solved::Conflict(e),
                None => Solved::Stuck,
            };
        };
        let known = |fs: &[Factor]| -> Option<u64> {
            fs.iter().filter(|f| !matches!(f, Factor::Var(v) if v == var)).try_fold(1u64, |acc, f| match f {
                Factor::Lit(l) => acc.checked_mul(*l),
                Factor::Var(v) => acc.checked_mul(get_u64(q, v)?),
            })
        };
        let (Some(kn), Some(kd)) = (known(&self.num), known(&self.den)) else {
            return Solved::Conflict(format!("{} overflows", self.text));
        };
        // in_num: target = var * kn / kd  →  var = target * kd / kn
        // in_den: target = kn / (var * kd) →  var = kn / (target * kd)
        let (a, b) = if in_num { (target.checked_mul(kd), Some(kn)) } else { (Some(kn), target.checked_mul(kd)) };
        match (a, b) {
            (Some(a), Some(b)) if b != 0 && a % b == 0 && a / b != 0 => Solved::Found(var.to_string(), a / b),
            _ => Solved::Conflict(format!("no whole value of {var} gives {} = {target}", self.text)),
        }
    }
}

fn product(fs: &[Factor], q: &Quantities) -> Option<Option<u64>> {
    let mut acc = Some(1u64);
    for f in fs {
        let v = match f {
            Factor::Lit(l) => *l,
            Factor::Var(name) => get_u64(q, name)?,
        };
        acc = acc.and_then(|a| a.checked_mul(v));
    }
    Some(acc)
}

enum Solved {
    Holds,
    Found(String, u64),
    Conflict(String),
    Stuck,
}

/// An integer quantity, if known.
pub(crate) fn get_u64(q: &Quantities, name: &str) -> Option<u64> {
    q.get(name).and_then(Value::as_u64)
}

/// Where an equation comes from, for messages.
#[derive(Clone, Debug)]
pub(crate) enum Origin {
    /// Axis `axis` of tensor `tensor` (as named in the checkpoint), whose shape is `shape`.
    Tensor { tensor: String, shape: Vec<u64>, axis: usize },
    /// A `[relations]` entry.
    Relation,
}

/// `lhs = rhs`, where lhs is a measured number or a quantity.
#[derive(Clone, Debug)]
pub(crate) struct Equation {
    pub lhs: Lhs,
    pub rhs: Expr,
    pub origin: Origin,
}

#[derive(Clone, Debug)]
pub(crate) enum Lhs {
    Value(u64),
    Quantity(String),
}

/// Solve the equations for unknown quantities until nothing changes. Quantities already in `q`
/// are taken as given. Returns the first equation that does not hold.
pub(crate) fn solve(eqs: &[Equation], q: &mut Quantities) -> Result<(), String> {
    loop {
        let mut progress = false;
        for eq in eqs {
            let lhs = match &eq.lhs {
                Lhs::Value(v) => Some(*v),
                Lhs::Quantity(name) => get_u64(q, name),
            };
            match lhs {
                Some(target) => match eq.rhs.solve(target, q) {
                    Solved::Holds | Solved::Stuck => {}
                    Solved::Found(var, v) => {
                        q.insert(var, Value::from(v));
                        progress = true;
                    }
                    Solved::Conflict(why) => return Err(describe(eq, target, &why)),
                },
                None => {
                    if let (Lhs::Quantity(name), Some(r)) = (&eq.lhs, eq.rhs.eval(q)) {
                        match r {
                            Ok(v) => {
                                q.insert(name.clone(), Value::from(v));
                                progress = true;
                            }
                            Err(why) => return Err(format!("{name} = {}: {why}", eq.rhs.text)),
                        }
                    }
                }
            }
        }
        if !progress {
            return Ok(());
        }
    }
}

fn describe(eq: &Equation, target: u64, why: &str) -> String {
    match (&eq.origin, &eq.lhs) {
        (Origin::Tensor { tensor, shape, axis }, _) => format!(
            "tensor `{}` has shape {shape:?}, but its dimension {axis} should be {} ({why})",
            crate::error::clean(tensor),
            eq.rhs.text
        ),
        (_, Lhs::Quantity(name)) => format!("{name} is {target} but {} ({why})", eq.rhs.text),
        (_, Lhs::Value(_)) => format!("{target} ≠ {} ({why})", eq.rhs.text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, u64)]) -> Quantities {
        pairs.iter().map(|(k, v)| (k.to_string(), Value::from(*v))).collect()
    }

    #[test]
    fn parse_and_eval() {
        let e = Expr::parse("out_dim * patch_t*patch_h * patch_w").unwrap();
        assert_eq!(e.vars().collect::<Vec<_>>(), ["out_dim", "patch_t", "patch_h", "patch_w"]);
        let vals = q(&[("out_dim", 16), ("patch_t", 1), ("patch_h", 2), ("patch_w", 2)]);
        assert_eq!(e.eval(&vals).unwrap().unwrap(), 64);
        assert!(e.eval(&q(&[])).is_none());
        assert!(Expr::parse("dim / heads").unwrap().eval(&q(&[("dim", 10), ("heads", 4)])).unwrap().is_err());
        for bad in ["", "dim *", "* dim", "dim + 1", "2 dim", "0 * dim", "99999999999999999999999"] {
            assert!(Expr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn solves_one_unknown_either_side() {
        let eqs = vec![
            Equation { lhs: Lhs::Value(64), rhs: Expr::parse("out * p * p").unwrap(), origin: Origin::Relation },
            Equation { lhs: Lhs::Quantity("dim".into()), rhs: Expr::parse("heads * head_dim").unwrap(), origin: Origin::Relation },
            Equation { lhs: Lhs::Value(8), rhs: Expr::parse("dim / head_dim").unwrap(), origin: Origin::Relation },
        ];
        let mut vals = q(&[("p", 2), ("dim", 256)]);
        solve(&eqs, &mut vals).unwrap();
        assert_eq!(get_u64(&vals, "out"), Some(16));
        assert_eq!(get_u64(&vals, "head_dim"), Some(32));
        assert_eq!(get_u64(&vals, "heads"), Some(8));
        // Two unknowns stay unknown; a remainder is a conflict.
        let mut vals = q(&[]);
        solve(&eqs[..1], &mut vals).unwrap();
        assert!(vals.is_empty());
        let mut vals = q(&[("p", 3)]);
        assert!(solve(&eqs[..1], &mut vals).is_err());
    }
}
