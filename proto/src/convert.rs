//! Every conversion between the wire types of [`crate::v1`] and medray-core's domain types,
//! in one place next to the generated code (STYLE.md; Ballista's `from_proto`/`to_proto`).
//! The head encodes its answers and decodes requests with these; the CLI decodes the head's
//! answers and encodes its requests with the same ones, and puts its local answers through
//! them too, so `medray datasets show`, `medray models`, `medray results` and `medray sql`
//! print the same locally and through the head.
//!
//! Why here: the conversions need both the generated types and the domain types. `core`
//! must not depend on the wire protocol (it has neither tonic nor prost), so they cannot
//! live there; in the head, the CLI had to reach into the head's gRPC services to use them.
//! `proto` already sits between `core` and its users (head, worker, CLI), so depending on
//! `core` here adds no edge a user of `proto` lacks, and Rust's orphan rule lets this crate
//! implement `From`/`TryFrom` between its own types and core's.
//!
//! Decoding checks what the wire cannot: names, ids and enums are validated, and an invalid
//! or missing field is a [`medray_core::Error::InvalidArgument`] naming it.

use medray_core::catalog::query::{QueryResult, SqlValue};
use medray_core::catalog::{CaseId, CaseRecord, DatasetName, DatasetRecord};
use medray_core::localnet::Preset;
use medray_core::model::ModelConfig;
use medray_core::models::{ModelName, ModelVersion, VersionRef};
use medray_core::preprocess::Window;
use medray_core::refine::{RefineOptions, RefineOverrides};
use medray_core::registration::LossPreset;
use medray_core::report::ReportJob;
use medray_core::results::{ResultFilter, ResultRow};
use medray_core::stage::ObjectKey;
use medray_core::train::TrainConfig;
use medray_core::{Error, Result};

use crate::v1::job_spec::Kind;
use crate::v1::sql_value::Value;
use crate::v1::{
    CaseInfo, CaseResult, DatasetInfo, GetDatasetResponse, InferSpec, Job, JobState,
    ListResultsRequest, ModelRef, ModelVersionInfo, QueryCatalogResponse, SqlRow, TrainSpec,
};
use crate::MAX_ROWS;

// ---- datasets ----

impl From<&DatasetRecord> for DatasetInfo {
    fn from(d: &DatasetRecord) -> Self {
        DatasetInfo {
            name: d.name.as_str().to_string(),
            source: d.source.clone(),
            created_at: d.created_at.clone(),
            case_count: d.case_count as u32,
            bytes: d.bytes,
        }
    }
}

impl From<&CaseRecord> for CaseInfo {
    fn from(c: &CaseRecord) -> Self {
        CaseInfo {
            case_id: c.case_id.as_str().to_string(),
            shape: c.shape.iter().map(|v| *v as u32).collect(),
            spacing_mm: c.spacing_mm.to_vec(),
            intensity_min: c.intensity_min,
            intensity_max: c.intensity_max,
            keypoint_count: c.keypoint_count as u32,
            fixed_key: c.fixed.key.as_str().to_string(),
            moving_key: c.moving.key.as_str().to_string(),
        }
    }
}

/// The wire form of a catalog dataset and its cases.
#[must_use]
pub fn dataset_response(d: &DatasetRecord, cases: &[CaseRecord]) -> GetDatasetResponse {
    GetDatasetResponse {
        dataset: Some(DatasetInfo::from(d)),
        content_sha256: d.content_sha256.clone(),
        cases: cases.iter().map(CaseInfo::from).collect(),
    }
}

// ---- the model registry ----

impl From<&ModelVersion> for ModelVersionInfo {
    fn from(v: &ModelVersion) -> Self {
        ModelVersionInfo {
            name: v.name.to_string(),
            version: v.version.clone(),
            aliases: v.aliases.clone(),
            preset: v.preset.clone(),
            // A ModelConfig always serialises (plain data, string keys).
            model_config_json: serde_json::to_string(&v.model_config).unwrap_or_default(),
            train_config_json: v.train_config_json.clone(),
            dataset: v.dataset.clone(),
            train_cases: v.train_cases.clone(),
            val_cases: v.val_cases.clone(),
            job_id: v.job_id.clone().unwrap_or_default(),
            epochs: v.epochs,
            best_val_dice: v.best_val_dice,
            final_losses_json: v.final_losses_json.clone(),
            artifact_key: v.artifact_key.to_string(),
            artifact_sha256: v.artifact_sha256.clone(),
            artifact_bytes: v.artifact_bytes,
            config_key: v.config_key.to_string(),
            source: v.source.as_str().to_string(),
            created_at: v.created_at.clone(),
            medray_version: v.medray_version.clone(),
            // Plain data with string keys: always serialises.
            training_data_json: v
                .training_data
                .as_ref()
                .and_then(|t| serde_json::to_string(t).ok()),
        }
    }
}

