//! `Tokenizer::from_gguf` on Gemma 3 GGUF files gives the ids and decodes transformers gives
//! (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`, a GemmaTokenizer). Expected values are in
//! fixtures/tokenize/gemma3_gguf_expected.json, written by
//! fixtures/tokenize/make_gemma3_gguf_expected.py, which also wrote fixtures/tokenize/gemma3_tiny.gguf
//! (a 1,054-token subset of the real vocabulary on which the Gemma rules — respelled space tokens,
//! merges by file position, `<mask>` appended — each change some ids).
//!
//! The tiny file always runs. The real Gemma 3 270M GGUF (253 MB) runs when FERROTUNE_GEMMA3_GGUF
//! points at it (`export FERROTUNE_GEMMA3_GGUF=$(bash scripts/fetch-gemma3.sh)`); otherwise that
//! test prints "skipped" and passes.

mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::quantized::gguf_file;
use common::{fixtures_dir, ids};
use ferrotune_tokenize::Tokenizer;
use serde_json::Value;

fn expected() -> Value {
    let path = fixtures_dir().join("gemma3_gguf_expected.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Reads the GGUF header and builds the tokenizer, as `ferrotune` does for a `--model` GGUF.
/// Returns it with the seconds `from_gguf` took.
fn load(path: &Path) -> (Tokenizer, f64) {
    let mut file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let content = gguf_file::Content::read(&mut file).unwrap();
    let start = Instant::now();
    let tok = Tokenizer::from_gguf(&content).unwrap();
    (tok, start.elapsed().as_secs_f64())
}

/// Every string's ids (with and without special tokens) and decodes (with and without skipping
/// special tokens) equal transformers', and the special ids and vocabulary size too.
fn assert_matches(tok: &Tokenizer, exp: &Value, what: &str) {
    let mut failures = Vec::new();
    let strings = exp["strings"].as_array().unwrap();
    for case in strings {
        let text = case["text"].as_str().unwrap();
        let got = tok.encode(text, true).unwrap();
        let plain = tok.encode(text, false).unwrap();
        let dec = tok.decode(&got, false).unwrap();
        let dec_skip = tok.decode(&got, true).unwrap();
        if got != ids(&case["ids"]) || plain != ids(&case["ids_no_special"]) {
            failures.push(format!("{text:?}: ids {got:?} want {}", case["ids"]));
        }
        if dec != case["decoded"].as_str().unwrap()
            || dec_skip != case["decoded_skip_special"].as_str().unwrap()
        {
            failures.push(format!(
                "{text:?}: decoded {dec:?} / {dec_skip:?} want {} / {}",
                case["decoded"], case["decoded_skip_special"]
            ));
        }
    }
    println!(
        "{what}: {}/{} strings identical (ids and decodes)",
        strings.len() - failures.len().min(strings.len()),
        strings.len()
    );
    assert!(failures.is_empty(), "{what}:\n{}", failures.join("\n"));

    let id = |key: &str| Some(exp[key].as_u64().unwrap() as u32);
    assert_eq!(tok.bos_id(), id("bos_token_id"), "{what}");
    assert_eq!(tok.eos_ids(), &[id("eos_token_id").unwrap()], "{what}");
    assert_eq!(tok.pad_id(), id("pad_token_id"), "{what}");
    assert_eq!(tok.token_to_id("<unk>"), id("unk_token_id"), "{what}");
    assert_eq!(
        tok.vocab_size(),
        exp["vocab_size"].as_u64().unwrap() as usize,
        "{what}"
    );
    assert!(tok.add_bos_token() && !tok.add_eos_token(), "{what}");
}

#[test]
fn tiny_gemma3_gguf_matches_transformers() {
    let exp = expected();
    let tiny = &exp["tiny"];
    let path = fixtures_dir().join(tiny["gguf"].as_str().unwrap());
    let (tok, _) = load(&path);
    assert_matches(&tok, tiny, "tiny gemma3 gguf");
    // The file has no `<mask>`: GemmaTokenizer appends it as a special token.
    let mask = tiny["tokens"].as_u64().unwrap() as u32;
    assert_eq!(tok.token_to_id("<mask>"), Some(mask));
    assert_eq!(tok.encode("<mask>", false).unwrap(), vec![mask]);
}

fn gemma3_path() -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("FERROTUNE_GEMMA3_GGUF")?);
    assert!(
        path.is_file(),
        "FERROTUNE_GEMMA3_GGUF={} is not a file",
        path.display()
    );
    Some(path)
}

