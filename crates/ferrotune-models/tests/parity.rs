//! Parity of the model core with transformers on tiny random models of every family, and the
//! invariants the trainers rely on. Fixtures: fixtures/tiny/make_tiny.py and, for Gemma 3 and
//! sliding-window attention (window 4 on sequences of 16), fixtures/tiny/make_windowed.py
//! (transformers + peft).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use ferrotune_models::adapter::{load_weights, peft_key, PeftConfig};
use ferrotune_models::{load, Batch, CausalLm, LoadOptions};
use ferrotune_nn::{ops, LoraConfig, Mode, TargetModules};

const FAMILIES: [&str; 8] = [
    "llama",
    "llama3",
    "mistral",
    "qwen2",
    "qwen3",
    "gpt2",
    "gemma3",
    "mistral-window",
];

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/tiny")
        .join(name)
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir(name).join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn ids_u32(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

/// The batch stored under `prefix` (right / left).
fn batch(r: &HashMap<String, Tensor>, prefix: &str) -> Batch {
    let mask = r[&format!("{prefix}.attention_mask")]
        .to_dtype(DType::U8)
        .unwrap();
    Batch {
        input_ids: ids_u32(&r[&format!("{prefix}.input_ids")]),
        position_ids: ids_u32(&r[&format!("{prefix}.position_ids")]),
        key_mask: Some(mask),
        segments: None,
    }
}

fn load_f32(name: &str) -> Box<dyn CausalLm> {
    load(&dir(name), &LoadOptions::default()).unwrap().model
}

/// Max |a - b| over positions where `mask` (B, T) is 1.
fn masked_max_abs(a: &Tensor, b: &Tensor, mask: &Tensor) -> f32 {
    let m = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .broadcast_mul(&m)
        .unwrap();
    d.flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn logits_match_transformers_right_and_left_padded() {
    for name in FAMILIES {
        let model = load_f32(name);
        let r = reference(name);
        for prefix in ["right", "left"] {
            let b = batch(&r, prefix);
            let logits = model.forward(&b, None, Mode::EVAL).unwrap();
            let expected = &r[&format!("{prefix}.logits")];
            let err = masked_max_abs(&logits, expected, b.key_mask.as_ref().unwrap());
            println!("{name} {prefix}: max abs diff {err:.2e}");
            assert!(err < 1e-4, "{name} {prefix}: max abs diff {err}");
        }
    }
}

#[test]
fn left_padded_batch_equals_each_row_alone() {
    for name in FAMILIES {
        let model = load_f32(name);
        let r = reference(name);
        let b = batch(&r, "left");
        let logits = model.forward(&b, None, Mode::EVAL).unwrap(); // (B, T, V)
        let (_, t, _) = logits.dims3().unwrap();
        for i in 0..3 {
            let ids = ids_u32(&r[&format!("single.{i}.input_ids")]);
            let len = ids.dim(1).unwrap();
            let alone = model
                .forward(
                    &Batch::right_padded(
                        &[ids.squeeze(0).unwrap().to_vec1().unwrap()],
                        0,
                        &Device::Cpu,
                    )
                    .unwrap(),
                    None,
                    Mode::EVAL,
                )
                .unwrap();
            let row = logits
                .narrow(0, i, 1)
                .unwrap()
                .narrow(1, t - len, len)
                .unwrap();
            let err = (row - &alone)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(err < 1e-4, "{name} row {i}: {err}");
            let hf = &r[&format!("single.{i}.logits")];
            let err = (alone - hf)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(err < 1e-4, "{name} row {i} vs transformers: {err}");
        }
    }
}

#[test]
fn kv_cached_decoding_equals_full_forward() {
    for name in FAMILIES {
        let model = load_f32(name);
        let r = reference(name);
        let b = batch(&r, "left");
        let full = model.forward(&b, None, Mode::EVAL).unwrap(); // (B, T, V)
        let (bsz, t) = b.dims().unwrap();
        // Prefill the first 4 positions, then feed one token at a time.
        let mut cache = model.new_cache();
        let split = 4;
        let mask = b.key_mask.clone().unwrap();
        let pre = Batch {
            input_ids: b.input_ids.narrow(1, 0, split).unwrap(),
            position_ids: b.position_ids.narrow(1, 0, split).unwrap(),
            key_mask: Some(mask.narrow(1, 0, split).unwrap()),
            segments: None,
        };
        let mut pieces = vec![model.forward(&pre, Some(&mut cache), Mode::EVAL).unwrap()];
        for s in split..t {
            let step = Batch {
                input_ids: b.input_ids.narrow(1, s, 1).unwrap(),
                position_ids: b.position_ids.narrow(1, s, 1).unwrap(),
                key_mask: Some(mask.narrow(1, 0, s + 1).unwrap()),
                segments: None,
            };
            pieces.push(model.forward(&step, Some(&mut cache), Mode::EVAL).unwrap());
        }
        assert_eq!(cache.len(), t);
        let cached = Tensor::cat(&pieces, 1).unwrap();
        assert_eq!(cached.dims(), full.dims());
        let err = masked_max_abs(&cached, &full, &mask);
        assert!(err < 1e-4, "{name}: cached vs full {err} (B={bsz})");
    }
}

#[test]
fn lora_with_b_zero_is_the_base_model() {
    for name in FAMILIES {
        let base = load_f32(name);
        let targets = if name == "gpt2" {
            vec!["c_attn", "c_proj", "c_fc"]
        } else {
            vec![
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
        };
        let lora = LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            use_rslora: false,
            target_modules: TargetModules::Names(targets.iter().map(|s| s.to_string()).collect()),
        };
        let opts = LoadOptions {
            lora: Some((lora, 7)),
            ..LoadOptions::default()
        };
        let with = load(&dir(name), &opts).unwrap().model;
        let n_adapters = with
            .linear_slots()
            .iter()
            .filter(|s| s.lora.is_some())
            .count();
        assert!(n_adapters > 0, "{name}: no slot matched");
        let r = reference(name);
        let b = batch(&r, "right");
        let a = base.forward(&b, None, Mode::EVAL).unwrap();
        let c = with.forward(&b, None, Mode::EVAL).unwrap();
        let err = masked_max_abs(&a, &c, b.key_mask.as_ref().unwrap());
        assert!(err == 0.0, "{name}: B=0 adapter changed logits by {err}");
        // And with B != 0 the adapter does change them (the slot is really wired in).
        for s in with.linear_slots() {
            if let Some(l) = &s.lora {
                l.b.set(&(l.b.ones_like().unwrap() * 0.1).unwrap()).unwrap();
            }
        }
        let d = with.forward(&b, None, Mode::EVAL).unwrap();
        assert!(masked_max_abs(&a, &d, b.key_mask.as_ref().unwrap()) > 1e-3);
        // Adapters off = the base model again.
        let e = with.forward(&b, None, Mode::REFERENCE).unwrap();
        assert_eq!(masked_max_abs(&a, &e, b.key_mask.as_ref().unwrap()), 0.0);
    }
}

#[test]
fn bf16_logits_are_close_to_f32() {
    for name in FAMILIES {
        let f32m = load_f32(name);
        let opts = LoadOptions {
            dtype: DType::BF16,
            ..LoadOptions::default()
        };
        let bf = load(&dir(name), &opts).unwrap().model;
        let r = reference(name);
        let b = batch(&r, "right");
        let a = f32m.forward(&b, None, Mode::EVAL).unwrap();
        let c = bf.forward(&b, None, Mode::EVAL).unwrap();
        assert_eq!(c.dtype(), DType::BF16);
        let scale = a
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let err = masked_max_abs(&a, &c, b.key_mask.as_ref().unwrap());
        println!("{name}: bf16 max abs diff {err:.3e} (max |logit| {scale:.2})");
        // bf16 keeps 8 mantissa bits (rel. 2^-8 = 3.9e-3 per rounding); a 2-layer model
        // accumulates a few roundings.
        assert!(
            err < 0.05 * scale.max(1.0),
            "{name}: bf16 {err} vs scale {scale}"
        );
    }
}

/// Mean next-token cross-entropy over real targets of the right-padded batch, computed with the
/// fused chunked op, as the fixture script computes it with torch.
fn mean_ce(model: &dyn CausalLm, b: &Batch) -> Tensor {
    let h = model.hidden(b, None, Mode::TRAIN).unwrap(); // (B, T, H)
    let (bsz, t, hd) = h.dims3().unwrap();
    let mask = b.key_mask.as_ref().unwrap().to_vec2::<u8>().unwrap();
    let ids = b.input_ids.to_vec2::<u32>().unwrap();
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for i in 0..bsz {
        for j in 0..t - 1 {
            if mask[i][j + 1] == 1 {
                rows.push((i * t + j) as u32);
                targets.push(ids[i][j + 1]);
            }
        }
    }
    let n = rows.len();
    let flat = h.reshape((bsz * t, hd)).unwrap();
    let sel = flat
        .index_select(&Tensor::new(rows, &Device::Cpu).unwrap(), 0)
        .unwrap();
    let targets = Tensor::new(targets, &Device::Cpu).unwrap();
    let lp = ops::token_logprobs(&sel, &model.lm_head().weight, &targets, 1.0).unwrap();
    (lp.sum_all().unwrap().neg().unwrap() / n as f64).unwrap()
}

#[test]
fn lora_gradients_match_peft() {
    for name in ["llama", "qwen2", "gpt2", "gemma3", "mistral-window"] {
        let adir = dir(name).join("adapter");
        let peft = PeftConfig::from_dir(&adir).unwrap();
        let opts = LoadOptions {
            lora: Some((peft.lora_config().unwrap(), 0)),
            ..LoadOptions::default()
        };
        let model = load(&dir(name), &opts).unwrap().model;
        load_weights(model.as_ref(), &adir).unwrap();
        let fx: HashMap<String, Tensor> =
            candle_core::safetensors::load(dir(name).join("lora_grads.safetensors"), &Device::Cpu)
                .unwrap();
        let r = reference(name);
        let b = batch(&r, "right");
        // Logits with the adapter equal PEFT's.
        let logits = model.forward(&b, None, Mode::TRAIN).unwrap();
        let err = masked_max_abs(&logits, &fx["logits"], b.key_mask.as_ref().unwrap());
        assert!(err < 1e-4, "{name}: adapter logits {err}");
        let loss = mean_ce(model.as_ref(), &b);
        let want = fx["loss"].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
        let got = loss.to_scalar::<f32>().unwrap();
        assert!((got - want).abs() < 1e-5, "{name}: loss {got} vs {want}");
        let grads = loss.backward().unwrap();
        let mut checked = 0;
        for slot in model.linear_slots() {
            let Some(l) = &slot.lora else { continue };
            for (which, var) in [("lora_A", &l.a), ("lora_B", &l.b)] {
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{name}: no grad for {}", slot.path));
                let want = &fx[&peft_key(&slot.path, which)];
                let num = (g - want)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .sqrt()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let den = want
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .sqrt()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(den > 0.0, "{name}: zero reference grad for {}", slot.path);
                assert!(
                    num / den < 1e-4,
                    "{name} {} {which}: rel err {}",
                    slot.path,
                    num / den
                );
                checked += 1;
            }
            // The frozen base weight never gets a gradient.
            assert!(
                grads.get(&slot.weight).is_none(),
                "{name}: grad for frozen {}",
                slot.path
            );
        }
        assert!(checked > 0);
    }
}

/// Greedy decoding with the KV cache, running well past the window, picks the tokens
/// transformers' `generate` picked, and every step's logits equal transformers' full forward.
#[test]
fn greedy_decoding_past_the_sliding_window_matches_transformers() {
    for name in ["gemma3", "mistral-window"] {
        let model = load_f32(name);
        let r = reference(name);
        let prompt: Vec<u32> = ids_u32(&r["greedy.prompt"])
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: Vec<u32> = ids_u32(&r["greedy.ids"])
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let want_logits = &r["greedy.logits"]; // (1, T, V): full forward over prompt + output
        let mut cache = model.new_cache();
        let mut ids = prompt.clone();
        let mut logits = model
            .forward(
                &Batch::right_padded(std::slice::from_ref(&prompt), 0, &Device::Cpu).unwrap(),
                Some(&mut cache),
                Mode::EVAL,
            )
            .unwrap();
        let mut pieces = vec![logits.clone()];
        while ids.len() < want.len() {
            let last = logits.dim(1).unwrap() - 1;
            let next = logits
                .narrow(1, last, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .argmax(0)
                .unwrap()
                .to_scalar::<u32>()
                .unwrap();
            let pos = ids.len() as u32;
            ids.push(next);
            let step = Batch {
                input_ids: Tensor::new(&[[next]], &Device::Cpu).unwrap(),
                position_ids: Tensor::new(&[[pos]], &Device::Cpu).unwrap(),
                key_mask: None,
                segments: None,
            };
            logits = model.forward(&step, Some(&mut cache), Mode::EVAL).unwrap();
            pieces.push(logits.clone());
        }
        assert_eq!(ids, want, "{name}: greedy tokens differ from transformers'");
        let cached = Tensor::cat(&pieces, 1).unwrap();
        let ones = Tensor::ones((1, want.len()), DType::U8, &Device::Cpu).unwrap();
        let err = masked_max_abs(&cached, want_logits, &ones);
        println!("{name}: cached decode vs transformers {err:.2e}");
        assert!(err < 1e-4, "{name}: cached decode vs transformers {err}");
    }
}

/// The transformers 4.x spelling of a Gemma 3 config (`rope_theta`, `rope_local_base_freq`,
/// `rope_scaling`, `sliding_window_pattern`) resolves to the same model as the 5.x one, as
/// transformers itself parses it (config.legacy.parsed.json).
#[test]
fn legacy_gemma3_config_resolves_as_transformers_does() {
    use ferrotune_models::{LayerType, ModelConfig};
    use ferrotune_nn::RopeScaling;
    let new = ModelConfig::from_file(&dir("gemma3").join("config.json")).unwrap();
    let old = ModelConfig::from_file(&dir("gemma3").join("config.legacy.json")).unwrap();
    assert_eq!(old, new);
    let parsed: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir("gemma3").join("config.legacy.parsed.json")).unwrap(),
    )
    .unwrap();
    let types: Vec<LayerType> = parsed["layer_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| match t.as_str().unwrap() {
            "full_attention" => LayerType::Full,
            _ => LayerType::Sliding,
        })
        .collect();
    assert_eq!(new.layer_types, types);
    let rope = &parsed["rope_parameters"];
    assert_eq!(
        Some(new.rope_theta),
        rope["full_attention"]["rope_theta"].as_f64()
    );
    assert_eq!(
        new.rope_scaling,
        RopeScaling::Linear {
            factor: rope["full_attention"]["factor"].as_f64().unwrap()
        }
    );
    assert_eq!(
        new.rope_local_theta,
        rope["sliding_attention"]["rope_theta"].as_f64()
    );
    assert_eq!(new.sliding_window, Some(4));
    assert_eq!(new.query_pre_attn_scalar, Some(24.0));
}

