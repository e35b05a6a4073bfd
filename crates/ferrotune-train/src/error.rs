//! What a trainer can fail with: one enum for the crate, each variant naming its cause (the
//! library errors it wraps keep their own messages).
//!
//! Owns: the error type. Does not own: printing it (the CLI prints the whole chain).

use crate::distill_loss::DistillLossError;
use crate::grpo_loss::GrpoLossError;
use crate::optim::OptimError;
use crate::ppo_loss::PpoLossError;
use crate::pref_loss::PrefLossError;
use crate::step::StepError;
use ferrotune_ckpt::CkptError;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Step(#[from] StepError),
    #[error(transparent)]
    Optim(#[from] OptimError),
    #[error(transparent)]
    Ckpt(#[from] CkptError),
    #[error(transparent)]
    Data(#[from] ferrotune_data::DataError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    GrpoLoss(#[from] GrpoLossError),
    #[error(transparent)]
    PpoLoss(#[from] PpoLossError),
    #[error(transparent)]
    PrefLoss(#[from] PrefLossError),
    #[error(transparent)]
    DistillLoss(#[from] DistillLossError),
    /// A plan (config) that cannot run: `key` is the config key at fault, `reason` says why
    /// (and names the key for the user).
    #[error("{reason}")]
    Invalid { key: &'static str, reason: String },
    /// An RL run was given no prompt to train on.
    #[error("no training prompts")]
    NoPrompts,
    /// Training data that cannot be trained on as it is (a pair with an empty side, ...).
    #[error("{0}")]
    Input(String),
    /// The caller's environment (reward functions, a scorer) failed.
    #[error("{0}")]
    Env(String),
    /// The caller's eval hook (e.g. the perplexity regression gate) failed.
    #[error("{0}")]
    Hook(String),
    /// A distillation teacher cache that does not hold what the run needs.
    #[error("{0}")]
    TeacherCache(String),
    /// Something the trainer supports for no model, said before any work is done.
    #[error("{0}")]
    Unsupported(&'static str),
    #[error("{path}: {msg}")]
    Io { path: String, msg: String },
    /// A trainer's own invariant broke (a bug in ferrotune, not in the user's input).
    #[error("internal error: {0}")]
    Internal(&'static str),
    #[error("trainer state: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("checkpoint {path}: trainer_state.json: {msg}")]
    State { path: String, msg: String },
}

impl TrainError {
    /// A refused plan naming its key.
    pub fn invalid(key: &'static str, reason: impl Into<String>) -> Self {
        TrainError::Invalid {
            key,
            reason: reason.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, TrainError>;
