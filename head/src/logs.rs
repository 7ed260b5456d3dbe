//! Job logs: lines are appended to the store (so a follower that reconnects, or a head that
//! restarts, loses nothing) and followers are woken on every append.

use std::sync::Arc;
use std::time::Duration;

use medray_proto::v1::JobState;
use tokio::sync::{mpsc, Notify};

use crate::ids::JobId;
use crate::store::{LogRow, Store};
use crate::Result;

/// Lines read from the store at once by a follower.
const LOG_BATCH: u32 = 1000;

/// Appends job log lines and wakes followers.
#[derive(Debug)]
pub struct LogHub {
    store: Arc<Store>,
    appended: Notify,
}

impl LogHub {
    /// A hub over `store`.
    #[must_use]
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            store,
            appended: Notify::new(),
        }
    }

    /// Appends lines of `worker` ("" for the head) to the job's log.
    ///
    /// # Errors
    /// [`crate::HeadError::Store`].
    pub fn append(&self, job: &JobId, worker: &str, lines: &[String]) -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        self.store.append_logs(job, worker, lines)?;
        self.appended.notify_waiters();
        Ok(())
    }

    /// Appends one line from the head; a store failure is logged, not returned (a log line
    /// must never fail a job).
    pub fn line(&self, job: &JobId, line: impl Into<String>) {
        let line = line.into();
        tracing::info!(job_id = %job, "{line}");
        if let Err(e) = self.append(job, "", &[line]) {
            tracing::error!(job_id = %job, error = %e, "cannot record a log line");
        }
    }

    /// Appends a head line that reports a training step, with its typed progress; like
    /// [`LogHub::line`], a store failure is logged, not returned.
    pub fn progress(
        &self,
        job: &JobId,
        line: impl Into<String>,
        progress: &medray_proto::v1::TrainProgress,
    ) {
        use prost::Message;
        let line = line.into();
        tracing::info!(job_id = %job, "{line}");
        match self
            .store
            .append_progress(job, &line, &progress.encode_to_vec())
        {
            Ok(_) => self.appended.notify_waiters(),
            Err(e) => tracing::error!(job_id = %job, error = %e, "cannot record a log line"),
        }
    }

    /// Wakes followers (e.g. when a job ends).
    pub fn wake(&self) {
        self.appended.notify_waiters();
    }

    /// A future that completes at the next append or wake.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.appended.notified()
    }

    /// The job's log from `from_seq`, in order. Without `follow` it ends at the last line
    /// stored now; with `follow` it waits for new lines and ends once the job has ended and
    /// every line is delivered (a job's last line is stored with its end, in one
    /// transaction: [`Store::end_job`]). It ends early when the receiver is dropped; a store
    /// error is its last item.
    pub fn read(
        self: &Arc<Self>,
        job: JobId,
        from_seq: u64,
        follow: bool,
    ) -> mpsc::Receiver<Result<LogRow>> {
        let (tx, rx) = mpsc::channel(4);
        let hub = self.clone();
        tokio::spawn(async move {
            let mut next = from_seq;
            loop {
                // Subscribe before reading, so an append between the read and the wait
                // still wakes us.
                let notified = hub.notified();
                let rows = match hub.store.logs(&job, next, LOG_BATCH) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                if rows.is_empty() {
                    if !follow {
                        return;
                    }
                    let ended = match hub.store.job(&job) {
                        Ok(Some(j)) => JobState::try_from(j.state).is_ok_and(JobState::is_terminal),
                        _ => true,
                    };
                    if ended {
                        // Lines appended between the read and the state check come too.
                        match hub.store.logs(&job, next, LOG_BATCH) {
                            Ok(r) if r.is_empty() => return,
                            _ => continue,
                        }
                    }
                    tokio::select! {
                        () = notified => {}
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = tx.closed() => return,
                    }
                    continue;
                }
                for r in rows {
                    next = r.seq + 1;
                    if tx.send(Ok(r)).await.is_err() {
                        return;
                    }
                }
            }
        });
        rx
    }
}
