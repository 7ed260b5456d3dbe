//! One actor per job, supervised by the [job manager](crate::manager). It waits for the
//! resources its job needs (staying PENDING with the reason), hears from the scheduler how
//! each task ends, writes the job's log, and ends the job exactly once.
//!
//! What a job *does* is its kind's: one [`JobKind`] implementation per kind, each in its own
//! module: `selftest.rs`, `ingest.rs`, `train.rs` and `infer.rs`. [`spawn`] is the one place
//! that maps a spec to its kind. The actor, [`JobActor`], is generic over the kind; this
//! module holds it, its messages, and [`Job`], what every kind uses (the job's identity,
//! logging, waiting for workers, queueing tasks, ending the job).
//!
//! Adding a kind: a `JobSpec` variant in `proto/medray.proto`, a module here implementing
//! [`JobKind`], an arm in [`spawn`] and in [`kind_of`].

use std::future::Future;
use std::marker::PhantomData;
use std::time::Duration;

use medray_proto::v1::job_spec::Kind;
use medray_proto::v1::{JobSpec, JobState};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use ractor_cluster::RactorMessage;

use crate::context::HeadContext;
use crate::ids::{JobId, TaskId};
use crate::registry::RegistryMsg;
use crate::scheduler::{SchedulerMsg, TaskEnd};
use crate::store::{TaskRow, TaskState};
use crate::train::CoordMsg;
use crate::{HeadError, Result};

mod infer;
mod ingest;
mod selftest;
mod train;

use infer::InferJob;
use ingest::IngestJob;
use selftest::SelftestJob;
use train::TrainJob;

/// What a job does: planning its tasks, following them, and what it runs on the head.
///
/// The [`JobActor`] calls these in order: [`start`](Self::start) (again while the job waits
/// for workers), then [`task_ended`](Self::task_ended) as the scheduler reports, and
/// [`work_done`](Self::work_done) when work the kind started on the head (an ingest, a
/// training coordinator) ends. A kind ends its job with [`Job::end`]; an error it returns
/// fails the job.
pub trait JobKind: Send + Sync + 'static {
    /// Plans the job's tasks (or, after a head restart, picks up the ones recorded) and
    /// starts it; while it waits for workers it leaves the job PENDING with
    /// [`Job::enough_workers`], which sends `Start` again shortly.
    fn start(&mut self, job: &mut Job) -> impl Future<Output = Result<()>> + Send;

    /// A task of the job ended, will run again, or failed for good.
    ///
    /// # Errors
    /// A store or catalog error: the job fails.
    fn task_ended(&mut self, job: &mut Job, task_id: TaskId, end: TaskEnd) -> Result<()>;

    /// Work the kind runs on the head ended: its result JSON, or why it failed.
    fn work_done(&mut self, job: &mut Job, result: std::result::Result<String, String>) {
        job.end_with(result);
    }

    /// A tick the kind asked for with [`Job::tick_after`].
    fn tick(&mut self, _job: &mut Job) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }

    /// Why the job cannot be cancelled now (`None`: it can).
    fn cancel_refused(&self) -> Option<&'static str> {
        None
    }

    /// The job's training coordinator, for a training job that has one now.
    fn coordinator(&self) -> Option<ActorRef<CoordMsg>> {
        None
    }

    /// The job's actor stops: background work the kind started ends here.
    fn stopped(&mut self) {}
}

/// The kind label of a spec (the `kind` column of the job table).
#[must_use]
pub fn kind_of(spec: &JobSpec) -> &'static str {
    match spec.kind {
        Some(Kind::Selftest(_)) => "selftest",
        Some(Kind::Ingest(_)) => "ingest",
        Some(Kind::Train(_)) => "train",
        Some(Kind::Infer(_)) => "infer",
        None => "unknown",
    }
}

/// The log line that ends a job.
pub(crate) fn end_line(state: JobState, reason: &str) -> String {
    if reason.is_empty() {
        format!("job {}", state.label())
    } else {
        format!("job {}: {reason}", state.label())
    }
}

/// What a submitted spec must settle before the job is recorded: an inference job is
/// refused now if its dataset, a case or its model version does not exist, and its version
/// is pinned, so the job keeps it if the alias moves meanwhile.
///
/// # Errors
/// [`HeadError::Core`] naming what is missing.
pub fn prepare(ctx: &HeadContext, spec: &mut JobSpec) -> Result<()> {
    if let Some(Kind::Infer(infer)) = spec.kind.as_mut() {
        infer::pin_version(ctx, infer)?;
    }
    Ok(())
}

/// Handles a job actor needs besides its job.
#[derive(Debug, Clone)]
pub struct JobHandles {
    /// Shared handles.
    pub ctx: HeadContext,
    /// The scheduler.
    pub scheduler: ActorRef<SchedulerMsg>,
    /// The registry.
    pub registry: ActorRef<RegistryMsg>,
}

