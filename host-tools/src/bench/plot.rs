//! `unipeer bench ... --plot FILE.svg`: the figures people compare, drawn with `plotters`
//! (its SVG backend only). A bench builds [`Panel`]s from what it measured and calls
//! [`write_svg`]; one file holds the panels side by side.
//!
//! Series with no points are drawn as nothing and named "(no samples)" in the legend, so a
//! figure never shows a missing series as zeros; a file whose every series is empty is refused.

use anyhow::{Context, bail};
use plotters::prelude::*;
use std::path::Path;

/// One named series of `(x, y)` points.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Draw the points joined by a line (else markers only).
    pub line: bool,
}

impl Series {
    pub fn line(name: &str, points: Vec<(f64, f64)>) -> Self {
        Series {
            name: name.to_string(),
            points,
            line: true,
        }
    }

    pub fn points(name: &str, points: Vec<(f64, f64)>) -> Self {
        Series {
            name: name.to_string(),
            points,
            line: false,
        }
    }

    /// Finite points only: NaN or infinite values are not drawn (never as zeros).
    fn finite(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        self.points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
    }

    /// The legend label: the name, marked when nothing was measured.
    pub fn label(&self) -> String {
        if self.finite().next().is_none() {
            format!("{} (no samples)", self.name)
        } else {
            self.name.clone()
        }
    }
}

/// One chart: a title, axis descriptions and its series.
#[derive(Clone, Debug, PartialEq)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// A logarithmic x axis (every x must then be > 0).
    pub log_x: bool,
    pub series: Vec<Series>,
}

impl Panel {
    pub fn new(title: &str, x_label: &str, y_label: &str) -> Self {
        Panel {
            title: title.to_string(),
            x_label: x_label.to_string(),
            y_label: y_label.to_string(),
            log_x: false,
            series: Vec::new(),
        }
    }

    pub fn log_x(mut self) -> Self {
        self.log_x = true;
        self
    }

    pub fn with(mut self, s: Series) -> Self {
        self.series.push(s);
        self
    }
}

/// The empirical CDF of `samples`: `(value, fraction of samples <= value)`, sorted.
pub fn cdf(samples: &[f64]) -> Vec<(f64, f64)> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    v.iter()
        .enumerate()
        .map(|(i, x)| (*x, (i + 1) as f64 / n))
        .collect()
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

const PANEL_W: u32 = 520;
const PANEL_H: u32 = 400;

