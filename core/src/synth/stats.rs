//! The numbers a case is compared with published tables by: landmark displacement statistics
//! (mm) and the lung overlap of the two phases.

use ndarray::Array3;
use serde::{Deserialize, Serialize};

use crate::keypoints::KeypointPairs;

/// Landmark displacement statistics of one case, in mm (as DIR-Lab reports them).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct MotionStats {
    /// Number of landmark pairs.
    pub landmarks: usize,
    /// Mean displacement magnitude (mm).
    pub mean_mm: f64,
    /// 95th percentile of the magnitude (mm, nearest rank below).
    pub p95_mm: f64,
    /// Largest magnitude (mm).
    pub max_mm: f64,
    /// Mean |cranio-caudal component| over mean magnitude (DIR-Lab: 0.83-0.96).
    pub cranio_caudal_fraction: f64,
}

impl MotionStats {
    /// Statistics of `pairs` (voxel coordinates) on a grid of `spacing` mm.
    pub fn from_pairs(pairs: &KeypointPairs, spacing: [f64; 3]) -> Self {
        let n = pairs.len();
        if n == 0 {
            return MotionStats::default();
        }
        let mut magnitudes = Vec::with_capacity(n);
        let mut cranio_caudal = 0.0;
        for (f, m) in pairs.fixed.iter().zip(&pairs.moving) {
            let d = [0, 1, 2].map(|a| (m[a] - f[a]) * spacing[a]);
            magnitudes.push((d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt());
            cranio_caudal += d[2].abs();
        }
        magnitudes.sort_by(f64::total_cmp);
        let total: f64 = magnitudes.iter().sum();
        MotionStats {
            landmarks: n,
            mean_mm: total / n as f64,
            p95_mm: magnitudes[(0.95 * (n - 1) as f64) as usize],
            max_mm: magnitudes[n - 1],
            cranio_caudal_fraction: if total > 0.0 {
                cranio_caudal / total
            } else {
                0.0
            },
        }
    }
}

/// Dice of two 0/1 masks.
pub(crate) fn dice(a: &Array3<f32>, b: &Array3<f32>) -> f64 {
    let (mut both, mut total) = (0usize, 0usize);
    for (x, y) in a.iter().zip(b.iter()) {
        let (x, y) = (*x > 0.5, *y > 0.5);
        both += (x && y) as usize;
        total += x as usize + y as usize;
    }
    if total == 0 {
        1.0
    } else {
        2.0 * both as f64 / total as f64
    }
}

/// Voxels of a 0/1 mask.
pub(crate) fn count(mask: &Array3<f32>) -> usize {
    mask.iter().filter(|&&v| v > 0.5).count()
}
