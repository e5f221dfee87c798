//! AMX-BF16 kernel for [`super::linear`]: prefill in the faithful bf16 tier (bf16 activations ×
//! BF16 weights), where bf16×bf16 products accumulated in f32 are what PyTorch's bf16 matmul
//! computes up to the order of the sums. Never used for f32 or f64 compute: it would need the
//! activations rounded to bf16.
//!
//! `tdpbf16ps` computes `C[M×N] += A[M×K]·B[K×N]` on tiles of 16 rows × 64 bytes:
//! - A: 16 consecutive weight rows, 32 bf16 of `k` each, from a [`Panel`]: a block of rows and of
//!   `k` copied onto cache lines (the files' rows start wherever the file put them, and a tile
//!   load from rows off a line boundary costs ~6.5 times as much), read in place where the rows
//!   already start on lines;
//! - B: 16 tokens' activations in AMX's pair layout, packed once per call by [`Packed::new`]:
//!   tile row `r` holds, for each token, the pair `(x[tok][2r], x[tok][2r+1])`. The packing
//!   runs on the threads, a 16-token group each, and per tile gathers each token's 16 pairs in
//!   a register and transposes the 16 × 16 pairs (it was a serial loop of scalar stores: 0.6 ms
//!   of a 1.2 ms q/o product of 512 tokens, 2.7 of 8.6 ms for the MLP's down product);
//! - C: `[16 weight rows][16 tokens]` f32, transposed in registers and written as each token's
//!   16 consecutive outputs into `out[tok][row]`, finished on the way ([`Finish`]: for a bf16
//!   linear, the bias added and the sum rounded to bf16, so no second pass reads them back).
//!   A block's C tiles are stored when its steps end and finished by the next block, before
//!   its last steps, so that this vector work runs while tiles work ([`Pending`]).
//!   Those outputs' cache lines are asked for with write intent (`prefetchw`) while the block's
//!   tiles work, spread over its `k` steps: the stores no longer wait for each line to arrive
//!   (0.5B shape, 512 tokens, alternating with the build before: the gate product 4.4-5.0 ms →
//!   3.4-3.8, the down product 3.1-3.4 → 2.7-3.2; `prefill_profile` 810-880 → 960-1010 tok/s).
//!   The MLP's gate and up products run as one ([`swiglu_sums`]): a block's two row tiles are
//!   the gate's and the up's same rows, and its end computes SwiGLU on the two sums in registers
//!   (`prefill_profile`'s gate/up/SwiGLU step, 0.5B shape, 512 tokens: 208-212 → 177-190 ms a
//!   pass).
//!
//! A product runs in blocks ([`run`]): token groups 32 at a time, `k` in blocks whose packed
//! activations stay in L2, rows a panel at a time, the next panel's bytes asked into L2 while
//! one runs ([`Ahead`]); a block's sums wait between blocks of `k` in memory, stored and loaded
//! back exactly, so the sums are those of one pass over `k`. The 2 × 2 block of four
//! accumulators (the most eight tile registers hold) needs one tile load per product: on an
//! Intel Xeon with AMX (2026-12-06) a `tdpbf16ps` takes 14 cycles, a `tileloadd` 6.8 from L1 on
//! cache lines and 44 off them (every row split over two lines), and the loop of loads and
//! products runs at 14 cycles a product from L1, ~22 from L2 (plain loops of these instructions).
//! (The "one load costs about three products" measured before was the misaligned load.)
//!
//! Each product of two bf16 is exact in f32; the instruction adds them to the f32 accumulator
//! one pair at a time with nearest-even rounding, but treats subnormal inputs as zero and flushes
//! subnormal results (bf16 subnormals are below 1.2e-38, irrelevant to the activations and
//! weights of a model). Tails: tokens are zero-padded to a multiple of 16 in the packing, `k` to
//! a multiple of 32 (the last chunk of weight rows is copied into a zero-padded stack buffer),
//! and rows not filling a 16-row tile are left to the caller (the AVX-512 kernel).
//!
//! The tile intrinsics are unstable in Rust, so the instructions are written with `asm!`. Using
//! tiles needs the kernel's permission, asked once per process ([`available`]); every thread
//! loads its own tile configuration before using them and releases them after ([`sums`]).

use crate::kernels::simd512::{mask16, round_bf16_x16, transpose16};
use std::arch::asm;
use std::arch::x86_64::{
    _mm512_add_ps, _mm512_castsi512_ps, _mm512_loadu_ps, _mm512_loadu_si512, _mm512_setzero_si512,
    _mm512_storeu_ps, _mm_prefetch, _MM_HINT_ET0,
};
use std::ops::Range;
use std::sync::OnceLock;

/// Whether this CPU and OS run AMX-BF16 (CPUID, XCR0) and Linux granted this process the tile
/// data state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, asked on the first call).
/// Anything missing or refused means `false`: the callers use AVX-512 instead.
pub(super) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| cpu_has_amx() && request_permission())
}

/// CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE; the OS enabled XSAVE (leaf 1 ECX bit 27)
/// and the tile state in XCR0 (bits 17 XTILECFG, 18 XTILEDATA).
fn cpu_has_amx() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // SAFETY: CPUID exists on every x86-64 CPU; leaf 7 is queried only when the CPU has it.
    unsafe {
        if __cpuid(0).eax < 7 || __cpuid(1).ecx & (1 << 27) == 0 {
            return false;
        }
        let edx = __cpuid_count(7, 0).edx;
        if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
            return false;
        }
        // XGETBV with ECX = 0 (allowed when OSXSAVE is set, checked above).
        let (lo, _hi): (u32, u32);
        asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") _hi, options(nomem, nostack));
        lo & (3 << 17) == 3 << 17
    }
}

/// Asks Linux for the AMX tile data state for this process (needed before any thread uses
/// tiles; threads started later inherit it).
#[cfg(target_os = "linux")]
fn request_permission() -> bool {
    const SYS_ARCH_PRCTL: usize = 158;
    const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
    const XFEATURE_XTILEDATA: usize = 18;
    let ret: isize;
    // SAFETY: the arch_prctl syscall only changes this process's permitted XSAVE features.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL as isize => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn request_permission() -> bool {
    false
}

/// Bytes per tile row (all tiles: 16 rows of 64 bytes).
const ROW: usize = 64;
/// Elements of `k` per tile (32 bf16 per row of an A tile, 16 pairs down a B tile).
const KT: usize = 32;
/// Rows (weight rows, tokens) per tile.
const T16: usize = 16;

