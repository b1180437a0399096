//! The command line on the bundled fixtures: `inspect` (text and `--json`), layout conversion
//! byte for byte against the diffusers-written files, sharded output in the Hugging Face format,
//! `.sha256` sidecars, overwrite protection, help texts, and a cross-check with the Python
//! `safetensors` reader.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{read_model, read_safetensors, run, run_ok};
use serde_json::Value;

fn fixture(rel: &str) -> PathBuf {
    common::tests_dir("fixtures").join(rel)
}

const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";
const INDEX: &str = "diffusion_pytorch_model.safetensors.index.json";

fn json_of(o: &common::Out) -> Value {
    serde_json::from_str(o.stdout.trim()).unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}):\n{}", o.stdout))
}

/// Sort object keys recursively, so that serde_json's pretty printer writes what Python's
/// `json.dumps(v, indent=2, sort_keys=True)` writes (for ASCII text).
fn sorted(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let b: BTreeMap<&String, Value> = m.iter().map(|(k, v)| (k, sorted(v))).collect();
            Value::Object(b.into_iter().map(|(k, v)| (k.clone(), v)).collect())
        }
        Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
        x => x.clone(),
    }
}

fn has_sha256sum() -> bool {
    Command::new("sha256sum").arg("--version").output().is_ok_and(|o| o.status.success())
}

#[test]
fn inspect_reports_family_variant_and_layout() {
    let cases = [
        ("wan22_t2v_tiny/original", "wan22", "original"),
        ("wan22_t2v_tiny/diffusers", "wan22", "diffusers"),
        ("qwen_image_tiny/diffusers", "qwen_image", "diffusers"),
    ];
    for (rel, family, layout) in cases {
        let dir = fixture(rel);
        let ours = read_model(&dir);
        let params: u64 = ours.values().map(|t| t.shape.iter().product::<u64>()).sum();
        let bytes: usize = ours.values().map(|t| t.data.len()).sum();

        let text = run_ok(&[Path::new("inspect"), &dir]).stdout;
        let line = |key: &str| {
            text.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("{rel}: no '{key}' line in:\n{text}")).to_string()
        };
        assert!(line("family:").contains(family), "{rel}: {}", line("family:"));
        assert!(line("layout:").contains(layout), "{rel}: {}", line("layout:"));
        assert!(line("format:").contains("safetensors"), "{rel}");
        assert!(line("parameters:").contains(&params.to_string()), "{rel}: {} vs {params}", line("parameters:"));
        assert!(line("tensors:").contains(&ours.len().to_string()), "{rel}");

        let v = json_of(&run_ok(&[Path::new("--json"), Path::new("inspect"), &dir]));
        assert_eq!(v["format"], "safetensors", "{rel}");
        assert_eq!(v["detection"]["family"], family, "{rel}");
        assert_eq!(v["detection"]["layout"], layout, "{rel}");
        assert_eq!(v["detection"]["prefix"], "", "{rel}");
        let variant = v["detection"]["variant"].as_str().expect("variant is a string");
        assert!(!variant.is_empty(), "{rel}: empty variant");
        assert_eq!(v["tensors"], ours.len(), "{rel}");
        assert_eq!(v["params"], params, "{rel}");
        assert_eq!(v["data_bytes"], bytes, "{rel}");
        assert_eq!(v["dtypes"]["F32"]["tensors"], ours.len(), "{rel}: fixtures are all F32");
        assert_eq!(v["detection"]["num_layers"], 2, "{rel}");
        assert!(v["config_path"].as_str().is_some_and(|p| p.ends_with("config.json")), "{rel}");
        // The text variant line says the same as the JSON.
        assert!(line("family:").contains(variant), "{rel}");
    }
}

#[test]
fn inspect_of_a_single_file_and_of_a_missing_path() {
    let file = fixture("wan22_t2v_tiny/diffusers").join(WEIGHTS);
    let v = json_of(&run_ok(&[Path::new("--json"), Path::new("inspect"), &file]));
    assert_eq!(v["detection"]["family"], "wan22");
    assert_eq!(v["metadata"]["format"], "pt");
    let o = run(&["inspect", "/nonexistent/phasekit/model.safetensors"]);
    assert_eq!(o.code, Some(3), "{}", o.both());
    let v = json_of(&run(&["--json", "inspect", "/nonexistent/phasekit/model.safetensors"]));
    assert_eq!(v["ok"], false);
    assert_eq!(v["error"]["kind"], "io");
    assert_eq!(v["error"]["exit_code"], 3);
    assert!(v["error"]["path"].as_str().unwrap().ends_with("model.safetensors"));
}

