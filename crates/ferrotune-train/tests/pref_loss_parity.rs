//! DPO and reward-model losses, gradients and logged stats against TRL 1.16's own
//! `DPOTrainer._compute_loss` and `RewardTrainer.compute_loss` (fixture written by
//! `fixtures/dpo/make_pref_loss.py`): sigmoid / ipo / hinge × β ∈ {0.1, 0.5} on two batches,
//! sigmoid with cDPO label smoothing 0.1 (TRL's `aot` one pair at a time, see the script), an
//! all-ties batch (Δ = 0), and the RM loss with and without margin and centering. Plus refusals
//! of bad input.

use candle_core::{DType, Device, Tensor, Var};
use ferrotune_train::pref_loss::{
    dpo_loss, reward_model_loss, DpoConfig, DpoInputs, DpoLossType, DpoOutput, RmOutput,
};
use serde_json::Value;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../fixtures/dpo/pref_loss.json"
);

/// Inputs are f32 and the loss is returned in f32 (relative rounding 6e-8 on values up to ~45),
/// so compare relative to max(1, |want|).
const TOL: f64 = 1e-6;

fn fixture() -> Value {
    serde_json::from_str(&std::fs::read_to_string(FIXTURE).unwrap()).unwrap()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn var(xs: &[f64]) -> Var {
    let v: Vec<f32> = xs.iter().map(|&x| x as f32).collect();
    Var::from_vec(v, xs.len(), &Device::Cpu).unwrap()
}

fn tensor(xs: &[f64]) -> Tensor {
    var(xs).as_tensor().detach()
}

fn close(name: &str, got: f64, want: f64) {
    assert!(
        (got - want).abs() <= TOL * want.abs().max(1.0),
        "{name}: got {got}, want {want}"
    );
}

fn close_all(name: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        close(&format!("{name}[{i}]"), *g, *w);
    }
}

fn grad_of(grads: &candle_core::backprop::GradStore, v: &Var) -> Vec<f64> {
    grads
        .get(v.as_tensor())
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    assert_eq!(t.dtype(), DType::F32);
    assert_eq!(t.dims(), &[] as &[usize]);
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn dpo_matches_trl() {
    let fx = fixture();
    assert_eq!(fx["trl_version"], "1.16.0");
    let cases = fx["dpo"].as_array().unwrap();
    assert!(cases.len() >= 19, "fixture has {} DPO cases", cases.len());
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let cfg = DpoConfig {
            beta: c["beta"].as_f64().unwrap(),
            loss_type: c["loss_type"].as_str().unwrap().parse().unwrap(),
            label_smoothing: c["label_smoothing"].as_f64().unwrap(),
        };
        let pc = var(&f64s(&c["policy_chosen"]));
        let pr = var(&f64s(&c["policy_rejected"]));
        let rc = tensor(&f64s(&c["ref_chosen"]));
        let rr = tensor(&f64s(&c["ref_rejected"]));
        let nc = tensor(&f64s(&c["chosen_tokens"]));
        let nr = tensor(&f64s(&c["rejected_tokens"]));
        let out: DpoOutput = dpo_loss(
            &DpoInputs {
                policy_chosen: pc.as_tensor(),
                policy_rejected: pr.as_tensor(),
                ref_chosen: &rc,
                ref_rejected: &rr,
                chosen_tokens: Some(&nc),
                rejected_tokens: Some(&nr),
            },
            &cfg,
        )
        .unwrap();
        close(
            &format!("{name} loss"),
            scalar(&out.loss),
            c["loss"].as_f64().unwrap(),
        );
        close_all(&format!("{name} losses"), &out.losses, &f64s(&c["losses"]));
        let grads = out.loss.backward().unwrap();
        close_all(
            &format!("{name} d/d policy_chosen"),
            &grad_of(&grads, &pc),
            &f64s(&c["grad_policy_chosen"]),
        );
        close_all(
            &format!("{name} d/d policy_rejected"),
            &grad_of(&grads, &pr),
            &f64s(&c["grad_policy_rejected"]),
        );
        assert!(
            grads.get(&rc).is_none(),
            "{name}: gradient reached the reference"
        );

        let m = &c["metrics"];
        let f = |k: &str| m[k].as_f64().unwrap();
        let s = &out.stats;
        close(
            &format!("{name} rewards/chosen"),
            s.rewards_chosen,
            f("rewards/chosen"),
        );
        close(
            &format!("{name} rewards/rejected"),
            s.rewards_rejected,
            f("rewards/rejected"),
        );
        close(
            &format!("{name} rewards/margins"),
            s.rewards_margins,
            f("rewards/margins"),
        );
        // TRL takes the mean of a float32 0/1 tensor.
        close(
            &format!("{name} rewards/accuracies"),
            s.rewards_accuracies,
            f("rewards/accuracies"),
        );
        close(
            &format!("{name} logps/chosen"),
            s.logps_chosen,
            f("logps/chosen"),
        );
        close(
            &format!("{name} logps/rejected"),
            s.logps_rejected,
            f("logps/rejected"),
        );
        for i in 0..out.margins.len() {
            close(
                &format!("{name} margin[{i}]"),
                out.margins[i],
                out.chosen_rewards[i] - out.rejected_rewards[i],
            );
        }
    }
}

