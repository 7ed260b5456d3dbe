//! The `train` task: one replica of a data-parallel training job.
//!
//! The replica opens the `Train` stream to the head and follows its job's coordinator (see
//! `head/src/train.rs` for the protocol): it loads the cases it is given, builds or restores
//! the network, and then, command by command, computes its shard's gradient and sends it in
//! chunks, collects the averaged chunks, and applies them with Adam when the coordinator
//! commits the round. Tensor work runs here, on the compute thread; a small task on the
//! runtime forwards the head's messages to it.

use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use medray_core::dataset::CaseFiles;
use medray_core::train::dist::{chunk_lengths, GradEncoding};
use medray_core::train::replica::{Committed, Replica};
use medray_core::train::TrainConfig;
use medray_proto::v1::train_down::Msg as Down;
use medray_proto::v1::train_up::Msg as Up;
use medray_proto::v1::{
    EpochReport, GradChunk, StageRef, StateChunk, StateKind, StepDone, TaskAssignment, TrainCase,
    TrainDown, TrainHello, TrainInit, TrainReady, TrainUp, ValCase, ValResult,
};
use tokio::sync::mpsc;

use crate::compute::TaskContext;
use crate::head_client::HeadClient;
use crate::selftest::TaskError;

/// How often the replica checks for cancellation while it waits for the head.
const POLL: Duration = Duration::from_millis(200);

/// What the forwarder hands the compute thread.
enum Incoming {
    Msg(Down),
    End(String),
}

/// The replica's connection: commands in, messages out.
struct Link {
    rx: std_mpsc::Receiver<Incoming>,
    tx: mpsc::Sender<TrainUp>,
}

impl Link {
    /// A link whose commands come from `down` (forwarded by a task on `runtime`) and whose
    /// messages go to `tx`.
    fn over<S>(runtime: &tokio::runtime::Handle, mut down: S, tx: mpsc::Sender<TrainUp>) -> Self
    where
        S: futures::Stream<Item = Result<TrainDown, tonic::Status>> + Unpin + Send + 'static,
    {
        use futures::StreamExt;
        let (in_tx, rx) = std_mpsc::channel();
        runtime.spawn(async move {
            let end = loop {
                match down.next().await {
                    Some(Ok(m)) => match m.msg {
                        Some(msg) => {
                            if in_tx.send(Incoming::Msg(msg)).is_err() {
                                return;
                            }
                        }
                        None => break "the head sent an empty message".to_string(),
                    },
                    None => break "the stream ended".to_string(),
                    Some(Err(status)) => break format!("the stream broke: {}", status.message()),
                }
            };
            let _ = in_tx.send(Incoming::End(end));
        });
        Self { rx, tx }
    }

    fn send(&self, msg: Up) -> Result<(), TaskError> {
        self.tx
            .blocking_send(TrainUp { msg: Some(msg) })
            .map_err(|_| TaskError::transient("the Train stream to the head closed"))
    }

    /// The next command; fails when the task is cancelled or the stream ends.
    fn next(&self, ctx: &TaskContext<'_>) -> Result<Down, TaskError> {
        loop {
            if ctx.cancelled() {
                return Err(TaskError::transient("cancelled"));
            }
            match self.rx.recv_timeout(POLL) {
                Ok(Incoming::Msg(m)) => return Ok(m),
                Ok(Incoming::End(reason)) => {
                    return Err(TaskError::transient(format!(
                        "the head ended this replica: {reason}"
                    )))
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(TaskError::transient("the Train stream's reader stopped"))
                }
            }
        }
    }
}

/// A step whose gradient was sent: the averaged chunks arrive here until the commit.
struct Pending {
    round: u64,
    step: u64,
    lr: f64,
    mean: Vec<f32>,
    received: Vec<bool>,
}

