//! The memory plan of a run (DESIGN decision 10): bytes per part, per phase and training
//! resolution, from the recipe and the checkpoint headers alone — nothing is loaded.
//!
//! `train --plan` prints it; `train` makes it first and refuses a run whose peak does not fit
//! the device (exit 9) before any weight is read. The parts:
//! - **base weights**: each distinct teacher file once, every tensor in the recipe's `dtype`
//!   (shared by the teacher, generator and fake views);
//! - **adapters**: the generator's LoRA (values and gradients), the fakes' LoRA, and the frozen
//!   adapters of the finished phases' experts;
//! - **optimiser states**: AdamW's two moments of everything that trains;
//! - **full-parameter fake**: an f32 copy of each teacher expert the phase's fakes need, and its
//!   gradients (`fake = "full"`);
//! - **checkpointed activations**: with `recompute_blocks`, each block's input (the residual
//!   stream, in the recipe's `activations` dtype: the weights' dtype unless set) and its copy of
//!   the shared context (f32), for one forward pass with gradients; without it, every block's
//!   whole graph;
//! - **recompute of one block** (or **of one segment** with `recompute_segments`): the graph of
//!   one block rebuilt in the backward pass and the gradients made through it;
//! - **attention workspace**: the log-sum-exp the attention op keeps, and in the backward pass
//!   the three input gradients;
//! - **runtime**: the process itself, its kernels' buffers and the batch tensors.
//!
//! The per-token size of a block's recompute is measured (the constants below say how) and
//! checked against whole runs' peaks (`tests/train_plan.rs`: the heap's high-water mark on the
//! CPU, the counterpart of a CUDA pool's; docs/scale.md).

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::Serialize;

use super::recipe::{FakeKind, Recipe, ResolutionSpace, TransformerConfig};
use super::schedule::Schedule;
use super::transformer::data::RANDOM_TOKENS;
use super::transformer::teachers::checked_paths;
use crate::error::{Error, Result};
use crate::model::linear::{default_targets, glob};
use crate::model::weights::Weights;

/// One part of a plan entry.
#[derive(Debug, Clone, Serialize)]
pub struct Part {
    pub name: &'static str,
    pub bytes: u64,
    /// Where the number comes from.
    pub detail: String,
}

/// The plan of one phase at one training resolution.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub phase: usize,
    /// Latent frames, height, width.
    pub latent: [usize; 3],
    /// Tokens of the block's residual stream (image/video tokens; Qwen-Image adds the text).
    pub tokens: usize,
    pub text_tokens: usize,
    pub batch: usize,
    pub parts: Vec<Part>,
    /// Peak bytes on the device the run computes on (the host for a CPU run).
    pub device_bytes: u64,
    /// Peak bytes on the host besides the device (CUDA runs: the runtime; CPU runs: 0).
    pub host_bytes: u64,
}

/// A run's plan: one entry per phase and training resolution, and the device it was checked against.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub recipe: String,
    pub model: String,
    pub device: String,
    /// Bytes the device offers, and where that number comes from.
    pub capacity: Option<u64>,
    pub capacity_source: String,
    pub dtype: String,
    pub recompute_blocks: bool,
    pub recompute_segments: bool,
    /// Dtype of the residual stream and kept activations.
    pub activations: String,
    pub entries: Vec<Entry>,
    /// Index of the entry with the largest device peak.
    pub peak: usize,
    pub fits: bool,
}

/// Bytes of a dtype name of recipes (`f32`, `bf16`, `f16`).
fn dtype_bytes(name: &str) -> Result<u64> {
    match name {
        "f32" => Ok(4),
        "bf16" | "f16" => Ok(2),
        o => Err(Error::usage(format!("recipe: [transformer] dtype '{}' is not f32, bf16 or f16", crate::error::clean(o)))),
    }
}

/// What the plan needs to know of one teacher expert, from its headers.
struct Teacher {
    path: PathBuf,
    params: u64,
    /// `(in, out)` of every linear layer the LoRA targets match.
    lora_linears: Vec<(u64, u64)>,
}

