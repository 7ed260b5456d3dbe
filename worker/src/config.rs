//! Worker settings (the CLI converts its flags into [`WorkerConfig`]).

use std::path::PathBuf;
use std::time::Duration;

use medray_proto::auth::Secret;
use medray_proto::transport::ClientTls;

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The head's gRPC address, `http://host:port` (or `https://` with TLS).
    pub head_address: String,
    /// The worker token: it registers this worker and is the ractor_cluster cookie (never
    /// printed). Not the client token, which the head refuses from a worker.
    pub token: Secret<String>,
    /// A human name shown in `medray status`.
    pub name: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Where fetched stage objects are cached, by sha256.
    pub cache_dir: PathBuf,
    /// Host the worker's ractor_cluster node announces.
    pub node_host: String,
    /// TLS to the head, if it serves TLS.
    pub tls: Option<ClientTls>,
    /// How long to keep trying to reach the head before giving up, per attempt.
    pub connect_timeout: Duration,
    /// How long a draining worker waits for its running task before handing it back.
    pub drain_timeout: Duration,
    /// Read stage objects directly from this stage (with its key) instead of through the
    /// head; `None`: through the head.
    pub direct_stage: Option<std::sync::Arc<medray_core::stage::Stage>>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            head_address: "http://127.0.0.1:50051".into(),
            token: Secret::default(),
            name: default_name(),
            device: "cpu".into(),
            cache_dir: std::env::temp_dir().join("medray-worker-cache"),
            node_host: "127.0.0.1".into(),
            tls: None,
            connect_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(60),
            direct_stage: None,
        }
    }
}

fn default_name() -> String {
    let host = sysinfo::System::host_name().unwrap_or_else(|| "worker".into());
    format!("{host}-{}", std::process::id())
}

impl WorkerConfig {
    /// Sets the head address.
    #[must_use]
    pub fn with_head_address(mut self, address: impl Into<String>) -> Self {
        self.head_address = address.into();
        self
    }

    /// Sets the worker token.
    #[must_use]
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Secret::new(token.into());
        self
    }

    /// Sets the worker's name.
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets the device (`cpu` or `cuda:N`).
    #[must_use]
    pub fn with_device(mut self, device: impl Into<String>) -> Self {
        self.device = device.into();
        self
    }

    /// Sets the object cache folder.
    #[must_use]
    pub fn with_cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = dir.into();
        self
    }

    /// Sets TLS to the head.
    #[must_use]
    pub fn with_tls(mut self, tls: Option<ClientTls>) -> Self {
        self.tls = tls;
        self
    }

    /// Checks every field.
    ///
    /// # Errors
    /// [`crate::WorkerError::Config`] naming the field.
    pub fn validate(&self) -> crate::Result<()> {
        use crate::WorkerError::Config;
        if !(self.head_address.starts_with("http://") || self.head_address.starts_with("https://"))
        {
            return Err(Config {
                field: "--address",
                reason: format!(
                    "`{}` must start with http:// or https://",
                    self.head_address
                ),
            });
        }
        medray_proto::auth::validate_token(self.token.expose()).map_err(|e| Config {
            field: "--token",
            reason: e.to_string(),
        })?;
        if self.name.is_empty() || self.name.len() > 128 || self.name.contains('/') {
            return Err(Config {
                field: "--name",
                reason: "must be 1-128 characters without `/`".into(),
            });
        }
        crate::device::parse_device(&self.device)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 18 item 6: the derived `Debug` of the worker's config printed the token.
    #[test]
    fn debug_output_does_not_show_the_token() {
        let config = WorkerConfig::default().with_token("tok-0123456789abcdef-secret");
        let text = format!("{config:?}");
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
    }
}