/// cDPO's smoothing is real: at ε = 0.1 the sigmoid loss differs from ε = 0 (TRL 1.16's own
/// `sigmoid` would give the same number for both, which is why the fixture uses `aot`).
#[test]
fn label_smoothing_changes_the_sigmoid_loss() {
    let fx = fixture();
    let cases = fx["dpo"].as_array().unwrap();
    let get = |n: &str| {
        cases
            .iter()
            .find(|c| c["name"] == n)
            .unwrap_or_else(|| panic!("no case {n}"))["loss"]
            .as_f64()
            .unwrap()
    };
    let (a, b) = (
        get("b0-sigmoid-beta0.1-ls0.0"),
        get("b0-sigmoid-beta0.1-ls0.1"),
    );
    assert!((a - b).abs() > 1e-3, "{a} vs {b}");
}

#[test]
fn reward_model_matches_trl() {
    let fx = fixture();
    let cases = fx["rm"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let rc = var(&f64s(&c["r_chosen"]));
        let rr = var(&f64s(&c["r_rejected"]));
        let margin = (!c["margin"].is_null()).then(|| tensor(&f64s(&c["margin"])));
        let center = c["center_rewards_coefficient"].as_f64();
        let out: RmOutput =
            reward_model_loss(rc.as_tensor(), rr.as_tensor(), margin.as_ref(), center).unwrap();
        close(
            &format!("{name} loss"),
            scalar(&out.loss),
            c["loss"].as_f64().unwrap(),
        );
        let grads = out.loss.backward().unwrap();
        close_all(
            &format!("{name} d/d r_chosen"),
            &grad_of(&grads, &rc),
            &f64s(&c["grad_chosen"]),
        );
        close_all(
            &format!("{name} d/d r_rejected"),
            &grad_of(&grads, &rr),
            &f64s(&c["grad_rejected"]),
        );
        let m = &c["metrics"];
        let f = |k: &str| m[k].as_f64().unwrap();
        let s = &out.stats;
        close(&format!("{name} accuracy"), s.accuracy, f("accuracy"));
        close(&format!("{name} margin"), s.margin, f("margin"));
        close(&format!("{name} min_reward"), s.min_reward, f("min_reward"));
        close(
            &format!("{name} mean_reward"),
            s.mean_reward,
            f("mean_reward"),
        );
        close(&format!("{name} max_reward"), s.max_reward, f("max_reward"));
    }
}

fn inputs<'a>(pc: &'a Tensor, pr: &'a Tensor, rc: &'a Tensor, rr: &'a Tensor) -> DpoInputs<'a> {
    DpoInputs {
        policy_chosen: pc,
        policy_rejected: pr,
        ref_chosen: rc,
        ref_rejected: rr,
        chosen_tokens: None,
        rejected_tokens: None,
    }
}

