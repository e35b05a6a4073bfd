//! Tests of the custom ops in `ferrotune_nn::ops`: forward against the stock-op composites in
//! `ops::reference` and against PyTorch; gradients against PyTorch autograd (fixture written
//! by `fixtures/ops/make_op_fixtures.py`, float64 torch from float32 inputs) and against
//! central finite differences; frozen weights get no gradient; bf16 tracks f32.
//!
//! Does not test the layers built on the ops (see the layer tests).

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor, Var};
use ferrotune_nn::ops::{self, reference};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../fixtures/ops/ops.safetensors"
);

/// Forward agreement with the reference composite and with torch (max-abs relative).
const FWD_TOL: f32 = 1e-5;
/// Gradient agreement with torch autograd (max-abs relative).
const GRAD_TOL: f32 = 1e-4;

fn fixture() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(FIXTURE, &Device::Cpu).unwrap()
}

fn get(fx: &HashMap<String, Tensor>, key: &str) -> Tensor {
    fx.get(key)
        .unwrap_or_else(|| panic!("fixture has no {key}"))
        .clone()
}

fn scalar(fx: &HashMap<String, Tensor>, key: &str) -> f64 {
    get(fx, key).to_vec1::<f64>().unwrap()[0]
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// max |a - b| / max |b|: an error relative to the tensor's scale, so near-zero entries do
/// not make the bound meaningless, while any entry off by the tolerance still fails.
fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let (a, b) = (flat(a), flat(b));
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let e = max_rel(got, want);
    assert!(e <= tol, "{what}: max relative error {e:e} > {tol:e}");
}

type OpFn = dyn Fn(&[Tensor]) -> Result<Tensor>;

/// One fixture case: `inputs` in the order `f` takes them; `grads` the ones torch
/// differentiated (they become Vars here, the others stay plain tensors).
struct Case<'a> {
    name: &'a str,
    inputs: &'a [&'a str],
    grads: &'a [&'a str],
}

impl Case<'_> {
    fn tensors(&self, fx: &HashMap<String, Tensor>) -> (Vec<Tensor>, Vec<Option<Var>>) {
        let mut ts = Vec::new();
        let mut vars = Vec::new();
        for name in self.inputs {
            let t = get(fx, &format!("{}.{name}", self.name));
            if self.grads.contains(name) {
                let v = Var::from_tensor(&t).unwrap();
                ts.push(v.as_tensor().clone());
                vars.push(Some(v));
            } else {
                ts.push(t);
                vars.push(None);
            }
        }
        (ts, vars)
    }

    /// Output equals torch's y; every gradient equals torch's.
    fn check_against_torch(&self, fx: &HashMap<String, Tensor>, f: &OpFn) {
        let (ts, vars) = self.tensors(fx);
        let y = f(&ts).unwrap();
        assert_close(
            &format!("{} forward vs torch", self.name),
            &y,
            &get(fx, &format!("{}.y", self.name)),
            FWD_TOL,
        );
        let g = get(fx, &format!("{}.g", self.name));
        let grads = (y * g).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in self.inputs.iter().zip(&vars) {
            if let Some(v) = var {
                let got = grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{}: no grad for {name}", self.name));
                let want = get(fx, &format!("{}.d{name}", self.name));
                assert_close(
                    &format!("{} d{name} vs torch", self.name),
                    got,
                    &want,
                    GRAD_TOL,
                );
            }
        }
    }

    /// Backward agrees with central finite differences of L = sum(f(inputs) * g), every
    /// element of every differentiated input perturbed by +-h (f32 throughout).
    fn check_finite_differences(&self, fx: &HashMap<String, Tensor>, f: &OpFn, h: f32, tol: f32) {
        let (ts, vars) = self.tensors(fx);
        let g = get(fx, &format!("{}.g", self.name));
        let loss = |ts: &[Tensor]| -> f64 {
            let y = f(ts).unwrap().to_dtype(DType::F64).unwrap();
            (y * g.to_dtype(DType::F64).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let y = f(&ts).unwrap();
        let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, (name, var)) in self.inputs.iter().zip(&vars).enumerate() {
            let Some(v) = var else { continue };
            let analytic = flat(grads.get(v.as_tensor()).unwrap());
            let base = flat(&ts[i]);
            let mut numeric = Vec::with_capacity(base.len());
            for e in 0..base.len() {
                let mut probe = ts.clone();
                let mut at = |delta: f32| {
                    let mut p = base.clone();
                    p[e] += delta;
                    probe[i] = Tensor::from_vec(p, ts[i].dims(), &Device::Cpu).unwrap();
                    loss(&probe)
                };
                numeric.push(((at(h) - at(-h)) / (2.0 * h as f64)) as f32);
            }
            let shape = ts[i].dims();
            let numeric = Tensor::from_vec(numeric, shape, &Device::Cpu).unwrap();
            let analytic = Tensor::from_vec(analytic, shape, &Device::Cpu).unwrap();
            assert_close(
                &format!("{} d{name} vs finite differences", self.name),
                &analytic,
                &numeric,
                tol,
            );
        }
    }
}

