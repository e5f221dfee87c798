//! Measures a denser coding of BF16 matrices that the engine does not use: 6-bit codes for
//! *pairs* of high bytes (11.2 bits a value) against the engine's 4-bit codes for single high
//! bytes (12 bits a value, `weights::bf16_coded`), one-token products of a 896-column matrix on
//! AVX-512 (VBMI, VBMI2, BF16), so that the idea's cost is known rather than guessed.
//!
//! The pair coding, per group of 64 values (the engine's slot order, so the same two
//! `vpunpck*bw` give the values in order): the 63 most frequent (high byte, high byte) pairs of
//! neighbouring slots `2i, 2i + 1` in a table, 24 bytes of 6-bit pair codes (code 63: the pair
//! is not in the table, its two high bytes in a side list, tile by tile in the order the kernel
//! reads them), then the 64 low bytes. Rebuilding a group: `vpermb` spreads the codes' bytes so
//! that each 64-bit lane holds its four codes, `vpmultishiftqb` brings each slot's code to its
//! byte, `vpternlogd` keeps its 6 bits and sets bit 6 on second slots, one `vpermi2b` looks the
//! 128-byte table (first bytes, then second bytes) up, a `vpcmpeqb` against the escape entry
//! finds escaped slots, and a masked `vpexpandb` puts the side list's next bytes there (no branch:
//! on random groups, 40-60% of which hold an escape, a branch mispredicts).
//!
//! Both kernels run here in the same harness (an 8-row tile, each row's group rebuilt and summed
//! with two `vdpbf16ps`, every line prefetched 8 KiB ahead as the engine's decode does): the
//! 4-bit one is the engine's `coded_avx512` rebuild written out again, so the two differ only
//! in the coding. Both are checked against plain sums first. Reported: one thread on a matrix
//! in L2 (the rebuild's cost), then a large matrix on `BENCH_THREADS` threads (default: all),
//! in turns, five rounds, with the engine's own product (`linear_with` on its coding) as a
//! check that the harness's 4-bit kernel is representative.
//!
//! `cargo run --release -p lockstep-engine --example bench_pair_coding [ROWS]` (ROWS of the
//! large matrix, default 262144, a multiple of 16).
//!
//! Measured on a 2-core AMD EPYC Zen 5 (2026-12-05, README): in L2, one thread, 98-102
//! Gvalues/s (4-bit) against 53-57 (pairs; 89-94 without the escapes' expand, which is where the
//! time goes); streamed on two threads, pairs 0.96× the 4-bit coding's values a second where the
//! memory streamed ~77 GB/s, 0.99× at ~50 GB/s (1.02-1.07× in an earlier version of this
//! harness), 0.99× at ~40: the bytes they save are not time saved.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_imports))]
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use lockstep_engine::weights::bf16_coded::{slot, value_in_slot, GROUP, GROUP_BYTES, TILE_ROWS};

/// Columns (the 0.5B shape's hidden size) and 64-value groups a row.
const K: usize = 896;
const GROUPS: usize = K / GROUP;
/// Rows of a tile, whose groups are stored interleaved (the engine's coding's).
const TILE: usize = TILE_ROWS;
/// Bytes of a row's group: 4-bit (the engine's: 32 of codes, 64 low) and pair (24 of codes, 64
/// low) codings.
const CUR_BYTES: usize = GROUP_BYTES;
const PAIR_BYTES: usize = 88;
/// Pair code meaning "in the side list".
const PAIR_ESCAPE: usize = 63;
/// How far ahead the kernels prefetch (the engine's decode kernels' distance).
const AHEAD: usize = 8 << 10;

/// `len` values from a 64-bit LCG, uniform in `[0, 1)`.
fn uniform(len: usize, seed: u64) -> Vec<f64> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        })
        .collect()
}

