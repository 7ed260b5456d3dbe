//! Scheduler tests: the real actor and store (SQLite in a temporary directory), with a
//! scripted worker actor and a job actor that forwards what the scheduler tells it.

use std::collections::VecDeque;
use std::time::Duration;

use medray_proto::control::{Wire, WorkerControl};
use medray_proto::v1::{AssignmentAck, JobSpec, TaskAssignment};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::*;

/// How long a test waits for something the scheduler should do.
const DEADLINE: Duration = Duration::from_secs(10);

/// How the scripted worker answers an assignment.
#[derive(Debug, Clone)]
enum Answer {
    Accept,
    Refuse(&'static str),
    /// Keeps the reply port and never answers (the scheduler's acknowledgement time-out).
    Silent,
}

/// A worker actor that answers assignments as scripted (`Accept` once the script is used up)
/// and reports each assignment it gets.
struct ScriptedWorker;

struct ScriptedState {
    script: VecDeque<Answer>,
    seen: UnboundedSender<TaskAssignment>,
    unanswered: Vec<RpcReplyPort<Wire<AssignmentAck>>>,
}

impl Actor for ScriptedWorker {
    type Msg = WorkerControl;
    type State = ScriptedState;
    type Arguments = (Vec<Answer>, UnboundedSender<TaskAssignment>);

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        (script, seen): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(ScriptedState {
            script: script.into(),
            seen,
            unanswered: Vec::new(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            WorkerControl::Assign(Wire(assignment), reply) => {
                let assignment = assignment.expect("the scheduler sends a whole assignment");
                let _ = state.seen.send(assignment);
                let ack = |accepted: bool, reason: &str| {
                    Wire::new(AssignmentAck {
                        accepted,
                        reason: reason.into(),
                    })
                };
                match state.script.pop_front().unwrap_or(Answer::Accept) {
                    Answer::Accept => {
                        let _ = reply.send(ack(true, ""));
                    }
                    Answer::Refuse(reason) => {
                        let _ = reply.send(ack(false, reason));
                    }
                    Answer::Silent => state.unanswered.push(reply),
                }
            }
            WorkerControl::Cancel(_, reply) => {
                let _ = reply.send(false);
            }
            WorkerControl::Ping(reply) => {
                let _ = reply.send("scripted".into());
            }
        }
        Ok(())
    }
}

/// A job actor that forwards every task end.
struct ForwardingJob;

impl Actor for ForwardingJob {
    type Msg = JobMsg;
    type State = UnboundedSender<(TaskId, TaskEnd)>;
    type Arguments = UnboundedSender<(TaskId, TaskEnd)>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        ends: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(ends)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        ends: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let JobMsg::TaskEnded { task_id, end } = message {
            let _ = ends.send((task_id, end));
        }
        Ok(())
    }
}

/// A scheduler with one scripted worker and one job of one task, queued.
struct Bench {
    _dir: tempfile::TempDir,
    db: std::path::PathBuf,
    scheduler: ActorRef<SchedulerMsg>,
    worker_id: WorkerId,
    job_id: JobId,
    task_id: TaskId,
    assignments: UnboundedReceiver<TaskAssignment>,
    ends: UnboundedReceiver<(TaskId, TaskEnd)>,
}

impl Bench {
    async fn start(config: HeadConfig, script: Vec<Answer>) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let db = dir.path().join("catalog.db");
        let store = Arc::new(Store::open(&db).expect("store opens"));
        let job = store
            .insert_job("selftest", &JobSpec::default(), "")
            .expect("job inserted");
        let job_id = JobId(job.id);
        let task_id = TaskId("t0001".into());
        store
            .insert_tasks(&job_id, &[(task_id.clone(), TaskAssignment::default())])
            .expect("task inserted");
        let (scheduler, _) = Actor::spawn(
            None,
            Scheduler {
                store,
                config: Arc::new(config),
                metrics: Arc::new(Metrics::default()),
            },
            (),
        )
        .await
        .expect("scheduler starts");
        let (seen, assignments) = unbounded_channel();
        let (worker, _) = Actor::spawn(None, ScriptedWorker, (script, seen))
            .await
            .expect("worker actor starts");
        let (ends_tx, ends) = unbounded_channel();
        let (job, _) = Actor::spawn(None, ForwardingJob, ends_tx)
            .await
            .expect("job actor starts");
        let worker_id = WorkerId("worker-000001".into());
        scheduler
            .cast(SchedulerMsg::WorkerUp {
                worker_id: worker_id.clone(),
                actor: worker,
            })
            .expect("scheduler up");
        scheduler
            .cast(SchedulerMsg::Enqueue {
                job_id: job_id.clone(),
                tasks: vec![task_id.clone()],
                job,
            })
            .expect("scheduler up");
        Self {
            _dir: dir,
            db,
            scheduler,
            worker_id,
            job_id,
            task_id,
            assignments,
            ends,
        }
    }

