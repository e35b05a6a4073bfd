//! CPU plumbing shared by the custom ops: f32 views of candle storage, conversion of f32
//! results back to the caller's dtype, a bounds-checked wrapper around `gemm`, and a
//! vectorisable exp with the row reductions (max, sum of exp) built on it.
//!
//! Owns: data access, the matrix product and those numeric kernels. Does not own: any op's
//! math or its backward.
//!
//! Every op computes in f32; an f32 contiguous input is borrowed without a copy, other dtypes
//! (bf16, f16, f64) are converted once.

use std::borrow::Cow;

use candle_core::backend::BackendStorage as _;
use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};
use gemm::Parallelism;
use half::{bf16, f16};

use super::OpError;

/// f32 contents of a contiguous CPU storage, borrowed when already f32.
pub(crate) fn f32_view<'a>(
    op: &'static str,
    s: &'a CpuStorage,
    l: &Layout,
) -> Result<Cow<'a, [f32]>> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or(OpError::NotContiguous { op })?;
    Ok(match s {
        CpuStorage::F32(v) => Cow::Borrowed(&v[start..end]),
        CpuStorage::BF16(v) => Cow::Owned(v[start..end].iter().map(|x| x.to_f32()).collect()),
        CpuStorage::F16(v) => Cow::Owned(v[start..end].iter().map(|x| x.to_f32()).collect()),
        CpuStorage::F64(v) => Cow::Owned(v[start..end].iter().map(|&x| x as f32).collect()),
        other => {
            return Err(OpError::DType {
                op,
                dtype: other.dtype(),
            }
            .into())
        }
    })
}

/// Wraps an f32 result into a CPU storage of dtype `dt`.
pub(crate) fn storage_from_f32(op: &'static str, v: Vec<f32>, dt: DType) -> Result<CpuStorage> {
    Ok(match dt {
        DType::F32 => CpuStorage::F32(v),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(v.into_iter().map(f16::from_f32).collect()),
        DType::F64 => CpuStorage::F64(v.into_iter().map(f64::from).collect()),
        dtype => return Err(OpError::DType { op, dtype }.into()),
    })
}

/// A contiguous f32 copy-or-alias of `t` for use in a backward pass (a no-op when `t` is
/// already contiguous f32). Read it with [`with_f32`].
pub(crate) fn f32_contig(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F32)?.contiguous()
}

/// Runs `f` on the f32 contents of tensors made by [`f32_contig`] (CPU only), all borrowed
/// at once so a backward reads its inputs without nesting.
pub(crate) fn with_f32<const N: usize, R>(
    op: &'static str,
    ts: [&Tensor; N],
    f: impl FnOnce([&[f32]; N]) -> Result<R>,
) -> Result<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut views = Vec::with_capacity(N);
    for (s, l) in &guards {
        match &**s {
            Storage::Cpu(cpu) => views.push(f32_view(op, cpu, l)?),
            _ => return Err(OpError::Device { op }.into()),
        }
    }
    let slices: [&[f32]; N] = std::array::from_fn(|i| &*views[i]);
    f(slices)
}

/// Builds a tensor of dtype `dt` from an f32 result, on the device of `like`.
pub(crate) fn tensor_from_f32(
    v: Vec<f32>,
    shape: &[usize],
    dt: DType,
    like: &Tensor,
) -> Result<Tensor> {
    Tensor::from_vec(v, shape, like.device())?.to_dtype(dt)
}

