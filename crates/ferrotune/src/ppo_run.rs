//! `ferrotune train` for a `[ppo]` config: prompts (TRL's `prompt` column, plain or
//! conversational) → token ids → the PPO loop of `ferrotune-train`, with the text side shared
//! with GRPO (`grpo_run::TextEnv`: decoding, stop strings, `completions.jsonl`). The reward is
//! one reward set: `ppo.reward_model_path` becomes a `model` reward entry (the reward model
//! scores prompt + completion at its last token, as `model_reward` frames it), summed with the
//! `ppo.rewards` functions. The value head is made here (zero, on the model's device) and lives
//! in `ferrotune_train::ppo`; plots are drawn at the end. This file only connects rooms.

use anyhow::{Context, Result};
use ferrotune_generate::SamplingParams;
use ferrotune_rewards::RewardSpec;
use ferrotune_train::ppo::{train_ppo, PpoPlan, PpoSummary, ValueHead};
use serde::Deserialize;

use crate::config::{PpoSection, RunConfig};
use crate::grpo_run::{RlRun, TextEnv};
use crate::lm::Lm;
use crate::session::{epoch_steps, loop_plan, Headline};

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
const HEADLINE: &[(&str, &str)] = &[
    ("objective/scores", "score"),
    ("objective/kl", "kl"),
    ("loss/policy_avg", "pg_loss"),
    ("loss/value_avg", "vf_loss"),
    ("val/explained_variance", "expl_var"),
    ("completions/mean_length", "len"),
];

/// Plan of a PPO run from the config.
pub fn ppo_plan(cfg: &RunConfig, p: &PpoSection, lm: &Lm, n_prompts: usize) -> Result<PpoPlan> {
    let per_step = cfg.run.batch_size * cfg.run.gradient_accumulation_steps * p.num_mini_batches;
    let total_steps = if cfg.run.max_steps > 0 {
        cfg.run.max_steps
    } else {
        epoch_steps(cfg, n_prompts, per_step)
    };
    let loss = p.loss_config();
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

/// The metrics a PPO run plots at the end.
const PLOTS: &[&str] = &[
    "objective/scores",
    "objective/kl",
    "objective/rlhf_reward",
    "loss/policy_avg",
    "loss/value_avg",
    "val/explained_variance",
    "completions/mean_length",
];

/// Run (or resume) a PPO config.
pub fn run_ppo(cfg: &RunConfig, resume: bool, overwrite: bool) -> Result<PpoSummary> {
    let p = cfg
        .ppo
        .as_ref()
        .context("the config has no [ppo] section")?;
    let specs = ppo_reward_specs(p)?;
    let rl = RlRun::open(
        cfg,
        &specs,
        "ppo.rewards",
        p.max_prompt_len,
        None,
        (resume, overwrite),
    )?;
    let session = &rl.session;
    let trainable = session.trainable()?;
    let lm = &session.lm;
    let plan = ppo_plan(cfg, p, lm, rl.train.len())?;
    let head = ValueHead::zeros(lm.model.config().hidden_size, &session.device)?;
    let mut obs = session.observer(&plan.run, Headline::Only(HEADLINE))?;
    let mut env = TextEnv::new(
        &lm.tokenizer,
        (rl.train, rl.eval),
        &rl.rewards,
        rl.roles,
        p.stop.clone(),
    );
    if p.log_completions {
        env.completions = Some(session.side_log("completions.jsonl")?);
    }
    eprintln!(
        "ppo: {} train prompts, {} steps of {} rollouts ({} epochs x {} mini-batches), rewards [{}], kl_coef {}, {} trainable parameters + value head",
        env.train.len(),
        plan.run.total_steps,
        plan.rollouts_per_step(),
        plan.num_ppo_epochs,
        plan.num_mini_batches,
        env.rewards.labels().join(", "),
        p.kl_coef,
        trainable.num_params()
    );
    let summary = train_ppo(
        lm.model.as_ref(),
        &trainable,
        &head,
        &mut env,
        &plan,
        session.ctx(&mut obs),
    )?;
    obs.finish(&session.run, PLOTS);
    Ok(summary)
}
