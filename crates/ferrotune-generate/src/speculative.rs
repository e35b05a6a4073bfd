//! Speculative decoding (Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023, arXiv
//! 2302.01318): a small draft model proposes `num_draft_tokens` (k) tokens one at a time with its
//! own KV cache, the target scores all k + 1 next-token distributions in one forward pass with
//! its KV cache, and each draft token x is kept with probability min(1, p(x)/q(x)); the first
//! rejected one is replaced by a sample from norm(max(0, p − q)), and when all k are kept one
//! bonus token is drawn from the target's last distribution. The emitted tokens then follow the
//! target's distribution exactly, whatever the draft. Greedy (temperature 0): a draft token is
//! kept while it equals the target's argmax, and the first mismatch emits the target's argmax,
//! so the output is the target's own greedy output.
//!
//! p and q are the distributions [`crate::sample_token`] draws from — softmax(logits / T), then
//! top-k and top-p, renormalised — for target and draft alike, as transformers' assisted
//! generation applies its logits processors to both before the acceptance test. k is fixed per
//! call (transformers' `num_assistant_tokens` with the "constant" schedule; its adaptive
//! schedule is not mirrored). The draft must share the target's tokenizer; the vocabulary sizes
//! are checked.
//!
//! Batch size 1 only for now: one prompt, no padding, so the KV caches roll back by plain
//! truncation to the accepted length ([`KvCache::truncate`]).
//!
//! Owns: the draft–verify loop, the acceptance rule and its statistics. Does not own: loading
//! either model, text, or the batched decode loop ([`crate::generate`]).

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use ferrotune_models::{Batch, CausalLm};
use ferrotune_nn::{KvCache, Mode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::sample::{log_softmax, SamplingParams};
use crate::{Finish, Generation};

/// Why a speculative call is refused.
#[derive(Debug, thiserror::Error)]
pub enum SpeculativeError {
    #[error("speculative decoding: the draft's vocabulary ({draft}) differs from the target's ({target}); the draft must share the target's tokenizer")]
    Vocab { target: usize, draft: usize },
    #[error("speculative decoding: the prompt needs at least one token")]
    EmptyPrompt,
    #[error("speculative decoding: num_draft_tokens must be at least 1")]
    DraftTokens,
    #[error(
        "speculative decoding: the draft's logits have {draft} entries, the target's {target}"
    )]
    Logits { target: usize, draft: usize },
}

fn wrap(e: SpeculativeError) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// Options of one speculative call.
#[derive(Debug, Clone)]
pub struct SpeculativeOptions {
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    pub eos_ids: Vec<u32>,
    /// Tokens the draft proposes per round (k; transformers' `num_assistant_tokens`).
    pub num_draft_tokens: usize,
    /// How both models run (adapters on or off).
    pub mode: Mode,
}

impl Default for SpeculativeOptions {
    fn default() -> Self {
        SpeculativeOptions {
            sampling: SamplingParams::default(),
            max_new_tokens: 64,
            eos_ids: vec![],
            num_draft_tokens: 5,
            mode: Mode::EVAL,
        }
    }
}

/// What one call (or, summed with [`SpeculativeStats::add`], a benchmark) did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpeculativeStats {
    /// Draft tokens proposed.
    pub drafted: usize,
    /// Draft tokens the target kept.
    pub accepted: usize,
    /// Draft–verify rounds (each one target forward pass).
    pub rounds: usize,
    pub target_forwards: usize,
    pub draft_forwards: usize,
    /// Tokens emitted (accepted drafts + one target token per round, cut at a stop).
    pub new_tokens: usize,
    /// Wall time of the decode, prompt processing included.
    pub seconds: f64,
}

impl SpeculativeStats {
    /// accepted / drafted (0 when nothing was drafted).
    pub fn acceptance_rate(&self) -> f64 {
        if self.drafted == 0 {
            0.0
        } else {
            self.accepted as f64 / self.drafted as f64
        }
    }

