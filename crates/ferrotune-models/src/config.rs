//! Model configuration: Hugging Face `config.json` (field names as transformers writes them, so
//! it deserialises directly) resolved into one validated [`ModelConfig`] that the family files
//! read. GGUF metadata is resolved into the same struct by `gguf.rs`.

use std::path::Path;

use ferrotune_nn::RopeScaling;
use serde::Deserialize;

use crate::error::{ModelError, Result};

/// The families we implement. Llama covers SmolLM/SmolLM2, TinyLlama and Llama 3.x; Gemma3 is
/// Gemma 3's text model (`gemma3_text`, or the text half of a `gemma3` folder).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma3,
    Gpt2,
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU (Llama, Mistral, Qwen).
    Silu,
    /// GeGLU with the tanh approximation (Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
}

/// What a layer's attention sees: every earlier token, or the last `sliding_window` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    Full,
    Sliding,
}

impl Family {
    pub fn parse(model_type: &str) -> Option<Family> {
        Some(match model_type {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma3_text" | "gemma3" => Family::Gemma3,
            "gpt2" => Family::Gpt2,
            _ => return None,
        })
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma3 => "gemma3_text",
            Family::Gpt2 => "gpt2",
        }
    }
}

/// `config.json` as transformers writes it (only the fields we read; others are ignored, as
/// transformers itself keeps unknown keys).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HfConfig {
    pub model_type: Option<String>,
    pub vocab_size: Option<usize>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<serde_json::Value>,
    pub rope_parameters: Option<serde_json::Value>,
    pub tie_word_embeddings: Option<bool>,
    pub max_position_embeddings: Option<usize>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub sliding_window: Option<serde_json::Value>,
    pub use_sliding_window: Option<bool>,
    pub hidden_act: Option<String>,
    // Gemma 3 names.
    pub hidden_activation: Option<String>,
    pub layer_types: Option<Vec<String>>,
    pub sliding_window_pattern: Option<usize>,
    pub rope_local_base_freq: Option<f64>,
    pub query_pre_attn_scalar: Option<f64>,
    pub final_logit_softcapping: Option<serde_json::Value>,
    pub attn_logit_softcapping: Option<serde_json::Value>,
    pub use_bidirectional_attention: Option<bool>,
    /// A multimodal `gemma3` folder keeps the text model's config here.
    pub text_config: Option<Box<HfConfig>>,
    pub bos_token_id: Option<serde_json::Value>,
    pub eos_token_id: Option<serde_json::Value>,
    pub pad_token_id: Option<serde_json::Value>,
    // GPT-2 names.
    pub n_embd: Option<usize>,
    pub n_layer: Option<usize>,
    pub n_head: Option<usize>,
    pub n_inner: Option<usize>,
    pub n_positions: Option<usize>,
    pub layer_norm_epsilon: Option<f64>,
    pub activation_function: Option<String>,
}

/// Resolved, validated configuration shared by all families.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// RMSNorm eps (Llama-like) or LayerNorm eps (GPT-2).
    pub norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    /// Sliding-window attention size (Mistral/Qwen2 when enabled, Gemma's local layers); None =
    /// full attention everywhere.
    pub sliding_window: Option<usize>,
    /// One per layer: which layers use `sliding_window` (all of them for Mistral).
    pub layer_types: Vec<LayerType>,
    pub hidden_act: Activation,
    /// RoPE base of the sliding layers when it differs from `rope_theta` (Gemma 3's
    /// `rope_local_base_freq`); those layers use no rope scaling.
    pub rope_local_theta: Option<f64>,
    /// Gemma: attention scores scale by `query_pre_attn_scalar ** -0.5` instead of head_dim's.
    pub query_pre_attn_scalar: Option<f64>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

fn ids(v: &Option<serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => vec![],
    }
}