    /// The next assignment the worker gets; meanwhile the worker heartbeats idle, as a real
    /// one does, so a worker held back after a refusal is offered work again.
    async fn next_assignment(&mut self) -> TaskAssignment {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let heartbeat = tokio::time::sleep(Duration::from_millis(50));
            tokio::select! {
                a = self.assignments.recv() => return a.expect("the worker actor lives"),
                () = heartbeat => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "no assignment within {DEADLINE:?}"
                    );
                    self.scheduler
                        .cast(SchedulerMsg::Heartbeat {
                            worker_id: self.worker_id.clone(),
                            idle: true,
                        })
                        .expect("scheduler up");
                }
            }
        }
    }

    /// What the job hears next about its task, while the worker heartbeats idle (and its
    /// assignments are counted).
    async fn end_while_heartbeating(&mut self) -> (TaskEnd, usize) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let mut assigned = 0;
        loop {
            let heartbeat = tokio::time::sleep(Duration::from_millis(20));
            tokio::select! {
                end = self.ends.recv() => {
                    let (task, end) = end.expect("the job actor lives");
                    assert_eq!(task, self.task_id);
                    while self.assignments.try_recv().is_ok() {
                        assigned += 1;
                    }
                    return (end, assigned);
                }
                a = self.assignments.recv() => {
                    a.expect("the worker actor lives");
                    assigned += 1;
                }
                () = heartbeat => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "the job heard nothing about its task in {DEADLINE:?} ({assigned} assignments)"
                    );
                    self.scheduler
                        .cast(SchedulerMsg::Heartbeat {
                            worker_id: self.worker_id.clone(),
                            idle: true,
                        })
                        .expect("scheduler up");
                }
            }
        }
    }

    /// What the job hears next about its task.
    async fn next_end(&mut self) -> TaskEnd {
        let (task, end) = tokio::time::timeout(DEADLINE, self.ends.recv())
            .await
            .unwrap_or_else(|_| panic!("the job heard nothing about its task in {DEADLINE:?}"))
            .expect("the job actor lives");
        assert_eq!(task, self.task_id);
        end
    }

    /// The worker reports the end of `assignment`; returns whether the head accepted it.
    async fn finish(&self, assignment: &TaskAssignment, outcome: AttemptOutcome) -> bool {
        let attempt = AttemptRef {
            job_id: self.job_id.clone(),
            task_id: self.task_id.clone(),
            attempt: assignment.attempt,
        };
        self.scheduler
            .call(
                |reply| SchedulerMsg::Finished {
                    worker_id: self.worker_id.clone(),
                    attempt,
                    outcome,
                    reply,
                },
                Some(DEADLINE),
            )
            .await
            .expect("scheduler up")
            .success_or("the scheduler did not answer")
            .expect("scheduler answers")
    }

    /// Makes every update of a task to `state` fail inside SQLite (a trigger on the real
    /// table, installed through a second connection), as a full disk or a broken file would.
    fn break_updates_to(&self, state: &str) {
        let conn = rusqlite::Connection::open(&self.db).expect("second connection");
        conn.execute_batch(&format!(
            "CREATE TRIGGER broken BEFORE UPDATE OF state ON tasks WHEN NEW.state = '{state}'
             BEGIN SELECT RAISE(FAIL, 'injected: database or disk is full'); END;"
        ))
        .expect("trigger installed");
    }
}

