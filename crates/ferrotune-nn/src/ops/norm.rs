//! RMSNorm and LayerNorm over the last dim as custom ops with explicit backward.
//!
//! Owns: the per-row normalisation math and its gradients. Does not own: the norm layers'
//! parameters (`crate::norm`).
//!
//! Backward recomputes each row's statistics from x (one pass over H) rather than saving them:
//! a custom op yields one tensor, and the recompute is cheaper than a second output.

use candle_core::backend::BackendStorage as _;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{f32_contig, f32_view, storage_from_f32, tensor_from_f32, with_f32};
use super::OpError;

const RMS: &str = "ferrotune-rms-norm";
const LN: &str = "ferrotune-layer-norm";

/// Rows per rayon task: enough work per task to pay for the hand-off.
const ROWS_PER_TASK: usize = 16;

pub(crate) struct RmsNormOp {
    pub eps: f32,
}

pub(crate) struct LayerNormOp {
    pub eps: f32,
}

pub(super) fn hidden(op: &'static str, xl: &Layout, param_len: usize) -> Result<usize> {
    let h = *xl
        .dims()
        .last()
        .ok_or_else(|| OpError::shape(op, "x must have at least one dim"))?;
    if param_len != h {
        return Err(OpError::shape(
            op,
            format!("parameter has {param_len} elements, x's last dim is {h}"),
        )
        .into());
    }
    Ok(h)
}

