//! Data parallelism: ranks, one [`Communicator`] per process, and the gradient all-reduce the
//! optimiser calls before every update.
//!
//! Every trainer step goes through a communicator, also with one rank ([`SingleRank`], whose
//! collectives return their input untouched, so a one-rank run is bit-identical to a run without
//! this module). With several ranks, each process trains on its own batches (its own seed,
//! `seed + rank`) from the same initial weights; the gradients of the trainable variables are
//! averaged across ranks before clipping and the AdamW step, so every rank takes the same update
//! and the weights stay equal on every rank. Only rank 0 writes the run folder.
//!
//! Transports:
//! - [`TcpComm`] (`tcp.rs`): CPU tensors over TCP (star around rank 0): rank 0 sums the ranks' values in
//!   rank order and sends the mean back, so the result is reproducible and the same bits on
//!   every rank. It is for CPU runs (tests, CPU clusters) and carries the NCCL unique id.
//! - `NcclComm` (`nccl.rs`, `--features nccl`): CUDA tensors through NCCL (cudarc), all-reduced on the GPU
//!   (decision 8 of DESIGN.md: GPUs talk NCCL, never a home-made transport).
//!
//! Ranks come from the usual variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//! `MASTER_PORT`, as torchrun and `srun` wrappers set them) or `--rendezvous tcp://HOST:PORT` /
//! `--rendezvous file:PATH`; see `docs/scale.md`.

mod comm;
mod config;
#[cfg(feature = "nccl")]
mod nccl;
mod tcp;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};

use self::comm::f32_bytes;
pub use self::comm::{single, Communicator, SingleRank};
pub use self::config::{parse_rendezvous, DistConfig, Rendezvous, DEFAULT_TIMEOUT_S};
pub use self::tcp::TcpComm;
use crate::error::{Error, Result};

type CResult<T> = candle_core::Result<T>;
/// What a data-parallel run reports about this rank (`train --json`: `summary.dist`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct DistReport {
    pub rank: usize,
    pub world_size: usize,
    pub backend: String,
    /// sha256 over the digests of the experts this process finished (the same on every rank).
    pub weights_sha256: String,
}

/// sha256 of named tensors (names, then values as little-endian f32).
pub fn tensors_digest(t: &[(String, Tensor)]) -> CResult<String> {
    let mut buf = Vec::new();
    for (n, x) in t {
        buf.extend_from_slice(n.as_bytes());
        buf.push(0);
        buf.extend(f32_bytes(&x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?));
    }
    Ok(crate::hash::sha256_hex(&buf))
}

/// Average the gradients `gs` of `vars` over the ranks, in place, before an optimiser step.
/// With several ranks a variable without a gradient on some rank counts as a zero gradient
/// there; it keeps no gradient only if no rank has one (so AdamW skips it on every rank alike).
pub fn reduce_grads(comm: &dyn Communicator, vars: &[Var], gs: &mut [Option<Tensor>]) -> CResult<()> {
    if comm.world_size() == 1 {
        return comm.all_reduce_mean(&mut []);
    }
    let dev = vars.first().map(|v| v.device().clone()).unwrap_or(Device::Cpu);
    let present: Vec<f32> = gs.iter().map(|g| if g.is_some() { 1.0 } else { 0.0 }).collect();
    let mut ts = Vec::with_capacity(gs.len() + 1);
    ts.push(Tensor::from_vec(present, gs.len(), &dev)?);
    for (v, g) in vars.iter().zip(gs.iter()) {
        ts.push(match g {
            Some(g) => g.clone(),
            None => Tensor::zeros(v.shape(), v.dtype(), v.device())?,
        });
    }
    comm.all_reduce_mean(&mut ts)?;
    let any = ts[0].to_vec1::<f32>()?;
    for (i, t) in ts.into_iter().skip(1).enumerate() {
        gs[i] = (any[i] > 0.0).then_some(t);
    }
    Ok(())
}

/// Connect this rank to the others per `cfg`, for tensors on `device`: one rank needs nothing;
/// several ranks use TCP for CPU tensors and NCCL (`--features nccl`) for CUDA tensors.
pub fn connect(cfg: &DistConfig, device: &Device) -> Result<Arc<dyn Communicator>> {
    if cfg.world_size == 1 {
        return Ok(single());
    }
    match device {
        Device::Cpu => Ok(Arc::new(TcpComm::connect(cfg)?)),
        #[cfg(feature = "nccl")]
        Device::Cuda(d) => Ok(Arc::new(nccl::NcclComm::connect(cfg, d)?)),
        _ => {
            Err(Error::unsupported("several ranks on a GPU need NCCL: rebuild with `--features nccl` (the TCP transport is for CPU runs)"))
        }
    }
}
