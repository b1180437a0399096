//! `phasekit::store::Checkpoint::open` on an arbitrary `*.safetensors.index.json` beside two
//! small valid shards. It must never panic; errors are one line and never internal; an opened
//! checkpoint's byte ranges lie inside its files.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use phasekit::store::Checkpoint;

/// A safetensors file with F32 tensors of the given names and lengths.
fn shard(tensors: &[(&str, usize)]) -> Vec<u8> {
    let mut json = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut at = 0;
    for (name, n) in tensors {
        json.push_str(&format!(",\"{name}\":{{\"dtype\":\"F32\",\"shape\":[{n}],\"data_offsets\":[{at},{}]}}", at + 4 * n));
        at += 4 * n;
    }
    json.push('}');
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let mut v = (json.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(json.as_bytes());
    v.extend((0..at).map(|i| i as u8));
    v
}

/// A folder for this process holding `a.safetensors` (x, y) and `b.safetensors` (z).
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("phasekit-fuzz-index-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("temp folder");
        std::fs::write(d.join("a.safetensors"), shard(&[("x", 2), ("y", 3)])).expect("shard a");
        std::fs::write(d.join("b.safetensors"), shard(&[("z", 1)])).expect("shard b");
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let index = dir().join("model.safetensors.index.json");
    std::fs::write(&index, data).expect("write index");
    match Checkpoint::open(&index) {
        Ok(ck) => {
            for t in &ck.tensors {
                assert!(t.offset + t.len <= ck.files[t.file].len, "tensor '{}' past the end of its file", t.name);
                assert_eq!(ck.bytes(t).len() as u64, t.len);
            }
            let sum: u64 = ck.tensors.iter().map(|t| t.len).sum();
            if let Some(ts) = ck.index.as_ref().and_then(|i| i.total_size) {
                assert_eq!(ts, sum, "total_size accepted although it differs from the tensors");
            }
        }
        Err(e) => {
            assert_ne!(e.kind(), phasekit::Kind::Internal, "internal error: {e}");
            assert!(!e.to_string().contains(['\n', '\r']), "multi-line error: {e:?}");
        }
    }
});
