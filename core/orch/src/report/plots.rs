//! Drawing the report's figures with `plotters`, each as PNG and SVG from
//! one drawing function generic over the backend.
//!
//! Text is laid out with DejaVu Sans from the `dejavu` crate, registered
//! with plotters' `ab_glyph` support: plotters' default `ttf` feature finds
//! fonts through fontconfig and freetype, system libraries a fresh machine
//! does not have.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor;

/// One line of a learning-curve panel: a variant (runs differing by seed).
pub struct Curve {
    pub label: String,
    /// Epochs (from 1), ascending.
    pub epochs: Vec<u32>,
    /// Mean over seeds at each epoch (NaN: no value).
    pub mean: Vec<f64>,
    /// Lowest and highest seed at each epoch, drawn as a band.
    pub low: Vec<f64>,
    pub high: Vec<f64>,
}

/// Training loss and a validation metric per epoch, side by side.
pub struct LearningCurves {
    pub title: String,
    pub loss: Vec<Curve>,
    pub valid: Vec<Curve>,
    pub valid_label: String,
}

/// Grouped bars with error bars: a cluster per category, a bar per series.
pub struct Bars {
    pub title: String,
    pub y_label: String,
    pub categories: Vec<String>,
    pub series: Vec<BarSeries>,
}

/// Values of one series (NaN: missing), with their standard deviations
/// (NaN or 0: no error bar).
pub struct BarSeries {
    pub label: String,
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

/// A metric against one swept hyper-parameter, a line per series.
pub struct ParamCurve {
    pub title: String,
    pub key: String,
    pub y_label: String,
    /// Distinct values, ascending.
    pub x: Vec<f64>,
    pub log_x: bool,
    pub series: Vec<BarSeries>,
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

const FONT: &str = "sans-serif";

/// Registers the embedded font once.
fn fonts() -> Result<()> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = DONE.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
    });
    if !ok {
        bail!("the embedded DejaVu Sans font could not be read");
    }
    Ok(())
}

/// A figure, drawable on any backend.
trait Figure {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult
    where
        DB::ErrorType: 'static;
}

/// Draws `figure` into `<dir>/<stem>.png` and `.svg` (each written to a
/// temporary name, then renamed).
fn both(dir: &Path, stem: &str, size: (u32, u32), figure: &impl Figure) -> Result<Vec<PathBuf>> {
    fonts()?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let failed =
        |path: &Path, e: Box<dyn std::error::Error>| anyhow!("cannot draw {}: {e}", path.display());
    let png = dir.join(format!("{stem}.png"));
    let tmp = dir.join(format!(".{stem}.tmp.png"));
    {
        let root = BitMapBackend::new(&tmp, size).into_drawing_area();
        figure.draw(&root).map_err(|e| failed(&png, e))?;
        root.present().map_err(|e| failed(&png, e.into()))?;
    }
    std::fs::rename(&tmp, &png).with_context(|| format!("cannot write {}", png.display()))?;
    let svg = dir.join(format!("{stem}.svg"));
    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, size).into_drawing_area();
        figure.draw(&root).map_err(|e| failed(&svg, e))?;
        root.present().map_err(|e| failed(&svg, e.into()))?;
    }
    crate::files::write_atomic(&svg, text.as_bytes())?;
    Ok(vec![png, svg])
}

/// The i-th colour of a fixed palette.
fn colour(i: usize) -> RGBColor {
    const C: [(u8, u8, u8); 10] = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ];
    let (r, g, b) = C[i % C.len()];
    RGBColor(r, g, b)
}

/// A range covering `values` (finite ones) with a margin; `None` if none.
fn range(values: impl Iterator<Item = f64>, from_zero: bool) -> Option<(f64, f64)> {
    let finite: Vec<f64> = values.filter(|v| v.is_finite()).collect();
    if finite.is_empty() {
        return None;
    }
    let mut lo = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let mut hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if from_zero {
        lo = lo.min(0.0);
    }
    let span = if hi > lo { hi - lo } else { hi.abs().max(1e-3) };
    hi += 0.08 * span;
    if !from_zero || lo < 0.0 {
        lo -= 0.08 * span;
    }
    Some((lo, hi))
}

