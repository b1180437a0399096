//! `phasekit bench moe`: MoE assembly against `cp` (durable against `cp` + `sync`), verify
//! against cores × `sha256sum`, pack against `zstd -3 -T0` and ZipNN (`benches/zipnn_pack.py`,
//! when `python3` has `zipnn`), on four generated bf16 experts.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Args;
use rayon::prelude::*;

use super::{best, sh, Line};
use crate::cli::printer::Printer;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::moe::assemble::{self, ExpertInput};
use crate::progress::Progress;
use crate::write;

/// ZipNN's file-to-file compression, the baseline of the zipnn lines.
const ZIPNN: &str = include_str!("../../benches/zipnn_pack.py");

/// Arguments of `phasekit bench moe`.
#[derive(Args, Debug)]
pub struct BenchMoeArgs {
    /// Scratch folder on the disk to measure (default: the system temp folder).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Total size of the 4 experts.
    #[arg(long, default_value = "2GB")]
    pub size: String,
    /// Runs per measurement (the best is kept).
    #[arg(long, default_value_t = 2)]
    pub repeats: usize,
}

/// `phasekit bench moe`: progress on stderr, the lines on stdout.
pub fn run(a: BenchMoeArgs, p: &Printer) -> Result<()> {
    let size = crate::cli::args::parse_size(&a.size)?;
    let dir = a.dir.unwrap_or_else(std::env::temp_dir);
    let lines = bench_run(&dir, size, a.repeats, &mut |m| p.log(m))?;
    super::print(&lines, p);
    Ok(())
}

fn line(name: &str, value: f64, unit: &str, baseline: &str, base: Option<f64>, target: Option<f64>, note: &str) -> Line {
    let ratio = base.map(|b| value / b);
    Line {
        name: name.into(),
        value,
        unit: unit.into(),
        baseline: baseline.into(),
        baseline_value: base,
        ratio,
        target: target.map(|t| format!("≥ {t}×")).unwrap_or_default(),
        pass: target.and_then(|t| ratio.map(|r| r >= t)),
        note: note.into(),
    }
}

/// A BF16 expert of `bytes` bytes with weight-like values (≈ N(0, 0.02²)), seeded: the k-th
/// tensor in the file gets stream k.
fn bench_expert(path: &Path, bytes: u64, seed: u64) -> Result<()> {
    const COLS: u64 = 4096;
    let rows = 2048u64;
    let per = rows * COLS * 2;
    let n = (bytes / per).max(1);
    let written = std::cell::Cell::new(0u64);
    let tensors = (0..n)
        .map(|i| {
            let written = &written;
            write::Tensor::streamed(format!("blocks.{i}.ffn.weight"), DType::BF16, vec![rows, COLS], move |sink| {
                let k = written.get();
                written.set(k + 1);
                let mut buf = vec![0u8; per as usize];
                buf.par_chunks_mut(1 << 16).enumerate().for_each(|(c, out)| {
                    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (k << 32) ^ c as u64 ^ 0xD1B5_4A32_D192_ED03;
                    for v in out.chunks_exact_mut(2) {
                        let mut s = 0f32;
                        for _ in 0..4 {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            s += (x >> 40) as f32 / (1u64 << 24) as f32;
                        }
                        let val = (s - 2.0) * 0.035;
                        v.copy_from_slice(&half::bf16::from_f32(val).to_le_bytes());
                    }
                });
                sink.write(&buf)
            })
        })
        .collect();
    let md = vec![("format".to_string(), "pt".to_string())];
    // A scratch input: no fsync (the bench flushes dirty pages before timing anything).
    let opts = write::Options { sync: false, ..write::Options::default() };
    write::safetensors(path, tensors, write::Metadata::Fixed(Some(md)), &opts, &Progress::hidden())?.commit()?;
    Ok(())
}

