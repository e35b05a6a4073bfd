//! `ferrotune train` for a `[reward_model]` config: preference rows (TRL's `prompt` + `chosen` +
//! `rejected`, plain text or conversational, or an implicit prompt; an optional `margin` column)
//! → whole tokenized sequences as TRL 1.16's `RewardTrainer` builds them (chat rows through the
//! chat template, EOS appended to plain-text completions, pairs longer than `max_length`
//! dropped) → the reward-model loop of `ferrotune-train`, with metrics, TensorBoard, progress and
//! checkpoints wired as for DPO. The math lives in `ferrotune-train`; this file only connects
//! rooms.

use std::path::Path;

use anyhow::{bail, Result};
use ferrotune_data::{preference_examples, read_rows, tokenize_preferences_all, DataError};
use ferrotune_models::{LoadOptions, RewardModel};
use ferrotune_tokenize::Tokenizer;
use ferrotune_train::reward_train::{train_reward_model, RmPair, RmPlan, RmSummary};
use ferrotune_train::trainer::{RunCtx, Trainable};

use crate::config::{RewardModelSection, RunConfig};
use crate::lm::{load_tokenizer_with, parse_device, parse_dtype};
use crate::session::{
    loop_plan, lora_config, open_run, sizes, total_steps, train_and_eval, CliObserver, Headline,
};

/// The pad id TRL gives a reward model: the tokenizer's pad token, else its EOS.
pub fn reward_pad_id(tok: &Tokenizer, rm: &RewardModel) -> Option<u32> {
    tok.pad_id()
        .or_else(|| tok.eos_ids().first().copied())
        .or(rm.pad_token_id)
}

/// Read and tokenize one preference file; errors name the file and the line.
fn load_pairs(tok: &Tokenizer, path: &Path, r: &RewardModelSection) -> Result<Vec<RmPair>> {
    let rows = read_rows(path)?;
    if rows.is_empty() {
        bail!("{}: no rows", path.display());
    }
    let examples = preference_examples(&rows, path)?;
    let line = |i: usize| rows.get(i).map_or(i + 1, |r| r.line);
    // Tokenized whole (no truncation): TRL's reward trainer drops long pairs instead of cutting
    // them, since a cut sequence would be scored at a token that is not its end.
    let set = tokenize_preferences_all(tok, &examples, usize::MAX).map_err(|e| match e {
        DataError::Example { index, reason } => {
            anyhow::anyhow!("{}:{}: {reason}", path.display(), line(index))
        }
        DataError::Tokenize { index, source } => anyhow::anyhow!(
            "{}:{}: tokenizing failed: {source}",
            path.display(),
            line(index)
        ),
        other => other.into(),
    })?;
    let has_margin = |i: usize| rows[i].fields.contains_key("margin");
    let with_margin = (0..rows.len()).filter(|&i| has_margin(i)).count();
    if with_margin != 0 && with_margin != rows.len() {
        let i = (0..rows.len())
            .find(|&i| !has_margin(i))
            .unwrap_or_default();
        bail!(
            "{}:{}: no `margin`, but {with_margin} other rows have one; give every row a margin or none",
            path.display(),
            line(i)
        );
    }
    let mut pairs = Vec::with_capacity(set.items.len());
    let mut dropped = 0;
    for (p, &src) in set.items.iter().zip(&set.source) {
        if p.chosen.ids.len() > r.max_length || p.rejected.ids.len() > r.max_length {
            dropped += 1;
            continue;
        }
        let margin = match rows[src].fields.get("margin") {
            None => None,
            Some(v) => Some(v.as_f64().filter(|m| m.is_finite()).ok_or_else(|| {
                anyhow::anyhow!(
                    "{}:{}: `margin` must be a finite number, got {v}",
                    path.display(),
                    line(src)
                )
            })?),
        };
        pairs.push(RmPair {
            chosen: p.chosen.ids.clone(),
            rejected: p.rejected.ids.clone(),
            margin,
        });
    }
    eprintln!(
        "{}: {} pairs{}, {} dropped with a side longer than reward_model.max_length = {}",
        path.display(),
        examples.len(),
        if with_margin > 0 { " with margins" } else { "" },
        dropped,
        r.max_length
    );
    if pairs.is_empty() {
        bail!(
            "{}: every pair is longer than reward_model.max_length = {}",
            path.display(),
            r.max_length
        );
    }
    Ok(pairs)
}

/// Run (or resume) a reward-model config. `resume` = continue the run folder's newest
/// checkpoint.
pub fn run_reward_model(cfg: &RunConfig, resume: bool, overwrite: bool) -> Result<RmSummary> {
    let Some(r) = &cfg.reward_model else {
        bail!("not a reward-model config (no [reward_model] section)");
    };
    let Some(l) = &cfg.lora else {
        bail!("reward_model: needs a [lora] section (LoRA on the body, the head trainable)");
    };
    let lora = lora_config(l);
    // Data first: a bad row fails before the run folder is created.
    let tok = load_tokenizer_with(&cfg.model.path, cfg.model.chat_template.as_deref())?;
    let (train, eval) = train_and_eval(cfg, |path| load_pairs(&tok, path, r))?;
    // Within a file margins are all or none (load_pairs); across the two files too.
    let has_margin = |v: &[RmPair]| v.first().map(|p| p.margin.is_some());
    if let (Some(a), Some(b)) = (has_margin(&train), has_margin(&eval)) {
        if a != b {
            bail!("data.train and data.eval must both have a `margin` column or both lack one");
        }
    }
    let (run, checkpoint) = open_run(cfg, resume, overwrite)?;
    let dtype = parse_dtype(&cfg.model.dtype)?;
    let device = parse_device(&cfg.model.device)?;
    let opts = LoadOptions {
        dtype,
        device: device.clone(),
        lora: Some((lora.clone(), cfg.run.seed)),
        trainable_base: false,
    };
    let mut rm = RewardModel::load_or_init(&cfg.model.path, &opts, cfg.run.seed)?;
    rm.pad_token_id = reward_pad_id(&tok, &rm);
    let Some(pad_id) = rm.pad_token_id else {
        bail!(
            "{}: the tokenizer has no pad or EOS token and config.json no pad_token_id; a reward \
             model needs one to find each row's last token",
            cfg.model.path.display()
        );
    };
    let total_steps = total_steps(cfg, train.len());
    let plan = RmPlan {
        run: loop_plan(cfg, total_steps, pad_id)?,
        center_rewards_coefficient: r.center_rewards_coefficient,
        export_dtype: Some(dtype),
    };
    let trainable = Trainable::reward_model(&rm, &lora, cfg.model.path.display().to_string());
    let mut obs = CliObserver::start(
        cfg,
        &run,
        checkpoint.as_ref(),
        &plan.run,
        None,
        Headline::All,
    )?;
    let sizes = sizes("pairs", (train.len(), eval.len()), &plan.run, &trainable);
    eprintln!(
        "reward model ({}): {sizes} (head included)",
        rm.architecture()
    );
    let summary = train_reward_model(
        &trainable,
        &train,
        &eval,
        &plan,
        RunCtx::new(&run, checkpoint.as_ref(), &mut obs, &device),
    )?;
    let keys = ["loss", "accuracy", "margin", "eval/accuracy", "grad_norm"];
    obs.finish(&run, &keys);
    Ok(summary)
}