/// The model's shape as the plan needs it.
struct Shape {
    family: String,
    blocks: u64,
    dim: u64,
    heads: u64,
    ffn: u64,
    /// Wan: `[pt, ph, pw]`; Qwen: `[1, p, p]`.
    patch: [usize; 3],
    out_channels: u64,
}

fn teacher(path: &Path, tc: &TransformerConfig) -> Result<(Teacher, Shape)> {
    let w = Weights::open(path, candle_core::DType::F32, &Device::Cpu)?;
    let targets = if tc.lora_targets.is_empty() { default_targets() } else { tc.lora_targets.clone() };
    let mut params = 0u64;
    let mut lora_linears = Vec::new();
    for (name, shape) in w.shapes() {
        params += shape.iter().product::<u64>();
        if let (Some(module), [out, inp]) = (name.strip_suffix(".weight"), shape) {
            if targets.iter().any(|t| glob(t, module)) {
                lora_linears.push((*inp, *out));
            }
        }
    }
    let get = |k: &str| w.cfg_usize(k).map(|v| v as u64);
    let shape = match w.family.as_str() {
        "wan22" => {
            let patch = match w.cfg("patch_size").and_then(|v| v.as_array()) {
                Some(a) if a.len() == 3 => [0, 1, 2].map(|i| a[i].as_u64().unwrap_or(1) as usize),
                _ => [1, 2, 2],
            };
            let heads = get("num_attention_heads")?;
            Shape {
                family: w.family.clone(),
                blocks: get("num_layers")?,
                dim: heads * get("attention_head_dim")?,
                heads,
                ffn: get("ffn_dim")?,
                patch,
                out_channels: get("out_channels").or_else(|_| get("in_channels"))?,
            }
        }
        "qwen_image" => {
            let heads = get("num_attention_heads")?;
            let dim = heads * get("attention_head_dim")?;
            let p = get("patch_size").unwrap_or(2) as usize;
            Shape {
                family: w.family.clone(),
                blocks: get("num_layers")?,
                dim,
                heads,
                ffn: 4 * dim,
                patch: [1, p, p],
                out_channels: get("out_channels").unwrap_or(16),
            }
        }
        f => return Err(Error::unsupported(format!("no memory plan for model family {f}"))),
    };
    Ok((Teacher { path: path.to_path_buf(), params, lora_linears }, shape))
}

/// Text tokens of the recipe's embeddings (`random:N` has [`RANDOM_TOKENS`]; a file's
/// `prompt_embeds [N, L, C]` has `L`), from the file's header.
fn text_tokens(spec: &str) -> Result<u64> {
    if spec.starts_with("random:") {
        return Ok(RANDOM_TOKENS as u64);
    }
    let ck = crate::store::Checkpoint::open(Path::new(spec))?;
    let t = ck
        .tensors
        .iter()
        .find(|t| t.name == "prompt_embeds")
        .ok_or_else(|| Error::inconsistent(spec, "has no tensor 'prompt_embeds' [N, L, C]"))?;
    Ok(t.shape.get(1).copied().unwrap_or(1))
}

/// The latent size of a training resolution.
fn latent_of(r: &Recipe, tc: &TransformerConfig, res: [usize; 3]) -> Result<[usize; 3]> {
    Ok(match tc.resolution_space {
        ResolutionSpace::Latent => res,
        ResolutionSpace::Pixel => {
            let s = tc.vae_stride.unwrap_or(match r.model.as_str() {
                "qwen-image" => [1, 8, 8],
                "wan2.2-ti2v-5b" => [4, 16, 16],
                _ => [4, 8, 8],
            });
            if res[0] == 0 || (res[0] - 1) % s[0] != 0 || res[1] % s[1] != 0 || res[2] % s[2] != 0 {
                return Err(Error::usage(format!("recipe: resolution {res:?} does not divide by the VAE stride {s:?}")));
            }
            [(res[0] - 1) / s[0] + 1, res[1] / s[1], res[2] / s[2]]
        }
    })
}

