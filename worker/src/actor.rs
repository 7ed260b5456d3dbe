//! The worker actor: the cluster-visible face of a worker. It joins the
//! [`crate::control::WORKERS_GROUP`] process group, answers the head's
//! control messages and hands accepted tasks to the compute thread. A reporter task per
//! attempt streams the task's log lines and its outcome to the head over gRPC.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use medray_proto::v1::finish_task_request::Outcome as WireOutcome;
use medray_proto::v1::{
    AppendTaskLogsRequest, AssignmentAck, FinishTaskRequest, TaskAssignment, TaskFailure,
};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::mpsc;

use crate::compute::{ComputeTask, ComputeThread, Outcome, TaskEvent};
use crate::control::{attempt_key, Wire, WorkerControl, WORKERS_GROUP};
use crate::head_client::HeadClient;

/// Longest log line forwarded, bytes (longer ones are cut, and say so).
const MAX_LINE_BYTES: usize = 16 * 1024;
/// Most lines in one `AppendTaskLogs` call.
const MAX_LINES_PER_CALL: usize = 1000;

/// State shared by the actor, the reporters, the heartbeat and the drain logic.
#[derive(Debug, Default)]
pub struct Shared {
    current: Mutex<Option<Running>>,
    draining: AtomicBool,
}

#[derive(Debug, Clone)]
struct Running {
    key: String,
    label: String,
    cancel: Arc<AtomicBool>,
}

impl Shared {
    /// `"job/task"` of the running task, if any.
    #[must_use]
    pub fn current_task(&self) -> Option<String> {
        self.lock().as_ref().map(|r| r.label.clone())
    }

    /// Stops taking new tasks.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Asks the running task (if any) to stop.
    pub fn cancel_current(&self) {
        if let Some(r) = self.lock().as_ref() {
            r.cancel.store(true, Ordering::SeqCst);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        // A poisoned lock only means a panic elsewhere while holding it; the data (an
        // Option) is still consistent.
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn finish(&self, key: &str) {
        let mut current = self.lock();
        if current.as_ref().is_some_and(|r| r.key == key) {
            *current = None;
        }
    }
}

/// The worker actor (immutable part).
#[derive(Debug)]
pub struct WorkerActor;

/// Everything the actor needs.
#[derive(Debug)]
pub struct WorkerArgs {
    /// Id the head gave this worker.
    pub worker_id: String,
    /// Shared state.
    pub shared: Arc<Shared>,
    /// The compute thread.
    pub compute: ComputeThread,
    /// gRPC client to the head.
    pub client: HeadClient,
}

impl Actor for WorkerActor {
    type Msg = WorkerControl;
    type State = WorkerArgs;
    type Arguments = WorkerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: WorkerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        ractor::pg::join(WORKERS_GROUP.to_string(), vec![myself.get_cell()]);
        Ok(args)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            WorkerControl::Assign(wire, reply) => {
                let ack = match wire.0 {
                    Ok(assignment) => assign(state, assignment),
                    Err(e) => AssignmentAck {
                        accepted: false,
                        reason: format!("malformed assignment: {e}"),
                    },
                };
                // The head may have timed out waiting; nothing else to do then.
                let _ = reply.send(Wire::new(ack));
            }
            WorkerControl::Cancel(key, reply) => {
                let current = state.shared.lock().clone();
                let running = current.as_ref().is_some_and(|r| r.key == key);
                if let Some(r) = current.filter(|_| running) {
                    r.cancel.store(true, Ordering::SeqCst);
                }
                let _ = reply.send(running);
            }
            WorkerControl::Ping(reply) => {
                let _ = reply.send(state.worker_id.clone());
            }
        }
        Ok(())
    }
}

