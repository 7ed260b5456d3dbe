//! Worker sessions: the credential each registration gets (`RegisterResponse.session_token`)
//! and the check of every later worker call against the worker it names. Only the sha256 of
//! a credential is kept; a session ends when its worker leaves or is lost, and a head that
//! restarts has none (its workers register again).

use std::collections::HashMap;
use std::sync::Mutex;

use medray_proto::auth::{presented_bearer, random_token, Secret};
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;
use tonic::Status;

use crate::ids::WorkerId;

/// The live sessions, by worker.
#[derive(Debug, Default)]
pub struct WorkerSessions {
    by_worker: Mutex<HashMap<WorkerId, [u8; 32]>>,
}

/// What a presented credential is for a named worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionCheck {
    /// The worker's own session.
    Valid,
    /// The worker has no session (never registered here, left, lost, or the head restarted).
    Unknown,
    /// The worker has a session and this is not its credential.
    Wrong,
}

fn digest(credential: &str) -> [u8; 32] {
    Sha256::digest(credential.as_bytes()).into()
}

impl WorkerSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<WorkerId, [u8; 32]>> {
        self.by_worker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts `worker`'s session (replacing any earlier one) and returns its credential.
    pub fn open(&self, worker: &WorkerId) -> Secret<String> {
        let token = random_token();
        self.lock().insert(worker.clone(), digest(&token));
        Secret::new(token)
    }

    /// Ends `worker`'s session.
    pub fn close(&self, worker: &WorkerId) {
        self.lock().remove(worker);
    }

    /// What `presented` is for `worker`.
    #[must_use]
    pub fn check(&self, presented: &str, worker: &WorkerId) -> SessionCheck {
        let presented = digest(presented);
        match self.lock().get(worker) {
            None => SessionCheck::Unknown,
            Some(d) if medray_proto::auth::same_digest(d, &presented) => SessionCheck::Valid,
            Some(_) => SessionCheck::Wrong,
        }
    }

    /// Checks that a call carries `worker`'s session credential.
    ///
    /// # Errors
    /// `Unauthenticated` when the worker has no session (it must register again) or no
    /// credential was sent; `PermissionDenied` when the credential is not this worker's.
    pub fn authorize(&self, metadata: &MetadataMap, worker: &WorkerId) -> Result<(), Status> {
        self.check(presented_bearer(metadata)?, worker)
            .require(worker)
    }
}

impl SessionCheck {
    /// `Ok` for [`SessionCheck::Valid`], else the refusal of a call in `worker`'s name.
    ///
    /// # Errors
    /// `Unauthenticated` when the worker has no session (it must register again);
    /// `PermissionDenied` when the credential is not this worker's.
    pub fn require(self, worker: &WorkerId) -> Result<(), Status> {
        match self {
            SessionCheck::Valid => Ok(()),
            SessionCheck::Unknown => Err(Status::unauthenticated(format!(
                "worker {worker} is not registered (it left, was lost, or the head restarted): register again"
            ))),
            SessionCheck::Wrong => Err(Status::permission_denied(format!(
                "this credential is not worker {worker}'s session: a worker acts only as itself"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_authorizes_its_own_worker_only_until_it_is_closed() {
        let sessions = WorkerSessions::default();
        let (a, b) = (WorkerId("w-1".into()), WorkerId("w-2".into()));
        let ta = sessions.open(&a);
        let tb = sessions.open(&b);
        assert_eq!(sessions.check(ta.expose(), &a), SessionCheck::Valid);
        assert_eq!(sessions.check(tb.expose(), &a), SessionCheck::Wrong);
        assert_eq!(
            sessions.check(ta.expose(), &WorkerId("w-3".into())),
            SessionCheck::Unknown
        );
        let again = sessions.open(&a);
        assert_eq!(
            sessions.check(ta.expose(), &a),
            SessionCheck::Wrong,
            "replaced"
        );
        sessions.close(&a);
        assert_eq!(sessions.check(again.expose(), &a), SessionCheck::Unknown);
        assert!(!format!("{sessions:?}").contains(tb.expose().as_str()));
    }
}
