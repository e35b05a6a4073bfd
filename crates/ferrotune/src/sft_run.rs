//! `ferrotune train` for an `[sft]` config: resolve the config into a plan (model + adapters,
//! tokenized data, step totals, schedule), set up the run folder, wire metrics/TensorBoard and
//! the progress display to the trainer, run it, then draw the plots. The math lives in
//! `ferrotune-train`; this file only connects rooms.

use std::path::Path;

use anyhow::{bail, Result};
use ferrotune_data::{
    pack, read_rows, sft_examples, tokenize_sft_all, Example, Segment, Sequence, SftOptions,
    Tokenized,
};
use ferrotune_train::sft::{train_sft, SftPlan, SftSummary};
use ferrotune_train::trainer::Trainable;

use crate::config::RunConfig;
use crate::lm::Lm;
use crate::session::{sizes, train_and_eval, Headline, Session};

/// Read and tokenize one SFT data file (errors name the file): the examples with a token to
/// train on, and the truncation counts (shared by SFT and distillation).
pub(crate) fn tokenize_sft_file(
    tok: &ferrotune_tokenize::Tokenizer,
    path: &Path,
    cfg: &RunConfig,
) -> Result<(Vec<Tokenized>, ferrotune_data::TruncationStats)> {
    let rows = read_rows(path)?;
    if rows.is_empty() {
        bail!("{}: no rows", path.display());
    }
    let examples = sft_examples(&rows, path)?;
    let opts = SftOptions {
        completion_only_loss: cfg.data.completion_only_loss,
        assistant_only_loss: cfg.data.completion_only_loss,
    };
    let set = tokenize_sft_all(tok, &examples, cfg.data.max_seq_len, &opts, true)?;
    if set.items.is_empty() {
        return Err(no_trained_token(
            path,
            &examples,
            &set.stats,
            cfg.data.max_seq_len,
        ));
    }
    Ok((set.items, set.stats))
}

/// Read and tokenize one data file for SFT, with the line that reports it.
fn load_sft_data(lm: &Lm, path: &Path, cfg: &RunConfig) -> Result<(Vec<Tokenized>, String)> {
    let (items, s) = tokenize_sft_file(&lm.tokenizer, path, cfg)?;
    let note = format!(
        "{}: {} examples, {} truncated to {} tokens ({} tokens dropped), {} skipped with no trained token",
        path.display(),
        s.examples,
        s.truncated,
        cfg.data.max_seq_len,
        s.tokens_dropped,
        s.no_loss
    );
    Ok((items, note))
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

/// Run (or resume) an SFT config. `resume` = the run folder to continue.
pub fn run_sft(cfg: &RunConfig, resume: bool, overwrite: bool) -> Result<SftSummary> {
    let session = Session::open(cfg, resume, overwrite)?;
    let trainable = session.trainable()?;
    let lm = &session.lm;
    let (train, eval) = train_and_eval(cfg, |path| {
        let (items, note) = load_sft_data(lm, path, cfg)?;
        eprintln!("{note}");
        Ok(items)
    })?;
    if cfg.data.packing {
        let (t, e) = (
            pack(&train, cfg.data.max_seq_len)?,
            pack(&eval, cfg.data.max_seq_len)?,
        );
        eprintln!(
            "packing: {} examples into {} sequences of at most {} tokens (positions restart and attention stays within each example)",
            train.len(),
            t.len(),
            cfg.data.max_seq_len
        );
        return train_with(&session, &trainable, &t, &e);
    }
    train_with(&session, &trainable, &train, &eval)
}

fn train_with<S: Sequence>(
    session: &Session,
    trainable: &Trainable,
    train: &[S],
    eval: &[S],
) -> Result<SftSummary> {
    let plan = SftPlan {
        run: session.loop_plan(train.len())?,
    };
    let mut obs = session.observer(&plan.run, Headline::All)?;
    let n = (train.len(), eval.len());
    eprintln!("sft: {}", sizes("examples", n, &plan.run, trainable));
    let summary = train_sft(
        session.lm.model.as_ref(),
        trainable,
        train,
        eval,
        &plan,
        session.ctx(&mut obs),
    )?;
    obs.finish(&session.run, &["loss", "eval_loss", "lr", "grad_norm"]);
    Ok(summary)
}
