//! 3D tensor operations that candle 0.11 lacks, written for volumes laid out as
//! (B, C, H, W, D), the NCDHW order MONAI uses.
//!
//! Each op works on any [`candle_core::Device`], for f32 and f64 tensors, and is
//! differentiable through candle's autograd unless its docs say otherwise. The semantics
//! follow the PyTorch/MONAI functions named in each module (see `monai-spec.md`).

mod batch_norm;
#[cfg(test)]
mod grad_check;
mod pool;
mod resize;
mod upsample;
mod warp;

pub use batch_norm::{batch_norm3d_eval, batch_norm3d_train, BatchNormStats};
pub use pool::max_pool3d;
pub use resize::resize_trilinear;
pub use upsample::{upsample_nearest3d, upsample_nearest3d_to};
pub use warp::{warp, warp_nearest, Padding};
