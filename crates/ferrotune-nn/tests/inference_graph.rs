//! Forward passes outside training build no autograd graph. A graph kept by a rollout's
//! activations grows with every decoding step (through the KV cache it chains each step to the
//! one before): a 64-completion GRPO rollout of SmolLM2-135M went past 24 GB before this. The
//! values must not change, and a training forward must still reach the adapter.

use candle_core::{DType, Device, Result, Tensor, Var};
use ferrotune_nn::{KvCache, Linear, LoraAdapter, Mode};

fn randn(shape: &[usize], seed: u64) -> Result<Tensor> {
    // A fixed, seed-dependent pattern; the values only need to be nonzero and distinct.
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| (((i as u64 + 1) * (seed * 2 + 7919)) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// A LoRA slot (out 6, in 5, r 2) with a nonzero B, so the adapter changes the output; the
/// base is frozen (a plain tensor) or trainable (a `Var`, the composed path).
fn slot(trainable_base: bool) -> Result<Linear> {
    let w = randn(&[6, 5], 1)?;
    let weight = if trainable_base {
        Var::from_tensor(&w)?.as_tensor().clone()
    } else {
        w
    };
    Ok(Linear {
        path: "model.layers.0.self_attn.q_proj".into(),
        weight,
        bias: Some(randn(&[6], 2)?),
        lora: Some(LoraAdapter {
            a: Var::from_tensor(&randn(&[2, 5], 3)?)?,
            b: Var::from_tensor(&randn(&[6, 2], 4)?)?,
            scale: 2.0,
            dropout: 0.0,
        }),
    })
}

#[test]
fn eval_forward_builds_no_graph_and_train_forward_still_does() -> Result<()> {
    for trainable_base in [false, true] {
        let lin = slot(trainable_base)?;
        let x = randn(&[3, 4, 5], 5)?;
        let train = lin.forward(&x, Mode::TRAIN)?;
        for (name, mode) in [("eval", Mode::EVAL), ("reference", Mode::REFERENCE)] {
            let y = lin.forward(&x, mode)?;
            assert!(
                !y.track_op(),
                "{name} forward (trainable base {trainable_base}) built a graph"
            );
        }
        // Same values with and without the graph.
        let eval = lin.forward(&x, Mode::EVAL)?;
        let diff = (&train - &eval)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "trainable base {trainable_base}");
        // Training still reaches A and B.
        assert!(train.track_op());
        let grads = train.sum_all()?.backward()?;
        let l = lin.lora.as_ref().unwrap();
        for (name, v) in [("A", &l.a), ("B", &l.b)] {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
            assert!(norm > 0.0, "zero gradient for {name}");
        }
    }
    Ok(())
}

#[test]
fn kv_cache_holds_no_graph() -> Result<()> {
    let var = Var::from_tensor(&randn(&[1, 2, 3, 4], 6)?)?;
    let k = (var.as_tensor() * 2.0)?;
    assert!(k.track_op());
    let mut cache = KvCache::new(1);
    let (k1, v1) = cache.append(0, &k, &k)?;
    assert!(!k1.track_op() && !v1.track_op());
    let (k2, v2) = cache.append(0, &k, &k)?;
    assert!(!k2.track_op() && !v2.track_op());
    assert_eq!(k2.dims(), &[1, 2, 6, 4]);
    let want = Tensor::cat(&[&k, &k], 2)?;
    let diff = (&want - &k2)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert_eq!(diff, 0.0);
    assert_eq!(v2.dtype(), DType::F32);
    Ok(())
}
