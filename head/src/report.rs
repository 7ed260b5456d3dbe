//! Inference reports on the head: the page of [`medray_core::report`] for a job, built from
//! the job store, the results table and the stage. The HTTP server serves it at
//! `/jobs/<job>/report/`; `medray report` builds the same page through the client API.

use std::collections::HashSet;
use std::path::Path;

use medray_core::report::{plan, ReportJob, ReportPlan};
use medray_core::results::{list_results, results_prefix, ResultFilter, ResultRow};
use medray_core::stage::ObjectKey;
use medray_proto::v1::Job;

use crate::context::HeadContext;
use crate::ids::JobId;
use crate::store::Store;
use crate::{HeadError, Result};

/// The report's view of an inference job ([`medray_proto::convert`]), its error as a request
/// error of the head.
///
/// # Errors
/// [`HeadError::InvalidArgument`] when the job is not an inference job.
pub fn report_job(job: &Job) -> Result<ReportJob> {
    ReportJob::try_from(job).map_err(|e| match e {
        medray_core::Error::InvalidArgument { field, reason } => {
            HeadError::InvalidArgument { field, reason }
        }
        other => HeadError::Core(other),
    })
}

/// The report's view of job `id` as stored in the data directory `data_dir` of a head,
/// which need not be running (`medray report --data-dir`); `None` when there is no such
/// job. Only reads: the job store's tables stay private to the head.
///
/// # Errors
/// [`HeadError::InvalidArgument`] when the job is not an inference job; a store error
/// (e.g. no catalog database in `data_dir`).
pub fn stored_report_job(data_dir: &Path, id: &JobId) -> Result<Option<ReportJob>> {
    let store = Store::open(&data_dir.join("catalog.db"))?;
    store.job(id)?.as_ref().map(report_job).transpose()
}

/// The results rows a job wrote, in case order.
///
/// # Errors
/// [`HeadError::Core`] if the catalog cannot be read.
pub async fn job_rows(ctx: &HeadContext, id: &JobId) -> Result<Vec<ResultRow>> {
    let filter = ResultFilter {
        job_id: Some(id.to_string()),
        order_by: Some("case_id".into()),
        ..ResultFilter::default()
    };
    let ctx = ctx.clone();
    tokio::task::spawn_blocking(move || {
        let catalog = ctx.catalog()?;
        Ok::<_, HeadError>(list_results(&catalog, &filter)?)
    })
    .await
    .map_err(|e| HeadError::Actor(format!("results query: {e}")))?
}

/// The job and its report page.
///
/// # Errors
/// [`HeadError::NotFound`] for an unknown job, [`HeadError::InvalidArgument`] for a job
/// that is not an inference job, a store, catalog or stage error.
pub async fn build(ctx: &HeadContext, id: &JobId) -> Result<(Vec<ResultRow>, ReportPlan)> {
    let (info, rows) = load(ctx, id).await?;
    let stored: HashSet<String> = match outputs_prefix(&info) {
        Some(prefix) => ctx
            .stage
            .list(&prefix)
            .await?
            .into_iter()
            .map(|o| o.key.as_str().to_string())
            .collect(),
        None => HashSet::new(),
    };
    let page = plan(&info, &rows, &|k| stored.contains(k));
    Ok((rows, page))
}

/// An inference job's report facts and its rows.
async fn load(ctx: &HeadContext, id: &JobId) -> Result<(ReportJob, Vec<ResultRow>)> {
    let job = ctx.store.job(id)?.ok_or_else(|| HeadError::NotFound {
        what: "job",
        id: id.to_string(),
    })?;
    let info = report_job(&job)?;
    Ok((info, job_rows(ctx, id).await?))
}

/// The picture `name` (`<case>.png`) of a job's report. Unlike [`build`], it does not list
/// the stage (a page of N pictures would list it N times): it finds the picture's key from
/// the job's rows and reads it; an object that is not there answers `NotFound`.
///
/// # Errors
/// [`HeadError::NotFound`] when the job has no such picture; as [`build`].
pub async fn picture(ctx: &HeadContext, id: &JobId, name: &str) -> Result<Vec<u8>> {
    let (info, rows) = load(ctx, id).await?;
    let page = plan(&info, &rows, &|_| true);
    let not_found = || HeadError::NotFound {
        what: "report picture",
        id: format!("{id}/{name}"),
    };
    let (_, key) = page
        .pictures
        .iter()
        .find(|(n, _)| n == name)
        .ok_or_else(not_found)?;
    match ctx.stage.get(&ObjectKey::new(key.clone())?).await {
        Ok(png) => Ok(png),
        Err(medray_core::Error::Stage { source, .. })
            if matches!(*source, object_store::Error::NotFound { .. }) =>
        {
            Err(not_found())
        }
        Err(e) => Err(e.into()),
    }
}

/// The stage folder of the job's outputs, when its model and version are valid.
fn outputs_prefix(job: &ReportJob) -> Option<String> {
    let dataset = medray_core::catalog::DatasetName::new(job.dataset.clone()).ok()?;
    let model = medray_core::models::ModelName::new(job.model.clone()).ok()?;
    results_prefix(&dataset, &model, &job.version).ok()
}

#[cfg(test)]
mod tests {
    use medray_proto::v1::job_spec::Kind;
    use medray_proto::v1::{InferSpec, JobSpec, SelftestSpec};

    use super::*;

    #[test]
    fn a_stored_job_is_read_from_the_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("catalog.db")).unwrap();
        let infer = JobSpec {
            kind: Some(Kind::Infer(Box::new(InferSpec {
                dataset: "d".into(),
                model: "m".into(),
                version: "v2".into(),
                refine_steps: 5,
                ..InferSpec::default()
            }))),
        };
        let job = store.insert_job("infer", &infer, "").unwrap();
        let selftest = JobSpec {
            kind: Some(Kind::Selftest(SelftestSpec::default())),
        };
        let other = store.insert_job("selftest", &selftest, "").unwrap();
        drop(store);

        let info = stored_report_job(dir.path(), &JobId(job.id.clone()))
            .unwrap()
            .unwrap();
        assert_eq!(
            (info.id.as_str(), info.state.as_str(), info.version.as_str()),
            (job.id.as_str(), "PENDING", "v2")
        );
        assert_eq!(info.refine_steps, 5);
        assert!(stored_report_job(dir.path(), &JobId("job-000099".into()))
            .unwrap()
            .is_none());
        let e = stored_report_job(dir.path(), &JobId(other.id)).unwrap_err();
        assert!(matches!(e, HeadError::InvalidArgument { .. }), "{e}");
    }
}
