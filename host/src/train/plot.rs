//! The loss chart of `host train --plot`: training and validation loss
//! against the epoch, drawn into an RGB buffer and encoded as PNG.
//!
//! Everything is drawn here, text included (a 5x8 bitmap font shown at twice
//! its size), so that the chart needs no system library: no font
//! configuration, no rasterizer. The `png` crate only encodes the pixels.
//!
//! The y axis is logarithmic when the losses are all positive and span more
//! than two decades, linear otherwise. Points that are not finite are
//! skipped; whatever the input (no curve, empty curves, one point, NaN,
//! infinities, a single value), the result is a valid chart.

/// One curve: (x, y) points in order, x = epoch (fractional for per-step points), y = loss.
pub struct Curve<'a> {
    pub label: &'a str,
    pub points: &'a [(f64, f64)],
}

/// Encodes the chart as PNG bytes (the caller writes them atomically).
pub fn render_png(title: &str, curves: &[Curve<'_>]) -> Result<Vec<u8>, String> {
    let chart = Chart::new(title, curves);
    let (canvas, _) = chart.draw();
    encode(&canvas)
}

/// The image's size in pixels.
const WIDTH: i64 = 800;
const HEIGHT: i64 = 500;

/// How much larger than the font's own 5x8 cells text is drawn.
const TEXT_SCALE: i64 = 2;
/// Height of text above the baseline in pixels (descenders reach 2 px lower).
const TEXT_HEIGHT: i64 = 7 * TEXT_SCALE;

type Rgb = [u8; 3];

const WHITE: Rgb = [255, 255, 255];
const INK: Rgb = [30, 30, 30];
const FRAME: Rgb = [60, 60, 60];
const GRID: Rgb = [228, 228, 228];
const LEGEND_BORDER: Rgb = [150, 150, 150];

/// The curves' colours, in order; past the tenth curve they repeat.
const PALETTE: [Rgb; 10] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];

fn colour(i: usize) -> Rgb {
    PALETTE[i % PALETTE.len()]
}

/// Values beyond this magnitude are drawn as if at it, so that ranges and
/// their differences stay finite.
const HUGE: f64 = 1e300;
/// Values below this magnitude are drawn as zero.
const TINY: f64 = 1e-300;

fn tame(v: f64) -> f64 {
    if v.abs() < TINY {
        0.0
    } else {
        v.clamp(-HUGE, HUGE)
    }
}

/// An inclusive rectangle of pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rect {
    x0: i64,
    y0: i64,
    x1: i64,
    y1: i64,
}

impl Rect {
    fn contains(&self, x: i64, y: i64) -> bool {
        x >= self.x0 && x <= self.x1 && y >= self.y0 && y <= self.y1
    }
}

/// An RGB pixel buffer; drawing outside the clip rectangle does nothing.
struct Canvas {
    px: Vec<u8>,
    clip: Rect,
}

impl Canvas {
    fn new() -> Self {
        Canvas {
            px: WHITE.repeat((WIDTH * HEIGHT) as usize),
            clip: Self::whole(),
        }
    }

