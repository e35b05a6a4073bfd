//! PPO (RLHF) math on small tensors: the response / value masks from response lengths, per-token
//! rewards with the KL-to-reference penalty folded in and the sequence score added at the end,
//! optional reward whitening, GAE(γ, λ) advantages and returns, advantage whitening, the clipped
//! policy loss, the clipped value loss and the stats TRL logs. Behaviour matches TRL's
//! `PPOTrainer.train` as of **trl 1.12.0** (`trl/experimental/ppo/ppo_trainer.py`, the last
//! release with PPO: 1.13 removed it, so TRL 1.16 has none); `tests/ppo_loss_parity.rs` checks it
//! against values from that code (`fixtures/ppo/make_ppo_loss.py`).
//!
//! Owns: numbers from (log-probs, values, scores, lengths). Does not own: generation, stop-token
//! truncation, the reward model or value head forward, mini-batch shuffling, `missing_eos_penalty`
//! (subtract it from `scores` before calling), or the optimizer step — the PPO loop does those.
//!
//! # Layout and masks
//!
//! Tensors are (B, T) over the T response slots; `lengths[i]` is the number of real response
//! tokens of row i, stop token included (TRL's `sequence_lengths + 1`; with pad == eos the
//! caller must still count the stop token it wants trained). TRL uses two masks:
//!
//! - response mask, slots `t < len`: policy loss, advantage whitening, KL (TRL's
//!   `~padding_mask`);
//! - value mask, slots `t <= len`: values, value loss, reward whitening (TRL's
//!   `~padding_mask_p1`) — one slot longer, because TRL adds the score at slot `len` (the slot
//!   *after* the last token, whose value estimate is the state after the stop token), or at
//!   `T − 1` when the response fills all T slots.
//!
//! Numbers at masked-out slots (a real forward fills them with something) never reach a result.
//!
//! # Accumulation
//!
//! Each [`ppo_loss`] call is a masked mean over its own micro-batch; TRL (through accelerate)
//! divides each micro-batch loss by `gradient_accumulation_steps` before summing gradients, which
//! the loop must do too.
//!
//! # Precision
//!
//! Inputs are f32 (or any float); everything runs in f64 and results are cast back to the input
//! dtype, as in `grpo_loss`. GAE and whitening run on the host: (B, T) is tiny next to the
//! forward passes that made the inputs.

use crate::names::config_names;
use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

/// What can go wrong in this module (wrapped in `candle_core::Error` by the public functions).
#[derive(Debug, thiserror::Error)]
pub enum PpoLossError {
    #[error("unknown kl_estimator `{0}`: expected k1 or k3")]
    KlEstimator(String),
    #[error("PPO config: {0}")]
    Config(String),
    #[error("PPO: `{name}` has shape {got:?}, expected {want:?}")]
    Shape {
        name: &'static str,
        got: Vec<usize>,
        want: Vec<usize>,
    },
    #[error("PPO: row {row} has length {len} > response width {width}")]
    Length {
        row: usize,
        len: usize,
        width: usize,
    },
    #[error(
        "PPO: whitening `{what}` needs at least 2 unmasked values, got {tokens} \
         (use a larger mini-batch; TRL would produce NaN or fail here)"
    )]
    Whiten { what: &'static str, tokens: f64 },
}

fn wrap(e: PpoLossError) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// Per-token estimator of KL(π ‖ π_ref) from the sampled token (TRL's `kl_estimator`;
/// http://joschu.net/blog/kl-approx.html).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// logπ − logπ_ref: unbiased, can be negative per token. TRL's default.
    K1,
    /// (r − 1) − log r with r = π_ref/π: unbiased, never negative, lower variance.
    K3,
}

config_names!(KlEstimator, PpoLossError, PpoLossError::KlEstimator, {
    K1 => "k1",
    K3 => "k3",
});