/// Starts the actor of a job, of the kind its spec names, linked under `supervisor`.
///
/// # Errors
/// [`HeadError::InvalidArgument`] for a spec without a kind; [`HeadError::Actor`] if the
/// actor does not start.
pub async fn spawn(
    handles: JobHandles,
    job_id: JobId,
    spec: JobSpec,
    resumed: bool,
    supervisor: ActorCell,
) -> Result<ActorRef<JobMsg>> {
    let kind = spec
        .kind
        .ok_or_else(|| HeadError::invalid("spec.kind", "missing"))?;
    let (h, id, r, sup) = (handles, job_id, resumed, supervisor);
    match kind {
        Kind::Selftest(s) => spawn_kind(h, id, SelftestJob::new(s), r, sup).await,
        Kind::Ingest(s) => spawn_kind(h, id, IngestJob::new(s), r, sup).await,
        Kind::Train(s) => spawn_kind(h, id, TrainJob::new(s), r, sup).await,
        Kind::Infer(s) => spawn_kind(h, id, InferJob::new(*s), r, sup).await,
    }
}

async fn spawn_kind<K: JobKind>(
    handles: JobHandles,
    job_id: JobId,
    kind: K,
    resumed: bool,
    supervisor: ActorCell,
) -> Result<ActorRef<JobMsg>> {
    let (actor, _) = Actor::spawn_linked(
        None,
        JobActor::<K> {
            handles,
            kind: PhantomData,
        },
        JobArgs {
            job_id: job_id.clone(),
            kind,
            resumed,
        },
        supervisor,
    )
    .await
    .map_err(|e| HeadError::Actor(format!("spawning the actor of {job_id}: {e}")))?;
    Ok(actor)
}

/// The actor of one job of kind `K`.
#[derive(Debug)]
pub struct JobActor<K> {
    handles: JobHandles,
    kind: PhantomData<fn() -> K>,
}

/// Arguments of a job actor.
#[derive(Debug)]
pub struct JobArgs<K> {
    /// The job.
    pub job_id: JobId,
    /// What it does.
    pub kind: K,
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
    /// Work the kind runs on the head (an ingest, a training coordinator) ended: its result
    /// JSON or why it failed.
    WorkDone(std::result::Result<String, String>),
    /// A tick the kind asked for (an elastic training job looking for new workers).
    Tick,
    /// Cancel the job; replies with an error if it cannot be cancelled now.
    Cancel(RpcReplyPort<Result<()>>),
    /// The training coordinator of this job, if it is a training job that has one now.
    Coordinator(RpcReplyPort<Option<ActorRef<CoordMsg>>>),
}

impl std::fmt::Debug for JobMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Start => f.write_str("Start"),
            Self::TaskEnded { task_id, .. } => write!(f, "TaskEnded({task_id})"),
            Self::WorkDone(_) => f.write_str("WorkDone"),
            Self::Tick => f.write_str("Tick"),
            Self::Cancel(_) => f.write_str("Cancel"),
            Self::Coordinator(_) => f.write_str("Coordinator"),
        }
    }
}

/// What every kind uses: the job's identity and state, and the head's handles.
#[derive(Debug)]
pub struct Job {
    /// Shared handles.
    pub ctx: HeadContext,
    /// The scheduler.
    pub scheduler: ActorRef<SchedulerMsg>,
    registry: ActorRef<RegistryMsg>,
    /// The job's actor.
    pub myself: ActorRef<JobMsg>,
    /// The job.
    pub job_id: JobId,
    /// True when the head restarted while the job was RUNNING.
    pub resumed: bool,
    /// Its tasks are planned and it runs.
    started: bool,
    /// Why it waits, as last recorded.
    pending_reason: String,
}

impl Job {
    /// A line in the job's log.
    pub fn log(&self, line: impl Into<String>) {
        self.ctx.logs.line(&self.job_id, line);
    }

    /// Ends the job once (a job that already ended is left as it is) and stops the actor.
    pub fn end(&self, state: JobState, reason: &str) {
        let line = end_line(state, reason);
        // The state and its line in one transaction: a follower that sees the end has the
        // line.
        match self.ctx.store.end_job(&self.job_id, state, reason, &line) {
            Ok(true) => {
                tracing::info!(job_id = %self.job_id, "{line}");
                self.ctx.metrics.job_ended(state);
            }
            Ok(false) => {}
            Err(e) => tracing::error!(job_id = %self.job_id, error = %e, "cannot end the job"),
        }
        if state != JobState::Succeeded {
            let _ = self.ctx.store.cancel_tasks(&self.job_id);
            let _ = self
                .scheduler
                .cast(SchedulerMsg::CancelJob(self.job_id.clone()));
        }
        self.ctx.logs.wake();
        self.myself.stop(None);
    }

    /// Ends the job with the result of its work: SUCCEEDED with the result JSON, or FAILED
    /// with the reason.
    pub fn end_with(&self, result: std::result::Result<String, String>) {
        match result {
            Ok(json) => {
                let _ = self.ctx.store.set_job_result(&self.job_id, &json);
                self.end(JobState::Succeeded, "");
            }
            Err(reason) => self.end(JobState::Failed, &reason),
        }
    }

