//! One rollout, for every method that samples from the policy (GRPO, PPO): the environment a
//! caller supplies ([`Env`]: prompts, stop rules, reward functions), [`sample`] (prompts →
//! completions by our own engine with behaviour log-probs → scores → weighted totals), and what
//! rollouts are measured and batched with (reward and length metrics, micro-batches of prompt +
//! completion, per-token rows).
//!
//! Owns: sampling and scoring a batch, and the shapes the losses read it in. Does not own: text
//! or reward functions (the env), advantages or losses (the methods).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ferrotune_data::{collate_right, Tokenized};
use ferrotune_generate::{generate, Finish, GenerateOptions, Generation};
use ferrotune_models::CausalLm;

use crate::error::{Result, TrainError};
pub use crate::health::RewardRole;
use crate::trainer::Observer;

/// Which prompt set an item comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Eval,
}

/// The text side of GRPO, supplied by the caller: prompts as ids, stop rules, and scoring of
/// decoded completions with the reward functions.
pub trait Env {
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
    /// Multi-turn tool use: most tool rounds per completion (0 = single-turn, the default).
    fn max_tool_rounds(&self) -> usize {
        0
    }
    /// Whether `completion[turn_start..]` calls a tool (without running it): asked of the
    /// last turn when `max_tool_rounds` ran out, to count calls left unanswered.
    fn calls_tool(&self, _completion: &[u32], _turn_start: usize) -> bool {
        false
    }
    /// After a model turn that ended on its own (end-of-sequence or a stop rule): the tool
    /// calls in `completion[turn_start..]` run and their replies, rendered by the chat template
    /// with the next generation prompt, come back as ids to append; `None` (no calls) ends the
    /// completion.
    fn tool_turn(
        &mut self,
        _split: Split,
        _item: usize,
        _completion: &[u32],
        _turn_start: usize,
    ) -> Option<ToolTurn> {
        None
    }
}

/// What one tool round appends to a completion.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolTurn {
    /// Tool replies and the next generation prompt, as the chat template renders them.
    pub ids: Vec<u32>,
    /// Calls made, and how many failed (unknown tool, bad arguments, a crash, a timeout).
    pub calls: usize,
    pub failures: usize,
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
    /// Ranges of `ids` that are tool replies (multi-turn), not model text.
    pub injected: Vec<std::ops::Range<usize>>,
}

