//! Generation over token ids: batched, KV-cached, greedy or sampled (temperature, top-k,
//! top-p, seeded), stopping on end-of-sequence ids or a caller's stop rule, returning each
//! sampled token's log-probability; speculative decoding with a draft model (`speculative`).
//!
//! Owns: sampling and the decode loop. Does not own: text, chat templates or rewards (stop
//! strings arrive as a callback over ids, which the caller decodes).

pub mod sample;
pub mod speculative;

use candle_core::{DType, Device, Result, Tensor, D};
use ferrotune_models::{Batch, CausalLm};
use ferrotune_nn::Mode;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub use sample::{log_softmax, sample_token, SamplingParams};

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence id was sampled (it is included in `ids`).
    Eos,
    /// The caller's stop rule fired.
    Stop,
    /// `max_new_tokens` reached: the completion is truncated.
    Length,
}

/// One generated completion.
#[derive(Debug, Clone)]
pub struct Generation {
    /// New token ids (prompt excluded).
    pub ids: Vec<u32>,
    /// log p(token) under softmax(logits / temperature) (raw logits when greedy), per token.
    pub logprobs: Vec<f32>,
    pub finish: Finish,
    /// Ranges of `ids` the caller inserted between turns (tool results of a multi-turn
    /// rollout): not sampled, so they carry no behaviour log-prob (0) and get no loss. Empty
    /// for a single-turn completion.
    pub injected: Vec<std::ops::Range<usize>>,
}

impl Generation {
    /// 1 for each sampled token, 0 for each inserted one.
    pub fn model_mask(&self) -> Vec<u8> {
        let mut m = vec![1u8; self.ids.len()];
        for r in &self.injected {
            m[r.clone()].fill(0);
        }
        m
    }

    /// Tokens the model sampled (all but the inserted ones).
    pub fn model_tokens(&self) -> usize {
        self.ids.len() - self.injected.iter().map(|r| r.len()).sum::<usize>()
    }
}

/// Options of one generate call.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    pub eos_ids: Vec<u32>,
    /// Id used for left padding (never attended to).
    pub pad_id: u32,
    pub mode: Mode,
}

/// Generate continuations of `prompts` (token ids) in one left-padded batch with a KV cache.
/// `stop` is called after each new token with (row, ids so far) and may end that row.
///
/// Finished rows leave the batch: once at least an eighth of the rows still in it are done,
/// the cache and the step inputs keep only the unfinished ones, so a batch whose completions
/// end at different lengths does not pay full-batch decoding to the longest. Until then a
/// finished row feeds padding that no one attends to. Either way each row gets the same
/// tokens and the generator is consumed in the same order (one draw per unfinished row, in
/// row order), so a seed gives the same completions.
pub fn generate(
    model: &dyn CausalLm,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    stop: &dyn Fn(usize, &[u32]) -> bool,
    device: &Device,
) -> Result<Vec<Generation>> {
    let b = prompts.len();
    if b == 0 {
        return Ok(vec![]);
    }
    if prompts.iter().any(|p| p.is_empty()) {
        candle_core::bail!("generate: every prompt needs at least one token");
    }
    if let Err(e) = opts.sampling.check() {
        candle_core::bail!("generate: {e}");
    }
    let mut rng = StdRng::seed_from_u64(opts.sampling.seed);
    let batch = Batch::left_padded(prompts, opts.pad_id, device)?;
    let (_, t0) = batch.dims()?;
    // Per row of the current batch: its prompt's index, key mask, next position, done flag.
    let mut rows: Vec<usize> = (0..b).collect();
    let mut mask: Vec<Vec<u8>> = prompts
        .iter()
        .map(|p| {
            let mut m = vec![0u8; t0 - p.len()];
            m.extend(std::iter::repeat_n(1u8, p.len()));
            m
        })
        .collect();
    let mut next_pos: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
    let mut done = vec![false; b];
    let mut cache = model.new_cache();
    let mut out: Vec<Generation> = (0..b)
        .map(|_| Generation {
            ids: vec![],
            logprobs: vec![],
            finish: Finish::Length,
            injected: vec![],
        })
        .collect();

    let h = model.hidden(&batch, Some(&mut cache), opts.mode)?; // (B, T0, H)
    let mut last = h.narrow(1, t0 - 1, 1)?; // (B, 1, H)
    for _step in 0..opts.max_new_tokens {
        let logits = model
            .lm_head()
            .forward(&last, opts.mode)?
            .squeeze(1)?
            .to_dtype(DType::F32)?; // (rows, V)
        let drawn = sample_batch(&logits, &done, &opts.sampling, &mut rng)?;
        let mut new_ids = Vec::with_capacity(rows.len());
        for (k, drawn) in drawn.into_iter().enumerate() {
            let Some((tok, lp)) = drawn else {
                new_ids.push(opts.pad_id);
                continue;
            };
            let i = rows[k];
            out[i].ids.push(tok);
            out[i].logprobs.push(lp);
            if opts.eos_ids.contains(&tok) {
                done[k] = true;
                out[i].finish = Finish::Eos;
            } else if stop(i, &out[i].ids) {
                done[k] = true;
                out[i].finish = Finish::Stop;
            }
            new_ids.push(tok);
        }
        let n_done = done.iter().filter(|&&d| d).count();
        if n_done == rows.len() {
            break;
        }
        if n_done * 8 >= rows.len() {
            let keep: Vec<usize> = (0..rows.len()).filter(|&k| !done[k]).collect();
            let idx = Tensor::from_vec(
                keep.iter().map(|&k| k as u32).collect::<Vec<_>>(),
                keep.len(),
                device,
            )?;
            cache.select_rows(&idx)?;
            let pick = |v: &[u32]| keep.iter().map(|&k| v[k]).collect::<Vec<_>>();
            rows = keep.iter().map(|&k| rows[k]).collect();
            mask = keep.iter().map(|&k| std::mem::take(&mut mask[k])).collect();
            next_pos = pick(&next_pos);
            new_ids = pick(&new_ids);
            done = vec![false; rows.len()];
        }
        // Feed this step's tokens; finished rows feed padding that no one attends to.
        for (k, m) in mask.iter_mut().enumerate() {
            m.push(if done[k] { 0 } else { 1 });
        }
        let tk = mask[0].len();
        let flat: Vec<u8> = mask.iter().flatten().copied().collect();
        let n = rows.len();
        let step = Batch {
            input_ids: Tensor::from_vec(new_ids, (n, 1), device)?,
            position_ids: Tensor::from_vec(next_pos.clone(), (n, 1), device)?,
            key_mask: Some(Tensor::from_vec(flat, (n, tk), device)?),
            segments: None,
        };
        for p in next_pos.iter_mut() {
            *p += 1;
        }
        last = model.hidden(&step, Some(&mut cache), opts.mode)?; // (rows, 1, H)
    }
    Ok(out)
}

