//! `Tokenizer::from_gguf` on a sentencepiece ("llama") vocabulary gives the ids and decodes
//! transformers' GGUF converter gives. The metadata (a 400-token sentencepiece BPE vocabulary, as
//! llama.cpp stores it) and the expected values are in fixtures/tokenize/spm_tiny.json, written by
//! fixtures/tokenize/make_tokenize_fixtures.py; the test builds the GGUF header in memory.

mod common;

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
use common::{fixtures_dir, ids};
use ferrotune_tokenize::Tokenizer;

fn to_gguf(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::String(s) => Value::String(s.clone()),
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) if n.is_u64() => Value::U32(n.as_u64().unwrap() as u32),
        serde_json::Value::Number(n) if n.is_i64() => Value::I32(n.as_i64().unwrap() as i32),
        serde_json::Value::Number(n) => Value::F32(n.as_f64().unwrap() as f32),
        serde_json::Value::Array(items) => Value::Array(items.iter().map(to_gguf).collect()),
        other => panic!("no GGUF value for {other}"),
    }
}

#[test]
fn sentencepiece_gguf_matches_transformers() {
    let path = fixtures_dir().join("spm_tiny.json");
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut metadata: HashMap<String, Value> = fixture["metadata"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), to_gguf(v)))
        .collect();
    // Scores are floats in a GGUF even when they are whole numbers (JSON writes -0.0 as -0.0,
    // but 0 would parse as an integer).
    if let Some(serde_json::Value::Array(scores)) = fixture["metadata"].get("tokenizer.ggml.scores")
    {
        let floats = scores
            .iter()
            .map(|s| Value::F32(s.as_f64().unwrap() as f32))
            .collect();
        metadata.insert("tokenizer.ggml.scores".into(), Value::Array(floats));
    }
    let content = Content {
        magic: VersionedMagic::GgufV3,
        metadata,
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    };
    let tok = Tokenizer::from_gguf(&content).unwrap();
    assert_eq!(
        tok.vocab_size(),
        fixture["vocab_size"].as_u64().unwrap() as usize
    );
    assert!(tok.add_bos_token(), "llama GGUFs add BOS by default");
    let mut matched = 0;
    let mut failures = Vec::new();
    for case in fixture["strings"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let got = tok.encode(text, true).unwrap();
        let plain = tok.encode(text, false).unwrap();
        let dec = tok.decode(&got, false).unwrap();
        let dec_skip = tok.decode(&got, true).unwrap();
        if got == ids(&case["ids"])
            && plain == ids(&case["ids_no_special"])
            && dec == case["decoded"].as_str().unwrap()
            && dec_skip == case["decoded_skip_special"].as_str().unwrap()
        {
            matched += 1;
        } else {
            failures.push(format!(
                "{text:?}: ids {got:?} want {}; decoded {dec:?} want {}",
                case["ids"], case["decoded"]
            ));
        }
    }
    let n = fixture["strings"].as_array().unwrap().len();
    println!("sentencepiece gguf parity: {matched}/{n} strings identical (ids and decodes)");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
