//! The element-wise ops of `src/ops/` (norm + modulation, RoPE, gated residual, GELU-tanh) against
//! the unfused candle composition they replace, values and gradients, through both fused
//! implementations: the single-pass CPU one, and the CUDA kernels of `kernels/*.cu` run on the CPU
//! by the emulator (`kernels/emu/ops_emu.cpp`, built here; `tests/emu_support`).
//!
//! Inputs are random (seeded). The reference is the composition computed in f32 (f64 for f64) on
//! the same values; each case uses the loss `Σ y·G` with a random `G` and compares the output and
//! the gradient of every input by relative L2. Bounds: f64 1e-12, f32 1e-5, f16 2e-3, bf16 1e-2.
//! Shapes cross the kernels' vector width (rows of 40 and of 37 elements: 16-byte loads and scalar
//! ones) and every broadcast the models use: modulation per sample `[B, 1, d]`, per token
//! `[B, S, d]`, for all `[d]`.

mod emu_support;

use candle_core::{DType, Device, Tensor, Var};
use phasekit::ops::fused::Impl;
use phasekit::ops::{gated, gelu, norm, rope};
use phasekit::rng::Rng;

fn randn(rng: &mut Rng, shape: &[usize], std: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = rng.normals_f32(n).into_iter().map(|x| x * std).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    assert_eq!(a.len(), b.len());
    if a.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}

fn bound(dt: DType) -> f64 {
    match dt {
        DType::F64 => 1e-12,
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        _ => 1e-2,
    }
}

/// Output and gradients of `Σ f(inputs)·g` with respect to every input.
fn run(inputs: &[Tensor], g: &Tensor, f: &dyn Fn(&[Tensor]) -> Tensor) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts);
    let wide = if y.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
    let grads = (y.to_dtype(wide).unwrap() * g.to_dtype(wide).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
    let gs = vars.iter().map(|v| grads.get(v.as_tensor()).expect("a gradient for every input").clone()).collect();
    (y, gs)
}

/// Compare `fused` (through both implementations) with `reference` on `inputs` cast to `dts`
/// (the reference sees the same values in f32, or f64). Returns the worst error.
fn compare(
    name: &str,
    inputs: &[Tensor],
    dts: &[DType],
    fused: &dyn Fn(&[Tensor], Impl) -> Tensor,
    reference: &dyn Fn(&[Tensor]) -> Tensor,
) -> f64 {
    let typed: Vec<Tensor> = inputs.iter().zip(dts).map(|(t, dt)| t.to_dtype(*dt).unwrap()).collect();
    let wide = if dts[0] == DType::F64 { DType::F64 } else { DType::F32 };
    let exact: Vec<Tensor> = typed.iter().map(|t| t.to_dtype(wide).unwrap()).collect();
    let probe = fused(&typed, Impl::Composed);
    let mut rng = Rng::new(99);
    let g = randn(&mut rng, probe.dims(), 1.0);
    let (y_ref, g_ref) = run(&exact, &g, reference);
    // A 16-bit input or output rounds what flows through it, values and gradients alike.
    let b = dts.iter().map(|d| bound(*d)).fold(bound(probe.dtype()), f64::max);
    let mut worst: f64 = 0.0;
    let imps: &[Impl] = if emu_support::emulator().is_some() { &[Impl::Auto, Impl::Kernels] } else { &[Impl::Auto] };
    for &imp in imps {
        if imp == Impl::Kernels && dts.iter().chain([&probe.dtype()]).any(|d| *d == DType::F64) {
            continue; // the kernels take f32, bf16 and f16; f64 runs the composed path
        }
        let (y, gs) = run(&typed, &g, &|t| fused(t, imp));
        assert_eq!(y.dtype(), probe.dtype(), "{name}: output dtype");
        assert_eq!(y.dims(), y_ref.dims(), "{name}: output shape");
        let mut errs = vec![rel(&y, &y_ref)];
        for (i, (a, r)) in gs.iter().zip(&g_ref).enumerate() {
            assert_eq!(a.dtype(), typed[i].dtype(), "{name}: gradient {i} dtype");
            errs.push(rel(a, r));
        }
        let e = errs.iter().cloned().fold(0.0, f64::max);
        eprintln!(
            "{name:<44} {:<8} {:?} y {:.1e} grads {:?}",
            imp.name(),
            dts[0],
            errs[0],
            errs[1..].iter().map(|e| format!("{e:.1e}")).collect::<Vec<_>>()
        );
        assert!(e <= b, "{name} ({}): errors {errs:?} above {b:e}", imp.name());
        worst = worst.max(e);
    }
    worst
}

