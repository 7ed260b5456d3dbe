//! The dedicated compute thread: tensor work never runs on the async runtime, so heartbeats
//! and control messages keep flowing while a task computes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use candle_core::Device;
use medray_proto::v1::task_assignment::Kind;
use medray_proto::v1::TaskAssignment;
use tokio::sync::mpsc::Sender;

use crate::head_client::HeadClient;
use crate::selftest::TaskError;

/// What a running task tells its reporter.
#[derive(Debug)]
pub enum TaskEvent {
    /// One log line.
    Log(String),
    /// The end of the attempt.
    Finished(Outcome),
}

/// How a task attempt ended.
#[derive(Debug)]
pub enum Outcome {
    /// Its result summary (JSON).
    Succeeded(String),
    /// Its failure, classified here.
    Failed {
        /// What went wrong.
        reason: String,
        /// True if running it again elsewhere may succeed.
        retryable: bool,
    },
}

/// A task handed to the compute thread.
pub struct ComputeTask {
    /// The assignment.
    pub assignment: TaskAssignment,
    /// Set to stop the task early.
    pub cancel: Arc<AtomicBool>,
    /// Where its log lines and outcome go.
    pub events: Sender<TaskEvent>,
    /// A client to fetch objects with.
    pub client: HeadClient,
    /// The worker's id (for fetches).
    pub worker_id: String,
}

/// What a task body can use.
pub struct TaskContext<'a> {
    /// The device to compute on.
    pub device: &'a Device,
    /// The worker's device spec, as announced (`cpu`, `cuda:0`).
    pub device_spec: &'a str,
    /// The runtime, to await network calls from this thread.
    pub runtime: &'a tokio::runtime::Handle,
    /// Object cache folder.
    pub cache_dir: &'a std::path::Path,
    /// The stage to read objects from directly, if configured.
    pub direct_stage: Option<&'a medray_core::stage::Stage>,
    /// Models loaded by earlier tasks, kept for the next ones (keyed by the weights' sha256).
    pub models: &'a std::cell::RefCell<crate::infer::ModelCache>,
    cancel: &'a AtomicBool,
    events: &'a Sender<TaskEvent>,
}

impl<'a> TaskContext<'a> {
    /// Emits a log line (waits when the reporter is behind).
    pub fn log(&self, line: impl Into<String>) {
        // A closed channel means the reporter gave up on this attempt; the line has nowhere to go.
        let _ = self.events.blocking_send(TaskEvent::Log(line.into()));
    }

    /// True once the task should stop.
    #[must_use]
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// A context for work outside the compute thread (`medray train-local`'s in-process
    /// replica), reading objects straight from `stage`.
    pub(crate) fn standalone(
        device: &'a Device,
        runtime: &'a tokio::runtime::Handle,
        cache_dir: &'a std::path::Path,
        stage: &'a medray_core::stage::Stage,
        models: &'a std::cell::RefCell<crate::infer::ModelCache>,
        cancel: &'a AtomicBool,
        events: &'a Sender<TaskEvent>,
    ) -> Self {
        Self {
            device,
            device_spec: if device.is_cuda() { "cuda" } else { "cpu" },
            runtime,
            cache_dir,
            direct_stage: Some(stage),
            models,
            cancel,
            events,
        }
    }

    /// A stage object in the local cache, read from the stage this context was made with
    /// (`TaskContext::standalone`); checked against `sha256`.
    ///
    /// # Errors
    /// A [`TaskError`] naming the key (permanent when there is no stage to read from).
    pub fn fetch_direct(&self, key: &str, sha256: &str) -> Result<std::path::PathBuf, TaskError> {
        let Some(stage) = self.direct_stage else {
            return Err(TaskError::permanent(format!(
                "fetching {key}: no stage to read it from"
            )));
        };
        let fetched = self
            .runtime
            .block_on(crate::head_client::read_object_direct(
                stage,
                key,
                sha256,
                self.cache_dir,
            ));
        fetched.map_err(fetch_error(key))
    }