/// The activations packed for B tiles: token group `g` (16 tokens), chunk `c` of 32 elements of
/// `k` is one 1 KiB tile at `(g·chunks + c)·512` u16, row `r` = 16 pairs
/// `(x[16g + tok][32c + 2r], x[16g + tok][32c + 2r + 1])`; padding tokens and elements are zero.
/// The data start on a cache line: a tile load from an address that is not 64-byte aligned
/// splits each of its 16 rows over two lines and costs ~6.5 times as much (this machine's AMX:
/// 44 against 6.8 cycles a `tileloadd` from L1, 14 a `tdpbf16ps`), so the tiles waited on the
/// loads.
pub(super) struct Packed {
    data: Vec<TileRow>,
    chunks: usize,
}

/// One 64-byte tile row of 32 bf16, on a cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct TileRow([u16; ROW / 2]);

impl Packed {
    /// Packs `n` tokens of `k` activations (bf16 values held in f32: the high half is exact),
    /// one 16-token group per task on the threads: per tile, each token's 32 values gathered
    /// into 16 pairs in a register, then the 16 × 16 pairs transposed.
    pub(super) fn new(x: &[f32], n: usize, k: usize) -> Packed {
        Packed::pack(x, n, k, true)
    }

    /// [`Packed::new`] on this thread alone: for a product that is itself one task of a
    /// parallel loop (attention's, per head and block of queries), where a nested loop over two
    /// groups would hand half of a few microseconds' work to another thread and wait for it.
    pub(super) fn here(x: &[f32], n: usize, k: usize) -> Packed {
        Packed::pack(x, n, k, false)
    }

    fn pack(x: &[f32], n: usize, k: usize, parallel: bool) -> Packed {
        assert!(x.len() >= n * k);
        let chunks = k.div_ceil(KT);
        let groups = n.div_ceil(T16);
        let per_group = chunks * T16 * ROW / 2;
        let mut data = Vec::<TileRow>::with_capacity(groups * chunks * T16);
        let dst = crate::team::SendPtr(data.as_mut_ptr().cast::<u16>());
        let group = |g: usize| {
            // SAFETY: AVX-512F/BW come with AMX ([`available`], checked by the caller); group
            // `g` writes its own `per_group` values, inside the capacity.
            unsafe { pack_group(x, n, k, g, dst.get().add(g * per_group)) }
        };
        if parallel {
            crate::team::for_each(groups, group);
        } else {
            (0..groups).for_each(group);
        }
        // SAFETY: every group wrote all of its values (each chunk's 16 tile rows).
        unsafe { data.set_len(groups * chunks * T16) };
        Packed { data, chunks }
    }

    /// The B tile of token group `g`, chunk `c`.
    fn tile(&self, g: usize, c: usize) -> *const u8 {
        self.data[(g * self.chunks + c) * T16..].as_ptr().cast()
    }
}

/// Token group `g`'s tiles (every chunk of `k`) into `dst`: tile `c` at `c·512` u16, row `r`
/// holding the pairs `(x[tok][32c + 2r], x[tok][32c + 2r + 1])` of the group's 16 tokens;
/// tokens past `n` and elements past `k` are zero.
///
/// # Safety
/// AVX-512F/BW; `x` holds `n` rows of `k`; `dst` is valid for `k.div_ceil(32)·512` u16.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_group(x: &[f32], n: usize, k: usize, g: usize, dst: *mut u16) {
    use std::arch::x86_64::*;
    // The high halves of 32 f32 (two registers of 16) in order: lane `p` of the result, as a
    // u32, is the pair of values 2p and 2p + 1.
    let high: [u16; 32] = std::array::from_fn(|i| (2 * i + 1) as u16);
    let high = _mm512_loadu_si512(high.as_ptr().cast());
    let tokens = T16.min(n - g * T16);
    for c in 0..k.div_ceil(KT) {
        let len = KT.min(k - c * KT);
        let (lo, hi) = (mask16(len), mask16(len.saturating_sub(16)));
        let mut v = [_mm512_setzero_si512(); T16];
        for (tok, v) in v.iter_mut().enumerate().take(tokens) {
            let p = x.as_ptr().add((g * T16 + tok) * k + c * KT);
            let a = _mm512_castps_si512(_mm512_maskz_loadu_ps(lo, p));
            let b = _mm512_castps_si512(_mm512_maskz_loadu_ps(hi, p.add(16)));
            *v = _mm512_permutex2var_epi16(a, high, b);
        }
        transpose16(&mut v);
        for (r, v) in v.iter().enumerate() {
            _mm512_storeu_si512(dst.add(c * T16 * ROW / 2 + r * ROW / 2).cast(), *v);
        }
    }
}

/// The tile configuration `ldtilecfg` reads: palette 1, eight tiles of 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [
        ROW as u16, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0,
    ],
    rows: [
        T16 as u8, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0,
    ],
};

// One instruction per helper; tile register numbers are const operands. Tiles 0-3 accumulate
// (C), 4-5 hold weights (A), 6-7 activations (B).

/// `tileloadd tmm{T}, [p + stride]`: 16 rows of 64 bytes, `stride` bytes apart.
#[inline(always)]
unsafe fn load<const T: u8>(p: *const u8, stride: usize) {
    asm!("tileloadd tmm{t}, [{p} + {s}*1]", t = const T, p = in(reg) p, s = in(reg) stride,
        options(nostack, readonly, preserves_flags));
}

/// `tilestored [p + stride], tmm{T}`.
#[inline(always)]
unsafe fn store<const T: u8>(p: *mut u8, stride: usize) {
    asm!("tilestored [{p} + {s}*1], tmm{t}", t = const T, p = in(reg) p, s = in(reg) stride,
        options(nostack, preserves_flags));
}

/// `tilezero tmm{T}`.
#[inline(always)]
unsafe fn zero<const T: u8>() {
    asm!("tilezero tmm{t}", t = const T, options(nomem, nostack, preserves_flags));
}

/// `tdpbf16ps tmm{C}, tmm{A}, tmm{B}`: `C[m][n] += Σ_p A[m][2p..2p+2]·B[p][2n..2n+2]`.
#[inline(always)]
unsafe fn dot<const C: u8, const A: u8, const B: u8>() {
    asm!("tdpbf16ps tmm{c}, tmm{a}, tmm{b}", c = const C, a = const A, b = const B,
        options(nomem, nostack, preserves_flags));
}

