//! Step helpers: clipping against `torch.nn.utils.clip_grad_norm_` (fixture written by
//! `fixtures/train/make_optim_fixtures.py`), non-finite detection and the skip guard, and the
//! accumulation invariant batch 1 × accumulation 8 = batch 8 × accumulation 1 on a toy linear
//! language model with a token-mean loss over rows of different lengths.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};
use ferrotune_train::step::{
    all_finite, clip_grad_norm, first_non_finite, grad_norm, token_mean_scale, GradAccumulator,
    NonFiniteGuard, StepAction, StepError,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/train");

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn named(vars: &[Var]) -> Vec<(String, Var)> {
    vars.iter()
        .enumerate()
        .map(|(i, v)| (format!("p{i}"), v.clone()))
        .collect()
}

#[test]
fn clip_matches_torch_clip_grad_norm() {
    let t: HashMap<String, Tensor> =
        candle_core::safetensors::load(format!("{DIR}/clip.safetensors"), &Device::Cpu).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{DIR}/clip.json")).unwrap())
            .unwrap();
    let mut clipped_cases = 0;
    let mut worst = 0.0f64;
    for case in meta["cases"].as_array().unwrap() {
        let c = case["case"].as_u64().unwrap();
        let max_norm = case["max_norm"].as_f64().unwrap();
        let want_norm = case["total_norm"].as_f64().unwrap();
        let grads: Vec<Tensor> = (0..3)
            .map(|i| t[&format!("{c}.grad.{i}")].clone())
            .collect();
        let vars: Vec<Var> = grads
            .iter()
            .map(|g| Var::zeros(g.shape(), DType::F32, &Device::Cpu).unwrap())
            .collect();
        let params = named(&vars);
        let mut store = GradStore::default();
        for (v, g) in vars.iter().zip(&grads) {
            store.insert(v.as_tensor(), g.clone());
        }
        let measured = grad_norm(&store, &params).unwrap();
        let norm = clip_grad_norm(&mut store, &params, max_norm).unwrap();
        assert_eq!(measured, norm);
        worst = worst.max((norm - want_norm).abs() / want_norm);
        assert!(
            (norm - want_norm).abs() <= 1e-6 * want_norm.max(1.0),
            "case {c}: {norm} vs {want_norm}"
        );
        clipped_cases += (want_norm > max_norm) as usize;
        for (i, v) in vars.iter().enumerate() {
            let want = flat(&t[&format!("{c}.clipped.{i}")]);
            let got = flat(store.get(v.as_tensor()).unwrap());
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                    "case {c} grad {i}: {a} vs {b}"
                );
            }
        }
    }
    assert!(
        clipped_cases >= 2,
        "the fixture must exercise actual clipping"
    );
    println!("clip vs torch: worst relative norm error {worst:.3e}");
}

#[test]
fn non_finite_gradients_are_found_and_left_alone_by_clip() {
    let dev = Device::Cpu;
    let a = Var::zeros(3, DType::F32, &dev).unwrap();
    let b = Var::zeros(2, DType::F32, &dev).unwrap();
    let params = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
    let mut store = GradStore::default();
    store.insert(a.as_tensor(), Tensor::new(&[1f32, 2., 3.], &dev).unwrap());
    store.insert(b.as_tensor(), Tensor::new(&[4f32, 5.], &dev).unwrap());
    assert!(all_finite(&store, &params).unwrap());
    assert_eq!(first_non_finite(&store, &params).unwrap(), None);

    store.insert(b.as_tensor(), Tensor::new(&[f32::NAN, 5.], &dev).unwrap());
    assert!(!all_finite(&store, &params).unwrap());
    assert_eq!(
        first_non_finite(&store, &params).unwrap().as_deref(),
        Some("b")
    );
    let norm = clip_grad_norm(&mut store, &params, 1.0).unwrap();
    assert!(norm.is_nan());
    assert_eq!(flat(store.get(a.as_tensor()).unwrap()), vec![1., 2., 3.]);

    store.insert(
        b.as_tensor(),
        Tensor::new(&[f32::INFINITY, 5.], &dev).unwrap(),
    );
    assert_eq!(
        clip_grad_norm(&mut store, &params, 1.0).unwrap(),
        f64::INFINITY
    );
    // Huge but finite: the f64 sum of squares does not overflow to a false alarm.
    store.insert(b.as_tensor(), Tensor::new(&[3e38f32, 3e38], &dev).unwrap());
    assert!(clip_grad_norm(&mut store, &params, 1.0)
        .unwrap()
        .is_finite());
    assert!(matches!(
        clip_grad_norm(&mut store, &params, 0.0),
        Err(StepError::MaxNorm(_))
    ));
}

