//! Plots a person can read: scatter panels, line charts and bar charts with titles, labelled
//! axes, ticks and legends, drawn by [`plotters`] on an RGB bitmap and encoded as PNG.
//!
//! The functions take plain data (points, series, labels) and know nothing of runs or models:
//! `train::plot` turns a run into these inputs. Text is drawn with an embedded font,
//! `assets/fonts/DejaVuSans-plot.ttf` (DejaVu Sans cut down to Latin, Greek and math symbols,
//! 58 KB; `assets/fonts/make-font.sh` made it), so plots look the same on every machine and need
//! no system fonts. PNGs are deflate-compressed, and written with a palette when the image has at
//! most 256 colours: the quickstart's plots are 14–110 KB each (the hand-drawn ones before were 0.8–0.9 MB).

use std::collections::HashMap;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;

use crate::error::{Error, Result};

/// An 8-bit RGB colour.
pub type Rgb = [u8; 3];

/// Colours of series, groups and bars, in order (Tableau 10: distinct for most colour-blind readers).
pub const PALETTE: [Rgb; 10] = [
    [31, 119, 180],
    [214, 39, 40],
    [44, 160, 44],
    [148, 103, 189],
    [255, 127, 14],
    [23, 190, 207],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
];

static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans-plot.ttf");
const FAMILY: &str = "sans-serif";

/// Register the embedded font once per process.
fn font() -> Result<()> {
    static READY: OnceLock<bool> = OnceLock::new();
    if *READY.get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok()) {
        Ok(())
    } else {
        Err(Error::internal("the embedded plot font (assets/fonts/DejaVuSans-plot.ttf) does not parse"))
    }
}

fn color(i: usize) -> RGBColor {
    let [r, g, b] = PALETTE[i % PALETTE.len()];
    RGBColor(r, g, b)
}

fn err<E: std::fmt::Display>(e: E) -> Error {
    Error::internal(format!("drawing a plot: {e}"))
}

const GRID: RGBColor = RGBColor(228, 228, 228);
const AXIS: RGBColor = RGBColor(90, 90, 90);

/// An RGB image, rows top to bottom.
#[derive(Debug, Clone)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    /// `width · height · 3` bytes.
    pub rgb: Vec<u8>,
}

impl Image {
    fn draw(width: u32, height: u32, f: impl FnOnce(&DrawingArea<BitMapBackend, Shift>) -> Result<()>) -> Result<Image> {
        font()?;
        let mut rgb = vec![255u8; width as usize * height as usize * 3];
        {
            let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
            f(&root)?;
            root.present().map_err(err)?;
        }
        Ok(Image { width, height, rgb })
    }

    /// The image as a PNG file: indexed colour when it has at most 256 colours, else RGB;
    /// deflate at the encoder's highest setting (these images are small).
    pub fn png(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, self.width, self.height);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::High);
        let data = match palette(&self.rgb) {
            Some((pal, idx)) => {
                enc.set_color(png::ColorType::Indexed);
                enc.set_palette(pal);
                idx
            }
            None => {
                enc.set_color(png::ColorType::Rgb);
                self.rgb.clone()
            }
        };
        let mut w = enc.write_header().map_err(err)?;
        w.write_image_data(&data).map_err(err)?;
        w.finish().map_err(err)?;
        Ok(out)
    }
}

/// `(palette, one index per pixel)` when the pixels use at most 256 colours.
fn palette(rgb: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut map: HashMap<[u8; 3], u8> = HashMap::new();
    let mut pal = Vec::new();
    let mut idx = Vec::with_capacity(rgb.len() / 3);
    for px in rgb.chunks_exact(3) {
        let c = [px[0], px[1], px[2]];
        let i = match map.get(&c) {
            Some(&i) => i,
            None => {
                let i = u8::try_from(map.len()).ok()?;
                map.insert(c, i);
                pal.extend_from_slice(&c);
                i
            }
        };
        idx.push(i);
    }
    Some((pal, idx))
}

/// A tick label: short, without trailing zeros (`0.25`, `1e-3`, `2.5e4`).
pub fn tick(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return if v == 0.0 { "0".into() } else { format!("{v}") };
    }
    let a = v.abs();
    if (1e-2..1e4).contains(&a) {
        let s = format!("{v:.3}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        if s == "-0" {
            "0".into()
        } else {
            s.to_string()
        }
    } else {
        let s = format!("{v:.1e}");
        s.replace(".0e", "e")
    }
}

