//! The teacher's side of distillation: which positions of a batch are scored, the logits
//! there (student or teacher, no (B, T, V) tensor), the teacher's rows in the three forms
//! `distill_loss` takes (full logits, live top-k, cached top-k), and the student's
//! cross-entropy at the same rows.
//!
//! Owns: selecting and producing those rows. Does not own: the divergence
//! (`distill_loss`), the loop (`distill`), or the cache file (the CLI's `teacher_cache`).

use candle_core::{DType, Device, Tensor, D};
use ferrotune_data::{collate_right, Collated, Tokenized};
use ferrotune_models::CausalLm;
use ferrotune_nn::Mode;

use crate::distill_loss::{Teacher, TeacherTopK};
use crate::error::{Result, TrainError};
use crate::trainer::batch_tensors;

/// The teacher's top-k log-probs of every scored token of every example, as a cache holds them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CachedTeacher {
    pub k: usize,
    /// Example `key`'s rows are `offsets[key]..offsets[key + 1]` (one per scored token, in
    /// order); length = examples + 1.
    pub offsets: Vec<usize>,
    /// (rows, k) row-major token ids.
    pub ids: Vec<u32>,
    /// (rows, k) log_softmax(teacher / loss_temperature) at `ids`; −inf = absent slot.
    pub logprobs: Vec<f32>,
}

/// Where the teacher's distribution comes from.
#[derive(Clone, Copy)]
pub enum TeacherSource<'a> {
    /// The frozen teacher model, run without a graph; `top_k` = 0 compares over the whole
    /// vocabulary, else over the teacher's top-k log-probs (as a cache would).
    Live {
        model: &'a dyn CausalLm,
        top_k: usize,
    },
    /// Rows written by `ferrotune distill cache-teacher`; the teacher is never loaded.
    Cache(&'a CachedTeacher),
}

/// (row, position) of every scored token of a collated batch, in row-major order: position j
/// with `loss_mask[j] == 1` and j >= 1, predicted from position j − 1.
pub(crate) fn scored_positions(c: &Collated) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for (i, row) in c.loss_mask.iter().enumerate() {
        for (j, &m) in row.iter().enumerate().skip(1) {
            if m == 1 {
                out.push((i, j));
            }
        }
    }
    out
}

/// Logits (N, V) in f32 at the scored positions `at` of `batch` (the rows that predict them).
/// In a non-train `mode` the result is detached.
pub(crate) fn logits_at(
    model: &dyn CausalLm,
    batch: &ferrotune_models::Batch,
    at: &[(usize, usize)],
    mode: Mode,
) -> candle_core::Result<Tensor> {
    let h = model.hidden(batch, None, mode)?; // (B, T, H)
    let (b, t, hd) = h.dims3()?;
    let rows: Vec<u32> = at.iter().map(|&(i, j)| (i * t + j - 1) as u32).collect();
    let flat = h.reshape((b * t, hd))?; // (B*T, H)
    let sel = flat.index_select(&Tensor::new(rows, h.device())?, 0)?; // (N, H)
    let sel = if mode.train { sel } else { sel.detach() };
    let logits = model.lm_head().forward(&sel, mode)?.to_dtype(DType::F32)?; // (N, V)
    Ok(if mode.train { logits } else { logits.detach() })
}

/// Top-k of log_softmax(logits / temperature) per row of (N, V) logits: ids and log-probs,
/// each (N, k) row-major, computed in f64. Ties keep the lower id first.
pub fn topk_logprobs(
    logits: &Tensor,
    k: usize,
    temperature: f64,
) -> candle_core::Result<(Vec<u32>, Vec<f32>)> {
    let rows = logits.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let mut ids = Vec::with_capacity(rows.len() * k);
    let mut lps = Vec::with_capacity(rows.len() * k);
    for row in rows {
        let scaled: Vec<f64> = row.iter().map(|&x| x / temperature).collect();
        let max = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + scaled.iter().map(|&x| (x - max).exp()).sum::<f64>().ln();
        let mut order: Vec<usize> = (0..scaled.len()).collect();
        order.sort_by(|&a, &b| scaled[b].total_cmp(&scaled[a]).then(a.cmp(&b)));
        for slot in 0..k {
            match order.get(slot) {
                Some(&v) => {
                    ids.push(v as u32);
                    lps.push((scaled[v] - lse) as f32);
                }
                None => {
                    ids.push(0);
                    lps.push(f32::NEG_INFINITY);
                }
            }
        }
    }
    Ok((ids, lps))
}

/// The teacher's top-k rows of every scored token of `seqs` (one forward, no graph), and how
/// many rows each sequence has: what `cache-teacher` stores.
pub fn teacher_topk_rows(
    teacher: &dyn CausalLm,
    seqs: &[&Tokenized],
    pad_id: u32,
    k: usize,
    temperature: f64,
    device: &Device,
) -> Result<(Vec<u32>, Vec<f32>, Vec<usize>)> {
    let c = collate_right(seqs, pad_id);
    let at = scored_positions(&c);
    let mut counts = vec![0usize; seqs.len()];
    for &(i, _) in &at {
        counts[i] += 1;
    }
    if at.is_empty() {
        return Ok((vec![], vec![], counts));
    }
    let batch = batch_tensors(&c, device)?;
    let logits = logits_at(teacher, &batch, &at, Mode::EVAL)?.to_device(&Device::Cpu)?;
    let (ids, lps) = topk_logprobs(&logits, k, temperature)?;
    Ok((ids, lps, counts))
}

