//! The Client service: what the `medray` CLI calls.

use std::time::Duration;

use futures::StreamExt;
use medray_core::catalog::DatasetName;
use medray_proto::convert::{dataset_response, version_ref};
use medray_proto::v1::client_server::Client;
use medray_proto::v1::ingest_spec::Source;
use medray_proto::v1::job_spec::Kind;
use medray_proto::v1::{
    CancelJobRequest, CancelJobResponse, ClusterStatusRequest, ClusterStatusResponse, DatasetInfo,
    GetDatasetRequest, GetDatasetResponse, GetJobRequest, GetJobResponse, JobSpec,
    ListDatasetsRequest, ListDatasetsResponse, ListJobsRequest, ListJobsResponse, LogLine,
    ObjectChunk, StageGetRequest, StageListRequest, StageListResponse, StageObject,
    StagePutRequest, StagePutResponse, StreamJobLogsRequest, SubmitJobRequest, SubmitJobResponse,
};
use medray_proto::v1::{
    CaseResult, ListResultsRequest, ListResultsResponse, ModelVersionInfo, QueryCatalogRequest,
    QueryCatalogResponse,
};
use medray_proto::v1::{
    DeleteModelRequest, DeleteModelResponse, ExportModelRequest, GetModelRequest, GetModelResponse,
    ImportModelRequest, ImportModelResponse, ListModelsRequest, ListModelsResponse, ModelRef,
    SetModelAliasRequest, SetModelAliasResponse,
};
use medray_proto::MAX_ROWS;
use ractor::ActorRef;
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status, Streaming};

use super::{chunk_stream, object_stream, BoxStream};
use crate::context::HeadContext;
use crate::ids::JobId;
use crate::manager::ManagerMsg;
use crate::registry::RegistryMsg;

const ACTOR_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a `QueryCatalog` statement may run.
const QUERY_TIME_LIMIT: Duration = Duration::from_secs(10);

/// The Client service.
#[derive(Debug, Clone)]
pub struct ClientService {
    /// Shared handles.
    pub ctx: HeadContext,
    /// The job manager.
    pub manager: ActorRef<ManagerMsg>,
    /// The registry.
    pub registry: ActorRef<RegistryMsg>,
}

fn unavailable<E: std::fmt::Display>(e: E) -> Status {
    Status::unavailable(format!("head is busy: {e}"))
}

fn job_id(id: &str) -> Result<JobId, Status> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(Status::invalid_argument(format!("invalid job id `{id}`")));
    }
    Ok(JobId(id.to_string()))
}

/// Checks a submitted spec; errors name the field.
///
/// # Errors
/// `InvalidArgument` naming the field.
pub fn validate_spec(spec: &JobSpec) -> Result<(), Status> {
    let bad =
        |field: &str, reason: &str| Err(Status::invalid_argument(format!("`{field}`: {reason}")));
    match &spec.kind {
        None => bad("spec.kind", "missing: set selftest, ingest, train or infer"),
        Some(Kind::Infer(i)) => validate_infer(i),
        Some(Kind::Train(t)) => {
            if t.dataset.is_empty() {
                return bad("train.dataset", "missing");
            }
            if t.model.is_empty() {
                return bad("train.model", "missing");
            }
            medray_core::models::ModelName::new(t.model.clone())
                .map_err(|e| Status::invalid_argument(format!("`train.model`: {e}")))?;
            if !t.version.is_empty() {
                medray_core::models::validate_version(&t.version)
                    .map_err(|e| Status::invalid_argument(format!("`train.version`: {e}")))?;
            }
            if !t.alias.is_empty() {
                medray_core::models::validate_alias(&t.alias)
                    .map_err(|e| Status::invalid_argument(format!("`train.alias`: {e}")))?;
            }
            if t.workers > 1024 {
                return bad("train.workers", "at most 1024");
            }
            if t.epochs > 100_000 {
                return bad("train.epochs", "at most 100,000");
            }
            if t.micro_batch > 1024 {
                return bad("train.micro_batch", "at most 1024");
            }
            if t.resume_from.is_empty() {
                crate::train::train_config(t).map_err(Status::from)?;
            }
            medray_core::train::dist::GradEncoding::parse(&t.grad_compression)
                .map_err(|e| Status::invalid_argument(format!("`train.grad_compression`: {e}")))?;
            Ok(())
        }
        Some(Kind::Selftest(s)) => {
            if s.size != 0 && (!(16..=128).contains(&s.size) || !s.size.is_multiple_of(4)) {
                return bad("selftest.size", "a multiple of 4 in 16..=128");
            }
            if s.workers > 1024 {
                return bad("selftest.workers", "at most 1024");
            }
            if s.log_lines > 1_000_000 {
                return bad("selftest.log_lines", "at most 1,000,000");
            }
            if s.hold_ms > 3_600_000 {
                return bad("selftest.hold_ms", "at most one hour");
            }
            Ok(())
        }
        Some(Kind::Ingest(i)) => match &i.source {
            None => bad(
                "ingest.source",
                "missing: set synthetic, dir, learn2reg, dirlab or nlst",
            ),
            Some(Source::Synthetic(s)) => {
                if !(1..=1000).contains(&s.cases) {
                    return bad("ingest.synthetic.cases", "1..=1000");
                }
                if !(s.size.is_empty() || s.size.len() == 3)
                    || s.size.iter().any(|v| !(8..=512).contains(v))
                {
                    return bad("ingest.synthetic.size", "three values X Y Z, each 8..=512");
                }
                Ok(())
            }
            Some(Source::Dir(d)) => {
                if !std::path::Path::new(&d.path).is_absolute() {
                    return bad(
                        "ingest.dir.path",
                        "must be an absolute path on the head's machine",
                    );
                }
                Ok(())
            }
            Some(Source::Dirlab(d)) => {
                if !std::path::Path::new(&d.path).is_absolute() {
                    return bad(
                        "ingest.dirlab.path",
                        "must be an absolute path on the head's machine",
                    );
                }
                if !d.table.is_empty() && !std::path::Path::new(&d.table).is_absolute() {
                    return bad(
                        "ingest.dirlab.table",
                        "must be an absolute path on the head's machine",
                    );
                }
                Ok(())
            }
            Some(Source::Nlst(n)) => {
                if !std::path::Path::new(&n.path).is_absolute() {
                    return bad(
                        "ingest.nlst.path",
                        "must be an absolute path on the head's machine",
                    );
                }
                Ok(())
            }
            Some(Source::Learn2reg(_)) => Ok(()),
        },
    }
}

