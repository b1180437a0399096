//! A restricted unpickler: pickle bytecode → a tree of plain values, never code.
//!
//! Python's `pickle` is a small stack machine whose `GLOBAL`/`STACK_GLOBAL` opcodes import any
//! callable and whose `REDUCE`/`NEWOBJ`/`BUILD` call it: loading an untrusted `.pt` with
//! `torch.load(weights_only=False)` runs whatever the file names (`os.system`, `builtins.eval`,
//! any `__reduce__`). This reader interprets the bytecode without calling anything:
//!
//! - **Opcodes**: only those that build plain data (ints, floats, strings, bytes, tuples,
//!   lists, dicts, `None`/bools), the memo, marks, frames, `BINPERSID` (torch's storage
//!   references) and the three that apply a global (`REDUCE`, `NEWOBJ`, `BUILD`). Protocol-0
//!   class instantiation (`INST`, `OBJ`), the extension registry (`EXT1/2/4`), text persistent
//!   ids and out-of-band buffers are refused.
//! - **Globals**: a [`Policy`] lists the `module.name` pairs a file may mention; anything else is
//!   refused where it appears, naming it (`refuses global 'os.system'`). An allowed global is
//!   only a name in the tree: `REDUCE` records "apply this name to these arguments" and the
//!   caller decides what the record means (a tensor, a `torch.Size`, a dataclass).
//! - **Limits** (like the GGUF reader's caps): values ≤ [`MAX_NODES`], nesting ≤
//!   [`MAX_DEPTH`] where the tree is read, strings and bytes no longer than what is left of the
//!   input, memo indices stored sparsely (a huge index costs nothing), integers that fit 64 bits.
//!
//! Values live in an arena ([`Pickle::nodes`]) and refer to each other by index, so the memo
//! shares values instead of copying them (a `BINGET` costs one index whatever it refers to)
//! and a container mutated after it was memoised is mutated everywhere, as in Python.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{clean, Error, Kind, Result};

/// Most values one pickle may create.
pub const MAX_NODES: usize = 1 << 24;
/// Deepest nesting of containers a reader of the tree follows.
pub const MAX_DEPTH: usize = 64;
/// Largest pickle read (torch's `data.pkl` of a 20B-parameter model is about 1 MB).
pub const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// Index of a value in [`Pickle::nodes`].
pub type Id = u32;

/// One value of the tree.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Id>),
    List(Vec<Id>),
    /// Keys in insertion order (`OrderedDict` and `dict` alike).
    Dict(Vec<(Id, Id)>),
    /// An allowed global, `module.name`.
    Global(String, String),
    /// `REDUCE`: the global (or value) `func` applied to the tuple `args`.
    Call {
        func: Id,
        args: Id,
    },
    /// `NEWOBJ` of class `class` with `args`, and the state a later `BUILD` gave it.
    Object {
        class: Id,
        args: Id,
        state: Option<Id>,
    },
    /// `BINPERSID`: a persistent reference (torch: a storage).
    PersId(Id),
}

/// Which globals a pickle may name.
pub struct Policy {
    /// What the allowed globals serve, for the refusal message (`tensor storage`).
    pub purpose: &'static str,
    pub allowed: fn(&str, &str) -> bool,
}

/// A parsed pickle: the arena and the root value.
#[derive(Debug, Clone)]
pub struct Pickle {
    pub nodes: Vec<Node>,
    pub root: Id,
}

