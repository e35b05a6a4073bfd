//! `answer_match` and `numeric_closeness`: is the model's final answer the row's answer?
//!
//! Owns: answer extraction (`<answer>` tag, last number, `\boxed{}`, GSM8K `####`, regex),
//! normalisation and numeric comparison. Does not own: the tag layout (`format.rs`).
//!
//! Decisions:
//! - Both sides are normalised: trim, drop `$`, one trailing `.`, unicode minus → `-`; numbers
//!   may carry thousands commas (`1,234`), a sign, decimals, an exponent, or be a fraction
//!   (`3/4`, `\frac{3}{4}`, `\dfrac`, `\tfrac`). When both sides parse as numbers they are
//!   compared numerically (|a−b| ≤ 1e-9·max(1,|b|)); otherwise as text, case-insensitively with
//!   whitespace collapsed.
//! - The row's value: a string containing `####` is a GSM8K solution and only what follows the
//!   last `####` is the answer (for every `extract` mode); numbers and booleans are used as
//!   text; an array is a list of accepted answers (any may match); null or a missing column
//!   ⇒ None (not applicable).
//! - Nothing extracted ⇒ 0.0.
//! - `numeric_closeness`: the extracted text must parse as a number; if it does not, the last
//!   number inside it is used (`<answer>It is 72 apples</answer>` → 72). Nothing extracted, or
//!   no number ⇒ 0.0. A reference that is not a number ⇒ None. Full credit within
//!   `abs_tolerance` or relative `tolerance`; otherwise 0.5·max(0, 1 − |p−a|/max(|a|,1)), which
//!   is < 0.5 outside the tolerance and falls to 0 once the error reaches 100 %.

use std::sync::OnceLock;

use regex::Regex;
use serde_json::Value;

use crate::params::Params;
use crate::{Reward, RewardError, Sample};

/// How the model's answer is pulled out of the completion.
#[derive(Clone, Debug)]
pub enum Extract {
    /// Text inside the last `<tag>…</tag>` (default tag `answer`).
    AnswerTag(String),
    LastNumber,
    /// The last `\boxed{…}` whose braces balance.
    Boxed,
    /// After the last `####` (to the end of that line).
    Gsm8k,
    /// First capture group (or the whole match) of the last match.
    Regex(Regex),
}

const EXTRACT_PARAMS: &[&str] = &["extract", "pattern", "tag", "field"];

fn number_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(
            r"[-+]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?\b|\d+(?:\.\d+)?|\.\d+)(?:/\d+(?:\.\d+)?)?",
        )
        .expect("static regex")
    })
}

impl Extract {
    fn from_params(p: &Params) -> Result<(Extract, String), RewardError> {
        let mode = p.choice(
            "extract",
            &["answer_tag", "last_number", "boxed", "gsm8k", "regex"],
            "answer_tag",
        )?;
        if mode != "regex" && p.has("pattern") {
            return Err(p.invalid("pattern", "only used with extract = \"regex\""));
        }
        if mode != "answer_tag" && p.has("tag") {
            return Err(p.invalid("tag", "only used with extract = \"answer_tag\""));
        }
        let ex = match mode.as_str() {
            "answer_tag" => Extract::AnswerTag(p.str("tag")?.unwrap_or_else(|| "answer".into())),
            "last_number" => Extract::LastNumber,
            "boxed" => Extract::Boxed,
            "gsm8k" => Extract::Gsm8k,
            _ => {
                let pat = p
                    .str("pattern")?
                    .ok_or_else(|| p.missing("pattern", "extract = \"regex\" needs a pattern"))?;
                Extract::Regex(
                    Regex::new(&pat)
                        .map_err(|e| p.invalid("pattern", e.to_string().replace('\n', " ")))?,
                )
            }
        };
        Ok((ex, p.str("field")?.unwrap_or_else(|| "answer".into())))
    }

