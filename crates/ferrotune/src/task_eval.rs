//! Task evaluation with the training rewards: generate for every prompt of a task file
//! (greedy, or `samples` seeded samples each), score with the same reward functions GRPO
//! trains on — so the metric and the reward cannot drift apart — and report mean reward, each
//! reward's mean, accuracy (the first correctness reward, e.g. `answer_match`), format rate
//! (the first format reward), pass@k (unbiased estimator of Chen et al. 2021, from `samples`
//! per prompt), completion lengths; plus perplexity of a text file or JSONL `text` column.

use std::path::Path;

use anyhow::{bail, Context, Result};
use ferrotune_generate::{Finish, GenerateOptions, SamplingParams};
use ferrotune_nn::Mode;
use ferrotune_rewards::RewardSet;
use ferrotune_train::rollout::{sample, RewardRole, Split};
use serde::Serialize;
use serde_json::Value;

use crate::eval::{perplexity, Perplexity};
use crate::grpo_run::{PromptItem, TextEnv, ToolEnv};
use crate::lm::Lm;

/// How to generate for a task.
#[derive(Debug, Clone)]
pub struct TaskOptions {
    /// Completions per prompt (1 = one; with temperature 0 that is greedy).
    pub samples: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub max_new_tokens: usize,
    /// Prompts per generate call.
    pub batch_size: usize,
    pub stop: Vec<String>,
    pub seed: u64,
    /// pass@k for each k (k <= samples).
    pub ks: Vec<usize>,
    /// Keep every completion in [`TaskReport::completions`].
    pub keep_completions: bool,
}

impl Default for TaskOptions {
    fn default() -> Self {
        TaskOptions {
            samples: 1,
            temperature: 0.0,
            top_p: None,
            max_new_tokens: 256,
            batch_size: 16,
            stop: Vec::new(),
            seed: 0,
            ks: vec![1],
            keep_completions: false,
        }
    }
}

/// What a task evaluation measured.
#[derive(Debug, Clone, Serialize)]
pub struct TaskReport {
    pub prompts: usize,
    pub samples_per_prompt: usize,
    pub mean_reward: f64,
    /// (label, mean over applicable samples)
    pub rewards: Vec<(String, f64)>,
    /// Mean of the first correctness reward (answer_match / code_tests), if any.
    pub accuracy: Option<f64>,
    /// Mean of the first format reward (format_tags), if any.
    pub format_rate: Option<f64>,
    /// (k, pass@k) from the first correctness reward (a sample passes when it scores >= 1).
    pub pass_at_k: Vec<(usize, f64)>,
    pub mean_length: f64,
    pub truncated_fraction: f64,
    /// Tool calls per completion (runs with tools).
    pub tool_calls_per_completion: Option<f64>,
    /// Failed tool calls over all calls (TRL's `tools/failure_frequency`).
    pub tool_failure_frequency: Option<f64>,
    pub seconds: f64,
    /// With `keep_completions`: one record per completion (prompt, completion, turns, rewards).
    #[serde(skip)]
    pub completions: Vec<Value>,
}

