//! Timing of each op, forward + backward, at one SmolLM2-135M layer's shapes for a LoRA step
//! (B=4, T=128: M=512 tokens, hidden 576, MLP 1536, 9 query / 3 kv heads of 64, vocab 49152),
//! against the stock-op composites in `ops::reference`. PyTorch's numbers for the same shapes
//! come from `fixtures/ops/bench_ops_torch.py`.
//!
//! Not a correctness test (see tests/ops.rs), so ignored by default:
//!     cargo test --release -p ferrotune-nn --test ops_bench -- --ignored --nocapture

use std::time::Instant;

use candle_core::{Device, Result, Tensor, Var};
use ferrotune_nn::ops::{self, reference};

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1f32, shape, &Device::Cpu).unwrap()
}

/// Median wall time in ms of `f` (forward, sum, backward) over `iters` runs after a warm-up.
fn time(iters: usize, f: impl Fn() -> Result<()>) -> f64 {
    f().unwrap();
    let mut ms: Vec<f64> = (0..iters)
        .map(|_| {
            let t0 = Instant::now();
            f().unwrap();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    ms[iters / 2]
}

fn report(name: &str, ours: f64, stock: f64) {
    println!(
        "{name:<34} ours {ours:>8.2} ms   composite {stock:>8.2} ms   speed-up {:>5.2}x",
        stock / ours
    );
}

#[test]
#[ignore]
fn bench_ops() {
    let (b, t, h, i, hq, hkv, d, v) = (4, 128, 576, 1536, 9, 3, 64, 49152);
    let m = b * t;
    let iters = 7;
    let step = |y: Tensor| -> Result<()> {
        y.sum_all()?.backward()?;
        Ok(())
    };

    // Frozen base projection, tracked input (a LoRA step's dominant cost).
    let x = Var::from_tensor(&randn(&[b, t, h])).unwrap();
    let w = randn(&[i, h]);
    let ours = time(iters, || step(ops::linear(x.as_tensor(), &w, None)?));
    let stock = time(iters, || step(reference::linear(x.as_tensor(), &w, None)?));
    report("linear 576->1536 frozen W", ours, stock);
    let ours = time(iters, || ops::linear(x.as_tensor(), &w, None).map(|_| ()));
    let stock = time(iters, || {
        reference::linear(x.as_tensor(), &w, None).map(|_| ())
    });
    report("  forward only", ours, stock);

    let nw = randn(&[h]);
    let ours = time(iters, || step(ops::rms_norm(x.as_tensor(), &nw, 1e-5)?));
    let stock = time(iters, || {
        step(reference::rms_norm(x.as_tensor(), &nw, 1e-5)?)
    });
    report("rms_norm (512, 576)", ours, stock);

    let gate = Var::from_tensor(&randn(&[b, t, i])).unwrap();
    let up = Var::from_tensor(&randn(&[b, t, i])).unwrap();
    let ours = time(iters, || {
        step(ops::swiglu(gate.as_tensor(), up.as_tensor())?)
    });
    let stock = time(iters, || {
        step(reference::swiglu(gate.as_tensor(), up.as_tensor())?)
    });
    report("swiglu (512, 1536)", ours, stock);

    let q = Var::from_tensor(&randn(&[b, hq, t, d])).unwrap();
    let k = Var::from_tensor(&randn(&[b, hkv, t, d])).unwrap();
    let vv = Var::from_tensor(&randn(&[b, hkv, t, d])).unwrap();
    let cos = randn(&[b, t, d / 2]);
    let sin = randn(&[b, t, d / 2]);
    let ours = time(iters, || step(ops::rope(q.as_tensor(), &cos, &sin)?));
    let stock = time(iters, || step(reference::rope(q.as_tensor(), &cos, &sin)?));
    report("rope (4, 9, 128, 64)", ours, stock);

    let mask = Tensor::ones((b, t), candle_core::DType::F32, &Device::Cpu).unwrap();
    let scale = 1.0 / (d as f64).sqrt();
    let ours = time(iters, || {
        step(ops::attention(
            q.as_tensor(),
            k.as_tensor(),
            vv.as_tensor(),
            Some(&mask),
            scale,
        )?)
    });
    let stock = time(iters, || {
        step(reference::attention(
            q.as_tensor(),
            k.as_tensor(),
            vv.as_tensor(),
            Some(&mask),
            scale,
        )?)
    });
    report("attention (4, 9/3, 128, 64)", ours, stock);

    // The LM head: frozen (V, H) weight, every position scored.
    let hid = Var::from_tensor(&randn(&[m, h])).unwrap();
    let lm = (randn(&[v, h]) * 0.05).unwrap();
    let targets = Tensor::from_vec(
        (0..m as u32).map(|r| (r * 7919) % v as u32).collect(),
        m,
        &Device::Cpu,
    )
    .unwrap();
    let ours = time(3, || {
        step(ops::token_logprobs(hid.as_tensor(), &lm, &targets, 1.0)?)
    });
    let stock = time(3, || {
        step(reference::token_logprobs(
            hid.as_tensor(),
            &lm,
            &targets,
            1.0,
        )?)
    });
    report("token_logprobs (512, 576) x 49152", ours, stock);
    for rows in [32, 128, 256, 512] {
        let t = time(3, || {
            step(ops::token_logprobs_chunked(
                hid.as_tensor(),
                &lm,
                &targets,
                1.0,
                rows,
            )?)
        });
        let f = time(3, || {
            ops::token_logprobs_chunked(&hid.as_tensor().detach(), &lm, &targets, 1.0, rows)
                .map(|_| ())
        });
        println!("  {rows} rows per chunk: fwd+bwd {t:.1} ms, forward alone (untracked) {f:.1} ms");
    }
}

#[test]
#[ignore]
fn bench_swiglu_parts() {
    let (b, t, i) = (4, 128, 1536);
    let gate = Var::from_tensor(&randn(&[b, t, i])).unwrap();
    let up = Var::from_tensor(&randn(&[b, t, i])).unwrap();
    let g = randn(&[b, t, i]);
    let fwd = time(21, || {
        ops::swiglu(gate.as_tensor(), up.as_tensor()).map(|_| ())
    });
    let full = time(21, || {
        let y = ops::swiglu(gate.as_tensor(), up.as_tensor())?;
        (y * &g)?.sum_all()?.backward().map(|_| ())
    });
    let mul = time(21, || {
        let y = (gate.as_tensor() * up.as_tensor())?;
        (y * &g)?.sum_all()?.backward().map(|_| ())
    });
    println!(
        "swiglu forward {fwd:.2} ms; fwd+bwd {full:.2} ms; same graph with a stock mul {mul:.2} ms"
    );
}
