//! `phasekit bench replica`: the sparse default costs no disk; `--random` refuses (exit 9) when
//! the output's file system lacks the replica's size, before writing anything; its options need
//! `--random` and a sane `--std` (exit 2); `--help` says what `--random` costs. (The random values
//! themselves are tested in `src/replica.rs` on small tensor lists: a full-size random replica is
//! 10-41 GB.)

mod common;

use std::os::unix::fs::MetadataExt;

use common::{run, run_ok};
use serde_json::Value;

#[test]
fn random_replica_refuses_without_the_disk_it_needs() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("wan.safetensors");
    let o = run(&["bench", "replica", "wan-ti2v5b", &out.display().to_string(), "--random", "--seed", "3", "--keep-free", "900000TB"]);
    assert_eq!(o.code, Some(9), "{}", o.both());
    assert_eq!(o.stderr.trim().lines().count(), 1, "{}", o.stderr);
    assert!(
        o.stderr.contains(&d.path().display().to_string()) && o.stderr.contains("--random writes") && o.stderr.contains("GB are free"),
        "{}",
        o.stderr
    );
    assert!(std::fs::read_dir(d.path()).unwrap().next().is_none(), "something was written");
}

#[test]
fn random_options_are_checked() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("wan.safetensors").display().to_string();
    // Each refused for its own reason (the message says which).
    let cases: [(&[&str], &str); 5] = [
        (&["--seed", "1"], "--random"),
        (&["--std", "0.1"], "--random"),
        (&["--random", "--std=-1"], "--std -1 must be"),
        (&["--random", "--std", "NaN"], "--std NaN must be"),
        (&["--random", "--keep-free", "lots"], "invalid size 'lots'"),
    ];
    for (args, why) in cases {
        let mut a = vec!["bench", "replica", "wan-ti2v5b", &out];
        a.extend(args);
        let o = run(&a);
        assert_eq!(o.code, Some(2), "{args:?}: {}", o.both());
        assert!(o.stderr.contains(why), "{args:?}: {}", o.stderr);
        assert!(!d.path().join("wan.safetensors").exists());
    }
    let help = run_ok(&["bench", "replica", "--help"]).stdout.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(help.contains("--random") && help.contains("costs real disk") && help.contains("--seed"), "{help}");
}

#[test]
fn sparse_replica_is_the_default_and_costs_no_disk() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("wan.safetensors");
    let v: Value = serde_json::from_str(&run_ok(&["--json", "bench", "replica", "wan-ti2v5b", &out.display().to_string()]).stdout).unwrap();
    assert_eq!((v["values"].as_str(), v["seed"].is_null()), (Some("sparse"), true), "{v}");
    let m = std::fs::metadata(&out).unwrap();
    assert!(m.len() > 9_000_000_000 && m.blocks() * 512 < 100_000_000, "{} bytes in {} blocks", m.len(), m.blocks());
}
