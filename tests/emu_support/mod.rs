//! Builds the element-wise kernels' emulator library (`kernels/emu/ops_emu.cpp`) once per test
//! binary and loads it, so that `Impl::Kernels` runs the CUDA kernels on CPU tensors.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The emulator library, loaded. `None`: no C++ compiler here (the caller says it skipped).
#[allow(dead_code)]
pub fn emulator() -> Option<PathBuf> {
    static LOADED: OnceLock<Option<PathBuf>> = OnceLock::new();
    let lib = LOADED.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        if Command::new(&cxx).arg("--version").output().is_err() {
            eprintln!("skipped: no C++ compiler ({cxx})");
            return None;
        }
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("libpk_emu_{}.so", std::process::id()));
        let build = Command::new(&cxx)
            .args(["-std=c++17", "-O2", "-Wall", "-Wno-unknown-pragmas", "-Werror", "-shared", "-fPIC", "-I"])
            .arg(root.join("kernels"))
            .arg(root.join("kernels/emu/ops_emu.cpp"))
            .arg("-o")
            .arg(&out)
            .output()
            .unwrap();
        assert!(build.status.success(), "{cxx} failed:\n{}", String::from_utf8_lossy(&build.stderr));
        let n = phasekit::ops::fused::emu::load(&out).unwrap();
        assert!(n >= 100, "the emulator library has {n} kernels");
        Some(out)
    });
    lib.clone()
}
