//! GRPO advantages, completion mask, loss, gradient and logged stats against TRL 1.16's own
//! `GRPOTrainer._generate_and_score_completions` and `_compute_loss` (fixture written by
//! `fixtures/grpo/make_grpo_loss.py`). Every case runs at TRL's `GRPOConfig` defaults except
//! the fields its name and its `trl_defaults_changed` list say — so β > 0 cases have TRL's
//! default `use_bias_correction_kl = true`, and the `-no_bias_correction_kl` cases turn it
//! off. Cases: loss_type × scale_rewards × beta × num_iterations (48, B = 2 groups × G = 4,
//! T = 8, one truncated and one empty row), bias correction off, mask_truncated_completions,
//! clip-higher, GSPO (sequence-level weights), cispo, sapo, luspo, delta, top-entropy masking,
//! two-micro-batch accumulation, and advantage-only cases with a zero-variance group and an
//! unscorable (NaN) reward.

use candle_core::{DType, Device, Tensor, Var};
use ferrotune_train::grpo_loss::{
    advantages, completion_mask, group_stats, grpo_loss, GrpoLossError, LossConfig, LossInputs,
    LossStats, LossType, ScaleRewards,
};
use serde_json::Value;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../fixtures/grpo/grpo_loss.json"
);

/// TRL's `nanstd` computes the Bessel factor `count / (count - 1)` from integer counts, which
/// torch divides in float32 (the default dtype) even for float64 rewards; we use f64, so
/// advantages agree to ~2e-8 relative, not to f64 precision.
const ADV_TOL: f64 = 1e-7;

fn fixture() -> Value {
    serde_json::from_str(&std::fs::read_to_string(FIXTURE).unwrap()).unwrap()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap_or(f64::NAN)) // null = unscorable reward
        .collect()
}

fn rows(v: &Value) -> Vec<Vec<f64>> {
    v.as_array().unwrap().iter().map(f64s).collect()
}

fn tensor(rows: &[Vec<f64>]) -> Tensor {
    let (b, t) = (rows.len(), rows[0].len());
    let flat: Vec<f32> = rows.iter().flatten().map(|&x| x as f32).collect();
    Tensor::from_vec(flat, (b, t), &Device::Cpu).unwrap()
}

fn close(name: &str, got: f64, want: f64, tol: f64) {
    assert!(
        (got - want).abs() <= tol || (got.is_nan() && want.is_nan()),
        "{name}: got {got}, want {want} (tol {tol})"
    );
}

/// One micro-batch through ferrotune: (loss, d loss / d logps, stats).
struct Run {
    loss: f64,
    grad: Vec<Vec<f64>>,
    stats: LossStats,
}

fn run(c: &Value, range: std::ops::Range<usize>, cfg: &LossConfig, adv: &[f64]) -> Run {
    let sl = |v: &Value| -> Option<Vec<Vec<f64>>> {
        (!v.is_null()).then(|| rows(v)[range.clone()].to_vec())
    };
    let logps = Var::from_tensor(&tensor(&sl(&c["logps"]).unwrap())).unwrap();
    let old = sl(&c["old_logps"]).map(|r| tensor(&r));
    let refl = sl(&c["ref_logps"]).map(|r| tensor(&r));
    let mask = tensor(&sl(&c["mask"]).unwrap());
    let ent = tensor(&sl(&c["entropy"]).unwrap());
    let adv: Vec<f32> = adv[range.clone()].iter().map(|&a| a as f32).collect();
    let adv = Tensor::from_vec(adv, range.len(), &Device::Cpu).unwrap();
    let out = grpo_loss(
        &LossInputs {
            logps: logps.as_tensor(),
            old_logps: old.as_ref(),
            ref_logps: refl.as_ref(),
            mask: &mask,
            advantages: &adv,
            entropies: Some(&ent),
        },
        cfg,
    )
    .unwrap();
    assert_eq!(out.loss.dtype(), DType::F32);
    assert_eq!(out.loss.dims(), &[] as &[usize]);
    let grads = out.loss.backward().unwrap();
    let grad = grads.get(logps.as_tensor()).unwrap();
    let grad: Vec<Vec<f64>> = grad.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
    Run {
        loss: out.loss.to_dtype(DType::F64).unwrap().to_scalar().unwrap(),
        grad,
        stats: out.stats,
    }
}

