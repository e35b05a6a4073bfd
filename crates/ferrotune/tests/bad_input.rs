//! Bad input through the real binary: each case must exit non-zero with one clear error line
//! that names the file and the problem, and must not panic.

use std::path::{Path, PathBuf};
use std::process::Command;

fn tiny(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/tiny")
        .join(name)
}

/// Copy a tiny model folder (config + weights) into `dst`.
fn copy_model(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
}

/// Run `ferrotune perplexity --model <model> --text <text>`; return (exit code, stderr).
fn perplexity(model: &Path, text: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(["perplexity", "--model"])
        .arg(model)
        .arg("--text")
        .arg(text)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_clean_error(code: i32, stderr: &str, must_contain: &[&str]) {
    assert_ne!(code, 0, "expected failure, stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for m in must_contain {
        assert!(stderr.contains(m), "`{m}` not in: {stderr}");
    }
}

fn text_file(dir: &Path) -> PathBuf {
    let p = dir.join("t.txt");
    std::fs::write(&p, "hello world, this is a test").unwrap();
    p
}

#[test]
fn missing_model_path() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let (code, err) = perplexity(&missing, &text_file(tmp.path()));
    assert_clean_error(code, &err, &["nope", "no such file"]);
}

#[test]
fn unknown_model_type() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    copy_model(&tiny("llama"), &m);
    let cfg = std::fs::read_to_string(m.join("config.json")).unwrap();
    let cfg = cfg.replace("\"model_type\": \"llama\"", "\"model_type\": \"mamba9\"");
    assert!(cfg.contains("mamba9"));
    std::fs::write(m.join("config.json"), cfg).unwrap();
    let (code, err) = perplexity(&m, &text_file(tmp.path()));
    assert_clean_error(code, &err, &["config.json", "unknown model_type `mamba9`"]);
}

#[test]
fn truncated_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    copy_model(&tiny("llama"), &m);
    let bytes = std::fs::read(m.join("model.safetensors")).unwrap();
    std::fs::write(m.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let (code, err) = perplexity(&m, &text_file(tmp.path()));
    assert_clean_error(code, &err, &["model.safetensors", "truncated"]);
}

#[test]
fn shape_mismatch_names_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    copy_model(&tiny("llama"), &m);
    // Claim a larger intermediate size than the weights have.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(m.join("config.json")).unwrap()).unwrap();
    let mut cfg = cfg.as_object().unwrap().clone();
    let inter = cfg["intermediate_size"].as_u64().unwrap();
    cfg.insert("intermediate_size".into(), (inter * 2).into());
    std::fs::write(m.join("config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
    let (code, err) = perplexity(&m, &text_file(tmp.path()));
    assert_clean_error(
        code,
        &err,
        &["shape mismatch for model.layers.0.mlp.gate_proj.weight"],
    );
}

/// A Gemma 3 config whose `layer_types` list disagrees with its layer count would silently
/// give some layers the wrong attention; the binary refuses it, naming the file and the field.
#[test]
fn gemma3_layer_types_length_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    copy_model(&tiny("gemma3"), &m);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(m.join("config.json")).unwrap()).unwrap();
    let mut cfg = cfg.as_object().unwrap().clone();
    assert_eq!(cfg["num_hidden_layers"], 3);
    cfg.insert(
        "layer_types".into(),
        serde_json::json!(["sliding_attention", "full_attention"]),
    );
    std::fs::write(m.join("config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
    let (code, err) = perplexity(&m, &text_file(tmp.path()));
    assert_clean_error(
        code,
        &err,
        &[
            "config.json",
            "layer_types",
            "2 entries but num_hidden_layers is 3",
        ],
    );
}

/// A GGUF tensor in a quant type we cannot read (IQ2_XXS, GGML type 16) is one line naming the
/// file, the tensor and the type, and listing the types that can be read.
#[test]
fn unsupported_gguf_quant_type_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bytes =
        std::fs::read(tiny("../gguf/tiny_qwen2.gguf")).expect("fixtures/gguf/tiny_qwen2.gguf");
    // Tensor info: name (u64 length + bytes), n_dims u32, dims u64 each, type u32, offset u64.
    let name = b"blk.0.attn_q.weight";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("tensor name in the header");
    let n_dims_at = at + name.len();
    let n_dims = u32::from_le_bytes(bytes[n_dims_at..n_dims_at + 4].try_into().unwrap()) as usize;
    let type_at = n_dims_at + 4 + 8 * n_dims;
    bytes[type_at..type_at + 4].copy_from_slice(&16u32.to_le_bytes());
    let p = tmp.path().join("iq2.gguf");
    std::fs::write(&p, &bytes).unwrap();
    let (code, err) = perplexity(&p, &text_file(tmp.path()));
    assert_clean_error(
        code,
        &err,
        &[
            "iq2.gguf",
            "tensor `blk.0.attn_q.weight` is stored as GGML type 16 (IQ2_XXS)",
            "Q5_K",
        ],
    );
}

