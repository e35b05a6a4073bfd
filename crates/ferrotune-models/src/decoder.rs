//! The Llama-like decoder shared by Llama (SmolLM, TinyLlama, Llama 3.x), Mistral, Qwen2, Qwen3
//! and Gemma 3. What differs between them is data in [`ModelConfig`]: qkv bias (Qwen2), per-head
//! q/k RMSNorm (Qwen3, Gemma 3), rope scaling (Llama 3), tied embeddings, sliding-window layers
//! (Mistral; Gemma 3's local layers with their own RoPE base). Pre-norm blocks:
//! `h += attn(rms(h)); h += mlp(rms(h))`.
//!
//! Gemma 3 adds, as transformers' `modeling_gemma3.py`: embeddings scaled by sqrt(hidden) in
//! the weight dtype; RMSNorm scales `1 + w`; a norm after attention and after the MLP, applied
//! before the residual add (`h += rms(attn(rms(h))); h += rms(mlp(rms(h)))`); GeGLU; scores
//! scaled by `query_pre_attn_scalar ** -0.5`.

use candle_core::{Result, Tensor};
use ferrotune_nn::ops::AttnMask;
use ferrotune_nn::{
    Attention, AttentionSpec, GatedMlp, KvCache, Linear, Mode, RmsNorm, RopeScaling,
    RotaryEmbedding, Vb,
};

use crate::batch::Batch;
use crate::config::{Activation, Family, LayerType, ModelConfig};

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    /// Llama-like: the norm before the MLP. Gemma 3: the norm of the attention output.
    pub post_attention_layernorm: RmsNorm,
    /// Gemma 3 only: (pre-feed-forward norm, post-feed-forward norm).
    pub feedforward_norms: Option<(RmsNorm, RmsNorm)>,
    pub mlp: GatedMlp,
    pub sliding: bool,
}

#[derive(Debug, Clone)]
pub struct Decoder {
    pub cfg: ModelConfig,
    /// (V, H)
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// The output head; shares `embed_tokens` when embeddings are tied.
    pub lm_head: Linear,
    pub rope: RotaryEmbedding,
    /// The sliding layers' table when their RoPE base differs (Gemma 3).
    pub rope_local: Option<RotaryEmbedding>,
}

impl Decoder {
    pub fn load(vb: &Vb, cfg: &ModelConfig) -> Result<Self> {
        let m = vb.pp("model");
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed_tokens = m.pp("embed_tokens").get("weight", &[v, h])?;
        let gemma = cfg.family == Family::Gemma3;
        let offset = if gemma { 1.0 } else { 0.0 };
        let norm = |vb: &Vb| RmsNorm::load_offset(vb, h, cfg.norm_eps, offset);
        let spec = AttentionSpec {
            hidden: h,
            n_heads: cfg.num_heads,
            n_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            qkv_bias: cfg.attention_bias,
            o_bias: cfg.attention_bias && cfg.family != Family::Qwen2,
            qk_norm_eps: matches!(cfg.family, Family::Qwen3 | Family::Gemma3)
                .then_some(cfg.norm_eps),
            qk_norm_offset: offset,
            scale: cfg.query_pre_attn_scalar.map(|s| 1.0 / s.sqrt()),
            window: None,
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let l = m.pp("layers").pp(i);
            let sliding = cfg.layer_types.get(i) == Some(&LayerType::Sliding);
            let spec = AttentionSpec {
                window: cfg.sliding_window.filter(|_| sliding),
                ..spec
            };
            // Checkpoint order: LoRA adapters are drawn in load order, so it must not change.
            let input_layernorm = norm(&l.pp("input_layernorm"))?;
            let self_attn = Attention::load(&l.pp("self_attn"), spec)?;
            let post_attention_layernorm = norm(&l.pp("post_attention_layernorm"))?;
            let feedforward_norms = if gemma {
                Some((
                    norm(&l.pp("pre_feedforward_layernorm"))?,
                    norm(&l.pp("post_feedforward_layernorm"))?,
                ))
            } else {
                None
            };
            let mut mlp = GatedMlp::load(&l.pp("mlp"), h, cfg.intermediate_size, cfg.mlp_bias)?;
            mlp.gelu = cfg.hidden_act == Activation::GeluTanh;
            layers.push(DecoderLayer {
                input_layernorm,
                self_attn,
                post_attention_layernorm,
                feedforward_norms,
                mlp,
                sliding,
            });
        }
        let norm = norm(&m.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::from_weights(&vb.pp("lm_head"), embed_tokens.clone(), None)?
        } else {
            Linear::load(&vb.pp("lm_head"), h, v, false)?
        };
        Ok(Decoder {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope: RotaryEmbedding::new(cfg.head_dim, cfg.rope_theta, &cfg.rope_scaling),
            rope_local: cfg
                .rope_local_theta
                .map(|t| RotaryEmbedding::new(cfg.head_dim, t, &RopeScaling::None)),
        })
    }

    /// Final-normed hidden states (B, T, H).
    pub fn hidden(
        &self,
        batch: &Batch,
        mut cache: Option<&mut KvCache>,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, t) = batch.dims()?;
        let dev = self.embed_tokens.device();
        let ids = batch.input_ids.flatten_all()?;
        let mut x =
            self.embed_tokens
                .index_select(&ids, 0)?
                .reshape((b, t, self.cfg.hidden_size))?; // (B, T, H)
        if self.cfg.family == Family::Gemma3 {
            // sqrt(hidden) rounded to the weight dtype first, as transformers does.
            x = x.affine((self.cfg.hidden_size as f64).sqrt(), 0.0)?;
        }
        let (cos, sin) = self.rope.cos_sin(&batch.position_ids, dev)?; // (B, T, D/2)
        let local = match &self.rope_local {
            Some(r) => Some(r.cos_sin(&batch.position_ids, dev)?),
            None => None,
        };
        let mask = AttnMask {
            key_mask: batch.key_mask.as_ref(),
            window: None,
            segments: batch.segments.as_ref(),
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let (cos, sin) = match (&local, layer.sliding) {
                (Some((c, s)), true) => (c, s),
                _ => (&cos, &sin),
            };
            let residual = &x;
            let h = layer.input_layernorm.forward(&x)?;
            let h = layer.self_attn.forward(
                &h,
                cos,
                sin,
                mask,
                cache.as_deref_mut().map(|c| (c, i)),
                mode,
            )?;
            x = match &layer.feedforward_norms {
                None => {
                    let x1 = (residual + h)?;
                    let h = layer.post_attention_layernorm.forward(&x1)?;
                    let h = layer.mlp.forward(&h, mode)?;
                    (x1 + h)?
                }
                Some((pre, post)) => {
                    let x1 = (residual + layer.post_attention_layernorm.forward(&h)?)?;
                    let h = layer.mlp.forward(&pre.forward(&x1)?, mode)?;
                    (x1 + post.forward(&h)?)?
                }
            };
        }
        self.norm.forward(&x)
    }
}
