//! Reward-model training (Bradley–Terry, as TRL 1.16's `RewardTrainer`), one loop you can read
//! top to bottom: batch of pairs → chosen and rejected right-padded into one forward of 2B rows
//! → scalar scores at each row's last real token → [`reward_model_loss`] (optional per-pair
//! margin, optional centering) → backward (accumulated) → the shared clip + AdamW step over the
//! body's LoRA adapters *and* the score head → log → eval (held-out pairwise accuracy) → save;
//! at the end the merged model is written as a `…ForSequenceClassification` folder.
//!
//! Logged with TRL's names: `loss`, `accuracy` (r_chosen > r_rejected), `margin` (mean
//! r_chosen − r_rejected), `min_reward`, `mean_reward`, `max_reward`, plus `rewards/chosen`,
//! `rewards/rejected` (the two sides' means), `grad_norm`, `learning_rate`, `num_tokens`; eval
//! the same under `eval/`. Unlike TRL, which averages per-batch accuracies, every number here is
//! a mean over pairs, so it does not depend on how the pairs were batched.
//!
//! Checkpoints are PEFT `SEQ_CLS` adapter folders (LoRA + the head) with the optimizer moments,
//! data cursor, non-finite guard and step, so 2N steps = N + resume + N; dropout masks are a pure
//! function of (seed, step, micro-batch).
//!
//! Owns: the order of a reward-model step. Does not own: the loss (`pref_loss`), the head and its
//! pooling (`ferrotune_models::reward`), tokenizing pairs (`ferrotune-data`), the files
//! (`ferrotune-ckpt`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ferrotune_ckpt::export_reward_model;
use ferrotune_data::Loader;
use ferrotune_models::{Batch, RewardModel};
use ferrotune_nn::Mode;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::plan::LoopPlan;
use crate::pref_loss::reward_model_loss;
pub use crate::trainer::SCORE_PARAM;
use crate::trainer::{
    log_metrics, prefixed, FirstLast, LoopCore, Observer, Outcome, RunCtx, Trainable, Trainer,
};

/// Folder of the run where the merged reward model is written at the end.
pub const EXPORT_DIR: &str = "reward_model";

/// One tokenized preference pair for the reward model: whole sequences (prompt + completion),
/// no loss mask — the score is read at the last token.
#[derive(Debug, Clone, PartialEq)]
pub struct RmPair {
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    /// TRL's optional `margin` column: the loss is −logσ(r_c − r_r − margin).
    pub margin: Option<f64>,
}

/// The resolved schedule (from the config, with totals computed).
#[derive(Debug, Clone)]
pub struct RmPlan {
    /// Steps, batches, optimizer and cadence, as every trainer has them.
    pub run: LoopPlan,
    /// TRL's `center_rewards_coefficient` (None = off).
    pub center_rewards_coefficient: Option<f64>,
    /// Dtype of the merged export at the end; None = no export.
    pub export_dtype: Option<DType>,
}

/// What the loop saves besides weights and optimizer moments.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RmState {
    #[serde(flatten)]
    pub core: LoopCore,
    pub pairs_seen: u64,
    /// Real (non-pad) tokens scored so far (TRL's `num_tokens`).
    pub num_tokens: u64,
}

/// Means over a set of pairs (TRL's logged quantities).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RmStats {
    pub loss: f64,
    pub accuracy: f64,
    pub margin: f64,
    pub rewards_chosen: f64,
    pub rewards_rejected: f64,
    pub min_reward: f64,
    pub mean_reward: f64,
    pub max_reward: f64,
    pub pairs: usize,
}

impl RmStats {
    fn metrics(&self, prefix: &str) -> Vec<(String, f64)> {
        prefixed(
            prefix,
            &[
                ("loss", self.loss),
                ("accuracy", self.accuracy),
                ("margin", self.margin),
                ("rewards/chosen", self.rewards_chosen),
                ("rewards/rejected", self.rewards_rejected),
                ("min_reward", self.min_reward),
                ("mean_reward", self.mean_reward),
                ("max_reward", self.max_reward),
            ],
        )
    }
}