/// `rows × K` bf16 weights (bits), normal with standard deviation `1/sqrt(K)` as the fixtures'
/// matrices (Box-Muller).
fn weights(rows: usize, seed: u64) -> Vec<u16> {
    let u = uniform(2 * rows * K, seed);
    let sd = 1.0 / (K as f64).sqrt();
    (0..rows * K)
        .map(|i| {
            let v =
                sd * (-2.0 * u[2 * i].ln()).sqrt() * (std::f64::consts::TAU * u[2 * i + 1]).cos();
            half::bf16::from_f64(v).to_bits()
        })
        .collect()
}

/// The engine's coding: 15 most frequent high bytes in a table; values outside it are moved
/// into it here (their high byte set to the table's first), since this harness times the
/// common path only (the engine's side list serves 1-2 values in 10,000).
struct Coded4 {
    data: Vec<u8>,
    table: [u8; 16],
}

fn code4(w: &mut [u16], rows: usize) -> Coded4 {
    let mut freq = [0usize; 256];
    w.iter().for_each(|&v| freq[(v >> 8) as usize] += 1);
    let mut order: Vec<usize> = (0..256).collect();
    order.sort_by_key(|&b| (std::cmp::Reverse(freq[b]), b));
    let mut table = [0u8; 16];
    let mut code = [u8::MAX; 256];
    for (i, &b) in order.iter().take(15).enumerate() {
        table[i] = b as u8;
        code[b] = i as u8;
    }
    for v in w.iter_mut() {
        if code[(*v >> 8) as usize] == u8::MAX {
            *v = (table[0] as u16) << 8 | (*v & 0xFF);
        }
    }
    let mut data = vec![0u8; rows * GROUPS * CUR_BYTES];
    for row in 0..rows {
        for g in 0..GROUPS {
            let o = ((row / TILE * GROUPS + g) * TILE + row % TILE) * CUR_BYTES;
            for j in 0..GROUP {
                let (v, s) = (w[row * K + g * GROUP + j], slot(j));
                let c = code[(v >> 8) as usize];
                data[o + s % 32] |= if s < 32 { c } else { c << 4 };
                data[o + 32 + s] = v as u8;
            }
        }
    }
    Coded4 { data, table }
}

/// The pair coding (see the module docs).
struct CodedPairs {
    data: Vec<u8>,
    first: [u8; 64],
    second: [u8; 64],
    side: Vec<u8>,
    /// Where each tile's side list starts.
    side_at: Vec<usize>,
}

/// The values of slots `2i` and `2i + 1` of group `g` of `row`.
fn pair(w: &[u16], row: usize, g: usize, i: usize) -> (u16, u16) {
    let at = row * K + g * GROUP;
    (
        w[at + value_in_slot(2 * i)],
        w[at + value_in_slot(2 * i + 1)],
    )
}

fn code_pairs(w: &[u16], rows: usize) -> CodedPairs {
    let key = |(a, b): (u16, u16)| (a >> 8) << 8 | b >> 8;
    let mut freq = vec![0usize; 1 << 16];
    for row in 0..rows {
        for g in 0..GROUPS {
            (0..32).for_each(|i| freq[key(pair(w, row, g, i)) as usize] += 1);
        }
    }
    let mut order: Vec<usize> = (0..1 << 16).collect();
    order.sort_by_key(|&p| (std::cmp::Reverse(freq[p]), p));
    let (mut first, mut second) = ([0u8; 64], [0u8; 64]);
    let mut code = vec![PAIR_ESCAPE as u8; 1 << 16];
    for (i, &p) in order.iter().take(PAIR_ESCAPE).enumerate() {
        (first[i], second[i], code[p]) = ((p >> 8) as u8, p as u8, i as u8);
    }
    // The escape entries: bytes no other entry of their table holds, so that a rebuilt byte
    // equal to one is an escape.
    let unused = |t: &[u8]| (0..=255u8).find(|b| !t.contains(b)).expect("a free byte");
    (first[PAIR_ESCAPE], second[PAIR_ESCAPE]) = (
        unused(&first[..PAIR_ESCAPE]),
        unused(&second[..PAIR_ESCAPE]),
    );
    // A 32-byte load of a group's codes may read past the last group.
    let mut data = vec![0u8; rows * GROUPS * PAIR_BYTES + 32];
    let (mut side, mut side_at) = (Vec::new(), Vec::new());
    for tile in 0..rows / TILE {
        side_at.push(side.len());
        for g in 0..GROUPS {
            for r in 0..TILE {
                let row = tile * TILE + r;
                let o = ((tile * GROUPS + g) * TILE + r) * PAIR_BYTES;
                let mut bits = [0u8; 25];
                for i in 0..32 {
                    let (a, b) = pair(w, row, g, i);
                    let c = code[key((a, b)) as usize];
                    if c as usize == PAIR_ESCAPE {
                        side.extend([(a >> 8) as u8, (b >> 8) as u8]);
                    }
                    let at = 6 * i;
                    let both = (c as u16) << (at % 8);
                    bits[at / 8] |= both as u8;
                    bits[at / 8 + 1] |= (both >> 8) as u8;
                    data[o + 24 + 2 * i] = a as u8;
                    data[o + 24 + 2 * i + 1] = b as u8;
                }
                data[o..o + 24].copy_from_slice(&bits[..24]);
            }
        }
    }
    // A 64-byte load of the side list may read past its end.
    side.extend([0u8; 64]);
    CodedPairs {
        data,
        first,
        second,
        side,
        side_at,
    }
}

