//! Custom ops that own their backward pass (DESIGN decision 9).
//!
//! Each op is one module with a portable implementation that runs on every device and is the
//! reference in tests, plus, behind the `cuda` feature, a fused kernel compiled to PTX at build
//! time (`kernels/*.cu`, `build.rs`) where one exists. `docs/ops.md` says what each path
//! computes, how it is checked and why it was built the way it was.
//!
//! - [`attention`]: scaled dot-product attention in O(S) memory (online softmax forward,
//!   log-sum-exp saved, recomputing backward), for self, cross and masked joint attention;
//! - [`linear`]: multiplication by a frozen weight in its storage dtype, with the input's
//!   gradient only;
//! - [`graft`]: a node for a value computed without a graph, with its own backward (what keeps
//!   a composed layer from holding all its intermediates);
//! - [`checkpoint`]: activation checkpointing, a block recomputed in the backward pass;
//! - the element-wise ops of the transformer blocks, each computed in f32 in one pass and keeping
//!   only its inputs (and two values per row) for the backward pass: [`norm`] (LayerNorm /
//!   RMSNorm with affine weights and modulation), [`rope`] (rotary embedding), [`gated`] (gated
//!   residual add), [`gelu`] (GELU-tanh); [`fused`] has what they share (CPU, CUDA-kernel and
//!   emulated-kernel implementations, and the composed reference).

pub mod attention;
pub mod bench;
pub mod checkpoint;
pub mod ew_bench;
pub mod fused;
pub mod gated;
pub mod gelu;
pub mod graft;
#[cfg(feature = "cuda")]
pub(crate) mod kernels;
pub mod linear;
pub mod norm;
pub mod rope;
