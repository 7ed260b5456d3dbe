//! The coordinator as an actor: `TrainCoordinator`, spawned linked under its job's actor.
//!
//! The step loop (`Coordinator::run`, the rest of this module) waits on the replicas with
//! deadlines, so it runs as a task the actor owns rather than inside one message handler:
//!
//! - the `Train` service finds the actor by asking the job manager, which asks the job
//!   ([`crate::job::JobMsg::Coordinator`]); every replica event ([`CoordEvent`]) reaches the
//!   actor and is handed to the loop in arrival order;
//! - when the loop ends, the actor tells its job ([`crate::job::JobMsg::WorkDone`]) and
//!   stops;
//! - when the loop panics, the actor fails, and its supervisor, the job, fails the job with
//!   the panic's text;
//! - when the job stops (cancelled, failed, head shutting down), it stops the actor, which
//!   aborts the loop: the replicas' streams end with it.

use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorMessage;
use tokio::sync::mpsc;

use super::{run, CoordEvent, CoordinatorArgs};
use crate::job::JobMsg;

/// The coordinator actor of one training job.
#[derive(Debug, Default)]
pub struct TrainCoordinator;

/// Messages of a coordinator.
#[derive(RactorMessage)]
pub enum CoordMsg {
    /// A replica joined, spoke, left or was lost.
    Event(CoordEvent),
    /// The loop ended (self-sent): the job's result JSON or why it failed.
    Ended(std::result::Result<String, String>),
    /// The loop panicked (self-sent), with the panic's text.
    Panicked(String),
    /// The inbox budget the `Train` service draws from before it hands on a replica's
    /// message (`train::inbox`).
    Budget(ractor::RpcReplyPort<std::sync::Arc<tokio::sync::Semaphore>>),
}

impl std::fmt::Debug for CoordMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Event(e) => write!(f, "Event({e:?})"),
            Self::Ended(r) => write!(f, "Ended(ok: {})", r.is_ok()),
            Self::Panicked(p) => write!(f, "Panicked({p})"),
            Self::Budget(_) => f.write_str("Budget"),
        }
    }
}

/// What the actor starts from.
#[derive(Debug)]
pub struct CoordActorArgs {
    /// The loop's arguments.
    pub args: CoordinatorArgs,
    /// The job to tell how the training ended.
    pub job: ActorRef<JobMsg>,
}

/// The actor's state: the loop's inbox and task.
#[derive(Debug)]
pub struct CoordState {
    /// Unbounded as a channel, bounded by the budget its replica messages hold.
    inbox: mpsc::UnboundedSender<CoordEvent>,
    budget: std::sync::Arc<tokio::sync::Semaphore>,
    task: tokio::task::JoinHandle<()>,
    job: ActorRef<JobMsg>,
}

impl Actor for TrainCoordinator {
    type Msg = CoordMsg;
    type State = CoordState;
    type Arguments = CoordActorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        a: CoordActorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let (inbox, rx) = mpsc::unbounded_channel();
        let budget = std::sync::Arc::new(tokio::sync::Semaphore::new(
            a.args.ctx.config.train_inbox_bytes,
        ));
        let args = a.args;
        let task = tokio::spawn(async move {
            match AssertUnwindSafe(run(args, rx)).catch_unwind().await {
                Ok(result) => {
                    let _ = myself.cast(CoordMsg::Ended(result));
                }
                Err(panic) => {
                    let text = panic
                        .downcast_ref::<&str>()
                        .map(ToString::to_string)
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic without a message".into());
                    let _ = myself.cast(CoordMsg::Panicked(text));
                }
            }
        });
        Ok(CoordState {
            inbox,
            budget,
            task,
            job: a.job,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        s: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Dropping the loop drops its members: the replicas' streams end.
        s.task.abort();
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        s: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            CoordMsg::Event(event) => {
                // The loop has ended when this fails; its end is on the way.
                let _ = s.inbox.send(event);
            }
            CoordMsg::Ended(result) => {
                s.job.cast(JobMsg::WorkDone(result))?;
                myself.stop(None);
            }
            CoordMsg::Panicked(text) => {
                return Err(format!("the training coordinator panicked: {text}").into());
            }
            CoordMsg::Budget(reply) => {
                let _ = reply.send(s.budget.clone());
            }
        }
        Ok(())
    }
}
