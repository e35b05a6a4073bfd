//! Tools a policy may call inside a GRPO rollout (multi-turn tool use): the built-in
//! `calculator` and user programs (`command`, run in the sandbox like the `command` reward),
//! each with the JSON schema a chat template lists under `tools` (transformers' format).
//!
//! Protocol of a `command` tool: the call's arguments as one JSON object on stdin; whatever the
//! program prints on stdout (trimmed, at most [`MAX_REPLY`] bytes) is the tool's reply. A
//! non-zero exit, a timeout or a crash is an error reply. Every failure — unknown tool, bad
//! arguments, a program that fails — is an `Err(reason)` the rollout writes into the
//! transcript as the tool's reply (`{"error": ...}`), so the model sees it and the run goes on.
//!
//! Owns: tool specs, argument checks, running calls. Does not own: parsing calls out of model
//! text or rendering replies (`ferrotune-tokenize`), or the rollout loop (`ferrotune-train`).

use std::ffi::OsString;
use std::time::Duration;

use serde_json::{json, Value};

use crate::command::resolve_command;
use crate::sandbox::{Sandbox, SandboxSpec};
use crate::RewardError;

/// Longest tool reply kept (bytes); longer replies are cut and say so.
pub const MAX_REPLY: usize = 2000;
/// Longest calculator expression accepted (characters).
const MAX_EXPRESSION: usize = 200;
/// Deepest parenthesis nesting the calculator accepts.
const MAX_DEPTH: usize = 32;

/// One tool of a run.
pub trait Tool: Send + Sync {
    fn name(&self) -> &str;
    /// `{"type": "function", "function": {"name", "description", "parameters"}}`.
    fn schema(&self) -> Value;
    /// Run one call; `Err(reason)` is answered to the model as an error.
    fn call(&self, arguments: &Value) -> Result<String, String>;
}

/// A `[[grpo.tools]]` entry.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolSpec {
    /// `calculator`, or any name for a `cmd` tool.
    pub name: String,
    /// A user program (list of strings; a `python*` first element is the real interpreter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// What the template shows the model (required for a `cmd` tool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON schema of the arguments (required for a `cmd` tool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// `cmd` tools: wall-clock limit per call, seconds.
    #[serde(default = "d_timeout")]
    pub timeout_s: f64,
    /// `cmd` tools: address-space limit, MiB.
    #[serde(default = "d_memory")]
    pub memory_mb: u64,
}

fn d_timeout() -> f64 {
    10.0
}
fn d_memory() -> u64 {
    512
}

/// The tools of a run, in config order.
pub struct ToolSet {
    tools: Vec<Box<dyn Tool>>,
}

impl std::fmt::Debug for ToolSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl ToolSet {
    /// Build from config entries; errors name the entry and the key.
    pub fn from_specs(specs: &[ToolSpec]) -> Result<ToolSet, RewardError> {
        let mut tools: Vec<Box<dyn Tool>> = Vec::new();
        for (i, s) in specs.iter().enumerate() {
            let bad = |key: &str, reason: String| RewardError::InvalidParam {
                reward: format!("grpo.tools[{i}] ({})", s.name),
                key: key.into(),
                reason,
            };
            if tools.iter().any(|t| t.name() == s.name) {
                return Err(bad("name", "appears twice".into()));
            }
            match (&s.cmd, s.name.as_str()) {
                (None, "calculator") => {
                    if s.description.is_some() || s.parameters.is_some() {
                        return Err(bad(
                            "description",
                            "the built-in calculator has its own description and parameters"
                                .into(),
                        ));
                    }
                    tools.push(Box::new(Calculator));
                }
                (None, other) => {
                    return Err(bad(
                        "cmd",
                        format!("`{other}` is not a built-in tool (built-in: calculator); give `cmd` to run a program"),
                    ))
                }
                (Some(cmd), _) => tools.push(Box::new(CommandTool::new(s, cmd).map_err(
                    |(key, reason)| bad(key, reason),
                )?)),
            }
        }
        Ok(ToolSet { tools })
    }

    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }

    pub fn names(&self) -> Vec<&str> {
        self.tools.iter().map(|t| t.name()).collect()
    }

    /// The `tools` list a chat template renders.
    pub fn schemas(&self) -> Value {
        Value::Array(self.tools.iter().map(|t| t.schema()).collect())
    }

    /// Run a call by name; an unknown name is an error reply naming the tools there are.
    pub fn call(&self, name: &str, arguments: &Value) -> Result<String, String> {
        let tool = self
            .tools
            .iter()
            .find(|t| t.name() == name)
            .ok_or_else(|| {
                format!(
                    "unknown tool `{name}` (available: {})",
                    self.names().join(", ")
                )
            })?;
        let reply = tool.call(arguments)?;
        Ok(cap(reply.trim()))
    }
}