/// The case's config: `LossConfig::new` (our TRL defaults) with only the fields the fixture
/// changed from TRL's defaults set from it, so a default that drifted from TRL's would fail.
fn config(c: &Value, num_items: f64) -> LossConfig {
    let lt: LossType = c["loss_type"].as_str().unwrap().parse().unwrap();
    let mut cfg = LossConfig::new(lt, c["max_completion_length"].as_u64().unwrap() as usize);
    cfg.num_items_in_batch = Some(num_items);
    let f = |k: &str| c[k].as_f64().unwrap();
    for key in c["trl_defaults_changed"].as_array().unwrap() {
        match key.as_str().unwrap() {
            "loss_type" | "scale_rewards" | "num_iterations" | "mask_truncated_completions" => {}
            "steps_per_generation" => {}
            "beta" => cfg.beta = f("beta"),
            "epsilon" => cfg.epsilon_low = f("epsilon"),
            "epsilon_high" => cfg.epsilon_high = f("epsilon_high"),
            "gradient_accumulation_steps" => {
                cfg.accum_steps = c["gradient_accumulation_steps"].as_u64().unwrap() as usize
            }
            "importance_sampling_level" => {
                cfg.importance_sampling_level = c["importance_sampling_level"]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap()
            }
            "use_bias_correction_kl" => {
                cfg.use_bias_correction_kl = c["use_bias_correction_kl"].as_bool().unwrap()
            }
            "delta" => cfg.delta = Some(f("delta")),
            "sapo_temperature_pos" => cfg.sapo_temperature_pos = f("sapo_temperature_pos"),
            "sapo_temperature_neg" => cfg.sapo_temperature_neg = f("sapo_temperature_neg"),
            "top_entropy_quantile" => cfg.top_entropy_quantile = f("top_entropy_quantile"),
            k => panic!("fixture changes {k}, which the test does not map"),
        }
    }
    // TRL's epsilon_high falls back to epsilon, as ours does in the config.
    if !c["trl_defaults_changed"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k == "epsilon_high")
    {
        cfg.epsilon_high = cfg.epsilon_low;
    }
    assert_eq!(cfg.epsilon_high, f("epsilon_high"), "{}", c["name"]);
    cfg
}

/// Advantages, stats, mask and num_items from our code, checked against the case; returns
/// (advantages, num_items_in_batch).
fn check_pipeline(c: &Value) -> (Vec<f64>, f64) {
    let name = c["name"].as_str().unwrap();
    let g = c["group_size"].as_u64().unwrap() as usize;
    let scale: ScaleRewards = c["scale_rewards"].as_str().unwrap().parse().unwrap();
    let rewards = f64s(&c["rewards"]);
    let adv = advantages(&rewards, g, scale).unwrap();
    for (i, (a, w)) in adv.iter().zip(f64s(&c["advantages"])).enumerate() {
        close(&format!("{name} advantage[{i}]"), *a, w, ADV_TOL);
    }
    let st = group_stats(&rewards, g).unwrap();
    close(
        &format!("{name} reward"),
        st.reward_mean,
        c["reward_mean"].as_f64().unwrap(),
        1e-9,
    );
    close(
        &format!("{name} reward_std"),
        st.reward_std,
        c["reward_std"].as_f64().unwrap(),
        ADV_TOL,
    );
    if scale != ScaleRewards::Batch {
        let want = c["frac_reward_zero_std"].as_f64().unwrap();
        close(
            &format!("{name} frac_reward_zero_std"),
            st.frac_zero_std(),
            want,
            1e-6,
        );
    }

    let lengths: Vec<usize> = c["lengths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let truncated: Vec<bool> = c["truncated"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_bool().unwrap())
        .collect();
    let width = c["max_completion_length"].as_u64().unwrap() as usize;
    let mask_truncated = c["mask_truncated_completions"].as_bool().unwrap();
    let mask = completion_mask(&lengths, &truncated, width, mask_truncated).unwrap();
    let want: Vec<f32> = rows(&c["mask"])
        .iter()
        .flatten()
        .map(|&x| x as f32)
        .collect();
    assert_eq!(mask, want, "{name}: completion mask");
    let num_items: f64 = mask.iter().map(|&m| m as f64).sum();
    assert_eq!(
        num_items,
        c["num_items_in_batch"].as_f64().unwrap(),
        "{name}"
    );
    (adv, num_items)
}

fn check_stats(name: &str, s: &LossStats, m: &Value) {
    for (key, ours) in [
        ("kl", s.kl_mean),
        ("entropy", s.entropy_mean),
        ("cispo_clip_ratio", s.cispo_clip),
    ] {
        match (ours, m.get(key)) {
            (Some(k), Some(w)) => close(&format!("{name} {key}"), k, w.as_f64().unwrap(), 1e-6),
            (None, None) => {}
            (a, b) => panic!("{name}: {key} presence differs: ours {a:?}, TRL {b:?}"),
        }
    }
    if m.get("clip_ratio/low_mean").is_none() {
        // cispo and sapo: TRL logs no clip ratios.
        return close(
            &format!("{name} ratio_mean"),
            s.ratio_mean,
            m["ratio_mean"].as_f64().unwrap(),
            1e-6,
        );
    }
    // TRL computes the clip fractions in f32.
    let f = |k: &str| m[k].as_f64().unwrap_or(f64::NAN);
    close(
        &format!("{name} clip low"),
        s.clip_low,
        f("clip_ratio/low_mean"),
        1e-6,
    );
    close(
        &format!("{name} clip high"),
        s.clip_high,
        f("clip_ratio/high_mean"),
        1e-6,
    );
    close(
        &format!("{name} clip region"),
        s.clip_region,
        f("clip_ratio/region_mean"),
        1e-6,
    );
    close(
        &format!("{name} low_min"),
        s.clip_low_seq_min,
        f("clip_ratio/low_min"),
        1e-6,
    );
    close(
        &format!("{name} high_max"),
        s.clip_high_seq_max,
        f("clip_ratio/high_max"),
        1e-6,
    );
    close(
        &format!("{name} ratio_mean"),
        s.ratio_mean,
        f("ratio_mean"),
        1e-6,
    );
    close(
        &format!("{name} ratio dev"),
        s.ratio_max_abs_dev,
        f("ratio_max_abs_dev"),
        1e-6,
    );
}

fn check_grad(name: &str, got: &[Vec<f64>], want: &[Vec<f64>], tol: f64) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        for (j, (a, b)) in g.iter().zip(w).enumerate() {
            close(&format!("{name} grad[{i}][{j}]"), *a, *b, tol);
        }
    }
}

