//! The Worker service: registration, heartbeats, task logs and results, object fetches.
//!
//! `Register` takes the worker token; every other call must carry the session credential of
//! the worker it names ([`crate::sessions`]), and object reads and writes are limited to
//! the attempts that worker holds ([`super::access`]).

use std::time::Duration;

use medray_proto::v1::finish_task_request::Outcome;
use medray_proto::v1::worker_server::Worker;
use medray_proto::v1::{
    AppendTaskLogsRequest, AppendTaskLogsResponse, DeregisterRequest, DeregisterResponse,
    FetchObjectRequest, FinishTaskRequest, FinishTaskResponse, HeartbeatRequest, HeartbeatResponse,
    ObjectChunk, PutObjectRequest, PutObjectResponse, RegisterRequest, RegisterResponse, TrainDown,
    TrainUp,
};
use medray_proto::PROTOCOL_VERSION;
use ractor::ActorRef;
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status, Streaming};

use super::{access, object_stream, BoxStream};
use crate::context::HeadContext;
use crate::ids::{AttemptRef, JobId, TaskId, WorkerId};
use crate::manager::ManagerMsg;
use crate::registry::RegistryMsg;
use crate::scheduler::{AttemptOutcome, SchedulerMsg};
use crate::sessions::SessionCheck;
use crate::train::{CoordEvent, CoordMsg, Member};

/// Messages to a training replica buffered before the coordinator waits (chunks of a
/// gradient are the most: a step's worth fits).
const TRAIN_DOWN_BUFFER: usize = 1024;

/// Streams ids, unique within a head process.
static NEXT_MEMBER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The only stage folder workers may write to (and within it, their attempt's outputs).
const WORKER_WRITABLE_PREFIX: &str = "results/";

/// Timeout of a call from a service into an actor.
const ACTOR_TIMEOUT: Duration = Duration::from_secs(10);

/// The Worker service.
#[derive(Debug, Clone)]
pub struct WorkerService {
    /// Shared handles.
    pub ctx: HeadContext,
    /// The registry.
    pub registry: ActorRef<RegistryMsg>,
    /// The scheduler.
    pub scheduler: ActorRef<SchedulerMsg>,
    /// The job manager (it finds a training job's coordinator).
    pub manager: ActorRef<ManagerMsg>,
}

fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!("missing field `{field}`")))
    } else {
        Ok(value)
    }
}

