//! One actor per job, supervised by the [job manager](crate::manager). It plans the job's
//! tasks, waits for the resources it needs (staying PENDING with the reason), hears from the
//! scheduler how each task ends, writes the job's log, and ends the job exactly once.

use std::collections::BTreeMap;
use std::time::Duration;

use medray_core::catalog::{DatasetName, PublishOutcome};
use medray_core::ingest::{
    ingest_dir, ingest_learn2reg, ingest_manifest, ingest_synthetic, DownloadConfig, IngestOptions,
    IngestReport, Learn2RegConfig, LEARN2REG_URL,
};
use medray_core::synth::SynthConfig;
use medray_proto::v1::ingest_spec::Source;
use medray_proto::v1::job_spec::Kind;
use medray_proto::v1::task_assignment::Kind as TaskKind;
use medray_proto::v1::InferSpec;
use medray_proto::v1::{
    IngestSpec, JobSpec, JobState, SelftestSpec, SelftestTask, TaskAssignment, TrainSpec, TrainTask,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorMessage;

use crate::context::HeadContext;
use crate::ids::{JobId, TaskId, WorkerId};
use crate::registry::RegistryMsg;
use crate::scheduler::{SchedulerMsg, TaskEnd};
use crate::store::TaskState;
use crate::{HeadError, Result};

/// Default edge of the selftest input, voxels.
const SELFTEST_SIZE: u32 = 32;

/// The job actor.
#[derive(Debug)]
pub struct JobActor {
    /// Shared handles.
    pub ctx: HeadContext,
    /// The scheduler.
    pub scheduler: ActorRef<SchedulerMsg>,
    /// The registry.
    pub registry: ActorRef<RegistryMsg>,
}

/// Arguments of a job actor.
#[derive(Debug)]
pub struct JobArgs {
    /// The job.
    pub job_id: JobId,
    /// What it does.
    pub spec: JobSpec,
    /// True when the head restarted while the job was RUNNING.
    pub resumed: bool,
}

/// Messages of a job actor.
#[derive(RactorMessage)]
pub enum JobMsg {
    /// Plan and start (self-sent at spawn, and again while waiting for workers).
    Start,
    /// The scheduler's news about a task.
    TaskEnded {
        /// The task.
        task_id: TaskId,
        /// How it ended.
        end: TaskEnd,
    },
    /// An ingest finished (self-sent).
    IngestDone(std::result::Result<String, String>),
    /// The training coordinator ended: its result JSON or why it failed.
    TrainDone(std::result::Result<String, String>),
    /// An elastic training job (`workers` = 0) checks for workers that joined the cluster
    /// and gives each a replica task (self-sent every few seconds).
    Grow,
    /// Cancel the job; replies with an error if it cannot be cancelled now.
    Cancel(RpcReplyPort<Result<()>>),
}

impl std::fmt::Debug for JobMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Start => f.write_str("Start"),
            Self::TaskEnded { task_id, .. } => write!(f, "TaskEnded({task_id})"),
            Self::IngestDone(_) => f.write_str("IngestDone"),
            Self::TrainDone(_) => f.write_str("TrainDone"),
            Self::Grow => f.write_str("Grow"),
            Self::Cancel(_) => f.write_str("Cancel"),
        }
    }
}

/// Job actor state.
#[derive(Debug)]
pub struct JobActorState {
    job_id: JobId,
    spec: JobSpec,
    resumed: bool,
    started: bool,
    pending_reason: String,
    results: BTreeMap<TaskId, (WorkerId, String)>,
    ingest: Option<tokio::task::JoinHandle<()>>,
    /// The training coordinator, for a training job.
    trainer: Option<Trainer>,
    /// What an inference job registers with, once started.
    infer: Option<crate::infer::InferRun>,
}

/// A running training coordinator.
#[derive(Debug)]
struct Trainer {
    task: tokio::task::JoinHandle<()>,
    inbox: tokio::sync::mpsc::UnboundedSender<crate::train::CoordEvent>,
    /// Replica tasks created so far (replacements get the next number).
    tasks: usize,
}

impl JobActor {
    fn log(&self, s: &JobActorState, line: impl Into<String>) {
        self.ctx.logs.line(&s.job_id, line);
    }

