//! The geometry of a series: the slices agree with each other, their order along the slice
//! normal, an even step between them, and the voxel-to-world affine (RAS+).

use std::path::Path;

use super::slice::Slice;
use super::{dicom_error, ORIENTATION_TOLERANCE, SPACING_TOLERANCE};
use crate::Result;

/// Absolute slack on positions and spacings (mm), for the rounding of decimal strings.
const POSITION_SLACK_MM: f64 = 1e-3;

/// Every slice has the first one's rows, columns, pixel spacing and orientation.
pub(super) fn check_consistent(slices: &[Slice]) -> Result<()> {
    let first = &slices[0];
    let name = |s: &Slice| {
        s.path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned()
    };
    for s in &slices[1..] {
        let differs = |what: &str, this: String, theirs: String| {
            dicom_error(
                &s.path,
                format!(
                    "{what} is {this}, but {theirs} in {} (the other slices of the series): \
                     every slice must share one grid",
                    name(first)
                ),
            )
        };
        if (s.rows, s.cols) != (first.rows, first.cols) {
            return Err(differs(
                "Rows x Columns",
                format!("{} x {}", s.rows, s.cols),
                format!("{} x {}", first.rows, first.cols),
            ));
        }
        let spacing_off = s
            .pixel_spacing
            .iter()
            .zip(&first.pixel_spacing)
            .any(|(a, b)| (a - b).abs() > POSITION_SLACK_MM);
        if spacing_off {
            return Err(differs(
                "PixelSpacing",
                format!("{:?}", s.pixel_spacing),
                format!("{:?}", first.pixel_spacing),
            ));
        }
        let orientation_off = s
            .orientation
            .iter()
            .zip(&first.orientation)
            .any(|(a, b)| (a - b).abs() > ORIENTATION_TOLERANCE);
        if orientation_off {
            return Err(differs(
                "ImageOrientationPatient",
                format!("{:?}", s.orientation),
                format!("{:?}", first.orientation),
            ));
        }
    }
    Ok(())
}

/// The slice order along the normal and the voxel-to-world affine (RAS+, mm).
///
/// # Errors
/// Naming `dir`: a single slice, two slices at one position, or a step between
/// consecutive positions that differs from the median step (a missing slice).
pub(super) fn sort_and_affine(dir: &Path, slices: &[Slice]) -> Result<(Vec<usize>, [[f64; 4]; 4])> {
    let n = slices.len();
    if n < 2 {
        return Err(dicom_error(
            dir,
            format!(
                "the series has a single slice ({}): a volume needs at least 2",
                slices[0].path.display()
            ),
        ));
    }
    let o = slices[0].orientation;
    let (row_dir, col_dir) = ([o[0], o[1], o[2]], [o[3], o[4], o[5]]);
    let normal = cross(row_dir, col_dir);
    let along = |s: &Slice| dot(s.position, normal);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| along(&slices[a]).total_cmp(&along(&slices[b])));

    let steps: Vec<[f64; 3]> = order
        .windows(2)
        .map(|w| sub(slices[w[1]].position, slices[w[0]].position))
        .collect();
    let file = |i: usize| {
        slices[i]
            .path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
    };
    for (w, step) in order.windows(2).zip(&steps) {
        if dot(*step, normal) < POSITION_SLACK_MM {
            return Err(dicom_error(
                dir,
                format!(
                    "duplicate slice position: {} and {} are both at {:.3} mm along the slice \
                     normal (ImagePositionPatient {:?}); the folder may hold a slice twice",
                    file(w[0]),
                    file(w[1]),
                    along(&slices[w[0]]),
                    slices[w[0]].position
                ),
            ));
        }
    }
    let median = median_step(&steps);
    let tolerance = SPACING_TOLERANCE * norm(median) + POSITION_SLACK_MM;
    for (w, step) in order.windows(2).zip(&steps) {
        if norm(sub(*step, median)) > tolerance {
            return Err(dicom_error(
                dir,
                format!(
                    "uneven slice spacing: {} mm from {} to {} where the series' step is {:.3} \
                     mm (tolerance {tolerance:.3} mm): a missing slice or an irregular series",
                    fmt_step(*step, normal),
                    file(w[0]),
                    file(w[1]),
                    norm(median)
                ),
            ));
        }
    }

    let first = &slices[order[0]];
    let last = &slices[order[n - 1]];
    let slice_step = sub(last.position, first.position).map(|v| v / (n - 1) as f64);
    let [row_spacing, col_spacing] = first.pixel_spacing;
    // DICOM (LPS+) columns: along the row direction (column index), the column direction
    // (row index), the slices.
    let columns = [
        row_dir.map(|v| v * col_spacing),
        col_dir.map(|v| v * row_spacing),
        slice_step,
    ];
    let mut affine = [[0.0; 4]; 4];
    for r in 0..3 {
        // LPS -> RAS: x and y change sign.
        let sign = if r < 2 { -1.0 } else { 1.0 };
        // `+ 0.0` turns the -0.0 of a negated zero into 0.0.
        for (c, column) in columns.iter().enumerate() {
            affine[r][c] = sign * column[r] + 0.0;
        }
        affine[r][3] = sign * first.position[r] + 0.0;
    }
    affine[3][3] = 1.0;
    Ok((order, affine))
}

/// The component-wise median of the steps.
fn median_step(steps: &[[f64; 3]]) -> [f64; 3] {
    [0, 1, 2].map(|a| {
        let mut v: Vec<f64> = steps.iter().map(|s| s[a]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    })
}

fn fmt_step(step: [f64; 3], normal: [f64; 3]) -> String {
    format!("a step of {:.3}", dot(step, normal))
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a.iter().zip(&b).map(|(x, y)| x * y).sum()
}

fn sub(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

fn norm(a: [f64; 3]) -> f64 {
    dot(a, a).sqrt()
}