fn unavailable<E: std::fmt::Display>(e: E) -> Status {
    Status::unavailable(format!("head is busy: {e}"))
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let presented = medray_proto::auth::presented_bearer(request.metadata())?;
        if medray_proto::auth::same_credential(presented, self.ctx.config.token.expose()) {
            return Err(Status::permission_denied(
                "workers register with the worker token (MEDRAY_WORKER_TOKEN), not the client token; `medray worker-token` prints it",
            ));
        }
        if !medray_proto::auth::same_credential(presented, self.ctx.config.worker_token().expose())
        {
            return Err(Status::unauthenticated(
                "Register needs the worker token (MEDRAY_WORKER_TOKEN)",
            ));
        }
        let req = request.into_inner();
        if req.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "protocol version mismatch: worker speaks {}, head speaks {PROTOCOL_VERSION}; run the same medray version on both",
                req.protocol_version
            )));
        }
        required(&req.name, "name")?;
        required(&req.device, "device")?;
        if req.gpu_name.len() > 256 {
            return Err(Status::invalid_argument("gpu_name: at most 256 bytes"));
        }
        if req.name.len() > 128 || req.device.len() > 32 {
            return Err(Status::invalid_argument("`name` or `device` too long"));
        }
        let reply = self
            .registry
            .call(|r| RegistryMsg::Register(req, r), Some(ACTOR_TIMEOUT))
            .await
            .map_err(unavailable)?
            .success_or_else(|| unavailable("registry timeout"))?
            .map_err(Status::from)?;
        Ok(Response::new(reply))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        let worker_id = WorkerId(required(&req.worker_id, "worker_id")?.to_string());
        // A worker the head does not know (restarted, evicted) learns it here and registers
        // again; a known worker's heartbeat must carry its own session.
        match self
            .ctx
            .sessions
            .check(medray_proto::auth::presented_bearer(&metadata)?, &worker_id)
        {
            SessionCheck::Unknown => return Ok(Response::new(HeartbeatResponse { known: false })),
            check => check.require(&worker_id)?,
        }
        let known = self
            .registry
            .call(
                |reply| RegistryMsg::Heartbeat {
                    worker_id,
                    current_task: req.current_task,
                    reply,
                },
                Some(ACTOR_TIMEOUT),
            )
            .await
            .map_err(unavailable)?
            .success_or_else(|| unavailable("registry timeout"))?;
        Ok(Response::new(HeartbeatResponse { known }))
    }

    async fn append_task_logs(
        &self,
        request: Request<AppendTaskLogsRequest>,
    ) -> Result<Response<AppendTaskLogsResponse>, Status> {
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        let attempt = attempt_of(&req.job_id, &req.task_id, req.attempt)?;
        let worker = WorkerId(required(&req.worker_id, "worker_id")?.to_string());
        self.ctx.sessions.authorize(&metadata, &worker)?;
        let current = self
            .ctx
            .store
            .is_current(&attempt, &worker)
            .map_err(Status::from)?;
        if current {
            self.ctx
                .logs
                .append(&attempt.job_id, worker.as_str(), &req.lines)
                .map_err(Status::from)?;
        }
        Ok(Response::new(AppendTaskLogsResponse { accepted: current }))
    }

    async fn finish_task(
        &self,
        request: Request<FinishTaskRequest>,
    ) -> Result<Response<FinishTaskResponse>, Status> {
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        let attempt = attempt_of(&req.job_id, &req.task_id, req.attempt)?;
        let worker_id = WorkerId(required(&req.worker_id, "worker_id")?.to_string());
        self.ctx.sessions.authorize(&metadata, &worker_id)?;
        let outcome = match req.outcome {
            Some(Outcome::ResultJson(json)) => {
                serde_json::from_str::<serde_json::Value>(&json).map_err(|e| {
                    Status::invalid_argument(format!("`result_json` is not JSON: {e}"))
                })?;
                AttemptOutcome::Succeeded(json)
            }
            Some(Outcome::Failure(f)) => AttemptOutcome::Failed {
                reason: f.reason,
                retryable: f.retryable,
            },
            None => return Err(Status::invalid_argument("missing field `outcome`")),
        };
        // `medray status` shows the worker idle at once, not at its next heartbeat.
        let _ = self
            .registry
            .cast(RegistryMsg::TaskEnded(worker_id.clone()));
        let accepted = self
            .scheduler
            .call(
                |reply| SchedulerMsg::Finished {
                    worker_id,
                    attempt,
                    outcome,
                    reply,
                },
                Some(ACTOR_TIMEOUT),
            )
            .await
            .map_err(unavailable)?
            .success_or_else(|| unavailable("scheduler timeout"))?;
        Ok(Response::new(FinishTaskResponse { accepted }))
    }

    type FetchObjectStream = BoxStream<ObjectChunk>;

    async fn fetch_object(
        &self,
        request: Request<FetchObjectRequest>,
    ) -> Result<Response<Self::FetchObjectStream>, Status> {
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        let worker_id = WorkerId(required(&req.worker_id, "worker_id")?.to_string());
        self.ctx.sessions.authorize(&metadata, &worker_id)?;
        required(&req.key, "key")?;
        let key = medray_core::stage::ObjectKey::new(req.key.clone())
            .map_err(|e| Status::invalid_argument(format!("`key`: {e}")))?;
        let held = self
            .ctx
            .store
            .running_assignments(&worker_id)
            .map_err(Status::from)?;
        if !held.iter().any(|a| access::may_read(a, key.as_str())) {
            return Err(Status::permission_denied(format!(
                "{key}: not an object of a task attempt worker {worker_id} holds"
            )));
        }
        Ok(Response::new(
            object_stream(&self.ctx, &req.key, "to_worker").await?,
        ))
    }

    type TrainStream = BoxStream<TrainDown>;

    async fn train(
        &self,
        request: Request<Streaming<TrainUp>>,
    ) -> Result<Response<Self::TrainStream>, Status> {
        use medray_proto::v1::train_up::Msg;
        let metadata = request.metadata().clone();
        let mut up = request.into_inner();
        let hello = match up.message().await? {
            Some(TrainUp {
                msg: Some(Msg::Hello(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a Train stream must be `hello`",
                ))
            }
        };
        let attempt = attempt_of(&hello.job_id, &hello.task_id, hello.attempt)?;
        let worker_id = WorkerId(required(&hello.worker_id, "worker_id")?.to_string());
        self.ctx.sessions.authorize(&metadata, &worker_id)?;
        if !self
            .ctx
            .store
            .is_current(&attempt, &worker_id)
            .map_err(Status::from)?
        {
            return Err(Status::failed_precondition(format!(
                "attempt {attempt} is not current for worker {worker_id}"
            )));
        }
        let coordinator = self
            .manager
            .call(
                |reply| ManagerMsg::Coordinator(attempt.job_id.clone(), reply),
                Some(Duration::from_secs(10)),
            )
            .await
            .map_err(|e| Status::unavailable(format!("the job manager: {e}")))?
            .success_or_else(|| Status::unavailable("the job manager did not answer"))?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "job {} has no training coordinator (it ended, or is not a training job)",
                    attempt.job_id
                ))
            })?;
        let budget = coordinator
            .call(CoordMsg::Budget, Some(ACTOR_TIMEOUT))
            .await
            .map_err(|_| Status::unavailable("the training job ended"))?
            .success_or_else(|| Status::unavailable("the training coordinator did not answer"))?;
        let id = NEXT_MEMBER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (down_tx, down_rx) = tokio::sync::mpsc::channel(TRAIN_DOWN_BUFFER);
        coordinator
            .cast(CoordMsg::Event(CoordEvent::Join(Member {
                id,
                worker_id,
                task_id: attempt.task_id.clone(),
                down: down_tx,
            })))
            .map_err(|_| Status::unavailable("the training job ended"))?;
        // Forward the replica's messages until its stream ends, within the job's inbox
        // budget (back-pressure on the replica when the coordinator falls behind).
        tokio::spawn(crate::train::inbox::forward(
            up,
            id,
            coordinator,
            budget,
            self.ctx.config.train_inbox_bytes,
        ));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(down_rx),
        )))
    }

    async fn deregister(
        &self,
        request: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        let worker_id = WorkerId(required(&req.worker_id, "worker_id")?.to_string());
        self.ctx.sessions.authorize(&metadata, &worker_id)?;
        self.registry
            .cast(RegistryMsg::Deregister {
                worker_id,
                reason: req.reason,
            })
            .map_err(unavailable)?;
        Ok(Response::new(DeregisterResponse {}))
    }

    async fn put_object(
        &self,
        request: Request<Streaming<PutObjectRequest>>,
    ) -> Result<Response<PutObjectResponse>, Status> {
        let metadata = request.metadata().clone();
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty upload: no header"))?;
        let header = first
            .header
            .ok_or_else(|| Status::invalid_argument("the first message must carry the `header`"))?;
        let attempt = attempt_of(&header.job_id, &header.task_id, header.attempt)?;
        let worker_id = WorkerId(required(&header.worker_id, "header.worker_id")?.to_string());
        self.ctx.sessions.authorize(&metadata, &worker_id)?;
        if !header.key.starts_with(WORKER_WRITABLE_PREFIX) {
            return Err(Status::permission_denied(format!(
                "`header.key` `{}`: workers write only under `{WORKER_WRITABLE_PREFIX}`",
                header.key
            )));
        }
        let key = medray_core::stage::ObjectKey::new(header.key.clone())
            .map_err(|e| Status::invalid_argument(format!("`header.key`: {e}")))?;
        if header.sha256.len() != 64 || !header.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Status::invalid_argument(
                "`header.sha256`: expected 64 hex digits",
            ));
        }
        let limit = self.ctx.config.max_put_bytes;
        if header.size > limit {
            return Err(Status::resource_exhausted(format!(
                "{key}: {} bytes is more than the head's --max-upload-bytes of {limit} bytes",
                header.size
            )));
        }
        let held = self
            .ctx
            .store
            .running_assignments(&worker_id)
            .map_err(Status::from)?;
        let Some(assignment) = held.iter().find(|a| {
            a.job_id == attempt.job_id.as_str()
                && a.task_id == attempt.task_id.as_str()
                && a.attempt == attempt.attempt
        }) else {
            return Err(Status::failed_precondition(format!(
                "attempt {attempt} is not current for worker {worker_id}: the upload is dropped"
            )));
        };
        if !access::may_write(assignment, key.as_str()) {
            return Err(Status::permission_denied(format!(
                "`header.key` `{key}`: not an output of attempt {attempt}"
            )));
        }
        let mut data = first.data;
        while let Some(msg) = stream.message().await? {
            if msg.header.is_some() {
                return Err(Status::invalid_argument(
                    "only the first message carries a `header`",
                ));
            }
            if (data.len() + msg.data.len()) as u64 > header.size {
                return Err(Status::invalid_argument(format!(
                    "{key}: more data than the announced `size` of {} bytes",
                    header.size
                )));
            }
            data.extend_from_slice(&msg.data);
        }
        let sha256 = hex::encode(Sha256::digest(&data));
        if data.len() as u64 != header.size || sha256 != header.sha256.to_ascii_lowercase() {
            return Err(Status::data_loss(format!(
                "{key}: upload damaged: {} of {} bytes, sha256 {sha256} instead of {}",
                data.len(),
                header.size,
                header.sha256
            )));
        }
        self.ctx
            .stage
            .put(&key, &data)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        self.ctx.metrics.moved("from_worker", data.len() as u64);
        Ok(Response::new(PutObjectResponse {
            bytes: data.len() as u64,
        }))
    }
}

fn attempt_of(job_id: &str, task_id: &str, attempt: u32) -> Result<AttemptRef, Status> {
    Ok(AttemptRef {
        job_id: JobId(required(job_id, "job_id")?.to_string()),
        task_id: TaskId(required(task_id, "task_id")?.to_string()),
        attempt,
    })
}
