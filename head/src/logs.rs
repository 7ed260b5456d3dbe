//! Job logs: lines are appended to the store (so a follower that reconnects, or a head that
//! restarts, loses nothing) and followers are woken on every append.

use std::sync::Arc;

use tokio::sync::Notify;

use crate::ids::JobId;
use crate::store::Store;
use crate::Result;

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
}