/// Runs one training replica; returns its result as JSON when the coordinator says finish.
///
/// # Errors
/// [`TaskError`]: transient when the stream or the head went away, permanent for a bad
/// config or case (which the replica also reports to the coordinator).
pub fn run(
    ctx: &TaskContext<'_>,
    assignment: &TaskAssignment,
    mut client: HeadClient,
    worker_id: &str,
) -> Result<String, TaskError> {
    let (tx, up_rx) = mpsc::channel::<TrainUp>(256);
    tx.blocking_send(TrainUp {
        msg: Some(Up::Hello(TrainHello {
            worker_id: worker_id.to_string(),
            job_id: assignment.job_id.clone(),
            task_id: assignment.task_id.clone(),
            attempt: assignment.attempt,
        })),
    })
    .map_err(|_| TaskError::transient("cannot queue the hello"))?;
    let response = ctx
        .runtime
        .block_on(
            client
                .clone()
                .train(tokio_stream::wrappers::ReceiverStream::new(up_rx)),
        )
        .map_err(|status| {
            let reason = format!("the head refused the Train stream: {}", status.message());
            if matches!(
                status.code(),
                tonic::Code::FailedPrecondition | tonic::Code::NotFound
            ) {
                TaskError::permanent(reason)
            } else {
                TaskError::transient(reason)
            }
        })?;
    let link = Link::over(ctx.runtime, response.into_inner(), tx);
    let mut fetch = |key: &str, sha256: &str| ctx.fetch(&mut client, worker_id, key, sha256);
    finish(&link, serve(ctx, &link, &mut fetch, worker_id))
}

/// The replica's end of a training job run in this process (`medray train-local`): what
/// the coordinator sends, and where the replica's messages go (no `hello`: the link is
/// already the job's).
#[derive(Debug)]
pub struct InProcessLink {
    /// The coordinator's messages.
    pub down: mpsc::Receiver<Result<TrainDown, tonic::Status>>,
    /// The replica's messages.
    pub up: mpsc::Sender<TrainUp>,
}

/// Runs one replica in this process, on the calling thread, reading the cases straight from
/// `stage` (through `cache_dir`); its log lines go to `log`. The same replica as a worker's
/// `train` task, over channels instead of the `Train` stream.
///
/// # Errors
/// Why the replica stopped.
pub fn run_in_process(
    link: InProcessLink,
    device: &candle_core::Device,
    stage: &medray_core::stage::Stage,
    cache_dir: &std::path::Path,
    runtime: &tokio::runtime::Handle,
    log: impl Fn(String) + Send + 'static,
) -> Result<String, String> {
    let (events, mut lines) = mpsc::channel::<crate::compute::TaskEvent>(64);
    runtime.spawn(async move {
        while let Some(event) = lines.recv().await {
            if let crate::compute::TaskEvent::Log(line) = event {
                log(line);
            }
        }
    });
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let models = std::cell::RefCell::new(crate::infer::ModelCache::default());
    let ctx = TaskContext::standalone(device, runtime, cache_dir, stage, &models, &cancel, &events);
    let link = Link::over(
        runtime,
        tokio_stream::wrappers::ReceiverStream::new(link.down),
        link.up,
    );
    let mut fetch = |key: &str, sha256: &str| ctx.fetch_direct(key, sha256);
    finish(&link, serve(&ctx, &link, &mut fetch, IN_PROCESS_WORKER)).map_err(|e| e.reason)
}

/// Tells the coordinator why a replica stopped for good before its link closes.
fn finish(link: &Link, result: Result<String, TaskError>) -> Result<String, TaskError> {
    if let Err(e) = &result {
        if !e.retryable {
            let _ = link.send(Up::Error(e.reason.clone()));
        }
    }
    result
}

/// The worker name of an in-process replica, in its result and log lines.
pub const IN_PROCESS_WORKER: &str = "in-process";

/// Reads a stage object into the local cache: `(key, sha256)` to its path.
type Fetch<'a> = dyn FnMut(&str, &str) -> Result<std::path::PathBuf, TaskError> + 'a;

