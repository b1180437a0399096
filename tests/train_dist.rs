//! Data-parallel training on the CPU: ranks as separate `phasekit train` processes meeting
//! through a rendezvous file on 127.0.0.1 (the TCP transport), the optimiser's gradient average,
//! resume with another world size, refused environments, and the per-phase peak memory report.

mod common;

use common::sha;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor, Var};
use phasekit::train::dist::{Communicator, DistConfig, Rendezvous, TcpComm};
use phasekit::train::optim::{AdamW, ParamsAdamW};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn wan_recipe() -> String {
    repo().join("recipes/wan2.2-tiny-2phase.toml").display().to_string()
}

#[derive(Debug)]
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }
}

/// Run `phasekit train` once per entry of `ranks` (its RANK and extra arguments) side by side,
/// with WORLD_SIZE = `world`; every process is killed after 120 s.
fn train_ranks(world: usize, ranks: &[(usize, Vec<String>)], env: &[(&str, String)]) -> Vec<Ran> {
    train_ranks_as(true, world, ranks, env)
}

/// [`train_ranks`], with `--json` or without.
fn train_ranks_as(json: bool, world: usize, ranks: &[(usize, Vec<String>)], env: &[(&str, String)]) -> Vec<Ran> {
    let mut kids = Vec::new();
    for (rank, args) in ranks {
        let mut c = Command::new(env!("CARGO_BIN_EXE_phasekit"));
        if json {
            c.arg("--json");
        }
        c.arg("train").args(args);
        for k in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "RUST_BACKTRACE", "RUST_LIB_BACKTRACE"] {
            c.env_remove(k);
        }
        c.env("RANK", rank.to_string()).env("WORLD_SIZE", world.to_string()).env("PHASEKIT_DIST_TIMEOUT", "60");
        for (k, v) in env {
            c.env(k, v);
        }
        kids.push(c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn phasekit"));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut out = Vec::new();
    for mut k in kids {
        while k.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if k.try_wait().unwrap().is_none() {
            let _ = k.kill();
        }
        let o = k.wait_with_output().unwrap();
        out.push(Ran {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into(),
            stderr: String::from_utf8_lossy(&o.stderr).into(),
        });
    }
    out
}

fn args(out: &Path, rdv: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = vec!["--recipe".into(), wan_recipe(), "--out".into(), out.display().to_string()];
    v.push("--rendezvous".into());
    v.push(format!("file:{}", rdv.display()));
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn experts(dir: &Path) -> Vec<String> {
    (0..2).map(|k| sha(&dir.join(format!("experts/expert-{k}.safetensors")))).collect()
}

/// Two ranks, rank 1 pointed at its own (unused) folder; returns (rank 0's summary, rank 1's).
fn two_rank_run(d: &Path, tag: &str) -> (serde_json::Value, serde_json::Value) {
    let (out0, out1, rdv) = (d.join(format!("{tag}-rank0")), d.join(format!("{tag}-rank1")), d.join(format!("{tag}.rdv")));
    let t = Instant::now();
    let r = train_ranks(2, &[(0, args(&out0, &rdv, &[])), (1, args(&out1, &rdv, &[]))], &[]);
    eprintln!("2-rank tiny Wan run ({tag}): {:.2} s wall for both processes", t.elapsed().as_secs_f64());
    for x in &r {
        assert_eq!(x.code, Some(0), "{x:?}");
    }
    assert!(!out1.exists(), "rank 1 wrote {}", out1.display());
    (r[0].json()["summary"].clone(), r[1].json()["summary"].clone())
}

#[test]
fn two_ranks_train_equal_weights_deterministically_and_only_rank_0_writes() {
    let d = tempfile::tempdir().unwrap();
    let (s0, s1) = two_rank_run(d.path(), "a");
    for (s, rank) in [(&s0, 0), (&s1, 1)] {
        assert_eq!(s["completed"], true);
        assert_eq!(s["global_step"], 6);
        assert_eq!(s["dist"]["rank"], rank);
        assert_eq!(s["dist"]["world_size"], 2);
        assert_eq!(s["dist"]["backend"], "tcp");
    }
    // The same weights on both ranks (each rank digests its own experts; the trainer also
    // checks this after every phase).
    assert_eq!(s0["dist"]["weights_sha256"], s1["dist"]["weights_sha256"]);
    let a = d.path().join("a-rank0");
    for f in ["manifest.json", "transformer.json", "log.jsonl", "embeddings.safetensors", "recipe.toml"] {
        assert!(a.join(f).is_file(), "rank 0 did not write {f}");
    }
    let ck: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(a.join("checkpoints/step-0000006.json")).unwrap()).unwrap();
    assert_eq!(ck["rng_states"].as_array().map(Vec::len), Some(2), "{ck}");
    // Deterministic: a second 2-rank run gives the same bytes.
    let (t0, _) = two_rank_run(d.path(), "b");
    assert_eq!(experts(&a), experts(&d.path().join("b-rank0")));
    assert_eq!(s0["dist"]["weights_sha256"], t0["dist"]["weights_sha256"]);
    // Rank 1's batches count: the 2-rank result is not the 1-rank one.
    let one = d.path().join("one");
    let o = train_ranks(1, &[(0, vec!["--recipe".into(), wan_recipe(), "--out".into(), one.display().to_string()])], &[]);
    assert_eq!(o[0].code, Some(0), "{:?}", o[0]);
    assert_eq!(o[0].json()["summary"]["dist"]["backend"], "single");
    assert_ne!(experts(&a)[0], experts(&one)[0]);
}

#[test]
fn one_rank_from_the_environment_is_the_default_run_and_reports_memory_per_phase() {
    let d = tempfile::tempdir().unwrap();
    let (x, y) = (d.path().join("x"), d.path().join("y"));
    let plain = common::run_ok(&["--json", "train", "--recipe", &wan_recipe(), "--out", &x.display().to_string()]);
    let r = train_ranks(1, &[(0, vec!["--recipe".into(), wan_recipe(), "--out".into(), y.display().to_string()])], &[]);
    assert_eq!(r[0].code, Some(0), "{:?}", r[0]);
    assert_eq!(experts(&x), experts(&y));
    let s: serde_json::Value = serde_json::from_str(&plain.stdout).unwrap();
    let mem = s["summary"]["memory"].as_array().unwrap_or_else(|| panic!("no memory in {s}")).clone();
    assert_eq!(mem.len(), 2, "{mem:?}");
    for (p, m) in mem.iter().enumerate() {
        assert_eq!(m["phase"], p);
        assert!(m["peak_rss_scope"] == "phase" || m["peak_rss_scope"] == "process", "{m}");
        if cfg!(target_os = "linux") {
            let b = m["peak_rss_bytes"].as_u64().unwrap_or_else(|| panic!("{m}"));
            // The binary, candle and a 2-block model: more than 4 MiB, far less than 16 GiB.
            assert!(b > (4 << 20) && b < (16u64 << 30), "{m}");
        }
    }
    eprintln!("tiny Wan peak memory per phase: {mem:?}");
    // The last log line of each phase carries the same figures.
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(x.join("log.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let with: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("memory").is_some()).collect();
    assert_eq!(with.len(), 2);
    assert_eq!((with[0]["step"].as_u64(), with[1]["phase"].as_u64()), (Some(3), Some(1)));
    assert_eq!(with[0]["memory"], mem[0]);
}

#[test]
fn a_two_rank_checkpoint_resumes_bit_identically_on_two_ranks_and_also_on_one() {
    let d = tempfile::tempdir().unwrap();
    let (full, part) = (d.path().join("full"), d.path().join("part"));
    // Both ranks name the same folder (a shared file system); rank 0 writes it, resume reads it.
    let both = |out: &Path, rdv: &str, extra: &[&str]| {
        let rdv = d.path().join(rdv);
        train_ranks(2, &[(0, args(out, &rdv, extra)), (1, args(out, &rdv, extra))], &[])
    };
    for r in both(&full, "f.rdv", &[]) {
        assert_eq!(r.code, Some(0), "{r:?}");
    }
    for r in both(&part, "p.rdv", &["--stop-after", "5"]) {
        assert_eq!(r.code, Some(0), "{r:?}");
        assert_eq!(r.json()["summary"]["completed"], false);
    }
    let copy = d.path().join("copy");
    std::fs::create_dir_all(copy.join("checkpoints")).unwrap();
    std::fs::create_dir_all(copy.join("experts")).unwrap();
    for sub in ["", "checkpoints", "experts"] {
        for e in std::fs::read_dir(part.join(sub)).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                std::fs::copy(&p, copy.join(sub).join(p.file_name().unwrap())).unwrap();
            }
        }
    }
    // Two ranks again: the same bytes as the run that never stopped.
    for r in both(&part, "p2.rdv", &["--resume"]) {
        assert_eq!(r.code, Some(0), "{r:?}");
        assert_eq!(r.json()["summary"]["resumed_from"], 5);
    }
    assert_eq!(experts(&part), experts(&full));
    // One rank: rank 0 keeps its stream, rank 1's batches are gone; the run completes.
    let r =
        train_ranks(1, &[(0, vec!["--recipe".into(), wan_recipe(), "--out".into(), copy.display().to_string(), "--resume".into()])], &[]);
    assert_eq!(r[0].code, Some(0), "{:?}", r[0]);
    let s = r[0].json()["summary"].clone();
    assert_eq!((s["completed"].as_bool(), s["resumed_from"].as_u64(), s["global_step"].as_u64()), (Some(true), Some(5), Some(6)));
    assert_eq!(experts(&copy)[0], experts(&full)[0], "phase 0 finished before the stop");
    assert_ne!(experts(&copy)[1], experts(&full)[1], "the last update averaged one rank, not two");
    // And a one-rank checkpoint resumes on two ranks (rank 1's stream derived from its seed and the step).
    let solo = d.path().join("solo");
    let r = train_ranks(
        1,
        &[(0, vec!["--recipe".into(), wan_recipe(), "--out".into(), solo.display().to_string(), "--stop-after".into(), "4".into()])],
        &[],
    );
    assert_eq!(r[0].code, Some(0), "{:?}", r[0]);
    for r in both(&solo, "s.rdv", &["--resume"]) {
        assert_eq!(r.code, Some(0), "{r:?}");
        assert_eq!(r.json()["summary"]["global_step"], 6);
    }
}

#[test]
fn bad_rank_environments_are_one_line_usage_errors() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o").display().to_string();
    let base = vec!["--recipe".to_string(), wan_recipe(), "--out".into(), out.clone()];
    // (RANK, WORLD_SIZE, more variables, arguments, exit code, message)
    type Case<'a> = (usize, usize, Vec<(&'a str, String)>, Vec<String>, i32, &'a str);
    let cases: Vec<Case> = vec![
        (2, 2, vec![("MASTER_ADDR", "127.0.0.1".into()), ("MASTER_PORT", "1".into())], base.clone(), 2, "RANK=2 is not below WORLD_SIZE=2"),
        (0, 2, vec![], base.clone(), 2, "needs a rendezvous"),
        (0, 2, vec![("MASTER_ADDR", "127.0.0.1".into())], base.clone(), 2, "MASTER_PORT is not"),
        (
            0,
            2,
            vec![],
            vec![
                "--recipe".into(),
                repo().join("recipes/toy-dmd2-4step.toml").display().to_string(),
                "--out".into(),
                out.clone(),
                "--rendezvous".into(),
                "tcp://127.0.0.1:1".into(),
            ],
            7,
            "toy runs on one rank",
        ),
    ];
    for (rank, world, env, a, code, want) in cases {
        let r = train_ranks_as(false, world, &[(rank, a)], &env);
        assert_eq!(r[0].code, Some(code), "{r:?}");
        let err = r[0].stderr.trim();
        assert!(err.contains(want) && err.lines().count() == 1, "{err}");
    }
    assert!(!d.path().join("o").exists());
    // Two processes that disagree on WORLD_SIZE: rank 0 refuses the other, both fail quickly.
    let rdv = d.path().join("w.rdv");
    let t = Instant::now();
    let kids = [(0usize, "2"), (1, "3")].map(|(rank, world)| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_phasekit"));
        c.args(["train"]).args(args(&d.path().join("w"), &rdv, &[]));
        c.env("RANK", rank.to_string()).env("WORLD_SIZE", world).env("PHASEKIT_DIST_TIMEOUT", "20").env_remove("MASTER_ADDR");
        c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    });
    let outs: Vec<_> = kids.into_iter().map(|k| k.wait_with_output().unwrap()).collect();
    assert!(t.elapsed() < Duration::from_secs(30));
    assert_eq!(outs[0].status.code(), Some(2), "{outs:?}");
    assert!(String::from_utf8_lossy(&outs[0].stderr).contains("rank 1 has WORLD_SIZE=3, rank 0 has 2"), "{outs:?}");
    assert_ne!(outs[1].status.code(), Some(0), "{outs:?}");
}

