//! Weights in 2 MiB pages, which memory streams faster: the page cache itself where the kernel
//! can hold the file so ([`super::page_cache`]), otherwise a copy of the weights into memory of
//! the process's own ([`Checkpoint::copy_to_huge_pages`]) for a model that fits with room to
//! spare. [`crate::model::Model::load_source`] calls [`into_huge_pages`] unless it streams the
//! layers.
//!
//! Why: a one-token decode step reads every weight once, so it runs at the speed memory streams
//! them. In 4 KiB pages a 1 GB model is 262,144 pages, one TLB miss and page walk each, and the
//! hardware prefetchers stop at every 4 KiB boundary. Measured here (AMD EPYC, 2 cores,
//! alternating passes in one process over 1 GiB): a two-thread read of memory in 2 MiB pages ran
//! at 1.09-1.23× the same read in 4 KiB pages, and the 0.5B model's bf16 decode at 1.07-1.25× per
//! round. The page cache route costs nothing once the cache holds the file in 2 MiB pages (one
//! re-read from disk when it held it in 4 KiB pages); the copy costs its size in memory a second
//! time and the kernel's clearing of fresh 2 MiB pages at every load (0.3-3 s for 1 GB here).
//!
//! Values never change: every kernel reads the file's bytes at the same offsets. The copy takes
//! only the tensors' own byte ranges, read from the mapping in 2 MiB pieces, each dropped from
//! the mapping once copied, so the process never holds the file's pages and the copy at once.
//!
//! `LOCKSTEP_HUGE_PAGES` chooses: `auto` (the default, also when unset or empty) tries the page
//! cache when the kernel offers transparent huge pages, and copies when that fails and the mapped
//! weights are at most [`AUTO_FRACTION`] of `MemAvailable`; `1` / `on` tries the page cache and
//! copies whenever that fails; `copy` copies without trying the page cache; `0` / `off` does
//! neither (the kernel may still map in 2 MiB pages a file its cache holds so).

use super::page_cache;
use super::{Checkpoint, Storage};
use crate::error::{EngineError, Result};
use crate::switch::Switch;
use memmap2::{Advice, Mmap, MmapMut, UncheckedAdvice};
use std::collections::HashMap;
use std::sync::Arc;

/// The environment variable that chooses the route (see the module docs).
pub const ENV: &str = "LOCKSTEP_HUGE_PAGES";

/// In `auto` mode, the weights are copied (when the page cache cannot hold them in 2 MiB pages)
/// when they are at most this fraction of the memory available. The file's pages stay in the
/// page cache after the copy (another process, such as the reference, may read the same file),
/// so the copy costs its size in memory a second time: at a quarter each, the two fit in half of
/// what is available. A 7B model in bf16 (15 GB) on a 23 GB machine is never copied.
pub const AUTO_FRACTION: f64 = 0.25;

/// Bytes copied between drops of the mapping's pages: the most of the file the process holds
/// on top of the copy while it is made.
const PIECE: usize = 2 << 20;

/// What `LOCKSTEP_HUGE_PAGES` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `auto`, `on` or `off` (see the module docs).
    Switch(Switch),
    /// `copy`: copy the weights without trying the page cache.
    Copy,
}

impl Route {
    /// The route `LOCKSTEP_HUGE_PAGES` asks for; a bad value is a one-line error.
    pub fn from_env() -> Result<Self> {
        let v = std::env::var(ENV).unwrap_or_default();
        if v.trim().eq_ignore_ascii_case("copy") {
            return Ok(Route::Copy);
        }
        Switch::parse(ENV, &v).map(Route::Switch).map_err(|_| {
            EngineError::Input(format!(
                "{ENV}={v:?} is not one of auto, on (1), off (0), copy"
            ))
        })
    }
}

/// Puts `ck`'s weights (`mapped` bytes memory-mapped, `available` bytes of memory) in 2 MiB pages
/// as `LOCKSTEP_HUGE_PAGES` asks (see the module docs), before any tensor is handed out. A bad
/// value is a one-line error; a route the kernel refuses leaves the weights as they were.
pub fn into_huge_pages(ck: &mut Checkpoint, mapped: u64, available: Option<u64>) -> Result<()> {
    let switch = match Route::from_env()? {
        Route::Switch(Switch::Off) => return Ok(()),
        Route::Copy => {
            ck.copy_to_huge_pages();
            return Ok(());
        }
        Route::Switch(s) => s,
    };
    if mapped == 0 || (switch == Switch::Auto && !kernel_offers_them()) {
        return Ok(());
    }
    // Every file is brought in, even after one could not be.
    let cached = ck
        .files
        .iter()
        .map(|f| page_cache::in_huge_pages(f).is_some_and(|c| c.enough()))
        .fold(true, |all, this| all & this);
    let copy =
        switch.is_on(|| available.is_some_and(|a| mapped as f64 <= AUTO_FRACTION * a as f64));
    if !cached && copy {
        ck.copy_to_huge_pages();
    }
    Ok(())
}

