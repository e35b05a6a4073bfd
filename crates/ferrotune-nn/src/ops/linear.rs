//! `y = x W^T (+ b)` as a custom op whose backward skips the gradient of a frozen weight.
//!
//! Owns: the forward gemm and the three backward products. Does not own: LoRA composition
//! (`crate::linear`) or parameter storage.
//!
//! Why not candle's matmul: its backward always computes `dW = g^T x`, which for a frozen base
//! weight is a full fine-tune's worth of work thrown away.

use candle_core::backend::BackendStorage as _;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::cpu::{
    f32_contig, f32_view, matmul, par_for, storage_from_f32, tensor_from_f32, with_f32, Mat,
};
use super::OpError;

const NAME: &str = "ferrotune-linear";

pub(crate) struct LinearOp;

/// Rows of x (every leading dim flattened), in features, out features.
fn dims(x: &Layout, w: &Layout) -> Result<(usize, usize, usize)> {
    let xd = x.dims();
    let wd = w.dims();
    let k = *xd
        .last()
        .ok_or_else(|| OpError::shape(NAME, "x must have at least one dim"))?;
    if wd.len() != 2 || wd[1] != k {
        return Err(OpError::shape(
            NAME,
            format!("w {wd:?} does not match x {xd:?} (want (out, {k}))"),
        )
        .into());
    }
    Ok((xd[..xd.len() - 1].iter().product(), k, wd[0]))
}

pub(super) fn out_shape(x: &Layout, n: usize) -> Shape {
    let mut d = x.dims().to_vec();
    if let Some(last) = d.last_mut() {
        *last = n;
    }
    Shape::from(d)
}

fn forward(
    xs: &CpuStorage,
    xl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
    bias: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    let (m, k, n) = dims(xl, wl)?;
    let x = f32_view(NAME, xs, xl)?;
    let w = f32_view(NAME, ws, wl)?;
    let b = bias.map(|(bs, bl)| f32_view(NAME, bs, bl)).transpose()?;
    let y = frozen_product(&x, &w, b.as_deref(), (m, k, n))?;
    Ok((storage_from_f32(NAME, y, xs.dtype())?, out_shape(xl, n)))
}

/// `x W^T (+ b)` for row-major x (m, k), W (n, k) and b (n): the forward product shared by
/// this op and the fused LoRA op.
pub(super) fn frozen_product(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    (m, k, n): (usize, usize, usize),
) -> Result<Vec<f32>> {
    let mut y = vec![0f32; m * n];
    let accumulate = match bias {
        Some(b) => {
            if b.len() != n {
                return Err(OpError::shape(
                    NAME,
                    format!("bias has {} elements, want {n}", b.len()),
                )
                .into());
            }
            // Start from the bias rows and let gemm accumulate: the add costs nothing extra.
            for row in y.chunks_exact_mut(n.max(1)) {
                row.copy_from_slice(b);
            }
            true
        }
        None => false,
    };
    if m <= FEW_ROWS && x.len() == m * k && w.len() == n * k {
        few_rows(&mut y, x, w, m, k, n);
    } else {
        // (M, K) x (K, N), W^T read through strides.
        matmul(
            &mut y,
            n,
            Mat::new(x, m, k),
            Mat::new(w, n, k).t(),
            1.0,
            accumulate,
            par_for(m, n, k),
        )?;
    }
    Ok(y)
}

/// Up to this many rows of x take [`few_rows`]: decoding (1 row per sequence) and speculative
/// verification (k + 1 rows).
const FEW_ROWS: usize = 8;

/// `y[i][j] += x[i] · w[j]` for a handful of rows: each weight row is read once from memory and
/// dotted with every (cached) row of x. With so few rows the product is bound by reading W;
/// gemm would first pack all of W into its own layout, reading and writing it once more.
/// Parallel over blocks of weight rows when there is enough work.
fn few_rows(y: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize, n: usize) {
    use rayon::prelude::*;
    // Weight rows per task: ~256 KB of W, so a task outlives its hand-off.
    let block = (65_536 / k.max(1)).clamp(1, n.max(1));
    let mut yt = vec![0f32; n * m]; // (N, M): each task writes its own contiguous block
    let work = |(b, out): (usize, &mut [f32])| {
        let j0 = b * block;
        for (dj, o) in out.chunks_exact_mut(m).enumerate() {
            let wr = &w[(j0 + dj) * k..(j0 + dj + 1) * k];
            for (i, oi) in o.iter_mut().enumerate() {
                *oi = dot(&x[i * k..(i + 1) * k], wr);
            }
        }
    };
    if rayon::current_num_threads() > 1 && m * n * k >= 1 << 20 {
        yt.par_chunks_mut(block * m).enumerate().for_each(work);
    } else {
        yt.chunks_mut(block * m).enumerate().for_each(work);
    }
    for (j, row) in yt.chunks_exact(m).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            y[i * n + j] += v;
        }
    }
}

/// Dot product in 8 independent partial sums, so the compiler keeps them in one SIMD register
/// (a single running sum is a serial dependency it may not reorder).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (pa, pb) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += pa[l] * pb[l];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(p, q)| p * q).sum();
    acc.iter().sum::<f32>() + tail
}

/// The gradients of x and W (each only when tracked).
fn backward(x: &Tensor, w: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let (want_x, want_w) = (x.track_op(), w.track_op());
    if !want_x && !want_w {
        return Ok((None, None));
    }
    let (n, k) = w.dims2()?;
    let m = x.dims()[..x.rank().saturating_sub(1)].iter().product();
    let g = f32_contig(g)?;
    let dx = if want_x {
        let w32 = f32_contig(w)?;
        let mut dx = vec![0f32; m * k];
        with_f32(NAME, [&g, &w32], |[g, w]| {
            // dx = g W: (M, N) x (N, K)
            let (gm, wm) = (Mat::new(g, m, n), Mat::new(w, n, k));
            matmul(&mut dx, k, gm, wm, 1.0, false, par_for(m, n, k))
        })?;
        Some(tensor_from_f32(dx, x.dims(), x.dtype(), x)?)
    } else {
        None
    };
    let dw = if want_w {
        let x32 = f32_contig(x)?;
        let mut dw = vec![0f32; n * k];
        with_f32(NAME, [&g, &x32], |[g, x]| {
            // dW = g^T x: (N, M) x (M, K)
            let (gt, xm) = (Mat::new(g, m, n).t(), Mat::new(x, m, k));
            matmul(&mut dw, k, gt, xm, 1.0, false, par_for(m, n, k))
        })?;
        Some(tensor_from_f32(dw, &[n, k], w.dtype(), w)?)
    } else {
        None
    };
    Ok((dx, dw))
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        forward(xs, xl, ws, wl, None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        backward(x, w, g)
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        NAME
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
        forward(xs, xl, ws, wl, Some((bs, bl)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = backward(x, w, g)?;
        let db = if b.track_op() {
            let n = b.elem_count();
            // db = sum of g over every leading dim: (M, N) -> (N)
            Some(
                g.to_dtype(candle_core::DType::F32)?
                    .reshape(((), n))?
                    .sum(0)?
                    .to_dtype(b.dtype())?,
            )
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}
