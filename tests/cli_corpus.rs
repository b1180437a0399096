//! The hostile-input corpus (`tests/corpus/`, written by `tests/corpus/make.py`) through the real
//! binary. For every run listed in `expected.json`:
//! - the exit code is the expected one (the documented class of the failure);
//! - a failure prints exactly one line on stderr, starting `phasekit: error: `, naming the file
//!   and containing the expected words; nothing panics;
//! - with `--json` the same exit code and one JSON object on stdout with `error.kind`;
//! - `convert` leaves no output and no `.phasekit-tmp` file behind when it fails;
//! - nothing is ever written beside the inputs.
//!
//! Cases marked `known_bug` are phasekit bugs on record: their failures are printed, not fatal.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

fn kind_name(code: i64) -> &'static str {
    match code {
        0 => "ok",
        1 => "internal",
        2 => "usage",
        3 => "io",
        4 => "truncated",
        5 => "malformed",
        6 => "inconsistent",
        7 => "unsupported",
        8 => "integrity",
        9 => "limit",
        _ => "?",
    }
}

/// At most 12 lines of output, for failure messages.
fn short(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    if lines.len() <= 12 {
        return s.to_string();
    }
    format!("{}\n... ({} more lines)", lines[..12].join("\n"), lines.len() - 12)
}

struct Run<'a> {
    input: PathBuf,
    names: &'a str,
    out_name: &'a str,
    args: Vec<String>,
    exit: i64,
    contains: &'a str,
}

/// A bug on record that touches every run of one command (`known_bugs` in expected.json).
struct GlobalBug {
    id: String,
    command: String,
    json: bool,
    problem: String,
}

/// Run one command twice (text and `--json`); return what went wrong, and the ids of global
/// known bugs that explained other problems.
fn check_run(r: &Run, bugs: &[GlobalBug], seen: &mut Vec<String>) -> Vec<String> {
    let mut errs = Vec::new();
    for json in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join(r.out_name);
        let mut args: Vec<String> = Vec::new();
        if json {
            args.push("--json".into());
        }
        for a in &r.args {
            args.push(a.replace("{in}", &r.input.to_string_lossy()).replace("{out}", &out.to_string_lossy()));
        }
        let shown = format!("phasekit {}", args.join(" ").replace(&*tmp.path().to_string_lossy(), "$TMP"));
        let o = common::run_with_timeout(&args, Duration::from_secs(60));
        let mut problems: Vec<String> = Vec::new();
        let mut fail = |m: String| problems.push(m);
        if o.timed_out {
            fail("timed out after 60 s".into());
        }
        if o.panicked() {
            fail("panicked".into());
        }
        match o.code {
            None => fail("killed by a signal (abort, stack overflow or OOM?)".into()),
            Some(c) if c as i64 != r.exit => fail(format!("exit {c}, expected {} ({})", r.exit, kind_name(r.exit))),
            _ => {}
        }
        if json {
            match serde_json::from_str::<Value>(o.stdout.trim()) {
                Ok(v) if v.is_object() => {
                    if r.exit != 0 {
                        let kind = v.pointer("/error/kind").and_then(Value::as_str);
                        if kind != Some(kind_name(r.exit)) {
                            fail(format!("--json: error.kind is {kind:?}, expected \"{}\"", kind_name(r.exit)));
                        }
                    }
                }
                Ok(_) => fail("--json: stdout is JSON but not an object".into()),
                Err(e) => fail(format!("--json: stdout is not one JSON value: {e}")),
            }
            if o.stderr.contains("phasekit: error") {
                fail("--json: the error went to stderr too".into());
            }
        } else if r.exit != 0 {
            let lines: Vec<&str> = o.stderr.lines().collect();
            if lines.len() != 1 {
                fail(format!("{} lines on stderr, expected 1", lines.len()));
            }
            let line = lines.first().copied().unwrap_or("");
            if !line.starts_with("phasekit: error: ") {
                fail("stderr does not start with 'phasekit: error: '".into());
            }
            if !line.contains(r.names) {
                fail(format!("the error does not name the file '{}'", r.names));
            }
            if !line.contains(r.contains) {
                fail(format!("the error does not contain '{}'", r.contains));
            }
        } else if o.stderr.contains("phasekit: error") {
            fail("error line on stderr for a successful run".into());
        }
        if r.args[0] == "convert" {
            let left: Vec<String> = common::list_files(tmp.path()).into_iter().filter(|f| f.contains("phasekit-tmp")).collect();
            if !left.is_empty() {
                fail(format!("temporary files left: {left:?}"));
            }
            let exists = out.exists();
            if r.exit != 0 && exists {
                fail("the output exists after a failed convert".into());
            }
            if r.exit == 0 && !exists && o.code == Some(0) {
                fail("convert succeeded but wrote no output".into());
            }
        }
        problems.retain(|p| match bugs.iter().find(|b| b.command == r.args[0] && b.json == json && p.starts_with(&b.problem)) {
            Some(b) => {
                seen.push(b.id.clone());
                false
            }
            None => true,
        });
        if !problems.is_empty() {
            errs.push(format!("{shown}: {}\n      {}", problems.join("; "), short(&o.both()).replace('\n', "\n      ")));
        }
    }
    errs
}

