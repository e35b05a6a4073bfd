//! The GRPO family's math on small tensors: group-relative advantages, the completion mask
//! (with `mask_truncated_completions`), the clipped surrogate loss with an optional k3 KL
//! penalty, its four aggregations (`grpo`, `dr_grpo`, `dapo`, `bnpo`) and the stats TRL logs.
//! Behaviour matches TRL 1.16 `GRPOTrainer` (`_generate_and_score_completions`,
//! `_compute_loss`); `tests/grpo_loss_parity.rs` checks it against values from TRL's own code
//! (`fixtures/grpo/make_grpo_loss.py`).
//!
//! Owns: numbers from (log-probs, mask, rewards). Does not own: generation, rewards, computing
//! log-probs from a model, or the optimizer step — the GRPO loop does those.
//!
//! # Accumulation contract
//!
//! The loop may split one optimizer step's batch into micro-batches, call [`grpo_loss`] on each,
//! `backward()` each loss and **sum** the gradients (as `step::GradAccumulator` does). TRL's
//! normalisations, mirrored here, make that sum equal to one whole-batch call when:
//!
//! - `grpo`: `accum_steps` = number of micro-batches and every micro-batch has the same number of
//!   sequences (each call takes a mean over its sequences, then divides by `accum_steps`).
//! - `dr_grpo`: same as `grpo` (each call divides by `rows × max_completion_len × accum_steps`).
//! - `dapo`: `num_items_in_batch` = loss tokens (mask sum, after truncation masking) of **all**
//!   micro-batches of the optimizer step; `accum_steps` is not used. Exact for any split.
//!   (TRL: `num_items_in_batch / num_processes × grad_accum / steps_per_generation`, which is the
//!   same number for one process with `steps_per_generation == gradient_accumulation_steps`.)
//! - `bnpo`: like TRL, a token mean over the **local** micro-batch divided by `accum_steps`, so a
//!   split equals the whole batch only when the micro-batches hold equal token counts (TRL's
//!   docs say the same). Use `dapo` for a split-independent token mean.
//!
//! # Precision
//!
//! Inputs are f32 (or any float); the loss is computed in f64 on the inputs' device and cast
//! back, so it matches a float64 reference to ~1e-7 at these sizes. The tensors are (B, T), so
//! the cost is nil next to the forward pass that made the log-probs.

use crate::names::config_names;
use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};

/// What can go wrong in this module (wrapped in `candle_core::Error` by [`grpo_loss`]).
#[derive(Debug, thiserror::Error)]
pub enum GrpoLossError {
    #[error("unknown loss_type `{0}`: expected one of grpo, dr_grpo, dapo, bnpo")]
    LossType(String),
    #[error("unknown scale_rewards `{0}`: expected one of group, batch, none")]
    ScaleRewards(String),
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

/// How per-token losses become one number (TRL's `loss_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Mean over each sequence's tokens, then mean over sequences (length-biased).
    Grpo,
    /// Sum over tokens / (rows × max_completion_len) — Dr. GRPO, 2503.20783.
    DrGrpo,
    /// Sum over tokens / tokens of the whole accumulated batch — DAPO, 2503.14476. TRL's default.
    Dapo,
    /// Sum over tokens / tokens of the local (micro-)batch.
    Bnpo,
}

config_names!(LossType, GrpoLossError, GrpoLossError::LossType, {
    Grpo => "grpo",
    DrGrpo => "dr_grpo",
    Dapo => "dapo",
    Bnpo => "bnpo",
});

/// How advantages are scaled (TRL's `scale_rewards`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// Divide by each group's std (+1e-4). TRL's default.
    Group,
    /// Divide by the whole batch's std (+1e-4); the baseline is still the group mean.
    Batch,
    /// No division (Dr. GRPO).
    None,
}

config_names!(ScaleRewards, GrpoLossError, GrpoLossError::ScaleRewards, {
    Group => "group",
    Batch => "batch",
    None => "none",
});