#[test]
fn pickle_is_refused_with_conversion_hint() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("pytorch_model.bin");
    std::fs::write(&p, b"\x80\x02not really a pickle").unwrap();
    let (code, err) = perplexity(&p, &text_file(tmp.path()));
    assert_clean_error(code, &err, &["pytorch_model.bin", "pickle", "safetensors"]);
    // A folder holding only a pickle gets the same message.
    let m = tmp.path().join("m");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::copy(tiny("llama").join("config.json"), m.join("config.json")).unwrap();
    std::fs::copy(&p, m.join("pytorch_model.bin")).unwrap();
    let (code, err) = perplexity(&m, &text_file(tmp.path()));
    assert_clean_error(code, &err, &["pytorch_model.bin", "pickle"]);
}

#[test]
fn truncated_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("broken.gguf");
    // A valid GGUF magic and version, then nothing.
    std::fs::write(&p, b"GGUF\x03\x00\x00\x00\x05\x00").unwrap();
    let (code, err) = perplexity(&p, &text_file(tmp.path()));
    assert_clean_error(code, &err, &["broken.gguf"]);
}

#[test]
fn resuming_a_folder_that_is_not_a_run() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("notes.txt"), "mine").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(["train", "--resume"])
        .arg(tmp.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_clean_error(
        out.status.code().unwrap_or(-1),
        &err,
        &["not a ferrotune run"],
    );
}

/// Sampling settings that define no distribution, or a pass@k that cannot mean anything, are
/// refused up front, naming the flag.
#[test]
fn bad_sampling_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/demo");
    let task = tmp.path().join("task.jsonl");
    std::fs::write(
        &task,
        "{\"prompt\": \"What is 1 + 1?\", \"answer\": \"2\"}\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
            .args(args)
            .arg("--model")
            .arg(&demo)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for (args, needle) in [
        (
            vec!["generate", "--prompt", "hi", "--top-p", "3"],
            "--top-p",
        ),
        (
            vec!["generate", "--prompt", "hi", "--temperature=-1"],
            "--temperature",
        ),
        (
            vec!["generate", "--prompt", "hi", "--top-k", "0"],
            "--top-k",
        ),
        (
            vec!["generate", "--prompt", "hi", "--max-new-tokens", "0"],
            "--max-new-tokens",
        ),
        (
            vec![
                "eval",
                "--task",
                task.to_str().unwrap(),
                "--rewards",
                "[{name=\"answer_match\", extract=\"last_number\"}]",
                "--samples",
                "4",
                "--k",
                "2",
            ],
            "temperature 0",
        ),
    ] {
        let (code, err) = run(&args);
        assert_clean_error(code, &err, &[needle]);
    }
}

/// `perplexity --text` on a data file scores its `text` column (as `eval --text` does), not
/// the JSON source: one row scores what the same text as a plain file scores, and rows
/// without a `text` string are named.
#[test]
fn perplexity_of_a_jsonl_file_reads_its_text_column() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/demo");
    let story = "Once upon a time, there was a small bird named Omar. The bird was red.";
    let plain = tmp.path().join("story.txt");
    std::fs::write(&plain, story).unwrap();
    let rows = tmp.path().join("story.jsonl");
    std::fs::write(&rows, format!("{}\n", serde_json::json!({ "text": story }))).unwrap();
    let nll = |p: &Path| -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
            .args(["perplexity", "--model"])
            .arg(&demo)
            .arg("--text")
            .arg(p)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // "perplexity P  (mean NLL N over T tokens, ...)": compare P, N and T.
        let s = String::from_utf8_lossy(&out.stdout).into_owned();
        s.split(" tokens,").next().unwrap().to_string()
    };
    assert_eq!(nll(&plain), nll(&rows));
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"a b c d\"}\n{\"prompt\": \"x\"}\n").unwrap();
    let (code, err) = perplexity(&demo, &bad);
    assert_clean_error(code, &err, &["bad.jsonl", "line 2", "text"]);
}