/// Checks an inference spec; errors name the field.
fn validate_infer(i: &medray_proto::v1::InferSpec) -> Result<(), Status> {
    fn field(name: &'static str) -> impl Fn(medray_core::Error) -> Status {
        move |e| Status::invalid_argument(format!("`infer.{name}`: {e}"))
    }
    if i.dataset.is_empty() {
        return Err(Status::invalid_argument("`infer.dataset`: missing"));
    }
    DatasetName::new(i.dataset.clone()).map_err(field("dataset"))?;
    if i.model.is_empty() {
        return Err(Status::invalid_argument("`infer.model`: missing"));
    }
    medray_core::models::ModelName::new(i.model.clone()).map_err(field("model"))?;
    if !i.version.is_empty() && !i.alias.is_empty() {
        return Err(Status::invalid_argument(
            "`infer.version`: name a version or an alias, not both",
        ));
    }
    if !i.version.is_empty() {
        medray_core::models::validate_version(&i.version).map_err(field("version"))?;
    }
    if !i.alias.is_empty() {
        medray_core::models::validate_alias(&i.alias).map_err(field("alias"))?;
    }
    if i.workers > 1024 {
        return Err(Status::invalid_argument("`infer.workers`: at most 1024"));
    }
    if i.cases.len() > 100_000 {
        return Err(Status::invalid_argument("`infer.cases`: at most 100,000"));
    }
    let mut seen = std::collections::HashSet::new();
    for c in &i.cases {
        medray_core::catalog::CaseId::new(c.clone()).map_err(field("cases"))?;
        if !seen.insert(c) {
            return Err(Status::invalid_argument(format!(
                "`infer.cases`: `{c}` is listed twice"
            )));
        }
    }
    if i.refine_steps as usize > medray_core::refine::MAX_REFINE_STEPS {
        return Err(Status::invalid_argument(format!(
            "`infer.refine_steps`: at most {}",
            medray_core::refine::MAX_REFINE_STEPS
        )));
    }
    if i.hold_ms > 3_600_000 {
        return Err(Status::invalid_argument(
            "`infer.hold_ms`: at most one hour",
        ));
    }
    crate::infer::refine_options(i).map_err(field("refine"))?;
    Ok(())
}

/// A core error as a status (through [`crate::HeadError`]'s one mapping).
fn core_status(e: medray_core::Error) -> Status {
    Status::from(crate::HeadError::from(e))
}

/// The model and version a request names; `model` is required.
fn requested_model(
    model: Option<ModelRef>,
) -> Result<
    (
        medray_core::models::ModelName,
        medray_core::models::VersionRef,
    ),
    Status,
