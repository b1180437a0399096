//! Element casts between floating-point dtypes, through f32, with an optional scale.
//!
//! Rounding is round-to-nearest-even everywhere. fp8 encoding saturates to the largest finite
//! value (so `inf` and out-of-range values become ±max, NaN stays NaN), as ComfyUI and
//! PyTorch's scaled-fp8 tooling expect. Kernels work on one slice; callers parallelise.

use half::{bf16, f16, slice::HalfFloatSliceExt};

use crate::dtype::DType;
use crate::error::{Error, Result};

/// Elements converted per inner step (fits comfortably in L1/L2).
const STEP: usize = 4096;

/// An 8-bit float format.
struct Fp8 {
    exp_bits: u32,
    man_bits: u32,
    bias: i32,
    /// Largest finite code (positive).
    max_code: u8,
    nan_code: u8,
    has_inf: bool,
}

const E4M3FN: Fp8 = Fp8 { exp_bits: 4, man_bits: 3, bias: 7, max_code: 0x7e, nan_code: 0x7f, has_inf: false };
const E5M2: Fp8 = Fp8 { exp_bits: 5, man_bits: 2, bias: 15, max_code: 0x7b, nan_code: 0x7e, has_inf: true };

impl Fp8 {
    fn decode(&self, code: u8) -> f32 {
        let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
        let c = code & 0x7f;
        let e = (c >> self.man_bits) as i32;
        let m = (c & ((1 << self.man_bits) - 1)) as f32;
        let emax = (1 << self.exp_bits) - 1;
        if self.has_inf && e == emax {
            return if m == 0.0 { sign * f32::INFINITY } else { f32::NAN };
        }
        if !self.has_inf && c == 0x7f {
            return f32::NAN;
        }
        let scale = (1u32 << self.man_bits) as f32;
        if e == 0 {
            sign * (m / scale) * 2f32.powi(1 - self.bias)
        } else {
            sign * (1.0 + m / scale) * 2f32.powi(e - self.bias)
        }
    }
    fn table(&self) -> [f32; 256] {
        let mut t = [0f32; 256];
        for (c, v) in t.iter_mut().enumerate() {
            *v = self.decode(c as u8);
        }
        t
    }
    /// Round to nearest even, saturating.
    fn encode(&self, table: &[f32; 256], x: f32) -> u8 {
        if x.is_nan() {
            return self.nan_code;
        }
        let sign = if x.is_sign_negative() { 0x80 } else { 0 };
        let a = x.abs();
        let max = table[self.max_code as usize];
        if a >= max {
            return sign | self.max_code;
        }
        // Largest code whose value is <= a (codes 0..=max_code are increasing).
        let (mut lo, mut hi) = (0usize, self.max_code as usize);
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if table[mid] <= a {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        let below = table[lo];
        let above = table[lo + 1];
        let c = if a - below < above - a {
            lo
        } else if a - below > above - a {
            lo + 1
        } else if lo % 2 == 0 {
            lo
        } else {
            lo + 1
        };
        sign | c as u8
    }
}

fn fp8_format(d: DType) -> Option<&'static Fp8> {
    match d {
        DType::F8E4M3 => Some(&E4M3FN),
        DType::F8E5M2 => Some(&E5M2),
        _ => None,
    }
}

fn tables() -> &'static [[f32; 256]; 2] {
    static T: std::sync::OnceLock<[[f32; 256]; 2]> = std::sync::OnceLock::new();
    T.get_or_init(|| [E4M3FN.table(), E5M2.table()])
}

fn table_of(d: DType) -> &'static [f32; 256] {
    &tables()[if d == DType::F8E4M3 { 0 } else { 1 }]
}

/// Largest finite value of an fp8 dtype.
pub fn fp8_max(d: DType) -> Option<f32> {
    fp8_format(d).map(|f| table_of(d)[f.max_code as usize])
}

/// Whether [`cast`] supports `from` → `to`.
pub fn can_cast(from: DType, to: DType) -> bool {
    from == to || (from.is_castable_float() && to.is_castable_float())
}

