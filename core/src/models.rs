//! The model registry: named LocalNet models with immutable versions, kept in the catalog
//! (tables of migration 3) and the stage.
//!
//! A version's weights are a safetensors file with MONAI `state_dict` names, stored at
//! `models/<name>/<version>/weights.safetensors` with its [`ModelConfig`] beside it
//! (`weights.json`, the layout [`crate::model::load_model`] reads). The catalog row records
//! where the weights came from (dataset, case split, job, epochs, best validation Dice, final
//! losses, the training config) and the weights' sha256, which [`load_weights`] checks. A
//! trained version also records the images of its training and validation cases
//! ([`provenance::TrainingData`]), so that results can say which cases were held out.
//!
//! Versions are `v1`, `v2`, ... per name (a number is never reused, even after a delete) or
//! an explicit name. A version is immutable: registering an existing one is refused.
//! Aliases (`production`, `staging`) point at one version each and can be moved.
//!
//! [`register_model`] validates everything first (the weights must load into a LocalNet built
//! from the config's network), then takes the catalog's write lock, writes the artifacts to
//! the stage and inserts the row, and commits. Holding the lock while the artifacts are
//! written makes "check the version is free, write, insert" atomic against every other
//! registration, in this process or another, so a concurrent registration can never
//! overwrite an artifact that a row points at; other catalog writers wait meanwhile (the
//! catalog's busy timeout is 10 s). If the insert or the commit fails, the artifacts just
//! written are deleted.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::catalog::{CaseId, Catalog, DatasetName};
use crate::localnet::LocalNet;
use crate::model::ModelConfig;
use crate::stage::{ObjectKey, Stage};
use crate::{Error, Result};

pub mod provenance;

pub use provenance::{Split, TrainingData};

/// The medray version recorded with every model version.
pub const MEDRAY_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Longest version or alias, characters.
pub const MAX_LABEL_CHARS: usize = 64;

fn check_label(field: &str, label: &str, max: usize) -> Result<()> {
    let ok = !label.is_empty()
        && label.len() <= max
        && !label.starts_with('.')
        && label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!("`{label}`: use 1-{max} of A-Z a-z 0-9 _ - . (not starting with `.`)"),
        ))
    }
}

/// Checks a model version: 1-64 of `A-Z a-z 0-9 _ - .`, not starting with `.`.
///
/// # Errors
/// [`Error::InvalidArgument`] naming `model version`.
pub fn validate_version(version: &str) -> Result<()> {
    check_label("model version", version, MAX_LABEL_CHARS)
}

/// Checks an alias with the rule of [`validate_version`].
///
/// # Errors
/// [`Error::InvalidArgument`] naming `model alias`.
pub fn validate_alias(alias: &str) -> Result<()> {
    check_label("model alias", alias, MAX_LABEL_CHARS)
}

/// The name of a model (also its folder in the stage: `models/<name>/`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ModelName(String);

impl ModelName {
    /// Validates `name`: 1-128 of `A-Z a-z 0-9 _ - .`, not starting with `.` (the rule of
    /// [`DatasetName`]).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `model name`.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        check_label("model name", &name, 128)?;
        Ok(Self(name))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ModelName {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Self::new(s)
    }
}

impl From<ModelName> for String {
    fn from(n: ModelName) -> Self {
        n.0
    }
}

impl std::fmt::Display for ModelName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a model version came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelSource {
    /// Registered by a medray training job.
    Trained,
    /// Imported weights (e.g. trained in MONAI).
    Imported,
}

impl ModelSource {
    /// `trained` or `imported`.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelSource::Trained => "trained",
            ModelSource::Imported => "imported",
        }
    }
}

impl std::str::FromStr for ModelSource {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "trained" => Ok(ModelSource::Trained),
            "imported" => Ok(ModelSource::Imported),
            other => Err(Error::invalid(
                "model source",
                format!("`{other}` is not one of: trained, imported"),
            )),
        }
    }
}

/// Which version of a model to use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VersionRef {
    /// The most recently registered version.
    Latest,
    /// This version.
    Version(String),
    /// The version this alias points at.
    Alias(String),
}