#[test]
fn whole_batch_cases_match_trl() {
    let fx = fixture();
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 90, "fixture has {} cases", cases.len());
    let mut clipped_cases = 0;
    let (mut max_loss_err, mut max_grad_err) = (0.0f64, 0.0f64);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let (adv, num_items) = check_pipeline(c);
        let b = adv.len();
        let r = run(c, 0..b, &config(c, num_items), &adv);
        close(
            &format!("{name} loss"),
            r.loss,
            c["loss"][0].as_f64().unwrap(),
            1e-6,
        );
        check_grad(name, &r.grad, &rows(&c["grad"]), 1e-5);
        check_stats(name, &r.stats, &c["metrics"][0]);
        max_loss_err = max_loss_err.max((r.loss - c["loss"][0].as_f64().unwrap()).abs());
        for (g, w) in r
            .grad
            .iter()
            .flatten()
            .zip(rows(&c["grad"]).iter().flatten())
        {
            max_grad_err = max_grad_err.max((g - w).abs());
        }
        // Masked positions (padding, empty and truncation-masked rows) get no gradient.
        for (mrow, grow) in rows(&c["mask"]).iter().zip(&r.grad) {
            for (m, g) in mrow.iter().zip(grow) {
                if *m == 0.0 {
                    assert_eq!(*g, 0.0, "{name}: gradient on a masked token");
                }
            }
        }
        if r.stats.clip_region > 0.0 {
            clipped_cases += 1;
        }
    }
    eprintln!(
        "{} cases: max |loss - TRL| = {max_loss_err:.2e}, max |grad - TRL| = {max_grad_err:.2e}",
        cases.len()
    );
    // The fixture must exercise the clipped branch, or the clip parity above proves little.
    assert!(clipped_cases >= 24, "only {clipped_cases} cases clip");
}

