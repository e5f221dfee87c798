//! BF16 weights held in 12 bits per value without losing a bit, for the one-token decode that
//! reads every weight once per token and so runs at the speed memory delivers them.
//!
//! A bf16 value is two bytes: the low one (the exponent's last bit and the 7 mantissa bits) is
//! close to random, but the high one (sign and the exponent's first 7 bits) takes few values in
//! a weight matrix: a trained or randomly initialized matrix's values sit in a handful of
//! binades. Measured on the high bytes of every matrix: 2.7 bits of entropy (SmolLM2-135M, a
//! trained model) and 2.66 (the random 0.5B fixture), and the 15 most frequent values of each
//! matrix cover all but 1.4-1.8 in 10,000 of its values. So each matrix keeps its 15 most
//! frequent high bytes in a table ([`Bf16Coded::table`]) and stores for every value its low byte
//! and a 4-bit code: the high byte's place in the table, or [`ESCAPE`] with the high byte in a
//! side list kept band by band. The decode kernel rebuilds the exact bf16 vector from them
//! (`kernels::matmul::avx512_bf16`) and sums exactly the values it would have read from the
//! stored bytes: 0.75 of the bytes per token, the same bits.
//!
//! Layout: the rows in tiles of [`TILE_ROWS`] (the last tile takes what is left), each row in
//! groups of 64 values ([`GROUP_BYTES`] bytes), and within a tile group by group, each group's
//! rows one after another: a decode tile of rows reads its bytes in one forward stream instead
//! of one per row. A group is 32 bytes of codes, then 64 low bytes. The 64 values sit in 64
//! slots in the order that lets the kernel rebuild them with in-lane byte shuffles alone
//! ([`slot`]): in each 16-byte lane `l` of the low bytes, slots `16l..16l + 8` hold values
//! `8l..8l + 8` and slots `16l + 8..16l + 16` hold values `32 + 8l..32 + 8l + 8`, so
//! interleaving the low bytes with the rebuilt high bytes lane by lane gives values `0..32`
//! (the low halves of the lanes) and `32..64` (the high halves) in order. Code byte `q` holds
//! slot `q`'s code in its low nibble and slot `q + 32`'s in its high one. A row's last group is
//! padded with code 0 and low byte 0; the kernel masks the padding off as it masks the stored
//! row's end.

use crate::weights::{StoredDtype, Tensor};
use memmap2::Mmap;
use rayon::prelude::*;
use std::sync::Arc;

/// Values per group: two 512-bit vectors of bf16.
pub const GROUP: usize = 64;

/// Bytes per group: 32 of codes and 64 low bytes.
pub const GROUP_BYTES: usize = 96;

/// Rows per tile, whose groups are stored interleaved (see the module docs): the one-token
/// decode kernel's tile, and a divisor of the rows every parallel task starts at. Measured
/// with `lockstep bench --dtype bf16` on the 0.5B shape on a 2-core AMD EPYC (decode tok/s):
/// row-major rows (no tiles) 19.6-19.8; tiles of 16, 27.5-29.7; of 8, 32.6-35.4; of 4,
/// 33.5-39.2 (8 and 4 alternating, four rounds, medians 34.4 and 33.9); tiles of 16 read by
/// 8-row kernel tiles (two strided halves) 16.7-18.4.
pub const TILE_ROWS: usize = 8;

/// The code saying "high byte in the side list" (a value outside the table).
pub const ESCAPE: u8 = 15;

/// The slot of a group's value `j` (`0..64`; see the module docs).
pub const fn slot(j: usize) -> usize {
    let (half, r) = (j / 32, j % 32);
    r / 8 * 16 + half * 8 + r % 8
}

/// The value a group's slot `q` holds (`0..64`): the inverse of [`slot`].
pub const fn value_in_slot(q: usize) -> usize {
    let (lane, i) = (q / 16, q % 16);
    i / 8 * 32 + lane * 8 + i % 8
}

/// The environment variable that forces the coding on (`1`) or off (`0`); `auto` (unset) codes
/// when [`auto`] says so.
pub const ENV: &str = "LOCKSTEP_CODED_BF16";

/// Whether a model should code its BF16 matrices for one-token decode, as [`ENV`] asks ([`auto`]
/// when it does not); a bad value is a one-line error. Forced on, wherever this CPU's kernels
/// read the coding ([`crate::kernels::matmul::reads_coded`]: any with AVX-512F/BW/VL); never
/// elsewhere, even when forced on: the copy would cost memory and load time and be read by
/// nothing.
///
/// `mapped` is the model's mapped bytes, `matrices` its BF16 matrices' bytes, `available` the
/// machine's free memory.
pub fn wanted(
    mapped: u64,
    matrices: u64,
    available: Option<u64>,
    streamed: bool,
) -> crate::error::Result<bool> {
    Ok(place(mapped, matrices, available, streamed)? == Place::Beside)
}

/// Where a model's coding goes, if it is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Not made.
    Nowhere,
    /// Beside the stored matrices ([`crate::Model::code_bf16`]).
    Beside,
    /// In their place ([`crate::Model::code_bf16_instead`]): the coding fits in memory, but not
    /// beside them.
    Instead,
}

/// Where [`ENV`] and this CPU have a model's coding go (arguments as [`wanted`]'s): nowhere
/// where the kernels do not read codings or `0`; beside the matrices for `1`; as [`auto`]
/// says for `auto` (unset). A bad value is a one-line error.
pub fn place(
    mapped: u64,
    matrices: u64,
    available: Option<u64>,
    streamed: bool,
) -> crate::error::Result<Place> {
    let switch = crate::switch::Switch::from_env(ENV)?;
    Ok(match switch {
        _ if !crate::kernels::matmul::reads_coded() => Place::Nowhere,
        crate::switch::Switch::Off => Place::Nowhere,
        crate::switch::Switch::On => Place::Beside,
        crate::switch::Switch::Auto => auto(mapped, matrices, available, streamed),
    })
}

/// The `auto` rule: on the CPUs where the coding was measured faster
/// ([`crate::kernels::matmul::codes_by_default`], whose bf16 prefill can rebuild it too), for
/// a model whose matrices are BF16 and which is not streamed, the coding (0.75 of the matrices)
/// goes beside the mapped weights where it fits with them within
/// [`crate::streaming::AUTO_FRACTION`] of the free memory (the weights must stay in memory: a
/// copy that pushed them out would cost more than it saves), else in the matrices' place where
/// it fits so and the prefill reads codings at its own speed
/// ([`crate::kernels::matmul::codes_in_place_by_default`]: not on AMX). Qwen2.5-7B in bf16 on
/// a 23 GB machine: 15.2 GB of weights and 10.6 GB of codings do not fit together, 1.1 GB of
/// embeddings and norms and the codings do.
pub fn auto(mapped: u64, matrices: u64, available: Option<u64>, streamed: bool) -> Place {
    let fits =
        |held: f64| available.is_some_and(|a| held <= crate::streaming::AUTO_FRACTION * a as f64);
    let (mapped, coding) = (mapped as f64, matrices as f64 * 0.75);
    if !crate::kernels::matmul::codes_by_default() || matrices == 0 || streamed {
        Place::Nowhere
    } else if fits(mapped + coding) {
        Place::Beside
    } else if crate::kernels::matmul::codes_in_place_by_default()
        && fits((mapped - matrices as f64).max(0.0) + coding)
    {
        Place::Instead
    } else {
        Place::Nowhere
    }
}