    pub fn apply(&self, text: &str) -> Option<String> {
        match self {
            Extract::AnswerTag(tag) => {
                let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
                let c = text.rfind(&close)?;
                let o = text[..c].rfind(&open)?;
                Some(text[o + open.len()..c].to_string())
            }
            Extract::LastNumber => extract_last_number(text),
            Extract::Boxed => last_boxed(text),
            Extract::Gsm8k => {
                let i = text.rfind("####")?;
                let rest = text[i + 4..].trim_start();
                let line = rest.lines().next().unwrap_or("").trim();
                (!line.is_empty()).then(|| line.to_string())
            }
            Extract::Regex(re) => {
                let caps = re.captures_iter(text).last()?;
                let m = caps.get(1).or_else(|| caps.get(0))?;
                Some(m.as_str().to_string())
            }
        }
    }
}

/// The last number in `text` (see `parse_number` for the forms). A `-` glued to a word or a
/// digit before it is subtraction, not a sign (`x-3`, `10-3`).
pub fn extract_last_number(text: &str) -> Option<String> {
    let text = text.replace('\u{2212}', "-");
    let m = number_re().find_iter(&text).last()?;
    let s = m.as_str();
    let glued = text[..m.start()]
        .chars()
        .last()
        .is_some_and(|c| c.is_alphanumeric() || c == ')');
    if glued && (s.starts_with('-') || s.starts_with('+')) {
        Some(s[1..].to_string())
    } else {
        Some(s.to_string())
    }
}

fn last_boxed(text: &str) -> Option<String> {
    let starts: Vec<usize> = text
        .match_indices("\\boxed{")
        .map(|(i, _)| i + "\\boxed{".len())
        .collect();
    for &start in starts.iter().rev() {
        let mut depth = 1usize;
        for (i, ch) in text[start..].char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(text[start..start + i].to_string());
                    }
                }
                _ => {}
            }
        }
    }
    None
}

/// Trim, unicode minus → `-`, drop `$`, one trailing `.`.
fn normalize_core(s: &str) -> String {
    let s = s.replace('\u{2212}', "-").replace('$', "");
    let s = s.trim();
    s.strip_suffix('.').unwrap_or(s).trim().to_string()
}

