//! The Qwen2 / Llama decoder, read top to bottom like the math of `modeling_qwen2.py`.
//!
//! ```text
//! x = embed(tokens)
//! for each layer:
//!     h = rms_norm(x) ; q, k, v = h·Wq + bq, h·Wk + bk, h·Wv + bv ; q, k = rope(q), rope(k)
//!     x = x + o_proj(attention(q, k, v))
//!     h = rms_norm(x) ; x = x + down(silu(gate(h)) * up(h))
//! logits = lm_head(rms_norm(x))
//! ```
//!
//! Weights stay memory-mapped in their stored dtype; the compute type `T` (f32 or f64) is chosen
//! per call. Intermediate tensors go to an [`Observer`] (a no-op unless tracing).

use crate::config::{Architecture, ModelConfig};
use crate::error::{EngineError, Result};
use crate::faults::Fault;
use crate::kernels::activation::silu_mul_in_place;
use crate::kernels::attention::{attention, AttentionSpec, GqaMapping};
use crate::kernels::matmul::linear;
use crate::kernels::norm::{rms_norm_with, RmsNormMath};
use crate::kernels::rope::{RopeLayout, RopeRounding, RopeTable};
use crate::kernels::{decode_vec, residual_add, Float, ResidualDtype};
use crate::observer::{Observer, TapView};
use crate::weights::{Checkpoint, Tensor};
use lockstep_trace::{LayerTap, TapName};
use std::path::Path;

/// Weights of one decoder layer.
#[derive(Debug)]
pub struct LayerWeights {
    /// `input_layernorm.weight`, [H].
    pub input_norm: Tensor,
    /// `self_attn.q_proj.weight`, [heads*D, H].
    pub q_proj: Tensor,
    /// `self_attn.k_proj.weight`, [kv_heads*D, H].
    pub k_proj: Tensor,
    /// `self_attn.v_proj.weight`, [kv_heads*D, H].
    pub v_proj: Tensor,
    /// q/k/v biases when the architecture has them.
    pub qkv_bias: Option<[Tensor; 3]>,
    /// `self_attn.o_proj.weight`, [H, heads*D].
    pub o_proj: Tensor,
    /// `post_attention_layernorm.weight`, [H].
    pub post_norm: Tensor,
    /// `mlp.gate_proj.weight`, [I, H].
    pub gate_proj: Tensor,
    /// `mlp.up_proj.weight`, [I, H].
    pub up_proj: Tensor,
    /// `mlp.down_proj.weight`, [H, I].
    pub down_proj: Tensor,
}

/// Numerical settings derived from the config (and, for fault injection, deliberately wrong).
#[derive(Debug, Clone)]
pub struct Settings {
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE pairing layout.
    pub rope_layout: RopeLayout,
    /// bf16 rounding in the RoPE table (careful: none beyond HF's).
    pub rope_rounding: RopeRounding,
    /// How RMSNorm computes its factor.
    pub norm_math: RmsNormMath,
    /// Attention softmax in bf16.
    pub softmax_bf16: bool,
    /// The dtype of the residual adds.
    pub residual: ResidualDtype,
    /// Query-to-kv head mapping.
    pub gqa: GqaMapping,
    /// Causal mask on.
    pub causal: bool,
    /// Apply the final norm.
    pub final_norm: bool,
}

/// A loaded model: config, memory-mapped weights and settings.
pub struct Model {
    /// The parsed config.json.
    pub config: ModelConfig,
    /// The checkpoint the weights live in.
    pub checkpoint: Checkpoint,
    /// `model.embed_tokens.weight`, [V, H].
    pub embed_tokens: Tensor,
    /// Decoder layers.
    pub layers: Vec<LayerWeights>,
    /// `model.norm.weight`, [H].
    pub norm: Tensor,
    /// The LM head, [V, H] (the embedding matrix when tied).
    pub lm_head: Tensor,
    /// Numerical settings.
    pub settings: Settings,
    /// The injected fault, if any.
    pub fault: Option<Fault>,
}

/// Which positions' logits a forward pass computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Every new position (traces, verification).
    All,
    /// Only the last new position (generation).
    Last,
}

