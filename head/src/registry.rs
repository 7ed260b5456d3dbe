//! The worker registry actor: who is in the cluster. It records registrations, heartbeats
//! and departures, watches the `medray.workers` process group (a worker actor joining or
//! leaving, e.g. when its node's connection drops, is a supervision event here), and evicts
//! a worker whose heartbeats stop for [`HeadConfig::worker_timeout`]. It tells the
//! scheduler when a worker becomes usable or is lost. A lost worker stays in the listing of
//! `medray status`, LOST with why and when, for [`HeadConfig::lost_worker_retention`].

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use medray_proto::control::{worker_id_from_actor_name, WorkerControl, WORKERS_GROUP};
use medray_proto::v1::{RegisterRequest, RegisterResponse, WorkerStatus};
use ractor::pg::GroupChangeMessage;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use ractor_cluster::RactorMessage;

use crate::config::HeadConfig;
use crate::ids::WorkerId;
use crate::metrics::Metrics;
use crate::scheduler::SchedulerMsg;
use crate::sessions::WorkerSessions;
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
    /// The workers' session credentials: opened at registration, closed when lost.
    pub sessions: Arc<WorkerSessions>,
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

/// Lost workers listed at most (the oldest are dropped first), whatever the retention.
const MAX_LOST_LISTED: usize = 256;

#[derive(Debug)]
struct Entry {
    row: WorkerRow,
    last_heartbeat: Instant,
    current_task: String,
    actor: Option<ActorRef<WorkerControl>>,
}

/// A worker that was lost, still listed.
#[derive(Debug)]
struct Lost {
    entry: Entry,
    reason: String,
    at: Instant,
    /// `at` as UTC RFC 3339.
    at_utc: String,
}

/// Registry state.
#[derive(Debug, Default)]
pub struct RegistryState {
    workers: HashMap<WorkerId, Entry>,
    /// Lost workers, oldest first.
    lost: VecDeque<Lost>,
    scheduler: Option<ActorRef<SchedulerMsg>>,
}

/// `t` as UTC RFC 3339 with whole seconds, e.g. `2023-11-14T22:13:20Z`.
fn utc_rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // The civil date of a day count (H. Hinnant, "chrono-Compatible Low-Level Date
    // Algorithms", `civil_from_days`).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn worker_status(e: &Entry, state: &str) -> WorkerStatus {
    WorkerStatus {
        worker_id: e.row.id.to_string(),
        name: e.row.name.clone(),
        device: e.row.device.clone(),
        state: state.into(),
        last_heartbeat_age_s: e.last_heartbeat.elapsed().as_secs_f64(),
        current_task: e.current_task.clone(),
        memory_bytes: e.row.memory_bytes,
        cores: e.row.cores,
        version: e.row.version.clone(),
        address: e.row.address.clone(),
        gpu_name: e.row.gpu_name.clone(),
        gpu_memory_bytes: e.row.gpu_memory_bytes,
        lost_reason: String::new(),
        lost_at: String::new(),
        lost_age_s: 0.0,
    }
}