/// PPO hyper-parameters (TRL `PPOConfig` names and defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PpoConfig {
    /// Weight of the per-token KL penalty folded into the rewards [`kl_coef`, 0.05].
    pub kl_coef: f64,
    /// [`kl_estimator`, k1]
    pub kl_estimator: KlEstimator,
    /// Whiten the per-token rewards (value mask, mean kept) before GAE [`whiten_rewards`, false].
    pub whiten_rewards: bool,
    /// Discount [`gamma`, 1.0].
    pub gamma: f64,
    /// GAE λ [`lam`, 0.95].
    pub lam: f64,
    /// Policy ratio clip ε [`cliprange`, 0.2].
    pub cliprange: f64,
    /// Value clip around the rollout's values [`cliprange_value`, 0.2].
    pub cliprange_value: f64,
    /// Weight of the value loss [`vf_coef`, 0.1].
    pub vf_coef: f64,
}

impl Default for PpoConfig {
    fn default() -> Self {
        PpoConfig {
            kl_coef: 0.05,
            kl_estimator: KlEstimator::K1,
            whiten_rewards: false,
            gamma: 1.0,
            lam: 0.95,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
        }
    }
}

impl PpoConfig {
    /// Range checks, run by [`rollout`] and [`ppo_loss`].
    pub fn validate(&self) -> std::result::Result<(), PpoLossError> {
        let bad = |m: String| Err(PpoLossError::Config(m));
        let nonneg = |name: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(PpoLossError::Config(format!(
                    "{name} must be finite and >= 0, got {v}"
                )))
            }
        };
        nonneg("kl_coef", self.kl_coef)?;
        nonneg("cliprange_value", self.cliprange_value)?;
        nonneg("vf_coef", self.vf_coef)?;
        for (name, v) in [("gamma", self.gamma), ("lam", self.lam)] {
            if !(0.0..=1.0).contains(&v) {
                return bad(format!(
                    "{name} must be in [0, 1] (a discount above 1 makes GAE grow with distance), \
                     got {v}"
                ));
            }
        }
        if !(self.cliprange.is_finite() && (0.0..1.0).contains(&self.cliprange)) {
            return bad(format!(
                "cliprange must be in [0, 1) so that the lower clip 1 - cliprange stays positive, \
                 got {}",
                self.cliprange
            ));
        }
        Ok(())
    }
}

/// Host-side (B, T) rows in f64.
type Rows = Vec<Vec<f64>>;

fn rows_of(t: &Tensor) -> Result<Rows> {
    t.detach().to_dtype(DType::F64)?.to_vec2::<f64>()
}

fn tensor_of(rows: &Rows, dtype: DType, device: &Device) -> Result<Tensor> {
    let b = rows.len();
    let t = rows.first().map_or(0, |r| r.len());
    let flat: Vec<f64> = rows.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (b, t), device)?.to_dtype(dtype) // (B, T)
}

fn check_shape(name: &'static str, t: &Tensor, want: &[usize]) -> Result<()> {
    if t.dims() != want {
        return Err(wrap(PpoLossError::Shape {
            name,
            got: t.dims().to_vec(),
            want: want.to_vec(),
        }));
    }
    Ok(())
}

fn check_lengths(lengths: &[usize], width: usize) -> Result<()> {
    for (row, &len) in lengths.iter().enumerate() {
        if len > width {
            return Err(wrap(PpoLossError::Length { row, len, width }));
        }
    }
    Ok(())
}

/// 0/1 rows: `t < len + extra`.
fn mask_rows(lengths: &[usize], width: usize, extra: usize) -> Rows {
    lengths
        .iter()
        .map(|&len| {
            (0..width)
                .map(|t| f64::from(u8::from(t < len + extra)))
                .collect()
        })
        .collect()
}

/// The two (B, T) masks, see the module docs.
pub struct PpoMasks {
    /// 1 at slots `t < len` (TRL's `~padding_mask`).
    pub response: Tensor,
    /// 1 at slots `t <= len` (TRL's `~padding_mask_p1`).
    pub value: Tensor,
}

