//! Grouped-query self-attention for the Llama-like families: q/k/v/o projections (optional
//! qkv bias for Qwen2, per-head q/k RMSNorm for Qwen3 and Gemma 3), RoPE at explicit positions,
//! the external KV cache, and causal attention with a key padding mask, the layer's sliding
//! window and packed-sequence segments.

use candle_core::{Result, Tensor};

use crate::kv_cache::KvCache;
use crate::linear::Linear;
use crate::norm::RmsNorm;
use crate::ops::{self, AttnMask};
use crate::weights::Vb;
use crate::Mode;

/// Shape and options of one attention block.
#[derive(Debug, Clone, Copy)]
pub struct AttentionSpec {
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub qkv_bias: bool,
    pub o_bias: bool,
    /// Qwen3, Gemma 3: RMSNorm over each head's q and k before RoPE, with this eps.
    pub qk_norm_eps: Option<f64>,
    /// The q/k norms' weight offset (1 for Gemma's `1 + w`, else 0).
    pub qk_norm_offset: f64,
    /// Score scale; None = 1 / sqrt(head_dim) (Gemma: `query_pre_attn_scalar ** -0.5`).
    pub scale: Option<f64>,
    /// This layer's sliding window (Mistral; Gemma's local layers); None = full causal.
    pub window: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    spec: AttentionSpec,
}

impl Attention {
    pub fn load(vb: &Vb, spec: AttentionSpec) -> Result<Self> {
        let (h, hd) = (spec.hidden, spec.head_dim);
        let q_out = spec.n_heads * hd;
        let kv_out = spec.n_kv_heads * hd;
        let (q_norm, k_norm) = match spec.qk_norm_eps {
            Some(eps) => (
                Some(RmsNorm::load_offset(
                    &vb.pp("q_norm"),
                    hd,
                    eps,
                    spec.qk_norm_offset,
                )?),
                Some(RmsNorm::load_offset(
                    &vb.pp("k_norm"),
                    hd,
                    eps,
                    spec.qk_norm_offset,
                )?),
            ),
            None => (None, None),
        };
        Ok(Attention {
            q_proj: Linear::load(&vb.pp("q_proj"), h, q_out, spec.qkv_bias)?,
            k_proj: Linear::load(&vb.pp("k_proj"), h, kv_out, spec.qkv_bias)?,
            v_proj: Linear::load(&vb.pp("v_proj"), h, kv_out, spec.qkv_bias)?,
            o_proj: Linear::load(&vb.pp("o_proj"), q_out, h, spec.o_bias)?,
            q_norm,
            k_norm,
            spec,
        })
    }

    /// x: (B, T, H); cos, sin: (B, T, D/2); `mask`'s key mask and segments: (B, T_past + T) or
    /// None (its window is replaced by this layer's).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: AttnMask<'_>,
        cache: Option<(&mut KvCache, usize)>,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let s = &self.spec;
        let heads = |y: Tensor, n: usize, norm: &Option<RmsNorm>| -> Result<Tensor> {
            let y = y.reshape((b, t, n, s.head_dim))?; // (B, T, n, D)
            let y = match norm {
                Some(nrm) => nrm.forward(&y)?,
                None => y,
            };
            y.transpose(1, 2)?.contiguous() // (B, n, T, D)
        };
        let q = heads(self.q_proj.forward(x, mode)?, s.n_heads, &self.q_norm)?;
        let k = heads(self.k_proj.forward(x, mode)?, s.n_kv_heads, &self.k_norm)?;
        let v = heads(self.v_proj.forward(x, mode)?, s.n_kv_heads, &None)?;
        let q = ops::rope(&q, cos, sin)?;
        let k = ops::rope(&k, cos, sin)?;
        let (k, v) = match cache {
            Some((c, layer)) => c.append(layer, &k, &v)?, // (B, Hkv, T_past + T, D)
            None => (k, v),
        };
        let scale = s.scale.unwrap_or(1.0 / (s.head_dim as f64).sqrt());
        let mask = AttnMask {
            window: s.window,
            ..mask
        };
        let o = ops::attention_masked(&q, &k, &v, &mask, scale)?; // (B, Hq, T, D)
        let o = o.transpose(1, 2)?.reshape((b, t, s.n_heads * s.head_dim))?; // (B, T, Hq*D)
        self.o_proj.forward(&o, mode)
    }
}
