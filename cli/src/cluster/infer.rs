//! `medray infer`: register every case of a dataset (or the listed ones) with a model
//! version on the cluster's workers, then print the job's results table.

use medray_core::results::ResultFilter;
use medray_proto::v1::job_spec::Kind;
use medray_proto::v1::{InferSpec, JobSpec, RefineSpec};

use super::client::ClientArgs;
use crate::results::{print_results, remote_results, Format};

/// Arguments of `medray infer`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Dataset in the cluster's catalog (see `medray datasets list`).
    #[arg(long)]
    pub dataset: String,
    /// Model in the registry (see `medray models list`).
    #[arg(long)]
    pub model: String,
    /// Model version (default: the latest registered).
    #[arg(long, conflicts_with = "alias")]
    pub version: Option<String>,
    /// Model alias, e.g. production.
    #[arg(long)]
    pub alias: Option<String>,
    /// Most workers running the job's cases at once (default: every worker).
    #[arg(long, default_value_t = 0)]
    pub workers: u32,
    /// Only these cases (comma-separated ids).
    #[arg(long, value_delimiter = ',', value_name = "ID,...")]
    pub cases: Vec<String>,
    /// Instance optimisation on every case, as `medray predict` runs it.
    #[command(flatten)]
    pub refinement: crate::refine_args::RefineArgs,
    /// Diagnostics: keep each case's task running at least this long, ms.
    #[arg(long, default_value_t = 0, hide = true)]
    pub hold_ms: u32,
    /// Print the job id and return instead of following the job.
    #[arg(long)]
    pub no_wait: bool,
    /// How the results table is printed at the end.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
}

/// Submits the inference job and (by default) follows it, then prints its results.
pub fn run(args: Args) -> anyhow::Result<()> {
    let cases: Vec<String> = args
        .cases
        .iter()
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .collect();
    let refine = args.refinement.options()?;
    let refine_steps = u32::try_from(refine.steps)?;
    let rt = crate::data_dir::runtime()?;
    rt.block_on(async {
        let mut client = args.client.connect().await?;
        let spec = JobSpec {
            kind: Some(Kind::Infer(Box::new(InferSpec {
                dataset: args.dataset.clone(),
                model: args.model.clone(),
                version: args.version.clone().unwrap_or_default(),
                alias: args.alias.clone().unwrap_or_default(),
                workers: args.workers,
                cases,
                refine_steps,
                hold_ms: args.hold_ms,
                refine: Some(RefineSpec {
                    sim: Some(refine.sim.name().to_string()),
                    levels: Some(u32::try_from(refine.levels)?),
                    lambda: Some(refine.lambda),
                    grid: Some(u32::try_from(refine.grid_spacing)?),
                    lr: Some(refine.lr),
                    mask: refine.mask,
                }),
            }))),
        };
        let job = super::job::submit_and_wait(&mut client, spec, args.no_wait).await?;
        if args.no_wait {
            return Ok(());
        }
        let r: serde_json::Value =
            serde_json::from_str(&job.result_json).unwrap_or(serde_json::Value::Null);
        let rows = remote_results(
            &mut client,
            &ResultFilter {
                job_id: Some(job.id.clone()),
                ..ResultFilter::default()
            },
        )
        .await?;
        print_results(&rows, args.format);
        // The means are in the table's summary, by split (held-out apart from training).
        eprintln!(
            "{}: {} case(s) with {}:{}, {} succeeded, {} failed; outputs in results/{}/{}/",
            job.id,
            r["cases"],
            args.model,
            r["version"].as_str().unwrap_or("?"),
            r["succeeded"],
            r["failed"],
            args.model,
            r["version"].as_str().unwrap_or("?"),
        );
        if r["failed"].as_u64().unwrap_or(0) > 0 {
            eprintln!(
                "warning: {} case(s) FAILED (see the error column, or `medray results --job {} --format json`)",
                r["failed"], job.id
            );
        }
        Ok(())
    })
}
