//! Detection (fixtures and full-size key sets built from research/formats.md §3.3/§4.2),
//! unknown families, disagreements, and rule files: user families and errors with file and line.

use phasekit::layout::{Detection, Layout, Registry};
use phasekit::Kind;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

mod common;

use common::keys::{config, header, wan_original};

fn fixture(rel: &str) -> PathBuf {
    common::fixture(rel)
}

fn detect(t: &[(String, Vec<u64>)], cfg: Option<&Value>) -> phasekit::Result<Detection> {
    let refs: Vec<(&str, &[u64])> = t.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect();
    Registry::builtin().detect(&refs, cfg)
}

fn with_prefix(t: &[(String, Vec<u64>)], p: &str) -> Vec<(String, Vec<u64>)> {
    t.iter().map(|(n, s)| (format!("{p}{n}"), s.clone())).collect()
}

fn params(t: &[(String, Vec<u64>)]) -> u64 {
    t.iter().map(|(_, s)| s.iter().product::<u64>()).sum()
}

/// Qwen-Image in diffusers names, from research/formats.md §3.3.
fn qwen_diffusers(dim: u64, head_dim: u64, in_ch: u64, out_ch: u64, joint: u64, layers: u64) -> Vec<(String, Vec<u64>)> {
    let mut t: Vec<(String, Vec<u64>)> = vec![
        ("img_in.weight".into(), vec![dim, in_ch]),
        ("img_in.bias".into(), vec![dim]),
        ("txt_in.weight".into(), vec![dim, joint]),
        ("txt_in.bias".into(), vec![dim]),
        ("txt_norm.weight".into(), vec![joint]),
        ("time_text_embed.timestep_embedder.linear_1.weight".into(), vec![dim, 256]),
        ("time_text_embed.timestep_embedder.linear_1.bias".into(), vec![dim]),
        ("time_text_embed.timestep_embedder.linear_2.weight".into(), vec![dim, dim]),
        ("time_text_embed.timestep_embedder.linear_2.bias".into(), vec![dim]),
        ("norm_out.linear.weight".into(), vec![2 * dim, dim]),
        ("norm_out.linear.bias".into(), vec![2 * dim]),
        ("proj_out.weight".into(), vec![out_ch * 4, dim]),
        ("proj_out.bias".into(), vec![out_ch * 4]),
    ];
    for n in 0..layers {
        let p = format!("transformer_blocks.{n}.");
        for m in ["img_mod.1", "txt_mod.1"] {
            t.push((format!("{p}{m}.weight"), vec![6 * dim, dim]));
            t.push((format!("{p}{m}.bias"), vec![6 * dim]));
        }
        for m in ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"] {
            t.push((format!("{p}attn.{m}.weight"), vec![dim, dim]));
            t.push((format!("{p}attn.{m}.bias"), vec![dim]));
        }
        for m in ["norm_q", "norm_k", "norm_added_q", "norm_added_k"] {
            t.push((format!("{p}attn.{m}.weight"), vec![head_dim]));
        }
        for m in ["img_mlp", "txt_mlp"] {
            t.push((format!("{p}{m}.net.0.proj.weight"), vec![4 * dim, dim]));
            t.push((format!("{p}{m}.net.0.proj.bias"), vec![4 * dim]));
            t.push((format!("{p}{m}.net.2.weight"), vec![dim, 4 * dim]));
            t.push((format!("{p}{m}.net.2.bias"), vec![dim]));
        }
    }
    t
}

fn to_diffusers(t: &[(String, Vec<u64>)]) -> Vec<(String, Vec<u64>)> {
    let wan = Registry::builtin().family("wan22").unwrap();
    t.iter().map(|(n, s)| (wan.rename(Layout::Original, Layout::Diffusers, n).unwrap(), s.clone())).collect()
}

fn assert_clean(d: &Detection) {
    assert!(d.missing.is_empty(), "missing: {:?}", d.missing);
    assert!(d.unmatched.is_empty(), "unmatched: {:?}", d.unmatched);
}

