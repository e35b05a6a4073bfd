//! PPO for RLHF, one loop you can read top to bottom: prompts → one sampled completion each (our
//! own engine, behaviour log-probs recorded at sampling time) → scores (the caller's
//! [`Env`]: a reward model at the last token and/or reward functions) with TRL's
//! `missing_eos_penalty` → reference log-probs (adapters off) and values (no graph) →
//! KL-penalised per-token rewards, GAE advantages and returns ([`crate::ppo_loss::rollout`]) →
//! `num_ppo_epochs` passes over the rollout batch, reshuffled each time and cut into
//! `num_mini_batches` mini-batches, each one optimizer step over `grad_accum` micro-batches:
//! log-probs and values from one forward → clipped policy + value loss → backward → clip →
//! AdamW on the adapters and the value head → metrics under TRL 1.12's names → checkpoint.
//! The numbers follow TRL 1.12's `PPOTrainer` (the last TRL with PPO); the math is
//! [`crate::ppo_loss`], tested against it.
//!
//! # The value head
//!
//! A scalar linear head (H → 1 with bias, f32, zero-init) on the *policy's* last hidden
//! states, sharing the LoRA body: TRL's classic `AutoModelForCausalLMWithValueHead` + PEFT
//! recipe. One forward gives both the log-probs and the values and no second model is held in
//! memory; the value loss (× `vf_coef`) also trains the shared adapters. TRL 1.x's
//! `PPOTrainer` instead trains a separate value model (a whole `…ForSequenceClassification`
//! copy, usually started from the reward model) beside the policy: twice the trainable body
//! and two forwards per micro-batch, but no interference between the two losses. Zero init
//! makes V = 0 at the start, so nothing depends on a random draw. The head is saved in every
//! checkpoint as [`VALUE_HEAD_FILE`] under TRL's `ValueHead` names and restored on resume.
//!
//! # Batch shape (TRL)
//!
//! One step = one rollout batch of `batch_size × grad_accum × num_mini_batches` prompts with
//! one completion each, trained for `num_ppo_epochs` epochs of `num_mini_batches` optimizer
//! steps. Logged steps count rollout batches (TRL's `global_step`); the learning rate is
//! stepped once per rollout batch, as TRL's scheduler is.
//!
//! # Exact resume
//!
//! Checkpoints are written between rollout batches; sampling seeds, mini-batch orders and
//! dropout masks are pure functions of (seed, step, epoch, mini-batch), so a resumed run
//! samples and trains what the uninterrupted one did.
//!
//! Owns: the order of a PPO step and the value head. Does not own: text, reward functions or
//! the reward model (the env), the PPO formulas (`ppo_loss`), checkpoint files
//! (`ferrotune-ckpt`).

use std::time::Instant;

use candle_core::Tensor;
use ferrotune_data::{Loader, Shuffler};
use ferrotune_generate::{Finish, GenerateOptions, SamplingParams};
use ferrotune_models::CausalLm;
use ferrotune_nn::Mode;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::plan::LoopPlan;
use crate::ppo_loss::{
    explained_variance, ppo_loss, rollout, PpoConfig, PpoLossInputs, PpoLossStats, RolloutInputs,
};
use crate::rollout::{
    mean_std, report_failures, rows_tensor, sample, train_prompts, CompletionRecord, Env, Split,
};
use crate::trainer::{
    derive_seed, eval_hook, log_metrics, FirstLast, LoopCore, Outcome, RunCtx, Trainable, Trainer,
};
use crate::value_head::{policy_forward, MicroBatch};
pub use crate::value_head::{ValueHead, VALUE_HEAD_FILE, V_HEAD_BIAS, V_HEAD_WEIGHT};

