//! Tests for the plain (non-terminal) progress output: cadence, line format, finish line.

use ferrotune_report::{format_duration, format_status, Progress};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn status_line_format() {
    let line = format_status(
        10,
        100,
        &[("loss", 1.2341), ("lr", 2e-4), ("tok/s", 512.4)],
        Some(Duration::from_secs(80)),
    );
    assert_eq!(line, "step 10/100 loss 1.234 lr 2.0e-4 tok/s 512 eta 1m20s");
    assert_eq!(format_duration(Duration::from_secs(7325)), "2h02m");
    assert_eq!(format_duration(Duration::from_secs(9)), "9s");
}

#[test]
fn plain_mode_logs_every_n_steps_and_first_and_last() {
    let out = Shared::default();
    let mut p = Progress::to_writer(25, Box::new(out.clone())).with_log_every(10);
    for step in 1..=25u64 {
        p.update(step, &[("loss", 1.0 / step as f64)]);
        if step == 12 {
            p.println("eval: ppl 7.5");
        }
    }
    p.finish();
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let steps: Vec<&str> = lines
        .iter()
        .filter(|l| l.starts_with("step "))
        .map(|l| l.split_whitespace().nth(1).unwrap())
        .collect();
    assert_eq!(steps, vec!["1/25", "10/25", "20/25", "25/25"], "{text}");
    assert!(lines.contains(&"eval: ppl 7.5"));
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("step 10/25 loss 0.100 eta ")),
        "{text}"
    );
    assert!(
        lines.last().unwrap().starts_with("done 25/25 steps in "),
        "{text}"
    );
}

#[test]
fn finish_logs_an_unlogged_last_step() {
    let out = Shared::default();
    let mut p = Progress::to_writer(100, Box::new(out.clone())).with_log_every(10);
    for step in 1..=13u64 {
        p.update(step, &[("loss", 0.5)]);
    }
    p.finish();
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("step 13/100 loss 0.500\n"), "{text}");
    assert!(text.contains("done 13/100 steps"), "{text}");
}

#[test]
fn terminal_mode_does_not_panic() {
    // indicatif hides its bar when stderr is not a terminal; this exercises the code path.
    let mut p = Progress::new(5, true).resumed_from(2);
    for step in 3..=5 {
        p.update(step, &[("loss", 1.0), ("lr", 1e-4)]);
    }
    p.println("message");
    p.finish();
}