impl VersionRef {
    /// `--version` / `--alias` as a reference: at most one may be given; neither is
    /// [`VersionRef::Latest`].
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if both are given.
    pub fn from_options(version: Option<String>, alias: Option<String>) -> Result<Self> {
        match (version, alias) {
            (Some(_), Some(_)) => Err(Error::invalid(
                "version",
                "name a version or an alias, not both",
            )),
            (Some(v), None) => Ok(VersionRef::Version(v)),
            (None, Some(a)) => Ok(VersionRef::Alias(a)),
            (None, None) => Ok(VersionRef::Latest),
        }
    }
}

impl std::fmt::Display for VersionRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VersionRef::Latest => f.write_str("latest version"),
            VersionRef::Version(v) => write!(f, "version `{v}`"),
            VersionRef::Alias(a) => write!(f, "alias `{a}`"),
        }
    }
}

/// A model version to register (see [`register_model`]).
#[derive(Clone, Debug)]
pub struct NewModelVersion {
    /// The model.
    pub name: ModelName,
    /// The version; `None`: the next `vN` of this name.
    pub version: Option<String>,
    /// Architecture, preprocessing (window, size) and loss.
    pub model_config: ModelConfig,
    /// The weights: a safetensors file with MONAI `state_dict` names.
    pub weights: Vec<u8>,
    /// The full training config, JSON (stored as given; must parse as JSON).
    pub train_config_json: String,
    /// The dataset it was trained on; empty when unknown (an import).
    pub dataset: String,
    /// Training case ids.
    pub train_cases: Vec<String>,
    /// Validation case ids.
    pub val_cases: Vec<String>,
    /// The training job, if any.
    pub job_id: Option<String>,
    /// Epochs trained.
    pub epochs: u32,
    /// Best validation Dice over the epochs (0..=1), if validated.
    pub best_val_dice: Option<f64>,
    /// The last epoch's losses, JSON (stored as given; must parse as JSON).
    pub final_losses_json: String,
    /// Trained here or imported.
    pub source: ModelSource,
    /// The data it was trained on; `None` when unknown (an import). Must agree with
    /// `dataset`, `train_cases` and `val_cases`.
    pub training_data: Option<TrainingData>,
}

impl NewModelVersion {
    /// Imported weights (e.g. trained in MONAI): no dataset, case split, job, epochs or
    /// losses; `train_config_json` records where they came from (`{}` when nothing is
    /// known).
    pub fn imported(
        name: ModelName,
        version: Option<String>,
        model_config: ModelConfig,
        weights: Vec<u8>,
        train_config_json: String,
    ) -> Self {
        Self {
            name,
            version,
            model_config,
            weights,
            train_config_json,
            dataset: String::new(),
            train_cases: Vec::new(),
            val_cases: Vec::new(),
            job_id: None,
            epochs: 0,
            best_val_dice: None,
            final_losses_json: "{}".into(),
            source: ModelSource::Imported,
            training_data: None,
        }
    }
}

/// One registered model version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelVersion {
    /// The model.
    pub name: ModelName,
    /// The version.
    pub version: String,
    /// `seed`, `full` (the [`crate::localnet::Preset`] whose extract levels the network
    /// has) or `custom`.
    pub preset: String,
    /// Architecture, preprocessing and loss.
    pub model_config: ModelConfig,
    /// The training config, JSON.
    pub train_config_json: String,
    /// The training dataset; empty when unknown.
    pub dataset: String,
    /// Training case ids.
    pub train_cases: Vec<String>,
    /// Validation case ids.
    pub val_cases: Vec<String>,
    /// The training job, if any.
    pub job_id: Option<String>,
    /// Epochs trained.
    pub epochs: u32,
    /// Best validation Dice, if validated.
    pub best_val_dice: Option<f64>,
    /// The last epoch's losses, JSON.
    pub final_losses_json: String,
    /// Stage key of the weights.
    pub artifact_key: ObjectKey,
    /// sha256 of the weights, hex.
    pub artifact_sha256: String,
    /// Size of the weights, bytes.
    pub artifact_bytes: u64,
    /// Stage key of the [`ModelConfig`] JSON.
    pub config_key: ObjectKey,
    /// Trained here or imported.
    pub source: ModelSource,
    /// When it was registered, RFC 3339 UTC.
    pub created_at: String,
    /// The medray that registered it.
    pub medray_version: String,
    /// Aliases pointing at it, sorted.
    pub aliases: Vec<String>,
    /// The data it was trained on; `None` when unknown (imported weights, versions
    /// registered before medray recorded it).
    #[serde(default)]
    pub training_data: Option<TrainingData>,
}

