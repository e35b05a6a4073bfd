//! The config's schema: one struct per TOML section, each field a key under its Hugging Face /
//! TRL name, with its type and its default (`d_*`, the one place a default is written; the
//! `--explain` table is tested against them). Unknown keys are refused.

use std::path::PathBuf;

use ferrotune_train::grpo_loss::{ImportanceSamplingLevel, LossType, ScaleRewards};
use ferrotune_train::ppo_loss::KlEstimator;
use ferrotune_train::pref_loss::DpoLossType;
use ferrotune_train::schedule::ScheduleKind;
use serde::{Deserialize, Serialize};

/// DPO's `truncation_mode`: TRL 1.16 supports only keeping the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TruncationMode {
    KeepStart,
}

/// The keys whose value is one of a fixed set of names, with those names (from the enums
/// themselves). They are checked on the raw TOML before it is deserialised, so a wrong name is
/// refused with its key; `why` (when given) replaces "is not one of ...".
pub(super) fn choices() -> [(&'static str, &'static [&'static str], Option<&'static str>); 7] {
    let keep_start = Some("is not supported: only keep_start (as TRL 1.16)");
    [
        ("optim.lr_scheduler_type", &ScheduleKind::NAMES, None),
        ("grpo.scale_rewards", &ScaleRewards::NAMES, None),
        ("grpo.loss_type", &LossType::NAMES, None),
        (
            "grpo.importance_sampling_level",
            &ImportanceSamplingLevel::NAMES,
            None,
        ),
        ("dpo.loss_type", &DpoLossType::NAMES, None),
        ("dpo.truncation_mode", &["keep_start"], keep_start),
        ("ppo.kl_estimator", &KlEstimator::NAMES, None),
    ]
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Hugging Face folder or .gguf file.
    pub path: PathBuf,
    #[serde(default = "d_dtype")]
    pub dtype: String,
    #[serde(default = "d_device")]
    pub device: String,
    /// A Jinja chat template file replacing the model's (a base GGUF has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    #[serde(default = "d_r")]
    pub r: usize,
    #[serde(default = "d_alpha")]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f32,
    /// A list of module names, or "all-linear".
    #[serde(default = "d_targets")]
    pub target_modules: toml::Value,
    #[serde(default)]
    pub use_rslora: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Training set: .jsonl, .parquet or .csv with TRL columns.
    pub train: PathBuf,
    /// Optional held-out set.
    #[serde(default)]
    pub eval: Option<PathBuf>,
    /// Fraction of `train` held out for eval when `eval` is not given.
    #[serde(default)]
    pub eval_fraction: f64,
    #[serde(default = "d_max_seq_len")]
    pub max_seq_len: usize,
    #[serde(default)]
    pub packing: bool,
    #[serde(default = "d_true")]
    pub shuffle: bool,
    /// Loss only on completion / assistant tokens (TRL's completion_only_loss).
    #[serde(default = "d_true")]
    pub completion_only_loss: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimSection {
    #[serde(default = "d_lr")]
    pub learning_rate: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "d_beta1")]
    pub adam_beta1: f64,
    #[serde(default = "d_beta2")]
    pub adam_beta2: f64,
    #[serde(default = "d_eps")]
    pub adam_epsilon: f64,
    /// Global-norm clipping; 0 disables.
    #[serde(default = "d_clip")]
    pub max_grad_norm: f64,
    /// constant | constant_with_warmup | linear | cosine
    #[serde(default = "d_sched")]
    pub lr_scheduler_type: ScheduleKind,
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default)]
    pub warmup_ratio: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    pub output_dir: PathBuf,
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Total optimizer steps; 0 = derive from num_train_epochs.
    #[serde(default)]
    pub max_steps: usize,
    #[serde(default = "d_epochs")]
    pub num_train_epochs: f64,
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    #[serde(default = "d_one")]
    pub gradient_accumulation_steps: usize,
    #[serde(default = "d_log_every")]
    pub log_every: usize,
    /// Save a checkpoint every N steps (0 = only at the end).
    #[serde(default)]
    pub save_every: usize,
    /// Eval loss every N steps (0 = never).
    #[serde(default)]
    pub eval_every: usize,
    /// Keep the newest N checkpoints (0 = keep all).
    #[serde(default)]
    pub keep_last: usize,
    /// Stop after this many consecutive non-finite steps.
    #[serde(default = "d_nonfinite")]
    pub max_nonfinite_steps: usize,
}