/// A grid of `n` panels with at most `columns` per row.
fn grid<'a>(area: &DrawingArea<BitMapBackend<'a>, Shift>, n: usize, columns: usize) -> Vec<DrawingArea<BitMapBackend<'a>, Shift>> {
    let cols = columns.clamp(1, n.max(1));
    let rows = n.max(1).div_ceil(cols);
    area.split_evenly((rows, cols))
}

// ---------------------------------------------------------------------------------------------
// Scatter panels

/// One scatter panel: points, the group (colour) of each, and markers drawn as black crosses.
#[derive(Debug, Clone, Default)]
pub struct ScatterPanel {
    pub title: String,
    pub points: Vec<[f64; 2]>,
    /// Group of each point (index into [`Scatter::groups`]); missing entries are group 0.
    pub group: Vec<usize>,
    pub markers: Vec<[f64; 2]>,
}

/// Scatter panels side by side on shared, equal axes `[−range, range]²`.
#[derive(Debug, Clone, Default)]
pub struct Scatter {
    pub title: String,
    pub panels: Vec<ScatterPanel>,
    /// Legend text of each group.
    pub groups: Vec<String>,
    /// Legend text of the markers (none when empty).
    pub marker_label: String,
    pub range: f64,
    pub x_label: String,
    pub y_label: String,
    /// Panels per row.
    pub columns: usize,
}

/// Draw scatter panels (panel size 300 × 300 pixels) with a key below them.
pub fn scatter(s: &Scatter) -> Result<Image> {
    let n = s.panels.len().max(1);
    let cols = s.columns.clamp(1, n);
    let rows = n.div_ceil(cols);
    let mut entries: Vec<(String, Swatch)> = s.groups.iter().enumerate().map(|(g, l)| (l.clone(), Swatch::Dot(g))).collect();
    if !s.marker_label.is_empty() {
        entries.push((s.marker_label.clone(), Swatch::Cross));
    }
    let per_row = 4;
    let key_h = KEY_ROW * entries.len().div_ceil(per_row) as u32 + 10;
    let (w, h) = (300 * cols as u32, 300 * rows as u32 + 40 + key_h);
    Image::draw(w, h, |root| {
        root.fill(&WHITE).map_err(err)?;
        let body = root.titled(&s.title, (FAMILY, 20)).map_err(err)?;
        let (panels, key_area) = body.split_vertically(300 * rows as u32);
        let r = s.range;
        for (area, p) in grid(&panels, n, cols).iter().zip(&s.panels) {
            let mut chart = ChartBuilder::on(area)
                .caption(&p.title, (FAMILY, 15))
                .margin(6)
                .margin_right(14)
                .x_label_area_size(36)
                .y_label_area_size(40)
                .build_cartesian_2d(-r..r, -r..r)
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_labels(7)
                .y_labels(7)
                .x_desc(&s.x_label)
                .y_desc(&s.y_label)
                .x_label_formatter(&|v| tick(*v))
                .y_label_formatter(&|v| tick(*v))
                .label_style((FAMILY, 11))
                .axis_desc_style((FAMILY, 12))
                .bold_line_style(GRID)
                .light_line_style(WHITE)
                .axis_style(AXIS)
                .draw()
                .map_err(err)?;
            // Points in drawing order (not by group), so that no group hides another.
            let dots = p.points.iter().enumerate().map(|(i, q)| {
                let g = p.group.get(i).copied().unwrap_or(0);
                Circle::new((q[0], q[1]), 2, color(g).mix(0.75).filled())
            });
            chart.draw_series(dots).map_err(err)?;
            chart.draw_series(p.markers.iter().map(|m| Cross::new((m[0], m[1]), 5, BLACK.stroke_width(2)))).map_err(err)?;
        }
        key(&key_area, &entries, per_row)
    })
}

/// How a key entry shows its series.
#[derive(Debug, Clone, Copy)]
enum Swatch {
    /// A filled square of colour `i`.
    Box(usize),
    /// A dot of colour `i`.
    Dot(usize),
    /// A black cross.
    Cross,
}

/// Height of one row of a key.
const KEY_ROW: u32 = 22;