#[test]
fn micro_batches_match_trl_accumulation() {
    let fx = fixture();
    let whole: Vec<&Value> = fx["cases"].as_array().unwrap().iter().collect();
    for c in fx["micro"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let (adv, num_items) = check_pipeline(c);
        let cfg = config(c, num_items);
        assert_eq!(cfg.accum_steps, 2);
        let mut sum: Vec<Vec<f64>> = Vec::new();
        for (k, s) in c["micro_batches"].as_array().unwrap().iter().enumerate() {
            let (lo, hi) = (
                s[0].as_u64().unwrap() as usize,
                s[1].as_u64().unwrap() as usize,
            );
            let r = run(c, lo..hi, &cfg, &adv);
            close(
                &format!("{name} loss[{k}]"),
                r.loss,
                c["loss"][k].as_f64().unwrap(),
                1e-6,
            );
            check_stats(&format!("{name}[{k}]"), &r.stats, &c["metrics"][k]);
            sum.extend(r.grad);
        }
        check_grad(name, &sum, &rows(&c["grad"]), 1e-5);

        // The same batch in one call with no accumulation, from the whole-batch fixture case.
        let lt = c["loss_type"].as_str().unwrap();
        let whole_name = match name {
            "cispo-micro2" => "cispo-eps_high1.2-beta0.04".to_string(),
            "sapo-micro2" => "sapo-1.0-1.05-token-beta0.04".to_string(),
            "luspo-micro2" => "luspo-sequence-beta0.04".to_string(),
            // The entropy quantile is per micro-batch (TRL), so the split trains other tokens:
            // only TRL's own two calls above are the reference.
            "top_entropy0.2-dapo-micro2" => continue,
            _ => format!("{lt}-group-beta0.04-mu2"),
        };
        let w = whole
            .iter()
            .find(|w| w["name"].as_str().unwrap() == whole_name)
            .unwrap();
        let whole_grad = rows(&w["grad"]);
        let max_diff = sum
            .iter()
            .flatten()
            .zip(whole_grad.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        if lt == "bnpo" {
            // Local token mean: the halves hold 16 and 21 tokens, so the split differs (TRL too).
            assert!(
                max_diff > 1e-3,
                "bnpo split unexpectedly equals the whole batch"
            );
        } else {
            assert!(
                max_diff < 1e-5,
                "{name}: micro-batch sum differs from whole by {max_diff}"
            );
        }
    }
}

#[test]
fn accumulation_is_exact_for_any_dapo_split() {
    // dapo with the global token count: an uneven 3 + 5 split still sums to the whole batch.
    let fx = fixture();
    let c = fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "dapo-batch-beta0.04-mu2")
        .unwrap();
    let (adv, num_items) = check_pipeline(c);
    let cfg = config(c, num_items);
    let mut sum = run(c, 0..3, &cfg, &adv).grad;
    sum.extend(run(c, 3..8, &cfg, &adv).grad);
    check_grad("dapo 3+5", &sum, &rows(&c["grad"]), 1e-5);
}

#[test]
fn advantage_cases_match_trl() {
    let fx = fixture();
    for c in fx["advantage_cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let scale: ScaleRewards = c["scale_rewards"].as_str().unwrap().parse().unwrap();
        let rewards = f64s(&c["rewards"]);
        let adv = advantages(&rewards, 4, scale).unwrap();
        for (i, (a, w)) in adv.iter().zip(f64s(&c["advantages"])).enumerate() {
            close(&format!("{name} advantage[{i}]"), *a, w, ADV_TOL);
        }
        let st = group_stats(&rewards, 4).unwrap();
        assert_eq!((st.zero_std_groups, st.groups, st.unscorable), (1, 3, 1));
        if scale != ScaleRewards::Batch {
            let want = c["frac_reward_zero_std"].as_f64().unwrap();
            close(
                &format!("{name} frac zero std"),
                st.frac_zero_std(),
                want,
                1e-6,
            );
        }
        close(
            &format!("{name} reward"),
            st.reward_mean,
            c["reward_mean"].as_f64().unwrap(),
            1e-9,
        );
        close(
            &format!("{name} std"),
            st.reward_std,
            c["reward_std"].as_f64().unwrap(),
            ADV_TOL,
        );
    }
}

#[test]
fn names_parse_and_print() {
    for lt in LossType::ALL {
        assert_eq!(lt.to_string().parse::<LossType>().unwrap(), lt);
        let json = serde_json::to_string(&lt).unwrap();
        assert_eq!(json, format!("\"{lt}\""));
    }
    for s in [ScaleRewards::Group, ScaleRewards::Batch, ScaleRewards::None] {
        assert_eq!(s.to_string().parse::<ScaleRewards>().unwrap(), s);
    }
    let e = "ppo".parse::<LossType>().unwrap_err().to_string();
    assert!(e.contains("ppo") && e.contains("dr_grpo"), "{e}");
    assert!("mean".parse::<ScaleRewards>().is_err());
}

