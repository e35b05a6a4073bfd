//! The `ferrotune` binary: clap commands, argument → plan resolution, and exit codes. Holds no
//! model or training math; every error is printed as one line with its whole cause chain.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use ferrotune::config::{self, RunConfig};
use ferrotune::dpo_run::run_dpo;
use ferrotune::grpo_run::run_grpo;
use ferrotune::lm::{parse_device, parse_dtype, Lm};
use ferrotune::rm_run::run_reward_model;
use ferrotune::sft_run::run_sft;
use ferrotune::speculative_run;
use ferrotune_generate::speculative::{speculative_generate, SpeculativeOptions};
use ferrotune_generate::{generate, GenerateOptions, SamplingParams};
use ferrotune_models::LoadOptions;
use ferrotune_nn::Mode;
use ferrotune_tokenize::Message;

#[derive(Parser)]
#[command(
    name = "ferrotune",
    version,
    about = "LLM post-training toolkit: LoRA SFT, GRPO, DPO, distillation, evaluation"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// Hugging Face model folder or .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// A PEFT LoRA adapter folder to apply on top of the model (unmerged).
    #[arg(long)]
    adapter: Option<PathBuf>,
}

#[derive(Subcommand)]
enum DataCmd {
    /// Generate a dataset: JSONL rows with `prompt` and `answer` (TRL's prompt-only format), or
    /// preference pairs (`prompt`, `chosen`, `rejected`).
    Gen {
        #[command(subcommand)]
        kind: GenKind,
    },
}

#[derive(Args, Clone)]
struct GenCommon {
    /// How many problems (never repeating within the file).
    #[arg(long)]
    n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output JSONL file.
    #[arg(long)]
    out: PathBuf,
    /// Write conversational prompts ([{role, content}]) instead of plain text.
    #[arg(long)]
    chat: bool,
    /// System message for --chat prompts.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Leave out every prompt of these JSONL files (e.g. the training set, for a held-out set).
    #[arg(long)]
    exclude: Vec<PathBuf>,
}

