//! The distillation divergence as a differentiable op: per row of (N, V) student logits, the
//! divergence from a teacher as TRL 1.16's `GKDTrainer.generalized_jsd_loss` computes it —
//! forward KL(teacher‖student) at β = 0, reverse KL(student‖teacher) at β = 1, the generalized
//! Jensen–Shannon divergence in between (GKD, arXiv 2306.13649 eq. 1) — with temperature τ,
//! over the full vocabulary or over the teacher's top-k log-probs only. The reductions TRL
//! applies on top are `ferrotune_train::distill_loss`; its `tests/distill_loss_parity.rs` checks
//! loss and d loss / d student logits against TRL's own code
//! (`fixtures/distill/make_distill_loss.py`).
//!
//! Owns: the per-row divergence and its gradient with respect to the student logits. Does not
//! own: running either model, choosing the scored rows, the reduction, or the training loop.
//!
//! # The formula (as TRL computes it)
//!
//! With s = log_softmax(student / τ) and t = log_softmax(teacher / τ), per scored row:
//!
//! - β = 0: Σ_v e^t (t − s) (forward KL, mass-covering);
//! - β = 1: Σ_v e^s (s − t) (reverse KL, mode-seeking);
//! - else, with the mixture m = log((1 − β) e^s + β e^t):
//!   β Σ_v e^t (t − m) + (1 − β) Σ_v e^s (s − m).
//!
//! TRL tests `beta == 0` and `beta == 1` exactly, so β → 0 of the JSD tends to 0, not to the
//! forward KL; we keep that. No τ² factor is applied (TRL applies none). Reduction is TRL's
//! `batchmean`: the sum over scored rows and vocabulary divided by max(scored rows, 1), or by
//! `num_items_in_batch` when given (gradient-accumulation-correct). Because log_softmax ignores a
//! constant shift, the teacher may be given as logits or as log-probs (at temperature 1).
//!
//! # Teacher top-k (the offline-cache / teacher-server form)
//!
//! When only the teacher's top-k tokens and their log-probs are known, the divergence is taken
//! over that support, as TRL's server distillation does (`_compute_server_forward_kl_loss`,
//! `_add_tail_bucket`, `_jsd_divergence` with a support mask): the student's log-probs
//! log_softmax(student / τ) are gathered at the teacher's ids; then either
//!
//! - `add_tail`: one extra bucket per side holds the remaining mass log(1 − Σ_k p_k) (the log-sum
//!   is clamped at −1e-7 first, as TRL does, and no gradient passes the clamp), or
//! - without tail: both sides are renormalised over the k tokens;
//!
//! and the same β-divergence is applied to those k (+1) entries. What this approximates: the
//! teacher's mass outside its top-k is either lumped into one bucket (so how the student spreads
//! its own tail is not constrained, only its total) or dropped; tokens the student favours but the
//! teacher's top-k omits appear only through the tail. TRL uses teacher-top-k support only for
//! β = 0 (its β > 0 server path is a top-1 scheme we do not mirror); for β > 0 we apply the
//! same sparse divergence to the teacher's support. The teacher's log-probs are used as given:
//! they must already be log_softmax(teacher / τ) (a teacher server called at temperature τ
//! returns them so); only the student is divided by τ here. Slots with a −inf (or NaN) log-prob
//! are absent (rows may hold fewer than k tokens).
//!
//! # Memory and precision
//!
//! One custom op streams the rows (threads over row blocks): the forward keeps nothing but the
//! (N,) result, and the backward recomputes each row's softmaxes, so nothing of size (N, V) is
//! allocated besides the inputs and the gradient itself. Unscored rows are skipped. Each row is
//! computed in f64 whatever the input dtype (f32, f64, bf16, f16) and the result is cast back,
//! so f64 inputs match TRL's float64 to ~1e-12. This op has a CPU kernel only (the other ops of
//! this folder also have CUDA ones): a CUDA tensor gets a clear error, and the distillation
//! trainer brings the rows it scores to the CPU first. Gradients flow into the student logits
//! only; the teacher is treated as a constant.

use std::sync::Arc;

