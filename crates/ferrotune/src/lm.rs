//! A model together with its tokenizer, loaded from one path (Hugging Face folder or GGUF
//! file), plus the device/dtype choice shared by every command.

use std::path::Path;

use candle_core::{DType, Device};
use ferrotune_models::{CausalLm, LoadOptions};
use ferrotune_tokenize::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum LmError {
    #[error(transparent)]
    Model(#[from] ferrotune_models::ModelError),
    #[error(transparent)]
    Tokenize(#[from] ferrotune_tokenize::TokenizeError),
    #[error("{path}: not a readable GGUF file: {msg}")]
    Gguf { path: String, msg: String },
    #[error("unknown device `{0}` (use cpu, cuda or cuda:N)")]
    Device(String),
    #[error("unknown dtype `{0}` (use f32, bf16 or f16)")]
    DType(String),
    #[error("device {0}: {1}")]
    DeviceInit(String, candle_core::Error),
}

/// Parse `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device, LmError> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0).map_err(|e| LmError::DeviceInit(s.into(), e)),
        _ => match s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => Device::new_cuda(n).map_err(|e| LmError::DeviceInit(s.into(), e)),
            None => Err(LmError::Device(s.into())),
        },
    }
}

/// Parse `f32`, `bf16`, `f16`.
pub fn parse_dtype(s: &str) -> Result<DType, LmError> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        _ => Err(LmError::DType(s.into())),
    }
}

/// A model and its tokenizer.
pub struct Lm {
    pub model: Box<dyn CausalLm>,
    pub tokenizer: Tokenizer,
    pub device: Device,
    /// Trainable base weights (full fine-tuning only), by checkpoint name.
    pub base_params: Vec<(String, candle_core::Var)>,
}

/// The tokenizer of a model path (HF folder or GGUF metadata) without loading its weights.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer, LmError> {
    if !path.is_file() {
        return Ok(Tokenizer::from_dir(path)?);
    }
    let gguf = |msg: String| LmError::Gguf {
        path: path.display().to_string(),
        msg,
    };
    let mut f = std::fs::File::open(path).map_err(|e| gguf(e.to_string()))?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut f)
        .map_err(|e| gguf(e.to_string()))?;
    Ok(Tokenizer::from_gguf(&content)?)
}

impl Lm {
    /// Load a model and its tokenizer; with `adapter`, also a PEFT adapter folder on top
    /// (its own LoRA config replaces `opts.lora`).
    pub fn load_with(
        path: &Path,
        adapter: Option<&Path>,
        opts: &LoadOptions,
    ) -> Result<Lm, LmError> {
        let mut opts = opts.clone();
        if let Some(dir) = adapter {
            let peft = ferrotune_models::adapter::PeftConfig::from_dir(dir)?;
            opts.lora = Some((peft.lora_config()?, 0));
        }
        let lm = Self::load(path, &opts)?;
        if let Some(dir) = adapter {
            ferrotune_models::adapter::load_weights(lm.model.as_ref(), dir)?;
        }
        Ok(lm)
    }

    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Lm, LmError> {
        let loaded = ferrotune_models::load(path, opts)?;
        let tokenizer = load_tokenizer(path)?;
        Ok(Lm {
            model: loaded.model,
            tokenizer,
            device: opts.device.clone(),
            base_params: loaded.base_params,
        })
    }

    /// End-of-sequence ids: the tokenizer's (eos + end-of-turn) and the model config's.
    pub fn eos_ids(&self) -> Vec<u32> {
        let mut ids = self.tokenizer.eos_ids().to_vec();
        for &i in &self.model.config().eos_token_ids {
            if !ids.contains(&i) {
                ids.push(i);
            }
        }
        ids
    }

    /// Padding id for batches (never attended to): the tokenizer's pad, else eos, else 0.
    pub fn pad_id(&self) -> u32 {
        self.tokenizer
            .pad_id()
            .or_else(|| self.eos_ids().first().copied())
            .unwrap_or(0)
    }
}
