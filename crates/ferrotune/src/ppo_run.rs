//! `ferrotune train` for a `[ppo]` config: prompts (TRL's `prompt` column, plain or
//! conversational) → token ids → the PPO loop of `ferrotune-train`, with the text side shared
//! with GRPO (`grpo_run::TextEnv`: decoding, stop strings, `completions.jsonl`). The reward is
//! one reward set: `ppo.reward_model_path` becomes a `model` reward entry (the reward model
//! scores prompt + completion at its last token, as `model_reward` frames it), summed with the
//! `ppo.rewards` functions. The value head is made here (zero, on the model's device) and lives
//! in `ferrotune_train::ppo`; plots are drawn at the end. This file only connects rooms.

use anyhow::{bail, Context, Result};
use ferrotune_data::{split, EvalSize};
use ferrotune_generate::SamplingParams;
use ferrotune_report::{open_step_log, plot_metrics, Progress};
use ferrotune_rewards::RewardSpec;
use ferrotune_train::grpo::RewardRole;
use ferrotune_train::ppo::{train_ppo, PpoPlan, PpoSummary, ValueHead};
use ferrotune_train::sft::Observer;
use serde::Deserialize;

use crate::config::{PpoSection, RunConfig};
use crate::grpo_run::{load_prompts, role_of, TextEnv};
use crate::lm::Lm;
use crate::sft_run::{load_model, loop_plan, open_run, start_log, trainable, CliObserver};

/// The label of the `ppo.reward_model_path` entry in logs (`rewards/reward_model/mean`).
pub const REWARD_MODEL_LABEL: &str = "reward_model";

/// The reward specs of a `[ppo]` section: the reward model first (when given), then the
/// reward functions; errors name the entry.
pub fn ppo_reward_specs(p: &PpoSection) -> Result<Vec<RewardSpec>> {
    let mut specs = Vec::with_capacity(p.rewards.len() + 1);
    if let Some(path) = &p.reward_model_path {
        let mut s = RewardSpec::new("model");
        s.label = Some(REWARD_MODEL_LABEL.into());
        s.params.insert(
            "path".into(),
            toml::Value::String(path.display().to_string()),
        );
        specs.push(s);
    }
    for (i, t) in p.rewards.iter().enumerate() {
        specs.push(
            RewardSpec::deserialize(toml::Value::Table(t.clone()))
                .map_err(|e| anyhow::anyhow!("ppo.rewards[{i}]: {e}"))?,
        );
    }
    Ok(specs)
}

/// The progress line shows a few headline numbers under short names; metrics.jsonl and
/// TensorBoard get all of them.
struct PpoObserver {
    inner: CliObserver,
}

const HEADLINE: &[(&str, &str)] = &[
    ("objective/scores", "score"),
    ("objective/kl", "kl"),
    ("loss/policy_avg", "pg_loss"),
    ("loss/value_avg", "vf_loss"),
    ("val/explained_variance", "expl_var"),
    ("completions/mean_length", "len"),
];

impl Observer for PpoObserver {
    fn metrics(&mut self, step: usize, values: &[(&str, f64)]) {
        if let Err(e) = self.inner.log.log(step as u64, values) {
            self.inner
                .progress
                .println(&format!("warning: cannot write metrics: {e}"));
        }
        let head: Vec<(&str, f64)> = HEADLINE
            .iter()
            .filter_map(|(k, short)| {
                values
                    .iter()
                    .find(|(name, _)| name == k)
                    .map(|(_, v)| (*short, *v))
            })
            .collect();
        // Eval-hook metrics (the regression gate) have no headline: show them as they are.
        let head = if head.is_empty() {
            values.to_vec()
        } else {
            head
        };
        self.inner.progress.update(step as u64, &head);
    }
    fn message(&mut self, msg: &str) {
        self.inner.progress.println(msg);
    }
    fn on_eval(
        &mut self,
        step: usize,
        model: &dyn ferrotune_models::CausalLm,
    ) -> std::result::Result<ferrotune_train::sft::EvalVerdict, String> {
        self.inner.gate_check(step, model)
    }
}