fn cap(s: &str) -> String {
    if s.len() <= MAX_REPLY {
        return s.to_string();
    }
    let mut end = MAX_REPLY;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... [cut at {MAX_REPLY} bytes]", &s[..end])
}

/// `calculator(expression)`: + − × ÷ and parentheses on decimal numbers, evaluated in f64;
/// integral results print without a fraction (`5535`, not `5535.0`).
pub struct Calculator;

impl Tool for Calculator {
    fn name(&self) -> &str {
        "calculator"
    }
    fn schema(&self) -> Value {
        json!({
            "type": "function",
            "function": {
                "name": "calculator",
                "description": "Evaluate an arithmetic expression with + - * / and parentheses.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "expression": {"type": "string", "description": "e.g. 123 * 45"}
                    },
                    "required": ["expression"]
                }
            }
        })
    }
    fn call(&self, arguments: &Value) -> Result<String, String> {
        let expr = arguments
            .get("expression")
            .and_then(Value::as_str)
            .ok_or_else(|| "calculator needs {\"expression\": \"<string>\"}".to_string())?;
        evaluate(expr).map(format_number)
    }
}

fn format_number(x: f64) -> String {
    if x == x.trunc() && x.abs() < 9.007_199_254_740_992e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

/// Evaluates `expr` (see [`Calculator`]); every failure is a one-line reason.
pub fn evaluate(expr: &str) -> Result<f64, String> {
    if expr.chars().count() > MAX_EXPRESSION {
        return Err(format!(
            "expression longer than {MAX_EXPRESSION} characters"
        ));
    }
    let mut p = Parser {
        s: expr.as_bytes(),
        i: 0,
        depth: 0,
    };
    let v = p.sum()?;
    p.skip_ws();
    if p.i != p.s.len() {
        return Err(format!(
            "unexpected `{}` at position {}",
            expr[p.i..].chars().next().unwrap_or(' '),
            p.i
        ));
    }
    if !v.is_finite() {
        return Err("the result is not a finite number".into());
    }
    Ok(v)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    depth: usize,
}

impl Parser<'_> {
    fn skip_ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.i).copied()
    }
    fn sum(&mut self) -> Result<f64, String> {
        let mut v = self.product()?;
        while let Some(op @ (b'+' | b'-')) = self.peek() {
            self.i += 1;
            let r = self.product()?;
            v = if op == b'+' { v + r } else { v - r };
        }
        Ok(v)
    }
    fn product(&mut self) -> Result<f64, String> {
        let mut v = self.unary()?;
        while let Some(op @ (b'*' | b'/' | b'x' | b'\xc3')) = self.peek() {
            // `×` is 0xC3 0x97 in UTF-8; `x` between numbers is read as times too.
            if op == b'\xc3' {
                if self.s.get(self.i + 1) != Some(&0x97) {
                    break;
                }
                self.i += 1;
            }
            self.i += 1;
            let r = self.unary()?;
            v = if op == b'/' {
                if r == 0.0 {
                    return Err("division by zero".into());
                }
                v / r
            } else {
                v * r
            };
        }
        Ok(v)
    }
    fn unary(&mut self) -> Result<f64, String> {
        match self.peek() {
            Some(b'-') => {
                self.i += 1;
                self.descend(|p| p.unary()).map(|v| -v)
            }
            Some(b'+') => {
                self.i += 1;
                self.descend(|p| p.unary())
            }
            _ => self.atom(),
        }
    }
    fn descend(&mut self, f: impl FnOnce(&mut Self) -> Result<f64, String>) -> Result<f64, String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(format!("nested deeper than {MAX_DEPTH}"));
        }
        let v = f(self);
        self.depth -= 1;
        v
    }
    fn atom(&mut self) -> Result<f64, String> {
        match self.peek() {
            Some(b'(') => {
                self.i += 1;
                let v = self.descend(|p| p.sum())?;
                if self.peek() != Some(b')') {
                    return Err("missing `)`".into());
                }
                self.i += 1;
                Ok(v)
            }
            Some(c) if c.is_ascii_digit() || c == b'.' => {
                let start = self.i;
                while self.i < self.s.len()
                    && (self.s[self.i].is_ascii_digit()
                        || self.s[self.i] == b'.'
                        || self.s[self.i] == b'_')
                {
                    self.i += 1;
                }
                let text: String = std::str::from_utf8(&self.s[start..self.i])
                    .unwrap_or("")
                    .replace('_', "");
                text.parse::<f64>()
                    .map_err(|_| format!("`{text}` is not a number"))
            }
            Some(_) => Err(format!(
                "unexpected `{}` at position {} (numbers, + - * / and parentheses only)",
                String::from_utf8_lossy(&self.s[self.i..(self.i + 1).min(self.s.len())]),
                self.i
            )),
            None => Err("the expression ends too early".into()),
        }
    }
}

