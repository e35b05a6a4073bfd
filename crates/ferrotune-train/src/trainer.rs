//! What every trainer's loop shares, written once: what is trained ([`Trainable`]), where the loop
//! reports ([`Observer`]), the loop state every checkpoint carries ([`LoopCore`]), the seeds that
//! make exact resume exact ([`derive_seed`], [`LoopPlan::train_mode`]), and the end of a step
//! ([`Trainer`]: accumulate → clip → AdamW or skip → checkpoint and prune → resume).
//!
//! Each method file (`sft`, `grpo`, `dpo`, `reward_train`, `ppo`, `distill`) keeps its own loop,
//! top to bottom; its tail is a few calls into this file.
//!
//! Owns: the shared machinery of a step. Does not own: any method's loss or data order, file
//! formats (`ferrotune-ckpt`), printing (the observer).

use std::path::PathBuf;

use candle_core::{Device, Tensor, Var};
use ferrotune_ckpt::{
    prune, restore_reward_adapter, save_checkpoint_with, Checkpoint, CheckpointParts, RunDir,
    Weights,
};
use ferrotune_data::{Collated, Cursor, Shuffler};
use ferrotune_models::{Batch, CausalLm, RewardModel};
use ferrotune_nn::{splitmix64, LoraConfig, Mode};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::optim::AdamW;
use crate::plan::LoopPlan;
use crate::step::{
    clip_grad_norm, first_non_finite, grad_norm, GradAccumulator, NonFiniteGuard, StepAction,
};

/// The optimizer's name for a reward model's score head (the LoRA parameters go by their PEFT
/// keys).
pub const SCORE_PARAM: &str = "score.weight";

/// What to train: named parameters, and how a checkpoint stores them.
pub enum Trainable<'a> {
    /// LoRA adapters (PEFT names) on a frozen base.
    Lora {
        params: Vec<(String, Var)>,
        config: &'a LoraConfig,
        base_name: String,
    },
    /// Every weight (HF names); `base`: the model folder or GGUF they started from, whose
    /// config and tokenizer checkpoints carry (none: a model made from scratch).
    Full {
        params: Vec<(String, Var)>,
        base: Option<PathBuf>,
    },
    /// A reward model: its body's adapters and the score head, checkpointed as a PEFT
    /// `SEQ_CLS` adapter folder.
    Reward {
        params: Vec<(String, Var)>,
        rm: &'a RewardModel,
        config: &'a LoraConfig,
        base_name: String,
    },
}

impl<'a> Trainable<'a> {
    /// The LoRA A/B matrices of `model` under their PEFT keys, in slot order.
    pub fn lora_params(model: &dyn CausalLm) -> Vec<(String, Var)> {
        model
            .linear_slots()
            .iter()
            .filter_map(|s| s.lora.as_ref().map(|a| (s.path.clone(), a)))
            .flat_map(|(p, a)| {
                [
                    (
                        ferrotune_models::adapter::peft_key(&p, "lora_A"),
                        a.a.clone(),
                    ),
                    (
                        ferrotune_models::adapter::peft_key(&p, "lora_B"),
                        a.b.clone(),
                    ),
                ]
            })
            .collect()
    }

    /// A reward model's adapters, then its head.
    pub fn reward_model(rm: &'a RewardModel, config: &'a LoraConfig, base_name: String) -> Self {
        let mut params = Self::lora_params(rm.body.as_ref());
        params.push((SCORE_PARAM.into(), rm.score.clone()));
        Trainable::Reward {
            params,
            rm,
            config,
            base_name,
        }
    }

    pub fn params(&self) -> &[(String, Var)] {
        match self {
            Trainable::Lora { params, .. }
            | Trainable::Full { params, .. }
            | Trainable::Reward { params, .. } => params,
        }
    }

    /// Number of trained scalars.
    pub fn num_params(&self) -> usize {
        self.params().iter().map(|(_, v)| v.elem_count()).sum()
    }
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

/// Log owned `(name, value)` metrics at `step`.
pub fn log_metrics(obs: &mut dyn Observer, step: usize, values: &[(String, f64)]) {
    let refs: Vec<(&str, f64)> = values.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    obs.metrics(step, &refs);
}

/// `values` named with `prefix` before each name (`eval/` for an eval pass's metrics).
pub fn prefixed(prefix: &str, values: &[(&str, f64)]) -> Vec<(String, f64)> {
    values
        .iter()
        .map(|(k, v)| (format!("{prefix}{k}"), *v))
        .collect()
}

/// What an eval hook found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvalVerdict {
    pub metrics: Vec<(String, f64)>,
    /// Stop the run now (the last saved checkpoint is the one to keep).
    pub stop: bool,
}

