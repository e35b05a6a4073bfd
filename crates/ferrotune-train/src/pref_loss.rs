//! Pairwise preference losses on small tensors: DPO (`sigmoid` with optional cDPO label
//! smoothing, `ipo`, `hinge`) from policy and reference sequence log-probs, and the
//! Bradley–Terry reward-model loss (with TRL's optional per-pair `margin` and
//! `center_rewards_coefficient`), each with the stats TRL logs. Behaviour matches TRL 1.16
//! `DPOTrainer._compute_loss` and `RewardTrainer.compute_loss`; `tests/pref_loss_parity.rs`
//! checks values and gradients against TRL's own code (`fixtures/dpo/make_pref_loss.py`).
//!
//! Owns: numbers from (sequence log-probs | scalar rewards). Does not own: computing log-probs or
//! rewards from a model, the chosen/rejected batching, or the optimizer step — the DPO and
//! reward-model loops do those.
//!
//! # What the caller passes
//!
//! - Sequence log-probs are **summed** over the completion tokens (TRL: `per_token_logps.sum(1)`
//!   with the prompt and padding masked out), for policy and reference alike.
//! - `ipo` additionally needs each completion's token count: TRL 1.16 divides each side's
//!   log-ratio by its own completion length (`chosen_scores / chosen_mask.sum(1).clamp(min=1)`,
//!   the IPO authors' per-token normalisation), so β means the same across lengths. The logged
//!   rewards stay β × the *summed* log-ratios, as in TRL.
//!
//! # TRL features not mirrored
//!
//! Only these three loss types; no loss mixtures (`loss_weights`), WPO weighting
//! (`use_weighting`), length desensitisation (`ld_alpha`) or f-divergences
//! (`f_divergence_type`); all default off in TRL.
//!
//! # Label smoothing
//!
//! TRL 1.16's `sigmoid` ignores `label_smoothing` (its docs reserve it for `robust` and
//! `exo_pair`). Here ε > 0 with `sigmoid` gives conservative DPO,
//! −(1−ε)·logσ(βΔ) − ε·logσ(−βΔ): TRL's `sigmoid` through 0.24 (`dpo_loss`; gone by 0.29),
//! and 1.16's `aot` for a single pair. ε = 0 (the default) is TRL 1.16's `sigmoid` exactly.
//! `ipo` and `hinge` refuse ε ≠ 0 rather than ignore it.
//!
//! # Precision
//!
//! Inputs are f32 (or any float); the math runs in f64 and the loss is cast back, as in
//! `grpo_loss`. The tensors are (B,), so the cost is nil.

use crate::names::config_names;
use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};

/// What can go wrong in this module (wrapped in `candle_core::Error` by the loss functions).
#[derive(Debug, thiserror::Error)]
pub enum PrefLossError {
    #[error("unknown DPO loss_type `{0}`: expected one of sigmoid, ipo, hinge")]
    LossType(String),
    #[error("{what}: {msg}")]
    Config { what: &'static str, msg: String },
    #[error("{what}: `{name}` has shape {got:?}, expected {want:?}")]
    Shape {
        what: &'static str,
        name: &'static str,
        got: Vec<usize>,
        want: Vec<usize>,
    },
}

fn wrap(e: PrefLossError) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// The DPO loss family member (TRL's `loss_type`, same names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpoLossType {
    /// −logσ(βΔ), Δ = (logπ(y_w) − logπ_ref(y_w)) − (logπ(y_l) − logπ_ref(y_l)) — DPO,
    /// 2305.18290. TRL's default. With label smoothing: cDPO.
    Sigmoid,
    /// (Δ_avg − 1/(2β))², with per-token-averaged log-ratios — IPO, 2310.12036 eq. 17.
    Ipo,
    /// relu(1 − βΔ) — SLiC, 2305.10425.
    Hinge,
}

