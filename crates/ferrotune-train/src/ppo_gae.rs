//! The rollout side of PPO's math (see `ppo_loss.rs` for the layout, masks and precision
//! notes, and the TRL version it follows): response / value masks from response lengths,
//! per-token rewards with the KL penalty folded in and the score added at the end, reward and
//! advantage whitening, GAE(γ, λ) advantages and returns, explained variance.
//!
//! Owns: the numbers a rollout batch gives before any loss. Does not own: the clipped losses
//! (`ppo_loss`), generation or the value head forward.

use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::ppo_loss::{
    check_lengths, check_shape, rows_of, tensor_of, wrap, KlEstimator, PpoConfig, PpoLossError,
    Rows,
};

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

#[cfg(test)]
mod tests {
    use super::*;

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
