#![doc = include_str!("../README.md")]

pub mod atomic;
pub mod error;
pub mod localnet;
pub mod losses;
pub mod metrics;
pub mod ops;
pub mod optim;

pub use error::{Error, Result};
