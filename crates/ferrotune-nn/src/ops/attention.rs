//! Causal grouped-query attention as a custom op, FlashAttention-style in spirit: nothing of
//! size (B, H, Tq, Tk) is kept for backward; the softmax is recomputed block by block.
//!
//! Owns: masking, the softmax, the four products of the backward and the GQA reduction of
//! dK/dV. Does not own: projections, RoPE or the KV cache (`crate::attention`).
//!
//! Work is split per (batch, query head) across rayon; inside a task, query rows go in blocks
//! of [`Q_BLOCK`] so the transient scores stay (Q_BLOCK, Tk), and a block only reads the keys
//! its rows can see: up to its last row's position (causality halves the work) and, with a
//! sliding window, from its first row's window start.
//!
//! Visibility: query i sits at key position p = Tk - Tq + i and sees key j when j <= p, j > p -
//! window (with a window), the key is not padding, and (with segments) j is in p's segment.
//!
//! Backward per block, with P the recomputed probabilities and dO the upstream gradient:
//! dV += P^T dO; dP = dO V^T; dS = P * (dP - rowsum(P * dP)); dQ = scale dS K;
//! dK += scale dS^T Q. rowsum(P * dP) equals rowsum(dO * O), computed here from P so the
//! forward output is not needed.

use candle_core::backend::BackendStorage as _;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::cpu::{
    chunks_or_empty, exp_shift_sum, f32_contig, f32_view, matmul, max_of, storage_from_f32,
    tensor_from_f32, with_f32, Mat,
};
use super::OpError;

const NAME: &str = "ferrotune-attention";

/// Query rows per block.
const Q_BLOCK: usize = 64;

pub(crate) struct AttentionOp {
    pub scale: f32,
    /// (B, Tk) row-major, true = a real key; `None` = no padding.
    pub key_mask: Option<Vec<bool>>,
    /// Sliding window (>= 1): the number of keys up to and including its own a query sees.
    pub window: Option<usize>,
    /// (B, Tk) row-major segment ids; a query sees only keys of its own segment.
    pub segments: Option<Vec<u32>>,
}

#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    hq: usize,
    hkv: usize,
    tq: usize,
    tk: usize,
    d: usize,
}

impl Dims {
    fn new(q: &[usize], k: &[usize], v: &[usize]) -> Result<Dims> {
        let bad = |why: &str| -> candle_core::Error {
            OpError::shape(NAME, format!("{why}: q {q:?}, k {k:?}, v {v:?}")).into()
        };
        let ([b, hq, tq, d], [kb, hkv, tk, kd]) = (q, k) else {
            return Err(bad("q, k, v must be 4-D (B, H, T, D)"));
        };
        let (b, hq, tq, d, hkv, tk) = (*b, *hq, *tq, *d, *hkv, *tk);
        if k != v || *kb != b || *kd != d {
            return Err(bad("k and v must be (B, Hkv, Tk, D) with q's B and D"));
        }
        if hkv == 0 || hq % hkv != 0 {
            return Err(bad("query heads must be a multiple of key/value heads"));
        }
        if tk < tq {
            return Err(bad(
                "fewer keys than queries (query i sits at key Tk - Tq + i)",
            ));
        }
        Ok(Dims {
            b,
            hq,
            hkv,
            tq,
            tk,
            d,
        })
    }

    fn groups(&self) -> usize {
        self.hq / self.hkv
    }
}

impl AttentionOp {
    fn check_mask(&self, dims: Dims) -> Result<()> {
        let want = dims.b * dims.tk;
        let bad = |what: &str, n: usize| -> Result<()> {
            let msg = format!(
                "{what} has {n} elements, want (B, Tk) = ({}, {})",
                dims.b, dims.tk
            );
            Err(OpError::shape(NAME, msg).into())
        };
        if let Some(m) = self.key_mask.as_ref().filter(|m| m.len() != want) {
            return bad("key_mask", m.len());
        }
        if let Some(s) = self.segments.as_ref().filter(|s| s.len() != want) {
            return bad("segments", s.len());
        }
        if self.window == Some(0) {
            return Err(OpError::shape(NAME, "a sliding window must be at least 1").into());
        }
        Ok(())
    }

