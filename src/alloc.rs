//! Running out of host memory is an answer, not a crash: the `phasekit` binary's global
//! allocator is the system allocator, except that a failed allocation prints one line — what
//! the program was doing, the bytes asked, the bytes the system still has — and exits with
//! code 9 (limit exceeded) instead of Rust's abort.
//!
//! `PHASEKIT_HOST_MEMORY_LIMIT=SIZE` (e.g. `512MB`) makes allocations fail once the heap in use
//! would pass SIZE: a budget for scripts, and how the tests exercise this path. What the program
//! is doing comes from [`set_activity`] (the trainer says its phase and resolution).
//!
//! The failure path allocates nothing: the message is assembled in a stack buffer and written
//! with `write(2)`, then the process ends with `_exit(9)`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// The allocator (install with `#[global_allocator]`).
pub struct ReportingAlloc;

static IN_USE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);
/// Whether [`ReportingAlloc`] is the global allocator (it is in the `phasekit` binary; a
/// library user's program, or a test binary, has its own).
static INSTALLED: AtomicBool = AtomicBool::new(false);
static LIMIT: AtomicU64 = AtomicU64::new(u64::MAX);
static JSON: AtomicBool = AtomicBool::new(false);

const ACTIVITY_CAP: usize = 200;
static ACTIVITY_LOCK: AtomicBool = AtomicBool::new(false);
static ACTIVITY_LEN: AtomicUsize = AtomicUsize::new(0);
static mut ACTIVITY: [u8; ACTIVITY_CAP] = [0; ACTIVITY_CAP];

/// Read `PHASEKIT_HOST_MEMORY_LIMIT` (call once, first thing in `main`); `json`: report the
/// failure as the `--json` error object on stdout too.
pub fn init(json: bool) -> crate::Result<()> {
    JSON.store(json, Ordering::Relaxed);
    INSTALLED.store(IN_USE.load(Ordering::Relaxed) > 0, Ordering::Relaxed);
    if let Some(v) = std::env::var_os("PHASEKIT_HOST_MEMORY_LIMIT") {
        let v = v.to_string_lossy().to_string();
        let n = crate::cli::args::parse_size(&v).map_err(|_| {
            crate::Error::usage(format!("PHASEKIT_HOST_MEMORY_LIMIT={} is not a size (e.g. 512MB, 2GiB)", crate::error::clean(&v)))
        })?;
        LIMIT.store(n, Ordering::Relaxed);
    }
    Ok(())
}

/// Say what the program is doing, for the out-of-memory line (cut to 200 bytes).
pub fn set_activity(what: &str) {
    if ACTIVITY_LOCK.swap(true, Ordering::Acquire) {
        return; // someone else is writing it: keep theirs
    }
    let b = what.as_bytes();
    let n = b.len().min(ACTIVITY_CAP);
    // SAFETY: the lock above gives this thread the buffer alone.
    unsafe {
        let dst = std::ptr::addr_of_mut!(ACTIVITY) as *mut u8;
        std::ptr::copy_nonoverlapping(b.as_ptr(), dst, n);
    }
    ACTIVITY_LEN.store(n, Ordering::Relaxed);
    ACTIVITY_LOCK.store(false, Ordering::Release);
}

/// `PHASEKIT_HOST_MEMORY_LIMIT`, when set.
pub fn limit() -> Option<u64> {
    Some(LIMIT.load(Ordering::Relaxed)).filter(|l| *l != u64::MAX)
}

/// Heap bytes in use (what the allocator handed out and has not had back).
pub fn in_use() -> u64 {
    IN_USE.load(Ordering::Relaxed)
}

/// The most heap bytes in use at once since the last [`reset_peak`] (`None` where
/// [`ReportingAlloc`] is not the global allocator). Unlike the resident set, it does not count
/// what the C allocator keeps after a free (fragmentation), nor mapped files: it is the host's
/// counterpart of a CUDA pool's high-water mark.
pub fn peak() -> Option<u64> {
    INSTALLED.load(Ordering::Relaxed).then(|| PEAK.load(Ordering::Relaxed))
}

/// Start a new window for [`peak`].
pub fn reset_peak() {
    PEAK.store(IN_USE.load(Ordering::Relaxed), Ordering::Relaxed);
}

fn reserve(size: usize) -> bool {
    let prev = IN_USE.fetch_add(size as u64, Ordering::Relaxed);
    let now = prev.saturating_add(size as u64);
    if now > LIMIT.load(Ordering::Relaxed) {
        IN_USE.fetch_sub(size as u64, Ordering::Relaxed);
        return false;
    }
    PEAK.fetch_max(now, Ordering::Relaxed);
    true
}

