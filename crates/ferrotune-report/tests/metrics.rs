//! Tests for `metrics.jsonl`: record format, round trip, resume trimming, crash tolerance.
//! Expected values are the literal inputs; the file text is also checked with serde_json alone
//! so the format does not depend on our reader.

use ferrotune_report::{
    metric_series, open_step_log, read_metrics, MetricsWriter, ReportError, METRICS_FILE,
};
use std::fs;

fn tmp_run(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ferrotune-report-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    dir
}

#[test]
fn one_json_object_per_line_in_given_key_order() {
    let run = tmp_run("format");
    let mut w = MetricsWriter::new(&run).unwrap();
    w.log(1, &[("loss", 2.5), ("lr", 2e-4), ("tok/s", 512.0)])
        .unwrap();
    w.log(2, &[("loss", f64::NAN), ("lr", 1e-4)]).unwrap();
    let text = fs::read_to_string(run.join(METRICS_FILE)).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(text.ends_with('\n'));
    // Key order as passed, step and time first.
    let first = lines[0];
    let order: Vec<usize> = ["\"step\"", "\"time\"", "\"loss\"", "\"lr\"", "\"tok/s\""]
        .iter()
        .map(|k| first.find(k).unwrap())
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{first}");
    let v: serde_json::Value = serde_json::from_str(first).unwrap();
    assert_eq!(v["step"], 1);
    assert_eq!(v["loss"], 2.5);
    assert_eq!(v["lr"], 2e-4);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let t = v["time"].as_f64().unwrap();
    assert!((now - t).abs() < 60.0, "time {t} vs now {now}");
    // NaN has no JSON spelling: written as null, line still valid JSON.
    let v2: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
    assert!(v2["loss"].is_null());
}

#[test]
fn read_back_round_trips_values() {
    let run = tmp_run("roundtrip");
    let mut w = MetricsWriter::new(&run).unwrap();
    for step in 1..=5u64 {
        w.log(step, &[("loss", 3.0 - step as f64 * 0.25)]).unwrap();
    }
    let mut map = serde_json::Map::new();
    map.insert("eval/ppl".into(), serde_json::json!(7.5));
    map.insert("note".into(), serde_json::json!("eval"));
    w.log_map(5, &map).unwrap();
    let recs = read_metrics(&run.join(METRICS_FILE)).unwrap();
    assert_eq!(recs.len(), 6);
    assert_eq!(recs[2].step, 3);
    assert_eq!(recs[2].get("loss"), Some(2.25));
    assert_eq!(recs[5].get("eval/ppl"), Some(7.5));
    assert_eq!(recs[5].get("note"), None); // not numeric
    assert_eq!(recs[5].fields["note"], "eval");
    let series = metric_series(&recs, "loss");
    assert_eq!(
        series,
        vec![
            (1.0, 2.75),
            (2.0, 2.5),
            (3.0, 2.25),
            (4.0, 2.0),
            (5.0, 1.75)
        ]
    );
}

#[test]
fn resume_drops_records_after_resumed_step_then_appends() {
    let run = tmp_run("resume");
    let mut w = MetricsWriter::new(&run).unwrap();
    for step in 1..=10u64 {
        w.log(step, &[("loss", step as f64)]).unwrap();
    }
    drop(w);
    let mut w = MetricsWriter::resume(&run, 6).unwrap();
    w.log(7, &[("loss", 70.0)]).unwrap();
    let recs = read_metrics(&run.join(METRICS_FILE)).unwrap();
    let steps: Vec<u64> = recs.iter().map(|r| r.step).collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(recs[6].get("loss"), Some(70.0));
    assert_eq!(recs[5].get("loss"), Some(6.0));
}

#[test]
fn resume_without_a_log_starts_one() {
    let run = tmp_run("resume-empty");
    let mut w = MetricsWriter::resume(&run, 3).unwrap();
    w.log(4, &[("loss", 1.0)]).unwrap();
    assert_eq!(read_metrics(&run.join(METRICS_FILE)).unwrap().len(), 1);
}

