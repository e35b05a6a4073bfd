//! The `rewards` room: pure reward functions over (prompt, completion, dataset row), a registry
//! that builds them by name from the TOML config, weights, and a sandbox for running
//! model-written code.
//!
//! Owns: `Reward`, `RewardSpec` → `build`, `RewardSet` (weighted sum, TRL semantics: a `None`
//! score counts 0 in the total, like `nansum`), and the reward functions (one file each family).
//! Does not own: tensors, advantages or logging (the trainer), reading datasets (`data`).
//!
//! Config shape: `rewards = [{ name = "format_tags", weight = 1.0, tags = ["answer"] }, ...]`;
//! `name` picks the function, `weight` defaults to 1.0, `label` overrides the log key (so one
//! function can appear twice), every other key is a parameter of that function (unknown keys are
//! errors).

mod answer;
mod code;
mod command;
mod format;
mod length;
mod params;
pub mod sandbox;
pub mod tools;

pub use answer::{
    answers_match, extract_last_number, normalize_text, parse_number, AnswerMatch, Extract,
    NumericCloseness,
};
pub use code::{extract_code, CodeTests};
pub use command::CommandReward;
pub use format::FormatTags;
pub use length::LengthPenalty;
use params::Params;
pub use sandbox::{End, Outcome, Sandbox, SandboxError, SandboxSpec};

use serde::Deserialize;

/// One completion to score.
#[derive(Clone, Copy, Debug)]
pub struct Sample<'a> {
    /// The prompt as text (chat prompts: the rendered text).
    pub prompt: &'a str,
    /// Decoded completion text (special tokens skipped).
    pub completion: &'a str,
    /// Its length in tokens.
    pub completion_tokens: usize,
    /// Every dataset column of the row (including `answer`).
    pub row: &'a serde_json::Map<String, serde_json::Value>,
}

/// Why a reward could not judge a sample (its score is then 0.0): a user scorer that crashed,
/// a sandbox that could not start. Not "the model's code failed its tests" — that is a score.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    pub sample: usize,
    pub reason: String,
}

/// Scores plus failures of one call.
#[derive(Clone, Debug, Default)]
pub struct Scores {
    pub values: Vec<Option<f64>>,
    pub failures: Vec<Failure>,
}

pub trait Reward: Send + Sync {
    /// The log key, e.g. "format_tags" (the spec's `label` when given).
    fn name(&self) -> &str;
    /// One score per sample; None = not applicable to that sample (TRL's None).
    fn score(&self, samples: &[Sample]) -> Vec<Option<f64>>;
    /// `score` plus the samples the reward could not judge. Rewards that run programs override
    /// it; pure text rewards never fail.
    fn score_detailed(&self, samples: &[Sample]) -> Scores {
        Scores {
            values: self.score(samples),
            failures: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    #[error("unknown reward `{name}` (known: {known})")]
    UnknownReward { name: String, known: String },
    #[error("reward `{reward}`: unknown parameter `{key}` (allowed: {allowed})")]
    UnknownParam {
        reward: String,
        key: String,
        allowed: String,
    },
    #[error("reward `{reward}`: parameter `{key}` must be {expected}, found {found}")]
    ParamType {
        reward: String,
        key: String,
        expected: String,
        found: String,
    },
    #[error("reward `{reward}`: missing required parameter `{key}` ({hint})")]
    MissingParam {
        reward: String,
        key: String,
        hint: String,
    },
    #[error("reward `{reward}`: parameter `{key}`: {reason}")]
    InvalidParam {
        reward: String,
        key: String,
        reason: String,
    },
    #[error("reward `{reward}`: `weight` must be a finite number, got {weight}")]
    BadWeight { reward: String, weight: f64 },
    #[error("reward log key `{0}` appears twice; give one of them a different `label`")]
    DuplicateLabel(String),
    #[error(
        "no rewards configured: add `rewards = [{{ name = \"...\" }}]` (see `--explain rewards`)"
    )]
    Empty,
    #[error("reward `{reward}`: {source}")]
    Sandbox {
        reward: String,
        source: SandboxError,
    },
}

