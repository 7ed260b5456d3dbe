//! Dataset ingestion: validate a Learn2Reg-layout folder, a folder described by a manifest
//! CSV ([`manifest`]), the Learn2Reg archive downloaded from a URL ([`download()`],
//! [`archive`]), the DIR-Lab 4D CT / COPDGene benchmarks ([`dirlab`]: raw volumes and
//! landmark files converted to NIfTI and keypoint pairs first), the Learn2Reg 2022 NLST
//! layout ([`nlst`]) or freshly generated phantoms, store its files in a [`Stage`] and
//! publish it in the [`Catalog`]. Every source ends in the same folder ingestion, so
//! validation, storage and publishing are shared; a case that cannot be converted is a bad
//! case like one that fails validation.
//!
//! The order is what makes a failed ingest invisible:
//! 1. every file of every case is validated ([`validate`]); a bad case stops the ingest
//!    unless `skip_bad` is set, and then it is left out; a scan given as a DICOM series
//!    folder is first converted to a NIfTI file in a temporary folder ([`convert`]), and that
//!    file is what is validated and stored;
//! 2. identical content already published under the name is a no-op; other content needs
//!    `replace`;
//! 3. the files are stored (their hash re-checked against the validated one); any failure
//!    deletes the objects already written;
//! 4. the dataset and its cases are published in one catalog transaction; a failure deletes
//!    the objects; a replacement deletes the old version's objects after the commit.
//!
//! Objects go under `datasets/<name>/` (`scansExp/`, `scansInsp/`, `lungMasksExp/`,
//! `lungMasksInsp/`, `keypoints/`), named after the case whatever the source file was called:
//! `<case>_exp.nii.gz` (or `.nii`), `<case>_insp.nii.gz`, `<case>.csv`. A replacement is written beside the current version under
//! `datasets/<name>/v-<first 12 hex digits of its content sha256>/` so that the switch is the
//! catalog transaction alone; the catalog records every object key. One ingest per dataset
//! name at a time.

pub mod archive;
pub mod convert;
pub mod dirlab;
pub mod download;
pub mod manifest;
pub mod nlst;
pub mod validate;

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::catalog::{CaseRecord, Catalog, DatasetName, NewDataset, PublishOutcome, StoredFile};
use crate::dataset::{CaseFiles, Learn2RegDataset};
use crate::stage::{ObjectKey, Stage};
use crate::synth::SynthConfig;
use crate::{Error, Result};

pub use archive::{extract_learn2reg, ExtractLimits, Extracted};
pub use dirlab::{DirLabConfig, DirLabEntry, DirLabTable, DIRLAB_HU_OFFSET};
pub use download::{download, DownloadConfig, Downloaded};
pub use manifest::{read_manifest, MANIFEST_FILE};
pub use nlst::{NlstConfig, DEFAULT_PAIR_LISTS, NLST_JSON};
pub use validate::{validate_case, BadCase, FileKind, ValidCase};

/// Where `medray ingest learn2reg` downloads from by default: the Learn2Reg 2020 task 2
/// (lung CT) training archive on Zenodo.
pub const LEARN2REG_URL: &str = "https://zenodo.org/record/3835682/files/training.zip";