fn assign(state: &mut WorkerArgs, assignment: TaskAssignment) -> AssignmentAck {
    let refuse = |reason: String| AssignmentAck {
        accepted: false,
        reason,
    };
    if state.shared.draining.load(Ordering::SeqCst) {
        return refuse("draining".into());
    }
    let key = attempt_key(&assignment.job_id, &assignment.task_id, assignment.attempt);
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let mut current = state.shared.lock();
        if let Some(r) = current.as_ref() {
            return refuse(format!("busy with {}", r.label));
        }
        *current = Some(Running {
            key: key.clone(),
            label: format!("{}/{}", assignment.job_id, assignment.task_id),
            cancel: cancel.clone(),
        });
    }
    let (tx, rx) = mpsc::channel(4096);
    tokio::spawn(report(
        state.client.clone(),
        state.worker_id.clone(),
        assignment.clone(),
        rx,
        cancel.clone(),
        state.shared.clone(),
        key.clone(),
    ));
    let submitted = state.compute.submit(ComputeTask {
        assignment,
        cancel,
        events: tx,
        client: state.client.clone(),
        worker_id: state.worker_id.clone(),
    });
    if submitted {
        tracing::info!(task = %key, "task accepted");
        AssignmentAck {
            accepted: true,
            reason: String::new(),
        }
    } else {
        state.shared.finish(&key);
        refuse("the compute thread has stopped".into())
    }
}

/// Streams one attempt's log lines and outcome to the head.
async fn report(
    client: HeadClient,
    worker_id: String,
    a: TaskAssignment,
    mut rx: mpsc::Receiver<TaskEvent>,
    cancel: Arc<AtomicBool>,
    shared: Arc<Shared>,
    key: String,
) {
    let mut lines = Vec::new();
    let outcome = loop {
        let event = rx.recv().await;
        let mut finished = None;
        match event {
            None => {
                finished = Some(Outcome::Failed {
                    reason: "the compute thread stopped".into(),
                    retryable: true,
                })
            }
            Some(TaskEvent::Log(line)) => lines.push(clip(line)),
            Some(TaskEvent::Finished(o)) => finished = Some(o),
        }
        while finished.is_none() && lines.len() < MAX_LINES_PER_CALL {
            match rx.try_recv() {
                Ok(TaskEvent::Log(line)) => lines.push(clip(line)),
                Ok(TaskEvent::Finished(o)) => finished = Some(o),
                Err(_) => break,
            }
        }
        if !lines.is_empty() {
            let request = AppendTaskLogsRequest {
                worker_id: worker_id.clone(),
                job_id: a.job_id.clone(),
                task_id: a.task_id.clone(),
                attempt: a.attempt,
                lines: std::mem::take(&mut lines),
            };
            let accepted = retry("AppendTaskLogs", || {
                let mut c = client.clone();
                let r = request.clone();
                async move { c.append_task_logs(r).await.map(|r| r.into_inner().accepted) }
            })
            .await;
            if accepted == Some(false) {
                tracing::warn!(task = %key, "the head superseded this attempt; stopping it");
                cancel.store(true, Ordering::SeqCst);
            }
        }
        if let Some(o) = finished {
            break o;
        }
    };
    let outcome = match outcome {
        Outcome::Succeeded(json) => WireOutcome::ResultJson(json),
        Outcome::Failed { reason, retryable } => {
            WireOutcome::Failure(TaskFailure { reason, retryable })
        }
    };
    let request = FinishTaskRequest {
        worker_id: worker_id.clone(),
        job_id: a.job_id.clone(),
        task_id: a.task_id.clone(),
        attempt: a.attempt,
        outcome: Some(outcome),
    };
    let accepted = retry("FinishTask", || {
        let mut c = client.clone();
        let r = request.clone();
        async move { c.finish_task(r).await.map(|r| r.into_inner().accepted) }
    })
    .await;
    tracing::info!(task = %key, accepted = ?accepted, "task finished");
    shared.finish(&key);
}

/// Retries a call for about a minute (the head may be restarting); `None` if it never
/// answered, or at once when the head no longer takes this registration's session (it
/// restarted or evicted this worker: the attempt is not ours any more, and the head runs
/// it again).
async fn retry<T, F, Fut>(call: &str, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut delay = Duration::from_millis(100);
    for attempt in 0..12 {
        match f().await {
            Ok(v) => return Some(v),
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                ) =>
            {
                tracing::warn!(call, error = %status.message(), "the head refused this worker's session; dropping the call");
                return None;
            }
            Err(status) => {
                tracing::warn!(call, attempt, error = %status.message(), "call to the head failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
    None
}

fn clip(mut line: String) -> String {
    if line.len() > MAX_LINE_BYTES {
        let mut cut = MAX_LINE_BYTES;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push_str(" [line cut]");
    }
    line
}
