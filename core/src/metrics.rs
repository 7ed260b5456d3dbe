//! Evaluation metrics of a registration, computed without gradients and returned as `f64`.
//!
//! | metric | source | spec |
//! |---|---|---|
//! | [`dice()`], [`soft_dice`] | MONAI `metrics/meandice.py` (≥ 1.2 and 1.1.0 semantics) | §5.3 |
//! | [`ssim()`] | MONAI `metrics/regression.py::SSIMMetric` (≥ 1.2) | §6 |
//! | [`target_registration_error`] | keypoint distance in mm after warping | — |
//! | [`jacobian_stats`] | folding of `x -> x + u(x)` | — |
//! | [`mean_displacement`] | mean `‖u‖` | — |
//!
//! Inputs are candle tensors on any device; they are copied to the host as `f64` (except
//! SSIM, which like MONAI runs in `f32` on the tensors' device).

pub mod dice;
pub mod displacement;
pub mod jacobian;
pub mod ssim;
pub mod tre;

pub use dice::{dice, mean_ignoring_nan, soft_dice};
pub use displacement::mean_displacement;
pub use jacobian::{jacobian_determinant, jacobian_stats, JacobianStats};
pub use ssim::{ssim, ssim_per_item};
pub use tre::{mean_std, target_registration_error, tre_before};

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// The elements of `t` on the host as `f64`, in row-major order.
pub(crate) fn to_host_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

/// A single DDF on the host: accepts `(3, H, W, D)` or `(1, 3, H, W, D)` and returns the
/// displacements (channel-major, voxel units) with the grid size `[H, W, D]`.
pub(crate) fn ddf_to_host(op: &'static str, ddf: &Tensor) -> Result<(Vec<f64>, [usize; 3])> {
    let grid = match *ddf.dims() {
        [3, h, w, d] | [1, 3, h, w, d] => [h, w, d],
        _ => {
            return Err(Error::ShapeMismatch {
                op,
                expected: "a DDF shaped (3, H, W, D) or (1, 3, H, W, D)".to_string(),
                got: format!("{:?}", ddf.dims()),
            })
        }
    };
    Ok((to_host_f64(ddf)?, grid))
}
