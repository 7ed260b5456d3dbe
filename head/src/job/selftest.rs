//! `medray selftest`: one task per worker (or per asked task), each running LocalNet on a
//! synthetic input.

use std::collections::BTreeMap;

use medray_core::catalog::DatasetName;
use medray_core::ingest::{ingest_synthetic, IngestOptions};
use medray_core::synth::SynthConfig;
use medray_proto::v1::task_assignment::Kind as TaskKind;
use medray_proto::v1::{JobState, SelftestSpec, SelftestTask, TaskAssignment};

use super::{ingest::run_ingest_blocking, Job, JobKind};
use crate::ids::{TaskId, WorkerId};
use crate::scheduler::TaskEnd;
use crate::store::TaskState;
use crate::{HeadError, Result};

/// Default edge of the selftest input, voxels.
const SELFTEST_SIZE: u32 = 32;

/// A selftest job.
#[derive(Debug)]
pub(super) struct SelftestJob {
    spec: SelftestSpec,
    /// Each succeeded task's worker and result JSON.
    results: BTreeMap<TaskId, (WorkerId, String)>,
}

impl SelftestJob {
    pub(super) fn new(spec: SelftestSpec) -> Self {
        Self {
            spec,
            results: BTreeMap::new(),
        }
    }

    /// Ends the job once every task succeeded, with their results.
    fn check_done(&self, job: &Job) -> Result<()> {
        let tasks = job.ctx.store.tasks(&job.job_id)?;
        if tasks.iter().all(|t| t.state == TaskState::Succeeded) {
            let summary: Vec<serde_json::Value> = self
                .results
                .iter()
                .map(|(task, (worker, json))| {
                    serde_json::json!({
                        "task": task.as_str(),
                        "worker": worker.as_str(),
                        "result": serde_json::from_str::<serde_json::Value>(json).unwrap_or(serde_json::Value::Null),
                    })
                })
                .collect();
            job.ctx
                .store
                .set_job_result(&job.job_id, &serde_json::Value::Array(summary).to_string())?;
            job.end(JobState::Succeeded, "");
        }
        Ok(())
    }
}

impl JobKind for SelftestJob {
    async fn start(&mut self, job: &mut Job) -> Result<()> {
        let spec = &self.spec;
        let existing = job.ctx.store.tasks(&job.job_id)?;
        if existing.is_empty() {
            let Some(live) = job.enough_workers(spec.workers).await? else {
                return Ok(());
            };
            let count = if spec.workers == 0 {
                live
            } else {
                spec.workers
            };
            let task = selftest_task(job, spec).await?;
            let tasks: Vec<(TaskId, TaskAssignment)> = (1..=count)
                .map(|i| {
                    (
                        TaskId(format!("t{i:04}")),
                        TaskAssignment {
                            kind: Some(TaskKind::Selftest(task.clone())),
                            ..TaskAssignment::default()
                        },
                    )
                })
                .collect();
            job.ctx.store.insert_tasks(&job.job_id, &tasks)?;
            job.log(format!(
                "selftest: {count} task(s) on {live} worker(s), case {} / {} at {}^3",
                task.fixed_key, task.moving_key, task.size
            ));
        } else if job.resumed {
            job.requeue_after_restart(|n| {
                format!("head restarted: resuming the job ({n} running attempt(s) re-queued)")
            })?;
        }
        job.mark_running()?;
        let tasks = job.ctx.store.tasks(&job.job_id)?;
        for t in &tasks {
            if t.state == TaskState::Succeeded {
                if let (Some(w), Some(r)) = (&t.worker_id, &t.result_json) {
                    self.results
                        .insert(t.task_id.clone(), (w.clone(), r.clone()));
                }
            }
        }
        job.enqueue_pending(&tasks)?;
        self.check_done(job)
    }

    fn task_ended(&mut self, job: &mut Job, task_id: TaskId, end: TaskEnd) -> Result<()> {
        match end {
            TaskEnd::Succeeded {
                worker_id,
                result_json,
            } => {
                job.log(format!(
                    "task {task_id} succeeded on {worker_id}: {result_json}"
                ));
                self.results.insert(task_id, (worker_id, result_json));
                self.check_done(job)?;
            }
            TaskEnd::Retrying(reason) => {
                job.log(format!("task {task_id} will run again: {reason}"));
            }
            TaskEnd::Failed(reason) => {
                job.end(JobState::Failed, &format!("task {task_id} failed {reason}"));
            }
        }
        Ok(())
    }
}

/// The selftest's case: the first case of `spec.dataset`, or a small synthetic case the head
/// ingests once (dataset `selftest`).
async fn selftest_task(job: &Job, spec: &SelftestSpec) -> Result<SelftestTask> {
    let dataset = if spec.dataset.is_empty() {
        let name = DatasetName::new("selftest")?;
        let config = SynthConfig::default()
            .with_cases(1)
            .with_size([32, 32, 32])
            .with_seed(0);
        let options = IngestOptions::default().with_name(name.clone());
        run_ingest_blocking(&job.ctx, move |stage, catalog| {
            tokio::runtime::Handle::current().block_on(ingest_synthetic(
                stage,
                catalog,
                &config,
                &options,
                |_, _, _| {},
            ))
        })
        .await?;
        name
    } else {
        DatasetName::new(spec.dataset.clone())?
    };
    let cases = job.ctx.catalog()?.cases(&dataset)?;
    let case = cases.first().ok_or_else(|| HeadError::NotFound {
        what: "dataset (or it has no case)",
        id: dataset.as_str().to_string(),
    })?;
    Ok(SelftestTask {
        fixed_key: case.fixed.key.as_str().to_string(),
        fixed_sha256: case.fixed.sha256.clone(),
        moving_key: case.moving.key.as_str().to_string(),
        moving_sha256: case.moving.sha256.clone(),
        size: if spec.size == 0 {
            SELFTEST_SIZE
        } else {
            spec.size
        },
        hold_ms: spec.hold_ms,
        log_lines: spec.log_lines,
    })
}
