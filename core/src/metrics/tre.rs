//! Target registration error of keypoint pairs, in millimetres.
//!
//! The DDF `u` is a backward field on the fixed grid (MONAI `Warp`: `out(p) = I(p + u(p))`), so
//! a fixed keypoint `f` corresponds to the moving point `f + u(f)`. With moving keypoint `m`
//! and voxel spacing `s` (mm):
//!
//! ```text
//! tre        = ‖(f + u(f) - m) ⊙ s‖      u(f) trilinearly interpolated, border clamp
//! tre_before = ‖(f - m) ⊙ s‖             (zero displacement)
//! ```
//!
//! Keypoints are voxel coordinates `(i, j, k)` along tensor dims 2, 3, 4 of the DDF grid.

use candle_core::Tensor;

use super::ddf_to_host;
use crate::{Error, Result};

/// TRE of each keypoint pair after registration, in mm.
///
/// `ddf` is `(3, H, W, D)` or `(1, 3, H, W, D)` in voxels; `fixed` and `moving` hold the same
/// number of voxel-coordinate points; `spacing_mm` is the voxel size along the three axes.
pub fn target_registration_error(
    ddf: &Tensor,
    fixed: &[[f64; 3]],
    moving: &[[f64; 3]],
    spacing_mm: [f64; 3],
) -> Result<Vec<f64>> {
    check_pairs(fixed, moving)?;
    let (field, grid) = ddf_to_host("target_registration_error", ddf)?;
    Ok(fixed
        .iter()
        .zip(moving)
        .map(|(f, m)| {
            let u = sample_trilinear(&field, grid, *f);
            distance_mm([f[0] + u[0], f[1] + u[1], f[2] + u[2]], *m, spacing_mm)
        })
        .collect())
}

/// TRE of each keypoint pair before registration (zero displacement), in mm.
pub fn tre_before(
    fixed: &[[f64; 3]],
    moving: &[[f64; 3]],
    spacing_mm: [f64; 3],
) -> Result<Vec<f64>> {
    check_pairs(fixed, moving)?;
    Ok(fixed
        .iter()
        .zip(moving)
        .map(|(f, m)| distance_mm(*f, *m, spacing_mm))
        .collect())
}

/// Mean and population standard deviation (`ddof = 0`, numpy's default) of `values`;
/// `(NaN, NaN)` when empty.
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

fn check_pairs(fixed: &[[f64; 3]], moving: &[[f64; 3]]) -> Result<()> {
    if fixed.len() != moving.len() {
        return Err(Error::ShapeMismatch {
            op: "target_registration_error",
            expected: format!("{} moving keypoints, one per fixed keypoint", fixed.len()),
            got: format!("{}", moving.len()),
        });
    }
    Ok(())
}

