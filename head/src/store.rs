//! Persistent cluster state in the catalog database (tables of migration 2): jobs, their
//! tasks and log lines, and the workers seen. Everything the head must know after a restart
//! is here; every multi-row change is one transaction.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use medray_proto::v1::{Job, JobSpec, JobState, TaskAssignment};
use prost::Message;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::ids::{AttemptRef, JobId, TaskId, WorkerId};
use crate::{HeadError, Result};

const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

/// State of a task row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// Waiting for a worker.
    Pending,
    /// An attempt is assigned.
    Running,
    /// Done.
    Succeeded,
    /// Given up.
    Failed,
    /// Its job was cancelled.
    Cancelled,
}

impl TaskState {
    fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Running => "RUNNING",
            Self::Succeeded => "SUCCEEDED",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "RUNNING" => Self::Running,
            "SUCCEEDED" => Self::Succeeded,
            "FAILED" => Self::Failed,
            "CANCELLED" => Self::Cancelled,
            _ => Self::Pending,
        }
    }
}

/// A task as stored.
#[derive(Debug, Clone)]
pub struct TaskRow {
    /// Its id.
    pub task_id: TaskId,
    /// Its state.
    pub state: TaskState,
    /// Attempts started so far.
    pub attempt: u32,
    /// Worker of the current attempt.
    pub worker_id: Option<WorkerId>,
    /// Failed attempts.
    pub failures: u32,
    /// Result JSON of a succeeded task.
    pub result_json: Option<String>,
    /// Last error.
    pub error: Option<String>,
}

/// A log line as stored.
#[derive(Debug, Clone)]
pub struct LogRow {
    /// Position in the job's log.
    pub seq: u64,
    /// When the head recorded it.
    pub time: String,
    /// Worker that produced it ("" for the head).
    pub worker_id: String,
    /// The text.
    pub line: String,
    /// A training step's typed progress (prost-encoded `TrainProgress`), if the line reports
    /// one.
    pub progress: Option<Vec<u8>>,
}

impl LogRow {
    /// The typed progress of a step line; a blob that does not decode counts as none (the
    /// line itself is never dropped).
    #[must_use]
    pub fn train_progress(&self) -> Option<medray_proto::v1::TrainProgress> {
        self.progress
            .as_deref()
            .and_then(|b| medray_proto::v1::TrainProgress::decode(b).ok())
    }
}

/// A worker as recorded.
#[derive(Debug, Clone)]
pub struct WorkerRow {
    /// Its id.
    pub id: WorkerId,
    /// Its name.
    pub name: String,
    /// Device.
    pub device: String,
    /// Node address.
    pub address: String,
    /// Memory, bytes.
    pub memory_bytes: u64,
    /// Cores.
    pub cores: u32,
    /// medray version.
    pub version: String,
    /// GPU name ("" on the CPU); reported by the registration, not stored in the table.
    pub gpu_name: String,
    /// GPU memory, bytes (0 on the CPU); likewise.
    pub gpu_memory_bytes: u64,
}

/// The store (one connection, serialised by a mutex: every call is short).
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
}

fn parse_state(s: &str) -> JobState {
    match s {
        "PENDING" => JobState::Pending,
        "RUNNING" => JobState::Running,
        "SUCCEEDED" => JobState::Succeeded,
        "FAILED" => JobState::Failed,
        "CANCELLED" => JobState::Cancelled,
        _ => JobState::Unspecified,
    }
}

const JOB_COLUMNS: &str = "id, kind, spec, state, reason, result_json, created_at, \
     COALESCE(started_at, ''), COALESCE(finished_at, ''), \
     (SELECT COUNT(*) FROM tasks t WHERE t.job_id = jobs.id), \
     (SELECT COUNT(*) FROM tasks t WHERE t.job_id = jobs.id AND t.state = 'SUCCEEDED')";

