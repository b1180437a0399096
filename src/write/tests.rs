//! One input through every path of the writer: every kind of [`Data`], official and source
//! layouts, one file and shards, hashes while writing and after; read back with the official
//! `safetensors` crate and compared with its own writer.

use std::collections::HashMap;

use super::*;
use crate::store::SourceFile;

fn bytes(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32).map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed.wrapping_mul(40503)) >> 11) as u8).collect()
}

/// A source file of `len` bytes that holds `data` at `at` and holes elsewhere.
fn source(dir: &Path, name: &str, len: u64, at: u64, data: &[u8]) -> SourceFile {
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).unwrap();
    f.set_len(len).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(data).unwrap();
    drop(f);
    SourceFile::open(&p).unwrap()
}

/// A tensor as the official reader sees it: dtype, shape, bytes.
type Seen = (String, Vec<usize>, Vec<u8>);

/// The official reader's view: tensors by name, and the metadata.
fn read_back(p: &Path) -> (HashMap<String, Seen>, Option<HashMap<String, String>>) {
    let all = std::fs::read(p).unwrap();
    let (_, meta) = ::safetensors::SafeTensors::read_metadata(&all).unwrap();
    let st = ::safetensors::SafeTensors::deserialize(&all).unwrap();
    let tensors = st.tensors().into_iter().map(|(n, v)| (n, (format!("{:?}", v.dtype()), v.shape().to_vec(), v.data().to_vec()))).collect();
    (tensors, meta.metadata().clone())
}

#[test]
fn every_kind_of_data_reads_back_with_the_official_crate() {
    let d = tempfile::tempdir().unwrap();
    let mapped = bytes(3 << 20, 1);
    let src = source(d.path(), "src", 8 << 20, 4096, &mapped);
    let small = bytes(24, 2);
    let computed = bytes(40, 3);
    let streamed = bytes(2 << 20, 4);
    for (hash, tensor_hashes) in [(FileHash::None, false), (FileHash::WhileWriting, false), (FileHash::AfterWriting, true)] {
        let s2 = streamed.clone();
        let c2 = computed.clone();
        let tensors = vec![
            Tensor::mapped("m", DType::BF16, vec![1024, 1536], 0, &src, 4096, mapped.len() as u64),
            Tensor::new("b", DType::F32, vec![2, 3], Data::Bytes(small.as_slice().into())),
            Tensor::computed("c", DType::U8, vec![40], move || Ok(c2)),
            Tensor::new("z", DType::F16, vec![3 << 19], Data::Zeros),
            Tensor::new("e", DType::F64, vec![0], Data::Bytes(Vec::new().into())),
        ];
        let mut tensors = tensors;
        if !tensor_hashes {
            tensors.push(Tensor::streamed("s", DType::I8, vec![2 << 20], move |sink| {
                sink.write(&s2[..1000])?;
                sink.write(&s2[1000..])
            }));
        }
        let out = d.path().join("out.safetensors");
        let md = vec![("format".to_string(), "pt".to_string())];
        let opts = Options { file_hash: hash, tensor_hashes, ..Options::default() };
        let o = safetensors(&out, tensors, Metadata::Fixed(Some(md)), &opts, &Progress::hidden()).unwrap();
        assert!(!out.exists(), "nothing under the final name before the commit");
        let hashes = o.hashes.clone();
        let w = o.commit().unwrap();
        let (t, meta) = read_back(&out);
        assert_eq!(t["m"], ("BF16".into(), vec![1024, 1536], mapped.clone()));
        assert_eq!(t["b"], ("F32".into(), vec![2, 3], small.clone()));
        assert_eq!(t["c"].2, computed);
        assert_eq!(t["z"].2, vec![0u8; 3 << 20]);
        assert_eq!(t["e"].2, Vec::<u8>::new());
        if !tensor_hashes {
            assert_eq!(t["s"].2, streamed);
        }
        assert_eq!(meta.unwrap()["format"], "pt");
        let file = std::fs::read(&out).unwrap();
        assert_eq!(w[0].bytes, file.len() as u64);
        match hash {
            FileHash::None => assert!(w[0].sha256.is_none() && !crate::hash::sidecar_path(&out).exists()),
            _ => {
                assert_eq!(w[0].sha256.as_deref(), Some(crate::hash::sha256_hex(&file).as_str()));
                assert!(crate::hash::check_sidecar(&crate::hash::sidecar_path(&out), &|_| {}).unwrap()[0].ok);
            }
        }
        if tensor_hashes {
            assert_eq!(hashes.len(), 5);
            for (n, h) in &hashes {
                assert_eq!(h, &crate::hash::sha256_hex(&t[n].2), "{n}");
            }
        }
        std::fs::remove_file(&out).unwrap();
        let _ = std::fs::remove_file(crate::hash::sidecar_path(&out));
    }
}

