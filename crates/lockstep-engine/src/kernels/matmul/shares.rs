//! How a decode step's products split their rows among the threads: one contiguous share of
//! the rows a thread, which its owner streams from the front while the others, once their own
//! shares are done, take pieces from its back. No thread waits at the end of a product for
//! more than one piece of another's share.
//!
//! The rows of every product of the call ([`super::linear_many`]'s several weights of one
//! input, q/k/v or gate/up) are cut into pieces of [`PIECE_BYTES`] (whole tiles of
//! [`PIECE_ROWS`] rows, never across two products), and the pieces, in order, into one share
//! a thread of about equal bytes. A share's pieces not yet taken are a range `front..back`
//! held in one atomic word: its owner takes from the front a quarter of what is left at a time
//! (one kernel call, one forward stream of bytes, for most of the share), a thread whose own
//! share is empty takes one piece from the back of the share with most left.
//!
//! This replaces fixed tasks, two a thread (before that eight: each task starts a new stream,
//! and a stream's first bytes come slower, which cost eight a thread ~5% of a step's rate). With
//! two a thread, the two threads of a 2-core AMD EPYC Zen 5 waited at the end of each product
//! for the other: with the memory streaming ~62 GB/s, the thread leading a 0.5B-shape decode
//! step waited 3.7-8.6% of the step for its helper to finish (0.3-0.9% with shares), and the
//! helper stood idle 7.5-10% (the leader's serial work between products included). Whole
//! steps, the two splits in turns in one process (2026-12-05, 24 steps a round, context
//! 129-400): 0.98× the time at ~62 GB/s (40 pairs), 1.00× at ~48 GB/s (30 pairs), where the
//! memory, not a core, bounds each thread. (Those pairs ran a first version that listed every
//! piece in a `Vec` per call, 6,000 for the LM head; cutting pieces by arithmetic instead took
//! the leader's serial time between loops from ~750 to ~500 µs a step at ~62 GB/s.)

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

/// Rows of a piece: a multiple of every decode kernel's tile (the coding's 8-row tiles, the
/// AVX-512 kernels' 4 and 1).
const PIECE_ROWS: usize = 8;

/// Bytes of stored weights a piece holds at least (whole [`PIECE_ROWS`]-row tiles): the most a
/// thread whose share is done may wait for another's last piece.
const PIECE_BYTES: usize = 32 << 10;

/// One share's pieces not yet taken, `front << 32 | back`, alone on its cache lines so that an
/// owner taking from its front does not pull another share's word away from its owner.
#[repr(align(128))]
struct Left(AtomicU64);

impl Left {
    fn new(pieces: Range<usize>) -> Left {
        let (front, back) = (pieces.start as u64, pieces.end as u64);
        assert!(
            back <= u32::MAX as u64,
            "more pieces than a share's word holds"
        );
        Left(AtomicU64::new(front << 32 | back))
    }

    /// `(front, back)` of `word`.
    fn split(word: u64) -> (usize, usize) {
        ((word >> 32) as usize, (word & u32::MAX as u64) as usize)
    }

    /// Pieces left.
    fn len(&self) -> usize {
        let (front, back) = Self::split(self.0.load(SeqCst));
        back.saturating_sub(front)
    }

    /// Takes `want(left)` pieces (at least one) from the front, or one from the back with
    /// `from_back`; `None` when none is left.
    fn take(&self, from_back: bool, want: impl Fn(usize) -> usize) -> Option<Range<usize>> {
        let mut word = self.0.load(SeqCst);
        loop {
            let (front, back) = Self::split(word);
            if front >= back {
                return None;
            }
            let (taken, new) = if from_back {
                (back - 1..back, (front as u64) << 32 | (back - 1) as u64)
            } else {
                let end = front + want(back - front).clamp(1, back - front);
                (front..end, (end as u64) << 32 | back as u64)
            };
            match self.0.compare_exchange(word, new, SeqCst, SeqCst) {
                Ok(_) => return Some(taken),
                Err(now) => word = now,
            }
        }
    }
}

/// The rows of one call's products cut into pieces and shares (see the module docs).
pub(super) struct Shares {
    /// Each product's rows, rows a piece, and first piece (pieces are numbered through the
    /// products in order), with one entry past the last giving the number of pieces.
    products: Vec<Cut>,
    /// Each share's pieces not yet taken.
    left: Vec<Left>,
    /// Where the bytes of the product a step reads next begin, when known (see [`Shares::new`]).
    next: Option<usize>,
}

