//! Fused `log_softmax(hidden W^T / temperature)[target]` over the vocabulary, processed in
//! chunks of rows so the (N, V) logits never exist, neither in forward nor for backward.
//!
//! Owns: the chunked LM-head product, log-sum-exp, gather, and their backward. Does not own:
//! which tokens are scored or how log-probs become a loss (the trainers).
//!
//! With p = softmax(z), z = hidden W^T / T and upstream g (N): dz = g (onehot(target) - p) / T,
//! d hidden = dz W, dW = dz^T hidden (only when W is tracked).
//!
//! Row i's log-prob depends on hidden row i alone, so d hidden_i = g_i J_i with
//! J_i = (onehot - p_i) W / T, an (N, H) matrix that does not depend on g. When hidden is
//! tracked, forward computes J while each chunk's logits are at hand and keeps it (N x H, the
//! size of hidden); backward is then one scaling, instead of recomputing the logits (the
//! LM-head products are the most expensive of a small model's step): forward + backward cost
//! two (rows, V, H) products, as PyTorch's with stored logits. Only a tracked W makes backward
//! recompute the logits, chunk by chunk, for dW.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{
    exp_f32, f32_contig, f32_view, matmul, max_of, par_for, storage_from_f32, sum_exp_shift,
    tensor_from_f32, with_f32, Mat,
};
use super::OpError;

const NAME: &str = "ferrotune-token-logprobs";

/// Logit elements per chunk (64 MiB of f32), but never fewer than [`MIN_CHUNK_ROWS`] rows.
const CHUNK_ELEMS: usize = 1 << 24;

/// gemm packs all of W (V x H) on every call, whatever the number of rows; below ~256 rows
/// that packing dominates (measured on SmolLM2's 49152 x 576 head: 32 rows per chunk ran 3x
/// slower than 256).
const MIN_CHUNK_ROWS: usize = 256;

pub(crate) struct TokenLogprobsOp {
    /// (N,), each < V (checked by the wrapper).
    pub targets: Vec<u32>,
    pub inv_temp: f32,
    /// Rows per chunk; 0 = choose from V.
    pub chunk_rows: usize,
    /// Whether forward also computes J (hidden is tracked).
    pub want_jacobian: bool,
    /// (N, H): row i = d logp_i / d hidden_i, set by forward when `want_jacobian`.
    pub jacobian: OnceLock<Vec<f32>>,
}

/// Turns a row of logits into c (onehot(t) - softmax), in place, given its log-sum-exp.
fn row_grad(zr: &mut [f32], t: u32, lse: f32, c: f32) {
    zr.iter_mut().for_each(|x| *x = -c * exp_f32(*x - lse));
    zr[t as usize] += c;
}

impl TokenLogprobsOp {
    fn dims(&self, hl: &[usize], wl: &[usize]) -> Result<(usize, usize, usize, usize)> {
        let ok = hl.len() == 2 && wl.len() == 2 && hl[1] == wl[1] && hl[0] == self.targets.len();
        if !ok {
            let msg = format!(
                "hidden {hl:?}, w {wl:?}, {} targets; want (N, H), (V, H), N",
                self.targets.len()
            );
            return Err(OpError::shape(NAME, msg).into());
        }
        let (n, h, v) = (hl[0], hl[1], wl[0]);
        let chunk = if self.chunk_rows > 0 {
            self.chunk_rows
        } else {
            (CHUNK_ELEMS / v.max(1)).max(MIN_CHUNK_ROWS)
        };
        Ok((n, h, v, chunk.min(n).max(1)))
    }

    /// z = hidden_rows W^T / T into `z` (rows, V); hidden_rows: (rows, H).
    fn logits(
        &self,
        z: &mut [f32],
        hidden_rows: &[f32],
        w: &[f32],
        h: usize,
        v: usize,
    ) -> Result<()> {
        let rows = hidden_rows.len() / h.max(1);
        let (hb, wt) = (Mat::new(hidden_rows, rows, h), Mat::new(w, v, h).t());
        matmul(z, v, hb, wt, self.inv_temp, false, par_for(rows, v, h))
    }
}

/// (max, log-sum-exp) of one row of logits.
fn lse(row: &[f32]) -> f32 {
    let max = max_of(row);
    max + sum_exp_shift(row, max).ln()
}

