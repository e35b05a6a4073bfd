//! GRPO (group relative policy optimisation) for verifiable rewards, one loop you can read top
//! to bottom: prompts → G sampled completions each (our own engine, behaviour log-probs recorded
//! at sampling time) → rewards (via the caller's [`Env`](crate::rollout::Env): text and reward functions live
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
use ferrotune_data::{Collated, Loader};
use ferrotune_generate::{Finish, GenerateOptions, Generation, SamplingParams};
use ferrotune_models::CausalLm;
use ferrotune_nn::Mode;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::grpo_loss::{
    advantages, group_stats, grpo_loss, informative_groups, LossConfig, LossInputs, ScaleRewards,
};
use crate::health::{HealthMonitor, HealthStats, ToolHealth};
use crate::loss::{scored_logprobs, scored_logprobs_entropy};
use crate::plan::LoopPlan;
use crate::rollout::{
    mean_std, micro_batch, report_failures, rows_tensor, sample, to_rows, train_prompts,
    CompletionRecord, Env, RewardRole, Rollout, Split,
};
use crate::trainer::{
    batch_tensors, derive_seed, eval_hook, log_metrics, FirstLast, LoopCore, Observer, Outcome,
    RunCtx, Trainable, Trainer,
};

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
    /// The loss options (TRL's names); the loop fills in `max_completion_len`,
    /// `num_items_in_batch` and `accum_steps` for each step.
    pub loss: LossConfig,
    pub scale_rewards: ScaleRewards,
    pub mask_truncated_completions: bool,
    /// Dynamic sampling (DAPO): train only groups whose rewards differ, generating more
    /// prompts' completions — at most `max_num_gen_batches` generation rounds per batch.
    pub dynamic_sampling: bool,
    pub max_num_gen_batches: usize,
    /// Write a sample of completions every `log_every` steps.
    pub log_completions: bool,
    pub eos_ids: Vec<u32>,
}

impl GrpoPlan {
    /// Completions per generation batch (= per optimizer step).
    pub fn completions_per_step(&self) -> usize {
        self.run.per_step()
    }
    /// Prompts per generation batch.
    pub fn prompts_per_step(&self) -> usize {
        self.completions_per_step() / self.num_generations.max(1)
    }
    /// Checks that say why a plan cannot run (the rules only the resolved plan can check; the
    /// config's own are in its section's `validate`).
    pub fn validate(&self) -> Result<()> {
        let at_least = |key: &'static str, v: usize, min: usize, why: &str| {
            if v < min {
                Err(TrainError::invalid(
                    key,
                    format!("{key} must be at least {min}{why}"),
                ))
            } else {
                Ok(())
            }
        };
        let why = " (advantages are relative to the group)";
        at_least("grpo.num_generations", self.num_generations, 2, why)?;
        if !self
            .completions_per_step()
            .is_multiple_of(self.num_generations)
        {
            return Err(TrainError::invalid(
                "grpo.num_generations",
                format!(
                    "run.batch_size × run.gradient_accumulation_steps = {} completions per step must be divisible by grpo.num_generations = {}",
                    self.completions_per_step(),
                    self.num_generations
                ),
            ));
        }
        at_least("grpo.num_iterations", self.num_iterations, 1, "")?;
        at_least("grpo.max_completion_len", self.max_completion_len, 1, "")?;
        if self.dynamic_sampling {
            at_least("grpo.max_num_gen_batches", self.max_num_gen_batches, 1, "")?;
        }
        let loss = LossConfig {
            max_completion_len: self.max_completion_len,
            num_items_in_batch: Some(0.0),
            ..self.loss.clone()
        };
        loss.validate()
            .map_err(|e| TrainError::invalid("grpo", e.to_string()))
    }
}

