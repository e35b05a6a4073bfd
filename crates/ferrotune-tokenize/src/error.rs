//! The one error type of the `tokenize` room. Owns the wording of every failure a user can cause
//! while loading a tokenizer or rendering a chat (which file, which field, which message); it does
//! not decide what the caller does about it.

use std::path::PathBuf;

/// The error type of `ferrotune-tokenize`. Every variant names where the problem is.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    /// A file could not be read (missing, unreadable).
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON file is not valid JSON or does not have the expected shape.
    #[error("malformed JSON in {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A field of a configuration file has a value we cannot use.
    #[error("{path}: field `{field}` {reason}")]
    Field {
        path: PathBuf,
        field: String,
        reason: String,
    },

    /// The `tokenizers` crate refused a file or an input.
    #[error("tokenizer error ({context}): {message}")]
    Tokenizers { context: String, message: String },

    /// A GGUF metadata key is missing or has the wrong type.
    #[error("GGUF metadata `{key}`: {reason}")]
    Gguf { key: String, reason: String },

    /// The GGUF names a tokenizer model we do not build yet.
    #[error(
        "unsupported tokenizer model `{model}` in GGUF metadata `tokenizer.ggml.model` \
         (supported: \"gpt2\" byte-level BPE, \"llama\" sentencepiece BPE (Gemma included) except Phi-3); \
         load the model's Hugging Face tokenizer.json instead"
    )]
    UnsupportedTokenizerModel { model: String },

    /// A token string the caller named is not in the vocabulary.
    #[error("token {token:?} is not in the vocabulary ({context})")]
    UnknownToken { token: String, context: String },

    /// A render was asked for but the tokenizer has no chat template.
    #[error("no chat template: {source_desc} has none (tokenizer_config.json `chat_template`, chat_template.jinja or GGUF `tokenizer.chat_template`); give a template file with --chat-template FILE or model.chat_template (e.g. configs/templates/gemma3.jinja)")]
    NoChatTemplate { source_desc: String },

    /// A named chat template does not exist.
    #[error("no chat template named `{name}` (available: {available:?})")]
    UnknownTemplate {
        name: String,
        available: Vec<String>,
    },

    /// The template failed to compile or to render (including `raise_exception(...)` calls).
    #[error("chat template `{name}`: {detail}")]
    Template { name: String, detail: String },

    /// The assistant mask could not locate an assistant turn in the whole render: the template
    /// renders that turn unrecognisably once later turns exist.
    #[error(
        "cannot compute the assistant mask for message {message_index}: {reason}. The template \
         renders this turn differently once later turns exist; use a template whose earlier \
         turns keep (a tail of) their text"
    )]
    MaskNotPrefixStable {
        message_index: usize,
        reason: String,
    },
}

impl TokenizeError {
    pub(crate) fn template(name: &str, err: &minijinja::Error) -> Self {
        // minijinja's alternate Display adds the template line and the failing expression.
        let mut detail = format!("{err:#}");
        let mut source = std::error::Error::source(err);
        while let Some(inner) = source {
            detail.push_str(&format!(": {inner}"));
            source = inner.source();
        }
        TokenizeError::Template {
            name: name.to_string(),
            detail,
        }
    }

    pub(crate) fn tokenizers(context: impl Into<String>, err: &tokenizers::Error) -> Self {
        TokenizeError::Tokenizers {
            context: context.into(),
            message: err.to_string(),
        }
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, TokenizeError>;
