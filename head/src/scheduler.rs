//! The scheduler actor: a FIFO queue of pending tasks and the set of usable workers. It
//! starts an attempt (recorded in the store first, so a result is always matched against
//! the attempt that is current), sends the assignment to the worker actor over
//! ractor_cluster and waits for its acknowledgement with a timeout. A lost worker's attempt
//! goes back to the front of the queue; a result from an attempt that is no longer current
//! (a worker evicted while paused, then resumed) is refused, so nothing is counted twice.
//!
//! Only attempts that ran and failed count towards `max_task_attempts`: an assignment the
//! worker refused or did not acknowledge in time goes back to the queue uncounted (a task
//! no worker takes fails after [`MAX_ASSIGNMENTS_NOT_TAKEN`] such assignments). The store
//! write that ends an attempt is tried [`STORE_TRIES`] times; when it still fails the job is
//! told that the task failed and why, so no task stays RUNNING with nobody told.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use medray_proto::control::{attempt_key, Wire, WorkerControl};
use medray_proto::v1::{AssignmentAck, TaskAssignment};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorMessage;

use crate::config::HeadConfig;
use crate::ids::{AttemptRef, JobId, TaskId, WorkerId};
use crate::job::JobMsg;
use crate::metrics::Metrics;
use crate::store::{Store, TaskState};
use crate::{HeadError, Result};

/// Assignments of one task that workers may refuse or leave unacknowledged before the task
/// fails. They are not attempts (nothing ran), but a task that no worker takes (say, the
/// only worker's compute thread died and it refuses everything) must not be offered forever.
pub const MAX_ASSIGNMENTS_NOT_TAKEN: u32 = 10;

/// Tries of a store operation that ends an attempt before the scheduler gives its task up.
pub const STORE_TRIES: u32 = 3;

/// Pause after the first failed try of a store operation; doubled after each.
const STORE_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// How an attempt ended, as a worker reported it.
#[derive(Debug, Clone)]
pub enum AttemptOutcome {
    /// Succeeded with this result JSON.
    Succeeded(String),
    /// Failed.
    Failed {
        /// Why.
        reason: String,
        /// Whether another attempt may succeed.
        retryable: bool,
    },
}

/// What the scheduler tells a job about one of its tasks.
#[derive(Debug, Clone)]
pub enum TaskEnd {
    /// Done, with its result.
    Succeeded {
        /// The worker that ran it.
        worker_id: WorkerId,
        /// Its result JSON.
        result_json: String,
    },
    /// It will run again (worker lost, or a retryable failure).
    Retrying(String),
    /// Given up.
    Failed(String),
}

/// The scheduler actor.
#[derive(Debug)]
pub struct Scheduler {
    /// The store.
    pub store: Arc<Store>,
    /// Settings.
    pub config: Arc<HeadConfig>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// Messages of the scheduler.
#[derive(RactorMessage)]
pub enum SchedulerMsg {
    /// A worker's actor joined: it can take tasks.
    WorkerUp {
        /// The worker.
        worker_id: WorkerId,
        /// Its actor.
        actor: ActorRef<WorkerControl>,
    },
    /// A worker is gone; its running attempt is re-queued.
    WorkerDown {
        /// The worker.
        worker_id: WorkerId,
        /// Why.
        reason: String,
    },
    /// A heartbeat arrived (idle: no task running on the worker).
    Heartbeat {
        /// The worker.
        worker_id: WorkerId,
        /// True when it runs nothing.
        idle: bool,
    },
    /// Queue tasks of a job (PENDING in the store); `job` hears how each ends.
    Enqueue {
        /// The job.
        job_id: JobId,
        /// Its tasks to run.
        tasks: Vec<TaskId>,
        /// The job's actor.
        job: ActorRef<JobMsg>,
    },
    /// A worker reports the end of an attempt; replies whether it was accepted.
    Finished {
        /// The reporting worker.
        worker_id: WorkerId,
        /// The attempt.
        attempt: AttemptRef,
        /// Its outcome.
        outcome: AttemptOutcome,
        /// Accepted or not.
        reply: RpcReplyPort<bool>,
    },
    /// The answer to an assignment (self-sent by the task that waited for it).
    AssignAnswered {
        /// The worker.
        worker_id: WorkerId,
        /// The attempt.
        attempt: AttemptRef,
        /// The acknowledgement, or why none came.
        ack: Result<AssignmentAck, String>,
    },
    /// Drop a job's queued tasks and stop its running attempts.
    CancelJob(JobId),
    /// Run at most `max_running` attempts of the job at once (sent before its tasks are
    /// queued); 0 removes the cap.
    LimitJob {
        /// The job.
        job_id: JobId,
        /// Most attempts running at once.
        max_running: usize,
    },
}

impl std::fmt::Debug for SchedulerMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::WorkerUp { worker_id, .. } => write!(f, "WorkerUp({worker_id})"),
            Self::WorkerDown { worker_id, .. } => write!(f, "WorkerDown({worker_id})"),
            Self::Heartbeat { worker_id, .. } => write!(f, "Heartbeat({worker_id})"),
            Self::Enqueue { job_id, .. } => write!(f, "Enqueue({job_id})"),
            Self::Finished { attempt, .. } => write!(f, "Finished({attempt})"),
            Self::AssignAnswered { attempt, .. } => write!(f, "AssignAnswered({attempt})"),
            Self::CancelJob(j) => write!(f, "CancelJob({j})"),
            Self::LimitJob {
                job_id,
                max_running,
            } => write!(f, "LimitJob({job_id}, {max_running})"),
        }
    }
}