fn one() -> f64 {
    1.0
}

/// One entry of `rewards = [...]`.
#[derive(Clone, Debug, Deserialize)]
pub struct RewardSpec {
    pub name: String,
    #[serde(default = "one")]
    pub weight: f64,
    pub label: Option<String>,
    #[serde(flatten)]
    pub params: toml::Table,
}

impl RewardSpec {
    /// A spec with default weight and no parameters (for code that builds configs).
    pub fn new(name: &str) -> Self {
        RewardSpec {
            name: name.into(),
            weight: 1.0,
            label: None,
            params: toml::Table::new(),
        }
    }
    /// The log key: `label`, else `name`.
    pub fn key(&self) -> &str {
        self.label.as_deref().unwrap_or(&self.name)
    }
}

const AVAILABLE: &[(&str, &str)] = &[
    ("format_tags", "fraction of `tags` (default [\"reasoning\", \"answer\"]) present once each as <t>…</t>, in order; mode = \"strict\" gives 1.0 only for nothing but the tags (else half the soft credit)"),
    ("answer_match", "1.0 if the extracted answer equals the row's `field` (default \"answer\"); extract = answer_tag | last_number | boxed | gsm8k | regex (with `pattern`); numbers compared numerically"),
    ("numeric_closeness", "1.0 within `tolerance` (relative, default 0) / `abs_tolerance` (default 1e-9) of the row's number, else 0.5·max(0, 1 − |p−a|/max(|a|,1)); same `extract`/`field` as answer_match"),
    ("length", "DAPO soft overlong punishment on completion tokens: 0 up to `max_len` − `buffer`, linear to −1 at `max_len`, −1 beyond (both required)"),
    ("code_tests", "runs the last ```python block against the row's tests (HumanEval `test`+`entry_point`, or MBPP `test_list`) in the sandbox: 1.0 pass, 0.0 fail/timeout; `partial` = fraction of asserts; `timeout_s` 5, `memory_mb` 512, `python`"),
    ("command", "a user program `cmd` reads {\"prompt\",\"completion\",\"completion_tokens\",\"row\"} as JSON on stdin and prints a number (or null) as its last line; runs in the sandbox; `timeout_s` 10, `memory_mb` 1024, `read_paths`"),
];

/// (name, one-line description) of every reward, for `--explain`.
pub fn available() -> &'static [(&'static str, &'static str)] {
    AVAILABLE
}

/// Build one reward from its config entry. Unknown name, unknown or ill-typed parameter ⇒ a
/// one-line error naming the reward and the key.
pub fn build(spec: &RewardSpec) -> Result<Box<dyn Reward>, RewardError> {
    let label = spec.key().to_string();
    let name = spec.name.as_str();
    let p = |allowed: &[&str]| Params::new(name, &spec.params, allowed);
    Ok(match name {
        "format_tags" => Box::new(FormatTags::from_params(label, &p(FormatTags::PARAMS)?)?),
        "answer_match" => Box::new(AnswerMatch::from_params(label, &p(AnswerMatch::PARAMS)?)?),
        "numeric_closeness" => Box::new(NumericCloseness::from_params(
            label,
            &p(NumericCloseness::PARAMS)?,
        )?),
        "length" => Box::new(LengthPenalty::from_params(
            label,
            &p(LengthPenalty::PARAMS)?,
        )?),
        "code_tests" => Box::new(CodeTests::from_params(label, &p(CodeTests::PARAMS)?)?),
        "command" => Box::new(CommandReward::from_params(
            label,
            &p(CommandReward::PARAMS)?,
        )?),
        _ => {
            let known = AVAILABLE
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ");
            return Err(RewardError::UnknownReward {
                name: name.into(),
                known,
            });
        }
    })
}