    /// A stage object in the local cache: read from the stage directly when one is
    /// configured, otherwise fetched through the head; checked against `sha256` either way.
    ///
    /// # Errors
    /// A retryable [`TaskError`] naming the key.
    pub fn fetch(
        &self,
        client: &mut HeadClient,
        worker_id: &str,
        key: &str,
        sha256: &str,
    ) -> Result<std::path::PathBuf, TaskError> {
        if self.direct_stage.is_some() {
            return self.fetch_direct(key, sha256);
        }
        let fetched = self.runtime.block_on(crate::head_client::fetch_object(
            client,
            worker_id,
            key,
            sha256,
            self.cache_dir,
        ));
        fetched.map_err(fetch_error(key))
    }
}

/// How a failed fetch of `key` ends the task.
fn fetch_error(key: &str) -> impl FnOnce(crate::WorkerError) -> TaskError + '_ {
    move |e| match e {
        // The stage holds other bytes than the catalog recorded: every attempt reads them.
        crate::WorkerError::ContentMismatch { .. } => TaskError::permanent(format!("fetching {e}")),
        e => TaskError::transient(format!("fetching {key}: {e}")),
    }
}

/// The handle of the compute thread.
#[derive(Debug, Clone)]
pub struct ComputeThread {
    tx: mpsc::Sender<ComputeTask>,
}

impl ComputeThread {
    /// Starts the thread.
    ///
    /// # Errors
    /// The OS error if the thread cannot be spawned.
    pub fn start(
        device: Device,
        device_spec: String,
        runtime: tokio::runtime::Handle,
        cache_dir: std::path::PathBuf,
        direct_stage: Option<std::sync::Arc<medray_core::stage::Stage>>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<ComputeTask>();
        std::thread::Builder::new()
            .name("medray-compute".into())
            .spawn(move || {
                let models = std::cell::RefCell::new(crate::infer::ModelCache::default());
                let mut queued: Option<ComputeTask> = None;
                loop {
                    let task = match queued.take() {
                        Some(task) => task,
                        None => match rx.recv() {
                            Ok(task) => task,
                            Err(_) => break,
                        },
                    };
                    let ctx = TaskContext {
                        device: &device,
                        device_spec: &device_spec,
                        runtime: &runtime,
                        cache_dir: &cache_dir,
                        direct_stage: direct_stage.as_deref(),
                        models: &models,
                        cancel: &task.cancel,
                        events: &task.events,
                    };
                    let outcome = run_task(&ctx, &task);
                    let _ = task.events.blocking_send(TaskEvent::Finished(outcome));
                    match rx.try_recv() {
                        Ok(next) => queued = Some(next),
                        // Idle now: hand the last task's freed buffers back to the kernel.
                        Err(mpsc::TryRecvError::Empty) => {
                            medray_core::memory::release_freed_memory()
                        }
                        Err(mpsc::TryRecvError::Disconnected) => break,
                    }
                }
            })?;
        Ok(Self { tx })
    }

    /// Queues a task; false if the thread has stopped.
    #[must_use]
    pub fn submit(&self, task: ComputeTask) -> bool {
        self.tx.send(task).is_ok()
    }
}

fn run_task(ctx: &TaskContext<'_>, task: &ComputeTask) -> Outcome {
    let a = &task.assignment;
    let result = match &a.kind {
        Some(Kind::Selftest(spec)) => {
            crate::selftest::run(ctx, spec, task.client.clone(), &task.worker_id)
        }
        Some(Kind::Train(_)) => crate::train::run(ctx, a, task.client.clone(), &task.worker_id),
        Some(Kind::Infer(spec)) => {
            crate::infer::run(ctx, a, spec, task.client.clone(), &task.worker_id)
        }
        None => Err(TaskError::permanent(
            "the assignment names no task kind (is the head newer than this worker?)",
        )),
    };
    match result {
        Ok(json) => Outcome::Succeeded(json),
        Err(e) => Outcome::Failed {
            reason: e.reason,
            retryable: e.retryable,
        },
    }
}
