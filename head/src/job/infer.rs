//! Inference jobs: one task per case, results written as cases end.

use medray_core::catalog::DatasetName;
use medray_proto::v1::InferSpec;

use super::{Job, JobKind};
use crate::ids::TaskId;
use crate::infer::InferRun;
use crate::scheduler::{SchedulerMsg, TaskEnd};
use crate::store::TaskState;
use crate::Result;

/// Checks at submission that `spec`'s dataset, cases and model version exist, and pins the
/// version.
pub(super) fn pin_version(ctx: &crate::context::HeadContext, spec: &mut InferSpec) -> Result<()> {
    let catalog = ctx.catalog()?;
    let version = crate::infer::resolve_version(&catalog, spec)?;
    crate::infer::resolve_cases(&catalog, spec)?;
    spec.version = version.version;
    Ok(())
}

/// An inference job.
#[derive(Debug)]
pub(super) struct InferJob {
    spec: InferSpec,
    /// What its rows are written with, once started.
    run: Option<InferRun>,
}

impl InferJob {
    pub(super) fn new(spec: InferSpec) -> Self {
        Self { spec, run: None }
    }

    /// Ends the job once every case has ended and has its row.
    fn check_done(&self, job: &Job) -> Result<()> {
        let Some(run) = self.run.as_ref() else {
            return Ok(());
        };
        let tasks = job.ctx.store.tasks(&job.job_id)?;
        let ended = |t: &&crate::store::TaskRow| {
            matches!(t.state, TaskState::Succeeded | TaskState::Failed)
        };
        if !tasks
            .iter()
            .all(|t| ended(&t) && run.recorded.contains(&t.task_id))
        {
            return Ok(());
        }
        let catalog = job.ctx.catalog()?;
        let (state, reason, json) =
            crate::infer::summary(&catalog, &run.plan, &job.job_id, &tasks)?;
        job.log(format!("infer done: {json}"));
        job.ctx.store.set_job_result(&job.job_id, &json)?;
        job.end(state, &reason);
        Ok(())
    }
}

impl JobKind for InferJob {
    /// Plans an inference job (one task per case, the task id being the case id), caps how
    /// many workers run it at once, and queues the cases. After a head restart, the rows of
    /// cases that ended before it are written if they are missing.
    async fn start(&mut self, job: &mut Job) -> Result<()> {
        let spec = &self.spec;
        let mut catalog = job.ctx.catalog()?;
        let version = crate::infer::resolve_version(&catalog, spec)?;
        let dataset = DatasetName::new(spec.dataset.clone())?;
        let plan = crate::infer::InferPlan {
            splits: crate::infer::case_splits(&version, &catalog.cases(&dataset)?),
            dataset,
            model: version.name.clone(),
            version: version.version.clone(),
            refine_steps: spec.refine_steps,
            refine: crate::infer::refine_options(spec)?,
        };
        let existing = job.ctx.store.tasks(&job.job_id)?;
        if existing.is_empty() {
            let cases = crate::infer::resolve_cases(&catalog, spec)?;
            let tasks = crate::infer::plan_tasks(&plan, &version, &cases, spec.hold_ms)?;
            job.ctx.store.insert_tasks(&job.job_id, &tasks)?;
            job.log(format!(
                "infer: {} case(s) of dataset {} with model {}:{} (weights sha256 {}){}{}",
                tasks.len(),
                plan.dataset,
                plan.model,
                plan.version,
                version.artifact_sha256,
                if spec.refine_steps > 0 {
                    format!(
                        ", refined with {} Adam step(s) per level ({}, {} level(s), lambda {})",
                        spec.refine_steps,
                        plan.refine.sim.name(),
                        plan.refine.levels,
                        plan.refine.lambda
                    )
                } else {
                    String::new()
                },
                if spec.workers > 0 {
                    format!(", on at most {} worker(s) at once", spec.workers)
                } else {
                    String::new()
                }
            ));
        } else if job.resumed {
            job.requeue_after_restart(|n| {
                format!("head restarted: resuming the job ({n} running case(s) re-queued)")
            })?;
        }
        job.mark_running()?;
        let tasks = job.ctx.store.tasks(&job.job_id)?;
        let written: std::collections::HashSet<String> = medray_core::results::list_results(
            &catalog,
            &medray_core::results::ResultFilter {
                job_id: Some(job.job_id.to_string()),
                ..Default::default()
            },
        )?
        .into_iter()
        .map(|r| r.case_id.to_string())
        .collect();
        let mut recorded = std::collections::HashSet::new();
        let mut missing = Vec::new();
        for t in &tasks {
            if let Some(row) = crate::infer::row_of_ended_task(&plan, &job.job_id, t)? {
                if !written.contains(t.task_id.as_str()) {
                    missing.push(row);
                }
                recorded.insert(t.task_id.clone());
            }
        }
        if !missing.is_empty() {
            medray_core::results::record_results(&mut catalog, &missing)?;
        }
        self.run = Some(InferRun { plan, recorded });
        if spec.workers > 0 {
            job.scheduler.cast(SchedulerMsg::LimitJob {
                job_id: job.job_id.clone(),
                max_running: spec.workers as usize,
            })?;
        }
        job.enqueue_pending(&tasks)?;
        self.check_done(job)
    }

