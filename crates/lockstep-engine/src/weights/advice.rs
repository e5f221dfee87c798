//! Telling the kernel which mapped tensors are about to be read and which are done with, so a
//! forward pass can stream a model larger than memory through the page cache layer by layer
//! ([`crate::model::Model::stream_layers`]).
//!
//! Advice never changes a value: a page dropped from the mapping is read back from the file, with
//! the same bytes, when it is next touched. Tensors held in memory of their own (GGUF tensors
//! reordered at load) take no advice.

use super::{Storage, Tensor};
use memmap2::{Advice, UncheckedAdvice};

/// What a tensor's pages are about to be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageAdvice {
    /// About to be read: start reading the tensor's pages from the file now (`MADV_WILLNEED`).
    WillNeed,
    /// Done with for now: take the tensor's pages out of this process's mapping
    /// (`MADV_DONTNEED`), so they stop counting in its resident set and the kernel may reclaim
    /// them from the page cache.
    DontNeed,
}

/// The alignment a dropped range is shrunk to: 64 KiB, a multiple of every page size Linux uses
/// (4, 16 and 64 KiB), so the range is whole pages whatever the machine's page size.
const DROP_ALIGN: usize = 64 << 10;

impl Tensor {
    /// Advises the kernel about this tensor's bytes (a no-op for a tensor in memory of its own).
    ///
    /// [`PageAdvice::WillNeed`] covers every page the tensor touches. [`PageAdvice::DontNeed`]
    /// covers only the 64 KiB-aligned part lying wholly inside the tensor, so a page shared with
    /// a neighbouring tensor (the last layer's norm, the next layer's first matrix) is never
    /// dropped under a tensor still in use; a tensor smaller than that drops nothing. Advice is a
    /// hint: an error from the kernel is ignored, since the values read are the same either way.
    pub fn advise(&self, advice: PageAdvice) {
        let Storage::Mapped(map) = &self.storage else {
            return;
        };
        if self.end <= self.start {
            return;
        }
        match advice {
            PageAdvice::WillNeed => {
                // memmap2 rounds the offset down to its page; the range stays inside the map.
                let _ = map.advise_range(Advice::WillNeed, self.start, self.end - self.start);
            }
            PageAdvice::DontNeed => {
                let base = map.as_ptr() as usize;
                let Some((from, to)) = inner_range(base + self.start, base + self.end) else {
                    return;
                };
                // SAFETY: MADV_DONTNEED on a read-only file mapping only unmaps the pages; the
                // next read faults them back in from the file with the same bytes, so every
                // reference into the map (this tensor's and its neighbours') stays valid and
                // reads the same values. The range is whole pages inside the map.
                let _ = unsafe {
                    map.unchecked_advise_range(UncheckedAdvice::DontNeed, from - base, to - from)
                };
            }
        }
    }
}

/// The largest `DROP_ALIGN`-aligned address range inside `start..end`, `None` when empty.
fn inner_range(start: usize, end: usize) -> Option<(usize, usize)> {
    let from = start.checked_add(DROP_ALIGN - 1)? / DROP_ALIGN * DROP_ALIGN;
    let to = end / DROP_ALIGN * DROP_ALIGN;
    (from < to).then_some((from, to))
}

/// Advises the kernel about every tensor of `tensors` ([`Tensor::advise`]).
pub fn advise_all<'a>(tensors: impl IntoIterator<Item = &'a Tensor>, advice: PageAdvice) {
    for t in tensors {
        t.advise(advice);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::StoredDtype;

    #[test]
    fn dropped_ranges_are_whole_aligned_blocks_inside_the_tensor() {
        let a = DROP_ALIGN;
        assert_eq!(inner_range(0, a), Some((0, a)));
        assert_eq!(inner_range(1, 3 * a - 1), Some((a, 2 * a)));
        assert_eq!(inner_range(a + 5, 2 * a), None);
        assert_eq!(inner_range(10, 20), None);
        assert_eq!(inner_range(a, a), None);
    }

    #[test]
    fn advice_leaves_every_value_as_it_was() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.bin");
        let bytes: Vec<u8> = (0..(1usize << 20) + 4096 + 12)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        std::fs::write(&p, &bytes).unwrap();
        let map = std::sync::Arc::new(crate::weights::map_readonly(&p).unwrap());
        // Two tensors sharing a page at an unaligned boundary.
        let cut = (1 << 19) + 6;
        let len = bytes.len() - 12;
        let t1 = Tensor::mapped(
            map.clone(),
            12,
            cut,
            StoredDtype::BF16,
            vec![(cut - 12) / 2],
        );
        let t2 = Tensor::mapped(
            map,
            cut,
            len + 12,
            StoredDtype::BF16,
            vec![(len - cut + 12) / 2],
        );
        for _ in 0..2 {
            t1.advise(PageAdvice::WillNeed);
            t2.advise(PageAdvice::DontNeed);
            assert_eq!(t1.bytes(), &bytes[12..cut]);
            t1.advise(PageAdvice::DontNeed);
            assert_eq!(t2.bytes(), &bytes[cut..]);
            assert_eq!(t1.bytes(), &bytes[12..cut]);
        }
        // Owned tensors take no advice.
        let o = Tensor::from_bytes(StoredDtype::F32, vec![2], vec![1, 2, 3, 4, 5, 6, 7, 8]);
        o.advise(PageAdvice::DontNeed);
        assert_eq!(o.bytes(), [1, 2, 3, 4, 5, 6, 7, 8]);
    }
}
