//! ggml block quantisation: dequantize and quantize whole blocks (single-threaded kernels;
//! callers parallelise over chunks of blocks).
//! OWNER: gguf/quant helper — being written.

pub mod types;
pub use types::GgmlType;
