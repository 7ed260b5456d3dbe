//! Mean squared error, as `torch.nn.MSELoss()` (reduction "mean") computes it; the tutorial's
//! image similarity term (spec §7.4).

use candle_core::Tensor;

use crate::{Error, Result};

/// `mean((pred - target)²)` over every element, as a 0-d tensor of the input dtype.
///
/// `pred` and `target` must have the same shape (any rank).
pub fn mse_loss(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    if pred.dims() != target.dims() {
        return Err(Error::ShapeMismatch {
            op: "mse_loss",
            expected: format!("target shaped like pred {:?}", pred.dims()),
            got: format!("{:?}", target.dims()),
        });
    }
    Ok((pred - target)?.sqr()?.mean_all()?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (docs/STYLE.md)
mod tests {
    use candle_core::DType;

    use super::*;
    use crate::losses::test_support::{check_gradient, grid, image_a, image_b, scalar};

    /// Reference: spec §8, `torch.nn.MSELoss()(A, B)` in float32 = 0.0138270902.
    #[test]
    fn golden_value_f32() {
        let got = scalar(&mse_loss(&image_a(DType::F32), &image_b(DType::F32)).unwrap());
        assert!((got - 0.0138270902).abs() <= 1e-5 * 0.0138270902, "{got}");
    }

    #[test]
    fn rejects_shape_mismatch() {
        let a = image_a(DType::F32);
        let b = a.narrow(2, 0, 4).unwrap();
        assert!(matches!(mse_loss(&a, &b), Err(Error::ShapeMismatch { .. })));
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let pred = grid([1, 1, 4, 5, 6], |_, _, i, j, k| {
            (0.3 * i + 0.2 * j - 0.1 * k).sin()
        });
        let target = grid([1, 1, 4, 5, 6], |_, _, i, j, k| (0.1 * i * j + k).cos());
        check_gradient(&pred, |x| mse_loss(x, &target).unwrap(), &[0, 7, 33, 119]);
    }
}
