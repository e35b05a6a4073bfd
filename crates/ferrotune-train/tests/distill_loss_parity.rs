//! Distillation losses (`ferrotune_train::distill_loss`) against TRL 1.16's own code (fixture
//! written by `fixtures/distill/make_distill_loss.py`): `GKDTrainer.generalized_jsd_loss` for
//! β ∈ {0, 0.1, 0.5, 0.9, 1} × τ ∈ {1, 2}, teacher as logits or log-probs, all rows scored or
//! a padded mask, the `num_items_in_batch` normaliser and a mask with nothing scored; and the
//! teacher-top-k form (TRL's server-distillation `_compute_server_forward_kl_loss` /
//! `_add_tail_bucket` / `_jsd_divergence`) for β ∈ {0, 0.5, 1} × τ ∈ {1, 2} × tail on/off, with
//! rows holding fewer than K teacher tokens. Loss and d loss / d student logits, N = 8, V = 40.

use candle_core::{DType, Device, Tensor, Var};
use ferrotune_train::distill_loss::{
    distill_loss, divergence_rows, generalized_jsd_loss, JsdConfig, Teacher, TeacherTopK,
};
use serde_json::Value;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../fixtures/distill/distill_loss.json"
);

/// f64 inputs: we compute in f64 as TRL's float64 reference does.
const TOL_F64: f64 = 1e-9;
/// f32 inputs: the inputs themselves are rounded to f32 (~6e-8 relative).
const TOL_F32: f64 = 2e-5;

fn fixture() -> Value {
    serde_json::from_str(&std::fs::read_to_string(FIXTURE).unwrap()).unwrap()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap_or(f64::NEG_INFINITY)) // JSON has no -inf: absent slot
        .collect()
}

/// log_softmax of each row (input preparation for the "teacher as log-probs" cases).
fn log_softmax_rows(x: &[f64], v: usize) -> Vec<f64> {
    x.chunks(v)
        .flat_map(|r| {
            let m = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + r.iter().map(|&y| (y - m).exp()).sum::<f64>().ln();
            r.iter().map(move |&y| y - lse).collect::<Vec<_>>()
        })
        .collect()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

struct Case<'a> {
    fx: &'a Value,
    c: &'a Value,
}

