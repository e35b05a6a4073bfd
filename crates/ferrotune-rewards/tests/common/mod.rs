//! Helpers shared by the sandbox test files: build `code_tests` from TOML text, run a program
//! as a completion, and look for processes a run left behind.
#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use ferrotune_rewards::{build, CodeTests, RewardSpec, Sample};
use serde_json::{json, Map, Value};

const SPEC: &str = "rewards = [{ name = \"code_tests\", timeout_s = 1 }]";

pub fn spec() -> RewardSpec {
    parse_spec(SPEC)
}

/// The first entry of a `rewards = [...]` TOML text, parsed as the config will.
pub fn parse_spec(text: &str) -> RewardSpec {
    #[derive(serde::Deserialize)]
    struct Cfg {
        rewards: Vec<RewardSpec>,
    }
    let mut cfg: Cfg = toml::from_str(text).unwrap();
    cfg.rewards.remove(0)
}

/// The reward as the trainer gets it.
pub fn code_tests() -> Box<dyn ferrotune_rewards::Reward> {
    build(&spec()).unwrap()
}

/// The same reward as its concrete type, to look at the outcome and not only the score.
pub fn judge() -> &'static CodeTests {
    static JUDGE: std::sync::OnceLock<CodeTests> = std::sync::OnceLock::new();
    JUDGE.get_or_init(|| CodeTests::from_spec(&spec()).unwrap())
}

/// MBPP-style row whose only test passes when the program gets that far.
pub fn row() -> Map<String, Value> {
    json!({ "test_list": ["assert True"] })
        .as_object()
        .unwrap()
        .clone()
}

/// Processes (any state, zombies included) still owned by `uid`.
pub fn leftovers(uid: u32) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or("");
        if uid_line.split_whitespace().nth(1) == Some(uid.to_string().as_str()) {
            found.push(status.lines().take(3).collect::<Vec<_>>().join(" "));
        }
    }
    found
}

/// Run `code` as a completion; return (score from the Reward trait, outcome from judge).
pub fn run(code: &str) -> (Option<f64>, ferrotune_rewards::Outcome) {
    run_with(judge(), code)
}

/// `run` with another configuration of `code_tests`.
pub fn run_with(judge: &CodeTests, code: &str) -> (Option<f64>, ferrotune_rewards::Outcome) {
    let row = row();
    let completion = format!("```python\n{code}\n```");
    let sample = Sample {
        prompt: "",
        completion: &completion,
        completion_tokens: 1,
        row: &row,
    };
    let t = Instant::now();
    let judged = judge.judge(&sample).unwrap().unwrap();
    let score = Some(judged.score);
    assert!(
        t.elapsed() < Duration::from_secs(12),
        "took {:?}",
        t.elapsed()
    );
    // As root (our machines, CI) the run had uids of its own: nothing of it may be left. Without
    // root there is no such uid to look for (sandbox.rs, "Privileges").
    match judged.outcome.uid {
        Some(uid) => assert_eq!(
            leftovers(uid),
            Vec::<String>::new(),
            "processes left behind"
        ),
        None => {
            use std::os::unix::fs::MetadataExt;
            assert_ne!(
                std::fs::metadata("/proc/self").unwrap().uid(),
                0,
                "root runs must report their uid"
            );
        }
    }
    (score, judged.outcome)
}

pub fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}
