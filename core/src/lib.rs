#![doc = include_str!("../README.md")]

pub mod atomic;
pub mod bench;
pub mod catalog;
pub mod dataset;
pub mod dicom;
pub mod error;
pub mod evaluate;
pub mod gpu;
pub mod ingest;
pub mod interop;
pub mod keypoints;
pub mod localnet;
pub mod losses;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod models;
pub mod nifti_io;
pub mod ops;
pub mod optim;
pub mod predict;
pub mod preprocess;
pub mod quality;
pub mod refine;
pub mod registration;
pub mod report;
pub mod results;
pub mod stage;
pub mod synth;
pub mod train;
pub mod viz;

pub use error::{Error, Result};
