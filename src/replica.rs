//! Tensor lists of the real teachers at full size, and replica files built from them.
//!
//! A replica has every tensor name and shape of the real checkpoint; its data is a hole in a
//! sparse file (zeros that cost no disk), so memory and speed can be measured at real scale
//! (40.9 GB for Qwen-Image, 28.6 GB for a Wan2.2 A14B expert) on a small machine. Zeros run
//! faster than real data (sparse reads come from the zero page, and some kernels skip zeros), so
//! speed measurements use seeded random values instead ([`random_fill`]), which cost the full
//! size on disk ([`free_space`] says whether it fits).

use std::path::Path;

use crate::dtype::DType;
use crate::error::Result;
use crate::progress::Progress;
use crate::write::{Data, Metadata, Options, Tensor};

/// Which real model to replicate (the variant docs are `bench replica`'s help).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Model {
    /// Qwen-Image transformer, 1933 tensors, 20.4B parameters (diffusers names).
    QwenImage,
    /// One Wan2.2 T2V-A14B expert, 1095 tensors, 14.3B parameters (original names).
    WanT2vA14b,
    /// One Wan2.2 I2V-A14B expert (36 input channels).
    WanI2vA14b,
    /// Wan2.2 TI2V-5B.
    WanTi2v5b,
    /// Wan2.1 T2V-14B: the tensors of a Wan2.2 T2V-A14B expert (name the file or folder
    /// `Wan2.1-…` so that `inspect` tells them apart).
    #[value(name = "wan2.1-t2v-14b")]
    Wan21T2v14b,
}

fn lin(v: &mut Vec<(String, Vec<u64>)>, name: &str, out: u64, inp: u64) {
    v.push((format!("{name}.weight"), vec![out, inp]));
    v.push((format!("{name}.bias"), vec![out]));
}

/// Names and shapes (torch order) of a model's tensors, in module order.
pub fn tensors(m: Model) -> Vec<(String, Vec<u64>)> {
    match m {
        Model::QwenImage => qwen_image(60),
        Model::WanT2vA14b | Model::Wan21T2v14b => wan(5120, 13824, 40, 16, 16),
        Model::WanI2vA14b => wan(5120, 13824, 40, 36, 16),
        Model::WanTi2v5b => wan(3072, 14336, 30, 48, 48),
    }
}

/// Qwen-Image (diffusers / ComfyUI names) with `layers` blocks.
pub fn qwen_image(layers: usize) -> Vec<(String, Vec<u64>)> {
    let (d, ff, txt) = (3072u64, 12288u64, 3584u64);
    let mut v = Vec::new();
    lin(&mut v, "img_in", d, 64);
    lin(&mut v, "txt_in", d, txt);
    v.push(("txt_norm.weight".into(), vec![txt]));
    lin(&mut v, "time_text_embed.timestep_embedder.linear_1", d, 256);
    lin(&mut v, "time_text_embed.timestep_embedder.linear_2", d, d);
    for i in 0..layers {
        let p = format!("transformer_blocks.{i}");
        lin(&mut v, &format!("{p}.img_mod.1"), 6 * d, d);
        lin(&mut v, &format!("{p}.txt_mod.1"), 6 * d, d);
        for n in ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"] {
            lin(&mut v, &format!("{p}.attn.{n}"), d, d);
        }
        for n in ["norm_q", "norm_k", "norm_added_q", "norm_added_k"] {
            v.push((format!("{p}.attn.{n}.weight"), vec![128]));
        }
        for s in ["img_mlp", "txt_mlp"] {
            lin(&mut v, &format!("{p}.{s}.net.0.proj"), ff, d);
            lin(&mut v, &format!("{p}.{s}.net.2"), d, ff);
        }
    }
    lin(&mut v, "norm_out.linear", 2 * d, d);
    lin(&mut v, "proj_out", 64, d);
    v
}

