//! Knowledge distillation (GKD, arXiv 2306.13649; TRL 1.16 `GKDTrainer`), one loop you can read
//! top to bottom: batch of SFT-style examples → (with probability `lmbda`: replace the
//! completions by ones sampled from the student, TRL's on-policy option; with `seq_kd`: by ones
//! sampled from the teacher first) → student logits at the completion tokens → the teacher's
//! distribution at the same tokens (a no-graph forward of the frozen teacher, or rows read from
//! a teacher cache) → [`distill_loss`] + `sft_weight` · cross-entropy → backward (accumulated)
//! → the shared clip + AdamW step → log → eval → save.
//!
//! Scored tokens are SFT's: the completion / assistant tokens of the loss mask. Row r of the
//! divergence is the next-token distribution that predicts scored token r, so the student and
//! the teacher are compared exactly where SFT would compute its cross-entropy. Both losses are
//! sums over the step's scored tokens divided by their count over all micro-batches (TRL's
//! `batchmean` with `num_items_in_batch`), so batch 1 × accumulation 8 = batch 8 × accumulation 1.
//!
//! Where we differ from TRL, and why: TRL's `compute_loss` calls `generalized_jsd_loss` without
//! a temperature (τ = 1 in the loss) and uses `temperature` only for sampling; we keep that
//! split (`loss_temperature`, default 1, and `temperature`, default 0.9). TRL draws the
//! on-policy coin from Python's global `random`; ours is a pure function of (seed, step,
//! micro-batch), so a resumed run makes the same choices (exact resume as SFT).
//!
//! Owns: the order of a distillation step, on-policy / seq_kd sampling, the mix of the two
//! losses, eval. Does not own: the divergence math (`distill_loss`), the scored rows and the
//! teacher's rows (`distill_teacher`), tokenizing (`ferrotune-data`), the cache file format (the
//! CLI's `teacher_cache`), checkpoint files (`ferrotune-ckpt`).

use std::borrow::Cow;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ferrotune_data::{collate_right, Collated, Loader, Sequence, Tokenized};
use ferrotune_generate::{generate, GenerateOptions, SamplingParams};
use ferrotune_models::CausalLm;
use ferrotune_nn::{splitmix64, Mode};
use serde::{Deserialize, Serialize};

use crate::distill_loss::{distill_loss, JsdConfig};
use crate::distill_teacher::{logits_at, nll_rows, scored_positions, teacher_rows, TeacherRows};
pub use crate::distill_teacher::{teacher_topk_rows, topk_logprobs, CachedTeacher, TeacherSource};
use crate::error::{Result, TrainError};
use crate::plan::LoopPlan;
use crate::trainer::{
    batch_tensors, derive_seed, FirstLast, LoopCore, Observer, Outcome, RunCtx, Trainable, Trainer,
};

/// One training example and its key in the teacher cache (its index among the tokenized
/// examples of the data files, train then eval).
#[derive(Debug, Clone, PartialEq)]
pub struct DistillItem {
    pub seq: Tokenized,
    pub key: usize,
}

impl Sequence for DistillItem {
    fn ids(&self) -> &[u32] {
        &self.seq.ids
    }
    fn loss_mask(&self) -> &[u8] {
        &self.seq.loss_mask
    }
    fn position_ids(&self) -> Cow<'_, [u32]> {
        Cow::Owned((0..self.seq.ids.len() as u32).collect())
    }
}

/// The resolved distillation schedule (from the config, with totals computed).
#[derive(Debug, Clone)]
pub struct DistillPlan {
    /// Steps, batches, optimizer and cadence, as every trainer has them.
    pub run: LoopPlan,
    /// β and the loss temperature τ.
    pub loss: JsdConfig,
    /// Top-k teachers: keep the mass outside the top-k as one bucket (TRL's `loss_add_tail`).
    pub add_tail: bool,
    /// Weight of the student's cross-entropy on the scored tokens, added to the divergence.
    pub sft_weight: f64,
    /// Probability that a micro-batch's completions are sampled from the student (GKD's λ).
    pub lmbda: f64,
    /// Sample the completions from the teacher first (sequence-level KD on the fly).
    pub seq_kd: bool,
    /// Sampling temperature of on-policy / seq_kd completions.
    pub temperature: f64,
    pub max_new_tokens: usize,
    /// Sampled sequences (prompt + completion) are cut to this many tokens.
    pub max_seq_len: usize,
    pub eos_ids: Vec<u32>,
}

/// What the loop saves besides weights and optimizer moments.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DistillState {
    #[serde(flatten)]
    pub core: LoopCore,
    pub tokens_seen: u64,
}