#[test]
fn fixtures() {
    let orig = header(&fixture("wan22_t2v_tiny/original/diffusion_pytorch_model.safetensors"));
    let ocfg = config("wan22_t2v_tiny/original/config.json");
    let d = detect(&orig, Some(&ocfg)).unwrap();
    assert_eq!((d.family.as_str(), d.layout, d.prefix.as_str()), ("wan22", Layout::Original, ""));
    assert_eq!(d.variant, "custom (dim 32, 2 layers)");
    assert_eq!(d.num_layers, 2);
    assert_eq!(d.config, ocfg);
    assert_clean(&d);

    // Without config.json the head count is unknown, and said so.
    let d = detect(&orig, None).unwrap();
    assert!(d.config["num_heads"].is_null());
    assert!(d.notes.iter().any(|n| n.contains("num_heads is unknown")), "{:?}", d.notes);
    assert_eq!(d.config["dim"], 32);
    assert_eq!(d.config["out_dim"], 4);
    assert_eq!(d.config["text_dim"], 24);
    assert_eq!(d.config["freq_dim"], 32);
    assert_eq!(d.config["ffn_dim"], 48);

    let diff = header(&fixture("wan22_t2v_tiny/diffusers/diffusion_pytorch_model.safetensors"));
    let dcfg = config("wan22_t2v_tiny/diffusers/config.json");
    let d = detect(&diff, Some(&dcfg)).unwrap();
    assert_eq!((d.family.as_str(), d.layout, d.variant.as_str()), ("wan22", Layout::Diffusers, "custom (dim 32, 2 layers)"));
    assert_eq!(d.config, dcfg, "a diffusers config.json is kept, with derived fields checked");
    assert_clean(&d);

    let q = header(&fixture("qwen_image_tiny/diffusers/diffusion_pytorch_model.safetensors"));
    let qcfg = config("qwen_image_tiny/diffusers/config.json");
    let d = detect(&q, Some(&qcfg)).unwrap();
    assert_eq!((d.family.as_str(), d.layout, d.variant.as_str()), ("qwen_image", Layout::Diffusers, "custom (dim 32, 2 layers)"));
    assert_eq!(d.config, qcfg);
    assert_clean(&d);
    // Heads come from shapes for Qwen-Image (inner width / norm_q length).
    let d = detect(&q, None).unwrap();
    assert_eq!(d.config["num_attention_heads"], 2);
    assert_eq!(d.config["attention_head_dim"], 16);
    assert_eq!(d.config["in_channels"], 16);
    assert_eq!(d.config["out_channels"], 4);
    assert_eq!(d.config["joint_attention_dim"], 24);

    // Prefixes: ComfyUI's tells the comfy layout; others are reported and stripped.
    let d = detect(&with_prefix(&q, "model.diffusion_model."), None).unwrap();
    assert_eq!((d.layout, d.prefix.as_str()), (Layout::Comfy, "model.diffusion_model."));
    let d = detect(&with_prefix(&orig, "model.diffusion_model."), None).unwrap();
    assert_eq!((d.layout, d.prefix.as_str()), (Layout::Comfy, "model.diffusion_model."));
    let d = detect(&with_prefix(&orig, "net."), None).unwrap();
    assert_eq!((d.layout, d.prefix.as_str()), (Layout::Comfy, "net."));
    let d = detect(&with_prefix(&diff, "model."), None).unwrap();
    assert_eq!((d.layout, d.prefix.as_str()), (Layout::Diffusers, "model."));
    let d = detect(&with_prefix(&diff, "diffusion_model."), None).unwrap();
    assert_eq!((d.layout, d.prefix.as_str()), (Layout::Diffusers, "diffusion_model."));
}

