//! The options shared by the commands that use a local data directory: where the catalog,
//! the stage key and the default local stage live.

use std::path::PathBuf;

use anyhow::Context;
use medray_core::catalog::Catalog;
use medray_core::stage::{S3Options, Stage, StageKey, StageLocation, STAGE_KEY_ENV};

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
    /// Endpoint of an S3-compatible service for an s3:// stage (MinIO and others), e.g.
    /// http://127.0.0.1:9000; requests are path-style. Default: AWS_ENDPOINT_URL or AWS.
    #[arg(long, global = true, env = "MEDRAY_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// Region to sign S3 requests for (default: AWS_REGION or us-east-1).
    #[arg(long, global = true, env = "MEDRAY_S3_REGION")]
    pub s3_region: Option<String>,
    /// Allow a plain http:// S3 endpoint.
    #[arg(long, global = true, env = "MEDRAY_S3_ALLOW_HTTP")]
    pub s3_allow_http: bool,
}

impl From<&DataArgs> for S3Options {
    fn from(args: &DataArgs) -> Self {
        let mut s3 = S3Options::default().with_allow_http(args.s3_allow_http);
        if let Some(endpoint) = &args.s3_endpoint {
            s3 = s3.with_endpoint(endpoint);
        }
        if let Some(region) = &args.s3_region {
            s3 = s3.with_region(region);
        }
        s3
    }
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
        Stage::open_with(location.clone(), Some(key), &S3Options::from(self))
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
