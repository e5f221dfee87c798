//! One decoder layer as `modeling_qwen2.py` writes it: the self-attention block and the MLP
//! block, each reading the residual stream `x` and adding its output back.
//!
//! ```text
//! h = rms_norm(x) ; q, k, v = h·Wq + bq, h·Wk + bk, h·Wv + bv ; q, k = rope(q), rope(k)
//! x = x + o_proj(attention(q, k, v))
//! h = rms_norm(x) ; x = x + down(silu(gate(h)) * up(h))
//! ```

use super::{KvCache, LayerWeights, MlpWeights, Model, QkNorm};
use crate::config::ModelConfig;
use crate::kernels::attention::{attention_in, AttentionSpec};
use crate::kernels::line_aligned::LineAligned;
use crate::kernels::matmul::{linear, linear_many, linear_swiglu, PassKind, Product};
use crate::kernels::norm::rms_norm_with;
use crate::kernels::rope::RopeTable;
use crate::kernels::{residual_add, Float};
use crate::observer::{Observer, TapView};
use lockstep_trace::{LayerTap, TapName};

/// The buffers of one forward pass, allocated once and reused by every layer, each starting a
/// cache line (the AMX matmul's stores then never straddle two).
pub(crate) struct Scratch<T> {
    /// The normed residual stream, `[tn][H]`.
    pub normed: LineAligned<T>,
    /// Queries, `[tn][heads][D]`.
    q: LineAligned<T>,
    /// Keys, `[tn][kv_heads][D]`.
    k: LineAligned<T>,
    /// Values, `[tn][kv_heads][D]`.
    v: LineAligned<T>,
    /// Attention output before `o_proj`, `[tn][heads*D]` (before that, the q/k norm's output).
    attn: LineAligned<T>,
    /// A block's output before the residual add, `[tn][H]`.
    pub out: LineAligned<T>,
    /// `act(gate) * up`, `[tn][I]` (see [`linear_swiglu`]).
    gate: LineAligned<T>,
    /// `up_proj` output where [`linear_swiglu`] writes it, `[tn][I]`.
    up: LineAligned<T>,
}

impl<T: Float> Scratch<T> {
    /// Buffers for `tn` tokens (all rows together) of a model shaped like `c`.
    pub fn new(c: &ModelConfig, tn: usize) -> Self {
        let (h, d, i) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let zeros = |len: usize| LineAligned::new(len, T::ZERO);
        Scratch {
            normed: zeros(tn * h),
            q: zeros(tn * c.num_heads * d),
            k: zeros(tn * c.num_kv_heads * d),
            v: zeros(tn * c.num_kv_heads * d),
            attn: zeros(tn * c.num_heads * d),
            out: zeros(tn * h),
            gate: zeros(tn * i),
            up: zeros(tn * i),
        }
    }
}

/// What every layer of one forward pass shares: the rows' caches and masks, and the RoPE table.
pub(crate) struct Pass<'a, T: Float> {
    /// One cache per row.
    pub caches: &'a mut [KvCache<T>],
    /// Per row, which cached positions attention may see (padding hidden); `None`: all.
    pub key_masks: Option<&'a [Vec<bool>]>,
    /// Per row, the left padding among its `n` new positions that is not computed (its keys
    /// and values cached as zeros); the rows' computed tokens follow one another in the
    /// buffers. `None`: every row computes all `n`.
    pub skipped: Option<&'a [usize]>,
    /// cos/sin at every new position.
    pub rope: &'a RopeTable<T>,
    /// New tokens per row.
    pub n: usize,
}

impl<T: Float> Pass<'_, T> {
    /// The kind of this pass, which chooses its products' kernels ([`PassKind::of`]).
    pub fn kind(&self) -> PassKind {
        PassKind::of(self.n)
    }
}