/// Per-pair scores and pair-weighted losses gathered over micro-batches.
#[derive(Default)]
struct PairAcc {
    chosen: Vec<f64>,
    rejected: Vec<f64>,
    /// Σ (micro-batch mean loss × its pairs), so the mean is over pairs.
    loss_sum: f64,
}

impl PairAcc {
    fn stats(&self) -> RmStats {
        let n = self.chosen.len();
        if n == 0 {
            return RmStats {
                loss: f64::NAN,
                ..Default::default()
            };
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let all: Vec<f64> = self.chosen.iter().chain(&self.rejected).copied().collect();
        let diffs: Vec<f64> = self
            .chosen
            .iter()
            .zip(&self.rejected)
            .map(|(c, r)| c - r)
            .collect();
        RmStats {
            loss: self.loss_sum / n as f64,
            accuracy: diffs.iter().filter(|&&d| d > 0.0).count() as f64 / n as f64,
            margin: mean(&diffs),
            rewards_chosen: mean(&self.chosen),
            rewards_rejected: mean(&self.rejected),
            min_reward: all.iter().copied().fold(f64::INFINITY, f64::min),
            mean_reward: mean(&all),
            max_reward: all.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            pairs: n,
        }
    }
}

/// The outcome of a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RmSummary {
    pub run: Outcome,
    pub loss: FirstLast,
    /// Eval before the first step (fresh runs with an eval set) and at the last eval point.
    pub first_eval: Option<RmStats>,
    pub last_eval: Option<RmStats>,
    /// The merged `…ForSequenceClassification` folder written at the end.
    pub export: Option<PathBuf>,
}

/// Scores (B,) ×2 of a slice of pairs, chosen rows first, in one right-padded forward of 2B rows;
/// also the number of real tokens in the batch.
pub fn pair_scores(
    rm: &RewardModel,
    pairs: &[&RmPair],
    pad_id: u32,
    mode: Mode,
    device: &Device,
) -> Result<(Tensor, Tensor, usize)> {
    let b = pairs.len();
    let seqs: Vec<Vec<u32>> = pairs
        .iter()
        .map(|p| p.chosen.clone())
        .chain(pairs.iter().map(|p| p.rejected.clone()))
        .collect();
    if seqs.iter().any(Vec::is_empty) {
        return Err(TrainError::Input(
            "a preference pair has an empty side; the reward model scores at least one token"
                .into(),
        ));
    }
    let tokens = seqs.iter().map(Vec::len).sum();
    let batch = Batch::right_padded(&seqs, pad_id, device)?; // (2B, T)
    let scores = rm.scores(&batch, mode)?; // (2B,)
    Ok((scores.narrow(0, 0, b)?, scores.narrow(0, b, b)?, tokens))
}

/// The loss of one micro-batch (mean over its pairs; differentiable in train mode); the scores
/// go into `acc`. Returns (loss, real tokens).
fn micro_loss(
    rm: &RewardModel,
    pairs: &[&RmPair],
    center: Option<f64>,
    pad_id: u32,
    mode: Mode,
    device: &Device,
    acc: &mut PairAcc,
) -> Result<(Tensor, usize)> {
    let (rc, rr, tokens) = pair_scores(rm, pairs, pad_id, mode, device)?;
    let margin = match pairs.iter().map(|p| p.margin).collect::<Option<Vec<f64>>>() {
        Some(m) => Some(Tensor::from_vec(m, pairs.len(), device)?),
        None if pairs.iter().any(|p| p.margin.is_some()) => {
            return Err(TrainError::Input(
                "some pairs have a margin and some do not; give every pair one or none".into(),
            ))
        }
        None => None,
    };
    let out = reward_model_loss(&rc, &rr, margin.as_ref(), center)?;
    let n = pairs.len() as f64;
    acc.loss_sum += out.loss.detach().to_dtype(DType::F64)?.to_scalar::<f64>()? * n;
    let host =
        |t: &Tensor| -> Result<Vec<f64>> { Ok(t.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?) };
    acc.chosen.extend(host(&rc)?);
    acc.rejected.extend(host(&rr)?);
    Ok((out.loss, tokens))
}

