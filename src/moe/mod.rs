//! The routed mixture-of-experts checkpoint (DESIGN decisions 6 and 7; spec in `docs/moe-format.md`).
//!
//! One valid safetensors file (or a sharded set with a standard index) holds every expert of a
//! few-step student, the σ routing table, provenance and integrity data:
//!
//! - [`format`]: tensor naming and the `__metadata__` schema, versioned `phasekit.moe/1`;
//! - [`routing`]: σ ranges that cover (0, 1] without gaps or overlaps, the sampler's timesteps;
//! - [`digest`]: the canonical metadata digest (specified in words in the docs);
//! - [`manifest`]: the trainer's run manifest (`phasekit.run/1`), written by `train`, read by `assemble --run`;
//! - [`assemble`]: experts (full weights or LoRA) → one checkpoint, streaming and hashing;
//! - [`verify`]: every tensor hash recomputed in parallel, routing edits, structural faults;
//! - [`pack`]: lossless zstd with byte planes for 16-bit floats;
//! - [`export`]: the per-expert files runtimes load today (ComfyUI, diffusers, LoRA, GGUF);
//! - [`loader`]: [`loader::MoeCheckpoint`], a lazy mmap loader that routes by σ;
//! - [`cli`]: argument types and run functions of `assemble`, `pack`, `unpack`, `export`.

pub mod assemble;
pub mod boundary;
pub mod cli;
pub mod digest;
pub mod export;
pub mod format;
pub mod lightx2v;
pub mod loader;
pub mod manifest;
pub mod pack;
pub mod routing;
pub mod verify;

pub use format::FORMAT_TAG;
pub use loader::MoeCheckpoint;
pub use routing::Routing;