#[test]
fn guard_skips_then_fails_after_k_in_a_row() {
    let mut g = NonFiniteGuard::new(3);
    assert_eq!(g.observe(0, Some("w")).unwrap(), StepAction::Skip);
    assert_eq!(g.observe(1, Some("w")).unwrap(), StepAction::Skip);
    assert_eq!(g.observe(2, None).unwrap(), StepAction::Apply); // resets the run
    assert_eq!(g.consecutive(), 0);
    assert_eq!(g.observe(3, Some("w")).unwrap(), StepAction::Skip);
    assert_eq!(g.observe(4, Some("w")).unwrap(), StepAction::Skip);
    let err = g.observe(5, Some("layers.0.q_proj.lora_B")).unwrap_err();
    assert!(matches!(
        err,
        StepError::NonFinite {
            step: 5,
            consecutive: 3,
            ..
        }
    ));
    assert!(err.to_string().contains("layers.0.q_proj.lora_B"), "{err}");
    assert_eq!(g.total_skipped(), 4);

    let mut strict = NonFiniteGuard::new(1);
    assert!(strict.observe(0, Some("w")).is_err());
}

/// Toy LM: logits = x W^T + b over V classes at every position; loss = summed NLL of the
/// masked positions times `scale`. Returns (loss, logits).
fn toy_loss(
    x: &Tensor,
    y: &Tensor,
    mask: &Tensor,
    w: &Var,
    b: &Var,
    scale: f64,
) -> (Tensor, Tensor) {
    let (bsz, t, h) = x.dims3().unwrap();
    let x2 = x.reshape((bsz * t, h)).unwrap(); // (B*T, H)
    let logits = x2
        .matmul(&w.as_tensor().t().unwrap())
        .unwrap()
        .broadcast_add(b.as_tensor())
        .unwrap(); // (B*T, V)
    let max = logits.max_keepdim(D::Minus1).unwrap();
    let shifted = logits.broadcast_sub(&max).unwrap();
    let lse = shifted
        .exp()
        .unwrap()
        .sum_keepdim(D::Minus1)
        .unwrap()
        .log()
        .unwrap(); // (B*T, 1)
    let logp = shifted.broadcast_sub(&lse).unwrap(); // (B*T, V)
    let y2 = y.reshape((bsz * t, 1)).unwrap(); // (B*T, 1)
    let picked = logp.gather(&y2, 1).unwrap().reshape(bsz * t).unwrap(); // (B*T,)
    let m = mask.reshape(bsz * t).unwrap(); // (B*T,)
    let nll_sum = (picked * m).unwrap().sum_all().unwrap().neg().unwrap();
    ((nll_sum * scale).unwrap(), logits)
}

