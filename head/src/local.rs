//! Training in one process (`medray train-local`): the cluster's coordinator, step state
//! machine and checkpointer, driving one replica in this process over channels, on a data
//! directory of its own (job table, catalog, registry and a local stage, laid out like a
//! head's). There is no server, scheduler or worker registry: the job has exactly one
//! replica, which the caller runs (`medray_worker::train::run_in_process`).
//!
//! A run is a training job like any other: its checkpoints, `state.json` and registered
//! model are where a head would put them, and running the same job again resumes it from
//! its last checkpoint (the coordinator's head-restart path).

use std::path::Path;
use std::sync::Arc;

use medray_core::catalog::Catalog;
use medray_core::stage::{Stage, StageLocation};
use medray_proto::v1::job_spec::Kind;
use medray_proto::v1::{JobSpec, JobState, TrainDown, TrainSpec, TrainUp};
use tokio::sync::mpsc;
use tonic::Status;

use crate::config::HeadConfig;
use crate::context::HeadContext;
use crate::ids::{JobId, TaskId, WorkerId};
use crate::logs::LogHub;
use crate::metrics::Metrics;
pub use crate::store::LogRow;
use crate::store::Store;
use crate::train::{CoordEvent, CoordinatorArgs, Member};
use crate::Result;

/// How long the coordinator may go on after its replica failed.
const REPLICA_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// The replica's ends of its link to the coordinator.
#[derive(Debug)]
pub struct ReplicaEnds {
    /// What the coordinator sends.
    pub down: mpsc::Receiver<std::result::Result<TrainDown, Status>>,
    /// Where the replica's messages go.
    pub up: mpsc::Sender<TrainUp>,
}

/// A data directory for training in one process.
#[derive(Debug, Clone)]
pub struct LocalTrainer {
    ctx: HeadContext,
}

