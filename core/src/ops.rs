//! Differentiable 3D tensor operations that candle does not provide, on (B, C, H, W, D)
//! volumes in PyTorch's NCDHW order, as MONAI's LocalNet uses them.
//!
//! Every op works on any [`candle_core::Device`] and records its gradient in candle's
//! autograd graph. On the CPU the heavy ops run hand-written kernels; elsewhere they are
//! composed from candle ops that already have a gradient.

mod conv3d;

pub use conv3d::{conv3d, conv3d_generic, conv_transpose3d, conv_transpose3d_generic};
