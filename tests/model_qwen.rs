//! Qwen-Image transformer parity with diffusers 0.42.1 on the tiny reference checkpoint, plus
//! GGUF/ComfyUI loading, the CLI, LoRA, gradients and gradient checkpointing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use phasekit::model::checkpoint::checkpointed_grads;
use phasekit::model::denoiser::{Cond, Denoiser};
use phasekit::model::linear::LoraConfig;
use phasekit::model::qwen::QwenImageTransformer;
use phasekit::model::{rel_l2, Param, Parameters, TrainMode};

mod common;

fn fixture(p: &str) -> PathBuf {
    common::fixture("qwen_image_tiny").join(p)
}

fn inputs() -> HashMap<String, Tensor> {
    common::model::load(&fixture("forward.safetensors"))
}

fn img_shape() -> [usize; 3] {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("forward.json")).unwrap()).unwrap();
    phasekit::model::cli::parse_img_shapes(&v["img_shapes"]).unwrap()
}

fn run(m: &QwenImageTransformer, i: &HashMap<String, Tensor>) -> Tensor {
    m.forward(&i["hidden_states"], &i["encoder_hidden_states"], i.get("encoder_hidden_states_mask"), &i["timestep"], img_shape())
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

fn parity(model: &Path, dtype: DType) -> f64 {
    let i = inputs();
    let m = QwenImageTransformer::open(model, dtype, &Device::Cpu).unwrap();
    rel_l2(&run(&m, &i), &i["output"]).unwrap()
}

#[test]
fn f32_matches_diffusers() {
    let e = parity(&fixture("diffusers"), DType::F32);
    eprintln!("qwen f32 rel L2 = {e:.3e}");
    assert!(e < 1e-5, "{e}");
}

#[test]
fn bf16_and_f16_close() {
    for dt in [DType::BF16, DType::F16] {
        let e = parity(&fixture("diffusers"), dt);
        eprintln!("qwen {dt:?} rel L2 = {e:.3e}");
        assert!(e < 1e-2, "{dt:?}: {e}");
    }
}

#[test]
fn gguf_and_comfy_files_match() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("diffusers/diffusion_pytorch_model.safetensors");
    let gguf = dir.path().join("qwen.gguf");
    let opts = phasekit::convert::Options {
        format: phasekit::convert::OutFormat::Gguf,
        quant: Some(phasekit::quant::GgmlType::F32),
        sync: false,
        ..Default::default()
    };
    phasekit::convert::convert(&src, &gguf, &opts).unwrap();
    let comfy = dir.path().join("comfy.safetensors");
    let opts =
        phasekit::convert::Options { layout: Some(phasekit::layout::Layout::Comfy), comfy_prefix: true, sync: false, ..Default::default() };
    phasekit::convert::convert(&src, &comfy, &opts).unwrap();
    std::fs::copy(fixture("diffusers/config.json"), dir.path().join("config.json")).unwrap();
    for p in [&gguf, &comfy] {
        let e = parity(p, DType::F32);
        eprintln!("qwen {} f32 rel L2 = {e:.3e}", p.display());
        assert!(e < 1e-5, "{}: {e}", p.display());
    }
}

#[test]
fn cli_forward_reproduces_output() {
    let dir = tempfile::tempdir().unwrap();
    common::model::forward_matches(
        &fixture("diffusers"),
        &fixture("forward.safetensors"),
        &dir.path().join("out.safetensors"),
        "qwen_image",
    );
    // An explicit --img-shapes that does not fit the tokens is an error, not a panic.
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_phasekit"))
        .args(["forward", "--img-shapes", "[[1, 5, 5]]", "--model"])
        .arg(fixture("diffusers"))
        .arg("--inputs")
        .arg(fixture("forward.safetensors"))
        .arg("--out")
        .arg(dir.path().join("bad.safetensors"))
        .output()
        .unwrap();
    assert_eq!(st.status.code(), Some(6), "{}", String::from_utf8_lossy(&st.stderr));
    assert!(String::from_utf8_lossy(&st.stderr).contains("img_shapes"));
}

#[test]
fn padded_text_is_masked() {
    // Appending padding tokens (mask 0) changes neither the image output nor the text RoPE
    // positions of the real tokens.
    let i = inputs();
    let m = QwenImageTransformer::open(&fixture("diffusers"), DType::F32, &Device::Cpu).unwrap();
    let base = run(&m, &i);
    let enc = &i["encoder_hidden_states"];
    let pad = Tensor::randn(0f32, 1.0, (1, 3, 24), &Device::Cpu).unwrap();
    let enc2 = Tensor::cat(&[enc, &pad], 1).unwrap();
    let mask2 = Tensor::new(&[[1i64, 1, 1, 1, 1, 1, 0, 0, 0]], &Device::Cpu).unwrap();
    let y = m.forward(&i["hidden_states"], &enc2, Some(&mask2), &i["timestep"], img_shape()).unwrap();
    let e = rel_l2(&y, &base).unwrap();
    assert!(e < 1e-6, "{e}");
}

