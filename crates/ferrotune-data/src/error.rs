//! The data room's error type. Every variant that comes from a user's file names the file and,
//! where there is one, the line (JSONL/CSV line, or Parquet row index + 1) and the column, so a
//! message can be pasted straight into an editor's "go to line". It owns no I/O.

use std::path::PathBuf;

use ferrotune_tokenize::TokenizeError;

pub type Result<T, E = DataError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "{path}: unknown dataset extension {ext:?}; expected .jsonl, .json (JSON Lines), \
         .parquet or .csv"
    )]
    UnknownExtension { path: PathBuf, ext: String },

    #[error("{path}: malformed JSON at line {line}: {source}")]
    Json {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },

    #[error("{path}:{line}: expected a JSON object (one example per line), found {found}")]
    NotAnObject {
        path: PathBuf,
        line: usize,
        found: &'static str,
    },

    #[error("{path}: CSV error at line {line}: {message}")]
    Csv {
        path: PathBuf,
        line: usize,
        message: String,
    },

    #[error("{path}: Parquet error{}: {message}", row.map(|r| format!(" at row {r}")).unwrap_or_default())]
    Parquet {
        path: PathBuf,
        /// 1-based row, when the error is tied to one.
        row: Option<usize>,
        message: String,
    },

    #[error("{path}: the dataset has no rows")]
    Empty { path: PathBuf },

    #[error("{path}:{line}: cannot tell the dataset format from columns [{columns}]; {expected}")]
    UnknownFormat {
        path: PathBuf,
        line: usize,
        columns: String,
        expected: &'static str,
    },

    #[error("{path}:{line}: missing column `{column}`")]
    MissingColumn {
        path: PathBuf,
        line: usize,
        column: String,
    },

    #[error("{path}:{line}: column `{column}` must be {expected}, found {found}")]
    WrongType {
        path: PathBuf,
        line: usize,
        /// Column path, e.g. `messages[1].content`.
        column: String,
        expected: &'static str,
        found: String,
    },

    #[error("example {index}: {reason}")]
    Example { index: usize, reason: String },

    #[error("example {index}: tokenizing failed: {source}")]
    Tokenize {
        index: usize,
        #[source]
        source: TokenizeError,
    },

    #[error("invalid data option: {0}")]
    InvalidOption(String),

    #[error(
        "example {index} has {len} tokens, more than max_seq_len = {max_seq_len}; truncate before \
         packing"
    )]
    TooLongToPack {
        index: usize,
        len: usize,
        max_seq_len: usize,
    },
}

/// The JSON type name, for `found …` in messages.
pub(crate) fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}
