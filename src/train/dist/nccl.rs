//! NCCL for CUDA tensors; host-side collectives (the unique id, RNG states, digests) over the
//! TCP rendezvous.
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::nccl::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaDevice, CudaStorage, CustomOp1, DType, Layout, Shape, Tensor};

use super::comm::{dist_err, Communicator};
use super::config::DistConfig;
use super::tcp::TcpComm;

type CResult<T> = candle_core::Result<T>;
use crate::error::{Error, Result};

pub struct NcclComm {
    comm: Mutex<Comm>,
    host: TcpComm,
}

// SAFETY: the NCCL communicator is a handle that NCCL lets any thread use as long as calls
// do not overlap; every use goes through the mutex, and the trainer drives it from one thread.
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

impl NcclComm {
    pub fn connect(cfg: &DistConfig, dev: &CudaDevice) -> Result<NcclComm> {
        let host = TcpComm::connect(cfg)?;
        let mut id_bytes = Vec::new();
        if cfg.rank == 0 {
            let id = Id::new().map_err(|e| Error::unsupported(format!("NCCL unique id: {e:?}")))?;
            id_bytes = id.internal().iter().map(|c| *c as u8).collect();
        }
        host.broadcast(&mut id_bytes).map_err(Error::from)?;
        let raw: [u8; 128] =
            id_bytes.as_slice().try_into().map_err(|_| Error::internal(format!("dist: NCCL id of {} bytes", id_bytes.len())))?;
        let id = Id::uninit(raw.map(|b| b as ::core::ffi::c_char));
        let comm = Comm::from_rank(dev.cuda_stream(), cfg.rank, cfg.world_size, id)
            .map_err(|e| Error::unsupported(format!("NCCL init of rank {} of {}: {e:?}", cfg.rank, cfg.world_size)))?;
        Ok(NcclComm { comm: Mutex::new(comm), host })
    }
}

/// `Σ_ranks x` on the GPU, into a fresh buffer.
struct AllReduceSum<'a>(&'a Comm);

impl CustomOp1 for AllReduceSum<'_> {
    fn name(&self) -> &'static str {
        "phasekit-nccl-all-reduce"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> CResult<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL all-reduce of a CPU tensor")
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> CResult<(CudaStorage, Shape)> {
        let n = l.shape().elem_count();
        let Some((start, end)) = l.contiguous_offsets() else { candle_core::bail!("NCCL all-reduce of a non-contiguous tensor") };
        if end - start != n {
            candle_core::bail!("NCCL all-reduce: layout covers {} values for {n}", end - start);
        }
        let dev = s.device().clone();
        let src = s.as_cuda_slice::<f32>()?.slice(start..end);
        let mut dst = dev.alloc_zeros::<f32>(n)?;
        self.0.all_reduce(&src, &mut dst, &ReduceOp::Sum).map_err(|e| dist_err(format!("NCCL all-reduce: {e:?}")))?;
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn world_size(&self) -> usize {
        self.host.world_size()
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }
    fn all_reduce_mean(&self, ts: &mut [Tensor]) -> CResult<()> {
        if ts.is_empty() {
            return Ok(());
        }
        // One NCCL call for all tensors: flatten, concatenate, reduce, split.
        let flat: Vec<Tensor> = ts.iter().map(|t| t.flatten_all()?.to_dtype(DType::F32)).collect::<CResult<_>>()?;
        let cat = Tensor::cat(&flat, 0)?.contiguous()?;
        let comm = self.comm.lock().map_err(|_| dist_err("NCCL communicator poisoned"))?;
        let sum = cat.apply_op1_no_bwd(&AllReduceSum(&comm))?;
        drop(comm);
        let mean = (sum / self.host.world_size() as f64)?;
        let mut off = 0;
        for t in ts.iter_mut() {
            let n = t.elem_count();
            *t = mean.narrow(0, off, n)?.reshape(t.shape())?.to_dtype(t.dtype())?;
            off += n;
        }
        Ok(())
    }
    fn broadcast(&self, bytes: &mut Vec<u8>) -> CResult<()> {
        self.host.broadcast(bytes)
    }
    fn all_gather_u64(&self, v: u64) -> CResult<Vec<u64>> {
        self.host.all_gather_u64(v)
    }
}
