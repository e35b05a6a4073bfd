//! Random initialisation of a Llama-family model (Llama, Mistral, Qwen2, Qwen3) for pretraining
//! from scratch, as transformers' `_init_weights` does it: every Linear and Embedding weight
//! ~ normal(0, initializer_range), biases zero, RMSNorm weights one, the padding row of the
//! embedding zero; a tied head is the embedding itself (no `lm_head.weight`). The tensors carry
//! the Hugging Face names, so they go through the same checked loader as a downloaded model.
//!
//! Owns: the init rule and its seeded generator. Does not own: training, or writing files.
//!
//! The generator is our own (splitmix64 counters + Box–Muller) and keyed by tensor name, so a
//! seed gives the same weights on every machine and every version of `rand`, and a tensor's
//! values do not depend on which other tensors exist.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use ferrotune_nn::splitmix64;

use crate::config::{Family, ModelConfig};
use crate::error::{ModelError, Result};
use crate::source::{CheckedSource, RawStore};
use crate::{build, LoadOptions, Loaded};

/// How to initialise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InitOptions {
    /// Standard deviation of the normal init (transformers' `initializer_range`, 0.02 by
    /// default).
    pub initializer_range: f64,
    pub seed: u64,
    /// The embedding row of this id is zero (transformers' `padding_idx`).
    pub pad_token_id: Option<u32>,
}

/// What a tensor starts as.
enum Fill {
    Normal,
    Ones,
    Zeros,
}

/// Every tensor a Llama-family `Decoder` loads for `cfg`, with its shape and init rule, in
/// checkpoint order.
fn layout(cfg: &ModelConfig) -> Vec<(String, Vec<usize>, Fill)> {
    let (v, h, i) = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    let qkv_bias = cfg.attention_bias;
    let o_bias = cfg.attention_bias && cfg.family != Family::Qwen2;
    let gemma = cfg.family == Family::Gemma3;
    // Gemma's norms scale by `1 + w`: they start at zero (transformers' `_init_weights`).
    let norm = || if gemma { Fill::Zeros } else { Fill::Ones };
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![v, h],
        Fill::Normal,
    )];
    let linear = |out: &mut Vec<_>, name: String, o: usize, inp: usize, bias: bool| {
        out.push((format!("{name}.weight"), vec![o, inp], Fill::Normal));
        if bias {
            out.push((format!("{name}.bias"), vec![o], Fill::Zeros));
        }
    };
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h], norm()));
        let a = format!("{p}.self_attn");
        if matches!(cfg.family, Family::Qwen3 | Family::Gemma3) {
            out.push((format!("{a}.q_norm.weight"), vec![cfg.head_dim], norm()));
            out.push((format!("{a}.k_norm.weight"), vec![cfg.head_dim], norm()));
        }
        linear(&mut out, format!("{a}.q_proj"), q, h, qkv_bias);
        linear(&mut out, format!("{a}.k_proj"), kv, h, qkv_bias);
        linear(&mut out, format!("{a}.v_proj"), kv, h, qkv_bias);
        linear(&mut out, format!("{a}.o_proj"), h, q, o_bias);
        out.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            norm(),
        ));
        if gemma {
            for n in ["pre_feedforward_layernorm", "post_feedforward_layernorm"] {
                out.push((format!("{p}.{n}.weight"), vec![h], norm()));
            }
        }
        let m = format!("{p}.mlp");
        linear(&mut out, format!("{m}.gate_proj"), i, h, cfg.mlp_bias);
        linear(&mut out, format!("{m}.up_proj"), i, h, cfg.mlp_bias);
        linear(&mut out, format!("{m}.down_proj"), h, i, cfg.mlp_bias);
    }
    out.push(("model.norm.weight".to_string(), vec![h], norm()));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h], Fill::Normal));
    }
    out
}

