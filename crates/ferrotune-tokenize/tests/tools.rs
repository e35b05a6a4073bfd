//! Transcripts with tool calls, built the way a multi-turn rollout builds them (prompt ids, the
//! model's ids, the template's tool-result suffix, the model's ids, ...), against transformers'
//! `apply_chat_template(..., tools=...)` of the whole conversation and TRL 1.16's own
//! `_get_tool_suffix_ids` (fixture: `fixtures/tools/make_tool_transcripts.py`), for the SmolLM2
//! and Qwen2.5 templates; the model mask covers exactly the model's tokens. Then the call
//! parser on what a policy may write: well-formed calls, lists, quoted arguments, and every way
//! a call can be malformed.

mod common;

use common::*;
use ferrotune_tokenize::tools::{tool_suffix_ids, ToolCall, ToolCallFormat};
use ferrotune_tokenize::{Message, Tokenizer};
use serde_json::{json, Value};

fn fixture() -> Value {
    let path = fixtures_dir().join("../tools/tool_transcripts.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn tokenizer_for(fx: &Value, template: &str) -> Tokenizer {
    let mut tok = smollm2();
    if template != "smollm2" {
        tok.set_chat_template(fx["templates"][template].as_str().unwrap())
            .unwrap();
    }
    tok
}

/// The calls of the `k`-th assistant turn of a case, from its structured twin (Qwen2.5's
/// messages carry `tool_calls`; SmolLM2's carry the same calls as reply text).
fn expected_calls(fx: &Value, case: &str, k: usize) -> Vec<ToolCall> {
    let twin = fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["template"] == "qwen2_5" && c["case"] == case)
        .unwrap();
    let msg = &twin["turns"][k]["message"];
    match msg.get("tool_calls") {
        Some(calls) => serde_json::from_value(calls.clone()).unwrap(),
        None => Vec::new(),
    }
}