/// A `[m, k]` BF16 matrix coded losslessly in 12 bits per value (see the module docs).
pub struct Bf16Coded {
    /// Rows.
    pub m: usize,
    /// Values per row.
    pub k: usize,
    /// Code → high byte for codes `0..15`; entry 15 ([`ESCAPE`]) is a byte no other entry
    /// holds, so a rebuilt high byte equal to it marks an escaped value.
    pub table: [u8; 16],
    /// The memory holding the groups (read-only, shared with the matrices coded with this
    /// one, [`code_together`]; in 2 MiB pages where the kernel gives them).
    region: Arc<Mmap>,
    /// Where in `region` the groups lie, tile after tile.
    at: std::ops::Range<usize>,
    /// Per band (the tile holding row `r` and group `g`: band `r / TILE_ROWS · groups + g`),
    /// where its escaped values start in `escape_keys` and `escaped_high`; one entry more ends
    /// the last band. A band with none is empty, and there the kernels skip looking for escapes
    /// (a comparison and a branch per row and group, a sixth of their instructions): on the
    /// fixtures' 2 escapes in 10,000 values, about one band in ten of 8 × 64 values has one.
    band_start: Vec<u32>,
    /// The escaped values band after band, each as `row_in_tile · GROUP + column_in_group`,
    /// ascending within its band: a kernel finds a group's escapes among its band's few entries
    /// next to one another. The first side list, every escaped position of the matrix sorted,
    /// was binary-searched per escape, a chain of dependent loads that held up the stream:
    /// `examples/stream_check` (0.5B shape, 2-core AMD EPYC Zen 5, 2026-12-05, builds in turns)
    /// had the products at 91-97% of a plain read of the same bytes with the search and
    /// 100-102% with the bands, the whole step at 87-96% of the test buffer's rate and 90-92%.
    escape_keys: Vec<u16>,
    /// Their high bytes, in the same order.
    escaped_high: Vec<u8>,
}

/// Codes every matrix in `ws` into one region of anonymous memory that starts on a 2 MiB
/// boundary and is advised `MADV_HUGEPAGE`, one matrix after another (each at a multiple of 64
/// bytes): the entry of each is its coding, or `None` where it is not a 2-D BF16 matrix (all
/// `None` when the memory is refused). Coded alone, a matrix smaller than 2 MiB (the 0.5B
/// shape's k and v projections, 172 KB) could never have such a page, and a larger one only
/// the whole pages inside its own mapping: the 0.5B shape's 0.74 GB of codings then sat in
/// 0.53 GB of 2 MiB pages, and decode read the rest through 4 KiB ones. Measured with
/// `lockstep bench --dtype bf16 --new-tokens 64` (0.5B shape, 2-core AMD EPYC, 2026-12-03,
/// three alternating rounds each): each matrix coded alone 34.9-41.7 tok/s, together here
/// 44.8-48.2 (0.74 GB in 2 MiB pages, the same peak RSS); in an earlier trial, each matrix
/// in a mapping of its own 2 MiB larger, aligned, 57.8-59.1 against 50.7-52.7 (the memory
/// was faster that hour; that layout cost 0.27 GB of RSS).
pub fn code_together(ws: &[&Tensor]) -> Vec<Option<Bf16Coded>> {
    let shapes: Vec<Option<(usize, usize)>> = ws
        .iter()
        .map(|w| match (w.dtype, w.shape.as_slice()) {
            (StoredDtype::BF16, &[m, k]) if m > 0 && k > 0 => Some((m, k)),
            _ => None,
        })
        .collect();
    let none = || ws.iter().map(|_| None).collect();
    let lens: Vec<usize> = shapes
        .iter()
        .map(|s| s.map_or(0, |(m, k)| m * row_bytes(k)))
        .collect();
    let Some((mut region, starts)) = super::huge_pages::shared_region(&lens) else {
        return none();
    };
    let parts = super::huge_pages::region_parts(&mut region, &starts, &lens);
    let codings: Vec<Option<(usize, Parts)>> = ws
        .par_iter()
        .zip(&shapes)
        .zip(starts.into_par_iter().zip(parts))
        .map(|((w, shape), (at, part))| {
            shape.and_then(|(m, k)| Some((at, code_matrix(w, m, k, part)?)))
        })
        .collect();
    let Ok(region) = region.make_read_only().map(Arc::new) else {
        return none();
    };
    codings
        .into_iter()
        .zip(shapes.iter().zip(&lens))
        .map(|(coding, (shape, &len))| {
            let ((at, parts), (m, k)) = (coding?, (*shape)?);
            Some(Bf16Coded {
                m,
                k,
                table: parts.table,
                region: Arc::clone(&region),
                at: at..at + len,
                band_start: parts.band_start,
                escape_keys: parts.escape_keys,
                escaped_high: parts.escaped_high,
            })
        })
        .collect()
}

/// Bytes of one row's groups, `k` values.
fn row_bytes(k: usize) -> usize {
    k.div_ceil(GROUP) * GROUP_BYTES
}

/// What coding a matrix makes besides its groups.
struct Parts {
    table: [u8; 16],
    band_start: Vec<u32>,
    escape_keys: Vec<u16>,
    escaped_high: Vec<u8>,
}

/// Codes the `m × k` BF16 matrix `w` into `dst` (its groups, zeroed, `m` rows of
/// [`row_bytes`]), tiles in parallel; `None` where its escapes are too many to index in 32 bits.
/// With the AVX-512 coder where this CPU has it ([`avx512_coder`]).
fn code_matrix(w: &Tensor, m: usize, k: usize, dst: &mut [u8]) -> Option<Parts> {
    code_matrix_on(w, m, k, dst, avx512_coder())
}