/// Log-probabilities (B, T-1) of each next token under the model, for right-padded `batch`
/// (row i scores ids[1..]); a convenience for evaluation and tests.
pub fn next_token_logprobs(model: &dyn CausalLm, batch: &Batch, mode: Mode) -> Result<Tensor> {
    let logits = model.forward(batch, None, mode)?.to_dtype(DType::F32)?; // (B, T, V)
    let (_, t, _) = logits.dims3()?;
    let logits = logits.narrow(1, 0, t - 1)?;
    let max = logits.max_keepdim(D::Minus1)?;
    let lse = (logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + max)?;
    let targets = batch.input_ids.narrow(1, 1, t - 1)?.unsqueeze(2)?; // (B, T-1, 1)
    logits
        .gather(&targets.contiguous()?, 2)?
        .squeeze(2)?
        .broadcast_sub(&lse.squeeze(2)?)
}

/// One draw per unfinished row of `logits` (B, V) f32, consuming the generator in row order
/// (one uniform per row when sampling, none when greedy). On a CUDA device, without top-k/top-p,
/// the draw runs there and only ids and log-probs come back; otherwise the rows are copied to
/// the host for [`sample_token`]. Both apply the same rule, so a seed gives the same tokens.
fn sample_batch(
    logits: &Tensor,
    done: &[bool],
    p: &SamplingParams,
    rng: &mut StdRng,
) -> Result<Vec<Option<(u32, f32)>>> {
    let truncates = p.top_k.is_some_and(|k| k > 0) || p.top_p.is_some_and(|x| x < 1.0);
    if logits.device().is_cuda() && !truncates {
        let u: Vec<f32> = done
            .iter()
            .map(|&d| {
                if d || p.temperature <= 0.0 {
                    0.0
                } else {
                    rng.random::<f64>() as f32
                }
            })
            .collect();
        if let Some((ids, lps)) =
            ferrotune_nn::ops::sample_rows_on_device(logits, &u, p.temperature)?
        {
            return Ok(done
                .iter()
                .zip(ids.into_iter().zip(lps))
                .map(|(&d, x)| (!d).then_some(x))
                .collect());
        }
    }
    let rows = logits.to_vec2::<f32>()?;
    Ok(rows
        .iter()
        .zip(done)
        .map(|(row, &d)| (!d).then(|| sample_token(row, p, rng)))
        .collect())
}
