//! BPE training parity with the Python `tokenizers` package (same version, same settings): vocab,
//! merges and the ids of probe strings, then the written folder loads and renders a ChatML chat
//! as transformers' `apply_chat_template` does, with the assistant mask on the replies. Expected
//! values: fixtures/tokenize/bpe_train/expected.json, written by
//! fixtures/tokenize/bpe_train/make_bpe_train.py.

use std::path::PathBuf;

use ferrotune_tokenize::train::{
    strip_special_tokens, train_bpe, train_tokenizer, BpeTrainOptions, CHATML_TEMPLATE,
    SPECIAL_TOKENS,
};
use ferrotune_tokenize::Message;
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tokenize/bpe_train")
}

fn read_json(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture_dir().join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn corpus() -> Vec<String> {
    serde_json::from_value(read_json("corpus.json")).unwrap()
}

fn options(exp: &Value) -> BpeTrainOptions {
    BpeTrainOptions {
        vocab_size: exp["vocab_size"].as_u64().unwrap() as usize,
        min_frequency: exp["min_frequency"].as_u64().unwrap(),
        model_max_length: 256,
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferrotune-bpe-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn vocab_merges_and_ids_match_python_tokenizers() {
    let exp = read_json("expected.json");
    let texts = corpus();
    let tok = train_bpe(texts.iter().map(String::as_str), &options(&exp)).unwrap();
    let json: Value = serde_json::from_str(&tok.to_string(false).unwrap()).unwrap();
    let model = &json["model"];
    assert_eq!(
        model["vocab"], exp["vocab"],
        "vocab differs from tokenizers (Python)"
    );
    let merges: Vec<String> = model["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            Value::Array(pair) => format!(
                "{} {}",
                pair[0].as_str().unwrap(),
                pair[1].as_str().unwrap()
            ),
            Value::String(s) => s.clone(),
            other => panic!("unexpected merge {other}"),
        })
        .collect();
    let exp_merges: Vec<String> = serde_json::from_value(exp["merges"].clone()).unwrap();
    assert!(
        exp_merges.len() > 100,
        "the fixture should exercise many merges"
    );
    assert_eq!(merges, exp_merges);
    for (k, s) in SPECIAL_TOKENS.iter().enumerate() {
        assert_eq!(tok.token_to_id(s), Some(k as u32), "{s} must have id {k}");
    }
    for probe in exp["probes"].as_array().unwrap() {
        let text = probe["text"].as_str().unwrap();
        let enc = tok.encode(text, false).unwrap();
        let want: Vec<u32> = serde_json::from_value(probe["ids"].clone()).unwrap();
        assert_eq!(enc.get_ids(), want.as_slice(), "ids of {text:?}");
        let decoded = tok.decode(enc.get_ids(), false).unwrap();
        assert_eq!(
            decoded,
            probe["decoded"].as_str().unwrap(),
            "decode of {text:?}"
        );
    }
}

#[test]
fn special_tokens_are_cut_out_before_counting() {
    let pieces = strip_special_tokens(["<|im_start|>user\nhi<|im_end|>\n<|endoftext|>", "plain"]);
    assert_eq!(pieces, vec!["user\nhi", "\n", "plain"]);
}

#[test]
fn written_folder_renders_chatml_like_transformers() {
    let exp = read_json("expected.json");
    assert_eq!(exp["chat_template"].as_str().unwrap(), CHATML_TEMPLATE);
    let dir = temp_dir("chat");
    let texts = corpus();
    let tok = train_tokenizer(texts.iter().map(String::as_str), &options(&exp), &dir).unwrap();
    assert_eq!(tok.eos_ids(), &[2], "eos is <|im_end|>");
    assert_eq!(tok.pad_id(), Some(3));
    assert_eq!(tok.bos_id(), Some(0));
    assert!(!tok.add_bos_token());
    // No BOS/EOS added to plain encodes: pretraining documents are separated explicitly.
    assert_eq!(
        tok.encode("12 + 7 = 19", true).unwrap(),
        serde_json::from_value::<Vec<u32>>(exp["probes"][0]["ids"].clone()).unwrap()
    );

    let chat = &exp["chat"];
    let msgs: Vec<Message> = chat["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    let r = tok.render(&msgs, false).unwrap();
    assert_eq!(
        tok.render_text(&msgs, false).unwrap(),
        chat["text"].as_str().unwrap()
    );
    let want: Vec<u32> = serde_json::from_value(chat["ids"].clone()).unwrap();
    assert_eq!(r.ids, want);
    let prompt = tok.render(&msgs[..2], true).unwrap();
    let want: Vec<u32> = serde_json::from_value(chat["prompt_ids"].clone()).unwrap();
    assert_eq!(prompt.ids, want);

    // The mask covers exactly the replies and their end-of-turn markers.
    let masked: Vec<u32> = r
        .ids
        .iter()
        .zip(&r.assistant_mask)
        .filter(|(_, &m)| m == 1)
        .map(|(&i, _)| i)
        .collect();
    assert_eq!(
        tok.decode(&masked, false).unwrap(),
        "41 + 17 = 58<|im_end|><answer>6</answer><|im_end|>"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
