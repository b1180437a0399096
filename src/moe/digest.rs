//! The canonical metadata digest of a `phasekit.moe/1` checkpoint.
//!
//! Specified in `docs/moe-format.md` ("Metadata digest"); an independent Python implementation
//! is `tests/py/moe_digest.py` and both are checked against `tests/moe_digest_vectors.json`.
//!
//! ```text
//! digest = "sha256:" || hex( SHA-256(
//!     "phasekit.moe/1 metadata digest" || 0x00
//!     || u64le(n)                                  n = number of entries hashed
//!     || for each (key, value), sorted by the UTF-8 bytes of key:
//!            u64le(len(key)) || key || u64le(len(value)) || value ) )
//! ```
//! Every `__metadata__` entry is hashed except `phasekit.moe.digest` itself. Lengths are byte
//! lengths of the UTF-8 strings as decoded from the JSON header (escapes resolved), so JSON
//! formatting, key order and header padding are deliberately unhashed.

use sha2::{Digest, Sha256};

/// The `__metadata__` key that holds the digest (the one entry it does not cover).
pub const KEY_DIGEST: &str = "phasekit.moe.digest";

/// The domain-separation prefix (NUL-terminated when hashed).
pub const DOMAIN: &str = "phasekit.moe/1 metadata digest";

/// The digest of `metadata` (any order; the digest entry itself is skipped).
pub fn metadata_digest(metadata: &[(String, String)]) -> String {
    let mut entries: Vec<(&str, &str)> = metadata.iter().filter(|(k, _)| k != KEY_DIGEST).map(|(k, v)| (k.as_str(), v.as_str())).collect();
    entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut h = Sha256::new();
    h.update(DOMAIN.as_bytes());
    h.update([0u8]);
    h.update((entries.len() as u64).to_le_bytes());
    for (k, v) in entries {
        h.update((k.len() as u64).to_le_bytes());
        h.update(k.as_bytes());
        h.update((v.len() as u64).to_le_bytes());
        h.update(v.as_bytes());
    }
    format!("sha256:{}", crate::hash::hex(&h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn order_independent_and_skips_itself() {
        let a = metadata_digest(&md(&[("b", "2"), ("a", "1")]));
        let b = metadata_digest(&md(&[("a", "1"), ("b", "2"), (KEY_DIGEST, "x")]));
        assert_eq!(a, b);
        // Length prefixes: moving a byte between key and value changes the digest.
        assert_ne!(metadata_digest(&md(&[("ab", "c")])), metadata_digest(&md(&[("a", "bc")])));
        assert_eq!(metadata_digest(&[]), metadata_digest(&md(&[(KEY_DIGEST, "y")])));
    }
}
