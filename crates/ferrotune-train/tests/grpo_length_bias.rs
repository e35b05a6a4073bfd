//! The length bias of `loss_type = "grpo"` that `dr_grpo` removes (Liu et al. 2025,
//! "Understanding R1-Zero-Like Training", §3.1), through our loss and candle's backward.
//!
//! A toy policy that knows whether its answer is right: after the answer it decides between
//! stopping (a short completion of `SHORT` tokens) and going on (`LONG` tokens) with
//! P(go on) = sigmoid(z_right) after a right answer and sigmoid(z_wrong) after a wrong one. Every
//! other token's log-prob is a constant. At z = 0 both lengths are equally likely, so one
//! group holding each (right, wrong) × (short, long) once is exactly the policy's expected
//! batch, and the loss gradient on z is the expected one.
//!
//! Expected values, by hand from the two losses (G completions, advantage A of each, the
//! decision token's log-prob log σ(z) when long and log(1 − σ(z)) when short, at σ = 1/2):
//! - grpo, L = −(1/G) Σ_i (1/|o_i|) Σ_t A_i log p_it:
//!   dL/dz = −(A/G) (−σ/SHORT + (1 − σ)/LONG) = (A / 2G) (1/SHORT − 1/LONG),
//!   so a descent step raises z_wrong (A < 0: wrong answers grow longer) and lowers z_right
//!   (right answers grow shorter) — the bias the paper names;
//! - dr_grpo (divide by G·max_completion_len), dapo and bnpo (divide by the tokens of the
//!   batch): every token weighs the same, dL/dz ∝ A (−σ + 1 − σ) = 0. No length pressure.

use candle_core::{DType, Device, Tensor, Var};
use ferrotune_train::grpo_loss::{
    advantages, completion_mask, grpo_loss, LossConfig, LossInputs, LossType, ScaleRewards,
};

const SHORT: usize = 4;
const LONG: usize = 16;
/// Every non-decision token's log-prob (any constant: it carries no gradient to z).
const OTHER_LOGP: f64 = -0.7;

/// (dL/dz_right, dL/dz_wrong, A_right, A_wrong) for one group of four completions:
/// right-short, right-long, wrong-short, wrong-long, at z_right = z_wrong = 0.
fn length_gradients(loss_type: LossType) -> (f64, f64, f64, f64) {
    let dev = Device::Cpu;
    let z_right = Var::new(0f64, &dev).unwrap();
    let z_wrong = Var::new(0f64, &dev).unwrap();
    // log σ(z) = −log(1 + e^−z); log(1 − σ(z)) = −log(1 + e^z).
    let log_go_on = |z: &Var| {
        (z.neg().unwrap().exp().unwrap() + 1.0)
            .unwrap()
            .log()
            .unwrap()
            .neg()
            .unwrap()
    };
    let log_stop = |z: &Var| {
        (z.exp().unwrap() + 1.0)
            .unwrap()
            .log()
            .unwrap()
            .neg()
            .unwrap()
    };
    let lens = [SHORT, LONG, SHORT, LONG];
    let decision = [
        log_stop(&z_right),
        log_go_on(&z_right),
        log_stop(&z_wrong),
        log_go_on(&z_wrong),
    ];
    // Row i: OTHER_LOGP everywhere, the decision's log-prob at position SHORT − 1 (where a
    // short completion ends and a long one goes on); the mask cuts each row at its length.
    let rows: Vec<Tensor> = decision
        .iter()
        .map(|d| {
            let before = Tensor::full(OTHER_LOGP, SHORT - 1, &dev).unwrap();
            let after = Tensor::full(OTHER_LOGP, LONG - SHORT, &dev).unwrap();
            Tensor::cat(&[&before, &d.reshape(1).unwrap(), &after], 0).unwrap()
        })
        .collect();
    let logps = Tensor::stack(&rows, 0).unwrap(); // (4, LONG)
    let rewards = [1.0, 1.0, 0.0, 0.0];
    let adv = advantages(&rewards, 4, ScaleRewards::Group).unwrap();
    let mask = completion_mask(&lens, &[false; 4], LONG, false).unwrap();
    let mask = Tensor::from_vec(mask, (4, LONG), &dev)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let adv_t = Tensor::from_vec(adv.clone(), 4, &dev).unwrap();
    let mut cfg = LossConfig::new(loss_type, LONG);
    cfg.num_items_in_batch = Some((2 * SHORT + 2 * LONG) as f64);
    let out = grpo_loss(
        &LossInputs {
            logps: &logps,
            old_logps: None,
            ref_logps: None,
            mask: &mask,
            advantages: &adv_t,
            entropies: None,
        },
        &cfg,
    )
    .unwrap();
    let grads = out.loss.backward().unwrap();
    let g = |z: &Var| {
        grads
            .get(z.as_tensor())
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    (g(&z_right), g(&z_wrong), adv[0], adv[2])
}

#[test]
fn grpo_pushes_wrong_answers_longer_and_right_ones_shorter() {
    let (d_right, d_wrong, a_right, a_wrong) = length_gradients(LossType::Grpo);
    assert!(a_right > 0.0 && a_wrong < 0.0);
    let g = 4.0;
    let want = |a: f64| a / (2.0 * g) * (1.0 / SHORT as f64 - 1.0 / LONG as f64);
    for (name, got, want) in [
        ("dL/dz_right", d_right, want(a_right)),
        ("dL/dz_wrong", d_wrong, want(a_wrong)),
    ] {
        assert!((got - want).abs() < 1e-12, "{name}: got {got}, want {want}");
    }
    // Gradient descent: z_wrong rises (longer wrong answers), z_right falls.
    assert!(d_wrong < -0.01 && d_right > 0.01, "{d_right} {d_wrong}");
}

#[test]
fn dr_grpo_dapo_and_bnpo_put_no_pressure_on_length() {
    for loss_type in [LossType::DrGrpo, LossType::Dapo, LossType::Bnpo] {
        let (d_right, d_wrong, _, _) = length_gradients(loss_type);
        assert!(
            d_right.abs() < 1e-12 && d_wrong.abs() < 1e-12,
            "{loss_type:?}: dL/dz_right {d_right}, dL/dz_wrong {d_wrong}"
        );
    }
}