/// [`code_matrix`], with the AVX-512 coder when `fast` (and this CPU has it), else the scalar
/// reference: the same bytes either way.
fn code_matrix_on(w: &Tensor, m: usize, k: usize, dst: &mut [u8], fast: bool) -> Option<Parts> {
    let bytes = w.bytes();
    debug_assert_eq!((bytes.len(), dst.len()), (m * k * 2, m * row_bytes(k)));
    let table = frequent_high_bytes(bytes, fast);
    let mut code_of = [ESCAPE; 256];
    for (c, &h) in table.iter().enumerate().take(ESCAPE as usize) {
        code_of[h as usize] = c as u8;
    }
    // Tiles in parallel, each returning its escapes row by row in column order: together
    // ascending.
    let escapes: Vec<Vec<(u64, u8)>> = dst
        .par_chunks_mut(TILE_ROWS * row_bytes(k))
        .zip(bytes.par_chunks(TILE_ROWS * k * 2))
        .enumerate()
        .with_min_len(4)
        .map(|(t, (dst, src))| code_tile(dst, src, k, &code_of, (t * TILE_ROWS * k) as u64, fast))
        .collect();
    // Band by band: counted, then placed in the tiles' order (each band's row by row, each
    // row's in column order: ascending keys). Counted in place in 32 bits, and not at all for
    // a matrix without escapes: the band lists of a random 18944 × 3584 matrix timed through
    // `Bf16Coded::new` (none escaped) took 0.6-1.1 ms through a vector of `usize` counts
    // copied into 32 bits, and take 0.01-0.2 ms so (2-core AMD EPYC Zen 5, 2026-12-05).
    let groups = k.div_ceil(GROUP);
    let band_of = |at: u64| {
        let (r, c) = (at as usize / k, at as usize % k);
        (
            r / TILE_ROWS * groups + c / GROUP,
            (r % TILE_ROWS * GROUP + c % GROUP) as u16,
        )
    };
    let total: usize = escapes.iter().map(Vec::len).sum();
    // Positions into the side list fit 32 bits (checked: a matrix of more than 4G escaped
    // values is left uncoded).
    u32::try_from(total).ok()?;
    let mut band_start = vec![0u32; m.div_ceil(TILE_ROWS) * groups + 1];
    let (mut escape_keys, mut escaped_high) = (vec![0u16; total], vec![0u8; total]);
    if total > 0 {
        for &(at, _) in escapes.iter().flatten() {
            band_start[band_of(at).0 + 1] += 1;
        }
        for b in 1..band_start.len() {
            band_start[b] += band_start[b - 1];
        }
        let mut next = band_start.clone();
        for &(at, high) in escapes.iter().flatten() {
            let (band, key) = band_of(at);
            let i = next[band] as usize;
            next[band] += 1;
            (escape_keys[i], escaped_high[i]) = (key, high);
        }
    }
    Some(Parts {
        table,
        band_start,
        escape_keys,
        escaped_high,
    })
}

impl Bf16Coded {
    /// What the coding holds besides its shape and table, for writing it to a file
    /// ([`super::coded_cache`]): the groups' bytes, the bands' starts, the escaped values' keys
    /// and high bytes.
    pub(crate) fn parts(&self) -> (&[u8], &[u32], &[u16], &[u8]) {
        (
            &self.region[self.at.clone()],
            &self.band_start,
            &self.escape_keys,
            &self.escaped_high,
        )
    }

    /// The coding of an `m × k` matrix read back from a file: its groups at `at` in `region`,
    /// its side lists as [`Bf16Coded::parts`] gave them. `None` unless every part has the size
    /// the shape implies, the groups start on 64 bytes, the escape entry is in no other table
    /// slot, the bands' starts rise from 0 to the side list's length, and every key names a
    /// value of its band: what the kernels rely on never to read outside the coding (a damaged
    /// file can still change values, as a damaged checkpoint can).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_parts(
        (m, k): (usize, usize),
        table: [u8; 16],
        region: Arc<Mmap>,
        at: std::ops::Range<usize>,
        band_start: Vec<u32>,
        escape_keys: Vec<u16>,
        escaped_high: Vec<u8>,
    ) -> Option<Bf16Coded> {
        let bands = m.div_ceil(TILE_ROWS).checked_mul(k.div_ceil(GROUP))?;
        let ok = m > 0
            && k > 0
            && at.start <= at.end
            && at.end <= region.len()
            && at.start.is_multiple_of(64)
            && Some(at.len()) == m.checked_mul(row_bytes(k))
            && !table[..ESCAPE as usize].contains(&table[ESCAPE as usize])
            && band_start.len() == bands + 1
            && band_start.first() == Some(&0)
            && band_start.windows(2).all(|w| w[0] <= w[1])
            && band_start.last().map(|&e| e as usize) == Some(escape_keys.len())
            && escape_keys.len() == escaped_high.len()
            && (escape_keys.iter()).all(|&key| usize::from(key) < TILE_ROWS * GROUP);
        ok.then_some(Bf16Coded {
            m,
            k,
            table,
            region,
            at,
            band_start,
            escape_keys,
            escaped_high,
        })
    }

    /// Codes a BF16 matrix of `m` rows of `k` values in a region of its own (`None` when `w`
    /// is not a 2-D BF16 matrix or memory for the copy is refused). A model codes its matrices
    /// together ([`code_together`]).
    pub fn new(w: &Tensor) -> Option<Bf16Coded> {
        code_together(&[w]).pop().flatten()
    }

    /// Bytes one pass over the matrix reads (the groups; the side list is a few in 10,000).
    pub fn bytes(&self) -> usize {
        self.at.len()
    }

    /// How many values have their high byte in the side list.
    pub fn escapes(&self) -> usize {
        self.escaped_high.len()
    }

    /// Groups per row.
    #[inline]
    pub fn groups(&self) -> usize {
        self.k.div_ceil(GROUP)
    }

    /// The rows of the tile holding row `r`: its first row and how many it has.
    #[inline]
    pub fn tile(&self, r: usize) -> (usize, usize) {
        let first = r / TILE_ROWS * TILE_ROWS;
        (first, TILE_ROWS.min(self.m - first))
    }

    /// Bytes from a group of row `r` to the same row's next group (the tile's rows times
    /// [`GROUP_BYTES`]); within a group, the tile's rows are [`GROUP_BYTES`] apart.
    #[inline]
    pub fn group_step(&self, r: usize) -> usize {
        self.tile(r).1 * GROUP_BYTES
    }

    /// Offset of group `g` of row `r` in the groups.
    #[inline]
    fn offset(&self, r: usize, g: usize) -> usize {
        let (first, rows) = self.tile(r);
        first * self.groups() * GROUP_BYTES + (g * rows + r - first) * GROUP_BYTES
    }

    /// Group `g` of row `r` (its [`GROUP_BYTES`] bytes).
    ///
    /// # Panics
    /// When `r >= m` or `g` is past the row's groups.
    #[inline]
    pub fn group(&self, r: usize, g: usize) -> &[u8] {
        assert!(r < self.m && g < self.groups(), "group {g} of row {r}");
        &self.region[self.at.clone()][self.offset(r, g)..][..GROUP_BYTES]
    }

    /// The start of group `g` of row `r` (as [`Bf16Coded::group`], for the kernels, which ask
    /// at every tile: the bounds the construction checked are not checked again).
    ///
    /// # Panics
    /// As [`Bf16Coded::group`].
    #[inline(always)]
    pub fn group_ptr(&self, r: usize, g: usize) -> *const u8 {
        assert!(r < self.m && g < self.groups(), "group {g} of row {r}");
        // In bounds: `at` lies inside the region and holds every row's groups (checked when
        // the coding was made), and `offset` of a valid group is below `at.len()`.
        let at = self.at.start + self.offset(r, g);
        debug_assert!(at + GROUP_BYTES <= self.at.end);
        self.region.as_ptr().wrapping_add(at)
    }

    /// Whether any row of the tile holding row `r` has an escaped value in group `g`.
    #[inline]
    pub fn band_escapes(&self, r: usize, g: usize) -> bool {
        let b = r / TILE_ROWS * self.groups() + g;
        self.band_start[b] != self.band_start[b + 1]
    }

    /// The escaped values of row `r` in group `g`: (column within the group, high byte),
    /// ascending; a scan of the band's few entries.
    #[inline]
    pub fn group_escapes(&self, r: usize, g: usize) -> impl Iterator<Item = (usize, u8)> + '_ {
        let b = r / TILE_ROWS * self.groups() + g;
        let band = self.band_start[b] as usize..self.band_start[b + 1] as usize;
        let row = r % TILE_ROWS;
        self.escape_keys[band.clone()]
            .iter()
            .zip(&self.escaped_high[band])
            .filter(move |(&key, _)| usize::from(key) / GROUP == row)
            .map(|(&key, &high)| (usize::from(key) % GROUP, high))
    }

    /// `rows` cut where tiles end: each piece lies in one tile, whose rows it gives.
    pub fn tile_spans(
        &self,
        rows: std::ops::Range<usize>,
    ) -> impl Iterator<Item = (std::ops::Range<usize>, usize)> + '_ {
        let mut at = rows.start;
        std::iter::from_fn(move || {
            (at < rows.end).then(|| {
                let (first, n) = self.tile(at);
                let span = at..rows.end.min(first + n);
                at = span.end;
                (span, n)
            })
        })
    }

    /// The high byte of the escaped value at `row`, `col`.
    ///
    /// # Panics
    /// When that value is not escaped (its code is not [`ESCAPE`]).
    #[inline]
    pub fn escaped_high_byte(&self, row: usize, col: usize) -> u8 {
        self.group_escapes(row, col / GROUP)
            .find(|&(j, _)| j == col % GROUP)
            .unwrap_or_else(|| panic!("value {row},{col} is not escaped"))
            .1
    }

    /// Row `r` decoded back to bf16 bits (the plain version of the kernel's decoding).
    pub fn decode_row(&self, r: usize) -> Vec<u16> {
        (0..self.k)
            .map(|c| {
                let g = self.group(r, c / GROUP);
                let q = slot(c % GROUP);
                let code = (g[q % 32] >> (4 * (q / 32))) & 0xF;
                let high = if code == ESCAPE {
                    self.escaped_high_byte(r, c)
                } else {
                    self.table[code as usize]
                };
                u16::from_le_bytes([g[32 + q], high])
            })
            .collect()
    }
}

