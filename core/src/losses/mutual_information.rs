//! Global mutual information loss, ported from MONAI 1.6.1
//! `monai/losses/image_dissimilarity.py::GlobalMutualInformationLoss` (spec §3).
//!
//! Each sample (voxel, with channels flattened into samples) of `pred` and `target` is spread
//! over `num_bins` intensity bins by a Parzen window; the joint histogram is a batched
//! `(nb, N) x (N, nb)` matrix product, so memory and time are `O(N·nb)` and never
//! `O(N·nb²)`.
//!
//! ```text
//! pab  = wa^T wb / N            papb = pa^T pb
//! mi_b = Σ_ij pab · ln((pab + nr) / (papb + dr) + dr)
//! loss = -mean_b mi_b
//! ```
//!
//! Parity details kept from MONAI:
//! * the Gaussian bin centres and `preterm = 1 / (2σ²)` are computed in **f32** (as
//!   `torch.linspace` and f32 arithmetic produce them) and only then cast to the input dtype,
//!   so an f64 input still sees `preterm = 967.9999389648438`, not 968;
//! * the Gaussian window clamps intensities to `[0, 1]` with PyTorch's clamp gradient;
//! * the B-spline window is asymmetric: `pred` uses a cubic B-spline, `target` order 0, whose
//!   weights MONAI builds in f32 whatever the input dtype; min and max are taken over the whole
//!   batch tensor and no `[0, 1]` clamp is applied.
//!
//! On the CPU (f32, f64) the Gaussian histograms come from one fused custom op
//! (`histogram.rs`): multi-threaded over samples, f64 accumulation, hand-written backward,
//! no `(N, nb)` weight tensor. Elsewhere, and for the B-spline kernel, they are candle ops.
//!
//! One deliberate difference in arithmetic: the marginal histograms (means over N samples) are
//! accumulated in f64 and rounded back, because candle's sequential f32 sum is far less
//! accurate than PyTorch's cascade sum (see `mean_over_samples`). With it the f32 loss
//! matches MONAI's f32 golden value to 10 digits. Devices without f64 support (Metal) are
//! therefore not supported by this loss.

use candle_core::{DType, Tensor, D};

use super::{clamp_torch, same_dims5};
use crate::{Error, Result};
use histogram::GaussianHistograms;

mod histogram;

/// The Parzen window used to build the soft histograms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ParzenKernel {
    /// Gaussian window around `num_bins` centres spread over `[0, 1]` (MONAI `"gaussian"`).
    #[default]
    Gaussian,
    /// Cubic B-spline for `pred`, order-0 B-spline for `target`, bins spread between the
    /// batch min and max (MONAI `"b-spline"`).
    BSpline,
}

/// MONAI's `GlobalMutualInformationLoss` with `reduction="mean"`: `-mean_b MI(pred_b, target_b)`.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalMutualInformationLoss {
    num_bins: usize,
    sigma_ratio: f64,
    kernel: ParzenKernel,
    smooth_nr: f64,
    smooth_dr: f64,
}

impl Default for GlobalMutualInformationLoss {
    /// MONAI's defaults: Gaussian kernel, 23 bins, sigma ratio 0.5, smoothing 1e-7.
    fn default() -> Self {
        Self {
            num_bins: 23,
            sigma_ratio: 0.5,
            kernel: ParzenKernel::Gaussian,
            smooth_nr: 1e-7,
            smooth_dr: 1e-7,
        }
    }
}

impl GlobalMutualInformationLoss {
    /// A loss with `num_bins` bins, Gaussian width `sigma_ratio` times the bin spacing (unused
    /// by the B-spline kernel) and the given kernel. Smoothing defaults to 1e-7.
    pub fn new(num_bins: usize, sigma_ratio: f64, kernel: ParzenKernel) -> Result<Self> {
        // The B-spline window pads 2 bins on each side and needs at least one bin inside.
        let min_bins = match kernel {
            ParzenKernel::Gaussian => 2,
            ParzenKernel::BSpline => 5,
        };
        if num_bins < min_bins {
            return Err(Error::invalid(
                "num_bins",
                format!("{num_bins} bins; the {kernel:?} kernel needs at least {min_bins}"),
            ));
        }
        if !(sigma_ratio.is_finite() && sigma_ratio > 0.0) {
            return Err(Error::invalid(
                "sigma_ratio",
                format!("{sigma_ratio}; must be a positive number"),
            ));
        }
        Ok(Self {
            num_bins,
            sigma_ratio,
            kernel,
            ..Self::default()
        })
    }

    /// Sets the numerator and denominator smoothing terms (MONAI `smooth_nr`, `smooth_dr`).
    pub fn with_smooth(mut self, smooth_nr: f64, smooth_dr: f64) -> Self {
        self.smooth_nr = smooth_nr;
        self.smooth_dr = smooth_dr;
        self
    }

