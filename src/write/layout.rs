//! The data order of one output file, and the padding that keeps large copies page-congruent.
//!
//! Readers do not care in which order a safetensors data buffer holds its tensors; the official
//! writer's order (widest dtype first, then by name) is a convention. For outputs that copy a
//! lot from a memory-mapped source, the order and the exact offsets decide the speed:
//! - one `copy_file_range` per tensor measured up to 30 % slower than one call per run of
//!   tensors that are contiguous in the source, so large copies keep the source's order;
//! - on ext4 with large folios (Linux 6.16+), copying between offsets that agree only modulo the
//!   4 KiB page measured 25–40 % slower than between offsets that agree modulo 64 KiB
//!   ([`CONGRUENCE`]), and the fsync after such a copy 30 % slower again (docs/performance.md).
//!
//! So from [`CONGRUENT_MIN_BYTES`] of copied bytes on, [`Layout::SourceOrder`] keeps the source
//! order and pads the JSON header with spaces (every reader accepts JSON whitespace; the official
//! writer pads with spaces too, to 8 bytes), and [`Layout::PaddingTensors`] puts a zero U8 tensor
//! before every run of copies (one header padding cannot align copies from several sources).

use std::collections::HashMap;

use super::sink::KERNEL_COPY_MIN;
use super::{Data, Layout, Tensor};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::safetensors::{self, HeaderPlan, Planned};

/// Copied bytes land at their source offset modulo this many bytes.
pub const CONGRUENCE: u64 = 64 << 10;
/// Copied bytes from which an output is laid out for page-congruent copies.
pub const CONGRUENT_MIN_BYTES: u64 = 64 << 20;
/// The longest padding tensor of [`Layout::PaddingTensors`] (its data is under 64 KiB).
pub const MAX_PADDING: u64 = CONGRUENCE - 8;

/// One entry of a file's data: a tensor (index into the writer's list) or padding zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Item {
    T(usize),
    Pad(u64),
}

/// A file's entries in data order, as the header planner takes them, and the JSON padding that
/// brings the header to its planned length.
pub(super) struct FileLayout {
    pub items: Vec<Item>,
    planned: Vec<Planned>,
    json_pad: usize,
}

impl FileLayout {
    /// The header for `metadata` (the same length for every metadata of the same length).
    pub fn header(&self, metadata: Option<&[(String, String)]>) -> Result<HeaderPlan> {
        let mut h = safetensors::plan_in_order(self.planned.clone(), metadata)?;
        if self.json_pad > 0 {
            h.pad_json(self.json_pad)?;
        }
        Ok(h)
    }
}

pub(super) fn planned(t: &Tensor) -> Planned {
    Planned { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone() }
}

/// A copy from a mapped source: (the source, offset, length).
fn mapped<'t>(t: &'t Tensor) -> Option<(&'t crate::store::SourceFile, u64, u64)> {
    match t.data {
        Data::Mapped { file, offset, len } => Some((file, offset, len)),
        _ => None,
    }
}

/// The identity of a source file, for finding runs.
fn key(f: &crate::store::SourceFile) -> usize {
    f as *const _ as usize
}

/// The run of entries from `at` on whose bytes follow each other in one source: its end
/// (exclusive) and byte length. `source(k)` gives entry k's (source key, offset, length), or
/// `None` for an entry that is not a plain copy (which ends the run).
pub(super) fn source_run<K: PartialEq>(at: usize, source: impl Fn(usize) -> Option<(K, u64, u64)>) -> (usize, u64) {
    let Some((key, start, _)) = source(at) else { return (at, 0) };
    let (mut end, mut len) = (at, 0);
    while let Some((k, offset, l)) = source(end) {
        if k != key || offset != start + len {
            break;
        }
        len += l;
        end += 1;
    }
    (end, len)
}

