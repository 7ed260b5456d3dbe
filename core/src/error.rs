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

    /// A DICOM series folder (or one of its files, then `path` names the file) could not be
    /// read as one volume.
    #[error("{}: {reason}", path.display())]
    Dicom { path: PathBuf, reason: String },

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

    /// A stage (object store) operation failed.
    #[error("stage {op} `{object}`: {source}")]
    Stage {
        op: &'static str,
        object: String,
        #[source]
        source: Box<object_store::Error>,
    },

    /// An encrypted object is damaged (tampered, truncated or not written by medray) or the
    /// stage key cannot decrypt it. No data is ever returned in this case.
    #[error("stage object `{object}` cannot be decrypted with stage key {key_id}: {reason}")]
    Decrypt {
        object: String,
        key_id: String,
        reason: String,
    },

    /// An object was encrypted with another stage key than the one in use.
    #[error(
        "stage object `{object}` was encrypted with stage key {stored_key_id}, but the key in use is {key_id} (wrong stage.key or MEDRAY_STAGE_KEY?)"
    )]
    WrongStageKey {
        object: String,
        stored_key_id: String,
        key_id: String,
    },

    /// A stage key is missing, malformed or unreadable.
    #[error("stage key {source_name}: {reason}")]
    StageKey { source_name: String, reason: String },

    /// A catalog (SQLite) operation failed.
    #[error("catalog {op}: {source}")]
    Catalog {
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },

    /// A dataset of this name exists with other content.
    #[error(
        "dataset `{name}` already exists with other content (sha256 {existing_sha256}, new {new_sha256}); pass --replace or choose another --name"
    )]
    DatasetExists {
        name: String,
        existing_sha256: String,
        new_sha256: String,
    },

    /// A dataset name is not in the catalog.
    #[error("no dataset named `{name}` in the catalog")]
    DatasetNotFound { name: String },

    /// A download failed for good (after its retries, or at once for an answer that retrying
    /// cannot change, such as `404`).
    #[error("download of {url} failed after {attempts} attempt(s): {reason}")]
    Download {
        url: String,
        attempts: u32,
        reason: String,
    },

    /// A downloaded file does not have the checksum it was expected to have.
    #[error("{algorithm} of {url} is {got}, expected {expected}: refusing the download")]
    ChecksumMismatch {
        url: String,
        algorithm: &'static str,
        expected: String,
        got: String,
    },

    /// A zip archive is unreadable, hostile (path traversal, absolute path, link) or over a
    /// limit; nothing of it is used.
    #[error("archive {}{}: {reason}", archive.display(), entry.as_ref().map(|e| format!(": entry `{e}`")).unwrap_or_default())]
    Archive {
        archive: PathBuf,
        entry: Option<String>,
        reason: String,
    },

    /// A row of a dataset manifest CSV is invalid.
    #[error("{}: line {line}{}: {reason}", path.display(), column.as_ref().map(|c| format!(", column `{c}`")).unwrap_or_default())]
    Manifest {
        path: PathBuf,
        line: u64,
        column: Option<String>,
        reason: String,
    },

    /// A model, model version or alias is not in the registry.
    #[error("no model `{name}`{} in the registry", version.as_ref().map(|v| format!(" {v}")).unwrap_or_default())]
    ModelNotFound {
        name: String,
        /// "version `v3`" or "alias `production`"; `None` for the model itself.
        version: Option<String>,
    },

    /// A model version is registered already; versions are immutable.
    #[error(
        "model `{name}` version `{version}` already exists (sha256 {existing_sha256}); versions are immutable: register another --version"
    )]
    ModelVersionExists {
        name: String,
        version: String,
        existing_sha256: String,
    },

    /// A model version cannot be deleted while aliases point at it.
    #[error(
        "model `{name}` version `{version}` is aliased as {}: move the alias or pass --force",
        aliases.iter().map(|a| format!("`{a}`")).collect::<Vec<_>>().join(", ")
    )]
    ModelVersionAliased {
        name: String,
        version: String,
        aliases: Vec<String>,
    },

    /// A stored model artifact does not have the sha256 the registry recorded.
    #[error(
        "model artifact `{object}` is damaged: sha256 {got} ({got_bytes} bytes), the registry recorded {expected} ({expected_bytes} bytes)"
    )]
    ArtifactMismatch {
        object: String,
        expected: String,
        got: String,
        expected_bytes: u64,
        got_bytes: u64,
    },

    /// Validation refused some cases of an ingest; nothing was published.
    #[error("{} bad case(s), nothing published:\n{}", cases.len(), crate::ingest::format_bad_cases(cases))]
    BadCases { cases: Vec<crate::ingest::BadCase> },
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Stage`].
    pub fn stage(op: &'static str, object: impl Into<String>, source: object_store::Error) -> Self {
        Error::Stage {
            op,
            object: object.into(),
            source: Box::new(source),
        }
    }

    /// Shorthand for [`Error::Catalog`].
    pub fn catalog(op: &'static str, source: rusqlite::Error) -> Self {
        Error::Catalog { op, source }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// The same error naming `name` where it named the file `path` (a file read from a
    /// cache, reported under its stage key).
    #[must_use]
    pub fn renamed(self, path: &std::path::Path, name: &std::path::Path) -> Self {
        match self {
            Error::Io { path: p, source } if p == path => Error::Io {
                path: name.to_path_buf(),
                source,
            },
            Error::Nifti { path: p, reason } if p == path => Error::Nifti {
                path: name.to_path_buf(),
                reason,
            },
            Error::Dicom { path: p, reason } if p == path => Error::Dicom {
                path: name.to_path_buf(),
                reason,
            },
            Error::Keypoints {
                path: p,
                line,
                reason,
            } if p == path => Error::Keypoints {
                path: name.to_path_buf(),
                line,
                reason,
            },
            other => other,
        }
    }
}
