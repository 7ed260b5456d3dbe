//! Differentiable registration losses, ported from MONAI 1.6.1 (`monai/losses/`).
//!
//! Every loss takes candle tensors of shape `(B, C, H, W, D)` (PyTorch NCDHW order, as MONAI
//! uses them), in `f32` or `f64`, on any [`candle_core::Device`], and returns a 0-d tensor that
//! stays on the autograd tape, so `loss.backward()` reaches the inputs.
//!
//! | loss | MONAI source | spec |
//! |---|---|---|
//! | [`GlobalMutualInformationLoss`] | `losses/image_dissimilarity.py` | §3 |
//! | [`BendingEnergyLoss`] | `losses/deform.py` (1.6.1, and the ≤ 1.5 formula) | §4 |
//! | [`DiceLoss`] | `losses/dice.py` | §5.1 |
//! | [`MultiScaleLoss`] | `losses/multi_scale.py` | §5.2 |
//! | [`mse_loss`] | `torch.nn.MSELoss` | §8 |
//! | [`LocalNormalizedCrossCorrelationLoss`] | `losses/image_dissimilarity.py` | rectangular kernel |
//! | [`DiffusionLoss`] | VoxelMorph `Grad('l2')` | mean squared first differences |
//! | [`MindSsdLoss`], [`mind_ssc`] | ConvexAdam (Siebert et al. 2021) | MIND-SSC SSD |
//!
//! "spec" refers to `docs/monai-spec.md`, which also holds the golden values the tests check.

pub mod bending_energy;
pub mod dice;
pub mod diffusion;
pub(crate) mod filtering;
pub mod keypoints;
pub mod lncc;
pub mod mind;
pub mod mse;
pub mod multi_scale;
pub mod mutual_information;

pub use bending_energy::{BendingEnergyFormula, BendingEnergyLoss};
pub use dice::DiceLoss;
pub use diffusion::DiffusionLoss;
pub use keypoints::{keypoint_loss, KeypointTargets};
pub use lncc::LocalNormalizedCrossCorrelationLoss;
pub use mind::{mind_ssc, MindSsdLoss, MIND_CHANNELS};
pub use mse::mse_loss;
pub use multi_scale::MultiScaleLoss;
pub use mutual_information::{GlobalMutualInformationLoss, ParzenKernel};

use candle_core::Tensor;

use crate::{Error, Result};

/// The five dims of a `(B, C, H, W, D)` tensor, or a [`Error::ShapeMismatch`] naming `op`.
pub(crate) fn dims5(op: &'static str, t: &Tensor) -> Result<[usize; 5]> {
    match *t.dims() {
        [b, c, h, w, d] => Ok([b, c, h, w, d]),
        _ => Err(Error::ShapeMismatch {
            op,
            expected: "a 5-d tensor (B, C, H, W, D)".to_string(),
            got: format!("{:?}", t.dims()),
        }),
    }
}

/// Checks that `pred` and `target` are 5-d and have the same shape; returns that shape.
pub(crate) fn same_dims5(op: &'static str, pred: &Tensor, target: &Tensor) -> Result<[usize; 5]> {
    let p = dims5(op, pred)?;
    let t = dims5(op, target)?;
    if p != t {
        return Err(Error::ShapeMismatch {
            op,
            expected: format!("target shaped like pred {p:?}"),
            got: format!("{t:?}"),
        });
    }
    Ok(p)
}

/// `torch.clamp(x, lo, hi)` with PyTorch's gradient: 1 wherever `lo <= x <= hi` (bounds
/// included), 0 elsewhere.
///
/// candle's own `clamp` halves the gradient exactly on a bound (its `maximum` splits ties),
/// which matters here: warped images sit exactly on 0 over the whole background.
pub(crate) fn clamp_torch(x: &Tensor, lo: f64, hi: f64) -> candle_core::Result<Tensor> {
    let inside = x.ge(lo)?.mul(&x.le(hi)?)?;
    let clamped = x.clamp(lo, hi)?.detach();
    inside.where_cond(x, &clamped)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (docs/STYLE.md)
pub(crate) mod test_support;