/// A Wan2.2 transformer (original names).
pub fn wan(dim: u64, ffn: u64, layers: usize, in_dim: u64, out_dim: u64) -> Vec<(String, Vec<u64>)> {
    let mut v = vec![("patch_embedding.weight".to_string(), vec![dim, in_dim, 1, 2, 2]), ("patch_embedding.bias".to_string(), vec![dim])];
    lin(&mut v, "text_embedding.0", dim, 4096);
    lin(&mut v, "text_embedding.2", dim, dim);
    lin(&mut v, "time_embedding.0", dim, 256);
    lin(&mut v, "time_embedding.2", dim, dim);
    lin(&mut v, "time_projection.1", 6 * dim, dim);
    for i in 0..layers {
        let p = format!("blocks.{i}");
        v.push((format!("{p}.modulation"), vec![1, 6, dim]));
        for a in ["self_attn", "cross_attn"] {
            for n in ["q", "k", "v", "o"] {
                lin(&mut v, &format!("{p}.{a}.{n}"), dim, dim);
            }
            v.push((format!("{p}.{a}.norm_q.weight"), vec![dim]));
            v.push((format!("{p}.{a}.norm_k.weight"), vec![dim]));
        }
        v.push((format!("{p}.norm3.weight"), vec![dim]));
        v.push((format!("{p}.norm3.bias"), vec![dim]));
        lin(&mut v, &format!("{p}.ffn.0"), ffn, dim);
        lin(&mut v, &format!("{p}.ffn.2"), dim, ffn);
    }
    lin(&mut v, "head.head", out_dim * 4, dim);
    v.push(("head.modulation".into(), vec![1, 2, dim]));
    v
}

/// Fills one tensor's bytes (given its name).
pub type Fill<'a> = &'a mut dyn FnMut(&str, &mut [u8]);

/// Write a safetensors file with these tensors in `dtype`. With `fill = None` the data is a
/// hole (a sparse file); otherwise `fill(name, bytes)` writes each tensor's bytes, tensor after
/// tensor in the file's order.
pub fn write(path: &Path, tensors: &[(String, Vec<u64>)], dtype: DType, fill: Option<Fill>) -> Result<u64> {
    let md = vec![("format".to_string(), "pt".to_string())];
    let fill = fill.map(std::cell::RefCell::new);
    let out: Vec<Tensor> = tensors
        .iter()
        .map(|(n, s)| match &fill {
            None => Tensor::new(n.clone(), dtype, s.clone(), Data::Zeros),
            Some(f) => Tensor::streamed(n.clone(), dtype, s.clone(), move |sink| {
                let size = crate::dtype::numel(s).and_then(|k| dtype.byte_size(k)).unwrap_or(0);
                let mut buf = vec![0u8; size as usize];
                let mut fill = f.borrow_mut();
                (*fill)(n, &mut buf);
                sink.write(&buf)
            }),
        })
        .collect();
    let out = crate::write::safetensors(path, out, Metadata::Fixed(Some(md)), &Options::default(), &Progress::hidden())?;
    Ok(out.commit()?.iter().map(|w| w.bytes).sum())
}