#[derive(Debug)]
struct WorkerSlot {
    actor: ActorRef<WorkerControl>,
    /// The attempt assigned to it, if any.
    running: Option<AttemptRef>,
    /// It refused an assignment as busy: wait for an idle heartbeat.
    blocked: bool,
    /// When the running attempt was assigned.
    since: Option<std::time::Instant>,
}

/// Scheduler state.
#[derive(Debug, Default)]
pub struct SchedulerState {
    workers: HashMap<WorkerId, WorkerSlot>,
    queue: VecDeque<(JobId, TaskId)>,
    jobs: HashMap<JobId, ActorRef<JobMsg>>,
    /// Jobs capped at a number of attempts running at once.
    limits: HashMap<JobId, usize>,
    /// Assignments of a task that were refused or not acknowledged (not attempts).
    not_taken: HashMap<(JobId, TaskId), u32>,
}

impl SchedulerState {
    /// True while `job` may start another attempt.
    fn under_limit(&self, job: &JobId) -> bool {
        self.limits.get(job).is_none_or(|&max| {
            self.workers
                .values()
                .filter(|w| w.running.as_ref().is_some_and(|a| a.job_id == *job))
                .count()
                < max
        })
    }
}

/// Runs a store operation, trying again after a pause while it fails, at most
/// [`STORE_TRIES`] times (SQLite already waits out a lock for its busy timeout; this rides
/// out other short failures).
async fn persist<T>(what: &str, mut op: impl FnMut() -> Result<T>) -> Result<T> {
    let mut pause = STORE_RETRY_PAUSE;
    let mut tries = 1;
    loop {
        match op() {
            Err(e) if tries < STORE_TRIES => {
                tracing::warn!(error = %e, tries, "cannot {what}; trying again");
                tokio::time::sleep(pause).await;
                pause *= 2;
                tries += 1;
            }
            result => return result,
        }
    }
}

impl Scheduler {
    fn tell_job(state: &mut SchedulerState, job: &JobId, task: &TaskId, end: TaskEnd) {
        if !matches!(end, TaskEnd::Retrying(_)) {
            state.not_taken.remove(&(job.clone(), task.clone()));
        }
        if let Some(actor) = state.jobs.get(job) {
            let _ = actor.cast(JobMsg::TaskEnded {
                task_id: task.clone(),
                end,
            });
        }
    }