/// What [`sums`] does with each finished sum before storing it.
#[derive(Clone, Copy)]
pub(super) enum Finish<'a> {
    /// Stores the raw f32 sum.
    Raw,
    /// Adds the row's bias (indexed by row, `m` long) and rounds to bf16 (nearest even, NaN
    /// kept quiet), as [`crate::kernels::Float::add_bias_to_act_dtype`] does for `Bf16`: the
    /// same operations on sixteen lanes, while the outputs are in registers.
    Bf16 { bias: Option<&'a [f32]> },
    /// The MLP's SwiGLU of a gate and an up product ([`swiglu_sums`]): each rounded to bf16 as
    /// [`Finish::Bf16`] without bias does, then `silu(gate)` rounded, times `up`, rounded, as
    /// [`crate::kernels::activation::silu_mul_in_place`] computes it for `Bf16`.
    SwiGlu,
}

/// Sums `out[t·m + j] = Σ_i x[t·k + i]·w[j][i]`, finished as `finish` says, for every token
/// and every row `j` of the whole 16-row tiles in `rows` (from `rows.start`); returns the rows
/// it did not do (fewer than 16, at the end) for the caller.
///
/// # Safety
/// [`available`]; `w` holds `m` BF16 rows of `k`; `p` packs `n` tokens of `k`; `out` is valid for
/// `n·m` f32 and nobody else touches the entries in `rows`.
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn sums(
    p: &Packed,
    n: usize,
    k: usize,
    w: &[u8],
    m: usize,
    rows: Range<usize>,
    out: *mut f32,
    finish: Finish<'_>,
) -> Range<usize> {
    assert_eq!(w.len(), m * k * 2);
    sums_strided(p, n, k, w, k * 2, m, rows, out, finish)
}

/// [`sums`] on weight rows `wrow` bytes apart (at least `k·2`; `w` holds `m` of them, the last
/// one `k·2` bytes at least).
///
/// # Safety
/// As [`sums`].
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn sums_strided(
    p: &Packed,
    n: usize,
    k: usize,
    w: &[u8],
    wrow: usize,
    m: usize,
    rows: Range<usize>,
    out: *mut f32,
    finish: Finish<'_>,
) -> Range<usize> {
    assert!(wrow >= k * 2 && (m == 0 || w.len() >= (m - 1) * wrow + k * 2));
    assert!(rows.end <= m && p.chunks == k.div_ceil(KT));
    if let Finish::Bf16 { bias: Some(b) } = finish {
        assert_eq!(b.len(), m);
    }
    let src = Source {
        w: [w.as_ptr(), std::ptr::null()],
        wrow,
    };
    run(p, n, k, src, rows, Target { n, m, out, finish }, BLOCKING)
}

/// The MLP's `out[t·m + j] = silu(Σ_i x[t·k + i]·gate[j][i]) · Σ_i x[t·k + i]·up[j][i]`,
/// finished as [`Finish::SwiGlu`] says, for every token and every row `j` of the whole 16-row
/// tiles in `rows`; returns the rows it did not do (fewer than 16, at the end) for the caller.
/// Each block pairs a gate tile with the up tile of the same rows (the two A tiles of a 2 × 2
/// block), so the two sums meet in registers: neither product is written out and read back.
///
/// # Safety
/// [`available`]; `gate` and `up` each hold `m` BF16 rows of `k`; `p` packs `n` tokens of `k`;
/// `out` is valid for `n·m` f32 and nobody else touches the entries in `rows`.
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn swiglu_sums(
    p: &Packed,
    n: usize,
    k: usize,
    gate: &[u8],
    up: &[u8],
    m: usize,
    rows: Range<usize>,
    out: *mut f32,
) -> Range<usize> {
    assert!(gate.len() == m * k * 2 && up.len() == m * k * 2);
    assert!(rows.end <= m && p.chunks == k.div_ceil(KT));
    let src = Source {
        w: [gate.as_ptr(), up.as_ptr()],
        wrow: k * 2,
    };
    let finish = Finish::SwiGlu;
    run(p, n, k, src, rows, Target { n, m, out, finish }, BLOCKING)
}

/// The weight rows a product reads: one matrix (`w[1]` null), or the gate's and the up's.
#[derive(Clone, Copy)]
struct Source {
    w: [*const u8; 2],
    /// Bytes from one row to the next, in each.
    wrow: usize,
}

/// How [`run`] cuts a product: token groups, blocks of `k`, panels of rows.
#[derive(Clone, Copy)]
struct Blocking {
    /// Token groups (of 16) taken at a time: their packed activations for one block of `k`
    /// stay in L2 while every panel of weights passes over them.
    groups: usize,
    /// Bytes of packed activations (of `groups` token groups) for one block of `k`: the tiles
    /// read them again for every pair of row tiles, so they should stay in L2 (2 MiB a core on
    /// the machines measured) beside a panel, the next panel coming in ([`Ahead`]) and the
    /// partial sums ([`Panel`]).
    k_block_bytes: usize,
    /// Bytes of weights (one matrix's rows, or the gate's and the up's together) for one block
    /// of `k` copied onto cache lines at a time ([`Panel`]): they are read again for every
    /// pair of token groups.
    panel_bytes: usize,
}

/// The products' [`Blocking`]. 0.5B shape, 512 tokens, 2 cores of an Intel Xeon with AMX
/// (2026-12-06, `prefill_profile`, two rounds each, the gate/up/SwiGLU step and the down
/// product): 32 groups, 1 MiB, 128 KiB: 140.0 and 139.3, 101.5 and 102.6 ms a pass; with
/// 256 KiB panels 149.2 and 147.1, 104.2 and 102.7; 16 groups with 512 KiB of `k` blocks 158.5
/// and 162.3, 107.1 and 111.3; 8 groups 172.5 and 172.7, 111.9 and 115.2; 32 groups with
/// 512 KiB 184.3 and 182.3, 106.5 and 109.3. Before the panels (the rows read in place, 32
/// bytes into their lines, all of a task's rows for every pair of token groups): 177.5-194.4
/// and 104.7-114.0. (Measured with the panels outside the blocks of `k`, before [`run`]'s
/// present order.)
const BLOCKING: Blocking = Blocking {
    groups: 32,
    k_block_bytes: 1 << 20,
    panel_bytes: 128 << 10,
};

