//! PTX of `kernels/*.cu`, compiled by `build.rs` (one constant per file, e.g. [`ATTENTION`]).
//! The driver compiles it for the GPU at first use; each file is loaded as one module whose
//! name is the constant's name.

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
