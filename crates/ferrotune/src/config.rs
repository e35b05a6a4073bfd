//! Run configuration: the TOML file (`ferrotune train --config run.toml`), `--set key=value`
//! overrides, defaults, unknown-key rejection and the cross-field checks that say why a
//! combination is refused. The resolved config is what the run folder records.
//!
//! Names follow Hugging Face / TRL where one exists (`learning_rate`, `lr_scheduler_type`,
//! `gradient_accumulation_steps`, `max_grad_norm`, PEFT's `r`, `lora_alpha`, `target_modules`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Parse { path: PathBuf, msg: String },
    #[error("--set {arg}: {msg}")]
    Set { arg: String, msg: String },
    #[error("{path}: {field}: {msg}")]
    Invalid {
        path: PathBuf,
        field: String,
        msg: String,
    },
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
    pub lr_scheduler_type: String,
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
    pub scale_rewards: String,
    #[serde(default = "d_loss_type")]
    pub loss_type: String,
    #[serde(default)]
    pub mask_truncated_completions: bool,
    #[serde(default = "d_true")]
    pub log_completions: bool,
    /// Generation stops after any of these strings (kept in the completion).
    #[serde(default)]
    pub stop: Vec<String>,
    /// `[{ name = "format_tags", weight = 1.0, ...params }]`
    #[serde(default)]
    pub rewards: Vec<toml::Table>,
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
    pub loss_type: String,
    #[serde(default)]
    pub label_smoothing: f64,
    /// Prompt + completion tokens per sequence.
    #[serde(default = "d_max_seq_len")]
    pub max_length: usize,
    /// TRL 1.16 supports only "keep_start".
    #[serde(default = "d_truncation_mode")]
    pub truncation_mode: String,
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