/// Runs every block of the whole 16-row tiles of `rows` × every token of `p` for `target`, and
/// returns the rows left (fewer than 16, at the end) for the caller: token
/// groups `blocking.groups` at a time; for those, `k` a block at a time (the groups' packed
/// activations of that block stay in L2); for a block, the rows a panel at a time (the panel's
/// rows of that block copied onto cache lines, [`Panel`]), every pair of token groups × pair of
/// row tiles over it. A block's sums stay in the tiles over its `k` block and wait in the
/// partial sums between blocks of `k` (every panel's, all of the rows' for the groups):
/// stored and loaded back exactly, and added to in the same order of `k`, so the sums are the
/// bits of one pass over all of `k`. With the blocks of `k` outside the panels, a task reads
/// the activations from further out than L2 once per block of `k` and no more, so fewer,
/// larger tasks read them fewer times (`matmul::AMX_LINEAR_TASKS_PER_THREAD`: the 0.5B down
/// product, `k` 4864, 87-91 ms a 512-token pass with two or four tasks a thread against 98-109
/// with eight).
///
/// # Safety
/// As [`sums`] for `src`'s matrices (each `wrow` bytes a row, every row of `rows` there) and
/// `target`.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn run(
    p: &Packed,
    n: usize,
    k: usize,
    src: Source,
    rows: Range<usize>,
    target: Target,
    blocking: Blocking,
) -> Range<usize> {
    let done = rows.start + (rows.end - rows.start) / T16 * T16;
    let (rest, rows) = (done..rows.end, rows.start..done);
    let Blocking {
        groups: at_a_time,
        k_block_bytes,
        panel_bytes,
    } = blocking;
    let swiglu = !src.w[1].is_null();
    let mats = if swiglu { 2 } else { 1 };
    let groups = n.div_ceil(T16);
    // Chunks of `k` per block (the blocks as even as they can be).
    let most = (k_block_bytes / (at_a_time * T16 * ROW)).max(1);
    let kb = p.chunks.div_ceil(p.chunks.div_ceil(most).max(1)).max(1);
    let line = kb * ROW;
    // A plain product's blocks take two row tiles of one matrix, SwiGLU's one of each.
    let unit = if swiglu { T16 } else { 2 * T16 };
    let per_panel = (panel_bytes / (mats * line) / unit).max(1) * unit;
    // Rows of whole chunks (else the last chunk would read past the row) are read where they
    // are if they start on cache lines, or if one pair of token groups reads each once (a
    // prefill's logits for its last token, 151936 rows on the 0.5B shape: copying them first
    // took 20-21 ms a pass against 16-17 read in place, `prefill_profile`).
    let in_place = k.is_multiple_of(KT)
        && (groups <= 2
            || src.wrow.is_multiple_of(ROW)
                && src.w.iter().all(|w| (*w as usize).is_multiple_of(ROW)));
    asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly, preserves_flags));
    let mut pending = Pending::new(target);
    // Every (token groups, block of `k`, panel) in the order they run; the next one's bytes
    // are asked for while one runs.
    let mut steps = vec![];
    for g0 in (0..groups).step_by(at_a_time) {
        for c0 in (0..p.chunks).step_by(kb) {
            for start in (rows.start..rows.end).step_by(per_panel) {
                let gs = g0..(g0 + at_a_time).min(groups);
                let ps = start..(start + per_panel).min(rows.end);
                steps.push((gs, ps, c0..(c0 + kb).min(p.chunks)));
            }
        }
    }
    let panels = (rows.end - rows.start).div_ceil(per_panel);
    // Blocks of a whole panel (each C tile pair's four tiles parked between blocks of `k`).
    let per_panel_blocks = per_panel / unit * at_a_time.div_ceil(2);
    PANEL.with_borrow_mut(|panel| {
        let all_sums = panel.partial(panels * per_panel_blocks);
        for (i, (gs, ps, cs)) in steps.iter().enumerate() {
            let tiles = ps.len() / T16;
            let (a, line) = if in_place {
                let at = |w: *const u8| w.wrapping_add(ps.start * src.wrow + cs.start * KT * 2);
                (src.w.map(at), src.wrow)
            } else {
                (panel.fill(src, ps.clone(), cs.clone(), k, line), line)
            };
            let pairs = if swiglu { tiles } else { tiles.div_ceil(2) };
            let sums = all_sums.add((ps.start - rows.start) / per_panel * per_panel_blocks * 4);
            let issued = pairs * gs.len().div_ceil(2) * cs.len();
            let mut ahead = match steps.get(i + 1) {
                Some((_, ps, cs)) if !in_place => {
                    Ahead::new(src, ps.clone(), cs.clone(), k, issued)
                }
                _ => Ahead::none(),
            };
            let acc = |g: usize, pair: usize| Acc {
                first: cs.start == 0,
                last: cs.end == p.chunks,
                sums: sums.add(((g - gs.start) / 2 * pairs + pair) * 4),
            };
            for g in gs.clone().step_by(2) {
                let two = gs.end - g >= 2;
                for pair in 0..pairs {
                    let (rt, acc) = (if swiglu { pair } else { 2 * pair }, acc(g, pair));
                    let j = ps.start + rt * T16;
                    let blk = (
                        if swiglu {
                            [a[0], a[1]].map(|w| w.add(rt * T16 * line))
                        } else {
                            let a0 = a[0].add(rt * T16 * line);
                            [a0, a0.wrapping_add(T16 * line)]
                        },
                        line,
                    );
                    let (cs, pd, ah) = (cs.clone(), &mut pending, &mut ahead);
                    match (swiglu || tiles - rt >= 2, two) {
                        (true, true) => block::<2, 2>(p, blk, j, g, cs, acc, pd, ah),
                        (true, false) => block::<2, 1>(p, blk, j, g, cs, acc, pd, ah),
                        (false, true) => block::<1, 2>(p, blk, j, g, cs, acc, pd, ah),
                        (false, false) => block::<1, 1>(p, blk, j, g, cs, acc, pd, ah),
                    }
                }
            }
        }
    });
    pending.finish();
    asm!("tilerelease", options(nomem, nostack, preserves_flags));
    rest
}

/// Where a block's sums start and end for one block of `k`.
#[derive(Clone, Copy)]
struct Acc {
    /// The block of `k` is the first: the sums start at zero (else they are loaded from `sums`).
    first: bool,
    /// It is the last: the sums go to [`Pending`] to be finished (else back to `sums`).
    last: bool,
    /// The block's four C tiles between blocks of `k` (tile `i` at `sums[i]`).
    sums: *mut [[f32; T16]; T16],
}

