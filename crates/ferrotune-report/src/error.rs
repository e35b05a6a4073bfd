//! The one error type of the `report` room. Every variant carries the file it concerns so a
//! failed write or a corrupt metrics line can be found without a debugger. Does not own any
//! recovery policy: callers decide whether a reporting failure should stop training.

use std::path::PathBuf;

/// Errors from writing or reading run reports.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}:{line}: not a metrics record: {reason}")]
    BadMetricsLine {
        path: PathBuf,
        line: usize,
        reason: String,
    },

    #[error("metric key {key:?} is reserved (the writer sets `step` and `time` itself)")]
    ReservedKey { key: String },

    #[error("metric key must not be empty")]
    EmptyKey,

    #[error("metric key {key:?} appears twice in one record")]
    DuplicateKey { key: String },

    #[error("plot {path}: {reason}")]
    Plot { path: PathBuf, reason: String },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, ReportError>;

impl ReportError {
    /// Wraps an I/O error with what we were doing and to which file.
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        ReportError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
