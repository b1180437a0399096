//! PyTorch sources as [`Checkpoint`]s of the one tensor store.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{dcp, torch, Info};
use crate::error::{clean, Error, IoContext, Result};
use crate::store::{Checkpoint, Encoding, Format, SourceFile, TensorEntry};

/// Open a `torch.save` file: every tensor of its (nested) dict, as a byte range of the map.
pub fn open_torch(path: &Path) -> Result<Checkpoint> {
    let f = SourceFile::open(path)?;
    let parsed = torch::parse(path, "torch.save archive", f.bytes(), 0)?;
    let loaded = torch::tensors(path, "torch.save archive", &parsed)?;
    let shared = {
        let mut per: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for t in &loaded.tensors {
            *per.entry(t.storage.as_str()).or_default() += 1;
        }
        per.values().filter(|&&n| n > 1).map(|n| n - 1).sum::<usize>()
    };
    let mut notes = Vec::new();
    if shared > 0 {
        notes.push(format!("{shared} tensors are views of a storage another tensor uses (served from the same bytes)"));
    }
    if loaded.values_dropped > 0 {
        notes.push(format!("{} more non-tensor values not listed", loaded.values_dropped));
    }
    let tensors = loaded
        .tensors
        .into_iter()
        .map(|t| TensorEntry { name: t.name, encoding: Encoding::Dense(t.dtype), shape: t.shape, file: 0, offset: t.offset, len: t.len })
        .collect();
    Ok(Checkpoint {
        path: path.to_path_buf(),
        format: Format::Pytorch,
        files: vec![f],
        tensors,
        metadata: Vec::new(),
        index: None,
        config: None,
        gguf: None,
        pytorch: Some(Info { container: "torch.save".into(), values: loaded.values, notes }),
    })
}

static SPILLS: AtomicU64 = AtomicU64::new(0);

/// An unlinked scratch file in the system temp folder (it disappears with its last handle).
fn scratch() -> Result<(File, PathBuf)> {
    let dir = std::env::temp_dir();
    let n = SPILLS.fetch_add(1, Ordering::Relaxed);
    let p = dir.join(format!(".phasekit-dcp-{}-{n}.tmp", std::process::id()));
    let f = OpenOptions::new().read(true).write(true).create_new(true).open(&p).with_file(&p)?;
    fs::remove_file(&p).with_file(&p)?;
    Ok((f, p))
}

/// Open a DCP folder. When its names are `model.*` plus other subtrees (`optimizer.*`: the
/// state dict of `torch.distributed.checkpoint.state_dict.get_state_dict`), only the model is
/// served, without the `model.` prefix; otherwise every tensor under its full name.
pub fn open_dcp(dir: &Path) -> Result<Checkpoint> {
    let md_path = dir.join(".metadata");
    let md = SourceFile::open(&md_path)?;
    let mut index = dcp::read_metadata(&md_path, md.bytes())?;
    let mut notes = Vec::new();
    let top = |n: &str| n.split('.').next().unwrap_or("").to_string();
    let has_model = index.tensors.iter().any(|t| top(&t.name) == "model");
    let others: std::collections::BTreeSet<String> =
        index.tensors.iter().map(|t| top(&t.name)).chain(index.values.iter().map(|v| top(v))).filter(|t| t != "model").collect();
    let mut strip = "";
    if has_model && !others.is_empty() {
        let before = index.tensors.len();
        index.tensors.retain(|t| top(&t.name) == "model");
        let skipped_values = index.values.iter().filter(|v| top(v) != "model").count();
        notes.push(format!(
            "serving the 'model' subtree ({} tensors) without its prefix; skipped {} tensors and {skipped_values} values under {}",
            index.tensors.len(),
            before - index.tensors.len(),
            others.iter().map(|o| format!("'{}'", clean(o))).collect::<Vec<_>>().join(", ")
        ));
        strip = "model.";
    }
    if !index.values.is_empty() && strip.is_empty() {
        notes.push(format!("{} non-tensor values (torch.save'd Python objects) not read", index.values.len()));
    }
    let mut files = index.files.iter().map(|f| SourceFile::open(&dir.join(f))).collect::<Result<Vec<_>>>()?;
    let views: Vec<(&Path, &[u8])> = files.iter().map(|f| (f.path.as_path(), f.bytes())).collect();
    let located = dcp::locate(&index, &views)?;
    let chunked: u64 = located.iter().filter(|t| t.whole().is_none()).map(|t| t.bytes()).sum();
    let spill = if chunked > 0 {
        let (file, p) = scratch()?;
        let offsets = dcp::consolidate(&located, &views, &file, &p, &|f, o, l| files[f].release(o, l))?;
        let n = offsets.iter().filter(|o| o.is_some()).count();
        notes.push(format!("{n} tensors are split into chunks (shards); copied once into a temporary file ({chunked} bytes)"));
        Some((file, offsets))
    } else {
        None
    };
    drop(views);
    let spill_index = files.len();
    let mut tensors = Vec::with_capacity(located.len());
    for (i, t) in located.into_iter().enumerate() {
        let (file, offset, len) = match (t.whole(), &spill) {
            (Some(w), _) => w,
            (None, Some((_, offs))) => (spill_index, offs[i].expect("consolidated"), t.bytes()),
            (None, None) => unreachable!("chunked tensors are consolidated"),
        };
        let name = t.name.strip_prefix(strip).unwrap_or(&t.name).to_string();
        tensors.push(TensorEntry { name, encoding: Encoding::Dense(t.dtype), shape: t.shape, file, offset, len });
    }
    if let Some((file, _)) = spill {
        files.push(SourceFile::from_file(&dir.join("(shards consolidated in a temporary file)"), file)?);
    }
    let values = index.version.map(|v| vec![("version".to_string(), format!("'{}'", clean(&v)))]).unwrap_or_default();
    if files.is_empty() {
        return Err(Error::malformed(&md_path, "the checkpoint has no data files"));
    }
    Ok(Checkpoint {
        path: dir.to_path_buf(),
        format: Format::Dcp,
        files,
        tensors,
        metadata: Vec::new(),
        index: None,
        config: None,
        gguf: None,
        pytorch: Some(Info { container: "torch.distributed.checkpoint".into(), values, notes }),
    })
}