#[test]
fn convert_wan_original_to_diffusers_and_back_is_byte_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let diff = tmp.path().join("diffusers");
    let orig = tmp.path().join("original");
    let o = run_ok(&[Path::new("convert"), &fixture("wan22_t2v_tiny/original"), &diff, Path::new("--layout"), Path::new("diffusers")]);
    assert!(o.stdout.contains("converted"), "{}", o.stdout);
    common::assert_same_tensors(&read_model(&diff), &read_model(&fixture("wan22_t2v_tiny/diffusers")), "original → diffusers");
    // Same tensors, same order, same header rules and metadata as diffusers' own writer: the
    // whole file is identical.
    let ours = std::fs::read(diff.join(WEIGHTS)).unwrap();
    let theirs = std::fs::read(fixture("wan22_t2v_tiny/diffusers").join(WEIGHTS)).unwrap();
    assert!(ours == theirs, "original → diffusers: the file differs from the one diffusers wrote");
    // The config is translated to the diffusers dialect. `rope_max_seq_len` is not in the
    // original config (Wan uses a fixed 1024 table; the fixture was saved with 64), and
    // `_diffusers_version` names the writer.
    let cfg: Value = serde_json::from_slice(&std::fs::read(diff.join("config.json")).unwrap()).unwrap();
    let want: Value = serde_json::from_slice(&std::fs::read(fixture("wan22_t2v_tiny/diffusers/config.json")).unwrap()).unwrap();
    for (k, v) in want.as_object().unwrap() {
        if k == "_diffusers_version" || k == "rope_max_seq_len" {
            continue;
        }
        assert_eq!(&cfg[k], v, "converted config.json key {k}");
    }

    run_ok(&[Path::new("convert"), &diff, &orig, Path::new("--layout"), Path::new("original")]);
    common::assert_same_tensors(&read_model(&orig), &read_model(&fixture("wan22_t2v_tiny/original")), "diffusers → original");
    let cfg: Value = serde_json::from_slice(&std::fs::read(orig.join("config.json")).unwrap()).unwrap();
    for k in ["dim", "ffn_dim", "freq_dim", "in_dim", "out_dim", "num_heads", "num_layers", "text_dim"] {
        let want: Value = serde_json::from_slice(&std::fs::read(fixture("wan22_t2v_tiny/original/config.json")).unwrap()).unwrap();
        assert_eq!(cfg[k], want[k], "round-tripped original config.json key {k}");
    }
    run_ok(&[Path::new("verify"), &orig]);
    let v = json_of(&run_ok(&[Path::new("--json"), Path::new("inspect"), &orig]));
    assert_eq!(v["detection"]["layout"], "original");
}

#[test]
fn convert_qwen_to_comfy_file_and_back() {
    let tmp = tempfile::tempdir().unwrap();
    let comfy = tmp.path().join("qwen_comfy.safetensors");
    let back = tmp.path().join("back");
    let src = fixture("qwen_image_tiny/diffusers");
    run_ok(&[Path::new("convert"), &src, &comfy, Path::new("--layout"), Path::new("comfy"), Path::new("--comfy-prefix")]);
    let c = read_safetensors(&comfy);
    assert!(c.tensors.keys().all(|k| k.starts_with("model.diffusion_model.")), "--comfy-prefix: every name carries the prefix");
    let v = json_of(&run_ok(&[Path::new("--json"), Path::new("inspect"), &comfy]));
    assert_eq!(v["detection"]["prefix"], "model.diffusion_model.");
    run_ok(&[Path::new("convert"), &comfy, &back, Path::new("--layout"), Path::new("diffusers")]);
    common::assert_same_tensors(&read_model(&back), &read_model(&src), "qwen diffusers → comfy → diffusers");
}

