//! Rebuilding groups of a BF16 matrix coded in 12 bits per value
//! ([`crate::weights::bf16_coded`]) into the exact bf16 vectors the stored matrix holds, for
//! the decode kernels that read the coding: [`super::avx512_bf16`] (`vdpbf16ps`, bf16
//! activations) and [`super::avx512`] (widened to f32, f32 activations).
//!
//! Per group of 64 values, in-lane shuffles only (the group's slot order makes them enough):
//! one 32-byte load of the codes broadcast into both halves of a register, `vpsrlvw` to bring
//! each byte's second code down in the second half and an `and` to keep the nibble, `vpshufb`
//! against the 16-entry table (one per 128-bit lane), one 64-byte load of the low bytes,
//! `vpunpcklbw` and `vpunpckhbw` that interleave low and high bytes into values `0..32` and
//! `32..64`, and (only in bands that have escapes, [`Bf16Coded::band_escapes`]) one `vpcmpeqb`
//! that finds the escaped values, put back from the side list on a rare path of integer code.
//! (The first version read the codes in value order and needed three cross-lane byte permutes,
//! `vpermb` and two `vpermt2b`: on a 2-core AMD EPYC, `bench_coded`'s 4864×896 product in L3
//! ran at 24-28 Gweights/s coded against 45-55 stored.)

use crate::weights::bf16_coded::{slot, Bf16Coded, ESCAPE, GROUP};
use std::arch::x86_64::*;

/// `$row!(r, CHECK)` for `r` in `0..8`, `CHECK` the literal `true` where `$check` holds and
/// `false` where not (one branch for the eight rows): the rows of a one-token tile of the
/// coding ([`crate::weights::bf16_coded::TILE_ROWS`]) spelled out, so that each row's
/// accumulator stays a register instead of an array entry indexed in a loop.
macro_rules! each_tile_row {
    ($row:ident, $check:expr) => {
        if $check {
            $row!(0, true);
            $row!(1, true);
            $row!(2, true);
            $row!(3, true);
            $row!(4, true);
            $row!(5, true);
            $row!(6, true);
            $row!(7, true);
        } else {
            $row!(0, false);
            $row!(1, false);
            $row!(2, false);
            $row!(3, false);
            $row!(4, false);
            $row!(5, false);
            $row!(6, false);
            $row!(7, false);
        }
    };
}
pub(super) use each_tile_row;

/// Whether this CPU's kernels can sum [`Bf16Coded`] weights: wherever the AVX-512 FMA kernel
/// runs ([`super::avx512::sums_coded`]; on AMD Zen 4/5 [`super::avx512_bf16::sums_coded`] too).
pub(super) fn readable() -> bool {
    super::avx512::available()
}

/// Whether a model codes its BF16 matrices when nobody asks (`LOCKSTEP_CODED_BF16` unset or
/// `auto`): where a bf16 decode step reads the coding with `vdpbf16ps`
/// ([`super::Kernel::Avx512Bf16`] on AMD Zen 4/5, a decode pass of [`super::Kernel::Amx`] on
/// Intel), where it was measured faster than the stored matrices.
///
/// On Intel the first rebuild (three cross-lane byte permutes per group) read by the FMA kernel
/// cost more than the bytes it saved (a 2-core Xeon with AMX, 0.5B shape, coding off then on:
/// 29.3 → 26.3, 28.6 → 26.2, 28.5 → 25.6 tok/s). With the in-lane rebuild, `vdpbf16ps` (no
/// widening of the rebuilt vectors) and the lines asked into L2 ([`PREFETCH_AHEAD`]), the same
/// kind of machine (2026-12-06, `lockstep bench --dtype bf16 --prompt-tokens 16 --new-tokens
/// 64 --repeat 3`, in turns): stored, FMA 23.4 and 23.7 tok/s; coded, `vdpbf16ps`, lines into
/// L1 23.2-24.3; into L2 27.1-28.2.
pub(super) fn preferred() -> bool {
    super::Kernel::detect().decodes_in_pairs()
}

