//! Prometheus metrics of the head, served at `/metrics`.

use std::sync::atomic::AtomicU64;

use medray_proto::v1::JobState;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Label of the jobs-ended counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// Final state.
    pub state: String,
}

/// Label of the bytes-moved counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// `to_worker`, `to_client`, `from_client`.
    pub direction: String,
}

/// The head's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Workers registered now.
    pub workers: Gauge,
    /// Workers lost (timeouts, disconnections, departures).
    pub workers_lost: Counter,
    /// Jobs submitted.
    pub jobs_submitted: Counter,
    /// Jobs ended, by final state.
    pub jobs_ended: Family<StateLabel, Counter>,
    /// Task attempts started.
    pub tasks_started: Counter,
    /// Task attempts that succeeded.
    pub tasks_succeeded: Counter,
    /// Task attempts that failed.
    pub tasks_failed: Counter,
    /// Tasks waiting in the queue.
    pub queue: Gauge,
    /// Jobs by state now (refreshed from the store at each scrape).
    pub jobs: Family<StateLabel, Gauge>,
    /// Seconds from a task attempt's assignment to its reported end.
    pub task_latency: Histogram,
    /// Object bytes moved, by direction.
    pub bytes: Family<DirectionLabel, Counter<u64, AtomicU64>>,
    /// Optimizer steps committed by training jobs.
    pub train_steps: Counter,
    /// Training replicas dropped (worker lost, timed out or failed).
    pub train_replicas_lost: Counter,
    /// Gradient bytes through the head's all-reduce (received and sent).
    pub allreduce_bytes: Counter<u64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Self {
            workers: Gauge::default(),
            workers_lost: Counter::default(),
            jobs_submitted: Counter::default(),
            jobs_ended: Family::default(),
            tasks_started: Counter::default(),
            tasks_succeeded: Counter::default(),
            tasks_failed: Counter::default(),
            queue: Gauge::default(),
            jobs: Family::default(),
            task_latency: Histogram::new(exponential_buckets(0.05, 2.0, 16)),
            bytes: Family::default(),
            train_steps: Counter::default(),
            train_replicas_lost: Counter::default(),
            allreduce_bytes: Counter::default(),
            registry: Registry::with_prefix("medray"),
        };
        m.registry
            .register("workers", "Workers registered now", m.workers.clone());
        m.registry
            .register("workers_lost", "Workers lost", m.workers_lost.clone());
        m.registry
            .register("jobs_submitted", "Jobs submitted", m.jobs_submitted.clone());
        m.registry.register(
            "jobs_ended",
            "Jobs ended, by final state",
            m.jobs_ended.clone(),
        );
        m.registry.register(
            "task_attempts_started",
            "Task attempts started",
            m.tasks_started.clone(),
        );
        m.registry.register(
            "task_attempts_succeeded",
            "Task attempts that succeeded",
            m.tasks_succeeded.clone(),
        );
        m.registry.register(
            "task_attempts_failed",
            "Task attempts that failed",
            m.tasks_failed.clone(),
        );
        m.registry
            .register("task_queue", "Tasks waiting for a worker", m.queue.clone());
        m.registry.register("jobs", "Jobs by state", m.jobs.clone());
        m.registry.register(
            "task_latency_seconds",
            "Seconds from assignment to the end of a task attempt",
            m.task_latency.clone(),
        );
        m.registry.register(
            "object_bytes",
            "Object bytes moved, by direction",
            m.bytes.clone(),
        );
        m.registry.register(
            "train_steps",
            "Optimizer steps committed by training jobs",
            m.train_steps.clone(),
        );
        m.registry.register(
            "train_replicas_lost",
            "Training replicas dropped (worker lost, timed out or failed)",
            m.train_replicas_lost.clone(),
        );
        m.registry.register(
            "allreduce_bytes",
            "Gradient bytes through the head's all-reduce, received and sent",
            m.allreduce_bytes.clone(),
        );
        m
    }
}

impl Metrics {
    /// Sets the workers gauge.
    pub fn set_workers(&self, n: usize) {
        self.workers.set(n as i64);
    }

    /// Sets the queue gauge.
    pub fn set_queue(&self, n: usize) {
        self.queue.set(n as i64);
    }

    /// Counts an ended job.
    pub fn job_ended(&self, state: JobState) {
        self.jobs_ended
            .get_or_create(&StateLabel {
                state: state.label().into(),
            })
            .inc();
    }

    /// Sets the jobs-by-state gauges.
    pub fn set_jobs(&self, counts: &[(String, i64)]) {
        for state in ["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"] {
            let n = counts
                .iter()
                .find(|(s, _)| s == state)
                .map_or(0, |(_, n)| *n);
            self.jobs
                .get_or_create(&StateLabel {
                    state: state.into(),
                })
                .set(n);
        }
    }

    /// Counts moved bytes.
    pub fn moved(&self, direction: &str, bytes: u64) {
        self.bytes
            .get_or_create(&DirectionLabel {
                direction: direction.into(),
            })
            .inc_by(bytes);
    }

    /// The Prometheus text exposition.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
