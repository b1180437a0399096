//! Helpers shared by the integration tests: run the real binary (with a timeout), read
//! safetensors files and sharded folders independently of phasekit's own reader, find fixtures;
//! key sets for the layout tests ([`keys`]) and fixture forward passes for the model tests
//! ([`model`]), and the training tests' setup and recipes ([`train`]).
#![allow(dead_code)]

pub mod keys;
pub mod model;
pub mod train;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A path as a command-line argument.
pub fn s(p: &Path) -> String {
    p.display().to_string()
}

/// The sha256 of a file, hex.
pub fn sha(p: &Path) -> String {
    phasekit::hash::sha256_hex(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
}

/// The phasekit binary built for this test run.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_phasekit")
}

/// `tests/<rel>` in the source tree.
pub fn tests_dir(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join(rel)
}

/// `tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    tests_dir("fixtures").join(rel)
}

/// What one run of the binary did.
#[derive(Debug)]
pub struct Out {
    /// Exit code; `None` when killed by a signal or by the timeout.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

impl Out {
    /// Both streams, for messages.
    pub fn both(&self) -> String {
        format!("stdout: {}\nstderr: {}", self.stdout.trim_end(), self.stderr.trim_end())
    }
    /// A panic (or an abort that mentions backtraces) anywhere in the output.
    pub fn panicked(&self) -> bool {
        let all = format!("{}{}", self.stdout, self.stderr);
        all.contains("panicked") || all.contains("RUST_BACKTRACE")
    }
}

/// Run phasekit with `args`; killed after `timeout`.
pub fn run_with_timeout<S: AsRef<OsStr>>(args: &[S], timeout: Duration) -> Out {
    let mut child = Command::new(bin())
        .args(args)
        // A panic then prints "run with `RUST_BACKTRACE=1`", which the tests look for.
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn phasekit");
    // Drain both pipes on threads so a chatty child cannot block on a full pipe.
    let mut so = child.stdout.take().expect("stdout");
    let mut se = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            timed_out = true;
            break child.wait().expect("wait after kill");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = String::from_utf8_lossy(&t_out.join().expect("stdout thread")).into_owned();
    let stderr = String::from_utf8_lossy(&t_err.join().expect("stderr thread")).into_owned();
    Out { code: if timed_out { None } else { status.code() }, stdout, stderr, timed_out }
}

/// Run phasekit with `args` (2-minute timeout).
pub fn run<S: AsRef<OsStr>>(args: &[S]) -> Out {
    run_with_timeout(args, Duration::from_secs(120))
}

/// Run phasekit and require exit 0.
pub fn run_ok<S: AsRef<OsStr>>(args: &[S]) -> Out {
    let o = run(args);
    let shown: Vec<String> = args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect();
    assert_eq!(o.code, Some(0), "phasekit {} failed:\n{}", shown.join(" "), o.both());
    o
}

/// One tensor of a safetensors file, read by this test helper (not by phasekit).
#[derive(Debug, Clone, PartialEq)]
pub struct StTensor {
    pub dtype: String,
    pub shape: Vec<u64>,
    pub data: Vec<u8>,
}

/// A safetensors file read independently: header length, `__metadata__`, tensors by name.
#[derive(Debug, Clone)]
pub struct StFile {
    pub header_len: u64,
    pub header: serde_json::Map<String, serde_json::Value>,
    pub metadata: Option<BTreeMap<String, String>>,
    pub tensors: BTreeMap<String, StTensor>,
}

/// Read a safetensors file: header length prefix, JSON, and each tensor's bytes.
pub fn read_safetensors(path: &Path) -> StFile {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    let start = 8 + n as usize;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..start]).expect("header JSON");
    let mut tensors = BTreeMap::new();
    let mut metadata = None;
    for (k, v) in &header {
        if k == "__metadata__" {
            metadata = Some(v.as_object().unwrap().iter().map(|(a, b)| (a.clone(), b.as_str().unwrap().to_string())).collect());
            continue;
        }
        let off = v["data_offsets"].as_array().unwrap();
        let (b, e) = (off[0].as_u64().unwrap() as usize, off[1].as_u64().unwrap() as usize);
        tensors.insert(
            k.clone(),
            StTensor {
                dtype: v["dtype"].as_str().unwrap().to_string(),
                shape: v["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect(),
                data: bytes[start + b..start + e].to_vec(),
            },
        );
    }
    StFile { header_len: n, header, metadata, tensors }
}

/// Every tensor of a model: a `.safetensors` file, a folder with one, or a sharded folder (or
/// its index), following the index's `weight_map`.
pub fn read_model(path: &Path) -> BTreeMap<String, StTensor> {
    let index = if path.is_dir() {
        std::fs::read_dir(path).unwrap().map(|e| e.unwrap().path()).find(|p| p.to_string_lossy().ends_with(".safetensors.index.json"))
    } else if path.to_string_lossy().ends_with(".index.json") {
        Some(path.to_path_buf())
    } else {
        None
    };
    match index {
        Some(ix) => {
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&ix).unwrap()).unwrap();
            let dir = ix.parent().unwrap();
            let mut shards: Vec<&str> = v["weight_map"].as_object().unwrap().values().map(|s| s.as_str().unwrap()).collect();
            shards.sort();
            shards.dedup();
            let mut all = BTreeMap::new();
            for s in shards {
                for (k, t) in read_safetensors(&dir.join(s)).tensors {
                    assert!(all.insert(k.clone(), t).is_none(), "tensor {k} in two shards");
                }
            }
            all
        }
        None if path.is_dir() => read_safetensors(&path.join("diffusion_pytorch_model.safetensors")).tensors,
        None => read_safetensors(path).tensors,
    }
}

/// Compare two tensor maps; the message lists the first differences.
pub fn assert_same_tensors(a: &BTreeMap<String, StTensor>, b: &BTreeMap<String, StTensor>, what: &str) {
    let ka: Vec<&String> = a.keys().collect();
    let kb: Vec<&String> = b.keys().collect();
    if ka != kb {
        let only_a: Vec<_> = ka.iter().filter(|k| !b.contains_key(**k)).take(5).collect();
        let only_b: Vec<_> = kb.iter().filter(|k| !a.contains_key(**k)).take(5).collect();
        panic!("{what}: tensor names differ; only left: {only_a:?}, only right: {only_b:?}");
    }
    for (k, t) in a {
        let u = &b[k];
        assert_eq!((&t.dtype, &t.shape), (&u.dtype, &u.shape), "{what}: tensor {k} dtype/shape");
        assert!(t.data == u.data, "{what}: tensor {k} bytes differ");
    }
}

/// Whether `python3 -c <code>` runs and exits 0.
pub fn python_ok(code: &str) -> bool {
    Command::new("python3").args(["-c", code]).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Files (recursively) under `dir`, relative, sorted.
pub fn list_files(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, d: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            }
            out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v.sort();
    v
}