/// `[sft]`: supervised fine-tuning. (Its data options live in `[data]`.)
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct SftSection {}

/// `[eval]`: the perplexity regression gate on a held-out "do not forget" text.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Text file (or JSONL with `text`) whose perplexity must not rise.
    #[serde(default)]
    pub forget_set: Option<PathBuf>,
    #[serde(default = "d_max_ppl_ratio")]
    pub max_ppl_ratio: f64,
    #[serde(default)]
    pub stop_on_regression: bool,
}

fn d_max_ppl_ratio() -> f64 {
    1.05
}

/// `[grpo]`: group relative policy optimisation with verifiable rewards. Names and defaults
/// follow TRL's `GRPOConfig` (`max_prompt_len` keeps the older TRL prompt truncation).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GrpoSection {
    #[serde(default = "d_num_generations")]
    pub num_generations: usize,
    #[serde(default = "d_max_prompt_len")]
    pub max_prompt_len: usize,
    #[serde(default = "d_max_completion_len")]
    pub max_completion_len: usize,
    #[serde(default = "d_temperature")]
    pub temperature: f64,
    #[serde(default = "d_top_p")]
    pub top_p: f64,
    #[serde(default)]
    pub top_k: usize,
    #[serde(default)]
    pub beta: f64,
    #[serde(default = "d_epsilon")]
    pub epsilon: f64,
    /// Defaults to `epsilon`.
    #[serde(default)]
    pub epsilon_high: Option<f64>,
    #[serde(default = "d_one")]
    pub num_iterations: usize,
    #[serde(default = "d_scale_rewards")]
    pub scale_rewards: ScaleRewards,
    #[serde(default = "d_loss_type")]
    pub loss_type: LossType,
    /// token | sequence (GSPO).
    #[serde(default = "d_importance_sampling_level")]
    pub importance_sampling_level: ImportanceSamplingLevel,
    /// Multiply the k3 KL by the importance weight (TRL 1.16's default).
    #[serde(default = "d_true")]
    pub use_bias_correction_kl: bool,
    /// Two-sided clip: cap on the unclipped weight (INTELLECT-2); none = off.
    #[serde(default)]
    pub delta: Option<f64>,
    #[serde(default = "d_sapo_temperature_pos")]
    pub sapo_temperature_pos: f64,
    #[serde(default = "d_sapo_temperature_neg")]
    pub sapo_temperature_neg: f64,
    /// Train only the top fraction of tokens by entropy (1.0 = all).
    #[serde(default = "d_one_f64")]
    pub top_entropy_quantile: f64,
    #[serde(default)]
    pub mask_truncated_completions: bool,
    /// DAPO's dynamic sampling: train only groups whose rewards differ, sampling more prompts.
    #[serde(default)]
    pub dynamic_sampling: bool,
    /// Generation rounds per generation batch with dynamic sampling (verl's name).
    #[serde(default = "d_max_num_gen_batches")]
    pub max_num_gen_batches: usize,
    #[serde(default = "d_true")]
    pub log_completions: bool,
    /// Generation stops after any of these strings (kept in the completion).
    #[serde(default)]
    pub stop: Vec<String>,
    /// `[{ name = "format_tags", weight = 1.0, ...params }]`
    #[serde(default)]
    pub rewards: Vec<toml::Table>,
    /// `[[grpo.tools]]`: tools the policy may call (multi-turn rollouts).
    #[serde(default)]
    pub tools: Vec<ferrotune_rewards::tools::ToolSpec>,
    /// Most tool rounds per completion (TRL's name; none = until no call or the length limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tool_calling_iterations: Option<usize>,
}

/// `[dpo]`: direct preference optimisation on `prompt` + `chosen` + `rejected` rows. Names and
/// defaults follow TRL 1.16's `DPOConfig`; the reference model is the base with adapters off, or
/// `ref_model` (TRL's `ref_model` argument) when given.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DpoSection {
    #[serde(default = "d_dpo_beta")]
    pub beta: f64,
    #[serde(default = "d_dpo_loss_type")]
    pub loss_type: DpoLossType,
    #[serde(default)]
    pub label_smoothing: f64,
    /// Prompt + completion tokens per sequence.
    #[serde(default = "d_max_seq_len")]
    pub max_length: usize,
    /// TRL 1.16 supports only "keep_start".
    #[serde(default = "d_truncation_mode")]
    pub truncation_mode: TruncationMode,
    #[serde(default)]
    pub precompute_ref_log_probs: bool,
    /// A separate frozen reference model (same tokenizer); needed for full fine-tuning.
    #[serde(default)]
    pub ref_model: Option<PathBuf>,
}

