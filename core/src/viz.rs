//! Pictures a user looks at before trusting a number: training curves, and mid slices of a
//! registered case. Drawn with `embedded-graphics` (lines, rectangles, its built-in bitmap
//! font, so no font file is needed) into an RGB buffer, encoded as PNG with `png`.

use embedded_graphics::mono_font::ascii::FONT_6X10;
use embedded_graphics::mono_font::MonoTextStyle;
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::*;
use embedded_graphics::primitives::{Line, PrimitiveStyle, Rectangle};
use embedded_graphics::text::Text;

use crate::train::EpochSummary;
use crate::{Error, Result};

/// An RGB picture.
#[derive(Clone, Debug)]
pub struct Canvas {
    width: u32,
    height: u32,
    rgb: Vec<u8>,
}

impl Canvas {
    /// A white canvas.
    pub fn new(width: u32, height: u32) -> Self {
        Self {
            width,
            height,
            rgb: vec![255; (width * height * 3) as usize],
        }
    }

    /// Width and height in pixels.
    pub fn size_px(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    /// The colour at (x, y).
    pub fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        let i = ((y * self.width + x) * 3) as usize;
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }

    fn put(&mut self, x: i32, y: i32, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as u32) < self.width && (y as u32) < self.height {
            let i = ((y as u32 * self.width + x as u32) * 3) as usize;
            self.rgb[i..i + 3].copy_from_slice(&c);
        }
    }

    /// Writes `text` with its top-left corner at (x, y).
    pub fn text(&mut self, x: i32, y: i32, text: &str, color: Rgb888) {
        let style = MonoTextStyle::new(&FONT_6X10, color);
        // Drawing into memory cannot fail.
        let _ = Text::with_baseline(
            text,
            Point::new(x, y),
            style,
            embedded_graphics::text::Baseline::Top,
        )
        .draw(self);
    }

    /// Encodes the canvas as PNG.
    pub fn to_png(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        {
            let mut encoder = png::Encoder::new(&mut out, self.width, self.height);
            encoder.set_color(png::ColorType::Rgb);
            encoder.set_depth(png::BitDepth::Eight);
            let mut writer = encoder
                .write_header()
                .map_err(|e| Error::invalid("png", e.to_string()))?;
            writer
                .write_image_data(&self.rgb)
                .map_err(|e| Error::invalid("png", e.to_string()))?;
        }
        Ok(out)
    }
}

impl OriginDimensions for Canvas {
    fn size(&self) -> Size {
        Size::new(self.width, self.height)
    }
}

impl DrawTarget for Canvas {
    type Color = Rgb888;
    type Error = std::convert::Infallible;

    fn draw_iter<I>(&mut self, pixels: I) -> std::result::Result<(), Self::Error>
    where
        I: IntoIterator<Item = Pixel<Self::Color>>,
    {
        for Pixel(p, c) in pixels {
            self.put(p.x, p.y, [c.r(), c.g(), c.b()]);
        }
        Ok(())
    }
}

/// One line of a chart.
struct Series<'a> {
    label: &'a str,
    color: Rgb888,
    points: Vec<(f64, f64)>,
}

const GRAY: Rgb888 = Rgb888::new(120, 120, 120);
const PALETTE: [Rgb888; 3] = [
    Rgb888::new(31, 119, 180),
    Rgb888::new(214, 39, 40),
    Rgb888::new(44, 160, 44),
];

