//! GPT-2: learned position embeddings, LayerNorm, fused qkv projection, GELU MLP, no RoPE.
//! Checkpoints store Conv1D weights as (in, out); we transpose them once at load so every
//! projection is an ordinary linear slot (LoRA included, with PEFT's key names).

use candle_core::{Result, Tensor};
use ferrotune_nn::{ops, GeluMlp, KvCache, LayerNorm, Linear, Mode, Vb};

use crate::batch::Batch;
use crate::config::ModelConfig;

#[derive(Debug, Clone)]
pub struct Gpt2Block {
    pub ln_1: LayerNorm,
    pub c_attn: Linear,
    pub c_proj: Linear,
    pub ln_2: LayerNorm,
    pub mlp: GeluMlp,
}

#[derive(Debug, Clone)]
pub struct Gpt2 {
    pub cfg: ModelConfig,
    /// (V, H)
    pub wte: Tensor,
    /// (n_positions, H)
    pub wpe: Tensor,
    pub h: Vec<Gpt2Block>,
    pub ln_f: LayerNorm,
    pub lm_head: Linear,
}

/// A Conv1D slot: weight stored (in, out), bias (out).
fn conv1d(vb: &Vb, in_dim: usize, out_dim: usize) -> Result<Linear> {
    let w = vb.get("weight", &[in_dim, out_dim])?.t()?.contiguous()?; // (out, in)
    let b = vb.get("bias", &[out_dim])?;
    Linear::from_weights(vb, w, Some(b))
}

impl Gpt2 {
    pub fn load(vb: &Vb, cfg: &ModelConfig) -> Result<Self> {
        // transformers saves GPT2LMHeadModel under `transformer.`; the original checkpoints
        // have no prefix.
        let t = if vb.contains("transformer.wte.weight") || !vb.contains("wte.weight") {
            vb.pp("transformer")
        } else {
            vb.clone()
        };
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let wte = t.pp("wte").get("weight", &[v, h])?;
        let wpe = t
            .pp("wpe")
            .get("weight", &[cfg.max_position_embeddings, h])?;
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let b = t.pp("h").pp(i);
            blocks.push(Gpt2Block {
                ln_1: LayerNorm::load(&b.pp("ln_1"), h, cfg.norm_eps)?,
                c_attn: conv1d(&b.pp("attn").pp("c_attn"), h, 3 * h)?,
                c_proj: conv1d(&b.pp("attn").pp("c_proj"), h, h)?,
                ln_2: LayerNorm::load(&b.pp("ln_2"), h, cfg.norm_eps)?,
                mlp: GeluMlp {
                    c_fc: conv1d(&b.pp("mlp").pp("c_fc"), h, cfg.intermediate_size)?,
                    c_proj: conv1d(&b.pp("mlp").pp("c_proj"), cfg.intermediate_size, h)?,
                },
            });
        }
        let ln_f = LayerNorm::load(&t.pp("ln_f"), h, cfg.norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::from_weights(&vb.pp("lm_head"), wte.clone(), None)?
        } else {
            Linear::load(&vb.pp("lm_head"), h, v, false)?
        };
        Ok(Gpt2 {
            cfg: cfg.clone(),
            wte,
            wpe,
            h: blocks,
            ln_f,
            lm_head,
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
        let (hd, nh) = (self.cfg.head_dim, self.cfg.num_heads);
        let hidden = self.cfg.hidden_size;
        let tok = self
            .wte
            .index_select(&batch.input_ids.flatten_all()?, 0)?
            .reshape((b, t, hidden))?; // (B, T, H)
        let pos = self
            .wpe
            .index_select(&batch.position_ids.flatten_all()?, 0)?
            .reshape((b, t, hidden))?; // (B, T, H)
        let mut x = (tok + pos)?;
        let scale = 1.0 / (hd as f64).sqrt();
        for (i, blk) in self.h.iter().enumerate() {
            let a = blk.ln_1.forward(&x)?;
            let qkv = blk.c_attn.forward(&a, mode)?; // (B, T, 3H)
            let split = |j: usize| -> Result<Tensor> {
                qkv.narrow(2, j * hidden, hidden)?
                    .reshape((b, t, nh, hd))? // (B, T, nh, hd)
                    .transpose(1, 2)?
                    .contiguous() // (B, nh, T, hd)
            };
            let (q, k, v) = (split(0)?, split(1)?, split(2)?);
            let (k, v) = match cache.as_deref_mut() {
                Some(c) => c.append(i, &k, &v)?,
                None => (k, v),
            };
            let mask = ops::AttnMask {
                key_mask: batch.key_mask.as_ref(),
                window: None,
                segments: batch.segments.as_ref(),
            };
            let o = ops::attention_masked(&q, &k, &v, &mask, scale)?; // (B, nh, T, hd)
            let o = o.transpose(1, 2)?.reshape((b, t, hidden))?; // (B, T, H)
            x = (&x + blk.c_proj.forward(&o, mode)?)?;
            let m = blk.mlp.forward(&blk.ln_2.forward(&x)?, mode)?;
            x = (x + m)?;
        }
        self.ln_f.forward(&x)
    }
}