fn retryable(reason: &str) -> AttemptOutcome {
    AttemptOutcome::Failed {
        reason: reason.into(),
        retryable: true,
    }
}

#[tokio::test]
async fn a_result_the_store_cannot_record_still_ends_the_task() {
    let mut b = Bench::start(HeadConfig::default(), vec![]).await;
    let a = b.next_assignment().await;
    b.break_updates_to("SUCCEEDED");
    let accepted = b.finish(&a, AttemptOutcome::Succeeded("{}".into())).await;
    match b.next_end().await {
        TaskEnd::Failed(reason) => {
            assert!(reason.contains("could not record"), "{reason}");
            assert!(
                reason.contains("injected: database or disk is full"),
                "{reason}"
            );
        }
        other => panic!("expected the task to fail with the store error, got {other:?}"),
    }
    assert!(
        !accepted,
        "a result the head could not record is not accepted"
    );
}

#[tokio::test]
async fn a_lost_worker_whose_attempt_cannot_be_requeued_still_ends_the_task() {
    let mut b = Bench::start(HeadConfig::default(), vec![]).await;
    b.next_assignment().await;
    b.break_updates_to("PENDING");
    b.scheduler
        .cast(SchedulerMsg::WorkerDown {
            worker_id: b.worker_id.clone(),
            reason: "killed".into(),
        })
        .expect("scheduler up");
    match b.next_end().await {
        TaskEnd::Failed(reason) => {
            assert!(reason.contains("worker-000001 lost: killed"), "{reason}");
            assert!(reason.contains("could not record"), "{reason}");
        }
        other => panic!("expected the task to fail with the store error, got {other:?}"),
    }
}

#[tokio::test]
async fn refused_and_unanswered_assignments_do_not_use_up_attempts() {
    let config = HeadConfig {
        assign_timeout: Duration::from_millis(200),
        max_task_attempts: 2,
        ..HeadConfig::default()
    };
    let script = vec![Answer::Refuse("busy with job-9/t9"), Answer::Silent];
    let mut b = Bench::start(config, script).await;
    // Refused, then not acknowledged in time, then taken: one attempt runs.
    b.next_assignment().await;
    b.next_assignment().await;
    let taken = b.next_assignment().await;
    assert!(b.finish(&taken, retryable("out of memory")).await);
    match b.next_end().await {
        TaskEnd::Retrying(reason) => assert!(reason.contains("out of memory"), "{reason}"),
        other => panic!("one failed attempt of two: the task runs again, got {other:?}"),
    }
    // The second attempt that runs and fails is the last one allowed.
    let again = b.next_assignment().await;
    assert!(b.finish(&again, retryable("out of memory")).await);
    match b.next_end().await {
        TaskEnd::Failed(reason) => assert!(reason.contains("gave up after 2"), "{reason}"),
        other => panic!("two failed attempts of two: the task fails, got {other:?}"),
    }
}

#[tokio::test]
async fn a_task_no_worker_takes_fails_instead_of_being_offered_forever() {
    // A worker whose compute thread died refuses everything, yet heartbeats idle.
    let script = vec![Answer::Refuse("the compute thread has stopped"); 1000];
    let mut b = Bench::start(HeadConfig::default(), script).await;
    let (end, assigned) = b.end_while_heartbeating().await;
    match end {
        TaskEnd::Failed(reason) => {
            assert!(
                reason.contains(&format!("not taken {MAX_ASSIGNMENTS_NOT_TAKEN} times")),
                "{reason}"
            );
            assert!(
                reason.contains("the compute thread has stopped"),
                "{reason}"
            );
        }
        other => panic!("expected the task to fail, got {other:?}"),
    }
    assert_eq!(assigned, MAX_ASSIGNMENTS_NOT_TAKEN as usize);
}