/// Draws a line chart of `series` in the rectangle at (x0, y0) of size (w, h).
fn chart(
    canvas: &mut Canvas,
    (x0, y0, w, h): (i32, i32, i32, i32),
    title: &str,
    series: &[Series<'_>],
) {
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    canvas.text(x0, y0, title, Rgb888::BLACK);
    let (left, top, right, bottom) = (x0 + 60, y0 + 16, x0 + w - 8, y0 + h - 24);
    let frame = PrimitiveStyle::with_stroke(GRAY, 1);
    let _ = Rectangle::with_corners(Point::new(left, top), Point::new(right, bottom))
        .into_styled(frame)
        .draw(canvas);
    if all.is_empty() {
        canvas.text(left + 8, top + 8, "no data", GRAY);
        return;
    }
    let (mut xmin, mut xmax) = (f64::INFINITY, f64::NEG_INFINITY);
    let (mut ymin, mut ymax) = (f64::INFINITY, f64::NEG_INFINITY);
    for (x, y) in &all {
        xmin = xmin.min(*x);
        xmax = xmax.max(*x);
        ymin = ymin.min(*y);
        ymax = ymax.max(*y);
    }
    if xmax <= xmin {
        xmax = xmin + 1.0;
    }
    if ymax <= ymin {
        let pad = ymin.abs().max(1e-3) * 0.05;
        ymin -= pad;
        ymax += pad;
    }
    let px = |x: f64| left + ((x - xmin) / (xmax - xmin) * f64::from(right - left)).round() as i32;
    let py =
        |y: f64| bottom - ((y - ymin) / (ymax - ymin) * f64::from(bottom - top)).round() as i32;
    canvas.text(x0, top - 2, &format!("{ymax:.4}"), GRAY);
    canvas.text(x0, bottom - 8, &format!("{ymin:.4}"), GRAY);
    canvas.text(left, bottom + 4, &format!("epoch {xmin:.0}"), GRAY);
    let last = format!("{xmax:.0}");
    canvas.text(right - 6 * last.len() as i32, bottom + 4, &last, GRAY);
    for (k, s) in series.iter().enumerate() {
        let style = PrimitiveStyle::with_stroke(s.color, 2);
        let points: Vec<Point> = s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| Point::new(px(x), py(y)))
            .collect();
        for pair in points.windows(2) {
            let _ = Line::new(pair[0], pair[1]).into_styled(style).draw(canvas);
        }
        if let [single] = points.as_slice() {
            let _ = Rectangle::new(*single - Point::new(2, 2), Size::new(5, 5))
                .into_styled(PrimitiveStyle::with_fill(s.color))
                .draw(canvas);
        }
        // Legend, top right, one line a series.
        let ly = top + 4 + 12 * k as i32;
        let lx = right - 8 - 6 * s.label.len() as i32 - 16;
        let _ = Line::new(Point::new(lx, ly + 4), Point::new(lx + 12, ly + 4))
            .into_styled(style)
            .draw(canvas);
        canvas.text(lx + 16, ly, s.label, Rgb888::BLACK);
    }
}

/// The training curves: losses and validation Dice per epoch, as a PNG.
pub fn curves_png(history: &[EpochSummary]) -> Result<Vec<u8>> {
    let mut canvas = Canvas::new(640, 560);
    let pts = |f: &dyn Fn(&EpochSummary) -> Option<f64>| -> Vec<(f64, f64)> {
        history
            .iter()
            .filter_map(|h| f(h).map(|v| (h.epoch as f64, v)))
            .collect()
    };
    chart(
        &mut canvas,
        (8, 8, 624, 270),
        "training loss (mean over the epoch's steps)",
        &[
            Series {
                label: "total",
                color: PALETTE[0],
                points: pts(&|h| Some(h.total_loss)),
            },
            Series {
                label: "similarity",
                color: PALETTE[1],
                points: pts(&|h| Some(h.similarity_loss)),
            },
        ],
    );
    chart(
        &mut canvas,
        (8, 284, 624, 270),
        "validation Dice",
        &[
            Series {
                label: "binary",
                color: PALETTE[0],
                points: pts(&|h| h.val_dice),
            },
            Series {
                label: "soft",
                color: PALETTE[1],
                points: pts(&|h| h.val_soft_dice),
            },
            Series {
                label: "unregistered",
                color: PALETTE[2],
                points: pts(&|h| h.val_dice_before),
            },
        ],
    );
    canvas.to_png()
}

/// The volumes of one registered case, all on the same grid.
#[derive(Clone, Copy, Debug)]
pub struct CaseViews<'a> {
    /// Fixed image.
    pub fixed: &'a ndarray::Array3<f32>,
    /// Moving image.
    pub moving: &'a ndarray::Array3<f32>,
    /// Moving image warped onto the fixed one.
    pub warped: &'a ndarray::Array3<f32>,
    /// Length of the displacement at each voxel (any unit; shown relative to its maximum).
    pub ddf_magnitude: &'a ndarray::Array3<f32>,
    /// Voxel size (mm) along the three axes, for the aspect ratio.
    pub spacing: [f64; 3],
}

/// A 2-D slice: values row by row, and its physical aspect (height / width).
struct Slice {
    rows: usize,
    cols: usize,
    values: Vec<f32>,
    aspect: f64,
}

