//! DPO end to end through the real binary on the tiny chat model (fixtures/tiny-chat, random
//! weights, made by make_tiny_chat.py), on preference pairs made by `ferrotune data gen
//! preferences`: the chosen reply is tagged (`The answer is <answer>N</answer>.`), the rejected
//! one is not — a preference that holds on every prompt, so it is learnable from the train
//! pairs and measurable on held-out ones (`--exclude`). DPO must raise the held-out implicit-
//! reward accuracy (margin > 0) from 0 (policy = reference at the start) to above 0.9, and the
//! policy's own held-out preference (logπ(chosen) > logπ(rejected)) above where the base model
//! had it; every adapter weight moves; resume is exact; bad configs fail with one line.

mod common;

use common::*;

use std::path::{Path, PathBuf};

const SYSTEM: &str = "Answer with the number inside <answer></answer> tags.";

/// Train and held-out preference files (chat form), generated through the CLI.
fn data(dir: &Path) -> (PathBuf, PathBuf) {
    let (train, eval) = (dir.join("train.jsonl"), dir.join("eval.jsonl"));
    let gen = |n: &str, seed: &str, out: &Path, exclude: Option<&Path>| {
        let mut args = vec![
            "data",
            "gen",
            "preferences",
            "--n",
            n,
            "--seed",
            seed,
            "--digits",
            "1..2",
            "--ops",
            "+-",
            "--rejected",
            "untagged",
            "--chat",
            "--system",
            SYSTEM,
            "--out",
            out.to_str().unwrap(),
        ];
        if let Some(e) = exclude {
            args.extend(["--exclude", e.to_str().unwrap()]);
        }
        ok(&ferrotune(&args));
    };
    gen("160", "1", &train, None);
    gen("40", "2", &eval, Some(&train));
    (train, eval)
}

fn config(dir: &Path, run: &str, train: &Path, eval: &Path, lora: &str, dpo: &str) -> PathBuf {
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
max_steps = 16
batch_size = 16
log_every = 1
eval_every = 8
save_every = 8
seed = 1

[dpo]
beta = 0.1
max_length = 96
{dpo}
"#,
        model = root().join("fixtures/tiny-chat/model").display(),
        train = train.display(),
        eval = eval.display(),
        run = dir.join(run).display(),
    );
    let p = dir.join(format!("{run}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

const LORA: &str = "[lora]\nr = 8\nlora_alpha = 16\ntarget_modules = \"all-linear\"";

#[test]
fn dpo_learns_the_held_out_preference_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, eval) = data(tmp.path());
    let cfg = config(tmp.path(), "a", &train, &eval, LORA, "");
    let out = ferrotune(&["train", "--config", cfg.to_str().unwrap()]);
    ok(&out);
    let run = tmp.path().join("a");

    // Held-out accuracy: 0 before training (every margin is exactly 0), > 0.9 after.
    let acc = metric_at(&run, "eval/rewards/accuracies");
    assert_eq!(acc.iter().map(|a| a.0).collect::<Vec<_>>(), vec![0, 8, 16]);
    assert_eq!(acc[0].1, 0.0);
    assert!(acc[2].1 > 0.9, "held-out accuracy {acc:?}");
    let margins = metric_at(&run, "eval/rewards/margins");
    assert_eq!(margins[0].1, 0.0);
    assert!(margins[2].1 > 0.0, "{margins:?}");
    let loss = metric_at(&run, "eval/loss");
    assert!(
        (loss[0].1 - std::f64::consts::LN_2).abs() < 1e-6,
        "{loss:?}"
    );
    assert!(loss[2].1 < loss[0].1, "{loss:?}");
    // The policy's own preference on held-out pairs rose above the base model's.
    let pol = metric_at(&run, "eval/policy_accuracy");
    assert!(pol[0].1 < pol[2].1 && pol[2].1 > 0.9, "{pol:?}");
    // TRL's per-step names are all logged.
    for k in [
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "grad_norm",
        "learning_rate",
    ] {
        assert_eq!(metric_at(&run, k).len(), 16, "{k}");
    }
    // Every adapter matrix moved: B from its zero init, A between the two checkpoints.
    let mid = load(run.join("checkpoints/step-8/adapter_model.safetensors"));
    let end = load(run.join("checkpoints/step-16/adapter_model.safetensors"));
    assert!(!end.is_empty());
    for (k, v) in &end {
        let v = flat(v);
        if k.contains("lora_B") {
            assert!(v.iter().any(|&x| x != 0.0), "{k} never moved");
        }
        assert_ne!(v, flat(&mid[k]), "{k} did not change from step 8 to 16");
    }

    // Resume: a copy of the run interrupted after step 8 (its step-16 checkpoint removed)
    // continues to the same weights, optimizer state and metrics.
    let b = tmp.path().join("b");
    copy_dir(&run, &b);
    std::fs::remove_dir_all(b.join("checkpoints/step-16")).unwrap();
    let sets = format!("run.output_dir={}", b.display());
    let out = ferrotune(&["train", "--resume", b.to_str().unwrap(), "--set", &sets]);
    ok(&out);
    for f in ["adapter_model.safetensors", "optimizer.safetensors"] {
        let x = load(run.join("checkpoints/step-16").join(f));
        let y = load(b.join("checkpoints/step-16").join(f));
        assert_eq!(x.len(), y.len());
        for (k, v) in &x {
            assert!(flat(v) == flat(&y[k]), "{f} {k} differs after resume");
        }
    }
    for k in [
        "loss",
        "rewards/margins",
        "grad_norm",
        "eval/rewards/accuracies",
        "eval/rewards/margins",
        "eval/loss",
    ] {
        assert_eq!(
            metric_at(&run, k),
            metric_at(&b, k),
            "{k} differs after resume"
        );
    }
}

