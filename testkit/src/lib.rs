#![doc = include_str!("../README.md")]

pub mod archive;
pub mod http;
pub mod s3;

pub use archive::ZipBuilder;
pub use http::{RangeServer, RecordedRequest};
pub use s3::S3Server;