#[derive(Subcommand)]
enum GenKind {
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
enum Cmd {
    /// Generate a completion for a prompt.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// The prompt text (a user message with --chat).
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt in the model's chat template as a user message.
        #[arg(long)]
        chat: bool,
        /// Optional system message (with --chat).
        #[arg(long)]
        system: Option<String>,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long)]
        top_p: Option<f64>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stop when the completion contains this text (repeatable).
        #[arg(long)]
        stop: Vec<String>,
        /// A smaller model with the same tokenizer that drafts tokens for the model to verify
        /// (speculative decoding: the output follows the model's own distribution).
        #[arg(long)]
        draft_model: Option<PathBuf>,
        /// Tokens the draft proposes per verification pass.
        #[arg(long, default_value_t = 5, requires = "draft_model")]
        draft_tokens: usize,
    },
    /// Perplexity of a text file: exp(mean NLL over scored tokens).
    Perplexity {
        #[command(flatten)]
        model: ModelArgs,
        /// UTF-8 text file, or a JSONL/Parquet/CSV file's `text` column (each row scored on
        /// its own, one perplexity over all their tokens).
        #[arg(long)]
        text: PathBuf,
        /// Longest window fed at once (default: the model's context length, at most 2048).
        #[arg(long)]
        window: Option<usize>,
        /// New tokens scored per window after the first (default: window / 2).
        #[arg(long)]
        stride: Option<usize>,
    },
    /// Train from a TOML config (`[sft]`, `[grpo]`, `[dpo]`, `[distill]` or `[reward_model]`); see `ferrotune config --explain`.
    Train {
        /// The run config (TOML).
        #[arg(long, required_unless_present = "resume")]
        config: Option<PathBuf>,
        /// Override a config key: --set run.max_steps=100 (repeatable).
        #[arg(long = "set")]
        sets: Vec<String>,
        /// Continue the run in this folder from its newest complete checkpoint.
        #[arg(long)]
        resume: Option<PathBuf>,
        /// Start afresh in an existing run folder, deleting its checkpoints and logs.
        #[arg(long)]
        overwrite: bool,
    },
    /// Explain the run config: every key, its default and meaning.
    Config {
        #[arg(long)]
        explain: bool,
        /// Check a config file (parse, unknown keys, cross-field rules) without running it.
        #[arg(long)]
        check: Option<PathBuf>,
    },
    /// Merge a LoRA adapter into its base and write a Hugging Face model folder.
    Export {
        /// Base model: Hugging Face folder or .gguf file.
        #[arg(long)]
        model: PathBuf,
        /// PEFT adapter folder (e.g. RUN/checkpoints/step-N); omit to convert the base only.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Output folder (must be empty or absent).
        #[arg(long)]
        out: PathBuf,
        /// f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Keep only these decoder layers, renumbered in this order (e.g. `0,10,20,29`): a
        /// smaller student or draft model that starts from this model's weights and shares its
        /// tokenizer.
        #[arg(long, value_delimiter = ',', conflicts_with = "adapter")]
        layers: Option<Vec<usize>>,
    },
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
    Compare {
        /// The run folder.
        run: PathBuf,
        /// Task file (default: the run's data.eval).
        #[arg(long)]
        task: Option<PathBuf>,
        /// Reward functions as a TOML array (default: the run's grpo.rewards).
        #[arg(long)]
        rewards: Option<String>,
        /// Held-out "do not forget" text: perplexity per checkpoint vs the base.
        #[arg(long)]
        forget_set: Option<PathBuf>,
        #[arg(long, default_value_t = 1.05)]
        max_ppl_ratio: f64,
        /// Prompts of a cheap first round that drops the worse half (0 = one full round).
        #[arg(long, default_value_t = 0)]
        first_round: usize,
        #[arg(long)]
        max_new_tokens: Option<usize>,
    },
    /// Evaluate a model (+ adapter) on a task with the training reward functions: mean reward,
    /// accuracy, format rate, pass@k; and perplexity of a held-out text.
    Eval {
        #[command(flatten)]
        model: ModelArgs,
        /// Task file: JSONL/Parquet/CSV with `prompt` and what the rewards read (`answer`, ...).
        #[arg(long)]
        task: Option<PathBuf>,
        /// Reward functions as a TOML array: '[{name="answer_match", extract="answer_tag"}]'.
        #[arg(long)]
        rewards: Option<String>,
        /// Take rewards, stop strings, lengths and the task (data.eval) from a GRPO run config.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Completions per prompt (pass@k needs k <= samples).
        #[arg(long, default_value_t = 1)]
        samples: usize,
        /// pass@k for these k (comma separated).
        #[arg(long, value_delimiter = ',', default_value = "1")]
        k: Vec<usize>,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long)]
        max_new_tokens: Option<usize>,
        #[arg(long)]
        stop: Vec<String>,
        #[arg(long, default_value_t = 512)]
        max_prompt_len: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also the perplexity of this text file (or JSONL `text` column).
        #[arg(long)]
        text: Option<PathBuf>,
        /// Write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
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
    },
    /// Benchmarks on a random-init Qwen2-shaped model (bench/gpu/run.sh compares them with
    /// PyTorch); prints one JSON line.
    Bench {
        #[command(subcommand)]
        cmd: BenchCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
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

fn load_options(m: &ModelArgs) -> Result<LoadOptions> {
    Ok(LoadOptions {
        dtype: parse_dtype(&m.dtype)?,
        device: parse_device(&m.device)?,
        lora: None,
        trainable_base: false,
    })
}

fn load(m: &ModelArgs) -> Result<Lm> {
    Ok(Lm::load_with(
        &m.model,
        m.adapter.as_deref(),
        &load_options(m)?,
    )?)
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Generate {
            model,
            prompt,
            chat,
            system,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            stop,
            draft_model,
            draft_tokens,
        } => {
            if max_new_tokens == 0 {
                bail!("--max-new-tokens must be at least 1");
            }
            let sampling = SamplingParams {
                temperature,
                top_k,
                top_p,
                seed,
            };
            sampling
                .check()
                .map_err(|e| anyhow::anyhow!("--{}", e.replace('_', "-")))?;
            let lm = load(&model)?;
            let ids = if chat {
                let mut msgs = Vec::new();
                if let Some(s) = system {
                    msgs.push(Message::new("system", &s));
                }
                msgs.push(Message::new("user", &prompt));
                lm.tokenizer.render(&msgs, true)?.ids
            } else {
                lm.tokenizer.encode(&prompt, true)?
            };
            let opts = GenerateOptions {
                sampling,
                max_new_tokens,
                eos_ids: lm.eos_ids(),
                pad_id: lm.pad_id(),
                mode: Mode::EVAL,
            };
            let tok = &lm.tokenizer;
            let stop_rule = |_: usize, ids: &[u32]| {
                !stop.is_empty()
                    && tok
                        .decode(ids, true)
                        .map(|t| stop.iter().any(|s| t.contains(s.as_str())))
                        .unwrap_or(false)
            };
            if let Some(draft) = draft_model {
                let d =
                    speculative_run::load_draft(&lm, &model.model, &draft, &load_options(&model)?)?;
                let spec = SpeculativeOptions {
                    sampling: opts.sampling.clone(),
                    max_new_tokens,
                    eos_ids: opts.eos_ids.clone(),
                    num_draft_tokens: draft_tokens,
                    mode: Mode::EVAL,
                };
                let out = speculative_generate(
                    lm.model.as_ref(),
                    d.model.as_ref(),
                    &ids,
                    &spec,
                    &|ids: &[u32]| stop_rule(0, ids),
                    &lm.device,
                )?;
                println!("{}", lm.tokenizer.decode(&out.generation.ids, true)?);
                std::io::stdout().flush().ok();
                eprintln!("{}", speculative_run::stats_line(&out.stats));
                return Ok(());
            }
            let t = Instant::now();
            let gens = generate(lm.model.as_ref(), &[ids], &opts, &stop_rule, &lm.device)?;
            let secs = t.elapsed().as_secs_f64();
            let g = &gens[0];
            let text = lm.tokenizer.decode(&g.ids, true)?;
            println!("{text}");
            std::io::stdout().flush().ok();
            eprintln!(
                "[{} tokens, {:.1} tokens/s, finish: {:?}]",
                g.ids.len(),
                g.ids.len() as f64 / secs,
                g.finish
            );
        }
        Cmd::Perplexity {
            model,
            text,
            window,
            stride,
        } => {
            // A plain text file is scored whole; a data file's `text` column row by row, as
            // `eval --text` reads it.
            let lm = load(&model)?;
            let t = Instant::now();
            let p = ferrotune::task_eval::perplexity_of_file(&lm, &text, window, stride)?;
            println!(
                "perplexity {:.4}  (mean NLL {:.6} over {} tokens, {:.1} tokens/s)",
                p.ppl(),
                p.mean_nll(),
                p.tokens,
                p.tokens as f64 / t.elapsed().as_secs_f64()
            );
        }
        Cmd::Train {
            config,
            sets,
            resume,
            overwrite,
        } => {
            let cfg = match (&config, &resume) {
                (Some(c), _) => RunConfig::load(c, &sets)?,
                (None, Some(r)) => {
                    // Not a run folder: say so rather than "config.toml: no such file".
                    ferrotune_ckpt::RunDir::open(r)?;
                    RunConfig::load(&r.join("config.toml"), &sets)?
                }
                (None, None) => bail!("give --config FILE or --resume RUN_DIR"),
            };
            if let Some(r) = &resume {
                if config.is_some() && r != &cfg.run.output_dir {
                    bail!(
                        "--resume {} differs from run.output_dir {} in the config",
                        r.display(),
                        cfg.run.output_dir.display()
                    );
                }
            }
            if cfg.reward_model.is_some() {
                let s = run_reward_model(&cfg, resume.is_some(), overwrite)?;
                let f = |x: Option<f64>| x.map(|v| format!("{v:.4}")).unwrap_or("-".into());
                println!(
                    "done: {} steps, loss {} -> {}{}{}{}",
                    s.steps,
                    f(s.first_loss),
                    f(s.last_loss),
                    s.last_eval
                        .as_ref()
                        .map(|e| format!(
                            ", eval accuracy {} -> {:.3}, eval margin {:.4}",
                            s.first_eval
                                .as_ref()
                                .map_or("-".into(), |f| format!("{:.3}", f.accuracy)),
                            e.accuracy,
                            e.margin
                        ))
                        .unwrap_or_default(),
                    s.last_checkpoint
                        .map(|p| format!(", checkpoint {}", p.display()))
                        .unwrap_or_default(),
                    s.export
                        .map(|p| format!(", reward model {}", p.display()))
                        .unwrap_or_default()
                );
                return Ok(());
            }
            if cfg.distill.is_some() {
                let s = ferrotune::distill_run::run_distill(&cfg, resume.is_some(), overwrite)?;
                let f = |x: Option<f64>| x.map(|v| format!("{v:.4}")).unwrap_or("-".into());
                println!(
                    "done: {} steps, loss {} -> {}, distill loss {} -> {}{}, {} on-policy micro-batches{}",
                    s.steps,
                    f(s.first_loss),
                    f(s.last_loss),
                    f(s.first_distill_loss),
                    f(s.last_distill_loss),
                    s.last_eval
                        .map(|e| format!(
                            ", eval forward KL {} -> {:.4}",
                            f(s.first_eval.map(|x| x.forward_kl)),
                            e.forward_kl
                        ))
                        .unwrap_or_default(),
                    s.on_policy_batches,
                    s.last_checkpoint
                        .map(|p| format!(", checkpoint {}", p.display()))
                        .unwrap_or_default()
                );
                return Ok(());
            }
            if cfg.dpo.is_some() {
                let s = run_dpo(&cfg, resume.is_some(), overwrite)?;
                let f = |x: Option<f64>| x.map(|v| format!("{v:.4}")).unwrap_or("-".into());
                println!(
                    "done: {} steps, loss {} -> {}{}{}",
                    s.steps,
                    f(s.first_loss),
                    f(s.last_loss),
                    s.last_eval
                        .as_ref()
                        .map(|e| format!(
                            ", eval reward accuracy {} -> {:.3}, eval margin {:.4}",
                            s.first_eval
                                .as_ref()
                                .map_or("-".into(), |f| format!("{:.3}", f.rewards_accuracies)),
                            e.rewards_accuracies,
                            e.rewards_margins
                        ))
                        .unwrap_or_default(),
                    s.last_checkpoint
                        .map(|p| format!(", checkpoint {}", p.display()))
                        .unwrap_or_default()
                );
                return Ok(());
            }
            if cfg.ppo.is_some() {
                let s = ferrotune::ppo_run::run_ppo(&cfg, resume.is_some(), overwrite)?;
                let f = |x: Option<f64>| x.map(|v| format!("{v:.3}")).unwrap_or("-".into());
                println!(
                    "done: {} steps, mean score {} -> {}, KL {} (max {:.3}){}",
                    s.steps,
                    f(s.first_score),
                    f(s.last_score),
                    f(s.last_kl),
                    s.max_kl,
                    s.last_checkpoint
                        .map(|p| format!(", checkpoint {}", p.display()))
                        .unwrap_or_default()
                );
                return Ok(());
            }
            if cfg.grpo.is_some() {
                let s = run_grpo(&cfg, resume.is_some(), overwrite)?;
                let f = |x: Option<f64>| x.map(|v| format!("{v:.3}")).unwrap_or("-".into());
                println!(
                    "done: {} steps, mean reward {} -> {}{}, max |ratio - 1| on first iterations {:.1e}, {} health findings{}",
                    s.steps,
                    f(s.first_reward),
                    f(s.last_reward),
                    s.last_eval_reward
                        .map(|e| format!(", eval reward {} -> {e:.3}", f(s.first_eval_reward)))
                        .unwrap_or_default(),
                    s.max_first_ratio_dev,
                    s.findings.len(),
                    s.last_checkpoint
                        .map(|p| format!(", checkpoint {}", p.display()))
                        .unwrap_or_default()
                );
                return Ok(());
            }
            let summary = run_sft(&cfg, resume.is_some(), overwrite)?;
            println!(
                "done: {} steps, loss {} -> {}{}{}",
                summary.steps,
                summary
                    .first_loss
                    .map(|l| format!("{l:.4}"))
                    .unwrap_or("-".into()),
                summary
                    .last_loss
                    .map(|l| format!("{l:.4}"))
                    .unwrap_or("-".into()),
                summary
                    .last_eval_loss
                    .map(|l| format!(", eval loss {l:.4}"))
                    .unwrap_or_default(),
                summary
                    .last_checkpoint
                    .map(|p| format!(", checkpoint {}", p.display()))
                    .unwrap_or_default()
            );
        }
        Cmd::Config { explain, check } => {
            if let Some(c) = check {
                let cfg = RunConfig::load(&c, &[])?;
                println!("{}: ok", c.display());
                print!("{}", cfg.to_toml());
            } else if explain {
                print!("{}", config::explain());
            } else {
                bail!("give --explain or --check FILE");
            }
        }
        Cmd::Export {
            model,
            adapter,
            out,
            dtype,
            layers,
        } => {
            let dtype = parse_dtype(&dtype)?;
            let report = match layers {
                Some(l) => ferrotune_ckpt::export_layer_subset(&model, &l, &out, dtype)?,
                None => ferrotune_ckpt::export_merged(&model, adapter.as_deref(), &out, dtype)?,
            };
            for w in &report.warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "wrote {} ({} tensors, {} merged with the adapter)",
                report.out.display(),
                report.tensors,
                report.merged.len()
            );
        }
        Cmd::Pretrain { config, sets } => {
            let cfg = ferrotune::pretrain_run::PretrainConfig::load(&config, &sets)?;
            let s = ferrotune::pretrain_run::pretrain(&cfg, false)?;
            println!(
                "done: {} steps in {:.0}s, loss {} -> {}{}, wrote {}",
                s.sft.steps,
                s.seconds,
                s.sft
                    .first_loss
                    .map(|l| format!("{l:.4}"))
                    .unwrap_or("-".into()),
                s.sft
                    .last_loss
                    .map(|l| format!("{l:.4}"))
                    .unwrap_or("-".into()),
                s.sft
                    .last_eval_loss
                    .map(|l| format!(", eval loss {l:.4}"))
                    .unwrap_or_default(),
                s.model_dir.display()
            );
        }
        Cmd::Data {
            cmd: DataCmd::Gen { kind },
        } => gen_data(kind)?,
        Cmd::Distill {
            cmd:
                ferrotune::distill_run::DistillCmd::CacheTeacher {
                    config,
                    sets,
                    out,
                    batch_size,
                },
        } => {
            let cfg = RunConfig::load(&config, &sets)?;
            let path = ferrotune::distill_run::cache_teacher(&cfg, out.as_deref(), batch_size)?;
            println!("wrote {}", path.display());
        }
        Cmd::Eval {
            model,
            task,
            rewards,
            config,
            samples,
            k,
            temperature,
            max_new_tokens,
            stop,
            max_prompt_len,
            seed,
            text,
            json,
        } => {
            use ferrotune::grpo_run::{load_prompts, reward_specs, role_of};
            use ferrotune::task_eval::{eval_task, perplexity_of_file, TaskOptions};
            let run_cfg = config
                .as_ref()
                .map(|c| RunConfig::load(c, &[]))
                .transpose()?;
            let grpo = run_cfg.as_ref().and_then(|c| c.grpo.clone());
            if run_cfg.is_some() && grpo.is_none() {
                bail!("--config: not a GRPO config (no [grpo] section with rewards)");
            }
            let task = task.or_else(|| run_cfg.as_ref().and_then(|c| c.data.eval.clone()));
            if task.is_none() && text.is_none() {
                bail!("give --task FILE (with --rewards or --config) and/or --text FILE");
            }
            let lm = load(&model)?;
            let mut report = serde_json::Map::new();
            if let Some(task) = &task {
                let specs: Vec<ferrotune_rewards::RewardSpec> = match (&rewards, &grpo) {
                    (Some(r), _) => parse_rewards(r)?,
                    (None, Some(g)) => reward_specs(g)?,
                    (None, None) => bail!(
                        "--task needs --rewards '[{{name=\"answer_match\"}}]' or --config RUN.toml"
                    ),
                };
                let set = ferrotune::model_reward::reward_set(&specs, &lm.device, "rewards")?;
                let roles: Vec<_> = specs.iter().map(|s| role_of(&s.name)).collect();
                let prompt_len = grpo.as_ref().map_or(max_prompt_len, |g| g.max_prompt_len);
                let items = load_prompts(&lm.tokenizer, task, prompt_len)?;
                let opts = TaskOptions {
                    samples,
                    temperature,
                    top_p: None,
                    max_new_tokens: max_new_tokens
                        .or(grpo.as_ref().map(|g| g.max_completion_len))
                        .unwrap_or(256),
                    batch_size: 16,
                    stop: if stop.is_empty() {
                        grpo.as_ref().map(|g| g.stop.clone()).unwrap_or_default()
                    } else {
                        stop
                    },
                    seed,
                    ks: k,
                };
                let r = eval_task(&lm, &items, &set, &roles, &opts)?;
                println!(
                    "{}: {} prompts x {} samples in {:.1}s",
                    task.display(),
                    r.prompts,
                    r.samples_per_prompt,
                    r.seconds
                );
                println!("  mean reward      {:.4}", r.mean_reward);
                for (l, m) in &r.rewards {
                    println!("  {l:<16} {m:.4}");
                }
                if let Some(a) = r.accuracy {
                    println!("  accuracy         {a:.4}");
                }
                if let Some(f) = r.format_rate {
                    println!("  format rate      {f:.4}");
                }
                for (k, p) in &r.pass_at_k {
                    println!("  pass@{k:<11} {p:.4}");
                }
                println!(
                    "  mean length      {:.1} tokens ({:.0}% truncated)",
                    r.mean_length,
                    100.0 * r.truncated_fraction
                );
                report.insert("task".into(), serde_json::to_value(&r)?);
            }
            if let Some(t) = &text {
                let p = perplexity_of_file(&lm, t, None, None)?;
                println!(
                    "{}: perplexity {:.4} (mean NLL {:.6} over {} tokens)",
                    t.display(),
                    p.ppl(),
                    p.mean_nll(),
                    p.tokens
                );
                report.insert(
                    "perplexity".into(),
                    serde_json::json!({"ppl": p.ppl(), "mean_nll": p.mean_nll(), "tokens": p.tokens}),
                );
            }
            if let Some(j) = json {
                std::fs::write(&j, serde_json::to_string_pretty(&report)?)
                    .with_context(|| format!("{}: cannot write", j.display()))?;
            }
        }
        Cmd::Compare {
            run,
            task,
            rewards,
            forget_set,
            max_ppl_ratio,
            first_round,
            max_new_tokens,
        } => {
            let rewards = rewards.map(|r| parse_rewards(&r)).transpose()?;
            let opts = ferrotune::compare::CompareOptions {
                run: run.clone(),
                task,
                rewards,
                forget_set,
                max_ppl_ratio,
                first_round,
                max_new_tokens,
            };
            let rows = ferrotune::compare::compare(&opts)?;
            print!("{}", ferrotune::compare::table(&rows, max_ppl_ratio));
            let mut pts: Vec<(f64, f64)> = rows
                .iter()
                .filter_map(|r| Some((r.step? as f64, r.mean_reward)))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let plot = run.join("plots/compare.png");
            ferrotune_report::plot_series_labeled(
                &plot,
                "checkpoints: mean reward on the eval set",
                "step",
                "mean reward",
                &[("mean reward", pts)],
            )?;
            std::fs::write(
                run.join("compare.json"),
                serde_json::to_string_pretty(&rows)?,
            )?;
            println!(
                "wrote {} and {}",
                plot.display(),
                run.join("compare.json").display()
            );
        }
        Cmd::Rewards => {
            println!("reward functions for grpo.rewards = [{{ name = \"...\", weight = 1.0, ...params }}]:\n");
            for (name, help) in ferrotune_rewards::available() {
                println!("{name:<18} {help}");
            }
            println!("{:<18} {}", "model", ferrotune::model_reward::HELP);
        }
        Cmd::Demo { out, quick, seed } => {
            ferrotune::demo::run_demo(&ferrotune::demo::DemoOptions { out, quick, seed })?;
        }
        Cmd::Bench { cmd } => {
            let line = match cmd {
                BenchCmd::LoraStep {
                    shape,
                    batch,
                    seq,
                    steps,
                    warmup,
                } => ferrotune::bench::lora_step(&shape, batch, seq, steps, warmup)?,
                BenchCmd::Rollout {
                    shape,
                    batch,
                    prompt_len,
                    new_tokens,
                } => ferrotune::bench::rollout(&shape, batch, prompt_len, new_tokens)?,
                BenchCmd::Speculative {
                    model,
                    draft,
                    prompts,
                    n,
                    max_new_tokens,
                    draft_tokens,
                    temperature,
                    seed,
                    out,
                } => {
                    let lm = load(&model)?;
                    let d = speculative_run::load_draft(
                        &lm,
                        &model.model,
                        &draft,
                        &load_options(&model)?,
                    )?;
                    let args = speculative_run::BenchArgs {
                        prompts,
                        n,
                        max_new_tokens,
                        draft_tokens,
                        sampling: SamplingParams {
                            temperature,
                            top_k: None,
                            top_p: None,
                            seed,
                        },
                        out,
                    };
                    serde_json::to_value(speculative_run::bench(&lm, &d, &args)?)?
                }
            };
            println!("{line}");
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    ferrotune_nn::init_cpu_threads();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the whole cause chain, skipping causes a message already quotes.
            let mut line = String::new();
            for cause in e.chain() {
                let c = cause.to_string();
                if !line.contains(&c) {
                    if !line.is_empty() {
                        line.push_str(": ");
                    }
                    line.push_str(&c);
                }
            }
            eprintln!("error: {}", line.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// `--rewards '[{name="answer_match"}, ...]'` → specs (errors name the entry).
fn parse_rewards(r: &str) -> Result<Vec<ferrotune_rewards::RewardSpec>> {
    let t: toml::Table = toml::from_str(&format!("r = {r}"))
        .map_err(|e| anyhow::anyhow!("--rewards: {}", e.to_string().trim()))?;
    let arr = t
        .get("r")
        .and_then(|v| v.as_array())
        .cloned()
        .context("--rewards: expected a TOML array of tables")?;
    arr.into_iter()
        .enumerate()
        .map(|(i, v)| {
            serde::Deserialize::deserialize(v).map_err(|e| anyhow::anyhow!("--rewards[{i}]: {e}"))
        })
        .collect()
}

/// `ferrotune data gen ...`
fn gen_data(kind: GenKind) -> Result<()> {
    use ferrotune_data::{
        arithmetic_excluding, parse_digits, parse_ops, prompt_examples, read_rows,
        word_problems_excluding, write_jsonl, ArithmeticSpec, Example, PromptFormat, Segment,
        WordSpec,
    };
    let common = match &kind {
        GenKind::Arithmetic { common, .. }
        | GenKind::WordProblems { common }
        | GenKind::Preferences { common, .. } => common.clone(),
        GenKind::FromModel(a) => {
            let n = ferrotune::distill_run::gen_from_model(a)?;
            println!("wrote {n} completions to {}", a.out.display());
            return Ok(());
        }
    };
    // Prompts to leave out, as the generator writes them (the user turn for chat files).
    let mut exclude = std::collections::HashSet::new();
    for p in &common.exclude {
        for ex in prompt_examples(&read_rows(p)?, p)? {
            if let Example::Prompt { prompt, .. } = ex {
                match prompt {
                    Segment::Text(t) => exclude.insert(t),
                    Segment::Chat(m) => exclude.insert(
                        m.iter()
                            .rev()
                            .find(|m| m.role == "user")
                            .map(|m| m.content.clone())
                            .unwrap_or_default(),
                    ),
                };
            }
        }
    }
    let problems = match &kind {
        GenKind::Arithmetic { digits, ops, .. } => {
            let spec = ArithmeticSpec {
                n: common.n,
                seed: common.seed,
                digits: parse_digits(digits).with_context(|| "--digits")?,
                ops: parse_ops(ops).with_context(|| "--ops")?,
            };
            arithmetic_excluding(&spec, &exclude)?
        }
        GenKind::WordProblems { .. } => word_problems_excluding(
            &WordSpec {
                n: common.n,
                seed: common.seed,
            },
            &exclude,
        )?,
        GenKind::Preferences { digits, ops, .. } => {
            let spec = ArithmeticSpec {
                n: common.n,
                seed: common.seed,
                digits: parse_digits(digits).with_context(|| "--digits")?,
                ops: parse_ops(ops).with_context(|| "--ops")?,
            };
            arithmetic_excluding(&spec, &exclude)?
        }
        GenKind::FromModel(_) => unreachable!("returned above"),
    };
    let format = if common.chat {
        PromptFormat::Chat {
            system: common.system.clone(),
        }
    } else {
        PromptFormat::Text
    };
    if let Some(dir) = common.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
    }
    if let GenKind::Preferences { rejected, .. } = &kind {
        let kind: ferrotune_data::RejectedKind = rejected.parse().with_context(|| "--rejected")?;
        let pairs = ferrotune_data::preference_pairs(&problems, kind, common.seed);
        ferrotune_data::write_preference_jsonl(&pairs, &common.out, &format)?;
        println!(
            "wrote {} preference pairs to {}",
            pairs.len(),
            common.out.display()
        );
        return Ok(());
    }
    write_jsonl(&problems, &common.out, &format)?;
    println!(
        "wrote {} problems to {}",
        problems.len(),
        common.out.display()
    );
    Ok(())
}
