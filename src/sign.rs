//! `phasekit sign` and `verify --signature`: OpenSSF Model Signing bundles with a local key.
//!
//! The format is the one the `model-signing` package (sigstore/model-transparency, v1.x) writes
//! for its `key` method, so that its verifier accepts phasekit's signatures and phasekit checks
//! its signatures:
//!
//! - **Manifest**: every file under the model folder (recursively; or the one file), except
//!   the ignored paths (`.git`, `.gitattributes`, `.github`, `.gitignore`, the signature
//!   itself, and any `--ignore`), hashed with SHA-256 whole (`method: files`). Symbolic links
//!   are refused. Resources are sorted by path, component by component (Python's `PurePath`
//!   order: `a/b` before `a.txt`); a single-file model's one resource is named `.`.
//! - **Statement**: an in-toto Statement v1 whose `subject` is the model's name (the folder's or
//!   file's final component) with the SHA-256 of the resource digests concatenated (raw bytes,
//!   in order), `predicateType` `https://model_signing/signature/v1.0`, and a `predicate` holding
//!   `serialization` (`method`, `hash_type`, `allow_symlinks`, `ignore_paths`) and `resources`
//!   (`name`, `algorithm`, `digest` per file).
//! - **Envelope**: DSSE: the statement's JSON as `payload` (base64), `payloadType`
//!   `application/vnd.in-toto+json`, one signature over the pre-authentication encoding
//!   `DSSEv1 <len(type)> <type> <len(payload)> <payload>`: ECDSA P-256 with SHA-256, DER, base64.
//! - **Bundle**: a Sigstore bundle v0.3 (`mediaType`
//!   `application/vnd.dev.sigstore.bundle.v0.3+json`) with the envelope and, as verification
//!   material, a public key hint: the SHA-256 (hex) of the public key as PEM SubjectPublicKeyInfo.
//!   No transparency log entry (a local key signs offline).
//!
//! Verification recomputes the manifest of the folder with the signature's own serialization
//! parameters and reports every difference: a changed file, a missing one, one the signature
//! does not cover (exit 8, like every integrity failure).

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use base64::Engine as _;
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use p256::ecdsa::{DerSignature, Signature, SigningKey, VerifyingKey};
use p256::pkcs8::{DecodePrivateKey, EncodePublicKey, LineEnding};
use rayon::prelude::*;
use serde::Serialize;
use serde_json::{json, Value};

use crate::error::{clean, Error, IoContext, Kind, Result};

pub const BUNDLE_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const PREDICATE_TYPE: &str = "https://model_signing/signature/v1.0";
/// Paths `model-signing` always ignores (its `ignore_git_paths` default).
pub const GIT_PATHS: [&str; 4] = [".git", ".gitattributes", ".github", ".gitignore"];
/// Largest signature file read.
const MAX_BUNDLE: u64 = 64 << 20;

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// The DSSE pre-authentication encoding of a payload.
pub fn pae(payload: &[u8]) -> Vec<u8> {
    let mut v = format!("DSSEv1 {} {PAYLOAD_TYPE} {} ", PAYLOAD_TYPE.len(), payload.len()).into_bytes();
    v.extend_from_slice(payload);
    v
}

/// Read a P-256 private key: SEC1 (`BEGIN EC PRIVATE KEY`, what `openssl ecparam -genkey`
/// writes) or PKCS#8 (`BEGIN PRIVATE KEY`), unencrypted.
pub fn read_private_key(path: &Path) -> Result<SigningKey> {
    let text = std::fs::read_to_string(path).with_file(path)?;
    if text.contains("ENCRYPTED") {
        return Err(Error::at(Kind::Unsupported, path, "an encrypted private key; decrypt it first (openssl ec -in KEY -out PLAIN)"));
    }
    let secret = if text.contains("BEGIN EC PRIVATE KEY") {
        p256::SecretKey::from_sec1_pem(&text).map_err(|e| key_error(path, &text, e.to_string()))?
    } else if text.contains("BEGIN PRIVATE KEY") {
        p256::SecretKey::from_pkcs8_pem(&text).map_err(|e| key_error(path, &text, e.to_string()))?
    } else {
        return Err(Error::malformed(path, "not a PEM private key (BEGIN EC PRIVATE KEY or BEGIN PRIVATE KEY)"));
    };
    Ok(SigningKey::from(secret))
}

