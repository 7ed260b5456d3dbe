//! The control messages the head's scheduler sends to a worker actor over ractor_cluster,
//! here so that the head and the worker share them without depending on each other.
//!
//! They are small by construction (a task assignment names stage keys, never carries a
//! volume), far below ractor_cluster's 16 MiB frame limit. Payloads are prost-encoded
//! `medray.v1` messages wrapped in [`Wire`], so a malformed frame is reported as an error in
//! the handler instead of panicking the actor.

use crate::v1::{AssignmentAck, TaskAssignment};
use ractor::{BytesConvertable, RpcReplyPort};
use ractor_cluster::RactorClusterMessage;

/// Name of the process group every worker actor joins; the head's registry monitors it.
pub const WORKERS_GROUP: &str = "medray.workers";

/// The registered name of the actor of worker `worker_id`.
#[must_use]
pub fn worker_actor_name(worker_id: &str) -> String {
    format!("medray-worker/{worker_id}")
}

/// The worker id in a worker actor's registered name.
#[must_use]
pub fn worker_id_from_actor_name(name: &str) -> Option<&str> {
    name.strip_prefix("medray-worker/")
}

/// A prost message on the wire; `Err` holds the decoding error of a malformed payload.
#[derive(Debug, Clone)]
pub struct Wire<T>(pub Result<T, String>);

impl<T> Wire<T> {
    /// Wraps a message to send.
    pub fn new(message: T) -> Self {
        Self(Ok(message))
    }
}

impl<T: prost::Message + Default + Send + 'static> BytesConvertable for Wire<T> {
    fn into_bytes(self) -> Vec<u8> {
        match self.0 {
            Ok(m) => m.encode_to_vec(),
            // An undecodable payload is never forwarded: it stays an error locally, and an
            // empty frame decodes to the default message on the other side.
            Err(_) => Vec::new(),
        }
    }

    fn from_bytes(bytes: Vec<u8>) -> Self {
        Self(T::decode(bytes.as_slice()).map_err(|e| e.to_string()))
    }
}

/// Messages a worker actor handles. Each request that expects an answer carries a reply
/// port; the head waits for it with a timeout.
#[derive(RactorClusterMessage)]
pub enum WorkerControl {
    /// Run a task attempt. The worker accepts it only when idle and not draining; the
    /// acknowledgement says so (and why not).
    #[rpc]
    Assign(Wire<TaskAssignment>, RpcReplyPort<Wire<AssignmentAck>>),
    /// Stop the task attempt `"job_id/task_id#attempt"` if it runs here; replies whether it
    /// was running.
    #[rpc]
    Cancel(String, RpcReplyPort<bool>),
    /// Liveness probe over the actor link; replies with the worker's id.
    #[rpc]
    Ping(RpcReplyPort<String>),
}

impl std::fmt::Debug for WorkerControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Assign(a, _) => f.debug_tuple("Assign").field(&a.0).finish(),
            Self::Cancel(t, _) => f.debug_tuple("Cancel").field(t).finish(),
            Self::Ping(_) => f.write_str("Ping"),
        }
    }
}

/// The key of a task attempt used by [`WorkerControl::Cancel`].
#[must_use]
pub fn attempt_key(job_id: &str, task_id: &str, attempt: u32) -> String {
    format!("{job_id}/{task_id}#{attempt}")
}
