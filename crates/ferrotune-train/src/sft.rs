//! Supervised fine-tuning: token-level cross-entropy on the completion / assistant tokens, one
//! loop you can read top to bottom: batch → loss → backward (accumulated) → clip → AdamW →
//! log → eval → save. Exact resume: the adapter (or weights), the optimizer moments, the data
//! cursor, the non-finite guard and the step are saved; dropout masks are a pure function of
//! (seed, step, micro-batch), so 2N steps = N + resume + N bit for bit on CPU.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use ferrotune_ckpt::{
    prune, save_checkpoint_with, Checkpoint, CheckpointParts, CkptError, RunDir, Weights,
};
use ferrotune_data::{collate_right, Collated, Cursor, Loader, Sequence, Shuffler};
use ferrotune_models::{Batch, CausalLm};
use ferrotune_nn::{splitmix64, LoraConfig, Mode};
use serde::{Deserialize, Serialize};

use crate::loss::nll_sum;
use crate::optim::{AdamW, OptimError};
use crate::plan::LoopPlan;
use crate::step::{
    clip_grad_norm, first_non_finite, grad_norm, GradAccumulator, NonFiniteGuard, StepAction,
    StepError,
};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Step(#[from] StepError),
    #[error(transparent)]
    Optim(#[from] OptimError),
    #[error(transparent)]
    Ckpt(#[from] CkptError),
    #[error(transparent)]
    Data(#[from] ferrotune_data::DataError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Plan(String),
    #[error("checkpoint {path}: trainer_state.json: {msg}")]
    State { path: String, msg: String },
}

pub type Result<T> = std::result::Result<T, TrainError>;

/// What to train: named parameters, and how a checkpoint stores them.
pub enum Trainable<'a> {
    /// LoRA adapters (PEFT names) on a frozen base.
    Lora {
        params: Vec<(String, Var)>,
        config: &'a LoraConfig,
        base_name: String,
    },
    /// Every weight (HF names).
    Full { params: Vec<(String, Var)> },
}

impl Trainable<'_> {
    pub fn params(&self) -> &[(String, Var)] {
        match self {
            Trainable::Lora { params, .. } | Trainable::Full { params } => params,
        }
    }
}

/// The resolved schedule of a run (from the config, with totals computed).
#[derive(Debug, Clone)]
pub struct SftPlan {
    /// Steps, batches, optimizer and cadence, as every trainer has them.
    pub run: LoopPlan,
}

/// What the loop saves besides weights and optimizer moments.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    pub step: usize,
    pub cursor: Cursor,
    pub guard: NonFiniteGuard,
    pub tokens_seen: u64,
    pub seed: u64,
}

/// Where the loop reports to (the CLI prints, logs metrics and draws progress).
pub trait Observer {
    /// Metrics of `step` (train: every `log_every`; eval: every `eval_every`).
    fn metrics(&mut self, step: usize, values: &[(&str, f64)]);
    /// A line for the user (saves, skipped steps).
    fn message(&mut self, msg: &str);
    /// A health finding (GRPO's RL checks); shown as a message unless the observer records it.
    fn finding(&mut self, f: &crate::health::Finding) {
        self.message(&f.to_string());
    }
    /// Called at every eval point with the model (e.g. the perplexity regression gate); its
    /// metrics are logged, and `stop` ends the run before the regressed state is saved.
    fn on_eval(
        &mut self,
        _step: usize,
        _model: &dyn CausalLm,
    ) -> std::result::Result<EvalVerdict, String> {
        Ok(EvalVerdict::default())
    }
}

/// What an eval hook found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvalVerdict {
    pub metrics: Vec<(String, f64)>,
    /// Stop the run now (the last saved checkpoint is the one to keep).
    pub stop: bool,
}

/// The end of every trainer's step: take the accumulated gradients, clip them to
/// `max_grad_norm` (0 = only measure the norm), and apply AdamW at `lr` unless some gradient is
/// non-finite, in which case the guard decides between skipping (named to the observer) and
/// stopping. Returns (gradient norm, whether the update was applied).
#[allow(clippy::too_many_arguments)]
pub(crate) fn apply_update(
    acc: &mut GradAccumulator,
    params: &[(String, Var)],
    opt: &mut AdamW,
    guard: &mut NonFiniteGuard,
    step: usize,
    max_grad_norm: f64,
    lr: f64,
    obs: &mut dyn Observer,
) -> Result<(f64, bool)> {
    let mut grads = acc.take();
    let norm = if max_grad_norm > 0.0 {
        clip_grad_norm(&mut grads, params, max_grad_norm)?
    } else {
        grad_norm(&grads, params)?
    };
    // A non-finite norm is exactly "some gradient is NaN or inf"; then name the first one.
    let bad = if norm.is_finite() {
        None
    } else {
        first_non_finite(&grads, params)?
    };
    match guard.observe(step, bad.as_deref())? {
        StepAction::Apply => {
            opt.step(&grads, lr)?;
            Ok((norm, true))
        }
        StepAction::Skip => {
            obs.message(&format!(
                "step {}: non-finite gradients (first: {}), update skipped",
                step + 1,
                bad.unwrap_or_default()
            ));
            Ok((norm, false))
        }
    }
}

