//! `medray head`: run the head in this process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use medray_head::{HeadConfig, ServerTls};

/// Arguments of `medray head`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// gRPC listen address.
    #[arg(long, env = "MEDRAY_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Data directory: catalog.db, stage.key, the default local stage.
    #[arg(long, env = "MEDRAY_DATA_DIR", default_value = "./medray-data")]
    pub data_dir: PathBuf,
    /// Stage location (file:///dir, a path, or s3://bucket/prefix); default <data-dir>/stage.
    #[arg(long, env = "MEDRAY_STAGE")]
    pub stage: Option<String>,
    /// Client token: every client call must carry it (prefer MEDRAY_TOKEN or --token-file;
    /// an argument is visible in `ps`).
    #[arg(
        long,
        env = "MEDRAY_TOKEN",
        hide_env_values = true,
        required_unless_present = "token_file"
    )]
    pub token: Option<medray_proto::auth::Secret<String>>,
    /// File holding the client token (first line).
    #[arg(long, env = "MEDRAY_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// Worker token: workers register with it (and it is the cluster node's cookie); default:
    /// derived from the client token (`medray worker-token` prints it). It cannot act as a
    /// client.
    #[arg(long, env = "MEDRAY_WORKER_TOKEN", hide_env_values = true)]
    pub worker_token: Option<medray_proto::auth::Secret<String>>,
    /// File holding the worker token (first line).
    #[arg(
        long,
        env = "MEDRAY_WORKER_TOKEN_FILE",
        conflicts_with = "worker_token"
    )]
    pub worker_token_file: Option<PathBuf>,
    /// Host the cluster node announces to workers.
    #[arg(long, env = "MEDRAY_NODE_HOST", default_value = "127.0.0.1")]
    pub node_host: String,
    /// Port of the cluster node (0: a free one).
    #[arg(long, env = "MEDRAY_NODE_PORT", default_value_t = 0)]
    pub node_port: u16,
    /// Address the cluster node listens on (default: --node-host when it is an IP address,
    /// else every interface, since a name such as a Kubernetes Service cannot be bound).
    #[arg(long, env = "MEDRAY_NODE_BIND")]
    pub node_bind: Option<std::net::IpAddr>,
    /// HTTP address for /healthz, /readyz and /metrics (off when not given).
    #[arg(long, env = "MEDRAY_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Interval workers heartbeat at, ms.
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_interval_ms: u64,
    /// A worker silent for this long is marked dead and its task re-run, ms.
    #[arg(long, default_value_t = 6000)]
    pub worker_timeout_ms: u64,
    /// How long `medray status` keeps listing a lost worker (state LOST, with why and when), s.
    #[arg(long, default_value_t = 600)]
    pub lost_worker_retention_s: u64,
    /// Workers needed for /readyz to report ready.
    #[arg(long, default_value_t = 1)]
    pub min_workers: u32,
    /// Failed attempts of one task before its job fails (a refused or unacknowledged
    /// assignment does not count).
    #[arg(long, default_value_t = 4)]
    pub max_task_attempts: u32,
    /// Largest gRPC message either side accepts, bytes (at least the chunk size + 64 KiB).
    #[arg(long, default_value_t = medray_proto::DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// Object transfer and gradient chunk size, bytes (1-4 MiB).
    #[arg(long, default_value_t = medray_proto::DEFAULT_CHUNK_BYTES)]
    pub chunk_bytes: usize,
    /// Largest upload the head takes (`medray stage put`, a worker's outputs, `medray models
    /// import`), bytes; an upload is held in memory until it is written, and a larger one
    /// is refused as soon as it passes this.
    #[arg(long, env = "MEDRAY_MAX_UPLOAD_BYTES", default_value_t = medray_head::config::DEFAULT_MAX_UPLOAD_BYTES)]
    pub max_upload_bytes: u64,
    /// Largest answer of one `medray sql` query, bytes of values (a larger one is refused
    /// with an error naming this flag; no single value may be larger either). At most half
    /// of --max-message-bytes is used: the answer travels in one message.
    #[arg(long, default_value_t = medray_core::catalog::query::DEFAULT_MAX_QUERY_BYTES)]
    pub max_query_bytes: usize,
    /// Bytes of training replicas' messages one training job may hold unprocessed; past it
    /// the head stops reading the replicas' streams until it catches up (back-pressure).
    #[arg(long, default_value_t = medray_head::config::DEFAULT_TRAIN_INBOX_BYTES)]
    pub train_inbox_bytes: usize,
    /// Largest training state (the weights, or the optimizer's moments) a replica may send
    /// the head for a checkpoint, bytes; a larger one fails the replica with an error naming
    /// this flag.
    #[arg(long, default_value_t = medray_head::config::DEFAULT_MAX_STATE_BYTES)]
    pub max_state_bytes: u64,
    /// TLS certificate chain (PEM) for gRPC.
    #[arg(long, env = "MEDRAY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for gRPC.
    #[arg(long, env = "MEDRAY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl TryFrom<Args> for HeadConfig {
    type Error = anyhow::Error;
    fn try_from(a: Args) -> anyhow::Result<Self> {
        let tls = match (&a.tls_cert, &a.tls_key) {
            (Some(c), Some(k)) => Some(ServerTls {
                cert_pem: std::fs::read(c)
                    .with_context(|| format!("--tls-cert {}", c.display()))?,
                key_pem: medray_proto::auth::Secret::new(
                    std::fs::read(k).with_context(|| format!("--tls-key {}", k.display()))?,
                ),
            }),
            _ => None,
        };
        let token = match (a.token, &a.token_file) {
            (Some(t), _) => t.expose().clone(),
            (None, Some(p)) => crate::cluster::client::read_token_file(p, "--token-file")?,
            (None, None) => anyhow::bail!("no client token: set MEDRAY_TOKEN or --token-file"),
        };
        let worker_token = match (a.worker_token, &a.worker_token_file) {
            (Some(t), _) => Some(t.expose().clone()),
            (None, Some(p)) => Some(crate::cluster::client::read_token_file(
                p,
                "--worker-token-file",
            )?),
            (None, None) => None,
        };
        Ok(HeadConfig {
            data_dir: a.data_dir,
            stage_url: a.stage,
            token: medray_proto::auth::Secret::new(token),
            worker_token: worker_token.map(medray_proto::auth::Secret::new),
            node_host: a.node_host,
            node_port: a.node_port,
            node_bind: a.node_bind,
            http_listen: a.http_listen,
            heartbeat_interval: Duration::from_millis(a.heartbeat_interval_ms),
            worker_timeout: Duration::from_millis(a.worker_timeout_ms),
            lost_worker_retention: Duration::from_secs(a.lost_worker_retention_s),
            min_workers: a.min_workers,
            max_task_attempts: a.max_task_attempts,
            max_message_bytes: a.max_message_bytes,
            chunk_bytes: a.chunk_bytes,
            max_query_bytes: a.max_query_bytes,
            max_put_bytes: a.max_upload_bytes,
            train_inbox_bytes: a.train_inbox_bytes,
            max_state_bytes: a.max_state_bytes,
            tls,
            ..HeadConfig::default()
        })
    }
}

/// Runs the head until Ctrl-C or SIGTERM.
pub fn run(args: Args) -> anyhow::Result<()> {
    let listen = args.listen;
    let config = HeadConfig::try_from(args)?;
    let rt = crate::data_dir::runtime()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("--listen {listen}: cannot bind"))?;
        medray_head::run(
            config,
            listener,
            |a| {
                eprintln!(
                    "medray head listening on {} (cluster node {}{})",
                    a.grpc,
                    a.node,
                    a.http.map(|h| format!(", http {h}")).unwrap_or_default()
                );
            },
            super::shutdown_signal(),
        )
        .await?;
        Ok(())
    })
}
