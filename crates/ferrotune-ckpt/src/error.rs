//! Errors of the `ckpt` room. Every variant names the file or folder it is about and says what
//! to do, so the CLI can print one line the user can act on.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CkptError {
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
    #[error("{path}: cannot read or write safetensors: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error(
        "{path}: the folder is not empty and is not a ferrotune run (it holds {}); refusing to \
         write a run there. Pick another output folder, or ask to overwrite",
        .entries.join(", ")
    )]
    ForeignFolder { path: PathBuf, entries: Vec<String> },
    #[error(
        "{path}: already a ferrotune run ({checkpoints} checkpoint(s)); resume it, or ask to \
         overwrite it to start over"
    )]
    RunExists { path: PathBuf, checkpoints: usize },
    #[error("{path}: not a ferrotune run (no `{marker}` file); was it created by `ferrotune`?")]
    NotARun { path: PathBuf, marker: &'static str },
    #[error(
        "{run}: no complete checkpoint to resume from; only half-written ones (no COMPLETE \
         marker, e.g. the run stopped while saving): {}. Delete them or start a new run",
        .folders.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    OnlyIncomplete { run: PathBuf, folders: Vec<PathBuf> },
    #[error("{path}: checkpoint is not complete (no COMPLETE marker); it was never finished")]
    Incomplete { path: PathBuf },
    #[error("{path}: checkpoint is damaged: {msg}")]
    Damaged { path: PathBuf, msg: String },
    #[error("{path}: a checkpoint for step {step} already exists; existing checkpoints are never overwritten")]
    CheckpointExists { path: PathBuf, step: u64 },
    #[error("{path}: the output folder already exists and is not empty; exports never overwrite files. Pick a new folder or delete it")]
    OutputExists { path: PathBuf },
    #[error(
        "{adapter}: target_modules {targets} match no linear slot of the model at {model} \
         (its slots end in: {})",
        .slots.join(", ")
    )]
    NoTargetMatch {
        adapter: PathBuf,
        model: PathBuf,
        targets: String,
        slots: Vec<String>,
    },
    #[error("the model has no LoRA adapters to save (was it loaded with a LoRA config?)")]
    NoAdapters,
    #[error("LoRA slot {slot}: {msg}")]
    AdapterMismatch { slot: String, msg: String },
    #[error("{path}: {msg}")]
    Unsupported { path: PathBuf, msg: String },
    #[error(transparent)]
    Model(#[from] ferrotune_models::ModelError),
    #[error(transparent)]
    Tokenize(#[from] ferrotune_tokenize::TokenizeError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, CkptError>;

/// Attach a path to an I/O error.
pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> CkptError {
    let path = path.into();
    move |source| CkptError::Io { path, source }
}