/// Renders the panels side by side into an SVG document.
pub fn render_svg(panels: &[Panel]) -> anyhow::Result<String> {
    if panels.is_empty() {
        bail!("no figure to plot");
    }
    if panels
        .iter()
        .all(|p| p.series.iter().all(|s| s.finite().next().is_none()))
    {
        bail!("no samples in any series: nothing to plot");
    }
    let mut svg = String::new();
    {
        let size = (PANEL_W * panels.len() as u32, PANEL_H);
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let areas = root.split_evenly((1, panels.len()));
        for (panel, area) in panels.iter().zip(areas.iter()) {
            draw_panel(panel, area)?;
        }
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// Renders the panels and writes them to `path`.
pub fn write_svg(path: &Path, panels: &[Panel]) -> anyhow::Result<()> {
    let svg = render_svg(panels)?;
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plotting: {e:?}")
}

/// The range of finite values, widened when flat and padded by 5 %.
fn range(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() || !hi.is_finite() {
        return None;
    }
    let (lo, hi) = if hi - lo < 1e-9 {
        (
            lo - 0.5_f64.max(lo.abs() * 0.05),
            hi + 0.5_f64.max(hi.abs() * 0.05),
        )
    } else {
        (lo, hi)
    };
    let pad = (hi - lo) * 0.05;
    Some((lo - pad, hi + pad))
}

fn draw_panel<DB: DrawingBackend>(
    panel: &Panel,
    area: &DrawingArea<DB, plotters::coord::Shift>,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    // A log axis plots log10(x) and labels ticks with x.
    let tx = |x: f64| if panel.log_x { x.log10() } else { x };
    let pts: Vec<Vec<(f64, f64)>> = panel
        .series
        .iter()
        .map(|s| {
            s.finite()
                .filter(|(x, _)| !panel.log_x || *x > 0.0)
                .map(|(x, y)| (tx(x), y))
                .collect()
        })
        .collect();
    let xr = range(pts.iter().flatten().map(|p| p.0)).unwrap_or((0.0, 1.0));
    let yr = range(pts.iter().flatten().map(|p| p.1)).unwrap_or((0.0, 1.0));
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(xr.0..xr.1, yr.0..yr.1)
        .map_err(plot_err)?;
    let log_x = panel.log_x;
    let x_fmt = move |v: &f64| {
        let x = if log_x { 10f64.powf(*v) } else { *v };
        if x.abs() >= 100.0 || x == x.round() {
            format!("{x:.0}")
        } else {
            format!("{x:.2}")
        }
    };
    chart
        .configure_mesh()
        .x_desc(panel.x_label.as_str())
        .y_desc(panel.y_label.as_str())
        .x_label_formatter(&x_fmt)
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(plot_err)?;
    for (i, (s, p)) in panel.series.iter().zip(pts).enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let label = s.label();
        if s.line {
            chart
                .draw_series(LineSeries::new(p.clone(), color.stroke_width(2)))
                .map_err(plot_err)?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
            chart
                .draw_series(p.iter().map(|q| Circle::new(*q, 3, color.filled())))
                .map_err(plot_err)?;
        } else {
            chart
                .draw_series(p.iter().map(|q| Circle::new(*q, 4, color.filled())))
                .map_err(plot_err)?
                .label(label)
                .legend(move |(x, y)| Circle::new((x + 9, y), 4, color.filled()));
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// The text of every `<text>` element of an SVG document, which must parse as XML.
    pub fn svg_texts(svg: &str) -> Vec<String> {
        let doc = roxmltree::Document::parse(svg).expect("the SVG parses as XML");
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        doc.descendants()
            .filter(|n| n.has_tag_name("text"))
            .map(|n| n.text().unwrap_or("").trim().to_string())
            .collect()
    }

    /// How many drawn lines (polylines) of at least `min_points` points the document has
    /// (a legend's sample line has two).
    pub fn svg_polylines(svg: &str, min_points: usize) -> usize {
        let doc = roxmltree::Document::parse(svg).expect("the SVG parses as XML");
        doc.descendants()
            .filter(|n| n.has_tag_name("polyline"))
            .filter(|n| {
                let pts = n.attribute("points").unwrap_or("");
                pts.split_whitespace().count() >= min_points
            })
            .count()
    }

    #[test]
    fn panels_render_to_valid_svg_naming_their_series() {
        let p1 = Panel::new("hops against N", "N", "hops")
            .log_x()
            .with(Series::line(
                "mean hops",
                vec![(1e3, 2.4), (1e4, 3.2), (1e5, 4.1)],
            ))
            .with(Series::line(
                "log16 N",
                vec![(1e3, 2.5), (1e4, 3.3), (1e5, 4.2)],
            ));
        let p2 = Panel::new("RTT CDF", "us", "fraction")
            .with(Series::line("ours", cdf(&[3.0, 1.0, 2.0])))
            .with(Series::points("Linux", vec![]));
        let svg = render_svg(&[p1, p2]).unwrap();
        let texts = svg_texts(&svg);
        for want in [
            "hops against N",
            "mean hops",
            "log16 N",
            "ours",
            "Linux (no samples)",
        ] {
            assert!(texts.iter().any(|t| t == want), "{want} not in {texts:?}");
        }
        // Three drawn lines: two series and one CDF (the empty series draws none).
        assert_eq!(svg_polylines(&svg, 3), 3, "{svg}");
        // Ticks on the log axis are labelled with N, not its logarithm.
        assert!(texts.iter().any(|t| t == "10000"), "{texts:?}");
    }

    #[test]
    fn nothing_measured_is_refused_and_cdf_is_sorted() {
        let empty = Panel::new("t", "x", "y").with(Series::line("a", vec![(1.0, f64::NAN)]));
        assert!(render_svg(&[empty]).is_err());
        assert!(render_svg(&[]).is_err());
        assert_eq!(
            cdf(&[2.0, f64::NAN, 1.0]),
            vec![(1.0, 0.5), (2.0, 1.0)],
            "NaN dropped, fractions of the finite samples"
        );
    }
}