/// Every op of the fixture with its inputs, the gradients torch computed, the op under test
/// and its reference composite.
fn cases(fx: &HashMap<String, Tensor>) -> Vec<(Case<'static>, Box<OpFn>, Box<OpFn>)> {
    let rms_eps = scalar(fx, "rms_norm.eps");
    let ln_eps = scalar(fx, "layer_norm.eps");
    let scale = scalar(fx, "attention.scale");
    let scale_kv = scalar(fx, "attention_kv.scale");
    let temp = scalar(fx, "logprobs.temperature");
    let targets = get(fx, "logprobs.targets");
    let targets2 = targets.clone();
    let targets3 = targets.clone();
    vec![
        (
            Case {
                name: "linear",
                inputs: &["x", "w", "b"],
                grads: &["x", "w", "b"],
            },
            Box::new(|t: &[Tensor]| ops::linear(&t[0], &t[1], Some(&t[2]))),
            Box::new(|t: &[Tensor]| reference::linear(&t[0], &t[1], Some(&t[2]))),
        ),
        (
            Case {
                name: "rms_norm",
                inputs: &["x", "w"],
                grads: &["x", "w"],
            },
            Box::new(move |t: &[Tensor]| ops::rms_norm(&t[0], &t[1], rms_eps)),
            Box::new(move |t: &[Tensor]| reference::rms_norm(&t[0], &t[1], rms_eps)),
        ),
        (
            Case {
                name: "layer_norm",
                inputs: &["x", "w", "b"],
                grads: &["x", "w", "b"],
            },
            Box::new(move |t: &[Tensor]| ops::layer_norm(&t[0], &t[1], &t[2], ln_eps)),
            Box::new(move |t: &[Tensor]| reference::layer_norm(&t[0], &t[1], &t[2], ln_eps)),
        ),
        (
            Case {
                name: "rope",
                inputs: &["x", "cos", "sin"],
                grads: &["x"],
            },
            Box::new(|t: &[Tensor]| ops::rope(&t[0], &t[1], &t[2])),
            Box::new(|t: &[Tensor]| reference::rope(&t[0], &t[1], &t[2])),
        ),
        (
            Case {
                name: "attention",
                inputs: &["q", "k", "v", "mask"],
                grads: &["q", "k", "v"],
            },
            Box::new(move |t: &[Tensor]| ops::attention(&t[0], &t[1], &t[2], Some(&t[3]), scale)),
            Box::new(move |t: &[Tensor]| {
                reference::attention(&t[0], &t[1], &t[2], Some(&t[3]), scale)
            }),
        ),
        (
            Case {
                name: "attention_kv",
                inputs: &["q", "k", "v", "mask"],
                grads: &["q", "k", "v"],
            },
            Box::new(move |t: &[Tensor]| {
                ops::attention(&t[0], &t[1], &t[2], Some(&t[3]), scale_kv)
            }),
            Box::new(move |t: &[Tensor]| {
                reference::attention(&t[0], &t[1], &t[2], Some(&t[3]), scale_kv)
            }),
        ),
        (
            Case {
                name: "swiglu",
                inputs: &["gate", "up"],
                grads: &["gate", "up"],
            },
            Box::new(|t: &[Tensor]| ops::swiglu(&t[0], &t[1])),
            Box::new(|t: &[Tensor]| reference::swiglu(&t[0], &t[1])),
        ),
        (
            Case {
                name: "gelu",
                inputs: &["x"],
                grads: &["x"],
            },
            Box::new(|t: &[Tensor]| ops::gelu_tanh(&t[0])),
            Box::new(|t: &[Tensor]| reference::gelu_tanh(&t[0])),
        ),
        (
            // Three rows per chunk: 7 rows make three chunks, the last one short.
            Case {
                name: "logprobs",
                inputs: &["hidden", "w"],
                grads: &["hidden", "w"],
            },
            Box::new(move |t: &[Tensor]| {
                ops::token_logprobs_chunked(&t[0], &t[1], &targets, temp, 3)
            }),
            Box::new(move |t: &[Tensor]| reference::token_logprobs(&t[0], &t[1], &targets2, temp)),
        ),
        (
            // Default chunking (one chunk here).
            Case {
                name: "logprobs",
                inputs: &["hidden", "w"],
                grads: &["hidden", "w"],
            },
            Box::new(move |t: &[Tensor]| ops::token_logprobs(&t[0], &t[1], &targets3, temp)),
            Box::new(|_: &[Tensor]| Err(candle_core::Error::Msg("no second reference".into()))),
        ),
    ]
}

