//! Soft Dice loss, ported from MONAI `monai/losses/dice.py::DiceLoss` with its defaults
//! (include_background, no activation, batch=False, reduction "mean"; spec §5.1).
//!
//! Per batch item `b` and channel `c`, summing over the spatial dims:
//!
//! ```text
//! tp = Σ p·t    fp = (Σp - tp)/2    fn = (Σt - tp)/2
//! loss_bc = 1 - (2·tp + smooth_nr) / (2·(tp + fp + fn) + smooth_dr)
//! ```
//!
//! which is MONAI ≥ 1.5's form of `1 - (2Σpt + nr) / (Σp + Σt + dr)`; the result is the mean
//! over `B·C`. Inputs may be soft (continuous); the loss is symmetric in `(pred, target)`.

use candle_core::Tensor;

use super::same_dims5;
use crate::Result;

/// MONAI's `DiceLoss()` with default arguments.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiceLoss {
    smooth_nr: f64,
    smooth_dr: f64,
}

impl Default for DiceLoss {
    /// `smooth_nr = smooth_dr = 1e-5`, MONAI's defaults.
    fn default() -> Self {
        Self {
            smooth_nr: 1e-5,
            smooth_dr: 1e-5,
        }
    }
}

impl DiceLoss {
    /// A Dice loss with the given smoothing terms.
    pub fn new(smooth_nr: f64, smooth_dr: f64) -> Self {
        Self {
            smooth_nr,
            smooth_dr,
        }
    }

    /// The mean Dice loss over batch items and channels, a 0-d tensor of the input dtype.
    ///
    /// `pred` and `target` are `(B, C, H, W, D)` of the same shape.
    pub fn forward(&self, pred: &Tensor, target: &Tensor) -> Result<Tensor> {
        Ok(self.per_channel(pred, target)?.mean_all()?)
    }

    /// The loss of each batch item and channel, shape `(B, C)` (MONAI `reduction="none"`).
    pub fn per_channel(&self, pred: &Tensor, target: &Tensor) -> Result<Tensor> {
        same_dims5("DiceLoss", pred, target)?;
        let spatial = (2, 3, 4);
        let tp = (pred * target)?.sum(spatial)?;
        let false_pos = ((pred.sum(spatial)? - &tp)? * 0.5)?;
        let false_neg = ((target.sum(spatial)? - &tp)? * 0.5)?;
        let numerator = ((&tp * 2.0)? + self.smooth_nr)?;
        let denominator = (((tp + false_pos)? + false_neg)? * 2.0)?;
        let denominator = (denominator + self.smooth_dr)?;
        Ok(numerator.div(&denominator)?.affine(-1.0, 1.0)?)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (docs/STYLE.md)
mod tests {
    use candle_core::DType;

    use super::*;
    use crate::losses::test_support::{check_gradient, ellipsoid, grid, scalar, soft_mask};

    /// Reference: spec §8, MONAI `DiceLoss()(soft, fixed)` in float64 = 0.2653279916.
    #[test]
    fn golden_value() {
        let got = scalar(
            &DiceLoss::default()
                .forward(&soft_mask(), &ellipsoid())
                .unwrap(),
        );
        assert!((got - 0.2653279916).abs() < 1e-9, "{got}");
        let got32 = scalar(
            &DiceLoss::default()
                .forward(
                    &soft_mask().to_dtype(DType::F32).unwrap(),
                    &ellipsoid().to_dtype(DType::F32).unwrap(),
                )
                .unwrap(),
        );
        assert!(
            (got32 - 0.2653279916).abs() < 1e-5 * 0.2653279916,
            "{got32}"
        );
    }

    /// The ellipsoid has 1184 voxels (spec §8); Dice of a mask with itself is ~0.
    #[test]
    fn identical_masks_give_zero_loss() {
        let fixed = ellipsoid();
        assert_eq!(scalar(&fixed.sum_all().unwrap()), 1184.0);
        let got = scalar(&DiceLoss::default().forward(&fixed, &fixed).unwrap());
        assert!(got.abs() < 1e-8, "{got}");
    }

    /// Per (b, c) values are averaged: one perfect channel and one disjoint channel give 0.5.
    #[test]
    fn averages_over_batch_and_channels() {
        let pred = grid([1, 2, 4, 4, 4], |_, c, i, _, _| {
            if (i < 2.0) == (c == 0) {
                1.0
            } else {
                0.0
            }
        });
        let target = grid(
            [1, 2, 4, 4, 4],
            |_, _, i, _, _| if i < 2.0 { 1.0 } else { 0.0 },
        );
        let per = DiceLoss::default().per_channel(&pred, &target).unwrap();
        let v = per.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        // The 1e-5 smoothing keeps the disjoint channel a hair below 1.
        assert!(v[0].abs() < 1e-8 && (v[1] - 1.0).abs() < 1e-6, "{v:?}");
        let mean = scalar(&DiceLoss::default().forward(&pred, &target).unwrap());
        assert!((mean - 0.5).abs() < 1e-6);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let pred = grid([2, 1, 4, 5, 6], |b, _, i, j, k| {
            0.5 + 0.4 * (0.9 * i + 0.5 * j - 0.3 * k + b as f64).sin()
        });
        let target = grid(
            [2, 1, 4, 5, 6],
            |_, _, i, j, _| if i + j > 4.0 { 1.0 } else { 0.0 },
        );
        let loss = DiceLoss::default();
        check_gradient(
            &pred,
            |x| loss.forward(x, &target).unwrap(),
            &[0, 11, 57, 150, 201],
        );
    }
}
