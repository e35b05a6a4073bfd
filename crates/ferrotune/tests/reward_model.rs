//! Reward-model training end to end through the real binary on the tiny chat model
//! (fixtures/tiny-chat, random weights, made by make_tiny_chat.py), on the committed preference
//! pairs (fixtures/tiny-chat/prefs-*.jsonl, written by `ferrotune data gen preferences`, see
//! configs/dpo-tiny.toml): the chosen reply is tagged, the rejected one is not — a preference that
//! holds on every prompt, so it is learnable from the train pairs and measurable on the held-out
//! ones. The held-out pairwise accuracy must beat 0.9; the merged export must load back as a
//! sequence-classification model and score as the trained adapters do; resume is exact; the
//! model then serves as a GRPO reward (`name = "model"`); bad configs fail with one line.
//!
//! That transformers loads the export and scores the same is checked on the export code itself
//! by ferrotune-ckpt's reward export test (crates/ferrotune-ckpt/tests/reward_export.rs,
//! fixtures/reward/make_reward_fixture.py).

mod common;

use common::*;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ferrotune::model_reward::ModelReward;
use ferrotune_data::{preference_examples, read_rows, tokenize_preferences_all};
use ferrotune_models::{LoadOptions, RewardModel};
use ferrotune_nn::Mode;
use ferrotune_tokenize::{Message, Tokenizer};

fn model_dir() -> PathBuf {
    root().join("fixtures/tiny-chat/model")
}

const LORA: &str = "[lora]\nr = 8\nlora_alpha = 16\ntarget_modules = \"all-linear\"";

