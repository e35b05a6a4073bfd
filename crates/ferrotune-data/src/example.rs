//! TRL's dataset column conventions turned into typed examples: `text` (language modelling),
//! `prompt` + `completion` (plain or conversational), `messages` (conversational), `prompt` +
//! `chosen` + `rejected` (preference, explicit or implicit prompt) and `prompt` + extra columns
//! (GRPO prompts, with `answer` and the rest kept for reward functions). It owns column names and
//! types; it does not read files (`read.rs`) or tokenize (`sft.rs`).
//!
//! Every `*_examples` function returns one example per row, in row order, so `rows[i].line` is
//! where example `i` came from.

use std::path::Path;

use ferrotune_tokenize::Message;
use serde_json::{Map, Value};

use crate::error::{json_type, DataError, Result};
use crate::read::Row;

/// A prompt or completion: plain text, or a list of chat messages (TRL's "conversational" form).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    Text(String),
    Chat(Vec<Message>),
}

impl Segment {
    pub fn is_chat(&self) -> bool {
        matches!(self, Segment::Chat(_))
    }
}

/// One training example, by TRL's dataset type.
#[derive(Clone, Debug, PartialEq)]
pub enum Example {
    /// Language modelling: every token is trained on.
    Text { text: String },
    /// Prompt/completion; both plain text or both chat (checked when tokenizing).
    PromptCompletion {
        prompt: Segment,
        completion: Segment,
    },
    /// A whole conversation; the loss is on the assistant turns.
    Messages { messages: Vec<Message> },
    /// Preference pair (DPO, reward models).
    Preference {
        prompt: Segment,
        chosen: Segment,
        rejected: Segment,
    },
    /// A prompt to generate from (GRPO); `fields` holds every other column (including `answer`)
    /// for the reward functions.
    Prompt {
        prompt: Segment,
        answer: Option<String>,
        fields: Map<String, Value>,
    },
}

/// The SFT dataset type, chosen from the first row's columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SftFormat {
    Messages,
    PromptCompletion,
    Text,
}

/// Picks the SFT format from a row's columns: `messages` > `prompt`/`completion` > `text`.
pub fn detect_sft_format(row: &Row, path: &Path) -> Result<SftFormat> {
    let has = |c: &str| row.fields.contains_key(c);
    if has("messages") {
        Ok(SftFormat::Messages)
    } else if has("prompt") || has("completion") {
        Ok(SftFormat::PromptCompletion)
    } else if has("text") {
        Ok(SftFormat::Text)
    } else {
        Err(DataError::UnknownFormat {
            path: path.to_path_buf(),
            line: row.line,
            columns: column_list(row),
            expected: "SFT needs `messages`, `prompt` + `completion`, or `text`",
        })
    }
}

/// SFT examples, all of the format the first row has.
pub fn sft_examples(rows: &[Row], path: &Path) -> Result<Vec<Example>> {
    let first = rows.first().ok_or_else(|| DataError::Empty {
        path: path.to_path_buf(),
    })?;
    let format = detect_sft_format(first, path)?;
    rows.iter()
        .map(|row| {
            let c = Cols { path, row };
            Ok(match format {
                SftFormat::Messages => Example::Messages {
                    messages: c.messages("messages")?,
                },
                SftFormat::PromptCompletion => Example::PromptCompletion {
                    prompt: c.segment("prompt")?,
                    completion: c.segment("completion")?,
                },
                SftFormat::Text => Example::Text {
                    text: c.string("text")?,
                },
            })
        })
        .collect()
}

/// Preference examples (`chosen`, `rejected`, and `prompt` or an implicit prompt: the longest
/// shared beginning of `chosen` and `rejected`, as TRL's `maybe_extract_prompt` does).
pub fn preference_examples(rows: &[Row], path: &Path) -> Result<Vec<Example>> {
    if rows.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    rows.iter()
        .map(|row| {
            let c = Cols { path, row };
            let chosen = c.segment("chosen")?;
            let rejected = c.segment("rejected")?;
            if row.fields.contains_key("prompt") {
                return Ok(Example::Preference {
                    prompt: c.segment("prompt")?,
                    chosen,
                    rejected,
                });
            }
            let (prompt, chosen, rejected) =
                extract_prompt(chosen, rejected).ok_or_else(|| DataError::WrongType {
                    path: path.to_path_buf(),
                    line: row.line,
                    column: "rejected".into(),
                    expected: "the same kind (text or messages) as `chosen`",
                    found: "the other kind".into(),
                })?;
            Ok(Example::Preference {
                prompt,
                chosen,
                rejected,
            })
        })
        .collect()
}

