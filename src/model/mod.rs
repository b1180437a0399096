//! Teacher architectures in candle (Wan2.2, Qwen-Image) and the pieces they share.
//!
//! Data flows one way: checkpoint (any format/layout, [`crate::store`]) → canonical diffusers
//! names ([`crate::layout`]) → candle tensors → modules. Modules never read whole files.

pub mod lora;
