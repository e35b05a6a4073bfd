//! DPO (direct preference optimisation, 2305.18290) on tokenized preference pairs, one loop you
//! can read top to bottom: batch of pairs → policy log-probs of chosen and rejected in one
//! padded forward → reference log-probs (no graph; the same model with adapters off, or a
//! separate frozen model — TRL's `ref_model` — which full fine-tuning needs; with
//! `precompute_ref_log_probs` computed once and kept in the run folder as `ref_logps.json`,
//! which a resumed run reads back while the pairs and the reference are unchanged) →
//! [`dpo_loss`] → backward (accumulated) → the shared clip + AdamW step → log → eval → save.
//!
//! Sequence log-prob = the sum of log p(token) over the completion tokens (TRL:
//! `per_token_logps.sum(1)` with prompt and padding masked out); the completion token counts go
//! along for `ipo`. Logged with TRL's names: `loss`, `rewards/chosen`, `rewards/rejected`,
//! `rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`, `grad_norm`,
//! `learning_rate`; eval the same under `eval/`, plus `eval/policy_accuracy`: the fraction of
//! pairs where the policy itself gives the chosen completion the higher log-prob *per token*
//! (summed log-probs would favour the shorter reply whatever was learned). Unlike the
//! implicit-reward accuracy, which is 0 before training (policy = reference, every margin 0),
//! it says where the base model started.
//!
//! Exact resume as SFT: weights, optimizer moments, data cursor, non-finite guard and step are
//! saved; dropout masks are a pure function of (seed, step, micro-batch).
//!
//! Owns: the order of a DPO step. Does not own: the loss formulas (`pref_loss`), reading or
//! tokenizing pairs (`ferrotune-data`), checkpoint files (`ferrotune-ckpt`).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ferrotune_ckpt::RunDir;
use ferrotune_data::{collate_right, tokenized_fingerprint, Loader, PrefPair, Tokenized};
use ferrotune_models::CausalLm;
use ferrotune_nn::Mode;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::loss::scored_logprobs;
use crate::plan::LoopPlan;
use crate::pref_loss::{dpo_loss, DpoConfig, DpoInputs};
use crate::trainer::{
    batch_tensors, log_metrics, prefixed, FirstLast, LoopCore, Observer, Outcome, RunCtx,
    Trainable, Trainer,
};

/// The resolved DPO schedule (from the config, with totals computed).
#[derive(Debug, Clone)]
pub struct DpoPlan {
    /// Steps, batches, optimizer and cadence, as every trainer has them.
    pub run: LoopPlan,
    pub loss: DpoConfig,
    /// Reference log-probs of every train pair computed once before the first step.
    pub precompute_ref_log_probs: bool,
}

/// What the loop saves besides weights and optimizer moments.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DpoState {
    #[serde(flatten)]
    pub core: LoopCore,
    pub pairs_seen: u64,
}

/// Means over a set of pairs (TRL's logged quantities).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PairStats {
    pub loss: f64,
    pub rewards_chosen: f64,
    pub rewards_rejected: f64,
    pub rewards_accuracies: f64,
    pub rewards_margins: f64,
    pub logps_chosen: f64,
    pub logps_rejected: f64,
    /// Fraction of pairs with a higher per-token logπ for chosen than rejected (module docs).
    pub policy_accuracy: f64,
    pub pairs: usize,
}

impl PairStats {
    fn metrics(&self, prefix: &str) -> Vec<(String, f64)> {
        prefixed(
            prefix,
            &[
                ("loss", self.loss),
                ("rewards/chosen", self.rewards_chosen),
                ("rewards/rejected", self.rewards_rejected),
                ("rewards/accuracies", self.rewards_accuracies),
                ("rewards/margins", self.rewards_margins),
                ("logps/chosen", self.logps_chosen),
                ("logps/rejected", self.logps_rejected),
            ],
        )
    }
}

/// Per-pair values gathered over micro-batches, reduced to [`PairStats`] at the end.
#[derive(Default)]
struct PairAcc {
    losses: Vec<f64>,
    chosen_rewards: Vec<f64>,
    rejected_rewards: Vec<f64>,
    logps_chosen: Vec<f64>,
    logps_rejected: Vec<f64>,
    tokens_chosen: Vec<usize>,
    tokens_rejected: Vec<usize>,
}