#[test]
fn full_size_wan_variants() {
    let t2v = wan_original(5120, 16, 16, 13824, 40);
    assert_eq!(t2v.len(), 1095);
    assert_eq!(params(&t2v), 14_288_491_584);
    let d = detect(&t2v, None).unwrap();
    assert_eq!((d.family.as_str(), d.variant.as_str(), d.layout), ("wan22", "T2V-A14B expert", Layout::Original));
    assert_eq!(d.params, 14_288_491_584);
    assert_eq!(d.num_layers, 40);
    assert_clean(&d);
    // research/formats.md §4.1, without _diffusers_version.
    assert_eq!(
        d.config,
        json!({"_class_name":"WanModel","dim":5120,"eps":1e-06,"ffn_dim":13824,"freq_dim":256,"in_dim":16,"model_type":"t2v","num_heads":40,"num_layers":40,"out_dim":16,"text_dim":4096,"text_len":512})
    );
    let d = detect(&to_diffusers(&t2v), None).unwrap();
    assert_eq!((d.variant.as_str(), d.layout), ("T2V-A14B expert", Layout::Diffusers));
    assert_eq!(d.config["attention_head_dim"], 128);
    assert_eq!(d.config["num_attention_heads"], 40);
    assert_eq!(d.config["patch_size"], json!([1, 2, 2]));
    assert_clean(&d);
    let d = detect(&with_prefix(&t2v, "model.diffusion_model."), None).unwrap();
    assert_eq!((d.variant.as_str(), d.layout), ("T2V-A14B expert", Layout::Comfy));

    let i2v = wan_original(5120, 36, 16, 13824, 40);
    assert_eq!(i2v.len(), 1095);
    let d = detect(&i2v, None).unwrap();
    assert_eq!((d.variant.as_str(), d.params), ("I2V-A14B expert", 14_288_901_184));
    assert_eq!(d.config["model_type"], "i2v");
    assert_clean(&d);
    assert_eq!(detect(&to_diffusers(&i2v), None).unwrap().variant, "I2V-A14B expert");

    let ti2v = wan_original(3072, 48, 48, 14336, 30);
    let d = detect(&ti2v, None).unwrap();
    assert_eq!((d.variant.as_str(), d.num_layers), ("TI2V-5B", 30));
    assert_eq!(d.config["num_heads"], 24);
    assert_eq!(d.config["model_type"], "ti2v");
    assert_eq!(d.config["out_dim"], 48);
    assert_clean(&d);
    let d = detect(&to_diffusers(&ti2v), None).unwrap();
    assert_eq!((d.variant.as_str(), d.layout), ("TI2V-5B", Layout::Diffusers));
    assert_eq!(d.config["attention_head_dim"], 128);
}

#[test]
fn full_size_qwen_image() {
    let q = qwen_diffusers(3072, 128, 64, 16, 3584, 60);
    assert_eq!(q.len(), 1933);
    assert_eq!(params(&q), 20_430_401_088);
    let d = detect(&q, None).unwrap();
    assert_eq!((d.family.as_str(), d.variant.as_str(), d.layout), ("qwen_image", "Qwen-Image", Layout::Diffusers));
    assert_eq!(d.params, 20_430_401_088);
    assert_clean(&d);
    // research/formats.md §3.2 minus the fields diffusers 0.42 no longer writes.
    assert_eq!(
        d.config,
        json!({"_class_name":"QwenImageTransformer2DModel","attention_head_dim":128,"axes_dims_rope":[16,56,56],"guidance_embeds":false,"in_channels":64,"joint_attention_dim":3584,"num_attention_heads":24,"num_layers":60,"out_channels":16,"patch_size":2,"use_additional_t_cond":false,"use_layer3d_rope":false,"zero_cond_t":false})
    );
    // The Hub config.json (0.34) has pooled_projection_dim; it is kept.
    let hub = json!({"_class_name":"QwenImageTransformer2DModel","_diffusers_version":"0.34.0.dev0","attention_head_dim":128,"axes_dims_rope":[16,56,56],"guidance_embeds":false,"in_channels":64,"joint_attention_dim":3584,"num_attention_heads":24,"num_layers":60,"out_channels":16,"patch_size":2,"pooled_projection_dim":768});
    let d = detect(&q, Some(&hub)).unwrap();
    assert_eq!(d.config["pooled_projection_dim"], 768);
    assert_eq!(d.config["_diffusers_version"], "0.34.0.dev0");
    let d = detect(&with_prefix(&q, "model.diffusion_model."), None).unwrap();
    assert_eq!((d.variant.as_str(), d.layout, d.prefix.as_str()), ("Qwen-Image", Layout::Comfy, "model.diffusion_model."));
}

