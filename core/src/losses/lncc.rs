//! Local normalised cross-correlation, as MONAI's `LocalNormalizedCrossCorrelationLoss`
//! (`monai/losses/image_dissimilarity.py`) with a rectangular kernel and `reduction="mean"`.
//!
//! With box sums `S[x] = Σ_{window} x` over a `k³` window (zero padding, "same" output:
//! MONAI's `separable_filtering`), `N = k³`:
//! `cross = S[tp] - S[p] S[t] / N`, `t_var = max(S[t²] - S[t]² / N, smooth_dr)`,
//! `p_var = max(S[p²] - S[p]² / N, smooth_dr)`,
//! `ncc = (cross² + smooth_nr) / (t_var p_var)` (the squared local correlation), and the loss
//! is `-mean(ncc)`: -1 for images that are locally affine functions of each other.

use candle_core::Tensor;

use crate::losses::filtering::{filter_spatial, Extent};
use crate::losses::same_dims5;
use crate::{Error, Result};

/// MONAI's `LocalNormalizedCrossCorrelationLoss` (rectangular kernel, mean reduction).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LocalNormalizedCrossCorrelationLoss {
    kernel_size: usize,
    smooth_nr: f64,
    smooth_dr: f64,
}

impl Default for LocalNormalizedCrossCorrelationLoss {
    /// MONAI's defaults: kernel 3, `smooth_nr` 0, `smooth_dr` 1e-5.
    fn default() -> Self {
        Self {
            kernel_size: 3,
            smooth_nr: 0.0,
            smooth_dr: 1e-5,
        }
    }
}

impl LocalNormalizedCrossCorrelationLoss {
    /// A loss with an odd rectangular window of `kernel_size` voxels per axis and MONAI's
    /// default smoothing terms.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an even or zero kernel size.
    pub fn new(kernel_size: usize) -> Result<Self> {
        if kernel_size == 0 || kernel_size.is_multiple_of(2) {
            return Err(Error::invalid(
                "lncc kernel size",
                format!("{kernel_size}: must be odd"),
            ));
        }
        Ok(Self {
            kernel_size,
            ..Self::default()
        })
    }

    /// The window size per axis, voxels.
    pub fn kernel_size(&self) -> usize {
        self.kernel_size
    }

    /// `-mean(ncc)` of `pred` and `target` (B, C, H, W, D), a 0-d tensor.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] unless both are 5-d with one shape.
    pub fn forward(&self, pred: &Tensor, target: &Tensor) -> Result<Tensor> {
        same_dims5("LocalNormalizedCrossCorrelationLoss", pred, target)?;
        let taps = vec![1f32; self.kernel_size];
        let sum = |x: &Tensor| filter_spatial(x, &taps, Extent::Same);
        let vol = (self.kernel_size * self.kernel_size * self.kernel_size) as f64;
        let t_sum = sum(target)?;
        let p_sum = sum(pred)?;
        let t2_sum = sum(&target.sqr()?)?;
        let p2_sum = sum(&pred.sqr()?)?;
        let tp_sum = sum(&(target * pred)?)?;
        let t_avg = (&t_sum / vol)?;
        let p_avg = (&p_sum / vol)?;
        let cross = (tp_sum - (&p_avg * &t_sum)?)?;
        let floor = Tensor::new(self.smooth_dr, pred.device())?.to_dtype(pred.dtype())?;
        let t_var = (t2_sum - (&t_avg * &t_sum)?)?.broadcast_maximum(&floor)?;
        let p_var = (p2_sum - (&p_avg * &p_sum)?)?.broadcast_maximum(&floor)?;
        let ncc = ((cross.sqr()? + self.smooth_nr)? / (t_var * p_var)?)?;
        Ok(ncc.mean_all()?.neg()?)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::losses::test_support::{check_gradient, image_a, image_b, scalar};
    use candle_core::DType;

    #[test]
    fn affine_images_correlate_fully_and_the_gradient_matches() {
        let a = image_a(DType::F64);
        let loss = LocalNormalizedCrossCorrelationLoss::new(5).unwrap();
        // A scaled copy correlates perfectly in every window (zero padding included): every
        // ncc is 1 up to the variance floor.
        let affine = (&a * 2.0).unwrap();
        let v = scalar(&loss.forward(&affine, &a).unwrap());
        assert!((v + 1.0).abs() < 1e-3, "{v}");
        // Another image correlates less.
        let b = image_b(DType::F64);
        let v_ab = scalar(&loss.forward(&b, &a).unwrap());
        assert!(v_ab > -0.99 && v_ab < 0.0, "{v_ab}");
        assert!(LocalNormalizedCrossCorrelationLoss::new(4).is_err());
        let small_a = a.narrow(2, 0, 6).unwrap().narrow(3, 0, 7).unwrap();
        let small_b = b.narrow(2, 0, 6).unwrap().narrow(3, 0, 7).unwrap();
        let l3 = LocalNormalizedCrossCorrelationLoss::default();
        check_gradient(
            &small_b.contiguous().unwrap(),
            |p| l3.forward(p, &small_a).unwrap(),
            &[0, 17, 300, 611, 1000],
        );
    }
}
