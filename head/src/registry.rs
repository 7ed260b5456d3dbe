//! The worker registry actor: who is in the cluster. It records registrations, heartbeats
//! and departures, watches the `medray.workers` process group (a worker actor joining or
//! leaving, e.g. when its node's connection drops, is a supervision event here), and evicts
//! a worker whose heartbeats stop for [`HeadConfig::worker_timeout`]. It tells the
//! scheduler when a worker becomes usable or is lost.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use medray_proto::v1::{RegisterRequest, RegisterResponse, WorkerStatus};
use medray_worker::control::{worker_id_from_actor_name, WorkerControl, WORKERS_GROUP};
use ractor::pg::GroupChangeMessage;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use ractor_cluster::RactorMessage;

use crate::config::HeadConfig;
use crate::ids::WorkerId;
use crate::metrics::Metrics;
use crate::scheduler::SchedulerMsg;
use crate::store::{Store, WorkerRow};
use crate::Result;

/// The registry actor (immutable dependencies).
#[derive(Debug)]
pub struct Registry {
    /// The store.
    pub store: Arc<Store>,
    /// Settings.
    pub config: Arc<HeadConfig>,
    /// Address of the head's ractor_cluster node, given to workers.
    pub node_address: String,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// Messages of the registry.
#[derive(RactorMessage)]
pub enum RegistryMsg {
    /// A worker registers (protocol version already checked); replies with its id.
    Register(RegisterRequest, RpcReplyPort<Result<RegisterResponse>>),
    /// A heartbeat; replies whether the worker is known.
    Heartbeat {
        /// The worker.
        worker_id: WorkerId,
        /// Its running task, "" when idle.
        current_task: String,
        /// Known or not.
        reply: RpcReplyPort<bool>,
    },
    /// A worker leaves (drained).
    Deregister {
        /// The worker.
        worker_id: WorkerId,
        /// Why.
        reason: String,
    },
    /// A worker's task attempt ended (its heartbeat will say so too, up to an interval later).
    TaskEnded(WorkerId),
    /// Periodic check of heartbeat ages (self-sent).
    Tick,
    /// Current workers, for `medray status`.
    Snapshot(RpcReplyPort<Vec<WorkerStatus>>),
    /// Number of workers whose actor has joined (usable by the scheduler).
    LiveCount(RpcReplyPort<u32>),
    /// The scheduler to notify (set once at start-up).
    SetScheduler(ActorRef<SchedulerMsg>),
}

impl std::fmt::Debug for RegistryMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Register(..) => "Register",
            Self::Heartbeat { .. } => "Heartbeat",
            Self::Deregister { .. } => "Deregister",
            Self::TaskEnded(_) => "TaskEnded",
            Self::Tick => "Tick",
            Self::Snapshot(_) => "Snapshot",
            Self::LiveCount(_) => "LiveCount",
            Self::SetScheduler(_) => "SetScheduler",
        })
    }
}

#[derive(Debug)]
struct Entry {
    row: WorkerRow,
    last_heartbeat: Instant,
    current_task: String,
    actor: Option<ActorRef<WorkerControl>>,
}

/// Registry state.
#[derive(Debug, Default)]
pub struct RegistryState {
    workers: HashMap<WorkerId, Entry>,
    scheduler: Option<ActorRef<SchedulerMsg>>,
}

impl Registry {
    fn lost(&self, state: &mut RegistryState, id: &WorkerId, reason: &str) {
        if state.workers.remove(id).is_some() {
            tracing::warn!(worker_id = %id, reason, "worker lost");
            if let Err(e) = self.store.set_worker_state(id, "DEAD", reason) {
                tracing::error!(error = %e, "cannot record a lost worker");
            }
            if let Some(s) = &state.scheduler {
                let _ = s.cast(SchedulerMsg::WorkerDown {
                    worker_id: id.clone(),
                    reason: reason.to_string(),
                });
            }
            self.metrics.workers_lost.inc();
        }
        self.metrics.set_workers(state.workers.len());
    }
}