    /// Number of histogram bins.
    pub fn num_bins(&self) -> usize {
        self.num_bins
    }

    /// The Parzen kernel in use.
    pub fn kernel(&self) -> ParzenKernel {
        self.kernel
    }

    /// The loss `-mean_b MI(pred_b, target_b)` as a 0-d tensor of the input dtype.
    ///
    /// `pred` and `target` are `(B, C, H, W, D)` of the same shape and dtype.
    pub fn forward(&self, pred: &Tensor, target: &Tensor) -> Result<Tensor> {
        Ok(self.mutual_information(pred, target)?.mean_all()?.neg()?)
    }

    /// The mutual information of each batch item, shape `(B,)` (MONAI `reduction="none"`
    /// returns its negation).
    pub fn mutual_information(&self, pred: &Tensor, target: &Tensor) -> Result<Tensor> {
        same_dims5("GlobalMutualInformationLoss", pred, target)?;
        if pred.dtype() != target.dtype() {
            return Err(Error::invalid(
                "target",
                format!(
                    "dtype {:?} differs from pred's {:?}",
                    target.dtype(),
                    pred.dtype()
                ),
            ));
        }
        if self.kernel == ParzenKernel::Gaussian
            && pred.device().is_cpu()
            && matches!(pred.dtype(), DType::F32 | DType::F64)
        {
            return self.gaussian_fused(pred, target);
        }
        self.mutual_information_composed(pred, target)
    }

    /// The Gaussian-kernel MI from the fused CPU histogram op (`histogram.rs`).
    fn gaussian_fused(&self, pred: &Tensor, target: &Tensor) -> Result<Tensor> {
        let nb = self.num_bins;
        let batch = pred.dim(0)?;
        let centers = bin_centers_f32(nb);
        let op = GaussianHistograms {
            preterm: gaussian_preterm_f32(&centers, self.sigma_ratio),
            centers: centers.into_iter().map(f64::from).collect(),
        };
        let h = pred.contiguous()?.apply_op2(&target.contiguous()?, op)?;
        let pa = h.narrow(1, 0, nb)?.reshape((batch, 1, nb))?;
        let pb = h.narrow(1, nb, nb)?.reshape((batch, 1, nb))?;
        let pab = h.narrow(1, 2 * nb, nb * nb)?.reshape((batch, nb, nb))?;
        self.mi_from_histograms(pab, &pa, &pb)
    }

    /// The MI of each batch item from candle's elementwise ops on `(B, N, nb)` weights: the
    /// B-spline kernel on every device, the Gaussian kernel off the CPU. Inputs are checked.
    fn mutual_information_composed(&self, pred: &Tensor, target: &Tensor) -> Result<Tensor> {
        let ((wa, pa), (wb, pb)) = match self.kernel {
            ParzenKernel::Gaussian => {
                let centers = bin_centers_f32(self.num_bins);
                let preterm = gaussian_preterm_f32(&centers, self.sigma_ratio);
                let centers = Tensor::from_vec(centers, (1, 1, self.num_bins), pred.device())?
                    .to_dtype(pred.dtype())?;
                (
                    gaussian_window(pred, &centers, preterm)?,
                    gaussian_window(target, &centers, preterm)?,
                )
            }
            ParzenKernel::BSpline => (
                self.bspline_window(pred, BSplineOrder::Cubic)?,
                self.bspline_window(target, BSplineOrder::Zero)?,
            ),
        };
        let samples = wa.dim(1)? as f64;
        let pab = (wa.t()?.matmul(&wb)? / samples)?;
        self.mi_from_histograms(pab, &pa, &pb)
    }

    /// `Σ_ij pab · ln((pab + nr) / (pa^T pb + dr) + dr)` per batch item, from the joint
    /// histogram `pab` `(B, nb, nb)` and the marginals `pa`, `pb` `(B, 1, nb)`.
    fn mi_from_histograms(&self, pab: Tensor, pa: &Tensor, pb: &Tensor) -> Result<Tensor> {
        let papb = pa.t()?.matmul(pb)?;
        let ratio = ((&pab + self.smooth_nr)?.div(&(papb + self.smooth_dr)?)? + self.smooth_dr)?;
        Ok((pab * ratio.log()?)?.sum((1, 2))?)
    }