fn serve(
    ctx: &TaskContext<'_>,
    link: &Link,
    fetch: &mut Fetch<'_>,
    worker_id: &str,
) -> Result<String, TaskError> {
    // The first command is always the init.
    let init = match link.next(ctx)? {
        Down::Init(init) => init,
        other => {
            return Err(TaskError::permanent(format!(
                "expected an init from the head, got {}",
                name(&other)
            )))
        }
    };
    let (mut replica, setup) = start(ctx, link, fetch, &init)?;
    let encoding = match init.encoding() {
        medray_proto::v1::GradEncoding::F32 => GradEncoding::F32,
        medray_proto::v1::GradEncoding::F16 => GradEncoding::F16,
        medray_proto::v1::GradEncoding::Bf16 => GradEncoding::Bf16,
    };
    let chunk_floats = (init.chunk_floats as usize).max(1);
    let lengths = chunk_lengths(replica.num_params(), chunk_floats);
    let micro_batch = init.micro_batch as usize;
    let state_chunk = (init.state_chunk_bytes as usize).clamp(1024, 64 << 20);
    let permanent = |what: &str| {
        let what = what.to_string();
        move |e: medray_core::Error| TaskError::permanent(format!("{what}: {e}"))
    };
    link.send(Up::Ready(TrainReady {
        state_sha256: replica.state_sha256().map_err(permanent("checksum"))?,
        step: replica.step_count(),
        bn_batch_len: replica.bn_batch_len() as u32,
        num_params: replica.num_params() as u64,
        device: ctx.device_spec.to_string(),
        load_ms: setup.as_secs_f64() * 1e3,
    }))?;
    let (train_n, val_n) = replica.case_counts();
    ctx.log(format!(
        "replica ready on {}: {} parameters, {train_n} training and {val_n} validation cases loaded in {:.1} s, step {}",
        ctx.device_spec,
        replica.num_params(),
        setup.as_secs_f64(),
        replica.step_count()
    ));
    let mut pending: Option<Pending> = None;
    let mut steps = 0u64;
    loop {
        match link.next(ctx)? {
            Down::Step(step) => {
                fault_kill("replica-step", step.step);
                let cases: Vec<usize> = step.cases.iter().map(|&i| i as usize).collect();
                let g = replica
                    .compute_gradient(&cases, micro_batch)
                    .map_err(permanent(&format!("step {}", step.step)))?;
                if g.samples > 0 {
                    let mut offset = 0;
                    for (k, &n) in lengths.iter().enumerate() {
                        link.send(Up::Grad(GradChunk {
                            round: step.round,
                            index: k as u32,
                            data: encoding.encode_sum(&g.sum[offset..offset + n]),
                        }))?;
                        offset += n;
                    }
                }
                link.send(Up::StepDone(StepDone {
                    round: step.round,
                    samples: g.samples as u32,
                    total: g.sums.0,
                    similarity: g.sums.1,
                    regularisation: g.sums.2,
                    compute_ms: g.compute_ms,
                    held_step: replica.step_count(),
                    bn_batches: GradEncoding::F32.encode(&g.bn_batches.concat()),
                    bn_batch_count: g.bn_batches.len() as u32,
                }))?;
                pending = Some(Pending {
                    round: step.round,
                    step: step.step,
                    lr: step.lr,
                    mean: vec![0.0; replica.num_params()],
                    received: vec![false; lengths.len()],
                });
            }
            Down::Reduced(chunk) => {
                let Some(p) = pending.as_mut().filter(|p| p.round == chunk.round) else {
                    continue;
                };
                let k = chunk.index as usize;
                let n = *lengths.get(k).ok_or_else(|| {
                    TaskError::permanent(format!("reduced chunk {k} is out of range"))
                })?;
                let values = encoding
                    .decode(&chunk.data, n)
                    .map_err(permanent(&format!("reduced chunk {k}")))?;
                p.mean[k * chunk_floats..k * chunk_floats + n].copy_from_slice(&values);
                if !std::mem::replace(&mut p.received[k], true) && p.received.iter().all(|r| *r) {
                    link.send(Up::Reduced(p.round))?;
                }
            }
            Down::Commit(c) => {
                fault_kill("replica-commit", c.step);
                let Some(p) = pending.take_if(|p| p.round == c.round) else {
                    // Not the round this replica computed: only harmless when it already
                    // holds the step (a commit delivered twice).
                    if c.step <= replica.step_count() {
                        continue;
                    }
                    return Err(TaskError::permanent(format!(
                        "commit of step {} (round {}), which this replica did not compute",
                        c.step, c.round
                    )));
                };
                if p.step != c.step {
                    return Err(TaskError::permanent(format!(
                        "commit of step {} for round {}, which computed step {}",
                        c.step, c.round, p.step
                    )));
                }
                if let Some(k) = p.received.iter().position(|r| !r) {
                    return Err(TaskError::permanent(format!(
                        "commit of step {} before its chunk {k} arrived",
                        c.step
                    )));
                }
                let bn_len = replica.bn_batch_len();
                let bn = GradEncoding::F32
                    .decode(&c.bn_batches, c.bn_batch_count as usize * bn_len)
                    .map_err(permanent("the commit's batch-norm statistics"))?;
                let bn: Vec<Vec<f32>> = bn.chunks(bn_len.max(1)).map(<[f32]>::to_vec).collect();
                match replica
                    .commit(c.step, &p.mean, p.lr, &bn)
                    .map_err(permanent(&format!("committing step {}", c.step)))?
                {
                    Committed::Applied => steps += 1,
                    Committed::AlreadyHeld => {
                        ctx.log(format!("step {} was committed twice; applied once", c.step))
                    }
                }
            }
            Down::Abort(a) => {
                if pending.as_ref().is_some_and(|p| p.round == a.round) {
                    pending = None;
                }
            }
            Down::Validate(v) => {
                let cases: Vec<usize> = v.cases.iter().map(|&i| i as usize).collect();
                let metrics = replica
                    .validate(&cases)
                    .map_err(permanent(&format!("validation of epoch {}", v.epoch)))?;
                link.send(Up::Val(ValResult {
                    epoch: v.epoch,
                    round: v.round,
                    cases: metrics
                        .into_iter()
                        .map(|(i, m)| ValCase {
                            index: i as u32,
                            dice: m.dice,
                            soft_dice: m.soft_dice,
                            dice_before: m.dice_before,
                            mi_loss: m.mi_loss,
                            bending_energy: m.bending_energy,
                            folding_pct: m.folding_pct,
                        })
                        .collect(),
                }))?;
            }
            Down::EpochEnd(epoch) => {
                link.send(Up::Epoch(EpochReport {
                    epoch,
                    state_sha256: replica.state_sha256().map_err(permanent("checksum"))?,
                    step: replica.step_count(),
                }))?;
                ctx.log(format!(
                    "epoch {epoch} done on this replica ({steps} steps applied so far)"
                ));
            }
            Down::SendState(_) => {
                let weights = replica.weights_bytes().map_err(permanent("weights"))?;
                let optimizer = replica
                    .optimizer_bytes()
                    .map_err(permanent("optimizer state"))?;
                for (kind, bytes) in [
                    (StateKind::Weights, weights),
                    (StateKind::Optimizer, optimizer),
                ] {
                    for piece in bytes.chunks(state_chunk) {
                        link.send(Up::State(StateChunk {
                            kind: kind as i32,
                            total: bytes.len() as u64,
                            data: piece.to_vec(),
                        }))?;
                    }
                }
            }
            Down::Finish(model) => {
                ctx.log(format!(
                    "training finished: {steps} steps applied on this replica; model {model}"
                ));
                return Ok(serde_json::json!({
                    "worker_id": worker_id,
                    "device": ctx.device_spec,
                    "steps": steps,
                    "model": model,
                })
                .to_string());
            }
            other @ (Down::Init(_) | Down::State(_)) => {
                return Err(TaskError::permanent(format!(
                    "unexpected {} after the init",
                    name(&other)
                )))
            }
        }
    }
}

