//! GPU-only tests: every op's CUDA path against its CPU path (the reference, itself tested
//! against PyTorch in tests/ops.rs) on random inputs — forward values and the gradients of
//! `sum(y * r)` for a random `r`, in f32 (tight) and bf16 (bf16 tolerance). Frozen arguments
//! must get no gradient on the GPU either.
//!
//! Built only with `--features cuda`; needs a CUDA device (bench/gpu/kernels.sh runs the
//! carried test binary on the GPU machine). CPU CI does not build it.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Result, Tensor, Var};
use ferrotune_nn::ops;

fn gpu() -> Device {
    Device::new_cuda(0).expect("these tests need a CUDA device")
}

/// Deterministic values in [-scale, scale).
fn rand(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n as u64)
        .map(|i| {
            let h = ferrotune_nn::splitmix64(seed.wrapping_mul(0x9E37_79B9) ^ i);
            ((h >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let f = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (a, b) = (f(a), f(b));
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let err = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(err.is_finite(), "non-finite values");
    err / scale
}

type OpFn = dyn Fn(&[Tensor]) -> Result<Tensor>;

/// Runs `op` on CPU (f32) and on the GPU (dtype `dt`) with the same inputs; `tracked[i]` says
/// whether input i is a Var. Compares outputs and the gradients of sum(y * r).
fn check(name: &str, inputs: &[Tensor], tracked: &[bool], dt: DType, tol: f32, op: &OpFn) {
    let run = |dev: &Device, dt: DType| -> (Tensor, Vec<Option<Tensor>>) {
        let vars: Vec<Option<Var>> = inputs
            .iter()
            .zip(tracked)
            .map(|(t, &tr)| {
                tr.then(|| {
                    Var::from_tensor(&t.to_device(dev).unwrap().to_dtype(dt).unwrap()).unwrap()
                })
            })
            .collect();
        let args: Vec<Tensor> = inputs
            .iter()
            .zip(&vars)
            .map(|(t, v)| match v {
                Some(v) => v.as_tensor().clone(),
                None => t.to_device(dev).unwrap().to_dtype(dt).unwrap(),
            })
            .collect();
        let y = op(&args).unwrap();
        let r = rand(y.dims(), 99, 1.0).to_device(dev).unwrap();
        let loss = (y.to_dtype(DType::F32).unwrap() * r)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let gs = args
            .iter()
            .map(|a| grads.get(a).cloned())
            .collect::<Vec<_>>();
        (y, gs)
    };
    let (y_cpu, g_cpu) = run(&Device::Cpu, DType::F32);
    let (y_gpu, g_gpu) = run(&gpu(), dt);
    let e = max_rel(&y_gpu, &y_cpu);
    println!("{name} {dt:?}: forward max rel err {e:.2e}");
    assert!(e <= tol, "{name} {dt:?}: forward error {e:e} > {tol:e}");
    for (i, (gc, gg)) in g_cpu.iter().zip(&g_gpu).enumerate() {
        match (gc, gg, tracked[i]) {
            (Some(gc), Some(gg), true) => {
                let e = max_rel(gg, gc);
                println!("{name} {dt:?}: grad[{i}] max rel err {e:.2e}");
                assert!(
                    e <= tol,
                    "{name} {dt:?}: grad of input {i} error {e:e} > {tol:e}"
                );
            }
            (_, None, false) => {}
            (_, Some(_), false) => panic!("{name}: frozen input {i} got a gradient on the GPU"),
            (c, g, true) => panic!(
                "{name}: input {i} gradient present on cpu: {}, gpu: {}",
                c.is_some(),
                g.is_some()
            ),
        }
    }
}

const F32_TOL: f32 = 2e-5;
const BF16_TOL: f32 = 3e-2;

fn both(name: &str, inputs: &[Tensor], tracked: &[bool], op: &OpFn) {
    check(name, inputs, tracked, DType::F32, F32_TOL, op);
    check(name, inputs, tracked, DType::BF16, BF16_TOL, op);
}

#[test]
fn linear_matches_cpu() {
    let x = rand(&[3, 5, 64], 1, 1.0);
    let w = rand(&[48, 64], 2, 0.2);
    let b = rand(&[48], 3, 0.5);
    both(
        "linear frozen",
        &[x.clone(), w.clone()],
        &[true, false],
        &|a| ops::linear(&a[0], &a[1], None),
    );
    both(
        "linear trainable",
        &[x.clone(), w.clone()],
        &[true, true],
        &|a| ops::linear(&a[0], &a[1], None),
    );
    both("linear bias", &[x, w, b], &[true, false, true], &|a| {
        ops::linear(&a[0], &a[1], Some(&a[2]))
    });
}

#[test]
fn norms_match_cpu() {
    let x = rand(&[4, 7, 96], 4, 2.0);
    let w = rand(&[96], 5, 1.0);
    let b = rand(&[96], 6, 0.3);
    both("rms_norm", &[x.clone(), w.clone()], &[true, true], &|a| {
        ops::rms_norm(&a[0], &a[1], 1e-6)
    });
    both(
        "rms_norm frozen w",
        &[x.clone(), w.clone()],
        &[true, false],
        &|a| ops::rms_norm(&a[0], &a[1], 1e-6),
    );
    both("layer_norm", &[x, w, b], &[true, true, true], &|a| {
        ops::layer_norm(&a[0], &a[1], &a[2], 1e-5)
    });
}

#[test]
fn rope_matches_cpu() {
    let x = rand(&[2, 3, 10, 16], 7, 1.0);
    let ang = rand(&[2, 10, 8], 8, 3.0);
    let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
    both(
        "rope",
        &[x.clone(), cos, sin],
        &[true, false, false],
        &|a| ops::rope(&a[0], &a[1], &a[2]),
    );
    // A batch of 1 broadcasts.
    let ang = rand(&[1, 10, 8], 9, 3.0);
    let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
    both(
        "rope broadcast",
        &[x, cos, sin],
        &[true, false, false],
        &|a| ops::rope(&a[0], &a[1], &a[2]),
    );
}

#[test]
fn swiglu_matches_cpu() {
    let g = rand(&[5, 33], 10, 4.0);
    let u = rand(&[5, 33], 11, 2.0);
    both("swiglu", &[g.clone(), u.clone()], &[true, true], &|a| {
        ops::swiglu(&a[0], &a[1])
    });
    both("swiglu frozen up", &[g, u], &[true, false], &|a| {
        ops::swiglu(&a[0], &a[1])
    });
}

#[test]
fn attention_matches_cpu() {
    // GQA (6 query heads over 2 kv heads), Tq < Tk (a cached prefix), left padding in row 1.
    let q = rand(&[2, 6, 5, 16], 12, 1.5);
    let k = rand(&[2, 2, 9, 16], 13, 1.5);
    let v = rand(&[2, 2, 9, 16], 14, 1.0);
    let mask = Tensor::new(
        &[
            [1f32, 1., 1., 1., 1., 1., 1., 1., 1.],
            [0., 0., 0., 1., 1., 1., 1., 1., 1.],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let m = mask.clone();
    both(
        "attention",
        &[q.clone(), k.clone(), v.clone()],
        &[true, true, true],
        &move |a| {
            let m = m.to_device(a[0].device())?;
            ops::attention(&a[0], &a[1], &a[2], Some(&m), 0.25)
        },
    );
    // Square causal, no mask, a query with every key padded out (zero output, zero grad).
    let q = rand(&[2, 4, 7, 8], 15, 1.0);
    let k = rand(&[2, 4, 7, 8], 16, 1.0);
    let v = rand(&[2, 4, 7, 8], 17, 1.0);
    both(
        "attention causal",
        &[q.clone(), k.clone(), v.clone()],
        &[true, false, true],
        &|a| ops::attention(&a[0], &a[1], &a[2], None, 1.0 / 8f64.sqrt()),
    );
    let pad = Tensor::new(
        &[[0f32, 0., 1., 1., 1., 1., 1.], [1., 1., 1., 1., 1., 1., 1.]],
        &Device::Cpu,
    )
    .unwrap();
    both(
        "attention left-pad",
        &[q, k, v],
        &[true, true, true],
        &move |a| {
            let m = pad.to_device(a[0].device())?;
            ops::attention(&a[0], &a[1], &a[2], Some(&m), 0.3)
        },
    );
}

#[test]
fn windowed_and_segmented_attention_match_cpu() {
    // A window of 3 over a cached prefix (Tq < Tk), left padding in row 1, and packed segments.
    let q = rand(&[2, 6, 5, 16], 22, 1.5);
    let k = rand(&[2, 2, 9, 16], 23, 1.5);
    let v = rand(&[2, 2, 9, 16], 24, 1.0);
    let mask = Tensor::new(
        &[
            [1f32, 1., 1., 1., 1., 1., 1., 1., 1.],
            [0., 0., 0., 1., 1., 1., 1., 1., 1.],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let seg = Tensor::new(
        &[[0u32, 0, 0, 0, 1, 1, 1, 2, 2], [0, 0, 0, 0, 0, 1, 1, 1, 1]],
        &Device::Cpu,
    )
    .unwrap();
    for (name, window, with_seg) in [
        ("attention window", Some(3), false),
        ("attention segments", None, true),
        ("attention window + segments", Some(3), true),
    ] {
        let (m, sg) = (mask.clone(), seg.clone());
        both(
            name,
            &[q.clone(), k.clone(), v.clone()],
            &[true, true, true],
            &move |a| {
                let m = m.to_device(a[0].device())?;
                let sg = sg.to_device(a[0].device())?;
                let masks = ops::AttnMask {
                    key_mask: Some(&m),
                    window,
                    segments: with_seg.then_some(&sg),
                };
                ops::attention_masked(&a[0], &a[1], &a[2], &masks, 0.25)
            },
        );
    }
}

#[test]
fn token_logprobs_match_cpu() {
    let h = rand(&[11, 32], 18, 1.0);
    let w = rand(&[301, 32], 19, 0.5);
    let targets: Vec<u32> = (0..11).map(|i| (i * 37 % 301) as u32).collect();
    for (temp, chunk) in [(1.0, 0), (0.7, 4)] {
        let t = targets.clone();
        both(
            "token_logprobs",
            &[h.clone(), w.clone()],
            &[true, false],
            &move |a| {
                let tg = Tensor::new(t.as_slice(), a[0].device())?;
                ops::token_logprobs_chunked(&a[0], &a[1], &tg, temp, chunk)
            },
        );
    }
    let t = targets.clone();
    both(
        "token_logprobs trainable head",
        &[h, w],
        &[true, true],
        &move |a| {
            let tg = Tensor::new(t.as_slice(), a[0].device())?;
            ops::token_logprobs_chunked(&a[0], &a[1], &tg, 1.0, 3)
        },
    );
}

/// The rule the CPU sampler applies without top-k/top-p (ferrotune-generate's `sample_token`):
/// the first id whose running probability, in vocabulary order, reaches u.
fn cpu_draw(row: &[f32], u: f64, temperature: f64) -> (u32, f32) {
    let s: Vec<f64> = row.iter().map(|&x| x as f64 / temperature).collect();
    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + s.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
    let mut left = u;
    for (i, x) in s.iter().enumerate() {
        left -= (x - lse).exp();
        if left <= 0.0 {
            return (i as u32, (x - lse) as f32);
        }
    }
    let last = s.len() - 1;
    (last as u32, (s[last] - lse) as f32)
}

#[test]
fn device_sampler_matches_cpu_rule() {
    let (b, v) = (64, 5000);
    let logits = rand(&[b, v], 20, 4.0);
    let rows = logits.to_vec2::<f32>().unwrap();
    let g = logits.to_device(&gpu()).unwrap();
    let mut same = 0;
    for (round, temp) in [(0u64, 1.0), (1, 0.7), (2, 1.3)] {
        let u: Vec<f32> = (0..b as u64)
            .map(|i| {
                (ferrotune_nn::splitmix64(round * 1000 + i) >> 40) as f32 / (1u64 << 24) as f32
            })
            .collect();
        let (ids, lps) = ops::sample_rows_on_device(&g, &u, temp).unwrap().unwrap();
        for i in 0..b {
            let (want, want_lp) = cpu_draw(&rows[i], u[i] as f64, temp);
            if ids[i] == want {
                same += 1;
                assert!(
                    (lps[i] - want_lp).abs() < 1e-4,
                    "row {i}: logp {} vs {want_lp}",
                    lps[i]
                );
            }
        }
    }
    println!(
        "device sampler: {same} of {} draws equal the CPU rule",
        3 * b
    );
    // f32 partial sums on the device vs f64 on the host: only a draw within ~1e-6 of a CDF
    // boundary may differ.
    assert!(same >= 3 * b - 2, "only {same} of {} draws agree", 3 * b);
    // Greedy: the first maximum, log-prob under the untempered softmax.
    let (ids, lps) = ops::sample_rows_on_device(&g, &vec![0.0; b], 0.0)
        .unwrap()
        .unwrap();
    for i in 0..b {
        let (best, _) = rows[i]
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |a, (j, &x)| if x > a.1 { (j, x) } else { a },
            );
        assert_eq!(ids[i] as usize, best, "greedy row {i}");
        let m = rows[i][best] as f64;
        let lse = m + rows[i]
            .iter()
            .map(|&x| (x as f64 - m).exp())
            .sum::<f64>()
            .ln();
        assert!(
            (lps[i] as f64 - (m - lse)).abs() < 1e-4,
            "greedy logp row {i}"
        );
    }
}

#[test]
fn device_adamw_matches_the_host_update() {
    // Three steps of torch-order AdamW (lr 1e-3, betas (0.9, 0.999), eps 1e-8, wd 0.01) on the
    // device vs the same formula on the host in f32.
    let n = 10_000;
    let p0 = rand(&[n], 30, 1.0).to_vec1::<f32>().unwrap();
    let (lr, b1, b2, eps, wd) = (1e-3f64, 0.9f64, 0.999f64, 1e-8f64, 0.01f64);
    let dev = gpu();
    let p = Var::from_slice(&p0, n, &dev).unwrap();
    let m = Tensor::zeros(n, DType::F32, &dev).unwrap();
    let v = Tensor::zeros(n, DType::F32, &dev).unwrap();
    let (mut hp, mut hm, mut hv) = (p0.clone(), vec![0f32; n], vec![0f32; n]);
    for step in 1..=3 {
        let g = rand(&[n], 40 + step, 0.5).to_vec1::<f32>().unwrap();
        let bc1 = 1.0 - b1.powf(step as f64);
        let bc2 = 1.0 - b2.powf(step as f64);
        let s = ops::AdamwScalars {
            decay: Some((1.0 - lr * wd) as f32),
            one_minus_beta1: (1.0 - b1) as f32,
            beta2: b2 as f32,
            one_minus_beta2: (1.0 - b2) as f32,
            bias_correction2_sqrt: bc2.powf(0.5) as f32,
            eps: eps as f32,
            neg_step_size: (-(lr / bc1)) as f32,
        };
        let gt = Tensor::from_slice(&g, n, &dev).unwrap();
        assert!(ops::adamw_step_on_device(p.as_tensor(), &gt, &m, &v, &s).unwrap());
        for i in 0..n {
            let pi = hp[i] * s.decay.unwrap();
            hm[i] = s.one_minus_beta1.mul_add(g[i] - hm[i], hm[i]);
            hv[i] = hv[i] * s.beta2 + s.one_minus_beta2 * g[i] * g[i];
            hp[i] = pi + s.neg_step_size * hm[i] / (hv[i].sqrt() / s.bias_correction2_sqrt + s.eps);
        }
    }
    let got = p.as_tensor().to_vec1::<f32>().unwrap();
    let err = got
        .iter()
        .zip(&hp)
        .fold(0f32, |e, (a, b)| e.max((a - b).abs()));
    let moved = got
        .iter()
        .zip(&p0)
        .fold(0f32, |e, (a, b)| e.max((a - b).abs()));
    println!("device adamw: max |p_gpu - p_cpu| {err:.2e}, max update {moved:.2e}");
    assert!(moved > 1e-3, "the parameters did not move");
    assert!(
        err <= 1e-6,
        "device AdamW differs from the host update by {err:e}"
    );
    let gm = m.to_vec1::<f32>().unwrap();
    let em = gm
        .iter()
        .zip(&hm)
        .fold(0f32, |e, (a, b)| e.max((a - b).abs()));
    assert!(em <= 1e-6, "exp_avg differs by {em:e}");
}