    /// The first key a query at key position `pos` may see (its window's start).
    fn first_key(&self, pos: usize) -> usize {
        self.window.map_or(0, |w| (pos + 1).saturating_sub(w))
    }

    /// Scores of one block of query rows -> probabilities, in place. `s` is (rows, kn) over keys
    /// k0..k0 + kn, with row r at query index i0 + r; invisible keys and rows with no visible
    /// key become 0.
    #[allow(clippy::too_many_arguments)]
    fn softmax_block(
        &self,
        s: &mut [f32],
        rows: usize,
        k0: usize,
        kn: usize,
        i0: usize,
        bi: usize,
        dims: Dims,
    ) {
        let span = bi * dims.tk..(bi + 1) * dims.tk;
        let mask = self.key_mask.as_ref().map(|m| &m[span.clone()]);
        let segs = self.segments.as_ref().map(|sg| &sg[span]);
        for r in 0..rows {
            // The last key this query may see; always < k0 + kn by construction of kn.
            let pos = dims.tk - dims.tq + i0 + r;
            let row = &mut s[r * kn..(r + 1) * kn];
            let (lo, hi) = (self.first_key(pos) - k0, pos + 1 - k0);
            row[..lo].fill(0.0);
            row[hi..].fill(0.0);
            let vis = &mut row[lo..hi];
            // Keys hidden by padding or another segment score -inf: exp gives ~1e-38 (exp_f32
            // clamps), zeroed below.
            let hidden = |j: usize| {
                let key = k0 + lo + j;
                mask.is_some_and(|m| !m[key]) || segs.is_some_and(|sg| sg[key] != sg[pos])
            };
            let any_hidden = mask.is_some() || segs.is_some();
            if any_hidden {
                (0..vis.len())
                    .filter(|&j| hidden(j))
                    .for_each(|j| vis[j] = f32::NEG_INFINITY);
            }
            let max = max_of(vis);
            if max == f32::NEG_INFINITY {
                vis.fill(0.0);
                continue;
            }
            let sum = exp_shift_sum(vis, max);
            if any_hidden {
                (0..vis.len())
                    .filter(|&j| hidden(j))
                    .for_each(|j| vis[j] = 0.0);
            }
            let inv = 1.0 / sum;
            vis.iter_mut().for_each(|v| *v *= inv);
        }
    }

