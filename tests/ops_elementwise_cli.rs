//! `phasekit bench elementwise` through the real binary: the check (the GPU correctness check of
//! `scripts/gpu-speed.sh`) passes on the CPU for every op and dtype, the timing table has a row
//! per op, and bad requests get their exit codes.

mod emu_support;

use std::process::Command;

fn phasekit(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_phasekit")).args(args).envs(env.iter().copied()).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn check_passes_on_the_cpu_for_every_op_and_dtype() {
    let (code, out, err) = phasekit(&["--json", "bench", "elementwise", "--check", "--check-tokens", "40"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    let lines: serde_json::Value = serde_json::from_str(&out).unwrap();
    let lines = lines.as_array().unwrap();
    // 6 ops × 3 dtypes.
    assert_eq!(lines.len(), 18, "{out}");
    for l in lines {
        assert_eq!(l["pass"], true, "{l}");
        let b = l["bound"].as_f64().unwrap();
        let errs = l["errors"].as_array().unwrap();
        assert!(errs.len() >= 2, "{l}");
        for e in errs {
            let e = e.as_f64().unwrap();
            assert!(e.is_finite() && e <= b, "{l}");
        }
    }
    // With the composed path forced, fused and reference are the same computation on f32.
    let (code, out, err) =
        phasekit(&["--json", "bench", "elementwise", "--check", "--check-tokens", "16"], &[("PHASEKIT_ELEMENTWISE", "composed")]);
    assert_eq!(code, 0, "{out}{err}");
    let lines: serde_json::Value = serde_json::from_str(&out).unwrap();
    for l in lines.as_array().unwrap().iter().filter(|l| l["dtype"] == "f32") {
        assert!(l["errors"].as_array().unwrap().iter().all(|e| e.as_f64().unwrap() == 0.0), "{l}");
    }
}

#[test]
fn check_passes_through_the_emulated_kernels() {
    // The host code scripts/gpu-speed.sh runs on the GPU (grids, argument order, dtypes), with the
    // kernels' source run by the emulator on the CPU.
    let Some(lib) = emu_support::emulator() else { return };
    let lib = lib.to_str().unwrap();
    let env = [("PHASEKIT_ELEMENTWISE", "kernels"), ("PHASEKIT_KERNEL_EMULATOR", lib)];
    let (code, out, err) = phasekit(&["--json", "bench", "elementwise", "--check", "--check-tokens", "24"], &env);
    assert_eq!(code, 0, "{out}{err}");
    let lines: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(lines.as_array().unwrap().len(), 18, "{out}");
    assert!(lines.as_array().unwrap().iter().all(|l| l["pass"] == true), "{out}");
}

#[test]
fn timing_table_and_errors() {
    let (code, out, err) = phasekit(&["bench", "elementwise", "--tokens", "32", "--dim", "256", "--dtype", "f32", "--repeats", "1"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    for op in ["layernorm+modulation", "rmsnorm q/k", "layernorm affine", "gated residual", "gelu-tanh", "rope (wan 3-D)"] {
        assert!(out.lines().any(|l| l.starts_with(op)), "no row for {op}:\n{out}");
    }
    let (code, _, err) = phasekit(&["bench", "elementwise", "--dim", "100"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--dim"), "{err}");
    let (code, _, err) = phasekit(&["bench", "elementwise", "--check", "--check-tokens", "8"], &[("PHASEKIT_ELEMENTWISE", "fastest")]);
    assert_ne!(code, 0);
    assert!(err.contains("PHASEKIT_ELEMENTWISE=fastest"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
