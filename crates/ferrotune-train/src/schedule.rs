//! Learning-rate schedules, computed exactly as Hugging Face's `transformers.get_scheduler`
//! does (`constant`, `constant_with_warmup`, `linear`, `cosine`), and the Trainer's resolution
//! of a warmup given as a ratio of the total steps.
//!
//! Owns: the lr for a given optimizer step. Does not own: the optimizer (see [`crate::optim`]),
//! counting steps, or reading the schedule from a config file.
//!
//! Step indexing: `lr_at(k, base_lr)` is the learning rate used by optimizer step `k`, counted
//! from 0 (the number of optimizer steps already taken). This is what `LambdaLR` holds in the
//! param group when the Trainer calls `optimizer.step()` and then `scheduler.step()`: the first
//! step uses `lr_at(0)`, which is 0 under any warmup. (The Trainer *logs* the lr after
//! `scheduler.step()`, i.e. `lr_at(k + 1)`; we log the lr actually used.)

use crate::names::config_names;
use serde::{Deserialize, Serialize};

/// What can be wrong with a schedule's settings.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ScheduleError {
    #[error(
        "warmup ratio must be in [0, 1), got {0} (a warmup of 1 or more is a number of steps)"
    )]
    Ratio(f64),
    #[error(
        "schedule `constant` ignores warmup ({0} steps were asked for); \
         use `constant_with_warmup` to warm up"
    )]
    ConstantWithWarmup(usize),
    #[error("schedule `{kind}` needs the total number of optimizer steps, got 0")]
    NoSteps { kind: &'static str },
    #[error(
        "unknown lr schedule `{0}`: expected one of constant, constant_with_warmup, linear, cosine"
    )]
    UnknownKind(String),
    #[error("warmup of {warmup} steps is longer than the {total} total optimizer steps")]
    WarmupTooLong { warmup: usize, total: usize },
}

/// The schedule's family, as named in Hugging Face's `lr_scheduler_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
}

config_names!(ScheduleKind, ScheduleError, ScheduleError::UnknownKind, {
    Constant => "constant",
    ConstantWithWarmup => "constant_with_warmup",
    Linear => "linear",
    Cosine => "cosine",
});

impl ScheduleKind {
    /// The Hugging Face name (= [`ScheduleKind::as_str`]; tests and callers from before
    /// `config_names!` use this name).
    pub fn name(self) -> &'static str {
        self.as_str()
    }
}

/// Warmup length: a number of optimizer steps, or a ratio of the total steps (transformers 4's
/// `warmup_ratio`; in transformers 5 a `warmup_steps` below 1 is read as this ratio).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Warmup {
    Steps(usize),
    Ratio(f64),
}

impl Warmup {
    /// Warmup steps for a run of `total_steps` optimizer steps. A ratio resolves to
    /// `ceil(total_steps * ratio)` computed in f64, as `TrainingArguments.get_warmup_steps`
    /// does, float rounding included: 100 × 0.07 = 7.000000000000001, so 8 steps.
    pub fn steps(self, total_steps: usize) -> Result<usize, ScheduleError> {
        match self {
            Warmup::Steps(n) => Ok(n),
            Warmup::Ratio(r) => {
                if !(0.0..1.0).contains(&r) {
                    return Err(ScheduleError::Ratio(r));
                }
                Ok((total_steps as f64 * r).ceil() as usize)
            }
        }
    }
}

/// A learning-rate schedule with its step counts resolved. The factor multiplies the base lr.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// Factor 1 throughout.
    Constant,
    /// Linear from 0 to 1 over `warmup_steps`, then 1.
    ConstantWithWarmup { warmup_steps: usize },
    /// Warmup, then linear decay to 0 at `total_steps` (0 after).
    Linear {
        warmup_steps: usize,
        total_steps: usize,
    },
    /// Warmup, then `0.5 (1 + cos(π · 2 · num_cycles · progress))`, clamped at 0; with
    /// `num_cycles = 0.5` (Hugging Face's default) a half cosine reaching 0 at `total_steps`.
    /// Past `total_steps` the formula rises again, exactly as transformers' does.
    Cosine {
        warmup_steps: usize,
        total_steps: usize,
        num_cycles: f64,
    },
}

impl Schedule {
    /// Builds a schedule as `get_scheduler(kind, num_warmup_steps, num_training_steps)` does,
    /// with the cosine's `num_cycles` at its default 0.5. Refuses a warmup on `constant`
    /// (Hugging Face silently ignores it) and a warmup longer than the run.
    pub fn new(
        kind: ScheduleKind,
        warmup: Warmup,
        total_steps: usize,
    ) -> Result<Schedule, ScheduleError> {
        let warmup_steps = warmup.steps(total_steps)?;
        if kind != ScheduleKind::Constant && total_steps > 0 && warmup_steps > total_steps {
            return Err(ScheduleError::WarmupTooLong {
                warmup: warmup_steps,
                total: total_steps,
            });
        }
        let decays = matches!(kind, ScheduleKind::Linear | ScheduleKind::Cosine);
        if decays && total_steps == 0 {
            return Err(ScheduleError::NoSteps {
                kind: kind.as_str(),
            });
        }
        Ok(match kind {
            ScheduleKind::Constant => {
                if warmup_steps > 0 {
                    return Err(ScheduleError::ConstantWithWarmup(warmup_steps));
                }
                Schedule::Constant
            }
            ScheduleKind::ConstantWithWarmup => Schedule::ConstantWithWarmup { warmup_steps },
            ScheduleKind::Linear => Schedule::Linear {
                warmup_steps,
                total_steps,
            },
            ScheduleKind::Cosine => Schedule::Cosine {
                warmup_steps,
                total_steps,
                num_cycles: 0.5,
            },
        })
    }

    /// The multiplier of the base lr for optimizer step `step` (0-based), the `lr_lambda` of
    /// transformers' `optimization.py`, term for term so the f64 results agree.
    pub fn factor(&self, step: usize) -> f64 {
        let warm = |warmup_steps: usize| step as f64 / warmup_steps.max(1) as f64;
        match *self {
            Schedule::Constant => 1.0,
            Schedule::ConstantWithWarmup { warmup_steps } => {
                if step < warmup_steps {
                    warm(warmup_steps)
                } else {
                    1.0
                }
            }
            Schedule::Linear {
                warmup_steps,
                total_steps,
            } => {
                if step < warmup_steps {
                    return warm(warmup_steps);
                }
                // Signed: past the end the numerator goes negative and the max clamps it.
                let left = total_steps as f64 - step as f64;
                let span = total_steps.saturating_sub(warmup_steps).max(1) as f64;
                (left / span).max(0.0)
            }
            Schedule::Cosine {
                warmup_steps,
                total_steps,
                num_cycles,
            } => {
                if step < warmup_steps {
                    return warm(warmup_steps);
                }
                let span = total_steps.saturating_sub(warmup_steps).max(1) as f64;
                let progress = (step - warmup_steps) as f64 / span;
                let c = (std::f64::consts::PI * num_cycles * 2.0 * progress).cos();
                (0.5 * (1.0 + c)).max(0.0)
            }
        }
    }

    /// The learning rate used by optimizer step `step` (0-based): `base_lr * factor(step)`.
    pub fn lr_at(&self, step: usize, base_lr: f64) -> f64 {
        base_lr * self.factor(step)
    }
}