fn bench_run(dir: &Path, size: u64, repeats: usize, log: &mut dyn FnMut(&str)) -> Result<Vec<Line>> {
    let work = dir.join(format!("phasekit-bench-moe-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _guard = Cleanup(work.clone());
    let cores = rayon::current_num_threads();
    let mut lines = Vec::new();
    log(&format!("writing 4 experts of {:.2} GB each in {}", size as f64 / 4e9, work.display()));
    let experts: Vec<PathBuf> = (0..4).map(|i| work.join(format!("expert{i}.safetensors"))).collect();
    for (i, p) in experts.iter().enumerate() {
        bench_expert(p, size / 4, i as u64 + 1)?;
    }
    let total: u64 = experts.iter().map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)).sum();
    sh(Command::new("cat").args(&experts), "cat")?;
    let cpdir = work.join("cp");
    let cp = || -> Result<()> {
        std::fs::create_dir(&cpdir).map_err(|e| Error::io(&cpdir, e))?;
        sh(Command::new("cp").args(&experts).arg(&cpdir), "cp")
    };
    let t_cp = best(repeats, &[&cpdir], cp)?;
    // assemble fsyncs its output before renaming it by default: compare with a durable copy.
    let t_cps = best(repeats, &[&cpdir], || {
        cp()?;
        sh(Command::new("sync").arg("-f").arg(&cpdir), "sync")
    })?;
    let _ = std::fs::remove_dir_all(&cpdir);
    let out = work.join("moe.safetensors");
    let opts = |sidecar: bool, sync: bool| assemble::Options {
        experts: experts
            .iter()
            .enumerate()
            .map(|(i, p)| ExpertInput {
                path: p.clone(),
                sigma_lo: i as f64 / 4.0,
                sigma_hi: (i + 1) as f64 / 4.0,
                name: None,
                guidance: None,
                kind: None,
                base: None,
                lora_alpha: None,
            })
            .collect(),
        steps: 4,
        shift: 5.0,
        sidecar,
        sync,
        force: true,
        ..assemble::Options::default()
    };
    let mbs = |t: f64| total as f64 / 1e6 / t;
    let gb = format!("{:.2} GB", total as f64 / 1e9);
    for (sync, sidecar, name, base, t_base) in [
        (true, true, "assemble 4 experts (+ sidecar)", "cp + sync", t_cps),
        (true, false, "assemble 4 experts (no sidecar)", "cp + sync", t_cps),
        (false, true, "assemble --no-sync (+ sidecar)", "cp", t_cp),
        (false, false, "assemble --no-sync (no sidecar)", "cp", t_cp),
    ] {
        let t = best(repeats, &[&out], || assemble::assemble(&opts(sidecar, sync), &out).map(|_| ()))?;
        let note = if sidecar { format!("{gb}; tensor hashes in the writing pass, file hash overlapped with fsync") } else { gb.clone() };
        lines.push(line(name, mbs(t), "MB/s", &format!("{base} of the 4 files"), Some(mbs(t_base)), Some(0.9), &note));
    }
    log("verify");
    let t_ver = best(repeats, &[], || {
        let r = crate::moe::verify::verify_path(&out)?;
        if r.ok {
            Ok(())
        } else {
            Err(Error::internal("bench checkpoint does not verify"))
        }
    })?;
    let t_sum = best(repeats, &[], || sh(Command::new("sha256sum").arg(&out), "sha256sum"))?;
    lines.push(line(
        "verify (all tensor hashes)",
        mbs(t_ver),
        "MB/s",
        &format!("{cores} cores × sha256sum"),
        Some(mbs(t_sum) * cores as f64),
        Some(0.9),
        &format!("single sha256sum {:.0} MB/s", mbs(t_sum)),
    ));
    log("pack");
    let pk = work.join("moe.pk");
    let mut ratio = 0.0;
    let t_pack = best(repeats, &[], || {
        ratio = crate::moe::pack::pack(&out, &pk, 3, true, true)?.ratio;
        Ok(())
    })?;
    let un = work.join("un.safetensors");
    let t_un = best(repeats, &[&un], || crate::moe::pack::unpack(&pk, &un, true, true).map(|_| ()))?;
    let zst = work.join("moe.zst");
    let t_z = best(repeats, &[&zst], || sh(Command::new("zstd").args(["-q", "-f", "-3", "-T0"]).arg(&out).arg("-o").arg(&zst), "zstd"));
    let zratio = std::fs::metadata(&zst).map(|m| total as f64 / m.len() as f64).ok();
    let _ = std::fs::remove_file(&zst);
    match t_z {
        Ok(t) => {
            lines.push(line("pack ratio", ratio, "×", "zstd -3 -T0", zratio, Some(1.0), ""));
            lines.push(line("pack speed", mbs(t_pack), "MB/s", "zstd -3 -T0", Some(mbs(t)), None, ""));
        }
        Err(e) => lines.push(line("pack ratio", ratio, "×", "zstd CLI", None, None, &format!("zstd unavailable: {e}"))),
    }
    lines.push(line("unpack speed (chunk + tensor hashes checked)", mbs(t_un), "MB/s", "", None, None, ""));
    let zipnn_ok = Command::new("python3").args(["-c", "import zipnn"]).output().is_ok_and(|o| o.status.success());
    if zipnn_ok {
        // File to file and durable, as `phasekit pack` is timed: read, compress, write, fsync.
        let o = Command::new("python3")
            .args(["-c", ZIPNN])
            .arg(&out)
            .arg(work.join("moe.znn"))
            .output()
            .map_err(|e| Error::new(crate::Kind::Io, format!("python3: {e}")))?;
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        let v: Vec<f64> = text.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        if v.len() == 2 {
            lines.push(line("pack ratio vs zipnn", ratio, "×", "zipnn (bfloat16)", Some(v[0]), Some(1.0), ""));
            lines.push(line(
                "pack speed vs zipnn",
                mbs(t_pack),
                "MB/s",
                "zipnn (bfloat16)",
                Some(v[1]),
                Some(1.0),
                "file to file, fsync'd, both",
            ));
        } else {
            lines.push(line(
                "pack vs zipnn",
                ratio,
                "×",
                "zipnn",
                None,
                None,
                &format!("zipnn failed: {}", String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("")),
            ));
        }
    } else {
        lines.push(line("pack vs zipnn", ratio, "×", "zipnn", None, None, "zipnn not installed (pip install zipnn)"));
    }
    Ok(lines)
}
