//! Inference jobs (`medray infer`): what the [job actor](crate::job) needs to plan one task
//! per case, to turn each task's end into a row of the catalog's results table, and to
//! summarise the job.
//!
//! Each row records the case's split: whether its images were among the data the model
//! version was trained on ([`case_splits`], `medray_core::models::provenance`), so that
//! summaries keep held-out and training cases apart.
//!
//! Policy: a case that fails (bad file, a worker lost too often) is a FAILED row with its
//! error and the job goes on. The job ends SUCCEEDED when at least one case succeeded (its
//! result counts the failed cases and names them), FAILED when every case failed.

use std::collections::{HashMap, HashSet};

use medray_core::catalog::{CaseId, CaseRecord, Catalog, DatasetName, StoredFile};
use medray_core::models::provenance::case_split;
use medray_core::models::{model_version, ModelName, ModelVersion, VersionRef};
use medray_core::refine::RefineOptions;
use medray_core::report::split_summaries;
use medray_core::results::{
    list_results, results_prefix, CaseReport, CaseStatus, ResultFilter, ResultRow, Split,
};
use medray_proto::v1::task_assignment::Kind as TaskKind;
use medray_proto::v1::{InferSpec, InferTask, JobState, StageRef, TaskAssignment};

use crate::ids::{JobId, TaskId};
use crate::store::{TaskRow, TaskState};
use crate::{HeadError, Result};

pub use medray_proto::convert::refine_options;

/// An inference job resolved against the catalog.
#[derive(Debug, Clone)]
pub struct InferPlan {
    /// The dataset.
    pub dataset: DatasetName,
    /// The model.
    pub model: ModelName,
    /// Its version (resolved from an alias or "latest" at submit).
    pub version: String,
    /// Adam steps of instance optimisation per case.
    pub refine_steps: u32,
    /// How the instance optimisation runs (every field resolved; `steps` = `refine_steps`).
    pub refine: RefineOptions,
    /// The split of each case of the dataset for this model version (see [`case_splits`]);
    /// a case missing here is of unknown split.
    pub splits: HashMap<CaseId, Split>,
}

/// The split of each of `cases` for `version`: whether their images were among its
/// training or validation cases. Empty when the version records no training data
/// (imported weights, older versions): their rows' split stays unknown, never guessed.
#[must_use]
pub fn case_splits(version: &ModelVersion, cases: &[CaseRecord]) -> HashMap<CaseId, Split> {
    cases
        .iter()
        .filter_map(|c| {
            case_split(version.training_data.as_ref(), c).map(|s| (c.case_id.clone(), s))
        })
        .collect()
}

/// A running inference job: its plan and the cases whose rows are written.
#[derive(Debug, Clone)]
pub struct InferRun {
    /// The plan.
    pub plan: InferPlan,
    /// Tasks (cases) whose result rows are in the catalog.
    pub recorded: HashSet<TaskId>,
}

/// The model version a spec names: its `version`, else its `alias`, else the latest.
///
/// # Errors
/// [`HeadError::Core`] with `ModelNotFound` naming the model and version or alias.
pub fn resolve_version(catalog: &Catalog, spec: &InferSpec) -> Result<ModelVersion> {
    let name = ModelName::new(spec.model.clone())?;
    let which = if !spec.version.is_empty() {
        VersionRef::Version(spec.version.clone())
    } else if !spec.alias.is_empty() {
        VersionRef::Alias(spec.alias.clone())
    } else {
        VersionRef::Latest
    };
    Ok(model_version(catalog, &name, &which)?)
}

/// The cases a spec registers: every case of the dataset, or the listed ones in the order
/// given.
///
/// # Errors
/// `DatasetNotFound`; [`HeadError::NotFound`] naming a listed case the dataset lacks;
/// [`HeadError::InvalidArgument`] for a dataset without cases.
pub fn resolve_cases(catalog: &Catalog, spec: &InferSpec) -> Result<Vec<CaseRecord>> {
    let dataset = DatasetName::new(spec.dataset.clone())?;
    if catalog.dataset(&dataset)?.is_none() {
        return Err(medray_core::Error::DatasetNotFound {
            name: dataset.to_string(),
        }
        .into());
    }
    let all = catalog.cases(&dataset)?;
    if spec.cases.is_empty() {
        if all.is_empty() {
            return Err(HeadError::invalid(
                "infer.dataset",
                format!("dataset `{dataset}` has no cases"),
            ));
        }
        return Ok(all);
    }
    spec.cases
        .iter()
        .map(|id| {
            all.iter()
                .find(|c| c.case_id.as_str() == id)
                .cloned()
                .ok_or_else(|| HeadError::NotFound {
                    what: "case (in the dataset)",
                    id: format!("{dataset}/{id}"),
                })
        })
        .collect()
}

fn stage_ref(f: Option<&StoredFile>) -> Option<StageRef> {
    f.map(|f| StageRef {
        key: f.key.as_str().to_string(),
        sha256: f.sha256.clone(),
    })
}