impl TryFrom<ModelVersionInfo> for ModelVersion {
    type Error = Error;

    fn try_from(info: ModelVersionInfo) -> Result<Self> {
        if info.version.is_empty() {
            return Err(Error::invalid("version", "missing"));
        }
        let model_config: ModelConfig = serde_json::from_str(&info.model_config_json)
            .map_err(|e| Error::invalid("model_config_json", e.to_string()))?;
        Ok(ModelVersion {
            name: ModelName::new(info.name)?,
            version: info.version,
            preset: info.preset,
            model_config,
            train_config_json: info.train_config_json,
            dataset: info.dataset,
            train_cases: info.train_cases,
            val_cases: info.val_cases,
            job_id: (!info.job_id.is_empty()).then_some(info.job_id),
            epochs: info.epochs,
            best_val_dice: info.best_val_dice,
            final_losses_json: info.final_losses_json,
            artifact_key: ObjectKey::new(info.artifact_key)?,
            artifact_sha256: info.artifact_sha256,
            artifact_bytes: info.artifact_bytes,
            config_key: ObjectKey::new(info.config_key)?,
            source: info.source.parse()?,
            created_at: info.created_at,
            medray_version: info.medray_version,
            aliases: info.aliases,
            training_data: info
                .training_data_json
                .as_deref()
                .map(serde_json::from_str)
                .transpose()
                .map_err(|e| Error::invalid("training_data_json", e.to_string()))?,
        })
    }
}

/// The model and version a [`ModelRef`] names.
///
/// # Errors
/// [`Error::InvalidArgument`] for an invalid name, or both a version and an alias.
pub fn version_ref(r: ModelRef) -> Result<(ModelName, VersionRef)> {
    let name = ModelName::new(r.name)?;
    let version = (!r.version.is_empty()).then_some(r.version);
    let alias = (!r.alias.is_empty()).then_some(r.alias);
    Ok((name, VersionRef::from_options(version, alias)?))
}

/// The [`ModelRef`] of a name and a version reference.
#[must_use]
pub fn model_ref(name: &ModelName, which: &VersionRef) -> ModelRef {
    let (version, alias) = match which {
        VersionRef::Latest => (String::new(), String::new()),
        VersionRef::Version(v) => (v.clone(), String::new()),
        VersionRef::Alias(a) => (String::new(), a.clone()),
    };
    ModelRef {
        name: name.to_string(),
        version,
        alias,
    }
}

// ---- inference results ----

impl From<&ResultRow> for CaseResult {
    fn from(r: &ResultRow) -> Self {
        CaseResult {
            case_id: r.case_id.to_string(),
            dataset: r.dataset.to_string(),
            model_name: r.model_name.to_string(),
            model_version: r.model_version.clone(),
            status: r.status.as_str().to_string(),
            error: r.error.clone(),
            dice_before: r.dice_before,
            dice_score: r.dice_score,
            soft_dice: r.soft_dice,
            ssim_score: r.ssim_score,
            mi: r.mi,
            tre_before_mm: r.tre_before_mm,
            tre_mm: r.tre_mm,
            folding_pct: r.folding_pct,
            ddf_magnitude: r.ddf_magnitude,
            log_jac_std: r.log_jac_std,
            runtime_ms: r.runtime_ms,
            device: r.device.clone(),
            worker: r.worker.clone(),
            job_id: r.job_id.clone(),
            output_image: r.output_image.clone(),
            output_label: r.output_label.clone(),
            output_ddf: r.output_ddf.clone(),
            output_transform: r.output_transform.clone(),
            output_jacobian: r.output_jacobian.clone(),
            refine_steps: r.refine_steps,
            split: r.split.map(|s| s.as_str().to_string()),
            created_at: r.created_at.clone(),
        }
    }
}

impl TryFrom<CaseResult> for ResultRow {
    type Error = Error;