/// [`PpoMasks`] for rows of the given lengths in `width` slots, as f32.
pub fn ppo_masks(lengths: &[usize], width: usize, device: &Device) -> Result<PpoMasks> {
    check_lengths(lengths, width)?;
    Ok(PpoMasks {
        response: tensor_of(&mask_rows(lengths, width, 0), DType::F32, device)?,
        value: tensor_of(&mask_rows(lengths, width, 1), DType::F32, device)?,
    })
}

fn masked_mean_var(x: &Rows, m: &Rows, what: &'static str) -> Result<(f64, f64)> {
    let n: f64 = m.iter().flatten().sum();
    if n < 2.0 {
        return Err(wrap(PpoLossError::Whiten { what, tokens: n }));
    }
    let pairs = || {
        x.iter()
            .flatten()
            .zip(m.iter().flatten())
            .filter(|(_, &w)| w != 0.0)
    };
    let mean = pairs().map(|(v, w)| v * w).sum::<f64>() / n;
    // TRL's masked_var: masked mean of squared deviations, times n / (n − 1).
    let var = pairs().map(|(v, w)| (v - mean).powi(2) * w).sum::<f64>() / n * (n / (n - 1.0));
    Ok((mean, var))
}

fn whiten_rows(x: &Rows, m: &Rows, shift_mean: bool, what: &'static str) -> Result<Rows> {
    let (mean, var) = masked_mean_var(x, m, what)?;
    let inv_std = 1.0 / (var + 1e-8).sqrt();
    Ok(x.iter()
        .zip(m)
        .map(|(xr, mr)| {
            xr.iter()
                .zip(mr)
                .map(|(&v, &w)| {
                    if w == 0.0 {
                        0.0
                    } else {
                        let z = (v - mean) * inv_std;
                        if shift_mean {
                            z
                        } else {
                            z + mean
                        }
                    }
                })
                .collect()
        })
        .collect())
}

/// TRL's `masked_whiten` followed by the `masked_fill(…, 0)` TRL applies at both call sites:
/// (x − mean)/√(var + 1e-8) with the masked mean and the **unbiased** (n − 1) masked variance,
/// the mean added back when `shift_mean` is false, and 0 outside the mask. (B, T) in and out.
/// Errors with fewer than two unmasked values (TRL: NaN, or an exception at zero).
pub fn whiten(x: &Tensor, mask: &Tensor, shift_mean: bool) -> Result<Tensor> {
    let (b, t) = x.dims2()?;
    check_shape("mask", mask, &[b, t])?;
    let out = whiten_rows(&rows_of(x)?, &rows_of(mask)?, shift_mean, "values")?;
    tensor_of(&out, x.dtype(), x.device())
}

/// GAE on host rows; `values` must already be 0 outside the value mask.
fn gae_rows(rewards: &Rows, values: &Rows, gamma: f64, lam: f64) -> (Rows, Rows) {
    let mut adv = rewards.clone();
    let mut ret = rewards.clone();
    for (i, (r, v)) in rewards.iter().zip(values).enumerate() {
        let t_len = r.len();
        let mut last = 0.0;
        for t in (0..t_len).rev() {
            let next = if t + 1 < t_len { v[t + 1] } else { 0.0 };
            let delta = r[t] + gamma * next - v[t];
            last = delta + gamma * lam * last;
            adv[i][t] = last;
            ret[i][t] = last + v[t];
        }
    }
    (adv, ret)
}

fn masked_rows(x: &Rows, m: &Rows) -> Rows {
    x.iter()
        .zip(m)
        .map(|(xr, mr)| {
            xr.iter()
                .zip(mr)
                .map(|(&v, &w)| if w == 0.0 { 0.0 } else { v })
                .collect()
        })
        .collect()
}

