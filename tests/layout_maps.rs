//! Key maps and config dialects: the fixtures written by diffusers, full-size key sets built
//! from the tables in research/formats.md §3.3/§4.2, and an independent copy of diffusers'
//! `convert_wan_to_diffusers.py` rename loop.

use phasekit::layout::{Layout, Registry};
use phasekit::Kind;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod common;

use common::keys::{config, wan_original};

fn fixture(rel: &str) -> PathBuf {
    common::fixture(rel)
}

/// Tensor names and shapes from a safetensors header.
fn header(path: &Path) -> BTreeMap<String, Vec<u64>> {
    common::keys::header(path).into_iter().collect()
}

/// diffusers `scripts/convert_wan_to_diffusers.py` TRANSFORMER_KEYS_RENAME_DICT, in order, as
/// listed in research/formats.md §5.1 (typed in separately from formats/wan22.toml).
const UPSTREAM: &[(&str, &str)] = &[
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    ("modulation", "scale_shift_table"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
    ("norm2", "norm__placeholder"),
    ("norm3", "norm2"),
    ("norm__placeholder", "norm3"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
    ("self_attn.q", "attn1.to_q"),
    ("self_attn.k", "attn1.to_k"),
    ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"),
    ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"),
    ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"),
    ("attn2.to_k_img", "attn2.add_k_proj"),
    ("attn2.to_v_img", "attn2.add_v_proj"),
    ("attn2.norm_k_img", "attn2.norm_added_k"),
];

fn upstream(key: &str) -> String {
    UPSTREAM.iter().fold(key.to_string(), |k, (a, b)| k.replace(a, b))
}

/// Wan2.1 I2V / FLF2V image-conditioning tensors (names only matter here).
fn wan21_image_keys(layers: u64) -> Vec<String> {
    let mut k: Vec<String> = [
        "proj.0.weight",
        "proj.0.bias",
        "proj.1.weight",
        "proj.1.bias",
        "proj.3.weight",
        "proj.3.bias",
        "proj.4.weight",
        "proj.4.bias",
        "emb_pos",
    ]
    .iter()
    .map(|s| format!("img_emb.{s}"))
    .collect();
    for n in 0..layers {
        for s in ["k_img.weight", "k_img.bias", "v_img.weight", "v_img.bias", "norm_k_img.weight"] {
            k.push(format!("blocks.{n}.cross_attn.{s}"));
        }
    }
    k
}

fn wan() -> &'static phasekit::layout::Family {
    Registry::builtin().family("wan22").unwrap()
}

#[test]
fn fixture_original_renames_to_exactly_the_diffusers_fixture_and_back() {
    let orig = header(&fixture("wan22_t2v_tiny/original/diffusion_pytorch_model.safetensors"));
    let diff = header(&fixture("wan22_t2v_tiny/diffusers/diffusion_pytorch_model.safetensors"));
    assert_eq!(orig.len(), 69);
    let mapped: BTreeMap<String, Vec<u64>> =
        orig.iter().map(|(k, s)| (wan().rename(Layout::Original, Layout::Diffusers, k).unwrap(), s.clone())).collect();
    assert_eq!(mapped, diff);
    let back: BTreeMap<String, Vec<u64>> =
        diff.iter().map(|(k, s)| (wan().rename(Layout::Diffusers, Layout::Original, k).unwrap(), s.clone())).collect();
    assert_eq!(back, orig);
}

#[test]
fn forward_equals_the_diffusers_script_and_reverse_inverts_it_on_every_real_key() {
    let sets = [
        ("T2V-A14B", wan_original(5120, 16, 16, 13824, 40), 1095),
        ("I2V-A14B", wan_original(5120, 36, 16, 13824, 40), 1095),
        ("TI2V-5B", wan_original(3072, 48, 48, 14336, 30), 825),
    ];
    for (what, keys, count) in sets {
        assert_eq!(keys.len(), count, "{what}");
        let mut seen = std::collections::HashSet::new();
        for (k, _) in &keys {
            let d = wan().rename(Layout::Original, Layout::Diffusers, k).unwrap();
            assert_eq!(d, upstream(k), "{what}: {k}");
            assert!(seen.insert(d.clone()), "{what}: two keys map to {d}");
            assert_eq!(wan().rename(Layout::Diffusers, Layout::Original, &d).unwrap(), *k, "{what}: {d}");
        }
    }
    // Wan2.1 image conditioning keys map too (cross_attn.k_img goes through the
    // cross_attn.k → attn2.to_k → attn2.add_k_proj chain upstream).
    for k in wan21_image_keys(2) {
        let d = wan().rename(Layout::Original, Layout::Diffusers, &k).unwrap();
        assert_eq!(d, upstream(&k), "{k}");
        assert_eq!(wan().rename(Layout::Diffusers, Layout::Original, &d).unwrap(), k);
    }
    assert_eq!(
        wan().rename(Layout::Original, Layout::Diffusers, "blocks.7.cross_attn.norm_k_img.weight").unwrap(),
        "blocks.7.attn2.norm_added_k.weight"
    );
    // Companion tensors (fp8 scales) keep their tail.
    assert_eq!(
        wan().rename(Layout::Original, Layout::Diffusers, "blocks.0.self_attn.q.scale_weight").unwrap(),
        "blocks.0.attn1.to_q.scale_weight"
    );
}

#[test]
fn unmapped_names_are_unsupported_and_name_the_key() {
    for (from, to, key) in [
        (Layout::Original, Layout::Diffusers, "blocks.0.mystery.weight"),
        (Layout::Diffusers, Layout::Original, "blocks.0.attn1.to_qkv.weight"),
        (Layout::Diffusers, Layout::Original, "transformer_blocks.0.attn.to_q.weight"),
        (Layout::Original, Layout::Diffusers, "scaled_fp8"),
    ] {
        let e = wan().rename(from, to, key).unwrap_err();
        assert_eq!(e.kind(), Kind::Unsupported);
        assert!(e.message().contains(key), "{}", e.message());
    }
    let qwen = Registry::builtin().family("qwen_image").unwrap();
    let e = qwen.rename(Layout::Original, Layout::Diffusers, "img_in.weight").unwrap_err();
    assert_eq!(e.kind(), Kind::Unsupported);
    assert!(e.message().contains("no original layout"), "{}", e.message());
}

#[test]
fn comfy_names_are_shared() {
    let qwen = Registry::builtin().family("qwen_image").unwrap();
    assert_eq!(qwen.layouts(), &[Layout::Diffusers, Layout::Comfy]);
    assert_eq!(wan().layouts(), &[Layout::Original, Layout::Diffusers, Layout::Comfy]);
    let k = "transformer_blocks.3.attn.to_add_out.weight";
    assert_eq!(qwen.rename(Layout::Diffusers, Layout::Comfy, k).unwrap(), k);
    assert_eq!(qwen.rename(Layout::Comfy, Layout::Diffusers, k).unwrap(), k);
    assert_eq!(wan().rename(Layout::Original, Layout::Comfy, "blocks.0.ffn.0.weight").unwrap(), "blocks.0.ffn.0.weight");
    assert_eq!(wan().rename(Layout::Comfy, Layout::Diffusers, "blocks.0.ffn.0.weight").unwrap(), "blocks.0.ffn.net.0.proj.weight");
    assert_eq!(wan().comfy_names_layout(), Layout::Original);
    assert_eq!(qwen.comfy_names_layout(), Layout::Diffusers);
}

/// Fields of the diffusers fixture config that cannot come from a Wan original config:
/// `_diffusers_version` (not written) and `rope_max_seq_len` (diffusers' default 1024 is written;
/// the fixture was made with 64).
const NOT_DERIVABLE: &[&str] = &["_diffusers_version", "rope_max_seq_len"];

#[test]
fn fixture_config_translation() {
    let orig = config("wan22_t2v_tiny/original/config.json");
    let diff = config("wan22_t2v_tiny/diffusers/config.json");
    let got = wan().translate_config(Layout::Original, Layout::Diffusers, &orig).unwrap();
    let mut want = diff.as_object().unwrap().clone();
    for k in NOT_DERIVABLE {
        want.remove(*k);
    }
    let mut got_m = got.as_object().unwrap().clone();
    assert_eq!(got_m.remove("rope_max_seq_len"), Some(json!(1024)));
    assert_eq!(Value::Object(got_m), Value::Object(want));
    // diffusers → original gives every field of the original fixture (text_len and model_type
    // are defaults there: 512 and "t2v").
    let back = wan().translate_config(Layout::Diffusers, Layout::Original, &diff).unwrap();
    assert_eq!(back, orig);
    assert_eq!(wan().translate_config(Layout::Diffusers, Layout::Original, &got).unwrap(), orig);
    // Same dialect: unchanged.
    assert_eq!(wan().translate_config(Layout::Original, Layout::Comfy, &orig).unwrap(), orig);
    let qcfg = config("qwen_image_tiny/diffusers/config.json");
    let qwen = Registry::builtin().family("qwen_image").unwrap();
    assert_eq!(qwen.translate_config(Layout::Diffusers, Layout::Comfy, &qcfg).unwrap(), qcfg);
}

#[test]
fn full_size_config_translation() {
    // research/formats.md §4.1 (expert config.json) and §4.3 (the script's diffusers_config).
    let t2v = json!({"_class_name":"WanModel","_diffusers_version":"0.33.0","dim":5120,"eps":1e-06,"ffn_dim":13824,"freq_dim":256,"in_dim":16,"model_type":"t2v","num_heads":40,"num_layers":40,"out_dim":16,"text_len":512});
    let want = json!({"_class_name":"WanTransformer3DModel","added_kv_proj_dim":null,"attention_head_dim":128,"cross_attn_norm":true,"eps":1e-06,"ffn_dim":13824,"freq_dim":256,"image_dim":null,"in_channels":16,"num_attention_heads":40,"num_layers":40,"out_channels":16,"patch_size":[1,2,2],"pos_embed_seq_len":null,"qk_norm":"rms_norm_across_heads","rope_max_seq_len":1024,"text_dim":4096});
    assert_eq!(wan().translate_config(Layout::Original, Layout::Diffusers, &t2v).unwrap(), want);
    let mut i2v = want.clone();
    i2v["in_channels"] = json!(36);
    let back = wan().translate_config(Layout::Diffusers, Layout::Original, &i2v).unwrap();
    assert_eq!(back["model_type"], "i2v");
    assert_eq!(back["num_heads"], 40);
    assert_eq!(back["dim"], 5120);
    // A diffusers config given as original is refused.
    let e = wan().translate_config(Layout::Original, Layout::Diffusers, &want).unwrap_err();
    assert_eq!(e.kind(), Kind::Inconsistent);
    // Heads cannot be made up for a custom model.
    let e = wan()
        .translate_config(
            Layout::Original,
            Layout::Diffusers,
            &json!({"dim": 64, "in_dim": 4, "out_dim": 4, "ffn_dim": 8, "freq_dim": 8, "text_dim": 8, "num_layers": 1}),
        )
        .unwrap_err();
    assert_eq!(e.kind(), Kind::Malformed);
    assert!(e.message().contains("attention_head_dim"), "{}", e.message());
    // dim that heads do not divide is a conflict.
    let mut bad = t2v.clone();
    bad["num_heads"] = json!(48);
    assert_eq!(wan().translate_config(Layout::Original, Layout::Diffusers, &bad).unwrap_err().kind(), Kind::Inconsistent);
}

fn as_refs(t: &[(String, Vec<u64>)]) -> Vec<(&str, &[u64])> {
    t.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect()
}

#[test]
fn config_from_fixture_shapes() {
    let orig: Vec<(String, Vec<u64>)> =
        header(&fixture("wan22_t2v_tiny/original/diffusion_pytorch_model.safetensors")).into_iter().collect();
    let got = wan().config_from_shapes(Layout::Original, &as_refs(&orig)).unwrap();
    let mut want = config("wan22_t2v_tiny/original/config.json");
    want["num_heads"] = Value::Null; // no shape tells the number of heads of a custom model
    assert_eq!(got, want);

    let diff: Vec<(String, Vec<u64>)> =
        header(&fixture("wan22_t2v_tiny/diffusers/diffusion_pytorch_model.safetensors")).into_iter().collect();
    let got = wan().config_from_shapes(Layout::Diffusers, &as_refs(&diff)).unwrap();
    let want = config("wan22_t2v_tiny/diffusers/config.json");
    for (k, v) in want.as_object().unwrap() {
        match k.as_str() {
            "_diffusers_version" => assert!(got.get(k).is_none()),
            "rope_max_seq_len" => assert_eq!(got[k], 1024),
            "num_attention_heads" | "attention_head_dim" => assert!(got[k].is_null(), "{k}"),
            _ => assert_eq!(&got[k], v, "{k}"),
        }
    }

    let qwen = Registry::builtin().family("qwen_image").unwrap();
    let q: Vec<(String, Vec<u64>)> =
        header(&fixture("qwen_image_tiny/diffusers/diffusion_pytorch_model.safetensors")).into_iter().collect();
    let got = qwen.config_from_shapes(Layout::Diffusers, &as_refs(&q)).unwrap();
    let mut want = config("qwen_image_tiny/diffusers/config.json");
    want.as_object_mut().unwrap().remove("_diffusers_version");
    want["axes_dims_rope"] = Value::Null; // rope split of a custom head size: not in any shape
    assert_eq!(got, want);
    // Names under the ComfyUI prefix work too.
    let prefixed: Vec<(String, Vec<u64>)> = q.iter().map(|(n, s)| (format!("model.diffusion_model.{n}"), s.clone())).collect();
    assert_eq!(qwen.config_from_shapes(Layout::Comfy, &as_refs(&prefixed)).unwrap(), got);
}

#[test]
fn expected_tensors_match_the_research_tables() {
    let cfg = json!({"dim":5120,"eps":1e-06,"ffn_dim":13824,"freq_dim":256,"in_dim":16,"model_type":"t2v","num_heads":40,"num_layers":40,"out_dim":16,"text_dim":4096,"text_len":512});
    let mut got = wan().expected_tensors(Layout::Original, &cfg).unwrap();
    let mut want = wan_original(5120, 16, 16, 13824, 40);
    got.sort();
    want.sort();
    assert_eq!(got, want);
    let total: u64 = got.iter().map(|(_, s)| s.iter().product::<u64>()).sum();
    assert_eq!(total, 14_288_491_584);
    let diff_cfg = wan().translate_config(Layout::Original, Layout::Diffusers, &cfg).unwrap();
    let mut d = wan().expected_tensors(Layout::Diffusers, &diff_cfg).unwrap();
    d.sort();
    let mut w: Vec<(String, Vec<u64>)> = want.iter().map(|(n, s)| (upstream(n), s.clone())).collect();
    w.sort();
    assert_eq!(d, w);
}
