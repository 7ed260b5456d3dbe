//! What the actors and services of one head share.

use std::path::PathBuf;
use std::sync::Arc;

use medray_core::catalog::Catalog;
use medray_core::stage::Stage;

use crate::config::HeadConfig;
use crate::logs::LogHub;
use crate::metrics::Metrics;
use crate::sessions::WorkerSessions;
use crate::store::Store;
use crate::Result;

/// Shared, immutable handles (the actors hold the mutable state).
#[derive(Debug, Clone)]
pub struct HeadContext {
    /// Settings.
    pub config: Arc<HeadConfig>,
    /// Jobs, tasks, logs, workers.
    pub store: Arc<Store>,
    /// Job logs.
    pub logs: Arc<LogHub>,
    /// The cluster's stage.
    pub stage: Arc<Stage>,
    /// Path of the catalog database.
    pub catalog_path: PathBuf,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The workers' session credentials.
    pub sessions: Arc<WorkerSessions>,
}

impl HeadContext {
    /// Opens a catalog connection (short-lived: one per request or job).
    ///
    /// # Errors
    /// [`crate::HeadError::Core`].
    pub fn catalog(&self) -> Result<Catalog> {
        Ok(Catalog::open(&self.catalog_path)?)
    }
}
