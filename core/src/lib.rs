#![doc = include_str!("../README.md")]

pub mod error;
pub mod keypoints;
pub mod nifti_io;
pub mod ops;
pub mod preprocess;
pub mod synth;

pub use error::{Error, Result};
