//! Rotary position embeddings: the inverse-frequency table (with Llama-3 and linear scaling as
//! in transformers' `ROPE_INIT_FUNCTIONS`) and per-position cos/sin for arbitrary position ids,
//! so left-padded rows and KV-cached steps get the right angles.

use candle_core::{DType, Device, Result, Tensor};

/// `rope_scaling` from a Hugging Face config, already validated by the config loader.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.x frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    /// (D/2) inverse frequencies, f32.
    inv_freq: Vec<f32>,
    pub head_dim: usize,
}

impl RotaryEmbedding {
    pub fn new(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Self {
        let half = head_dim / 2;
        let base: Vec<f64> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
            .collect();
        let inv_freq: Vec<f64> = match *scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_len,
            } => {
                let low_wavelen = old_len / low_freq_factor;
                let high_wavelen = old_len / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old_len / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        RotaryEmbedding {
            inv_freq: inv_freq.iter().map(|&f| f as f32).collect(),
            head_dim,
        }
    }

    /// cos and sin, each (B, T, D/2) f32, for `position_ids` (B, T) u32.
    pub fn cos_sin(&self, position_ids: &Tensor, device: &Device) -> Result<(Tensor, Tensor)> {
        let (b, t) = position_ids.dims2()?;
        let pos = position_ids.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(b * t * half);
        let mut sin = Vec::with_capacity(b * t * half);
        for row in &pos {
            for &p in row {
                for &f in &self.inv_freq {
                    // f32 product, as transformers computes `inv_freq @ position_ids` in f32.
                    let angle = p * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        Ok((
            Tensor::from_vec(cos, (b, t, half), device)?,
            Tensor::from_vec(sin, (b, t, half), device)?,
        ))
    }
}
