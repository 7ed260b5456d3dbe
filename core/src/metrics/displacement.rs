//! Mean displacement magnitude of a DDF.

use candle_core::Tensor;

use super::ddf_to_host;
use crate::Result;

/// Mean over voxels of `‖u‖` for a `(3, H, W, D)` or `(1, 3, H, W, D)` DDF in voxels.
///
/// With `spacing_mm = Some([sx, sy, sz])` each component is scaled by its voxel size first, so
/// the result is in mm; with `None` it is in voxels.
pub fn mean_displacement(ddf: &Tensor, spacing_mm: Option<[f64; 3]>) -> Result<f64> {
    let (field, grid) = ddf_to_host("mean_displacement", ddf)?;
    let voxels: usize = grid.iter().product();
    let scale = spacing_mm.unwrap_or([1.0; 3]);
    let total: f64 = (0..voxels)
        .map(|v| {
            (0..3)
                .map(|c| (field[c * voxels + v] * scale[c]).powi(2))
                .sum::<f64>()
                .sqrt()
        })
        .sum();
    Ok(total / voxels as f64)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (docs/STYLE.md)
mod tests {
    use super::*;
    use crate::losses::test_support::grid;

    /// u = (3, 4, 0) everywhere has magnitude 5 voxels, and sqrt((3·2)² + (4·0.5)²) mm.
    #[test]
    fn constant_field_in_voxels_and_mm() {
        let ddf = grid([1, 3, 3, 4, 5], |_, c, _, _, _| [3.0, 4.0, 0.0][c]);
        assert!((mean_displacement(&ddf, None).unwrap() - 5.0).abs() < 1e-12);
        let mm = mean_displacement(&ddf, Some([2.0, 0.5, 7.0])).unwrap();
        assert!((mm - 40f64.sqrt()).abs() < 1e-12);
    }

    /// Half the voxels displaced by 2, half by 0: mean 1.
    #[test]
    fn averages_over_voxels() {
        let ddf = grid(
            [1, 3, 4, 2, 2],
            |_, c, i, _, _| if c == 1 && i < 2.0 { -2.0 } else { 0.0 },
        );
        assert!((mean_displacement(&ddf, None).unwrap() - 1.0).abs() < 1e-12);
    }
}
