//! The merged reward-model export: our loader reads it back with the same scores, and
//! transformers' `AutoModelForSequenceClassification` scores the committed export as we do.
//! The reward adapter folder (PEFT SEQ_CLS: LoRA + `score` in modules_to_save) goes both ways
//! with PEFT. Fixtures: fixtures/reward/make_reward_fixture.py (steps `models` and `export`, transformers
//! 5.24) and examples/make_reward_export.rs (which writes fixtures/reward/ferrotune_export).

mod common;
mod reward_common;

use candle_core::{DType, Device, Tensor};
use common::{max_abs, st, tiny};
use ferrotune_ckpt::{
    export_reward_model, load_reward_adapter, load_with_adapter, save_reward_adapter, CkptError,
};
use ferrotune_models::{Batch, LoadOptions, RewardModel};
use ferrotune_nn::Mode;
use reward_common::{export_fixture_model, lora, reward_fixtures, reward_model, ADAPTER_BASE};
use serde_json::Value;

fn json(path: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn scores(rm: &RewardModel, bt: &Batch, mode: Mode) -> Vec<f32> {
    rm.scores(bt, mode).unwrap().to_vec1().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn batch() -> Batch {
    let seqs = vec![
        vec![1u32, 17, 34, 51, 68, 85, 102, 119, 9],
        vec![1, 23, 45, 67, 89, 111],
        vec![1, 77, 5],
    ];
    Batch::right_padded(&seqs, 0, &Device::Cpu).unwrap()
}

#[test]
fn export_round_trips_through_our_loader() {
    // Tied (llama, qwen2 with q/k/v biases) and untied (llama3: its lm_head.weight is dropped).
    for name in ["llama", "llama3", "qwen2"] {
        let rm = reward_model(&tiny(name), 5);
        let bt = batch();
        let before = scores(&rm, &bt, Mode::EVAL);
        let base_only = scores(&rm, &bt, Mode::REFERENCE);
        assert!(
            max_diff(&before, &base_only) > 1e-3,
            "{name}: the adapters do not change the scores, so the merge is not tested"
        );

        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("rm");
        let report = export_reward_model(&rm, &out, DType::F32).unwrap();
        assert_eq!(report.merged.len(), 14, "{name}");
        let tensors = st(&out.join("model.safetensors"));
        assert!(!tensors.contains_key("lm_head.weight"), "{name}");
        assert_eq!(
            max_abs(&tensors["score.weight"], rm.score.as_tensor()),
            0.0,
            "{name}"
        );
        let cfg = json(&out.join("config.json"));
        let arch = if name == "qwen2" {
            "Qwen2ForSequenceClassification"
        } else {
            "LlamaForSequenceClassification"
        };
        assert_eq!(cfg["architectures"], serde_json::json!([arch]), "{name}");
        assert_eq!(cfg["id2label"], serde_json::json!({ "0": "LABEL_0" }));
        assert_eq!(cfg["pad_token_id"], 0);

        let back = RewardModel::load(&out, &LoadOptions::default()).unwrap();
        assert!(back.body.linear_slots().iter().all(|s| s.lora.is_none()));
        let after = scores(&back, &bt, Mode::EVAL);
        let err = max_diff(&before, &after);
        println!("{name}: max |scores(export) - scores(base + LoRA)| = {err:.2e}");
        assert!(err < 1e-5, "{name}: {before:?} vs {after:?}");

        // Exporting the loaded classifier again (its base now holds score.weight, replaced by
        // the head) writes the same tensors.
        let out2 = tmp.path().join("rm2");
        export_reward_model(&back, &out2, DType::F32).unwrap();
        let again = st(&out2.join("model.safetensors"));
        assert_eq!(again.len(), tensors.len(), "{name}");
        for (k, t) in &tensors {
            assert_eq!(max_abs(t, &again[k]), 0.0, "{name} {k}");
        }
    }
}

#[test]
fn export_refuses_a_model_without_pad_id() {
    let mut rm = reward_model(&tiny("llama"), 5);
    rm.pad_token_id = None;
    let tmp = tempfile::tempdir().unwrap();
    let err = export_reward_model(&rm, &tmp.path().join("rm"), DType::F32)
        .err()
        .unwrap();
    assert!(matches!(err, CkptError::Unsupported { .. }), "{err}");
    assert!(err.to_string().contains("pad_token_id"), "{err}");
}

/// The batch transformers scored: the ids and mask recorded, positions 0..T-1 on every row.
fn hf_batch(case: &Value) -> Batch {
    let rows: Vec<Vec<u32>> = case["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    let mask: Vec<u8> = case["attention_mask"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u8)
        })
        .collect();
    let (b, t) = (rows.len(), rows[0].len());
    let dev = Device::Cpu;
    Batch {
        input_ids: Tensor::from_vec(rows.concat(), (b, t), &dev).unwrap(),
        position_ids: Tensor::from_vec((0..b).flat_map(|_| 0..t as u32).collect(), (b, t), &dev)
            .unwrap(),
        key_mask: Some(Tensor::from_vec(mask, (b, t), &dev).unwrap()),
        segments: None,
    }
}

#[test]
fn committed_export_loads_in_transformers_with_the_same_scores() {
    let committed = reward_fixtures().join("ferrotune_export");
    // The committed folder is what our exporter writes today (side files byte for byte; weights
    // to float rounding, since the merge's matmul may round differently on another CPU), so the
    // numbers transformers recorded for it are about our current output.
    let regenerate = "regenerate it: cargo run -p ferrotune-ckpt --example make_reward_export, \
                      then make_reward_fixture.py export";
    let tmp = tempfile::tempdir().unwrap();
    let fresh = tmp.path().join("rm");
    let report = export_reward_model(&export_fixture_model(), &fresh, DType::F32).unwrap();
    same_folder(&fresh, &committed, regenerate);
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        assert!(report.files.iter().any(|x| x == f), "{f} not exported");
    }

    let want = json(&reward_fixtures().join("export_scores.json"));
    assert_eq!(want["meta"]["class"], "LlamaForSequenceClassification");
    let rm = RewardModel::load(&committed, &LoadOptions::default()).unwrap();
    for side in ["right", "left"] {
        let case = &want[side];
        let bt = hf_batch(case);
        let expect = floats(&case["scores"]);
        let ours = scores(&rm, &bt, Mode::EVAL);
        let ours_hf: Vec<f32> = rm.scores_hf(&bt, Mode::EVAL).unwrap().to_vec1().unwrap();
        let err = max_diff(&ours, &expect).max(max_diff(&ours_hf, &expect));
        println!("{side}: max |ours - transformers| on our export = {err:.2e}");
        assert!(err < 1e-5, "{side}: {ours:?} vs transformers {expect:?}");
    }
    // The unmerged model (base + LoRA + head in memory) scores the same as well.
    let rm0 = export_fixture_model();
    let bt = hf_batch(&want["right"]);
    let expect: Vec<f32> = scores(&rm, &bt, Mode::EVAL);
    assert!(max_diff(&scores(&rm0, &bt, Mode::EVAL), &expect) < 1e-5);
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// `fresh` and `committed` hold the same files: JSON byte for byte, safetensors to 1e-6.
fn same_folder(fresh: &std::path::Path, committed: &std::path::Path, regenerate: &str) {
    let list = |d: &std::path::Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(list(fresh), list(committed), "{regenerate}");
    for f in list(fresh) {
        if f.ends_with(".safetensors") {
            let (a, b) = (st(&fresh.join(&f)), st(&committed.join(&f)));
            assert_eq!(a.len(), b.len(), "{f}: {regenerate}");
            for (k, t) in &a {
                let c = b
                    .get(k)
                    .unwrap_or_else(|| panic!("{k} not committed; {regenerate}"));
                assert_eq!(t.dims(), c.dims(), "{k}");
                assert!(max_abs(t, c) < 1e-6, "{f} {k} differs; {regenerate}");
            }
        } else {
            let (a, b) = (
                std::fs::read(fresh.join(&f)).unwrap(),
                std::fs::read(committed.join(&f)).unwrap(),
            );
            assert!(a == b, "{f} differs from the committed one; {regenerate}");
        }
    }
}

#[test]
fn our_reward_adapter_loads_in_peft_and_back_here() {
    let regenerate = "regenerate: cargo run -p ferrotune-ckpt --example make_reward_export, \
                      then make_reward_fixture.py export";
    let tmp = tempfile::tempdir().unwrap();
    let fresh = tmp.path().join("adapter");
    let rm = export_fixture_model();
    save_reward_adapter(&rm, &lora(), ADAPTER_BASE, &fresh).unwrap();
    let committed = reward_fixtures().join("ferrotune_adapter");
    same_folder(&fresh, &committed, regenerate);
    let cfg = json(&committed.join("adapter_config.json"));
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(
        cfg["modules_to_save"],
        serde_json::json!(["classifier", "score"])
    );

    // PEFT's scores for this folder (recorded by make_reward_fixture.py export) are ours.
    let want = json(&reward_fixtures().join("export_scores.json"));
    let expect = floats(&want["peft_adapter_right_scores"]);
    let bt = hf_batch(&want["right"]);
    let base = reward_fixtures().join("base");
    let back = load_reward_adapter(&base, &committed, &LoadOptions::default()).unwrap();
    let ours = scores(&back, &bt, Mode::EVAL);
    let err = max_diff(&ours, &expect);
    println!("our adapter: max |ours - PEFT| = {err:.2e}");
    assert!(err < 1e-5, "{ours:?} vs PEFT {expect:?}");
    assert_eq!(max_abs(back.score.as_tensor(), rm.score.as_tensor()), 0.0);

    // A causal-LM load refuses the head instead of dropping it silently.
    let err = load_with_adapter(&base, &committed, &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("score.weight"), "{err}");
}

#[test]
fn peft_reward_adapter_loads_here() {
    let want = json(&reward_fixtures().join("scores.json"));
    let rm = load_reward_adapter(
        &reward_fixtures().join("base"),
        &reward_fixtures().join("peft_adapter"),
        &LoadOptions::default(),
    )
    .unwrap();
    for side in ["right", "left"] {
        let case = &want["peft_adapter"][side];
        let ours = scores(&rm, &hf_batch(case), Mode::EVAL);
        let expect = floats(&case["scores"]);
        let err = max_diff(&ours, &expect);
        println!("PEFT adapter {side}: max |ours - PEFT| = {err:.2e}");
        assert!(err < 1e-5, "{side}: {ours:?} vs PEFT {expect:?}");
    }
    // Adapters off: a different score, so the LoRA weights were really loaded.
    let case = &want["peft_adapter"]["right"];
    let off = scores(&rm, &hf_batch(case), Mode::REFERENCE);
    assert!(max_diff(&off, &floats(&case["scores"])) > 1e-3);

    // A plain causal adapter is not a reward adapter.
    let err = load_reward_adapter(
        &common::tiny("llama"),
        &common::tiny("llama").join("adapter"),
        &LoadOptions::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("SEQ_CLS"), "{err}");
}
