//! `y = x W^T (+ b) + s (drop(x) A^T) B^T` as one custom op: a frozen base linear with its
//! LoRA adapter, differentiable in x, A and B.
//!
//! Owns: the fused forward and the backward products. Does not own: the adapter's parameters
//! or when a slot uses this op (`crate::linear`).
//!
//! Why fused: composed from separate ops, every adapted slot adds a (rows, out) intermediate,
//! an elementwise add, and for backward candle's gradient accumulation (a zero-filled buffer and
//! one more add per input) — on a small model's CPU step that bookkeeping costs as much as the
//! adapter's products. Here the adapter accumulates straight into the base product's output.
//!
//! With xd = drop(x) (mask m, or x itself), xa = xd A^T (kept from forward, rows x r),
//! g the upstream gradient and gB = g B:
//!   dB = s g^T xa,   dA = s gB^T xd,   dx = g W + s (gB A) * m.
//! W and b are frozen (held by the op, not autograd inputs): no gradient is ever computed for
//! them.

use std::borrow::Cow;
use std::sync::OnceLock;

use candle_core::backend::BackendStorage as _;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};

use super::cpu::{f32_contig, f32_view, matmul, par_for, storage_from_f32, tensor_from_f32};
use super::cpu::{with_f32, Mat};
use super::linear::{frozen_product, out_shape};
use super::OpError;

const NAME: &str = "ferrotune-lora-linear";

pub(crate) struct LoraLinearOp {
    /// (N, K), frozen.
    pub w: Tensor,
    /// (N), frozen.
    pub bias: Option<Tensor>,
    pub scale: f32,
    /// (p, seed) of the inverted dropout on the adapter's input.
    pub dropout: Option<(f32, u64)>,
    /// (M, r): drop(x) A^T, set by forward for backward.
    pub xa: OnceLock<Vec<f32>>,
}

impl LoraLinearOp {
    /// The dropout multipliers for `n` elements of x, or None without dropout.
    fn mask(&self, n: usize) -> Option<Vec<f32>> {
        self.dropout
            .map(|(p, seed)| crate::linear::dropout_mask(n, p, seed))
    }
}

/// x with the dropout mask applied (borrowed when there is no mask).
fn dropped<'a>(x: &'a [f32], mask: Option<&[f32]>) -> Cow<'a, [f32]> {
    match mask {
        Some(mask) => Cow::Owned(x.iter().zip(mask).map(|(v, m)| v * m).collect()),
        None => Cow::Borrowed(x),
    }
}

impl LoraLinearOp {
    /// (m, k, n, r) from x's layout and the adapter's shapes, checked.
    fn dims(
        &self,
        xd: &[usize],
        ad: &[usize],
        bd: &[usize],
    ) -> Result<(usize, usize, usize, usize)> {
        let wd = self.w.dims();
        let k = xd.last().copied().unwrap_or(0);
        let (n, r) = (
            wd.first().copied().unwrap_or(0),
            ad.first().copied().unwrap_or(0),
        );
        let ok = !xd.is_empty()
            && wd == [n, k]
            && ad == [r, k]
            && bd == [n, r]
            && self.bias.as_ref().is_none_or(|b| b.dims() == [n]);
        if !ok {
            let msg = format!(
                "x {xd:?}, w {wd:?}, lora A {ad:?}, lora B {bd:?}; want (..., K), (N, K), (r, K), (N, r)"
            );
            return Err(OpError::shape(NAME, msg).into());
        }
        Ok((xd[..xd.len() - 1].iter().product(), k, n, r))
    }
}

/// Runs `f` on the f32 contents of a frozen CPU tensor held by the op.
fn with_frozen<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(cpu) => f(&f32_view(NAME, cpu, l)?),
        _ => Err(OpError::Device { op: NAME }.into()),
    }
}