thread_local! {
    /// This thread's [`Panel`], grown to the largest it has held.
    static PANEL: std::cell::RefCell<Panel> = const {
        std::cell::RefCell::new(Panel { rows: Vec::new(), sums: Vec::new() })
    };
}

/// Weight rows copied onto cache lines for the A tiles, each row zero-padded to a whole number
/// of 32-value chunks, and the partial sums of the blocks over them. The matrices' rows in the
/// files start wherever the file put them (a safetensors file's tensors 32 bytes into a line
/// in the 0.5B fixture); a tile load from rows that are not 64-byte aligned splits each row over
/// two lines and costs ~6.5 times as much (44 against 6.8 cycles a `tileloadd` from L1 on an
/// Intel Xeon with AMX, 14 a `tdpbf16ps`). The copy also gives the last chunk of `k` its zero
/// padding, which the tiles read past the row's end.
struct Panel {
    rows: Vec<TileRow>,
    sums: Vec<CTile>,
}

/// One C tile's sums, `[16 rows][16 tokens]` f32, on cache lines.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct CTile([[f32; T16]; T16]);

impl Panel {
    /// Copies the chunks `cs` of `k` of rows `ps` of each of `src`'s matrices into this panel,
    /// each row `line` bytes (`cs.len()` chunks or more) with zeros after its values; returns
    /// where each matrix's rows start (the second null for one matrix).
    ///
    /// # Safety
    /// `src`'s matrices hold the rows `ps`, each `k·2` bytes long.
    unsafe fn fill(
        &mut self,
        src: Source,
        ps: Range<usize>,
        cs: Range<usize>,
        k: usize,
        line: usize,
    ) -> [*const u8; 2] {
        let mats = if src.w[1].is_null() { 1 } else { 2 };
        let lines = mats * ps.len() * line / ROW;
        if self.rows.len() < lines {
            self.rows = vec![TileRow([0; ROW / 2]); lines];
        }
        let (from, len) = (cs.start * KT * 2, (k.min(cs.end * KT) - cs.start * KT) * 2);
        let base = self.rows.as_mut_ptr().cast::<u8>();
        let mut starts = [std::ptr::null(); 2];
        for (i, w) in src.w.iter().take(mats).enumerate() {
            let dst = base.add(i * ps.len() * line);
            for (r, row) in ps.clone().enumerate() {
                let d = dst.add(r * line);
                std::ptr::copy_nonoverlapping(w.add(row * src.wrow + from), d, len);
                std::ptr::write_bytes(d.add(len), 0, line - len);
            }
            starts[i] = dst.cast_const();
        }
        starts
    }

    /// Room for `blocks` blocks' four C tiles each.
    fn partial(&mut self, blocks: usize) -> *mut [[f32; T16]; T16] {
        if self.sums.len() < 4 * blocks {
            self.sums = vec![CTile([[0.0; T16]; T16]); 4 * blocks];
        }
        self.sums.as_mut_ptr().cast()
    }
}

/// The next panel's source bytes, asked into L2 (`prefetcht1`) a few lines at every `k` step
/// of this panel's blocks, so that [`Panel::fill`] copies them from L2 instead of the tiles
/// standing idle while it waits on memory.
struct Ahead {
    src: Source,
    /// The rows still to ask for.
    rows: Range<usize>,
    /// Byte range of each row asked for.
    cols: Range<usize>,
    /// The byte of the current row asked for next.
    at: usize,
    /// Lines asked for (each matrix) at each step.
    per_step: usize,
}

impl Ahead {
    /// The chunks `cs` of rows `ps` of `src`, spread over `steps` steps.
    fn new(src: Source, ps: Range<usize>, cs: Range<usize>, k: usize, steps: usize) -> Self {
        let cols = cs.start * KT * 2..k.min(cs.end * KT) * 2;
        let lines = ps.len() * cols.len().div_ceil(ROW);
        let per_step = lines.div_ceil(steps.max(1));
        let at = cols.start;
        Ahead {
            src,
            rows: ps,
            cols,
            at,
            per_step,
        }
    }

    /// Nothing to ask for.
    fn none() -> Self {
        Ahead {
            src: Source {
                w: [std::ptr::null(); 2],
                wrow: 0,
            },
            rows: 0..0,
            cols: 0..0,
            at: 0,
            per_step: 0,
        }
    }

    /// Asks for this step's lines.
    #[inline(always)]
    unsafe fn step(&mut self) {
        use std::arch::x86_64::_MM_HINT_T1;
        for _ in 0..self.per_step {
            if self.rows.is_empty() {
                return;
            }
            for w in self.src.w {
                if !w.is_null() {
                    let p = w.wrapping_add(self.rows.start * self.src.wrow + self.at);
                    _mm_prefetch::<_MM_HINT_T1>(p.cast());
                }
            }
            self.at += ROW;
            if self.at >= self.cols.end {
                self.rows.start += 1;
                self.at = self.cols.start;
            }
        }
    }
}