/// Means over the scored tokens of an eval set.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DistillEval {
    /// The configured divergence (β, τ, top-k) to the teacher.
    pub distill_loss: f64,
    /// Forward KL(teacher‖student) at the loss temperature, over the same teacher support.
    pub forward_kl: f64,
    /// The student's cross-entropy on the data's completion tokens.
    pub ce: f64,
    pub tokens: usize,
}

/// The outcome of a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DistillSummary {
    pub run: Outcome,
    pub loss: FirstLast,
    pub distill_loss: FirstLast,
    /// Eval before the first step (fresh runs with an eval set) and at the last eval point.
    pub first_eval: Option<DistillEval>,
    pub last_eval: Option<DistillEval>,
    pub on_policy_batches: usize,
}

/// Per micro-batch values, already divided by the step's token count.
struct MicroOut {
    loss: Tensor,
    distill: f64,
    ce: f64,
    /// Forward KL at the loss temperature (eval only).
    forward_kl: f64,
}

/// Student vs teacher on one collated micro-batch, normalised by `denom` scored tokens.
#[allow(clippy::too_many_arguments)]
fn micro_loss(
    student: &dyn CausalLm,
    teacher: TeacherSource<'_>,
    c: &Collated,
    keys: Option<&[usize]>,
    plan: &DistillPlan,
    denom: usize,
    mode: Mode,
    with_forward_kl: bool,
    device: &Device,
) -> Result<Option<MicroOut>> {
    let at = scored_positions(c);
    if at.is_empty() {
        return Ok(None);
    }
    let batch = batch_tensors(c, device)?;
    let t = teacher_rows(
        teacher,
        &batch,
        c,
        &at,
        keys,
        plan.loss.temperature,
        plan.add_tail,
    )?;
    // Models that share a tokenizer may pad their embedding matrices differently (e.g. to a
    // multiple of 64): ids past the tokenizer never occur, so compare the common columns.
    let s = logits_at(student, &batch, &at, mode)?.to_device(&Device::Cpu)?; // (N, Vs)
    let (s, t) = match t {
        TeacherRows::Full(tl) => {
            let v = s.dim(1)?.min(tl.dim(1)?);
            (s.narrow(1, 0, v)?, TeacherRows::Full(tl.narrow(1, 0, v)?))
        }
        other => (s, other),
    };
    let n = at.len();
    let mask = Tensor::ones(n, DType::F32, &Device::Cpu)?;
    let divergence = distill_loss(&s, t.as_teacher(), &mask, &plan.loss, Some(denom))?;
    let targets: Vec<u32> = at.iter().map(|&(i, j)| c.ids[i][j]).collect();
    let ce = (nll_rows(&s, &targets)? / denom as f64)?;
    let distill = divergence.to_scalar::<f32>()? as f64;
    let ce_value = ce.to_scalar::<f32>()? as f64;
    let loss = if plan.sft_weight > 0.0 {
        (divergence + (ce * plan.sft_weight)?)?
    } else {
        divergence
    };
    let forward_kl = if with_forward_kl {
        let kl = JsdConfig {
            beta: 0.0,
            ..plan.loss
        };
        distill_loss(&s.detach(), t.as_teacher(), &mask, &kl, Some(denom))?.to_scalar::<f32>()?
            as f64
    } else {
        0.0
    };
    Ok(Some(MicroOut {
        loss,
        distill,
        ce: ce_value,
        forward_kl,
    }))
}

/// The prompt part of a tokenized example: everything before its last run of scored tokens
/// (the last completion / assistant turn, as TRL's chat collator splits a conversation).
pub fn prompt_of(t: &Tokenized) -> &[u32] {
    let last = t.loss_mask.iter().rposition(|&m| m == 1);
    let Some(mut start) = last else {
        return &t.ids;
    };
    while start > 0 && t.loss_mask[start - 1] == 1 {
        start -= 1;
    }
    &t.ids[..start.max(1)]
}

/// Replace the completions of `seqs` by ones sampled from `model` (no graph): prompt + sampled
/// ids, the loss on the sampled ids (EOS included when drawn), cut to `max_seq_len`.
fn sample_completions(
    model: &dyn CausalLm,
    seqs: &[&Tokenized],
    plan: &DistillPlan,
    seed: u64,
    device: &Device,
) -> Result<Vec<Tokenized>> {
    let prompts: Vec<Vec<u32>> = seqs.iter().map(|s| prompt_of(s).to_vec()).collect();
    let opts = GenerateOptions {
        sampling: SamplingParams {
            temperature: plan.temperature,
            top_k: None,
            top_p: None,
            seed,
        },
        max_new_tokens: plan.max_new_tokens,
        eos_ids: plan.eos_ids.clone(),
        pad_id: plan.run.pad_id,
        mode: Mode::EVAL,
    };
    let gens = generate(model, &prompts, &opts, &|_, _| false, device)?;
    Ok(prompts
        .into_iter()
        .zip(gens)
        .map(|(p, g)| {
            let mut loss_mask = vec![0u8; p.len()];
            loss_mask.extend(std::iter::repeat_n(1u8, g.ids.len()));
            let mut ids = p;
            ids.extend(&g.ids);
            let full = ids.len();
            ids.truncate(plan.max_seq_len);
            loss_mask.truncate(plan.max_seq_len);
            Tokenized {
                ids,
                loss_mask,
                truncated: full > plan.max_seq_len,
                tokens_dropped: full.saturating_sub(plan.max_seq_len),
            }
        })
        .collect())
}

