#![doc = include_str!("../README.md")]

pub mod atomic;
pub mod error;
pub mod keypoints;
pub mod localnet;
pub mod losses;
pub mod metrics;
pub mod nifti_io;
pub mod ops;
pub mod optim;
pub mod preprocess;
pub mod registration;

pub use error::{Error, Result};