use candle_core::backend::BackendStorage as _;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// What can go wrong in this module (wrapped in `candle_core::Error`).
#[derive(Debug, thiserror::Error)]
pub enum DistillLossError {
    #[error("distillation loss: beta must be in [0, 1], got {0}")]
    Beta(f64),
    #[error("distillation loss: temperature must be positive and finite, got {0}")]
    Temperature(f64),
    #[error("distillation loss: `{name}` has shape {got:?}, expected {want}")]
    Shape {
        name: &'static str,
        got: Vec<usize>,
        want: String,
    },
    #[error("distillation loss: `{name}` has dtype {dtype:?}, expected {want}")]
    DType {
        name: &'static str,
        dtype: DType,
        want: &'static str,
    },
    #[error(
        "distillation loss: `{name}` is on {device:?}; the loss runs on CPU tensors only for now"
    )]
    Device {
        name: &'static str,
        device: candle_core::DeviceLocation,
    },
    #[error("distillation loss: teacher top-k id {id} at row {row}, slot {slot} is outside the vocabulary of {vocab}")]
    TopKId {
        row: usize,
        slot: usize,
        id: u32,
        vocab: usize,
    },
    #[error("distillation loss: num_items_in_batch must be at least 1")]
    NumItems,
}

fn wrap(e: DistillLossError) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// The divergence and its temperature (TRL's `beta`, `temperature`; defaults as TRL's
/// `generalized_jsd_loss`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JsdConfig {
    /// 0 = forward KL(teacher‖student), 1 = reverse KL(student‖teacher), else generalized JSD.
    pub beta: f64,
    /// Both distributions are softmax(logits / temperature).
    pub temperature: f64,
}

impl Default for JsdConfig {
    fn default() -> Self {
        JsdConfig {
            beta: 0.5,
            temperature: 1.0,
        }
    }
}

impl JsdConfig {
    pub fn validate(&self) -> std::result::Result<(), DistillLossError> {
        if !(0.0..=1.0).contains(&self.beta) {
            return Err(DistillLossError::Beta(self.beta));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(DistillLossError::Temperature(self.temperature));
        }
        Ok(())
    }
}

/// The teacher's top-k tokens for each row.
#[derive(Debug, Clone)]
pub struct TeacherTopK {
    /// (N, K) u32 token ids; ignored where `logprobs` is −inf.
    pub ids: Tensor,
    /// (N, K) log_softmax(teacher / τ) at `ids`; −inf marks an absent slot.
    pub logprobs: Tensor,
    /// Keep the mass outside the top-k as one extra bucket (TRL's `loss_add_tail`, default
    /// true there); false renormalises over the k tokens.
    pub add_tail: bool,
}

