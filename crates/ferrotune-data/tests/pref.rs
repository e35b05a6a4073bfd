//! DPO preference tokenization against TRL 1.16's own `DPOTrainer._prepare_dataset`
//! (`fixtures/dpo/pref_tokenize.json`, written by `fixtures/dpo/make_pref_tokenize.py` with the
//! committed SmolLM2 tokenizer): plain-text rows (EOS appended, a token merged across the
//! prompt boundary) and conversational rows (chat template); then `keep_start` truncation, rows
//! that cannot be tokenized, and the synthetic preference generator read back through
//! `preference_examples`.

mod common;

use common::{repo_dir, smollm2, temp_dir, write};
use ferrotune_data::*;
use serde_json::Value;

fn fixture() -> Value {
    let p = repo_dir().join("fixtures/dpo/pref_tokenize.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Rows of one fixture section as examples, through the real reader.
fn examples(section: &Value, name: &str) -> Vec<Example> {
    let dir = temp_dir(name);
    let text: String = section["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{r}\n"))
        .collect();
    let path = write(&dir, "rows.jsonl", &text);
    preference_examples(&read_rows(&path).unwrap(), &path).unwrap()
}

fn check_section(name: &str) {
    let fx = fixture();
    let section = &fx[name];
    let tok = smollm2();
    let exs = examples(section, name);
    let expected = section["expected"].as_array().unwrap();
    assert_eq!(exs.len(), expected.len());
    for (i, (ex, want)) in exs.iter().zip(expected).enumerate() {
        let pair = tokenize_preference(&tok, ex, usize::MAX, i).unwrap();
        let prompt = ids(&want["prompt_ids"]);
        for (side, got) in [
            ("chosen_ids", &pair.chosen),
            ("rejected_ids", &pair.rejected),
        ] {
            let completion = ids(&want[side]);
            let mut all = prompt.clone();
            all.extend(&completion);
            assert_eq!(got.ids, all, "{name} row {i} {side}: ids");
            let mut mask = vec![0u8; prompt.len()];
            mask.resize(all.len(), 1);
            assert_eq!(
                got.loss_mask, mask,
                "{name} row {i} {side}: completion mask"
            );
            assert!(!got.truncated);
        }
    }
}

#[test]
fn plain_text_pairs_match_trl() {
    check_section("text");
}

#[test]
fn conversational_pairs_match_trl() {
    check_section("chat");
}

/// `keep_start`: the end is cut; pairs whose prompt fills `max_length` are dropped (TRL's filter)
/// and counted.
#[test]
fn truncation_keeps_the_start_and_drops_prompt_only_pairs() {
    let fx = fixture();
    let tok = smollm2();
    let exs = examples(&fx["text"], "trunc");
    let full = tokenize_preference(&tok, &exs[0], usize::MAX, 0).unwrap();
    let prompt_len = full
        .chosen
        .loss_mask
        .iter()
        .take_while(|&&m| m == 0)
        .count();
    let cut = tokenize_preference(&tok, &exs[0], prompt_len + 2, 0).unwrap();
    assert_eq!(cut.chosen.ids, full.chosen.ids[..prompt_len + 2]);
    assert_eq!(cut.chosen.loss_tokens(), 2);
    assert!(cut.chosen.truncated);
    assert_eq!(
        cut.chosen.tokens_dropped,
        full.chosen.ids.len() - prompt_len - 2
    );
    // Row 0's prompt is 8 tokens, row 1's 2, row 2's 3: at max_length 3 only row 1 survives.
    let set = tokenize_preferences_all(&tok, &exs, 3).unwrap();
    assert_eq!(set.source, vec![1]);
    assert_eq!(set.dropped, 2);
    assert!(tokenize_preferences_all(&tok, &exs, 1).is_err());
}

#[test]
fn mixed_kinds_and_empty_completions_name_the_example() {
    let tok = smollm2();
    let dir = temp_dir("bad-pref");
    let path = write(
        &dir,
        "bad.jsonl",
        "{\"prompt\": \"q\", \"chosen\": [{\"role\": \"assistant\", \"content\": \"a\"}], \"rejected\": \"b\"}\n",
    );
    let exs = preference_examples(&read_rows(&path).unwrap(), &path).unwrap();
    let e = tokenize_preferences_all(&tok, &exs, 64).unwrap_err();
    assert!(
        matches!(&e, DataError::Example { index: 0, reason } if reason.contains("all be text")),
        "{e}"
    );
    // A chat `chosen` that is empty adds nothing after the generation prompt... and TRL's
    // rendering of prompt + [] is shorter than the prompt with its generation prompt.
    let path = write(
        &dir,
        "empty.jsonl",
        "{\"prompt\": [{\"role\": \"user\", \"content\": \"q\"}], \"chosen\": [], \"rejected\": [{\"role\": \"assistant\", \"content\": \"b\"}]}\n",
    );
    let exs = preference_examples(&read_rows(&path).unwrap(), &path).unwrap();
    let e = tokenize_preferences_all(&tok, &exs, 64).unwrap_err();
    assert!(
        matches!(&e, DataError::Example { index: 0, reason } if reason.contains("`chosen`")),
        "{e}"
    );
}

/// A pair whose two sides tokenize the same is kept (as TRL does) but listed: it trains nothing.
#[test]
fn pairs_with_the_same_tokens_on_both_sides_are_listed() {
    let tok = smollm2();
    let dir = temp_dir("same-pref");
    let path = write(
        &dir,
        "same.jsonl",
        "{\"prompt\": \"q\", \"chosen\": \" a\", \"rejected\": \" b\"}\n\
         {\"prompt\": \"q\", \"chosen\": \" a\", \"rejected\": \" a\"}\n",
    );
    let exs = preference_examples(&read_rows(&path).unwrap(), &path).unwrap();
    let set = tokenize_preferences_all(&tok, &exs, 64).unwrap();
    assert_eq!(set.source, vec![0, 1]);
    assert_eq!(set.identical, vec![1]);
}

/// The generator's pairs: chosen is the right answer in the demo's reply format (re-derived
/// here from the prompt), rejected differs as asked; seeded; both layouts read back.
#[test]
fn synthetic_preferences_are_right_wrong_and_readable() {
    let spec = ArithmeticSpec {
        n: 60,
        seed: 3,
        digits: (1, 2),
        ops: parse_ops("+-").unwrap(),
    };
    let problems = arithmetic(&spec).unwrap();
    let wrong = preference_pairs(&problems, RejectedKind::Wrong, 3);
    assert_eq!(wrong, preference_pairs(&problems, RejectedKind::Wrong, 3));
    assert_ne!(wrong, preference_pairs(&problems, RejectedKind::Wrong, 4));
    let number = |s: &str| -> i64 {
        s.split("<answer>")
            .nth(1)
            .unwrap()
            .split("</answer>")
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    for p in &wrong {
        let parts: Vec<&str> = p
            .prompt
            .trim_start_matches("What is ")
            .trim_end_matches('?')
            .split(' ')
            .collect();
        let (a, b): (i64, i64) = (parts[0].parse().unwrap(), parts[2].parse().unwrap());
        let right = if parts[1] == "+" { a + b } else { a - b };
        assert_eq!(p.chosen, format!("The answer is <answer>{right}</answer>."));
        let off = (number(&p.rejected) - right).abs();
        assert!((1..=3).contains(&off), "{p:?}");
    }
    let untagged = preference_pairs(&problems, RejectedKind::Untagged, 3);
    for (u, w) in untagged.iter().zip(&wrong) {
        assert_eq!(u.chosen, w.chosen);
        assert_eq!(u.rejected, format!("The answer is {}.", number(&u.chosen)));
    }
    assert!("sideways".parse::<RejectedKind>().is_err());

    let dir = temp_dir("gen-pref");
    let text = dir.join("text.jsonl");
    write_preference_jsonl(&wrong, &text, &PromptFormat::Text).unwrap();
    let ex = preference_examples(&read_rows(&text).unwrap(), &text).unwrap();
    assert_eq!(ex.len(), 60);
    let Example::Preference { prompt, chosen, .. } = &ex[0] else {
        panic!()
    };
    assert_eq!(prompt, &Segment::Text(wrong[0].prompt.clone()));
    assert_eq!(chosen, &Segment::Text(format!(" {}", wrong[0].chosen)));
    let chat = dir.join("chat.jsonl");
    let system = Some("S".to_string());
    write_preference_jsonl(&wrong, &chat, &PromptFormat::Chat { system }).unwrap();
    let ex = preference_examples(&read_rows(&chat).unwrap(), &chat).unwrap();
    let Example::Preference {
        prompt,
        chosen,
        rejected,
    } = &ex[5]
    else {
        panic!()
    };
    let Segment::Chat(p) = prompt else { panic!() };
    assert_eq!(
        (p[0].role.as_str(), p[1].content.as_str()),
        ("system", wrong[5].prompt.as_str())
    );
    assert_eq!(
        chosen,
        &Segment::Chat(vec![ferrotune_tokenize::Message::new(
            "assistant",
            wrong[5].chosen.as_str()
        )])
    );
    assert_eq!(
        rejected,
        &Segment::Chat(vec![ferrotune_tokenize::Message::new(
            "assistant",
            wrong[5].rejected.as_str()
        )])
    );
}
