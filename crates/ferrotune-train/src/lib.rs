//! Trainers, one visible loop per method (`sft`, `grpo`, `dpo`, `reward_train`, `ppo`,
//! `distill`), what they share (`trainer`: state, cadence, update, checkpoints, resume;
//! `rollout`: sampling and scoring for the RL methods), and the step helpers: token losses,
//! AdamW, LR schedules, clipping, accumulation, non-finite guard.
//!
//! Owns: training math and the order of a step. Does not own: file parsing, progress bars,
//! checkpoint formats (it calls `ferrotune-ckpt`), or when to print.

pub mod distill;
pub mod distill_loss;
pub mod distill_teacher;
pub mod dpo;
pub mod error;
pub mod grpo;
pub mod grpo_adv;
pub mod grpo_loss;
pub mod health;
pub mod loss;
mod names;
pub mod optim;
pub mod plan;
pub mod ppo;
pub mod ppo_gae;
pub mod ppo_loss;
pub mod pref_loss;
pub mod reward_train;
pub mod rollout;
pub mod schedule;
pub mod sft;
pub mod step;
pub mod trainer;
pub mod value_head;