/// The stage key of a version's weights.
///
/// # Errors
/// [`Error::InvalidArgument`] for an invalid version.
pub fn weights_key(name: &ModelName, version: &str) -> Result<ObjectKey> {
    validate_version(version)?;
    ObjectKey::new(format!("models/{name}/{version}/weights.safetensors"))
}

/// The stage key of a version's [`ModelConfig`] JSON (beside the weights).
///
/// # Errors
/// [`Error::InvalidArgument`] for an invalid version.
pub fn config_key(name: &ModelName, version: &str) -> Result<ObjectKey> {
    validate_version(version)?;
    ObjectKey::new(format!("models/{name}/{version}/weights.json"))
}

/// The preset a network config corresponds to: `seed`, `full` or `custom`.
pub fn preset_label(config: &ModelConfig) -> &'static str {
    match config.network.extract_levels.as_slice() {
        [3] => "seed",
        [0, 1, 2, 3] => "full",
        _ => "custom",
    }
}

/// Checks that `weights` is a safetensors file that loads into a LocalNet built from
/// `config.network` (every tensor present with its shape, none extra, all finite). Errors
/// name `label` as the file and the offending tensor. Runs on the calling thread: call it
/// from a blocking context.
///
/// # Errors
/// [`Error::Weights`] naming the tensor; [`Error::InvalidArgument`] for an invalid config.
pub fn validate_weights(weights: &[u8], config: &ModelConfig, label: &Path) -> Result<()> {
    config.network.validate()?;
    let tensors: HashMap<String, candle_core::Tensor> =
        candle_core::safetensors::load_buffer(weights, &Device::Cpu).map_err(|e| {
            Error::Weights {
                path: label.to_path_buf(),
                tensor: "*".into(),
                reason: format!("not a readable safetensors file: {e}"),
            }
        })?;
    let net = LocalNet::new(&config.network, 0, DType::F32, &Device::Cpu)?;
    net.load_tensors(&tensors, label)
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn json_field(field: &str, text: &str) -> Result<()> {
    serde_json::from_str::<serde_json::Value>(text)
        .map(|_| ())
        .map_err(|e| Error::invalid(field, format!("not valid JSON: {e}")))
}

/// Checks every field of `new` except the weights.
fn validate_new(new: &NewModelVersion) -> Result<()> {
    if let Some(v) = &new.version {
        validate_version(v)?;
    }
    new.model_config.network.validate()?;
    new.model_config.preprocess.validate()?;
    json_field("train_config_json", &new.train_config_json)?;
    json_field("final_losses_json", &new.final_losses_json)?;
    if !new.dataset.is_empty() {
        DatasetName::new(new.dataset.clone())?;
    }
    for id in new.train_cases.iter().chain(&new.val_cases) {
        CaseId::new(id.clone())?;
    }
    if let Some(job) = &new.job_id {
        check_label("job id", job, MAX_LABEL_CHARS)?;
    }
    if let Some(t) = &new.training_data {
        t.validate()?;
        if t.dataset != new.dataset
            || t.train_ids() != new.train_cases
            || t.validation_ids() != new.val_cases
        {
            return Err(Error::invalid(
                "training_data",
                "its dataset and cases differ from the version's dataset, train_cases and val_cases",
            ));
        }
    }
    if let Some(d) = new.best_val_dice {
        if !(d.is_finite() && (0.0..=1.0).contains(&d)) {
            return Err(Error::invalid(
                "best_val_dice",
                format!("{d}: expected a Dice in [0, 1]"),
            ));
        }
    }
    if new.weights.is_empty() {
        return Err(Error::invalid("weights", "empty"));
    }
    Ok(())
}

/// The `N` of a `vN` version.
fn version_number(version: &str) -> Option<i64> {
    let digits = version.strip_prefix('v')?;
    if digits.is_empty() || digits.len() > 15 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

const VERSION_COLUMNS: &str = "v.name, v.version, v.preset, v.model_config, v.train_config,
    v.dataset, v.train_cases, v.val_cases, v.job_id, v.epochs, v.best_val_dice,
    v.final_losses, v.artifact_key, v.artifact_sha256, v.artifact_bytes, v.config_key,
    v.source, v.created_at, v.medray_version,
    (SELECT group_concat(alias, char(10)) FROM
        (SELECT alias FROM model_aliases a
         WHERE a.name = v.name AND a.version = v.version ORDER BY alias)),
    v.training_data";

fn conversion<E: std::error::Error + Send + Sync + 'static>(idx: usize, e: E) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e))
}

fn version_from(row: &rusqlite::Row<'_>) -> rusqlite::Result<ModelVersion> {
    let json = |idx: usize| -> rusqlite::Result<Vec<String>> {
        serde_json::from_str(&row.get::<_, String>(idx)?).map_err(|e| conversion(idx, e))
    };
    let aliases: Option<String> = row.get(19)?;
    Ok(ModelVersion {
        name: ModelName::new(row.get::<_, String>(0)?).map_err(|e| conversion(0, e))?,
        version: row.get(1)?,
        preset: row.get(2)?,
        model_config: serde_json::from_str(&row.get::<_, String>(3)?)
            .map_err(|e| conversion(3, e))?,
        train_config_json: row.get(4)?,
        dataset: row.get(5)?,
        train_cases: json(6)?,
        val_cases: json(7)?,
        job_id: row.get(8)?,
        epochs: row.get::<_, i64>(9)? as u32,
        best_val_dice: row.get(10)?,
        final_losses_json: row.get(11)?,
        artifact_key: ObjectKey::new(row.get::<_, String>(12)?).map_err(|e| conversion(12, e))?,
        artifact_sha256: row.get(13)?,
        artifact_bytes: row.get::<_, i64>(14)? as u64,
        config_key: ObjectKey::new(row.get::<_, String>(15)?).map_err(|e| conversion(15, e))?,
        source: row
            .get::<_, String>(16)?
            .parse()
            .map_err(|e| conversion(16, e))?,
        created_at: row.get(17)?,
        medray_version: row.get(18)?,
        aliases: aliases
            .map(|a| a.split('\n').map(str::to_string).collect())
            .unwrap_or_default(),
        training_data: row
            .get::<_, Option<String>>(20)?
            .map(|t| serde_json::from_str(&t).map_err(|e| conversion(20, e)))
            .transpose()?,
    })
}

fn find_version(
    conn: &Connection,
    name: &ModelName,
    version: &str,
) -> Result<Option<ModelVersion>> {
    conn.query_row(
        &format!(
            "SELECT {VERSION_COLUMNS} FROM model_versions v WHERE v.name = ?1 AND v.version = ?2"
        ),
        params![name.as_str(), version],
        version_from,
    )
    .optional()
    .map_err(|e| Error::catalog("read model version", e))
}

fn not_found(name: &ModelName, which: &VersionRef) -> Error {
    Error::ModelNotFound {
        name: name.to_string(),
        version: match which {
            VersionRef::Latest => None,
            other => Some(other.to_string()),
        },
    }
}

/// Every registered version of every model, by name then registration order.
///
/// # Errors
/// [`Error::Catalog`] if SQLite fails.
pub fn list_models(catalog: &Catalog) -> Result<Vec<ModelVersion>> {
    let mut stmt = catalog
        .conn()
        .prepare(&format!(
            "SELECT {VERSION_COLUMNS} FROM model_versions v ORDER BY v.name, v.id"
        ))
        .map_err(|e| Error::catalog("list models", e))?;
    let rows = stmt
        .query_map([], version_from)
        .map_err(|e| Error::catalog("list models", e))?;
    rows.collect::<rusqlite::Result<Vec<_>>>()
        .map_err(|e| Error::catalog("list models", e))
}

/// One version of a model: the latest registered, a named version, or an alias's target.
///
/// # Errors
/// [`Error::ModelNotFound`] naming the model and the version or alias;
/// [`Error::InvalidArgument`] for an invalid version or alias; [`Error::Catalog`].
pub fn model_version(
    catalog: &Catalog,
    name: &ModelName,
    which: &VersionRef,
) -> Result<ModelVersion> {
    let conn = catalog.conn();
    let found = match which {
        VersionRef::Latest => conn
            .query_row(
                &format!(
                    "SELECT {VERSION_COLUMNS} FROM model_versions v WHERE v.name = ?1
                     ORDER BY v.id DESC LIMIT 1"
                ),
                [name.as_str()],
                version_from,
            )
            .optional()
            .map_err(|e| Error::catalog("read model version", e))?,
        VersionRef::Version(v) => {
            validate_version(v)?;
            find_version(conn, name, v)?
        }
        VersionRef::Alias(a) => {
            validate_alias(a)?;
            conn.query_row(
                &format!(
                    "SELECT {VERSION_COLUMNS} FROM model_versions v JOIN model_aliases a
                     ON a.name = v.name AND a.version = v.version
                     WHERE a.name = ?1 AND a.alias = ?2"
                ),
                params![name.as_str(), a],
                version_from,
            )
            .optional()
            .map_err(|e| Error::catalog("read model alias", e))?
        }
    };
    found.ok_or_else(|| not_found(name, which))
}

/// The catalog's write lock (`BEGIN IMMEDIATE`), rolled back on drop unless committed, so a
/// failed or cancelled registration leaves the connection usable and nothing written.
struct WriteLock<'a> {
    catalog: &'a mut Catalog,
    open: bool,
}

