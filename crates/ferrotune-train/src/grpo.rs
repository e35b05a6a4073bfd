//! GRPO (group relative policy optimisation) for verifiable rewards, one loop you can read top
//! to bottom: prompts → G sampled completions each (our own engine, behaviour log-probs recorded
//! at sampling time) → rewards (via the caller's [`GrpoEnv`]: text and reward functions live
//! outside this crate) → group-relative advantages → μ optimizer steps over that batch, each:
//! policy log-probs per micro-batch (+ reference log-probs with adapters off when β ≠ 0) → loss
//! by `loss_type` → backward (accumulated) → clip → AdamW → metrics, health checks, checkpoint.
//!
//! Batch shape follows TRL: one optimizer step consumes `batch_size × grad_accum` completions
//! (= that / G prompts); a generation batch is reused for `num_iterations` steps.
//!
//! Exact resume: checkpoints are written only at generation boundaries (step divisible by μ),
//! where the state is (weights, optimizer moments, data cursor, step, the health checks' recent
//! history); rollouts are a pure function of (weights, seed, round), so a resumed run samples,
//! logs and reports what the uninterrupted one did.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ferrotune_ckpt::{prune, Checkpoint, RunDir};
use ferrotune_data::{collate_right, Cursor, Loader, Shuffler, Tokenized};
use ferrotune_generate::{generate, Finish, GenerateOptions, Generation, SamplingParams};
use ferrotune_models::CausalLm;
use ferrotune_nn::{splitmix64, Mode};
use serde::{Deserialize, Serialize};

use crate::grpo_loss::{
    advantages, group_stats, grpo_loss, LossConfig, LossInputs, LossType, ScaleRewards,
};
use crate::health::{HealthMonitor, HealthStats};
use crate::loss::scored_logprobs;
use crate::optim::AdamW;
use crate::plan::LoopPlan;
use crate::sft::{
    apply_update, batch_tensors, resume_from, save, Observer, Result, TrainError, Trainable,
};
use crate::step::{GradAccumulator, NonFiniteGuard};

/// Which prompt set an item comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Eval,
}

/// The text side of GRPO, supplied by the caller: prompts as ids, stop rules, and scoring of
/// decoded completions with the reward functions.
pub trait GrpoEnv {
    /// Number of prompts in `split`.
    fn len(&self, split: Split) -> usize;
    /// Prompt ids of item `index` of `split` (already truncated to the prompt budget).
    fn prompt_ids(&self, split: Split, index: usize) -> &[u32];
    /// One label per reward function (log keys), in scoring order.
    fn reward_labels(&self) -> Vec<String>;
    /// Weights of the reward functions (total = Σ weight · score over applicable scores).
    fn reward_weights(&self) -> Vec<f64>;
    /// Which labels measure correctness and which format (for the health checks).
    fn reward_roles(&self) -> Vec<RewardRole> {
        vec![RewardRole::Other; self.reward_labels().len()]
    }
    /// Scores of each completion by each reward: `[reward][completion]`; None = not applicable.
    fn score(
        &mut self,
        split: Split,
        items: &[usize],
        gens: &[Generation],
    ) -> std::result::Result<Vec<Vec<Option<f64>>>, String>;
    /// A caller's stop rule on the ids generated so far (e.g. a stop string); false = none.
    fn stop(&self, _ids: &[u32]) -> bool {
        false
    }
    /// A sample of this step's completions, to be written to `completions.jsonl`.
    fn record(&mut self, _step: usize, _rows: &[CompletionRecord]) {}
    /// Problems met while scoring since the last call (e.g. a user scorer that crashed), as
    /// lines for the user, and how many samples could not be judged.
    fn drain_failures(&mut self) -> (Vec<String>, usize) {
        (Vec::new(), 0)
    }
}

/// What a reward function measures, for the health checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardRole {
    Correctness,
    Format,
    Other,
}

/// One completion of a step, as logged.
#[derive(Debug, Clone)]
pub struct CompletionRecord {
    pub item: usize,
    pub ids: Vec<u32>,
    pub rewards: Vec<Option<f64>>,
    pub total: f64,
    pub advantage: f64,
    pub finish: Finish,
}