/// Values per token, in the activations' dtype, that one block's recompute holds at its peak in
/// the backward pass: its graph (every input of every op stays alive until the backward pass
/// ends; each frozen linear layer is one node, [`crate::ops::graft`]) and the gradients candle's
/// backward pass makes and accumulates (a zeroed tensor, the gradient and their sum per input at
/// once), in units of the width (`…_DIM`) and of the FFN's hidden width (`…_FFN`). Measured on
/// the CPU as the heap's high-water mark of one block's forward and backward pass (width 1024,
/// 8 heads of 128, FFN 3 × 1024, LoRA on every linear layer, 4096 tokens, bf16 and f32
/// activations alike in these units; `PHASEKIT_CHUNK_MIB=4` so that the linear layers' f32
/// scratch is as small a share of a row as at full width), the attention workspace taken out:
/// 46 units at FFN 3 × width, of which 4 per FFN unit. `…_SEG`: the same with
/// `recompute_segments` (one segment's graph at a time): 39 units (Wan2.2's three segments;
/// Qwen-Image's two, the MLPs with their 4 × width hidden layers together, 5 more, from the
/// whole runs of `tests/train_plan.rs`).
const WAN_BLOCK_PER_TOKEN_DIM: u64 = 31;
const WAN_BLOCK_PER_TOKEN_FFN: u64 = 4;
const WAN_SEG_PER_TOKEN_DIM: u64 = 24;
const WAN_SEG_PER_TOKEN_FFN: u64 = 4;
const QWEN_BLOCK_PER_TOKEN_DIM: u64 = 31;
const QWEN_BLOCK_PER_TOKEN_FFN: u64 = 4;
const QWEN_SEG_PER_TOKEN_DIM: u64 = 29;
const QWEN_SEG_PER_TOKEN_FFN: u64 = 4;
/// Of the above, the block's graph alone (what each block keeps when blocks are not
/// recomputed): 26 units at FFN 3 × width, 2 per FFN unit.
const BLOCK_GRAPH_PER_TOKEN_DIM: u64 = 20;
const BLOCK_GRAPH_PER_TOKEN_FFN: u64 = 2;
/// f32 values per token (in units of the width) of the graph outside the blocks (patch and
/// time embeddings, the output norm and projection, the step's update) that each further step
/// with a gradient keeps (`backprop = "all"`; one step's is in the block constants above).
/// Measured on the CPU: a 4-step full-backprop run of a width-256 Wan-shaped teacher at 1024
/// tokens peaks 9 MiB above the plan of its block inputs alone (`tests/train_plan.rs`; each
/// linear layer outside the blocks is one graph node too).
const PASS_PER_TOKEN_DIM: u64 = 3;
/// What the process allocates besides tensors, and kernels' scratch buffers (the intercept of
/// the same measurements of the heap, weights and adapters taken out).
pub const RUNTIME_BYTES: u64 = 6 << 20;

fn gib(b: u64) -> String {
    crate::progress::human_bytes(b)
}

