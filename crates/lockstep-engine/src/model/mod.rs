//! The Qwen2 / Llama decoder, read top to bottom like the math of `modeling_qwen2.py`.
//!
//! ```text
//! x = embed(tokens)
//! for each layer:
//!     x = x + self_attention(rms_norm(x))      (blocks.rs)
//!     x = x + mlp(rms_norm(x))                 (blocks.rs)
//! logits = lm_head(rms_norm(x))
//! ```
//!
//! `load.rs` reads the checkpoint and the settings, `cache.rs` holds the KV cache.
//!
//! Weights stay memory-mapped in their stored dtype; the compute type `T` (f32 or f64) is chosen
//! per call. Intermediate tensors go to an [`Observer`] (a no-op unless tracing).

mod blocks;
mod cache;
mod load;
mod moe;

pub use cache::{BatchKvCache, KvCache, PaddedBatch};
pub use moe::{route, MoeWeights, RouterMath};

use crate::config::{Architecture, ModelConfig};
use crate::error::{EngineError, Result};
use crate::faults::Fault;
use crate::kernels::attention::GqaMapping;
use crate::kernels::matmul::linear;
use crate::kernels::norm::{rms_norm_with, RmsNormMath};
use crate::kernels::rope::{RopeLayout, RopeRounding, RopeScaling, RopeTable, ScalingMistake};
use crate::kernels::{Float, Precision, ResidualDtype};
use crate::observer::{Observer, TapView};
use crate::weights::{advise_all, Checkpoint, PageAdvice, Tensor};
use blocks::{Pass, Scratch};
use lockstep_trace::TapName;

/// Forward passes over at most this many tokens (all rows together: decode steps) run their
/// parallel loops on a spinning team ([`crate::team`]); longer ones on rayon's pool.
const TEAM_TOKENS: usize = 16;

/// A forward pass over at most this many tokens (a decode step of up to three sequences) in
/// bf16 or f32 compute reads the matrices coded in 12 bits per value ([`Model::code_bf16`]), so
/// it makes them.
const CODED_TOKENS: usize = crate::kernels::matmul::CODED_MAX_TOKENS;

/// Weights of one decoder layer.
#[derive(Debug)]
pub struct LayerWeights {
    /// `input_layernorm.weight`, \[H\].
    pub input_norm: Tensor,
    /// `self_attn.q_proj.weight`, [heads*D, H].
    pub q_proj: Tensor,
    /// `self_attn.k_proj.weight`, [kv_heads*D, H].
    pub k_proj: Tensor,
    /// `self_attn.v_proj.weight`, [kv_heads*D, H].
    pub v_proj: Tensor,
    /// q/k/v biases when the architecture has them.
    pub qkv_bias: Option<[Tensor; 3]>,
    /// `self_attn.q_norm.weight` and `self_attn.k_norm.weight`, \[D\] each (Qwen3).
    pub qk_norm: Option<[Tensor; 2]>,
    /// `self_attn.o_proj.weight`, [H, heads*D].
    pub o_proj: Tensor,
    /// `post_attention_layernorm.weight`, \[H\].
    pub post_norm: Tensor,
    /// The MLP: dense, or (Qwen3-MoE's sparse layers) routed experts.
    pub mlp: Mlp,
}

impl LayerWeights {
    /// Every matrix of the layer (attention, then the MLP's; for a sparse MLP the router and
    /// every expert's).
    pub fn linears(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj];
        match &self.mlp {
            Mlp::Dense(d) => v.extend(d.linears()),
            Mlp::Sparse(m) => {
                v.push(&m.router);
                v.extend(m.experts.iter().flat_map(MlpWeights::linears));
            }
        }
        v
    }

    /// [`Self::linears`], mutable (to mark them for a compute mode, [`Model::use_dtype`]).
    pub fn linears_mut(&mut self) -> Vec<&mut Tensor> {
        let mut v = vec![
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
        ];
        match &mut self.mlp {
            Mlp::Dense(d) => v.extend([&mut d.gate_proj, &mut d.up_proj, &mut d.down_proj]),
            Mlp::Sparse(m) => {
                v.push(&mut m.router);
                for e in &mut m.experts {
                    v.extend([&mut e.gate_proj, &mut e.up_proj, &mut e.down_proj]);
                }
            }
        }
        v
    }

    /// Every tensor of the layer: the matrices of [`Self::linears`], the norms and the biases
    /// (what streaming reads ahead and drops, [`Model::stream_layers`]).
    pub fn tensors(&self) -> Vec<&Tensor> {
        let mut v = self.linears();
        v.extend([&self.input_norm, &self.post_norm]);
        v.extend(self.qkv_bias.iter().flatten());
        v.extend(self.qk_norm.iter().flatten());
        v
    }
}

