//! The fused CUDA attention kernels (`kernels/attention.cu`), compiled as C++ and run on the CPU
//! through `kernels/emu/emu.h`, against attention computed in double precision (values, lse and
//! the gradients of Q, K and V; masks, fully masked rows, strided layouts, bf16 and f16, head sizes
//! 64 and 128), with a race check across thread schedules. See `kernels/emu/README.md`.
//!
//! Needs a C++17 compiler (`$CXX`, else `c++`); without one the test says so and passes, since
//! the GPU is where these kernels finally run (`scripts/gpu-attention.sh`).

use std::path::Path;
use std::process::Command;

#[test]
fn fused_attention_kernels_match_f64_reference_in_the_emulator() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    if Command::new(&cxx).arg("--version").output().is_err() {
        eprintln!("skipped: no C++ compiler ({cxx})");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("attention_emu");
    let build = Command::new(&cxx)
        .args(["-std=c++17", "-O2", "-Wall", "-Wno-unknown-pragmas", "-Werror", "-I"])
        .arg(root.join("kernels"))
        .arg(root.join("kernels/emu/attention_test.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap();
    assert!(build.status.success(), "{cxx} failed:\n{}", String::from_utf8_lossy(&build.stderr));
    let run = Command::new(&exe).output().unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    eprintln!("{out}{}", String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "kernel checks failed:\n{out}");
    assert!(out.contains("all kernel checks passed"));
}