impl Registry {
    fn lost(&self, state: &mut RegistryState, id: &WorkerId, reason: &str) {
        self.sessions.close(id);
        if let Some(mut entry) = state.workers.remove(id) {
            tracing::warn!(worker_id = %id, reason, "worker lost");
            // Whatever it ran is re-queued by the scheduler: a lost worker runs nothing.
            entry.current_task.clear();
            state.lost.push_back(Lost {
                entry,
                reason: reason.to_string(),
                at: Instant::now(),
                at_utc: utc_rfc3339(SystemTime::now()),
            });
            if state.lost.len() > MAX_LOST_LISTED {
                state.lost.pop_front();
            }
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

    /// Drops lost workers listed for longer than the retention.
    fn forget_lost(&self, state: &mut RegistryState) {
        let keep = self.config.lost_worker_retention;
        state.lost.retain(|l| l.at.elapsed() <= keep);
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
                        session_token: self.sessions.open(&id).expose().clone(),
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
                self.forget_lost(state);
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
                self.forget_lost(state);
                let mut list: Vec<WorkerStatus> = state
                    .workers
                    .values()
                    .map(|e| {
                        worker_status(
                            e,
                            if e.actor.is_some() {
                                "ALIVE"
                            } else {
                                "JOINING"
                            },
                        )
                    })
                    .collect();
                list.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
                // Lost workers after the live ones, most recently lost first.
                list.extend(state.lost.iter().rev().map(|l| WorkerStatus {
                    lost_reason: l.reason.clone(),
                    lost_at: l.at_utc.clone(),
                    lost_age_s: l.at.elapsed().as_secs_f64(),
                    ..worker_status(&l.entry, "LOST")
                }));
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
                        "connection closed: its actor left the cluster (the process exited or was killed, or its node disconnected)",
                    );
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_timestamps_are_rfc3339() {
        let at = |s: u64| utc_rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(at(4_102_444_799), "2099-12-31T23:59:59Z");
    }

    async fn snapshot(registry: &ActorRef<RegistryMsg>) -> Vec<WorkerStatus> {
        registry
            .call(RegistryMsg::Snapshot, Some(Duration::from_secs(5)))
            .await
            .expect("registry up")
            .success_or("the registry did not answer")
            .expect("registry answers")
    }

    #[tokio::test]
    async fn a_lost_worker_is_listed_lost_with_why_and_when_then_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let config = HeadConfig {
            heartbeat_interval: Duration::from_millis(50),
            worker_timeout: Duration::from_millis(300),
            lost_worker_retention: Duration::from_secs(1),
            ..HeadConfig::default()
        };
        let (registry, _) = Actor::spawn(
            None,
            Registry {
                store: Arc::new(Store::open(&dir.path().join("catalog.db")).unwrap()),
                config: Arc::new(config),
                node_address: "127.0.0.1:1".into(),
                metrics: Arc::new(Metrics::default()),
                sessions: Arc::default(),
            },
            (),
        )
        .await
        .unwrap();
        let mut ids = Vec::new();
        for name in ["steady", "silent"] {
            let reply = registry
                .call(
                    |r| {
                        RegistryMsg::Register(
                            RegisterRequest {
                                name: name.into(),
                                device: "cpu".into(),
                                ..RegisterRequest::default()
                            },
                            r,
                        )
                    },
                    Some(Duration::from_secs(5)),
                )
                .await
                .unwrap()
                .success_or("no answer")
                .unwrap()
                .unwrap();
            ids.push(WorkerId(reply.worker_id));
        }
        // "steady" heartbeats, "silent" does not: it is evicted, and listed LOST.
        let started = Instant::now();
        let lost = loop {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the silent worker was never listed LOST: {:?}",
                snapshot(&registry).await
            );
            let _ = registry
                .call(
                    |reply| RegistryMsg::Heartbeat {
                        worker_id: ids[0].clone(),
                        current_task: String::new(),
                        reply,
                    },
                    Some(Duration::from_secs(5)),
                )
                .await;
            let list = snapshot(&registry).await;
            if let Some(w) = list.iter().find(|w| w.state == "LOST") {
                assert_eq!(list.len(), 2, "{list:?}");
                assert_eq!(list[0].name, "steady", "live workers first: {list:?}");
                assert_eq!(list[0].lost_reason, "");
                break w.clone();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(lost.worker_id, ids[1].as_str());
        assert!(lost.lost_reason.contains("no heartbeat for"), "{lost:?}");
        assert!(
            lost.lost_at.len() == 20 && lost.lost_at.ends_with('Z'),
            "{lost:?}"
        );
        assert!(lost.lost_age_s < 10.0, "{lost:?}");
        // After the retention it is no longer listed.
        let started = Instant::now();
        while snapshot(&registry).await.iter().any(|w| w.state == "LOST") {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "a lost worker is listed for longer than the retention"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