/// Formats bad cases one per line: `case_001: path: reason`.
pub fn format_bad_cases(cases: &[BadCase]) -> String {
    cases
        .iter()
        .map(|c| format!("  {c}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Options of an ingest.
#[derive(Clone, Debug, Default)]
pub struct IngestOptions {
    /// Dataset name; the default is the source's name.
    pub name: Option<DatasetName>,
    /// Publish the valid cases and list the bad ones instead of refusing the dataset.
    pub skip_bad: bool,
    /// Replace a dataset of the same name that has other content.
    pub replace: bool,
}

impl IngestOptions {
    /// Sets the dataset name.
    pub fn with_name(mut self, name: DatasetName) -> Self {
        self.name = Some(name);
        self
    }

    /// Sets `skip_bad`.
    pub fn with_skip_bad(mut self, skip_bad: bool) -> Self {
        self.skip_bad = skip_bad;
        self
    }

    /// Sets `replace`.
    pub fn with_replace(mut self, replace: bool) -> Self {
        self.replace = replace;
        self
    }
}

/// The phase an ingest is in, reported to the progress callback with `(done, total)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IngestPhase {
    /// Downloading an archive (bytes; the total is 0 while unknown).
    Download,
    /// Extracting an archive (bytes).
    Extract,
    /// Generating synthetic cases (cases).
    Generate,
    /// Converting benchmark files to NIfTI volumes and keypoint pairs (cases).
    Convert,
    /// Validating cases (cases).
    Validate,
    /// Storing files (bytes).
    Store,
}

/// What an ingest did.
#[derive(Clone, Debug)]
pub struct IngestReport {
    /// The dataset's name.
    pub name: DatasetName,
    /// What publishing did.
    pub outcome: PublishOutcome,
    /// Number of cases published (or already there, for [`PublishOutcome::Unchanged`]).
    pub cases: usize,
    /// Cases left out with `skip_bad`.
    pub bad: Vec<BadCase>,
    /// Plaintext bytes of the dataset's files.
    pub bytes: u64,
    /// Objects written to the stage by this ingest (0 when unchanged).
    pub objects_written: usize,
    /// The dataset's content sha256.
    pub content_sha256: String,
}

fn default_name(dir: &Path) -> Result<DatasetName> {
    let base = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    DatasetName::new(base.clone()).map_err(|_| {
        Error::invalid(
            "dataset name",
            format!("cannot derive a dataset name from `{base}`; pass --name"),
        )
    })
}

/// The content hash of a dataset: sha256 over `case_id kind sha256` lines in case order.
fn content_sha256(cases: &[ValidCase]) -> String {
    let mut h = Sha256::new();
    for c in cases {
        for f in &c.files {
            h.update(format!("{} {} {}\n", c.case_id, f.kind.folder(), f.sha256));
        }
    }
    hex::encode(h.finalize())
}

/// Ingests the folder `dir`: described by `dir/manifest.csv` if there is one (or `dir` is
/// itself a manifest CSV file, see [`manifest`]), else in the Learn2Reg layout (see
/// [`crate::dataset`]). The default name is the folder's name.
///
/// # Errors
/// [`Error::Manifest`] for a bad manifest row; [`Error::BadCases`] if a case is invalid and
/// `skip_bad` is not set (nothing published, nothing left in the stage);
/// [`Error::DatasetExists`] for other content under the name without `replace`;
/// [`Error::Stage`] / [`Error::Catalog`] if storing or publishing fails (the objects written
/// are deleted).
pub async fn ingest_dir(
    stage: &Stage,
    catalog: &mut Catalog,
    dir: &Path,
    options: &IngestOptions,
    progress: impl FnMut(IngestPhase, u64, u64),
) -> Result<IngestReport> {
    if dir.is_file() {
        return ingest_manifest(stage, catalog, dir, options, progress).await;
    }
    let manifest = dir.join(MANIFEST_FILE);
    if manifest.is_file() {
        return ingest_manifest(stage, catalog, &manifest, options, progress).await;
    }
    let name = match &options.name {
        Some(n) => n.clone(),
        None => default_name(dir)?,
    };
    let source = format!("dir:{}", dir.display());
    let cases = Learn2RegDataset::open(dir)?.cases;
    ingest_cases(stage, catalog, cases, &name, &source, options, progress).await
}

/// Ingests the cases listed in the manifest CSV `path` (see [`manifest`]). The default name
/// is the name of the manifest's folder.
///
/// # Errors
/// As [`ingest_dir`].
pub async fn ingest_manifest(
    stage: &Stage,
    catalog: &mut Catalog,
    path: &Path,
    options: &IngestOptions,
    progress: impl FnMut(IngestPhase, u64, u64),
) -> Result<IngestReport> {
    let cases = read_manifest(path)?;
    let name = match &options.name {
        Some(n) => n.clone(),
        None => default_name(
            path.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new(".")),
        )?,
    };
    let source = format!("manifest:{}", path.display());
    ingest_cases(stage, catalog, cases, &name, &source, options, progress).await
}

/// Where and how [`ingest_learn2reg`] fetches the archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Learn2RegConfig {
    /// The download (URL, retries, checksums).
    pub download: DownloadConfig,
    /// Limits on the archive's expansion.
    pub limits: ExtractLimits,
    /// Folder for the downloaded archive and its extraction (`<data-dir>/downloads` in the
    /// CLI). An interrupted download stays here and is resumed by the next run.
    pub work_dir: PathBuf,
}

impl Learn2RegConfig {
    /// The default URL ([`LEARN2REG_URL`]), default download settings and limits.
    pub fn new(work_dir: impl Into<PathBuf>) -> Self {
        Self {
            download: DownloadConfig::new(LEARN2REG_URL),
            limits: ExtractLimits::default(),
            work_dir: work_dir.into(),
        }
    }