unsafe impl GlobalAlloc for ReportingAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if !reserve(l.size()) {
            fail(l.size());
        }
        let p = System.alloc(l);
        if p.is_null() {
            fail(l.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if !reserve(l.size()) {
            fail(l.size());
        }
        let p = System.alloc_zeroed(l);
        if p.is_null() {
            fail(l.size());
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        IN_USE.fetch_sub(l.size() as u64, Ordering::Relaxed);
        System.dealloc(p, l)
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > l.size() && !reserve(new - l.size()) {
            fail(new);
        }
        let q = System.realloc(p, l, new);
        if q.is_null() {
            fail(new);
        }
        if new < l.size() {
            IN_USE.fetch_sub((l.size() - new) as u64, Ordering::Relaxed);
        }
        q
    }
}

/// A fixed buffer that formats without allocating.
struct Line {
    buf: [u8; 1024],
    len: usize,
}

impl Line {
    /// Text from outside (made safe for one line of JSON: no newline, quote or backslash).
    fn push(&mut self, s: &[u8]) {
        for &c in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = if c < b' ' || c == b'"' || c == b'\\' { b' ' } else { c };
                self.len += 1;
            }
        }
    }
    /// Our own literal text, as it is.
    fn raw(&mut self, s: &[u8]) {
        for &c in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = c;
                self.len += 1;
            }
        }
    }
    fn num(&mut self, mut v: u64) {
        let mut d = [0u8; 20];
        let mut i = d.len();
        loop {
            i -= 1;
            d[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&d[i..]);
    }
    fn bytes(&mut self, v: u64) {
        // Whole MiB (or bytes below 1 MiB), no floats.
        if v >= 1 << 20 {
            self.num(v >> 20);
            self.push(b" MiB");
        } else {
            self.num(v);
            self.push(b" B");
        }
    }
}

/// `MemAvailable` from /proc/meminfo, read without allocating.
fn available() -> Option<u64> {
    let mut buf = [0u8; 4096];
    // SAFETY: a NUL-terminated path; the fd is closed below; read writes into `buf` only.
    let n = unsafe {
        let fd = libc::open(c"/proc/meminfo".as_ptr(), libc::O_RDONLY);
        if fd < 0 {
            return None;
        }
        let n = libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len());
        libc::close(fd);
        n
    };
    let s = &buf[..usize::try_from(n).ok()?];
    let key = b"MemAvailable:";
    let at = s.windows(key.len()).position(|w| w == key)? + key.len();
    let kb: u64 = s[at..].iter().skip_while(|c| **c == b' ').take_while(|c| c.is_ascii_digit()).fold(0, |a, c| a * 10 + (c - b'0') as u64);
    Some(kb * 1024)
}

fn fail(size: usize) -> ! {
    let mut m = Line { buf: [0; 1024], len: 0 };
    m.push(b"out of host memory");
    if !ACTIVITY_LOCK.swap(true, Ordering::Acquire) {
        let n = ACTIVITY_LEN.load(Ordering::Relaxed);
        if n > 0 {
            m.push(b" during ");
            // SAFETY: the lock is held; n <= ACTIVITY_CAP.
            let a = unsafe { std::slice::from_raw_parts(std::ptr::addr_of!(ACTIVITY) as *const u8, n) };
            m.push(a);
        }
    }
    m.push(b": asked for ");
    m.bytes(size as u64);
    m.push(b" with ");
    m.bytes(in_use());
    m.push(b" in use");
    let limit = LIMIT.load(Ordering::Relaxed);
    if limit != u64::MAX {
        m.push(b" of the ");
        m.bytes(limit);
        m.push(b" PHASEKIT_HOST_MEMORY_LIMIT");
    }
    if let Some(a) = available() {
        m.push(b"; the system has ");
        m.bytes(a);
        m.push(b" available");
    }
    let msg_end = m.len;
    let mut out = Line { buf: [0; 1024], len: 0 };
    out.raw(b"phasekit: error: ");
    out.push(&m.buf[..msg_end]);
    out.raw(b"\n");
    // SAFETY: writing a stack buffer to stderr/stdout; _exit ends the process without unwinding.
    unsafe {
        libc::write(2, out.buf.as_ptr() as *const libc::c_void, out.len);
        if JSON.load(Ordering::Relaxed) {
            let mut j = Line { buf: [0; 1024], len: 0 };
            j.raw(br#"{"ok": false, "error": {"kind": "limit", "exit_code": 9, "path": null, "message": ""#);
            j.push(&m.buf[..msg_end]);
            j.raw(b"\"}}\n");
            libc::write(1, j.buf.as_ptr() as *const libc::c_void, j.len);
        }
        libc::_exit(9)
    }
}
