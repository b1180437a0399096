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
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        // Earlier test processes' libraries (each process builds its own, and the binaries it
        // runs load it by path, so it stays until the process ends): remove those of processes
        // that are gone.
        for e in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name.strip_prefix("libpk_emu_").and_then(|r| r.strip_suffix(".so")).and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let out = tmp.join(format!("libpk_emu_{}.so", std::process::id()));
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
