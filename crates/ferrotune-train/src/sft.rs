//! Supervised fine-tuning: token-level cross-entropy on the completion / assistant tokens, one
//! loop you can read top to bottom: batch → loss → backward (accumulated) → clip → AdamW →
//! log → eval → save. Exact resume: the adapter (or weights), the optimizer moments, the data
//! cursor, the non-finite guard and the step are saved; dropout masks are a pure function of
//! (seed, step, micro-batch), so 2N steps = N + resume + N bit for bit on CPU.

use std::time::Instant;

use candle_core::Device;
use ferrotune_data::{collate_right, Collated, Loader, Sequence};
use ferrotune_models::CausalLm;
use ferrotune_nn::Mode;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::loss::nll_sum;
use crate::plan::LoopPlan;
use crate::trainer::{batch_tensors, FirstLast, LoopCore, Outcome, RunCtx, Trainable, Trainer};

/// The resolved schedule of a run (from the config, with totals computed).
#[derive(Debug, Clone)]
pub struct SftPlan {
    /// Steps, batches, optimizer and cadence, as every trainer has them.
    pub run: LoopPlan,
}

/// What the loop saves besides weights and optimizer moments.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    #[serde(flatten)]
    pub core: LoopCore,
    pub tokens_seen: u64,
}

/// The outcome of a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SftSummary {
    pub run: Outcome,
    /// Train loss of the first and last steps of this run.
    pub loss: FirstLast,
    pub last_eval_loss: Option<f64>,
}

/// Mean token NLL of `examples` (no update), in batches of `batch_size`.
pub fn eval_loss<S: Sequence>(
    model: &dyn CausalLm,
    examples: &[S],
    batch_size: usize,
    pad_id: u32,
    device: &Device,
) -> Result<Option<f64>> {
    let (mut sum, mut n) = (0.0f64, 0usize);
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&S> = chunk.iter().collect();
        let c = collate_right(&refs, pad_id);
        let batch = batch_tensors(&c, device)?;
        let (nll, k) = nll_sum(model, &batch, &c.loss_mask, Mode::EVAL)?;
        sum += nll.detach().to_scalar::<f32>()? as f64;
        n += k;
    }
    Ok((n > 0).then(|| sum / n as f64))
}

/// Run SFT from step 0, or from `resume`, up to `plan.run.total_steps`.
pub fn train_sft<S: Sequence>(
    model: &dyn CausalLm,
    trainable: &Trainable,
    train: &[S],
    eval: &[S],
    plan: &SftPlan,
    ctx: RunCtx,
) -> Result<SftSummary> {
    let (run, resume, obs, device) = ctx.parts();
    let plan = &plan.run;
    let mut t = Trainer::new(model, trainable, plan, run)?;
    let fresh = TrainerState {
        core: LoopCore::new(plan),
        tokens_seen: 0,
    };
    let mut state = t.start(resume, fresh, obs)?;
    let mut loader = Loader::resume(train.len(), plan.shuffler(), state.core.cursor)?;
    let mut summary = SftSummary {
        run: Outcome::at(state.core.step),
        loss: FirstLast::default(),
        last_eval_loss: None,
    };
    while state.core.step < plan.total_steps {
        let t0 = Instant::now();
        // 1. The micro-batches of this optimizer step, and the loss-token count over all of
        //    them (the token-mean denominator, so batch 1 × accum 8 = batch 8 × accum 1).
        let micro: Vec<Collated> = (0..plan.grad_accum)
            .map(|_| {
                let idx = loader.next_batch(plan.batch_size)?;
                let refs: Vec<&S> = idx.iter().map(|&i| &train[i]).collect();
                Ok(collate_right(&refs, plan.pad_id))
            })
            .collect::<Result<_>>()?;
        let total_tokens: usize = micro.iter().map(|c| c.loss_tokens()).sum();
        let seq_tokens: usize = micro.iter().map(|c| c.shape().0 * c.shape().1).sum();
        // 2. Forward + backward per micro-batch, gradients summed.
        let mut nll_total = 0.0f64;
        for (k, c) in micro.iter().enumerate() {
            if c.loss_tokens() == 0 {
                continue;
            }
            let batch = batch_tensors(c, device)?;
            let mode = plan.train_mode(state.core.step, k);
            let (nll, _) = nll_sum(model, &batch, &c.loss_mask, mode)?;
            nll_total += nll.detach().to_scalar::<f32>()? as f64;
            t.backward(&(nll / total_tokens.max(1) as f64)?)?;
        }
        // 3. Clip (or just measure), skip non-finite steps, update.
        let lr = plan.lr_at(state.core.step);
        let up = t.update(&mut state.core, lr, obs)?;
        state.core.advance(loader.cursor());
        state.tokens_seen += total_tokens as u64;
        let step = state.core.step;
        let loss = nll_total / total_tokens.max(1) as f64;
        summary.loss.see(loss);
        summary.run.step_done(step, &t);
        // 4. Log, eval, save.
        if plan.is_log_step(step) {
            let secs = t0.elapsed().as_secs_f64();
            obs.metrics(
                step,
                &[
                    ("loss", loss),
                    ("lr", lr),
                    ("grad_norm", up.grad_norm),
                    ("loss_tokens", total_tokens as f64),
                    ("tokens_per_s", seq_tokens as f64 / secs),
                    ("epoch", LoopPlan::epoch(loader.cursor(), train.len())),
                ],
            );
        }
        if plan.is_eval_step(step) {
            if let Some(e) = eval_loss(model, eval, plan.batch_size, plan.pad_id, device)? {
                summary.last_eval_loss = Some(e);
                obs.metrics(step, &[("eval_loss", e)]);
            }
        }
        if t.finish_step(step, &state, &mut summary.run, obs)? {
            break;
        }
    }
    Ok(summary)
}
