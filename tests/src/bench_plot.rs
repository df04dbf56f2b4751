//! SVG line charts of benchmark figures (plotters), referenced from BENCHMARKS.md.

use std::path::Path;

use plotters::prelude::*;

/// One line: a name for the legend and its points.
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// `(x, y)` points, in x order.
    pub points: Vec<(f64, f64)>,
}

/// An axis: its description and whether it is logarithmic.
#[derive(Clone, Debug)]
pub struct Axis {
    /// Description.
    pub label: String,
    /// Logarithmic scale.
    pub log: bool,
}

impl Axis {
    /// A logarithmic axis.
    pub fn log(label: &str) -> Self {
        Self {
            label: label.to_string(),
            log: true,
        }
    }

    /// A linear axis.
    pub fn linear(label: &str) -> Self {
        Self {
            label: label.to_string(),
            log: false,
        }
    }
}

const COLOURS: [RGBColor; 6] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(127, 127, 127),
];

/// The range an axis shows for `values`: padded, positive on a log axis.
fn range(values: impl Iterator<Item = f64>, log: bool) -> std::ops::Range<f64> {
    let values: Vec<f64> = values
        .filter(|v| v.is_finite() && (!log || *v > 0.0))
        .collect();
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() {
        return if log { 1.0..10.0 } else { 0.0..1.0 };
    }
    if log {
        (lo / 2.0)..(hi * 2.0)
    } else {
        let pad = ((hi - lo) * 0.1).max(hi.abs() * 0.1).max(1e-9);
        (lo - pad).min(0.0)..(hi + pad)
    }
}

/// Writes a line chart of `series` to `path` (SVG), creating its directory.
pub fn line_chart(
    path: &Path,
    title: &str,
    x: Axis,
    y: Axis,
    series: &[Series],
) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let xs = range(
        series.iter().flat_map(|s| s.points.iter().map(|p| p.0)),
        x.log,
    );
    let ys = range(
        series.iter().flat_map(|s| s.points.iter().map(|p| p.1)),
        y.log,
    );
    let root = SVGBackend::new(path, (760, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64);
    // plotters types a log axis differently from a linear one: one arm each.
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x.label.as_str())
                .y_desc(y.label.as_str())
                .x_label_formatter(&|v| format!("{v:.0}"))
                .y_label_formatter(&|v| format_value(*v))
                .draw()
                .map_err(plot_error)?;
            for (i, s) in series.iter().enumerate() {
                let colour = COLOURS[i % COLOURS.len()];
                chart
                    .draw_series(LineSeries::new(s.points.clone(), colour.stroke_width(2)))
                    .map_err(plot_error)?
                    .label(s.name.as_str())
                    .legend(move |(px, py)| {
                        PathElement::new(vec![(px, py), (px + 20, py)], colour.stroke_width(2))
                    });
                chart
                    .draw_series(s.points.iter().map(|p| Circle::new(*p, 3, colour.filled())))
                    .map_err(plot_error)?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .border_style(BLACK)
                .background_style(WHITE.mix(0.85))
                .draw()
                .map_err(plot_error)?;
        }};
    }
    match (x.log, y.log) {
        (true, true) => draw!(builder
            .build_cartesian_2d(xs.log_scale(), ys.log_scale())
            .map_err(plot_error)?),
        (true, false) => draw!(builder
            .build_cartesian_2d(xs.log_scale(), ys)
            .map_err(plot_error)?),
        (false, true) => draw!(builder
            .build_cartesian_2d(xs, ys.log_scale())
            .map_err(plot_error)?),
        (false, false) => draw!(builder.build_cartesian_2d(xs, ys).map_err(plot_error)?),
    }
    root.present().map_err(plot_error)?;
    Ok(())
}

fn format_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn plot_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("plot: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_written_with_its_legend() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("sub/chart.svg");
        let series = vec![
            Series {
                name: "RBAC".into(),
                points: vec![(10.0, 6.0), (1000.0, 424.0)],
            },
            Series {
                name: "one point".into(),
                points: vec![(10.0, 9.8)],
            },
        ];
        line_chart(&path, "t", Axis::log("x"), Axis::linear("y"), &series).expect("chart");
        let svg = std::fs::read_to_string(&path).expect("svg");
        assert!(svg.starts_with("<svg") && svg.contains("RBAC") && svg.contains("one point"));
    }
}