/// A teacher's distribution over `n` rows: full logits or top-k.
pub(crate) enum TeacherRows {
    Full(Tensor),
    TopK(TeacherTopK),
}

impl TeacherRows {
    pub(crate) fn as_teacher(&self) -> Teacher<'_> {
        match self {
            TeacherRows::Full(t) => Teacher::Full(t),
            TeacherRows::TopK(t) => Teacher::TopK(t),
        }
    }
}

/// The teacher rows of a micro-batch. `keys` (cache only) names each sequence's cached rows.
#[allow(clippy::too_many_arguments)]
pub(crate) fn teacher_rows(
    teacher: TeacherSource<'_>,
    batch: &ferrotune_models::Batch,
    c: &Collated,
    at: &[(usize, usize)],
    keys: Option<&[usize]>,
    temperature: f64,
    add_tail: bool,
) -> Result<TeacherRows> {
    let cpu = Device::Cpu;
    let n = at.len();
    match teacher {
        TeacherSource::Live { model, top_k: 0 } => Ok(TeacherRows::Full(
            logits_at(model, batch, at, Mode::EVAL)?.to_device(&cpu)?,
        )),
        TeacherSource::Live { model, top_k } => {
            let logits = logits_at(model, batch, at, Mode::EVAL)?.to_device(&cpu)?;
            let (ids, lps) = topk_logprobs(&logits, top_k, temperature)?;
            Ok(TeacherRows::TopK(TeacherTopK {
                ids: Tensor::from_vec(ids, (n, top_k), &cpu)?,
                logprobs: Tensor::from_vec(lps, (n, top_k), &cpu)?,
                add_tail,
            }))
        }
        TeacherSource::Cache(cache) => {
            let keys = keys.ok_or_else(|| {
                TrainError::TeacherCache(
                    "the teacher cache has rows only for the data's own completions; sampled \
                     completions (lmbda > 0, seq_kd) need the live teacher"
                        .into(),
                )
            })?;
            let k = cache.k;
            let (mut ids, mut lps) = (Vec::with_capacity(n * k), Vec::with_capacity(n * k));
            for (i, &key) in keys.iter().enumerate() {
                let want = c.loss_mask[i].iter().skip(1).filter(|&&m| m == 1).count();
                let (lo, hi) = match (cache.offsets.get(key), cache.offsets.get(key + 1)) {
                    (Some(&lo), Some(&hi)) if hi >= lo => (lo, hi),
                    _ => {
                        return Err(TrainError::TeacherCache(format!(
                            "teacher cache: no rows for example {key} (it holds {}): the cache \
                             is stale, rerun `ferrotune distill cache-teacher`",
                            cache.offsets.len().saturating_sub(1)
                        )))
                    }
                };
                if hi - lo != want {
                    return Err(TrainError::TeacherCache(format!(
                        "teacher cache: example {key} has {} cached rows but {want} scored \
                         tokens: the cache is stale, rerun `ferrotune distill cache-teacher`",
                        hi - lo
                    )));
                }
                ids.extend_from_slice(&cache.ids[lo * k..hi * k]);
                lps.extend_from_slice(&cache.logprobs[lo * k..hi * k]);
            }
            Ok(TeacherRows::TopK(TeacherTopK {
                ids: Tensor::from_vec(ids, (n, k), &cpu)?,
                logprobs: Tensor::from_vec(lps, (n, k), &cpu)?,
                add_tail,
            }))
        }
    }
}

/// Sum of the student's next-token NLL over the rows of `logits` (N, V) for `targets`.
pub(crate) fn nll_rows(logits: &Tensor, targets: &[u32]) -> candle_core::Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach(); // (N, 1)
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?; // (N, 1)
    let idx = Tensor::new(targets, logits.device())?.unsqueeze(1)?; // (N, 1)
    let picked = shifted.gather(&idx, 1)?; // (N, 1)
    (lse - picked)?.sum_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Top-k log-probs: the k largest of log_softmax(x / τ), in descending order, and an
    /// absent slot (−inf) when k exceeds the vocabulary.
    #[test]
    fn topk_logprobs_are_the_largest_log_softmax_entries() {
        let x = Tensor::new(&[[1.0f32, 3.0, 2.0]], &Device::Cpu).unwrap();
        let (ids, lps) = topk_logprobs(&x, 4, 2.0).unwrap();
        assert_eq!(ids[..3], [1, 2, 0]);
        let z = [0.5f64, 1.5, 1.0];
        let lse = z.iter().map(|v| v.exp()).sum::<f64>().ln();
        assert!((lps[0] as f64 - (1.5 - lse)).abs() < 1e-6);
        assert!((lps[2] as f64 - (0.5 - lse)).abs() < 1e-6);
        assert_eq!(lps[3], f32::NEG_INFINITY);
    }

    /// The cross-entropy helper equals −log softmax at the target.
    #[test]
    fn nll_rows_is_the_cross_entropy() {
        let x = Tensor::new(&[[0.0f32, 1.0, 2.0], [2.0, 0.0, 0.0]], &Device::Cpu).unwrap();
        let got = nll_rows(&x, &[2, 1]).unwrap().to_scalar::<f32>().unwrap() as f64;
        let lse0 = (1.0f64 + 1f64.exp() + 2f64.exp()).ln();
        let lse1 = (2f64.exp() + 2.0).ln();
        let want = (lse0 - 2.0) + (lse1 - 0.0);
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }
}
