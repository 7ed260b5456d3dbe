#![doc = include_str!("../README.md")]

pub mod config;
pub mod context;
pub mod error;
pub mod http;
pub mod ids;
pub mod infer;
pub mod job;
pub mod local;
pub mod logs;
pub mod manager;
pub mod metrics;
pub mod registry;
pub mod report;
pub mod scheduler;
pub mod service;
pub mod sessions;
pub mod store;
pub mod train;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use medray_core::stage::{Stage, StageKey, StageLocation, STAGE_KEY_ENV};
use medray_proto::v1::client_server::ClientServer;
use medray_proto::v1::worker_server::WorkerServer;
use ractor::Actor;
use ractor_cluster::{IncomingEncryptionMode, NodeServer};
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Identity, Server, ServerTlsConfig};

pub use config::{HeadConfig, ServerTls};
pub use error::{HeadError, Result};

use crate::context::HeadContext;
use crate::logs::LogHub;
use crate::manager::JobManager;
use crate::metrics::Metrics;
use crate::registry::{Registry, RegistryMsg};
use crate::scheduler::Scheduler;
use crate::service::client::ClientService;
use crate::service::worker::WorkerService;
use crate::store::Store;

/// Where a started head listens.
#[derive(Debug, Clone)]
pub struct HeadAddresses {
    /// gRPC (client and worker services).
    pub grpc: SocketAddr,
    /// The ractor_cluster node, as announced to workers.
    pub node: String,
    /// The HTTP operations endpoint, if enabled.
    pub http: Option<SocketAddr>,
}

fn open_stage(config: &HeadConfig) -> Result<Stage> {
    let location = match &config.stage_url {
        Some(url) => StageLocation::parse(url)?,
        None => StageLocation::Local(config.data_dir.join("stage")),
    };
    let key = match std::env::var(STAGE_KEY_ENV) {
        Ok(text) if !text.trim().is_empty() => StageKey::parse(&text, STAGE_KEY_ENV)?,
        _ => StageKey::load_or_create(&config.data_dir.join("stage.key"))?,
    };
    Ok(Stage::open(location, Some(key))?)
}

fn free_port(host: &str) -> Result<u16> {
    let l = std::net::TcpListener::bind((host, 0)).map_err(|source| HeadError::Io {
        what: format!("finding a free port on {host}"),
        source,
    })?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|source| HeadError::Io {
            what: "finding a free port".into(),
            source,
        })
}