impl Pickle {
    pub fn node(&self, id: Id) -> &Node {
        &self.nodes[id as usize]
    }
    /// The global named by `id`, if it is one.
    pub fn global(&self, id: Id) -> Option<(&str, &str)> {
        match self.node(id) {
            Node::Global(m, n) => Some((m.as_str(), n.as_str())),
            _ => None,
        }
    }
    pub fn str(&self, id: Id) -> Option<&str> {
        match self.node(id) {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn int(&self, id: Id) -> Option<i64> {
        match self.node(id) {
            Node::Int(v) => Some(*v),
            Node::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }
    /// The items of a tuple or list.
    pub fn items(&self, id: Id) -> Option<&[Id]> {
        match self.node(id) {
            Node::Tuple(v) | Node::List(v) => Some(v),
            _ => None,
        }
    }
    /// `key → value` of a dict whose keys are strings.
    pub fn str_dict(&self, id: Id) -> Option<Vec<(&str, Id)>> {
        match self.node(id) {
            Node::Dict(kv) => kv.iter().map(|&(k, v)| self.str(k).map(|s| (s, v))).collect(),
            _ => None,
        }
    }
    /// A short description of a value for messages (`dict`, `global os.system`, `int 3`).
    pub fn describe(&self, id: Id) -> String {
        describe(&self.nodes, id)
    }
}

fn describe(nodes: &[Node], id: Id) -> String {
    {
        match &nodes[id as usize] {
            Node::None => "None".into(),
            Node::Bool(b) => format!("bool {b}"),
            Node::Int(v) => format!("int {v}"),
            Node::Float(v) => format!("float {v}"),
            Node::Str(s) => format!("str '{}'", clean(s)),
            Node::Bytes(b) => format!("{} bytes", b.len()),
            Node::Tuple(v) => format!("tuple of {}", v.len()),
            Node::List(v) => format!("list of {}", v.len()),
            Node::Dict(v) => format!("dict of {}", v.len()),
            Node::Global(m, n) => format!("global {m}.{n}"),
            Node::Call { func, .. } => format!("call of {}", describe(nodes, *func)),
            Node::Object { class, .. } => format!("object of {}", describe(nodes, *class)),
            Node::PersId(_) => "persistent id".into(),
        }
    }
}

enum Slot {
    Value(Id),
    Mark,
}

struct Machine<'a> {
    path: &'a Path,
    what: &'a str,
    policy: &'a Policy,
    b: &'a [u8],
    pos: usize,
    nodes: Vec<Node>,
    stack: Vec<Slot>,
    memo: HashMap<u32, Id>,
}

impl Machine<'_> {
    fn err(&self, kind: Kind, msg: impl std::fmt::Display) -> Error {
        Error::at(kind, self.path, format!("{}: {msg}", self.what))
    }
    fn take(&mut self, n: u64, what: &str) -> Result<&[u8]> {
        let left = (self.b.len() - self.pos) as u64;
        if n > left {
            return Err(
                self.err(Kind::Truncated, format!("{what} of {n} bytes at byte {} runs past the end ({left} bytes left)", self.pos))
            );
        }
        let s = &self.b[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1, "an argument")?[0])
    }
    fn le(&mut self, n: usize) -> Result<u64> {
        let s = self.take(n as u64, "an argument")?;
        Ok(s.iter().rev().fold(0u64, |acc, &b| (acc << 8) | b as u64))
    }
    fn line(&mut self) -> Result<String> {
        let rest = &self.b[self.pos..];
        let n = rest.iter().position(|&c| c == b'\n').ok_or_else(|| self.err(Kind::Truncated, "a GLOBAL name has no end of line"))?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| self.err(Kind::Malformed, "a GLOBAL name is not UTF-8"))?.to_string();
        self.pos += n + 1;
        Ok(s)
    }
    fn add(&mut self, n: Node) -> Result<Id> {
        if self.nodes.len() >= MAX_NODES {
            return Err(self.err(Kind::Limit, format!("more than {MAX_NODES} values")));
        }
        self.nodes.push(n);
        Ok((self.nodes.len() - 1) as Id)
    }
    fn push(&mut self, n: Node) -> Result<()> {
        let id = self.add(n)?;
        self.stack.push(Slot::Value(id));
        Ok(())
    }
    fn pop(&mut self, op: &str) -> Result<Id> {
        match self.stack.pop() {
            Some(Slot::Value(id)) => Ok(id),
            Some(Slot::Mark) => Err(self.err(Kind::Malformed, format!("{op} at byte {} found a MARK where it needs a value", self.pos))),
            None => Err(self.err(Kind::Malformed, format!("{op} at byte {} on an empty stack", self.pos))),
        }
    }
    fn top(&self, op: &str) -> Result<Id> {
        match self.stack.last() {
            Some(Slot::Value(id)) => Ok(*id),
            _ => Err(self.err(Kind::Malformed, format!("{op} at byte {} needs a value on the stack", self.pos))),
        }
    }
    /// The values above the topmost MARK (which is removed).
    fn pop_mark(&mut self, op: &str) -> Result<Vec<Id>> {
        let at = self
            .stack
            .iter()
            .rposition(|s| matches!(s, Slot::Mark))
            .ok_or_else(|| self.err(Kind::Malformed, format!("{op} at byte {} without a MARK", self.pos)))?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items.into_iter().map(|s| if let Slot::Value(id) = s { id } else { 0 }).collect())
    }
    fn global(&mut self, module: String, name: String, at: usize) -> Result<()> {
        if !(self.policy.allowed)(&module, &name) {
            return Err(self.err(
                Kind::Malformed,
                format!(
                    "refuses global '{}.{}' at byte {at}: phasekit reads only {} from pickles (no code is run)",
                    clean(&module),
                    clean(&name),
                    self.policy.purpose
                ),
            ));
        }
        self.push(Node::Global(module, name))
    }
    fn set_items(&mut self, target: Id, kv: Vec<Id>, op: &str) -> Result<()> {
        if kv.len() % 2 != 0 {
            return Err(self.err(Kind::Malformed, format!("{op} at byte {} with an odd number of values", self.pos)));
        }
        match &mut self.nodes[target as usize] {
            Node::Dict(d) => {
                d.extend(kv.chunks(2).map(|p| (p[0], p[1])));
                Ok(())
            }
            _ => {
                let d = self.describe(target);
                Err(self.err(Kind::Malformed, format!("{op} at byte {} on a {d}, not a dict", self.pos)))
            }
        }
    }
    fn append(&mut self, target: Id, items: Vec<Id>, op: &str) -> Result<()> {
        match &mut self.nodes[target as usize] {
            Node::List(l) => {
                l.extend(items);
                Ok(())
            }
            _ => {
                let d = self.describe(target);
                Err(self.err(Kind::Malformed, format!("{op} at byte {} on a {d}, not a list", self.pos)))
            }
        }
    }
    fn describe(&self, id: Id) -> String {
        describe(&self.nodes, id)
    }

    fn run(&mut self) -> Result<Id> {
        loop {
            let at = self.pos;
            let Some(&op) = self.b.get(self.pos) else {
                return Err(self.err(Kind::Truncated, format!("ends at byte {} without a STOP opcode", self.pos)));
            };
            self.pos += 1;
            match op {
                0x80 => {
                    let v = self.u8()?;
                    if v > 5 {
                        return Err(self.err(Kind::Unsupported, format!("pickle protocol {v} (phasekit reads protocols 2 to 5)")));
                    }
                }
                0x95 => {
                    self.le(8)?; // FRAME: a length hint
                }
                b'.' => return self.pop("STOP"),
                b'(' => self.stack.push(Slot::Mark),
                b'0' => {
                    self.pop("POP")?;
                }
                b'1' => {
                    self.pop_mark("POP_MARK")?;
                }
                b'2' => {
                    let t = self.top("DUP")?;
                    self.stack.push(Slot::Value(t));
                }
                b'N' => self.push(Node::None)?,
                0x88 => self.push(Node::Bool(true))?,
                0x89 => self.push(Node::Bool(false))?,
                b'J' => {
                    let v = self.le(4)? as u32 as i32;
                    self.push(Node::Int(v as i64))?
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Node::Int(v as i64))?
                }
                b'M' => {
                    let v = self.le(2)?;
                    self.push(Node::Int(v as i64))?
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    if n > 8 {
                        return Err(self.err(
                            Kind::Unsupported,
                            format!("an integer of {n} bytes at byte {at} (phasekit reads integers of up to 64 bits)"),
                        ));
                    }
                    let raw = self.le(n)?;
                    // Two's complement of n bytes.
                    let v = if n == 0 {
                        0
                    } else if n == 8 {
                        raw as i64
                    } else {
                        let shift = 64 - 8 * n as u32;
                        ((raw << shift) as i64) >> shift
                    };
                    self.push(Node::Int(v))?
                }
                b'G' => {
                    let s = self.take(8, "a float")?;
                    let v = f64::from_be_bytes(s.try_into().expect("8 bytes"));
                    self.push(Node::Float(v))?
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => self.le(4)?,
                        0x8c => self.u8()? as u64,
                        _ => self.le(8)?,
                    };
                    let s = self.take(n, "a string")?.to_vec();
                    let s = String::from_utf8(s).map_err(|_| self.err(Kind::Malformed, format!("the string at byte {at} is not UTF-8")))?;
                    self.push(Node::Str(s))?
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'B' => self.le(4)?,
                        b'C' => self.u8()? as u64,
                        _ => self.le(8)?,
                    };
                    let s = self.take(n, "a bytes value")?.to_vec();
                    self.push(Node::Bytes(s))?
                }
                b')' => self.push(Node::Tuple(Vec::new()))?,
                b't' => {
                    let items = self.pop_mark("TUPLE")?;
                    self.push(Node::Tuple(items))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop("TUPLEn")?);
                    }
                    items.reverse();
                    self.push(Node::Tuple(items))?
                }
                b']' => self.push(Node::List(Vec::new()))?,
                b'l' => {
                    let items = self.pop_mark("LIST")?;
                    self.push(Node::List(items))?
                }
                b'a' => {
                    let v = self.pop("APPEND")?;
                    let t = self.top("APPEND")?;
                    self.append(t, vec![v], "APPEND")?
                }
                b'e' => {
                    let items = self.pop_mark("APPENDS")?;
                    let t = self.top("APPENDS")?;
                    self.append(t, items, "APPENDS")?
                }
                b'}' => self.push(Node::Dict(Vec::new()))?,
                b'd' => {
                    let kv = self.pop_mark("DICT")?;
                    let id = self.add(Node::Dict(Vec::new()))?;
                    self.set_items(id, kv, "DICT")?;
                    self.stack.push(Slot::Value(id));
                }
                b's' => {
                    let v = self.pop("SETITEM")?;
                    let k = self.pop("SETITEM")?;
                    let t = self.top("SETITEM")?;
                    self.set_items(t, vec![k, v], "SETITEM")?
                }
                b'u' => {
                    let kv = self.pop_mark("SETITEMS")?;
                    let t = self.top("SETITEMS")?;
                    self.set_items(t, kv, "SETITEMS")?
                }
                b'q' | b'r' | 0x94 => {
                    let idx = match op {
                        b'q' => self.u8()? as u32,
                        b'r' => self.le(4)? as u32,
                        _ => self.memo.len() as u32,
                    };
                    let t = self.top("PUT")?;
                    self.memo.insert(idx, t);
                }
                b'h' | b'j' => {
                    let idx = if op == b'h' { self.u8()? as u32 } else { self.le(4)? as u32 };
                    let id = *self.memo.get(&idx).ok_or_else(|| {
                        self.err(Kind::Malformed, format!("GET at byte {at} of memo entry {idx}, which was never stored"))
                    })?;
                    self.stack.push(Slot::Value(id));
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name, at)?
                }
                0x93 => {
                    let n = self.pop("STACK_GLOBAL")?;
                    let m = self.pop("STACK_GLOBAL")?;
                    let (Node::Str(m), Node::Str(n)) = (&self.nodes[m as usize], &self.nodes[n as usize]) else {
                        return Err(self.err(Kind::Malformed, format!("STACK_GLOBAL at byte {at} needs two strings")));
                    };
                    let (m, n) = (m.clone(), n.clone());
                    self.global(m, n, at)?
                }
                b'R' => {
                    let args = self.pop("REDUCE")?;
                    let func = self.pop("REDUCE")?;
                    if !matches!(self.nodes[args as usize], Node::Tuple(_)) {
                        return Err(self.err(Kind::Malformed, format!("REDUCE at byte {at} with arguments that are not a tuple")));
                    }
                    // An OrderedDict is a dict: later SETITEMS fill it.
                    let empty = matches!(&self.nodes[args as usize], Node::Tuple(v) if v.is_empty());
                    let ordered = matches!(&self.nodes[func as usize], Node::Global(m, n) if m == "collections" && n == "OrderedDict");
                    if ordered && empty {
                        self.push(Node::Dict(Vec::new()))?
                    } else {
                        self.push(Node::Call { func, args })?
                    }
                }
                0x81 => {
                    let args = self.pop("NEWOBJ")?;
                    let class = self.pop("NEWOBJ")?;
                    self.push(Node::Object { class, args, state: None })?
                }
                b'b' => {
                    let state = self.pop("BUILD")?;
                    let t = self.top("BUILD")?;
                    match &mut self.nodes[t as usize] {
                        Node::Object { state: s @ None, .. } => *s = Some(state),
                        // Attributes of a dict subclass (a state dict's `_metadata`): not data.
                        Node::Dict(_) => {}
                        _ => {
                            let d = self.describe(t);
                            return Err(self.err(Kind::Malformed, format!("BUILD at byte {at} on a {d}")));
                        }
                    }
                }
                b'Q' => {
                    let id = self.pop("BINPERSID")?;
                    self.push(Node::PersId(id))?
                }
                other => {
                    let name = match other {
                        b'i' => "INST (protocol-0 object creation)",
                        b'o' => "OBJ (protocol-0 object creation)",
                        0x82..=0x84 => "EXT (extension registry)",
                        b'P' => "PERSID (text persistent id)",
                        0x97 | 0x98 => "an out-of-band buffer",
                        0x92 => "NEWOBJ_EX",
                        b'I' | b'L' | b'F' | b'S' | b'V' | b'p' | b'g' => "a protocol-0 text opcode",
                        _ => "an unknown opcode",
                    };
                    return Err(self.err(Kind::Malformed, format!("opcode 0x{other:02x} at byte {at}: {name} is not allowed")));
                }
            }
        }
    }
}

