#![doc = include_str!("../README.md")]

pub mod actor;
pub mod compute;
pub mod config;
pub use medray_proto::control;
pub mod device;
pub mod error;
pub mod head_client;
pub mod infer;
pub mod selftest;
pub mod train;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use medray_proto::v1::{DeregisterRequest, HeartbeatRequest, RegisterRequest};
use ractor::{Actor, ActorRef};
use ractor_cluster::{NodeServer, NodeServerMessage};

pub use config::WorkerConfig;
pub use error::{Result, WorkerError};

use crate::actor::{Shared, WorkerActor, WorkerArgs};
use crate::compute::ComputeThread;
use crate::control::{worker_actor_name, WorkerControl};
use crate::head_client::HeadClient;

/// Runs a worker until `shutdown` completes: register with the head, host the worker actor,
/// heartbeat, run tasks; on a lost registration (head restarted, worker evicted) register
/// again. On shutdown it drains: takes no new task, lets the running one finish (up to
/// [`WorkerConfig::drain_timeout`], then stops it), tells the head, and returns `Ok`.
///
/// # Errors
/// A fatal refusal by the head (wrong token, protocol mismatch) or an invalid
/// configuration.
pub async fn run(config: WorkerConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    config.validate()?;
    medray_proto::tls::install_crypto_provider();
    let device = device::parse_device(&config.device)?;
    let gpu = medray_core::gpu::info(&device).map_err(|e| WorkerError::Config {
        field: "--device",
        reason: format!("`{}`: {e}", config.device),
    })?;
    let compute = ComputeThread::start(
        device,
        config.device.clone(),
        tokio::runtime::Handle::current(),
        config.cache_dir.clone(),
        config.direct_stage.clone(),
    )
    .map_err(|source| WorkerError::Io {
        path: "compute thread".into(),
        source,
    })?;
    let node = start_node(&config).await?;
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(200);
    loop {
        let session = tokio::select! {
            s = Session::establish(&config, &node, &compute, gpu.as_ref()) => s,
            () = &mut shutdown => break,
        };
        let mut session = match session {
            Ok(s) => s,
            Err(e) if e.is_fatal() => {
                node.stop(None);
                return Err(e);
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot register with the head");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = &mut shutdown => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        tokio::select! {
            () = session.heartbeat_until_lost() => {
                tracing::warn!(worker_id = %session.worker_id, "registration lost; registering again");
                session.shared.cancel_current();
                session.actor.stop(Some("registration lost".into()));
            }
            () = &mut shutdown => {
                session.drain(config.drain_timeout).await;
                break;
            }
        }
    }
    node.stop(None);
    Ok(())
}

async fn start_node(config: &WorkerConfig) -> Result<ActorRef<NodeServerMessage>> {
    // The worker dials the head (TLS when configured); nobody dials the worker's own node
    // (isolated mode), so its listener stays on the loopback interface.
    let server = NodeServer::new(
        0,
        config.token.expose().clone(),
        format!("worker-{}", config.name),
        config.node_host.clone(),
        None,
        None,
    )
    .with_listen_addr(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    let (node, _) = Actor::spawn(None, server, ())
        .await
        .map_err(|e| WorkerError::Actor(format!("starting the cluster node: {e}")))?;
    Ok(node)
}

/// One registration with the head.
struct Session {
    worker_id: String,
    client: HeadClient,
    shared: Arc<Shared>,
    actor: ActorRef<WorkerControl>,
    heartbeat: Duration,
}

impl Session {
    async fn establish(
        config: &WorkerConfig,
        node: &ActorRef<NodeServerMessage>,
        compute: &ComputeThread,
        gpu: Option<&medray_core::gpu::GpuInfo>,
    ) -> Result<Self> {
        let channel = head_client::channel(config).await?;
        let max = medray_proto::DEFAULT_MAX_MESSAGE_BYTES;
        let mut joining =
            head_client::client(channel.clone(), config.token.expose(), "--token", max)?;
        let memory_bytes = {
            let mut sys = sysinfo::System::new();
            sys.refresh_memory();
            sys.total_memory()
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let reply = joining
            .register(RegisterRequest {
                protocol_version: medray_proto::PROTOCOL_VERSION,
                name: config.name.clone(),
                device: config.device.clone(),
                memory_bytes,
                cores,
                version: env!("CARGO_PKG_VERSION").into(),
                node_address: config.node_host.clone(),
                gpu_name: gpu.map(|g| g.name.clone()).unwrap_or_default(),
                gpu_memory_bytes: gpu.map_or(0, |g| g.total_bytes),
            })
            .await
            .map_err(WorkerError::rpc("Register"))?
            .into_inner();
        if reply.worker_id.is_empty() || reply.head_node_address.is_empty() {
            return Err(WorkerError::Protocol {
                call: "Register",
                reason: "no worker id or node address".into(),
            });
        }
        // Every later call carries this registration's own credential.
        let client = head_client::client(channel, &reply.session_token, "session_token", max)
            .map_err(|e| WorkerError::Protocol {
                call: "Register",
                reason: format!("the head's session credential: {e}"),
            })?;
        let shared = Arc::new(Shared::default());
        let (actor, _) = Actor::spawn(
            Some(worker_actor_name(&reply.worker_id)),
            WorkerActor,
            WorkerArgs {
                worker_id: reply.worker_id.clone(),
                shared: shared.clone(),
                compute: compute.clone(),
                client: client.clone(),
            },
        )
        .await
        .map_err(|e| WorkerError::Actor(format!("starting the worker actor: {e}")))?;
        let connected = match &config.tls {
            Some(tls) => {
                let client = medray_proto::tls::client_config(&tls.ca_pem).map_err(|e| {
                    WorkerError::Config {
                        field: "--tls-ca",
                        reason: e.to_string(),
                    }
                })?;
                let host = tls.domain.clone().unwrap_or_else(|| {
                    reply
                        .head_node_address
                        .rsplit_once(':')
                        .map_or(reply.head_node_address.clone(), |(h, _)| h.to_string())
                });
                let domain = rustls_pki_types::ServerName::try_from(host.clone()).map_err(|e| {
                    WorkerError::Protocol {
                        call: "Register",
                        reason: format!("head node host `{host}`: {e}"),
                    }
                })?;
                ractor_cluster::client_connect_enc(
                    node,
                    reply.head_node_address.as_str(),
                    tokio_rustls::TlsConnector::from(client),
                    domain,
                )
                .await
            }
            None => ractor_cluster::client_connect(node, reply.head_node_address.as_str()).await,
        };
        if let Err(e) = connected {
            actor.stop(None);
            return Err(WorkerError::Actor(format!(
                "connecting to the head's node {}: {e}",
                reply.head_node_address
            )));
        }
        tracing::info!(worker_id = %reply.worker_id, head_node = %reply.head_node_address, "registered");
        Ok(Self {
            worker_id: reply.worker_id,
            client,
            shared,
            actor,
            heartbeat: Duration::from_millis(u64::from(
                reply.heartbeat_interval_ms.clamp(50, 60_000),
            )),
        })
    }

    /// Heartbeats until the head says it no longer knows this worker.
    async fn heartbeat_until_lost(&mut self) {
        let mut ticker = tokio::time::interval(self.heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let request = HeartbeatRequest {
                worker_id: self.worker_id.clone(),
                current_task: self.shared.current_task().unwrap_or_default(),
            };
            match self.client.heartbeat(request).await {
                Ok(r) if !r.get_ref().known => return,
                Ok(_) => {}
                Err(status) => {
                    tracing::warn!(error = %status.message(), "heartbeat failed");
                }
            }
        }
    }

    /// Stops taking tasks, waits for the running one, deregisters.
    async fn drain(mut self, timeout: Duration) {
        self.shared.start_draining();
        let task = self.shared.current_task();
        tracing::info!(worker_id = %self.worker_id, running = ?task, "draining");
        let deadline = tokio::time::Instant::now() + timeout;
        let mut ticker = tokio::time::interval(self.heartbeat);
        while self.shared.current_task().is_some() && tokio::time::Instant::now() < deadline {
            ticker.tick().await;
            let _ = self
                .client
                .heartbeat(HeartbeatRequest {
                    worker_id: self.worker_id.clone(),
                    current_task: self.shared.current_task().unwrap_or_default(),
                })
                .await;
        }
        let reason = if self.shared.current_task().is_some() {
            self.shared.cancel_current();
            "drained: the running task was handed back"
        } else {
            "drained"
        };
        let _ = self
            .client
            .deregister(DeregisterRequest {
                worker_id: self.worker_id.clone(),
                reason: reason.into(),
            })
            .await;
        self.actor.stop(Some("drained".into()));
        tracing::info!(worker_id = %self.worker_id, reason, "left the cluster");
    }
}
