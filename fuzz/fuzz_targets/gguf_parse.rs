//! `cargo fuzz run gguf_parse`: the GGUF reader on arbitrary bytes.
//!
//! Beyond "no panic", for every input the reader accepts: each tensor is a byte range of the
//! input, the writer can re-plan the file, the planned file reads back with the same tensors at
//! the planned offsets, and re-planning what was read gives the same header bytes.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use phasekit::gguf::{self, TensorPlan};

/// Planned files larger than this are checked by their header only.
const MAX_MATERIALISED: u64 = 16 << 20;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.gguf");
    let Ok(f) = gguf::parse(path, data) else {
        return;
    };
    for t in &f.tensors {
        assert!(t.data(data).is_some(), "tensor {} outside the input", t.name);
    }
    let plans: Vec<TensorPlan> = f.tensors.iter().map(TensorPlan::from).collect();
    let p = match gguf::plan(&f.kv, &plans, f.alignment) {
        Ok(p) => p,
        Err(e) => panic!("the reader accepted a file the writer cannot plan: {e}"),
    };
    let mut file = p.header.clone();
    if p.total_len <= MAX_MATERIALISED {
        file.resize(p.total_len as usize, 0);
    } else {
        // A header-only file is valid when there are no tensors; otherwise just re-plan below
        // from what the first pass read.
        file.truncate(p.header.len());
    }
    if p.total_len <= MAX_MATERIALISED || plans.is_empty() {
        let g = match gguf::parse(path, &file) {
            Ok(g) => g,
            Err(e) => panic!("the planned file does not read back: {e}"),
        };
        assert_eq!(g.version, 3);
        assert_eq!(g.alignment, f.alignment);
        assert_eq!(g.data_offset, p.header.len() as u64);
        assert_eq!(g.tensors.iter().map(TensorPlan::from).collect::<Vec<_>>(), plans);
        for (t, off) in g.tensors.iter().zip(&p.offsets) {
            assert_eq!(t.offset, g.data_offset + off);
        }
        let p2 = gguf::plan(&g.kv, &plans, g.alignment).expect("re-plan");
        assert_eq!(p2.header, p.header, "planning is not idempotent");
    }
});
