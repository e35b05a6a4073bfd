//! PPO (RLHF) math on small tensors (the rollout side, masks to GAE, is `ppo_gae.rs`): the response / value masks from response lengths, per-token
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

pub use crate::ppo_gae::{
    explained_variance, gae, ppo_masks, rollout, whiten, PpoMasks, Rollout, RolloutInputs,
    RolloutStats,
};

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

pub(crate) fn wrap(e: PpoLossError) -> candle_core::Error {
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
pub(crate) type Rows = Vec<Vec<f64>>;

pub(crate) fn rows_of(t: &Tensor) -> Result<Rows> {
    t.detach().to_dtype(DType::F64)?.to_vec2::<f64>()
}

pub(crate) fn tensor_of(rows: &Rows, dtype: DType, device: &Device) -> Result<Tensor> {
    let b = rows.len();
    let t = rows.first().map_or(0, |r| r.len());
    let flat: Vec<f64> = rows.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (b, t), device)?.to_dtype(dtype) // (B, T)
}

pub(crate) fn check_shape(name: &'static str, t: &Tensor, want: &[usize]) -> Result<()> {
    if t.dims() != want {
        return Err(wrap(PpoLossError::Shape {
            name,
            got: t.dims().to_vec(),
            want: want.to_vec(),
        }));
    }
    Ok(())
}

pub(crate) fn check_lengths(lengths: &[usize], width: usize) -> Result<()> {
    for (row, &len) in lengths.iter().enumerate() {
        if len > width {
            return Err(wrap(PpoLossError::Length { row, len, width }));
        }
    }
    Ok(())
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
}
