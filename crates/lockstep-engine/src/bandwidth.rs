//! The machine's read bandwidth: the rate a decode step, which streams every weight once, is
//! judged against (`lockstep bench`), and the pieces of its test that other measurements reuse to
//! read bytes the same way (`examples/stream_check.rs`).
//!
//! The test sums a buffer far larger than any cache in one contiguous part per thread (as many
//! threads as the engine's kernels run on), in 2 MiB pages where the kernel grants them (as the
//! weights are), each pass in one of [`READS`]: plain loads, and loads with a software prefetch
//! of every cache line 4 or 8 KiB ahead. The figure is its best pass of all, after one pass of
//! each kind that warms up: the best this machine streams.
//!
//! The prefetched kinds are there because a plain read is not the best this machine streams. On
//! a 2-core AMD EPYC Zen 5 (2026-12-05, best of five passes of each, medians of four rounds, six
//! runs) a prefetched read read 13-26% more than a plain one whenever the memory ran at its fast
//! level (62.6-64.9 GB/s plain, 70.4-77.1 prefetched), and -3% to +10% at its slow level (41-47
//! GB/s). A test of plain reads alone understated the fast level by up to a fifth, in favour of
//! the decode it judges.

use std::time::Instant;

/// Bytes in the test's buffer (512 MiB, far beyond any cache).
pub const TEST_BYTES: usize = 512 << 20;

/// The test's buffer: [`TEST_BYTES`] of anonymous memory, asked for in 2 MiB pages
/// (`MADV_HUGEPAGE`) and written once, so that every page is present before it is read.
pub struct TestBuffer {
    map: memmap2::MmapMut,
}

impl TestBuffer {
    /// Maps and fills the buffer; `Err` where the OS refuses the memory.
    pub fn new() -> std::io::Result<Self> {
        let mut map = memmap2::MmapMut::map_anon(TEST_BYTES)?;
        // A hint: refused, the test reads 4 KiB pages.
        let _ = map.advise(memmap2::Advice::HugePage);
        // SAFETY: an anonymous map is page-aligned (so 8-byte aligned) and `TEST_BYTES` long;
        // any bit pattern is a u64.
        let words: &mut [u64] =
            unsafe { std::slice::from_raw_parts_mut(map.as_mut_ptr().cast(), TEST_BYTES / 8) };
        for (i, w) in words.iter_mut().enumerate() {
            *w = i as u64;
        }
        Ok(Self { map })
    }

    /// The buffer as 64-bit words.
    pub fn words(&self) -> &[u64] {
        // SAFETY: as in `new`: aligned, `TEST_BYTES` long, any bits are a u64.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().cast(), TEST_BYTES / 8) }
    }
}

/// Wrapping sum of `words` in eight independent lanes: the loop vectorizes and is bound by
/// memory, not by the adds (a trailing part shorter than eight words is left out).
pub fn sum_words(words: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    for v in words.chunks_exact(8) {
        for l in 0..8 {
            acc[l] = acc[l].wrapping_add(v[l]);
        }
    }
    acc.iter().fold(0u64, |a, &b| a.wrapping_add(b))
}

/// How a pass of the test reads its words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Read {
    /// Plain loads: the hardware's prefetcher alone runs ahead ([`sum_words`]).
    Plain,
    /// Loads with a software prefetch of every cache line `ahead` bytes ahead
    /// ([`sum_words_prefetched`]).
    Prefetched {
        /// Bytes ahead of the line being summed.
        ahead: usize,
    },
}

/// The kinds of pass [`read_bandwidth`] takes the best of.
pub const READS: [Read; 3] = [
    Read::Plain,
    Read::Prefetched { ahead: 4 << 10 },
    Read::Prefetched { ahead: 8 << 10 },
];