impl Model {
    /// The self-attention block of layer `l`: `x = x + o_proj(attention(rope(q), rope(k), v))`.
    pub(crate) fn attention_block<T: Float>(
        &self,
        l: usize,
        w: &LayerWeights,
        x: &mut [T],
        pass: &mut Pass<'_, T>,
        buf: &mut Scratch<T>,
        obs: &mut impl Observer<T>,
    ) {
        let (c, s) = (&self.config, &self.settings);
        let (h, d) = (c.hidden_size, c.head_dim);
        let (heads, kv_heads) = (c.num_heads, c.num_kv_heads);
        let tap = |t| TapName::Layer(l, t);
        let rows = pass.caches.len();
        let (n, tn) = (pass.n, x.len() / h);

        let input_norm = w.input_norm.decoded::<T>();
        rms_norm_with(x, input_norm, s.rms_norm_eps, s.norm_math, &mut buf.normed);
        obs.tap(tap(LayerTap::InputNorm), TapView::rows(&buf.normed, h));

        let bias = w
            .qkv_bias
            .as_ref()
            .map(|b| b.each_ref().map(|t| t.decoded::<T>()));
        let bias_of = |i: usize| bias.map(|b| b[i]);
        linear_many(
            pass.kind(),
            &buf.normed,
            tn,
            &mut [
                Product {
                    w: &w.q_proj,
                    bias: bias_of(0),
                    out: &mut buf.q,
                },
                Product {
                    w: &w.k_proj,
                    bias: bias_of(1),
                    out: &mut buf.k,
                },
                Product {
                    w: &w.v_proj,
                    bias: bias_of(2),
                    out: &mut buf.v,
                },
            ],
        );
        obs.tap(tap(LayerTap::Q), TapView::heads(&buf.q, heads, d));
        obs.tap(tap(LayerTap::K), TapView::heads(&buf.k, kv_heads, d));
        obs.tap(tap(LayerTap::V), TapView::heads(&buf.v, kv_heads, d));

        // Qwen3: RMSNorm over each head's D values of q and k, before RoPE.
        let qk_norm = w
            .qk_norm
            .as_ref()
            .map(|n| n.each_ref().map(|t| t.decoded::<T>()));
        if let Some([qn, kn]) = &qk_norm {
            if s.qk_norm == QkNorm::BeforeRope {
                self.head_norm(&mut buf.q, qn, &mut buf.attn);
                self.head_norm(&mut buf.k, kn, &mut buf.attn);
            }
            obs.tap(tap(LayerTap::QNorm), TapView::heads(&buf.q, heads, d));
            obs.tap(tap(LayerTap::KNorm), TapView::heads(&buf.k, kv_heads, d));
        }

        pass.rope.apply(&mut buf.q, heads);
        pass.rope.apply(&mut buf.k, kv_heads);
        if let (Some([qn, kn]), QkNorm::AfterRope) = (&qk_norm, s.qk_norm) {
            self.head_norm(&mut buf.q, qn, &mut buf.attn);
            self.head_norm(&mut buf.k, kn, &mut buf.attn);
        }
        obs.tap(tap(LayerTap::QRope), TapView::heads(&buf.q, heads, d));
        obs.tap(tap(LayerTap::KRope), TapView::heads(&buf.k, kv_heads, d));

        // Attention per row, over that row's cache with this step's keys and values appended
        // (zeros for skipped padding, which the key mask hides).
        let (qd, kvd) = (heads * d, kv_heads * d);
        let mut first = 0;
        for (b, cache) in pass.caches.iter_mut().enumerate() {
            let past = cache.len;
            let skip = pass.skipped.map_or(0, |p| p[b]);
            let own = first..first + n - skip;
            first = own.end;
            let own_kv = (
                &buf.k[own.start * kvd..own.end * kvd],
                &buf.v[own.start * kvd..own.end * kvd],
            );
            let layout = cache.append(l, skip, own_kv, kv_heads, d);
            let keys = past + n;
            debug_assert_eq!(layout.keys, keys);
            let spec = AttentionSpec {
                heads,
                kv_heads,
                head_dim: d,
                q_start: past + skip,
                causal: s.causal,
                window: s.windows[l],
                mapping: s.gqa,
                softmax_bf16: s.softmax_bf16,
            };
            let mut probs = (rows == 1 && obs.wants_attention_probs())
                .then(|| vec![T::ZERO; heads * own.len() * keys]);
            attention_in(
                &spec,
                &buf.q[own.start * qd..own.end * qd],
                &cache.k[l],
                &cache.v[l],
                layout,
                pass.key_masks.map(|m| &m[b][..]),
                &mut buf.attn[own.start * qd..own.end * qd],
                probs.as_deref_mut(),
            );
            if let Some(p) = &probs {
                let view = TapView::Probs {
                    data: p,
                    heads,
                    keys,
                };
                obs.tap(tap(LayerTap::AttnProbs), view);
            }
        }
        obs.tap(tap(LayerTap::AttnOut), TapView::rows(&buf.attn, heads * d));

        linear(pass.kind(), &buf.attn, tn, &w.o_proj, None, &mut buf.out);
        obs.tap(tap(LayerTap::OProj), TapView::rows(&buf.out, h));
        residual_add(x, &buf.out, s.residual);
        obs.tap(tap(LayerTap::ResidAttn), TapView::rows(x, h));
    }

    /// RMSNorm of every head vector (`weight.len()` = D values) of `x`, in place; `tmp` is
    /// scratch at least as long as `x`.
    fn head_norm<T: Float>(&self, x: &mut [T], weight: &[T], tmp: &mut [T]) {
        let s = &self.settings;
        let tmp = &mut tmp[..x.len()];
        rms_norm_with(x, weight, s.rms_norm_eps, s.norm_math, tmp);
        x.copy_from_slice(tmp);
    }

    /// The MLP block of layer `l`: `x = x + down(act(gate(h)) * up(h))`, `h = rms_norm(x)`, in
    /// a pass of kind `kind`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn mlp_block<T: Float>(
        &self,
        l: usize,
        w: &LayerWeights,
        mlp: &MlpWeights,
        kind: PassKind,
        x: &mut [T],
        buf: &mut Scratch<T>,
        obs: &mut impl Observer<T>,
    ) {
        let (c, s) = (&self.config, &self.settings);
        let (h, inter) = (c.hidden_size, c.intermediate_size);
        let tap = |t| TapName::Layer(l, t);
        let tn = x.len() / h;

        let post_norm = w.post_norm.decoded::<T>();
        rms_norm_with(x, post_norm, s.rms_norm_eps, s.norm_math, &mut buf.normed);
        obs.tap(tap(LayerTap::PostNorm), TapView::rows(&buf.normed, h));
        let (gate, up) = (&mlp.gate_proj, &mlp.up_proj);
        linear_swiglu(kind, &buf.normed, tn, gate, up, &mut buf.gate, &mut buf.up);
        obs.tap(tap(LayerTap::MlpAct), TapView::rows(&buf.gate, inter));
        linear(kind, &buf.gate, tn, &mlp.down_proj, None, &mut buf.out);
        obs.tap(tap(LayerTap::MlpOut), TapView::rows(&buf.out, h));
        residual_add(x, &buf.out, s.residual);
        obs.tap(tap(LayerTap::Out), TapView::rows(x, h));
    }
}
