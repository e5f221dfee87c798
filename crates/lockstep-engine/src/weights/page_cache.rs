//! Bringing a checkpoint file into the page cache in 2 MiB pages, so that its memory mapping
//! reads the weights in 2 MiB pages with no copy ([`super::huge_pages`] decides when).
//!
//! A file system that caches files in large folios (ext4 since Linux 6.16, XFS since 5.18)
//! fills a mapping advised `MADV_HUGEPAGE` with 2 MiB folios as it reads the file from disk, and
//! maps each with one page-table entry. But the page cache keeps a file in whatever pages it was
//! first read or written into: 4 KiB pages when the reader went page by page, or when memory was
//! too fragmented for larger ones. Such a file stays in 4 KiB pages for as long as it stays
//! cached, and every later mapping of it pays a TLB miss per 4 KiB.
//!
//! [`in_huge_pages`] maps the file, advised `MADV_HUGEPAGE`, touches one byte per 2 MiB and asks
//! the kernel (`FilePmdMapped` in `/proc/self/smaps`) how much is mapped in 2 MiB pages. When
//! most is not, it drops the file's last whole 2 MiB from the page cache and reads it back: if
//! that comes back as one 2 MiB page, the kernel can do it for this file, and the whole file is
//! dropped and read back the same way, once (after that, the page cache holds it in 2 MiB pages
//! for every later load). The probe keeps a file system that cannot from paying a useless
//! re-read at every load. Only the process's own view of the file changes: the bytes are the
//! file's, and pages another process maps stay as they are (the kernel drops only unmapped
//! clean pages).

use memmap2::{Advice, Mmap};
use std::fs::File;
use std::path::Path;

/// Bytes in one huge page (x86-64 and aarch64 with 4 KiB base pages: a PMD entry).
pub const HUGE_PAGE: usize = 2 << 20;

/// The fraction of a file's whole 2 MiB regions that counts as "in 2 MiB pages".
pub const ENOUGH: f64 = 0.9;

/// How much of a file the page cache holds in 2 MiB pages, as seen through one mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HugePageCount {
    /// Bytes of the file in whole, aligned 2 MiB regions (its length rounded down to 2 MiB).
    pub whole: u64,
    /// Of those, the bytes the mapping maps in 2 MiB pages.
    pub huge: u64,
    /// Bytes dropped from the page cache and read back from the file to get there (0 when the
    /// cache already held it so, or the kernel cannot).
    pub reread: u64,
}

impl HugePageCount {
    /// Whether at least [`ENOUGH`] of the whole regions are in 2 MiB pages (true for a file
    /// under 2 MiB, which has none).
    pub fn enough(&self) -> bool {
        self.huge as f64 >= ENOUGH * self.whole as f64
    }
}

/// Brings `path` into the page cache in 2 MiB pages where the kernel can (see the module
/// docs), and says how much of it is. `None` when that cannot be told: the file cannot be opened
/// or mapped, the mapping is not 2 MiB-aligned, or `/proc/self/smaps` does not say. Never
/// changes a byte of the file or of what a mapping of it reads.
pub fn in_huge_pages(path: &Path) -> Option<HugePageCount> {
    let file = File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let whole = usize::try_from(len).ok()? / HUGE_PAGE * HUGE_PAGE;
    let mut count = HugePageCount {
        whole: whole as u64,
        huge: 0,
        reread: 0,
    };
    if whole == 0 {
        return Some(count);
    }
    count.huge = touch_and_count(&file, 0, whole)?;
    if count.enough() {
        return Some(count);
    }
    // The probe: the last whole 2 MiB, dropped and read back.
    let last = whole - HUGE_PAGE;
    drop_from_page_cache(&file, last, HUGE_PAGE)?;
    if touch_and_count(&file, last, whole)? < HUGE_PAGE as u64 {
        return Some(count);
    }
    drop_from_page_cache(&file, 0, whole)?;
    count.huge = touch_and_count(&file, 0, whole)?;
    count.reread = whole as u64;
    Some(count)
}

/// The fraction of `path`'s 4 KiB pages from byte `from` (a multiple of 4096) on that the page
/// cache holds now (`mincore` over a fresh mapping: no byte is read, nothing is brought in; a
/// hole in a sparse file counts as not held); `None` when that cannot be told (no such file, no
/// mapping, `from` not a page boundary, or not Linux). 1 where no page lies past `from`.
pub fn cached_fraction(path: &Path, from: usize) -> Option<f64> {
    let file = File::open(path).ok()?;
    let len = usize::try_from(file.metadata().ok()?.len()).ok()?;
    if len <= from {
        return Some(1.0);
    }
    if !from.is_multiple_of(4096) {
        return None;
    }
    // SAFETY: read-only mapping that is never read (mincore looks at the page cache only).
    let map = unsafe { memmap2::MmapOptions::new().offset(from as u64).map(&file) }.ok()?;
    let resident = resident_pages(&map)?;
    Some(resident as f64 / map.len().div_ceil(4096) as f64)
}