/// What the student is compared with.
#[derive(Debug, Clone, Copy)]
pub enum Teacher<'a> {
    /// (N, V) logits (or log-probs) over the whole vocabulary.
    Full(&'a Tensor),
    /// The teacher's top-k log-probs per row.
    TopK(&'a TeacherTopK),
}

/// Per-row divergence (N,) in the student's dtype; rows with `mask` 0 are 0. Differentiable
/// with respect to `student` (N, V). `mask` is (N,) of any dtype, nonzero = scored.
pub fn divergence_rows(
    student: &Tensor,
    teacher: Teacher<'_>,
    mask: &Tensor,
    cfg: &JsdConfig,
) -> Result<Tensor> {
    cfg.validate().map_err(wrap)?;
    let (n, v) = student.dims2()?;
    check_float("student", student)?;
    check_cpu("student", student)?;
    check_shape("mask", mask, &[n], format!("({n},)"))?;
    let scored: Vec<bool> = mask
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?
        .iter()
        .map(|&m| m != 0.0)
        .collect();
    let (teacher_t, topk) = match teacher {
        Teacher::Full(t) => {
            check_shape(
                "teacher",
                t,
                &[n, v],
                format!("({n}, {v}) like the student"),
            )?;
            check_float("teacher", t)?;
            check_cpu("teacher", t)?;
            (t.clone(), None)
        }
        Teacher::TopK(tk) => {
            let k = tk.logprobs.dim(1).unwrap_or(0);
            let want = format!("({n}, K)");
            check_shape(
                "teacher top-k logprobs",
                &tk.logprobs,
                &[n, k],
                want.clone(),
            )?;
            check_shape("teacher top-k ids", &tk.ids, &[n, k], want)?;
            check_float("teacher top-k logprobs", &tk.logprobs)?;
            check_cpu("teacher top-k logprobs", &tk.logprobs)?;
            let ids = tk
                .ids
                .to_dtype(DType::U32)?
                .flatten_all()?
                .to_vec1::<u32>()?;
            let lps = tk
                .logprobs
                .to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1::<f64>()?;
            for (i, (&id, &lp)) in ids.iter().zip(&lps).enumerate() {
                if lp > f64::NEG_INFINITY && id as usize >= v {
                    return Err(wrap(DistillLossError::TopKId {
                        row: i / k,
                        slot: i % k,
                        id,
                        vocab: v,
                    }));
                }
            }
            let spec = TopKSpec {
                ids: Arc::new(ids),
                k,
                add_tail: tk.add_tail,
            };
            (tk.logprobs.clone(), Some(spec))
        }
    };
    let op = DivergenceOp {
        spec: Arc::new(Spec {
            beta: cfg.beta,
            temperature: cfg.temperature,
            scored: Arc::new(scored),
            topk,
        }),
    };
    student
        .contiguous()?
        .apply_op2(&teacher_t.detach().contiguous()?, op)
}

fn check_shape(name: &'static str, t: &Tensor, want: &[usize], desc: String) -> Result<()> {
    if t.dims() != want {
        return Err(wrap(DistillLossError::Shape {
            name,
            got: t.dims().to_vec(),
            want: desc,
        }));
    }
    Ok(())
}

fn check_float(name: &'static str, t: &Tensor) -> Result<()> {
    match t.dtype() {
        DType::F32 | DType::F64 | DType::BF16 | DType::F16 => Ok(()),
        dtype => Err(wrap(DistillLossError::DType {
            name,
            dtype,
            want: "f32, f64, bf16 or f16",
        })),
    }
}

fn check_cpu(name: &'static str, t: &Tensor) -> Result<()> {
    if !t.device().is_cpu() {
        return Err(wrap(DistillLossError::Device {
            name,
            device: t.device().location(),
        }));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The op.

struct TopKSpec {
    /// (N * K) row-major.
    ids: Arc<Vec<u32>>,
    k: usize,
    add_tail: bool,
}

struct Spec {
    beta: f64,
    temperature: f64,
    scored: Arc<Vec<bool>>,
    topk: Option<TopKSpec>,
}

/// Forward: (student (N, V), teacher (N, V) or (N, K)) -> (N,) divergence per row.
struct DivergenceOp {
    spec: Arc<Spec>,
}

/// Backward: (student, teacher, d loss / d rows (N,)) -> d loss / d student (N, V).
struct DivergenceGradOp {
    spec: Arc<Spec>,
}

const NAME: &str = "ferrotune-distill-divergence";

/// Reads row `i` of a contiguous (rows, width) float buffer as f64.
type RowReader<'a> = Box<dyn Fn(usize, &mut [f64]) + Sync + 'a>;

fn reader<'a>(s: &'a CpuStorage, l: &Layout, width: usize) -> Result<RowReader<'a>> {
    fn make<'a, T: candle_core::WithDType>(
        data: &'a [T],
        start: usize,
        width: usize,
    ) -> RowReader<'a> {
        Box::new(move |row, out| {
            let src = &data[start + row * width..start + (row + 1) * width];
            for (o, &x) in out.iter_mut().zip(src) {
                *o = x.to_f64();
            }
        })
    }
    let Some((start, _)) = l.contiguous_offsets() else {
        candle_core::bail!("{NAME}: input is not contiguous (the wrapper makes it so)");
    };
    Ok(match s {
        CpuStorage::F32(d) => make(d, start, width),
        CpuStorage::F64(d) => make(d, start, width),
        CpuStorage::BF16(d) => make(d, start, width),
        CpuStorage::F16(d) => make(d, start, width),
        other => candle_core::bail!("{NAME}: unsupported dtype {:?}", other.dtype()),
    })
}

