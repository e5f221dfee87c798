//! Observers: how the forward pass exposes its intermediate tensors without being cluttered by
//! them. The model calls `obs.tap(name, view)` at each point of the trace table; [`NoObserver`]
//! makes every tap an empty inlined call, [`TraceRecorder`] copies them into a [`Trace`].

use crate::kernels::Float;
use lockstep_trace::{TapName, TensorData, Trace};

/// A borrowed view of one intermediate tensor, in the engine's internal layout.
#[derive(Debug, Clone, Copy)]
pub enum TapView<'a, T> {
    /// Token ids, `[T]`.
    Tokens(&'a [u32]),
    /// Row-major `[T][cols]` (hidden states, MLP activations, logits).
    Rows {
        /// The values.
        data: &'a [T],
        /// Columns per token.
        cols: usize,
    },
    /// Per-head projections in `[T][heads][D]`; traced as `[1, heads, T, D]`.
    Heads {
        /// The values.
        data: &'a [T],
        /// Number of heads.
        heads: usize,
        /// Head dimension.
        head_dim: usize,
    },
    /// Integer ids `[T][cols]` (the router's top-k experts); traced as `[1, T, cols]` int64.
    Ids {
        /// The ids.
        data: &'a [u32],
        /// Ids per token.
        cols: usize,
    },
    /// Attention probabilities `[heads][T][S]`; traced as `[1, heads, T, S]`.
    Probs {
        /// The values.
        data: &'a [T],
        /// Number of query heads.
        heads: usize,
        /// Number of keys.
        keys: usize,
    },
}

impl<'a, T> TapView<'a, T> {
    /// A `[T][cols]` view.
    pub fn rows(data: &'a [T], cols: usize) -> Self {
        TapView::Rows { data, cols }
    }

    /// A `[T][heads][head_dim]` view.
    pub fn heads(data: &'a [T], heads: usize, head_dim: usize) -> Self {
        TapView::Heads {
            data,
            heads,
            head_dim,
        }
    }
}

/// Receives the forward pass's intermediate tensors.
pub trait Observer<T: Float> {
    /// Called at each tap point of the trace table.
    fn tap(&mut self, name: TapName, view: TapView<'_, T>);
    /// Whether the attention probabilities should be materialized for [`Observer::tap`].
    fn wants_attention_probs(&self) -> bool {
        false
    }
}

/// The observer that observes nothing; every tap compiles away.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;

impl<T: Float> Observer<T> for NoObserver {
    #[inline(always)]
    fn tap(&mut self, _: TapName, _: TapView<'_, T>) {}
}

/// Records every tap into a [`Trace`] in the canonical `[B=1, ...]` shapes.
#[derive(Debug, Default)]
pub struct TraceRecorder {
    /// The trace collected so far.
    pub trace: Trace,
}

impl<T: Float> Observer<T> for TraceRecorder {
    fn tap(&mut self, name: TapName, view: TapView<'_, T>) {
        let (shape, data) = match view {
            TapView::Tokens(ids) => (
                vec![1, ids.len()],
                TensorData::I64(ids.iter().map(|&x| x as i64).collect()),
            ),
            TapView::Ids { data, cols } => (
                vec![1, data.len() / cols, cols],
                TensorData::I64(data.iter().map(|&x| x as i64).collect()),
            ),
            TapView::Rows { data, cols } => {
                (vec![1, data.len() / cols, cols], T::to_trace(data.to_vec()))
            }
            TapView::Heads {
                data,
                heads,
                head_dim,
            } => {
                let t = data.len() / (heads * head_dim);
                let mut v = Vec::with_capacity(data.len());
                for h in 0..heads {
                    for tok in 0..t {
                        let s = (tok * heads + h) * head_dim;
                        v.extend_from_slice(&data[s..s + head_dim]);
                    }
                }
                (vec![1, heads, t, head_dim], T::to_trace(v))
            }
            TapView::Probs { data, heads, keys } => (
                vec![1, heads, data.len() / (heads * keys), keys],
                T::to_trace(data.to_vec()),
            ),
        };
        self.trace
            .insert(name.to_string(), shape, data)
            .expect("tap views always fill their shape");
    }

    fn wants_attention_probs(&self) -> bool {
        true
    }
}