/// The resolved PPO schedule.
#[derive(Debug, Clone)]
pub struct PpoPlan {
    /// Steps, batches, optimizer and cadence, as every trainer has them.
    pub run: LoopPlan,
    pub num_mini_batches: usize,
    pub num_ppo_epochs: usize,
    pub max_completion_len: usize,
    /// Sampling for rollouts (its seed is replaced per step).
    pub sampling: SamplingParams,
    pub loss: PpoConfig,
    /// Subtracted from the score of a completion that hit `max_completion_len` (TRL).
    pub missing_eos_penalty: Option<f64>,
    /// Write this step's completions every `log_every` steps.
    pub log_completions: bool,
    pub eos_ids: Vec<u32>,
}

impl PpoPlan {
    /// Completions per optimizer step.
    pub fn mini_batch_size(&self) -> usize {
        self.run.per_step()
    }
    /// Prompts (= completions) per rollout batch: a mini-batch per optimizer step.
    pub fn rollouts_per_step(&self) -> usize {
        self.num_mini_batches * self.mini_batch_size()
    }
    /// Checks that say why a plan cannot run.
    pub fn validate(&self) -> Result<()> {
        for (key, v) in [
            ("run.batch_size", self.run.batch_size),
            ("run.gradient_accumulation_steps", self.run.grad_accum),
            ("ppo.num_mini_batches", self.num_mini_batches),
            ("ppo.num_ppo_epochs", self.num_ppo_epochs),
            ("ppo.max_completion_len", self.max_completion_len),
        ] {
            if v == 0 {
                return Err(TrainError::invalid(
                    key,
                    format!("{key} must be at least 1"),
                ));
            }
        }
        if self.rollouts_per_step() < 2 {
            return Err(TrainError::invalid(
                "run.batch_size",
                "a rollout batch needs at least 2 completions: advantages are whitened \
                 over the batch (raise run.batch_size)",
            ));
        }
        if !(self.sampling.temperature > 0.0 && self.sampling.temperature.is_finite()) {
            return Err(TrainError::invalid(
                "ppo.temperature",
                "ppo.temperature must be positive (PPO needs sampled completions)",
            ));
        }
        if self.missing_eos_penalty.is_some_and(|p| !p.is_finite()) {
            return Err(TrainError::invalid(
                "ppo.missing_eos_penalty",
                "ppo.missing_eos_penalty must be a finite number",
            ));
        }
        Ok(self.loss.validate()?)
    }
}

/// What the loop saves besides weights, value head and optimizer moments.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PpoState {
    #[serde(flatten)]
    pub core: LoopCore,
    /// Completions sampled so far (TRL's `episode`).
    pub episodes: u64,
}

/// The outcome of a run.
#[derive(Debug, Clone, Default)]
pub struct PpoSummary {
    pub run: Outcome,
    /// Mean score (`objective/scores`) of the first and last rollout batches of this run.
    pub score: FirstLast,
    /// `objective/kl` of the last rollout batch, and the largest seen.
    pub last_kl: Option<f64>,
    pub max_kl: f64,
}

/// Means of the micro-batch loss stats, and the unbiased variance of their ratio means (TRL's
/// `val/ratio_var`).
fn mean_stats(stats: &[PpoLossStats]) -> Vec<(&'static str, f64)> {
    let n = stats.len().max(1) as f64;
    let avg = |f: fn(&PpoLossStats) -> f64| stats.iter().map(f).sum::<f64>() / n;
    let ratio = avg(|s| s.ratio_mean);
    let ratio_var = if stats.len() > 1 {
        stats
            .iter()
            .map(|s| (s.ratio_mean - ratio).powi(2))
            .sum::<f64>()
            / (n - 1.0)
    } else {
        0.0
    };
    vec![
        ("policy/approxkl_avg", avg(|s| s.approxkl)),
        ("policy/clipfrac_avg", avg(|s| s.pg_clipfrac)),
        ("loss/policy_avg", avg(|s| s.pg_loss)),
        ("loss/value_avg", avg(|s| s.vf_loss)),
        ("val/clipfrac_avg", avg(|s| s.vf_clipfrac)),
        ("val/ratio", ratio),
        ("val/ratio_var", ratio_var),
    ]
}

