//! Outputs appear under their final name only when complete.
//!
//! Data is written to a temporary sibling (`.NAME.phasekit-tmp-PID-N`), flushed and fsynced,
//! then renamed over the target. A dropped [`AtomicFile`] / [`AtomicDir`] that was not
//! committed removes its temporary, so an error or a panic leaves nothing behind; a killed
//! process leaves only a dot-file with the `phasekit-tmp` marker, never a partial output under
//! the final name.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, IoContext, Result};

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn temp_sibling(target: &Path) -> Result<PathBuf> {
    let name = target.file_name().ok_or_else(|| Error::usage(format!("output path '{}' has no file name", target.display())))?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = format!(".{}.phasekit-tmp-{}-{n}", name.to_string_lossy(), std::process::id());
    Ok(target.with_file_name(tmp))
}

/// Refuse to overwrite unless asked, and make sure the parent folder exists.
pub fn check_target(target: &Path, overwrite: bool) -> Result<()> {
    if target.exists() && !overwrite {
        return Err(Error::at(crate::Kind::Usage, target, "output already exists (use --force to replace it)"));
    }
    if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            return Err(Error::io(parent, io::Error::new(io::ErrorKind::NotFound, "output folder does not exist")));
        }
    }
    Ok(())
}

/// A file being written under a temporary name.
pub struct AtomicFile {
    target: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
    sync: bool,
}

impl AtomicFile {
    pub fn create(target: impl AsRef<Path>) -> Result<Self> {
        let target = target.as_ref().to_path_buf();
        let tmp = temp_sibling(&target)?;
        let file = File::create(&tmp).with_file(&tmp)?;
        Ok(AtomicFile { target, tmp, file: Some(file), sync: true })
    }
    /// Skip the fsync before the rename (scratch outputs: faster, but after a power loss the
    /// file under the final name may be incomplete).
    pub fn without_sync(mut self) -> Self {
        self.sync = false;
        self
    }
    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("file open until commit")
    }
    pub fn target(&self) -> &Path {
        &self.target
    }
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }
    /// Flush, fsync and rename over the target.
    pub fn commit(mut self) -> Result<()> {
        let mut f = self.file.take().expect("file open until commit");
        f.flush().with_file(&self.tmp)?;
        if self.sync {
            f.sync_all().with_file(&self.tmp)?;
        }
        drop(f);
        fs::rename(&self.tmp, &self.target).map_err(|e| Error::io(&self.target, e))?;
        sync_parent(&self.target);
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file().write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.file().write_all(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file().flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Write a small file atomically.
pub fn write_file(target: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(target)?;
    f.write_all(bytes).with_file(f.temp_path())?;
    f.commit()
}

/// A folder being filled under a temporary name, renamed into place on commit.
pub struct AtomicDir {
    target: PathBuf,
    tmp: PathBuf,
    done: bool,
}

impl AtomicDir {
    pub fn create(target: impl AsRef<Path>) -> Result<Self> {
        let target = target.as_ref().to_path_buf();
        let tmp = temp_sibling(&target)?;
        fs::create_dir(&tmp).with_file(&tmp)?;
        Ok(AtomicDir { target, tmp, done: false })
    }
    /// Where to write the folder's files now.
    pub fn path(&self) -> &Path {
        &self.tmp
    }
    pub fn target(&self) -> &Path {
        &self.target
    }
    /// Rename into place; an existing target (allowed by `--force`) is replaced.
    pub fn commit(mut self) -> Result<()> {
        if let Ok(d) = File::open(&self.tmp) {
            let _ = d.sync_all();
        }
        if self.target.exists() {
            let trash = temp_sibling(&self.target)?;
            fs::rename(&self.target, &trash).with_file(&self.target)?;
            fs::rename(&self.tmp, &self.target).with_file(&self.target)?;
            let _ = if trash.is_dir() { fs::remove_dir_all(&trash) } else { fs::remove_file(&trash) };
        } else {
            fs::rename(&self.tmp, &self.target).with_file(&self.target)?;
        }
        sync_parent(&self.target);
        self.done = true;
        Ok(())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

fn sync_parent(p: &Path) {
    if let Some(parent) = p.parent() {
        let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
        if let Ok(d) = File::open(parent) {
            let _ = d.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_file_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("out.safetensors");
        {
            let mut f = AtomicFile::create(&t).unwrap();
            f.write_all(b"partial").unwrap();
        }
        assert!(!t.exists());
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 0);
        let mut f = AtomicFile::create(&t).unwrap();
        f.write_all(b"done").unwrap();
        f.commit().unwrap();
        assert_eq!(fs::read(&t).unwrap(), b"done");
    }

    #[test]
    fn dir_commit_and_drop() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("model");
        {
            let a = AtomicDir::create(&t).unwrap();
            fs::write(a.path().join("x"), b"1").unwrap();
        }
        assert!(!t.exists());
        let a = AtomicDir::create(&t).unwrap();
        fs::write(a.path().join("x"), b"1").unwrap();
        a.commit().unwrap();
        assert!(t.join("x").exists());
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
