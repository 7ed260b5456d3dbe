//! `medray ingest` through the head: the ingestion runs on the head (a blocking task), its
//! progress goes to the job's log.

use medray_core::catalog::{DatasetName, PublishOutcome};
use medray_core::ingest::{
    ingest_dir, ingest_dirlab, ingest_learn2reg, ingest_manifest, ingest_nlst, ingest_synthetic,
    DirLabConfig, DirLabTable, DownloadConfig, IngestOptions, IngestReport, Learn2RegConfig,
    NlstConfig, LEARN2REG_URL,
};
use medray_core::synth::SynthConfig;
use medray_proto::v1::ingest_spec::Source;
use medray_proto::v1::IngestSpec;

use super::{Job, JobKind, JobMsg};
use crate::context::HeadContext;
use crate::ids::TaskId;
use crate::scheduler::TaskEnd;
use crate::{HeadError, Result};

/// Runs `f` (an ingest into the stage and catalog) on a blocking thread.
pub(super) async fn run_ingest_blocking<F>(ctx: &HeadContext, f: F) -> Result<IngestReport>
where
    F: FnOnce(
            &medray_core::stage::Stage,
            &mut medray_core::catalog::Catalog,
        ) -> medray_core::Result<IngestReport>
        + Send
        + 'static,
{
    let ctx = ctx.clone();
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let _guard = handle.enter();
        let mut catalog = ctx.catalog()?;
        Ok(f(&ctx.stage, &mut catalog)?)
    })
    .await
    .map_err(|e| HeadError::Actor(format!("ingest thread: {e}")))?
}

/// An ingest job: no tasks, the ingest runs on the head.
#[derive(Debug)]
pub(super) struct IngestJob {
    spec: IngestSpec,
    /// The running ingest.
    task: Option<tokio::task::JoinHandle<()>>,
}

impl IngestJob {
    pub(super) fn new(spec: IngestSpec) -> Self {
        Self { spec, task: None }
    }
}

impl JobKind for IngestJob {
    async fn start(&mut self, job: &mut Job) -> Result<()> {
        self.task = Some(start_ingest(job, self.spec.clone())?);
        Ok(())
    }

    fn task_ended(&mut self, _job: &mut Job, _task_id: TaskId, _end: TaskEnd) -> Result<()> {
        // An ingest has no tasks.
        Ok(())
    }

    fn cancel_refused(&self) -> Option<&'static str> {
        self.task.as_ref().is_some_and(|t| !t.is_finished()).then_some(
            "a running ingest cannot be cancelled (it publishes atomically, nothing is visible until it ends); wait for it to end",
        )
    }
}

/// Starts the ingest on a blocking thread; it sends [`JobMsg::WorkDone`] when it ends.
fn start_ingest(job: &mut Job, spec: IngestSpec) -> Result<tokio::task::JoinHandle<()>> {
    if job.resumed {
        job.log("head restarted during the ingest: running it again (ingest is idempotent)");
    }
    let mut options = IngestOptions::default()
        .with_skip_bad(spec.skip_bad)
        .with_replace(spec.replace);
    if !spec.name.is_empty() {
        options = options.with_name(DatasetName::new(spec.name.clone())?);
    }
    let source = spec
        .source
        .ok_or_else(|| HeadError::invalid("spec.ingest.source", "missing"))?;
    job.mark_running()?;
    let ctx = job.ctx.clone();
    let job_id = job.job_id.clone();
    let me = job.myself.clone();
    let handle = tokio::runtime::Handle::current();
    let task = tokio::task::spawn_blocking(move || {
        let _guard = handle.enter();
        let logs = ctx.logs.clone();
        let mut last = (None, 0u64);
        let progress = |phase: medray_core::ingest::IngestPhase, done: u64, total: u64| {
            let pct = (done * 100).checked_div(total).unwrap_or(100);
            if last.0 != Some(phase) || pct >= last.1 + 10 || done == total {
                logs.line(&job_id, format!("{phase:?}: {done}/{total}"));
                last = (Some(phase), pct);
            }
        };
        let result: medray_core::Result<IngestReport> = (|| {
            let mut catalog = ctx
                .catalog()
                .map_err(|e| medray_core::Error::invalid("catalog", e.to_string()))?;
            match source {
                Source::Synthetic(src) => {
                    let size: [usize; 3] = match src.size.as_slice() {
                        [] => [192, 192, 208],
                        [x, y, z] => [*x as usize, *y as usize, *z as usize],
                        _ => {
                            return Err(medray_core::Error::invalid(
                                "spec.ingest.synthetic.size",
                                "expected three values X Y Z",
                            ))
                        }
                    };
                    let config = SynthConfig::default()
                        .with_cases(src.cases as usize)
                        .with_size(size)
                        .with_seed(src.seed);
                    handle.block_on(ingest_synthetic(
                        &ctx.stage,
                        &mut catalog,
                        &config,
                        &options,
                        progress,
                    ))
                }
                Source::Dir(src) if src.path.ends_with(".csv") => handle.block_on(ingest_manifest(
                    &ctx.stage,
                    &mut catalog,
                    std::path::Path::new(&src.path),
                    &options,
                    progress,
                )),
                Source::Dir(src) => handle.block_on(ingest_dir(
                    &ctx.stage,
                    &mut catalog,
                    std::path::Path::new(&src.path),
                    &options,
                    progress,
                )),
                Source::Dirlab(src) => {
                    let mut config = DirLabConfig::new(&src.path).with_cases(src.cases);
                    if !src.table.is_empty() {
                        let table = DirLabTable::read_csv(std::path::Path::new(&src.table))?;
                        config = config.with_table(DirLabTable::benchmark().with_overrides(&table));
                    }
                    if let Some(offset) = src.hu_offset {
                        config = config.with_hu_offset(offset);
                    }
                    handle.block_on(ingest_dirlab(
                        &ctx.stage,
                        &mut catalog,
                        &config,
                        &options,
                        progress,
                    ))
                }
                Source::Nlst(src) => {
                    let config = NlstConfig::new(&src.path).with_pair_lists(src.pair_lists);
                    handle.block_on(ingest_nlst(
                        &ctx.stage,
                        &mut catalog,
                        &config,
                        &options,
                        progress,
                    ))
                }
                Source::Learn2reg(src) => {
                    let url = if src.url.is_empty() {
                        LEARN2REG_URL.to_string()
                    } else {
                        src.url
                    };
                    let mut download = DownloadConfig::new(url);
                    if !src.sha256.is_empty() {
                        download = download.with_sha256(src.sha256);
                    }
                    if !src.md5.is_empty() {
                        download = download.with_md5(src.md5);
                    }
                    let config = Learn2RegConfig::new(ctx.config.data_dir.join("downloads"))
                        .with_download(download);
                    handle.block_on(ingest_learn2reg(
                        &ctx.stage,
                        &mut catalog,
                        &config,
                        &options,
                        progress,
                    ))
                }
            }
        })();
        let done = result.map(|r| {
            serde_json::json!({
                "dataset": r.name.as_str(),
                "outcome": match r.outcome {
                    PublishOutcome::Created => "created",
                    PublishOutcome::Unchanged => "unchanged",
                    PublishOutcome::Replaced { .. } => "replaced",
                },
                "cases": r.cases,
                "bad_cases": r.bad.len(),
                "bytes": r.bytes,
                "objects_written": r.objects_written,
            })
            .to_string()
        });
        if let Ok(json) = &done {
            logs.line(&job_id, format!("ingest done: {json}"));
        }
        let _ = me.cast(JobMsg::WorkDone(done.map_err(|e| e.to_string())));
    });
    Ok(task)
}