/// Loss, pairwise accuracy and reward statistics of `pairs` without an update, in batches.
pub fn eval_pairs(
    rm: &RewardModel,
    pairs: &[RmPair],
    center: Option<f64>,
    batch_size: usize,
    pad_id: u32,
    device: &Device,
) -> Result<Option<RmStats>> {
    if pairs.is_empty() {
        return Ok(None);
    }
    let mut acc = PairAcc::default();
    for chunk in pairs.chunks(batch_size.max(1)) {
        let refs: Vec<&RmPair> = chunk.iter().collect();
        micro_loss(rm, &refs, center, pad_id, Mode::EVAL, device, &mut acc)?;
    }
    Ok(Some(acc.stats()))
}

/// Train the reward model from step 0, or from `resume`, up to `plan.run.total_steps`.
pub fn train_reward_model(
    trainable: &Trainable,
    train: &[RmPair],
    eval: &[RmPair],
    plan: &RmPlan,
    ctx: RunCtx,
) -> Result<RmSummary> {
    let (run, resume, obs, device) = ctx.parts();
    let Trainable::Reward { rm, .. } = trainable else {
        return Err(TrainError::Unsupported(
            "a reward-model run trains a reward model's adapters and head",
        ));
    };
    if trainable.params().len() < 2 {
        return Err(TrainError::invalid(
            "lora",
            "the reward model has no LoRA adapters; LoRA on the body is required (the head \
             alone cannot learn which tokens matter)",
        ));
    }
    let run_dir = run;
    let run = &plan.run;
    let mut t = Trainer::new(rm.body.as_ref(), trainable, run, run_dir)?;
    let fresh = RmState {
        core: LoopCore::new(run),
        pairs_seen: 0,
        num_tokens: 0,
    };
    let mut state = t.start(resume, fresh, obs)?;
    let mut summary = RmSummary {
        run: Outcome::at(state.core.step),
        ..Default::default()
    };
    // Eval before training, so the run shows where the fresh head started (fresh runs only: a
    // resumed run's log already has it).
    if resume.is_none() && run.eval_every > 0 {
        summary.first_eval = eval_and_log(rm, eval, plan, device, obs, 0)?;
    }
    let mut loader = Loader::resume(train.len(), run.shuffler(), state.core.cursor)?;
    let start_step = state.core.step;
    while state.core.step < run.total_steps {
        let t0 = Instant::now();
        // 1. The pairs of this optimizer step, by micro-batch.
        let micro: Vec<Vec<usize>> = (0..run.grad_accum)
            .map(|_| Ok(loader.next_batch(run.batch_size)?))
            .collect::<Result<_>>()?;
        let total_pairs: usize = micro.iter().map(Vec::len).sum();
        // 2. Scores, loss, backward per micro-batch; each micro-batch's mean loss is weighted by
        //    its share of the step's pairs, so the step's loss is the mean over all its pairs
        //    (batch 1 × accum 8 = batch 8 × accum 1).
        let mut pairs_acc = PairAcc::default();
        let mut step_tokens = 0usize;
        for (k, idx) in micro.iter().enumerate() {
            let pairs: Vec<&RmPair> = idx.iter().map(|&i| &train[i]).collect();
            let mode = run.train_mode(state.core.step, k);
            let center = plan.center_rewards_coefficient;
            let (loss, tokens) =
                micro_loss(rm, &pairs, center, run.pad_id, mode, device, &mut pairs_acc)?;
            step_tokens += tokens;
            t.backward(&(loss * (pairs.len() as f64 / total_pairs.max(1) as f64))?)?;
        }
        // 3. Clip (or just measure), skip non-finite steps, update adapters and head.
        let lr = run.lr_at(state.core.step);
        let up = t.update(&mut state.core, lr, obs)?;
        state.core.advance(loader.cursor());
        state.pairs_seen += total_pairs as u64;
        state.num_tokens += step_tokens as u64;
        let step = state.core.step;
        let s = pairs_acc.stats();
        summary.loss.see(s.loss);
        summary.run.step_done(step, &t);
        // 4. Log, eval, save.
        if run.is_log_step(step) {
            let secs = t0.elapsed().as_secs_f64();
            let mut m = s.metrics("");
            m.push(("grad_norm".into(), up.grad_norm));
            m.push(("learning_rate".into(), lr));
            m.push(("num_tokens".into(), state.num_tokens as f64));
            m.push(("pairs_per_s".into(), total_pairs as f64 / secs));
            m.push((
                "epoch".into(),
                LoopPlan::epoch(loader.cursor(), train.len()),
            ));
            log_metrics(obs, step, &m);
        }
        if run.is_eval_step(step) {
            if let Some(e) = eval_and_log(rm, eval, plan, device, obs, step)? {
                summary.last_eval = Some(e);
            }
        }
        if run.is_save_step(step) {
            summary.run.last_checkpoint = Some(t.save(step, &state, obs)?);
        }
    }
    // 5. The merged model, loadable by transformers' AutoModelForSequenceClassification.
    if let Some(dtype) = plan.export_dtype {
        let out = run_dir.root().join(EXPORT_DIR);
        // A resumed run that had already finished keeps its export; any other one is stale.
        if state.core.step > start_step || !out.exists() {
            remove_stale(&out)?;
            export_reward_model(rm, &out, dtype)?;
            obs.message(&format!("exported the reward model to {}", out.display()));
        }
        summary.export = Some(out);
    }
    Ok(summary)
}

