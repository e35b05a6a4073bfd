//! Tests for the run summary page: structure, final-metrics table, relative plot paths.

use ferrotune_report::{
    default_sections, plot_metrics, write_summary_html, MetricsWriter, Section, SUMMARY_FILE,
};
use std::fs;

#[test]
fn summary_lists_final_metrics_and_embeds_plots() {
    let run = std::env::temp_dir().join(format!("ferrotune-report-summary-{}", std::process::id()));
    let _ = fs::remove_dir_all(&run);
    let mut w = MetricsWriter::new(&run).unwrap();
    for step in 1..=10u64 {
        w.log(step, &[("loss", 3.0 - 0.25 * step as f64), ("lr", 1e-4)])
            .unwrap();
    }
    w.log(10, &[("eval/ppl", 4.5)]).unwrap();
    plot_metrics(&run, &["loss"]).unwrap();

    let mut sections = default_sections(&run).unwrap();
    sections.push(Section::Text {
        heading: "Sample".into(),
        body: "<think>2+2</think> 4".into(),
    });
    let path = write_summary_html(&run, "SFT <smoke> run", &sections).unwrap();
    assert_eq!(path, run.join(SUMMARY_FILE));
    let html = fs::read_to_string(&path).unwrap();

    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.trim_end().ends_with("</html>"));
    assert!(html.contains("<title>SFT &lt;smoke&gt; run</title>"));
    // Final values: loss at step 10 is 3 - 2.5 = 0.5; eval/ppl only logged once.
    assert!(
        html.contains("<td>loss</td><td class=\"num\">0.500</td>"),
        "{html}"
    );
    assert!(html.contains("<td>eval/ppl</td><td class=\"num\">4.500</td>"));
    assert!(html.contains("<td>step</td><td class=\"num\">10</td>"));
    // Relative image path that resolves from the run folder.
    assert!(html.contains("<img src=\"plots/loss.png\""), "{html}");
    assert!(run.join("plots/loss.png").exists());
    // User text is escaped, not interpreted.
    assert!(html.contains("&lt;think&gt;2+2&lt;/think&gt; 4"));
    // No external resources: self-contained.
    assert!(!html.contains("http://") && !html.contains("https://") && !html.contains("<script"));
    for tag in ["table", "figure", "pre", "h2"] {
        assert_eq!(
            html.matches(&format!("<{tag}")).count(),
            html.matches(&format!("</{tag}>")).count(),
            "unbalanced <{tag}>"
        );
    }
}