#[test]
fn sharded_output_follows_huggingface_and_converts_back() {
    let tmp = tempfile::tempdir().unwrap();
    let sharded = tmp.path().join("sharded");
    let src = fixture("wan22_t2v_tiny/diffusers");
    let max = 40_000u64;
    run_ok(&[Path::new("convert"), &src, &sharded, Path::new("--shard-size"), Path::new("40KB")]);

    // Names: diffusion_pytorch_model-0000i-of-0000N.safetensors, the index, the config; nothing else.
    let index_text = std::fs::read_to_string(sharded.join(INDEX)).expect("index written");
    let index: Value = serde_json::from_str(&index_text).unwrap();
    let mut shard_names: Vec<String> = index["weight_map"].as_object().unwrap().values().map(|v| v.as_str().unwrap().to_string()).collect();
    shard_names.sort();
    shard_names.dedup();
    let n = shard_names.len();
    assert!(n >= 3, "a 148 KB model in 40 KB shards gives at least 3 shards, got {n}");
    let want: Vec<String> = (1..=n).map(|i| format!("diffusion_pytorch_model-{i:05}-of-{n:05}.safetensors")).collect();
    assert_eq!(shard_names, want);
    let mut files = common::list_files(&sharded);
    files.sort();
    let mut expect_files = want.clone();
    expect_files.push(INDEX.into());
    expect_files.push("config.json".into());
    expect_files.sort();
    assert_eq!(files, expect_files, "files in the sharded folder");

    // Index: json.dumps(indent=2, sort_keys=True) + "\n", total_size = sum of tensor bytes.
    let mut pretty = serde_json::to_string_pretty(&sorted(&index)).unwrap();
    pretty.push('\n');
    assert_eq!(index_text, pretty, "index text is not json.dumps(indent=2, sort_keys=True)");
    let tensors = read_model(&sharded);
    let total: usize = tensors.values().map(|t| t.data.len()).sum();
    assert_eq!(index["metadata"]["total_size"], total as u64);
    assert_eq!(index["weight_map"].as_object().unwrap().len(), tensors.len());
    if common::python_ok("import json") {
        let py = Command::new("python3")
            .args(["-c", "import json,sys; sys.stdout.write(json.dumps(json.load(open(sys.argv[1])), indent=2, sort_keys=True) + '\\n')"])
            .arg(sharded.join(INDEX))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&py.stdout), index_text, "Python's json.dumps formats the index differently");
    }

    // Every shard: each tensor where the index says, at most `max` bytes unless it holds one
    // tensor (huggingface_hub's rule), metadata format=pt as diffusers writes it.
    for s in &want {
        let f = read_safetensors(&sharded.join(s));
        let bytes: usize = f.tensors.values().map(|t| t.data.len()).sum();
        assert!(bytes as u64 <= max || f.tensors.len() == 1, "{s}: {bytes} bytes of tensors over the 40 KB limit");
        for k in f.tensors.keys() {
            assert_eq!(index["weight_map"][k], s.as_str(), "weight_map of {k}");
        }
        assert_eq!(f.metadata.as_ref().and_then(|m| m.get("format")).map(String::as_str), Some("pt"), "{s}: __metadata__");
        assert_eq!(f.header_len % 8, 0, "{s}: header padded to 8 bytes");
    }
    common::assert_same_tensors(&tensors, &read_model(&src), "sharded");

    // It verifies (as a folder and through its index), inspects as sharded, and converts back.
    run_ok(&[Path::new("verify"), &sharded]);
    run_ok(&[Path::new("verify"), &sharded.join(INDEX)]);
    let v = json_of(&run_ok(&[Path::new("--json"), Path::new("inspect"), &sharded]));
    assert_eq!(v["files"].as_array().unwrap().len(), n);
    assert_eq!(v["index_total_size"], total as u64);
    assert_eq!(v["detection"]["family"], "wan22");
    let single = tmp.path().join("single");
    run_ok(&[Path::new("convert"), &sharded, &single]);
    assert!(
        std::fs::read(single.join(WEIGHTS)).unwrap() == std::fs::read(src.join(WEIGHTS)).unwrap(),
        "sharded → single file is not the original file byte for byte"
    );
    let orig = tmp.path().join("orig");
    run_ok(&[Path::new("convert"), &sharded.join(INDEX), &orig, Path::new("--layout"), Path::new("original")]);
    common::assert_same_tensors(&read_model(&orig), &read_model(&fixture("wan22_t2v_tiny/original")), "sharded diffusers → original");
}

/// Flip one byte near the end of a file (in the tensor data, so the structure stays valid).
fn flip_last_byte(p: &Path) {
    let mut b = std::fs::read(p).unwrap();
    let i = b.len() - 3;
    b[i] ^= 0x40;
    std::fs::write(p, b).unwrap();
}

