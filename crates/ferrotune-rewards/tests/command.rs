//! The `command` reward: a user scorer program in the sandbox (fixtures/rewards/score_len.py),
//! and scorers that crash, print garbage or hang ⇒ 0.0 with the reason recorded.

use std::time::{Duration, Instant};

use ferrotune_rewards::{build, Reward, RewardSpec, Sample};
use serde_json::{json, Map, Value};

fn reward(entry: &str) -> Box<dyn Reward> {
    #[derive(serde::Deserialize)]
    struct Cfg {
        rewards: Vec<RewardSpec>,
    }
    let cfg: Cfg = toml::from_str(&format!("rewards = [{entry}]")).unwrap();
    build(&cfg.rewards[0]).unwrap()
}

fn row(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../fixtures/rewards/score_len.py"
);

#[test]
fn scorer_script_scores_and_can_say_not_applicable() {
    let r = reward(&format!(
        r#"{{ name = "command", cmd = ["python3", "{SCRIPT}"], label = "len_score" }}"#
    ));
    assert_eq!(r.name(), "len_score");
    let plain = row(json!({ "answer": "1" }));
    let skip = row(json!({ "skip": true }));
    let samples = [
        Sample {
            prompt: "What is 1?",
            completion: "abcdefghij",
            completion_tokens: 250,
            row: &plain,
        },
        Sample {
            prompt: "What is 1?",
            completion: "",
            completion_tokens: 0,
            row: &plain,
        },
        Sample {
            prompt: "What is 1?",
            completion: "abc",
            completion_tokens: 1,
            row: &skip,
        },
    ];
    let s = r.score_detailed(&samples);
    assert!(s.failures.is_empty(), "{:?}", s.failures);
    assert_eq!(s.values.len(), 3);
    assert!(
        (s.values[0].unwrap() - (0.1 + 0.25)).abs() < 1e-12,
        "{:?}",
        s.values
    );
    assert_eq!(s.values[1], Some(0.0));
    assert_eq!(s.values[2], None);
}

/// Scorers written by the test: each way of failing gives 0.0 and a recorded reason.
#[test]
fn failing_scorers_give_zero_and_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p.to_str().unwrap().to_string()
    };
    let crash = write(
        "crash.py",
        "import sys, json\njson.load(sys.stdin)\nraise RuntimeError('boom in scorer')\n",
    );
    let garbage = write("garbage.py", "print('hello')\n");
    let hang = write("hang.py", "import time\ntime.sleep(30)\n");
    let e = row(json!({}));
    let sample = [Sample {
        prompt: "",
        completion: "x",
        completion_tokens: 1,
        row: &e,
    }];

    let s = reward(&format!(
        r#"{{ name = "command", cmd = ["python3", "{crash}"] }}"#
    ))
    .score_detailed(&sample);
    assert_eq!(s.values, vec![Some(0.0)]);
    assert_eq!(s.failures.len(), 1);
    assert!(
        s.failures[0].reason.contains("boom in scorer")
            && s.failures[0].reason.contains("Exited(1)"),
        "{:?}",
        s.failures
    );

    let s = reward(&format!(
        r#"{{ name = "command", cmd = ["python3", "{garbage}"] }}"#
    ))
    .score_detailed(&sample);
    assert_eq!(s.values, vec![Some(0.0)]);
    assert!(
        s.failures[0].reason.contains("hello") && s.failures[0].reason.contains("not a number"),
        "{:?}",
        s.failures
    );

    let t = Instant::now();
    let s = reward(&format!(
        r#"{{ name = "command", cmd = ["python3", "{hang}"], timeout_s = 0.5 }}"#
    ))
    .score_detailed(&sample);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(s.values, vec![Some(0.0)]);
    assert!(s.failures[0].reason.contains("Timeout"), "{:?}", s.failures);
}

/// The scorer may read what `read_paths` lists, and nothing else outside its folder.
#[test]
fn scorer_reads_only_listed_paths() {
    let data_dir = tempfile::tempdir().unwrap();
    std::fs::write(data_dir.path().join("data.txt"), "0.75").unwrap();
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("secret.txt"), "9").unwrap();
    let scripts = tempfile::tempdir().unwrap();
    let script = scripts.path().join("read.py");
    std::fs::write(
        &script,
        "import sys\nprint(float(open(sys.argv[1]).read()))\n",
    )
    .unwrap();
    let (script, data, secret) = (
        script.to_str().unwrap().to_string(),
        data_dir
            .path()
            .join("data.txt")
            .to_str()
            .unwrap()
            .to_string(),
        other
            .path()
            .join("secret.txt")
            .to_str()
            .unwrap()
            .to_string(),
    );
    let e = row(json!({}));
    let sample = [Sample {
        prompt: "",
        completion: "",
        completion_tokens: 0,
        row: &e,
    }];
    // A file named on the command line is readable.
    let s = reward(&format!(
        r#"{{ name = "command", cmd = ["python3", "{script}", "{data}"] }}"#
    ))
    .score_detailed(&sample);
    assert_eq!(s.values, vec![Some(0.75)], "{:?}", s.failures);
    // A file reached only through a string the scorer builds is not.
    let sneaky = scripts.path().join("sneaky.py");
    std::fs::write(&sneaky, format!("print(float(open({secret:?}).read()))\n")).unwrap();
    let sneaky = sneaky.to_str().unwrap().to_string();
    let s = reward(&format!(
        r#"{{ name = "command", cmd = ["python3", "{sneaky}"] }}"#
    ))
    .score_detailed(&sample);
    assert_eq!(s.values, vec![Some(0.0)]);
    assert!(
        s.failures[0].reason.contains("Permission denied"),
        "{:?}",
        s.failures
    );
    // ... unless its folder is listed in read_paths.
    let other_dir = other.path().to_str().unwrap().to_string();
    let s = reward(&format!(
        r#"{{ name = "command", cmd = ["python3", "{sneaky}"], read_paths = ["{other_dir}"] }}"#
    ))
    .score_detailed(&sample);
    assert_eq!(s.values, vec![Some(9.0)], "{:?}", s.failures);
}