#[test]
fn bad_dpo_configs_fail_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, eval) = (tmp.path().join("t.jsonl"), tmp.path().join("e.jsonl"));
    for (i, (lora, dpo, needles)) in [
        ("", "", &["dpo", "[lora]"][..]),
        (
            LORA,
            "loss_type = \"robust\"",
            &["dpo.loss_type", "robust", "sigmoid, ipo, hinge"][..],
        ),
        (
            LORA,
            "loss_type = \"ipo\"\nlabel_smoothing = 0.1",
            &["dpo.label_smoothing"][..],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let cfg = config(tmp.path(), &format!("bad{i}"), &train, &eval, lora, dpo);
        let out = ferrotune(&["train", "--config", cfg.to_str().unwrap()]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        for n in needles {
            assert!(err.contains(n), "{n:?} not in {err}");
        }
    }
    // A bad row names the file and its line.
    std::fs::write(
        &train,
        "{\"prompt\": \"q\", \"chosen\": \" a\", \"rejected\": \" b\"}\n{\"prompt\": \"q\", \"chosen\": \" a\"}\n",
    )
    .unwrap();
    std::fs::copy(&train, &eval).unwrap();
    let cfg = config(tmp.path(), "badrow", &train, &eval, LORA, "");
    let out = ferrotune(&["train", "--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("t.jsonl:2") && err.contains("rejected"),
        "{err}"
    );
}

/// Runs `cfg` with `--set` overrides into `out` and returns its step-`step` adapter.
fn adapter_after(
    cfg: &Path,
    out: &Path,
    step: usize,
    sets: &[&str],
) -> std::collections::HashMap<String, candle_core::Tensor> {
    let dir = format!("run.output_dir={}", out.display());
    let mut args = vec!["train", "--config", cfg.to_str().unwrap(), "--set", &dir];
    for s in sets {
        args.extend(["--set", s]);
    }
    ok(&ferrotune(&args));
    load(out.join(format!("checkpoints/step-{step}/adapter_model.safetensors")))
}

fn max_abs_diff(
    x: &std::collections::HashMap<String, candle_core::Tensor>,
    y: &std::collections::HashMap<String, candle_core::Tensor>,
) -> f64 {
    assert_eq!(x.len(), y.len());
    x.iter()
        .flat_map(|(k, v)| {
            flat(v)
                .into_iter()
                .zip(flat(&y[k]))
                .map(|(a, b)| (a - b).abs())
                .collect::<Vec<_>>()
        })
        .fold(0.0, f64::max)
}

/// Invariants of the step: batch 2 × accumulation 4 = batch 8 × accumulation 1 (each
/// micro-batch's mean loss is weighted by its share of the pairs), and reference log-probs
/// cached once at the start equal the ones computed batch by batch (the reference never
/// changes).
#[test]
fn accumulation_and_precomputed_reference_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, eval) = data(tmp.path());
    let cfg = config(tmp.path(), "base", &train, &eval, LORA, "");
    let common = ["run.max_steps=2", "run.eval_every=0", "run.save_every=0"];
    let with =
        |extra: &[&'static str]| -> Vec<&str> { common.iter().chain(extra).copied().collect() };
    let one = adapter_after(
        &cfg,
        &tmp.path().join("b8"),
        2,
        &with(&["run.batch_size=8"]),
    );
    let acc = adapter_after(
        &cfg,
        &tmp.path().join("b2x4"),
        2,
        &with(&["run.batch_size=2", "run.gradient_accumulation_steps=4"]),
    );
    let d = max_abs_diff(&one, &acc);
    assert!(d < 1e-5, "batch 8 x 1 vs 2 x 4: adapters differ by {d}");
    let pre = adapter_after(
        &cfg,
        &tmp.path().join("pre"),
        2,
        &with(&["run.batch_size=8", "dpo.precompute_ref_log_probs=true"]),
    );
    let d = max_abs_diff(&one, &pre);
    assert!(d < 1e-6, "precomputed reference: adapters differ by {d}");
    // The cache is on disk, one (chosen, rejected) pair per train pair, and a resumed run
    // reads it instead of computing it again.
    let pre_dir = tmp.path().join("pre");
    let cache: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pre_dir.join("ref_logps.json")).unwrap())
            .unwrap();
    assert_eq!(cache["logps"].as_array().unwrap().len(), 160);
    // The reference is named by the base it is (path and dtype), so log-probs of another base
    // with the same tokenizer are never read back as this one's.
    let reference = cache["reference"].as_str().unwrap();
    assert!(
        reference.starts_with("adapters-off of ")
            && reference.contains("tiny-chat")
            && reference.ends_with("(f32)"),
        "{reference}"
    );
    let out = ferrotune(&[
        "train",
        "--resume",
        pre_dir.to_str().unwrap(),
        "--set",
        "run.max_steps=3",
    ]);
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("read reference log-probs of 160 pairs"),
        "{err}"
    );
    // The step moved the adapters at all (so the comparisons above are not vacuous).
    assert!(one
        .iter()
        .any(|(k, v)| k.contains("lora_B") && flat(v).iter().any(|&x| x.abs() > 1e-4)));
}