/// Device capacity: `given`, or what the device reports (CUDA: total memory; CPU: the smaller
/// of MemAvailable and the cgroup limit).
pub fn capacity(device: &Device, given: Option<u64>) -> (Option<u64>, String) {
    if let Some(g) = given {
        return (Some(g), "--device-memory".into());
    }
    match device {
        Device::Cpu if crate::alloc::limit().is_some() => (crate::alloc::limit(), "PHASEKIT_HOST_MEMORY_LIMIT".into()),
        Device::Cpu => {
            let avail = crate::device::free_bytes(device);
            let cg = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok().and_then(|s| s.trim().parse::<u64>().ok());
            match (avail, cg) {
                (Some(a), Some(c)) if c < a => (Some(c), "cgroup memory.max".into()),
                (Some(a), _) => (Some(a), "MemAvailable".into()),
                (None, c) => (c, "cgroup memory.max".into()),
            }
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => match d.cuda_stream().context().mem_get_info() {
            Ok((free, total)) => (Some(total as u64), format!("device total (free now {})", gib(free as u64))),
            Err(e) => (None, format!("unknown ({e:?})")),
        },
        _ => (None, "unknown".into()),
    }
}

/// The plan of a transformer recipe on `device` (`capacity`: the device's bytes, when known).
pub fn plan(r: &Recipe, device: &Device, capacity: (Option<u64>, String)) -> Result<Plan> {
    let tc = r.transformer.clone().ok_or_else(|| Error::usage(format!("recipe: model '{}' needs a [transformer] section", r.model)))?;
    let sched: Schedule = r.schedule.build()?;
    let sched_backprop_all = r.schedule.backprop == super::recipe::Backprop::All;
    let wbytes = dtype_bytes(&tc.dtype)?;
    let act = super::transformer::net::activation_dtype(&tc)?;
    let abytes = act.size_in_bytes() as u64;
    let act_name = format!("{act:?}").to_lowercase();
    // Segments are recomputed only inside a recomputed block.
    let seg = tc.recompute_segments && tc.recompute_blocks;
    let paths = checked_paths(r, &tc)?;
    let mut teachers: Vec<(Teacher, Shape)> = Vec::new();
    for p in &paths {
        teachers.push(teacher(p, &tc)?);
    }
    let shape = &teachers[0].1;
    let distinct: Vec<usize> = (0..paths.len()).filter(|&i| !paths[..i].contains(&paths[i])).collect();
    let text = text_tokens(&tc.embeddings)?;
    let b = r.train.batch as u64;
    let (d, f, h, l) = (shape.dim, shape.ffn, shape.heads, text);
    let f32b = 4u64;
    let lora_params = |t: &Teacher, rank: usize| -> u64 { t.lora_linears.iter().map(|(i, o)| rank as u64 * (i + o)).sum() };
    let mut entries = Vec::new();
    for p in 0..sched.phases.len() {
        let used = super::transformer::routing::fakes_used(r, &tc, &sched, p, paths.len());
        let gen_base = super::transformer::routing::expert_of(sched.sigmas[sched.phases[p].start], tc.expert_boundary);
        for res in &tc.resolutions {
            let latent = latent_of(r, &tc, *res)?;
            let [pt, ph, pw] = shape.patch;
            let img_tokens = (latent[0] / pt.max(1)) as u64 * (latent[1] / ph.max(1)) as u64 * (latent[2] / pw.max(1)) as u64;
            let qwen = shape.family == "qwen_image";
            // The residual stream of a block: Wan the video tokens; Qwen-Image text + image.
            let s = if qwen { img_tokens + l } else { img_tokens };
            let mut parts = Vec::new();
            for &i in &distinct {
                let t = &teachers[i].0;
                parts.push(Part {
                    name: "base weights",
                    bytes: t.params * wbytes,
                    detail: format!("{} parameters in {} ({})", t.params, tc.dtype, t.path.display()),
                });
            }
            let gen_lora = lora_params(&teachers[gen_base].0, tc.lora_rank);
            let done_lora: u64 = (0..p)
                .map(|k| {
                    let e = super::transformer::routing::expert_of(sched.sigmas[sched.phases[k].start], tc.expert_boundary);
                    lora_params(&teachers[e].0, tc.lora_rank)
                })
                .sum();
            let (mut fake_lora, mut fake_full) = (0u64, 0u64);
            for (e, u) in used.iter().enumerate() {
                if *u {
                    match tc.fake {
                        FakeKind::Lora => fake_lora += lora_params(&teachers[e].0, tc.fake_lora_rank),
                        FakeKind::Full => fake_full += teachers[e].0.params,
                    }
                }
            }
            parts.push(Part {
                name: "adapters",
                bytes: (gen_lora + fake_lora + gen_lora.max(fake_lora) + done_lora) * f32b,
                detail: format!(
                    "generator LoRA {gen_lora} and fake LoRA {fake_lora} parameters, the gradients of the larger (one network \
                     updates at a time), {done_lora} of finished experts, f32"
                ),
            });
            parts.push(Part {
                name: "optimiser states",
                bytes: 2 * (gen_lora + fake_lora + fake_full) * f32b,
                detail: "AdamW first and second moments, f32".into(),
            });
            if fake_full > 0 {
                parts.push(Part {
                    name: "full-parameter fake",
                    bytes: 2 * fake_full * f32b,
                    detail: format!("{fake_full} parameters in f32 (values + gradients)"),
                });
            }
            let (kd, kf) = match (qwen, seg) {
                (false, false) => (WAN_BLOCK_PER_TOKEN_DIM, WAN_BLOCK_PER_TOKEN_FFN),
                (false, true) => (WAN_SEG_PER_TOKEN_DIM, WAN_SEG_PER_TOKEN_FFN),
                (true, false) => (QWEN_BLOCK_PER_TOKEN_DIM, QWEN_BLOCK_PER_TOKEN_FFN),
                (true, true) => (QWEN_SEG_PER_TOKEN_DIM, QWEN_SEG_PER_TOKEN_FFN),
            };
            let per_token = kd * d + kf * f;
            let graph_per_token = BLOCK_GRAPH_PER_TOKEN_DIM * d + BLOCK_GRAPH_PER_TOKEN_FFN * f;
            // Wan's blocks also hold the text of the cross-attention (the context, f32).
            let ctx = if qwen { d } else { l * d + 7 * d };
            let text = if qwen { 0 } else { 16 * l * d * f32b };
            let block_peak = b * (s * per_token * abytes + text);
            let block_graph = b * (s * graph_per_token * abytes + text);
            // Vanilla few-step DMD (`backprop = "all"`) keeps the graph of every step of the
            // phase for the generator's backward pass; otherwise one step carries the gradient.
            let passes = if sched_backprop_all { (sched.phases[p].end - sched.phases[p].start) as u64 } else { 1 };
            let times = if passes > 1 { format!("{passes} steps × ") } else { String::new() };
            if tc.recompute_blocks {
                parts.push(Part {
                    name: "checkpointed activations",
                    bytes: passes * shape.blocks * b * (s * d * abytes + ctx * f32b) + (passes - 1) * b * s * PASS_PER_TOKEN_DIM * d * f32b,
                    detail: format!(
                        "{times}{} blocks × batch {b} × ({s} tokens × {d} {act_name} + context {ctx} f32){}",
                        shape.blocks,
                        if passes > 1 {
                            format!(", and each further step's graph outside the blocks ({PASS_PER_TOKEN_DIM} × {d} f32 per token)")
                        } else {
                            String::new()
                        }
                    ),
                });
                parts.push(Part {
                    name: if seg { "recompute of one segment" } else { "recompute of one block" },
                    bytes: block_peak,
                    detail: format!("batch {b} × {s} tokens × {per_token} {act_name} values per token (graph and gradients)"),
                });
            } else {
                parts.push(Part {
                    name: "activations (no recompute)",
                    bytes: passes * shape.blocks * block_graph + block_peak.saturating_sub(block_graph),
                    detail: format!(
                        "{times}{} blocks' graphs: batch {b} × {s} tokens × {graph_per_token} {act_name} values per token, and one \
                         block's gradients",
                        shape.blocks
                    ),
                });
            }
            // Attention: log-sum-exp (f32) and in the backward pass the gradients of q, k, v.
            let hd = d / h.max(1);
            parts.push(Part {
                name: "attention workspace",
                bytes: b * h * s * (3 * hd * abytes + f32b),
                detail: format!("batch {b} × {h} heads × {s} tokens × (3 × {hd} {act_name} + 1 f32)"),
            });
            let latent_elems = latent.iter().map(|&x| x as u64).product::<u64>() * shape.out_channels;
            parts.push(Part {
                name: "runtime",
                bytes: RUNTIME_BYTES + 16 * b * latent_elems * f32b,
                detail: "the process, kernels' scratch, batch latents and noise".into(),
            });
            let total: u64 = parts.iter().map(|p| p.bytes).sum();
            let (device_bytes, host_bytes) = match device {
                Device::Cpu => (total, 0),
                _ => (total - RUNTIME_BYTES, RUNTIME_BYTES),
            };
            entries.push(Entry {
                phase: p,
                latent,
                tokens: s as usize,
                text_tokens: l as usize,
                batch: b as usize,
                parts,
                device_bytes,
                host_bytes,
            });
        }
    }
    let peak = (0..entries.len()).max_by_key(|&i| entries[i].device_bytes).unwrap_or(0);
    let fits = capacity.0.is_none_or(|c| entries.get(peak).is_none_or(|e| e.device_bytes <= c));
    Ok(Plan {
        recipe: r.name.clone(),
        model: r.model.clone(),
        device: crate::device::name(device),
        capacity: capacity.0,
        capacity_source: capacity.1,
        dtype: tc.dtype.clone(),
        recompute_blocks: tc.recompute_blocks,
        recompute_segments: seg,
        activations: act_name,
        entries,
        peak,
        fits,
    })
}

impl Plan {
    /// Why the run does not fit and what would: one line (for the exit-9 error).
    pub fn refusal(&self) -> Option<String> {
        if self.fits {
            return None;
        }
        let e = &self.entries[self.peak];
        let cap = self.capacity.unwrap_or(0);
        let big = e.parts.iter().max_by_key(|p| p.bytes)?;
        let mut advice = Vec::new();
        // Parts that grow with the tokens: what a smaller resolution saves.
        let per_token: u64 = e
            .parts
            .iter()
            .filter(|p| {
                matches!(
                    p.name,
                    "checkpointed activations"
                        | "recompute of one block"
                        | "recompute of one segment"
                        | "attention workspace"
                        | "activations (no recompute)"
                )
            })
            .map(|p| p.bytes)
            .sum::<u64>()
            / e.tokens.max(1) as u64;
        let fixed = e.device_bytes - per_token * e.tokens as u64;
        if fixed < cap && per_token > 0 {
            advice.push(format!("at most about {} tokens fit (this resolution has {})", (cap - fixed) / per_token, e.tokens));
        }
        if e.batch > 1 {
            advice.push("a smaller batch".into());
        }
        if e.parts.iter().any(|p| p.name == "full-parameter fake") {
            advice.push("fake = \"lora\"".into());
        }
        if !self.recompute_blocks {
            advice.push("recompute_blocks = true".into());
        } else if !self.recompute_segments {
            advice.push("recompute_segments = true".into());
        }
        if self.activations == "f32" && self.dtype != "f32" {
            advice.push(format!("activations = \"{}\"", self.dtype));
        }
        if self.dtype == "f32" {
            advice.push("dtype = \"bf16\"".into());
        }
        Some(format!(
            "phase {} at latent {:?} ({} tokens, batch {}) needs {} on {} but it has {} ({}); the largest part is {} ({}); what would fit: {}",
            e.phase + 1,
            e.latent,
            e.tokens,
            e.batch,
            gib(e.device_bytes),
            self.device,
            gib(cap),
            self.capacity_source,
            big.name,
            gib(big.bytes),
            if advice.is_empty() { "a device with more memory".to_string() } else { advice.join(", or ") }
        ))
    }

    /// The plan as a table (text output of `train --plan`).
    pub fn render(&self) -> String {
        let mut s = format!(
            "memory plan of {} ({}, base weights {}, activations {}, recompute_blocks {}, recompute_segments {}) on {}: capacity {} ({})\n",
            self.recipe,
            self.model,
            self.dtype,
            self.activations,
            self.recompute_blocks,
            self.recompute_segments,
            self.device,
            self.capacity.map(gib).unwrap_or_else(|| "unknown".into()),
            self.capacity_source
        );
        for (i, e) in self.entries.iter().enumerate() {
            s.push_str(&format!(
                "\nphase {} · latent {:?} · {} tokens · batch {}: device {}{}{}\n",
                e.phase + 1,
                e.latent,
                e.tokens,
                e.batch,
                gib(e.device_bytes),
                if e.host_bytes > 0 { format!(", host {}", gib(e.host_bytes)) } else { String::new() },
                if i == self.peak { "  ← peak" } else { "" }
            ));
            for p in &e.parts {
                s.push_str(&format!("  {:<28} {:>10}  {}\n", p.name, gib(p.bytes), p.detail));
            }
        }
        s.push_str(&format!("\n{}\n", if self.fits { "fits" } else { "does NOT fit" }));
        s
    }
}
