//! `ferrotune compare RUN_DIR`: evaluate every complete checkpoint of a run with the run's
//! own rewards on its eval prompts (or a task given on the command line), rank them, and mark
//! the ones whose perplexity on a held-out "do not forget" text rose more than `max_ppl_ratio`
//! over the base model. With `first_round = N`, a cheap first round on N prompts keeps the
//! better half for the full round (elimination rounds), so long runs with many checkpoints
//! cost less to compare.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ferrotune_models::LoadOptions;
use ferrotune_rewards::{RewardSet, RewardSpec};
use ferrotune_train::rollout::RewardRole;
use serde::Serialize;

use crate::config::{GrpoSection, RunConfig};
use crate::grpo_run::{reward_specs, role_of, task_prompts};
use crate::lm::Lm;
use crate::task_eval::{eval_task, perplexity_of_file, TaskOptions};

/// What to compare with.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    pub run: PathBuf,
    /// Task file; default: the run's `data.eval`.
    pub task: Option<PathBuf>,
    /// Reward specs; default: the run's `grpo.rewards`.
    pub rewards: Option<Vec<RewardSpec>>,
    /// Held-out text for the perplexity check.
    pub forget_set: Option<PathBuf>,
    pub max_ppl_ratio: f64,
    /// Prompts in the cheap first round (0 = no first round).
    pub first_round: usize,
    pub max_new_tokens: Option<usize>,
}

/// One evaluated checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointScore {
    pub name: String,
    pub step: Option<u64>,
    pub mean_reward: f64,
    pub accuracy: Option<f64>,
    pub ppl: Option<f64>,
    pub ppl_ratio: Option<f64>,
    pub regression: bool,
    /// Dropped after the first round (scores are then the first round's).
    pub eliminated: bool,
}

struct Ctx {
    base: PathBuf,
    /// `model.chat_template`, applied to every load.
    chat_template: Option<PathBuf>,
    rewards: RewardSet,
    roles: Vec<RewardRole>,
    task: PathBuf,
    opts: TaskOptions,
    max_prompt_len: usize,
    /// The run's `[grpo]` section, for its tools.
    grpo: Option<GrpoSection>,
}

fn score(ctx: &Ctx, adapter: Option<&Path>, limit: Option<usize>) -> Result<(f64, Option<f64>)> {
    let mut lm = load(&ctx.base, adapter)?;
    lm.set_chat_template_file(ctx.chat_template.as_deref())?;
    let (mut items, tools) = task_prompts(ctx.grpo.as_ref(), &ctx.task, &lm, ctx.max_prompt_len)?;
    if let Some(n) = limit {
        items.truncate(n);
    }
    let r = eval_task(
        &lm,
        &items,
        &ctx.rewards,
        &ctx.roles,
        tools.as_ref(),
        &ctx.opts,
    )?;
    Ok((r.mean_reward, r.accuracy))
}

fn load(base: &Path, adapter: Option<&Path>) -> Result<Lm> {
    let opts = LoadOptions {
        dtype: candle_core::DType::F32,
        device: candle_core::Device::Cpu,
        lora: None,
        trainable_base: false,
    };
    Ok(Lm::load_with(base, adapter, &opts)?)
}