/// The 15 most frequent high bytes of the bf16 values in `bytes` (ties to the smaller byte),
/// and in the 16th entry the smallest byte not among them; fewer distinct bytes leave 0s that
/// no value uses. Counted by [`count_high_bytes_avx512`] when `fast` and this CPU has it, else
/// by [`count_high_bytes`]: the same counts either way.
fn frequent_high_bytes(bytes: &[u8], fast: bool) -> [u8; 16] {
    let counts = bytes
        .par_chunks(COUNT_CHUNK)
        .map(|c| {
            #[cfg(target_arch = "x86_64")]
            if fast && avx512_coder() {
                // SAFETY: the CPU has AVX-512F/BW/VBMI (`avx512_coder`).
                return unsafe { count_high_bytes_avx512(c) };
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = fast;
            count_high_bytes(c)
        })
        .reduce(
            || [0u64; 256],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                a
            },
        );
    let mut order: Vec<u8> = (0..=255).filter(|&h| counts[h as usize] > 0).collect();
    order.sort_by_key(|&h| (std::cmp::Reverse(counts[h as usize]), h));
    let mut table = [0u8; 16];
    for (t, &h) in table.iter_mut().zip(order.iter().take(ESCAPE as usize)) {
        *t = h;
    }
    table[ESCAPE as usize] = (0..=255)
        .find(|b| !table[..ESCAPE as usize].contains(b))
        .expect("15 entries leave a byte out");
    table
}

/// Bytes of bf16 values per parallel task of [`frequent_high_bytes`] (even: whole values).
const COUNT_CHUNK: usize = 1 << 20;

/// How often each high byte occurs among the bf16 values in `bytes` (an even length): the
/// scalar reference of [`count_high_bytes_avx512`]. Each value is an increment of a counter
/// that the same byte's last increment wrote, so runs of one byte wait on each other: with
/// this as the whole count, a random 18944 × 3584 matrix timed through `Bf16Coded::new` took
/// 19-23 ms of its coding's 95-120 ms (2-core AMD EPYC Zen 5, 2026-12-05).
fn count_high_bytes(bytes: &[u8]) -> [u64; 256] {
    let mut n = [0u64; 256];
    bytes
        .iter()
        .skip(1)
        .step_by(2)
        .for_each(|&h| n[h as usize] += 1);
    n
}

/// Leading bytes of each [`count_high_bytes_avx512`] task counted by [`count_high_bytes`],
/// whose most frequent high bytes are the ones the rest counts in vectors.
#[cfg(target_arch = "x86_64")]
const SAMPLE_BYTES: usize = 4096;

/// Vectors of 64 high bytes counted into byte-wide lanes before they are summed (each lane
/// counts at most one per vector: 255 fit a byte).
#[cfg(target_arch = "x86_64")]
const COUNT_BLOCK: usize = 255;

