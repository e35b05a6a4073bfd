//! SwiGLU's gate, `silu(gate) * up`, as one elementwise custom op with explicit backward.
//!
//! Owns: the fused elementwise math. Does not own: the MLP's projections (`crate::mlp`).
//!
//! Fusing saves the four intermediate (T, I) tensors the composite kept for backward.

use candle_core::backend::BackendStorage as _;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{
    chunks_or_empty, exp_f32, f32_contig, f32_view, storage_from_f32, tensor_from_f32, with_f32,
};
use super::OpError;

const NAME: &str = "ferrotune-swiglu";

/// Elements per rayon task.
const CHUNK: usize = 4096;

pub(crate) struct SwigluOp;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

impl CustomOp2 for SwigluOp {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if gl.dims() != ul.dims() {
            return Err(OpError::shape(
                NAME,
                format!("gate {:?} and up {:?} differ", gl.dims(), ul.dims()),
            )
            .into());
        }
        let (g, u) = (f32_view(NAME, gs, gl)?, f32_view(NAME, us, ul)?);
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(y, (g, u))| {
                for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
                    *y = g * sigmoid(*g) * u;
                }
            });
        Ok((storage_from_f32(NAME, y, gs.dtype())?, gl.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (want_g, want_u) = (gate.track_op(), up.track_op());
        if !want_g && !want_u {
            return Ok((None, None));
        }
        let (g32, u32_, d32) = (f32_contig(gate)?, f32_contig(up)?, f32_contig(grad)?);
        let n = gate.elem_count();
        let mut dg = vec![0f32; if want_g { n } else { 0 }];
        let mut du = vec![0f32; if want_u { n } else { 0 }];
        with_f32(NAME, [&g32, &u32_, &d32], |[gv, uv, dv]| {
            let tasks = n.div_ceil(CHUNK);
            let dgs = chunks_or_empty(&mut dg, CHUNK, tasks);
            let dus = chunks_or_empty(&mut du, CHUNK, tasks);
            dgs.into_par_iter()
                .zip(dus)
                .enumerate()
                .for_each(|(c, (dg, du))| {
                    let i0 = c * CHUNK;
                    let end = (i0 + CHUNK).min(n);
                    let (xs, us, ds) = (&gv[i0..end], &uv[i0..end], &dv[i0..end]);
                    // d silu(x) / dx = s (1 + x (1 - s)). Plain zipped loops, one per case,
                    // so the compiler vectorises them (no bounds checks, no branches).
                    let inputs = xs.iter().zip(us).zip(ds);
                    match (dg.is_empty(), du.is_empty()) {
                        (false, false) => {
                            for ((a, b), ((&x, &u), &d)) in
                                dg.iter_mut().zip(du.iter_mut()).zip(inputs)
                            {
                                let s = sigmoid(x);
                                *a = d * u * s * (1.0 + x * (1.0 - s));
                                *b = d * x * s;
                            }
                        }
                        (false, true) => {
                            for (a, ((&x, &u), &d)) in dg.iter_mut().zip(inputs) {
                                let s = sigmoid(x);
                                *a = d * u * s * (1.0 + x * (1.0 - s));
                            }
                        }
                        (true, false) => {
                            for (b, ((&x, _), &d)) in du.iter_mut().zip(inputs) {
                                *b = d * x * sigmoid(x);
                            }
                        }
                        (true, true) => {}
                    }
                });
            Ok(())
        })?;
        let dg = if want_g {
            Some(tensor_from_f32(dg, gate.dims(), gate.dtype(), gate)?)
        } else {
            None
        };
        let du = if want_u {
            Some(tensor_from_f32(du, up.dims(), up.dtype(), up)?)
        } else {
            None
        };
        Ok((dg, du))
    }
}
