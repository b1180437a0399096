//! `phasekit bench attention` through the real binary: the check passes on the CPU and says what
//! it compared, the timing table has phasekit's rows, and bad requests get their exit codes.

use std::process::Command;

fn phasekit(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_phasekit")).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn check_passes_on_the_cpu_for_every_case_and_dtype() {
    let (code, out, err) = phasekit(&["--json", "bench", "attention", "--check", "--check-tokens", "96"]);
    assert_eq!(code, 0, "{out}{err}");
    let lines: serde_json::Value = serde_json::from_str(&out).unwrap();
    let lines = lines.as_array().unwrap();
    // 4 cases × 3 dtypes, the chunked path against the cpu path (no fused path on the CPU).
    assert_eq!(lines.len(), 12, "{out}");
    for l in lines {
        assert_eq!(l["path"], "chunked");
        assert_eq!(l["pass"], true, "{l}");
        for k in ["o", "dq", "dk", "dv"] {
            let e = l[k].as_f64().unwrap();
            assert!(e.is_finite() && e <= l["bound"].as_f64().unwrap(), "{l}");
        }
    }
}

#[test]
fn timing_table_and_errors() {
    let (code, out, err) = phasekit(&[
        "bench",
        "attention",
        "--tokens",
        "64,96",
        "--heads",
        "2",
        "--head-dim",
        "32",
        "--repeats",
        "1",
        "--no-python",
        "--paths",
        "auto,chunked",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("phasekit cpu") && out.contains("phasekit chunked") && out.contains("skipped: --no-python"), "{out}");
    assert_eq!(out.lines().filter(|l| l.contains("phasekit ")).count(), 4, "{out}");
    // The fused path does not exist on the CPU: its rows say why instead of failing the run.
    let (code, out, _) =
        phasekit(&["bench", "attention", "--tokens", "64", "--heads", "1", "--head-dim", "32", "--no-python", "--paths", "fused"]);
    assert_eq!(code, 0);
    assert!(out.contains("fused path needs CUDA"), "{out}");
    let (code, _, err) = phasekit(&["bench", "attention", "--tokens", "0"]);
    assert_eq!(code, 2, "{err}");
    if cfg!(not(feature = "cuda")) {
        let (code, _, err) = phasekit(&["bench", "attention", "--device", "cuda", "--check"]);
        assert_eq!(code, 7, "{err}");
        assert!(err.contains("built without CUDA"), "{err}");
    }
}