impl Case<'_> {
    fn name(&self) -> String {
        let c = self.c;
        format!(
            "{} mask={} beta={} tau={} {}",
            c["kind"].as_str().unwrap(),
            c["mask"].as_str().unwrap(),
            c["beta"],
            c["temperature"],
            if c["kind"] == "full" {
                format!(
                    "teacher={} num_items={}",
                    c["teacher_as"].as_str().unwrap(),
                    c["num_items"]
                )
            } else {
                format!("add_tail={}", c["add_tail"])
            }
        )
    }

    /// (loss, d loss / d student) from ferrotune with inputs in `dtype`.
    fn run(&self, dtype: DType) -> (f64, Vec<f64>) {
        let (fx, c) = (self.fx, self.c);
        let (n, v) = (
            fx["n"].as_u64().unwrap() as usize,
            fx["v"].as_u64().unwrap() as usize,
        );
        let dev = Device::Cpu;
        let inp = &fx["inputs"][c["input"].as_u64().unwrap() as usize];
        let student = Var::from_tensor(
            &Tensor::from_vec(f64s(&inp["student"]), (n, v), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let mask =
            Tensor::from_vec(f64s(&fx["masks"][c["mask"].as_str().unwrap()]), n, &dev).unwrap();
        let cfg = JsdConfig {
            beta: c["beta"].as_f64().unwrap(),
            temperature: c["temperature"].as_f64().unwrap(),
        };
        let num_items = c["num_items"].as_u64().map(|x| x as usize);
        let loss = if c["kind"] == "full" {
            let mut t = f64s(&inp["teacher"]);
            if c["teacher_as"] == "logprobs" {
                t = log_softmax_rows(&t, v);
            }
            let teacher = Tensor::from_vec(t, (n, v), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            generalized_jsd_loss(student.as_tensor(), &teacher, &mask, &cfg, num_items).unwrap()
        } else {
            let tk = &fx["topk_inputs"][c["topk"].as_u64().unwrap() as usize];
            assert_eq!(tk["temperature"], c["temperature"]);
            let k = fx["k"].as_u64().unwrap() as usize;
            let lps: Vec<f64> = tk["logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(f64s)
                .collect();
            let ids: Vec<u32> = tk["ids"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|r| {
                    r.as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_u64().unwrap() as u32)
                })
                .collect();
            let teacher = TeacherTopK {
                ids: Tensor::from_vec(ids, (n, k), &dev).unwrap(),
                logprobs: Tensor::from_vec(lps, (n, k), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
                add_tail: c["add_tail"].as_bool().unwrap(),
            };
            distill_loss(
                student.as_tensor(),
                Teacher::TopK(&teacher),
                &mask,
                &cfg,
                num_items,
            )
            .unwrap()
        };
        assert_eq!(loss.dtype(), dtype);
        let grads = loss.backward().unwrap();
        let g = grads
            .get(student.as_tensor())
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        (
            loss.to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap(),
            g,
        )
    }
}

fn check_all(dtype: DType, tol: f64) {
    let fx = fixture();
    let cases = fx["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 35, "fixture has the expected case set");
    let mut worst = (0.0f64, 0.0f64);
    for c in cases {
        let case = Case { fx: &fx, c };
        let (loss, grad) = case.run(dtype);
        let want_loss = c["loss"].as_f64().unwrap();
        let want_grad = f64s(&c["grad"]);
        let (dl, dg) = ((loss - want_loss).abs(), max_abs_diff(&grad, &want_grad));
        assert!(dl <= tol, "{}: loss {loss} vs TRL {want_loss}", case.name());
        assert!(dg <= tol, "{}: max |grad diff| {dg}", case.name());
        worst = (worst.0.max(dl), worst.1.max(dg));
    }
    eprintln!(
        "{dtype:?}: worst |loss diff| {:.2e}, worst |grad diff| {:.2e}",
        worst.0, worst.1
    );
}

#[test]
fn matches_trl_in_f64() {
    check_all(DType::F64, TOL_F64);
}

#[test]
fn matches_trl_in_f32() {
    check_all(DType::F32, TOL_F32);
}

#[test]
fn fixture_cases_are_not_trivial() {
    // Guards the parity test against a fixture whose numbers could be met by a wrong formula:
    // the losses differ between β values and the gradients are not zero where rows are scored.
    let fx = fixture();
    let cases = fx["cases"].as_array().unwrap();
    let loss_of = |kind: &str, mask: &str, beta: f64, tau: f64| {
        cases
            .iter()
            .find(|c| {
                c["kind"] == kind
                    && c["mask"] == mask
                    && c["beta"].as_f64() == Some(beta)
                    && c["temperature"].as_f64() == Some(tau)
                    && c["num_items"].is_null()
            })
            .unwrap()["loss"]
            .as_f64()
            .unwrap()
    };
    let (f, r, j) = (
        loss_of("full", "all", 0.0, 1.0),
        loss_of("full", "all", 1.0, 1.0),
        loss_of("full", "all", 0.5, 1.0),
    );
    assert!((f - r).abs() > 1e-2 && (f - j).abs() > 1e-2, "{f} {r} {j}");
    assert!(
        loss_of("full", "all", 0.0, 2.0) < f,
        "τ = 2 smooths both distributions"
    );
}

#[test]
fn masked_rows_get_no_gradient_and_teacher_none() {
    let dev = Device::Cpu;
    let (n, v) = (4, 7);
    let s: Vec<f32> = (0..n * v)
        .map(|i| ((i * 37 % 11) as f32) * 0.3 - 1.0)
        .collect();
    let t: Vec<f32> = (0..n * v)
        .map(|i| ((i * 13 % 7) as f32) * 0.5 - 1.5)
        .collect();
    let student = Var::from_vec(s, (n, v), &dev).unwrap();
    let teacher = Var::from_vec(t, (n, v), &dev).unwrap();
    let mask = Tensor::new(&[1u8, 0, 1, 0], &dev).unwrap();
    let cfg = JsdConfig {
        beta: 0.5,
        temperature: 1.0,
    };
    let rows = divergence_rows(
        student.as_tensor(),
        Teacher::Full(teacher.as_tensor()),
        &mask,
        &cfg,
    )
    .unwrap()
    .to_vec1::<f32>()
    .unwrap();
    assert!(rows[0] > 0.0 && rows[2] > 0.0);
    assert_eq!((rows[1], rows[3]), (0.0, 0.0));
    let loss =
        generalized_jsd_loss(student.as_tensor(), teacher.as_tensor(), &mask, &cfg, None).unwrap();
    // batchmean: sum over the 2 scored rows / 2.
    let want = (rows[0] + rows[2]) / 2.0;
    assert!((loss.to_scalar::<f32>().unwrap() - want).abs() < 1e-6);
    let grads = loss.backward().unwrap();
    assert!(
        grads.get(teacher.as_tensor()).is_none(),
        "teacher is a constant"
    );
    let g = grads
        .get(student.as_tensor())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert!(g[1].iter().chain(&g[3]).all(|&x| x == 0.0));
    assert!(g[0].iter().any(|&x| x.abs() > 1e-4));
    // Softmax gradients sum to zero over the vocabulary.
    assert!(g[0].iter().sum::<f32>().abs() < 1e-6);
}

#[test]
fn bad_inputs_are_refused_with_a_reason() {
    let dev = Device::Cpu;
    let s = Tensor::zeros((2, 5), DType::F32, &dev).unwrap();
    let mask = Tensor::ones(2, DType::U8, &dev).unwrap();
    let err = |r: candle_core::Result<Tensor>| r.unwrap_err().to_string();
    let cfg = |beta, temperature| JsdConfig { beta, temperature };
    assert!(err(generalized_jsd_loss(&s, &s, &mask, &cfg(1.5, 1.0), None)).contains("beta"));
    assert!(err(generalized_jsd_loss(&s, &s, &mask, &cfg(0.5, 0.0), None)).contains("temperature"));
    let t = Tensor::zeros((2, 6), DType::F32, &dev).unwrap();
    assert!(err(generalized_jsd_loss(&s, &t, &mask, &cfg(0.5, 1.0), None)).contains("teacher"));
    let m3 = Tensor::ones(3, DType::U8, &dev).unwrap();
    assert!(err(generalized_jsd_loss(&s, &s, &m3, &cfg(0.5, 1.0), None)).contains("mask"));
    assert!(
        err(generalized_jsd_loss(&s, &s, &mask, &cfg(0.5, 1.0), Some(0))).contains("num_items")
    );
    let topk = TeacherTopK {
        ids: Tensor::new(&[[0u32, 9], [1, 2]], &dev).unwrap(),
        logprobs: Tensor::new(&[[-0.5f32, -1.0], [-0.5, -1.0]], &dev).unwrap(),
        add_tail: true,
    };
    let e = err(distill_loss(
        &s,
        Teacher::TopK(&topk),
        &mask,
        &cfg(0.0, 1.0),
        None,
    ));
    assert!(e.contains("id 9") && e.contains("row 0"), "{e}");
}
