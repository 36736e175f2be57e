//! PNG charts of a training run: loss and validation correlations per epoch, and the final
//! predicted-vs-MOS scatter with its 4-parameter logistic fit.
//!
//! Text is drawn with DejaVu Sans embedded in the binary (plotters' `ab_glyph` backend), so the
//! charts look the same on a CI machine without any system fonts. Files are written atomically:
//! rendered and encoded in memory, written to a temporary file beside the target, then renamed.

use std::error::Error as StdError;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use agiqa_runtime::metrics::{Correlations, Logistic4};
use image::ImageEncoder;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One epoch of a training run as logged.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochPoint {
    /// Epoch number as logged (usually 1-based).
    pub epoch: usize,
    /// Mean training loss over the epoch.
    pub train_loss: f64,
    /// Learning rate at the end of the epoch.
    pub lr: f64,
    /// Validation Pearson correlation, if the run validated this epoch.
    pub val_plcc: Option<f64>,
    /// Validation Spearman rank correlation.
    pub val_srcc: Option<f64>,
    /// Validation Kendall rank correlation.
    pub val_krcc: Option<f64>,
}

/// Why a chart could not be written. Every variant names the target file.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("nothing to plot in {path}: {what} is empty")]
    Empty { path: PathBuf, what: &'static str },
    #[error(
        "cannot plot {path}: {predicted} predictions but {mos} MOS values; \
         pass one prediction per image, in the same order"
    )]
    LengthMismatch {
        path: PathBuf,
        predicted: usize,
        mos: usize,
    },
    #[error("the embedded DejaVu Sans font could not be loaded while plotting {path}")]
    Font { path: PathBuf },
    #[error("drawing {path} failed: {message}")]
    Draw { path: PathBuf, message: String },
    #[error("encoding PNG for {path} failed")]
    Encode {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
    #[error("writing {path} failed (does its folder exist and is it writable?)")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Training curves image size in pixels (width, height).
const CURVES_SIZE: (u32, u32) = (1200, 500);
/// Scatter image size in pixels (width, height).
const SCATTER_SIZE: (u32, u32) = (700, 700);
/// Height in pixels of the band holding the run title. Fixed, so layouts do not shift with the
/// title and an empty title leaves the band blank.
const TITLE_BAND: u32 = 40;
/// Samples of the logistic curve across the x range: smooth at 700 px without being costly.
const CURVE_SAMPLES: usize = 400;
/// Up to this many epochs each epoch also gets a marker, so short runs (even one epoch) show.
const MARKER_MAX_EPOCHS: usize = 60;

const FONT: FontFamily<'static> = FontFamily::SansSerif;
const PLCC_COLOR: RGBColor = RGBColor(31, 119, 180);
const SRCC_COLOR: RGBColor = RGBColor(214, 39, 40);
const KRCC_COLOR: RGBColor = RGBColor(44, 160, 44);
const LR_COLOR: RGBColor = RGBColor(255, 127, 14);
const GREY: RGBColor = RGBColor(120, 120, 120);

type DrawResult = Result<(), Box<dyn StdError>>;

/// Loss (left) and validation correlations (right) per epoch, 1200x500 PNG; title names the run.
///
/// The left panel also shows the learning rate on a secondary axis. Epochs may come in any
/// order; non-finite values leave a gap in their line instead of failing.
pub fn plot_training_curves(
    path: &Path,
    title: &str,
    points: &[EpochPoint],
) -> Result<(), PlotError> {
    if points.is_empty() {
        return Err(PlotError::Empty {
            path: path.to_owned(),
            what: "the epoch list",
        });
    }
    let mut points = points.to_vec();
    points.sort_by_key(|p| p.epoch);
    render_png(path, CURVES_SIZE, |root| {
        let body = draw_title(root, title)?;
        let (left, right) = body.split_horizontally(CURVES_SIZE.0 / 2);
        draw_loss_panel(&left, &points)?;
        draw_validation_panel(&right, &points)
    })
}

/// Predicted score vs MOS scatter with the identity line and the fitted 4-parameter logistic
/// curve, PLCC/SRCC/KRCC in the legend or title; 700x700 PNG.
///
/// Pairs with a non-finite value are left out of the scatter (the legend counts the plotted
/// points; `stats.n` is printed as given).
pub fn plot_scatter(
    path: &Path,
    title: &str,
    predicted: &[f64],
    mos: &[f64],
    logistic: Option<&Logistic4>,
    stats: &Correlations,
) -> Result<(), PlotError> {
    if predicted.len() != mos.len() {
        return Err(PlotError::LengthMismatch {
            path: path.to_owned(),
            predicted: predicted.len(),
            mos: mos.len(),
        });
    }
    if predicted.is_empty() {
        return Err(PlotError::Empty {
            path: path.to_owned(),
            what: "the prediction list",
        });
    }
    render_png(path, SCATTER_SIZE, |root| {
        let body = draw_title(root, title)?;
        let stats_line = format!(
            "n = {}    PLCC {:.4}    SRCC {:.4}    KRCC {:.4}",
            stats.n, stats.plcc, stats.srcc, stats.krcc
        );
        let body = body.titled(&stats_line, (FONT, 16).into_font().color(&BLACK))?;
        draw_scatter_chart(&body, predicted, mos, logistic, stats)
    })
}

/// Draws `title` centred in a fixed band at the top and returns the area below it.
fn draw_title<'a>(
    root: &DrawingArea<BitMapBackend<'a>, Shift>,
    title: &str,
) -> Result<DrawingArea<BitMapBackend<'a>, Shift>, Box<dyn StdError>> {
    let (band, body) = root.split_vertically(TITLE_BAND);
    if !title.is_empty() {
        let (w, h) = band.dim_in_pixel();
        let style = TextStyle::from((FONT, 22, FontStyle::Bold).into_font())
            .pos(Pos::new(HPos::Center, VPos::Center));
        band.draw_text(title, &style, (w as i32 / 2, h as i32 / 2))?;
    }
    Ok(body)
}