/// Salts (ASCII of the names) that keep the on-policy coin and the two samplers' seeds
/// independent of each other and of the dropout seeds, which hash the same (step, micro-batch).
const SEQ_KD_SALT: u64 = 0x7365_715f_6b64;
const LMBDA_SALT: u64 = 0x006c_6d62_6461;
const POLICY_SALT: u64 = 0x706f_6c69_6379;

/// Uniform [0, 1) from a counter.
fn unit(x: u64) -> f64 {
    (splitmix64(x) >> 11) as f64 / (1u64 << 53) as f64
}

/// Eval means over `items` (no update, student in eval mode); None for an empty set.
pub fn eval_distill(
    student: &dyn CausalLm,
    teacher: TeacherSource<'_>,
    items: &[DistillItem],
    plan: &DistillPlan,
    device: &Device,
) -> Result<Option<DistillEval>> {
    let tokens: usize = items.iter().map(|x| x.seq.loss_tokens()).sum();
    if items.is_empty() || tokens == 0 {
        return Ok(None);
    }
    let mut e = DistillEval::default();
    for chunk in items.chunks(plan.run.batch_size.max(1)) {
        let refs: Vec<&DistillItem> = chunk.iter().collect();
        let keys: Vec<usize> = chunk.iter().map(|x| x.key).collect();
        let c = collate_right(&refs, plan.run.pad_id);
        let n = scored_positions(&c).len();
        if let Some(m) = micro_loss(
            student,
            teacher,
            &c,
            Some(&keys),
            plan,
            1,
            Mode::EVAL,
            true,
            device,
        )? {
            e.distill_loss += m.distill;
            e.forward_kl += m.forward_kl;
            e.ce += m.ce;
            e.tokens += n;
        }
    }
    let n = e.tokens.max(1) as f64;
    e.distill_loss /= n;
    e.forward_kl /= n;
    e.ce /= n;
    Ok(Some(e))
}

fn log_eval(obs: &mut dyn Observer, step: usize, e: &DistillEval) {
    obs.metrics(
        step,
        &[
            ("eval/distill_loss", e.distill_loss),
            ("eval/forward_kl", e.forward_kl),
            ("eval_loss", e.ce),
        ],
    );
}

