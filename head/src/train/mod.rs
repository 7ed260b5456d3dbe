//! Data-parallel training: the coordinator of one training job.
//!
//! Each replica (a worker running the job's `TrainTask`) opens a `Train` stream to the head;
//! the service hands it to this job's coordinator (an actor linked under the job's actor,
//! `actor.rs`, owning the loop below) that drives every replica through the same sequence:
//!
//! 1. **Admission** (`members.rs`; at the start and at each epoch boundary): `TrainInit`
//!    (config, cases, chunking), the checkpoint's weights and optimizer state when there are
//!    any, then the replica answers `TrainReady` with the step it holds and the checksum of
//!    its whole state (parameters, BatchNorm statistics and counters, Adam's moments), which
//!    must match the checkpoint's.
//! 2. **Steps** (`step.rs`): the epoch's permutation (seeded by `(seed, epoch)`) is cut into
//!    global batches; each batch is split across the replicas. Each replica uploads its
//!    gradient *summed* over its cases (f64 in fp32 mode) in fixed-size chunks; as soon as
//!    chunk k has every contribution the coordinator turns it into the mean and streams it
//!    back, so the reduction is pipelined with the uploads. The round is decided by
//!    `medray_core::train::dist::round::StepRound`: once every averaged chunk is confirmed,
//!    the commit (naming epoch, step and round, with every micro-batch's BatchNorm
//!    statistics in the global order) goes to every replica, each send on its own, and the
//!    step stands; a replica lost before that aborts the round and the step runs again on the
//!    replicas left (re-sharded). Replicas apply a step only when they hold the one before,
//!    so no step is applied twice.
//! 3. **Validation** and the **epoch's end** (`epoch.rs`): validation sharded the same way;
//!    every replica must hold the same step and state checksum (divergence fails the job);
//!    one replica's state becomes the checkpoint (`checkpoint.rs`): files first, `state.json`
//!    (the one commit point, naming the best weights) last.
//! 4. **Finish** (`finish.rs`): the best weights are registered in the model registry (once:
//!    a head restarted after registering finds the version) and the replicas are told to end
//!    their tasks.
//!
//! Every wait has a deadline (`step_timeout_s`): a replica that does not answer in time is
//! dropped, like one whose worker died. When no replica is left mid-epoch the epoch starts
//! again from the last checkpoint (step counter, weights, Adam's moments and BatchNorm
//! statistics alike) as soon as a worker joins. `spec.rs` turns the spec into the config and
//! reads the checkpointed state.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use medray_core::catalog::{CaseRecord, DatasetName, StoredFile};
use medray_core::localnet::Preset;
use medray_core::optim::ReduceLrOnPlateau;
use medray_core::registration::LossPreset;
use medray_core::stage::ObjectKey;
use medray_core::train::dist::round::{
    Outcome, RoundAction, RoundEvent, RoundSpec, ShardReport, StepId, StepRound,
};
use medray_core::train::dist::{chunk_lengths, epoch_batches, shard, DistState, GradEncoding};
use medray_core::train::{history_csv, EpochSummary, TrainConfig};
use medray_proto::v1::train_down::Msg as Down;
use medray_proto::v1::train_up::Msg as Up;
use medray_proto::v1::{
    GradChunk, StageRef, StateChunk, StateKind, StepAbort, StepCommit, TrainCase, TrainDown,
    TrainInit, TrainSpec, TrainStep, ValCase, ValidateCmd,
};
use tokio::sync::mpsc;
use tonic::Status;

use crate::context::HeadContext;
use crate::ids::{JobId, TaskId, WorkerId};
use crate::{HeadError, Result};

mod actor;
mod checkpoint;
mod epoch;
mod finish;
pub(crate) mod inbox;
mod members;
mod spec;
mod step;

pub use actor::{CoordActorArgs, CoordMsg, TrainCoordinator};
pub(crate) use spec::{checkpoint_weights, load_committed_state, load_state};
use spec::{fresh_state, job_key};
pub use spec::{state_key, train_config};

/// Stage key (under `jobs/<job>/`) of the best weights of states written before
/// `DistState::best_weights` named them.
const BEST_WEIGHTS: &str = "best/weights.safetensors";

/// Stage key (under `jobs/<job>/`) of the best weights of the job this one resumed.
const RESUMED_BEST_WEIGHTS: &str = "best/resumed.safetensors";

/// Room left in a message for everything but a chunk's payload, bytes.
const MESSAGE_OVERHEAD: usize = 64 * 1024;

