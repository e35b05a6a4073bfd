//! Synthetic problems: determinism, no repeats, every answer re-derived here from the prompt text
//! alone (an independent evaluator, not the generator's formulas), exact division, the digit
//! range, the space-size errors, exclusion for held-out sets, the CLI parsers, and the JSONL
//! round trip through `read_rows` + `prompt_examples` (what the GRPO trainer reads).

mod common;

use std::collections::HashSet;

use common::temp_dir;
use ferrotune_data::*;
use ferrotune_tokenize::Message;

fn spec(n: usize, seed: u64, digits: (u32, u32), ops: &str) -> ArithmeticSpec {
    ArithmeticSpec {
        n,
        seed,
        digits,
        ops: parse_ops(ops).unwrap(),
    }
}

/// Parses `What is A op B?` and evaluates it; returns (a, op, b, value).
fn eval_arith(prompt: &str) -> (i128, char, i128, i128) {
    let body = prompt
        .strip_prefix("What is ")
        .and_then(|s| s.strip_suffix('?'))
        .unwrap_or_else(|| panic!("unexpected prompt {prompt:?}"));
    let parts: Vec<&str> = body.split(' ').collect();
    assert_eq!(parts.len(), 3, "{prompt:?}");
    let a: i128 = parts[0].parse().unwrap();
    let b: i128 = parts[2].parse().unwrap();
    let op = parts[1].chars().next().unwrap();
    let v = match op {
        '+' => a + b,
        '-' => a - b,
        '*' => a * b,
        '/' => {
            assert!(b != 0, "division by zero in {prompt:?}");
            assert_eq!(a % b, 0, "inexact division in {prompt:?}");
            a / b
        }
        _ => panic!("unknown operator in {prompt:?}"),
    };
    (a, op, b, v)
}

fn digits(x: i128) -> u32 {
    x.unsigned_abs().to_string().len() as u32
}

#[test]
fn arithmetic_answers_are_exact_and_digits_in_range() {
    let s = spec(6000, 7, (1, 4), "+-*/");
    let probs = arithmetic(&s).unwrap();
    assert_eq!(probs.len(), 6000);
    let mut ops_seen = HashSet::new();
    let mut lens_seen = HashSet::new();
    let mut negative = 0;
    for p in &probs {
        let (a, op, b, v) = eval_arith(&p.prompt);
        assert_eq!(p.answer, v.to_string(), "{p:?}");
        // + - *: both operands in range; /: divisor and quotient in range.
        let (x, y) = if op == '/' { (b, v) } else { (a, b) };
        for z in [x, y] {
            assert!(
                (1..=4).contains(&digits(z)),
                "{p:?}: operand {z} outside 1..4 digits"
            );
            lens_seen.insert(digits(z));
        }
        ops_seen.insert(op);
        if v < 0 {
            negative += 1;
        }
    }
    assert_eq!(ops_seen.len(), 4);
    assert_eq!(lens_seen, HashSet::from([1, 2, 3, 4]));
    assert!(
        negative > 100,
        "subtraction should give negative results too"
    );
}

#[test]
fn same_seed_same_problems_other_seed_other_problems() {
    let a = arithmetic(&spec(2000, 1, (1, 3), "+-*")).unwrap();
    let b = arithmetic(&spec(2000, 1, (1, 3), "+-*")).unwrap();
    let c = arithmetic(&spec(2000, 2, (1, 3), "+-*")).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    let w1 = word_problems(&WordSpec { n: 500, seed: 1 }).unwrap();
    let w2 = word_problems(&WordSpec { n: 500, seed: 1 }).unwrap();
    let w3 = word_problems(&WordSpec { n: 500, seed: 2 }).unwrap();
    assert_eq!(w1, w2);
    assert_ne!(w1, w3);
    // Written files are byte-identical too.
    let dir = temp_dir("synth-determinism");
    let (p1, p2) = (dir.join("a.jsonl"), dir.join("b.jsonl"));
    write_jsonl(&a, &p1, &PromptFormat::Text).unwrap();
    write_jsonl(&b, &p2, &PromptFormat::Text).unwrap();
    assert_eq!(std::fs::read(&p1).unwrap(), std::fs::read(&p2).unwrap());
}

#[test]
fn no_repeats_even_when_the_space_is_nearly_used_up() {
    for (n, digits, ops) in [
        (5000, (1, 3), "+-*/"),
        (95, (1, 1), "+"),
        (100, (1, 1), "+"),
    ] {
        let probs = arithmetic(&spec(n, 3, digits, ops)).unwrap();
        let set = prompt_set(&probs);
        assert_eq!(set.len(), n, "repeats for n = {n}");
    }
    // n equal to the space: every problem exactly once.
    let all = arithmetic(&spec(100, 3, (1, 1), "+")).unwrap();
    let want: HashSet<String> = (0..10)
        .flat_map(|a| (0..10).map(move |b| format!("What is {a} + {b}?")))
        .collect();
    assert_eq!(prompt_set(&all), want);
    let words = word_problems(&WordSpec { n: 3000, seed: 5 }).unwrap();
    assert_eq!(prompt_set(&words).len(), 3000);
}