impl CustomOp2 for TokenLogprobsOp {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        hs: &CpuStorage,
        hl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, h, v, chunk) = self.dims(hl.dims(), wl.dims())?;
        let (hid, w) = (f32_view(NAME, hs, hl)?, f32_view(NAME, ws, wl)?);
        let mut out = vec![0f32; n];
        let mut jac = vec![0f32; if self.want_jacobian { n * h } else { 0 }];
        let mut z = vec![0f32; chunk * v];
        for r0 in (0..n).step_by(chunk) {
            let rows = chunk.min(n - r0);
            let z = &mut z[..rows * v];
            self.logits(z, &hid[r0 * h..(r0 + rows) * h], &w, h, v)?;
            let tg = &self.targets[r0..r0 + rows];
            out[r0..r0 + rows]
                .par_iter_mut()
                .zip(z.par_chunks_mut(v))
                .zip(tg.par_iter())
                .for_each(|((o, zr), &t)| {
                    let l = lse(zr);
                    *o = zr[t as usize] - l;
                    if self.want_jacobian {
                        row_grad(zr, t, l, self.inv_temp);
                    }
                });
            if self.want_jacobian {
                // J = dz W for g = 1: (rows, V) x (V, H)
                let jb = &mut jac[r0 * h..(r0 + rows) * h];
                let dz = Mat::new(z, rows, v);
                matmul(
                    jb,
                    h,
                    dz,
                    Mat::new(&w, v, h),
                    1.0,
                    false,
                    par_for(rows, v, h),
                )?;
            }
        }
        if self.want_jacobian {
            // A second forward through the same op object cannot happen; ignore the error.
            let _ = self.jacobian.set(jac);
        }
        Ok((
            storage_from_f32(NAME, out, candle_core::DType::F32)?,
            Shape::from(n),
        ))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (want_h, want_w) = (hidden.track_op(), w.track_op());
        if !want_h && !want_w {
            return Ok((None, None));
        }
        let (n, h, v, chunk) = self.dims(hidden.dims(), w.dims())?;
        let g32 = f32_contig(g)?;
        let dh = match (want_h, self.jacobian.get()) {
            (false, _) => None,
            (true, Some(jac)) => {
                let mut dh = vec![0f32; n * h];
                with_f32(NAME, [&g32], |[gv]| {
                    // d hidden_i = g_i J_i
                    let rows = dh
                        .par_chunks_mut(h)
                        .zip(jac.par_chunks(h))
                        .zip(gv.par_iter());
                    rows.for_each(|((d, j), &gi)| {
                        d.iter_mut().zip(j).for_each(|(d, j)| *d = gi * j)
                    });
                    Ok(())
                })?;
                Some(tensor_from_f32(dh, hidden.dims(), hidden.dtype(), hidden)?)
            }
            // Forward computes J whenever hidden is tracked (the wrapper decides both).
            (true, None) => {
                return Err(OpError::shape(NAME, "hidden became tracked after forward").into())
            }
        };
        let dw = if want_w {
            let (h32, w32) = (f32_contig(hidden)?, f32_contig(w)?);
            let mut dw = vec![0f32; v * h];
            with_f32(NAME, [&h32, &w32, &g32], |[hid, wv, gv]| {
                let mut z = vec![0f32; chunk * v];
                for r0 in (0..n).step_by(chunk) {
                    let rows = chunk.min(n - r0);
                    let z = &mut z[..rows * v];
                    self.logits(z, &hid[r0 * h..(r0 + rows) * h], wv, h, v)?;
                    let tg = &self.targets[r0..r0 + rows];
                    // z -> dz = g (onehot - softmax(z)) / T, row by row
                    let gs = &gv[r0..r0 + rows];
                    z.par_chunks_mut(v)
                        .zip(tg.par_iter())
                        .zip(gs.par_iter())
                        .for_each(|((zr, &t), &gi)| {
                            let l = lse(zr);
                            row_grad(zr, t, l, gi * self.inv_temp);
                        });
                    // dW += dz^T hidden: (V, rows) x (rows, H)
                    let dz = Mat::new(z, rows, v);
                    let hb = Mat::new(&hid[r0 * h..(r0 + rows) * h], rows, h);
                    matmul(&mut dw, h, dz.t(), hb, 1.0, true, par_for(rows, v, h))?;
                }
                Ok(())
            })?;
            Some(tensor_from_f32(dw, w.dims(), w.dtype(), w)?)
        } else {
            None
        };
        Ok((dh, dw))
    }
}
