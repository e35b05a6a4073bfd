//! `ferrotune train` for an `[sft]` config: resolve the config into a plan (model + adapters,
//! tokenized data, step totals, schedule), set up the run folder, wire metrics/TensorBoard and
//! the progress display to the trainer, run it, then draw the plots. The math lives in
//! `ferrotune-train`; this file only connects rooms.

use std::path::Path;

use anyhow::{bail, Context, Result};
use ferrotune_ckpt::{latest_complete, load_checkpoint, OnExisting, RunDir};
use ferrotune_data::{
    pack, read_rows, sft_examples, split_items, tokenize_sft_all, EvalSize, Example, Segment,
    Sequence, SftOptions, Tokenized,
};
use ferrotune_models::LoadOptions;
use ferrotune_nn::{LoraConfig, TargetModules};
use ferrotune_report::{plot_metrics, Progress, RunLog};
use ferrotune_train::optim::AdamWConfig;
use ferrotune_train::plan::LoopPlan;
use ferrotune_train::schedule::{Schedule, ScheduleKind, Warmup};
use ferrotune_train::sft::{train_sft, Observer, SftPlan, SftSummary, Trainable};

use crate::config::{LoraSection, RunConfig};
use crate::lm::{parse_device, parse_dtype, Lm};
use ferrotune_tokenize::Tokenizer;

/// LoRA config from the `[lora]` section.
pub fn lora_config(l: &LoraSection) -> LoraConfig {
    let target_modules = match &l.target_modules {
        toml::Value::Array(a) => TargetModules::Names(
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect(),
        ),
        _ => TargetModules::AllLinear,
    };
    LoraConfig {
        r: l.r,
        lora_alpha: l.lora_alpha,
        lora_dropout: l.lora_dropout,
        use_rslora: l.use_rslora,
        target_modules,
    }
}

/// Read and tokenize one data file for SFT.
fn load_sft_data(lm: &Lm, path: &Path, cfg: &RunConfig) -> Result<(Vec<Tokenized>, String)> {
    let rows = read_rows(path)?;
    if rows.is_empty() {
        bail!("{}: no rows", path.display());
    }
    let examples = sft_examples(&rows, path)?;
    let opts = SftOptions {
        completion_only_loss: cfg.data.completion_only_loss,
        assistant_only_loss: cfg.data.completion_only_loss,
    };
    let set = tokenize_sft_all(&lm.tokenizer, &examples, cfg.data.max_seq_len, &opts, true)?;
    let s = set.stats;
    let note = format!(
        "{}: {} examples, {} truncated to {} tokens ({} tokens dropped), {} skipped with no trained token",
        path.display(),
        s.examples,
        s.truncated,
        cfg.data.max_seq_len,
        s.tokens_dropped,
        s.no_loss
    );
    if set.items.is_empty() {
        return Err(no_trained_token(path, &examples, &s, cfg.data.max_seq_len));
    }
    Ok((set.items, note))
}

/// The error for a data file none of whose examples has a token to train on, with the cause:
/// the rows themselves when none has anything to train on (no assistant message, empty
/// completions), else truncation.
pub(crate) fn no_trained_token(
    path: &Path,
    examples: &[Example],
    s: &ferrotune_data::TruncationStats,
    max_seq_len: usize,
) -> anyhow::Error {
    let seg_empty = |seg: &Segment| match seg {
        Segment::Text(t) => t.is_empty(),
        Segment::Chat(m) => m.iter().all(|m| m.content.is_empty()),
    };
    let has_target = |e: &Example| match e {
        Example::Text { text } => !text.is_empty(),
        Example::PromptCompletion { completion, .. } => !seg_empty(completion),
        Example::Messages { messages } => messages
            .iter()
            .any(|m| m.role == "assistant" && !m.content.is_empty()),
        _ => true,
    };
    if s.truncated > 0 && examples.iter().any(has_target) {
        anyhow::anyhow!(
            "{}: no example has a trained token left: {} of {} were cut to data.max_seq_len = {max_seq_len} before their completion; raise it",
            path.display(),
            s.truncated,
            s.examples
        )
    } else {
        anyhow::anyhow!(
            "{}: no example has a token to train on: a conversation needs a message with role \"assistant\", a prompt/completion row a non-empty completion",
            path.display()
        )
    }
}

pub(crate) struct CliObserver {
    pub(crate) log: RunLog,
    pub(crate) progress: Progress,
    pub(crate) gate: Option<crate::eval::RegressionGate>,
}

