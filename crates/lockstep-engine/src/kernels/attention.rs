//! Causal scaled-dot-product attention with grouped key/value heads, as HF's eager attention:
//! `softmax((q · kᵀ) × D^-0.5 + mask) · v`, the product rounded before the scaling.
//!
//! With a sliding window `w` ([`AttentionSpec::window`]) the query at absolute position `i` sees
//! only keys `j` with `i - w < j <= i`: itself and the `w - 1` keys before it, as transformers'
//! `sliding_window_overlay` (`kv_idx > q_idx - sliding_window`). Positions count every cached key,
//! left padding included, as transformers' cache indices do.
//!
//! The softmax is computed in the compute precision (float32 in the bf16 tier, as HF does) and
//! rounded once; [`AttentionSpec::softmax_bf16`] computes it in bf16 instead (fault injection).
//!
//! Every path sums each dot product and each weighted sum of values in one fixed order, so a
//! decode step gets the bits a prefill gets for the same query, except a bf16 prefill on a CPU
//! with AMX-BF16 (`Heads::head_amx`): there `q·kᵀ` and `p·v` run on AMX tiles, 32 queries at a
//! time (exact bf16 products summed in f32 in the tiles' order), as the bf16 prefill's matmuls
//! already do on such a CPU. The probabilities are formed from the scores exactly as elsewhere.

use super::line_aligned::LineAligned;
#[cfg(target_arch = "x86_64")]
use super::matmul::dot_lane_pairs;
use super::{as_f32, as_f32_mut, round_bf16, Bf16, Float};
use crate::team::SendPtr;
use std::fmt::Debug;
use std::ops::Range;
use std::sync::OnceLock;

/// How a KV cache holds a key or value of compute type `T`: as `T` itself, or in the bf16 tier,
/// whose keys and values are bf16 values (rounded where PyTorch materializes them), as the bf16
/// value alone ([`half::bf16`]): half the bytes for a decode step to read, the same values, so
/// the same bits out of every path.
pub trait KvElement<T: Float>: Copy + Send + Sync + Default + Debug + 'static {
    /// `x` as held (a bf16 cache rounds a value that is not a bf16 one to the nearest that is;
    /// the model only gives it bf16 values).
    fn hold(x: T) -> Self;
    /// The value held.
    fn value(self) -> T;
    /// `s` as values of `T`, when they are held as such.
    fn as_values(s: &[Self]) -> Option<&[T]>;
    /// `s` as the vectorized sums read it: f32 lanes, or bf16 ones widened exactly on load.
    fn lanes(s: &[Self]) -> Option<KvLanes<'_>>;
}

/// Keys or values as the vectorized sums read them.
#[derive(Debug, Clone, Copy)]
pub enum KvLanes<'a> {
    /// f32 values (the f32 tier, and bf16 values held in f32).
    F32(&'a [f32]),
    /// bf16 values.
    Bf16(&'a [half::bf16]),
}

impl<T: Float> KvElement<T> for T {
    #[inline(always)]
    fn hold(x: T) -> T {
        x
    }
    #[inline(always)]
    fn value(self) -> T {
        self
    }
    #[inline(always)]
    fn as_values(s: &[T]) -> Option<&[T]> {
        Some(s)
    }
    #[inline(always)]
    fn lanes(s: &[T]) -> Option<KvLanes<'_>> {
        as_f32(s).map(KvLanes::F32)
    }
}

impl KvElement<Bf16> for half::bf16 {
    #[inline(always)]
    fn hold(x: Bf16) -> half::bf16 {
        half::bf16::from_f32(x.0)
    }
    #[inline(always)]
    fn value(self) -> Bf16 {
        Bf16(self.to_f32())
    }
    #[inline(always)]
    fn as_values(_: &[half::bf16]) -> Option<&[Bf16]> {
        None
    }
    #[inline(always)]
    fn lanes(s: &[half::bf16]) -> Option<KvLanes<'_>> {
        Some(KvLanes::Bf16(s))
    }
}

/// An element of the key and value rows the vectorized sums read ([`KvLanes`]).
trait Lane: Copy + 'static {
    /// Whether it is bf16 (else f32).
    const BF16: bool;
    /// Its bf16 bits (of an f32: the upper half, exact for a bf16 value).
    fn bf16_bits(self) -> u16;
    /// Its value as f32 (bf16 widened exactly).
    fn widened(self) -> f32;
}

impl Lane for f32 {
    const BF16: bool = false;
    #[inline(always)]
    fn bf16_bits(self) -> u16 {
        (self.to_bits() >> 16) as u16
    }
    #[inline(always)]
    fn widened(self) -> f32 {
        self
    }
}

impl Lane for half::bf16 {
    const BF16: bool = true;
    #[inline(always)]
    fn bf16_bits(self) -> u16 {
        self.to_bits()
    }
    #[inline(always)]
    fn widened(self) -> f32 {
        self.to_f32()
    }
}

/// Eight lanes at `p` as f32 (bf16 widened exactly: its bits are an f32's upper half).
///
/// # Safety
/// AVX-512F present; eight elements readable at `p`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load8<L: Lane>(p: *const L) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    match L::BF16 {
        true => {
            let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
        }
        false => _mm256_loadu_ps(p.cast()),
    }
}

/// Sixteen lanes at `p` as f32 ([`load8`]'s widening).
///
/// # Safety
/// AVX-512F present; sixteen elements readable at `p`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load16<L: Lane>(p: *const L) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    match L::BF16 {
        true => {
            let wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(wide))
        }
        false => _mm512_loadu_ps(p.cast()),
    }
}

/// How query heads map to key/value heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GqaMapping {
    /// HF `repeat_kv`: query head `h` uses kv head `h / (heads / kv_heads)`.
    Grouped,
    /// Query head `h` uses kv head `h % kv_heads` (a classic porting mistake).
    RoundRobin,
}

/// Shape and options of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionSpec {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head dimension D.
    pub head_dim: usize,
    /// Absolute position of the first query (keys before it come from the cache).
    pub q_start: usize,
    /// Apply the causal mask (always, except for fault injection).
    pub causal: bool,
    /// Sliding window: the query at absolute position `i` sees keys `i - w < j <= i` only;
    /// `None`: every earlier key.
    pub window: Option<usize>,
    /// Query-to-kv head mapping.
    pub mapping: GqaMapping,
    /// Compute the softmax in bf16 (a porting mistake, fault `softmax-bf16`): `s - max`, each
    /// exp, the sum and each quotient rounded to bf16, as `jax.nn.softmax` on a bf16 array does
    /// (its sum accumulates in float32, here in the compute precision, and is rounded once).
    pub softmax_bf16: bool,
}

impl AttentionSpec {
    /// A model's causal attention from position 0: `heads` query heads sharing `kv_heads`
    /// key/value heads as `repeat_kv` maps them, no window, the softmax in the compute precision.
    pub fn causal(heads: usize, kv_heads: usize, head_dim: usize) -> AttentionSpec {
        AttentionSpec {
            heads,
            kv_heads,
            head_dim,
            q_start: 0,
            causal: true,
            window: None,
            mapping: GqaMapping::Grouped,
            softmax_bf16: false,
        }
    }

    /// The kv head used by query head `h`.
    pub fn kv_head(&self, h: usize) -> usize {
        match self.mapping {
            GqaMapping::Grouped => h / (self.heads / self.kv_heads),
            GqaMapping::RoundRobin => h % self.kv_heads,
        }
    }
}

/// Where the keys (or values) of an attention call lie in their slice: position `s` of kv
/// head `kv` at `kv·head + s·row`, its `D` values one after another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Positions `S`.
    pub keys: usize,
    /// Elements from one kv head's first position to the next head's.
    pub head: usize,
    /// Elements from one position to the next.
    pub row: usize,
}

impl KvLayout {
    /// `[S][kv_heads][D]`: each position's heads side by side, as a projection writes them.
    pub fn interleaved(keys: usize, kv_heads: usize, head_dim: usize) -> KvLayout {
        KvLayout {
            keys,
            head: head_dim,
            row: kv_heads * head_dim,
        }
    }

    /// `[kv_heads][capacity][D]`: each kv head's positions one after another (the first `keys`
    /// of `capacity` used), so that a decode step reads each head's as one stream
    /// ([`crate::KvCache`]).
    pub fn by_head(keys: usize, capacity: usize, head_dim: usize) -> KvLayout {
        KvLayout {
            keys,
            head: capacity * head_dim,
            row: head_dim,
        }
    }

    /// Elements a slice must hold for `kv_heads` heads of `head_dim` values.
    fn span(&self, kv_heads: usize, head_dim: usize) -> usize {
        match self.keys {
            0 => 0,
            s => (kv_heads - 1) * self.head + (s - 1) * self.row + head_dim,
        }
    }
}

/// `q`: `[T][heads][D]`; `k`, `v`: `[S][kv_heads][D]` (all positions `0..S`); `out`:
/// `[T][heads][D]`. When `probs` is given (`[heads][T][S]`) the softmax output is stored there.
///
/// `key_mask` (`[S]`, transformers' `attention_mask` of the row) hides keys whose entry is
/// false, such as left padding. A query that sees no key at all (a padding query at the start
/// of a row) gets an all-zero output and all-zero probabilities.
pub fn attention<T: Float>(
    spec: &AttentionSpec,
    q: &[T],
    k: &[T],
    v: &[T],
    key_mask: Option<&[bool]>,
    out: &mut [T],
    probs: Option<&mut [T]>,
) {
    let (kvh, d) = (spec.kv_heads, spec.head_dim);
    assert_eq!(k.len(), v.len(), "attention: keys and values");
    let layout = KvLayout::interleaved(k.len() / (kvh * d), kvh, d);
    attention_in(spec, q, k, v, layout, key_mask, out, probs)
}

/// [`attention`] with the keys and values laid out as `layout` says and held as `C` (a KV
/// cache's [`Float::Kv`]): the same bits for the same values, whatever the layout and holding.
#[allow(clippy::too_many_arguments)]
pub fn attention_in<T: Float, C: KvElement<T>>(
    spec: &AttentionSpec,
    q: &[T],
    k: &[C],
    v: &[C],
    layout: KvLayout,
    key_mask: Option<&[bool]>,
    out: &mut [T],
    probs: Option<&mut [T]>,
) {
    attention_split(spec, q, k, v, layout, key_mask, out, probs, None)
}

/// [`attention_in`]; `heads_per_task` (tests) fixes how many heads of a kv group one task of a
/// decode step runs, else [`decode_heads_per_task`] chooses.
#[allow(clippy::too_many_arguments)]
fn attention_split<T: Float, C: KvElement<T>>(
    spec: &AttentionSpec,
    q: &[T],
    k: &[C],
    v: &[C],
    layout: KvLayout,
    key_mask: Option<&[bool]>,
    out: &mut [T],
    probs: Option<&mut [T]>,
    heads_per_task: Option<usize>,
) {
    let (h, kvh, d) = (spec.heads, spec.kv_heads, spec.head_dim);
    let t_len = q.len() / (h * d);
    let s_len = layout.keys;
    let span = layout.span(kvh, d);
    assert!(
        k.len() >= span && v.len() >= span,
        "attention: keys and values"
    );
    assert_eq!(out.len(), q.len());
    assert!(spec.q_start + t_len <= s_len);
    if let Some(p) = probs.as_deref() {
        assert_eq!(p.len(), h * t_len * s_len);
    }
    if let Some(m) = key_mask {
        assert_eq!(m.len(), s_len, "attention: key mask length");
    }
    // A mask hiding nothing (a batch row without padding) is dropped: its rows then take the
    // whole-row passes, with the same bits.
    let key_mask = key_mask.filter(|m| m.contains(&false));
    let heads = Heads {
        spec,
        q,
        k,
        v,
        layout,
        key_mask,
        t_len,
        scale: T::from_f64((d as f64).powf(-0.5)),
        amx: true,
        amx_kv: kv_slots(kvh),
        prefill_kv: kv_slots(kvh),
    };
    // Heads are independent: spread them over threads when there is enough work (a long prompt
    // or context), run them in order otherwise (short decode steps, where thread wake-ups would
    // cost more, and where on a team the helper reads the next weights ahead meanwhile).
    let mut by_head = vec![T::ZERO; h * t_len * d];
    let parallel = h * t_len * s_len * d >= PARALLEL_MIN_WORK;
    if t_len == 1 && spec.mapping == GqaMapping::Grouped && kvh < h && heads.blocked() {
        // One query position (a decode step): the heads sharing a kv head together, so that
        // its keys and values are read once for several heads; a group split over several
        // tasks when the threads outnumber the kv heads (each head's sums are its own: the
        // same bits however the heads are grouped).
        let group = h / kvh;
        let threads = if parallel {
            rayon::current_num_threads()
        } else {
            1
        };
        let sub = heads_per_task.unwrap_or_else(|| decode_heads_per_task(group, kvh, threads));
        assert!(
            sub > 0 && group.is_multiple_of(sub),
            "heads per task divide the group"
        );
        // Task `i`: heads `i·sub..(i + 1)·sub`, one row each of the outputs and probabilities.
        for_each_rows(
            &mut by_head,
            d,
            probs,
            s_len,
            (h / sub, |i| i * sub..(i + 1) * sub),
            parallel,
            |i, o, p| {
                let (kv, j0) = (i * sub / group, i * sub % group);
                heads.run_group(kv, j0..j0 + sub, o, p)
            },
        );
    } else {
        // Each head's queries in parts of about equal work when the heads alone would leave
        // threads idle (14 heads on 16 threads) or unevenly loaded; one part otherwise.
        let threads = if parallel {
            rayon::current_num_threads()
        } else {
            1
        };
        let parts = query_parts(spec, t_len, threads);
        for_each_part(
            &mut by_head,
            d,
            probs,
            s_len,
            t_len,
            &parts,
            parallel,
            |head, r, o, p| heads.run(head, r, o, p),
        );
    }
    // `[heads][T][D]` -> `[T][heads][D]`, a prefill's tokens in chunks on the threads.
    let transpose = |t0: usize, rows: &mut [T]| {
        for (i, o) in rows.chunks_exact_mut(h * d).enumerate() {
            for (head, o) in o.chunks_exact_mut(d).enumerate() {
                o.copy_from_slice(&by_head[(head * t_len + t0 + i) * d..][..d]);
            }
        }
    };
    if parallel && t_len >= 2 * TRANSPOSE_TOKENS {
        crate::team::for_each_chunk_mut(out, TRANSPOSE_TOKENS * h * d, |i, rows| {
            transpose(i * TRANSPOSE_TOKENS, rows)
        });
    } else {
        transpose(0, out);
    }
}

