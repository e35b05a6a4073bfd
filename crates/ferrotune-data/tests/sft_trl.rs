//! SFT tokenization against TRL: `fixtures/data/sft_expected.json` holds the `input_ids` and
//! loss masks (labels != -100) that TRL's `SFTTrainer._prepare_dataset` produced for the same
//! rows with the committed SmolLM2 tokenizer; written by `fixtures/data/make_sft_fixtures.py`.

mod common;

use std::path::Path;

use common::{data_fixtures, smollm2};
use ferrotune_data::{sft_examples, tokenize_sft_all, Row, SftOptions};
use serde_json::Value;

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn u8s(v: &Value) -> Vec<u8> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u8)
        .collect()
}

struct Case {
    name: String,
    expected: Vec<(Vec<u32>, Vec<u8>)>,
    ours: Vec<(Vec<u32>, Vec<u8>)>,
}

fn run_cases() -> Vec<Case> {
    let path = data_fixtures().join("sft_expected.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let tok = smollm2();
    doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| {
            let rows: Vec<Row> = case["rows"]
                .as_array()
                .unwrap()
                .iter()
                .enumerate()
                .map(|(i, r)| Row {
                    line: i + 1,
                    fields: r.as_object().unwrap().clone(),
                })
                .collect();
            let opts = &case["options"];
            let sft = SftOptions {
                completion_only_loss: opts["completion_only_loss"].as_bool().unwrap_or(true),
                assistant_only_loss: opts["assistant_only_loss"].as_bool().unwrap_or(true),
            };
            let max_len = opts["max_length"].as_u64().unwrap_or(1024) as usize;
            let examples = sft_examples(&rows, Path::new("case.jsonl")).unwrap();
            let set = tokenize_sft_all(&tok, &examples, max_len, &sft, true).unwrap();
            Case {
                name: case["name"].as_str().unwrap().to_string(),
                expected: case["expected"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| (u32s(&e["input_ids"]), u8s(&e["loss_mask"])))
                    .collect(),
                ours: set
                    .items
                    .into_iter()
                    .map(|t| (t.ids, t.loss_mask))
                    .collect(),
            }
        })
        .collect()
}

/// The one deliberate difference: for a conversational completion TRL trains on everything after
/// the prompt, including the `\n` the template writes after `<|im_end|>`; our mask (the rule in
/// `ferrotune-tokenize/src/chat.rs`) stops at the end-of-turn token, which is where generation
/// stops. This clears TRL's mask after the last `<|im_end|>` for those cases.
fn trl_mask_stopping_at_end_of_turn(ids: &[u32], mask: &[u8], eos: u32) -> Vec<u8> {
    let mut mask = mask.to_vec();
    if let Some(last) = ids.iter().rposition(|&i| i == eos) {
        for m in &mut mask[last + 1..] {
            *m = 0;
        }
    }
    mask
}

#[test]
fn ids_and_masks_match_trl() {
    let eos = smollm2().eos_ids()[0];
    let cases = run_cases();
    assert_eq!(cases.len(), 6);
    for case in cases {
        assert_eq!(
            case.ours.len(),
            case.expected.len(),
            "{}: examples kept",
            case.name
        );
        for (k, (ours, want)) in case.ours.iter().zip(&case.expected).enumerate() {
            assert_eq!(ours.0, want.0, "{} example {k}: ids", case.name);
            let want_mask = if case.name.starts_with("chat_") {
                let adjusted = trl_mask_stopping_at_end_of_turn(&want.0, &want.1, eos);
                // The difference is exactly one trailing token per example (the "\n").
                assert_eq!(
                    want.1.iter().map(|&m| m as usize).sum::<usize>(),
                    adjusted.iter().map(|&m| m as usize).sum::<usize>() + 1
                );
                adjusted
            } else {
                want.1.clone()
            };
            assert_eq!(ours.1, want_mask, "{} example {k}: loss mask", case.name);
        }
    }
}
