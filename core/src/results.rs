//! Inference results: one row per (dataset, model, version, case) in the catalog's
//! `results` table (migration 4), written by the head as the cases of an inference job end.
//!
//! [`record_results`] replaces the rows of the same (dataset, model, version, case) and
//! inserts the new ones in one transaction, so a re-run never leaves a case twice, and a
//! failed write leaves the old rows as they were. [`list_results`] filters and orders them
//! (`medray results`); any other question is one `SELECT` away ([`crate::catalog::query`]).
//!
//! Each row says whether its case was among the data its model was trained on (`split`,
//! migration 5: [`Split`], see [`crate::models::provenance`]); [`crate::report`] keeps
//! held-out and training cases apart.

use rusqlite::{params, TransactionBehavior};
use serde::{Deserialize, Serialize};

use crate::catalog::{CaseId, Catalog, DatasetName};
pub use crate::models::Split;

use crate::models::{validate_version, ModelName};
use crate::{Error, Result};

pub mod columns;
pub mod migrate;

use columns::result_columns;
pub use columns::{Cell, Column, Role, SqlType};

/// Longest error text kept in a row, bytes (longer ones are cut and say so).
pub const MAX_ERROR_BYTES: usize = 4096;

/// Name endings of a case's outputs in its results folder.
pub const IMAGE_SUFFIX: &str = "_registered_img.nii.gz";
/// See [`IMAGE_SUFFIX`].
pub const LABEL_SUFFIX: &str = "_registered_label.nii.gz";
/// See [`IMAGE_SUFFIX`].
pub const DDF_SUFFIX: &str = "_ddf.nii.gz";
/// See [`IMAGE_SUFFIX`]: the case picture (mid slices, differences, DDF magnitude).
pub const PNG_SUFFIX: &str = "_overview.png";
/// See [`IMAGE_SUFFIX`]: the displacement as an ITK/ANTs/Slicer displacement field
/// transform (mm, LPS, fixed -> moving points; [`crate::interop`]).
pub const TRANSFORM_SUFFIX: &str = "_transform_lps_mm.nii.gz";
/// See [`IMAGE_SUFFIX`]: the Jacobian determinant map on the fixed grid
/// (`transformix -jac` style; [`crate::interop`]).
pub const JACOBIAN_SUFFIX: &str = "_jacobian.nii.gz";
/// Every output name ending: a worker may write `<prefix><case><suffix>` for these only
/// (the head refuses other keys from an inference task).
pub const OUTPUT_SUFFIXES: [&str; 6] = [
    IMAGE_SUFFIX,
    LABEL_SUFFIX,
    DDF_SUFFIX,
    PNG_SUFFIX,
    TRANSFORM_SUFFIX,
    JACOBIAN_SUFFIX,
];

/// The stage folder of a model version's inference outputs on a dataset,
/// `results/<dataset>/<model>/<version>/`: two datasets with the same case ids (every
/// synthetic set has `case_001`) keep apart. Outputs written before the dataset was part of
/// the key are moved by [`migrate::key_outputs_by_dataset`].
///
/// # Errors
/// [`Error::InvalidArgument`] for an invalid version.
pub fn results_prefix(dataset: &DatasetName, model: &ModelName, version: &str) -> Result<String> {
    validate_version(version)?;
    Ok(format!("results/{dataset}/{model}/{version}/"))
}

/// How a case ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum CaseStatus {
    /// Registered; the metrics and outputs are set.
    Succeeded,
    /// Not registered; `error` says why.
    Failed,
}

impl CaseStatus {
    /// `SUCCEEDED` or `FAILED`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            CaseStatus::Succeeded => "SUCCEEDED",
            CaseStatus::Failed => "FAILED",
        }
    }
}

impl std::str::FromStr for CaseStatus {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "SUCCEEDED" => Ok(CaseStatus::Succeeded),
            "FAILED" => Ok(CaseStatus::Failed),
            other => Err(Error::invalid(
                "status",
                format!("`{other}` is not one of: SUCCEEDED, FAILED"),
            )),
        }
    }
}