/// Runs a head on `listener` until `shutdown` completes; `ready` receives its addresses once
/// everything listens. Job, task and worker state lives in the catalog database under
/// `config.data_dir`, so a restarted head resumes its jobs.
///
/// # Errors
/// An invalid configuration, a catalog or stage that cannot be opened, or a listener that
/// cannot be bound.
pub async fn run(
    config: HeadConfig,
    listener: TcpListener,
    ready: impl FnOnce(HeadAddresses),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    config.validate()?;
    medray_proto::tls::install_crypto_provider();
    let config = Arc::new(config);
    std::fs::create_dir_all(&config.data_dir).map_err(|source| HeadError::Io {
        what: format!("creating the data directory {}", config.data_dir.display()),
        source,
    })?;
    let catalog_path = config.data_dir.join("catalog.db");
    let store = Arc::new(Store::open(&catalog_path)?);
    let metrics = Arc::new(Metrics::default());
    let ctx = HeadContext {
        config: config.clone(),
        store: store.clone(),
        logs: Arc::new(LogHub::new(store.clone())),
        stage: Arc::new(open_stage(&config)?),
        catalog_path,
        metrics: metrics.clone(),
        sessions: Arc::new(sessions::WorkerSessions::default()),
    };

    // Outputs an older head wrote under `results/<model>/<version>/` move into their
    // datasets' folders (once; nothing to do afterwards).
    let moved = {
        // On a blocking thread: the catalog's connection does not cross threads.
        let (stage, catalog_path) = (ctx.stage.clone(), ctx.catalog_path.clone());
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || -> Result<usize> {
            let mut catalog = medray_core::catalog::Catalog::open(&catalog_path)?;
            Ok(
                handle.block_on(medray_core::results::migrate::key_outputs_by_dataset(
                    &stage,
                    &mut catalog,
                ))?,
            )
        })
        .await
        .map_err(|e| HeadError::Actor(format!("moving result outputs: {e}")))??
    };
    if moved > 0 {
        tracing::info!(
            moved,
            "inference outputs of an older layout moved under results/<dataset>/"
        );
    }

    // The ractor_cluster node workers connect to (cookie = the worker token, which workers
    // hold; never the client token).
    let node_port = match config.node_port {
        0 => free_port(&config.node_host)?,
        p => p,
    };
    let node_address = format!("{}:{node_port}", config.node_host);
    // With TLS configured, the cluster link is encrypted with the same certificate.
    let node_encryption = match &config.tls {
        Some(tls) => Some(IncomingEncryptionMode::Tls(
            tokio_rustls::TlsAcceptor::from(
                medray_proto::tls::server_config(&tls.cert_pem, tls.key_pem.expose()).map_err(
                    |e| HeadError::Config {
                        field: "--tls-cert/--tls-key",
                        reason: e.to_string(),
                    },
                )?,
            ),
        )),
        None => None,
    };
    let node = NodeServer::new(
        node_port,
        config.worker_token().expose().clone(),
        "medray-head".into(),
        config.node_host.clone(),
        node_encryption,
        None,
    );
    let (node, node_handle) = Actor::spawn(
        None,
        match config.node_listen_ip() {
            Some(ip) => node.with_listen_addr(ip),
            None => {
                tracing::warn!(
                    node_host = %config.node_host,
                    "the cluster node listens on every interface (--node-host is a name, not an address; --node-bind limits it)"
                );
                node
            }
        },
        (),
    )
    .await
    .map_err(|e| HeadError::Actor(format!("starting the cluster node: {e}")))?;

    let (registry, registry_handle) = Actor::spawn(
        Some("medray.registry".into()),
        Registry {
            store: store.clone(),
            config: config.clone(),
            node_address: node_address.clone(),
            metrics: metrics.clone(),
            sessions: ctx.sessions.clone(),
        },
        (),
    )
    .await
    .map_err(|e| HeadError::Actor(format!("starting the registry: {e}")))?;
    let (scheduler, scheduler_handle) = Actor::spawn(
        Some("medray.scheduler".into()),
        Scheduler {
            store: store.clone(),
            config: config.clone(),
            metrics: metrics.clone(),
        },
        (),
    )
    .await
    .map_err(|e| HeadError::Actor(format!("starting the scheduler: {e}")))?;
    registry
        .cast(RegistryMsg::SetScheduler(scheduler.clone()))
        .map_err(|e| HeadError::Actor(e.to_string()))?;
    let (manager, manager_handle) = Actor::spawn(
        Some("medray.jobs".into()),
        JobManager {
            ctx: ctx.clone(),
            scheduler: scheduler.clone(),
            registry: registry.clone(),
        },
        (),
    )
    .await
    .map_err(|e| HeadError::Actor(format!("starting the job manager: {e}")))?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let http = match config.http_listen {
        Some(addr) => Some(
            http::serve(
                addr,
                registry.clone(),
                ctx.clone(),
                config.min_workers,
                stopped(),
            )
            .await?,
        ),
        None => None,
    };

    // Client calls take the client token only. Worker calls must present a credential, and
    // each method checks it: `Register` the worker token, every other call the session of
    // the worker it names. (A session the head no longer knows must still reach
    // `Heartbeat`, which answers "unknown: register again" to an evicted worker or after
    // a head restart.)
    let token = config.token.expose().clone();
    let check = move |req: tonic::Request<()>| {
        medray_proto::auth::check_bearer(req.metadata(), &token)?;
        Ok(req)
    };
    let check_worker = |req: tonic::Request<()>| {
        medray_proto::auth::presented_bearer(req.metadata())?;
        Ok(req)
    };
    let client = InterceptedService::new(
        ClientServer::new(ClientService {
            ctx: ctx.clone(),
            manager: manager.clone(),
            registry: registry.clone(),
        })
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes),
        check,
    );
    let worker = InterceptedService::new(
        WorkerServer::new(WorkerService {
            ctx: ctx.clone(),
            registry: registry.clone(),
            scheduler: scheduler.clone(),
            manager: manager.clone(),
        })
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes),
        check_worker,
    );
    let mut builder = Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(medray_proto::HTTP2_STREAM_WINDOW_BYTES)
        .initial_connection_window_size(medray_proto::HTTP2_CONNECTION_WINDOW_BYTES);
    if let Some(tls) = &config.tls {
        builder = builder
            .tls_config(
                ServerTlsConfig::new()
                    .identity(Identity::from_pem(&tls.cert_pem, tls.key_pem.expose())),
            )
            .map_err(|e| HeadError::Config {
                field: "--tls-cert/--tls-key",
                reason: e.to_string(),
            })?;
    }
    let grpc_addr = listener.local_addr().map_err(|source| HeadError::Io {
        what: "gRPC listener address".into(),
        source,
    })?;
    ready(HeadAddresses {
        grpc: grpc_addr,
        node: node_address,
        http: http.as_ref().map(|(a, _)| *a),
    });
    tracing::info!(%grpc_addr, "head ready");
    let result = builder
        .add_service(client)
        .add_service(worker)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await;
    let _ = stop_tx.send(true);
    manager.stop(None);
    scheduler.stop(None);
    registry.stop(None);
    node.stop(None);
    let _ = tokio::join!(
        manager_handle,
        scheduler_handle,
        registry_handle,
        node_handle
    );
    if let Some((_, h)) = http {
        let _ = h.await;
    }
    result.map_err(|e| HeadError::Io {
        what: "gRPC server".into(),
        source: std::io::Error::other(e),
    })
}
