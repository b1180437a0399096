//! Command-line arguments and run functions of `assemble`, `pack`, `unpack`, `export` and
//! `bench moe` (main.rs only dispatches here).

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, ValueEnum};

use super::assemble::{self, ExpertInput};
use crate::bench::{best, sh};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Output dtype of floating-point tensors.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DTypeArg {
    Keep,
    Bf16,
    F16,
    F32,
}

impl DTypeArg {
    pub fn dtype(self) -> Option<DType> {
        match self {
            DTypeArg::Keep => None,
            DTypeArg::Bf16 => Some(DType::BF16),
            DTypeArg::F16 => Some(DType::F16),
            DTypeArg::F32 => Some(DType::F32),
        }
    }
}

/// `phasekit assemble`: one routed, hashed MoE checkpoint from per-σ-range experts.
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  phasekit assemble --run runs/wan-4step -o wan-4step.safetensors\n  phasekit assemble \\\n    --expert Wan2.2-Lightning/high_noise_model.safetensors --sigma-range 0.875:1 --expert-base Wan2.2-T2V-A14B/high_noise_model \\\n    --expert Wan2.2-Lightning/low_noise_model.safetensors --sigma-range 0:0.875 --expert-base Wan2.2-T2V-A14B/low_noise_model \\\n    --shift 5 --steps 4 -o wan-lightning.safetensors"
)]
pub struct AssembleArgs {
    /// An expert: full weights or a LoRA (file, sharded folder or diffusers folder). Repeat;
    /// each needs a --sigma-range, in the same order.
    #[arg(long = "expert", value_name = "PATH")]
    pub experts: Vec<PathBuf>,
    /// The σ range [LO, HI) the matching --expert serves; together they must cover (0, 1].
    #[arg(long = "sigma-range", value_name = "LO:HI")]
    pub sigma_ranges: Vec<String>,
    /// Names of the experts, in order (default: high_noise/low_noise for two, else e0, e1, ...).
    #[arg(long = "expert-name", value_name = "NAME")]
    pub names: Vec<String>,
    /// A trainer run folder: experts and routing come from RUN_DIR/manifest.json (phasekit's
    /// trainer), or from a LightX2V Phased DMD run's config.yaml (detected; see --lightx2v-run).
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["experts", "sigma_ranges", "expert_bases"])]
    pub run: Option<PathBuf>,
    /// A LightX2V Phased DMD run (its output_dir, newest finished checkpoint-*, or one
    /// checkpoint): students, their LoRA α, bases and the switch step come from its config.yaml.
    /// LoRA students apply to the teacher experts the config names (relative to the current
    /// folder, as the trainer ran); --expert-base (high, then low) or --base replace them.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["experts", "sigma_ranges", "run"])]
    pub lightx2v_run: Option<PathBuf>,
    /// The model LoRA experts apply to (stored under base.; checks full experts' shapes).
    #[arg(long, value_name = "PATH")]
    pub base: Option<PathBuf>,
    /// The base of each --expert, in order, overriding --base (Wan2.2 A14B: each Lightning
    /// LoRA on its own high- or low-noise model). Give one per --expert, or none.
    #[arg(long = "expert-base", value_name = "PATH")]
    pub expert_bases: Vec<PathBuf>,
    /// Sampler shift s (σ' = sσ/(1+(s−1)σ)).
    #[arg(long)]
    pub shift: Option<f64>,
    /// Number of sampling steps.
    #[arg(long)]
    pub steps: Option<u32>,
    /// Sampler the experts were distilled for.
    #[arg(long)]
    pub solver: Option<String>,
    /// CFG scale (1 for distilled students).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Dtype of floating-point tensors.
    #[arg(long, value_enum, default_value = "keep")]
    pub dtype: DTypeArg,
    /// Bake LoRA experts into full experts.
    #[arg(long)]
    pub merge_lora: bool,
    /// Shard the output (e.g. 5GB) with a model.safetensors.index.json.
    #[arg(long, value_name = "SIZE")]
    pub shard_size: Option<String>,
    /// modelspec.title (default: the output's file stem).
    #[arg(long)]
    pub title: Option<String>,
    /// A teacher file digest to record (sha256:<hex>); repeat.
    #[arg(long = "teacher-digest", value_name = "DIGEST")]
    pub teacher_digests: Vec<String>,
    /// The recipe digest to record.
    #[arg(long, value_name = "DIGEST")]
    pub recipe_digest: Option<String>,
    /// Do not write OUT.sha256 (saves one read of the output).
    #[arg(long)]
    pub no_sidecar: bool,
    /// Skip the fsync before renaming the output into place (faster; after a power loss the
    /// file under the final name may be incomplete, though `verify` would say so).
    #[arg(long)]
    pub no_sync: bool,
    /// Replace OUT if it exists.
    #[arg(long)]
    pub force: bool,
    /// Output file (*.safetensors; shards are named after it).
    #[arg(short = 'o', long = "out", value_name = "OUT")]
    pub out: PathBuf,
}