    /// Ends the job once (a job that already ended is left as it is) and stops the actor.
    fn end(&self, myself: &ActorRef<JobMsg>, s: &JobActorState, state: JobState, reason: &str) {
        let changed = self
            .ctx
            .store
            .set_job_state(&s.job_id, state, reason)
            .unwrap_or(false);
        if changed {
            self.log(
                s,
                if reason.is_empty() {
                    format!("job {}", state.label())
                } else {
                    format!("job {}: {reason}", state.label())
                },
            );
            self.ctx.metrics.job_ended(state);
        }
        if state != JobState::Succeeded {
            let _ = self.ctx.store.cancel_tasks(&s.job_id);
            let _ = self
                .scheduler
                .cast(SchedulerMsg::CancelJob(s.job_id.clone()));
        }
        self.ctx.logs.wake();
        myself.stop(None);
    }

    /// Workers registered now.
    async fn live_workers(&self) -> Result<u32> {
        self.registry
            .call(RegistryMsg::LiveCount, Some(Duration::from_secs(5)))
            .await?
            .success_or_else(|| HeadError::Actor("registry did not answer".into()))
    }

    /// The live worker count when at least `wanted` (0: any one) are registered; otherwise
    /// the job waits PENDING with the reason, tries again shortly, and this returns `None`.
    async fn enough_workers(
        &self,
        myself: &ActorRef<JobMsg>,
        s: &mut JobActorState,
        wanted: u32,
    ) -> Result<Option<u32>> {
        let live = self.live_workers().await?;
        let needed = wanted.max(1);
        if live >= needed {
            return Ok(Some(live));
        }
        let reason = format!("needs {needed} worker(s), {live} registered");
        if reason != s.pending_reason {
            self.ctx
                .store
                .set_job_state(&s.job_id, JobState::Pending, &reason)?;
            self.log(s, format!("waiting: {reason}"));
            s.pending_reason = reason;
        }
        myself.send_after(Duration::from_millis(500), || JobMsg::Start);
        Ok(None)
    }

