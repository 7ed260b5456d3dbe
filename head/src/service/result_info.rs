//! Wire <-> domain conversions of inference results ([`ResultRow`] and [`CaseResult`]) and
//! of read-only SQL answers ([`QueryResult`] and [`QueryCatalogResponse`]). The CLI uses
//! the same functions, so that `medray results` and `medray sql` print the same locally and
//! through the head.

use medray_core::catalog::query::{QueryResult, SqlValue};
use medray_core::catalog::{CaseId, DatasetName};
use medray_core::models::ModelName;
use medray_core::results::ResultRow;
use medray_proto::v1::sql_value::Value;
use medray_proto::v1::{CaseResult, QueryCatalogResponse, SqlRow};

/// The wire form of a results row.
#[must_use]
pub fn case_result(r: &ResultRow) -> CaseResult {
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
        runtime_ms: r.runtime_ms,
        device: r.device.clone(),
        worker: r.worker.clone(),
        job_id: r.job_id.clone(),
        output_image: r.output_image.clone(),
        output_label: r.output_label.clone(),
        output_ddf: r.output_ddf.clone(),
        refine_steps: r.refine_steps,
        created_at: r.created_at.clone(),
        split: r.split.map(|s| s.as_str().to_string()),
    }
}

/// A results row from its wire form.
///
/// # Errors
/// [`medray_core::Error::InvalidArgument`] naming the invalid field.
pub fn result_row_from(c: CaseResult) -> medray_core::Result<ResultRow> {
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
        runtime_ms: c.runtime_ms,
        device: c.device,
        worker: c.worker,
        job_id: c.job_id,
        output_image: c.output_image,
        output_label: c.output_label,
        output_ddf: c.output_ddf,
        refine_steps: c.refine_steps,
        split: c.split.as_deref().map(str::parse).transpose()?,
        created_at: c.created_at,
    })
}

/// The wire form of a query's answer.
#[must_use]
pub fn query_response(q: QueryResult) -> QueryCatalogResponse {
    QueryCatalogResponse {
        columns: q.columns,
        rows: q
            .rows
            .into_iter()
            .map(|row| SqlRow {
                values: row
                    .into_iter()
                    .map(|v| medray_proto::v1::SqlValue {
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

/// A query's answer from its wire form (a value without a kind reads as NULL).
#[must_use]
pub fn query_result_from(r: QueryCatalogResponse) -> QueryResult {
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
