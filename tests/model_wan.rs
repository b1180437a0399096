//! Wan2.2 transformer parity with diffusers 0.42.1 on the tiny reference checkpoint, in every
//! way the checkpoint can be stored, plus LoRA, gradients and gradient checkpointing; and on the
//! tiny TI2V-shaped checkpoint with per-token timesteps `[B, S]` (`wan22_ti2v_tiny`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use phasekit::model::checkpoint::{checkpointed_grads, Staged};
use phasekit::model::linear::LoraConfig;
use phasekit::model::wan::WanTransformer;
use phasekit::model::{rel_l2, Parameters, TrainMode};

mod common;

fn fixture(p: &str) -> PathBuf {
    common::fixture("wan22_t2v_tiny").join(p)
}

fn inputs() -> HashMap<String, Tensor> {
    common::model::load(&fixture("forward.safetensors"))
}

/// The TI2V-shaped fixture (48 channels, per-token timesteps), from
/// tests/fixtures/wan22_ti2v_tiny/make.py.
fn ti2v(p: &str) -> PathBuf {
    common::fixture("wan22_ti2v_tiny").join(p)
}

fn ti2v_inputs() -> HashMap<String, Tensor> {
    common::model::load(&ti2v("forward.safetensors"))
}

fn run(m: &WanTransformer, i: &HashMap<String, Tensor>) -> Tensor {
    m.forward(&i["hidden_states"], &i["timestep"], &i["encoder_hidden_states"]).unwrap().to_dtype(DType::F32).unwrap()
}

fn parity(model: &Path, dtype: DType) -> f64 {
    let i = inputs();
    let m = WanTransformer::open(model, dtype, &Device::Cpu).unwrap();
    rel_l2(&run(&m, &i), &i["output"]).unwrap()
}

#[test]
fn f32_matches_diffusers_both_layouts() {
    for layout in ["diffusers", "original"] {
        let e = parity(&fixture(layout), DType::F32);
        eprintln!("wan {layout} f32 rel L2 = {e:.3e}");
        assert!(e < 1e-5, "{layout}: {e}");
    }
}

#[test]
fn bf16_and_f16_close() {
    for dt in [DType::BF16, DType::F16] {
        let e = parity(&fixture("diffusers"), dt);
        eprintln!("wan {dt:?} rel L2 = {e:.3e}");
        assert!(e < 1e-2, "{dt:?}: {e}");
    }
}

fn convert(from: &Path, to: &Path, opts: phasekit::convert::Options) {
    phasekit::convert::convert(from, to, &opts).unwrap();
}

#[test]
fn gguf_comfy_and_fp8_free_conversions_match() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("diffusers/diffusion_pytorch_model.safetensors");
    let gguf = dir.path().join("wan.gguf");
    convert(
        &src,
        &gguf,
        phasekit::convert::Options {
            format: phasekit::convert::OutFormat::Gguf,
            quant: Some(phasekit::quant::GgmlType::F32),
            sync: false,
            ..Default::default()
        },
    );
    let comfy = dir.path().join("comfy.safetensors");
    convert(
        &src,
        &comfy,
        phasekit::convert::Options { layout: Some(phasekit::layout::Layout::Comfy), comfy_prefix: true, sync: false, ..Default::default() },
    );
    // Neither file has a config.json beside it: the config comes from shapes, except the
    // number of heads, which no shape gives; put the original config beside them.
    std::fs::copy(fixture("original/config.json"), dir.path().join("config.json")).unwrap();
    for p in [&gguf, &comfy] {
        let e = parity(p, DType::F32);
        eprintln!("wan {} f32 rel L2 = {e:.3e}", p.display());
        assert!(e < 1e-5, "{}: {e}", p.display());
    }
}

#[test]
fn cli_forward_reproduces_output() {
    let dir = tempfile::tempdir().unwrap();
    common::model::forward_matches(&fixture("original"), &fixture("forward.safetensors"), &dir.path().join("out.safetensors"), "wan22");
}

