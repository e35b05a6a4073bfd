//! Token-id and decode parity of `Tokenizer::from_dir` with transformers on 20 varied strings.
//! Expected values: fixtures/tokenize/expected.json, written by
//! fixtures/tokenize/make_tokenize_fixtures.py (transformers loading the SmolLM2 GGUF).

mod common;

use common::{expected, ids, smollm2};

#[test]
fn ids_match_transformers_on_twenty_strings() {
    let tok = smollm2();
    let exp = expected();
    let strings = exp["strings"].as_array().unwrap();
    assert_eq!(strings.len(), 20);
    let mut failures = Vec::new();
    for case in strings {
        let text = case["text"].as_str().unwrap();
        let got = tok.encode(text, true).unwrap();
        if got != ids(&case["ids"]) {
            failures.push(format!(
                "{text:?} (add_special_tokens): got {got:?}, want {}",
                case["ids"]
            ));
        }
        let got = tok.encode(text, false).unwrap();
        if got != ids(&case["ids_no_special"]) {
            failures.push(format!(
                "{text:?}: got {got:?}, want {}",
                case["ids_no_special"]
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn decode_matches_transformers() {
    let tok = smollm2();
    for case in expected()["strings"].as_array().unwrap() {
        let ids = ids(&case["ids"]);
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            case["decoded"].as_str().unwrap()
        );
        assert_eq!(
            tok.decode(&ids, true).unwrap(),
            case["decoded_skip_special"].as_str().unwrap(),
            "skip_special_tokens for {:?}",
            case["text"]
        );
    }
}

#[test]
fn special_tokens_match_transformers() {
    let tok = smollm2();
    let exp = expected();
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
    assert_eq!(tok.bos_token(), exp["bos_token"].as_str());
    assert_eq!(tok.eos_token(), exp["eos_token"].as_str());
    assert_eq!(
        tok.vocab_size(),
        exp["vocab_size"].as_u64().unwrap() as usize
    );
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    // SmolLM2's config has add_bos_token unset: encode adds nothing.
    assert!(!tok.add_bos_token());
    assert!(tok.chat_template().unwrap().contains("<|im_start|>"));
}