/// What the loop saves besides weights and optimizer moments.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GrpoState {
    #[serde(flatten)]
    pub core: LoopCore,
    pub rollout_tokens: u64,
    /// The health checks' recent history, so a resumed run reports what the straight one
    /// would (absent in checkpoints written before it was saved: the checks start afresh).
    #[serde(default)]
    pub health: Option<HealthMonitor>,
}

/// The outcome of a run.
#[derive(Debug, Clone, Default)]
pub struct GrpoSummary {
    pub run: Outcome,
    /// Mean total reward of the first and last generation batches.
    pub reward: FirstLast,
    /// Mean total reward of the first and last eval (greedy) passes.
    pub eval_reward: FirstLast,
    /// Largest |ratio − 1| seen on a first iteration (sampler vs trainer log-probs).
    pub max_first_ratio_dev: f64,
    pub findings: Vec<crate::health::Finding>,
}

/// What dynamic sampling did for one generation batch.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Resampled {
    /// Generation rounds (1 = no extra generation).
    rounds: usize,
    /// Completions generated over all rounds (the batch trains `completions_per_step`).
    sampled: usize,
    /// Groups left out for carrying no signal.
    dropped: usize,
    /// Signal-less groups trained anyway because `max_num_gen_batches` ran out.
    filled: usize,
    /// Mean total reward over every completion sampled (the trained batch's `reward` is biased:
    /// all-right and all-wrong groups are left out).
    sampled_reward: f64,
}

impl Resampled {
    fn metrics(&self) -> Vec<(String, f64)> {
        vec![
            ("dynamic_sampling/rounds".into(), self.rounds as f64),
            ("dynamic_sampling/sampled".into(), self.sampled as f64),
            (
                "dynamic_sampling/dropped_groups".into(),
                self.dropped as f64,
            ),
            ("dynamic_sampling/filled_groups".into(), self.filled as f64),
            (
                "dynamic_sampling/sampled_reward".into(),
                self.sampled_reward,
            ),
        ]
    }
}

/// One generation round: the next prompts, G completions each, scored. Round 0 of a
/// generation batch uses the seed it always had; the extra rounds of dynamic sampling get
/// their own.
fn sample_round(
    model: &dyn CausalLm,
    env: &mut dyn Env,
    plan: &GrpoPlan,
    loader: &mut Loader,
    round: u64,
    extra: u64,
    device: &Device,
) -> Result<Rollout> {
    let prompts_idx = loader.next_batch(plan.prompts_per_step())?;
    let items: Vec<usize> = prompts_idx
        .iter()
        .flat_map(|&i| std::iter::repeat_n(i, plan.num_generations))
        .collect();
    let seed = if extra == 0 {
        derive_seed(plan.run.seed, round.wrapping_add(0x5eed))
    } else {
        derive_seed(plan.run.seed ^ 0xd5a3_91e5, (round << 16) | extra)
    };
    let opts = GenerateOptions {
        sampling: SamplingParams {
            seed,
            ..plan.sampling.clone()
        },
        max_new_tokens: plan.max_completion_len,
        eos_ids: plan.eos_ids.clone(),
        pad_id: plan.run.pad_id,
        mode: Mode::EVAL,
    };
    sample(model, env, Split::Train, items, &opts, device)
}

