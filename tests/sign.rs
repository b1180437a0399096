//! `phasekit sign` / `verify --signature` against the `model-signing` package
//! (`tests/fixtures/sign/make.sh`): phasekit checks the bundle model-signing made, and
//! model-signing checks phasekit's (when `model_signing` is installed: `pip install
//! model-signing pyopenssl`). Any tampering is exit 8.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{run, run_ok, s};

fn fx(rel: &str) -> PathBuf {
    common::tests_dir("fixtures/sign").join(rel)
}

/// A copy of the fixture model in a temporary folder.
fn model_copy(d: &Path) -> PathBuf {
    let m = d.join("model");
    std::fs::create_dir_all(m.join("experts")).unwrap();
    for f in ["model.safetensors", "README.md", "experts/high_noise.safetensors"] {
        std::fs::copy(fx("model").join(f), m.join(f)).unwrap();
    }
    m
}

fn verify(model: &Path, sig: &Path, key: &Path) -> common::Out {
    run(&["verify", &s(model), "--signature", &s(sig), "--key", &s(key)])
}

fn model_signing() -> Option<&'static str> {
    let ok = Command::new("model_signing").arg("--help").output().is_ok_and(|o| o.status.success());
    ok.then_some("model_signing")
}

#[test]
fn we_verify_what_model_signing_signed() {
    let sig = fx("model-signing.sig");
    let o = run_ok(&["verify", &s(&fx("model")), "--signature", &s(&sig), "--key", &s(&fx("key.pub"))]);
    assert!(o.stdout.contains("3 files match"), "{}", o.stdout);
    let d = tempfile::tempdir().unwrap();
    let m = model_copy(d.path());
    run_ok(&["verify", &s(&m), "--signature", &s(&sig), "--key", &s(&fx("key.pub"))]);
    // Another key.
    let o = verify(&m, &sig, &fx("other.pub"));
    assert_eq!(o.code, Some(8), "{}", o.both());
    assert!(o.stderr.contains("another key"), "{}", o.stderr);
    // One byte changed, a file added, a file removed: each exit 8, each named.
    std::fs::write(m.join("experts/high_noise.safetensors"), b"expert 1\n").unwrap();
    let o = verify(&m, &sig, &fx("key.pub"));
    assert_eq!(o.code, Some(8), "{}", o.both());
    assert!(o.stdout.contains("'experts/high_noise.safetensors' changed") && o.stderr.starts_with("phasekit: error: "), "{}", o.both());
    std::fs::copy(fx("model/experts/high_noise.safetensors"), m.join("experts/high_noise.safetensors")).unwrap();
    std::fs::write(m.join("extra.bin"), b"x").unwrap();
    let o = verify(&m, &sig, &fx("key.pub"));
    assert_eq!(o.code, Some(8), "{}", o.both());
    assert!(o.stdout.contains("'extra.bin' is not covered"), "{}", o.stdout);
    std::fs::remove_file(m.join("extra.bin")).unwrap();
    std::fs::remove_file(m.join("README.md")).unwrap();
    let o = run(&["--json", "verify", &s(&m), "--signature", &s(&sig), "--key", &s(&fx("key.pub"))]);
    assert_eq!(o.code, Some(8), "{}", o.both());
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["error"]["kind"], "integrity");
    assert!(v["problems"][0].as_str().unwrap().contains("'README.md' is signed but missing"), "{v}");
    // A changed statement: the signature no longer covers it.
    let text = std::fs::read_to_string(&sig).unwrap();
    let mut b: serde_json::Value = serde_json::from_str(&text).unwrap();
    use base64::Engine;
    let eng = base64::engine::general_purpose::STANDARD;
    let payload = String::from_utf8(eng.decode(b["dsseEnvelope"]["payload"].as_str().unwrap()).unwrap()).unwrap();
    b["dsseEnvelope"]["payload"] = eng.encode(payload.replace("\"model\"", "\"other\"")).into();
    let forged = d.path().join("forged.sig");
    std::fs::write(&forged, serde_json::to_vec(&b).unwrap()).unwrap();
    let o = verify(&fx("model"), &forged, &fx("key.pub"));
    assert_eq!(o.code, Some(8), "{}", o.both());
    assert!(o.stderr.contains("does not verify"), "{}", o.stderr);
}

#[test]
fn model_signing_verifies_what_we_signed() {
    let d = tempfile::tempdir().unwrap();
    let m = model_copy(d.path());
    // The default place, inside the folder: the signature leaves itself out.
    let o = run_ok(&["sign", &s(&m), "--key", &s(&fx("key.pem"))]);
    assert!(o.stdout.contains("3 files"), "{}", o.stdout);
    let sig = m.join("model.sig");
    run_ok(&["verify", &s(&m), "--signature", &s(&sig), "--key", &s(&fx("key.pub"))]);
    // Signing again needs --force; a PKCS#8 key signs the same manifest.
    let o = run(&["sign", &s(&m), "--key", &s(&fx("key-pkcs8.pem"))]);
    assert_ne!(o.code, Some(0), "{}", o.both());
    run_ok(&["sign", &s(&m), "--key", &s(&fx("key-pkcs8.pem")), "--force"]);
    run_ok(&["verify", &s(&m), "--signature", &s(&sig), "--key", &s(&fx("key.pub"))]);
    // Keys phasekit cannot sign with.
    let o = run(&["sign", &s(&m), "--key", &s(&fx("p384.pem")), "--signature", &s(&d.path().join("x.sig"))]);
    assert_eq!(o.code, Some(7), "{}", o.both());
    assert!(o.stderr.contains("P-256"), "{}", o.stderr);
    let Some(ms) = model_signing() else {
        eprintln!("skipped the model-signing half: model_signing is not installed (pip install model-signing pyopenssl)");
        return;
    };
    let check = |model: &Path| {
        Command::new(ms)
            .args(["verify", "key", "--public_key", &s(&fx("key.pub")), "--signature", &s(&sig), &s(model)])
            .output()
            .expect("run model_signing")
    };
    let o = check(&m);
    assert!(
        o.status.success(),
        "model_signing rejects phasekit's bundle: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("Verification succeeded"));
    std::fs::write(m.join("model.safetensors"), b"tampered").unwrap();
    let o = check(&m);
    assert!(!o.status.success(), "model_signing accepted a tampered model");
    // A single file, signed as one.
    let f = d.path().join("single.safetensors");
    std::fs::copy(fx("model/model.safetensors"), &f).unwrap();
    run_ok(&["sign", &s(&f), "--key", &s(&fx("key.pem"))]);
    let o = Command::new(ms)
        .args(["verify", "key", "--public_key", &s(&fx("key.pub")), "--signature", &s(&d.path().join("single.safetensors.sig")), &s(&f)])
        .output()
        .unwrap();
    assert!(o.status.success(), "single file: {}", String::from_utf8_lossy(&o.stderr));
}
