//! `command`: a reward computed by a user program, run in the sandbox.
//!
//! Owns: resolving `cmd`, the stdin/stdout protocol and turning failures into 0.0 + a recorded
//! reason. Does not own: the confinement (`sandbox.rs`).
//!
//! Protocol: the program gets `{"prompt": …, "completion": …, "completion_tokens": …, "row": {…}}`
//! as JSON on stdin and prints its score as the last non-empty line of stdout: a number, or
//! `null` (also `None`) for "not applicable". Non-zero exit, timeout, output that is not a
//! number ⇒ 0.0 and a `Failure` (see `Scores::failures`) so the trainer can log how many failed.
//!
//! What the program may touch: the same sandbox as model code (no network, limits, a private
//! writable folder as cwd). It may read and execute the system folders, its interpreter, every
//! argument of `cmd` that names an existing file or folder (relative ones are resolved against
//! the trainer's working directory at config time and passed as absolute paths, since the
//! program's cwd is the private folder), and the folders listed in `read_paths`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::params::Params;
use crate::sandbox::{resolve_python, Sandbox, SandboxError, SandboxSpec};
use crate::{parallel_map, Failure, Reward, RewardError, Sample, Scores};

/// `command`: a user scorer program (see the module doc for the protocol).
///
/// Params: `cmd` (required, list of strings; a `python*` first element is resolved to the real
/// interpreter), `timeout_s` (default 10), `memory_mb` (default 1024), `read_paths` (extra
/// folders the program may read), `workers` (default 0 = one per core). Failures score 0.0
/// and are reported in `Scores::failures`.
pub struct CommandReward {
    label: String,
    argv: Vec<OsString>,
    sandbox: Sandbox,
    workers: usize,
}

/// `cmd` as the sandbox runs it: argv[0] resolved to an absolute path (a `python*` name to the
/// real interpreter, past pyenv shims), every later argument that names an existing file made
/// absolute (the program's cwd is its private folder), and the paths it must be allowed to
/// read. Err is a one-line reason.
pub(crate) fn resolve_command(cmd: &[String]) -> Result<(Vec<OsString>, Vec<PathBuf>), String> {
    let Some(first) = cmd.first() else {
        return Err("is empty".into());
    };
    let exe = if first.contains('/') {
        std::fs::canonicalize(first).map_err(|e| format!("{first}: {e}"))?
    } else {
        find_on_path(first).ok_or_else(|| format!("`{first}` is not on PATH"))?
    };
    let is_python = Path::new(first)
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("python"));
    let mut read_paths = Vec::new();
    let mut argv: Vec<OsString> = Vec::with_capacity(cmd.len());
    if is_python {
        // A pyenv shim is a bash script that needs half of $PYENV_ROOT: run the real binary.
        let info = resolve_python(first).map_err(|e| e.to_string())?;
        read_paths.extend(info.roots);
        argv.push(info.executable.into());
    } else {
        let exe = std::fs::canonicalize(&exe).map_err(|e| format!("{}: {e}", exe.display()))?;
        read_paths.push(exe.clone());
        argv.push(exe.into());
    }
    for arg in &cmd[1..] {
        match std::fs::canonicalize(arg) {
            Ok(abs) if !arg.starts_with('-') => {
                read_paths.push(abs.clone());
                argv.push(abs.into());
            }
            _ => argv.push(arg.into()),
        }
    }
    Ok((argv, read_paths))
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

impl CommandReward {
    pub const PARAMS: &'static [&'static str] =
        &["cmd", "timeout_s", "memory_mb", "read_paths", "workers"];

    /// Build from a config entry whose `name` is this reward (the registry's `build` returns
    /// a trait object; this gives the concrete type, e.g. to inspect outcomes in eval).
    pub fn from_spec(spec: &crate::RewardSpec) -> Result<Self, RewardError> {
        Self::from_params(
            spec.key().to_string(),
            &Params::new(&spec.name, &spec.params, Self::PARAMS)?,
        )
    }

    pub(crate) fn from_params(label: String, p: &Params) -> Result<Self, RewardError> {
        let cmd = p
            .str_list("cmd")?
            .ok_or_else(|| p.missing("cmd", "e.g. cmd = [\"python3\", \"score.py\"]"))?;
        if cmd.is_empty() {
            return Err(p.invalid("cmd", "is empty"));
        }
        let timeout = p.non_negative("timeout_s")?.unwrap_or(10.0);
        if !(timeout > 0.0 && timeout <= 3600.0) {
            return Err(p.invalid("timeout_s", format!("must be in (0, 3600], got {timeout}")));
        }
        let memory_mb = p.u64("memory_mb")?.unwrap_or(1024);
        if memory_mb < 32 {
            return Err(p.invalid(
                "memory_mb",
                format!("{memory_mb} MiB is too little (>= 32)"),
            ));
        }
        let workers = p.u64("workers")?.unwrap_or(0) as usize;
        let mut read_paths = Vec::new();
        for rp in p.str_list("read_paths")?.unwrap_or_default() {
            let c = std::fs::canonicalize(&rp)
                .map_err(|e| p.invalid("read_paths", format!("{rp}: {e}")))?;
            read_paths.push(c);
        }
        let (argv, exe_paths) = resolve_command(&cmd).map_err(|r| p.invalid("cmd", r))?;
        read_paths.extend(exe_paths);
        let spec = SandboxSpec {
            timeout: Duration::from_secs_f64(timeout),
            memory_mb,
            read_paths,
            ..SandboxSpec::default()
        };
        let sandbox = Sandbox::new(spec).map_err(|source| RewardError::Sandbox {
            reward: p.reward().into(),
            source,
        })?;
        Ok(CommandReward {
            label,
            argv,
            sandbox,
            workers,
        })
    }

    /// Score one sample; Err(reason) when the program failed.
    pub fn judge(&self, s: &Sample) -> Result<Option<f64>, String> {
        let input = serde_json::json!({
            "prompt": s.prompt,
            "completion": s.completion,
            "completion_tokens": s.completion_tokens,
            "row": s.row,
        });
        let input =
            serde_json::to_vec(&input).map_err(|e| format!("cannot encode the sample: {e}"))?;
        let outcome = self
            .sandbox
            .run(&self.argv, &input, &[])
            .map_err(|e: SandboxError| e.to_string())?;
        if !outcome.success() {
            return Err(format!("scorer failed: {}", outcome.reason()));
        }
        let text = String::from_utf8_lossy(&outcome.stdout);
        let last = text
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("");
        if last == "null" || last == "None" {
            return Ok(None);
        }
        match last.parse::<f64>() {
            Ok(x) if x.is_finite() => Ok(Some(x)),
            _ => Err(format!(
                "scorer printed {:?}, not a number",
                last.chars().take(80).collect::<String>()
            )),
        }
    }
}

impl Reward for CommandReward {
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
                Ok(v) => out.values.push(v),
                Err(reason) => {
                    out.values.push(Some(0.0));
                    out.failures.push(Failure { sample: i, reason });
                }
            }
        }
        out
    }
}
