//! Jacobian determinant of the transform `x -> x + u(x)` and the folding it reveals.
//!
//! For a DDF `u` in voxels, `J(x) = I + ∇u(x)` with `J[c][a] = δ_ca + ∂u_c/∂x_a`. The partial
//! derivatives follow `numpy.gradient` with unit spacing and `edge_order=1`: central
//! differences `(u[i+1] - u[i-1]) / 2` inside the grid, one-sided `u[1] - u[0]` and
//! `u[n-1] - u[n-2]` on the first and last slices. A voxel **folds** when `det J <= 0`: the
//! transform is not locally invertible there.

use candle_core::Tensor;

use super::ddf_to_host;
use crate::{Error, Result};

/// Summary of the Jacobian determinant over all voxels of a DDF.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JacobianStats {
    /// Percentage (0–100) of voxels with `det J <= 0`.
    pub folding_percent: f64,
    /// Number of voxels with `det J <= 0`.
    pub folded_voxels: usize,
    /// Number of voxels in the grid.
    pub voxels: usize,
    /// Smallest determinant.
    pub min: f64,
    /// Mean determinant.
    pub mean: f64,
    /// Population standard deviation of the determinant.
    pub std: f64,
}

/// The determinant of `I + ∇u` at every voxel of a `(3, H, W, D)` or `(1, 3, H, W, D)` DDF,
/// row-major over `(H, W, D)`. Every spatial size must be at least 2.
pub fn jacobian_determinant(ddf: &Tensor) -> Result<Vec<f64>> {
    let (field, grid) = ddf_to_host("jacobian_determinant", ddf)?;
    if grid.iter().any(|&n| n < 2) {
        return Err(Error::ShapeMismatch {
            op: "jacobian_determinant",
            expected: "every spatial size >= 2 for finite differences".to_string(),
            got: format!("{:?}", ddf.dims()),
        });
    }
    let [nh, nw, nd] = grid;
    let voxels = nh * nw * nd;
    let strides = [nw * nd, nd, 1];
    let mut dets = Vec::with_capacity(voxels);
    for i in 0..nh {
        for j in 0..nw {
            for k in 0..nd {
                let pos = [i, j, k];
                let v = i * strides[0] + j * strides[1] + k;
                let mut jac = [[0f64; 3]; 3];
                for (c, row) in jac.iter_mut().enumerate() {
                    let channel = &field[c * voxels..(c + 1) * voxels];
                    for (a, entry) in row.iter_mut().enumerate() {
                        let s = strides[a];
                        let derivative = if pos[a] == 0 {
                            channel[v + s] - channel[v]
                        } else if pos[a] == grid[a] - 1 {
                            channel[v] - channel[v - s]
                        } else {
                            (channel[v + s] - channel[v - s]) / 2.0
                        };
                        *entry = derivative + if a == c { 1.0 } else { 0.0 };
                    }
                }
                dets.push(det3(&jac));
            }
        }
    }
    Ok(dets)
}

/// Folding percentage, minimum, mean and standard deviation of the Jacobian determinant.
pub fn jacobian_stats(ddf: &Tensor) -> Result<JacobianStats> {
    let dets = jacobian_determinant(ddf)?;
    let voxels = dets.len();
    let n = voxels as f64;
    let folded_voxels = dets.iter().filter(|&&d| d <= 0.0).count();
    let mean = dets.iter().sum::<f64>() / n;
    let std = (dets.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / n).sqrt();
    let min = dets.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(JacobianStats {
        folding_percent: 100.0 * folded_voxels as f64 / n,
        folded_voxels,
        voxels,
        min,
        mean,
        std,
    })
}

/// Determinant of a 3x3 matrix (cofactor expansion along the first row).
fn det3(m: &[[f64; 3]; 3]) -> f64 {
    m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (docs/STYLE.md)
mod tests {
    use super::*;
    use crate::losses::test_support::grid;

    #[test]
    fn identity_does_not_fold() {
        let ddf = grid([1, 3, 4, 5, 6], |_, _, _, _, _| 0.0);
        let stats = jacobian_stats(&ddf).unwrap();
        assert_eq!(stats.folded_voxels, 0);
        assert_eq!(stats.folding_percent, 0.0);
        assert_eq!((stats.min, stats.mean, stats.std), (1.0, 1.0, 0.0));
        assert_eq!(stats.voxels, 120);
    }

    /// For u(x) = A·x + b every voxel (borders included: one-sided differences are exact on a
    /// linear field) has det J = det(I + A); the value is worked out by hand below.
    #[test]
    fn linear_map_has_constant_determinant() {
        let a = [[0.2, 0.1, 0.0], [0.0, -0.1, 0.3], [0.05, 0.0, 0.1]];
        let ddf = grid([1, 3, 4, 5, 6], |_, c, i, j, k| {
            a[c][0] * i + a[c][1] * j + a[c][2] * k + 0.7
        });
        // det([[1.2, 0.1, 0], [0, 0.9, 0.3], [0.05, 0, 1.1]]) = 1.2·0.99 - 0.1·(0 - 0.015) = 1.1895
        let expected = 1.1895;
        for d in jacobian_determinant(&ddf).unwrap() {
            assert!((d - expected).abs() < 1e-12, "{d}");
        }
    }

    /// u_0(x) = -2.5·i squashes axis 0 with slope 1 - 2.5 < 0 everywhere: all voxels fold; a
    /// localised fold gives a percentage strictly between 0 and 100.
    #[test]
    fn folding_fields_are_detected() {
        let everywhere = grid(
            [1, 3, 4, 4, 4],
            |_, c, i, _, _| if c == 0 { -2.5 * i } else { 0.0 },
        );
        let stats = jacobian_stats(&everywhere).unwrap();
        assert_eq!(stats.folding_percent, 100.0);
        assert!((stats.min - -1.5).abs() < 1e-12);

        // u_0 = -3·i for i in the middle slab only: slope -2 there, so det < 0 in that slab.
        let local = grid([1, 3, 8, 4, 4], |_, c, i, _, _| {
            if c == 0 {
                -3.0 * i.clamp(3.0, 5.0)
            } else {
                0.0
            }
        });
        let stats = jacobian_stats(&local).unwrap();
        assert!(
            stats.folding_percent > 0.0 && stats.folding_percent < 100.0,
            "{stats:?}"
        );
        assert!(stats.min < 0.0);
    }

    /// numpy.gradient on [0, 1, 4, 9] along axis 0 = [1, 2, 4, 5]; det = 1 + that.
    #[test]
    fn borders_use_one_sided_differences() {
        let ddf = grid(
            [1, 3, 4, 2, 2],
            |_, c, i, _, _| if c == 0 { i * i } else { 0.0 },
        );
        let dets = jacobian_determinant(&ddf).unwrap();
        let along_i: Vec<f64> = dets.chunks(4).map(|c| c[0]).collect();
        assert_eq!(along_i, vec![2.0, 3.0, 5.0, 6.0]);
    }

    #[test]
    fn rejects_degenerate_grid() {
        let ddf = grid([1, 3, 1, 4, 4], |_, _, _, _, _| 0.0);
        assert!(matches!(
            jacobian_determinant(&ddf),
            Err(Error::ShapeMismatch { .. })
        ));
    }
}