    /// New tokens per second of wall time.
    pub fn tokens_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.new_tokens as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// Sum another call's counts into this one.
    pub fn add(&mut self, o: &SpeculativeStats) {
        self.drafted += o.drafted;
        self.accepted += o.accepted;
        self.rounds += o.rounds;
        self.target_forwards += o.target_forwards;
        self.draft_forwards += o.draft_forwards;
        self.new_tokens += o.new_tokens;
        self.seconds += o.seconds;
    }
}

/// One speculative generation: the tokens (as [`crate::generate`] returns them, log-probs
/// under the target) and the statistics.
#[derive(Debug, Clone)]
pub struct SpeculativeOutput {
    pub generation: Generation,
    pub stats: SpeculativeStats,
}

/// The distribution [`sample_token`] draws from, over the whole vocabulary: softmax(logits / T)
/// kept to its top-k, then top-p, renormalised (same order, same ties); greedy (T = 0) is
/// one-hot at the argmax.
pub fn sampling_distribution(logits: &[f32], p: &SamplingParams) -> Vec<f64> {
    let mut out = vec![0.0; logits.len()];
    if logits.is_empty() {
        return out;
    }
    if p.temperature <= 0.0 {
        out[argmax(logits)] = 1.0;
        return out;
    }
    let scaled: Vec<f32> = logits
        .iter()
        .map(|&x| (x as f64 / p.temperature) as f32)
        .collect();
    let lp = log_softmax(&scaled);
    let top_k = p.top_k.filter(|&k| k > 0 && k < lp.len());
    let top_p = p.top_p.filter(|&x| x < 1.0);
    if top_k.is_none() && top_p.is_none() {
        // Nothing is cut: no need to sort the vocabulary.
        let total: f64 = lp.iter().map(|&x| (x as f64).exp()).sum();
        return lp.iter().map(|&x| (x as f64).exp() / total).collect();
    }
    let mut order: Vec<usize> = (0..lp.len()).collect();
    order.sort_by(|&a, &b| lp[b].total_cmp(&lp[a]).then(a.cmp(&b)));
    let mut keep = order.len();
    if let Some(k) = top_k {
        keep = keep.min(k);
    }
    if let Some(top_p) = top_p {
        let mut cum = 0.0f64;
        for (n, &i) in order.iter().take(keep).enumerate() {
            cum += (lp[i] as f64).exp();
            if cum >= top_p {
                keep = n + 1;
                break;
            }
        }
    }
    let kept = &order[..keep.max(1)];
    let total: f64 = kept.iter().map(|&i| (lp[i] as f64).exp()).sum();
    for &i in kept {
        out[i] = (lp[i] as f64).exp() / total;
    }
    out
}

/// First index of the largest logit (the greedy choice of [`sample_token`]).
fn argmax(xs: &[f32]) -> usize {
    xs.iter()
        .enumerate()
        .fold((0usize, f32::NEG_INFINITY), |acc, (i, &x)| {
            if x > acc.1 {
                (i, x)
            } else {
                acc
            }
        })
        .0
}

/// Probability that draft token `x` (drawn from `q`) is kept: min(1, p(x) / q(x)).
pub fn acceptance_probability(p: &[f64], q: &[f64], x: usize) -> f64 {
    if q[x] <= 0.0 {
        // The draft could not have proposed x; refuse it rather than divide by zero.
        return 0.0;
    }
    (p[x] / q[x]).min(1.0)
}

/// The distribution a rejection resamples from: norm(max(0, p − q)). When p ≤ q everywhere
/// (p = q up to rounding, so a rejection is a rounding event) it falls back to p.
pub fn residual_distribution(p: &[f64], q: &[f64]) -> Vec<f64> {
    let r: Vec<f64> = p.iter().zip(q).map(|(&a, &b)| (a - b).max(0.0)).collect();
    let total: f64 = r.iter().sum();
    if total > 0.0 {
        r.into_iter().map(|x| x / total).collect()
    } else {
        p.to_vec()
    }
}

