//! PPO rollout math (masks, KL-folded rewards, reward whitening, GAE, advantage whitening) and
//! the clipped policy + value loss with its gradients and logged stats, against TRL 1.12.0's own
//! `PPOTrainer.train` (the last TRL with PPO; fixture written by `fixtures/ppo/make_ppo_loss.py`).
//! Six cases: two batches (B = 5 and 6, T = 8) with EOS mid-row + junk after it, no EOS at full
//! width, EOS in the last slot, a one-token row and an empty row; k1 / k3; whitened rewards on /
//! off; several γ, λ, clip ranges and vf_coef. Plus refusals of bad input.

use candle_core::{DType, Device, Tensor, Var};
use ferrotune_train::ppo_loss::{
    explained_variance, gae, ppo_loss, ppo_masks, rollout, whiten, PpoConfig, PpoLossInputs,
    RolloutInputs,
};
use serde_json::Value;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../fixtures/ppo/ppo_loss.json"
);

/// f32 inputs and outputs: compare relative to max(1, |want|).
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

fn rows(v: &Value) -> Vec<Vec<f64>> {
    v.as_array().unwrap().iter().map(f64s).collect()
}

fn tensor2(r: &[Vec<f64>]) -> Tensor {
    let (b, t) = (r.len(), r[0].len());
    let flat: Vec<f32> = r.iter().flatten().map(|&x| x as f32).collect();
    Tensor::from_vec(flat, (b, t), &Device::Cpu).unwrap()
}

fn tensor1(xs: &[f64]) -> Tensor {
    let v: Vec<f32> = xs.iter().map(|&x| x as f32).collect();
    Tensor::from_vec(v, xs.len(), &Device::Cpu).unwrap()
}

fn host(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap()
}

fn close(name: &str, got: f64, want: f64) {
    assert!(
        (got - want).abs() <= TOL * want.abs().max(1.0),
        "{name}: got {got}, want {want}"
    );
}

fn close_rows(name: &str, got: &[Vec<f64>], want: &[Vec<f64>]) {
    assert_eq!(got.len(), want.len(), "{name}: rows");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{name}: row {i} width");
        for (j, (a, b)) in g.iter().zip(w).enumerate() {
            close(&format!("{name}[{i}][{j}]"), *a, *b);
        }
    }
}

fn config(c: &Value) -> PpoConfig {
    PpoConfig {
        kl_coef: c["kl_coef"].as_f64().unwrap(),
        kl_estimator: c["kl_estimator"].as_str().unwrap().parse().unwrap(),
        whiten_rewards: c["whiten_rewards"].as_bool().unwrap(),
        gamma: c["gamma"].as_f64().unwrap(),
        lam: c["lam"].as_f64().unwrap(),
        cliprange: c["cliprange"].as_f64().unwrap(),
        cliprange_value: c["cliprange_value"].as_f64().unwrap(),
        vf_coef: c["vf_coef"].as_f64().unwrap(),
    }
}

