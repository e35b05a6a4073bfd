//! CPU plumbing shared by the custom ops: f32 views of candle storage, conversion of f32
//! results back to the caller's dtype, and a bounds-checked wrapper around `gemm`.
//!
//! Owns: data access and the matrix product. Does not own: any op's math or its backward.
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
