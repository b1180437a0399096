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
//! - [`TcpComm`]: CPU tensors over TCP (star around rank 0): rank 0 sums the ranks' values in
//!   rank order and sends the mean back, so the result is reproducible and the same bits on
//!   every rank. It is for CPU runs (tests, CPU clusters) and carries the NCCL unique id.
//! - `NcclComm` (`--features nccl`): CUDA tensors through NCCL (cudarc), all-reduced on the GPU
//!   (decision 8 of DESIGN.md: GPUs talk NCCL, never a home-made transport).
//!
//! Ranks come from the usual variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//! `MASTER_PORT`, as torchrun and `srun` wrappers set them) or `--rendezvous tcp://HOST:PORT` /
//! `--rendezvous file:PATH`; see `docs/scale.md`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};

type CResult<T> = candle_core::Result<T>;

/// Where the ranks meet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rendezvous {
    /// Rank 0 listens on `host:port`; the others connect to it.
    Tcp(String),
    /// Rank 0 listens on a free port of `host` (`MASTER_ADDR`, default 127.0.0.1) and writes
    /// `host:port` into the file; the others read it (a file system every rank sees).
    File(PathBuf),
}

/// The rank of this process and how to reach the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistConfig {
    pub rank: usize,
    pub world_size: usize,
    /// GPU ordinal of this rank on its node (`LOCAL_RANK`; default: `rank`).
    pub local_rank: usize,
    pub rendezvous: Option<Rendezvous>,
    /// Bound on the rendezvous and on each wait for another rank (`PHASEKIT_DIST_TIMEOUT`, seconds).
    pub timeout: Duration,
}

impl Default for DistConfig {
    fn default() -> Self {
        DistConfig { rank: 0, world_size: 1, local_rank: 0, rendezvous: None, timeout: Duration::from_secs(DEFAULT_TIMEOUT_S) }
    }
}

/// Default of `PHASEKIT_DIST_TIMEOUT`: long enough for a slow rank's step on a big model.
pub const DEFAULT_TIMEOUT_S: u64 = 1800;

impl DistConfig {
    /// From the process environment and `--rendezvous`.
    pub fn from_env(rendezvous: Option<&str>) -> Result<DistConfig> {
        DistConfig::from_vars(&|k| std::env::var(k).ok(), rendezvous)
    }