impl<'a> WriteLock<'a> {
    fn begin(catalog: &'a mut Catalog) -> Result<Self> {
        catalog
            .conn()
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| Error::catalog("begin model registration", e))?;
        Ok(Self {
            catalog,
            open: true,
        })
    }

    fn conn(&self) -> &Connection {
        self.catalog.conn()
    }

    fn commit(mut self) -> Result<()> {
        self.open = false;
        if let Err(e) = self.catalog.conn().execute_batch("COMMIT") {
            let _ = self.catalog.conn().execute_batch("ROLLBACK");
            return Err(Error::catalog("commit model registration", e));
        }
        Ok(())
    }
}

impl Drop for WriteLock<'_> {
    fn drop(&mut self) {
        if self.open {
            if let Err(e) = self.catalog.conn().execute_batch("ROLLBACK") {
                tracing::warn!(error = %e, "rolling back a model registration failed");
            }
        }
    }
}

/// Under the write lock: the version to register (refusing an existing one) and the
/// model's new `last_number`.
fn claim_version(conn: &Connection, new: &NewModelVersion) -> Result<(String, i64)> {
    let last: i64 = conn
        .query_row(
            "SELECT last_number FROM models WHERE name = ?1",
            [new.name.as_str()],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| Error::catalog("read model", e))?
        .unwrap_or(0);
    let version = match &new.version {
        Some(v) => v.clone(),
        None => format!("v{}", last + 1),
    };
    if let Some(existing) = find_version(conn, &new.name, &version)? {
        return Err(Error::ModelVersionExists {
            name: new.name.to_string(),
            version,
            existing_sha256: existing.artifact_sha256,
        });
    }
    let last = last.max(version_number(&version).unwrap_or(0));
    Ok((version, last))
}