/// `‖(a - b) ⊙ spacing‖`.
fn distance_mm(a: [f64; 3], b: [f64; 3], spacing_mm: [f64; 3]) -> f64 {
    (0..3)
        .map(|c| ((a[c] - b[c]) * spacing_mm[c]).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// Trilinear interpolation of the 3 channels of `field` (channel-major, grid `[H, W, D]`) at
/// voxel position `p`, coordinates clamped to the grid (border padding).
pub(crate) fn sample_trilinear(field: &[f64], grid: [usize; 3], p: [f64; 3]) -> [f64; 3] {
    let mut lo = [0usize; 3];
    let mut hi = [0usize; 3];
    let mut t = [0f64; 3];
    for a in 0..3 {
        let max = (grid[a] - 1) as f64;
        let q = p[a].clamp(0.0, max);
        let fl = q.floor();
        lo[a] = fl as usize;
        hi[a] = (lo[a] + 1).min(grid[a] - 1);
        t[a] = q - fl;
    }
    let [_, nw, nd] = grid;
    let voxels = grid.iter().product::<usize>();
    let mut out = [0f64; 3];
    for (c, value) in out.iter_mut().enumerate() {
        let channel = &field[c * voxels..(c + 1) * voxels];
        for corner in 0..8 {
            let pick = |a: usize| (corner >> (2 - a)) & 1 == 1;
            let mut weight = 1.0;
            let mut idx = [0usize; 3];
            for a in 0..3 {
                if pick(a) {
                    weight *= t[a];
                    idx[a] = hi[a];
                } else {
                    weight *= 1.0 - t[a];
                    idx[a] = lo[a];
                }
            }
            *value += weight * channel[(idx[0] * nw + idx[1]) * nd + idx[2]];
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (docs/STYLE.md)
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::losses::test_support::grid;

    /// A constant DDF u = (1, -2, 0.5) voxels: with m = f + u the TRE is 0; with m = f it is
    /// ‖u ⊙ s‖ = sqrt((1·1.5)² + (2·0.5)² + (0.5·2)²) = sqrt(4.25) mm (hand computed).
    #[test]
    fn constant_ddf() {
        let ddf = grid([1, 3, 5, 6, 7], |_, c, _, _, _| [1.0, -2.0, 0.5][c]);
        let spacing = [1.5, 0.5, 2.0];
        let fixed = [[1.0, 2.0, 3.0], [0.5, 4.25, 6.0], [4.0, 0.0, 0.0]];
        let moved: Vec<[f64; 3]> = fixed
            .iter()
            .map(|f| [f[0] + 1.0, f[1] - 2.0, f[2] + 0.5])
            .collect();
        let tre = target_registration_error(&ddf, &fixed, &moved, spacing).unwrap();
        assert!(tre.iter().all(|v| v.abs() < 1e-12), "{tre:?}");
        let tre = target_registration_error(&ddf, &fixed, &fixed, spacing).unwrap();
        assert!(
            tre.iter().all(|v| (v - 4.25f64.sqrt()).abs() < 1e-12),
            "{tre:?}"
        );
        let before = tre_before(&fixed, &moved, spacing).unwrap();
        assert!(
            before.iter().all(|v| (v - 4.25f64.sqrt()).abs() < 1e-12),
            "{before:?}"
        );
    }

    /// A linear DDF is reproduced exactly by trilinear interpolation inside the grid, and the
    /// border clamp holds the edge value outside it. Accepts a (3, H, W, D) DDF.
    #[test]
    fn linear_ddf_interpolation_and_border_clamp() {
        let ddf = grid([1, 3, 5, 6, 7], |_, c, i, j, k| {
            (c as f64 + 1.0) * (0.5 * i - 0.25 * j + 0.1 * k)
        });
        let ddf = ddf.squeeze(0).unwrap();
        let (field, g) = ddf_to_host("test", &ddf).unwrap();
        let u = sample_trilinear(&field, g, [1.3, 2.7, 5.5]);
        let expect = 0.5 * 1.3 - 0.25 * 2.7 + 0.1 * 5.5;
        for (c, v) in u.iter().enumerate() {
            assert!((v - (c as f64 + 1.0) * expect).abs() < 1e-12);
        }
        let outside = sample_trilinear(&field, g, [-3.0, 9.0, 6.0]);
        let edge = 0.5 * 0.0 - 0.25 * 5.0 + 0.1 * 6.0;
        assert!((outside[0] - edge).abs() < 1e-12, "{outside:?}");
    }

    #[test]
    fn mean_std_is_population() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m, 2.5);
        assert!((s - 1.25f64.sqrt()).abs() < 1e-15);
        assert!(mean_std(&[]).0.is_nan());
    }

    #[test]
    fn rejects_bad_inputs() {
        let ddf = Tensor::zeros((2, 3, 4, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let p = [[0.0; 3]];
        assert!(target_registration_error(&ddf, &p, &p, [1.0; 3]).is_err());
        let ddf = Tensor::zeros((3, 4, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(
            target_registration_error(&ddf, &p, &[], [1.0; 3]),
            Err(Error::ShapeMismatch { .. })
        ));
    }
}