/// Sequences (prompt + completion) of completions `range` and their completion masks.
pub(crate) fn micro_batch(
    env: &dyn Env,
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

/// The number of training prompts of `env`; none is an error (an RL run has nothing to
/// sample from).
pub fn train_prompts(env: &dyn Env) -> Result<usize> {
    match env.len(Split::Train) {
        0 => Err(TrainError::NoPrompts),
        n => Ok(n),
    }
}

/// Completions of `items` (prompt indices of `split`, repeated for a group) sampled with `opts`,
/// scored by every reward function of the env.
pub struct Rollout {
    pub items: Vec<usize>,
    pub gens: Vec<Generation>,
    /// Scores `[reward][completion]`; None = not applicable.
    pub scores: Vec<Vec<Option<f64>>>,
    /// Σ weight · score per completion ([`weighted_totals`]).
    pub totals: Vec<f64>,
    /// Tokens generated, and the seconds generation took.
    pub new_tokens: usize,
    pub gen_secs: f64,
    /// Tool calls made during the rollout, how many failed, and how many completions were
    /// still calling when the round limit ran out.
    pub tool_calls: usize,
    pub tool_failures: usize,
    pub tool_unanswered: usize,
}

/// Sample one completion per entry of `items` (prompts of `split`) and score them.
pub fn sample(
    model: &dyn CausalLm,
    env: &mut dyn Env,
    split: Split,
    items: Vec<usize>,
    opts: &GenerateOptions,
    device: &Device,
) -> Result<Rollout> {
    let prompts: Vec<Vec<u32>> = items
        .iter()
        .map(|&i| env.prompt_ids(split, i).to_vec())
        .collect();
    let t_gen = Instant::now();
    let (gens, (tool_calls, tool_failures, tool_unanswered)) = {
        let mut gens = {
            let envr: &dyn Env = env;
            generate(model, &prompts, opts, &|_, ids| envr.stop(ids), device)?
        };
        let counts = tool_rounds(model, env, split, &items, &prompts, &mut gens, opts, device)?;
        (gens, counts)
    };
    let gen_secs = t_gen.elapsed().as_secs_f64();
    let new_tokens = gens.iter().map(|g| g.model_tokens()).sum();
    let scores = env.score(split, &items, &gens).map_err(TrainError::Env)?;
    let totals = weighted_totals(&scores, &env.reward_weights(), gens.len());
    Ok(Rollout {
        items,
        gens,
        scores,
        totals,
        new_tokens,
        gen_secs,
        tool_calls,
        tool_failures,
        tool_unanswered,
    })
}

/// Multi-turn tool use (when the env has tools): each completion that ended its turn on its
/// own gets its calls answered ([`Env::tool_turn`]) and generates its next turn, until a turn
/// makes no call, `max_tool_rounds` rounds ran, or the completion budget (`max_new_tokens`,
/// model and tool tokens together, as TRL) is spent. A tool reply that does not fit the budget
/// is dropped and the completion ends as it was (TRL rolls it back the same way). Returns the
/// calls made, how many failed, and how many completions still called a tool in the turn
/// after their last allowed round.
#[allow(clippy::too_many_arguments)]
fn tool_rounds(
    model: &dyn CausalLm,
    env: &mut dyn Env,
    split: Split,
    items: &[usize],
    prompts: &[Vec<u32>],
    gens: &mut [Generation],
    opts: &GenerateOptions,
    device: &Device,
) -> Result<(usize, usize, usize)> {
    let (mut calls, mut failures) = (0, 0);
    let max_rounds = env.max_tool_rounds();
    let mut turn_start = vec![0usize; gens.len()];
    let mut open: Vec<usize> = (0..gens.len()).collect();
    let mut rounds = 0;
    for round in 0..max_rounds {
        let mut next = Vec::new();
        for &row in &open {
            let g = &mut gens[row];
            if g.finish == Finish::Length {
                continue;
            }
            let Some(t) = env.tool_turn(split, items[row], &g.ids, turn_start[row]) else {
                continue;
            };
            calls += t.calls;
            failures += t.failures;
            if g.ids.len() + t.ids.len() >= opts.max_new_tokens {
                continue; // no room for the reply and a next turn
            }
            let s = g.ids.len();
            g.ids.extend_from_slice(&t.ids);
            g.logprobs.extend(std::iter::repeat_n(0.0, t.ids.len()));
            g.injected.push(s..g.ids.len());
            turn_start[row] = g.ids.len();
            next.push(row);
        }
        if next.is_empty() {
            break;
        }
        let contexts: Vec<Vec<u32>> = next
            .iter()
            .map(|&r| [prompts[r].as_slice(), gens[r].ids.as_slice()].concat())
            .collect();
        let rooms: Vec<usize> = next
            .iter()
            .map(|&r| opts.max_new_tokens - gens[r].ids.len())
            .collect();
        let turn_opts = GenerateOptions {
            sampling: ferrotune_generate::SamplingParams {
                seed: crate::trainer::derive_seed(opts.sampling.seed, round as u64 + 1),
                ..opts.sampling.clone()
            },
            max_new_tokens: rooms.iter().copied().max().unwrap_or(0),
            ..opts.clone()
        };
        let turns = {
            let envr: &dyn Env = env;
            generate(
                model,
                &contexts,
                &turn_opts,
                &|_, ids| envr.stop(ids),
                device,
            )?
        };
        for ((&row, &room), mut t) in next.iter().zip(&rooms).zip(turns) {
            if t.ids.len() > room {
                t.ids.truncate(room);
                t.logprobs.truncate(room);
                t.finish = Finish::Length;
            }
            let g = &mut gens[row];
            g.ids.extend(t.ids);
            g.logprobs.extend(t.logprobs);
            g.finish = if g.ids.len() >= opts.max_new_tokens && t.finish != Finish::Eos {
                Finish::Length
            } else {
                t.finish
            };
        }
        open = next;
        rounds = round + 1;
    }
    // The round limit ran out: the completions that generated a turn after their last reply
    // and are calling again.
    let unanswered = if max_rounds > 0 && rounds == max_rounds {
        open.iter()
            .filter(|&&r| {
                gens[r].finish != Finish::Length && env.calls_tool(&gens[r].ids, turn_start[r])
            })
            .count()
    } else {
        0
    };
    Ok((calls, failures, unanswered))
}

impl Rollout {
    /// No completions, scored by `n_rewards` reward functions.
    pub fn empty(n_rewards: usize) -> Rollout {
        Rollout {
            items: Vec::new(),
            gens: Vec::new(),
            scores: vec![Vec::new(); n_rewards],
            totals: Vec::new(),
            new_tokens: 0,
            gen_secs: 0.0,
            tool_calls: 0,
            tool_failures: 0,
            tool_unanswered: 0,
        }
    }

    /// Moves the completions of `groups` (each `g` consecutive completions) to the end of
    /// `into`, in the order given; the generation cost stays with `self`.
    pub fn move_groups(&self, groups: &[usize], g: usize, into: &mut Rollout) {
        for &k in groups {
            let r = k * g..(k + 1) * g;
            into.items.extend_from_slice(&self.items[r.clone()]);
            into.gens.extend_from_slice(&self.gens[r.clone()]);
            for (dst, src) in into.scores.iter_mut().zip(&self.scores) {
                dst.extend_from_slice(&src[r.clone()]);
            }
            into.totals.extend_from_slice(&self.totals[r]);
        }
    }

    /// Per reward function: `rewards/<label>/mean` and `/std` over the completions it scored
    /// (none for a reward that scored nothing), and every mean (NaN where none was scored).
    pub fn reward_metrics(&self, labels: &[String]) -> (Vec<(String, f64)>, Vec<f64>) {
        let mut metrics = Vec::new();
        let mut means = Vec::with_capacity(labels.len());
        for (k, label) in labels.iter().enumerate() {
            let vals: Vec<f64> = self.scores[k].iter().flatten().copied().collect();
            let (m, s) = mean_std(&vals);
            means.push(m);
            if !vals.is_empty() {
                metrics.push((format!("rewards/{label}/mean"), m));
                metrics.push((format!("rewards/{label}/std"), s));
            }
        }
        (metrics, means)
    }

    /// Completion lengths in tokens the model wrote (tool replies left out, as TRL counts).
    pub fn lengths(&self) -> Vec<f64> {
        self.gens.iter().map(|g| g.model_tokens() as f64).collect()
    }

    /// Fraction of completions cut at the length limit.
    pub fn clipped_ratio(&self) -> f64 {
        let cut = self
            .gens
            .iter()
            .filter(|g| g.finish == Finish::Length)
            .count();
        cut as f64 / self.gens.len() as f64
    }

    /// `tokens_per_s/rollout`.
    pub fn tokens_per_s(&self) -> f64 {
        self.new_tokens as f64 / self.gen_secs
    }
}

/// Tell the observer what went wrong while scoring since the last call (lines prefixed with the
/// 1-based `step`); returns how many samples could not be judged.
pub fn report_failures(env: &mut dyn Env, step: usize, obs: &mut dyn Observer) -> usize {
    let (notes, failed) = env.drain_failures();
    for n in notes {
        obs.message(&format!("step {step}: {n}"));
    }
    failed
}