/// The middle slice across `axis` (0, 1 or 2), displayed with the last remaining axis
/// upwards (superior up for a coronal slice of a Learn2Reg scan).
fn mid_slice(v: &ndarray::Array3<f32>, axis: usize, spacing: [f64; 3]) -> Slice {
    let mid = v.shape()[axis] / 2;
    let s = v.index_axis(ndarray::Axis(axis), mid);
    let (a, b) = (s.shape()[0], s.shape()[1]);
    let others: Vec<usize> = (0..3).filter(|&d| d != axis).collect();
    // Columns: the first remaining axis; rows: the second, flipped so that it points up.
    let mut values = Vec::with_capacity(a * b);
    for r in (0..b).rev() {
        for c in 0..a {
            values.push(s[[c, r]]);
        }
    }
    Slice {
        rows: b,
        cols: a,
        values,
        aspect: (b as f64 * spacing[others[1]]) / (a as f64 * spacing[others[0]]).max(1e-9),
    }
}

/// Value range between the 1st and 99th percentiles of `values` (finite ones).
fn robust_range(values: &[f32]) -> (f32, f32) {
    let mut v: Vec<f32> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (0.0, 1.0);
    }
    v.sort_by(f32::total_cmp);
    let lo = v[v.len() / 100];
    let hi = v[(v.len() * 99) / 100];
    if hi > lo {
        (lo, hi)
    } else {
        (lo, lo + 1.0)
    }
}

/// Blits `slice` into a `size` x `size` box at (x0, y0), nearest-neighbour, aspect kept;
/// `color` maps a value to a colour.
fn blit(
    canvas: &mut Canvas,
    (x0, y0): (i32, i32),
    size: i32,
    slice: &Slice,
    color: &dyn Fn(f32) -> [u8; 3],
) {
    let (w, h) = if slice.aspect >= 1.0 {
        (((f64::from(size)) / slice.aspect).round() as i32, size)
    } else {
        (size, (f64::from(size) * slice.aspect).round() as i32)
    };
    let (ox, oy) = (x0 + (size - w) / 2, y0 + (size - h) / 2);
    for py in 0..h.max(1) {
        let r = ((py as usize * slice.rows) / h.max(1) as usize).min(slice.rows - 1);
        for px in 0..w.max(1) {
            let c = ((px as usize * slice.cols) / w.max(1) as usize).min(slice.cols - 1);
            canvas.put(ox + px, oy + py, color(slice.values[r * slice.cols + c]));
        }
    }
}

/// A value-to-colour mapping.
type Colormap = Box<dyn Fn(f32) -> [u8; 3]>;