    /// Sets the download settings.
    pub fn with_download(mut self, download: DownloadConfig) -> Self {
        self.download = download;
        self
    }

    /// Sets the extraction limits.
    pub fn with_limits(mut self, limits: ExtractLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The archive's path in the work folder: one per URL, so that a rerun with the same URL
    /// resumes an interrupted download.
    pub fn archive_path(&self) -> PathBuf {
        let digest = hex::encode(Sha256::digest(self.download.url.as_bytes()));
        self.work_dir
            .join(format!("learn2reg-{}.zip", &digest[..16]))
    }
}

/// Removes a file when dropped (the downloaded archive, once used or refused).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.0.display(), error = %e, "could not remove");
            }
        }
    }
}

/// Downloads the Learn2Reg archive (resuming an interrupted download, verifying the
/// expected checksums), extracts its Learn2Reg entries safely into a temporary folder under
/// the work folder and ingests that folder like [`ingest_dir`]. The default name is
/// `learn2reg`. The archive and the extracted files are removed afterwards, whatever the
/// outcome; only an interrupted download's partial file is kept.
///
/// # Errors
/// [`Error::Download`], [`Error::ChecksumMismatch`], [`Error::Archive`], then as
/// [`ingest_dir`]. Nothing is stored or published unless every step succeeds.
pub async fn ingest_learn2reg(
    stage: &Stage,
    catalog: &mut Catalog,
    config: &Learn2RegConfig,
    options: &IngestOptions,
    mut progress: impl FnMut(IngestPhase, u64, u64),
) -> Result<IngestReport> {
    let name = match &options.name {
        Some(n) => n.clone(),
        None => DatasetName::new("learn2reg")?,
    };
    config.download.validate()?;
    let work = &config.work_dir;
    tokio::fs::create_dir_all(work)
        .await
        .map_err(|e| Error::io(work, e))?;
    let downloaded = download(&config.download, &config.archive_path(), |done, total| {
        progress(IngestPhase::Download, done, total.unwrap_or(0))
    })
    .await?;
    let archive = RemoveOnDrop(downloaded.path.clone());
    tracing::info!(
        url = %config.download.url, bytes = downloaded.bytes, sha256 = %downloaded.sha256,
        attempts = downloaded.attempts, "archive downloaded"
    );

    let extract_dir = tempfile::Builder::new()
        .prefix(".extract-")
        .tempdir_in(work)
        .map_err(|e| Error::io(work, e))?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (path, out, limits) = (
        archive.0.clone(),
        extract_dir.path().to_path_buf(),
        config.limits,
    );
    let extraction = tokio::task::spawn_blocking(move || {
        extract_learn2reg(&path, &out, &limits, |done, total| {
            let _ = tx.send((done, total));
        })
    });
    while let Some((done, total)) = rx.recv().await {
        progress(IngestPhase::Extract, done, total);
    }
    let extracted = extraction.await.map_err(|e| join_error("extract", e))??;
    drop(archive);
    if !extracted.skipped.is_empty() {
        tracing::info!(skipped = ?extracted.skipped, "archive entries outside the Learn2Reg layout skipped");
    }
    let source = format!(
        "learn2reg:{} sha256={}",
        config.download.url, downloaded.sha256
    );
    let cases = Learn2RegDataset::open(extract_dir.path())?.cases;
    ingest_cases(stage, catalog, cases, &name, &source, options, progress).await
}

/// Generates `config` phantoms into a temporary folder (through [`crate::synth::generate`])
/// and ingests them. The default name is `synthetic-<cases>c-<X>x<Y>x<Z>-s<seed>`.
///
/// # Errors
/// As [`ingest_dir`], plus [`Error::InvalidArgument`] for an invalid configuration.
pub async fn ingest_synthetic(
    stage: &Stage,
    catalog: &mut Catalog,
    config: &SynthConfig,
    options: &IngestOptions,
    mut progress: impl FnMut(IngestPhase, u64, u64),
) -> Result<IngestReport> {
    config.validate()?;
    let [x, y, z] = config.size;
    let name = match &options.name {
        Some(n) => n.clone(),
        None => DatasetName::new(format!(
            "synthetic-{}c-{x}x{y}x{z}-s{}",
            config.cases, config.seed
        ))?,
    };
    let source = format!(
        "synthetic:cases={},size={x}x{y}x{z},seed={}",
        config.cases, config.seed
    );
    let tmp = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let out = tmp.path().to_path_buf();
    let cfg = config.clone();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let generation = tokio::task::spawn_blocking(move || {
        crate::synth::generate(&cfg, &out, |done, total| {
            let _ = tx.send((done as u64, total as u64));
        })
    });
    while let Some((done, total)) = rx.recv().await {
        progress(IngestPhase::Generate, done, total);
    }
    generation.await.map_err(|e| join_error("generate", e))??;
    let cases = Learn2RegDataset::open(tmp.path())?.cases;
    ingest_cases(stage, catalog, cases, &name, &source, options, progress).await
}

