//! The sparse MLP of Qwen3-MoE (`Qwen3MoeSparseMoeBlock` of `modeling_qwen3_moe.py`), read top
//! to bottom like transformers 5.24 computes it:
//!
//! ```text
//! h = rms_norm(x)
//! logits = h · W_router                        (model dtype)
//! probs = softmax(logits)                      (float32; float64 in the f64 tier)
//! weights, ids = topk(probs, k)                (descending)
//! if norm_topk_prob: weights /= sum(weights)   (float32 / float64)
//! weights = weights.to(model dtype)
//! out = 0
//! for each expert e with tokens routed to it, in ascending e:
//!     for those tokens only: out[t] += (down_e(silu(gate_e(h[t])) * up_e(h[t])) * weight[t, e])
//! x = x + out
//! ```
//!
//! Each expert runs only on the tokens routed to it (never a dense evaluation of every expert);
//! contributions are added in ascending expert order, each sum rounded to the model dtype as
//! `index_add_` does.

use super::{LayerWeights, Mlp, MlpWeights, Model};
use crate::config::MoeConfig;
use crate::error::Result;
use crate::kernels::activation::silu_mul_in_place;
use crate::kernels::matmul::{linear, PassKind};
use crate::kernels::norm::rms_norm_with;
use crate::kernels::{residual_add, Float, Precision};
use crate::observer::{Observer, TapView};
use crate::weights::{Checkpoint, Tensor};
use lockstep_trace::{LayerTap, TapName};

/// The weights of one layer's sparse MLP.
#[derive(Debug)]
pub struct MoeWeights {
    /// The router, `mlp.gate.weight`, [experts, H].
    pub router: Tensor,
    /// Per expert, `mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`.
    pub experts: Vec<MlpWeights>,
}

/// How the router turns its logits into the routing weights (deliberately wrong for faults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterMath {
    /// Renormalise the top-k probabilities to sum to 1 (`norm_topk_prob`).
    pub normalize: bool,
    /// Take the top-k of the logits and softmax over those k only (a porting mistake; the
    /// model's softmax is over every expert, before the top-k).
    pub softmax_after_topk: bool,
}

/// The router of one token: `ids` and `weights` of its top-k experts (descending), from `logits`
/// over every expert, computed in `R` (f32 as transformers' `softmax(dtype=torch.float)`, f64 in
/// the f64 tier). Ties keep the lower expert id first.
pub fn route<R: Float>(logits: &[R], k: usize, math: RouterMath) -> (Vec<u32>, Vec<R>) {
    let softmax = |v: &[R]| -> Vec<R> {
        let max = v.iter().copied().fold(R::NEG_INFINITY, |m, x| {
            if x > m || x.to_f64().is_nan() {
                x
            } else {
                m
            }
        });
        let e: Vec<R> = v.iter().map(|&x| (x - max).exp()).collect();
        let mut sum = R::ZERO;
        for &x in &e {
            sum += x;
        }
        e.into_iter().map(|x| x / sum).collect()
    };
    let top = |v: &[R]| -> Vec<u32> {
        let mut idx: Vec<u32> = (0..v.len() as u32).collect();
        // Descending; NaN counts as largest, as in torch.topk; stable, so ties keep id order.
        idx.sort_by(|&a, &b| v[b as usize].to_f64().total_cmp(&v[a as usize].to_f64()));
        idx.truncate(k);
        idx
    };
    let (ids, mut weights) = if math.softmax_after_topk {
        let ids = top(logits);
        let picked: Vec<R> = ids.iter().map(|&i| logits[i as usize]).collect();
        (ids, softmax(&picked))
    } else {
        let probs = softmax(logits);
        let ids = top(&probs);
        let w = ids.iter().map(|&i| probs[i as usize]).collect();
        (ids, w)
    };
    if math.normalize {
        let mut sum = R::ZERO;
        for &w in &weights {
            sum += w;
        }
        for w in &mut weights {
            *w = *w / sum;
        }
    }
    (ids, weights)
}

