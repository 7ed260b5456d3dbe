//! MIND-SSC descriptors (Heinrich et al., "Towards realtime multimodal fusion for
//! image-guided interventions using self-similarities", MICCAI 2013) and the SSD between
//! warped moving and fixed descriptors, the similarity of ConvexAdam (Siebert, Hansen and
//! Heinrich, Learn2Reg 2021).
//!
//! For the six face neighbours `n_i` of a voxel at distance `dilation`, the 12 pairs
//! `(n_i, n_j)`, `i > j`, that lie `√2 · dilation` apart give 12 patch distances
//! `D_k(x) = box_r((I(x + n_i) - I(x + n_j))²)` (box mean over a `(2r+1)³` window,
//! replicated borders). Then `D_k -= min_k D_k`, the variance `V = mean_k D_k` is clamped to
//! `[V̄ / 1000, 1000 V̄]` (`V̄` its mean over the volume, plus 1e-12 so that a constant image
//! stays finite), and `MIND_k = exp(-D_k / V)`: one descriptor of 12 channels in (0, 1],
//! whose largest channel is 1, insensitive to contrast and brightness.

use candle_core::Tensor;

use crate::losses::dims5;
use crate::ops::{self, Padding};
use crate::{Error, Result};

/// The six face neighbours on a 3x3x3 stencil centred at (1, 1, 1), in ConvexAdam's order.
const SIX: [[usize; 3]; 6] = [
    [0, 1, 1],
    [1, 1, 0],
    [1, 0, 1],
    [1, 1, 2],
    [2, 1, 1],
    [1, 2, 1],
];

/// ConvexAdam's final channel order.
const ORDER: [usize; 12] = [6, 8, 1, 11, 2, 10, 0, 7, 9, 4, 5, 3];

/// Number of MIND-SSC channels.
pub const MIND_CHANNELS: usize = 12;

/// The 12 neighbour pairs `(n_i, n_j)`, `i > j`, `|n_i - n_j|² = 2`, in ConvexAdam's order.
fn pairs() -> Vec<([usize; 3], [usize; 3])> {
    let mut out = Vec::with_capacity(12);
    for (i, a) in SIX.iter().enumerate() {
        for (j, b) in SIX.iter().enumerate() {
            let d: usize = (0..3).map(|c| a[c].abs_diff(b[c]).pow(2)).sum();
            if i > j && d == 2 {
                out.push((*a, *b));
            }
        }
    }
    ORDER.iter().map(|&k| out[k]).collect()
}

/// Pads the spatial dims of `x` by `p` on each side, repeating the border voxels.
fn replicate_pad(x: &Tensor, p: usize) -> candle_core::Result<Tensor> {
    let mut out = x.clone();
    for dim in 2..5 {
        out = out.pad_with_same(dim, p, p)?;
    }
    Ok(out)
}

/// The mean over a `k`-wide window along each spatial axis, "valid" output (a sum of `k`
/// shifted views per axis: cheap for the small windows of MIND, on any device).
fn box_mean(x: &Tensor, k: usize) -> candle_core::Result<Tensor> {
    let mut out = x.clone();
    for dim in 2..5 {
        let n = out.dim(dim)? + 1 - k;
        let mut acc = out.narrow(dim, 0, n)?;
        for t in 1..k {
            acc = (acc + out.narrow(dim, t, n)?)?;
        }
        out = acc;
    }
    out.affine(1.0 / (k * k * k) as f64, 0.0)
}

/// MIND-SSC descriptors (B, 12, H, W, D) of `image` (B, 1, H, W, D) with a patch radius
/// `radius` (box of `2 radius + 1`) and neighbour distance `dilation` voxels (see the module
/// doc). Differentiable with candle ops, though registration treats them as constants.
///
/// # Errors
/// [`Error::ShapeMismatch`] unless `image` has one channel; [`Error::InvalidArgument`] for a
/// zero dilation.
pub fn mind_ssc(image: &Tensor, radius: usize, dilation: usize) -> Result<Tensor> {
    let [_, c, h, w, d] = dims5("mind_ssc", image)?;
    if c != 1 {
        return Err(Error::ShapeMismatch {
            op: "mind_ssc",
            expected: "a one-channel image (B, 1, H, W, D)".to_string(),
            got: format!("{:?}", image.dims()),
        });
    }
    if dilation == 0 {
        return Err(Error::invalid("mind dilation", "must be at least 1"));
    }
    let padded = replicate_pad(image, dilation)?;
    let shifted = |at: [usize; 3]| -> candle_core::Result<Tensor> {
        padded
            .narrow(2, at[0] * dilation, h)?
            .narrow(3, at[1] * dilation, w)?
            .narrow(4, at[2] * dilation, d)
    };
    let mut diffs = Vec::with_capacity(MIND_CHANNELS);
    for (a, b) in pairs() {
        diffs.push((shifted(a)? - shifted(b)?)?.sqr()?);
    }
    let sq = Tensor::cat(&diffs, 1)?;
    let ssd = box_mean(&replicate_pad(&sq, radius)?, 2 * radius + 1)?;
    let mind = ssd.broadcast_sub(&ssd.min_keepdim(1)?)?;
    let var = mind.mean_keepdim(1)?;
    let var_mean = (var.mean_all()? + 1e-12)?;
    let lo = (&var_mean * 0.001)?;
    let hi = (&var_mean * 1000.0)?;
    let var = var.broadcast_maximum(&lo)?.broadcast_minimum(&hi)?;
    Ok(mind.broadcast_div(&var)?.neg()?.exp()?)
}

