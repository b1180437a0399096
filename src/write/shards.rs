//! Sharded outputs with the Hugging Face conventions: `huggingface_hub`'s split, its file names
//! (`model-00001-of-00003.safetensors`) and the `<file>.index.json` that `from_pretrained` reads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Split tensors into shards like huggingface_hub: in order, a new shard starts when adding a
/// tensor would pass the limit; a tensor larger than the limit gets a shard of its own.
pub fn split_shards(sizes: &[u64], max: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut cur_size = 0u64;
    for (i, &s) in sizes.iter().enumerate() {
        if s > max {
            shards.push(vec![i]);
            continue;
        }
        if !cur.is_empty() && cur_size + s > max {
            shards.push(std::mem::take(&mut cur));
            cur_size = 0;
        }
        cur.push(i);
        cur_size += s;
    }
    if !cur.is_empty() {
        shards.push(cur);
    }
    shards
}

/// The name of shard `i` of `n` for a target: `model.safetensors` → `model-00001-of-00003.safetensors`.
pub fn shard_name(base: &Path, i: usize, n: usize) -> PathBuf {
    let stem = base.file_name().and_then(|s| s.to_str()).and_then(|s| s.strip_suffix(".safetensors")).unwrap_or("model");
    base.with_file_name(format!("{stem}-{:05}-of-{:05}.safetensors", i + 1, n))
}

/// The index of a sharded target: `model.safetensors` → `model.safetensors.index.json`.
pub fn index_path(base: &Path) -> PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(".index.json");
    PathBuf::from(s)
}

/// The index text: `{"metadata": {"total_size": N, extra...}, "weight_map": {tensor: file}}`,
/// pretty-printed with a final newline, as `save_pretrained` writes it.
pub fn index_text(total_size: u64, extra: &[(String, String)], weight_map: &BTreeMap<String, String>) -> String {
    let mut meta = serde_json::Map::new();
    meta.insert("total_size".into(), total_size.into());
    for (k, v) in extra {
        meta.insert(k.clone(), v.clone().into());
    }
    let index = serde_json::json!({ "metadata": meta, "weight_map": weight_map });
    let mut text = serde_json::to_string_pretty(&index).expect("json");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_split_like_huggingface_hub() {
        assert_eq!(split_shards(&[4, 4, 4], 10), vec![vec![0, 1], vec![2]]);
        assert_eq!(split_shards(&[4, 20, 4], 10), vec![vec![1], vec![0, 2]]);
        assert_eq!(shard_name(Path::new("/a/model.safetensors"), 0, 3), Path::new("/a/model-00001-of-00003.safetensors"));
        assert_eq!(index_path(Path::new("/a/model.safetensors")), Path::new("/a/model.safetensors.index.json"));
    }

    #[test]
    fn index_like_save_pretrained() {
        let map = BTreeMap::from([("b".to_string(), "m-2.safetensors".to_string()), ("a".to_string(), "m-1.safetensors".to_string())]);
        let t = index_text(12, &[("x".into(), "y".into())], &map);
        assert_eq!(
            t,
            "{\n  \"metadata\": {\n    \"total_size\": 12,\n    \"x\": \"y\"\n  },\n  \"weight_map\": {\n    \"a\": \"m-1.safetensors\",\n    \"b\": \"m-2.safetensors\"\n  }\n}\n"
        );
    }
}