/// Run the observer's eval hook, log what it measured; true = stop.
pub(crate) fn eval_hook(obs: &mut dyn Observer, step: usize, model: &dyn CausalLm) -> Result<bool> {
    let v = obs.on_eval(step, model).map_err(TrainError::Plan)?;
    if !v.metrics.is_empty() {
        let refs: Vec<(&str, f64)> = v.metrics.iter().map(|(k, x)| (k.as_str(), *x)).collect();
        obs.metrics(step, &refs);
    }
    Ok(v.stop)
}

/// The outcome of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct SftSummary {
    pub steps: usize,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub last_eval_loss: Option<f64>,
    pub skipped_steps: usize,
    pub last_checkpoint: Option<std::path::PathBuf>,
    /// The eval hook stopped the run (regression gate).
    pub stopped_early: bool,
}

/// A right-padded collated batch as model input.
pub fn batch_tensors(c: &Collated, device: &Device) -> candle_core::Result<Batch> {
    let (b, t) = c.shape();
    let flat = |v: &Vec<Vec<u32>>| v.iter().flatten().copied().collect::<Vec<u32>>();
    let mask: Vec<u8> = c.attention_mask.iter().flatten().copied().collect();
    Ok(Batch {
        input_ids: Tensor::from_vec(flat(&c.ids), (b, t), device)?,
        position_ids: Tensor::from_vec(flat(&c.position_ids), (b, t), device)?,
        key_mask: if mask.iter().all(|&m| m == 1) {
            None
        } else {
            Some(Tensor::from_vec(mask, (b, t), device)?)
        },
    })
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
#[allow(clippy::too_many_arguments)]
pub fn train_sft<S: Sequence>(
    model: &dyn CausalLm,
    trainable: &Trainable,
    train: &[S],
    eval: &[S],
    plan: &SftPlan,
    run: &RunDir,
    resume: Option<&Checkpoint>,
    obs: &mut dyn Observer,
    device: &Device,
) -> Result<SftSummary> {
    let params = trainable.params().to_vec();
    let mut opt = AdamW::new(params.clone(), plan.run.adamw)?;
    let shuffler = Shuffler::new(plan.run.seed, plan.run.shuffle);
    let mut state = TrainerState {
        step: 0,
        cursor: Cursor::default(),
        guard: NonFiniteGuard::new(plan.run.max_nonfinite_steps),
        tokens_seen: 0,
        seed: plan.run.seed,
    };
    if let Some(ck) = resume {
        state = resume_from(ck, trainable, model, &mut opt, obs, |s: &TrainerState| {
            s.step
        })?;
    }
    let mut loader = Loader::resume(train.len(), shuffler, state.cursor)?;
    let mut summary = SftSummary {
        steps: state.step,
        first_loss: None,
        last_loss: None,
        last_eval_loss: None,
        skipped_steps: 0,
        last_checkpoint: None,
        stopped_early: false,
    };
    let mut acc = GradAccumulator::new(&params);
    while state.step < plan.run.total_steps {
        let t0 = Instant::now();
        // 1. The micro-batches of this optimizer step, and the loss-token count over all of
        //    them (the token-mean denominator, so batch 1 × accum 8 = batch 8 × accum 1).
        let micro: Vec<Collated> = (0..plan.run.grad_accum)
            .map(|_| {
                let idx = loader.next_batch(plan.run.batch_size)?;
                let refs: Vec<&S> = idx.iter().map(|&i| &train[i]).collect();
                Ok(collate_right(&refs, plan.run.pad_id))
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
            let mode = Mode::train_with_seed(splitmix64(
                plan.run.seed ^ splitmix64(((state.step as u64) << 16) | k as u64),
            ));
            let (nll, _) = nll_sum(model, &batch, &c.loss_mask, mode)?;
            nll_total += nll.detach().to_scalar::<f32>()? as f64;
            let loss = (nll / total_tokens.max(1) as f64)?;
            acc.add(&loss.backward()?)?;
        }
        // 3. Clip (or just measure), skip non-finite steps, update.
        let lr = plan.run.schedule.lr_at(state.step, plan.run.learning_rate);
        let (grad_norm, applied) = apply_update(
            &mut acc,
            &params,
            &mut opt,
            &mut state.guard,
            state.step,
            plan.run.max_grad_norm,
            lr,
            obs,
        )?;
        if !applied {
            summary.skipped_steps += 1;
        }
        state.step += 1;
        state.cursor = loader.cursor();
        state.tokens_seen += total_tokens as u64;
        let loss = nll_total / total_tokens.max(1) as f64;
        summary.first_loss.get_or_insert(loss);
        summary.last_loss = Some(loss);
        summary.steps = state.step;
        // 4. Log, eval, save.
        if state.step.is_multiple_of(plan.run.log_every) || state.step == plan.run.total_steps {
            let secs = t0.elapsed().as_secs_f64();
            obs.metrics(
                state.step,
                &[
                    ("loss", loss),
                    ("lr", lr),
                    ("grad_norm", grad_norm),
                    ("loss_tokens", total_tokens as f64),
                    ("tokens_per_s", seq_tokens as f64 / secs),
                    (
                        "epoch",
                        loader.cursor().epoch as f64
                            + loader.cursor().index as f64 / train.len().max(1) as f64,
                    ),
                ],
            );
        }
        if plan.run.eval_every > 0
            && (state.step.is_multiple_of(plan.run.eval_every)
                || state.step == plan.run.total_steps)
        {
            if let Some(e) = eval_loss(model, eval, plan.run.batch_size, plan.run.pad_id, device)? {
                summary.last_eval_loss = Some(e);
                obs.metrics(state.step, &[("eval_loss", e)]);
            }
            if eval_hook(obs, state.step, model)? {
                summary.stopped_early = true;
                break;
            }
        }
        let save_now = (plan.run.save_every > 0 && state.step.is_multiple_of(plan.run.save_every))
            || state.step == plan.run.total_steps;
        if save_now {
            let trainer_state =
                serde_json::to_value(&state).map_err(|e| TrainError::Plan(e.to_string()))?;
            let path = save(trainable, model, &opt, state.step, &trainer_state, run)?;
            obs.message(&format!("saved {}", path.display()));
            summary.last_checkpoint = Some(path);
            if plan.run.keep_last > 0 {
                prune(run, plan.run.keep_last)?;
            }
        }
    }
    Ok(summary)
}

/// Save a checkpoint of `trainable` at `step` (shared by the trainers).
pub(crate) fn save(
    trainable: &Trainable,
    model: &dyn CausalLm,
    opt: &AdamW,
    step: usize,
    trainer_state: &serde_json::Value,
    run: &RunDir,
) -> Result<std::path::PathBuf> {
    save_with(trainable, model, opt, step, trainer_state, run, &[])
}

/// [`save`] plus trainer-specific safetensors files in the same atomic checkpoint (PPO's value
/// head).
pub(crate) fn save_with(
    trainable: &Trainable,
    model: &dyn CausalLm,
    opt: &AdamW,
    step: usize,
    trainer_state: &serde_json::Value,
    run: &RunDir,
    extra: &[(&str, &[(String, Tensor)])],
) -> Result<std::path::PathBuf> {
    let optimizer = opt.state_tensors()?;
    let full: Vec<(String, Tensor)>;
    let weights = match trainable {
        Trainable::Lora {
            config, base_name, ..
        } => Weights::Adapter {
            model,
            lora: config,
            base_name,
        },
        Trainable::Full { params } => {
            full = params
                .iter()
                .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                .collect();
            Weights::Full(&full)
        }
    };
    let parts = CheckpointParts {
        weights,
        optimizer: &optimizer,
        trainer_state,
    };
    Ok(save_checkpoint_with(run, step as u64, &parts, extra)?)
}

/// Resumes a trainer from `ck`: its state (`S`, whose step `step_of` reads), the trainable
/// weights and the optimizer moments; tells the observer (shared by the trainers).
pub(crate) fn resume_from<S: serde::de::DeserializeOwned>(
    ck: &Checkpoint,
    trainable: &Trainable,
    model: &dyn CausalLm,
    opt: &mut AdamW,
    obs: &mut dyn Observer,
    step_of: impl Fn(&S) -> usize,
) -> Result<S> {
    let state: S =
        serde_json::from_value(ck.trainer_state.clone()).map_err(|e| TrainError::State {
            path: ck.dir.display().to_string(),
            msg: e.to_string(),
        })?;
    restore_weights(trainable, model, ck)?;
    let moments = ck.optimizer.iter().cloned().collect();
    opt.load_state(&moments)?;
    obs.message(&format!(
        "resumed from {} (step {})",
        ck.dir.display(),
        step_of(&state)
    ));
    Ok(state)
}

/// Load a checkpoint's weights into `trainable` (shared by the trainers).
pub(crate) fn restore_weights(
    trainable: &Trainable,
    model: &dyn CausalLm,
    ck: &Checkpoint,
) -> Result<()> {
    match trainable {
        Trainable::Lora { .. } => Ok(ck.restore_adapter(model)?),
        Trainable::Full { params } => {
            let saved: std::collections::HashMap<String, Tensor> =
                ck.full_weights()?.into_iter().collect();
            for (name, var) in params {
                let t = saved.get(name).ok_or_else(|| TrainError::State {
                    path: ck.dir.display().to_string(),
                    msg: format!("checkpoint lacks weight {name}"),
                })?;
                var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
            }
            Ok(())
        }
    }
}