/// `channels · mean((warp(MIND(moving), ddf) - MIND(fixed))²)`: the SSD of MIND-SSC
/// descriptors summed over channels and averaged over voxels (ConvexAdam's cost), with the
/// moving descriptors warped trilinearly (border padding). The descriptors are computed
/// once, detached: the gradient reaches the DDF only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MindSsdLoss {
    radius: usize,
    dilation: usize,
}

impl Default for MindSsdLoss {
    /// Radius 1, dilation 2 (ConvexAdam's full-resolution setting).
    fn default() -> Self {
        Self {
            radius: 1,
            dilation: 2,
        }
    }
}

impl MindSsdLoss {
    /// A loss with MIND-SSC of patch radius `radius` and neighbour distance `dilation`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a zero dilation.
    pub fn new(radius: usize, dilation: usize) -> Result<Self> {
        if dilation == 0 {
            return Err(Error::invalid("mind dilation", "must be at least 1"));
        }
        Ok(Self { radius, dilation })
    }

    /// The descriptors of an image (B, 1, H, W, D), detached.
    ///
    /// # Errors
    /// As [`mind_ssc`].
    pub fn features(&self, image: &Tensor) -> Result<Tensor> {
        Ok(mind_ssc(&image.detach(), self.radius, self.dilation)?.detach())
    }

    /// The cost of `ddf` (B, 3, H, W, D) between descriptors already computed with
    /// [`Self::features`] (B, 12, H, W, D).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for mismatched shapes; a candle error.
    pub fn forward_features(
        &self,
        ddf: &Tensor,
        moving_features: &Tensor,
        fixed_features: &Tensor,
    ) -> Result<Tensor> {
        let warped = ops::warp(moving_features, ddf, Padding::Border)?;
        crate::losses::same_dims5("MindSsdLoss", &warped, fixed_features)?;
        let channels = fixed_features.dim(1)? as f64;
        Ok(((warped - fixed_features)?.sqr()?.mean_all()? * channels)?)
    }

    /// The cost of `ddf` between the images `moving` and `fixed` (B, 1, H, W, D).
    ///
    /// # Errors
    /// As [`Self::forward_features`].
    pub fn forward(&self, ddf: &Tensor, moving: &Tensor, fixed: &Tensor) -> Result<Tensor> {
        self.forward_features(ddf, &self.features(moving)?, &self.features(fixed)?)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::losses::test_support::{check_gradient, grid, image_a, image_b, scalar};
    use candle_core::DType;

    #[test]
    fn descriptors_are_normalised_and_contrast_invariant() {
        assert_eq!(pairs().len(), MIND_CHANNELS);
        let a = image_a(DType::F64);
        let m = mind_ssc(&a, 1, 1).unwrap();
        assert_eq!(m.dims(), &[1, 12, 16, 20, 24]);
        // The largest channel is exp(0) = 1 everywhere, every channel in (0, 1].
        let max = m.max_keepdim(1).unwrap();
        let err = scalar(&(max - 1.0).unwrap().abs().unwrap().max_all().unwrap());
        assert!(err < 1e-12, "{err}");
        assert!(scalar(&m.min_all().unwrap()) > 0.0);
        // A brighter, higher-contrast copy has the same descriptors.
        let b = ((&a * 3.0).unwrap() - 1.0).unwrap();
        let mb = mind_ssc(&b, 1, 1).unwrap();
        let diff = scalar(&(mb - &m).unwrap().abs().unwrap().max_all().unwrap());
        assert!(diff < 1e-9, "{diff}");
        // A constant image stays finite.
        let c = mind_ssc(&(a.zeros_like().unwrap() + 0.5).unwrap(), 1, 2).unwrap();
        assert!(scalar(&c.sum_all().unwrap()).is_finite());
    }

    #[test]
    fn ssd_is_zero_at_the_identity_and_its_gradient_matches() {
        let loss = MindSsdLoss::new(1, 1).unwrap();
        let a = image_a(DType::F64);
        let zero = Tensor::zeros((1, 3, 16, 20, 24), DType::F64, a.device()).unwrap();
        assert!(scalar(&loss.forward(&zero, &a, &a).unwrap()).abs() < 1e-15);
        let b = image_b(DType::F64);
        assert!(scalar(&loss.forward(&zero, &b, &a).unwrap()) > 0.0);
        let small = |t: &Tensor| t.narrow(2, 0, 6).unwrap().narrow(3, 0, 7).unwrap();
        let fm = loss.features(&small(&b).contiguous().unwrap()).unwrap();
        let ff = loss.features(&small(&a).contiguous().unwrap()).unwrap();
        let ddf = grid([1, 3, 6, 7, 24], |_, c, i, j, k| {
            0.3 * (0.4 * i + 0.3 * j + 0.1 * k + c as f64).sin()
        });
        check_gradient(
            &ddf,
            |u| loss.forward_features(u, &fm, &ff).unwrap(),
            &[3, 100, 555, 1200, 2900],
        );
    }
}
