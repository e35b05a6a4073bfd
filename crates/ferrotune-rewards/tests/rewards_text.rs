//! Text rewards on tricky strings, `RewardSet` totals, and config errors. Specs are parsed from
//! TOML text as the trainer's config will be. The length penalty is checked against TRL's
//! `get_soft_overlong_punishment` (fixtures/rewards/make_overlong_reference.py); the other
//! expectations follow the rules documented in each reward's module doc.

use ferrotune_rewards::{
    build, extract_last_number, parse_number, Reward, RewardError, RewardSet, RewardSpec, Sample,
};
use serde_json::{json, Map, Value};

fn specs(text: &str) -> Vec<RewardSpec> {
    #[derive(serde::Deserialize)]
    struct Cfg {
        rewards: Vec<RewardSpec>,
    }
    toml::from_str::<Cfg>(text).unwrap().rewards
}

fn reward(entry: &str) -> Box<dyn Reward> {
    build(&specs(&format!("rewards = [{entry}]"))[0]).unwrap()
}

fn row(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

/// Score each completion against the same row.
fn scores(r: &dyn Reward, row: &Map<String, Value>, completions: &[&str]) -> Vec<Option<f64>> {
    let samples: Vec<Sample> = completions
        .iter()
        .map(|c| Sample {
            prompt: "p",
            completion: c,
            completion_tokens: 3,
            row,
        })
        .collect();
    r.score(&samples)
}

fn one(r: &dyn Reward, row: &Map<String, Value>, completion: &str) -> Option<f64> {
    scores(r, row, &[completion])[0]
}

// ---------------------------------------------------------------- format_tags

#[test]
fn format_soft_credit() {
    let r = reward(r#"{ name = "format_tags" }"#);
    let e = row(json!({}));
    let cases = [
        ("<reasoning>r</reasoning>\n<answer>5</answer>", 1.0),
        ("<answer>5</answer>", 0.5),
        ("no tags at all", 0.0),
        ("<reasoning>r</reasoning><answer>5", 0.5), // unclosed answer
        (
            "<reasoning>r</reasoning><answer>1</answer><answer>2</answer>",
            0.5,
        ), // duplicated answer
        ("<answer>5</answer><reasoning>r</reasoning>", 0.5), // wrong order
        ("<reasoning><answer>5</answer></reasoning>", 0.5), // nested, different names
        ("</reasoning>r<reasoning>", 0.0),          // close before open
        ("<Reasoning>r</Reasoning><answer>5</answer>", 0.5), // case-sensitive
        (
            "text <reasoning>r</reasoning> more <answer>5</answer> trailing",
            1.0,
        ),
    ];
    for (c, want) in cases {
        assert_eq!(one(r.as_ref(), &e, c), Some(want), "{c:?}");
    }
}

#[test]
fn format_nested_same_tag_earns_nothing() {
    let r = reward(r#"{ name = "format_tags", tags = ["answer"] }"#);
    let e = row(json!({}));
    assert_eq!(
        one(r.as_ref(), &e, "<answer><answer>5</answer></answer>"),
        Some(0.0)
    );
    assert_eq!(one(r.as_ref(), &e, "<answer>5</answer>"), Some(1.0));
}

#[test]
fn format_strict() {
    let r = reward(r#"{ name = "format_tags", tags = ["think", "answer"], mode = "strict" }"#);
    let e = row(json!({}));
    assert_eq!(
        one(r.as_ref(), &e, "  <think>a</think>\n\n<answer>5</answer>\n"),
        Some(1.0)
    );
    assert_eq!(
        one(r.as_ref(), &e, "<think>a</think><answer>5</answer>"),
        Some(1.0)
    );
    assert_eq!(
        one(r.as_ref(), &e, "Sure! <think>a</think><answer>5</answer>"),
        Some(0.5)
    );
    assert_eq!(
        one(r.as_ref(), &e, "<think>a</think>x<answer>5</answer>"),
        Some(0.5)
    );
    assert_eq!(one(r.as_ref(), &e, "<answer>5</answer>"), Some(0.25));
    assert_eq!(
        one(
            r.as_ref(),
            &e,
            "<think>a</think><answer>5</answer><answer>6</answer>"
        ),
        Some(0.25)
    );
}

// ---------------------------------------------------------------- answer_match

#[test]
fn answer_tag_extraction_and_normalisation() {
    let r = reward(r#"{ name = "answer_match" }"#);
    let cases = [
        (json!("72"), "<answer>72</answer>", Some(1.0)),
        (
            json!("72"),
            "<answer>1</answer> wait, no: <answer>72</answer>",
            Some(1.0),
        ), // last one
        (
            json!("72"),
            "<answer>72</answer> then <answer>1</answer>",
            Some(0.0),
        ),
        (json!(1234), "<answer> $1,234. </answer>", Some(1.0)),
        (json!("1,234"), "<answer>1234</answer>", Some(1.0)),
        (json!("-5"), "<answer>\u{2212}5</answer>", Some(1.0)), // unicode minus
        (json!("0.5"), "<answer>0.50</answer>", Some(1.0)),
        (json!("0.5"), "<answer>1/2</answer>", Some(1.0)),
        (json!("-3.25"), "<answer>-3.25</answer>", Some(1.0)),
        (json!("-3.25"), "<answer>3.25</answer>", Some(0.0)),
        (json!("Paris"), "<answer>  paris </answer>", Some(1.0)),
        (json!("New York"), "<answer>new\n  york</answer>", Some(1.0)),
        (json!("72"), "The answer is 72", Some(0.0)), // nothing extracted
        (
            json!(["72", "seventy-two"]),
            "<answer>Seventy-Two</answer>",
            Some(1.0),
        ),
        (json!(null), "<answer>72</answer>", None),
    ];
    for (answer, c, want) in cases {
        assert_eq!(
            one(r.as_ref(), &row(json!({ "answer": answer })), c),
            want,
            "{answer} vs {c:?}"
        );
    }
    // Missing column ⇒ not applicable.
    assert_eq!(
        one(
            r.as_ref(),
            &row(json!({ "question": "q" })),
            "<answer>72</answer>"
        ),
        None
    );
}

#[test]
fn last_number_extraction() {
    let r = reward(r#"{ name = "answer_match", extract = "last_number" }"#);
    let cases = [
        ("5", "First 3, then 4, finally 5.", Some(1.0)),
        ("-17", "so the result is -17", Some(1.0)),
        ("3.5", "It costs 3.50 dollars", Some(1.0)),
        ("1234567", "In total 1,234,567 apples", Some(1.0)),
        ("7", "10-3 = 7", Some(1.0)),
        ("8", "no numbers here", Some(0.0)),
    ];
    for (answer, c, want) in cases {
        assert_eq!(
            one(r.as_ref(), &row(json!({ "answer": answer })), c),
            want,
            "{c:?}"
        );
    }
    // A minus glued to a word or digit is subtraction, not a sign.
    assert_eq!(extract_last_number("x-3").as_deref(), Some("3"));
    assert_eq!(extract_last_number("10-3").as_deref(), Some("3"));
    assert_eq!(extract_last_number("is -3").as_deref(), Some("-3"));
    assert_eq!(extract_last_number("1,2345").as_deref(), Some("2345"));
}

#[test]
fn boxed_extraction_with_nested_braces() {
    let r = reward(r#"{ name = "answer_match", extract = "boxed" }"#);
    let cases = [
        ("1/2", r"so \boxed{\frac{1}{2}}", Some(1.0)),
        ("0.5", r"so \boxed{\frac{1}{2}}", Some(1.0)),
        ("-0.75", r"\boxed{-\dfrac{3}{4}}", Some(1.0)),
        ("x^{2}", r"\boxed{x^{2}}", Some(1.0)),
        ("4", r"\boxed{3} no, \boxed{4}", Some(1.0)),
        ("3", r"\boxed{3} and \boxed{4", Some(1.0)), // last one unbalanced: the balanced one
        ("3", "no box", Some(0.0)),
    ];
    for (answer, c, want) in cases {
        assert_eq!(
            one(r.as_ref(), &row(json!({ "answer": answer })), c),
            want,
            "{c:?}"
        );
    }
    assert_eq!(parse_number(r"\frac{1}{2}"), Some(0.5));
}

#[test]
fn gsm8k_extraction_on_both_sides() {
    let r = reward(r#"{ name = "answer_match", extract = "gsm8k" }"#);
    let solution = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72 clips.\n#### 72";
    let rw = row(json!({ "answer": solution }));
    assert_eq!(
        one(r.as_ref(), &rw, "She sold 24 in May, so 72.\n#### 72"),
        Some(1.0)
    );
    assert_eq!(one(r.as_ref(), &rw, "#### 71"), Some(0.0));
    assert_eq!(one(r.as_ref(), &rw, "72"), Some(0.0)); // no ####
    let rw = row(json!({ "answer": "#### 1000" }));
    assert_eq!(one(r.as_ref(), &rw, "#### 1,000"), Some(1.0));
}

#[test]
fn regex_extraction() {
    let r = reward(
        r#"{ name = "answer_match", extract = "regex", pattern = 'Final answer:\s*(\S+)' }"#,
    );
    let rw = row(json!({ "answer": "42" }));
    assert_eq!(
        one(r.as_ref(), &rw, "Final answer: 41\nFinal answer: 42"),
        Some(1.0)
    );
    assert_eq!(
        one(r.as_ref(), &rw, "Final answer: 42\nFinal answer: 41"),
        Some(0.0)
    );
    let r = reward(
        r#"{ name = "answer_match", extract = "regex", pattern = '[A-D]', field = "label" }"#,
    );
    let rw = row(json!({ "label": "C" }));
    assert_eq!(one(r.as_ref(), &rw, "A or C"), Some(1.0));
    assert_eq!(one(r.as_ref(), &row(json!({ "answer": "C" })), "C"), None); // no `label` column
}

// ---------------------------------------------------------------- numeric_closeness

#[test]
fn numeric_closeness_is_graded() {
    let r = reward(r#"{ name = "numeric_closeness" }"#);
    let rw = row(json!({ "answer": "72" }));
    assert_eq!(one(r.as_ref(), &rw, "<answer>72</answer>"), Some(1.0));
    assert_eq!(
        one(r.as_ref(), &rw, "<answer>It is 72 apples</answer>"),
        Some(1.0)
    );
    let s71 = one(r.as_ref(), &rw, "<answer>71</answer>").unwrap();
    assert!((s71 - 0.5 * (1.0 - 1.0 / 72.0)).abs() < 1e-12, "{s71}");
    assert_eq!(one(r.as_ref(), &rw, "<answer>-72</answer>"), Some(0.0));
    assert_eq!(one(r.as_ref(), &rw, "<answer>abc</answer>"), Some(0.0));
    assert_eq!(one(r.as_ref(), &rw, "72"), Some(0.0)); // nothing extracted
                                                       // Warmer is better, and always below the exact answer.
    let graded = scores(
        r.as_ref(),
        &rw,
        &[
            "<answer>10</answer>",
            "<answer>60</answer>",
            "<answer>70</answer>",
            "<answer>71.9</answer>",
        ],
    );
    let g: Vec<f64> = graded.into_iter().map(Option::unwrap).collect();
    assert!(g.windows(2).all(|w| w[0] < w[1]) && g[3] < 0.5, "{g:?}");
    // Tolerances.
    let tol = reward(r#"{ name = "numeric_closeness", tolerance = 0.05 }"#);
    assert_eq!(one(tol.as_ref(), &rw, "<answer>70</answer>"), Some(1.0));
    assert!(one(tol.as_ref(), &rw, "<answer>60</answer>").unwrap() < 0.5);
    let abs =
        reward(r#"{ name = "numeric_closeness", abs_tolerance = 0.5, extract = "last_number" }"#);
    assert_eq!(one(abs.as_ref(), &rw, "about 72.4"), Some(1.0));
    // Not applicable: missing or non-numeric reference.
    assert_eq!(
        one(r.as_ref(), &row(json!({})), "<answer>72</answer>"),
        None
    );
    assert_eq!(
        one(
            r.as_ref(),
            &row(json!({ "answer": "Paris" })),
            "<answer>72</answer>"
        ),
        None
    );
}

// ---------------------------------------------------------------- length

#[test]
fn length_matches_trl_soft_overlong_punishment() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/rewards/overlong_reference.json"
    );
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() > 20);
    let e = row(json!({}));
    for c in cases {
        let (max_len, buffer, len) = (
            c["max_len"].as_u64().unwrap(),
            c["buffer"].as_u64().unwrap(),
            c["len"].as_u64().unwrap(),
        );
        let r = reward(&format!(
            r#"{{ name = "length", max_len = {max_len}, buffer = {buffer} }}"#
        ));
        let s = Sample {
            prompt: "",
            completion: "",
            completion_tokens: len as usize,
            row: &e,
        };
        let got = r.score(&[s])[0].unwrap();
        let want = c["reward"].as_f64().unwrap();
        assert!(
            (got - want).abs() < 1e-12,
            "max_len {max_len} buffer {buffer} len {len}: {got} vs TRL {want}"
        );
    }
}

// ---------------------------------------------------------------- RewardSet

#[test]
fn reward_set_totals_use_weights_and_skip_none() {
    let set = RewardSet::from_specs(&specs(
        r#"rewards = [
            { name = "answer_match", weight = 2 },
            { name = "format_tags", tags = ["answer"], label = "fmt", weight = 0.5 },
            { name = "length", max_len = 10, buffer = 4, weight = 1.5 },
        ]"#,
    ))
    .unwrap();
    assert_eq!(set.labels(), vec!["answer_match", "fmt", "length"]);
    assert_eq!(set.weights(), vec![2.0, 0.5, 1.5]);
    let with = row(json!({ "answer": "7" }));
    let without = row(json!({ "question": "?" }));
    let samples = [
        Sample {
            prompt: "",
            completion: "<answer>7</answer>",
            completion_tokens: 3,
            row: &with,
        },
        Sample {
            prompt: "",
            completion: "<answer>8</answer>",
            completion_tokens: 8,
            row: &with,
        },
        Sample {
            prompt: "",
            completion: "<answer>7</answer>",
            completion_tokens: 12,
            row: &without,
        },
    ];
    let scored = set.score(&samples);
    assert_eq!(scored.per_reward[0], vec![Some(1.0), Some(0.0), None]);
    assert_eq!(scored.per_reward[1], vec![Some(1.0); 3]);
    assert_eq!(
        scored.per_reward[2],
        vec![Some(0.0), Some(-0.5), Some(-1.0)]
    );
    let want = [2.0 * 1.0 + 0.5 * 1.0, 0.5 - 1.5 * 0.5, 0.5 - 1.5];
    for (g, w) in scored.total.iter().zip(want) {
        assert!((g - w).abs() < 1e-12, "{:?} vs {want:?}", scored.total);
    }
    assert!(scored.failures.iter().all(Vec::is_empty));
}

#[test]
fn same_function_twice_needs_a_label() {
    let err = RewardSet::from_specs(&specs(
        r#"rewards = [{ name = "format_tags" }, { name = "format_tags", mode = "strict" }]"#,
    ))
    .err()
    .unwrap();
    assert!(
        matches!(err, RewardError::DuplicateLabel(ref l) if l == "format_tags"),
        "{err}"
    );
    let ok = RewardSet::from_specs(&specs(r#"rewards = [{ name = "format_tags" }, { name = "format_tags", mode = "strict", label = "format_strict" }]"#)).unwrap();
    assert_eq!(ok.labels(), vec!["format_tags", "format_strict"]);
    assert!(matches!(
        RewardSet::from_specs(&[]),
        Err(RewardError::Empty)
    ));
}

// ---------------------------------------------------------------- config errors

fn build_err(entry: &str) -> String {
    let msg = match build(&specs(&format!("rewards = [{entry}]"))[0]) {
        Ok(_) => panic!("{entry} built"),
        Err(e) => e.to_string(),
    };
    assert!(!msg.contains('\n'), "not one line: {msg}");
    msg
}

#[test]
fn config_errors_name_the_reward_and_key() {
    let m = build_err(r#"{ name = "format_tag" }"#);
    assert!(
        m.contains("unknown reward `format_tag`") && m.contains("format_tags"),
        "{m}"
    );
    let m = build_err(r#"{ name = "format_tags", tgs = ["answer"] }"#);
    assert!(
        m.contains("`format_tags`") && m.contains("`tgs`") && m.contains("tags, mode"),
        "{m}"
    );
    let m = build_err(r#"{ name = "format_tags", tags = "answer" }"#);
    assert!(
        m.contains("`format_tags`")
            && m.contains("`tags`")
            && m.contains("array of strings")
            && m.contains("found a string"),
        "{m}"
    );
    let m = build_err(r#"{ name = "format_tags", mode = "lenient" }"#);
    assert!(m.contains("`mode`") && m.contains("lenient"), "{m}");
    let m = build_err(r#"{ name = "length", buffer = 10 }"#);
    assert!(m.contains("`length`") && m.contains("`max_len`"), "{m}");
    let m = build_err(r#"{ name = "length", max_len = -5, buffer = 1 }"#);
    assert!(
        m.contains("`max_len`") && m.contains("non-negative integer"),
        "{m}"
    );
    let m = build_err(r#"{ name = "answer_match", extract = "regex", pattern = "(" }"#);
    assert!(
        m.contains("`answer_match`") && m.contains("`pattern`"),
        "{m}"
    );
    let m = build_err(r#"{ name = "answer_match", pattern = "x" }"#);
    assert!(m.contains("`pattern`") && m.contains("regex"), "{m}");
    let m = build_err(r#"{ name = "numeric_closeness", tolerance = true }"#);
    assert!(
        m.contains("`numeric_closeness`")
            && m.contains("`tolerance`")
            && m.contains("found a boolean"),
        "{m}"
    );
    let m = build_err(r#"{ name = "command" }"#);
    assert!(m.contains("`command`") && m.contains("`cmd`"), "{m}");
    let m = build_err(r#"{ name = "code_tests", timeout_s = "5" }"#);
    assert!(
        m.contains("`code_tests`") && m.contains("`timeout_s`"),
        "{m}"
    );
    // An integer weight is a number; a string weight is refused when the config is parsed.
    assert_eq!(
        specs(r#"rewards = [{ name = "format_tags", weight = 2 }]"#)[0].weight,
        2.0
    );
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Cfg {
        rewards: Vec<RewardSpec>,
    }
    assert!(
        toml::from_str::<Cfg>(r#"rewards = [{ name = "format_tags", weight = "x" }]"#).is_err()
    );
}

#[test]
fn every_available_reward_is_buildable_by_name() {
    for (name, desc) in ferrotune_rewards::available() {
        assert!(!desc.is_empty() && !desc.contains('\n'));
        // Each needs at most its required keys to build.
        let entry = match *name {
            "length" => r#"{ name = "length", max_len = 10, buffer = 2 }"#.to_string(),
            "command" => r#"{ name = "command", cmd = ["true"] }"#.to_string(),
            n => format!(r#"{{ name = "{n}" }}"#),
        };
        let r = reward(&entry);
        assert_eq!(r.name(), *name);
    }
}
