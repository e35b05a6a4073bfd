//! Random init (`ferrotune_models::init`): every weight the loader asks for is produced with the
//! right shape (the checked loader reports any missing, extra or misshapen key), both in memory
//! and from a safetensors folder on disk; the statistics follow transformers' `_init_weights`
//! rule (normal(0, initializer_range), norms one, biases zero, padding row zero); the same seed
//! gives the same weights; and a fresh model's loss is near ln(V), as for any near-uniform
//! predictor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ferrotune_models::init::{init_model, init_weights, InitOptions};
use ferrotune_models::{load, Batch, HfConfig, LoadOptions, ModelConfig};
use ferrotune_nn::Mode;

fn config(model_type: &str, tie: bool, extra: serde_json::Value) -> ModelConfig {
    let mut v = serde_json::json!({
        "model_type": model_type,
        "vocab_size": 301,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": tie,
    });
    if let (Some(o), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
    let hf: HfConfig = serde_json::from_value(v).unwrap();
    ModelConfig::from_hf(&hf, Path::new("test")).unwrap()
}

fn opts(seed: u64) -> InitOptions {
    InitOptions {
        initializer_range: 0.02,
        seed,
        pad_token_id: Some(3),
    }
}

fn variants() -> Vec<(&'static str, ModelConfig)> {
    vec![
        ("llama tied", config("llama", true, serde_json::json!({}))),
        (
            "llama untied",
            config("llama", false, serde_json::json!({})),
        ),
        (
            "llama biases",
            config(
                "llama",
                false,
                serde_json::json!({"attention_bias": true, "mlp_bias": true}),
            ),
        ),
        ("mistral", config("mistral", false, serde_json::json!({}))),
        ("qwen2", config("qwen2", true, serde_json::json!({}))),
        (
            "qwen3",
            config("qwen3", true, serde_json::json!({"head_dim": 32})),
        ),
    ]
}

fn by_name(w: Vec<(String, Tensor)>) -> HashMap<String, Tensor> {
    w.into_iter().collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn every_expected_weight_is_produced_and_loads() {
    for (what, cfg) in variants() {
        let load = LoadOptions {
            trainable_base: true,
            ..LoadOptions::default()
        };
        let loaded = init_model(&cfg, &opts(1), &load)
            .unwrap_or_else(|e| panic!("{what}: checked loader refused the init: {e}"));
        let names: Vec<&str> = loaded.base_params.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names.contains(&"lm_head.weight"),
            !cfg.tie_word_embeddings,
            "{what}: a tied head has no lm_head.weight"
        );
        if what == "qwen3" {
            assert!(names.contains(&"model.layers.1.self_attn.k_norm.weight"));
        }
        if what == "qwen2" {
            assert!(names.contains(&"model.layers.0.self_attn.q_proj.bias"));
            assert!(!names.contains(&"model.layers.0.self_attn.o_proj.bias"));
        }
        let n: usize = loaded.base_params.iter().map(|(_, v)| v.elem_count()).sum();
        let weights = init_weights(&cfg, &opts(1), &Device::Cpu).unwrap();
        assert_eq!(
            n,
            weights.iter().map(|(_, t)| t.elem_count()).sum::<usize>()
        );
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferrotune-init-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_saved_init_loads_from_a_hf_folder() {
    let dir = temp_dir("folder");
    let cfg_json = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 301,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": true,
    });
    std::fs::write(dir.join("config.json"), cfg_json.to_string()).unwrap();
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = by_name(init_weights(&cfg, &opts(5), &Device::Cpu).unwrap());
    candle_core::safetensors::save(&weights, dir.join("model.safetensors")).unwrap();
    let loaded = load(&dir, &LoadOptions::default()).unwrap();
    let fresh = init_model(&cfg, &opts(5), &LoadOptions::default()).unwrap();
    let batch = Batch {
        input_ids: Tensor::new(&[[5u32, 9, 200, 17]], &Device::Cpu).unwrap(),
        position_ids: Tensor::new(&[[0u32, 1, 2, 3]], &Device::Cpu).unwrap(),
        key_mask: None,
        segments: None,
    };
    let a = values(&loaded.model.forward(&batch, None, Mode::EVAL).unwrap());
    let b = values(&fresh.model.forward(&batch, None, Mode::EVAL).unwrap());
    assert_eq!(
        a, b,
        "the folder and the in-memory init must be the same model"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn statistics_follow_the_hf_rule() {
    let cfg = config(
        "llama",
        false,
        serde_json::json!({"attention_bias": true, "vocab_size": 2000}),
    );
    let w = by_name(init_weights(&cfg, &opts(3), &Device::Cpu).unwrap());
    for (name, t) in &w {
        assert_eq!(t.dtype(), DType::F32);
        let v = values(t);
        if name.ends_with("norm.weight") {
            assert!(
                v.iter().all(|&x| x == 1.0),
                "{name}: RMSNorm weights start at one"
            );
        } else if name.ends_with(".bias") {
            assert!(v.iter().all(|&x| x == 0.0), "{name}: biases start at zero");
        } else {
            let rows_skip = if name == "model.embed_tokens.weight" {
                1
            } else {
                0
            };
            let n = (v.len() - rows_skip * cfg.hidden_size) as f64;
            let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
            let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
            // Standard error of a std estimate is std / sqrt(2n): at n >= 4096 under 1.2%.
            let tol = 0.02 * 5.0 / (2.0 * n).sqrt();
            assert!(
                (std - 0.02).abs() < tol,
                "{name}: std {std} not within {tol} of 0.02"
            );
            assert!(mean.abs() < 5.0 * 0.02 / n.sqrt(), "{name}: mean {mean}");
        }
    }
    // The padding row of the embedding is zero, its neighbours are not.
    let emb = &w["model.embed_tokens.weight"];
    let row = |i: usize| values(&emb.get(i).unwrap());
    assert!(row(3).iter().all(|&x| x == 0.0));
    assert!(row(2).iter().any(|&x| x != 0.0) && row(4).iter().any(|&x| x != 0.0));
    // A pooled sample of all normal weights is normal: about 68.3% within one std.
    let all: Vec<f32> = w
        .iter()
        .filter(|(n, _)| n.ends_with("proj.weight"))
        .flat_map(|(_, t)| values(t))
        .collect();
    let within = all.iter().filter(|x| x.abs() < 0.02).count() as f64 / all.len() as f64;
    assert!(
        (within - 0.6827).abs() < 0.01,
        "fraction within 1 std: {within}"
    );
}

#[test]
fn the_seed_decides_the_weights() {
    let cfg = config("llama", true, serde_json::json!({}));
    let a = init_weights(&cfg, &opts(11), &Device::Cpu).unwrap();
    let b = init_weights(&cfg, &opts(11), &Device::Cpu).unwrap();
    let c = init_weights(&cfg, &opts(12), &Device::Cpu).unwrap();
    for ((na, ta), ((_, tb), (_, tc))) in a.iter().zip(b.iter().zip(c.iter())) {
        assert_eq!(values(ta), values(tb), "{na}: same seed, same weights");
        if na.ends_with("proj.weight") {
            assert_ne!(values(ta), values(tc), "{na}: another seed, other weights");
        }
    }
    // Different tensors of one seed are not copies of each other.
    let m: HashMap<_, _> = a.into_iter().collect();
    assert_ne!(
        values(&m["model.layers.0.self_attn.q_proj.weight"]),
        values(&m["model.layers.1.self_attn.q_proj.weight"])
    );
}

#[test]
fn a_fresh_model_predicts_nearly_uniformly() {
    let cfg = config("llama", true, serde_json::json!({}));
    let loaded = init_model(&cfg, &opts(2), &LoadOptions::default()).unwrap();
    let ids: Vec<u32> = (0..32).map(|i| (i * 37 % 301) as u32).collect();
    let batch = Batch {
        input_ids: Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap(),
        position_ids: Tensor::arange(0u32, 32, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap(),
        key_mask: None,
        segments: None,
    };
    let logits = loaded.model.forward(&batch, None, Mode::EVAL).unwrap(); // (1, T, V)
    let logp = log_softmax_rows(&logits.squeeze(0).unwrap());
    let mean_nll: f64 = ids[1..]
        .iter()
        .enumerate()
        .map(|(t, &next)| -logp[t][next as usize] as f64)
        .sum::<f64>()
        / 31.0;
    let uniform = (301f64).ln();
    assert!(
        (mean_nll - uniform).abs() < 0.05 * uniform,
        "fresh model NLL {mean_nll} should be close to ln(V) = {uniform}"
    );
}

/// Row-wise log-softmax of a (T, V) tensor, in plain Rust.
fn log_softmax_rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|row| {
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
            row.iter().map(|x| x - lse).collect()
        })
        .collect()
}
