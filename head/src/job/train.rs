//! Training jobs: one replica task per worker and the coordinator
//! ([`crate::train`]) that drives them; elastic jobs grow at epoch boundaries.

use super::*;

impl JobActor {
    /// Plans a training job: one task per replica, and the coordinator that drives them.
    pub(super) async fn start_train(
        &self,
        myself: &ActorRef<JobMsg>,
        s: &mut JobActorState,
        spec: TrainSpec,
    ) -> Result<()> {
        if spec.model.is_empty() {
            return Err(HeadError::invalid("spec.train.model", "missing"));
        }
        // Checked now, so that a bad spec fails before it waits for workers.
        if spec.resume_from.is_empty() {
            crate::train::train_config(&spec)?;
        }
        let spec_workers = spec.workers;
        let existing = self.ctx.store.tasks(&s.job_id)?;
        let replicas;
        if existing.is_empty() {
            let Some(live) = self.enough_workers(myself, s, spec.workers).await? else {
                return Ok(());
            };
            replicas = if spec.workers == 0 {
                live
            } else {
                spec.workers
            } as usize;
            let tasks: Vec<(TaskId, TaskAssignment)> = (1..=replicas)
                .map(|i| (replica_task(i), train_assignment(&spec)))
                .collect();
            self.ctx.store.insert_tasks(&s.job_id, &tasks)?;
        } else {
            replicas = existing
                .iter()
                .filter(|t| !matches!(t.state, TaskState::Failed | TaskState::Cancelled))
                .count()
                .max(1);
            if s.resumed {
                self.requeue_after_restart(s, |n| {
                    format!("head restarted: resuming training from its last checkpoint ({n} replica(s) re-queued)")
                })?;
            }
        }
        self.mark_running(s)?;
        let args = crate::train::CoordActorArgs {
            args: crate::train::CoordinatorArgs {
                ctx: self.ctx.clone(),
                job_id: s.job_id.clone(),
                spec,
                replicas,
            },
            job: myself.clone(),
        };
        let (coordinator, _) = ractor::Actor::spawn_linked(
            None,
            crate::train::TrainCoordinator,
            args,
            myself.get_cell(),
        )
        .await
        .map_err(|e| HeadError::Actor(format!("spawning the training coordinator: {e}")))?;
        s.trainer = Some(Trainer {
            coordinator,
            tasks: existing.len().max(replicas),
        });
        if spec_workers == 0 {
            myself.send_after(GROW_EVERY, || JobMsg::Grow);
        }
        let tasks = self.ctx.store.tasks(&s.job_id)?;
        self.enqueue_pending(myself, s, &tasks)?;
        Ok(())
    }

    /// Gives every live worker without a replica of this (elastic) job a new replica task;
    /// the coordinator admits it at the next epoch boundary.
    pub(super) async fn grow(
        &self,
        myself: &ActorRef<JobMsg>,
        s: &mut JobActorState,
    ) -> Result<()> {
        let Some(trainer) = s.trainer.as_mut() else {
            return Ok(());
        };
        let live = self.live_workers().await? as usize;
        let active = self
            .ctx
            .store
            .tasks(&s.job_id)?
            .iter()
            .filter(|t| matches!(t.state, TaskState::Pending | TaskState::Running))
            .count();
        if live <= active {
            return Ok(());
        }
        let spec = match &s.spec.kind {
            Some(Kind::Train(spec)) => spec.clone(),
            _ => return Ok(()),
        };
        let mut new = Vec::new();
        for _ in active..live {
            trainer.tasks += 1;
            new.push((replica_task(trainer.tasks), train_assignment(&spec)));
        }
        self.ctx.store.insert_tasks(&s.job_id, &new)?;
        let ids: Vec<TaskId> = new.into_iter().map(|(id, _)| id).collect();
        self.log(
            s,
            format!(
                "{} more worker(s) in the cluster: replica task(s) {} added; they join at the next epoch boundary",
                ids.len(),
                ids.iter().map(TaskId::as_str).collect::<Vec<_>>().join(", ")
            ),
        );
        self.scheduler.cast(SchedulerMsg::Enqueue {
            job_id: s.job_id.clone(),
            tasks: ids,
            job: myself.clone(),
        })?;
        Ok(())
    }

    /// A replica's task ended: the coordinator hears of a lost replica; one that failed for
    /// good is replaced by a new task (the coordinator's failure budget bounds this).
    pub(super) fn train_task_ended(
        &self,
        myself: &ActorRef<JobMsg>,
        s: &mut JobActorState,
        task_id: TaskId,
        end: TaskEnd,
    ) {
        let Some(trainer) = s.trainer.as_mut() else {
            return;
        };
        let (reason, replace) = match end {
            TaskEnd::Succeeded { worker_id, .. } => {
                self.log(s, format!("replica {task_id} on {worker_id} ended"));
                return;
            }
            TaskEnd::Retrying(reason) => (reason, false),
            TaskEnd::Failed(reason) => (reason, true),
        };
        let _ = trainer.coordinator.cast(crate::train::CoordMsg::Event(
            crate::train::CoordEvent::TaskLost {
                task_id: task_id.clone(),
                reason: reason.clone(),
            },
        ));
        if replace {
            trainer.tasks += 1;
            let new_id = replica_task(trainer.tasks);
            let spec = match &s.spec.kind {
                Some(Kind::Train(spec)) => spec.clone(),
                _ => return,
            };
            let inserted = self
                .ctx
                .store
                .insert_tasks(&s.job_id, &[(new_id.clone(), train_assignment(&spec))]);
            if inserted.is_ok() {
                self.log(
                    s,
                    format!("replica {task_id} failed ({reason}); {new_id} will replace it when a worker is free"),
                );
                let _ = self.scheduler.cast(SchedulerMsg::Enqueue {
                    job_id: s.job_id.clone(),
                    tasks: vec![new_id],
                    job: myself.clone(),
                });
            }
        } else {
            self.log(s, format!("replica {task_id} will run again: {reason}"));
        }
    }
}

/// How often an elastic training job looks for new workers.
pub(super) const GROW_EVERY: Duration = Duration::from_secs(2);

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