impl PairAcc {
    fn stats(&self) -> PairStats {
        let n = self.losses.len();
        let mean = |v: &[f64]| {
            if v.is_empty() {
                f64::NAN
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        };
        let margins: Vec<f64> = self
            .chosen_rewards
            .iter()
            .zip(&self.rejected_rewards)
            .map(|(c, r)| c - r)
            .collect();
        let frac = |k: usize| {
            if n == 0 {
                f64::NAN
            } else {
                k as f64 / n as f64
            }
        };
        PairStats {
            loss: mean(&self.losses),
            rewards_chosen: mean(&self.chosen_rewards),
            rewards_rejected: mean(&self.rejected_rewards),
            rewards_accuracies: frac(margins.iter().filter(|&&m| m > 0.0).count()),
            rewards_margins: mean(&margins),
            logps_chosen: mean(&self.logps_chosen),
            logps_rejected: mean(&self.logps_rejected),
            policy_accuracy: frac(
                (0..n)
                    .filter(|&i| {
                        let per_token = |lp: f64, t: usize| lp / t.max(1) as f64;
                        per_token(self.logps_chosen[i], self.tokens_chosen[i])
                            > per_token(self.logps_rejected[i], self.tokens_rejected[i])
                    })
                    .count(),
            ),
            pairs: n,
        }
    }
}

/// The outcome of a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DpoSummary {
    pub run: Outcome,
    pub loss: FirstLast,
    /// Eval before the first step (fresh runs with an eval set) and at the last eval point.
    pub first_eval: Option<PairStats>,
    pub last_eval: Option<PairStats>,
}

/// Summed completion log-probs (B,) and completion token counts of `seqs`, in one right-padded
/// forward. In a non-train `mode` the result is detached.
pub fn sequence_logps(
    model: &dyn CausalLm,
    seqs: &[&Tokenized],
    pad_id: u32,
    mode: Mode,
    device: &Device,
) -> Result<(Tensor, Vec<usize>)> {
    let c = collate_right(seqs, pad_id);
    let batch = batch_tensors(&c, device)?;
    let (lp, where_) = scored_logprobs(model, &batch, &c.loss_mask, 1.0, mode)?; // (N,)
    let mut counts = vec![0usize; seqs.len()];
    for &(row, _) in &where_ {
        counts[row] += 1;
    }
    let mut sums = Vec::with_capacity(seqs.len());
    let mut off = 0;
    for &n in &counts {
        // Row-major order: each row's scored tokens are contiguous in `lp`.
        sums.push(if n == 0 {
            Tensor::zeros((), DType::F32, device)?
        } else {
            lp.narrow(0, off, n)?.sum_all()?
        });
        off += n;
    }
    Ok((Tensor::stack(&sums, 0)?, counts)) // (B,)
}

/// Policy (B,) ×2 and token counts of a slice of pairs: chosen and rejected in one forward.
fn pair_logps(
    model: &dyn CausalLm,
    pairs: &[&PrefPair],
    pad_id: u32,
    mode: Mode,
    device: &Device,
) -> Result<(Tensor, Tensor, Vec<usize>, Vec<usize>)> {
    let b = pairs.len();
    let seqs: Vec<&Tokenized> = pairs
        .iter()
        .map(|p| &p.chosen)
        .chain(pairs.iter().map(|p| &p.rejected))
        .collect();
    let (lp, counts) = sequence_logps(model, &seqs, pad_id, mode, device)?; // (2B,)
    Ok((
        lp.narrow(0, 0, b)?,
        lp.narrow(0, b, b)?,
        counts[..b].to_vec(),
        counts[b..].to_vec(),
    ))
}

/// The DPO reference: the policy with its adapters switched off, or a separate frozen model.
#[derive(Clone, Copy)]
pub enum Reference<'a> {
    AdaptersOff,
    Model(&'a dyn CausalLm),
}

