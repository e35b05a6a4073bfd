//! Reference composites of stock candle ops for every op in [`super`]: the original, obviously
//! correct formulations, kept so tests can compare the custom ops against them.
//!
//! Owns: nothing used on the hot path. Does not own: gradients (stock candle backward, which
//! computes a gradient for every input, frozen or not).

use candle_core::{DType, Result, Tensor, D};

/// `y = x W^T (+ b)`. x: (..., in), w: (out, in), b: (out). Returns (..., out).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.broadcast_matmul(&w.t()?)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// RMSNorm: `x / sqrt(mean(x^2) + eps) * w`. x: (..., H), w: (H).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xf.broadcast_div(&(ms + eps)?.sqrt()?)?;
    y.to_dtype(dt)?.broadcast_mul(w)
}

/// LayerNorm: `(x - mean) / sqrt(var + eps) * w + b`. x: (..., H), w, b: (H).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let xc = xf.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    y.to_dtype(dt)?.broadcast_mul(w)?.broadcast_add(b)
}

/// Rotary embedding, Hugging Face "rotate_half" convention (first half / second half of the
/// head dim are the pairs). x: (B, H, T, D); cos, sin: (B, T, D/2).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_b, _h, _t, d) = x.dims4()?;
    let half = d / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let cos = cos.unsqueeze(1)?.to_dtype(x.dtype())?; // (B, 1, T, D/2)
    let sin = sin.unsqueeze(1)?.to_dtype(x.dtype())?;
    let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[r1, r2], D::Minus1)
}

/// Causal grouped-query attention with an optional key padding mask.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let mask = super::AttnMask {
        key_mask,
        ..Default::default()
    };
    attention_masked(q, k, v, &mask, scale)
}

/// Causal grouped-query attention as stock ops over the full (B, Hq, Tq, Tk) scores; same
/// contract as `super::attention_masked`. A query with no visible key gets a zero output.
pub fn attention_masked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &super::AttnMask<'_>,
    scale: f64,
) -> Result<Tensor> {
    let (b, hq, tq, d) = q.dims4()?;
    let (_, hkv, tk, _) = k.dims4()?;
    let groups = hq / hkv;
    let dt = q.dtype();
    let q = q.to_dtype(DType::F32)?;
    // (B, Hkv, Tk, D) -> (B, Hq, Tk, D)
    let expand = |t: &Tensor| -> Result<Tensor> {
        t.to_dtype(DType::F32)?
            .unsqueeze(2)?
            .expand((b, hkv, groups, tk, d))?
            .reshape((b, hq, tk, d))
    };
    let k = expand(k)?;
    let v = expand(v)?;
    let scores = (q.matmul(&k.t()?)? * scale)?; // (B, Hq, Tq, Tk)
    let mut allowed = vec![0f32; b * tq * tk];
    let rows = |t: Option<&Tensor>| -> Result<Option<Vec<Vec<f32>>>> {
        t.map(|m| m.to_dtype(DType::F32)?.to_vec2::<f32>())
            .transpose()
    };
    let (km, seg) = (rows(mask.key_mask)?, rows(mask.segments)?);
    for bi in 0..b {
        for i in 0..tq {
            let pos = tk - tq + i;
            for j in 0..=pos {
                let ok = km.as_ref().is_none_or(|m| m[bi][j] != 0.0)
                    && mask.window.is_none_or(|w| j + w > pos)
                    && seg.as_ref().is_none_or(|s| s[bi][j] == s[bi][pos]);
                if ok {
                    allowed[(bi * tq + i) * tk + j] = 1.0;
                }
            }
        }
    }
    let allowed = Tensor::from_vec(allowed, (b, 1, tq, tk), q.device())?;
    let neg = ((1.0 - &allowed)? * -1e30)?;
    let scores = scores.broadcast_add(&neg)?;
    let max = scores.max_keepdim(D::Minus1)?;
    let e = scores.broadcast_sub(&max)?.exp()?.broadcast_mul(&allowed)?;
    let denom = (e.sum_keepdim(D::Minus1)? + 1e-30)?;
    let p = e.broadcast_div(&denom)?;
    p.matmul(&v)?.to_dtype(dt)
}

/// `silu(gate) * up`, elementwise; same shapes.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let g = gate.to_dtype(DType::F32)?;
    let silu =
        (&g * candle_core::Tensor::ones_like(&g)?.broadcast_div(&(g.neg()?.exp()? + 1.0)?)?)?;
    (silu.to_dtype(gate.dtype())? * up)?.contiguous()
}

/// GELU, tanh approximation (GPT-2's `gelu_new`).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    x.gelu()
}

/// Log-probability of `targets` under `softmax(hidden W^T / temperature)`, computed over the
/// vocabulary in chunks so the (N, V) logits never exist for backward.
///
/// hidden: (N, H); w: (V, H); targets: (N,) u32. Returns (N,) f32.
pub fn token_logprobs(
    hidden: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    temperature: f64,
) -> Result<Tensor> {
    let logits = (linear(hidden, w, None)?.to_dtype(DType::F32)? / temperature)?;
    let max = logits.max_keepdim(D::Minus1)?;
    let lse = (logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + &max)?;
    let logp = logits.broadcast_sub(&lse)?;
    logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)
}