/// Ingests the DIR-Lab 4D CT / COPDGene cases under `config.root` (see [`dirlab`]): each
/// case's raw volumes are converted to int16 NIfTI in HU and its landmarks to keypoint pairs
/// in a temporary folder, then validated, stored and published like a folder. The default
/// name is `dirlab`.
///
/// # Errors
/// [`Error::InvalidArgument`] for an unknown or absent case asked for, or no case found;
/// [`Error::BadCases`] naming each case and file that cannot be converted (a missing or
/// ambiguous file, a volume of the wrong size for its table entry, a landmark file without
/// exactly 300 valid lines) or fails validation, unless `skip_bad` is set; then as
/// [`ingest_dir`]. Nothing is stored or published unless every step succeeds.
pub async fn ingest_dirlab(
    stage: &Stage,
    catalog: &mut Catalog,
    config: &DirLabConfig,
    options: &IngestOptions,
    progress: impl FnMut(IngestPhase, u64, u64),
) -> Result<IngestReport> {
    let name = match &options.name {
        Some(n) => n.clone(),
        None => DatasetName::new("dirlab")?,
    };
    let found = dirlab::find_cases(config)?;
    let source = format!(
        "dirlab:{} cases={} hu_offset={}",
        config.root.display(),
        found
            .iter()
            .map(|c| c.case.as_str())
            .collect::<Vec<_>>()
            .join(","),
        config.hu_offset
    );
    let hu_offset = config.hu_offset;
    let target = Target {
        stage,
        catalog,
        name: &name,
        source: &source,
        options,
    };
    convert_then_ingest(target, found, progress, move |case, dir| {
        dirlab::convert_case(&case, hu_offset, dir)
    })
    .await
}

/// Where a converted source goes: its stage, catalog, name, provenance and options.
struct Target<'a> {
    stage: &'a Stage,
    catalog: &'a mut Catalog,
    name: &'a DatasetName,
    source: &'a str,
    options: &'a IngestOptions,
}

/// Converts each item into a temporary folder (off the async runtime, with progress), then
/// validates, stores and publishes the converted cases ([`ingest_prepared`]); the folder
/// goes when the ingest ends.
async fn convert_then_ingest<T: Send + 'static>(
    target: Target<'_>,
    items: Vec<T>,
    mut progress: impl FnMut(IngestPhase, u64, u64),
    convert: impl Fn(T, &Path) -> std::result::Result<CaseFiles, BadCase> + Clone + Send + 'static,
) -> Result<IngestReport> {
    let work = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let total = items.len() as u64;
    let mut prepared = Vec::with_capacity(items.len());
    progress(IngestPhase::Convert, 0, total);
    for (i, item) in items.into_iter().enumerate() {
        let (dir, convert) = (work.path().to_path_buf(), convert.clone());
        let converted = tokio::task::spawn_blocking(move || convert(item, &dir))
            .await
            .map_err(|e| join_error("convert", e))?;
        prepared.push(converted);
        progress(IngestPhase::Convert, i as u64 + 1, total);
    }
    let Target {
        stage,
        catalog,
        name,
        source,
        options,
    } = target;
    let report = ingest_prepared(stage, catalog, prepared, name, source, options, progress).await;
    drop(work);
    report
}

/// Ingests the pairs of a Learn2Reg 2022 NLST folder (see [`nlst`]) as its
/// `NLST_dataset.json` lists them; each pair's two keypoint files become one keypoint-pairs
/// file in a temporary folder. The default name is `nlst`.
///
/// # Errors
/// [`Error::Io`] / [`Error::Json`] / [`Error::InvalidArgument`] for the JSON;
/// [`Error::BadCases`] naming each pair and file the folder lacks or that fails
/// validation, unless `skip_bad` is set; then as [`ingest_dir`].
pub async fn ingest_nlst(
    stage: &Stage,
    catalog: &mut Catalog,
    config: &NlstConfig,
    options: &IngestOptions,
    progress: impl FnMut(IngestPhase, u64, u64),
) -> Result<IngestReport> {
    let name = match &options.name {
        Some(n) => n.clone(),
        None => DatasetName::new("nlst")?,
    };
    let pairs = nlst::read_pairs(config)?;
    let (json, _) = config.json_and_folder();
    let lists: Vec<&str> = {
        let mut l: Vec<&str> = pairs.iter().map(|p| p.list.as_str()).collect();
        l.dedup();
        l
    };
    let source = format!("nlst:{} pairs={}", json.display(), lists.join(","));
    let target = Target {
        stage,
        catalog,
        name: &name,
        source: &source,
        options,
    };
    convert_then_ingest(target, pairs, progress, |pair, dir| {
        nlst::convert_pair(&pair, dir)
    })
    .await
}

