//! Memory: the plan `train --plan` prints and `train` checks before loading anything, and out of
//! memory as an answer (exit 9, one line), never a crash.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{bin, tests_dir};

fn recipe(dir: &Path, resolution: [usize; 3], extra: &str) -> PathBuf {
    let wan = tests_dir("fixtures/wan22_t2v_tiny/diffusers");
    let text = format!(
        r#"name = "memory"
model = "wan2.2-t2v-a14b"
seed = 1
[schedule]
steps = 2
shift = 5.0
phases = [1, 2]
[train]
updates_per_phase = 1
batch = 2
ttur = 1
[transformer]
experts = ["{w}", "{w}"]
embeddings = "random:2"
expert_boundary = 0.875
lora_rank = 4
fake = "lora"
resolution_space = "latent"
resolutions = [{r:?}]
{extra}
"#,
        w = wan.display(),
        r = resolution
    );
    let p = dir.join("recipe.toml");
    std::fs::write(&p, text).unwrap();
    p
}

struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn phasekit(args: &[&str], env: &[(&str, &str)]) -> Ran {
    let mut c = Command::new(bin());
    c.args(args).env_remove("RUST_BACKTRACE");
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    Ran { code: o.status.code(), stdout: String::from_utf8_lossy(&o.stdout).into(), stderr: String::from_utf8_lossy(&o.stderr).into() }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn the_plan_lists_every_part_per_phase_and_resolution_and_loads_nothing() {
    let d = tempfile::tempdir().unwrap();
    let r = recipe(d.path(), [1, 8, 8], "");
    let out = d.path().join("run");
    let o = phasekit(&["--json", "train", "--recipe", s(&r), "--out", s(&out), "--plan", "--device-memory", "8GiB"], &[]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(!out.exists(), "--plan made the run folder");
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    let plan = &v["plan"];
    assert_eq!(plan["capacity"], 8u64 << 30);
    assert_eq!(plan["capacity_source"], "--device-memory");
    assert_eq!(plan["fits"], true);
    let entries = plan["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "one per phase at one resolution");
    for e in entries {
        let names: Vec<&str> = e["parts"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
        for want in
            ["base weights", "adapters", "optimiser states", "checkpointed activations", "recompute of one block", "attention workspace"]
        {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        let sum: u64 = e["parts"].as_array().unwrap().iter().map(|p| p["bytes"].as_u64().unwrap()).sum();
        assert_eq!(sum, e["device_bytes"].as_u64().unwrap(), "a CPU run's device is the host");
        // The tiny Wan fixture: 4x(8/2)x(8/2)... 1 frame of 4x4 patches = 16 tokens; one base file.
        assert_eq!(e["tokens"], 16);
        assert_eq!(names.iter().filter(|n| **n == "base weights").count(), 1, "two equal expert paths are one base");
    }
    // Phase 2 also holds phase 1's frozen expert: more adapter bytes.
    let adapters =
        |e: &serde_json::Value| e["parts"].as_array().unwrap().iter().find(|p| p["name"] == "adapters").unwrap()["bytes"].as_u64().unwrap();
    assert!(adapters(&entries[1]) > adapters(&entries[0]));
    // Text output names the peak and the verdict.
    // --plan writes nothing, so it needs no --out.
    let t = phasekit(&["train", "--recipe", s(&r), "--plan"], &[]);
    assert_eq!(t.code, Some(0), "{}", t.stderr);
    assert!(t.stdout.contains("← peak") && t.stdout.contains("fits"), "{}", t.stdout);
}

#[test]
fn a_run_that_cannot_fit_is_refused_before_loading_with_exit_9() {
    let d = tempfile::tempdir().unwrap();
    let r = recipe(d.path(), [2, 256, 256], "");
    let out = d.path().join("run");
    let o = phasekit(&["train", "--recipe", s(&r), "--out", s(&out), "--device-memory", "200MiB"], &[]);
    assert_eq!(o.code, Some(9), "{}", o.stderr);
    let line = o.stderr.trim();
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(line.contains("memory plan:") && line.contains("phase") && line.contains("200.0 MiB"), "{line}");
    assert!(line.contains("what would fit:") && line.contains("tokens fit"), "{line}");
    // Blocks are recomputed by default; segments are the next lever.
    assert!(line.contains("recompute_segments = true"), "{line}");
    assert!(!out.exists(), "the refused run made its folder");
    // The same budget from the environment (no --device-memory) is refused the same way.
    let o = phasekit(&["train", "--recipe", s(&r), "--out", s(&out)], &[("PHASEKIT_HOST_MEMORY_LIMIT", "200MiB")]);
    assert_eq!(o.code, Some(9), "{}", o.stderr);
    assert!(o.stderr.contains("PHASEKIT_HOST_MEMORY_LIMIT"), "{}", o.stderr);
}

#[test]
fn running_out_of_host_memory_is_one_line_and_exit_9() {
    let d = tempfile::tempdir().unwrap();
    // 2 × 16384 tokens: the run needs far more than 60 MiB of heap.
    let r = recipe(d.path(), [16, 64, 64], "");
    let out = d.path().join("run");
    let env = [("PHASEKIT_HOST_MEMORY_LIMIT", "60MiB")];
    let o = phasekit(&["train", "--recipe", s(&r), "--out", s(&out), "--skip-memory-check"], &env);
    assert_eq!(o.code, Some(9), "{}", o.stderr);
    let line = o.stderr.trim();
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(line.starts_with("phasekit: error: out of host memory during training phase 1, latent [16, 64, 64], batch 2"), "{line}");
    assert!(line.contains("asked for") && line.contains("in use") && line.contains("available"), "{line}");
    assert!(!line.contains("panicked") && !line.contains("backtrace"), "{line}");
    // --json: the error object on stdout.
    let o = phasekit(&["--json", "train", "--recipe", s(&r), "--out", s(&d.path().join("run2")), "--skip-memory-check"], &env);
    assert_eq!(o.code, Some(9));
    let v: serde_json::Value = serde_json::from_str(o.stdout.trim()).unwrap();
    assert_eq!(v["error"]["kind"], "limit");
    assert_eq!(v["error"]["exit_code"], 9);
    // A bad budget is a usage error.
    let o = phasekit(&["inspect", s(&tests_dir("fixtures/wan22_t2v_tiny/diffusers"))], &[("PHASEKIT_HOST_MEMORY_LIMIT", "lots")]);
    assert_eq!(o.code, Some(2), "{}", o.stderr);
}