const DTYPES: [DType; 4] = [DType::F64, DType::F32, DType::F16, DType::BF16];

#[test]
fn norm_with_affine_and_modulation_matches_composition() {
    let mut rng = Rng::new(1);
    // (b, s, d): 40 takes the 16-byte path, 37 the scalar one.
    for (b, s, d) in [(2, 9, 40), (1, 13, 37)] {
        let x = (randn(&mut rng, &[b, s, d], 1.0) + 0.3).unwrap();
        let w = (randn(&mut rng, &[d], 0.2) + 1.0).unwrap();
        let bias = randn(&mut rng, &[d], 0.1);
        for kind in [norm::Kind::Layer, norm::Kind::Rms] {
            for dt in DTYPES {
                for (mname, mshape) in
                    [("none", None), ("per sample", Some(vec![b, 1, d])), ("per token", Some(vec![b, s, d])), ("all", Some(vec![d]))]
                {
                    for affine in 0..3 {
                        let mut inputs = vec![x.clone()];
                        if affine > 0 {
                            inputs.push(w.clone());
                        }
                        if affine > 1 {
                            inputs.push(bias.clone());
                        }
                        if let Some(ms) = &mshape {
                            inputs.push(randn(&mut rng, ms, 0.3));
                            inputs.push(randn(&mut rng, ms, 0.3));
                        }
                        fn spec(t: &[Tensor], kind: norm::Kind, affine: usize) -> (norm::Norm<'_>, usize) {
                            let mut n = if kind == norm::Kind::Layer { norm::Norm::layer(1e-6) } else { norm::Norm::rms(1e-6) };
                            n = n.weight(if affine > 0 { Some(&t[1]) } else { None }).bias(if affine > 1 { Some(&t[2]) } else { None });
                            (n, 1 + affine)
                        }
                        let fused = |t: &[Tensor], imp: Impl| {
                            let (mut n, k) = spec(t, kind, affine);
                            if mshape.is_some() {
                                n = n.modulate(&t[k], &t[k + 1]);
                            }
                            norm::norm_with(&t[0], &n, imp).unwrap()
                        };
                        let reference = |t: &[Tensor]| {
                            let (mut n, k) = spec(t, kind, affine);
                            if mshape.is_some() {
                                n = n.modulate(&t[k], &t[k + 1]);
                            }
                            norm::composed(&t[0], &n).unwrap()
                        };
                        let dts = vec![dt; inputs.len()];
                        compare(&format!("norm {kind:?} d{d} affine {affine} mod {mname}"), &inputs, &dts, &fused, &reference);
                    }
                }
            }
        }
    }
}

#[test]
fn norm_writes_a_narrower_output_from_an_f32_residual() {
    // Wan's and Qwen's norm1: an f32 residual stream in, bf16 (or f16) activations out, with
    // f32 modulation.
    let mut rng = Rng::new(2);
    let (b, s, d) = (2, 11, 48);
    let inputs = [randn(&mut rng, &[b, s, d], 1.0), randn(&mut rng, &[b, 1, d], 0.3), randn(&mut rng, &[b, 1, d], 0.3)];
    for out in [DType::BF16, DType::F16] {
        let fused =
            |t: &[Tensor], imp: Impl| norm::norm_with(&t[0], &norm::Norm::layer(1e-6).modulate(&t[1], &t[2]).out(out), imp).unwrap();
        let reference = |t: &[Tensor]| norm::composed(&t[0], &norm::Norm::layer(1e-6).modulate(&t[1], &t[2])).unwrap();
        let e = compare(&format!("norm f32 -> {out:?}"), &inputs, &[DType::F32; 3], &fused, &reference);
        // The output is rounded once; the gradients stay f32 (inputs are f32).
        assert!(e < bound(out), "{e}");
    }
}

