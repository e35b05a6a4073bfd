//! Chat templates: compiling a Hugging Face Jinja chat template with minijinja so that it renders
//! the same text as transformers' `apply_chat_template`, and finding which bytes of a render each
//! assistant message produced (the source of the loss mask). It owns no tokenizer: token ids and
//! the byte→token mapping are done by `Tokenizer::render` in `tokenizer.rs`.
//!
//! Semantics copied from transformers (`utils/chat_template_utils.py`), not from minijinja's
//! defaults: `trim_blocks` and `lstrip_blocks` on, a single trailing newline of the template
//! dropped (jinja2's `keep_trailing_newline=False`), `raise_exception(msg)`, `strftime_now(fmt)`,
//! `tojson` as Python's `json.dumps`, Python string/dict methods (`.strip()`, `.items()`, …) via
//! minijinja-contrib's `pycompat`, values printed as Python prints them (`True`, `None`), and the
//! variables `messages`, `add_generation_prompt`, `tools`, `documents` (None unless given) and
//! the special tokens `bos_token`, `eos_token`, `unk_token`, `pad_token`.
//!
//! ## The assistant-mask rule
//!
//! For an assistant message at index k, with `render(msgs, gen)` the template's text and `full`
//! the render of the whole conversation:
//!
//! - `before` = `render(messages[..k], add_generation_prompt = true)`: the turn starts in `full`
//!   where `full` stops agreeing with `before` (right after the generation prompt, e.g.
//!   `<|im_start|>assistant\n`), and never before the previous assistant span ends;
//! - `turn` = what `render(messages[..=k], add_generation_prompt = false)` adds after `before`,
//!   minus trailing whitespace (the `"\n"` a template writes after its end-of-turn marker, which
//!   the model never writes because it stops at the marker);
//! - the span is the longest tail of `turn` that `full` holds exactly at the turn's start. For
//!   templates that render earlier turns unchanged (SmolLM2, Qwen2.5, Llama 3) this is all of
//!   `turn`: the reply plus its end marker (`<|im_end|>`, `<|eot_id|>`) and anything the template
//!   writes between the generation prompt and the reply (e.g. Qwen3's empty `<think></think>` on
//!   the last turn). For templates that rewrite earlier turns once later ones exist (Qwen3 drops
//!   past reasoning) it is the part of the turn that survives (reply + end marker).
//!
//! If no tail matches, `MaskNotPrefixStable` is returned rather than a guessed mask. A token is
//! masked when it overlaps a span, as transformers does for `{% generation %}` spans. Templates
//! with `{% generation %}` tags are accepted (the tags are read as plain blocks); the mask still
//! comes from the rule above, which gives the same spans as transformers for templates that wrap
//! "reply + end marker" in the tags (checked in `tests/chat.rs`).

use std::ops::Range;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Serde, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TokenizeError};
use crate::python;

/// One chat message, as in TRL's `messages` column. `tool_calls` (an assistant's structured
/// calls) and `name` (a tool reply's tool) are absent unless set, so a template sees them
/// undefined, as it does for transformers' dicts without those keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<crate::tools::ToolCall>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            name: None,
        }
    }
    /// A tool's reply, as TRL appends it: `{"role": "tool", "name": ..., "content": ...}`.
    pub fn tool(name: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            name: Some(name.into()),
            ..Self::new("tool", content)
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A rendered, tokenized conversation: `ids[i]` is trained on when `assistant_mask[i] == 1`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    pub ids: Vec<u32>,
    pub assistant_mask: Vec<u8>,
}

/// The special-token strings a template can read (`bos_token`, …); `None` leaves it undefined.
#[derive(Clone, Debug, Default)]
pub struct TemplateTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
}

const TEMPLATE_NAME: &str = "chat";

/// A compiled chat template with transformers' rendering semantics.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    name: String,
    source: String,
    env: Environment<'static>,
}

