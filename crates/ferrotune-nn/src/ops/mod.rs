//! Differentiable ops of the hot path, each a candle custom op with an explicit backward.
//!
//! Owns: the math of linear, RMSNorm/LayerNorm, RoPE, causal GQA attention, SwiGLU, the
//! chunked vocabulary log-prob and the distillation divergence ([`divergence`]), forward and
//! backward. Does not own: parameters, layer
//! structure or model families.
//!
//! Contract shared by every op here: a gradient is computed for an argument only when that
//! argument is tracked by autograd (`Tensor::track_op()`), so a frozen weight never gets one
//! (candle's stock matmul backward would compute it, which makes LoRA cost a full fine-tune).
//! Internally every op computes in f32 and returns the input dtype (f32, bf16, f16 or f64).
//! Every wrapper below dispatches on the device: CPU tensors go to the ops in this folder's CPU
//! files (the reference), CUDA tensors (with the `cuda` feature) to [`cuda`]'s kernels.
//!
//! Why custom ops: candle-nn's fast rms_norm/softmax/rope have no backward, and composites of
//! stock ops keep every intermediate alive for backward (attention would keep (B, H, T, T)).
//! The wrappers below make inputs contiguous, so the kernels read plain row-major slices.
//! [`reference`] keeps the stock-op composites the tests compare against.

mod attention;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
pub mod divergence;
mod linear;
mod logprobs;
mod lora_linear;
mod norm;
pub mod reference;
mod rope;
mod swiglu;

use candle_core::{DType, Result, Tensor};

/// What can go wrong inside an op, with the op's name for context.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },
    #[error("{op}: input is not contiguous (the public wrappers make it so)")]
    NotContiguous { op: &'static str },
    #[error("{op}: unsupported dtype {dtype:?} (want f32, bf16, f16 or f64)")]
    DType { op: &'static str, dtype: DType },
    #[error("{op}: backward runs on CPU tensors only for now")]
    Device { op: &'static str },
    #[error("gemm: operands do not fit an (m={m}, k={k}) x (k={k}, n={n}) product")]
    Gemm { m: usize, n: usize, k: usize },
    #[error("token_logprobs: target id {id} at row {row} is outside the vocabulary of {vocab}")]
    Target { row: usize, id: u32, vocab: usize },
    #[error("token_logprobs: temperature must be positive and finite, got {0}")]
    Temperature(f64),
}

impl OpError {
    fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        OpError::Shape {
            op,
            msg: msg.into(),
        }
    }
}

impl From<OpError> for candle_core::Error {
    fn from(e: OpError) -> Self {
        candle_core::Error::wrap(e)
    }
}

/// `y = x W^T (+ b)`. x: (..., in), w: (out, in), b: (out). Returns (..., out).
///
/// Backward: dx = g W when x is tracked; dW = g^T x only when W is tracked; db = sum(g) only
/// when b is tracked.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        let y = x.apply_op2(&w, cuda::Linear)?;
        return match b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
    }
    match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, linear::LinearOp),
        None => x.apply_op2(&w, linear::LinearOp),
    }
}

/// The adapter half of [`lora_linear`]: A (r, in), B (out, r), the scale and the optional
/// (p, seed) of the inverted dropout on the adapter's input.
pub struct LoraParts<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scale: f64,
    pub dropout: Option<(f32, u64)>,
}

/// `y = x W^T (+ b) + scale * (drop(x) A^T) B^T` in one op (CPU), W and b frozen.
///
/// Backward: dx, dA, dB, each only when tracked; W and b must not be tracked (use [`linear`]
/// and separate ops to train them).
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    lora: &LoraParts<'_>,
) -> Result<Tensor> {
    const OP: &str = "ferrotune-lora-linear";
    if !x.device().is_cpu() {
        return Err(OpError::Device { op: OP }.into());
    }
    if w.track_op() || b.is_some_and(|b| b.track_op()) {
        let msg = "the base weight and bias must be frozen (not tracked)";
        return Err(OpError::shape(OP, msg).into());
    }
    let op = lora_linear::LoraLinearOp {
        w: w.contiguous()?,
        bias: b.map(|b| b.contiguous()).transpose()?,
        scale: lora.scale as f32,
        dropout: lora.dropout,
        xa: Default::default(),
    };
    x.contiguous()?
        .apply_op3(&lora.a.contiguous()?, &lora.b.contiguous()?, op)
}

/// RMSNorm: `x / sqrt(mean(x^2) + eps) * w`. x: (..., H), w: (H).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        let op = cuda::RmsNorm { eps: eps as f32 };
        let w = w.to_dtype(x.dtype())?.contiguous()?;
        return x.contiguous()?.apply_op2(&w, op);
    }
    let op = norm::RmsNormOp { eps: eps as f32 };
    x.contiguous()?.apply_op2(&w.contiguous()?, op)
}