/// Seeded random tensor bytes for [`write`] of `tensors`: values N(0, std²), or N(1, std²) for
/// 1-D norm scales (weights whose name contains `norm`: real RMSNorm / LayerNorm scales sit near 1), encoded in
/// `dtype` (a float type phasekit encodes: bf16, f16, f32, f64, fp8). The same seed gives the same
/// bytes whatever the thread count: every chunk of 2²⁰ elements of a tensor has its own generator,
/// seeded from `seed`, the tensor's name and the chunk's index, and chunks fill in parallel.
pub fn random_fill(seed: u64, std: f32, dtype: DType, tensors: &[(String, Vec<u64>)]) -> Result<impl FnMut(&str, &mut [u8])> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 20;
    let size = dtype
        .size()
        .filter(|_| dtype.is_castable_float())
        .ok_or_else(|| crate::error::Error::unsupported(format!("random replica values cannot be written as {dtype}")))?;
    let scales: std::collections::HashSet<String> =
        tensors.iter().filter(|(n, s)| s.len() == 1 && n.contains("norm") && n.ends_with(".weight")).map(|(n, _)| n.clone()).collect();
    Ok(move |name: &str, buf: &mut [u8]| {
        // FNV-1a of the name: a stable per-tensor stream.
        let named = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
        let mean = if scales.contains(name) { 1.0 } else { 0.0 };
        buf.par_chunks_mut(CHUNK * size).enumerate().for_each(|(k, out)| {
            let mut rng = crate::rng::Rng::new(seed ^ named.rotate_left(17) ^ (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let n = out.len() / size;
            let mut v = vec![0f32; n];
            // Box–Muller, two values per pair of uniforms.
            for pair in v.chunks_mut(2) {
                let u1 = ((rng.next_u64() >> 40) + 1) as f32 / (1u64 << 24) as f32;
                let u2 = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
                let r = (-2.0 * u1.ln()).sqrt() * std;
                let (s, c) = (std::f32::consts::TAU * u2).sin_cos();
                pair[0] = mean + r * c;
                if let Some(x) = pair.get_mut(1) {
                    *x = mean + r * s;
                }
            }
            crate::cast::encode_f32(dtype, &v, out).expect("dtype checked above");
        });
    })
}

/// Bytes free for an unprivileged writer on the file system holding `dir`.
pub fn free_space(dir: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| crate::error::Error::usage(format!("path {} has a NUL byte", dir.display())))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // Safety: `c` is a NUL-terminated path and `st` a writable statvfs the call fills.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(crate::error::Error::io(dir, std::io::Error::last_os_error()));
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Bytes of data a replica of `tensors` in `dtype` holds (without its header).
pub fn data_bytes(tensors: &[(String, Vec<u64>)], dtype: DType) -> u64 {
    tensors.iter().map(|(_, s)| crate::dtype::numel(s).and_then(|k| dtype.byte_size(k)).unwrap_or(0)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(v: &[(String, Vec<u64>)]) -> u64 {
        v.iter().map(|(_, s)| s.iter().product::<u64>()).sum()
    }

    #[test]
    fn real_counts() {
        let q = tensors(Model::QwenImage);
        assert_eq!((q.len(), params(&q)), (1933, 20_430_401_088));
        let w = tensors(Model::WanT2vA14b);
        assert_eq!((w.len(), params(&w)), (1095, 14_288_491_584));
    }

    /// A weight of three fill chunks (2²⁰ elements each, the last one short), a norm scale and a
    /// norm bias.
    fn small() -> Vec<(String, Vec<u64>)> {
        vec![
            ("blocks.0.ffn.0.weight".into(), vec![1536, 2048]),
            ("blocks.0.norm3.weight".into(), vec![4096]),
            ("blocks.0.norm3.bias".into(), vec![4096]),
        ]
    }

    fn filled(seed: u64, std: f32, dtype: DType, name: &str, numel: usize) -> Vec<u8> {
        let mut f = random_fill(seed, std, dtype, &small()).unwrap();
        let mut buf = vec![0u8; numel * dtype.size().unwrap()];
        f(name, &mut buf);
        buf
    }

    fn values(dtype: DType, bytes: &[u8]) -> Vec<f32> {
        let mut v = vec![0f32; bytes.len() / dtype.size().unwrap()];
        crate::cast::decode_f32(dtype, bytes, &mut v, 1.0).unwrap();
        v
    }

    /// Mean, standard deviation and the fraction within one standard deviation of the mean, in f64.
    fn stats(v: &[f32]) -> (f64, f64, f64) {
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let sd = (v.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / n).sqrt();
        let within = v.iter().filter(|&&x| (f64::from(x) - mean).abs() < sd).count() as f64 / n;
        (mean, sd, within)
    }

    #[test]
    fn random_values_are_seeded_normal_and_scaled_like_weights() {
        let n = 1536 * 2048;
        let a = filled(7, 0.02, DType::F32, "blocks.0.ffn.0.weight", n);
        let (mean, sd, within) = stats(&values(DType::F32, &a));
        // N(0, 0.02²): the mean within 5 standard errors, the deviation within 1 %, and the share
        // within one σ that of a normal (68.27 %; a uniform would give 57.7 %).
        assert!(mean.abs() < 5.0 * 0.02 / (n as f64).sqrt(), "{mean}");
        assert!((sd / 0.02 - 1.0).abs() < 0.01, "{sd}");
        assert!((within - 0.6827).abs() < 0.003, "{within}");
        // Chunks have their own streams (not one chunk repeated).
        let c = (1 << 20) * 4;
        assert_ne!(a[..c], a[c..2 * c]);
        // Same seed, same bytes; another seed or another tensor name, other bytes.
        assert_eq!(a, filled(7, 0.02, DType::F32, "blocks.0.ffn.0.weight", n));
        assert_ne!(a, filled(8, 0.02, DType::F32, "blocks.0.ffn.0.weight", n));
        assert_ne!(a, filled(7, 0.02, DType::F32, "blocks.0.ffn.2.weight", n));
        // Norm scales sit at 1, their biases at 0.
        let (m, sd, _) = stats(&values(DType::F32, &filled(1, 0.02, DType::F32, "blocks.0.norm3.weight", 4096)));
        assert!((m - 1.0).abs() < 5.0 * 0.02 / 64.0 && (sd / 0.02 - 1.0).abs() < 0.05, "{m} {sd}");
        let (m, _, _) = stats(&values(DType::F32, &filled(1, 0.02, DType::F32, "blocks.0.norm3.bias", 4096)));
        assert!(m.abs() < 5.0 * 0.02 / 64.0, "{m}");
    }

    /// Other dtypes hold the f32 values rounded to them; non-float dtypes are refused.
    #[test]
    fn random_values_in_the_replica_dtype() {
        let n = 4096;
        let f32s = values(DType::F32, &filled(3, 0.02, DType::F32, "blocks.0.norm3.bias", n));
        for dt in [DType::BF16, DType::F16, DType::F64, DType::F8E4M3, DType::F8E5M2] {
            let mut want = vec![0u8; n * dt.size().unwrap()];
            crate::cast::encode_f32(dt, &f32s, &mut want).unwrap();
            assert_eq!(filled(3, 0.02, dt, "blocks.0.norm3.bias", n), want, "{dt}");
        }
        for dt in [DType::I32, DType::U8, DType::Bool] {
            assert!(random_fill(0, 0.02, dt, &small()).is_err(), "{dt}");
        }
    }

    /// A random replica costs its size on disk, the sparse one almost nothing; both have the
    /// same header and size.
    #[test]
    fn random_replica_costs_disk_and_sparse_does_not() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let t = wan(256, 512, 2, 16, 16);
        let need = data_bytes(&t, DType::BF16);
        assert_eq!(need, 2 * t.iter().map(|(_, s)| s.iter().product::<u64>()).sum::<u64>());
        let (sparse, random) = (d.path().join("sparse.safetensors"), d.path().join("random.safetensors"));
        let a = write(&sparse, &t, DType::BF16, None).unwrap();
        let mut fill = random_fill(0, 0.02, DType::BF16, &t).unwrap();
        let b = write(&random, &t, DType::BF16, Some(&mut fill)).unwrap();
        assert_eq!(a, b);
        let (ms, mr) = (std::fs::metadata(&sparse).unwrap(), std::fs::metadata(&random).unwrap());
        assert_eq!(ms.len(), mr.len());
        assert!(mr.blocks() * 512 >= need, "{} blocks for {need} bytes", mr.blocks());
        assert!(ms.blocks() * 512 < need / 4, "{} blocks", ms.blocks());
        let free = free_space(d.path()).unwrap();
        assert!(free > 0);
        assert!(free_space(&d.path().join("missing")).is_err());
    }
}