/// Unbiased pass@k from n samples with c correct: 1 − C(n−c, k) / C(n, k).
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if k == 0 || k > n {
        return f64::NAN;
    }
    if n - c < k {
        return 1.0;
    }
    // C(n−c, k) / C(n, k) = Π_{i=n−c+1}^{n} (1 − k / i)
    let mut ratio = 1.0;
    for i in (n - c + 1)..=n {
        ratio *= 1.0 - k as f64 / i as f64;
    }
    1.0 - ratio
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        f64::NAN
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// Evaluate `items` with `rewards` (roles say which reward is correctness / format). With
/// `tools`, completions run the same multi-turn tool loop as GRPO's rollouts and are scored on
/// the final model turn, so a tool run is evaluated as it was trained.
pub fn eval_task(
    lm: &Lm,
    items: &[PromptItem],
    rewards: &RewardSet,
    roles: &[RewardRole],
    tools: Option<&ToolEnv>,
    opts: &TaskOptions,
) -> Result<TaskReport> {
    if items.is_empty() {
        bail!("the task has no prompts");
    }
    if opts.max_new_tokens == 0 {
        bail!("max_new_tokens must be at least 1");
    }
    if opts.samples > 1 && opts.temperature == 0.0 {
        bail!(
            "{} samples per prompt at temperature 0: greedy decoding repeats one completion, so pass@k would be pass@1; give a temperature > 0",
            opts.samples
        );
    }
    if let Some(&k) = opts.ks.iter().find(|&&k| k == 0 || k > opts.samples) {
        bail!(
            "pass@{k} needs 1 <= k <= samples (samples = {})",
            opts.samples
        );
    }
    let t0 = std::time::Instant::now();
    let labels = rewards.labels();
    let n = opts.samples.max(1);
    let mut env = TextEnv::new(
        &lm.tokenizer,
        (Vec::new(), items.to_vec()),
        rewards,
        roles.to_vec(),
        opts.stop.clone(),
    );
    env.tools = tools;
    let mut per: Vec<Vec<f64>> = vec![vec![]; labels.len()];
    let mut totals = Vec::new();
    let mut lens = Vec::new();
    let mut truncated = 0usize;
    let (mut tool_calls, mut tool_failures) = (0usize, 0usize);
    let mut kept = Vec::new();
    // correct[p] = how many of prompt p's samples passed.
    let correct_k = roles.iter().position(|r| *r == RewardRole::Correctness);
    let mut correct = vec![0usize; items.len()];
    let chunk = opts.batch_size.max(1);
    for (c, start) in (0..items.len()).step_by(chunk).enumerate() {
        let end = (start + chunk).min(items.len());
        let idx: Vec<usize> = (start..end)
            .flat_map(|i| std::iter::repeat_n(i, n))
            .collect();
        let gen_opts = GenerateOptions {
            sampling: SamplingParams {
                temperature: opts.temperature,
                top_k: None,
                top_p: opts.top_p,
                seed: opts.seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            },
            max_new_tokens: opts.max_new_tokens,
            eos_ids: lm.eos_ids(),
            pad_id: lm.pad_id(),
            mode: Mode::EVAL,
        };
        let ro = sample(
            lm.model.as_ref(),
            &mut env,
            Split::Eval,
            idx,
            &gen_opts,
            &lm.device,
        )?;
        tool_calls += ro.tool_calls;
        tool_failures += ro.tool_failures;
        for (k, s) in ro.scores.iter().enumerate() {
            per[k].extend(s.iter().flatten());
        }
        totals.extend(ro.totals.iter().copied().filter(|t| !t.is_nan()));
        for (i, g) in ro.gens.iter().enumerate() {
            if opts.keep_completions {
                let scores: Vec<Option<f64>> = ro.scores.iter().map(|s| s[i]).collect();
                let prompt = &items[ro.items[i]].text;
                kept.push(env.completion_record(
                    prompt,
                    &g.ids,
                    &g.injected,
                    &scores,
                    ro.totals[i],
                ));
            }
            lens.push(g.ids.len() as f64);
            if g.finish == Finish::Length {
                truncated += 1;
            }
            if let Some(k) = correct_k {
                if ro.scores[k][i].unwrap_or(0.0) >= 1.0 {
                    correct[ro.items[i]] += 1;
                }
            }
        }
    }
    let role_mean = |role: RewardRole| roles.iter().position(|r| *r == role).map(|k| mean(&per[k]));
    let pass = match correct_k {
        Some(_) => opts
            .ks
            .iter()
            .map(|&k| {
                let v: Vec<f64> = correct.iter().map(|&c| pass_at_k(n, c, k)).collect();
                (k, mean(&v))
            })
            .collect(),
        None => Vec::new(),
    };
    let completions = lens.len().max(1) as f64;
    Ok(TaskReport {
        prompts: items.len(),
        samples_per_prompt: n,
        mean_reward: mean(&totals),
        rewards: labels
            .iter()
            .zip(&per)
            .map(|(l, v)| (l.clone(), mean(v)))
            .collect(),
        accuracy: role_mean(RewardRole::Correctness),
        format_rate: role_mean(RewardRole::Format),
        pass_at_k: pass,
        mean_length: mean(&lens),
        truncated_fraction: truncated as f64 / completions,
        tool_calls_per_completion: tools.map(|_| tool_calls as f64 / completions),
        tool_failure_frequency: tools.map(|_| tool_failures as f64 / tool_calls.max(1) as f64),
        seconds: t0.elapsed().as_secs_f64(),
        completions: kept,
    })
}

/// Perplexity of a plain text file (sliding window) or of a JSONL/Parquet/CSV file's `text`
/// column (each row scored on its own; one exp(mean NLL) over all their tokens). `window`
/// defaults to the model's context (at most 2048), `stride` to half the window.
pub fn perplexity_of_file(
    lm: &Lm,
    path: &Path,
    window: Option<usize>,
    stride: Option<usize>,
) -> Result<Perplexity> {
    let window = window.unwrap_or(lm.model.config().max_position_embeddings.min(2048));
    let stride = stride.unwrap_or(window / 2);
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let texts: Vec<String> = if ["jsonl", "parquet", "csv"].contains(&ext) {
        let rows = ferrotune_data::read_rows(path)?;
        rows.iter()
            .map(|r| {
                r.fields
                    .get("text")
                    .and_then(|v| v.as_str())
                    .map(String::from)
                    .with_context(|| {
                        format!("{}: line {}: no `text` string", path.display(), r.line)
                    })
            })
            .collect::<Result<_>>()?
    } else {
        vec![std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read text file", path.display()))?]
    };
    let mut total = Perplexity {
        nll_sum: 0.0,
        tokens: 0,
    };
    for t in &texts {
        let ids = lm.tokenizer.encode(t, true)?;
        if ids.len() < 2 {
            continue;
        }
        let p = perplexity(
            lm.model.as_ref(),
            &ids,
            window,
            stride,
            Mode::EVAL,
            &lm.device,
        )?;
        total.nll_sum += p.nll_sum;
        total.tokens += p.tokens;
    }
    if total.tokens == 0 {
        bail!("{}: no text with at least 2 tokens", path.display());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// pass@k against the direct combinatorial definition.
    #[test]
    fn pass_at_k_is_the_unbiased_estimator() {
        fn choose(n: usize, k: usize) -> f64 {
            (0..k).map(|i| (n - i) as f64 / (i + 1) as f64).product()
        }
        for n in 1..=10 {
            for c in 0..=n {
                for k in 1..=n {
                    let direct = if n - c < k {
                        1.0
                    } else {
                        1.0 - choose(n - c, k) / choose(n, k)
                    };
                    assert!((pass_at_k(n, c, k) - direct).abs() < 1e-12, "{n} {c} {k}");
                }
            }
        }
        assert_eq!(pass_at_k(5, 0, 1), 0.0);
        assert_eq!(pass_at_k(5, 5, 1), 1.0);
        assert!((pass_at_k(4, 1, 1) - 0.25).abs() < 1e-12);
    }
}