    fn try_from(c: CaseResult) -> Result<Self> {
        Ok(ResultRow {
            case_id: CaseId::new(c.case_id)?,
            dataset: DatasetName::new(c.dataset)?,
            model_name: ModelName::new(c.model_name)?,
            model_version: c.model_version,
            status: c.status.parse()?,
            error: c.error,
            dice_before: c.dice_before,
            dice_score: c.dice_score,
            soft_dice: c.soft_dice,
            ssim_score: c.ssim_score,
            mi: c.mi,
            tre_before_mm: c.tre_before_mm,
            tre_mm: c.tre_mm,
            folding_pct: c.folding_pct,
            ddf_magnitude: c.ddf_magnitude,
            log_jac_std: c.log_jac_std,
            runtime_ms: c.runtime_ms,
            device: c.device,
            worker: c.worker,
            job_id: c.job_id,
            output_image: c.output_image,
            output_label: c.output_label,
            output_ddf: c.output_ddf,
            output_transform: c.output_transform,
            output_jacobian: c.output_jacobian,
            refine_steps: c.refine_steps,
            split: c.split.as_deref().map(str::parse).transpose()?,
            created_at: c.created_at,
        })
    }
}

/// Encodes a filter; its limit is capped at [`MAX_ROWS`] (0: none given).
impl From<&ResultFilter> for ListResultsRequest {
    fn from(f: &ResultFilter) -> Self {
        ListResultsRequest {
            model: f.model.clone().unwrap_or_default(),
            version: f.version.clone().unwrap_or_default(),
            dataset: f.dataset.clone().unwrap_or_default(),
            job_id: f.job_id.clone().unwrap_or_default(),
            order_by: f.order_by.clone().unwrap_or_default(),
            descending: f.descending,
            limit: f.limit.map_or(0, |l| l.min(MAX_ROWS as usize) as u32),
        }
    }
}

/// Decodes a request (empty strings: no filter); the limit is at most [`MAX_ROWS`], which
/// is also what no limit (0) means. The filter is not validated here.
impl From<ListResultsRequest> for ResultFilter {
    fn from(r: ListResultsRequest) -> Self {
        let some = |v: String| (!v.is_empty()).then_some(v);
        ResultFilter {
            model: some(r.model),
            version: some(r.version),
            dataset: some(r.dataset),
            job_id: some(r.job_id),
            order_by: some(r.order_by),
            descending: r.descending,
            limit: Some(match r.limit {
                0 => MAX_ROWS,
                n => n.min(MAX_ROWS),
            } as usize),
        }
    }
}

// ---- read-only SQL ----

impl From<QueryResult> for QueryCatalogResponse {
    fn from(q: QueryResult) -> Self {
        QueryCatalogResponse {
            columns: q.columns,
            rows: q
                .rows
                .into_iter()
                .map(|row| SqlRow {
                    values: row
                        .into_iter()
                        .map(|v| crate::v1::SqlValue {
                            value: Some(match v {
                                SqlValue::Null => Value::Null(true),
                                SqlValue::Integer(i) => Value::Integer(i),
                                SqlValue::Real(f) => Value::Real(f),
                                SqlValue::Text(t) => Value::Text(t),
                                SqlValue::Blob(b) => Value::Blob(b),
                            }),
                        })
                        .collect(),
                })
                .collect(),
            truncated: q.truncated,
        }
    }
}

/// A value without a kind reads as NULL.
impl From<QueryCatalogResponse> for QueryResult {
    fn from(r: QueryCatalogResponse) -> Self {
        QueryResult {
            columns: r.columns,
            rows: r
                .rows
                .into_iter()
                .map(|row| {
                    row.values
                        .into_iter()
                        .map(|v| match v.value {
                            None | Some(Value::Null(_)) => SqlValue::Null,
                            Some(Value::Integer(i)) => SqlValue::Integer(i),
                            Some(Value::Real(f)) => SqlValue::Real(f),
                            Some(Value::Text(t)) => SqlValue::Text(t),
                            Some(Value::Blob(b)) => SqlValue::Blob(b),
                        })
                        .collect()
                })
                .collect(),
            truncated: r.truncated,
        }
    }
}

// ---- reports ----

/// The report's view of an inference job.
impl TryFrom<&Job> for ReportJob {
    type Error = Error;