/// Parse `bytes` (a pickle named `what` inside `path`) under `policy`.
pub fn parse(path: &Path, what: &str, bytes: &[u8], policy: &Policy) -> Result<Pickle> {
    if bytes.len() as u64 > MAX_PICKLE_BYTES {
        return Err(Error::limit(path, format!("{what}: {} bytes of pickle, over the limit of {MAX_PICKLE_BYTES}", bytes.len())));
    }
    let mut m = Machine { path, what, policy, b: bytes, pos: 0, nodes: Vec::new(), stack: Vec::new(), memo: HashMap::new() };
    let root = m.run()?;
    Ok(Pickle { nodes: m.nodes, root })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(_: &str, _: &str) -> bool {
        true
    }
    fn torchish(m: &str, n: &str) -> bool {
        (m, n) == ("collections", "OrderedDict") || m == "torch"
    }
    const ANY: Policy = Policy { purpose: "anything", allowed: any };
    const TORCH: Policy = Policy { purpose: "tensors", allowed: torchish };

    fn p(b: &[u8], policy: &Policy) -> Result<Pickle> {
        parse(Path::new("x.pt"), "data.pkl", b, policy)
    }

    #[test]
    fn plain_values_and_memo() {
        // {'a': [1, 300, -2], 'b': (1.5, 'x', None, True)}, protocol 2, as pickle.dumps writes it.
        let b = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01M,\x01J\xfe\xff\xff\xffeX\x01\x00\x00\x00bq\x03(G?\xf8\x00\x00\x00\x00\x00\x00X\x01\x00\x00\x00xq\x04N\x88tq\x05u.";
        let pk = p(b, &ANY).unwrap();
        let d = pk.str_dict(pk.root).unwrap();
        assert_eq!(d[0].0, "a");
        let items: Vec<i64> = pk.items(d[0].1).unwrap().iter().map(|&i| pk.int(i).unwrap()).collect();
        assert_eq!(items, vec![1, 300, -2]);
        let t = pk.items(d[1].1).unwrap();
        assert_eq!(pk.node(t[0]), &Node::Float(1.5));
        assert_eq!(pk.str(t[1]), Some("x"));
        assert_eq!(pk.node(t[2]), &Node::None);
        assert_eq!(pk.node(t[3]), &Node::Bool(true));
    }

    #[test]
    fn refuses_globals_outside_the_policy() {
        // cos\nsystem\n(X\x02\x00\x00\x00lstR.  — os.system('ls')
        let b = b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00lsq\x01\x85q\x02Rq\x03.";
        let e = p(b, &TORCH).unwrap_err();
        assert_eq!(e.kind(), Kind::Malformed);
        assert!(e.message().contains("refuses global 'os.system' at byte 2"), "{e}");
        // The same through STACK_GLOBAL (protocol 4).
        let b = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93\x8c\x011\x85R.";
        let e = p(b, &TORCH).unwrap_err();
        assert!(e.message().contains("'builtins.eval'"), "{e}");
    }

    #[test]
    fn refuses_code_opcodes_and_bad_memo() {
        for (b, want) in [
            (&b"(X\x02\x00\x00\x00lsios\nsystem\n."[..], "INST"),
            (&b"\x80\x02(X\x01\x00\x00\x00ao."[..], "OBJ"),
            (&b"\x80\x02\x82\x01."[..], "EXT"),
            (&b"\x80\x02Pfoo\n."[..], "PERSID"),
            (&b"\x80\x02j\xff\xff\xff\xff."[..], "never stored"),
        ] {
            let e = p(b, &TORCH).unwrap_err();
            assert!(e.message().contains(want), "{want}: {e}");
        }
        // A huge memo index costs one map entry.
        let pk = p(b"\x80\x02Nr\xf0\xff\xff\xffj\xf0\xff\xff\xff\x86.", &ANY).unwrap();
        assert_eq!(pk.items(pk.root).unwrap().len(), 2);
    }

    #[test]
    fn truncation_and_limits() {
        let e = p(b"\x80\x02X\xff\xff\xff\x7fab", &ANY).unwrap_err();
        assert_eq!(e.kind(), Kind::Truncated, "{e}");
        let e = p(b"\x80\x02N", &ANY).unwrap_err();
        assert_eq!(e.kind(), Kind::Truncated, "{e}");
        let e = p(b"\x80\x09N.", &ANY).unwrap_err();
        assert_eq!(e.kind(), Kind::Unsupported, "{e}");
        // A list nested 100000 deep parses (the tree is flat in memory); readers stop at MAX_DEPTH.
        let mut b = b"\x80\x02".to_vec();
        b.extend(std::iter::repeat_n(b']', 100_000));
        b.extend(std::iter::repeat_n(b'a', 99_999));
        b.push(b'.');
        let pk = p(&b, &ANY).unwrap();
        assert_eq!(pk.nodes.len(), 100_000);
    }

    #[test]
    fn ordered_dict_and_build() {
        // collections.OrderedDict() filled by SETITEMS, then BUILD with attributes (state dicts).
        let b = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01X\x01\x00\x00\x00kK\x07s}X\x09\x00\x00\x00_metadataK\x00sb.";
        let pk = p(b, &TORCH).unwrap();
        let d = pk.str_dict(pk.root).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(pk.int(d[0].1), Some(7));
    }
}
