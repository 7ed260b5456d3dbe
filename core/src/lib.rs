#![doc = include_str!("../README.md")]

pub mod error;
pub mod losses;
pub mod metrics;

pub use error::{Error, Result};