fn job_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Job> {
    let spec: Vec<u8> = row.get(2)?;
    let state: String = row.get(3)?;
    Ok(Job {
        id: row.get(0)?,
        kind: row.get(1)?,
        spec: JobSpec::decode(spec.as_slice()).ok(),
        state: parse_state(&state) as i32,
        reason: row.get(4)?,
        result_json: row.get(5)?,
        created_at: row.get(6)?,
        started_at: row.get(7)?,
        finished_at: row.get(8)?,
        tasks_total: row.get(9)?,
        tasks_succeeded: row.get(10)?,
    })
}

impl Store {
    /// Opens the store on the catalog at `path` (migrated by [`medray_core::catalog::Catalog::open`]).
    ///
    /// # Errors
    /// [`HeadError::Core`] if the catalog cannot be opened or migrated.
    pub fn open(path: &Path) -> Result<Self> {
        drop(medray_core::catalog::Catalog::open(path)?);
        let conn = Connection::open(path).map_err(HeadError::store("open"))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(HeadError::store("open"))?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(HeadError::store("open"))?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(HeadError::store("open"))?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // SQLite keeps its own consistency; a panic elsewhere does not corrupt the connection.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Inserts a PENDING job and returns it.
    ///
    /// # Errors
    /// [`HeadError::Store`].
    pub fn insert_job(&self, kind: &str, spec: &JobSpec, reason: &str) -> Result<Job> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(HeadError::store("insert job"))?;
        let seq: i64 = tx
            .query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs", [], |r| {
                r.get(0)
            })
            .map_err(HeadError::store("insert job"))?;
        let id = format!("job-{seq:06}");
        tx.execute(
            &format!(
                "INSERT INTO jobs (id, seq, kind, spec, state, reason, created_at)
                 VALUES (?1, ?2, ?3, ?4, 'PENDING', ?5, {NOW})"
            ),
            params![id, seq, kind, spec.encode_to_vec(), reason],
        )
        .map_err(HeadError::store("insert job"))?;
        tx.commit().map_err(HeadError::store("insert job"))?;
        drop(conn);
        self.job(&JobId(id.clone()))?
            .ok_or(HeadError::NotFound { what: "job", id })
    }

    /// A job.
    ///
    /// # Errors
    /// [`HeadError::Store`].
    pub fn job(&self, id: &JobId) -> Result<Option<Job>> {
        self.lock()
            .query_row(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"),
                [id.as_str()],
                job_from_row,
            )
            .optional()
            .map_err(HeadError::store("read job"))
    }

    /// The newest `limit` jobs, newest first.
    ///
    /// # Errors
    /// [`HeadError::Store`].
    pub fn jobs(&self, limit: u32) -> Result<Vec<Job>> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {JOB_COLUMNS} FROM jobs ORDER BY seq DESC LIMIT ?1"
            ))
            .map_err(HeadError::store("list jobs"))?;
        let rows = stmt
            .query_map([i64::from(limit)], job_from_row)
            .map_err(HeadError::store("list jobs"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(HeadError::store("list jobs"))
    }

    /// Jobs that have not ended, oldest first (recovery after a restart).
    ///
    /// # Errors
    /// [`HeadError::Store`].
    pub fn unfinished_jobs(&self) -> Result<Vec<Job>> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ('PENDING', 'RUNNING') ORDER BY seq"
            ))
            .map_err(HeadError::store("list jobs"))?;
        let rows = stmt
            .query_map([], job_from_row)
            .map_err(HeadError::store("list jobs"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(HeadError::store("list jobs"))
    }

    /// Number of jobs in each state.
    ///
    /// # Errors
    /// [`HeadError::Store`].
    pub fn job_counts(&self) -> Result<Vec<(String, i64)>> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare("SELECT state, COUNT(*) FROM jobs GROUP BY state")
            .map_err(HeadError::store("count jobs"))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(HeadError::store("count jobs"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(HeadError::store("count jobs"))
    }

    /// Sets a job's state and reason (and its start or end time); a job that has ended is
    /// never changed again. Returns whether it changed.
    ///
    /// # Errors
    /// [`HeadError::Store`].
    pub fn set_job_state(&self, id: &JobId, state: JobState, reason: &str) -> Result<bool> {
        update_job_state(&self.lock(), id, state, reason)
    }

    /// Ends a job: sets its (terminal) state and reason and, when that changed it, appends
    /// the head's log line `line(state)` in the same transaction, so that a follower that
    /// sees the job ended has its last line too. Returns whether it changed.
    ///
    /// # Errors
    /// [`HeadError::Store`].
    pub fn end_job(&self, id: &JobId, state: JobState, reason: &str, line: &str) -> Result<bool> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(HeadError::store("end job"))?;
        let changed = update_job_state(&tx, id, state, reason)?;
        if changed {
            insert_log_rows(&tx, id, "", &[(line, None)])?;
        }
        tx.commit().map_err(HeadError::store("end job"))?;
        Ok(changed)
    }

    /// Records a job's result summary.
    ///
    /// # Errors
    /// [`HeadError::Store`].
    pub fn set_job_result(&self, id: &JobId, result_json: &str) -> Result<()> {
        self.lock()
            .execute(
                "UPDATE jobs SET result_json = ?2 WHERE id = ?1",
                params![id.as_str(), result_json],
            )
            .map_err(HeadError::store("update job"))?;
        Ok(())
    }

    /// Inserts a job's tasks (PENDING) in one transaction; the assignment's attempt field is
    /// filled in when an attempt starts.
    ///
    /// # Errors
    /// [`HeadError::Store`].
    pub fn insert_tasks(&self, job: &JobId, tasks: &[(TaskId, TaskAssignment)]) -> Result<()> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(HeadError::store("insert tasks"))?;
        for (id, spec) in tasks {
            tx.execute(
                "INSERT INTO tasks (job_id, task_id, spec, state) VALUES (?1, ?2, ?3, 'PENDING')",
                params![job.as_str(), id.as_str(), spec.encode_to_vec()],
            )
            .map_err(HeadError::store("insert tasks"))?;
        }
        tx.commit().map_err(HeadError::store("insert tasks"))
    }

    /// The tasks of a job, in id order.
    ///
    /// # Errors
    /// [`HeadError::Store`].
    pub fn tasks(&self, job: &JobId) -> Result<Vec<TaskRow>> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare(
                "SELECT task_id, state, attempt, worker_id, failures, result_json, error
                 FROM tasks WHERE job_id = ?1 ORDER BY task_id",
            )
            .map_err(HeadError::store("list tasks"))?;
        let rows = stmt
            .query_map([job.as_str()], |r| {
                let state: String = r.get(1)?;
                let worker: Option<String> = r.get(3)?;
                Ok(TaskRow {
                    task_id: TaskId(r.get(0)?),
                    state: TaskState::parse(&state),
                    attempt: r.get(2)?,
                    worker_id: worker.map(WorkerId),
                    failures: r.get(4)?,
                    result_json: r.get(5)?,
                    error: r.get(6)?,
                })
            })
            .map_err(HeadError::store("list tasks"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(HeadError::store("list tasks"))
    }

    /// Starts a new attempt of a PENDING task on `worker`; returns the assignment to send, or
    /// `None` if the task is no longer pending.
    ///
    /// # Errors
    /// [`HeadError::Store`].
    pub fn start_attempt(
        &self,
        job: &JobId,
        task: &TaskId,
        worker: &WorkerId,
    ) -> Result<Option<TaskAssignment>> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(HeadError::store("start attempt"))?;
        let row: Option<(Vec<u8>, u32)> = tx
            .query_row(
                "SELECT spec, attempt FROM tasks WHERE job_id = ?1 AND task_id = ?2 AND state = 'PENDING'",
                params![job.as_str(), task.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(HeadError::store("start attempt"))?;
        let Some((spec, attempt)) = row else {
            return Ok(None);
        };
        let mut assignment = TaskAssignment::decode(spec.as_slice()).map_err(|e| {
            HeadError::invalid(format!("tasks.spec of {job}/{task}"), e.to_string())
        })?;
        assignment.job_id = job.to_string();
        assignment.task_id = task.to_string();
        assignment.attempt = attempt + 1;
        tx.execute(
            "UPDATE tasks SET state = 'RUNNING', attempt = ?3, worker_id = ?4
             WHERE job_id = ?1 AND task_id = ?2",
            params![job.as_str(), task.as_str(), attempt + 1, worker.as_str()],
        )
        .map_err(HeadError::store("start attempt"))?;
        tx.commit().map_err(HeadError::store("start attempt"))?;
        Ok(Some(assignment))
    }

    /// True when `attempt` is the running attempt of its task, on `worker`.
    ///
    /// # Errors
    /// [`HeadError::Store`].
    pub fn is_current(&self, attempt: &AttemptRef, worker: &WorkerId) -> Result<bool> {
        let n: i64 = self
            .lock()
            .query_row(
                "SELECT COUNT(*) FROM tasks WHERE job_id = ?1 AND task_id = ?2 AND attempt = ?3
                 AND worker_id = ?4 AND state = 'RUNNING'",
                params![
                    attempt.job_id.as_str(),
                    attempt.task_id.as_str(),
                    attempt.attempt,
                    worker.as_str()
                ],
                |r| r.get(0),
            )
            .map_err(HeadError::store("check attempt"))?;
        Ok(n > 0)
    }

    /// The task attempts `worker` runs now, as assigned (job, task and attempt filled in):
    /// what decides which objects it may read and write.
    ///
    /// # Errors
    /// [`HeadError::Store`]; [`HeadError::InvalidArgument`] for a spec that does not decode.
    pub fn running_assignments(&self, worker: &WorkerId) -> Result<Vec<TaskAssignment>> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT job_id, task_id, attempt, spec FROM tasks
                 WHERE worker_id = ?1 AND state = 'RUNNING'",
            )
            .map_err(HeadError::store("running attempts"))?;
        let rows = stmt
            .query_map(params![worker.as_str()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, u32>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                ))
            })
            .map_err(HeadError::store("running attempts"))?;
        let mut out = Vec::new();
        for row in rows {
            let (job, task, attempt, spec) = row.map_err(HeadError::store("running attempts"))?;
            let mut a = TaskAssignment::decode(spec.as_slice()).map_err(|e| {
                HeadError::invalid(format!("tasks.spec of {job}/{task}"), e.to_string())
            })?;
            a.job_id = job;
            a.task_id = task;
            a.attempt = attempt;
            out.push(a);
        }
        Ok(out)
    }

    /// Ends the running attempt: SUCCEEDED with its result, or back to PENDING (a retry), or
    /// FAILED with the error. Returns false if `attempt` was not the running one.
    ///
    /// # Errors
    /// [`HeadError::Store`].
    pub fn finish_attempt(
        &self,
        attempt: &AttemptRef,
        state: TaskState,
        result_json: Option<&str>,
        error: Option<&str>,
        count_failure: bool,
    ) -> Result<bool> {
        let n = self
            .lock()
            .execute(
                "UPDATE tasks SET state = ?4, result_json = COALESCE(?5, result_json),
                     error = COALESCE(?6, error), failures = failures + ?7,
                     worker_id = CASE WHEN ?4 = 'PENDING' THEN NULL ELSE worker_id END
                 WHERE job_id = ?1 AND task_id = ?2 AND attempt = ?3 AND state = 'RUNNING'",
                params![
                    attempt.job_id.as_str(),
                    attempt.task_id.as_str(),
                    attempt.attempt,
                    state.as_str(),
                    result_json,
                    error,
                    i64::from(count_failure)
                ],
            )
            .map_err(HeadError::store("finish attempt"))?;
        Ok(n > 0)
    }

    /// Ends the running attempt as a failure that counts: the task goes back to PENDING, or
    /// to FAILED once it has failed `max_failures` times. Returns the task's new state and
    /// failure count, or `None` if `attempt` was not the running one.
    ///
    /// # Errors
    /// [`HeadError::Store`].
    pub fn fail_attempt(
        &self,
        attempt: &AttemptRef,
        error: &str,
        max_failures: u32,
    ) -> Result<Option<(TaskState, u32)>> {
        self.lock()
            .query_row(
                "UPDATE tasks SET failures = failures + 1, error = ?4,
                     state = CASE WHEN failures + 1 >= ?5 THEN 'FAILED' ELSE 'PENDING' END,
                     worker_id = CASE WHEN failures + 1 >= ?5 THEN worker_id ELSE NULL END
                 WHERE job_id = ?1 AND task_id = ?2 AND attempt = ?3 AND state = 'RUNNING'
                 RETURNING state, failures",
                params![
                    attempt.job_id.as_str(),
                    attempt.task_id.as_str(),
                    attempt.attempt,
                    error,
                    max_failures
                ],
                |r| Ok((TaskState::parse(&r.get::<_, String>(0)?), r.get(1)?)),
            )
            .optional()
            .map_err(HeadError::store("fail attempt"))
    }

    /// Cancels every task of a job that has not ended.
    ///
    /// # Errors
    /// [`HeadError::Store`].
    pub fn cancel_tasks(&self, job: &JobId) -> Result<()> {
        self.lock()
            .execute(
                "UPDATE tasks SET state = 'CANCELLED' WHERE job_id = ?1 AND state IN ('PENDING', 'RUNNING')",
                [job.as_str()],
            )
            .map_err(HeadError::store("cancel tasks"))?;
        Ok(())
    }

    /// Cancels the job's tasks that have not started (a finished training job's queued
    /// replacement replicas); running ones are left to report.
    ///
    /// # Errors
    /// [`HeadError::Store`].
    pub fn cancel_pending_tasks(&self, job: &JobId) -> Result<()> {
        self.lock()
            .execute(
                "UPDATE tasks SET state = 'CANCELLED' WHERE job_id = ?1 AND state = 'PENDING'",
                [job.as_str()],
            )
            .map_err(HeadError::store("cancel pending tasks"))?;
        Ok(())
    }

    /// After a head restart: every RUNNING attempt of the job is lost; its task goes back to
    /// PENDING. Returns how many.
    ///
    /// # Errors
    /// [`HeadError::Store`].
    pub fn requeue_running_tasks(&self, job: &JobId) -> Result<usize> {
        self.lock()
            .execute(
                "UPDATE tasks SET state = 'PENDING', worker_id = NULL WHERE job_id = ?1 AND state = 'RUNNING'",
                [job.as_str()],
            )
            .map_err(HeadError::store("requeue tasks"))
    }

    /// Appends log lines to a job's log, in order; returns the next sequence number.
    ///
    /// # Errors
    /// [`HeadError::Store`].
    pub fn append_logs(&self, job: &JobId, worker: &str, lines: &[String]) -> Result<u64> {
        let lines: Vec<(&str, Option<&[u8]>)> = lines.iter().map(|l| (l.as_str(), None)).collect();
        self.append_log_rows(job, worker, &lines)
    }

    /// Appends one head line that carries a typed progress event (prost-encoded
    /// `TrainProgress`).
    ///
    /// # Errors
    /// [`HeadError::Store`].
    pub fn append_progress(&self, job: &JobId, line: &str, progress: &[u8]) -> Result<u64> {
        self.append_log_rows(job, "", &[(line, Some(progress))])
    }

    fn append_log_rows(
        &self,
        job: &JobId,
        worker: &str,
        lines: &[(&str, Option<&[u8]>)],
    ) -> Result<u64> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(HeadError::store("append logs"))?;
        let next = insert_log_rows(&tx, job, worker, lines)?;
        tx.commit().map_err(HeadError::store("append logs"))?;
        Ok(next)
    }

    /// Up to `limit` log lines of a job from `from_seq`.
    ///
    /// # Errors
    /// [`HeadError::Store`].
    pub fn logs(&self, job: &JobId, from_seq: u64, limit: u32) -> Result<Vec<LogRow>> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT seq, time, worker_id, line, progress FROM job_logs
                 WHERE job_id = ?1 AND seq >= ?2 ORDER BY seq LIMIT ?3",
            )
            .map_err(HeadError::store("read logs"))?;
        let rows = stmt
            .query_map(params![job.as_str(), from_seq as i64, limit], |r| {
                Ok(LogRow {
                    seq: r.get::<_, i64>(0)? as u64,
                    time: r.get(1)?,
                    worker_id: r.get(2)?,
                    line: r.get(3)?,
                    progress: r.get(4)?,
                })
            })
            .map_err(HeadError::store("read logs"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(HeadError::store("read logs"))
    }

    /// Records a worker registration and returns its new id.
    ///
    /// # Errors
    /// [`HeadError::Store`].
    pub fn insert_worker(&self, w: &WorkerRow) -> Result<WorkerId> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(HeadError::store("register worker"))?;
        let n: i64 = tx
            .query_row("SELECT COUNT(*) + 1 FROM workers", [], |r| r.get(0))
            .map_err(HeadError::store("register worker"))?;
        let id = format!("worker-{n:06}");
        tx.execute(
            &format!(
                "INSERT INTO workers (id, name, device, address, memory_bytes, cores, version, state,
                     registered_at, last_heartbeat_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'ALIVE', {NOW}, {NOW})"
            ),
            params![
                id,
                w.name,
                w.device,
                w.address,
                w.memory_bytes as i64,
                w.cores,
                w.version
            ],
        )
        .map_err(HeadError::store("register worker"))?;
        tx.commit().map_err(HeadError::store("register worker"))?;
        Ok(WorkerId(id))
    }

    /// Records a worker's state (ALIVE, DRAINING, DEAD) and why.
    ///
    /// # Errors
    /// [`HeadError::Store`].
    pub fn set_worker_state(&self, id: &WorkerId, state: &str, reason: &str) -> Result<()> {
        self.lock()
            .execute(
                &format!(
                    "UPDATE workers SET state = ?2, reason = ?3, last_heartbeat_at = {NOW} WHERE id = ?1"
                ),
                params![id.as_str(), state, reason],
            )
            .map_err(HeadError::store("update worker"))?;
        Ok(())
    }

    /// After a head restart: workers recorded ALIVE are gone until they register again.
    ///
    /// # Errors
    /// [`HeadError::Store`].
    pub fn mark_all_workers_dead(&self, reason: &str) -> Result<()> {
        self.lock()
            .execute(
                "UPDATE workers SET state = 'DEAD', reason = ?1 WHERE state != 'DEAD'",
                [reason],
            )
            .map_err(HeadError::store("update workers"))?;
        Ok(())
    }
}