/// The resolved GRPO schedule.
#[derive(Debug, Clone)]
pub struct GrpoPlan {
    /// Steps, batches, optimizer and cadence, as every trainer has them.
    pub run: LoopPlan,
    /// G: completions per prompt.
    pub num_generations: usize,
    /// μ: optimizer steps per generation batch.
    pub num_iterations: usize,
    pub max_completion_len: usize,
    /// Sampling for rollouts (its seed is replaced per round).
    pub sampling: SamplingParams,
    pub loss_type: LossType,
    pub scale_rewards: ScaleRewards,
    pub epsilon: f64,
    pub epsilon_high: f64,
    pub beta: f64,
    pub mask_truncated_completions: bool,
    /// Write a sample of completions every `log_every` steps.
    pub log_completions: bool,
    pub eos_ids: Vec<u32>,
}

impl GrpoPlan {
    /// Completions per generation batch (= per optimizer step).
    pub fn completions_per_step(&self) -> usize {
        self.run.batch_size * self.run.grad_accum
    }
    /// Prompts per generation batch.
    pub fn prompts_per_step(&self) -> usize {
        self.completions_per_step() / self.num_generations.max(1)
    }
    /// Checks that say why a plan cannot run.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.num_generations < 2 {
            return Err(
                "grpo.num_generations must be at least 2 (advantages are relative to the group)"
                    .into(),
            );
        }
        if !self
            .completions_per_step()
            .is_multiple_of(self.num_generations)
        {
            return Err(format!(
                "run.batch_size × run.gradient_accumulation_steps = {} completions per step must be divisible by grpo.num_generations = {}",
                self.completions_per_step(),
                self.num_generations
            ));
        }
        if self.num_iterations == 0 {
            return Err("grpo.num_iterations must be at least 1".into());
        }
        if self.max_completion_len == 0 {
            return Err("grpo.max_completion_len must be at least 1".into());
        }
        Ok(())
    }
}

/// What the loop saves besides weights and optimizer moments.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GrpoState {
    pub step: usize,
    pub cursor: Cursor,
    pub guard: NonFiniteGuard,
    pub seed: u64,
    pub rollout_tokens: u64,
    /// The health checks' recent history, so a resumed run reports what the straight one
    /// would (absent in checkpoints written before it was saved: the checks start afresh).
    #[serde(default)]
    pub health: Option<HealthMonitor>,
}

/// The outcome of a run.
#[derive(Debug, Clone, Default)]
pub struct GrpoSummary {
    pub steps: usize,
    /// Mean total reward of the first and last generation batches.
    pub first_reward: Option<f64>,
    pub last_reward: Option<f64>,
    /// Mean total reward of the first and last eval (greedy) passes.
    pub first_eval_reward: Option<f64>,
    pub last_eval_reward: Option<f64>,
    /// Largest |ratio − 1| seen on a first iteration (sampler vs trainer log-probs).
    pub max_first_ratio_dev: f64,
    pub skipped_steps: usize,
    pub last_checkpoint: Option<std::path::PathBuf>,
    pub findings: Vec<crate::health::Finding>,
    /// The eval hook stopped the run (regression gate).
    pub stopped_early: bool,
}

/// One generation batch: completions, their scores and advantages, and cached tensors.
struct Rollout {
    items: Vec<usize>,
    gens: Vec<Generation>,
    advantages: Vec<f64>,
    /// Reference log-probs per micro-batch ((B, Tc) each) when β ≠ 0.
    ref_logps: Vec<Option<Tensor>>,
}

/// Sequences (prompt + completion) of completions `range` and their completion masks.
pub(crate) fn micro_batch(
    env: &dyn GrpoEnv,
    split: Split,
    items: &[usize],
    gens: &[Generation],
    pad_id: u32,
) -> (ferrotune_data::Collated, Vec<usize>) {
    let seqs: Vec<Tokenized> = items
        .iter()
        .zip(gens)
        .map(|(&it, g)| {
            let p = env.prompt_ids(split, it);
            let mut ids = p.to_vec();
            ids.extend_from_slice(&g.ids);
            let mut loss_mask = vec![0u8; p.len()];
            loss_mask.extend(std::iter::repeat_n(1u8, g.ids.len()));
            Tokenized {
                ids,
                loss_mask,
                truncated: false,
                tokens_dropped: 0,
            }
        })
        .collect();
    let refs: Vec<&Tokenized> = seqs.iter().collect();
    (
        collate_right(&refs, pad_id),
        gens.iter().map(|g| g.ids.len()).collect(),
    )
}