/// Whether the kernel offers transparent huge pages to a region that asks for them
/// (`/sys/kernel/mm/transparent_hugepage/enabled` is `[always]` or `[madvise]`).
fn kernel_offers_them() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|s| s.contains("[always]") || s.contains("[madvise]"))
}

impl Checkpoint {
    /// Copies the bytes of every memory-mapped tensor into anonymous memory advised
    /// `MADV_HUGEPAGE` (one region per file, each tensor at its offset in the file), and points
    /// each tensor at its copy. Returns the bytes copied: only the tensors' own ranges, so the
    /// bytes of a tensor already held in memory of its own (a GGUF tensor reordered at load) are
    /// neither copied nor backed. A file whose copy cannot be made (no memory for it, or the
    /// kernel refusing the advice) stays mapped: the copy only makes reading faster.
    pub fn copy_to_huge_pages(&mut self) -> u64 {
        // Each mapped file's tensor ranges.
        let mut ranges: HashMap<*const Mmap, FileSpans> = HashMap::new();
        for t in self.tensors.values() {
            if let Storage::Mapped(map) = &t.storage {
                let e = ranges
                    .entry(Arc::as_ptr(map))
                    .or_insert_with(|| (Arc::clone(map), vec![]));
                e.1.push((t.start, t.end));
            }
        }
        let mut copied = 0u64;
        let mut copies: HashMap<*const Mmap, Arc<Mmap>> = HashMap::new();
        for (key, (map, mut spans)) in ranges {
            spans.sort_unstable();
            if let Some(copy) = huge_copy(&map, &spans) {
                copied += merged(&spans).map(|(a, b)| (b - a) as u64).sum::<u64>();
                copies.insert(key, Arc::new(copy));
            }
        }
        for t in self.tensors.values_mut() {
            if let Storage::Mapped(map) = &t.storage {
                if let Some(c) = copies.get(&Arc::as_ptr(map)) {
                    t.storage = Storage::Resident(Arc::clone(c));
                }
            }
        }
        copied
    }
}

/// A mapped file and the byte ranges `start..end` its tensors read.
type FileSpans = (Arc<Mmap>, Vec<(usize, usize)>);

/// `spans` (sorted by start) with overlapping and touching ones joined.
fn merged(spans: &[(usize, usize)]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut it = spans.iter().copied().peekable();
    std::iter::from_fn(move || {
        let (a, mut b) = it.next()?;
        while let Some(&(c, d)) = it.peek() {
            if c > b {
                break;
            }
            b = b.max(d);
            it.next();
        }
        Some((a, b))
    })
}

/// One region of anonymous memory for many matrices' derived bytes (their 12-bit codings, their
/// bf16 copies), so that all of it can sit in 2 MiB pages: parts of `lens` bytes one after
/// another, each at a multiple of 64 bytes, from a 2 MiB boundary, advised `MADV_HUGEPAGE` (a
/// hint: without such pages the bytes are still right). Returns the region and each part's
/// start in it; `None` when there is nothing to hold or the memory is refused. Coded alone, a
/// matrix smaller than 2 MiB could never have such a page, and a larger one only the whole
/// pages inside its own mapping.
pub(crate) fn shared_region(lens: &[usize]) -> Option<(MmapMut, Vec<usize>)> {
    let total: usize = lens.iter().map(|l| l.next_multiple_of(64)).sum();
    if total == 0 {
        return None;
    }
    let region = MmapMut::map_anon(total + page_cache::HUGE_PAGE).ok()?;
    let _ = region.advise(Advice::HugePage);
    let first = region.as_ptr().align_offset(page_cache::HUGE_PAGE);
    let starts = lens
        .iter()
        .scan(first, |at, &len| {
            let start = *at;
            *at += len.next_multiple_of(64);
            Some(start)
        })
        .collect();
    Some((region, starts))
}