/// The rows' sums of `w · x`, in f32 from bf16 products (the kernels' order aside).
fn plain_sums(w: &[u16], x: &[u16], rows: usize) -> Vec<f32> {
    let f = |b: u16| half::bf16::from_bits(b).to_f32();
    (0..rows)
        .map(|r| (0..K).map(|c| f(w[r * K + c]) * f(x[c])).sum())
        .collect()
}

/// `$row!(r)` for the eight rows of a tile, spelled out so each accumulator stays a register.
macro_rules! each_row {
    ($row:ident) => {
        $row!(0);
        $row!(1);
        $row!(2);
        $row!(3);
        $row!(4);
        $row!(5);
        $row!(6);
        $row!(7);
    };
}

/// Asks for the row's group [`AHEAD`] bytes on (two lines), as the engine's decode does.
///
/// # Safety
/// SSE present (every x86-64); a prefetch never faults.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch(p: *const u8) {
    let ahead = p.wrapping_add(AHEAD);
    _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64).cast());
}

/// `acc` plus the products of the group's 64 values (low bytes `low`, high bytes `high`, by
/// slot) with `x0` (values 0..32) and `x1` (32..64): the two interleaves put them in order.
///
/// # Safety
/// AVX-512BW/BF16 present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn summed(acc: __m512, low: __m512i, high: __m512i, x0: __m512bh, x1: __m512bh) -> __m512 {
    let acc = _mm512_dpbf16_ps(acc, bh(_mm512_unpacklo_epi8(low, high)), x0);
    _mm512_dpbf16_ps(acc, bh(_mm512_unpackhi_epi8(low, high)), x1)
}

/// Group `g`'s 64 activations as two vectors of 32 bf16 (values 0..32 and 32..64).
///
/// # Safety
/// AVX-512F present; `x` holds group `g`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn activations(x: &[u16], g: usize) -> (__m512bh, __m512bh) {
    let at = x.as_ptr().add(g * GROUP);
    (
        bh(_mm512_loadu_si512(at.cast())),
        bh(_mm512_loadu_si512(at.add(32).cast())),
    )
}

/// Each row's sum: the lanes of its accumulator added, into `out`.
///
/// # Safety
/// AVX-512F present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn store_sums(out: &mut [f32], acc: [__m512; TILE]) {
    for (o, a) in out.iter_mut().zip(acc) {
        *o = _mm512_reduce_add_ps(a);
    }
}

/// The 32 bf16 in `v`, typed for `vdpbf16ps`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn bh(v: __m512i) -> __m512bh {
    // SAFETY: both are 64 bytes of plain data.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}

