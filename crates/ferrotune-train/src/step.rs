//! Helpers every trainer's optimizer step uses between `loss.backward()` and `AdamW::step`:
//! gradient accumulation over micro-batches, global-norm clipping (torch's
//! `clip_grad_norm_`), non-finite detection, and a guard that skips a bad step but stops the
//! run after too many in a row.
//!
//! Owns: what happens to gradients of the named trainable parameters. Does not own: the loss
//! (the caller scales it, see [`GradAccumulator`]), the update itself ([`crate::optim`]), or
//! deciding the step count.
//!
//! Gradients are read only for the named parameters: a `GradStore` from `backward()` holds the
//! gradient of every `Var` the loss depends on, and a `Var` not passed as trainable (say, a
//! frozen weight someone loaded as a `Var`) is never summed, clipped or kept.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

/// What can go wrong in a step helper.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("clip_grad_norm: max_norm must be positive and finite, got {0}")]
    MaxNorm(f64),
    #[error("gradient of `{name}` has shape {grad:?} but the parameter has {param:?}")]
    GradShape {
        name: String,
        grad: Vec<usize>,
        param: Vec<usize>,
    },
    #[error("token-mean loss scale: the accumulated batch has no loss tokens")]
    NoLossTokens,
    #[error(
        "gradients were non-finite (NaN or inf) for {consecutive} optimizer steps in a row, \
         the last at step {step} (first bad parameter: `{param}`); the run is diverging: \
         lower the learning rate, enable gradient clipping, or check the data for empty or \
         extreme examples"
    )]
    NonFinite {
        step: usize,
        consecutive: usize,
        param: String,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Sum of squares of a gradient in f64 (no overflow: an f32 squared fits an f64), and whether
/// every element is finite. A CPU f32 gradient is read where it lies (no copy); others are
/// copied to host memory first.
fn sum_sq(grad: &Tensor) -> Result<(f64, bool), StepError> {
    if grad.device().is_cpu() && grad.dtype() == DType::F32 {
        let r = grad
            .contiguous()?
            .apply_op1_no_bwd(&SumSq)?
            .to_vec1::<f64>()?; // (2,)
        return Ok((r[0], r[1] != 0.0));
    }
    let v = grad.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(sum_sq_slice(&v))
}

/// Eight lanes summed in a fixed order: deterministic, and it lets the compiler vectorise what
/// one running sum would serialise.
fn sum_sq_slice(v: &[f32]) -> (f64, bool) {
    let mut lanes = [0.0f64; 8];
    let mut finite = true;
    let chunks = v.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += (x as f64) * (x as f64);
            finite &= x.is_finite();
        }
    }
    for (l, &x) in lanes.iter_mut().zip(tail) {
        *l += (x as f64) * (x as f64);
        finite &= x.is_finite();
    }
    (lanes.iter().sum(), finite)
}

/// [`sum_sq_slice`] as a read-only op on CPU storage, returning `[sum, finite as 0/1]` (f64).
struct SumSq;

impl candle_core::CustomOp1 for SumSq {
    fn name(&self) -> &'static str {
        "sum_sq"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let candle_core::CpuStorage::F32(data) = storage else {
            candle_core::bail!("sum_sq: expected f32 storage");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("sum_sq: expected a contiguous tensor");
        };
        let (sum, finite) = sum_sq_slice(&data[start..end]);
        let out = candle_core::CpuStorage::F64(vec![sum, if finite { 1.0 } else { 0.0 }]);
        Ok((out, candle_core::Shape::from(2)))
    }
}

/// The global L2 norm of the gradients of `params` without changing them (what
/// [`clip_grad_norm`] returns), for logging when clipping is off. NaN or inf when a gradient
/// is not finite.
pub fn grad_norm(grads: &GradStore, params: &[(String, Var)]) -> Result<f64, StepError> {
    let mut total_sq = 0.0f64;
    for (name, var) in params {
        if let Some(g) = grads.get(var.as_tensor()) {
            check_shape(name, g, var)?;
            total_sq += sum_sq(g)?.0;
        }
    }
    Ok(total_sq.sqrt())
}

/// Clips the gradients of `params` in `grads` in place so that their global L2 norm is at most
/// `max_norm`, and returns the norm before clipping — `torch.nn.utils.clip_grad_norm_`: the L2
/// norm over all gradients, `coef = max_norm / (norm + 1e-6)` clamped to at most 1, every
/// gradient multiplied by `coef` in f32 (not at all when `coef` is 1, which torch's multiply by
/// 1.0 leaves unchanged anyway).
///
/// Parameters without a gradient are skipped. If the norm is not finite the gradients are left
/// as they are (torch would turn them all to NaN) and the NaN or inf norm is returned, so
/// `!norm.is_finite()` doubles as the non-finite check for the step.
pub fn clip_grad_norm(
    grads: &mut GradStore,
    params: &[(String, Var)],
    max_norm: f64,
) -> Result<f64, StepError> {
    if !(max_norm > 0.0 && max_norm.is_finite()) {
        return Err(StepError::MaxNorm(max_norm));
    }
    // In f64 where torch works in f32: a huge but finite gradient (norm above f32::MAX) is
    // clipped rather than reported as non-finite. Agrees with torch to ~1e-7 relative.
    let total = grad_norm(grads, params)?;
    if !total.is_finite() {
        return Ok(total);
    }
    let coef = (max_norm / (total + 1e-6)).min(1.0) as f32;
    if coef < 1.0 {
        for (_, var) in params {
            if let Some(g) = grads.get(var.as_tensor()) {
                let clipped = (g * coef as f64)?;
                grads.insert(var.as_tensor(), clipped);
            }
        }
    }
    Ok(total)
}