fn storage_from_f64(dtype: DType, v: Vec<f64>) -> Result<CpuStorage> {
    fn cast<T: candle_core::WithDType>(v: &[f64]) -> Vec<T> {
        v.iter().map(|&x| T::from_f64(x)).collect()
    }
    Ok(match dtype {
        DType::F64 => CpuStorage::F64(v),
        DType::F32 => CpuStorage::F32(cast(&v)),
        DType::BF16 => CpuStorage::BF16(cast(&v)),
        DType::F16 => CpuStorage::F16(cast(&v)),
        other => candle_core::bail!("{NAME}: unsupported dtype {other:?}"),
    })
}

/// Run `f(row, out_row, scratch)` over every row, `width` outputs per row, on row blocks
/// spread over the available threads.
fn par_rows<T, F>(rows: usize, width: usize, out: &mut [T], f: F)
where
    T: Send,
    F: Fn(usize, &mut [T], &mut Scratch) + Sync,
{
    if rows == 0 || width == 0 {
        return;
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(rows);
    let per = rows.div_ceil(threads);
    std::thread::scope(|scope| {
        for (block, chunk) in out.chunks_mut(per * width).enumerate() {
            let f = &f;
            scope.spawn(move || {
                let mut scratch = Scratch::default();
                for (r, row_out) in chunk.chunks_mut(width).enumerate() {
                    f(block * per + r, row_out, &mut scratch);
                }
            });
        }
    });
}

/// Per-thread buffers of vocabulary size.
#[derive(Default)]
struct Scratch {
    /// Student logits row, then log_softmax(student / τ).
    s: Vec<f64>,
    /// Teacher row (logits, or top-k log-probs).
    t: Vec<f64>,
    /// d divergence / d student log-probs.
    g: Vec<f64>,
    /// d loss / d student logits of the row, before the cast to the output dtype.
    out: Vec<f64>,
}

impl Scratch {
    fn size(&mut self, v: usize, tw: usize, grad: bool) {
        self.s.resize(v, 0.0);
        self.t.resize(tw, 0.0);
        self.g.resize(v, 0.0);
        if grad {
            self.out.resize(v, 0.0);
        }
    }
}

/// In place: x <- log_softmax(x / temperature); returns nothing (rows are finite or −inf).
fn log_softmax_in_place(x: &mut [f64], temperature: f64) {
    for v in x.iter_mut() {
        *v /= temperature;
    }
    let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return;
    }
    let lse = max + x.iter().map(|&v| (v - max).exp()).sum::<f64>().ln();
    for v in x.iter_mut() {
        *v -= lse;
    }
}

fn logsumexp(xs: impl Iterator<Item = f64> + Clone) -> f64 {
    let max = xs.clone().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + xs.map(|v| (v - max).exp()).sum::<f64>().ln()
}

/// One entry of the divergence between log-probs `a` (student) and `b` (teacher): its term
/// and d term / d a. `sparse` selects TRL's support-masked form (mixture in probability space,
/// clamped at the smallest normal) over its `F.kl_div` form (mixture by log-sum-exp).
#[inline]
fn entry(beta: f64, a: f64, b: f64, sparse: bool) -> (f64, f64) {
    if beta == 0.0 {
        let pb = b.exp();
        let term = if pb > 0.0 { pb * (b - a) } else { 0.0 };
        (term, -pb)
    } else if beta == 1.0 {
        let pa = a.exp();
        let term = if pa > 0.0 { pa * (a - b) } else { 0.0 };
        (term, pa * (a - b + 1.0))
    } else {
        let (pa, pb) = (a.exp(), b.exp());
        let (m, through) = if sparse {
            let mix = (1.0 - beta) * pa + beta * pb;
            if mix > f64::MIN_POSITIVE {
                (mix.ln(), true)
            } else {
                (f64::MIN_POSITIVE.ln(), false)
            }
        } else {
            let (x, y) = (a + (-beta).ln_1p(), b + beta.ln());
            let hi = x.max(y);
            if hi == f64::NEG_INFINITY {
                (hi, true)
            } else {
                (hi + ((x - hi).exp() + (y - hi).exp()).ln(), true)
            }
        };
        let kt = if pb > 0.0 { pb * (b - m) } else { 0.0 };
        let ks = if pa > 0.0 { pa * (a - m) } else { 0.0 };
        // d/da of β e^b (b − m) + (1 − β) e^a (a − m) with dm/da = (1 − β) e^a / e^m collapses
        // to (1 − β) e^a (a − m); past the clamp m is constant.
        let g = if through {
            (1.0 - beta) * ks
        } else {
            (1.0 - beta) * (ks + pa)
        };
        (beta * kt + (1.0 - beta) * ks, g)
    }
}

