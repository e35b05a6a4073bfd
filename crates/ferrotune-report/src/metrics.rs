//! `RUN/metrics.jsonl`: one JSON object per optimizer step, appended and handed to the OS on
//! every write so a crash loses at most the line being written. Also reads the file back (for
//! plots and resume) and trims it on resume so the log never holds two different histories.
//! Owns the file format only; which numbers are logged is the trainer's business.
//!
//! Line format: `{"step": N, "time": unix_secs, "<key>": value, ...}`. Keys appear in the order
//! the trainer passed them. Non-finite floats have no JSON spelling, so NaN/inf are written as
//! `null` (a NaN loss stays visible as a hole rather than silently becoming a number).

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use crate::error::{ReportError, Result};

/// File name of the metrics log inside a run folder.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Seconds since the Unix epoch as a float (sub-second precision for TensorBoard and JSONL).
pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One line of `metrics.jsonl` read back.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricRecord {
    pub step: u64,
    /// Unix seconds when the line was written.
    pub time: f64,
    /// Every other key of the line (values may be numbers, `null`, strings, ...).
    pub fields: Map<String, Value>,
}

impl MetricRecord {
    /// The value of `key` as a number; `None` when absent, `null` or not numeric.
    pub fn get(&self, key: &str) -> Option<f64> {
        self.fields.get(key).and_then(Value::as_f64)
    }
}

/// `(step, value)` pairs of one key across records, skipping records without a finite value.
pub fn metric_series(records: &[MetricRecord], key: &str) -> Vec<(f64, f64)> {
    records
        .iter()
        .filter_map(|r| {
            r.get(key)
                .filter(|v| v.is_finite())
                .map(|v| (r.step as f64, v))
        })
        .collect()
}

/// Appends metrics records to `RUN/metrics.jsonl`.
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

impl MetricsWriter {
    /// Starts a fresh log in `run_dir` (created if missing); an existing log is emptied, since a
    /// fresh run must not inherit another run's curve.
    pub fn new(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join(METRICS_FILE);
        fs::create_dir_all(run_dir)
            .map_err(|e| ReportError::io("create run folder", run_dir, e))?;
        let file = File::create(&path).map_err(|e| ReportError::io("create", &path, e))?;
        Ok(Self { path, file })
    }

    /// Continues the log in `run_dir` after resuming from `resumed_step`: records with a larger
    /// step were written after that checkpoint by the run that crashed or was stopped, and will be
    /// logged again, so they are removed first. A torn last line (crash mid-write) is removed too.
    pub fn resume(run_dir: &Path, resumed_step: u64) -> Result<Self> {
        let path = run_dir.join(METRICS_FILE);
        fs::create_dir_all(run_dir)
            .map_err(|e| ReportError::io("create run folder", run_dir, e))?;
        if path.exists() {
            truncate_after(&path, resumed_step)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| ReportError::io("open for append", &path, e))?;
        Ok(Self { path, file })
    }

    /// Path of the log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record with numeric values, stamped with the current time.
    pub fn log(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        let mut seen = HashSet::with_capacity(values.len());
        let mut line = record_prefix(step, unix_now());
        for (key, value) in values {
            check_key(key, &mut seen)?;
            push_field(&mut line, key, &number_or_null(*value));
        }
        self.write_line(line)
    }

    /// Appends one record whose values are arbitrary JSON (e.g. a string tag next to numbers).
    pub fn log_map(&mut self, step: u64, values: &Map<String, Value>) -> Result<()> {
        let mut seen = HashSet::with_capacity(values.len());
        let mut line = record_prefix(step, unix_now());
        for (key, value) in values {
            check_key(key, &mut seen)?;
            push_field(&mut line, key, value);
        }
        self.write_line(line)
    }

    fn write_line(&mut self, mut line: String) -> Result<()> {
        line.push_str("}\n");
        // One write_all of the whole line: no user-space buffer to lose on a crash, and a
        // concurrent reader never sees half a record unless the OS splits the write.
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| ReportError::io("append to", &self.path, e))
    }

    /// Forces written records to disk (fsync), e.g. right before a checkpoint is declared done.
    pub fn sync(&mut self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| ReportError::io("sync", &self.path, e))
    }
}

fn record_prefix(step: u64, time: f64) -> String {
    let time = number_or_null(time);
    format!("{{\"step\":{step},\"time\":{time}")
}

fn number_or_null(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
}

