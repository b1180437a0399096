//! Early writeback: start writing an output to disk while it is still being produced.
//!
//! A durable output ends with an fsync. Left alone, the kernel keeps the whole file dirty in
//! the page cache until then (a 1 GB write stays far below the 10 % background threshold of
//! a machine with a few GB of RAM), so the disk idles while phasekit copies and hashes and the
//! CPU idles while the fsync waits for the disk: the two times add up. A [`Writeback`] asks the
//! kernel to start writing every [`STEP`] bytes as soon as they are written
//! (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), from a thread of its own so that a full device
//! queue never stalls the writer; the final fsync then waits only for the tail. It changes no
//! data and no durability guarantee (the fsync still decides those), only when the disk works.
//!
//! Not done: flushing the device cache along the way (`fdatasync` every 128 MiB from the same
//! thread). On the virtio disk this was measured on, each flush stalled the writes in flight and
//! durable assembly took 3.1 s instead of 2.4 s (docs/performance.md).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{channel, Sender};
use std::thread::JoinHandle;

/// Writeback is started for every this many newly written bytes.
pub const STEP: u64 = 16 << 20;

/// Background writeback of one file's written ranges; see the module docs.
pub struct Writeback {
    tx: Option<Sender<(u64, u64)>>,
    thread: Option<JoinHandle<()>>,
    /// Bytes before this offset have been handed to the kernel.
    started: u64,
}

impl Writeback {
    /// Start the writeback thread for `file` (a duplicate descriptor is kept). `None` when the
    /// descriptor cannot be duplicated or the thread cannot start: the output is then written
    /// as before, and only the overlap is lost.
    pub fn new(file: &File) -> Option<Self> {
        let file = file.try_clone().ok()?;
        let (tx, rx) = channel::<(u64, u64)>();
        let thread = std::thread::Builder::new()
            .name("phasekit-writeback".into())
            .spawn(move || {
                for (offset, len) in rx {
                    // Errors are not lost: the fsync that makes the output durable reports them.
                    unsafe { libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE) };
                }
            })
            .ok()?;
        Some(Writeback { tx: Some(tx), thread: Some(thread), started: 0 })
    }

    /// The file is written up to `pos`: hand the kernel what is new once it reaches [`STEP`].
    pub fn written_to(&mut self, pos: u64) {
        if pos >= self.started + STEP {
            if let Some(tx) = &self.tx {
                let _ = tx.send((self.started, pos - self.started));
            }
            self.started = pos;
        }
    }
}

impl Drop for Writeback {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn written_ranges_reach_the_file_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let mut f = File::create(&path).unwrap();
        let mut wb = Writeback::new(&f).unwrap();
        let block: Vec<u8> = (0..(STEP as usize / 2 + 7)).map(|i| (i * 31 % 251) as u8).collect();
        let mut pos = 0u64;
        for _ in 0..5 {
            f.write_all(&block).unwrap();
            pos += block.len() as u64;
            wb.written_to(pos);
        }
        // Writeback was started after the 2nd and 4th blocks (each time a step had gathered);
        // the 5th waits for the fsync.
        assert_eq!(wb.started, 4 * block.len() as u64);
        drop(wb);
        f.sync_all().unwrap();
        let back = std::fs::read(&path).unwrap();
        assert_eq!(back.len(), block.len() * 5);
        assert!(back.chunks(block.len()).all(|c| c == &block[..]));
    }
}
