//! `phasekit::safetensors::parse` on arbitrary bytes.
//!
//! Every input either fails with a one-line, non-internal error, or parses; a parsed header is
//! planned again with `phasekit::safetensors::plan` (the official writer's order and padding), the
//! data copied tensor by tensor into that order, and the result must parse back to the same
//! tensors (name, dtype, shape, bytes) and the same `__metadata__`.
#![no_main]

use std::collections::BTreeMap;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use phasekit::safetensors::{parse, plan, Planned};

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.safetensors");
    let h = match parse(path, data) {
        Ok(h) => h,
        Err(e) => {
            assert_ne!(e.kind(), phasekit::Kind::Internal, "internal error on input: {e}");
            assert!(!e.to_string().contains(['\n', '\r']), "multi-line error: {e:?}");
            return;
        }
    };
    // Parsed headers obey the rules: sorted, contiguous from 0, exactly covering the data.
    let mut at = 0u64;
    for t in &h.tensors {
        assert_eq!(t.begin, at, "tensor '{}' not contiguous", t.name);
        at = t.end;
    }
    assert_eq!(h.data_start + at, data.len() as u64, "data does not end at EOF");

    let bytes_of = |begin: u64, end: u64| &data[(h.data_start + begin) as usize..(h.data_start + end) as usize];
    let original: BTreeMap<&str, (&phasekit::DType, &Vec<u64>, &[u8])> =
        h.tensors.iter().map(|t| (t.name.as_str(), (&t.dtype, &t.shape, bytes_of(t.begin, t.end)))).collect();
    assert_eq!(original.len(), h.tensors.len(), "duplicate names were accepted");

    let planned: Vec<Planned> = h.tensors.iter().map(|t| Planned { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone() }).collect();
    let p = plan(planned, h.metadata.as_deref()).expect("a parsed header can be planned again");
    assert_eq!(p.bytes.len() % 8, 0, "planned header not padded to 8 bytes");
    let mut out = p.bytes.clone();
    for (t, (b, e)) in p.order.iter().zip(&p.offsets) {
        let src = original[t.name.as_str()].2;
        assert_eq!((e - b) as usize, src.len(), "planned size of '{}' differs from the parsed one", t.name);
        out.extend_from_slice(src);
    }
    assert_eq!(out.len() as u64, p.file_len());

    let again = parse(path, &out).expect("a planned file parses");
    assert_eq!(again.metadata, h.metadata, "__metadata__ changed");
    assert_eq!(again.tensors.len(), h.tensors.len());
    for t in &again.tensors {
        let (dtype, shape, bytes) = original[t.name.as_str()];
        assert_eq!(&t.dtype, dtype, "dtype of '{}'", t.name);
        assert_eq!(&t.shape, shape, "shape of '{}'", t.name);
        assert_eq!(&out[(again.data_start + t.begin) as usize..(again.data_start + t.end) as usize], bytes, "bytes of '{}'", t.name);
    }
});
