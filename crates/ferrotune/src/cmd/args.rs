//! The command line: every subcommand, flag and default of the `ferrotune` binary (clap
//! derive). `main.rs` matches [`Cmd`]; the `cmd/` files run each one.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ferrotune",
    version,
    about = "LLM post-training toolkit: LoRA SFT, GRPO, DPO, distillation, evaluation"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Hugging Face model folder or .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// A PEFT LoRA adapter folder to apply on top of the model (unmerged).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// A Jinja chat template file used instead of the model's (a base GGUF has none).
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum DataCmd {
    /// Generate a dataset: JSONL rows with `prompt` and `answer` (TRL's prompt-only format), or
    /// preference pairs (`prompt`, `chosen`, `rejected`).
    Gen {
        #[command(subcommand)]
        kind: GenKind,
    },
}

#[derive(Args, Clone)]
pub struct GenCommon {
    /// How many problems (never repeating within the file).
    #[arg(long)]
    pub n: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output JSONL file.
    #[arg(long)]
    pub out: PathBuf,
    /// Write conversational prompts ([{role, content}]) instead of plain text.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat prompts.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Leave out every prompt of these JSONL files (e.g. the training set, for a held-out set).
    #[arg(long)]
    pub exclude: Vec<PathBuf>,
}

#[derive(Subcommand)]
pub enum GenKind {
    /// `What is 47 + 815?` with the exact integer answer.
    Arithmetic {
        #[command(flatten)]
        common: GenCommon,
        /// Operand digits, e.g. 1..4 or 2.
        #[arg(long, default_value = "1..3")]
        digits: String,
        /// Operators, e.g. +-*/ (division is always exact).
        #[arg(long, default_value = "+-")]
        ops: String,
        /// Write SFT transcripts that call the `calculator` tool (`messages`: the problem, a
        /// `<tool_call>`, the tool's reply, the tagged answer) instead of prompt rows.
        #[arg(long, requires = "chat", conflicts_with = "sft")]
        tool_calls: bool,
        /// Write SFT conversations (`messages`: the problem, then the assistant's
        /// `<answer>N</answer>`) instead of prompt rows: teaches a base model the answer format
        /// and, through its chat template, to end its turn.
        #[arg(long, requires = "chat")]
        sft: bool,
    },
    /// Word problems from templates, with exact integer answers.
    WordProblems {
        #[command(flatten)]
        common: GenCommon,
    },
    /// Preference pairs (`prompt`, `chosen`, `rejected`) over arithmetic problems for DPO:
    /// chosen = `The answer is <answer>N</answer>.` with the right N; rejected = a wrong N (off
    /// by 1 to 3) or the right N untagged.
    Preferences {
        #[command(flatten)]
        common: GenCommon,
        /// Operand digits, e.g. 1..4 or 2.
        #[arg(long, default_value = "1..3")]
        digits: String,
        /// Operators, e.g. +-*/ (division is always exact).
        #[arg(long, default_value = "+-")]
        ops: String,
        /// What is wrong with the rejected reply: wrong | untagged.
        #[arg(long, default_value = "wrong")]
        rejected: String,
    },
    /// A model's completion of every prompt (`prompt` + `completion` rows, TRL's
    /// prompt-completion format): sequence-level distillation data for ordinary SFT.
    FromModel(ferrotune::distill_run::GenFromModelArgs),
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Generate a completion for a prompt.
    Generate(GenerateArgs),
    /// Perplexity of a text file: exp(mean NLL over scored tokens).
    Perplexity(PerplexityArgs),
    /// Show the token ids of a text or of a dataset row and which tokens SFT trains (the
    /// tokenizer only; no weights are read).
    Tokenize(TokenizeArgs),
    /// Train from a TOML config (`[sft]`, `[grpo]`, `[dpo]`, `[distill]` or `[reward_model]`); see `ferrotune config --explain`.
    Train(TrainArgs),
    /// Explain the run config: every key, its default and meaning.
    Config {
        #[arg(long)]
        explain: bool,
        /// Check a config file (parse, unknown keys, cross-field rules) without running it.
        #[arg(long)]
        check: Option<PathBuf>,
    },
    /// Merge a LoRA adapter into its base and write a Hugging Face model folder.
    Export(ExportArgs),
    /// Pretrain a small Llama from scratch (tokenizer, init, next-token training) from a TOML
    /// config; writes a Hugging Face folder. Example: configs/pretrain-demo.toml.
    Pretrain {
        /// The pretrain config (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Override a config key: --set run.max_steps=100 (repeatable).
        #[arg(long = "set")]
        sets: Vec<String>,
    },
    /// Synthetic datasets for verifiable domains.
    Data {
        #[command(subcommand)]
        cmd: DataCmd,
    },
    /// Distillation helpers: `cache-teacher` writes a teacher's top-k log-probs for a
    /// `[distill]` config (train with `distill.teacher_cache`).
    Distill {
        #[command(subcommand)]
        cmd: ferrotune::distill_run::DistillCmd,
    },
    /// List the reward functions usable in `grpo.rewards`, with their parameters.
    Rewards,
    /// Evaluate and rank every checkpoint of a run; flag perplexity regressions.
    Compare(CompareArgs),
    /// Evaluate a model (+ adapter) on a task with the training reward functions: mean reward,
    /// accuracy, format rate, pass@k; and perplexity of a held-out text.
    Eval(EvalArgs),
    /// The whole recipe on the embedded model, nothing downloaded: evaluate, SFT the answer
    /// format, GRPO with verifiable rewards, evaluate every checkpoint, report.
    Demo {
        /// Output folder (must be absent or empty).
        #[arg(long, default_value = "runs/demo")]
        out: PathBuf,
        /// A short run (about half a minute on 2 cores) that shows every stage.
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Override a key of the GRPO stage's config, e.g. --set grpo.dynamic_sampling=true
        /// (repeatable).
        #[arg(long = "set")]
        sets: Vec<String>,
    },
    /// Benchmarks on a random-init Qwen2-shaped model (bench/gpu/run.sh compares them with
    /// PyTorch); prints one JSON line.
    Bench {
        #[command(subcommand)]
        cmd: BenchCmd,
    },
}