#[test]
fn comfyui_gguf_key_sets() {
    // ComfyUI-GGUF stores the Wan original names without prefix (shapes given in torch order);
    // an fp8 scaled file adds scale tensors and a marker, which are reported as unmatched.
    let mut t = wan_original(5120, 16, 16, 13824, 40);
    let d = detect(&t, None).unwrap();
    assert_eq!((d.family.as_str(), d.layout), ("wan22", Layout::Original));
    t.push(("scaled_fp8".into(), vec![0]));
    t.push(("blocks.0.self_attn.q.scale_weight".into(), vec![]));
    let d = detect(&t, None).unwrap();
    assert_eq!(d.variant, "T2V-A14B expert");
    assert_eq!(d.unmatched, ["blocks.0.self_attn.q.scale_weight", "scaled_fp8"]);
    // Without the 5-D patch embedding (kept aside before fix_5d_tensors.py) the family is still
    // found; what it would have told is reported.
    let t: Vec<_> = wan_original(5120, 16, 16, 13824, 40).into_iter().filter(|(n, _)| !n.starts_with("patch_embedding")).collect();
    let d = detect(&t, None).unwrap();
    assert_eq!(d.family, "wan22");
    assert_eq!(d.missing, ["patch_embedding.bias", "patch_embedding.weight"]);
    assert!(d.config["in_dim"].is_null());
    assert!(d.notes.iter().any(|n| n.contains("in_dim is unknown: the tensors it is read from are missing")), "{:?}", d.notes);
}

#[test]
fn missing_blocks_and_wan21_image_keys() {
    let mut t = wan_original(64, 16, 16, 128, 3);
    t.retain(|(n, _)| !n.starts_with("blocks.1.ffn"));
    let d = detect(&t, None).unwrap();
    assert_eq!(d.num_layers, 3);
    assert_eq!(d.missing.len(), 4);
    assert!(d.missing.iter().all(|m| m.starts_with("blocks.1.ffn.")));
    // Wan2.1 I2V: image embedder and image k/v in cross-attention.
    let mut t = wan_original(5120, 36, 16, 13824, 40);
    t.extend([
        ("img_emb.proj.0.weight".to_string(), vec![1280]),
        ("img_emb.proj.0.bias".to_string(), vec![1280]),
        ("img_emb.proj.1.weight".to_string(), vec![1280, 1280]),
        ("img_emb.proj.1.bias".to_string(), vec![1280]),
        ("img_emb.proj.3.weight".to_string(), vec![5120, 1280]),
        ("img_emb.proj.3.bias".to_string(), vec![5120]),
        ("img_emb.proj.4.weight".to_string(), vec![5120]),
        ("img_emb.proj.4.bias".to_string(), vec![5120]),
    ]);
    for n in 0..40 {
        t.push((format!("blocks.{n}.cross_attn.k_img.weight"), vec![5120, 5120]));
        t.push((format!("blocks.{n}.cross_attn.k_img.bias"), vec![5120]));
        t.push((format!("blocks.{n}.cross_attn.v_img.weight"), vec![5120, 5120]));
        t.push((format!("blocks.{n}.cross_attn.v_img.bias"), vec![5120]));
        t.push((format!("blocks.{n}.cross_attn.norm_k_img.weight"), vec![5120]));
    }
    let d = detect(&to_diffusers(&t), None).unwrap();
    assert_eq!(d.variant, "Wan2.1 I2V-14B");
    assert_eq!(d.config["image_dim"], 1280);
    assert_eq!(d.config["added_kv_proj_dim"], 5120);
    assert_clean(&d);
}