/// Tokens per task of the transposition that ends a parallel attention call.
const TRANSPOSE_TOKENS: usize = 64;

/// Heads of a kv group that one task of a parallel decode step runs: the whole group (its keys
/// and values read once) when the kv heads alone give every thread a task, else the largest
/// divisor of the group that does (one head per task at the least). The 0.5B shape (14 heads, 2
/// kv heads) on 16 threads: one head per task, 14 tasks, where whole groups left 14 threads
/// idle; on 2 threads, whole groups.
fn decode_heads_per_task(group: usize, kv_heads: usize, threads: usize) -> usize {
    (1..=group)
        .rev()
        .filter(|s| group.is_multiple_of(*s))
        .find(|s| kv_heads * (group / s) >= threads)
        .unwrap_or(1)
}

/// The ranges of queries (of `t_len`) that the tasks of a prefill's attention run for each
/// head: one range per head when the heads give every thread at least [`TASKS_PER_THREAD`]
/// tasks, else each head's queries cut into as many parts (at most one per block of
/// [`QUERY_ALIGN`] queries) of about equal work: a causal query sees one key more than the one
/// before it, so the later parts hold fewer queries. Every cut is at a multiple of
/// [`QUERY_ALIGN`], so the blocks of queries the kernels form are those of one whole range.
fn query_parts(spec: &AttentionSpec, t_len: usize, threads: usize) -> Vec<Range<usize>> {
    let wanted = (TASKS_PER_THREAD * threads).div_ceil(spec.heads.max(1));
    let parts = wanted.min(t_len / QUERY_ALIGN).max(1);
    if parts == 1 {
        return std::iter::once(0..t_len).collect();
    }
    // Keys seen by the queries before `t` (all keys for each query when not causal).
    let work = |t: usize| match spec.causal {
        true => t * spec.q_start + t * (t + 1) / 2,
        false => t,
    };
    let total = work(t_len);
    let mut cuts = vec![0];
    for j in 1..parts {
        let goal = total * j / parts;
        let t = (0..t_len)
            .step_by(QUERY_ALIGN)
            .find(|&t| work(t) >= goal)
            .unwrap_or(t_len);
        if t > *cuts.last().expect("starts at 0") && t < t_len {
            cuts.push(t);
        }
    }
    cuts.push(t_len);
    cuts.windows(2).map(|c| c[0]..c[1]).collect()
}

/// `f(head, queries, out, probs)` for every head and range of `parts`: `out` the range's
/// outputs in `by_head` (`[heads][t_len][d]`), `probs` its rows of `probs`
/// (`[heads][t_len][s_len]`), on the thread pool when `parallel`.
#[allow(clippy::too_many_arguments)]
fn for_each_part<T: Float>(
    by_head: &mut [T],
    d: usize,
    probs: Option<&mut [T]>,
    s_len: usize,
    t_len: usize,
    parts: &[Range<usize>],
    parallel: bool,
    f: impl Fn(usize, Range<usize>, &mut [T], Option<&mut [T]>) + Sync + Send,
) {
    let (heads, np) = (by_head.len() / (t_len * d), parts.len());
    // Task `i`: part `i % np` of head `i / np`, rows `head·t_len + part`.
    let rows = |i: usize| {
        let (row, r) = ((i / np) * t_len, &parts[i % np]);
        row + r.start..row + r.end
    };
    for_each_rows(
        by_head,
        d,
        probs,
        s_len,
        (heads * np, rows),
        parallel,
        |i, o, p| f(i / np, parts[i % np].clone(), o, p),
    );
}

/// `f(i, out_i, probs_i)` for tasks `i < n`, task `i` given rows `rows(i)` of `out` (`out_row`
/// values a row) and of `probs` (`probs_row` values a row), on the thread pool when `parallel`.
/// The rows of task after task must ascend without overlapping and lie inside both buffers
/// (checked before the loop).
fn for_each_rows<T: Float, R: Fn(usize) -> Range<usize> + Sync>(
    out: &mut [T],
    out_row: usize,
    probs: Option<&mut [T]>,
    probs_row: usize,
    (n, rows): (usize, R),
    parallel: bool,
    f: impl Fn(usize, &mut [T], Option<&mut [T]>) + Sync + Send,
) {
    let mut end = 0;
    for i in 0..n {
        let r = rows(i);
        assert!(
            end <= r.start && r.start <= r.end,
            "tasks' rows ascend apart"
        );
        end = r.end;
    }
    assert!(end * out_row <= out.len(), "tasks' rows inside the outputs");
    if let Some(p) = probs.as_deref() {
        assert!(
            end * probs_row <= p.len(),
            "tasks' rows inside the probabilities"
        );
    }
    let o = SendPtr(out.as_mut_ptr());
    let p = probs.map(|p| SendPtr(p.as_mut_ptr()));
    let task = |i: usize| {
        let r = rows(i);
        // SAFETY: task `i`'s rows of each buffer: in bounds and disjoint from every other
        // task's (both checked above); the buffers outlive the loop.
        let o = unsafe { o.slice(r.start * out_row, r.len() * out_row) };
        let p = p.map(|p| unsafe { p.slice(r.start * probs_row, r.len() * probs_row) });
        f(i, o, p)
    };
    if parallel {
        crate::team::for_each(n, task);
    } else {
        (0..n).for_each(task);
    }
}

/// One attention call's inputs, for computing it head by head.
struct Heads<'a, T, C> {
    spec: &'a AttentionSpec,
    q: &'a [T],
    k: &'a [C],
    v: &'a [C],
    /// Where `k` and `v` hold each kv head's positions.
    layout: KvLayout,
    key_mask: Option<&'a [bool]>,
    t_len: usize,
    scale: T,
    /// Whether a bf16 prefill may run on AMX tiles ([`Heads::on_amx`]); tests of the other
    /// paths' bits turn it off.
    amx: bool,
    /// Per kv head, its keys and values as [`Heads::head_amx`] reads them, made by the first
    /// query head that needs them ([`AmxKv::new`]) and read by the rest of its group.
    amx_kv: Vec<OnceLock<AmxKv>>,
    /// Per kv head, its keys and values as [`Heads::query_block`] reads them in a prefill
    /// ([`PrefillKv::new`]), made by the first query head that needs them.
    prefill_kv: Vec<OnceLock<PrefillKv>>,
}

/// One kv head's keys and values in the layout of [`Heads::head_amx`]'s tile products: the keys
/// as bf16 rows `[S][D]`, the values transposed as bf16 rows `[D][S]` (row `i` holds value
/// dimension `i` of every key), both zero past the last key up to a multiple of 32 keys. Made
/// once per kv head, not once per query head: the conversions were a quarter of the AMX
/// attention's thread time at 512 tokens of the 0.5B shape (7 query heads per kv head).
struct AmxKv {
    /// `[s32][D]` bf16 bits, little-endian, from a cache line (so that the tiles read them in
    /// place, [`super::matmul::amx_sums`]).
    keys: LineAligned<u8>,
    /// `[D][s32]` bf16 bits, little-endian, from a cache line.
    values: LineAligned<u8>,
    /// `s32`: the keys counted up to a multiple of 32 (the zero keys past the last included).
    s32: usize,
}

impl AmxKv {
    /// One kv head's keys and values `(k, v)` (bf16 values from its first position, laid out
    /// as `layout`).
    fn new<L: Lane>((k, v): (&[L], &[L]), layout: KvLayout, d: usize) -> AmxKv {
        let (s_len, stride) = (layout.keys, layout.row);
        let bits = |v: L| v.bf16_bits();
        let s32 = s_len.next_multiple_of(32);
        let mut keys = LineAligned::new(s32 * d * 2, 0u8);
        for (s, row) in keys.chunks_exact_mut(d * 2).take(s_len).enumerate() {
            for (o, &x) in row.chunks_exact_mut(2).zip(&k[s * stride..][..d]) {
                o.copy_from_slice(&bits(x).to_le_bytes());
            }
        }
        let mut values = LineAligned::new(d * s32 * 2, 0u8);
        for s in 0..s_len {
            for (i, &x) in v[s * stride..][..d].iter().enumerate() {
                values[(i * s32 + s) * 2..][..2].copy_from_slice(&bits(x).to_le_bytes());
            }
        }
        AmxKv { keys, values, s32 }
    }
}

/// One kv head's keys and values, from its first position, as the blocked and AMX paths read
/// them.
enum HeadLanes<'a> {
    F32((&'a [f32], &'a [f32])),
    Bf16((&'a [half::bf16], &'a [half::bf16])),
}

/// One empty slot per kv head.
fn kv_slots<X>(kv_heads: usize) -> Vec<OnceLock<X>> {
    (0..kv_heads).map(|_| OnceLock::new()).collect()
}

