//! `phasekit inspect`: what a checkpoint is, without reading its tensor data.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::error::Result;
use crate::layout::Detection;
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
    /// A phasekit MoE checkpoint's routing and storage, read from its metadata.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moe: Option<MoeSummary>,
    /// For 14B Wan shapes: Wan2.2 A14B expert or Wan2.1-14B, and the evidence (`crate::pitfalls`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wan_release: Option<crate::pitfalls::WanRelease>,
    /// Problems that make the file read silently wrong (a scaled-fp8 weight without a scale).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// A PyTorch source's non-tensor values and what the reader decided.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pytorch: Option<crate::pytorch::Info>,
}

/// One expert of a MoE checkpoint as `inspect` shows it.
#[derive(Debug, Serialize)]
pub struct MoeExpertStat {
    pub name: String,
    pub kind: &'static str,
    pub sigma_lo: f64,
    pub sigma_hi: f64,
    pub timesteps: Vec<f64>,
    /// The base a LoRA expert applies to (0 = `base.`).
    pub base: Option<usize>,
    /// Parameters the expert resolves to (its own, shared and aliased tensors).
    pub params: usize,
    /// Bytes stored under its own `experts.<i>.` prefix.
    pub own_bytes: u64,
}

/// What `inspect` reports about a `phasekit.moe` checkpoint (docs/moe-format.md).
#[derive(Debug, Serialize)]
pub struct MoeSummary {
    pub format: String,
    pub family: Option<String>,
    pub variant: Option<String>,
    pub steps: u32,
    pub shift: f64,
    pub solver: String,
    pub guidance: f64,
    pub experts: Vec<MoeExpertStat>,
    pub shared_tensors: usize,
    pub shared_bytes: u64,
    pub aliases: usize,
    pub base_tensors: usize,
    pub base_bytes: u64,
    pub padding_tensors: usize,
    pub padding_bytes: u64,
    pub digest: String,
    /// Where the experts switch, as σ, timestep and step index (`moe::boundary`).
    pub boundaries: Vec<crate::moe::boundary::Boundary>,
}

/// The MoE summary of `ck`, or `None` when it is not a (readable) MoE checkpoint: `verify`
/// is the command that explains a broken one.
fn moe_summary(ck: &Checkpoint) -> Option<MoeSummary> {
    use crate::moe::format::{expert_prefix, MoeMeta, BASE, BASES, PADDING, SHARED};
    if !crate::moe::verify::is_moe(ck) {
        return None;
    }
    let meta = MoeMeta::from_metadata(&ck.metadata).ok()?;
    let stored =
        |pre: &str| -> (usize, u64) { ck.tensors.iter().filter(|t| t.name.starts_with(pre)).fold((0, 0), |(n, b), t| (n + 1, b + t.len)) };
    let (shared_tensors, shared_bytes) = stored(SHARED);
    let (b0, b0_bytes) = stored(BASE);
    let (bn, bn_bytes) = stored(BASES);
    let (padding_tensors, padding_bytes) = stored(PADDING);
    let experts = meta
        .routing
        .experts
        .iter()
        .enumerate()
        .map(|(i, e)| MoeExpertStat {
            name: e.name.clone(),
            kind: e.kind.as_str(),
            sigma_lo: e.sigma_lo,
            sigma_hi: e.sigma_hi,
            timesteps: e.timesteps.clone(),
            base: e.base,
            params: meta.expert_tensors(i).len(),
            own_bytes: stored(&expert_prefix(i)).1,
        })
        .collect();
    Some(MoeSummary {
        format: meta.tag().to_string(),
        family: meta.model.family.clone().or(meta.model.kind.clone()),
        variant: meta.model.variant.clone(),
        steps: meta.routing.steps,
        shift: meta.routing.shift,
        solver: meta.routing.solver.clone(),
        guidance: meta.routing.guidance,
        experts,
        shared_tensors,
        shared_bytes,
        aliases: meta.aliases.len(),
        base_tensors: b0 + bn,
        base_bytes: b0_bytes + bn_bytes,
        padding_tensors,
        padding_bytes,
        digest: meta.digest.clone(),
        boundaries: crate::moe::boundary::boundaries(&meta.routing),
    })
}