#[test]
fn sha256_sidecars_check_with_sha256sum_and_verify_catches_a_flipped_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("model.safetensors");
    let folder = tmp.path().join("sharded");
    let src = fixture("wan22_t2v_tiny/original");
    let o = json_of(&run_ok(&[Path::new("--json"), Path::new("convert"), &src, &file, Path::new("--sha256")]));
    let digest = o["report"]["files"][0]["sha256"].as_str().expect("report has the sha256").to_string();
    let sidecar = tmp.path().join("model.safetensors.sha256");
    assert_eq!(std::fs::read_to_string(&sidecar).unwrap(), format!("{digest}  model.safetensors\n"));
    run_ok(&[Path::new("convert"), &src, &folder, Path::new("--sha256"), Path::new("--shard-size"), Path::new("50KB")]);
    let sidecars: Vec<PathBuf> =
        common::list_files(&folder).into_iter().filter(|f| f.ends_with(".sha256")).map(|f| folder.join(f)).collect();
    let shards = common::list_files(&folder).into_iter().filter(|f| f.ends_with(".safetensors")).count();
    assert_eq!(sidecars.len(), shards + 1, "one sidecar per shard and one for the index: {sidecars:?}");

    if has_sha256sum() {
        for sc in std::iter::once(&sidecar).chain(&sidecars) {
            let o = Command::new("sha256sum").arg("-c").arg(sc.file_name().unwrap()).current_dir(sc.parent().unwrap()).output().unwrap();
            assert!(
                o.status.success(),
                "sha256sum -c {}: {}{}",
                sc.display(),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
    } else {
        println!("skipped sha256sum -c: sha256sum not found");
    }

    run_ok(&[Path::new("verify"), &file]);
    run_ok(&[Path::new("verify"), &folder]);
    flip_last_byte(&file);
    let o = run(&[Path::new("verify"), &file]);
    assert_eq!(o.code, Some(8), "verify after flipping a byte: {}", o.both());
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", o.stderr);
    assert!(lines[0].starts_with("phasekit: error: ") && lines[0].contains("model.safetensors"), "{}", lines[0]);
    assert!(o.stdout.contains("FAIL"), "the check list shows the failure: {}", o.stdout);
    // With --json: one object (the checks and the error), nothing on stderr, the same exit code.
    let o = run(&[Path::new("--json"), Path::new("verify"), &file]);
    assert_eq!(o.code, Some(8), "verify --json after flipping a byte: {}", o.both());
    assert!(o.stderr.is_empty(), "{}", o.stderr);
    let v = json_of(&o);
    assert_eq!(
        (&v["ok"], &v["error"]["kind"], &v["error"]["exit_code"]),
        (&Value::Bool(false), &Value::from("integrity"), &Value::from(8))
    );
    assert!(v["checks"].as_array().unwrap().iter().any(|c| c["ok"] == false && c["check"] == "sha256"), "{v}");
    // inspect reads headers only: the flipped data byte does not matter to it.
    run_ok(&[Path::new("inspect"), &file]);

    let shard = folder.join(format!("diffusion_pytorch_model-00002-of-{shards:05}.safetensors"));
    flip_last_byte(&shard);
    let o = run(&[Path::new("verify"), &folder]);
    assert_eq!(o.code, Some(8), "verify of the sharded folder after flipping a byte: {}", o.both());
    assert!(o.stderr.contains("00002-of-"), "the error names the shard: {}", o.stderr);
}

#[test]
fn refuses_to_overwrite_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("wan22_t2v_tiny/diffusers");
    for out in [tmp.path().join("out.safetensors"), tmp.path().join("out_folder")] {
        if out.extension().is_some() {
            std::fs::write(&out, b"precious").unwrap();
        } else {
            std::fs::create_dir(&out).unwrap();
            std::fs::write(out.join("keep.txt"), b"precious").unwrap();
        }
        let o = run(&[Path::new("convert"), &src, &out]);
        assert_eq!(o.code, Some(2), "{}: {}", out.display(), o.both());
        assert_eq!(o.stderr.lines().count(), 1, "{}", o.stderr);
        assert!(o.stderr.starts_with("phasekit: error: ") && o.stderr.contains("--force"), "{}", o.stderr);
        let v = json_of(&run(&[Path::new("--json"), Path::new("convert"), &src, &out]));
        assert_eq!(v["error"]["kind"], "usage");
        let kept = if out.is_file() { std::fs::read(&out).unwrap() } else { std::fs::read(out.join("keep.txt")).unwrap() };
        assert_eq!(kept, b"precious", "{}: the existing output was touched", out.display());

        run_ok(&[Path::new("convert"), &src, &out, Path::new("--force")]);
        common::assert_same_tensors(&read_model(&out), &read_model(&src), "--force");
        assert!(!out.join("keep.txt").exists(), "--force replaces the folder");
    }
    let left: Vec<String> = common::list_files(tmp.path()).into_iter().filter(|f| f.contains("phasekit-tmp")).collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

#[test]
fn usage_errors_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("wan22_t2v_tiny/diffusers");
    let out = tmp.path().join("o.safetensors");
    let cases: Vec<Vec<&std::ffi::OsStr>> = vec![
        vec!["convert".as_ref(), src.as_os_str(), out.as_os_str(), "--quant".as_ref(), "Q8_0".as_ref()],
        vec!["convert".as_ref(), src.as_os_str(), out.as_os_str(), "--shard-size".as_ref(), "5XB".as_ref()],
        vec!["convert".as_ref(), src.as_os_str(), out.as_os_str(), "--layout".as_ref(), "sideways".as_ref()],
        vec!["convert".as_ref(), src.as_os_str()],
        vec!["inspect".as_ref(), src.as_os_str(), "--no-such-flag".as_ref()],
        vec!["frobnicate".as_ref()],
    ];
    for args in cases {
        let o = run(&args);
        assert_eq!(o.code, Some(2), "{args:?}: {}", o.both());
        assert!(!o.panicked(), "{args:?}: {}", o.both());
        assert!(!out.exists(), "{args:?} wrote an output");
        // With --json, the usage error is one JSON object on stdout like every other error.
        let mut with_json: Vec<&std::ffi::OsStr> = vec!["--json".as_ref()];
        with_json.extend(args.iter().copied());
        let o = run(&with_json);
        assert_eq!(o.code, Some(2), "{with_json:?}: {}", o.both());
        let v: Value = serde_json::from_str(o.stdout.trim()).unwrap_or_else(|e| panic!("{with_json:?}: not JSON ({e}): {}", o.both()));
        assert_eq!(v["error"]["kind"], "usage", "{v}");
        assert_eq!(v["error"]["exit_code"], 2);
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }
}

