//! The GRPO family's data side: group-relative advantages (`scale_rewards`), the reward health
//! of a generation batch TRL logs, the completion mask (with `mask_truncated_completions`) and
//! the top-entropy token mask (`top_entropy_quantile`).
//! Behaviour matches TRL 1.16 `GRPOTrainer` (`_generate_and_score_completions`,
//! `get_high_entropy_mask`);
//! `tests/grpo_loss_parity.rs` checks it against values from TRL's own code.
//!
//! Owns: numbers from rewards and lengths. Does not own: the loss ([`crate::grpo_loss`]).

use crate::grpo_loss::GrpoLossError;
use crate::names::config_names;
use serde::{Deserialize, Serialize};

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

/// Per group of `group_size` consecutive rewards: whether they all agree (std ≤ 1e-8, TRL's
/// `frac_reward_zero_std` test), i.e. the group carries no learning signal. A group whose std
/// is undefined (fewer than two scorable rewards) is not zero-std, as in TRL
/// (`torch.isclose(NaN, 0)` is false); with `group_size == 1` every group is zero-std.
pub fn zero_std_groups(
    rewards: &[f64],
    group_size: usize,
) -> std::result::Result<Vec<bool>, GrpoLossError> {
    check_groups(rewards.len(), group_size)?;
    Ok(rewards
        .chunks(group_size)
        .map(|g| {
            let std = if group_size > 1 {
                nan_mean_std(g).1
            } else {
                0.0
            };
            std.abs() <= 1e-8 // torch.isclose(std, 0): atol 1e-8
        })
        .collect())
}

/// Per group: whether it carries a learning signal — at least two scorable rewards that are not
/// all equal. Dynamic sampling keeps only these groups.
pub fn informative_groups(
    rewards: &[f64],
    group_size: usize,
) -> std::result::Result<Vec<bool>, GrpoLossError> {
    let zero = zero_std_groups(rewards, group_size)?;
    Ok(rewards
        .chunks(group_size)
        .zip(zero)
        .map(|(g, z)| !z && g.iter().filter(|r| !r.is_nan()).count() >= 2)
        .collect())
}

/// [`GroupStats`] of `rewards` laid out as consecutive groups of `group_size` (zero-std as in
/// [`zero_std_groups`]).
pub fn group_stats(
    rewards: &[f64],
    group_size: usize,
) -> std::result::Result<GroupStats, GrpoLossError> {
    let zero_std_groups = zero_std_groups(rewards, group_size)?
        .into_iter()
        .filter(|&z| z)
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

/// `torch.quantile(x, q)` with its default linear interpolation; `x` non-empty.
pub fn quantile(mut x: Vec<f64>, q: f64) -> f64 {
    x.sort_by(f64::total_cmp);
    let pos = q * (x.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    x[lo] + (x[hi] - x[lo]) * (pos - lo as f64)
}

/// TRL's `get_high_entropy_mask` (`top_entropy_quantile`): 1 where a masked token's entropy is at or above the
/// `1 − top_entropy_quantile` quantile of the masked tokens' entropies, else 0.
pub fn high_entropy_mask(ent: &[Vec<f64>], mask: &[Vec<f64>], top_quantile: f64) -> Vec<Vec<f64>> {
    let local: Vec<f64> = ent
        .iter()
        .flatten()
        .zip(mask.iter().flatten())
        .filter(|(_, &m)| m != 0.0)
        .map(|(&e, _)| e)
        .collect();
    if local.is_empty() {
        return mask.iter().map(|r| vec![0.0; r.len()]).collect();
    }
    let thr = quantile(local, 1.0 - top_quantile);
    ent.iter()
        .zip(mask)
        .map(|(er, mr)| {
            er.iter()
                .zip(mr)
                .map(|(&e, &m)| f64::from(u8::from(m != 0.0 && e * m >= thr)))
                .collect()
        })
        .collect()
}
