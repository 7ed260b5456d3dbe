//! Wire <-> domain conversions of the model registry: [`ModelVersion`] and
//! [`ModelVersionInfo`], and [`ModelRef`] to a name and a [`VersionRef`]. The CLI uses the
//! same functions, so that `medray models` prints the same locally and through the head.

use medray_core::model::ModelConfig;
use medray_core::models::{ModelName, ModelVersion, VersionRef};
use medray_core::stage::ObjectKey;
use medray_proto::v1::{ModelRef, ModelVersionInfo};

/// The wire form of a registered version.
#[must_use]
pub fn model_version_info(v: &ModelVersion) -> ModelVersionInfo {
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

fn missing(field: &str) -> medray_core::Error {
    medray_core::Error::invalid(field, "missing")
}

/// The domain form of a version the head sent (a function: `TryFrom` cannot be implemented
/// here, both types being foreign).
///
/// # Errors
/// [`medray_core::Error::InvalidArgument`] naming the field that is missing or invalid.
pub fn model_version_from_info(info: ModelVersionInfo) -> medray_core::Result<ModelVersion> {
    if info.version.is_empty() {
        return Err(missing("version"));
    }
    let model_config: ModelConfig = serde_json::from_str(&info.model_config_json)
        .map_err(|e| medray_core::Error::invalid("model_config_json", e.to_string()))?;
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
            .map_err(|e| medray_core::Error::invalid("training_data_json", e.to_string()))?,
    })
}

/// The model and version a [`ModelRef`] names.
///
/// # Errors
/// [`medray_core::Error::InvalidArgument`] for an invalid name, or both a version and an
/// alias.
pub fn version_ref(r: ModelRef) -> medray_core::Result<(ModelName, VersionRef)> {
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
