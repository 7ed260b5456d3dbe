//! One actor per job, supervised by the [job manager](crate::manager). It plans the job's
//! tasks, waits for the resources it needs (staying PENDING with the reason), hears from the
//! scheduler how each task ends, writes the job's log, and ends the job exactly once.
//!
//! Each kind plans and follows its tasks in its own module: `selftest.rs`, `ingest.rs`,
//! `train.rs` and `infer.rs`; this module holds what they share (the actor, its messages and
//! state, ending a job).

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
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use ractor_cluster::RactorMessage;

use crate::context::HeadContext;
use crate::ids::{JobId, TaskId, WorkerId};
use crate::registry::RegistryMsg;
use crate::scheduler::{SchedulerMsg, TaskEnd};
use crate::store::{TaskRow, TaskState};
use crate::{HeadError, Result};

mod infer;
mod ingest;
mod selftest;
mod train;

use train::GROW_EVERY;

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
    /// The training coordinator of this job, if it is a training job that has one now.
    Coordinator(RpcReplyPort<Option<ActorRef<crate::train::CoordMsg>>>),
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
            Self::Coordinator(_) => f.write_str("Coordinator"),
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
    /// The coordinator actor, linked under the job's.
    coordinator: ActorRef<crate::train::CoordMsg>,
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

    /// After a head restart: puts the job's running attempts back in the queue and logs how
    /// many (`line` words it for the kind).
    fn requeue_after_restart(
        &self,
        s: &JobActorState,
        line: impl FnOnce(usize) -> String,
    ) -> Result<()> {
        let n = self.ctx.store.requeue_running_tasks(&s.job_id)?;
        self.log(s, line(n));
        Ok(())
    }

    /// Hands the PENDING ones of `tasks` to the scheduler.
    fn enqueue_pending(
        &self,
        myself: &ActorRef<JobMsg>,
        s: &JobActorState,
        tasks: &[TaskRow],
    ) -> Result<()> {
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
        Ok(())
    }

    /// Marks the job RUNNING (its tasks are planned).
    fn mark_running(&self, s: &mut JobActorState) -> Result<()> {
        self.ctx
            .store
            .set_job_state(&s.job_id, JobState::Running, "")?;
        s.started = true;
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
            // Stopping the coordinator ends the replicas' streams.
            trainer.coordinator.stop(Some("its job ended".into()));
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        s: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // The one child is the training coordinator; it reports its end with `TrainDone`
        // before it stops, so only a failure is news here.
        if let SupervisionEvent::ActorFailed(_, err) = event {
            s.trainer = None;
            self.end(&myself, s, JobState::Failed, &err.to_string());
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
            JobMsg::Coordinator(reply) => {
                let _ = reply.send(s.trainer.as_ref().map(|t| t.coordinator.clone()));
            }
        }
        Ok(())
    }
}