    /// The store could not record how `attempt` ended (`what`), even after [`STORE_TRIES`]
    /// tries. Rather than leave its task RUNNING with nobody told, the job hears that the
    /// task failed, and why (a job that ends this way cancels its task rows).
    fn unrecorded(
        &self,
        state: &mut SchedulerState,
        attempt: &AttemptRef,
        what: &str,
        error: &HeadError,
    ) {
        tracing::error!(%error, %attempt, what, "cannot record the end of an attempt; its task fails");
        Self::tell_job(
            state,
            &attempt.job_id,
            &attempt.task_id,
            TaskEnd::Failed(format!(
                "{what}, but the head could not record this ({STORE_TRIES} tries): {error}"
            )),
        );
    }

    /// Ends a running attempt as a failure that counts: its task goes back to the front of
    /// the queue, or fails once it has failed `max_task_attempts` times. Returns whether the
    /// store recorded it.
    async fn requeue(
        &self,
        state: &mut SchedulerState,
        attempt: &AttemptRef,
        reason: &str,
    ) -> bool {
        let max = self.config.max_task_attempts;
        match persist("re-queue an attempt", || {
            self.store.fail_attempt(attempt, reason, max)
        })
        .await
        {
            Ok(Some((TaskState::Pending, _))) => {
                state
                    .queue
                    .push_front((attempt.job_id.clone(), attempt.task_id.clone()));
                Self::tell_job(
                    state,
                    &attempt.job_id,
                    &attempt.task_id,
                    TaskEnd::Retrying(reason.to_string()),
                );
                true
            }
            Ok(Some((_, failures))) => {
                Self::tell_job(
                    state,
                    &attempt.job_id,
                    &attempt.task_id,
                    TaskEnd::Failed(format!(
                        "{reason}; gave up after {failures} failed attempts"
                    )),
                );
                true
            }
            Ok(None) => false,
            Err(e) => {
                self.unrecorded(state, attempt, reason, &e);
                false
            }
        }
    }

    /// A worker reports how `attempt` ended; returns whether the report was taken (not for
    /// a superseded attempt, nor for one whose end the store could not record).
    async fn finished(
        &self,
        state: &mut SchedulerState,
        worker_id: &WorkerId,
        attempt: &AttemptRef,
        outcome: AttemptOutcome,
    ) -> bool {
        let assigned_here = state
            .workers
            .get(worker_id)
            .is_some_and(|w| w.running.as_ref() == Some(attempt));
        let current = match persist("check an attempt", || {
            self.store.is_current(attempt, worker_id)
        })
        .await
        {
            Ok(current) => current,
            Err(e) => {
                // The scheduler's own record of what it assigned decides: a result is not
                // dropped because a read failed.
                tracing::error!(error = %e, %attempt, "cannot check an attempt in the store");
                assigned_here
            }
        };
        if !current {
            tracing::warn!(%attempt, worker_id = %worker_id, "result of a superseded attempt dropped");
            return false;
        }
        if let Some(slot) = state.workers.get_mut(worker_id) {
            if slot.running.as_ref() == Some(attempt) {
                slot.running = None;
                if let Some(t) = slot.since.take() {
                    self.metrics.task_latency.observe(t.elapsed().as_secs_f64());
                }
            }
        }
        match outcome {
            AttemptOutcome::Succeeded(json) => {
                match persist("record a result", || {
                    self.store.finish_attempt(
                        attempt,
                        TaskState::Succeeded,
                        Some(&json),
                        None,
                        false,
                    )
                })
                .await
                {
                    Ok(true) => {
                        self.metrics.tasks_succeeded.inc();
                        Self::tell_job(
                            state,
                            &attempt.job_id,
                            &attempt.task_id,
                            TaskEnd::Succeeded {
                                worker_id: worker_id.clone(),
                                result_json: json,
                            },
                        );
                        true
                    }
                    Ok(false) => false,
                    Err(e) => {
                        self.unrecorded(
                            state,
                            attempt,
                            &format!("on {worker_id}: it succeeded"),
                            &e,
                        );
                        false
                    }
                }
            }
            AttemptOutcome::Failed { reason, retryable } => {
                self.metrics.tasks_failed.inc();
                let reason = format!("on {worker_id}: {reason}");
                if retryable {
                    return self.requeue(state, attempt, &reason).await;
                }
                match persist("record a failure", || {
                    self.store
                        .finish_attempt(attempt, TaskState::Failed, None, Some(&reason), true)
                })
                .await
                {
                    Ok(true) => {
                        Self::tell_job(
                            state,
                            &attempt.job_id,
                            &attempt.task_id,
                            TaskEnd::Failed(reason),
                        );
                        true
                    }
                    Ok(false) => false,
                    Err(e) => {
                        self.unrecorded(state, attempt, &reason, &e);
                        false
                    }
                }
            }
        }
    }

