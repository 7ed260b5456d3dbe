//! Errors of the registration engine.
//!
//! Every variant names the thing that was wrong (a file, a tensor, a field) so that a user
//! reading the message knows what to fix. Tensor kernels themselves return
//! [`candle_core::Result`]; the layers above wrap those errors here.

use std::path::PathBuf;

/// The result type of `medray-core`.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in `medray-core`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed (shape, dtype or device problem inside candle).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A NIfTI file could not be read, or its content is unusable.
    #[error("{}: {reason}", path.display())]
    Nifti { path: PathBuf, reason: String },

    /// Two inputs that must agree in shape do not.
    #[error("shape mismatch in {op}: expected {expected}, got {got}")]
    ShapeMismatch {
        op: &'static str,
        expected: String,
        got: String,
    },

    /// An argument or configuration value is out of its valid range.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: String, reason: String },

    /// A weights file lacks a tensor, has an unexpected one, or a tensor has the wrong shape.
    #[error("weights {}: tensor `{tensor}`: {reason}", path.display())]
    Weights {
        path: PathBuf,
        tensor: String,
        reason: String,
    },

    /// A keypoints CSV file is malformed.
    #[error("{}: line {line}: {reason}", path.display())]
    Keypoints {
        path: PathBuf,
        line: usize,
        reason: String,
    },

    /// (De)serialising a JSON document failed.
    #[error("{}: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
