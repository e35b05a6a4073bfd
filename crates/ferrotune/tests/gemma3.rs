//! configs/sft-gemma3.toml on the real Gemma 3 270M base (opt-in: FERROTUNE_GEMMA3_GGUF, which
//! `scripts/fetch-gemma3.sh` prints and CI sets): LoRA SFT with Gemma's template through the CLI
//! (data from `data gen arithmetic --sft`), then `ferrotune eval` of the base and of the adapter on
//! held-out problems: the loss falls, the SFT model answers in the tagged format and more often
//! right than the base, and every completion stops on an end-of-turn id before the token limit.
//! About 2.5 minutes on 2 cores.

mod common;

use std::path::PathBuf;

use common::{ferrotune, metric, ok, root};

const SYS: &str =
    "Answer with the final number inside <answer></answer> tags, for example <answer>12</answer>.";
const REWARDS: &str =
    r#"[{name="format_tags", tags=["answer"]},{name="answer_match", extract="last_number"}]"#;

fn eval(
    model: &str,
    adapter: Option<&str>,
    task: &str,
    out: &std::path::Path,
) -> serde_json::Value {
    let template = root()
        .join("configs/templates/gemma3.jinja")
        .display()
        .to_string();
    let json = out.display().to_string();
    let mut args = vec![
        "eval",
        "--model",
        model,
        "--chat-template",
        &template,
        "--task",
        task,
        "--rewards",
        REWARDS,
        "--max-new-tokens",
        "24",
        "--json",
        &json,
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter", a]);
    }
    ok(&ferrotune(&args));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
    v["task"].clone()
}

#[test]
fn sft_gemma3_learns_the_format_and_to_stop() {
    let Some(model) = std::env::var_os("FERROTUNE_GEMMA3_GGUF").map(PathBuf::from) else {
        println!("skipped: no Gemma 3 GGUF (set FERROTUNE_GEMMA3_GGUF; scripts/fetch-gemma3.sh)");
        return;
    };
    let model = model.display().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let p = |name: &str| tmp.path().join(name).display().to_string();
    let (sft, train, held_out, run) = (p("sft.jsonl"), p("train.jsonl"), p("eval.jsonl"), p("run"));
    let gen = |extra: &[&str], seed: &str, n: &str, out: &str| {
        let mut a = vec![
            "data",
            "gen",
            "arithmetic",
            "--n",
            n,
            "--seed",
            seed,
            "--digits",
            "1..2",
            "--ops",
            "+-",
            "--chat",
            "--system",
            SYS,
            "--out",
            out,
        ];
        a.extend(extra);
        ok(&ferrotune(&a));
    };
    gen(&["--sft"], "1", "400", &sft);
    gen(&[], "1", "2000", &train);
    gen(&["--exclude", &train], "2", "64", &held_out);
    let config = root().join("configs/sft-gemma3.toml").display().to_string();
    ok(&ferrotune(&[
        "train",
        "--config",
        &config,
        "--set",
        &format!("model.path={model}"),
        "--set",
        &format!("data.train={sft}"),
        "--set",
        &format!("run.output_dir={run}"),
    ]));
    let loss = metric(std::path::Path::new(&run), "loss");
    assert_eq!(loss.len(), 30);
    let (first, last) = (loss[0], loss[25..].iter().sum::<f64>() / 5.0);
    println!("sft loss {first:.3} -> {last:.3} (mean of the last 5)");
    assert!(last < 0.25 * first, "loss {first} -> {last}");

    let base = eval(&model, None, &held_out, &tmp.path().join("base.json"));
    let adapter = format!("{run}/checkpoints/step-30");
    let tuned = eval(
        &model,
        Some(&adapter),
        &held_out,
        &tmp.path().join("sft.json"),
    );
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap();
    println!(
        "held-out accuracy base {:.3} -> sft {:.3}; format {:.3} -> {:.3}; truncated {:.3} -> {:.3}",
        f(&base, "accuracy"), f(&tuned, "accuracy"), f(&base, "format_rate"),
        f(&tuned, "format_rate"), f(&base, "truncated_fraction"), f(&tuned, "truncated_fraction")
    );
    assert!(f(&tuned, "format_rate") >= 0.95, "{tuned}");
    assert!(
        f(&tuned, "accuracy") >= f(&base, "accuracy") + 0.1,
        "{base} vs {tuned}"
    );
    // Every SFT completion ended on <end_of_turn> / <eos>, well before the 24-token limit.
    assert_eq!(f(&tuned, "truncated_fraction"), 0.0, "{tuned}");
    assert!(f(&tuned, "mean_length") < 16.0, "{tuned}");
}