fn draw_loss_panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    points: &[EpochPoint],
) -> DrawResult {
    let epochs = epoch_range(points);
    let loss = padded_range(finite_bounds(points.iter().map(|p| p.train_loss)));
    let lr = padded_range(finite_bounds(points.iter().map(|p| p.lr)));
    let mut chart = ChartBuilder::on(area)
        .caption("training loss and learning rate", (FONT, 17))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(65)
        .right_y_label_area_size(75)
        .build_cartesian_2d(epochs.clone(), loss.clone())?
        .set_secondary_coord(epochs, lr.clone());
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("train loss")
        .x_labels(10)
        .y_label_formatter(&|v| tick_label(*v, loss.end - loss.start))
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 15))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    chart
        .configure_secondary_axes()
        .y_desc("learning rate")
        .y_label_formatter(&|v| format!("{v:.1e}"))
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 15))
        .draw()?;

    let loss_style = ShapeStyle::from(&PLCC_COLOR).stroke_width(2);
    chart
        .draw_series(LineSeries::new(std::iter::empty(), loss_style))?
        .label("train loss")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], loss_style));
    for run in finite_runs(points, |p| Some(p.train_loss)) {
        chart.draw_series(LineSeries::new(run, loss_style))?;
    }
    let lr_style = ShapeStyle::from(&LR_COLOR).stroke_width(1);
    chart
        .draw_secondary_series(LineSeries::new(std::iter::empty(), lr_style))?
        .label("learning rate (right axis)")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], lr_style));
    for run in finite_runs(points, |p| Some(p.lr)) {
        chart.draw_secondary_series(DashedLineSeries::new(run, 6, 4, lr_style))?;
    }
    if points.len() <= MARKER_MAX_EPOCHS {
        chart.draw_series(
            finite_points(points, |p| Some(p.train_loss))
                .map(|xy| Circle::new(xy, 3, loss_style.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(GREY)
        .draw()?;
    Ok(())
}

fn draw_validation_panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    points: &[EpochPoint],
) -> DrawResult {
    type Metric = fn(&EpochPoint) -> Option<f64>;
    let metrics: [(&str, RGBColor, Metric); 3] = [
        ("PLCC", PLCC_COLOR, |p| p.val_plcc),
        ("SRCC", SRCC_COLOR, |p| p.val_srcc),
        ("KRCC", KRCC_COLOR, |p| p.val_krcc),
    ];
    let all = points
        .iter()
        .flat_map(|p| metrics.iter().filter_map(move |(_, _, get)| get(p)));
    let bounds = finite_bounds(all);
    let caption = if bounds.is_some() {
        "validation correlations"
    } else {
        "validation correlations (none logged)"
    };
    // Correlations live in [-1, 1]; padding must not push the axis past that.
    let range = padded_range(bounds);
    let range = range.start.max(-1.0)..range.end.min(1.0);
    let range = if range.start < range.end {
        range
    } else {
        -1.0..1.0
    };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 17))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(65)
        .build_cartesian_2d(epoch_range(points), range.clone())?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("correlation")
        .x_labels(10)
        .y_label_formatter(&|v| tick_label(*v, range.end - range.start))
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 15))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;

    for (name, color, get) in metrics {
        let style = ShapeStyle::from(&color).stroke_width(2);
        // The best epoch in the legend is what a reader looks for first (SRCC picks checkpoints).
        let best = finite_points(points, get).max_by(|a, b| a.1.total_cmp(&b.1));
        let label = match best {
            Some((epoch, value)) => format!("{name} (best {value:.4} @ epoch {epoch})"),
            None => format!("{name} (not logged)"),
        };
        chart
            .draw_series(LineSeries::new(std::iter::empty(), style))?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
        for run in finite_runs(points, get) {
            chart.draw_series(LineSeries::new(run, style))?;
        }
        if points.len() <= MARKER_MAX_EPOCHS {
            chart.draw_series(
                finite_points(points, get).map(|xy| Circle::new(xy, 3, style.filled())),
            )?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(GREY)
        .draw()?;
    Ok(())
}

fn draw_scatter_chart(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    predicted: &[f64],
    mos: &[f64],
    logistic: Option<&Logistic4>,
    stats: &Correlations,
) -> DrawResult {
    let pairs: Vec<(f64, f64)> = predicted
        .iter()
        .zip(mos)
        .map(|(&x, &y)| (x, y))
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let x_range = padded_range(finite_bounds(pairs.iter().map(|p| p.0)));
    let y_range = padded_range(finite_bounds(pairs.iter().map(|p| p.1)));
    let mut chart = ChartBuilder::on(area)
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x_range.clone(), y_range.clone())?;
    chart
        .configure_mesh()
        .x_desc("predicted score")
        .y_desc("MOS")
        .x_label_formatter(&|v| tick_label(*v, x_range.end - x_range.start))
        .y_label_formatter(&|v| tick_label(*v, y_range.end - y_range.start))
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 15))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;

    // Translucent points so dense regions read darker than isolated ones (AGIQA-3K has ~3k).
    let point_style = PLCC_COLOR.mix(0.45).filled();
    chart
        .draw_series(pairs.iter().map(|&xy| Circle::new(xy, 3, point_style)))?
        .label(format!("images ({} plotted)", pairs.len()))
        .legend(move |(x, y)| Circle::new((x + 10, y), 4, point_style));

    // Identity over the square both ranges share; absent when prediction and MOS scales differ.
    let lo = x_range.start.min(y_range.start);
    let hi = x_range.end.max(y_range.end);
    if let Some((a, b)) = clip_segment((lo, lo), (hi, hi), &x_range, &y_range) {
        let style = ShapeStyle::from(&GREY).stroke_width(1);
        chart
            .draw_series(DashedLineSeries::new([a, b], 8, 5, style))?
            .label("identity  y = x")
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
    }

    if let Some(fit) = logistic {
        let style = ShapeStyle::from(&SRCC_COLOR).stroke_width(2);
        let span = x_range.end - x_range.start;
        let curve: Vec<(f64, f64)> = (0..=CURVE_SAMPLES)
            .map(|i| {
                let x = x_range.start + span * i as f64 / CURVE_SAMPLES as f64;
                (x, fit.eval(x))
            })
            .collect();
        chart
            .draw_series(LineSeries::new(std::iter::empty(), style))?
            .label(format!(
                "4-parameter logistic fit (PLCC {:.4})",
                stats.plcc_logistic
            ))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
        for run in clip_polyline(&curve, &x_range, &y_range) {
            chart.draw_series(LineSeries::new(run, style))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(GREY)
        .draw()?;
    Ok(())
}

/// Renders an RGB image of `size` pixels with `draw`, encodes it as PNG and writes it to
/// `path` atomically.
fn render_png(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> DrawResult,
) -> Result<(), PlotError> {
    register_fonts(path)?;
    let (w, h) = size;
    let mut rgb = vec![0u8; w as usize * h as usize * 3];
    {
        let draw_error = |e: Box<dyn StdError>| PlotError::Draw {
            path: path.to_owned(),
            message: e.to_string(),
        };
        let root = BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_error(e.into()))?;
        draw(&root).map_err(draw_error)?;
        root.present().map_err(|e| draw_error(e.into()))?;
    }
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(&rgb, w, h, image::ExtendedColorType::Rgb8)
        .map_err(|source| PlotError::Encode {
            path: path.to_owned(),
            source,
        })?;
    agiqa_runtime::atomic_file::write_atomic(path, &png).map_err(|source| PlotError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Registers DejaVu Sans (regular and bold) as plotters' `sans-serif` once per process.
///
/// plotters' own default styles use `sans-serif`, so registering under that name means no text
/// anywhere falls back to a missing font.
fn register_fonts(path: &Path) -> Result<(), PlotError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        let family = FONT.as_str();
        plotters::style::register_font(family, FontStyle::Normal, dejavu::sans::regular()).is_ok()
            && plotters::style::register_font(family, FontStyle::Bold, dejavu::sans::bold()).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(PlotError::Font {
            path: path.to_owned(),
        })
    }
}