/// The generation batch of one round of `num_iterations` steps. With dynamic sampling (DAPO;
/// verl's `filter_groups`): groups whose rewards carry no signal (all equal) are left out and
/// more prompts are sampled until the batch is full of informative groups or
/// `max_num_gen_batches` rounds have run; then the batch is topped up with left-out groups
/// (advantage 0), so its size — and every normalisation — stays fixed.
fn draw(
    model: &dyn CausalLm,
    env: &mut dyn Env,
    plan: &GrpoPlan,
    loader: &mut Loader,
    round: u64,
    device: &Device,
) -> Result<(Rollout, Option<Resampled>)> {
    let first = sample_round(model, env, plan, loader, round, 0, device)?;
    if !plan.dynamic_sampling {
        return Ok((first, None));
    }
    let (g, need) = (plan.num_generations, plan.prompts_per_step());
    let mut kept = Rollout::empty(first.scores.len());
    let mut left_out = Rollout::empty(first.scores.len());
    let mut stats = Resampled {
        rounds: 0,
        sampled: 0,
        dropped: 0,
        filled: 0,
        sampled_reward: 0.0,
    };
    let (mut reward_sum, mut scored) = (0.0, 0usize);
    let mut next = Some(first);
    while let Some(ro) = next.take() {
        stats.rounds += 1;
        stats.sampled += ro.gens.len();
        kept.new_tokens += ro.new_tokens;
        kept.gen_secs += ro.gen_secs;
        kept.tool_calls += ro.tool_calls;
        kept.tool_failures += ro.tool_failures;
        kept.tool_unanswered += ro.tool_unanswered;
        for r in ro.totals.iter().filter(|r| !r.is_nan()) {
            reward_sum += r;
            scored += 1;
        }
        let signal = informative_groups(&ro.totals, g)?;
        let room = need - kept.gens.len() / g;
        let (yes, no): (Vec<usize>, Vec<usize>) = (0..signal.len()).partition(|&k| signal[k]);
        ro.move_groups(&yes[..yes.len().min(room)], g, &mut kept);
        ro.move_groups(&no, g, &mut left_out);
        stats.dropped += no.len();
        if kept.gens.len() / g < need && stats.rounds < plan.max_num_gen_batches {
            let extra = stats.rounds as u64;
            next = Some(sample_round(
                model, env, plan, loader, round, extra, device,
            )?);
        }
    }
    let short = need - kept.gens.len() / g;
    let fill: Vec<usize> = (0..short).collect();
    left_out.move_groups(&fill, g, &mut kept);
    stats.filled = short;
    stats.dropped -= short;
    stats.sampled_reward = reward_sum / scored.max(1) as f64;
    Ok((kept, Some(stats)))
}

/// The mean of the values some micro-batches of a step report (`None` when none did).
#[derive(Default, Clone, Copy)]
struct OptMean {
    sum: f64,
    n: usize,
}

impl OptMean {
    fn push(&mut self, v: Option<f64>) {
        if let Some(v) = v {
            self.sum += v;
            self.n += 1;
        }
    }
    fn get(self) -> Option<f64> {
        (self.n > 0).then(|| self.sum / self.n as f64)
    }
}

/// One generation batch: the scored rollout, its advantages, and what every μ iteration reuses
/// (the collated micro-batches and the reference log-probs).
struct GenBatch {
    ro: Rollout,
    advantages: Vec<f64>,
    /// Prompt + completion of each micro-batch and its completion lengths, collated once.
    micro: Vec<(Collated, Vec<usize>)>,
    /// Reference log-probs per micro-batch ((B, Tc) each) when β ≠ 0.
    ref_logps: Vec<Option<Tensor>>,
}

/// Greedy decoding for eval passes, with the plan's length and stop rules.
fn eval_options(plan: &GrpoPlan) -> GenerateOptions {
    GenerateOptions {
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
    }
}

/// Greedy completions of every eval prompt, scored: mean total and mean per reward.
pub fn eval_rewards(
    model: &dyn CausalLm,
    env: &mut dyn Env,
    plan: &GrpoPlan,
    device: &Device,
) -> Result<Option<(f64, Vec<f64>)>> {
    let n = env.len(Split::Eval);
    if n == 0 {
        return Ok(None);
    }
    let mut totals = Vec::with_capacity(n);
    let mut per: Vec<Vec<f64>> = vec![vec![]; env.reward_labels().len()];
    let opts = eval_options(plan);
    let all: Vec<usize> = (0..n).collect();
    for items in all.chunks(plan.completions_per_step().max(1)) {
        let ro = sample(model, env, Split::Eval, items.to_vec(), &opts, device)?;
        totals.extend(ro.totals);
        for (k, s) in ro.scores.iter().enumerate() {
            per[k].extend(s.iter().flatten());
        }
    }
    let means = per.iter().map(|v| mean_std(v).0).collect();
    Ok(Some((mean_std(&totals).0, means)))
}

