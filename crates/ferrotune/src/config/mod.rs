//! Run configuration: the TOML file (`ferrotune train --config run.toml`), `--set key=value`
//! overrides, unknown-key rejection, relative paths resolved against the file, and the method
//! the config runs. The resolved config is what the run folder records.
//!
//! Split by concern: `sections.rs` (the schema: one struct per section, each key's type and
//! default), `explain.rs` (each key's documented default and meaning, checked against the
//! schema), `validate.rs` (each section's rules and the cross-field ones), this file (loading).
//!
//! Names follow Hugging Face / TRL where one exists (`learning_rate`, `lr_scheduler_type`,
//! `gradient_accumulation_steps`, `max_grad_norm`, PEFT's `r`, `lora_alpha`, `target_modules`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

mod explain;
mod pretrain;
mod sections;
#[cfg(test)]
mod tests;
mod validate;
pub(crate) use validate::{check_choices, Refusal};

pub use explain::{explain, KEYS};
pub use pretrain::*;
pub use sections::*;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Parse { path: PathBuf, msg: String },
    #[error("--set {arg}: {msg}")]
    Set { arg: String, msg: String },
    #[error("{path}: {field}: {msg}")]
    Invalid {
        path: PathBuf,
        field: String,
        msg: String,
    },
}

/// Apply `key=value` overrides to a parsed TOML table. The value is parsed as a TOML value,
/// falling back to a plain string (so `--set model.path=dir` works unquoted).
pub fn apply_set(table: &mut toml::Table, arg: &str) -> Result<(), ConfigError> {
    let err = |msg: &str| ConfigError::Set {
        arg: arg.to_string(),
        msg: msg.to_string(),
    };
    let (key, raw) = arg
        .split_once('=')
        .ok_or_else(|| err("expected key=value"))?;
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(err("empty key component"));
    }
    let mut t = table;
    for p in &parts[..parts.len() - 1] {
        t = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| err(&format!("`{p}` is not a section")))?;
    }
    t.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

impl RunConfig {
    /// Read a TOML file, apply overrides, deserialize (unknown keys are errors) and validate.
    /// Relative paths in the file are resolved against the file's folder.
    pub fn load(path: &Path, sets: &[String]) -> Result<Self, ConfigError> {
        let table = read_table(path, sets)?;
        Self::from_table(table, path)
    }

    /// [`RunConfig::load`] of an already parsed (and overridden) TOML table; `path` is the file
    /// it came from (relative paths are resolved against its folder).
    pub fn from_table(table: toml::Table, path: &Path) -> Result<Self, ConfigError> {
        validate::check_choices(&table).map_err(|r| r.at(path))?;
        let mut cfg: RunConfig = RunConfig::deserialize(table).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            msg: one_line(&e.to_string()),
        })?;
        // Relative paths are relative to the config file; the resolved config (written to the
        // run folder) holds absolute ones, so `--resume` reads the same files from anywhere.
        let base = base_of(path);
        for p in [
            &mut cfg.model.path,
            &mut cfg.data.train,
            &mut cfg.run.output_dir,
        ] {
            *p = normalize(&base.join(&*p));
        }
        if let Some(e) = cfg.data.eval.as_mut() {
            *e = normalize(&base.join(&*e));
        }
        if let Some(t) = cfg.model.chat_template.as_mut() {
            *t = normalize(&base.join(&*t));
        }
        if let Some(f) = cfg.eval.as_mut().and_then(|e| e.forget_set.as_mut()) {
            *f = normalize(&base.join(&*f));
        }
        if let Some(d) = cfg.distill.as_mut() {
            d.teacher = normalize(&base.join(&d.teacher));
            if let Some(c) = d.teacher_cache.as_mut() {
                *c = normalize(&base.join(&*c));
            }
        }
        if let Some(r) = cfg.dpo.as_mut().and_then(|d| d.ref_model.as_mut()) {
            *r = normalize(&base.join(&*r));
        }
        if let Some(g) = cfg.grpo.as_mut() {
            resolve_reward_paths(&mut g.rewards, &base);
        }
        if let Some(p) = cfg.ppo.as_mut() {
            if let Some(r) = p.reward_model_path.as_mut() {
                *r = normalize(&base.join(&*r));
            }
            resolve_reward_paths(&mut p.rewards, &base);
        }
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// The training method this config runs (`validate` checks there is exactly one section).
    pub fn method(&self) -> Method {
        if self.reward_model.is_some() {
            Method::RewardModel
        } else if self.distill.is_some() {
            Method::Distill
        } else if self.dpo.is_some() {
            Method::Dpo
        } else if self.ppo.is_some() {
            Method::Ppo
        } else if self.grpo.is_some() {
            Method::Grpo
        } else {
            Method::Sft
        }
    }

    /// The resolved config as TOML (written to the run folder).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

/// The `path` of each `name = "model"` reward entry, made absolute against `base` (the config
/// file's folder) like every other path of the config.
pub fn resolve_reward_paths(rewards: &mut [toml::Table], base: &Path) {
    for r in rewards {
        if r.get("name").and_then(|v| v.as_str()) != Some("model") {
            continue;
        }
        if let Some(toml::Value::String(p)) = r.get_mut("path") {
            *p = normalize(&base.join(&*p)).display().to_string();
        }
    }
}

/// Lexically remove `.` and `..` components (no file system access).
pub(crate) fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A config file as a TOML table with the `--set key=value` overrides applied (shared by run
/// and pretrain configs).
pub fn read_table(path: &Path, sets: &[String]) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        msg: one_line(&e.to_string()),
    })?;
    for s in sets {
        apply_set(&mut table, s)?;
    }
    Ok(table)
}

/// The folder relative paths of config file `path` are resolved against (absolute).
pub(crate) fn base_of(path: &Path) -> PathBuf {
    std::path::absolute(path.parent().unwrap_or(Path::new(".")))
        .unwrap_or_else(|_| PathBuf::from("."))
}
