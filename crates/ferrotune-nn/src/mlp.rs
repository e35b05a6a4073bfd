//! Feed-forward blocks: the gated MLP, SwiGLU (Llama, Mistral, Qwen) or GeGLU (Gemma), and
//! GPT-2's GELU MLP.

use candle_core::{Result, Tensor};

use crate::linear::Linear;
use crate::ops;
use crate::weights::Vb;
use crate::Mode;

/// `down(act(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct GatedMlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    /// GeGLU (GELU, tanh approximation) instead of SwiGLU.
    pub gelu: bool,
}

impl GatedMlp {
    pub fn load(vb: &Vb, hidden: usize, intermediate: usize, bias: bool) -> Result<Self> {
        Ok(GatedMlp {
            gate_proj: Linear::load(&vb.pp("gate_proj"), hidden, intermediate, bias)?,
            up_proj: Linear::load(&vb.pp("up_proj"), hidden, intermediate, bias)?,
            down_proj: Linear::load(&vb.pp("down_proj"), intermediate, hidden, bias)?,
            gelu: false,
        })
    }

    /// x: (B, T, H) -> (B, T, H)
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let g = self.gate_proj.forward(x, mode)?; // (B, T, I)
        let u = self.up_proj.forward(x, mode)?; // (B, T, I)
        let h = if self.gelu {
            (ops::gelu_tanh(&g)? * u)?
        } else {
            ops::swiglu(&g, &u)?
        };
        self.down_proj.forward(&h, mode)
    }
}

/// GPT-2 MLP: `c_proj(gelu_tanh(c_fc(x)))`.
#[derive(Debug, Clone)]
pub struct GeluMlp {
    pub c_fc: Linear,
    pub c_proj: Linear,
}

impl GeluMlp {
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let h = self.c_fc.forward(x, mode)?;
        self.c_proj.forward(&ops::gelu_tanh(&h)?, mode)
    }
}