/// Run the observer's eval hook, log what it measured; true = stop.
pub fn eval_hook(obs: &mut dyn Observer, step: usize, model: &dyn CausalLm) -> Result<bool> {
    let v = obs.on_eval(step, model).map_err(TrainError::Hook)?;
    if !v.metrics.is_empty() {
        log_metrics(obs, step, &v.metrics);
    }
    Ok(v.stop)
}

/// The loop state every method's checkpoint carries (flattened into its own state, so
/// `trainer_state.json` keeps one flat object): optimizer steps done, the data cursor, the
/// non-finite guard and the seed the run started with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoopCore {
    pub step: usize,
    pub cursor: Cursor,
    pub guard: NonFiniteGuard,
    pub seed: u64,
}

impl LoopCore {
    /// Step 0 of `plan`.
    pub fn new(plan: &LoopPlan) -> Self {
        LoopCore {
            step: 0,
            cursor: Cursor::default(),
            guard: NonFiniteGuard::new(plan.max_nonfinite_steps),
            seed: plan.seed,
        }
    }
    /// One optimizer step done; the loader is at `cursor`.
    pub fn advance(&mut self, cursor: Cursor) {
        self.step += 1;
        self.cursor = cursor;
    }
}

/// A seed drawn from the run's `seed` for one purpose and occasion (`counter`): every random
/// choice of a loop (dropout masks, rollout sampling, shuffles) is such a pure function, so a
/// resumed run draws what the uninterrupted one did.
pub fn derive_seed(seed: u64, counter: u64) -> u64 {
    splitmix64(seed ^ splitmix64(counter))
}

impl LoopPlan {
    /// Examples (pairs, prompts, completions) per optimizer step: batch size × accumulation.
    pub fn per_step(&self) -> usize {
        self.batch_size * self.grad_accum
    }
    /// Learning rate of optimizer step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        self.schedule.lr_at(step, self.learning_rate)
    }
    /// The training mode (dropout mask seed) of micro-batch `k` of optimizer step `step`.
    pub fn train_mode(&self, step: usize, k: usize) -> Mode {
        Mode::train_with_seed(derive_seed(self.seed, ((step as u64) << 16) | k as u64))
    }
    /// The data order of the run.
    pub fn shuffler(&self) -> Shuffler {
        Shuffler::new(self.seed, self.shuffle)
    }
    /// Whether `step` (1-based, just done) is the last one.
    pub fn is_last(&self, step: usize) -> bool {
        step == self.total_steps
    }
    /// Train metrics after `step`: every `log_every` steps and at the end.
    pub fn is_log_step(&self, step: usize) -> bool {
        step.is_multiple_of(self.log_every) || self.is_last(step)
    }
    /// An eval pass after `step`: every `eval_every` steps (0 = never) and at the end.
    pub fn is_eval_step(&self, step: usize) -> bool {
        self.eval_every > 0 && (step.is_multiple_of(self.eval_every) || self.is_last(step))
    }
    /// A checkpoint after `step`: every `save_every` steps (0 = only at the end) and at the end.
    pub fn is_save_step(&self, step: usize) -> bool {
        (self.save_every > 0 && step.is_multiple_of(self.save_every)) || self.is_last(step)
    }
    /// Epochs of an `n`-example set done at `cursor` (fractional).
    pub fn epoch(cursor: Cursor, n: usize) -> f64 {
        cursor.epoch as f64 + cursor.index as f64 / n.max(1) as f64
    }
}

/// The update side of a loop: the parameters, AdamW and the accumulated gradients, and the
/// checkpoints of what is trained.
pub struct Trainer<'a> {
    pub model: &'a dyn CausalLm,
    pub trainable: &'a Trainable<'a>,
    pub plan: &'a LoopPlan,
    pub run: &'a RunDir,
    /// What AdamW updates: the trainable's parameters, then any the method adds (PPO's value
    /// head).
    pub params: Vec<(String, Var)>,
    pub opt: AdamW,
    acc: GradAccumulator,
    /// Updates skipped for non-finite gradients in this run.
    pub skipped_steps: usize,
}

/// Where a run happens, as every method's loop takes it: the run folder, the checkpoint to
/// resume from, the observer and the device.
pub struct RunCtx<'a> {
    pub run: &'a RunDir,
    pub resume: Option<&'a Checkpoint>,
    pub obs: &'a mut dyn Observer,
    pub device: &'a Device,
}