    fn whole() -> Rect {
        Rect {
            x0: 0,
            y0: 0,
            x1: WIDTH - 1,
            y1: HEIGHT - 1,
        }
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if self.clip.contains(x, y) && Self::whole().contains(x, y) {
            let i = ((y * WIDTH + x) * 3) as usize;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn get(&self, x: i64, y: i64) -> Option<Rgb> {
        if !Self::whole().contains(x, y) {
            return None;
        }
        let i = ((y * WIDTH + x) * 3) as usize;
        Some([self.px[i], self.px[i + 1], self.px[i + 2]])
    }

    fn fill(&mut self, r: Rect, c: Rgb) {
        for y in r.y0..=r.y1 {
            for x in r.x0..=r.x1 {
                self.set(x, y, c);
            }
        }
    }

    fn hline(&mut self, x0: i64, x1: i64, y: i64, c: Rgb) {
        for x in x0.min(x1)..=x0.max(x1) {
            self.set(x, y, c);
        }
    }

    fn vline(&mut self, x: i64, y0: i64, y1: i64, c: Rgb) {
        for y in y0.min(y1)..=y0.max(y1) {
            self.set(x, y, c);
        }
    }

    fn outline(&mut self, r: Rect, c: Rgb) {
        self.hline(r.x0, r.x1, r.y0, c);
        self.hline(r.x0, r.x1, r.y1, c);
        self.vline(r.x0, r.y0, r.y1, c);
        self.vline(r.x1, r.y0, r.y1, c);
    }

    /// A line about 2 px thick: Bresenham's steps, each stamping a 2x2 dot.
    fn thick_line(&mut self, (mut x, mut y): (i64, i64), (x1, y1): (i64, i64), c: Rgb) {
        let dx = (x1 - x).abs();
        let dy = -(y1 - y).abs();
        let sx = if x < x1 { 1 } else { -1 };
        let sy = if y < y1 { 1 } else { -1 };
        let mut err = dx + dy;
        loop {
            self.dot(x, y, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn dot(&mut self, x: i64, y: i64, c: Rgb) {
        for (ox, oy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
            self.set(x + ox, y + oy, c);
        }
    }

    /// Draws `text` with its top-left corner at (x, y).
    fn text(&mut self, x: i64, y: i64, text: &str, c: Rgb) {
        let mut left = x;
        for ch in text.chars() {
            let rows = glyph(ch);
            for (row, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0b10000 >> col) != 0 {
                        let px = left + col * TEXT_SCALE;
                        let py = y + row as i64 * TEXT_SCALE;
                        for oy in 0..TEXT_SCALE {
                            for ox in 0..TEXT_SCALE {
                                self.set(px + ox, py + oy, c);
                            }
                        }
                    }
                }
            }
            left += 6 * TEXT_SCALE;
        }
    }
}

/// Width in pixels of `text` drawn by [`Canvas::text`].
fn text_width(text: &str) -> i64 {
    let n = text.chars().count() as i64;
    if n == 0 {
        0
    } else {
        n * 6 * TEXT_SCALE - TEXT_SCALE
    }
}

/// `text` cut to at most `max` characters, the cut marked with "..".
fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let mut s: String = text.chars().take(max.saturating_sub(2)).collect();
        s.push_str("..");
        s
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Scale {
    Linear,
    Log10,
}

#[derive(Debug, Clone, PartialEq)]
struct Tick {
    /// Position on the axis, in axis units (log10 of the value on a log axis).
    at: f64,
    label: String,
}

/// One axis: its range in axis units, its labelled ticks and (log axis
/// only) its unlabelled minor ticks.
#[derive(Debug, Clone)]
struct Axis {
    scale: Scale,
    lo: f64,
    hi: f64,
    ticks: Vec<Tick>,
    minor: Vec<f64>,
}

impl Axis {
    /// A linear axis over the values min..=max, widened by `pad` of the span
    /// on both sides (not below zero when no value is), or around the value
    /// when the span is zero or lost in rounding.
    fn linear(min: f64, max: f64, pad: f64, target_ticks: f64) -> Axis {
        let (lo, hi) = linear_range(min, max, pad);
        Axis {
            scale: Scale::Linear,
            lo,
            hi,
            ticks: linear_ticks(lo, hi, target_ticks),
            minor: Vec::new(),
        }
    }

    /// A log10 axis over the positive values min..=max.
    fn log10(min: f64, max: f64, pad: f64) -> Axis {
        let (lo, hi) = linear_range(min.log10(), max.log10(), pad);
        let (ticks, minor) = log_ticks(lo, hi);
        Axis {
            scale: Scale::Log10,
            lo,
            hi,
            ticks,
            minor,
        }
    }

    /// Where `v` falls on the axis, 0 at `lo` and 1 at `hi`; `None` for a
    /// value the axis cannot show.
    fn fraction(&self, v: f64) -> Option<f64> {
        let t = match self.scale {
            Scale::Linear => v,
            Scale::Log10 if v > 0.0 => v.log10(),
            Scale::Log10 => return None,
        };
        let f = (t - self.lo) / (self.hi - self.lo);
        f.is_finite().then_some(f)
    }
}

fn linear_range(min: f64, max: f64, pad: f64) -> (f64, f64) {
    let mid = min / 2.0 + max / 2.0;
    let span = max - min;
    // Both are finite: the values were tamed.
    let (lo, hi) = if span <= mid.abs() * 1e-9 {
        let half = if mid == 0.0 { 1.0 } else { mid.abs() * 0.1 };
        (mid - half, mid + half)
    } else {
        (min - span * pad, max + span * pad)
    };
    if min >= 0.0 && lo < 0.0 {
        (0.0, hi)
    } else {
        (lo, hi)
    }
}

/// Ticks at multiples of a round step (1, 2 or 5 times a power of ten),
/// about `target` of them across lo..=hi.
fn linear_ticks(lo: f64, hi: f64, target: f64) -> Vec<Tick> {
    let raw = (hi - lo) / target;
    if !(raw.is_finite() && raw > 0.0) {
        return Vec::new();
    }
    let base = 10f64.powf(raw.log10().floor());
    let f = raw / base;
    let nice = if f < 1.5 {
        1.0
    } else if f < 3.5 {
        2.0
    } else if f < 7.5 {
        5.0
    } else {
        10.0
    };
    let step = nice * base;
    let k0 = (lo / step).ceil();
    let k1 = (hi / step).floor();
    if !(step > 0.0 && k0.is_finite() && k1.is_finite() && k1 >= k0 && k1 - k0 <= 50.0) {
        return Vec::new();
    }
    let values: Vec<f64> = (0..=(k1 - k0) as i64)
        .map(|i| (k0 + i as f64) * step + 0.0)
        .collect();
    let step_exp = (step.log10() + 1e-9).floor();
    let largest = values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let scientific = largest >= 1e6 || step_exp < -4.0;
    values
        .into_iter()
        .map(|v| {
            let label = if v == 0.0 {
                "0".to_string()
            } else if scientific {
                let digits = ((largest.log10() + 1e-9).floor() - step_exp).max(0.0) as usize;
                format!("{v:.digits$e}")
            } else {
                let decimals = (-step_exp).max(0.0) as usize;
                format!("{v:.decimals$}")
            };
            Tick { at: v, label }
        })
        .collect()
}

/// Labelled ticks at whole decades of lo..=hi (log10 units; every n-th
/// decade when there are many) and, over a few decades, minor ticks at 2..9
/// times each decade.
fn log_ticks(lo: f64, hi: f64) -> (Vec<Tick>, Vec<f64>) {
    let d0 = lo.ceil();
    let d1 = hi.floor();
    if !(d0.is_finite() && d1.is_finite()) || d1 < d0 || d1 - d0 > 1000.0 {
        return (Vec::new(), Vec::new());
    }
    let decades = (d1 - d0) as i64 + 1;
    let every = (decades + 7) / 8;
    let ticks = (d0 as i64..=d1 as i64)
        .filter(|d| d.rem_euclid(every) == 0)
        .map(|d| Tick {
            at: d as f64,
            label: decade_label(d),
        })
        .collect();
    let mut minor = Vec::new();
    if hi - lo <= 6.0 {
        for d in lo.floor() as i64..=d1 as i64 {
            for m in 2..=9 {
                let at = d as f64 + (m as f64).log10();
                if at >= lo && at <= hi {
                    minor.push(at);
                }
            }
        }
    }
    (ticks, minor)
}

/// 10^d written plainly from 0.001 to 10000, as "1e{d}" beyond.
fn decade_label(d: i64) -> String {
    match d {
        -3..=-1 => format!("0.{}1", "0".repeat((-d - 1) as usize)),
        0..=4 => format!("1{}", "0".repeat(d as usize)),
        _ => format!("1e{d}"),
    }
}

/// Everything decided before drawing: the curves' drawable points, the
/// axes and where the plot area lies.
struct Chart {
    title: String,
    labels: Vec<String>,
    /// Per curve, its finite points (positive y only on a log axis).
    series: Vec<Vec<(f64, f64)>>,
    x: Axis,
    y: Axis,
    plot: Rect,
}

/// The plot area's edges other than the left one, which leaves room for the
/// y tick labels.
const PLOT_TOP: i64 = 50;
const PLOT_BOTTOM: i64 = HEIGHT - 62;
const PLOT_RIGHT: i64 = WIDTH - 24;
/// Longest legend label shown whole.
const LEGEND_CHARS: usize = 28;

impl Chart {
    fn new(title: &str, curves: &[Curve<'_>]) -> Chart {
        let mut series: Vec<Vec<(f64, f64)>> = curves
            .iter()
            .map(|c| {
                c.points
                    .iter()
                    .filter(|(x, y)| x.is_finite() && y.is_finite())
                    .map(|&(x, y)| (tame(x), tame(y)))
                    .collect()
            })
            .collect();
        let all = || series.iter().flatten();
        let x_min = all().map(|p| p.0).fold(f64::INFINITY, f64::min);
        let x_max = all().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
        let y_min = all().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let y_max = all().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        let empty = all().next().is_none();

        let x = if empty {
            Axis::linear(0.0, 1.0, 0.0, 8.0)
        } else {
            Axis::linear(x_min, x_max, 0.0, 8.0)
        };
        let y = if empty {
            Axis::linear(0.0, 1.0, 0.0, 6.0)
        } else if y_min > 0.0 && y_max / y_min > 100.0 {
            Axis::log10(y_min, y_max, 0.05)
        } else {
            Axis::linear(y_min, y_max, 0.05, 6.0)
        };
        if y.scale == Scale::Log10 {
            for s in &mut series {
                s.retain(|p| p.1 > 0.0);
            }
        }

        let widest = y.ticks.iter().map(|t| text_width(&t.label)).max();
        let left = (widest.unwrap_or(0) + 20).clamp(60, WIDTH / 3);
        Chart {
            title: title.to_string(),
            labels: curves
                .iter()
                .map(|c| shorten(c.label, LEGEND_CHARS))
                .collect(),
            series,
            x,
            y,
            plot: Rect {
                x0: left,
                y0: PLOT_TOP,
                x1: PLOT_RIGHT,
                y1: PLOT_BOTTOM,
            },
        }
    }

    /// The pixel a point lands on, kept inside the plot area.
    fn pixel(&self, (x, y): (f64, f64)) -> Option<(i64, i64)> {
        let fx = self.x.fraction(x)?;
        let fy = self.y.fraction(y)?;
        let p = self.plot;
        let px = p.x0 as f64 + fx * (p.x1 - p.x0) as f64;
        let py = p.y1 as f64 - fy * (p.y1 - p.y0) as f64;
        // `as` saturates, and the clamp keeps rounding inside the frame.
        Some((
            (px.round() as i64).clamp(p.x0, p.x1),
            (py.round() as i64).clamp(p.y0, p.y1),
        ))
    }

    /// Where the axis unit `at` lies along x (or y), in pixels.
    fn x_pixel(&self, at: f64) -> i64 {
        let f = (at - self.x.lo) / (self.x.hi - self.x.lo);
        let p = self.plot;
        (p.x0 as f64 + f * (p.x1 - p.x0) as f64).round() as i64
    }

    fn y_pixel(&self, at: f64) -> i64 {
        let f = (at - self.y.lo) / (self.y.hi - self.y.lo);
        let p = self.plot;
        (p.y1 as f64 - f * (p.y1 - p.y0) as f64).round() as i64
    }

    /// The legend's box: whichever corner of the plot area hides the fewest
    /// curve pixels, the top right one when several hide as few.
    fn legend_rect(&self, canvas: &Canvas) -> Option<Rect> {
        if self.labels.is_empty() {
            return None;
        }
        let widest = self.labels.iter().map(|l| text_width(l)).max().unwrap_or(0);
        let w = 8 + 24 + 8 + widest + 8;
        let h = 6 + self.labels.len() as i64 * 18 + 2;
        let p = self.plot;
        let (left, right) = (p.x0 + 10, p.x1 - 10 - w);
        let (top, bottom) = (p.y0 + 10, p.y1 - 10 - h);
        let corners = [(right, top), (left, top), (right, bottom), (left, bottom)];
        let covered = |r: &Rect| {
            let mut n = 0usize;
            for y in r.y0..=r.y1 {
                for x in r.x0..=r.x1 {
                    if canvas.get(x, y).is_some_and(|c| PALETTE.contains(&c)) {
                        n += 1;
                    }
                }
            }
            n
        };
        corners
            .iter()
            .map(|&(x, y)| Rect {
                x0: x,
                y0: y,
                x1: x + w - 1,
                y1: y + h - 1,
            })
            .min_by_key(covered)
    }

    /// The chart's pixels, and where the legend went.
    fn draw(&self) -> (Canvas, Option<Rect>) {
        let mut c = Canvas::new();
        let p = self.plot;

        // Grid, frame, ticks and their labels.
        c.clip = p;
        for t in &self.x.ticks {
            c.vline(self.x_pixel(t.at), p.y0, p.y1, GRID);
        }
        for t in &self.y.ticks {
            c.hline(p.x0, p.x1, self.y_pixel(t.at), GRID);
        }
        c.clip = Canvas::whole();
        c.outline(p, FRAME);
        for t in &self.x.ticks {
            let x = self.x_pixel(t.at);
            c.vline(x, p.y1, p.y1 + 5, FRAME);
            c.text(x - text_width(&t.label) / 2, p.y1 + 9, &t.label, INK);
        }
        for t in &self.y.ticks {
            let y = self.y_pixel(t.at);
            c.hline(p.x0 - 5, p.x0, y, FRAME);
            let w = text_width(&t.label);
            c.text(p.x0 - 9 - w, y - TEXT_HEIGHT / 2, &t.label, INK);
        }
        for &at in &self.y.minor {
            c.hline(p.x0 - 3, p.x0, self.y_pixel(at), FRAME);
        }

        // Title and axis names.
        let tw = text_width(&self.title);
        c.text(((WIDTH - tw) / 2).max(4), 12, &self.title, INK);
        let x_name = "epoch";
        let xc = (p.x0 + p.x1) / 2 - text_width(x_name) / 2;
        c.text(xc, p.y1 + 9 + TEXT_HEIGHT + 10, x_name, INK);
        let y_name = match self.y.scale {
            Scale::Linear => "loss",
            Scale::Log10 => "loss (log scale)",
        };
        c.text(10, p.y0 - TEXT_HEIGHT - 8, y_name, INK);

        // The curves, inside the plot area.
        c.clip = p;
        for (i, s) in self.series.iter().enumerate() {
            let pixels: Vec<(i64, i64)> = s.iter().filter_map(|&q| self.pixel(q)).collect();
            match pixels.as_slice() {
                [] => {}
                [(x, y)] => c.fill(
                    Rect {
                        x0: x - 2,
                        y0: y - 2,
                        x1: x + 2,
                        y1: y + 2,
                    },
                    colour(i),
                ),
                _ => {
                    for pair in pixels.windows(2) {
                        c.thick_line(pair[0], pair[1], colour(i));
                    }
                }
            }
        }
        c.clip = Canvas::whole();

        // The legend.
        let legend = self.legend_rect(&c);
        if let Some(r) = legend {
            c.fill(r, WHITE);
            c.outline(r, LEGEND_BORDER);
            for (i, label) in self.labels.iter().enumerate() {
                let top = r.y0 + 6 + i as i64 * 18;
                let mid = top + TEXT_HEIGHT / 2 - 1;
                c.thick_line((r.x0 + 8, mid), (r.x0 + 32, mid), colour(i));
                c.text(r.x0 + 40, top, label, INK);
            }
        }
        (c, legend)
    }
}

fn encode(canvas: &Canvas) -> Result<Vec<u8>, String> {
    let failed = |e: png::EncodingError| format!("cannot encode the loss plot as PNG: {e}");
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, WIDTH as u32, HEIGHT as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(failed)?;
    writer.write_image_data(&canvas.px).map_err(failed)?;
    writer.finish().map_err(failed)?;
    Ok(out)
}

/// The 5x8 cell of `ch`: eight rows, top first, the bit 0b10000 the leftmost
/// column. Row 6 is the baseline; only descenders (g, j, p, q, y and the
/// comma) reach row 7. A character without a glyph is drawn as '?'.
fn glyph(ch: char) -> [u8; 8] {
    match ch {
        'g' => [0x00, 0x00, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'j' => [0x02, 0x00, 0x06, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'p' => [0x00, 0x00, 0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10],
        'q' => [0x00, 0x00, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x01],
        'y' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08],
        _ => {
            let [a, b, c, d, e, f, g] = glyph_above_baseline(ch);
            [a, b, c, d, e, f, g, 0]
        }
    }
}

/// The cells of the characters that stay above the baseline, seven rows.
fn glyph_above_baseline(ch: char) -> [u8; 7] {
    match ch {
        ' ' => [0, 0, 0, 0, 0, 0, 0],
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        'a' => [0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'b' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E],
        'c' => [0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E],
        'd' => [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F],
        'e' => [0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E],
        'f' => [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08],
        'h' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11],
        'i' => [0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E],
        'k' => [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'm' => [0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11],
        'n' => [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11],
        'o' => [0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E],
        'r' => [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0x00, 0x00, 0x0E, 0x10, 0x0E, 0x01, 0x1E],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06],
        'u' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D],
        'v' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'w' => [0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A],
        'x' => [0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11],
        'z' => [0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '+' => [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '[' => [0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E],
        ']' => [0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E],
        '/' => [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00],
        '_' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '!' => [0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x04],
        '\'' => [0x04, 0x04, 0x08, 0x00, 0x00, 0x00, 0x00],
        _ => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes PNG bytes into (width, height, RGB pixels).
    fn decode(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().expect("a PNG header");
        let mut buf = vec![0; reader.output_buffer_size().expect("a buffer size")];
        let info = reader.next_frame(&mut buf).expect("a PNG frame");
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    fn pixel(rgb: &[u8], (x, y): (i64, i64)) -> Rgb {
        let i = ((y * WIDTH + x) * 3) as usize;
        [rgb[i], rgb[i + 1], rgb[i + 2]]
    }

    type Points = Vec<(f64, f64)>;

    fn training_run() -> (Points, Points) {
        let train = (1..=20)
            .map(|e| (e as f64, 2.0 / e as f64 + 0.05))
            .collect();
        let val = (1..=20).map(|e| (e as f64, 2.4 / e as f64 + 0.6)).collect();
        (train, val)
    }

    #[test]
    fn output_decodes_as_an_800_by_500_png() {
        let (train, val) = training_run();
        let curves = [
            Curve {
                label: "train",
                points: &train,
            },
            Curve {
                label: "validation",
                points: &val,
            },
        ];
        let bytes = render_png("mlp: loss", &curves).unwrap();
        let (w, h, rgb) = decode(&bytes);
        assert_eq!((w, h), (800, 500));
        assert_eq!(rgb.len(), 800 * 500 * 3);
        // White background in the corner, something drawn besides.
        assert_eq!(pixel(&rgb, (0, 0)), WHITE);
        assert!(rgb.chunks(3).any(|c| c != WHITE));
    }

    #[test]
    fn each_curve_is_drawn_in_its_own_colour_at_its_points() {
        let (train, val) = training_run();
        let curves = [
            Curve {
                label: "train",
                points: &train,
            },
            Curve {
                label: "validation",
                points: &val,
            },
        ];
        let chart = Chart::new("loss", &curves);
        assert_eq!(chart.y.scale, Scale::Linear);
        let (canvas, legend) = chart.draw();
        let (_, _, rgb) = decode(&encode(&canvas).unwrap());
        assert_ne!(colour(0), colour(1));
        for (i, points) in [&train, &val].into_iter().enumerate() {
            for &q in &points[4..16] {
                let at = chart.pixel(q).unwrap();
                if legend.is_some_and(|r| r.contains(at.0, at.1)) {
                    continue;
                }
                assert_eq!(pixel(&rgb, at), colour(i), "curve {i} at {q:?} ({at:?})");
            }
        }
        // The legend shows both colours.
        let r = legend.unwrap();
        for i in 0..2 {
            let y = r.y0 + 6 + i as i64 * 18 + TEXT_HEIGHT / 2 - 1;
            assert_eq!(pixel(&rgb, (r.x0 + 20, y)), colour(i));
        }
    }

    #[test]
    fn losses_spanning_three_decades_get_a_log_axis() {
        let pts: Vec<(f64, f64)> = (0..=30)
            .map(|i| (i as f64, 10f64.powf(3.0 - i as f64 / 10.0)))
            .collect();
        let chart = Chart::new(
            "",
            &[Curve {
                label: "train",
                points: &pts,
            }],
        );
        assert_eq!(chart.y.scale, Scale::Log10);
        let labels: Vec<&str> = chart.y.ticks.iter().map(|t| t.label.as_str()).collect();
        assert_eq!(labels, ["1", "10", "100", "1000"]);
        assert!(!chart.y.minor.is_empty());
        // The first and last points are drawn where the axis puts them.
        let (_, _, rgb) = decode(&encode(&chart.draw().0).unwrap());
        let last = chart.pixel(pts[30]).unwrap();
        assert_eq!(pixel(&rgb, last), colour(0));

        // Two decades or less, or a loss that is not positive: linear.
        let two = [(0.0, 100.0), (1.0, 1.0)];
        let zero = [(0.0, 1000.0), (1.0, 0.0)];
        for points in [&two[..], &zero[..]] {
            let chart = Chart::new("", &[Curve { label: "", points }]);
            assert_eq!(chart.y.scale, Scale::Linear);
        }
    }

    #[test]
    fn ticks_are_round_numbers() {
        let labels = |lo, hi| -> Vec<String> {
            linear_ticks(lo, hi, 6.0)
                .into_iter()
                .map(|t| t.label)
                .collect()
        };
        assert_eq!(labels(0.0, 1.0), ["0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
        assert_eq!(
            labels(1.0, 20.0),
            ["2", "4", "6", "8", "10", "12", "14", "16", "18", "20"]
        );
        assert_eq!(labels(0.0, 30.0), ["0", "5", "10", "15", "20", "25", "30"]);
        assert_eq!(labels(-0.13, 0.13), ["-0.10", "-0.05", "0", "0.05", "0.10"]);
        assert_eq!(
            labels(0.0, 3e6),
            ["0", "5.0e5", "1.0e6", "1.5e6", "2.0e6", "2.5e6", "3.0e6"]
        );
        assert_eq!(labels(0.0, 3e-5)[1], "5.0e-6");
        assert_eq!(decade_label(-2), "0.01");
        assert_eq!(decade_label(3), "1000");
        assert_eq!(decade_label(-7), "1e-7");
        assert_eq!(decade_label(9), "1e9");
    }

    #[test]
    fn odd_inputs_still_give_a_valid_chart() {
        let nan = f64::NAN;
        let inf = f64::INFINITY;
        let long = "a label much longer than any legend has room for, ünïcödé";
        let cases: Vec<Vec<Vec<(f64, f64)>>> = vec![
            vec![],
            vec![vec![], vec![]],
            vec![vec![(1.0, 0.5)]],
            vec![vec![(1.0, 0.5)], vec![]],
            vec![vec![(nan, nan), (inf, 1.0), (1.0, -inf)]],
            vec![vec![(0.0, nan), (1.0, 0.3), (2.0, nan), (3.0, 0.2)]],
            vec![vec![(0.0, 0.0), (1.0, 0.0), (2.0, 0.0)]],
            vec![vec![(5.0, 2.0), (5.0, 2.0)]],
            vec![vec![(0.0, 1.0), (1.0, 1.0 + 1e-15)]],
            vec![vec![(0.0, -1e308), (1.0, 1e308), (f64::MAX, f64::MIN)]],
            vec![vec![(0.0, 1e-310), (1e-320, 5e-324)]],
            vec![vec![(0.0, f64::MIN_POSITIVE), (1.0, f64::MAX)]],
            vec![vec![(-3.0, -2.0), (-1.0, -7.5)]],
            vec![vec![(0.0, 1e12), (1.0, 1e12 + 1.0)]],
            (0..25).map(|i| vec![(0.0, i as f64), (1.0, 1.0)]).collect(),
        ];
        for (n, case) in cases.iter().enumerate() {
            let curves: Vec<Curve<'_>> = case
                .iter()
                .enumerate()
                .map(|(i, points)| Curve {
                    label: if i == 0 { long } else { "" },
                    points,
                })
                .collect();
            for title in ["", long, "loss"] {
                let bytes = render_png(title, &curves).unwrap_or_else(|e| panic!("case {n}: {e}"));
                let (w, h, _) = decode(&bytes);
                assert_eq!((w, h), (800, 500), "case {n}");
            }
        }
    }

    #[test]
    fn a_single_point_is_drawn_as_a_dot() {
        let points = [(3.0, 0.7)];
        let curves = [Curve {
            label: "validation",
            points: &points,
        }];
        let chart = Chart::new("", &curves);
        let (_, _, rgb) = decode(&encode(&chart.draw().0).unwrap());
        assert_eq!(pixel(&rgb, chart.pixel(points[0]).unwrap()), colour(0));
    }

    #[test]
    fn the_font_has_the_characters_labels_use() {
        let unknown = glyph('\u{1F600}');
        let chars = ('0'..='9')
            .chain('a'..='z')
            .chain('A'..='Z')
            .chain(".-+e:,()/_".chars());
        let mut seen = std::collections::HashMap::new();
        for ch in chars {
            let g = glyph(ch);
            assert_ne!(g, unknown, "{ch:?} has no glyph");
            if let Some(other) = seen.insert(g, ch).filter(|&o| o != ch) {
                panic!("{other:?} and {ch:?} look the same");
            }
        }
        assert_eq!(glyph(' '), [0; 8]);
    }
}
