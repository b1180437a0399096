//! `cargo fuzz run torch_archive`: the torch.save reader (zip directory, restricted unpickler,
//! tensor placement) on arbitrary bytes.
//!
//! Beyond "no panic", for every input the reader accepts: each tensor's byte range lies inside
//! the input and holds exactly shape × dtype bytes, and parsing the same bytes again gives the
//! same tensors.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use phasekit::pytorch::torch;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.pt");
    let Ok(parsed) = torch::parse(path, "archive", data, 0) else {
        return;
    };
    let Ok(loaded) = torch::tensors(path, "archive", &parsed) else {
        return;
    };
    for t in &loaded.tensors {
        let end = t.offset.checked_add(t.len).expect("range overflows");
        assert!(end <= data.len() as u64, "tensor {} outside the input", t.name);
        let numel = t.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).expect("shape overflows");
        assert_eq!(t.dtype.byte_size(numel), Some(t.len), "tensor {} length", t.name);
    }
    let again = torch::tensors(path, "archive", &torch::parse(path, "archive", data, 0).expect("parses twice")).expect("reads twice");
    assert_eq!(again.tensors, loaded.tensors);
});