/// Keys and values of past positions, per layer, in the compute type.
#[derive(Debug, Clone)]
pub struct KvCache<T> {
    k: Vec<Vec<T>>,
    v: Vec<Vec<T>>,
    len: usize,
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
    rows: Vec<KvCache<T>>,
    key_mask: Vec<Vec<bool>>,
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

impl Model {
    /// Loads config.json and the weights of a Hugging Face model folder.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_with_fault(dir, None)
    }

    /// Loads a model with a deliberate bug (for proving the verifier).
    pub fn load_with_fault(dir: &Path, fault: Option<Fault>) -> Result<Self> {
        // A .gguf file, or a folder holding one and no safetensors: config from its metadata.
        let (config, ck) = match crate::gguf::locate(dir)? {
            Some(file) => crate::gguf::load(&file)?,
            None => {
                if !dir.is_dir() {
                    return Err(EngineError::MissingFile {
                        path: dir.to_path_buf(),
                        what: "the model folder".into(),
                    });
                }
                let config = ModelConfig::from_file(&dir.join("config.json"))?;
                (config, Checkpoint::open(dir)?)
            }
        };
        let c = &config;
        let (h, d, i) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let (qd, kvd) = (c.num_heads * d, c.num_kv_heads * d);
        let embed_tokens = ck.get("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let mut layers = Vec::new();
        for l in 0..c.num_layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            let qkv_bias = if c.qkv_bias && fault != Some(Fault::NoQkvBias) {
                Some([
                    ck.get(&p("self_attn.q_proj.bias"), &[qd])?,
                    ck.get(&p("self_attn.k_proj.bias"), &[kvd])?,
                    ck.get(&p("self_attn.v_proj.bias"), &[kvd])?,
                ])
            } else {
                None
            };
            layers.push(LayerWeights {
                input_norm: ck.get(&p("input_layernorm.weight"), &[h])?,
                q_proj: ck.get(&p("self_attn.q_proj.weight"), &[qd, h])?,
                k_proj: ck.get(&p("self_attn.k_proj.weight"), &[kvd, h])?,
                v_proj: ck.get(&p("self_attn.v_proj.weight"), &[kvd, h])?,
                qkv_bias,
                o_proj: ck.get(&p("self_attn.o_proj.weight"), &[h, qd])?,
                post_norm: ck.get(&p("post_attention_layernorm.weight"), &[h])?,
                gate_proj: ck.get(&p("mlp.gate_proj.weight"), &[i, h])?,
                up_proj: ck.get(&p("mlp.up_proj.weight"), &[i, h])?,
                down_proj: ck.get(&p("mlp.down_proj.weight"), &[h, i])?,
            });
        }
        let norm = ck.get("model.norm.weight", &[h])?;
        let head_shape = [c.vocab_size, h];
        let lm_head = match (c.tie_word_embeddings, fault == Some(Fault::UntiedHead)) {
            (true, false) => embed_tokens.clone(),
            (false, false) => ck.get("lm_head.weight", &head_shape)?,
            // The fault: an untied model tied by mistake, or a tied model given another matrix.
            (false, true) => embed_tokens.clone(),
            (true, true) => layers
                .first()
                .map(|l| l.gate_proj.clone())
                .filter(|g| g.shape == head_shape)
                .or_else(|| ck.tensors.get("lm_head.weight").cloned())
                .ok_or_else(|| {
                    EngineError::Input(
                        "fault untied-head needs an untied checkpoint (this one ties lm_head to the embeddings)"
                            .into(),
                    )
                })?,
        };
        let settings = Settings {
            rms_norm_eps: match fault {
                Some(Fault::NormEps) => c.rms_norm_eps * 10.0,
                _ => c.rms_norm_eps,
            },
            rope_theta: match fault {
                Some(Fault::RopeTheta) if c.rope_theta == 10000.0 => 1e6,
                Some(Fault::RopeTheta) => 10000.0,
                _ => c.rope_theta,
            },
            rope_layout: match fault {
                Some(Fault::RopeInterleaved) => RopeLayout::Interleaved,
                _ => RopeLayout::RotateHalf,
            },
            rope_rounding: match fault {
                Some(Fault::Bf16Positions) => RopeRounding::Bf16Positions,
                Some(Fault::RopeBf16InvFreq) => RopeRounding::Bf16InvFreq,
                _ => RopeRounding::Careful,
            },
            norm_math: match fault {
                Some(Fault::NormVarianceBf16) => RmsNormMath::VarianceBf16,
                Some(Fault::NormEpsOutsideSqrt) => RmsNormMath::EpsOutsideSqrt,
                _ => RmsNormMath::Careful,
            },
            softmax_bf16: fault == Some(Fault::SoftmaxBf16),
            residual: match fault {
                Some(Fault::ResidualBf16) => ResidualDtype::Wrong,
                _ => ResidualDtype::Model,
            },
            gqa: match fault {
                Some(Fault::GqaOrder) => GqaMapping::RoundRobin,
                _ => GqaMapping::Grouped,
            },
            causal: fault != Some(Fault::CausalMaskOff),
            final_norm: fault != Some(Fault::NoFinalNorm),
        };
        Ok(Model {
            config,
            checkpoint: ck,
            embed_tokens,
            layers,
            norm,
            lm_head,
            settings,
            fault,
        })
    }