/// 1 / sqrt(mean(x^2) + eps) of one row.
fn rms_inv(x: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

/// (mean, 1 / sqrt(var + eps)) of one row, biased variance as torch's LayerNorm.
fn mean_inv_std(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Sums per-row parameter-gradient contributions `f(x_row, g_row, acc)` over all rows into an
/// (H) vector: blocks of rows in parallel, then the block sums added in block order, so the
/// result is bit-identical from run to run (rayon's fold/reduce would group by work stealing).
fn param_grad(
    x: &[f32],
    g: &[f32],
    h: usize,
    f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    let partials: Vec<Vec<f32>> = x
        .par_chunks(h * ROWS_PER_TASK)
        .zip(g.par_chunks(h * ROWS_PER_TASK))
        .map(|(xs, gs)| {
            let mut acc = vec![0f32; h];
            for (xr, gr) in xs.chunks_exact(h).zip(gs.chunks_exact(h)) {
                f(xr, gr, &mut acc);
            }
            acc
        })
        .collect();
    let mut out = vec![0f32; h];
    for p in partials {
        out.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    out
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        RMS
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_view(RMS, xs, xl)?;
        let w = f32_view(RMS, ws, wl)?;
        let h = hidden(RMS, xl, w.len())?;
        let mut y = vec![0f32; x.len()];
        if h > 0 {
            y.par_chunks_mut(h)
                .zip(x.par_chunks(h))
                .for_each(|(yr, xr)| {
                    let r = rms_inv(xr, self.eps);
                    for ((y, x), w) in yr.iter_mut().zip(xr).zip(w.iter()) {
                        *y = x * r * w;
                    }
                });
        }
        Ok((storage_from_f32(RMS, y, xs.dtype())?, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (want_x, want_w) = (x.track_op(), w.track_op());
        if !want_x && !want_w || x.elem_count() == 0 {
            return Ok((None, None));
        }
        let (x32, w32, g32) = (f32_contig(x)?, f32_contig(w)?, f32_contig(g)?);
        let h = w.elem_count();
        let eps = self.eps;
        let (dx, dw) = with_f32(RMS, [&x32, &w32, &g32], |[xv, wv, gv]| {
            let dx = want_x.then(|| {
                let mut dx = vec![0f32; xv.len()];
                let rows = xv.par_chunks(h).zip(gv.par_chunks(h));
                dx.par_chunks_mut(h).zip(rows).for_each(|(dr, (xr, gr))| {
                    // dx = r (g w) - r^3 / H * x * sum(g w x)
                    let r = rms_inv(xr, eps);
                    let dot: f32 = xr.iter().zip(gr).zip(wv).map(|((x, g), w)| g * w * x).sum();
                    let c = r * r * r * dot / h as f32;
                    for (((d, x), g), w) in dr.iter_mut().zip(xr).zip(gr).zip(wv) {
                        *d = r * g * w - c * x;
                    }
                });
                dx
            });
            // dw = sum over rows of g x r
            let dw = want_w.then(|| {
                param_grad(xv, gv, h, |xr, gr, acc| {
                    let r = rms_inv(xr, eps);
                    for ((a, x), g) in acc.iter_mut().zip(xr).zip(gr) {
                        *a += g * x * r;
                    }
                })
            });
            Ok((dx, dw))
        })?;
        Ok((
            dx.map(|v| tensor_from_f32(v, x.dims(), x.dtype(), x))
                .transpose()?,
            dw.map(|v| tensor_from_f32(v, w.dims(), w.dtype(), w))
                .transpose()?,
        ))
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        LN
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_view(LN, xs, xl)?;
        let w = f32_view(LN, ws, wl)?;
        let b = f32_view(LN, bs, bl)?;
        let h = hidden(LN, xl, w.len())?;
        hidden(LN, xl, b.len())?;
        let mut y = vec![0f32; x.len()];
        if h > 0 {
            y.par_chunks_mut(h)
                .zip(x.par_chunks(h))
                .for_each(|(yr, xr)| {
                    let (mean, r) = mean_inv_std(xr, self.eps);
                    for (((y, x), w), b) in yr.iter_mut().zip(xr).zip(w.iter()).zip(b.iter()) {
                        *y = (x - mean) * r * w + b;
                    }
                });
        }
        Ok((storage_from_f32(LN, y, xs.dtype())?, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (want_x, want_w, want_b) = (x.track_op(), w.track_op(), b.track_op());
        if !(want_x || want_w || want_b) || x.elem_count() == 0 {
            return Ok((None, None, None));
        }
        let (x32, w32, g32) = (f32_contig(x)?, f32_contig(w)?, f32_contig(g)?);
        let h = w.elem_count();
        let eps = self.eps;
        let (dx, dw, db) = with_f32(LN, [&x32, &w32, &g32], |[xv, wv, gv]| {
            let dx = want_x.then(|| {
                let mut dx = vec![0f32; xv.len()];
                let rows = xv.par_chunks(h).zip(gv.par_chunks(h));
                dx.par_chunks_mut(h).zip(rows).for_each(|(dr, (xr, gr))| {
                    // dx = r (gw - mean(gw) - xhat mean(gw xhat))
                    let (mean, r) = mean_inv_std(xr, eps);
                    let (mut s1, mut s2) = (0f32, 0f32);
                    for ((x, g), w) in xr.iter().zip(gr).zip(wv) {
                        s1 += g * w;
                        s2 += g * w * (x - mean) * r;
                    }
                    let (s1, s2) = (s1 / h as f32, s2 / h as f32);
                    for (((d, x), g), w) in dr.iter_mut().zip(xr).zip(gr).zip(wv) {
                        *d = r * (g * w - s1 - (x - mean) * r * s2);
                    }
                });
                dx
            });
            // dw = sum over rows of g xhat; db = sum over rows of g
            let dw = want_w.then(|| {
                param_grad(xv, gv, h, |xr, gr, acc| {
                    let (mean, r) = mean_inv_std(xr, eps);
                    for ((a, x), g) in acc.iter_mut().zip(xr).zip(gr) {
                        *a += g * (x - mean) * r;
                    }
                })
            });
            let db = want_b.then(|| {
                param_grad(xv, gv, h, |_, gr, acc| {
                    acc.iter_mut().zip(gr).for_each(|(a, g)| *a += g)
                })
            });
            Ok((dx, dw, db))
        })?;
        Ok((
            dx.map(|v| tensor_from_f32(v, x.dims(), x.dtype(), x))
                .transpose()?,
            dw.map(|v| tensor_from_f32(v, w.dims(), w.dtype(), w))
                .transpose()?,
            db.map(|v| tensor_from_f32(v, b.dims(), b.dtype(), b))
                .transpose()?,
        ))
    }
}