/// Generalised advantage estimation, TRL's backward loop: with V zeroed outside `value_mask`,
/// δ_t = r_t + γ·V_{t+1} − V_t (V_T = 0), A_t = δ_t + γλ·A_{t+1}, returns R = A + V.
/// Returns (raw advantages, returns), both (B, T); whiten the advantages with [`whiten`] over
/// the response mask as TRL does (or use [`rollout`], which does all of it).
pub fn gae(
    rewards: &Tensor,
    values: &Tensor,
    value_mask: &Tensor,
    gamma: f64,
    lam: f64,
) -> Result<(Tensor, Tensor)> {
    let (b, t) = rewards.dims2()?;
    check_shape("values", values, &[b, t])?;
    check_shape("value_mask", value_mask, &[b, t])?;
    let v = masked_rows(&rows_of(values)?, &rows_of(value_mask)?);
    let (adv, ret) = gae_rows(&rows_of(rewards)?, &v, gamma, lam);
    let (dt, dev) = (rewards.dtype(), rewards.device());
    Ok((tensor_of(&adv, dt, dev)?, tensor_of(&ret, dt, dev)?))
}

/// One rollout batch as the PPO loop has it after generation and scoring. (B, T) unless noted.
pub struct RolloutInputs<'a> {
    /// Sampling-policy log-probs of the response tokens (become the loss's `old_logprobs`).
    pub logprobs: &'a Tensor,
    /// Reference-policy log-probs of the same tokens.
    pub ref_logprobs: &'a Tensor,
    /// Value-head estimates V_t (state before response token t).
    pub values: &'a Tensor,
    /// (B,) sequence scores from the reward model (after any `missing_eos_penalty`).
    pub scores: &'a Tensor,
    /// Real response tokens per row, stop token included (module docs).
    pub lengths: &'a [usize],
}

/// TRL's `objective/*` logs of one rollout batch (B rows).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutStats {
    /// Mean over rows of Σ_t KL_t [`objective/kl`].
    pub kl: f64,
    /// Mean over rows of Σ_t −logπ over response tokens: a sampled entropy estimate
    /// [`objective/entropy`].
    pub entropy: f64,
    /// Mean over rows of Σ_t −kl_coef·KL_t [`objective/non_score_reward`].
    pub non_score_reward: f64,
    /// non_score_reward + scores [`objective/rlhf_reward`].
    pub rlhf_reward: f64,
    /// Mean score [`objective/scores`].
    pub scores: f64,
}

/// Everything the PPO epochs need from one rollout batch; tensors (B, T) in the dtype of
/// `logprobs`.
pub struct Rollout {
    /// Per-token KL estimate, 0 outside the response mask.
    pub kl: Tensor,
    /// −kl_coef·KL_t, plus the score at slot min(len, T − 1); whitened if asked; 0 outside the
    /// value mask.
    pub rewards: Tensor,
    /// Whitened GAE advantages, 0 outside the response mask.
    pub advantages: Tensor,
    /// GAE returns (targets of the value loss).
    pub returns: Tensor,
    /// The rollout's values, 0 outside the value mask (the value loss's `old_values`).
    pub values: Tensor,
    pub masks: PpoMasks,
    pub stats: RolloutStats,
}