/// [`count_high_bytes`] with AVX-512: exactly the same counts. The first [`SAMPLE_BYTES`] are
/// counted one by one; their 16 most frequent high bytes (distinct; any bytes fill up a sample with
/// fewer) are then counted 64 values at a time, one byte-wide counter per lane and byte (three
/// vector operations each), summed every [`COUNT_BLOCK`] vectors; the values whose high byte is
/// none of the 16, found through a 256-entry lookup ([`ByteLut`]), are counted one by one. A
/// model's matrix has 1.4-1.8 in 10,000 values outside its 15 most frequent high bytes (module
/// docs), so nearly every vector is counted in vectors alone. Where the 16 are less than half of
/// the sample the rest is counted by [`count_high_bytes`]: on uniformly random bytes held in cache
/// (512 KiB) one core counted 3.1-3.2 GB/s in vectors, 7.9-8.0 one by one. On a random 18944 × 3584
/// matrix timed through `Bf16Coded::new` (2-core AMD EPYC Zen 5, 2026-12-05) the count took 19-23
/// ms with [`count_high_bytes`] and takes 2.5-3.8 ms with this, about one read of its 136 MB (with
/// a compare into a mask register and a masked add per byte, which LLVM made three operations, two
/// on the mask registers' few ports: 5.0-5.7 ms); one core counts 32-33 GB/s of its bf16 bytes held
/// in cache (512 KiB, 200 times).
///
/// # Safety
/// The CPU has AVX-512F, AVX-512BW and AVX-512VBMI.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
unsafe fn count_high_bytes_avx512(bytes: &[u8]) -> [u64; 256] {
    use std::arch::x86_64::*;
    let (sample, rest) = bytes.split_at(bytes.len().min(SAMPLE_BYTES));
    let mut n = count_high_bytes(sample);
    // The sample's 16 most frequent bytes (ties in any order: which 16 only sets the speed).
    let mut order: [u8; 256] = std::array::from_fn(|h| h as u8);
    order.select_nth_unstable_by_key(15, |&h| std::cmp::Reverse(n[h as usize]));
    let wanted: [u8; 16] = std::array::from_fn(|i| order[i]);
    // Less than half the sample: one by one.
    if 2 * wanted.iter().map(|&h| n[h as usize]).sum::<u64>() < (sample.len() / 2) as u64 {
        count_high_bytes(rest)
            .iter()
            .zip(&mut n)
            .for_each(|(r, n)| *n += r);
        return n;
    }
    // 0x80 (top bit set) for the bytes counted one by one, 0 for the 16.
    let mut other = [0x80u8; 256];
    wanted.iter().for_each(|&h| other[h as usize] = 0);
    let other = ByteLut::new(&other);
    let want: [__m512i; 16] = std::array::from_fn(|i| _mm512_set1_epi8(wanted[i] as i8));
    // SAFETY: `HIGH_OF_VALUE` is 64 bytes.
    let high_of_value = _mm512_loadu_si512(HIGH_OF_VALUE.as_ptr().cast());
    let one = _mm512_set1_epi8(1);
    for block in rest.chunks(COUNT_BLOCK * GROUP * 2) {
        let mut acc = [_mm512_setzero_si512(); 16];
        let vectors = block.chunks_exact(GROUP * 2);
        for &h in vectors.remainder().iter().skip(1).step_by(2) {
            n[h as usize] += 1;
        }
        for v in vectors {
            // SAFETY: `v` is 128 bytes.
            let (a, b) = (
                _mm512_loadu_si512(v.as_ptr().cast()),
                _mm512_loadu_si512(v.as_ptr().add(64).cast()),
            );
            let high = _mm512_permutex2var_epi8(a, high_of_value, b);
            // 1 where `high` is `want`: `1 - (high ^ want)` saturated at 0, without a mask
            // register.
            for (acc, &want) in acc.iter_mut().zip(&want) {
                let same = _mm512_subs_epu8(one, _mm512_xor_si512(high, want));
                *acc = _mm512_add_epi8(*acc, same);
            }
            let mut rest = _mm512_movepi8_mask(other.get(high));
            while rest != 0 {
                n[v[2 * rest.trailing_zeros() as usize + 1] as usize] += 1;
                rest &= rest - 1;
            }
        }
        for (acc, &h) in acc.iter().zip(&wanted) {
            let sums = _mm512_sad_epu8(*acc, _mm512_setzero_si512());
            n[h as usize] += _mm512_reduce_add_epi64(sums) as u64;
        }
    }
    n
}

/// Whether this CPU runs the AVX-512 coder ([`code_tile_avx512`], [`count_high_bytes_avx512`]):
/// AVX-512F, BW and VBMI (`vpermi2b`, a byte shuffle across a whole pair of vectors).
fn avx512_coder() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vbmi")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Byte `q`: where slot `q`'s low byte lies among a group's 128 source bytes
/// (`2 · value_in_slot(q)`).
#[cfg(target_arch = "x86_64")]
const LOW_OF_SLOT: [u8; GROUP] = {
    let mut a = [0u8; GROUP];
    let mut q = 0;
    while q < GROUP {
        a[q] = (2 * value_in_slot(q)) as u8;
        q += 1;
    }
    a
};

/// Byte `j`: where value `j`'s high byte lies among a group's 128 source bytes (`2j + 1`).
#[cfg(target_arch = "x86_64")]
const HIGH_OF_VALUE: [u8; GROUP] = {
    let mut a = [0u8; GROUP];
    let mut j = 0;
    while j < GROUP {
        a[j] = (2 * j + 1) as u8;
        j += 1;
    }
    a
};

/// A 256-entry byte table looked up 64 bytes at a time: two `vpermi2b` (each over 128 entries,
/// the index's low 7 bits) and a blend on the index's top bit.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct ByteLut([std::arch::x86_64::__m512i; 4]);

#[cfg(target_arch = "x86_64")]
impl ByteLut {
    /// The table `t` in four vectors.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    fn new(t: &[u8; 256]) -> ByteLut {
        use std::arch::x86_64::*;
        // SAFETY: each load reads 64 of `t`'s 256 bytes.
        ByteLut(std::array::from_fn(|i| unsafe {
            _mm512_loadu_si512(t[64 * i..].as_ptr().cast())
        }))
    }

    /// The entries of the 64 bytes of `i`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    fn get(&self, i: std::arch::x86_64::__m512i) -> std::arch::x86_64::__m512i {
        use std::arch::x86_64::*;
        let low = _mm512_permutex2var_epi8(self.0[0], i, self.0[1]);
        let high = _mm512_permutex2var_epi8(self.0[2], i, self.0[3]);
        _mm512_mask_blend_epi8(_mm512_movepi8_mask(i), low, high)
    }
}