/// The MLP of one decoder layer.
#[derive(Debug)]
pub enum Mlp {
    /// `down(silu(gate(h)) * up(h))`.
    Dense(MlpWeights),
    /// Routed experts (Qwen3-MoE).
    Sparse(MoeWeights),
}

/// The three matrices of a SwiGLU MLP (the dense MLP, or one expert).
#[derive(Debug)]
pub struct MlpWeights {
    /// `gate_proj.weight`, [I, H].
    pub gate_proj: Tensor,
    /// `up_proj.weight`, [I, H].
    pub up_proj: Tensor,
    /// `down_proj.weight`, [H, I].
    pub down_proj: Tensor,
}

impl MlpWeights {
    /// gate, up, down.
    pub fn linears(&self) -> [&Tensor; 3] {
        [&self.gate_proj, &self.up_proj, &self.down_proj]
    }
}

/// Numerical settings derived from the config (and, for fault injection, deliberately wrong).
#[derive(Debug, Clone)]
pub struct Settings {
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// A deliberate mistake in the RoPE scaling (fault injection).
    pub rope_mistake: ScalingMistake,
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
    /// Per layer, the sliding attention window (`None`: full causal attention).
    pub windows: Vec<Option<usize>>,
    /// Apply the final norm.
    pub final_norm: bool,
    /// Where the per-head q/k RMSNorm goes (models that have one).
    pub qk_norm: QkNorm,
    /// How the MoE router computes its weights (models with experts).
    pub router: RouterMath,
}

/// Where the per-head q/k RMSNorm (Qwen3's `q_norm` / `k_norm`) is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    /// On the projections, before RoPE, as transformers does.
    BeforeRope,
    /// After RoPE (a porting mistake).
    AfterRope,
    /// Not at all (a porting mistake).
    Skipped,
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
    /// `model.norm.weight`, \[H\].
    pub norm: Tensor,
    /// The LM head, [V, H] (the embedding matrix when tied).
    pub lm_head: Tensor,
    /// Numerical settings.
    pub settings: Settings,
    /// The injected fault, if any.
    pub fault: Option<Fault>,
    /// Stream the decoder layers through the page cache: before layer `i` runs, read layer
    /// `i + 1`'s mapped weights ahead; after it, drop layer `i`'s pages from the mapping, so the
    /// process holds a few layers instead of the whole file. Chosen at load by
    /// [`crate::streaming::stream_layers`] (`LOCKSTEP_STREAM_LAYERS`); may be set by hand. Never
    /// changes a value.
    pub stream_layers: bool,
    /// Run short forward passes (decode steps, at most `TEAM_TOKENS` tokens) on a spinning
    /// team ([`crate::team`]). Chosen at load by [`crate::team::wanted`] (`LOCKSTEP_TEAM`); may
    /// be set by hand. Never changes a value.
    pub team: bool,
    /// Code the BF16 matrices in 12 bits per value ([`crate::weights::bf16_coded`]), which a
    /// decode step (at most `CODED_TOKENS` tokens) in bf16 or f32 compute then reads, 0.75 of
    /// the bytes: at [`Model::use_dtype`] for a dtype that computes so, else at the first such
    /// step. Chosen at load by [`crate::weights::bf16_coded::wanted`] (`LOCKSTEP_CODED_BF16`);
    /// may be set by hand. Never changes a value.
    pub code_bf16: bool,
    /// Code the BF16 matrices in 12 bits per value to replace them in memory, not to sit beside
    /// them: for a model whose coding fits in memory but not beside its mapped files
    /// (Qwen2.5-7B's 11.4 GB of codings beside its 15.2 GB of weights on a 23 GB machine). At
    /// the first bf16-compute use ([`Model::use_dtype`] for `bf16`, else the first bf16 forward
    /// pass) the matrices are coded a layer at a time, each layer's stored pages dropped from
    /// the mapping once coded ([`Tensor::replace_stored_by_coding`]); from then on every bf16
    /// product reads the coding, a prefill's too, and products in another compute type read
    /// the stored bytes back from the file. Chosen at load by
    /// [`crate::weights::bf16_coded::place`] (`LOCKSTEP_CODED_BF16`) where
    /// [`Model::code_bf16`] is not; may be set by hand (`lockstep verify`, which computes in
    /// several types, clears it). Never changes a value.
    pub code_bf16_instead: bool,
    /// Where [`Model::code_bf16_matrices_instead`] got the codings: read from the cache file,
    /// written to it, or coded in memory and why ([`crate::weights::coded_cache`]); unset before.
    pub coded_cache: std::sync::OnceLock<crate::weights::coded_cache::CacheUse>,
    /// Round the F32 matrices (each layer's, the LM head) to bf16 once, into copies that
    /// products in bf16 compute read ([`crate::weights::bf16_copy`]): at [`Model::use_dtype`]
    /// for `bf16`, else at the first bf16 forward pass; the copies are coded too where
    /// [`Model::code_bf16`] holds. Chosen at load by [`crate::weights::bf16_copy::wanted`]
    /// (`LOCKSTEP_BF16_COPY`); may be set by hand. Never changes a value.
    pub bf16_copy: bool,
}