#[test]
fn corpus() {
    let root = common::tests_dir("corpus");
    let spec: Value = serde_json::from_slice(&std::fs::read(root.join("expected.json")).expect("expected.json")).expect("JSON");
    let cases = spec["cases"].as_array().expect("cases");
    let bugs: Vec<GlobalBug> = spec["known_bugs"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| GlobalBug {
                    id: b["id"].as_str().unwrap().into(),
                    command: b["command"].as_str().unwrap().into(),
                    json: b["json"].as_bool().unwrap(),
                    problem: b["problem"].as_str().unwrap().into(),
                })
                .collect()
        })
        .unwrap_or_default();
    let mut seen = Vec::new();
    let before = common::list_files(&root.join("files"));
    let mut failed = Vec::new();
    let mut known = Vec::new();
    let mut fixed = Vec::new();
    let mut runs = 0;
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let input = root.join(c["path"].as_str().unwrap());
        let mut errs = Vec::new();
        for r in c["runs"].as_array().unwrap() {
            let run = Run {
                input: input.clone(),
                names: c["names"].as_str().unwrap(),
                out_name: c["out"].as_str().unwrap(),
                args: r["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect(),
                exit: r["exit"].as_i64().unwrap(),
                contains: r["contains"].as_str().unwrap(),
            };
            runs += 2;
            errs.extend(check_run(&run, &bugs, &mut seen));
        }
        match (c.get("known_bug").and_then(Value::as_str), errs.is_empty()) {
            (Some(bug), false) => known.push(format!("{name}: KNOWN BUG: {bug}\n    {}", errs.join("\n    "))),
            (Some(_), true) => fixed.push(name.to_string()),
            (None, false) => failed.push(format!("{name} ({}):\n    {}", c["what"].as_str().unwrap_or(""), errs.join("\n    "))),
            (None, true) => {}
        }
    }
    for k in &known {
        println!("{k}");
    }
    for b in spec["known_bugs"].as_array().into_iter().flatten() {
        let id = b["id"].as_str().unwrap();
        let n = seen.iter().filter(|s| *s == id).count();
        if n > 0 {
            println!("KNOWN BUG {id} ({n} runs): {}", b["note"].as_str().unwrap_or(""));
        } else {
            println!("known bug {id} did not show up: remove it from tests/corpus/make.py if it is fixed");
        }
    }
    for f in &fixed {
        println!("{f}: marked known_bug but now passes; remove the mark in tests/corpus/make.py");
    }
    let after = common::list_files(&root.join("files"));
    assert_eq!(before, after, "running the corpus wrote or removed files beside the inputs");
    println!("{} cases, {runs} runs: {} failed, {} known bugs", cases.len(), failed.len(), known.len());
    assert!(failed.is_empty(), "{} of {} corpus cases failed:\n{}", failed.len(), cases.len(), failed.join("\n"));
}

/// The checked-in corpus is what `make.py` writes (skipped without python3).
#[test]
fn corpus_matches_generator() {
    let script = common::tests_dir("corpus/make.py");
    if !common::python_ok("import sys; assert sys.version_info >= (3, 8)") {
        println!("skipped: python3 not found");
        return;
    }
    let o = std::process::Command::new("python3").arg(&script).arg("--check").output().expect("python3");
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
}
