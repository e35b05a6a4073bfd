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
    #[error("{path}: chat template: {msg}")]
    ChatTemplate { path: String, msg: String },
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
    let mut tok = Tokenizer::from_gguf(&content)?;
    tok.set_source_desc(format!("{} (GGUF metadata)", path.display()));
    Ok(tok)
}

/// [`load_tokenizer`], with the default chat template replaced by `template`'s file when given
/// (`model.chat_template`, `--chat-template`): a base model's GGUF carries none, and a user may
/// train with another.
pub fn load_tokenizer_with(path: &Path, template: Option<&Path>) -> Result<Tokenizer, LmError> {
    let mut tok = load_tokenizer(path)?;
    if let Some(t) = template {
        set_template_file(&mut tok, t)?;
    }
    Ok(tok)
}

/// Replaces `tok`'s default chat template with the Jinja file at `path`.
pub fn set_template_file(tok: &mut Tokenizer, path: &Path) -> Result<(), LmError> {
    let err = |msg: String| LmError::ChatTemplate {
        path: path.display().to_string(),
        msg,
    };
    let source = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    tok.set_chat_template(&source)
        .map_err(|e| err(e.to_string()))
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

    /// Replaces the tokenizer's default chat template with a file's (see [`load_tokenizer_with`]).
    pub fn set_chat_template_file(&mut self, path: Option<&Path>) -> Result<(), LmError> {
        match path {
            Some(p) => set_template_file(&mut self.tokenizer, p),
            None => Ok(()),
        }
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
