//! [`Sink`]: where an output's bytes go on their way into the file.
//!
//! One 8 MiB buffer; blocks of 1 MiB and more skip it. File-aligned 64 KiB runs of zeros become
//! holes (a seek, as `cp --sparse=auto` does). Copies of 1 MiB and more from a mapped source go
//! through the kernel (`copy_file_range`), skipping the source's holes (`SEEK_DATA`/`SEEK_HOLE`).
//! Optionally the sink hashes everything with SHA-256 (then copies go through the buffer, since
//! the kernel's copy is never seen), starts the disk writing as it goes (`crate::writeback`) and
//! counts bytes into a progress bar.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{IoContext, Result};
use crate::progress::Progress;
use crate::store::SourceFile;

const SINK_BUF: usize = 8 << 20;
const HOLE_GRAIN: usize = 64 << 10;
/// Blocks at least this large are written without going through the buffer.
const DIRECT_WRITE: usize = 1 << 20;
/// Copies at least this long go through the kernel (`copy_file_range`); shorter ones through the buffer.
pub const KERNEL_COPY_MIN: u64 = 1 << 20;
/// Kernel copies are issued in calls that end on multiples of this many source bytes.
const COPY_CALL: u64 = 64 << 20;

/// Zeros for padding and holes written through the buffer.
static ZEROS: [u8; HOLE_GRAIN] = [0; HOLE_GRAIN];

/// An output file written through a buffer, with hole skipping, kernel copies, hashing,
/// early writeback and progress.
pub struct Sink<'a> {
    file: &'a mut File,
    path: PathBuf,
    buf: Vec<u8>,
    hasher: Option<Sha256>,
    progress: &'a Progress,
    pos: u64,
    /// Whether the file position is past data that was skipped (a hole to materialise at the end).
    sparse_tail: bool,
    /// Early writeback of durable outputs (see [`crate::writeback`]).
    writeback: Option<crate::writeback::Writeback>,
}

impl<'a> Sink<'a> {
    /// A sink writing at the current position of `file` (named `path` in errors), which must be
    /// at the start of a new, empty file.
    pub fn new(file: &'a mut File, path: &Path, hash: bool, progress: &'a Progress) -> Self {
        Sink {
            file,
            path: path.to_path_buf(),
            buf: Vec::with_capacity(SINK_BUF),
            hasher: hash.then(Sha256::new),
            progress,
            pos: 0,
            sparse_tail: false,
            writeback: None,
        }
    }

    /// Start the disk writing what the sink wrote while it goes on (for outputs that end with
    /// an fsync: the fsync then waits only for the tail).
    pub fn with_writeback(mut self, on: bool) -> Self {
        self.writeback = if on { crate::writeback::Writeback::new(self.file) } else { None };
        self
    }

    /// Bytes written so far (holes included).
    pub fn position(&self) -> u64 {
        self.pos + self.buf.len() as u64
    }

    fn advanced(&mut self, n: u64) {
        self.pos += n;
        self.progress.inc(n);
        if let Some(w) = &mut self.writeback {
            w.written_to(self.pos);
        }
    }

    pub fn write(&mut self, mut bytes: &[u8]) -> Result<()> {
        if bytes.len() >= DIRECT_WRITE {
            // Large blocks skip the buffer copy (hashed in place).
            self.flush_buf()?;
            if let Some(h) = &mut self.hasher {
                h.update(bytes);
            }
            return self.write_direct(bytes);
        }
        while !bytes.is_empty() {
            let room = SINK_BUF - self.buf.len();
            let n = room.min(bytes.len());
            self.buf.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.buf.len() == SINK_BUF {
                self.flush_buf()?;
            }
        }
        Ok(())
    }

    /// `n` zero bytes: a hole when they are long enough and nothing hashes them, else written.
    pub fn zeros(&mut self, n: u64) -> Result<()> {
        if self.hasher.is_some() || n < 2 * HOLE_GRAIN as u64 {
            let mut left = n;
            while left > 0 {
                let k = left.min(HOLE_GRAIN as u64) as usize;
                self.write(&ZEROS[..k])?;
                left -= k as u64;
            }
            return Ok(());
        }
        self.flush_buf()?;
        self.file.seek(SeekFrom::Current(n as i64)).with_file(&self.path)?;
        self.sparse_tail = true;
        self.advanced(n);
        Ok(())
    }

    /// Write the buffer, seeking over 64 KiB runs of zeros (they become holes, as `cp` does).
    fn flush_buf(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if let Some(h) = &mut self.hasher {
            h.update(&self.buf);
        }
        let buf = std::mem::take(&mut self.buf);
        self.write_direct(&buf)?;
        self.buf = buf;
        self.buf.clear();
        Ok(())
    }

    fn write_direct(&mut self, buf: &[u8]) -> Result<()> {
        // Runs of data are written with one call; whole, file-aligned 64 KiB grains of zeros
        // are skipped with a seek.
        let mut start = 0;
        let mut run_start = 0;
        while start < buf.len() {
            let pos = self.pos + start as u64;
            let to_grain = (HOLE_GRAIN as u64 - pos % HOLE_GRAIN as u64) as usize;
            let end = (start + to_grain).min(buf.len());
            let piece = &buf[start..end];
            if piece.len() == HOLE_GRAIN && is_zero(piece) {
                self.write_run(&buf[run_start..start])?;
                self.file.seek(SeekFrom::Current(piece.len() as i64)).with_file(&self.path)?;
                self.sparse_tail = true;
                run_start = end;
            }
            start = end;
        }
        self.write_run(&buf[run_start..])?;
        self.advanced(buf.len() as u64);
        Ok(())
    }