fn check_key<'a>(key: &'a str, seen: &mut HashSet<&'a str>) -> Result<()> {
    if key.is_empty() {
        return Err(ReportError::EmptyKey);
    }
    if key == "step" || key == "time" {
        return Err(ReportError::ReservedKey {
            key: key.to_string(),
        });
    }
    if !seen.insert(key) {
        return Err(ReportError::DuplicateKey {
            key: key.to_string(),
        });
    }
    Ok(())
}

fn push_field(line: &mut String, key: &str, value: &Value) {
    line.push(',');
    // Serialising a &str / Value into a String cannot fail.
    line.push_str(&serde_json::to_string(key).unwrap_or_default());
    line.push(':');
    line.push_str(&serde_json::to_string(value).unwrap_or_else(|_| "null".into()));
}

/// Parses one line; `Err(reason)` when it is not a metrics record.
fn parse_line(line: &str) -> std::result::Result<MetricRecord, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let Value::Object(mut fields) = value else {
        return Err("not a JSON object".into());
    };
    let step = fields
        .remove("step")
        .and_then(|s| s.as_u64())
        .ok_or("missing or non-integer \"step\"")?;
    let time = fields
        .remove("time")
        .and_then(|t| t.as_f64())
        .unwrap_or(f64::NAN);
    Ok(MetricRecord { step, time, fields })
}

/// Splits file text into `(line_number, line)` of complete records, dropping blank lines and a
/// torn final line (no newline and unparsable: the writer died mid-write).
fn complete_lines(text: &str) -> Vec<(usize, &str)> {
    let ends_clean = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let n = lines.len();
    lines
        .into_iter()
        .enumerate()
        .filter(|(i, line)| {
            let torn = *i + 1 == n && !ends_clean && parse_line(line).is_err();
            !line.trim().is_empty() && !torn
        })
        .map(|(i, l)| (i + 1, l))
        .collect()
}

/// Reads `metrics.jsonl` (pass the file path, not the run folder).
pub fn read_metrics(path: &Path) -> Result<Vec<MetricRecord>> {
    let text = fs::read_to_string(path).map_err(|e| ReportError::io("read", path, e))?;
    complete_lines(&text)
        .into_iter()
        .map(|(line_no, line)| {
            parse_line(line).map_err(|reason| ReportError::BadMetricsLine {
                path: path.to_path_buf(),
                line: line_no,
                reason,
            })
        })
        .collect()
}

/// Opens `RUN/<name>`, a JSONL log whose records carry a `"step"` (e.g. `completions.jsonl`),
/// for appending. After a resume from `resumed_step`, records with a larger step (written after
/// that checkpoint by the run that stopped) are removed first, as [`MetricsWriter::resume`] does
/// for the metrics: the steps are run again and would otherwise be logged twice. Unlike the
/// metrics, a line without a readable step (an older format, a torn write) is kept, not an error:
/// a side log never stops a resume.
pub fn open_step_log(run_dir: &Path, name: &str, resumed_step: Option<u64>) -> Result<File> {
    let path = run_dir.join(name);
    if let (Some(step), true) = (resumed_step, path.exists()) {
        let text = fs::read_to_string(&path).map_err(|e| ReportError::io("read", &path, e))?;
        let kept = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter(|l| parse_line(l).map_or(true, |r| r.step <= step));
        replace_lines(&path, kept)?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| ReportError::io("open for append", &path, e))
}

/// Rewrites `path` keeping only records with `step <= keep_through`, via a temporary file and a
/// rename so a crash during resume leaves either the old or the new log, never half of one.
fn truncate_after(path: &Path, keep_through: u64) -> Result<()> {
    let text = fs::read_to_string(path).map_err(|e| ReportError::io("read", path, e))?;
    let mut kept = Vec::new();
    for (line_no, line) in complete_lines(&text) {
        let record = parse_line(line).map_err(|reason| ReportError::BadMetricsLine {
            path: path.to_path_buf(),
            line: line_no,
            reason,
        })?;
        if record.step <= keep_through {
            kept.push(line);
        }
    }
    replace_lines(path, kept)
}

/// Replaces `path` with `lines` (each newline-terminated) via a temporary file and a rename.
fn replace_lines<'a>(path: &Path, lines: impl IntoIterator<Item = &'a str>) -> Result<()> {
    let mut text = String::new();
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    let tmp = path.with_extension("jsonl.tmp");
    fs::write(&tmp, text).map_err(|e| ReportError::io("write", &tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| ReportError::io("replace", path, e))
}