/// Decode `src` (elements of `dt`) into f32, multiplying by `scale`.
pub fn decode_f32(dt: DType, src: &[u8], dst: &mut [f32], scale: f32) -> Result<()> {
    let sz = dt.size().ok_or_else(|| Error::unsupported(format!("cannot decode {dt} to f32")))?;
    if src.len() != dst.len() * sz {
        return Err(Error::internal(format!("decode_f32: {} bytes for {} elements of {dt}", src.len(), dst.len())));
    }
    match dt {
        DType::F32 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F64 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(8)) {
                *o = f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32;
            }
        }
        DType::BF16 => match bytemuck::try_cast_slice::<u8, u16>(src) {
            // bf16 → f32 is exact: the bits move up 16 places (NaN payloads included). A plain
            // loop the compiler vectorises.
            Ok(s) => {
                for (o, &b) in dst.iter_mut().zip(s) {
                    *o = f32::from_bits(u32::from(u16::from_le(b)) << 16);
                }
            }
            Err(_) => {
                for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        },
        DType::F16 => match bytemuck::try_cast_slice::<u8, f16>(src) {
            Ok(s) => s.convert_to_f32_slice(dst),
            Err(_) => {
                for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        },
        DType::F8E4M3 | DType::F8E5M2 => {
            let t = table_of(dt);
            for (o, &c) in dst.iter_mut().zip(src) {
                *o = t[c as usize];
            }
        }
        _ => return Err(Error::unsupported(format!("cannot decode {dt} to f32"))),
    }
    if scale != 1.0 {
        for v in dst.iter_mut() {
            *v *= scale;
        }
    }
    Ok(())
}