/// Eval pass at `step`, logged as `eval/reward` and `eval/rewards/<label>/mean`.
fn log_eval(
    model: &dyn CausalLm,
    env: &mut dyn Env,
    plan: &GrpoPlan,
    step: usize,
    obs: &mut dyn Observer,
    summary: &mut GrpoSummary,
    device: &Device,
) -> Result<()> {
    if let Some((total, per)) = eval_rewards(model, env, plan, device)? {
        summary.eval_reward.see(total);
        let mut values = vec![("eval/reward".to_string(), total)];
        for (l, m) in env.reward_labels().iter().zip(&per) {
            if m.is_finite() {
                values.push((format!("eval/rewards/{l}/mean"), *m));
            }
        }
        log_metrics(obs, step, &values);
    }
    Ok(())
}

/// Which completions are right: by the first correctness reward, else the total above the
/// batch's midpoint.
fn right_answers(ro: &crate::rollout::Rollout, roles: &[RewardRole]) -> Vec<bool> {
    match roles.iter().position(|r| *r == RewardRole::Correctness) {
        Some(k) => ro.scores[k]
            .iter()
            .map(|s| s.unwrap_or(0.0) >= 1.0)
            .collect(),
        None => {
            let lo = ro.totals.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = ro.totals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            ro.totals
                .iter()
                .map(|&t| hi > lo && t > (lo + hi) / 2.0)
                .collect()
        }
    }
}