// The one declaration of the results columns: the struct, `RESULT_COLUMNS`, `COLUMNS` and
// the reading of rows all come from this list (see `columns.rs`).
result_columns! {
    /// One row of the `results` table. Metrics are `None` for a failed case, and where the
    /// inputs they need are missing (masks, keypoints).
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    pub struct ResultRow {
        /// The case.
        case_id: CaseId,
        /// Its dataset.
        dataset: DatasetName,
        /// The model.
        model_name: ModelName,
        /// The model's version.
        model_version: String,
        /// How the case ended.
        status: CaseStatus,
        /// Why it failed.
        error: Option<String>,
        /// Binary Dice of the masks before registration.
        dice_before: Option<f64> => Role::Metric("Dice before"),
        /// Binary Dice after registration (nearest-warped moving mask).
        dice_score: Option<f64> => Role::Metric("Dice after"),
        /// The quickstart's soft Dice after registration.
        soft_dice: Option<f64> => Role::Metric("soft Dice"),
        /// SSIM of the warped and the fixed image.
        ssim_score: Option<f64> => Role::Metric("SSIM"),
        /// Mutual information of the warped and the fixed image (minus MONAI's MI loss).
        mi: Option<f64> => Role::Metric("MI"),
        /// Mean keypoint distance before registration, mm.
        tre_before_mm: Option<f64> => Role::Metric("TRE before (mm)"),
        /// Mean target registration error after registration, mm.
        tre_mm: Option<f64> => Role::Metric("TRE after (mm)"),
        /// Percentage of voxels where the Jacobian determinant is <= 0.
        folding_pct: Option<f64> => Role::Metric("folding (%)"),
        /// Mean displacement magnitude, network-grid voxels.
        ddf_magnitude: Option<f64> => Role::Metric("mean |DDF| (voxels)"),
        /// Standard deviation of `log(max(det J, 1e-9))` over the fixed lung mask (all
        /// voxels without masks), on the fixed image's grid (migration 7;
        /// [`crate::interop::log_jac_std`]).
        #[serde(default)]
        log_jac_std: Option<f64> => Role::Metric("SD log J"),
        /// The worker's time for the case (fetch, register, write, upload), ms.
        runtime_ms: Option<f64> => Role::Metric("runtime (ms)"),
        /// The device it ran on (`cpu`, `cuda:N`); empty when unknown.
        device: String,
        /// The worker that ran it; empty when unknown.
        worker: String,
        /// The inference job.
        job_id: String,
        /// Stage key of the registered image.
        output_image: Option<String>,
        /// Stage key of the registered label.
        output_label: Option<String>,
        /// Stage key of the DDF.
        output_ddf: Option<String>,
        /// Stage key of the ITK/ANTs displacement field transform (mm, LPS; migration 7).
        #[serde(default)]
        output_transform: Option<String>,
        /// Stage key of the Jacobian determinant map (migration 7).
        #[serde(default)]
        output_jacobian: Option<String>,
        /// Adam steps of instance optimisation.
        refine_steps: u32,
        /// Whether the case was among the model's training data; `None`: unknown (the model
        /// records no training data).
        #[serde(default)]
        split: Option<Split>,
        /// When the row was written, RFC 3339 UTC (set by [`record_results`]).
        created_at: String => Role::WrittenAs("strftime('%Y-%m-%dT%H:%M:%SZ', 'now')"),
    }
}

impl ResultRow {
    /// A FAILED row (no metrics, no outputs).
    #[must_use]
    pub fn failed(
        case_id: CaseId,
        dataset: DatasetName,
        model_name: ModelName,
        model_version: String,
        error: String,
        job_id: String,
    ) -> Self {
        Self {
            case_id,
            dataset,
            model_name,
            model_version,
            status: CaseStatus::Failed,
            error: Some(error),
            dice_before: None,
            dice_score: None,
            soft_dice: None,
            ssim_score: None,
            mi: None,
            tre_before_mm: None,
            tre_mm: None,
            folding_pct: None,
            ddf_magnitude: None,
            log_jac_std: None,
            runtime_ms: None,
            device: String::new(),
            worker: String::new(),
            job_id,
            output_image: None,
            output_label: None,
            output_ddf: None,
            output_transform: None,
            output_jacobian: None,
            refine_steps: 0,
            split: None,
            created_at: String::new(),
        }
    }