#[test]
fn fresh_writer_empties_an_old_log() {
    let run = tmp_run("fresh");
    MetricsWriter::new(&run)
        .unwrap()
        .log(1, &[("loss", 1.0)])
        .unwrap();
    MetricsWriter::new(&run)
        .unwrap()
        .log(1, &[("loss", 2.0)])
        .unwrap();
    let recs = read_metrics(&run.join(METRICS_FILE)).unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].get("loss"), Some(2.0));
}

#[test]
fn torn_last_line_is_ignored_and_removed_on_resume() {
    let run = tmp_run("torn");
    fs::create_dir_all(&run).unwrap();
    let path = run.join(METRICS_FILE);
    fs::write(
        &path,
        "{\"step\":1,\"time\":0,\"loss\":1}\n{\"step\":2,\"time\":0,\"lo",
    )
    .unwrap();
    assert_eq!(read_metrics(&path).unwrap().len(), 1);
    let mut w = MetricsWriter::resume(&run, 5).unwrap();
    w.log(2, &[("loss", 0.5)]).unwrap();
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");
    assert_eq!(read_metrics(&path).unwrap()[1].get("loss"), Some(0.5));
}

#[test]
fn corrupt_middle_line_is_an_error_naming_the_line() {
    let run = tmp_run("corrupt");
    fs::create_dir_all(&run).unwrap();
    let path = run.join(METRICS_FILE);
    fs::write(
        &path,
        "{\"step\":1,\"time\":0}\nnot json\n{\"step\":3,\"time\":0}\n",
    )
    .unwrap();
    match read_metrics(&path) {
        Err(ReportError::BadMetricsLine { line, .. }) => assert_eq!(line, 2),
        other => panic!("expected BadMetricsLine, got {other:?}"),
    }
    assert!(MetricsWriter::resume(&run, 1).is_err());
}

#[test]
fn reserved_and_duplicate_keys_are_refused() {
    let run = tmp_run("keys");
    let mut w = MetricsWriter::new(&run).unwrap();
    assert!(matches!(
        w.log(1, &[("step", 1.0)]),
        Err(ReportError::ReservedKey { .. })
    ));
    assert!(matches!(
        w.log(1, &[("loss", 1.0), ("loss", 2.0)]),
        Err(ReportError::DuplicateKey { .. })
    ));
    assert!(matches!(w.log(1, &[("", 1.0)]), Err(ReportError::EmptyKey)));
    // Nothing half-written.
    assert_eq!(fs::read_to_string(run.join(METRICS_FILE)).unwrap(), "");
}

/// Side logs keyed by step (completions.jsonl, health.jsonl): a resume drops the records after
/// the checkpoint's step and keeps everything else, including lines it cannot read a step from
/// (an older format), so a side log never stops a resume.
#[test]
fn step_log_resume_keeps_up_to_the_step_and_unreadable_lines() {
    use std::io::Write;
    let dir = tmp_run("step-log");
    fs::create_dir_all(&dir).unwrap();
    let body =
        "{\"step\":1,\"x\":\"a\"}\n{\"finding\":\"old format\"}\n{\"step\":2}\n{\"step\":3}\n";
    fs::write(dir.join("side.jsonl"), body).unwrap();
    // A fresh start (no resume) appends to what is there; --overwrite is the run folder's job.
    drop(open_step_log(&dir, "side.jsonl", None).unwrap());
    assert_eq!(fs::read_to_string(dir.join("side.jsonl")).unwrap(), body);
    let mut f = open_step_log(&dir, "side.jsonl", Some(2)).unwrap();
    writeln!(f, "{{\"step\":3,\"again\":true}}").unwrap();
    assert_eq!(
        fs::read_to_string(dir.join("side.jsonl")).unwrap(),
        "{\"step\":1,\"x\":\"a\"}\n{\"finding\":\"old format\"}\n{\"step\":2}\n{\"step\":3,\"again\":true}\n"
    );
}