    /// Workers registered now.
    ///
    /// # Errors
    /// [`HeadError::Actor`] if the registry does not answer.
    pub async fn live_workers(&self) -> Result<u32> {
        self.registry
            .call(RegistryMsg::LiveCount, Some(Duration::from_secs(5)))
            .await?
            .success_or_else(|| HeadError::Actor("registry did not answer".into()))
    }

    /// The live worker count when at least `wanted` (0: any one) are registered; otherwise
    /// the job waits PENDING with the reason, `Start` comes again shortly, and this returns
    /// `None`.
    ///
    /// # Errors
    /// A registry or store error.
    pub async fn enough_workers(&mut self, wanted: u32) -> Result<Option<u32>> {
        let live = self.live_workers().await?;
        let needed = wanted.max(1);
        if live >= needed {
            return Ok(Some(live));
        }
        let reason = format!("needs {needed} worker(s), {live} registered");
        if reason != self.pending_reason {
            self.ctx
                .store
                .set_job_state(&self.job_id, JobState::Pending, &reason)?;
            self.log(format!("waiting: {reason}"));
            self.pending_reason = reason;
        }
        self.myself
            .send_after(Duration::from_millis(500), || JobMsg::Start);
        Ok(None)
    }

    /// After a head restart: puts the job's running attempts back in the queue and logs how
    /// many (`line` words it for the kind).
    ///
    /// # Errors
    /// A store error.
    pub fn requeue_after_restart(&self, line: impl FnOnce(usize) -> String) -> Result<()> {
        let n = self.ctx.store.requeue_running_tasks(&self.job_id)?;
        self.log(line(n));
        Ok(())
    }

    /// Hands the PENDING ones of `tasks` to the scheduler.
    ///
    /// # Errors
    /// [`HeadError::Actor`] if the scheduler is gone.
    pub fn enqueue_pending(&self, tasks: &[TaskRow]) -> Result<()> {
        let pending: Vec<TaskId> = tasks
            .iter()
            .filter(|t| t.state == TaskState::Pending)
            .map(|t| t.task_id.clone())
            .collect();
        self.enqueue(pending)
    }

    /// Hands `tasks` to the scheduler.
    ///
    /// # Errors
    /// [`HeadError::Actor`] if the scheduler is gone.
    pub fn enqueue(&self, tasks: Vec<TaskId>) -> Result<()> {
        self.scheduler.cast(SchedulerMsg::Enqueue {
            job_id: self.job_id.clone(),
            tasks,
            job: self.myself.clone(),
        })?;
        Ok(())
    }

    /// Marks the job RUNNING (its tasks are planned).
    ///
    /// # Errors
    /// A store error.
    pub fn mark_running(&mut self) -> Result<()> {
        self.ctx
            .store
            .set_job_state(&self.job_id, JobState::Running, "")?;
        self.started = true;
        Ok(())
    }

    /// Asks for a [`JobKind::tick`] after `delay`.
    pub fn tick_after(&self, delay: Duration) {
        self.myself.send_after(delay, || JobMsg::Tick);
    }
}

/// Job actor state: the job and its kind.
#[derive(Debug)]
pub struct JobActorState<K> {
    job: Job,
    kind: K,
}

impl<K: JobKind> Actor for JobActor<K> {
    type Msg = JobMsg;
    type State = JobActorState<K>;
    type Arguments = JobArgs<K>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: JobArgs<K>,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.cast(JobMsg::Start)?;
        let JobHandles {
            ctx,
            scheduler,
            registry,
        } = self.handles.clone();
        Ok(JobActorState {
            job: Job {
                ctx,
                scheduler,
                registry,
                myself,
                job_id: args.job_id,
                resumed: args.resumed,
                started: false,
                pending_reason: String::new(),
            },
            kind: args.kind,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        s: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        s.kind.stopped();
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        s: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // A child (the training coordinator) reports its end with `WorkDone` before it
        // stops, so only a failure is news here.
        if let SupervisionEvent::ActorFailed(_, err) = event {
            s.job.end(JobState::Failed, &err.to_string());
        }
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        s: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let JobActorState { job, kind } = s;
        match message {
            JobMsg::Start => {
                if !job.started {
                    if let Err(e) = kind.start(job).await {
                        job.end(JobState::Failed, &e.to_string());
                    }
                }
            }
            JobMsg::TaskEnded { task_id, end } => {
                if let Err(e) = kind.task_ended(job, task_id, end) {
                    job.end(JobState::Failed, &e.to_string());
                }
            }
            JobMsg::WorkDone(result) => kind.work_done(job, result),
            JobMsg::Tick => {
                if let Err(e) = kind.tick(job).await {
                    tracing::warn!(job = %job.job_id, error = %e, "job tick failed");
                }
            }
            JobMsg::Cancel(reply) => {
                if let Some(why) = kind.cancel_refused() {
                    let _ = reply.send(Err(HeadError::invalid("job_id", why)));
                } else {
                    // End first, so the caller reads the CANCELLED state.
                    job.end(JobState::Cancelled, "cancelled by the user");
                    let _ = reply.send(Ok(()));
                }
            }
            JobMsg::Coordinator(reply) => {
                let _ = reply.send(kind.coordinator());
            }
        }
        Ok(())
    }
}