fn key_error(path: &Path, text: &str, e: String) -> Error {
    // A key on another curve parses as PEM but not as P-256.
    if text.contains("BEGIN") {
        Error::at(
            Kind::Unsupported,
            path,
            format!("not an unencrypted ECDSA P-256 key ({e}); phasekit signs with P-256 (openssl ecparam -name prime256v1 -genkey)"),
        )
    } else {
        Error::malformed(path, e)
    }
}

/// Read a P-256 public key (PEM SubjectPublicKeyInfo, `BEGIN PUBLIC KEY`).
pub fn read_public_key(path: &Path) -> Result<VerifyingKey> {
    use p256::pkcs8::DecodePublicKey;
    let text = std::fs::read_to_string(path).with_file(path)?;
    if !text.contains("BEGIN PUBLIC KEY") {
        return Err(Error::malformed(path, "not a PEM public key (BEGIN PUBLIC KEY)"));
    }
    VerifyingKey::from_public_key_pem(&text).map_err(|e| key_error(path, &text, e.to_string()))
}

/// The key hint of a bundle: the SHA-256 of the public key's PEM (as Python's `cryptography`
/// writes it: 64-column base64, `\n` line ends).
pub fn key_hint(key: &VerifyingKey) -> Result<String> {
    let pem = key.to_public_key_pem(LineEnding::LF).map_err(|e| Error::internal(format!("public key PEM: {e}")))?;
    Ok(crate::hash::sha256_hex(pem.as_bytes()))
}

/// One file of the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Resource {
    pub name: String,
    pub digest: String,
}

/// Whether relative path `rel` (components) is under one of the ignored paths.
fn ignored(rel: &[String], ignore: &[Vec<String>]) -> bool {
    ignore.iter().any(|i| !i.is_empty() && rel.len() >= i.len() && rel[..i.len()] == i[..])
}

fn components(p: &Path) -> Vec<String> {
    p.components().filter_map(|c| if let Component::Normal(s) = c { Some(s.to_string_lossy().into_owned()) } else { None }).collect()
}