    async fn start_selftest(
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
            let n = self.ctx.store.requeue_running_tasks(&s.job_id)?;
            self.log(
                s,
                format!("head restarted: resuming the job ({n} running attempt(s) re-queued)"),
            );
        }
        self.ctx
            .store
            .set_job_state(&s.job_id, JobState::Running, "")?;
        s.started = true;
        let tasks = self.ctx.store.tasks(&s.job_id)?;
        for t in &tasks {
            if t.state == TaskState::Succeeded {
                if let (Some(w), Some(r)) = (&t.worker_id, &t.result_json) {
                    s.results.insert(t.task_id.clone(), (w.clone(), r.clone()));
                }
            }
        }
        let pending: Vec<TaskId> = tasks
            .iter()
            .filter(|t| t.state == TaskState::Pending)
            .map(|t| t.task_id.clone())
            .collect();
        self.scheduler.cast(SchedulerMsg::Enqueue {
            job_id: s.job_id.clone(),
            tasks: pending,
            job: myself.clone(),
        })?;
        self.check_done(myself, s)
    }

    /// The selftest's case: the first case of `spec.dataset`, or a small synthetic case the
    /// head ingests once (dataset `selftest`).
    async fn selftest_task(&self, spec: &SelftestSpec) -> Result<SelftestTask> {
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

    async fn run_ingest_blocking<F>(&self, f: F) -> Result<IngestReport>
    where
        F: FnOnce(
                &medray_core::stage::Stage,
                &mut medray_core::catalog::Catalog,
            ) -> medray_core::Result<IngestReport>
            + Send
            + 'static,
    {
        let ctx = self.ctx.clone();
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let _guard = handle.enter();
            let mut catalog = ctx.catalog()?;
            Ok(f(&ctx.stage, &mut catalog)?)
        })
        .await
        .map_err(|e| HeadError::Actor(format!("ingest thread: {e}")))?
    }

    fn start_ingest(
        &self,
        myself: &ActorRef<JobMsg>,
        s: &mut JobActorState,
        spec: IngestSpec,
    ) -> Result<()> {
        if s.resumed {
            self.log(
                s,
                "head restarted during the ingest: running it again (ingest is idempotent)",
            );
        }
        let mut options = IngestOptions::default()
            .with_skip_bad(spec.skip_bad)
            .with_replace(spec.replace);
        if !spec.name.is_empty() {
            options = options.with_name(DatasetName::new(spec.name.clone())?);
        }
        let source = spec
            .source
            .ok_or_else(|| HeadError::invalid("spec.ingest.source", "missing"))?;
        self.ctx
            .store
            .set_job_state(&s.job_id, JobState::Running, "")?;
        s.started = true;
        let ctx = self.ctx.clone();
        let job_id = s.job_id.clone();
        let me = myself.clone();
        let handle = tokio::runtime::Handle::current();
        let task = tokio::task::spawn_blocking(move || {
            let _guard = handle.enter();
            let logs = ctx.logs.clone();
            let mut last = (None, 0u64);
            let progress = |phase: medray_core::ingest::IngestPhase, done: u64, total: u64| {
                let pct = (done * 100).checked_div(total).unwrap_or(100);
                if last.0 != Some(phase) || pct >= last.1 + 10 || done == total {
                    logs.line(&job_id, format!("{phase:?}: {done}/{total}"));
                    last = (Some(phase), pct);
                }
            };
            let result: medray_core::Result<IngestReport> = (|| {
                let mut catalog = ctx
                    .catalog()
                    .map_err(|e| medray_core::Error::invalid("catalog", e.to_string()))?;
                match source {
                    Source::Synthetic(src) => {
                        let size: [usize; 3] = match src.size.as_slice() {
                            [] => [192, 192, 208],
                            [x, y, z] => [*x as usize, *y as usize, *z as usize],
                            _ => {
                                return Err(medray_core::Error::invalid(
                                    "spec.ingest.synthetic.size",
                                    "expected three values X Y Z",
                                ))
                            }
                        };
                        let config = SynthConfig::default()
                            .with_cases(src.cases as usize)
                            .with_size(size)
                            .with_seed(src.seed);
                        handle.block_on(ingest_synthetic(
                            &ctx.stage,
                            &mut catalog,
                            &config,
                            &options,
                            progress,
                        ))
                    }
                    Source::Dir(src) if src.path.ends_with(".csv") => {
                        handle.block_on(ingest_manifest(
                            &ctx.stage,
                            &mut catalog,
                            std::path::Path::new(&src.path),
                            &options,
                            progress,
                        ))
                    }
                    Source::Dir(src) => handle.block_on(ingest_dir(
                        &ctx.stage,
                        &mut catalog,
                        std::path::Path::new(&src.path),
                        &options,
                        progress,
                    )),
                    Source::Learn2reg(src) => {
                        let url = if src.url.is_empty() {
                            LEARN2REG_URL.to_string()
                        } else {
                            src.url
                        };
                        let mut download = DownloadConfig::new(url);
                        if !src.sha256.is_empty() {
                            download = download.with_sha256(src.sha256);
                        }
                        if !src.md5.is_empty() {
                            download = download.with_md5(src.md5);
                        }
                        let config = Learn2RegConfig::new(ctx.config.data_dir.join("downloads"))
                            .with_download(download);
                        handle.block_on(ingest_learn2reg(
                            &ctx.stage,
                            &mut catalog,
                            &config,
                            &options,
                            progress,
                        ))
                    }
                }
            })();
            let done = result.map(|r| {
                serde_json::json!({
                    "dataset": r.name.as_str(),
                    "outcome": match r.outcome {
                        PublishOutcome::Created => "created",
                        PublishOutcome::Unchanged => "unchanged",
                        PublishOutcome::Replaced { .. } => "replaced",
                    },
                    "cases": r.cases,
                    "bad_cases": r.bad.len(),
                    "bytes": r.bytes,
                    "objects_written": r.objects_written,
                })
                .to_string()
            });
            let _ = me.cast(JobMsg::IngestDone(done.map_err(|e| e.to_string())));
        });
        s.ingest = Some(task);
        Ok(())
    }

    fn check_done(&self, myself: &ActorRef<JobMsg>, s: &JobActorState) -> Result<()> {
        let tasks = self.ctx.store.tasks(&s.job_id)?;
        if tasks.iter().all(|t| t.state == TaskState::Succeeded) {
            let summary: Vec<serde_json::Value> = s
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
            self.ctx
                .store
                .set_job_result(&s.job_id, &serde_json::Value::Array(summary).to_string())?;
            self.end(myself, s, JobState::Succeeded, "");
        }
        Ok(())
    }
}