/// TRL's `nanmean` / `nanstd` (Bessel-corrected; NaN when fewer than two values) over the
/// non-NaN entries.
fn nan_mean_std(xs: &[f64]) -> (f64, f64) {
    let vals: Vec<f64> = xs.iter().copied().filter(|x| !x.is_nan()).collect();
    let n = vals.len() as f64;
    if vals.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = vals.iter().sum::<f64>() / n;
    if vals.len() < 2 {
        return (mean, f64::NAN);
    }
    let var = vals.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

fn check_groups(len: usize, group_size: usize) -> std::result::Result<(), GrpoLossError> {
    if len.checked_rem(group_size) != Some(0) {
        return Err(GrpoLossError::Groups { len, group_size });
    }
    Ok(())
}

/// Group-relative advantages, TRL's `sum_then_normalize` path: rewards are consecutive groups of
/// `group_size` (the G completions of one prompt); A = r − mean_group(r), divided by
/// `std + 1e-4` unless `scale` is `None`, where std is the group's (`Group`) or the whole
/// batch's (`Batch`), unbiased (n − 1). A NaN reward (every reward function said "not
/// applicable") is left out of the mean and std and gets advantage 0, as in TRL; a group of one
/// completion gets 0 (its std is taken as 0).
pub fn advantages(
    rewards: &[f64],
    group_size: usize,
    scale: ScaleRewards,
) -> std::result::Result<Vec<f64>, GrpoLossError> {
    check_groups(rewards.len(), group_size)?;
    let batch_std = if rewards.len() > 1 {
        nan_mean_std(rewards).1
    } else {
        0.0
    };
    let mut out = Vec::with_capacity(rewards.len());
    for group in rewards.chunks(group_size) {
        let (mean, std) = nan_mean_std(group);
        let std = if group_size > 1 { std } else { 0.0 };
        for &r in group {
            let a = match scale {
                ScaleRewards::None => r - mean,
                ScaleRewards::Group => (r - mean) / (std + 1e-4),
                ScaleRewards::Batch => (r - mean) / (batch_std + 1e-4),
            };
            out.push(if a.is_nan() { 0.0 } else { a });
        }
    }
    Ok(out)
}

/// Reward health of one generation batch (TRL logs `reward`, `reward_std`,
/// `frac_reward_zero_std`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupStats {
    /// Groups whose rewards are all equal (std ≤ 1e-8): they carry no learning signal.
    pub zero_std_groups: usize,
    pub groups: usize,
    /// Completions whose reward is NaN (no reward function applied).
    pub unscorable: usize,
    /// Mean and unbiased std of the non-NaN rewards over the batch (TRL's `reward`,
    /// `reward_std`); NaN when undefined.
    pub reward_mean: f64,
    pub reward_std: f64,
}

impl GroupStats {
    /// Fraction of groups with zero reward variance. Equals TRL's `frac_reward_zero_std` for
    /// `scale_rewards` group/none (TRL tests the *batch* std under `batch`).
    pub fn frac_zero_std(&self) -> f64 {
        if self.groups == 0 {
            0.0
        } else {
            self.zero_std_groups as f64 / self.groups as f64
        }
    }
}

/// [`GroupStats`] of `rewards` laid out as consecutive groups of `group_size`. A group whose std
/// is undefined (fewer than two scorable rewards) is not counted as zero-std, as in TRL
/// (`torch.isclose(NaN, 0)` is false); with `group_size == 1` every group counts as zero-std.
pub fn group_stats(
    rewards: &[f64],
    group_size: usize,
) -> std::result::Result<GroupStats, GrpoLossError> {
    check_groups(rewards.len(), group_size)?;
    let zero_std_groups = rewards
        .chunks(group_size)
        .filter(|g| {
            let std = if group_size > 1 {
                nan_mean_std(g).1
            } else {
                0.0
            };
            std.abs() <= 1e-8 // torch.isclose(std, 0): atol 1e-8
        })
        .count();
    let (reward_mean, reward_std) = nan_mean_std(rewards);
    Ok(GroupStats {
        zero_std_groups,
        groups: rewards.len() / group_size,
        unscorable: rewards.iter().filter(|r| r.is_nan()).count(),
        reward_mean,
        reward_std,
    })
}

