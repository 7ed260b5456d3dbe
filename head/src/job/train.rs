//! Training jobs: one replica task per worker and the coordinator ([`crate::train`], an
//! actor linked under the job's) that drives them; elastic jobs grow at epoch boundaries.

use std::time::Duration;

use medray_proto::v1::task_assignment::Kind as TaskKind;
use medray_proto::v1::{TaskAssignment, TrainSpec, TrainTask};
use ractor::{Actor, ActorRef};

use super::{Job, JobKind};
use crate::ids::TaskId;
use crate::scheduler::TaskEnd;
use crate::store::TaskState;
use crate::train::{CoordActorArgs, CoordEvent, CoordMsg, CoordinatorArgs, TrainCoordinator};
use crate::{HeadError, Result};

/// How often an elastic training job looks for new workers.
const GROW_EVERY: Duration = Duration::from_secs(2);

/// A training job.
#[derive(Debug)]
pub(super) struct TrainJob {
    spec: TrainSpec,
    /// The coordinator actor, once started.
    coordinator: Option<ActorRef<CoordMsg>>,
    /// Replica tasks created so far (replacements get the next number).
    tasks: usize,
}

impl TrainJob {
    pub(super) fn new(spec: TrainSpec) -> Self {
        Self {
            spec,
            coordinator: None,
            tasks: 0,
        }
    }

    /// Gives every live worker without a replica of this (elastic) job a new replica task;
    /// the coordinator admits it at the next epoch boundary.
    async fn grow(&mut self, job: &Job) -> Result<()> {
        if self.coordinator.is_none() {
            return Ok(());
        }
        let live = job.live_workers().await? as usize;
        let active = job
            .ctx
            .store
            .tasks(&job.job_id)?
            .iter()
            .filter(|t| matches!(t.state, TaskState::Pending | TaskState::Running))
            .count();
        if live <= active {
            return Ok(());
        }
        let mut new = Vec::new();
        for _ in active..live {
            self.tasks += 1;
            new.push((replica_task(self.tasks), train_assignment(&self.spec)));
        }
        job.ctx.store.insert_tasks(&job.job_id, &new)?;
        let ids: Vec<TaskId> = new.into_iter().map(|(id, _)| id).collect();
        job.log(format!(
            "{} more worker(s) in the cluster: replica task(s) {} added; they join at the next epoch boundary",
            ids.len(),
            ids.iter().map(TaskId::as_str).collect::<Vec<_>>().join(", ")
        ));
        job.enqueue(ids)
    }
}

impl JobKind for TrainJob {
    /// Plans a training job: one task per replica, and the coordinator that drives them.
    async fn start(&mut self, job: &mut Job) -> Result<()> {
        let spec = &self.spec;
        if spec.model.is_empty() {
            return Err(HeadError::invalid("spec.train.model", "missing"));
        }
        // Checked now, so that a bad spec fails before it waits for workers.
        if spec.resume_from.is_empty() {
            crate::train::train_config(spec)?;
        }
        let existing = job.ctx.store.tasks(&job.job_id)?;
        let replicas;
        if existing.is_empty() {
            let Some(live) = job.enough_workers(spec.workers).await? else {
                return Ok(());
            };
            replicas = if spec.workers == 0 {
                live
            } else {
                spec.workers
            } as usize;
            let tasks: Vec<(TaskId, TaskAssignment)> = (1..=replicas)
                .map(|i| (replica_task(i), train_assignment(spec)))
                .collect();
            job.ctx.store.insert_tasks(&job.job_id, &tasks)?;
        } else {
            replicas = existing
                .iter()
                .filter(|t| !matches!(t.state, TaskState::Failed | TaskState::Cancelled))
                .count()
                .max(1);
            if job.resumed {
                job.requeue_after_restart(|n| {
                    format!("head restarted: resuming training from its last checkpoint ({n} replica(s) re-queued)")
                })?;
            }
        }
        job.mark_running()?;
        let args = CoordActorArgs {
            args: CoordinatorArgs {
                ctx: job.ctx.clone(),
                job_id: job.job_id.clone(),
                spec: spec.clone(),
                replicas,
            },
            job: job.myself.clone(),
        };
        let (coordinator, _) =
            Actor::spawn_linked(None, TrainCoordinator, args, job.myself.get_cell())
                .await
                .map_err(|e| HeadError::Actor(format!("spawning the training coordinator: {e}")))?;
        self.coordinator = Some(coordinator);
        self.tasks = existing.len().max(replicas);
        if spec.workers == 0 {
            job.tick_after(GROW_EVERY);
        }
        let tasks = job.ctx.store.tasks(&job.job_id)?;
        job.enqueue_pending(&tasks)
    }

    /// A replica's task ended: the coordinator hears of a lost replica; one that failed for
    /// good is replaced by a new task (the coordinator's failure budget bounds this).
    fn task_ended(&mut self, job: &mut Job, task_id: TaskId, end: TaskEnd) -> Result<()> {
        let Some(coordinator) = &self.coordinator else {
            return Ok(());
        };
        let (reason, replace) = match end {
            TaskEnd::Succeeded { worker_id, .. } => {
                job.log(format!("replica {task_id} on {worker_id} ended"));
                return Ok(());
            }
            TaskEnd::Retrying(reason) => (reason, false),
            TaskEnd::Failed(reason) => (reason, true),
        };
        let _ = coordinator.cast(CoordMsg::Event(CoordEvent::TaskLost {
            task_id: task_id.clone(),
            reason: reason.clone(),
        }));
        if !replace {
            job.log(format!("replica {task_id} will run again: {reason}"));
            return Ok(());
        }
        self.tasks += 1;
        let new_id = replica_task(self.tasks);
        job.ctx.store.insert_tasks(
            &job.job_id,
            &[(new_id.clone(), train_assignment(&self.spec))],
        )?;
        job.log(format!(
            "replica {task_id} failed ({reason}); {new_id} will replace it when a worker is free"
        ));
        job.enqueue(vec![new_id])
    }

    fn work_done(&mut self, job: &mut Job, result: std::result::Result<String, String>) {
        if result.is_ok() {
            // Replacement replicas still queued are not needed any more.
            let _ = job.ctx.store.cancel_pending_tasks(&job.job_id);
        }
        job.end_with(result);
    }

    /// An elastic job looks for new workers, and asks for the next look.
    async fn tick(&mut self, job: &mut Job) -> Result<()> {
        job.tick_after(GROW_EVERY);
        self.grow(job).await
    }

    fn coordinator(&self) -> Option<ActorRef<CoordMsg>> {
        self.coordinator.clone()
    }

    fn stopped(&mut self) {
        if let Some(coordinator) = self.coordinator.take() {
            // Stopping the coordinator ends the replicas' streams.
            coordinator.stop(Some("its job ended".into()));
        }
    }
}

fn replica_task(i: usize) -> TaskId {
    TaskId(format!("r{i:03}"))
}

fn train_assignment(spec: &TrainSpec) -> TaskAssignment {
    TaskAssignment {
        kind: Some(TaskKind::Train(TrainTask {
            dataset: spec.dataset.clone(),
        })),
        ..TaskAssignment::default()
    }
}
