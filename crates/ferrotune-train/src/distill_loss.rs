//! Distillation losses on fixed logits: TRL's reductions (`batchmean`, or a sum over the
//! gradient-accumulation step's tokens) of the per-row divergence op
//! [`ferrotune_nn::ops::divergence`] (forward KL, reverse KL or generalized JSD at temperature τ,
//! full vocabulary or teacher top-k; its module docs have the formulas). `tests/distill_loss_parity.rs`
//! checks loss and d loss / d student logits against TRL's own code
//! (`fixtures/distill/make_distill_loss.py`).
//!
//! Owns: the reduction. Does not own: the divergence kernel (`ferrotune-nn`), running either
//! model, choosing the scored rows, mixing with the SFT loss, or the training loop.

use candle_core::{DType, Result, Tensor};
pub use ferrotune_nn::ops::divergence::{
    divergence_rows, DistillLossError, JsdConfig, Teacher, TeacherTopK,
};

fn wrap(e: DistillLossError) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// TRL's reduction of [`divergence_rows`]: the sum over scored rows divided by
/// `num_items_in_batch` when given, else by max(scored rows, 1) (`batchmean`). Scalar in the
/// student's dtype.
pub fn distill_loss(
    student: &Tensor,
    teacher: Teacher<'_>,
    mask: &Tensor,
    cfg: &JsdConfig,
    num_items_in_batch: Option<usize>,
) -> Result<Tensor> {
    let rows = divergence_rows(student, teacher, mask, cfg)?;
    let denom = match num_items_in_batch {
        Some(0) => return Err(wrap(DistillLossError::NumItems)),
        Some(n) => n,
        None => {
            let scored = mask.to_dtype(DType::F64)?.ne(0.0)?;
            let count = scored.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
            (count as usize).max(1)
        }
    };
    rows.sum_all()? / denom as f64
}

/// [`distill_loss`] with the full-vocabulary teacher: TRL's `generalized_jsd_loss`.
pub fn generalized_jsd_loss(
    student: &Tensor,
    teacher: &Tensor,
    mask: &Tensor,
    cfg: &JsdConfig,
    num_items_in_batch: Option<usize>,
) -> Result<Tensor> {
    distill_loss(
        student,
        Teacher::Full(teacher),
        mask,
        cfg,
        num_items_in_batch,
    )
}