impl Actor for Registry {
    type Msg = RegistryMsg;
    type State = RegistryState;
    type Arguments = ();

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        (): (),
    ) -> Result<Self::State, ActorProcessingErr> {
        self.store
            .mark_all_workers_dead("head restarted; the worker must register again")?;
        ractor::pg::monitor(WORKERS_GROUP.to_string(), myself.get_cell());
        myself.send_interval(self.config.heartbeat_interval / 2, || RegistryMsg::Tick);
        Ok(RegistryState::default())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            RegistryMsg::Register(req, reply) => {
                let row = WorkerRow {
                    id: WorkerId(String::new()),
                    name: req.name,
                    device: req.device,
                    address: req.node_address,
                    memory_bytes: req.memory_bytes,
                    cores: req.cores,
                    version: req.version,
                    gpu_name: req.gpu_name,
                    gpu_memory_bytes: req.gpu_memory_bytes,
                };
                let result = self.store.insert_worker(&row).map(|id| {
                    tracing::info!(worker_id = %id, name = %row.name, device = %row.device, "worker registered");
                    state.workers.insert(
                        id.clone(),
                        Entry {
                            row: WorkerRow { id: id.clone(), ..row },
                            last_heartbeat: Instant::now(),
                            current_task: String::new(),
                            actor: None,
                        },
                    );
                    RegisterResponse {
                        worker_id: id.to_string(),
                        heartbeat_interval_ms: self.config.heartbeat_interval.as_millis() as u32,
                        head_node_address: self.node_address.clone(),
                        max_message_bytes: self.config.max_message_bytes as u64,
                        chunk_bytes: self.config.chunk_bytes as u64,
                    }
                });
                self.metrics.set_workers(state.workers.len());
                let _ = reply.send(result);
            }
            RegistryMsg::Heartbeat {
                worker_id,
                current_task,
                reply,
            } => {
                let known = match state.workers.get_mut(&worker_id) {
                    Some(e) => {
                        e.last_heartbeat = Instant::now();
                        e.current_task.clone_from(&current_task);
                        true
                    }
                    None => false,
                };
                if known {
                    if let Some(s) = &state.scheduler {
                        let _ = s.cast(SchedulerMsg::Heartbeat {
                            worker_id,
                            idle: current_task.is_empty(),
                        });
                    }
                }
                let _ = reply.send(known);
            }
            RegistryMsg::Deregister { worker_id, reason } => {
                self.lost(state, &worker_id, &format!("left the cluster ({reason})"));
            }
            RegistryMsg::TaskEnded(worker_id) => {
                if let Some(e) = state.workers.get_mut(&worker_id) {
                    e.current_task.clear();
                }
            }
            RegistryMsg::Tick => {
                let timeout = self.config.worker_timeout;
                let stale: Vec<(WorkerId, Duration)> = state
                    .workers
                    .iter()
                    .filter(|(_, e)| e.last_heartbeat.elapsed() > timeout)
                    .map(|(id, e)| (id.clone(), e.last_heartbeat.elapsed()))
                    .collect();
                for (id, age) in stale {
                    self.lost(
                        state,
                        &id,
                        &format!(
                            "no heartbeat for {:.1} s (timeout {:.1} s)",
                            age.as_secs_f64(),
                            timeout.as_secs_f64()
                        ),
                    );
                }
            }
            RegistryMsg::Snapshot(reply) => {
                let mut list: Vec<WorkerStatus> = state
                    .workers
                    .values()
                    .map(|e| WorkerStatus {
                        worker_id: e.row.id.to_string(),
                        name: e.row.name.clone(),
                        device: e.row.device.clone(),
                        state: if e.actor.is_some() {
                            "ALIVE"
                        } else {
                            "JOINING"
                        }
                        .into(),
                        last_heartbeat_age_s: e.last_heartbeat.elapsed().as_secs_f64(),
                        current_task: e.current_task.clone(),
                        memory_bytes: e.row.memory_bytes,
                        cores: e.row.cores,
                        version: e.row.version.clone(),
                        address: e.row.address.clone(),
                        gpu_name: e.row.gpu_name.clone(),
                        gpu_memory_bytes: e.row.gpu_memory_bytes,
                    })
                    .collect();
                list.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
                let _ = reply.send(list);
            }
            RegistryMsg::LiveCount(reply) => {
                let n = state.workers.values().filter(|e| e.actor.is_some()).count();
                let _ = reply.send(n as u32);
            }
            RegistryMsg::SetScheduler(s) => state.scheduler = Some(s),
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let SupervisionEvent::ProcessGroupChanged(change) = event else {
            return Ok(());
        };
        match change {
            GroupChangeMessage::Join(_, _, cells) => {
                for cell in cells {
                    let Some(name) = cell.get_name() else {
                        continue;
                    };
                    let Some(id) = worker_id_from_actor_name(&name).map(WorkerId::from) else {
                        continue;
                    };
                    let Some(entry) = state.workers.get_mut(&id) else {
                        tracing::warn!(actor = %name, "an unregistered worker actor joined; ignored");
                        continue;
                    };
                    let actor: ActorRef<WorkerControl> = cell.into();
                    entry.actor = Some(actor.clone());
                    tracing::info!(worker_id = %id, "worker actor joined");
                    if let Some(s) = &state.scheduler {
                        let _ = s.cast(SchedulerMsg::WorkerUp {
                            worker_id: id,
                            actor,
                        });
                    }
                }
            }
            GroupChangeMessage::Leave(_, _, cells) => {
                for cell in cells {
                    let Some(id) = cell
                        .get_name()
                        .and_then(|n| worker_id_from_actor_name(&n).map(WorkerId::from))
                    else {
                        continue;
                    };
                    self.lost(
                        state,
                        &id,
                        "its actor left the cluster (node disconnected or stopped)",
                    );
                }
            }
        }
        Ok(())
    }
}
