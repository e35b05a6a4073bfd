//! The GRPO family's loss on small tensors: TRL 1.16 `GRPOTrainer._compute_loss` — token- or
//! sequence-level (GSPO) importance weights, the clipped surrogate (`grpo`, `dr_grpo`, `dapo`,
//! `bnpo`, `luspo`, with INTELLECT-2's two-sided `delta`), CISPO's clipped-weight REINFORCE,
//! SAPO's soft gate, top-entropy token masking, the k3 KL penalty with or without TRL's
//! importance-ratio bias correction, and the stats TRL logs. `tests/grpo_loss_parity.rs` checks
//! every option against values from TRL's own code (`fixtures/grpo/make_grpo_loss.py`).
//! Advantages and the completion mask are in [`crate::grpo_adv`] (re-exported here).
//!
//! Owns: numbers from (log-probs, mask, advantages, entropies). Does not own: generation,
//! rewards, computing log-probs from a model, or the optimizer step — the GRPO loop does those.
//!
//! # Accumulation contract
//!
//! The loop may split one optimizer step's batch into micro-batches, call [`grpo_loss`] on each,
//! `backward()` each loss and **sum** the gradients (as `step::GradAccumulator` does). TRL's
//! normalisations, mirrored here, make that sum equal to one whole-batch call when:
//!
//! - `grpo`, `sapo`, `luspo`: `accum_steps` = number of micro-batches and every micro-batch has
//!   the same number of sequences (each call takes a mean over its sequences, then divides by
//!   `accum_steps`).
//! - `dr_grpo`: same as `grpo` (each call divides by `rows × max_completion_len × accum_steps`).
//! - `dapo`, `cispo`: `num_items_in_batch` = loss tokens (mask sum, after truncation masking) of
//!   **all** micro-batches of the optimizer step; `accum_steps` is not used. Exact for any split.
//!   (TRL: `num_items_in_batch / num_processes × grad_accum / steps_per_generation`, which is the
//!   same number for one process with `steps_per_generation == gradient_accumulation_steps`.)
//! - `bnpo`: like TRL, a token mean over the **local** micro-batch divided by `accum_steps`, so a
//!   split equals the whole batch only when the micro-batches hold equal token counts (TRL's
//!   docs say the same). Use `dapo` for a split-independent token mean.
//!
//! `top_entropy_quantile` takes its quantile over the micro-batch's own tokens, as TRL does, so
//! a split changes which tokens train.
//!
//! # Precision
//!
//! Inputs are f32 (or any float); the loss is computed in f64 on the inputs' device and cast
//! back, so it matches a float64 reference to ~1e-7 at these sizes. The tensors are (B, T), so
//! the cost is nil next to the forward pass that made the log-probs.

pub use crate::grpo_adv::{
    advantages, completion_mask, group_stats, high_entropy_mask, informative_groups,
    zero_std_groups, GroupStats, ScaleRewards,
};
use crate::names::config_names;
use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};

/// What can go wrong in this module (wrapped in `candle_core::Error` by [`grpo_loss`]).
#[derive(Debug, thiserror::Error)]
pub enum GrpoLossError {
    #[error(
        "unknown loss_type `{0}`: expected one of grpo, dr_grpo, dapo, bnpo, cispo, sapo, luspo"
    )]
    LossType(String),
    #[error("unknown scale_rewards `{0}`: expected one of group, batch, none")]
    ScaleRewards(String),
    #[error("unknown importance_sampling_level `{0}`: expected one of token, sequence")]
    ImportanceSamplingLevel(String),
    #[error("{len} rewards do not split into groups of {group_size} (group_size must be >= 1)")]
    Groups { len: usize, group_size: usize },
    #[error("completion mask: {lengths} lengths but {truncated} truncation flags")]
    MaskRows { lengths: usize, truncated: usize },
    #[error("completion mask: row {row} has length {len} > padded width {width}")]
    MaskWidth {
        row: usize,
        len: usize,
        width: usize,
    },
    #[error("GRPO loss: {0}")]
    Config(String),
    #[error("GRPO loss: `{name}` has shape {got:?}, expected {want:?}")]
    Shape {
        name: &'static str,
        got: Vec<usize>,
        want: Vec<usize>,
    },
}