config_names!(DpoLossType, PrefLossError, PrefLossError::LossType, {
    Sigmoid => "sigmoid",
    Ipo => "ipo",
    Hinge => "hinge",
});

/// DPO hyper-parameters (TRL `DPOConfig` names).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpoConfig {
    /// Strength of the pull to the reference (IPO: the regulariser τ) [`beta`, default 0.1].
    pub beta: f64,
    /// [`loss_type`, default `sigmoid`]
    pub loss_type: DpoLossType,
    /// cDPO's probability that a preference label is flipped; `sigmoid` only (module docs)
    /// [`label_smoothing`, default 0].
    pub label_smoothing: f64,
}

impl Default for DpoConfig {
    fn default() -> Self {
        DpoConfig {
            beta: 0.1,
            loss_type: DpoLossType::Sigmoid,
            label_smoothing: 0.0,
        }
    }
}

impl DpoConfig {
    /// Cross-field checks, run by [`dpo_loss`].
    pub fn validate(&self) -> std::result::Result<(), PrefLossError> {
        let bad = |msg: String| {
            Err(PrefLossError::Config {
                what: "DPO config",
                msg,
            })
        };
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return bad(format!(
                "beta must be finite and > 0 (it scales the log-ratio margin; IPO divides by it), \
                 got {}",
                self.beta
            ));
        }
        match self.loss_type {
            DpoLossType::Sigmoid => {
                if !(self.label_smoothing.is_finite() && (0.0..0.5).contains(&self.label_smoothing))
                {
                    return bad(format!(
                        "label_smoothing must be in [0, 0.5) (at 0.5 the loss no longer depends on \
                         which completion was preferred), got {}",
                        self.label_smoothing
                    ));
                }
            }
            DpoLossType::Ipo | DpoLossType::Hinge => {
                if self.label_smoothing != 0.0 {
                    return bad(format!(
                        "label_smoothing = {} has no effect on loss_type `{}` (TRL ignores it); \
                         use `sigmoid` for conservative DPO or set it to 0",
                        self.label_smoothing, self.loss_type
                    ));
                }
            }
        }
        Ok(())
    }
}

/// One batch of B preference pairs. All tensors are (B,).
pub struct DpoInputs<'a> {
    /// Policy log-prob of each chosen completion, summed over its tokens; differentiable.
    pub policy_chosen: &'a Tensor,
    /// Policy log-prob of each rejected completion, summed over its tokens; differentiable.
    pub policy_rejected: &'a Tensor,
    /// Reference log-probs (summed); treated as constants.
    pub ref_chosen: &'a Tensor,
    pub ref_rejected: &'a Tensor,
    /// Completion token counts of the chosen / rejected sides; required by `ipo` (clamped to
    /// ≥ 1 as in TRL), unused otherwise.
    pub chosen_tokens: Option<&'a Tensor>,
    pub rejected_tokens: Option<&'a Tensor>,
}

/// The batch means TRL logs (its metric names in brackets).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DpoStats {
    /// Mean β·(logπ(y_w) − logπ_ref(y_w)) [`rewards/chosen`].
    pub rewards_chosen: f64,
    /// Mean β·(logπ(y_l) − logπ_ref(y_l)) [`rewards/rejected`].
    pub rewards_rejected: f64,
    /// Fraction of pairs whose chosen reward is strictly larger [`rewards/accuracies`].
    pub rewards_accuracies: f64,
    /// Mean chosen − rejected reward [`rewards/margins`].
    pub rewards_margins: f64,
    /// Mean policy log-prob of the chosen completions [`logps/chosen`].
    pub logps_chosen: f64,
    /// [`logps/rejected`]
    pub logps_rejected: f64,
}

pub struct DpoOutput {
    /// Scalar mean over the pairs, in the dtype of `policy_chosen`; gradient flows into the two
    /// policy log-prob tensors only.
    pub loss: Tensor,
    /// Per-pair losses (the loss is their mean).
    pub losses: Vec<f64>,
    /// Per-pair implicit rewards β·(logπ − logπ_ref), their difference, and the batch means.
    pub chosen_rewards: Vec<f64>,
    pub rejected_rewards: Vec<f64>,
    pub margins: Vec<f64>,
    pub stats: DpoStats,
}