/// Two ranks' AdamW steps with gradients g₀ and g₁ equal one rank's step with (g₀ + g₁)/2,
/// clipping included (the norm is of the average); a variable only rank 0 has a gradient for
/// counts as zero on rank 1.
#[test]
fn two_ranks_take_the_step_of_the_mean_gradient() {
    let rdv = tempfile::tempdir().unwrap();
    let f = rdv.path().join("rdv");
    let params = ParamsAdamW { lr: 1e-2, beta1: 0.0, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
    let w0: Vec<f32> = (0..6).map(|i| 0.1 * i as f32 - 0.2).collect();
    let c = [[0.3f32, -1.5, 2.0, 0.7, -0.1, 4.0], [-0.9f32, 0.25, 1.0, 3.0, 0.6, -2.0]];
    let u = [1.5f32, -0.5, 0.125];
    // Rank r's loss: Σ w·c_r (+ Σ b·u on rank 0 only): gradients c_r and u.
    let step = |comm: Option<std::sync::Arc<dyn Communicator>>, cw: Vec<f32>, ub: Option<Vec<f32>>| {
        let w = Var::from_slice(&w0, (2, 3), &Device::Cpu).unwrap();
        let b = Var::from_slice(&[1.0f32, 2.0, 3.0], 3, &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![w.clone(), b.clone()], params.clone()).unwrap();
        if let Some(c) = comm {
            opt = opt.with_comm(c);
        }
        let mut loss = (w.as_tensor() * Tensor::from_slice(&cw, (2, 3), &Device::Cpu).unwrap()).unwrap().sum_all().unwrap();
        if let Some(ub) = ub {
            loss = (loss + (b.as_tensor() * Tensor::from_slice(&ub, 3, &Device::Cpu).unwrap()).unwrap().sum_all().unwrap()).unwrap();
        }
        let g = loss.backward().unwrap();
        let norm = opt.step(&g, 1.0).unwrap();
        (w.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap(), norm)
    };
    let cfg = |rank| DistConfig {
        rank,
        world_size: 2,
        local_rank: rank,
        rendezvous: Some(Rendezvous::File(f.clone())),
        timeout: Duration::from_secs(30),
    };
    let (r0, r1) = std::thread::scope(|sc| {
        let h = sc.spawn(|| {
            let comm: std::sync::Arc<dyn Communicator> = std::sync::Arc::new(TcpComm::connect(&cfg(1)).unwrap());
            step(Some(comm), c[1].to_vec(), None)
        });
        let comm: std::sync::Arc<dyn Communicator> = std::sync::Arc::new(TcpComm::connect(&cfg(0)).unwrap());
        let r0 = step(Some(comm), c[0].to_vec(), Some(u.to_vec()));
        (r0, h.join().unwrap())
    });
    let mean: Vec<f32> = c[0].iter().zip(&c[1]).map(|(a, b)| (a + b) / 2.0).collect();
    let half: Vec<f32> = u.iter().map(|x| x / 2.0).collect();
    let want = step(None, mean, Some(half));
    assert_eq!(r0, want);
    assert_eq!(r1, want);
    assert!(want.2 > 1.0, "clipping was active (norm {})", want.2);
}