/// The row of a new version (under the write lock).
struct Row<'a> {
    new: &'a NewModelVersion,
    version: &'a str,
    last_number: i64,
    config_json: &'a str,
    weights_key: &'a ObjectKey,
    config_key: &'a ObjectKey,
    sha256: &'a str,
}

fn insert_version(conn: &Connection, row: &Row<'_>) -> Result<()> {
    let new = row.new;
    let err = |e| Error::catalog("insert model version", e);
    conn.execute(
        "INSERT INTO models (name, created_at, last_number)
         VALUES (?1, strftime('%Y-%m-%dT%H:%M:%SZ', 'now'), ?2)
         ON CONFLICT (name) DO UPDATE SET last_number = excluded.last_number",
        params![new.name.as_str(), row.last_number],
    )
    .map_err(err)?;
    let training_data = new
        .training_data
        .as_ref()
        .map(|t| {
            serde_json::to_string(t).map_err(|source| Error::Json {
                path: "model training data".into(),
                source,
            })
        })
        .transpose()?;
    let cases = |c: &Vec<String>| {
        serde_json::to_string(c).map_err(|source| Error::Json {
            path: "model cases".into(),
            source,
        })
    };
    conn.execute(
        "INSERT INTO model_versions (name, version, preset, model_config, train_config, dataset,
            train_cases, val_cases, job_id, epochs, best_val_dice, final_losses, artifact_key,
            artifact_sha256, artifact_bytes, config_key, source, created_at, medray_version,
            training_data)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
            strftime('%Y-%m-%dT%H:%M:%SZ', 'now'), ?18, ?19)",
        params![
            new.name.as_str(),
            row.version,
            preset_label(&new.model_config),
            row.config_json,
            new.train_config_json,
            new.dataset,
            cases(&new.train_cases)?,
            cases(&new.val_cases)?,
            new.job_id,
            i64::from(new.epochs),
            new.best_val_dice,
            new.final_losses_json,
            row.weights_key.as_str(),
            row.sha256,
            new.weights.len() as i64,
            row.config_key.as_str(),
            new.source.as_str(),
            MEDRAY_VERSION,
            training_data,
        ],
    )
    .map_err(err)?;
    Ok(())
}