    /// The model family.
    pub fn architecture(&self) -> Architecture {
        self.config.arch
    }

    /// Checks token ids against the vocabulary and the context length.
    pub fn check_tokens(&self, tokens: &[u32], past: usize) -> Result<()> {
        if tokens.is_empty() {
            return Err(EngineError::Input("no input tokens".into()));
        }
        if let Some(&bad) = tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(EngineError::Input(format!(
                "token id {bad} is out of range (vocab_size is {})",
                self.config.vocab_size
            )));
        }
        let total = past + tokens.len();
        if total > self.config.max_position_embeddings {
            return Err(EngineError::Input(format!(
                "sequence of {total} tokens is longer than the model's context (max_position_embeddings = {})",
                self.config.max_position_embeddings
            )));
        }
        Ok(())
    }

    /// One forward pass over `tokens` following what `cache` holds; returns the logits of every
    /// new position, `[tokens.len()][vocab]`, and appends the new keys/values to the cache.
    pub fn forward<T: Float>(
        &self,
        tokens: &[u32],
        cache: &mut KvCache<T>,
        obs: &mut impl Observer<T>,
    ) -> Result<Vec<T>> {
        self.forward_logits(tokens, cache, obs, LogitsFor::All)
    }

    /// The logits of the last new position only, `[vocab]` (generation: prefill and decode).
    pub fn forward_last<T: Float>(&self, tokens: &[u32], cache: &mut KvCache<T>) -> Result<Vec<T>> {
        self.forward_logits(tokens, cache, &mut crate::NoObserver, LogitsFor::Last)
    }

    /// One forward pass, computing the logits of the positions `which` selects.
    pub fn forward_logits<T: Float>(
        &self,
        tokens: &[u32],
        cache: &mut KvCache<T>,
        obs: &mut impl Observer<T>,
        which: LogitsFor,
    ) -> Result<Vec<T>> {
        self.check_tokens(tokens, cache.len)?;
        let positions: Vec<usize> = (cache.len..cache.len + tokens.len()).collect();
        self.forward_rows(
            tokens,
            &positions,
            std::slice::from_mut(cache),
            None,
            obs,
            which,
        )
    }

    /// One forward pass over a batch of rows padded to one length: `tokens` and `mask` are
    /// `[rows][n]` (transformers' `input_ids` and `attention_mask`, padding on the left). Each
    /// row's positions count only its real tokens and its padding is hidden from attention, so
    /// each row computes what it would alone. Returns `[rows][n][vocab]` logits for
    /// [`LogitsFor::All`], `[rows][vocab]` for [`LogitsFor::Last`].
    pub fn forward_batch<T: Float>(
        &self,
        tokens: &[u32],
        mask: &[bool],
        cache: &mut BatchKvCache<T>,
        which: LogitsFor,
    ) -> Result<Vec<T>> {
        let rows = cache.rows.len();
        if rows == 0 || tokens.is_empty() || !tokens.len().is_multiple_of(rows) {
            return Err(EngineError::Input(format!(
                "a batch of {rows} rows needs a non-empty multiple of {rows} tokens, got {}",
                tokens.len()
            )));
        }
        if mask.len() != tokens.len() {
            return Err(EngineError::Input(format!(
                "attention mask has {} entries for {} tokens",
                mask.len(),
                tokens.len()
            )));
        }
        let n = tokens.len() / rows;
        for (b, row) in tokens.chunks(n).enumerate() {
            self.check_tokens(row, cache.rows[b].len)?;
        }
        let mut positions = Vec::with_capacity(tokens.len());
        for (seen, row_mask) in cache.key_mask.iter_mut().zip(mask.chunks(n)) {
            // transformers: position_ids = cumsum(attention_mask) - 1, padding set to 1.
            let mut real_before = seen.iter().filter(|&&x| x).count();
            for &m in row_mask {
                positions.push(if m { real_before } else { 1 });
                real_before += usize::from(m);
                seen.push(m);
            }
        }
        let BatchKvCache {
            rows: caches,
            key_mask,
        } = cache;
        self.forward_rows(
            tokens,
            &positions,
            caches,
            Some(key_mask),
            &mut crate::NoObserver,
            which,
        )
    }

    /// The forward pass proper: `caches.len()` rows of `n` new tokens each, run through every
    /// matmul together; attention per row over that row's cache (minus keys `key_masks` hides).
    pub(crate) fn forward_rows<T: Float>(
        &self,
        tokens: &[u32],
        positions: &[usize],
        caches: &mut [KvCache<T>],
        key_masks: Option<&[Vec<bool>]>,
        obs: &mut impl Observer<T>,
        which: LogitsFor,
    ) -> Result<Vec<T>> {
        let c = &self.config;
        let s = &self.settings;
        let rows = caches.len();
        let (n, h, d) = (tokens.len() / rows, c.hidden_size, c.head_dim);
        let (heads, kv_heads) = (c.num_heads, c.num_kv_heads);
        let tn = rows * n;
        let rope = RopeTable::<T>::at_positions(
            s.rope_theta,
            d,
            positions,
            s.rope_layout,
            s.rope_rounding,
        );
        obs.tap(TapName::Tokens, TapView::Tokens(tokens));

        // Embedding lookup.
        let mut x = vec![T::ZERO; tn * h];
        for (row, &t) in x.chunks_exact_mut(h).zip(tokens) {
            T::decode(
                self.embed_tokens.dtype,
                self.embed_tokens.row_bytes(t as usize),
                row,
            );
        }
        obs.tap(TapName::Embed, TapView::rows(&x, h));

        let mut normed = vec![T::ZERO; tn * h];
        for (l, w) in self.layers.iter().enumerate() {
            let tap = |t| TapName::Layer(l, t);

            // Self-attention block.
            let eps = s.rms_norm_eps;
            rms_norm_with(
                &x,
                &decode_vec(&w.input_norm),
                eps,
                s.norm_math,
                &mut normed,
            );
            obs.tap(tap(LayerTap::InputNorm), TapView::rows(&normed, h));

            let bias = w
                .qkv_bias
                .as_ref()
                .map(|b| b.each_ref().map(decode_vec::<T>));
            let mut q = vec![T::ZERO; tn * heads * d];
            let mut k = vec![T::ZERO; tn * kv_heads * d];
            let mut v = vec![T::ZERO; tn * kv_heads * d];
            linear(
                &normed,
                tn,
                &w.q_proj,
                bias.as_ref().map(|b| &b[0][..]),
                &mut q,
            );
            linear(
                &normed,
                tn,
                &w.k_proj,
                bias.as_ref().map(|b| &b[1][..]),
                &mut k,
            );
            linear(
                &normed,
                tn,
                &w.v_proj,
                bias.as_ref().map(|b| &b[2][..]),
                &mut v,
            );
            obs.tap(tap(LayerTap::Q), TapView::heads(&q, heads, d));
            obs.tap(tap(LayerTap::K), TapView::heads(&k, kv_heads, d));
            obs.tap(tap(LayerTap::V), TapView::heads(&v, kv_heads, d));

            rope.apply(&mut q, heads);
            rope.apply(&mut k, kv_heads);
            obs.tap(tap(LayerTap::QRope), TapView::heads(&q, heads, d));
            obs.tap(tap(LayerTap::KRope), TapView::heads(&k, kv_heads, d));

            let mut attn = vec![T::ZERO; tn * heads * d];
            let (qd, kvd) = (n * heads * d, n * kv_heads * d);
            for (b, cache) in caches.iter_mut().enumerate() {
                let past = cache.len;
                cache.k[l].extend_from_slice(&k[b * kvd..(b + 1) * kvd]);
                cache.v[l].extend_from_slice(&v[b * kvd..(b + 1) * kvd]);
                let keys = past + n;
                let spec = AttentionSpec {
                    heads,
                    kv_heads,
                    head_dim: d,
                    q_start: past,
                    causal: s.causal,
                    mapping: s.gqa,
                    softmax_bf16: s.softmax_bf16,
                };
                let mut probs = (rows == 1 && obs.wants_attention_probs())
                    .then(|| vec![T::ZERO; heads * n * keys]);
                attention(
                    &spec,
                    &q[b * qd..(b + 1) * qd],
                    &cache.k[l],
                    &cache.v[l],
                    key_masks.map(|m| &m[b][..]),
                    &mut attn[b * qd..(b + 1) * qd],
                    probs.as_deref_mut(),
                );
                if let Some(p) = &probs {
                    obs.tap(
                        tap(LayerTap::AttnProbs),
                        TapView::Probs {
                            data: p,
                            heads,
                            keys,
                        },
                    );
                }
            }
            obs.tap(tap(LayerTap::AttnOut), TapView::rows(&attn, heads * d));

            let mut o = vec![T::ZERO; tn * h];
            linear(&attn, tn, &w.o_proj, None, &mut o);
            obs.tap(tap(LayerTap::OProj), TapView::rows(&o, h));
            residual_add(&mut x, &o, s.residual);
            obs.tap(tap(LayerTap::ResidAttn), TapView::rows(&x, h));

            // MLP block.
            rms_norm_with(&x, &decode_vec(&w.post_norm), eps, s.norm_math, &mut normed);
            obs.tap(tap(LayerTap::PostNorm), TapView::rows(&normed, h));
            let inter = c.intermediate_size;
            let mut gate = vec![T::ZERO; tn * inter];
            let mut up = vec![T::ZERO; tn * inter];
            linear(&normed, tn, &w.gate_proj, None, &mut gate);
            linear(&normed, tn, &w.up_proj, None, &mut up);
            silu_mul_in_place(&mut gate, &up);
            obs.tap(tap(LayerTap::MlpAct), TapView::rows(&gate, inter));
            let mut mlp = vec![T::ZERO; tn * h];
            linear(&gate, tn, &w.down_proj, None, &mut mlp);
            obs.tap(tap(LayerTap::MlpOut), TapView::rows(&mlp, h));
            residual_add(&mut x, &mlp, s.residual);
            obs.tap(tap(LayerTap::Out), TapView::rows(&x, h));
        }
        for cache in caches.iter_mut() {
            cache.len += n;
        }

        if s.final_norm {
            let eps = s.rms_norm_eps;
            rms_norm_with(&x, &decode_vec(&self.norm), eps, s.norm_math, &mut normed);
        } else {
            normed.copy_from_slice(&x);
        }
        obs.tap(TapName::FinalNorm, TapView::rows(&normed, h));
        let picked: Vec<T>;
        let head_in = match which {
            LogitsFor::All => &normed[..],
            LogitsFor::Last if rows == 1 => &normed[(n - 1) * h..],
            LogitsFor::Last => {
                picked = normed
                    .chunks_exact(n * h)
                    .flat_map(|row| &row[(n - 1) * h..])
                    .copied()
                    .collect();
                &picked[..]
            }
        };
        let m = head_in.len() / h;
        let mut logits = vec![T::ZERO; m * c.vocab_size];
        linear(head_in, m, &self.lm_head, None, &mut logits);
        obs.tap(TapName::Logits, TapView::rows(&logits, c.vocab_size));
        Ok(logits)
    }
}