/// Which positions' logits a forward pass computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Every new position (traces, verification).
    All,
    /// Only the last new position (generation).
    Last,
}

impl Model {
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
        if total > self.config.context_length() {
            return Err(EngineError::Input(format!(
                "sequence of {total} tokens is longer than the model's context (max_position_embeddings = {}{})",
                self.config.max_position_embeddings,
                match self.config.context_length() {
                    n if n != self.config.max_position_embeddings => format!(", {n} with dynamic RoPE"),
                    _ => String::new(),
                }
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
        // Left padding whose logits are not asked for is not computed: no real query ever sees
        // it (the key mask hides it) and its keys and values are cached as zeros. Only the real
        // tokens go through the matmuls: the verifier's batched generation at the 7B shape
        // (four prompts of 1 to 260 tokens) prefilled 1,040 positions for 302 tokens.
        let pads: Vec<usize> = mask
            .chunks(n)
            .map(|m| m.iter().take_while(|&&real| !real).count())
            .collect();
        let left_padded = mask
            .chunks(n)
            .zip(&pads)
            .all(|(m, &p)| p < n && m[p..].iter().all(|&real| real));
        let skip = which == LogitsFor::Last && left_padded && pads.iter().any(|&p| p > 0);
        let (tokens, positions) = match skip {
            false => (std::borrow::Cow::Borrowed(tokens), positions),
            true => {
                let (t, p): (Vec<u32>, Vec<usize>) = tokens
                    .iter()
                    .zip(positions)
                    .zip(mask)
                    .filter(|(_, &real)| real)
                    .map(|((&t, p), _)| (t, p))
                    .unzip();
                (std::borrow::Cow::Owned(t), p)
            }
        };
        self.forward_rows(
            &tokens,
            &positions,
            caches,
            Some(key_mask),
            skip.then_some(&pads[..]),
            &mut crate::NoObserver,
            which,
        )
    }

    /// The forward pass proper: `caches.len()` rows of `n` new positions each, run through
    /// every matmul together; attention per row over that row's cache (minus keys `key_masks`
    /// hides). With `skipped`, row `b`'s first `skipped[b]` new positions are left padding that
    /// is not computed (`tokens` and `positions` hold only the rest, row after row; their keys
    /// and values are cached as zeros, hidden by the key mask); only [`LogitsFor::Last`] then.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward_rows<T: Float>(
        &self,
        tokens: &[u32],
        positions: &[usize],
        caches: &mut [KvCache<T>],
        key_masks: Option<&[Vec<bool>]>,
        skipped: Option<&[usize]>,
        obs: &mut impl Observer<T>,
        which: LogitsFor,
    ) -> Result<Vec<T>> {
        if self.bf16_copy && T::PRECISION == Precision::BF16 {
            self.round_f32_matrices();
        }
        let reads_coding = matches!(T::PRECISION, Precision::BF16 | Precision::F32);
        if self.code_bf16 && reads_coding && tokens.len() <= CODED_TOKENS {
            self.code_bf16_matrices();
        }
        if self.code_bf16_instead && T::PRECISION == Precision::BF16 {
            self.code_bf16_matrices_instead();
        }
        // A decode step's loops are short: the pool's threads spin between them as a team.
        if self.team && tokens.len() <= TEAM_TOKENS {
            crate::team::lead(|| {
                self.forward_rows_here(tokens, positions, caches, key_masks, skipped, obs, which)
            })
        } else {
            self.forward_rows_here(tokens, positions, caches, key_masks, skipped, obs, which)
        }
    }

    /// Makes the 12-bit coding of every BF16 matrix a decode step reads (each layer's, the LM
    /// head) that does not have one yet ([`Tensor::code_bf16`]), the matrices in parallel and
    /// all in one region of 2 MiB pages ([`Tensor::code_bf16_together`]).
    pub fn code_bf16_matrices(&self) {
        // Every matrix is tried in the one call below, which returns when all are done: once
        // the LM head has been tried, so has every other (checked at each decode step, so no
        // list is built then).
        if self.lm_head.code_bf16_tried() {
            return;
        }
        let mut all: Vec<&Tensor> = self.layers.iter().flat_map(|l| l.linears()).collect();
        all.push(&self.lm_head);
        Tensor::code_bf16_together(&all);
    }

    /// [`Model::code_bf16_matrices`] for [`Model::code_bf16_instead`]: a layer at a time (each
    /// layer's codings in one region of 2 MiB pages), each layer's stored pages dropped from the
    /// mapping once it is coded ([`Tensor::replace_stored_by_coding`]), so the process holds
    /// one layer's stored bytes beside the codings, not the whole file; the next layer's pages
    /// are asked for from the file while one is coded. Then the LM head.
    ///
    /// The codings are kept in a file between runs ([`crate::weights::coded_cache`]): read from
    /// it where it exists, else coded and written to it; in memory only where no file can be
    /// used. [`Model::coded_cache`] says which.
    pub fn code_bf16_matrices_instead(&self) {
        if self.lm_head.code_bf16_tried() {
            return;
        }
        let mut groups: Vec<Vec<&Tensor>> = self.layers.iter().map(|l| l.linears()).collect();
        groups.push(vec![&self.lm_head]);
        let cached = match crate::weights::coded_cache::folder() {
            Some(folder) => {
                let ck = &self.checkpoint;
                crate::weights::coded_cache::codings(&folder, &ck.dir, &ck.files, &groups)
            }
            None => Err(format!(
                "{} is off, or there is no HOME to put a cache folder under",
                crate::weights::coded_cache::ENV
            )),
        };
        match cached {
            Ok((codings, how)) => {
                for (t, c) in groups.iter().flatten().zip(codings) {
                    t.set_coding(c);
                    t.replace_stored_by_coding();
                }
                let _ = self.coded_cache.set(how);
                return;
            }
            Err(why) => {
                let _ = (self.coded_cache).set(crate::weights::coded_cache::CacheUse::Skipped(why));
            }
        }
        let mut layers = self.layers.iter().peekable();
        while let Some(layer) = layers.next() {
            if let Some(next) = layers.peek() {
                crate::weights::advise_all(next.linears(), crate::weights::PageAdvice::WillNeed);
            }
            let matrices = layer.linears();
            Tensor::code_bf16_together(&matrices);
            for t in matrices {
                t.replace_stored_by_coding();
            }
        }
        Tensor::code_bf16_together(&[&self.lm_head]);
        self.lm_head.replace_stored_by_coding();
    }

    /// Makes the bf16 copy of every F32 matrix a forward pass reads (each layer's, the LM head)
    /// that has none yet ([`Tensor::round_to_bf16_together`]), all in one region of 2 MiB
    /// pages, and codes the copies for decode where [`Model::code_bf16`] holds.
    pub fn round_f32_matrices(&self) {
        // Every matrix is tried in the one call below: once the LM head has been, so has
        // every other (checked at each bf16 pass, so no list is built then).
        if self.lm_head.round_to_bf16_tried() {
            return;
        }
        let mut all: Vec<&Tensor> = self.layers.iter().flat_map(|l| l.linears()).collect();
        all.push(&self.lm_head);
        Tensor::round_to_bf16_together(&all);
        if self.code_bf16 {
            let copies: Vec<&Tensor> = all.iter().filter_map(|t| t.bf16_copy()).collect();
            Tensor::code_bf16_together(&copies);
        }
    }

    /// [`Model::forward_rows`] on this thread, its parallel loops on whatever team it leads.
    #[allow(clippy::too_many_arguments)]
    fn forward_rows_here<T: Float>(
        &self,
        tokens: &[u32],
        positions: &[usize],
        caches: &mut [KvCache<T>],
        key_masks: Option<&[Vec<bool>]>,
        skipped: Option<&[usize]>,
        obs: &mut impl Observer<T>,
        which: LogitsFor,
    ) -> Result<Vec<T>> {
        let (c, s) = (&self.config, &self.settings);
        let rows = caches.len();
        let skipped_total: usize = skipped.map_or(0, |p| p.iter().sum());
        let (n, h) = ((tokens.len() + skipped_total) / rows, c.hidden_size);
        assert!(skipped.is_none() || which == LogitsFor::Last);
        let rope = RopeTable::<T>::scaled(
            s.rope_theta,
            s.rope_scaling,
            s.rope_mistake,
            c.head_dim,
            positions,
            s.rope_layout,
            s.rope_rounding,
        );
        obs.tap(TapName::Tokens, TapView::Tokens(tokens));

        let mut x = vec![T::ZERO; tokens.len() * h];
        for (row, &t) in x.chunks_exact_mut(h).zip(tokens) {
            let e = &self.embed_tokens;
            T::decode(e.dtype, e.row_bytes(t as usize), row);
        }
        obs.tap(TapName::Embed, TapView::rows(&x, h));

        let mut buf = Scratch::new(c, tokens.len());
        let mut pass = Pass {
            caches,
            key_masks,
            skipped,
            rope: &rope,
            n,
        };
        let stream = |l: usize, advice| {
            if let Some(w) = self.layers.get(l).filter(|_| self.stream_layers) {
                advise_all(w.tensors(), advice);
            }
        };
        stream(0, PageAdvice::WillNeed);
        for (l, w) in self.layers.iter().enumerate() {
            stream(l + 1, PageAdvice::WillNeed);
            self.attention_block(l, w, &mut x, &mut pass, &mut buf, obs);
            self.mlp_or_moe_block(l, w, pass.kind(), &mut x, &mut buf, obs);
            stream(l, PageAdvice::DontNeed);
        }
        for cache in pass.caches.iter_mut() {
            cache.len += n;
        }

        let normed = &mut buf.normed;
        if s.final_norm {
            rms_norm_with(
                &x,
                self.norm.decoded::<T>(),
                s.rms_norm_eps,
                s.norm_math,
                normed,
            );
        } else {
            normed.copy_from_slice(&x);
        }
        obs.tap(TapName::FinalNorm, TapView::rows(normed, h));
        let picked: Vec<T>;
        let head_in = match which {
            LogitsFor::All => &normed[..],
            LogitsFor::Last if rows == 1 => &normed[normed.len() - h..],
            LogitsFor::Last => {
                // Each row's last token: rows of `n` tokens, or fewer where padding was skipped.
                let mut end = 0;
                picked = (0..rows)
                    .flat_map(|b| {
                        end += n - skipped.map_or(0, |p| p[b]);
                        &normed[(end - 1) * h..end * h]
                    })
                    .copied()
                    .collect();
                &picked[..]
            }
        };
        let m = head_in.len() / h;
        let mut logits = vec![T::ZERO; m * c.vocab_size];
        // The pass's kind, however many rows' logits are asked for.
        linear(pass.kind(), head_in, m, &self.lm_head, None, &mut logits);
        obs.tap(TapName::Logits, TapView::rows(&logits, c.vocab_size));
        Ok(logits)
    }
}
