//! PPO end to end through the real binary on the tiny chat model (fixtures/tiny-chat, random
//! weights, made by make_tiny_chat.py): a reward model is trained by the `[reward_model]`
//! trainer on fixtures/tiny-chat/sevens-prefs.jsonl (make_sevens_prefs.py: the chosen reply says
//! 7), then `[ppo]` with that reward model raises its score while the KL to the reference stays
//! bounded; the run folder has TRL's metrics, completions, plots and checkpoints with the value
//! head; the first PPO pass trains on the sampler's own log-probs (ratio 1); resume is exact.

mod common;

use common::*;

use std::path::{Path, PathBuf};

fn train(cfg: &Path) {
    let out = ferrotune(&["train", "--config", cfg.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A PPO config on the sevens prompts; `reward` is the `[ppo]` reward line(s).
fn config(dir: &Path, run: &str, extra_run: &str, reward: &str, extra_ppo: &str) -> PathBuf {
    let text = format!(
        r#"[model]
path = "{model}"

[lora]
r = 8
lora_alpha = 16
target_modules = "all-linear"

[data]
train = "{train}"

[optim]
learning_rate = 1e-2
lr_scheduler_type = "constant"

[run]
output_dir = "{run}"
batch_size = 16
log_every = 1
seed = 1
{extra_run}

[ppo]
max_completion_len = 8
temperature = 1.0
num_ppo_epochs = 2
num_mini_batches = 2
{reward}
{extra_ppo}
"#,
        model = root().join("fixtures/tiny-chat/model").display(),
        train = root().join("fixtures/tiny-chat/sevens.jsonl").display(),
        run = dir.join(run).display(),
    );
    let p = dir.join(format!("{run}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

const SAYS_SEVEN: &str =
    r#"rewards = [{ name = "answer_match", extract = "regex", pattern = "(7)" }]"#;

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

fn tensors(p: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap()
}

#[test]
fn ppo_raises_the_reward_model_score_with_bounded_kl() {
    let tmp = tempfile::tempdir().unwrap();
    // 1. The reward model, through the CLI (configs/rm-sevens-tiny.toml, run here).
    let rm = tmp.path().join("rm");
    let rm_cfg = tmp.path().join("rm.toml");
    let text = std::fs::read_to_string(root().join("configs/rm-sevens-tiny.toml"))
        .unwrap()
        .replace(
            "\"../fixtures/",
            &format!("\"{}/fixtures/", root().display()),
        )
        .replace(
            "\"../runs/rm-sevens-tiny\"",
            &format!("\"{}\"", rm.display()),
        );
    std::fs::write(&rm_cfg, text).unwrap();
    train(&rm_cfg);
    // 2. PPO on its score.
    let reward = format!("reward_model_path = \"{}\"", rm.display());
    let cfg = config(
        tmp.path(),
        "run",
        "max_steps = 40\nsave_every = 20",
        &reward,
        "",
    );
    train(&cfg);
    let run = tmp.path().join("run");
    let scores = metric(&run, "objective/scores");
    assert_eq!(scores.len(), 40);
    assert_eq!(scores, metric(&run, "rewards/reward_model/mean"));
    // Windows of 10 steps × 32 completions. Measured over seeds 1-5: the score rises by
    // 1.0 to 1.5 (about -4.4 -> -3.2); the step-to-step noise of a step's mean is about 0.4,
    // so a 10-step window mean varies by about 0.13, and 0.5 is well beyond it.
    let (first, last) = (mean(&scores[..10]), mean(&scores[30..]));
    assert!(
        last > first + 0.5,
        "the reward-model score did not rise: {first:.3} -> {last:.3} ({scores:?})"
    );
    // KL per completion (TRL's objective/kl: the k1 estimate summed over the ≤ 8 tokens).
    // Bound: ln V (V = 384 tokens), the KL of collapsing one token of the completion onto a
    // single choice under a near-uniform random reference. Staying below it means the
    // policy bought its score with less than one collapsed token; measured: at most 2.3.
    let kl = metric(&run, "objective/kl");
    let bound = (384f64).ln();
    assert!(
        kl.iter().all(|&k| k.is_finite() && k < bound),
        "KL left its bound {bound:.2}: {kl:?}"
    );
    assert!(
        mean(&kl[30..]) > 0.1,
        "the policy did not move away from the reference: {kl:?}"
    );
    for key in [
        "objective/kl",
        "objective/entropy",
        "objective/non_score_reward",
        "objective/rlhf_reward",
        "policy/approxkl_avg",
        "policy/clipfrac_avg",
        "loss/policy_avg",
        "loss/value_avg",
        "val/clipfrac_avg",
        "val/ratio",
        "val/explained_variance",
        "grad_norm",
    ] {
        let v = metric(&run, key);
        assert_eq!(v.len(), 40, "{key} not logged every step");
        assert!(v.iter().all(|x| x.is_finite()), "{key}: {v:?}");
    }
    // The value head learns the returns: its explained variance ends clearly above 0.
    let ev = metric(&run, "val/explained_variance");
    assert!(mean(&ev[30..]) > 0.1, "value head explains nothing: {ev:?}");
    for f in [
        "config.toml",
        "metrics.jsonl",
        "completions.jsonl",
        "plots/objective_scores.png",
        "checkpoints/step-20/adapter_model.safetensors",
        "checkpoints/step-20/value_head.safetensors",
        "checkpoints/step-40/COMPLETE",
    ] {
        assert!(run.join(f).exists(), "missing {f}");
    }
    // Every adapter weight and the value head moved (B and the head start at zero).
    let ck = run.join("checkpoints/step-40");
    for (k, t) in tensors(&ck.join("adapter_model.safetensors")) {
        if k.contains("lora_B") {
            assert!(flat(&t).iter().any(|&x| x != 0.0), "{k} did not train");
        }
    }
    let head = tensors(&ck.join("value_head.safetensors"));
    assert_eq!(head["v_head.summary.weight"].dims(), &[1, 64]);
    assert_eq!(head["v_head.summary.bias"].dims(), &[1]);
    assert!(flat(&head["v_head.summary.weight"])
        .iter()
        .any(|&x| x != 0.0));
    let first_line = std::fs::read_to_string(run.join("completions.jsonl")).unwrap();
    let rec: serde_json::Value = serde_json::from_str(first_line.lines().next().unwrap()).unwrap();
    for k in [
        "step",
        "prompt",
        "completion",
        "rewards",
        "reward",
        "advantage",
    ] {
        assert!(rec.get(k).is_some(), "completions.jsonl lacks {k}: {rec}");
    }
}

/// One epoch, one mini-batch: the only update is taken on the rollout itself, so the policy
/// that is trained is the one that sampled. The trainer's log-probs at the response slots must
/// equal the sampler's (ratio 1, nothing clipped) — a slot misaligned by one token would give
/// ratios far from 1.
#[test]
fn the_first_pass_trains_on_the_samplers_own_log_probs() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(
        tmp.path(),
        "run",
        "max_steps = 3",
        SAYS_SEVEN,
        "num_ppo_epochs = 1\nnum_mini_batches = 1\nmissing_eos_penalty = 1.0",
    );
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("num_ppo_epochs = 2\nnum_mini_batches = 2\n", "");
    std::fs::write(&cfg, text).unwrap();
    train(&cfg);
    let run = tmp.path().join("run");
    let ratio = metric(&run, "val/ratio");
    let clip = metric(&run, "policy/clipfrac_avg");
    let approxkl = metric(&run, "policy/approxkl_avg");
    assert_eq!(ratio.len(), 3);
    for i in 0..3 {
        assert!((ratio[i] - 1.0).abs() < 1e-4, "ratio {ratio:?}");
        assert_eq!(clip[i], 0.0, "clipped on the sampling policy: {clip:?}");
        assert!(approxkl[i] < 1e-8, "approx KL {approxkl:?}");
    }
    // The score is the reward minus the missing-EOS penalty of the truncated completions.
    let scores = metric(&run, "objective/scores");
    let reward = metric(&run, "rewards/answer_match/mean");
    let clipped = metric(&run, "completions/clipped_ratio");
    for i in 0..3 {
        assert!(
            (scores[i] - (reward[i] - clipped[i])).abs() < 1e-6,
            "step {i}: score {} != reward {} - penalty x {}",
            scores[i],
            reward[i],
            clipped[i]
        );
    }
}

#[test]
fn ppo_resume_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = "max_steps = 4\nsave_every = 2";
    let a = config(tmp.path(), "a", extra, SAYS_SEVEN, "");
    train(&a);
    let b = config(tmp.path(), "b", extra, SAYS_SEVEN, "");
    train(&b);
    let run_b = tmp.path().join("b");
    std::fs::remove_dir_all(run_b.join("checkpoints/step-4")).unwrap();
    let out = ferrotune(&["train", "--resume", run_b.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "adapter_model.safetensors",
        "optimizer.safetensors",
        "value_head.safetensors",
    ] {
        let x = tensors(&tmp.path().join("a/checkpoints/step-4").join(f));
        let y = tensors(&run_b.join("checkpoints/step-4").join(f));
        assert_eq!(x.len(), y.len());
        for (k, v) in &x {
            assert!(
                flat(v) == flat(&y[k]),
                "{f} {k} differs between straight and resumed runs"
            );
        }
    }
    let a_run = tmp.path().join("a");
    for key in ["objective/scores", "objective/kl", "loss/value_avg"] {
        assert_eq!(metric(&a_run, key), metric(&run_b, key), "{key}");
    }
    // Each step's completions once: those logged after the step-2 checkpoint before the
    // resume were cut back and logged again.
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap();
    let (straight, resumed) = (
        read(a_run.join("completions.jsonl")),
        read(run_b.join("completions.jsonl")),
    );
    assert!(
        !straight.is_empty() && straight == resumed,
        "completions.jsonl: {} lines in the straight run, {} in the resumed one",
        straight.lines().count(),
        resumed.lines().count()
    );
}

#[test]
fn a_ppo_config_without_a_reward_fails_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "bad", "max_steps = 2", "", "");
    let out = ferrotune(&["train", "--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.trim().lines().last().unwrap_or("");
    assert!(
        last.starts_with("error:") && last.contains("ppo.rewards"),
        "{err}"
    );
    assert!(!tmp.path().join("bad").exists());
}