/// A draw from the probability vector `probs` (which need not sum exactly to 1).
pub fn sample_from(probs: &[f64], rng: &mut StdRng) -> usize {
    let total: f64 = probs.iter().sum();
    let mut u = rng.random::<f64>() * total;
    let mut last = 0;
    for (i, &w) in probs.iter().enumerate() {
        if w <= 0.0 {
            continue;
        }
        last = i;
        u -= w;
        if u < 0.0 {
            return i;
        }
    }
    last
}

/// The verdict on one round: `p` holds the target's k + 1 distributions, `q` the draft's k, and
/// `drafts` the k proposed ids. Returns how many drafts were kept (a prefix) and the token that
/// follows them (the replacement at the first rejection, or the bonus token).
pub fn verify_drafts(
    p: &[Vec<f64>],
    q: &[Vec<f64>],
    drafts: &[u32],
    rng: &mut StdRng,
) -> (usize, u32) {
    for (i, &x) in drafts.iter().enumerate() {
        let a = acceptance_probability(&p[i], &q[i], x as usize);
        // u in [0, 1): kept with probability exactly a (a = 1 always keeps, a = 0 never).
        if rng.random::<f64>() < a {
            continue;
        }
        let r = residual_distribution(&p[i], &q[i]);
        return (i, sample_from(&r, rng) as u32);
    }
    (drafts.len(), sample_from(&p[drafts.len()], rng) as u32)
}

/// Logits (rows, V) f32 of the last `rows` positions after feeding `tokens` on top of `cache`
/// (batch of one, no padding: positions continue from the cache length).
fn forward_last(
    model: &dyn CausalLm,
    tokens: &[u32],
    cache: &mut KvCache,
    rows: usize,
    mode: Mode,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    let (past, t) = (cache.len(), tokens.len());
    let positions: Vec<u32> = (past as u32..(past + t) as u32).collect();
    let batch = Batch {
        input_ids: Tensor::from_vec(tokens.to_vec(), (1, t), device)?,
        position_ids: Tensor::from_vec(positions, (1, t), device)?,
        key_mask: None,
        segments: None,
    };
    let h = model.hidden(&batch, Some(cache), mode)?; // (1, T, H)
    let h = h.narrow(1, t - rows, rows)?; // (1, rows, H): the head runs on these only
    model
        .lm_head()
        .forward(&h, mode)?
        .squeeze(0)?
        .to_dtype(DType::F32)? // (rows, V)
        .to_vec2::<f32>()
}

/// Log-prob of `tok` as [`crate::generate`] reports it: under softmax(logits / T), raw logits
/// when greedy.
fn target_logprob(row: &[f32], p: &SamplingParams, tok: u32) -> f32 {
    if p.temperature <= 0.0 {
        return log_softmax(row)[tok as usize];
    }
    let scaled: Vec<f32> = row
        .iter()
        .map(|&x| (x as f64 / p.temperature) as f32)
        .collect();
    log_softmax(&scaled)[tok as usize]
}

/// Speculative generation of one continuation of `prompt`, seeded by `opts.sampling.seed`.
/// `stop` sees the new ids so far after each emitted token and may end the generation.
pub fn speculative_generate(
    target: &dyn CausalLm,
    draft: &dyn CausalLm,
    prompt: &[u32],
    opts: &SpeculativeOptions,
    stop: &dyn Fn(&[u32]) -> bool,
    device: &Device,
) -> Result<SpeculativeOutput> {
    let mut rng = StdRng::seed_from_u64(opts.sampling.seed);
    speculative_generate_with_rng(target, draft, prompt, opts, stop, device, &mut rng)
}

