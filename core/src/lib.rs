#![doc = include_str!("../README.md")]

pub mod error;
pub mod ops;

pub use error::{Error, Result};