#[test]
fn help_of_each_command_mentions_its_flags() {
    let top = run_ok(&["--help"]).stdout;
    for w in ["inspect", "convert", "verify", "--json", "--quiet", "Exit codes"] {
        assert!(top.contains(w), "phasekit --help lacks {w}:\n{top}");
    }
    let flags: [(&str, &[&str]); 3] = [
        ("inspect", &["--json", "--quiet", "PATH"]),
        ("verify", &["--json", "--quiet", "PATH"]),
        (
            "convert",
            &[
                "--layout",
                "--dtype",
                "--format",
                "--quant",
                "--shard-size",
                "--fp8-scale",
                "--comfy-prefix",
                "--drop-metadata",
                "--sha256",
                "--force",
                "--threads",
                "--json",
                "--quiet",
                "original",
                "diffusers",
                "comfy",
                "fp8-e4m3",
                "Q8_0",
            ],
        ),
    ];
    for (cmd, words) in flags {
        let h = run_ok(&[cmd, "--help"]).stdout;
        for w in words {
            assert!(h.contains(w), "phasekit {cmd} --help lacks {w}:\n{h}");
        }
        // `help <cmd>` says the same.
        assert_eq!(run_ok(&["help", cmd]).stdout, h, "phasekit help {cmd}");
    }
    let v = run_ok(&["--version"]).stdout;
    assert!(v.starts_with("phasekit "), "{v}");
}

#[test]
fn convert_json_report_describes_the_output() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("w.safetensors");
    let v = json_of(&run_ok(&[
        Path::new("--json"),
        Path::new("convert"),
        &fixture("wan22_t2v_tiny/original"),
        &out,
        Path::new("--layout"),
        Path::new("diffusers"),
    ]));
    assert_eq!(v["ok"], true);
    let r = &v["report"];
    assert_eq!(r["family"], "wan22");
    assert_eq!(r["from_layout"], "original");
    assert_eq!(r["to_layout"], "diffusers");
    assert_eq!(r["tensors"], 69);
    assert_eq!(r["bytes_out"], std::fs::metadata(&out).unwrap().len());
    assert_eq!(r["files"][0]["path"].as_str().map(PathBuf::from), Some(out.clone()));
    assert!(r["files"][0]["sha256"].is_null(), "no digest without --sha256");
}

