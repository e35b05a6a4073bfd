//! `ferrotune compare` and the training-time regression gate on a constructed case with the
//! embedded demo model (models/demo, pretrained by `ferrotune pretrain`): checkpoints of known
//! quality — adapters SFT-trained on the answer format, an all-zero adapter (exactly the
//! base), and an adapter trained to repeat one word (deliberately worse) — are ranked by the
//! format reward, and only the damaged one is flagged for a perplexity regression on the
//! held-out English text; the same damage stops a run that has `stop_on_regression`.

mod common;

use common::*;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

fn demo() -> PathBuf {
    root().join("models/demo")
}

/// Copy checkpoint `from` to `to`, replacing every lora_B with `f(B)`.
fn derive(from: &Path, to: &Path, f: &dyn Fn(&Tensor) -> Tensor) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    let file = to.join("adapter_model.safetensors");
    let ts = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let out: std::collections::HashMap<String, Tensor> = ts
        .into_iter()
        .map(|(k, v)| {
            let v = if k.contains("lora_B") { f(&v) } else { v };
            (k, v)
        })
        .collect();
    candle_core::safetensors::save(&out, &file).unwrap();
}

/// SFT config text for the demo model.
fn sft_config(dir: &Path, name: &str, train: &Path, lr: f64, extra: &str) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(
        &p,
        format!(
            "[model]\npath = \"{model}\"\n[lora]\nr = 8\nlora_alpha = 16\n[data]\ntrain = \"{train}\"\nmax_seq_len = 96\n[optim]\nlearning_rate = {lr}\nlr_scheduler_type = \"constant\"\n[run]\noutput_dir = \"{out}\"\nbatch_size = 8\nlog_every = 5\n{extra}\n[sft]\n",
            model = demo().display(),
            train = train.display(),
            lr = lr,
            out = dir.join(name).display()
        ),
    )
    .unwrap();
    p
}

/// The first ~3000 characters of the demo's held-out English (a short "do not forget" set).
fn forget(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(demo().join("eval/english.txt")).unwrap();
    let cut = text.char_indices().nth(3000).map_or(text.len(), |(i, _)| i);
    let p = dir.join("forget.txt");
    std::fs::write(&p, &text[..cut]).unwrap();
    p
}

/// (format data, junk data, eval task) in `dir`.
fn data(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (mut fmt, mut task) = (String::new(), String::new());
    for a in 1..=20 {
        for b in [3, 8] {
            let q = format!("What is {a} + {b}?");
            fmt.push_str(
                &serde_json::json!({"prompt": [{"role": "user", "content": q}],
                    "completion": [{"role": "assistant", "content": format!("The answer is <answer>{}</answer>.", a + b)}]})
                .to_string(),
            );
            fmt.push('\n');
            if a <= 8 {
                task.push_str(
                    &serde_json::json!({"prompt": [{"role": "user", "content": q}], "answer": (a + b).to_string()})
                        .to_string(),
                );
                task.push('\n');
            }
        }
    }
    let junk = serde_json::json!({"text": "zebra ".repeat(60)}).to_string() + "\n";
    let paths = (
        dir.join("fmt.jsonl"),
        dir.join("junk.jsonl"),
        dir.join("task.jsonl"),
    );
    std::fs::write(&paths.0, fmt).unwrap();
    std::fs::write(&paths.1, junk.repeat(16)).unwrap();
    std::fs::write(&paths.2, task).unwrap();
    paths
}

