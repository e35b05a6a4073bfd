//! SFT end to end through the real binary on the tiny chat model (fixtures/tiny-chat, made by
//! make_tiny_chat.py): the loss falls, every adapter weight moves, the run folder is complete,
//! a checkpoint loads and generates, resume is exact, accumulation is equivalent to batching,
//! and bad input fails cleanly without touching the last good checkpoint.

mod common;

use common::*;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use candle_core::{Device, Tensor};

/// Write a config into `dir` for the tiny model, with extra TOML lines appended to sections.
fn config(dir: &Path, run: &str, extra_run: &str) -> PathBuf {
    let r = root();
    let text = format!(
        r#"[model]
path = "{model}"

[lora]
r = 4
lora_alpha = 8
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

[data]
train = "{train}"
max_seq_len = 64

[optim]
learning_rate = 5e-3
lr_scheduler_type = "constant"

[run]
output_dir = "{run}"
batch_size = 8
log_every = 1
{extra_run}

[sft]
"#,
        model = r.join("fixtures/tiny-chat/model").display(),
        train = r.join("fixtures/tiny-chat/sft.jsonl").display(),
        run = dir.join(run).display(),
    );
    let p = dir.join(format!("{run}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn tensors(p: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let f = |t: &Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
    (f(a) - f(b))
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn sft_learns_and_writes_a_complete_run_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(
        tmp.path(),
        "run",
        "max_steps = 40\nsave_every = 20\neval_every = 20",
    );
    let cfg_text = std::fs::read_to_string(&cfg).unwrap().replace(
        "max_seq_len = 64",
        "max_seq_len = 64\neval_fraction = 0.125",
    );
    std::fs::write(&cfg, cfg_text).unwrap();
    let out = ferrotune(&["train", "--config", cfg.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = tmp.path().join("run");
    let loss = metric(&run, "loss");
    assert_eq!(loss.len(), 40);
    let first: f64 = loss[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = loss[35..].iter().sum::<f64>() / 5.0;
    assert!(
        last < 0.6 * first,
        "loss did not fall enough: {first} -> {last}"
    );
    assert_eq!(metric(&run, "eval_loss").len(), 2);
    for f in ["config.toml", "metrics.jsonl", "plots/loss.png"] {
        assert!(run.join(f).exists(), "missing {f}");
    }
    assert!(std::fs::read_dir(run.join("tb")).unwrap().count() > 0);
    let ck = run.join("checkpoints/step-40");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
        "COMPLETE",
    ] {
        assert!(ck.join(f).exists(), "missing checkpoint file {f}");
    }
    // Every adapter matrix moved away from its initial value (A: seeded Kaiming, B: zero).
    let first_ck = tensors(&run.join("checkpoints/step-20/adapter_model.safetensors"));
    let last_ck = tensors(&ck.join("adapter_model.safetensors"));
    assert_eq!(last_ck.len(), 2 * 7 * 2);
    for (k, v) in &last_ck {
        if k.contains("lora_B") {
            assert!(
                v.abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0,
                "{k} still zero"
            );
        }
        assert!(
            max_abs_diff(v, &first_ck[k]) > 0.0,
            "{k} did not change between step 20 and 40"
        );
    }
    // The checkpoint loads as an adapter and generates.
    let g = ferrotune(&[
        "generate",
        "--model",
        root().join("fixtures/tiny-chat/model").to_str().unwrap(),
        "--adapter",
        ck.to_str().unwrap(),
        "--prompt",
        "What is 2 + 3?",
        "--max-new-tokens",
        "8",
    ]);
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    assert!(!String::from_utf8_lossy(&g.stdout).trim().is_empty());
}

#[test]
fn resume_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = "max_steps = 12\nsave_every = 6\n";
    // LoRA dropout on, so resume must also reproduce the dropout masks.
    let with_dropout = |p: PathBuf| {
        let t = std::fs::read_to_string(&p)
            .unwrap()
            .replace("lora_alpha = 8", "lora_alpha = 8\nlora_dropout = 0.1");
        std::fs::write(&p, t).unwrap();
        p
    };
    // Straight: 12 steps.
    let a = with_dropout(config(tmp.path(), "a", extra));
    assert!(ferrotune(&["train", "--config", a.to_str().unwrap()])
        .status
        .success());
    // Interrupted: same run, last checkpoint lost, resumed from step 6.
    let b = with_dropout(config(tmp.path(), "b", extra));
    assert!(ferrotune(&["train", "--config", b.to_str().unwrap()])
        .status
        .success());
    let run_b = tmp.path().join("b");
    std::fs::remove_dir_all(run_b.join("checkpoints/step-12")).unwrap();
    let out = ferrotune(&["train", "--resume", run_b.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in ["adapter_model.safetensors", "optimizer.safetensors"] {
        let x = tensors(&tmp.path().join("a/checkpoints/step-12").join(f));
        let y = tensors(&run_b.join("checkpoints/step-12").join(f));
        assert_eq!(x.len(), y.len());
        for (k, v) in &x {
            assert_eq!(max_abs_diff(v, &y[k]), 0.0, "{f} {k} differs after resume");
        }
    }
    // Metrics after resume continue without duplicates.
    let steps: Vec<f64> = metric(&run_b, "loss");
    assert_eq!(steps.len(), 12);
    assert_eq!(steps, metric(&tmp.path().join("a"), "loss"));
}

#[test]
fn accumulation_equals_a_bigger_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let big = config(tmp.path(), "big", "max_steps = 3\nshuffle_placeholder = 0");
    // batch 8 x accumulation 1 vs batch 1 x accumulation 8, no shuffling so both see the same rows.
    let fix = |p: &Path, bs: usize, acc: usize| {
        let t = std::fs::read_to_string(p)
            .unwrap()
            .replace(
                "shuffle_placeholder = 0",
                &format!("gradient_accumulation_steps = {acc}"),
            )
            .replace("batch_size = 8", &format!("batch_size = {bs}"))
            .replace("max_seq_len = 64", "max_seq_len = 64\nshuffle = false");
        std::fs::write(p, t).unwrap();
    };
    fix(&big, 8, 1);
    let small = config(
        tmp.path(),
        "small",
        "max_steps = 3\nshuffle_placeholder = 0",
    );
    fix(&small, 1, 8);
    for c in [&big, &small] {
        let o = ferrotune(&["train", "--config", c.to_str().unwrap()]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let x = tensors(
        &tmp.path()
            .join("big/checkpoints/step-3/adapter_model.safetensors"),
    );
    let y = tensors(
        &tmp.path()
            .join("small/checkpoints/step-3/adapter_model.safetensors"),
    );
    for (k, v) in &x {
        let d = max_abs_diff(v, &y[k]);
        assert!(d < 1e-5, "{k}: {d}");
    }
    let (lx, ly) = (
        metric(&tmp.path().join("big"), "loss"),
        metric(&tmp.path().join("small"), "loss"),
    );
    for (a, b) in lx.iter().zip(&ly) {
        assert!((a - b).abs() < 1e-5, "loss {a} vs {b}");
    }
}

/// `data.packing = true` trains the same model as no packing: examples packed into one row
/// cannot attend to each other and their positions restart, so one step over every example gives
/// the same loss, gradient norm and adapter as the padded batch of the same examples.
#[test]
fn packed_sft_equals_unpacked() {
    let tmp = tempfile::tempdir().unwrap();
    // Mixed lengths: completions of 1 to 7 sentences, so the packs mix long and short examples.
    let rows: Vec<String> = (0..12)
        .map(|i| {
            let a = i % 9 + 1;
            let completion = format!(" The answer is {}.", a + 7).repeat(1 + i * 5 % 7);
            serde_json::json!({"prompt": format!("What is 7 + {a}?"), "completion": completion})
                .to_string()
        })
        .collect();
    let data = tmp.path().join("mixed.jsonl");
    std::fs::write(&data, rows.join("\n") + "\n").unwrap();
    let run = |name: &str, packing: bool, batch: usize| -> (PathBuf, String) {
        let cfg = config(tmp.path(), name, "max_steps = 1");
        let t = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace(
                &root()
                    .join("fixtures/tiny-chat/sft.jsonl")
                    .display()
                    .to_string(),
                &data.display().to_string(),
            )
            .replace("batch_size = 8", &format!("batch_size = {batch}"))
            .replace(
                "max_seq_len = 64",
                &format!("max_seq_len = 160\nshuffle = false\npacking = {packing}"),
            );
        std::fs::write(&cfg, t).unwrap();
        let o = ferrotune(&["train", "--config", cfg.to_str().unwrap()]);
        ok(&o);
        (
            tmp.path().join(name),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    // How many packs the 12 examples make, so that one step covers all of them.
    let (_, log) = run("probe", true, 1);
    let packs: usize = log
        .lines()
        .find_map(|l| l.strip_prefix("packing: 12 examples into "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no packing line in: {log}"));
    assert!(packs < 12, "nothing was packed ({packs} sequences)");
    let (packed, _) = run("packed", true, packs);
    let (plain, _) = run("plain", false, 12);
    for key in ["loss", "grad_norm", "loss_tokens"] {
        let (a, b) = (metric(&packed, key)[0], metric(&plain, key)[0]);
        println!("{key}: packed {a} unpacked {b}");
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "{key}: packed {a} vs {b}"
        );
    }
    let step = "checkpoints/step-1/adapter_model.safetensors";
    let (x, y) = (tensors(&packed.join(step)), tensors(&plain.join(step)));
    for (k, v) in &x {
        let d = max_abs_diff(v, &y[k]);
        assert!(d < 1e-5, "{k}: {d}");
    }
}

fn assert_one_line_error(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure");
    assert!(!err.contains("panicked"), "{err}");
    let last = err.lines().last().unwrap_or("");
    assert!(last.starts_with("error: "), "{err}");
    for n in needles {
        assert!(last.contains(n), "`{n}` not in: {last}");
    }
}

#[test]
fn bad_configs_and_data_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    // Unknown key.
    let c = config(tmp.path(), "r1", "max_steps = 2\nlearning_rat = 1");
    assert_one_line_error(
        &ferrotune(&["train", "--config", c.to_str().unwrap()]),
        &["r1.toml", "learning_rat"],
    );
    // Wrong type.
    let c = config(tmp.path(), "r2", "max_steps = \"two\"");
    assert_one_line_error(
        &ferrotune(&["train", "--config", c.to_str().unwrap()]),
        &["r2.toml", "max_steps"],
    );
    // Cross-field rule.
    let c = config(tmp.path(), "r3", "max_steps = 2\neval_every = 1");
    assert_one_line_error(
        &ferrotune(&["train", "--config", c.to_str().unwrap()]),
        &["run.eval_every", "eval set"],
    );
    // target_modules that match nothing.
    let c = config(tmp.path(), "r4", "max_steps = 2");
    let t = std::fs::read_to_string(&c)
        .unwrap()
        .replace("\"q_proj\", \"k_proj\"", "\"qq_proj\", \"kk_proj\"")
        .replace(
            ", \"v_proj\", \"o_proj\", \"gate_proj\", \"up_proj\", \"down_proj\"",
            "",
        );
    std::fs::write(&c, t).unwrap();
    assert_one_line_error(
        &ferrotune(&["train", "--config", c.to_str().unwrap()]),
        &["target_modules", "matches no"],
    );
    // Values that would train nothing or train backwards, and a dtype nobody has, are refused
    // naming the field (PEFT accepts any lora_alpha; HF treats a negative max_grad_norm as off).
    for (name, from, to, field) in [
        ("r6", "lora_alpha = 8", "lora_alpha = 0", "lora.lora_alpha"),
        ("r7", "lora_alpha = 8", "lora_alpha = -8", "lora.lora_alpha"),
        (
            "r8",
            "[optim]",
            "[optim]\nmax_grad_norm = -1.0",
            "optim.max_grad_norm",
        ),
        ("r9", "[model]", "[model]\ndtype = \"f8\"", "model.dtype"),
    ] {
        let c = config(tmp.path(), name, "max_steps = 2");
        let t = std::fs::read_to_string(&c).unwrap();
        assert!(t.contains(from), "{name}: the test config has no `{from}`");
        std::fs::write(&c, t.replacen(from, to, 1)).unwrap();
        assert_one_line_error(
            &ferrotune(&["train", "--config", c.to_str().unwrap()]),
            &[&format!("{name}.toml"), field],
        );
    }
    // A dataset row missing its column: the error names the file and the line.
    let data = tmp.path().join("bad.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"c\"}\n",
    )
    .unwrap();
    let c = config(tmp.path(), "r5", "max_steps = 2");
    let t = std::fs::read_to_string(&c).unwrap();
    let t = t.replace(
        &root()
            .join("fixtures/tiny-chat/sft.jsonl")
            .display()
            .to_string(),
        &data.display().to_string(),
    );
    std::fs::write(&c, t).unwrap();
    assert_one_line_error(
        &ferrotune(&["train", "--config", c.to_str().unwrap()]),
        &["bad.jsonl", "2", "completion"],
    );
    // Nothing to train on: the error names the cause, the rows or the truncation.
    for (name, rows, max_len, needle) in [
        (
            "r10",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"bot\", \"content\": \"yo\"}]}\n",
            64,
            "role \"assistant\"",
        ),
        (
            "r11",
            "{\"prompt\": \"a long question that fills the window\", \"completion\": \" b\"}\n",
            4,
            "data.max_seq_len = 4",
        ),
    ] {
        let data = tmp.path().join(format!("{name}.jsonl"));
        std::fs::write(&data, rows).unwrap();
        let c = config(tmp.path(), name, "max_steps = 2");
        let t = std::fs::read_to_string(&c).unwrap().replace(
            &root()
                .join("fixtures/tiny-chat/sft.jsonl")
                .display()
                .to_string(),
            &data.display().to_string(),
        );
        let t = t.replacen("max_seq_len = 64", &format!("max_seq_len = {max_len}"), 1);
        std::fs::write(&c, t).unwrap();
        assert_one_line_error(
            &ferrotune(&["train", "--config", c.to_str().unwrap()]),
            &[&format!("{name}.jsonl"), needle],
        );
    }
}

#[test]
fn resume_refuses_half_written_checkpoints_and_keeps_the_good_one() {
    let tmp = tempfile::tempdir().unwrap();
    let c = config(tmp.path(), "run", "max_steps = 2\nsave_every = 1");
    assert!(ferrotune(&["train", "--config", c.to_str().unwrap()])
        .status
        .success());
    let run = tmp.path().join("run");
    // Only a half-written save is left.
    let good = std::fs::read(run.join("checkpoints/step-2/adapter_model.safetensors")).unwrap();
    std::fs::rename(
        run.join("checkpoints/step-2"),
        run.join("checkpoints/.tmp-step-3"),
    )
    .unwrap();
    std::fs::remove_dir_all(run.join("checkpoints/step-1")).unwrap();
    assert_one_line_error(
        &ferrotune(&["train", "--resume", run.to_str().unwrap()]),
        &["no complete checkpoint"],
    );
    // Starting afresh in an existing run folder without --overwrite is refused.
    std::fs::rename(
        run.join("checkpoints/.tmp-step-3"),
        run.join("checkpoints/step-2"),
    )
    .unwrap();
    let o = ferrotune(&["train", "--config", c.to_str().unwrap()]);
    assert!(!o.status.success());
    assert_eq!(
        std::fs::read(run.join("checkpoints/step-2/adapter_model.safetensors")).unwrap(),
        good
    );
}

#[test]
fn full_fine_tuning_without_a_lora_section() {
    let tmp = tempfile::tempdir().unwrap();
    let c = config(tmp.path(), "full", "max_steps = 6\nsave_every = 6");
    let t = std::fs::read_to_string(&c).unwrap();
    let start = t.find("[lora]").unwrap();
    let end = t.find("[data]").unwrap();
    let t = format!("{}{}", &t[..start], &t[end..])
        .replace("learning_rate = 5e-3", "learning_rate = 1e-3");
    std::fs::write(&c, t).unwrap();
    let out = ferrotune(&["train", "--config", c.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = tmp.path().join("full");
    let loss = metric(&run, "loss");
    assert!(loss[5] < loss[0], "full FT loss did not fall: {loss:?}");
    let w = tensors(&run.join("checkpoints/step-6/model.safetensors"));
    let base = tensors(&root().join("fixtures/tiny-chat/model/model.safetensors"));
    // Every base weight is in the checkpoint and the projections moved.
    for (k, v) in &base {
        assert!(w.contains_key(k), "{k} missing from full checkpoint");
        if k.ends_with("proj.weight") {
            assert!(max_abs_diff(v, &w[k]) > 0.0, "{k} did not change");
        }
    }
    // The checkpoint is a model folder (the base's config and tokenizer beside the weights),
    // as a transformers Trainer checkpoint is: the CLI loads it, and it is the trained model.
    let ckpt = run.join("checkpoints/step-6");
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert!(
            ckpt.join(f).is_file(),
            "{f} missing from the full checkpoint"
        );
    }
    let text = root().join("fixtures/gguf/text.txt");
    let ppl = |model: &Path| -> String {
        let o = ferrotune(&[
            "perplexity",
            "--model",
            model.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let (trained, untrained) = (ppl(&ckpt), ppl(&root().join("fixtures/tiny-chat/model")));
    assert!(trained.contains("perplexity"), "{trained}");
    assert_ne!(trained, untrained);
}

/// Every LoRA A matrix of the model, flattened.
fn adapter_a(m: &dyn ferrotune_models::CausalLm) -> Vec<Vec<f32>> {
    m.linear_slots()
        .iter()
        .filter_map(|s| s.lora.as_ref())
        .map(|l| {
            l.a.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

/// In a LoRA run only adapter weights change: every base tensor stays bit-identical.
#[test]
fn lora_training_leaves_the_base_bit_identical() {
    use ferrotune_ckpt::{OnExisting, RunDir};
    use ferrotune_data::{read_rows, sft_examples, tokenize_sft_all, SftOptions};
    use ferrotune_models::LoadOptions;
    use ferrotune_nn::{LoraConfig, TargetModules};
    use ferrotune_train::optim::AdamWConfig;
    use ferrotune_train::plan::LoopPlan;
    use ferrotune_train::schedule::Schedule;
    use ferrotune_train::sft::{train_sft, SftPlan};
    use ferrotune_train::trainer::{Observer, Trainable};

    struct Quiet;
    impl Observer for Quiet {
        fn metrics(&mut self, _: usize, _: &[(&str, f64)]) {}
        fn message(&mut self, _: &str) {}
    }
    let model_dir = root().join("fixtures/tiny-chat/model");
    let lora = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.1,
        use_rslora: false,
        target_modules: TargetModules::AllLinear,
    };
    let opts = LoadOptions {
        lora: Some((lora.clone(), 1)),
        ..LoadOptions::default()
    };
    let lm = ferrotune::lm::Lm::load(&model_dir, &opts).unwrap();
    let snapshot = |m: &dyn ferrotune_models::CausalLm| -> Vec<(String, Vec<f32>)> {
        m.linear_slots()
            .iter()
            .map(|s| {
                (
                    s.path.clone(),
                    s.weight.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                )
            })
            .collect()
    };
    let before = snapshot(lm.model.as_ref());
    let adapters_before = adapter_a(lm.model.as_ref());
    let path = root().join("fixtures/tiny-chat/sft.jsonl");
    let examples = sft_examples(&read_rows(&path).unwrap(), &path).unwrap();
    let set = tokenize_sft_all(&lm.tokenizer, &examples, 64, &SftOptions::default(), true).unwrap();
    let params: Vec<_> = lm
        .model
        .linear_slots()
        .iter()
        .filter_map(|s| s.lora.as_ref().map(|l| (s.path.clone(), l)))
        .flat_map(|(p, l)| {
            [
                (format!("{p}.lora_A"), l.a.clone()),
                (format!("{p}.lora_B"), l.b.clone()),
            ]
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let run = RunDir::create(&tmp.path().join("r"), OnExisting::Refuse).unwrap();
    let plan = SftPlan {
        run: LoopPlan {
            seed: 3,
            total_steps: 4,
            batch_size: 4,
            grad_accum: 2,
            learning_rate: 1e-2,
            schedule: Schedule::Constant,
            adamw: AdamWConfig {
                weight_decay: 0.01,
                ..AdamWConfig::default()
            },
            max_grad_norm: 1.0,
            log_every: 1,
            save_every: 0,
            eval_every: 0,
            keep_last: 0,
            max_nonfinite_steps: 3,
            shuffle: true,
            pad_id: lm.pad_id(),
        },
    };
    let trainable = Trainable::Lora {
        params,
        config: &lora,
        base_name: "tiny".into(),
    };
    let empty: Vec<ferrotune_data::Tokenized> = vec![];
    train_sft(
        lm.model.as_ref(),
        &trainable,
        &set.items,
        &empty,
        &plan,
        ferrotune_train::trainer::RunCtx {
            run: &run,
            resume: None,
            obs: &mut Quiet,
            device: &candle_core::Device::Cpu,
        },
    )
    .unwrap();
    let after = snapshot(lm.model.as_ref());
    assert_eq!(before.len(), after.len());
    for ((p, a), (_, b)) in before.iter().zip(&after) {
        assert!(a == b, "base weight {p} changed");
    }
    let adapters_after = adapter_a(lm.model.as_ref());
    assert!(!adapters_before.is_empty());
    for (a, b) in adapters_before.iter().zip(&adapters_after) {
        assert!(a != b, "an adapter A matrix did not change");
    }
}