/// Rewards, advantages and returns of one rollout batch — TRL 1.12 `PPOTrainer.train` steps
/// "4. compute rewards", "5. whiten rewards", "6. compute advantages and returns".
pub fn rollout(inputs: &RolloutInputs, cfg: &PpoConfig) -> Result<Rollout> {
    cfg.validate().map_err(wrap)?;
    let (b, t) = inputs.logprobs.dims2()?;
    check_shape("ref_logprobs", inputs.ref_logprobs, &[b, t])?;
    check_shape("values", inputs.values, &[b, t])?;
    check_shape("scores", inputs.scores, &[b])?;
    if inputs.lengths.len() != b {
        return Err(wrap(PpoLossError::Shape {
            name: "lengths",
            got: vec![inputs.lengths.len()],
            want: vec![b],
        }));
    }
    if t == 0 {
        return Err(wrap(PpoLossError::Config(
            "responses have zero slots (T = 0): nothing to score".into(),
        )));
    }
    check_lengths(inputs.lengths, t)?;
    let resp_mask = mask_rows(inputs.lengths, t, 0);
    let value_mask = mask_rows(inputs.lengths, t, 1);
    let lp = rows_of(inputs.logprobs)?;
    let rlp = rows_of(inputs.ref_logprobs)?;
    let scores = inputs
        .scores
        .detach()
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;

    // TRL fills both log-probs with INVALID_LOGPROB outside the response, so the KL is 0 there.
    let mut kl = vec![vec![0.0; t]; b];
    let mut rewards = vec![vec![0.0; t]; b];
    for i in 0..b {
        for j in 0..inputs.lengths[i] {
            let logr = rlp[i][j] - lp[i][j]; // log(π_ref/π)
            kl[i][j] = match cfg.kl_estimator {
                KlEstimator::K1 => -logr,
                KlEstimator::K3 => logr.exp() - 1.0 - logr,
            };
            rewards[i][j] = -cfg.kl_coef * kl[i][j];
        }
        // TRL's `actual_end`: the slot after the last token, or the last slot when full.
        rewards[i][inputs.lengths[i].min(t - 1)] += scores[i];
    }
    let row_sum_mean = |x: &Rows| x.iter().map(|r| r.iter().sum::<f64>()).sum::<f64>() / b as f64;
    let kl_mean = row_sum_mean(&kl);
    let non_score = -cfg.kl_coef * kl_mean;
    let score_mean = scores.iter().sum::<f64>() / b as f64;
    let neg_lp: Rows = masked_rows(&lp, &resp_mask)
        .iter()
        .map(|r| r.iter().map(|x| -x).collect())
        .collect();
    let stats = RolloutStats {
        kl: kl_mean,
        entropy: row_sum_mean(&neg_lp),
        non_score_reward: non_score,
        rlhf_reward: non_score + score_mean,
        scores: score_mean,
    };

    if cfg.whiten_rewards {
        rewards = whiten_rows(&rewards, &value_mask, false, "rewards")?;
    }
    let values = masked_rows(&rows_of(inputs.values)?, &value_mask);
    let (adv, returns) = gae_rows(&rewards, &values, cfg.gamma, cfg.lam);
    let adv = whiten_rows(&adv, &resp_mask, true, "advantages")?;

    let (dt, dev) = (inputs.logprobs.dtype(), inputs.logprobs.device());
    Ok(Rollout {
        kl: tensor_of(&kl, dt, dev)?,
        rewards: tensor_of(&rewards, dt, dev)?,
        advantages: tensor_of(&adv, dt, dev)?,
        returns: tensor_of(&returns, dt, dev)?,
        values: tensor_of(&values, dt, dev)?,
        masks: PpoMasks {
            response: tensor_of(&resp_mask, DType::F32, dev)?,
            value: tensor_of(&value_mask, DType::F32, dev)?,
        },
        stats,
    })
}

/// 1 − Var(R − V)/Var(R) over the value mask: how much of the return variance the value head
/// explains (1 = perfect, ≤ 0 = no better than a constant). Not logged by TRL 1.12; the usual
/// RL diagnostic. NaN when the returns have zero variance; errors with fewer than 2 slots.
pub fn explained_variance(returns: &Tensor, values: &Tensor, value_mask: &Tensor) -> Result<f64> {
    let (b, t) = returns.dims2()?;
    check_shape("values", values, &[b, t])?;
    check_shape("value_mask", value_mask, &[b, t])?;
    let r = rows_of(returns)?;
    let v = rows_of(values)?;
    let m = rows_of(value_mask)?;
    let resid: Rows = r
        .iter()
        .zip(&v)
        .map(|(rr, vr)| rr.iter().zip(vr).map(|(a, b)| a - b).collect())
        .collect();
    let (_, var_r) = masked_mean_var(&r, &m, "returns")?;
    let (_, var_e) = masked_mean_var(&resid, &m, "returns - values")?;
    Ok(if var_r == 0.0 {
        f64::NAN
    } else {
        1.0 - var_e / var_r
    })
}