/// Bytes of the next product that the thread owning the first share reads ahead while it waits
/// for the next loop ([`crate::team::read_ahead_while_idle`]): most of a 1 MiB second-level
/// cache. On 2 cores of an AMD EPYC Zen 5 (2026-12-05, 0.5B-shape decode steps of 17-47 tokens
/// of context, the sizes in turns in one process, each from the same context) with the memory at
/// ~62 GB/s: against none, 256 KiB 0.991× the step's time and 768 KiB 0.984× (25 rounds; q/k/v
/// read 7% faster, o 4%); against 768 KiB, 1 MiB 1.011× and 1.5 MiB 1.025× (8 rounds). At ~45-48
/// GB/s, 512 KiB to 1.5 MiB all 0.990-0.997× against none.
const READ_AHEAD: usize = 768 << 10;

/// One product's rows cut into pieces: `rows` rows, `per` a piece, the first numbered `first`,
/// `piece_bytes` the stored bytes of a whole piece.
#[derive(Clone, Copy)]
struct Cut {
    rows: usize,
    per: usize,
    first: usize,
    piece_bytes: usize,
}

/// The product (index into `cuts`) that piece `p` belongs to (`cuts` ends with the entry past
/// the last product).
fn product_of(cuts: &[Cut], p: usize) -> usize {
    cuts.partition_point(|c| c.first <= p) - 1
}

impl Shares {
    /// Pieces and `threads` shares of the products whose rows and bytes per row are `sizes`
    /// (in the call's order; products without rows have no pieces). `next`: where the bytes of
    /// the product a step reads next begin (the byte after the last product's), for the first
    /// share's owner to read ahead while the leader works between products; known where the
    /// step reads codings, which lay a step's matrices out in the order the step reads them
    /// ([`crate::weights::bf16_coded::code_together`]).
    pub(super) fn new(sizes: &[(usize, usize)], threads: usize, next: Option<*const u8>) -> Shares {
        let mut products = Vec::with_capacity(sizes.len() + 1);
        let mut first = 0;
        for &(rows, row_bytes) in sizes {
            let per = PIECE_BYTES
                .div_ceil(row_bytes.max(1))
                .next_multiple_of(PIECE_ROWS);
            let piece_bytes = per * row_bytes;
            products.push(Cut {
                rows,
                per,
                first,
                piece_bytes,
            });
            first += rows.div_ceil(per);
        }
        products.push(Cut {
            rows: 0,
            per: 1,
            first,
            piece_bytes: 0,
        });
        // Share boundaries: the first piece at or past each thread's part of the bytes, a
        // piece's bytes taken as a whole piece's (the last of a product may be shorter).
        let pieces = first;
        let threads = threads.clamp(1, pieces.max(1));
        let total: usize = (products.windows(2))
            .map(|c| (c[1].first - c[0].first) * c[0].piece_bytes)
            .sum();
        let mut left = Vec::with_capacity(threads);
        let (mut start, mut sum, mut p) = (0, 0, 0);
        while left.len() + 1 < threads {
            // Whole products at a time while the next boundary lies beyond them.
            let share = left.len() + 1;
            let i = product_of(&products, p);
            let (end, product_bytes) = (products[i + 1].first, products[i].piece_bytes);
            let to_end = (end - p) * product_bytes;
            if (sum + to_end) * threads < total * share {
                (sum, p) = (sum + to_end, end);
                continue;
            }
            let more = (total * share).div_ceil(threads).saturating_sub(sum);
            let step = more.div_ceil(product_bytes.max(1)).clamp(1, end - p);
            (sum, p) = (sum + step * product_bytes, p + step);
            left.push(Left::new(start..p));
            start = p;
        }
        left.push(Left::new(start..pieces));
        Shares {
            products,
            left,
            next: next.map(|p| p as usize),
        }
    }

    /// Runs `f(product, rows)` once for every piece's rows, each run the rows of one product
    /// (consecutive pieces of one product that a share's owner takes at once are one run), on
    /// the team ([`crate::team::for_each`]): every share's owner, then any thread whose share
    /// is done taking pieces from the back of the others'. Two loop iterations a share: the
    /// second only takes from the backs, for a thread that arrives when every share has its
    /// owner. The first share's owner, a helper where the team has one, then reads ahead the
    /// next product's first bytes ([`Shares::new`]) while the leader works between loops.
    pub(super) fn run(&self, f: impl Fn(usize, Range<usize>) + Sync + Send) {
        let shares = self.left.len();
        crate::team::for_each(2 * shares, |i| {
            // The last share to the first iteration, which the leader runs (it posts the loop
            // and starts at once): a helper owns the first share, whose next bytes follow.
            let own = (i < shares).then(|| shares - 1 - i);
            if let Some(own) = own {
                // A quarter of what is left at a time: most of the share in a few long runs,
                // the last pieces one by one.
                while let Some(taken) = self.left[own].take(false, |left| left / 4) {
                    self.run_pieces(taken, &f);
                }
            }
            while let Some(most) = self.left.iter().max_by_key(|l| l.len()) {
                match most.take(true, |_| 1) {
                    Some(taken) => self.run_pieces(taken, &f),
                    None if most.len() == 0 => break,
                    None => {}
                }
            }
            if let (Some(0), Some(next)) = (own, self.next) {
                crate::team::read_ahead_while_idle(next as *const u8, READ_AHEAD);
            }
        });
    }

