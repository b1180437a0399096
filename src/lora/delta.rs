//! The LoRA update in f32: `W += scale · up · down`, with `scale = α / rank` (times a strength).
//!
//! One implementation for every consumer: `lora merge`, `LoraModule::dense_f32`, MoE assembly
//! with `--merge-lora`, export of LoRA experts as full weights, and the MoE loader
//! (`crate::moe::loader`) for runtimes.

use rayon::prelude::*;

use crate::error::{Error, Kind, Result};

/// One LoRA pair in f32: delta = scale · up[out×r] · down[r×in].
pub struct Lora {
    pub down: Vec<f32>,
    pub up: Vec<f32>,
    pub rank: usize,
    pub out: usize,
    pub inn: usize,
    pub scale: f32,
}

impl Lora {
    pub fn new(down: Vec<f32>, down_shape: &[u64], up: Vec<f32>, up_shape: &[u64], alpha: Option<f32>) -> Result<Lora> {
        let rank = *down_shape.first().unwrap_or(&0) as usize;
        if rank == 0 || up_shape.len() < 2 || up_shape[1] as usize != rank {
            return Err(Error::new(Kind::Inconsistent, format!("LoRA shapes down {down_shape:?} and up {up_shape:?} do not share a rank")));
        }
        let out = up_shape[0] as usize;
        let inn = down.len() / rank;
        let scale = alpha.unwrap_or(rank as f32) / rank as f32;
        Ok(Lora { down, up, rank, out, inn, scale })
    }
}

/// w[out×in] += scale · up · down, rows in parallel (f32 accumulation, as Lightning's merge).
pub fn apply_lora_delta(w: &mut [f32], shape: &[u64], l: &Lora) -> Result<()> {
    if w.len() != l.out * l.inn || shape.first().copied() != Some(l.out as u64) {
        return Err(Error::new(Kind::Inconsistent, format!("LoRA of {}×{} does not fit a weight of shape {shape:?}", l.out, l.inn)));
    }
    w.par_chunks_mut(l.inn).enumerate().for_each(|(o, row)| {
        for k in 0..l.rank {
            let u = l.up[o * l.rank + k] * l.scale;
            if u != 0.0 {
                let d = &l.down[k * l.inn..(k + 1) * l.inn];
                row.iter_mut().zip(d).for_each(|(x, &y)| *x += u * y);
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_matches_float64_reference() {
        let (out, rank, inn) = (5usize, 3usize, 7usize);
        let v = |n: usize, s: u64| -> Vec<f32> { (0..n as u64).map(|i| (((i * 2654435761 + s) % 1000) as f32 - 500.0) / 250.0).collect() };
        let (down, up, base) = (v(rank * inn, 1), v(out * rank, 2), v(out * inn, 3));
        let l = Lora::new(down.clone(), &[rank as u64, inn as u64], up.clone(), &[out as u64, rank as u64], Some(6.0)).unwrap();
        assert_eq!(l.scale, 2.0);
        let mut w = base.clone();
        apply_lora_delta(&mut w, &[out as u64, inn as u64], &l).unwrap();
        for o in 0..out {
            for i in 0..inn {
                let d: f64 = (0..rank).map(|k| up[o * rank + k] as f64 * down[k * inn + i] as f64).sum();
                let want = base[o * inn + i] as f64 + 2.0 * d;
                assert!((w[o * inn + i] as f64 - want).abs() <= 1e-5 * want.abs().max(1.0), "[{o}, {i}]");
            }
        }
        // Shapes that do not fit are errors, not panics.
        assert!(Lora::new(down.clone(), &[rank as u64, inn as u64], up.clone(), &[out as u64, rank as u64 + 1], None).is_err());
        assert!(apply_lora_delta(&mut vec![0.0; out * inn + 1], &[out as u64, inn as u64], &l).is_err());
    }
}