    fn write_run(&mut self, run: &[u8]) -> Result<()> {
        if !run.is_empty() {
            self.file.write_all(run).with_file(&self.path)?;
            self.sparse_tail = false;
        }
        Ok(())
    }

    /// Whether the sink hashes what it writes (then copies go through the buffer).
    pub fn hashing(&self) -> bool {
        self.hasher.is_some()
    }

    /// Copy `len` bytes at `offset` of a source file. Without hashing this is done in the kernel
    /// (`copy_file_range`), skipping holes of sparse inputs.
    pub fn copy_from(&mut self, src: &SourceFile, offset: u64, len: u64) -> Result<()> {
        if self.hasher.is_some() || len < KERNEL_COPY_MIN {
            return self.write(&src.bytes()[offset as usize..(offset + len) as usize]);
        }
        self.flush_buf()?;
        let (ifd, ofd) = (src.file().as_raw_fd(), self.file.as_raw_fd());
        let end = offset + len;
        let mut at = offset;
        while at < end {
            // Find the next data segment (holes are skipped, like cp --sparse=auto).
            let data = unsafe { libc::lseek(ifd, at as i64, libc::SEEK_DATA) };
            let data = if data < 0 { end } else { (data as u64).min(end) };
            if data > at {
                let gap = data - at;
                self.file.seek(SeekFrom::Current(gap as i64)).with_file(&self.path)?;
                self.sparse_tail = true;
                self.advanced(gap);
                at = data;
                continue;
            }
            let hole = unsafe { libc::lseek(ifd, at as i64, libc::SEEK_HOLE) };
            let seg_end = if hole < 0 { end } else { (hole as u64).min(end).max(at + 1) };
            let mut off_in = at as i64;
            // Calls end at multiples of COPY_CALL in the source, so every call after the first
            // starts on the same page-cache boundary in both files (progress stays fine-grained).
            let want = (seg_end.min((at / COPY_CALL + 1) * COPY_CALL) - at) as usize;
            let n = unsafe { libc::copy_file_range(ifd, &mut off_in, ofd, std::ptr::null_mut(), want, 0) };
            if n <= 0 {
                // Not supported here (or nothing copied): fall back to writing from the map.
                let bytes = &src.bytes()[at as usize..seg_end as usize];
                self.file.write_all(bytes).with_file(&self.path)?;
                self.advanced(bytes.len() as u64);
                at = seg_end;
            } else {
                self.advanced(n as u64);
                at += n as u64;
            }
            self.sparse_tail = false;
        }
        Ok(())
    }

    /// Flush, materialise a trailing hole, and return the sha256 (when hashing).
    pub fn finish(mut self) -> Result<Option<String>> {
        self.flush_buf()?;
        if self.sparse_tail {
            self.file.set_len(self.pos).with_file(&self.path)?;
        }
        Ok(self.hasher.take().map(|h| crate::hash::hex(&h.finalize())))
    }
}

fn is_zero(b: &[u8]) -> bool {
    let (pre, mid, post) = unsafe { b.align_to::<u128>() };
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn sink_bytes(hash: bool, f: impl FnOnce(&mut Sink) -> Result<()>) -> (Vec<u8>, Option<String>, u64) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("out");
        let mut file = File::create(&p).unwrap();
        let progress = Progress::hidden();
        let mut sink = Sink::new(&mut file, &p, hash, &progress);
        f(&mut sink).unwrap();
        let pos = sink.position();
        let h = sink.finish().unwrap();
        drop(file);
        let blocks = std::fs::metadata(&p).unwrap().blocks();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(bytes.len() as u64, pos);
        (bytes, h, blocks)
    }

    #[test]
    fn zeros_become_holes_and_read_back_as_zeros() {
        let n = 3 << 20;
        let (b, h, blocks) = sink_bytes(false, |s| {
            s.write(b"head")?;
            s.zeros(n)?;
            s.write(b"tail")?;
            s.zeros(n)
        });
        assert_eq!(b.len() as u64, 8 + 2 * n);
        assert_eq!(&b[..4], b"head");
        assert_eq!(&b[4 + n as usize..8 + n as usize], b"tail");
        assert!(b[4..4 + n as usize].iter().chain(&b[8 + n as usize..]).all(|&x| x == 0));
        assert!(h.is_none());
        // 512-byte blocks: far fewer than 6 MiB of data (the trailing hole is materialised by set_len).
        assert!(blocks * 512 < 1 << 20, "{blocks} blocks");
        // Hashed, the same bytes and their digest.
        let (b2, h2, _) = sink_bytes(true, |s| {
            s.write(b"head")?;
            s.zeros(n)?;
            s.write(b"tail")?;
            s.zeros(n)
        });
        assert_eq!(b, b2);
        assert_eq!(h2.unwrap(), crate::hash::sha256_hex(&b));
    }

    #[test]
    fn copies_equal_writes() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let data: Vec<u8> = (0..(5u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let sf = SourceFile::open(&src).unwrap();
        for hash in [false, true] {
            let (b, h, _) = sink_bytes(hash, |s| {
                s.write(b"x")?;
                s.copy_from(&sf, 3, 2 << 20)?;
                s.copy_from(&sf, 7, 100)?;
                s.copy_from(&sf, 1 << 20, 4 << 20)
            });
            let mut want = b"x".to_vec();
            want.extend_from_slice(&data[3..3 + (2 << 20)]);
            want.extend_from_slice(&data[7..107]);
            want.extend_from_slice(&data[1 << 20..5 << 20]);
            assert!(b == want, "hash {hash}");
            assert_eq!(h.is_some(), hash);
        }
    }
}