impl JobActor {
    /// Plans a training job: one task per replica, and the coordinator that drives them.
    async fn start_train(
        &self,
        myself: &ActorRef<JobMsg>,
        s: &mut JobActorState,
        spec: TrainSpec,
    ) -> Result<()> {
        if spec.model.is_empty() {
            return Err(HeadError::invalid("spec.train.model", "missing"));
        }
        // Checked now, so that a bad spec fails before it waits for workers.
        if spec.resume_from.is_empty() {
            crate::train::train_config(&spec)?;
        }
        let spec_workers = spec.workers;
        let existing = self.ctx.store.tasks(&s.job_id)?;
        let replicas;
        if existing.is_empty() {
            let Some(live) = self.enough_workers(myself, s, spec.workers).await? else {
                return Ok(());
            };
            replicas = if spec.workers == 0 {
                live
            } else {
                spec.workers
            } as usize;
            let tasks: Vec<(TaskId, TaskAssignment)> = (1..=replicas)
                .map(|i| (replica_task(i), train_assignment(&spec)))
                .collect();
            self.ctx.store.insert_tasks(&s.job_id, &tasks)?;
        } else {
            replicas = existing
                .iter()
                .filter(|t| !matches!(t.state, TaskState::Failed | TaskState::Cancelled))
                .count()
                .max(1);
            if s.resumed {
                let n = self.ctx.store.requeue_running_tasks(&s.job_id)?;
                self.log(
                    s,
                    format!("head restarted: resuming training from its last checkpoint ({n} replica(s) re-queued)"),
                );
            }
        }
        self.ctx
            .store
            .set_job_state(&s.job_id, JobState::Running, "")?;
        s.started = true;
        let (tx, inbox) = tokio::sync::mpsc::unbounded_channel();
        self.ctx.trainers.register(&s.job_id, tx.clone());
        let args = crate::train::CoordinatorArgs {
            ctx: self.ctx.clone(),
            job_id: s.job_id.clone(),
            spec,
            replicas,
            inbox,
        };
        let me = myself.clone();
        let task = tokio::spawn(async move {
            let result = crate::train::run(args).await;
            let _ = me.cast(JobMsg::TrainDone(result));
        });
        s.trainer = Some(Trainer {
            task,
            inbox: tx,
            tasks: existing.len().max(replicas),
        });
        if spec_workers == 0 {
            myself.send_after(GROW_EVERY, || JobMsg::Grow);
        }
        let pending: Vec<TaskId> = self
            .ctx
            .store
            .tasks(&s.job_id)?
            .iter()
            .filter(|t| t.state == TaskState::Pending)
            .map(|t| t.task_id.clone())
            .collect();
        self.scheduler.cast(SchedulerMsg::Enqueue {
            job_id: s.job_id.clone(),
            tasks: pending,
            job: myself.clone(),
        })?;
        Ok(())
    }

    /// Gives every live worker without a replica of this (elastic) job a new replica task;
    /// the coordinator admits it at the next epoch boundary.
    async fn grow(&self, myself: &ActorRef<JobMsg>, s: &mut JobActorState) -> Result<()> {
        let Some(trainer) = s.trainer.as_mut() else {
            return Ok(());
        };
        let live = self.live_workers().await? as usize;
        let active = self
            .ctx
            .store
            .tasks(&s.job_id)?
            .iter()
            .filter(|t| matches!(t.state, TaskState::Pending | TaskState::Running))
            .count();
        if live <= active {
            return Ok(());
        }
        let spec = match &s.spec.kind {
            Some(Kind::Train(spec)) => spec.clone(),
            _ => return Ok(()),
        };
        let mut new = Vec::new();
        for _ in active..live {
            trainer.tasks += 1;
            new.push((replica_task(trainer.tasks), train_assignment(&spec)));
        }
        self.ctx.store.insert_tasks(&s.job_id, &new)?;
        let ids: Vec<TaskId> = new.into_iter().map(|(id, _)| id).collect();
        self.log(
            s,
            format!(
                "{} more worker(s) in the cluster: replica task(s) {} added; they join at the next epoch boundary",
                ids.len(),
                ids.iter().map(TaskId::as_str).collect::<Vec<_>>().join(", ")
            ),
        );
        self.scheduler.cast(SchedulerMsg::Enqueue {
            job_id: s.job_id.clone(),
            tasks: ids,
            job: myself.clone(),
        })?;
        Ok(())
    }