/// Run PPO from step 0, or from `resume`, up to `plan.run.total_steps` rollout batches. `head` is
/// trained with the adapters of `trainable`.
pub fn train_ppo(
    model: &dyn CausalLm,
    trainable: &Trainable,
    head: &ValueHead,
    env: &mut dyn Env,
    plan: &PpoPlan,
    ctx: RunCtx,
) -> Result<PpoSummary> {
    let (run, resume, obs, device) = ctx.parts();
    plan.validate()?;
    let n_train = train_prompts(env)?;
    let mut t = Trainer::with_extra_params(model, trainable, head.params(), &plan.run, run)?;
    let fresh = PpoState {
        core: LoopCore::new(&plan.run),
        episodes: 0,
    };
    let mut state = t.start(resume, fresh, obs)?;
    if let Some(ck) = resume {
        let file = ck.dir.join(VALUE_HEAD_FILE);
        let saved = ck
            .extra_tensors(VALUE_HEAD_FILE)?
            .ok_or_else(|| TrainError::State {
                path: ck.dir.display().to_string(),
                msg: format!("no {VALUE_HEAD_FILE}: not a PPO checkpoint"),
            })?;
        head.restore(&saved, &file)?;
    }
    let mut loader = Loader::resume(n_train, plan.run.shuffler(), state.core.cursor)?;
    let labels = env.reward_labels();
    let temp = plan.sampling.temperature;
    let seed = plan.run.seed;
    let mut summary = PpoSummary {
        run: Outcome::at(state.core.step),
        ..Default::default()
    };
    let t_run = Instant::now();
    let episodes_at_start = state.episodes;
    while state.core.step < plan.run.total_steps {
        let t_step = Instant::now();
        let step = state.core.step as u64;
        // 1. Rollouts: one completion per prompt, sampled by our engine, scored by the env.
        let n = plan.rollouts_per_step();
        let items = loader.next_batch(n)?;
        let opts = GenerateOptions {
            sampling: SamplingParams {
                seed: derive_seed(seed, step.wrapping_add(0x5eed)),
                ..plan.sampling.clone()
            },
            max_new_tokens: plan.max_completion_len,
            eos_ids: plan.eos_ids.clone(),
            pad_id: plan.run.pad_id,
            mode: Mode::EVAL,
        };
        let ro = sample(model, env, Split::Train, items, &opts, device)?;
        let (items, gens) = (&ro.items, &ro.gens);
        state.episodes += n as u64;

        // 2. Scores: Σ weight · score per completion; TRL's missing-EOS penalty.
        let failed = report_failures(env, state.core.step + 1, obs);
        let unscorable = ro.totals.iter().filter(|t| !t.is_finite()).count();
        let mut scores: Vec<f64> = ro
            .totals
            .iter()
            .map(|&t| if t.is_finite() { t } else { 0.0 })
            .collect();
        let truncated: Vec<bool> = gens.iter().map(|g| g.finish == Finish::Length).collect();
        if let Some(p) = plan.missing_eos_penalty {
            for (s, &cut) in scores.iter_mut().zip(&truncated) {
                if cut {
                    *s -= p;
                }
            }
        }

        // 3. Old log-probs (the sampler's), reference log-probs and old values, per micro-batch.
        let lens: Vec<usize> = gens.iter().map(|g| g.ids.len()).collect();
        let width = lens.iter().copied().max().unwrap_or(0);
        let old_lp: Vec<Vec<f32>> = gens.iter().map(|g| g.logprobs.clone()).collect();
        let old_lp = rows_tensor(&old_lp, width, device)?; // (B, T)
        let (mut ref_rows, mut value_rows) = (Vec::new(), Vec::new());
        let all: Vec<usize> = (0..n).collect();
        for chunk in all.chunks(plan.run.batch_size) {
            let mb = MicroBatch::new(env, items, gens, chunk, width, plan.run.pad_id);
            let (_, v) = policy_forward(model, Some(head), &mb, temp, false, Mode::EVAL, device)?;
            let (r, _) = policy_forward(model, None, &mb, temp, true, Mode::REFERENCE, device)?;
            ref_rows.extend(r);
            value_rows.extend(v);
        }
        let ref_lp = Tensor::cat(&ref_rows, 0)?; // (B, T)
        let values = Tensor::cat(&value_rows, 0)?; // (B, T)
        let score_t = Tensor::from_vec(
            scores.iter().map(|&s| s as f32).collect::<Vec<f32>>(),
            n,
            device,
        )?; // (B,)

        // 4. KL-penalised rewards, GAE advantages (whitened) and returns.
        let adv = rollout(
            &RolloutInputs {
                logprobs: &old_lp,
                ref_logprobs: &ref_lp,
                values: &values,
                scores: &score_t,
                lengths: &lens,
            },
            &plan.loss,
        )?;
        let ev = explained_variance(&adv.returns, &adv.values, &adv.masks.value).ok();

        // 5. PPO epochs over shuffled mini-batches; one optimizer step per mini-batch.
        let t_train = Instant::now();
        let lr = plan.run.lr_at(state.core.step);
        let mut stats: Vec<PpoLossStats> = Vec::new();
        let mut norms: Vec<f64> = Vec::new();
        let shuffler = Shuffler::new(derive_seed(seed, step ^ 0x99), true);
        for epoch in 0..plan.num_ppo_epochs {
            let order = shuffler.epoch_order(n, epoch as u64);
            for (m, mini) in order.chunks(plan.mini_batch_size()).enumerate() {
                let n_micro = mini.len().div_ceil(plan.run.batch_size);
                for (k, micro) in mini.chunks(plan.run.batch_size).enumerate() {
                    let mb = MicroBatch::new(env, items, gens, micro, width, plan.run.pad_id);
                    let counter =
                        (step << 32) | ((epoch as u64) << 20) | ((m as u64) << 10) | k as u64;
                    let mode = Mode::train_with_seed(derive_seed(seed, counter));
                    let (lp, v) = policy_forward(model, Some(head), &mb, temp, true, mode, device)?;
                    let (Some(lp), Some(v)) = (lp, v) else {
                        return Err(TrainError::Internal("policy forward lost its outputs"));
                    };
                    let idx: Vec<u32> = micro.iter().map(|&j| j as u32).collect();
                    let idx = Tensor::new(idx, device)?;
                    let pick = |t: &Tensor| t.index_select(&idx, 0); // (b, T)
                    let out = ppo_loss(
                        &PpoLossInputs {
                            logprobs: &lp,
                            old_logprobs: &pick(&old_lp)?,
                            advantages: &pick(&adv.advantages)?,
                            values: &v,
                            old_values: &pick(&adv.values)?,
                            returns: &pick(&adv.returns)?,
                            response_mask: &pick(&adv.masks.response)?,
                            value_mask: &pick(&adv.masks.value)?,
                        },
                        &plan.loss,
                    )?;
                    // Each micro-batch loss is its own masked mean; dividing by the number of
                    // micro-batches makes the summed gradient the mini-batch's (TRL through
                    // accelerate).
                    t.backward(&(out.loss / n_micro as f64)?)?;
                    stats.push(out.stats);
                }
                norms.push(t.update(&mut state.core, lr, obs)?.grad_norm);
            }
        }
        let train_secs = t_train.elapsed().as_secs_f64();
        state.core.advance(loader.cursor());
        let step = state.core.step;
        summary.run.step_done(step, &t);
        let rs = &adv.stats;
        summary.score.see(rs.scores);
        summary.last_kl = Some(rs.kl);
        summary.max_kl = summary.max_kl.max(rs.kl);

        // 6. Completions, metrics, eval hook, checkpoint.
        if plan.log_completions && (step.is_multiple_of(plan.run.log_every) || step == 1) {
            let a = adv.advantages.to_vec2::<f32>()?;
            let recs: Vec<CompletionRecord> = (0..n)
                .map(|i| CompletionRecord {
                    item: items[i],
                    ids: gens[i].ids.clone(),
                    rewards: ro.scores.iter().map(|s| s[i]).collect(),
                    total: scores[i],
                    // Mean advantage over the row's response tokens.
                    advantage: a[i][..lens[i]].iter().map(|&a| a as f64).sum::<f64>()
                        / lens[i].max(1) as f64,
                    finish: gens[i].finish,
                    injected: Vec::new(),
                })
                .collect();
            env.record(step, &recs);
        }
        if plan.run.is_log_step(step) || step == 1 {
            let mut values: Vec<(String, f64)> = vec![
                ("objective/scores".into(), rs.scores),
                ("objective/kl".into(), rs.kl),
                ("objective/entropy".into(), rs.entropy),
                ("objective/non_score_reward".into(), rs.non_score_reward),
                ("objective/rlhf_reward".into(), rs.rlhf_reward),
            ];
            values.extend(mean_stats(&stats).into_iter().map(|(k, v)| (k.into(), v)));
            if let Some(ev) = ev.filter(|e| e.is_finite()) {
                values.push(("val/explained_variance".into(), ev));
            }
            let eos = gens
                .iter()
                .flat_map(|g| &g.ids)
                .filter(|t| plan.eos_ids.contains(t))
                .count();
            values.push(("val/num_eos_tokens".into(), eos as f64));
            values.extend(ro.reward_metrics(&labels).0);
            if failed > 0 {
                values.push(("rewards/failures".into(), failed as f64));
            }
            if unscorable > 0 {
                values.push(("rewards/unscorable".into(), unscorable as f64));
            }
            values.push(("completions/mean_length".into(), mean_std(&ro.lengths()).0));
            values.push(("completions/clipped_ratio".into(), ro.clipped_ratio()));
            values.push(("grad_norm".into(), mean_std(&norms).0));
            values.push(("lr".into(), lr));
            values.push(("episode".into(), state.episodes as f64));
            values.push((
                "eps".into(),
                (state.episodes - episodes_at_start) as f64 / t_run.elapsed().as_secs_f64(),
            ));
            values.push(("tokens_per_s/rollout".into(), ro.tokens_per_s()));
            values.push(("train_seconds".into(), train_secs));
            values.push(("step_seconds".into(), t_step.elapsed().as_secs_f64()));
            log_metrics(obs, step, &values);
        }
        if plan.run.is_eval_step(step) && eval_hook(obs, step, model)? {
            summary.run.stopped_early = true;
            break;
        }
        if plan.run.is_save_step(step) {
            let head_tensors = head.tensors()?;
            let extra = [(VALUE_HEAD_FILE, head_tensors.as_slice())];
            summary.run.last_checkpoint = Some(t.save_with(step, &state, &extra, obs)?);
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_var_is_the_unbiased_variance_of_micro_batch_ratios() {
        let s = |r: f64| PpoLossStats {
            pg_loss: 0.0,
            vf_loss: 0.0,
            pg_clipfrac: 0.0,
            vf_clipfrac: 0.0,
            approxkl: 0.0,
            ratio_mean: r,
        };
        let m = mean_stats(&[s(1.0), s(1.2), s(0.8)]);
        let get = |k: &str| m.iter().find(|(n, _)| *n == k).unwrap().1;
        assert!((get("val/ratio") - 1.0).abs() < 1e-12);
        // torch.tensor([1.0, 1.2, 0.8]).var() = 0.04
        assert!((get("val/ratio_var") - 0.04).abs() < 1e-12);
    }
}
