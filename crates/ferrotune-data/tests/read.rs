//! Reading JSONL, JSON arrays, CSV and Parquet into rows, and the errors for broken files.
//! The Parquet fixtures and their expected rows (`tiny.expected.json`, pyarrow's `to_pylist()`)
//! come from `fixtures/data/make_data_fixtures.py`.

mod common;

use common::{data_fixtures, temp_dir, write};
use ferrotune_data::{read_rows, DataError};
use serde_json::{json, Value};

#[test]
fn jsonl_rows_keep_their_line_numbers_and_skip_blank_lines() {
    let dir = temp_dir("jsonl");
    let path = write(
        &dir,
        "d.jsonl",
        "{\"text\": \"a\"}\n\n   \n{\"text\": \"b\", \"n\": 2}\n{\"text\": \"c\"}",
    );
    let rows = read_rows(&path).unwrap();
    assert_eq!(
        rows.iter().map(|r| r.line).collect::<Vec<_>>(),
        vec![1, 4, 5]
    );
    assert_eq!(rows[1].fields["text"], json!("b"));
    assert_eq!(rows[1].fields["n"], json!(2));
}

#[test]
fn json_extension_reads_lines_or_one_array() {
    let dir = temp_dir("json");
    let lines = write(&dir, "l.json", "{\"a\": 1}\n{\"a\": 2}\n");
    let array = write(&dir, "a.json", "[{\"a\": 1},\n {\"a\": 2}]\n");
    for path in [lines, array] {
        let rows = read_rows(&path).unwrap();
        assert_eq!(rows.len(), 2, "{}", path.display());
        assert_eq!(rows[1].fields["a"], json!(2));
        assert_eq!(rows[1].line, 2);
    }
}

#[test]
fn csv_uses_the_header_and_record_start_lines() {
    let dir = temp_dir("csv");
    // The quoted cell spans two lines, so the third record starts on line 5.
    let path = write(
        &dir,
        "d.csv",
        "prompt,completion\nhi,there\n\"multi\nline\",x\n\"a, b\",\"say \"\"c\"\"\"\n",
    );
    let rows = read_rows(&path).unwrap();
    assert_eq!(
        rows.iter().map(|r| r.line).collect::<Vec<_>>(),
        vec![2, 3, 5]
    );
    assert_eq!(rows[1].fields["prompt"], json!("multi\nline"));
    assert_eq!(rows[2].fields["prompt"], json!("a, b"));
    assert_eq!(rows[2].fields["completion"], json!("say \"c\""));
}

#[test]
fn parquet_rows_match_pyarrow_for_every_codec() {
    let expected: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(data_fixtures().join("tiny.expected.json")).unwrap(),
    )
    .unwrap();
    for name in ["tiny.parquet", "tiny_zstd.parquet", "tiny_gzip.parquet"] {
        let rows = read_rows(&data_fixtures().join(name)).unwrap();
        assert_eq!(rows.len(), expected.len(), "{name}");
        for (i, (row, want)) in rows.iter().zip(&expected).enumerate() {
            assert_eq!(row.line, i + 1, "{name}");
            assert_eq!(
                &Value::Object(row.fields.clone()),
                want,
                "{name} row {}",
                i + 1
            );
        }
    }
}

#[test]
fn malformed_json_names_file_and_line() {
    let dir = temp_dir("badjson");
    let path = write(
        &dir,
        "bad.jsonl",
        "{\"text\": \"a\"}\n{\"text\": \"b\"}\n{\"text\": \"c\n",
    );
    let err = read_rows(&path).unwrap_err();
    assert!(matches!(err, DataError::Json { line: 3, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("bad.jsonl"), "{msg}");
    assert!(msg.contains("malformed JSON at line 3"), "{msg}");
}

#[test]
fn a_line_that_is_not_an_object_is_refused() {
    let dir = temp_dir("notobj");
    let path = write(&dir, "d.jsonl", "{\"text\": \"a\"}\n[1, 2]\n");
    let msg = read_rows(&path).unwrap_err().to_string();
    assert!(msg.contains("d.jsonl:2:"), "{msg}");
    assert!(msg.contains("found a list"), "{msg}");
}

#[test]
fn unknown_extension_and_missing_file_are_errors() {
    let dir = temp_dir("ext");
    let txt = write(&dir, "d.txt", "hello\n");
    let msg = read_rows(&txt).unwrap_err().to_string();
    assert!(
        msg.contains("d.txt") && msg.contains("unknown dataset extension"),
        "{msg}"
    );

    let missing = dir.join("nope.jsonl");
    let err = read_rows(&missing).unwrap_err();
    assert!(matches!(err, DataError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("nope.jsonl"));
}

#[test]
fn ragged_csv_and_non_parquet_bytes_are_errors() {
    let dir = temp_dir("ragged");
    let csv = write(&dir, "d.csv", "a,b\n1,2\n3\n");
    let msg = read_rows(&csv).unwrap_err().to_string();
    assert!(msg.contains("d.csv") && msg.contains("line 3"), "{msg}");

    let pq = write(&dir, "d.parquet", "definitely not parquet");
    let err = read_rows(&pq).unwrap_err();
    assert!(matches!(err, DataError::Parquet { .. }), "{err:?}");
    assert!(err.to_string().contains("d.parquet"));
}

#[test]
fn byte_order_mark_and_crlf_line_ends_are_accepted() {
    let dir = temp_dir("bom");
    let path = write(
        &dir,
        "w.jsonl",
        "\u{feff}{\"text\": \"a\"}\r\n{\"text\": \"b\"}\r\n",
    );
    let rows = read_rows(&path).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].fields["text"], json!("a"));
    assert_eq!(rows[1].fields["text"], json!("b"));
}