    /// A replica's task ended: the coordinator hears of a lost replica; one that failed for
    /// good is replaced by a new task (the coordinator's failure budget bounds this).
    fn train_task_ended(
        &self,
        myself: &ActorRef<JobMsg>,
        s: &mut JobActorState,
        task_id: TaskId,
        end: TaskEnd,
    ) {
        let Some(trainer) = s.trainer.as_mut() else {
            return;
        };
        let (reason, replace) = match end {
            TaskEnd::Succeeded { worker_id, .. } => {
                self.log(s, format!("replica {task_id} on {worker_id} ended"));
                return;
            }
            TaskEnd::Retrying(reason) => (reason, false),
            TaskEnd::Failed(reason) => (reason, true),
        };
        let _ = trainer.inbox.send(crate::train::CoordEvent::TaskLost {
            task_id: task_id.clone(),
            reason: reason.clone(),
        });
        if replace {
            trainer.tasks += 1;
            let new_id = replica_task(trainer.tasks);
            let spec = match &s.spec.kind {
                Some(Kind::Train(spec)) => spec.clone(),
                _ => return,
            };
            let inserted = self
                .ctx
                .store
                .insert_tasks(&s.job_id, &[(new_id.clone(), train_assignment(&spec))]);
            if inserted.is_ok() {
                self.log(
                    s,
                    format!("replica {task_id} failed ({reason}); {new_id} will replace it when a worker is free"),
                );
                let _ = self.scheduler.cast(SchedulerMsg::Enqueue {
                    job_id: s.job_id.clone(),
                    tasks: vec![new_id],
                    job: myself.clone(),
                });
            }
        } else {
            self.log(s, format!("replica {task_id} will run again: {reason}"));
        }
    }
}

