//! `phasekit bench train`: the seconds of a Phased DMD update per part, through the binary, and
//! timing changes no result.

mod common;

use common::train::{recipe, setup};
use common::{run, run_ok, tests_dir};
use phasekit::train::TrainOptions;

const PARTS: [&str; 9] = [
    "fake: generator rollout (no gradient)",
    "fake: forward",
    "fake: backward",
    "fake: optimiser",
    "generator: rollout and forward",
    "teacher (guided)",
    "fake score (for the generator)",
    "generator: backward",
    "generator: optimiser",
];

#[test]
fn bench_train_splits_an_update_into_its_parts() {
    let r = tests_dir("../recipes/wan2.2-tiny-2phase.toml");
    let o = run_ok(&["--json", "bench", "train", "--recipe", r.to_str().unwrap(), "--updates", "2", "--resolution", "1,8,8"]);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["updates"], 4, "2 phases × 2 updates: {v}");
    assert_eq!(v["ttur"], 2);
    let parts = v["parts"].as_array().unwrap();
    let names: Vec<&str> = parts.iter().map(|p| p["part"].as_str().unwrap()).collect();
    assert_eq!(names, PARTS);
    let mut sum = 0.0;
    for p in parts {
        let (s, per) = (p["seconds"].as_f64().unwrap(), p["per_update"].as_f64().unwrap());
        assert!(s > 0.0 && (per * 4.0 - s).abs() <= 1e-9 * s.max(1.0), "{p}");
        sum += per;
    }
    let spu = v["seconds_per_update"].as_f64().unwrap();
    assert!((spu - sum).abs() <= 1e-9 && spu > 0.0);
    let run_s = v["run_seconds"].as_f64().unwrap();
    assert!(run_s >= sum * 4.0 * 0.999 && v["other_seconds"].as_f64().unwrap() >= 0.0, "{v}");
    assert_eq!(v["memory"].as_array().unwrap().len(), 2, "a peak per phase: {v}");
    assert!(v["memory"][1]["peak_rss_bytes"].as_u64().unwrap() > 0);
    // Text output and bad input.
    let t = run_ok(&["bench", "train", "--recipe", r.to_str().unwrap()]);
    assert!(t.stdout.contains("s / update") && t.stdout.contains("teacher (guided)"), "{}", t.stdout);
    let bad = run(&["bench", "train", "--recipe", r.to_str().unwrap(), "--updates", "0"]);
    assert_eq!(bad.code, Some(2), "{}", bad.stderr);
    let toy = tests_dir("../recipes/toy-phased-4step-4phase.toml");
    let bad = run(&["bench", "train", "--recipe", toy.to_str().unwrap(), "--resolution", "1,4,4"]);
    assert_eq!(bad.code, Some(2), "{}", bad.stderr);
}

/// Timing the parts synchronises the device and reads clocks, nothing else: the same experts.
#[test]
fn timing_changes_no_result() {
    setup();
    let (r, text) = recipe("wan2.2-tiny-2phase.toml");
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("plain"), d.path().join("timed"));
    phasekit::train::train(&r, &text, &a, &TrainOptions::default(), &|_| {}).unwrap();
    phasekit::train::timing::start(&candle_core::Device::Cpu);
    phasekit::train::train(&r, &text, &b, &TrainOptions::default(), &|_| {}).unwrap();
    let parts = phasekit::train::timing::finish();
    assert_eq!(parts.len(), PARTS.len());
    for e in ["expert-0", "expert-1"] {
        let f = |dir: &std::path::Path| std::fs::read(dir.join("experts").join(format!("{e}.safetensors"))).unwrap();
        assert!(f(&a) == f(&b), "{e} differs when timed");
    }
}
