//! phasekit: import, convert, distill and package few-step diffusion models.
//!
//! Data flows one way: **read** (mmap readers for safetensors, sharded indexes and GGUF) →
//! **map** (layout rules from `formats/*.toml`) → **write** (streaming safetensors / GGUF
//! writers into temporary files renamed when complete). See `docs/guide.md`.

pub mod atomic;
pub mod bench;
pub mod cast;
pub mod convert;
pub mod device;
pub mod dtype;
pub mod error;
pub mod gguf;
pub mod hash;
pub mod inspect;
pub mod layout;
pub mod lora;
pub mod model;
pub mod moe;
pub mod ops;
pub mod progress;
pub mod quant;
pub mod replica;
pub mod safetensors;
pub mod store;
pub mod train;
pub mod verify;
pub mod writeback;

pub use dtype::DType;
pub use error::{Error, Kind, Result};