#[test]
fn transcripts_concatenate_to_the_transformers_render() {
    let fx = fixture();
    let cases = fx["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for c in cases {
        let (template, case) = (c["template"].as_str().unwrap(), c["case"].as_str().unwrap());
        let name = format!("{template}/{case}");
        let tok = tokenizer_for(&fx, template);
        let tools = c["tools"].clone();
        let messages: Vec<Message> = serde_json::from_value(c["messages"].clone()).unwrap();
        let format = ToolCallFormat::detect(tok.chat_template().unwrap());
        assert_eq!(format, ToolCallFormat::Hermes, "{name}");
        let eos = tok.eos_token().unwrap().to_string();

        let mut ids = tok.render_ids(&messages[..1], true, Some(&tools)).unwrap();
        assert_eq!(ids, ids_of(&c["prompt_ids"]), "{name}: prompt");
        let mut mask = vec![0u8; ids.len()];
        let rounds = c["rounds"].as_array().unwrap();
        for (k, turn) in c["turns"].as_array().unwrap().iter().enumerate() {
            let text = turn["turn_text"].as_str().unwrap();
            let model_ids = tok.encode(text, false).unwrap();
            assert_eq!(model_ids, ids_of(&turn["turn_ids"]), "{name}: turn {k}");
            // What the model wrote, parsed back into the calls the conversation holds.
            let reply = text.strip_suffix(eos.as_str()).unwrap();
            let parsed = format.parse(reply);
            let calls: Vec<ToolCall> = parsed.calls.into_iter().map(|c| c.unwrap()).collect();
            assert_eq!(
                calls,
                expected_calls(&fx, case, k),
                "{name}: calls of turn {k}"
            );
            ids.extend(&model_ids);
            mask.extend(std::iter::repeat_n(1, model_ids.len()));
            if let Some(round) = rounds.get(k) {
                let results: Vec<Message> =
                    serde_json::from_value(round["tool_messages"].clone()).unwrap();
                let suffix = tool_suffix_ids(&tok, &results, Some(&tools)).unwrap();
                assert_eq!(suffix, ids_of(&round["suffix_ids"]), "{name}: suffix {k}");
                ids.extend(&suffix);
                mask.extend(std::iter::repeat_n(0, suffix.len()));
            }
        }
        assert_eq!(ids, ids_of(&c["transcript_ids"]), "{name}: transcript");
        let full = ids_of(&c["full_ids"]);
        assert_eq!(
            &full[..ids.len()],
            &ids[..],
            "{name}: not transformers' render"
        );
        let want_mask: Vec<u8> = c["model_mask"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(mask, want_mask, "{name}: model mask");
        assert!(mask.contains(&0) && mask.contains(&1));
    }
}

fn ids_of(v: &Value) -> Vec<u32> {
    ids(v)
}

fn calc(expr: &str) -> ToolCall {
    ToolCall::function("calculator", json!({ "expression": expr }))
}

#[test]
fn hermes_calls_parse_and_malformed_ones_are_errors() {
    let f = ToolCallFormat::Hermes;
    let p = f.parse(
        "Let me compute.\n<tool_call>\n{\"name\": \"calculator\", \"arguments\": {\"expression\": \"2*3\"}}\n</tool_call>",
    );
    assert_eq!(p.content, "Let me compute.");
    assert_eq!(p.calls, vec![Ok(calc("2*3"))]);
    // SmolLM2-1.7B writes a list of calls in one block; some models quote the arguments.
    let p = f.parse(
        "<tool_call>[{\"name\": \"calculator\", \"arguments\": {\"expression\": \"1\"}}, {\"name\": \"calculator\", \"arguments\": \"{\\\"expression\\\": \\\"2\\\"}\"}]</tool_call>",
    );
    assert_eq!(p.calls, vec![Ok(calc("1")), Ok(calc("2"))]);
    assert!(f.parse("The answer is 6.").calls.is_empty());
    // What a policy may write instead: each is an error the caller answers, not a panic, and
    // the text around it is kept.
    for (reply, needle) in [
        ("<tool_call>{\"name\": \"calculator\", \"arguments\": {\"expression\": \"2*3\"</tool_call>", "malformed JSON"),
        ("<tool_call>{\"arguments\": {}}</tool_call>", "\"name\""),
        ("<tool_call>{\"name\": \"\", \"arguments\": {}}</tool_call>", "\"name\""),
        ("<tool_call>{\"name\": \"calculator\", \"arguments\": [1, 2]}</tool_call>", "must be a JSON object"),
        ("<tool_call>{\"name\": \"calculator\", \"arguments\": \"{not json\"}</tool_call>", "not valid JSON"),
        ("<tool_call>\"calculator\"</tool_call>", "JSON object"),
        ("<tool_call>[]</tool_call>", "JSON object"),
        ("before <tool_call>{\"name\": \"calculator\", \"arguments\": {}}", "unterminated"),
        ("<tool_call></tool_call>", "malformed JSON"),
    ] {
        let p = f.parse(reply);
        assert_eq!(p.calls.len(), 1, "{reply}");
        let e = p.calls[0].as_ref().unwrap_err();
        assert!(e.contains(needle), "{reply}: {e}");
    }
    let p = f.parse("before <tool_call>{\"name\": \"x\"}");
    assert_eq!(p.content, "before");
    // A call with no arguments is a call with empty arguments.
    assert_eq!(
        f.parse("<tool_call>{\"name\": \"now\"}</tool_call>").calls,
        vec![Ok(ToolCall::function("now", json!({})))]
    );
}

#[test]
fn llama3_calls_parse() {
    let llama3 = template_source("llama3");
    assert_eq!(ToolCallFormat::detect(&llama3), ToolCallFormat::Llama3);
    assert_eq!(
        ToolCallFormat::detect(&template_source("qwen2_5")),
        ToolCallFormat::Hermes
    );
    let f = ToolCallFormat::Llama3;
    let call = "{\"name\": \"calculator\", \"parameters\": {\"expression\": \"7-2\"}}";
    assert_eq!(f.parse(call).calls, vec![Ok(calc("7-2"))]);
    assert_eq!(
        f.parse(&format!("<|python_tag|>{call}")).calls,
        vec![Ok(calc("7-2"))]
    );
    let p = f.parse("It is 5.");
    assert!(p.calls.is_empty());
    assert_eq!(p.content, "It is 5.");
    // JSON that is not a call is the reply's text.
    assert!(f.parse("{\"answer\": 5}").calls.is_empty());
    let bad = f.parse("{\"name\": \"calculator\", \"parameters\": 5}");
    assert!(bad.calls[0].is_err());
}

/// A template that renders an earlier turn differently once more turns follow cannot have tool
/// results appended to sampled ids; that is refused, not silently mis-tokenized.
#[test]
fn a_template_that_is_not_prefix_preserving_is_refused() {
    let mut tok = smollm2();
    tok.set_chat_template(
        "{% for m in messages %}{% if loop.last %}[last]{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    .unwrap();
    let e = tool_suffix_ids(&tok, &[Message::tool("calculator", "6")], None).unwrap_err();
    assert!(e.to_string().contains("prefix-preserving"), "{e}");
    let e = tool_suffix_ids(&tok, &[], None).unwrap_err();
    assert!(e.to_string().contains("no tool messages"), "{e}");
}