/// Run GRPO from step 0, or from `resume`, up to `plan.run.total_steps`.
pub fn train_grpo(
    model: &dyn CausalLm,
    trainable: &Trainable,
    env: &mut dyn Env,
    plan: &GrpoPlan,
    ctx: RunCtx,
) -> Result<GrpoSummary> {
    let (run, resume, obs, device) = ctx.parts();
    plan.validate()?;
    let n_train = train_prompts(env)?;
    let mut t = Trainer::new(model, trainable, &plan.run, run)?;
    let fresh = GrpoState {
        core: LoopCore::new(&plan.run),
        rollout_tokens: 0,
        health: None,
    };
    let mut state = t.start(resume, fresh, obs)?;
    let mut health = state
        .health
        .take()
        .unwrap_or_else(|| HealthMonitor::new(plan.loss.loss_type));
    health.set_loss_type(plan.loss.loss_type);
    let mut loader = Loader::resume(n_train, plan.run.shuffler(), state.core.cursor)?;
    let labels = env.reward_labels();
    let roles = env.reward_roles();
    let g = plan.num_generations;
    let mut summary = GrpoSummary {
        run: Outcome::at(state.core.step),
        ..Default::default()
    };
    let mut batch: Option<GenBatch> = None;
    // A baseline eval before the first update, so every run reports before / after.
    if plan.run.eval_every > 0 && state.core.step == 0 {
        log_eval(model, env, plan, 0, obs, &mut summary, device)?;
    }
    while state.core.step < plan.run.total_steps {
        let t_step = Instant::now();
        let iteration = state.core.step % plan.num_iterations;
        let mut rollout_metrics: Vec<(String, f64)> = Vec::new();
        // 1. A new generation batch every μ steps: sample, score, advantages.
        if iteration == 0 || batch.is_none() {
            let round = (state.core.step / plan.num_iterations) as u64;
            let (ro, resampled) = draw(model, env, plan, &mut loader, round, device)?;
            state.rollout_tokens += ro.new_tokens as u64;
            if let Some(d) = resampled {
                rollout_metrics.extend(d.metrics());
            }
            let failed = report_failures(env, state.core.step + 1, obs);
            if failed > 0 {
                rollout_metrics.push(("rewards/failures".into(), failed as f64));
            }
            let adv = advantages(&ro.totals, g, plan.scale_rewards)?;
            let gstats = group_stats(&ro.totals, g)?;
            // The micro-batches, collated once; reference log-probs once per generation batch
            // (adapters off, no graph).
            let mut micro = Vec::new();
            let mut ref_logps = Vec::new();
            for start in (0..ro.gens.len()).step_by(plan.run.batch_size) {
                let end = (start + plan.run.batch_size).min(ro.gens.len());
                let (items, gens) = (&ro.items[start..end], &ro.gens[start..end]);
                let (c, lens) = micro_batch(env, Split::Train, items, gens, plan.run.pad_id);
                if plan.loss.beta == 0.0 {
                    ref_logps.push(None);
                } else {
                    let b = batch_tensors(&c, device)?;
                    let temp = plan.sampling.temperature.max(1e-6);
                    let (lp, _) = scored_logprobs(model, &b, &c.loss_mask, temp, Mode::REFERENCE)?;
                    let width = lens.iter().copied().max().unwrap_or(0);
                    ref_logps.push(Some(to_rows(&lp, &lens, width)?));
                }
                micro.push((c, lens));
            }
            // Metrics of the rollout.
            let lens = ro.lengths();
            let (len_mean, _) = mean_std(&lens);
            let clipped = ro.clipped_ratio();
            let (r_mean, r_std) = (gstats.reward_mean, gstats.reward_std);
            let (a_mean, a_std) = mean_std(&adv);
            let zero_std_frac = gstats.frac_zero_std();
            rollout_metrics.push(("reward".into(), r_mean));
            rollout_metrics.push(("reward_std".into(), r_std));
            let (reward_metrics, per_means) = ro.reward_metrics(&labels);
            rollout_metrics.extend(reward_metrics);
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
            rollout_metrics.push(("completions/clipped_ratio".into(), clipped));
            rollout_metrics.push(("tokens_per_s/rollout".into(), ro.tokens_per_s()));
            let tool_health = (env.max_tool_rounds() > 0).then(|| {
                // TRL's definitions: calls per completion, failures per call.
                let n = ro.gens.len().max(1) as f64;
                ToolHealth {
                    calls_per_completion: ro.tool_calls as f64 / n,
                    failure_frac: if ro.tool_calls > 0 {
                        ro.tool_failures as f64 / ro.tool_calls as f64
                    } else {
                        0.0
                    },
                    unanswered_frac: ro.tool_unanswered as f64 / n,
                }
            });
            if let Some(t) = &tool_health {
                rollout_metrics.push(("tools/call_frequency".into(), t.calls_per_completion));
                rollout_metrics.push(("tools/failure_frequency".into(), t.failure_frac));
                rollout_metrics.push(("tools/unanswered_frac".into(), t.unanswered_frac));
            }
            // Lengths of right vs wrong answers.
            let right = right_answers(&ro, &roles);
            let mean_len_of = |want: bool| -> Option<f64> {
                let l: Vec<f64> = lens
                    .iter()
                    .zip(&right)
                    .filter(|(_, &r)| r == want)
                    .map(|(&l, _)| l)
                    .collect();
                (!l.is_empty()).then(|| mean_std(&l).0)
            };
            let (len_right, len_wrong) = (mean_len_of(true), mean_len_of(false));
            if let Some(l) = len_right {
                rollout_metrics.push(("completions/mean_length_right".into(), l));
            }
            if let Some(l) = len_wrong {
                rollout_metrics.push(("completions/mean_length_wrong".into(), l));
            }
            summary.reward.see(r_mean);
            health.push_rollout(HealthStats {
                step: state.core.step + 1,
                reward_mean: r_mean,
                reward_means: labels
                    .iter()
                    .zip(&roles)
                    .zip(&per_means)
                    .map(|((l, r), m)| (l.clone(), *r, *m))
                    .collect(),
                len_mean,
                len_right,
                len_wrong,
                truncated_frac: clipped,
                zero_std_frac,
                kl: None,
                tools: tool_health,
            });
            if plan.log_completions
                && (state.core.step.is_multiple_of(plan.run.log_every) || state.core.step == 0)
            {
                let recs: Vec<CompletionRecord> = (0..ro.gens.len())
                    .map(|i| CompletionRecord {
                        item: ro.items[i],
                        ids: ro.gens[i].ids.clone(),
                        rewards: ro.scores.iter().map(|s| s[i]).collect(),
                        total: ro.totals[i],
                        advantage: adv[i],
                        finish: ro.gens[i].finish,
                        injected: ro.gens[i].injected.clone(),
                    })
                    .collect();
                env.record(state.core.step + 1, &recs);
            }
            batch = Some(GenBatch {
                ro,
                advantages: adv,
                micro,
                ref_logps,
            });
        }
        let Some(b) = batch.as_ref() else {
            unreachable!("a generation batch is made above when there is none")
        };
        // 2. Loss over every micro-batch of the generation batch, gradients summed.
        let t_train = Instant::now();
        let kept =
            |g: &Generation| !(plan.mask_truncated_completions && g.finish == Finish::Length);
        // Loss tokens: the model's own (tool replies are masked, as TRL's tool_mask).
        let total_tokens: usize =
            b.ro.gens
                .iter()
                .filter(|g| kept(g))
                .map(|g| g.model_tokens())
                .sum();
        let loss_cfg = LossConfig {
            max_completion_len: plan.max_completion_len,
            num_items_in_batch: Some(total_tokens as f64),
            accum_steps: b.micro.len(),
            ..plan.loss.clone()
        };
        let n_micro = loss_cfg.accum_steps as f64;
        let mut loss_sum = 0.0f64;
        // Stats not every micro-batch has: mean over those that do.
        let [mut kl, mut entropy, mut cispo_clip, mut kept_frac] = [OptMean::default(); 4];
        let (mut clip_lo, mut clip_hi, mut clip_reg, mut ratio_mean) = (0.0, 0.0, 0.0, 0.0);
        let mut ratio_dev = 0.0f64;
        let mut seq_tokens = 0usize;
        for (k, (c, lens)) in b.micro.iter().enumerate() {
            let start = k * plan.run.batch_size;
            let gens = &b.ro.gens[start..start + lens.len()];
            seq_tokens += c.shape().0 * c.shape().1;
            let width = lens.iter().copied().max().unwrap_or(0);
            if width == 0 {
                continue;
            }
            let batch = batch_tensors(c, device)?;
            let mode = plan.run.train_mode(state.core.step, k);
            let temp = plan.sampling.temperature.max(1e-6);
            let (logps, entropies) = if loss_cfg.needs_entropy() {
                let (lp, ent, _) =
                    scored_logprobs_entropy(model, &batch, &c.loss_mask, temp, mode)?;
                (
                    to_rows(&lp, lens, width)?,
                    Some(to_rows(&ent, lens, width)?),
                )
            } else {
                let (lp, _) = scored_logprobs(model, &batch, &c.loss_mask, temp, mode)?;
                (to_rows(&lp, lens, width)?, None)
            }; // (B, Tc) each
            let old: Vec<Vec<f32>> = gens.iter().map(|g| g.logprobs.clone()).collect();
            let old = rows_tensor(&old, width, device)?; // (B, Tc)
            let mask: Vec<Vec<f32>> = gens
                .iter()
                .map(|g| {
                    let keep = if kept(g) { 1.0 } else { 0.0 };
                    g.model_mask()
                        .iter()
                        .map(|&m| keep * f32::from(m))
                        .collect()
                })
                .collect();
            let mask = rows_tensor(&mask, width, device)?; // (B, Tc)
            let adv: Vec<f32> = b.advantages[start..start + lens.len()]
                .iter()
                .map(|&a| a as f32)
                .collect();
            let adv = Tensor::from_vec(adv, lens.len(), device)?; // (B,)
            let out = grpo_loss(
                &LossInputs {
                    logps: &logps,
                    old_logps: Some(&old),
                    ref_logps: b.ref_logps.get(k).and_then(|r| r.as_ref()),
                    mask: &mask,
                    advantages: &adv,
                    entropies: entropies.as_ref(),
                },
                &loss_cfg,
            )?;
            // The loss divides by the accumulation steps (grpo, bnpo, dr_grpo) or by the
            // step's token count (dapo), as TRL, so the summed gradients are the step's.
            loss_sum += out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            t.backward(&out.loss)?;
            let s = &out.stats;
            kl.push(s.kl_mean);
            entropy.push(s.entropy_mean);
            cispo_clip.push(s.cispo_clip);
            kept_frac.push(loss_cfg.needs_entropy().then_some(s.entropy_kept));
            clip_lo += s.clip_low / n_micro;
            clip_hi += s.clip_high / n_micro;
            clip_reg += s.clip_region / n_micro;
            ratio_mean += s.ratio_mean / n_micro;
            ratio_dev = ratio_dev.max(s.ratio_max_abs_dev);
        }
        let lr = plan.run.lr_at(state.core.step);
        let up = t.update(&mut state.core, lr, obs)?;
        let train_secs = t_train.elapsed().as_secs_f64();
        if iteration == 0 {
            summary.max_first_ratio_dev = summary.max_first_ratio_dev.max(ratio_dev);
        }
        state.core.advance(loader.cursor());
        let step = state.core.step;
        summary.run.step_done(step, &t);
        let kl = kl.get();
        // 3. Log, health, eval, save.
        if let Some(kl) = kl {
            health.push_kl(step, kl);
        }
        for f in health.check() {
            obs.finding(&f);
            summary.findings.push(f);
        }
        if plan.run.is_log_step(step) || step == 1 {
            let mut values: Vec<(String, f64)> = rollout_metrics;
            values.push(("loss".into(), loss_sum));
            if let Some(kl) = kl {
                values.push(("kl".into(), kl));
            }
            if plan.loss.loss_type.is_clipped() {
                values.push(("clip_ratio/low_mean".into(), clip_lo));
                values.push(("clip_ratio/high_mean".into(), clip_hi));
                values.push(("clip_ratio/region_mean".into(), clip_reg));
            }
            for (key, v) in [
                ("cispo_clip_ratio", cispo_clip),
                ("entropy", entropy),
                ("entropy/kept_frac", kept_frac),
            ] {
                if let Some(v) = v.get() {
                    values.push((key.into(), v));
                }
            }
            values.push(("ratio/mean".into(), ratio_mean));
            values.push(("ratio/max_abs_dev".into(), ratio_dev));
            values.push(("grad_norm".into(), up.grad_norm));
            values.push(("lr".into(), lr));
            values.push(("tokens_per_s/train".into(), seq_tokens as f64 / train_secs));
            values.push(("step_seconds".into(), t_step.elapsed().as_secs_f64()));
            values.push(("epoch".into(), LoopPlan::epoch(loader.cursor(), n_train)));
            log_metrics(obs, step, &values);
        }
        if plan.run.is_eval_step(step) {
            log_eval(model, env, plan, step, obs, &mut summary, device)?;
            // The observer's eval hook (the `[eval]` perplexity gate), before anything is saved.
            if eval_hook(obs, step, model)? {
                summary.run.stopped_early = true;
                break;
            }
        }
        // Checkpoints only at generation boundaries (see the module note on exact resume); the
        // last step always saves.
        if (step.is_multiple_of(plan.num_iterations) && plan.run.is_save_step(step))
            || plan.run.is_last(step)
        {
            state.health = Some(health.clone());
            let saved = t.save(step, &state, obs);
            state.health = None;
            summary.run.last_checkpoint = Some(saved?);
        }
    }
    Ok(summary)
}