/// The regression gate of `cfg` (`[eval] forget_set`), measured on the model as loaded (fresh
/// adapters = the base).
pub(crate) fn regression_gate(
    cfg: &RunConfig,
    lm: &Lm,
) -> Result<Option<crate::eval::RegressionGate>> {
    let Some(e) = &cfg.eval else { return Ok(None) };
    let Some(path) = &e.forget_set else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("eval.forget_set: {}: cannot read", path.display()))?;
    let ids = lm.tokenizer.encode(&text, true)?;
    if ids.len() < 2 {
        bail!(
            "eval.forget_set: {}: needs at least 2 tokens",
            path.display()
        );
    }
    let gate = crate::eval::RegressionGate::new(
        lm.model.as_ref(),
        path.clone(),
        ids,
        e.max_ppl_ratio,
        e.stop_on_regression,
        &lm.device,
    )?;
    eprintln!(
        "regression gate: base perplexity {:.4} on {} (max ratio {})",
        gate.base_ppl,
        path.display(),
        e.max_ppl_ratio
    );
    Ok(Some(gate))
}

impl CliObserver {
    /// The gate's check, as the trainers' eval hook.
    pub(crate) fn gate_check(
        &mut self,
        step: usize,
        model: &dyn ferrotune_models::CausalLm,
    ) -> std::result::Result<ferrotune_train::sft::EvalVerdict, String> {
        let Some(g) = self.gate.as_mut() else {
            return Ok(Default::default());
        };
        let (ppl, ratio, bad) = g.check(step, model).map_err(|e| e.to_string())?;
        if bad {
            self.progress.println(&format!(
                "REGRESSION at step {step}: perplexity on {} is {ppl:.4}, {ratio:.3}x the base ({:.4}); max_ppl_ratio = {}{}",
                g.path.display(),
                g.base_ppl,
                g.max_ratio,
                if g.stop {
                    format!(
                        "; stopping (last good eval: {})",
                        g.last_good_step.map_or("none".into(), |s| format!("step {s}"))
                    )
                } else {
                    String::new()
                }
            ));
        }
        Ok(ferrotune_train::sft::EvalVerdict {
            metrics: vec![
                ("eval/forget_ppl".into(), ppl),
                ("eval/forget_ppl_ratio".into(), ratio),
            ],
            stop: bad && g.stop,
        })
    }
}

impl Observer for CliObserver {
    fn metrics(&mut self, step: usize, values: &[(&str, f64)]) {
        if let Err(e) = self.log.log(step as u64, values) {
            self.progress
                .println(&format!("warning: cannot write metrics: {e}"));
        }
        self.progress.update(step as u64, values);
    }
    fn message(&mut self, msg: &str) {
        self.progress.println(msg);
    }
    fn on_eval(
        &mut self,
        step: usize,
        model: &dyn ferrotune_models::CausalLm,
    ) -> std::result::Result<ferrotune_train::sft::EvalVerdict, String> {
        self.gate_check(step, model)
    }
}

/// Open (resume) or create the run folder of `cfg`; with `resume`, the newest complete
/// checkpoint too.
pub(crate) fn open_run(
    cfg: &RunConfig,
    resume: bool,
    overwrite: bool,
) -> Result<(RunDir, Option<ferrotune_ckpt::Checkpoint>)> {
    let out = &cfg.run.output_dir;
    Ok(if resume {
        let run = RunDir::open(out)?;
        let latest = latest_complete(&run)?
            .with_context(|| format!("{}: no complete checkpoint to resume from", out.display()))?;
        if let Some(w) = latest.warning() {
            eprintln!("warning: {w}");
        }
        let ck = load_checkpoint(&latest.path)?;
        (run, Some(ck))
    } else {
        let on = if overwrite {
            OnExisting::Overwrite
        } else {
            OnExisting::Refuse
        };
        (RunDir::create(out, on)?, None)
    })
}

/// Load the model of `cfg` with adapters attached (or every weight trainable without `[lora]`).
pub(crate) fn load_model(cfg: &RunConfig) -> Result<(Lm, Option<LoraConfig>)> {
    let lora = cfg.lora.as_ref().map(lora_config);
    let opts = LoadOptions {
        dtype: parse_dtype(&cfg.model.dtype)?,
        device: parse_device(&cfg.model.device)?,
        lora: lora.clone().map(|l| (l, cfg.run.seed)),
        trainable_base: lora.is_none(),
    };
    if lora.is_none() && opts.dtype != candle_core::DType::F32 {
        bail!(
            "{}: full fine-tuning needs model.dtype = \"f32\" (f32 master weights)",
            cfg.model.path.display()
        );
    }
    let lm = Lm::load(&cfg.model.path, &opts)?;
    Ok((lm, lora))
}

