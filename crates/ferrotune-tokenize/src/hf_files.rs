//! Reading the small JSON/Jinja files of a Hugging Face model folder that sit beside
//! `tokenizer.json`: `tokenizer_config.json` (special tokens, `add_bos_token`, `chat_template`),
//! `chat_template.jinja` / `chat_templates/*.jinja` and `generation_config.json` (`eos_token_id`).
//! It owns the shapes those files may take and the errors naming file and field; it builds no
//! tokenizer (see `tokenizer.rs`).

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::error::{Result, TokenizeError};
use crate::tokenizer::DEFAULT_TEMPLATE;

/// The fields of `tokenizer_config.json` we use; unknown keys are ignored (the file carries many
/// keys for other libraries).
#[derive(Default)]
pub(crate) struct SpecialConfig {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
    pub add_bos_token: Option<bool>,
    pub add_eos_token: Option<bool>,
}

/// Reads and parses a JSON file that may be absent.
pub(crate) fn read_json_opt(path: &Path) -> Result<Option<Json>> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TokenizeError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| TokenizeError::Json {
            path: path.to_path_buf(),
            source,
        })
}

fn field_err(path: &Path, field: &str, reason: impl Into<String>) -> TokenizeError {
    TokenizeError::Field {
        path: path.to_path_buf(),
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// A special token is a string, an AddedToken object (`{"content": ..., "__type": "AddedToken"}`)
/// or null.
fn token_field(config: &Json, field: &str, path: &Path) -> Result<Option<String>> {
    match config.get(field) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Object(obj)) => match obj.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => Err(field_err(
                path,
                field,
                "is an object without a string `content`",
            )),
        },
        Some(other) => Err(field_err(
            path,
            field,
            format!("must be a string or an AddedToken object, got {other}"),
        )),
    }
}

fn bool_field(config: &Json, field: &str, path: &Path) -> Result<Option<bool>> {
    match config.get(field) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(field_err(
            path,
            field,
            format!("must be a boolean, got {other}"),
        )),
    }
}

pub(crate) fn parse_special_config(config: &Json, path: &Path) -> Result<SpecialConfig> {
    if !config.is_object() {
        return Err(field_err(path, "<root>", "must be a JSON object"));
    }
    Ok(SpecialConfig {
        bos_token: token_field(config, "bos_token", path)?,
        eos_token: token_field(config, "eos_token", path)?,
        unk_token: token_field(config, "unk_token", path)?,
        pad_token: token_field(config, "pad_token", path)?,
        add_bos_token: bool_field(config, "add_bos_token", path)?,
        add_eos_token: bool_field(config, "add_eos_token", path)?,
    })
}

/// `chat_template` is a string or a list of `{"name": ..., "template": ...}`.
pub(crate) fn parse_config_templates(config: &Json, path: &Path) -> Result<Vec<(String, String)>> {
    match config.get("chat_template") {
        None | Some(Json::Null) => Ok(Vec::new()),
        Some(Json::String(s)) => Ok(vec![(DEFAULT_TEMPLATE.to_string(), s.clone())]),
        Some(Json::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let name = item.get("name").and_then(Json::as_str);
                let template = item.get("template").and_then(Json::as_str);
                match (name, template) {
                    (Some(n), Some(t)) => Ok((n.to_string(), t.to_string())),
                    _ => Err(field_err(
                        path,
                        &format!("chat_template[{i}]"),
                        "must be an object with string `name` and `template`",
                    )),
                }
            })
            .collect(),
        Some(other) => Err(field_err(
            path,
            "chat_template",
            format!("must be a string or a list of {{name, template}}, got {other}"),
        )),
    }
}

/// transformers v5 saves templates as `chat_template.jinja` (the default) and
/// `chat_templates/<name>.jinja`.
pub(crate) fn read_template_files(dir: &Path) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let read = |path: PathBuf| {
        fs::read_to_string(&path).map_err(|source| TokenizeError::Io { path, source })
    };
    let default = dir.join("chat_template.jinja");
    if default.is_file() {
        out.push((DEFAULT_TEMPLATE.to_string(), read(default)?));
    }
    let extra_dir = dir.join("chat_templates");
    if extra_dir.is_dir() {
        let entries = fs::read_dir(&extra_dir).map_err(|source| TokenizeError::Io {
            path: extra_dir.clone(),
            source,
        })?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "jinja"))
            .collect();
        paths.sort();
        for p in paths {
            let name = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            out.push((name, read(p)?));
        }
    }
    Ok(out)
}

/// `eos_token_id` of `generation_config.json`: an integer or a list of integers.
pub(crate) fn parse_eos_ids(value: Option<&Json>, path: &Path) -> Result<Vec<u32>> {
    let as_id = |v: &Json| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| field_err(path, "eos_token_id", format!("holds {v}, not a token id")))
    };
    match value {
        None | Some(Json::Null) => Ok(Vec::new()),
        Some(Json::Array(items)) => items.iter().map(as_id).collect(),
        Some(v) => Ok(vec![as_id(v)?]),
    }
}
