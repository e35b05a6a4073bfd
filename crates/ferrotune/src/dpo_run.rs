//! `ferrotune train` for a `[dpo]` config: preference rows (TRL's `prompt` + `chosen` +
//! `rejected`, plain text or conversational, or an implicit prompt) → tokenized pairs (chat rows
//! through the model's chat template) → the DPO loop of `ferrotune-train`, with metrics,
//! TensorBoard, progress and checkpoints wired as for SFT. The math lives in `ferrotune-train`;
//! this file only connects rooms.

use std::path::Path;

use anyhow::{bail, Result};
use ferrotune_data::{
    preference_examples, read_rows, tokenize_preferences_all, DataError, PrefPair,
};
use ferrotune_train::dpo::{train_dpo, DpoPlan, DpoSummary, Reference};
use ferrotune_train::pref_loss::DpoConfig;

use crate::config::{DpoSection, RunConfig};
use crate::lm::Lm;
use crate::session::{sizes, train_and_eval, Headline, Session};

/// Read and tokenize one preference file; errors name the file and the row.
fn load_pairs(lm: &Lm, path: &Path, d: &DpoSection) -> Result<Vec<PrefPair>> {
    let rows = read_rows(path)?;
    if rows.is_empty() {
        bail!("{}: no rows", path.display());
    }
    let examples = preference_examples(&rows, path)?;
    let line = |i: usize| rows.get(i).map_or(i + 1, |r| r.line);
    let set =
        tokenize_preferences_all(&lm.tokenizer, &examples, d.max_length).map_err(|e| match e {
            DataError::Example { index, reason } => {
                anyhow::anyhow!("{}:{}: {reason}", path.display(), line(index))
            }
            DataError::Tokenize { index, source } => {
                anyhow::anyhow!(
                    "{}:{}: tokenizing failed: {source}",
                    path.display(),
                    line(index)
                )
            }
            other => other.into(),
        })?;
    eprintln!(
        "{}: {} pairs, {} with a side cut to dpo.max_length = {}, {} dropped with no completion token left",
        path.display(),
        examples.len(),
        set.truncated,
        d.max_length,
        set.dropped
    );
    if set.items.is_empty() {
        bail!(
            "{}: no pair has a completion token left (check dpo.max_length and the columns)",
            path.display()
        );
    }
    if !set.identical.is_empty() {
        let shown: Vec<String> = set
            .identical
            .iter()
            .take(5)
            .map(|&i| line(i).to_string())
            .collect();
        eprintln!(
            "warning: {}: {} pairs have the same tokens chosen and rejected (line {}{}): they carry no preference signal",
            path.display(),
            set.identical.len(),
            shown.join(", "),
            if set.identical.len() > 5 { ", ..." } else { "" }
        );
    }
    Ok(set.items)
}

/// The metrics a DPO run plots at the end.
const PLOTS: &[&str] = &[
    "loss",
    "rewards/margins",
    "rewards/accuracies",
    "eval/rewards/accuracies",
    "grad_norm",
];

/// Run (or resume) a DPO config. `resume` = continue the run folder's newest checkpoint.
pub fn run_dpo(cfg: &RunConfig, resume: bool, overwrite: bool) -> Result<DpoSummary> {
    let Some(d) = &cfg.dpo else {
        bail!("not a DPO config (no [dpo] section)");
    };
    let loss = DpoConfig {
        beta: d.beta,
        loss_type: d.loss_type,
        label_smoothing: d.label_smoothing,
    };
    let session = Session::open(cfg, resume, overwrite)?;
    let trainable = session.trainable()?;
    let lm = &session.lm;
    // The reference next: a tokenizer mismatch fails before any data is read.
    let ref_lm = match &d.ref_model {
        Some(p) => Some(session.load_frozen("dpo.ref_model", p)?),
        None => None,
    };
    let (reference, reference_name) = match (&ref_lm, &d.ref_model) {
        (Some(r), Some(p)) => (Reference::Model(r.model.as_ref()), p.display().to_string()),
        // The base itself is the reference: name it, so precomputed log-probs of another
        // base (same tokenizer, same pairs) are never taken for this one's.
        _ => (
            Reference::AdaptersOff,
            format!(
                "adapters-off of {} ({})",
                cfg.model.path.display(),
                cfg.model.dtype
            ),
        ),
    };
    let (train, eval) = train_and_eval(cfg, |path| load_pairs(lm, path, d))?;
    let plan = DpoPlan {
        run: session.loop_plan(train.len())?,
        loss,
        precompute_ref_log_probs: d.precompute_ref_log_probs,
    };
    let mut obs = session.observer(&plan.run, Headline::All)?;
    let n = (train.len(), eval.len());
    let sizes = sizes("pairs", n, &plan.run, &trainable);
    eprintln!("dpo ({}, beta {}): {sizes}", d.loss_type, d.beta);
    let summary = train_dpo(
        lm.model.as_ref(),
        reference,
        &reference_name,
        &trainable,
        &train,
        &eval,
        &plan,
        session.ctx(&mut obs),
    )?;
    obs.finish(&session.run, PLOTS);
    Ok(summary)
}