/// LayerNorm: `(x - mean) / sqrt(var + eps) * w + b`. x: (..., H), w, b: (H).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        let op = cuda::LayerNorm { eps: eps as f32 };
        let (w, b) = (
            w.to_dtype(x.dtype())?.contiguous()?,
            b.to_dtype(x.dtype())?.contiguous()?,
        );
        return x.contiguous()?.apply_op3(&w, &b, op);
    }
    let op = norm::LayerNormOp { eps: eps as f32 };
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, op)
}

/// Rotary embedding, Hugging Face "rotate_half" convention (first half / second half of the
/// head dim are the pairs). x: (B, H, T, D); cos, sin: (B, T, D/2) (a batch of 1 broadcasts).
/// cos and sin never get a gradient.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        let f32c = |t: &Tensor| t.detach().to_dtype(DType::F32)?.contiguous();
        return x
            .contiguous()?
            .apply_op3(&f32c(cos)?, &f32c(sin)?, cuda::Rope);
    }
    x.contiguous()?
        .apply_op3(&cos.contiguous()?, &sin.contiguous()?, rope::RopeOp)
}

/// Which keys a query may see beyond causality: padding, a sliding window, packed segments.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttnMask<'a> {
    /// (B, Tk), 1 = real key, 0 = padding (any dtype).
    pub key_mask: Option<&'a Tensor>,
    /// Sliding window (>= 1): a query at key position p sees keys j with p - window < j <= p
    /// (transformers' `sliding_window`, counted in cache slots).
    pub window: Option<usize>,
    /// (B, Tk) segment ids (any integer-valued dtype): a query sees only keys of its own
    /// segment, so sequences packed into one row cannot attend to each other.
    pub segments: Option<&'a Tensor>,
}

/// Causal grouped-query attention with an optional key padding mask; see [`attention_masked`].
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let mask = AttnMask {
        key_mask,
        ..AttnMask::default()
    };
    attention_masked(q, k, v, &mask, scale)
}

/// Causal grouped-query attention.
///
/// q: (B, Hq, Tq, D); k, v: (B, Hkv, Tk, D) with Hq % Hkv == 0. Query i sits at key position
/// `Tk - Tq + i` (the KV-cache convention) and attends to keys at positions <= its own that
/// `mask` leaves visible. A query with no visible key (a left-pad position) gets a zero output
/// and passes no gradient. Returns (B, Hq, Tq, D). Nothing of size (B, H, Tq, Tk) is kept for
/// backward.
pub fn attention_masked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask<'_>,
    scale: f64,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        return cuda::attention(q, k, v, mask, scale);
    }
    let key_mask = match mask.key_mask {
        Some(m) => {
            let m = m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            Some(m.into_iter().map(|x| x != 0.0).collect())
        }
        None => None,
    };
    let segments = match mask.segments {
        Some(s) => Some(s.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?),
        None => None,
    };
    let op = attention::AttentionOp {
        scale: scale as f32,
        key_mask,
        window: mask.window,
        segments,
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// `silu(gate) * up`, elementwise; same shapes.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if gate.device().is_cuda() {
        return gate
            .contiguous()?
            .apply_op2(&up.contiguous()?, cuda::Swiglu);
    }
    gate.contiguous()?
        .apply_op2(&up.contiguous()?, swiglu::SwigluOp)
}

/// GELU, tanh approximation (GPT-2's `gelu_new`). Candle's stock op: its backward is exact
/// (checked against torch in the tests), so no custom op is needed.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    x.gelu()
}

fn check_temperature(temperature: f64) -> Result<()> {
    if temperature > 0.0 && temperature.is_finite() {
        Ok(())
    } else {
        Err(OpError::Temperature(temperature).into())
    }
}

/// Log-probability of `targets` under `softmax(hidden W^T / temperature)`, computed over the
/// vocabulary in chunks of rows so the (N, V) logits never exist, in forward or for backward.
///
/// hidden: (N, H); w: (V, H); targets: (N,) u32 (any integer dtype). Returns (N,) f32.
///
/// When `hidden` is tracked, forward also computes d logp / d hidden (one more LM-head
/// product, which makes backward nearly free): pass `hidden.detach()` when no backward will
/// follow (evaluation with adapters on) to skip it.
pub fn token_logprobs(
    hidden: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    temperature: f64,
) -> Result<Tensor> {
    token_logprobs_chunked(hidden, w, targets, temperature, 0)
}