fn parse_range(s: &str) -> Result<(f64, f64)> {
    let bad = || Error::usage(format!("--sigma-range '{s}' must be LO:HI with 0 ≤ LO < HI ≤ 1 (e.g. 0.875:1)"));
    let (a, b) = s.split_once(':').ok_or_else(bad)?;
    let lo: f64 = a.trim().parse().map_err(|_| bad())?;
    let hi: f64 = b.trim().parse().map_err(|_| bad())?;
    Ok((lo, hi))
}

fn print_json(v: &impl serde::Serialize) {
    let _ = writeln!(std::io::stdout().lock(), "{}", serde_json::to_string_pretty(v).expect("json"));
}

/// Build assemble options from the arguments (no I/O apart from reading a manifest).
pub fn assemble_options(a: &AssembleArgs, quiet: bool) -> Result<(assemble::Options, Option<assemble::Manifest>)> {
    assemble_options_noted(a, quiet).map(|(o, m, _)| (o, m))
}

/// [`assemble_options`] and what reading a LightX2V run found out.
fn assemble_options_noted(a: &AssembleArgs, quiet: bool) -> Result<(assemble::Options, Option<assemble::Manifest>, Vec<String>)> {
    let lightx2v =
        a.lightx2v_run.clone().or_else(|| a.run.clone().filter(|r| !r.join("manifest.json").exists() && super::lightx2v::is_run(r)));
    let mut notes = Vec::new();
    let (mut opts, manifest) = match (&a.run, lightx2v) {
        (_, Some(dir)) => {
            let imp = super::lightx2v::import(&dir, &a.expert_bases, a.base.as_deref())?;
            notes = imp.notes;
            (imp.options, None)
        }
        (Some(run), None) => {
            let (o, m) = assemble::options_from_run(run)?;
            (o, Some(m))
        }
        (None, None) => {
            if a.experts.is_empty() {
                return Err(Error::usage("give experts with --expert PATH --sigma-range LO:HI (repeat), or --run RUN_DIR"));
            }
            if a.experts.len() != a.sigma_ranges.len() {
                return Err(Error::usage(format!(
                    "{} --expert but {} --sigma-range; give one range per expert",
                    a.experts.len(),
                    a.sigma_ranges.len()
                )));
            }
            if !a.names.is_empty() && a.names.len() != a.experts.len() {
                return Err(Error::usage("give one --expert-name per --expert, or none"));
            }
            if !a.expert_bases.is_empty() && a.expert_bases.len() != a.experts.len() {
                return Err(Error::usage("give one --expert-base per --expert, or none"));
            }
            let experts = a
                .experts
                .iter()
                .zip(&a.sigma_ranges)
                .enumerate()
                .map(|(i, (p, r))| {
                    let (lo, hi) = parse_range(r)?;
                    Ok(ExpertInput {
                        path: p.clone(),
                        sigma_lo: lo,
                        sigma_hi: hi,
                        name: a.names.get(i).cloned(),
                        guidance: None,
                        kind: None,
                        base: a.expert_bases.get(i).cloned(),
                        lora_alpha: None,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let steps = a.steps.ok_or_else(|| Error::usage("--steps is required with --expert"))?;
            let shift = a.shift.ok_or_else(|| Error::usage("--shift is required with --expert"))?;
            (assemble::Options { experts, steps, shift, ..assemble::Options::default() }, None)
        }
    };
    if a.base.is_some() {
        opts.base = a.base.clone();
    }
    if let Some(s) = a.shift {
        opts.shift = s;
    }
    if let Some(s) = a.steps {
        opts.steps = s;
    }
    if let Some(s) = &a.solver {
        opts.solver = s.clone();
    }
    if let Some(g) = a.guidance {
        opts.guidance = g;
    }
    if a.title.is_some() {
        opts.title = a.title.clone();
    }
    opts.teacher_digests.extend(a.teacher_digests.iter().cloned());
    if a.recipe_digest.is_some() {
        opts.recipe_digest = a.recipe_digest.clone();
    }
    opts.dtype = a.dtype.dtype();
    opts.merge_lora = a.merge_lora;
    opts.shard_size = a.shard_size.as_deref().map(crate::convert::parse_size).transpose()?;
    opts.sidecar = !a.no_sidecar;
    opts.sync = !a.no_sync;
    opts.force = a.force;
    opts.quiet = quiet;
    Ok((opts, manifest, notes))
}

/// `phasekit assemble`.
pub fn assemble(a: AssembleArgs, json: bool, quiet: bool) -> Result<()> {
    let (opts, manifest, notes) = assemble_options_noted(&a, quiet)?;
    if let Some(m) = &manifest {
        // Timesteps the trainer declared must be the ones the routing gives.
        assemble::check_run_options(m, &opts)?;
    }
    let mut r = assemble::assemble(&opts, &a.out)?;
    r.notes.splice(0..0, notes);
    if json {
        print_json(&serde_json::json!({ "ok": true, "report": r }));
    } else {
        println!(
            "assembled {} experts → {}: {} tensors ({} shared, {} aliased), {:.1} MB in {:.2} s ({:.0} MB/s), digest {}",
            r.experts,
            r.output.display(),
            r.tensors,
            r.shared,
            r.aliased,
            r.bytes_out as f64 / 1e6,
            r.seconds,
            r.bytes_out as f64 / 1e6 / r.seconds.max(1e-9),
            r.digest
        );
        for n in &r.notes {
            println!("note: {n}");
        }
    }
    Ok(())
}

/// `phasekit export`: per-expert files for today's runtimes.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A phasekit MoE checkpoint (file or index).
    pub input: PathBuf,
    /// Target runtime layout.
    #[arg(long = "to", value_enum)]
    pub to: super::export::Target,
    /// Output folder (appears only when complete).
    #[arg(short = 'o', long = "out", value_name = "DIR")]
    pub out: PathBuf,
    /// comfy: prefix names with `model.diffusion_model.`.
    #[arg(long)]
    pub comfy_prefix: bool,
    /// lora: write keys without the `diffusion_model.` prefix.
    #[arg(long)]
    pub no_lora_prefix: bool,
    /// Dtype of floating-point tensors (comfy, diffusers, lora).
    #[arg(long, value_enum, default_value = "keep")]
    pub dtype: DTypeArg,
    /// gguf: tensor type of quantizable weights (F16, BF16, Q8_0, Q4_K, ...).
    #[arg(long)]
    pub quant: Option<String>,
    /// Do not write .sha256 sidecars.
    #[arg(long)]
    pub no_sidecar: bool,
    #[arg(long)]
    pub force: bool,
}

pub fn export(a: ExportArgs, json: bool, quiet: bool) -> Result<()> {
    let quant = a
        .quant
        .as_deref()
        .map(|q| crate::quant::GgmlType::parse(q).ok_or_else(|| Error::usage(format!("unknown GGUF type '{q}'"))))
        .transpose()?;
    if quant.is_some() && a.to != super::export::Target::Gguf {
        return Err(Error::usage("--quant applies to --to gguf"));
    }
    let opts = super::export::ExportOptions {
        target: a.to,
        comfy_prefix: a.comfy_prefix,
        lora_prefix: !a.no_lora_prefix,
        dtype: a.dtype.dtype(),
        quant,
        sidecar: !a.no_sidecar,
        force: a.force,
        quiet,
    };
    let r = super::export::export(&a.input, &a.out, &opts)?;
    if json {
        print_json(&serde_json::json!({ "ok": true, "report": r }));
    } else {
        println!("exported {} → {} ({:?}): {} files in {:.2} s", r.input.display(), r.output.display(), r.target, r.files.len(), r.seconds);
        for w in &r.files {
            println!("  {} ({:.1} MB)", w.path.display(), w.bytes as f64 / 1e6);
        }
    }
    Ok(())
}

/// `phasekit pack`: lossless zstd with byte planes for 16-bit floats.
#[derive(Args, Debug)]
pub struct PackArgs {
    pub input: PathBuf,
    #[arg(short = 'o', long = "out", value_name = "OUT.pk")]
    pub out: PathBuf,
    /// zstd level (1..=19).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub level: i32,
    #[arg(long)]
    pub force: bool,
}

/// `phasekit unpack`: restore bit-exact, checked against chunk and tensor hashes.
#[derive(Args, Debug)]
pub struct UnpackArgs {
    pub input: PathBuf,
    #[arg(short = 'o', long = "out", value_name = "OUT")]
    pub out: PathBuf,
    #[arg(long)]
    pub force: bool,
}

fn pack_line(verb: &str, r: &super::pack::PackReport) {
    let mb = r.bytes_in.max(r.bytes_out) as f64 / 1e6;
    println!(
        "{verb} {} → {}: {:.1} MB → {:.1} MB (ratio {:.3}) in {:.2} s ({:.0} MB/s){}",
        r.input.display(),
        r.output.display(),
        r.bytes_in as f64 / 1e6,
        r.bytes_out as f64 / 1e6,
        r.ratio,
        r.seconds,
        mb / r.seconds.max(1e-9),
        r.tensors_verified.map(|n| format!(", {n} tensor hashes verified")).unwrap_or_default()
    );
}

pub fn pack(a: PackArgs, json: bool, quiet: bool) -> Result<()> {
    let r = super::pack::pack(&a.input, &a.out, a.level, a.force, quiet)?;
    if json {
        print_json(&serde_json::json!({ "ok": true, "report": r }));
    } else {
        pack_line("packed", &r);
    }
    Ok(())
}

pub fn unpack(a: UnpackArgs, json: bool, quiet: bool) -> Result<()> {
    let r = super::pack::unpack(&a.input, &a.out, a.force, quiet)?;
    if json {
        print_json(&serde_json::json!({ "ok": true, "report": r }));
    } else {
        pack_line("unpacked", &r);
    }
    Ok(())
}

/// `phasekit bench moe`.
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

pub fn bench(a: BenchMoeArgs, json: bool) -> Result<()> {
    let size = crate::convert::parse_size(&a.size)?;
    let dir = a.dir.unwrap_or_else(std::env::temp_dir);
    let lines = bench_run(&dir, size, a.repeats, &mut |m| {
        if !json {
            eprintln!("{m}");
        }
    })?;
    if json {
        print_json(&lines);
    } else {
        print!("{}", crate::bench::render(&lines));
    }
    Ok(())
}

fn line(name: &str, value: f64, unit: &str, baseline: &str, base: Option<f64>, target: Option<f64>, note: &str) -> crate::bench::Line {
    let ratio = base.map(|b| value / b);
    crate::bench::Line {
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

/// A BF16 expert of `bytes` bytes with weight-like values (≈ N(0, 0.02²)), seeded.
fn bench_expert(path: &std::path::Path, bytes: u64, seed: u64) -> Result<()> {
    use rayon::prelude::*;
    const COLS: u64 = 4096;
    let rows = 2048u64;
    let per = rows * COLS * 2;
    let n = (bytes / per).max(1);
    let planned = (0..n)
        .map(|i| crate::safetensors::Planned { name: format!("blocks.{i}.ffn.weight"), dtype: DType::BF16, shape: vec![rows, COLS] })
        .collect();
    let plan = crate::safetensors::plan(planned, Some(&[("format".to_string(), "pt".to_string())]))?;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(|e| Error::io(path, e))?);
    f.write_all(&plan.bytes).map_err(|e| Error::io(path, e))?;
    let mut buf = vec![0u8; per as usize];
    for i in 0..n {
        buf.par_chunks_mut(1 << 16).enumerate().for_each(|(c, out)| {
            let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i << 32) ^ c as u64 ^ 0xD1B5_4A32_D192_ED03;
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
        f.write_all(&buf).map_err(|e| Error::io(path, e))?;
    }
    f.flush().map_err(|e| Error::io(path, e))
}

fn bench_run(dir: &std::path::Path, size: u64, repeats: usize, log: &mut dyn FnMut(&str)) -> Result<Vec<crate::bench::Line>> {
    use std::process::Command;
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
        let r = super::verify::verify_path(&out)?;
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
        ratio = super::pack::pack(&out, &pk, 3, true, true)?.ratio;
        Ok(())
    })?;
    let un = work.join("un.safetensors");
    let t_un = best(repeats, &[&un], || super::pack::unpack(&pk, &un, true, true).map(|_| ()))?;
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
        let script = "import os,sys,time,zipnn\nz=zipnn.ZipNN(bytearray_dtype='bfloat16')\nos.sync()\nt=time.time()\nd=open(sys.argv[1],'rb').read()\nc=z.compress(d)\nf=open(sys.argv[2],'wb');f.write(c);f.flush();os.fsync(f.fileno());f.close()\nt=time.time()-t\nos.remove(sys.argv[2])\nprint(len(d)/len(c), len(d)/1e6/t)";
        let o = Command::new("python3")
            .args(["-c", script])
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
