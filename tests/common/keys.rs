//! Tensor key sets for the layout tests: headers of fixture files, and full-size key sets built
//! from the tables of research/formats.md (§3.3 Qwen-Image, §4.2 Wan2.2), typed in here
//! independently of phasekit's own builders (`phasekit::replica`).

use std::path::Path;

use serde_json::Value;

/// Tensor names and shapes from a safetensors header (8-byte length, then JSON), in file order.
pub fn header(path: &Path) -> Vec<(String, Vec<u64>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let h: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    h.into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, v)| (k, v["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect()))
        .collect()
}

/// A JSON file under `tests/fixtures/`.
pub fn config(rel: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(super::fixture(rel)).unwrap()).unwrap()
}

/// One Wan expert in original names, from research/formats.md §4.2.
pub fn wan_original(dim: u64, in_dim: u64, out_dim: u64, ffn: u64, layers: u64) -> Vec<(String, Vec<u64>)> {
    let mut t: Vec<(String, Vec<u64>)> = vec![
        ("patch_embedding.weight".into(), vec![dim, in_dim, 1, 2, 2]),
        ("patch_embedding.bias".into(), vec![dim]),
        ("text_embedding.0.weight".into(), vec![dim, 4096]),
        ("text_embedding.0.bias".into(), vec![dim]),
        ("text_embedding.2.weight".into(), vec![dim, dim]),
        ("text_embedding.2.bias".into(), vec![dim]),
        ("time_embedding.0.weight".into(), vec![dim, 256]),
        ("time_embedding.0.bias".into(), vec![dim]),
        ("time_embedding.2.weight".into(), vec![dim, dim]),
        ("time_embedding.2.bias".into(), vec![dim]),
        ("time_projection.1.weight".into(), vec![6 * dim, dim]),
        ("time_projection.1.bias".into(), vec![6 * dim]),
        ("head.head.weight".into(), vec![out_dim * 4, dim]),
        ("head.head.bias".into(), vec![out_dim * 4]),
        ("head.modulation".into(), vec![1, 2, dim]),
    ];
    for n in 0..layers {
        let p = format!("blocks.{n}.");
        t.push((format!("{p}modulation"), vec![1, 6, dim]));
        for a in ["self_attn", "cross_attn"] {
            for m in ["q", "k", "v", "o"] {
                t.push((format!("{p}{a}.{m}.weight"), vec![dim, dim]));
                t.push((format!("{p}{a}.{m}.bias"), vec![dim]));
            }
            t.push((format!("{p}{a}.norm_q.weight"), vec![dim]));
            t.push((format!("{p}{a}.norm_k.weight"), vec![dim]));
        }
        t.push((format!("{p}norm3.weight"), vec![dim]));
        t.push((format!("{p}norm3.bias"), vec![dim]));
        t.push((format!("{p}ffn.0.weight"), vec![ffn, dim]));
        t.push((format!("{p}ffn.0.bias"), vec![ffn]));
        t.push((format!("{p}ffn.2.weight"), vec![dim, ffn]));
        t.push((format!("{p}ffn.2.bias"), vec![dim]));
    }
    t
}
