//! Where a stage lives: a local directory (the default) or an S3-compatible bucket.

use std::path::PathBuf;
use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::prefix::PrefixStore;
use object_store::ObjectStore;

use crate::{Error, Result};

/// A parsed stage URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StageLocation {
    /// A local directory: `file:///abs/dir` or a plain path.
    Local(PathBuf),
    /// An S3-compatible bucket, `s3://bucket/prefix`. Credentials, region and endpoint (for
    /// MinIO and others) come from the usual `AWS_*` environment variables
    /// (`AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, ...), overridden by [`S3Options`].
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix inside the bucket (no leading or trailing `/`), possibly empty.
        prefix: String,
    },
}

/// Settings of an S3-compatible service that override the `AWS_*` environment (the CLI fills
/// them from `--s3-endpoint` / `MEDRAY_S3_ENDPOINT` and friends). Requests are path-style
/// (`http://endpoint/bucket/key`), which MinIO and most S3-compatible servers expect.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct S3Options {
    /// Endpoint URL, e.g. `http://127.0.0.1:9000` (default: AWS for the region).
    pub endpoint: Option<String>,
    /// Region to sign requests for.
    pub region: Option<String>,
    /// Allow a plain `http://` endpoint (never for data leaving the machine).
    pub allow_http: bool,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key (never printed).
    pub secret_access_key: Option<String>,
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("allow_http", &self.allow_http)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl S3Options {
    /// Sets the endpoint URL.
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// Sets the region.
    pub fn with_region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Allows or refuses a plain `http://` endpoint.
    pub fn with_allow_http(mut self, allow_http: bool) -> Self {
        self.allow_http = allow_http;
        self
    }

    /// Sets the credentials.
    pub fn with_credentials(
        mut self,
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
    ) -> Self {
        self.access_key_id = Some(access_key_id.into());
        self.secret_access_key = Some(secret_access_key.into());
        self
    }
}

impl StageLocation {
    /// Parses `file://...`, `s3://bucket[/prefix]` or a plain local path.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for another scheme or an S3 URL without a bucket.
    pub fn parse(url: &str) -> Result<Self> {
        if let Some(rest) = url.strip_prefix("file://") {
            return Ok(Self::Local(PathBuf::from(rest)));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(Error::invalid("stage", format!("{url}: no bucket name")));
            }
            return Ok(Self::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.trim_matches('/').to_string(),
            });
        }
        if let Some((scheme, _)) = url.split_once("://") {
            return Err(Error::invalid(
                "stage",
                format!("{url}: unsupported scheme `{scheme}` (use file:// or s3://)"),
            ));
        }
        Ok(Self::Local(PathBuf::from(url)))
    }

    /// Opens the object store (creating a local directory if needed), S3 settings from the
    /// environment alone.
    ///
    /// # Errors
    /// See [`StageLocation::open_with`].
    pub fn open(&self) -> Result<Arc<dyn ObjectStore>> {
        self.open_with(&S3Options::default())
    }

    /// Opens the object store (creating a local directory if needed); `s3` overrides the
    /// `AWS_*` environment for an S3 location.
    ///
    /// # Errors
    /// [`Error::Io`] if a local directory cannot be created; [`Error::Stage`] if the store
    /// cannot be configured.
    pub fn open_with(&self, s3: &S3Options) -> Result<Arc<dyn ObjectStore>> {
        match self {
            Self::Local(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
                // Puts write a staging file and rename it into place (atomic); fsync makes
                // the rename durable.
                let store = LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| Error::stage("open", dir.display().to_string(), e))?
                    .with_fsync(true);
                Ok(Arc::new(store))
            }
            Self::S3 { bucket, prefix } => {
                let mut builder = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_virtual_hosted_style_request(false);
                if let Some(endpoint) = &s3.endpoint {
                    builder = builder.with_endpoint(endpoint);
                }
                if let Some(region) = &s3.region {
                    builder = builder.with_region(region);
                }
                if s3.allow_http {
                    builder = builder.with_allow_http(true);
                }
                if let (Some(id), Some(secret)) = (&s3.access_key_id, &s3.secret_access_key) {
                    builder = builder
                        .with_access_key_id(id)
                        .with_secret_access_key(secret);
                }
                let store = builder
                    .build()
                    .map_err(|e| Error::stage("open", format!("s3://{bucket}"), e))?;
                if prefix.is_empty() {
                    Ok(Arc::new(store))
                } else {
                    Ok(Arc::new(PrefixStore::new(store, prefix.as_str())))
                }
            }
        }
    }
}

impl std::fmt::Display for StageLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local(dir) => write!(f, "file://{}", dir.display()),
            Self::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_local_file_and_s3_urls() {
        assert_eq!(
            StageLocation::parse("data/stage").unwrap(),
            StageLocation::Local("data/stage".into())
        );
        assert_eq!(
            StageLocation::parse("file:///tmp/s").unwrap(),
            StageLocation::Local("/tmp/s".into())
        );
        assert_eq!(
            StageLocation::parse("s3://b/p/q/").unwrap(),
            StageLocation::S3 {
                bucket: "b".into(),
                prefix: "p/q".into()
            }
        );
        assert!(StageLocation::parse("s3:///x").is_err());
        assert!(StageLocation::parse("gs://b").is_err());
    }
}