/// How many of `map`'s 4 KiB pages the page cache holds (`mincore`).
#[cfg(target_os = "linux")]
fn resident_pages(map: &Mmap) -> Option<usize> {
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
    if page != 4096 || map.is_empty() {
        return None;
    }
    let mut vec = vec![0u8; map.len().div_ceil(page)];
    // SAFETY: `map` is a live mapping of `map.len()` bytes starting on a page; `vec` holds one
    // byte per page of it, as mincore writes.
    let rc = unsafe { libc::mincore(map.as_ptr() as *mut _, map.len(), vec.as_mut_ptr()) };
    (rc == 0).then(|| vec.iter().filter(|&&b| b & 1 == 1).count())
}

#[cfg(not(target_os = "linux"))]
fn resident_pages(_: &Mmap) -> Option<usize> {
    None
}

/// Asks the kernel to drop `path`'s clean pages that no mapping holds from the page cache
/// (`POSIX_FADV_DONTNEED`): room for another file's pages. `None` when it cannot be asked.
/// Never changes a byte of the file.
pub fn drop_cached(path: &Path) -> Option<()> {
    let file = File::open(path).ok()?;
    let len = usize::try_from(file.metadata().ok()?.len()).ok()?;
    drop_from_page_cache(&file, 0, len)
}

/// Maps `file` afresh (so no page table of an earlier mapping stands in the way of a 2 MiB
/// entry), advised `MADV_HUGEPAGE`, reads one byte of each 2 MiB in `from..to` (faulting in
/// whole 2 MiB pages where the cache has them, or where a read from disk can make them), and
/// returns the bytes of `from..to` mapped in 2 MiB pages.
fn touch_and_count(file: &File, from: usize, to: usize) -> Option<u64> {
    // SAFETY: read-only mapping of a checkpoint file lockstep never writes; see
    // `map_readonly` for what no loader can guard against.
    let map = unsafe { Mmap::map(file) }.ok()?;
    if !(map.as_ptr() as usize).is_multiple_of(HUGE_PAGE) || map.len() < to {
        return None;
    }
    map.advise(Advice::HugePage).ok()?;
    let mut sum = 0u8;
    for at in (from..to).step_by(HUGE_PAGE) {
        // SAFETY: `at < to <= map.len()`; a volatile read so the touch is not optimized away.
        sum ^= unsafe { std::ptr::read_volatile(map.as_ptr().add(at)) };
    }
    std::hint::black_box(sum);
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    pmd_mapped(&smaps, map.as_ptr() as usize)
}

/// The `FilePmdMapped` bytes of the mapping that starts at address `start`, from the text of
/// `/proc/<pid>/smaps`.
fn pmd_mapped(smaps: &str, start: usize) -> Option<u64> {
    let header = format!("{start:x}-");
    mappings(smaps).find(|(h, _)| h.starts_with(&header))?.1
}

/// Each mapping of `/proc/<pid>/smaps`: its header line and its `FilePmdMapped` bytes (`None`
/// when it has no such line).
fn mappings(smaps: &str) -> impl Iterator<Item = (&str, Option<u64>)> {
    // A header starts with the address range `a-b`; field lines start with `Name:`.
    let is_header = |l: &str| {
        l.split_whitespace()
            .next()
            .is_some_and(|w| w.contains('-') && !w.ends_with(':'))
    };
    let mut lines = smaps.lines().peekable();
    std::iter::from_fn(move || {
        let header = lines.find(|l| is_header(l))?;
        let mut pmd = None;
        while let Some(l) = lines.next_if(|l| !is_header(l)) {
            if let Some(v) = l.strip_prefix("FilePmdMapped:") {
                pmd = v
                    .split_whitespace()
                    .next()
                    .and_then(|kb| kb.parse::<u64>().ok())
                    .and_then(|kb| kb.checked_mul(1024));
            }
        }
        Some((header, pmd))
    })
}

/// Bytes of this process's mappings of files at or under `path` (a checkpoint file, or a model
/// folder) that the kernel maps in 2 MiB pages (`FilePmdMapped` in `/proc/self/smaps`); `None`
/// when that cannot be read.
pub fn mapped_in_huge_pages(path: &Path) -> Option<u64> {
    let path = std::fs::canonicalize(path).ok()?;
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    Some(
        mappings(&smaps)
            .filter(|(h, _)| {
                // The path is the header's last field (file names with spaces aside).
                h.split_whitespace()
                    .last()
                    .is_some_and(|f| Path::new(f).starts_with(&path))
            })
            .filter_map(|(_, pmd)| pmd)
            .sum(),
    )
}

