//! Where the ranks of a run meet and who this process is: [`DistConfig`] from `RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` or `--rendezvous`.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};

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

pub(crate) fn join_host_port(host: &str, port: u16) -> String {
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
}