impl LocalTrainer {
    /// Opens (creating) the data directory `dir`: `catalog.db` (jobs, logs, catalog,
    /// registry) and `stage/`, unencrypted (the folder is the user's own).
    ///
    /// # Errors
    /// I/O or store errors naming the path.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|source| crate::HeadError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        let config = Arc::new(HeadConfig::default().with_data_dir(dir));
        let catalog_path = dir.join("catalog.db");
        let store = Arc::new(Store::open(&catalog_path)?);
        let stage = Stage::open(StageLocation::Local(dir.join("stage")), None)?;
        Ok(Self {
            ctx: HeadContext {
                config,
                logs: Arc::new(LogHub::new(store.clone())),
                store,
                stage: Arc::new(stage),
                catalog_path,
                metrics: Arc::new(Metrics::default()),
                sessions: Arc::default(),
            },
        })
    }

    /// The stage (inputs, checkpoints, registered weights).
    #[must_use]
    pub fn stage(&self) -> Arc<Stage> {
        self.ctx.stage.clone()
    }

    /// A catalog connection.
    ///
    /// # Errors
    /// [`crate::HeadError::Core`].
    pub fn catalog(&self) -> Result<Catalog> {
        self.ctx.catalog()
    }

    /// The job logs (to follow a run).
    #[must_use]
    pub fn logs(&self) -> Arc<LogHub> {
        self.ctx.logs.clone()
    }

    /// Records a new training job.
    ///
    /// # Errors
    /// [`crate::HeadError::Store`].
    pub fn new_job(&self, spec: TrainSpec) -> Result<JobId> {
        let spec = JobSpec {
            kind: Some(Kind::Train(spec)),
        };
        let job = self.ctx.store.insert_job("train", &spec, "")?;
        Ok(JobId(job.id))
    }

    /// The spec a job was recorded with.
    ///
    /// # Errors
    /// [`crate::HeadError::NotFound`] for an unknown job or one that is not a training job.
    pub fn spec(&self, job: &JobId) -> Result<TrainSpec> {
        let not_found = || crate::HeadError::NotFound {
            what: "training job",
            id: job.to_string(),
        };
        match self
            .ctx
            .store
            .job(job)?
            .and_then(|j| j.spec)
            .and_then(|s| s.kind)
        {
            Some(Kind::Train(spec)) => Ok(spec),
            _ => Err(not_found()),
        }
    }

    /// The job's last committed state (`None` before the first epoch ends).
    ///
    /// # Errors
    /// Stage errors naming the key.
    pub async fn committed_state(
        &self,
        job: &JobId,
    ) -> Result<Option<medray_core::train::dist::DistState>> {
        crate::train::load_committed_state(&self.ctx, job).await
    }

    /// The job's last committed checkpoint: its state, the checkpoint's weights, and the
    /// best weights so far (`None` before the first epoch ends).
    ///
    /// # Errors
    /// Stage or store errors naming the key.
    pub async fn committed(
        &self,
        job: &JobId,
    ) -> Result<Option<(medray_core::train::dist::DistState, Vec<u8>, Vec<u8>)>> {
        let Some(state) = self.committed_state(job).await? else {
            return Ok(None);
        };
        let weights = crate::train::checkpoint_weights(&self.ctx, job, &state).await?;
        let best = match &state.best_weights {
            Some(key) => {
                self.ctx
                    .stage
                    .get(&medray_core::stage::ObjectKey::new(key.clone())?)
                    .await?
            }
            None => weights.clone(),
        };
        Ok(Some((state, weights, best)))
    }

    /// Runs `job` (new, or again: it resumes from its last checkpoint) with one replica that
    /// `replica` starts on the ends it is given (its task says how the replica ended); the
    /// job's result JSON or why it failed. A replica that fails fails the job (there is no
    /// other worker to wait for). The job's state and its last log line are recorded as a
    /// head records them.
    ///
    /// # Errors
    /// A store error; the training's own failure is the `Err` inside.
    pub async fn run(
        &self,
        job: &JobId,
        spec: TrainSpec,
        replica: impl FnOnce(
            ReplicaEnds,
        ) -> tokio::task::JoinHandle<std::result::Result<String, String>>,
    ) -> Result<std::result::Result<String, String>> {
        let store = &self.ctx.store;
        // A run that was interrupted (the process died) stays RUNNING in the table; it is
        // the same job that runs again.
        store.set_job_state(job, JobState::Running, "")?;
        let (inbox_tx, inbox) = mpsc::unbounded_channel();
        let (down_tx, down) = mpsc::channel(64);
        let (up, mut up_rx) = mpsc::channel::<TrainUp>(256);
        const MEMBER: u64 = 1;
        let _ = inbox_tx.send(CoordEvent::Join(Member {
            id: MEMBER,
            worker_id: WorkerId("in-process".into()),
            task_id: TaskId("r001".into()),
            down: down_tx,
        }));
        // Held until the end: the coordinator hears the replica leave, not its inbox close.
        let keep_open = inbox_tx.clone();
        let forward = tokio::spawn(async move {
            while let Some(TrainUp { msg }) = up_rx.recv().await {
                let Some(msg) = msg else { continue };
                if inbox_tx
                    .send(CoordEvent::Up {
                        member: MEMBER,
                        msg,
                        held: None,
                    })
                    .is_err()
                {
                    return;
                }
            }
            let _ = inbox_tx.send(CoordEvent::Gone {
                member: MEMBER,
                reason: "the in-process replica stopped".into(),
            });
        });
        let mut replica = replica(ReplicaEnds { down, up });
        let args = CoordinatorArgs {
            ctx: self.ctx.clone(),
            job_id: job.clone(),
            spec,
            replicas: 1,
        };
        let training = crate::train::run(args, inbox);
        tokio::pin!(training);
        let result = tokio::select! {
            result = &mut training => result,
            ended = &mut replica => {
                let why = match ended {
                    Ok(Ok(_)) => None,
                    Ok(Err(reason)) => Some(reason),
                    Err(e) => Some(format!("it panicked: {e}")),
                };
                match why {
                    // It ended its part; the coordinator ends the job.
                    None => training.await,
                    // The coordinator has a moment to record what it was doing.
                    Some(why) => match tokio::time::timeout(REPLICA_GRACE, &mut training).await {
                        Ok(result) => result,
                        Err(_) => Err(format!("the in-process replica stopped: {why}")),
                    },
                }
            }
        };
        forward.abort();
        drop(keep_open);
        let (state, reason) = match &result {
            Ok(json) => {
                store.set_job_result(job, json)?;
                (JobState::Succeeded, String::new())
            }
            Err(reason) => (JobState::Failed, reason.clone()),
        };
        store.end_job(job, state, &reason, &crate::job::end_line(state, &reason))?;
        self.ctx.logs.wake();
        Ok(result)
    }
}