/// Fetches and loads the cases, builds the replica and restores the state that follows the
/// init, if any.
fn start(
    ctx: &TaskContext<'_>,
    link: &Link,
    fetch: &mut Fetch<'_>,
    init: &TrainInit,
) -> Result<(Replica, Duration), TaskError> {
    let started = Instant::now();
    let config: TrainConfig = serde_json::from_str(&init.config_json)
        .map_err(|e| TaskError::permanent(format!("the training config is not valid: {e}")))?;
    let mut files = |cases: &[TrainCase]| -> Result<Vec<CaseFiles>, TaskError> {
        cases
            .iter()
            .map(|c| {
                let mut get = |r: &Option<StageRef>| -> Result<_, TaskError> {
                    r.as_ref().map(|r| fetch(&r.key, &r.sha256)).transpose()
                };
                let missing = |what: &str| {
                    TaskError::permanent(format!("case {}: no {what} in the init", c.id))
                };
                let fixed = get(&c.fixed)?.ok_or_else(|| missing("fixed image"))?;
                let moving = get(&c.moving)?.ok_or_else(|| missing("moving image"))?;
                let fixed_mask = get(&c.fixed_mask)?;
                let moving_mask = get(&c.moving_mask)?;
                let keypoints = get(&c.keypoints)?;
                Ok(CaseFiles {
                    id: c.id.clone(),
                    fixed,
                    moving,
                    fixed_mask,
                    moving_mask,
                    keypoints,
                })
            })
            .collect()
    };
    let train = files(&init.train)?;
    let val = files(&init.val)?;
    ctx.log(format!(
        "fetched {} cases; preprocessing to {:?}",
        train.len() + val.len(),
        config.size
    ));
    let mut replica = Replica::new(&config, &train, &val, ctx.device)
        .map_err(|e| TaskError::permanent(format!("building the replica: {e}")))?;
    if init.with_state {
        let (mut weights, mut optimizer) = (Vec::new(), Vec::new());
        let (mut w_done, mut o_done) = (false, false);
        while !(w_done && o_done) {
            let chunk = match link.next(ctx)? {
                Down::State(c) => c,
                other => {
                    return Err(TaskError::permanent(format!(
                        "expected the model state after the init, got {}",
                        name(&other)
                    )))
                }
            };
            let (buf, done) = match StateKind::try_from(chunk.kind) {
                Ok(StateKind::Weights) => (&mut weights, &mut w_done),
                Ok(StateKind::Optimizer) => (&mut optimizer, &mut o_done),
                _ => return Err(TaskError::permanent("a state chunk of no known kind")),
            };
            if buf.len() + chunk.data.len() > chunk.total as usize {
                return Err(TaskError::permanent("more state than announced"));
            }
            buf.extend_from_slice(&chunk.data);
            *done = buf.len() == chunk.total as usize;
        }
        replica
            .load_state(&weights, &optimizer, init.step)
            .map_err(|e| TaskError::permanent(format!("restoring the model state: {e}")))?;
    }
    Ok((replica, started.elapsed()))
}

/// Fault injection for the tests (inert unless `FAILPOINTS` arms it): `replica-commit=return(N)`
/// makes this worker SIGKILL itself when the commit of step `N` arrives, before applying it
/// (a replica lost in the middle of a commit); `replica-step=return(N)` when step `N` is
/// handed out (a replica lost mid-epoch).
fn fault_kill(name: &str, step: u64) {
    let target = fail::eval(name, |arg| arg.and_then(|a| a.parse::<u64>().ok()));
    if target.flatten() == Some(step) {
        tracing::warn!(
            failpoint = name,
            step,
            "fault injection: killing this worker"
        );
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

fn name(msg: &Down) -> &'static str {
    match msg {
        Down::Init(_) => "init",
        Down::State(_) => "state chunk",
        Down::Step(_) => "step",
        Down::Reduced(_) => "reduced chunk",
        Down::Commit(_) => "commit",
        Down::Abort(_) => "abort",
        Down::Validate(_) => "validate",
        Down::EpochEnd(_) => "epoch end",
        Down::SendState(_) => "state request",
        Down::Finish(_) => "finish",
    }
}
