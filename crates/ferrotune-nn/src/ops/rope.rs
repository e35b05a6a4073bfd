//! Rotary position embedding (Hugging Face "rotate_half" pairing) as a custom op.
//!
//! Owns: applying a rotation given cos/sin, and its backward. Does not own: the frequencies
//! or position ids (`crate::rope`).
//!
//! The op is a rotation of each (x[j], x[j + D/2]) pair, so its backward is the same rotation
//! by the negative angle (sin -> -sin). cos and sin are constants: they never get a gradient.

use candle_core::backend::BackendStorage as _;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{f32_contig, f32_view, storage_from_f32, tensor_from_f32, with_f32};
use super::OpError;

const NAME: &str = "ferrotune-rope";

pub(crate) struct RopeOp;

/// (B, H, T, D) of x and the batch size of cos/sin (B or 1, which broadcasts).
fn dims(xl: &[usize], cl: &[usize], sl: &[usize]) -> Result<(usize, usize, usize, usize, usize)> {
    let [b, h, t, d] = *xl else {
        return Err(OpError::shape(NAME, format!("x must be (B, H, T, D), got {xl:?}")).into());
    };
    let ok =
        cl.len() == 3 && cl == sl && (cl[0] == b || cl[0] == 1) && cl[1] == t && cl[2] * 2 == d;
    if !ok {
        return Err(OpError::shape(
            NAME,
            format!("cos {cl:?} / sin {sl:?} do not fit x {xl:?}; want (B, T, D/2)"),
        )
        .into());
    }
    Ok((b, h, t, d, cl[0]))
}

/// Rotates every pair of `x` (B, H, T, D) by (cos, sign * sin) (CB, T, D/2).
fn rotate(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    dims: (usize, usize, usize, usize, usize),
    sign: f32,
) -> Vec<f32> {
    let (_b, h, t, d, cb) = dims;
    let half = d / 2;
    let mut y = vec![0f32; x.len()];
    if d == 0 {
        return y;
    }
    // One task per (batch, head): (T, D) each.
    y.par_chunks_mut(t * d)
        .zip(x.par_chunks(t * d))
        .enumerate()
        .for_each(|(bh, (yh, xh))| {
            let bi = if cb == 1 { 0 } else { bh / h };
            for ti in 0..t {
                let cs = &cos[(bi * t + ti) * half..][..half];
                let sn = &sin[(bi * t + ti) * half..][..half];
                let (x1, x2) = xh[ti * d..(ti + 1) * d].split_at(half);
                let (y1, y2) = yh[ti * d..(ti + 1) * d].split_at_mut(half);
                for j in 0..half {
                    let (c, s) = (cs[j], sign * sn[j]);
                    y1[j] = x1[j] * c - x2[j] * s;
                    y2[j] = x2[j] * c + x1[j] * s;
                }
            }
        });
    y
}

impl CustomOp3 for RopeOp {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = dims(xl.dims(), cl.dims(), sl.dims())?;
        let x = f32_view(NAME, xs, xl)?;
        let cos = f32_view(NAME, cs, cl)?;
        let sin = f32_view(NAME, ss, sl)?;
        let y = rotate(&x, &cos, &sin, dims, 1.0);
        Ok((storage_from_f32(NAME, y, xs.dtype())?, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !x.track_op() {
            return Ok((None, None, None));
        }
        let dims = dims(x.dims(), cos.dims(), sin.dims())?;
        let (g32, c32, s32) = (f32_contig(g)?, f32_contig(cos)?, f32_contig(sin)?);
        let dx = with_f32(NAME, [&g32, &c32, &s32], |[g, c, s]| {
            Ok(rotate(g, c, s, dims, -1.0))
        })?;
        Ok((
            Some(tensor_from_f32(dx, x.dims(), x.dtype(), x)?),
            None,
            None,
        ))
    }
}