impl JobActor {
    /// Plans an inference job (one task per case, the task id being the case id), caps how
    /// many workers run it at once, and queues the cases. After a head restart, the rows of
    /// cases that ended before it are written if they are missing.
    fn start_infer(
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
            let n = self.ctx.store.requeue_running_tasks(&s.job_id)?;
            self.log(
                s,
                format!("head restarted: resuming the job ({n} running case(s) re-queued)"),
            );
        }
        self.ctx
            .store
            .set_job_state(&s.job_id, JobState::Running, "")?;
        s.started = true;
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
        let pending: Vec<TaskId> = tasks
            .iter()
            .filter(|t| t.state == TaskState::Pending)
            .map(|t| t.task_id.clone())
            .collect();
        self.scheduler.cast(SchedulerMsg::Enqueue {
            job_id: s.job_id.clone(),
            tasks: pending,
            job: myself.clone(),
        })?;
        self.check_infer_done(myself, s)
    }

    /// A case ended: its row goes to the results table (replacing an earlier run's), and the
    /// job goes on; a case that will run again is only logged.
    fn infer_task_ended(
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
    fn check_infer_done(&self, myself: &ActorRef<JobMsg>, s: &JobActorState) -> Result<()> {
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

/// How often an elastic training job looks for new workers.
const GROW_EVERY: Duration = Duration::from_secs(2);

fn replica_task(i: usize) -> TaskId {
    TaskId(format!("r{i:03}"))
}

fn train_assignment(spec: &TrainSpec) -> TaskAssignment {
    TaskAssignment {
        kind: Some(TaskKind::Train(TrainTask {
            dataset: spec.dataset.clone(),
        })),
        ..TaskAssignment::default()
    }
}

impl Actor for JobActor {
    type Msg = JobMsg;
    type State = JobActorState;
    type Arguments = JobArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: JobArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.cast(JobMsg::Start)?;
        Ok(JobActorState {
            job_id: args.job_id,
            spec: args.spec,
            resumed: args.resumed,
            started: false,
            pending_reason: String::new(),
            results: BTreeMap::new(),
            ingest: None,
            trainer: None,
            infer: None,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        s: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(trainer) = s.trainer.take() {
            // Dropping the coordinator ends the replicas' streams.
            trainer.task.abort();
            self.ctx.trainers.unregister(&s.job_id);
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        s: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            JobMsg::Start => {
                if s.started {
                    return Ok(());
                }
                let result = match s.spec.kind.clone() {
                    Some(Kind::Selftest(spec)) => self.start_selftest(&myself, s, &spec).await,
                    Some(Kind::Ingest(spec)) => self.start_ingest(&myself, s, spec),
                    Some(Kind::Train(spec)) => self.start_train(&myself, s, spec).await,
                    Some(Kind::Infer(spec)) => self.start_infer(&myself, s, &spec),
                    None => Err(HeadError::invalid("spec.kind", "missing")),
                };
                if let Err(e) = result {
                    self.end(&myself, s, JobState::Failed, &e.to_string());
                }
            }
            JobMsg::TaskEnded { task_id, end } if s.trainer.is_some() => {
                self.train_task_ended(&myself, s, task_id, end);
            }
            JobMsg::TaskEnded { task_id, end } if s.infer.is_some() => {
                if let Err(e) = self.infer_task_ended(&myself, s, &task_id, end) {
                    self.end(&myself, s, JobState::Failed, &e.to_string());
                }
            }
            JobMsg::TaskEnded { task_id, end } => match end {
                TaskEnd::Succeeded {
                    worker_id,
                    result_json,
                } => {
                    self.log(
                        s,
                        format!("task {task_id} succeeded on {worker_id}: {result_json}"),
                    );
                    s.results.insert(task_id, (worker_id, result_json));
                    if let Err(e) = self.check_done(&myself, s) {
                        self.end(&myself, s, JobState::Failed, &e.to_string());
                    }
                }
                TaskEnd::Retrying(reason) => {
                    self.log(s, format!("task {task_id} will run again: {reason}"));
                }
                TaskEnd::Failed(reason) => {
                    self.end(
                        &myself,
                        s,
                        JobState::Failed,
                        &format!("task {task_id} failed {reason}"),
                    );
                }
            },
            JobMsg::IngestDone(result) => match result {
                Ok(json) => {
                    self.log(s, format!("ingest done: {json}"));
                    let _ = self.ctx.store.set_job_result(&s.job_id, &json);
                    self.end(&myself, s, JobState::Succeeded, "");
                }
                Err(e) => self.end(&myself, s, JobState::Failed, &e),
            },
            JobMsg::Grow => {
                if let Err(e) = self.grow(&myself, s).await {
                    tracing::warn!(job = %s.job_id, error = %e, "cannot check for new workers");
                }
                myself.send_after(GROW_EVERY, || JobMsg::Grow);
            }
            JobMsg::TrainDone(result) => match result {
                Ok(json) => {
                    // Replacement replicas still queued are not needed any more.
                    let _ = self.ctx.store.cancel_pending_tasks(&s.job_id);
                    let _ = self.ctx.store.set_job_result(&s.job_id, &json);
                    self.end(&myself, s, JobState::Succeeded, "");
                }
                Err(reason) => self.end(&myself, s, JobState::Failed, &reason),
            },
            JobMsg::Cancel(reply) => {
                if s.ingest.is_some() {
                    let _ = reply.send(Err(HeadError::invalid(
                        "job_id",
                        "a running ingest cannot be cancelled (it publishes atomically, nothing is visible until it ends); wait for it to end",
                    )));
                } else {
                    // End first, so the caller reads the CANCELLED state.
                    self.end(&myself, s, JobState::Cancelled, "cancelled by the user");
                    let _ = reply.send(Ok(()));
                }
            }
        }
        Ok(())
    }
}