/// One task per case; the task id is the case id.
///
/// # Errors
/// [`HeadError::Core`] if the model config cannot be serialised or the version is invalid.
pub fn plan_tasks(
    plan: &InferPlan,
    version: &ModelVersion,
    cases: &[CaseRecord],
    hold_ms: u32,
) -> Result<Vec<(TaskId, TaskAssignment)>> {
    let model_config_json = serde_json::to_string(&version.model_config).map_err(|source| {
        medray_core::Error::Json {
            path: "model config".into(),
            source,
        }
    })?;
    let output_prefix = results_prefix(&plan.dataset, &plan.model, &plan.version)?;
    // The resolved options, every field set, so a worker runs exactly these.
    let refine_json =
        serde_json::to_string(&plan.refine).map_err(|source| medray_core::Error::Json {
            path: "refine options".into(),
            source,
        })?;
    let weights = StageRef {
        key: version.artifact_key.as_str().to_string(),
        sha256: version.artifact_sha256.clone(),
    };
    Ok(cases
        .iter()
        .map(|c| {
            let task = InferTask {
                dataset: plan.dataset.to_string(),
                case_id: c.case_id.to_string(),
                fixed: stage_ref(Some(&c.fixed)),
                moving: stage_ref(Some(&c.moving)),
                fixed_mask: stage_ref(c.fixed_mask.as_ref()),
                moving_mask: stage_ref(c.moving_mask.as_ref()),
                keypoints: stage_ref(c.keypoints.as_ref()),
                model: plan.model.to_string(),
                version: plan.version.clone(),
                weights: Some(weights.clone()),
                model_config_json: model_config_json.clone(),
                refine_steps: plan.refine_steps,
                output_prefix: output_prefix.clone(),
                hold_ms,
                refine_json: refine_json.clone(),
            };
            (
                TaskId(c.case_id.to_string()),
                TaskAssignment {
                    kind: Some(TaskKind::Infer(Box::new(task))),
                    ..TaskAssignment::default()
                },
            )
        })
        .collect())
}

/// The row of a case whose task succeeded with `result_json` (a [`CaseReport`]).
///
/// # Errors
/// [`HeadError::InvalidArgument`] if the report cannot be read or names another case.
pub fn success_row(
    plan: &InferPlan,
    task: &TaskId,
    worker: &str,
    job: &JobId,
    result_json: &str,
) -> Result<ResultRow> {
    let report: CaseReport = serde_json::from_str(result_json).map_err(|e| {
        HeadError::invalid(
            "result_json",
            format!("case {task}: not an inference report: {e}"),
        )
    })?;
    if report.case_id != task.as_str() {
        return Err(HeadError::invalid(
            "result_json",
            format!("task {task} reported case `{}` instead", report.case_id),
        ));
    }
    let mut row = report.into_row(
        plan.dataset.clone(),
        plan.model.clone(),
        plan.version.clone(),
        worker.to_string(),
        job.to_string(),
    )?;
    row.split = plan.splits.get(&row.case_id).copied();
    Ok(row)
}

/// The row of a task that ended before a head restart, from what the store kept: its result
/// or its error. `None` for a task that has not ended.
///
/// # Errors
/// As [`success_row`] and [`failure_row`].
pub fn row_of_ended_task(plan: &InferPlan, job: &JobId, t: &TaskRow) -> Result<Option<ResultRow>> {
    let worker = t.worker_id.as_ref().map_or("", |w| w.as_str());
    match (t.state, &t.result_json) {
        (TaskState::Succeeded, Some(json)) => {
            success_row(plan, &t.task_id, worker, job, json).map(Some)
        }
        (TaskState::Succeeded | TaskState::Failed, _) => failure_row(
            plan,
            &t.task_id,
            worker,
            job,
            t.error.as_deref().unwrap_or("failed (no error recorded)"),
        )
        .map(Some),
        _ => Ok(None),
    }
}

/// The row of a case whose task failed for good.
///
/// # Errors
/// [`HeadError::Core`] for a task id that is not a case id.
pub fn failure_row(
    plan: &InferPlan,
    task: &TaskId,
    worker: &str,
    job: &JobId,
    reason: &str,
) -> Result<ResultRow> {
    let mut row = ResultRow::failed(
        CaseId::new(task.as_str())?,
        plan.dataset.clone(),
        plan.model.clone(),
        plan.version.clone(),
        reason.to_string(),
        job.to_string(),
    );
    row.worker = worker.to_string();
    row.refine_steps = plan.refine_steps;
    row.split = plan.splits.get(&row.case_id).copied();
    Ok(row)
}

