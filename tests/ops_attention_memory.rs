//! Attention forward + backward at S = 16 384 (one head, D = 64, f32) stays far below the S²
//! score matrix in memory: the matrix alone would be 16 384² × 4 B = 1 GiB. This test is alone in
//! its binary so that the process's peak RSS is its own.

use candle_core::{Device, Tensor, Var};
use phasekit::ops::attention::{attention_opts, Options, Path};

/// Peak resident set size of this process so far, in bytes.
fn peak_rss() -> u64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) }, 0);
    ru.ru_maxrss as u64 * 1024
}

/// Resident set size now, in bytes (`VmRSS`; Linux), or the peak where that is not available.
fn rss_now() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map(|kb| kb * 1024)
        .unwrap_or_else(peak_rss)
}

#[test]
fn forward_and_backward_at_16k_tokens_stay_far_below_s_squared() {
    let (s, d) = (16_384usize, 64usize);
    let dev = Device::Cpu;
    // Everything from here on counts, the inputs included: the peak reached during the test
    // minus what was resident when it started.
    let before = rss_now();
    let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, s, 1, d), &dev).unwrap()).unwrap();
    let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, s, 1, d), &dev).unwrap()).unwrap();
    let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, s, 1, d), &dev).unwrap()).unwrap();
    let s2 = (s * s * 4) as u64;
    let inputs = (3 * s * d * 4) as u64;
    // The S×S matrix would be 1 GiB; everything this op needs is O(S·D): q, k, v, o, dO, dq, dk,
    // dv, Δ and the lse are 4 MiB each or less, plus per-thread tiles (BQ × BK) and candle's
    // gradient bookkeeping (measured: at most 64 MiB in all, 2026-12-04). Allow 1/8 of S².
    let bound = s2 / 8;
    let t = std::time::Instant::now();
    let (o, _) =
        attention_opts(q.as_tensor(), k.as_tensor(), v.as_tensor(), None, &Options { path: Path::Cpu, ..Options::default() }).unwrap();
    let grads = o.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(grads.get(q.as_tensor()).unwrap().dims(), [1, s, 1, d]);
    let grown = peak_rss().saturating_sub(before);
    eprintln!(
        "peak RSS {:.1} MiB above the RSS at the start, in {:.1} s (inputs {:.1} MiB, S² f32 {:.0} MiB)",
        grown as f64 / 1048576.0,
        t.elapsed().as_secs_f64(),
        inputs as f64 / 1048576.0,
        s2 as f64 / 1048576.0
    );
    assert!(grown < bound, "peak RSS grew by {grown} bytes, bound {bound} (S² f32 = {s2})");
}