/// [`speculative_generate`] drawing from the caller's generator (many samples from one seed).
pub fn speculative_generate_with_rng(
    target: &dyn CausalLm,
    draft: &dyn CausalLm,
    prompt: &[u32],
    opts: &SpeculativeOptions,
    stop: &dyn Fn(&[u32]) -> bool,
    device: &Device,
    rng: &mut StdRng,
) -> Result<SpeculativeOutput> {
    let (tv, dv) = (target.config().vocab_size, draft.config().vocab_size);
    if tv != dv {
        return Err(wrap(SpeculativeError::Vocab {
            target: tv,
            draft: dv,
        }));
    }
    if prompt.is_empty() {
        return Err(wrap(SpeculativeError::EmptyPrompt));
    }
    if let Err(e) = opts.sampling.check() {
        candle_core::bail!("speculative generate: {e}");
    }
    if opts.num_draft_tokens == 0 {
        return Err(wrap(SpeculativeError::DraftTokens));
    }
    let start = Instant::now();
    let sp = &opts.sampling;
    let greedy = sp.temperature <= 0.0;
    let mut stats = SpeculativeStats::default();
    let mut out = Generation {
        ids: vec![],
        logprobs: vec![],
        finish: Finish::Length,
        injected: vec![],
    };
    // Invariant between rounds: both caches hold a prefix of `seq` that excludes at least its
    // last token, which no model has seen yet.
    let mut seq: Vec<u32> = prompt.to_vec();
    let mut tcache = target.new_cache();
    let mut dcache = draft.new_cache();
    'rounds: while out.ids.len() < opts.max_new_tokens {
        // A round emits at most k + 1 tokens: draft no more than the budget leaves room for.
        let k = opts
            .num_draft_tokens
            .min(opts.max_new_tokens - out.ids.len() - 1);
        let mut drafts: Vec<u32> = Vec::with_capacity(k);
        let mut q: Vec<Vec<f64>> = Vec::with_capacity(k);
        for _ in 0..k {
            let feed = match drafts.last() {
                Some(&x) => vec![x],
                None => seq[dcache.len()..].to_vec(),
            };
            let row = forward_last(draft, &feed, &mut dcache, 1, opts.mode, device)?.remove(0);
            stats.draft_forwards += 1;
            if row.len() != tv {
                return Err(wrap(SpeculativeError::Logits {
                    target: tv,
                    draft: row.len(),
                }));
            }
            let x = if greedy {
                argmax(&row) as u32
            } else {
                let qi = sampling_distribution(&row, sp);
                let x = sample_from(&qi, rng) as u32;
                q.push(qi);
                x
            };
            drafts.push(x);
        }
        // The target scores the unseen part of `seq` and every draft in one pass: row i is
        // its distribution for draft i, row k the one after the last draft.
        let mut feed = seq[tcache.len()..].to_vec();
        feed.extend_from_slice(&drafts);
        let rows = forward_last(target, &feed, &mut tcache, k + 1, opts.mode, device)?;
        stats.target_forwards += 1;
        stats.rounds += 1;
        stats.drafted += k;
        let (kept, next) = if greedy {
            let kept = drafts
                .iter()
                .zip(&rows)
                .take_while(|(&x, row)| argmax(row) as u32 == x)
                .count();
            (kept, argmax(&rows[kept]) as u32)
        } else {
            let p: Vec<Vec<f64>> = rows.iter().map(|r| sampling_distribution(r, sp)).collect();
            verify_drafts(&p, &q, &drafts, rng)
        };
        stats.accepted += kept;
        let emitted = drafts[..kept].iter().copied().chain(std::iter::once(next));
        for (row, tok) in rows.iter().zip(emitted) {
            seq.push(tok);
            out.ids.push(tok);
            out.logprobs.push(target_logprob(row, sp, tok));
            if opts.eos_ids.contains(&tok) {
                out.finish = Finish::Eos;
                break 'rounds;
            }
            if stop(&out.ids) {
                out.finish = Finish::Stop;
                break 'rounds;
            }
        }
        // Roll back: keep what both models saw of the accepted prefix; the last emitted token
        // is new to both.
        let keep = seq.len() - 1;
        tcache.truncate(tcache.len().min(keep))?;
        dcache.truncate(dcache.len().min(keep))?;
    }
    stats.new_tokens = out.ids.len();
    stats.seconds = start.elapsed().as_secs_f64();
    Ok(SpeculativeOutput {
        generation: out,
        stats,
    })
}
