//! The `infer` task: one case of an inference job.
//!
//! The model version is loaded once per worker and kept in a [`ModelCache`] keyed by the
//! weights' sha256, so the next cases of the job (or of a later job with the same weights)
//! skip the fetch and the load. The case's files are fetched (verified by sha256, cached),
//! registered by [`medray_core::predict::register_pair_with`], the same code as `medray
//! predict`, and the outputs on the fixed image's original grid and affine (registered
//! image, trilinear; registered label, nearest; DDF; the DDF as an ITK/ANTs transform in mm
//! LPS; the Jacobian determinant map, see [`medray_core::interop`]) are uploaded to the results stage
//! through the head. The task's result is a [`CaseReport`].

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use candle_core::DType;
use medray_core::interop::write_itk_transform;
use medray_core::localnet::LocalNet;
use medray_core::model::{LoadedModel, ModelConfig};
use medray_core::nifti_io::{
    tensor_to_ddf_array, write_ddf, write_volume, write_volume_as, StoredType,
};
use medray_core::predict::{load_pair, register_pair_with, KeypointFiles, PairFiles};
use medray_core::refine::RefineOptions;
use medray_core::results::{
    CaseReport, DDF_SUFFIX, IMAGE_SUFFIX, JACOBIAN_SUFFIX, LABEL_SUFFIX, PNG_SUFFIX,
    TRANSFORM_SUFFIX,
};
use medray_proto::v1::{InferTask, StageRef, TaskAssignment};

use crate::compute::TaskContext;
use crate::head_client::{HeadClient, Writer};
use crate::selftest::TaskError;

/// Models a worker keeps loaded.
pub const MODEL_CACHE_ENTRIES: usize = 2;

/// Loaded models by the sha256 of their weights, the most recently used last.
#[derive(Default)]
pub struct ModelCache {
    entries: VecDeque<(String, Rc<LoadedModel>)>,
}

impl std::fmt::Debug for ModelCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|(sha, _)| sha))
            .finish()
    }
}

impl ModelCache {
    /// The model with weights `sha256`, loaded with `load` unless it is cached; the flag is
    /// true when it was cached.
    ///
    /// # Errors
    /// What `load` returns.
    pub fn get_or_load(
        &mut self,
        sha256: &str,
        load: impl FnOnce() -> Result<LoadedModel, TaskError>,
    ) -> Result<(Rc<LoadedModel>, bool), TaskError> {
        if let Some(i) = self.entries.iter().position(|(s, _)| s == sha256) {
            let entry = self.entries.remove(i).expect("the index was just found");
            let model = entry.1.clone();
            self.entries.push_back(entry);
            return Ok((model, true));
        }
        let model = Rc::new(load()?);
        if self.entries.len() == MODEL_CACHE_ENTRIES {
            self.entries.pop_front();
        }
        self.entries.push_back((sha256.to_string(), model.clone()));
        Ok((model, false))
    }
}

fn required<'a>(r: Option<&'a StageRef>, field: &str) -> Result<&'a StageRef, TaskError> {
    r.filter(|r| !r.key.is_empty())
        .ok_or_else(|| TaskError::permanent(format!("infer task: missing field `{field}`")))
}

fn optional(r: Option<&StageRef>) -> Option<&StageRef> {
    r.filter(|r| !r.key.is_empty())
}

/// The task's instance optimisation: the head's resolved options (JSON), or the defaults
/// with the task's step count; validated, and their steps must be the task's.
fn refine_options(spec: &InferTask) -> medray_core::Result<RefineOptions> {
    let steps = spec.refine_steps as usize;
    let options = if spec.refine_json.is_empty() {
        RefineOptions::with_steps(steps)
    } else {
        serde_json::from_str::<RefineOptions>(&spec.refine_json)
            .map_err(|e| medray_core::Error::invalid("refine_json", e.to_string()))?
    };
    if options.steps != steps {
        return Err(medray_core::Error::invalid(
            "refine_json",
            format!("{} steps, but the task says {steps}", options.steps),
        ));
    }
    options.validate()?;
    Ok(options)
}

