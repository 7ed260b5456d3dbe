//! Vessel landmarks of a real CT: bright local maxima of the slightly smoothed image inside the
//! eroded lungs, [`VESSEL_CONTRAST_HU`] above the lungs' mean (vessel centre lines and branchings stand out from the parenchyma), strongest
//! first, kept at least [`MIN_SPACING_MM`] apart so they spread over both lungs, as DIR-Lab's
//! landmarks spread over salient vessel points.

use std::collections::HashMap;

use ndarray::Array3;

use super::morphology::{erode, gaussian};

/// Smoothing before the maxima are taken (mm, standard deviation).
const SMOOTH_MM: f64 = 1.0;
/// A landmark's smoothed value exceeds the lungs' mean by at least this (HU): vessel, not
/// parenchyma (relative, so that coarse grids, where vessels blur, still find some).
const VESSEL_CONTRAST_HU: f32 = 150.0;
/// Landmarks stay this far inside the lungs (mm): away from the pleura, where the lungs slide.
const INSET_MM: f64 = 5.0;
/// Minimum distance between two landmarks (mm).
pub(crate) const MIN_SPACING_MM: f64 = 5.0;

/// Up to `max` vessel points (mm from output voxel 0, on voxel centres) of `ct` (HU) inside
/// `lungs` (non-zero), strongest first.
pub(crate) fn vessel_points(
    ct: &Array3<f32>,
    lungs: &Array3<u8>,
    spacing: [f64; 3],
    max: usize,
) -> Vec<[f64; 3]> {
    let smooth = gaussian(ct, spacing.map(|s| SMOOTH_MM / s));
    let inner = erode(&lungs.mapv(|l| l > 0), INSET_MM, spacing);
    let (sum, n) = inner
        .iter()
        .zip(smooth.iter())
        .filter(|(&inside, _)| inside)
        .fold((0.0f64, 0usize), |(s, n), (_, &v)| (s + v as f64, n + 1));
    let threshold = (sum / n.max(1) as f64) as f32 + VESSEL_CONTRAST_HU;
    let (h, w, d) = ct.dim();
    let mut candidates = Vec::new();
    for ((i, j, k), &inside) in inner.indexed_iter() {
        let v = smooth[[i, j, k]];
        if !inside || v < threshold || i == 0 || j == 0 || k == 0 {
            continue;
        }
        if i + 1 == h || j + 1 == w || k + 1 == d {
            continue;
        }
        let is_max = (0..27).all(|n| {
            let (a, b, c) = (i + n / 9 - 1, j + n / 3 % 3 - 1, k + n % 3 - 1);
            n == 13 || smooth[[a, b, c]] < v || (smooth[[a, b, c]] == v && n > 13)
        });
        if is_max {
            candidates.push((v, [i, j, k]));
        }
    }
    candidates.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    // Greedy thinning on a hash grid of cells MIN_SPACING_MM wide.
    let cell = |p: [f64; 3]| p.map(|c| (c / MIN_SPACING_MM).floor() as i64);
    let mut grid: HashMap<[i64; 3], Vec<[f64; 3]>> = HashMap::new();
    let mut kept = Vec::new();
    for (_, [i, j, k]) in candidates {
        if kept.len() >= max {
            break;
        }
        let p = [
            i as f64 * spacing[0],
            j as f64 * spacing[1],
            k as f64 * spacing[2],
        ];
        let c = cell(p);
        let near = (0..27).any(|n| {
            let key = [c[0] + n / 9 - 1, c[1] + n / 3 % 3 - 1, c[2] + n % 3 - 1];
            grid.get(&key).is_some_and(|points| {
                points.iter().any(|q| {
                    let d2: f64 = (0..3).map(|a| (p[a] - q[a]).powi(2)).sum();
                    d2 < MIN_SPACING_MM * MIN_SPACING_MM
                })
            })
        });
        if !near {
            grid.entry(c).or_default().push(p);
            kept.push(p);
        }
    }
    kept
}