/// A user program as a tool (see the module docs for the protocol).
pub struct CommandTool {
    name: String,
    description: String,
    parameters: Value,
    argv: Vec<OsString>,
    sandbox: Sandbox,
}

impl CommandTool {
    fn new(s: &ToolSpec, cmd: &[String]) -> Result<CommandTool, (&'static str, String)> {
        let description = s.description.clone().ok_or((
            "description",
            "is required for a `cmd` tool (the model reads it)".to_string(),
        ))?;
        let parameters = s.parameters.clone().ok_or((
            "parameters",
            "is required for a `cmd` tool: the JSON schema of its arguments, e.g. { type = \"object\", properties = { q = { type = \"string\" } } }".to_string(),
        ))?;
        if !parameters.is_object() {
            return Err((
                "parameters",
                "must be a table (a JSON schema object)".into(),
            ));
        }
        if !(s.timeout_s > 0.0 && s.timeout_s <= 600.0) {
            return Err((
                "timeout_s",
                format!("must be in (0, 600], got {}", s.timeout_s),
            ));
        }
        if s.memory_mb < 32 {
            return Err((
                "memory_mb",
                format!("{} MiB is too little (>= 32)", s.memory_mb),
            ));
        }
        let (argv, read_paths) = resolve_command(cmd).map_err(|r| ("cmd", r))?;
        let spec = SandboxSpec {
            timeout: Duration::from_secs_f64(s.timeout_s),
            memory_mb: s.memory_mb,
            read_paths,
            output_cap: 64 << 10,
            ..SandboxSpec::default()
        };
        let sandbox = Sandbox::new(spec).map_err(|e| ("cmd", e.to_string()))?;
        Ok(CommandTool {
            name: s.name.clone(),
            description,
            parameters,
            argv,
            sandbox,
        })
    }
}

impl Tool for CommandTool {
    fn name(&self) -> &str {
        &self.name
    }
    fn schema(&self) -> Value {
        json!({
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            }
        })
    }
    fn call(&self, arguments: &Value) -> Result<String, String> {
        let input = serde_json::to_vec(arguments).map_err(|e| e.to_string())?;
        let out = self
            .sandbox
            .run(&self.argv, &input, &[])
            .map_err(|e| format!("tool `{}` could not run: {e}", self.name))?;
        if !out.success() {
            return Err(format!("tool `{}` failed: {}", self.name, out.reason()));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
