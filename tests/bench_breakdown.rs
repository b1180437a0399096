//! `bench block --breakdown`: every stage of both blocks is timed, forward and backward, with the
//! whole block beside them; `--against` reads PyTorch's twin (`benches/block_torch.py
//! --breakdown`, when torch is installed; otherwise our own JSON stands in for it) and prints the
//! two side by side. Narrow blocks (`--heads 2`, width 256) keep it quick.

mod common;

use std::process::Command;

use common::{bin, s, tests_dir};

const WAN: [&str; 10] = [
    "norm + modulation",
    "qkv projections",
    "q/k norms",
    "rope",
    "attention",
    "output projections",
    "ffn linears",
    "gelu",
    "gated residuals",
    "layout copies",
];
const QWEN: [&str; 11] = [
    "modulation linears",
    "norm + modulation",
    "qkv projections",
    "q/k norms",
    "rope",
    "layout copies",
    "attention",
    "output projections",
    "mlp linears",
    "gelu",
    "gated residuals",
];

fn args(model: &str) -> Vec<String> {
    ["bench", "block", "--model", model, "--heads", "2", "--tokens", "64", "--text-tokens", "8", "--repeats", "3", "--breakdown"]
        .iter()
        .map(|x| x.to_string())
        .collect()
}

#[test]
fn every_stage_is_timed_and_printed_beside_the_other_side() {
    let d = tempfile::tempdir().unwrap();
    let torch = Command::new("python3").args(["-c", "import torch"]).output().is_ok_and(|o| o.status.success());
    for (model, names) in [("wan", &WAN[..]), ("qwen", &QWEN[..])] {
        let o = Command::new(bin()).arg("--json").args(args(model)).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let b = &v["breakdown"];
        let got: Vec<&str> = b["stages"].as_array().unwrap().iter().map(|x| x["name"].as_str().unwrap()).collect();
        assert_eq!(got, names, "{model}");
        for st in b["stages"].as_array().unwrap().iter().chain([&b["block"]]) {
            let (f, w) = (st["forward_ms"].as_f64().unwrap(), st["backward_ms"].as_f64().unwrap());
            assert!(f >= 0.0 && w >= 0.0 && f.is_finite() && w.is_finite(), "{model}: {st}");
        }
        assert!(b["block"]["forward_ms"].as_f64().unwrap() > 0.0 && b["block"]["backward_ms"].as_f64().unwrap() > 0.0);
        // The other side: PyTorch's twin when torch is here, else our own line.
        let other = d.path().join(format!("{model}.json"));
        if torch {
            let py = Command::new("python3")
                .arg(tests_dir("../benches/block_torch.py"))
                .args(["--model", model, "--heads", "2", "--tokens", "64", "--text-tokens", "8", "--repeats", "3"])
                .args(["--dtype", "f32", "--device", "cpu", "--breakdown"])
                .output()
                .unwrap();
            assert!(py.status.success(), "{}", String::from_utf8_lossy(&py.stderr));
            std::fs::write(&other, &py.stdout).unwrap();
            let t: serde_json::Value = serde_json::from_slice(&py.stdout).unwrap();
            let tn: Vec<&str> = t["stages"].as_array().unwrap().iter().map(|x| x["name"].as_str().unwrap()).collect();
            assert_eq!(tn, names, "{model}: the twin's stages");
        } else {
            std::fs::write(&other, serde_json::to_string(b).unwrap()).unwrap();
        }
        let o = Command::new(bin()).args(args(model)).args(["--against", &s(&other)]).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.lines().nth(1).unwrap().contains("torch fwd"), "{text}");
        for n in names.iter().chain(&["rest", "block"]) {
            assert!(text.lines().any(|l| l.starts_with(n)), "{model}: no row {n} in\n{text}");
        }
        let block = text.lines().find(|l| l.starts_with("block")).unwrap();
        assert!(block.trim_end().ends_with('×'), "{block}");
    }
    // A file that is not a breakdown is one clear error.
    let bad = d.path().join("bad.json");
    std::fs::write(&bad, "{\"seconds\": 1}\n").unwrap();
    let o = Command::new(bin()).args(args("wan")).args(["--against", &s(&bad)]).output().unwrap();
    assert_eq!(o.status.code(), Some(5), "{}", String::from_utf8_lossy(&o.stderr));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("bad.json") && e.contains("breakdown") && e.lines().count() == 1, "{e}");
}