/// Full fine-tuning against a separate reference model (`dpo.ref_model`, TRL's `ref_model`):
/// at the start the policy is the reference, so every held-out margin is 0 and the loss is
/// exactly ln 2 (−log σ(0)); training raises the held-out accuracy. A reference with another
/// tokenizer is refused in one line.
#[test]
fn full_fine_tuning_against_a_separate_reference_model() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, eval) = data(tmp.path());
    let model = root().join("fixtures/tiny-chat/model");
    let dpo = format!("ref_model = \"{}\"", model.display());
    let cfg = config(tmp.path(), "full", &train, &eval, "", &dpo);
    ok(&ferrotune(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "optim.learning_rate=1e-3",
    ]));
    let run = tmp.path().join("full");
    let loss = metric_at(&run, "eval/loss");
    assert!(
        (loss[0].1 - std::f64::consts::LN_2).abs() < 1e-6,
        "{loss:?}"
    );
    let acc = metric_at(&run, "eval/rewards/accuracies");
    assert_eq!(acc[0].1, 0.0);
    assert!(acc.last().unwrap().1 > 0.9, "held-out accuracy {acc:?}");
    assert!(run.join("checkpoints/step-16/model.safetensors").is_file());

    let other = root().join("models/demo");
    let dpo = format!("ref_model = \"{}\"", other.display());
    let cfg = config(tmp.path(), "mismatch", &train, &eval, "", &dpo);
    let out = ferrotune(&["train", "--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("dpo.ref_model") && err.contains("tokenizer"),
        "{err}"
    );
}