/// Flat row-major per-token values (N,) → (B, Tc) right-padded with zeros.
pub(crate) fn to_rows(flat: &Tensor, lens: &[usize], width: usize) -> candle_core::Result<Tensor> {
    let mut rows = Vec::with_capacity(lens.len());
    let mut off = 0;
    for &l in lens {
        let row = if l == 0 {
            Tensor::zeros(width, DType::F32, flat.device())?
        } else {
            flat.narrow(0, off, l)?.pad_with_zeros(0, 0, width - l)?
        };
        rows.push(row.unsqueeze(0)?); // (1, Tc)
        off += l;
    }
    Tensor::cat(&rows, 0) // (B, Tc)
}

/// (B, Tc) tensor of per-row values padded with zeros.
pub(crate) fn rows_tensor(
    rows: &[Vec<f32>],
    width: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let mut flat = Vec::with_capacity(rows.len() * width);
    for r in rows {
        flat.extend_from_slice(r);
        flat.extend(std::iter::repeat_n(0.0f32, width - r.len()));
    }
    Tensor::from_vec(flat, (rows.len(), width), device)
}

/// Mean and (population) std of the finite values.
pub(crate) fn mean_std(xs: &[f64]) -> (f64, f64) {
    let xs: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let m = xs.iter().sum::<f64>() / xs.len() as f64;
    let v = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / xs.len() as f64;
    (m, v.sqrt())
}

/// Total reward per completion: Σ weight · score over the applicable scores; NaN when no
/// reward function applies (TRL: such a completion is left out of the group statistics and
/// gets advantage 0).
pub fn weighted_totals(per_reward: &[Vec<Option<f64>>], weights: &[f64], n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| {
            let applicable: Vec<f64> = per_reward
                .iter()
                .zip(weights)
                .filter_map(|(s, w)| s[i].map(|v| v * w))
                .collect();
            if applicable.is_empty() {
                f64::NAN
            } else {
                applicable.iter().sum()
            }
        })
        .collect()
}

/// Greedy completions of every eval prompt, scored: mean total and mean per reward.
pub fn eval_rewards(
    model: &dyn CausalLm,
    env: &mut dyn GrpoEnv,
    plan: &GrpoPlan,
    device: &Device,
) -> Result<Option<(f64, Vec<f64>)>> {
    let n = env.len(Split::Eval);
    if n == 0 {
        return Ok(None);
    }
    let labels = env.reward_labels();
    let weights = env.reward_weights();
    let mut totals = Vec::with_capacity(n);
    let mut per: Vec<Vec<f64>> = vec![vec![]; labels.len()];
    let chunk = plan.completions_per_step().max(1);
    let all: Vec<usize> = (0..n).collect();
    for items in all.chunks(chunk) {
        let prompts: Vec<Vec<u32>> = items
            .iter()
            .map(|&i| env.prompt_ids(Split::Eval, i).to_vec())
            .collect();
        let opts = GenerateOptions {
            sampling: SamplingParams {
                temperature: 0.0,
                top_k: None,
                top_p: None,
                seed: 0,
            },
            max_new_tokens: plan.max_completion_len,
            eos_ids: plan.eos_ids.clone(),
            pad_id: plan.run.pad_id,
            mode: Mode::EVAL,
        };
        let gens = {
            let envr: &dyn GrpoEnv = env;
            generate(model, &prompts, &opts, &|_, ids| envr.stop(ids), device)?
        };
        let scores = env
            .score(Split::Eval, items, &gens)
            .map_err(TrainError::Plan)?;
        totals.extend(weighted_totals(&scores, &weights, gens.len()));
        for (k, s) in scores.iter().enumerate() {
            per[k].extend(s.iter().flatten());
        }
    }
    let means = per.iter().map(|v| mean_std(v).0).collect();
    Ok(Some((mean_std(&totals).0, means)))
}

