//! The compute device a worker announces and runs on.

use candle_core::Device;

use crate::{Result, WorkerError};

/// Opens `cpu` or `cuda:N`.
///
/// # Errors
/// [`WorkerError::Config`] for another spelling, or `cuda` in a build without CUDA.
pub fn parse_device(spec: &str) -> Result<Device> {
    let bad = |reason: String| WorkerError::Config {
        field: "--device",
        reason,
    };
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s.starts_with("cuda") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse::<usize>()
                    .map_err(|_| bad(format!("`{s}`: expected cuda:N with N a number")))?,
                None if s == "cuda" => 0,
                None => return Err(bad(format!("`{s}`: expected `cpu` or `cuda:N`"))),
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(bad(format!(
                    "`{s}`: this medray was built without CUDA support (rebuild with --features cuda)"
                )));
            }
            Device::new_cuda(ordinal).map_err(|e| bad(format!("`{s}`: {e}")))
        }
        other => Err(bad(format!("`{other}`: expected `cpu` or `cuda:N`"))),
    }
}
