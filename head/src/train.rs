//! Data-parallel training: the coordinator of one training job.
//!
//! Each replica (a worker running the job's `TrainTask`) opens a `Train` stream to the head;
//! the service hands it to this job's coordinator, a tokio task that drives every replica
//! through the same sequence:
//!
//! 1. **Admission** (at the start and at each epoch boundary): `TrainInit` (config, cases,
//!    chunking), the current weights and optimizer state when there are any, then the
//!    replica answers `TrainReady` with its parameter checksum.
//! 2. **Steps**: the epoch's permutation (seeded by `(seed, epoch)`) is cut into global
//!    batches; each batch is split across the replicas. Each replica sends its mean gradient
//!    in fixed-size chunks; as soon as chunk k has every contribution the coordinator
//!    averages it (weighted by the cases behind each contribution) and streams it back, so
//!    the reduction is pipelined with the uploads. `commit` tells every replica to apply the
//!    averaged gradient with its Adam; a replica lost before that makes the step `abort` and
//!    run again on the replicas left (re-sharded), so their states never diverge.
//! 3. **Validation**, sharded the same way; **epoch end**: parameter checksums are compared
//!    (divergence fails the job), BatchNorm running statistics are averaged and sent back,
//!    one replica's state is checkpointed to the stage (`jobs/<job>/...`).
//! 4. **Finish**: the best weights are registered in the model registry and the replicas
//!    are told to end their tasks.
//!
//! Every wait has a deadline (`step_timeout_s`): a replica that does not answer in time is
//! dropped, like one whose worker died. When no replica is left mid-epoch the epoch starts
//! again from the last checkpoint as soon as a worker joins.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use medray_core::catalog::{CaseRecord, DatasetName, StoredFile};
use medray_core::localnet::Preset;
use medray_core::optim::ReduceLrOnPlateau;
use medray_core::preprocess::Window;
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

/// Stage key (under `jobs/<job>/`) of the best weights of states written before
/// `DistState::best_weights` named them.
const BEST_WEIGHTS: &str = "best/weights.safetensors";

/// Stage key (under `jobs/<job>/`) of the best weights of the job this one resumed.
const RESUMED_BEST_WEIGHTS: &str = "best/resumed.safetensors";

/// Room left in a message for everything but a chunk's payload, bytes.
const MESSAGE_OVERHEAD: usize = 64 * 1024;

/// Where the `Train` service finds the coordinator of a job.
#[derive(Debug, Default)]
pub struct TrainDirectory {
    inner: Mutex<HashMap<JobId, mpsc::UnboundedSender<CoordEvent>>>,
}

impl TrainDirectory {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, mpsc::UnboundedSender<CoordEvent>>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `job`'s coordinator reachable.
    pub fn register(&self, job: &JobId, tx: mpsc::UnboundedSender<CoordEvent>) {
        self.lock().insert(job.clone(), tx);
    }

    /// Forgets `job`'s coordinator.
    pub fn unregister(&self, job: &JobId) {
        self.lock().remove(job);
    }

    /// The coordinator's inbox.
    pub fn get(&self, job: &JobId) -> Option<mpsc::UnboundedSender<CoordEvent>> {
        self.lock().get(job).cloned()
    }
}

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

/// The training config a spec asks for (empty fields take the quickstart's defaults).
///
/// # Errors
/// [`HeadError::InvalidArgument`] naming the field.
pub fn train_config(spec: &TrainSpec) -> Result<TrainConfig> {
    let mut c = TrainConfig::default();
    if !spec.preset.is_empty() {
        c.preset = spec
            .preset
            .parse::<Preset>()
            .map_err(|e| HeadError::invalid("spec.train.preset", e.to_string()))?;
    }
    if !spec.loss.is_empty() {
        c.loss = spec
            .loss
            .parse::<LossPreset>()
            .map_err(|e| HeadError::invalid("spec.train.loss", e.to_string()))?;
    }
    if spec.epochs > 0 {
        c.epochs = spec.epochs as usize;
    }
    if spec.batch_size > 0 {
        c.batch_size = spec.batch_size as usize;
    }
    if spec.lr != 0.0 {
        c.lr = spec.lr;
    }
    match spec.size.as_slice() {
        [] => {}
        [x, y, z] => c.size = [*x as usize, *y as usize, *z as usize],
        _ => {
            return Err(HeadError::invalid(
                "spec.train.size",
                "expected three values X Y Z",
            ))
        }
    }
    match spec.window.as_slice() {
        [] => {}
        [a, b] => {
            c.window = Window {
                a_min: *a as f32,
                a_max: *b as f32,
            }
        }
        _ => {
            return Err(HeadError::invalid(
                "spec.train.window",
                "expected two values A_MIN A_MAX",
            ))
        }
    }
    if spec.val_fraction_set {
        c.val_fraction = spec.val_fraction;
    }
    c.seed = spec.seed;
    if spec.channels > 0 {
        c.num_channel_initial = spec.channels as usize;
    }
    if spec.checkpoint_every > 0 {
        c.checkpoint_every = spec.checkpoint_every as usize;
    }
    c.validate()
        .map_err(|e| HeadError::invalid("spec.train", e.to_string()))?;
    if !(0.0..1.0).contains(&c.val_fraction) {
        return Err(HeadError::invalid(
            "spec.train.val_fraction",
            format!("must be in [0, 1), got {}", c.val_fraction),
        ));
    }
    Ok(c)
}

/// Stage keys of a job's training state.
fn job_key(job: &JobId, rest: &str) -> Result<ObjectKey> {
    Ok(ObjectKey::new(format!("jobs/{}/{rest}", job.as_str()))?)
}