#[test]
fn official_layout_is_the_official_writers_bytes() {
    let d = tempfile::tempdir().unwrap();
    type Case = (String, ::safetensors::Dtype, DType, Vec<usize>, Vec<u8>);
    let data: Vec<Case> = vec![
        ("b.weight".into(), ::safetensors::Dtype::BF16, DType::BF16, vec![4, 3], bytes(24, 5)),
        ("a.weight".into(), ::safetensors::Dtype::F32, DType::F32, vec![5], bytes(20, 6)),
        ("c".into(), ::safetensors::Dtype::U8, DType::U8, vec![3], bytes(3, 7)),
        ("a.bias".into(), ::safetensors::Dtype::F32, DType::F32, vec![1, 2], bytes(8, 8)),
        ("d".into(), ::safetensors::Dtype::F64, DType::F64, vec![2], bytes(16, 9)),
    ];
    let views: Vec<(String, ::safetensors::tensor::TensorView)> =
        data.iter().map(|(n, sd, _, s, b)| (n.clone(), ::safetensors::tensor::TensorView::new(*sd, s.clone(), b).unwrap())).collect();
    let md = HashMap::from([("format".to_string(), "pt".to_string())]);
    let want = ::safetensors::tensor::serialize(views, &Some(md)).unwrap();
    let out = d.path().join("x.safetensors");
    let ts = data
        .iter()
        .map(|(n, _, dt, s, b)| Tensor::new(n.clone(), *dt, s.iter().map(|&x| x as u64).collect(), Data::Bytes(b.as_slice().into())));
    let md = vec![("format".to_string(), "pt".to_string())];
    let n = tensors(&out, ts.collect(), Some(&md)).unwrap();
    let got = std::fs::read(&out).unwrap();
    assert_eq!(n, got.len() as u64);
    assert!(got == want, "phasekit:\n{}\nofficial:\n{}", String::from_utf8_lossy(&got[8..200]), String::from_utf8_lossy(&want[8..200]));
}

#[test]
fn shards_follow_huggingface_and_read_back() {
    let d = tempfile::tempdir().unwrap();
    let parts: Vec<Vec<u8>> = (0..5).map(|i| bytes(1000 * (i + 1), i as u32)).collect();
    let ts = parts
        .iter()
        .enumerate()
        .map(|(i, b)| Tensor::new(format!("t{i}"), DType::U8, vec![b.len() as u64], Data::Bytes(b.as_slice().into())));
    let out = d.path().join("model.safetensors");
    let opts = Options { shard_size: Some(5000), file_hash: FileHash::WhileWriting, ..Options::default() };
    let w = safetensors(&out, ts.collect(), Metadata::Fixed(None), &opts, &Progress::hidden()).unwrap().commit().unwrap();
    // 1000+2000 | 3000 | 4000 | 5000 (huggingface_hub's split), then the index.
    let names: Vec<String> = w.iter().map(|w| w.path.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(
        names,
        [
            "model-00001-of-00004.safetensors",
            "model-00002-of-00004.safetensors",
            "model-00003-of-00004.safetensors",
            "model-00004-of-00004.safetensors",
            "model.safetensors.index.json"
        ]
    );
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(d.path().join("model.safetensors.index.json")).unwrap()).unwrap();
    assert_eq!(index["metadata"]["total_size"], 15000);
    for (i, b) in parts.iter().enumerate() {
        let shard = index["weight_map"][format!("t{i}")].as_str().unwrap();
        let (t, meta) = read_back(&d.path().join(shard));
        assert_eq!(&t[&format!("t{i}")].2, b);
        assert!(meta.is_none());
    }
    for w in &w {
        assert!(crate::hash::check_sidecar(&crate::hash::sidecar_path(&w.path), &|_| {}).unwrap()[0].ok, "{}", w.path.display());
    }
}

#[test]
fn a_producer_of_the_wrong_size_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("bad.safetensors");
    let cases: Vec<Tensor> = vec![
        Tensor::computed("c", DType::F32, vec![3], || Ok(vec![0u8; 8])),
        Tensor::streamed("s", DType::F32, vec![3], |sink| sink.write(&[1u8; 16])),
        Tensor::new("b", DType::F32, vec![3], Data::Bytes(vec![0u8; 4].into())),
    ];
    for t in cases {
        let name = t.name.clone();
        let e = safetensors(&out, vec![t], Metadata::Fixed(None), &Options::default(), &Progress::hidden()).err().expect("must fail");
        assert_eq!(e.kind(), crate::Kind::Internal);
        assert!(e.to_string().contains(&format!("tensor '{name}'")), "{e}");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0, "{name}: a temporary was left");
    }
    // Streamed bytes cannot be hashed one by one.
    let t = Tensor::streamed("s", DType::U8, vec![1], |sink| sink.write(&[1]));
    let opts = Options { tensor_hashes: true, ..Options::default() };
    assert!(safetensors(&out, vec![t], Metadata::Fixed(None), &opts, &Progress::hidden()).is_err());
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
}

/// Data offsets of a written file: name → absolute file offset.
fn offsets(p: &Path) -> HashMap<String, u64> {
    let all = std::fs::read(p).unwrap();
    let h = crate::safetensors::parse(p, &all).unwrap();
    h.tensors.iter().map(|t| (t.name.clone(), h.data_start + t.begin)).collect()
}

