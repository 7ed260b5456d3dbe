//! Dice overlap of masks, as MONAI `monai/metrics/meandice.py` computes it (spec §5.3).
//!
//! * [`dice`] follows MONAI ≥ 1.2 `DiceMetric(include_background=True, reduction="mean",
//!   ignore_empty=True)` on single-channel input: only "class 1" is evaluated, with **exact**
//!   comparisons `pred == 1` and `true == 1`. Warped masks must therefore be binarised by the
//!   caller (`> 0.5`, or a nearest-neighbour warp): a bilinear-warped soft mask scores 0.
//! * [`soft_dice`] follows MONAI 1.1.0, whose numbers the paired lung CT tutorial printed:
//!   `2Σ(y·ŷ) / (Σy + Σŷ)` on the raw float values.
//!
//! Both give one value per batch item, NaN when the ground truth is empty; [`mean_ignoring_nan`]
//! is MONAI's "mean" reduction over items.

use candle_core::Tensor;

use super::to_host_f64;
use crate::{Error, Result};

/// Per-item Dice of binary masks `(B, 1, H, W, D)` with MONAI ≥ 1.2 semantics:
/// `2|P∩G| / (|P| + |G|)` where `P = (pred == 1)`, `G = (true == 1)`; NaN when `|G| = 0`.
pub fn dice(pred_mask: &Tensor, true_mask: &Tensor) -> Result<Vec<f64>> {
    per_item("dice", pred_mask, true_mask, |p, g| {
        let (mut both, mut n_pred, mut n_true) = (0usize, 0usize, 0usize);
        for (&p, &g) in p.iter().zip(g) {
            let (p, g) = (p == 1.0, g == 1.0);
            both += usize::from(p && g);
            n_pred += usize::from(p);
            n_true += usize::from(g);
        }
        if n_true == 0 {
            f64::NAN
        } else {
            2.0 * both as f64 / (n_true + n_pred) as f64
        }
    })
}

/// Per-item soft Dice `2Σ(y·ŷ) / (Σy + Σŷ)` on `(B, 1, H, W, D)` float masks (MONAI 1.1.0
/// `compute_meandice`); NaN when `Σy = 0`.
pub fn soft_dice(pred: &Tensor, truth: &Tensor) -> Result<Vec<f64>> {
    per_item("soft_dice", pred, truth, |p, g| {
        let (mut inter, mut sum_pred, mut sum_true) = (0.0, 0.0, 0.0);
        for (&p, &g) in p.iter().zip(g) {
            inter += p * g;
            sum_pred += p;
            sum_true += g;
        }
        if sum_true > 0.0 {
            2.0 * inter / (sum_true + sum_pred)
        } else {
            f64::NAN
        }
    })
}

/// MONAI's "mean" reduction: the mean of the non-NaN values, 0 when there are none.
pub fn mean_ignoring_nan(values: &[f64]) -> f64 {
    let valid: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    if valid.is_empty() {
        0.0
    } else {
        valid.iter().sum::<f64>() / valid.len() as f64
    }
}

/// Applies `score` to the voxels of each batch item of two same-shaped single-channel masks.
fn per_item(
    op: &'static str,
    pred: &Tensor,
    truth: &Tensor,
    score: impl Fn(&[f64], &[f64]) -> f64,
) -> Result<Vec<f64>> {
    let batch = match *pred.dims() {
        [b, 1, _, _, _] => b,
        _ => {
            return Err(Error::ShapeMismatch {
                op,
                expected: "a single-channel mask (B, 1, H, W, D)".to_string(),
                got: format!("{:?}", pred.dims()),
            })
        }
    };
    if truth.dims() != pred.dims() {
        return Err(Error::ShapeMismatch {
            op,
            expected: format!("ground truth shaped like the prediction {:?}", pred.dims()),
            got: format!("{:?}", truth.dims()),
        });
    }
    let (p, g) = (to_host_f64(pred)?, to_host_f64(truth)?);
    let per = p.len() / batch.max(1);
    Ok(p.chunks(per)
        .zip(g.chunks(per))
        .map(|(p, g)| score(p, g))
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (docs/STYLE.md)
mod tests {
    use candle_core::DType;

    use super::*;
    use crate::losses::test_support::{ellipsoid, soft_mask};

    /// Reference: spec §8, MONAI 1.6.1 DiceMetric()(soft > 0.5, fixed) = 0.8967880.
    #[test]
    fn golden_binarised_soft_mask() {
        let pred = soft_mask().gt(0.5).unwrap().to_dtype(DType::F32).unwrap();
        let got = dice(&pred, &ellipsoid().to_dtype(DType::F32).unwrap()).unwrap();
        assert_eq!(got.len(), 1);
        assert!((got[0] - 0.8967880).abs() < 5e-8, "{got:?}");
        assert_eq!(mean_ignoring_nan(&got), got[0]);
    }

    /// Reference: spec §8, MONAI ≥ 1.2 DiceMetric on the raw soft mask = 0.0 (no voxel is
    /// exactly 1).
    #[test]
    fn golden_soft_mask_scores_zero_under_exact_comparison() {
        assert_eq!(dice(&soft_mask(), &ellipsoid()).unwrap(), vec![0.0]);
    }

    /// Reference: spec §8, MONAI 1.1.0 soft Dice(soft, fixed) = 0.7346720074.
    #[test]
    fn golden_soft_dice() {
        let got = soft_dice(&soft_mask(), &ellipsoid()).unwrap();
        assert!((got[0] - 0.7346720074).abs() < 1e-9, "{got:?}");
    }

    #[test]
    fn empty_ground_truth_is_nan_and_skipped_by_the_mean() {
        let fixed = ellipsoid();
        let empty = fixed.zeros_like().unwrap();
        let pred = Tensor::cat(&[&fixed, &fixed], 0).unwrap();
        let truth = Tensor::cat(&[&fixed, &empty], 0).unwrap();
        let got = dice(&pred, &truth).unwrap();
        assert_eq!(got[0], 1.0);
        assert!(got[1].is_nan());
        assert_eq!(mean_ignoring_nan(&got), 1.0);
        assert!(soft_dice(&pred, &truth).unwrap()[1].is_nan());
        assert_eq!(mean_ignoring_nan(&[f64::NAN]), 0.0);
    }

    #[test]
    fn rejects_multi_channel_and_mismatched_masks() {
        let fixed = ellipsoid();
        let two = Tensor::cat(&[&fixed, &fixed], 1).unwrap();
        assert!(matches!(dice(&two, &two), Err(Error::ShapeMismatch { .. })));
        let cropped = fixed.narrow(2, 0, 8).unwrap();
        assert!(matches!(
            dice(&fixed, &cropped),
            Err(Error::ShapeMismatch { .. })
        ));
    }
}