/// Sums of the tiles `tiles` of the 4-bit coding into `out` (one per row of those tiles).
///
/// # Safety
/// AVX-512F/BW/BF16 present; `x` holds `K` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn sums4(c: &Coded4, x: &[u16], tiles: std::ops::Range<usize>, out: &mut [f32]) {
    let table: [u8; 64] = std::array::from_fn(|b| c.table[b % 16]);
    let table = _mm512_loadu_si512(table.as_ptr().cast());
    let shifts = _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(4));
    let nibble = _mm512_set1_epi8(0x0F);
    for (t, out) in tiles.zip(out.chunks_exact_mut(TILE)) {
        let mut acc = [_mm512_setzero_ps(); TILE];
        let tile = c.data.as_ptr().add(t * GROUPS * TILE * CUR_BYTES);
        for g in 0..GROUPS {
            let (x0, x1) = activations(x, g);
            macro_rules! row {
                ($r:literal) => {{
                    let p = tile.add((g * TILE + $r) * CUR_BYTES);
                    prefetch(p);
                    let codes = _mm512_broadcast_i64x4(_mm256_loadu_si256(p.cast()));
                    let codes = _mm512_and_si512(_mm512_srlv_epi16(codes, shifts), nibble);
                    let high = _mm512_shuffle_epi8(table, codes);
                    let low = _mm512_loadu_si512(p.add(32).cast());
                    acc[$r] = summed(acc[$r], low, high, x0, x1);
                }};
            }
            each_row!(row);
        }
        store_sums(out, acc);
    }
}

/// Sums of the tiles `tiles` of the pair coding into `out`; without `ESCAPES` the side list is
/// not read (wrong sums wherever a pair escaped: the rebuild's cost without the expand).
///
/// # Safety
/// AVX-512F/BW/VBMI/VBMI2/BF16 present; `x` holds `K` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,avx512bf16,popcnt")]
unsafe fn sums_pairs<const ESCAPES: bool>(
    c: &CodedPairs,
    x: &[u16],
    tiles: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let vector = |f: &dyn Fn(usize) -> u8| {
        let b: [u8; 64] = std::array::from_fn(f);
        _mm512_loadu_si512(b.as_ptr().cast())
    };
    let (first, second) = (vector(&|b| c.first[b]), vector(&|b| c.second[b]));
    // 64-bit lane j takes the codes' bytes 3j..3j + 4 (its four 6-bit codes at bits 24j..).
    let spread = vector(&|b| (3 * (b / 8) + (b % 8).min(3)) as u8);
    // Slot byte b of a lane: its pair's code at bit 6·(b/2) of the lane.
    let shifts = vector(&|b| (6 * (b % 8 / 2)) as u8);
    let second_bit = vector(&|b| if b % 2 == 1 { 0x40 } else { 0 });
    let escape = vector(&|b| {
        if b % 2 == 1 {
            c.second[PAIR_ESCAPE]
        } else {
            c.first[PAIR_ESCAPE]
        }
    });
    let six_bits = _mm512_set1_epi8(0x3F);
    for (t, out) in tiles.zip(out.chunks_exact_mut(TILE)) {
        let mut acc = [_mm512_setzero_ps(); TILE];
        let tile = c.data.as_ptr().add(t * GROUPS * TILE * PAIR_BYTES);
        let mut side = c.side.as_ptr().add(c.side_at[t]);
        for g in 0..GROUPS {
            let (x0, x1) = activations(x, g);
            macro_rules! row {
                ($r:literal) => {{
                    let p = tile.add((g * TILE + $r) * PAIR_BYTES);
                    prefetch(p);
                    let codes = _mm512_zextsi256_si512(_mm256_loadu_si256(p.cast()));
                    let codes = _mm512_permutexvar_epi8(spread, codes);
                    let codes = _mm512_multishift_epi64_epi8(shifts, codes);
                    // (codes & 0x3F) | second_bit
                    let index = _mm512_ternarylogic_epi32::<0xEA>(codes, six_bits, second_bit);
                    let mut high = _mm512_permutex2var_epi8(first, index, second);
                    if ESCAPES {
                        let escaped = _mm512_cmpeq_epi8_mask(high, escape);
                        let next = _mm512_loadu_si512(side.cast());
                        high = _mm512_mask_expand_epi8(high, escaped, next);
                        side = side.add(escaped.count_ones() as usize);
                    }
                    let low = _mm512_loadu_si512(p.add(24).cast());
                    acc[$r] = summed(acc[$r], low, high, x0, x1);
                }};
            }
            each_row!(row);
        }
        store_sums(out, acc);
    }
}