fn d_half() -> f64 {
    0.5
}
fn d_distill_temperature() -> f64 {
    0.9
}
fn d_one_f64() -> f64 {
    1.0
}
fn d_max_new_tokens() -> usize {
    128
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
    pub kl_estimator: String,
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

fn d_ppo_epochs() -> usize {
    4
}
fn d_ppo_response_length() -> usize {
    53
}
fn d_ppo_temperature() -> f64 {
    0.7
}
fn d_ppo_kl_coef() -> f64 {
    0.05
}
fn d_ppo_kl_estimator() -> String {
    "k1".into()
}
fn d_ppo_gamma() -> f64 {
    1.0
}
fn d_ppo_lam() -> f64 {
    0.95
}
fn d_ppo_vf_coef() -> f64 {
    0.1
}

impl PpoSection {
    /// The loss settings as `ferrotune_train`'s config (errors name the key).
    pub fn loss_config(&self) -> Result<ferrotune_train::ppo_loss::PpoConfig, String> {
        Ok(ferrotune_train::ppo_loss::PpoConfig {
            kl_coef: self.kl_coef,
            kl_estimator: self.kl_estimator.parse().map_err(|e| format!("{e}"))?,
            whiten_rewards: self.whiten_rewards,
            gamma: self.gamma,
            lam: self.lam,
            cliprange: self.cliprange,
            cliprange_value: self.cliprange_value,
            vf_coef: self.vf_coef,
        })
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

fn d_dtype() -> String {
    "f32".into()
}
fn d_device() -> String {
    "cpu".into()
}
fn d_r() -> usize {
    16
}
fn d_alpha() -> f64 {
    32.0
}
fn d_targets() -> toml::Value {
    toml::Value::String("all-linear".into())
}
fn d_max_seq_len() -> usize {
    1024
}
fn d_true() -> bool {
    true
}
fn d_lr() -> f64 {
    2e-4
}
fn d_beta1() -> f64 {
    0.9
}
fn d_beta2() -> f64 {
    0.999
}
fn d_eps() -> f64 {
    1e-8
}
fn d_clip() -> f64 {
    1.0
}
fn d_sched() -> String {
    "linear".into()
}
fn d_seed() -> u64 {
    42
}
fn d_epochs() -> f64 {
    1.0
}
fn d_batch() -> usize {
    8
}
fn d_one() -> usize {
    1
}
fn d_log_every() -> usize {
    10
}
fn d_nonfinite() -> usize {
    5
}
fn d_num_generations() -> usize {
    8
}
fn d_max_prompt_len() -> usize {
    512
}
fn d_max_completion_len() -> usize {
    256
}
fn d_temperature() -> f64 {
    1.0
}
fn d_top_p() -> f64 {
    1.0
}
fn d_epsilon() -> f64 {
    0.2
}
fn d_scale_rewards() -> String {
    "group".into()
}
fn d_loss_type() -> String {
    "dapo".into()
}
fn d_dpo_beta() -> f64 {
    0.1
}
fn d_dpo_loss_type() -> String {
    "sigmoid".into()
}
fn d_truncation_mode() -> String {
    "keep_start".into()
}
fn d_optim() -> OptimSection {
    toml::from_str("").expect("optim defaults deserialize")
}

/// Every key with its default and meaning, for `ferrotune config --explain`.
pub const KEYS: &[(&str, &str, &str)] = &[
    ("model", "(section)", "the base model"),
    ("model.path", "(required)", "Hugging Face model folder or .gguf file"),
    ("model.dtype", "\"f32\"", "f32 | bf16 | f16 (adapters always keep f32 master weights)"),
    ("model.device", "\"cpu\"", "cpu | cuda | cuda:N"),
    ("lora", "(section)", "present = LoRA on a frozen base; absent = full fine-tuning"),
    ("lora.r", "16", "adapter rank"),
    ("lora.lora_alpha", "32", "scale numerator: update = (alpha / r) * B A x"),
    ("lora.lora_dropout", "0.0", "dropout on the adapter input (PEFT semantics)"),
    ("lora.target_modules", "\"all-linear\"", "list of module names (e.g. [\"q_proj\", \"v_proj\"]) or \"all-linear\""),
    ("lora.use_rslora", "false", "rank-stabilised scale alpha / sqrt(r)"),
    ("data", "(section)", "the training (and eval) data"),
    ("data.train", "(required)", "training set: .jsonl, .parquet or .csv with TRL columns (messages | prompt+completion | text)"),
    ("data.eval", "none", "held-out set in the same format"),
    ("data.eval_fraction", "0.0", "fraction of data.train held out when data.eval is absent"),
    ("data.max_seq_len", "1024", "longer examples are truncated (counted and reported)"),
    ("data.packing", "false", "pack several examples into one sequence"),
    ("data.shuffle", "true", "seeded shuffle every epoch"),
    ("data.completion_only_loss", "true", "loss only on completion / assistant tokens"),
    ("optim", "(section)", "AdamW and the learning-rate schedule"),
    ("optim.learning_rate", "2e-4", "peak learning rate (AdamW)"),
    ("optim.weight_decay", "0.0", "decoupled weight decay"),
    ("optim.adam_beta1", "0.9", "AdamW beta1"),
    ("optim.adam_beta2", "0.999", "AdamW beta2"),
    ("optim.adam_epsilon", "1e-8", "AdamW epsilon"),
    ("optim.max_grad_norm", "1.0", "global-norm gradient clipping (0 = off)"),
    ("optim.lr_scheduler_type", "\"linear\"", "constant | constant_with_warmup | linear | cosine"),
    ("optim.warmup_steps", "0", "linear warmup steps"),
    ("optim.warmup_ratio", "0.0", "warmup as a fraction of total steps (used when warmup_steps = 0)"),
    ("run", "(section)", "run folder, steps, batching, logging and checkpoints"),
    ("run.output_dir", "(required)", "run folder: config, metrics, TensorBoard events, checkpoints"),
    ("run.seed", "42", "seed for adapter init, shuffling and dropout"),
    ("run.max_steps", "0", "optimizer steps; 0 = num_train_epochs over the data"),
    ("run.num_train_epochs", "1.0", "epochs when max_steps = 0"),
    ("run.batch_size", "8", "examples per micro-batch"),
    ("run.gradient_accumulation_steps", "1", "micro-batches per optimizer step"),
    ("run.log_every", "10", "log metrics every N steps"),
    ("run.save_every", "0", "checkpoint every N steps (0 = only at the end)"),
    ("run.eval_every", "0", "eval loss every N steps (0 = never)"),
    ("run.keep_last", "0", "keep only the newest N checkpoints (0 = all)"),
    ("run.max_nonfinite_steps", "5", "stop after N consecutive steps with non-finite loss or gradients"),
    ("sft", "(section)", "marks the run as supervised fine-tuning"),
    ("eval", "(section)", "perplexity regression gate, checked every run.eval_every steps"),
    ("eval.forget_set", "none", "held-out text (or JSONL `text`) whose perplexity must not rise; ppl(model) / ppl(base) is logged as eval/forget_ppl_ratio"),
    ("eval.max_ppl_ratio", "1.05", "a ratio above this is a regression, reported loudly"),
    ("eval.stop_on_regression", "false", "stop at a regression, keeping the last good checkpoint"),
    ("grpo", "(section)", "marks the run as GRPO (RL from verifiable rewards); data.train holds prompts (+ answer)"),
    ("grpo.num_generations", "8", "G: completions sampled per prompt; run.batch_size x gradient_accumulation_steps must be divisible by it"),
    ("grpo.max_prompt_len", "512", "prompts longer than this keep their last tokens (counted and reported)"),
    ("grpo.max_completion_len", "256", "new tokens per completion (TRL: 512; lower here for CPU)"),
    ("grpo.temperature", "1.0", "sampling temperature; log-probs are of logits / temperature, as TRL"),
    ("grpo.top_p", "1.0", "nucleus sampling (1.0 = off)"),
    ("grpo.top_k", "0", "top-k sampling (0 = off)"),
    ("grpo.beta", "0.0", "KL coefficient (k3 estimator) to the reference = the base with adapters off; 0 skips it"),
    ("grpo.epsilon", "0.2", "lower clipping bound: ratio >= 1 - epsilon"),
    ("grpo.epsilon_high", "epsilon", "upper clipping bound: ratio <= 1 + epsilon_high (DAPO: 0.28)"),
    ("grpo.num_iterations", "1", "mu: optimizer steps per generation batch (old log-probs = the sampler's)"),
    ("grpo.scale_rewards", "\"group\"", "group | batch | none: divide advantages by the group's std, the batch's, or not (Dr. GRPO)"),
    ("grpo.loss_type", "\"dapo\"", "grpo | dr_grpo | dapo | bnpo: how per-token losses are averaged"),
    ("grpo.mask_truncated_completions", "false", "completions that hit max_completion_len get no loss"),
    ("grpo.log_completions", "true", "write completions.jsonl (prompt, completion, rewards, advantage) every run.log_every steps"),
    ("grpo.stop", "[]", "stop strings: generation ends after any of them"),
    ("grpo.rewards", "(required)", "reward functions: [{ name = \"answer_match\", weight = 1.0, ...params }]; see `ferrotune rewards`"),
    ("dpo", "(section)", "marks the run as DPO; data.train holds preference pairs (prompt + chosen + rejected, text or messages); needs [lora]"),
    ("dpo.beta", "0.1", "strength of the pull to the reference (= the base with adapters off); implicit reward = beta x log-ratio"),
    ("dpo.loss_type", "\"sigmoid\"", "sigmoid | ipo | hinge (TRL's names)"),
    ("dpo.label_smoothing", "0.0", "sigmoid only: probability a preference label is flipped (conservative DPO), in [0, 0.5)"),
    ("dpo.max_length", "1024", "prompt + completion tokens per sequence; longer ones lose their end (data.max_seq_len is not used)"),
    ("dpo.truncation_mode", "\"keep_start\"", "keep_start (the only mode TRL 1.16 supports)"),
    ("dpo.precompute_ref_log_probs", "false", "compute the reference log-probs of every train pair once and keep them in <output_dir>/ref_logps.json (read back on resume while the data and reference are unchanged)"),
    ("dpo.ref_model", "none", "a separate frozen reference model (HF folder or .gguf, same tokenizer); default: the base with adapters off. Needed for full fine-tuning (no [lora])"),
    ("distill", "(section)", "marks the run as distillation (GKD): model = the student (full, or LoRA with [lora]); data.train holds SFT rows (prompt + completion or messages) whose completion tokens are scored; the merged student is written to <output_dir>/model"),
    ("distill.teacher", "(required)", "teacher: Hugging Face folder or .gguf file, frozen; must share the student's tokenizer (same vocabulary and ids)"),
    ("distill.lmbda", "0.5", "probability that a micro-batch's completions are sampled from the student and scored by the teacher (on-policy, GKD's lambda); 0 = the data's completions only"),
    ("distill.beta", "0.5", "0 = forward KL(teacher||student), 1 = reverse KL(student||teacher), in between the generalized JSD(beta)"),
    ("distill.temperature", "0.9", "sampling temperature of on-policy and seq_kd completions (TRL's temperature)"),
    ("distill.loss_temperature", "1.0", "both distributions are softmax(logits / loss_temperature) in the loss (TRL's loss uses 1)"),
    ("distill.max_new_tokens", "128", "new tokens per sampled completion"),
    ("distill.seq_kd", "false", "sample each micro-batch's completions from the teacher first (sequence-level KD on the fly; see also `ferrotune data gen from-model`)"),
    ("distill.top_k", "0", "0 = compare over the whole vocabulary; k = over the teacher's top-k log-probs (required by teacher_cache)"),
    ("distill.loss_add_tail", "true", "top-k only: keep the teacher's mass outside its top-k as one extra bucket (else renormalise over the k)"),
    ("distill.sft_weight", "0.0", "adds sft_weight x the student's cross-entropy on the completion tokens"),
    ("distill.teacher_cache", "none", "read the teacher's top-k log-probs from this file (written by `ferrotune distill cache-teacher --config ...`) instead of loading the teacher; needs lmbda = 0 and seq_kd = false"),
    ("reward_model", "(section)", "marks the run as reward-model training (a scalar head on the last token, LoRA on the body); data.train holds preference pairs (+ optional `margin` column); needs [lora]; the merged model is written to <output_dir>/reward_model"),
    ("reward_model.max_length", "1024", "pairs with a side longer than this many tokens are dropped (TRL filters them)"),
    ("reward_model.center_rewards_coefficient", "none", "adds c x mean((r_chosen + r_rejected)^2) to the loss to keep rewards near 0"),
    ("ppo", "(section)", "marks the run as PPO (RLHF); data.train holds prompts; needs [lora] (the reference is the base with adapters off; a value head on the policy's body is trained with the adapters)"),
    ("ppo.reward_model_path", "none", "reward model folder (...ForSequenceClassification, one label, e.g. from a [reward_model] run) sharing the policy's tokenizer; scored at the last token of prompt + completion"),
    ("ppo.rewards", "[]", "reward functions as in grpo.rewards, added to the reward model's score; at least one of the two is needed"),
    ("ppo.num_ppo_epochs", "4", "passes over each rollout batch"),
    ("ppo.num_mini_batches", "1", "optimizer steps per pass; a rollout batch is run.batch_size x gradient_accumulation_steps x num_mini_batches prompts"),
    ("ppo.max_prompt_len", "512", "prompts longer than this keep their last tokens (counted and reported)"),
    ("ppo.max_completion_len", "53", "new tokens per completion (TRL's response_length)"),
    ("ppo.temperature", "0.7", "sampling temperature; log-probs are of logits / temperature, as TRL"),
    ("ppo.stop", "[]", "stop strings: generation ends after any of them"),
    ("ppo.missing_eos_penalty", "none", "subtracted from the score of a completion that hit max_completion_len without ending"),
    ("ppo.kl_coef", "0.05", "weight of the per-token KL penalty to the reference folded into the reward"),
    ("ppo.kl_estimator", "\"k1\"", "k1 (log-ratio, TRL's default) | k3 (non-negative, lower variance)"),
    ("ppo.whiten_rewards", "false", "whiten the per-token rewards before GAE"),
    ("ppo.gamma", "1.0", "discount of GAE"),
    ("ppo.lam", "0.95", "lambda of GAE"),
    ("ppo.cliprange", "0.2", "policy ratio clip: ratio in [1 - cliprange, 1 + cliprange]"),
    ("ppo.cliprange_value", "0.2", "value clip around the rollout's values"),
    ("ppo.vf_coef", "0.1", "weight of the value loss: loss = policy loss + vf_coef x value loss"),
    ("ppo.log_completions", "true", "write completions.jsonl (prompt, completion, rewards, score, mean advantage) every run.log_every steps"),
];

/// Apply `key=value` overrides to a parsed TOML table. The value is parsed as a TOML value,
/// falling back to a plain string (so `--set model.path=dir` works unquoted).
pub fn apply_set(table: &mut toml::Table, arg: &str) -> Result<(), ConfigError> {
    let err = |msg: &str| ConfigError::Set {
        arg: arg.to_string(),
        msg: msg.to_string(),
    };
    let (key, raw) = arg
        .split_once('=')
        .ok_or_else(|| err("expected key=value"))?;
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(err("empty key component"));
    }
    let mut t = table;
    for p in &parts[..parts.len() - 1] {
        t = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| err(&format!("`{p}` is not a section")))?;
    }
    t.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

impl RunConfig {
    /// Read a TOML file, apply overrides, deserialize (unknown keys are errors) and validate.
    /// Relative paths in the file are resolved against the file's folder.
    pub fn load(path: &Path, sets: &[String]) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            msg: one_line(&e.to_string()),
        })?;
        for s in sets {
            apply_set(&mut table, s)?;
        }
        let mut cfg: RunConfig = RunConfig::deserialize(table).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            msg: one_line(&e.to_string()),
        })?;
        // Relative paths are relative to the config file; the resolved config (written to the
        // run folder) holds absolute ones, so `--resume` reads the same files from anywhere.
        let base = std::path::absolute(path.parent().unwrap_or(Path::new(".")))
            .unwrap_or_else(|_| PathBuf::from("."));
        for p in [
            &mut cfg.model.path,
            &mut cfg.data.train,
            &mut cfg.run.output_dir,
        ] {
            *p = normalize(&base.join(&*p));
        }
        if let Some(e) = cfg.data.eval.as_mut() {
            *e = normalize(&base.join(&*e));
        }
        if let Some(f) = cfg.eval.as_mut().and_then(|e| e.forget_set.as_mut()) {
            *f = normalize(&base.join(&*f));
        }
        if let Some(d) = cfg.distill.as_mut() {
            d.teacher = normalize(&base.join(&d.teacher));
            if let Some(c) = d.teacher_cache.as_mut() {
                *c = normalize(&base.join(&*c));
            }
        }
        if let Some(r) = cfg.dpo.as_mut().and_then(|d| d.ref_model.as_mut()) {
            *r = normalize(&base.join(&*r));
        }
        if let Some(g) = cfg.grpo.as_mut() {
            resolve_reward_paths(&mut g.rewards, &base);
        }
        if let Some(p) = cfg.ppo.as_mut() {
            if let Some(r) = p.reward_model_path.as_mut() {
                *r = normalize(&base.join(&*r));
            }
            resolve_reward_paths(&mut p.rewards, &base);
        }
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// The training method this config runs (`validate` checks there is exactly one section).
    pub fn method(&self) -> Method {
        if self.reward_model.is_some() {
            Method::RewardModel
        } else if self.distill.is_some() {
            Method::Distill
        } else if self.dpo.is_some() {
            Method::Dpo
        } else if self.ppo.is_some() {
            Method::Ppo
        } else if self.grpo.is_some() {
            Method::Grpo
        } else {
            Method::Sft
        }
    }

    /// Cross-field checks, each saying why.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |field: &str, msg: String| {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                field: field.into(),
                msg,
            })
        };
        if let Some(l) = &self.lora {
            if l.r == 0 {
                return bad("lora.r", "must be at least 1".into());
            }
            if !(0.0..1.0).contains(&(l.lora_dropout as f64)) {
                return bad("lora.lora_dropout", "must be in [0, 1)".into());
            }
            // PEFT takes any number; 0 makes the adapter a no-op that trains nothing, and a
            // negative one flips its update.
            if !(l.lora_alpha > 0.0 && l.lora_alpha.is_finite()) {
                return bad("lora.lora_alpha", "must be a positive number".into());
            }
            match &l.target_modules {
                toml::Value::String(s) if s == "all-linear" => {}
                toml::Value::Array(a) if !a.is_empty() && a.iter().all(|v| v.is_str()) => {}
                _ => {
                    return bad(
                        "lora.target_modules",
                        "must be a non-empty list of module names or \"all-linear\"".into(),
                    )
                }
            }
        }
        if let Err(e) = crate::lm::parse_dtype(&self.model.dtype) {
            return bad("model.dtype", e.to_string());
        }
        if self.data.max_seq_len < 2 {
            return bad("data.max_seq_len", "must be at least 2".into());
        }
        if !(0.0..1.0).contains(&self.data.eval_fraction) {
            return bad("data.eval_fraction", "must be in [0, 1)".into());
        }
        if self.data.eval.is_some() && self.data.eval_fraction > 0.0 {
            return bad(
                "data.eval_fraction",
                "give either data.eval or data.eval_fraction, not both".into(),
            );
        }
        let forget = self.eval.as_ref().and_then(|e| e.forget_set.as_ref());
        if let Some(e) = &self.eval {
            if forget.is_none() {
                return bad(
                    "eval.forget_set",
                    "the [eval] section needs forget_set".into(),
                );
            }
            if self.run.eval_every == 0 {
                return bad(
                    "run.eval_every",
                    "the regression gate ([eval]) runs at eval steps: set run.eval_every".into(),
                );
            }
            if !(e.max_ppl_ratio > 0.0 && e.max_ppl_ratio.is_finite()) {
                return bad("eval.max_ppl_ratio", "must be a positive number".into());
            }
        }
        if self.run.eval_every > 0
            && self.data.eval.is_none()
            && self.data.eval_fraction == 0.0
            && forget.is_none()
            && self.grpo.is_none()
        {
            return bad(
                "run.eval_every",
                "needs an eval set: set data.eval or data.eval_fraction".into(),
            );
        }
        if self.run.batch_size == 0 {
            return bad("run.batch_size", "must be at least 1".into());
        }
        if self.run.gradient_accumulation_steps == 0 {
            return bad(
                "run.gradient_accumulation_steps",
                "must be at least 1".into(),
            );
        }
        if self.run.max_steps == 0 && self.run.num_train_epochs <= 0.0 {
            return bad(
                "run.max_steps",
                "set max_steps or a positive num_train_epochs".into(),
            );
        }
        if self.run.log_every == 0 {
            return bad("run.log_every", "must be at least 1".into());
        }
        let o = &self.optim;
        if !(o.learning_rate > 0.0 && o.learning_rate.is_finite()) {
            return bad("optim.learning_rate", "must be a positive number".into());
        }
        if !(0.0..1.0).contains(&o.adam_beta1) || !(0.0..1.0).contains(&o.adam_beta2) {
            return bad("optim.adam_beta1", "betas must be in [0, 1)".into());
        }
        if !(0.0..1.0).contains(&o.warmup_ratio) {
            return bad("optim.warmup_ratio", "must be in [0, 1)".into());
        }
        if !(o.max_grad_norm >= 0.0 && o.max_grad_norm.is_finite()) {
            return bad(
                "optim.max_grad_norm",
                "must be >= 0 (0 = no clipping)".into(),
            );
        }
        if o.warmup_steps > 0 && o.warmup_ratio > 0.0 {
            return bad(
                "optim.warmup_ratio",
                "give either warmup_steps or warmup_ratio, not both".into(),
            );
        }
        if !["constant", "constant_with_warmup", "linear", "cosine"]
            .contains(&o.lr_scheduler_type.as_str())
        {
            return bad(
                "optim.lr_scheduler_type",
                format!(
                    "`{}` is not one of constant, constant_with_warmup, linear, cosine",
                    o.lr_scheduler_type
                ),
            );
        }
        let methods: Vec<&str> = [
            ("sft", self.sft.is_some()),
            ("grpo", self.grpo.is_some()),
            ("dpo", self.dpo.is_some()),
            ("ppo", self.ppo.is_some()),
            ("distill", self.distill.is_some()),
            ("reward_model", self.reward_model.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect();
        match methods.as_slice() {
            [] => {
                return bad(
                    "sft",
                    "the config needs a method section: [sft], [grpo], [dpo], [distill], [ppo] or [reward_model]".into(),
                )
            }
            [_] => {}
            [.., last] => {
                return bad(
                    last,
                    format!(
                        "a run has exactly one method section, this one has [{}]",
                        methods.join("] and [")
                    ),
                )
            }
        }
        if let Some(d) = &self.dpo {
            if self.lora.is_none() && d.ref_model.is_none() {
                return bad(
                    "dpo",
                    "the DPO reference is the base with adapters switched off, so [dpo] needs a [lora] section (or set dpo.ref_model for full fine-tuning)".into(),
                );
            }
            let loss_type = match d
                .loss_type
                .parse::<ferrotune_train::pref_loss::DpoLossType>()
            {
                Ok(t) => t,
                Err(_) => {
                    return bad(
                        "dpo.loss_type",
                        format!("`{}` is not one of sigmoid, ipo, hinge", d.loss_type),
                    )
                }
            };
            if !(d.beta.is_finite() && d.beta > 0.0) {
                return bad(
                    "dpo.beta",
                    format!(
                        "must be a positive number (it scales the log-ratio margin), got {}",
                        d.beta
                    ),
                );
            }
            let loss = ferrotune_train::pref_loss::DpoConfig {
                beta: d.beta,
                loss_type,
                label_smoothing: d.label_smoothing,
            };
            if let Err(e) = loss.validate() {
                let msg = e.to_string();
                let msg = msg.strip_prefix("DPO config: ").unwrap_or(&msg).to_string();
                return bad("dpo.label_smoothing", msg);
            }
            if d.max_length < 2 {
                return bad(
                    "dpo.max_length",
                    "must be at least 2 (a prompt token and a completion token)".into(),
                );
            }
            if d.truncation_mode != "keep_start" {
                return bad(
                    "dpo.truncation_mode",
                    format!(
                        "`{}` is not supported: only keep_start (as TRL 1.16)",
                        d.truncation_mode
                    ),
                );
            }
            if self.data.packing {
                return bad(
                    "data.packing",
                    "does not apply to DPO (chosen and rejected are scored as whole sequences)"
                        .into(),
                );
            }
        }
        if let Some(r) = &self.reward_model {
            if self.lora.is_none() {
                return bad(
                    "reward_model",
                    "the body is trained through LoRA adapters (the head is always trainable), so [reward_model] needs a [lora] section".into(),
                );
            }
            if r.max_length < 2 {
                return bad("reward_model.max_length", "must be at least 2".into());
            }
            if let Some(c) = r.center_rewards_coefficient {
                if !(c.is_finite() && c >= 0.0) {
                    return bad(
                        "reward_model.center_rewards_coefficient",
                        format!("must be a finite number >= 0, got {c}"),
                    );
                }
            }
            if self.data.packing {
                return bad(
                    "data.packing",
                    "does not apply to a reward model (each side is scored as a whole sequence)"
                        .into(),
                );
            }
            if self.eval.is_some() {
                return bad(
                    "eval",
                    "the perplexity gate measures a language model; a reward model's score head has no perplexity (use data.eval for its pairwise accuracy)".into(),
                );
            }
        }
        if let Some(d) = &self.distill {
            if let Some(msg) = distill_problem(d) {
                return bad(msg.0, msg.1);
            }
            if self.data.packing {
                return bad(
                    "data.packing",
                    "does not apply to distillation (completions are sampled and scored per example)"
                        .into(),
                );
            }
        }
        if let Some(p) = &self.ppo {
            if let Some(msg) = ppo_problem(p, self) {
                return bad(msg.0, msg.1);
            }
        }
        if let Some(g) = &self.grpo {
            if g.num_generations < 2 {
                return bad(
                    "grpo.num_generations",
                    "must be at least 2 (advantages are relative to the group)".into(),
                );
            }
            let per_step = self.run.batch_size * self.run.gradient_accumulation_steps;
            if !per_step.is_multiple_of(g.num_generations) {
                return bad(
                    "grpo.num_generations",
                    format!("run.batch_size x run.gradient_accumulation_steps = {per_step} completions per step must be divisible by num_generations = {}", g.num_generations),
                );
            }
            if g.max_prompt_len == 0 || g.max_completion_len == 0 {
                return bad(
                    "grpo.max_completion_len",
                    "max_prompt_len and max_completion_len must be at least 1".into(),
                );
            }
            if !(g.temperature > 0.0 && g.temperature.is_finite()) {
                return bad(
                    "grpo.temperature",
                    "must be positive (GRPO needs sampled completions)".into(),
                );
            }
            if !(g.top_p > 0.0 && g.top_p <= 1.0) {
                return bad("grpo.top_p", "must be in (0, 1]".into());
            }
            if g.beta < 0.0 || !g.beta.is_finite() {
                return bad("grpo.beta", "must be >= 0".into());
            }
            if g.beta > 0.0 && self.lora.is_none() {
                return bad(
                    "grpo.beta",
                    "the KL reference is the base with adapters switched off, so beta > 0 needs a [lora] section (or set beta = 0 for full fine-tuning)".into(),
                );
            }
            if !(0.0..1.0).contains(&g.epsilon) {
                return bad("grpo.epsilon", "must be in [0, 1)".into());
            }
            if g.epsilon_high.is_some_and(|e| e < 0.0 || !e.is_finite()) {
                return bad("grpo.epsilon_high", "must be >= 0".into());
            }
            if g.num_iterations == 0 {
                return bad("grpo.num_iterations", "must be at least 1".into());
            }
            if self.run.save_every > 0 && !self.run.save_every.is_multiple_of(g.num_iterations) {
                return bad(
                    "run.save_every",
                    format!("must be a multiple of grpo.num_iterations = {} (checkpoints are taken between generation batches, so resume is exact)", g.num_iterations),
                );
            }
            if !["group", "batch", "none"].contains(&g.scale_rewards.as_str()) {
                return bad(
                    "grpo.scale_rewards",
                    format!("`{}` is not one of group, batch, none", g.scale_rewards),
                );
            }
            if !["grpo", "dr_grpo", "dapo", "bnpo"].contains(&g.loss_type.as_str()) {
                return bad(
                    "grpo.loss_type",
                    format!("`{}` is not one of grpo, dr_grpo, dapo, bnpo", g.loss_type),
                );
            }
            if g.rewards.is_empty() {
                return bad(
                    "grpo.rewards",
                    "needs at least one reward function, e.g. rewards = [{ name = \"answer_match\" }]".into(),
                );
            }
            if self.data.packing {
                return bad(
                    "data.packing",
                    "does not apply to GRPO (prompts are generated from, not packed)".into(),
                );
            }
        }
        if self.lora.is_none() && self.model.path.extension().is_some_and(|e| e == "gguf") {
            return bad(
                "lora",
                "full fine-tuning of a GGUF base is not supported: add a [lora] section or convert the model to safetensors (ferrotune export)".into(),
            );
        }
        Ok(())
    }

    /// The resolved config as TOML (written to the run folder).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

/// The `path` of each `name = "model"` reward entry, made absolute against `base` (the config
/// file's folder) like every other path of the config.
pub fn resolve_reward_paths(rewards: &mut [toml::Table], base: &Path) {
    for r in rewards {
        if r.get("name").and_then(|v| v.as_str()) != Some("model") {
            continue;
        }
        if let Some(toml::Value::String(p)) = r.get_mut("path") {
            *p = normalize(&base.join(&*p)).display().to_string();
        }
    }
}

/// The first `[distill]` setting that cannot work, with why.
fn distill_problem(d: &DistillSection) -> Option<(&'static str, String)> {
    let unit = |x: f64| (0.0..=1.0).contains(&x);
    if !unit(d.lmbda) {
        return Some((
            "distill.lmbda",
            format!("must be in [0, 1] (a probability), got {}", d.lmbda),
        ));
    }
    if !unit(d.beta) {
        return Some(("distill.beta", format!("must be in [0, 1], got {}", d.beta)));
    }
    if !(d.temperature > 0.0 && d.temperature.is_finite()) {
        return Some((
            "distill.temperature",
            "must be positive (completions are sampled)".into(),
        ));
    }
    if !(d.loss_temperature > 0.0 && d.loss_temperature.is_finite()) {
        return Some(("distill.loss_temperature", "must be positive".into()));
    }
    if !(d.sft_weight >= 0.0 && d.sft_weight.is_finite()) {
        return Some(("distill.sft_weight", "must be a finite number >= 0".into()));
    }
    if (d.lmbda > 0.0 || d.seq_kd) && d.max_new_tokens == 0 {
        return Some((
            "distill.max_new_tokens",
            "must be at least 1 when completions are sampled (lmbda > 0 or seq_kd)".into(),
        ));
    }
    if d.teacher_cache.is_some() {
        if d.top_k == 0 {
            return Some((
                "distill.top_k",
                "a teacher cache holds the teacher's top-k log-probs: set top_k (e.g. 20)".into(),
            ));
        }
        if d.lmbda > 0.0 || d.seq_kd {
            return Some(("distill.teacher_cache", "on-policy (lmbda > 0) and seq_kd completions are sampled during training, so only the live teacher can score them: set lmbda = 0 and seq_kd = false, or remove teacher_cache".into()));
        }
    }
    None
}

/// The first `[ppo]` setting that cannot work, with why.
fn ppo_problem(p: &PpoSection, cfg: &RunConfig) -> Option<(&'static str, String)> {
    if cfg.lora.is_none() {
        return Some(("ppo", "the KL reference is the base with adapters switched off, so [ppo] needs a [lora] section".into()));
    }
    if p.reward_model_path.is_none() && p.rewards.is_empty() {
        return Some(("ppo.rewards", "PPO needs a reward: set ppo.reward_model_path, or reward functions, e.g. rewards = [{ name = \"answer_match\" }]".into()));
    }
    if p.num_ppo_epochs == 0 || p.num_mini_batches == 0 {
        return Some((
            "ppo.num_ppo_epochs",
            "num_ppo_epochs and num_mini_batches must be at least 1".into(),
        ));
    }
    if p.max_prompt_len == 0 || p.max_completion_len == 0 {
        return Some((
            "ppo.max_completion_len",
            "max_prompt_len and max_completion_len must be at least 1".into(),
        ));
    }
    if cfg.run.batch_size * cfg.run.gradient_accumulation_steps * p.num_mini_batches < 2 {
        return Some((
            "run.batch_size",
            "a rollout batch needs at least 2 completions (advantages are whitened over it)".into(),
        ));
    }
    if !(p.temperature > 0.0 && p.temperature.is_finite()) {
        return Some((
            "ppo.temperature",
            "must be positive (PPO needs sampled completions)".into(),
        ));
    }
    if p.missing_eos_penalty.is_some_and(|x| !x.is_finite()) {
        return Some(("ppo.missing_eos_penalty", "must be a finite number".into()));
    }
    if p.kl_estimator
        .parse::<ferrotune_train::ppo_loss::KlEstimator>()
        .is_err()
    {
        return Some((
            "ppo.kl_estimator",
            format!("`{}` is not one of k1, k3", p.kl_estimator),
        ));
    }
    let loss = match p.loss_config() {
        Ok(l) => l,
        Err(e) => return Some(("ppo", e)),
    };
    if let Err(e) = loss.validate() {
        let msg = e.to_string();
        let msg = msg.strip_prefix("PPO config: ").unwrap_or(&msg).to_string();
        return Some(("ppo", msg));
    }
    if cfg.data.packing {
        return Some((
            "data.packing",
            "does not apply to PPO (prompts are generated from, not packed)".into(),
        ));
    }
    None
}

/// Lexically remove `.` and `..` components (no file system access).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Text for `ferrotune config --explain`.
pub fn explain() -> String {
    let mut out =
        String::from("ferrotune run config (TOML). Every key, its default and meaning:\n\n");
    for (k, d, h) in KEYS {
        out.push_str(&format!("{k:<34} {d:<16} {h}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> toml::Table {
        toml::from_str(
            "[model]\npath = \"m\"\n[lora]\n[data]\ntrain = \"t.jsonl\"\n[run]\noutput_dir = \"o\"\n[sft]\n",
        )
        .unwrap()
    }

    fn leaf_keys(prefix: &str, t: &toml::Table, out: &mut Vec<String>) {
        for (k, v) in t {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                toml::Value::Table(sub) => {
                    out.push(key.clone());
                    leaf_keys(&key, sub, out)
                }
                _ => out.push(key),
            }
        }
    }

    /// Every key the config accepts is explained, and every explained key is accepted.
    #[test]
    fn explain_table_matches_the_structs() {
        let cfg = RunConfig::deserialize(minimal()).unwrap();
        let full: toml::Table = toml::from_str(&cfg.to_toml()).unwrap();
        let mut keys = Vec::new();
        leaf_keys("", &full, &mut keys);
        let explained: Vec<&str> = KEYS.iter().map(|(k, _, _)| *k).collect();
        for k in &keys {
            let optional_leaf = k == "data.eval"; // None is not serialised
            assert!(
                explained.contains(&k.as_str()) || optional_leaf,
                "key {k} is not in KEYS"
            );
        }
        for k in explained {
            if [
                "model", "lora", "data", "optim", "run", "sft", "grpo", "dpo", "eval",
            ]
            .contains(&k)
                || k == "data.eval"
                || k.starts_with("grpo.")
                || k.starts_with("dpo.")
                || k == "ppo"
                || k.starts_with("ppo.")
                || k == "distill"
                || k.starts_with("distill.")
                || k == "reward_model"
                || k.starts_with("reward_model.")
                || k.starts_with("eval.")
            {
                continue;
            }
            assert!(
                keys.iter().any(|x| x == k),
                "KEYS lists {k}, which the structs do not have"
            );
        }
    }

    /// The `[ppo]` keys and `KEYS` agree both ways; a PPO config validates with TRL's
    /// defaults; the cross-field rules name their key.
    #[test]
    fn ppo_keys_are_explained_and_checked() {
        let t: toml::Table = toml::from_str(
            "[model]\npath = \"m\"\n[lora]\n[data]\ntrain = \"t.jsonl\"\n[run]\noutput_dir = \"o\"\n[ppo]\nreward_model_path = \"rm\"\nmissing_eos_penalty = 1.0\n",
        )
        .unwrap();
        let cfg = RunConfig::deserialize(t).unwrap();
        cfg.validate(Path::new("c.toml")).unwrap();
        let p = cfg.ppo.as_ref().unwrap();
        let loss = p.loss_config().unwrap();
        assert_eq!(loss, ferrotune_train::ppo_loss::PpoConfig::default());
        assert_eq!(
            (
                p.num_ppo_epochs,
                p.num_mini_batches,
                p.max_completion_len,
                p.temperature
            ),
            (4, 1, 53, 0.7)
        );
        let full: toml::Table = toml::from_str(&cfg.to_toml()).unwrap();
        let mut keys = Vec::new();
        leaf_keys("", &full, &mut keys);
        let ppo_keys: Vec<&String> = keys.iter().filter(|k| k.starts_with("ppo.")).collect();
        let explained: Vec<&str> = KEYS
            .iter()
            .map(|(k, _, _)| *k)
            .filter(|k| k.starts_with("ppo."))
            .collect();
        for k in &ppo_keys {
            assert!(explained.contains(&k.as_str()), "key {k} is not in KEYS");
        }
        for k in explained {
            assert!(
                ppo_keys.iter().any(|x| *x == k),
                "KEYS lists {k}, which [ppo] does not have"
            );
        }
        let check = |f: &dyn Fn(&mut RunConfig), field: &str, words: &str| {
            let mut c = cfg.clone();
            f(&mut c);
            let e = c.validate(Path::new("c.toml")).unwrap_err().to_string();
            assert!(e.contains(field) && e.contains(words), "{e}");
        };
        check(&|c| c.lora = None, "ppo", "[lora]");
        check(
            &|c| c.ppo.as_mut().unwrap().reward_model_path = None,
            "ppo.rewards",
            "needs a reward",
        );
        check(
            &|c| c.ppo.as_mut().unwrap().kl_estimator = "k2".into(),
            "ppo.kl_estimator",
            "k2",
        );
        check(&|c| c.ppo.as_mut().unwrap().lam = 1.5, "ppo", "lam");
        check(
            &|c| c.ppo.as_mut().unwrap().temperature = 0.0,
            "ppo.temperature",
            "positive",
        );
        check(
            &|c| {
                c.run.batch_size = 1;
            },
            "run.batch_size",
            "whitened",
        );
        check(&|c| c.sft = Some(SftSection {}), "ppo", "[sft] and [ppo]");
    }

    /// The `[grpo]` keys and `KEYS` agree both ways, and a GRPO config validates.
    #[test]
    fn grpo_keys_are_explained() {
        let t: toml::Table = toml::from_str(
            "[model]\npath = \"m\"\n[lora]\n[data]\ntrain = \"t.jsonl\"\n[run]\noutput_dir = \"o\"\nbatch_size = 8\n[grpo]\nepsilon_high = 0.28\nrewards = [{ name = \"answer_match\" }]\n",
        )
        .unwrap();
        let cfg = RunConfig::deserialize(t).unwrap();
        cfg.validate(Path::new("c.toml")).unwrap();
        let full: toml::Table = toml::from_str(&cfg.to_toml()).unwrap();
        let mut keys = Vec::new();
        leaf_keys("", &full, &mut keys);
        let grpo_keys: Vec<&String> = keys.iter().filter(|k| k.starts_with("grpo.")).collect();
        let explained: Vec<&str> = KEYS
            .iter()
            .map(|(k, _, _)| *k)
            .filter(|k| k.starts_with("grpo."))
            .collect();
        for k in &grpo_keys {
            assert!(explained.contains(&k.as_str()), "key {k} is not in KEYS");
        }
        for k in explained {
            assert!(
                grpo_keys.iter().any(|x| *x == k),
                "KEYS lists {k}, which [grpo] does not have"
            );
        }
        // batch 8 with G = 3 cannot form whole groups.
        let mut bad = cfg.clone();
        bad.grpo.as_mut().unwrap().num_generations = 3;
        let e = bad.validate(Path::new("c.toml")).unwrap_err().to_string();
        assert!(
            e.contains("grpo.num_generations") && e.contains("divisible"),
            "{e}"
        );
    }

    /// The `[dpo]` keys and `KEYS` agree both ways; a DPO config validates; the cross-field
    /// rules name their key.
    #[test]
    fn dpo_keys_are_explained_and_checked() {
        let t: toml::Table = toml::from_str(
            "[model]\npath = \"m\"\n[lora]\n[data]\ntrain = \"t.jsonl\"\n[run]\noutput_dir = \"o\"\n[dpo]\n",
        )
        .unwrap();
        let cfg = RunConfig::deserialize(t).unwrap();
        cfg.validate(Path::new("c.toml")).unwrap();
        let d = cfg.dpo.as_ref().unwrap();
        assert_eq!(
            (d.beta, d.loss_type.as_str(), d.max_length),
            (0.1, "sigmoid", 1024)
        );
        let full: toml::Table = toml::from_str(&cfg.to_toml()).unwrap();
        let mut keys = Vec::new();
        leaf_keys("", &full, &mut keys);
        let dpo_keys: Vec<&String> = keys.iter().filter(|k| k.starts_with("dpo.")).collect();
        let explained: Vec<(&str, &str)> = KEYS
            .iter()
            .map(|(k, d, _)| (*k, *d))
            .filter(|(k, _)| k.starts_with("dpo."))
            .collect();
        for k in &dpo_keys {
            assert!(
                explained.iter().any(|(e, _)| e == k),
                "key {k} is not in KEYS"
            );
        }
        // An unset optional key (default "none") is not written to TOML.
        for (k, default) in explained {
            assert!(
                default == "none" || dpo_keys.iter().any(|x| *x == k),
                "KEYS lists {k}, which [dpo] does not have"
            );
        }
        let check = |f: &dyn Fn(&mut RunConfig), field: &str, words: &str| {
            let mut c = cfg.clone();
            f(&mut c);
            let e = c.validate(Path::new("c.toml")).unwrap_err().to_string();
            assert!(e.contains(field) && e.contains(words), "{e}");
        };
        check(&|c| c.lora = None, "dpo", "[lora]");
        check(
            &|c| c.dpo.as_mut().unwrap().loss_type = "robust".into(),
            "dpo.loss_type",
            "robust",
        );
        check(
            &|c| c.dpo.as_mut().unwrap().beta = 0.0,
            "dpo.beta",
            "positive",
        );
        check(
            &|c| {
                let d = c.dpo.as_mut().unwrap();
                d.loss_type = "ipo".into();
                d.label_smoothing = 0.1;
            },
            "dpo.label_smoothing",
            "ipo",
        );
        check(&|c| c.sft = Some(SftSection {}), "dpo", "[sft] and [dpo]");
        check(
            &|c| c.dpo.as_mut().unwrap().truncation_mode = "keep_end".into(),
            "dpo.truncation_mode",
            "keep_start",
        );
    }

    /// The `[reward_model]` keys and `KEYS` agree both ways; a reward-model config validates
    /// with TRL's defaults; the cross-field rules name their key.
    #[test]
    fn reward_model_keys_are_explained_and_checked() {
        let t: toml::Table = toml::from_str(
            "[model]\npath = \"m\"\n[lora]\n[data]\ntrain = \"t.jsonl\"\n[run]\noutput_dir = \"o\"\n[reward_model]\ncenter_rewards_coefficient = 0.01\n",
        )
        .unwrap();
        let cfg = RunConfig::deserialize(t).unwrap();
        cfg.validate(Path::new("c.toml")).unwrap();
        let r = cfg.reward_model.as_ref().unwrap();
        assert_eq!(
            (r.max_length, r.center_rewards_coefficient),
            (1024, Some(0.01))
        );
        let full: toml::Table = toml::from_str(&cfg.to_toml()).unwrap();
        let mut keys = Vec::new();
        leaf_keys("", &full, &mut keys);
        let rm_keys: Vec<&String> = keys
            .iter()
            .filter(|k| k.starts_with("reward_model."))
            .collect();
        let explained: Vec<&str> = KEYS
            .iter()
            .map(|(k, _, _)| *k)
            .filter(|k| k.starts_with("reward_model."))
            .collect();
        for k in &rm_keys {
            assert!(explained.contains(&k.as_str()), "key {k} is not in KEYS");
        }
        for k in explained {
            assert!(
                rm_keys.iter().any(|x| *x == k),
                "KEYS lists {k}, which [reward_model] does not have"
            );
        }
        assert!(KEYS.iter().any(|(k, _, _)| *k == "reward_model"));
        let check = |f: &dyn Fn(&mut RunConfig), field: &str, words: &str| {
            let mut c = cfg.clone();
            f(&mut c);
            let e = c.validate(Path::new("c.toml")).unwrap_err().to_string();
            assert!(e.contains(field) && e.contains(words), "{e}");
        };
        check(&|c| c.lora = None, "reward_model", "[lora]");
        check(
            &|c| c.reward_model.as_mut().unwrap().center_rewards_coefficient = Some(-1.0),
            "reward_model.center_rewards_coefficient",
            ">= 0",
        );
        check(
            &|c| c.reward_model.as_mut().unwrap().max_length = 1,
            "reward_model.max_length",
            "at least 2",
        );
        check(
            &|c| c.dpo = Some(toml::from_str("").unwrap()),
            "reward_model",
            "[dpo] and [reward_model]",
        );
    }

    /// A `model` reward's path is relative to the config file, like every other path.
    #[test]
    fn model_reward_paths_resolve_against_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("sub/c.toml");
        std::fs::create_dir_all(cfg.parent().unwrap()).unwrap();
        std::fs::write(
            &cfg,
            "[model]\npath = \"m\"\n[lora]\n[data]\ntrain = \"t.jsonl\"\n[run]\noutput_dir = \"o\"\nbatch_size = 8\n[grpo]\nrewards = [{ name = \"model\", path = \"../runs/rm\" }, { name = \"format_tags\" }]\n",
        )
        .unwrap();
        let c = RunConfig::load(&cfg, &[]).unwrap();
        let g = c.grpo.unwrap();
        let want = std::path::absolute(dir.path().join("runs/rm")).unwrap();
        assert_eq!(
            g.rewards[0].get("path").and_then(|v| v.as_str()),
            Some(want.to_str().unwrap())
        );
        assert!(g.rewards[1].get("path").is_none());
    }

    /// The `[distill]` keys and `KEYS` agree both ways; TRL's GKD defaults; the cross-field
    /// rules name their key; the teacher paths resolve against the config file.
    #[test]
    fn distill_keys_are_explained_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub/c.toml");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(
            &file,
            "[model]\npath = \"m\"\n[data]\ntrain = \"t.jsonl\"\n[run]\noutput_dir = \"o\"\n[distill]\nteacher = \"../teacher\"\n",
        )
        .unwrap();
        let cfg = RunConfig::load(&file, &[]).unwrap();
        let d = cfg.distill.as_ref().unwrap();
        assert_eq!(
            (d.lmbda, d.beta, d.temperature, d.max_new_tokens, d.seq_kd),
            (0.5, 0.5, 0.9, 128, false)
        );
        assert_eq!(
            d.teacher,
            std::path::absolute(dir.path().join("teacher")).unwrap()
        );
        let full: toml::Table = toml::from_str(&cfg.to_toml()).unwrap();
        let mut keys = Vec::new();
        leaf_keys("", &full, &mut keys);
        let ours: Vec<&String> = keys.iter().filter(|k| k.starts_with("distill.")).collect();
        let explained: Vec<&str> = KEYS
            .iter()
            .map(|(k, _, _)| *k)
            .filter(|k| k.starts_with("distill."))
            .collect();
        for k in &ours {
            assert!(explained.contains(&k.as_str()), "key {k} is not in KEYS");
        }
        for k in explained {
            let optional_leaf = k == "distill.teacher_cache"; // None is not serialised
            assert!(
                optional_leaf || ours.iter().any(|x| *x == k),
                "KEYS lists {k}, which [distill] does not have"
            );
        }
        let check = |f: &dyn Fn(&mut DistillSection), field: &str, words: &str| {
            let mut c = cfg.clone();
            f(c.distill.as_mut().unwrap());
            let e = c.validate(Path::new("c.toml")).unwrap_err().to_string();
            assert!(e.contains(field) && e.contains(words), "{e}");
        };
        check(&|d| d.lmbda = 1.5, "distill.lmbda", "[0, 1]");
        check(&|d| d.beta = -0.1, "distill.beta", "[0, 1]");
        check(&|d| d.temperature = 0.0, "distill.temperature", "positive");
        check(
            &|d| d.teacher_cache = Some("c.safetensors".into()),
            "distill.top_k",
            "top-k",
        );
        check(
            &|d| {
                d.teacher_cache = Some("c.safetensors".into());
                d.top_k = 8;
            },
            "distill.teacher_cache",
            "lmbda = 0",
        );
        let mut c = cfg.clone();
        c.sft = Some(SftSection {});
        let e = c.validate(Path::new("c.toml")).unwrap_err().to_string();
        assert!(e.contains("[sft] and [distill]"), "{e}");
    }

    #[test]
    fn unknown_keys_and_bad_sets_are_refused() {
        let mut t = minimal();
        apply_set(&mut t, "run.max_stepz=3").unwrap();
        let e = RunConfig::deserialize(t).unwrap_err().to_string();
        assert!(e.contains("max_stepz"), "{e}");
        let mut t = minimal();
        assert!(apply_set(&mut t, "novalue").is_err());
        apply_set(&mut t, "run.max_steps=7").unwrap();
        apply_set(&mut t, "model.path=some/dir").unwrap();
        let cfg = RunConfig::deserialize(t).unwrap();
        assert_eq!(cfg.run.max_steps, 7);
        assert_eq!(cfg.model.path, PathBuf::from("some/dir"));
    }
}
