//! Where tensors live: `--device cpu|cuda|cuda:N`, one parser for every command.
//!
//! A CPU build (no `cuda` feature) still accepts the flag and answers `cuda` with a named
//! error, so scripts get exit code 7 ("unsupported") instead of a panic.

use candle_core::Device;

use crate::error::{Error, Result};

/// Parse a device name: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
pub fn parse(name: &str) -> Result<Device> {
    let n = name.trim().to_ascii_lowercase();
    if n == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match n.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|i| i.parse::<usize>().ok())
            .ok_or_else(|| Error::usage(format!("invalid device '{name}' (use cpu, cuda or cuda:N)")))?,
        None => return Err(Error::usage(format!("invalid device '{name}' (use cpu, cuda or cuda:N)"))),
    };
    cuda(ordinal)
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| Error::unsupported(format!("CUDA device {ordinal}: {}", crate::error::clean(&e.to_string()))))
}

#[cfg(not(feature = "cuda"))]
fn cuda(ordinal: usize) -> Result<Device> {
    Err(Error::unsupported(format!(
        "cuda:{ordinal}: this phasekit was built without CUDA; rebuild with `cargo build --release --features cuda`"
    )))
}

/// A short name of a device for reports.
pub fn name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}

/// Wait for queued GPU work (for timings); a no-op on the CPU.
pub fn sync(d: &Device) -> Result<()> {
    d.synchronize().map_err(|e| Error::internal(format!("device sync: {}", crate::error::clean(&e.to_string()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_cuda_is_refused_without_the_feature() {
        assert!(matches!(parse("cpu").unwrap(), Device::Cpu));
        assert_eq!(parse("gpu").unwrap_err().kind(), crate::Kind::Usage);
        assert_eq!(parse("cuda:x").unwrap_err().kind(), crate::Kind::Usage);
        if cfg!(not(feature = "cuda")) {
            let e = parse("cuda:1").unwrap_err();
            assert_eq!(e.kind(), crate::Kind::Unsupported);
            assert!(e.to_string().contains("--features cuda"), "{e}");
        }
    }
}
