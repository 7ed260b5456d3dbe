//! Inference jobs: one task per case, results written as cases end.

use super::*;

impl JobActor {
    /// Plans an inference job (one task per case, the task id being the case id), caps how
    /// many workers run it at once, and queues the cases. After a head restart, the rows of
    /// cases that ended before it are written if they are missing.
    pub(super) fn start_infer(
        &self,
        myself: &ActorRef<JobMsg>,
        s: &mut JobActorState,
        spec: &InferSpec,
    ) -> Result<()> {
        let mut catalog = self.ctx.catalog()?;
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
        let existing = self.ctx.store.tasks(&s.job_id)?;
        if existing.is_empty() {
            let cases = crate::infer::resolve_cases(&catalog, spec)?;
            let tasks = crate::infer::plan_tasks(&plan, &version, &cases, spec.hold_ms)?;
            self.ctx.store.insert_tasks(&s.job_id, &tasks)?;
            self.log(
                s,
                format!(
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
                ),
            );
        } else if s.resumed {
            self.requeue_after_restart(s, |n| {
                format!("head restarted: resuming the job ({n} running case(s) re-queued)")
            })?;
        }
        self.mark_running(s)?;
        let tasks = self.ctx.store.tasks(&s.job_id)?;
        let written: std::collections::HashSet<String> = medray_core::results::list_results(
            &catalog,
            &medray_core::results::ResultFilter {
                job_id: Some(s.job_id.to_string()),
                ..Default::default()
            },
        )?
        .into_iter()
        .map(|r| r.case_id.to_string())
        .collect();
        let mut recorded = std::collections::HashSet::new();
        let mut missing = Vec::new();
        for t in &tasks {
            if let Some(row) = crate::infer::row_of_ended_task(&plan, &s.job_id, t)? {
                if !written.contains(t.task_id.as_str()) {
                    missing.push(row);
                }
                recorded.insert(t.task_id.clone());
            }
        }
        if !missing.is_empty() {
            medray_core::results::record_results(&mut catalog, &missing)?;
        }
        s.infer = Some(crate::infer::InferRun { plan, recorded });
        if spec.workers > 0 {
            self.scheduler.cast(SchedulerMsg::LimitJob {
                job_id: s.job_id.clone(),
                max_running: spec.workers as usize,
            })?;
        }
        self.enqueue_pending(myself, s, &tasks)?;
        self.check_infer_done(myself, s)
    }

    /// A case ended: its row goes to the results table (replacing an earlier run's), and the
    /// job goes on; a case that will run again is only logged.
    pub(super) fn infer_task_ended(
        &self,
        myself: &ActorRef<JobMsg>,
        s: &mut JobActorState,
        task_id: &TaskId,
        end: TaskEnd,
    ) -> Result<()> {
        let Some(run) = s.infer.as_ref() else {
            return Ok(());
        };
        let plan = run.plan.clone();
        let row = match end {
            TaskEnd::Retrying(reason) => {
                self.log(s, format!("case {task_id} will run again: {reason}"));
                return Ok(());
            }
            TaskEnd::Succeeded {
                worker_id,
                result_json,
            } => match crate::infer::success_row(
                &plan,
                task_id,
                worker_id.as_str(),
                &s.job_id,
                &result_json,
            ) {
                Ok(row) => {
                    let fmt = |v: Option<f64>, d: usize| {
                        v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.d$}"))
                    };
                    self.log(
                        s,
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
                    self.log(s, format!("case {task_id} FAILED {reason}"));
                    crate::infer::failure_row(
                        &plan,
                        task_id,
                        worker_id.as_str(),
                        &s.job_id,
                        &reason,
                    )?
                }
            },
            TaskEnd::Failed(reason) => {
                let worker = self
                    .ctx
                    .store
                    .tasks(&s.job_id)?
                    .into_iter()
                    .find(|t| t.task_id == *task_id)
                    .and_then(|t| t.worker_id)
                    .map(|w| w.to_string())
                    .unwrap_or_default();
                self.log(s, format!("case {task_id} FAILED {reason}"));
                crate::infer::failure_row(&plan, task_id, &worker, &s.job_id, &reason)?
            }
        };
        let mut catalog = self.ctx.catalog()?;
        medray_core::results::record_results(&mut catalog, &[row])?;
        if let Some(run) = s.infer.as_mut() {
            run.recorded.insert(task_id.clone());
        }
        self.check_infer_done(myself, s)
    }

    /// Ends the job once every case has ended and has its row.
    pub(super) fn check_infer_done(
        &self,
        myself: &ActorRef<JobMsg>,
        s: &JobActorState,
    ) -> Result<()> {
        let Some(run) = s.infer.as_ref() else {
            return Ok(());
        };
        let tasks = self.ctx.store.tasks(&s.job_id)?;
        let ended = |t: &&crate::store::TaskRow| {
            matches!(t.state, TaskState::Succeeded | TaskState::Failed)
        };
        if !tasks
            .iter()
            .all(|t| ended(&t) && run.recorded.contains(&t.task_id))
        {
            return Ok(());
        }
        let catalog = self.ctx.catalog()?;
        let (state, reason, json) = crate::infer::summary(&catalog, &run.plan, &s.job_id, &tasks)?;
        self.log(s, format!("infer done: {json}"));
        self.ctx.store.set_job_result(&s.job_id, &json)?;
        self.end(myself, s, state, &reason);
        Ok(())
    }
}