/// `R` row tiles × `N` token groups from group `g`, over the chunks `cs` of `k`, for
/// `pending`'s target: row tile `r` is the 16 weight rows from `a.0[r]`, `a.1` bytes apart,
/// holding those chunks (a [`Panel`]'s). For every finish but [`Finish::SwiGlu`] they are rows
/// `j..j + 16R` of one matrix, and their outputs go to those rows; for [`Finish::SwiGlu`] they
/// are the gate's and the up's rows `j..j + 16`, whose outputs go to rows `j..j + 16`. The sums
/// start and end as `acc` says; after the last chunk they are left in `pending` for the next
/// block (or the caller, after the last) to finish; the previous block's are finished here
/// ([`Pending`]).
///
/// # Safety
/// As [`sums`] (`pending`'s target its `n`, `m`, `out`), with the tile configuration loaded;
/// the `R` row tiles exist; `acc.sums` holds four tiles.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn block<const R: usize, const N: usize>(
    p: &Packed,
    (a, wrow): ([*const u8; 2], usize),
    j: usize,
    g: usize,
    cs: Range<usize>,
    acc: Acc,
    pending: &mut Pending<'_>,
    ahead: &mut Ahead,
) {
    let Target { n, m, out, finish } = pending.target;
    let swiglu = matches!(finish, Finish::SwiGlu);
    // C tile (r, t) is tmm(2r + t); for SwiGLU the gate's token groups are tmm0 and tmm1, the
    // up's tmm2 and tmm3.
    let s = acc.sums;
    if acc.first {
        zero::<0>();
        zero::<1>();
        zero::<2>();
        zero::<3>();
    } else {
        c_tiles::<R, N, true>(s);
    }
    // The outputs' lines, asked for with write intent while the tiles work over the last block
    // of `k`: token `tok` of the block (of `16N`) at step `tok·steps / 16N`, so the stores of
    // the finish do not wait for them.
    let tokens = if acc.last {
        (N * T16).min(n.saturating_sub(g * T16))
    } else {
        0
    };
    let mut next = 0;
    // The previous block's sums are finished after step `finish_at` is issued, while it and
    // the last [`FINISH_AHEAD`] steps work.
    let finish_at = cs.end.saturating_sub(FINISH_AHEAD + 1).max(cs.start);
    let steps = cs.len();
    for c in cs.clone() {
        while next < tokens && next * steps < (c - cs.start + 1) * (N * T16) {
            let line = out.add((g * T16 + next) * m + j).cast::<i8>();
            _mm_prefetch::<_MM_HINT_ET0>(line);
            if R == 2 && !swiglu {
                _mm_prefetch::<_MM_HINT_ET0>(line.add(ROW));
            }
            next += 1;
        }
        ahead.step();
        let at = (c - cs.start) * KT * 2;
        load::<4>(a[0].add(at), wrow);
        load::<6>(p.tile(g, c), ROW);
        dot::<0, 4, 6>();
        if N == 2 {
            load::<7>(p.tile(g + 1, c), ROW);
            dot::<1, 4, 7>();
        }
        if R == 2 {
            load::<5>(a[1].wrapping_add(at), wrow);
            dot::<2, 5, 6>();
            if N == 2 {
                dot::<3, 5, 7>();
            }
        }
        if c == finish_at {
            pending.finish();
        }
    }
    // (Already done in the loop unless the block of `k` is empty.)
    pending.finish();
    let s = if acc.last {
        pending.block = Some(Done { r: R, n: N, j, g });
        pending.c.as_mut_ptr()
    } else {
        s
    };
    c_tiles::<R, N, false>(s);
}

/// Loads (`LOAD`) or stores a block's C tiles from or to `s`: tile (r, t) is tmm(2r + t), at
/// `s[2r + t]`.
///
/// # Safety
/// `s` holds four tiles, on cache lines; the tile configuration is loaded.
#[inline(always)]
unsafe fn c_tiles<const R: usize, const N: usize, const LOAD: bool>(s: *mut [[f32; T16]; T16]) {
    #[inline(always)]
    unsafe fn one<const T: u8, const LOAD: bool>(p: *mut [[f32; T16]; T16]) {
        match LOAD {
            true => load::<T>(p.cast(), ROW),
            false => store::<T>(p.cast(), ROW),
        }
    }
    one::<0, LOAD>(s);
    if N == 2 {
        one::<1, LOAD>(s.add(1));
    }
    if R == 2 {
        one::<2, LOAD>(s.add(2));
        if N == 2 {
            one::<3, LOAD>(s.add(3));
        }
    }
}

/// How many of a block's `k` steps are issued after the previous block's finish ([`Pending`],
/// which comes right after the step before them). 0.5B shape, 512 tokens, 2 cores of an Intel
/// Xeon with AMX (2026-12-05, `prefill_profile`, builds in turns): the gate/up/SwiGLU step
/// 204-214 ms a pass against 223-232 with the finish at each block's end (4 rounds); with the
/// finish spread over the next block's steps instead (a C tile or a token group between two
/// steps) 254-278 against 201-228 (3 rounds): the tiles then wait for the vector work.
const FINISH_AHEAD: usize = 2;

/// Where a product's outputs go and how they are finished (one per [`sums_strided`] or
/// [`swiglu_sums`] call).
#[derive(Clone, Copy)]
struct Target<'a> {
    /// Tokens.
    n: usize,
    /// Outputs per token.
    m: usize,
    /// `[n][m]` outputs.
    out: *mut f32,
    finish: Finish<'a>,
}

/// Which block's sums [`Pending`] holds: `r` row tiles × `n` token groups from row `j` and
/// token group `g`.
#[derive(Clone, Copy)]
struct Done {
    r: usize,
    n: usize,
    j: usize,
    g: usize,
}

/// One block's sums, stored from the C tiles at its end, waiting to be finished and written
/// out. The finish (a 16 × 16 transpose per C tile, the bias and bf16 rounding, SwiGLU's exps
/// and division) is vector work that would otherwise stand between one block's last
/// `tdpbf16ps` and the next block's first: the next block does it before issuing its last
/// [`FINISH_AHEAD`] steps ([`block`]), so it runs while the tiles work. Each output is
/// finished by the same operations as before, so the bits are unchanged.
#[repr(C, align(64))]
struct Pending<'a> {
    /// The C tiles as stored: tile `i` at `c[i]`, `[16 rows][16 tokens]` f32.
    c: [[[f32; T16]; T16]; 4],
    target: Target<'a>,
    /// The block whose sums `c` holds, if they are still to be finished.
    block: Option<Done>,
}

impl<'a> Pending<'a> {
    fn new(target: Target<'a>) -> Self {
        Pending {
            c: [[[0.0; T16]; T16]; 4],
            target,
            block: None,
        }
    }