    /// From variables given by `get` (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
    /// `MASTER_PORT`, `PHASEKIT_DIST_TIMEOUT`) and `--rendezvous`. No variable and no
    /// rendezvous: one rank.
    pub fn from_vars(get: &dyn Fn(&str) -> Option<String>, rendezvous: Option<&str>) -> Result<DistConfig> {
        let var = |k: &str| get(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let num = |k: &str| -> Result<Option<usize>> {
            match var(k) {
                None => Ok(None),
                Some(v) => v
                    .parse::<usize>()
                    .map(Some)
                    .map_err(|_| Error::usage(format!("{k}={} is not a non-negative integer", crate::error::clean(&v)))),
            }
        };
        let timeout = match var("PHASEKIT_DIST_TIMEOUT") {
            None => DEFAULT_TIMEOUT_S,
            Some(v) => v.parse::<u64>().ok().filter(|s| *s > 0).ok_or_else(|| {
                Error::usage(format!("PHASEKIT_DIST_TIMEOUT={} is not a positive number of seconds", crate::error::clean(&v)))
            })?,
        };
        let (rank, world) = (num("RANK")?, num("WORLD_SIZE")?);
        let world_size = match (rank, world) {
            (None, None) if rendezvous.is_none() => return Ok(DistConfig { timeout: Duration::from_secs(timeout), ..Default::default() }),
            (_, None) => return Err(Error::usage("RANK or --rendezvous is set but WORLD_SIZE is not")),
            (_, Some(0)) => return Err(Error::usage("WORLD_SIZE=0: there must be at least one rank")),
            (_, Some(w)) => w,
        };
        let rank = match rank {
            Some(r) => r,
            None if world_size == 1 => 0,
            None => return Err(Error::usage(format!("WORLD_SIZE={world_size} but RANK is not set"))),
        };
        if rank >= world_size {
            return Err(Error::usage(format!("RANK={rank} is not below WORLD_SIZE={world_size} (ranks are 0..{})", world_size - 1)));
        }
        let local_rank = num("LOCAL_RANK")?.unwrap_or(rank);
        let rdv = match rendezvous.map(str::trim) {
            Some("") => return Err(Error::usage("--rendezvous is empty (tcp://HOST:PORT or file:PATH)")),
            Some(s) => Some(parse_rendezvous(s)?),
            None => match (var("MASTER_ADDR"), var("MASTER_PORT")) {
                (Some(a), Some(p)) => {
                    let port: u16 =
                        p.parse().ok().filter(|p| *p > 0).ok_or_else(|| {
                            Error::usage(format!("MASTER_PORT={} is not a port number (1-65535)", crate::error::clean(&p)))
                        })?;
                    Some(Rendezvous::Tcp(join_host_port(&a, port)))
                }
                (Some(_), None) => return Err(Error::usage("MASTER_ADDR is set but MASTER_PORT is not")),
                (None, Some(_)) => return Err(Error::usage("MASTER_PORT is set but MASTER_ADDR is not")),
                (None, None) => None,
            },
        };
        if world_size > 1 && rdv.is_none() {
            return Err(Error::usage(format!(
                "WORLD_SIZE={world_size} needs a rendezvous: MASTER_ADDR and MASTER_PORT, or --rendezvous tcp://HOST:PORT or file:PATH"
            )));
        }
        Ok(DistConfig { rank, world_size, local_rank, rendezvous: rdv, timeout: Duration::from_secs(timeout) })
    }
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// `tcp://HOST:PORT`, `file:PATH` or a path (a file rendezvous).
pub fn parse_rendezvous(s: &str) -> Result<Rendezvous> {
    if let Some(a) = s.strip_prefix("tcp://") {
        let ok = a.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !ok {
            return Err(Error::usage(format!("--rendezvous {}: expected tcp://HOST:PORT", crate::error::clean(s))));
        }
        return Ok(Rendezvous::Tcp(a.to_string()));
    }
    if s.contains("://") {
        return Err(Error::usage(format!("--rendezvous {}: use tcp://HOST:PORT or file:PATH", crate::error::clean(s))));
    }
    Ok(Rendezvous::File(PathBuf::from(s.strip_prefix("file:").unwrap_or(s))))
}

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

/// A file that swallows what is written (the log of ranks other than 0).
pub fn null_file() -> Result<std::fs::File> {
    let p = if cfg!(windows) { "NUL" } else { "/dev/null" };
    std::fs::OpenOptions::new().write(true).open(p).map_err(|e| Error::io(p, e))
}

/// RNG state of `rank` when resuming from `info`: its saved state, or (a rank the checkpoint
/// did not have) a stream derived from `seed + rank` and the checkpoint's step.
pub fn resume_rng_state(info: &super::run::CheckpointInfo, rank: usize, seed: u64) -> u64 {
    if let Some(s) = info.rng_states.get(rank) {
        return *s;
    }
    if rank == 0 {
        return info.rng_state;
    }
    super::Rng::new(seed.wrapping_add(rank as u64) ^ info.global_step.wrapping_mul(0x9E37_79B9_7F4A_7C15)).fork().state
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

fn dist_err(msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("dist: {msg}"))
}

const MAGIC: &[u8; 4] = b"PKDP";
const VERSION: u32 = 1;
const OP_REDUCE: u8 = 1;
const OP_BROADCAST: u8 = 2;
const OP_GATHER: u8 = 3;

/// Data parallelism over TCP for CPU tensors: rank 0 accepts one connection per other rank,
/// sums in rank order, divides by the world size and sends the result back.
pub struct TcpComm {
    rank: usize,
    world_size: usize,
    /// Rank 0: the streams of ranks 1..world (index rank − 1); other ranks: the one to rank 0.
    peers: Mutex<Vec<TcpStream>>,
}

impl TcpComm {
    /// Rendezvous per `cfg` (bounded by `cfg.timeout`).
    pub fn connect(cfg: &DistConfig) -> Result<TcpComm> {
        let rdv = cfg
            .rendezvous
            .as_ref()
            .ok_or_else(|| Error::usage("several ranks need a rendezvous (MASTER_ADDR/MASTER_PORT or --rendezvous)"))?;
        let deadline = Instant::now() + cfg.timeout;
        let peers = if cfg.rank == 0 { Self::accept(cfg, rdv, deadline)? } else { vec![Self::dial(cfg, rdv, deadline)?] };
        for s in &peers {
            s.set_read_timeout(Some(cfg.timeout)).map_err(|e| Error::internal(format!("dist: socket: {e}")))?;
            s.set_write_timeout(Some(cfg.timeout)).map_err(|e| Error::internal(format!("dist: socket: {e}")))?;
        }
        Ok(TcpComm { rank: cfg.rank, world_size: cfg.world_size, peers: Mutex::new(peers) })
    }

    fn accept(cfg: &DistConfig, rdv: &Rendezvous, deadline: Instant) -> Result<Vec<TcpStream>> {
        let (listener, shown) = match rdv {
            Rendezvous::Tcp(a) => {
                let l = TcpListener::bind(a.as_str()).map_err(|e| Error::usage(format!("rank 0 cannot listen on {a}: {e}")))?;
                (l, a.clone())
            }
            Rendezvous::File(f) => {
                let host = std::env::var("MASTER_ADDR").ok().filter(|h| !h.trim().is_empty()).unwrap_or_else(|| "127.0.0.1".into());
                let l = TcpListener::bind(join_host_port(&host, 0))
                    .map_err(|e| Error::usage(format!("rank 0 cannot listen on {host}: {e}")))?;
                let port = l.local_addr().map_err(|e| Error::internal(format!("dist: {e}")))?.port();
                let addr = join_host_port(&host, port);
                crate::atomic::write_file(f, format!("{addr}\n").as_bytes())?;
                (l, format!("{addr} (written to {})", f.display()))
            }
        };
        listener.set_nonblocking(true).map_err(|e| Error::internal(format!("dist: {e}")))?;
        let mut slots: Vec<Option<TcpStream>> = (1..cfg.world_size).map(|_| None).collect();
        while slots.iter().any(Option::is_none) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).map_err(|e| Error::internal(format!("dist: {e}")))?;
                    s.set_nodelay(true).ok();
                    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
                    let mut hello = [0u8; 16];
                    if s.read_exact(&mut hello).is_err() || &hello[..4] != MAGIC {
                        continue; // not a phasekit rank (a port scan, a stale client): ignore it
                    }
                    let word = |i: usize| u32::from_le_bytes(hello[i..i + 4].try_into().expect("4 bytes")) as usize;
                    let (version, rank, world) = (word(4), word(8), word(12));
                    let refuse = |s: &mut TcpStream, why: String| -> Error {
                        let _ = s.write_all(&[1]);
                        Error::usage(format!("rendezvous at {shown}: {why}"))
                    };
                    if version != VERSION as usize {
                        return Err(refuse(&mut s, format!("rank {rank} speaks protocol {version}, rank 0 speaks {VERSION}")));
                    }
                    if world != cfg.world_size {
                        return Err(refuse(&mut s, format!("rank {rank} has WORLD_SIZE={world}, rank 0 has {}", cfg.world_size)));
                    }
                    if rank == 0 || rank >= cfg.world_size || slots[rank - 1].is_some() {
                        return Err(refuse(&mut s, format!("two processes claim RANK={rank}")));
                    }
                    s.write_all(&[0]).map_err(|e| Error::internal(format!("dist: rank {rank}: {e}")))?;
                    slots[rank - 1] = Some(s);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        let joined = slots.iter().filter(|s| s.is_some()).count() + 1;
                        return Err(Error::new(
                            crate::error::Kind::Limit,
                            format!(
                                "rendezvous at {shown}: {joined} of {} ranks joined within {} s",
                                cfg.world_size,
                                cfg.timeout.as_secs()
                            ),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(Error::internal(format!("dist: accept on {shown}: {e}"))),
            }
        }
        Ok(slots.into_iter().flatten().collect())
    }

    fn dial(cfg: &DistConfig, rdv: &Rendezvous, deadline: Instant) -> Result<TcpStream> {
        let mut last = String::from("no address yet");
        loop {
            let addr = match rdv {
                Rendezvous::Tcp(a) => Some(a.clone()),
                Rendezvous::File(f) => std::fs::read_to_string(f).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()),
            };
            if let Some(a) = addr {
                match a.to_socket_addrs().map(|mut it| it.next()) {
                    Ok(Some(sa)) => match TcpStream::connect_timeout(&sa, Duration::from_secs(2)) {
                        Ok(mut s) => {
                            s.set_nodelay(true).ok();
                            s.set_read_timeout(Some(cfg.timeout)).ok();
                            let mut hello = Vec::with_capacity(16);
                            hello.extend_from_slice(MAGIC);
                            for w in [VERSION, cfg.rank as u32, cfg.world_size as u32] {
                                hello.extend_from_slice(&w.to_le_bytes());
                            }
                            let mut ack = [0u8; 1];
                            match s.write_all(&hello).and_then(|_| s.read_exact(&mut ack)) {
                                Ok(()) if ack[0] == 0 => return Ok(s),
                                Ok(()) => {
                                    return Err(Error::usage(format!(
                                        "rendezvous at {a}: rank 0 refused rank {} (see rank 0's error)",
                                        cfg.rank
                                    )))
                                }
                                Err(e) => last = format!("{a}: {e}"),
                            }
                        }
                        Err(e) => last = format!("{a}: {e}"),
                    },
                    Ok(None) => last = format!("{a}: no address"),
                    Err(e) => last = format!("{a}: {e}"),
                }
            }
            if Instant::now() > deadline {
                return Err(Error::new(
                    crate::error::Kind::Limit,
                    format!("rank {}: could not reach rank 0 within {} s ({last})", cfg.rank, cfg.timeout.as_secs()),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn peers(&self) -> CResult<std::sync::MutexGuard<'_, Vec<TcpStream>>> {
        self.peers.lock().map_err(|_| dist_err("communicator poisoned by an earlier failure"))
    }

    fn send(&self, s: &mut TcpStream, to: usize, op: u8, payload: &[u8]) -> CResult<()> {
        let mut head = [0u8; 9];
        head[0] = op;
        head[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        s.write_all(&head)
            .and_then(|_| s.write_all(payload))
            .map_err(|e| dist_err(format!("rank {}: sending to rank {to}: {e}", self.rank)))
    }

    fn recv(&self, s: &mut TcpStream, from: usize, op: u8) -> CResult<Vec<u8>> {
        let io = |e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                dist_err(format!("rank {}: rank {from} closed the connection (did it fail? see its error)", self.rank))
            } else {
                dist_err(format!("rank {}: waiting for rank {from}: {e}", self.rank))
            }
        };
        let mut head = [0u8; 9];
        s.read_exact(&mut head).map_err(io)?;
        if head[0] != op {
            return Err(dist_err(format!("rank {}: rank {from} is at another collective (op {} instead of {op})", self.rank, head[0])));
        }
        let n = u64::from_le_bytes(head[1..].try_into().expect("8 bytes")) as usize;
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).map_err(io)?;
        Ok(buf)
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()
}

impl Communicator for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn backend(&self) -> &'static str {
        "tcp"
    }

    fn all_reduce_mean(&self, ts: &mut [Tensor]) -> CResult<()> {
        // One flat f32 buffer of every tensor, in order.
        let mut flat = Vec::new();
        for t in ts.iter() {
            flat.extend(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
        }
        let mut peers = self.peers()?;
        let mean = if self.rank == 0 {
            let mut acc = flat;
            for (i, s) in peers.iter_mut().enumerate() {
                let other = bytes_f32(&self.recv(s, i + 1, OP_REDUCE)?);
                if other.len() != acc.len() {
                    return Err(dist_err(format!(
                        "rank {} sent {} gradient values, rank 0 has {} (different recipes or models?)",
                        i + 1,
                        other.len(),
                        acc.len()
                    )));
                }
                for (a, b) in acc.iter_mut().zip(&other) {
                    *a += *b;
                }
            }
            let w = self.world_size as f32;
            for a in acc.iter_mut() {
                *a /= w;
            }
            let bytes = f32_bytes(&acc);
            for (i, s) in peers.iter_mut().enumerate() {
                self.send(s, i + 1, OP_REDUCE, &bytes)?;
            }
            acc
        } else {
            let s = &mut peers[0];
            let n = flat.len();
            self.send(s, 0, OP_REDUCE, &f32_bytes(&flat))?;
            let back = bytes_f32(&self.recv(s, 0, OP_REDUCE)?);
            if back.len() != n {
                return Err(dist_err(format!("rank 0 returned {} values for {n}", back.len())));
            }
            back
        };
        let mut off = 0;
        for t in ts.iter_mut() {
            let n = t.elem_count();
            let x = Tensor::from_slice(&mean[off..off + n], t.shape(), t.device())?.to_dtype(t.dtype())?;
            off += n;
            *t = x;
        }
        Ok(())
    }

    fn broadcast(&self, bytes: &mut Vec<u8>) -> CResult<()> {
        let mut peers = self.peers()?;
        if self.rank == 0 {
            for (i, s) in peers.iter_mut().enumerate() {
                self.send(s, i + 1, OP_BROADCAST, bytes)?;
            }
        } else {
            *bytes = self.recv(&mut peers[0], 0, OP_BROADCAST)?;
        }
        Ok(())
    }

    fn all_gather_u64(&self, v: u64) -> CResult<Vec<u64>> {
        let mut peers = self.peers()?;
        if self.rank == 0 {
            let mut all = vec![v];
            for (i, s) in peers.iter_mut().enumerate() {
                let b = self.recv(s, i + 1, OP_GATHER)?;
                let x: [u8; 8] =
                    b.as_slice().try_into().map_err(|_| dist_err(format!("rank {} sent {} bytes for a u64", i + 1, b.len())))?;
                all.push(u64::from_le_bytes(x));
            }
            let bytes: Vec<u8> = all.iter().flat_map(|x| x.to_le_bytes()).collect();
            for (i, s) in peers.iter_mut().enumerate() {
                self.send(s, i + 1, OP_GATHER, &bytes)?;
            }
            Ok(all)
        } else {
            let s = &mut peers[0];
            self.send(s, 0, OP_GATHER, &v.to_le_bytes())?;
            let b = self.recv(s, 0, OP_GATHER)?;
            if b.len() != 8 * self.world_size {
                return Err(dist_err(format!("rank 0 gathered {} bytes for {} ranks", b.len(), self.world_size)));
            }
            Ok(b.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
        }
    }
}

/// NCCL for CUDA tensors; host-side collectives (the unique id, RNG states, digests) over the
/// TCP rendezvous.
#[cfg(feature = "nccl")]
mod nccl {
    use std::sync::Mutex;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda::cudarc::nccl::{Comm, Id, ReduceOp};
    use candle_core::{CpuStorage, CudaDevice, CudaStorage, CustomOp1, DType, Layout, Shape, Tensor};

    use super::{dist_err, CResult, Communicator, DistConfig, TcpComm};
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
            host.broadcast(&mut id_bytes).map_err(crate::train::ce)?;
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
            self.host.rank
        }
        fn world_size(&self) -> usize {
            self.host.world_size
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
            let mean = (sum / self.host.world_size as f64)?;
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(kv: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: std::collections::HashMap<String, String> = kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn no_variables_is_one_rank_and_bad_values_are_usage_errors() {
        let c = DistConfig::from_vars(&vars(&[]), None).unwrap();
        assert_eq!((c.rank, c.world_size, c.rendezvous), (0, 1, None));
        let c = DistConfig::from_vars(
            &vars(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")]),
            None,
        )
        .unwrap();
        assert_eq!((c.rank, c.world_size, c.local_rank), (1, 2, 1));
        assert_eq!(c.rendezvous, Some(Rendezvous::Tcp("127.0.0.1:29500".into())));
        let c = DistConfig::from_vars(&vars(&[("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1")]), Some("file:/tmp/x")).unwrap();
        assert_eq!((c.local_rank, c.rendezvous), (1, Some(Rendezvous::File("/tmp/x".into()))));
        for (kv, rdv, want) in [
            (
                vec![("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")],
                None,
                "RANK=2 is not below WORLD_SIZE=2",
            ),
            (vec![("RANK", "0"), ("WORLD_SIZE", "2")], None, "needs a rendezvous"),
            (vec![("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")], None, "MASTER_PORT is not"),
            (vec![("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "x")], None, "MASTER_PORT=x"),
            (vec![("RANK", "0")], None, "WORLD_SIZE is not"),
            (vec![("WORLD_SIZE", "2")], Some("tcp://h:1"), "RANK is not set"),
            (vec![("RANK", "-1"), ("WORLD_SIZE", "2")], None, "RANK=-1"),
            (vec![("RANK", "0"), ("WORLD_SIZE", "0")], None, "WORLD_SIZE=0"),
            (vec![("RANK", "0"), ("WORLD_SIZE", "2")], Some("tcp://nohost"), "tcp://HOST:PORT"),
            (vec![("RANK", "0"), ("WORLD_SIZE", "2")], Some("http://h:1"), "tcp://HOST:PORT or file:PATH"),
        ] {
            let e = DistConfig::from_vars(&vars(&kv), rdv).unwrap_err();
            assert_eq!(e.kind(), crate::Kind::Usage, "{e}");
            assert!(e.to_string().contains(want), "{e} lacks {want}");
        }
    }

    fn pair(timeout: u64) -> (TcpComm, TcpComm) {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("rdv");
        let cfg = |rank| DistConfig {
            rank,
            world_size: 2,
            local_rank: rank,
            rendezvous: Some(Rendezvous::File(f.clone())),
            timeout: Duration::from_secs(timeout),
        };
        let (c0, c1) = (cfg(0), cfg(1));
        let h = std::thread::spawn(move || TcpComm::connect(&c1).unwrap());
        let a = TcpComm::connect(&c0).unwrap();
        (a, h.join().unwrap())
    }

    #[test]
    fn tcp_all_reduce_is_the_mean_in_rank_order_on_both_ranks() {
        let (a, b) = pair(20);
        let x0 = [1.0f32, -2.5, 3.25, 1e-8, 7.0, 0.1];
        let x1 = [0.5f32, 4.0, -3.25, 3.0, 1e8, 0.2];
        let run = |c: TcpComm, x: [f32; 6]| {
            std::thread::spawn(move || {
                let mut ts =
                    vec![Tensor::from_slice(&x[..4], (2, 2), &Device::Cpu).unwrap(), Tensor::from_slice(&x[4..], 2, &Device::Cpu).unwrap()];
                c.all_reduce_mean(&mut ts).unwrap();
                let g = c.all_gather_u64(c.rank() as u64 * 10 + 1).unwrap();
                let mut bytes = if c.rank() == 0 { b"hello".to_vec() } else { Vec::new() };
                c.broadcast(&mut bytes).unwrap();
                let mut v = ts[0].flatten_all().unwrap().to_vec1::<f32>().unwrap();
                v.extend(ts[1].to_vec1::<f32>().unwrap());
                assert_eq!(ts[0].dims(), &[2, 2]);
                (v, g, bytes)
            })
        };
        let (ha, hb) = (run(a, x0), run(b, x1));
        let (ra, rb) = (ha.join().unwrap(), hb.join().unwrap());
        let want: Vec<f32> = x0.iter().zip(&x1).map(|(p, q)| (p + q) / 2.0).collect();
        assert_eq!(ra.0, want);
        assert_eq!(rb.0, want);
        assert_eq!(ra.1, vec![1, 11]);
        assert_eq!(rb.1, vec![1, 11]);
        assert_eq!(rb.2, b"hello");
    }

    #[test]
    fn a_rank_that_never_comes_is_a_bounded_error() {
        let d = tempfile::tempdir().unwrap();
        let cfg = DistConfig {
            rank: 0,
            world_size: 2,
            local_rank: 0,
            rendezvous: Some(Rendezvous::File(d.path().join("rdv"))),
            timeout: Duration::from_secs(1),
        };
        let t = Instant::now();
        let e = TcpComm::connect(&cfg).err().unwrap();
        assert!(e.to_string().contains("1 of 2 ranks joined"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10));
        let e = TcpComm::connect(&DistConfig { rank: 1, ..cfg }).err().unwrap();
        assert!(e.to_string().contains("could not reach rank 0"), "{e}");
    }
}