impl<T: Float, C: KvElement<T>> Heads<'_, T, C> {
    /// Head `head`'s queries `queries` (of this call's `T`): their outputs `[queries][D]` into
    /// `o_head` and, if wanted, probabilities `[queries][S]` into `p_head`, each query's the
    /// same bits whichever range it is computed in (ranges start at a multiple of
    /// [`QUERY_ALIGN`]): with this CPU's widest vectors where it has them (the compiler
    /// vectorizes the same element-wise operations, never reassociating or fusing them, so the
    /// bits are the plain build's).
    fn run(&self, head: usize, queries: Range<usize>, o_head: &mut [T], p_head: Option<&mut [T]>) {
        if self.on_amx() {
            return self.head_amx(head, queries, o_head, p_head);
        }
        #[cfg(target_arch = "x86_64")]
        if self.blocked() {
            // SAFETY: `blocked` checked the CPU features and the call's shape.
            return unsafe { self.head_blocked(head, queries, o_head, p_head) };
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
        {
            // SAFETY: the CPU has the features the function is compiled with.
            return unsafe { self.run_avx512(head, queries, o_head, p_head) };
        }
        self.head(head, queries, o_head, p_head)
    }

    /// The query of heads `heads` (counted within the group) of those sharing kv head `kv` (one
    /// query position, grouped mapping): outputs `[heads][D]` into `o_group`, probabilities
    /// `[..][S]` into `p_group`, each head's bits those of [`Heads::run`].
    fn run_group(
        &self,
        kv: usize,
        heads: Range<usize>,
        o_group: &mut [T],
        mut p_group: Option<&mut [T]>,
    ) {
        #[cfg(target_arch = "x86_64")]
        if self.blocked() {
            // SAFETY: `blocked` checked the CPU features and the call's shape.
            return unsafe { self.group_blocked(kv, heads, o_group, p_group) };
        }
        let (d, s_len) = (self.spec.head_dim, self.layout.keys);
        let group = self.spec.heads / self.spec.kv_heads;
        for (j, o) in o_group.chunks_mut(d).enumerate() {
            let p = p_group
                .as_deref_mut()
                .map(|p| &mut p[j * s_len..(j + 1) * s_len]);
            self.run(kv * group + heads.start + j, 0..self.t_len, o, p);
        }
    }

    /// Whether the blocked paths ([`Heads::head_blocked`], [`Heads::group_blocked`]) apply:
    /// AVX-512F/BW/VL/DQ, values held in f32, a head dimension of 64 or 128, no key hidden
    /// (no window, no mask) and the softmax in the compute precision.
    fn blocked(&self) -> bool {
        let spec = self.spec;
        #[cfg(target_arch = "x86_64")]
        return as_f32(self.q).is_some()
            && C::lanes(self.k).is_some()
            && (spec.head_dim == 64 || spec.head_dim == 128)
            && spec.window.is_none()
            && self.key_mask.is_none()
            && !spec.softmax_bf16
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512dq");
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = spec;
            false
        }
    }

    /// Whether this call runs on AMX tiles ([`Heads::head_amx`]): a bf16 prefill of at least
    /// [`AMX_MIN_QUERIES`] queries on a CPU with AMX-BF16, on the blocked path's terms (no key
    /// hidden, softmax in the compute precision, head dimension 64 or 128). One-token steps stay
    /// on [`Heads::head_blocked`]'s sums, so prefill and decode differ by f32 summation order
    /// here, as the AMX matmul makes them differ (the verifier's bf16 KV-cache phase then judges
    /// the decode against the f64 oracle on such a CPU).
    fn on_amx(&self) -> bool {
        self.amx
            && T::PRECISION == super::Precision::BF16
            && self.t_len >= AMX_MIN_QUERIES
            && self.blocked()
            && super::matmul::Kernel::detect() == super::matmul::Kernel::Amx
    }

    /// Head `head` as [`Heads::head`] computes it, with both products on AMX tiles: per block of
    /// [`AMX_QUERIES`] queries, the scores `q·k` against the keys the block sees (exact bf16
    /// products summed in f32, in the tiles' order), each row scaled, rounded and turned into
    /// probabilities exactly as elsewhere ([`probabilities_rows`]), then `p·v` against the head's
    /// values transposed (the probabilities are bf16 values, so again exact products summed in
    /// f32), rounded to the compute dtype.
    fn head_amx(
        &self,
        head: usize,
        queries: Range<usize>,
        o_head: &mut [T],
        mut p_head: Option<&mut [T]>,
    ) {
        let spec = self.spec;
        let (h, d, s_len) = (spec.heads, spec.head_dim, self.layout.keys);
        let kv = spec.kv_head(head);
        let q = as_f32(self.q).expect("f32 inside");
        let AmxKv { keys, values, s32 } =
            self.amx_kv[kv].get_or_init(|| match self.head_lanes(kv) {
                HeadLanes::F32(kv) => AmxKv::new(kv, self.layout, d),
                HeadLanes::Bf16(kv) => AmxKv::new(kv, self.layout, d),
            });
        let s32 = *s32;
        let mut qs = vec![0f32; AMX_QUERIES * d];
        // Grown as the blocks see more keys (every value is written before it is read): a
        // call's first blocks see few keys, and zeroing rows for all of them up front cost as
        // much as the scores (`memset` 12% of a 512-token bf16 attention's time).
        let mut rows = Vec::new();
        let mut outs = vec![0f32; AMX_QUERIES * d];
        let first = queries.start;
        for t0 in queries.clone().step_by(AMX_QUERIES) {
            let tb = AMX_QUERIES.min(queries.end - t0);
            let seen = self.visible(t0 + tb - 1);
            // The block's scores against its keys (up to a multiple of 32, the zero keys past
            // the last scoring zero), turned into probabilities in place: zero past each
            // query's own keys, so the rows are the `p` of `p·v` as they stand.
            let kk = seen.next_multiple_of(32);
            if rows.len() < tb * kk {
                rows.resize(tb * kk, T::ZERO);
            }
            for (j, qj) in qs.chunks_exact_mut(d).take(tb).enumerate() {
                qj.copy_from_slice(&q[((t0 + j) * h + head) * d..][..d]);
            }
            let scores = as_f32_mut(&mut rows[..tb * kk]).expect("f32 inside");
            let ran = super::matmul::amx_sums(&qs[..tb * d], tb, d, keys, d * 2, kk, scores);
            assert!(ran, "on_amx checked AMX");
            let vis: [usize; AMX_QUERIES] = std::array::from_fn(|j| self.visible(t0 + j));
            probabilities_rows(&mut rows[..tb * kk], kk, &vis[..tb], self.scale);
            if let Some(pp) = p_head.as_deref_mut() {
                for (j, row) in rows[..tb * kk].chunks_exact(kk).enumerate() {
                    let dst = &mut pp[(t0 - first + j) * s_len..(t0 - first + j + 1) * s_len];
                    dst[..seen].copy_from_slice(&row[..seen]);
                    dst[seen..].fill(T::ZERO);
                }
            }
            let out = &mut outs[..tb * d];
            let ps = as_f32(&rows[..tb * kk]).expect("f32 inside");
            let ran = super::matmul::amx_sums(ps, tb, kk, values, s32 * 2, d, out);
            assert!(ran, "on_amx checked AMX");
            let block = &mut o_head[(t0 - first) * d..(t0 - first + tb) * d];
            as_f32_mut(block).expect("f32 inside").copy_from_slice(out);
            for o in block.iter_mut() {
                *o = o.to_act_dtype();
            }
        }
    }

    /// [`Heads::head`] compiled for AVX-512.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW/VL.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
    unsafe fn run_avx512(
        &self,
        head: usize,
        queries: Range<usize>,
        o_head: &mut [T],
        p_head: Option<&mut [T]>,
    ) {
        self.head(head, queries, o_head, p_head)
    }

    /// [`Heads::head`] for f32 (or bf16 held in f32) with no key hidden, four queries at a
    /// time, so that each key and value row read from the cache serves four queries: every
    /// query's dots, softmax and weighted sum are its own, computed by the same operations in
    /// the same order as [`Heads::head`] (the same bits; unit-tested).
    ///
    /// # Safety
    /// The CPU has AVX-512F/DQ; `T` holds one f32; the head dimension is 64 or 128.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2")]
    unsafe fn head_blocked(
        &self,
        head: usize,
        queries: Range<usize>,
        o_head: &mut [T],
        mut p_head: Option<&mut [T]>,
    ) {
        let spec = self.spec;
        let (h, d, s_len) = (spec.heads, spec.head_dim, self.layout.keys);
        let q = as_f32(self.q).expect("f32 inside");
        let kv = spec.kv_head(head);
        let prefill = (self.t_len >= PREFILL_KV_MIN_QUERIES).then(|| {
            self.prefill_kv[kv].get_or_init(|| match self.head_lanes(kv) {
                HeadLanes::F32(kv) => PrefillKv::new(kv, self.layout, d),
                HeadLanes::Bf16(kv) => PrefillKv::new(kv, self.layout, d),
            })
        });
        let mut rows = vec![T::ZERO; QB * s_len];
        let first = queries.start;
        for t0 in queries.clone().step_by(QB) {
            let tb = QB.min(queries.end - t0);
            let qs: [&[f32]; QB] = std::array::from_fn(|j| match j < tb {
                true => &q[((t0 + j) * h + head) * d..((t0 + j) * h + head + 1) * d],
                false => &[][..],
            });
            let vis: [usize; QB] = std::array::from_fn(|j| self.visible(t0 + j));
            let (i0, i1) = (t0 - first, t0 - first + tb);
            let (out, probs) = (
                &mut o_head[i0 * d..i1 * d],
                p_head
                    .as_deref_mut()
                    .map(|p| &mut p[i0 * s_len..i1 * s_len]),
            );
            let (qs, vis) = (&qs[..tb], &vis[..tb]);
            match self.head_lanes(kv) {
                HeadLanes::F32(kv) => self.query_block(kv, prefill, qs, vis, &mut rows, out, probs),
                HeadLanes::Bf16(kv) => {
                    self.query_block(kv, prefill, qs, vis, &mut rows, out, probs)
                }
            }
        }
    }

    /// The one query of each head that shares kv head `kv` (a decode step: one query
    /// position, grouped mapping), in blocks of up to [`QB`] heads, the keys and values a
    /// chunk of [`KEY_CHUNK`] rows at a time: each chunk is read from memory once and serves
    /// every block of heads from the first-level cache. `o_group`: `[heads of the group][D]`;
    /// `p_group`: `[heads of the group][S]`. Every head's dots, softmax and weighted sum are
    /// [`Heads::head`]'s operations in its order (a weighted sum goes on from its partial sums
    /// chunk after chunk), so the bits are its bits (unit-tested).
    ///
    /// # Safety
    /// As [`Heads::head_blocked`]; one query position; grouped mapping.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2")]
    unsafe fn group_blocked(
        &self,
        kv: usize,
        heads: Range<usize>,
        o_group: &mut [T],
        p_group: Option<&mut [T]>,
    ) {
        match self.head_lanes(kv) {
            HeadLanes::F32(lanes) => self.group_blocked_in(kv, heads, lanes, o_group, p_group),
            HeadLanes::Bf16(lanes) => self.group_blocked_in(kv, heads, lanes, o_group, p_group),
        }
    }

    /// [`Heads::group_blocked`] over kv head `kv`'s keys and values `(k, v)` (from its first
    /// position).
    ///
    /// # Safety
    /// As [`Heads::group_blocked`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2")]
    unsafe fn group_blocked_in<L: Lane>(
        &self,
        kv: usize,
        heads: Range<usize>,
        (k, v): (&[L], &[L]),
        o_group: &mut [T],
        p_group: Option<&mut [T]>,
    ) {
        let spec = self.spec;
        let (kvh, d, s_len) = (spec.kv_heads, spec.head_dim, self.layout.keys);
        let first = kv * (spec.heads / kvh) + heads.start;
        let group = heads.len();
        let stride = self.layout.row;
        let q = as_f32(&self.q[first * d..(first + group) * d]).expect("f32 inside");
        let vis = self.visible(0);
        let blocks = || {
            (0..group)
                .step_by(QB)
                .map(move |j0| (j0, QB.min(group - j0)))
        };
        let chunks = || {
            (0..vis)
                .step_by(KEY_CHUNK)
                .map(move |c0| c0..(c0 + KEY_CHUNK).min(vis))
        };
        let mut rows = vec![T::ZERO; group * s_len];
        let rf = as_f32_mut(&mut rows).expect("f32 inside");
        for c in chunks() {
            for (j0, tb) in blocks() {
                let mut rs = rf[j0 * s_len..].chunks_mut(s_len);
                let outs: [&mut [f32]; QB] = std::array::from_fn(|j| match j < tb {
                    true => &mut rs.next().expect("a row per head")[c.clone()],
                    false => &mut [][..],
                });
                let qs = std::array::from_fn(|j| match j < tb {
                    true => &q[(j0 + j) * d..(j0 + j + 1) * d],
                    false => &[][..],
                });
                key_dots_block(tb, qs, &k[c.start * stride..], stride, outs);
            }
        }
        probabilities_rows(&mut rows, s_len, &vec![vis; group], self.scale);
        let rf = as_f32(&rows).expect("f32 inside");
        let of = as_f32_mut(o_group).expect("f32 inside");
        for c in chunks() {
            for (j0, tb) in blocks() {
                let mut os = of[j0 * d..].chunks_mut(d);
                let outs: [&mut [f32]; QB] = std::array::from_fn(|j| match j < tb {
                    true => os.next().expect("an output per head"),
                    false => &mut [][..],
                });
                let ps = std::array::from_fn(|j| match j < tb {
                    true => &rf[(j0 + j) * s_len..][c.clone()],
                    false => &[][..],
                });
                let vc = &v[c.start * stride..];
                weighted_sum_block(tb, d, outs, ps, c.len(), vc, stride, c.start > 0);
            }
        }
        if vis == 0 {
            o_group.fill(T::ZERO);
        }
        for oi in o_group.iter_mut() {
            *oi = oi.to_act_dtype();
        }
        if let Some(p) = p_group {
            p.copy_from_slice(&rows);
        }
    }

    /// The keys query `t` of this call sees: `0..visible(t)`.
    #[inline(always)]
    fn visible(&self, t: usize) -> usize {
        match self.spec.causal {
            true => self.spec.q_start + t + 1,
            false => self.layout.keys,
        }
    }

    /// Up to [`QB`] queries over the keys `k` and values `v` of one kv head (from its first
    /// position), query `j` (`qs[j]`, D values) seeing
    /// keys `0..vis[j]` (`vis` ascending): their outputs into `out` (`[j][D]`) and, if wanted,
    /// probabilities into `probs` (`[j][S]`), each by [`Heads::head`]'s operations in its
    /// order. `prefill`: the kv head's keys and values as a prefill reads them, when made
    /// (the dots with the keys every query sees read whole tiles of its keys, the weighted sums
    /// its widened values). `rows`: scratch of `QB·S`.
    ///
    /// # Safety
    /// As [`Heads::head_blocked`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn query_block<L: Lane>(
        &self,
        (k, v): (&[L], &[L]),
        prefill: Option<&PrefillKv>,
        qs: &[&[f32]],
        vis: &[usize],
        rows: &mut [T],
        out: &mut [T],
        mut probs: Option<&mut [T]>,
    ) {
        let spec = self.spec;
        let (d, s_len) = (spec.head_dim, self.layout.keys);
        let tb = qs.len();
        let stride = self.layout.row;
        // Keys every query of the block sees (causal: the first query's), then each one's own.
        let common = vis[0];
        {
            // The block's rows of dots.
            // The keys in whole tiles from the tiles, the rest from the cache.
            let tiled = prefill.map_or(0, |_| common / TILE_KEYS * TILE_KEYS);
            let rf = as_f32_mut(rows).expect("f32 inside");
            let mut split = rf
                .chunks_mut(s_len)
                .take(tb)
                .map(|r| r[..common].split_at_mut(tiled));
            let mut tails: [&mut [f32]; QB] = Default::default();
            let firsts: [&mut [f32]; QB] = std::array::from_fn(|j| match split.next() {
                Some((first, tail)) => {
                    tails[j] = tail;
                    first
                }
                None => &mut [][..],
            });
            let q4 = std::array::from_fn(|j| if j < tb { qs[j] } else { &[][..] });
            if let (Some(p), true) = (prefill, tiled > 0) {
                key_dots_tiled(tb, q4, &p.key_tiles, d, firsts);
            }
            if tiled < common {
                key_dots_block(tb, q4, &k[tiled * stride..], stride, tails);
            }
            // Each query's own keys after the common ones.
            let rf = as_f32_mut(rows).expect("f32 inside");
            let mut outs = rf.chunks_mut(s_len);
            for (j, o) in outs.by_ref().take(tb).enumerate() {
                let tail = &mut o[common..vis[j]];
                if !tail.is_empty() {
                    key_dots_avx512(qs[j], &k[common * stride..], stride, tail);
                }
            }
        }
        probabilities_rows(&mut rows[..tb * s_len], s_len, &vis[..tb], self.scale);
        {
            // Each query's probabilities over its visible keys, and its output.
            let rf = as_f32(rows).expect("f32 inside");
            let ps: [&[f32]; QB] = std::array::from_fn(|j| match j < tb {
                true => &rf[j * s_len..j * s_len + vis[j]],
                false => &[][..],
            });
            let of = as_f32_mut(out).expect("f32 inside");
            let mut chunks = of.chunks_mut(d);
            let outs: [&mut [f32]; QB] = std::array::from_fn(|_| chunks.next().unwrap_or_default());
            // Each query's sum runs over its keys in order whatever `common` is.
            match prefill.and_then(|p| p.values.as_deref()) {
                Some(vf) => weighted_sum_block(tb, d, outs, ps, common, vf, d, false),
                None => weighted_sum_block(tb, d, outs, ps, common, v, stride, false),
            }
        }
        for (j, row) in rows.chunks(s_len).take(tb).enumerate() {
            for oi in &mut out[j * d..(j + 1) * d] {
                *oi = oi.to_act_dtype();
            }
            if let Some(p) = probs.as_deref_mut() {
                p[j * s_len..(j + 1) * s_len].copy_from_slice(row);
            }
        }
    }

    /// kv head `kv`'s keys and values from its first position, as the blocked and AMX paths
    /// read them.
    fn head_lanes(&self, kv: usize) -> HeadLanes<'_> {
        let first = kv * self.layout.head;
        match (C::lanes(&self.k[first..]), C::lanes(&self.v[first..])) {
            (Some(KvLanes::F32(k)), Some(KvLanes::F32(v))) => HeadLanes::F32((k, v)),
            (Some(KvLanes::Bf16(k)), Some(KvLanes::Bf16(v))) => HeadLanes::Bf16((k, v)),
            _ => unreachable!("blocked (and so on_amx) checked the lanes"),
        }
    }

    /// Whether key `s` is masked for a query whose window starts at `lo`.
    #[inline(always)]
    fn hidden(&self, s: usize, lo: usize) -> bool {
        s < lo || self.key_mask.is_some_and(|m| !m[s])
    }

    /// The body of [`Heads::run`].
    #[inline(always)]
    fn head(
        &self,
        head: usize,
        queries: Range<usize>,
        o_head: &mut [T],
        mut p_head: Option<&mut [T]>,
    ) {
        let spec = self.spec;
        let (h, d) = (spec.heads, spec.head_dim);
        let (q, k, v, s_len) = (self.q, self.k, self.v, self.layout.keys);
        let kv = spec.kv_head(head);
        let mut row = vec![T::ZERO; s_len];
        // A key widened to `T` where the fallback dot needs one (a bf16 cache).
        let mut widened = Vec::with_capacity(d);
        let first_query = queries.start;
        for t in queries {
            let qv = &q[(t * h + head) * d..(t * h + head + 1) * d];
            let visible = if spec.causal {
                spec.q_start + t + 1
            } else {
                s_len
            };
            // The first key inside the window.
            let lo = spec
                .window
                .map_or(0, |w| (spec.q_start + t + 1).saturating_sub(w));
            let mut max = T::NEG_INFINITY;
            // Every visible key's `dot(q, k)` at once where there is a fast path for it.
            let (first, stride) = (kv * self.layout.head, self.layout.row);
            let dots = key_dots(qv, &k[first..], stride, &mut row[..visible]);
            // No key hidden (no padding, no window start): whole-row passes that vectorize.
            let unmasked = dots && lo == 0 && self.key_mask.is_none();
            if unmasked {
                for r in row.iter_mut().take(visible) {
                    *r = (r.to_act_dtype() * self.scale).to_act_dtype();
                }
                max = row_max(&row[..visible]);
            }
            for (s, r) in row
                .iter_mut()
                .enumerate()
                .take(if unmasked { 0 } else { visible })
            {
                if self.hidden(s, lo) {
                    *r = T::NEG_INFINITY;
                    continue;
                }
                let dot = if dots {
                    *r
                } else {
                    let key = &k[first + s * stride..][..d];
                    match C::as_values(key) {
                        Some(key) => super::matmul::dot(qv, key),
                        None => {
                            widened.clear();
                            widened.extend(key.iter().map(|x| x.value()));
                            super::matmul::dot(qv, &widened)
                        }
                    }
                };
                *r = (dot.to_act_dtype() * self.scale).to_act_dtype();
                if *r > max {
                    max = *r;
                }
            }
            if spec.softmax_bf16 {
                softmax_in_bf16(&mut row[..visible], max, |s| self.hidden(s, lo));
            } else if unmasked {
                softmax_unmasked(&mut row[..visible], max);
            } else {
                let mut sum = T::ZERO;
                for (s, r) in row.iter_mut().enumerate().take(visible) {
                    *r = if self.hidden(s, lo) {
                        T::ZERO
                    } else {
                        (*r - max).exp()
                    };
                    sum += *r;
                }
                for r in row.iter_mut().take(visible) {
                    *r = if sum > T::ZERO {
                        (*r / sum).to_act_dtype()
                    } else {
                        T::ZERO
                    };
                }
            }
            for r in row.iter_mut().skip(visible) {
                *r = T::ZERO;
            }
            let o = &mut o_head[(t - first_query) * d..(t - first_query + 1) * d];
            weighted_sum(o, &row[..visible], &v[first..], stride);
            for oi in o.iter_mut() {
                *oi = oi.to_act_dtype();
            }
            if let Some(p) = p_head.as_deref_mut() {
                p[(t - first_query) * s_len..(t - first_query + 1) * s_len].copy_from_slice(&row);
            }
        }
    }
}

