//! The KV cache of one sequence and of a padded batch, and left-padding of prompts.

use crate::kernels::attention::{KvElement, KvLayout};
use crate::kernels::Float;

/// Keys and values of past positions, per layer, held as the compute type's [`Float::Kv`]: the
/// compute type itself, or in the bf16 tier the bf16 values alone (half the bytes of f32 for a
/// decode step to read; the same values, so the same bits).
///
/// Each layer's keys (and values) are held `[kv_heads][capacity][D]`
/// ([`KvLayout::by_head`]): each kv head's positions one after another, so that a decode step,
/// whose threads each take one kv head, reads a head's keys as one stream. Laid out as the
/// projections write them (`[S][kv_heads][D]`), a thread read 256 bytes of every 512 at the
/// 0.5B shape: `bench_attention 2048 decode` (24 layers' caches, 2-core AMD EPYC, 2026-12-03,
/// the machine busy with a test run, both layouts in turns) took 9.1 and 11.8 ms a step side by
/// side against 6.2 and 7.1 by head (one thread: 8.9 and 12.4 against 5.8 and 9.3). The bits
/// are the same (unit-tested).
#[derive(Debug, Clone)]
pub struct KvCache<T: Float> {
    pub(crate) k: Vec<Vec<T::Kv>>,
    pub(crate) v: Vec<Vec<T::Kv>>,
    /// Per layer, the positions its buffers have room for.
    capacity: Vec<usize>,
    pub(crate) len: usize,
}

/// Fewest positions a layer of a [`KvCache`] grows by when it is out of room.
const GROW_MIN: usize = 16;

impl<T: Float> KvCache<T> {
    /// An empty cache for `layers` layers.
    pub fn new(layers: usize) -> Self {
        KvCache {
            k: vec![Vec::new(); layers],
            v: vec![Vec::new(); layers],
            capacity: vec![0; layers],
            len: 0,
        }
    }