/// Reference log-probs (chosen, rejected) of `pairs`: no graph.
fn ref_logps(
    policy: &dyn CausalLm,
    reference: Reference,
    pairs: &[&PrefPair],
    pad_id: u32,
    device: &Device,
) -> Result<Vec<(f32, f32)>> {
    let (model, mode) = match reference {
        Reference::AdaptersOff => (policy, Mode::REFERENCE),
        Reference::Model(m) => (m, Mode::EVAL),
    };
    let (c, r, _, _) = pair_logps(model, pairs, pad_id, mode, device)?;
    Ok(c.to_vec1::<f32>()?
        .into_iter()
        .zip(r.to_vec1::<f32>()?)
        .collect())
}

/// Where precomputed reference log-probs are kept in the run folder.
pub const REF_LOGPS_FILE: &str = "ref_logps.json";

/// The reference log-probs of every train pair: read from the run folder when a cache for the
/// same pairs and reference is there (a resumed run), else computed once and written there.
#[allow(clippy::too_many_arguments)]
fn precomputed_refs(
    policy: &dyn CausalLm,
    reference: Reference,
    reference_name: &str,
    train: &[PrefPair],
    plan: &DpoPlan,
    run: &RunDir,
    obs: &mut dyn Observer,
    device: &Device,
) -> Result<Vec<(f32, f32)>> {
    let path = run.root().join(REF_LOGPS_FILE);
    let fingerprint = tokenized_fingerprint(train.iter().flat_map(|p| [&p.chosen, &p.rejected]));
    let stored = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str::<RefCache>(&t).ok());
    if let Some(c) = stored {
        if c.pairs_fingerprint == fingerprint
            && c.reference == reference_name
            && c.logps.len() == train.len()
        {
            obs.message(&format!(
                "read reference log-probs of {} pairs from {}",
                c.logps.len(),
                path.display()
            ));
            return Ok(c.logps);
        }
        obs.message(&format!(
            "{} was written for other pairs or another reference; computing it again",
            path.display()
        ));
    }
    let mut all = Vec::with_capacity(train.len());
    for chunk in train.chunks(plan.run.batch_size.max(1)) {
        let refs: Vec<&PrefPair> = chunk.iter().collect();
        all.extend(ref_logps(
            policy,
            reference,
            &refs,
            plan.run.pad_id,
            device,
        )?);
    }
    let cache = RefCache {
        reference: reference_name.to_string(),
        pairs_fingerprint: fingerprint,
        logps: all,
    };
    let io = |msg: String| TrainError::Io {
        path: path.display().to_string(),
        msg,
    };
    let text = serde_json::to_string(&cache).map_err(|e| io(e.to_string()))?;
    // Written beside and renamed, so a crash never leaves half a cache to be read.
    let tmp = run.root().join(format!(".{REF_LOGPS_FILE}.partial"));
    std::fs::write(&tmp, text)
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(|e| io(format!("cannot write: {e}")))?;
    obs.message(&format!(
        "precomputed reference log-probs of {} pairs into {}",
        cache.logps.len(),
        path.display()
    ));
    Ok(cache.logps)
}

/// The on-disk form of the precomputed reference log-probs.
#[derive(Serialize, Deserialize)]
struct RefCache {
    /// `adapters-off` or the reference model's path.
    reference: String,
    pairs_fingerprint: String,
    /// (chosen, rejected) summed log-probs, in train-pair order.
    logps: Vec<(f32, f32)>,
}

fn counts_tensor(counts: &[usize], device: &Device) -> candle_core::Result<Tensor> {
    let v: Vec<f32> = counts.iter().map(|&n| n as f32).collect();
    Tensor::from_vec(v, counts.len(), device)
}