#[test]
fn rope_matches_composition_for_wan_and_qwen_tables() {
    let mut rng = Rng::new(3);
    // Wan: head 16 split into 3-D axes over a 2×3×2 grid; Qwen: axes [4, 6, 6] with centred rows,
    // image and text tables (src/model/rope.rs).
    let wan = phasekit::model::rope::wan(16, 2, 3, 2, &Device::Cpu).unwrap();
    let (qimg, qtxt) = phasekit::model::rope::qwen([4, 6, 6], 1, 3, 4, 5, &Device::Cpu).unwrap();
    let head8 = phasekit::model::rope::wan(8, 1, 1, 12, &Device::Cpu).unwrap();
    // Head size 6: rows of 6 elements take the kernels' pair-at-a-time path.
    let head6 = phasekit::model::rope::wan(6, 1, 2, 3, &Device::Cpu).unwrap();
    for (name, tables, h, d) in [
        ("wan 3-D", &wan, 3, 16),
        ("qwen image", &qimg, 2, 16),
        ("qwen text", &qtxt, 4, 16),
        ("head 8", &head8, 5, 8),
        ("head 6", &head6, 3, 6),
    ] {
        let s = tables.cos.dim(0).unwrap();
        for dt in DTYPES {
            for layout in ["bshd", "bhsd"] {
                let x = randn(&mut rng, &[2, s, h, d], 1.0);
                let (c, sn) = (tables.cos.clone(), tables.sin.clone());
                let view = move |t: &Tensor| {
                    if layout == "bhsd" {
                        t.transpose(1, 2).unwrap().contiguous().unwrap().transpose(1, 2).unwrap()
                    } else {
                        t.clone()
                    }
                };
                let fused = |t: &[Tensor], imp: Impl| rope::rope_with(&view(&t[0]), &c, &sn, imp).unwrap();
                let reference = |t: &[Tensor]| rope::composed(&t[0], &c, &sn).unwrap();
                compare(&format!("rope {name} {layout}"), &[x], &[dt], &fused, &reference);
            }
        }
    }
}

#[test]
fn gated_residual_matches_composition() {
    let mut rng = Rng::new(4);
    for (b, s, d) in [(2, 7, 24), (1, 10, 13)] {
        let x = randn(&mut rng, &[b, s, d], 1.0);
        let y = randn(&mut rng, &[b, s, d], 1.0);
        for (gname, gshape) in
            [("none", None), ("per sample", Some(vec![b, 1, d])), ("per token", Some(vec![b, s, d])), ("all", Some(vec![1, 1, d]))]
        {
            // (x dtype, y dtype): the models' f32 residual with a bf16/f16 branch, and same-dtype pairs.
            for (xd, yd) in [
                (DType::F64, DType::F64),
                (DType::F32, DType::F32),
                (DType::F32, DType::BF16),
                (DType::F32, DType::F16),
                (DType::BF16, DType::BF16),
                (DType::F16, DType::F16),
            ] {
                let mut inputs = vec![x.clone(), y.clone()];
                let mut dts = vec![xd, yd];
                if let Some(gs) = &gshape {
                    inputs.push(randn(&mut rng, gs, 0.5));
                    dts.push(if xd == DType::F64 { DType::F64 } else { DType::F32 });
                }
                let has = gshape.is_some();
                let fused = |t: &[Tensor], imp: Impl| gated::gated_with(&t[0], &t[1], if has { Some(&t[2]) } else { None }, imp).unwrap();
                let reference = |t: &[Tensor]| gated::composed(&t[0], &t[1], if has { Some(&t[2]) } else { None }).unwrap();
                compare(&format!("gated d{d} gate {gname} y {yd:?}"), &inputs, &dts, &fused, &reference);
            }
        }
    }
}

#[test]
fn gelu_matches_composition() {
    let mut rng = Rng::new(5);
    // 3·8·40 elements take the 16-byte path, 3·7·13 the scalar one; values out to ±6.
    for shape in [[3, 8, 40], [3, 7, 13]] {
        let x = randn(&mut rng, &shape, 2.0);
        // Not f64: candle's own f64 GELU backward uses rounded constants (2e-7 off); the f64 path
        // is checked against the formula in `gelu_matches_the_tanh_formula_in_f64`.
        for dt in [DType::F32, DType::F16, DType::BF16] {
            compare(&format!("gelu {shape:?}"), std::slice::from_ref(&x), &[dt], &|t, imp| gelu::gelu_with(&t[0], imp).unwrap(), &|t| {
                gelu::composed(&t[0]).unwrap()
            });
        }
    }
}

