//! The `ckpt` room: the run folder, atomic checkpoints and resume state, PEFT adapter
//! export/import, and merge-and-export to a plain Hugging Face folder.
//!
//! Owns: where files go and how they are written so that a crash never leaves a half-written
//! file looking complete (write to a hidden sibling, fsync, marker last, rename). Does not own:
//! when to save (the trainer decides), what the trainer state means, metrics or plots (`report`),
//! or reading model weights (`models`).

pub mod checkpoint;
pub mod error;
pub mod export;
pub mod files;
pub mod peft;
pub mod reward;
pub mod run;

pub use checkpoint::{
    complete_steps, latest_complete, load_checkpoint, load_latest, prune, save_checkpoint,
    save_checkpoint_with, Checkpoint, CheckpointParts, CheckpointWeights, LatestCheckpoint,
    Weights, COMPLETE,
};
pub use error::{CkptError, Result};
pub use export::{
    export_layer_subset, export_merged, export_model, hf_config_json, ExportExtras, ExportReport,
};
pub use peft::{load_with_adapter, save_adapter};
pub use reward::{
    export_reward_model, load_reward_adapter, restore_reward_adapter, save_reward_adapter,
};
pub use run::{OnExisting, RunDir};
