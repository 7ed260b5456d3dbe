//! The `selftest` task: fetch a case through the head, run a LocalNet forward and a warp on
//! this worker's device, report the timings. It proves the whole path (scheduling, object
//! transfer, tensor compute, result reporting) before training exists.

use std::time::{Duration, Instant};

use candle_core::DType;
use medray_core::localnet::{LocalNet, LocalNetConfig};
use medray_core::ops::{warp, Padding};
use medray_core::preprocess::{preprocess_image, PreprocessConfig};
use medray_proto::v1::SelftestTask;

use crate::compute::TaskContext;
use crate::head_client::HeadClient;

/// A task failure, classified where it happens.
#[derive(Debug)]
pub struct TaskError {
    /// What went wrong.
    pub reason: String,
    /// True if running it again elsewhere may succeed.
    pub retryable: bool,
}

impl TaskError {
    /// A failure that another attempt would repeat.
    pub fn permanent(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            retryable: false,
        }
    }

    /// A failure another attempt (elsewhere) may not hit.
    pub fn transient(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            retryable: true,
        }
    }
}

fn core_err(what: &str) -> impl Fn(medray_core::Error) -> TaskError + '_ {
    move |e| TaskError::permanent(format!("{what}: {e}"))
}

/// Runs one selftest task; returns its result as JSON.
///
/// # Errors
/// [`TaskError`] with the step that failed.
pub fn run(
    ctx: &TaskContext<'_>,
    spec: &SelftestTask,
    mut client: HeadClient,
    worker_id: &str,
) -> Result<String, TaskError> {
    let started = Instant::now();
    let size = spec.size as usize;
    if !(16..=128).contains(&size) || !size.is_multiple_of(4) {
        return Err(TaskError::permanent(format!(
            "selftest size {size}: expected a multiple of 4 in 16..=128"
        )));
    }
    let route = if ctx.direct_stage.is_some() {
        "directly from the stage"
    } else {
        "through the head"
    };
    ctx.log(format!(
        "selftest on {}: fetching {} and {} ({route})",
        ctx.device_spec, spec.fixed_key, spec.moving_key
    ));
    let t = Instant::now();
    let mut fetch = |key: &str, sha: &str| ctx.fetch(&mut client, worker_id, key, sha);
    let fixed_path = fetch(&spec.fixed_key, &spec.fixed_sha256)?;
    let moving_path = fetch(&spec.moving_key, &spec.moving_sha256)?;
    let fetch_ms = t.elapsed().as_secs_f64() * 1e3;

    let t = Instant::now();
    let pre = PreprocessConfig::quickstart().with_size(Some([size; 3]));
    let read = |path: &std::path::Path, what: &str| {
        let volume = medray_core::nifti_io::read_volume(path).map_err(core_err(what))?;
        preprocess_image(&volume, &pre, ctx.device).map_err(core_err(what))
    };
    let fixed = read(&fixed_path, "fixed image")?;
    let moving = read(&moving_path, "moving image")?;
    let preprocess_ms = t.elapsed().as_secs_f64() * 1e3;

    let t = Instant::now();
    let net = LocalNet::new(&LocalNetConfig::seed(), 0, DType::F32, ctx.device)
        .map_err(core_err("building LocalNet"))?;
    let build_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let input = candle_core::Tensor::cat(&[&moving, &fixed], 1)
        .map_err(|e| TaskError::permanent(format!("input: {e}")))?;
    let ddf = net
        .forward_t(&input, false)
        .map_err(core_err("LocalNet forward"))?;
    sync(ctx)?;
    let forward_ms = t.elapsed().as_secs_f64() * 1e3;

    let t = Instant::now();
    let warped = warp(&moving, &ddf, Padding::Border)
        .map_err(|e| TaskError::permanent(format!("warp: {e}")))?;
    let warped_mean = warped
        .mean_all()
        .and_then(|m| m.to_scalar::<f32>())
        .map_err(|e| TaskError::permanent(format!("warp: {e}")))?;
    let warp_ms = t.elapsed().as_secs_f64() * 1e3;
    if !warped_mean.is_finite() {
        return Err(TaskError::permanent(
            "the warped image has non-finite values",
        ));
    }

    for i in 0..spec.log_lines {
        if ctx.cancelled() {
            return Err(TaskError::transient("cancelled"));
        }
        ctx.log(format!("selftest line {i}"));
    }
    let hold = Duration::from_millis(u64::from(spec.hold_ms));
    while started.elapsed() < hold {
        if ctx.cancelled() {
            return Err(TaskError::transient("cancelled"));
        }
        std::thread::sleep(Duration::from_millis(20).min(hold.saturating_sub(started.elapsed())));
    }
    ctx.log(format!(
        "selftest done on {}: fetch {fetch_ms:.1} ms, preprocess {preprocess_ms:.1} ms, build {build_ms:.1} ms, forward {forward_ms:.1} ms, warp {warp_ms:.1} ms at {size}^3",
        ctx.device_spec
    ));
    let result = serde_json::json!({
        "worker_id": worker_id,
        "device": ctx.device_spec,
        "size": size,
        "fetch_ms": fetch_ms,
        "preprocess_ms": preprocess_ms,
        "build_ms": build_ms,
        "forward_ms": forward_ms,
        "warp_ms": warp_ms,
        "total_ms": started.elapsed().as_secs_f64() * 1e3,
    });
    Ok(result.to_string())
}

fn sync(ctx: &TaskContext<'_>) -> Result<(), TaskError> {
    ctx.device
        .synchronize()
        .map_err(|e| TaskError::permanent(format!("device sync: {e}")))
}
