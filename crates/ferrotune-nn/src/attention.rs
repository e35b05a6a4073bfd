//! Grouped-query self-attention for the Llama-like families: q/k/v/o projections (optional
//! qkv bias for Qwen2, per-head q/k RMSNorm for Qwen3), RoPE at explicit positions, the
//! external KV cache, and causal attention with a key padding mask.

use candle_core::{Result, Tensor};

use crate::kv_cache::KvCache;
use crate::linear::Linear;
use crate::norm::RmsNorm;
use crate::ops;
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
    /// Qwen3: RMSNorm over each head's q and k before RoPE, with this eps.
    pub qk_norm_eps: Option<f64>,
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
                Some(RmsNorm::load(&vb.pp("q_norm"), hd, eps)?),
                Some(RmsNorm::load(&vb.pp("k_norm"), hd, eps)?),
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

    /// x: (B, T, H); cos, sin: (B, T, D/2); key_mask: (B, T_past + T) or None.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        key_mask: Option<&Tensor>,
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
        let scale = 1.0 / (s.head_dim as f64).sqrt();
        let o = ops::attention(&q, &k, &v, key_mask, scale)?; // (B, Hq, T, D)
        let o = o.transpose(1, 2)?.reshape((b, t, s.n_heads * s.head_dim))?; // (B, T, Hq*D)
        self.o_proj.forward(&o, mode)
    }
}
