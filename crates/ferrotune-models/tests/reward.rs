//! The reward model against transformers' `…ForSequenceClassification`: loading `score.weight`,
//! pooling at the last non-pad token on right- and left-padded batches, and the head's gradient.
//! Fixtures: fixtures/reward/make_reward_fixture.py (step `models`), transformers 5.24.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use ferrotune_models::reward::{hf_last_non_pad, last_real_index};
use ferrotune_models::{load, Batch, LoadOptions, ModelError, RewardModel};
use ferrotune_nn::{LoraConfig, Mode, TargetModules};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/reward")
}

fn scores_json() -> Value {
    let text = std::fs::read_to_string(fixtures().join("scores.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn matrix(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// The batch exactly as transformers saw it: the ids and mask of the case, positions 0..T-1 on
/// every row (what the model uses when called without `position_ids`, left padding included).
fn hf_batch(case: &Value) -> Batch {
    let ids = matrix(&case["input_ids"]);
    let mask = matrix(&case["attention_mask"]);
    let (b, t) = (ids.len(), ids[0].len());
    let dev = Device::Cpu;
    Batch {
        input_ids: Tensor::from_vec(ids.concat(), (b, t), &dev).unwrap(),
        position_ids: Tensor::from_vec((0..b).flat_map(|_| 0..t as u32).collect(), (b, t), &dev)
            .unwrap(),
        key_mask: Some(
            Tensor::from_vec(
                mask.concat().iter().map(|&m| m as u8).collect::<Vec<u8>>(),
                (b, t),
                &dev,
            )
            .unwrap(),
        ),
        segments: None,
    }
}

/// The real tokens of each row of a case.
fn real_seqs(case: &Value) -> Vec<Vec<u32>> {
    let ids = matrix(&case["input_ids"]);
    let mask = matrix(&case["attention_mask"]);
    ids.iter()
        .zip(&mask)
        .map(|(r, m)| {
            r.iter()
                .zip(m)
                .filter(|(_, &m)| m == 1)
                .map(|(&i, _)| i)
                .collect()
        })
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn loads_hf_sequence_classification_and_scores_like_transformers() {
    let want = scores_json();
    for name in ["llama", "qwen2"] {
        let rm = RewardModel::load(&fixtures().join(name), &LoadOptions::default()).unwrap();
        assert_eq!(rm.pad_token_id, Some(0), "{name}");
        assert_eq!(rm.score.dims(), [1, 32]);
        let w = &want[name];
        for side in ["right", "left"] {
            let case = &w[side];
            let bt = hf_batch(case);
            let expect = floats(&case["scores"]);
            let ours: Vec<f32> = rm.scores(&bt, Mode::EVAL).unwrap().to_vec1().unwrap();
            let hf: Vec<f32> = rm.scores_hf(&bt, Mode::EVAL).unwrap().to_vec1().unwrap();
            let (e1, e2) = (max_diff(&ours, &expect), max_diff(&hf, &expect));
            println!(
                "{name} {side}: max |ours - transformers| = {e1:.2e} (mask) {e2:.2e} (pad id)"
            );
            assert!(
                e1 < 1e-5 && e2 < 1e-5,
                "{name} {side}: {ours:?} vs {expect:?}"
            );
        }
        // Our own padding conventions (left padding with positions counting real tokens only)
        // and each row alone give transformers' scores too.
        let seqs = real_seqs(&w["right"]);
        let left = Batch::left_padded(&seqs, 0, &Device::Cpu).unwrap();
        let ours: Vec<f32> = rm.scores(&left, Mode::EVAL).unwrap().to_vec1().unwrap();
        let expect = floats(&w["right"]["scores"]);
        assert!(
            max_diff(&ours, &expect) < 1e-5,
            "{name} left_padded: {ours:?}"
        );
        let singles = floats(&w["single"]);
        let ours = rm.score_sequences(&seqs, Mode::EVAL).unwrap();
        assert!(
            max_diff(&ours, &singles) < 1e-5,
            "{name} score_sequences: {ours:?}"
        );
        for (s, want) in seqs.iter().zip(&singles) {
            let one = rm
                .score_sequences(std::slice::from_ref(s), Mode::EVAL)
                .unwrap();
            assert!(
                (one[0] - want).abs() < 1e-5,
                "{name} single: {one:?} vs {want}"
            );
        }
    }
}

#[test]
fn rows_ending_in_the_pad_id_are_pooled_as_transformers_pools_them() {
    let want = scores_json();
    for name in ["llama", "qwen2"] {
        let rm = RewardModel::load(&fixtures().join(name), &LoadOptions::default()).unwrap();
        let case = &want[name]["pad_ended"];
        let bt = hf_batch(case);
        let at: Vec<usize> = case_positions(&want[name]["pad_ended_pooled_at"]);
        assert_eq!(hf_last_non_pad(&bt.input_ids, Some(0)).unwrap(), at);
        let expect = floats(&case["scores"]);
        let hf: Vec<f32> = rm.scores_hf(&bt, Mode::EVAL).unwrap().to_vec1().unwrap();
        assert!(
            max_diff(&hf, &expect) < 1e-5,
            "{name}: {hf:?} vs {expect:?}"
        );
        // The mask-based pooling reads the real last token instead, so row 0 (which ends in the
        // pad id) differs from transformers: the documented divergence of `scores`.
        assert_eq!(last_real_index(&bt).unwrap(), vec![4, 4]);
        let ours: Vec<f32> = rm.scores(&bt, Mode::EVAL).unwrap().to_vec1().unwrap();
        assert!((ours[0] - expect[0]).abs() > 1e-3, "{name}: {ours:?}");
        assert!((ours[1] - expect[1]).abs() < 1e-5, "{name}: {ours:?}");
    }
}

fn case_positions(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

#[test]
fn pooling_rules_match_transformers_edge_cases() {
    let ids = Tensor::new(&[[0u32, 0, 0], [5, 0, 0], [0, 0, 7]], &Device::Cpu).unwrap();
    // argmax of all zeros is 0 (all-pad row, and a row whose only real token is first).
    assert_eq!(hf_last_non_pad(&ids, Some(0)).unwrap(), vec![0, 0, 2]);
    // No pad id: transformers refuses a batch of more than one row and takes the last token
    // of a single row.
    assert!(hf_last_non_pad(&ids, None).is_err());
    let one = Tensor::new(&[[3u32, 4, 0]], &Device::Cpu).unwrap();
    assert_eq!(hf_last_non_pad(&one, None).unwrap(), vec![2]);
}

#[test]
fn refuses_checkpoints_that_are_not_one_label_classifiers() {
    // A causal LM checkpoint: transformers' default is num_labels = 2 with no id2label.
    let err = RewardModel::load(&fixtures().join("base"), &LoadOptions::default())
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(
        matches!(err, ModelError::Config { ref field, .. } if field == "num_labels"),
        "{msg}"
    );
    assert!(msg.contains("from_causal"), "{msg}");

    // A two-label classifier.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("two");
    std::fs::create_dir(&dir).unwrap();
    let src = fixtures().join("llama");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["id2label"] = serde_json::json!({ "0": "BAD", "1": "GOOD" });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let msg = RewardModel::load(&dir, &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("num_labels") && msg.contains("has 2"), "{msg}");
}

fn lora() -> LoraConfig {
    LoraConfig {
        r: 2,
        lora_alpha: 4.0,
        lora_dropout: 0.0,
        use_rslora: false,
        target_modules: TargetModules::AllLinear,
    }
}

#[test]
fn from_causal_head_init_and_gradients_reach_head_and_adapters() {
    let opts = LoadOptions {
        lora: Some((lora(), 3)),
        ..LoadOptions::default()
    };
    let loaded = load(&fixtures().join("base"), &opts).unwrap();
    let rm = RewardModel::from_causal(loaded, 11).unwrap();
    assert_eq!(rm.pad_token_id, Some(0));
    // normal(0, initializer_range = 0.2): 32 draws, so the sample std is well inside [0.1, 0.3].
    let w: Vec<f32> = rm
        .score
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let std = (w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32).sqrt();
    assert!((0.1..0.3).contains(&std), "head std {std}");
    // Seeded: the same seed gives the same head, another seed another.
    let again =
        RewardModel::from_causal(load(&fixtures().join("base"), &opts).unwrap(), 11).unwrap();
    let other =
        RewardModel::from_causal(load(&fixtures().join("base"), &opts).unwrap(), 12).unwrap();
    let w2: Vec<f32> = again
        .score
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let w3: Vec<f32> = other
        .score
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(w, w2);
    assert_ne!(w, w3);

    // Bradley–Terry loss on one pair: gradients reach the head and every adapter's A and B
    // (B is zero at init, so A gets none on the first step; B does).
    let seqs = vec![vec![1u32, 20, 21, 22], vec![1, 30, 31]];
    let bt = Batch::right_padded(&seqs, 0, &Device::Cpu).unwrap();
    let s = rm.scores(&bt, Mode::TRAIN).unwrap(); // (2,)
    assert_eq!(s.dtype(), DType::F32);
    let margin = (s.get(0).unwrap() - s.get(1).unwrap()).unwrap();
    // -log σ(m) = softplus(-m) = log(1 + exp(-m))
    let loss = ((margin.neg().unwrap().exp().unwrap() + 1.0).unwrap().log()).unwrap();
    let grads = loss.backward().unwrap();
    let gh = grads.get(rm.score.as_tensor()).unwrap();
    assert!(
        gh.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
    let mut b_with_grad = 0;
    for slot in rm.body.linear_slots() {
        let Some(l) = &slot.lora else { continue };
        let g = grads.get(l.b.as_tensor()).unwrap();
        if g.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
        {
            b_with_grad += 1;
        }
    }
    assert_eq!(b_with_grad, 14, "every LoRA B gets a gradient");
}

#[test]
fn lora_on_lm_head_is_refused() {
    let mut cfg = lora();
    cfg.target_modules = TargetModules::Names(vec!["q_proj".into(), "lm_head".into()]);
    let opts = LoadOptions {
        lora: Some((cfg, 0)),
        ..LoadOptions::default()
    };
    let loaded = load(&fixtures().join("base"), &opts).unwrap();
    let msg = RewardModel::from_causal(loaded, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("lm_head"), "{msg}");
}

#[test]
fn bf16_body_scores_close_to_transformers_f32() {
    let want = scores_json();
    for name in ["llama", "qwen2"] {
        let opts = LoadOptions {
            dtype: DType::BF16,
            ..LoadOptions::default()
        };
        let rm = RewardModel::load(&fixtures().join(name), &opts).unwrap();
        assert_eq!(rm.score.dtype(), DType::F32, "the head stays f32");
        let case = &want[name]["right"];
        let ours: Vec<f32> = rm
            .scores(&hf_batch(case), Mode::EVAL)
            .unwrap()
            .to_vec1()
            .unwrap();
        let err = max_diff(&ours, &floats(&case["scores"]));
        println!("{name} bf16: max |ours - transformers f32| = {err:.2e}");
        assert!(err < 0.1, "{name} bf16: {ours:?}");
    }
}
