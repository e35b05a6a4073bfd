//! The CUDA path of the differentiable ops: the same math and the same gradient contract as the
//! CPU ops (a frozen argument never gets a gradient), with kernels from `kernels/ops.cu` for
//! the row-wise and elementwise parts and cuBLAS (through candle's matmul) for every product.
//!
//! Owns: launching those kernels, the cuBLAS-based attention and vocabulary log-prob, and their
//! backward passes. Does not own: the math's definition (the CPU ops are the reference; the
//! GPU-only tests in `tests/cuda_ops.rs` compare the two) or shape rules beyond what a launch
//! needs.
//!
//! Attention is "memory-efficient by recompute": forward keeps only the output and the per-row
//! log-sum-exp; backward recomputes the probabilities from them. Scores live only while one
//! chunk of (batch, kv-head) pairs is processed, in f32, so nothing of size (B, H, Tq, Tk) is
//! kept for backward (a FlashAttention-style fused kernel is the next step).
//!
//! Ops whose forward is a composite of candle tensor ops (attention, log-prob) run it on
//! detached inputs and then hand the result to autograd through [`Attach2`]/[`Attach3`], custom
//! ops whose forward returns the precomputed result and whose backward is ours.

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result,
    Shape, Storage, Tensor, D,
};

use super::OpError;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ferrotune_ops.ptx"));
const MODULE: &str = "ferrotune_ops";
const NAME: &str = "ferrotune-cuda";

/// Threads per block of the row kernels.
const ROW_THREADS: u32 = 256;
/// Bytes of scores (or logits) one chunk may hold; bounds the transient memory of attention
/// and of the vocabulary log-prob.
const CHUNK_BYTES: usize = 512 << 20;

fn suffix(dt: DType) -> Result<&'static str> {
    match dt {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        dtype => Err(OpError::DType { op: NAME, dtype }.into()),
    }
}

fn cuda_device(t: &Tensor) -> Result<&CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d),
        _ => Err(OpError::Device { op: NAME }.into()),
    }
}

/// Device address of element `offset` of a CUDA storage.
fn addr(s: &CudaStorage, offset: usize) -> Result<u64> {
    let stream = s.device.cuda_stream();
    let (base, size) = match &s.slice {
        CudaStorageSlice::F32(v) => (v.device_ptr(&stream).0, 4),
        CudaStorageSlice::BF16(v) => (v.device_ptr(&stream).0, 2),
        CudaStorageSlice::F16(v) => (v.device_ptr(&stream).0, 2),
        CudaStorageSlice::U32(v) => (v.device_ptr(&stream).0, 4),
        CudaStorageSlice::F64(v) => (v.device_ptr(&stream).0, 8),
        _ => {
            return Err(OpError::DType {
                op: NAME,
                dtype: s.dtype(),
            }
            .into())
        }
    };
    Ok(base + (offset * size) as u64)
}

/// Device address of element `extra` of a contiguous CUDA tensor. The tensor must stay alive
/// until the kernel using the address has been queued (all work runs on candle's one stream).
fn taddr(t: &Tensor, extra: usize) -> Result<u64> {
    let (st, l) = t.storage_and_layout();
    let Storage::Cuda(s) = &*st else {
        return Err(OpError::Device { op: NAME }.into());
    };
    let (start, _) = l
        .contiguous_offsets()
        .ok_or(OpError::NotContiguous { op: NAME })?;
    addr(s, start + extra)
}

/// A fresh, uninitialised tensor (every element is written by the kernel that fills it).
fn empty(shape: impl Into<Shape>, dt: DType, dev: &CudaDevice) -> Result<Tensor> {
    let shape = shape.into();
    // SAFETY: every caller launches a kernel that writes all elements before any read.
    let st = unsafe { dev.alloc_uninit(&shape, dt)? };
    Ok(Tensor::from_storage(
        Storage::Cuda(st),
        shape,
        BackpropOp::none(),
        false,
    ))
}

/// One kernel argument.
enum Arg {
    Ptr(u64),
    I32(i32),
    U64(u64),
    F32(f32),
}

fn launch(dev: &CudaDevice, name: &str, dt: DType, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
    launch_fn(dev, &format!("{name}_{}", suffix(dt)?), cfg, args)
}