/// The per-token objective and how it becomes one number (TRL's `loss_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Clipped surrogate; mean over each sequence's tokens, then over sequences (length-biased).
    Grpo,
    /// Clipped surrogate; sum over tokens / (rows × max_completion_len) — Dr. GRPO, 2503.20783.
    DrGrpo,
    /// Clipped surrogate; sum over tokens / tokens of the whole accumulated batch — DAPO,
    /// 2503.14476. TRL's default.
    Dapo,
    /// Clipped surrogate; sum over tokens / tokens of the local (micro-)batch.
    Bnpo,
    /// −min(w, ε_high)·A·logπ with the weight w detached (MiniMax-M1, 2506.13585); aggregated
    /// as `dapo`. `epsilon_high` is the absolute cap ε_max (ScaleRL recommends 5).
    Cispo,
    /// −σ(τ(w − 1))·4/τ·A, a soft gate instead of the clip (2511.20347); aggregated as `grpo`.
    Sapo,
    /// Clipped surrogate; per-sequence sums, mean over sequences (LUSPO, 2602.05261); meant
    /// for `importance_sampling_level = sequence`.
    Luspo,
}

config_names!(LossType, GrpoLossError, GrpoLossError::LossType, {
    Grpo => "grpo",
    DrGrpo => "dr_grpo",
    Dapo => "dapo",
    Bnpo => "bnpo",
    Cispo => "cispo",
    Sapo => "sapo",
    Luspo => "luspo",
});

impl LossType {
    /// The losses with TRL's PPO-style clip (and `delta`), whose clip ratios TRL logs.
    pub fn is_clipped(self) -> bool {
        matches!(
            self,
            LossType::Grpo | LossType::DrGrpo | LossType::Dapo | LossType::Bnpo | LossType::Luspo
        )
    }
}

/// Where the importance weight w = π/π_old is taken (TRL's `importance_sampling_level`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportanceSamplingLevel {
    /// One weight per token: exp(logπ_t − logπ_old,t). TRL's default.
    Token,
    /// One weight per sequence: exp of the mean log-ratio over its tokens (GSPO, 2507.18071).
    Sequence,
}

config_names!(ImportanceSamplingLevel, GrpoLossError, GrpoLossError::ImportanceSamplingLevel, {
    Token => "token",
    Sequence => "sequence",
});

/// Loss hyper-parameters (TRL `GRPOConfig` names in brackets).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossConfig {
    /// [`loss_type`]
    pub loss_type: LossType,
    /// Lower clip: w is clipped at 1 − epsilon_low [`epsilon`, default 0.2].
    pub epsilon_low: f64,
    /// Upper clip: 1 + epsilon_high; `cispo`'s absolute cap [`epsilon_high`, defaults to
    /// `epsilon`; DAPO uses 0.28, CISPO 5].
    pub epsilon_high: f64,
    /// KL coefficient; 0 means no reference model is needed [`beta`, default 0].
    pub beta: f64,
    /// Multiply the per-token k3 KL by the (differentiable) importance weight, which makes its
    /// gradient the unbiased reverse-KL gradient (DeepSeek-V3.2) [`use_bias_correction_kl`,
    /// default true]. Changes the gradient even on-policy, where the weight's value is 1.
    pub use_bias_correction_kl: bool,
    /// [`importance_sampling_level`, default token]
    pub importance_sampling_level: ImportanceSamplingLevel,
    /// Two-sided clip: the unclipped weight is capped at `delta` (INTELLECT-2) [`delta`,
    /// default none; recommended > 1 + epsilon_high].
    pub delta: Option<f64>,
    /// `sapo`'s gate temperatures for A > 0 and A ≤ 0 [`sapo_temperature_pos` 1.0,
    /// `sapo_temperature_neg` 1.05].
    pub sapo_temperature_pos: f64,
    pub sapo_temperature_neg: f64,
    /// Train only the tokens whose entropy is in the top `top_entropy_quantile` of the
    /// micro-batch's (Beyond the 80/20 rule, 2506.01939; 0.2 recommended) [default 1.0 = all].
    /// The KL term still covers every token, as in TRL.
    pub top_entropy_quantile: f64,
    /// `dr_grpo`'s constant [`max_completion_length`].
    pub max_completion_len: usize,
    /// `dapo`/`cispo` only: loss tokens in the whole accumulated batch (all micro-batches of
    /// the step).
    pub num_items_in_batch: Option<f64>,
    /// The other losses: micro-batches per optimizer step; each micro-batch's loss is divided
    /// by it [TRL's `current_gradient_accumulation_steps`]. 1 = no accumulation.
    pub accum_steps: usize,
}