impl CustomOp3 for LoraLinearOp {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        a_s: &CpuStorage,
        al: &Layout,
        b_s: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k, n, r) = self.dims(xl.dims(), al.dims(), bl.dims())?;
        let x = f32_view(NAME, xs, xl)?;
        let (a, b) = (f32_view(NAME, a_s, al)?, f32_view(NAME, b_s, bl)?);
        let mut y = with_frozen(&self.w, |w| match &self.bias {
            Some(bias) => with_frozen(bias, |bias| frozen_product(&x, w, Some(bias), (m, k, n))),
            None => frozen_product(&x, w, None, (m, k, n)),
        })?;
        let xd = dropped(&x, self.mask(x.len()).as_deref());
        let mut xa = vec![0f32; m * r];
        let (xm, at) = (Mat::new(&xd, m, k), Mat::new(&a, r, k).t());
        matmul(&mut xa, r, xm, at, 1.0, false, par_for(m, r, k))?;
        let (xam, bt) = (Mat::new(&xa, m, r), Mat::new(&b, n, r).t());
        matmul(&mut y, n, xam, bt, self.scale, true, par_for(m, n, r))?;
        let _ = self.xa.set(xa);
        Ok((storage_from_f32(NAME, y, xs.dtype())?, out_shape(xl, n)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (want_x, want_a, want_b) = (x.track_op(), a.track_op(), b.track_op());
        if !(want_x || want_a || want_b) {
            return Ok((None, None, None));
        }
        let (m, k, n, r) = self.dims(x.dims(), a.dims(), b.dims())?;
        let xa = self
            .xa
            .get()
            .ok_or_else(|| OpError::shape(NAME, "backward before forward (no saved x A^T)"))?;
        let s = self.scale;
        let (g32, a32, b32) = (f32_contig(g)?, f32_contig(a)?, f32_contig(b)?);
        let x32 = f32_contig(x)?;
        // Drawn once for both dA and dx.
        let mask = if want_a || want_x {
            self.mask(m * k)
        } else {
            None
        };
        with_f32(NAME, [&g32, &a32, &b32, &x32], |[g, a_f, bm, x_f]| {
            let gm = Mat::new(g, m, n);
            // gB = g B: (M, N) x (N, r)
            let mut gb = vec![0f32; m * r];
            if want_x || want_a {
                matmul(
                    &mut gb,
                    r,
                    gm,
                    Mat::new(bm, n, r),
                    1.0,
                    false,
                    par_for(m, n, r),
                )?;
            }
            let db = if want_b {
                // dB = s g^T xa: (N, M) x (M, r)
                let mut db = vec![0f32; n * r];
                let xam = Mat::new(xa, m, r);
                matmul(&mut db, r, gm.t(), xam, s, false, par_for(n, m, r))?;
                Some(tensor_from_f32(db, &[n, r], b.dtype(), b)?)
            } else {
                None
            };
            let da = if want_a {
                // dA = s gB^T xd: (r, M) x (M, K)
                let xd = dropped(x_f, mask.as_deref());
                let mut da = vec![0f32; r * k];
                let (gbt, xdm) = (Mat::new(&gb, m, r).t(), Mat::new(&xd, m, k));
                matmul(&mut da, k, gbt, xdm, s, false, par_for(r, m, k))?;
                Some(tensor_from_f32(da, &[r, k], a.dtype(), a)?)
            } else {
                None
            };
            let dx = if want_x {
                // dx = g W + s (gB A) * mask
                let mut dx = vec![0f32; m * k];
                with_frozen(&self.w, |w| {
                    matmul(
                        &mut dx,
                        k,
                        gm,
                        Mat::new(w, n, k),
                        1.0,
                        false,
                        par_for(m, n, k),
                    )
                })?;
                let (gbm, am) = (Mat::new(&gb, m, r), Mat::new(a_f, r, k));
                match &mask {
                    None => matmul(&mut dx, k, gbm, am, s, true, par_for(m, r, k))?,
                    Some(mask) => {
                        let mut t = vec![0f32; m * k];
                        matmul(&mut t, k, gbm, am, s, false, par_for(m, r, k))?;
                        for ((d, t), mk) in dx.iter_mut().zip(&t).zip(mask) {
                            *d += t * mk;
                        }
                    }
                }
                Some(tensor_from_f32(dx, x.dims(), x.dtype(), x)?)
            } else {
                None
            };
            Ok((dx, da, db))
        })
    }
}