#[test]
fn large_copies_land_page_congruent() {
    let d = tempfile::tempdir().unwrap();
    // Two sparse sources (holes cost nothing), tensors at offsets that agree with nothing.
    let a = source(d.path(), "a", 90 << 20, 1008, b"x");
    let b = source(d.path(), "b", 90 << 20, 777 * 8, b"y");
    let mb = 1u64 << 20;
    let specs =
        [(0usize, "a.1", 1000u64 + 8, 20 * mb), (0, "a.0", 1000 + 8 + 20 * mb, 30 * mb), (1, "b.0", 777 * 8, 24 * mb), (1, "b.1", 5, 2)];
    let mk = || {
        let mut v: Vec<Tensor> = specs
            .iter()
            .map(|&(f, n, off, len)| Tensor::mapped(n, DType::U8, vec![len], f, if f == 0 { &a } else { &b }, off, len))
            .collect();
        v.push(Tensor::computed("computed", DType::U8, vec![3], || Ok(vec![1, 2, 3])));
        v
    };
    // Source order with a padded header: one source (a) is congruent, and its two tensors are
    // one run in source order.
    let out = d.path().join("src-order.safetensors");
    let opts = Options { layout: Layout::SourceOrder, ..Options::default() };
    safetensors(&out, mk(), Metadata::Fixed(None), &opts, &Progress::hidden()).unwrap().commit().unwrap();
    let o = offsets(&out);
    assert_eq!(o["a.0"], o["a.1"] + 20 * mb, "source order");
    assert_eq!(o["a.1"] % CONGRUENCE, (1000 + 8) % CONGRUENCE);
    // Padding tensors: every run of copies lands at its source offset modulo 64 KiB.
    let out = d.path().join("padded.safetensors");
    let opts = Options { layout: Layout::PaddingTensors { prefix: "padding." }, ..Options::default() };
    safetensors(&out, mk(), Metadata::Fixed(None), &opts, &Progress::hidden()).unwrap().commit().unwrap();
    let o = offsets(&out);
    for &(_, n, off, len) in &specs {
        if len >= KERNEL_COPY_MIN {
            assert_eq!(o[n] % CONGRUENCE, off % CONGRUENCE, "{n}");
        }
    }
    let pads: Vec<&String> = o.keys().filter(|n| n.starts_with("padding.")).collect();
    assert!(!pads.is_empty());
    let (t, _) = read_back(&out);
    for p in pads {
        assert!(t[p].2.len() as u64 <= MAX_PADDING && t[p].2.iter().all(|&x| x == 0), "{p}");
    }
    assert_eq!(t["a.1"].2[..1], *b"x");
    assert_eq!(t["b.0"].2[..1], *b"y");
    assert_eq!(t["b.1"].2, vec![0, 0]);
    assert_eq!(t["computed"].2, vec![1, 2, 3]);
    // Below the threshold, the official order.
    let out = d.path().join("small.safetensors");
    let small = vec![Tensor::mapped("z", DType::U8, vec![4], 0, &a, 0, 4), Tensor::mapped("y", DType::U8, vec![4], 0, &a, 4, 4)];
    safetensors(&out, small, Metadata::Fixed(None), &opts, &Progress::hidden()).unwrap().commit().unwrap();
    let o = offsets(&out);
    assert!(o["y"] < o["z"]);
}

#[test]
fn metadata_after_hashes_is_rewritten_in_place() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("h.safetensors");
    let data = [bytes(10, 1), bytes(20, 2)];
    let ts = data
        .iter()
        .enumerate()
        .map(|(i, b)| Tensor::new(format!("t{i}"), DType::U8, vec![b.len() as u64], Data::Bytes(b.as_slice().into())));
    let mut f = |h: &Hashes| {
        let mut v: Vec<(String, String)> =
            (0..2).map(|i| (format!("t{i}"), h.get(&format!("t{i}")).cloned().unwrap_or("0".repeat(64)))).collect();
        v.sort();
        v
    };
    let opts = Options { tensor_hashes: true, file_hash: FileHash::AfterWriting, ..Options::default() };
    let w = safetensors(&out, ts.collect(), Metadata::AfterHashes(&mut f), &opts, &Progress::hidden()).unwrap().commit().unwrap();
    let (_, meta) = read_back(&out);
    let meta = meta.unwrap();
    for (i, b) in data.iter().enumerate() {
        assert_eq!(meta[&format!("t{i}")], crate::hash::sha256_hex(b));
    }
    // The sidecar hashes the final file, not the placeholder; a hash while writing would not.
    assert_eq!(w[0].sha256.as_deref(), Some(crate::hash::sha256_hex(&std::fs::read(&out).unwrap()).as_str()));
    let opts = Options { tensor_hashes: true, file_hash: FileHash::WhileWriting, ..Options::default() };
    let t = vec![Tensor::new("t", DType::U8, vec![1], Data::Bytes(vec![1].into()))];
    assert!(safetensors(&d.path().join("x.safetensors"), t, Metadata::AfterHashes(&mut f), &opts, &Progress::hidden()).is_err());
}
