//! What every trainer's loop shares, resolved from the config once: how many steps of how many
//! examples, the optimizer and its schedule, and the logging / eval / checkpoint cadence. Each
//! trainer's plan holds one as `run` beside what is its own (the loss, sampling, ...).
//!
//! Owns: the shared fields. Does not own: reading them from a config (the CLI's runners).

use crate::optim::AdamWConfig;
use crate::schedule::Schedule;

/// The loop settings every trainer shares.
#[derive(Debug, Clone)]
pub struct LoopPlan {
    pub seed: u64,
    pub total_steps: usize,
    /// Examples (pairs, prompts) per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub learning_rate: f64,
    pub schedule: Schedule,
    pub adamw: AdamWConfig,
    /// Clip the global gradient norm to this (0 = no clipping; the norm is still measured).
    pub max_grad_norm: f64,
    pub log_every: usize,
    /// 0 = only at the end.
    pub save_every: usize,
    /// 0 = never.
    pub eval_every: usize,
    /// Keep only the newest N checkpoints (0 = keep all).
    pub keep_last: usize,
    /// Stop after this many consecutive steps with a non-finite loss or gradient.
    pub max_nonfinite_steps: usize,
    pub shuffle: bool,
    /// Right-padding id of the collated batches.
    pub pad_id: u32,
}