#[test]
fn lora_zero_is_bit_equal_merge_matches_and_grads_reach_adapters() {
    let i = inputs();
    let mut m = WanTransformer::open(&fixture("diffusers"), DType::F32, &Device::Cpu).unwrap();
    let base = run(&m, &i);
    let n = m.attach_lora(&LoraConfig { rank: 4, alpha: 4.0, ..Default::default() }).unwrap();
    assert_eq!(n, 2 * (4 + 4 + 2), "q/k/v/o of both attentions and both FFN linears per block");
    let with = run(&m, &i);
    assert_eq!(base.flatten_all().unwrap().to_vec1::<f32>().unwrap(), with.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    let vars = m.trainable_vars(TrainMode::Lora).unwrap();
    assert_eq!(vars.len(), 2 * n);
    // Gradients reach every adapter (down gets zero gradient while up = 0; up gets nonzero).
    let loss = run(&m, &i).sqr().unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    for (k, v) in vars.iter().enumerate() {
        let gv = g.get(v.as_tensor()).expect("gradient for every LoRA var");
        let s = gv.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(s.is_finite());
        if k % 2 == 1 {
            assert!(s > 0.0, "up var {k} has zero gradient");
        }
    }
    // Nonzero up, then merge.
    for (k, v) in vars.iter().enumerate() {
        if k % 2 == 1 {
            v.set(&Tensor::randn(0f32, 0.1, v.shape(), &Device::Cpu).unwrap()).unwrap();
        }
    }
    let adapted = run(&m, &i);
    assert!(rel_l2(&adapted, &base).unwrap() > 1e-3);
    m.merge_lora().unwrap();
    let merged = run(&m, &i);
    let e = rel_l2(&merged, &adapted).unwrap();
    assert!(e < 1e-6, "merge: {e}");
}

#[test]
fn full_mode_grads_reach_every_parameter_and_checkpointing_matches() {
    grads_and_checkpointing(&fixture("diffusers"), &inputs());
}

fn grads_and_checkpointing(model: &Path, i: &HashMap<String, Tensor>) {
    let mut m = WanTransformer::open(model, DType::F32, &Device::Cpu).unwrap();
    let vars = m.trainable_vars(TrainMode::Full).unwrap();
    let names = m.params().len();
    assert!(vars.len() > names);
    let w = Tensor::randn(0f32, 1.0, i["output"].shape(), &Device::Cpu).unwrap();
    let loss = |o: &Tensor| (o * &w)?.sum_all();
    let plain = loss(&run(&m, i)).unwrap().backward().unwrap();
    let (state, ctx, aux) = m.prepare(&i["hidden_states"], &i["timestep"], &i["encoder_hidden_states"]).unwrap();
    assert_eq!(m.num_blocks(), 2);
    let ck = checkpointed_grads(&m, state, ctx, &aux, loss, &vars).unwrap();
    for (k, v) in vars.iter().enumerate() {
        let a = plain.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for var {k} {:?}", v.shape()));
        let b = ck.get(v.as_tensor()).unwrap_or_else(|| panic!("no checkpointed gradient for var {k}"));
        let s = a.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(s.is_finite() && s > 0.0, "var {k} {:?}: |grad| = {s}", v.shape());
        let e = rel_l2(b, a).unwrap();
        assert!(e < 1e-5, "var {k} {:?}: checkpointed vs plain {e}", v.shape());
    }
}

#[test]
fn i2v_36_channels_and_odd_frames_shapes() {
    // An I2V-A14B-like expert (36 input channels, 16 out) at tiny width, random weights saved
    // as a diffusers checkpoint, run on an odd number of frames.
    let dir = tempfile::tempdir().unwrap();
    let src = phasekit::model::weights::Weights::open(&fixture("diffusers"), DType::F32, &Device::Cpu).unwrap();
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for t in &src.ck.tensors {
        let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
        let shape = match t.name.as_str() {
            "patch_embedding.weight" => vec![32, 36, 1, 2, 2],
            "proj_out.weight" => vec![64, 32],
            "proj_out.bias" => vec![64],
            _ => shape,
        };
        tensors.push((t.name.clone(), Tensor::randn(0f32, 0.2, shape, &Device::Cpu).unwrap()));
    }
    let map: HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, dir.path().join("diffusion_pytorch_model.safetensors")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("diffusers/config.json")).unwrap()).unwrap();
    cfg["in_channels"] = 36.into();
    cfg["out_channels"] = 16.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let m = WanTransformer::open(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(m.cfg.in_channels, 36);
    let x = Tensor::randn(0f32, 1.0, (1, 36, 5, 4, 2), &Device::Cpu).unwrap();
    let t = Tensor::new(&[500f32], &Device::Cpu).unwrap();
    let e = Tensor::randn(0f32, 1.0, (1, 3, 24), &Device::Cpu).unwrap();
    let y = m.forward(&x, &t, &e).unwrap();
    assert_eq!(y.dims(), &[1, 16, 5, 4, 2]);
    // Patch embedding equals the Conv3d definition in f64 for one patch.
    let w = phasekit::model::weights::Weights::open(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let pw: Vec<f32> = w.get("patch_embedding.weight", &[32, 36, 1, 2, 2]).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let pb: Vec<f32> = w.get("patch_embedding.bias", &[32]).unwrap().to_vec1().unwrap();
    let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let (state, _, _) = m.prepare(&x, &t, &e).unwrap();
    let got: Vec<f32> = state[0].flatten_all().unwrap().to_vec1().unwrap();
    // token (f=3, h=1, w=0): patch rows 2..4, cols 0..2
    let tok = 3 * 2 + 1; // (f · H' + h) · W' + w with H' = 2, W' = 1
    for o in 0..32 {
        let mut acc = pb[o] as f64;
        for c in 0..36 {
            for dy in 0..2 {
                for dx in 0..2 {
                    let xi = (((c * 5 + 3) * 4) + (2 + dy)) * 2 + dx;
                    acc += pw[((o * 36 + c) * 2 + dy) * 2 + dx] as f64 * xv[xi] as f64;
                }
            }
        }
        assert!((got[tok * 32 + o] as f64 - acc).abs() < 1e-4, "out {o}: {} vs {acc}", got[tok * 32 + o]);
    }
}

#[test]
fn shape_mismatch_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("diffusers/diffusion_pytorch_model.safetensors"), dir.path().join("diffusion_pytorch_model.safetensors"))
        .unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("diffusers/config.json")).unwrap()).unwrap();
    cfg["num_attention_heads"] = 4.into();
    cfg["attention_head_dim"] = 16.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let e = WanTransformer::open(dir.path(), DType::F32, &Device::Cpu).err().expect("a 64-wide config on 32-wide weights fails");
    assert!(e.path().is_some(), "{e}");
}