impl<'a> RunCtx<'a> {
    pub fn new(
        run: &'a RunDir,
        resume: Option<&'a Checkpoint>,
        obs: &'a mut dyn Observer,
        device: &'a Device,
    ) -> Self {
        RunCtx {
            run,
            resume,
            obs,
            device,
        }
    }

    /// (run folder, checkpoint to resume from, observer, device).
    #[allow(clippy::type_complexity)]
    pub fn parts(
        self,
    ) -> (
        &'a RunDir,
        Option<&'a Checkpoint>,
        &'a mut dyn Observer,
        &'a Device,
    ) {
        (self.run, self.resume, self.obs, self.device)
    }
}

/// What every run's summary holds: how far it got and where it left its weights.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// Optimizer steps done (those before a resume included).
    pub steps: usize,
    /// Updates skipped for non-finite gradients in this run.
    pub skipped_steps: usize,
    pub last_checkpoint: Option<PathBuf>,
    /// The eval hook stopped the run (regression gate).
    pub stopped_early: bool,
}

impl Outcome {
    /// Starting at `step` (0, or the checkpoint's).
    pub fn at(step: usize) -> Self {
        Outcome {
            steps: step,
            ..Default::default()
        }
    }
    /// After optimizer step `step` of trainer `t`.
    pub fn step_done(&mut self, step: usize, t: &Trainer) {
        self.steps = step;
        self.skipped_steps = t.skipped_steps;
    }
}

/// The first and the last value of a number measured once per step or eval.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FirstLast {
    pub first: Option<f64>,
    pub last: Option<f64>,
}

impl FirstLast {
    pub fn see(&mut self, x: f64) {
        self.first.get_or_insert(x);
        self.last = Some(x);
    }
}

/// What one optimizer update did.
#[derive(Debug, Clone, Copy)]
pub struct Update {
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// False when a non-finite gradient made the guard skip it.
    pub applied: bool,
}

impl<'a> Trainer<'a> {
    /// A trainer of `trainable` (whose weights live in `model`).
    pub fn new(
        model: &'a dyn CausalLm,
        trainable: &'a Trainable<'a>,
        plan: &'a LoopPlan,
        run: &'a RunDir,
    ) -> Result<Self> {
        Self::with_extra_params(model, trainable, Vec::new(), plan, run)
    }

    /// As [`Trainer::new`], with `extra` parameters the method adds (updated and checkpointed
    /// by the method beside the trainable).
    pub fn with_extra_params(
        model: &'a dyn CausalLm,
        trainable: &'a Trainable<'a>,
        extra: Vec<(String, Var)>,
        plan: &'a LoopPlan,
        run: &'a RunDir,
    ) -> Result<Self> {
        let mut params = trainable.params().to_vec();
        params.extend(extra);
        let opt = AdamW::new(params.clone(), plan.adamw)?;
        let acc = GradAccumulator::new(&params);
        Ok(Trainer {
            model,
            trainable,
            plan,
            run,
            params,
            opt,
            acc,
            skipped_steps: 0,
        })
    }

    /// Backpropagate `loss` and add its gradients to the step's.
    pub fn backward(&mut self, loss: &Tensor) -> Result<()> {
        self.acc.add(&loss.backward()?)?;
        Ok(())
    }

    /// The end of every step: take the accumulated gradients, clip them to `max_grad_norm` (0 =
    /// only measure the norm), and apply AdamW at `lr` unless some gradient is non-finite, in
    /// which case the guard decides between skipping (named to the observer) and stopping.
    pub fn update(
        &mut self,
        core: &mut LoopCore,
        lr: f64,
        obs: &mut dyn Observer,
    ) -> Result<Update> {
        let mut grads = self.acc.take();
        let norm = if self.plan.max_grad_norm > 0.0 {
            clip_grad_norm(&mut grads, &self.params, self.plan.max_grad_norm)?
        } else {
            grad_norm(&grads, &self.params)?
        };
        // A non-finite norm is exactly "some gradient is NaN or inf"; then name the first one.
        let bad = if norm.is_finite() {
            None
        } else {
            first_non_finite(&grads, &self.params)?
        };
        let applied = match core.guard.observe(core.step, bad.as_deref())? {
            StepAction::Apply => {
                self.opt.step(&grads, lr)?;
                true
            }
            StepAction::Skip => {
                obs.message(&format!(
                    "step {}: non-finite gradients (first: {}), update skipped",
                    core.step + 1,
                    bad.unwrap_or_default()
                ));
                self.skipped_steps += 1;
                false
            }
        };
        Ok(Update {
            grad_norm: norm,
            applied,
        })
    }

