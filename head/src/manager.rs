//! The job manager actor: it records submitted jobs, spawns one supervised
//! [job actor](crate::job) per job, routes cancellations, and after a head restart resumes
//! every job that had not ended. A job actor that fails (panics) ends its job FAILED with
//! the cause, so no job stays RUNNING forever.

use std::collections::HashMap;

use medray_proto::v1::{Job, JobSpec, JobState};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use ractor_cluster::RactorMessage;

use crate::context::HeadContext;
use crate::ids::JobId;
use crate::job::{JobHandles, JobMsg};
use crate::registry::RegistryMsg;
use crate::scheduler::SchedulerMsg;
use crate::{HeadError, Result};

/// The job manager.
#[derive(Debug)]
pub struct JobManager {
    /// Shared handles.
    pub ctx: HeadContext,
    /// The scheduler.
    pub scheduler: ActorRef<SchedulerMsg>,
    /// The registry.
    pub registry: ActorRef<RegistryMsg>,
}

/// Messages of the job manager.
#[derive(RactorMessage)]
pub enum ManagerMsg {
    /// Record and start a job (spec already validated; boxed, specs are large).
    Submit(Box<JobSpec>, RpcReplyPort<Result<Job>>),
    /// Cancel a job.
    Cancel(JobId, RpcReplyPort<Result<Job>>),
    /// The training coordinator of a running training job (None: no such job now).
    Coordinator(
        JobId,
        RpcReplyPort<Option<ActorRef<crate::train::CoordMsg>>>,
    ),
}

impl std::fmt::Debug for ManagerMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Submit(..) => f.write_str("Submit"),
            Self::Cancel(id, _) => write!(f, "Cancel({id})"),
            Self::Coordinator(id, _) => write!(f, "Coordinator({id})"),
        }
    }
}

/// Manager state: the live job actors.
#[derive(Debug, Default)]
pub struct ManagerState {
    jobs: HashMap<JobId, ActorRef<JobMsg>>,
    by_actor: HashMap<ractor::ActorId, JobId>,
}

pub use crate::job::kind_of;

impl JobManager {
    async fn spawn_job(
        &self,
        myself: &ActorRef<ManagerMsg>,
        state: &mut ManagerState,
        job_id: JobId,
        spec: JobSpec,
        resumed: bool,
    ) -> Result<()> {
        if spec.kind.is_none() {
            // Submissions are validated; only a damaged stored spec gets here.
            self.ctx
                .store
                .set_job_state(&job_id, JobState::Failed, "spec.kind: missing")?;
            return Ok(());
        }
        let handles = JobHandles {
            ctx: self.ctx.clone(),
            scheduler: self.scheduler.clone(),
            registry: self.registry.clone(),
        };
        let job_ref =
            crate::job::spawn(handles, job_id.clone(), spec, resumed, myself.get_cell()).await?;
        state.by_actor.insert(job_ref.get_id(), job_id.clone());
        state.jobs.insert(job_id, job_ref);
        Ok(())
    }

    fn job_actor_gone(&self, state: &mut ManagerState, cell: &ActorCell, cause: Option<String>) {
        let Some(job_id) = state.by_actor.remove(&cell.get_id()) else {
            return;
        };
        state.jobs.remove(&job_id);
        if let Some(cause) = cause {
            let reason = format!("the job's actor failed: {cause}");
            if self
                .ctx
                .store
                .end_job(
                    &job_id,
                    JobState::Failed,
                    &reason,
                    &format!("job FAILED: {reason}"),
                )
                .unwrap_or(false)
            {
                self.ctx.logs.wake();
                let _ = self.ctx.store.cancel_tasks(&job_id);
                let _ = self.scheduler.cast(SchedulerMsg::CancelJob(job_id));
            }
        }
    }
}

impl Actor for JobManager {
    type Msg = ManagerMsg;
    type State = ManagerState;
    type Arguments = ();

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        (): (),
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut state = ManagerState::default();
        for job in self.ctx.store.unfinished_jobs()? {
            let id = JobId(job.id.clone());
            let Some(spec) = job.spec.clone() else {
                self.ctx.store.set_job_state(
                    &id,
                    JobState::Failed,
                    "its stored spec cannot be read",
                )?;
                continue;
            };
            let resumed = job.state == JobState::Running as i32;
            tracing::info!(job_id = %id, resumed, "recovering an unfinished job");
            self.spawn_job(&myself, &mut state, id, spec, resumed)
                .await?;
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ManagerMsg::Submit(spec, reply) => {
                let mut spec = *spec;
                let result = async {
                    crate::job::prepare(&self.ctx, &mut spec)?;
                    let job = self.ctx.store.insert_job(kind_of(&spec), &spec, "queued")?;
                    let id = JobId(job.id.clone());
                    self.ctx
                        .logs
                        .line(&id, format!("job {id} submitted ({})", job.kind));
                    self.ctx.metrics.jobs_submitted.inc();
                    self.spawn_job(&myself, state, id, spec, false).await?;
                    Ok(job)
                }
                .await;
                let _ = reply.send(result);
            }
            ManagerMsg::Cancel(id, reply) => {
                let result = async {
                    let job = self
                        .ctx
                        .store
                        .job(&id)?
                        .ok_or_else(|| HeadError::NotFound {
                            what: "job",
                            id: id.to_string(),
                        })?;
                    if let Some(actor) = state.jobs.get(&id) {
                        actor
                            .call(JobMsg::Cancel, Some(std::time::Duration::from_secs(10)))
                            .await?
                            .success_or_else(|| {
                                HeadError::Actor("the job actor did not answer".into())
                            })??;
                    } else if !JobState::try_from(job.state).is_ok_and(JobState::is_terminal) {
                        self.ctx.store.set_job_state(
                            &id,
                            JobState::Cancelled,
                            "cancelled by the user",
                        )?;
                    }
                    self.ctx.store.job(&id)?.ok_or_else(|| HeadError::NotFound {
                        what: "job",
                        id: id.to_string(),
                    })
                }
                .await;
                let _ = reply.send(result);
            }
            ManagerMsg::Coordinator(id, reply) => match state.jobs.get(&id) {
                // The job answers the caller directly; the manager does not wait.
                Some(job) => {
                    if let Err(ractor::MessagingErr::SendErr(JobMsg::Coordinator(reply))) =
                        job.cast(JobMsg::Coordinator(reply))
                    {
                        let _ = reply.send(None);
                    }
                }
                None => {
                    let _ = reply.send(None);
                }
            },
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                self.job_actor_gone(state, &cell, None)
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                self.job_actor_gone(state, &cell, Some(err.to_string()));
            }
            _ => {}
        }
        Ok(())
    }
}