/// The DPO loss and per-pair values of one micro-batch, added to `acc`; returns the loss
/// tensor (mean over these pairs, differentiable in train mode).
#[allow(clippy::too_many_arguments)]
fn micro_loss(
    model: &dyn CausalLm,
    pairs: &[&PrefPair],
    refs: &[(f32, f32)],
    cfg: &DpoConfig,
    pad_id: u32,
    mode: Mode,
    device: &Device,
    acc: &mut PairAcc,
) -> Result<Tensor> {
    let (pc, pr, nc, nr) = pair_logps(model, pairs, pad_id, mode, device)?;
    let rc: Vec<f32> = refs.iter().map(|r| r.0).collect();
    let rr: Vec<f32> = refs.iter().map(|r| r.1).collect();
    let (rc, rr) = (
        Tensor::from_vec(rc, refs.len(), device)?,
        Tensor::from_vec(rr, refs.len(), device)?,
    );
    acc.tokens_chosen.extend(&nc);
    acc.tokens_rejected.extend(&nr);
    let (nc, nr) = (counts_tensor(&nc, device)?, counts_tensor(&nr, device)?);
    let out = dpo_loss(
        &DpoInputs {
            policy_chosen: &pc,
            policy_rejected: &pr,
            ref_chosen: &rc,
            ref_rejected: &rr,
            chosen_tokens: Some(&nc),
            rejected_tokens: Some(&nr),
        },
        cfg,
    )?;
    acc.losses.extend(&out.losses);
    acc.chosen_rewards.extend(&out.chosen_rewards);
    acc.rejected_rewards.extend(&out.rejected_rewards);
    acc.logps_chosen
        .extend(pc.detach().to_vec1::<f32>()?.iter().map(|&x| x as f64));
    acc.logps_rejected
        .extend(pr.detach().to_vec1::<f32>()?.iter().map(|&x| x as f64));
    Ok(out.loss)
}

/// DPO loss and stats of `pairs` without an update (policy in eval mode), in batches.
pub fn eval_pairs(
    model: &dyn CausalLm,
    reference: Reference,
    pairs: &[PrefPair],
    cfg: &DpoConfig,
    batch_size: usize,
    pad_id: u32,
    device: &Device,
) -> Result<Option<PairStats>> {
    if pairs.is_empty() {
        return Ok(None);
    }
    let mut acc = PairAcc::default();
    for chunk in pairs.chunks(batch_size.max(1)) {
        let refs: Vec<&PrefPair> = chunk.iter().collect();
        let r = ref_logps(model, reference, &refs, pad_id, device)?;
        micro_loss(model, &refs, &r, cfg, pad_id, Mode::EVAL, device, &mut acc)?;
    }
    Ok(Some(acc.stats()))
}

/// Run DPO from step 0, or from `resume`, up to `plan.run.total_steps`. `reference_name` names the
/// reference in the log-prob cache (`adapters-off` or the reference model's path).
#[allow(clippy::too_many_arguments)]
pub fn train_dpo(
    model: &dyn CausalLm,
    reference: Reference,
    reference_name: &str,
    trainable: &Trainable,
    train: &[PrefPair],
    eval: &[PrefPair],
    plan: &DpoPlan,
    ctx: RunCtx,
) -> Result<DpoSummary> {
    let (run, resume, obs, device) = ctx.parts();
    if matches!(reference, Reference::AdaptersOff) && !matches!(trainable, Trainable::Lora { .. }) {
        return Err(TrainError::invalid(
            "dpo.ref_model",
            "DPO's reference is the base with adapters switched off, so it needs LoRA adapters \
             (or a separate reference model)",
        ));
    }
    plan.loss.validate()?;
    let run_dir = run;
    let run = &plan.run;
    let mut t = Trainer::new(model, trainable, run, run_dir)?;
    let fresh = DpoState {
        core: LoopCore::new(run),
        pairs_seen: 0,
    };
    let mut state = t.start(resume, fresh, obs)?;
    let mut summary = DpoSummary {
        run: Outcome::at(state.core.step),
        ..Default::default()
    };
    // The reference never changes, so its log-probs can be computed once.
    let ref_cache: Option<Vec<(f32, f32)>> = if plan.precompute_ref_log_probs {
        Some(precomputed_refs(
            model,
            reference,
            reference_name,
            train,
            plan,
            run_dir,
            obs,
            device,
        )?)
    } else {
        None
    };
    let eval_now = |model: &dyn CausalLm| {
        eval_pairs(
            model,
            reference,
            eval,
            &plan.loss,
            run.batch_size,
            run.pad_id,
            device,
        )
    };
    // Eval before training, so the run shows where it started (fresh runs only: a resumed
    // run's log already has it).
    if resume.is_none() && run.eval_every > 0 {
        if let Some(s) = eval_now(model)? {
            log_eval(obs, 0, &s);
            summary.first_eval = Some(s);
        }
    }
    let mut loader = Loader::resume(train.len(), run.shuffler(), state.core.cursor)?;
    while state.core.step < run.total_steps {
        let t0 = Instant::now();
        // 1. The pairs of this optimizer step, by micro-batch.
        let micro: Vec<Vec<usize>> = (0..run.grad_accum)
            .map(|_| Ok(loader.next_batch(run.batch_size)?))
            .collect::<Result<_>>()?;
        let total_pairs: usize = micro.iter().map(Vec::len).sum();
        // 2. Reference, policy, loss, backward per micro-batch; each micro-batch's mean loss
        //    is weighted by its share of the step's pairs, so the step's loss is the mean over
        //    all its pairs (batch 1 × accum 8 = batch 8 × accum 1).
        let mut pairs_acc = PairAcc::default();
        for (k, idx) in micro.iter().enumerate() {
            let pairs: Vec<&PrefPair> = idx.iter().map(|&i| &train[i]).collect();
            let refs = match &ref_cache {
                Some(cache) => idx.iter().map(|&i| cache[i]).collect(),
                None => ref_logps(model, reference, &pairs, run.pad_id, device)?,
            };
            let mode = run.train_mode(state.core.step, k);
            let loss = micro_loss(
                model,
                &pairs,
                &refs,
                &plan.loss,
                run.pad_id,
                mode,
                device,
                &mut pairs_acc,
            )?;
            t.backward(&(loss * (pairs.len() as f64 / total_pairs.max(1) as f64))?)?;
        }
        // 3. Clip (or just measure), skip non-finite steps, update.
        let lr = run.lr_at(state.core.step);
        let up = t.update(&mut state.core, lr, obs)?;
        state.core.advance(loader.cursor());
        state.pairs_seen += total_pairs as u64;
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
            m.push(("pairs_per_s".into(), total_pairs as f64 / secs));
            m.push((
                "epoch".into(),
                LoopPlan::epoch(loader.cursor(), train.len()),
            ));
            log_metrics(obs, step, &m);
        }
        if run.is_eval_step(step) {
            if let Some(e) = eval_now(model)? {
                log_eval(obs, step, &e);
                summary.last_eval = Some(e);
            }
        }
        if t.finish_step(step, &state, &mut summary.run, obs)? {
            break;
        }
    }
    Ok(summary)
}

