//! Structural similarity of 3-D volumes, ported from MONAI ≥ 1.2
//! `monai/metrics/regression.py::SSIMMetric` with its defaults (spec §6): Gaussian window of
//! 11 taps and σ = 1.5, `data_range = 1`, `k1 = 0.01`, `k2 = 0.03`.
//!
//! ```text
//! μx, μy, μxx, μyy, μxy = valid (unpadded) Gaussian filtering of x, y, x², y², x·y
//! σx² = μxx - μx²   σy² = μyy - μy²   σxy = μxy - μx·μy
//! ssim = (2μxμy + c1)/(μx² + μy² + c1) · (2σxy + c2)/(σx² + σy² + c2),  c = (k·R)²
//! ```
//!
//! The per-item value is the mean over channels and the `(H-10, W-10, D-10)` valid region; the
//! metric is the mean over items. Like MONAI the computation runs in **f32**, whose cancellation
//! in the variances moves the result by ~2e-6 from a float64 evaluation (spec §6). The 3-D window
//! is applied separably (axis 0, 1, 2) instead of as one `11³` convolution: the same weights,
//! a different f32 summation order.

use candle_core::{DType, Tensor};

use crate::losses::filtering::{filter_spatial, Extent};
use crate::losses::same_dims5;
use crate::{Error, Result};

/// Window size of MONAI's default SSIM.
const WIN_SIZE: usize = 11;
/// Gaussian σ of the window, in voxels.
const KERNEL_SIGMA: f32 = 1.5;
/// Dynamic range of the intensities.
const DATA_RANGE: f64 = 1.0;
/// Luminance stability constant factor.
const K1: f64 = 0.01;
/// Contrast stability constant factor.
const K2: f64 = 0.03;

/// Mean SSIM over the batch of `(B, C, H, W, D)` volumes `x` (prediction) and `y`
/// (reference); every spatial size must be at least 11.
pub fn ssim(x: &Tensor, y: &Tensor) -> Result<f64> {
    let items = ssim_per_item(x, y)?;
    Ok(items.iter().sum::<f64>() / items.len() as f64)
}

/// SSIM of each batch item (mean over channels and the valid region).
pub fn ssim_per_item(x: &Tensor, y: &Tensor) -> Result<Vec<f64>> {
    let [batch, _, h, w, d] = same_dims5("ssim", x, y)?;
    if [h, w, d].iter().any(|&n| n < WIN_SIZE) {
        return Err(Error::ShapeMismatch {
            op: "ssim",
            expected: format!("every spatial size >= the {WIN_SIZE}-voxel window"),
            got: format!("{:?}", x.dims()),
        });
    }
    let map = ssim_map(&x.to_dtype(DType::F32)?, &y.to_dtype(DType::F32)?)?;
    let per_item = map.reshape((batch, ()))?.mean(1)?;
    Ok(per_item.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// The SSIM map over the valid region, f32, `(B, C, H-10, W-10, D-10)`.
fn ssim_map(x: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    let taps = gaussian_window_f32();
    let filter = |t: &Tensor| filter_spatial(t, &taps, Extent::Valid);
    let c1 = (K1 * DATA_RANGE).powi(2);
    let c2 = (K2 * DATA_RANGE).powi(2);
    let mu_x = filter(x)?;
    let mu_y = filter(y)?;
    let mu_xx = filter(&x.sqr()?)?;
    let mu_yy = filter(&y.sqr()?)?;
    let mu_xy = filter(&(x * y)?)?;
    let sigma_x = (mu_xx - mu_x.sqr()?)?;
    let sigma_y = (mu_yy - mu_y.sqr()?)?;
    let sigma_xy = (mu_xy - (&mu_x * &mu_y)?)?;
    let contrast = ((sigma_xy * 2.0)? + c2)?.div(&((sigma_x + sigma_y)? + c2)?)?;
    let luminance = (((&mu_x * 2.0)? * &mu_y)? + c1)?.div(&((mu_x.sqr()? + mu_y.sqr()?)? + c1)?)?;
    luminance * contrast
}

/// MONAI `_gaussian_kernel`'s 1-D window in f32: `exp(-((x/σ)²)/2)` at `x = -5..=5`,
/// normalised to sum 1.
fn gaussian_window_f32() -> Vec<f32> {
    let half = (WIN_SIZE as f32 - 1.0) / 2.0;
    let raw: Vec<f32> = (0..WIN_SIZE)
        .map(|i| {
            let z = (i as f32 - half) / KERNEL_SIGMA;
            (-(z * z) / 2.0).exp()
        })
        .collect();
    let sum: f32 = raw.iter().sum();
    raw.iter().map(|v| v / sum).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (docs/STYLE.md)
mod tests {
    use super::*;
    use crate::losses::test_support::{grid, image_a, image_b};

    /// Reference: spec §8, MONAI 1.6.1 SSIMMetric(spatial_dims=3)(A, B) = 0.8202071190 (f32);
    /// a float64 numpy evaluation gives 0.8202051, so 1e-5 relative covers the f32 rounding.
    #[test]
    fn golden_value() {
        let got = ssim(&image_a(DType::F64), &image_b(DType::F64)).unwrap();
        assert!((got - 0.8202071190).abs() < 1e-5 * 0.82, "{got}");
        let got32 = ssim(&image_a(DType::F32), &image_b(DType::F32)).unwrap();
        assert!((got32 - 0.8202071190).abs() < 1e-5 * 0.82, "{got32}");
    }

    #[test]
    fn identical_volumes_score_one() {
        let a = image_a(DType::F32);
        let got = ssim(&a, &a).unwrap();
        assert!((got - 1.0).abs() < 1e-5, "{got}");
    }

    #[test]
    fn averages_batch_items() {
        let (a, b) = (image_a(DType::F32), image_b(DType::F32));
        let x = Tensor::cat(&[&a, &a], 0).unwrap();
        let y = Tensor::cat(&[&a, &b], 0).unwrap();
        let per = ssim_per_item(&x, &y).unwrap();
        assert!((per[0] - 1.0).abs() < 1e-5);
        assert!((per[1] - ssim(&a, &b).unwrap()).abs() < 1e-7);
    }

    #[test]
    fn window_is_normalised_and_symmetric() {
        let w = gaussian_window_f32();
        assert_eq!(w.len(), 11);
        assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(w[0], w[10]);
        assert!(w[5] > w[4]);
    }

    #[test]
    fn rejects_volumes_smaller_than_the_window() {
        let small = grid([1, 1, 10, 12, 12], |_, _, i, _, _| i);
        assert!(matches!(
            ssim(&small, &small),
            Err(Error::ShapeMismatch { .. })
        ));
    }
}