fn join_error(what: &str, e: tokio::task::JoinError) -> Error {
    Error::invalid(what, format!("worker task failed: {e}"))
}

/// Validates, stores and publishes `cases` (the part every source shares).
async fn ingest_cases(
    stage: &Stage,
    catalog: &mut Catalog,
    cases: Vec<CaseFiles>,
    name: &DatasetName,
    source: &str,
    options: &IngestOptions,
    progress: impl FnMut(IngestPhase, u64, u64),
) -> Result<IngestReport> {
    let prepared = cases.into_iter().map(Ok).collect();
    ingest_prepared(stage, catalog, prepared, name, source, options, progress).await
}

/// As [`ingest_cases`] for cases that a source prepared (converted), where a case that
/// could not be prepared is already a [`BadCase`]: it counts as one that failed validation.
async fn ingest_prepared(
    stage: &Stage,
    catalog: &mut Catalog,
    cases: Vec<std::result::Result<CaseFiles, BadCase>>,
    name: &DatasetName,
    source: &str,
    options: &IngestOptions,
    mut progress: impl FnMut(IngestPhase, u64, u64),
) -> Result<IngestReport> {
    let total = cases.len() as u64;
    let mut valid = Vec::new();
    let mut bad = Vec::new();
    // DICOM scans are converted to NIfTI here; the files live until they are stored.
    let work = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    progress(IngestPhase::Validate, 0, total);
    for (i, files) in cases.into_iter().enumerate() {
        let files = match files {
            Ok(f) => f,
            Err(b) => {
                bad.push(b);
                progress(IngestPhase::Validate, i as u64 + 1, total);
                continue;
            }
        };
        let dir = work.path().to_path_buf();
        let checked =
            tokio::task::spawn_blocking(move || convert::validate_converting(&files, &dir))
                .await
                .map_err(|e| join_error("validate", e))?;
        match checked {
            Ok(case) => valid.push(case),
            Err(b) => bad.push(b),
        }
        progress(IngestPhase::Validate, i as u64 + 1, total);
    }
    if !bad.is_empty() && !options.skip_bad {
        return Err(Error::BadCases { cases: bad });
    }
    if valid.is_empty() {
        return Err(Error::BadCases { cases: bad });
    }
    let sha = content_sha256(&valid);
    let bytes: u64 = valid
        .iter()
        .flat_map(|c| c.files.iter().map(|f| f.bytes))
        .sum();
    let report = |outcome, objects_written| IngestReport {
        name: name.clone(),
        outcome,
        cases: valid.len(),
        bad: bad.clone(),
        bytes,
        objects_written,
        content_sha256: sha.clone(),
    };
    let prefix = match catalog.dataset(name)? {
        Some(existing) if existing.content_sha256 == sha => {
            return Ok(report(PublishOutcome::Unchanged, 0));
        }
        Some(existing) if !options.replace => {
            return Err(Error::DatasetExists {
                name: name.to_string(),
                existing_sha256: existing.content_sha256,
                new_sha256: sha.clone(),
            });
        }
        Some(_) => format!("datasets/{name}/v-{}", &sha[..12]),
        None => format!("datasets/{name}"),
    };

    let mut written: Vec<ObjectKey> = Vec::new();
    let stored = store_cases(stage, &valid, &prefix, bytes, &mut written, &mut progress).await;
    let records = match stored {
        Ok(records) => records,
        Err(e) => {
            remove_objects(stage, &written).await;
            return Err(e);
        }
    };
    let new = NewDataset {
        name,
        source,
        bytes,
        content_sha256: &sha,
        cases: &records,
    };
    let outcome = match catalog.publish(&new, options.replace) {
        Ok(o) => o,
        Err(e) => {
            remove_objects(stage, &written).await;
            return Err(e);
        }
    };
    if let PublishOutcome::Replaced { old_cases } = &outcome {
        let old: Vec<ObjectKey> = old_cases
            .iter()
            .flat_map(case_keys)
            .filter(|k| !written.contains(k))
            .collect();
        remove_objects(stage, &old).await;
    }
    tracing::info!(dataset = %name, cases = records.len(), bytes, "dataset published");
    Ok(report(outcome, written.len()))
}

