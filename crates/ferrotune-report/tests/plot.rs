//! Tests for PNG plots: the file is a PNG of the promised size (signature and IHDR read by
//! hand), decodes with the `png` crate, and actually contains a drawn line, not a blank canvas.
//! Set FERROTUNE_PLOT_OUT=dir to keep a plot for looking at.

use ferrotune_report::{
    plot_metrics, plot_series, MetricsWriter, PLOTS_DIR, PLOT_HEIGHT, PLOT_WIDTH,
};
use std::fs;
use std::path::Path;

fn tmp_run(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ferrotune-report-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    dir
}

/// Checks signature + IHDR, decodes to RGB(A) pixels and returns them as RGB triples.
fn decode_png(path: &Path) -> Vec<[u8; 3]> {
    let bytes = fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&bytes[12..16], b"IHDR");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((w, h), (PLOT_WIDTH, PLOT_HEIGHT));

    let decoder = png::Decoder::new(fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("unexpected colour type {other:?}"),
    };
    buf[..info.buffer_size()]
        .chunks(channels)
        .map(|c| [c[0], c[1], c[2]])
        .collect()
}

fn count(pixels: &[[u8; 3]], color: [u8; 3]) -> usize {
    pixels.iter().filter(|p| **p == color).count()
}

#[test]
fn plot_series_draws_lines_in_series_colours() {
    let run = tmp_run("plot");
    let path = run.join("loss.png");
    let train: Vec<(f64, f64)> = (0..=50)
        .map(|s| (s as f64, 3.0 * (-(s as f64) / 20.0).exp() + 0.5))
        .collect();
    let eval: Vec<(f64, f64)> = (0..=5)
        .map(|i| (i as f64 * 10.0, 3.2 * (-(i as f64) / 2.0).exp() + 0.7))
        .collect();
    plot_series(&path, "loss", &[("train", train), ("eval", eval)]).unwrap();
    let px = decode_png(&path);
    let white = count(&px, [255, 255, 255]);
    assert!(white < px.len(), "blank image");
    // Mostly background, but the first series colour (tab10 blue) and the second (orange) are
    // there in quantity: the lines and legend swatches were drawn.
    assert!(white > px.len() / 2);
    let blue = count(&px, [31, 119, 180]);
    let orange = count(&px, [255, 127, 14]);
    assert!(blue > 200, "blue pixels {blue}");
    assert!(orange > 100, "orange pixels {orange}");
    // Dark pixels: axes, tick labels, title text.
    let dark = px.iter().filter(|p| p.iter().all(|c| *c < 80)).count();
    assert!(dark > 500, "dark pixels {dark}");
    if let Ok(out) = std::env::var("FERROTUNE_PLOT_OUT") {
        fs::create_dir_all(&out).unwrap();
        fs::copy(&path, Path::new(&out).join("loss.png")).unwrap();
    }
}

#[test]
fn plot_metrics_writes_one_png_per_present_key() {
    let run = tmp_run("plot-metrics");
    let mut w = MetricsWriter::new(&run).unwrap();
    for step in 1..=20u64 {
        let s = step as f64;
        w.log(
            step,
            &[
                ("loss", 2.0 / s),
                ("lr", 2e-4 * (1.0 - s / 20.0)),
                ("rewards/accuracy", s / 20.0),
            ],
        )
        .unwrap();
    }
    w.log(21, &[("loss", f64::NAN)]).unwrap();
    let written = plot_metrics(&run, &["loss", "rewards/accuracy", "absent"]).unwrap();
    let dir = run.join(PLOTS_DIR);
    assert_eq!(
        written,
        vec![dir.join("loss.png"), dir.join("rewards_accuracy.png")]
    );
    for p in &written {
        let px = decode_png(p);
        assert!(
            count(&px, [31, 119, 180]) > 100,
            "{} has no line",
            p.display()
        );
    }
    assert!(!dir.join("absent.png").exists());
    // Empty key list: every numeric key.
    let all = plot_metrics(&run, &[]).unwrap();
    assert_eq!(all.len(), 3);
    if let Ok(out) = std::env::var("FERROTUNE_PLOT_OUT") {
        fs::copy(dir.join("lr.png"), Path::new(&out).join("lr.png")).unwrap();
    }
}

#[test]
fn flat_and_single_point_series_still_plot() {
    let run = tmp_run("plot-flat");
    plot_series(
        &run.join("flat.png"),
        "flat",
        &[("x", vec![(1.0, 0.5), (2.0, 0.5)])],
    )
    .unwrap();
    plot_series(&run.join("one.png"), "one", &[("x", vec![(3.0, 1.0)])]).unwrap();
    let px = decode_png(&run.join("one.png"));
    assert!(count(&px, [31, 119, 180]) > 10);
}

#[test]
fn nothing_finite_to_plot_is_an_error() {
    let run = tmp_run("plot-empty");
    let err =
        plot_series(&run.join("nan.png"), "nan", &[("x", vec![(1.0, f64::NAN)])]).unwrap_err();
    assert!(err.to_string().contains("no finite points"), "{err}");
}