/// Sets a job's state and reason (and its start or end time) unless it has ended; whether it
/// changed.
fn update_job_state(conn: &Connection, id: &JobId, state: JobState, reason: &str) -> Result<bool> {
    let time_column = match state {
        JobState::Running => {
            ", started_at = COALESCE(started_at, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))"
        }
        s if s.is_terminal() => ", finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
        _ => "",
    };
    let n = conn
        .execute(
            &format!(
                "UPDATE jobs SET state = ?2, reason = ?3 {time_column}
                 WHERE id = ?1 AND state IN ('PENDING', 'RUNNING')"
            ),
            params![id.as_str(), state.label(), reason],
        )
        .map_err(HeadError::store("update job"))?;
    Ok(n > 0)
}

/// Appends log lines (with their optional progress blobs) after the job's last one, inside
/// the caller's transaction; the next free sequence number.
fn insert_log_rows(
    conn: &Connection,
    job: &JobId,
    worker: &str,
    lines: &[(&str, Option<&[u8]>)],
) -> Result<u64> {
    let mut seq: i64 = conn
        .query_row(
            "SELECT COALESCE(MAX(seq) + 1, 0) FROM job_logs WHERE job_id = ?1",
            [job.as_str()],
            |r| r.get(0),
        )
        .map_err(HeadError::store("append logs"))?;
    let mut stmt = conn
        .prepare_cached(&format!(
            "INSERT INTO job_logs (job_id, seq, time, worker_id, line, progress) VALUES (?1, ?2, {NOW}, ?3, ?4, ?5)"
        ))
        .map_err(HeadError::store("append logs"))?;
    for (line, progress) in lines {
        stmt.execute(params![job.as_str(), seq, worker, line, progress])
            .map_err(HeadError::store("append logs"))?;
        seq += 1;
    }
    Ok(seq as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use medray_proto::v1::job_spec::Kind;
    use medray_proto::v1::SelftestSpec;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("catalog.db")).unwrap();
        (dir, s)
    }

    /// A store holding one (selftest) job.
    fn store_with_job() -> (tempfile::TempDir, Store, JobId) {
        let (dir, s) = store();
        let id = JobId(
            s.insert_job("selftest", &JobSpec::default(), "")
                .unwrap()
                .id,
        );
        (dir, s, id)
    }

    #[test]
    fn attempts_are_fenced_and_terminal_jobs_never_change() {
        let (_d, s) = store();
        let spec = JobSpec {
            kind: Some(Kind::Selftest(SelftestSpec::default())),
        };
        let job = s.insert_job("selftest", &spec, "").unwrap();
        let id = JobId(job.id.clone());
        assert_eq!(job.id, "job-000001");
        s.insert_tasks(&id, &[(TaskId("t0001".into()), TaskAssignment::default())])
            .unwrap();
        let (w1, w2) = (WorkerId("w1".into()), WorkerId("w2".into()));
        let a1 = s
            .start_attempt(&id, &TaskId("t0001".into()), &w1)
            .unwrap()
            .unwrap();
        assert_eq!(a1.attempt, 1);
        assert!(s
            .start_attempt(&id, &TaskId("t0001".into()), &w2)
            .unwrap()
            .is_none());
        let r1 = AttemptRef {
            job_id: id.clone(),
            task_id: TaskId("t0001".into()),
            attempt: 1,
        };
        assert!(s.is_current(&r1, &w1).unwrap());
        assert!(!s.is_current(&r1, &w2).unwrap());
        // Worker 1 is lost: the task is pending again, attempt 2 goes to worker 2.
        assert!(s
            .finish_attempt(&r1, TaskState::Pending, None, Some("lost"), true)
            .unwrap());
        let a2 = s
            .start_attempt(&id, &TaskId("t0001".into()), &w2)
            .unwrap()
            .unwrap();
        assert_eq!(a2.attempt, 2);
        // A late report of attempt 1 is refused; attempt 2 is counted once.
        assert!(!s
            .finish_attempt(&r1, TaskState::Succeeded, Some("{}"), None, false)
            .unwrap());
        let r2 = AttemptRef { attempt: 2, ..r1 };
        assert!(s
            .finish_attempt(&r2, TaskState::Succeeded, Some("{}"), None, false)
            .unwrap());
        assert_eq!(s.job(&id).unwrap().unwrap().tasks_succeeded, 1);

        assert!(s.set_job_state(&id, JobState::Running, "").unwrap());
        assert!(s.set_job_state(&id, JobState::Succeeded, "").unwrap());
        assert!(!s.set_job_state(&id, JobState::Failed, "late").unwrap());
        let j = s.job(&id).unwrap().unwrap();
        assert_eq!(j.state, JobState::Succeeded as i32);
        assert!(!j.started_at.is_empty() && !j.finished_at.is_empty());
    }

    /// A follower stops when it sees the job ended; the last line must be there by then. The
    /// state used to change before the line was written (`logs_follow_delivers_every_line_in_order`
    /// sometimes missed "job SUCCEEDED"): now both are one transaction, and a job ends once.
    #[test]
    fn a_job_ends_once_with_its_last_line() {
        let (_dir, s, id) = store_with_job();
        s.append_logs(&id, "", &["working".into()]).unwrap();
        assert!(s
            .end_job(&id, JobState::Succeeded, "", "job SUCCEEDED")
            .unwrap());
        assert!(!s
            .end_job(&id, JobState::Failed, "late", "job FAILED: late")
            .unwrap());
        let lines: Vec<String> = s
            .logs(&id, 0, 10)
            .unwrap()
            .into_iter()
            .map(|r| r.line)
            .collect();
        assert_eq!(lines, ["working", "job SUCCEEDED"]);
        let j = s.job(&id).unwrap().unwrap();
        assert_eq!(j.state, JobState::Succeeded as i32);
        assert!(!j.finished_at.is_empty());
    }

    /// Issue 17 item 4: the CLI's progress bar parsed the text of step lines; a step line now
    /// carries its typed progress, and plain lines carry none.
    #[test]
    fn log_lines_keep_their_typed_progress() {
        use prost::Message;
        let (_dir, s, id) = store_with_job();
        s.append_logs(&id, "worker-000001", &["loading".into()])
            .unwrap();
        let progress = medray_proto::v1::TrainProgress {
            epoch: 2,
            epochs: 5,
            step_in_epoch: 3,
            steps_in_epoch: 4,
            step: 7,
            loss: -1.25,
            replicas: 2,
        };
        let next = s
            .append_progress(&id, "step 3/4 of epoch 2/5", &progress.encode_to_vec())
            .unwrap();
        assert_eq!(next, 2);
        let rows = s.logs(&id, 0, 10).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].progress, None);
        assert_eq!(rows[1].worker_id, "");
        let back =
            medray_proto::v1::TrainProgress::decode(rows[1].progress.as_deref().unwrap()).unwrap();
        assert_eq!(back, progress);
    }

    #[test]
    fn only_failed_attempts_count_towards_the_limit() {
        let (_d, s) = store();
        let id = JobId(
            s.insert_job("selftest", &JobSpec::default(), "")
                .unwrap()
                .id,
        );
        let task = TaskId("t0001".into());
        s.insert_tasks(&id, &[(task.clone(), TaskAssignment::default())])
            .unwrap();
        let w = WorkerId("w1".into());
        let attempt = |n| AttemptRef {
            job_id: id.clone(),
            task_id: task.clone(),
            attempt: n,
        };
        // Attempt 1 is not taken by the worker: pending again, nothing counted.
        s.start_attempt(&id, &task, &w).unwrap().unwrap();
        assert!(s
            .finish_attempt(&attempt(1), TaskState::Pending, None, None, false)
            .unwrap());
        // Attempts 2 and 3 run and fail; the limit is two failures.
        s.start_attempt(&id, &task, &w).unwrap().unwrap();
        assert_eq!(
            s.fail_attempt(&attempt(2), "oom", 2).unwrap(),
            Some((TaskState::Pending, 1))
        );
        assert_eq!(s.fail_attempt(&attempt(2), "late", 2).unwrap(), None);
        s.start_attempt(&id, &task, &w).unwrap().unwrap();
        assert_eq!(
            s.fail_attempt(&attempt(3), "oom again", 2).unwrap(),
            Some((TaskState::Failed, 2))
        );
        let row = &s.tasks(&id).unwrap()[0];
        assert_eq!(
            (row.state, row.attempt, row.failures),
            (TaskState::Failed, 3, 2)
        );
        assert_eq!(row.error.as_deref(), Some("oom again"));
    }

    #[test]
    fn log_lines_keep_their_order_across_batches() {
        let (_d, s) = store();
        let job = s.insert_job("selftest", &JobSpec::default(), "").unwrap();
        let id = JobId(job.id);
        let a: Vec<String> = (0..5).map(|i| format!("a{i}")).collect();
        let b: Vec<String> = (0..3).map(|i| format!("b{i}")).collect();
        assert_eq!(s.append_logs(&id, "", &a).unwrap(), 5);
        assert_eq!(s.append_logs(&id, "w1", &b).unwrap(), 8);
        let rows = s.logs(&id, 3, 100).unwrap();
        let lines: Vec<_> = rows.iter().map(|r| (r.seq, r.line.as_str())).collect();
        assert_eq!(
            lines,
            [(3, "a3"), (4, "a4"), (5, "b0"), (6, "b1"), (7, "b2")]
        );
    }
}