#[test]
fn gelu_matches_the_tanh_formula_in_f64() {
    // Independent of candle: the formula and its derivative written out here, at f64.
    let v: Vec<f64> = (-60..=60).map(|i| i as f64 / 10.0).collect();
    let x = Var::from_tensor(&Tensor::from_vec(v.clone(), v.len(), &Device::Cpu).unwrap()).unwrap();
    let y = gelu::gelu_with(x.as_tensor(), Impl::Auto).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    let dy = g.get(x.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
    let k = (2.0 / std::f64::consts::PI).sqrt();
    for (i, xv) in v.iter().enumerate() {
        let t = (k * (xv + 0.044715 * xv.powi(3))).tanh();
        let want = 0.5 * xv * (1.0 + t);
        let dwant = 0.5 * (1.0 + t) + 0.5 * xv * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * xv * xv);
        assert!((y.to_vec1::<f64>().unwrap()[i] - want).abs() < 1e-14, "gelu({xv})");
        assert!((dy[i] - dwant).abs() < 1e-13, "gelu'({xv}): {} vs {dwant}", dy[i]);
    }
}

#[test]
fn emulated_kernels_agree_across_schedules_and_write_every_element() {
    // The kernels use no shared memory or barriers, so warps are independent: every schedule must
    // give the same bits. Outputs start as NaN in the emulator, so an element no thread writes
    // would show up as NaN.
    if emu_support::emulator().is_none() {
        return;
    }
    let mut rng = Rng::new(6);
    let x = randn(&mut rng, &[3, 21, 64], 1.0).to_dtype(DType::BF16).unwrap();
    let (sh, sc) = (randn(&mut rng, &[3, 1, 64], 0.3), randn(&mut rng, &[3, 1, 64], 0.3));
    let mut outs = Vec::new();
    for schedule in [0, 1, 2] {
        phasekit::ops::fused::emu::set_schedule(schedule);
        let y = norm::norm_with(&x, &norm::Norm::layer(1e-6).modulate(&sh, &sc).out(DType::F32), Impl::Kernels).unwrap();
        outs.push(y.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    phasekit::ops::fused::emu::set_schedule(0);
    assert!(outs[0].iter().all(|v| v.is_finite()));
    assert_eq!(outs[0], outs[1]);
    assert_eq!(outs[0], outs[2]);
}

#[test]
fn inference_builds_no_graph_and_odd_inputs_fall_back() {
    let mut rng = Rng::new(7);
    let x = randn(&mut rng, &[2, 5, 8], 1.0);
    for y in [
        norm::norm(&x, &norm::Norm::rms(1e-6)).unwrap(),
        gelu::gelu(&x).unwrap(),
        gated::gated(&x, &x, None).unwrap(),
        rope::rope(
            &x.reshape((2, 5, 2, 4)).unwrap(),
            &Tensor::ones((5, 2), DType::F32, &Device::Cpu).unwrap(),
            &Tensor::zeros((5, 2), DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap(),
    ] {
        assert!(!y.track_op());
    }
    // A modulation that broadcasts over the batch but not the rows ([1, S, d] against [B, S, d])
    // is not a row grouping: the composed path takes it, with the same result.
    let sh = randn(&mut rng, &[1, 5, 8], 0.3);
    let sc = randn(&mut rng, &[1, 5, 8], 0.3);
    let n = norm::Norm::layer(1e-6).modulate(&sh, &sc);
    assert!(rel(&norm::norm_with(&x, &n, Impl::Auto).unwrap(), &norm::composed(&x, &n).unwrap()) == 0.0);
    // Bad tables are an error, not a panic.
    let bad = rope::rope(
        &x.reshape((2, 5, 2, 4)).unwrap(),
        &Tensor::ones((4, 2), DType::F32, &Device::Cpu).unwrap(),
        &Tensor::ones((4, 2), DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(bad.unwrap_err().to_string().contains("cos and sin"));
    assert!(gated::gated(&x, &x.narrow(1, 0, 4).unwrap(), None).is_err());
}