fn lengths(c: &Value) -> Vec<usize> {
    c["lengths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

#[test]
fn rollout_and_loss_match_trl() {
    let fx = fixture();
    assert_eq!(fx["trl_version"], "1.12.0");
    let cases = fx["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let cfg = config(c);
        let lens = lengths(c);
        let logprobs = tensor2(&rows(&c["logprobs"]));
        let ref_logprobs = tensor2(&rows(&c["ref_logprobs"]));
        let values = tensor2(&rows(&c["values"]));
        let scores = tensor1(&f64s(&c["scores"]));
        let ro = rollout(
            &RolloutInputs {
                logprobs: &logprobs,
                ref_logprobs: &ref_logprobs,
                values: &values,
                scores: &scores,
                lengths: &lens,
            },
            &cfg,
        )
        .unwrap();

        // Masks, exactly.
        assert_eq!(
            host(&ro.masks.response),
            rows(&c["response_mask"]),
            "{name}"
        );
        assert_eq!(host(&ro.masks.value), rows(&c["value_mask"]), "{name}");
        let width = rows(&c["logprobs"])[0].len();
        let m = ppo_masks(&lens, width, &Device::Cpu).unwrap();
        assert_eq!(host(&m.value), rows(&c["value_mask"]), "{name} ppo_masks");

        close_rows(&format!("{name} kl"), &host(&ro.kl), &rows(&c["kl"]));
        close_rows(
            &format!("{name} rewards"),
            &host(&ro.rewards),
            &rows(&c["rewards"]),
        );
        close_rows(
            &format!("{name} advantages"),
            &host(&ro.advantages),
            &rows(&c["advantages"]),
        );
        close_rows(
            &format!("{name} returns"),
            &host(&ro.returns),
            &rows(&c["returns"]),
        );

        // The building blocks on their own: GAE on TRL's rewards, then whitening.
        let trl_rewards = tensor2(&rows(&c["rewards"]));
        let (adv_raw, ret) = gae(&trl_rewards, &values, &m.value, cfg.gamma, cfg.lam).unwrap();
        close_rows(
            &format!("{name} gae returns"),
            &host(&ret),
            &rows(&c["returns"]),
        );
        let adv = whiten(&adv_raw, &m.response, true).unwrap();
        close_rows(
            &format!("{name} whiten"),
            &host(&adv),
            &rows(&c["advantages"]),
        );

        let ev = explained_variance(&ro.returns, &ro.values, &ro.masks.value).unwrap();
        close(
            &format!("{name} explained variance"),
            ev,
            c["explained_variance"].as_f64().unwrap(),
        );

        let mt = &c["metrics"];
        let f = |k: &str| mt[k].as_f64().unwrap();
        let s = &ro.stats;
        close(&format!("{name} objective/kl"), s.kl, f("objective/kl"));
        close(
            &format!("{name} objective/entropy"),
            s.entropy,
            f("objective/entropy"),
        );
        close(
            &format!("{name} objective/non_score_reward"),
            s.non_score_reward,
            f("objective/non_score_reward"),
        );
        close(
            &format!("{name} objective/rlhf_reward"),
            s.rlhf_reward,
            f("objective/rlhf_reward"),
        );
        close(
            &format!("{name} objective/scores"),
            s.scores,
            f("objective/scores"),
        );

        // One PPO micro-batch with the policy and value head moved away from the rollout.
        let new_lp = Var::from_tensor(&tensor2(&rows(&c["new_logprobs"]))).unwrap();
        let new_v = Var::from_tensor(&tensor2(&rows(&c["new_values"]))).unwrap();
        let out = ppo_loss(
            &PpoLossInputs {
                logprobs: new_lp.as_tensor(),
                old_logprobs: &logprobs,
                advantages: &ro.advantages,
                values: new_v.as_tensor(),
                old_values: &values,
                returns: &ro.returns,
                response_mask: &ro.masks.response,
                value_mask: &ro.masks.value,
            },
            &cfg,
        )
        .unwrap();
        assert_eq!(out.loss.dtype(), DType::F32);
        assert_eq!(out.loss.dims(), &[] as &[usize]);
        let loss = out
            .loss
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        close(&format!("{name} loss"), loss, c["loss"].as_f64().unwrap());
        let grads = out.loss.backward().unwrap();
        close_rows(
            &format!("{name} d loss/d logprobs"),
            &host(grads.get(new_lp.as_tensor()).unwrap()),
            &rows(&c["grad_logprobs"]),
        );
        close_rows(
            &format!("{name} d loss/d values"),
            &host(grads.get(new_v.as_tensor()).unwrap()),
            &rows(&c["grad_values"]),
        );
        let s = &out.stats;
        close(
            &format!("{name} loss/policy_avg"),
            s.pg_loss,
            f("loss/policy_avg"),
        );
        close(
            &format!("{name} loss/value_avg"),
            s.vf_loss,
            f("loss/value_avg"),
        );
        // TRL takes the clip fractions as means of float32 0/1 tensors.
        close(
            &format!("{name} policy/clipfrac"),
            s.pg_clipfrac,
            f("policy/clipfrac_avg"),
        );
        close(
            &format!("{name} val/clipfrac"),
            s.vf_clipfrac,
            f("val/clipfrac_avg"),
        );
        close(
            &format!("{name} policy/approxkl"),
            s.approxkl,
            f("policy/approxkl_avg"),
        );
        close(&format!("{name} val/ratio"), s.ratio_mean, f("val/ratio"));
        assert!(
            s.pg_clipfrac > 0.0 && s.vf_clipfrac > 0.0,
            "{name}: the case should exercise both clips"
        );
    }
}

/// Whatever a forward leaves in masked-out slots (here NaN and huge values) cannot reach the
/// rollout targets, the loss or its gradient.
#[test]
fn masked_slots_are_inert() {
    let fx = fixture();
    let c = &fx["cases"][3]; // batch b: has an empty row
    let cfg = config(c);
    let lens = lengths(c);
    let poison = |v: &Value, m: &Value, with: f64| -> Vec<Vec<f64>> {
        rows(v)
            .iter()
            .zip(rows(m))
            .map(|(r, mr)| {
                r.iter()
                    .zip(mr)
                    .map(|(&x, w)| if w == 0.0 { with } else { x })
                    .collect()
            })
            .collect()
    };
    let lp = tensor2(&poison(&c["logprobs"], &c["response_mask"], f64::NAN));
    let rlp = tensor2(&poison(&c["ref_logprobs"], &c["response_mask"], 1e30));
    let v = tensor2(&poison(&c["values"], &c["value_mask"], f64::NAN));
    let scores = tensor1(&f64s(&c["scores"]));
    let ro = rollout(
        &RolloutInputs {
            logprobs: &lp,
            ref_logprobs: &rlp,
            values: &v,
            scores: &scores,
            lengths: &lens,
        },
        &cfg,
    )
    .unwrap();
    close_rows("poisoned returns", &host(&ro.returns), &rows(&c["returns"]));
    close_rows(
        "poisoned advantages",
        &host(&ro.advantages),
        &rows(&c["advantages"]),
    );
    let new_lp = Var::from_tensor(&tensor2(&poison(
        &c["new_logprobs"],
        &c["response_mask"],
        500.0,
    )))
    .unwrap();
    let new_v = Var::from_tensor(&tensor2(&poison(
        &c["new_values"],
        &c["value_mask"],
        f64::NAN,
    )))
    .unwrap();
    let out = ppo_loss(
        &PpoLossInputs {
            logprobs: new_lp.as_tensor(),
            old_logprobs: &lp,
            advantages: &ro.advantages,
            values: new_v.as_tensor(),
            old_values: &v,
            returns: &ro.returns,
            response_mask: &ro.masks.response,
            value_mask: &ro.masks.value,
        },
        &cfg,
    )
    .unwrap();
    let loss = out
        .loss
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    close("poisoned loss", loss, c["loss"].as_f64().unwrap());
    let grads = out.loss.backward().unwrap();
    close_rows(
        "poisoned d/d logprobs",
        &host(grads.get(new_lp.as_tensor()).unwrap()),
        &rows(&c["grad_logprobs"]),
    );
    close_rows(
        "poisoned d/d values",
        &host(grads.get(new_v.as_tensor()).unwrap()),
        &rows(&c["grad_values"]),
    );
}

#[test]
fn ppo_refuses_bad_input() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
    let wide = Tensor::zeros((2, 5), DType::F32, &dev).unwrap();
    let s = Tensor::zeros(2, DType::F32, &dev).unwrap();
    let ok = PpoConfig::default();
    let ri = |logprobs, values, scores, lengths| RolloutInputs {
        logprobs,
        ref_logprobs: logprobs,
        values,
        scores,
        lengths,
    };
    assert!(rollout(&ri(&x, &x, &s, &[2, 3]), &ok).is_ok());
    let e = rollout(&ri(&x, &wide, &s, &[2, 3]), &ok)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("values") && e.contains("[2, 5]"), "{e}");
    let e = rollout(&ri(&x, &x, &s, &[2]), &ok)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("lengths"), "{e}");
    let e = rollout(&ri(&x, &x, &s, &[2, 5]), &ok)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("row 1") && e.contains("length 5"), "{e}");
    // One response token in the whole batch: whitening the advantages is undefined.
    let e = rollout(&ri(&x, &x, &s, &[1, 0]), &ok)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("whitening") && e.contains("advantages"), "{e}");

    for (field, cfg) in [
        (
            "gamma",
            PpoConfig {
                gamma: 1.5,
                ..ok.clone()
            },
        ),
        (
            "lam",
            PpoConfig {
                lam: -0.1,
                ..ok.clone()
            },
        ),
        (
            "cliprange",
            PpoConfig {
                cliprange: 1.0,
                ..ok.clone()
            },
        ),
        (
            "cliprange_value",
            PpoConfig {
                cliprange_value: -1.0,
                ..ok.clone()
            },
        ),
        (
            "kl_coef",
            PpoConfig {
                kl_coef: f64::NAN,
                ..ok.clone()
            },
        ),
        (
            "vf_coef",
            PpoConfig {
                vf_coef: -0.1,
                ..ok.clone()
            },
        ),
    ] {
        let e = rollout(&ri(&x, &x, &s, &[2, 3]), &cfg)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(field), "{field}: {e}");
    }

    let li = PpoLossInputs {
        logprobs: &x,
        old_logprobs: &x,
        advantages: &x,
        values: &x,
        old_values: &x,
        returns: &x,
        response_mask: &x,
        value_mask: &x,
    };
    assert!(ppo_loss(&li, &ok).is_ok());
    let e = ppo_loss(
        &PpoLossInputs {
            returns: &wide,
            ..li
        },
        &ok,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("returns") && e.contains("[2, 5]"), "{e}");
    assert!(whiten(&x, &wide, true).is_err());
    assert!(gae(&x, &wide, &x, 1.0, 0.95).is_err());

    // Config from JSON: TRL's names and defaults; unknown keys rejected.
    let cfg: PpoConfig = serde_json::from_str(r#"{"kl_estimator": "k3", "gamma": 0.99}"#).unwrap();
    assert_eq!(
        cfg,
        PpoConfig {
            kl_estimator: "k3".parse().unwrap(),
            gamma: 0.99,
            ..ok.clone()
        }
    );
    assert!(serde_json::from_str::<PpoConfig>(r#"{"kl_coeff": 0.1}"#).is_err());
}