/// Plan of a PPO run from the config.
pub fn ppo_plan(cfg: &RunConfig, p: &PpoSection, lm: &Lm, n_prompts: usize) -> Result<PpoPlan> {
    let per_step = cfg.run.batch_size * cfg.run.gradient_accumulation_steps * p.num_mini_batches;
    let total_steps = if cfg.run.max_steps > 0 {
        cfg.run.max_steps
    } else {
        (cfg.run.num_train_epochs * n_prompts as f64 / per_step as f64)
            .ceil()
            .max(1.0) as usize
    };
    let loss = p.loss_config().map_err(|e| anyhow::anyhow!("ppo: {e}"))?;
    Ok(PpoPlan {
        run: loop_plan(cfg, total_steps, lm.pad_id())?,
        num_mini_batches: p.num_mini_batches,
        num_ppo_epochs: p.num_ppo_epochs,
        max_completion_len: p.max_completion_len,
        sampling: SamplingParams {
            temperature: p.temperature,
            top_k: None,
            top_p: None,
            seed: cfg.run.seed,
        },
        loss,
        missing_eos_penalty: p.missing_eos_penalty,
        log_completions: p.log_completions,
        eos_ids: lm.eos_ids(),
    })
}

/// Run (or resume) a PPO config.
pub fn run_ppo(cfg: &RunConfig, resume: bool, overwrite: bool) -> Result<PpoSummary> {
    let p = cfg
        .ppo
        .as_ref()
        .context("the config has no [ppo] section")?;
    let specs = ppo_reward_specs(p)?;
    let device = crate::lm::parse_device(&cfg.model.device)?;
    let rewards = crate::model_reward::reward_set(&specs, &device, "ppo.rewards")?;
    let roles: Vec<RewardRole> = specs.iter().map(|s| role_of(&s.name)).collect();
    let (run, checkpoint) = open_run(cfg, resume, overwrite)?;
    let (lm, lora) = load_model(cfg)?;
    let trainable = trainable(cfg, &lm, &lora)?;
    let mut train = load_prompts(&lm.tokenizer, &cfg.data.train, p.max_prompt_len)?;
    let mut eval = Vec::new();
    if let Some(e) = &cfg.data.eval {
        eval = load_prompts(&lm.tokenizer, e, p.max_prompt_len)?;
    } else if cfg.data.eval_fraction > 0.0 {
        let s = split(
            train.len(),
            EvalSize::Fraction(cfg.data.eval_fraction),
            cfg.run.seed,
        )?;
        let all = std::mem::take(&mut train);
        train = s.train.iter().map(|&i| all[i].clone()).collect();
        eval = s.eval.iter().map(|&i| all[i].clone()).collect();
    }
    if train.is_empty() {
        bail!("{}: no training prompts", cfg.data.train.display());
    }
    let plan = ppo_plan(cfg, p, &lm, train.len())?;
    plan.validate().map_err(|e| anyhow::anyhow!(e))?;
    let head = ValueHead::zeros(lm.model.config().hidden_size, &lm.device)?;
    let (log, resumed_step) = start_log(cfg, &run, checkpoint.as_ref())?;
    let resumed = checkpoint.as_ref().map(|_| resumed_step);
    let completions = if p.log_completions {
        Some(open_step_log(run.root(), "completions.jsonl", resumed)?)
    } else {
        None
    };
    let mut env = TextEnv {
        tokenizer: &lm.tokenizer,
        train,
        eval,
        rewards,
        roles,
        stop: p.stop.clone(),
        completions,
        failures: Vec::new(),
        failed: 0,
    };
    let mut obs = PpoObserver {
        inner: CliObserver {
            log,
            gate: crate::sft_run::regression_gate(cfg, &lm)?,
            progress: Progress::auto(plan.run.total_steps as u64)
                .with_log_every(cfg.run.log_every as u64)
                .resumed_from(resumed_step),
        },
    };
    eprintln!(
        "ppo: {} train prompts, {} steps of {} rollouts ({} epochs x {} mini-batches), rewards [{}], kl_coef {}, {} trainable parameters + value head",
        env.train.len(),
        plan.run.total_steps,
        plan.rollouts_per_step(),
        plan.num_ppo_epochs,
        plan.num_mini_batches,
        env.rewards.labels().join(", "),
        p.kl_coef,
        trainable
            .params()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum::<usize>()
    );
    let summary = train_ppo(
        lm.model.as_ref(),
        &trainable,
        &head,
        &mut env,
        &plan,
        &run,
        checkpoint.as_ref(),
        &mut obs,
        &lm.device,
    )?;
    obs.inner.progress.finish();
    if let Err(e) = plot_metrics(
        run.root(),
        &[
            "objective/scores",
            "objective/kl",
            "objective/rlhf_reward",
            "loss/policy_avg",
            "loss/value_avg",
            "val/explained_variance",
            "completions/mean_length",
        ],
    ) {
        eprintln!("warning: plots not written: {e}");
    }
    Ok(summary)
}