#[test]
fn compare_ranks_constructed_checkpoints_and_flags_the_damaged_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (fmt, junk, task) = data(tmp.path());
    let run = tmp.path().join("run");
    ok(&ferrotune(&[
        "train",
        "--config",
        sft_config(
            tmp.path(),
            "run",
            &fmt,
            3e-3,
            "max_steps = 20\nsave_every = 10",
        )
        .to_str()
        .unwrap(),
    ]));
    ok(&ferrotune(&[
        "train",
        "--config",
        sft_config(tmp.path(), "junk", &junk, 1e-2, "max_steps = 20")
            .to_str()
            .unwrap(),
    ]));
    let ck = run.join("checkpoints");
    derive(&ck.join("step-10"), &ck.join("step-30"), &|b| {
        b.zeros_like().unwrap()
    });
    derive(
        &tmp.path().join("junk/checkpoints/step-20"),
        &ck.join("step-40"),
        &|b| b.clone(),
    );
    let o = ferrotune(&[
        "compare",
        run.to_str().unwrap(),
        "--task",
        task.to_str().unwrap(),
        "--rewards",
        "[{name=\"format_tags\", tags=[\"answer\"]}, {name=\"answer_match\"}]",
        "--forget-set",
        forget(tmp.path()).to_str().unwrap(),
        "--max-new-tokens",
        "12",
    ]);
    ok(&o);
    let stdout = String::from_utf8_lossy(&o.stdout);
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(run.join("compare.json")).unwrap()).unwrap();
    let get = |name: &str| rows.iter().find(|r| r["name"] == name).unwrap().clone();
    let (base, zero, junk) = (get("base"), get("step-30"), get("step-40"));
    // The zero adapter is the base model: same answers, same perplexity.
    assert_eq!(zero["mean_reward"], base["mean_reward"], "{stdout}");
    assert!(
        (zero["ppl_ratio"].as_f64().unwrap() - 1.0).abs() < 1e-4,
        "{stdout}"
    );
    assert_eq!(base["ppl_ratio"].as_f64().unwrap(), 1.0);
    // Only the damaged adapter is a regression.
    assert_eq!(junk["regression"], true, "{stdout}");
    for r in [&base, &zero, &get("step-10"), &get("step-20")] {
        assert_eq!(r["regression"], false, "{stdout}");
    }
    // The format-trained checkpoints beat the base; ranks are by mean reward, best first.
    let rank = |name: &str| rows.iter().position(|r| r["name"] == name).unwrap();
    assert!(rank("step-20") < rank("base"), "{stdout}");
    assert!(rank("step-10") < rank("base"), "{stdout}");
    let rewards: Vec<f64> = rows
        .iter()
        .map(|r| r["mean_reward"].as_f64().unwrap())
        .collect();
    assert!(rewards.windows(2).all(|w| w[0] >= w[1]), "{stdout}");
    assert!(run.join("plots/compare.png").exists());
    assert!(stdout.contains("REGRESSION"), "{stdout}");
}

#[test]
fn regression_gate_stops_training_and_keeps_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, junk, _) = data(tmp.path());
    let english = forget(tmp.path());
    let cfg = sft_config(
        tmp.path(),
        "gate",
        &junk,
        1e-2,
        &format!(
            "max_steps = 60\nsave_every = 2\neval_every = 2\n[eval]\nforget_set = \"{}\"\nmax_ppl_ratio = 1.05\nstop_on_regression = true",
            english.display()
        ),
    );
    let o = ferrotune(&["train", "--config", cfg.to_str().unwrap()]);
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("REGRESSION at step"), "{err}");
    let metrics: Vec<serde_json::Value> =
        std::fs::read_to_string(tmp.path().join("gate/metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let ratios: Vec<(u64, f64)> = metrics
        .iter()
        .filter_map(|m| {
            Some((
                m["step"].as_u64()?,
                m.get("eval/forget_ppl_ratio")?.as_f64()?,
            ))
        })
        .collect();
    let (stop_step, last) = *ratios.last().unwrap();
    assert!(last > 1.05, "{ratios:?}");
    assert!(stop_step < 60, "the run did not stop: {ratios:?}");
    assert!(
        ratios[..ratios.len() - 1].iter().all(|r| r.1 <= 1.05),
        "{ratios:?}"
    );
    // The regressed state was not saved; the newest checkpoint is the last good one.
    let ck = tmp.path().join("gate/checkpoints");
    assert!(!ck.join(format!("step-{stop_step}")).exists());
    if stop_step > 2 {
        assert!(ck
            .join(format!("step-{}", stop_step - 2))
            .join("COMPLETE")
            .exists());
    }
}