/// The largest value of `row` (NaNs ignored; `-inf` when empty or all NaN): the value of the
/// loop `if r > max { max = r }` from `-inf`, up to the sign of a zero maximum, which no use of
/// it can see (`r - max` is the same for either zero, but for `r = ±0`, whose exp is 1 either
/// way).
#[inline(always)]
fn row_max<T: Float>(row: &[T]) -> T {
    #[cfg(target_arch = "x86_64")]
    if let Some(r) = as_f32(row) {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F present; T holds one f32 (`as_f32`), so the result is a T.
            return unsafe { std::mem::transmute_copy::<f32, T>(&row_max_avx512(r)) };
        }
    }
    let mut max = T::NEG_INFINITY;
    for &r in row {
        if r > max {
            max = r;
        }
    }
    max
}

/// [`row_max`] on f32 with sixteen running maxima in one register.
///
/// # Safety
/// AVX-512F present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn row_max_avx512(row: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm512_set1_ps(f32::NEG_INFINITY);
    let chunks = row.chunks_exact(16);
    let mut max = f32::NEG_INFINITY;
    for &r in chunks.remainder() {
        if r > max {
            max = r;
        }
    }
    for c in chunks {
        // `max_ps(a, b)` is `a > b ? a : b`: a NaN in `a` keeps `b`.
        acc = _mm512_max_ps(_mm512_loadu_ps(c.as_ptr()), acc);
    }
    let m = _mm512_reduce_max_ps(acc);
    if m > max {
        m
    } else {
        max
    }
}

/// A row of dots (keys `0..vis` visible, none hidden) turned into probabilities in place, as
/// [`Heads::head`] does: scaled and rounded, then [`softmax_unmasked`]; zero past `vis`.
#[inline(always)]
fn probabilities<T: Float>(row: &mut [T], vis: usize, scale: T) {
    for r in row.iter_mut().take(vis) {
        *r = (r.to_act_dtype() * scale).to_act_dtype();
    }
    let max = row_max(&row[..vis]);
    softmax_unmasked(&mut row[..vis], max);
    row[vis..].fill(T::ZERO);
}

/// [`probabilities`] on each of `vis.len()` rows `stride` apart (row `j` seeing keys
/// `0..vis[j]`), bit for bit. In f32 and bf16 compute on AVX-512 the element-wise steps run on
/// sixteen lanes and each row's sum of exps, still added one key at a time in key order, runs
/// beside fifteen other rows' (one row per lane, a 16 × 16 transpose per sixteen keys): the
/// serial sum's dependent adds, four cycles each, were two thirds of the AMX attention's time
/// at 512 tokens.
fn probabilities_rows<T: Float>(rows: &mut [T], stride: usize, vis: &[usize], scale: T) {
    assert_eq!(rows.len(), vis.len() * stride, "probabilities_rows: rows");
    assert!(
        vis.iter().all(|&v| v <= stride),
        "probabilities_rows: visible keys"
    );
    #[cfg(target_arch = "x86_64")]
    if let Some(rf) = as_f32_mut(rows) {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
            // `scale` holds an f32 (`as_f32_mut` succeeded), so the cast is exact.
            let scale = scale.to_f64() as f32;
            // SAFETY: the CPU has the features; the shapes were checked above.
            unsafe {
                match T::PRECISION {
                    super::Precision::BF16 => probabilities_x16::<true>(rf, stride, vis, scale),
                    _ => probabilities_x16::<false>(rf, stride, vis, scale),
                }
            }
            return;
        }
    }
    for (row, &v) in rows.chunks_exact_mut(stride).zip(vis) {
        probabilities(row, v, scale);
    }
}

/// [`probabilities_rows`] on f32 rows, sixteen rows at a time; `BF16`: the activations are
/// bf16 (each rounding of [`probabilities`] applied), else f32 (none).
///
/// # Safety
/// AVX-512F/BW; `rows` holds `vis.len()` rows of `stride`, `vis[j] <= stride`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn probabilities_x16<const BF16: bool>(
    rows: &mut [f32],
    stride: usize,
    vis: &[usize],
    scale: f32,
) {
    use super::simd512::{mask16 as mask, round_bf16_x16, transpose16};
    use std::arch::x86_64::*;
    let round = |v: __m512| if BF16 { round_bf16_x16(v) } else { v };
    let scale = _mm512_set1_ps(scale);
    for g0 in (0..vis.len()).step_by(16) {
        let count = 16.min(vis.len() - g0);
        let group = &mut rows[g0 * stride..(g0 + count) * stride];
        let vis = &vis[g0..g0 + count];
        // Scaled and rounded, less the maximum, exponentiated: each row as `probabilities`, in
        // two passes: the scaled values stored while their maximum is taken (`row_max`'s: a
        // NaN in `y` keeps the running maximum), then `exp(s - max)`.
        for (row, &v) in group.chunks_exact_mut(stride).zip(vis) {
            let live = &mut row[..v];
            let mut acc = _mm512_set1_ps(f32::NEG_INFINITY);
            for c in live.chunks_mut(16) {
                let m = mask(c.len());
                let x = _mm512_maskz_loadu_ps(m, c.as_ptr());
                let y = round(_mm512_mul_ps(round(x), scale));
                _mm512_mask_storeu_ps(c.as_mut_ptr(), m, y);
                acc = _mm512_mask_max_ps(acc, m, y, acc);
            }
            super::expf::exp_shifted_in_place(live, _mm512_reduce_max_ps(acc));
        }
        // The sums: lane `i` adds row `i`'s exps in key order from +0.0 (a key past the row's
        // own adds +0.0, which leaves every sum of exps as it is).
        let longest = vis.iter().copied().max().unwrap_or(0);
        let mut acc = _mm512_setzero_ps();
        for s0 in (0..longest).step_by(16) {
            let mut r = [_mm512_setzero_si512(); 16];
            for (i, (r, &v)) in r.iter_mut().zip(vis).enumerate() {
                let m = mask(v.saturating_sub(s0));
                *r = _mm512_maskz_loadu_epi32(m, group[i * stride + s0..].as_ptr().cast());
            }
            transpose16(&mut r);
            for r in r {
                acc = _mm512_add_ps(acc, _mm512_castsi512_ps(r));
            }
        }
        let mut sums = [0f32; 16];
        _mm512_storeu_ps(sums.as_mut_ptr(), acc);
        // The quotients, rounded; zero past each row's keys (and everywhere if its sum is not
        // positive).
        for ((row, &v), &sum) in group.chunks_exact_mut(stride).zip(vis).zip(&sums) {
            if sum > 0.0 {
                let by = _mm512_set1_ps(sum);
                for c in row[..v].chunks_mut(16) {
                    let m = mask(c.len());
                    let x = _mm512_maskz_loadu_ps(m, c.as_ptr());
                    _mm512_mask_storeu_ps(c.as_mut_ptr(), m, round(_mm512_div_ps(x, by)));
                }
            } else {
                row[..v].fill(0.0);
            }
            row[v..].fill(0.0);
        }
    }
}

/// The softmax of a row of scores with no key hidden, given its maximum: the operations of
/// the general loop in [`Heads::head`] (`exp(r - max)`, their sum in key order, each quotient
/// rounded to the activation dtype), with the element-wise steps over the whole row (the exps
/// through [`super::expf::exp_in_place`], the scalar call's bits).
#[inline(always)]
fn softmax_unmasked<T: Float>(row: &mut [T], max: T) {
    for r in row.iter_mut() {
        *r = *r - max;
    }
    match as_f32_mut(row) {
        Some(rf) => super::expf::exp_in_place(rf),
        None => row.iter_mut().for_each(|r| *r = r.exp()),
    }
    let mut sum = T::ZERO;
    for &r in row.iter() {
        sum += r;
    }
    if sum > T::ZERO {
        for r in row.iter_mut() {
            *r = (*r / sum).to_act_dtype();
        }
    } else {
        row.fill(T::ZERO);
    }
}

/// `out[s] = matmul::dot(q, k[s·stride..s·stride + d])` for every `s < out.len()`, bit for bit,
/// when there is a fast path for it (f32, a head dimension that is a multiple of 8, AVX2):
/// returns whether it computed them.
#[inline(always)]
fn key_dots<T: Float, C: KvElement<T>>(q: &[T], k: &[C], stride: usize, out: &mut [T]) -> bool {
    let d = q.len();
    #[cfg(target_arch = "x86_64")]
    if let (Some(q), Some(lanes), Some(out)) = (as_f32(q), C::lanes(k), as_f32_mut(out)) {
        if d.is_multiple_of(8) && (out.is_empty() || (out.len() - 1) * stride + d <= k.len()) {
            let avx512 =
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512dq");
            match lanes {
                // SAFETY (each call): the features present; every key read is inside `k`.
                KvLanes::F32(k) if avx512 => unsafe { key_dots_avx512(q, k, stride, out) },
                KvLanes::Bf16(k) if avx512 => unsafe { key_dots_avx512(q, k, stride, out) },
                KvLanes::F32(k) if is_x86_feature_detected!("avx2") => unsafe {
                    key_dots_avx2(q, k, stride, out)
                },
                _ => return false,
            }
            return true;
        }
    }
    let _ = (d, q, k, stride, out);
    false
}

/// [`key_dots`] for f32: each key's eight accumulators by `matmul::dot_lane_pairs`, and
/// four keys' final sums `((l0+l4)+(l1+l5)) + ((l2+l6)+(l3+l7)) + 0` formed together with
/// horizontal adds (the same additions).
///
/// # Safety
/// AVX2 present; `q.len()` a multiple of 8; `k` holds `(out.len() - 1)·stride + q.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn key_dots_avx2(q: &[f32], k: &[f32], stride: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let d = q.len();
    // `[l0+l4, l1+l5, l2+l6, l3+l7]` of key `s`'s accumulators.
    let halves = |s: usize| dot_lane_pairs(q.as_ptr(), k.as_ptr().add(s * stride), d);
    let n4 = out.len() / 4 * 4;
    for s in (0..n4).step_by(4) {
        // hadd: [a0+a1, a2+a3] of each key, then their sum, then the empty tail's zero.
        let ab = _mm_hadd_ps(halves(s), halves(s + 1));
        let cd = _mm_hadd_ps(halves(s + 2), halves(s + 3));
        let sums = _mm_add_ps(_mm_hadd_ps(ab, cd), _mm_setzero_ps());
        _mm_storeu_ps(out.as_mut_ptr().add(s), sums);
    }
    for (s, o) in out.iter_mut().enumerate().skip(n4) {
        *o = one_sum(halves(s));
    }
}

/// [`key_dots_avx2`] with two keys' eight accumulators in each AVX-512 register (key `s` in
/// the low eight lanes, `s + 1` in the high eight, the query's chunk in both), four keys per
/// pass: the same multiplies and adds per lane, folded to the same `[l0+l4, …, l3+l7]` and
/// summed by the same horizontal adds.
///
/// # Safety
/// AVX-512F/DQ present; `q.len()` a multiple of 8; `k` holds `(out.len() - 1)·stride + q.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn key_dots_avx512<L: Lane>(q: &[f32], k: &[L], stride: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let d = q.len();
    let n4 = out.len() / 4 * 4;
    let kp = |s: usize, i: usize| k.as_ptr().add(s * stride + i);
    let pair = |s: usize, i: usize| key_pair(kp(s, i), stride);
    for s in (0..n4).step_by(4) {
        let (mut a, mut b) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for i in (0..d).step_by(8) {
            let qv = _mm512_broadcast_f32x8(_mm256_loadu_ps(q.as_ptr().add(i)));
            a = _mm512_add_ps(a, _mm512_mul_ps(qv, pair(s, i)));
            b = _mm512_add_ps(b, _mm512_mul_ps(qv, pair(s + 2, i)));
        }
        _mm_storeu_ps(out.as_mut_ptr().add(s), four_sums(a, b));
    }
    for (s, o) in out.iter_mut().enumerate().skip(n4) {
        *o = one_sum(lane_pairs(q.as_ptr(), kp(s, 0), d));
    }
}

/// One key's dot from its `[l0+l4, l1+l5, l2+l6, l3+l7]`: `((p0+p1) + (p2+p3)) + 0` by
/// horizontal adds, as `matmul::dot` ends.
///
/// # Safety
/// AVX present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
unsafe fn one_sum(a: std::arch::x86_64::__m128) -> f32 {
    use std::arch::x86_64::*;
    let a = _mm_hadd_ps(a, a);
    _mm_cvtss_f32(_mm_add_ss(_mm_hadd_ps(a, a), _mm_setzero_ps()))
}