/// A replica's stream, as the coordinator holds it.
#[derive(Debug)]
pub struct Member {
    /// Unique per stream.
    pub id: u64,
    /// The worker running it.
    pub worker_id: WorkerId,
    /// The task (replica slot) it runs.
    pub task_id: TaskId,
    /// Messages to the replica; dropping it ends the stream.
    pub down: mpsc::Sender<std::result::Result<TrainDown, Status>>,
}

/// What reaches a coordinator.
#[derive(Debug)]
pub enum CoordEvent {
    /// A replica opened its stream.
    Join(Member),
    /// A message from a replica.
    Up {
        /// The stream.
        member: u64,
        /// The message.
        msg: Up,
        /// Its share of the coordinator's inbox budget (`train::inbox`), given back when the
        /// event is dropped, i.e. processed; `None` in process (`medray train-local`).
        held: Option<tokio::sync::OwnedSemaphorePermit>,
    },
    /// A replica's stream ended or broke.
    Gone {
        /// The stream.
        member: u64,
        /// Why.
        reason: String,
    },
    /// The scheduler gave up on a replica's attempt (worker lost or task failed).
    TaskLost {
        /// The task.
        task_id: TaskId,
        /// Why.
        reason: String,
    },
}

/// Why a phase did not complete.
#[derive(Debug)]
enum Interrupt {
    /// A replica was lost; the phase can run again on the others.
    Lost,
    /// The job cannot go on.
    Fatal(String),
}

impl From<HeadError> for Interrupt {
    fn from(e: HeadError) -> Self {
        Self::Fatal(e.to_string())
    }
}

impl From<medray_core::Error> for Interrupt {
    fn from(e: medray_core::Error) -> Self {
        Self::Fatal(e.to_string())
    }
}

type Phase<T> = std::result::Result<T, Interrupt>;

/// What a coordinator waits on.
enum Event {
    Msg(u64, Up),
    Timeout,
}

/// Per-step timings, for the epoch line.
#[derive(Debug, Default, Clone, Copy)]
struct StepTimes {
    compute_ms: f64,
    allreduce_ms: f64,
    step_ms: f64,
}

/// Everything the coordinator needs to start.
#[derive(Debug)]
pub struct CoordinatorArgs {
    /// Shared handles.
    pub ctx: HeadContext,
    /// The job.
    pub job_id: JobId,
    /// Its spec.
    pub spec: TrainSpec,
    /// Replicas to wait for before the first step.
    pub replicas: usize,
}

struct Coordinator {
    ctx: HeadContext,
    job_id: JobId,
    spec: TrainSpec,
    replicas: usize,
    inbox: mpsc::UnboundedReceiver<CoordEvent>,
    members: Vec<Member>,
    joining: Vec<Member>,
    dataset: String,
    train_cases: Vec<TrainCase>,
    val_cases: Vec<TrainCase>,
    encoding: GradEncoding,
    chunk_floats: usize,
    state_chunk_bytes: usize,
    step_timeout: Duration,
    failures: u32,
    max_failures: u32,
    num_params: Option<usize>,
    /// The whole-state checksum all replicas must have now (None: not known yet).
    state_sha: Option<String>,
    /// Values in one micro-batch's BatchNorm statistics (None: no replica admitted yet).
    bn_batch_len: Option<usize>,
    /// The last optimizer step committed (`state.step` is the last checkpointed one).
    live_step: u64,
    /// Members lost since the current round started (the round hears of them).
    lost_now: Vec<u64>,
    state: DistState,
    /// Weights and optimizer state at the last checkpoint (None: the seed's initialisation).
    checkpoint: Option<(Vec<u8>, Vec<u8>)>,
    /// Attempts of collective phases so far (see `TrainStep.round`).
    round: u64,
    /// The job is over: replicas leaving now are not failures.
    finishing: bool,
}

/// Runs a training job to its end, hearing from the replicas through `inbox`: `Ok(result
/// JSON)` or `Err(reason)`.
pub(crate) async fn run(
    args: CoordinatorArgs,
    inbox: mpsc::UnboundedReceiver<CoordEvent>,
) -> std::result::Result<String, String> {
    let mut c = match Coordinator::new(args, inbox).await {
        Ok(c) => c,
        Err(e) => return Err(e.to_string()),
    };
    let result = c.run().await;
    // Whatever happened, the replicas' streams end here.
    c.members.clear();
    c.joining.clear();
    result
}