/// Registers a model version: validates it (the weights must load into a LocalNet built
/// from `model_config.network`), writes its weights and config to the stage, then records
/// it in the catalog, all under the catalog's write lock (see the module docs).
///
/// # Errors
/// [`Error::InvalidArgument`] naming the field; [`Error::Weights`] naming the tensor;
/// [`Error::ModelVersionExists`] if the version is taken (nothing changes then);
/// [`Error::Stage`] / [`Error::Catalog`] if storing fails (the artifacts just written are
/// deleted, nothing stored before is touched).
#[tracing::instrument(skip(stage, catalog, new), fields(model = %new.name, version = ?new.version))]
pub async fn register_model(
    stage: &Stage,
    catalog: &mut Catalog,
    new: NewModelVersion,
) -> Result<ModelVersion> {
    validate_new(&new)?;
    let label = match &new.version {
        Some(v) => format!("of model `{}` version `{v}`", new.name),
        None => format!("of model `{}` (next version)", new.name),
    };
    let new = tokio::task::spawn_blocking(move || {
        validate_weights(&new.weights, &new.model_config, Path::new(&label)).map(|()| new)
    })
    .await
    .map_err(|e| Error::invalid("weights", format!("validation did not finish: {e}")))??;
    let config_json =
        serde_json::to_string_pretty(&new.model_config).map_err(|source| Error::Json {
            path: "model config".into(),
            source,
        })?;
    let sha256 = sha256_hex(&new.weights);

    let lock = WriteLock::begin(catalog)?;
    let (version, last_number) = claim_version(lock.conn(), &new)?;
    let weights_key = weights_key(&new.name, &version)?;
    let config_key = config_key(&new.name, &version)?;
    // The version is free and we hold the write lock: any object at these keys is left over
    // from a registration that never committed, so writing over it loses nothing.
    let stored = async {
        stage.put(&weights_key, &new.weights).await?;
        stage.put(&config_key, config_json.as_bytes()).await?;
        insert_version(
            lock.conn(),
            &Row {
                new: &new,
                version: &version,
                last_number,
                config_json: &config_json,
                weights_key: &weights_key,
                config_key: &config_key,
                sha256: &sha256,
            },
        )?;
        lock.commit()
    }
    .await;
    if let Err(e) = stored {
        for key in [&weights_key, &config_key] {
            if let Err(d) = stage.delete(key).await {
                tracing::warn!(key = %key, error = %d, "could not delete the artifact of a failed registration");
            }
        }
        return Err(e);
    }
    tracing::info!(version = %version, sha256 = %sha256, bytes = new.weights.len(), "model registered");
    model_version(catalog, &new.name, &VersionRef::Version(version))
}

