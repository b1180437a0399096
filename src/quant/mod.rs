//! ggml block quantisation: dequantize and quantize whole blocks.
//!
//! The kernels are single-threaded loops over blocks with no allocation; callers parallelise over
//! chunks of blocks (any split on a block boundary gives the same bytes).
//!
//! Compatibility, checked by `tests/quant_gguf_py.rs` against the PyPI `gguf` package 0.19.0:
//! - [`dequantize`] gives f32 values bit-equal to `gguf.quants.dequantize` for every type gguf-py
//!   implements (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K). Q8_K follows ggml's
//!   `dequantize_row_q8_K`; the integer and F64 types are converted with round-to-nearest-even.
//! - [`quantize`] gives blocks bit-identical to `gguf.quants.quantize` for F32, F16, BF16, Q4_0,
//!   Q4_1, Q5_0, Q5_1 and Q8_0 (see `legacy.rs` for the two numpy corner cases: the sign of a
//!   zero min and non-finite input). For Q2_K..Q6_K, which gguf-py cannot quantise, it follows
//!   ggml's reference `quantize_row_*_ref` (see `kquantize.rs`).

mod dense;
mod kquantize;
mod kquants;
mod legacy;
pub mod types;

pub use dense::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
pub use types::GgmlType;

use crate::error::{Error, Kind, Result};

/// Whether [`dequantize`] handles `t`.
pub fn can_dequantize(t: GgmlType) -> bool {
    use GgmlType::*;
    matches!(t, F32 | F16 | BF16 | F64 | I8 | I16 | I32 | I64 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | Q8_K)
}

/// Whether [`quantize`] handles `t`.
pub fn can_quantize(t: GgmlType) -> bool {
    use GgmlType::*;
    matches!(t, F32 | F16 | BF16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2_K | Q3_K | Q4_K | Q5_K | Q6_K)
}

/// Decode whole blocks of type `t`: `src.len() == n_blocks * t.type_size()` and
/// `dst.len() == n_blocks * t.block_size()`.
///
/// Errors: [`Kind::Unsupported`] for a type without a decoder, [`Kind::Malformed`] when the
/// lengths do not describe whole blocks.
pub fn dequantize(t: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    if !can_dequantize(t) {
        return Err(Error::unsupported(format!("dequantizing {t} is not implemented")));
    }
    let (bs, ts) = (t.block_size() as usize, t.type_size() as usize);
    if src.len() % ts != 0 {
        return Err(Error::new(Kind::Malformed, format!("{t}: {} bytes is not a whole number of {ts}-byte blocks", src.len())));
    }
    let n_blocks = src.len() / ts;
    if n_blocks.checked_mul(bs) != Some(dst.len()) {
        return Err(Error::new(
            Kind::Malformed,
            format!("{t}: {n_blocks} blocks decode to {} values, the output holds {}", n_blocks * bs, dst.len()),
        ));
    }
    use GgmlType::*;
    match t {
        F32 => dense::dequant_f32(src, dst),
        F16 => dense::dequant_f16(src, dst),
        BF16 => dense::dequant_bf16(src, dst),
        F64 => dense::dequant_f64(src, dst),
        I8 => dense::dequant_i8(src, dst),
        I16 => dense::dequant_i16(src, dst),
        I32 => dense::dequant_i32(src, dst),
        I64 => dense::dequant_i64(src, dst),
        Q4_0 => legacy::dequant_q4_0(src, dst),
        Q4_1 => legacy::dequant_q4_1(src, dst),
        Q5_0 => legacy::dequant_q5_0(src, dst),
        Q5_1 => legacy::dequant_q5_1(src, dst),
        Q8_0 => legacy::dequant_q8_0(src, dst),
        Q2_K => kquants::dequant_q2_k(src, dst),
        Q3_K => kquants::dequant_q3_k(src, dst),
        Q4_K => kquants::dequant_q4_k(src, dst),
        Q5_K => kquants::dequant_q5_k(src, dst),
        Q6_K => kquants::dequant_q6_k(src, dst),
        Q8_K => kquants::dequant_q8_k(src, dst),
        _ => return Err(Error::internal(format!("no dequantizer for {t} behind can_dequantize"))),
    }
    Ok(())
}