    /// Save a checkpoint at `step` with the method's `state`, tell the observer, prune old ones.
    pub fn save(
        &self,
        step: usize,
        state: &impl Serialize,
        obs: &mut dyn Observer,
    ) -> Result<PathBuf> {
        self.save_with(step, state, &[], obs)
    }

    /// [`Trainer::save`] plus method-specific safetensors files in the same atomic checkpoint
    /// (PPO's value head).
    pub fn save_with(
        &self,
        step: usize,
        state: &impl Serialize,
        extra: &[(&str, &[(String, Tensor)])],
        obs: &mut dyn Observer,
    ) -> Result<PathBuf> {
        let trainer_state = serde_json::to_value(state)?;
        let optimizer = self.opt.state_tensors()?;
        let full: Vec<(String, Tensor)>;
        let weights = match self.trainable {
            Trainable::Lora {
                config, base_name, ..
            } => Weights::Adapter {
                model: self.model,
                lora: config,
                base_name,
            },
            Trainable::Full { params, base } => {
                full = params
                    .iter()
                    .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                    .collect();
                Weights::Full {
                    tensors: &full,
                    model: base.as_deref().map(|b| (b, self.model.config())),
                }
            }
            Trainable::Reward {
                rm,
                config,
                base_name,
                ..
            } => Weights::RewardAdapter {
                rm,
                lora: config,
                base_name,
            },
        };
        let parts = CheckpointParts {
            weights,
            optimizer: &optimizer,
            trainer_state: &trainer_state,
        };
        let path = save_checkpoint_with(self.run, step as u64, &parts, extra)?;
        obs.message(&format!("saved {}", path.display()));
        if self.plan.keep_last > 0 {
            prune(self.run, self.plan.keep_last)?;
        }
        Ok(path)
    }

    /// The loop state to start from: `fresh`, or the one saved in `resume` (with the weights and
    /// optimizer moments restored, see [`Trainer::resume`]).
    pub fn start<S: DeserializeOwned>(
        &mut self,
        resume: Option<&Checkpoint>,
        fresh: S,
        obs: &mut dyn Observer,
    ) -> Result<S> {
        match resume {
            Some(ck) => self.resume(ck, obs),
            None => Ok(fresh),
        }
    }

    /// The tail of a step after the method's own eval: the observer's eval hook at eval steps
    /// (true = the run stops, before the regressed state is saved), then a checkpoint at save
    /// steps; both recorded in `outcome`.
    pub fn finish_step(
        &self,
        step: usize,
        state: &impl Serialize,
        outcome: &mut Outcome,
        obs: &mut dyn Observer,
    ) -> Result<bool> {
        if self.plan.is_eval_step(step) && eval_hook(obs, step, self.model)? {
            outcome.stopped_early = true;
            return Ok(true);
        }
        if self.plan.is_save_step(step) {
            outcome.last_checkpoint = Some(self.save(step, state, obs)?);
        }
        Ok(false)
    }

    /// Resume from `ck`: the method's state `S`, the trainable weights and the optimizer
    /// moments; tells the observer.
    pub fn resume<S: DeserializeOwned>(
        &mut self,
        ck: &Checkpoint,
        obs: &mut dyn Observer,
    ) -> Result<S> {
        let bad_state = |e: serde_json::Error| TrainError::State {
            path: ck.dir.display().to_string(),
            msg: e.to_string(),
        };
        let state: S = serde_json::from_value(ck.trainer_state.clone()).map_err(bad_state)?;
        let core: LoopCore = serde_json::from_value(ck.trainer_state.clone()).map_err(bad_state)?;
        self.restore_weights(ck)?;
        let moments = ck.optimizer.iter().cloned().collect();
        self.opt.load_state(&moments)?;
        obs.message(&format!(
            "resumed from {} (step {})",
            ck.dir.display(),
            core.step
        ));
        Ok(state)
    }

    /// Load a checkpoint's weights into the trainable.
    fn restore_weights(&self, ck: &Checkpoint) -> Result<()> {
        match self.trainable {
            Trainable::Lora { .. } => Ok(ck.restore_adapter(self.model)?),
            Trainable::Full { params, .. } => {
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
            Trainable::Reward { rm, .. } => {
                let dir = ck.adapter_dir().ok_or_else(|| TrainError::State {
                    path: ck.dir.display().to_string(),
                    msg: "not a LoRA checkpoint: a reward-model run saves its adapters and head"
                        .into(),
                })?;
                Ok(restore_reward_adapter(rm, dir)?)
            }
        }
    }
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
        segments: match &c.segment_ids {
            Some(s) => Some(Tensor::from_vec(flat(s), (b, t), device)?),
            None => None,
        },
    })
}