/// The configured rewards with their weights.
pub struct RewardSet {
    rewards: Vec<Box<dyn Reward>>,
    weights: Vec<f64>,
}

/// Result of `RewardSet::score`: `per_reward[k][i]` is reward k on sample i.
#[derive(Clone, Debug)]
pub struct Scored {
    pub per_reward: Vec<Vec<Option<f64>>>,
    /// total[i] = Σ_k weight_k · score_k[i] over the Some scores (None counts 0, TRL's nansum).
    pub total: Vec<f64>,
    /// failures[k]: samples reward k could not judge (scored 0.0), for the trainer's log.
    pub failures: Vec<Vec<Failure>>,
}

impl RewardSet {
    pub fn from_specs(specs: &[RewardSpec]) -> Result<Self, RewardError> {
        let mut parts = Vec::with_capacity(specs.len());
        for spec in specs {
            if !spec.weight.is_finite() {
                return Err(RewardError::BadWeight {
                    reward: spec.name.clone(),
                    weight: spec.weight,
                });
            }
            parts.push((build(spec)?, spec.weight));
        }
        Self::from_parts(parts)
    }

    /// From already-built rewards (custom rewards written in Rust).
    pub fn from_parts(parts: Vec<(Box<dyn Reward>, f64)>) -> Result<Self, RewardError> {
        if parts.is_empty() {
            return Err(RewardError::Empty);
        }
        let mut seen = std::collections::HashSet::new();
        for (r, _) in &parts {
            if !seen.insert(r.name().to_string()) {
                return Err(RewardError::DuplicateLabel(r.name().to_string()));
            }
        }
        let (rewards, weights) = parts.into_iter().unzip();
        Ok(RewardSet { rewards, weights })
    }

    pub fn labels(&self) -> Vec<String> {
        self.rewards.iter().map(|r| r.name().to_string()).collect()
    }

    pub fn weights(&self) -> Vec<f64> {
        self.weights.clone()
    }

    /// Every reward on every sample, and the weighted total.
    pub fn score(&self, samples: &[Sample]) -> Scored {
        let mut total = vec![0.0; samples.len()];
        let mut per_reward = Vec::with_capacity(self.rewards.len());
        let mut failures = Vec::with_capacity(self.rewards.len());
        for (reward, &w) in self.rewards.iter().zip(&self.weights) {
            let mut s = reward.score_detailed(samples);
            // A reward returning the wrong count is a bug in that reward; pad/truncate so the
            // trainer never indexes out of bounds, and say so.
            if s.values.len() != samples.len() {
                s.failures.push(Failure {
                    sample: 0,
                    reason: format!(
                        "reward returned {} scores for {} samples",
                        s.values.len(),
                        samples.len()
                    ),
                });
                s.values.resize(samples.len(), None);
            }
            for (t, v) in total.iter_mut().zip(&s.values) {
                if let Some(v) = v {
                    if v.is_finite() {
                        *t += w * v;
                    }
                }
            }
            per_reward.push(s.values);
            failures.push(s.failures);
        }
        Scored {
            per_reward,
            total,
            failures,
        }
    }
}

/// Map `f` over `0..n` on at most `workers` std threads (0 = available_parallelism), results in
/// order. Used by the rewards that run programs.
pub(crate) fn parallel_map<T: Send, F: Fn(usize) -> T + Sync>(
    n: usize,
    workers: usize,
    f: F,
) -> Vec<T> {
    let auto = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let workers = if workers == 0 {
        auto
    } else {
        workers.min(auto)
    }
    .clamp(1, n.max(1));
    if workers == 1 || n <= 1 {
        return (0..n).map(f).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    let results = std::sync::Mutex::new(&mut out);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let v = f(i);
                if let Ok(mut r) = results.lock() {
                    r[i] = Some(v);
                }
            });
        }
    });
    out.into_iter()
        .map(|v| v.expect("every index is filled by exactly one worker"))
        .collect()
}