/// Checks the fields of an assignment before any work.
fn validate(spec: &InferTask) -> Result<(), TaskError> {
    let bad = |field: &str, reason: String| {
        TaskError::permanent(format!("infer task: `{field}`: {reason}"))
    };
    medray_core::catalog::CaseId::new(spec.case_id.clone())
        .map_err(|e| bad("case_id", e.to_string()))?;
    medray_core::models::ModelName::new(spec.model.clone())
        .map_err(|e| bad("model", e.to_string()))?;
    let dataset = medray_core::catalog::DatasetName::new(spec.dataset.clone())
        .map_err(|e| bad("dataset", e.to_string()))?;
    let prefix = medray_core::models::ModelName::new(spec.model.clone())
        .and_then(|m| medray_core::results::results_prefix(&dataset, &m, &spec.version))
        .map_err(|e| bad("version", e.to_string()))?;
    if spec.output_prefix != prefix {
        return Err(bad(
            "output_prefix",
            format!("`{}`: expected `{prefix}`", spec.output_prefix),
        ));
    }
    refine_options(spec).map_err(|e| bad("refine", e.to_string()))?;
    if spec.fixed_mask.as_ref().is_some_and(|r| !r.key.is_empty())
        != spec.moving_mask.as_ref().is_some_and(|r| !r.key.is_empty())
    {
        return Err(bad("fixed_mask", "give both masks or neither".to_string()));
    }
    Ok(())
}

/// Loads the weights at `path` into the architecture of `config`.
fn load_model(
    ctx: &TaskContext<'_>,
    path: &Path,
    config: ModelConfig,
    label: &str,
) -> Result<LoadedModel, TaskError> {
    let net = LocalNet::load_safetensors(path, Some(&config.network), DType::F32, ctx.device)
        .map_err(|e| {
            TaskError::permanent(format!(
                "loading {label}: {}",
                e.renamed(path, Path::new(label))
            ))
        })?;
    Ok(LoadedModel {
        net,
        config,
        config_source: None,
    })
}

/// The case's outputs, written into `dir` as NIfTI files: (file, key) pairs.
fn write_outputs(
    dir: &Path,
    spec: &InferTask,
    reg: &medray_core::predict::Registration,
    pair: &medray_core::predict::LoadedPair,
) -> Result<Vec<(PathBuf, String)>, TaskError> {
    let write_err =
        |e: medray_core::Error| TaskError::transient(format!("writing the outputs: {e}"));
    let compute_err =
        |e: medray_core::Error| TaskError::permanent(format!("case {}: {e}", spec.case_id));
    std::fs::create_dir_all(dir).map_err(|e| write_err(medray_core::Error::io(dir, e)))?;
    let affine = &pair.fixed_volume.affine;
    let key = |suffix: &str| format!("{}{}{suffix}", spec.output_prefix, spec.case_id);
    let mut out = Vec::with_capacity(6);

    let image = dir.join(format!("{}{IMAGE_SUFFIX}", spec.case_id));
    let warped = reg.warped_image_original(pair).map_err(compute_err)?;
    write_volume(&image, &warped, affine).map_err(write_err)?;
    out.push((image, key(IMAGE_SUFFIX)));
    let picture = dir.join(format!("{}{PNG_SUFFIX}", spec.case_id));
    let png = reg.case_png(pair, &warped).map_err(compute_err)?;
    medray_core::atomic::write_bytes(&picture, &png).map_err(write_err)?;
    out.push((picture, key(PNG_SUFFIX)));
    if let Some(label) = reg.warped_label_original(pair).map_err(compute_err)? {
        let path = dir.join(format!("{}{LABEL_SUFFIX}", spec.case_id));
        write_volume_as(&path, &label, affine, StoredType::Uint8).map_err(write_err)?;
        out.push((path, key(LABEL_SUFFIX)));
    }
    let ddf = reg
        .ddf_original
        .as_ref()
        .ok_or_else(|| TaskError::permanent("the DDF was not resampled to the original grid"))?;
    let ddf = tensor_to_ddf_array(ddf).map_err(compute_err)?;
    let path = dir.join(format!("{}{DDF_SUFFIX}", spec.case_id));
    write_ddf(&path, &ddf, affine).map_err(write_err)?;
    out.push((path, key(DDF_SUFFIX)));
    let path = dir.join(format!("{}{TRANSFORM_SUFFIX}", spec.case_id));
    write_itk_transform(&path, &ddf, affine).map_err(write_err)?;
    out.push((path, key(TRANSFORM_SUFFIX)));
    // `reg.jacobian` is on the original grid: `ddf_original` is set (checked above).
    let path = dir.join(format!("{}{JACOBIAN_SUFFIX}", spec.case_id));
    write_volume(&path, &reg.jacobian, affine).map_err(write_err)?;
    out.push((path, key(JACOBIAN_SUFFIX)));
    Ok(out)
}