#[test]
fn bad_inputs_are_refused_with_reasons() {
    assert!(matches!(
        advantages(&[1.0, 2.0, 3.0], 2, ScaleRewards::Group),
        Err(GrpoLossError::Groups {
            len: 3,
            group_size: 2
        })
    ));
    assert!(advantages(&[1.0], 0, ScaleRewards::Group).is_err());
    assert!(completion_mask(&[3], &[false], 2, false).is_err());
    assert!(completion_mask(&[1, 2], &[false], 2, false).is_err());

    let dev = Device::Cpu;
    let lp = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
    let mask = Tensor::ones((2, 3), DType::F32, &dev).unwrap();
    let adv = Tensor::ones(2, DType::F32, &dev).unwrap();
    let inputs = LossInputs {
        logps: &lp,
        old_logps: None,
        ref_logps: None,
        mask: &mask,
        advantages: &adv,
        entropies: None,
    };
    let mut cfg = LossConfig::new(LossType::Dapo, 3);
    let e = grpo_loss(&inputs, &cfg).err().unwrap().to_string();
    assert!(e.contains("num_items_in_batch"), "{e}");
    cfg.loss_type = LossType::Grpo;
    cfg.beta = 0.04;
    let e = grpo_loss(&inputs, &cfg).err().unwrap().to_string();
    assert!(e.contains("ref_logps"), "{e}");
    cfg.beta = 0.0;
    cfg.accum_steps = 0;
    assert!(grpo_loss(&inputs, &cfg).is_err());
    cfg.accum_steps = 1;
    let short = Tensor::ones(3, DType::F32, &dev).unwrap();
    let e = grpo_loss(
        &LossInputs {
            advantages: &short,
            ..inputs
        },
        &cfg,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("advantages") && e.contains("[3]"), "{e}");
    // On-policy (μ = 1), ratio 1: grpo loss = −mean(A) = −1.
    let out = grpo_loss(&inputs, &cfg).unwrap();
    close(
        "on-policy loss",
        out.loss.to_scalar::<f32>().unwrap() as f64,
        -1.0,
        1e-7,
    );
}

/// The per-token entropy `top_entropy_quantile` ranks by: ferrotune's chunked op against TRL's
/// `entropy_from_logits` on the same tempered logits, in one chunk and in chunks of 2 rows.
#[test]
fn token_entropy_matches_trl() {
    let fx = fixture();
    let c = &fx["entropy_case"];
    let (hidden, w) = (tensor(&rows(&c["hidden"])), tensor(&rows(&c["w"])));
    let temp = c["temperature"].as_f64().unwrap();
    let want = f64s(&c["entropy"]);
    for chunk in [0, 2] {
        let got = ferrotune_nn::ops::token_entropy_chunked(&hidden, &w, temp, chunk).unwrap();
        let got = got.to_vec1::<f32>().unwrap();
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            close(&format!("entropy[{i}] chunk {chunk}"), *g as f64, *w, 1e-5);
        }
    }
    let bad = ferrotune_nn::ops::token_entropy(&hidden, &w, 0.0);
    assert!(bad.is_err());
}

/// The fixture can tell the two KL forms apart: with β > 0, TRL's default (bias-corrected) and
/// `use_bias_correction_kl = false` differ in gradient far beyond the 1e-5 parity tolerance,
/// on-policy (μ = 1, where the weight's value is 1 but its gradient is not) and off-policy.
/// (Before the option existed, ferrotune's KL was the plain form and its fixture pinned
/// `use_bias_correction_kl = False`, so the parity test could not see the difference.)
#[test]
fn bias_corrected_kl_differs_from_plain_k3() {
    let fx = fixture();
    let cases = fx["cases"].as_array().unwrap();
    let by_name = |n: &str| cases.iter().find(|c| c["name"] == n).unwrap();
    for lt in ["grpo", "dr_grpo", "dapo", "bnpo"] {
        for mu in [1, 2] {
            let on = by_name(&format!("{lt}-group-beta0.04-mu{mu}"));
            let off = by_name(&format!("{lt}-group-beta0.04-mu{mu}-no_bias_correction_kl"));
            assert_eq!(on["use_bias_correction_kl"], true);
            assert_eq!(off["use_bias_correction_kl"], false);
            let diff = rows(&on["grad"])
                .iter()
                .flatten()
                .zip(rows(&off["grad"]).iter().flatten())
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            // ≥ 5× the 1e-5 gradient tolerance of the parity tests (dr_grpo's gradients are
            // the smallest: it divides by rows × max_completion_length).
            assert!(diff > 5e-5, "{lt} mu{mu}: gradients differ by only {diff}");
        }
    }
}
