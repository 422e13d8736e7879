//! PNG plots of the cost curves (plotters, bitmap backend, a TrueType font from the
//! system registered for text).

use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::Path;

/// One line (or, with `points_only`, separate markers) on a chart.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
    pub points_only: bool,
}

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Registers a system font as "sans-serif"; plots need one to draw any text.
pub fn register_font() -> Result<(), String> {
    for path in FONT_CANDIDATES {
        if let Ok(bytes) = std::fs::read(path) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{path}: not a usable font"));
        }
    }
    Err(format!("no TrueType font found (tried {FONT_CANDIDATES:?}); apt-get install fonts-dejavu-core"))
}

/// A chart with logarithmic axes on both sides.
pub fn log_log(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Result<(), String> {
    let all: Vec<(f64, f64)> =
        series.iter().flat_map(|s| s.points.iter().copied()).filter(|(x, y)| *x > 0.0 && *y > 0.0).collect();
    if all.is_empty() {
        return Err(format!("{title}: nothing to plot"));
    }
    let (x_min, x_max) = all.iter().fold((f64::MAX, f64::MIN), |(lo, hi), (x, _)| (lo.min(*x), hi.max(*x)));
    let (y_min, y_max) = all.iter().fold((f64::MAX, f64::MIN), |(lo, hi), (_, y)| (lo.min(*y), hi.max(*y)));
    let e = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d((x_min / 1.5..x_max * 1.5).log_scale(), (y_min / 2.0..y_max * 2.0).log_scale())
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&|x| human(*x))
        .y_label_formatter(&|y| human(*y))
        .draw()
        .map_err(|x| e(&x))?;
    for s in series {
        let color = s.color;
        let points: Vec<(f64, f64)> = s.points.iter().copied().filter(|(x, y)| *x > 0.0 && *y > 0.0).collect();
        if points.is_empty() {
            continue;
        }
        let drawn = if s.points_only {
            chart.draw_series(points.iter().map(move |p| TriangleMarker::new(*p, 8, color.filled())))
        } else {
            chart.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)).point_size(4))
        }
        .map_err(|x| e(&x))?;
        if s.points_only {
            drawn.label(s.name.as_str()).legend(move |(x, y)| TriangleMarker::new((x + 10, y), 6, color.filled()));
        } else {
            drawn
                .label(s.name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

/// 1500 -> "1.5k", 2e6 -> "2M".
pub fn human(v: f64) -> String {
    let (scaled, unit) = match v.abs() {
        a if a >= 1e9 => (v / 1e9, "G"),
        a if a >= 1e6 => (v / 1e6, "M"),
        a if a >= 1e3 => (v / 1e3, "k"),
        _ => (v, ""),
    };
    if scaled.fract().abs() < 1e-9 || scaled.abs() >= 100.0 {
        format!("{scaled:.0}{unit}")
    } else {
        format!("{scaled:.1}{unit}")
    }
}
