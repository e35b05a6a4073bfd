//! Speculative decoding through the real binary, on the embedded demo model (models/demo, a
//! pretrained 4-layer Llama) with a draft made from it by `ferrotune export --layers 0,3`:
//! greedy `generate --draft-model` prints exactly what `generate` alone prints; `bench
//! speculative` reports an acceptance rate, tokens/s for both sides and no greedy mismatch; a
//! draft with another tokenizer is refused with one line naming it. The acceptance rule itself
//! is tested in crates/ferrotune-generate/tests/speculative.rs.

mod common;

use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The demo model and a 2-layer draft cut from it (written to a bare relative `--out`, which
/// must work: its parent is the empty path).
fn models(dir: &Path) -> (PathBuf, PathBuf) {
    let target = root().join("models/demo");
    ok(&Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .current_dir(dir)
        .args([
            "export",
            "--model",
            s(&target),
            "--layers",
            "0,3",
            "--out",
            "draft",
        ])
        .output()
        .unwrap());
    (target, dir.join("draft"))
}

#[test]
fn greedy_with_a_draft_prints_the_targets_own_output() {
    let tmp = tempfile::tempdir().unwrap();
    let (target, draft) = models(tmp.path());
    for prompt in ["What is 12 + 7?", "The cat sat on the", "What is 305 - 18?"] {
        let common = [
            "generate",
            "--model",
            s(&target),
            "--chat",
            "--prompt",
            prompt,
            "--max-new-tokens",
            "24",
        ];
        let alone = ok(&ferrotune(&common));
        let mut args = common.to_vec();
        args.extend(["--draft-model", s(&draft), "--draft-tokens", "3"]);
        let out = ferrotune(&args);
        let with = ok(&out);
        assert_eq!(with, alone, "prompt {prompt:?}");
        let stats: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&out.stderr).lines().last().unwrap())
                .unwrap();
        let rate = stats["acceptance_rate"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&rate), "{stats}");
        assert!(stats["target_forwards"].as_u64().unwrap() >= 1, "{stats}");
    }
}

#[test]
fn bench_reports_both_sides_and_no_greedy_mismatch() {
    let tmp = tempfile::tempdir().unwrap();
    let (target, draft) = models(tmp.path());
    let out_file = tmp.path().join("bench/speculative.json");
    let line = ok(&ferrotune(&[
        "bench",
        "speculative",
        "--model",
        s(&target),
        "--draft",
        s(&draft),
        "--n",
        "4",
        "--max-new-tokens",
        "16",
        "--draft-tokens",
        "4",
        "--out",
        s(&out_file),
    ]));
    let r: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out_file).unwrap()).unwrap();
    assert_eq!(r, written);
    assert_eq!(r["prompts"], 4);
    assert_eq!(r["greedy_mismatches"], 0, "{r}");
    // Same prompts, same greedy tokens: both sides emit the same number of tokens.
    assert_eq!(
        r["target_alone"]["new_tokens"], r["speculative"]["new_tokens"],
        "{r}"
    );
    let rate = r["acceptance_rate"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&rate), "{r}");
    // Each target pass emits its own token plus the accepted drafts.
    let per_pass = r["tokens_per_target_forward"].as_f64().unwrap();
    assert!((1.0..=5.0).contains(&per_pass), "{r}");
    assert!(r["speedup"].as_f64().unwrap() > 0.0, "{r}");
}

#[test]
fn a_draft_with_another_tokenizer_is_refused() {
    let target = root().join("models/demo");
    let other = root().join("fixtures/tiny-chat/model");
    let out = ferrotune(&[
        "generate",
        "--model",
        s(&target),
        "--prompt",
        "hi",
        "--draft-model",
        s(&other),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("--draft-model") && err.contains("tokenizer"),
        "{err}"
    );
}