impl Coordinator {
    async fn new(
        args: CoordinatorArgs,
        inbox: mpsc::UnboundedReceiver<CoordEvent>,
    ) -> Result<Self> {
        let CoordinatorArgs {
            ctx,
            job_id,
            spec,
            replicas,
        } = args;
        let encoding = GradEncoding::parse(&spec.grad_compression)
            .map_err(|e| HeadError::invalid("spec.train.grad_compression", e.to_string()))?;
        let payload = ctx
            .config
            .chunk_bytes
            .min(
                ctx.config
                    .max_message_bytes
                    .saturating_sub(MESSAGE_OVERHEAD),
            )
            .max(1024);
        // The state this job continues from: its own (head restart), the job it resumes, or
        // none.
        let own = load_state(&ctx, &job_id).await?;
        let resumed_from = if own.is_none() && !spec.resume_from.is_empty() {
            let from = JobId(spec.resume_from.clone());
            let (mut state, weights, optimizer) =
                load_state(&ctx, &from).await?.ok_or_else(|| {
                    HeadError::invalid(
                        "spec.train.resume_from",
                        format!("job {from} has no checkpoint to resume from"),
                    )
                })?;
            // The best weights so far come along (this job registers the best of both),
            // copied into this job so that it does not depend on the other one's files.
            let best = match &state.best_weights {
                Some(key) => ObjectKey::new(key.clone())?,
                None => job_key(&from, BEST_WEIGHTS)?,
            };
            state.best_weights = None;
            if ctx.stage.exists(&best).await? {
                let bytes = ctx.stage.get(&best).await?;
                let copy = job_key(&job_id, RESUMED_BEST_WEIGHTS)?;
                ctx.stage.put(&copy, &bytes).await?;
                state.best_weights = Some(copy.as_str().to_string());
            }
            Some((state, weights, optimizer))
        } else {
            None
        };
        let (state, checkpoint) = match own.or(resumed_from) {
            Some((mut state, weights, optimizer)) => {
                // The recorded config wins, except the number of epochs.
                if spec.epochs > 0 {
                    state.config.epochs = spec.epochs as usize;
                }
                (state, Some((weights, optimizer)))
            }
            None => (fresh_state(&ctx, &spec)?, None),
        };
        let dataset = DatasetName::new(state.dataset.clone())?;
        let records = ctx.catalog()?.cases(&dataset)?;
        let by_id: HashMap<&str, &CaseRecord> =
            records.iter().map(|r| (r.case_id.as_str(), r)).collect();
        let refs = |ids: &[String], keypoints: bool| -> Result<Vec<TrainCase>> {
            ids.iter()
                .map(|id| {
                    by_id
                        .get(id.as_str())
                        .map(|r| train_case(r, keypoints))
                        .ok_or_else(|| {
                            HeadError::invalid(
                                "spec.train.dataset",
                                format!("dataset {dataset} has no case {id} any more"),
                            )
                        })
                })
                .collect()
        };
        let train_cases = refs(&state.train_cases, state.config.loss.needs_keypoints())?;
        let val_cases = refs(&state.val_cases, false)?;
        if let Some((what, case)) = lacking_input(state.config.loss, &train_cases) {
            return Err(HeadError::invalid(
                "spec.train.loss",
                format!(
                    "{} needs {what}, but case {case} has none",
                    state.config.loss.name()
                ),
            ));
        }
        Ok(Self {
            step_timeout: Duration::from_secs(u64::from(if spec.step_timeout_s == 0 {
                300
            } else {
                spec.step_timeout_s
            })),
            max_failures: if spec.max_failures == 0 {
                3
            } else {
                spec.max_failures
            },
            ctx,
            job_id,
            replicas: replicas.max(1),
            inbox,
            members: Vec::new(),
            joining: Vec::new(),
            dataset: state.dataset.clone(),
            train_cases,
            val_cases,
            encoding,
            chunk_floats: encoding.values_per_chunk(payload),
            state_chunk_bytes: payload,
            failures: 0,
            num_params: None,
            state_sha: state.state_sha256.clone(),
            bn_batch_len: None,
            live_step: state.step,
            lost_now: Vec::new(),
            state,
            checkpoint,
            spec,
            round: 0,
            finishing: false,
        })
    }

    fn log(&self, line: impl Into<String>) {
        self.ctx.logs.line(&self.job_id, line);
    }

    fn set_state(&self, state: medray_proto::v1::JobState, reason: &str) {
        let _ = self.ctx.store.set_job_state(&self.job_id, state, reason);
    }