/// The (B, T) completion loss mask, row-major: row i has `lengths[i]` ones then zeros up to
/// `width`. With `mask_truncated` (TRL's `mask_truncated_completions`, recommended by DAPO) a
/// completion that did not end with a stop token (`truncated[i]`) gets an all-zero row: it
/// still counts in the advantages but contributes no loss. `num_items_in_batch` for `dapo` is
/// the sum of this mask over all micro-batches.
pub fn completion_mask(
    lengths: &[usize],
    truncated: &[bool],
    width: usize,
    mask_truncated: bool,
) -> std::result::Result<Vec<f32>, GrpoLossError> {
    if lengths.len() != truncated.len() {
        return Err(GrpoLossError::MaskRows {
            lengths: lengths.len(),
            truncated: truncated.len(),
        });
    }
    let mut mask = vec![0f32; lengths.len() * width];
    for (row, (&len, &tr)) in lengths.iter().zip(truncated).enumerate() {
        if len > width {
            return Err(GrpoLossError::MaskWidth { row, len, width });
        }
        if mask_truncated && tr {
            continue;
        }
        mask[row * width..row * width + len].fill(1.0);
    }
    Ok(mask)
}

/// Loss hyper-parameters (TRL `GRPOConfig` names in brackets).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossConfig {
    /// [`loss_type`]
    pub loss_type: LossType,
    /// Lower clip: ρ is clipped at 1 − epsilon_low [`epsilon`, default 0.2].
    pub epsilon_low: f64,
    /// Upper clip: 1 + epsilon_high [`epsilon_high`, defaults to `epsilon`; DAPO uses 0.28].
    pub epsilon_high: f64,
    /// KL coefficient; 0 means no reference model is needed [`beta`, default 0].
    pub beta: f64,
    /// `dr_grpo`'s constant [`max_completion_length`].
    pub max_completion_len: usize,
    /// `dapo` only: loss tokens in the whole accumulated batch (all micro-batches of the step).
    pub num_items_in_batch: Option<f64>,
    /// `grpo`/`dr_grpo`/`bnpo` only: micro-batches per optimizer step; each micro-batch's loss
    /// is divided by it [TRL's `current_gradient_accumulation_steps`]. 1 = no accumulation.
    pub accum_steps: usize,
}