fn gray(lo: f32, hi: f32) -> impl Fn(f32) -> [u8; 3] {
    move |v| {
        let g = (((v - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0).round() as u8;
        [g, g, g]
    }
}

/// Blue (0) to yellow to red (max): displacement magnitude.
fn heat(max: f32) -> impl Fn(f32) -> [u8; 3] {
    move |v| {
        let t = (v / max.max(1e-6)).clamp(0.0, 1.0);
        if t < 0.5 {
            let u = t * 2.0;
            [
                (255.0 * u) as u8,
                (255.0 * u) as u8,
                (255.0 * (1.0 - u)) as u8,
            ]
        } else {
            let u = (t - 0.5) * 2.0;
            [255, (255.0 * (1.0 - u)) as u8, 0]
        }
    }
}

/// Mid slices of a registered case as a PNG: for the coronal and the axial slice, the
/// fixed, moving and warped images, a checkerboard of fixed and warped, the absolute
/// difference to the fixed image before and after registration, and the displacement
/// magnitude.
pub fn case_png(views: &CaseViews<'_>) -> Result<Vec<u8>> {
    let shape = views.fixed.shape();
    for (name, v) in [
        ("moving", views.moving),
        ("warped", views.warped),
        ("ddf magnitude", views.ddf_magnitude),
    ] {
        if v.shape() != shape {
            return Err(Error::ShapeMismatch {
                op: "case picture",
                expected: format!("{shape:?}"),
                got: format!("{name} {:?}", v.shape()),
            });
        }
    }
    const BOX: i32 = 150;
    const PAD: i32 = 6;
    let titles = [
        "fixed",
        "moving",
        "warped",
        "checkerboard",
        "|moving-fixed|",
        "|warped-fixed|",
        "|DDF|",
    ];
    let width = (BOX + PAD) * titles.len() as i32 + PAD;
    let height = 2 * (BOX + 16 + PAD) + PAD;
    let mut canvas = Canvas::new(width as u32, height as u32);
    let (lo, hi) = robust_range(views.fixed.as_slice().unwrap_or(&[]));
    let before: Vec<f32> = views
        .moving
        .iter()
        .zip(views.fixed.iter())
        .map(|(m, f)| (m - f).abs())
        .collect();
    let diff_max = robust_range(&before).1.max(1e-6);
    let ddf_max = views.ddf_magnitude.iter().copied().fold(0f32, f32::max);
    // Coronal: across axis 1 (anterior-posterior); axial: across axis 2.
    for (row, (axis, label)) in [(1usize, "coronal"), (2, "axial")].into_iter().enumerate() {
        let y0 = PAD + row as i32 * (BOX + 16 + PAD);
        let f = mid_slice(views.fixed, axis, views.spacing);
        let m = mid_slice(views.moving, axis, views.spacing);
        let w = mid_slice(views.warped, axis, views.spacing);
        let d = mid_slice(views.ddf_magnitude, axis, views.spacing);
        let checker = Slice {
            values: f
                .values
                .iter()
                .zip(&w.values)
                .enumerate()
                .map(|(i, (a, b))| {
                    let (r, c) = (i / f.cols, i % f.cols);
                    let tile = (f.cols / 8).max(1);
                    if (r / tile + c / tile).is_multiple_of(2) {
                        *a
                    } else {
                        *b
                    }
                })
                .collect(),
            ..Slice {
                rows: f.rows,
                cols: f.cols,
                values: Vec::new(),
                aspect: f.aspect,
            }
        };
        let diff = |s: &Slice| Slice {
            values: s
                .values
                .iter()
                .zip(&f.values)
                .map(|(a, b)| (a - b).abs())
                .collect(),
            rows: s.rows,
            cols: s.cols,
            aspect: s.aspect,
        };
        let panels: [(&Slice, Colormap); 7] = [
            (&f, Box::new(gray(lo, hi))),
            (&m, Box::new(gray(lo, hi))),
            (&w, Box::new(gray(lo, hi))),
            (&checker, Box::new(gray(lo, hi))),
            (&diff(&m), Box::new(gray(0.0, diff_max))),
            (&diff(&w), Box::new(gray(0.0, diff_max))),
            (&d, Box::new(heat(ddf_max))),
        ];
        for (k, ((slice, color), title)) in panels.iter().zip(titles).enumerate() {
            let x0 = PAD + k as i32 * (BOX + PAD);
            canvas.text(x0, y0, &format!("{title} ({label})"), Rgb888::BLACK);
            blit(&mut canvas, (x0, y0 + 14), BOX, slice, color.as_ref());
        }
    }
    canvas.to_png()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(epoch: usize, loss: f64, dice: f64) -> EpochSummary {
        EpochSummary {
            epoch,
            total_loss: loss,
            similarity_loss: loss * 0.9,
            regularisation_loss: loss * 0.1,
            val_soft_dice: Some(dice - 0.01),
            val_dice: Some(dice),
            val_dice_before: Some(0.8),
            val_mi_loss: None,
            val_folding_pct: None,
            lr: 1e-4,
            seconds: 1.0,
        }
    }

    #[test]
    fn curves_are_a_png_with_the_lines_drawn() {
        let history: Vec<_> = (1..=5)
            .map(|e| summary(e, -1.0 - 0.1 * e as f64, 0.8 + 0.02 * e as f64))
            .collect();
        let png = curves_png(&history).expect("png");
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let decoder = png::Decoder::new(std::io::Cursor::new(&png));
        let mut reader = decoder.read_info().expect("header");
        let mut buf = vec![0; reader.output_buffer_size().expect("size")];
        let info = reader.next_frame(&mut buf).expect("frame");
        assert_eq!((info.width, info.height), (640, 560));
        // Some pixels carry the series' colours.
        let blue = buf
            .chunks_exact(3)
            .filter(|p| p[0] == PALETTE[0].r() && p[1] == PALETTE[0].g() && p[2] == PALETTE[0].b())
            .count();
        assert!(blue > 100, "{blue} blue pixels");
        // An empty history still renders (with "no data").
        assert!(curves_png(&[]).is_ok());
    }

    #[test]
    fn a_case_picture_shows_the_difference_shrink() {
        let fixed = ndarray::Array3::from_shape_fn((20, 16, 24), |(i, j, k)| (i + j + k) as f32);
        let moving = fixed.mapv(|v| v + 5.0);
        let mag = ndarray::Array3::from_elem((20, 16, 24), 2.0f32);
        let views = CaseViews {
            fixed: &fixed,
            moving: &moving,
            warped: &fixed,
            ddf_magnitude: &mag,
            spacing: [1.0, 1.0, 2.0],
        };
        let png = case_png(&views).expect("png");
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let wrong = ndarray::Array3::zeros((2, 2, 2));
        let bad = CaseViews {
            warped: &wrong,
            ..views
        };
        assert!(case_png(&bad).is_err());
    }
}