> {
    let model = model.ok_or_else(|| Status::invalid_argument("missing field `model`"))?;
    version_ref(model).map_err(core_status)
}

#[tonic::async_trait]
impl Client for ClientService {
    async fn submit_job(
        &self,
        request: Request<SubmitJobRequest>,
    ) -> Result<Response<SubmitJobResponse>, Status> {
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("missing field `spec`"))?;
        validate_spec(&spec)?;
        let job = self
            .manager
            .call(
                |r| ManagerMsg::Submit(Box::new(spec), r),
                Some(ACTOR_TIMEOUT),
            )
            .await
            .map_err(unavailable)?
            .success_or_else(|| unavailable("job manager timeout"))?
            .map_err(Status::from)?;
        Ok(Response::new(SubmitJobResponse { job: Some(job) }))
    }

    async fn get_job(
        &self,
        request: Request<GetJobRequest>,
    ) -> Result<Response<GetJobResponse>, Status> {
        let id = job_id(&request.into_inner().job_id)?;
        let job = self
            .ctx
            .store
            .job(&id)
            .map_err(Status::from)?
            .ok_or_else(|| Status::not_found(format!("job `{id}` not found")))?;
        Ok(Response::new(GetJobResponse { job: Some(job) }))
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let limit = match request.into_inner().limit {
            0 => 100,
            n => n.min(10_000),
        };
        let jobs = self.ctx.store.jobs(limit).map_err(Status::from)?;
        Ok(Response::new(ListJobsResponse { jobs }))
    }

    async fn cancel_job(
        &self,
        request: Request<CancelJobRequest>,
    ) -> Result<Response<CancelJobResponse>, Status> {
        let id = job_id(&request.into_inner().job_id)?;
        let job = self
            .manager
            .call(|r| ManagerMsg::Cancel(id, r), Some(ACTOR_TIMEOUT))
            .await
            .map_err(unavailable)?
            .success_or_else(|| unavailable("job manager timeout"))?
            .map_err(|e| match e {
                crate::HeadError::InvalidArgument { reason, .. } => {
                    Status::failed_precondition(reason)
                }
                other => Status::from(other),
            })?;
        Ok(Response::new(CancelJobResponse { job: Some(job) }))
    }

    type StreamJobLogsStream = BoxStream<LogLine>;

    async fn stream_job_logs(
        &self,
        request: Request<StreamJobLogsRequest>,
    ) -> Result<Response<Self::StreamJobLogsStream>, Status> {
        let req = request.into_inner();
        let id = job_id(&req.job_id)?;
        if self.ctx.store.job(&id).map_err(Status::from)?.is_none() {
            return Err(Status::not_found(format!("job `{id}` not found")));
        }
        let rows = self.ctx.logs.read(id, req.from_seq, req.follow);
        let lines = tokio_stream::wrappers::ReceiverStream::new(rows).map(|row| {
            let r = row.map_err(Status::from)?;
            let progress = r.train_progress();
            Ok(LogLine {
                seq: r.seq,
                time: r.time,
                worker_id: r.worker_id,
                line: r.line,
                progress,
            })
        });
        Ok(Response::new(Box::pin(lines)))
    }

    async fn cluster_status(
        &self,
        _request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let workers = self
            .registry
            .call(RegistryMsg::Snapshot, Some(ACTOR_TIMEOUT))
            .await
            .map_err(unavailable)?
            .success_or_else(|| unavailable("registry timeout"))?;
        let jobs = self.ctx.store.jobs(20).map_err(Status::from)?;
        Ok(Response::new(ClusterStatusResponse {
            workers,
            jobs,
            version: env!("CARGO_PKG_VERSION").into(),
            protocol_version: medray_proto::PROTOCOL_VERSION,
            min_workers: self.ctx.config.min_workers,
        }))
    }

    async fn list_datasets(
        &self,
        _request: Request<ListDatasetsRequest>,
    ) -> Result<Response<ListDatasetsResponse>, Status> {
        let datasets = self
            .ctx
            .catalog()
            .and_then(|c| Ok(c.datasets()?))
            .map_err(Status::from)?
            .into_iter()
            .map(|d| DatasetInfo::from(&d))
            .collect();
        Ok(Response::new(ListDatasetsResponse { datasets }))
    }

    async fn get_dataset(
        &self,
        request: Request<GetDatasetRequest>,
    ) -> Result<Response<GetDatasetResponse>, Status> {
        let name = DatasetName::new(request.into_inner().name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let catalog = self.ctx.catalog().map_err(Status::from)?;
        let d = catalog
            .dataset(&name)
            .map_err(|e| Status::internal(e.to_string()))?
            .ok_or_else(|| Status::not_found(format!("dataset `{name}` not found")))?;
        let cases = catalog
            .cases(&name)
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(dataset_response(&d, &cases)))
    }

    async fn stage_list(
        &self,
        request: Request<StageListRequest>,
    ) -> Result<Response<StageListResponse>, Status> {
        let prefix = request.into_inner().prefix;
        let objects = self
            .ctx
            .stage
            .list(&prefix)
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .into_iter()
            .map(|o| StageObject {
                key: o.key.as_str().to_string(),
                stored_bytes: o.stored_bytes,
            })
            .collect();
        Ok(Response::new(StageListResponse { objects }))
    }

    type StageGetStream = BoxStream<ObjectChunk>;

    async fn stage_get(
        &self,
        request: Request<StageGetRequest>,
    ) -> Result<Response<Self::StageGetStream>, Status> {
        let key = request.into_inner().key;
        Ok(Response::new(
            object_stream(&self.ctx, &key, "to_client").await?,
        ))
    }

    async fn stage_put(
        &self,
        request: Request<Streaming<StagePutRequest>>,
    ) -> Result<Response<StagePutResponse>, Status> {
        let mut stream = request.into_inner();
        let mut key = None;
        let mut data = Vec::new();
        while let Some(msg) = stream.next().await {
            let msg = msg?;
            if key.is_none() {
                if msg.key.is_empty() {
                    return Err(Status::invalid_argument(
                        "the first message must name the `key`",
                    ));
                }
                key = Some(
                    medray_core::stage::ObjectKey::new(msg.key.clone())
                        .map_err(|e| Status::invalid_argument(e.to_string()))?,
                );
            }
            if (data.len() + msg.data.len()) as u64 > self.ctx.config.max_put_bytes {
                return Err(Status::resource_exhausted(format!(
                    "object larger than the head's --max-upload-bytes of {} bytes",
                    self.ctx.config.max_put_bytes
                )));
            }
            data.extend_from_slice(&msg.data);
        }
        let key = key.ok_or_else(|| Status::invalid_argument("empty upload: no key"))?;
        self.ctx
            .stage
            .put(&key, &data)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        self.ctx.metrics.moved("from_client", data.len() as u64);
        Ok(Response::new(StagePutResponse {
            bytes: data.len() as u64,
            sha256: hex::encode(Sha256::digest(&data)),
        }))
    }

    async fn list_models(
        &self,
        _request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        let catalog = self.ctx.catalog().map_err(Status::from)?;
        let versions = medray_core::models::list_models(&catalog)
            .map_err(core_status)?
            .iter()
            .map(ModelVersionInfo::from)
            .collect();
        Ok(Response::new(ListModelsResponse { versions }))
    }

    async fn get_model(
        &self,
        request: Request<GetModelRequest>,
    ) -> Result<Response<GetModelResponse>, Status> {
        let (name, which) = requested_model(request.into_inner().model)?;
        let catalog = self.ctx.catalog().map_err(Status::from)?;
        let v = medray_core::models::model_version(&catalog, &name, &which).map_err(core_status)?;
        Ok(Response::new(GetModelResponse {
            version: Some(ModelVersionInfo::from(&v)),
        }))
    }

    type ExportModelStream = BoxStream<ObjectChunk>;

    async fn export_model(
        &self,
        request: Request<ExportModelRequest>,
    ) -> Result<Response<Self::ExportModelStream>, Status> {
        let (name, which) = requested_model(request.into_inner().model)?;
        let v = {
            let catalog = self.ctx.catalog().map_err(Status::from)?;
            medray_core::models::model_version(&catalog, &name, &which).map_err(core_status)?
        };
        let data = medray_core::models::load_weights(&self.ctx.stage, &v)
            .await
            .map_err(core_status)?;
        Ok(Response::new(chunk_stream(&self.ctx, data, "to_client")))
    }

    async fn import_model(
        &self,
        request: Request<Streaming<ImportModelRequest>>,
    ) -> Result<Response<ImportModelResponse>, Status> {
        let mut stream = request.into_inner();
        let first = stream
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty upload: no header"))??;
        let header = first
            .header
            .ok_or_else(|| Status::invalid_argument("the first message must carry the `header`"))?;
        let mut data = first.data;
        let limit = self.ctx.config.max_put_bytes;
        if header.size > limit {
            return Err(Status::resource_exhausted(format!(
                "weights of {} bytes are larger than the head's --max-upload-bytes of {limit} bytes",
                header.size
            )));
        }
        while let Some(msg) = stream.next().await {
            let msg = msg?;
            if (data.len() + msg.data.len()) as u64 > header.size {
                return Err(Status::invalid_argument(format!(
                    "more data than the announced `size` of {} bytes",
                    header.size
                )));
            }
            data.extend_from_slice(&msg.data);
        }
        let sha256 = hex::encode(Sha256::digest(&data));
        if data.len() as u64 != header.size || sha256 != header.sha256 {
            return Err(Status::data_loss(format!(
                "upload damaged: {} of {} bytes, sha256 {sha256} instead of {}",
                data.len(),
                header.size,
                header.sha256
            )));
        }
        self.ctx.metrics.moved("from_client", data.len() as u64);
        let name = medray_core::models::ModelName::new(header.name).map_err(core_status)?;
        let model_config: medray_core::model::ModelConfig =
            serde_json::from_str(&header.model_config_json).map_err(|e| {
                Status::invalid_argument(format!("invalid `model_config_json`: {e}"))
            })?;
        let train_config_json = if header.train_config_json.is_empty() {
            "{}".to_string()
        } else {
            header.train_config_json
        };
        let new = medray_core::models::NewModelVersion::imported(
            name,
            (!header.version.is_empty()).then_some(header.version),
            model_config,
            data,
            train_config_json,
        );
        let mut catalog = self.ctx.catalog().map_err(Status::from)?;
        let v = medray_core::models::register_model(&self.ctx.stage, &mut catalog, new)
            .await
            .map_err(core_status)?;
        Ok(Response::new(ImportModelResponse {
            version: Some(ModelVersionInfo::from(&v)),
        }))
    }

    async fn set_model_alias(
        &self,
        request: Request<SetModelAliasRequest>,
    ) -> Result<Response<SetModelAliasResponse>, Status> {
        let req = request.into_inner();
        let name = medray_core::models::ModelName::new(req.name).map_err(core_status)?;
        let mut catalog = self.ctx.catalog().map_err(Status::from)?;
        let previous =
            medray_core::models::set_alias(&mut catalog, &name, &req.alias, &req.version)
                .map_err(core_status)?;
        Ok(Response::new(SetModelAliasResponse {
            previous_version: previous.unwrap_or_default(),
        }))
    }

    async fn delete_model(
        &self,
        request: Request<DeleteModelRequest>,
    ) -> Result<Response<DeleteModelResponse>, Status> {
        let req = request.into_inner();
        let name = medray_core::models::ModelName::new(req.name).map_err(core_status)?;
        let mut catalog = self.ctx.catalog().map_err(Status::from)?;
        let v = medray_core::models::delete_version(
            &self.ctx.stage,
            &mut catalog,
            &name,
            &req.version,
            req.force,
        )
        .await
        .map_err(core_status)?;
        Ok(Response::new(DeleteModelResponse {
            version: Some(ModelVersionInfo::from(&v)),
        }))
    }

    async fn list_results(
        &self,
        request: Request<ListResultsRequest>,
    ) -> Result<Response<ListResultsResponse>, Status> {
        let filter = medray_core::results::ResultFilter::from(request.into_inner());
        filter.validate().map_err(core_status)?;
        let ctx = self.ctx.clone();
        let rows = tokio::task::spawn_blocking(move || {
            let catalog = ctx.catalog()?;
            Ok::<_, crate::HeadError>(medray_core::results::list_results(&catalog, &filter)?)
        })
        .await
        .map_err(|e| Status::internal(format!("results query: {e}")))?
        .map_err(Status::from)?;
        Ok(Response::new(ListResultsResponse {
            results: rows.iter().map(CaseResult::from).collect(),
        }))
    }

    async fn query_catalog(
        &self,
        request: Request<QueryCatalogRequest>,
    ) -> Result<Response<QueryCatalogResponse>, Status> {
        let r = request.into_inner();
        medray_core::catalog::query::check_sql_text(&r.sql).map_err(core_status)?;
        let max_rows = match r.max_rows {
            0 => MAX_ROWS,
            n => n.min(MAX_ROWS),
        } as usize;
        let path = self.ctx.catalog_path.clone();
        let limits = medray_core::catalog::query::QueryLimits {
            max_rows,
            max_bytes: self.ctx.config.query_byte_cap(),
            time_limit: QUERY_TIME_LIMIT,
        };
        let answer = tokio::task::spawn_blocking(move || {
            medray_core::catalog::query::query_read_only(&path, &r.sql, &limits)
        })
        .await
        .map_err(|e| Status::internal(format!("sql query: {e}")))?
        .map_err(core_status)?;
        Ok(Response::new(QueryCatalogResponse::from(answer)))
    }
}