/// Rank the checkpoints of a run; the base model comes first (step None).
pub fn compare(o: &CompareOptions) -> Result<Vec<CheckpointScore>> {
    let cfg = RunConfig::load(&o.run.join("config.toml"), &[])
        .with_context(|| format!("{}: not a ferrotune run folder", o.run.display()))?;
    if cfg.lora.is_none() {
        bail!(
            "{}: compare needs a LoRA run (checkpoints are adapters on one base)",
            o.run.display()
        );
    }
    let specs = match (&o.rewards, &cfg.grpo) {
        (Some(s), _) => s.clone(),
        (None, Some(g)) => reward_specs(g)?,
        (None, None) => bail!("{}: not a GRPO run: give --rewards", o.run.display()),
    };
    let task = o
        .task
        .clone()
        .or_else(|| cfg.data.eval.clone())
        .with_context(|| format!("{}: the run has no data.eval: give --task", o.run.display()))?;
    let ctx = Ctx {
        base: cfg.model.path.clone(),
        chat_template: cfg.model.chat_template.clone(),
        rewards: RewardSet::from_specs(&specs)?,
        roles: specs.iter().map(|s| role_of(&s.name)).collect(),
        task,
        opts: TaskOptions {
            max_new_tokens: o
                .max_new_tokens
                .or(cfg.grpo.as_ref().map(|g| g.max_completion_len))
                .unwrap_or(256),
            stop: cfg
                .grpo
                .as_ref()
                .map(|g| g.stop.clone())
                .unwrap_or_default(),
            batch_size: 32,
            ..TaskOptions::default()
        },
        max_prompt_len: cfg.grpo.as_ref().map_or(512, |g| g.max_prompt_len),
        grpo: cfg.grpo.clone(),
    };
    let run = ferrotune_ckpt::RunDir::open(&o.run)?;
    let steps = ferrotune_ckpt::complete_steps(&run)?;
    if steps.is_empty() {
        bail!("{}: no complete checkpoint", o.run.display());
    }
    let mut cands: Vec<(String, Option<u64>, Option<PathBuf>)> = vec![("base".into(), None, None)];
    for s in steps {
        cands.push((
            format!("step-{s}"),
            Some(s),
            Some(run.checkpoints_dir().join(format!("step-{s}"))),
        ));
    }
    let base_ppl = match &o.forget_set {
        Some(f) => Some(perplexity_of_file(&load(&ctx.base, None)?, f, None, None)?.ppl()),
        None => None,
    };
    let mut out = Vec::new();
    // Round 1 (optional): a few prompts each; the better half of the checkpoints go on.
    let mut survivors: Vec<usize> = (0..cands.len()).collect();
    if o.first_round > 0 && cands.len() > 3 {
        let mut first: Vec<(usize, f64, Option<f64>)> = Vec::new();
        for (i, c) in cands.iter().enumerate().skip(1) {
            let (m, a) = score(&ctx, c.2.as_deref(), Some(o.first_round))?;
            first.push((i, m, a));
        }
        first.sort_by(|a, b| b.1.total_cmp(&a.1));
        let keep = first.len().div_ceil(2);
        survivors = std::iter::once(0)
            .chain(first[..keep].iter().map(|x| x.0))
            .collect();
        for &(i, m, a) in &first[keep..] {
            out.push(CheckpointScore {
                name: cands[i].0.clone(),
                step: cands[i].1,
                mean_reward: m,
                accuracy: a,
                ppl: None,
                ppl_ratio: None,
                regression: false,
                eliminated: true,
            });
        }
    }
    // Full round.
    for &i in &survivors {
        let c = &cands[i];
        let (m, a) = score(&ctx, c.2.as_deref(), None)?;
        let ppl = match (&o.forget_set, base_ppl) {
            (Some(f), Some(_)) => {
                Some(perplexity_of_file(&load(&ctx.base, c.2.as_deref())?, f, None, None)?.ppl())
            }
            _ => None,
        };
        let ratio = ppl.zip(base_ppl).map(|(p, b)| p / b);
        out.push(CheckpointScore {
            name: c.0.clone(),
            step: c.1,
            mean_reward: m,
            accuracy: a,
            ppl,
            ppl_ratio: ratio,
            regression: ratio.is_some_and(|r| r > o.max_ppl_ratio),
            eliminated: false,
        });
    }
    // Ranked: full-round entries by mean reward (best first), then the eliminated ones.
    out.sort_by(|a, b| {
        a.eliminated
            .cmp(&b.eliminated)
            .then(b.mean_reward.total_cmp(&a.mean_reward))
    });
    Ok(out)
}

/// The table `compare` prints.
pub fn table(rows: &[CheckpointScore], max_ppl_ratio: f64) -> String {
    let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.4}"));
    let mut s = format!(
        "{:<5} {:<12} {:>11} {:>9} {:>11} {:>9}\n",
        "rank", "checkpoint", "mean reward", "accuracy", "perplexity", "ppl/base"
    );
    for (i, r) in rows.iter().enumerate() {
        s.push_str(&format!(
            "{:<5} {:<12} {:>11.4} {:>9} {:>11} {:>9}{}{}\n",
            if r.eliminated {
                "-".to_string()
            } else {
                (i + 1).to_string()
            },
            r.name,
            r.mean_reward,
            f(r.accuracy),
            f(r.ppl),
            f(r.ppl_ratio),
            if r.regression {
                format!("  REGRESSION (> {max_ppl_ratio})")
            } else {
                String::new()
            },
            if r.eliminated {
                "  (eliminated in round 1)"
            } else {
                ""
            }
        ));
    }
    s
}