/// FNV-1a of the name: the per-tensor stream key.
fn name_key(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `n` draws from normal(0, std), a pure function of (seed, name). Draws 2i and 2i + 1 come
/// from counters 2i and 2i + 1 (one Box–Muller pair), so the pairs are filled in parallel.
pub(crate) fn normal(n: usize, std: f64, seed: u64, name: &str) -> Vec<f32> {
    use rayon::prelude::*;
    let stream = splitmix64(seed ^ splitmix64(name_key(name)));
    // A uniform in (0, 1]: 53 random bits, never 0 so the log is finite.
    let uniform =
        |k: u64| ((splitmix64(stream.wrapping_add(k)) >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    let mut out = vec![0f32; n + (n & 1)];
    out.par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(c, chunk)| {
            let first = (c << 16) as u64; // even: chunks hold whole pairs
            for (p, pair) in chunk.chunks_exact_mut(2).enumerate() {
                let k = first + 2 * p as u64;
                let (u1, u2) = (uniform(k), uniform(k + 1));
                let r = (-2.0 * u1.ln()).sqrt() * std;
                let t = 2.0 * std::f64::consts::PI * u2;
                pair[0] = (r * t.cos()) as f32;
                pair[1] = (r * t.sin()) as f32;
            }
        });
    out.truncate(n);
    out
}

/// Freshly initialised f32 weights for `cfg`, by Hugging Face name, in checkpoint order.
pub fn init_weights(
    cfg: &ModelConfig,
    opts: &InitOptions,
    device: &Device,
) -> Result<Vec<(String, Tensor)>> {
    if cfg.family == Family::Gpt2 {
        return Err(ModelError::Config {
            path: PathBuf::from("(random init)"),
            field: "model_type".into(),
            msg: "random init covers the Llama family (llama, mistral, qwen2, qwen3, gemma3_text), not gpt2"
                .into(),
        });
    }
    if !(opts.initializer_range > 0.0 && opts.initializer_range.is_finite()) {
        return Err(ModelError::Config {
            path: PathBuf::from("(random init)"),
            field: "initializer_range".into(),
            msg: format!("must be a positive number, got {}", opts.initializer_range),
        });
    }
    let mut out = Vec::new();
    for (name, shape, fill) in layout(cfg) {
        let n: usize = shape.iter().product();
        let t = match fill {
            Fill::Ones => Tensor::ones(shape.as_slice(), DType::F32, device)?,
            Fill::Zeros => Tensor::zeros(shape.as_slice(), DType::F32, device)?,
            Fill::Normal => {
                let mut values = normal(n, opts.initializer_range, opts.seed, &name);
                if name == "model.embed_tokens.weight" {
                    if let Some(pad) = opts.pad_token_id.map(|p| p as usize) {
                        if pad < cfg.vocab_size {
                            let h = cfg.hidden_size;
                            values[pad * h..(pad + 1) * h].fill(0.0);
                        }
                    }
                }
                Tensor::from_vec(values, shape.as_slice(), device)?
            }
        };
        out.push((name, t));
    }
    Ok(out)
}

/// Named in-memory tensors as a [`RawStore`], so fresh weights go through [`CheckedSource`].
pub struct TensorStore {
    origin: PathBuf,
    tensors: Vec<(String, Tensor)>,
}

impl TensorStore {
    pub fn new(tensors: Vec<(String, Tensor)>, origin: impl Into<PathBuf>) -> Self {
        TensorStore {
            origin: origin.into(),
            tensors,
        }
    }
}

impl RawStore for TensorStore {
    fn names(&self) -> Vec<String> {
        self.tensors.iter().map(|(n, _)| n.clone()).collect()
    }

    fn load(&self, name: &str, device: &Device) -> candle_core::Result<Option<Tensor>> {
        self.tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.to_device(device))
            .transpose()
    }

    fn origin(&self) -> &std::path::Path {
        &self.origin
    }
}

/// A freshly initialised model, built like a loaded one (with `opts.trainable_base`, every
/// weight is a trainable `Var` in `Loaded::base_params`).
pub fn init_model(cfg: &ModelConfig, init: &InitOptions, opts: &LoadOptions) -> Result<Loaded> {
    let origin = PathBuf::from("(random init)");
    let weights = init_weights(cfg, init, &opts.device)?;
    let mut src = CheckedSource::new(
        Box::new(TensorStore::new(weights, origin.clone())),
        opts.dtype,
        opts.device.clone(),
    );
    if opts.trainable_base {
        src = src.make_trainable();
    }
    let model = build(cfg, &src, opts)?;
    Ok(Loaded {
        model,
        path: origin,
        base_params: src.trainable_params(),
    })
}