fn launch_fn(dev: &CudaDevice, name: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
    let f = dev.get_or_load_custom_func(name, MODULE, PTX)?;
    let mut b = f.builder();
    for a in args {
        match a {
            Arg::Ptr(p) | Arg::U64(p) => b.arg(p),
            Arg::I32(v) => b.arg(v),
            Arg::F32(v) => b.arg(v),
        };
    }
    // SAFETY: the argument lists match the kernels' signatures in kernels/ops.cu, and every
    // pointer addresses a live, contiguous buffer of the stated size.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

fn rows_cfg(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn elems_cfg(n: usize) -> LaunchConfig {
    LaunchConfig::for_num_elems(n as u32)
}

fn ptr_or_null(t: &Option<Tensor>) -> Result<u64> {
    t.as_ref().map_or(Ok(0), |t| taddr(t, 0))
}

fn contig_cuda(s: &CudaStorage, l: &Layout) -> Result<u64> {
    let (start, _) = l
        .contiguous_offsets()
        .ok_or(OpError::NotContiguous { op: NAME })?;
    addr(s, start)
}

/// (rows, H) of x for a per-row op over the last dim, checked against the parameter length
/// (the CPU norms' check).
fn last_dim(op: &'static str, l: &Layout, param_len: usize) -> Result<(usize, usize)> {
    let h = super::norm::hidden(op, l, param_len)?;
    Ok((l.shape().elem_count() / h.max(1), h))
}

fn cpu_unreachable<T>() -> Result<T> {
    Err(OpError::shape(NAME, "the CUDA op was given CPU tensors").into())
}

/// Sums an (R, H) f32 tensor of per-row contributions into (H) of dtype `dt`.
fn sum_rows(parts: Option<Tensor>, dt: DType) -> Result<Option<Tensor>> {
    parts.map(|p| p.sum(0)?.to_dtype(dt)).transpose()
}

// ------------------------------------------------------------------------------ RMSNorm

pub(crate) struct RmsNorm {
    pub eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "ferrotune-rms-norm-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unreachable()
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, h) = last_dim(self.name(), xl, wl.shape().elem_count())?;
        let dt = xs.dtype();
        // SAFETY: the kernel writes every element.
        let out = unsafe { xs.device.alloc_uninit(xl.shape(), dt)? };
        if rows > 0 {
            let args = [
                Arg::Ptr(contig_cuda(xs, xl)?),
                Arg::Ptr(contig_cuda(ws, wl)?),
                Arg::Ptr(addr(&out, 0)?),
                Arg::I32(h as i32),
                Arg::F32(self.eps),
            ];
            launch(
                &xs.device,
                "rms_fwd",
                dt,
                rows_cfg(rows, ROW_THREADS),
                &args,
            )?;
        }
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (want_x, want_w) = (x.track_op(), w.track_op());
        if !(want_x || want_w) || x.elem_count() == 0 {
            return Ok((None, None));
        }
        let dev = cuda_device(x)?;
        let g = g.contiguous()?;
        let (h, dt) = (w.elem_count(), x.dtype());
        let rows = x.elem_count() / h;
        let dx = want_x.then(|| empty(x.shape(), dt, dev)).transpose()?;
        let dwp = want_w
            .then(|| empty((rows, h), DType::F32, dev))
            .transpose()?;
        let args = [
            Arg::Ptr(taddr(x, 0)?),
            Arg::Ptr(taddr(w, 0)?),
            Arg::Ptr(taddr(&g, 0)?),
            Arg::Ptr(ptr_or_null(&dx)?),
            Arg::Ptr(ptr_or_null(&dwp)?),
            Arg::I32(h as i32),
            Arg::F32(self.eps),
            Arg::I32(want_x as i32),
            Arg::I32(want_w as i32),
        ];
        launch(dev, "rms_bwd", dt, rows_cfg(rows, ROW_THREADS), &args)?;
        Ok((dx, sum_rows(dwp, w.dtype())?))
    }
}

// ------------------------------------------------------------------------------ LayerNorm