/// The object name of a case's file: `<case>_exp.nii.gz` / `<case>_insp.nii.gz` (`.nii`
/// for uncompressed volumes) for scans and masks, `<case>.csv` for keypoints. For the
/// Learn2Reg layout that is the source file's own name.
pub fn stored_name(case_id: &crate::catalog::CaseId, kind: FileKind, source: &Path) -> String {
    let extension = if source.to_string_lossy().ends_with(".nii") {
        ".nii"
    } else {
        ".nii.gz"
    };
    match kind {
        FileKind::Fixed | FileKind::FixedMask => format!("{case_id}_exp{extension}"),
        FileKind::Moving | FileKind::MovingMask => format!("{case_id}_insp{extension}"),
        FileKind::Keypoints => format!("{case_id}.csv"),
    }
}

/// Every object key of a case.
pub fn case_keys(case: &CaseRecord) -> Vec<ObjectKey> {
    [
        Some(&case.fixed),
        Some(&case.moving),
        case.fixed_mask.as_ref(),
        case.moving_mask.as_ref(),
        case.keypoints.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|f| f.key.clone())
    .collect()
}

/// Best-effort deletion (used to clean up after a failure; the original error matters more).
async fn remove_objects(stage: &Stage, keys: &[ObjectKey]) {
    for key in keys {
        if let Err(e) = stage.delete(key).await {
            tracing::warn!(key = %key, error = %e, "could not delete object");
        }
    }
}

async fn store_cases(
    stage: &Stage,
    cases: &[ValidCase],
    prefix: &str,
    total_bytes: u64,
    written: &mut Vec<ObjectKey>,
    progress: &mut impl FnMut(IngestPhase, u64, u64),
) -> Result<Vec<CaseRecord>> {
    let mut done = 0u64;
    let mut records = Vec::with_capacity(cases.len());
    progress(IngestPhase::Store, 0, total_bytes);
    for case in cases {
        let stored = |kind: FileKind| -> Option<(&PathBuf, &str)> {
            case.files
                .iter()
                .find(|f| f.kind == kind)
                .map(|f| (&f.path, f.sha256.as_str()))
        };
        let mut files: Vec<(FileKind, StoredFile)> = Vec::new();
        for kind in FileKind::ALL {
            let Some((path, sha)) = stored(kind) else {
                continue;
            };
            let data = tokio::fs::read(path)
                .await
                .map_err(|e| Error::io(path.clone(), e))?;
            let now = hex::encode(Sha256::digest(&data));
            if now != sha {
                return Err(Error::invalid(
                    "ingest",
                    format!("{} changed after validation", path.display()),
                ));
            }
            let file_name = stored_name(&case.case_id, kind, path);
            let key = ObjectKey::new(format!("{prefix}/{}/{file_name}", kind.folder()))?;
            stage.put(&key, &data).await?;
            written.push(key.clone());
            done += data.len() as u64;
            progress(IngestPhase::Store, done, total_bytes);
            files.push((kind, StoredFile { key, sha256: now }));
        }
        let take = |kind: FileKind| {
            files
                .iter()
                .find(|(k, _)| *k == kind)
                .map(|(_, f)| f.clone())
        };
        let missing = |kind: FileKind| {
            Error::invalid(
                "ingest",
                format!("case {}: no {} file", case.case_id, kind.folder()),
            )
        };
        records.push(CaseRecord {
            case_id: case.case_id.clone(),
            fixed: take(FileKind::Fixed).ok_or_else(|| missing(FileKind::Fixed))?,
            moving: take(FileKind::Moving).ok_or_else(|| missing(FileKind::Moving))?,
            fixed_mask: take(FileKind::FixedMask),
            moving_mask: take(FileKind::MovingMask),
            keypoints: take(FileKind::Keypoints),
            shape: case.shape,
            spacing_mm: case.spacing_mm,
            affine: case.affine,
            intensity_min: case.intensity_min,
            intensity_max: case.intensity_max,
            keypoint_count: case.keypoint_count,
        });
    }
    Ok(records)
}

#[cfg(test)]
mod tests;
