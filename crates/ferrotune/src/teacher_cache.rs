//! The teacher cache: a frozen teacher's top-k next-token log-probs at every scored token of a
//! distillation data set, written once by `ferrotune distill cache-teacher` so that training
//! (`[distill] teacher_cache = "…"`) never holds the teacher and the student together.
//!
//! # File format (version 1)
//!
//! One safetensors file with four tensors:
//!
//! - `header`: U8 (n,), UTF-8 JSON (below);
//! - `offsets`: I64 (E + 1,): example `key`'s rows are `offsets[key]..offsets[key + 1]`;
//! - `ids`: U32 (R, k): the teacher's top-k token ids per row, most likely first;
//! - `logprobs`: F32 (R, k): log_softmax(teacher logits / loss_temperature) at `ids`.
//!
//! An example's key is its index among the tokenized examples of `data.train` then `data.eval`
//! (before any `eval_fraction` split); its rows are its scored tokens (the completion /
//! assistant tokens after the first position), in order. The header records what the rows
//! depend on, so a stale cache is refused with the field that changed:
//!
//! ```json
//! {"format": "ferrotune-teacher-cache", "version": 1, "teacher": "/abs/teacher",
//!  "tokenizer": "fnv1a64 of the vocabulary", "data": "fnv1a64 of every example's ids + mask",
//!  "k": 20, "temperature": 1.0, "examples": 72, "rows": 610,
//!  "train_file": "/abs/train.jsonl", "eval_file": null, "max_seq_len": 128}
//! ```
//!
//! Owns: the file layout, writing it atomically and checking it against a run. Does not own:
//! computing the rows (`ferrotune_train::distill::teacher_topk_rows`) or tokenizing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ferrotune_data::Fingerprint;
use ferrotune_tokenize::Tokenizer;
use ferrotune_train::distill::CachedTeacher;
use serde::{Deserialize, Serialize};