impl LossConfig {
    /// TRL's defaults for a loss type: ε = 0.2 both sides, β = 0, token level, bias-corrected
    /// KL, no delta, SAPO temperatures 1.0 / 1.05, every token trained, no accumulation.
    pub fn new(loss_type: LossType, max_completion_len: usize) -> LossConfig {
        LossConfig {
            loss_type,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            beta: 0.0,
            use_bias_correction_kl: true,
            importance_sampling_level: ImportanceSamplingLevel::Token,
            delta: None,
            sapo_temperature_pos: 1.0,
            sapo_temperature_neg: 1.05,
            top_entropy_quantile: 1.0,
            max_completion_len,
            num_items_in_batch: None,
            accum_steps: 1,
        }
    }

    /// Whether [`LossInputs::entropies`] is needed.
    pub fn needs_entropy(&self) -> bool {
        self.top_entropy_quantile < 1.0
    }

    /// Whether the loss divides by `num_items_in_batch` (the step's token count).
    pub fn uses_num_items(&self) -> bool {
        matches!(self.loss_type, LossType::Dapo | LossType::Cispo)
    }

    /// Cross-field checks, run by [`grpo_loss`].
    pub fn validate(&self) -> std::result::Result<(), GrpoLossError> {
        let bad = |m: String| Err(GrpoLossError::Config(m));
        if !(self.epsilon_low.is_finite() && (0.0..1.0).contains(&self.epsilon_low)) {
            return bad(format!(
                "epsilon_low must be in [0, 1) so that the lower clip 1 - epsilon_low stays \
                 positive, got {}",
                self.epsilon_low
            ));
        }
        if !(self.epsilon_high.is_finite() && self.epsilon_high >= 0.0) {
            return bad(format!(
                "epsilon_high must be finite and >= 0, got {}",
                self.epsilon_high
            ));
        }
        if self.loss_type == LossType::Cispo && self.epsilon_high <= 0.0 {
            return bad(
                "cispo caps the importance weight at epsilon_high, which must be > 0 \
                        (CISPO's paper uses 5)"
                    .into(),
            );
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return bad(format!("beta must be finite and >= 0, got {}", self.beta));
        }
        if let Some(d) = self.delta {
            if !(d.is_finite() && d > 0.0) {
                return bad(format!("delta must be finite and > 0, got {d}"));
            }
        }
        for (k, t) in [
            ("sapo_temperature_pos", self.sapo_temperature_pos),
            ("sapo_temperature_neg", self.sapo_temperature_neg),
        ] {
            if !(t.is_finite() && t > 0.0) {
                return bad(format!("{k} must be finite and > 0, got {t}"));
            }
        }
        if !(0.0..=1.0).contains(&self.top_entropy_quantile) {
            return bad(format!(
                "top_entropy_quantile must be in [0, 1] (1 = every token), got {}",
                self.top_entropy_quantile
            ));
        }
        if self.accum_steps == 0 {
            return bad("accum_steps must be >= 1 (1 = no gradient accumulation)".into());
        }
        if self.loss_type == LossType::DrGrpo && self.max_completion_len == 0 {
            return bad("dr_grpo divides by max_completion_len, which must be >= 1".into());
        }
        if self.uses_num_items() {
            match self.num_items_in_batch {
                Some(n) if n.is_finite() && n >= 0.0 => {}
                Some(n) => return bad(format!("num_items_in_batch must be >= 0, got {n}")),
                None => {
                    return bad(format!(
                        "{} needs num_items_in_batch: the number of loss tokens in all \
                         micro-batches of the optimizer step",
                        self.loss_type
                    ))
                }
            }
        }
        Ok(())
    }
}