    /// A case ended: its row goes to the results table (replacing an earlier run's), and the
    /// job goes on; a case that will run again is only logged.
    fn task_ended(&mut self, job: &mut Job, task_id: TaskId, end: TaskEnd) -> Result<()> {
        let task_id = &task_id;
        let Some(run) = self.run.as_ref() else {
            return Ok(());
        };
        let plan = run.plan.clone();
        let row = match end {
            TaskEnd::Retrying(reason) => {
                job.log(format!("case {task_id} will run again: {reason}"));
                return Ok(());
            }
            TaskEnd::Succeeded {
                worker_id,
                result_json,
            } => match crate::infer::success_row(
                &plan,
                task_id,
                worker_id.as_str(),
                &job.job_id,
                &result_json,
            ) {
                Ok(row) => {
                    let fmt = |v: Option<f64>, d: usize| {
                        v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.d$}"))
                    };
                    job.log(
                        format!(
                            "case {task_id} done on {worker_id}: Dice {} -> {}, TRE {} -> {} mm, SSIM {}, folding {} %, {} ms",
                            fmt(row.dice_before, 4),
                            fmt(row.dice_score, 4),
                            fmt(row.tre_before_mm, 2),
                            fmt(row.tre_mm, 2),
                            fmt(row.ssim_score, 4),
                            fmt(row.folding_pct, 3),
                            fmt(row.runtime_ms, 0),
                        ),
                    );
                    row
                }
                Err(e) => {
                    let reason = format!("on {worker_id}: {e}");
                    job.log(format!("case {task_id} FAILED {reason}"));
                    crate::infer::failure_row(
                        &plan,
                        task_id,
                        worker_id.as_str(),
                        &job.job_id,
                        &reason,
                    )?
                }
            },
            TaskEnd::Failed(reason) => {
                let worker = job
                    .ctx
                    .store
                    .tasks(&job.job_id)?
                    .into_iter()
                    .find(|t| t.task_id == *task_id)
                    .and_then(|t| t.worker_id)
                    .map(|w| w.to_string())
                    .unwrap_or_default();
                job.log(format!("case {task_id} FAILED {reason}"));
                crate::infer::failure_row(&plan, task_id, &worker, &job.job_id, &reason)?
            }
        };
        let mut catalog = job.ctx.catalog()?;
        medray_core::results::record_results(&mut catalog, &[row])?;
        if let Some(run) = self.run.as_mut() {
            run.recorded.insert(task_id.clone());
        }
        self.check_done(job)
    }
}