pub(crate) struct LayerNorm {
    pub eps: f32,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "ferrotune-layer-norm-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unreachable()
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, h) = last_dim(self.name(), xl, wl.shape().elem_count())?;
        last_dim(self.name(), xl, bl.shape().elem_count())?;
        let dt = xs.dtype();
        // SAFETY: the kernel writes every element.
        let out = unsafe { xs.device.alloc_uninit(xl.shape(), dt)? };
        if rows > 0 {
            let args = [
                Arg::Ptr(contig_cuda(xs, xl)?),
                Arg::Ptr(contig_cuda(ws, wl)?),
                Arg::Ptr(contig_cuda(bs, bl)?),
                Arg::Ptr(addr(&out, 0)?),
                Arg::I32(h as i32),
                Arg::F32(self.eps),
            ];
            launch(&xs.device, "ln_fwd", dt, rows_cfg(rows, ROW_THREADS), &args)?;
        }
        Ok((out, xl.shape().clone()))
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
        let dev = cuda_device(x)?;
        let g = g.contiguous()?;
        let (h, dt) = (w.elem_count(), x.dtype());
        let rows = x.elem_count() / h;
        let dx = want_x.then(|| empty(x.shape(), dt, dev)).transpose()?;
        let dwp = want_w
            .then(|| empty((rows, h), DType::F32, dev))
            .transpose()?;
        let dbp = want_b
            .then(|| empty((rows, h), DType::F32, dev))
            .transpose()?;
        let args = [
            Arg::Ptr(taddr(x, 0)?),
            Arg::Ptr(taddr(w, 0)?),
            Arg::Ptr(taddr(&g, 0)?),
            Arg::Ptr(ptr_or_null(&dx)?),
            Arg::Ptr(ptr_or_null(&dwp)?),
            Arg::Ptr(ptr_or_null(&dbp)?),
            Arg::I32(h as i32),
            Arg::F32(self.eps),
            Arg::I32(want_x as i32),
            Arg::I32(want_w as i32),
            Arg::I32(want_b as i32),
        ];
        launch(dev, "ln_bwd", dt, rows_cfg(rows, ROW_THREADS), &args)?;
        Ok((dx, sum_rows(dwp, w.dtype())?, sum_rows(dbp, b.dtype())?))
    }
}

// ------------------------------------------------------------------------------ RoPE

/// cos and sin arrive as contiguous f32 (the wrapper converts them; they are small).
pub(crate) struct Rope;

fn rope_dims(x: &[usize], c: &[usize]) -> Result<(usize, usize, usize, usize, usize)> {
    let [b, h, t, d] = *x else {
        return Err(
            OpError::shape(NAME, format!("rope: x must be (B, H, T, D), got {x:?}")).into(),
        );
    };
    if !(c.len() == 3 && (c[0] == b || c[0] == 1) && c[1] == t && c[2] * 2 == d) {
        return Err(OpError::shape(
            NAME,
            format!("rope: cos/sin {c:?} do not fit x {x:?}; want (B, T, D/2)"),
        )
        .into());
    }
    Ok((b, h, t, d, c[0]))
}

#[allow(clippy::too_many_arguments)]
fn rope_launch(
    dev: &CudaDevice,
    dt: DType,
    x: u64,
    cos: u64,
    sin: u64,
    y: u64,
    dims: (usize, usize, usize, usize, usize),
    sign: f32,
) -> Result<()> {
    let (b, h, t, d, cb) = dims;
    let pairs = b * h * t * (d / 2);
    if pairs == 0 {
        return Ok(());
    }
    let args = [
        Arg::Ptr(x),
        Arg::Ptr(cos),
        Arg::Ptr(sin),
        Arg::Ptr(y),
        Arg::U64(pairs as u64),
        Arg::I32(h as i32),
        Arg::I32(t as i32),
        Arg::I32(d as i32),
        Arg::I32(cb as i32),
        Arg::F32(sign),
    ];
    launch(dev, "rope", dt, elems_cfg(pairs), &args)
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "ferrotune-rope-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unreachable()
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        cs: &CudaStorage,
        cl: &Layout,
        ss: &CudaStorage,
        sl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dims = rope_dims(xl.dims(), cl.dims())?;
        let dt = xs.dtype();
        // SAFETY: the kernel writes every element.
        let out = unsafe { xs.device.alloc_uninit(xl.shape(), dt)? };
        rope_launch(
            &xs.device,
            dt,
            contig_cuda(xs, xl)?,
            contig_cuda(cs, cl)?,
            contig_cuda(ss, sl)?,
            addr(&out, 0)?,
            dims,
            1.0,
        )?;
        Ok((out, xl.shape().clone()))
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
        let dev = cuda_device(x)?;
        let dims = rope_dims(x.dims(), cos.dims())?;
        let g = g.contiguous()?;
        let dx = empty(x.shape(), x.dtype(), dev)?;
        // The backward of a rotation is the rotation by the negative angle.
        rope_launch(
            dev,
            x.dtype(),
            taddr(&g, 0)?,
            taddr(cos, 0)?,
            taddr(sin, 0)?,
            taddr(&dx, 0)?,
            dims,
            -1.0,
        )?;
        Ok((Some(dx), None, None))
    }
}

// ------------------------------------------------------------------------------ SwiGLU