/// A key: one swatch and label per entry, `per_row` entries to a row.
fn key(area: &DrawingArea<BitMapBackend, Shift>, entries: &[(String, Swatch)], per_row: usize) -> Result<()> {
    let (w, _) = area.dim_in_pixel();
    let colw = (w as i32 - 40) / per_row.max(1) as i32;
    let label = TextStyle::from((FAMILY, 13).into_font()).color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center));
    for (i, (text, sw)) in entries.iter().enumerate() {
        let (x, y) = (20 + (i % per_row) as i32 * colw, 6 + (i / per_row) as i32 * KEY_ROW as i32 + 8);
        match *sw {
            Swatch::Box(c) => area.draw(&Rectangle::new([(x, y - 7), (x + 14, y + 7)], color(c).filled())),
            Swatch::Dot(c) => area.draw(&Circle::new((x + 7, y), 5, color(c).filled())),
            Swatch::Cross => area.draw(&Cross::new((x + 7, y), 5, BLACK.stroke_width(2))),
        }
        .map_err(err)?;
        area.draw(&Text::new(text.as_str(), (x + 22, y), label.clone())).map_err(err)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Line charts

/// One curve.
#[derive(Debug, Clone, Default)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// One panel of a line chart; series `i` has colour `i` in every panel.
#[derive(Debug, Clone, Default)]
pub struct LinePanel {
    pub title: String,
    pub series: Vec<Series>,
}

/// Line panels in a grid, each with its own axis ranges.
#[derive(Debug, Clone, Default)]
pub struct LineChart {
    pub title: String,
    pub panels: Vec<LinePanel>,
    pub x_label: String,
    pub y_label: String,
    /// Logarithmic y axis (values ≤ 0 are left out).
    pub log_y: bool,
    /// Panels per row.
    pub columns: usize,
}

/// Draw a line chart (panel size 380 × 280 pixels); each panel has a legend of its series.
pub fn lines(c: &LineChart) -> Result<Image> {
    let n = c.panels.len().max(1);
    let cols = c.columns.clamp(1, n);
    let rows = n.div_ceil(cols);
    let (w, h) = (380 * cols as u32, 280 * rows as u32 + 40);
    Image::draw(w, h, |root| {
        root.fill(&WHITE).map_err(err)?;
        let body = root.titled(&c.title, (FAMILY, 20)).map_err(err)?;
        for (area, p) in grid(&body, n, cols).iter().zip(&c.panels) {
            let keep = |y: f64| y.is_finite() && (!c.log_y || y > 0.0);
            let pts = || p.series.iter().flat_map(|s| s.points.iter()).filter(|(x, y)| x.is_finite() && keep(*y));
            let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
            for &(x, y) in pts() {
                (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
            }
            if !x0.is_finite() {
                (x0, x1, y0, y1) = (0.0, 1.0, 1.0, 10.0);
            }
            if x1 <= x0 {
                x1 = x0 + 1.0;
            }
            let builder = || {
                let mut b = ChartBuilder::on(area);
                b.caption(&p.title, (FAMILY, 15)).margin(6).margin_right(16).x_label_area_size(36).y_label_area_size(52);
                b
            };
            if c.log_y {
                // Room above the curves for the legend: a third more decades.
                let (lo, hi) = if y1 > y0 * 1.0001 { (y0 / 1.15, y1 * (y1 / y0).powf(0.33) * 1.15) } else { (y0 / 2.0, y0 * 4.0) };
                let mut chart = builder().build_cartesian_2d(x0..x1, (lo..hi).log_scale()).map_err(err)?;
                chart
                    .configure_mesh()
                    .x_labels(6)
                    .y_labels(6)
                    .x_desc(&c.x_label)
                    .y_desc(&c.y_label)
                    .x_label_formatter(&|v| tick(*v))
                    .y_label_formatter(&|v| tick(*v))
                    .label_style((FAMILY, 11))
                    .axis_desc_style((FAMILY, 12))
                    .bold_line_style(GRID)
                    .light_line_style(WHITE)
                    .axis_style(AXIS)
                    .draw()
                    .map_err(err)?;
                for (i, s) in p.series.iter().enumerate() {
                    let col = color(i);
                    let line = LineSeries::new(s.points.iter().copied().filter(|(x, y)| x.is_finite() && keep(*y)), col.stroke_width(2));
                    chart
                        .draw_series(line)
                        .map_err(err)?
                        .label(s.label.as_str())
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], col.stroke_width(2)));
                }
                legend(&mut chart)?;
            } else {
                let pad = ((y1 - y0) * 0.05).max(1e-12);
                let mut chart = builder().build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + 6.0 * pad)).map_err(err)?;
                chart
                    .configure_mesh()
                    .x_labels(6)
                    .y_labels(6)
                    .x_desc(&c.x_label)
                    .y_desc(&c.y_label)
                    .x_label_formatter(&|v| tick(*v))
                    .y_label_formatter(&|v| tick(*v))
                    .label_style((FAMILY, 11))
                    .axis_desc_style((FAMILY, 12))
                    .bold_line_style(GRID)
                    .light_line_style(WHITE)
                    .axis_style(AXIS)
                    .draw()
                    .map_err(err)?;
                for (i, s) in p.series.iter().enumerate() {
                    let col = color(i);
                    let line =
                        LineSeries::new(s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()), col.stroke_width(2));
                    chart
                        .draw_series(line)
                        .map_err(err)?
                        .label(s.label.as_str())
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], col.stroke_width(2)));
                }
                legend(&mut chart)?;
            }
        }
        Ok(())
    })
}