    /// # Errors
    /// [`Error::InvalidArgument`] (field `job`) when the job is not an inference job.
    fn try_from(job: &Job) -> Result<Self> {
        let Some(Kind::Infer(spec)) = job.spec.as_ref().and_then(|s| s.kind.as_ref()) else {
            return Err(Error::invalid(
                "job",
                format!(
                    "`{}` is a {} job; reports are made for inference jobs",
                    job.id, job.kind
                ),
            ));
        };
        Ok(ReportJob {
            id: job.id.clone(),
            state: JobState::try_from(job.state)
                .map_or("UNKNOWN", |s| s.as_str_name())
                .trim_start_matches("JOB_STATE_")
                .to_string(),
            reason: job.reason.clone(),
            dataset: spec.dataset.clone(),
            model: spec.model.clone(),
            version: spec.version.clone(),
            refine_steps: spec.refine_steps,
            created_at: job.created_at.clone(),
            finished_at: job.finished_at.clone(),
        })
    }
}

// ---- training ----

impl TryFrom<&TrainSpec> for TrainConfig {
    type Error = Error;

    /// The training config a spec asks for (empty fields take the quickstart's defaults).
    fn try_from(spec: &TrainSpec) -> Result<TrainConfig> {
        let mut c = TrainConfig::default();
        if !spec.preset.is_empty() {
            c.preset = spec
                .preset
                .parse::<Preset>()
                .map_err(|e| Error::invalid("spec.train.preset", e.to_string()))?;
        }
        if !spec.loss.is_empty() {
            c.loss = spec
                .loss
                .parse::<LossPreset>()
                .map_err(|e| Error::invalid("spec.train.loss", e.to_string()))?;
        }
        if spec.epochs > 0 {
            c.epochs = spec.epochs as usize;
        }
        if spec.batch_size > 0 {
            c.batch_size = spec.batch_size as usize;
        }
        if spec.lr != 0.0 {
            c.lr = spec.lr;
        }
        match spec.size.as_slice() {
            [] => {}
            [x, y, z] => c.size = [*x as usize, *y as usize, *z as usize],
            _ => {
                return Err(Error::invalid(
                    "spec.train.size",
                    "expected three values X Y Z",
                ))
            }
        }
        match spec.window.as_slice() {
            [] => {}
            [a, b] => {
                c.window = Window {
                    a_min: *a as f32,
                    a_max: *b as f32,
                }
            }
            _ => {
                return Err(Error::invalid(
                    "spec.train.window",
                    "expected two values A_MIN A_MAX",
                ))
            }
        }
        if spec.val_fraction_set {
            c.val_fraction = spec.val_fraction;
        }
        c.seed = spec.seed;
        if spec.channels > 0 {
            c.num_channel_initial = spec.channels as usize;
        }
        if spec.checkpoint_every > 0 {
            c.checkpoint_every = spec.checkpoint_every as usize;
        }
        c.validate()
            .map_err(|e| Error::invalid("spec.train", e.to_string()))?;
        if !(0.0..1.0).contains(&c.val_fraction) {
            return Err(Error::invalid(
                "spec.train.val_fraction",
                format!("must be in [0, 1), got {}", c.val_fraction),
            ));
        }
        Ok(c)
    }
}

impl From<&TrainConfig> for TrainSpec {
    /// The spec of `config`: its fields set, the cluster's (dataset, model, workers, fault
    /// handling) left empty for the caller.
    fn from(c: &TrainConfig) -> Self {
        TrainSpec {
            preset: match c.preset {
                Preset::Seed => "seed",
                Preset::Full => "full",
            }
            .into(),
            loss: c.loss.name().into(),
            epochs: c.epochs as u32,
            batch_size: c.batch_size as u32,
            lr: c.lr,
            size: c.size.iter().map(|&v| v as u32).collect(),
            window: vec![f64::from(c.window.a_min), f64::from(c.window.a_max)],
            val_fraction: c.val_fraction,
            val_fraction_set: true,
            seed: c.seed,
            channels: c.num_channel_initial as u32,
            checkpoint_every: c.checkpoint_every as u32,
            ..TrainSpec::default()
        }
    }
}

// ---- inference ----

/// The instance optimisation an inference spec asks for: its fields over `medray predict`'s
/// defaults, validated.
///
/// # Errors
/// [`Error::InvalidArgument`] naming the option.
pub fn refine_options(spec: &InferSpec) -> Result<RefineOptions> {
    let overrides = spec
        .refine
        .as_ref()
        .map_or_else(RefineOverrides::default, |r| {
            RefineOverrides::new(r.sim.clone(), r.levels, r.lambda, r.grid, r.lr, r.mask)
        });
    overrides.options(spec.refine_steps as usize)
}