/// Eight values at `p` (of key `s`) and the eight `stride` later (key `s + 1`), side by side.
///
/// # Safety
/// AVX-512F/DQ present; both reads inside one allocation.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
#[inline]
unsafe fn key_pair<L: Lane>(p: *const L, stride: usize) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    match L::BF16 {
        // Both keys' sixteen bf16 side by side, widened at once.
        true => {
            let both = _mm256_inserti128_si256::<1>(
                _mm256_castsi128_si256(_mm_loadu_si128(p.cast())),
                _mm_loadu_si128(p.add(stride).cast()),
            );
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(both)))
        }
        false => _mm512_insertf32x8::<1>(_mm512_castps256_ps512(load8(p)), load8(p.add(stride))),
    }
}

/// `matmul::dot_lane_pairs` of `q` and a row of lanes: the same multiplies and adds.
///
/// # Safety
/// AVX-512F present; `d` (a multiple of 8) values readable at `q` and at `k`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn lane_pairs<L: Lane>(q: *const f32, k: *const L, d: usize) -> std::arch::x86_64::__m128 {
    use std::arch::x86_64::*;
    let mut acc = _mm256_setzero_ps();
    for i in (0..d).step_by(8) {
        acc = _mm256_add_ps(
            acc,
            _mm256_mul_ps(_mm256_loadu_ps(q.add(i)), load8(k.add(i))),
        );
    }
    _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc))
}

/// [`key_dots_avx512`] for `Q` queries over the same keys: each key pair's chunk is loaded
/// once for all of them; every query's dots are its own accumulators, folded and summed as
/// there (the same bits).
///
/// # Safety
/// AVX-512F/DQ present; each query's length `d` a multiple of 8; all `out`s of one length `n`,
/// with `k` holding `(n - 1)·stride + d`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn key_dots_avx512_nq<const Q: usize, L: Lane>(
    q: [&[f32]; Q],
    k: &[L],
    stride: usize,
    mut out: [&mut [f32]; Q],
) {
    use std::arch::x86_64::*;
    let (d, n) = (q[0].len(), out[0].len());
    let n4 = n / 4 * 4;
    let pair = |s: usize, i: usize| key_pair(k.as_ptr().add(s * stride + i), stride);
    for s in (0..n4).step_by(4) {
        // Past this call's keys too (the decode passes chunks of KEY_CHUNK keys, `k` running
        // on to the last key).
        let ahead = s + PREFETCH_KEYS;
        if (ahead + 3) * stride + d <= k.len() {
            for key in ahead..ahead + 4 {
                for i in (0..d).step_by(64 / size_of::<L>()) {
                    _mm_prefetch::<_MM_HINT_T1>(k.as_ptr().add(key * stride + i).cast());
                }
            }
        }
        let mut acc = [[_mm512_setzero_ps(); 2]; Q];
        for i in (0..d).step_by(8) {
            let (p0, p1) = (pair(s, i), pair(s + 2, i));
            for (a, qj) in acc.iter_mut().zip(&q) {
                let qv = _mm512_broadcast_f32x8(_mm256_loadu_ps(qj.as_ptr().add(i)));
                a[0] = _mm512_add_ps(a[0], _mm512_mul_ps(qv, p0));
                a[1] = _mm512_add_ps(a[1], _mm512_mul_ps(qv, p1));
            }
        }
        for (a, o) in acc.iter().zip(out.iter_mut()) {
            _mm_storeu_ps(o.as_mut_ptr().add(s), four_sums(a[0], a[1]));
        }
    }
    for (qj, o) in q.iter().zip(out.iter_mut()) {
        if n4 < n {
            key_dots_avx512(qj, &k[n4 * stride..], stride, &mut o[n4..]);
        }
    }
}

/// [`key_dots_avx512_nq`] for the first `tb` (1 to [`QB`]) of `q` and `out`.
///
/// # Safety
/// As [`key_dots_avx512_nq`] for those.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn key_dots_block<L: Lane>(
    tb: usize,
    q: [&[f32]; QB],
    k: &[L],
    stride: usize,
    out: [&mut [f32]; QB],
) {
    let [a, b, c, e] = out;
    match tb {
        4 => key_dots_avx512_nq(q, k, stride, [a, b, c, e]),
        3 => key_dots_avx512_nq([q[0], q[1], q[2]], k, stride, [a, b, c]),
        2 => key_dots_avx512_nq([q[0], q[1]], k, stride, [a, b]),
        _ => key_dots_avx512(q[0], k, stride, a),
    }
}

/// Keys per tile of [`PrefillKv::key_tiles`]: one f32 vector.
const TILE_KEYS: usize = 16;

/// Fewest queries of a call for which [`Heads::head_blocked`] makes a kv head's
/// [`PrefillKv`] (one pass over its keys and values, shared by its query heads) instead of
/// reading every key and value row from the cache as stored.
const PREFILL_KV_MIN_QUERIES: usize = 16;

/// One kv head's keys and values as a prefill's blocked path reads them, the same values in
/// another layout (so the same bits out). Made once per kv head per call and dropped with it
/// (`8·S·D` bytes at most: the keys and values in f32, far below the scores the memory
/// estimate counts). At 2048 tokens of the 0.5B shape in bf16 (2-core AMD EPYC,
/// `prefill_profile`), the key dots with the key rows as stored took 15% of the pass (a fold of
/// eight lanes per key and query), 8.6% from the tiles; the attention went from 2.53 to 2.0 s a
/// pass with the tiles and to 1.65-1.74 s with the values widened once.
struct PrefillKv {
    /// The keys transposed in tiles of [`TILE_KEYS`] keys, as f32 (bf16 widened exactly):
    /// dimension `i` of key `16t + j` at `(t·D + i)·16 + j`, so one vector holds one dimension
    /// of a tile's 16 keys ([`key_dots_tiles_nq`]). Only whole tiles: the keys past the last
    /// are read from the cache.
    key_tiles: Vec<f32>,
    /// Where the cache holds bf16 values: them widened to f32, `[S][D]`, so the weighted sums
    /// do not widen each row again for every block of queries. `None` for f32 values.
    values: Option<Vec<f32>>,
}

impl PrefillKv {
    /// From one kv head's keys and values `(k, v)` (from its first position, laid out as
    /// `layout`, head dimension `d`).
    fn new<L: Lane>((k, v): (&[L], &[L]), layout: KvLayout, d: usize) -> PrefillKv {
        let (s_len, stride) = (layout.keys, layout.row);
        let whole = s_len / TILE_KEYS * TILE_KEYS;
        let mut key_tiles = vec![0f32; whole * d];
        for (t, tile) in key_tiles.chunks_exact_mut(d * TILE_KEYS).enumerate() {
            for j in 0..TILE_KEYS {
                for (i, &x) in k[(t * TILE_KEYS + j) * stride..][..d].iter().enumerate() {
                    tile[i * TILE_KEYS + j] = x.widened();
                }
            }
        }
        let values = L::BF16.then(|| {
            (0..s_len)
                .flat_map(|s| v[s * stride..][..d].iter().map(|x| x.widened()))
                .collect()
        });
        PrefillKv { key_tiles, values }
    }
}

/// [`key_dots_tiles_nq`] for the first `tb` (1 to [`QB`]) of `q` and `out`, two queries at a
/// time (sixteen accumulators).
///
/// # Safety
/// As [`key_dots_tiles_nq`] for those.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn key_dots_tiled(
    tb: usize,
    q: [&[f32]; QB],
    tiles: &[f32],
    d: usize,
    out: [&mut [f32]; QB],
) {
    let [a, b, c, e] = out;
    match tb {
        4 => {
            key_dots_tiles_nq([q[0], q[1]], tiles, d, [a, b]);
            key_dots_tiles_nq([q[2], q[3]], tiles, d, [c, e]);
        }
        3 => {
            key_dots_tiles_nq([q[0], q[1]], tiles, d, [a, b]);
            key_dots_tiles_nq([q[2]], tiles, d, [c]);
        }
        2 => key_dots_tiles_nq([q[0], q[1]], tiles, d, [a, b]),
        _ => key_dots_tiles_nq([q[0]], tiles, d, [a]),
    }
}

/// The dots of `Q` queries (`d` values each) with the first `out[j].len()` keys (a multiple of
/// [`TILE_KEYS`]) from their [`PrefillKv::key_tiles`], by [`key_dots_avx512`]'s multiplies and adds in its
/// order: lane `l` of a key's sum runs over dimensions `l, l + 8, …`, then
/// `((l0+l4)+(l1+l5)) + ((l2+l6)+(l3+l7)) + 0`. Here each lane is a vector over a tile's 16
/// keys, so the final sums are vertical adds instead of shuffles (the same bits: unit-tested
/// against the general loops).
///
/// # Safety
/// AVX-512F present; `d` a multiple of 8; `tiles` holds the tiles of every key summed.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn key_dots_tiles_nq<const Q: usize>(
    q: [&[f32]; Q],
    tiles: &[f32],
    d: usize,
    mut out: [&mut [f32]; Q],
) {
    use std::arch::x86_64::*;
    let n = out[0].len();
    assert!(n.is_multiple_of(TILE_KEYS) && n * d <= tiles.len() && d.is_multiple_of(8));
    assert!(q.iter().all(|q| q.len() >= d) && out.iter().all(|o| o.len() == n));
    for t in 0..n / TILE_KEYS {
        let tile = tiles.as_ptr().add(t * d * TILE_KEYS);
        let mut acc = [[_mm512_setzero_ps(); 8]; Q];
        for i in (0..d).step_by(8) {
            for l in 0..8 {
                let keys = _mm512_loadu_ps(tile.add((i + l) * TILE_KEYS));
                for (a, qj) in acc.iter_mut().zip(&q) {
                    let qv = _mm512_set1_ps(*qj.get_unchecked(i + l));
                    a[l] = _mm512_add_ps(a[l], _mm512_mul_ps(qv, keys));
                }
            }
        }
        for (a, o) in acc.iter().zip(out.iter_mut()) {
            let s = _mm512_add_ps(
                _mm512_add_ps(_mm512_add_ps(a[0], a[4]), _mm512_add_ps(a[1], a[5])),
                _mm512_add_ps(_mm512_add_ps(a[2], a[6]), _mm512_add_ps(a[3], a[7])),
            );
            let s = _mm512_add_ps(s, _mm512_setzero_ps());
            _mm512_storeu_ps(o.as_mut_ptr().add(t * TILE_KEYS), s);
        }
    }
}

/// [`weighted_sum_nq`] for the first `tb` (1 to [`QB`]) of `o` and `p` (keys `0..common` shared,
/// then each query's own), head dimension `d` 64 or 128 (four queries' accumulators at 64, two
/// at 128).
///
/// # Safety
/// As [`weighted_sum_nq`] for those.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn weighted_sum_block<L: Lane>(
    tb: usize,
    d: usize,
    o: [&mut [f32]; QB],
    p: [&[f32]; QB],
    common: usize,
    v: &[L],
    stride: usize,
    resume: bool,
) {
    let [a, b, c, e] = o;
    let r = resume;
    match (d, tb) {
        (64, 4) => weighted_sum_nq::<4, 4, _>([a, b, c, e], p, common, v, stride, r),
        (64, 3) => weighted_sum_nq::<3, 4, _>([a, b, c], [p[0], p[1], p[2]], common, v, stride, r),
        (64, 2) => weighted_sum_nq::<2, 4, _>([a, b], [p[0], p[1]], common, v, stride, r),
        (64, _) => weighted_sum_nq::<1, 4, _>([a], [p[0]], common, v, stride, r),
        (_, 1) => weighted_sum_nq::<1, 8, _>([a], [p[0]], common, v, stride, r),
        (_, _) => {
            weighted_sum_nq::<2, 8, _>([a, b], [p[0], p[1]], common, v, stride, r);
            match tb {
                4 => weighted_sum_nq::<2, 8, _>([c, e], [p[2], p[3]], common, v, stride, r),
                3 => weighted_sum_nq::<1, 8, _>([c], [p[2]], common, v, stride, r),
                _ => {}
            }
        }
    }
}

/// The four dots of two key pairs' accumulators (`a`: keys `s`, `s + 1`; `b`: `s + 2`,
/// `s + 3`): each half folded to `[l0+l4, …, l3+l7]`, then
/// `((l0+l4)+(l1+l5)) + ((l2+l6)+(l3+l7)) + 0` by horizontal adds, as `matmul::dot` ends.
///
/// # Safety
/// AVX-512F/DQ present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
#[inline]
unsafe fn four_sums(
    a: std::arch::x86_64::__m512,
    b: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m128 {
    use std::arch::x86_64::*;
    let fold = |acc: __m512| {
        let v = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b00_00_10_00>(acc, acc),
            _mm512_shuffle_f32x4::<0b00_00_11_01>(acc, acc),
        );
        (_mm512_castps512_ps128(v), _mm512_extractf32x4_ps::<1>(v))
    };
    let ((h0, h1), (h2, h3)) = (fold(a), fold(b));
    let ab = _mm_hadd_ps(h0, h1);
    let cd = _mm_hadd_ps(h2, h3);
    _mm_add_ps(_mm_hadd_ps(ab, cd), _mm_setzero_ps())
}

/// [`weighted_sum`] for `Q` queries of `16·C` values each: keys `0..common` with every
/// query's accumulators in registers and each value row loaded once, then each query's own
/// keys after `common` (`p[j].len()` of them in all). Each query's sum runs over its keys in
/// order from zero, as [`weighted_sum`]'s (the same bits); with `resume` it goes on from the
/// partial sums in `o` (a later chunk of keys: `p` and `v` start at the chunk's first key).
///
/// # Safety
/// AVX-512F present; `o[j].len() == 16·C`; `p[j].len() ≥ common`; `v` holds
/// `(p[j].len() - 1)·stride + 16·C` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn weighted_sum_nq<const Q: usize, const C: usize, L: Lane>(
    o: [&mut [f32]; Q],
    p: [&[f32]; Q],
    common: usize,
    v: &[L],
    stride: usize,
    resume: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); C]; Q];
    if resume {
        for (a, oj) in acc.iter_mut().zip(&o) {
            for (c, a) in a.iter_mut().enumerate() {
                *a = _mm512_loadu_ps(oj.as_ptr().add(16 * c));
            }
        }
    }
    for s in 0..common {
        // Past this chunk's keys too (`v` runs on to the last key).
        if (s + PREFETCH_KEYS) * stride + 16 * C <= v.len() {
            let ahead = v.as_ptr().add((s + PREFETCH_KEYS) * stride);
            for c in (0..C).step_by(4 / size_of::<L>()) {
                _mm_prefetch::<_MM_HINT_T1>(ahead.add(16 * c).cast());
            }
        }
        let vr = v.as_ptr().add(s * stride);
        let vv: [__m512; C] = std::array::from_fn(|c| load16(vr.add(16 * c)));
        for (a, pj) in acc.iter_mut().zip(&p) {
            let ps = _mm512_set1_ps(pj[s]);
            for (a, &vc) in a.iter_mut().zip(&vv) {
                *a = _mm512_add_ps(*a, _mm512_mul_ps(ps, vc));
            }
        }
    }
    for ((a, pj), oj) in acc.iter_mut().zip(&p).zip(o) {
        for (s, &ps) in pj.iter().enumerate().skip(common) {
            let (ps, vr) = (_mm512_set1_ps(ps), v.as_ptr().add(s * stride));
            for (c, a) in a.iter_mut().enumerate() {
                *a = _mm512_add_ps(*a, _mm512_mul_ps(ps, load16(vr.add(16 * c))));
            }
        }
        for (c, a) in a.iter().enumerate() {
            _mm512_storeu_ps(oj.as_mut_ptr().add(16 * c), *a);
        }
    }
}