    /// The worker refused `attempt` or did not acknowledge it in time. Nothing ran, so it
    /// does not count against `max_task_attempts`: the task goes back to the front of the
    /// queue, and the worker is held back until its next idle heartbeat, so another worker
    /// gets it first (a worker that did not answer is left to the heartbeat timeout). After
    /// [`MAX_ASSIGNMENTS_NOT_TAKEN`] such assignments the task fails.
    async fn not_taken(
        &self,
        state: &mut SchedulerState,
        worker_id: &WorkerId,
        attempt: &AttemptRef,
        reason: &str,
    ) {
        tracing::warn!(%attempt, worker_id = %worker_id, reason, "assignment not taken");
        if let Some(slot) = state.workers.get_mut(worker_id) {
            if slot.running.as_ref() == Some(attempt) {
                slot.running = None;
                slot.since = None;
            }
            slot.blocked = true;
        }
        let key = (attempt.job_id.clone(), attempt.task_id.clone());
        let count = {
            let n = state.not_taken.entry(key.clone()).or_default();
            *n += 1;
            *n
        };
        let give_up = (count >= MAX_ASSIGNMENTS_NOT_TAKEN).then(|| {
            format!(
                "because no worker took it: its assignment was not taken {count} times \
                 (refused, or not acknowledged in time); the last time, on {worker_id}: {reason}"
            )
        });
        let next = if give_up.is_some() {
            TaskState::Failed
        } else {
            TaskState::Pending
        };
        match persist("put back an assignment", || {
            self.store
                .finish_attempt(attempt, next, None, give_up.as_deref(), false)
        })
        .await
        {
            Ok(true) => match give_up {
                Some(why) => {
                    Self::tell_job(
                        state,
                        &attempt.job_id,
                        &attempt.task_id,
                        TaskEnd::Failed(why),
                    );
                }
                None => state.queue.push_front(key),
            },
            // Ended otherwise meanwhile (its worker was lost).
            Ok(false) => {}
            Err(e) => self.unrecorded(
                state,
                attempt,
                &format!("on {worker_id}: its assignment was not taken ({reason})"),
                &e,
            ),
        }
    }

    fn dispatch(&self, myself: &ActorRef<SchedulerMsg>, state: &mut SchedulerState) {
        loop {
            if state.queue.is_empty() {
                break;
            }
            let Some(worker_id) = state
                .workers
                .iter()
                .filter(|(_, w)| w.running.is_none() && !w.blocked)
                .map(|(id, _)| id.clone())
                .min()
            else {
                break;
            };
            // The first queued task whose job is under its cap (FIFO otherwise).
            let Some(position) = state.queue.iter().position(|(j, _)| state.under_limit(j)) else {
                break;
            };
            let Some((job_id, task_id)) = state.queue.remove(position) else {
                break;
            };
            if !state.jobs.contains_key(&job_id) {
                continue;
            }
            let assignment = match self.store.start_attempt(&job_id, &task_id, &worker_id) {
                Ok(Some(a)) => a,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start an attempt");
                    state.queue.push_front((job_id, task_id));
                    break;
                }
            };
            let attempt = AttemptRef {
                job_id,
                task_id,
                attempt: assignment.attempt,
            };
            let Some(slot) = state.workers.get_mut(&worker_id) else {
                break;
            };
            slot.running = Some(attempt.clone());
            slot.since = Some(std::time::Instant::now());
            self.metrics.tasks_started.inc();
            send_assignment(
                myself.clone(),
                slot.actor.clone(),
                worker_id,
                attempt,
                assignment,
                self.config.assign_timeout,
            );
        }
        self.metrics.set_queue(state.queue.len());
    }
}