pub fn inspect_checkpoint(role: &str, ck: &Checkpoint) -> ModelReport {
    // With the release twin the files name (Wan2.1 T2V-14B / Wan2.2 T2V-A14B expert).
    let det = crate::pitfalls::detect(ck);
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
    let wan_release = det.as_ref().ok().and_then(|d| crate::pitfalls::wan_release(ck, Some(d)));
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
        wan_release,
        problems: crate::pitfalls::check_scaled_fp8(ck).err().map(|e| e.message().to_string()).into_iter().collect(),
        moe: moe_summary(ck),
        pytorch: ck.pytorch.clone(),
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

fn render_moe(m: &MoeSummary) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "moe:        {}, {} experts, {} steps, shift {}, {} solver, CFG {}\n",
        m.format,
        m.experts.len(),
        m.steps,
        m.shift,
        m.solver,
        m.guidance
    ));
    s.push_str("  #  name             kind  σ range          timesteps              params  own data\n");
    for (i, e) in m.experts.iter().enumerate() {
        let ts: Vec<String> = e.timesteps.iter().map(|t| if t.fract() == 0.0 { format!("{t:.0}") } else { format!("{t:.1}") }).collect();
        let kind = match e.base {
            Some(b) if b > 0 => format!("{} (base {b})", e.kind),
            _ => e.kind.to_string(),
        };
        s.push_str(&format!(
            "  {i:<2} {:<16} {kind:<5} [{:.3}, {:.3})  {:<22} {:>6}  {}\n",
            e.name,
            e.sigma_lo,
            e.sigma_hi,
            ts.join(", "),
            e.params,
            human(e.own_bytes)
        ));
    }
    s.push_str(&format!(
        "  shared: {} tensors ({}), {} aliases; base: {} tensors ({}); padding: {} tensors ({})\n",
        m.shared_tensors,
        human(m.shared_bytes),
        m.aliases,
        m.base_tensors,
        human(m.base_bytes),
        m.padding_tensors,
        human(m.padding_bytes)
    ));
    for b in &m.boundaries {
        s.push_str(&format!(
            "  switch {} → {}: σ {} = timestep {} = step index {} (σ ≥ {} stays on {})\n",
            b.high, b.low, b.sigma, b.timestep, b.step_index, b.sigma, b.high
        ));
    }
    s.push_str(&format!("digest:     {}\n", m.digest));
    s
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
        _ if r.moe.is_some() => {
            let m = r.moe.as_ref().expect("checked");
            let model = match (&m.family, &m.variant) {
                (Some(f), Some(v)) => format!("{f} — {v}"),
                (Some(f), None) => f.clone(),
                _ => "not recorded".into(),
            };
            s.push_str(&format!("family:     {model} (phasekit MoE checkpoint)\n"));
        }
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
    if let Some(w) = &r.wan_release {
        s.push_str(&format!("release:    {}\n", w.summary()));
    }
    for p in &r.problems {
        s.push_str(&format!("PROBLEM:    {p}\n"));
    }
    if let Some(p) = &r.pytorch {
        s.push_str(&crate::pytorch::render(p));
    }
    if let Some(t) = r.index_total_size {
        s.push_str(&format!("index total_size: {t}\n"));
    }
    if let Some(m) = &r.moe {
        s.push_str(&render_moe(m));
    }
    if !r.metadata.is_empty() {
        s.push_str("metadata:\n");
        let mut folded = 0;
        for (k, v) in &r.metadata {
            // A MoE file's own keys are summarised above (`--json` has them whole).
            if r.moe.is_some() && k.starts_with("phasekit.moe.") {
                folded += 1;
                continue;
            }
            let v = crate::error::clean(v);
            s.push_str(&format!("  {k}: {v}\n"));
        }
        if folded > 0 {
            s.push_str(&format!("  ({folded} phasekit.moe.* keys: summarised above; whole with --json)\n"));
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