    /// Checks the row: a version, an error exactly when FAILED, finite metrics.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the field.
    pub fn validate(&self) -> Result<()> {
        validate_version(&self.model_version)?;
        match (self.status, &self.error) {
            (CaseStatus::Failed, None) => {
                return Err(Error::invalid("error", "a FAILED row needs its error"))
            }
            (CaseStatus::Succeeded, Some(_)) => {
                return Err(Error::invalid("error", "a SUCCEEDED row has no error"))
            }
            _ => {}
        }
        for column in &COLUMNS {
            if let Some(v) = (column.get)(self).real().filter(|v| !v.is_finite()) {
                return Err(Error::invalid(
                    column.name,
                    format!("{:?}: not finite", Some(v)),
                ));
            }
        }
        if self.job_id.is_empty() {
            return Err(Error::invalid("job_id", "missing"));
        }
        Ok(())
    }
}

/// What an inference task reports for its case (its result JSON); the head turns it into a
/// [`ResultRow`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaseReport {
    /// The case.
    pub case_id: String,
    /// Its metrics, as `medray predict` reports them.
    pub metrics: crate::evaluate::CaseMetrics,
    /// The worker's time for the case (fetch, register, write, upload), ms.
    pub runtime_ms: f64,
    /// The network's forward pass, ms.
    pub inference_ms: f64,
    /// The device it ran on.
    pub device: String,
    /// Stage key of the registered image.
    pub output_image: String,
    /// Stage key of the registered label (when the case has masks).
    pub output_label: Option<String>,
    /// Stage key of the DDF.
    pub output_ddf: String,
    /// Stage key of the ITK/ANTs displacement field transform (absent from older workers).
    #[serde(default)]
    pub output_transform: Option<String>,
    /// Stage key of the Jacobian determinant map (absent from older workers).
    #[serde(default)]
    pub output_jacobian: Option<String>,
    /// Size of the images as stored.
    pub original_size: [usize; 3],
    /// Size the network ran on.
    pub network_size: [usize; 3],
    /// What the instance optimisation did, if it ran.
    pub refine: Option<crate::refine::RefineReport>,
    /// True when the model was already loaded on the worker.
    pub model_cached: bool,
}

impl CaseReport {
    /// The SUCCEEDED row of this report. `mi` is minus MONAI's MI loss. The split is left
    /// unknown: the caller knows the model's training data.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an invalid case id.
    pub fn into_row(
        self,
        dataset: DatasetName,
        model_name: ModelName,
        model_version: String,
        worker: String,
        job_id: String,
    ) -> Result<ResultRow> {
        let m = self.metrics;
        Ok(ResultRow {
            case_id: CaseId::new(self.case_id)?,
            dataset,
            model_name,
            model_version,
            status: CaseStatus::Succeeded,
            error: None,
            dice_before: m.dice_before,
            dice_score: m.dice,
            soft_dice: m.soft_dice,
            ssim_score: Some(m.ssim),
            mi: Some(-m.mi_loss),
            tre_before_mm: m.tre_before_mm,
            tre_mm: m.tre_mm,
            folding_pct: Some(m.folding_pct),
            ddf_magnitude: Some(m.ddf_magnitude),
            log_jac_std: m.log_jac_std,
            runtime_ms: Some(self.runtime_ms),
            device: self.device,
            worker,
            job_id,
            output_image: Some(self.output_image),
            output_label: self.output_label,
            output_ddf: Some(self.output_ddf),
            output_transform: self.output_transform,
            output_jacobian: self.output_jacobian,
            refine_steps: self
                .refine
                .map_or(0, |r| r.steps.min(u32::MAX as usize) as u32),
            split: None,
            created_at: String::new(),
        })
    }
}