fn config(dir: &Path, run: &str, lora: &str, extra: &str) -> PathBuf {
    let text = format!(
        r#"[model]
path = "{model}"

{lora}

[data]
train = "{train}"
eval = "{eval}"

[optim]
learning_rate = 1e-2
lr_scheduler_type = "constant"

[run]
output_dir = "{run}"
max_steps = 6
batch_size = 16
log_every = 1
eval_every = 3
save_every = 3
seed = 1

[reward_model]
max_length = 96
{extra}
"#,
        model = model_dir().display(),
        train = root()
            .join("fixtures/tiny-chat/prefs-train.jsonl")
            .display(),
        eval = root().join("fixtures/tiny-chat/prefs-eval.jsonl").display(),
        run = dir.join(run).display(),
    );
    let p = dir.join(format!("{run}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

/// The held-out pairs as the trainer tokenizes them: (chosen, rejected) sequences.
fn eval_pairs() -> Vec<(Vec<u32>, Vec<u32>)> {
    let tok = Tokenizer::from_dir(&model_dir()).unwrap();
    let path = root().join("fixtures/tiny-chat/prefs-eval.jsonl");
    let rows = read_rows(&path).unwrap();
    let ex = preference_examples(&rows, &path).unwrap();
    tokenize_preferences_all(&tok, &ex, 96)
        .unwrap()
        .items
        .into_iter()
        .map(|p| (p.chosen.ids, p.rejected.ids))
        .collect()
}

/// Scores of every chosen then every rejected sequence.
fn scores(rm: &RewardModel, pairs: &[(Vec<u32>, Vec<u32>)]) -> (Vec<f32>, Vec<f32>) {
    let c: Vec<Vec<u32>> = pairs.iter().map(|p| p.0.clone()).collect();
    let r: Vec<Vec<u32>> = pairs.iter().map(|p| p.1.clone()).collect();
    (
        rm.score_sequences(&c, Mode::EVAL).unwrap(),
        rm.score_sequences(&r, Mode::EVAL).unwrap(),
    )
}

#[test]
fn reward_model_learns_exports_resumes_and_serves_as_a_grpo_reward() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "a", LORA, "");
    let out = ferrotune(&["train", "--config", cfg.to_str().unwrap()]);
    ok(&out);
    let run = tmp.path().join("a");

    // Held-out pairwise accuracy beats 0.9 (from near chance with the fresh head), and the
    // held-out loss fell from about ln 2.
    let acc = metric_at(&run, "eval/accuracy");
    assert_eq!(acc.iter().map(|a| a.0).collect::<Vec<_>>(), vec![0, 3, 6]);
    assert!(acc[2].1 > 0.9, "held-out accuracy {acc:?}");
    let loss = metric_at(&run, "eval/loss");
    assert!((loss[0].1 - std::f64::consts::LN_2).abs() < 0.1, "{loss:?}");
    assert!(loss[2].1 < 0.5 * loss[0].1, "{loss:?}");
    assert!(metric_at(&run, "eval/margin")[2].1 > 0.0);
    // TRL's names are logged every step.
    for k in [
        "loss",
        "accuracy",
        "margin",
        "min_reward",
        "mean_reward",
        "max_reward",
        "rewards/chosen",
        "rewards/rejected",
        "num_tokens",
        "grad_norm",
        "learning_rate",
    ] {
        assert_eq!(metric_at(&run, k).len(), 6, "{k}");
    }

    // The checkpoint is a PEFT SEQ_CLS adapter: LoRA + the head, every matrix moved.
    let ck = run.join("checkpoints/step-6");
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg_json["task_type"], "SEQ_CLS");
    let mid = load(run.join("checkpoints/step-3/adapter_model.safetensors"));
    let end = load(ck.join("adapter_model.safetensors"));
    assert!(end.contains_key("base_model.model.score.weight"));
    assert!(end.len() > 1);
    for (k, v) in &end {
        let v = flat(v);
        if k.contains("lora_B") {
            assert!(v.iter().any(|&x| x != 0.0), "{k} never moved");
        }
        assert_ne!(v, flat(&mid[k]), "{k} did not change from step 3 to 6");
    }

    // The merged export is a one-label LlamaForSequenceClassification folder that scores as
    // the trained adapters on the base do, and its held-out accuracy and mean reward are the
    // ones the trainer logged at the last step.
    let export = run.join("reward_model");
    let hf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(export.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(hf["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(hf["pad_token_id"], 0);
    assert!(export.join("tokenizer.json").is_file());
    let merged = RewardModel::load(&export, &LoadOptions::default()).unwrap();
    let unmerged =
        ferrotune_ckpt::load_reward_adapter(&model_dir(), &ck, &LoadOptions::default()).unwrap();
    let pairs = eval_pairs();
    let (mc, mr) = scores(&merged, &pairs);
    let (uc, ur) = scores(&unmerged, &pairs);
    let max_diff = mc
        .iter()
        .chain(&mr)
        .zip(uc.iter().chain(&ur))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        max_diff < 1e-4,
        "merged vs adapter scores differ by {max_diff}"
    );
    let wins = mc.iter().zip(&mr).filter(|(c, r)| c > r).count();
    let export_acc = wins as f64 / pairs.len() as f64;
    assert_eq!(export_acc, acc[2].1, "accuracy of the export vs the log");
    let mean = mc.iter().chain(&mr).map(|&x| x as f64).sum::<f64>() / (2 * pairs.len()) as f64;
    let logged = metric_at(&run, "eval/mean_reward")[2].1;
    assert!((mean - logged).abs() < 1e-4, "{mean} vs {logged}");

    // The `model` reward, given the run folder, scores a rendered chat prompt + the bare reply
    // text (what GRPO decodes) exactly as the trainer scored the rendered conversation.
    let reward = ModelReward::load(&run, &Device::Cpu).unwrap();
    let tok = Tokenizer::from_dir(&model_dir()).unwrap();
    let prompt = vec![
        Message::system("Answer with the number inside <answer></answer> tags."),
        Message::user("What is 12 + 30?"),
    ];
    let p = tok.render_text(&prompt, true).unwrap();
    let replies = ["The answer is <answer>42</answer>.", "The answer is 42."];
    let got = reward
        .score_texts(&[(p.as_str(), replies[0]), (p.as_str(), replies[1])])
        .unwrap();
    let seqs: Vec<Vec<u32>> = replies
        .iter()
        .map(|r| {
            let mut m = prompt.clone();
            m.push(Message::assistant(*r));
            tok.render(&m, false).unwrap().ids
        })
        .collect();
    let want = merged.score_sequences(&seqs, Mode::EVAL).unwrap();
    assert!(
        got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5),
        "{got:?} vs {want:?}"
    );
    assert!(got[0] > got[1], "the tagged reply scores higher: {got:?}");

    // Resume: a copy interrupted after step 3 (its step-6 checkpoint and export removed)
    // continues to the same weights, optimizer state, metrics and export.
    let b = tmp.path().join("b");
    copy_dir(&run, &b);
    std::fs::remove_dir_all(b.join("checkpoints/step-6")).unwrap();
    std::fs::remove_dir_all(b.join("reward_model")).unwrap();
    let sets = format!("run.output_dir={}", b.display());
    ok(&ferrotune(&[
        "train",
        "--resume",
        b.to_str().unwrap(),
        "--set",
        &sets,
    ]));
    for f in [
        "checkpoints/step-6/adapter_model.safetensors",
        "checkpoints/step-6/optimizer.safetensors",
        "reward_model/model.safetensors",
    ] {
        let (x, y) = (load(run.join(f)), load(b.join(f)));
        assert_eq!(x.len(), y.len());
        for (k, v) in &x {
            assert!(flat(v) == flat(&y[k]), "{f} {k} differs after resume");
        }
    }
    for k in [
        "loss",
        "accuracy",
        "grad_norm",
        "eval/accuracy",
        "eval/loss",
    ] {
        assert_eq!(
            metric_at(&run, k),
            metric_at(&b, k),
            "{k} differs after resume"
        );
    }

    // The trained model as a GRPO reward: two steps, its score logged under its label.
    let g = tmp.path().join("grpo.toml");
    std::fs::write(
        &g,
        format!(
            r#"[model]
path = "{model}"
[lora]
r = 4
[data]
train = "{train}"
[run]
output_dir = "{out}"
max_steps = 2
batch_size = 4
log_every = 1
seed = 1
[grpo]
num_generations = 2
max_completion_len = 6
rewards = [{{ name = "model", path = "a" }}, {{ name = "format_tags", tags = ["answer"] }}]
"#,
            model = model_dir().display(),
            train = root().join("fixtures/tiny-chat/sevens.jsonl").display(),
            out = tmp.path().join("g").display(),
        ),
    )
    .unwrap();
    ok(&ferrotune(&["train", "--config", g.to_str().unwrap()]));
    let m = metric_at(&tmp.path().join("g"), "rewards/model/mean");
    assert_eq!(m.len(), 2, "{m:?}");
    assert!(m.iter().all(|(_, v)| v.is_finite() && *v != 0.0), "{m:?}");
    assert!(metric_at(&tmp.path().join("g"), "rewards/failures")
        .iter()
        .all(|(_, v)| *v == 0.0));

    // A reward path that is not a reward model fails at once, naming the entry.
    let bad = std::fs::read_to_string(&g)
        .unwrap()
        .replace("path = \"a\"", "path = \"no-such-rm\"")
        .replace("/g\"", "/g2\"");
    std::fs::write(&g, bad).unwrap();
    let out = ferrotune(&["train", "--config", g.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("grpo.rewards[0].path") && err.contains("no-such-rm"),
        "{err}"
    );
}

#[test]
fn bad_reward_model_configs_fail_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, (lora, extra, needles)) in [
        ("", "", &["reward_model", "[lora]"][..]),
        (
            LORA,
            "center_rewards_coefficient = -1.0",
            &["reward_model.center_rewards_coefficient"][..],
        ),
        (LORA, "beta = 0.1", &["beta"][..]),
    ]
    .into_iter()
    .enumerate()
    {
        let cfg = config(tmp.path(), &format!("bad{i}"), lora, extra);
        let out = ferrotune(&["train", "--config", cfg.to_str().unwrap()]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        for n in needles {
            assert!(err.contains(n), "{n:?} not in {err}");
        }
    }
}

/// Runs `cfg` with `--set` overrides into `out`; returns its step-`step` checkpoint weights.
fn weights_after(cfg: &Path, out: &Path, step: usize, sets: &[&str]) -> HashMap<String, Tensor> {
    let dir = format!("run.output_dir={}", out.display());
    let mut args = vec!["train", "--config", cfg.to_str().unwrap(), "--set", &dir];
    for s in sets {
        args.extend(["--set", s]);
    }
    ok(&ferrotune(&args));
    load(out.join(format!("checkpoints/step-{step}/adapter_model.safetensors")))
}

/// Batch 2 × accumulation 4 = batch 8 × accumulation 1 for the adapters and the head (each
/// micro-batch's mean loss is weighted by its share of the pairs); a `margin` column enters the
/// loss as TRL's −logσ(r_c − r_r − margin): with margin 5 on every pair, the first step's loss is
/// about −logσ(−5) ≈ 5.007 instead of about ln 2.
#[test]
fn accumulation_changes_nothing_and_margins_enter_the_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "base", LORA, "");
    let common = ["run.max_steps=2", "run.eval_every=0", "run.save_every=0"];
    let with =
        |extra: &[&'static str]| -> Vec<&str> { common.iter().chain(extra).copied().collect() };
    let one = weights_after(
        &cfg,
        &tmp.path().join("b8"),
        2,
        &with(&["run.batch_size=8"]),
    );
    let acc = weights_after(
        &cfg,
        &tmp.path().join("b2x4"),
        2,
        &with(&["run.batch_size=2", "run.gradient_accumulation_steps=4"]),
    );
    assert_eq!(one.len(), acc.len());
    let mut d = 0.0f64;
    for (k, v) in &one {
        for (a, b) in flat(v).into_iter().zip(flat(&acc[k])) {
            d = d.max((a - b).abs());
        }
    }
    assert!(d < 1e-5, "batch 8 x 1 vs 2 x 4: weights differ by {d}");
    assert!(flat(&one["base_model.model.score.weight"])
        .iter()
        .zip(flat(
            &load(tmp.path().join("b8/reward_model/model.safetensors"))["score.weight"]
        ))
        .all(|(a, b)| (a - b).abs() < 1e-6));

    // Every train row with margin 5.
    let src = root().join("fixtures/tiny-chat/prefs-train.jsonl");
    let with_margin: String = std::fs::read_to_string(src)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["margin"] = serde_json::json!(5.0);
            format!("{v}\n")
        })
        .collect();
    let train = tmp.path().join("margin.jsonl");
    std::fs::write(&train, with_margin).unwrap();
    let out = tmp.path().join("m");
    let sets = [
        format!("run.output_dir={}", out.display()),
        format!("data.train={}", train.display()),
        "data.eval_fraction=0.0".into(),
        "run.max_steps=1".into(),
        "run.eval_every=0".into(),
    ];
    let mut args = vec!["train", "--config", cfg.to_str().unwrap()];
    for s in &sets {
        args.extend(["--set", s]);
    }
    // data.eval has no margin column: refused, naming both files' keys.
    let out_err = ferrotune(&args);
    assert!(!out_err.status.success());
    let err = String::from_utf8_lossy(&out_err.stderr);
    assert!(err.contains("margin") && err.contains("data.eval"), "{err}");
    args.extend(["--set", "data.eval_fraction=0.1"]);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("eval = "))
        .collect::<Vec<_>>()
        .join("\n");
    let cfg2 = tmp.path().join("no-eval.toml");
    std::fs::write(&cfg2, text).unwrap();
    args[2] = cfg2.to_str().unwrap();
    ok(&ferrotune(&args));
    let loss = metric_at(&out, "loss");
    assert_eq!(loss.len(), 1);
    assert!((loss[0].1 - 5.0067).abs() < 0.1, "{loss:?}");
}