#[test]
fn space_size_is_counted_exactly_and_too_small_is_refused() {
    // 1-digit numbers are 0..=9 (10), 2-digit 10..=99 (90): 100 operands; + - * give 100² pairs
    // each; / takes a nonzero divisor (99) and any quotient (100).
    let s = spec(0, 0, (1, 2), "+-*/");
    assert_eq!(arithmetic_space(&s).unwrap(), 3 * 100 * 100 + 99 * 100);
    // Enumerating the whole space yields exactly that many distinct problems.
    let all = arithmetic(&ArithmeticSpec { n: 39_900, ..s }).unwrap();
    assert_eq!(prompt_set(&all).len(), 39_900);

    let e = arithmetic(&spec(91, 0, (1, 1), "/")).unwrap_err();
    assert!(
        matches!(e, SynthError::SpaceTooSmall { n: 91, space: 90 }),
        "{e}"
    );
    assert!(e.to_string().contains("only 90"), "{e}");
    assert!(arithmetic(&spec(90, 0, (1, 1), "/")).is_ok());
    let big = word_space() + 1;
    let e = word_problems(&WordSpec {
        n: big as usize,
        seed: 0,
    })
    .unwrap_err();
    assert!(matches!(e, SynthError::SpaceTooSmall { .. }), "{e}");
}

#[test]
fn excluded_prompts_never_appear() {
    let train = arithmetic(&spec(3000, 1, (1, 2), "+-*")).unwrap();
    let seen = prompt_set(&train);
    let eval = arithmetic_excluding(&spec(1000, 2, (1, 2), "+-*"), &seen).unwrap();
    assert_eq!(eval.len(), 1000);
    assert!(eval.iter().all(|p| !seen.contains(&p.prompt)));

    // Small space: 100 problems, 60 for training, the other 40 and no more for evaluation.
    let train = arithmetic(&spec(60, 1, (1, 1), "+")).unwrap();
    let seen = prompt_set(&train);
    let eval = arithmetic_excluding(&spec(40, 2, (1, 1), "+"), &seen).unwrap();
    assert_eq!(prompt_set(&eval).len(), 40);
    assert!(eval.iter().all(|p| !seen.contains(&p.prompt)));
    let e = arithmetic_excluding(&spec(41, 2, (1, 1), "+"), &seen).unwrap_err();
    assert!(
        matches!(
            e,
            SynthError::TooFewAfterExclusion {
                n: 41,
                available: 40,
                ..
            }
        ),
        "{e}"
    );

    let wtrain = word_problems(&WordSpec { n: 2000, seed: 1 }).unwrap();
    let wseen = prompt_set(&wtrain);
    let weval = word_problems_excluding(&WordSpec { n: 500, seed: 2 }, &wseen).unwrap();
    assert!(weval.iter().all(|p| !wseen.contains(&p.prompt)));
}

