//! The collectives a run's ranks share ([`Communicator`]), the one-rank communicator, and the
//! helpers the transports share.

use std::sync::Arc;

use candle_core::Tensor;

type CResult<T> = candle_core::Result<T>;

/// Collectives over the ranks of one run. Every rank calls the same collectives in the same
/// order with the same shapes.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Name of the transport (`single`, `tcp`, `nccl`).
    fn backend(&self) -> &'static str;
    /// Replace every tensor by its element-wise mean over the ranks (the same bits on every rank).
    fn all_reduce_mean(&self, ts: &mut [Tensor]) -> CResult<()>;
    /// Rank 0's bytes, on every rank.
    fn broadcast(&self, bytes: &mut Vec<u8>) -> CResult<()>;
    /// Every rank's value, in rank order, on every rank.
    fn all_gather_u64(&self, v: u64) -> CResult<Vec<u64>>;
}

/// The communicator of a one-rank run: every collective returns its input.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleRank;

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "single"
    }
    fn all_reduce_mean(&self, _ts: &mut [Tensor]) -> CResult<()> {
        Ok(())
    }
    fn broadcast(&self, _bytes: &mut Vec<u8>) -> CResult<()> {
        Ok(())
    }
    fn all_gather_u64(&self, v: u64) -> CResult<Vec<u64>> {
        Ok(vec![v])
    }
}

/// The one-rank communicator, shared.
pub fn single() -> Arc<dyn Communicator> {
    Arc::new(SingleRank)
}

/// Little-endian bytes of f32 values.
pub(crate) fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A transport failure as a candle error (the collectives run inside tensor code).
pub(crate) fn dist_err(msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("dist: {msg}"))
}