/// `o[i] = Σ_s p[s]·v[s·stride + i]` summed in `s` order from zero (`o[i] += p[s] * v[..]`,
/// each product rounded, then the sum): the values weighted by the probabilities. On f32 with
/// a head dimension of 64 or 128 and AVX-512, `o` stays in registers across the keys (the same
/// operations in the same order, so the same bits).
#[inline(always)]
fn weighted_sum<T: Float, C: KvElement<T>>(o: &mut [T], p: &[T], v: &[C], stride: usize) {
    let d = o.len();
    #[cfg(target_arch = "x86_64")]
    if let (Some(o), Some(p), Some(lanes)) = (as_f32_mut(o), as_f32(p), C::lanes(v)) {
        if (d == 64 || d == 128)
            && (p.is_empty() || (p.len() - 1) * stride + d <= v.len())
            && is_x86_feature_detected!("avx512f")
        {
            // SAFETY: AVX-512F present; every row read is inside `v`.
            unsafe {
                match (d, lanes) {
                    (64, KvLanes::F32(v)) => weighted_sum_avx512::<4, _>(o, p, v, stride),
                    (_, KvLanes::F32(v)) => weighted_sum_avx512::<8, _>(o, p, v, stride),
                    (64, KvLanes::Bf16(v)) => weighted_sum_avx512::<4, _>(o, p, v, stride),
                    (_, KvLanes::Bf16(v)) => weighted_sum_avx512::<8, _>(o, p, v, stride),
                }
            }
            return;
        }
    }
    o.fill(T::ZERO);
    for (s, &ps) in p.iter().enumerate() {
        let vr = &v[s * stride..s * stride + d];
        for (oi, &vi) in o.iter_mut().zip(vr) {
            *oi += ps * vi.value();
        }
    }
}

/// [`weighted_sum`] for `o` of `16·C` f32 in `C` registers.
///
/// # Safety
/// AVX-512F present; `o.len() == 16·C`; `v` holds `(p.len() - 1)·stride + 16·C` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn weighted_sum_avx512<const C: usize, L: Lane>(
    o: &mut [f32],
    p: &[f32],
    v: &[L],
    stride: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); C];
    for (s, &ps) in p.iter().enumerate() {
        let (ps, vr) = (_mm512_set1_ps(ps), v.as_ptr().add(s * stride));
        for (c, a) in acc.iter_mut().enumerate() {
            *a = _mm512_add_ps(*a, _mm512_mul_ps(ps, load16(vr.add(16 * c))));
        }
    }
    for (c, a) in acc.iter().enumerate() {
        _mm512_storeu_ps(o.as_mut_ptr().add(16 * c), *a);
    }
}

/// The softmax of one row of scores (keys `hidden` says are masked get 0) computed in bf16:
/// `s - max`, each exp, the sum and each quotient rounded to bf16 (the fault `softmax-bf16`).
fn softmax_in_bf16<T: Float>(row: &mut [T], max: T, hidden: impl Fn(usize) -> bool) {
    let mut sum = T::ZERO;
    for (s, r) in row.iter_mut().enumerate() {
        *r = if hidden(s) {
            T::ZERO
        } else {
            round_bf16(round_bf16(*r - max).exp())
        };
        sum += *r;
    }
    let sum = round_bf16(sum);
    for r in row.iter_mut() {
        *r = if sum > T::ZERO {
            round_bf16(*r / sum)
        } else {
            T::ZERO
        };
    }
}

/// Fewest queries in a call that runs on AMX tiles ([`Heads::on_amx`]).
const AMX_MIN_QUERIES: usize = 16;

/// Queries per block of [`Heads::head_amx`] (two 16-query tiles).
const AMX_QUERIES: usize = 32;

/// Queries blocked together over one pass of the keys and values.
const QB: usize = 4;

/// Where a prefill's attention may cut a head's queries into parts ([`query_parts`]): a
/// multiple of [`AMX_QUERIES`] and of [`QB`], so every block is one of the whole head's.
const QUERY_ALIGN: usize = 32;
const _: () = assert!(QUERY_ALIGN.is_multiple_of(AMX_QUERIES) && QUERY_ALIGN.is_multiple_of(QB));

/// Tasks per thread below which a prefill's attention cuts each head's queries into parts: a few
/// per thread, so that threads that finish early take the remaining ones.
const TASKS_PER_THREAD: usize = 3;

/// Keys per chunk of a decode step's grouped heads ([`Heads::group_blocked`]): 64 keys' rows
/// of one kv head (16 KiB at a head dimension of 64 in f32, 8 in bf16) stay in the first-level cache
/// while every block of heads passes over them.
const KEY_CHUNK: usize = 64;

/// Multiply-adds (heads x queries x keys x head_dim) below which heads run on one thread.
///
/// A decode step on a team (whose loops start in about a microsecond) was tried from 1 << 14
/// (the 0.5B shape parallel from 19 keys instead of 293): with the helper reading the next
/// weights ahead while the leader runs the heads alone ([`crate::team::read_ahead_while_idle`]),
/// the heads on one thread were the faster where the memory is fast, the slower where it is
/// slow. 2 cores of an AMD EPYC Zen 5, 2026-12-05, the two in turns from the same context:
/// 17-47 keys, serial 0.988× the step's time at ~62 GB/s (14 pairs), 1.007× at ~45 (6 pairs);
/// 200-230 keys, 0.992× and 1.027× (12 and 8 pairs).
const PARALLEL_MIN_WORK: usize = 1 << 18;

