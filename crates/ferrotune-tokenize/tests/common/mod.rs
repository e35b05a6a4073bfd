//! Shared test helpers: where the fixtures live and how to read them. The expected values in
//! `fixtures/tokenize/expected.json` come from transformers / tokenizers / jinja2 via
//! `fixtures/tokenize/make_tokenize_fixtures.py`, never from this crate.
#![allow(dead_code)]

use std::path::PathBuf;

use ferrotune_tokenize::{Message, Tokenizer};
use serde_json::Value;

pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tokenize")
}

pub fn expected() -> Value {
    let path = fixtures_dir().join("expected.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn smollm2() -> Tokenizer {
    Tokenizer::from_dir(&fixtures_dir().join("smollm2")).unwrap()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn messages(v: &Value) -> Vec<Message> {
    serde_json::from_value(v.clone()).unwrap()
}

pub fn template_source(name: &str) -> String {
    let path = fixtures_dir()
        .join("templates")
        .join(format!("{name}.jinja"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