    /// Finishes the held block's sums (if any) and writes its outputs.
    ///
    /// # Safety
    /// AVX-512F/BW present; the target's outputs of the held block are valid and nobody
    /// else's.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn finish(&mut self) {
        let Some(b) = self.block.take() else { return };
        let Target { n, m, out, finish } = self.target;
        if let Finish::SwiGlu = finish {
            // Token group `g + t`: the gate's sums in tile t, the up's in tile 2 + t.
            for t in 0..b.n {
                swiglu_epilogue(&self.c[t], &self.c[2 + t], n, m, b.j, b.g + t, out);
            }
            return;
        }
        // C tile (r, t) is tile 2r + t.
        for r in 0..b.r {
            for t in 0..b.n {
                let (j0, t0) = (b.j + r * T16, (b.g + t) * T16);
                // (A loop, not `array::from_fn`: a closure may not be inlined into this
                // function's AVX-512 context.)
                let mut v = [_mm512_setzero_si512(); T16];
                for (v, c) in v.iter_mut().zip(&self.c[2 * r + t]) {
                    *v = _mm512_loadu_si512(c.as_ptr().cast());
                }
                transpose16(&mut v);
                let bias = match finish {
                    Finish::Bf16 { bias: Some(b) } => {
                        Some(_mm512_loadu_ps(b[j0..j0 + T16].as_ptr()))
                    }
                    _ => None,
                };
                for (tok, v) in v.iter().enumerate().take(T16.min(n.saturating_sub(t0))) {
                    let v = match (finish, bias) {
                        (Finish::Raw, _) => _mm512_castsi512_ps(*v),
                        (Finish::Bf16 { .. }, None) => round_bf16_x16(_mm512_castsi512_ps(*v)),
                        (Finish::Bf16 { .. }, Some(b)) => {
                            round_bf16_x16(_mm512_add_ps(_mm512_castsi512_ps(*v), b))
                        }
                        (Finish::SwiGlu, _) => unreachable!("finished above"),
                    };
                    _mm512_storeu_ps(out.add((t0 + tok) * m + j0), v);
                }
            }
        }
    }
}