/// A read-only matrix view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major (rows, cols) matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose, as a view (no copy).
    pub fn t(self) -> Self {
        Mat {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// How many threads a product of this many multiply-adds deserves: below ~1M flops the
/// rayon hand-off costs more than it saves.
pub(crate) fn par_for(m: usize, n: usize, k: usize) -> Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 && m * n * k >= 1 << 20 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// `dst = alpha * a b` (or `dst += alpha * a b` when `accumulate`), dst row-major with row
/// stride `dst_rs`. Panics are impossible: shapes and bounds are checked up front.
pub(crate) fn matmul(
    dst: &mut [f32],
    dst_rs: usize,
    a: Mat<'_>,
    b: Mat<'_>,
    alpha: f32,
    accumulate: bool,
    par: Parallelism,
) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let dst_fits = m == 0 || n == 0 || (m - 1) * dst_rs + n <= dst.len();
    if b.rows != k || !a.fits() || !b.fits() || !dst_fits || dst_rs < n {
        return Err(OpError::Gemm { m, n, k }.into());
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(0.0);
            }
        }
        return Ok(());
    }
    // SAFETY: every index gemm touches lies inside the slices (checked above), dst is
    // exclusively borrowed and cannot alias a or b.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

/// `n` chunks of `size` of `v`, or `n` empty slices when `v` is empty (a
/// gradient not wanted), so one parallel loop serves every combination of wanted gradients.
pub(crate) fn chunks_or_empty(v: &mut [f32], size: usize, n: usize) -> Vec<&mut [f32]> {
    if v.is_empty() {
        (0..n).map(|_| <&mut [f32]>::default()).collect()
    } else {
        v.chunks_mut(size).collect()
    }
}

/// e^x in f32, branch-free so loops over slices auto-vectorise (libm's `expf` is a scalar
/// call, and exp is most of softmax's, SiLU's and the vocabulary log-sum-exp's cost).
/// Range reduction x = n ln2 + r, |r| <= ln2/2, then a degree-7 Taylor polynomial: relative
/// error below 2e-7 over the clamped range [-87, 88]. Inputs below -87 give ~1e-38 instead
/// of 0 (callers zero masked entries themselves); NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5 * 2^23 rounds to the nearest integer without a branch or a call.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    // Horner form of sum_{i<=7} r^i / i!
    let mut p = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + c;
    }
    // 2^n from the exponent bits; n is in [-126, 127] after the clamp.
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

/// Lanes of the manual reductions below: eight independent accumulators let LLVM keep them
/// in one AVX register (a single running sum or max is a serial chain it may not reorder).
const LANES: usize = 8;

/// Largest element (NEG_INFINITY for an empty slice).
pub(crate) fn max_of(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    tail.iter()
        .chain(acc.iter())
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// `v[i] = exp(v[i] - shift)` in place; returns the sum of the new values.
pub(crate) fn exp_shift_sum(v: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = v.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            c[i] = exp_f32(c[i] - shift);
            acc[i] += c[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp_f32(*x - shift);
        sum += *x;
    }
    sum
}

/// `sum(exp(v[i] - shift))` without writing.
pub(crate) fn sum_exp_shift(v: &[f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += exp_f32(c[i] - shift);
        }
    }
    acc.iter().sum::<f32>() + tail.iter().map(|&x| exp_f32(x - shift)).sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_matches_f64_exp() {
        // The reference is std's f64 exp; 2e-7 relative is about two f32 ulps.
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            worst = worst.max(((exp_f32(x) as f64) - want).abs() / want);
        }
        assert!(worst < 2e-7, "worst relative error {worst:e}");
        assert!(exp_f32(f32::NEG_INFINITY) < 1e-37);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn reductions_match_plain_loops() {
        let v: Vec<f32> = (0..37)
            .map(|i| ((i * 7919) % 23) as f32 * 0.25 - 2.0)
            .collect();
        let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(max_of(&v), max);
        let want: f64 = v.iter().map(|&x| ((x - max) as f64).exp()).sum();
        assert!((sum_exp_shift(&v, max) as f64 - want).abs() < 1e-6 * want);
        let mut w = v.clone();
        assert!((exp_shift_sum(&mut w, max) as f64 - want).abs() < 1e-6 * want);
        assert!((w[3] as f64 - ((v[3] - max) as f64).exp()).abs() < 1e-7);
        assert_eq!(max_of(&[]), f32::NEG_INFINITY);
    }
}