/// One PPO micro-batch. (B, T) each.
pub struct PpoLossInputs<'a> {
    /// Current-policy log-probs of the response tokens; differentiable.
    pub logprobs: &'a Tensor,
    /// The rollout's log-probs (behaviour policy).
    pub old_logprobs: &'a Tensor,
    /// [`Rollout::advantages`] rows of this micro-batch.
    pub advantages: &'a Tensor,
    /// Current value-head estimates; differentiable.
    pub values: &'a Tensor,
    /// [`Rollout::values`] rows of this micro-batch.
    pub old_values: &'a Tensor,
    /// [`Rollout::returns`] rows of this micro-batch.
    pub returns: &'a Tensor,
    /// [`PpoMasks::response`] / [`PpoMasks::value`] rows of this micro-batch.
    pub response_mask: &'a Tensor,
    pub value_mask: &'a Tensor,
}

/// What TRL logs per micro-batch (its names in brackets; TRL averages them over the epoch).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PpoLossStats {
    /// [`loss/policy_avg`]
    pub pg_loss: f64,
    /// [`loss/value_avg`]
    pub vf_loss: f64,
    /// Fraction of response tokens where the clipped policy term was chosen
    /// [`policy/clipfrac_avg`].
    pub pg_clipfrac: f64,
    /// Fraction of value slots where the clipped value term was chosen [`val/clipfrac_avg`].
    pub vf_clipfrac: f64,
    /// 0.5·mean((logπ − logπ_old)²) over **all** B·T slots, masked ones counting as 0, as TRL's
    /// unmasked `.mean()` does [`policy/approxkl_avg`].
    pub approxkl: f64,
    /// Mean ratio over all B·T slots, masked ones counting as 1 (TRL's `val/ratio`).
    pub ratio_mean: f64,
}

pub struct PpoLossOutput {
    /// pg_loss + vf_coef·vf_loss, scalar in the dtype of `logprobs`.
    pub loss: Tensor,
    pub stats: PpoLossStats,
}

