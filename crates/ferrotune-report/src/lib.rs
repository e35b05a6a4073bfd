//! The `report` room of ferrotune: everything a run leaves for humans and tools to read —
//! `metrics.jsonl`, TensorBoard event files, PNG plots, a live progress display and the
//! `index.html` run summary. It computes no metrics: values arrive from the trainers already
//! computed and are only written, read back, drawn or displayed.
//!
//! Run-folder layout owned here (the folder itself is chosen by `ckpt`/the CLI):
//! - `RUN/metrics.jsonl` — [`MetricsWriter`], [`read_metrics`]
//! - `RUN/tb/events.out.tfevents.<unix>.<hostname>.ferrotune` — [`TensorBoardWriter`]
//! - `RUN/plots/<key>.png` — [`plot_metrics`], [`plot_series`]
//! - `RUN/index.html` — [`write_summary_html`]
//!
//! Trainers usually hold a [`RunLog`] (JSONL + TensorBoard in one call) and a [`Progress`].

mod error;
mod metrics;
mod plot;
mod progress;
mod run_log;
mod summary;
mod tensorboard;

pub use error::{ReportError, Result};
pub use metrics::{
    metric_series, open_step_log, read_metrics, MetricRecord, MetricsWriter, METRICS_FILE,
};
pub use plot::{
    numeric_keys, plot_file_stem, plot_metrics, plot_series, plot_series_labeled, PLOTS_DIR,
    PLOT_HEIGHT, PLOT_WIDTH,
};
pub use progress::{format_duration, format_status, format_value, Progress};
pub use run_log::RunLog;
pub use summary::{
    default_sections, final_metrics_table, write_summary_html, Section, SUMMARY_FILE,
};
pub use tensorboard::{TensorBoardWriter, TB_DIR};