/// Encode whole blocks of type `t`: `src.len() == n_blocks * t.block_size()` and
/// `dst.len() == n_blocks * t.type_size()`.
///
/// Errors: [`Kind::Unsupported`] for a type without an encoder or an input that is not a whole
/// number of blocks (a row length that is not a multiple of the block size), [`Kind::Malformed`]
/// when the output length does not match.
pub fn quantize(t: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<()> {
    if !can_quantize(t) {
        return Err(Error::unsupported(format!("quantizing to {t} is not implemented")));
    }
    let (bs, ts) = (t.block_size() as usize, t.type_size() as usize);
    if src.len() % bs != 0 {
        return Err(Error::unsupported(format!("{t}: {} values are not a whole number of {bs}-value blocks", src.len())));
    }
    let n_blocks = src.len() / bs;
    if n_blocks.checked_mul(ts) != Some(dst.len()) {
        return Err(Error::new(
            Kind::Malformed,
            format!("{t}: {n_blocks} blocks encode to {} bytes, the output holds {}", n_blocks * ts, dst.len()),
        ));
    }
    use GgmlType::*;
    match t {
        F32 => dense::quant_f32(src, dst),
        F16 => dense::quant_f16(src, dst),
        BF16 => dense::quant_bf16(src, dst),
        Q4_0 => legacy::quant_q4_0(src, dst),
        Q4_1 => legacy::quant_q4_1(src, dst),
        Q5_0 => legacy::quant_q5_0(src, dst),
        Q5_1 => legacy::quant_q5_1(src, dst),
        Q8_0 => legacy::quant_q8_0(src, dst),
        Q2_K => kquantize::quant_q2_k(src, dst),
        Q3_K => kquantize::quant_q3_k(src, dst),
        Q4_K => kquantize::quant_q4_k(src, dst),
        Q5_K => kquantize::quant_q5_k(src, dst),
        Q6_K => kquantize::quant_q6_k(src, dst),
        _ => return Err(Error::internal(format!("no quantizer for {t} behind can_quantize"))),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [GgmlType; 32] = {
        use GgmlType::*;
        [
            F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K, IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, IQ4_NL,
            IQ3_S, IQ2_S, IQ4_XS, I8, I16, I32, I64, F64, IQ1_M, BF16, TQ1_0, TQ2_0, MXFP4,
        ]
    };

    /// A deterministic pseudo-random generator (xorshift32) for test data.
    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.max(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32 - 0.5) * 2.0
            })
            .collect()
    }

    #[test]
    fn length_and_type_errors() {
        let mut out = vec![0f32; 32];
        let e = dequantize(GgmlType::IQ2_XXS, &[0; 66], &mut vec![0f32; 256]).unwrap_err();
        assert_eq!(e.kind(), Kind::Unsupported);
        let e = dequantize(GgmlType::Q8_0, &[0; 33], &mut out).unwrap_err();
        assert_eq!(e.kind(), Kind::Malformed);
        let e = dequantize(GgmlType::Q8_0, &[0; 68], &mut out).unwrap_err();
        assert_eq!(e.kind(), Kind::Malformed);
        let e = quantize(GgmlType::Q4_K, &out, &mut [0u8; 144]).unwrap_err();
        assert_eq!(e.kind(), Kind::Unsupported);
        let e = quantize(GgmlType::Q8_0, &out, &mut [0u8; 35]).unwrap_err();
        assert_eq!(e.kind(), Kind::Malformed);
        let e = quantize(GgmlType::I8, &out, &mut [0u8; 32]).unwrap_err();
        assert_eq!(e.kind(), Kind::Unsupported);
        // Empty input is zero blocks, not an error.
        dequantize(GgmlType::Q4_K, &[], &mut []).unwrap();
        quantize(GgmlType::Q4_K, &[], &mut []).unwrap();
    }

    #[test]
    fn every_type_either_works_or_says_unsupported() {
        for t in ALL {
            let (bs, ts) = (t.block_size() as usize, t.type_size() as usize);
            let src = vec![0x5au8; 3 * ts];
            let mut dst = vec![0f32; 3 * bs];
            match dequantize(t, &src, &mut dst) {
                Ok(()) => assert!(can_dequantize(t)),
                Err(e) => assert!(!can_dequantize(t) && e.kind() == Kind::Unsupported, "{t}: {e}"),
            }
            let x = data(3 * bs, 7);
            let mut q = vec![0u8; 3 * ts];
            match quantize(t, &x, &mut q) {
                Ok(()) => assert!(can_quantize(t)),
                Err(e) => assert!(!can_quantize(t) && e.kind() == Kind::Unsupported, "{t}: {e}"),
            }
        }
    }

    /// Quantise then dequantise: the error per element stays within what the bit width allows
    /// (relative to the block's largest magnitude), and chunked calls give the same bytes.
    #[test]
    fn round_trip_error_bounds() {
        use GgmlType::*;
        // (type, max |error| / max |x| per 256 values)
        let bounds = [
            (F32, 0.0),
            (F16, 1e-3),
            (BF16, 4e-3),
            (Q8_0, 0.005),
            (Q6_K, 0.02),
            (Q5_0, 0.065),
            (Q5_1, 0.035),
            (Q5_K, 0.05),
            (Q4_0, 0.13),
            (Q4_1, 0.07),
            (Q4_K, 0.1),
            (Q3_K, 0.25),
            (Q2_K, 0.5),
        ];
        for (t, bound) in bounds {
            for seed in [1u32, 2, 3] {
                let mut x = data(1024, seed);
                if seed == 2 {
                    // Skewed data: all positive with an outlier.
                    for v in &mut x {
                        *v = v.abs() * 0.1 + 0.3;
                    }
                    x[17] = 3.0;
                }
                if seed == 3 {
                    x[..256].iter_mut().for_each(|v| *v = 0.0);
                }
                let ts = t.type_size() as usize;
                let n_blocks = x.len() / t.block_size() as usize;
                let mut q = vec![0u8; n_blocks * ts];
                quantize(t, &x, &mut q).unwrap();
                let mut y = vec![0f32; x.len()];
                dequantize(t, &q, &mut y).unwrap();
                for (cx, cy) in x.chunks(256).zip(y.chunks(256)) {
                    let amax = cx.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let err = cx.iter().zip(cy).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    if std::env::var_os("PHASEKIT_PRINT_ERR").is_some() {
                        eprintln!("{t} seed {seed}: {}", err / amax.max(1e-30));
                    }
                    assert!(err <= bound * amax.max(1e-30), "{t} seed {seed}: error {err} vs max {amax}");
                }
                // Chunking on a block boundary gives the same blocks.
                let bs = t.block_size() as usize;
                let half = (n_blocks / 2) * bs;
                let mut q2 = vec![0u8; n_blocks * ts];
                let (qa, qb) = q2.split_at_mut(n_blocks / 2 * ts);
                quantize(t, &x[..half], qa).unwrap();
                quantize(t, &x[half..], qb).unwrap();
                assert_eq!(q, q2, "{t}");
            }
        }
    }

    #[test]
    fn hostile_values_do_not_panic() {
        let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN, 1e-45, -1e-45, 0.0, -0.0, 1e30];
        for t in ALL.into_iter().filter(|&t| can_quantize(t)) {
            let bs = t.block_size() as usize;
            for (i, &s) in specials.iter().enumerate() {
                let mut x = data(bs * 2, i as u32 + 1);
                x[i % bs] = s;
                x[bs..].iter_mut().for_each(|v| *v = s);
                let mut q = vec![0u8; 2 * t.type_size() as usize];
                quantize(t, &x, &mut q).unwrap();
                let mut y = vec![0f32; 2 * bs];
                dequantize(t, &q, &mut y).unwrap();
            }
        }
    }
}