pub(crate) struct Swiglu;

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "ferrotune-swiglu-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unreachable()
    }

    fn cuda_fwd(
        &self,
        gs: &CudaStorage,
        gl: &Layout,
        us: &CudaStorage,
        ul: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        if gl.dims() != ul.dims() {
            return Err(OpError::shape(
                NAME,
                format!("swiglu: gate {:?} and up {:?} differ", gl.dims(), ul.dims()),
            )
            .into());
        }
        let n = gl.shape().elem_count();
        let dt = gs.dtype();
        // SAFETY: the kernel writes every element.
        let out = unsafe { gs.device.alloc_uninit(gl.shape(), dt)? };
        if n > 0 {
            let args = [
                Arg::Ptr(contig_cuda(gs, gl)?),
                Arg::Ptr(contig_cuda(us, ul)?),
                Arg::Ptr(addr(&out, 0)?),
                Arg::U64(n as u64),
            ];
            launch(&gs.device, "swiglu_fwd", dt, elems_cfg(n), &args)?;
        }
        Ok((out, gl.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (want_g, want_u) = (gate.track_op(), up.track_op());
        let n = gate.elem_count();
        if !(want_g || want_u) || n == 0 {
            return Ok((None, None));
        }
        let dev = cuda_device(gate)?;
        let grad = grad.contiguous()?;
        let dt = gate.dtype();
        let dg = want_g.then(|| empty(gate.shape(), dt, dev)).transpose()?;
        let du = want_u.then(|| empty(up.shape(), dt, dev)).transpose()?;
        let args = [
            Arg::Ptr(taddr(gate, 0)?),
            Arg::Ptr(taddr(up, 0)?),
            Arg::Ptr(taddr(&grad, 0)?),
            Arg::Ptr(ptr_or_null(&dg)?),
            Arg::Ptr(ptr_or_null(&du)?),
            Arg::U64(n as u64),
            Arg::I32(want_g as i32),
            Arg::I32(want_u as i32),
        ];
        launch(dev, "swiglu_bwd", dt, elems_cfg(n), &args)?;
        Ok((dg, du))
    }
}

// ------------------------------------------------------------------------------ linear

/// `y = x W^T` through cuBLAS; backward computes dx and, only when W is tracked, dW.
pub(crate) struct Linear;

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "ferrotune-linear-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unreachable()
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let xd = xl.dims();
        let k = *xd
            .last()
            .ok_or_else(|| OpError::shape(NAME, "linear: x has no dims"))?;
        let wd = wl.dims();
        if wd.len() != 2 || wd[1] != k {
            return Err(OpError::shape(
                NAME,
                format!("linear: w {wd:?} does not match x {xd:?} (want (out, {k}))"),
            )
            .into());
        }
        if !xl.is_contiguous() || !wl.is_contiguous() {
            return Err(OpError::NotContiguous { op: NAME }.into());
        }
        let (m, n) = (xl.shape().elem_count() / k.max(1), wd[0]);
        // (M, K) x (K, N) with W^T read through strides.
        let x2 = Layout::contiguous_with_offset((m, k), xl.start_offset());
        let wt = Layout::new(Shape::from((k, n)), vec![1, k], wl.start_offset());
        let y = xs.matmul(ws, (1, m, n, k), &x2, &wt)?;
        let mut out = xd.to_vec();
        if let Some(last) = out.last_mut() {
            *last = n;
        }
        Ok((y, Shape::from(out)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (want_x, want_w) = (x.track_op(), w.track_op());
        if !(want_x || want_w) {
            return Ok((None, None));
        }
        let (n, k) = w.dims2()?;
        let g2 = g.detach().reshape(((), n))?; // (M, N)
        let dx = if want_x {
            // dx = g W: (M, N) x (N, K)
            Some(g2.matmul(&w.detach())?.reshape(x.shape())?)
        } else {
            None
        };
        let dw = if want_w {
            // dW = g^T x: (N, M) x (M, K)
            let x2 = x.detach().reshape(((), k))?;
            Some(g2.t()?.matmul(&x2)?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

// ------------------------------------------------------------------------------ attaching

type Bwd2 =
    dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> + Send + Sync;
type Bwd3 = dyn Fn(
        &Tensor,
        &Tensor,
        &Tensor,
        &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>
    + Send
    + Sync;

/// A copy of `out`'s storage (fresh, contiguous, offset 0), as a custom op's forward result.
fn storage_copy(out: &Tensor) -> Result<(CudaStorage, Shape)> {
    let (st, l) = out.storage_and_layout();
    let Storage::Cuda(s) = &*st else {
        return Err(OpError::Device { op: NAME }.into());
    };
    let mut dst = unsafe { s.device.alloc_uninit(l.shape(), s.dtype())? };
    s.copy_strided_src(&mut dst, 0, l)?;
    Ok((dst, l.shape().clone()))
}

/// Hands a precomputed result of two inputs to autograd, with `bwd(a, b, grad)` as backward.
pub(crate) struct Attach2 {
    pub out: Tensor,
    pub bwd: Box<Bwd2>,
}

impl CustomOp2 for Attach2 {
    fn name(&self) -> &'static str {
        "ferrotune-attach2"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unreachable()
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        storage_copy(&self.out)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        (self.bwd)(a, b, g)
    }
}

/// [`Attach2`] for three inputs.
pub(crate) struct Attach3 {
    pub out: Tensor,
    pub bwd: Box<Bwd3>,
}

impl CustomOp3 for Attach3 {
    fn name(&self) -> &'static str {
        "ferrotune-attach3"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unreachable()
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        storage_copy(&self.out)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        (self.bwd)(a, b, c, g)
    }
}

// ------------------------------------------------------------------------------ attention

/// Shapes of one attention call, with the query heads of each kv head folded into rows:
/// q viewed as (B * Hkv, G * Tq, D), k and v as (B * Hkv, Tk, D).
#[derive(Clone, Copy)]
struct AttnDims {
    b: usize,
    hq: usize,
    hkv: usize,
    tq: usize,
    tk: usize,
    d: usize,
}

impl AttnDims {
    fn new(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Self> {
        let (b, hq, tq, d) = q.dims4()?;
        let (kb, hkv, tk, kd) = k.dims4()?;
        if kb != b || kd != d || v.dims() != k.dims() || hkv == 0 || hq % hkv != 0 || tq > tk {
            return Err(OpError::shape(
                NAME,
                format!(
                    "attention: q {:?}, k {:?}, v {:?} do not fit (want k = v = (B, Hkv, Tk, D), \
                     Hq % Hkv == 0, Tq <= Tk)",
                    q.dims(),
                    k.dims(),
                    v.dims()
                ),
            )
            .into());
        }
        Ok(AttnDims {
            b,
            hq,
            hkv,
            tq,
            tk,
            d,
        })
    }
    fn pairs(&self) -> usize {
        self.b * self.hkv
    }
    fn rows(&self) -> usize {
        (self.hq / self.hkv) * self.tq
    }
    /// (batch, kv-head) pairs per chunk so one chunk's f32 scores stay under CHUNK_BYTES.
    fn chunk(&self) -> usize {
        let per = self.rows() * self.tk * 4;
        (CHUNK_BYTES / per.max(1)).clamp(1, self.pairs().max(1))
    }
}

struct AttnCtx {
    dims: AttnDims,
    scale: f32,
    /// (B, Tk) f32, or none.
    mask: Option<Tensor>,
    /// (B, Tk) f32 segment ids, or none.
    segments: Option<Tensor>,
    /// Sliding window; 0 = none.
    window: i32,
}

impl AttnCtx {
    /// Launches one of the row kernels over the score rows of pairs [p0, p0 + n).
    fn rows_kernel(&self, name: &str, s: &Tensor, lse: &Tensor, p0: usize, n: usize) -> Result<()> {
        let AttnDims { hq, tq, tk, .. } = self.dims;
        let rows = n * self.dims.rows();
        let dev = cuda_device(s)?;
        let args = [
            Arg::Ptr(taddr(s, 0)?),
            Arg::Ptr(taddr(lse, 0)?),
            Arg::Ptr(ptr_or_null(&self.mask)?),
            Arg::I32(self.mask.is_some() as i32),
            Arg::Ptr(ptr_or_null(&self.segments)?),
            Arg::I32(self.segments.is_some() as i32),
            Arg::I32(self.window),
            Arg::U64((p0 * self.dims.rows()) as u64),
            Arg::I32(hq as i32),
            Arg::I32(tq as i32),
            Arg::I32(tk as i32),
            Arg::F32(self.scale),
        ];
        launch(dev, name, s.dtype(), rows_cfg(rows, ROW_THREADS), &args)
    }

    /// Forward on detached f32 (B * Hkv, rows, D) views: (output, lse).
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let dims = self.dims;
        let dev = cuda_device(q)?;
        let lse = empty(dims.pairs() * dims.rows(), DType::F32, dev)?;
        let mut outs = Vec::new();
        let chunk = dims.chunk();
        for p0 in (0..dims.pairs()).step_by(chunk) {
            let n = chunk.min(dims.pairs() - p0);
            let (qc, kc, vc) = (
                q.narrow(0, p0, n)?,
                k.narrow(0, p0, n)?,
                v.narrow(0, p0, n)?,
            );
            let s = qc.matmul(&kc.t()?)?; // (n, rows, Tk)
            self.rows_kernel("attn_softmax", &s, &lse, p0, n)?;
            outs.push(s.matmul(&vc)?); // (n, rows, D)
        }
        Ok((Tensor::cat(&outs, 0)?, lse))
    }

    /// Backward on detached f32 views; `o`, `g`: (B * Hkv, rows, D). Returns (dq, dk, dv).
    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        g: &Tensor,
        lse: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let dims = self.dims;
        let dev = cuda_device(q)?;
        // delta = rowsum(dO * O), one per query row: (B * Hkv * rows)
        let delta = (g * o)?.sum(D::Minus1)?.flatten_all()?.contiguous()?;
        let (mut dqs, mut dks, mut dvs) = (Vec::new(), Vec::new(), Vec::new());
        let chunk = dims.chunk();
        for p0 in (0..dims.pairs()).step_by(chunk) {
            let n = chunk.min(dims.pairs() - p0);
            let (qc, kc, vc) = (
                q.narrow(0, p0, n)?,
                k.narrow(0, p0, n)?,
                v.narrow(0, p0, n)?,
            );
            let gc = g.narrow(0, p0, n)?;
            let p = qc.matmul(&kc.t()?)?; // scores, then P, (n, rows, Tk)
            self.rows_kernel("attn_probs", &p, lse, p0, n)?;
            dvs.push(p.t()?.matmul(&gc)?); // P^T dO: (n, Tk, D), summed over the group
            let ds = gc.matmul(&vc.t()?)?; // dP = dO V^T: (n, rows, Tk)
            let args = [
                Arg::Ptr(taddr(&p, 0)?),
                Arg::Ptr(taddr(&ds, 0)?),
                Arg::Ptr(taddr(&delta, 0)?),
                Arg::U64((p0 * dims.rows()) as u64),
                Arg::I32(dims.tk as i32),
                Arg::F32(self.scale),
            ];
            let cfg = rows_cfg(n * dims.rows(), ROW_THREADS);
            launch(dev, "attn_dscores", DType::F32, cfg, &args)?;
            dqs.push(ds.matmul(&kc)?); // dS K: (n, rows, D)
            dks.push(ds.t()?.matmul(&qc)?); // dS^T Q: (n, Tk, D)
        }
        Ok((
            Tensor::cat(&dqs, 0)?,
            Tensor::cat(&dks, 0)?,
            Tensor::cat(&dvs, 0)?,
        ))
    }
}

/// Causal GQA attention on CUDA; same contract as `super::attention_masked`.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &super::AttnMask<'_>,
    scale: f64,
) -> Result<Tensor> {
    let dims = AttnDims::new(q, k, v)?;
    let AttnDims {
        b, hq, tq, tk, d, ..
    } = dims;
    let per_key = |t: Option<&Tensor>, what: &str| -> Result<Option<Tensor>> {
        let Some(m) = t else { return Ok(None) };
        let m = m.to_dtype(DType::F32)?.contiguous()?;
        if m.dims() != [b, tk] {
            return Err(OpError::shape(
                NAME,
                format!("attention: {what} {:?}, want ({b}, {tk})", m.dims()),
            )
            .into());
        }
        Ok(Some(m.detach()))
    };
    let window = match mask.window {
        Some(0) => {
            return Err(OpError::shape(NAME, "a sliding window must be at least 1").into());
        }
        Some(w) => i32::try_from(w).unwrap_or(i32::MAX),
        None => 0,
    };
    let ctx = std::sync::Arc::new(AttnCtx {
        dims,
        scale: scale as f32,
        mask: per_key(mask.key_mask, "key mask")?,
        segments: per_key(mask.segments, "segments")?,
        window,
    });
    let (pairs, rows) = (dims.pairs(), dims.rows());
    // (B, Hq, Tq, D) == (B * Hkv, G * Tq, D) in memory; computed in f32 for the CPU op's precision.
    let fold_q = move |t: &Tensor| {
        t.detach()
            .to_dtype(DType::F32)?
            .contiguous()?
            .reshape((pairs, rows, d))
    };
    let fold_kv = move |t: &Tensor| {
        t.detach()
            .to_dtype(DType::F32)?
            .contiguous()?
            .reshape((pairs, tk, d))
    };
    let (qf, kf, vf) = (fold_q(q)?, fold_kv(k)?, fold_kv(v)?);
    let (o, lse) = ctx.forward(&qf, &kf, &vf)?;
    let out = o
        .reshape((b, hq, tq, d))?
        .to_dtype(q.dtype())?
        .contiguous()?;
    let c = ctx.clone();
    let bwd = move |q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor| {
        let (wq, wk, wv) = (q.track_op(), k.track_op(), v.track_op());
        if !(wq || wk || wv) {
            return Ok((None, None, None));
        }
        let gf = g
            .detach()
            .to_dtype(DType::F32)?
            .contiguous()?
            .reshape((pairs, rows, d))?;
        let (qf, kf, vf) = (fold_q(q)?, fold_kv(k)?, fold_kv(v)?);
        let (dq, dk, dv) = c.backward(&qf, &kf, &vf, &o, &gf, &lse)?;
        let back = |t: Tensor, like: &Tensor| -> Result<Tensor> {
            t.reshape(like.shape())?.to_dtype(like.dtype())
        };
        Ok((
            wq.then(|| back(dq, q)).transpose()?,
            wk.then(|| back(dk, k)).transpose()?,
            wv.then(|| back(dv, v)).transpose()?,
        ))
    };
    q.apply_op3(
        k,
        v,
        Attach3 {
            out,
            bwd: Box::new(bwd),
        },
    )
}

// ------------------------------------------------------------------------------ log-prob

/// The detached inputs of one `token_logprobs` call, kept for its backward.
struct Lp {
    hid: Tensor,
    w: Tensor,
    tg: Tensor,
    inv_temp: f32,
    v: usize,
}

impl Lp {
    /// Raw logits of rows [r0, r0 + rows): (rows, V).
    fn logits(&self, r0: usize, rows: usize) -> Result<Tensor> {
        self.hid.narrow(0, r0, rows)?.matmul(&self.w.t()?)
    }

    /// Turns a chunk of logits into d logp / d logits, in place.
    fn grad_in_place(&self, z: &Tensor, r0: usize) -> Result<()> {
        let rows = z.dim(0)?;
        let args = [
            Arg::Ptr(taddr(z, 0)?),
            Arg::Ptr(taddr(&self.tg, r0)?),
            Arg::F32(self.inv_temp),
            Arg::I32(self.v as i32),
        ];
        launch(
            cuda_device(z)?,
            "lp_grad",
            z.dtype(),
            rows_cfg(rows, 1024),
            &args,
        )
    }
}

/// `token_logprobs` on CUDA: logits one chunk of rows at a time through cuBLAS, the
/// log-softmax and its gradient by kernels. Same contract as `super::token_logprobs_chunked`.
pub(crate) fn token_logprobs(
    hidden: &Tensor,
    w: &Tensor,
    targets: &[u32],
    inv_temp: f32,
    chunk_rows: usize,
) -> Result<Tensor> {
    let dev = cuda_device(hidden)?;
    let (n, h) = hidden.dims2()?;
    let (v, wh) = w.dims2()?;
    if wh != h || targets.len() != n {
        return Err(OpError::shape(
            NAME,
            format!(
                "token_logprobs: hidden {:?}, w {:?}, {} targets do not fit",
                hidden.dims(),
                w.dims(),
                targets.len()
            ),
        )
        .into());
    }
    let dt = hidden.dtype();
    let chunk = if chunk_rows > 0 {
        chunk_rows
    } else {
        (CHUNK_BYTES / (v * dt.size_in_bytes()).max(1)).max(1)
    };
    let hid = hidden.detach().contiguous()?;
    let wd = w.detach().to_dtype(dt)?.contiguous()?;
    let tg = Tensor::from_slice(targets, n, hidden.device())?;
    let want_jac = hidden.track_op();
    let lp = Lp {
        hid,
        w: wd,
        tg,
        inv_temp,
        v,
    };
    let (mut outs, mut jacs) = (Vec::new(), Vec::new());
    for r0 in (0..n).step_by(chunk) {
        let rows = chunk.min(n - r0);
        let z = lp.logits(r0, rows)?;
        let out = empty(rows, DType::F32, dev)?;
        let args = [
            Arg::Ptr(taddr(&z, 0)?),
            Arg::Ptr(taddr(&lp.tg, r0)?),
            Arg::F32(inv_temp),
            Arg::Ptr(taddr(&out, 0)?),
            Arg::I32(v as i32),
        ];
        launch(dev, "lp_rows", dt, rows_cfg(rows, 1024), &args)?;
        outs.push(out);
        if want_jac {
            lp.grad_in_place(&z, r0)?;
            jacs.push(z.matmul(&lp.w)?); // J = dz W: (rows, H)
        }
    }
    if n == 0 {
        return Tensor::zeros(0, DType::F32, hidden.device());
    }
    let out = Tensor::cat(&outs, 0)?;
    let jac = if want_jac {
        Some(Tensor::cat(&jacs, 0)?)
    } else {
        None
    };
    let bwd = move |hidden: &Tensor, w: &Tensor, g: &Tensor| {
        let g = g.detach().to_dtype(DType::F32)?; // (N,)
        let dh = match (&jac, hidden.track_op()) {
            (Some(j), true) => Some(
                j.to_dtype(DType::F32)?
                    .broadcast_mul(&g.unsqueeze(1)?)?
                    .to_dtype(hidden.dtype())?,
            ),
            (None, true) => {
                return Err(OpError::shape(NAME, "hidden became tracked after forward").into())
            }
            _ => None,
        };
        let dw = if w.track_op() {
            let mut dw: Option<Tensor> = None;
            for r0 in (0..n).step_by(chunk) {
                let rows = chunk.min(n - r0);
                let gc = g.narrow(0, r0, rows)?.unsqueeze(1)?.to_dtype(dt)?;
                let z = lp.logits(r0, rows)?;
                lp.grad_in_place(&z, r0)?;
                let dz = z.broadcast_mul(&gc)?;
                // dW += dz^T hidden: (V, rows) x (rows, H)
                let part = dz
                    .t()?
                    .matmul(&lp.hid.narrow(0, r0, rows)?)?
                    .to_dtype(DType::F32)?;
                dw = Some(match dw {
                    Some(acc) => (acc + part)?,
                    None => part,
                });
            }
            dw.map(|t| t.to_dtype(w.dtype())).transpose()?
        } else {
            None
        };
        Ok((dh, dw))
    };
    hidden.apply_op2(
        w,
        Attach2 {
            out,
            bwd: Box::new(bwd),
        },
    )
}

// ------------------------------------------------------------------------------ sampling

/// One token per row of `logits` (B, V), drawn on the device with the caller's uniforms `u`
/// (B,), or the first maximum when `inv_temp` is 0. Returns the ids and their log-probs under
/// softmax(logits * inv_temp) (under softmax(logits) when greedy). Only 2·B numbers cross to
/// the host.
pub(crate) fn sample_rows(
    logits: &Tensor,
    u: &[f32],
    inv_temp: f32,
) -> Result<(Vec<u32>, Vec<f32>)> {
    let dev = cuda_device(logits)?;
    let z = logits.detach().to_dtype(DType::F32)?.contiguous()?;
    let (b, v) = z.dims2()?;
    if u.len() != b {
        return Err(OpError::shape(
            NAME,
            format!("sample_rows: {} uniforms for {b} rows", u.len()),
        )
        .into());
    }
    if b == 0 {
        return Ok((vec![], vec![]));
    }
    let ut = Tensor::from_slice(u, b, logits.device())?;
    let tok = empty(b, DType::U32, dev)?;
    let lp = empty(b, DType::F32, dev)?;
    let args = [
        Arg::Ptr(taddr(&z, 0)?),
        Arg::Ptr(taddr(&ut, 0)?),
        Arg::F32(inv_temp),
        Arg::I32(v as i32),
        Arg::Ptr(taddr(&tok, 0)?),
        Arg::Ptr(taddr(&lp, 0)?),
    ];
    launch_fn(dev, "sample_rows", rows_cfg(b, 1024), &args)?;
    Ok((tok.to_vec1::<u32>()?, lp.to_vec1::<f32>()?))
}

// ------------------------------------------------------------------------------ AdamW

/// One AdamW update of an f32 parameter in place on the device; `m`, `v` (same shape, f32,
/// contiguous) are updated in place too. See `super::AdamwScalars`.
pub(crate) fn adamw_step(
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    s: &super::AdamwScalars,
) -> Result<()> {
    let dev = cuda_device(param)?;
    let n = param.elem_count();
    let same = |t: &Tensor| t.dims() == param.dims() && t.dtype() == DType::F32;
    if !(param.dtype() == DType::F32 && same(grad) && same(m) && same(v)) {
        return Err(OpError::shape(
            NAME,
            "adamw: parameter, gradient and moments must be f32 of one shape",
        )
        .into());
    }
    if !(param.is_contiguous() && m.is_contiguous() && v.is_contiguous()) {
        return Err(OpError::NotContiguous { op: NAME }.into());
    }
    if n == 0 {
        return Ok(());
    }
    let grad = grad.contiguous()?;
    let args = [
        Arg::Ptr(taddr(param, 0)?),
        Arg::Ptr(taddr(&grad, 0)?),
        Arg::Ptr(taddr(m, 0)?),
        Arg::Ptr(taddr(v, 0)?),
        Arg::U64(n as u64),
        Arg::I32(s.decay.is_some() as i32),
        Arg::F32(s.decay.unwrap_or(1.0)),
        Arg::F32(s.one_minus_beta1),
        Arg::F32(s.beta2),
        Arg::F32(s.one_minus_beta2),
        Arg::F32(s.bias_correction2_sqrt),
        Arg::F32(s.eps),
        Arg::F32(s.neg_step_size),
    ];
    launch_fn(dev, "adamw_f32", elems_cfg(n), &args)
}
