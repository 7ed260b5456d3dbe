//! Registration quality of one case: the numbers a user reads before trusting a DDF.
//!
//! * `mi_loss`: MONAI's `GlobalMutualInformationLoss(warped, fixed)`, i.e. minus the mutual
//!   information (lower is better).
//! * `bending_energy`: MONAI 1.6.1 `BendingEnergyLoss(ddf)`.
//! * `dice` / `dice_before`: binary Dice (MONAI >= 1.2 `DiceMetric`) of the nearest-warped
//!   (resp. unwarped) moving mask against the fixed mask.
//! * `soft_dice`: the quickstart's validation Dice: the moving mask warped trilinearly and
//!   clamped at 1, soft Dice against the fixed mask (MONAI 1.1.0 semantics).
//! * `ssim`: 3-D SSIM of the warped against the fixed image (data range 1).
//! * `folding_pct`: percentage of voxels where the Jacobian determinant of `x -> x + u(x)`
//!   is <= 0; `jacobian_min` its smallest value.
//! * `ddf_magnitude`: mean `||u||` in voxels of the grid the DDF lives on.
//! * `log_jac_std`: standard deviation of `log(max(det J, 1e-9))`, set by
//!   [`crate::predict::register_pair_with`] on the output grid ([`crate::interop::log_jac_std`]).
//! * `tre_mm` / `tre_before_mm`: mean target registration error of keypoint pairs in mm.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::losses::{BendingEnergyLoss, GlobalMutualInformationLoss};
use crate::metrics;
use crate::ops::{self, Padding};
use crate::Result;

/// Quality metrics of one registered pair. `None` where the inputs needed are missing
/// (masks, keypoints) or where the metric is undefined (an empty fixed mask).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CaseMetrics {
    /// `GlobalMutualInformationLoss(warped, fixed)` (negative MI).
    pub mi_loss: f64,
    /// Bending energy of the DDF.
    pub bending_energy: f64,
    /// Binary Dice after registration.
    pub dice: Option<f64>,
    /// Binary Dice before registration.
    pub dice_before: Option<f64>,
    /// Soft Dice of the trilinearly warped mask (the quickstart's metric).
    pub soft_dice: Option<f64>,
    /// SSIM of warped and fixed.
    pub ssim: f64,
    /// Percentage of voxels with a non-positive Jacobian determinant.
    pub folding_pct: f64,
    /// Smallest Jacobian determinant.
    pub jacobian_min: f64,
    /// Mean displacement magnitude in voxels.
    pub ddf_magnitude: f64,
    /// Standard deviation of `log(max(det J, 1e-9))` on the output grid, over the fixed
    /// mask when there is one (`None` until [`crate::predict::register_pair_with`] sets it,
    /// and from older workers).
    #[serde(default)]
    pub log_jac_std: Option<f64>,
    /// Mean TRE after registration, mm.
    pub tre_mm: Option<f64>,
    /// Mean TRE before registration, mm.
    pub tre_before_mm: Option<f64>,
}

/// Keypoint pairs with the geometry they live in: voxel coordinates of a grid whose DDF is
/// given separately (it may be a finer grid than the network's).
#[derive(Clone, Debug)]
pub struct KeypointEval<'a> {
    /// Fixed points, voxel coordinates.
    pub fixed: &'a [[f64; 3]],
    /// Corresponding moving points, voxel coordinates.
    pub moving: &'a [[f64; 3]],
    /// The DDF (1, 3, H, W, D) on the keypoints' grid.
    pub ddf: &'a Tensor,
    /// Voxel spacing of that grid in mm.
    pub spacing_mm: [f64; 3],
}

/// Inputs of [`evaluate_case`]: tensors (1, C, H, W, D) on one grid.
#[derive(Clone, Debug)]
pub struct CaseTensors<'a> {
    /// Fixed image.
    pub fixed: &'a Tensor,
    /// Moving image.
    pub moving: &'a Tensor,
    /// The DDF (1, 3, H, W, D), voxels.
    pub ddf: &'a Tensor,
    /// Fixed mask (0/1).
    pub fixed_mask: Option<&'a Tensor>,
    /// Moving mask (0/1).
    pub moving_mask: Option<&'a Tensor>,
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// Computes every metric of a registered case.
pub fn evaluate_case(
    case: &CaseTensors<'_>,
    keypoints: Option<&KeypointEval<'_>>,
) -> Result<CaseMetrics> {
    let warped = ops::warp(case.moving, case.ddf, Padding::Border)?.detach();
    let mi_loss = scalar(&GlobalMutualInformationLoss::default().forward(&warped, case.fixed)?)?;
    let bending_energy = scalar(&BendingEnergyLoss::default().forward(case.ddf)?)?;
    let ssim = metrics::ssim(&warped, case.fixed)?;
    let jac = metrics::jacobian_stats(case.ddf)?;
    let ddf_magnitude = metrics::mean_displacement(case.ddf, None)?;
    let (mut dice, mut dice_before, mut soft_dice) = (None, None, None);
    if let (Some(fm), Some(mm)) = (case.fixed_mask, case.moving_mask) {
        let fm = fm.ge(0.5)?.to_dtype(case.fixed.dtype())?;
        let mm = mm.ge(0.5)?.to_dtype(case.fixed.dtype())?;
        let nearest = ops::warp_nearest(&mm, case.ddf)?;
        dice = finite(metrics::mean_ignoring_nan(&metrics::dice(&nearest, &fm)?));
        dice_before = finite(metrics::mean_ignoring_nan(&metrics::dice(&mm, &fm)?));
        let soft = ops::warp(&mm, case.ddf, Padding::Border)?.clamp(0.0, 1.0)?;
        soft_dice = finite(metrics::mean_ignoring_nan(&metrics::soft_dice(&soft, &fm)?));
    }
    let (mut tre_mm, mut tre_before_mm) = (None, None);
    if let Some(kp) = keypoints {
        if !kp.fixed.is_empty() {
            let after =
                metrics::target_registration_error(kp.ddf, kp.fixed, kp.moving, kp.spacing_mm)?;
            let before = metrics::tre_before(kp.fixed, kp.moving, kp.spacing_mm)?;
            tre_mm = Some(metrics::mean_std(&after).0);
            tre_before_mm = Some(metrics::mean_std(&before).0);
        }
    }
    Ok(CaseMetrics {
        mi_loss,
        bending_energy,
        dice,
        dice_before,
        soft_dice,
        ssim,
        folding_pct: jac.folding_percent,
        jacobian_min: jac.min,
        ddf_magnitude,
        log_jac_std: None,
        tre_mm,
        tre_before_mm,
    })
}
