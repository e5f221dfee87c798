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
    /// A layer out of room moves to twice its capacity (or exactly what it needs the first
    /// time: a prompt without decode steps holds no spare room).
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
            let grown = if cap == 0 { keys } else { keys.max(2 * cap) };
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
