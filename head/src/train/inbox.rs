//! The coordinator's inbox bound: a replica's messages reach the coordinator only while
//! their bytes fit in the job's budget (`--train-inbox-bytes`). Each message holds its share
//! of the budget ([`CoordEvent::Up`]'s `held`) until the coordinator has processed it; when
//! the budget is spent, [`forward`] stops reading that replica's stream, and HTTP/2 flow
//! control makes the replica wait. The head's memory for unprocessed replica messages is
//! so bounded by the budget (plus one message per stream being read).

use std::sync::Arc;

use futures::{Stream, StreamExt};
use medray_proto::v1::TrainUp;
use ractor::ActorRef;
use tokio::sync::Semaphore;
use tonic::Status;

use super::{CoordEvent, CoordMsg};

/// The budget share of a message of `len` bytes under a budget of `total` bytes: at least 1,
/// at most the whole budget (a message larger than the budget waits for all of it).
fn share(len: usize, total: usize) -> u32 {
    u32::try_from(len.clamp(1, total.max(1))).unwrap_or(u32::MAX)
}

/// Hands the messages of replica stream `member` to `coordinator` in order, each with its
/// share of `budget` (of `total` bytes), until the stream ends or breaks (then tells the
/// coordinator the replica is gone) or the coordinator stops.
pub(crate) async fn forward<S>(
    mut up: S,
    member: u64,
    coordinator: ActorRef<CoordMsg>,
    budget: Arc<Semaphore>,
    total: usize,
) where
    S: Stream<Item = Result<TrainUp, Status>> + Unpin,
{
    let reason = loop {
        match up.next().await {
            Some(Ok(TrainUp { msg: Some(msg) })) => {
                let Ok(held) = budget
                    .clone()
                    .acquire_many_owned(share(msg.encoded_len(), total))
                    .await
                else {
                    return;
                };
                let event = CoordEvent::Up {
                    member,
                    msg,
                    held: Some(held),
                };
                if coordinator.cast(CoordMsg::Event(event)).is_err() {
                    return;
                }
            }
            Some(Ok(TrainUp { msg: None })) => break "it sent an empty message".to_string(),
            None => break "its stream ended".to_string(),
            Some(Err(status)) => break format!("its stream broke: {}", status.message()),
        }
    };
    let _ = coordinator.cast(CoordMsg::Event(CoordEvent::Gone { member, reason }));
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use medray_proto::v1::train_up::Msg;
    use ractor::{Actor, ActorProcessingErr};

    use super::*;

    /// Holds every event it gets (the budget they hold stays spent) until told to let go.
    struct Slow;

    impl Actor for Slow {
        type Msg = CoordMsg;
        type State = Vec<CoordEvent>;
        type Arguments = ();

        async fn pre_start(
            &self,
            _: ActorRef<CoordMsg>,
            (): (),
        ) -> Result<Self::State, ActorProcessingErr> {
            Ok(Vec::new())
        }

        async fn handle(
            &self,
            _: ActorRef<CoordMsg>,
            msg: CoordMsg,
            held: &mut Self::State,
        ) -> Result<(), ActorProcessingErr> {
            match msg {
                CoordMsg::Event(e) => held.push(e),
                // "Processed": the events go, and their budget with them.
                CoordMsg::Ended(_) => held.clear(),
                _ => {}
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_full_inbox_stops_reading_the_replica_until_the_coordinator_catches_up() {
        // Messages of 1000 bytes under a budget of 3500: three fit, the fourth waits.
        let message = || TrainUp {
            msg: Some(Msg::Error("x".repeat(997))),
        };
        assert_eq!(message().msg.unwrap().encoded_len(), 1000);
        let pulled = Arc::new(AtomicUsize::new(0));
        let counter = pulled.clone();
        let stream = futures::stream::iter((0..10).map(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok(message())
        }));
        let (coordinator, _) = Actor::spawn(None, Slow, ()).await.unwrap();
        let budget = Arc::new(Semaphore::new(3500));
        let task = tokio::spawn(forward(
            stream,
            7,
            coordinator.clone(),
            budget.clone(),
            3500,
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Three messages handed on, the fourth read and waiting for budget, no further.
        assert_eq!(pulled.load(Ordering::SeqCst), 4);
        // The 500 bytes left are already reserved for the waiting message (a fair semaphore).
        assert_eq!(budget.available_permits(), 0);
        assert!(!task.is_finished());
        // The coordinator processes what it holds: the rest flows.
        coordinator
            .cast(CoordMsg::Ended(Ok(String::new())))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(pulled.load(Ordering::SeqCst), 7);
        coordinator
            .cast(CoordMsg::Ended(Ok(String::new())))
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                coordinator
                    .cast(CoordMsg::Ended(Ok(String::new())))
                    .unwrap();
                if task.is_finished() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the stream is read to its end once the coordinator keeps up");
        assert_eq!(pulled.load(Ordering::SeqCst), 10);
        coordinator.stop(None);
    }

    #[test]
    fn a_message_larger_than_the_budget_waits_for_all_of_it() {
        assert_eq!(share(0, 100), 1);
        assert_eq!(share(50, 100), 50);
        assert_eq!(share(500, 100), 100);
    }
}
