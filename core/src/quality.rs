//! Registration quality of a displacement field on the fixed image's own grid, scored the same
//! way whatever produced the field (medray's network, its refinement, ANTs, elastix), so that
//! `medray bench --quality` compares like with like.
//!
//! The DDF is MONAI's backward field: `(1, 3, H, W, D)` in voxels of the fixed grid, the
//! moving image sampled at `p + u(p)` lands on the fixed image at `p`. The figures:
//!
//! * TRE: distance in mm between `f_k + u(f_k)` (trilinear `u`) and the moving landmark
//!   `m_k`, mean, 95th percentile (linear interpolation between order statistics, numpy's
//!   default) and maximum; the same before registration (`u = 0`);
//! * lung Dice of the nearest-neighbour warped moving mask against the fixed mask, before and
//!   after;
//! * folding: percentage of voxels with `det(I + ∇u) <= 0` (central differences, see
//!   [`crate::metrics::jacobian_determinant`]);
//! * `log_jac_std`: the standard deviation over all voxels of `ln(max(det J, 1e-9))`
//!   ([`crate::interop::log_jac_std`], as the inference results' column), the
//!   smoothness figure of Learn2Reg (there called SDlogJ; it is computed here from the plain
//!   determinant, so an identity field scores 0).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::metrics;
use crate::nifti_io::Volume;
use crate::ops;
use crate::{Error, Result};

/// The quality figures of one registered pair (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct QualityScore {
    /// Landmark pairs scored.
    pub landmarks: usize,
    /// Mean TRE before registration, mm.
    pub tre_before_mm: Option<f64>,
    /// 95th percentile of the TRE before registration, mm.
    pub tre_before_p95_mm: Option<f64>,
    /// Mean TRE after registration, mm.
    pub tre_mm: Option<f64>,
    /// 95th percentile of the TRE after registration, mm.
    pub tre_p95_mm: Option<f64>,
    /// Largest TRE after registration, mm.
    pub tre_max_mm: Option<f64>,
    /// Lung Dice before registration.
    pub dice_before: Option<f64>,
    /// Lung Dice after registration.
    pub dice: Option<f64>,
    /// Percentage of voxels with a non-positive Jacobian determinant.
    pub folding_pct: f64,
    /// Standard deviation of `ln det J`.
    pub log_jac_std: f64,
}

/// Landmark pairs (fixed, moving) in voxel coordinates.
pub type LandmarkPairs<'a> = (&'a [[f64; 3]], &'a [[f64; 3]]);

/// What a pair brings to scoring: its landmarks and masks on the fixed image's grid.
#[derive(Clone, Copy, Debug)]
pub struct ScoringInputs<'a> {
    /// Voxel size of the fixed grid, mm.
    pub spacing_mm: [f64; 3],
    /// Landmark pairs (fixed, moving) in voxel coordinates, if any.
    pub keypoints: Option<LandmarkPairs<'a>>,
    /// Lung masks (fixed, moving) as stored, if any.
    pub masks: Option<(&'a Volume, &'a Volume)>,
}