/// Which kernel a measurement runs.
#[derive(Clone, Copy, PartialEq)]
enum Run {
    Four,
    Pairs,
    PairsWithoutEscapes,
}

/// The two codings of one matrix.
struct Matrix {
    rows: usize,
    four: Coded4,
    pairs: CodedPairs,
}

impl Matrix {
    /// The bytes `run` reads.
    fn bytes(&self, run: Run) -> usize {
        match run {
            Run::Four => self.four.data.len(),
            Run::Pairs => self.pairs.data.len() + self.pairs.side.len(),
            Run::PairsWithoutEscapes => self.pairs.data.len(),
        }
    }

    /// `run` over the tiles `tiles` into `out` (their rows' sums), on this thread.
    #[cfg(target_arch = "x86_64")]
    fn run(&self, run: Run, x: &[u16], tiles: std::ops::Range<usize>, out: &mut [f32]) {
        // SAFETY: `main` checked the CPU's features; `x` holds K values.
        unsafe {
            match run {
                Run::Four => sums4(&self.four, x, tiles, out),
                Run::Pairs => sums_pairs::<true>(&self.pairs, x, tiles, out),
                Run::PairsWithoutEscapes => sums_pairs::<false>(&self.pairs, x, tiles, out),
            }
        }
    }

    /// `run` over every tile, split among `threads` threads; the time in seconds.
    #[cfg(target_arch = "x86_64")]
    fn time(&self, run: Run, x: &[u16], out: &mut [f32], threads: usize) -> f64 {
        let tiles = self.rows / TILE;
        let per = tiles.div_ceil(threads);
        let t = std::time::Instant::now();
        std::thread::scope(|s| {
            for (i, out) in out.chunks_mut(per * TILE).enumerate() {
                let range = i * per..(i * per + out.len() / TILE);
                s.spawn(move || self.run(run, x, range, out));
            }
        });
        t.elapsed().as_secs_f64()
    }
}

/// Both codings of `w` (`rows × K` bf16 bits), checked against plain sums of its values.
#[cfg(target_arch = "x86_64")]
fn matrix(w: &[u16], rows: usize, x: &[u16]) -> Matrix {
    let pairs = code_pairs(w, rows);
    let mut moved = w.to_vec();
    let four = code4(&mut moved, rows);
    let m = Matrix { rows, four, pairs };
    let mut out = vec![0f32; rows];
    for (run, w) in [(Run::Four, &moved[..]), (Run::Pairs, w)] {
        m.time(run, x, &mut out, 2);
        let want = plain_sums(w, x, rows);
        let off = (out.iter().zip(&want))
            .filter(|(a, b)| (**a - **b).abs() > 1e-3 * (1.0 + b.abs()))
            .count();
        assert_eq!(off, 0, "{off} of {rows} rows differ from the plain sums");
    }
    m
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    eprintln!("error: this benchmark needs an x86-64 CPU with AVX-512 F, BW, VBMI, VBMI2 and BF16");
    std::process::exit(1);
}

