//! Errors of the worker.

/// What can go wrong in a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The head could not be reached or a call failed.
    #[error("head {address}: {source}")]
    Connect {
        /// The head's address.
        address: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The head refused a call.
    #[error("{call} refused by the head: {status}", status = .status.message())]
    Rpc {
        /// The RPC.
        call: &'static str,
        /// The head's status.
        status: tonic::Status,
    },
    /// The head's answer was not usable.
    #[error("{call}: invalid answer from the head: {reason}")]
    Protocol {
        /// The RPC.
        call: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// A configuration value is invalid.
    #[error("invalid worker configuration `{field}`: {reason}")]
    Config {
        /// The field (as the CLI flag).
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The actor system failed.
    #[error("actor system: {0}")]
    Actor(String),
    /// A core operation failed.
    #[error(transparent)]
    Core(#[from] medray_core::Error),
    /// A stage object arrived intact but is not the content the catalog recorded: the
    /// stored object was changed or damaged. Another attempt would read the same bytes.
    #[error("{key}: its content (sha256 {got}) differs from what the catalog recorded (sha256 {expected}); the stored object was changed or damaged")]
    ContentMismatch {
        /// The stage key.
        key: String,
        /// The recorded sha256.
        expected: String,
        /// The sha256 of what is stored.
        got: String,
    },
    /// A local file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl WorkerError {
    /// True when the head refused this worker for good (wrong token, protocol mismatch,
    /// invalid request): retrying cannot help.
    #[must_use]
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Self::Rpc { status, .. } if matches!(
                status.code(),
                tonic::Code::Unauthenticated
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::InvalidArgument
                    | tonic::Code::PermissionDenied
            )
        ) || matches!(self, Self::Config { .. })
    }

    pub(crate) fn rpc(call: &'static str) -> impl FnOnce(tonic::Status) -> Self {
        move |status| Self::Rpc { call, status }
    }
}

/// The worker's result type.
pub type Result<T, E = WorkerError> = std::result::Result<T, E>;