/// Consecutive finite points, as separate line pieces.
fn pieces(points: impl Iterator<Item = (f64, f64)>) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = vec![vec![]];
    for (x, y) in points {
        if y.is_finite() {
            if let Some(p) = out.last_mut() {
                p.push((x, y));
            }
        } else if out.last().is_some_and(|p| !p.is_empty()) {
            out.push(vec![]);
        }
    }
    out.retain(|p| !p.is_empty());
    out
}

/// Training loss and validation metric per epoch, a line per variant and
/// the seeds' band.
pub fn learning_curves(plot: &LearningCurves, dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let values = |cs: &[Curve]| -> Vec<f64> {
        cs.iter()
            .flat_map(|c| c.mean.iter().chain(&c.low).chain(&c.high).copied())
            .collect()
    };
    let loss_y = range(values(&plot.loss).into_iter(), false);
    let valid_y = range(values(&plot.valid).into_iter(), false);
    let (Some(loss_y), Some(valid_y)) = (loss_y, valid_y) else {
        bail!("plot `{stem}` ({}): no finite value to draw", plot.title);
    };
    let last = plot
        .loss
        .iter()
        .chain(&plot.valid)
        .flat_map(|c| c.epochs.last().copied())
        .max()
        .unwrap_or(1);
    let fig = CurvesFigure {
        plot,
        x: (0.8, last as f64 + 0.2),
        loss_y,
        valid_y,
    };
    both(dir, stem, (1200, 500), &fig)
}

struct CurvesFigure<'a> {
    plot: &'a LearningCurves,
    x: (f64, f64),
    loss_y: (f64, f64),
    valid_y: (f64, f64),
}

impl Figure for CurvesFigure<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        let p = self.plot;
        root.fill(&WHITE)?;
        let root = root.titled(&p.title, (FONT, 22))?;
        let panels = root.split_evenly((1, 2));
        curve_panel(
            &panels[0],
            &p.loss,
            "training loss",
            self.x,
            self.loss_y,
            true,
        )?;
        curve_panel(
            &panels[1],
            &p.valid,
            &p.valid_label,
            self.x,
            self.valid_y,
            false,
        )
    }
}

fn curve_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    curves: &[Curve],
    y_label: &str,
    x: (f64, f64),
    y: (f64, f64),
    legend_top: bool,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x.0..x.1, y.0..y.1)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(y_label)
        .label_style((FONT, 14))
        .x_labels(((x.1 - x.0).ceil() as usize + 1).min(12))
        .x_label_formatter(&|v| match (v - v.round()).abs() < 1e-6 {
            true => format!("{v:.0}"),
            false => String::new(),
        })
        .draw()?;
    for (i, c) in curves.iter().enumerate() {
        let col = colour(i);
        let xs = c.epochs.iter().map(|&e| e as f64);
        for band in pieces(xs.clone().zip(c.low.iter().copied())) {
            let mut poly = band.clone();
            let highs: Vec<(f64, f64)> = band
                .iter()
                .filter_map(|(e, _)| {
                    let k = c.epochs.iter().position(|&x| x as f64 == *e)?;
                    Some((*e, c.high[k]))
                })
                .collect();
            poly.extend(highs.into_iter().rev());
            chart.draw_series(std::iter::once(Polygon::new(poly, col.mix(0.18).filled())))?;
        }
        let mut first = true;
        for line in pieces(xs.clone().zip(c.mean.iter().copied())) {
            let s = chart.draw_series(LineSeries::new(line.clone(), col.stroke_width(2)))?;
            if std::mem::take(&mut first) {
                s.label(&c.label).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2))
                });
            }
            if line.len() == 1 {
                chart.draw_series(line.iter().map(|p| Circle::new(*p, 3, col.filled())))?;
            }
        }
    }
    let at = match legend_top {
        true => SeriesLabelPosition::UpperRight,
        false => SeriesLabelPosition::LowerRight,
    };
    legend(&mut chart, at)
}

fn legend<'a, DB: DrawingBackend + 'a, X: Ranged, Y: Ranged>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    at: SeriesLabelPosition,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(at)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()?;
    Ok(())
}

/// Grouped bars with error bars of one standard deviation.
pub fn bars(plot: &Bars, dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let tops = plot.series.iter().flat_map(|s| {
        s.mean
            .iter()
            .zip(&s.std)
            .map(|(m, sd)| m + if sd.is_finite() { *sd } else { 0.0 })
    });
    let Some(y) = range(tops, true) else {
        bail!("plot `{stem}` ({}): no finite value to draw", plot.title);
    };
    both(dir, stem, (900, 500), &BarsFigure { plot, y })
}