/// [`token_logprobs`] with an explicit number of rows per chunk (0 = choose from V); exposed
/// so tests can force several chunks on tiny inputs.
pub fn token_logprobs_chunked(
    hidden: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    temperature: f64,
    chunk_rows: usize,
) -> Result<Tensor> {
    check_temperature(temperature)?;
    let targets = targets
        .to_dtype(DType::U32)?
        .flatten_all()?
        .to_vec1::<u32>()?;
    let vocab = w.dim(0)?;
    if let Some((row, &id)) = targets
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= vocab)
    {
        return Err(OpError::Target { row, id, vocab }.into());
    }
    #[cfg(feature = "cuda")]
    if hidden.device().is_cuda() {
        let inv = (1.0 / temperature) as f32;
        return cuda::token_logprobs(hidden, w, &targets, inv, chunk_rows);
    }
    let op = logprobs::TokenLogprobsOp {
        targets,
        inv_temp: (1.0 / temperature) as f32,
        chunk_rows,
        want_jacobian: hidden.track_op(),
        jacobian: Default::default(),
    };
    hidden.contiguous()?.apply_op2(&w.contiguous()?, op)
}

/// Entropy (nats) of `softmax(hidden W^T / temperature)` per row, computed over the vocabulary
/// in chunks of rows so no more than about 4M logits exist at once, and never kept: no gradient
/// (the entropy only selects tokens, TRL's `top_entropy_quantile`).
///
/// hidden: (N, H); w: (V, H). Returns (N,) f32. Any device (plain tensor ops).
pub fn token_entropy(hidden: &Tensor, w: &Tensor, temperature: f64) -> Result<Tensor> {
    token_entropy_chunked(hidden, w, temperature, 0)
}

/// [`token_entropy`] with an explicit number of rows per chunk (0 = choose from V).
pub fn token_entropy_chunked(
    hidden: &Tensor,
    w: &Tensor,
    temperature: f64,
    chunk_rows: usize,
) -> Result<Tensor> {
    check_temperature(temperature)?;
    let (hidden, w) = (hidden.detach(), w.detach());
    let n = hidden.dim(0)?;
    let vocab = w.dim(0)?.max(1);
    let chunk = if chunk_rows > 0 {
        chunk_rows
    } else {
        ((4usize << 20) / vocab).max(1)
    };
    let mut parts = Vec::with_capacity(n.div_ceil(chunk));
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let logits = (linear(&hidden.narrow(0, start, len)?, &w, None)?.to_dtype(DType::F32)?
            / temperature)?; // (c, V)
                             // H = log Σe^z − Σ e^z z / Σ e^z, with z = logits − max (stable).
        let z = logits.broadcast_sub(&logits.max_keepdim(1)?)?;
        let e = z.exp()?;
        let s = e.sum_keepdim(1)?;
        let ez = (&e * &z)?.sum_keepdim(1)?;
        parts.push((s.log()? - (ez / s)?)?.squeeze(1)?);
    }
    if parts.is_empty() {
        return Tensor::zeros(0, DType::F32, hidden.device());
    }
    Tensor::cat(&parts, 0)
}

/// Draws one token per row of `logits` (B, V) on the GPU: inverse-CDF sampling in vocabulary
/// order with the caller's uniforms `u` (B,) at `temperature`, or the first maximum at
/// temperature 0 — the CPU sampler's rule when neither top-k nor top-p truncates. Returns the
/// ids and their log-probs (under the tempered softmax), or `None` when `logits` is not on a
/// CUDA device (the caller samples on the host).
pub fn sample_rows_on_device(
    logits: &Tensor,
    u: &[f32],
    temperature: f64,
) -> Result<Option<(Vec<u32>, Vec<f32>)>> {
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        let inv = if temperature > 0.0 {
            (1.0 / temperature) as f32
        } else {
            0.0
        };
        return cuda::sample_rows(logits, u, inv).map(Some);
    }
    let _ = (logits, u, temperature);
    Ok(None)
}

/// The scalars of one AdamW update, rounded to f32 where torch rounds them (computed by the
/// optimizer in `ferrotune-train`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamwScalars {
    /// `1 - lr * weight_decay`, or none without weight decay.
    pub decay: Option<f32>,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub bias_correction2_sqrt: f32,
    pub eps: f32,
    pub neg_step_size: f32,
}

/// One AdamW update of an f32 parameter and its moments, in place, on the GPU (one fused
/// kernel, the CPU optimizer's order of operations). Returns `false` without touching anything
/// when the parameter is not on a CUDA device (the caller updates on the host).
pub fn adamw_step_on_device(
    param: &Tensor,
    grad: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    s: &AdamwScalars,
) -> Result<bool> {
    #[cfg(feature = "cuda")]
    if param.device().is_cuda() {
        cuda::adamw_step(param, grad, exp_avg, exp_avg_sq, s)?;
        return Ok(true);
    }
    let _ = (param, grad, exp_avg, exp_avg_sq, s);
    Ok(false)
}