/// Eval pass at `step`, logged as `eval/reward` and `eval/rewards/<label>/mean`.
#[allow(clippy::too_many_arguments)]
fn log_eval(
    model: &dyn CausalLm,
    env: &mut dyn GrpoEnv,
    plan: &GrpoPlan,
    step: usize,
    labels: &[String],
    obs: &mut dyn Observer,
    summary: &mut GrpoSummary,
    device: &Device,
) -> Result<()> {
    if let Some((total, per)) = eval_rewards(model, env, plan, device)? {
        summary.first_eval_reward.get_or_insert(total);
        summary.last_eval_reward = Some(total);
        let mut values = vec![("eval/reward".to_string(), total)];
        for (l, m) in labels.iter().zip(&per) {
            if m.is_finite() {
                values.push((format!("eval/rewards/{l}/mean"), *m));
            }
        }
        let refs: Vec<(&str, f64)> = values.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        obs.metrics(step, &refs);
    }
    Ok(())
}

/// Run GRPO from step 0, or from `resume`, up to `plan.run.total_steps`.
#[allow(clippy::too_many_arguments)]
pub fn train_grpo(
    model: &dyn CausalLm,
    trainable: &Trainable,
    env: &mut dyn GrpoEnv,
    plan: &GrpoPlan,
    run: &RunDir,
    resume: Option<&Checkpoint>,
    obs: &mut dyn Observer,
    device: &Device,
) -> Result<GrpoSummary> {
    plan.validate().map_err(TrainError::Plan)?;
    let n_train = env.len(Split::Train);
    if n_train == 0 {
        return Err(TrainError::Plan("no training prompts".into()));
    }
    let params = trainable.params().to_vec();
    let mut opt = AdamW::new(params.clone(), plan.run.adamw)?;
    let mut state = GrpoState {
        step: 0,
        cursor: Cursor::default(),
        guard: NonFiniteGuard::new(plan.run.max_nonfinite_steps),
        seed: plan.run.seed,
        rollout_tokens: 0,
        health: None,
    };
    if let Some(ck) = resume {
        state = resume_from(ck, trainable, model, &mut opt, obs, |s: &GrpoState| s.step)?;
    }
    let mut health = state
        .health
        .take()
        .unwrap_or_else(|| HealthMonitor::new(plan.loss_type));
    health.set_loss_type(plan.loss_type);
    let mut loader = Loader::resume(
        n_train,
        Shuffler::new(plan.run.seed, plan.run.shuffle),
        state.cursor,
    )?;
    let labels = env.reward_labels();
    let weights = env.reward_weights();
    let roles = env.reward_roles();
    let g = plan.num_generations;
    let mut summary = GrpoSummary {
        steps: state.step,
        ..Default::default()
    };
    let mut acc = GradAccumulator::new(&params);
    let mut rollout: Option<Rollout> = None;
    // A baseline eval before the first update, so every run reports before / after.
    if plan.run.eval_every > 0 && state.step == 0 {
        log_eval(model, env, plan, 0, &labels, obs, &mut summary, device)?;
    }
    while state.step < plan.run.total_steps {
        let t_step = Instant::now();
        let iteration = state.step % plan.num_iterations;
        let mut rollout_metrics: Vec<(String, f64)> = Vec::new();
        // 1. A new generation batch every μ steps: sample, score, advantages.
        if iteration == 0 || rollout.is_none() {
            let round = (state.step / plan.num_iterations) as u64;
            let prompts_idx = loader.next_batch(plan.prompts_per_step())?;
            let items: Vec<usize> = prompts_idx
                .iter()
                .flat_map(|&i| std::iter::repeat_n(i, g))
                .collect();
            let prompts: Vec<Vec<u32>> = items
                .iter()
                .map(|&i| env.prompt_ids(Split::Train, i).to_vec())
                .collect();
            let opts = GenerateOptions {
                sampling: SamplingParams {
                    seed: splitmix64(plan.run.seed ^ splitmix64(round.wrapping_add(0x5eed))),
                    ..plan.sampling.clone()
                },
                max_new_tokens: plan.max_completion_len,
                eos_ids: plan.eos_ids.clone(),
                pad_id: plan.run.pad_id,
                mode: Mode::EVAL,
            };
            let t_gen = Instant::now();
            let gens = {
                let envr: &dyn GrpoEnv = env;
                generate(model, &prompts, &opts, &|_, ids| envr.stop(ids), device)?
            };
            let gen_secs = t_gen.elapsed().as_secs_f64();
            let new_tokens: usize = gens.iter().map(|g| g.ids.len()).sum();
            state.rollout_tokens += new_tokens as u64;
            let scores = env
                .score(Split::Train, &items, &gens)
                .map_err(TrainError::Plan)?;
            let (notes, failed) = env.drain_failures();
            for n in notes {
                obs.message(&format!("step {}: {n}", state.step + 1));
            }
            if failed > 0 {
                rollout_metrics.push(("rewards/failures".into(), failed as f64));
            }
            let totals = weighted_totals(&scores, &weights, gens.len());
            let adv = advantages(&totals, g, plan.scale_rewards)
                .map_err(|e| TrainError::Plan(e.to_string()))?;
            let gstats = group_stats(&totals, g).map_err(|e| TrainError::Plan(e.to_string()))?;
            // Reference log-probs once per generation batch (adapters off, no graph).
            let mut ref_logps = Vec::new();
            for start in (0..gens.len()).step_by(plan.run.batch_size) {
                let end = (start + plan.run.batch_size).min(gens.len());
                if plan.beta == 0.0 {
                    ref_logps.push(None);
                    continue;
                }
                let (c, lens) = micro_batch(
                    env,
                    Split::Train,
                    &items[start..end],
                    &gens[start..end],
                    plan.run.pad_id,
                );
                let batch = batch_tensors(&c, device)?;
                let (lp, _) = scored_logprobs(
                    model,
                    &batch,
                    &c.loss_mask,
                    plan.sampling.temperature.max(1e-6),
                    Mode::REFERENCE,
                )?;
                let width = lens.iter().copied().max().unwrap_or(0);
                ref_logps.push(Some(to_rows(&lp, &lens, width)?));
            }
            // Metrics of the rollout.
            let lens: Vec<f64> = gens.iter().map(|g| g.ids.len() as f64).collect();
            let (len_mean, _) = mean_std(&lens);
            let truncated = gens.iter().filter(|g| g.finish == Finish::Length).count();
            let (r_mean, r_std) = (gstats.reward_mean, gstats.reward_std);
            let (a_mean, a_std) = mean_std(&adv);
            let zero_std_frac = gstats.frac_zero_std();
            rollout_metrics.push(("reward".into(), r_mean));
            rollout_metrics.push(("reward_std".into(), r_std));
            let mut per_means = Vec::with_capacity(labels.len());
            for (k, label) in labels.iter().enumerate() {
                let vals: Vec<f64> = scores[k].iter().flatten().copied().collect();
                let (m, s) = mean_std(&vals);
                per_means.push(m);
                if !vals.is_empty() {
                    rollout_metrics.push((format!("rewards/{label}/mean"), m));
                    rollout_metrics.push((format!("rewards/{label}/std"), s));
                }
            }
            rollout_metrics.push(("advantage/mean".into(), a_mean));
            rollout_metrics.push(("advantage/std".into(), a_std));
            rollout_metrics.push((
                "advantage/max_abs".into(),
                adv.iter().fold(0.0f64, |m, a| m.max(a.abs())),
            ));
            rollout_metrics.push(("frac_reward_zero_std".into(), zero_std_frac));
            if gstats.unscorable > 0 {
                rollout_metrics.push(("rewards/unscorable".into(), gstats.unscorable as f64));
            }
            rollout_metrics.push(("completions/mean_length".into(), len_mean));
            rollout_metrics.push((
                "completions/min_length".into(),
                lens.iter().copied().fold(f64::INFINITY, f64::min),
            ));
            rollout_metrics.push((
                "completions/max_length".into(),
                lens.iter().copied().fold(0.0, f64::max),
            ));
            rollout_metrics.push((
                "completions/clipped_ratio".into(),
                truncated as f64 / gens.len() as f64,
            ));
            rollout_metrics.push(("tokens_per_s/rollout".into(), new_tokens as f64 / gen_secs));
            // Lengths of right vs wrong answers (correctness = first correctness reward, else
            // the total above / below the batch midpoint).
            let right: Vec<bool> = match roles.iter().position(|r| *r == RewardRole::Correctness) {
                Some(k) => scores[k].iter().map(|s| s.unwrap_or(0.0) >= 1.0).collect(),
                None => {
                    let lo = totals.iter().copied().fold(f64::INFINITY, f64::min);
                    let hi = totals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    totals
                        .iter()
                        .map(|&t| hi > lo && t > (lo + hi) / 2.0)
                        .collect()
                }
            };
            let pick = |want: bool| -> Vec<f64> {
                lens.iter()
                    .zip(&right)
                    .filter(|(_, &r)| r == want)
                    .map(|(&l, _)| l)
                    .collect()
            };
            let (len_right, len_wrong) = (pick(true), pick(false));
            if !len_right.is_empty() {
                rollout_metrics.push((
                    "completions/mean_length_right".into(),
                    mean_std(&len_right).0,
                ));
            }
            if !len_wrong.is_empty() {
                rollout_metrics.push((
                    "completions/mean_length_wrong".into(),
                    mean_std(&len_wrong).0,
                ));
            }
            summary.first_reward.get_or_insert(r_mean);
            summary.last_reward = Some(r_mean);
            let hs = HealthStats {
                step: state.step + 1,
                reward_mean: r_mean,
                reward_means: labels
                    .iter()
                    .zip(&roles)
                    .zip(&per_means)
                    .map(|((l, r), m)| (l.clone(), *r, *m))
                    .collect(),
                len_mean,
                len_right: (!len_right.is_empty()).then(|| mean_std(&len_right).0),
                len_wrong: (!len_wrong.is_empty()).then(|| mean_std(&len_wrong).0),
                truncated_frac: truncated as f64 / gens.len() as f64,
                zero_std_frac,
                kl: None,
            };
            health.push_rollout(hs);
            if plan.log_completions
                && (state.step.is_multiple_of(plan.run.log_every) || state.step == 0)
            {
                let recs: Vec<CompletionRecord> = (0..gens.len())
                    .map(|i| CompletionRecord {
                        item: items[i],
                        ids: gens[i].ids.clone(),
                        rewards: scores.iter().map(|s| s[i]).collect(),
                        total: totals[i],
                        advantage: adv[i],
                        finish: gens[i].finish,
                    })
                    .collect();
                env.record(state.step + 1, &recs);
            }
            rollout = Some(Rollout {
                items,
                gens,
                advantages: adv,
                ref_logps,
            });
        }
        let ro = rollout.as_ref().expect("rollout made above");
        // 2. Loss over every micro-batch of the generation batch, gradients summed.
        let t_train = Instant::now();
        let total_tokens: usize = ro
            .gens
            .iter()
            .filter(|g| !(plan.mask_truncated_completions && g.finish == Finish::Length))
            .map(|g| g.ids.len())
            .sum();
        let loss_cfg = LossConfig {
            loss_type: plan.loss_type,
            epsilon_low: plan.epsilon,
            epsilon_high: plan.epsilon_high,
            beta: plan.beta,
            max_completion_len: plan.max_completion_len,
            num_items_in_batch: Some(total_tokens as f64),
            accum_steps: ro.gens.len().div_ceil(plan.run.batch_size),
        };
        let n_micro = loss_cfg.accum_steps;
        let (mut loss_sum, mut kl_sum, mut kl_n) = (0.0f64, 0.0f64, 0usize);
        let (mut clip_lo, mut clip_hi, mut clip_reg, mut ratio_mean) = (0.0, 0.0, 0.0, 0.0);
        let mut ratio_dev = 0.0f64;
        let mut seq_tokens = 0usize;
        for (k, start) in (0..ro.gens.len()).step_by(plan.run.batch_size).enumerate() {
            let end = (start + plan.run.batch_size).min(ro.gens.len());
            let gens = &ro.gens[start..end];
            let (c, lens) = micro_batch(
                env,
                Split::Train,
                &ro.items[start..end],
                gens,
                plan.run.pad_id,
            );
            seq_tokens += c.shape().0 * c.shape().1;
            let width = lens.iter().copied().max().unwrap_or(0);
            if width == 0 {
                continue;
            }
            let batch = batch_tensors(&c, device)?;
            let mode = Mode::train_with_seed(splitmix64(
                plan.run.seed ^ splitmix64(((state.step as u64) << 16) | k as u64),
            ));
            let (lp, _) = scored_logprobs(
                model,
                &batch,
                &c.loss_mask,
                plan.sampling.temperature.max(1e-6),
                mode,
            )?;
            let logps = to_rows(&lp, &lens, width)?; // (B, Tc)
            let old: Vec<Vec<f32>> = gens.iter().map(|g| g.logprobs.clone()).collect();
            let old = rows_tensor(&old, width, device)?; // (B, Tc)
            let mask: Vec<Vec<f32>> = gens
                .iter()
                .map(|g| {
                    let on = !(plan.mask_truncated_completions && g.finish == Finish::Length);
                    vec![if on { 1.0 } else { 0.0 }; g.ids.len()]
                })
                .collect();
            let mask = rows_tensor(&mask, width, device)?; // (B, Tc)
            let adv: Vec<f32> = ro.advantages[start..end]
                .iter()
                .map(|&a| a as f32)
                .collect();
            let adv = Tensor::from_vec(adv, end - start, device)?; // (B,)
            let ref_lp = ro.ref_logps.get(k).and_then(|r| r.as_ref());
            let out = grpo_loss(
                &LossInputs {
                    logps: &logps,
                    old_logps: Some(&old),
                    ref_logps: ref_lp,
                    mask: &mask,
                    advantages: &adv,
                },
                &loss_cfg,
            )?;
            // The loss divides by the accumulation steps (grpo, bnpo, dr_grpo) or by the
            // step's token count (dapo), as TRL, so the summed gradients are the step's.
            let loss = out.loss;
            loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            acc.add(&loss.backward()?)?;
            let s = &out.stats;
            if let Some(kl) = s.kl_mean {
                kl_sum += kl;
                kl_n += 1;
            }
            clip_lo += s.clip_low / n_micro as f64;
            clip_hi += s.clip_high / n_micro as f64;
            clip_reg += s.clip_region / n_micro as f64;
            ratio_mean += s.ratio_mean / n_micro as f64;
            ratio_dev = ratio_dev.max(s.ratio_max_abs_dev);
        }
        let lr = plan.run.schedule.lr_at(state.step, plan.run.learning_rate);
        let (gnorm, applied) = apply_update(
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
        let train_secs = t_train.elapsed().as_secs_f64();
        if iteration == 0 {
            summary.max_first_ratio_dev = summary.max_first_ratio_dev.max(ratio_dev);
        }
        state.step += 1;
        state.cursor = loader.cursor();
        summary.steps = state.step;
        let kl = (kl_n > 0).then(|| kl_sum / kl_n as f64);
        // 3. Log, health, eval, save.
        if let Some(kl) = kl {
            health.push_kl(state.step, kl);
        }
        for f in health.check() {
            obs.finding(&f);
            summary.findings.push(f);
        }
        if state.step.is_multiple_of(plan.run.log_every)
            || state.step == plan.run.total_steps
            || state.step == 1
        {
            let mut values: Vec<(String, f64)> = rollout_metrics;
            values.push(("loss".into(), loss_sum));
            if let Some(kl) = kl {
                values.push(("kl".into(), kl));
            }
            values.push(("clip_ratio/low_mean".into(), clip_lo));
            values.push(("clip_ratio/high_mean".into(), clip_hi));
            values.push(("clip_ratio/region_mean".into(), clip_reg));
            values.push(("ratio/mean".into(), ratio_mean));
            values.push(("ratio/max_abs_dev".into(), ratio_dev));
            values.push(("grad_norm".into(), gnorm));
            values.push(("lr".into(), lr));
            values.push(("tokens_per_s/train".into(), seq_tokens as f64 / train_secs));
            values.push(("step_seconds".into(), t_step.elapsed().as_secs_f64()));
            values.push((
                "epoch".into(),
                loader.cursor().epoch as f64 + loader.cursor().index as f64 / n_train as f64,
            ));
            let refs: Vec<(&str, f64)> = values.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            obs.metrics(state.step, &refs);
        }
        if plan.run.eval_every > 0
            && (state.step.is_multiple_of(plan.run.eval_every)
                || state.step == plan.run.total_steps)
        {
            log_eval(
                model,
                env,
                plan,
                state.step,
                &labels,
                obs,
                &mut summary,
                device,
            )?;
        }
        // Checkpoints only at generation boundaries (see the module note on exact resume).
        let boundary = state.step.is_multiple_of(plan.num_iterations);
        let save_now = boundary
            && ((plan.run.save_every > 0 && state.step.is_multiple_of(plan.run.save_every))
                || state.step == plan.run.total_steps);
        if save_now || state.step == plan.run.total_steps {
            state.health = Some(health.clone());
            let trainer_state =
                serde_json::to_value(&state).map_err(|e| TrainError::Plan(e.to_string()))?;
            state.health = None;
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