/// Cuts `text` to [`MAX_ERROR_BYTES`] at a character boundary.
#[must_use]
pub fn clip_error(text: &str) -> String {
    if text.len() <= MAX_ERROR_BYTES {
        return text.to_string();
    }
    let mut cut = MAX_ERROR_BYTES;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{} [cut]", &text[..cut])
}

/// Writes `rows`, replacing the rows of the same (dataset, model, version, case), in one
/// transaction: all are written, or none and the old rows stay.
///
/// # Errors
/// [`Error::InvalidArgument`] naming the field of an invalid row (nothing written);
/// [`Error::Catalog`] if SQLite fails (nothing written).
pub fn record_results(catalog: &mut Catalog, rows: &[ResultRow]) -> Result<()> {
    for row in rows {
        row.validate()?;
    }
    let err = |e| Error::catalog("record results", e);
    let tx = catalog
        .conn_mut()
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(err)?;
    {
        let mut delete = tx
            .prepare(
                "DELETE FROM results
                 WHERE dataset = ?1 AND model_name = ?2 AND model_version = ?3 AND case_id = ?4",
            )
            .map_err(err)?;
        // Every column is bound from the row, except those SQLite sets (`created_at`).
        let mut values = Vec::with_capacity(COLUMNS.len());
        let mut bound: Vec<&Column> = Vec::with_capacity(COLUMNS.len());
        for c in &COLUMNS {
            match c.role {
                Role::WrittenAs(sql) => values.push(sql.to_string()),
                Role::Plain | Role::Metric(_) => {
                    bound.push(c);
                    values.push(format!("?{}", bound.len()));
                }
            }
        }
        let mut insert = tx
            .prepare(&format!(
                "INSERT INTO results ({}) VALUES ({})",
                RESULT_COLUMNS.join(", "),
                values.join(", ")
            ))
            .map_err(err)?;
        for r in rows {
            delete
                .execute(params![
                    r.dataset.as_str(),
                    r.model_name.as_str(),
                    r.model_version,
                    r.case_id.as_str()
                ])
                .map_err(err)?;
            let stored = ResultRow {
                error: r.error.as_deref().map(clip_error),
                ..r.clone()
            };
            insert
                .execute(rusqlite::params_from_iter(
                    bound.iter().map(|c| (c.get)(&stored)),
                ))
                .map_err(err)?;
        }
    }
    tx.commit().map_err(err)
}

/// Which rows [`list_results`] returns, and in which order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResultFilter {
    /// Only this model.
    pub model: Option<String>,
    /// Only this version.
    pub version: Option<String>,
    /// Only this dataset.
    pub dataset: Option<String>,
    /// Only the rows this job wrote.
    pub job_id: Option<String>,
    /// Order by this column (one of [`RESULT_COLUMNS`]); default: dataset, model,
    /// version, case.
    pub order_by: Option<String>,
    /// Descending order.
    pub descending: bool,
    /// At most this many rows.
    pub limit: Option<usize>,
}