/// Asks the kernel to drop the clean, unmapped pages of `file`'s bytes `offset..offset + len`
/// from the page cache (`POSIX_FADV_DONTNEED`); pages some mapping holds stay.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn drop_from_page_cache(file: &File, offset: usize, len: usize) -> Option<()> {
    use std::os::fd::AsRawFd;
    let (offset, len) = (i64::try_from(offset).ok()?, i64::try_from(len).ok()?);
    // SAFETY: a valid open descriptor; advice changes no byte of the file.
    let rc =
        unsafe { libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_DONTNEED) };
    (rc == 0).then_some(())
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn drop_from_page_cache(_: &File, _: usize, _: usize) -> Option<()> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_gives_the_mapping_s_own_line() {
        let smaps = "\
7f0000000000-7f0000400000 r--s 00000000 fe:00 12 /m/a.safetensors
Size:               4096 kB
Rss:                4096 kB
FilePmdMapped:      2048 kB
VmFlags: rd mr me hg
7f0000600000-7f0000800000 r--s 00000000 fe:00 13 /m/b.safetensors
Size:               2048 kB
VmFlags: rd mr me
";
        assert_eq!(pmd_mapped(smaps, 0x7f00_0000_0000), Some(2048 * 1024));
        // The second mapping has no FilePmdMapped line: not the first one's.
        assert_eq!(pmd_mapped(smaps, 0x7f00_0060_0000), None);
        assert_eq!(pmd_mapped(smaps, 0x7f00_0020_0000), None);
        let all: Vec<_> = mappings(smaps).map(|(h, p)| (&h[..4], p)).collect();
        assert_eq!(all, [("7f00", Some(2 << 20)), ("7f00", None)]);
    }

    /// This process's own mapping of a file, found under its folder, and nothing under a folder
    /// it maps nothing from.
    #[test]
    fn mappings_under_a_folder_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.bin");
        std::fs::write(&p, vec![3u8; 3 * HUGE_PAGE]).unwrap();
        let file = File::open(&p).unwrap();
        // SAFETY: a file of this test's own, not changed while mapped.
        let map = unsafe { Mmap::map(&file) }.unwrap();
        assert_eq!(map[HUGE_PAGE], 3);
        let mine = mapped_in_huge_pages(dir.path()).unwrap();
        assert!(mine <= 3 * HUGE_PAGE as u64);
        let other = tempfile::tempdir().unwrap();
        assert_eq!(mapped_in_huge_pages(other.path()), Some(0));
        drop(map);
    }

    /// A file just written is cached; dropped from the cache (nothing maps it), less of it is,
    /// and reading it brings it back; its bytes never change.
    #[test]
    fn cached_fraction_follows_drops_and_reads() {
        // Under the crate, on the disk the build runs from: a tmpfs `/tmp` never drops pages.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let p = dir.path().join("w.bin");
        let bytes: Vec<u8> = (0..3 * HUGE_PAGE + 5).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &bytes).unwrap();
        File::open(&p).unwrap().sync_all().unwrap();
        assert_eq!(cached_fraction(&p, 0), Some(1.0));
        drop_cached(&p).unwrap();
        let after = cached_fraction(&p, 0).unwrap();
        assert!(after < 1.0, "{after}");
        assert_eq!(std::fs::read(&p).unwrap(), bytes);
        assert_eq!(cached_fraction(&p, 0), Some(1.0));
        // From a page on: only what lies past it; past the end, nothing to hold.
        drop_cached(&p).unwrap();
        assert!(cached_fraction(&p, HUGE_PAGE).unwrap() < 1.0);
        assert_eq!(cached_fraction(&p, 4 * HUGE_PAGE), Some(1.0));
        assert_eq!(cached_fraction(&p, 100), None);
        let empty = dir.path().join("e.bin");
        std::fs::write(&empty, []).unwrap();
        assert_eq!(cached_fraction(&empty, 0), Some(1.0));
        assert_eq!(cached_fraction(&dir.path().join("none"), 0), None);
    }

    /// Whatever the kernel does, the file's bytes read the same afterwards, and the count covers
    /// exactly the whole 2 MiB regions.
    #[test]
    fn bytes_are_unchanged_and_regions_counted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.bin");
        let bytes: Vec<u8> = (0..5 * HUGE_PAGE + 12_345)
            .map(|i| (i * 7 + i / 4099) as u8)
            .collect();
        std::fs::write(&p, &bytes).unwrap();
        if let Some(c) = in_huge_pages(&p) {
            assert_eq!(c.whole, 5 * HUGE_PAGE as u64);
            assert!(c.huge <= c.whole && (c.reread == 0 || c.reread == c.whole));
        }
        assert_eq!(std::fs::read(&p).unwrap(), bytes);

        let small = dir.path().join("s.bin");
        std::fs::write(&small, [1u8; 100]).unwrap();
        let c = in_huge_pages(&small).unwrap();
        assert_eq!((c.whole, c.huge, c.reread), (0, 0, 0));
        assert!(c.enough());
    }
}