/// Inputs of one (micro-)batch; B rows, T completion positions.
pub struct LossInputs<'a> {
    /// (B, T) current-policy log-probs of the sampled tokens, differentiable.
    pub logps: &'a Tensor,
    /// (B, T) behaviour-policy log-probs; `None` ⇒ `logps.detach()` (ratio 1: one iteration
    /// per generation batch, TRL's `num_iterations = 1`).
    pub old_logps: Option<&'a Tensor>,
    /// (B, T) reference-policy log-probs; required iff `beta != 0`.
    pub ref_logps: Option<&'a Tensor>,
    /// (B, T) 0/1 completion mask ([`completion_mask`]).
    pub mask: &'a Tensor,
    /// (B,) advantages ([`advantages`]).
    pub advantages: &'a Tensor,
    /// (B, T) per-token entropy of the current policy (no gradient needed); required iff
    /// `top_entropy_quantile < 1`, and logged as `entropy` whenever given.
    pub entropies: Option<&'a Tensor>,
}

/// What TRL logs from `_compute_loss`, over this micro-batch's masked tokens. With
/// `importance_sampling_level = sequence` the clip fractions are over sequences (TRL's
/// `global_masked_mean` of a (B, 1) tensor), empty rows included.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossStats {
    /// Masked mean of the (bias-corrected, when on) k3 KL to the reference (TRL `kl`); `None`
    /// when beta = 0.
    pub kl_mean: Option<f64>,
    /// Masked mean of the entropies (TRL `entropy`); `None` when none were given.
    pub entropy_mean: Option<f64>,
    /// Fraction of tokens with w < 1 − ε_low and A < 0 (TRL `clip_ratio/low_mean`).
    pub clip_low: f64,
    /// Fraction of tokens with w > 1 + ε_high and A > 0 (TRL `clip_ratio/high_mean`).
    pub clip_high: f64,
    /// Either of the two (TRL `clip_ratio/region_mean`).
    pub clip_region: f64,
    /// Smallest per-sequence low-clip fraction (TRL `clip_ratio/low_min`; empty rows skipped,
    /// NaN if every row is empty).
    pub clip_low_seq_min: f64,
    /// Largest per-sequence high-clip fraction (TRL `clip_ratio/high_max`).
    pub clip_high_seq_max: f64,
    /// `cispo` only: fraction with w > ε_high and A > 0 (TRL `cispo_clip_ratio`).
    pub cispo_clip: Option<f64>,
    /// Fraction of the mask's tokens that `top_entropy_quantile` kept (1 when it is off).
    pub entropy_kept: f64,
    /// Masked mean of the token ratio ρ = exp(logπ − logπ_old).
    pub ratio_mean: f64,
    /// max |ρ − 1| over masked tokens: how far off-policy this micro-batch is (0 at μ = 1).
    pub ratio_max_abs_dev: f64,
    /// Masked tokens in this micro-batch.
    pub tokens: f64,
}

pub struct LossOutput {
    /// Scalar, in the dtype of `logps`; already divided for accumulation (see module docs).
    pub loss: Tensor,
    pub stats: LossStats,
}

fn check_shape(name: &'static str, t: &Tensor, want: &[usize]) -> Result<()> {
    if t.dims() != want {
        return Err(candle_core::Error::wrap(GrpoLossError::Shape {
            name,
            got: t.dims().to_vec(),
            want: want.to_vec(),
        }));
    }
    Ok(())
}

fn config_error(m: String) -> candle_core::Error {
    candle_core::Error::wrap(GrpoLossError::Config(m))
}

/// `torch.clamp(x, lo, hi)` with torch's gradient: 1 where lo ≤ x ≤ hi (bounds included), 0
/// outside (candle's clamp splits ties).
fn clamp_like_torch(x: &Tensor, lo: f64, hi: f64) -> Result<Tensor> {
    let c = x.detach().clamp(lo, hi)?;
    let inside = x.ge(lo)?.mul(&x.le(hi)?)?;
    inside.where_cond(x, &c)
}