#[test]
fn lora_merge_grads_and_checkpointing() {
    let i = inputs();
    let mut m = QwenImageTransformer::open(&fixture("diffusers"), DType::F32, &Device::Cpu).unwrap();
    let base = run(&m, &i);
    let n = m.attach_lora(&LoraConfig { rank: 2, alpha: 2.0, ..Default::default() }).unwrap();
    assert_eq!(n, 2 * (8 + 4), "8 attention projections and 4 MLP linears per block");
    assert_eq!(base.flatten_all().unwrap().to_vec1::<f32>().unwrap(), run(&m, &i).flatten_all().unwrap().to_vec1::<f32>().unwrap());
    let lora = m.trainable_vars(TrainMode::Lora).unwrap();
    let g = run(&m, &i).sqr().unwrap().sum_all().unwrap().backward().unwrap();
    check_grads(&mut m, &g, None, true);
    for (k, v) in lora.iter().enumerate() {
        if k % 2 == 1 {
            v.set(&Tensor::randn(0f32, 0.1, v.shape(), &Device::Cpu).unwrap()).unwrap();
        }
    }
    let adapted = run(&m, &i);
    m.merge_lora().unwrap();
    let e = rel_l2(&run(&m, &i), &adapted).unwrap();
    assert!(e < 1e-6, "merge: {e}");
    // Full fine-tuning: every parameter gets a finite, nonzero gradient, equal under checkpointing.
    let vars = m.trainable_vars(TrainMode::Full).unwrap();
    let w = Tensor::randn(0f32, 1.0, i["output"].shape(), &Device::Cpu).unwrap();
    let loss = |o: &Tensor| (o * &w)?.sum_all();
    let plain = loss(&run(&m, &i)).unwrap().backward().unwrap();
    let (state, ctx, aux) = m
        .prepare(&i["hidden_states"], &i["encoder_hidden_states"], i.get("encoder_hidden_states_mask"), &i["timestep"], img_shape())
        .unwrap();
    let ck = checkpointed_grads(&m, state, ctx, &aux, loss, &vars).unwrap();
    assert!(vars.len() > 50);
    check_grads(&mut m, &plain, Some(&ck), false);
}

/// Every gradient is finite and nonzero, except for the text-only path of the last block,
/// whose outputs the model discards (zero in diffusers too); `other` must agree within 1e-5.
fn check_grads(m: &mut QwenImageTransformer, g: &GradStore, other: Option<&GradStore>, lora_only: bool) {
    let last = format!("transformer_blocks.{}.", m.blocks.len() - 1);
    let mut checked = 0;
    for (name, p) in m.params() {
        let dead = name.starts_with(&last)
            && ["attn.add_q_proj", "attn.to_add_out", "txt_mlp.", "attn.norm_added_q"].iter().any(|s| name.contains(s));
        let ts: Vec<Tensor> = match p {
            Param::Linear(l) if lora_only => l.lora.iter().map(|a| a.up.as_tensor().clone()).collect(),
            Param::Linear(l) => [Some(l.weight.clone()), l.bias.clone()].into_iter().flatten().collect(),
            Param::Tensor(t) if !lora_only => vec![t.clone()],
            Param::Tensor(_) => vec![],
        };
        for t in ts {
            let s = g.get(&t).map_or(0.0, |x| x.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap());
            assert!(s.is_finite(), "{name}");
            if dead {
                assert_eq!(s, 0.0, "{name}");
                continue;
            }
            assert!(s > 0.0, "{name}: zero gradient");
            if let Some(o) = other {
                let e = rel_l2(o.get(&t).expect("checkpointed gradient"), g.get(&t).unwrap()).unwrap();
                assert!(e < 1e-5, "{name}: checkpointed vs plain {e}");
            }
            checked += 1;
        }
    }
    assert!(checked > 0);
}

#[test]
fn denoiser_uses_sigma_as_timestep() {
    let i = inputs();
    let mut m = QwenImageTransformer::open(&fixture("diffusers"), DType::F32, &Device::Cpu).unwrap();
    m.img_shape = img_shape();
    let v = m.velocity(&i["hidden_states"], &i["timestep"], &Cond::Embedding(i["encoder_hidden_states"].clone())).unwrap();
    assert!(rel_l2(&v, &i["output"]).unwrap() < 1e-5);
    let Cond::Embedding(e) = m.null_cond(2).unwrap() else { panic!() };
    assert_eq!(e.dims(), &[2, 1, 24]);
}