fn log_eval(obs: &mut dyn Observer, step: usize, s: &PairStats) {
    let mut m = s.metrics("eval/");
    m.push(("eval/policy_accuracy".into(), s.policy_accuracy));
    log_metrics(obs, step, &m);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The step's means are over pairs, whatever the micro-batches were; the policy accuracy
    /// compares per-token log-probs, so a longer chosen reply is not penalised for its length.
    #[test]
    fn pair_stats_are_means_over_pairs_and_policy_accuracy_is_per_token() {
        let acc = PairAcc {
            losses: vec![0.5, 0.25, 0.75],
            chosen_rewards: vec![0.2, -0.1, 0.0],
            rejected_rewards: vec![0.1, 0.1, 0.0],
            // Pair 0: chosen −10 over 10 tokens (−1/token) vs rejected −4 over 2 (−2/token):
            // the summed log-prob prefers rejected, the per-token one chosen.
            logps_chosen: vec![-10.0, -3.0, -6.0],
            logps_rejected: vec![-4.0, -3.0, -2.0],
            tokens_chosen: vec![10, 3, 3],
            tokens_rejected: vec![2, 3, 2],
        };
        let s = acc.stats();
        assert_eq!(s.pairs, 3);
        assert!((s.loss - 0.5).abs() < 1e-12);
        assert!((s.rewards_margins - (0.1 - 0.2 + 0.0) / 3.0).abs() < 1e-12);
        // Only pair 0 has a strictly positive margin (pair 2's is exactly 0).
        assert!((s.rewards_accuracies - 1.0 / 3.0).abs() < 1e-12);
        // Per token: pair 0 −1 > −2 yes; pair 1 −1 = −1 no; pair 2 −2 > −1 no.
        assert!((s.policy_accuracy - 1.0 / 3.0).abs() < 1e-12);
        assert!((s.logps_chosen - (-19.0 / 3.0)).abs() < 1e-12);
        assert!(PairAcc::default().stats().loss.is_nan());
    }
}
