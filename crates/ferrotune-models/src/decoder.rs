//! The Llama-like decoder shared by Llama (SmolLM, TinyLlama, Llama 3.x), Mistral, Qwen2 and
//! Qwen3. What differs between them is data in [`ModelConfig`]: qkv bias (Qwen2), per-head
//! q/k RMSNorm (Qwen3), rope scaling (Llama 3), tied embeddings. Pre-norm blocks:
//! `h += attn(rms(h)); h += mlp(rms(h))`.

use candle_core::{Result, Tensor};
use ferrotune_nn::{
    Attention, AttentionSpec, GatedMlp, KvCache, Linear, Mode, RmsNorm, RotaryEmbedding, Vb,
};

use crate::batch::Batch;
use crate::config::{Family, ModelConfig};

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: GatedMlp,
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
}

impl Decoder {
    pub fn load(vb: &Vb, cfg: &ModelConfig) -> Result<Self> {
        let m = vb.pp("model");
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed_tokens = m.pp("embed_tokens").get("weight", &[v, h])?;
        let spec = AttentionSpec {
            hidden: h,
            n_heads: cfg.num_heads,
            n_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            qkv_bias: cfg.attention_bias,
            o_bias: cfg.attention_bias && cfg.family != Family::Qwen2,
            qk_norm_eps: (cfg.family == Family::Qwen3).then_some(cfg.norm_eps),
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let l = m.pp("layers").pp(i);
            layers.push(DecoderLayer {
                input_layernorm: RmsNorm::load(&l.pp("input_layernorm"), h, cfg.norm_eps)?,
                self_attn: Attention::load(&l.pp("self_attn"), spec)?,
                post_attention_layernorm: RmsNorm::load(
                    &l.pp("post_attention_layernorm"),
                    h,
                    cfg.norm_eps,
                )?,
                mlp: GatedMlp::load(&l.pp("mlp"), h, cfg.intermediate_size, cfg.mlp_bias)?,
            });
        }
        let norm = RmsNorm::load(&m.pp("norm"), h, cfg.norm_eps)?;
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
        // Sliding-window attention is not implemented: refuse sequences it would change rather
        // than return silently different logits.
        if let Some(w) = self.cfg.sliding_window {
            let keys = t + cache.as_deref().map_or(0, |c| c.len());
            if keys > w {
                candle_core::bail!(
                    "sequence of {keys} tokens exceeds the model's sliding_window {w}, which ferrotune does not implement yet; use shorter sequences"
                );
            }
        }
        let dev = self.embed_tokens.device();
        let ids = batch.input_ids.flatten_all()?;
        let mut x =
            self.embed_tokens
                .index_select(&ids, 0)?
                .reshape((b, t, self.cfg.hidden_size))?; // (B, T, H)
        let (cos, sin) = self.rope.cos_sin(&batch.position_ids, dev)?; // (B, T, D/2)
        for (i, layer) in self.layers.iter().enumerate() {
            let residual = &x;
            let h = layer.input_layernorm.forward(&x)?;
            let h = layer.self_attn.forward(
                &h,
                &cos,
                &sin,
                batch.key_mask.as_ref(),
                cache.as_deref_mut().map(|c| (c, i)),
                mode,
            )?;
            let x1 = (residual + h)?;
            let h = layer.post_attention_layernorm.forward(&x1)?;
            let h = layer.mlp.forward(&h, mode)?;
            x = (x1 + h)?;
        }
        self.norm.forward(&x)
    }
}
