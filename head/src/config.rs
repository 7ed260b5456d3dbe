//! Head settings (the CLI converts its flags into [`HeadConfig`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use medray_proto::auth::Secret;

/// Default of [`HeadConfig::max_put_bytes`]: 1 GiB (a 512x512x600 int16 CT is 300 MiB; a
/// float DDF of it on the original grid 1.8 GiB would not pass: raise it for such data).
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 1 << 30;

/// Default of [`HeadConfig::train_inbox_bytes`]: 256 MiB.
pub const DEFAULT_TRAIN_INBOX_BYTES: usize = 256 << 20;

/// Default of [`HeadConfig::max_state_bytes`]: 1 GiB (LocalNet's weights plus Adam's two
/// moments are a few hundred MiB at the largest preset).
pub const DEFAULT_MAX_STATE_BYTES: u64 = 1 << 30;

/// TLS identity of the head's gRPC server.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// PEM certificate chain.
    pub cert_pem: Vec<u8>,
    /// PEM private key (never printed).
    pub key_pem: Secret<Vec<u8>>,
}

/// How a head runs.
#[derive(Debug, Clone)]
pub struct HeadConfig {
    /// Data directory: catalog.db, stage.key, the default local stage.
    pub data_dir: PathBuf,
    /// Stage URL (`file://`, a path or `s3://`); default `<data_dir>/stage`.
    pub stage_url: Option<String>,
    /// The client token every `Client` call must carry (never printed).
    pub token: Secret<String>,
    /// The worker token (`Worker.Register` and the ractor_cluster cookie); `None`: derived
    /// from the client token ([`medray_proto::auth::worker_token`]). See
    /// [`HeadConfig::worker_token`].
    pub worker_token: Option<Secret<String>>,
    /// Host the head's ractor_cluster node announces to workers.
    pub node_host: String,
    /// Port of the ractor_cluster node; 0 picks a free one.
    pub node_port: u16,
    /// Address the ractor_cluster node listens on; `None`: `node_host` when it is an IP
    /// address, else every interface (a name such as a Kubernetes Service cannot be bound).
    pub node_bind: Option<std::net::IpAddr>,
    /// Optional HTTP listener for `/healthz`, `/readyz` and `/metrics`.
    pub http_listen: Option<SocketAddr>,
    /// Interval workers heartbeat at.
    pub heartbeat_interval: Duration,
    /// A worker without a heartbeat for this long is marked dead and its task re-queued.
    pub worker_timeout: Duration,
    /// How long `medray status` keeps listing a lost worker (state LOST, with why and when).
    pub lost_worker_retention: Duration,
    /// How long the scheduler waits for a worker to acknowledge an assignment.
    pub assign_timeout: Duration,
    /// Failed attempts of one task before its job fails (an assignment the worker refused or
    /// did not acknowledge is not an attempt).
    pub max_task_attempts: u32,
    /// Workers needed for `/readyz` to say ready.
    pub min_workers: u32,
    /// Largest gRPC message, bytes.
    pub max_message_bytes: usize,
    /// Object transfer chunk, bytes.
    pub chunk_bytes: usize,
    /// Largest upload the head takes (`StagePut`, a worker's `PutObject`, `ImportModel`),
    /// bytes: an upload is held in memory until it is checked and written, so this bounds
    /// what one upload can make the head hold; a larger one is refused as soon as it passes
    /// this (`--max-upload-bytes`).
    pub max_put_bytes: u64,
    /// Largest answer of one `QueryCatalog` (`medray sql`), bytes of values.
    pub max_query_bytes: usize,
    /// Bytes of replica messages a training job's coordinator holds unprocessed
    /// (`--train-inbox-bytes`): past it, the head stops reading the replicas' streams until
    /// the coordinator catches up (back-pressure through HTTP/2 flow control).
    pub train_inbox_bytes: usize,
    /// Largest training state (weights, or optimizer moments) a replica may upload to the
    /// head, bytes (`--max-state-bytes`).
    pub max_state_bytes: u64,
    /// TLS for the gRPC server.
    pub tls: Option<ServerTls>,
}

impl Default for HeadConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./medray-data"),
            stage_url: None,
            token: Secret::default(),
            worker_token: None,
            node_host: "127.0.0.1".into(),
            node_port: 0,
            node_bind: None,
            http_listen: None,
            heartbeat_interval: Duration::from_millis(1000),
            worker_timeout: Duration::from_secs(6),
            lost_worker_retention: Duration::from_secs(600),
            assign_timeout: Duration::from_secs(5),
            max_task_attempts: 4,
            min_workers: 1,
            max_message_bytes: medray_proto::DEFAULT_MAX_MESSAGE_BYTES,
            chunk_bytes: medray_proto::DEFAULT_CHUNK_BYTES,
            max_put_bytes: DEFAULT_MAX_UPLOAD_BYTES,
            max_query_bytes: medray_core::catalog::query::DEFAULT_MAX_QUERY_BYTES,
            train_inbox_bytes: DEFAULT_TRAIN_INBOX_BYTES,
            max_state_bytes: DEFAULT_MAX_STATE_BYTES,
            tls: None,
        }
    }
}