/// The `q`-quantile (0..=1) of `values` with linear interpolation between order statistics
/// (numpy's default); NaN when empty.
pub fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// Scores `ddf` (`(1, 3, H, W, D)`, voxels of the fixed grid) on `inputs`.
///
/// # Errors
/// [`Error::ShapeMismatch`] when the DDF or the masks are not on one `H x W x D` grid; a
/// tensor error.
pub fn score_ddf(ddf: &Tensor, inputs: &ScoringInputs<'_>) -> Result<QualityScore> {
    let dims = ddf.dims();
    if dims.len() != 5 || dims[0] != 1 || dims[1] != 3 {
        return Err(Error::ShapeMismatch {
            op: "score_ddf",
            expected: "a DDF of (1, 3, H, W, D)".into(),
            got: format!("{dims:?}"),
        });
    }
    let grid = [dims[2], dims[3], dims[4]];
    let mut score = QualityScore::default();
    if let Some((fixed, moving)) = inputs.keypoints {
        if !fixed.is_empty() {
            let after = metrics::target_registration_error(ddf, fixed, moving, inputs.spacing_mm)?;
            let before = metrics::tre_before(fixed, moving, inputs.spacing_mm)?;
            score.landmarks = fixed.len();
            score.tre_before_mm = Some(mean(&before));
            score.tre_before_p95_mm = Some(percentile(&before, 0.95));
            score.tre_mm = Some(mean(&after));
            score.tre_p95_mm = Some(percentile(&after, 0.95));
            score.tre_max_mm = after.iter().copied().reduce(f64::max);
        }
    }
    if let Some((fixed_mask, moving_mask)) = inputs.masks {
        for (what, m) in [("fixed mask", fixed_mask), ("moving mask", moving_mask)] {
            if m.shape() != grid {
                return Err(Error::ShapeMismatch {
                    op: "score_ddf",
                    expected: format!("a {what} of {grid:?}, the DDF's grid"),
                    got: format!("{:?}", m.shape()),
                });
            }
        }
        let device = ddf.device();
        let binary = |v: &Volume| -> Result<Tensor> {
            let t = crate::nifti_io::to_tensor(v, device)?;
            Ok(t.ge(0.5)?.to_dtype(ddf.dtype())?)
        };
        let fm = binary(fixed_mask)?;
        let mm = binary(moving_mask)?;
        let warped = ops::warp_nearest(&mm, ddf)?;
        score.dice_before = finite(metrics::mean_ignoring_nan(&metrics::dice(&mm, &fm)?));
        score.dice = finite(metrics::mean_ignoring_nan(&metrics::dice(&warped, &fm)?));
    }
    let dets = metrics::jacobian_determinant(ddf)?;
    let n = dets.len() as f64;
    score.folding_pct = 100.0 * dets.iter().filter(|&&d| d <= 0.0).count() as f64 / n;
    // Every voxel: the benchmark scores fields of several tools on the same footing.
    score.log_jac_std = crate::interop::log_jac_std(&dets, None)?
        .expect("a DDF has at least 8 voxels (jacobian_determinant checked)");
    Ok(score)
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// Reads a DDF written by `tools/quality_peers.py`: little-endian f32, component-major
/// `(3, H, W, D)` with `D` fastest, voxels of the fixed grid; returns `(1, 3, H, W, D)`.
///
/// # Errors
/// [`Error::Io`] naming the file; [`Error::InvalidArgument`] naming it when its length is not
/// `3·H·W·D·4` bytes or a value is not finite.
pub fn read_raw_ddf(
    path: &std::path::Path,
    grid: [usize; 3],
    device: &candle_core::Device,
) -> Result<Tensor> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let expected = 3 * grid.iter().product::<usize>() * 4;
    if bytes.len() != expected {
        return Err(Error::invalid(
            path.display().to_string(),
            format!(
                "{} bytes, expected {expected} (a float32 field of 3 x {grid:?})",
                bytes.len()
            ),
        ));
    }
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if values.iter().any(|v| !v.is_finite()) {
        return Err(Error::invalid(
            path.display().to_string(),
            "the displacement field holds a non-finite value",
        ));
    }
    Ok(Tensor::from_vec(
        values,
        (1, 3, grid[0], grid[1], grid[2]),
        device,
    )?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use candle_core::{DType, Device};
    use ndarray::Array3;

    fn volume(data: Array3<f32>) -> Volume {
        Volume {
            data,
            affine: [
                [1.0, 0.0, 0.0, 0.0],
                [0.0, 1.0, 0.0, 0.0],
                [0.0, 0.0, 1.0, 0.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
            spacing: [1.0, 1.0, 1.0],
            header: nifti::NiftiHeader::default(),
        }
    }

    #[test]
    fn percentile_interpolates_like_numpy() {
        let v = [4.0, 1.0, 3.0, 2.0, 5.0];
        assert_eq!(percentile(&v, 0.5), 3.0);
        assert!((percentile(&v, 0.95) - 4.8).abs() < 1e-12);
        assert_eq!(percentile(&v, 1.0), 5.0);
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[test]
    fn a_uniform_shift_is_scored_exactly() {
        // Moving = fixed shifted by +2 voxels along axis 0: the field u = (2, 0, 0) registers
        // it (landmarks exact, masks aligned, no folding, det J = 1 everywhere).
        let n = 8;
        let fixed_mask = Array3::from_shape_fn((n, n, n), |(i, _, _)| f32::from(i < 4));
        let moving_mask = Array3::from_shape_fn((n, n, n), |(i, _, _)| f32::from(i < 6));
        let (fm, mm) = (volume(fixed_mask), volume(moving_mask));
        let fixed = [[1.0, 2.0, 3.0], [2.0, 4.0, 4.0]];
        let moving = [[3.0, 2.0, 3.0], [4.0, 4.0, 4.0]];
        let inputs = ScoringInputs {
            spacing_mm: [1.5, 1.0, 1.0],
            keypoints: Some((&fixed, &moving)),
            masks: Some((&fm, &mm)),
        };
        let mut u = vec![0f32; 3 * n * n * n];
        u[..n * n * n].fill(2.0);
        let ddf = Tensor::from_vec(u, (1, 3, n, n, n), &Device::Cpu).unwrap();
        let s = score_ddf(&ddf, &inputs).unwrap();
        assert_eq!(s.landmarks, 2);
        assert!((s.tre_before_mm.unwrap() - 3.0).abs() < 1e-9, "{s:?}");
        assert!(s.tre_mm.unwrap() < 1e-6, "{s:?}");
        assert!(s.dice_before.unwrap() < 0.9);
        assert!((s.dice.unwrap() - 1.0).abs() < 1e-9, "{s:?}");
        assert_eq!(s.folding_pct, 0.0);
        assert!(s.log_jac_std < 1e-9);

        // A field that folds: u = -2x along axis 0 (det J = -1 everywhere).
        let mut fold = vec![0f32; 3 * n * n * n];
        for i in 0..n {
            fold[i * n * n..(i + 1) * n * n].fill(-2.0 * i as f32);
        }
        let ddf = Tensor::from_vec(fold, (1, 3, n, n, n), &Device::Cpu).unwrap();
        let s = score_ddf(&ddf, &inputs).unwrap();
        assert_eq!(s.folding_pct, 100.0);
        // A wrong grid is refused.
        let small = Tensor::zeros((1, 3, 4, 4, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(score_ddf(&small, &inputs).is_err());
    }

    #[test]
    fn raw_ddf_files_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ddf.f32");
        let values: Vec<u8> = (0..3 * 8).flat_map(|i| (i as f32).to_le_bytes()).collect();
        std::fs::write(&path, &values).unwrap();
        let t = read_raw_ddf(&path, [2, 2, 2], &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 2, 2, 2]);
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v[9], 9.0);
        let err = read_raw_ddf(&path, [2, 2, 3], &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("ddf.f32"), "{err}");
        std::fs::write(&path, f32::NAN.to_le_bytes().repeat(24)).unwrap();
        let err = read_raw_ddf(&path, [2, 2, 2], &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("non-finite"), "{err}");
    }
}
