//! Loading a checkpoint: config, memory-mapped weights, and the numerical settings.

use super::{LayerWeights, Mlp, MlpWeights, Model, MoeWeights, QkNorm, RouterMath, Settings};

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::faults::Fault;
use crate::kernels::attention::GqaMapping;
use crate::kernels::norm::RmsNormMath;
use crate::kernels::rope::{RopeLayout, RopeRounding, ScalingMistake};
use crate::kernels::ResidualDtype;
use crate::source::ModelSource;
use crate::weights::{huge_pages, Checkpoint, Tensor};
use lockstep_trace::Dtype;
use std::path::Path;

impl Settings {
    /// The settings `config` asks for: exactly what transformers computes.
    pub fn from_config(c: &ModelConfig) -> Self {
        Settings {
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta,
            rope_scaling: c.rope_scaling,
            rope_mistake: ScalingMistake::None,
            rope_layout: RopeLayout::RotateHalf,
            rope_rounding: RopeRounding::Careful,
            norm_math: RmsNormMath::Careful,
            softmax_bf16: false,
            residual: ResidualDtype::Model,
            gqa: GqaMapping::Grouped,
            causal: true,
            windows: c.sliding_windows.clone(),
            final_norm: true,
            qk_norm: QkNorm::BeforeRope,
            router: RouterMath {
                normalize: c.moe.as_ref().is_some_and(|m| m.norm_topk_prob),
                softmax_after_topk: false,
            },
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
        Self::load_source(&ModelSource::resolve(dir)?, fault)
    }

    /// Loads the model at a resolved [`ModelSource`], with a deliberate bug when `fault` is given.
    pub fn load_source(source: &ModelSource, fault: Option<Fault>) -> Result<Self> {
        Self::load_source_for(source, fault, false)
    }

    /// [`Model::load`] for a single forward pass (`lockstep trace`): the layers are streamed
    /// through the page cache whatever the model's size (unless `LOCKSTEP_STREAM_LAYERS=off`),
    /// since one pass reads each layer once either way, and nothing is copied into 2 MiB
    /// pages. Values never change.
    pub fn load_for_one_pass(dir: &Path) -> Result<Self> {
        Self::load_source_for(&ModelSource::resolve(dir)?, None, true)
    }

    /// [`Model::load_source`]; `one_pass`: as [`Model::load_for_one_pass`].
    fn load_source_for(source: &ModelSource, fault: Option<Fault>, one_pass: bool) -> Result<Self> {
        crate::allocator::keep_buffers_in_heap();
        // A GGUF: config from its metadata.
        let (config, mut ck) = match source {
            ModelSource::Gguf { file, .. } => crate::gguf::load(file)?,
            ModelSource::Folder(dir) => {
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
        // Stream the layers of a model too large to keep resident; put one that stays resident in
        // 2 MiB pages (before any tensor is handed out, so every one reads them).
        let mapped: u64 = ck.tensors.values().map(|t| t.mapped_bytes() as u64).sum();
        let available = crate::resources::available_memory();
        let stream_layers = if one_pass {
            crate::streaming::stream_layers_for_one_pass()?
        } else {
            crate::streaming::stream_layers(mapped, available)?
        };
        ck.stream_pages = stream_layers;
        // Whether the BF16 matrices' 12-bit coding will replace them in memory, decided before
        // the pages are arranged: then each matrix is read once, to code it (or not at all, its
        // coding read from a file), and bringing the file into 2 MiB pages would read it all
        // for nothing. Not for one pass, which would read each matrix to code it and again
        // coded. The matrices: every 2-D BF16 tensor but an untied embedding (read by rows).
        let code_bf16_instead = !one_pass && {
            let embed = (!config.tie_word_embeddings).then_some("model.embed_tokens.weight");
            let (all_bf16, matrices) =
                ck.tensors.iter().fold((true, 0u64), |(all, sum), (n, t)| {
                    let matrix = t.shape.len() == 2 && Some(n.as_str()) != embed;
                    let bf16 = t.dtype == crate::weights::StoredDtype::BF16;
                    let bytes = if matrix && bf16 {
                        t.mapped_bytes() as u64
                    } else {
                        0
                    };
                    (all && (bf16 || !matrix), sum + bytes)
                });
            all_bf16
                && crate::weights::bf16_coded::place(mapped, matrices, available, stream_layers)?
                    == crate::weights::bf16_coded::Place::Instead
        };
        if !stream_layers && !code_bf16_instead {
            huge_pages::into_huge_pages(&mut ck, mapped, available)?;
        }
        // LOCKSTEP_TEAM, read once (a bad value is an error before any work).
        let team = crate::team::wanted()?;
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
                qk_norm: if c.arch.has_qk_norm() {
                    Some([
                        ck.get(&p("self_attn.q_norm.weight"), &[d])?,
                        ck.get(&p("self_attn.k_norm.weight"), &[d])?,
                    ])
                } else {
                    None
                },
                o_proj: ck.get(&p("self_attn.o_proj.weight"), &[h, qd])?,
                post_norm: ck.get(&p("post_attention_layernorm.weight"), &[h])?,
                mlp: match &c.moe {
                    Some(m) if m.is_sparse(l) => Mlp::Sparse(MoeWeights {
                        router: ck.get(&p("mlp.gate.weight"), &[m.num_experts, h])?,
                        experts: super::moe::load_experts(&ck, &p("mlp."), m, h)?,
                    }),
                    _ => Mlp::Dense(MlpWeights {
                        gate_proj: ck.get(&p("mlp.gate_proj.weight"), &[i, h])?,
                        up_proj: ck.get(&p("mlp.up_proj.weight"), &[i, h])?,
                        down_proj: ck.get(&p("mlp.down_proj.weight"), &[h, i])?,
                    }),
                },
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
                .iter()
                .find_map(|l| match &l.mlp {
                    Mlp::Dense(d) => Some(d.gate_proj.clone()),
                    Mlp::Sparse(_) => None,
                })
                .filter(|g| g.shape == head_shape)
                .or_else(|| ck.tensors.get("lm_head.weight").cloned())
                .ok_or_else(|| {
                    EngineError::Input(
                        "fault untied-head needs an untied checkpoint (this one ties lm_head to the embeddings)"
                            .into(),
                    )
                })?,
        };
        // LOCKSTEP_BF16_COPY and LOCKSTEP_CODED_BF16, each read once. The codings count the
        // bf16 copies of F32 matrices among the BF16 matrices, and the copies beside the map.
        let matrix_bytes = |dtype: crate::weights::StoredDtype| -> u64 {
            layers
                .iter()
                .flat_map(|l| l.linears())
                .chain([&lm_head])
                .filter(|t| t.dtype == dtype)
                .map(|t| t.bytes().len() as u64)
                .sum()
        };
        let f32_matrices = matrix_bytes(crate::weights::StoredDtype::F32);
        let bf16_copy = crate::weights::bf16_copy::wanted(mapped, f32_matrices, available)?;
        let copies = if bf16_copy { f32_matrices / 2 } else { 0 };
        let code_bf16 = crate::weights::bf16_coded::wanted(
            mapped + copies,
            matrix_bytes(crate::weights::StoredDtype::BF16) + copies,
            available,
            stream_layers,
        )?;
        let code_bf16 = code_bf16 && !code_bf16_instead;
        let mut settings = Settings::from_config(c);
        if let Some(f) = fault {
            f.apply(&mut settings, c);
        }
        Ok(Model {
            config,
            checkpoint: ck,
            embed_tokens,
            layers,
            norm,
            lm_head,
            settings,
            fault,
            stream_layers,
            team,
            code_bf16,
            code_bf16_instead,
            coded_cache: Default::default(),
            bf16_copy,
        })
    }
}

impl Model {
    /// Prepares the loaded weights for computing in `dtype`: for [`Dtype::Q8dot`], every
    /// ggml block-quantized matrix (the layers' and the LM head) is marked for 8-bit integer dot
    /// products ([`Tensor::q8_dot`]); any other dtype clears the marks (exact math). For a dtype
    /// whose decode reads the 12-bit coding (bf16, bf16w, f32) with [`Model::code_bf16`], the
    /// BF16 matrices are coded now ([`Model::code_bf16_matrices`]), not at the first decode step
    /// (for `bf16` with [`Model::code_bf16_instead`], coded to replace them,
    /// [`Model::code_bf16_matrices_instead`]);
    /// for `bf16` with [`Model::bf16_copy`], the F32 matrices are rounded to their bf16 copies
    /// now too ([`Model::round_f32_matrices`]).
    ///
    /// # Errors
    /// `q8dot` on a model without a block-quantized matrix: it would run plain f32, so say so.
    pub fn use_dtype(&mut self, dtype: Dtype) -> Result<()> {
        let on = dtype == Dtype::Q8dot;
        if on && !self.has_block_matmuls() {
            return Err(EngineError::Input(
                "--dtype q8dot needs a GGUF whose matrices are block-quantized (Q8_0, Q4_K, ...); this model has none (use f32)".into(),
            ));
        }
        let mark = |t: &mut Tensor| t.q8_dot = on && t.dtype.is_block();
        for layer in &mut self.layers {
            layer.linears_mut().into_iter().for_each(mark);
        }
        mark(&mut self.lm_head);
        if dtype == Dtype::Bf16 && self.bf16_copy {
            self.round_f32_matrices();
        }
        let reads_coding = matches!(dtype, Dtype::Bf16 | Dtype::Bf16w | Dtype::F32);
        if reads_coding && self.code_bf16 {
            self.code_bf16_matrices();
        }
        if dtype == Dtype::Bf16 && self.code_bf16_instead {
            self.code_bf16_matrices_instead();
        }
        Ok(())
    }

    /// Whether a layer's linear or the LM head is stored ggml block-quantized: the matmuls
    /// [`Dtype::Q8dot`] changes (a GGUF quantizing only its embedding has none).
    pub fn has_block_matmuls(&self) -> bool {
        self.layers
            .iter()
            .flat_map(|l| l.linears())
            .chain([&self.lm_head])
            .any(|t| t.dtype.is_block())
    }
}
