//! Timing of the LocalNet training step and inference (`medray bench`), the same work that
//! `tools/bench_monai.py` times for MONAI/PyTorch so the two can be compared in one run.
//!
//! * train step: forward (BatchNorm in training mode), warp, GlobalMutualInformationLoss +
//!   1.0 x BendingEnergyLoss, backward, Adam step; batch 1.
//! * inference: eval-mode forward and warp, no gradient.
//!
//! Inputs are smooth random volumes in [0, 1]; the network uses the preset's MONAI
//! initialisation with a random (non-zero) output layer so that the warp does real work.

mod ops;

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::localnet::{LocalNet, LocalNetConfig, OutputInit, Preset};
use crate::optim::{Adam, AdamConfig};
use crate::registration::{LossPreset, PairBatch, RegistrationLoss};
use crate::Result;

pub use ops::{gemm_ceiling, layers, profile_ops, GemmCeiling, LayerOp, OpTiming};

/// What is timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchKind {
    /// One optimiser step.
    Train,
    /// One registration without gradients.
    Infer,
}

/// One timing result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchResult {
    /// Network preset.
    pub preset: Preset,
    /// Volume size.
    pub size: [usize; 3],
    /// Train step or inference.
    pub kind: BenchKind,
    /// Median over the repeats, seconds.
    pub median_s: f64,
    /// Every repeat, seconds.
    pub times_s: Vec<f64>,
    /// Resident memory after the inputs were made, before the network was built, MiB
    /// (Linux `VmRSS`; `None` elsewhere).
    #[serde(default)]
    pub baseline_rss_mib: Option<f64>,
    /// Peak resident memory of the whole process at the end of the runs, MiB (Linux
    /// `VmHWM`, the same figure as `ru_maxrss`; `None` elsewhere). Only the run's own peak
    /// when the process ran nothing else (`medray bench` runs each configuration in a
    /// fresh child process).
    #[serde(default)]
    pub peak_rss_mib: Option<f64>,
    /// On a GPU: the peak device memory in use while the configuration ran (warm-up
    /// included), MiB: total minus free over the whole device, CUDA context included
    /// ([`crate::gpu::MemorySampler`]); `None` on the CPU.
    #[serde(default)]
    pub peak_gpu_mib: Option<f64>,
    /// On a GPU: the device's name; `None` on the CPU.
    #[serde(default)]
    pub gpu: Option<String>,
}

/// Resident memory of this process now (`VmRSS`), MiB; `None` off Linux.
pub fn current_rss_mib() -> Option<f64> {
    proc_status_mib("VmRSS")
}

/// Peak resident memory of this process (`VmHWM`), MiB; `None` off Linux.
pub fn peak_rss_mib() -> Option<f64> {
    proc_status_mib("VmHWM")
}

fn proc_status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status_field_mib(&status, field)
}

/// The value of a `Field:   1234 kB` line of `/proc/<pid>/status`, in MiB.
fn status_field_mib(status: &str, field: &str) -> Option<f64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        let kib: f64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
        Some(kib / 1024.0)
    })
}

pub(crate) fn smooth_volume(size: [usize; 3], phase: f64, device: &Device) -> Result<Tensor> {
    let [h, w, d] = size;
    let mut v = Vec::with_capacity(h * w * d);
    for i in 0..h {
        for j in 0..w {
            for k in 0..d {
                let (x, y, z) = (
                    i as f64 / h as f64,
                    j as f64 / w as f64,
                    k as f64 / d as f64,
                );
                let s = (6.0 * x + phase).sin() * (5.0 * y).cos() * (4.0 * z + 0.5 * phase).sin();
                v.push((0.5 + 0.45 * s) as f32);
            }
        }
    }
    Ok(Tensor::from_vec(v, (1, 1, h, w, d), device)?)
}

/// The median of `times` (the mean of the middle two for an even count); NaN if empty.
pub fn median(times: &[f64]) -> f64 {
    let mut t = times.to_vec();
    t.sort_by(f64::total_cmp);
    let n = t.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        t[n / 2]
    } else {
        0.5 * (t[n / 2 - 1] + t[n / 2])
    }
}

/// Times `kind` for `preset` at `size`: one warm-up, then `repeats` timed runs.
pub fn bench(
    preset: Preset,
    size: [usize; 3],
    kind: BenchKind,
    repeats: usize,
    device: &Device,
) -> Result<BenchResult> {
    let config = LocalNetConfig::preset(preset).with_output_init(OutputInit::KaimingNormal);
    let batch = PairBatch {
        fixed: smooth_volume(size, 0.0, device)?,
        moving: smooth_volume(size, 0.4, device)?,
        fixed_mask: None,
        moving_mask: None,
        keypoints: None,
    };
    let input = batch.network_input()?;
    let baseline_rss_mib = current_rss_mib();
    let gpu = crate::gpu::info(device)?.map(|g| g.name);
    let sampler = crate::gpu::MemorySampler::start(device)?;
    let net = LocalNet::new(&config, 0, DType::F32, device)?;
    let objective = RegistrationLoss::new(LossPreset::MiBe);
    let mut adam = Adam::new(net.parameters(), AdamConfig::with_lr(1e-4))?;
    let mut run = || -> Result<()> {
        match kind {
            BenchKind::Train => {
                let ddf = net.forward_t(&input, true)?;
                let loss = objective.forward(&ddf, &batch)?;
                adam.step(&loss.total.backward()?)?;
                // Force completion on asynchronous devices.
                loss.values()?;
            }
            BenchKind::Infer => {
                let ddf = net.forward_t(&input, false)?.detach();
                let warped = crate::ops::warp(&batch.moving, &ddf, crate::ops::Padding::Border)?;
                warped.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            }
        }
        Ok(())
    };
    run()?;
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let t0 = Instant::now();
        run()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    let peak_gpu_mib = sampler.finish();
    Ok(BenchResult {
        preset,
        size,
        kind,
        median_s: median(&times),
        times_s: times,
        baseline_rss_mib,
        peak_rss_mib: peak_rss_mib(),
        peak_gpu_mib,
        gpu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn status_fields_are_read_in_mib() {
        let status = "Name:\tmedray\nVmHWM:\t  2048 kB\nVmRSS:\t   512 kB\n";
        assert_eq!(status_field_mib(status, "VmHWM"), Some(2.0));
        assert_eq!(status_field_mib(status, "VmRSS"), Some(0.5));
        assert_eq!(status_field_mib(status, "VmSwap"), None);
        assert_eq!(status_field_mib("VmHWM: lots", "VmHWM"), None);
    }

    #[test]
    fn bench_runs_both_kinds_on_a_tiny_volume() {
        for kind in [BenchKind::Train, BenchKind::Infer] {
            let r = bench(Preset::Seed, [16, 16, 16], kind, 1, &Device::Cpu).unwrap();
            assert_eq!(r.times_s.len(), 1);
            assert!(r.median_s > 0.0);
        }
    }
}