#[test]
fn fp8_with_scales_loads_dequantized() {
    let dir = tempfile::tempdir().unwrap();
    let fp8 = dir.path().join("fp8.safetensors");
    let opts = phasekit::convert::Options {
        dtype: phasekit::convert::DTypeChoice::To(phasekit::DType::F8E4M3),
        fp8_scale: phasekit::convert::Fp8Scale::Comfy,
        sync: false,
        ..Default::default()
    };
    phasekit::convert::convert(&fixture("diffusers/diffusion_pytorch_model.safetensors"), &fp8, &opts).unwrap();
    std::fs::copy(fixture("diffusers/config.json"), dir.path().join("config.json")).unwrap();
    let w = phasekit::model::weights::Weights::open(&fp8, DType::F32, &Device::Cpu).unwrap();
    let r = phasekit::model::weights::Weights::open(&fixture("diffusers"), DType::F32, &Device::Cpu).unwrap();
    assert!(w.ck.tensors.iter().any(|t| t.name.ends_with(".scale_weight")), "the fp8 file carries scales");
    for name in ["blocks.0.attn1.to_q.weight", "blocks.1.ffn.net.0.proj.weight", "condition_embedder.time_proj.weight"] {
        let shape: Vec<usize> = r.ck.tensors.iter().find(|t| t.name == name).unwrap().shape.iter().map(|&d| d as usize).collect();
        let e = rel_l2(&w.get(name, &shape).unwrap(), &r.get(name, &shape).unwrap()).unwrap();
        assert!(e < 0.05, "{name}: fp8 e4m3 with its scale is within 5%: {e}");
    }
    let i = inputs();
    let m = WanTransformer::load(&w).unwrap();
    let e = rel_l2(&run(&m, &i), &i["output"]).unwrap();
    eprintln!("wan fp8 e4m3 weights rel L2 = {e:.3e}");
    assert!(e.is_finite() && e < 0.5);
}

