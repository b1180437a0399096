//! The zip container of `torch.save` files: the central directory, read from a byte slice.
//!
//! torch writes archives with miniz (`PyTorchStreamWriter`): every entry **stored**
//! (uncompressed), its data aligned by padding in the local header's extra field, sizes in a
//! data descriptor after the data (flag bit 3) and in the central directory, zip64 records once
//! the archive passes 4 GiB. phasekit needs the byte range of each entry's data so that tensors
//! are served straight from the memory map; this module finds them and checks that they are
//! sane:
//!
//! - the end-of-central-directory record (and the zip64 one it points to) lies inside the
//!   slice, the central directory before it, every entry's data before the central directory;
//! - entry names are UTF-8 and unique; the local header repeats the central header's name;
//! - entries do not overlap (local header to end of data), so no byte belongs to two entries;
//! - encrypted entries are refused; compressed ones are listed with their method, and the
//!   caller refuses to map them ([`Entry::stored`]).
//!
//! Nothing is allocated from a declared count before it has been compared with the bytes the
//! directory occupies. Offsets are relative to the slice; [`Archive::base`] turns them into
//! offsets of the enclosing file (a DCP `.distcp` file holds many archives back to back).

use std::collections::HashSet;
use std::path::Path;

use crate::error::{clean, Error, Kind, Result};

const EOCD_SIG: u32 = 0x0605_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const LOCAL_SIG: u32 = 0x0403_4b50;
const EOCD_LEN: usize = 22;
const CENTRAL_LEN: usize = 46;
const LOCAL_LEN: usize = 30;

/// Most entries an archive may declare (a state dict of 10^6 tensors has 10^6 + 5).
pub const MAX_ENTRIES: u64 = 1 << 22;

/// One member of the archive.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    /// Compression method (0 stored, 8 deflate, ...).
    pub method: u16,
    /// Offset of the data inside the archive slice.
    pub data_offset: u64,
    /// Stored (compressed) size.
    pub compressed_size: u64,
    /// Uncompressed size.
    pub size: u64,
    pub crc32: u32,
}

impl Entry {
    /// Whether the bytes are stored as they are (and so can be mapped).
    pub fn stored(&self) -> bool {
        self.method == 0
    }
}

/// The central directory of an archive held in a byte slice.
#[derive(Debug, Clone)]
pub struct Archive {
    /// Where the slice starts in its file.
    pub base: u64,
    pub entries: Vec<Entry>,
}

impl Archive {
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }
}

struct Cursor<'a> {
    path: &'a Path,
    what: &'a str,
    b: &'a [u8],
}

impl Cursor<'_> {
    fn err(&self, kind: Kind, msg: impl std::fmt::Display) -> Error {
        Error::at(kind, self.path, format!("{}: {msg}", self.what))
    }
    fn slice(&self, at: u64, len: u64, field: &str) -> Result<&[u8]> {
        let end = at.checked_add(len).filter(|&e| e <= self.b.len() as u64).ok_or_else(|| {
            self.err(Kind::Truncated, format!("{field} at byte {at} ({len} bytes) runs past the end ({} bytes)", self.b.len()))
        })?;
        Ok(&self.b[at as usize..end as usize])
    }
    fn u16(&self, at: u64) -> Result<u16> {
        let s = self.slice(at, 2, "a 16-bit field")?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&self, at: u64) -> Result<u32> {
        let s = self.slice(at, 4, "a 32-bit field")?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&self, at: u64) -> Result<u64> {
        let s = self.slice(at, 8, "a 64-bit field")?;
        Ok(u64::from_le_bytes(s.try_into().expect("8 bytes")))
    }
}