/// How far ahead of the group being summed the decode kernels ask for the coded bytes
/// ([`Codes::prefetch_row`]): 8 KiB, about ten groups of an 8-row tile.
///
/// The hardware's own prefetch alone left the kernel behind the memory. Over every matrix of a
/// 0.5B-shape decode step (169 products in turn on a team of two, 0.74 GB coded), against a
/// plain sum of the same bytes in the same loops, alternating round by round (2-core AMD EPYC
/// Zen 5, 2026-12-04, medians of 9-11 rounds): with the memory streaming ~42 GB/s, no prefetch
/// 90% of the plain read's rate, every line 4 KiB ahead 99%, 6 KiB 98%, 8 KiB 98%, 10 KiB
/// 98%, every other line 6 KiB ahead 91%; at ~54 GB/s, no prefetch 78-83%, 4 KiB 90-94%,
/// 6 KiB 93-98%, 7 KiB 97-98%, 8 KiB 96-101%, 9 KiB 98%, 10 KiB 96-97%, 12 KiB 94-97%. Into
/// L2 (`T1`, 4 and 16 KiB) 83-85%, non-temporal (4 KiB) 87%. Whole decode steps
/// (`lockstep bench`, 0.5B shape, three alternating pairs, 6 KiB): bf16 48.0-52.2 → 52.9-68.1
/// tok/s, f32 34.0-34.8 → 43.3-51.7.
pub(super) const PREFETCH_AHEAD: usize = 8 << 10;

/// Into which cache [`Codes::prefetch_row`] asks for the lines ahead: L1 on AMD, L2 on Intel
/// (see there).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ahead {
    /// `prefetcht0`.
    IntoL1,
    /// `prefetcht1`.
    IntoL2,
}

impl Ahead {
    /// This CPU's.
    fn here() -> Ahead {
        match super::avx512_bf16::is_amd() {
            true => Ahead::IntoL1,
            false => Ahead::IntoL2,
        }
    }
}

/// Asks for the two cache lines that hold the row's group [`PREFETCH_AHEAD`] past `at` (a
/// row's group in a tile: 96 bytes that start on a line or half-way through one, the region
/// starting on 64 bytes) to be brought into L1 on AMD and into L2 on Intel. A hint: an address
/// past the matrix (its last groups) is never read, and asking for it cannot fault.
///
/// Into L2 on Intel: a line asked into L1 holds one of the core's few L1 fill buffers until it
/// arrives, and the rebuild's work per byte leaves the core fewer of its own loads in flight
/// than a plain read has. On a 2-core Xeon with AMX (2026-12-06, the coded 0.5B-shape LM head
/// alone, 151936 × 896, `examples/bench_coded` with `vdpbf16ps`, two rounds of three): into L1
/// 18.3-21.3 GB/s of coded bytes, into L2 21.9-23.2, into L3 (`T2`) 20.3-23.4, into L2 8 KiB
/// ahead and into L1 1 KiB ahead 22.1-23.9, non-temporal 11.2-13.1; into L2 2-16 KiB ahead
/// within the noise of each other. Whole decode steps in the doc of [`preferred`]. On AMD (Zen
/// 5) into L2 read 83-85% of a plain read where into L1 read 96-101% (below).
///
/// Asked row by row, between the rows' sums, rather than a group's twelve lines at once ahead of
/// its eight rows: the same lines, the requests spread over the work. Over every product of a
/// 0.5B-shape decode step against a plain read of the same bytes that prefetches every line
/// 8 KiB ahead, in the same loops, in turns (2-core AMD EPYC Zen 5, 2026-12-05, 12 rounds): the
/// twelve at once 85.2% (memory at ~70 GB/s) and 86.1% (~49 GB/s), row by row 92.4% and 96.5%.
/// (Rebuilding the codes' nibbles with one `vgf2p8affineqb` instead of a shift and an `and`
/// added 0.4-1.7 points more; not taken.)
///
/// # Safety
/// SSE present (every x86-64).
#[inline(always)]
unsafe fn prefetch_row(at: *const u8, into: Ahead) {
    let ahead = at.wrapping_add(PREFETCH_AHEAD);
    match into {
        Ahead::IntoL1 => {
            _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64).cast());
        }
        Ahead::IntoL2 => {
            _mm_prefetch::<_MM_HINT_T1>(ahead.cast());
            _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(64).cast());
        }
    }
}

/// Asks for the first [`PREFETCH_AHEAD`] bytes of the groups of `rows`, where a kernel call
/// starts: [`Codes::prefetch_row`] asks for each row's lines that far ahead, so without this a
/// call's first bytes come on demand, one miss after another (a decode step makes a call for
/// every run of pieces a thread takes, [`super::shares`]). Measured with the memory at ~45 GB/s
/// only: 0.993× a 0.5B-shape step's time (30 pairs in turns, 2 cores of an AMD EPYC Zen 5).
///
/// # Safety
/// SSE present (every x86-64); `rows` inside `c`.
#[inline(always)]
pub(super) unsafe fn prefetch_start(c: &Bf16Coded, rows: &std::ops::Range<usize>) {
    if rows.is_empty() {
        return;
    }
    let at = c.group_ptr(rows.start, 0);
    for line in (0..PREFETCH_AHEAD).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(line).cast());
    }
}

