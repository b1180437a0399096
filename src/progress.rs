//! Progress bars for long work: bytes, bytes/s and ETA on a terminal, nothing otherwise.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

/// A byte-counting progress bar, hidden when stderr is not a terminal or when quiet.
#[derive(Clone)]
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    pub fn bytes(total: u64, message: &str, quiet: bool) -> Self {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr_with_hz(8));
        if quiet || !std::io::stderr().is_terminal() {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        bar.set_style(
            ProgressStyle::with_template("{msg:>10} [{bar:32}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_message(message.to_string());
        Progress { bar }
    }
    pub fn hidden() -> Self {
        Progress { bar: ProgressBar::hidden() }
    }
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
    }
    pub fn set_message(&self, m: &str) {
        self.bar.set_message(m.to_string());
    }
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