/// The GRPO-family loss of one micro-batch, TRL 1.16 `_compute_loss`:
///
/// w = exp(logπ − logπ_old) per token, or exp(mean over the row's tokens) per sequence;
/// L_t = −min(w̃A, clip(w, 1−ε_low, 1+ε_high)A) with w̃ = min(w, delta) for the clipped
/// losses, −min(w, ε_high)ₛ_g·A·logπ for `cispo`, −σ(τ(w−1))·4/τ·A for `sapo`; times the
/// top-entropy mask; + β·KL_t with KL_t = (exp(logπ_ref − logπ) − (logπ_ref − logπ) − 1)·w
/// (·w only with `use_bias_correction_kl`), aggregated by `cfg.loss_type` over the mask (module
/// docs: accumulation contract). Gradient flows into `logps` only.
pub fn grpo_loss(inputs: &LossInputs, cfg: &LossConfig) -> Result<LossOutput> {
    cfg.validate().map_err(candle_core::Error::wrap)?;
    let (b, t) = inputs.logps.dims2()?;
    check_shape("mask", inputs.mask, &[b, t])?;
    check_shape("advantages", inputs.advantages, &[b])?;
    for (name, x) in [
        ("old_logps", inputs.old_logps),
        ("ref_logps", inputs.ref_logps),
        ("entropies", inputs.entropies),
    ] {
        if let Some(x) = x {
            check_shape(name, x, &[b, t])?;
        }
    }
    if cfg.beta != 0.0 && inputs.ref_logps.is_none() {
        return Err(config_error(format!(
            "beta = {} needs ref_logps (set beta = 0 to train without a reference)",
            cfg.beta
        )));
    }
    if cfg.needs_entropy() && inputs.entropies.is_none() {
        return Err(config_error(format!(
            "top_entropy_quantile = {} needs the per-token entropies",
            cfg.top_entropy_quantile
        )));
    }
    let out_dtype = inputs.logps.dtype();
    let dev = inputs.logps.device();
    let lp = inputs.logps.to_dtype(DType::F64)?; // (B, T), tracked
    let old = match inputs.old_logps {
        Some(o) => o.detach().to_dtype(DType::F64)?,
        None => lp.detach(),
    };
    let mask = inputs.mask.detach().to_dtype(DType::F64)?; // (B, T)
    let mask_host = mask.to_vec2::<f64>()?;
    let adv = inputs
        .advantages
        .detach()
        .to_dtype(DType::F64)?
        .reshape((b, 1))?; // (B, 1)
    let adv_host = adv.flatten_all()?.to_vec1::<f64>()?;

    let log_ratio = (&lp - &old)?; // (B, T)
    let sequence = cfg.importance_sampling_level == ImportanceSamplingLevel::Sequence;
    let log_w = if sequence {
        let lens = mask.sum_keepdim(1)?.clamp(1.0, f64::INFINITY)?; // (B, 1)
        ((&log_ratio * &mask)?.sum_keepdim(1)? / lens)? // (B, 1)
    } else {
        log_ratio.clone()
    };
    let w = log_w.exp()?; // (B, T) or (B, 1)

    let kl = match (cfg.beta != 0.0, inputs.ref_logps) {
        (true, Some(r)) => {
            let d = (r.detach().to_dtype(DType::F64)? - &lp)?; // logπ_ref − logπ
            let kl = ((d.exp()? - &d)? - 1.0)?; // (B, T)
            Some(if cfg.use_bias_correction_kl {
                kl.broadcast_mul(&w)?
            } else {
                kl
            })
        }
        _ => None,
    };

    // The importance weight the clip statistics see: after `delta` for the clipped losses.
    let mut w_stats = w.clone();
    let per_token = match cfg.loss_type {
        LossType::Cispo => {
            let capped = w.detach().clamp(f64::NEG_INFINITY, cfg.epsilon_high)?;
            capped.broadcast_mul(&adv)?.broadcast_mul(&lp)?.neg()? // (B, T)
        }
        LossType::Sapo => {
            let pos = adv.gt(0.0)?;
            let tau = pos.where_cond(
                &Tensor::full(cfg.sapo_temperature_pos, (b, 1), dev)?,
                &Tensor::full(cfg.sapo_temperature_neg, (b, 1), dev)?,
            )?; // (B, 1)
            let x = (&w - 1.0)?.broadcast_mul(&tau)?;
            let sig = ((x.neg()?.exp()? + 1.0)?.recip())?; // σ(x), differentiable
            let gate = (sig * 4.0)?.broadcast_div(&tau)?;
            gate.broadcast_mul(&adv)?.neg()?
        }
        _ => {
            let w1 = match cfg.delta {
                Some(d) => clamp_like_torch(&w, f64::NEG_INFINITY, d)?,
                None => w.clone(),
            };
            w_stats = w1.detach();
            let unclipped = w1.broadcast_mul(&adv)?;
            let clipped = clamp_like_torch(&w, 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high)?
                .broadcast_mul(&adv)?;
            // −min(w̃A, clip(w)A), with the branch picked explicitly: at a tie torch splits the
            // gradient in halves, and a tie means both branches pass the same gradient (w
            // inside both bounds, or A = 0), so taking either whole is the same.
            let take_unclipped = unclipped.le(&clipped)?;
            take_unclipped.where_cond(&unclipped, &clipped)?.neg()?
        }
    };
    // (B, 1) at sequence level: every token of a row carries the row's loss.
    let mut per_token = per_token.broadcast_as((b, t))?.contiguous()?;

    let ent_host = match inputs.entropies {
        Some(e) => Some(e.detach().to_dtype(DType::F64)?.to_vec2::<f64>()?),
        None => None,
    };
    let tokens: f64 = mask_host.iter().flatten().sum();
    let mut entropy_kept = 1.0;
    if cfg.needs_entropy() {
        if let Some(ent) = &ent_host {
            let keep = high_entropy_mask(ent, &mask_host, cfg.top_entropy_quantile);
            entropy_kept = keep.iter().flatten().sum::<f64>() / tokens.max(1.0);
            let keep = Tensor::from_vec(keep.concat(), (b, t), dev)?;
            per_token = (per_token * keep)?;
        }
    }
    let mut kl_host = None;
    if let Some(kl) = kl {
        kl_host = Some(kl.detach().to_vec2::<f64>()?);
        per_token = (per_token + (kl * cfg.beta)?)?;
    }

    let masked = (per_token * &mask)?; // (B, T)
    let accum = cfg.accum_steps as f64;
    let loss = match cfg.loss_type {
        LossType::Grpo | LossType::Sapo => {
            let lens: Vec<f64> = mask_host
                .iter()
                .map(|r| r.iter().sum::<f64>().max(1.0))
                .collect();
            let lens = Tensor::from_vec(lens, b, dev)?;
            ((masked.sum(1)? / lens)?.mean_all()? / accum)?
        }
        LossType::Bnpo => (masked.sum_all()? / (tokens.max(1.0) * accum))?,
        LossType::DrGrpo => {
            (masked.sum_all()? / (b as f64 * cfg.max_completion_len as f64 * accum))?
        }
        LossType::Dapo | LossType::Cispo => {
            let n = cfg.num_items_in_batch.unwrap_or(tokens); // validated: Some
            (masked.sum_all()? / n.max(1.0))?
        }
        LossType::Luspo => (masked.sum(1)?.mean_all()? / accum)?,
    };
    let loss = loss.to_dtype(out_dtype)?;

    let weights = Weights {
        w: w_stats.to_vec2::<f64>()?,
        w_raw: w.detach().to_vec2::<f64>()?,
        ratio: log_ratio.detach().exp()?.to_vec2::<f64>()?,
    };
    let mut stats = stats(&weights, &adv_host, &mask_host, cfg);
    stats.kl_mean = kl_host.map(|kl| masked_mean(&kl, &mask_host));
    stats.entropy_mean = ent_host.map(|e| masked_mean(&e, &mask_host));
    stats.entropy_kept = entropy_kept;
    Ok(LossOutput { loss, stats })
}

