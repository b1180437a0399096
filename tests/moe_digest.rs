//! The metadata digest against the test vectors, and against the independent Python
//! implementation (`tests/py/moe_digest.py`) on vectors and on a real checkpoint.

mod common;

use std::process::Command;

use common::{run_ok, tests_dir};

fn vectors() -> Vec<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(tests_dir("moe_digest_vectors.json")).unwrap()).unwrap()
}

#[test]
fn rust_matches_the_vectors() {
    let v = vectors();
    assert!(v.len() >= 8);
    for case in v {
        let md: Vec<(String, String)> =
            case["metadata"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect();
        assert_eq!(phasekit::moe::digest::metadata_digest(&md), case["digest"].as_str().unwrap(), "{}", case["name"]);
    }
}

#[test]
fn python_matches_vectors_and_a_real_file() {
    if !Command::new("python3").arg("--version").output().is_ok_and(|o| o.status.success()) {
        println!("skipped: python3 not available");
        return;
    }
    let script = tests_dir("py/moe_digest.py");
    let o = Command::new("python3").arg(&script).arg("vectors").arg(tests_dir("moe_digest_vectors.json")).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("m.safetensors");
    let w = tests_dir("fixtures/wan22_t2v_tiny/original/diffusion_pytorch_model.safetensors");
    run_ok(&[
        "assemble",
        "--expert",
        w.to_str().unwrap(),
        "--sigma-range",
        "0:1",
        "--shift",
        "5",
        "--steps",
        "4",
        "-o",
        out.to_str().unwrap(),
    ]);
    let o = Command::new("python3").arg(&script).arg("file").arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    let parts: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[0], parts[1], "stored digest vs Python's");
}