/// `[reward_model]`: a Bradley–Terry reward model (a scalar head on the last real token, HF's
/// `…ForSequenceClassification` layout) trained on `prompt` + `chosen` + `rejected` rows, with an
/// optional per-pair `margin` column. Names and defaults follow TRL 1.16's `RewardConfig`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RewardModelSection {
    /// Pairs with a side longer than this (prompt + completion tokens) are dropped, as TRL
    /// filters them.
    #[serde(default = "d_max_seq_len")]
    pub max_length: usize,
    /// Adds c·mean((r_chosen + r_rejected)²) to keep rewards centred (2312.09244); None = off.
    #[serde(default)]
    pub center_rewards_coefficient: Option<f64>,
}

/// `[distill]`: knowledge distillation (GKD, 2306.13649) of the model (the student, full or
/// LoRA) from a frozen teacher that shares its tokenizer. Names and defaults follow TRL 1.16's
/// `GKDConfig` (`lmbda`, `beta`, `temperature`, `max_new_tokens`, `seq_kd`); `temperature` is
/// the sampling temperature, as in TRL, whose loss runs at τ = 1 (`loss_temperature` here).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DistillSection {
    /// Teacher model: Hugging Face folder or .gguf file.
    pub teacher: PathBuf,
    #[serde(default = "d_half")]
    pub lmbda: f64,
    #[serde(default = "d_half")]
    pub beta: f64,
    #[serde(default = "d_distill_temperature")]
    pub temperature: f64,
    #[serde(default = "d_one_f64")]
    pub loss_temperature: f64,
    #[serde(default = "d_max_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default)]
    pub seq_kd: bool,
    /// 0 = the whole vocabulary; else the teacher's top-k log-probs.
    #[serde(default)]
    pub top_k: usize,
    #[serde(default = "d_true")]
    pub loss_add_tail: bool,
    #[serde(default)]
    pub sft_weight: f64,
    /// Teacher top-k log-probs written by `ferrotune distill cache-teacher`.
    #[serde(default)]
    pub teacher_cache: Option<PathBuf>,
}

serde_defaults! {
    d_half: f64 = 0.5;
    d_distill_temperature: f64 = 0.9;
    d_max_new_tokens: usize = 128;
}

/// `[ppo]`: PPO for RLHF (TRL 1.12's `PPOTrainer`, the last TRL with PPO): one completion per
/// prompt scored by a reward model at the last token and/or reward functions, a per-token KL
/// penalty to the reference (the base with adapters off) folded into the reward, GAE, clipped
/// policy and value losses. The value head sits on the policy's body (see `ferrotune_train::ppo`).
/// Names and defaults follow TRL's `PPOConfig` (`max_completion_len` = its `response_length`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PpoSection {
    /// A reward model folder (`…ForSequenceClassification`, one label) that shares the
    /// policy's tokenizer; its score at the last token is the reward (weight 1).
    #[serde(default)]
    pub reward_model_path: Option<PathBuf>,
    /// Reward functions, as `grpo.rewards`; added to the reward model's score.
    #[serde(default)]
    pub rewards: Vec<toml::Table>,
    #[serde(default = "d_ppo_epochs")]
    pub num_ppo_epochs: usize,
    #[serde(default = "d_one")]
    pub num_mini_batches: usize,
    #[serde(default = "d_max_prompt_len")]
    pub max_prompt_len: usize,
    #[serde(default = "d_ppo_response_length")]
    pub max_completion_len: usize,
    #[serde(default = "d_ppo_temperature")]
    pub temperature: f64,
    /// Generation stops after any of these strings (kept in the completion).
    #[serde(default)]
    pub stop: Vec<String>,
    /// Subtracted from the score of a completion that hit max_completion_len.
    #[serde(default)]
    pub missing_eos_penalty: Option<f64>,
    #[serde(default = "d_ppo_kl_coef")]
    pub kl_coef: f64,
    #[serde(default = "d_ppo_kl_estimator")]
    pub kl_estimator: KlEstimator,
    #[serde(default)]
    pub whiten_rewards: bool,
    #[serde(default = "d_ppo_gamma")]
    pub gamma: f64,
    #[serde(default = "d_ppo_lam")]
    pub lam: f64,
    #[serde(default = "d_epsilon")]
    pub cliprange: f64,
    #[serde(default = "d_epsilon")]
    pub cliprange_value: f64,
    #[serde(default = "d_ppo_vf_coef")]
    pub vf_coef: f64,
    #[serde(default = "d_true")]
    pub log_completions: bool,
}

