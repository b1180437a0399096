//! Ops that candle composes badly, each with its own backward pass (DESIGN decision 9): a
//! portable implementation that runs on every device and is the reference in tests, plus, behind
//! `cuda`, a fused path where one exists.

pub mod checkpoint;
pub mod linear;