fn check_shape(what: &'static str, name: &'static str, t: &Tensor, want: &[usize]) -> Result<()> {
    if t.dims() != want {
        return Err(wrap(PrefLossError::Shape {
            what,
            name,
            got: t.dims().to_vec(),
            want: want.to_vec(),
        }));
    }
    Ok(())
}

/// logσ(x) = −log(1 + e^(−x)), evaluated on the side where the exponent is ≤ 0 so it neither
/// overflows nor loses the tail; the branch is picked with `where_cond` on inputs that are 0
/// where unused, so the unused branch cannot put NaN into the gradient. d/dx = σ(−x), 0.5 at 0
/// (as torch's `logsigmoid`).
pub(crate) fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let zeros = x.zeros_like()?;
    let pos = x.ge(0.0)?;
    let xp = pos.where_cond(x, &zeros)?; // x where x ≥ 0, else 0
    let xn = pos.where_cond(&zeros, x)?; // x where x < 0, else 0
    let on_pos = ((xp.neg()?.exp()? + 1.0)?.log()?).neg()?; // −log(1 + e^(−x))
    let on_neg = (&xn - (xn.exp()? + 1.0)?.log()?)?; // x − log(1 + e^x)
    pos.where_cond(&on_pos, &on_neg)
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        f64::NAN
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// The DPO loss of one batch of pairs (TRL 1.16 `DPOTrainer._compute_loss`, reverse-KL DPO):
///
/// Δ = (πc − refc) − (πr − refr);
/// `sigmoid`: −(1−ε)·logσ(βΔ) − ε·logσ(−βΔ); `ipo`: ((πc − refc)/n_c − (πr − refr)/n_r − 1/(2β))²;
/// `hinge`: relu(1 − βΔ); loss = mean over pairs.
pub fn dpo_loss(inputs: &DpoInputs, cfg: &DpoConfig) -> Result<DpoOutput> {
    const WHAT: &str = "DPO loss";
    cfg.validate().map_err(wrap)?;
    let b = inputs.policy_chosen.dims1()?;
    if b == 0 {
        return Err(wrap(PrefLossError::Config {
            what: WHAT,
            msg: "empty batch: need at least one preference pair".into(),
        }));
    }
    check_shape(WHAT, "policy_rejected", inputs.policy_rejected, &[b])?;
    check_shape(WHAT, "ref_chosen", inputs.ref_chosen, &[b])?;
    check_shape(WHAT, "ref_rejected", inputs.ref_rejected, &[b])?;
    if let Some(t) = inputs.chosen_tokens {
        check_shape(WHAT, "chosen_tokens", t, &[b])?;
    }
    if let Some(t) = inputs.rejected_tokens {
        check_shape(WHAT, "rejected_tokens", t, &[b])?;
    }
    let out_dtype = inputs.policy_chosen.dtype();
    let pc = inputs.policy_chosen.to_dtype(DType::F64)?; // (B,), tracked
    let pr = inputs.policy_rejected.to_dtype(DType::F64)?; // (B,), tracked
    let rc = inputs.ref_chosen.detach().to_dtype(DType::F64)?;
    let rr = inputs.ref_rejected.detach().to_dtype(DType::F64)?;
    let chosen_lr = (&pc - &rc)?; // (B,)
    let rejected_lr = (&pr - &rr)?; // (B,)
    let beta = cfg.beta;

    let per_pair = match cfg.loss_type {
        DpoLossType::Sigmoid => {
            let z = ((&chosen_lr - &rejected_lr)? * beta)?; // βΔ
            let eps = cfg.label_smoothing;
            let clean = (log_sigmoid(&z)? * -(1.0 - eps))?;
            if eps == 0.0 {
                clean
            } else {
                (clean - (log_sigmoid(&z.neg()?)? * eps)?)?
            }
        }
        DpoLossType::Ipo => {
            let (Some(nc), Some(nr)) = (inputs.chosen_tokens, inputs.rejected_tokens) else {
                return Err(wrap(PrefLossError::Config {
                    what: WHAT,
                    msg: "loss_type `ipo` needs chosen_tokens and rejected_tokens: TRL averages \
                          each log-ratio over its completion's tokens"
                        .into(),
                }));
            };
            let nc = nc
                .detach()
                .to_dtype(DType::F64)?
                .clamp(1.0, f64::INFINITY)?;
            let nr = nr
                .detach()
                .to_dtype(DType::F64)?
                .clamp(1.0, f64::INFINITY)?;
            let d = ((chosen_lr.div(&nc)? - rejected_lr.div(&nr)?)? - 1.0 / (2.0 * beta))?;
            d.sqr()?
        }
        DpoLossType::Hinge => {
            let m = ((&chosen_lr - &rejected_lr)?.affine(-beta, 1.0))?; // 1 − βΔ
                                                                        // torch's relu passes no gradient at 0; candle's does, so select explicitly.
            m.gt(0.0)?.where_cond(&m, &m.zeros_like()?)?
        }
    };
    let loss = per_pair.mean_all()?.to_dtype(out_dtype)?;

    let losses = per_pair.to_vec1::<f64>()?;
    let chosen_rewards: Vec<f64> = (chosen_lr.detach() * beta)?.to_vec1::<f64>()?;
    let rejected_rewards: Vec<f64> = (rejected_lr.detach() * beta)?.to_vec1::<f64>()?;
    let margins: Vec<f64> = chosen_rewards
        .iter()
        .zip(&rejected_rewards)
        .map(|(c, r)| c - r)
        .collect();
    let wins = chosen_rewards
        .iter()
        .zip(&rejected_rewards)
        .filter(|(c, r)| c > r)
        .count();
    let stats = DpoStats {
        rewards_chosen: mean(&chosen_rewards),
        rewards_rejected: mean(&rejected_rewards),
        rewards_accuracies: wins as f64 / b as f64,
        rewards_margins: mean(&margins),
        logps_chosen: mean(&pc.detach().to_vec1::<f64>()?),
        logps_rejected: mean(&pr.detach().to_vec1::<f64>()?),
    };
    Ok(DpoOutput {
        loss,
        losses,
        chosen_rewards,
        rejected_rewards,
        margins,
        stats,
    })
}

