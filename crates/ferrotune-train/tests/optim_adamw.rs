//! AdamW against `torch.optim.AdamW` (fixture written by
//! `fixtures/train/make_optim_fixtures.py`: three parameters, 5-6 steps, weight decay 0 /
//! 0.01 / 0.1, lr driven by transformers' schedules, and a parameter whose gradient is absent
//! for two steps), plus bit-exact resume through a safetensors round trip and state checks.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use ferrotune_train::optim::{AdamW, AdamWConfig, OptimError};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/train");

struct Case {
    name: String,
    lr: Vec<f64>,
    config: AdamWConfig,
    steps: usize,
    params: Vec<String>,
    final_step: HashMap<String, u64>,
}

fn fixture() -> (HashMap<String, Tensor>, Vec<Case>) {
    let tensors =
        candle_core::safetensors::load(format!("{DIR}/optim_adamw.safetensors"), &Device::Cpu)
            .unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{DIR}/optim_adamw.json")).unwrap())
            .unwrap();
    let cases = meta["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().to_string(),
            lr: c["lr"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect(),
            config: AdamWConfig {
                betas: (
                    c["betas"][0].as_f64().unwrap(),
                    c["betas"][1].as_f64().unwrap(),
                ),
                eps: c["eps"].as_f64().unwrap(),
                weight_decay: c["weight_decay"].as_f64().unwrap(),
            },
            steps: c["steps"].as_u64().unwrap() as usize,
            params: c["params"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_string())
                .collect(),
            final_step: c["final_step"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
                .collect(),
        })
        .collect();
    (tensors, cases)
}

fn vars(t: &HashMap<String, Tensor>, case: &Case) -> Vec<(String, Var)> {
    case.params
        .iter()
        .map(|p| {
            let init = &t[&format!("{}.init.{p}", case.name)];
            (p.clone(), Var::from_tensor(init).unwrap())
        })
        .collect()
}

fn grads_at(
    t: &HashMap<String, Tensor>,
    case: &Case,
    params: &[(String, Var)],
    step: usize,
) -> GradStore {
    let mut g = GradStore::default();
    for (name, var) in params {
        if let Some(grad) = t.get(&format!("{}.grad.{step}.{name}", case.name)) {
            g.insert(var.as_tensor(), grad.clone());
        }
    }
    g
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Largest |a - b| / max(1, |b|) (abs below 1, rel above), asserted <= 1e-6.
fn max_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    flat(a)
        .iter()
        .zip(flat(b))
        .map(|(&x, y)| ((x - y).abs() as f64) / (y.abs() as f64).max(1.0))
        .fold(0.0, f64::max)
}

#[test]
fn matches_torch_adamw_every_step() {
    let (t, cases) = fixture();
    let mut worst = 0.0f64;
    let (mut equal, mut total) = (0usize, 0usize);
    for case in &cases {
        let params = vars(&t, case);
        let mut opt = AdamW::new(params.clone(), case.config).unwrap();
        assert_eq!(case.lr.len(), case.steps);
        for step in 0..case.steps {
            let g = grads_at(&t, case, &params, step);
            opt.step(&g, case.lr[step]).unwrap();
            for (name, var) in &params {
                let want = &t[&format!("{}.param.{step}.{name}", case.name)];
                let err = max_err(var.as_tensor(), want);
                assert!(err <= 1e-6, "{} step {step} {name}: err {err}", case.name);
                worst = worst.max(err);
                for (a, b) in flat(var.as_tensor()).iter().zip(flat(want)) {
                    total += 1;
                    equal += (a.to_bits() == b.to_bits()) as usize;
                }
            }
        }
        let state: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
        for name in &case.params {
            for key in ["exp_avg", "exp_avg_sq"] {
                let want = &t[&format!("{}.{key}.{name}", case.name)];
                let err = max_err(&state[&format!("{name}.{key}")], want);
                assert!(err <= 1e-6, "{} {key} {name}: err {err}", case.name);
            }
            let step = state[&format!("{name}.step")].to_vec1::<i64>().unwrap()[0];
            assert_eq!(
                step as u64, case.final_step[name],
                "{} step count {name}",
                case.name
            );
            assert_eq!(opt.step_count(name), Some(case.final_step[name]));
        }
    }
    // The missing-gradient case must really exercise per-parameter step counts.
    let missing = cases.iter().find(|c| c.name.contains("missing")).unwrap();
    assert_eq!(missing.final_step["layer.a.bias"] + 2, missing.steps as u64);
    println!("AdamW vs torch: worst err {worst:.3e}; bitwise equal {equal}/{total} elements");
}

#[test]
fn resume_through_safetensors_is_bit_exact() {
    let (t, cases) = fixture();
    for case in &cases {
        // Uninterrupted run.
        let straight = vars(&t, case);
        let mut opt = AdamW::new(straight.clone(), case.config).unwrap();
        for step in 0..case.steps {
            opt.step(&grads_at(&t, case, &straight, step), case.lr[step])
                .unwrap();
        }
        // Two steps, save params + state to disk, rebuild everything, continue.
        let first = vars(&t, case);
        let mut opt = AdamW::new(first.clone(), case.config).unwrap();
        for step in 0..2 {
            opt.step(&grads_at(&t, case, &first, step), case.lr[step])
                .unwrap();
        }
        let dir = std::env::temp_dir().join(format!(
            "ferrotune-optim-{}-{}",
            std::process::id(),
            case.name
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let state_path = dir.join("optimizer.safetensors");
        let params_path = dir.join("params.safetensors");
        let state: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
        candle_core::safetensors::save(&state, &state_path).unwrap();
        let saved: HashMap<String, Tensor> = first
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().copy().unwrap()))
            .collect();
        candle_core::safetensors::save(&saved, &params_path).unwrap();
        drop(opt);

        let p = candle_core::safetensors::load(&params_path, &Device::Cpu).unwrap();
        let resumed: Vec<(String, Var)> = case
            .params
            .iter()
            .map(|n| (n.clone(), Var::from_tensor(&p[n]).unwrap()))
            .collect();
        let mut opt = AdamW::new(resumed.clone(), case.config).unwrap();
        opt.load_state(&candle_core::safetensors::load(&state_path, &Device::Cpu).unwrap())
            .unwrap();
        for step in 2..case.steps {
            opt.step(&grads_at(&t, case, &resumed, step), case.lr[step])
                .unwrap();
        }
        for ((n, a), (_, b)) in straight.iter().zip(&resumed) {
            let (a, b) = (flat(a.as_tensor()), flat(b.as_tensor()));
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{} {n}: resumed run differs from the straight run",
                case.name
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn load_state_rejects_incomplete_or_foreign_state() {
    let w = Var::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    let b = Var::zeros(3, DType::F32, &Device::Cpu).unwrap();
    let params = vec![("w".to_string(), w), ("b".to_string(), b)];
    let mut opt = AdamW::new(params.clone(), AdamWConfig::default()).unwrap();
    let good: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
    assert_eq!(good.len(), 6);
    opt.load_state(&good).unwrap();

    let mut missing = good.clone();
    missing.remove("b.exp_avg_sq");
    assert!(
        matches!(opt.load_state(&missing), Err(OptimError::MissingState(k)) if k == "b.exp_avg_sq")
    );

    let mut shape = good.clone();
    shape.insert(
        "w.exp_avg".into(),
        Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(
        matches!(opt.load_state(&shape), Err(OptimError::StateShape { key, .. }) if key == "w.exp_avg")
    );

    let mut extra = good.clone();
    extra.insert(
        "c.exp_avg".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(
        matches!(opt.load_state(&extra), Err(OptimError::UnexpectedState(k)) if k == "c.exp_avg")
    );

    let mut negative = good.clone();
    negative.insert(
        "w.step".into(),
        Tensor::new(&[-1i64], &Device::Cpu).unwrap(),
    );
    assert!(matches!(
        opt.load_state(&negative),
        Err(OptimError::StateStep { .. })
    ));
}

#[test]
fn config_and_params_are_checked() {
    let f32_var = Var::zeros(2, DType::F32, &Device::Cpu).unwrap();
    let bad_beta = AdamWConfig {
        betas: (0.9, 1.0),
        ..AdamWConfig::default()
    };
    assert!(matches!(
        AdamW::new(vec![("a".into(), f32_var.clone())], bad_beta),
        Err(OptimError::Config {
            field: "betas.1",
            ..
        })
    ));
    let bf16 = Var::zeros(2, DType::BF16, &Device::Cpu).unwrap();
    assert!(matches!(
        AdamW::new(vec![("h".into(), bf16)], AdamWConfig::default()),
        Err(OptimError::ParamDType { .. })
    ));
    let dup = vec![
        ("a".to_string(), f32_var.clone()),
        ("a".to_string(), f32_var.clone()),
    ];
    assert!(matches!(
        AdamW::new(dup, AdamWConfig::default()),
        Err(OptimError::DuplicateName(_))
    ));

    // TRL / HF Trainer default: no weight decay.
    assert_eq!(AdamWConfig::default().weight_decay, 0.0);

    let mut opt = AdamW::new(vec![("a".into(), f32_var.clone())], AdamWConfig::default()).unwrap();
    let mut g = GradStore::default();
    g.insert(
        f32_var.as_tensor(),
        Tensor::ones(3, DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(matches!(
        opt.step(&g, 1e-3),
        Err(OptimError::GradShape { .. })
    ));
    assert!(matches!(
        opt.step(&GradStore::default(), f64::NAN),
        Err(OptimError::Lr(_))
    ));
}