#[cfg(target_arch = "x86_64")]
fn main() {
    let ok = is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vbmi")
        && is_x86_feature_detected!("avx512vbmi2")
        && is_x86_feature_detected!("avx512bf16");
    if !ok {
        eprintln!("error: this benchmark needs AVX-512 F, BW, VBMI, VBMI2 and BF16");
        std::process::exit(1);
    }
    let rows: usize = match std::env::args().nth(1).map(|s| s.parse::<usize>()) {
        None => 262_144,
        Some(Ok(r)) if r > 0 && r % 16 == 0 => r,
        Some(_) => {
            eprintln!("error: ROWS must be a positive multiple of 16");
            std::process::exit(2);
        }
    };
    let threads = std::env::var("BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let x: Vec<u16> = (uniform(K, 4).iter())
        .map(|&u| half::bf16::from_f64(2.0 * u - 1.0).to_bits())
        .collect();
    let runs = [
        ("4-bit", Run::Four),
        ("pairs", Run::Pairs),
        ("pairs, escapes not read", Run::PairsWithoutEscapes),
    ];

    let small = matrix(&weights(64, 5), 64, &x);
    let mut out = vec![0f32; small.rows];
    println!("64x{K} (in L2), one thread, medians of 5 rounds of 20,000 products:");
    for (name, run) in runs {
        let s = median(
            (0..5)
                .map(|_| {
                    let t = std::time::Instant::now();
                    (0..20_000).for_each(|_| small.run(run, &x, 0..small.rows / TILE, &mut out));
                    t.elapsed().as_secs_f64()
                })
                .collect(),
        );
        println!(
            "  {name}: {:.1} Gvalues/s",
            20_000.0 * (small.rows * K) as f64 / s / 1e9
        );
    }

    let big_weights = weights(rows, 9);
    let big = matrix(&big_weights, rows, &x);
    let escaped = (big.pairs.side.len() - 64) / 2;
    println!(
        "{rows}x{K}: 4-bit {:.0} MB, pairs {:.0} MB with a {:.1} MB side list ({:.2}% of pairs escaped)",
        big.bytes(Run::Four) as f64 / 1e6,
        big.pairs.data.len() as f64 / 1e6,
        big.pairs.side.len() as f64 / 1e6,
        100.0 * escaped as f64 / (rows * K / 2) as f64
    );
    // The engine's own product on its coding of the same values, as a check on the harness.
    let engine = {
        let bytes: Vec<u8> = (big_weights.iter()).flat_map(|v| v.to_le_bytes()).collect();
        let t = lockstep_engine::weights::Tensor::from_bytes(
            lockstep_engine::weights::StoredDtype::BF16,
            vec![rows, K],
            bytes,
        );
        assert!(t.code_bf16(), "the engine codes the matrix");
        t
    };
    let xs: Vec<lockstep_engine::Bf16> = (x.iter())
        .map(|&b| lockstep_engine::Bf16(half::bf16::from_bits(b).to_f32()))
        .collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a thread pool");
    let kernel = lockstep_engine::kernels::matmul::Kernel::detect();
    let mut out = vec![0f32; rows];
    let mut engine_out = vec![lockstep_engine::Bf16(0.0); rows];
    println!("{rows}x{K} streamed, {threads} threads, in turns:");
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); runs.len() + 1];
    for round in 0..5 {
        let mut line = format!("  round {round}:");
        for (i, (name, run)) in runs.iter().enumerate() {
            let s = big.time(*run, &x, &mut out, threads);
            let gv = (rows * K) as f64 / s / 1e9;
            rates[i].push(gv);
            line += &format!(
                " {name} {gv:.1} Gvalues/s ({:.1} GB/s);",
                big.bytes(*run) as f64 / s / 1e9
            );
        }
        let t = std::time::Instant::now();
        pool.install(|| {
            lockstep_engine::kernels::matmul::linear_with(
                kernel,
                lockstep_engine::kernels::matmul::PassKind::Decode,
                &xs,
                1,
                &engine,
                None,
                &mut engine_out,
            )
        });
        let gv = (rows * K) as f64 / t.elapsed().as_secs_f64() / 1e9;
        rates[runs.len()].push(gv);
        println!("{line} the engine's 4-bit product {gv:.1} Gvalues/s");
    }
    let med: Vec<f64> = rates.into_iter().map(median).collect();
    println!(
        "medians: 4-bit {:.1}, pairs {:.1} ({:.3}x), pairs without escapes {:.1}, the engine's {:.1} Gvalues/s",
        med[0],
        med[1],
        med[1] / med[0],
        med[2],
        med[3]
    );
}