/// Full-vocabulary row: s, t are log-probs; fills g = d D / d s when asked.
fn full_row(beta: f64, s: &[f64], t: &[f64], g: Option<&mut [f64]>) -> f64 {
    let mut d = 0.0;
    match g {
        Some(g) => {
            for ((gi, &a), &b) in g.iter_mut().zip(s).zip(t) {
                let (term, da) = entry(beta, a, b, false);
                d += term;
                *gi = da;
            }
        }
        None => {
            for (&a, &b) in s.iter().zip(t) {
                d += entry(beta, a, b, false).0;
            }
        }
    }
    d
}

/// Top-k row: `s` are the student's full log-probs, `ids`/`t` the teacher's slots. Fills
/// g = d D / d s (zero outside the support) when asked.
fn topk_row(
    beta: f64,
    add_tail: bool,
    s: &[f64],
    ids: &[u32],
    t: &[f64],
    g: Option<&mut [f64]>,
) -> f64 {
    let valid: Vec<usize> = (0..ids.len())
        .filter(|&k| t[k] > f64::NEG_INFINITY)
        .collect();
    let mut a: Vec<f64> = valid.iter().map(|&k| s[ids[k] as usize]).collect();
    let mut b: Vec<f64> = valid.iter().map(|&k| t[k]).collect();
    if valid.is_empty() {
        if let Some(g) = g {
            g.fill(0.0);
        }
        return 0.0;
    }
    // The tail bucket: log(1 − Σ e^x) of the log-sum clamped at −1e-7 (TRL's
    // `_add_tail_bucket`); `tail_live` = the clamp did not bite, so gradient passes.
    const TAIL_CLAMP: f64 = -1e-7;
    let mut tail_live = false;
    if add_tail {
        let la = logsumexp(a.iter().copied());
        let lb = logsumexp(b.iter().copied());
        tail_live = la <= TAIL_CLAMP;
        a.push((-(la.min(TAIL_CLAMP)).exp_m1()).ln());
        b.push((-(lb.min(TAIL_CLAMP)).exp_m1()).ln());
    } else {
        let la = logsumexp(a.iter().copied());
        let lb = logsumexp(b.iter().copied());
        a.iter_mut().for_each(|x| *x -= la);
        b.iter_mut().for_each(|x| *x -= lb);
    }
    let mut d = 0.0;
    let mut ga = Vec::with_capacity(a.len());
    for (&x, &y) in a.iter().zip(&b) {
        let (term, da) = entry(beta, x, y, true);
        d += term;
        ga.push(da);
    }
    if let Some(g) = g {
        g.fill(0.0);
        let kk = valid.len();
        if add_tail {
            // a_k = s[id_k]; a_tail = ln(1 − Σ e^{a_k}), d a_tail / d a_k = −e^{a_k − a_tail}.
            let (gt, at) = (ga[kk], a[kk]);
            for (j, &slot) in valid.iter().enumerate() {
                let through_tail = if tail_live {
                    gt * (a[j] - at).exp()
                } else {
                    0.0
                };
                g[ids[slot] as usize] += ga[j] - through_tail;
            }
        } else {
            // a_k = s[id_k] − lse_support(s): d a_k / d s[id_j] = δ_kj − e^{a_j}.
            let sum: f64 = ga.iter().sum();
            for (j, &slot) in valid.iter().enumerate() {
                g[ids[slot] as usize] += ga[j] - a[j].exp() * sum;
            }
        }
    }
    d
}

impl Spec {
    /// Teacher row width for vocabulary `v`.
    fn teacher_width(&self, v: usize) -> usize {
        self.topk.as_ref().map_or(v, |tk| tk.k)
    }