/// Smallest and largest finite value, if any.
fn finite_bounds(values: impl IntoIterator<Item = f64>) -> Option<(f64, f64)> {
    values
        .into_iter()
        .filter(|v| v.is_finite())
        .fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        })
}

/// An axis range around `bounds` with 5% margin; a usable range for degenerate input too
/// (no finite value, all values equal, or a span too large for f64).
fn padded_range(bounds: Option<(f64, f64)>) -> Range<f64> {
    let Some((lo, hi)) = bounds else {
        return 0.0..1.0;
    };
    let span = hi - lo;
    if !span.is_finite() {
        // lo and hi near ±f64::MAX: halve them so tick arithmetic inside plotters stays finite.
        return lo / 2.0..hi / 2.0;
    }
    // An all-equal series gets a ±10% (or ±0.5 around zero) window so it draws mid-axis.
    let pad = if span > f64::EPSILON * lo.abs().max(hi.abs()) {
        span * 0.05
    } else if lo != 0.0 {
        lo.abs() * 0.1
    } else {
        0.5
    };
    let range = (lo - pad)..(hi + pad);
    if range.start.is_finite() && range.end.is_finite() {
        range
    } else {
        lo..hi
    }
}

/// Epoch axis covering every logged epoch, one epoch wider each side when only one is logged.
fn epoch_range(points: &[EpochPoint]) -> Range<usize> {
    let lo = points.iter().map(|p| p.epoch).min().unwrap_or(0);
    let hi = points.iter().map(|p| p.epoch).max().unwrap_or(0);
    if lo == hi {
        lo.saturating_sub(1)..hi + 1
    } else {
        lo..hi
    }
}