fn send_assignment(
    myself: ActorRef<SchedulerMsg>,
    actor: ActorRef<WorkerControl>,
    worker_id: WorkerId,
    attempt: AttemptRef,
    assignment: TaskAssignment,
    timeout: std::time::Duration,
) {
    tokio::spawn(async move {
        let ack = match actor
            .call(
                |reply| WorkerControl::Assign(Wire::new(assignment), reply),
                Some(timeout),
            )
            .await
        {
            Ok(ractor::rpc::CallResult::Success(Wire(Ok(ack)))) => Ok(ack),
            Ok(ractor::rpc::CallResult::Success(Wire(Err(e)))) => {
                Err(format!("malformed acknowledgement: {e}"))
            }
            Ok(ractor::rpc::CallResult::Timeout) => Err(format!(
                "no acknowledgement within {:.1} s",
                timeout.as_secs_f64()
            )),
            Ok(ractor::rpc::CallResult::SenderError) => {
                Err("the worker actor dropped the request".into())
            }
            Err(e) => Err(format!("cannot reach the worker actor: {e}")),
        };
        let _ = myself.cast(SchedulerMsg::AssignAnswered {
            worker_id,
            attempt,
            ack,
        });
    });
}

impl Actor for Scheduler {
    type Msg = SchedulerMsg;
    type State = SchedulerState;
    type Arguments = ();

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        (): (),
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(SchedulerState::default())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SchedulerMsg::WorkerUp { worker_id, actor } => {
                state.workers.insert(
                    worker_id,
                    WorkerSlot {
                        actor,
                        running: None,
                        blocked: false,
                        since: None,
                    },
                );
            }
            SchedulerMsg::WorkerDown { worker_id, reason } => {
                if let Some(slot) = state.workers.remove(&worker_id) {
                    if let Some(attempt) = slot.running {
                        let reason = format!("worker {worker_id} lost: {reason}");
                        self.requeue(state, &attempt, &reason).await;
                    }
                }
            }
            SchedulerMsg::Heartbeat { worker_id, idle } => {
                if let Some(slot) = state.workers.get_mut(&worker_id) {
                    if idle && slot.blocked {
                        slot.blocked = false;
                    }
                }
            }
            SchedulerMsg::Enqueue { job_id, tasks, job } => {
                state.jobs.insert(job_id.clone(), job);
                for t in tasks {
                    state.queue.push_back((job_id.clone(), t));
                }
            }
            SchedulerMsg::Finished {
                worker_id,
                attempt,
                outcome,
                reply,
            } => {
                let accepted = self.finished(state, &worker_id, &attempt, outcome).await;
                let _ = reply.send(accepted);
            }
            SchedulerMsg::AssignAnswered {
                worker_id,
                attempt,
                ack,
            } => {
                let refused = match ack {
                    Ok(a) if a.accepted => None,
                    Ok(a) => Some(a.reason),
                    Err(e) => Some(e),
                };
                if let Some(reason) = refused {
                    self.not_taken(state, &worker_id, &attempt, &reason).await;
                }
            }
            SchedulerMsg::LimitJob {
                job_id,
                max_running,
            } => {
                if max_running == 0 {
                    state.limits.remove(&job_id);
                } else {
                    state.limits.insert(job_id, max_running);
                }
            }
            SchedulerMsg::CancelJob(job_id) => {
                state.queue.retain(|(j, _)| *j != job_id);
                state.jobs.remove(&job_id);
                state.limits.remove(&job_id);
                state.not_taken.retain(|(j, _), _| *j != job_id);
                for slot in state.workers.values_mut() {
                    if let Some(a) = slot.running.as_ref().filter(|a| a.job_id == job_id) {
                        let key = attempt_key(a.job_id.as_str(), a.task_id.as_str(), a.attempt);
                        let actor = slot.actor.clone();
                        tokio::spawn(async move {
                            let _ = actor
                                .call(
                                    |r| WorkerControl::Cancel(key, r),
                                    Some(std::time::Duration::from_secs(5)),
                                )
                                .await;
                        });
                        slot.running = None;
                        slot.blocked = true;
                    }
                }
            }
        }
        self.dispatch(&myself, state);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
