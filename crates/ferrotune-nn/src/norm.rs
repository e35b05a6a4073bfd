//! Normalisation layers: RMSNorm (Llama, Qwen, Mistral; also Qwen3's and Gemma 3's per-head q/k
//! norm; Gemma's `(1 + w)` form) and LayerNorm (GPT-2).

use candle_core::{DType, Result, Tensor};

use crate::ops;
use crate::weights::Vb;

/// `x / sqrt(mean(x^2) + eps) * (offset + w)`: offset 0 for Llama-like models, 1 for Gemma,
/// whose checkpoints store `w` centred on 0 (the scale is `1 + w`, computed in f32 as
/// transformers' `Gemma3RMSNorm` does).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
    pub offset: f64,
}

impl RmsNorm {
    pub fn load(vb: &Vb, dim: usize, eps: f64) -> Result<Self> {
        Self::load_offset(vb, dim, eps, 0.0)
    }

    pub fn load_offset(vb: &Vb, dim: usize, eps: f64, offset: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: vb.get("weight", &[dim])?,
            eps,
            offset,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.offset == 0.0 {
            return ops::rms_norm(x, &self.weight, self.eps);
        }
        // (offset + w) in f32; differentiable, so a trained weight keeps the checkpoint's form.
        let w = self.weight.to_dtype(DType::F32)?.affine(1.0, self.offset)?;
        ops::rms_norm(x, &w, self.eps)
    }
}

#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(vb: &Vb, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: vb.get("weight", &[dim])?,
            bias: vb.get("bias", &[dim])?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}