#[test]
fn forward_matches_reference_composites() {
    let fx = fixture();
    for (case, op, reference) in cases(&fx) {
        let (ts, _) = case.tensors(&fx);
        if let Ok(want) = reference(&ts) {
            assert_close(
                &format!("{} vs reference composite", case.name),
                &op(&ts).unwrap(),
                &want,
                FWD_TOL,
            );
        }
    }
}

#[test]
fn forward_and_gradients_match_torch() {
    let fx = fixture();
    for (case, op, _) in cases(&fx) {
        case.check_against_torch(&fx, op.as_ref());
    }
}

#[test]
fn backward_matches_finite_differences() {
    let fx = fixture();
    for (case, op, _) in cases(&fx) {
        case.check_finite_differences(&fx, op.as_ref(), 1e-2, 2e-3);
    }
}

#[test]
fn linear_without_bias_matches_torch() {
    // Bias does not enter dx or dW, so torch's linear grads hold for the bias-free op too.
    let fx = fixture();
    let x = Var::from_tensor(&get(&fx, "linear.x")).unwrap();
    let w = Var::from_tensor(&get(&fx, "linear.w")).unwrap();
    let y = ops::linear(x.as_tensor(), w.as_tensor(), None).unwrap();
    let want_y = get(&fx, "linear.y")
        .broadcast_sub(&get(&fx, "linear.b"))
        .unwrap();
    assert_close("linear (no bias) forward", &y, &want_y, FWD_TOL);
    let grads = (y * get(&fx, "linear.g"))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_close(
        "linear (no bias) dx",
        grads.get(x.as_tensor()).unwrap(),
        &get(&fx, "linear.dx"),
        GRAD_TOL,
    );
    assert_close(
        "linear (no bias) dw",
        grads.get(w.as_tensor()).unwrap(),
        &get(&fx, "linear.dw"),
        GRAD_TOL,
    );
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // Deterministic pseudo-random values in [-1, 1) (splitmix64), no dependency needed.
    let mut s = seed;
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9e3779b97f4a7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
            ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

#[test]
fn frozen_weight_gets_no_gradient() {
    let x = Var::from_tensor(&randn(&[3, 4, 8], 1)).unwrap();
    let w = randn(&[6, 8], 2); // frozen: a plain tensor, not a Var
    let b = randn(&[6], 3);
    let nw = randn(&[8], 4);

    let y = ops::linear(x.as_tensor(), &w, Some(&b)).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(
        grads.get(&w).is_none(),
        "linear: frozen weight got a gradient"
    );
    assert!(
        grads.get(&b).is_none(),
        "linear: frozen bias got a gradient"
    );
    assert!(
        grads.get(x.as_tensor()).is_some(),
        "linear: tracked input got no gradient"
    );

    let y = ops::rms_norm(x.as_tensor(), &nw, 1e-6).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(
        grads.get(&nw).is_none(),
        "rms_norm: frozen weight got a gradient"
    );
    assert!(
        grads.get(x.as_tensor()).is_some(),
        "rms_norm: tracked input got no gradient"
    );

    // Control: candle's stock matmul does compute the frozen operand's gradient, which is
    // the waste the custom op avoids (so the assertions above are not vacuous).
    let wt = w.t().unwrap();
    let y = x.as_tensor().broadcast_matmul(&wt).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(
        grads.get(&wt).is_some(),
        "stock matmul no longer computes frozen grads?"
    );
}

#[test]
fn untracked_input_gets_no_gradient_but_tracked_weight_does() {
    // LoRA's A on a frozen embedding: x constant, A trainable.
    let x = randn(&[2, 3, 8], 5);
    let a = Var::from_tensor(&randn(&[4, 8], 6)).unwrap();
    let y = ops::linear(&x, a.as_tensor(), None).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&x).is_none());
    // d sum(x A^T) / dA[o, i] = sum over rows of x[:, i]
    let want = x
        .reshape((6, 8))
        .unwrap()
        .sum_keepdim(0)
        .unwrap()
        .broadcast_as((4, 8))
        .unwrap();
    assert_close("dA", grads.get(a.as_tensor()).unwrap(), &want, 1e-6);
}

