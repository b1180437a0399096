//! `phasekit inspect`: what a checkpoint is, without reading its tensor data.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::error::Result;
use crate::layout::{Detection, Registry};
use crate::store::{open_models, Checkpoint};

#[derive(Debug, Serialize, Default)]
pub struct DTypeStat {
    pub tensors: usize,
    pub params: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct FileStat {
    pub file: String,
    pub tensors: usize,
    pub bytes: u64,
}

/// Everything `inspect` reports about one model.
#[derive(Debug, Serialize)]
pub struct ModelReport {
    /// Role inside a multi-model folder (`high_noise_model`, `transformer_2`, ...), or empty.
    pub role: String,
    pub path: String,
    pub format: &'static str,
    pub detection: Option<Detection>,
    /// Why detection failed, when it did.
    pub detection_error: Option<String>,
    pub tensors: usize,
    pub params: u64,
    pub data_bytes: u64,
    pub dtypes: BTreeMap<String, DTypeStat>,
    pub max_ndim: usize,
    pub files: Vec<FileStat>,
    pub index_total_size: Option<u64>,
    pub metadata: BTreeMap<String, String>,
    pub config_path: Option<String>,
    pub config: Option<serde_json::Value>,
    pub gguf: Option<serde_json::Value>,
    /// fp8 scale conventions found (`scale_weight`, `weight_scale`, `scaled_fp8` marker).
    pub fp8_scales: Vec<String>,
}

pub fn inspect_checkpoint(role: &str, ck: &Checkpoint) -> ModelReport {
    let det = Registry::builtin().detect(&ck.names_and_shapes(), ck.config.as_ref().map(|c| &c.json));
    let mut dtypes: BTreeMap<String, DTypeStat> = BTreeMap::new();
    let mut per_file = vec![(0usize, 0u64); ck.files.len()];
    for t in &ck.tensors {
        let s = dtypes.entry(t.encoding.name()).or_default();
        s.tensors += 1;
        s.params += t.numel();
        s.bytes += t.len;
        per_file[t.file].0 += 1;
        per_file[t.file].1 += t.len;
    }
    let mut fp8 = Vec::new();
    for (suffix, label) in [(".scale_weight", "scale_weight"), (".weight_scale", "weight_scale")] {
        let n = ck.tensors.iter().filter(|t| t.name.ends_with(suffix)).count();
        if n > 0 {
            fp8.push(format!("{label} ({n} tensors)"));
        }
    }
    if ck.tensors.iter().any(|t| t.name == "scaled_fp8" || t.name.ends_with(".scaled_fp8")) {
        fp8.push("scaled_fp8 marker".into());
    }
    let gguf = ck.gguf.as_ref().map(|g| {
        let kv: serde_json::Map<String, serde_json::Value> = g.kv.iter().map(|(k, v)| (k.clone(), v.to_json())).collect();
        serde_json::json!({ "version": g.version, "alignment": g.alignment, "kv": kv })
    });
    let (detection, detection_error) = match det {
        Ok(d) => (Some(d), None),
        Err(e) => (None, Some(e.message().to_string())),
    };
    ModelReport {
        role: role.to_string(),
        path: ck.path.display().to_string(),
        format: ck.format.as_str(),
        detection,
        detection_error,
        tensors: ck.tensors.len(),
        params: ck.param_count(),
        data_bytes: ck.data_bytes(),
        dtypes,
        max_ndim: ck.tensors.iter().map(|t| t.shape.len()).max().unwrap_or(0),
        files: ck
            .files
            .iter()
            .zip(per_file)
            .map(|(f, (n, b))| FileStat { file: f.path.display().to_string(), tensors: n, bytes: b })
            .collect(),
        index_total_size: ck.index.as_ref().and_then(|i| i.total_size),
        metadata: ck.metadata.iter().cloned().collect(),
        config_path: ck.config.as_ref().map(|c| c.path.display().to_string()),
        config: ck.config.as_ref().map(|c| c.json.clone()),
        gguf,
        fp8_scales: fp8,
    }
}

/// Inspect every model under `path`.
pub fn inspect(path: &Path) -> Result<Vec<ModelReport>> {
    Ok(open_models(path)?.iter().map(|(role, ck)| inspect_checkpoint(role, ck)).collect())
}

fn human(n: u64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < units.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", units[u])
    }
}

fn params(n: u64) -> String {
    if n >= 1_000_000_000 {
        format!("{:.2}B ({n})", n as f64 / 1e9)
    } else if n >= 1_000_000 {
        format!("{:.2}M ({n})", n as f64 / 1e6)
    } else {
        n.to_string()
    }
}

/// Human-readable text for one model.
pub fn render(r: &ModelReport) -> String {
    let mut s = String::new();
    if !r.role.is_empty() {
        s.push_str(&format!("== {} ==\n", r.role));
    }
    s.push_str(&format!("path:       {}\n", r.path));
    s.push_str(&format!("format:     {}\n", r.format));
    match &r.detection {
        Some(d) => {
            s.push_str(&format!("family:     {} — {}\n", d.family, d.variant));
            let prefix = if d.prefix.is_empty() { String::new() } else { format!(" (prefix '{}')", d.prefix) };
            s.push_str(&format!("layout:     {}{prefix}\n", format!("{:?}", d.layout).to_lowercase()));
        }
        None => s.push_str(&format!("family:     unknown ({})\n", r.detection_error.as_deref().unwrap_or("?"))),
    }
    s.push_str(&format!("parameters: {}\n", params(r.params)));
    s.push_str(&format!("tensors:    {} ({} of data, up to {}-D)\n", r.tensors, human(r.data_bytes), r.max_ndim));
    s.push_str("dtypes:\n");
    for (k, v) in &r.dtypes {
        s.push_str(&format!("  {k:<8} {:>6} tensors {:>16} params {:>12}\n", v.tensors, v.params, human(v.bytes)));
    }
    if !r.fp8_scales.is_empty() {
        s.push_str(&format!("fp8 scales: {}\n", r.fp8_scales.join(", ")));
    }
    if r.files.len() > 1 {
        s.push_str(&format!("shards:     {}\n", r.files.len()));
        for f in &r.files {
            s.push_str(&format!("  {} ({} tensors, {})\n", f.file, f.tensors, human(f.bytes)));
        }
    }
    if let Some(t) = r.index_total_size {
        s.push_str(&format!("index total_size: {t}\n"));
    }
    if !r.metadata.is_empty() {
        s.push_str("metadata:\n");
        for (k, v) in &r.metadata {
            let v = crate::error::clean(v);
            s.push_str(&format!("  {k}: {v}\n"));
        }
    }
    if let Some(g) = &r.gguf {
        s.push_str(&format!("gguf:       version {} alignment {}\n", g["version"], g["alignment"]));
        if let Some(kv) = g["kv"].as_object() {
            for (k, v) in kv {
                let mut t = v.to_string();
                if t.len() > 100 {
                    t.truncate(100);
                    t.push('…');
                }
                s.push_str(&format!("  {k} = {t}\n"));
            }
        }
    }
    if let Some(p) = &r.config_path {
        s.push_str(&format!("config:     {p}\n"));
    }
    if let Some(d) = &r.detection {
        if let Some(obj) = d.config.as_object() {
            let items: Vec<String> = obj.iter().map(|(k, v)| format!("{k}={v}")).collect();
            s.push_str(&format!("shapes say: {}\n", items.join(" ")));
        }
    }
    s
}