/// Codes one tile (`src`: its rows' bf16 bytes, `k` values each) into `dst` (its groups, row
/// by row within each group, zeroed); returns its escapes as (position, high byte), positions
/// counted from `first` (the tile's first value), ascending. With [`code_tile_avx512`] when
/// `fast` and this CPU has it, else [`code_tile_scalar`]: the same bytes either way.
fn code_tile(
    dst: &mut [u8],
    src: &[u8],
    k: usize,
    code_of: &[u8; 256],
    first: u64,
    fast: bool,
) -> Vec<(u64, u8)> {
    #[cfg(target_arch = "x86_64")]
    if fast && avx512_coder() {
        // SAFETY: the CPU has AVX-512F/BW/VBMI (`avx512_coder`).
        return unsafe { code_tile_avx512(dst, src, k, code_of, first) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = fast;
    code_tile_scalar(dst, src, k, code_of, first)
}

/// [`code_tile`] one value at a time: the reference of [`code_tile_avx512`].
fn code_tile_scalar(
    dst: &mut [u8],
    src: &[u8],
    k: usize,
    code_of: &[u8; 256],
    first: u64,
) -> Vec<(u64, u8)> {
    let rows = src.len() / (k * 2);
    let mut escapes = Vec::new();
    for (r, row) in src.chunks_exact(k * 2).enumerate() {
        for (g, s) in row.chunks(GROUP * 2).enumerate() {
            let d = &mut dst[(g * rows + r) * GROUP_BYTES..][..GROUP_BYTES];
            let at = first + (r * k + g * GROUP) as u64;
            code_group(d, s, code_of, at, &mut escapes);
        }
    }
    escapes
}

/// Codes one group's values (`s`: their bf16 bytes, at most [`GROUP`]) into `d` (its
/// [`GROUP_BYTES`], zeroed), pushing its escapes (position from `at`, the group's first value,
/// and high byte) onto `escapes` in column order.
fn code_group(d: &mut [u8], s: &[u8], code_of: &[u8; 256], at: u64, escapes: &mut Vec<(u64, u8)>) {
    for (j, v) in s.chunks_exact(2).enumerate() {
        let (low, high) = (v[0], v[1]);
        let code = code_of[high as usize];
        if code == ESCAPE {
            escapes.push((at + j as u64, high));
        }
        let q = slot(j);
        d[q % 32] |= code << (4 * (q / 32));
        d[32 + q] = low;
    }
}

/// [`code_tile_scalar`] with AVX-512, a whole group of 64 values at a time: the same bytes and
/// escapes. From the group's 128 source bytes, one `vpermi2b` gathers the low bytes in slot order
/// ([`LOW_OF_SLOT`]) and one the high bytes; a [`ByteLut`] of `code_of` turns those into codes (the
/// table itself, so a duplicate entry codes as `code_of` does); slot `q + 32`'s code shifted into
/// slot `q`'s byte packs the nibbles. A group with an escaped value (a code of [`ESCAPE`] in the
/// vector) lists its escapes one value at a time; a row's last group, when `k` is not a multiple of
/// [`GROUP`], is coded by [`code_group`]. On a random 18944 × 3584 matrix timed through
/// `Bf16Coded::new` (2-core AMD EPYC Zen 5, 2026-12-05) the tiles took 71-100 ms with
/// [`code_tile_scalar`] and take 5.2-6.6 ms with this, the faults of the region's fresh pages
/// included where the VM backs them at once (2.7-4 ms of the 5.2-6.6 when touched alone; this VM's
/// host sometimes takes 20-40 ms, or 0.3 s, to). One core codes 31-33 GB/s of bf16 bytes held in
/// its cache (48 rows, 200 times). Tried and dropped, all slower on the same matrix with the region
/// already faulted (5.2-6.2 ms here): the groups in storage order (each group of the tile's 8 rows
/// in turn, 8 read streams), 7.8-8.8 ms; that with non-temporal stores of whole cache lines (two
/// groups are three), 7.9-8.7 ms; rows in pairs with such stores, 6.2-7.5 ms.
///
/// # Safety
/// The CPU has AVX-512F, AVX-512BW and AVX-512VBMI.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
unsafe fn code_tile_avx512(
    dst: &mut [u8],
    src: &[u8],
    k: usize,
    code_of: &[u8; 256],
    first: u64,
) -> Vec<(u64, u8)> {
    use std::arch::x86_64::*;
    let rows = src.len() / (k * 2);
    let full = k / GROUP;
    assert!(dst.len() >= rows * row_bytes(k), "code_tile_avx512: dst");
    let code = ByteLut::new(code_of);
    // SAFETY: `LOW_OF_SLOT` is 64 bytes.
    let low_of_slot = _mm512_loadu_si512(LOW_OF_SLOT.as_ptr().cast());
    let high_of_slot = _mm512_add_epi8(low_of_slot, _mm512_set1_epi8(1));
    let escape = _mm512_set1_epi8(ESCAPE as i8);
    let mut escapes = Vec::new();
    for (r, row) in src.chunks_exact(k * 2).enumerate() {
        for g in 0..full {
            let s = &row[g * GROUP * 2..][..GROUP * 2];
            // SAFETY: `s` is 128 bytes; group `g` of row `r` is the `GROUP_BYTES` at `d`, inside
            // `dst` (asserted above).
            let d = dst.as_mut_ptr().add((g * rows + r) * GROUP_BYTES);
            let (a, b) = (
                _mm512_loadu_si512(s.as_ptr().cast()),
                _mm512_loadu_si512(s.as_ptr().add(64).cast()),
            );
            let low = _mm512_permutex2var_epi8(a, low_of_slot, b);
            let codes = code.get(_mm512_permutex2var_epi8(a, high_of_slot, b));
            // Codes are below 16: shifting 16-bit lanes by 4 keeps each in its byte.
            let high_nibbles = _mm256_slli_epi16(_mm512_extracti64x4_epi64::<1>(codes), 4);
            let packed = _mm256_or_si256(_mm512_castsi512_si256(codes), high_nibbles);
            _mm256_storeu_si256(d.cast(), packed);
            _mm512_storeu_si512(d.add(32).cast(), low);
            if _mm512_cmpeq_epi8_mask(codes, escape) != 0 {
                let at = first + (r * k + g * GROUP) as u64;
                for (j, v) in s.chunks_exact(2).enumerate() {
                    if code_of[v[1] as usize] == ESCAPE {
                        escapes.push((at + j as u64, v[1]));
                    }
                }
            }
        }
        if full < k.div_ceil(GROUP) {
            let d = &mut dst[(full * rows + r) * GROUP_BYTES..][..GROUP_BYTES];
            let at = first + (r * k + full * GROUP) as u64;
            code_group(d, &row[full * GROUP * 2..], code_of, at, &mut escapes);
        }
    }
    escapes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `[m, k]` BF16 tensor of normal-looking values (a few binades) plus some far outside
    /// them (escapes), zeros and negative zeros.
    fn matrix(m: usize, k: usize, seed: u64) -> (Tensor, Vec<u16>) {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        let bits: Vec<u16> = (0..m * k)
            .map(|_| {
                let r = next();
                match r % 97 {
                    0 => 0x8000,
                    1 => 0,
                    // Escapes: huge, tiny, infinite and NaN values.
                    2 => 0x7F80 | (r >> 16) as u16 & 0x807F,
                    3 => (r >> 8) as u16 & 0x80FF,
                    4 => 0x4700 | (r >> 16) as u16 & 0x80FF,
                    _ => {
                        let exp = 112 + (r >> 8) % 14;
                        (((r >> 20) & 1) << 15 | exp << 7 | (r & 0x7F)) as u16
                    }
                }
            })
            .collect();
        let bytes = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        (
            Tensor::from_bytes(StoredDtype::BF16, vec![m, k], bytes),
            bits,
        )
    }

    #[test]
    fn every_row_decodes_to_its_stored_bits() {
        for (m, k) in [
            (1, 1),
            (3, 31),
            (5, 32),
            (7, 33),
            (2, 64),
            (3, 65),
            (4, 100),
            (17, 1056),
            (35, 130),
            (48, 64),
        ] {
            let (t, bits) = matrix(m, k, (m * 1000 + k) as u64);
            let c = Bf16Coded::new(&t).expect("a BF16 matrix");
            assert_eq!(c.bytes(), m * k.div_ceil(64) * 96);
            assert!(!c.table[..15].contains(&c.table[15]));
            for r in 0..m {
                assert_eq!(c.decode_row(r), bits[r * k..(r + 1) * k], "{m}x{k} row {r}");
            }
            // Tiles of TILE_ROWS rows (the last what is left), group after group, row after
            // row.
            let (last, rows) = c.tile(m - 1);
            let t = TILE_ROWS;
            assert_eq!((last, rows), ((m - 1) / t * t, m - (m - 1) / t * t));
            let groups = k.div_ceil(64);
            if m > 1 {
                let gap =
                    |r: usize, g: usize| c.group_ptr(r, g) as usize - c.group_ptr(0, 0) as usize;
                assert_eq!(gap(1, 0), 96);
                assert_eq!(gap(0, groups - 1), (groups - 1) * c.group_step(0));
                assert_eq!(gap(last, 0), last * groups * 96);
            }
            // A band is flagged exactly where one of its values is escaped.
            for r in 0..m {
                for g in 0..groups {
                    let any = (0..rows_of(&c, r)).map(|i| c.tile(r).0 + i).any(|rr| {
                        (g * 64..k.min(g * 64 + 64)).any(|col| escaped(&c, &bits, rr * k + col))
                    });
                    assert_eq!(c.band_escapes(r, g), any, "{m}x{k} row {r} group {g}");
                }
            }
            let spans: Vec<_> = c.tile_spans(1..m).collect();
            assert_eq!(spans.first().map(|s| s.0.start), (m > 1).then_some(1));
            assert!(spans
                .iter()
                .all(|(s, n)| c.tile(s.start) == c.tile(s.end - 1) && c.tile(s.start).1 == *n));
            assert_eq!(spans.iter().map(|s| s.0.len()).sum::<usize>(), m - 1);
        }
    }

    /// Whether value `at` (`row·k + column`) of the matrix whose bits are `bits` is escaped:
    /// its high byte is not among the table's 15 (the side list is not asked).
    fn escaped(c: &Bf16Coded, bits: &[u16], at: usize) -> bool {
        !c.table[..ESCAPE as usize].contains(&((bits[at] >> 8) as u8))
    }

    /// Rows in the tile holding row `r`.
    fn rows_of(c: &Bf16Coded, r: usize) -> usize {
        c.tile(r).1
    }

    #[test]
    fn slots_are_a_permutation_and_value_in_slot_inverts_it() {
        let mut seen = [false; GROUP];
        for j in 0..GROUP {
            assert!(
                !std::mem::replace(&mut seen[slot(j)], true),
                "slot {} twice",
                slot(j)
            );
            assert_eq!(value_in_slot(slot(j)), j);
        }
        // Lane 1's low half holds values 8..16, its high half values 40..48.
        assert_eq!((slot(8), slot(15), slot(40), slot(47)), (16, 23, 24, 31));
    }

    #[test]
    fn the_table_holds_the_most_frequent_high_bytes() {
        let (t, bits) = matrix(64, 512, 7);
        let c = Bf16Coded::new(&t).unwrap();
        let mut counts = [0usize; 256];
        bits.iter().for_each(|b| counts[(b >> 8) as usize] += 1);
        let least_in = c.table[..15].iter().map(|&h| counts[h as usize]).min();
        let most_out = (0..256)
            .filter(|h| !c.table[..15].contains(&(*h as u8)))
            .map(|h| counts[h])
            .max();
        assert!(least_in >= most_out, "{least_in:?} < {most_out:?}");
        // The fixture's escapes are rarer than its common bytes but there are some.
        assert!(c.escapes() > 0);
        assert!(c.escapes() < bits.len() / 10);
    }

    #[test]
    fn auto_codes_beside_the_weights_what_fits_there_and_in_their_place_what_fits_so() {
        let gib = 1u64 << 30;
        use crate::kernels::matmul::{codes_by_default, codes_in_place_by_default};
        let beside = match codes_by_default() {
            true => Place::Beside,
            false => Place::Nowhere,
        };
        let instead = match codes_in_place_by_default() {
            true => Place::Instead,
            false => Place::Nowhere,
        };
        // 1 GiB of matrices (0.75 coded) beside 1 GiB mapped, 10 GiB free: beside them where the
        // CPU sums coded matrices.
        assert_eq!(auto(gib, gib, Some(10 * gib), false), beside);
        // Never when streamed, without BF16 matrices, or with free memory unknown.
        assert_eq!(auto(gib, gib, Some(10 * gib), true), Place::Nowhere);
        assert_eq!(auto(gib, 0, Some(10 * gib), false), Place::Nowhere);
        assert_eq!(auto(gib, gib, None, false), Place::Nowhere);
        // The 7B shape on this 23 GB machine (22.7 GiB free): 15.23 GB mapped, 14.14 GB of
        // matrices; 15.23 + 10.61 > 0.8 × 24.4 GB, 1.09 + 10.61 fits: in their place.
        let free = Some(22_700_000_000 / 1_000_000_000 * gib);
        assert_eq!(auto(15_230_000_000, 14_140_000_000, free, false), instead);
        // A 14B (29.5 GB, 27.5 of matrices): the codings alone (22.6 GB) do not fit either.
        assert_eq!(
            auto(29_500_000_000, 27_500_000_000, free, false),
            Place::Nowhere
        );
    }

    #[test]
    fn matrices_coded_together_share_one_region_from_a_2_mib_boundary() {
        let (a, a_bits) = matrix(9, 70, 1);
        let (b, b_bits) = matrix(3, 5, 2);
        let f32s = Tensor::from_bytes(StoredDtype::F32, vec![2, 2], vec![0; 16]);
        let coded = code_together(&[&a, &f32s, &b]);
        assert_eq!(coded.len(), 3);
        let (ca, cb) = (coded[0].as_ref().unwrap(), coded[2].as_ref().unwrap());
        assert!(coded[1].is_none());
        assert!(Arc::ptr_eq(&ca.region, &cb.region));
        assert_eq!(
            ca.group_ptr(0, 0) as usize % crate::weights::page_cache::HUGE_PAGE,
            0
        );
        // One after the other, each from a multiple of 64 bytes, not overlapping.
        assert_eq!(ca.at.start % 64, 0);
        assert_eq!(cb.at.start, ca.at.end.next_multiple_of(64));
        for r in 0..9 {
            assert_eq!(ca.decode_row(r), a_bits[r * 70..(r + 1) * 70], "a row {r}");
        }
        for r in 0..3 {
            assert_eq!(cb.decode_row(r), b_bits[r * 5..(r + 1) * 5], "b row {r}");
        }
        // The kernels' pointers are the groups' own, the second matrix's and a short last
        // tile's included.
        for (c, m) in [(ca, 9), (cb, 3)] {
            for r in 0..m {
                for g in 0..c.groups() {
                    assert_eq!(
                        c.group_ptr(r, g),
                        c.group(r, g).as_ptr(),
                        "row {r} group {g}"
                    );
                }
            }
        }
        // Through tensors: a clone shares its original's coding, made once.
        let a2 = a.clone();
        Tensor::code_bf16_together(&[&a, &a2, &b]);
        assert!(a.code_bf16_tried() && b.coded().is_some());
        assert!(std::ptr::eq(a.coded().unwrap(), a2.coded().unwrap()));
        assert!(Arc::ptr_eq(
            &a.coded().unwrap().region,
            &b.coded().unwrap().region
        ));
        // Nothing to code: no region.
        assert!(code_together(&[&f32s]).iter().all(Option::is_none));
    }

    /// `n` values' bf16 bits of kind `kind`: 0, every bit random (most values escaped); 1, three
    /// high bytes, 0 among them (fewer than 15 distinct: the table's trailing 0s repeat a used
    /// entry); 2, 17 high bytes evenly (some escaped in every group); 3, one value throughout;
    /// 4, all zeros.
    fn bits_of(kind: usize, n: usize, seed: u64) -> Vec<u16> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let r = (s >> 33) as u32;
                let high = match kind {
                    0 => (r >> 8) as u8,
                    1 => [0x00, 0x3C, 0xBC][(r >> 8) as usize % 3],
                    2 => 0x30 + ((r >> 8) % 17) as u8,
                    3 => 0x3F,
                    _ => 0,
                };
                let low = if kind >= 3 {
                    0x80 * (kind == 3) as u8
                } else {
                    r as u8
                };
                u16::from_le_bytes([low, high])
            })
            .collect()
    }

    #[test]
    fn the_avx512_coder_writes_the_scalar_references_bytes() {
        // Required on x86_64, not skipped: the machine these tests run on (AMD EPYC Zen 5) has
        // the features. The AVX-512 coder exists on x86_64 alone: elsewhere both codings below
        // are the scalar reference's, and the comparison checks nothing.
        #[cfg(target_arch = "x86_64")]
        assert!(avx512_coder(), "this CPU lacks AVX-512F/BW/VBMI");
        #[cfg(not(target_arch = "x86_64"))]
        eprintln!("skipped: no AVX-512 coder off x86_64");
        let shapes = [
            (1, 1),
            (1, 64),
            (3, 63),
            (7, 65),
            (9, 128),
            (8, 200),
            (17, 1056),
            (13, 5 * 64 + 17),
            // 1.2 MB: two tasks of the count (`COUNT_CHUNK`).
            (300, 2000),
        ];
        let mut escaped = 0;
        // Kinds 0-4 as `bits_of`; 5, the fixture of `matrix` (a few escapes).
        for kind in 0..6 {
            for (i, &(m, k)) in shapes.iter().enumerate() {
                let seed = (kind * 100 + i) as u64;
                let t = if kind == 5 {
                    matrix(m, k, seed).0
                } else {
                    let bytes = bits_of(kind, m * k, seed)
                        .iter()
                        .flat_map(|b| b.to_le_bytes())
                        .collect();
                    Tensor::from_bytes(StoredDtype::BF16, vec![m, k], bytes)
                };
                let mut fast = vec![0u8; m * row_bytes(k)];
                let mut reference = fast.clone();
                let f = code_matrix_on(&t, m, k, &mut fast, true).unwrap();
                let r = code_matrix_on(&t, m, k, &mut reference, false).unwrap();
                let what = format!("kind {kind}, {m}x{k}");
                assert_eq!(f.table, r.table, "{what}");
                assert!(fast == reference, "{what}: groups differ");
                assert_eq!(f.band_start, r.band_start, "{what}");
                assert_eq!(f.escape_keys, r.escape_keys, "{what}");
                assert_eq!(f.escaped_high, r.escaped_high, "{what}");
                escaped += r.escaped_high.len();
            }
        }
        assert!(escaped > 500_000, "{escaped} escapes");
    }

    #[test]
    fn the_avx512_count_is_the_scalar_count() {
        #[cfg(not(target_arch = "x86_64"))]
        eprintln!("skipped: no AVX-512 count off x86_64");
        #[cfg(target_arch = "x86_64")]
        {
            // Required, not skipped, as in the test above.
            assert!(avx512_coder(), "this CPU lacks AVX-512F/BW/VBMI");
            let block = COUNT_BLOCK * GROUP * 2;
            let lens = [
                0,
                2,
                130,
                SAMPLE_BYTES,
                SAMPLE_BYTES + 2,
                SAMPLE_BYTES + 128,
                SAMPLE_BYTES + block,
                SAMPLE_BYTES + block + 2,
                SAMPLE_BYTES + 3 * block + 7 * 128 + 6,
            ];
            // Kinds 0-4 as `bits_of`; 5, a sample unlike the rest (its 16 most frequent bytes,
            // of 20, are none of the rest's); 6, a sample of random bytes (the rest counted one
            // by one) before three bytes.
            for kind in 0..7 {
                for (i, &len) in lens.iter().enumerate() {
                    let of = if kind == 6 { 0 } else { kind.min(4) };
                    let mut bytes: Vec<u8> = bits_of(of, len / 2, i as u64)
                        .iter()
                        .flat_map(|b| b.to_le_bytes())
                        .collect();
                    for (j, h) in bytes.iter_mut().skip(1).step_by(2).enumerate() {
                        let sample = j < SAMPLE_BYTES / 2;
                        match kind {
                            5 if sample => *h = (j % 20) as u8,
                            5 => *h = (100 + j % 40) as u8,
                            6 if !sample => *h = (j % 3) as u8,
                            _ => {}
                        }
                    }
                    // SAFETY: the CPU has the features (asserted above).
                    let fast = unsafe { count_high_bytes_avx512(&bytes) };
                    assert_eq!(fast, count_high_bytes(&bytes), "kind {kind}, {len} bytes");
                }
            }
        }
    }

    #[test]
    fn only_2d_bf16_matrices_are_coded() {
        let f32s = Tensor::from_bytes(StoredDtype::F32, vec![2, 2], vec![0; 16]);
        assert!(Bf16Coded::new(&f32s).is_none());
        let vector = Tensor::from_bytes(StoredDtype::BF16, vec![4], vec![0; 8]);
        assert!(Bf16Coded::new(&vector).is_none());
    }
}