/// What TRL's `RewardTrainer` logs (its names in brackets).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RmStats {
    /// Fraction of pairs with r_chosen > r_rejected strictly [`accuracy`].
    pub accuracy: f64,
    /// Mean r_chosen − r_rejected, without the margin term [`margin`].
    pub margin: f64,
    /// Over all 2B rewards [`min_reward`, `mean_reward`, `max_reward`].
    pub min_reward: f64,
    pub mean_reward: f64,
    pub max_reward: f64,
}

pub struct RmOutput {
    /// Scalar, in the dtype of `r_chosen`; gradient flows into both reward tensors.
    pub loss: Tensor,
    pub stats: RmStats,
}

/// The Bradley–Terry reward-model loss (TRL 1.16 `RewardTrainer.compute_loss`):
/// mean(−logσ(r_c − r_r − margin)) + c·mean((r_c + r_r)²), the second term only when
/// `center_rewards_coefficient` = Some(c) (2312.09244's centering, which keeps rewards near 0).
/// All tensors are (B,); `margin` is a per-pair constant (TRL's dataset `margin` column).
pub fn reward_model_loss(
    r_chosen: &Tensor,
    r_rejected: &Tensor,
    margin: Option<&Tensor>,
    center_rewards_coefficient: Option<f64>,
) -> Result<RmOutput> {
    const WHAT: &str = "reward-model loss";
    let b = r_chosen.dims1()?;
    if b == 0 {
        return Err(wrap(PrefLossError::Config {
            what: WHAT,
            msg: "empty batch: need at least one preference pair".into(),
        }));
    }
    check_shape(WHAT, "r_rejected", r_rejected, &[b])?;
    if let Some(m) = margin {
        check_shape(WHAT, "margin", m, &[b])?;
    }
    if let Some(c) = center_rewards_coefficient {
        if !(c.is_finite() && c >= 0.0) {
            return Err(wrap(PrefLossError::Config {
                what: WHAT,
                msg: format!("center_rewards_coefficient must be finite and >= 0, got {c}"),
            }));
        }
    }
    let out_dtype = r_chosen.dtype();
    let rc = r_chosen.to_dtype(DType::F64)?; // (B,), tracked
    let rr = r_rejected.to_dtype(DType::F64)?; // (B,), tracked
    let mut diff = (&rc - &rr)?;
    if let Some(m) = margin {
        diff = (diff - m.detach().to_dtype(DType::F64)?)?;
    }
    let mut loss = log_sigmoid(&diff)?.neg()?.mean_all()?;
    if let Some(c) = center_rewards_coefficient {
        loss = (loss + ((&rc + &rr)?.sqr()?.mean_all()? * c)?)?;
    }
    let loss = loss.to_dtype(out_dtype)?;

    let rc_h = rc.detach().to_vec1::<f64>()?;
    let rr_h = rr.detach().to_vec1::<f64>()?;
    let all: Vec<f64> = rc_h.iter().chain(&rr_h).copied().collect();
    let diffs: Vec<f64> = rc_h.iter().zip(&rr_h).map(|(c, r)| c - r).collect();
    let stats = RmStats {
        accuracy: diffs.iter().filter(|&&d| d > 0.0).count() as f64 / b as f64,
        margin: mean(&diffs),
        min_reward: all.iter().copied().fold(f64::INFINITY, f64::min),
        mean_reward: mean(&all),
        max_reward: all.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    };
    Ok(RmOutput { loss, stats })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn loss_type_names_round_trip() {
        for lt in [DpoLossType::Sigmoid, DpoLossType::Ipo, DpoLossType::Hinge] {
            assert_eq!(lt.to_string().parse::<DpoLossType>().unwrap(), lt);
            let json = serde_json::to_string(&lt).unwrap();
            assert_eq!(json, format!("\"{lt}\""));
            assert_eq!(serde_json::from_str::<DpoLossType>(&json).unwrap(), lt);
        }
        let e = "robust".parse::<DpoLossType>().unwrap_err().to_string();
        assert!(
            e.contains("robust") && e.contains("sigmoid, ipo, hinge"),
            "{e}"
        );
    }

    #[test]
    fn log_sigmoid_is_stable_and_has_torch_gradient() {
        let x = candle_core::Var::from_tensor(
            &Tensor::new(&[-800.0f64, -1.0, 0.0, 1.0, 800.0], &Device::Cpu).unwrap(),
        )
        .unwrap();
        let y = log_sigmoid(x.as_tensor()).unwrap();
        let v = y.to_vec1::<f64>().unwrap();
        assert_eq!(v[0], -800.0);
        assert!((v[1] - (-1.3132616875182228)).abs() < 1e-15, "{}", v[1]);
        assert!((v[2] + std::f64::consts::LN_2).abs() < 1e-15);
        assert!(v[4] == 0.0 && v.iter().all(|x| x.is_finite()));
        let g = y.sum_all().unwrap().backward().unwrap();
        let g = g.get(x.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        // d/dx logσ(x) = σ(−x)
        assert_eq!(g[0], 1.0);
        assert_eq!(g[2], 0.5);
        assert_eq!(g[4], 0.0);
        assert!(g.iter().all(|x| x.is_finite()));
    }
}