#[test]
fn unknown_family_is_unsupported_with_a_hint() {
    let llama = vec![("model.layers.0.self_attn.q_proj.weight".to_string(), vec![4096, 4096])];
    let e = detect(&llama, None).unwrap_err();
    assert_eq!(e.kind(), Kind::Unsupported);
    assert!(e.message().contains("unknown model family"), "{}", e.message());
    assert!(e.message().contains("no family's tensor names were found"), "{}", e.message());

    // Most of Wan, but a marker missing: the hint names wan22 and the missing marker.
    let t: Vec<_> = wan_original(64, 16, 16, 128, 2).into_iter().filter(|(n, _)| n != "head.modulation").collect();
    let e = detect(&t, None).unwrap_err();
    assert_eq!(e.kind(), Kind::Unsupported);
    assert!(e.message().contains("closest is wan22 with original names"), "{}", e.message());
    assert!(e.message().contains("`head.modulation`"), "{}", e.message());

    // A full ComfyUI checkpoint: the diffusion model under model.diffusion_model., the VAE beside it.
    let mut t = with_prefix(&wan_original(64, 16, 16, 128, 1), "model.diffusion_model.");
    t.push(("first_stage_model.decoder.conv_in.weight".to_string(), vec![8, 4, 3, 3]));
    let e = detect(&t, None).unwrap_err();
    assert_eq!(e.kind(), Kind::Unsupported);
    assert!(e.message().contains("under `model.diffusion_model.` look like wan22"), "{}", e.message());

    assert_eq!(detect(&[], None).unwrap_err().kind(), Kind::Unsupported);
}

#[test]
fn disagreements_are_inconsistent() {
    let orig = header(&fixture("wan22_t2v_tiny/original/diffusion_pytorch_model.safetensors"));
    let mut cfg = config("wan22_t2v_tiny/original/config.json");
    cfg["num_layers"] = json!(40);
    let e = detect(&orig, Some(&cfg)).unwrap_err();
    assert_eq!(e.kind(), Kind::Inconsistent);
    assert!(e.message().contains("num_layers"), "{}", e.message());
    // Heads that do not divide dim.
    let mut cfg = config("wan22_t2v_tiny/original/config.json");
    cfg["num_heads"] = json!(3);
    assert_eq!(detect(&orig, Some(&cfg)).unwrap_err().kind(), Kind::Inconsistent);
    // A Qwen config with Wan tensors.
    let qcfg = config("qwen_image_tiny/diffusers/config.json");
    let e = detect(&orig, Some(&qcfg)).unwrap_err();
    assert_eq!(e.kind(), Kind::Inconsistent);
    assert!(e.message().contains("qwen_image"), "{}", e.message());
    // One block with a different ffn width.
    let mut t = wan_original(64, 16, 16, 128, 2);
    for (n, s) in &mut t {
        if n == "blocks.1.ffn.0.weight" {
            *s = vec![96, 64];
        }
    }
    let e = detect(&t, None).unwrap_err();
    assert_eq!(e.kind(), Kind::Inconsistent);
    assert!(e.message().contains("ffn"), "{}", e.message());
    // A tensor with the wrong number of dimensions.
    let mut t = wan_original(64, 16, 16, 128, 1);
    t[0].1 = vec![64, 16, 4];
    assert_eq!(detect(&t, None).unwrap_err().kind(), Kind::Inconsistent);
}

// ---------------------------------------------------------------------------------------------
// Rule files.

