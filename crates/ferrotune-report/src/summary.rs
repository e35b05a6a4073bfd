//! The run summary page `RUN/index.html`: one self-contained file (inline CSS, no scripts, no
//! network) with tables of final metrics and the PNG plots embedded by relative path, so the
//! run folder can be copied or served as is. Owns layout only; the caller picks what is shown.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{ReportError, Result};
use crate::metrics::{read_metrics, MetricRecord, METRICS_FILE};
use crate::plot::PLOTS_DIR;
use crate::progress::format_value;

/// File name of the summary page inside a run folder.
pub const SUMMARY_FILE: &str = "index.html";

/// One block of the summary page.
#[derive(Debug, Clone, PartialEq)]
pub enum Section {
    /// A two-column table (name, value).
    Table {
        heading: String,
        rows: Vec<(String, String)>,
    },
    /// Images; paths relative to the run folder (e.g. `plots/loss.png`).
    Plots {
        heading: String,
        paths: Vec<PathBuf>,
    },
    /// A paragraph of preformatted text (e.g. a sample completion or the config).
    Text { heading: String, body: String },
}

/// The last logged value of every numeric key (what a "final metrics" table shows), in key
/// order, formatted for display, plus the final step.
pub fn final_metrics_table(records: &[MetricRecord]) -> Vec<(String, String)> {
    let mut last: std::collections::BTreeMap<&str, f64> = Default::default();
    for r in records {
        for (k, v) in &r.fields {
            if let Some(v) = v.as_f64() {
                last.insert(k.as_str(), v);
            }
        }
    }
    let mut rows = Vec::with_capacity(last.len() + 1);
    if let Some(r) = records.last() {
        rows.push(("step".to_string(), r.step.to_string()));
    }
    rows.extend(
        last.into_iter()
            .map(|(k, v)| (k.to_string(), format_value(k, v))),
    );
    rows
}

/// The default page for a run folder: final metrics from `metrics.jsonl` (if present) and every
/// PNG in `plots/` (sorted by name).
pub fn default_sections(run_dir: &Path) -> Result<Vec<Section>> {
    let mut sections = Vec::new();
    let metrics = run_dir.join(METRICS_FILE);
    if metrics.exists() {
        let records = read_metrics(&metrics)?;
        sections.push(Section::Table {
            heading: "Final metrics".into(),
            rows: final_metrics_table(&records),
        });
    }
    let plots_dir = run_dir.join(PLOTS_DIR);
    if plots_dir.is_dir() {
        let entries =
            fs::read_dir(&plots_dir).map_err(|e| ReportError::io("list", &plots_dir, e))?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().ends_with(".png"))
            .map(|n| Path::new(PLOTS_DIR).join(n))
            .collect();
        paths.sort();
        if !paths.is_empty() {
            sections.push(Section::Plots {
                heading: "Plots".into(),
                paths,
            });
        }
    }
    Ok(sections)
}

/// Writes `RUN/index.html` and returns its path. Written to a temporary file and renamed, so a
/// browser refreshing mid-run never sees half a page.
pub fn write_summary_html(run_dir: &Path, title: &str, sections: &[Section]) -> Result<PathBuf> {
    let mut h = String::with_capacity(4096);
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    h.push_str(&format!("<title>{}</title>\n", escape(title)));
    h.push_str(
        "<style>\n\
         body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}\n\
         table{border-collapse:collapse;margin-bottom:1.5em}\n\
         td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}\n\
         td.num{text-align:right;font-variant-numeric:tabular-nums}\n\
         figure{display:inline-block;margin:0 1em 1em 0}\n\
         img{max-width:100%;border:1px solid #ddd}\n\
         pre{background:#f6f6f6;padding:1em;overflow-x:auto;white-space:pre-wrap}\n\
         </style>\n</head>\n<body>\n",
    );
    h.push_str(&format!("<h1>{}</h1>\n", escape(title)));
    for section in sections {
        match section {
            Section::Table { heading, rows } => {
                h.push_str(&format!("<h2>{}</h2>\n<table>\n", escape(heading)));
                h.push_str("<tr><th>metric</th><th>value</th></tr>\n");
                for (name, value) in rows {
                    h.push_str(&format!(
                        "<tr><td>{}</td><td class=\"num\">{}</td></tr>\n",
                        escape(name),
                        escape(value)
                    ));
                }
                h.push_str("</table>\n");
            }
            Section::Plots { heading, paths } => {
                h.push_str(&format!("<h2>{}</h2>\n", escape(heading)));
                for p in paths {
                    let src = url_path(p);
                    let caption = p
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    h.push_str(&format!(
                        "<figure><img src=\"{}\" alt=\"{}\"><figcaption>{}</figcaption></figure>\n",
                        escape(&src),
                        escape(&caption),
                        escape(&caption)
                    ));
                }
            }
            Section::Text { heading, body } => {
                h.push_str(&format!(
                    "<h2>{}</h2>\n<pre>{}</pre>\n",
                    escape(heading),
                    escape(body)
                ));
            }
        }
    }
    h.push_str("</body>\n</html>\n");

    fs::create_dir_all(run_dir).map_err(|e| ReportError::io("create run folder", run_dir, e))?;
    let path = run_dir.join(SUMMARY_FILE);
    let tmp = run_dir.join(format!("{SUMMARY_FILE}.tmp"));
    fs::write(&tmp, h).map_err(|e| ReportError::io("write", &tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| ReportError::io("replace", &path, e))?;
    Ok(path)
}

/// HTML-escapes text for element content and quoted attributes.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// A relative path as a URL path: `/` separators, and characters with meaning in URLs
/// (space, `#`, `?`, `%`) percent-encoded.
fn url_path(p: &Path) -> String {
    let joined: Vec<String> = p
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let mut out = String::new();
    for (i, part) in joined.iter().enumerate() {
        if i > 0 {
            out.push('/');
        }
        for b in part.bytes() {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(escape("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
    }

    #[test]
    fn url_paths_use_slashes_and_encode_spaces() {
        assert_eq!(
            url_path(Path::new("plots/kl mean.png")),
            "plots/kl%20mean.png"
        );
    }
}
