//! `ferrotune compare` on a constructed run: checkpoints whose quality is known by
//! construction — the trained adapter, an all-zero adapter (exactly the base), and one with
//! large random B matrices (deliberately worse) — are ranked by mean reward, and only the
//! damaged one is flagged for a perplexity regression on the held-out text.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn ferrotune(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(args)
        .output()
        .unwrap()
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

#[test]
fn compare_ranks_constructed_checkpoints_and_flags_the_damaged_one() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let cfg = tmp.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[model]
path = "{model}"
[lora]
r = 8
lora_alpha = 16
[data]
train = "{train}"
eval = "{train}"
[optim]
learning_rate = 1e-2
lr_scheduler_type = "constant"
[run]
output_dir = "{run}"
batch_size = 32
max_steps = 10
save_every = 10
seed = 1
[grpo]
num_generations = 8
max_completion_len = 8
rewards = [{{ name = "answer_match", extract = "regex", pattern = "(7)" }}]
"#,
            model = root().join("fixtures/tiny-chat/model").display(),
            train = root().join("fixtures/tiny-chat/sevens.jsonl").display(),
            run = run.display()
        ),
    )
    .unwrap();
    let o = ferrotune(&["train", "--config", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ck = run.join("checkpoints");
    derive(&ck.join("step-10"), &ck.join("step-20"), &|b| {
        b.zeros_like().unwrap()
    });
    // Deliberately worse: an adapter SFT-trained to repeat one word, copied in as step-30.
    let junk = tmp.path().join("junk.jsonl");
    let line = serde_json::json!({"text": "zebra ".repeat(40)}).to_string();
    std::fs::write(&junk, format!("{line}\n").repeat(16)).unwrap();
    let sft = tmp.path().join("sft.toml");
    std::fs::write(
        &sft,
        format!(
            "[model]\npath = \"{model}\"\n[lora]\nr = 8\nlora_alpha = 16\n[data]\ntrain = \"{junk}\"\n[optim]\nlearning_rate = 1e-2\n[run]\noutput_dir = \"{out}\"\nbatch_size = 8\nmax_steps = 20\n[sft]\n",
            model = root().join("fixtures/tiny-chat/model").display(),
            junk = junk.display(),
            out = tmp.path().join("junk-run").display()
        ),
    )
    .unwrap();
    let o = ferrotune(&["train", "--config", sft.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    derive(
        &tmp.path().join("junk-run/checkpoints/step-20"),
        &ck.join("step-30"),
        &|b| b.clone(),
    );
    let text = root().join("fixtures/gguf/text.txt");
    let o = ferrotune(&[
        "compare",
        run.to_str().unwrap(),
        "--forget-set",
        text.to_str().unwrap(),
        "--max-new-tokens",
        "8",
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(run.join("compare.json")).unwrap()).unwrap();
    let get = |name: &str| rows.iter().find(|r| r["name"] == name).unwrap().clone();
    let (base, zero, noisy) = (get("base"), get("step-20"), get("step-30"));
    // The zero adapter is the base model: same answers, same perplexity.
    assert_eq!(zero["mean_reward"], base["mean_reward"], "{stdout}");
    let zr = zero["ppl_ratio"].as_f64().unwrap();
    assert!((zr - 1.0).abs() < 1e-4, "{stdout}");
    assert_eq!(base["ppl_ratio"].as_f64().unwrap(), 1.0);
    // Only the damaged adapter is a regression.
    assert_eq!(noisy["regression"], true, "{stdout}");
    assert!(noisy["ppl_ratio"].as_f64().unwrap() > 1.05, "{stdout}");
    for r in [&base, &zero, &get("step-10")] {
        assert_eq!(r["regression"], false, "{stdout}");
    }
    // Ranked by mean reward, best first.
    let rewards: Vec<f64> = rows
        .iter()
        .map(|r| r["mean_reward"].as_f64().unwrap())
        .collect();
    assert!(rewards.windows(2).all(|w| w[0] >= w[1]), "{stdout}");
    assert!(run.join("plots/compare.png").exists());
    assert!(stdout.contains("REGRESSION"), "{stdout}");
}
