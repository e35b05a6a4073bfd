//! Live progress for a training loop: an `indicatif` bar on a terminal, plain log lines every N
//! steps otherwise (CI logs, `nohup`, redirected stderr), e.g.
//! `step 10/100 loss 1.234 lr 2.0e-4 tok/s 512 eta 1m20s`.
//! Owns display only: values arrive already computed; the ETA is the one number derived here,
//! from wall time and steps done since this display started.

use std::io::Write;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

enum Sink {
    Bar(ProgressBar),
    Lines(Box<dyn Write + Send>),
}

/// Progress display for one training run.
pub struct Progress {
    sink: Sink,
    total: u64,
    log_every: u64,
    started: Instant,
    /// Step already done when the display started (non-zero after a resume), for the ETA.
    first_step: u64,
    last_step: Option<u64>,
    last_logged: Option<u64>,
    last_values: Vec<(String, f64)>,
}

impl Progress {
    /// A bar when `is_tty`, else log lines on stderr about 20 times per run.
    pub fn new(total_steps: u64, is_tty: bool) -> Self {
        if is_tty {
            let bar = ProgressBar::new(total_steps);
            // The template is a constant; should indicatif ever reject it, keep its default.
            if let Ok(style) =
                ProgressStyle::with_template("{spinner} [{bar:30.cyan/blue}] {pos}/{len} {msg}")
            {
                bar.set_style(style.progress_chars("=> "));
            }
            Self::with_sink(total_steps, Sink::Bar(bar))
        } else {
            Self::to_writer(total_steps, Box::new(std::io::stderr()))
        }
    }

    /// [`Progress::new`] with `is_tty` taken from whether stderr is a terminal.
    pub fn auto(total_steps: u64) -> Self {
        use std::io::IsTerminal;
        Self::new(total_steps, std::io::stderr().is_terminal())
    }

    /// Plain log lines written to `out` (tests, or a log file).
    pub fn to_writer(total_steps: u64, out: Box<dyn Write + Send>) -> Self {
        Self::with_sink(total_steps, Sink::Lines(out))
    }

    fn with_sink(total: u64, sink: Sink) -> Self {
        Self {
            sink,
            total,
            log_every: total.div_ceil(20).max(1),
            started: Instant::now(),
            first_step: 0,
            last_step: None,
            last_logged: None,
            last_values: Vec::new(),
        }
    }

    /// Log-line cadence in steps (plain mode only; the bar redraws itself).
    pub fn with_log_every(mut self, steps: u64) -> Self {
        self.log_every = steps.max(1);
        self
    }

    /// Marks that the run resumed after `step` so the ETA only counts steps timed here.
    pub fn resumed_from(mut self, step: u64) -> Self {
        self.first_step = step;
        if let Sink::Bar(bar) = &self.sink {
            bar.set_position(step);
            bar.reset_eta();
        }
        self
    }

    /// Reports that `step` (1-based count of finished steps) is done, with its values.
    pub fn update(&mut self, step: u64, values: &[(&str, f64)]) {
        self.last_step = Some(step);
        self.last_values = values.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let eta = self.eta(step);
        match &mut self.sink {
            Sink::Bar(bar) => {
                bar.set_position(step);
                let mut msg = format_values(values);
                if let Some(eta) = eta {
                    msg.push_str(&format!(" eta {}", format_duration(eta)));
                }
                bar.set_message(msg);
            }
            Sink::Lines(out) => {
                let due = self.last_logged.is_none()
                    || step.checked_rem(self.log_every) == Some(0)
                    || step >= self.total;
                if due {
                    let line = format_status(step, self.total, values, eta);
                    // Progress output is advisory: a closed stderr must not stop training.
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                    self.last_logged = Some(step);
                }
            }
        }
    }

    /// Prints a message without breaking the bar (above it on a terminal).
    pub fn println(&mut self, msg: &str) {
        match &mut self.sink {
            Sink::Bar(bar) => bar.println(msg),
            Sink::Lines(out) => {
                let _ = writeln!(out, "{msg}");
                let _ = out.flush();
            }
        }
    }

    /// Ends the display; in plain mode logs the last step if it was not logged yet, then the
    /// total time.
    pub fn finish(&mut self) {
        let elapsed = self.started.elapsed();
        match &mut self.sink {
            Sink::Bar(bar) => bar.finish(),
            Sink::Lines(out) => {
                if let Some(step) = self.last_step.filter(|s| Some(*s) != self.last_logged) {
                    let values: Vec<(&str, f64)> = self
                        .last_values
                        .iter()
                        .map(|(k, v)| (k.as_str(), *v))
                        .collect();
                    let _ = writeln!(out, "{}", format_status(step, self.total, &values, None));
                }
                let done = self.last_step.unwrap_or(self.first_step);
                let _ = writeln!(
                    out,
                    "done {done}/{} steps in {}",
                    self.total,
                    format_duration(elapsed)
                );
                let _ = out.flush();
            }
        }
    }

    fn eta(&self, step: u64) -> Option<Duration> {
        let done = step.checked_sub(self.first_step).filter(|d| *d > 0)?;
        let left = self.total.saturating_sub(step);
        let per_step = self.started.elapsed().as_secs_f64() / done as f64;
        Some(Duration::from_secs_f64(per_step * left as f64))
    }
}

/// `step 10/100 loss 1.234 lr 2.0e-4 tok/s 512 eta 1m20s`
pub fn format_status(
    step: u64,
    total: u64,
    values: &[(&str, f64)],
    eta: Option<Duration>,
) -> String {
    let mut s = format!("step {step}/{total}");
    let v = format_values(values);
    if !v.is_empty() {
        s.push(' ');
        s.push_str(&v);
    }
    if let Some(eta) = eta {
        s.push_str(" eta ");
        s.push_str(&format_duration(eta));
    }
    s
}

fn format_values(values: &[(&str, f64)]) -> String {
    values
        .iter()
        .map(|(k, v)| format!("{k} {}", format_value(k, *v)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Compact number for a status line: learning rates always in scientific notation (they span
/// decades), large values as integers, tiny values scientific, the rest with 3 decimals.
pub fn format_value(key: &str, v: f64) -> String {
    let a = v.abs();
    if !v.is_finite() {
        format!("{v}")
    } else if key == "lr" || key.ends_with("/lr") || key.ends_with("_lr") {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a != 0.0 && a < 1e-3 {
        format!("{v:.1e}")
    } else {
        format!("{v:.3}")
    }
}

/// `45s`, `1m20s`, `2h03m`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}