#[test]
fn denoiser_maps_sigma_to_timestep() {
    use phasekit::model::denoiser::{Cond, Denoiser};
    let i = inputs();
    let m = WanTransformer::open(&fixture("diffusers"), DType::F32, &Device::Cpu).unwrap();
    // t = 937.5 and 250 are 1000σ exactly for these σ (σ = t·0.001 would round in f32, and
    // this tiny random model is that sensitive to t).
    let sigma = Tensor::new(&[0.9375f32, 0.25], &Device::Cpu).unwrap();
    assert_eq!((&sigma * 1000.0).unwrap().to_vec1::<f32>().unwrap(), i["timestep"].to_vec1::<f32>().unwrap());
    let v = m.velocity(&i["hidden_states"], &sigma, &Cond::Embedding(i["encoder_hidden_states"].clone())).unwrap();
    let e = rel_l2(&v, &i["output"]).unwrap();
    assert!(e < 1e-5, "{e} {sigma}");
    let Cond::Embedding(e) = m.null_cond(3).unwrap() else { panic!() };
    assert_eq!(e.dims(), &[3, 1, 24]);
    let v0 = m.velocity(&i["hidden_states"], &sigma, &m.null_cond(2).unwrap()).unwrap();
    assert_eq!(v0.dims(), i["hidden_states"].dims());
}

#[test]
fn ti2v_per_token_timesteps_match_diffusers() {
    let i = ti2v_inputs();
    let (b, s) = i["timestep"].dims2().unwrap();
    assert_eq!((b, s), (2, 3 * 2 * 3), "per-token timesteps over 3 latent frames of 2×3 patches");
    let e = parity_of(&ti2v("diffusers"), DType::F32, &i);
    eprintln!("wan ti2v per-token f32 rel L2 = {e:.3e}");
    assert!(e < 1e-5, "{e}");
    for dt in [DType::BF16, DType::F16] {
        let e = parity_of(&ti2v("diffusers"), dt, &i);
        eprintln!("wan ti2v per-token {dt:?} rel L2 = {e:.3e}");
        assert!(e < 1e-2, "{dt:?}: {e}");
    }
}

fn parity_of(model: &Path, dtype: DType, i: &HashMap<String, Tensor>) -> f64 {
    let m = WanTransformer::open(model, dtype, &Device::Cpu).unwrap();
    rel_l2(&run(&m, i), &i["output"]).unwrap()
}

/// `t [B]` → `[B, S]` with every token of sample `b` at `t[b]`.
fn expand(t: &Tensor, s: usize) -> Tensor {
    let b = t.dim(0).unwrap();
    t.unsqueeze(1).unwrap().broadcast_as((b, s)).unwrap().contiguous().unwrap()
}

#[test]
fn uniform_per_token_timestep_equals_batch_timestep_with_equal_gradients() {
    let t2v = inputs();
    let mut ti = ti2v_inputs();
    // Both fixtures: [B, S] filled with each row's t against [B] = t.
    ti.insert("timestep".into(), Tensor::new(&[875f32, 312.5], &Device::Cpu).unwrap());
    for (model, i) in [(fixture("diffusers"), t2v), (ti2v("diffusers"), ti)] {
        let mut m = WanTransformer::open(&model, DType::F32, &Device::Cpu).unwrap();
        let vars = m.trainable_vars(TrainMode::Full).unwrap();
        let x = &i["hidden_states"];
        let (_, _, f, h, w) = x.dims5().unwrap();
        let tb = i["timestep"].clone();
        let ts = expand(&tb, f * (h / 2) * (w / 2));
        let enc = &i["encoder_hidden_states"];
        let a = m.forward(x, &tb, enc).unwrap();
        let b = m.forward(x, &ts, enc).unwrap();
        let e = rel_l2(&b, &a).unwrap();
        eprintln!("{}: [B, S] uniform vs [B] rel L2 = {e:.3e}", model.display());
        assert!(e < 1e-6, "{}: {e}", model.display());
        // The same function of the weights, so the same gradients: the per-token path's
        // gathers send every token's gradient back to its timestep's row.
        let wt = Tensor::randn(0f32, 1.0, a.shape(), &Device::Cpu).unwrap();
        let ga = (&a * &wt).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&b * &wt).unwrap().sum_all().unwrap().backward().unwrap();
        for (k, v) in vars.iter().enumerate() {
            let (ga, gb) = (ga.get(v.as_tensor()).unwrap(), gb.get(v.as_tensor()).unwrap());
            let e = rel_l2(gb, ga).unwrap();
            assert!(e < 1e-5, "var {k} {:?}: [B, S] vs [B] gradient {e}", v.shape());
        }
    }
}