/// The constants that rebuild a group of a [`Bf16Coded`] matrix.
pub(super) struct Codes {
    /// The code → high byte table in each 128-bit lane (`vpshufb` looks up within a lane).
    table: __m512i,
    /// The escape entry of the table, in every byte.
    escape: __m512i,
    /// Shifts by 0 for the first 256 bits, by 4 for the second (each byte's second code).
    shifts: __m512i,
    /// 0x0F in every byte: a code's nibble (`vpshufb` zeroes a byte whose index has bit 7).
    nibble: __m512i,
    /// Where [`Codes::prefetch_row`] asks for the lines ahead.
    ahead: Ahead,
}

impl Codes {
    #[inline(always)]
    /// The constants for matrix `c`.
    ///
    /// # Safety
    /// AVX-512F/BW present.
    pub(super) unsafe fn new(c: &Bf16Coded) -> Codes {
        let table: [u8; 64] = std::array::from_fn(|b| c.table[b % 16]);
        Codes {
            table: _mm512_loadu_si512(table.as_ptr().cast()),
            escape: _mm512_set1_epi8(c.table[ESCAPE as usize] as i8),
            shifts: _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(4)),
            nibble: _mm512_set1_epi8(0x0F),
            ahead: Ahead::here(),
        }
    }

    /// [`prefetch_row`] into this CPU's cache ([`Ahead`]).
    ///
    /// # Safety
    /// SSE present (every x86-64).
    #[inline(always)]
    pub(super) unsafe fn prefetch_row(&self, at: *const u8) {
        prefetch_row(at, self.ahead)
    }

    /// The 64 bf16 of the group at `g` (row `row`, first column `col` of matrix `c`) as two
    /// vectors, as stored. With `CHECK`, escaped values (their rebuilt high byte the escape
    /// entry) are put back from the side list by inline integer code on bytes in memory, so no
    /// vector crosses a call and the common path keeps its values in registers; without, none
    /// are looked for (where [`Bf16Coded::band_escapes`] says the group has none).
    ///
    /// # Safety
    /// AVX-512F/BW present; `g` valid for [`crate::weights::bf16_coded::GROUP_BYTES`] bytes.
    #[inline(always)]
    pub(super) unsafe fn row<const CHECK: bool>(
        &self,
        g: *const u8,
        (c, row, col): (&Bf16Coded, usize, usize),
    ) -> [__m512i; 2] {
        // Byte q < 32: slot q's code in its low nibble; byte 32 + q: slot 32 + q's (its byte's
        // high nibble shifted down).
        let codes = _mm512_and_si512(
            _mm512_srlv_epi16(
                _mm512_broadcast_i64x4(_mm256_loadu_si256(g.cast())),
                self.shifts,
            ),
            self.nibble,
        );
        let mut high = _mm512_shuffle_epi8(self.table, codes);
        let escaped = if CHECK {
            _mm512_cmpeq_epi8_mask(high, self.escape)
        } else {
            0
        };
        if escaped != 0 {
            let mut bytes = [0u8; 64];
            _mm512_storeu_si512(bytes.as_mut_ptr().cast(), high);
            put_escapes(&mut bytes, c, row, col);
            high = _mm512_loadu_si512(bytes.as_ptr().cast());
        }
        let low = _mm512_loadu_si512(g.add(32).cast());
        [
            _mm512_unpacklo_epi8(low, high),
            _mm512_unpackhi_epi8(low, high),
        ]
    }
}

/// `high` (the rebuilt high bytes of the group at `row` whose first column is `col`, by slot)
/// with the escaped values' bytes taken from the side list (the band's few entries).
///
/// Inlined: a call here would make every vector register the caller holds (its accumulators)
/// live across a call, which LLVM answers by keeping them on the stack on the common path too.
/// Inlined, the rare path is integer code that leaves them alone.
#[inline(always)]
fn put_escapes(high: &mut [u8; 64], c: &Bf16Coded, row: usize, col: usize) {
    for (j, byte) in c.group_escapes(row, col / GROUP) {
        high[slot(j)] = byte;
    }
}