/// Load a second, frozen model beside the trained one (a DPO reference, a distillation
/// teacher) with the run's device and dtype. `key` is the config key that named it (errors
/// start with it); its tokenizer must give the same ids as `tok`'s, checked before any weight is
/// read.
pub(crate) fn load_frozen(cfg: &RunConfig, key: &str, path: &Path, tok: &Tokenizer) -> Result<Lm> {
    let other =
        crate::lm::load_tokenizer(path).with_context(|| format!("{key} {}", path.display()))?;
    if let Some(why) = tok.vocab_mismatch(&other) {
        bail!(
            "{key} {} and model.path {} do not share a tokenizer ({why}): the two models must score the same token ids",
            path.display(),
            cfg.model.path.display()
        );
    }
    let opts = LoadOptions {
        dtype: parse_dtype(&cfg.model.dtype)?,
        device: parse_device(&cfg.model.device)?,
        lora: None,
        trainable_base: false,
    };
    Lm::load(path, &opts).with_context(|| format!("{key} {}", path.display()))
}

/// The loop settings every trainer shares, from `[run]`, `[optim]` and `[data]`.
pub(crate) fn loop_plan(cfg: &RunConfig, total_steps: usize, pad_id: u32) -> Result<LoopPlan> {
    Ok(LoopPlan {
        seed: cfg.run.seed,
        total_steps,
        batch_size: cfg.run.batch_size,
        grad_accum: cfg.run.gradient_accumulation_steps,
        learning_rate: cfg.optim.learning_rate,
        schedule: schedule(cfg, total_steps)?,
        adamw: adamw(cfg),
        max_grad_norm: cfg.optim.max_grad_norm,
        log_every: cfg.run.log_every,
        save_every: cfg.run.save_every,
        eval_every: cfg.run.eval_every,
        keep_last: cfg.run.keep_last,
        max_nonfinite_steps: cfg.run.max_nonfinite_steps,
        shuffle: cfg.data.shuffle,
        pad_id,
    })
}