pub const FORMAT: &str = "ferrotune-teacher-cache";
pub const VERSION: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("teacher cache {path}: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error("teacher cache {path} is stale: {what} was {cached}, the run has {now}; rerun `ferrotune distill cache-teacher --config ...`")]
    Stale {
        path: PathBuf,
        what: &'static str,
        cached: String,
        now: String,
    },
    #[error("teacher cache {path}: {source}")]
    Candle {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error("teacher cache {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What a cache was computed from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CacheHeader {
    pub format: String,
    pub version: u64,
    pub teacher: PathBuf,
    pub tokenizer: String,
    pub data: String,
    pub k: usize,
    pub temperature: f64,
    pub examples: usize,
    pub rows: usize,
    pub train_file: PathBuf,
    pub eval_file: Option<PathBuf>,
    pub max_seq_len: usize,
}

/// Fingerprint of a tokenizer's vocabulary (every token string and its id, added tokens
/// included): equal for tokenizers that map text to the same ids.
pub fn tokenizer_fingerprint(tok: &Tokenizer) -> String {
    let mut v: Vec<(u32, String)> = tok
        .inner()
        .get_vocab(true)
        .into_iter()
        .map(|(s, id)| (id, s))
        .collect();
    v.sort();
    let mut h = Fingerprint::default();
    for (id, s) in &v {
        h.bytes(&id.to_le_bytes());
        h.bytes(s.as_bytes());
        h.bytes(&[0xff]);
    }
    h.hex()
}

/// Write `rows` with `header` to `path` (through a sibling temporary file, renamed into place).
pub fn write(path: &Path, header: &CacheHeader, rows: &CachedTeacher) -> Result<(), CacheError> {
    let cerr = |source| CacheError::Candle {
        path: path.to_path_buf(),
        source,
    };
    let json = serde_json::to_vec(header).map_err(|e| CacheError::Format {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    let r = rows.offsets.last().copied().unwrap_or(0);
    let cpu = Device::Cpu;
    let offsets: Vec<i64> = rows.offsets.iter().map(|&o| o as i64).collect();
    let n_off = offsets.len();
    let tensors: HashMap<String, Tensor> = [
        ("header", Tensor::from_vec(json.clone(), json.len(), &cpu)),
        ("offsets", Tensor::from_vec(offsets, n_off, &cpu)),
        ("ids", Tensor::from_vec(rows.ids.clone(), (r, rows.k), &cpu)),
        (
            "logprobs",
            Tensor::from_vec(rows.logprobs.clone(), (r, rows.k), &cpu),
        ),
    ]
    .into_iter()
    .map(|(n, t)| t.map(|t| (n.to_string(), t)))
    .collect::<candle_core::Result<_>>()
    .map_err(cerr)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| CacheError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let tmp = path.with_extension("partial");
    candle_core::safetensors::save(&tensors, &tmp).map_err(cerr)?;
    // The safetensors writer creates the file owner-only; a cache is shared like a data file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).map_err(
            |source| CacheError::Io {
                path: tmp.clone(),
                source,
            },
        )?;
    }
    std::fs::rename(&tmp, path).map_err(|source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Read a cache written by [`write`].
pub fn read(path: &Path) -> Result<(CacheHeader, CachedTeacher), CacheError> {
    let bad = |msg: String| CacheError::Format {
        path: path.to_path_buf(),
        msg,
    };
    if !path.is_file() {
        return Err(bad(
            "no such file: write it first with `ferrotune distill cache-teacher --config ...`"
                .into(),
        ));
    }
    let cerr = |source| CacheError::Candle {
        path: path.to_path_buf(),
        source,
    };
    let mut t = candle_core::safetensors::load(path, &Device::Cpu).map_err(cerr)?;
    let mut take = |name: &str, dtype: DType| {
        let x = t
            .remove(name)
            .ok_or_else(|| bad(format!("no `{name}` tensor (not a teacher cache?)")))?;
        if x.dtype() != dtype {
            return Err(bad(format!(
                "`{name}` is {:?}, expected {dtype:?}",
                x.dtype()
            )));
        }
        Ok(x)
    };
    let header = take("header", DType::U8)?;
    let offsets = take("offsets", DType::I64)?;
    let ids = take("ids", DType::U32)?;
    let logprobs = take("logprobs", DType::F32)?;
    let header: CacheHeader = serde_json::from_slice(&header.to_vec1::<u8>().map_err(cerr)?)
        .map_err(|e| bad(format!("header: {e}")))?;
    if header.format != FORMAT || header.version > VERSION {
        return Err(bad(format!(
            "format {} version {}; this ferrotune reads {FORMAT} up to version {VERSION}",
            header.format, header.version
        )));
    }
    let offsets: Vec<usize> = offsets
        .to_vec1::<i64>()
        .map_err(cerr)?
        .into_iter()
        .map(|o| o.max(0) as usize)
        .collect();
    let (r, k) = ids.dims2().map_err(cerr)?;
    if logprobs.dims() != [r, k]
        || k != header.k
        || offsets.len() != header.examples + 1
        || offsets.last() != Some(&r)
        || offsets.windows(2).any(|w| w[1] < w[0])
    {
        return Err(bad(format!(
            "inconsistent tensors: ids {:?}, logprobs {:?}, {} offsets ending at {:?}; header k = {}, {} examples",
            ids.dims(),
            logprobs.dims(),
            offsets.len(),
            offsets.last(),
            header.k,
            header.examples
        )));
    }
    let rows = CachedTeacher {
        k,
        offsets,
        ids: ids.flatten_all().and_then(|x| x.to_vec1()).map_err(cerr)?,
        logprobs: logprobs
            .flatten_all()
            .and_then(|x| x.to_vec1())
            .map_err(cerr)?,
    };
    Ok((header, rows))
}

/// Refuse a cache computed from anything other than what the run would compute.
pub fn check(path: &Path, cached: &CacheHeader, now: &CacheHeader) -> Result<(), CacheError> {
    let stale = |what, a: String, b: String| {
        Err(CacheError::Stale {
            path: path.to_path_buf(),
            what,
            cached: a,
            now: b,
        })
    };
    if cached.teacher != now.teacher {
        return stale(
            "the teacher",
            cached.teacher.display().to_string(),
            now.teacher.display().to_string(),
        );
    }
    if cached.tokenizer != now.tokenizer {
        return stale(
            "the tokenizer fingerprint",
            cached.tokenizer.clone(),
            now.tokenizer.clone(),
        );
    }
    if cached.k != now.k {
        return stale("top_k", cached.k.to_string(), now.k.to_string());
    }
    if cached.temperature != now.temperature {
        return stale(
            "loss_temperature",
            cached.temperature.to_string(),
            now.temperature.to_string(),
        );
    }
    if cached.examples != now.examples || cached.data != now.data {
        return stale(
            "the tokenized data (files, max_seq_len or columns changed)",
            format!("{} examples, fingerprint {}", cached.examples, cached.data),
            format!("{} examples, fingerprint {}", now.examples, now.data),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> CacheHeader {
        CacheHeader {
            format: FORMAT.into(),
            version: VERSION,
            teacher: "/t".into(),
            tokenizer: "aa".into(),
            data: "bb".into(),
            k: 2,
            temperature: 1.0,
            examples: 2,
            rows: 3,
            train_file: "/d.jsonl".into(),
            eval_file: None,
            max_seq_len: 64,
        }
    }

    /// Write → read gives the same rows and header; a changed field is named as stale.
    #[test]
    fn round_trip_and_staleness() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.safetensors");
        let rows = CachedTeacher {
            k: 2,
            offsets: vec![0, 1, 3],
            ids: vec![5, 6, 1, 2, 3, 4],
            logprobs: vec![-0.1, -2.0, -0.5, -1.0, -0.2, f32::NEG_INFINITY],
        };
        write(&p, &header(), &rows).unwrap();
        let (h, r) = read(&p).unwrap();
        assert_eq!(h, header());
        assert_eq!(r, rows);
        check(&p, &h, &header()).unwrap();
        let mut now = header();
        now.k = 4;
        let e = check(&p, &h, &now).unwrap_err().to_string();
        assert!(e.contains("stale") && e.contains("top_k"), "{e}");
        let mut now = header();
        now.data = "cc".into();
        let e = check(&p, &h, &now).unwrap_err().to_string();
        assert!(e.contains("tokenized data"), "{e}");
        let e = read(&dir.path().join("missing")).unwrap_err().to_string();
        assert!(e.contains("cache-teacher"), "{e}");
    }
}