/// Unbroken lines through the epochs' `value`s: `None` (not logged that epoch, e.g. validation
/// every k epochs) joins its neighbours, a non-finite value (a diverged loss) breaks the line.
fn finite_runs(
    points: &[EpochPoint],
    value: impl Fn(&EpochPoint) -> Option<f64>,
) -> Vec<Vec<(usize, f64)>> {
    let mut runs: Vec<Vec<(usize, f64)>> = vec![Vec::new()];
    for p in points {
        match (value(p), runs.last_mut()) {
            (None, _) => {}
            (Some(v), Some(run)) if v.is_finite() => run.push((p.epoch, v)),
            (Some(_), Some(run)) if !run.is_empty() => runs.push(Vec::new()),
            _ => {}
        }
    }
    runs.retain(|r| !r.is_empty());
    runs
}

/// The logged, finite `(epoch, value)` pairs.
fn finite_points<'a>(
    points: &'a [EpochPoint],
    value: impl Fn(&EpochPoint) -> Option<f64> + 'a,
) -> impl Iterator<Item = (usize, f64)> + 'a {
    points
        .iter()
        .filter_map(move |p| Some((p.epoch, value(p)?)))
        .filter(|(_, v)| v.is_finite())
}

/// Tick label with as many decimals as the axis span needs, scientific for extreme scales.
fn tick_label(value: f64, span: f64) -> String {
    let magnitude = value.abs().max(span.abs());
    if magnitude != 0.0 && !(1e-3..1e5).contains(&magnitude) {
        return format!("{value:.2e}");
    }
    // Two significant digits of the span: enough to tell neighbouring ticks apart.
    let decimals = if span > 0.0 {
        (1.0 - span.log10().floor()).clamp(0.0, 6.0) as usize
    } else {
        2
    };
    format!("{value:.decimals$}")
}