impl ResultFilter {
    /// Checks the names and the order column.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the field.
    pub fn validate(&self) -> Result<()> {
        if let Some(m) = &self.model {
            ModelName::new(m.clone())?;
        }
        if let Some(v) = &self.version {
            validate_version(v)?;
        }
        if let Some(d) = &self.dataset {
            DatasetName::new(d.clone())?;
        }
        if let Some(j) = &self.job_id {
            if j.is_empty()
                || j.len() > 64
                || !j.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                return Err(Error::invalid(
                    "job id",
                    format!("`{j}`: expected e.g. job-000012"),
                ));
            }
        }
        if let Some(c) = &self.order_by {
            if !RESULT_COLUMNS.contains(&c.as_str()) {
                return Err(Error::invalid(
                    "order by",
                    format!(
                        "`{c}` is not a column; one of: {}",
                        RESULT_COLUMNS.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The rows matching `filter`, in its order.
///
/// # Errors
/// [`Error::InvalidArgument`] for an invalid filter; [`Error::Catalog`].
pub fn list_results(catalog: &Catalog, filter: &ResultFilter) -> Result<Vec<ResultRow>> {
    filter.validate()?;
    let mut sql = format!(
        "SELECT {} FROM results WHERE 1 = 1",
        RESULT_COLUMNS.join(", ")
    );
    let mut args: Vec<&str> = Vec::new();
    for (column, value) in [
        ("model_name", &filter.model),
        ("model_version", &filter.version),
        ("dataset", &filter.dataset),
        ("job_id", &filter.job_id),
    ] {
        if let Some(v) = value {
            args.push(v);
            sql.push_str(&format!(" AND {column} = ?{}", args.len()));
        }
    }
    let default_order = "dataset, model_name, model_version, case_id";
    match &filter.order_by {
        // The column was checked against RESULT_COLUMNS.
        Some(c) => sql.push_str(&format!(
            " ORDER BY {c} {} NULLS LAST, {default_order}",
            if filter.descending { "DESC" } else { "ASC" }
        )),
        None if filter.descending => sql
            .push_str(" ORDER BY dataset DESC, model_name DESC, model_version DESC, case_id DESC"),
        None => sql.push_str(&format!(" ORDER BY {default_order}")),
    }
    if let Some(limit) = filter.limit {
        sql.push_str(&format!(" LIMIT {}", limit.min(i64::MAX as usize)));
    }
    let err = |e| Error::catalog("list results", e);
    let mut stmt = catalog.conn().prepare(&sql).map_err(err)?;
    let rows = stmt
        .query_map(rusqlite::params_from_iter(args), ResultRow::from_sql)
        .map_err(err)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(err)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    pub(super) fn row(case: &str, version: &str, dice: f64, job: &str) -> ResultRow {
        ResultRow {
            dice_before: Some(0.5),
            dice_score: Some(dice),
            ssim_score: Some(0.9),
            mi: Some(0.4),
            folding_pct: Some(0.0),
            ddf_magnitude: Some(1.0),
            runtime_ms: Some(12.0),
            device: "cpu".into(),
            worker: "worker-000001".into(),
            output_ddf: Some(format!("results/m/{version}/{case}_ddf.nii.gz")),
            status: CaseStatus::Succeeded,
            error: None,
            ..ResultRow::failed(
                CaseId::new(case).unwrap(),
                DatasetName::new("d").unwrap(),
                ModelName::new("m").unwrap(),
                version.into(),
                String::new(),
                job.into(),
            )
        }
    }

    fn all(c: &Catalog) -> Vec<ResultRow> {
        list_results(c, &ResultFilter::default()).unwrap()
    }

    #[test]
    fn a_rerun_replaces_the_rows_of_its_cases() {
        let mut c = Catalog::open_in_memory().unwrap();
        record_results(
            &mut c,
            &[
                row("case_001", "v1", 0.8, "job-1"),
                row("case_002", "v1", 0.7, "job-1"),
            ],
        )
        .unwrap();
        record_results(&mut c, &[row("case_001", "v2", 0.9, "job-2")]).unwrap();
        let failed = ResultRow::failed(
            CaseId::new("case_002").unwrap(),
            DatasetName::new("d").unwrap(),
            ModelName::new("m").unwrap(),
            "v1".into(),
            "datasets/d/scansInsp/case_002_insp.nii.gz: not a NIfTI file".into(),
            "job-3".into(),
        );
        record_results(&mut c, std::slice::from_ref(&failed)).unwrap();
        let rows = all(&c);
        assert_eq!(rows.len(), 3, "{rows:#?}");
        let keys: Vec<(&str, &str, &str)> = rows
            .iter()
            .map(|r| {
                (
                    r.case_id.as_str(),
                    r.model_version.as_str(),
                    r.job_id.as_str(),
                )
            })
            .collect();
        assert_eq!(
            keys,
            [
                ("case_001", "v1", "job-1"),
                ("case_002", "v1", "job-3"),
                ("case_001", "v2", "job-2")
            ]
        );
        let got = &rows[1];
        assert_eq!(got.status, CaseStatus::Failed);
        assert_eq!(got.error, failed.error);
        assert_eq!(got.dice_score, None);
        assert!(got.created_at.ends_with('Z'));
        assert_eq!(rows[0].dice_score, Some(0.8));
        assert_eq!(
            rows[0].output_ddf.as_deref(),
            Some("results/m/v1/case_001_ddf.nii.gz")
        );
    }

    #[test]
    fn a_failing_write_leaves_the_old_rows() {
        let mut c = Catalog::open_in_memory().unwrap();
        record_results(
            &mut c,
            &[
                row("case_001", "v1", 0.8, "job-1"),
                row("case_002", "v1", 0.7, "job-1"),
            ],
        )
        .unwrap();
        let before = all(&c);
        // A trigger refuses the second row inside the transaction, after the first row was
        // replaced: everything rolls back.
        c.conn()
            .execute_batch(
                "CREATE TRIGGER refuse BEFORE INSERT ON results WHEN NEW.case_id = 'case_002'
                 BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
            )
            .unwrap();
        let e = record_results(
            &mut c,
            &[
                row("case_001", "v1", 0.1, "job-2"),
                row("case_002", "v1", 0.1, "job-2"),
            ],
        )
        .unwrap_err();
        assert!(e.to_string().contains("refused by the test"), "{e}");
        assert_eq!(all(&c), before);
        // Invalid rows are refused before anything is written.
        let mut bad = row("case_003", "v1", f64::NAN, "job-2");
        assert!(record_results(&mut c, &[bad.clone()]).is_err());
        bad.dice_score = Some(0.5);
        bad.status = CaseStatus::Failed;
        assert!(record_results(&mut c, &[bad]).is_err());
        assert_eq!(all(&c), before);
    }

    #[test]
    fn rows_filter_and_order() {
        let mut c = Catalog::open_in_memory().unwrap();
        let splits = [
            Some(Split::Train),
            Some(Split::Validation),
            Some(Split::HeldOut),
            None,
        ];
        let mut rows = [
            row("case_001", "v1", 0.8, "job-1"),
            row("case_002", "v1", 0.9, "job-1"),
            row("case_003", "v1", 0.7, "job-1"),
            row("case_001", "v2", 0.95, "job-2"),
        ];
        for (r, s) in rows.iter_mut().zip(splits) {
            r.split = s;
        }
        record_results(&mut c, &rows).unwrap();
        // The split is stored as its text (NULL when unknown) and read back.
        let stored: Vec<Option<String>> = c
            .conn()
            .prepare("SELECT split FROM results ORDER BY model_version, case_id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(
            stored,
            [Some("train"), Some("validation"), Some("held-out"), None]
                .map(|s| s.map(String::from))
        );
        assert_eq!(all(&c).iter().map(|r| r.split).collect::<Vec<_>>(), splits);
        let ids = |f: ResultFilter| -> Vec<String> {
            list_results(&c, &f)
                .unwrap()
                .iter()
                .map(|r| format!("{}:{}", r.model_version, r.case_id))
                .collect()
        };
        assert_eq!(
            ids(ResultFilter {
                version: Some("v1".into()),
                order_by: Some("dice_score".into()),
                descending: true,
                ..ResultFilter::default()
            }),
            ["v1:case_002", "v1:case_001", "v1:case_003"]
        );
        assert_eq!(
            ids(ResultFilter {
                job_id: Some("job-2".into()),
                ..ResultFilter::default()
            }),
            ["v2:case_001"]
        );
        assert_eq!(
            ids(ResultFilter {
                order_by: Some("dice_score".into()),
                limit: Some(1),
                ..ResultFilter::default()
            }),
            ["v1:case_003"]
        );
        for bad in ["dice; DROP TABLE results", "nope"] {
            let e = list_results(
                &c,
                &ResultFilter {
                    order_by: Some(bad.into()),
                    ..ResultFilter::default()
                },
            )
            .unwrap_err();
            assert!(e.to_string().contains("not a column"), "{e}");
        }
    }
}