/// Encode f32 values as `dt` (round to nearest even; fp8 saturates).
pub fn encode_f32(dt: DType, src: &[f32], dst: &mut [u8]) -> Result<()> {
    let sz = dt.size().ok_or_else(|| Error::unsupported(format!("cannot encode f32 as {dt}")))?;
    if dst.len() != src.len() * sz {
        return Err(Error::internal(format!("encode_f32: {} bytes for {} elements of {dt}", dst.len(), src.len())));
    }
    match dt {
        DType::F32 => {
            for (c, v) in dst.chunks_exact_mut(4).zip(src) {
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        DType::F64 => {
            for (c, v) in dst.chunks_exact_mut(8).zip(src) {
                c.copy_from_slice(&(*v as f64).to_le_bytes());
            }
        }
        DType::BF16 => match bytemuck::try_cast_slice_mut::<u8, bf16>(dst) {
            Ok(d) => d.convert_from_f32_slice(src),
            Err(_) => {
                for (c, v) in dst.chunks_exact_mut(2).zip(src) {
                    c.copy_from_slice(&bf16::from_f32(*v).to_le_bytes());
                }
            }
        },
        DType::F16 => match bytemuck::try_cast_slice_mut::<u8, f16>(dst) {
            Ok(d) => d.convert_from_f32_slice(src),
            Err(_) => {
                for (c, v) in dst.chunks_exact_mut(2).zip(src) {
                    c.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
                }
            }
        },
        DType::F8E4M3 | DType::F8E5M2 => {
            let f = fp8_format(dt).expect("fp8");
            let t = table_of(dt);
            for (o, &v) in dst.iter_mut().zip(src) {
                *o = f.encode(t, v);
            }
        }
        _ => return Err(Error::unsupported(format!("cannot encode f32 as {dt}"))),
    }
    Ok(())
}

/// Cast `src` (of `from`) into `dst` (of `to`), multiplying by `scale` in f32 first.
/// Same dtype and no scale is a plain copy.
pub fn cast(from: DType, src: &[u8], to: DType, dst: &mut [u8], scale: f32) -> Result<()> {
    if from == to && scale == 1.0 {
        if src.len() != dst.len() {
            return Err(Error::internal("cast: length mismatch"));
        }
        dst.copy_from_slice(src);
        return Ok(());
    }
    if !can_cast(from, to) {
        return Err(Error::unsupported(format!("cannot cast {from} to {to}")));
    }
    let (fs, ts) = (from.size().expect("float"), to.size().expect("float"));
    let n = src.len() / fs;
    if src.len() % fs != 0 || dst.len() != n * ts {
        return Err(Error::internal(format!("cast: {} bytes of {from} into {} bytes of {to}", src.len(), dst.len())));
    }
    let mut buf = [0f32; STEP];
    for (s, d) in src.chunks(STEP * fs).zip(dst.chunks_mut(STEP * ts)) {
        let k = s.len() / fs;
        decode_f32(from, s, &mut buf[..k], scale)?;
        encode_f32(to, &buf[..k], d)?;
    }
    Ok(())
}

/// max |x| over f32 values (NaN ignored).
pub fn amax(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| if x.abs() > m { x.abs() } else { m })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_every_code_round_trips() {
        for dt in [DType::F8E4M3, DType::F8E5M2] {
            let t = table_of(dt);
            for c in 0..=255u8 {
                let v = t[c as usize];
                let mut out = [0u8];
                encode_f32(dt, &[v], &mut out).unwrap();
                if v.is_nan() {
                    assert!(t[out[0] as usize].is_nan());
                } else if v.is_infinite() {
                    assert_eq!(t[out[0] as usize], v.signum() * fp8_max(dt).unwrap());
                } else {
                    assert_eq!(out[0], c, "{dt} code {c:#x} value {v}");
                }
            }
        }
        assert_eq!(fp8_max(DType::F8E4M3), Some(448.0));
        assert_eq!(fp8_max(DType::F8E5M2), Some(57344.0));
    }

    #[test]
    fn fp8_rounds_to_nearest_even_and_saturates() {
        let enc = |dt, x: f32| {
            let mut o = [0u8];
            encode_f32(dt, &[x], &mut o).unwrap();
            table_of(dt)[o[0] as usize]
        };
        // e4m3: 1.0 = 0x38, next is 1.125; midpoint 1.0625 ties to even (1.0).
        assert_eq!(enc(DType::F8E4M3, 1.0625), 1.0);
        // 1.1875 is the midpoint of 1.125 (odd code) and 1.25 (even): goes up.
        assert_eq!(enc(DType::F8E4M3, 1.1875), 1.25);
        assert_eq!(enc(DType::F8E4M3, 1.07), 1.125);
        assert_eq!(enc(DType::F8E4M3, 1e9), 448.0);
        assert_eq!(enc(DType::F8E4M3, -1e9), -448.0);
        assert_eq!(enc(DType::F8E4M3, f32::INFINITY), 448.0);
        // smallest subnormal 2^-9; half of it ties to zero (even).
        assert_eq!(enc(DType::F8E4M3, 2f32.powi(-10)), 0.0);
        assert_eq!(enc(DType::F8E4M3, 2f32.powi(-10) * 1.01), 2f32.powi(-9));
        assert_eq!(enc(DType::F8E5M2, 1e9), 57344.0);
    }

    #[test]
    fn bf16_to_f16_matches_scalar_reference() {
        let vals: Vec<f32> = (0..10_000).map(|i| ((i as f32) * 0.37).sin() * 10f32.powi(i % 9 - 4)).collect();
        let src: Vec<u8> = vals.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect();
        let mut dst = vec![0u8; src.len()];
        cast(DType::BF16, &src, DType::F16, &mut dst, 1.0).unwrap();
        for (i, c) in dst.chunks_exact(2).enumerate() {
            let want = f16::from_f64(bf16::from_le_bytes([src[2 * i], src[2 * i + 1]]).to_f64());
            assert_eq!(f16::from_le_bytes([c[0], c[1]]).to_bits(), want.to_bits());
        }
    }

    #[test]
    fn scale_applied_when_casting_up() {
        let mut q = [0u8; 2];
        encode_f32(DType::F8E4M3, &[1.5, -2.0], &mut q).unwrap();
        let mut out = [0u8; 8];
        cast(DType::F8E4M3, &q, DType::F32, &mut out, 0.5).unwrap();
        assert_eq!(f32::from_le_bytes(out[..4].try_into().unwrap()), 0.75);
        assert_eq!(f32::from_le_bytes(out[4..].try_into().unwrap()), -1.0);
    }
}