#[cfg(test)]
mod tests {
    use medray_core::results::{CaseStatus, Split};

    use super::*;

    #[test]
    fn a_results_row_survives_the_wire() {
        let wire = CaseResult {
            case_id: "case_001".into(),
            dataset: "d".into(),
            model_name: "m".into(),
            model_version: "v1".into(),
            status: "SUCCEEDED".into(),
            tre_mm: Some(1.25),
            job_id: "job-000001".into(),
            output_ddf: Some("results/m/v1/case_001_ddf.nii.gz".into()),
            output_transform: Some("results/m/v1/case_001_transform_lps_mm.nii.gz".into()),
            log_jac_std: Some(0.125),
            refine_steps: 3,
            split: Some("held-out".into()),
            created_at: "2025-01-01T00:00:00Z".into(),
            ..CaseResult::default()
        };
        let row = ResultRow::try_from(wire.clone()).unwrap();
        assert_eq!(
            (row.status, row.split, row.tre_mm, row.dice_score),
            (
                CaseStatus::Succeeded,
                Some(Split::HeldOut),
                Some(1.25),
                None
            )
        );
        assert_eq!(CaseResult::from(&row), wire);
        let bad = CaseResult {
            status: "DONE".into(),
            ..wire
        };
        assert!(ResultRow::try_from(bad)
            .unwrap_err()
            .to_string()
            .contains("status"));
    }

    #[test]
    fn a_filter_survives_the_wire_with_its_limit_capped() {
        let filter = ResultFilter {
            model: Some("m".into()),
            job_id: Some("job-000001".into()),
            order_by: Some("dice_score".into()),
            descending: true,
            limit: Some(10),
            ..ResultFilter::default()
        };
        assert_eq!(
            ResultFilter::from(ListResultsRequest::from(&filter)),
            filter
        );
        let unlimited = ResultFilter::from(ListResultsRequest::from(&ResultFilter::default()));
        assert_eq!(unlimited.limit, Some(MAX_ROWS as usize));
        let huge = ResultFilter {
            limit: Some(usize::MAX),
            ..ResultFilter::default()
        };
        assert_eq!(ListResultsRequest::from(&huge).limit, MAX_ROWS);
    }

    #[test]
    fn a_query_answer_survives_the_wire() {
        let q = QueryResult {
            columns: vec!["a".into(), "b".into()],
            rows: vec![
                vec![SqlValue::Null, SqlValue::Integer(3)],
                vec![SqlValue::Real(0.5), SqlValue::Blob(vec![1, 2])],
            ],
            truncated: true,
        };
        assert_eq!(QueryResult::from(QueryCatalogResponse::from(q.clone())), q);
    }

    #[test]
    fn only_inference_jobs_have_a_report() {
        let job = Job {
            id: "job-000002".into(),
            kind: "train".into(),
            ..Job::default()
        };
        let e = ReportJob::try_from(&job).unwrap_err().to_string();
        assert!(e.contains("`job-000002` is a train job"), "{e}");
    }

    /// `medray train-local` sends its config as a spec and the coordinator reads it back: the
    /// two conversions are inverse, and a bad spec names its field.
    #[test]
    fn a_train_config_survives_the_wire_and_a_bad_spec_names_its_field() {
        use medray_core::train::TrainConfig;
        let config = TrainConfig {
            preset: medray_core::localnet::Preset::Full,
            loss: "mse-dice-kp-be".parse().unwrap(),
            epochs: 7,
            batch_size: 3,
            lr: 2.5e-4,
            size: [48, 40, 32],
            window: medray_core::preprocess::Window {
                a_min: -900.0,
                a_max: 300.5,
            },
            val_fraction: 0.0,
            seed: 11,
            num_channel_initial: 6,
            checkpoint_every: 2,
        };
        let spec = crate::v1::TrainSpec::from(&config);
        assert_eq!(TrainConfig::try_from(&spec).unwrap(), config);
        let bad = crate::v1::TrainSpec {
            size: vec![16, 16],
            ..spec
        };
        let e = TrainConfig::try_from(&bad).unwrap_err().to_string();
        assert!(e.contains("spec.train.size"), "{e}");
    }
}