/// [`Finish::SwiGlu`] of one token group `g`: `gate` and `up` its `[16 rows][16 tokens]` sums
/// (rows `j..j + 16`). Both are transposed in registers; the gates rounded to bf16, their
/// negatives' exps taken by [`crate::kernels::expf::exp_in_place`] (the scalar `f32::exp`'s
/// bits), then per token `silu = round(g / (1 + e))`, `out = round(silu · round(u))`: the
/// operations of [`crate::kernels::activation::silu_mul_in_place`] in the same order, sixteen
/// lanes at once.
///
/// # Safety
/// AVX-512F/BW present; `out` is `[n][m]` and its rows `j..j + 16` of the group's tokens are
/// nobody else's.
#[inline(always)]
unsafe fn swiglu_epilogue(
    gate: &[[f32; T16]; T16],
    up: &[[f32; T16]; T16],
    n: usize,
    m: usize,
    j: usize,
    g: usize,
    out: *mut f32,
) {
    use std::arch::x86_64::{_mm512_castps_si512, _mm512_storeu_si512, _mm512_xor_si512};
    use std::arch::x86_64::{_mm512_div_ps, _mm512_mul_ps, _mm512_set1_epi32, _mm512_set1_ps};
    let t0 = g * T16;
    let tokens = T16.min(n.saturating_sub(t0));
    let (mut vg, mut vu) = ([_mm512_setzero_si512(); T16], [_mm512_setzero_si512(); T16]);
    for i in 0..T16 {
        vg[i] = _mm512_loadu_si512(gate[i].as_ptr().cast());
        vu[i] = _mm512_loadu_si512(up[i].as_ptr().cast());
    }
    transpose16(&mut vg);
    transpose16(&mut vu);
    // Each token's 16 gates rounded; their negatives (the sign bit flipped, as `-g`).
    let mut e = [[0f32; T16]; T16];
    let sign = _mm512_set1_epi32(i32::MIN);
    for (v, e) in vg.iter_mut().zip(e.iter_mut()).take(tokens) {
        *v = _mm512_castps_si512(round_bf16_x16(_mm512_castsi512_ps(*v)));
        _mm512_storeu_si512(e.as_mut_ptr().cast(), _mm512_xor_si512(*v, sign));
    }
    crate::kernels::expf::exp_in_place(&mut e.as_flattened_mut()[..tokens * T16]);
    let one = _mm512_set1_ps(1.0);
    for tok in 0..tokens {
        let gate = _mm512_castsi512_ps(vg[tok]);
        let ex = _mm512_loadu_ps(e[tok].as_ptr());
        let silu = round_bf16_x16(_mm512_div_ps(gate, _mm512_add_ps(one, ex)));
        let up = round_bf16_x16(_mm512_castsi512_ps(vu[tok]));
        let v = round_bf16_x16(_mm512_mul_ps(silu, up));
        _mm512_storeu_ps(out.add((t0 + tok) * m + j), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The finish inside the kernel (bias, then bf16 rounding, in registers) gives exactly
    /// the raw sums finished by `add_bias_to_act_dtype`, bias or not, a NaN input included.
    #[test]
    fn bf16_finish_is_the_raw_sums_finished_after() {
        use crate::kernels::{Bf16, Float};
        if !available() {
            eprintln!("bf16_finish_is_the_raw_sums_finished_after: skipped, no AMX-BF16 here");
            return;
        }
        let (n, k, m) = (40, 96, 48);
        let value = |i: usize, salt: u32| {
            let h = (i as u32 ^ salt).wrapping_mul(0x9E37_79B9).rotate_left(13);
            Bf16(h as f32 / u32::MAX as f32 - 0.5).to_act_dtype().0
        };
        let mut x: Vec<f32> = (0..n * k).map(|i| value(i, 1)).collect();
        x[5 * k + 7] = f32::NAN;
        let w: Vec<u8> = (0..m * k)
            .flat_map(|i| ((value(i, 2).to_bits() >> 16) as u16).to_le_bytes())
            .collect();
        let bias: Vec<f32> = (0..m).map(|i| value(i, 3)).collect();
        let p = Packed::new(&x, n, k);
        for b in [None, Some(&bias[..])] {
            let (mut raw, mut fin) = (vec![0f32; n * m], vec![0f32; n * m]);
            // SAFETY: AMX available; `w` is `m` rows of `k` BF16, `p` packs `n` tokens of `k`.
            unsafe {
                sums(&p, n, k, &w, m, 0..m, raw.as_mut_ptr(), Finish::Raw);
                let finish = Finish::Bf16 { bias: b };
                sums(&p, n, k, &w, m, 0..m, fin.as_mut_ptr(), finish);
            }
            let mut want: Vec<Bf16> = raw.iter().map(|&v| Bf16(v)).collect();
            let bias16: Option<Vec<Bf16>> = b.map(|b| b.iter().map(|&v| Bf16(v)).collect());
            for row in want.chunks_exact_mut(m) {
                Bf16::add_bias_to_act_dtype(row, bias16.as_deref());
            }
            assert!(
                fin[5 * m].is_nan(),
                "the NaN input reaches its token's outputs"
            );
            for (i, (w, f)) in want.iter().zip(&fin).enumerate() {
                assert_eq!(
                    w.0.to_bits(),
                    f.to_bits(),
                    "output {i}, bias {}",
                    b.is_some()
                );
            }
        }
    }

    /// However a product is cut (token groups, blocks of `k`, panels of rows) and wherever its
    /// rows start (read in place on cache lines, or copied from 32 bytes into a line), every
    /// sum has the bits of one pass over all of `k`: the partial sums between blocks of `k` are
    /// stored and loaded back exactly and added to in the same order. Plain products (bias,
    /// bf16 finish) and SwiGLU, with token, row and `k` tails.
    #[test]
    fn every_blocking_gives_the_same_bits() {
        if !available() {
            eprintln!("every_blocking_gives_the_same_bits: skipped, no AMX-BF16 here");
            return;
        }
        let value = |i: usize, salt: u32| {
            let h = (i as u32 ^ salt).wrapping_mul(0x9E37_79B9).rotate_left(11);
            (h as f32 / u32::MAX as f32 - 0.5) * 4.0
        };
        let bf16_bits = |v: f32| ((v.to_bits() >> 16) as u16).to_le_bytes();
        let cuts = [
            BLOCKING,
            // Two token groups, three chunks of `k`, two row tiles (one for SwiGLU) at a time.
            Blocking {
                groups: 2,
                k_block_bytes: 2 * T16 * ROW * 3,
                panel_bytes: 1,
            },
            // Three groups (a single one after each pair), five chunks, 64 rows.
            Blocking {
                groups: 3,
                k_block_bytes: 3 * T16 * ROW * 5,
                panel_bytes: 64 * 8 * ROW,
            },
        ];
        for (n, k, m) in [(70, 1037, 112), (33, 256, 64), (16, 96, 48), (5, 29, 32)] {
            let x: Vec<f32> = (0..n * k)
                .map(|i| f32::from_bits(value(i, 1).to_bits() & 0xFFFF_0000))
                .collect();
            let p = Packed::new(&x, n, k);
            let bias: Vec<f32> = (0..m).map(|i| value(i, 4)).collect();
            // Each matrix once on a cache line and once 32 bytes into one.
            let mats: Vec<Vec<TileRow>> = (0..2)
                .map(|salt| {
                    let mut v = vec![TileRow([0; ROW / 2]); (m * k * 2).div_ceil(ROW) + 1];
                    let bytes = v.as_mut_ptr().cast::<u8>();
                    for i in 0..m * k {
                        for (o, b) in bf16_bits(value(i, 2 + salt)).iter().enumerate() {
                            // SAFETY: inside the vector (one spare line).
                            unsafe { *bytes.add(2 * i + o) = *b };
                        }
                    }
                    v
                })
                .collect();
            let at = |mat: usize, shift: usize| {
                let mut v = vec![TileRow([0; ROW / 2]); mats[mat].len() + 1];
                let bytes = v.as_mut_ptr().cast::<u8>();
                // SAFETY: `m·k·2` bytes from `shift` fit the one spare line.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        mats[mat].as_ptr().cast::<u8>(),
                        bytes.add(shift),
                        m * k * 2,
                    );
                }
                (v, shift)
            };
            let finishes = [
                Finish::Raw,
                Finish::Bf16 { bias: Some(&bias) },
                Finish::SwiGlu,
            ];
            for finish in finishes {
                let mut first: Option<Vec<u32>> = None;
                for shift in [0, 32] {
                    let (gate, _) = at(0, shift);
                    let (up, _) = at(1, shift);
                    let w = |v: &Vec<TileRow>| v.as_ptr().cast::<u8>().wrapping_add(shift);
                    let swiglu = matches!(finish, Finish::SwiGlu);
                    let src = Source {
                        w: [w(&gate), if swiglu { w(&up) } else { std::ptr::null() }],
                        wrow: k * 2,
                    };
                    for cut in cuts {
                        let mut out = vec![f32::NAN; n * m];
                        let target = Target {
                            n,
                            m,
                            out: out.as_mut_ptr(),
                            finish,
                        };
                        // SAFETY: AMX available; both matrices hold `m` rows of `k` BF16; `p`
                        // packs `n` tokens of `k`; `out` holds `n·m`; `m` whole tiles.
                        unsafe { run(&p, n, k, src, 0..m, target, cut) };
                        let bits: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                        assert!(out.iter().all(|v| !v.is_nan()), "every output written");
                        match &first {
                            None => first = Some(bits),
                            Some(f) => assert!(
                                *f == bits,
                                "n={n} k={k} m={m} shift {shift}: a blocking changed the bits"
                            ),
                        }
                    }
                }
            }
        }
    }

    /// The vectorized packing writes what the layout says, value by value: token `t`'s pair
    /// `(x[t][32c + 2r], x[t][32c + 2r + 1])` at row `r` of tile `(t / 16, c)`, zero past `n`
    /// and `k` (token and `k` tails, one and several groups and chunks).
    #[test]
    fn packed_activations_follow_the_pair_layout() {
        if !available() {
            eprintln!("packed_activations_follow_the_pair_layout: skipped, no AMX-BF16 here");
            return;
        }
        for (n, k) in [(1, 32), (16, 64), (17, 29), (40, 301), (8, 896)] {
            // Distinct bf16 values (high halves), garbage in the low halves the packing drops.
            let x: Vec<f32> = (0..n * k)
                .map(|i| f32::from_bits(((i as u32 + 1) << 16) | 0x1234))
                .collect();
            let p = Packed::new(&x, n, k);
            let chunks = k.div_ceil(KT);
            let data: Vec<u16> = p.data.iter().flat_map(|r| r.0).collect();
            assert_eq!(data.len(), n.div_ceil(T16) * chunks * T16 * ROW / 2);
            assert_eq!(p.data.as_ptr() as usize % ROW, 0, "tiles start on a line");
            for (i, &got) in data.iter().enumerate() {
                let (tile, within) = (i / (T16 * ROW / 2), i % (T16 * ROW / 2));
                let (g, c) = (tile / chunks, tile % chunks);
                let (r, tok, half) = (within / (ROW / 2), within % (ROW / 2) / 2, within % 2);
                let (t, e) = (g * T16 + tok, c * KT + 2 * r + half);
                let want = if t < n && e < k {
                    (x[t * k + e].to_bits() >> 16) as u16
                } else {
                    0
                };
                assert_eq!(got, want, "n={n} k={k} token {t} element {e}");
            }
        }
    }
}