serde_defaults! {
    d_ppo_epochs: usize = 4;
    d_ppo_response_length: usize = 53;
    d_ppo_temperature: f64 = 0.7;
    d_ppo_kl_coef: f64 = 0.05;
    d_ppo_kl_estimator: KlEstimator = KlEstimator::K1;
    d_ppo_gamma: f64 = 1.0;
    d_ppo_lam: f64 = 0.95;
    d_ppo_vf_coef: f64 = 0.1;
}

impl PpoSection {
    /// The loss settings as `ferrotune_train`'s config (errors name the key).
    pub fn loss_config(&self) -> ferrotune_train::ppo_loss::PpoConfig {
        ferrotune_train::ppo_loss::PpoConfig {
            kl_coef: self.kl_coef,
            kl_estimator: self.kl_estimator,
            whiten_rewards: self.whiten_rewards,
            gamma: self.gamma,
            lam: self.lam,
            cliprange: self.cliprange,
            cliprange_value: self.cliprange_value,
            vf_coef: self.vf_coef,
        }
    }
}

/// The training method of a run: which section of the config is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Sft,
    Grpo,
    Dpo,
    Ppo,
    Distill,
    RewardModel,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelSection,
    /// Absent = full fine-tuning (every weight trainable).
    #[serde(default)]
    pub lora: Option<LoraSection>,
    pub data: DataSection,
    #[serde(default = "d_optim")]
    pub optim: OptimSection,
    pub run: RunSection,
    #[serde(default)]
    pub sft: Option<SftSection>,
    #[serde(default)]
    pub grpo: Option<GrpoSection>,
    #[serde(default)]
    pub dpo: Option<DpoSection>,
    #[serde(default)]
    pub distill: Option<DistillSection>,
    #[serde(default)]
    pub reward_model: Option<RewardModelSection>,
    #[serde(default)]
    pub ppo: Option<PpoSection>,
    #[serde(default)]
    pub eval: Option<EvalSection>,
}

serde_defaults! {
    d_dtype: String = "f32".into();
    d_device: String = "cpu".into();
    d_r: usize = 16;
    d_alpha: f64 = 32.0;
    d_targets: toml::Value = toml::Value::String("all-linear".into());
    d_max_seq_len: usize = 1024;
    d_true: bool = true;
    d_lr: f64 = 2e-4;
    d_beta1: f64 = 0.9;
    d_beta2: f64 = 0.999;
    d_eps: f64 = 1e-8;
    d_clip: f64 = 1.0;
    d_sched: ScheduleKind = ScheduleKind::Linear;
    d_seed: u64 = 42;
    d_epochs: f64 = 1.0;
    d_batch: usize = 8;
    d_one: usize = 1;
    d_log_every: usize = 10;
    d_nonfinite: usize = 5;
    d_num_generations: usize = 8;
    d_max_prompt_len: usize = 512;
    d_max_completion_len: usize = 256;
    d_temperature: f64 = 1.0;
    d_top_p: f64 = 1.0;
    d_epsilon: f64 = 0.2;
    d_scale_rewards: ScaleRewards = ScaleRewards::Group;
    d_loss_type: LossType = LossType::Dapo;
    d_importance_sampling_level: ImportanceSamplingLevel = ImportanceSamplingLevel::Token;
    d_max_num_gen_batches: usize = 4;
    d_sapo_temperature_pos: f64 = 1.0;
    d_sapo_temperature_neg: f64 = 1.05;
    d_one_f64: f64 = 1.0;
    d_dpo_beta: f64 = 0.1;
    d_dpo_loss_type: DpoLossType = DpoLossType::Sigmoid;
    d_truncation_mode: TruncationMode = TruncationMode::KeepStart;
    d_optim: OptimSection = toml::from_str("").expect("optim defaults deserialize");
}
