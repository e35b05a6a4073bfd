//! The ferrotune library behind the binary: model + tokenizer loading as one unit, and the
//! evaluation room (perplexity). Trainers and the CLI's plumbing live in their own modules.

/// Serde's `default = "..."` functions, one line each:
/// `serde_defaults! { d_lr: f64 = 2e-4; }` writes `fn d_lr() -> f64 { 2e-4 }`.
macro_rules! serde_defaults {
    ($($name:ident: $ty:ty = $value:expr;)*) => {
        $(fn $name() -> $ty {
            $value
        })*
    };
}

pub mod bench;
pub mod compare;
pub mod config;
pub mod corpus;
pub mod demo;
pub mod distill_run;
pub mod dpo_run;
pub mod eval;
pub mod grpo_run;
pub mod lm;
pub mod model_reward;
pub mod ppo_run;
pub mod pretrain_run;
pub mod rm_run;
pub mod session;
pub mod sft_run;
pub mod speculative_run;
pub mod task_eval;
pub mod teacher_cache;
