//! Typed identifiers of jobs, tasks and workers.

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub String);

        impl $name {
            /// The id as text.
            #[must_use]
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_string())
            }
        }
    };
}

id_type!(
    /// A job, `job-000012`.
    JobId
);
id_type!(
    /// A task of a job, `t0003` (unique within its job).
    TaskId
);
id_type!(
    /// A worker registration, `worker-000004` (a worker that registers again gets a new id).
    WorkerId
);

/// A task attempt: the unit the scheduler assigns and a worker reports on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AttemptRef {
    /// Its job.
    pub job_id: JobId,
    /// Its task.
    pub task_id: TaskId,
    /// Attempt number, from 1.
    pub attempt: u32,
}

impl std::fmt::Display for AttemptRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}#{}", self.job_id, self.task_id, self.attempt)
    }
}