struct BarsFigure<'a> {
    plot: &'a Bars,
    y: (f64, f64),
}

impl Figure for BarsFigure<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        let (plot, y) = (self.plot, self.y);
        let n = plot.categories.len();
        root.fill(&WHITE)?;
        let root = root.titled(&plot.title, (FONT, 20))?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5..(n as f64 - 0.5), y.0..y.1)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc(&plot.y_label)
            .label_style((FONT, 14))
            .draw()?;
        let width = 0.8 / plot.series.len().max(1) as f64;
        for (i, s) in plot.series.iter().enumerate() {
            let col = colour(i);
            let mut labelled = false;
            for (c, (&m, &sd)) in s.mean.iter().zip(&s.std).enumerate() {
                if !m.is_finite() {
                    continue;
                }
                let x0 = c as f64 - 0.4 + i as f64 * width;
                let bar = Rectangle::new([(x0, 0.0), (x0 + width * 0.92, m)], col.filled());
                let drawn = chart.draw_series(std::iter::once(bar))?;
                if !labelled {
                    labelled = true;
                    drawn.label(&s.label).legend(move |(x, y)| {
                        Rectangle::new([(x, y - 6), (x + 14, y + 6)], col.filled())
                    });
                }
                if sd.is_finite() && sd > 0.0 {
                    let xc = x0 + width * 0.46;
                    let e = ErrorBar::new_vertical(xc, m - sd, m, m + sd, BLACK.stroke_width(1), 8);
                    chart.draw_series(std::iter::once(e))?;
                }
            }
        }
        for (c, name) in plot.categories.iter().enumerate() {
            let (px, py) = chart.backend_coord(&(c as f64, y.0));
            let style = TextStyle::from((FONT, 15).into_font()).pos(text_anchor::Pos::new(
                text_anchor::HPos::Center,
                text_anchor::VPos::Top,
            ));
            root.draw(&Text::new(name.clone(), (px, py + 8), style))?;
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)
    }
}

/// A metric against a swept value, with error bars of one standard
/// deviation; a log axis draws log10 of the values, labelled with them.
pub fn param_curve(plot: &ParamCurve, dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let values = plot.series.iter().flat_map(|s| {
        s.mean.iter().zip(&s.std).flat_map(|(m, sd)| {
            let sd = if sd.is_finite() { *sd } else { 0.0 };
            [m - sd, m + sd]
        })
    });
    let (Some(y), false) = (range(values, false), plot.x.is_empty()) else {
        bail!("plot `{stem}` ({}): no finite value to draw", plot.title);
    };
    let at = |x: f64| if plot.log_x { x.log10() } else { x };
    let xs: Vec<f64> = plot.x.iter().map(|&x| at(x)).collect();
    let (lo, hi) = (xs[0], xs[xs.len() - 1]);
    let pad = if hi > lo { 0.08 * (hi - lo) } else { 0.5 };
    let fig = ParamFigure {
        plot,
        xs,
        x: (lo - pad, hi + pad),
        y,
    };
    both(dir, stem, (900, 500), &fig)
}

struct ParamFigure<'a> {
    plot: &'a ParamCurve,
    /// The values on the axis (log10 on a log axis).
    xs: Vec<f64>,
    x: (f64, f64),
    y: (f64, f64),
}

