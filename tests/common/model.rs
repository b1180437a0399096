//! Helpers of the model tests: fixture inputs as candle tensors, and `phasekit forward` through
//! the binary checked against the fixture's diffusers `output`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

/// Every tensor of a safetensors file, on the CPU (read by candle, not by phasekit).
pub fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap_or_else(|e| panic!("load {}: {e}", path.display()))
}

/// `phasekit --json forward --model MODEL --inputs INPUTS --out OUT`: it must succeed, report
/// `family` and a relative L2 error below 1e-5 against the inputs' `output`, and write an f32
/// `output` within 1e-5 of it. Returns the JSON report.
pub fn forward_matches(model: &Path, inputs: &Path, out: &Path, family: &str) -> serde_json::Value {
    let o = super::run(&[
        Path::new("--json"),
        Path::new("forward"),
        Path::new("--model"),
        model,
        Path::new("--inputs"),
        inputs,
        Path::new("--out"),
        out,
    ]);
    assert_eq!(o.code, Some(0), "phasekit forward failed:\n{}", o.both());
    let v: serde_json::Value = serde_json::from_str(o.stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {}", o.stdout));
    assert_eq!(v["report"]["family"], family, "{v}");
    assert!(v["report"]["rel_l2"].as_f64().unwrap() < 1e-5, "{v}");
    let got = load(out);
    let e = phasekit::model::rel_l2(&got["output"], &load(inputs)["output"]).unwrap();
    assert!(e < 1e-5, "written output: relative L2 {e:.3e}");
    v
}
