//! Tool calls in chat transcripts: the calls a model writes in its reply, parsed per template
//! family, and the tokens a chat template adds for tool results, by TRL 1.16's rule
//! (`GRPOTrainer._get_tool_suffix_ids`), so a multi-turn transcript is built by concatenating
//! token ids — the model's sampled ids are never re-tokenized.
//!
//! Formats (read from the template's source by [`ToolCallFormat::detect`]):
//! - `Hermes`: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block per call
//!   (Qwen2.5, Qwen3, Hermes). A template with no tool syntax at all (SmolLM2-135M-Instruct's)
//!   also gets this format, written in the reply's text, as SmolLM2-1.7B-Instruct's card
//!   documents; its blocks may hold a JSON list of calls.
//! - `Llama3`: the whole reply is one JSON object `{"name": ..., "parameters": {...}}`
//!   (Llama 3.1/3.2 JSON tool calling), optionally after `<|python_tag|>`.
//!
//! Unlike TRL, which treats a malformed call as plain text (the episode ends), a call that
//! cannot be parsed is returned as an error, so the caller can answer it with an error reply as
//! agent frameworks do and let the model try again.
//!
//! Owns: parsing and the template-side suffix. Does not own: running tools (the sandbox) or
//! generation.

use serde::{Deserialize, Serialize};

use crate::chat::Message;
use crate::error::{Result, TokenizeError};
use crate::tokenizer::Tokenizer;

/// A tool call's JSON arguments (an object). A newtype so messages stay `Eq`: JSON numbers
/// cannot be NaN, so equality is reflexive.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ToolArguments(pub serde_json::Value);

impl Eq for ToolArguments {}

/// The function a call names, with its arguments.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: ToolArguments,
}

/// One structured call, as transformers' templates read it:
/// `{"type": "function", "function": {"name": ..., "arguments": {...}}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

impl ToolCall {
    pub fn function(name: impl Into<String>, arguments: serde_json::Value) -> Self {
        ToolCall {
            kind: "function".into(),
            function: FunctionCall {
                name: name.into(),
                arguments: ToolArguments(arguments),
            },
        }
    }
}

/// How a model writes its tool calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolCallFormat {
    Hermes,
    Llama3,
}

/// A reply split into its text and its tool calls (each parsed or refused with a reason).
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedReply {
    /// The reply without its call blocks, trimmed.
    pub content: String,
    pub calls: Vec<std::result::Result<ToolCall, String>>,
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

impl ToolCallFormat {
    /// The format a chat template's tool section asks for: Llama 3's JSON when the template
    /// mentions `"parameters"` inside a Llama 3 header layout, otherwise Hermes blocks.
    pub fn detect(template_source: &str) -> ToolCallFormat {
        if template_source.contains("<|start_header_id|>")
            && template_source.contains("\"parameters\"")
        {
            ToolCallFormat::Llama3
        } else {
            ToolCallFormat::Hermes
        }
    }

    /// Splits a reply (decoded text, without the end-of-turn token) into text and calls.
    pub fn parse(self, reply: &str) -> ParsedReply {
        match self {
            ToolCallFormat::Hermes => parse_hermes(reply),
            ToolCallFormat::Llama3 => parse_llama3(reply),
        }
    }
}

/// One call object: `{"name": "...", "arguments"|"parameters": {...}}`; arguments written as a
/// JSON string holding an object are accepted too (some models quote them).
fn call_from_json(v: &serde_json::Value, args_key: &str) -> std::result::Result<ToolCall, String> {
    let obj = v
        .as_object()
        .ok_or_else(|| format!("a tool call must be a JSON object, got {v}"))?;
    let name = obj
        .get("name")
        .and_then(|n| n.as_str())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| "a tool call needs a \"name\" string".to_string())?;
    let args = match obj.get(args_key) {
        None => serde_json::Value::Object(Default::default()),
        Some(serde_json::Value::String(s)) => serde_json::from_str(s)
            .map_err(|e| format!("\"{args_key}\" of `{name}` is not valid JSON: {e}"))?,
        Some(a) => a.clone(),
    };
    if !args.is_object() {
        return Err(format!(
            "\"{args_key}\" of `{name}` must be a JSON object, got {args}"
        ));
    }
    Ok(ToolCall::function(name, args))
}