impl Figure for ParamFigure<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        let (plot, xs, y) = (self.plot, &self.xs, self.y);
        let (lo, hi) = (xs[0], xs[xs.len() - 1]);
        root.fill(&WHITE)?;
        let root = root.titled(&plot.title, (FONT, 20))?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(56)
            .y_label_area_size(70)
            .build_cartesian_2d(self.x.0..self.x.1, y.0..y.1)?;
        chart
            .configure_mesh()
            .x_labels(0)
            .y_desc(&plot.y_label)
            .label_style((FONT, 14))
            .draw()?;
        for (i, s) in plot.series.iter().enumerate() {
            let col = colour(i);
            let points: Vec<(f64, f64)> = xs.iter().copied().zip(s.mean.iter().copied()).collect();
            let mut first = true;
            for line in pieces(points.iter().copied()) {
                let drawn =
                    chart.draw_series(LineSeries::new(line.clone(), col.stroke_width(2)))?;
                if std::mem::take(&mut first) {
                    drawn.label(&s.label).legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2))
                    });
                }
                chart.draw_series(line.iter().map(|p| Circle::new(*p, 4, col.filled())))?;
            }
            for ((x, m), sd) in points.iter().zip(&s.std) {
                if m.is_finite() && sd.is_finite() && *sd > 0.0 {
                    let e = ErrorBar::new_vertical(*x, m - sd, *m, m + sd, col.stroke_width(1), 8);
                    chart.draw_series(std::iter::once(e))?;
                }
            }
        }
        let tick = TextStyle::from((FONT, 14).into_font()).pos(text_anchor::Pos::new(
            text_anchor::HPos::Center,
            text_anchor::VPos::Top,
        ));
        for (x, raw) in xs.iter().zip(&plot.x) {
            let (px, py) = chart.backend_coord(&(*x, y.0));
            root.draw(&Text::new(format!("{raw}"), (px, py + 6), tick.clone()))?;
        }
        let (cx, cy) = chart.backend_coord(&((lo + hi) / 2.0, y.0));
        let name = match plot.log_x {
            true => format!("{} (log scale)", plot.key),
            false => plot.key.clone(),
        };
        root.draw(&Text::new(name, (cx, cy + 28), tick.clone()))?;
        legend(&mut chart, SeriesLabelPosition::UpperLeft)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curve(label: &str, shift: f64) -> Curve {
        let epochs: Vec<u32> = (1..=12).collect();
        let mean: Vec<f64> = epochs.iter().map(|&e| shift + 1.0 / e as f64).collect();
        Curve {
            label: label.into(),
            low: mean.iter().map(|m| m - 0.02).collect(),
            high: mean.iter().map(|m| m + 0.03).collect(),
            mean,
            epochs,
        }
    }

    fn series(label: &str, n: usize, base: f64) -> BarSeries {
        BarSeries {
            label: label.into(),
            mean: (0..n).map(|i| base + 0.02 * i as f64).collect(),
            std: vec![0.01; n],
        }
    }

    fn assert_files(paths: &[PathBuf], labels: &[&str]) {
        assert_eq!(paths.len(), 2);
        let png = std::fs::read(&paths[0]).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000);
        let svg = std::fs::read_to_string(&paths[1]).unwrap();
        assert!(svg.contains("<svg"));
        for l in labels {
            assert!(svg.contains(l), "{l} missing from the SVG");
        }
    }

    #[test]
    fn draws_the_three_figures_as_png_and_svg() {
        let dir = tempfile::tempdir().unwrap();
        let lc = LearningCurves {
            title: "curves".into(),
            loss: vec![curve("plain", 0.5), curve("llmesr", 0.4)],
            valid: vec![curve("plain", 0.0), curve("llmesr", 0.1)],
            valid_label: "valid NDCG@10".into(),
        };
        assert_files(
            &learning_curves(&lc, dir.path(), "lc").unwrap(),
            &["plain", "llmesr"],
        );
        let b = Bars {
            title: "bars".into(),
            y_label: "test NDCG@10".into(),
            categories: vec!["Tail Item".into(), "Head Item".into()],
            series: vec![series("plain", 2, 0.1), series("llmesr", 2, 0.2)],
        };
        assert_files(
            &bars(&b, dir.path(), "bars").unwrap(),
            &["Tail Item", "llmesr"],
        );
        let p = ParamCurve {
            title: "alpha".into(),
            key: "model.alpha".into(),
            y_label: "test NDCG@10".into(),
            x: vec![0.01, 0.1, 1.0],
            log_x: true,
            series: vec![series("Overall", 3, 0.3), series("Tail Item", 3, 0.1)],
        };
        assert_files(
            &param_curve(&p, dir.path(), "alpha").unwrap(),
            &["model.alpha", "Overall"],
        );
    }

    #[test]
    fn nothing_to_draw_is_an_error_naming_the_plot() {
        let dir = tempfile::tempdir().unwrap();
        let b = Bars {
            title: "empty bars".into(),
            y_label: "y".into(),
            categories: vec!["Tail Item".into()],
            series: vec![BarSeries {
                label: "a".into(),
                mean: vec![f64::NAN],
                std: vec![f64::NAN],
            }],
        };
        let err = bars(&b, dir.path(), "head_tail").unwrap_err().to_string();
        assert!(
            err.contains("head_tail") && err.contains("empty bars"),
            "{err}"
        );
    }
}