#[test]
fn batch1_accum8_equals_batch8_accum1() {
    let dev = Device::Cpu;
    let (bsz, t, h, v) = (8usize, 6usize, 5usize, 7usize);
    let mut rng = StdRng::seed_from_u64(7);
    let mut randn =
        |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect() };
    let x = Tensor::from_vec(randn(bsz * t * h), (bsz, t, h), &dev).unwrap(); // (B, T, H)
    let w = Var::from_tensor(&Tensor::from_vec(randn(v * h), (v, h), &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::from_vec(randn(v), v, &dev).unwrap()).unwrap();
    let ys: Vec<u32> = (0..bsz * t).map(|i| ((i * 5 + 3) % v) as u32).collect();
    let y = Tensor::from_vec(ys, (bsz, t), &dev).unwrap(); // (B, T)
                                                           // Row i has 1 + i % 6 loss tokens: lengths differ, so the rule for scaling matters.
    let mask: Vec<f32> = (0..bsz)
        .flat_map(|i| (0..t).map(move |j| (j <= i % 6) as u8 as f32))
        .collect();
    let total_tokens = mask.iter().filter(|&&m| m > 0.0).count();
    let mask = Tensor::from_vec(mask, (bsz, t), &dev).unwrap(); // (B, T)
    let params = vec![("w".to_string(), w.clone()), ("b".to_string(), b.clone())];

    // Batch 8 × accumulation 1: token mean over the whole batch.
    let (loss, _) = toy_loss(&x, &y, &mask, &w, &b, 1.0 / total_tokens as f64);
    let full = loss.backward().unwrap();

    // Batch 1 × accumulation 8, each micro-batch scaled by 1 / (tokens of the whole batch).
    let scale = token_mean_scale(total_tokens).unwrap();
    // A Var the loss depends on but that is not trainable: its gradient must not be kept.
    let frozen = Var::new(1.0f32, &dev).unwrap();
    let mut acc = GradAccumulator::new(&params);
    for i in 0..bsz {
        let r = |t: &Tensor| t.narrow(0, i, 1).unwrap();
        let (loss, _) = toy_loss(&r(&x), &r(&y), &r(&mask), &w, &b, scale);
        let loss = (loss * frozen.as_tensor()).unwrap();
        let g = loss.backward().unwrap();
        assert!(g.get(frozen.as_tensor()).is_some());
        acc.add(&g).unwrap();
    }
    assert_eq!(acc.micro_batches(), bsz);
    let summed = acc.take();
    assert_eq!(acc.micro_batches(), 0);
    assert!(
        summed.get(frozen.as_tensor()).is_none(),
        "a non-trainable Var's grad was kept"
    );
    assert!(
        acc.take().get(w.as_tensor()).is_none(),
        "take() must reset the sums"
    );

    let mut worst = 0.0f32;
    for (name, var) in &params {
        let a = flat(full.get(var.as_tensor()).unwrap());
        let s = flat(summed.get(var.as_tensor()).unwrap());
        for (p, q) in a.iter().zip(&s) {
            worst = worst.max((p - q).abs());
        }
        assert!(
            worst <= 1e-6,
            "{name}: batch-8 vs accumulated grads differ by {worst}"
        );
        assert!(
            a.iter().any(|x| x.abs() > 1e-3),
            "{name}: gradient is trivially zero"
        );
    }
    println!("accumulation: max |batch8 - 8 x batch1| = {worst:.3e}");

    // The tempting rule (each micro-batch's own token mean / 8) gives a different gradient.
    let mut wrong = GradAccumulator::new(&params);
    for i in 0..bsz {
        let r = |t: &Tensor| t.narrow(0, i, 1).unwrap();
        let n_i = (1 + i % 6) as f64;
        let (loss, _) = toy_loss(&r(&x), &r(&y), &r(&mask), &w, &b, 1.0 / (n_i * bsz as f64));
        wrong.add(&loss.backward().unwrap()).unwrap();
    }
    let wrong = wrong.take();
    let a = flat(full.get(w.as_tensor()).unwrap());
    let bad = flat(wrong.get(w.as_tensor()).unwrap());
    let diff = a
        .iter()
        .zip(&bad)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0f32, f32::max);
    assert!(
        diff > 1e-3,
        "per-micro-batch mean should differ, got {diff}"
    );
    assert!(matches!(token_mean_scale(0), Err(StepError::NoLossTokens)));
}