impl ModelConfig {
    /// Read and resolve `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let hf: HfConfig = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_hf(&hf, path)
    }

    /// Resolve an [`HfConfig`]; `path` is only used in error messages.
    pub fn from_hf(hf: &HfConfig, path: &Path) -> Result<Self> {
        if hf.model_type.as_deref() == Some("gemma3") {
            // A multimodal folder: the text model's config sits in `text_config`.
            let text = hf
                .text_config
                .as_deref()
                .ok_or_else(|| ModelError::Config {
                    path: path.to_path_buf(),
                    field: "text_config".into(),
                    msg: "missing (a `gemma3` config keeps its text model there)".into(),
                })?;
            let mut text = text.clone();
            text.model_type = Some("gemma3_text".into());
            return Self::from_hf(&text, path);
        }
        let err = |field: &str, msg: &str| ModelError::Config {
            path: path.to_path_buf(),
            field: field.to_string(),
            msg: msg.to_string(),
        };
        let model_type = hf
            .model_type
            .clone()
            .ok_or_else(|| err("model_type", "missing"))?;
        let family = Family::parse(&model_type).ok_or_else(|| ModelError::UnknownModelType {
            path: path.to_path_buf(),
            model_type: model_type.clone(),
        })?;
        let need = |v: Option<usize>, field: &str| -> Result<usize> {
            match v {
                Some(0) => Err(err(field, "must be > 0")),
                Some(x) => Ok(x),
                None => Err(err(field, "missing")),
            }
        };
        if family == Family::Gpt2 {
            let hidden = need(hf.n_embd.or(hf.hidden_size), "n_embd")?;
            let heads = need(hf.n_head.or(hf.num_attention_heads), "n_head")?;
            if hidden % heads != 0 {
                return Err(err("n_head", "n_embd must be divisible by n_head"));
            }
            if let Some(act) = &hf.activation_function {
                if act != "gelu_new" && act != "gelu_pytorch_tanh" {
                    return Err(err(
                        "activation_function",
                        &format!("`{act}` is not supported (gelu_new only)"),
                    ));
                }
            }
            return Ok(ModelConfig {
                family,
                vocab_size: need(hf.vocab_size, "vocab_size")?,
                hidden_size: hidden,
                intermediate_size: hf.n_inner.unwrap_or(4 * hidden),
                num_layers: need(hf.n_layer.or(hf.num_hidden_layers), "n_layer")?,
                num_heads: heads,
                num_kv_heads: heads,
                head_dim: hidden / heads,
                norm_eps: hf.layer_norm_epsilon.unwrap_or(1e-5),
                rope_theta: 0.0,
                rope_scaling: RopeScaling::None,
                tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(true),
                max_position_embeddings: need(
                    hf.n_positions.or(hf.max_position_embeddings),
                    "n_positions",
                )?,
                attention_bias: true,
                mlp_bias: true,
                sliding_window: None,
                layer_types: vec![
                    LayerType::Full;
                    need(hf.n_layer.or(hf.num_hidden_layers), "n_layer")?
                ],
                hidden_act: Activation::GeluTanh,
                rope_local_theta: None,
                query_pre_attn_scalar: None,
                bos_token_id: ids(&hf.bos_token_id).first().copied(),
                eos_token_ids: ids(&hf.eos_token_id),
            });
        }
        let hidden = need(hf.hidden_size, "hidden_size")?;
        let heads = need(hf.num_attention_heads, "num_attention_heads")?;
        let kv_heads = hf.num_key_value_heads.unwrap_or(heads);
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(err(
                "num_key_value_heads",
                "must divide num_attention_heads",
            ));
        }
        let head_dim = match hf.head_dim {
            Some(d) => d,
            None if hidden % heads == 0 => hidden / heads,
            None => return Err(err("head_dim", "missing and hidden_size % heads != 0")),
        };
        if head_dim % 2 != 0 {
            return Err(err("head_dim", "must be even for rotary embeddings"));
        }
        let gemma = family == Family::Gemma3;
        let (act_field, act) = match (&hf.hidden_activation, &hf.hidden_act) {
            (Some(a), _) if gemma => ("hidden_activation", Some(a)),
            (_, a) => ("hidden_act", a.as_ref()),
        };
        let hidden_act = match act.map(String::as_str) {
            None if gemma => Activation::GeluTanh,
            None | Some("silu") => Activation::Silu,
            Some("gelu_pytorch_tanh") if gemma => Activation::GeluTanh,
            Some(a) => {
                let want = if gemma { "gelu_pytorch_tanh" } else { "silu" };
                return Err(err(
                    act_field,
                    &format!("`{a}` is not supported ({want} only)"),
                ));
            }
        };
        let num_layers = need(hf.num_hidden_layers, "num_hidden_layers")?;
        if gemma {
            for (field, v) in [
                ("final_logit_softcapping", &hf.final_logit_softcapping),
                ("attn_logit_softcapping", &hf.attn_logit_softcapping),
            ] {
                if v.as_ref().is_some_and(|v| !v.is_null()) {
                    return Err(err(
                        field,
                        "logit soft-capping is not supported (Gemma 3 sets null)",
                    ));
                }
            }
            if hf.use_bidirectional_attention == Some(true) {
                return Err(err(
                    "use_bidirectional_attention",
                    "only causal attention is supported",
                ));
            }
        }
        // transformers 5 writes `rope_parameters` {rope_type, rope_theta, ...} (Gemma 3: one per
        // layer type); older versions `rope_theta` plus `rope_scaling` {rope_type|type, factor}
        // (Gemma 3: `rope_local_base_freq` for the sliding layers).
        let per_type = |key: &str| hf.rope_parameters.as_ref().and_then(|p| p.get(key));
        let (global_rope, local_rope) = match (per_type("full_attention"), gemma) {
            (Some(full), true) => (Some(full), per_type("sliding_attention")),
            _ => (
                hf.rope_parameters.as_ref().or(hf.rope_scaling.as_ref()),
                None,
            ),
        };
        let theta_of = |v: Option<&serde_json::Value>| {
            v.and_then(|p| p.get("rope_theta")).and_then(|v| v.as_f64())
        };
        let rope_theta = hf
            .rope_theta
            .or_else(|| theta_of(global_rope))
            .unwrap_or(if gemma { 1e6 } else { 10000.0 });
        let rope_scaling = parse_rope_scaling(global_rope).map_err(|m| err("rope_scaling", &m))?;
        let rope_local_theta = match local_rope {
            Some(l) => {
                if parse_rope_scaling(Some(l)).map_err(|m| err("rope_parameters", &m))?
                    != RopeScaling::None
                {
                    return Err(err(
                        "rope_parameters.sliding_attention",
                        "rope scaling on the sliding layers is not supported",
                    ));
                }
                Some(theta_of(Some(l)).unwrap_or(10000.0))
            }
            None if gemma => Some(hf.rope_local_base_freq.unwrap_or(10000.0)),
            None => None,
        };
        let sliding_window = match (family, hf.use_sliding_window, &hf.sliding_window) {
            (Family::Qwen2 | Family::Qwen3, Some(false) | None, _) => None,
            (_, _, Some(v)) if !v.is_null() => match v.as_u64() {
                Some(0) | None => return Err(err("sliding_window", "must be a positive integer")),
                Some(w) => Some(w as usize),
            },
            _ => None,
        };
        let layer_types = match (&hf.layer_types, gemma) {
            (Some(types), true) => {
                if types.len() != num_layers {
                    return Err(err(
                        "layer_types",
                        &format!(
                            "has {} entries but num_hidden_layers is {num_layers}",
                            types.len()
                        ),
                    ));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        "full_attention" => Ok(LayerType::Full),
                        "sliding_attention" => Ok(LayerType::Sliding),
                        other => Err(err(
                            "layer_types",
                            &format!(
                                "`{other}` is not a layer type (full_attention, sliding_attention)"
                            ),
                        )),
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            (None, true) => {
                // Older Gemma 3 configs: every `sliding_window_pattern`-th layer is global.
                let pattern = hf.sliding_window_pattern.unwrap_or(6).max(1);
                (0..num_layers)
                    .map(|i| match (i + 1) % pattern {
                        0 => LayerType::Full,
                        _ => LayerType::Sliding,
                    })
                    .collect()
            }
            _ if sliding_window.is_some() => vec![LayerType::Sliding; num_layers],
            _ => vec![LayerType::Full; num_layers],
        };
        if gemma && sliding_window.is_none() && layer_types.contains(&LayerType::Sliding) {
            return Err(err(
                "sliding_window",
                "missing, but layer_types has sliding layers",
            ));
        }
        let tie_default = gemma;
        Ok(ModelConfig {
            family,
            vocab_size: need(hf.vocab_size, "vocab_size")?,
            hidden_size: hidden,
            intermediate_size: need(hf.intermediate_size, "intermediate_size")?,
            num_layers,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(tie_default),
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(2048),
            attention_bias: match family {
                Family::Qwen2 => true,
                _ => hf.attention_bias.unwrap_or(false),
            },
            mlp_bias: hf.mlp_bias.unwrap_or(false),
            sliding_window,
            layer_types,
            hidden_act,
            rope_local_theta,
            query_pre_attn_scalar: if gemma {
                Some(hf.query_pre_attn_scalar.unwrap_or(256.0))
            } else {
                None
            },
            bos_token_id: ids(&hf.bos_token_id).first().copied(),
            eos_token_ids: ids(&hf.eos_token_id),
        })
    }
}

/// Parse a `rope_scaling` / `rope_parameters` object.
pub fn parse_rope_scaling(
    v: Option<&serde_json::Value>,
) -> std::result::Result<RopeScaling, String> {
    let Some(obj) = v.filter(|v| !v.is_null()) else {
        return Ok(RopeScaling::None);
    };
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let num = |k: &str| -> std::result::Result<f64, String> {
        obj.get(k)
            .and_then(|v| v.as_f64())
            .ok_or_else(|| format!("rope type `{kind}` needs numeric `{k}`"))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => Err(format!(
            "rope type `{other}` is not supported (default, linear, llama3)"
        )),
    }
}