/// Lay out the tensors `shard` (indices into `tensors`) of one file.
pub(super) fn plan(tensors: &[Tensor], shard: &[usize], metadata: Option<&[(String, String)]>, layout: &Layout) -> Result<FileLayout> {
    let official = || -> Result<FileLayout> {
        let h = safetensors::plan(shard.iter().map(|&i| planned(&tensors[i])).collect(), metadata)?;
        let by_name: HashMap<&str, usize> = shard.iter().map(|&i| (tensors[i].name.as_str(), i)).collect();
        let items = h.order.iter().map(|p| Item::T(by_name[p.name.as_str()])).collect();
        Ok(FileLayout { items, planned: h.order, json_pad: 0 })
    };
    match layout {
        Layout::Official => official(),
        Layout::SourceOrder => {
            let kernel = |i: usize| mapped(&tensors[i]).filter(|m| m.2 >= KERNEL_COPY_MIN);
            let copied: u64 = shard.iter().filter_map(|&i| kernel(i)).map(|m| m.2).sum();
            if copied < CONGRUENT_MIN_BYTES {
                return official();
            }
            let mut order = shard.to_vec();
            order.sort_by_key(|&i| tensors[i].origin.unwrap_or((usize::MAX, 0)));
            let planned_order: Vec<Planned> = order.iter().map(|&i| planned(&tensors[i])).collect();
            let h = safetensors::plan_in_order(planned_order.clone(), metadata)?;
            // The header padding (a multiple of 8, below 64 KiB) that puts the most copied bytes
            // at their source offset modulo CONGRUENCE.
            let base = h.bytes.len() as u64;
            let mut votes: HashMap<u64, u64> = HashMap::new();
            for (&i, (b, _)) in order.iter().zip(&h.offsets) {
                let Some((_, offset, len)) = kernel(i) else { continue };
                let want = (offset + CONGRUENCE - (base + b) % CONGRUENCE) % CONGRUENCE;
                if want % 8 == 0 {
                    *votes.entry(want).or_default() += len;
                }
            }
            let pad = votes.into_iter().max_by_key(|&(p, bytes)| (bytes, std::cmp::Reverse(p))).map_or(0, |(p, _)| p);
            Ok(FileLayout { items: order.into_iter().map(Item::T).collect(), planned: planned_order, json_pad: pad as usize })
        }
        Layout::PaddingTensors { prefix } => padding_tensors(tensors, shard, metadata, prefix, official),
    }
}

/// [`Layout::PaddingTensors`]: tensors that are computed first (official order), then the plain
/// copies in source order, so that whole runs of a source file go to the kernel as one copy, with
/// a `<prefix><k>` tensor before each run of at least 1 MiB that puts it at its source offset
/// modulo [`CONGRUENCE`].
fn padding_tensors(
    tensors: &[Tensor],
    shard: &[usize],
    metadata: Option<&[(String, String)]>,
    prefix: &str,
    official: impl Fn() -> Result<FileLayout>,
) -> Result<FileLayout> {
    let copied: u64 = shard.iter().filter_map(|&i| mapped(&tensors[i])).map(|m| m.2).sum();
    if copied < CONGRUENT_MIN_BYTES {
        return official();
    }
    let (mut copies, computed): (Vec<usize>, Vec<usize>) = shard.iter().partition(|&&i| mapped(&tensors[i]).is_some());
    copies.sort_by_key(|&i| tensors[i].origin.unwrap_or((usize::MAX, 0)));
    let src = |i: usize| mapped(&tensors[i]).expect("a copy");
    let by_name: HashMap<&str, usize> = computed.iter().map(|&i| (tensors[i].name.as_str(), i)).collect();
    let mut items: Vec<Item> = safetensors::plan(computed.iter().map(|&i| planned(&tensors[i])).collect(), None)?
        .order
        .iter()
        .map(|p| Item::T(by_name[p.name.as_str()]))
        .collect();
    // Runs of copies that follow each other in one source file; a padding slot before each run
    // long enough to be copied by the kernel.
    let mut k = 0;
    while k < copies.len() {
        let (end, len) = source_run(k, |m| copies.get(m).map(|&i| src(i)).map(|(f, o, l)| (key(f), o, l)));
        if len >= KERNEL_COPY_MIN {
            items.push(Item::Pad(MAX_PADDING));
        }
        items.extend(copies[k..end].iter().map(|&i| Item::T(i)));
        k = end;
    }
    let plan_items = |items: &[Item]| -> Vec<Planned> {
        let mut pads = 0;
        items
            .iter()
            .map(|it| match *it {
                Item::T(i) => planned(&tensors[i]),
                Item::Pad(n) => {
                    pads += 1;
                    Planned { name: format!("{prefix}{}", pads - 1), dtype: DType::U8, shape: vec![n] }
                }
            })
            .collect()
    };
    // Every padding at its longest gives the longest header (every number has at least as many
    // digits); the real header is padded with spaces to that length, and the paddings are sized
    // for data that starts there.
    let longest = safetensors::plan_in_order(plan_items(&items), metadata)?.bytes.len() as u64;
    let mut at = longest;
    let mut sized = Vec::with_capacity(items.len());
    for (n, it) in items.iter().enumerate() {
        match *it {
            Item::T(i) => {
                at += tensors[i].size()?;
                sized.push(Item::T(i));
            }
            Item::Pad(_) => {
                let Some(Item::T(first)) = items.get(n + 1) else { continue };
                let (_, offset, _) = src(*first);
                let want = (offset % CONGRUENCE + CONGRUENCE - at % CONGRUENCE) % CONGRUENCE;
                // The run lands exactly as aligned as in its source.
                if want > 0 {
                    at += want;
                    sized.push(Item::Pad(want));
                }
            }
        }
    }
    let planned_items = plan_items(&sized);
    let real = safetensors::plan_in_order(planned_items.clone(), metadata)?.bytes.len() as u64;
    if real > longest {
        return Err(Error::internal(format!("padded header is {real} bytes, over its bound {longest}")));
    }
    Ok(FileLayout { items: sized, planned: planned_items, json_pad: (longest - real) as usize })
}
