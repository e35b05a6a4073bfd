//! PNG line charts of logged metrics (`RUN/plots/<key>.png`), drawn with plotters' bitmap
//! backend and an embedded font (a subset of DejaVu Sans, licence in `assets/`), so plotting
//! needs no system fonts. Owns drawing only: the numbers come from `metrics.jsonl` as written,
//! nothing is smoothed or aggregated here.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::error::{ReportError, Result};
use crate::metrics::{metric_series, read_metrics, MetricRecord, METRICS_FILE};

/// Sub-folder of the run folder holding the PNG plots.
pub const PLOTS_DIR: &str = "plots";

/// Pixel size of every plot.
pub const PLOT_WIDTH: u32 = 800;
pub const PLOT_HEIGHT: u32 = 480;

/// DejaVu Sans cut down to ASCII plus a few symbols (° ± µ · × α β ε λ π σ … − →) with
/// fontTools' `pyftsubset` (11 KB instead of 740 KB). Licence: assets/LICENSE-DejaVu.txt.
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans-subset.ttf");
const FONT_FAMILY: &str = "sans-serif";

/// Line colours (the "tab10" palette), cycled when there are more series.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Registers the embedded font with plotters once per process.
fn ensure_font(path: &Path) -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(plot_err(path, "embedded font could not be parsed"))
    }
}

fn plot_err(path: &Path, reason: impl ToString) -> ReportError {
    ReportError::Plot {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Line chart with x = step, y labelled with the title. See [`plot_series_labeled`].
pub fn plot_series(path: &Path, title: &str, series: &[(&str, Vec<(f64, f64)>)]) -> Result<()> {
    plot_series_labeled(path, title, "step", title, series)
}

/// Writes a PNG line chart of `series` (name, `(x, y)` points) to `path`, with a title, axis
/// labels and a legend. Non-finite points are skipped (a NaN loss leaves a gap in the data, not
/// a broken axis); it is an error if no finite point is left.
pub fn plot_series_labeled(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(&str, Vec<(f64, f64)>)],
) -> Result<()> {
    ensure_font(path)?;
    let clean: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(name, pts)| {
            let pts = pts
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect();
            (*name, pts)
        })
        .collect();
    let all = clean.iter().flat_map(|(_, p)| p.iter());
    let (x_range, y_range) = match bounds(all) {
        Some(b) => b,
        None => return Err(plot_err(path, "no finite points to plot")),
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| ReportError::io("create folder", parent, e))?;
    }

    let root = BitMapBackend::new(path, (PLOT_WIDTH, PLOT_HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT_FAMILY, 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(x_range.0..x_range.1, y_range.0..y_range.1)
        .map_err(|e| plot_err(path, e))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style((FONT_FAMILY, 14))
        .axis_desc_style((FONT_FAMILY, 16))
        .x_label_formatter(&|v| tick_label(*v))
        .y_label_formatter(&|v| tick_label(*v))
        .light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(RGBColor(210, 210, 210))
        .draw()
        .map_err(|e| plot_err(path, e))?;

    for (i, (name, pts)) in clean.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let drawn = if pts.len() == 1 {
            // A single point makes no line; draw a dot so the value is still visible.
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| plot_err(path, e))?
        } else {
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(|e| plot_err(path, e))?
        };
        if !name.is_empty() {
            drawn.label(*name).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
    }
    if clean.iter().any(|(name, _)| !name.is_empty()) {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT_FAMILY, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| plot_err(path, e))?;
    }
    root.present().map_err(|e| plot_err(path, e))?;
    Ok(())
}

/// Axis ranges covering all points, padded so lines do not sit on the frame; a flat series
/// gets a non-empty range.
fn bounds<'a>(pts: impl Iterator<Item = &'a (f64, f64)>) -> Option<((f64, f64), (f64, f64))> {
    let mut b: Option<(f64, f64, f64, f64)> = None;
    for &(x, y) in pts {
        b = Some(match b {
            None => (x, x, y, y),
            Some((x0, x1, y0, y1)) => (x0.min(x), x1.max(x), y0.min(y), y1.max(y)),
        });
    }
    let (x0, x1, y0, y1) = b?;
    let widen = |lo: f64, hi: f64, frac: f64| {
        if hi > lo {
            let pad = (hi - lo) * frac;
            (lo - pad, hi + pad)
        } else {
            let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
            (lo - pad, hi + pad)
        }
    };
    Some((widen(x0, x1, 0.0), widen(y0, y1, 0.05)))
}

/// Short tick labels: integers as integers, tiny or huge values in scientific notation.
fn tick_label(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e6).contains(&a) {
        format!("{v:.1e}")
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// File-name-safe form of a metric key (`rewards/accuracy` → `rewards_accuracy`).
pub fn plot_file_stem(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Every key that has at least one numeric value, sorted.
pub fn numeric_keys(records: &[MetricRecord]) -> Vec<String> {
    let keys: BTreeSet<&String> = records
        .iter()
        .flat_map(|r| {
            r.fields
                .iter()
                .filter(|(_, v)| v.is_number())
                .map(|(k, _)| k)
        })
        .collect();
    keys.into_iter().cloned().collect()
}

/// Reads `RUN/metrics.jsonl` and writes `RUN/plots/<key>.png` for each of `keys` that has at
/// least one finite value (all numeric keys when `keys` is empty). Returns the written paths.
pub fn plot_metrics(run_dir: &Path, keys: &[&str]) -> Result<Vec<PathBuf>> {
    let records = read_metrics(&run_dir.join(METRICS_FILE))?;
    let wanted: Vec<String> = if keys.is_empty() {
        numeric_keys(&records)
    } else {
        keys.iter().map(|k| k.to_string()).collect()
    };
    let dir = run_dir.join(PLOTS_DIR);
    let mut written = Vec::new();
    for key in &wanted {
        let pts = metric_series(&records, key);
        if pts.is_empty() {
            continue;
        }
        let path = dir.join(format!("{}.png", plot_file_stem(key)));
        plot_series(&path, key, &[(key.as_str(), pts)])?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(tick_label(0.0), "0");
        assert_eq!(tick_label(20.0), "20");
        assert_eq!(tick_label(0.25), "0.25");
        assert_eq!(tick_label(2e-4), "2.0e-4");
        assert_eq!(tick_label(1234.5), "1234.5");
    }

    #[test]
    fn flat_series_gets_nonempty_range() {
        let pts = [(3.0, 5.0)];
        let ((x0, x1), (y0, y1)) = bounds(pts.iter()).unwrap();
        assert!(x0 < 3.0 && x1 > 3.0);
        assert!(y0 < 5.0 && y1 > 5.0);
    }

    #[test]
    fn file_stems_are_safe() {
        assert_eq!(plot_file_stem("rewards/accuracy"), "rewards_accuracy");
        assert_eq!(plot_file_stem("kl mean"), "kl_mean");
    }
}