/// The trainable parameters: the adapters, or every weight.
pub(crate) fn trainable<'a>(
    cfg: &RunConfig,
    lm: &Lm,
    lora: &'a Option<LoraConfig>,
) -> Result<Trainable<'a>> {
    Ok(match lora {
        Some(l) => {
            let params: Vec<_> = lm
                .model
                .linear_slots()
                .iter()
                .filter_map(|s| s.lora.as_ref().map(|a| (s.path.clone(), a)))
                .flat_map(|(p, a)| {
                    [
                        (
                            ferrotune_models::adapter::peft_key(&p, "lora_A"),
                            a.a.clone(),
                        ),
                        (
                            ferrotune_models::adapter::peft_key(&p, "lora_B"),
                            a.b.clone(),
                        ),
                    ]
                })
                .collect();
            if params.is_empty() {
                let wanted = match &l.target_modules {
                    TargetModules::Names(n) => format!("{n:?}"),
                    TargetModules::AllLinear => "\"all-linear\"".into(),
                };
                bail!(
                    "lora.target_modules {wanted} matches no linear layer of {} (its layers: {})",
                    cfg.model.path.display(),
                    lm.model
                        .linear_slots()
                        .iter()
                        .take(7)
                        .map(|s| s.path.rsplit('.').next().unwrap_or(""))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            Trainable::Lora {
                params,
                config: l,
                base_name: cfg.model.path.display().to_string(),
            }
        }
        None => Trainable::Full {
            params: lm_base_params(lm)?,
        },
    })
}

/// Run (or resume) an SFT config. `resume` = the run folder to continue.
pub fn run_sft(cfg: &RunConfig, resume: bool, overwrite: bool) -> Result<SftSummary> {
    let (run, checkpoint) = open_run(cfg, resume, overwrite)?;
    let (lm, lora) = load_model(cfg)?;
    let trainable = trainable(cfg, &lm, &lora)?;
    let (mut train, note) = load_sft_data(&lm, &cfg.data.train, cfg)?;
    eprintln!("{note}");
    let mut eval = Vec::new();
    if let Some(e) = &cfg.data.eval {
        let (items, note) = load_sft_data(&lm, e, cfg)?;
        eprintln!("{note}");
        eval = items;
    } else if cfg.data.eval_fraction > 0.0 {
        let (t, e) = split_items(
            train,
            EvalSize::Fraction(cfg.data.eval_fraction),
            cfg.run.seed,
        )?;
        train = t;
        eval = e;
    }
    if cfg.data.packing {
        let (t, e) = (
            pack(&train, cfg.data.max_seq_len)?,
            pack(&eval, cfg.data.max_seq_len)?,
        );
        eprintln!(
            "packing: {} examples into {} sequences of at most {} tokens (positions restart per example; attention is not isolated between packed examples)",
            train.len(),
            t.len(),
            cfg.data.max_seq_len
        );
        return train_with(cfg, &lm, &trainable, &t, &e, run, checkpoint);
    }
    train_with(cfg, &lm, &trainable, &train, &eval, run, checkpoint)
}

fn train_with<S: Sequence>(
    cfg: &RunConfig,
    lm: &Lm,
    trainable: &Trainable,
    train: &[S],
    eval: &[S],
    run: RunDir,
    checkpoint: Option<ferrotune_ckpt::Checkpoint>,
) -> Result<SftSummary> {
    let per_step = cfg.run.batch_size * cfg.run.gradient_accumulation_steps;
    let total_steps = if cfg.run.max_steps > 0 {
        cfg.run.max_steps
    } else {
        ((cfg.run.num_train_epochs * train.len() as f64) / per_step as f64)
            .ceil()
            .max(1.0) as usize
    };
    let plan = SftPlan {
        run: loop_plan(cfg, total_steps, lm.pad_id())?,
    };
    let (log, resumed_step) = start_log(cfg, &run, checkpoint.as_ref())?;
    let mut obs = CliObserver {
        log,
        gate: regression_gate(cfg, lm)?,
        progress: Progress::auto(total_steps as u64)
            .with_log_every(cfg.run.log_every as u64)
            .resumed_from(resumed_step),
    };
    eprintln!(
        "sft: {} train / {} eval examples, {} steps of {} examples, {} trainable parameters",
        train.len(),
        eval.len(),
        total_steps,
        per_step,
        trainable
            .params()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum::<usize>()
    );
    let summary = train_sft(
        lm.model.as_ref(),
        trainable,
        train,
        eval,
        &plan,
        &run,
        checkpoint.as_ref(),
        &mut obs,
        &lm.device,
    )?;
    obs.progress.finish();
    if let Err(e) = plot_metrics(run.root(), &["loss", "eval_loss", "lr", "grad_norm"]) {
        eprintln!("warning: plots not written: {e}");
    }
    Ok(summary)
}

/// A fresh run records its resolved config and starts `metrics.jsonl`; a resumed one keeps
/// the config and drops metrics logged after the checkpoint. Returns the log and the step
/// training starts from.
pub(crate) fn start_log(
    cfg: &RunConfig,
    run: &RunDir,
    checkpoint: Option<&ferrotune_ckpt::Checkpoint>,
) -> Result<(RunLog, u64)> {
    Ok(match checkpoint {
        Some(ck) => (RunLog::resume(run.root(), ck.step, true)?, ck.step),
        None => {
            std::fs::write(run.config_toml(), cfg.to_toml())
                .with_context(|| format!("{}: cannot write", run.config_toml().display()))?;
            (RunLog::new(run.root(), true)?, 0)
        }
    })
}

/// The learning-rate schedule of `cfg` over `total_steps`.
pub(crate) fn schedule(cfg: &RunConfig, total_steps: usize) -> Result<Schedule> {
    let kind: ScheduleKind = cfg
        .optim
        .lr_scheduler_type
        .parse()
        .map_err(|e| anyhow::anyhow!("optim.lr_scheduler_type: {e}"))?;
    let warmup = if cfg.optim.warmup_ratio > 0.0 {
        Warmup::Ratio(cfg.optim.warmup_ratio)
    } else {
        Warmup::Steps(cfg.optim.warmup_steps)
    };
    let schedule = Schedule::new(kind, warmup, total_steps)
        .map_err(|e| anyhow::anyhow!("optim.lr_scheduler_type: {e}"))?;
    Ok(schedule)
}

pub(crate) fn adamw(cfg: &RunConfig) -> AdamWConfig {
    AdamWConfig {
        betas: (cfg.optim.adam_beta1, cfg.optim.adam_beta2),
        eps: cfg.optim.adam_epsilon,
        weight_decay: cfg.optim.weight_decay,
    }
}

fn lm_base_params(lm: &Lm) -> Result<Vec<(String, candle_core::Var)>> {
    let p = lm.base_params.clone();
    if p.is_empty() {
        bail!("full fine-tuning: the model exposed no trainable weights");
    }
    Ok(p)
}