fn legend<'a, X, Y>(chart: &mut ChartContext<'a, BitMapBackend<'a>, Cartesian2d<X, Y>>) -> Result<()>
where
    X: Ranged,
    Y: Ranged,
{
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FAMILY, 11))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(170, 170, 170))
        .draw()
        .map_err(err)
}

// ---------------------------------------------------------------------------------------------
// Bar charts

/// One panel of a bar chart: one value per item (NaN: no bar).
#[derive(Debug, Clone, Default)]
pub struct BarPanel {
    pub title: String,
    pub values: Vec<f64>,
}

/// Bar panels, one per measure, with one coloured bar per item and one legend for the items.
#[derive(Debug, Clone, Default)]
pub struct BarChart {
    pub title: String,
    /// Legend text of each item (bar colour `i`).
    pub items: Vec<String>,
    pub panels: Vec<BarPanel>,
    /// Panels per row.
    pub columns: usize,
}

/// Draw a bar chart (panel size 300 × 260 pixels, the legend below the panels); each bar is
/// labelled with its value.
pub fn bars(b: &BarChart) -> Result<Image> {
    let n = b.panels.len().max(1);
    let cols = b.columns.clamp(1, n);
    let rows = n.div_ceil(cols);
    let key_h = KEY_ROW * b.items.len().div_ceil(2) as u32 + 10;
    let (w, h) = (300 * cols as u32, 260 * rows as u32 + 40 + key_h);
    Image::draw(w.max(640), h, |root| {
        root.fill(&WHITE).map_err(err)?;
        let body = root.titled(&b.title, (FAMILY, 20)).map_err(err)?;
        let (panels, key_area) = body.split_vertically(260 * rows as u32);
        let k = b.items.len().max(1) as f64;
        for (area, p) in grid(&panels, n, cols).iter().zip(&b.panels) {
            let finite = p.values.iter().copied().filter(|v| v.is_finite());
            let lo = finite.clone().fold(0.0f64, f64::min);
            let hi = finite.fold(0.0f64, f64::max);
            let span = if hi > lo { hi - lo } else { 1.0 };
            let (y0, y1) = (if lo < 0.0 { lo - 0.08 * span } else { 0.0 }, hi + 0.16 * span);
            let mut chart = ChartBuilder::on(area)
                .caption(&p.title, (FAMILY, 14))
                .margin(6)
                .margin_right(12)
                .x_label_area_size(8)
                .y_label_area_size(52)
                .build_cartesian_2d(0.0..k, y0..y1)
                .map_err(err)?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(0)
                .y_labels(6)
                .y_label_formatter(&|v| tick(*v))
                .label_style((FAMILY, 11))
                .bold_line_style(GRID)
                .light_line_style(WHITE)
                .axis_style(AXIS)
                .draw()
                .map_err(err)?;
            for (i, &v) in p.values.iter().enumerate() {
                if !v.is_finite() {
                    continue;
                }
                let x = i as f64;
                chart.draw_series(std::iter::once(Rectangle::new([(x + 0.15, 0.0), (x + 0.85, v)], color(i).filled()))).map_err(err)?;
                let y = if v >= 0.0 { v + 0.02 * span } else { 0.0 + 0.02 * span };
                let style = TextStyle::from((FAMILY, 10).into_font()).color(&BLACK).pos(Pos::new(HPos::Center, VPos::Bottom));
                chart.draw_series(std::iter::once(Text::new(tick(v), (x + 0.5, y), style))).map_err(err)?;
            }
            chart.draw_series(std::iter::once(PathElement::new(vec![(0.0, 0.0), (k, 0.0)], AXIS))).map_err(err)?;
        }
        let entries: Vec<(String, Swatch)> = b.items.iter().enumerate().map(|(i, t)| (t.clone(), Swatch::Box(i))).collect();
        key(&key_area, &entries, 2)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(png_bytes: &[u8]) -> (png::OutputInfo, Vec<u8>) {
        let mut r = png::Decoder::new(std::io::Cursor::new(png_bytes)).read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        let info = r.next_frame(&mut buf).unwrap();
        buf.truncate(info.buffer_size());
        (info, buf)
    }

    #[test]
    fn ticks_are_short() {
        assert_eq!(tick(0.25), "0.25");
        assert_eq!(tick(1.0), "1");
        assert_eq!(tick(-0.5), "-0.5");
        assert_eq!(tick(0.001), "1e-3");
        assert_eq!(tick(25000.0), "2.5e4");
        assert_eq!(tick(0.0), "0");
        assert_eq!(tick(100.0), "100");
    }

    #[test]
    fn png_round_trips_with_and_without_palette() {
        // Few colours: indexed; the decoder expands the palette back to the same pixels.
        let mut rgb = vec![255u8; 20 * 10 * 3];
        rgb[3..6].copy_from_slice(&[1, 2, 3]);
        let img = Image { width: 20, height: 10, rgb: rgb.clone() };
        let bytes = img.png().unwrap();
        let mut d = png::Decoder::new(std::io::Cursor::new(&bytes));
        d.set_transformations(png::Transformations::EXPAND);
        let mut r = d.read_info().unwrap();
        assert_eq!(r.info().color_type, png::ColorType::Indexed);
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        r.next_frame(&mut buf).unwrap();
        assert_eq!(buf, rgb);
        // More than 256 colours: RGB.
        let rgb: Vec<u8> = (0..300u32).flat_map(|i| [(i % 256) as u8, (i / 256) as u8, 7]).collect();
        let img = Image { width: 300, height: 1, rgb: rgb.clone() };
        let (info, buf) = decode(&img.png().unwrap());
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(buf, rgb);
    }

    /// Pixels of colour `c` in the image.
    fn count(img: &Image, c: Rgb) -> usize {
        img.rgb.chunks_exact(3).filter(|p| *p == c).count()
    }

    #[test]
    fn scatter_draws_points_in_group_colours_and_text() {
        let panel = |g: usize| ScatterPanel {
            title: format!("σ = {g}"),
            points: (0..50).map(|i| [i as f64 / 25.0 - 1.0, 0.5]).collect(),
            group: vec![g; 50],
            markers: vec![[0.0, 0.0]],
        };
        let s = Scatter {
            title: "samples".into(),
            panels: vec![panel(0), panel(1)],
            groups: vec!["class 0".into(), "class 1".into()],
            marker_label: "mode".into(),
            range: 2.0,
            x_label: "x".into(),
            y_label: "y".into(),
            columns: 5,
        };
        let img = scatter(&s).unwrap();
        assert_eq!((img.width, img.height), (600, 372));
        // Both groups' points (at 75 % opacity over white) and key dots, and dark text, appear.
        let near = |c: Rgb| {
            let want = c.map(|v| (0.75 * v as f64 + 0.25 * 255.0) as i32);
            img.rgb.chunks_exact(3).filter(|p| p.iter().zip(want).all(|(a, b)| (*a as i32 - b).abs() <= 2)).count()
        };
        assert!(near(PALETTE[0]) > 80 && near(PALETTE[1]) > 80, "{} {}", near(PALETTE[0]), near(PALETTE[1]));
        assert!(count(&img, PALETTE[0]) > 40 && count(&img, PALETTE[1]) > 40);
        assert!(img.rgb.chunks_exact(3).filter(|p| p.iter().all(|&v| v < 60)).count() > 200);
        let png = img.png().unwrap();
        assert!(png.len() < 60_000, "{} bytes", png.len());
    }

    #[test]
    fn lines_and_bars_draw() {
        let c = LineChart {
            title: "losses".into(),
            panels: (0..3)
                .map(|p| LinePanel {
                    title: format!("phase {p}"),
                    series: vec![
                        Series { label: "generator".into(), points: (1..100).map(|i| (i as f64, 1.0 / i as f64)).collect() },
                        Series { label: "fake".into(), points: (1..100).map(|i| (i as f64, 10.0 + i as f64)).collect() },
                    ],
                })
                .collect(),
            x_label: "update".into(),
            y_label: "loss".into(),
            log_y: true,
            columns: 2,
        };
        let img = lines(&c).unwrap();
        assert_eq!((img.width, img.height), (760, 600));
        assert!(count(&img, PALETTE[0]) > 300 && count(&img, PALETTE[1]) > 300);
        let b = BarChart {
            title: "metrics".into(),
            items: vec!["a".into(), "b".into(), "c".into()],
            panels: vec![BarPanel { title: "m".into(), values: vec![1.0, -0.5, f64::NAN] }],
            columns: 3,
        };
        let img = bars(&b).unwrap();
        // Bars of items 0 and 1 are filled; item 2 (NaN) only has its key swatch (14 × 14 pixels).
        assert!(count(&img, PALETTE[0]) > 2000 && count(&img, PALETTE[1]) > 1000);
        assert_eq!(count(&img, PALETTE[2]), 14 * 14);
    }
}