/// The name of the first parameter (in `params` order) whose gradient holds a NaN or an
/// infinity, or `None` if all are finite.
pub fn first_non_finite(
    grads: &GradStore,
    params: &[(String, Var)],
) -> Result<Option<String>, StepError> {
    for (name, var) in params {
        if let Some(g) = grads.get(var.as_tensor()) {
            if !sum_sq(g)?.1 {
                return Ok(Some(name.clone()));
            }
        }
    }
    Ok(None)
}

/// True when every gradient of `params` in `grads` is finite.
pub fn all_finite(grads: &GradStore, params: &[(String, Var)]) -> Result<bool, StepError> {
    Ok(first_non_finite(grads, params)?.is_none())
}

fn check_shape(name: &str, grad: &Tensor, var: &Var) -> Result<(), StepError> {
    if grad.dims() != var.dims() {
        return Err(StepError::GradShape {
            name: name.to_string(),
            grad: grad.dims().to_vec(),
            param: var.dims().to_vec(),
        });
    }
    Ok(())
}

/// The factor to multiply each micro-batch's **summed** token loss by when the loss is a
/// token mean over the whole accumulated batch: `1 / total_loss_tokens`, where
/// `total_loss_tokens` counts the loss tokens of *all* micro-batches of the optimizer step.
pub fn token_mean_scale(total_loss_tokens: usize) -> Result<f64, StepError> {
    if total_loss_tokens == 0 {
        return Err(StepError::NoLossTokens);
    }
    Ok(1.0 / total_loss_tokens as f64)
}

/// Sums the gradients of the named parameters across the micro-batches of one optimizer step.
///
/// Scaling rule: for batch 1 × accumulation 8 to give the same gradient as batch 8 ×
/// accumulation 1 with a token-mean loss, each micro-batch's loss must be its **sum** of token
/// losses divided by the number of loss tokens in the **whole accumulated batch**
/// ([`token_mean_scale`]) — not the micro-batch's own token mean divided by the number of
/// micro-batches, which weights a short example's tokens more than a long one's. With that
/// scaling the accumulator only adds: `sum_k ∇(S_k / N) = ∇(sum_k S_k / N)`.
pub struct GradAccumulator {
    params: Vec<(String, Var)>,
    sums: Vec<Option<Tensor>>,
    micro_batches: usize,
}

impl GradAccumulator {
    /// An empty accumulator for `params` (the trainable parameters, as given to the optimizer).
    pub fn new(params: &[(String, Var)]) -> GradAccumulator {
        GradAccumulator {
            params: params.to_vec(),
            sums: vec![None; params.len()],
            micro_batches: 0,
        }
    }

    /// Adds one micro-batch's gradients (from `loss.backward()`); the store can be dropped
    /// afterwards, gradients of `Var`s not named at construction are not kept.
    pub fn add(&mut self, grads: &GradStore) -> Result<(), StepError> {
        for ((name, var), sum) in self.params.iter().zip(self.sums.iter_mut()) {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            check_shape(name, g, var)?;
            let g = g.detach();
            *sum = Some(match sum.take() {
                None => g,
                Some(acc) => acc.add(&g)?,
            });
        }
        self.micro_batches += 1;
        Ok(())
    }

    /// Micro-batches added since the last [`GradAccumulator::take`].
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// The summed gradients as a `GradStore` holding only the named parameters (ready for
    /// [`clip_grad_norm`] and `AdamW::step`), and a reset for the next optimizer step.
    pub fn take(&mut self) -> GradStore {
        let mut store = GradStore::default();
        for ((_, var), sum) in self.params.iter().zip(self.sums.iter_mut()) {
            if let Some(g) = sum.take() {
                store.insert(var.as_tensor(), g);
            }
        }
        self.micro_batches = 0;
        store
    }
}

/// Whether to apply an optimizer step or skip it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepAction {
    Apply,
    Skip,
}

/// Skips optimizer steps whose gradients are not finite (a single bad batch should not end a
/// run, as fp16 loss scaling also skips), but fails once `max_consecutive` steps in a row were
/// bad: then the run is diverging and every further step would be wasted. `max_consecutive =
/// 1` fails at the first non-finite step. Serialisable so the count survives a resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NonFiniteGuard {
    max_consecutive: usize,
    consecutive: usize,
    total_skipped: usize,
}

impl NonFiniteGuard {
    /// A guard that fails at the `max_consecutive`-th non-finite step in a row (0 is read as 1).
    pub fn new(max_consecutive: usize) -> NonFiniteGuard {
        NonFiniteGuard {
            max_consecutive: max_consecutive.max(1),
            consecutive: 0,
            total_skipped: 0,
        }
    }

    /// Records optimizer step `step`: `bad` is the first parameter with a non-finite gradient
    /// ([`first_non_finite`]), or `None` when all are finite. A finite step resets the count.
    pub fn observe(&mut self, step: usize, bad: Option<&str>) -> Result<StepAction, StepError> {
        let Some(param) = bad else {
            self.consecutive = 0;
            return Ok(StepAction::Apply);
        };
        self.consecutive += 1;
        if self.consecutive >= self.max_consecutive {
            return Err(StepError::NonFinite {
                step,
                consecutive: self.consecutive,
                param: param.to_string(),
            });
        }
        self.total_skipped += 1;
        Ok(StepAction::Skip)
    }

    /// Non-finite steps in a row so far.
    pub fn consecutive(&self) -> usize {
        self.consecutive
    }

    /// Steps skipped over the run.
    pub fn total_skipped(&self) -> usize {
        self.total_skipped
    }
}
