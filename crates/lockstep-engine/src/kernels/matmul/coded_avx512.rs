//! Rebuilding groups of a BF16 matrix coded in 12 bits per value
//! ([`crate::weights::bf16_coded`]) into the exact bf16 vectors the stored matrix holds, for
//! the decode kernels that read the coding: [`super::avx512_bf16`] (`vdpbf16ps`, bf16
//! activations) and [`super::avx512`] (widened to f32, f32 activations).
//!
//! Per group of 64 values: one 32-byte load of the codes broadcast into both halves of a
//! register, `vpsrlvw` to bring each byte's second code down in the second half, `vpermb`
//! against the table (it reads only an index's low 6 bits, so no masking), one 64-byte load of
//! the low bytes, two `vpermt2b` that interleave low and high bytes, and one `vpcmpeqb` that
//! finds the escaped values, put back from the side list by a cold call.

use crate::weights::bf16_coded::{Bf16Coded, ESCAPE, GROUP_BYTES};
use std::arch::x86_64::*;

/// Whether this CPU sums [`Bf16Coded`] weights: where [`super::avx512_bf16`] runs (AMD Zen 4/5)
/// and has AVX512_VBMI's byte permutes, which rebuild a vector of bf16 from its low and high
/// bytes. Not on Intel, though its AVX-512 FMA kernel could read the coding
/// ([`super::avx512::sums_coded`]): there the rebuild costs more than the bytes it saves
/// (measured on a 2-core Xeon with AMX, `lockstep bench --dtype bf16`, the 0.5B shape, coding
/// forced off then on, three rounds: 29.3 → 26.3, 28.6 → 26.2, 28.5 → 25.6 tok/s, the stored
/// matrices read at 83% of the 35 GB/s measured).
pub(super) fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| super::avx512_bf16::available() && is_x86_feature_detected!("avx512vbmi"))
}

/// The constants that rebuild a group of a [`Bf16Coded`] matrix.
pub(super) struct Codes {
    /// The code → high byte table, four times over (`vpermb` reads an index's low 6 bits).
    table: __m512i,
    /// The escape entry of the table, in every byte.
    escape: __m512i,
    /// Shifts by 0 for the first 256 bits, by 4 for the second (each byte's second code).
    shifts: __m512i,
    /// Byte `2j` takes the low bytes' byte `j`, byte `2j + 1` the high bytes' (`64 + j`).
    first: __m512i,
    /// [`Codes::first`] for the group's second 32 values.
    second: __m512i,
}

impl Codes {
    #[inline(always)]
    /// The constants for matrix `c`.
    ///
    /// # Safety
    /// AVX-512F/BW present.
    pub(super) unsafe fn new(c: &Bf16Coded) -> Codes {
        let table: [u8; 64] = std::array::from_fn(|b| c.table[b % 16]);
        let pick = |half: u8| -> [u8; 64] {
            std::array::from_fn(|b| 32 * half + (b / 2) as u8 + if b % 2 == 0 { 0 } else { 64 })
        };
        let (first, second) = (pick(0), pick(1));
        Codes {
            table: _mm512_loadu_si512(table.as_ptr().cast()),
            escape: _mm512_set1_epi8(c.table[ESCAPE as usize] as i8),
            shifts: _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(4)),
            first: _mm512_loadu_si512(first.as_ptr().cast()),
            second: _mm512_loadu_si512(second.as_ptr().cast()),
        }
    }

    /// The 64 bf16 of the group at `g` as two vectors, as stored, with a mask of the values
    /// whose high byte is in the side list (bit `b`: value `b`; left as the escape entry here).
    ///
    /// # Safety
    /// AVX-512F/BW/VL and AVX512_VBMI present; `g` valid for [`GROUP_BYTES`] bytes.
    #[inline(always)]
    unsafe fn group(&self, g: *const u8) -> ([__m512i; 2], u64) {
        // Byte b < 32: code b in its low nibble; byte 32 + j: code 32 + j (its byte's high
        // nibble shifted down). `vpermb` ignores the bits above the index.
        let codes = _mm512_srlv_epi16(
            _mm512_broadcast_i64x4(_mm256_loadu_si256(g.cast())),
            self.shifts,
        );
        let high = _mm512_permutexvar_epi8(codes, self.table);
        let low = _mm512_loadu_si512(g.add(32).cast());
        (
            [
                _mm512_permutex2var_epi8(low, self.first, high),
                _mm512_permutex2var_epi8(low, self.second, high),
            ],
            _mm512_cmpeq_epi8_mask(high, self.escape),
        )
    }

    /// The groups at `g` of `R` rows `ws` bytes apart, rebuilt as stored (two vectors of 32
    /// bf16 each), escapes put back; `(c, j, col)`: the matrix, the first row, the group's first
    /// column. Also asks for the next `R` rows' groups at this column (the next tile's, which
    /// follow these): a step here does more work per byte than a stored row's, so fewer of
    /// memory's reads are in flight without it.
    ///
    /// # Safety
    /// As [`Codes::group`], for each of the `R` rows.
    #[inline(always)]
    pub(super) unsafe fn rows<const R: usize>(
        &self,
        g: *const u8,
        ws: usize,
        (c, j, col): (&Bf16Coded, usize, usize),
    ) -> [[__m512i; 2]; R] {
        // (Past the last tile the address lies outside the matrix: a prefetch never faults,
        // and `wrapping_add` makes no claim that it is inside.)
        for r in 0..R {
            let next = g.wrapping_add((R + r) * ws);
            _mm_prefetch::<_MM_HINT_T0>(next.cast());
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(GROUP_BYTES - 1).cast());
        }
        // Every row's group rebuilt first, escapes put back (rarely) after: no call among the
        // caller's sums, so its accumulators stay in registers.
        let mut escaped = [0u64; R];
        let mut wv: [[__m512i; 2]; R] = std::array::from_fn(|r| {
            let (v, e) = self.group(g.add(r * ws));
            escaped[r] = e;
            v
        });
        if escaped.iter().any(|&e| e != 0) {
            for (r, (v, &e)) in wv.iter_mut().zip(&escaped).enumerate() {
                if e != 0 {
                    *v = with_escapes(*v, e, c, j + r, col);
                }
            }
        }
        wv
    }
}

/// `v` (the group at `row`, column `col`) with the high bytes of its `escaped` values (bit
/// `b`: value `b`) put back from the side list.
///
/// # Safety
/// AVX-512F present.
#[cold]
#[inline(never)]
#[target_feature(enable = "avx512f")]
unsafe fn with_escapes(
    v: [__m512i; 2],
    mut escaped: u64,
    c: &Bf16Coded,
    row: usize,
    col: usize,
) -> [__m512i; 2] {
    let mut vals = [0u16; 64];
    _mm512_storeu_si512(vals.as_mut_ptr().cast(), v[0]);
    _mm512_storeu_si512(vals.as_mut_ptr().add(32).cast(), v[1]);
    while escaped != 0 {
        let b = escaped.trailing_zeros() as usize;
        vals[b] = vals[b] & 0xFF | u16::from(c.escaped_high_byte(row, col + b)) << 8;
        escaped &= escaped - 1;
    }
    [
        _mm512_loadu_si512(vals.as_ptr().cast()),
        _mm512_loadu_si512(vals.as_ptr().add(32).cast()),
    ]
}