/// A made-up family: adding it needs only this file.
const TOY: &str = r#"
[family]
name = "toy"
description = "two-layer toy MLP"
canonical = "original"
prefixes = ["model."]
layer_quantity = "layers"
custom_variant = "custom (width {width})"

[layouts.original]
markers = ["stem.weight"]

[layouts.diffusers]
markers = ["input_proj.weight"]

[quantities]
width = {}
inputs = {}
layers = {}

[tensors]
"stem.weight" = ["width", "inputs"]
"layer.{n}.fc.weight" = ["width", "width"]

[[maps]]
from = "original"
to = "diffusers"
segments = [
  ["stem", "input_proj"],
  ["layer.{n}.fc", "layers.{n}.linear"],
]

[configs.original]
class_name = "Toy"
fields = [{ key = "width", q = "width" }, { key = "inputs", q = "inputs" }, { key = "layers", q = "layers" }]

[configs.diffusers]
class_name = "ToyModel"
fields = [{ key = "hidden_size", q = "width" }, { key = "in_features", q = "inputs" }, { key = "num_layers", q = "layers" }]

[[variants]]
name = "Toy-S"
match = { width = 8 }

[gguf]
arch = "toy"
"#;

#[test]
fn a_family_is_a_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("toy.toml"), TOY).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a rule file").unwrap();
    let reg = Registry::load_dir(dir.path()).unwrap();
    assert!(reg.family("wan22").is_some() && reg.family("qwen_image").is_some());
    let toy = reg.family("toy").unwrap();
    assert_eq!(toy.source(), dir.path().join("toy.toml"));
    let t = [
        ("model.input_proj.weight", &[8u64, 3][..]),
        ("model.layers.0.linear.weight", &[8, 8][..]),
        ("model.layers.1.linear.weight", &[8, 8][..]),
    ];
    let d = reg.detect(&t, None).unwrap();
    assert_eq!((d.family.as_str(), d.variant.as_str(), d.layout, d.prefix.as_str()), ("toy", "Toy-S", Layout::Diffusers, "model."));
    assert_eq!(d.config, json!({"_class_name": "ToyModel", "hidden_size": 8, "in_features": 3, "num_layers": 2}));
    assert_eq!(toy.rename(Layout::Diffusers, Layout::Original, "layers.1.linear.weight").unwrap(), "layer.1.fc.weight");
    assert_eq!(
        toy.translate_config(Layout::Diffusers, Layout::Original, &d.config).unwrap(),
        json!({"_class_name": "Toy", "width": 8, "inputs": 3, "layers": 2})
    );
    // Not the builtin registry.
    assert!(Registry::builtin().family("toy").is_none());
    // A user file replaces a built-in family of the same name.
    std::fs::write(dir.path().join("wan.toml"), TOY.replace("name = \"toy\"", "name = \"wan22\"")).unwrap();
    let reg = Registry::load_dir(dir.path()).unwrap();
    assert_eq!(reg.family("wan22").unwrap().gguf_arch(), "toy");
    // Two user files for one family are an error.
    std::fs::write(dir.path().join("wan2.toml"), TOY.replace("name = \"toy\"", "name = \"wan22\"")).unwrap();
    assert_eq!(Registry::load_dir(dir.path()).unwrap_err().kind(), Kind::Malformed);
    assert_eq!(Registry::load_dir(&dir.path().join("absent")).unwrap_err().kind(), Kind::Io);
}

/// Load `text` as a user file and return the error message (which must name the file).
fn rule_error(text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let e = Registry::load_dir(dir.path()).unwrap_err();
    assert_eq!(e.kind(), Kind::Malformed, "{e}");
    assert_eq!(e.path(), Some(path.as_path()), "{e}");
    assert!(e.to_string().starts_with(&path.display().to_string()), "{e}");
    e.message().to_string()
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}