/// The parts of a [`shared_region`] to fill, `lens` bytes at `starts` each (disjoint: they
/// can be filled in parallel).
pub(crate) fn region_parts<'a>(
    region: &'a mut MmapMut,
    starts: &[usize],
    lens: &[usize],
) -> Vec<&'a mut [u8]> {
    let mut parts = Vec::with_capacity(lens.len());
    let mut rest = &mut region[..];
    let mut at = 0;
    for (&start, &len) in starts.iter().zip(lens) {
        let (_, tail) = rest.split_at_mut(start - at);
        let (part, tail) = tail.split_at_mut(len);
        parts.push(part);
        (rest, at) = (tail, start + len);
    }
    parts
}

/// A region the size of `map`, anonymous and advised `MADV_HUGEPAGE`, holding `map`'s bytes in
/// `spans` (sorted by start; the rest is never touched, so never backed), read-only; `None` when
/// the memory or the advice is refused. `map`'s pages are dropped from it piece by piece as they
/// are copied.
fn huge_copy(map: &Mmap, spans: &[(usize, usize)]) -> Option<Mmap> {
    if map.is_empty() {
        return None;
    }
    let mut copy = MmapMut::map_anon(map.len()).ok()?;
    copy.advise(Advice::HugePage).ok()?;
    for (a, b) in merged(spans) {
        for start in (a..b).step_by(PIECE) {
            let end = (start + PIECE).min(b);
            copy[start..end].copy_from_slice(&map[start..end]);
            // SAFETY: MADV_DONTNEED on a read-only file mapping only unmaps the pages; a later
            // read (a tensor not yet pointed at the copy) faults them back in from the file with
            // the same bytes. memmap2 rounds `start` down to its page; the range lies inside the
            // map. Advice is a hint: an error changes nothing read.
            let _ = unsafe {
                map.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }
    copy.make_read_only().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::{PageAdvice, Tensor};

    /// The copy holds the same bytes at the same offsets, is no longer a file mapping, and
    /// survives `DontNeed` advice (which on anonymous memory would zero the pages, were it
    /// passed on).
    #[test]
    fn the_copy_has_the_same_bytes_and_ignores_page_advice() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b): (Vec<f32>, Vec<f32>) = (
            (0..300_000).map(|i| i as f32 * 0.5 - 7.0).collect(),
            (0..70_001).map(|i| (i as f32).sin()).collect(),
        );
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (ab, bb) = (bytes(&a), bytes(&b));
        let views = [
            (
                "a",
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![600, 500], &ab)
                    .unwrap(),
            ),
            (
                "b",
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![70_001], &bb)
                    .unwrap(),
            ),
        ];
        safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
        let mut ck = Checkpoint::open(dir.path()).unwrap();
        let before: Vec<Vec<u8>> = ck.tensors.values().map(|t| t.bytes().to_vec()).collect();
        assert!(ck.tensors.values().all(|t| t.is_mapped()));
        let copied = ck.copy_to_huge_pages();
        assert_eq!(copied, (ab.len() + bb.len()) as u64);
        for (t, want) in ck.tensors.values().zip(&before) {
            assert!(!t.is_mapped());
            t.advise(PageAdvice::DontNeed);
            assert_eq!(t.bytes(), &want[..]);
        }
        // A second call finds nothing mapped left to copy.
        assert_eq!(ck.copy_to_huge_pages(), 0);

        // A tensor already in memory of its own is not copied again: only the other's range is.
        let mut ck = Checkpoint::open(dir.path()).unwrap();
        let a = ck.tensors["a"].clone();
        let own = Tensor::from_bytes(a.dtype, a.shape.clone(), a.bytes().to_vec());
        ck.tensors.insert("a".into(), own);
        assert_eq!(ck.copy_to_huge_pages(), bb.len() as u64);
        assert_eq!(ck.tensors["a"].bytes(), &ab[..]);
        assert_eq!(ck.tensors["b"].bytes(), &bb[..]);
        assert!(ck.tensors["b"].in_huge_pages() && !ck.tensors["a"].in_huge_pages());
    }

    #[test]
    fn spans_merge_when_they_overlap_or_touch() {
        let spans = [(0, 4), (2, 6), (6, 8), (10, 12), (11, 11), (20, 30)];
        let m: Vec<_> = merged(&spans).collect();
        assert_eq!(m, [(0, 8), (10, 12), (20, 30)]);
        assert_eq!(merged(&[]).count(), 0);
    }
}