/// Fetches a version's weights from the stage and checks them against the recorded size and
/// sha256.
///
/// # Errors
/// [`Error::ArtifactMismatch`] if they differ; [`Error::Stage`], [`Error::Decrypt`] or
/// [`Error::WrongStageKey`] if the object cannot be read.
pub async fn load_weights(stage: &Stage, version: &ModelVersion) -> Result<Vec<u8>> {
    let data = stage.get(&version.artifact_key).await?;
    let got = sha256_hex(&data);
    if got != version.artifact_sha256 || data.len() as u64 != version.artifact_bytes {
        return Err(Error::ArtifactMismatch {
            object: version.artifact_key.to_string(),
            expected: version.artifact_sha256.clone(),
            got,
            expected_bytes: version.artifact_bytes,
            got_bytes: data.len() as u64,
        });
    }
    Ok(data)
}

/// Points `alias` of model `name` at `version` (moving it if it pointed elsewhere). Returns
/// the version it pointed at before, if any.
///
/// # Errors
/// [`Error::ModelNotFound`] if the version does not exist; [`Error::InvalidArgument`] for
/// an invalid alias or version; [`Error::Catalog`].
pub fn set_alias(
    catalog: &mut Catalog,
    name: &ModelName,
    alias: &str,
    version: &str,
) -> Result<Option<String>> {
    validate_alias(alias)?;
    validate_version(version)?;
    let lock = WriteLock::begin(catalog)?;
    if find_version(lock.conn(), name, version)?.is_none() {
        return Err(not_found(name, &VersionRef::Version(version.to_string())));
    }
    let previous: Option<String> = lock
        .conn()
        .query_row(
            "SELECT version FROM model_aliases WHERE name = ?1 AND alias = ?2",
            params![name.as_str(), alias],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| Error::catalog("read model alias", e))?;
    lock.conn()
        .execute(
            "INSERT INTO model_aliases (name, alias, version, updated_at)
             VALUES (?1, ?2, ?3, strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
             ON CONFLICT (name, alias) DO UPDATE
             SET version = excluded.version, updated_at = excluded.updated_at",
            params![name.as_str(), alias, version],
        )
        .map_err(|e| Error::catalog("set model alias", e))?;
    lock.commit()?;
    Ok(previous)
}

/// Deletes a model version: refused while aliases point at it unless `force` (which removes
/// those aliases too). The catalog row goes first, then the artifacts. Returns the deleted
/// version.
///
/// # Errors
/// [`Error::ModelNotFound`]; [`Error::ModelVersionAliased`] naming the aliases;
/// [`Error::Catalog`]; [`Error::Stage`] if the artifacts cannot be deleted (the version is
/// gone from the catalog then, the error names the object left behind).
pub async fn delete_version(
    stage: &Stage,
    catalog: &mut Catalog,
    name: &ModelName,
    version: &str,
    force: bool,
) -> Result<ModelVersion> {
    validate_version(version)?;
    let deleted = {
        let lock = WriteLock::begin(catalog)?;
        let found = find_version(lock.conn(), name, version)?
            .ok_or_else(|| not_found(name, &VersionRef::Version(version.to_string())))?;
        if !found.aliases.is_empty() && !force {
            return Err(Error::ModelVersionAliased {
                name: name.to_string(),
                version: version.to_string(),
                aliases: found.aliases,
            });
        }
        let err = |e| Error::catalog("delete model version", e);
        lock.conn()
            .execute(
                "DELETE FROM model_aliases WHERE name = ?1 AND version = ?2",
                params![name.as_str(), version],
            )
            .map_err(err)?;
        lock.conn()
            .execute(
                "DELETE FROM model_versions WHERE name = ?1 AND version = ?2",
                params![name.as_str(), version],
            )
            .map_err(err)?;
        lock.commit()?;
        found
    };
    stage.delete(&deleted.artifact_key).await?;
    stage.delete(&deleted.config_key).await?;
    tracing::info!(model = %name, version, "model version deleted");
    Ok(deleted)
}

#[cfg(test)]
mod tests;