/// Text form used when either side is not a number: normalised, lowercase, single spaces.
pub fn normalize_text(s: &str) -> String {
    normalize_core(s)
        .to_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn parse_plain(s: &str) -> Option<f64> {
    static THOUSANDS: OnceLock<Regex> = OnceLock::new();
    static PLAIN: OnceLock<Regex> = OnceLock::new();
    let th = THOUSANDS
        .get_or_init(|| Regex::new(r"^[-+]?\d{1,3}(,\d{3})+(\.\d+)?$").expect("static regex"));
    let plain = PLAIN.get_or_init(|| {
        Regex::new(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$").expect("static regex")
    });
    let s = s.trim();
    let s = if th.is_match(s) {
        s.replace(',', "")
    } else {
        s.to_string()
    };
    if !plain.is_match(&s) {
        return None;
    }
    s.parse::<f64>().ok().filter(|x| x.is_finite())
}

/// A number in any of the forms answers come in, or None.
pub fn parse_number(s: &str) -> Option<f64> {
    static FRAC: OnceLock<Regex> = OnceLock::new();
    let frac = FRAC.get_or_init(|| {
        Regex::new(r"^([-+]?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$").expect("static regex")
    });
    let s = normalize_core(s);
    if let Some(c) = frac.captures(&s) {
        let (a, b) = (parse_plain(&c[2])?, parse_plain(&c[3])?);
        let sign = if &c[1] == "-" { -1.0 } else { 1.0 };
        return (b != 0.0).then(|| sign * a / b);
    }
    if let Some((a, b)) = s.split_once('/') {
        let (a, b) = (parse_plain(a)?, parse_plain(b)?);
        return (b != 0.0).then(|| a / b);
    }
    parse_plain(&s)
}

/// The row's accepted answers: None when the column is missing or null (not applicable).
fn references(row: &serde_json::Map<String, Value>, field: &str) -> Option<Vec<String>> {
    fn one(v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(match s.rfind("####") {
                Some(i) => s[i + 4..].trim().lines().next().unwrap_or("").to_string(),
                None => s.clone(),
            }),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }
    let refs: Vec<String> = match row.get(field)? {
        Value::Array(items) => items.iter().filter_map(one).collect(),
        v => one(v).into_iter().collect(),
    };
    (!refs.is_empty()).then_some(refs)
}

/// Are these the same answer (numerically when both are numbers)?
pub fn answers_match(pred: &str, reference: &str) -> bool {
    match (parse_number(pred), parse_number(reference)) {
        (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * b.abs().max(1.0),
        _ => normalize_text(pred) == normalize_text(reference),
    }
}

/// `answer_match`: 1.0 when the extracted answer equals one of the row's accepted answers.
///
/// Params: `extract` = "answer_tag" (default) | "last_number" | "boxed" | "gsm8k" | "regex";
/// `tag` (answer_tag only, default "answer"); `pattern` (regex only, required; first capture
/// group of the last match, or the whole match); `field` (row column, default "answer").
/// Scores: 1.0 / 0.0; nothing extracted ⇒ 0.0; column missing or null ⇒ None.
pub struct AnswerMatch {
    label: String,
    extract: Extract,
    field: String,
}

impl AnswerMatch {
    pub const PARAMS: &'static [&'static str] = EXTRACT_PARAMS;

    pub(crate) fn from_params(label: String, p: &Params) -> Result<Self, RewardError> {
        let (extract, field) = Extract::from_params(p)?;
        Ok(AnswerMatch {
            label,
            extract,
            field,
        })
    }

    pub fn new(extract: Extract, field: &str) -> Self {
        AnswerMatch {
            label: "answer_match".into(),
            extract,
            field: field.into(),
        }
    }

    pub fn score_one(&self, s: &Sample) -> Option<f64> {
        let refs = references(s.row, &self.field)?;
        let Some(pred) = self.extract.apply(s.completion) else {
            return Some(0.0);
        };
        Some(if refs.iter().any(|r| answers_match(&pred, r)) {
            1.0
        } else {
            0.0
        })
    }
}

impl Reward for AnswerMatch {
    fn name(&self) -> &str {
        &self.label
    }
    fn score(&self, samples: &[Sample]) -> Vec<Option<f64>> {
        samples.iter().map(|s| self.score_one(s)).collect()
    }
}

/// `numeric_closeness`: graded credit for getting near the row's number.
///
/// Params: the same `extract` / `tag` / `pattern` / `field` as `answer_match`; `tolerance`
/// (relative, default 0.0); `abs_tolerance` (default 1e-9). Scores: 1.0 within a tolerance,
/// else 0.5·max(0, 1 − |p−a|/max(|a|,1)); no number ⇒ 0.0; missing or non-numeric reference
/// ⇒ None.
pub struct NumericCloseness {
    label: String,
    extract: Extract,
    field: String,
    tolerance: f64,
    abs_tolerance: f64,
}

impl NumericCloseness {
    pub const PARAMS: &'static [&'static str] = &[
        "extract",
        "pattern",
        "tag",
        "field",
        "tolerance",
        "abs_tolerance",
    ];

    pub(crate) fn from_params(label: String, p: &Params) -> Result<Self, RewardError> {
        let (extract, field) = Extract::from_params(p)?;
        let tolerance = p.non_negative("tolerance")?.unwrap_or(0.0);
        let abs_tolerance = p.non_negative("abs_tolerance")?.unwrap_or(1e-9);
        Ok(NumericCloseness {
            label,
            extract,
            field,
            tolerance,
            abs_tolerance,
        })
    }

    pub fn score_one(&self, s: &Sample) -> Option<f64> {
        let refs = references(s.row, &self.field)?;
        let a = refs.iter().find_map(|r| parse_number(r))?;
        let Some(text) = self.extract.apply(s.completion) else {
            return Some(0.0);
        };
        let Some(p) = parse_number(&text)
            .or_else(|| extract_last_number(&text).and_then(|n| parse_number(&n)))
        else {
            return Some(0.0);
        };
        let err = (p - a).abs();
        let rel = err / a.abs().max(1.0);
        if err <= self.abs_tolerance || rel <= self.tolerance {
            return Some(1.0);
        }
        Some(0.5 * (1.0 - rel).max(0.0))
    }
}

impl Reward for NumericCloseness {
    fn name(&self) -> &str {
        &self.label
    }
    fn score(&self, samples: &[Sample]) -> Vec<Option<f64>> {
        samples.iter().map(|s| self.score_one(s)).collect()
    }
}