    /// Block loop shared by forward and backward: calls `f(i0, rows, k0, kn, probs)` for each
    /// block of query rows of one head, with the probabilities over keys k0..k0 + kn recomputed.
    #[allow(clippy::too_many_arguments)]
    fn for_blocks(
        &self,
        qh: &[f32],
        kh: &[f32],
        bi: usize,
        dims: Dims,
        buf: &mut Vec<f32>,
        mut f: impl FnMut(usize, usize, usize, usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        let d = dims.d;
        for i0 in (0..dims.tq).step_by(Q_BLOCK) {
            let rows = Q_BLOCK.min(dims.tq - i0);
            // Keys visible to some row of the block: from the first row's window start to the
            // last row's position.
            let k0 = self.first_key(dims.tk - dims.tq + i0);
            let kn = dims.tk - dims.tq + i0 + rows - k0;
            buf.resize(rows * kn, 0.0);
            let s = &mut buf[..rows * kn];
            // S = scale Q K^T: (rows, D) x (D, kn)
            let qb = Mat::new(&qh[i0 * d..], rows, d);
            matmul(
                s,
                kn,
                qb,
                Mat::new(&kh[k0 * d..], kn, d).t(),
                self.scale,
                false,
                Parallelism::None,
            )?;
            self.softmax_block(s, rows, k0, kn, i0, bi, dims);
            f(i0, rows, k0, kn, s)?;
        }
        Ok(())
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = Dims::new(ql.dims(), kl.dims(), vl.dims())?;
        self.check_mask(dims)?;
        let (q, k, v) = (
            f32_view(NAME, qs, ql)?,
            f32_view(NAME, ks, kl)?,
            f32_view(NAME, vs, vl)?,
        );
        let Dims { hq, tq, tk, d, .. } = dims;
        let mut out = vec![0f32; q.len()];
        if !out.is_empty() {
            // One task per (batch, query head); the output chunk is that head's (Tq, D).
            out.par_chunks_mut(tq * d)
                .enumerate()
                .try_for_each(|(bh, oh)| -> Result<()> {
                    let (bi, h) = (bh / hq, bh % hq);
                    let kv = (bi * dims.hkv + h / dims.groups()) * tk * d;
                    let (kh, vh) = (&k[kv..kv + tk * d], &v[kv..kv + tk * d]);
                    let qh = &q[bh * tq * d..(bh + 1) * tq * d];
                    let mut buf = Vec::new();
                    self.for_blocks(qh, kh, bi, dims, &mut buf, |i0, rows, k0, kn, p| {
                        // O = P V: (rows, kn) x (kn, D)
                        let ob = &mut oh[i0 * d..(i0 + rows) * d];
                        matmul(
                            ob,
                            d,
                            Mat::new(p, rows, kn),
                            Mat::new(&vh[k0 * d..], kn, d),
                            1.0,
                            false,
                            Parallelism::None,
                        )
                    })
                })?;
        }
        Ok((storage_from_f32(NAME, out, qs.dtype())?, ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let want = Wanted {
            q: q.track_op(),
            k: k.track_op(),
            v: v.track_op(),
        };
        if !(want.q || want.k || want.v) || q.elem_count() == 0 {
            return Ok((None, None, None));
        }
        let dims = Dims::new(q.dims(), k.dims(), v.dims())?;
        self.check_mask(dims)?;
        let Dims {
            b, hq, tq, tk, d, ..
        } = dims;
        let (q32, k32, v32, g32) = (
            f32_contig(q)?,
            f32_contig(k)?,
            f32_contig(v)?,
            f32_contig(g)?,
        );
        let n = b * hq;
        let mut dq = vec![0f32; if want.q { n * tq * d } else { 0 }];
        // dK, dV per query head (B, Hq, Tk, D), summed over each group afterwards.
        let mut dk = vec![0f32; if want.k { n * tk * d } else { 0 }];
        let mut dv = vec![0f32; if want.v { n * tk * d } else { 0 }];
        let tasks: Vec<_> = chunks_or_empty(&mut dq, tq * d, n)
            .into_iter()
            .zip(chunks_or_empty(&mut dk, tk * d, n))
            .zip(chunks_or_empty(&mut dv, tk * d, n))
            .enumerate()
            .collect();
        with_f32(NAME, [&q32, &k32, &v32, &g32], |[q, k, v, go]| {
            tasks
                .into_par_iter()
                .try_for_each(|(bh, ((dqh, dkh), dvh))| {
                    let (bi, h) = (bh / hq, bh % hq);
                    let kv = (bi * dims.hkv + h / dims.groups()) * tk * d;
                    let head = Head {
                        bi,
                        q: &q[bh * tq * d..(bh + 1) * tq * d],
                        k: &k[kv..kv + tk * d],
                        v: &v[kv..kv + tk * d],
                        g: &go[bh * tq * d..(bh + 1) * tq * d],
                    };
                    self.bwd_head(head, dims, want, dqh, dkh, dvh)
                })
        })?;
        let dq = want
            .q
            .then(|| tensor_from_f32(dq, q.dims(), q.dtype(), q))
            .transpose()?;
        let dk = want
            .k
            .then(|| tensor_from_f32(sum_groups(dk, dims), k.dims(), k.dtype(), k));
        let dv = want
            .v
            .then(|| tensor_from_f32(sum_groups(dv, dims), v.dims(), v.dtype(), v));
        Ok((dq, dk.transpose()?, dv.transpose()?))
    }
}

/// Which of q, k, v need a gradient.
#[derive(Clone, Copy)]
struct Wanted {
    q: bool,
    k: bool,
    v: bool,
}

/// One (batch, query head)'s inputs: q and the upstream gradient (Tq, D), its kv head's k and
/// v (Tk, D).
struct Head<'a> {
    bi: usize,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    g: &'a [f32],
}

impl AttentionOp {
    /// Backward of one (batch, query head): writes dq (Tq, D) and this head's share of dk, dv
    /// (Tk, D); a slice is empty when that gradient is not wanted.
    fn bwd_head(
        &self,
        x: Head<'_>,
        dims: Dims,
        want: Wanted,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    ) -> Result<()> {
        let d = dims.d;
        let none = Parallelism::None;
        let (mut buf, mut dp) = (Vec::new(), Vec::new());
        self.for_blocks(x.q, x.k, x.bi, dims, &mut buf, |i0, rows, k0, kn, p| {
            let pm = Mat::new(p, rows, kn);
            let gb = Mat::new(&x.g[i0 * d..], rows, d);
            let keys = k0 * d..(k0 + kn) * d;
            if want.v {
                // dV[k0..k0 + kn] += P^T dO: (kn, rows) x (rows, D)
                matmul(&mut dv[keys.clone()], d, pm.t(), gb, 1.0, true, none)?;
            }
            if !(want.q || want.k) {
                return Ok(());
            }
            // dP = dO V^T: (rows, D) x (D, kn)
            dp.resize(rows * kn, 0.0);
            let ds = &mut dp[..rows * kn];
            let vb = Mat::new(&x.v[k0 * d..], kn, d);
            matmul(ds, kn, gb, vb.t(), 1.0, false, none)?;
            // dS = P * (dP - rowsum(P * dP)), in place
            for (dr, pr) in ds.chunks_exact_mut(kn).zip(p.chunks_exact(kn)) {
                let dot: f32 = dr.iter().zip(pr).map(|(a, b)| a * b).sum();
                dr.iter_mut().zip(pr).for_each(|(a, b)| *a = b * (*a - dot));
            }
            let dsm = Mat::new(ds, rows, kn);
            if want.q {
                // dQ = scale dS K: (rows, kn) x (kn, D)
                let dqb = &mut dq[i0 * d..(i0 + rows) * d];
                let kb = Mat::new(&x.k[k0 * d..], kn, d);
                matmul(dqb, d, dsm, kb, self.scale, false, none)?;
            }
            if want.k {
                // dK[k0..k0 + kn] += scale dS^T Q: (kn, rows) x (rows, D)
                let qb = Mat::new(&x.q[i0 * d..], rows, d);
                matmul(&mut dk[keys], d, dsm.t(), qb, self.scale, true, none)?;
            }
            Ok(())
        })
    }
}

/// (B, Hq, Tk, D) per-query-head partials -> (B, Hkv, Tk, D), summing each group's heads.
fn sum_groups(per_head: Vec<f32>, dims: Dims) -> Vec<f32> {
    let groups = dims.groups();
    if groups == 1 {
        return per_head;
    }
    let size = dims.tk * dims.d;
    let mut out = vec![0f32; dims.b * dims.hkv * size];
    out.par_chunks_mut(size).enumerate().for_each(|(bk, o)| {
        for gi in 0..groups {
            let src = &per_head[(bk * groups + gi) * size..][..size];
            o.iter_mut().zip(src).for_each(|(o, s)| *o += s);
        }
    });
    out
}
