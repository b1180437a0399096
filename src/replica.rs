//! Tensor lists of the real teachers at full size, and sparse replica files built from them.
//!
//! A replica has every tensor name and shape of the real checkpoint; its data is a hole in a
//! sparse file (zeros that cost no disk), so memory and speed can be measured at real scale
//! (40.9 GB for Qwen-Image, 28.6 GB for a Wan2.2 A14B expert) on a small machine.

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
}
