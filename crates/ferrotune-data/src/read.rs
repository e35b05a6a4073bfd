//! Reading dataset files into rows of JSON fields: JSON Lines, Parquet (record API, no arrow) and
//! CSV, picked by extension. Every row keeps the line it came from so later errors can point at
//! it. It owns file formats only; what the columns mean (TRL's conventions) is `example.rs`.

use std::fs;
use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use serde_json::{Map, Value};

use crate::error::{json_type, DataError, Result};

/// One dataset row. `line` is 1-based: the line in a JSONL/CSV file (for CSV the line where the
/// record starts, so the first record after the header is line 2), the row index + 1 for
/// Parquet, the element index + 1 for a `.json` file holding one JSON array.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub line: usize,
    pub fields: Map<String, Value>,
}

/// The file formats we read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileFormat {
    JsonLines,
    Parquet,
    Csv,
}

impl FileFormat {
    /// By extension: `.jsonl`/`.json` → JSON Lines, `.parquet` → Parquet, `.csv` → CSV.
    pub fn from_path(path: &Path) -> Result<Self> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match ext.as_str() {
            "jsonl" | "json" => Ok(FileFormat::JsonLines),
            "parquet" => Ok(FileFormat::Parquet),
            "csv" => Ok(FileFormat::Csv),
            _ => Err(DataError::UnknownExtension {
                path: path.to_path_buf(),
                ext,
            }),
        }
    }
}

/// Reads every row of a dataset file, the format chosen by extension.
pub fn read_rows(path: &Path) -> Result<Vec<Row>> {
    match FileFormat::from_path(path)? {
        FileFormat::JsonLines => read_jsonl(path),
        FileFormat::Parquet => read_parquet(path),
        FileFormat::Csv => read_csv(path),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One JSON object per line; blank lines are skipped. A `.json` file whose first non-blank
/// character is `[` is read as one array of objects instead (what `datasets` also accepts), since
/// exporting a list of dicts with `json.dump` is common.
fn read_jsonl(path: &Path) -> Result<Vec<Row>> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    // Editors on Windows may write a byte-order mark, which JSON does not allow.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let is_array = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
        && text.trim_start().starts_with('[');
    if is_array {
        return read_json_array(path, text);
    }
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|source| DataError::Json {
            path: path.to_path_buf(),
            line: line_no,
            source,
        })?;
        rows.push(object_row(path, line_no, value)?);
    }
    Ok(rows)
}

fn read_json_array(path: &Path, text: &str) -> Result<Vec<Row>> {
    let values: Vec<Value> = serde_json::from_str(text).map_err(|source| DataError::Json {
        path: path.to_path_buf(),
        line: source.line(),
        source,
    })?;
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| object_row(path, i + 1, v))
        .collect()
}

fn object_row(path: &Path, line: usize, value: Value) -> Result<Row> {
    match value {
        Value::Object(fields) => Ok(Row { line, fields }),
        other => Err(DataError::NotAnObject {
            path: path.to_path_buf(),
            line,
            found: json_type(&other),
        }),
    }
}

/// CSV with a header row; every cell is a string (CSV has no types). Columns that hold JSON
/// (e.g. a `messages` list) are parsed later, by the column's reader in `example.rs`.
fn read_csv(path: &Path) -> Result<Vec<Row>> {
    let file = fs::File::open(path).map_err(io_err(path))?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(file);
    let csv_err = |e: csv::Error| {
        let line = e.position().map(|p| p.line() as usize).unwrap_or(0);
        match e.into_kind() {
            csv::ErrorKind::Io(source) => DataError::Io {
                path: path.to_path_buf(),
                source,
            },
            kind => DataError::Csv {
                path: path.to_path_buf(),
                line,
                message: csv_kind_message(&kind),
            },
        }
    };
    let headers = reader.headers().map_err(csv_err)?.clone();
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(csv_err)?;
        let line = record.position().map(|p| p.line() as usize).unwrap_or(0);
        let fields = headers
            .iter()
            .zip(record.iter())
            .map(|(h, v)| (h.to_string(), Value::String(v.to_string())))
            .collect();
        rows.push(Row { line, fields });
    }
    Ok(rows)
}

fn csv_kind_message(kind: &csv::ErrorKind) -> String {
    match kind {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!("the record has {len} fields but the header has {expected_len}"),
        csv::ErrorKind::Utf8 { err, .. } => format!("invalid UTF-8: {err}"),
        other => format!("{other:?}"),
    }
}

/// Parquet through the crate's record API: each row becomes a JSON object (lists → arrays,
/// structs → objects), so the column conventions are read the same way for every format.
fn read_parquet(path: &Path) -> Result<Vec<Row>> {
    let pq_err = |row: Option<usize>, e: parquet::errors::ParquetError| DataError::Parquet {
        path: path.to_path_buf(),
        row,
        message: e.to_string(),
    };
    let file = fs::File::open(path).map_err(io_err(path))?;
    let reader = SerializedFileReader::new(file).map_err(|e| pq_err(None, e))?;
    let iter = reader.get_row_iter(None).map_err(|e| pq_err(None, e))?;
    let mut rows = Vec::new();
    for (i, row) in iter.enumerate() {
        let line = i + 1;
        let row = row.map_err(|e| pq_err(Some(line), e))?;
        let fields = row
            .get_column_iter()
            .map(|(name, field)| (name.clone(), field_to_json(field)))
            .collect();
        rows.push(Row { line, fields });
    }
    Ok(rows)
}

/// Our own Field → JSON mapping (the crate's needs its `json` feature and base64-encodes bytes):
/// bytes that are UTF-8 become strings (pyarrow writes `binary` for some text columns), dates,
/// times and decimals their printed form, NaN/inf `null` (JSON has no such numbers).
fn field_to_json(field: &Field) -> Value {
    let num = |x: f64| {
        serde_json::Number::from_f64(x)
            .map(Value::Number)
            .unwrap_or(Value::Null)
    };
    match field {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(n) => Value::from(*n),
        Field::Short(n) => Value::from(*n),
        Field::Int(n) => Value::from(*n),
        Field::Long(n) => Value::from(*n),
        Field::UByte(n) => Value::from(*n),
        Field::UShort(n) => Value::from(*n),
        Field::UInt(n) => Value::from(*n),
        Field::ULong(n) => Value::from(*n),
        Field::Float16(x) => num(f64::from(*x)),
        Field::Float(x) => num(f64::from(*x)),
        Field::Double(x) => num(*x),
        Field::Str(s) => Value::String(s.clone()),
        Field::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_string()),
            Err(_) => Value::Array(b.data().iter().map(|&x| Value::from(x)).collect()),
        },
        Field::Decimal(_)
        | Field::Date(_)
        | Field::TimeMillis(_)
        | Field::TimeMicros(_)
        | Field::TimestampMillis(_)
        | Field::TimestampMicros(_) => Value::String(field.to_string()),
        Field::Group(row) => Value::Object(
            row.get_column_iter()
                .map(|(k, v)| (k.clone(), field_to_json(v)))
                .collect(),
        ),
        Field::ListInternal(list) => {
            Value::Array(list.elements().iter().map(field_to_json).collect())
        }
        Field::MapInternal(map) => Value::Object(
            map.entries()
                .iter()
                .map(|(k, v)| {
                    let key = match k {
                        Field::Str(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (key, field_to_json(v))
                })
                .collect(),
        ),
    }
}
