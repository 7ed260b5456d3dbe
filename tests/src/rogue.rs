//! A rogue worker for the security tests: it registers with the worker token and joins the
//! head's cluster node exactly as `medray worker` does, so the head assigns it real tasks,
//! but it runs nothing; the test drives its gRPC calls by hand (reads and writes outside its
//! task, calls in another worker's name) to check that the head refuses them.

use std::time::Duration;

use anyhow::Context;
use medray_proto::auth::BearerToken;
use medray_proto::control::{worker_actor_name, Wire, WorkerControl, WORKERS_GROUP};
use medray_proto::v1::worker_client::WorkerClient;
use medray_proto::v1::{AssignmentAck, RegisterRequest, RegisterResponse, TaskAssignment};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::{NodeServer, NodeServerMessage};
use tokio::sync::mpsc;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The Worker service client with some credential.
pub type Client = WorkerClient<InterceptedService<Channel, BearerToken>>;

/// The Worker service client over a new connection to `address`, carrying `credential`.
///
/// # Errors
/// When the head cannot be reached or the credential is malformed.
pub async fn client(address: &str, credential: &str) -> anyhow::Result<Client> {
    let channel = tonic::transport::Endpoint::from_shared(address.to_string())?
        .connect()
        .await
        .with_context(|| format!("connecting to {address}"))?;
    Ok(WorkerClient::with_interceptor(
        channel,
        BearerToken::new(credential)?,
    ))
}

/// Registers a worker named `name` with `worker_token`; returns the head's answer (its id
/// and session credential).
///
/// # Errors
/// When the head refuses.
pub async fn register(
    address: &str,
    worker_token: &str,
    name: &str,
) -> anyhow::Result<RegisterResponse> {
    let reply = client(address, worker_token)
        .await?
        .register(RegisterRequest {
            protocol_version: medray_proto::PROTOCOL_VERSION,
            name: name.into(),
            device: "cpu".into(),
            node_address: "127.0.0.1".into(),
            cores: 1,
            ..RegisterRequest::default()
        })
        .await
        .context("Register")?
        .into_inner();
    Ok(reply)
}

struct Taker;

impl Actor for Taker {
    type Msg = WorkerControl;
    type State = mpsc::UnboundedSender<TaskAssignment>;
    type Arguments = mpsc::UnboundedSender<TaskAssignment>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        tx: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        ractor::pg::join(WORKERS_GROUP.to_string(), vec![myself.get_cell()]);
        Ok(tx)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        tx: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            WorkerControl::Assign(wire, reply) => {
                let accepted = match wire.0 {
                    Ok(a) => tx.send(a).is_ok(),
                    Err(_) => false,
                };
                let _ = reply.send(Wire::new(AssignmentAck {
                    accepted,
                    reason: String::new(),
                }));
            }
            WorkerControl::Cancel(_, reply) => {
                let _ = reply.send(false);
            }
            WorkerControl::Ping(reply) => {
                let name = myself.get_name().unwrap_or_default();
                let id = medray_proto::control::worker_id_from_actor_name(&name)
                    .unwrap_or_default()
                    .to_string();
                let _ = reply.send(id);
            }
        }
        Ok(())
    }
}

/// A registered worker whose actor takes every assignment and runs none.
pub struct RogueWorker {
    /// Its id.
    pub worker_id: String,
    /// Its session credential.
    pub session: String,
    /// A client carrying the session.
    pub client: Client,
    assignments: mpsc::UnboundedReceiver<TaskAssignment>,
    node: ActorRef<NodeServerMessage>,
    actor: ActorRef<WorkerControl>,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl RogueWorker {
    /// Registers and joins the head's cluster node (cookie: the worker token).
    ///
    /// # Errors
    /// When the head refuses or its node cannot be reached.
    pub async fn join(address: &str, worker_token: &str, name: &str) -> anyhow::Result<Self> {
        let reply = register(address, worker_token, name).await?;
        let (tx, assignments) = mpsc::unbounded_channel();
        let (actor, _) = Actor::spawn(Some(worker_actor_name(&reply.worker_id)), Taker, tx)
            .await
            .map_err(|e| anyhow::anyhow!("spawning the actor: {e}"))?;
        let server = NodeServer::new(
            0,
            worker_token.to_string(),
            format!("rogue-{name}"),
            "127.0.0.1".into(),
            None,
            None,
        )
        .with_listen_addr(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        let (node, _) = Actor::spawn(None, server, ())
            .await
            .map_err(|e| anyhow::anyhow!("starting the node: {e}"))?;
        ractor_cluster::client_connect(&node, reply.head_node_address.as_str())
            .await
            .map_err(|e| anyhow::anyhow!("connecting to {}: {e}", reply.head_node_address))?;
        let session_client = client(address, &reply.session_token).await?;
        // Heartbeats keep it registered (a silent worker is evicted).
        let heartbeat = {
            let mut c = session_client.clone();
            let worker_id = reply.worker_id.clone();
            let every = Duration::from_millis(u64::from(reply.heartbeat_interval_ms.max(50)));
            tokio::spawn(async move {
                loop {
                    let _ = c
                        .heartbeat(medray_proto::v1::HeartbeatRequest {
                            worker_id: worker_id.clone(),
                            current_task: String::new(),
                        })
                        .await;
                    tokio::time::sleep(every).await;
                }
            })
        };
        Ok(Self {
            client: session_client,
            heartbeat,
            worker_id: reply.worker_id,
            session: reply.session_token,
            assignments,
            node,
            actor,
        })
    }

    /// The next task the head assigned (and this worker "accepted").
    ///
    /// # Errors
    /// None within `timeout`.
    pub async fn next_assignment(&mut self, timeout: Duration) -> anyhow::Result<TaskAssignment> {
        tokio::time::timeout(timeout, self.assignments.recv())
            .await
            .context("no assignment in time")?
            .context("the actor stopped")
    }
}

impl Drop for RogueWorker {
    fn drop(&mut self) {
        self.heartbeat.abort();
        self.actor.stop(None);
        self.node.stop(None);
    }
}
