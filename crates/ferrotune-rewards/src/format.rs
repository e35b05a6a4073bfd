//! `format_tags`: does the completion use the `<tag>…</tag>` layout the prompt asked for?
//!
//! Owns: finding well-formed tag pairs and the soft/strict credit. Does not own: what is inside
//! the tags (that is `answer_match`).
//!
//! Decisions (each covered by a test in tests/rewards_text.rs):
//! - A tag counts only when `<t>` and `</t>` each appear exactly once, open before close
//!   (case-sensitive, no attributes). Duplicated tags, nested tags of the same name
//!   (`<answer><answer>…</answer></answer>`), unclosed or reversed tags earn nothing for that
//!   tag: repeating a tag must not be a way to collect credit.
//! - "In the listed order": the credit counts the longest chain of present tags whose pairs
//!   follow each other in the listed order without overlapping. So `<answer>` before
//!   `<reasoning>` with tags [reasoning, answer] is 1/2, and an `<answer>` pair nested inside the
//!   `<reasoning>` pair is 1/2 too.
//! - Soft credit = chain length / number of tags.
//! - Strict: 1.0 when the soft credit is 1.0 and the trimmed completion holds nothing but the
//!   pairs separated by whitespace; otherwise 0.5 × the soft credit (so strict never pays more
//!   than soft, and a correct layout with chatter around it still gets 0.5).

use crate::params::Params;
use crate::{Reward, RewardError, Sample};

/// `format_tags`: credit for using the requested `<tag>…</tag>` layout.
///
/// Params: `tags` (default ["reasoning", "answer"]), `mode` = "soft" (default) | "strict".
/// See the module doc for the exact rules.
pub struct FormatTags {
    label: String,
    tags: Vec<String>,
    strict: bool,
}

impl FormatTags {
    pub const PARAMS: &'static [&'static str] = &["tags", "mode"];

    pub(crate) fn from_params(label: String, p: &Params) -> Result<Self, RewardError> {
        let tags = p
            .str_list("tags")?
            .unwrap_or_else(|| vec!["reasoning".into(), "answer".into()]);
        if tags.is_empty() {
            return Err(p.invalid("tags", "must name at least one tag"));
        }
        for t in &tags {
            if t.is_empty() || t.contains(['<', '>', '/']) || t.chars().any(char::is_whitespace) {
                return Err(p.invalid(
                    "tags",
                    format!("`{t}` is not a plain tag name (no <, >, / or spaces)"),
                ));
            }
        }
        let strict = p.choice("mode", &["soft", "strict"], "soft")? == "strict";
        Ok(FormatTags {
            label,
            tags,
            strict,
        })
    }

    pub fn new(tags: &[&str], strict: bool) -> Self {
        FormatTags {
            label: "format_tags".into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            strict,
        }
    }

    /// The credit of one completion.
    pub fn credit(&self, text: &str) -> f64 {
        let text = text.trim();
        let spans: Vec<Option<(usize, usize)>> =
            self.tags.iter().map(|t| tag_span(text, t)).collect();
        // Longest chain, in listed order, of present spans that follow each other without
        // overlapping (n is tiny: O(n²)). chain[k] = length of the best chain ending at tag k.
        let mut chain = vec![0usize; spans.len()];
        for k in 0..spans.len() {
            let Some((start, _)) = spans[k] else { continue };
            chain[k] = 1
                + (0..k)
                    .filter(|&j| spans[j].is_some_and(|(_, end)| end <= start))
                    .map(|j| chain[j])
                    .max()
                    .unwrap_or(0);
        }
        let longest = chain.iter().copied().max().unwrap_or(0);
        let soft = longest as f64 / self.tags.len() as f64;
        if !self.strict {
            return soft;
        }
        if longest == self.tags.len() && only_whitespace_between(text, &spans) {
            1.0
        } else {
            0.5 * soft
        }
    }
}

/// (start of `<t>`, end of `</t>`) when both appear exactly once and in that order.
fn tag_span(text: &str, tag: &str) -> Option<(usize, usize)> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut opens = text.match_indices(&open);
    let mut closes = text.match_indices(&close);
    let (o, _) = opens.next()?;
    let (c, _) = closes.next()?;
    if opens.next().is_some() || closes.next().is_some() || c < o + open.len() {
        return None;
    }
    Some((o, c + close.len()))
}

/// With every tag present (so all spans are Some and in order): is everything outside them
/// whitespace?
fn only_whitespace_between(text: &str, spans: &[Option<(usize, usize)>]) -> bool {
    let mut pos = 0;
    for &(s, e) in spans.iter().flatten() {
        if s < pos || !text[pos..s].trim().is_empty() {
            return false;
        }
        pos = e;
    }
    text[pos..].trim().is_empty()
}

impl Reward for FormatTags {
    fn name(&self) -> &str {
        &self.label
    }
    fn score(&self, samples: &[Sample]) -> Vec<Option<f64>> {
        samples
            .iter()
            .map(|s| Some(self.credit(s.completion)))
            .collect()
    }
}
