//! The KV cache of one sequence and of a padded batch, and left-padding of prompts.

use crate::kernels::Float;

/// Keys and values of past positions, per layer, in the compute type.
#[derive(Debug, Clone)]
pub struct KvCache<T> {
    pub(crate) k: Vec<Vec<T>>,
    pub(crate) v: Vec<Vec<T>>,
    pub(crate) len: usize,
}

impl<T: Float> KvCache<T> {
    /// An empty cache for `layers` layers.
    pub fn new(layers: usize) -> Self {
        KvCache {
            k: vec![Vec::new(); layers],
            v: vec![Vec::new(); layers],
            len: 0,
        }
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
pub struct BatchKvCache<T> {
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