    async fn run(&mut self) -> std::result::Result<String, String> {
        let config = &self.state.config;
        self.log(format!(
            "training {} on {} ({} train / {} validation cases): preset {}, loss {}, {} epochs, global batch {}, lr {:e}, size {:?}, seed {}; gradients {} in chunks of {} values",
            self.spec.model,
            self.dataset,
            self.train_cases.len(),
            self.val_cases.len(),
            match config.preset { Preset::Seed => "seed", Preset::Full => "full" },
            config.loss.name(),
            config.epochs,
            config.batch_size,
            config.lr,
            config.size,
            config.seed,
            match self.encoding { GradEncoding::F32 => "fp32", GradEncoding::F16 => "fp16", GradEncoding::Bf16 => "bf16" },
            self.chunk_floats,
        ));
        if self.state.epochs_done > 0 {
            self.log(format!(
                "resuming from the checkpoint after epoch {} (step {}, lr {:e})",
                self.state.epochs_done, self.state.step, self.state.lr
            ));
        }
        match self.train().await {
            Ok(json) => Ok(json),
            Err(Interrupt::Fatal(reason)) => Err(reason),
            Err(Interrupt::Lost) => Err("training interrupted".into()),
        }
    }

    async fn train(&mut self) -> Phase<String> {
        if self.state.epochs_done >= self.state.config.epochs {
            // Every epoch is committed (a head that restarted while the job finished; its
            // replicas may have ended already): nothing to wait for, only the end.
            self.log("every epoch is checkpointed: finishing the job");
            return self.finish().await;
        }
        self.wait_for_gang().await?;
        let first = self.state.epochs_done + 1;
        let epochs = self.state.config.epochs;
        let mut epoch = first;
        while epoch <= epochs {
            match self.epoch(epoch).await {
                Ok(()) => epoch += 1,
                Err(Interrupt::Lost) => {
                    // Every replica was lost mid-epoch: the epoch runs again from the last
                    // checkpoint once a worker joins.
                    self.log(format!(
                        "every replica was lost in epoch {epoch}: it will run again from the checkpoint after epoch {} (step {})",
                        self.state.epochs_done, self.state.step
                    ));
                    // Everything comes back from the checkpoint: the step counter here, and
                    // the weights, Adam's moments and BatchNorm statistics on the replicas
                    // that join (checked against the checkpoint's checksum).
                    self.live_step = self.state.step;
                    self.state_sha = self.state.state_sha256.clone();
                }
                Err(e) => return Err(e),
            }
        }
        self.finish().await
    }
}

/// Fault injection for the tests (inert unless `FAILPOINTS` arms it): `name=return(MS)`
/// makes the coordinator wait MS milliseconds at that point, without blocking the runtime,
/// so that a test can kill a process there. Points: `train-commit-sending` (before a step's
/// commit goes out), `train-before-commit-point` (before `state.json` is written),
/// `train-registered` (after the model is registered), `train-finish-sent` (after the
/// replicas were told to finish, before the job's end is recorded).
async fn fault_delay(name: &str) {
    let ms = fail::eval(name, |arg| arg.and_then(|a| a.parse::<u64>().ok())).flatten();
    if let Some(ms) = ms {
        tracing::warn!(failpoint = name, ms, "fault injection: waiting");
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

fn stage_ref(f: &StoredFile) -> StageRef {
    StageRef {
        key: f.key.as_str().to_string(),
        sha256: f.sha256.clone(),
    }
}

/// The first training case lacking an input that `loss` needs, with what it lacks.
fn lacking_input(loss: LossPreset, cases: &[TrainCase]) -> Option<(&'static str, &str)> {
    cases.iter().find_map(|c| {
        if loss.needs_keypoints() && c.keypoints.is_none() {
            Some(("keypoint pairs on every training case", c.id.as_str()))
        } else if loss.needs_masks() && (c.fixed_mask.is_none() || c.moving_mask.is_none()) {
            Some(("lung masks", c.id.as_str()))
        } else {
            None
        }
    })
}

/// A case for the replicas; its keypoints only with `keypoints` (training cases of an
/// objective that uses them).
fn train_case(r: &CaseRecord, keypoints: bool) -> TrainCase {
    TrainCase {
        id: r.case_id.as_str().to_string(),
        fixed: Some(stage_ref(&r.fixed)),
        moving: Some(stage_ref(&r.moving)),
        fixed_mask: r.fixed_mask.as_ref().map(stage_ref),
        moving_mask: r.moving_mask.as_ref().map(stage_ref),
        keypoints: r.keypoints.as_ref().filter(|_| keypoints).map(stage_ref),
    }
}