fn parse_hermes(reply: &str) -> ParsedReply {
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut rest = reply;
    while let Some(i) = rest.find(OPEN) {
        content.push_str(&rest[..i]);
        let after = &rest[i + OPEN.len()..];
        let Some(j) = after.find(CLOSE) else {
            calls.push(Err(format!("unterminated {OPEN} (no {CLOSE})")));
            rest = "";
            break;
        };
        let body = after[..j].trim();
        match serde_json::from_str::<serde_json::Value>(body) {
            Ok(serde_json::Value::Array(items)) if !items.is_empty() => {
                calls.extend(items.iter().map(|it| call_from_json(it, "arguments")))
            }
            Ok(v) => calls.push(call_from_json(&v, "arguments")),
            Err(e) => calls.push(Err(format!("malformed JSON in {OPEN}: {e}"))),
        }
        rest = &after[j + CLOSE.len()..];
    }
    content.push_str(rest);
    ParsedReply {
        content: content.trim().to_string(),
        calls,
    }
}

fn parse_llama3(reply: &str) -> ParsedReply {
    let body = reply.trim();
    let body = body.strip_prefix("<|python_tag|>").unwrap_or(body).trim();
    if body.starts_with('{') {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(body) {
            if v.get("name").is_some() {
                return ParsedReply {
                    content: String::new(),
                    calls: vec![call_from_json(&v, "parameters")],
                };
            }
        }
    }
    ParsedReply {
        content: body.to_string(),
        calls: Vec::new(),
    }
}

/// The ids a template adds after an assistant turn that called tools, for the tool replies
/// `results` and the next generation prompt — TRL 1.16's `_get_tool_suffix_ids`: render a dummy
/// `user` + `assistant` (calling `results[0]`'s tool) conversation, then the same plus `results`
/// with the generation prompt; the suffix is what the second adds after the first, cut at the
/// first one's last end-of-sequence token (the model stops there; a template's `"\n"` after it
/// belongs to the suffix). Fails when the template renders the dummy prefix differently once
/// tool messages follow (not prefix-preserving), where concatenating ids would be wrong.
pub fn tool_suffix_ids(
    tok: &Tokenizer,
    results: &[Message],
    tools: Option<&serde_json::Value>,
) -> Result<Vec<u32>> {
    let first = results.first().ok_or_else(|| TokenizeError::Template {
        name: "tool_suffix".into(),
        detail: "no tool messages to render".into(),
    })?;
    let tool_name = first.name.clone().unwrap_or_default();
    let dummy = vec![
        Message::user("dummy"),
        Message {
            tool_calls: Some(vec![ToolCall::function(
                tool_name,
                serde_json::Value::Object(Default::default()),
            )]),
            ..Message::assistant("")
        },
    ];
    let prefix = tok.render_ids(&dummy, false, tools)?;
    let mut all = dummy;
    all.extend_from_slice(results);
    let full = tok.render_ids(&all, true, tools)?;
    let eos = tok.eos_ids();
    let cut = prefix
        .iter()
        .rposition(|id| eos.contains(id))
        .map_or(prefix.len(), |i| i + 1);
    if full.get(..cut) != Some(&prefix[..cut]) {
        return Err(TokenizeError::Template {
            name: "tool_suffix".into(),
            detail: "the chat template is not prefix-preserving: the conversation before the \
                     tool replies renders differently once they follow, so tool results cannot \
                     be appended to sampled ids"
                .into(),
        });
    }
    Ok(full[cut..].to_vec())
}
