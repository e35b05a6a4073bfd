//! `ferrotune pretrain` end to end on a tiny config (seconds): the folder it writes loads with
//! our loader and tokenizer, the training loss went down and the eval loss ends below a fresh
//! model's (about ln V), the held-out files exist and hold nothing that was trained on, the run
//! is deterministic, and bad configs are refused with the field named.

use std::path::Path;

use ferrotune::corpus::{is_held_out, is_held_out_text};
use ferrotune::pretrain_run::{run_pretrain, PretrainConfig};
use ferrotune_models::{load, LoadOptions};
use ferrotune_tokenize::{Message, Tokenizer};

const TINY: &str = r#"
[model]
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 2
num_attention_heads = 2
max_position_embeddings = 64

[tokenizer]
vocab_size = 320

[corpus]
arithmetic_docs = 300
chat_docs = 100
english_docs = 200
heldout_english_docs = 10
heldout_arithmetic = 20

[optim]
learning_rate = 1e-2
warmup_steps = 2

[run]
output_dir = "run"
model_dir = "out/model"
max_steps = 40
batch_size = 8
seq_len = 64
eval_fraction = 0.05
log_every = 5
"#;

fn write_config(dir: &Path, text: &str) -> std::path::PathBuf {
    let p = dir.join("pretrain.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn losses(run: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get(key).and_then(|x| x.as_f64()))
        .collect()
}

#[test]
fn tiny_pretrain_writes_a_loadable_model_and_learns() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg_path = write_config(tmp.path(), TINY);
    let model_dir = run_pretrain(&cfg_path, &[], true).unwrap();
    assert_eq!(model_dir, tmp.path().join("out/model"));
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "eval/english.txt",
        "eval/arithmetic.jsonl",
    ] {
        assert!(model_dir.join(f).exists(), "{f} missing");
    }
    let loaded = load(&model_dir, &LoadOptions::default()).unwrap();
    let tok = Tokenizer::from_dir(&model_dir).unwrap();
    assert_eq!(loaded.model.config().vocab_size, tok.vocab_size());
    assert_eq!(tok.vocab_size(), 320);
    assert!(loaded.model.config().tie_word_embeddings);
    // The ChatML template renders and stops at <|im_end|>.
    let r = tok
        .render(
            &[Message::user("What is 2 + 3?"), Message::assistant("5")],
            false,
        )
        .unwrap();
    assert_eq!(
        tok.decode(&r.ids, false).unwrap(),
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
    );
    assert_eq!(tok.eos_ids()[0], tok.token_to_id("<|im_end|>").unwrap());

    let run = tmp.path().join("run");
    let train = losses(&run, "loss");
    assert!(train.len() >= 8);
    let head: f64 = train[..2].iter().sum::<f64>() / 2.0;
    let tail: f64 = train[train.len() - 2..].iter().sum::<f64>() / 2.0;
    assert!(tail < head - 0.5, "loss did not go down: {train:?}");
    let eval = losses(&run, "eval_loss");
    let uniform = (320f64).ln();
    assert!(
        *eval.last().unwrap() < uniform - 1.0,
        "eval loss {eval:?} should end well below ln(V) = {uniform:.2}"
    );

    // The held-out files hold only held-out items, with right answers.
    let rows = std::fs::read_to_string(model_dir.join("eval/arithmetic.jsonl")).unwrap();
    assert_eq!(rows.lines().count(), 20);
    for line in rows.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let (a, b) = (v["a"].as_i64().unwrap(), v["b"].as_i64().unwrap());
        let op = v["op"].as_str().unwrap().chars().next().unwrap();
        assert!(is_held_out(a, op, b), "{line}");
        let want = match op {
            '+' => a + b,
            '-' => a - b,
            _ => a * b,
        };
        assert_eq!(v["answer"].as_str().unwrap(), want.to_string());
        assert_eq!(
            v["prompt"].as_str().unwrap(),
            format!("What is {a} {op} {b}?")
        );
    }
    let english = std::fs::read_to_string(model_dir.join("eval/english.txt")).unwrap();
    let stories: Vec<&str> = english.split("\n\n").map(str::trim).collect();
    assert_eq!(stories.len(), 10);
    assert!(stories.iter().all(|s| is_held_out_text(s)));

    // f32 weights (tiny), loaded bit-exactly by the loader: the saved config says so.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model_dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["torch_dtype"], "float32");
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
}

#[test]
fn same_config_same_model_and_refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let text = TINY.replace("max_steps = 40", "max_steps = 3");
    let cfg_path = write_config(tmp.path(), &text);
    run_pretrain(&cfg_path, &[], true).unwrap();
    // Compared as tensors: safetensors headers may list tensors in any order.
    let load = |p: std::path::PathBuf| {
        let mut v: Vec<(String, Vec<f32>)> =
            candle_core::safetensors::load(p, &candle_core::Device::Cpu)
                .unwrap()
                .into_iter()
                .map(|(k, t)| {
                    let t = t.to_dtype(candle_core::DType::F32).unwrap();
                    (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                })
                .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let first = load(tmp.path().join("out/model/model.safetensors"));
    // Without overwrite the existing folders are refused...
    let err = run_pretrain(&cfg_path, &[], true).unwrap_err();
    assert!(format!("{err:#}").contains("overwrite"), "{err:#}");
    // ...with it the run is replaced, and gives the same weights.
    run_pretrain(&cfg_path, &["run.overwrite=true".to_string()], true).unwrap();
    let second = load(tmp.path().join("out/model/model.safetensors"));
    // Bit-identical tensors: every parallel reduction in training sums in a fixed order.
    assert!(
        first == second,
        "same config and seed must give the same weights"
    );

    for (set, field) in [
        ("model.num_attention_heads=3", "model.num_attention_heads"),
        ("run.seq_len=100", "run.seq_len"),
        ("tokenizer.vocab_size=100", "tokenizer.vocab_size"),
        ("run.save_dtype=\"f8\"", "run.save_dtype"),
        ("corpus.max_operand=0", "corpus.max_operand"),
        (
            "corpus.three_digit_fraction=1.5",
            "corpus.three_digit_fraction",
        ),
    ] {
        let err = PretrainConfig::load(&cfg_path, &[set.to_string()]).unwrap_err();
        assert!(err.to_string().contains(field), "{set}: {err}");
    }
    let err = PretrainConfig::load(&cfg_path, &["run.typo=1".to_string()]).unwrap_err();
    assert!(err.to_string().contains("typo"), "{err}");
    // Paths resolve against the config's folder.
    let cfg = PretrainConfig::load(&cfg_path, &[]).unwrap();
    assert_eq!(cfg.run.model_dir, tmp.path().join("out/model"));
}