fn remove_stale(out: &Path) -> Result<()> {
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| TrainError::Io {
            path: out.display().to_string(),
            msg: format!("cannot remove the previous export: {e}"),
        })?;
    }
    Ok(())
}

/// Evaluates on `eval` (None when it is empty) and logs the stats under `eval/` at `step`.
fn eval_and_log(
    rm: &RewardModel,
    eval: &[RmPair],
    plan: &RmPlan,
    device: &Device,
    obs: &mut dyn Observer,
    step: usize,
) -> Result<Option<RmStats>> {
    let center = plan.center_rewards_coefficient;
    let (batch, pad) = (plan.run.batch_size, plan.run.pad_id);
    let stats = eval_pairs(rm, eval, center, batch, pad, device)?;
    if let Some(s) = &stats {
        log_metrics(obs, step, &s.metrics("eval/"));
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stats are means over pairs whatever the micro-batching; accuracy is strict.
    #[test]
    fn stats_are_means_over_pairs() {
        let acc = PairAcc {
            chosen: vec![1.0, 0.0, -1.0],
            rejected: vec![0.5, 0.0, -2.0],
            // micro-batch of 2 pairs with mean loss 0.3, then 1 pair with loss 0.6
            loss_sum: 0.3 * 2.0 + 0.6,
        };
        let s = acc.stats();
        assert_eq!(s.pairs, 3);
        assert!((s.loss - 0.4).abs() < 1e-12);
        // Pair 1 ties: not counted as correct.
        assert!((s.accuracy - 2.0 / 3.0).abs() < 1e-12);
        assert!((s.margin - (0.5 + 0.0 + 1.0) / 3.0).abs() < 1e-12);
        assert_eq!((s.min_reward, s.max_reward), (-2.0, 1.0));
        assert!((s.mean_reward - (-1.5 / 6.0)).abs() < 1e-12);
        assert!(PairAcc::default().stats().loss.is_nan());
    }
}