    /// Divergence of row `r` (scratch holds the raw student and teacher rows on entry); with
    /// `grad`, also d D / d student logits of the row, times `scale`, into `grad`.
    fn row(&self, r: &mut Scratch, row: usize, grad: Option<(&mut [f64], f64)>) -> f64 {
        log_softmax_in_place(&mut r.s, self.temperature);
        let want = grad.is_some();
        let d = match &self.topk {
            None => {
                log_softmax_in_place(&mut r.t, self.temperature);
                full_row(self.beta, &r.s, &r.t, want.then_some(&mut r.g[..]))
            }
            Some(tk) => {
                let ids = &tk.ids[row * tk.k..(row + 1) * tk.k];
                topk_row(
                    self.beta,
                    tk.add_tail,
                    &r.s,
                    ids,
                    &r.t,
                    want.then_some(&mut r.g[..]),
                )
            }
        };
        if let Some((out, scale)) = grad {
            // Through s = log_softmax(z / τ): dD/dz_j = (g_j − e^{s_j} Σ g) / τ.
            let sum: f64 = r.g.iter().sum();
            let c = scale / self.temperature;
            for ((o, &gj), &sj) in out.iter_mut().zip(&r.g).zip(&r.s) {
                *o = c * (gj - sj.exp() * sum);
            }
        }
        d
    }
}

impl CustomOp2 for DivergenceOp {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let spec = &self.spec;
        let tw = spec.teacher_width(v);
        let student = reader(s1, l1, v)?;
        let teacher = reader(s2, l2, tw)?;
        let mut out = vec![0f64; n];
        par_rows(n, 1, &mut out, |row, o, r| {
            if !spec.scored[row] {
                return;
            }
            r.size(v, tw, false);
            student(row, &mut r.s);
            teacher(row, &mut r.t);
            o[0] = spec.row(r, row, None);
        });
        Ok((storage_from_f64(s1.dtype(), out)?, Shape::from(n)))
    }

    fn bwd(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !student.track_op() {
            return Ok((None, None));
        }
        let op = DivergenceGradOp {
            spec: self.spec.clone(),
        };
        let g = student.apply_op3_no_bwd(teacher, &grad_res.contiguous()?, &op)?;
        Ok((Some(g), None))
    }
}

impl CustomOp3 for DivergenceGradOp {
    fn name(&self) -> &'static str {
        "ferrotune-distill-divergence-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let tw = self.spec.teacher_width(v);
        let student = reader(s1, l1, v)?;
        let teacher = reader(s2, l2, tw)?;
        let upstream = reader(s3, l3, 1)?;
        let rows = Rows {
            n,
            v,
            tw,
            student: &student,
            teacher: &teacher,
            upstream: &upstream,
        };
        let out = match s1.dtype() {
            DType::F64 => CpuStorage::F64(self.grad(&rows)),
            DType::F32 => CpuStorage::F32(self.grad(&rows)),
            DType::BF16 => CpuStorage::BF16(self.grad(&rows)),
            DType::F16 => CpuStorage::F16(self.grad(&rows)),
            other => candle_core::bail!("{NAME}: unsupported dtype {other:?}"),
        };
        Ok((out, Shape::from((n, v))))
    }
}

/// The backward's inputs, read row by row.
struct Rows<'a> {
    n: usize,
    v: usize,
    tw: usize,
    student: &'a RowReader<'a>,
    teacher: &'a RowReader<'a>,
    upstream: &'a RowReader<'a>,
}

impl DivergenceGradOp {
    /// d loss / d student (N, V), written straight into the output dtype (no f64 copy of the
    /// whole matrix).
    fn grad<T: candle_core::WithDType>(&self, rows: &Rows<'_>) -> Vec<T> {
        let spec = &self.spec;
        let mut out = vec![T::from_f64(0.0); rows.n * rows.v];
        par_rows(rows.n, rows.v, &mut out, |row, o, r| {
            if !spec.scored[row] {
                return;
            }
            let mut go = [0f64];
            (rows.upstream)(row, &mut go);
            r.size(rows.v, rows.tw, true);
            (rows.student)(row, &mut r.s);
            (rows.teacher)(row, &mut r.t);
            let mut buf = std::mem::take(&mut r.out);
            spec.row(r, row, Some((&mut buf, go[0])));
            for (dst, &x) in o.iter_mut().zip(&buf) {
                *dst = T::from_f64(x);
            }
            r.out = buf;
        });
        out
    }
}