/// The experts of one sparse layer (`p` is its `model.layers.{l}.mlp.` prefix): stored per expert
/// (`experts.{e}.gate_proj.weight`, ..., as transformers 5.24 saves them), or fused
/// (`experts.gate_up_proj` [E, 2I, H] with gate rows first, `experts.down_proj` [E, H, I], the
/// module's own parameters), viewed per expert without copying.
pub(crate) fn load_experts(
    ck: &Checkpoint,
    p: &str,
    m: &MoeConfig,
    h: usize,
) -> Result<Vec<MlpWeights>> {
    let (e, mi) = (m.num_experts, m.moe_intermediate_size);
    let fused = format!("{p}experts.gate_up_proj");
    if ck.contains(&fused) && !ck.contains(&format!("{p}experts.0.gate_proj.weight")) {
        let gate_up = ck.get(&fused, &[e, 2 * mi, h])?;
        let down = ck.get(&format!("{p}experts.down_proj"), &[e, h, mi])?;
        let view = |t: &Tensor, first: usize, rows: usize, cols: usize| {
            t.matrix_view(first, rows, cols)
                .expect("a view inside a tensor of the checked shape")
        };
        return Ok((0..e)
            .map(|x| MlpWeights {
                gate_proj: view(&gate_up, x * 2 * mi * h, mi, h),
                up_proj: view(&gate_up, x * 2 * mi * h + mi * h, mi, h),
                down_proj: view(&down, x * h * mi, h, mi),
            })
            .collect());
    }
    (0..e)
        .map(|x| {
            let q = |s: &str| format!("{p}experts.{x}.{s}.weight");
            Ok(MlpWeights {
                gate_proj: ck.get(&q("gate_proj"), &[mi, h])?,
                up_proj: ck.get(&q("up_proj"), &[mi, h])?,
                down_proj: ck.get(&q("down_proj"), &[h, mi])?,
            })
        })
        .collect()
}