/// GRPO prompts: `prompt` plus every other column kept in `fields`; `answer` (a string or a
/// number) is also lifted out because most reward functions compare against it.
pub fn prompt_examples(rows: &[Row], path: &Path) -> Result<Vec<Example>> {
    if rows.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    rows.iter()
        .map(|row| {
            let c = Cols { path, row };
            let prompt = c.segment("prompt")?;
            let answer = match row.fields.get("answer") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                Some(other) => {
                    return Err(DataError::WrongType {
                        path: path.to_path_buf(),
                        line: row.line,
                        column: "answer".into(),
                        expected: "a string or a number",
                        found: json_type(other).into(),
                    })
                }
            };
            let mut fields = row.fields.clone();
            fields.remove("prompt");
            Ok(Example::Prompt {
                prompt,
                answer,
                fields,
            })
        })
        .collect()
}

/// Splits an implicit prompt off a preference pair; `None` when the two are of different kinds.
fn extract_prompt(chosen: Segment, rejected: Segment) -> Option<(Segment, Segment, Segment)> {
    match (chosen, rejected) {
        (Segment::Chat(c), Segment::Chat(r)) => {
            let n = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
            Some((
                Segment::Chat(c[..n].to_vec()),
                Segment::Chat(c[n..].to_vec()),
                Segment::Chat(r[n..].to_vec()),
            ))
        }
        (Segment::Text(c), Segment::Text(r)) => {
            let mut n: usize = c
                .char_indices()
                .zip(r.chars())
                .take_while(|((_, a), b)| a == b)
                .map(|((_, a), _)| a.len_utf8())
                .sum();
            // Like TRL: a space right before the split belongs to the answers, not the prompt,
            // so "Q: x A: yes" / "… A: no" keeps " yes" / " no" as completions.
            if n < c.len() && n < r.len() && c[..n].ends_with(' ') {
                n -= 1;
            }
            Some((
                Segment::Text(c[..n].to_string()),
                Segment::Text(c[n..].to_string()),
                Segment::Text(r[n..].to_string()),
            ))
        }
        _ => None,
    }
}

fn column_list(row: &Row) -> String {
    row.fields
        .keys()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Typed access to one row's columns, with errors that name the file, line and column.
struct Cols<'a> {
    path: &'a Path,
    row: &'a Row,
}

impl Cols<'_> {
    fn get(&self, column: &str) -> Result<&Value> {
        self.row
            .fields
            .get(column)
            .ok_or_else(|| DataError::MissingColumn {
                path: self.path.to_path_buf(),
                line: self.row.line,
                column: column.to_string(),
            })
    }

    fn wrong(&self, column: &str, expected: &'static str, found: &Value) -> DataError {
        DataError::WrongType {
            path: self.path.to_path_buf(),
            line: self.row.line,
            column: column.to_string(),
            expected,
            found: json_type(found).to_string(),
        }
    }

    fn string(&self, column: &str) -> Result<String> {
        match self.get(column)? {
            Value::String(s) => Ok(s.clone()),
            other => Err(self.wrong(column, "a string", other)),
        }
    }

    /// A string is text; a list is chat messages.
    fn segment(&self, column: &str) -> Result<Segment> {
        match self.get(column)? {
            Value::String(s) => Ok(Segment::Text(s.clone())),
            v @ Value::Array(_) => Ok(Segment::Chat(self.parse_messages(column, v)?)),
            other => Err(self.wrong(column, "a string or a list of messages", other)),
        }
    }

    /// A list of `{role, content}`; a string holding that list as JSON is accepted too, since
    /// CSV can carry `messages` only that way.
    fn messages(&self, column: &str) -> Result<Vec<Message>> {
        let value = self.get(column)?;
        if let Value::String(s) = value {
            let parsed: Value = serde_json::from_str(s).map_err(|e| DataError::WrongType {
                path: self.path.to_path_buf(),
                line: self.row.line,
                column: column.to_string(),
                expected: "a list of {role, content} messages",
                found: format!("a string that is not JSON ({e})"),
            })?;
            return self.parse_messages(column, &parsed);
        }
        self.parse_messages(column, value)
    }

    fn parse_messages(&self, column: &str, value: &Value) -> Result<Vec<Message>> {
        const EXPECTED: &str = "a list of {role, content} messages";
        let Value::Array(items) = value else {
            return Err(self.wrong(column, EXPECTED, value));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let here = format!("{column}[{i}]");
                let Value::Object(obj) = item else {
                    return Err(self.wrong(&here, "a {role, content} object", item));
                };
                let field = |name: &str| -> Result<String> {
                    let at = format!("{here}.{name}");
                    match obj.get(name) {
                        Some(Value::String(s)) => Ok(s.clone()),
                        Some(other) => Err(self.wrong(&at, "a string", other)),
                        None => Err(DataError::MissingColumn {
                            path: self.path.to_path_buf(),
                            line: self.row.line,
                            column: at,
                        }),
                    }
                };
                Ok(Message::new(field("role")?, field("content")?))
            })
            .collect()
    }
}