/// Config fields ferrotune cannot honour are refused with the file and field named, never
/// loaded into a silently different model.
#[test]
fn gemma3_configs_it_cannot_run_are_refused() {
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir("gemma3").join("config.json")).unwrap())
            .unwrap();
    let cases: [(&str, serde_json::Value, &str); 5] = [
        (
            "layer_types",
            serde_json::json!(["sliding_attention", "full_attention"]),
            "2 entries but num_hidden_layers is 3",
        ),
        (
            "layer_types",
            serde_json::json!(["sliding_attention", "chunked_attention", "full_attention"]),
            "chunked_attention",
        ),
        (
            "final_logit_softcapping",
            serde_json::json!(30.0),
            "soft-capping",
        ),
        (
            "attn_logit_softcapping",
            serde_json::json!(50.0),
            "soft-capping",
        ),
        ("hidden_activation", serde_json::json!("relu"), "relu"),
    ];
    for (field, value, says) in cases {
        let mut cfg = base.clone();
        cfg[field] = value;
        let hf: ferrotune_models::HfConfig = serde_json::from_value(cfg).unwrap();
        let path = PathBuf::from("gemma/config.json");
        let err = ferrotune_models::ModelConfig::from_hf(&hf, &path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("gemma/config.json"), "{err}");
        assert!(err.contains(field), "{field}: {err}");
        assert!(err.contains(says), "{field}: {err}");
    }
}