#[test]
fn gemma3_gguf_matches_transformers() {
    let Some(path) = gemma3_path() else {
        println!("skipped: no Gemma 3 GGUF (set FERROTUNE_GEMMA3_GGUF; scripts/fetch-gemma3.sh)");
        return;
    };
    let (tok, secs) = load(&path);
    println!(
        "gemma3 gguf: from_gguf built {} tokens in {secs:.2}s",
        tok.vocab_size()
    );
    let exp = expected();
    assert_matches(&tok, &exp["real"], "gemma3 gguf");
    // Gemma's turn markers are CONTROL tokens: matched whole, one id each.
    for (token, id) in [("<start_of_turn>", 105), ("<end_of_turn>", 106)] {
        assert_eq!(tok.encode(token, false).unwrap(), vec![id], "{token}");
    }
}

/// Gemma 3's chat template (configs/templates/gemma3.jinja) on a tokenizer from GGUF renders the
/// text and ids transformers renders (fixtures/tokenize/gemma3_chat_expected.json, from
/// make_gemma3_chat_expected.py), folds a system message into the first user turn, refuses roles
/// that do not alternate with the template's message, and trains each reply with its
/// `<end_of_turn>`. TRL's `gemma3_training.jinja` also trains the `\n` the template writes after
/// `<end_of_turn>`; our mask leaves that one token out (the model stops at `<end_of_turn>` and
/// never samples it), so it is compared with TRL's minus that token.
fn assert_chat_matches(tok: &mut Tokenizer, cases: &Value, what: &str) {
    let template = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs/templates/gemma3.jinja"),
    )
    .unwrap();
    // The base GGUF has no template: eos alone ends a turn until one is set.
    assert_eq!(tok.chat_template(), None, "{what}");
    assert_eq!(tok.end_of_turn_id(), None, "{what}");
    tok.set_chat_template(&template).unwrap();
    let eot = tok.token_to_id("<end_of_turn>").unwrap();
    let newline = tok.encode("\n", false).unwrap();
    assert_eq!(tok.end_of_turn_id(), Some(eot), "{what}");
    assert_eq!(
        tok.eos_ids(),
        &[tok.token_to_id("<eos>").unwrap(), eot],
        "{what}"
    );
    let cases = cases.as_array().unwrap();
    assert_eq!(cases.len(), 8);
    let mut masked_turns = 0;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let msgs: Vec<ferrotune_tokenize::Message> =
            serde_json::from_value(case["messages"].clone()).unwrap();
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let got = tok.render(&msgs, gen);
        if let Some(err) = case["error"].as_str() {
            let e = got.expect_err(name).to_string();
            assert!(e.contains(err), "{what} {name}: {e}");
            continue;
        }
        let r = got.unwrap_or_else(|e| panic!("{what} {name}: {e}"));
        assert_eq!(r.text, case["text"].as_str().unwrap(), "{what} {name}");
        assert_eq!(r.ids, ids(&case["ids"]), "{what} {name}");
        if gen {
            continue;
        }
        let mut want: Vec<u8> = ids(&case["trl_assistant_mask"])
            .iter()
            .map(|&m| m as u8)
            .collect();
        for i in 1..r.ids.len() {
            if r.ids[i - 1] == eot && want[i - 1] == 1 && newline == [r.ids[i]] {
                want[i] = 0;
                masked_turns += 1;
            }
        }
        assert_eq!(r.assistant_mask, want, "{what} {name}: mask");
        // Every reply's last trained token is <end_of_turn>, so the model learns to stop.
        let last = r.assistant_mask.iter().rposition(|&m| m == 1).unwrap();
        assert_eq!(r.ids[last], eot, "{what} {name}");
    }
    assert_eq!(masked_turns, 6, "{what}: one <end_of_turn>\\n per reply");
}

fn chat_expected() -> Value {
    let path = fixtures_dir().join("gemma3_chat_expected.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn tiny_gemma3_chat_template_matches_transformers() {
    let (mut tok, _) = load(&fixtures_dir().join("gemma3_tiny.gguf"));
    assert_chat_matches(&mut tok, &chat_expected()["tiny"], "tiny gemma3 gguf");
}

#[test]
fn gemma3_chat_template_matches_transformers() {
    let Some(path) = gemma3_path() else {
        println!("skipped: no Gemma 3 GGUF (set FERROTUNE_GEMMA3_GGUF; scripts/fetch-gemma3.sh)");
        return;
    };
    let (mut tok, _) = load(&path);
    assert_chat_matches(&mut tok, &chat_expected()["real"], "gemma3 gguf");
}