/// The part of the segment `a`–`b` inside the box `x` × `y` (Liang–Barsky), if any.
///
/// plotters does not clip series to the plotting area, so a curve leaving the box would be
/// drawn over the axis labels.
fn clip_segment(
    a: (f64, f64),
    b: (f64, f64),
    x: &Range<f64>,
    y: &Range<f64>,
) -> Option<((f64, f64), (f64, f64))> {
    if ![a.0, a.1, b.0, b.1].iter().all(|v| v.is_finite()) {
        return None;
    }
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let (mut t0, mut t1) = (0.0f64, 1.0f64);
    for (p, q) in [
        (-dx, a.0 - x.start),
        (dx, x.end - a.0),
        (-dy, a.1 - y.start),
        (dy, y.end - a.1),
    ] {
        if p == 0.0 {
            if q < 0.0 {
                return None;
            }
        } else {
            let t = q / p;
            if p < 0.0 {
                t0 = t0.max(t);
            } else {
                t1 = t1.min(t);
            }
        }
    }
    if t0 > t1 {
        return None;
    }
    let at = |t: f64| (a.0 + t * dx, a.1 + t * dy);
    Some((at(t0), at(t1)))
}

/// Clips a polyline to the box, splitting it where it leaves and re-enters (or hits NaN).
fn clip_polyline(points: &[(f64, f64)], x: &Range<f64>, y: &Range<f64>) -> Vec<Vec<(f64, f64)>> {
    let mut runs: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut open = false;
    for pair in points.windows(2) {
        match clip_segment(pair[0], pair[1], x, y) {
            Some((a, b)) => {
                let continues = open && a == pair[0];
                match runs.last_mut() {
                    Some(run) if continues => run.push(b),
                    _ => runs.push(vec![a, b]),
                }
                // The next segment continues this run only if this one was not cut at its end.
                open = b == pair[1];
            }
            None => open = false,
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epochs(n: usize) -> Vec<EpochPoint> {
        (1..=n)
            .map(|e| {
                let t = e as f64;
                EpochPoint {
                    epoch: e,
                    train_loss: 0.6 * (-t / 8.0).exp() + 0.05,
                    lr: 5e-6 * 0.5 * (1.0 + (std::f64::consts::PI * t / n as f64).cos()),
                    val_plcc: Some(0.9 - 0.3 * (-t / 5.0).exp()),
                    val_srcc: (e % 2 == 0).then(|| 0.88 - 0.3 * (-t / 5.0).exp()),
                    val_krcc: Some(0.7 - 0.25 * (-t / 5.0).exp()),
                }
            })
            .collect()
    }

    /// Predictions and MOS of a plausible model: MOS = logistic(pred) plus deterministic noise.
    fn scatter_data(n: usize) -> (Vec<f64>, Vec<f64>, Logistic4) {
        let truth = Logistic4 {
            b1: 4.8,
            b2: 1.2,
            b3: 3.0,
            b4: 0.6,
        };
        let pred: Vec<f64> = (0..n)
            .map(|i| 1.0 + 4.0 * ((i * 37 % n) as f64 / n as f64))
            .collect();
        let mos: Vec<f64> = pred
            .iter()
            .enumerate()
            .map(|(i, &p)| truth.eval(p) + 0.35 * ((i as f64 * 12.9898).sin() * 43758.5453).fract())
            .collect();
        let fit = Logistic4::fit(&pred, &mos);
        (pred, mos, fit)
    }

    fn decode(path: &Path) -> image::RgbImage {
        image::open(path)
            .unwrap_or_else(|e| panic!("{} is not a readable PNG: {e}", path.display()))
            .to_rgb8()
    }

    fn distinct_colours(img: &image::RgbImage) -> usize {
        img.pixels()
            .map(|p| p.0)
            .collect::<std::collections::HashSet<_>>()
            .len()
    }

    /// Pixels in rows `rows` that are not pure white.
    fn ink(img: &image::RgbImage, rows: Range<u32>) -> usize {
        rows.flat_map(|y| (0..img.width()).map(move |x| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0 != [255, 255, 255])
            .count()
    }

    /// Copies a test chart to `$AGIQA_PLOT_SAMPLES/<name>` when that variable is set, for a
    /// person to look at; tests otherwise leave nothing behind.
    fn keep_sample(path: &Path, name: &str) {
        if let Some(dir) = std::env::var_os("AGIQA_PLOT_SAMPLES") {
            let _ = std::fs::copy(path, Path::new(&dir).join(name));
        }
    }

    #[test]
    fn training_curves_write_a_valid_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("curves.png");
        plot_training_curves(&path, "clip-agiqa / AGIQA-3K split 0", &epochs(30)).unwrap();
        let img = decode(&path);
        assert_eq!(img.dimensions(), CURVES_SIZE);
        assert!(
            distinct_colours(&img) > 20,
            "{} colours",
            distinct_colours(&img)
        );
        // Nothing but the PNG is left in the folder: the temporary file was renamed.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        keep_sample(&path, "agiqa_plot_curves.png");
        // The PNG gets the permissions of any file created here, not a temp file's 0600.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let plain = dir.path().join("plain");
            std::fs::write(&plain, b"").unwrap();
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode();
            assert_eq!(mode(&path), mode(&plain));
        }
    }

    #[test]
    fn scatter_writes_a_valid_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scatter.png");
        let (pred, mos, fit) = scatter_data(600);
        let stats = Correlations::compute(&pred, &mos).unwrap();
        plot_scatter(
            &path,
            "AGIQA-3K test split",
            &pred,
            &mos,
            Some(&fit),
            &stats,
        )
        .unwrap();
        let img = decode(&path);
        assert_eq!(img.dimensions(), SCATTER_SIZE);
        assert!(
            distinct_colours(&img) > 20,
            "{} colours",
            distinct_colours(&img)
        );
        // The logistic curve is red (SRCC_COLOR): some of it must be inside the plot.
        let red = img.pixels().filter(|p| p.0 == [214, 39, 40]).count();
        assert!(red > 300, "only {red} pixels of the logistic curve");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        keep_sample(&path, "agiqa_plot_scatter.png");
    }

    #[test]
    fn title_text_is_actually_rendered() {
        let dir = tempfile::tempdir().unwrap();
        let blank = dir.path().join("blank.png");
        let titled = dir.path().join("titled.png");
        let points = epochs(5);
        plot_training_curves(&blank, "", &points).unwrap();
        plot_training_curves(&titled, "Run 7: ViT-B/16, lr 5e-6", &points).unwrap();
        let (blank, titled) = (decode(&blank), decode(&titled));
        assert_eq!(
            ink(&blank, 0..TITLE_BAND),
            0,
            "an empty title leaves its band blank"
        );
        let title_ink = ink(&titled, 0..TITLE_BAND);
        // ~24 glyphs at 22 px bold cover a few thousand pixels; a font that silently drew
        // nothing (or only a box per glyph outline) would come in far below that.
        assert!(
            title_ink > 1500,
            "title band has only {title_ink} inked pixels"
        );
        // Anti-aliased glyph edges give intermediate greys, which boxes or blank text do not.
        let greys = (0..TITLE_BAND)
            .flat_map(|y| (0..titled.width()).map(move |x| (x, y)))
            .map(|(x, y)| titled.get_pixel(x, y).0)
            .filter(|p| p[0] == p[1] && p[1] == p[2] && p[0] > 30 && p[0] < 220)
            .collect::<std::collections::HashSet<_>>()
            .len();
        assert!(
            greys > 20,
            "{greys} grey levels: glyphs are not anti-aliased text"
        );
        // Below the band both images are identical: the title does not shift the layout.
        let body_diff = (TITLE_BAND..CURVES_SIZE.1)
            .flat_map(|y| (0..CURVES_SIZE.0).map(move |x| (x, y)))
            .filter(|&(x, y)| blank.get_pixel(x, y) != titled.get_pixel(x, y))
            .count();
        assert_eq!(body_diff, 0);
    }

    #[test]
    fn axis_text_is_rendered_in_scatter() {
        // The stats line sits right under the title band; its digits must leave ink there.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.png");
        let (pred, mos, fit) = scatter_data(50);
        let stats = Correlations::compute(&pred, &mos).unwrap();
        plot_scatter(&path, "", &pred, &mos, Some(&fit), &stats).unwrap();
        let img = decode(&path);
        let stats_ink = ink(&img, TITLE_BAND..TITLE_BAND + 30);
        assert!(
            stats_ink > 800,
            "stats line has only {stats_ink} inked pixels"
        );
    }

    #[test]
    fn empty_and_mismatched_input_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nothing.png");
        let err = plot_training_curves(&path, "t", &[]).unwrap_err();
        assert!(matches!(err, PlotError::Empty { .. }), "{err:?}");
        assert!(err.to_string().contains("nothing.png"), "{err}");

        let stats = Correlations {
            plcc: 0.0,
            srcc: 0.0,
            krcc: 0.0,
            plcc_logistic: 0.0,
            n: 0,
        };
        let err = plot_scatter(&path, "t", &[], &[], None, &stats).unwrap_err();
        assert!(matches!(err, PlotError::Empty { .. }), "{err:?}");
        let err = plot_scatter(&path, "t", &[1.0, 2.0], &[1.0], None, &stats).unwrap_err();
        match &err {
            PlotError::LengthMismatch {
                predicted: 2,
                mos: 1,
                ..
            } => {}
            other => panic!("expected a length mismatch, got {other:?}"),
        }
        assert!(err.to_string().contains("nothing.png"), "{err}");
        assert!(!path.exists(), "a failed plot must not leave a file");
    }

    #[test]
    fn unwritable_folder_is_an_io_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        // A missing folder is created (as for every file the project writes); a folder path
        // that runs through a regular file cannot be.
        std::fs::write(dir.path().join("file"), b"x").unwrap();
        let path = dir.path().join("file/sub/curves.png");
        let err = plot_training_curves(&path, "t", &epochs(3)).unwrap_err();
        assert!(matches!(err, PlotError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("curves.png"), "{err}");
    }

    #[test]
    fn degenerate_values_do_not_panic() {
        let dir = tempfile::tempdir().unwrap();
        let flat = vec![
            EpochPoint {
                epoch: 3,
                train_loss: 0.25,
                lr: 0.0,
                val_plcc: Some(f64::NAN),
                val_srcc: None,
                val_krcc: Some(1.0),
            };
            4
        ];
        let cases: Vec<(&str, Vec<EpochPoint>)> = vec![
            ("one-epoch", epochs(1)),
            ("flat", flat),
            (
                "nan-and-inf",
                epochs(6)
                    .into_iter()
                    .map(|mut p| {
                        if p.epoch % 3 == 0 {
                            p.train_loss = f64::NAN;
                            p.lr = f64::INFINITY;
                            p.val_plcc = Some(f64::NAN);
                        }
                        p
                    })
                    .collect(),
            ),
            (
                "all-nan",
                epochs(3)
                    .into_iter()
                    .map(|mut p| {
                        p.train_loss = f64::NAN;
                        p.lr = f64::NAN;
                        p.val_plcc = None;
                        p.val_srcc = None;
                        p.val_krcc = None;
                        p
                    })
                    .collect(),
            ),
            (
                "huge",
                vec![
                    EpochPoint {
                        epoch: 0,
                        train_loss: f64::MAX,
                        lr: -f64::MAX,
                        val_plcc: None,
                        val_srcc: None,
                        val_krcc: None,
                    },
                    EpochPoint {
                        epoch: 1,
                        train_loss: -f64::MAX,
                        lr: 1e-300,
                        val_plcc: None,
                        val_srcc: None,
                        val_krcc: None,
                    },
                ],
            ),
        ];
        for (name, points) in cases {
            let path = dir.path().join(format!("{name}.png"));
            plot_training_curves(&path, name, &points).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(decode(&path).dimensions(), CURVES_SIZE, "{name}");
            keep_sample(&path, &format!("agiqa_plot_curves_{name}.png"));
        }

        let stats = Correlations {
            plcc: f64::NAN,
            srcc: f64::NAN,
            krcc: f64::NAN,
            plcc_logistic: f64::NAN,
            n: 4,
        };
        let weird_fit = Logistic4 {
            b1: f64::NAN,
            b2: 1.0,
            b3: 0.0,
            b4: 0.0,
        };
        let scatter_cases: [(&str, Vec<f64>, Vec<f64>); 4] = [
            ("all-equal", vec![3.0; 4], vec![3.0; 4]),
            (
                "with-nan",
                vec![1.0, f64::NAN, 3.0, 4.0],
                vec![f64::INFINITY, 2.0, 3.0, 5.0],
            ),
            ("all-nan", vec![f64::NAN; 4], vec![f64::NAN; 4]),
            (
                "huge",
                vec![f64::MAX, -f64::MAX, 0.0, 1.0],
                vec![1.0, 2.0, 3.0, 4.0],
            ),
        ];
        for (name, pred, mos) in scatter_cases {
            let path = dir.path().join(format!("scatter-{name}.png"));
            for fit in [
                None,
                Some(&weird_fit),
                Some(&Logistic4 {
                    b1: 5.0,
                    b2: 1.0,
                    b3: 3.0,
                    b4: 0.0,
                }),
            ] {
                plot_scatter(&path, name, &pred, &mos, fit, &stats)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(decode(&path).dimensions(), SCATTER_SIZE, "{name}");
                keep_sample(&path, &format!("agiqa_plot_scatter_{name}.png"));
            }
        }
    }

    #[test]
    fn clipping_keeps_only_the_inside_part() {
        let (x, y) = (0.0..1.0, 0.0..1.0);
        let (a, b) = clip_segment((-1.0, -1.0), (2.0, 2.0), &x, &y).unwrap();
        assert!(
            (a.0 - 0.0).abs() < 1e-12 && (b.1 - 1.0).abs() < 1e-12,
            "{a:?} {b:?}"
        );
        assert!(clip_segment((2.0, 0.0), (3.0, 1.0), &x, &y).is_none());
        assert!(clip_segment((f64::NAN, 0.5), (0.5, 0.5), &x, &y).is_none());
        // Up out of the box and back down: two runs, both inside.
        let line = [(0.0, 0.5), (0.3, 0.5), (0.5, 2.0), (0.7, 0.5), (1.0, 0.5)];
        let runs = clip_polyline(&line, &x, &y);
        assert_eq!(runs.len(), 2, "{runs:?}");
        for p in runs.iter().flatten() {
            assert!(x.contains(&p.0) || p.0 == 1.0, "{p:?}");
            assert!(p.1 >= 0.0 && p.1 <= 1.0, "{p:?}");
        }
    }

    #[test]
    fn degenerate_ranges_are_widened() {
        assert_eq!(padded_range(None), 0.0..1.0);
        let r = padded_range(Some((2.0, 2.0)));
        assert!(r.start < 2.0 && r.end > 2.0, "{r:?}");
        let r = padded_range(Some((0.0, 0.0)));
        assert!(r.start < 0.0 && r.end > 0.0, "{r:?}");
        let r = padded_range(Some((-f64::MAX, f64::MAX)));
        assert!(
            r.start.is_finite() && r.end.is_finite() && r.start < r.end,
            "{r:?}"
        );
        assert_eq!(epoch_range(&epochs(1)), 0..2);
    }
}
