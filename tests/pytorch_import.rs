//! PyTorch checkpoints written by torch itself (`tests/fixtures/pytorch/make.py`): torch.save
//! archives and torch.distributed.checkpoint folders read through the real binary, every tensor
//! compared byte for byte with the same tensors saved by the `safetensors` package.

mod common;

use std::path::{Path, PathBuf};

use common::{read_model, read_safetensors, run, run_ok, s};
use serde_json::Value;

fn fx(rel: &str) -> PathBuf {
    common::tests_dir("fixtures").join(rel)
}

fn inspect(p: &Path) -> Value {
    serde_json::from_str(&run_ok(&["--json", "inspect", &s(p)]).stdout).expect("inspect JSON")
}

#[test]
fn state_dict_pt_reads_as_the_safetensors_it_came_from() {
    let pt = fx("pytorch/wan_state_dict.pt");
    let v = inspect(&pt);
    assert_eq!(v["format"], "pytorch (torch.save)");
    assert_eq!(v["detection"]["family"], "wan22");
    assert_eq!(v["detection"]["layout"], "diffusers");
    assert_eq!(v["tensors"], 69);
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("wan.safetensors");
    run_ok(&["convert", &s(&pt), &s(&out)]);
    common::assert_same_tensors(&read_model(&out), &read_model(&fx("wan22_t2v_tiny/diffusers")), "torch.save → safetensors");
    // Through the layout rules too: diffusers names → Wan's own.
    let orig = d.path().join("orig.safetensors");
    run_ok(&["convert", &s(&pt), &s(&orig), "--layout", "original"]);
    common::assert_same_tensors(&read_model(&orig), &read_model(&fx("wan22_t2v_tiny/original")), "torch.save → original layout");
    // And cast: bf16 values are the f32 values rounded.
    let bf = d.path().join("bf16.safetensors");
    run_ok(&["convert", &s(&pt), &s(&bf), "--dtype", "bf16"]);
    let want = read_model(&fx("wan22_t2v_tiny/diffusers"));
    for (k, t) in read_model(&bf) {
        assert_eq!(t.dtype, "BF16", "{k}");
        let src = &want[&k].data;
        for (i, c) in t.data.chunks_exact(2).enumerate() {
            let x = f32::from_le_bytes(src[4 * i..4 * i + 4].try_into().unwrap());
            assert_eq!(c, half::bf16::from_f32(x).to_le_bytes(), "{k}[{i}]");
        }
    }
}

#[test]
fn every_dtype_views_parameters_and_plain_values() {
    let pth = fx("pytorch/dtypes.pth");
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("dtypes.safetensors");
    run_ok(&["convert", &s(&pth), &s(&out)]);
    let got = read_safetensors(&out).tensors;
    let want = read_safetensors(&fx("pytorch/dtypes.safetensors")).tensors;
    common::assert_same_tensors(&got, &want, "dtypes.pth");
    for (name, dtype) in
        [("model.w_fp8_e4m3", "F8_E4M3"), ("model.w_fp8_e5m2", "F8_E5M2"), ("model.w_bf16", "BF16"), ("model.steps_i64", "I64")]
    {
        assert_eq!(got[name].dtype, dtype);
    }
    assert_eq!(got["model.scalar_f32"].shape, Vec::<u64>::new(), "0-d tensor");
    let v = inspect(&pth);
    let values: Vec<(String, String)> = serde_json::from_value(v["pytorch"]["values"].clone()).unwrap();
    assert_eq!(values, vec![("step".into(), "7".into()), ("lr".into(), "0.0001".into()), ("name".into(), "'tiny'".into())]);
    let notes = v["pytorch"]["notes"].to_string();
    assert!(notes.contains("2 tensors are views"), "{notes}");
}

#[test]
fn views_torch_cannot_express_as_a_range_and_old_formats_are_refused() {
    let o = run(&["inspect", &s(&fx("pytorch/noncontig.pt"))]);
    assert_eq!(o.code, Some(7), "{}", o.both());
    assert!(o.stderr.contains("tensor 't' is a non-contiguous view") && o.stderr.contains("noncontig.pt"), "{}", o.stderr);
    let o = run(&["inspect", &s(&fx("pytorch/legacy.pt"))]);
    assert_eq!(o.code, Some(7), "{}", o.both());
    assert!(o.stderr.contains("legacy torch.save"), "{}", o.stderr);
}

#[test]
fn dcp_folders_single_and_sharded() {
    let d = tempfile::tempdir().unwrap();
    // One process: the model subtree, served in place, without its `model.` prefix.
    let single = fx("pytorch/dcp_single");
    let v = inspect(&single);
    assert_eq!(v["format"], "pytorch (torch.distributed.checkpoint)");
    assert_eq!(v["detection"]["family"], "wan22");
    assert!(v["pytorch"]["notes"].to_string().contains("skipped 2 tensors"), "{}", v["pytorch"]);
    let out = d.path().join("single.safetensors");
    run_ok(&["convert", &s(&single), &s(&out)]);
    common::assert_same_tensors(&read_model(&out), &read_model(&fx("wan22_t2v_tiny/diffusers")), "dcp_single");
    // Two ranks, tensors sharded on dimension 0 and 1, replicated, one shard empty: chunks tiled
    // back together equal torch's own dcp_to_torch_save.
    let sharded = fx("pytorch/dcp_sharded");
    let out = d.path().join("sharded.safetensors");
    let o = run_ok(&["convert", &s(&sharded), &s(&out)]);
    assert!(o.stdout.contains("69 tensors"), "{}", o.stdout);
    common::assert_same_tensors(&read_model(&out), &read_model(&fx("pytorch/dcp_sharded.safetensors")), "dcp_sharded");
    run_ok(&["verify", &s(&sharded)]);
}

#[test]
fn assemble_takes_pytorch_experts() {
    let d = tempfile::tempdir().unwrap();
    // A .pt expert and a DCP expert whose weights differ from it (the DCP folder is the same
    // model: perturbing is done by converting one of them to bf16 first).
    let bf = d.path().join("bf16.safetensors");
    run_ok(&["convert", &s(&fx("pytorch/dcp_sharded")), &s(&bf), "--dtype", "bf16"]);
    let out = d.path().join("moe.safetensors");
    run_ok(&[
        "assemble",
        "--expert",
        &s(&fx("pytorch/wan_state_dict.pt")),
        "--sigma-range",
        "0.875:1",
        "--expert",
        &s(&bf),
        "--sigma-range",
        "0:0.875",
        "--steps",
        "4",
        "--shift",
        "5",
        "--dtype",
        "f32",
        "-o",
        &s(&out),
    ]);
    run_ok(&["verify", &s(&out)]);
    // Expert 0 is the .pt's tensors as they are.
    let f = read_safetensors(&out);
    let want = read_model(&fx("wan22_t2v_tiny/diffusers"));
    for (k, t) in &want {
        let stored =
            f.tensors.get(&format!("experts.0.{k}")).or_else(|| f.tensors.get(&format!("shared.{k}"))).unwrap_or_else(|| panic!("{k}"));
        assert_eq!(stored.data, t.data, "{k}");
    }
}