/// Run distillation from step 0, or from `resume`, up to `plan.run.total_steps`.
pub fn train_distill(
    student: &dyn CausalLm,
    trainable: &Trainable,
    teacher: TeacherSource<'_>,
    train: &[DistillItem],
    eval: &[DistillItem],
    plan: &DistillPlan,
    ctx: RunCtx,
) -> Result<DistillSummary> {
    let (run, resume, obs, device) = ctx.parts();
    plan.loss.validate()?;
    let live = match teacher {
        TeacherSource::Live { model, .. } => Some(model),
        TeacherSource::Cache(_) => None,
    };
    if live.is_none() && (plan.lmbda > 0.0 || plan.seq_kd) {
        return Err(TrainError::invalid(
            "distill.teacher_cache",
            "on-policy distillation (lmbda > 0) and seq_kd score sampled completions, which a \
             teacher cache cannot hold: set lmbda = 0 and seq_kd = false, or drop teacher_cache",
        ));
    }
    let run_dir = run;
    let run = &plan.run;
    let mut t = Trainer::new(student, trainable, run, run_dir)?;
    let fresh = DistillState {
        core: LoopCore::new(run),
        tokens_seen: 0,
    };
    let mut state = t.start(resume, fresh, obs)?;
    let mut summary = DistillSummary {
        run: Outcome::at(state.core.step),
        ..Default::default()
    };
    if resume.is_none() && run.eval_every > 0 {
        if let Some(e) = eval_distill(student, teacher, eval, plan, device)? {
            log_eval(obs, 0, &e);
            summary.first_eval = Some(e);
        }
    }
    let mut loader = Loader::resume(train.len(), run.shuffler(), state.core.cursor)?;
    while state.core.step < run.total_steps {
        let t0 = Instant::now();
        // 1. The micro-batches of this step; some get sampled completions (seq_kd: from the
        //    teacher; with probability lmbda: from the student, scored by the teacher).
        let mut micro: Vec<(Collated, Option<Vec<usize>>)> = Vec::with_capacity(run.grad_accum);
        let mut on_policy = 0usize;
        for k in 0..run.grad_accum {
            let idx = loader.next_batch(run.batch_size)?;
            let items: Vec<&DistillItem> = idx.iter().map(|&i| &train[i]).collect();
            let counter = ((state.core.step as u64) << 16) | k as u64;
            let mut seqs: Option<Vec<Tokenized>> = None;
            if let (true, Some(teacher_lm)) = (plan.seq_kd, live) {
                let refs: Vec<&Tokenized> = items.iter().map(|x| &x.seq).collect();
                let seed = derive_seed(run.seed, counter ^ SEQ_KD_SALT);
                seqs = Some(sample_completions(teacher_lm, &refs, plan, seed, device)?);
            }
            if unit(run.seed ^ splitmix64(counter ^ LMBDA_SALT)) < plan.lmbda {
                let refs: Vec<&Tokenized> = match &seqs {
                    Some(s) => s.iter().collect(),
                    None => items.iter().map(|x| &x.seq).collect(),
                };
                let seed = derive_seed(run.seed, counter ^ POLICY_SALT);
                seqs = Some(sample_completions(student, &refs, plan, seed, device)?);
                on_policy += 1;
            }
            micro.push(match seqs {
                Some(s) => {
                    let refs: Vec<&Tokenized> = s.iter().collect();
                    (collate_right(&refs, run.pad_id), None)
                }
                None => (
                    collate_right(&items, run.pad_id),
                    Some(items.iter().map(|x| x.key).collect()),
                ),
            });
        }
        let total_tokens: usize = micro.iter().map(|(c, _)| scored_positions(c).len()).sum();
        let seq_tokens: usize = micro.iter().map(|(c, _)| c.shape().0 * c.shape().1).sum();
        // 2. Teacher rows, student logits, loss, backward per micro-batch.
        let (mut loss_sum, mut distill_sum, mut ce_sum) = (0.0f64, 0.0f64, 0.0f64);
        for (k, (c, keys)) in micro.iter().enumerate() {
            let mode = run.train_mode(state.core.step, k);
            let Some(m) = micro_loss(
                student,
                teacher,
                c,
                keys.as_deref(),
                plan,
                total_tokens.max(1),
                mode,
                false,
                device,
            )?
            else {
                continue;
            };
            loss_sum += m.loss.to_scalar::<f32>()? as f64;
            distill_sum += m.distill;
            ce_sum += m.ce;
            t.backward(&m.loss)?;
        }
        // 3. Clip (or just measure), skip non-finite steps, update.
        let lr = run.lr_at(state.core.step);
        let up = t.update(&mut state.core, lr, obs)?;
        state.core.advance(loader.cursor());
        state.tokens_seen += total_tokens as u64;
        let step = state.core.step;
        summary.loss.see(loss_sum);
        summary.distill_loss.see(distill_sum);
        summary.on_policy_batches += on_policy;
        summary.run.step_done(step, &t);
        // 4. Log, eval, save.
        if run.is_log_step(step) {
            let secs = t0.elapsed().as_secs_f64();
            obs.metrics(
                step,
                &[
                    ("loss", loss_sum),
                    ("distill_loss", distill_sum),
                    ("sft_loss", ce_sum),
                    ("on_policy", on_policy as f64 / run.grad_accum as f64),
                    ("learning_rate", lr),
                    ("grad_norm", up.grad_norm),
                    ("loss_tokens", total_tokens as f64),
                    ("tokens_per_s", seq_tokens as f64 / secs),
                    ("epoch", LoopPlan::epoch(loader.cursor(), train.len())),
                ],
            );
        }
        if run.is_eval_step(step) {
            if let Some(e) = eval_distill(student, teacher, eval, plan, device)? {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The prompt is everything before the last scored run (a multi-turn chat keeps its earlier
    /// assistant turns in the prompt); an example with nothing scored is all prompt.
    #[test]
    fn prompt_is_the_prefix_before_the_last_scored_run() {
        let t = Tokenized {
            ids: vec![10, 11, 12, 13, 14, 15, 16],
            loss_mask: vec![0, 1, 1, 0, 0, 1, 1],
            ..Default::default()
        };
        assert_eq!(prompt_of(&t), &[10, 11, 12, 13, 14]);
        let none = Tokenized {
            ids: vec![1, 2],
            loss_mask: vec![0, 0],
            ..Default::default()
        };
        assert_eq!(prompt_of(&none), &[1, 2]);
    }
}