/// The PPO loss of one micro-batch (TRL 1.12 `PPOTrainer.train`, inner loop):
///
/// ρ = exp(logπ − logπ_old); pg = masked_mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), response);
/// V_clip = clip(V, V_old − ε_v, V_old + ε_v);
/// vf = ½·masked_mean(max((V − R)², (V_clip − R)²), value); loss = pg + vf_coef·vf.
///
/// Gradient flows into `logprobs` and `values` only. An empty response mask gives pg = 0 (TRL:
/// NaN).
pub fn ppo_loss(inputs: &PpoLossInputs, cfg: &PpoConfig) -> Result<PpoLossOutput> {
    cfg.validate().map_err(wrap)?;
    let (b, t) = inputs.logprobs.dims2()?;
    for (name, x) in [
        ("old_logprobs", inputs.old_logprobs),
        ("advantages", inputs.advantages),
        ("values", inputs.values),
        ("old_values", inputs.old_values),
        ("returns", inputs.returns),
        ("response_mask", inputs.response_mask),
        ("value_mask", inputs.value_mask),
    ] {
        check_shape(name, x, &[b, t])?;
    }
    let out_dtype = inputs.logprobs.dtype();
    let f64_of = |x: &Tensor| x.detach().to_dtype(DType::F64);
    let rm = f64_of(inputs.response_mask)?.ne(0.0)?; // (B, T) u8
    let vm = f64_of(inputs.value_mask)?.ne(0.0)?; // (B, T) u8
    let zeros = Tensor::zeros((b, t), DType::F64, inputs.logprobs.device())?;
    // Masked-out slots become 0 (TRL: INVALID_LOGPROB for both log-probs, 0 for values), so
    // whatever the forward put there cannot reach the loss or its gradient.
    let sel = |m: &Tensor, x: &Tensor| m.where_cond(x, &zeros);
    let lp = sel(&rm, &inputs.logprobs.to_dtype(DType::F64)?)?; // tracked
    let old = sel(&rm, &f64_of(inputs.old_logprobs)?)?;
    let adv = sel(&rm, &f64_of(inputs.advantages)?)?;
    let v = sel(&vm, &inputs.values.to_dtype(DType::F64)?)?; // tracked
    let v_old = sel(&vm, &f64_of(inputs.old_values)?)?;
    let ret = sel(&vm, &f64_of(inputs.returns)?)?;
    let rm_f = rm.to_dtype(DType::F64)?;
    let vm_f = vm.to_dtype(DType::F64)?;
    let n_resp = rm_f.sum_all()?.to_scalar::<f64>()?;
    let n_val = vm_f.sum_all()?.to_scalar::<f64>()?;

    // Policy: −A·ρ vs −A·clip(ρ). torch's max splits a tie's gradient between its two inputs,
    // and a tie means ρ is inside the clip range, where clamp passes its gradient: the full
    // gradient of −A·ρ. The clipped term is strictly larger only outside the range, where its
    // gradient is 0. So take the unclipped branch on ties and detach the clipped one.
    let diff = (&lp - &old)?;
    let ratio = diff.exp()?;
    let pg1 = (adv.neg()? * &ratio)?;
    let pg2 = (adv.neg()?
        * ratio
            .detach()
            .clamp(1.0 - cfg.cliprange, 1.0 + cfg.cliprange)?)?;
    let pg_pick = pg1.ge(&pg2)?;
    let pg = pg_pick.where_cond(&pg1, &pg2)?; // (B, T)
    let pg_loss = ((pg * &rm_f)?.sum_all()? / n_resp.max(1.0))?;

    // Value: same tie argument; the clipped prediction is built from a detached V.
    let v_clip = v.detach().clamp(
        &(&v_old - cfg.cliprange_value)?,
        &(&v_old + cfg.cliprange_value)?,
    )?;
    let vf1 = (&v - &ret)?.sqr()?;
    let vf2 = (v_clip - &ret)?.sqr()?;
    let vf_pick = vf1.ge(&vf2)?;
    let vf = vf_pick.where_cond(&vf1, &vf2)?; // (B, T)
    let vf_loss = ((vf * &vm_f)?.sum_all()? * (0.5 / n_val.max(1.0)))?;

    let loss = (&pg_loss + (&vf_loss * cfg.vf_coef)?)?.to_dtype(out_dtype)?;

    let frac = |a: &Tensor, b_: &Tensor, m: &Tensor, n: f64| -> Result<f64> {
        let hit = a.gt(b_)?.to_dtype(DType::F64)?;
        Ok((hit * m)?.sum_all()?.to_scalar::<f64>()? / n.max(1.0))
    };
    let cells = (b * t).max(1) as f64;
    let stats = PpoLossStats {
        pg_loss: pg_loss.to_scalar::<f64>()?,
        vf_loss: vf_loss.to_scalar::<f64>()?,
        pg_clipfrac: frac(&pg2, &pg1, &rm_f, n_resp)?,
        vf_clipfrac: frac(&vf2, &vf1, &vm_f, n_val)?,
        approxkl: 0.5 * diff.detach().sqr()?.sum_all()?.to_scalar::<f64>()? / cells,
        ratio_mean: ratio.detach().sum_all()?.to_scalar::<f64>()? / cells,
    };
    Ok(PpoLossOutput { loss, stats })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_estimator_names_round_trip() {
        for k in [KlEstimator::K1, KlEstimator::K3] {
            assert_eq!(k.to_string().parse::<KlEstimator>().unwrap(), k);
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("\"{k}\""));
            assert_eq!(serde_json::from_str::<KlEstimator>(&json).unwrap(), k);
        }
        assert!("k2".parse::<KlEstimator>().is_err());
    }

    #[test]
    fn masks_follow_trl_padding_masks() {
        let m = ppo_masks(&[0, 2, 4], 4, &Device::Cpu).unwrap();
        let r = m.response.to_vec2::<f32>().unwrap();
        let v = m.value.to_vec2::<f32>().unwrap();
        assert_eq!(
            r,
            vec![vec![0., 0., 0., 0.], vec![1., 1., 0., 0.], vec![1.; 4]]
        );
        assert_eq!(
            v,
            vec![vec![1., 0., 0., 0.], vec![1., 1., 1., 0.], vec![1.; 4]]
        );
        assert!(ppo_masks(&[5], 4, &Device::Cpu).is_err());
    }
}