/// The Python reference reader loads what we write with equal values (skipped without
/// `safetensors` and `numpy`).
#[test]
fn python_safetensors_reads_our_outputs() {
    if !common::python_ok("import safetensors.numpy, numpy") {
        println!("skipped: python3 with safetensors and numpy not found");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("wan22_t2v_tiny/diffusers");
    let single = tmp.path().join("single.safetensors");
    let sharded = tmp.path().join("sharded");
    let f16 = tmp.path().join("f16.safetensors");
    run_ok(&[Path::new("convert"), &fixture("wan22_t2v_tiny/original"), &single, Path::new("--layout"), Path::new("diffusers")]);
    run_ok(&[Path::new("convert"), &src, &sharded, Path::new("--shard-size"), Path::new("30KB")]);
    run_ok(&[Path::new("convert"), &src, &f16, Path::new("--dtype"), Path::new("f16")]);
    let script = r#"
import json, os, sys
import numpy as np
from safetensors.numpy import load_file
ref = load_file(sys.argv[1])
single = load_file(sys.argv[2])
sharded_dir = sys.argv[3]
f16 = load_file(sys.argv[4])
def same(a, b, what):
    assert sorted(a) == sorted(b), what + ": names differ"
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, "%s: %s dtype/shape" % (what, k)
        assert np.array_equal(a[k], b[k]), "%s: %s values" % (what, k)
same(single, ref, "original -> diffusers")
index = json.load(open(os.path.join(sharded_dir, "diffusion_pytorch_model.safetensors.index.json")))
merged = {}
for shard in sorted(set(index["weight_map"].values())):
    part = load_file(os.path.join(sharded_dir, shard))
    for k in part:
        assert index["weight_map"][k] == shard, k
    merged.update(part)
same(merged, ref, "sharded")
assert index["metadata"]["total_size"] == sum(v.nbytes for v in ref.values())
# f32 -> f16 casts round to nearest even, like numpy.
same(f16, {k: v.astype(np.float16) for k, v in ref.items()}, "--dtype f16")
print("python safetensors agrees")
"#;
    let o = Command::new("python3").arg("-c").arg(script).arg(src.join(WEIGHTS)).arg(&single).arg(&sharded).arg(&f16).output().unwrap();
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn wan_repo_folder_converts_both_experts() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("Wan2.2-T2V-A14B");
    copy_dir(&fixture("wan22_t2v_tiny/original"), &repo.join("high_noise_model"));
    copy_dir(&fixture("wan22_t2v_tiny/original"), &repo.join("low_noise_model"));

    let v = json_of(&run_ok(&[Path::new("--json"), Path::new("inspect"), &repo]));
    let roles: Vec<&str> = v["models"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["high_noise_model", "low_noise_model"]);
    run_ok(&[Path::new("verify"), &repo]);

    let diff = tmp.path().join("diffusers");
    let v = json_of(&run_ok(&[Path::new("--json"), Path::new("convert"), &repo, &diff, Path::new("--layout"), Path::new("diffusers")]));
    assert_eq!(v["report"]["files"].as_array().unwrap().len(), 4, "two weights files and two configs");
    let models = v["report"]["models"].as_array().unwrap();
    assert_eq!(models.len(), 2, "one report per expert");
    assert_eq!(v["report"]["tensors"], models[0]["tensors"].as_u64().unwrap() + models[1]["tensors"].as_u64().unwrap());
    for m in models {
        assert_eq!(m["from_layout"], "original");
        assert_eq!(m["to_layout"], "diffusers");
        assert_eq!(m["family"], v["report"]["family"], "both experts are the same family");
    }
    let want = std::fs::read(fixture("wan22_t2v_tiny/diffusers").join(WEIGHTS)).unwrap();
    for role in ["transformer", "transformer_2"] {
        assert!(std::fs::read(diff.join(role).join(WEIGHTS)).unwrap() == want, "{role} differs from the diffusers file");
        assert!(diff.join(role).join("config.json").is_file(), "{role}/config.json");
    }
    assert!(!diff.join("high_noise_model").exists());

    let back = tmp.path().join("back");
    run_ok(&[Path::new("convert"), &diff, &back, Path::new("--layout"), Path::new("original")]);
    for role in ["high_noise_model", "low_noise_model"] {
        common::assert_same_tensors(&read_model(&back.join(role)), &read_model(&fixture("wan22_t2v_tiny/original")), role);
    }
}