/// The stage key of a job's checkpoint commit point.
///
/// # Errors
/// [`HeadError::Core`] for an invalid job id.
pub fn state_key(job: &JobId) -> Result<ObjectKey> {
    job_key(job, "state.json")
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
    /// Its inbox (the sender is in the [`TrainDirectory`]).
    pub inbox: mpsc::UnboundedReceiver<CoordEvent>,
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

/// Runs a training job to its end: `Ok(result JSON)` or `Err(reason)`.
pub async fn run(args: CoordinatorArgs) -> std::result::Result<String, String> {
    let job_id = args.job_id.clone();
    let ctx = args.ctx.clone();
    let mut c = match Coordinator::new(args).await {
        Ok(c) => c,
        Err(e) => return Err(e.to_string()),
    };
    let result = c.run().await;
    // Whatever happened, the replicas' streams end here.
    c.members.clear();
    c.joining.clear();
    ctx.trainers.unregister(&job_id);
    result
}

impl Coordinator {
    async fn new(args: CoordinatorArgs) -> Result<Self> {
        let CoordinatorArgs {
            ctx,
            job_id,
            spec,
            replicas,
            inbox,
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

    /// Waits until `replicas` replicas have joined (or the gang timeout passed with at least
    /// one), then admits them.
    async fn wait_for_gang(&mut self) -> Phase<()> {
        let timeout = Duration::from_secs(u64::from(if self.spec.gang_timeout_s == 0 {
            60
        } else {
            self.spec.gang_timeout_s
        }));
        let started = Instant::now();
        let mut said = 0;
        loop {
            let joined = self.joining.len();
            if joined >= self.replicas || (joined > 0 && started.elapsed() >= timeout) {
                break;
            }
            if joined != said {
                self.log(format!("{joined} of {} replica(s) joined", self.replicas));
                said = joined;
            }
            let deadline = Instant::now() + Duration::from_millis(500);
            if let Event::Msg(..) = self.recv(deadline).await? {}
        }
        if self.joining.len() < self.replicas {
            self.log(format!(
                "starting with {} of {} replica(s) after waiting {:.0} s",
                self.joining.len(),
                self.replicas,
                timeout.as_secs_f64()
            ));
        }
        self.admit().await
    }

    /// Receives the next relevant event before `deadline`. Joins are queued for the next
    /// admission; a lost member is removed and reported as [`Interrupt::Lost`].
    async fn recv(&mut self, deadline: Instant) -> Phase<Event> {
        loop {
            let event = match tokio::time::timeout_at(deadline.into(), self.inbox.recv()).await {
                Err(_) => return Ok(Event::Timeout),
                Ok(None) => return Err(Interrupt::Fatal("the coordinator's inbox closed".into())),
                Ok(Some(e)) => e,
            };
            match event {
                CoordEvent::Join(m) => {
                    self.log(format!(
                        "replica {} joined on worker {}",
                        m.task_id, m.worker_id
                    ));
                    self.joining.push(m);
                }
                CoordEvent::Up { member, msg } => {
                    if let Up::Error(reason) = &msg {
                        if self.is_member(member) || self.joining.iter().any(|m| m.id == member) {
                            let reason = format!("it reported: {reason}");
                            if self.lose(member, &reason)? {
                                return Err(Interrupt::Lost);
                            }
                        }
                        continue;
                    }
                    if self.is_member(member) || self.joining.iter().any(|m| m.id == member) {
                        return Ok(Event::Msg(member, msg));
                    }
                }
                CoordEvent::Gone { member, reason } => {
                    if self.lose(member, &reason)? {
                        return Err(Interrupt::Lost);
                    }
                }
                CoordEvent::TaskLost { task_id, reason } => {
                    let ids: Vec<u64> = self
                        .members
                        .iter()
                        .chain(&self.joining)
                        .filter(|m| m.task_id == task_id)
                        .map(|m| m.id)
                        .collect();
                    let mut lost = false;
                    for id in ids {
                        lost |= self.lose(id, &reason)?;
                    }
                    if lost {
                        return Err(Interrupt::Lost);
                    }
                }
            }
        }
    }

    fn is_member(&self, id: u64) -> bool {
        self.members.iter().any(|m| m.id == id)
    }

    /// Drops a replica. True when it was an active member (the phase must stop); counts
    /// the failure and fails the job past `max_failures`.
    fn lose(&mut self, id: u64, reason: &str) -> Phase<bool> {
        if let Some(i) = self.joining.iter().position(|m| m.id == id) {
            let m = self.joining.remove(i);
            self.log(format!(
                "replica {} on worker {} left before it was admitted: {reason}",
                m.task_id, m.worker_id
            ));
            return Ok(false);
        }
        let Some(i) = self.members.iter().position(|m| m.id == id) else {
            return Ok(false);
        };
        let m = self.members.remove(i);
        if self.finishing {
            return Ok(false);
        }
        self.lost_now.push(id);
        self.failures += 1;
        self.log(format!(
            "replica {} on worker {} evicted at epoch {}, step {}: {reason} ({} replica(s) left; failure {} of at most {})",
            m.task_id,
            m.worker_id,
            self.state.epochs_done + 1,
            self.live_step + 1,
            self.members.len(),
            self.failures,
            self.max_failures
        ));
        self.ctx.metrics.train_replicas_lost.inc();
        if self.failures > self.max_failures {
            return Err(Interrupt::Fatal(format!(
                "gave up after {} replica failures (max_failures {}); the last: worker {}: {reason}",
                self.failures, self.max_failures, m.worker_id
            )));
        }
        Ok(true)
    }

    /// Sends to one member; a member that cannot take it within the step timeout is lost.
    async fn send(&mut self, id: u64, msg: Down) -> Phase<()> {
        let Some(m) = self
            .members
            .iter()
            .chain(&self.joining)
            .find(|m| m.id == id)
        else {
            return Ok(());
        };
        let down = m.down.clone();
        let sent = down
            .send_timeout(Ok(TrainDown { msg: Some(msg) }), self.step_timeout)
            .await;
        if let Err(e) = sent {
            let reason = match e {
                mpsc::error::SendTimeoutError::Timeout(_) => format!(
                    "did not read its stream for {:.0} s",
                    self.step_timeout.as_secs_f64()
                ),
                mpsc::error::SendTimeoutError::Closed(_) => "its stream closed".to_string(),
            };
            if self.lose(id, &reason)? {
                return Err(Interrupt::Lost);
            }
        }
        Ok(())
    }

    async fn broadcast(&mut self, msg: Down) -> Phase<()> {
        let ids: Vec<u64> = self.members.iter().map(|m| m.id).collect();
        for id in ids {
            self.send(id, msg.clone()).await?;
        }
        Ok(())
    }

    /// Drops the members in `pending` that did not answer before the deadline.
    fn time_out(&mut self, pending: &HashSet<u64>, what: &str) -> Phase<()> {
        let secs = self.step_timeout.as_secs_f64();
        let mut lost = false;
        for id in pending.clone() {
            lost |= self.lose(id, &format!("no answer to {what} within {secs:.0} s"))?;
        }
        if lost {
            Err(Interrupt::Lost)
        } else {
            Ok(())
        }
    }

    /// Brings the replicas that joined into the job: config and cases, the current state,
    /// then each must report the expected parameter checksum.
    async fn admit(&mut self) -> Phase<()> {
        if self.joining.is_empty() {
            return Ok(());
        }
        let config_json = serde_json::to_string(&self.state.config)
            .map_err(|e| Interrupt::Fatal(format!("config: {e}")))?;
        let init = TrainInit {
            config_json,
            train: self.train_cases.clone(),
            val: self.val_cases.clone(),
            chunk_floats: self.chunk_floats as u32,
            encoding: match self.encoding {
                GradEncoding::F32 => medray_proto::v1::GradEncoding::F32,
                GradEncoding::F16 => medray_proto::v1::GradEncoding::F16,
                GradEncoding::Bf16 => medray_proto::v1::GradEncoding::Bf16,
            } as i32,
            with_state: self.checkpoint.is_some(),
            step: self.state.step,
            micro_batch: self.spec.micro_batch,
            state_chunk_bytes: self.state_chunk_bytes as u32,
        };
        let newcomers: Vec<u64> = self.joining.iter().map(|m| m.id).collect();
        for &id in &newcomers {
            self.send(id, Down::Init(init.clone())).await?;
            if let Some((weights, optimizer)) = self.checkpoint.clone() {
                for (kind, bytes) in [
                    (StateKind::Weights, weights),
                    (StateKind::Optimizer, optimizer),
                ] {
                    for piece in bytes.chunks(self.state_chunk_bytes) {
                        self.send(
                            id,
                            Down::State(StateChunk {
                                kind: kind as i32,
                                total: bytes.len() as u64,
                                data: piece.to_vec(),
                            }),
                        )
                        .await?;
                    }
                }
            }
        }
        let mut pending: HashSet<u64> = newcomers.iter().copied().collect();
        let deadline = Instant::now() + self.step_timeout;
        while !pending.is_empty() {
            match self.recv(deadline).await {
                Ok(Event::Msg(id, Up::Ready(ready))) if pending.remove(&id) => {
                    let n = ready.num_params as usize;
                    if *self.num_params.get_or_insert(n) != n {
                        self.lose_joiner(
                            id,
                            &format!(
                                "it has {n} parameters, expected {}",
                                self.num_params.unwrap_or(0)
                            ),
                        );
                        continue;
                    }
                    if ready.step != self.state.step {
                        self.lose_joiner(
                            id,
                            &format!("it holds step {}, expected {}", ready.step, self.state.step),
                        );
                        continue;
                    }
                    let bn = ready.bn_batch_len as usize;
                    if *self.bn_batch_len.get_or_insert(bn) != bn {
                        self.lose_joiner(
                            id,
                            &format!(
                                "its batch-norm statistics have {bn} values, expected {}",
                                self.bn_batch_len.unwrap_or(0)
                            ),
                        );
                        continue;
                    }
                    let expected = self.state_sha.get_or_insert(ready.state_sha256.clone());
                    if *expected != ready.state_sha256 {
                        let expected = expected.clone();
                        self.lose_joiner(
                            id,
                            &format!(
                                "its state's checksum {} differs from the job's {expected}",
                                ready.state_sha256
                            ),
                        );
                        continue;
                    }
                    if let Some(i) = self.joining.iter().position(|m| m.id == id) {
                        let m = self.joining.remove(i);
                        self.log(format!(
                            "replica {} on worker {} ({}) admitted: {} parameters, cases loaded in {:.1} s",
                            m.task_id,
                            m.worker_id,
                            ready.device,
                            ready.num_params,
                            ready.load_ms / 1e3
                        ));
                        self.members.push(m);
                    }
                }
                Ok(Event::Msg(..)) => {}
                Ok(Event::Timeout) => {
                    for id in pending.drain() {
                        self.lose_joiner(id, "it did not load its cases in time");
                    }
                }
                // A member lost while admitting others: the epoch has not started yet.
                Err(Interrupt::Lost) => {}
                Err(e) => return Err(e),
            }
            pending.retain(|id| self.joining.iter().any(|m| m.id == *id));
        }
        // Replicas that joined during the admission wait for the next one.
        Ok(())
    }

    fn lose_joiner(&mut self, id: u64, reason: &str) {
        if let Some(i) = self.joining.iter().position(|m| m.id == id) {
            let m = self.joining.remove(i);
            self.log(format!(
                "replica {} on worker {} refused: {reason}",
                m.task_id, m.worker_id
            ));
        }
    }

    /// Waits until at least one replica is active, admitting joiners (the job shows
    /// PENDING with the reason meanwhile).
    async fn ensure_members(&mut self) -> Phase<()> {
        if !self.members.is_empty() {
            return Ok(());
        }
        let reason = "waiting for a worker: no training replica is left";
        self.set_state(medray_proto::v1::JobState::Pending, reason);
        self.log(reason);
        while self.members.is_empty() {
            if self.joining.is_empty() {
                let deadline = Instant::now() + Duration::from_millis(500);
                let _ = self.recv(deadline).await?;
            } else {
                self.admit().await?;
            }
        }
        self.set_state(medray_proto::v1::JobState::Running, "");
        Ok(())
    }

    /// One epoch: steps, validation, epoch end, checkpoint.
    async fn epoch(&mut self, epoch: usize) -> Phase<()> {
        // Joiners come in at the boundary, with the checkpoint's state.
        self.admit().await?;
        self.ensure_members().await?;
        let started = Instant::now();
        let config = self.state.config.clone();
        let lr = self.state.lr;
        let batches = epoch_batches(
            self.train_cases.len(),
            config.seed,
            epoch,
            config.batch_size,
        );
        let steps = batches.len();
        let mut step = self.state.step;
        self.live_step = step;
        let mut sums = (0.0, 0.0, 0.0);
        let mut times = StepTimes::default();
        for (k, batch) in batches.iter().enumerate() {
            let (losses, t) = loop {
                if self.members.is_empty() {
                    return Err(Interrupt::Lost);
                }
                match self.step(epoch, step + 1, batch, lr).await {
                    Ok(r) => break r,
                    Err(Interrupt::Lost) => {
                        self.log(format!(
                            "step {} runs again on {} replica(s)",
                            step + 1,
                            self.members.len()
                        ));
                    }
                    Err(e) => return Err(e),
                }
            };
            step += 1;
            let n = batch.len() as f64;
            let mean = (losses.0 / n, losses.1 / n, losses.2 / n);
            sums = (sums.0 + mean.0, sums.1 + mean.1, sums.2 + mean.2);
            times.compute_ms += t.compute_ms;
            times.allreduce_ms += t.allreduce_ms;
            times.step_ms += t.step_ms;
            self.log(format!(
                "step {}/{steps} of epoch {epoch}/{}: loss {:.4} (similarity {:.4}, regularisation {:.4}) on {} replica(s), compute {:.0} ms, all-reduce {:.0} ms",
                k + 1,
                config.epochs,
                mean.0,
                mean.1,
                mean.2,
                self.members.len(),
                t.compute_ms,
                t.allreduce_ms
            ));
        }
        let val = loop {
            if self.members.is_empty() {
                return Err(Interrupt::Lost);
            }
            match self.validate(epoch).await {
                Ok(v) => break v,
                Err(Interrupt::Lost) => self.log("validation runs again on the replicas left"),
                Err(e) => return Err(e),
            }
        };
        let (weights, optimizer) = loop {
            if self.members.is_empty() {
                return Err(Interrupt::Lost);
            }
            match self.epoch_end(epoch, step).await {
                Ok(v) => break v,
                Err(Interrupt::Lost) => self.log("the epoch's end runs again on the replicas left"),
                Err(e) => return Err(e),
            }
        };
        let n = steps.max(1) as f64;
        let mean = |f: &dyn Fn(&ValCase) -> Option<f64>| -> Option<f64> {
            let v: Vec<f64> = val.iter().filter_map(f).collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        let summary = EpochSummary {
            epoch,
            total_loss: sums.0 / n,
            similarity_loss: sums.1 / n,
            regularisation_loss: sums.2 / n,
            val_soft_dice: mean(&|c| c.soft_dice),
            val_dice: mean(&|c| c.dice),
            val_dice_before: mean(&|c| c.dice_before),
            val_mi_loss: mean(&|c| Some(c.mi_loss)),
            val_folding_pct: mean(&|c| Some(c.folding_pct)),
            lr,
            seconds: started.elapsed().as_secs_f64(),
        };
        let score = summary.val_dice.or(summary.val_soft_dice);
        let monitored = score.unwrap_or(summary.total_loss);
        let next_lr = self.state.scheduler.step(monitored, lr);
        let improved = match (score, self.state.best_val) {
            (Some(v), Some(b)) => v > b,
            (Some(_), None) | (None, _) => true,
        };
        self.checkpoint_epoch(
            epoch, step, next_lr, improved, score, &summary, weights, optimizer,
        )
        .await?;
        self.log(summary.line());
        self.log(format!(
            "epoch {epoch}: per step {:.0} ms compute, {:.0} ms all-reduce, {:.0} ms in all ({} replica(s))",
            times.compute_ms / n,
            times.allreduce_ms / n,
            times.step_ms / n,
            self.members.len()
        ));
        if next_lr != lr {
            self.log(format!("learning rate reduced to {next_lr:e}"));
        }
        Ok(())
    }

    /// One optimizer step of the global `batch`, decided by a [`StepRound`]; returns the
    /// loss sums over its cases. When the round aborts (a replica lost before the commit),
    /// the replicas left are told to drop it and it runs again; once it commits, the step
    /// stands whatever happens to the commit's sends.
    async fn step(
        &mut self,
        epoch: usize,
        step: u64,
        batch: &[usize],
        lr: f64,
    ) -> Phase<((f64, f64, f64), StepTimes)> {
        self.round += 1;
        let id = StepId {
            epoch: epoch as u32,
            step,
            round: self.round,
        };
        let ids: Vec<u64> = self.members.iter().map(|m| m.id).collect();
        let shards = shard(batch, ids.len());
        let mut round = StepRound::new(RoundSpec {
            id,
            shards: ids
                .iter()
                .copied()
                .zip(shards.iter().map(Vec::len))
                .collect(),
            chunk_lengths: chunk_lengths(self.num_params.unwrap_or(0), self.chunk_floats),
            micro_batch: self.spec.micro_batch as usize,
            bn_batch_len: self.bn_batch_len.unwrap_or(0),
        });
        self.lost_now.clear();
        let started = Instant::now();
        let result = self.try_step(&mut round, &ids, &shards, lr).await;
        // Losses seen while the round ran go to the round: before its decision they abort it,
        // after it they change nothing.
        let lost: Vec<u64> = self.lost_now.drain(..).collect();
        for member in lost {
            let actions = round.handle(RoundEvent::Lost { member });
            self.act_on_round(&round, actions).await?;
        }
        let allreduce_ms = match result {
            Err(Interrupt::Fatal(e)) => return Err(Interrupt::Fatal(e)),
            Ok(ms) => ms,
            Err(Interrupt::Lost) => 0.0,
        };
        match round.outcome() {
            Some(Outcome::Committed) => {
                let sums = round.reports().fold((0.0, 0.0, 0.0), |s, d| {
                    (s.0 + d.sums.0, s.1 + d.sums.1, s.2 + d.sums.2)
                });
                let compute_ms = round.reports().map(|d| d.compute_ms).fold(0.0, f64::max);
                Ok((
                    sums,
                    StepTimes {
                        compute_ms,
                        allreduce_ms,
                        step_ms: started.elapsed().as_secs_f64() * 1e3,
                    },
                ))
            }
            Some(Outcome::Aborted) | None => {
                // Stopped without a decision (a time-out dropped members): abort it.
                round.abort();
                let abort = Down::Abort(StepAbort {
                    epoch: id.epoch,
                    step: id.step,
                    round: id.round,
                });
                // A replica lost while aborting is handled by the step's next attempt.
                self.send_each(abort).await?;
                Err(Interrupt::Lost)
            }
        }
    }

    /// Carries out a round's actions: averaged chunks and the commit go to every member.
    async fn act_on_round(&mut self, round: &StepRound, actions: Vec<RoundAction>) -> Phase<()> {
        for action in actions {
            match action {
                RoundAction::Reduced { index, values } => {
                    let data = self.encoding.encode(&values);
                    let contributors = round.contributors();
                    self.ctx
                        .metrics
                        .allreduce_bytes
                        .inc_by((data.len() * (self.members.len() + contributors)) as u64);
                    self.broadcast(Down::Reduced(GradChunk {
                        round: round.id().round,
                        index: index as u32,
                        data,
                    }))
                    .await?;
                }
                RoundAction::Commit { bn_batches } => {
                    let id = round.id();
                    let commit = Down::Commit(StepCommit {
                        epoch: id.epoch,
                        step: id.step,
                        round: id.round,
                        bn_batch_count: bn_batches.len() as u32,
                        bn_batches: GradEncoding::F32.encode(&bn_batches.concat()),
                    });
                    // Every member gets the commit, each send on its own: a replica lost now
                    // is dropped, the others still apply the step, and it is not run again.
                    fault_delay("train-commit-sending").await;
                    self.send_each(commit).await?;
                    self.live_step = id.step;
                    self.ctx.metrics.train_steps.inc();
                }
                RoundAction::Abort => {}
                RoundAction::Evict { member, reason } => {
                    self.lose(member, &format!("protocol error: it {reason}"))?;
                }
            }
        }
        Ok(())
    }

    /// Runs a round until it is decided or interrupted; returns the all-reduce time, ms.
    async fn try_step(
        &mut self,
        round: &mut StepRound,
        ids: &[u64],
        shards: &[Vec<usize>],
        lr: f64,
    ) -> Phase<f64> {
        let id = round.id();
        for (&member, cases) in ids.iter().zip(shards) {
            self.send(
                member,
                Down::Step(TrainStep {
                    step: id.step,
                    round: id.round,
                    epoch: id.epoch,
                    cases: cases.iter().map(|&i| i as u32).collect(),
                    lr,
                }),
            )
            .await?;
        }
        // The all-reduce proper starts when the last contributor starts sending (before
        // that, the head waits for compute).
        let mut first_chunk: HashMap<u64, Instant> = HashMap::new();
        let mut allreduce_ms = 0.0;
        let deadline = Instant::now() + self.step_timeout;
        let lengths = chunk_lengths(self.num_params.unwrap_or(0), self.chunk_floats);
        let bn_len = self.bn_batch_len.unwrap_or(0);
        while round.outcome().is_none() {
            let event = match self.recv(deadline).await? {
                Event::Msg(member, Up::Grad(chunk)) if chunk.round == id.round => {
                    let k = chunk.index as usize;
                    let Some(&n) = lengths.get(k) else {
                        return self
                            .protocol_error(member, &format!("sent chunk {k}, out of range"));
                    };
                    let values = match self.encoding.decode_sum(&chunk.data, n) {
                        Ok(v) => v,
                        Err(e) => return self.protocol_error(member, &e.to_string()),
                    };
                    first_chunk.entry(member).or_insert_with(Instant::now);
                    RoundEvent::Grad {
                        member,
                        index: k,
                        values,
                    }
                }
                Event::Msg(member, Up::Reduced(r)) if r == id.round => {
                    RoundEvent::Arrived { member }
                }
                Event::Msg(member, Up::StepDone(d)) if d.round == id.round => {
                    let count = d.bn_batch_count as usize;
                    let bn = match GradEncoding::F32.decode(&d.bn_batches, count * bn_len) {
                        Ok(v) => v,
                        Err(e) => {
                            return self.protocol_error(
                                member,
                                &format!("sent batch-norm statistics: {e}"),
                            )
                        }
                    };
                    RoundEvent::Done {
                        member,
                        report: ShardReport {
                            samples: d.samples as usize,
                            held_step: d.held_step,
                            sums: (d.total, d.similarity, d.regularisation),
                            compute_ms: d.compute_ms,
                            bn_batches: if bn_len == 0 {
                                vec![Vec::new(); count]
                            } else {
                                bn.chunks(bn_len).map(<[f32]>::to_vec).collect()
                            },
                        },
                    }
                }
                Event::Msg(..) => continue,
                Event::Timeout => {
                    let pending: HashSet<u64> = round.waiting_on().into_iter().collect();
                    self.time_out(&pending, &format!("step {}", id.step))?;
                    return Err(Interrupt::Lost);
                }
            };
            let arrived = matches!(event, RoundEvent::Arrived { .. });
            let actions = round.handle(event);
            if arrived && round.outcome() == Some(Outcome::Committed) {
                allreduce_ms = first_chunk
                    .values()
                    .max()
                    .map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
            }
            self.act_on_round(round, actions).await?;
        }
        Ok(allreduce_ms)
    }

    /// Sends `msg` to every member, each on its own: a member that cannot take it is lost,
    /// the others still get it.
    async fn send_each(&mut self, msg: Down) -> Phase<()> {
        let ids: Vec<u64> = self.members.iter().map(|m| m.id).collect();
        for id in ids {
            match self.send(id, msg.clone()).await {
                Ok(()) | Err(Interrupt::Lost) => {}
                Err(fatal) => return Err(fatal),
            }
        }
        Ok(())
    }

    /// A replica broke the protocol: it is dropped.
    fn protocol_error<T>(&mut self, id: u64, reason: &str) -> Phase<T> {
        self.lose(id, &format!("protocol error: it {reason}"))?;
        Err(Interrupt::Lost)
    }

    /// Registers the validation cases on the replicas; metrics by case.
    async fn validate(&mut self, epoch: usize) -> Phase<Vec<ValCase>> {
        let all: Vec<usize> = (0..self.val_cases.len()).collect();
        if all.is_empty() {
            return Ok(Vec::new());
        }
        self.round += 1;
        let round = self.round;
        let ids: Vec<u64> = self.members.iter().map(|m| m.id).collect();
        let shards = shard(&all, ids.len());
        let mut pending = HashSet::new();
        for (&id, cases) in ids.iter().zip(&shards) {
            if cases.is_empty() {
                continue;
            }
            pending.insert(id);
            self.send(
                id,
                Down::Validate(ValidateCmd {
                    round,
                    epoch: epoch as u32,
                    cases: cases.iter().map(|&i| i as u32).collect(),
                }),
            )
            .await?;
        }
        let mut out: HashMap<u32, ValCase> = HashMap::new();
        let deadline = Instant::now() + self.step_timeout;
        while !pending.is_empty() {
            match self.recv(deadline).await? {
                Event::Msg(id, Up::Val(v)) if v.round == round && pending.remove(&id) => {
                    for c in v.cases {
                        if (c.index as usize) < all.len() {
                            out.insert(c.index, c);
                        }
                    }
                }
                Event::Msg(..) => {}
                Event::Timeout => {
                    self.time_out(&pending, &format!("validation of epoch {epoch}"))?
                }
            }
        }
        if out.len() != all.len() {
            return Err(Interrupt::Fatal(format!(
                "validation of epoch {epoch} returned {} of {} cases",
                out.len(),
                all.len()
            )));
        }
        Ok(out.into_values().collect())
    }

    /// Checks that every replica holds the same state (the step, parameters, BatchNorm
    /// statistics and Adam's moments) and fetches one replica's state (weights, optimizer).
    async fn epoch_end(&mut self, epoch: usize, step: u64) -> Phase<(Vec<u8>, Vec<u8>)> {
        self.broadcast(Down::EpochEnd(epoch as u32)).await?;
        let ids: Vec<u64> = self.members.iter().map(|m| m.id).collect();
        let mut pending: HashSet<u64> = ids.iter().copied().collect();
        let mut reports: Vec<(u64, String)> = Vec::new();
        let deadline = Instant::now() + self.step_timeout;
        while !pending.is_empty() {
            match self.recv(deadline).await? {
                Event::Msg(id, Up::Epoch(r))
                    if r.epoch as usize == epoch && pending.remove(&id) =>
                {
                    if r.step != step {
                        return self.protocol_error(
                            id,
                            &format!(
                                "holds step {} at the end of epoch {epoch}, expected {step}",
                                r.step
                            ),
                        );
                    }
                    reports.push((id, r.state_sha256));
                }
                Event::Msg(..) => {}
                Event::Timeout => self.time_out(&pending, &format!("the end of epoch {epoch}"))?,
            }
        }
        reports.retain(|(id, _)| self.is_member(*id));
        let Some((_, sha)) = reports.first().cloned() else {
            return Err(Interrupt::Lost);
        };
        if let Some((id, other)) = reports.iter().find(|(_, s)| *s != sha) {
            let worker = |i: u64| {
                self.members
                    .iter()
                    .find(|m| m.id == i)
                    .map(|m| m.worker_id.to_string())
                    .unwrap_or_default()
            };
            return Err(Interrupt::Fatal(format!(
                "replicas diverged at the end of epoch {epoch}: worker {} has state {sha}, worker {} has {other}",
                worker(reports[0].0),
                worker(*id)
            )));
        }
        self.state_sha = Some(sha);
        // One replica's state for the checkpoint.
        let leader = self.members[0].id;
        self.send(leader, Down::SendState(true)).await?;
        let mut weights: Option<Vec<u8>> = None;
        let mut optimizer: Option<Vec<u8>> = None;
        let (mut w_buf, mut o_buf) = (Vec::new(), Vec::new());
        let deadline = Instant::now() + self.step_timeout;
        while weights.is_none() || optimizer.is_none() {
            match self.recv(deadline).await? {
                Event::Msg(id, Up::State(chunk)) if id == leader => {
                    let (buf, slot) = match StateKind::try_from(chunk.kind) {
                        Ok(StateKind::Weights) => (&mut w_buf, &mut weights),
                        Ok(StateKind::Optimizer) => (&mut o_buf, &mut optimizer),
                        _ => return self.protocol_error(id, "sent a state chunk of no known kind"),
                    };
                    if chunk.total > 4 << 30 || buf.len() + chunk.data.len() > chunk.total as usize
                    {
                        return self.protocol_error(id, "sent more state than it announced");
                    }
                    buf.extend_from_slice(&chunk.data);
                    if buf.len() == chunk.total as usize {
                        *slot = Some(std::mem::take(buf));
                    }
                }
                Event::Msg(..) => {}
                Event::Timeout => {
                    self.time_out(&HashSet::from([leader]), "the state request")?;
                }
            }
        }
        Ok((weights.unwrap_or_default(), optimizer.unwrap_or_default()))
    }

    /// Writes the epoch's checkpoint: its files first, then `state.json`, the one commit
    /// point, last. The best weights are the best epoch's checkpoint weights, named in
    /// `state.json`, so a crash never leaves a "best" that the state does not know of.
    /// Files no committed state names any more are deleted after the commit.
    #[allow(clippy::too_many_arguments)]
    async fn checkpoint_epoch(
        &mut self,
        epoch: usize,
        step: u64,
        next_lr: f64,
        improved: bool,
        score: Option<f64>,
        summary: &EpochSummary,
        weights: Vec<u8>,
        optimizer: Vec<u8>,
    ) -> Phase<()> {
        let stage = self.ctx.stage.clone();
        let prefix = format!("checkpoints/epoch-{epoch:04}");
        let weights_key = job_key(&self.job_id, &format!("{prefix}/weights.safetensors"))?;
        stage.put(&weights_key, &weights).await?;
        stage
            .put(
                &job_key(&self.job_id, &format!("{prefix}/optimizer.safetensors"))?,
                &optimizer,
            )
            .await?;
        let mut next = self.state.clone();
        if improved {
            next.best_val = score.or(next.best_val);
            next.best_epoch = Some(epoch);
            next.best_weights = Some(weights_key.as_str().to_string());
        }
        next.checkpoint = prefix;
        next.epochs_done = epoch;
        next.step = step;
        next.lr = next_lr;
        next.state_sha256 = self.state_sha.clone();
        next.history.push(summary.clone());
        // Reports derived from the history, then the commit point.
        stage
            .put(
                &job_key(&self.job_id, "history.csv")?,
                history_csv(&next.history).as_bytes(),
            )
            .await?;
        let curves = medray_core::viz::curves_png(&next.history)?;
        stage
            .put(&job_key(&self.job_id, "curves.png")?, &curves)
            .await?;
        let json = serde_json::to_vec_pretty(&next)
            .map_err(|e| Interrupt::Fatal(format!("state: {e}")))?;
        fault_delay("train-before-commit-point").await;
        stage.put(&state_key(&self.job_id)?, &json).await?;
        let previous = std::mem::replace(&mut self.state, next);
        self.checkpoint = Some((weights, optimizer));
        // Numbered checkpoints: keep every `checkpoint_every`-th, the current one and the
        // best one; drop the others once no committed state names them.
        let every = self.state.config.checkpoint_every.max(1);
        let own = format!("jobs/{}/", self.job_id.as_str());
        let keep = |p: &str| -> bool {
            p == self.state.checkpoint
                || self
                    .state
                    .best_weights
                    .as_deref()
                    .is_some_and(|b| b == format!("{own}{p}/weights.safetensors"))
                || p.strip_prefix("checkpoints/epoch-")
                    .and_then(|e| e.parse::<usize>().ok())
                    .is_none_or(|e| e % every == 0)
        };
        let old_best = previous
            .best_weights
            .as_deref()
            .and_then(|b| b.strip_prefix(&own))
            .and_then(|b| b.strip_suffix("/weights.safetensors"));
        let mut stale: Vec<&str> = vec![previous.checkpoint.as_str()];
        stale.extend(old_best);
        stale.retain(|p| !p.is_empty() && !keep(p));
        stale.dedup();
        for p in stale {
            for name in ["weights.safetensors", "optimizer.safetensors"] {
                let _ = stage
                    .delete(&job_key(&self.job_id, &format!("{p}/{name}"))?)
                    .await;
            }
        }
        Ok(())
    }

    /// The best weights so far: those `state.json` names, else (a state written before it
    /// named them) the job's `best/weights.safetensors`.
    async fn best_weights(&self) -> Result<Vec<u8>> {
        match &self.state.best_weights {
            Some(key) => Ok(self.ctx.stage.get(&ObjectKey::new(key.clone())?).await?),
            None => Ok(self
                .ctx
                .stage
                .get(&job_key(&self.job_id, BEST_WEIGHTS)?)
                .await?),
        }
    }

    /// What the job trained on, for the registry: the cases the replicas loaded (ids and
    /// image sha256) and the dataset's content version, which is recorded only while the
    /// catalog still holds those very images (a dataset replaced meanwhile has none).
    /// `None` if a case lacks an image reference (never the case for cases from the
    /// catalog): results of the version then say "unknown", never a guess.
    fn training_data(&self) -> Result<Option<medray_core::models::TrainingData>> {
        use medray_core::models::provenance::TrainedCase;
        let trained = |cases: &[TrainCase]| -> Option<Vec<TrainedCase>> {
            cases
                .iter()
                .map(|c| {
                    Some(TrainedCase {
                        case_id: c.id.clone(),
                        fixed_sha256: c.fixed.as_ref()?.sha256.clone(),
                        moving_sha256: c.moving.as_ref()?.sha256.clone(),
                    })
                })
                .collect()
        };
        let (Some(train), Some(validation)) =
            (trained(&self.train_cases), trained(&self.val_cases))
        else {
            return Ok(None);
        };
        let name = DatasetName::new(self.dataset.clone())?;
        let catalog = self.ctx.catalog()?;
        let now: HashMap<String, TrainedCase> = catalog
            .cases(&name)?
            .iter()
            .map(|r| (r.case_id.to_string(), TrainedCase::of(r)))
            .collect();
        let unchanged = train
            .iter()
            .chain(&validation)
            .all(|c| now.get(&c.case_id) == Some(c));
        let dataset_sha256 = if unchanged {
            catalog.dataset(&name)?.map(|d| d.content_sha256)
        } else {
            None
        };
        Ok(Some(medray_core::models::TrainingData {
            dataset: self.dataset.clone(),
            dataset_sha256,
            train,
            validation,
        }))
    }

    /// Registers `weights` as the job's model version (and points the alias at it);
    /// returns `name:version`. Idempotent: when this job already registered a version (a
    /// head that restarted after registering but before the job's end was recorded), that
    /// version is the result and nothing is registered again.
    async fn register(&self, weights: Vec<u8>) -> Phase<String> {
        use medray_core::models::{
            list_models, register_model, set_alias, ModelName, ModelSource, NewModelVersion,
        };
        let name = ModelName::new(self.spec.model.clone())?;
        let existing = list_models(&self.ctx.catalog()?)?
            .into_iter()
            .find(|v| v.name == name && v.job_id.as_deref() == Some(self.job_id.as_str()));
        if let Some(v) = existing {
            self.log(format!(
                "this job already registered {}:{}; not registering again",
                name.as_str(),
                v.version
            ));
            if !self.spec.alias.is_empty() {
                set_alias(
                    &mut self.ctx.catalog()?,
                    &name,
                    &self.spec.alias,
                    &v.version,
                )?;
            }
            return Ok(format!("{}:{}", name.as_str(), v.version));
        }
        let last = self.state.history.last();
        let final_losses = serde_json::json!({
            "total_loss": last.map(|h| h.total_loss),
            "similarity_loss": last.map(|h| h.similarity_loss),
            "regularisation_loss": last.map(|h| h.regularisation_loss),
            "val_dice": last.and_then(|h| h.val_dice),
            "val_soft_dice": last.and_then(|h| h.val_soft_dice),
            "val_folding_pct": last.and_then(|h| h.val_folding_pct),
            "best_epoch": self.state.best_epoch,
        });
        let new = NewModelVersion {
            name: name.clone(),
            version: (!self.spec.version.is_empty()).then(|| self.spec.version.clone()),
            model_config: self.state.config.model_config(),
            weights,
            train_config_json: serde_json::to_string(&self.state.config)
                .map_err(|e| Interrupt::Fatal(format!("config: {e}")))?,
            dataset: self.dataset.clone(),
            train_cases: self.state.train_cases.clone(),
            val_cases: self.state.val_cases.clone(),
            job_id: Some(self.job_id.to_string()),
            epochs: self.state.epochs_done as u32,
            best_val_dice: self.state.best_val,
            final_losses_json: final_losses.to_string(),
            source: ModelSource::Trained,
            training_data: self.training_data()?,
        };
        let mut catalog = self.ctx.catalog()?;
        let version = register_model(&self.ctx.stage, &mut catalog, new).await?;
        if !self.spec.alias.is_empty() {
            set_alias(&mut catalog, &name, &self.spec.alias, &version.version)?;
            self.log(format!(
                "alias {} now points at {}:{}",
                self.spec.alias,
                name.as_str(),
                version.version
            ));
        }
        Ok(format!("{}:{}", name.as_str(), version.version))
    }

    /// Registers the best weights and ends the replicas' tasks.
    async fn finish(&mut self) -> Phase<String> {
        let best = self.best_weights().await?;
        let registered = self.register(best).await?;
        fault_delay("train-registered").await;
        self.log(format!("registered model {registered}"));
        self.finishing = true;
        let ids: Vec<u64> = self.members.iter().map(|m| m.id).collect();
        for id in &ids {
            let _ = self.send(*id, Down::Finish(registered.clone())).await;
        }
        fault_delay("train-finish-sent").await;
        // Give the replicas a moment to end their tasks (their streams close).
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.members.iter().any(|m| ids.contains(&m.id)) {
            match self.recv(deadline).await {
                Ok(Event::Timeout) => break,
                Ok(_) | Err(Interrupt::Lost) => {}
                Err(e) => return Err(e),
            }
        }
        let last = self.state.history.last();
        Ok(serde_json::json!({
            "model": registered,
            "dataset": self.dataset,
            "epochs": self.state.epochs_done,
            "steps": self.state.step,
            "best_val_dice": self.state.best_val,
            "best_epoch": self.state.best_epoch,
            "final_total_loss": last.map(|h| h.total_loss),
            "final_val_dice": last.and_then(|h| h.val_dice),
            "replica_failures": self.failures,
        })
        .to_string())
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

/// The state of a new job: its config and case split.
fn fresh_state(ctx: &HeadContext, spec: &TrainSpec) -> Result<DistState> {
    let config = train_config(spec)?;
    if spec.dataset.is_empty() {
        return Err(HeadError::invalid("spec.train.dataset", "missing"));
    }
    let dataset = DatasetName::new(spec.dataset.clone())
        .map_err(|e| HeadError::invalid("spec.train.dataset", e.to_string()))?;
    let records = ctx.catalog()?.cases(&dataset)?;
    if records.is_empty() {
        return Err(HeadError::NotFound {
            what: "dataset (or it has no case)",
            id: dataset.as_str().to_string(),
        });
    }
    let n_train = medray_core::dataset::train_count(records.len(), config.val_fraction)
        .map_err(|e| HeadError::invalid("spec.train.val_fraction", e.to_string()))?;
    let ids: Vec<String> = records
        .iter()
        .map(|r| r.case_id.as_str().to_string())
        .collect();
    Ok(DistState {
        lr: config.lr,
        scheduler: ReduceLrOnPlateau::new(medray_core::train::plateau_mode(
            records[n_train..]
                .iter()
                .filter(|r| r.fixed_mask.is_some() && r.moving_mask.is_some())
                .count(),
        )),
        config,
        dataset: dataset.as_str().to_string(),
        train_cases: ids[..n_train].to_vec(),
        val_cases: ids[n_train..].to_vec(),
        epochs_done: 0,
        step: 0,
        best_val: None,
        best_epoch: None,
        checkpoint: String::new(),
        best_weights: None,
        state_sha256: None,
        history: Vec::new(),
    })
}

/// A job's last checkpoint: its state and the weights and optimizer state it points at.
async fn load_state(
    ctx: &HeadContext,
    job: &JobId,
) -> Result<Option<(DistState, Vec<u8>, Vec<u8>)>> {
    let key = state_key(job)?;
    if !ctx.stage.exists(&key).await? {
        return Ok(None);
    }
    let bytes = ctx.stage.get(&key).await?;
    let state: DistState = serde_json::from_slice(&bytes).map_err(|e| {
        HeadError::invalid(
            "checkpoint",
            format!("{} is not a training state: {e}", key.as_str()),
        )
    })?;
    let weights = ctx
        .stage
        .get(&job_key(
            job,
            &format!("{}/weights.safetensors", state.checkpoint),
        )?)
        .await?;
    let optimizer = ctx
        .stage
        .get(&job_key(
            job,
            &format!("{}/optimizer.safetensors", state.checkpoint),
        )?)
        .await?;
    Ok(Some((state, weights, optimizer)))
}