    /// MONAI `parzen_windowing_b_spline`: weights `(B, N, nb)` and histogram `(B, 1, nb)` in
    /// the input dtype.
    fn bspline_window(&self, img: &Tensor, order: BSplineOrder) -> Result<(Tensor, Tensor)> {
        const PADDING: f64 = 2.0;
        let nb = self.num_bins;
        let batch = img.dim(0)?;
        let max = img.flatten_all()?.max(0)?;
        let min = img.flatten_all()?.min(0)?;
        let bin_size = ((&max - &min)? / (nb as f64 - 2.0 * PADDING))?;
        let norm_min = (min.div(&bin_size)? - PADDING)?;
        let term = img.broadcast_div(&bin_size)?.broadcast_sub(&norm_min)?;
        let term = clamp_torch(&term, PADDING, nb as f64 - PADDING - 1.0)?;
        let term = term.reshape((batch, (), 1))?;
        let bins = Tensor::arange(0u32, nb as u32, img.device())?
            .to_dtype(img.dtype())?
            .reshape((1, 1, nb))?;
        let dist = bins.broadcast_sub(&term)?.abs()?;
        let weight = match order {
            BSplineOrder::Cubic => {
                // (4 - 6d² + 3d³)/6 for d < 1, (2 - d)³/6 for 1 <= d < 2.
                let d2 = dist.sqr()?;
                let d3 = (&d2 * &dist)?;
                let inner = (((d2 * -6.0)? + 4.0)? + (d3 * 3.0)?)?;
                let near = dist.lt(1.0)?.to_dtype(img.dtype())?;
                let two_minus = dist.affine(-1.0, 2.0)?;
                let outer = (two_minus.sqr()? * &two_minus)?;
                let far = dist.ge(1.0)?.mul(&dist.lt(2.0)?)?.to_dtype(img.dtype())?;
                ((inner * near)? / 6.0)?.add(&((outer * far)? / 6.0)?)?
            }
            BSplineOrder::Zero => {
                // 1 for d < 0.5, 0.5 for d == 0.5; MONAI builds these weights in f32.
                let inside = dist.lt(0.5)?.to_dtype(DType::F32)?;
                let edge = (dist.eq(0.5)?.to_dtype(DType::F32)? * 0.5)?;
                (inside + edge)?
            }
        };
        let weight = weight.broadcast_div(&weight.sum_keepdim(D::Minus1)?)?;
        let histogram = mean_over_samples(&weight)?;
        Ok((
            weight.to_dtype(img.dtype())?,
            histogram.to_dtype(img.dtype())?,
        ))
    }
}

/// Order of the B-spline Parzen window.
#[derive(Debug, Clone, Copy)]
enum BSplineOrder {
    Zero,
    Cubic,
}

/// `torch.linspace(0, 1, n)` in f32, with PyTorch's CPU formula: `start + step·i` for the
/// first half, `end - step·(n - 1 - i)` for the second.
fn bin_centers_f32(n: usize) -> Vec<f32> {
    let step = 1.0f32 / (n as f32 - 1.0);
    let halfway = n / 2;
    (0..n)
        .map(|i| {
            if i < halfway {
                step * i as f32
            } else {
                1.0f32 - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

/// `1 / (2σ²)` with `σ = mean(diff(centers)) · sigma_ratio`, all in f32 as MONAI computes it.
fn gaussian_preterm_f32(centers: &[f32], sigma_ratio: f64) -> f64 {
    let diffs: f32 = centers.windows(2).map(|w| w[1] - w[0]).sum();
    let sigma = diffs / (centers.len() - 1) as f32 * sigma_ratio as f32;
    let preterm = 1.0f32 / (2.0f32 * (sigma * sigma));
    f64::from(preterm)
}

/// MONAI `parzen_windowing_gaussian`: weights `(B, N, nb)` and histogram `(B, 1, nb)`.
fn gaussian_window(img: &Tensor, centers: &Tensor, preterm: f64) -> Result<(Tensor, Tensor)> {
    let batch = img.dim(0)?;
    let x = clamp_torch(img, 0.0, 1.0)?.reshape((batch, (), 1))?;
    let weight = (x.broadcast_sub(centers)?.sqr()? * -preterm)?.exp()?;
    let weight = weight.broadcast_div(&weight.sum_keepdim(D::Minus1)?)?;
    let histogram = mean_over_samples(&weight)?;
    Ok((weight, histogram))
}

/// `torch.mean(weight, dim=1, keepdim=True)`, accumulated in f64 and rounded back to the
/// weights' dtype.
///
/// PyTorch sums with a cascade and divides by the count. candle's f32 sum is a sequential loop
/// (relative error ~√N·eps: 3.5e-6 on a bin of the 7680-sample golden test, which moved the
/// loss by 2.4e-6), and its `mean` multiplies by a rounded reciprocal (one ulp off in the f32
/// order-0 B-spline histogram, visible in the f64 golden value). Summing in f64 and dividing
/// by the count reproduces the correctly rounded mean in both cases.
fn mean_over_samples(weight: &Tensor) -> candle_core::Result<Tensor> {
    let samples = weight.dim(1)? as f64;
    let count = Tensor::new(samples, weight.device())?;
    weight
        .to_dtype(DType::F64)?
        .sum_keepdim(1)?
        .broadcast_div(&count)?
        .to_dtype(weight.dtype())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (docs/STYLE.md)
mod tests;
