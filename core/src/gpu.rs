//! What a CUDA device is and how much of its memory a piece of work used: the GPU's name and
//! memory for `medray status` and the benchmarks, and a sampler of the device memory in use
//! (total minus free, the whole device, CUDA context included) while a benchmark runs.
//!
//! Without the `cuda` feature, or on the CPU, every function answers `None`: nothing here
//! pretends a GPU figure on a machine without one.

use candle_core::Device;

/// Name and total memory of the GPU behind `device`; `None` on the CPU or without the
/// `cuda` feature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    /// The driver's device name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Total device memory, bytes.
    pub total_bytes: u64,
}

/// The GPU behind `device`, or `None` on the CPU.
///
/// # Errors
/// A CUDA driver error (named by the driver) when the device cannot be queried.
pub fn info(device: &Device) -> crate::Result<Option<GpuInfo>> {
    imp::info(device)
}

/// Samples the device memory in use every millisecond on a background thread from
/// [`MemorySampler::start`] until [`MemorySampler::finish`], which returns the peak in MiB.
pub struct MemorySampler {
    inner: Option<imp::Sampler>,
}

impl MemorySampler {
    /// Starts sampling `device`'s memory; on the CPU (or without `cuda`) a no-op whose
    /// [`Self::finish`] is `None`.
    ///
    /// # Errors
    /// A CUDA driver error from the first sample.
    pub fn start(device: &Device) -> crate::Result<Self> {
        Ok(Self {
            inner: imp::Sampler::start(device)?,
        })
    }

    /// Stops sampling; the peak device memory in use (total minus free) seen while it ran,
    /// MiB, or `None` on the CPU.
    pub fn finish(self) -> Option<f64> {
        self.inner.map(imp::Sampler::finish)
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::Duration;

    use candle_core::cuda_backend::cudarc::driver::CudaContext;
    use candle_core::Device;

    use super::GpuInfo;
    use crate::error::Error;

    fn context(device: &Device) -> Option<Arc<CudaContext>> {
        match device {
            Device::Cuda(d) => Some(d.cuda_stream().context().clone()),
            _ => None,
        }
    }

    fn driver(what: &str, e: impl std::fmt::Display) -> Error {
        Error::invalid("cuda device", format!("{what}: {e}"))
    }

    pub fn info(device: &Device) -> crate::Result<Option<GpuInfo>> {
        let Some(ctx) = context(device) else {
            return Ok(None);
        };
        let name = ctx.name().map_err(|e| driver("cuDeviceGetName", e))?;
        let total_bytes = ctx.total_mem().map_err(|e| driver("cuDeviceTotalMem", e))? as u64;
        Ok(Some(GpuInfo { name, total_bytes }))
    }

    pub struct Sampler {
        stop: Arc<AtomicBool>,
        handle: JoinHandle<usize>,
    }

    impl Sampler {
        pub fn start(device: &Device) -> crate::Result<Option<Self>> {
            let Some(ctx) = context(device) else {
                return Ok(None);
            };
            let used = |ctx: &CudaContext| ctx.mem_get_info().map(|(free, total)| total - free);
            let first = used(&ctx).map_err(|e| driver("cuMemGetInfo", e))?;
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            let handle = std::thread::spawn(move || {
                let mut peak = first;
                while !flag.load(Ordering::Relaxed) {
                    if let Ok(u) = used(&ctx) {
                        peak = peak.max(u);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                if let Ok(u) = used(&ctx) {
                    peak = peak.max(u);
                }
                peak
            });
            Ok(Some(Self { stop, handle }))
        }

        pub fn finish(self) -> f64 {
            self.stop.store(true, Ordering::Relaxed);
            let peak = self.handle.join().unwrap_or(0);
            peak as f64 / (1024.0 * 1024.0)
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use candle_core::Device;

    use super::GpuInfo;

    pub fn info(_device: &Device) -> crate::Result<Option<GpuInfo>> {
        Ok(None)
    }

    pub enum Sampler {}

    impl Sampler {
        pub fn start(_device: &Device) -> crate::Result<Option<Self>> {
            Ok(None)
        }

        pub fn finish(self) -> f64 {
            match self {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_has_no_gpu_figures() {
        assert_eq!(info(&Device::Cpu).unwrap(), None);
        let sampler = MemorySampler::start(&Device::Cpu).unwrap();
        assert_eq!(sampler.finish(), None);
    }
}