impl HeadConfig {
    /// Sets the data directory.
    #[must_use]
    pub fn with_data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = dir.into();
        self
    }

    /// Sets the token.
    #[must_use]
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Secret::new(token.into());
        self
    }

    /// Sets the worker timeout.
    #[must_use]
    pub fn with_worker_timeout(mut self, timeout: Duration) -> Self {
        self.worker_timeout = timeout;
        self
    }

    /// Sets the heartbeat interval.
    #[must_use]
    pub fn with_heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat_interval = interval;
        self
    }

    /// Sets the HTTP listener.
    #[must_use]
    pub fn with_http_listen(mut self, addr: Option<SocketAddr>) -> Self {
        self.http_listen = addr;
        self
    }

    /// Sets the stage URL.
    #[must_use]
    pub fn with_stage_url(mut self, url: Option<String>) -> Self {
        self.stage_url = url;
        self
    }

    /// The byte cap of a `QueryCatalog` answer: `max_query_bytes`, and at most half the
    /// message limit (the answer travels in one message, with room for its encoding).
    #[must_use]
    pub fn query_byte_cap(&self) -> usize {
        self.max_query_bytes.min(self.max_message_bytes / 2)
    }

    /// The worker token: the one given, else the one derived from the client token.
    #[must_use]
    pub fn worker_token(&self) -> Secret<String> {
        self.worker_token
            .clone()
            .unwrap_or_else(|| Secret::new(medray_proto::auth::worker_token(self.token.expose())))
    }

    /// Where the cluster node listens (`None`: every interface).
    #[must_use]
    pub fn node_listen_ip(&self) -> Option<std::net::IpAddr> {
        self.node_bind.or_else(|| self.node_host.parse().ok())
    }

    /// Checks every field.
    ///
    /// # Errors
    /// [`crate::HeadError::Config`] naming the field.
    pub fn validate(&self) -> crate::Result<()> {
        use crate::HeadError::Config;
        medray_proto::auth::validate_token(self.token.expose()).map_err(|e| Config {
            field: "--token",
            reason: e.to_string(),
        })?;
        if let Some(worker) = &self.worker_token {
            medray_proto::auth::validate_token(worker.expose()).map_err(|e| Config {
                field: "--worker-token",
                reason: e.to_string(),
            })?;
            if worker.expose() == self.token.expose() {
                return Err(Config {
                    field: "--worker-token",
                    reason: "must differ from the client token (--token): a worker must not be able to act as a client".into(),
                });
            }
        }
        if self.heartbeat_interval < Duration::from_millis(50) {
            return Err(Config {
                field: "--heartbeat-interval-ms",
                reason: "at least 50 ms".into(),
            });
        }
        if self.worker_timeout < self.heartbeat_interval * 2 {
            return Err(Config {
                field: "--worker-timeout-ms",
                reason: "must be at least twice the heartbeat interval".into(),
            });
        }
        if !(1 << 20..=4 << 20).contains(&self.chunk_bytes) {
            return Err(Config {
                field: "--chunk-bytes",
                reason: "must be between 1 MiB and 4 MiB".into(),
            });
        }
        if self.max_message_bytes < self.chunk_bytes + 64 * 1024 {
            return Err(Config {
                field: "--max-message-bytes",
                reason: "must exceed the chunk size by at least 64 KiB".into(),
            });
        }
        if self.max_task_attempts == 0 {
            return Err(Config {
                field: "--max-task-attempts",
                reason: "at least 1".into(),
            });
        }
        if self.max_put_bytes < 1 << 20 {
            return Err(Config {
                field: "--max-upload-bytes",
                reason: "at least 1 MiB".into(),
            });
        }
        if self.train_inbox_bytes < 1 << 20 {
            return Err(Config {
                field: "--train-inbox-bytes",
                reason: "at least 1 MiB".into(),
            });
        }
        if self.max_state_bytes < 1 << 20 {
            return Err(Config {
                field: "--max-state-bytes",
                reason: "at least 1 MiB".into(),
            });
        }
        if self.max_query_bytes == 0 {
            return Err(Config {
                field: "--max-query-bytes",
                reason: "at least 1".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 18 item 6: the derived `Debug` of the config (and of `HeadContext`, which holds
    /// it) printed the cluster token and the TLS private key.
    #[test]
    fn debug_output_shows_neither_the_token_nor_the_private_key() {
        let token = "tok-0123456789abcdef-secret";
        let mut config = HeadConfig::default().with_token(token);
        config.tls = Some(ServerTls {
            cert_pem: b"-----BEGIN CERTIFICATE-----".to_vec(),
            key_pem: Secret::new(b"-----BEGIN PRIVATE KEY----- hush".to_vec()),
        });
        let text = format!("{config:?}");
        assert!(!text.contains("secret"), "{text}");
        // `Vec<u8>`'s `Debug` prints numbers: the key's "hush" would read "104, 117, 115, 104".
        assert!(!text.contains("104, 117, 115, 104"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
        assert_eq!(config.token.expose(), token);
    }
}