/// `ferrotune generate`.
#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text (a user message with --chat).
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    pub chat: bool,
    /// Optional system message (with --chat).
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the completion contains this text (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// A smaller model with the same tokenizer that drafts tokens for the model to verify
    /// (speculative decoding: the output follows the model's own distribution).
    #[arg(long)]
    pub draft_model: Option<PathBuf>,
    /// Tokens the draft proposes per verification pass.
    #[arg(long, default_value_t = 5, requires = "draft_model")]
    pub draft_tokens: usize,
}

/// `ferrotune perplexity`.
#[derive(Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// UTF-8 text file, or a JSONL/Parquet/CSV file's `text` column (each row scored on
    /// its own, one perplexity over all their tokens).
    #[arg(long)]
    pub text: PathBuf,
    /// Longest window fed at once (default: the model's context length, at most 2048).
    #[arg(long)]
    pub window: Option<usize>,
    /// New tokens scored per window after the first (default: window / 2).
    #[arg(long)]
    pub stride: Option<usize>,
}

/// `ferrotune tokenize`.
#[derive(Args)]
pub struct TokenizeArgs {
    /// Hugging Face model folder or .gguf file (its tokenizer).
    #[arg(long)]
    pub model: PathBuf,
    /// A Jinja chat template file used instead of the model's.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// A text to tokenize (a user message with --chat).
    #[arg(long, conflicts_with = "data", required_unless_present = "data")]
    pub text: Option<String>,
    /// A dataset file (.jsonl/.json/.parquet/.csv with TRL's SFT columns): row --row is
    /// tokenized as `ferrotune train` does for SFT (loss masks as [sft]'s defaults).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// The data row, from 0.
    #[arg(long, default_value_t = 0, requires = "data")]
    pub row: usize,
    /// Wrap --text in the chat template as a user message, with the generation prompt.
    #[arg(long, requires = "text")]
    pub chat: bool,
    /// One JSON object (ids, tokens, trained) instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// `ferrotune train`.
#[derive(Args)]
pub struct TrainArgs {
    /// The run config (TOML).
    #[arg(long, required_unless_present = "resume")]
    pub config: Option<PathBuf>,
    /// Override a config key: --set run.max_steps=100 (repeatable).
    #[arg(long = "set")]
    pub sets: Vec<String>,
    /// Continue the run in this folder from its newest complete checkpoint.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Start afresh in an existing run folder, deleting its checkpoints and logs.
    #[arg(long)]
    pub overwrite: bool,
}

/// `ferrotune export`.
#[derive(Args)]
pub struct ExportArgs {
    /// Base model: Hugging Face folder or .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter folder (e.g. RUN/checkpoints/step-N); omit to convert the base only.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Output folder (must be empty or absent).
    #[arg(long)]
    pub out: PathBuf,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Keep only these decoder layers, renumbered in this order (e.g. `0,10,20,29`): a
    /// smaller student or draft model that starts from this model's weights and shares its
    /// tokenizer.
    #[arg(long, value_delimiter = ',', conflicts_with = "adapter")]
    pub layers: Option<Vec<usize>>,
    /// A Jinja chat template file written as the folder's chat_template.jinja (the template the
    /// model was trained with, for a base GGUF that has none).
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
}

/// `ferrotune compare`.
#[derive(Args)]
pub struct CompareArgs {
    /// The run folder.
    pub run: PathBuf,
    /// Task file (default: the run's data.eval).
    #[arg(long)]
    pub task: Option<PathBuf>,
    /// Reward functions as a TOML array (default: the run's grpo.rewards).
    #[arg(long)]
    pub rewards: Option<String>,
    /// Held-out "do not forget" text: perplexity per checkpoint vs the base.
    #[arg(long)]
    pub forget_set: Option<PathBuf>,
    #[arg(long, default_value_t = 1.05)]
    pub max_ppl_ratio: f64,
    /// Prompts of a cheap first round that drops the worse half (0 = one full round).
    #[arg(long, default_value_t = 0)]
    pub first_round: usize,
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
}

/// `ferrotune eval`.
#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Task file: JSONL/Parquet/CSV with `prompt` and what the rewards read (`answer`, ...).
    #[arg(long)]
    pub task: Option<PathBuf>,
    /// Reward functions as a TOML array: '[{name="answer_match", extract="answer_tag"}]'.
    #[arg(long)]
    pub rewards: Option<String>,
    /// Take rewards, stop strings, lengths and the task (data.eval) from a GRPO run config.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Completions per prompt (pass@k needs k <= samples).
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// pass@k for these k (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub k: Vec<usize>,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    #[arg(long)]
    pub stop: Vec<String>,
    #[arg(long, default_value_t = 512)]
    pub max_prompt_len: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also the perplexity of this text file (or JSONL `text` column).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write every completion here (JSONL: prompt, completion, its turns with tools, rewards)
    #[arg(long)]
    pub completions: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum BenchCmd {
    /// One LoRA training step (forward, backward, AdamW), median over `steps`.
    LoraStep {
        #[command(flatten)]
        shape: ferrotune::bench::ShapeArgs,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 512)]
        seq: usize,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
    },
    /// Sampled generation (temperature 1, no stop) of `new_tokens` per prompt.
    Rollout {
        #[command(flatten)]
        shape: ferrotune::bench::ShapeArgs,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        #[arg(long, default_value_t = 128)]
        prompt_len: usize,
        #[arg(long, default_value_t = 256)]
        new_tokens: usize,
    },
    /// Tokens/s of the model alone and with a draft model (speculative decoding), and the
    /// draft's acceptance rate, on a prompt set; one JSON object on stdout (and in --out).
    Speculative {
        #[command(flatten)]
        model: ModelArgs,
        /// The draft model (same tokenizer).
        #[arg(long)]
        draft: PathBuf,
        /// JSONL prompts (TRL's `prompt` column, text or chat); default: built-in questions.
        #[arg(long)]
        prompts: Option<PathBuf>,
        /// How many prompts to decode.
        #[arg(long, default_value_t = 8)]
        n: usize,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 5)]
        draft_tokens: usize,
        /// 0 = greedy (then the outputs must equal the model's own; mismatches are counted).
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also write the JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}