    /// Appends to layer `l`, after its [`KvCache::len`] positions, `skip` positions of zeros
    /// (padding, which a key mask hides) and then the positions of `k` and `v` (`[n][kv_heads]
    /// [D]`, as the projections write them); returns where the layer's keys and values now lie.
    /// A layer out of room grows by a quarter of its capacity, at least [`GROW_MIN`] positions
    /// (or to exactly what it needs the first time: a prompt without decode steps holds no
    /// spare room). Each move copies the layer once; a quarter more room makes that four
    /// positions copied per position appended, against the whole cache a decode step reads,
    /// and leaves at most a fifth of what it holds unused (doubling left up to half: 2048
    /// positions of room after a 2048-token prompt's first decode step, twice the cache the
    /// memory estimate counts).
    pub(crate) fn append(
        &mut self,
        l: usize,
        skip: usize,
        (k, v): (&[T], &[T]),
        kv_heads: usize,
        d: usize,
    ) -> KvLayout {
        let kvd = kv_heads * d;
        debug_assert!(k.len() == v.len() && k.len().is_multiple_of(kvd));
        let (past, own) = (self.len, k.len() / kvd);
        let keys = past + skip + own;
        let cap = self.capacity[l];
        if keys > cap {
            let grown = match cap {
                0 => keys,
                _ => keys.max(cap + (cap / 4).max(GROW_MIN)),
            };
            for buf in [&mut self.k[l], &mut self.v[l]] {
                let mut moved = vec![T::Kv::hold(T::ZERO); kv_heads * grown * d];
                for h in 0..kv_heads {
                    moved[h * grown * d..][..past * d]
                        .copy_from_slice(&buf[h * cap * d..][..past * d]);
                }
                *buf = moved;
            }
            self.capacity[l] = grown;
        }
        let cap = self.capacity[l];
        for (buf, new) in [(&mut self.k[l], k), (&mut self.v[l], v)] {
            for h in 0..kv_heads {
                let head = &mut buf[h * cap * d..][..keys * d];
                head[past * d..(past + skip) * d].fill(T::Kv::hold(T::ZERO));
                for (t, row) in new.chunks_exact(kvd).enumerate() {
                    let to = &mut head[(past + skip + t) * d..][..d];
                    for (o, &x) in to.iter_mut().zip(&row[h * d..][..d]) {
                        *o = T::Kv::hold(x);
                    }
                }
            }
        }
        KvLayout::by_head(keys, cap, d)
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Per-row caches of a padded batch, with each row's attention mask over every cached position.
#[derive(Debug, Clone)]
pub struct BatchKvCache<T: Float> {
    pub(crate) rows: Vec<KvCache<T>>,
    pub(crate) key_mask: Vec<Vec<bool>>,
}

impl<T: Float> BatchKvCache<T> {
    /// An empty cache for a batch of `rows` sequences.
    pub fn new(layers: usize, rows: usize) -> Self {
        BatchKvCache {
            rows: vec![KvCache::new(layers); rows],
            key_mask: vec![Vec::new(); rows],
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    /// Cached positions per row, padding included.
    pub fn len(&self) -> usize {
        self.rows.first().map_or(0, KvCache::len)
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps the rows whose `keep` entry is true (rows that finished generating leave the batch).
    pub fn keep_rows(&mut self, keep: &[bool]) {
        assert_eq!(keep.len(), self.rows.len(), "keep_rows: one flag per row");
        let mut flags = keep.iter();
        self.rows.retain(|_| *flags.next().unwrap());
        let mut flags = keep.iter();
        self.key_mask.retain(|_| *flags.next().unwrap());
    }
}

/// Prompts of different lengths, left-padded to one length as `transformers` pads for
/// generation: `tokens` and `mask` are `[rows][len]`, padding first (`pad_id`, mask false).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaddedBatch {
    /// Token ids, `[rows][len]`.
    pub tokens: Vec<u32>,
    /// The attention mask: true for real tokens.
    pub mask: Vec<bool>,
    /// Number of rows.
    pub rows: usize,
    /// Padded length.
    pub len: usize,
}

impl PaddedBatch {
    /// Left-pads `prompts` with `pad_id` to the longest one's length.
    pub fn left_padded(prompts: &[Vec<u32>], pad_id: u32) -> Self {
        let len = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let mut tokens = Vec::with_capacity(prompts.len() * len);
        let mut mask = Vec::with_capacity(prompts.len() * len);
        for p in prompts {
            let pad = len - p.len();
            tokens.extend(std::iter::repeat_n(pad_id, pad).chain(p.iter().copied()));
            mask.extend(std::iter::repeat_n(false, pad).chain(std::iter::repeat_n(true, p.len())));
        }
        PaddedBatch {
            tokens,
            mask,
            rows: prompts.len(),
            len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A prompt's first append holds exactly its positions; decode steps then grow a layer by a
    /// quarter of its capacity (at least `GROW_MIN` positions), and every position's key and
    /// value stays where the returned layout says, across the moves.
    #[test]
    fn a_layer_grows_by_a_quarter_and_keeps_every_position() {
        let (kvh, d) = (2, 4);
        // Position t, kv head h, element i: t·16 + h·4 + i (exact in f32), values negated.
        let rows = |from: usize, n: usize| -> Vec<f32> {
            (from..from + n)
                .flat_map(|t| (0..kvh * d).map(move |j| (t * 16 + j) as f32))
                .collect()
        };
        let mut cache = KvCache::<f32>::new(1);
        let mut grew_to = vec![];
        let mut step = |cache: &mut KvCache<f32>, n: usize| {
            let k = rows(cache.len, n);
            let v: Vec<f32> = k.iter().map(|x| -x).collect();
            let before = cache.capacity[0];
            let layout = cache.append(0, 0, (&k, &v), kvh, d);
            cache.len += n;
            if cache.capacity[0] != before {
                grew_to.push(cache.capacity[0]);
            }
            layout
        };
        step(&mut cache, 1000);
        for _ in 0..1400 {
            step(&mut cache, 1);
        }
        let layout = step(&mut cache, 1);
        assert_eq!(grew_to, vec![1000, 1250, 1562, 1952, 2440]);
        // A small cache (a chat request's) grows by `GROW_MIN`.
        let mut small = KvCache::<f32>::new(1);
        let one = rows(0, 1);
        small.append(0, 0, (&rows(0, 17), &rows(0, 17)), kvh, d);
        small.len = 17;
        small.append(0, 0, (&one, &one), kvh, d);
        assert_eq!(small.capacity[0], 17 + GROW_MIN);
        assert_eq!(layout.keys, 2401);
        for t in 0..layout.keys {
            for h in 0..kvh {
                for i in 0..d {
                    let at = h * layout.head + t * layout.row + i;
                    let want = (t * 16 + h * d + i) as f32;
                    assert_eq!(
                        (cache.k[0][at], cache.v[0][at]),
                        (want, -want),
                        "{t} {h} {i}"
                    );
                }
            }
        }
    }
}