#[test]
fn rule_file_errors_name_file_and_line() {
    // TOML syntax.
    let bad = TOY.replace("width = {}", "width = {");
    assert!(rule_error(&bad).starts_with(&format!("line {}:", line_of(&bad, "width = {"))), "{}", rule_error(&bad));
    // Unknown field.
    let bad = TOY.replace("arch = \"toy\"", "arch = \"toy\"\nbogus = 1");
    let m = rule_error(&bad);
    assert!(m.contains("bogus") && m.starts_with(&format!("line {}:", line_of(&bad, "bogus"))), "{m}");
    // Unknown layout name.
    let bad = TOY.replace("[layouts.diffusers]", "[layouts.onnx]");
    assert!(rule_error(&bad).contains("unknown layout `onnx`"), "{}", rule_error(&bad));
    // Undeclared quantity in a shape.
    let bad = TOY.replace("[\"width\", \"width\"]", "[\"width\", \"widht\"]");
    let m = rule_error(&bad);
    assert!(m.contains("`widht` is not declared") && m.starts_with(&format!("line {}:", line_of(&bad, "widht"))), "{m}");
    // Bad expression.
    let bad = TOY.replace("[\"width\", \"inputs\"]", "[\"width + 1\", \"inputs\"]");
    let m = rule_error(&bad);
    assert!(m.starts_with(&format!("line {}:", line_of(&bad, "width + 1"))), "{m}");
    // Overlapping segment rules make the map non-invertible.
    let bad = TOY.replace(
        "  [\"layer.{n}.fc\", \"layers.{n}.linear\"],",
        "  [\"layer.{n}.fc\", \"layers.{n}.linear\"],\n  [\"layer.0\", \"first\"],",
    );
    let m = rule_error(&bad);
    assert!(m.contains("overlaps") && m.starts_with(&format!("line {}:", line_of(&bad, "\"first\""))), "{m}");
    // A replace list that disagrees with the segment rules.
    let bad = TOY.replace(
        "segments = [",
        "replace = [[\"stem\", \"input_projection\"], [\"layer.\", \"layers.\"], [\"fc\", \"linear\"]]\nsegments = [",
    );
    let m = rule_error(&bad);
    assert!(
        m.contains("replace list maps `stem` to `input_projection`")
            && m.starts_with(&format!("line {}:", line_of(&bad, "[\"stem\", \"input_proj\"]"))),
        "{m}"
    );
    // A marker that is not in the tensor table.
    let bad = TOY.replace("markers = [\"stem.weight\"]", "markers = [\"stem.bias\"]");
    let m = rule_error(&bad);
    assert!(m.contains("marker `stem.bias`") && m.starts_with(&format!("line {}:", line_of(&bad, "stem.bias"))), "{m}");
    // A config field with both q and value.
    let bad = TOY.replace("{ key = \"width\", q = \"width\" }", "{ key = \"width\", q = \"width\", value = 3 }");
    assert!(rule_error(&bad).contains("config field `width`"), "{}", rule_error(&bad));
    // Missing section.
    let bad = TOY.replace("[gguf]\narch = \"toy\"", "");
    assert!(rule_error(&bad).contains("gguf"), "{}", rule_error(&bad));
}

#[test]
fn registry_lookup() {
    let reg = Registry::builtin();
    assert_eq!(reg.families().iter().map(|f| f.name()).collect::<Vec<_>>(), ["qwen_image", "wan22"]);
    assert_eq!(reg.require("sdxl").unwrap_err().kind(), Kind::Unsupported);
    let wan = reg.require("wan22").unwrap();
    assert_eq!(wan.source(), Path::new("formats/wan22.toml"));
    assert_eq!(wan.canonical_layout(), Layout::Original);
    assert!(wan.variant_names().any(|v| v == "TI2V-5B"));
    // Detection serialises for --json.
    let d = detect(&wan_original(64, 16, 16, 128, 1), None).unwrap();
    let j = serde_json::to_value(&d).unwrap();
    assert_eq!(j["layout"], "original");
    assert_eq!(j["family"], "wan22");
}
