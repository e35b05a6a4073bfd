//! `ferrotune demo --quick` end to end on the embedded model (models/demo): every stage runs,
//! the before/after table is well-formed (a base row, an SFT row, a row per GRPO checkpoint,
//! finite numbers in range, perplexity ratios relative to the base), and the report files exist;
//! `--set` reaches the GRPO stage (here: dynamic sampling) and its run folder records it.

use std::process::Command;

#[test]
fn demo_quick_runs_end_to_end_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let o = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(["demo", "--quick", "--out", out.to_str().unwrap()])
        .args(["--set", "grpo.dynamic_sampling=true"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("stage") && stdout.contains("accuracy"),
        "{stdout}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("demo.json")).unwrap()).unwrap();
    let rows = summary["rows"].as_array().unwrap();
    let stages: Vec<&str> = rows.iter().map(|r| r["stage"].as_str().unwrap()).collect();
    assert_eq!(stages[0], "base");
    assert_eq!(stages[1], "sft");
    assert!(
        stages[2..].iter().all(|s| s.starts_with("grpo step ")),
        "{stages:?}"
    );
    assert!(stages.len() >= 3, "{stages:?}");
    for r in rows {
        for k in ["accuracy", "format_rate"] {
            let v = r[k].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{k} = {v} in {r}");
        }
        let ppl = r["ppl"].as_f64().unwrap();
        assert!(ppl.is_finite() && ppl > 1.0, "{r}");
        let ratio = r["ppl_ratio"].as_f64().unwrap();
        let base = rows[0]["ppl"].as_f64().unwrap();
        assert!((ratio - ppl / base).abs() < 1e-9, "{r}");
        assert_eq!(r["regression"].as_bool().unwrap(), ratio > 1.05, "{r}");
    }
    assert_eq!(rows[0]["ppl_ratio"].as_f64().unwrap(), 1.0);
    for f in [
        "index.html",
        "sft.toml",
        "grpo.toml",
        "sft/metrics.jsonl",
        "grpo/metrics.jsonl",
        "grpo/completions.jsonl",
        "grpo/plots/reward.png",
        "sft/plots/loss.png",
    ] {
        assert!(out.join(f).exists(), "missing {f}");
    }
    let config = std::fs::read_to_string(out.join("grpo/config.toml")).unwrap();
    assert!(config.contains("dynamic_sampling = true"), "{config}");
    let metrics = std::fs::read_to_string(out.join("grpo/metrics.jsonl")).unwrap();
    assert!(metrics.contains("dynamic_sampling/rounds"));
}
