//! Shared test helpers: a per-test temporary folder, fixture paths and the committed SmolLM2
//! tokenizer (`fixtures/tokenize/smollm2/`, written by `fixtures/tokenize/make_tokenize_fixtures.py`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use ferrotune_tokenize::Tokenizer;

pub fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn data_fixtures() -> PathBuf {
    repo_dir().join("fixtures/data")
}

pub fn smollm2() -> Tokenizer {
    Tokenizer::from_dir(&repo_dir().join("fixtures/tokenize/smollm2")).unwrap()
}

/// A fresh, empty folder for one test (tests run in parallel, so the name includes the test's).
pub fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferrotune-data-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}