/// [`sum_words`] with a prefetch of the cache line `ahead` bytes past each 64 bytes summed (a
/// hint, which never faults past the slice's end). Where the CPU has no prefetch instruction
/// this crate uses, [`sum_words`].
pub fn sum_words_prefetched(words: &[u64], ahead: usize) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let mut acc = [0u64; 8];
        for v in words.chunks_exact(8) {
            // SAFETY: a prefetch is a hint: any address, in or out of the slice, is allowed
            // and never faults (`wrapping_add` forms it without a claim that it is in bounds).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(v.as_ptr().cast::<i8>().wrapping_add(ahead)) };
            for l in 0..8 {
                acc[l] = acc[l].wrapping_add(v[l]);
            }
        }
        acc.iter().fold(0u64, |a, &b| a.wrapping_add(b))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ahead;
        sum_words(words)
    }
}

/// Sums `words` as `read` says in `threads` contiguous parts, one scoped thread each; the
/// wrapping sum of the parts' sums.
pub fn sum_in_parts(words: &[u64], threads: usize, read: Read) -> u64 {
    let part = words.len().div_ceil(threads.max(1)).max(1);
    let sum = move |c: &[u64]| match read {
        Read::Plain => sum_words(c),
        Read::Prefetched { ahead } => sum_words_prefetched(c, ahead),
    };
    std::thread::scope(|sc| {
        let parts: Vec<_> = words
            .chunks(part)
            .map(|c| sc.spawn(move || sum(c)))
            .collect();
        parts
            .into_iter()
            .map(|h| h.join().unwrap_or(0))
            .fold(0u64, u64::wrapping_add)
    })
}

/// Threads the test reads with: those the engine's kernels run on (rayon's global count, which
/// `RAYON_NUM_THREADS` sets).
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// Timed passes of each kind in [`READS`] that [`read_bandwidth`] takes the best of.
pub const PASSES: usize = 5;

/// The machine's read bandwidth in bytes/s: [`TestBuffer`] summed by [`threads`] threads in one
/// contiguous part each ([`sum_in_parts`]), the best of [`PASSES`] passes of each kind in
/// [`READS`] (the kinds in turn, round after round, after one round that warms up). `Err`
/// where the OS refuses the buffer's memory.
pub fn read_bandwidth() -> std::io::Result<f64> {
    let buffer = TestBuffer::new()?;
    let (words, threads) = (buffer.words(), threads());
    let mut best = f64::INFINITY;
    for round in 0..=PASSES {
        for read in READS {
            let t = Instant::now();
            std::hint::black_box(sum_in_parts(words, threads, read));
            if round > 0 {
                best = best.min(t.elapsed().as_secs_f64());
            }
        }
    }
    Ok(TEST_BYTES as f64 / best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_agree_with_a_plain_sum() {
        let words: Vec<u64> = (0..1003u64)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .collect();
        let whole = &words[..1000];
        let plain = whole.iter().fold(0u64, |a, &b| a.wrapping_add(b));
        assert_eq!(sum_words(whole), plain);
        // Parts of 1000 / 3 -> 334 words: the sum leaves out each part's tail beyond a multiple of 8.
        let parts: u64 = whole
            .chunks(334)
            .map(|c| {
                c[..c.len() / 8 * 8]
                    .iter()
                    .fold(0u64, |a, &b| a.wrapping_add(b))
            })
            .fold(0, u64::wrapping_add);
        for read in READS {
            assert_eq!(sum_in_parts(whole, 3, read), parts, "{read:?}");
            assert_eq!(sum_in_parts(&words[..16], 1, read), sum_words(&words[..16]));
        }
        assert_eq!(sum_words_prefetched(whole, 1 << 20), plain);
    }

    #[test]
    fn buffer_is_filled_and_bandwidth_is_positive() {
        let b = TestBuffer::new().expect("512 MiB");
        assert_eq!(b.words().len(), TEST_BYTES / 8);
        assert_eq!(b.words()[12345], 12345);
        let bw = read_bandwidth().expect("512 MiB");
        assert!(bw.is_finite() && bw > 1e8, "{bw}");
    }
}