impl LossConfig {
    /// TRL's defaults for a loss type: ε = 0.2 both sides, β = 0, no accumulation.
    pub fn new(loss_type: LossType, max_completion_len: usize) -> LossConfig {
        LossConfig {
            loss_type,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            beta: 0.0,
            max_completion_len,
            num_items_in_batch: None,
            accum_steps: 1,
        }
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
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return bad(format!("beta must be finite and >= 0, got {}", self.beta));
        }
        if self.accum_steps == 0 {
            return bad("accum_steps must be >= 1 (1 = no gradient accumulation)".into());
        }
        if self.loss_type == LossType::DrGrpo && self.max_completion_len == 0 {
            return bad("dr_grpo divides by max_completion_len, which must be >= 1".into());
        }
        if self.loss_type == LossType::Dapo {
            match self.num_items_in_batch {
                Some(n) if n.is_finite() && n >= 0.0 => {}
                Some(n) => return bad(format!("num_items_in_batch must be >= 0, got {n}")),
                None => {
                    return bad(
                        "dapo needs num_items_in_batch: the number of loss tokens in \
                                all micro-batches of the optimizer step"
                            .into(),
                    )
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
}

/// What TRL logs from `_compute_loss`, over this micro-batch's masked tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossStats {
    /// Masked mean of the k3 KL to the reference (TRL `kl`); `None` when beta = 0.
    pub kl_mean: Option<f64>,
    /// Fraction of tokens with ρ < 1 − ε_low and A < 0 (TRL `clip_ratio/low_mean`).
    pub clip_low: f64,
    /// Fraction of tokens with ρ > 1 + ε_high and A > 0 (TRL `clip_ratio/high_mean`).
    pub clip_high: f64,
    /// Either of the two (TRL `clip_ratio/region_mean`).
    pub clip_region: f64,
    /// Smallest per-sequence low-clip fraction (TRL `clip_ratio/low_min`; empty rows skipped,
    /// NaN if every row is empty).
    pub clip_low_seq_min: f64,
    /// Largest per-sequence high-clip fraction (TRL `clip_ratio/high_max`).
    pub clip_high_seq_max: f64,
    /// Masked mean of ρ = exp(logπ − logπ_old).
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

/// The clipped-surrogate GRPO loss of one micro-batch, TRL 1.16 `_compute_loss` with
/// token-level importance sampling:
///
/// ρ = exp(logπ − logπ_old), L_t = −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A) + β·KL_t,
/// KL_t = exp(logπ_ref − logπ) − (logπ_ref − logπ) − 1, aggregated by `cfg.loss_type`
/// over the mask (module docs: accumulation contract). Gradient flows into `logps` only.
pub fn grpo_loss(inputs: &LossInputs, cfg: &LossConfig) -> Result<LossOutput> {
    cfg.validate().map_err(candle_core::Error::wrap)?;
    let (b, t) = inputs.logps.dims2()?;
    check_shape("mask", inputs.mask, &[b, t])?;
    check_shape("advantages", inputs.advantages, &[b])?;
    if let Some(o) = inputs.old_logps {
        check_shape("old_logps", o, &[b, t])?;
    }
    if let Some(r) = inputs.ref_logps {
        check_shape("ref_logps", r, &[b, t])?;
    }
    if cfg.beta != 0.0 && inputs.ref_logps.is_none() {
        return Err(candle_core::Error::wrap(GrpoLossError::Config(format!(
            "beta = {} needs ref_logps (set beta = 0 to train without a reference)",
            cfg.beta
        ))));
    }
    let out_dtype = inputs.logps.dtype();
    let lp = inputs.logps.to_dtype(DType::F64)?; // (B, T), tracked
    let old = match inputs.old_logps {
        Some(o) => o.detach().to_dtype(DType::F64)?,
        None => lp.detach(),
    };
    let mask = inputs.mask.detach().to_dtype(DType::F64)?; // (B, T)
    let adv = inputs
        .advantages
        .detach()
        .to_dtype(DType::F64)?
        .reshape((b, 1))?; // (B, 1)

    let ratio = (&lp - &old)?.exp()?; // (B, T)
    let unclipped = ratio.broadcast_mul(&adv)?;
    let clipped = ratio
        .detach()
        .clamp(1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high)?
        .broadcast_mul(&adv)?;
    // −min(ρA, clip(ρ)A): torch's gradient is A where ρA ≤ clip(ρ)A (a tie means ρ lies inside
    // the clip range or A = 0) and 0 where the clipped term is strictly smaller, so pick the
    // branch explicitly instead of relying on candle's tie-splitting minimum/clamp.
    let take_unclipped = unclipped.le(&clipped)?;
    let mut per_token = take_unclipped.where_cond(&unclipped, &clipped)?.neg()?; // (B, T)
    let mut kl_host = None;
    if cfg.beta != 0.0 {
        if let Some(r) = inputs.ref_logps {
            let d = (r.detach().to_dtype(DType::F64)? - &lp)?; // logπ_ref − logπ
            let kl = ((d.exp()? - &d)? - 1.0)?; // (B, T)
            kl_host = Some(kl.to_vec2::<f64>()?);
            per_token = (per_token + (kl * cfg.beta)?)?;
        }
    }

    let masked = (per_token * &mask)?; // (B, T)
    let mask_host = mask.to_vec2::<f64>()?;
    let tokens: f64 = mask_host.iter().flatten().sum();
    let accum = cfg.accum_steps as f64;
    let loss = match cfg.loss_type {
        LossType::Grpo => {
            let per_seq = masked.sum(1)?; // (B,)
            let lens: Vec<f64> = mask_host
                .iter()
                .map(|r| r.iter().sum::<f64>().max(1.0))
                .collect();
            let lens = Tensor::from_vec(lens, b, per_seq.device())?;
            ((per_seq / lens)?.mean_all()? / accum)?
        }
        LossType::Bnpo => (masked.sum_all()? / (tokens.max(1.0) * accum))?,
        LossType::DrGrpo => {
            (masked.sum_all()? / (b as f64 * cfg.max_completion_len as f64 * accum))?
        }
        LossType::Dapo => {
            let n = cfg.num_items_in_batch.unwrap_or(tokens); // validated: Some
            (masked.sum_all()? / n.max(1.0))?
        }
    };
    let loss = loss.to_dtype(out_dtype)?;

    let stats = stats(
        &ratio.to_vec2::<f64>()?,
        &adv.flatten_all()?.to_vec1::<f64>()?,
        &mask_host,
        kl_host.as_deref(),
        cfg,
    );
    Ok(LossOutput { loss, stats })
}

/// Host-side logging stats, TRL's `global_masked_mean` / `masked_seq_mean` definitions.
fn stats(
    ratio: &[Vec<f64>],
    adv: &[f64],
    mask: &[Vec<f64>],
    kl: Option<&[Vec<f64>]>,
    cfg: &LossConfig,
) -> LossStats {
    let (lo, hi) = (1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high);
    let tokens: f64 = mask.iter().flatten().sum();
    let denom = tokens.max(1.0);
    let (mut low, mut high, mut region, mut rsum, mut rdev) = (0.0, 0.0, 0.0, 0.0, 0.0f64);
    let (mut low_seq_min, mut high_seq_max) = (f64::NAN, f64::NAN);
    let mut kl_sum = 0.0;
    for (i, (row, mrow)) in ratio.iter().zip(mask).enumerate() {
        let (mut row_low, mut row_high, mut row_n) = (0.0, 0.0, 0.0);
        for (j, (&r, &m)) in row.iter().zip(mrow).enumerate() {
            let is_low = r < lo && adv[i] < 0.0;
            let is_high = r > hi && adv[i] > 0.0;
            row_low += m * f64::from(u8::from(is_low));
            row_high += m * f64::from(u8::from(is_high));
            region += m * f64::from(u8::from(is_low || is_high));
            row_n += m;
            rsum += m * r;
            if m != 0.0 {
                rdev = rdev.max((r - 1.0).abs());
            }
            if let Some(kl) = kl {
                kl_sum += m * kl[i][j];
            }
        }
        low += row_low;
        high += row_high;
        // TRL divides by the unclamped row length (NaN for an empty row) and then takes
        // nanmin / nanmax, so empty rows are skipped.
        if row_n > 0.0 {
            low_seq_min = low_seq_min.min(row_low / row_n);
            high_seq_max = high_seq_max.max(row_high / row_n);
        }
    }
    LossStats {
        kl_mean: kl.map(|_| kl_sum / denom),
        clip_low: low / denom,
        clip_high: high / denom,
        clip_region: region / denom,
        clip_low_seq_min: low_seq_min,
        clip_high_seq_max: high_seq_max,
        ratio_mean: rsum / denom,
        ratio_max_abs_dev: rdev,
        tokens,
    }
}