/// The files of a model (relative components, sorted as `model-signing` sorts them).
fn list_files(root: &Path, ignore: &[Vec<String>]) -> Result<Vec<Vec<String>>> {
    let mut out = Vec::new();
    let mut stack = vec![Vec::<String>::new()];
    while let Some(rel) = stack.pop() {
        let dir = rel.iter().fold(root.to_path_buf(), |p, c| p.join(c));
        for e in std::fs::read_dir(&dir).with_file(&dir)? {
            let e = e.with_file(&dir)?;
            let mut r = rel.clone();
            r.push(e.file_name().to_string_lossy().into_owned());
            if ignored(&r, ignore) {
                continue;
            }
            let ft = e.file_type().with_file(&e.path())?;
            if ft.is_symlink() {
                return Err(Error::at(
                    Kind::Unsupported,
                    e.path(),
                    "is a symbolic link; model-signing does not follow links by default (copy the file in, or --ignore it)",
                ));
            } else if ft.is_dir() {
                stack.push(r);
            } else if ft.is_file() {
                out.push(r);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Hash every file of `model` (a folder or one file), skipping `ignore` (paths relative to it).
pub fn manifest(model: &Path, ignore: &[String]) -> Result<Vec<Resource>> {
    let meta = std::fs::symlink_metadata(model).with_file(model)?;
    if meta.file_type().is_symlink() {
        return Err(Error::at(Kind::Unsupported, model, "is a symbolic link; name the folder or file it points to"));
    }
    if meta.is_file() {
        return Ok(vec![Resource { name: ".".into(), digest: crate::hash::sha256_file(model, &|_| {})? }]);
    }
    let ignore: Vec<Vec<String>> = ignore.iter().map(|s| components(Path::new(s))).collect();
    let files = list_files(model, &ignore)?;
    files
        .par_iter()
        .map(|r| {
            let p = r.iter().fold(model.to_path_buf(), |p, c| p.join(c));
            Ok(Resource { name: r.join("/"), digest: crate::hash::sha256_file(&p, &|_| {})? })
        })
        .collect()
}

/// The in-toto statement over a manifest.
pub fn statement(model_name: &str, resources: &[Resource], ignore_paths: &[String]) -> Result<Value> {
    use sha2::{Digest, Sha256};
    let mut root = Sha256::new();
    for r in resources {
        let raw = (0..r.digest.len() / 2)
            .map(|i| u8::from_str_radix(&r.digest[2 * i..2 * i + 2], 16))
            .collect::<std::result::Result<Vec<u8>, _>>()
            .map_err(|_| Error::internal(format!("digest of {} is not hex", r.name)))?;
        root.update(&raw);
    }
    Ok(json!({
        "_type": STATEMENT_TYPE,
        "subject": [{"name": model_name, "digest": {"sha256": crate::hash::hex(&root.finalize())}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": {"method": "files", "hash_type": "sha256", "allow_symlinks": false, "ignore_paths": ignore_paths},
            "resources": resources.iter().map(|r| json!({"name": r.name, "algorithm": "sha256", "digest": r.digest})).collect::<Vec<_>>(),
        }
    }))
}

/// What `sign` did.
#[derive(Debug, Clone, Serialize)]
pub struct SignReport {
    pub model: PathBuf,
    pub signature: PathBuf,
    pub files: usize,
    pub bytes: u64,
    pub key_hint: String,
    pub root_digest: String,
}

/// The signature path a model gets by default: `<folder>/model.sig`, or `<file>.sig`.
pub fn default_signature(model: &Path) -> PathBuf {
    if model.is_dir() {
        model.join("model.sig")
    } else {
        let mut s = model.as_os_str().to_owned();
        s.push(".sig");
        PathBuf::from(s)
    }
}

/// The ignore paths recorded in a signature: git's, the signature itself when it lies inside the
/// model folder, and the user's.
fn ignore_paths(model: &Path, signature: &Path, extra: &[String]) -> Vec<String> {
    let mut v: Vec<String> = GIT_PATHS.iter().map(|s| s.to_string()).collect();
    if model.is_dir() {
        let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        if let Ok(rel) = abs(signature).strip_prefix(abs(model)) {
            v.push(components(rel).join("/"));
        }
    }
    for e in extra {
        let c = components(Path::new(e)).join("/");
        if !c.is_empty() && !v.contains(&c) {
            v.push(c);
        }
    }
    v
}

/// Sign `model` with the private key at `key`, writing the bundle to `signature`.
pub fn sign(model: &Path, key: &Path, signature: &Path, ignore: &[String], force: bool) -> Result<SignReport> {
    crate::atomic::check_target(signature, force)?;
    let sk = read_private_key(key)?;
    let vk = VerifyingKey::from(&sk);
    let ign = ignore_paths(model, signature, ignore);
    let resources = manifest(model, &ign)?;
    if resources.is_empty() {
        return Err(Error::at(Kind::Usage, model, "holds no files to sign"));
    }
    let abs = std::path::absolute(model).unwrap_or_else(|_| model.to_path_buf());
    let name = abs.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let st = statement(&name, &resources, &ign)?;
    let payload = serde_json::to_vec_pretty(&st).map_err(|e| Error::internal(e.to_string()))?;
    let sig: Signature = sk.sign(&pae(&payload));
    let der: DerSignature = sig.to_der();
    let hint = key_hint(&vk)?;
    let bundle = json!({
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": hint}, "tlogEntries": []},
        "dsseEnvelope": {
            "payload": b64().encode(&payload),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": b64().encode(der.as_bytes()), "keyid": ""}],
        }
    });
    let mut text = serde_json::to_string_pretty(&bundle).map_err(|e| Error::internal(e.to_string()))?;
    text.push('\n');
    crate::atomic::write_file(signature, text.as_bytes())?;
    let bytes = resources
        .iter()
        .map(|r| if r.name == "." { model.to_path_buf() } else { model.join(&r.name) })
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    Ok(SignReport {
        model: model.to_path_buf(),
        signature: signature.to_path_buf(),
        files: resources.len(),
        bytes,
        key_hint: hint,
        root_digest: st["subject"][0]["digest"]["sha256"].as_str().unwrap_or("").to_string(),
    })
}

/// What `verify --signature` found.
#[derive(Debug, Clone, Serialize)]
pub struct SignatureReport {
    pub model: PathBuf,
    pub signature: PathBuf,
    pub ok: bool,
    /// The subject name and root digest the signature covers.
    pub subject: String,
    pub root_digest: String,
    pub files: usize,
    /// Every difference between the signed manifest and the files.
    pub problems: Vec<String>,
}

fn field<'v>(v: &'v Value, path: &[&str], sig: &Path) -> Result<&'v Value> {
    let mut cur = v;
    for k in path {
        cur = cur.get(*k).ok_or_else(|| Error::malformed(sig, format!("the bundle has no '{}'", path.join("."))))?;
    }
    Ok(cur)
}

/// Check the bundle at `signature` with the public key at `key`, then every file of `model`
/// against the signed manifest.
pub fn verify(model: &Path, signature: &Path, key: &Path) -> Result<SignatureReport> {
    let vk = read_public_key(key)?;
    let len = std::fs::metadata(signature).with_file(signature)?.len();
    if len > MAX_BUNDLE {
        return Err(Error::limit(signature, format!("{len} bytes, over the {MAX_BUNDLE}-byte limit of a signature bundle")));
    }
    let text = std::fs::read(signature).with_file(signature)?;
    let bundle: Value = serde_json::from_slice(&text).map_err(|e| Error::malformed(signature, format!("not a JSON bundle: {e}")))?;
    let media = field(&bundle, &["mediaType"], signature)?.as_str().unwrap_or("");
    if media != BUNDLE_MEDIA_TYPE {
        return Err(Error::at(
            Kind::Unsupported,
            signature,
            format!("bundle media type '{}' (phasekit checks {BUNDLE_MEDIA_TYPE})", clean(media)),
        ));
    }
    if bundle.pointer("/verificationMaterial/certificate").is_some()
        || bundle.pointer("/verificationMaterial/x509CertificateChain").is_some()
    {
        return Err(Error::at(
            Kind::Unsupported,
            signature,
            "signed with a certificate (Sigstore or PKI); phasekit checks signatures made with a key",
        ));
    }
    let hint = key_hint(&vk)?;
    if let Some(h) = bundle.pointer("/verificationMaterial/publicKey/hint").and_then(Value::as_str) {
        if !h.is_empty() && h != hint {
            return Err(Error::integrity(
                signature,
                format!("signed by another key: the bundle names key {} but {} is {hint}", clean(h), key.display()),
            ));
        }
    }
    let env = field(&bundle, &["dsseEnvelope"], signature)?;
    let ptype = field(env, &["payloadType"], signature)?.as_str().unwrap_or("");
    if ptype != PAYLOAD_TYPE {
        return Err(Error::at(Kind::Unsupported, signature, format!("payload type '{}' (expected {PAYLOAD_TYPE})", clean(ptype))));
    }
    let payload = b64()
        .decode(field(env, &["payload"], signature)?.as_str().unwrap_or(""))
        .map_err(|e| Error::malformed(signature, format!("payload is not base64: {e}")))?;
    let sigs = field(env, &["signatures"], signature)?
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| Error::malformed(signature, "the envelope has no signature"))?;
    let raw = b64()
        .decode(sigs[0].get("sig").and_then(Value::as_str).unwrap_or(""))
        .map_err(|e| Error::malformed(signature, format!("signature is not base64: {e}")))?;
    let sig = Signature::from_der(&raw).map_err(|e| Error::malformed(signature, format!("signature is not a DER ECDSA signature: {e}")))?;
    vk.verify(&pae(&payload), &sig).map_err(|_| {
        Error::integrity(
            signature,
            format!("the signature does not verify with {}: the statement was changed or another key signed it", key.display()),
        )
    })?;
    // The statement, now trusted.
    let st: Value =
        serde_json::from_slice(&payload).map_err(|e| Error::malformed(signature, format!("the signed statement is not JSON: {e}")))?;
    let pt = st.get("predicateType").and_then(Value::as_str).unwrap_or("");
    if pt != PREDICATE_TYPE {
        return Err(Error::at(Kind::Unsupported, signature, format!("predicate type '{}' (phasekit checks {PREDICATE_TYPE})", clean(pt))));
    }
    let ser = field(&st, &["predicate", "serialization"], signature)?;
    let method = ser.get("method").and_then(Value::as_str).unwrap_or("");
    let hash = ser.get("hash_type").and_then(Value::as_str).unwrap_or("");
    if method != "files" || hash != "sha256" {
        return Err(Error::at(
            Kind::Unsupported,
            signature,
            format!("serialization '{}' with '{}' (phasekit checks whole files with sha256)", clean(method), clean(hash)),
        ));
    }
    let ignore: Vec<String> = ser
        .get("ignore_paths")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let subject = field(&st, &["subject"], signature)?
        .as_array()
        .and_then(|a| a.first())
        .ok_or_else(|| Error::malformed(signature, "the statement has no subject"))?;
    let subject_name = subject.get("name").and_then(Value::as_str).unwrap_or("").to_string();
    let root = subject.pointer("/digest/sha256").and_then(Value::as_str).unwrap_or("").to_string();
    let signed: Vec<Resource> = field(&st, &["predicate", "resources"], signature)?
        .as_array()
        .ok_or_else(|| Error::malformed(signature, "predicate.resources is not a list"))?
        .iter()
        .map(|r| {
            let name = r.get("name").and_then(Value::as_str).ok_or_else(|| Error::malformed(signature, "a resource has no name"))?;
            if r.get("algorithm").and_then(Value::as_str) != Some("sha256") {
                return Err(Error::at(Kind::Unsupported, signature, format!("resource '{}' is not hashed with sha256", clean(name))));
            }
            let digest = r
                .get("digest")
                .and_then(Value::as_str)
                .ok_or_else(|| Error::malformed(signature, format!("resource '{}' has no digest", clean(name))))?;
            Ok(Resource { name: name.to_string(), digest: digest.to_string() })
        })
        .collect::<Result<_>>()?;
    // The subject binds the resource list.
    let want_root = statement(&subject_name, &signed, &ignore)?["subject"][0]["digest"]["sha256"].as_str().unwrap_or("").to_string();
    let mut problems = Vec::new();
    if want_root != root {
        problems.push(format!("the subject digest {root} is not the digest of the listed resources ({want_root})"));
    }
    let have: BTreeMap<String, String> = manifest(model, &ignore)?.into_iter().map(|r| (r.name, r.digest)).collect();
    let want: BTreeMap<&str, &str> = signed.iter().map(|r| (r.name.as_str(), r.digest.as_str())).collect();
    for (name, d) in &want {
        match have.get(*name) {
            None => problems.push(format!("'{}' is signed but missing", clean(name))),
            Some(h) if h != d => problems.push(format!("'{}' changed: signed sha256 {d}, found {h}", clean(name))),
            Some(_) => {}
        }
    }
    for name in have.keys() {
        if !want.contains_key(name.as_str()) {
            problems.push(format!("'{}' is not covered by the signature", clean(name)));
        }
    }
    Ok(SignatureReport {
        model: model.to_path_buf(),
        signature: signature.to_path_buf(),
        ok: problems.is_empty(),
        subject: subject_name,
        root_digest: root,
        files: want.len(),
        problems,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_and_order_match_model_signing() {
        assert_eq!(pae(b"{}"), b"DSSEv1 28 application/vnd.in-toto+json 2 {}".to_vec());
        // PurePath order: components compared one by one.
        let mut v = [vec!["a.txt".to_string()], vec!["a".into(), "b".into()], vec!["b.bin".into()]];
        v.sort();
        assert_eq!(v[0], vec!["a".to_string(), "b".into()]);
        assert!(ignored(&["x".into(), ".git".into()], &[vec!["x".into()]]));
        assert!(!ignored(&["xy".into()], &[vec!["x".into()]]));
    }
}

/// `phasekit sign`: write an OpenSSF Model Signing bundle for a model folder or file.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  openssl ecparam -name prime256v1 -genkey -noout -out key.pem\n  openssl ec -in key.pem -pubout -out key.pub\n  phasekit sign release/ --key key.pem\n  phasekit verify release/ --signature release/model.sig --key key.pub\n  model_signing verify key release --signature release/model.sig --public_key key.pub"
)]
pub struct SignArgs {
    /// The model: a folder (every file under it is signed) or one file.
    pub model: PathBuf,
    /// Private key, PEM (ECDSA P-256: SEC1 `EC PRIVATE KEY` or PKCS#8 `PRIVATE KEY`, unencrypted).
    #[arg(long, value_name = "KEY.pem")]
    pub key: PathBuf,
    /// Where to write the bundle (default: MODEL/model.sig, or MODEL.sig for a file).
    #[arg(long, value_name = "PATH")]
    pub signature: Option<PathBuf>,
    /// A path (relative to MODEL) to leave out of the signature; repeat. `.git*` paths and the
    /// signature itself are always left out.
    #[arg(long = "ignore", value_name = "PATH")]
    pub ignore: Vec<String>,
    /// Replace an existing signature file.
    #[arg(long)]
    pub force: bool,
}

fn print_json(v: &impl Serialize) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{}", serde_json::to_string_pretty(v).expect("json"));
}

/// Run `phasekit sign`.
pub fn run_sign(a: &SignArgs, json: bool) -> Result<()> {
    let sig = a.signature.clone().unwrap_or_else(|| default_signature(&a.model));
    let r = sign(&a.model, &a.key, &sig, &a.ignore, a.force)?;
    if json {
        print_json(&json!({ "ok": true, "report": r }));
    } else {
        println!(
            "signed {} ({} files, {:.1} MB) → {}: key {}, root sha256 {}",
            r.model.display(),
            r.files,
            r.bytes as f64 / 1e6,
            r.signature.display(),
            &r.key_hint[..16],
            r.root_digest
        );
    }
    Ok(())
}

/// Run `phasekit verify MODEL --signature SIG --key KEY`: exit 0 when the signature verifies
/// and every file matches it, 8 otherwise.
pub fn run_verify(model: &Path, signature: &Path, key: &Path, json: bool) -> Result<()> {
    let r = verify(model, signature, key)?;
    let err = (!r.ok).then(|| {
        Error::integrity(
            model,
            format!("{} of {} signed files do not match: {}", r.problems.len(), r.files, r.problems.first().cloned().unwrap_or_default()),
        )
    });
    if json {
        let mut v = serde_json::to_value(&r).map_err(|e| Error::internal(e.to_string()))?;
        if let Some(e) = &err {
            v["error"] = json!({ "kind": e.kind().as_str(), "exit_code": e.exit_code(), "path": e.path(), "message": e.message() });
        }
        print_json(&v);
        if let Some(e) = err {
            std::process::exit(e.exit_code());
        }
        return Ok(());
    }
    if r.ok {
        println!(
            "ok   signature {}: signed by key {}, {} files match (root sha256 {})",
            signature.display(),
            key.display(),
            r.files,
            r.root_digest
        );
    } else {
        for p in &r.problems {
            println!("FAIL {p}");
        }
    }
    err.map_or(Ok(()), Err)
}