/// How many keys ahead the blocked sums over keys and values ([`key_dots_avx512_nq`],
/// [`weighted_sum_nq`]) ask for their rows (one cache line per prefetch), into L2. A decode step
/// reads the whole cache once (48 MB per step at 2048 tokens of the 0.5B shape in f32, 24 in
/// bf16), more than the hardware prefetcher kept up with when each kv head's rows were 256 bytes
/// of every 512 (the cache's layout then). Measured on a 2-core AMD EPYC
/// (2026-12-03, `bench_attention 2048 decode`, 24 layers' caches, alternating builds): no
/// prefetch 6.1-7.7 ms a step, 16 keys ahead into L1 5.5-6.4, into L2 5.0-5.9, 64 ahead into L2
/// 6.0-6.3; `lockstep bench --dtype bf16 --prompt-tokens 2048`: 31.1-31.5 tok/s without,
/// 32.6-34.3 with (three rounds each).
const PREFETCH_KEYS: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    /// Several rows at once ([`probabilities_rows`], sixteen rows per pass on AVX-512) give
    /// each row's [`probabilities`] bits, f32 and bf16: row counts across the sixteen-row
    /// groups, visible lengths around the sixteen-key steps (none, one, a row's whole stride),
    /// scores large enough to overflow without the maximum, a NaN, an infinity, and
    /// different lengths in one group (a key past a row's own adds nothing to its sum).
    #[test]
    fn rows_at_once_are_each_rows_bits() {
        fn check<T: Float>() {
            let stride = 70;
            for n in [1, 5, 16, 17, 32, 33] {
                let vis: Vec<usize> = (0..n)
                    .map(|j| [0, 1, 15, 16, 17, 33, 64, 70][j % 8])
                    .collect();
                let mut rows: Vec<T> = (0..n * stride)
                    .map(|i| {
                        let h = (i as u32).wrapping_mul(0x9E37_79B9).rotate_left(7);
                        T::from_f64((h as f64 / u32::MAX as f64 - 0.5) * 180.0)
                    })
                    .collect();
                if n > 4 {
                    rows[3 * stride + 20] = T::from_f64(f64::NAN);
                    rows[4 * stride + 5] = T::from_f64(f64::INFINITY);
                }
                let scale = T::from_f64(0.125).to_act_dtype();
                let mut want = rows.clone();
                for (row, &v) in want.chunks_exact_mut(stride).zip(&vis) {
                    probabilities(row, v, scale);
                }
                probabilities_rows(&mut rows, stride, &vis, scale);
                for (i, (a, b)) in rows.iter().zip(&want).enumerate() {
                    assert_eq!(
                        a.to_f64().to_bits(),
                        b.to_f64().to_bits(),
                        "{:?} n={n} row {} key {}",
                        T::PRECISION,
                        i / stride,
                        i % stride
                    );
                }
            }
        }
        check::<f32>();
        check::<super::super::Bf16>();
    }

    #[test]
    fn single_key_returns_its_value_and_probs_sum_to_one() {
        let spec = AttentionSpec {
            heads: 2,
            kv_heads: 1,
            head_dim: 2,
            q_start: 0,
            causal: true,
            window: None,
            mapping: GqaMapping::Grouped,
            softmax_bf16: false,
        };
        // Two tokens; token 0 can only see key 0.
        let q = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 1.0, -1.0];
        let k = [1.0, 2.0, -1.0, 0.5];
        let v = [3.0, 4.0, -5.0, 6.0];
        let mut out = [0.0f64; 8];
        let mut probs = [0.0f64; 8];
        attention(&spec, &q, &k, &v, None, &mut out, Some(&mut probs));
        assert_eq!(&out[0..4], &[3.0, 4.0, 3.0, 4.0]);
        assert_eq!(probs[1], 0.0, "masked key must get probability 0");
        for r in probs.chunks(2) {
            assert!((r.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        }
        // Token 1, head 0: softmax over scaled scores, checked by hand.
        let sc = |a: f64| a / 2f64.sqrt();
        let (s0, s1) = (sc(0.5 * 1.0 + 0.5 * 2.0), sc(-0.5 + 0.5 * 0.5));
        let p0 = 1.0 / (1.0 + (s1 - s0).exp());
        assert!((out[4] - (p0 * 3.0 + (1.0 - p0) * -5.0)).abs() < 1e-14);
    }

    #[test]
    fn masked_keys_are_as_if_absent() {
        let spec = |q_start| AttentionSpec {
            heads: 2,
            kv_heads: 1,
            head_dim: 2,
            q_start,
            causal: true,
            window: None,
            mapping: GqaMapping::Grouped,
            softmax_bf16: false,
        };
        // Two real keys; the padded run puts two padding keys (garbage values) in front.
        let (k, v) = ([1.0, 2.0, -1.0, 0.5], [3.0, 4.0, -5.0, 6.0]);
        let (kp, vp) = (
            [9.0, 9.0, -7.0, 8.0, 1.0, 2.0, -1.0, 0.5],
            [50.0, 60.0, 70.0, 80.0, 3.0, 4.0, -5.0, 6.0],
        );
        let q = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 1.0, -1.0];
        let qp: Vec<f64> = [[0.3; 8].as_slice(), &q].concat();
        let mask = [false, false, true, true];
        let (mut out, mut outp) = ([0.0f64; 8], [0.0f64; 16]);
        let mut probsp = [0.0f64; 2 * 4 * 4];
        attention(&spec(0), &q, &k, &v, None, &mut out, None);
        attention(
            &spec(0),
            &qp,
            &kp,
            &vp,
            Some(&mask),
            &mut outp,
            Some(&mut probsp),
        );
        assert_eq!(&outp[8..], &out[..]);
        // Padding queries see nothing: zero output, zero probabilities.
        assert!(outp[..4].iter().all(|&x| x == 0.0));
        assert!(probsp[..4].iter().all(|&x| x == 0.0));
    }

    /// Plain causal GQA attention in f64, query by query; with a window, query `t` sees the keys
    /// `t - w < s <= t` (transformers' `kv_idx > q_idx - sliding_window`).
    fn naive(
        h: usize,
        kvh: usize,
        d: usize,
        window: Option<usize>,
        q: &[f64],
        k: &[f64],
        v: &[f64],
    ) -> Vec<f64> {
        let t_len = q.len() / (h * d);
        let mut out = vec![0.0; q.len()];
        for t in 0..t_len {
            for head in 0..h {
                let kv = head / (h / kvh);
                let qv = &q[(t * h + head) * d..][..d];
                let seen: Vec<usize> = (0..=t)
                    .filter(|&s| window.is_none_or(|w| s as i64 > t as i64 - w as i64))
                    .collect();
                let scores: Vec<f64> = seen
                    .iter()
                    .map(|&s| {
                        let kr = &k[(s * kvh + kv) * d..][..d];
                        qv.iter().zip(kr).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for (&s, w) in seen.iter().zip(&e) {
                    for i in 0..d {
                        out[(t * h + head) * d + i] += w / z * v[(s * kvh + kv) * d + i];
                    }
                }
            }
        }
        out
    }

    #[test]
    fn many_heads_in_parallel_match_the_plain_loop() {
        let (h, kvh, d, t) = (8, 2, 32, 48);
        assert!(
            h * t * t * d >= PARALLEL_MIN_WORK,
            "the case must take the parallel path"
        );
        let mut seed = 7u64;
        let mut rnd = |n: usize| -> Vec<f64> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5
                })
                .collect()
        };
        let (q, k, v) = (rnd(t * h * d), rnd(t * kvh * d), rnd(t * kvh * d));
        let spec = AttentionSpec {
            heads: h,
            kv_heads: kvh,
            head_dim: d,
            q_start: 0,
            causal: true,
            window: None,
            mapping: GqaMapping::Grouped,
            softmax_bf16: false,
        };
        let mut out = vec![0.0; q.len()];
        let mut probs = vec![0.0; h * t * t];
        attention(&spec, &q, &k, &v, None, &mut out, Some(&mut probs));
        let expected = naive(h, kvh, d, None, &q, &k, &v);
        for (a, b) in out.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-14, "{a} vs {b}");
        }
        let mut again = vec![0.0; q.len()];
        attention(&spec, &q, &k, &v, None, &mut again, None);
        assert_eq!(out, again, "with and without probabilities");
    }

    /// A bf16 prefill on AMX tiles (blocks of 32 queries, a tail of 6, keys after a cache or
    /// not, causal or not, head dimensions 64 and 128) is the AVX-512 path up to f32 summation
    /// order: every probability and output within a few bf16 roundings of it, the keys a query
    /// cannot see exactly zero, and the AMX path really taken.
    #[test]
    fn amx_prefill_is_the_blocked_path_up_to_summation_order() {
        use crate::kernels::matmul::Kernel;
        use crate::kernels::Bf16;
        if !Kernel::available().contains(&Kernel::Amx) {
            eprintln!("amx_prefill_is_the_blocked_path_up_to_summation_order: skipped, no AMX");
            return;
        }
        for (d, past, causal) in [(64, 0, true), (64, 5, true), (128, 3, true), (64, 0, false)] {
            let (h, kvh, t) = (4, 2, 70);
            let s_len = past + t;
            let mut seed = 3u64;
            let mut bf = |n: usize| -> Vec<Bf16> {
                random(n, &mut seed)
                    .iter()
                    .map(|&x| Bf16::from_f64(2.0 * x).to_act_dtype())
                    .collect()
            };
            let qkv = [bf(t * h * d), bf(s_len * kvh * d), bf(s_len * kvh * d)];
            let spec = prefill_spec(d, causal, past);
            let heads = |amx| prefill_heads(&spec, &qkv, t, None, amx);
            assert!(heads(true).on_amx() && !heads(false).on_amx());
            let what = format!("d={d} past={past} causal={causal}");
            for head in 0..h {
                let run = |amx| {
                    let (mut o, mut p) = (vec![Bf16(0.0); t * d], vec![Bf16(0.0); t * s_len]);
                    heads(amx).run(head, 0..t, &mut o, Some(&mut p));
                    (o, p)
                };
                let ((oa, pa), (ob, pb)) = (run(true), run(false));
                for (i, (a, b)) in pa.iter().zip(&pb).enumerate() {
                    let (tq, s) = (i / s_len, i % s_len);
                    if causal && s > past + tq {
                        assert!(a.0 == 0.0 && b.0 == 0.0, "{what}: hidden key {s} of {tq}");
                    }
                    // A score's bf16 rounding may flip (1/256 of it, scores here below 3).
                    let tol = a.0.abs().max(b.0.abs()) / 32.0;
                    assert!(
                        (a.0 - b.0).abs() <= tol,
                        "{what} p[{tq}][{s}]: {a:?} vs {b:?}"
                    );
                }
                for (i, (a, b)) in oa.iter().zip(&ob).enumerate() {
                    // Values below 1: the probabilities' differences, and one bf16 rounding.
                    let tol = 1.0 / 64.0 + a.0.abs().max(b.0.abs()) / 128.0;
                    assert!((a.0 - b.0).abs() <= tol, "{what} o[{i}]: {a:?} vs {b:?}");
                }
                assert!(oa.iter().all(|o| o.0.is_finite()), "{what}");
            }
        }
    }

    /// The whole-row passes taken when no key is hidden give the general per-key loop's bits
    /// (forced with an all-true key mask): outputs and probabilities, f32 and bf16, over rows
    /// long enough for the vector exp and maximum (with remainders), large scores included.
    #[test]
    fn unmasked_rows_are_the_general_loops_bits() {
        fn check<T: Float>(d: usize, causal: bool, past: usize) {
            let t = 70;
            let (spec, qkv) = prefill_case::<T>(d, t, causal, past, 11);
            let (h, s_len) = (spec.heads, past + t);
            // `Heads` directly: `attention` drops an all-true mask.
            let run = |key_mask: Option<&[bool]>| {
                let heads = prefill_heads(&spec, &qkv, t, key_mask, false);
                let mut out = vec![T::ZERO; h * t * d];
                let mut probs = vec![T::ZERO; h * t * s_len];
                for (head, (o, p)) in out
                    .chunks_mut(t * d)
                    .zip(probs.chunks_mut(t * s_len))
                    .enumerate()
                {
                    heads.run(head, 0..t, o, Some(p));
                }
                let bits = |x: Vec<T>| x.into_iter().map(|x| x.to_f64().to_bits()).collect();
                (bits(out), bits(probs))
            };
            let fast: (Vec<u64>, Vec<u64>) = run(None);
            let general = run(Some(&vec![true; s_len]));
            assert!(
                fast == general,
                "{:?} d={d} causal={causal} past={past}",
                T::PRECISION
            );
        }
        // Four-query blocks with a tail of two; head dimensions 64 and 128 (the blocked
        // paths), 32 (the per-query one); causal with and without past keys, and not causal.
        for (d, causal, past) in [
            (64, true, 0),
            (128, true, 0),
            (64, true, 5),
            (128, false, 3),
            (64, false, 0),
            (32, true, 2),
        ] {
            check::<f32>(d, causal, past);
            check::<crate::kernels::Bf16>(d, causal, past);
        }
    }

    /// A prefill's heads cut into parts of their queries ([`query_parts`], as many threads would
    /// cut them) give every query the bits of the whole head's run: outputs and
    /// probabilities, f32 and bf16, on the blocked path (head dimension 64), the per-query one
    /// (32) and, where the CPU has it, AMX; causal with and without past keys, and not causal.
    #[test]
    fn query_parts_are_the_whole_heads_bits() {
        fn check<T: Float>(d: usize, causal: bool, past: usize, amx: bool) {
            let t = 150;
            let (spec, qkv) = prefill_case::<T>(d, t, causal, past, 5);
            let (h, s_len) = (spec.heads, past + t);
            let heads = prefill_heads(&spec, &qkv, t, None, amx);
            let what = format!(
                "{:?} d={d} causal={causal} past={past} amx={amx}",
                T::PRECISION
            );
            let run = |parts: &[Range<usize>]| {
                let mut out = vec![T::ZERO; h * t * d];
                let mut probs = vec![T::ZERO; h * t * s_len];
                for_each_part(
                    &mut out,
                    d,
                    Some(&mut probs),
                    s_len,
                    t,
                    parts,
                    false,
                    |head, r, o, p| heads.run(head, r, o, p),
                );
                let bits = |x: Vec<T>| {
                    x.into_iter()
                        .map(|x| x.to_f64().to_bits())
                        .collect::<Vec<_>>()
                };
                (bits(out), bits(probs))
            };
            let whole = run(std::slice::from_ref(&(0..t)));
            let mut cut = false;
            for threads in [2, 8, 16, 64] {
                let parts = query_parts(&spec, t, threads);
                cut |= parts.len() > 1;
                assert!(run(&parts) == whole, "{what}, parts {parts:?}");
            }
            assert!(cut, "{what}: some thread count cuts the heads");
        }
        let amx = crate::kernels::matmul::Kernel::available()
            .contains(&crate::kernels::matmul::Kernel::Amx);
        for (d, causal, past) in [(64, true, 0), (64, true, 7), (64, false, 3), (32, true, 2)] {
            check::<f32>(d, causal, past, false);
            check::<crate::kernels::Bf16>(d, causal, past, false);
            if amx && d == 64 {
                check::<crate::kernels::Bf16>(d, causal, past, true);
            }
        }
    }

    /// A prefill of `t` queries for the bit-identity tests ([`prefill_spec`]), random queries,
    /// keys and values `[q, k, v]` (one in 13 large, up to 40).
    fn prefill_case<T: Float>(
        d: usize,
        t: usize,
        causal: bool,
        past: usize,
        mut seed: u64,
    ) -> (AttentionSpec, [Vec<T>; 3]) {
        let spec = prefill_spec(d, causal, past);
        let (h, kvh, s_len) = (spec.heads, spec.kv_heads, past + t);
        let mut v = |n: usize| mixed_in::<T>(n, &mut seed, 13, 40.0);
        let qkv = [v(t * h * d), v(s_len * kvh * d), v(s_len * kvh * d)];
        (spec, qkv)
    }

    /// 4 heads sharing 2 kv heads of dimension `d` (grouped), the queries after `past` keys.
    fn prefill_spec(d: usize, causal: bool, past: usize) -> AttentionSpec {
        AttentionSpec {
            heads: 4,
            kv_heads: 2,
            head_dim: d,
            q_start: past,
            causal,
            window: None,
            mapping: GqaMapping::Grouped,
            softmax_bf16: false,
        }
    }

    /// The [`Heads`] of a [`prefill_case`]: `t` queries over its keys and values laid out
    /// interleaved, with `key_mask`, AMX allowed where `amx`.
    fn prefill_heads<'a, T: Float>(
        spec: &'a AttentionSpec,
        [q, k, v]: &'a [Vec<T>; 3],
        t: usize,
        key_mask: Option<&'a [bool]>,
        amx: bool,
    ) -> Heads<'a, T, T> {
        let (kvh, d) = (spec.kv_heads, spec.head_dim);
        Heads {
            spec,
            q,
            k,
            v,
            layout: KvLayout::interleaved(spec.q_start + t, kvh, d),
            key_mask,
            t_len: t,
            scale: T::from_f64((d as f64).powf(-0.5)),
            amx,
            amx_kv: kv_slots(kvh),
            prefill_kv: kv_slots(kvh),
        }
    }

    /// The parts of a head's queries cover them in order, are cut at multiples of
    /// [`QUERY_ALIGN`], give each thread a few tasks, and hold about equal causal work.
    #[test]
    fn query_parts_cover_the_queries_in_aligned_parts_of_equal_work() {
        let spec = |heads, q_start, causal| AttentionSpec {
            heads,
            kv_heads: 2,
            head_dim: 64,
            q_start,
            causal,
            window: None,
            mapping: GqaMapping::Grouped,
            softmax_bf16: false,
        };
        // Enough heads for the threads: one part.
        let one = |t: usize| std::iter::once(0..t).collect::<Vec<_>>();
        assert_eq!(query_parts(&spec(14, 0, true), 2048, 2), one(2048));
        // Too few queries to cut.
        assert_eq!(query_parts(&spec(14, 0, true), 40, 16), one(40));
        for (q_start, causal) in [(0, true), (100, true), (0, false)] {
            let s = spec(14, q_start, causal);
            let parts = query_parts(&s, 2048, 16);
            assert_eq!(parts.len(), 4, "{parts:?}");
            assert_eq!(parts[0].start, 0);
            assert_eq!(parts.last().unwrap().end, 2048);
            for w in parts.windows(2) {
                assert_eq!(w[0].end, w[1].start);
                assert!(w[1].start.is_multiple_of(QUERY_ALIGN));
            }
            let work = |r: &Range<usize>| -> usize {
                r.clone()
                    .map(|t| if causal { q_start + t + 1 } else { 2048 })
                    .sum()
            };
            let (lo, hi) = (
                parts.iter().map(work).min().unwrap(),
                parts.iter().map(work).max().unwrap(),
            );
            // Each cut at most one block of 32 queries past its share: parts within two
            // blocks' work of each other.
            assert!(
                hi - lo <= 2 * 32 * (q_start + 2048),
                "{parts:?}: {lo}..{hi}"
            );
            if causal {
                assert!(parts[0].len() > parts[3].len(), "{parts:?}");
            }
        }
    }

    #[test]
    fn decode_tasks_give_every_thread_work_in_whole_divisors() {
        assert_eq!(decode_heads_per_task(7, 2, 2), 7);
        assert_eq!(decode_heads_per_task(7, 2, 16), 1);
        assert_eq!(decode_heads_per_task(8, 2, 4), 4);
        assert_eq!(decode_heads_per_task(8, 2, 8), 2);
        assert_eq!(decode_heads_per_task(8, 8, 16), 4);
        assert_eq!(decode_heads_per_task(6, 4, 1), 6);
    }

    /// A decode step (one query position) runs the heads that share a kv head together
    /// ([`Heads::group_blocked`]); each head's output and probabilities are the general per-key
    /// loop's bits (forced with an all-true key mask), f32 and bf16, for groups of 2 to 7
    /// heads (blocks of four and their tails), head dimensions 64 and 128, with and without
    /// past keys.
    #[test]
    fn decode_step_grouped_heads_are_the_general_loops_bits() {
        fn check<T: Float>(h: usize, kvh: usize, d: usize, past: usize) {
            let s_len = past + 1;
            let mut seed = 23u64;
            let v = |n: usize, seed: &mut u64| mixed_in::<T>(n, seed, 11, 30.0);
            let (q, k, vv) = (
                v(h * d, &mut seed),
                v(s_len * kvh * d, &mut seed),
                v(s_len * kvh * d, &mut seed),
            );
            let spec = AttentionSpec {
                heads: h,
                kv_heads: kvh,
                head_dim: d,
                q_start: past,
                causal: true,
                window: None,
                mapping: GqaMapping::Grouped,
                softmax_bf16: false,
            };
            let mut out = vec![T::ZERO; h * d];
            let mut probs = vec![T::ZERO; h * s_len];
            attention(&spec, &q, &k, &vv, None, &mut out, Some(&mut probs));
            let bits = |x: &[T]| x.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<_>>();
            // Each group split over tasks of any size that divides it: the same bits.
            let group = h / kvh;
            for sub in (1..=group).filter(|s| group.is_multiple_of(*s)) {
                let (mut o2, mut p2) = (vec![T::ZERO; h * d], vec![T::ZERO; h * s_len]);
                let layout = KvLayout::interleaved(s_len, kvh, d);
                let (k, v) = (&k[..], &vv[..]);
                attention_split(
                    &spec,
                    &q,
                    k,
                    v,
                    layout,
                    None,
                    &mut o2,
                    Some(&mut p2),
                    Some(sub),
                );
                let what = format!("{:?} h={h} kvh={kvh} d={d} past={past}", T::PRECISION);
                assert!(
                    bits(&o2) == bits(&out),
                    "{sub} heads a task: output, {what}"
                );
                assert!(
                    bits(&p2) == bits(&probs),
                    "{sub} heads a task: probabilities, {what}"
                );
            }
            let general = Heads {
                spec: &spec,
                q: &q,
                k: &k,
                v: &vv,
                layout: KvLayout::interleaved(s_len, kvh, d),
                key_mask: Some(&vec![true; s_len]),
                t_len: 1,
                scale: T::from_f64((d as f64).powf(-0.5)),
                amx: false,
                amx_kv: kv_slots(kvh),
                prefill_kv: kv_slots(kvh),
            };
            for head in 0..h {
                let mut o = vec![T::ZERO; d];
                let mut p = vec![T::ZERO; s_len];
                general.head(head, 0..1, &mut o, Some(&mut p));
                let what = format!(
                    "{:?} h={h} kvh={kvh} d={d} past={past} head {head}",
                    T::PRECISION
                );
                assert!(
                    bits(&o) == bits(&out[head * d..(head + 1) * d]),
                    "output, {what}"
                );
                assert!(
                    bits(&p) == bits(&probs[head * s_len..(head + 1) * s_len]),
                    "probabilities, {what}"
                );
            }
        }
        for (h, kvh) in [(14, 2), (8, 2), (6, 3), (12, 4), (10, 2)] {
            for d in [64, 128] {
                for past in [0, 6, 301] {
                    check::<f32>(h, kvh, d, past);
                    check::<crate::kernels::Bf16>(h, kvh, d, past);
                }
            }
        }
    }

    #[test]
    fn softmax_in_bf16_is_off_by_bf16_rounding_in_every_tier() {
        fn run<T: Float>(bf16: bool) -> (Vec<f64>, Vec<f64>) {
            let (h, kvh, d, t) = (2, 1, 8, 12);
            let mut seed = 5u64;
            let mut rnd = |n: usize| -> Vec<T> {
                (0..n)
                    .map(|_| {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                        T::from_f64(3.0 * ((seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5))
                            .to_act_dtype()
                    })
                    .collect()
            };
            let (q, k, v) = (rnd(t * h * d), rnd(t * kvh * d), rnd(t * kvh * d));
            let spec = AttentionSpec {
                heads: h,
                kv_heads: kvh,
                head_dim: d,
                q_start: 0,
                causal: true,
                window: None,
                mapping: GqaMapping::Grouped,
                softmax_bf16: bf16,
            };
            let mut out = vec![T::ZERO; q.len()];
            let mut probs = vec![T::ZERO; h * t * t];
            attention(&spec, &q, &k, &v, None, &mut out, Some(&mut probs));
            let f = |v: Vec<T>| v.into_iter().map(T::to_f64).collect();
            (f(probs), f(out))
        }
        fn check<T: Float>(tier: &str) {
            let (careful, _) = run::<T>(false);
            let (faulty, _) = run::<T>(true);
            assert_ne!(
                careful, faulty,
                "{tier}: the fault changes the probabilities"
            );
            for (c, f) in careful.iter().zip(&faulty) {
                assert_eq!(round_bf16(*f), *f, "{tier}: bf16 values");
                // Four roundings of at most 2^-8 relative each (plus the careful bf16 tier's one).
                assert!(
                    (f - c).abs() <= 5.0 * 2f64.powi(-8) * c.abs() + 1e-300,
                    "{tier}: {f} vs {c}"
                );
            }
        }
        check::<f64>("f64");
        check::<f32>("f32");
        check::<crate::kernels::Bf16>("bf16");
    }

    /// Keys and values held by head with room to spare (`[kv_heads][capacity][D]`, NaN in
    /// the spare rows, which nothing may read) give the bits of the same keys and values side
    /// by side, on every path: a decode step (grouped and round-robin heads, head dimensions
    /// 64, 128 and 40), a prefill, a key mask, a sliding window, the softmax in bf16, f32 and
    /// bf16, and bf16 values held as bf16 (a bf16 KV cache; the prefills on AMX where the CPU
    /// has it).
    #[test]
    fn keys_held_by_head_give_the_interleaved_bits() {
        fn check<T: Float, C: KvElement<T>>(seed: &mut u64) {
            for (h, kvh, d, t, s_len, window, masked, mapping) in [
                (14, 2, 64, 1, 300, None, false, GqaMapping::Grouped),
                (8, 2, 128, 1, 77, None, false, GqaMapping::Grouped),
                (6, 3, 40, 1, 50, None, false, GqaMapping::Grouped),
                (4, 2, 64, 1, 90, None, false, GqaMapping::RoundRobin),
                (4, 2, 64, 37, 37, None, false, GqaMapping::Grouped),
                (4, 2, 64, 5, 60, Some(16), false, GqaMapping::Grouped),
                (4, 1, 64, 1, 70, None, true, GqaMapping::Grouped),
                (4, 2, 128, 40, 50, None, false, GqaMapping::Grouped),
            ] {
                for softmax_bf16 in [false, true] {
                    let q: Vec<T> = mixed_in(t * h * d, seed, 13, 8.0);
                    let k: Vec<T> = mixed_in(s_len * kvh * d, seed, 11, 8.0);
                    let v: Vec<T> = mixed_in(s_len * kvh * d, seed, 7, 8.0);
                    let spec = AttentionSpec {
                        q_start: s_len - t,
                        window,
                        mapping,
                        softmax_bf16,
                        ..AttentionSpec::causal(h, kvh, d)
                    };
                    let mask: Vec<bool> = (0..s_len).map(|s| !masked || s % 5 != 2).collect();
                    let mask = masked.then_some(&mask[..]);
                    let (mut want, mut want_p) =
                        (vec![T::ZERO; t * h * d], vec![T::ZERO; h * t * s_len]);
                    attention(&spec, &q, &k, &v, mask, &mut want, Some(&mut want_p));
                    let cap = s_len + 9;
                    let by_head = |x: &[T]| {
                        let mut out = vec![C::hold(T::from_f64(f64::NAN)); kvh * cap * d];
                        for s in 0..s_len {
                            for kv in 0..kvh {
                                let to = &mut out[(kv * cap + s) * d..][..d];
                                for (o, &x) in to.iter_mut().zip(&x[(s * kvh + kv) * d..][..d]) {
                                    *o = C::hold(x);
                                }
                            }
                        }
                        out
                    };
                    let (kh, vh) = (by_head(&k), by_head(&v));
                    let layout = KvLayout::by_head(s_len, cap, d);
                    let (mut got, mut got_p) =
                        (vec![T::ZERO; t * h * d], vec![T::ZERO; h * t * s_len]);
                    attention_in(
                        &spec,
                        &q,
                        &kh,
                        &vh,
                        layout,
                        mask,
                        &mut got,
                        Some(&mut got_p),
                    );
                    let bits = |x: &[T]| x.iter().map(|v| v.to_f64().to_bits()).collect::<Vec<_>>();
                    let what = (h, kvh, d, t, s_len, window, masked, mapping, softmax_bf16);
                    assert_eq!(bits(&got), bits(&want), "outputs {what:?}");
                    assert_eq!(bits(&got_p), bits(&want_p), "probabilities {what:?}");
                    // Without probabilities stored (the decode's grouped path).
                    let mut plain = vec![T::ZERO; t * h * d];
                    attention_in(&spec, &q, &kh, &vh, layout, mask, &mut plain, None);
                    assert_eq!(
                        bits(&plain),
                        bits(&want),
                        "outputs, no probabilities {what:?}"
                    );
                }
            }
        }
        let mut seed = 41u64;
        check::<f32, f32>(&mut seed);
        check::<crate::Bf16, crate::Bf16>(&mut seed);
        check::<crate::Bf16, half::bf16>(&mut seed);
    }

    /// `n` f32 test values of mixed magnitude: every `every`-th a negative zero, the one after
    /// it scaled by `big`, the rest [`random`]'s.
    fn mixed(n: usize, seed: &mut u64, every: usize, big: f32) -> Vec<f32> {
        random(n, seed)
            .iter()
            .enumerate()
            .map(|(i, &x)| match i % every {
                0 => -0.0,
                1 => x as f32 * big,
                _ => x as f32,
            })
            .collect()
    }

    /// [`mixed`] as values of the activation dtype of `T`.
    fn mixed_in<T: Float>(n: usize, seed: &mut u64, every: usize, big: f32) -> Vec<T> {
        mixed(n, seed, every, big)
            .into_iter()
            .map(|x| T::from_f64(x as f64).to_act_dtype())
            .collect()
    }

    /// The weighted sum of values (registers on AVX-512 for head dimensions 64 and 128) is the
    /// plain loop bit for bit, for every head dimension, key count and stride, with signed
    /// zeros and values of mixed magnitude.
    #[test]
    fn weighted_sum_is_the_plain_loops_bits() {
        let mut seed = 5u64;
        for d in [16, 64, 100, 128] {
            for keys in [0, 1, 7, 300] {
                let stride = 2 * d;
                let p: Vec<f32> = random(keys, &mut seed).iter().map(|&x| x as f32).collect();
                let v = mixed(keys.max(1) * stride, &mut seed, 5, 1e5);
                let mut want = vec![0f32; d];
                for (s, &ps) in p.iter().enumerate() {
                    for (i, w) in want.iter_mut().enumerate() {
                        *w += ps * v[s * stride + i];
                    }
                }
                let mut got = vec![f32::NAN; d];
                weighted_sum(&mut got, &p, &v, stride);
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(g, w)| g.to_bits() == w.to_bits());
                assert!(same, "d {d} keys {keys}");
            }
        }
    }

    /// Every key's dot product at once (f32, AVX2) is `matmul::dot` per key bit for bit, for
    /// key counts around the groups of four, head dimensions of whole vectors, strides, and
    /// values of mixed magnitude with signed zeros.
    #[test]
    fn key_dots_are_each_keys_dot() {
        let mut seed = 9u64;
        for d in [8, 24, 64, 128] {
            for keys in [0, 1, 3, 4, 5, 9, 257] {
                let stride = 3 * d;
                let q: Vec<f32> = random(d, &mut seed).iter().map(|&x| x as f32).collect();
                let k = mixed(keys.max(1) * stride, &mut seed, 6, 1e6);
                let mut got = vec![f32::NAN; keys];
                if !key_dots(&q, &k, stride, &mut got) {
                    assert!(!is_x86_feature_detected!("avx2"), "AVX2 has the fast path");
                    continue;
                }
                // The AVX2 version too where the dispatch took the AVX-512 one.
                let mut avx2 = vec![f32::NAN; keys];
                // SAFETY: AVX2 present (the dispatch took a fast path); keys inside `k`.
                unsafe { key_dots_avx2(&q, &k, stride, &mut avx2) };
                for (s, (g, a)) in got.iter().zip(&avx2).enumerate() {
                    let want = crate::kernels::matmul::dot(&q, &k[s * stride..s * stride + d]);
                    assert_eq!(g.to_bits(), want.to_bits(), "d {d} keys {keys} key {s}");
                    assert_eq!(
                        a.to_bits(),
                        want.to_bits(),
                        "AVX2: d {d} keys {keys} key {s}"
                    );
                }
            }
        }
    }

    #[test]
    fn gqa_mapping() {
        let mut s = AttentionSpec {
            heads: 8,
            kv_heads: 2,
            head_dim: 4,
            q_start: 0,
            causal: true,
            window: None,
            mapping: GqaMapping::Grouped,
            softmax_bf16: false,
        };
        assert_eq!(
            (0..8).map(|h| s.kv_head(h)).collect::<Vec<_>>(),
            [0, 0, 0, 0, 1, 1, 1, 1]
        );
        s.mapping = GqaMapping::RoundRobin;
        assert_eq!(
            (0..8).map(|h| s.kv_head(h)).collect::<Vec<_>>(),
            [0, 1, 0, 1, 0, 1, 0, 1]
        );
    }

    fn random(n: usize, seed: &mut u64) -> Vec<f64> {
        (0..n)
            .map(|_| {
                *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                (*seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5
            })
            .collect()
    }

    #[test]
    fn sliding_window_sees_itself_and_the_keys_before_it() {
        let (h, kvh, d, t) = (4, 2, 8, 20);
        let mut seed = 3u64;
        let (q, k, v) = (
            random(t * h * d, &mut seed),
            random(t * kvh * d, &mut seed),
            random(t * kvh * d, &mut seed),
        );
        let spec = |window, q_start| AttentionSpec {
            heads: h,
            kv_heads: kvh,
            head_dim: d,
            q_start,
            causal: true,
            window,
            mapping: GqaMapping::Grouped,
            softmax_bf16: false,
        };
        let run = |window| {
            let mut out = vec![0.0; q.len()];
            let mut probs = vec![0.0; h * t * t];
            attention(
                &spec(window, 0),
                &q,
                &k,
                &v,
                None,
                &mut out,
                Some(&mut probs),
            );
            (out, probs)
        };
        for w in [1, 2, 5, 19, 20, 64] {
            let (out, probs) = run(Some(w));
            let expected = naive(h, kvh, d, Some(w), &q, &k, &v);
            for (a, b) in out.iter().zip(&expected) {
                assert!((a - b).abs() < 1e-14, "w={w}: {a} vs {b}");
            }
            // Exactly the keys t-w < s <= t carry probability.
            for head in 0..h {
                for qi in 0..t {
                    for s in 0..t {
                        let p = probs[(head * t + qi) * t + s];
                        let inside = s <= qi && s + w > qi;
                        assert_eq!(p > 0.0, inside, "w={w} q={qi} key={s}: {p}");
                    }
                }
            }
        }
        // A window as long as the sequence is no window at all; one key shorter is not.
        assert_eq!(run(Some(t)), run(None));
        assert_ne!(run(Some(t - 1)).0, run(None).0);
        // Window 1: each query sees only itself.
        let (out, _) = run(Some(1));
        for qi in 0..t {
            for head in 0..h {
                let kv = head / (h / kvh);
                assert_eq!(
                    out[(qi * h + head) * d..][..d],
                    v[(qi * kvh + kv) * d..][..d]
                );
            }
        }
        // Decode: the last queries alone over the whole cache give the same rows.
        let w = Some(6);
        let (full, _) = run(w);
        let start = 13;
        let mut tail = vec![0.0; (t - start) * h * d];
        attention(
            &spec(w, start),
            &q[start * h * d..],
            &k,
            &v,
            None,
            &mut tail,
            None,
        );
        assert_eq!(tail, full[start * h * d..]);
    }

    #[test]
    fn window_counts_left_padding_like_transformers_cache_indices() {
        // A row left-padded by `pad` keys sees the same real keys as the unpadded row: the
        // window slides over cache indices, and padding shifts queries and keys alike.
        let (h, kvh, d, t, pad, w) = (2, 1, 4, 9, 3, 4);
        let mut seed = 11u64;
        let (q, k, v) = (
            random(t * h * d, &mut seed),
            random(t * kvh * d, &mut seed),
            random(t * kvh * d, &mut seed),
        );
        let spec = AttentionSpec {
            heads: h,
            kv_heads: kvh,
            head_dim: d,
            q_start: 0,
            causal: true,
            window: Some(w),
            mapping: GqaMapping::Grouped,
            softmax_bf16: false,
        };
        let mut out = vec![0.0; q.len()];
        attention(&spec, &q, &k, &v, None, &mut out, None);
        let padded =
            |x: &[f64], width: usize| -> Vec<f64> { [vec![7.0; pad * width], x.to_vec()].concat() };
        let mask: Vec<bool> = (0..pad + t).map(|i| i >= pad).collect();
        let mut outp = vec![0.0; (pad + t) * h * d];
        attention(
            &spec,
            &padded(&q, h * d),
            &padded(&k, kvh * d),
            &padded(&v, kvh * d),
            Some(&mask),
            &mut outp,
            None,
        );
        assert_eq!(outp[pad * h * d..], out[..]);
    }
}