    /// `f` on consecutive pieces `taken`, one call per product they cover.
    fn run_pieces(&self, taken: Range<usize>, mut f: impl FnMut(usize, Range<usize>)) {
        let mut p = taken.start;
        while p < taken.end {
            let i = product_of(&self.products, p);
            let (c, next) = (self.products[i], self.products[i + 1].first);
            let end = taken.end.min(next);
            f(
                i,
                (p - c.first) * c.per..((end - c.first) * c.per).min(c.rows),
            );
            p = end;
        }
    }

    /// Every piece, in order: its product and rows (for the tests).
    #[cfg(test)]
    fn pieces(&self) -> Vec<(usize, Range<usize>)> {
        let mut all = Vec::new();
        let pieces = self.products.last().map_or(0, |c| c.first);
        for p in 0..pieces {
            self.run_pieces(p..p + 1, |i, r| all.push((i, r)));
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Every row of every product is summed exactly once, whatever the threads and sizes, and
    /// each call covers rows of one product.
    #[test]
    fn every_row_runs_once() {
        for threads in [1, 2, 3, 8] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for sizes in [
                vec![(896, 1792)],
                vec![(1, 10), (0, 10), (17, 100_000), (4864, 1792)],
                vec![(896, 1792), (128, 1792), (128, 1792)],
                vec![],
            ] {
                let hits: Vec<Mutex<Vec<u8>>> =
                    sizes.iter().map(|&(m, _)| Mutex::new(vec![0; m])).collect();
                let run = || {
                    Shares::new(&sizes, threads, None).run(|p, rows| {
                        for r in rows {
                            hits[p].lock().unwrap()[r] += 1;
                        }
                    })
                };
                pool.install(|| crate::team::lead(run));
                pool.install(run);
                for (p, h) in hits.iter().enumerate() {
                    assert!(
                        h.lock().unwrap().iter().all(|&c| c == 2),
                        "{threads} threads, sizes {sizes:?}, product {p}"
                    );
                }
            }
        }
    }

    /// Shares are contiguous, about equal in bytes, and one a thread.
    #[test]
    fn shares_split_the_bytes_evenly() {
        let s = Shares::new(&[(9728, 1792)], 2, None);
        assert_eq!(s.left.len(), 2);
        let lens: Vec<usize> = s.left.iter().map(Left::len).collect();
        let pieces = s.pieces();
        assert_eq!(lens.iter().sum::<usize>(), pieces.len());
        assert!(lens[0].abs_diff(lens[1]) <= 1, "{lens:?}");
        // Pieces: whole 8-row tiles of at least 32 KiB.
        assert!(pieces[..pieces.len() - 1]
            .iter()
            .all(|(_, r)| r.len() % PIECE_ROWS == 0 && r.len() * 1792 >= PIECE_BYTES));
        // Three products of unequal sizes over three threads: each share about a third.
        let sizes = [(896, 1792), (128, 1792), (4864, 9728)];
        let s = Shares::new(&sizes, 3, None);
        let bytes: Vec<usize> = s
            .left
            .iter()
            .map(|l| {
                let (front, back) = Left::split(l.0.load(SeqCst));
                let mut b = 0;
                s.run_pieces(front..back, |i, r| b += r.len() * sizes[i].1);
                b
            })
            .collect();
        let total: usize = sizes.iter().map(|(m, b)| m * b).sum();
        assert!(
            bytes.iter().all(|&b| b.abs_diff(total / 3) <= 200_000),
            "{bytes:?} of {total}"
        );
    }

    /// The front taker takes what it asks for (at least one), the back taker one, and neither
    /// takes past the other.
    #[test]
    fn takes_meet_without_overlap() {
        let l = Left::new(10..20);
        assert_eq!(l.take(false, |left| left / 4), Some(10..12));
        assert_eq!(l.take(true, |_| 1), Some(19..20));
        assert_eq!(l.take(false, |_| 0), Some(12..13));
        assert_eq!(l.take(false, |_| 100), Some(13..19));
        assert_eq!(l.take(true, |_| 1), None);
        assert_eq!(l.take(false, |_| 1), None);
        assert_eq!(l.len(), 0);
    }
}