#[test]
fn ti2v_full_mode_grads_and_checkpointing_with_per_token_timesteps() {
    grads_and_checkpointing(&ti2v("diffusers"), &ti2v_inputs());
}

#[test]
fn ti2v_lora_grads_reach_adapters_with_per_token_timesteps() {
    let i = ti2v_inputs();
    let mut m = WanTransformer::open(&ti2v("diffusers"), DType::F32, &Device::Cpu).unwrap();
    let base = run(&m, &i);
    m.attach_lora(&LoraConfig { rank: 4, alpha: 4.0, ..Default::default() }).unwrap();
    assert_eq!(base.flatten_all().unwrap().to_vec1::<f32>().unwrap(), run(&m, &i).flatten_all().unwrap().to_vec1::<f32>().unwrap());
    let vars = m.trainable_vars(TrainMode::Lora).unwrap();
    let g = run(&m, &i).sqr().unwrap().sum_all().unwrap().backward().unwrap();
    for (k, v) in vars.iter().enumerate().filter(|(k, _)| k % 2 == 1) {
        let s = g.get(v.as_tensor()).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(s.is_finite() && s > 0.0, "up var {k}: |grad| = {s}");
    }
}

#[test]
fn wrong_timestep_shapes_are_errors() {
    let i = ti2v_inputs();
    let m = WanTransformer::open(&ti2v("diffusers"), DType::F32, &Device::Cpu).unwrap();
    let (x, enc) = (&i["hidden_states"], &i["encoder_hidden_states"]);
    let s = 18;
    let z = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
    for shape in
        [vec![], vec![1], vec![3], vec![s], vec![1, s], vec![2, s + 1], vec![2, s - 1], vec![2, 1], vec![2, s, 1], vec![2, 3, 2, 3]]
    {
        let e = m.forward(x, &z(&shape), enc).err().unwrap_or_else(|| panic!("timestep {shape:?} was accepted"));
        let msg = e.to_string();
        assert!(msg.contains("timestep") && msg.contains("[2, 18]"), "{shape:?}: {msg}");
    }
    assert!(m.prepare(x, &z(&[2, 17]), enc).is_err());
    assert!(m.forward(x, &z(&[2]), enc).is_ok() && m.forward(x, &z(&[2, s]), enc).is_ok());
}

#[test]
fn cli_forward_per_token_timesteps() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let v = common::model::forward_matches(&ti2v("diffusers"), &ti2v("forward.safetensors"), &out, "wan22");
    assert_eq!(v["report"]["output_shape"], serde_json::json!([2, 48, 3, 4, 6]));
    // A timestep that is neither [B] nor [B, S] is the inputs' fault: exit 6, no panic.
    let mut i = ti2v_inputs();
    i.insert("timestep".into(), Tensor::zeros((2, 17), DType::F32, &Device::Cpu).unwrap());
    let bad = dir.path().join("bad.safetensors");
    candle_core::safetensors::save(&i, &bad).unwrap();
    let o = common::run(&[
        Path::new("--json"),
        Path::new("forward"),
        Path::new("--model"),
        &ti2v("diffusers"),
        Path::new("--inputs"),
        &bad,
        Path::new("--out"),
        &out,
    ]);
    assert_eq!(o.code, Some(6), "{}", o.both());
    assert!(o.both().contains("timestep") && !o.panicked(), "{}", o.both());
}
