//! The options shared by the commands that use a local data directory: where the catalog,
//! the stage key and the default local stage live.

use std::path::PathBuf;

use anyhow::Context;
use medray_core::catalog::Catalog;
use medray_core::stage::{Stage, StageKey, StageLocation, STAGE_KEY_ENV};

/// `--data-dir` and `--stage`.
#[derive(Debug, clap::Args)]
pub struct DataArgs {
    /// Data directory: holds catalog.db, stage.key and the default local stage (stage/).
    #[arg(
        long,
        global = true,
        env = "MEDRAY_DATA_DIR",
        default_value = "./medray-data"
    )]
    pub data_dir: PathBuf,
    /// Stage location (file:///dir, a plain path, or s3://bucket/prefix with AWS_* env);
    /// default: <data-dir>/stage. The key comes from MEDRAY_STAGE_KEY (hex or base64 of 32
    /// bytes) or <data-dir>/stage.key (created on first use, mode 0600).
    #[arg(long, global = true, env = "MEDRAY_STAGE")]
    pub stage: Option<String>,
}

impl DataArgs {
    /// Opens the stage with its encryption key.
    pub fn open_stage(&self) -> anyhow::Result<Stage> {
        let location = match &self.stage {
            Some(url) => StageLocation::parse(url)?,
            None => StageLocation::Local(self.data_dir.join("stage")),
        };
        let key = match std::env::var(STAGE_KEY_ENV) {
            Ok(text) if !text.trim().is_empty() => StageKey::parse(&text, STAGE_KEY_ENV)?,
            _ => StageKey::load_or_create(&self.data_dir.join("stage.key"))?,
        };
        Stage::open(location.clone(), Some(key))
            .with_context(|| format!("opening stage {location}"))
    }

    /// Opens (creating) the catalog.
    pub fn open_catalog(&self) -> anyhow::Result<Catalog> {
        let path = self.data_dir.join("catalog.db");
        Catalog::open(&path).with_context(|| format!("opening catalog {}", path.display()))
    }
}

/// A Tokio runtime for the stage's async API.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}