#[test]
fn dpo_refuses_bad_input() {
    let x = tensor(&[-3.0, -4.0, -5.0]);
    let short = tensor(&[-3.0, -4.0]);
    let ok = DpoConfig::default();
    assert_eq!(ok.loss_type, DpoLossType::Sigmoid);
    assert!(dpo_loss(&inputs(&x, &x, &x, &x), &ok).is_ok());

    let e = dpo_loss(&inputs(&x, &x, &short, &x), &ok)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("ref_chosen") && e.contains("[2]") && e.contains("[3]"),
        "{e}"
    );
    let e = dpo_loss(&inputs(&x, &short, &x, &x), &ok)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("policy_rejected"), "{e}");
    let two_d = Tensor::zeros((3, 1), DType::F32, &Device::Cpu).unwrap();
    assert!(dpo_loss(&inputs(&two_d, &two_d, &two_d, &two_d), &ok).is_err());

    for beta in [0.0, -0.1, f64::NAN, f64::INFINITY] {
        let cfg = DpoConfig { beta, ..ok.clone() };
        let e = dpo_loss(&inputs(&x, &x, &x, &x), &cfg)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("beta"), "beta {beta}: {e}");
    }
    for ls in [-0.1, 0.5, 0.7] {
        let cfg = DpoConfig {
            label_smoothing: ls,
            ..ok.clone()
        };
        let e = dpo_loss(&inputs(&x, &x, &x, &x), &cfg)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("label_smoothing"), "{ls}: {e}");
    }
    for lt in [DpoLossType::Ipo, DpoLossType::Hinge] {
        let cfg = DpoConfig {
            loss_type: lt,
            label_smoothing: 0.1,
            ..ok.clone()
        };
        let e = dpo_loss(&inputs(&x, &x, &x, &x), &cfg)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no effect") && e.contains(lt.as_str()), "{e}");
    }
    // IPO without token counts is refused, not silently unnormalised.
    let ipo = DpoConfig {
        loss_type: DpoLossType::Ipo,
        ..ok.clone()
    };
    let e = dpo_loss(&inputs(&x, &x, &x, &x), &ipo)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("chosen_tokens"), "{e}");
    let mut bad_tokens = inputs(&x, &x, &x, &x);
    bad_tokens.chosen_tokens = Some(&short);
    bad_tokens.rejected_tokens = Some(&x);
    let e = dpo_loss(&bad_tokens, &ipo).err().unwrap().to_string();
    assert!(e.contains("chosen_tokens") && e.contains("[2]"), "{e}");
    let empty = tensor(&[]);
    assert!(dpo_loss(&inputs(&empty, &empty, &empty, &empty), &ok).is_err());
    // Config from JSON: TRL's names; unknown keys rejected.
    let cfg: DpoConfig =
        serde_json::from_str(r#"{"beta": 0.2, "loss_type": "ipo", "label_smoothing": 0.0}"#)
            .unwrap();
    assert_eq!(cfg.loss_type, DpoLossType::Ipo);
    assert!(serde_json::from_str::<DpoConfig>(
        r#"{"beta": 0.2, "loss_type": "ipo", "label_smoothing": 0.0, "betta": 1}"#
    )
    .is_err());
}

#[test]
fn reward_model_refuses_bad_input() {
    let x = tensor(&[0.5, -1.0, 2.0]);
    let short = tensor(&[0.5, -1.0]);
    assert!(reward_model_loss(&x, &x, None, None).is_ok());
    let e = reward_model_loss(&x, &short, None, None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("r_rejected") && e.contains("[2]"), "{e}");
    let e = reward_model_loss(&x, &x, Some(&short), None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("margin"), "{e}");
    for c in [-0.01, f64::NAN] {
        let e = reward_model_loss(&x, &x, None, Some(c))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("center_rewards_coefficient"), "{e}");
    }
    // Equal rewards: loss log 2, accuracy 0 (strictly greater, as TRL).
    let out = reward_model_loss(&x, &x, None, None).unwrap();
    close("tie loss", scalar(&out.loss), std::f64::consts::LN_2);
    assert_eq!(out.stats.accuracy, 0.0);
}