/// Integers in a text, in order (a `-` directly before a digit is a sign).
fn ints(text: &str) -> Vec<i64> {
    let mut out = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let neg = b[i] == b'-' && i + 1 < b.len() && b[i + 1].is_ascii_digit();
        let start = if neg { i + 1 } else { i };
        if start < b.len() && b[start].is_ascii_digit() && (neg || i == 0 || b[i - 1] != b'-') {
            let mut j = start;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            let v: i64 = text[start..j].parse().unwrap();
            out.push(if neg { -v } else { v });
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// Solves a word problem from its text: the question's phrasing says which operation applies.
fn solve_word(prompt: &str) -> (&'static str, i64) {
    let n = ints(prompt);
    let has = |s: &str| prompt.contains(s);
    if has("and eats") {
        ("fruit_eaten", n[0] - n[1])
    } else if has(" more. How many") {
        ("given_more", n[0] + n[1])
    } else if has("boxes with") {
        ("boxes", n[0] * n[1])
    } else if has("equally among") {
        assert_eq!(n[0] % n[1], 0, "{prompt}");
        ("share", n[0] / n[1])
    } else if has("A train travels") {
        ("train", n[0] * n[1])
    } else if has("of change") {
        ("change", n[1] - n[0])
    } else if has("every week") {
        ("savings", n[0] * n[1])
    } else if has("left to read") {
        ("pages_left", n[0] - n[1])
    } else if has("temperature") {
        ("temperature", n[0] - n[1])
    } else if has("years older") {
        ("ages", n[0] + n[1] + n[2])
    } else if has("packs with") {
        ("packs", n[0] + n[1] * n[2])
    } else if has("A bus has") {
        ("bus", n[0] - n[1] + n[2])
    } else if has("every day") {
        ("running", n[0] * 7 * n[1])
    } else {
        panic!("no solver for {prompt:?}")
    }
}

#[test]
fn word_problem_answers_match_an_independent_solver() {
    let probs = word_problems(&WordSpec { n: 4000, seed: 11 }).unwrap();
    let mut kinds = HashSet::new();
    for p in &probs {
        let (kind, want) = solve_word(&p.prompt);
        assert_eq!(p.answer, want.to_string(), "{kind}: {}", p.prompt);
        assert!(
            !p.answer.starts_with('-') || kind == "temperature",
            "{kind} gave a negative answer: {p:?}"
        );
        kinds.insert(kind);
    }
    assert_eq!(
        kinds.len(),
        WORD_TEMPLATES.len(),
        "some templates never drawn"
    );
    assert!(WORD_TEMPLATES.len() >= 12);
    // Two-name templates never pair a name with itself.
    for p in probs.iter().filter(|p| p.prompt.contains(" gives ")) {
        let words: Vec<&str> = p.prompt.split_whitespace().collect();
        assert_ne!(words[0], words[4], "{}", p.prompt);
    }
}

#[test]
fn parsers_accept_the_cli_forms_and_explain_errors() {
    assert_eq!(
        parse_ops("+-*/").unwrap(),
        vec![Op::Add, Op::Sub, Op::Mul, Op::Div]
    );
    assert_eq!(parse_ops("*, +, *").unwrap(), vec![Op::Mul, Op::Add]);
    assert_eq!(parse_ops("x÷").unwrap(), vec![Op::Mul, Op::Div]);
    let e = parse_ops("+%").unwrap_err().to_string();
    assert!(e.contains("'%'"), "{e}");
    assert!(parse_ops(" , ")
        .unwrap_err()
        .to_string()
        .contains("no operators"));
    assert_eq!("*".parse::<Op>().unwrap(), Op::Mul);
    assert_eq!("div".parse::<Op>().unwrap(), Op::Div);
    assert!("+-".parse::<Op>().is_err());
    assert_eq!(Op::Sub.to_string(), "-");

    assert_eq!(parse_digits("1..4").unwrap(), (1, 4));
    assert_eq!(parse_digits("2..=3").unwrap(), (2, 3));
    assert_eq!(parse_digits("3").unwrap(), (3, 3));
    for (bad, says) in [
        ("4..1", "above the high end"),
        ("0..2", "between 1 and 9"),
        ("1..12", "between 1 and 9"),
        ("a..3", "not a whole number"),
        ("", "not a whole number"),
    ] {
        let e = parse_digits(bad).unwrap_err().to_string();
        assert!(e.contains(says), "{bad:?}: {e}");
    }
    let e = arithmetic(&ArithmeticSpec {
        n: 1,
        seed: 0,
        digits: (3, 2),
        ops: vec![Op::Add],
    })
    .unwrap_err();
    assert!(matches!(e, SynthError::Digits { .. }), "{e}");
}

#[test]
fn jsonl_round_trips_through_prompt_examples() {
    let dir = temp_dir("synth-roundtrip");
    let mut probs = arithmetic(&spec(20, 4, (1, 3), "+-*/")).unwrap();
    probs.extend(word_problems(&WordSpec { n: 20, seed: 4 }).unwrap());
    let system = "Answer with the number only.".to_string();
    for (name, format) in [
        ("text.jsonl", PromptFormat::Text),
        ("chat.jsonl", PromptFormat::Chat { system: None }),
        (
            "chat_sys.jsonl",
            PromptFormat::Chat {
                system: Some(system.clone()),
            },
        ),
    ] {
        let path = dir.join(name);
        write_jsonl(&probs, &path, &format).unwrap();
        let rows = read_rows(&path).unwrap();
        let examples = prompt_examples(&rows, &path).unwrap();
        assert_eq!(examples.len(), probs.len());
        for (ex, p) in examples.iter().zip(&probs) {
            let Example::Prompt { prompt, answer, .. } = ex else {
                panic!("{name}: not a prompt example: {ex:?}");
            };
            assert_eq!(answer.as_deref(), Some(p.answer.as_str()), "{name}");
            let want = match &format {
                PromptFormat::Text => Segment::Text(p.prompt.clone()),
                PromptFormat::Chat { system } => {
                    let mut m = Vec::new();
                    if let Some(s) = system {
                        m.push(Message::new("system", s.as_str()));
                    }
                    m.push(Message::new("user", p.prompt.as_str()));
                    Segment::Chat(m)
                }
            };
            assert_eq!(prompt, &want, "{name}");
        }
    }
    // The text form is TRL's: one object per line with exactly `prompt` and `answer`.
    let first = std::fs::read_to_string(dir.join("text.jsonl")).unwrap();
    let v: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    assert_eq!(v.as_object().unwrap().len(), 2);
    assert_eq!(v["prompt"], probs[0].prompt.as_str());
}
