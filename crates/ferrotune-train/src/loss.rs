//! Token log-probabilities of the scored positions of a right-padded batch, through the fused
//! chunked vocabulary op (no (B, T, V) tensor is kept for backward), and the SFT loss built on
//! them. Shared by every trainer that scores tokens (SFT, GRPO, DPO, distillation).

use candle_core::{Device, Result, Tensor};
use ferrotune_models::{Batch, CausalLm};
use ferrotune_nn::{ops, Mode};

/// Convention: `mode.train` means gradients are wanted; in any other mode the result is
/// detached from the graph.
///
/// Log-probs (N,) f32 of every token `ids[i][j]` with `score[i][j] == 1` (j >= 1), predicted
/// from position j - 1 under softmax(logits / temperature). Order: row-major. Also returns the
/// (row, position) of each.
pub fn scored_logprobs(
    model: &dyn CausalLm,
    batch: &Batch,
    score: &[Vec<u8>],
    temperature: f64,
    mode: Mode,
) -> Result<(Tensor, Vec<(usize, usize)>)> {
    let (lp, _, where_) = scored(model, batch, score, temperature, mode, false)?;
    Ok((lp, where_))
}

/// [`scored_logprobs`] and, from the same forward pass, the entropy (N,) f32 of each scored
/// position's next-token distribution at `temperature` (never tracked; one more chunked
/// LM-head product, no (N, V) tensor kept).
pub fn scored_logprobs_entropy(
    model: &dyn CausalLm,
    batch: &Batch,
    score: &[Vec<u8>],
    temperature: f64,
    mode: Mode,
) -> Result<LogpsEntropy> {
    let (lp, ent, where_) = scored(model, batch, score, temperature, mode, true)?;
    let ent = match ent {
        Some(e) => e,
        None => Tensor::zeros(0, candle_core::DType::F32, lp.device())?,
    };
    Ok((lp, ent, where_))
}

/// Log-probs (N,), entropies (N,) and the (row, position) of each.
pub type LogpsEntropy = (Tensor, Tensor, Vec<(usize, usize)>);

type Scored = (Tensor, Option<Tensor>, Vec<(usize, usize)>);

fn scored(
    model: &dyn CausalLm,
    batch: &Batch,
    score: &[Vec<u8>],
    temperature: f64,
    mode: Mode,
    entropy: bool,
) -> Result<Scored> {
    refuse_lm_head_lora(model, mode)?;
    let h = model.hidden(batch, None, mode)?; // (B, T, H)
    let (b, t, hd) = h.dims3()?;
    let ids = batch.input_ids.to_vec2::<u32>()?;
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let mut where_ = Vec::new();
    for (i, row) in score.iter().enumerate().take(b) {
        for j in 1..row.len().min(t) {
            if row[j] == 1 {
                rows.push((i * t + j - 1) as u32);
                targets.push(ids[i][j]);
                where_.push((i, j));
            }
        }
    }
    let dev: &Device = h.device();
    if rows.is_empty() {
        return Ok((
            Tensor::zeros(0, candle_core::DType::F32, dev)?,
            None,
            where_,
        ));
    }
    let flat = h.reshape((b * t, hd))?; // (B*T, H)
    let sel = flat.index_select(&Tensor::new(rows, dev)?, 0)?; // (N, H)
                                                               // Outside train mode no gradient is wanted: detaching keeps the fused op from preparing
                                                               // d logp / d hidden (an extra LM-head product) just because LoRA made `hidden` tracked.
    let sel = if mode.train { sel } else { sel.detach() };
    let w = &model.lm_head().weight;
    let ent = if entropy {
        Some(ops::token_entropy(&sel, w, temperature)?)
    } else {
        None
    };
    let targets = Tensor::new(targets, dev)?;
    let lp = ops::token_logprobs(&sel, w, &targets, temperature)?;
    Ok((lp, ent, where_))
}

/// Sum of next-token NLL over scored tokens, and their count.
pub fn nll_sum(
    model: &dyn CausalLm,
    batch: &Batch,
    score: &[Vec<u8>],
    mode: Mode,
) -> Result<(Tensor, usize)> {
    let (lp, where_) = scored_logprobs(model, batch, score, 1.0, mode)?;
    if where_.is_empty() {
        return Ok((Tensor::zeros((), candle_core::DType::F32, lp.device())?, 0));
    }
    Ok((lp.sum_all()?.neg()?, where_.len()))
}

/// The fused log-prob op reads the LM head's base weight only: refuse a LoRA adapter on it when
/// adapters are on, rather than silently leaving it out.
pub(crate) fn refuse_lm_head_lora(model: &dyn CausalLm, mode: Mode) -> Result<()> {
    if model.lm_head().lora.is_some() && mode.adapters {
        candle_core::bail!(
            "LoRA on lm_head is not supported: remove lm_head from lora.target_modules"
        );
    }
    Ok(())
}