/// Runs one inference task; returns its [`CaseReport`] as JSON.
///
/// # Errors
/// [`TaskError`]: permanent for a bad case (a file that does not read, differs from the
/// catalog, has the wrong shape) or model; transient for a transfer or local disk problem.
pub fn run(
    ctx: &TaskContext<'_>,
    assignment: &TaskAssignment,
    spec: &InferTask,
    mut client: HeadClient,
    worker_id: &str,
) -> Result<String, TaskError> {
    let started = Instant::now();
    validate(spec)?;
    let case = spec.case_id.as_str();
    let fixed = required(spec.fixed.as_ref(), "fixed")?;
    let moving = required(spec.moving.as_ref(), "moving")?;
    let weights = required(spec.weights.as_ref(), "weights")?;
    let label = format!("model {}:{} ({})", spec.model, spec.version, weights.key);

    let (model, model_cached) = ctx.models.borrow_mut().get_or_load(&weights.sha256, || {
        ctx.log(format!(
            "loading {label}, weights sha256 {}",
            weights.sha256
        ));
        let config: ModelConfig = serde_json::from_str(&spec.model_config_json).map_err(|e| {
            TaskError::permanent(format!("infer task: `model_config_json` of {label}: {e}"))
        })?;
        config
            .network
            .validate()
            .and_then(|()| config.preprocess.validate())
            .map_err(|e| TaskError::permanent(format!("{label}: {e}")))?;
        let path = ctx.fetch(&mut client, worker_id, &weights.key, &weights.sha256)?;
        load_model(ctx, &path, config, &weights.key)
    })?;

    // The case's files, named in errors by their stage keys.
    let mut files = PairFiles::default();
    let mut fetch = |r: &StageRef| -> Result<PathBuf, TaskError> {
        let path = ctx.fetch(&mut client, worker_id, &r.key, &r.sha256)?;
        files.names.push((path.clone(), PathBuf::from(&r.key)));
        Ok(path)
    };
    let t = Instant::now();
    let fixed_path = fetch(fixed)?;
    let moving_path = fetch(moving)?;
    let masks = match (
        optional(spec.fixed_mask.as_ref()),
        optional(spec.moving_mask.as_ref()),
    ) {
        (Some(f), Some(m)) => Some((fetch(f)?, fetch(m)?)),
        _ => None,
    };
    let keypoints = optional(spec.keypoints.as_ref())
        .map(&mut fetch)
        .transpose()?;
    let fetch_ms = t.elapsed().as_secs_f64() * 1e3;
    files.fixed = fixed_path;
    files.moving = moving_path;
    if let Some((f, m)) = masks {
        files.fixed_mask = Some(f);
        files.moving_mask = Some(m);
    }
    files.keypoints = keypoints.map(KeypointFiles::Pairs);

    let case_err = |e: medray_core::Error| TaskError::permanent(format!("case {case}: {e}"));
    let pair = load_pair(&files, &model.config.preprocess, ctx.device).map_err(case_err)?;
    let refine = refine_options(spec).map_err(case_err)?;
    let reg = register_pair_with(&model, &pair, true, &refine).map_err(case_err)?;
    if ctx.cancelled() {
        return Err(TaskError::transient("cancelled"));
    }

    let dir = ctx.cache_dir.join("outputs").join(format!(
        "{}-{}-{}",
        assignment.job_id, assignment.task_id, assignment.attempt
    ));
    let uploaded = (|| {
        let outputs = write_outputs(&dir, spec, &reg, &pair)?;
        let writer = Writer {
            worker_id,
            job_id: &assignment.job_id,
            task_id: &assignment.task_id,
            attempt: assignment.attempt,
        };
        let mut keys = Vec::with_capacity(outputs.len());
        for (path, key) in outputs {
            let data = std::fs::read(&path)
                .map_err(|e| TaskError::transient(format!("reading {}: {e}", path.display())))?;
            ctx.runtime
                .block_on(crate::head_client::put_object(
                    &mut client,
                    &writer,
                    &key,
                    data,
                ))
                .map_err(|e| TaskError::transient(format!("uploading {key}: {e}")))?;
            keys.push(key);
        }
        Ok::<_, TaskError>(keys)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    let keys = uploaded?;
    let find = |suffix: &str| keys.iter().find(|k| k.ends_with(suffix)).cloned();

    let hold = Duration::from_millis(u64::from(spec.hold_ms));
    while started.elapsed() < hold {
        if ctx.cancelled() {
            return Err(TaskError::transient("cancelled"));
        }
        std::thread::sleep(Duration::from_millis(20).min(hold.saturating_sub(started.elapsed())));
    }
    let m = &reg.metrics;
    ctx.log(format!(
        "case {case} on {}{}: Dice {} -> {}, TRE {} -> {} mm, fetch {fetch_ms:.0} ms, network {:.0} ms{}, total {:.0} ms",
        ctx.device_spec,
        if model_cached { " (model cached)" } else { "" },
        fmt(m.dice_before, 4),
        fmt(m.dice, 4),
        fmt(m.tre_before_mm, 2),
        fmt(m.tre_mm, 2),
        reg.inference_ms,
        reg.refine.as_ref().map_or(String::new(), |r| format!(
            ", refine {} steps {:.0} ms ({} {:.5} -> {:.5})",
            r.steps, r.refine_ms, r.loss, r.loss_before, r.loss_after
        )),
        started.elapsed().as_secs_f64() * 1e3,
    ));
    let report = CaseReport {
        case_id: case.to_string(),
        metrics: reg.metrics.clone(),
        runtime_ms: started.elapsed().as_secs_f64() * 1e3,
        inference_ms: reg.inference_ms,
        device: ctx.device_spec.to_string(),
        output_image: find(IMAGE_SUFFIX).unwrap_or_default(),
        output_label: find(LABEL_SUFFIX),
        output_ddf: find(DDF_SUFFIX).unwrap_or_default(),
        output_transform: find(TRANSFORM_SUFFIX),
        output_jacobian: find(JACOBIAN_SUFFIX),
        original_size: pair.original_size(),
        network_size: reg.network_size,
        refine: reg.refine.clone(),
        model_cached,
    };
    serde_json::to_string(&report)
        .map_err(|e| TaskError::permanent(format!("encoding the report: {e}")))
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.digits$}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use medray_core::localnet::LocalNetConfig;

    fn model() -> LoadedModel {
        let network = LocalNetConfig::seed();
        LoadedModel {
            net: LocalNet::new(&network, 0, DType::F32, &candle_core::Device::Cpu).unwrap(),
            config: ModelConfig {
                network,
                preprocess: medray_core::preprocess::PreprocessConfig::default(),
                loss: None,
            },
            config_source: None,
        }
    }

    #[test]
    fn a_model_is_loaded_once_and_the_oldest_is_dropped() {
        let mut cache = ModelCache::default();
        let mut loads = 0;
        let mut get = |cache: &mut ModelCache, sha: &str| {
            cache
                .get_or_load(sha, || {
                    loads += 1;
                    Ok(model())
                })
                .unwrap()
                .1
        };
        assert!(!get(&mut cache, "a"));
        assert!(get(&mut cache, "a"));
        assert!(!get(&mut cache, "b"));
        assert!(get(&mut cache, "a"));
        assert!(!get(&mut cache, "c")); // drops b, the least recently used
        assert!(get(&mut cache, "a"));
        assert!(!get(&mut cache, "b"));
        let e = cache
            .get_or_load("d", || Err(TaskError::permanent("bad weights")))
            .unwrap_err();
        assert_eq!(e.reason, "bad weights");
        assert!(!get(&mut cache, "d"));
        assert_eq!(loads, 5);
    }
}