/// How an inference job whose tasks have all ended ends: its state, reason and result.
///
/// # Errors
/// [`HeadError::Core`] if the results cannot be read.
pub fn summary(
    catalog: &Catalog,
    plan: &InferPlan,
    job: &JobId,
    tasks: &[TaskRow],
) -> Result<(JobState, String, String)> {
    let rows = list_results(
        catalog,
        &ResultFilter {
            job_id: Some(job.to_string()),
            ..ResultFilter::default()
        },
    )?;
    let ok: Vec<&ResultRow> = rows
        .iter()
        .filter(|r| r.status == CaseStatus::Succeeded)
        .collect();
    let failed: Vec<serde_json::Value> = tasks
        .iter()
        .filter(|t| t.state == TaskState::Failed)
        .map(|t| serde_json::json!({"case": t.task_id.as_str(), "error": t.error.clone().unwrap_or_default()}))
        .collect();
    let mean = |f: fn(&ResultRow) -> Option<f64>| -> Option<f64> {
        let v: Vec<f64> = ok.iter().filter_map(|r| f(r)).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let succeeded = tasks
        .iter()
        .filter(|t| t.state == TaskState::Succeeded)
        .count();
    // Held-out, validation, training and unknown-split cases apart, held-out first.
    let by_split: Vec<serde_json::Value> = split_summaries(&rows)
        .iter()
        .map(|s| {
            serde_json::json!({
                "split": s.split.map(Split::as_str),
                "cases": s.cases,
                "succeeded": s.succeeded,
                "mean_dice_before": s.dice_before,
                "mean_dice": s.dice,
                "mean_tre_before_mm": s.tre_before_mm,
                "mean_tre_mm": s.tre_mm,
                "mean_folding_pct": s.folding_pct,
            })
        })
        .collect();
    let result = serde_json::json!({
        "dataset": plan.dataset.as_str(),
        "model": plan.model.as_str(),
        "version": plan.version,
        "cases": tasks.len(),
        "succeeded": succeeded,
        "failed": failed.len(),
        "failed_cases": failed,
        "refine_steps": plan.refine_steps,
        "refine": (plan.refine_steps > 0).then_some(plan.refine),
        "mean_dice_before": mean(|r| r.dice_before),
        "mean_dice": mean(|r| r.dice_score),
        "mean_ssim": mean(|r| r.ssim_score),
        "mean_tre_before_mm": mean(|r| r.tre_before_mm),
        "mean_tre_mm": mean(|r| r.tre_mm),
        "mean_runtime_ms": mean(|r| r.runtime_ms),
        "workers": ok.iter().map(|r| r.worker.as_str()).collect::<HashSet<_>>().len(),
        "by_split": by_split,
    });
    let (state, reason) = if succeeded == 0 && !tasks.is_empty() {
        (
            JobState::Failed,
            format!(
                "every case failed ({}); first: {}",
                failed.len(),
                failed.first().map_or(String::new(), |f| format!(
                    "{}: {}",
                    f["case"].as_str().unwrap_or(""),
                    f["error"].as_str().unwrap_or("")
                ))
            ),
        )
    } else {
        (JobState::Succeeded, String::new())
    };
    Ok((state, reason, result.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use medray_core::refine::RefineSim;
    use medray_proto::v1::RefineSpec;

    fn spec(steps: u32, refine: Option<RefineSpec>) -> InferSpec {
        InferSpec {
            refine_steps: steps,
            refine,
            ..InferSpec::default()
        }
    }

    #[test]
    fn refine_options_fill_the_defaults_and_reject_bad_fields_by_name() {
        let none = refine_options(&spec(5, None)).unwrap();
        assert_eq!(none, RefineOptions::with_steps(5));
        let lncc = refine_options(&spec(
            5,
            Some(RefineSpec {
                sim: Some("lncc".into()),
                levels: Some(1),
                ..RefineSpec::default()
            }),
        ))
        .unwrap();
        assert_eq!(
            (lncc.sim, lncc.levels, lncc.lambda),
            (RefineSim::Lncc, 1, 5.0)
        );
        // What the workers get (JSON of the resolved options) gives back exactly these.
        let wire = serde_json::to_string(&lncc).unwrap();
        assert_eq!(
            serde_json::from_str::<RefineOptions>(&wire).unwrap(),
            lncc,
            "round trip"
        );
        for (bad, option) in [
            (
                RefineSpec {
                    sim: Some("ssd".into()),
                    ..RefineSpec::default()
                },
                "refine-sim",
            ),
            (
                RefineSpec {
                    levels: Some(9),
                    ..RefineSpec::default()
                },
                "refine-levels",
            ),
            (
                RefineSpec {
                    lambda: Some(f64::NAN),
                    ..RefineSpec::default()
                },
                "refine-lambda",
            ),
        ] {
            let e = refine_options(&spec(5, Some(bad))).unwrap_err().to_string();
            assert!(e.contains(option), "{e}");
        }
        let e = refine_options(&spec(20_000, None)).unwrap_err().to_string();
        assert!(e.contains("refine"), "{e}");
    }
}