/// The host copies the stats read: the weight the clip sees (after `delta`), the raw weight,
/// and the token ratio; the weights are (B, T) or (B, 1).
struct Weights {
    w: Vec<Vec<f64>>,
    w_raw: Vec<Vec<f64>>,
    ratio: Vec<Vec<f64>>,
}

fn masked_mean(x: &[Vec<f64>], mask: &[Vec<f64>]) -> f64 {
    let (mut s, mut n) = (0.0, 0.0);
    for (xr, mr) in x.iter().zip(mask) {
        for (&v, &m) in xr.iter().zip(mr) {
            s += v * m;
            n += m;
        }
    }
    s / f64::max(n, 1.0)
}

/// TRL's `global_masked_mean` of a 0/1 indicator: over masked tokens for a (B, T) weight, over
/// rows for a (B, 1) one; plus `masked_seq_mean`'s per-row fractions (NaN for an empty row at
/// token level, as TRL divides by the unclamped row length).
fn indicator_means(
    w: &[Vec<f64>],
    mask: &[Vec<f64>],
    hit: impl Fn(usize, f64) -> bool,
) -> (f64, Vec<f64>) {
    let mut per_row = Vec::with_capacity(w.len());
    let (mut s, mut n) = (0.0, 0.0);
    for (i, (wr, mr)) in w.iter().zip(mask).enumerate() {
        if wr.len() == 1 {
            let v = f64::from(u8::from(hit(i, wr[0])));
            s += v;
            n += 1.0;
            per_row.push(v);
        } else {
            let (mut rs, mut rn) = (0.0, 0.0);
            for (&x, &m) in wr.iter().zip(mr) {
                rs += m * f64::from(u8::from(hit(i, x)));
                rn += m;
            }
            s += rs;
            n += rn;
            per_row.push(rs / rn);
        }
    }
    (s / f64::max(n, 1.0), per_row)
}

