//! Multi-scale Dice loss, ported from MONAI `monai/losses/multi_scale.py::MultiScaleLoss`
//! with `kernel="gaussian"` (spec §5.2), as the paired lung CT tutorial uses it:
//! `MultiScaleLoss(DiceLoss(), scales=[0, 1, 2, 4, 8, 16])`.
//!
//! Scale 0 is the plain loss. For a scale `s > 0` both inputs are first smoothed by a separable
//! Gaussian with zero padding and same-size output, whose 1-D kernel is MONAI's
//! `gaussian_1d(s, truncated=3, approx="sampled", normalize=False)`, built in f32:
//! `tail = int(max(3s, 0.5) + 0.5)`, `k[x] = exp(-0.5/s² · x²) / (2.5066282·s)` for
//! `x = -tail..=tail`. The kernel is deliberately **not** renormalised (its sum is 0.99973 at
//! s = 1 down to 0.99757 at s = 16). The result is the mean of the per-scale losses.
//!
//! MONAI's `forward(y_true, y_pred)` calls `loss(y_pred, y_true)`; this port takes
//! `(pred, target)` in the natural order, which is the same call for the symmetric Dice loss.

use candle_core::Tensor;

use super::filtering::{filter_spatial, Extent};
use super::{same_dims5, DiceLoss};
use crate::{Error, Result};

/// MONAI's `MultiScaleLoss` around a [`DiceLoss`], reduction "mean".
#[derive(Debug, Clone, PartialEq)]
pub struct MultiScaleLoss {
    loss: DiceLoss,
    scales: Vec<f64>,
}

impl Default for MultiScaleLoss {
    /// `MultiScaleLoss(DiceLoss(), scales=[0, 1, 2, 4, 8, 16])`, as in the tutorial.
    fn default() -> Self {
        Self {
            loss: DiceLoss::default(),
            scales: vec![0.0, 1.0, 2.0, 4.0, 8.0, 16.0],
        }
    }
}

impl MultiScaleLoss {
    /// A multi-scale loss around `loss` at Gaussian widths `scales` (voxels; 0 = unsmoothed).
    pub fn new(loss: DiceLoss, scales: Vec<f64>) -> Result<Self> {
        if scales.is_empty() {
            return Err(Error::invalid("scales", "no scale given"));
        }
        if let Some(bad) = scales.iter().find(|s| !(s.is_finite() && **s >= 0.0)) {
            return Err(Error::invalid(
                "scales",
                format!("{bad}; every scale must be a finite number >= 0"),
            ));
        }
        Ok(Self { loss, scales })
    }

    /// The Gaussian widths, in voxels.
    pub fn scales(&self) -> &[f64] {
        &self.scales
    }

    /// The mean over scales of the inner loss, a 0-d tensor of the input dtype.
    pub fn forward(&self, pred: &Tensor, target: &Tensor) -> Result<Tensor> {
        let per_scale = self.per_scale(pred, target)?;
        Ok(Tensor::stack(&per_scale, 0)?.mean_all()?)
    }

    /// The inner loss at each scale, in the order of [`Self::scales`] (0-d tensors).
    pub fn per_scale(&self, pred: &Tensor, target: &Tensor) -> Result<Vec<Tensor>> {
        same_dims5("MultiScaleLoss", pred, target)?;
        self.scales
            .iter()
            .map(|&s| {
                if s == 0.0 {
                    return self.loss.forward(pred, target);
                }
                let taps = sampled_gaussian_f32(s);
                let pred = filter_spatial(pred, &taps, Extent::Same)?;
                let target = filter_spatial(target, &taps, Extent::Same)?;
                self.loss.forward(&pred, &target)
            })
            .collect()
    }
}

/// MONAI `gaussian_1d(sigma, truncated=3, approx="sampled", normalize=False)` in f32.
pub(crate) fn sampled_gaussian_f32(sigma: f64) -> Vec<f32> {
    let sigma = sigma as f32;
    // Python: int(max(float(sigma) * truncated, 0.5) + 0.5), in f64.
    let tail = ((f64::from(sigma) * 3.0).max(0.5) + 0.5) as i64;
    let coeff = -0.5f32 / (sigma * sigma);
    let norm = 2.506_628_2f32 * sigma;
    (-tail..=tail)
        .map(|x| {
            let x = x as f32;
            (coeff * (x * x)).exp() / norm
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (docs/STYLE.md)
mod tests {
    use candle_core::DType;

    use super::*;
    use crate::losses::test_support::{check_gradient, ellipsoid, grid, scalar, soft_mask};

    /// Reference: spec §5.2, kernel sums and tap counts of MONAI's unnormalised kernels.
    #[test]
    fn kernels_have_monai_taps_and_sums() {
        let expected = [
            (1.0, 7, 0.99973),
            (2.0, 13, 0.99898),
            (4.0, 25, 0.99827),
            (8.0, 49, 0.99782),
            (16.0, 97, 0.99757),
        ];
        for (s, taps, sum) in expected {
            let k = sampled_gaussian_f32(s);
            assert_eq!(k.len(), taps, "scale {s}");
            let got: f64 = k.iter().map(|&v| f64::from(v)).sum();
            assert!((got - sum).abs() < 6e-6, "scale {s}: sum {got} vs {sum}");
        }
    }

    /// Reference: spec §8, MONAI `MultiScaleLoss(DiceLoss(), [0,1,2,4,8,16])(soft, fixed)` in
    /// float64 = 0.6401643931; per-scale values are given there to 5 digits.
    #[test]
    fn golden_values() {
        let loss = MultiScaleLoss::default();
        let (pred, target) = (soft_mask(), ellipsoid());
        let got = scalar(&loss.forward(&pred, &target).unwrap());
        assert!((got - 0.6401643931).abs() < 1e-9, "{got}");
        let per: Vec<f64> = loss
            .per_scale(&pred, &target)
            .unwrap()
            .iter()
            .map(scalar)
            .collect();
        let expected = [0.26533, 0.36410, 0.53251, 0.76885, 0.92560, 0.98460];
        for (g, e) in per.iter().zip(expected) {
            assert!((g - e).abs() < 5e-6, "per scale {per:?} vs {expected:?}");
        }
        let got32 = scalar(
            &loss
                .forward(
                    &pred.to_dtype(DType::F32).unwrap(),
                    &target.to_dtype(DType::F32).unwrap(),
                )
                .unwrap(),
        );
        assert!(
            (got32 - 0.6401643931).abs() < 1e-5 * 0.6401643931,
            "{got32}"
        );
    }

    #[test]
    fn rejects_negative_scale() {
        assert!(MultiScaleLoss::new(DiceLoss::default(), vec![0.0, -1.0]).is_err());
        assert!(MultiScaleLoss::new(DiceLoss::default(), vec![]).is_err());
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let shape = [1, 1, 6, 7, 8];
        let pred = grid(shape, |_, _, i, j, k| {
            0.5 + 0.4 * (0.9 * i + 0.5 * j - 0.3 * k).sin()
        });
        let target = grid(
            shape,
            |_, _, i, j, k| if i + j + k > 9.0 { 1.0 } else { 0.0 },
        );
        let loss = MultiScaleLoss::new(DiceLoss::default(), vec![0.0, 1.0, 2.0]).unwrap();
        check_gradient(
            &pred,
            |x| loss.forward(x, &target).unwrap(),
            &[0, 41, 100, 222, 335],
        );
    }
}