impl Model {
    /// The MLP block of layer `l`: the dense MLP, or for a sparse layer of Qwen3-MoE the routed
    /// experts (`x = x + Σ_top-k weight_e · expert_e(h)`, `h = rms_norm(x)`), in a pass of kind
    /// `kind` (every expert's products on the same kernels, however many tokens it was routed).
    pub(crate) fn mlp_or_moe_block<T: Float>(
        &self,
        l: usize,
        w: &LayerWeights,
        kind: PassKind,
        x: &mut [T],
        buf: &mut super::blocks::Scratch<T>,
        obs: &mut impl Observer<T>,
    ) {
        let moe = match &w.mlp {
            Mlp::Dense(d) => return self.mlp_block(l, w, d, kind, x, buf, obs),
            Mlp::Sparse(m) => m,
        };
        let (c, s) = (&self.config, &self.settings);
        let h = c.hidden_size;
        let tap = |t| TapName::Layer(l, t);
        let tn = x.len() / h;
        let experts = moe.experts.len();
        let k = c.moe.as_ref().map_or(1, |m| m.top_k);

        let post_norm = w.post_norm.decoded::<T>();
        rms_norm_with(x, post_norm, s.rms_norm_eps, s.norm_math, &mut buf.normed);
        obs.tap(tap(LayerTap::PostNorm), TapView::rows(&buf.normed, h));

        let mut logits = vec![T::ZERO; tn * experts];
        linear(kind, &buf.normed, tn, &moe.router, None, &mut logits);
        obs.tap(tap(LayerTap::RouterLogits), TapView::rows(&logits, experts));

        let mut ids = Vec::with_capacity(tn * k);
        let mut weights = Vec::with_capacity(tn * k);
        for row in logits.chunks_exact(experts) {
            // transformers: softmax(router_logits, dtype=torch.float), float64 in the f64 tier.
            let (i, wt): (Vec<u32>, Vec<T>) = if T::PRECISION == Precision::F64 {
                let r: Vec<f64> = row.iter().map(|v| v.to_f64()).collect();
                let (i, w) = route(&r, k, s.router);
                (i, w.into_iter().map(T::from_f64).collect())
            } else {
                let r: Vec<f32> = row.iter().map(|v| v.to_f64() as f32).collect();
                let (i, w) = route(&r, k, s.router);
                // router_top_value.to(router_logits.dtype)
                let w = w.into_iter().map(|v| T::from_f64(v as f64).to_act_dtype());
                (i, w.collect())
            };
            ids.extend(i);
            weights.extend(wt);
        }
        obs.tap(
            tap(LayerTap::RouterTopkIds),
            TapView::Ids {
                data: &ids,
                cols: k,
            },
        );
        obs.tap(tap(LayerTap::RouterTopkWeights), TapView::rows(&weights, k));

        // Group the (token, slot) pairs by expert; run each expert on its tokens only.
        let mut routed: Vec<Vec<usize>> = vec![Vec::new(); experts];
        for (pair, &e) in ids.iter().enumerate() {
            routed[e as usize].push(pair);
        }
        let out = &mut buf.out;
        out.fill(T::ZERO);
        for (e, pairs) in routed.iter().enumerate().filter(|(_, p)| !p.is_empty()) {
            let ew = &moe.experts[e];
            let (m, inter) = (pairs.len(), ew.gate_proj.shape[0]);
            let mut xs = Vec::with_capacity(m * h);
            for &p in pairs {
                xs.extend_from_slice(&buf.normed[(p / k) * h..(p / k + 1) * h]);
            }
            let mut gate = vec![T::ZERO; m * inter];
            let mut up = vec![T::ZERO; m * inter];
            linear(kind, &xs, m, &ew.gate_proj, None, &mut gate);
            linear(kind, &xs, m, &ew.up_proj, None, &mut up);
            silu_mul_in_place(&mut gate, &up);
            linear(kind, &gate, m, &ew.down_proj, None, &mut xs);
            for (j, &p) in pairs.iter().enumerate() {
                let t = p / k;
                let wt = weights[p];
                let dst = &mut out[t * h..(t + 1) * h];
                for (o, &y) in dst.iter_mut().zip(&xs[j * h..(j + 1) * h]) {
                    *o = (*o + (y * wt).to_act_dtype()).to_act_dtype();
                }
            }
        }
        obs.tap(tap(LayerTap::MlpOut), TapView::rows(out, h));
        residual_add(x, out, s.residual);
        obs.tap(tap(LayerTap::Out), TapView::rows(x, h));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RIGHT: RouterMath = RouterMath {
        normalize: false,
        softmax_after_topk: false,
    };

    #[test]
    fn route_is_softmax_then_topk() {
        let logits = [0.5f64, 2.0, -1.0, 1.0];
        let z: f64 = logits.iter().map(|x| (x - 2.0f64).exp()).sum();
        let p = |i: usize| (logits[i] - 2.0).exp() / z;
        let (ids, w) = route(&logits, 2, RIGHT);
        assert_eq!(ids, [1, 3]);
        assert!((w[0] - p(1)).abs() < 1e-15 && (w[1] - p(3)).abs() < 1e-15);
        let norm = RouterMath {
            normalize: true,
            ..RIGHT
        };
        let (ids_n, wn) = route(&logits, 2, norm);
        assert_eq!(ids_n, ids);
        assert!((wn[0] - p(1) / (p(1) + p(3))).abs() < 1e-15);
        // Softmax over the top-k only: the normalised weights, whatever norm_topk_prob says.
        let after = RouterMath {
            softmax_after_topk: true,
            ..RIGHT
        };
        let (ids_a, wa) = route(&logits, 2, after);
        assert_eq!(ids_a, ids);
        assert!((wa[0] - wn[0]).abs() < 1e-15 && (wa[0] - w[0]).abs() > 0.1);
        // Ties keep the lower id first.
        assert_eq!(route(&[1.0f32, 3.0, 3.0, 0.0], 2, RIGHT).0, [1, 2]);
    }
}