/// Host-side logging stats, TRL's `global_masked_mean` / `masked_seq_mean` definitions.
fn stats(ws: &Weights, adv: &[f64], mask: &[Vec<f64>], cfg: &LossConfig) -> LossStats {
    let (lo, hi) = (1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high);
    let (clip_low, low_rows) = indicator_means(&ws.w, mask, |i, w| w < lo && adv[i] < 0.0);
    let (clip_high, high_rows) = indicator_means(&ws.w, mask, |i, w| w > hi && adv[i] > 0.0);
    let (clip_region, _) = indicator_means(&ws.w, mask, |i, w| {
        (w < lo && adv[i] < 0.0) || (w > hi && adv[i] > 0.0)
    });
    // nanmin / nanmax: rows whose fraction is NaN (empty, token level) are skipped.
    let nan_fold = |rows: &[f64], f: fn(f64, f64) -> f64| {
        rows.iter()
            .filter(|x| !x.is_nan())
            .fold(f64::NAN, |a, &x| if a.is_nan() { x } else { f(a, x) })
    };
    let cispo_clip = (cfg.loss_type == LossType::Cispo)
        .then(|| indicator_means(&ws.w_raw, mask, |i, w| w > cfg.epsilon_high && adv[i] > 0.0).0);
    let mut rdev = 0.0f64;
    for (rr, mr) in ws.ratio.iter().zip(mask) {
        for (&r, &m) in rr.iter().zip(mr) {
            if m != 0.0 {
                rdev = rdev.max((r - 1.0).abs());
            }
        }
    }
    LossStats {
        kl_mean: None,
        entropy_mean: None,
        clip_low,
        clip_high,
        clip_region,
        clip_low_seq_min: nan_fold(&low_rows, f64::min),
        clip_high_seq_max: nan_fold(&high_rows, f64::max),
        cispo_clip,
        entropy_kept: 1.0,
        ratio_mean: masked_mean(&ws.ratio, mask),
        ratio_max_abs_dev: rdev,
        tokens: mask.iter().flatten().sum(),
    }
}