#[test]
fn bf16_tracks_f32() {
    let fx = fixture();
    for (case, op, _) in cases(&fx) {
        let (ts, _) = case.tensors(&fx);
        let want = op(&ts).unwrap();
        // cos/sin stay f32 as the rope contract says; targets and masks are not floats we own.
        let half: Vec<Tensor> = ts
            .iter()
            .zip(case.inputs)
            .map(|(t, n)| {
                if matches!(*n, "cos" | "sin" | "mask") {
                    t.clone()
                } else {
                    t.to_dtype(DType::BF16).unwrap()
                }
            })
            .collect();
        let got = op(&half).unwrap();
        let want_dt = if case.name == "logprobs" {
            DType::F32
        } else {
            DType::BF16
        };
        assert_eq!(got.dtype(), want_dt, "{}: output dtype", case.name);
        // bf16 keeps 8 mantissa bits (relative step 2^-8 = 3.9e-3); inputs and output are
        // each rounded once, and sums over a few terms can add a little on top.
        assert_close(&format!("{} bf16 vs f32", case.name), &got, &want, 2e-2);
    }
}

#[test]
fn bf16_gradients_track_f32() {
    let fx = fixture();
    for (case, op, _) in cases(&fx) {
        let (ts, vars) = case.tensors(&fx);
        let g = get(&fx, &format!("{}.g", case.name));
        let grads = (op(&ts).unwrap() * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut half_vars = Vec::new();
        let half: Vec<Tensor> = ts
            .iter()
            .zip(case.inputs)
            .map(|(t, n)| {
                if matches!(*n, "cos" | "sin" | "mask") {
                    t.clone()
                } else {
                    let v = Var::from_tensor(&t.to_dtype(DType::BF16).unwrap()).unwrap();
                    half_vars.push(v.clone());
                    v.as_tensor().clone()
                }
            })
            .collect();
        let y = op(&half).unwrap();
        let gh = g.to_dtype(y.dtype()).unwrap();
        let hgrads = (y * gh).unwrap().sum_all().unwrap().backward().unwrap();
        let mut hv = half_vars.iter();
        for (name, var) in case.inputs.iter().zip(&vars) {
            let Some(v) = var else { continue };
            let h = hv.next().unwrap();
            let got = hgrads.get(h.as_tensor()).unwrap();
            assert_eq!(got.dtype(), DType::BF16, "{} d{name} dtype", case.name);
            assert_close(
                &format!("{} d{name} bf16 vs f32", case.name),
                got,
                grads.get(v.as_tensor()).unwrap(),
                5e-2,
            );
        }
    }
}

#[test]
fn non_contiguous_inputs_match_contiguous() {
    let fx = fixture();
    let (q, k, v) = (
        get(&fx, "attention.q"),
        get(&fx, "attention.k"),
        get(&fx, "attention.v"),
    );
    let mask = get(&fx, "attention.mask");
    let scale = scalar(&fx, "attention.scale");
    // (B, T, H, D) storage seen as (B, H, T, D), as the attention layer produces it.
    let strided = |t: &Tensor| {
        t.transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .transpose(1, 2)
            .unwrap()
    };
    let (qs, ks, vs) = (strided(&q), strided(&k), strided(&v));
    assert!(!qs.is_contiguous());
    let want = ops::attention(&q, &k, &v, Some(&mask), scale).unwrap();
    let got = ops::attention(&qs, &ks, &vs, Some(&mask), scale).unwrap();
    assert_close("attention strided", &got, &want, 0.0);
    let got = ops::rope(&qs, &get(&fx, "rope.cos"), &get(&fx, "rope.sin")).unwrap();
    let want = ops::rope(&q, &get(&fx, "rope.cos"), &get(&fx, "rope.sin")).unwrap();
    assert_close("rope strided", &got, &want, 0.0);
    // A weight stored transposed.
    let (x, w) = (get(&fx, "linear.x"), get(&fx, "linear.w"));
    let wt = w.t().unwrap().contiguous().unwrap().t().unwrap();
    assert_close(
        "linear strided w",
        &ops::linear(&x, &wt, None).unwrap(),
        &ops::linear(&x, &w, None).unwrap(),
        0.0,
    );
}

#[test]
fn attention_many_blocks_matches_composite() {
    // 150 queries cross several query blocks; Tk > Tq and left padding exercise the causal
    // key limit of each block. The composite's gradients come from candle's stock autograd,
    // an independent implementation of the same math (torch covers the formulas above).
    let (b, hq, hkv, tq, tk, d) = (2, 4, 2, 150, 170, 16);
    let q = Var::from_tensor(&randn(&[b, hq, tq, d], 11)).unwrap();
    let k = Var::from_tensor(&randn(&[b, hkv, tk, d], 12)).unwrap();
    let v = Var::from_tensor(&randn(&[b, hkv, tk, d], 13)).unwrap();
    let mut m = vec![1f32; b * tk];
    m[tk..tk + 30].fill(0.0); // batch 1: 30 left-pad keys
    let mask = Tensor::from_vec(m, (b, tk), &Device::Cpu).unwrap();
    let g = randn(&[b, hq, tq, d], 14);
    let run = |f: fn(&Tensor, &Tensor, &Tensor, Option<&Tensor>, f64) -> Result<Tensor>| {
        let y = f(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            Some(&mask),
            0.25,
        )
        .unwrap();
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gs: Vec<Tensor> = [&q, &k, &v]
            .iter()
            .map(|t| grads.get(t.as_tensor()).unwrap().clone())
            .collect();
        (y, gs)
    };
    let (y, gs) = run(ops::attention);
    let (ry, rgs) = run(reference::attention);
    assert_close("attention blocks forward", &y, &ry, FWD_TOL);
    for (name, (a, r)) in ["dq", "dk", "dv"].iter().zip(gs.iter().zip(&rgs)) {
        assert_close(&format!("attention blocks {name}"), a, r, GRAD_TOL);
    }
}

#[test]
fn attention_window_and_segments_match_composite() {
    // A window of 37 and segment edges that fall inside query blocks (blocks are 64 rows), with
    // left padding in batch 1 and Tk > Tq (a cached prefix): the block's first visible key moves
    // with the window and segments hide keys inside it.
    let (b, hq, hkv, tq, tk, d) = (2, 4, 2, 150, 170, 16);
    let q = Var::from_tensor(&randn(&[b, hq, tq, d], 41)).unwrap();
    let k = Var::from_tensor(&randn(&[b, hkv, tk, d], 42)).unwrap();
    let v = Var::from_tensor(&randn(&[b, hkv, tk, d], 43)).unwrap();
    let mut m = vec![1f32; b * tk];
    m[tk..tk + 30].fill(0.0);
    let mask = Tensor::from_vec(m, (b, tk), &Device::Cpu).unwrap();
    let seg: Vec<u32> = (0..b * tk)
        .map(|i| {
            let (bi, j) = (i / tk, i % tk);
            let edges: &[usize] = if bi == 0 { &[50, 101, 140] } else { &[70, 90] };
            edges.iter().filter(|&&e| j >= e).count() as u32
        })
        .collect();
    let segments = Tensor::from_vec(seg, (b, tk), &Device::Cpu).unwrap();
    let g = randn(&[b, hq, tq, d], 44);
    for (what, masks) in [
        (
            "window",
            ops::AttnMask {
                key_mask: Some(&mask),
                window: Some(37),
                segments: None,
            },
        ),
        (
            "segments",
            ops::AttnMask {
                key_mask: Some(&mask),
                window: None,
                segments: Some(&segments),
            },
        ),
        (
            "window 1 + segments",
            ops::AttnMask {
                key_mask: None,
                window: Some(1),
                segments: Some(&segments),
            },
        ),
        (
            "window + segments",
            ops::AttnMask {
                key_mask: Some(&mask),
                window: Some(37),
                segments: Some(&segments),
            },
        ),
    ] {
        type Masked = fn(&Tensor, &Tensor, &Tensor, &ops::AttnMask<'_>, f64) -> Result<Tensor>;
        let run = |f: Masked| {
            let y = f(q.as_tensor(), k.as_tensor(), v.as_tensor(), &masks, 0.25).unwrap();
            let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let gs: Vec<Tensor> = [&q, &k, &v]
                .iter()
                .map(|t| grads.get(t.as_tensor()).unwrap().clone())
                .collect();
            (y, gs)
        };
        let (y, gs) = run(ops::attention_masked);
        let (ry, rgs) = run(reference::attention_masked);
        assert_close(&format!("attention {what} forward"), &y, &ry, FWD_TOL);
        for (name, (a, r)) in ["dq", "dk", "dv"].iter().zip(gs.iter().zip(&rgs)) {
            assert_close(&format!("attention {what} {name}"), a, r, GRAD_TOL);
        }
    }
}

#[test]
fn packed_segments_equal_each_sequence_alone() {
    // Three sequences packed into one row attend exactly as each does on its own.
    let (hq, hkv, d) = (4, 2, 8);
    let lens = [5usize, 9, 3];
    let t: usize = lens.iter().sum();
    let q = randn(&[1, hq, t, d], 51);
    let k = randn(&[1, hkv, t, d], 52);
    let v = randn(&[1, hkv, t, d], 53);
    let seg: Vec<u32> = lens
        .iter()
        .enumerate()
        .flat_map(|(i, &n)| std::iter::repeat_n(i as u32, n))
        .collect();
    let segments = Tensor::from_vec(seg, (1, t), &Device::Cpu).unwrap();
    let masks = ops::AttnMask {
        segments: Some(&segments),
        ..Default::default()
    };
    let packed = ops::attention_masked(&q, &k, &v, &masks, 0.3).unwrap();
    let mut start = 0;
    for n in lens {
        let part = |x: &Tensor| x.narrow(2, start, n).unwrap();
        let alone = ops::attention(&part(&q), &part(&k), &part(&v), None, 0.3).unwrap();
        assert_close(&format!("segment at {start}"), &part(&packed), &alone, 1e-6);
        start += n;
    }
    let plain = ops::attention(&q, &k, &v, None, 0.3).unwrap();
    let leak = (plain.narrow(2, 5, 9).unwrap() - packed.narrow(2, 5, 9).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(leak > 1e-3, "segments changed nothing ({leak})");
}

#[test]
fn target_outside_vocab_is_an_error() {
    let h = randn(&[3, 4], 21);
    let w = randn(&[5, 4], 22);
    let t = Tensor::new(&[0u32, 5, 1], &Device::Cpu).unwrap();
    let err = ops::token_logprobs(&h, &w, &t, 1.0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("row 1") && err.contains("5"),
        "unexpected error: {err}"
    );
    let t = Tensor::new(&[0u32, 1, 1], &Device::Cpu).unwrap();
    assert!(ops::token_logprobs(&h, &w, &t, 0.0).is_err());
}

#[test]
fn attention_without_mask_and_single_query_match_composite() {
    let (b, hq, hkv, tk, d) = (2, 6, 2, 9, 8);
    let k = randn(&[b, hkv, tk, d], 31);
    let v = randn(&[b, hkv, tk, d], 32);
    for tq in [tk, 4, 1] {
        let q = randn(&[b, hq, tq, d], 33);
        let got = ops::attention(&q, &k, &v, None, 0.3).unwrap();
        let want = reference::attention(&q, &k, &v, None, 0.3).unwrap();
        assert_close(&format!("attention no mask, Tq={tq}"), &got, &want, FWD_TOL);
    }
}

#[test]
fn rope_batch_one_cos_sin_broadcasts() {
    let fx = fixture();
    let x = get(&fx, "rope.x"); // (2, 4, 5, 8)
    let cos1 = get(&fx, "rope.cos").narrow(0, 0, 1).unwrap(); // (1, 5, 4)
    let sin1 = get(&fx, "rope.sin").narrow(0, 0, 1).unwrap();
    let cos2 = cos1.broadcast_as((2, 5, 4)).unwrap();
    let sin2 = sin1.broadcast_as((2, 5, 4)).unwrap();
    let got = ops::rope(&x, &cos1, &sin1).unwrap();
    let want = ops::rope(&x, &cos2, &sin2).unwrap();
    assert_close("rope with batch-1 cos/sin", &got, &want, 0.0);
    // And the batch-2 result is the reference composite's.
    let want = reference::rope(&x, &cos2, &sin2).unwrap();
    assert_close("rope broadcast vs composite", &got, &want, FWD_TOL);
}

/// Decode-sized inputs (a few rows: one per sequence, or a speculative verification's k + 1)
/// take their own path; it must equal the composite reference (itself checked against torch
/// above) on both sides of the row threshold, with and without bias, serial and parallel, and
/// with an inner size that is not a multiple of the SIMD width.
#[test]
fn few_row_linear_matches_reference() {
    for (rows, k, n) in [
        (1, 300, 70),
        (2, 300, 70),
        (5, 33, 9),
        (8, 300, 70),
        (9, 300, 70),
        (3, 1024, 1024),
    ] {
        let x = randn(&[rows, k], 1 + rows as u64);
        let w = randn(&[n, k], 7);
        let b = randn(&[n], 11);
        for bias in [None, Some(&b)] {
            let got = ops::linear(&x, &w, bias).unwrap();
            let want = reference::linear(&x, &w, bias).unwrap();
            assert_close(
                &format!("linear {rows}x{k} -> {n}, bias {}", bias.is_some()),
                &got,
                &want,
                FWD_TOL,
            );
        }
    }
}

/// The fused LoRA linear (base + adapter in one op) equals the same math composed from stock
/// candle ops, forward and gradients of x, A and B, with and without bias and dropout, for a
/// decode-sized and a training-sized batch; the frozen W and b get no gradient.
#[test]
fn lora_linear_matches_stock_composite() {
    let (r, k, n, scale) = (4, 24, 10, 2.5f64);
    for rows in [3usize, 40] {
        for (bias_on, drop) in [(false, None), (true, None), (true, Some((0.25f32, 99u64)))] {
            let what = format!("rows {rows}, bias {bias_on}, dropout {drop:?}");
            let x = Var::from_tensor(&randn(&[rows / 2 + 1, 2, k], 21)).unwrap();
            let w = randn(&[n, k], 22);
            let b = randn(&[n], 23);
            let a = Var::from_tensor(&randn(&[r, k], 24)).unwrap();
            let bm = Var::from_tensor(&randn(&[n, r], 25)).unwrap();
            let bias = bias_on.then_some(&b);
            let up = randn(&[rows / 2 + 1, 2, n], 26); // upstream gradient weights

            let lora = ops::LoraParts {
                a: a.as_tensor(),
                b: bm.as_tensor(),
                scale,
                dropout: drop,
            };
            let got = ops::lora_linear(x.as_tensor(), &w, bias, &lora).unwrap();
            let g_got = (&got * &up).unwrap().sum_all().unwrap().backward().unwrap();

            let xt = x.as_tensor();
            let xd = match drop {
                Some((p, seed)) => {
                    let mask = ferrotune_nn::dropout_mask(xt.elem_count(), p, seed);
                    let mask = Tensor::from_vec(mask, xt.shape(), &Device::Cpu).unwrap();
                    (xt * mask).unwrap()
                }
                None => xt.clone(),
            };
            let base = reference::linear(xt, &w, bias).unwrap();
            let xa = xd.broadcast_matmul(&a.as_tensor().t().unwrap()).unwrap();
            let xab = xa.broadcast_matmul(&bm.as_tensor().t().unwrap()).unwrap();
            let want = (base + (xab * scale).unwrap()).unwrap();
            let g_want = (&want * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();

            assert_close(&format!("{what}: y"), &got, &want, FWD_TOL);
            for (name, t) in [("dx", xt), ("dA", a.as_tensor()), ("dB", bm.as_tensor())] {
                assert_close(
                    &format!("{what}: {name}"),
                    g_got.get(t).unwrap(),
                    g_want.get(t).unwrap(),
                    GRAD_TOL,
                );
            }
            assert!(g_got.get(&w).is_none(), "{what}: frozen W got a gradient");
            assert!(g_got.get(&b).is_none(), "{what}: frozen b got a gradient");
        }
    }
}

/// A tracked base weight is refused by the fused op (it would silently get no gradient).
#[test]
fn lora_linear_refuses_a_tracked_base() {
    let x = randn(&[2, 8], 1);
    let w = Var::from_tensor(&randn(&[3, 8], 2)).unwrap();
    let (a, b) = (randn(&[2, 8], 3), randn(&[3, 2], 4));
    let lora = ops::LoraParts {
        a: &a,
        b: &b,
        scale: 1.0,
        dropout: None,
    };
    let err = ops::lora_linear(&x, w.as_tensor(), None, &lora).unwrap_err();
    assert!(err.to_string().contains("frozen"), "{err}");
}
