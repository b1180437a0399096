//! `phasekit bench io`: conversion throughput and memory against baselines measured in the same run.
//!
//! Generates its own inputs in a scratch folder (on the same disk as the outputs):
//! - a dense bf16 checkpoint with Wan2.2 original names and random values (`--size`);
//! - sparse full-size replicas of Qwen-Image (40.9 GB) and a Wan2.2 A14B expert (28.6 GB).
//!
//! and prints, each as a ratio to its baseline: layout convert vs `cp`, bf16→f16 vs `cp`,
//! Q8_0 GGUF export vs the PyPI `gguf` package (when Python has it), and the peak RSS of a
//! `phasekit convert` child process on each sparse replica.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use clap::Args;

use super::{best, rm, sh, Line};
use crate::cli::printer::Printer;
use crate::convert::{self, DTypeChoice, OutFormat};
use crate::dtype::DType;
use crate::error::{Error, IoContext, Result};
use crate::layout::Layout;
use crate::quant::GgmlType;
use crate::replica::{self, Model};

/// Arguments of `phasekit bench io`.
#[derive(Args, Debug)]
pub struct IoArgs {
    /// Scratch folder, on the disk you want to measure (default: the system temp folder).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Size of the dense test checkpoint.
    #[arg(long, default_value = "2GB")]
    pub size: String,
    /// Runs per measurement (the best is kept).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Skip the sparse full-size replicas.
    #[arg(long)]
    pub no_replicas: bool,
    /// Skip the Python comparison.
    #[arg(long)]
    pub no_python: bool,
}

/// `phasekit bench io`: progress on stderr, the lines on stdout.
pub fn run(a: IoArgs, p: &Printer) -> Result<()> {
    let opts = IoOptions {
        dir: a.dir.unwrap_or_else(std::env::temp_dir),
        size: crate::cli::args::parse_size(&a.size)?,
        repeats: a.repeats,
        replicas: !a.no_replicas,
        python: !a.no_python,
    };
    let lines = io(&opts, &mut |m| p.log(m))?;
    super::print(&lines, p);
    Ok(())
}

#[derive(Debug, Clone)]
pub struct IoOptions {
    pub dir: PathBuf,
    pub size: u64,
    pub repeats: usize,
    pub replicas: bool,
    pub python: bool,
}

