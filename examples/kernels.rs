//! Single-thread kernel throughput (cast, quantize) on in-memory buffers.
use std::time::Instant;
fn main() {
    let n = 64 << 20; // elements
    let src: Vec<u8> = (0..n).flat_map(|i| half::bf16::from_f32(((i as f32) * 0.001).sin() * 0.05).to_le_bytes()).collect();
    let mut dst = vec![0u8; n * 2];
    for _ in 0..2 {
        let t = Instant::now();
        phasekit::cast::cast(phasekit::DType::BF16, &src, phasekit::DType::F16, &mut dst, 1.0).unwrap();
        let s = t.elapsed().as_secs_f64();
        println!("bf16->f16 cast: {:.2} GB/s (input bytes)", (n * 2) as f64 / 1e9 / s);
    }
    let mut f = vec![0f32; n];
    let t = Instant::now();
    phasekit::cast::decode_f32(phasekit::DType::BF16, &src, &mut f, 1.0).unwrap();
    println!("bf16->f32 decode: {:.2} GB/s", (n * 2) as f64 / 1e9 / t.elapsed().as_secs_f64());
    for q in ["Q8_0", "Q4_0", "Q4_K", "Q6_K"] {
        let g = phasekit::quant::GgmlType::parse(q).unwrap();
        let mut out = vec![0u8; n / g.block_size() as usize * g.type_size() as usize];
        let t = Instant::now();
        phasekit::quant::quantize(g, &f, &mut out).unwrap();
        println!("{q} quantize: {:.2} GB/s (bf16-equivalent input bytes)", (n * 2) as f64 / 1e9 / t.elapsed().as_secs_f64());
    }
}