impl ChatTemplate {
    /// Compiles `source`; `name` is used in error messages (e.g. "default", "tool_use").
    pub fn new(name: &str, source: &str) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TokenizeError::template(name, &e))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(python::python_formatter);
        env.add_filter("tojson", python::tojson_filter);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", |format: String| {
            python::strftime_now(&format)
        });
        env.add_template_owned(TEMPLATE_NAME, rewrite_generation_tags(source))
            .map_err(|e| TokenizeError::template(name, &e))?;
        Ok(ChatTemplate {
            name: name.to_string(),
            source: source.to_string(),
            env,
        })
    }

    /// The template text as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Renders the conversation to text, like `apply_chat_template(..., tokenize=False)`.
    pub fn render_text(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
        tokens: &TemplateTokens,
    ) -> Result<String> {
        let mut ctx: Vec<(&str, Value)> = vec![
            ("messages", Value::from(Serde(messages))),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            // transformers passes these explicitly, so templates see None, not undefined.
            (
                "tools",
                tools
                    .map(|t| Value::from(Serde(t)))
                    .unwrap_or(Value::from(())),
            ),
            ("documents", Value::from(())),
        ];
        for (key, token) in [
            ("bos_token", &tokens.bos_token),
            ("eos_token", &tokens.eos_token),
            ("unk_token", &tokens.unk_token),
            ("pad_token", &tokens.pad_token),
        ] {
            if let Some(t) = token {
                ctx.push((key, Value::from(t.as_str())));
            }
        }
        let ctx = Value::from_pairs(ctx);
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TokenizeError::template(&self.name, &e))?;
        template
            .render(ctx)
            .map_err(|e| TokenizeError::template(&self.name, &e))
    }

    /// Renders with arbitrary variables (a JSON object), e.g. extra template switches such as
    /// `enable_thinking`, or to test the template environment itself.
    pub fn render_with_vars(&self, vars: &serde_json::Value) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TokenizeError::template(&self.name, &e))?;
        template
            .render(Value::from(Serde(vars)))
            .map_err(|e| TokenizeError::template(&self.name, &e))
    }

    /// Renders the conversation and returns, per assistant message, the byte span of the text it
    /// produced (see the module docs for the rule).
    pub fn render_with_assistant_spans(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
        tokens: &TemplateTokens,
    ) -> Result<(String, Vec<Range<usize>>)> {
        let text = self.render_text(messages, add_generation_prompt, tools, tokens)?;
        let mut spans: Vec<Range<usize>> = Vec::new();
        for (k, message) in messages.iter().enumerate() {
            if message.role != "assistant" {
                continue;
            }
            let before = self.render_text(&messages[..k], true, tools, tokens)?;
            let through = self.render_text(&messages[..=k], false, tools, tokens)?;
            // Where the turn starts in the whole render, and what the turn adds when it is last.
            let prev_end = spans.last().map_or(0, |s| s.end);
            let start = common_prefix_len(&text, &before).max(prev_end);
            let turn = through[common_prefix_len(&through, &before)..].trim_end();
            let span = longest_tail_at(&text, start, turn).ok_or_else(|| {
                TokenizeError::MaskNotPrefixStable {
                    message_index: k,
                    reason: format!(
                        "no tail of the turn's text {turn:?} appears where the turn starts \
                         (byte {start}) in the whole render"
                    ),
                }
            })?;
            spans.push(span);
        }
        Ok((text, spans))
    }
}

/// Length in bytes of the longest common prefix of `a` and `b`, on a char boundary.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map_or(a.len().min(b.len()), |((i, _), _)| i)
}

/// The longest non-empty tail of `turn` that `text` holds at byte `start`, as a byte range of
/// `text`. For a template that renders earlier turns unchanged the tail is the whole turn; for
/// one that rewrites them (drops a `<think>` block) it is the part that survived.
fn longest_tail_at(text: &str, start: usize, turn: &str) -> Option<Range<usize>> {
    let rest = text.get(start..)?;
    turn.char_indices()
        .map(|(i, _)| &turn[i..])
        .find(|tail| rest.starts_with(tail))
        .map(|tail| start..start + tail.len())
}

fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// Marks every token whose byte range overlaps one of `spans` (both sorted), as transformers does
/// for `return_assistant_tokens_mask`. Offsets are `(start, end)` byte ranges of the tokens.
pub fn mask_from_spans(offsets: &[(usize, usize)], spans: &[Range<usize>]) -> Vec<u8> {
    let mut mask = vec![0u8; offsets.len()];
    let mut span_idx = 0;
    for (i, &(start, end)) in offsets.iter().enumerate() {
        while span_idx < spans.len() && start >= spans[span_idx].end {
            span_idx += 1;
        }
        let Some(span) = spans.get(span_idx) else {
            break;
        };
        if end > span.start && !span.is_empty() {
            mask[i] = 1;
        }
    }
    mask
}

/// TRL marks trainable text with `{% generation %}…{% endgeneration %}`, a jinja2 extension
/// minijinja lacks. Rewriting them to `{% if true %}…{% endif %}` keeps the template's text and
/// whitespace control (`{%-`, `-%}`) exactly as jinja2 renders it.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(pos) = rest.find("{%") {
        out.push_str(&rest[..pos]);
        let tag = &rest[pos..];
        let Some(close) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..close];
        let (left, body) = match inner.chars().next() {
            Some(c @ ('-' | '+')) => (c.to_string(), &inner[1..]),
            _ => (String::new(), inner),
        };
        let (body, right) = match body.chars().last() {
            Some(c @ ('-' | '+')) => (&body[..body.len() - 1], c.to_string()),
            _ => (body, String::new()),
        };
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => out.push_str(&format!("{{%{left} {r} {right}%}}")),
            None => out.push_str(&tag[..close + 2]),
        }
        rest = &tag[close + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_become_plain_blocks() {
        let src = "a{% generation %}b{%- endgeneration -%} c{% if x %}y{% endif %}";
        assert_eq!(
            rewrite_generation_tags(src),
            "a{% if true %}b{%- endif -%} c{% if x %}y{% endif %}"
        );
    }

    #[test]
    fn overlap_rule_marks_boundary_tokens() {
        // Tokens: [0,3) [3,6) [6,9) [9,12); span [4,7) overlaps tokens 1 and 2.
        let offsets = [(0, 3), (3, 6), (6, 9), (9, 12)];
        let one_span = [Range { start: 4, end: 7 }];
        assert_eq!(mask_from_spans(&offsets, &one_span), vec![0, 1, 1, 0]);
        assert_eq!(mask_from_spans(&offsets, &[0..3, 9..12]), vec![1, 0, 0, 1]);
        let empty_span = [Range { start: 5, end: 5 }];
        assert_eq!(mask_from_spans(&offsets, &empty_span), vec![0, 0, 0, 0]);
    }

    #[test]
    fn raise_exception_surfaces_the_message() {
        let t = ChatTemplate::new("t", "{{ raise_exception('no system role') }}").unwrap();
        let err = t
            .render_text(&[], false, None, &TemplateTokens::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no system role"), "{err}");
    }
}
