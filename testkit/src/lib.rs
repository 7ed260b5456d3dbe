#![doc = include_str!("../README.md")]

pub mod archive;
pub mod http;
pub mod s3;

pub use archive::ZipBuilder;
pub use http::{RangeServer, RecordedRequest};
pub use s3::S3Server;

/// Polls `condition` every few milliseconds until it holds or `timeout` passes; returns
/// whether it held. Tests wait with this instead of sleeping a fixed time.
pub async fn wait_until(timeout: std::time::Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}
