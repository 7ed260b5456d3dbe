//! Errors of the head, and their one mapping to gRPC statuses.

/// What can go wrong in the head.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    /// The job, task, worker or object does not exist.
    #[error("{what} `{id}` not found")]
    NotFound {
        /// "job", "worker", "object", ...
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// A request field is missing or invalid.
    #[error("invalid request field `{field}`: {reason}")]
    InvalidArgument {
        /// The field.
        field: String,
        /// Why.
        reason: String,
    },
    /// The job store (SQLite) failed.
    #[error("job store ({op}): {source}")]
    Store {
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: rusqlite::Error,
    },
    /// A core operation (stage, catalog, ingest) failed.
    #[error(transparent)]
    Core(#[from] medray_core::Error),
    /// An actor did not answer in time or is gone.
    #[error("internal: {0}")]
    Actor(String),
    /// A configuration value is invalid.
    #[error("invalid head configuration `{field}`: {reason}")]
    Config {
        /// The field (as the CLI flag).
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A server could not start.
    #[error("{what}: {source}")]
    Io {
        /// What was being started.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl HeadError {
    pub(crate) fn store(op: &'static str) -> impl FnOnce(rusqlite::Error) -> Self {
        move |source| Self::Store { op, source }
    }

    /// A core error about a request: an invalid argument is reported as the request field
    /// it names.
    pub(crate) fn request_field(e: medray_core::Error) -> Self {
        match e {
            medray_core::Error::InvalidArgument { field, reason } => {
                Self::InvalidArgument { field, reason }
            }
            e => Self::Core(e),
        }
    }

    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<HeadError> for tonic::Status {
    fn from(e: HeadError) -> Self {
        let message = e.to_string();
        match e {
            HeadError::NotFound { .. } => Self::not_found(message),
            HeadError::InvalidArgument { .. } | HeadError::Config { .. } => {
                Self::invalid_argument(message)
            }
            HeadError::Core(
                medray_core::Error::InvalidArgument { .. } | medray_core::Error::Weights { .. },
            ) => Self::invalid_argument(message),
            HeadError::Core(
                medray_core::Error::ModelNotFound { .. }
                | medray_core::Error::DatasetNotFound { .. },
            ) => Self::not_found(message),
            HeadError::Core(medray_core::Error::ModelVersionExists { .. }) => {
                Self::already_exists(message)
            }
            HeadError::Core(medray_core::Error::ModelVersionAliased { .. }) => {
                Self::failed_precondition(message)
            }
            HeadError::Core(medray_core::Error::ArtifactMismatch { .. }) => {
                Self::data_loss(message)
            }
            HeadError::Actor(_) => Self::unavailable(message),
            _ => Self::internal(message),
        }
    }
}

impl<T> From<ractor::RactorErr<T>> for HeadError {
    fn from(e: ractor::RactorErr<T>) -> Self {
        Self::Actor(e.to_string())
    }
}

impl<T> From<ractor::MessagingErr<T>> for HeadError {
    fn from(e: ractor::MessagingErr<T>) -> Self {
        Self::Actor(e.to_string())
    }
}

/// The head's result type.
pub type Result<T, E = HeadError> = std::result::Result<T, E>;
