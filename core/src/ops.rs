//! Differentiable 3D tensor operations that candle 0.11 lacks, on (B, C, H, W, D) volumes in
//! PyTorch's NCDHW order, as MONAI's LocalNet uses them.
//!
//! Every op works on any [`candle_core::Device`], for f32 and f64 tensors, and records its
//! gradient in candle's autograd graph unless its docs say otherwise. On the CPU the heavy
//! ops run hand-written kernels; elsewhere they are composed from candle ops that already
//! have a gradient. The semantics follow the PyTorch/MONAI functions named in each module
//! (see `shared/docs/monai-spec.md`).

mod batch_norm;
mod conv3d;
#[cfg(test)]
mod grad_check;
pub(crate) mod kernel;
mod pool;
mod resize;
pub mod simd;
pub(crate) mod stashed;
mod upsample;
mod warp;

pub use batch_norm::{
    batch_norm3d_eval, batch_norm3d_train, batch_norm3d_train_generic, batch_norm_add_relu3d_train,
    batch_norm_relu3d_eval, batch_norm_relu3d_train, BatchNormStats,
};
pub use conv3d::{
    conv3d, conv3d_auto_uses_fft, conv3d_fused, conv3d_generic, conv3d_with, conv_transpose3d,
    conv_transpose3d_generic, with_conv3d_algorithm, Algorithm as Conv3dAlgorithm, Epilogue,
};
pub use pool::max_pool3d;
pub use resize::resize_trilinear;
pub use upsample::{add_upsampled2x, upsample_nearest3d, upsample_nearest3d_to};
pub use warp::{warp, warp_composed, warp_nearest, warp_nearest_composed, Padding};
