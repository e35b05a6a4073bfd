//! Chat-template parity with transformers' `apply_chat_template` (text and ids) for SmolLM2's,
//! Qwen2.5's, Llama-3.1's and Qwen3's templates, the assistant mask (against transformers'
//! `return_assistant_tokens_mask` on `{% generation %}` versions of SmolLM2's and Qwen3's
//! templates, and by decoding the masked tokens), and the Python behaviour templates rely on (`tojson`, string
//! methods, printing, `strftime`). Expected values: fixtures/tokenize/expected.json, written by
//! fixtures/tokenize/make_tokenize_fixtures.py.

mod common;

use common::{expected, ids, messages, smollm2, template_source};
use ferrotune_tokenize::{strftime_utc, ChatTemplate, Message, Tokenizer};

fn template_for(tok: &Tokenizer, name: &str) -> ChatTemplate {
    match name {
        "smollm2" => ChatTemplate::new(name, tok.chat_template().unwrap()).unwrap(),
        other => ChatTemplate::new(other, &template_source(other)).unwrap(),
    }
}

#[test]
fn chat_text_and_ids_match_transformers() {
    let tok = smollm2();
    let exp = expected();
    let cases = exp["chat"].as_array().unwrap();
    assert_eq!(cases.len(), 18);
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let name = case["template"].as_str().unwrap();
        let template = template_for(&tok, name);
        let msgs = messages(&case["messages"]);
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let tools = if case["tools"].is_null() {
            None
        } else {
            Some(&case["tools"])
        };
        let r = tok
            .render_with_template(&template, &msgs, gen, tools)
            .unwrap();
        let want_text = case["text"].as_str().unwrap();
        if r.text != want_text {
            failures.push(format!(
                "case {i} ({name}, gen={gen}): text\n got: {:?}\nwant: {want_text:?}",
                r.text
            ));
        }
        if r.ids != ids(&case["ids"]) {
            failures.push(format!("case {i} ({name}, gen={gen}): ids differ"));
        }
        assert_eq!(r.ids.len(), r.assistant_mask.len());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn default_template_render_equals_transformers() {
    // The template the folder ships (chat_template.jinja) is the one `render` uses.
    let tok = smollm2();
    let exp = expected();
    let case = &exp["chat"][1];
    assert_eq!(case["template"], "smollm2");
    let r = tok.render(&messages(&case["messages"]), true).unwrap();
    assert_eq!(r.text, case["text"].as_str().unwrap());
    assert_eq!(r.ids, ids(&case["ids"]));
}

#[test]
fn assistant_mask_matches_transformers_generation_mask() {
    let tok = smollm2();
    let cases = expected()["assistant_mask"].as_array().unwrap().clone();
    assert_eq!(cases.len(), 5);
    for (i, case) in cases.iter().enumerate() {
        let name = case["template"].as_str().unwrap();
        let template = template_for(&tok, name);
        let generation =
            ChatTemplate::new("gen", &template_source(&format!("{name}_generation"))).unwrap();
        let msgs = messages(&case["messages"]);
        let want_mask: Vec<u8> = ids(&case["assistant_mask"])
            .iter()
            .map(|&x| x as u8)
            .collect();
        let r = tok
            .render_with_template(&template, &msgs, false, None)
            .unwrap();
        assert_eq!(r.text, case["text"].as_str().unwrap(), "case {i} ({name})");
        assert_eq!(r.ids, ids(&case["ids"]), "case {i} ({name})");
        assert_eq!(
            r.assistant_mask, want_mask,
            "case {i} ({name}): mask differs from transformers'"
        );
        // The {% generation %} tags are accepted and change nothing.
        let g = tok
            .render_with_template(&generation, &msgs, false, None)
            .unwrap();
        assert_eq!(g, r, "case {i} ({name})");
    }
}

#[test]
fn default_template_mask_matches_transformers() {
    let tok = smollm2();
    let case = &expected()["assistant_mask"][0];
    assert_eq!(case["template"], "smollm2");
    let r = tok.render(&messages(&case["messages"]), false).unwrap();
    let want_mask: Vec<u8> = ids(&case["assistant_mask"])
        .iter()
        .map(|&x| x as u8)
        .collect();
    assert_eq!(r.assistant_mask, want_mask);
}

/// Maximal runs of masked tokens.
fn masked_id_runs(ids: &[u32], mask: &[u8]) -> Vec<Vec<u32>> {
    let mut runs = Vec::new();
    let mut current = Vec::new();
    for (&id, &m) in ids.iter().zip(mask) {
        if m == 1 {
            current.push(id);
        } else if !current.is_empty() {
            runs.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        runs.push(current);
    }
    runs
}

/// Maximal runs of masked tokens, decoded.
fn masked_runs(tok: &Tokenizer, ids: &[u32], mask: &[u8]) -> Vec<String> {
    masked_id_runs(ids, mask)
        .iter()
        .map(|run| tok.decode(run, false).unwrap())
        .collect()
}

#[test]
fn assistant_mask_covers_exactly_replies_and_end_markers() {
    let tok = smollm2();
    let exp = expected();
    for case in exp["chat"].as_array().unwrap() {
        let name = case["template"].as_str().unwrap();
        let template = template_for(&tok, name);
        let msgs = messages(&case["messages"]);
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let tools = if case["tools"].is_null() {
            None
        } else {
            Some(&case["tools"])
        };
        let r = tok
            .render_with_template(&template, &msgs, gen, tools)
            .unwrap();
        let n_assistant = msgs.iter().filter(|m| m.role == "assistant").count();
        let want: Vec<String> = msgs
            .iter()
            .filter(|m| m.role == "assistant")
            .enumerate()
            .map(|(j, m)| match name {
                // Llama 3 trims message content and ends turns with <|eot_id|>.
                "llama3" => format!("{}<|eot_id|>", m.content.trim()),
                // Qwen3 opens the last turn (after the last user message) with an empty think
                // block, which the model writes too.
                "qwen3" if j + 1 == n_assistant => {
                    format!("<think>\n\n</think>\n\n{}<|im_end|>", m.content)
                }
                _ => format!("{}<|im_end|>", m.content),
            })
            .collect();
        let runs = masked_id_runs(&r.ids, &r.assistant_mask);
        if name == "llama3" {
            // SmolLM2's vocabulary has no <|eot_id|> token, so the marker is plain text and the
            // token that ends it can also hold the next turn's first character (`><`). Such a
            // token overlaps the span and is masked (transformers' rule); nothing more may be.
            assert_eq!(runs.len(), want.len());
            for (run, want) in runs.iter().zip(&want) {
                let text = tok.decode(run, false).unwrap();
                assert!(text.starts_with(want.as_str()), "{text:?} vs {want:?}");
                let shorter = tok.decode(&run[..run.len() - 1], false).unwrap();
                assert!(
                    shorter.len() < want.len(),
                    "more than one token past the marker: {text:?}"
                );
            }
        } else {
            assert_eq!(
                masked_runs(&tok, &r.ids, &r.assistant_mask),
                want,
                "{name}, gen={gen}"
            );
        }
    }
}

#[test]
fn prompt_completion_masks_the_completion_and_eos() {
    let tok = smollm2();
    let exp = expected();
    let prompt = &exp["strings"][2];
    let completion = &exp["strings"][0];
    let r = tok
        .render_prompt_completion(
            prompt["text"].as_str().unwrap(),
            completion["text"].as_str().unwrap(),
        )
        .unwrap();
    let prompt_ids = ids(&prompt["ids"]);
    let mut want = prompt_ids.clone();
    want.extend(ids(&completion["ids_no_special"]));
    want.push(exp["eos_token_id"].as_u64().unwrap() as u32);
    assert_eq!(r.ids, want);
    let ones = r.assistant_mask.iter().filter(|&&m| m == 1).count();
    assert_eq!(ones, want.len() - prompt_ids.len());
    assert!(r.assistant_mask[..prompt_ids.len()].iter().all(|&m| m == 0));
    assert!(r.text.ends_with("Hello world<|im_end|>"));
}

#[test]
fn chat_prompt_completion_masks_only_the_completion_turns() {
    let tok = smollm2();
    let conv = [
        Message::user("What is 2 + 2?"),
        Message::assistant("2 + 2 = 4."),
        Message::user("And 3 + 3?"),
    ];
    let completion = [Message::assistant("6.")];
    let r = tok
        .render_chat_prompt_completion(&conv, &completion)
        .unwrap();
    let mut all = conv.to_vec();
    all.extend_from_slice(&completion);
    let full = tok.render(&all, false).unwrap();
    assert_eq!(r.ids, full.ids);
    assert_eq!(
        masked_runs(&tok, &r.ids, &r.assistant_mask),
        vec!["6.<|im_end|>".to_string()]
    );
}

#[test]
fn tojson_matches_python_json_dumps() {
    for case in expected()["tojson"].as_array().unwrap() {
        let t = ChatTemplate::new("t", case["template"].as_str().unwrap()).unwrap();
        let got = t.render_with_vars(&case["vars"]).unwrap();
        assert_eq!(
            got,
            case["text"].as_str().unwrap(),
            "template {}",
            case["template"]
        );
    }
}

#[test]
fn python_string_methods_and_printing_match_jinja2() {
    for case in expected()["pycompat"].as_array().unwrap() {
        let t = ChatTemplate::new("t", case["template"].as_str().unwrap()).unwrap();
        let got = t.render_with_vars(&case["vars"]).unwrap();
        assert_eq!(
            got,
            case["text"].as_str().unwrap(),
            "template {}",
            case["template"]
        );
    }
}

#[test]
fn strftime_matches_python() {
    for case in expected()["strftime"].as_array().unwrap() {
        let got = strftime_utc(
            case["timestamp"].as_i64().unwrap(),
            case["format"].as_str().unwrap(),
        )
        .unwrap();
        assert_eq!(got, case["text"].as_str().unwrap());
    }
}

#[test]
fn trailing_newline_of_template_is_dropped_like_jinja2() {
    let t = ChatTemplate::new("t", "{{ 'a' }}\n").unwrap();
    assert_eq!(t.render_with_vars(&serde_json::json!({})).unwrap(), "a");
    let t = ChatTemplate::new("t", "{{ 'a' }}\n\n").unwrap();
    assert_eq!(t.render_with_vars(&serde_json::json!({})).unwrap(), "a\n");
}
