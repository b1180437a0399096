//! `phasekit bench toy-step` at a tiny count (text and `--json`), and its PyTorch twin
//! `benches/toy_torch.py` for a few updates. The torch parts are skipped, with a message, when
//! `python3 -c 'import torch'` fails.

mod common;

use std::path::Path;
use std::process::Command;

use common::run_ok;
use serde_json::Value;

fn have_torch() -> bool {
    let ok = phasekit::train::speed::python_has_torch();
    if !ok {
        eprintln!("skipped: python3/torch not available");
    }
    ok
}

const TINY: [&str; 6] = ["--updates", "8", "--warmup", "2", "--pretrain-steps", "5"];

fn line_of(stdout: &str) -> Value {
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{stdout}"));
    let lines = v.as_array().expect("an array of bench lines");
    assert_eq!(lines.len(), 1, "{v}");
    lines[0].clone()
}

#[test]
fn toy_step_without_python_times_phasekit_only() {
    let mut args = vec!["--json", "bench", "toy-step", "--no-python"];
    args.extend(TINY);
    let l = line_of(&run_ok(&args).stdout);
    let ms = l["value"].as_f64().unwrap();
    assert!(ms > 0.0 && ms.is_finite(), "{l}");
    assert_eq!(l["unit"], "ms");
    assert!(l["ratio"].is_null() && l["baseline_value"].is_null(), "{l}");
    assert!(l["note"].as_str().unwrap().starts_with("skipped"), "{l}");
    // The text form is one rendered line.
    let mut args = vec!["bench", "toy-step", "--no-python"];
    args.extend(TINY);
    let o = run_ok(&args);
    assert!(o.stdout.contains("toy generator update (phased4") && o.stdout.contains(" ms "), "{}", o.stdout);
}

#[test]
fn toy_step_reports_a_ratio_against_pytorch() {
    if !have_torch() {
        return;
    }
    let mut args = vec!["--json", "bench", "toy-step"];
    args.extend(TINY);
    let l = line_of(&run_ok(&args).stdout);
    let (ours, theirs, ratio) = (l["value"].as_f64().unwrap(), l["baseline_value"].as_f64().unwrap(), l["ratio"].as_f64().unwrap());
    assert!(ours > 0.0 && theirs > 0.0, "{l}");
    assert!((ratio - theirs / ours).abs() < 1e-9 * ratio, "{l}");
    assert!(l["baseline"].as_str().unwrap().starts_with("PyTorch"), "{l}");
}

#[test]
fn torch_twin_runs_and_prints_its_timing_json() {
    if !have_torch() {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/toy_torch.py");
    let out =
        Command::new("python3").arg(&script).args(["--updates", "4", "--warmup", "1", "--batch", "32"]).output().expect("run python3");
    assert!(out.status.success(), "toy_torch.py failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    assert_eq!(
        (v["updates"].as_u64(), v["timed"].as_u64(), v["threads"].as_u64(), v["batch"].as_u64()),
        (Some(4), Some(3), Some(1), Some(32))
    );
    let med = v["ms_per_update_median"].as_f64().unwrap();
    assert!(med > 0.0 && med.is_finite() && v["ms_per_update_mean"].as_f64().unwrap() > 0.0, "{v}");
    // The binary runs the embedded copy: it must be this file.
    assert_eq!(std::fs::read_to_string(&script).unwrap(), phasekit::train::speed::TORCH_TWIN);
}
