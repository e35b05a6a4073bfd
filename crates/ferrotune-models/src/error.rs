//! Errors of the `models` room. Every variant names the file (and key or field) it is about, so
//! the CLI can print one line that tells the user what to fix.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: field `{field}`: {msg}")]
    Config {
        path: PathBuf,
        field: String,
        msg: String,
    },
    #[error(
        "{path}: unknown model_type `{model_type}` (supported: llama, mistral, qwen2, qwen3, gpt2)"
    )]
    UnknownModelType { path: PathBuf, model_type: String },
    #[error("{path}: is a Python pickle ({what}); ferrotune never unpickles. Convert it to safetensors first, e.g. `python -c \"from transformers import AutoModelForCausalLM as M; M.from_pretrained('DIR').save_pretrained('OUT', safe_serialization=True)\"`")]
    Pickle { path: PathBuf, what: String },
    #[error("{path}: not a readable safetensors file (truncated or corrupt?): {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("{path}: not a readable GGUF file: {msg}")]
    Gguf { path: PathBuf, msg: String },
    #[error("{path}: weights do not match the model: {}", .problems.join("; "))]
    Weights {
        path: PathBuf,
        problems: Vec<String>,
    },
    #[error("{path}: no model found (expected config.json with model.safetensors or model.safetensors.index.json, or a .gguf file)")]
    NotAModel { path: PathBuf },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;