/// Read the central directory of the archive in `bytes` (which start at `base` in `path`).
/// `what` names the archive in messages (`data.pkl archive`, `__0_0.distcp item 'model.w'`).
pub fn read(path: &Path, what: &str, bytes: &[u8], base: u64) -> Result<Archive> {
    let c = Cursor { path, what, b: bytes };
    if bytes.len() < 4 || &bytes[..4] != b"PK\x03\x04" {
        if bytes.len() >= 2 && bytes[0] == 0x80 {
            return Err(c.err(
                Kind::Unsupported,
                "a legacy torch.save file (a bare pickle, PyTorch < 1.6); load it with torch.load and save it again with a current PyTorch",
            ));
        }
        return Err(c.err(Kind::Malformed, "not a zip archive (torch.save files are zip archives starting with 'PK\\x03\\x04')"));
    }
    // The end-of-central-directory record: the last signature whose comment ends the slice.
    let lo = bytes.len().saturating_sub(EOCD_LEN + u16::MAX as usize);
    let mut eocd = None;
    let mut at = bytes.len().saturating_sub(EOCD_LEN);
    while at >= lo && bytes.len() >= EOCD_LEN {
        if bytes[at..at + 4] == EOCD_SIG.to_le_bytes() {
            let comment = u16::from_le_bytes([bytes[at + 20], bytes[at + 21]]) as usize;
            if at + EOCD_LEN + comment == bytes.len() {
                eocd = Some(at as u64);
                break;
            }
        }
        if at == 0 {
            break;
        }
        at -= 1;
    }
    let Some(eocd) = eocd else {
        return Err(c.err(Kind::Truncated, "the zip archive has no end-of-central-directory record: the file is cut short"));
    };
    let disk = c.u16(eocd + 4)?;
    let cd_disk = c.u16(eocd + 6)?;
    let mut count = c.u16(eocd + 10)? as u64;
    let mut cd_size = c.u32(eocd + 12)? as u64;
    let mut cd_offset = c.u32(eocd + 16)? as u64;
    if disk != 0 || cd_disk != 0 {
        return Err(c.err(Kind::Unsupported, "a multi-disk (split) zip archive"));
    }
    // zip64: a locator right before the record points to the zip64 record.
    if eocd >= 20 && c.u32(eocd - 20)? == ZIP64_LOCATOR_SIG {
        let z = c.u64(eocd - 20 + 8)?;
        if z.checked_add(56).is_none_or(|e| e > eocd - 20) {
            return Err(c.err(Kind::Malformed, format!("the zip64 record offset {z} is not before its locator")));
        }
        if c.u32(z)? != ZIP64_EOCD_SIG {
            return Err(c.err(Kind::Malformed, format!("no zip64 end-of-central-directory record at byte {z}")));
        }
        count = c.u64(z + 32)?;
        cd_size = c.u64(z + 40)?;
        cd_offset = c.u64(z + 48)?;
    } else if count == 0xffff || cd_size == 0xffff_ffff || cd_offset == 0xffff_ffff {
        return Err(c.err(Kind::Malformed, "the end-of-central-directory record asks for zip64 values but there is no zip64 locator"));
    }
    if count > MAX_ENTRIES {
        return Err(c.err(Kind::Limit, format!("declares {count} entries, over the limit of {MAX_ENTRIES}")));
    }
    let cd_end = cd_offset.checked_add(cd_size).filter(|&e| e <= eocd).ok_or_else(|| {
        c.err(Kind::Malformed, format!("the central directory ({cd_size} bytes at {cd_offset}) does not end before byte {eocd}"))
    })?;
    if count.saturating_mul(CENTRAL_LEN as u64) > cd_size {
        return Err(c.err(Kind::Malformed, format!("declares {count} entries but its central directory has only {cd_size} bytes")));
    }
    let mut entries = Vec::with_capacity(count as usize);
    let mut names = HashSet::new();
    let mut at = cd_offset;
    for k in 0..count {
        if at + CENTRAL_LEN as u64 > cd_end {
            return Err(c.err(Kind::Malformed, format!("central directory entry {k} runs past the directory")));
        }
        if c.u32(at)? != CENTRAL_SIG {
            return Err(c.err(Kind::Malformed, format!("central directory entry {k} at byte {at} has no signature")));
        }
        let flags = c.u16(at + 8)?;
        let method = c.u16(at + 10)?;
        let crc32 = c.u32(at + 16)?;
        let mut csize = c.u32(at + 20)? as u64;
        let mut usize_ = c.u32(at + 24)? as u64;
        let name_len = c.u16(at + 28)? as u64;
        let extra_len = c.u16(at + 30)? as u64;
        let comment_len = c.u16(at + 32)? as u64;
        let mut local = c.u32(at + 42)? as u64;
        let var = at + CENTRAL_LEN as u64;
        if var + name_len + extra_len + comment_len > cd_end {
            return Err(c.err(Kind::Malformed, format!("central directory entry {k} runs past the directory")));
        }
        let raw_name = c.slice(var, name_len, "an entry name")?;
        let name = std::str::from_utf8(raw_name)
            .map_err(|_| {
                c.err(Kind::Malformed, format!("entry {k} has a name that is not UTF-8: {}", clean(&String::from_utf8_lossy(raw_name))))
            })?
            .to_string();
        // zip64 extended information: only the fields whose 32-bit value is saturated, in order.
        let extra = c.slice(var + name_len, extra_len, "an extra field")?;
        let mut e = 0usize;
        while e + 4 <= extra.len() {
            let id = u16::from_le_bytes([extra[e], extra[e + 1]]);
            let len = u16::from_le_bytes([extra[e + 2], extra[e + 3]]) as usize;
            let body = extra
                .get(e + 4..e + 4 + len)
                .ok_or_else(|| c.err(Kind::Malformed, format!("entry '{}' has a cut extra field", clean(&name))))?;
            if id == 1 {
                let mut f = 0usize;
                let mut next = |what: &str| -> Result<u64> {
                    let v = body
                        .get(f..f + 8)
                        .ok_or_else(|| c.err(Kind::Malformed, format!("entry '{}': zip64 field lacks {what}", clean(&name))))?;
                    f += 8;
                    Ok(u64::from_le_bytes(v.try_into().expect("8 bytes")))
                };
                if usize_ == 0xffff_ffff {
                    usize_ = next("the size")?;
                }
                if csize == 0xffff_ffff {
                    csize = next("the compressed size")?;
                }
                if local == 0xffff_ffff {
                    local = next("the header offset")?;
                }
            }
            e += 4 + len;
        }
        if flags & 1 != 0 {
            return Err(c.err(Kind::Unsupported, format!("entry '{}' is encrypted", clean(&name))));
        }
        if !names.insert(name.clone()) {
            return Err(c.err(Kind::Malformed, format!("entry '{}' appears twice", clean(&name))));
        }
        if c.u32(local).ok() != Some(LOCAL_SIG) {
            return Err(c.err(Kind::Malformed, format!("entry '{}': no local header at byte {local}", clean(&name))));
        }
        let lname = c.u16(local + 26)? as u64;
        let lextra = c.u16(local + 28)? as u64;
        if c.slice(local + LOCAL_LEN as u64, lname, "a local name")? != raw_name {
            return Err(c.err(Kind::Malformed, format!("entry '{}': the local header names another file", clean(&name))));
        }
        let data_offset = local + LOCAL_LEN as u64 + lname + lextra;
        if method == 0 && csize != usize_ {
            return Err(c.err(Kind::Malformed, format!("stored entry '{}' has compressed size {csize} but size {usize_}", clean(&name))));
        }
        if data_offset.checked_add(csize).is_none_or(|end| end > cd_offset) {
            return Err(c.err(
                Kind::Truncated,
                format!(
                    "entry '{}' ({csize} bytes at byte {data_offset}) runs into the central directory at byte {cd_offset}",
                    clean(&name)
                ),
            ));
        }
        entries.push((local, Entry { name, method, data_offset, compressed_size: csize, size: usize_, crc32 }));
        at = var + name_len + extra_len + comment_len;
    }
    // No byte in two entries: local header to end of data, in file order.
    entries.sort_by_key(|(l, _)| *l);
    for w in entries.windows(2) {
        let (a, b) = (&w[0].1, &w[1]);
        if a.data_offset + a.compressed_size > b.0 {
            return Err(c.err(Kind::Malformed, format!("entries '{}' and '{}' overlap", clean(&a.name), clean(&b.1.name))));
        }
    }
    Ok(Archive { base, entries: entries.into_iter().map(|(_, e)| e).collect() })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A stored zip archive of `files`, the way miniz lays it out (no alignment padding).
    pub fn zip(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, data) in files {
            let crc = crc32fast::hash(data);
            let local = out.len() as u32;
            out.extend_from_slice(&LOCAL_SIG.to_le_bytes());
            out.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            out.extend_from_slice(&crc.to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(data);
            central.extend_from_slice(&CENTRAL_SIG.to_le_bytes());
            central.extend_from_slice(&[20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            central.extend_from_slice(&crc.to_le_bytes());
            central.extend_from_slice(&(data.len() as u32).to_le_bytes());
            central.extend_from_slice(&(data.len() as u32).to_le_bytes());
            central.extend_from_slice(&(name.len() as u16).to_le_bytes());
            central.extend_from_slice(&[0; 12]);
            central.extend_from_slice(&local.to_le_bytes());
            central.extend_from_slice(name.as_bytes());
        }
        let cd_offset = out.len() as u32;
        out.extend_from_slice(&central);
        out.extend_from_slice(&EOCD_SIG.to_le_bytes());
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(&(files.len() as u16).to_le_bytes());
        out.extend_from_slice(&(files.len() as u16).to_le_bytes());
        out.extend_from_slice(&(central.len() as u32).to_le_bytes());
        out.extend_from_slice(&cd_offset.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out
    }

    fn read_ok(b: &[u8]) -> Archive {
        read(Path::new("t.pt"), "archive", b, 0).unwrap()
    }

    #[test]
    fn entries_and_ranges() {
        let z = zip(&[("a/data.pkl", b"\x80\x02N."), ("a/data/0", &[1, 2, 3, 4])]);
        let a = read_ok(&z);
        let e = a.get("a/data/0").unwrap();
        assert_eq!(&z[e.data_offset as usize..(e.data_offset + e.size) as usize], &[1, 2, 3, 4]);
        assert!(e.stored());
        assert_eq!(e.crc32, crc32fast::hash(&[1, 2, 3, 4]));
    }

    #[test]
    fn cut_and_garbage() {
        let z = zip(&[("a/data.pkl", b"\x80\x02N.")]);
        let e = read(Path::new("t.pt"), "archive", &z[..z.len() - 3], 0).unwrap_err();
        assert_eq!(e.kind(), Kind::Truncated, "{e}");
        let e = read(Path::new("t.pt"), "archive", b"hello world", 0).unwrap_err();
        assert_eq!(e.kind(), Kind::Malformed, "{e}");
        let e = read(Path::new("t.pt"), "archive", b"\x80\x02}q\x00.", 0).unwrap_err();
        assert_eq!(e.kind(), Kind::Unsupported, "{e}");
    }

    #[test]
    fn duplicate_names_overlap_and_encryption() {
        let mut z = zip(&[("x", b"ab"), ("x", b"cd")]);
        assert!(read(Path::new("t"), "archive", &z, 0).unwrap_err().message().contains("twice"));
        // Point the second central entry at the first local header: the two overlap (and the
        // names differ, which is caught first).
        z = zip(&[("x", b"ab"), ("y", b"cd")]);
        let cd = z.len() - EOCD_LEN - 2 * (CENTRAL_LEN + 1);
        let second = cd + CENTRAL_LEN + 1;
        z[second + 42..second + 46].copy_from_slice(&0u32.to_le_bytes());
        assert!(read(Path::new("t"), "archive", &z, 0).unwrap_err().message().contains("another file"));
        z = zip(&[("x", b"ab")]);
        let cd = z.len() - EOCD_LEN - (CENTRAL_LEN + 1);
        z[cd + 8] |= 1;
        assert_eq!(read(Path::new("t"), "archive", &z, 0).unwrap_err().kind(), Kind::Unsupported);
    }
}