/// SplitMix64 values shaped like N(0, 0.02) weights, as bf16.
fn fill_weights(seed: u64) -> impl FnMut(&str, &mut [u8]) {
    let mut s = seed;
    move |_name, buf| {
        for c in buf.chunks_exact_mut(2) {
            s = s.wrapping_add(0x9e3779b97f4a7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
            z ^= z >> 31;
            // Sum of 4 uniforms: roughly normal.
            let u = ((z & 0xffff) + ((z >> 16) & 0xffff) + ((z >> 32) & 0xffff) + (z >> 48)) as f32 / 65535.0 - 2.0;
            c.copy_from_slice(&half::bf16::from_f32(u * 0.035).to_le_bytes());
        }
    }
}

/// Wan original tensors truncated to about `size` bytes of bf16 (whole blocks, head kept).
fn dense_tensors(size: u64) -> Vec<(String, Vec<u64>)> {
    let all = replica::wan(5120, 13824, 40, 16, 16);
    let (head, body): (Vec<_>, Vec<_>) = all.into_iter().partition(|(n, _)| n.starts_with("head."));
    let mut out = Vec::new();
    let mut total: u64 = head.iter().map(|(_, s)| s.iter().product::<u64>() * 2).sum();
    for (n, s) in body {
        let b = s.iter().product::<u64>() * 2;
        if total + b > size && n.starts_with("blocks.") && n.ends_with("modulation") {
            break;
        }
        total += b;
        out.push((n, s));
    }
    out.extend(head);
    out
}

/// Peak RSS (KiB) of a child process.
fn child_peak_rss(mut cmd: Command) -> Result<(u64, f64, bool)> {
    let t = Instant::now();
    let child = cmd.spawn().map_err(|e| Error::io("phasekit child", e))?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    if r < 0 {
        return Err(Error::internal("wait4 failed"));
    }
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    Ok((ru.ru_maxrss as u64, t.elapsed().as_secs_f64(), ok))
}

fn python_has_gguf() -> bool {
    Command::new("python3").args(["-c", "import gguf, numpy, safetensors"]).output().is_ok_and(|o| o.status.success())
}

/// gguf-py's Q8_0 export of the same tensors, the baseline of the GGUF line.
const PY_Q8: &str = include_str!("../../benches/gguf_q8.py");

/// Run the I/O benchmark.
pub fn io(opts: &IoOptions, log: &mut dyn FnMut(&str)) -> Result<Vec<Line>> {
    let dir = opts.dir.join(format!("phasekit-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_file(&dir)?;
    let result = io_in(&dir, opts, log);
    if std::env::var_os("PHASEKIT_BENCH_KEEP").is_none() {
        rm(&dir);
    }
    result
}

fn io_in(dir: &Path, opts: &IoOptions, log: &mut dyn FnMut(&str)) -> Result<Vec<Line>> {
    let mut lines = Vec::new();
    let src = dir.join("input.safetensors");
    let tensors = dense_tensors(opts.size);
    log(&format!("generating a {:.2} GB bf16 checkpoint with random values ...", opts.size as f64 / 1e9));
    let mut fill = fill_weights(7);
    let bytes = replica::write(&src, &tensors, DType::BF16, Some(&mut fill))? as f64;
    let gb = |s: f64| bytes / 1e9 / s;
    // Warm the page cache once so every contender reads from memory.
    sh(Command::new("cat").arg(&src).stdout(std::process::Stdio::null()), "cat")?;

    let cp_out = dir.join("cp.safetensors");
    let t_cp = best(opts.repeats, &[&cp_out], || sh(Command::new("cp").arg(&src).arg(&cp_out), "cp"))?;
    // phasekit fsyncs every output before renaming it; the fair baseline is a durable copy.
    let t_cps = best(opts.repeats, &[&cp_out], || {
        sh(Command::new("cp").arg(&src).arg(&cp_out), "cp")?;
        sh(Command::new("sync").arg(&cp_out), "sync")
    })?;
    rm(&cp_out);
    log(&format!("cp: {:.2} GB/s; cp + sync: {:.2} GB/s", gb(t_cp), gb(t_cps)));

    let quiet = convert::Options { force: true, ..Default::default() };
    let out = dir.join("out.safetensors");
    let run =
        |o: &convert::Options, out: &Path| -> Result<f64> { best(opts.repeats, &[out], || convert::convert(&src, out, o).map(|_| ())) };
    let t_layout = run(&convert::Options { layout: Some(Layout::Diffusers), ..quiet.clone() }, &out)?;
    let vs_cp = |v: f64| format!("{:.2}× plain cp ({:.2} GB/s, no fsync)", v / gb(t_cp), gb(t_cp));
    let mut l = ratio_line("layout convert (original→diffusers, no cast)", gb(t_layout), "cp+sync", gb(t_cps), 0.9);
    l.note = vs_cp(gb(t_layout));
    lines.push(l);
    let t_cast = run(&convert::Options { dtype: DTypeChoice::To(DType::F16), ..quiet.clone() }, &out)?;
    let mut l = ratio_line("bf16→f16 cast", gb(t_cast), "cp+sync", gb(t_cps), 0.7);
    l.note = vs_cp(gb(t_cast));
    lines.push(l);
    // The same two without fsync, against plain cp (which does not sync either).
    let nosync = convert::Options { sync: false, ..quiet.clone() };
    let t_layout_ns = run(&convert::Options { layout: Some(Layout::Diffusers), ..nosync.clone() }, &out)?;
    lines.push(ratio_line("layout convert --no-sync", gb(t_layout_ns), "cp", gb(t_cp), 0.9));
    let t_cast_ns = run(&convert::Options { dtype: DTypeChoice::To(DType::F16), ..nosync.clone() }, &out)?;
    lines.push(ratio_line("bf16→f16 cast --no-sync", gb(t_cast_ns), "cp", gb(t_cp), 0.7));
    rm(&out);

    let gg = dir.join("out.gguf");
    // gguf-py's writer does not fsync: compare like with like.
    let t_q8 = run(&convert::Options { format: OutFormat::Gguf, quant: Some(GgmlType::Q8_0), ..nosync.clone() }, &gg)?;
    rm(&gg);
    if opts.python && python_has_gguf() {
        let script = dir.join("q8.py");
        std::fs::write(&script, PY_Q8).with_file(&script)?;
        let py_out = dir.join("py.gguf");
        let t = Instant::now();
        sh(Command::new("python3").arg(&script).arg(&src).arg(&py_out), "python3 gguf Q8_0 export")?;
        let t_py = t.elapsed().as_secs_f64();
        rm(&py_out);
        let mut l = ratio_line("Q8_0 GGUF export", gb(t_q8), "python gguf", gb(t_py), 5.0);
        l.note = "speedup over gguf.quants.quantize + GGUFWriter on the same tensors".into();
        lines.push(l);
    } else {
        lines.push(Line {
            name: "Q8_0 GGUF export".into(),
            value: gb(t_q8),
            unit: "GB/s".into(),
            baseline: "python gguf".into(),
            baseline_value: None,
            ratio: None,
            target: "≥ 5×".into(),
            pass: None,
            note: "skipped comparison: python3 with the `gguf` package is not available".into(),
        });
    }
    if std::env::var_os("PHASEKIT_BENCH_KEEP").is_none() {
        rm(&src);
    }

    if opts.replicas {
        let exe = std::env::current_exe().map_err(|e| Error::io("current_exe", e))?;
        for (model, label) in [(Model::QwenImage, "Qwen-Image"), (Model::WanT2vA14b, "Wan2.2 T2V-A14B expert")] {
            let rep = dir.join("replica.safetensors");
            let size = replica::write(&rep, &replica::tensors(model), DType::BF16, None)?;
            for (what, args) in [("layout", vec!["--layout", "comfy", "--comfy-prefix"]), ("bf16→f16", vec!["--dtype", "f16"])] {
                let o = dir.join("replica-out.safetensors");
                rm(&o);
                let mut cmd = Command::new(&exe);
                cmd.arg("--quiet").arg("convert").arg(&rep).arg(&o).args(&args).arg("--force");
                log(&format!("{label}: {what} convert of a {:.1} GB sparse replica ...", size as f64 / 1e9));
                let (kib, secs, ok) = child_peak_rss(cmd)?;
                rm(&o);
                let mib = kib as f64 / 1024.0;
                lines.push(Line {
                    name: format!("peak RSS, {label} ({:.1} GB) {what} convert", size as f64 / 1e9),
                    value: mib,
                    unit: "MiB".into(),
                    baseline: "limit".into(),
                    baseline_value: Some(512.0),
                    ratio: None,
                    target: "≤ 512 MiB".into(),
                    pass: Some(ok && mib <= 512.0),
                    note: format!("{:.1} s, {:.2} GB/s{}", secs, size as f64 / 1e9 / secs, if ok { "" } else { ", CONVERT FAILED" }),
                });
            }
            rm(&rep);
        }
    }
    Ok(lines)
}

fn ratio_line(name: &str, v: f64, base: &str, b: f64, target: f64) -> Line {
    let r = v / b;
    Line {
        name: name.into(),
        value: v,
        unit: "GB/s".into(),
        baseline: base.into(),
        baseline_value: Some(b),
        ratio: Some(r),
        target: format!("≥ {target}×"),
        pass: Some(r >= target),
        note: String::new(),
    }
}
