//! Data parallelism over TCP for CPU tensors (and the host side of NCCL runs): a star around
//! rank 0, which sums the ranks' values in rank order and sends the mean back, so the result is
//! reproducible and the same bits on every rank.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use super::comm::{dist_err, f32_bytes, Communicator};
use super::config::{join_host_port, DistConfig, Rendezvous};

type CResult<T> = candle_core::Result<T>;
use crate::error::{Error, Result};

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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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
