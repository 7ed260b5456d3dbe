//! `medray selftest`: one task per worker (or per asked task), each running LocalNet on a
//! synthetic input.

use super::*;

impl JobActor {
    pub(super) async fn start_selftest(
        &self,
        myself: &ActorRef<JobMsg>,
        s: &mut JobActorState,
        spec: &SelftestSpec,
    ) -> Result<()> {
        let existing = self.ctx.store.tasks(&s.job_id)?;
        if existing.is_empty() {
            let Some(live) = self.enough_workers(myself, s, spec.workers).await? else {
                return Ok(());
            };
            let count = if spec.workers == 0 {
                live
            } else {
                spec.workers
            };
            let task = self.selftest_task(spec).await?;
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
            self.ctx.store.insert_tasks(&s.job_id, &tasks)?;
            self.log(
                s,
                format!(
                    "selftest: {count} task(s) on {live} worker(s), case {} / {} at {}^3",
                    task.fixed_key, task.moving_key, task.size
                ),
            );
        } else if s.resumed {
            self.requeue_after_restart(s, |n| {
                format!("head restarted: resuming the job ({n} running attempt(s) re-queued)")
            })?;
        }
        self.mark_running(s)?;
        let tasks = self.ctx.store.tasks(&s.job_id)?;
        for t in &tasks {
            if t.state == TaskState::Succeeded {
                if let (Some(w), Some(r)) = (&t.worker_id, &t.result_json) {
                    s.results.insert(t.task_id.clone(), (w.clone(), r.clone()));
                }
            }
        }
        self.enqueue_pending(myself, s, &tasks)?;
        self.check_done(myself, s)
    }

    /// The selftest's case: the first case of `spec.dataset`, or a small synthetic case the
    /// head ingests once (dataset `selftest`).
    pub(super) async fn selftest_task(&self, spec: &SelftestSpec) -> Result<SelftestTask> {
        let dataset = if spec.dataset.is_empty() {
            let name = DatasetName::new("selftest")?;
            let config = SynthConfig::default()
                .with_cases(1)
                .with_size([32, 32, 32])
                .with_seed(0);
            let options = IngestOptions::default().with_name(name.clone());
            self.run_ingest_blocking(move |stage, catalog| {
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
        let cases = self.ctx.catalog()?.cases(&dataset)?;
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
}
