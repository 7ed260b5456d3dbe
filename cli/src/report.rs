//! `medray report --job ID --out DIR`: the inference report of a job as a folder, an
//! `index.html` (settings, summary statistics, the per-case table, the pictures) with the
//! case pictures in `cases/`. The head serves the same page at `/jobs/<job>/report/`. Runs
//! through the head, or on a local data directory (the rules of [`DataArgs::target`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::Context;
use medray_core::report::{plan, ReportJob, ReportPlan};
use medray_core::results::{list_results, results_prefix, ResultFilter, ResultRow};
use medray_core::stage::ObjectKey;
use medray_head::ids::JobId;
use medray_head::report::stored_report_job;
use medray_proto::v1::{GetJobRequest, StageListRequest};

use crate::cluster::client::{status_error, ClientArgs};
use crate::data_dir::{DataArgs, Target};
use crate::remote::fetch_object;
use crate::results::remote_results;

/// Arguments of `medray report`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    client: ClientArgs,
    /// The inference job (as `medray infer` and `medray job list` print it).
    #[arg(long, required_unless_present = "index_link")]
    job: Option<String>,
    /// Folder to write `index.html` and `cases/*.png` into (created; files of an earlier
    /// report of the same job are replaced).
    #[arg(long, required_unless_present_any = ["link", "index_link"])]
    out: Option<PathBuf>,
    /// Print a signed link to the job's report page on the head's HTTP address instead (the
    /// pages show patient data: they open only with such a link, made from the cluster
    /// token, until it expires).
    #[arg(long, conflicts_with = "out")]
    link: bool,
    /// Print a signed link to the head's list of inference jobs (`/jobs`).
    #[arg(long, conflicts_with_all = ["out", "link", "job"])]
    index_link: bool,
    /// Hours a printed link stays valid (1 to 720).
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u64).range(1..=720))]
    link_hours: u64,
}

/// Prints a signed link (`--link`, `--index-link`): the path and query, behind the head's
/// HTTP address when `medray up` recorded it here.
fn print_link(args: &Args) -> anyhow::Result<()> {
    let (_, token) = args.client.resolve()?;
    let signer = medray_proto::auth::LinkSigner::new(&token);
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + args.link_hours * 3600;
    let path = match &args.job {
        Some(job) if !args.index_link => {
            check_job_id(job)?;
            format!("/jobs/{job}/report/?{}", signer.query(job, expires))
        }
        _ => format!(
            "/jobs?{}",
            signer.query(medray_proto::auth::INDEX_SCOPE, expires)
        ),
    };
    match crate::cluster::client::read_cluster_file()?.and_then(|f| f.http) {
        Some(http) => println!("http://{http}{path}"),
        None => println!("{path}"),
    }
    Ok(())
}

fn filter(job: &str) -> ResultFilter {
    ResultFilter {
        job_id: Some(job.to_string()),
        order_by: Some("case_id".into()),
        ..ResultFilter::default()
    }
}

/// The stage folder of the job's outputs.
fn outputs_prefix(job: &ReportJob) -> anyhow::Result<String> {
    let dataset = medray_core::catalog::DatasetName::new(job.dataset.clone())
        .with_context(|| format!("job {}: dataset name", job.id))?;
    let model = medray_core::models::ModelName::new(job.model.clone())
        .with_context(|| format!("job {}: model name", job.id))?;
    Ok(results_prefix(&dataset, &model, &job.version)?)
}

/// Checks the job id before it is used in a request or a file name.
fn check_job_id(id: &str) -> anyhow::Result<()> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        anyhow::bail!("--job `{id}`: not a job id (e.g. job-000012)");
    }
    Ok(())
}

/// Runs `medray report`.
pub fn run(args: Args) -> anyhow::Result<()> {
    if args.link || args.index_link {
        return print_link(&args);
    }
    let (Some(job_id), Some(out)) = (args.job.clone(), args.out.clone()) else {
        anyhow::bail!("give --job and --out (or --link / --index-link)");
    };
    check_job_id(&job_id)?;
    let rt = crate::data_dir::runtime()?;
    let (rows, page, pictures) = match args.data.target(&args.client)? {
        Target::Head => rt.block_on(async {
            let mut c = args.client.connect().await?;
            let job = c
                .get_job(GetJobRequest {
                    job_id: job_id.clone(),
                })
                .await
                .map_err(|e| status_error("report", e))?
                .into_inner()
                .job
                .context("the head sent no job")?;
            let info = ReportJob::try_from(&job)?;
            let rows = remote_results(&mut c, &filter(&job_id)).await?;
            let stored: HashSet<String> = c
                .stage_list(StageListRequest {
                    prefix: outputs_prefix(&info)?,
                })
                .await
                .map_err(|e| status_error("report: listing the outputs", e))?
                .into_inner()
                .objects
                .into_iter()
                .map(|o| o.key)
                .collect();
            let page = plan(&info, &rows, &|k| stored.contains(k));
            let mut pictures = Vec::with_capacity(page.pictures.len());
            for (name, key) in &page.pictures {
                pictures.push((name.clone(), fetch_object(&mut c, key).await?));
            }
            Ok::<_, anyhow::Error>((rows, page, pictures))
        })?,
        Target::Local => {
            let dir = args.data.dir();
            let path = dir.join("catalog.db");
            let info = stored_report_job(&dir, &JobId(job_id.clone()))
                .with_context(|| format!("reading job `{job_id}` from {}", path.display()))?
                .with_context(|| format!("job `{job_id}` not found in {}", path.display()))?;
            let rows = list_results(&args.data.open_catalog()?, &filter(&job_id))?;
            let stage = args.data.open_stage()?;
            rt.block_on(async {
                let stored: HashSet<String> = stage
                    .list(&outputs_prefix(&info)?)
                    .await?
                    .into_iter()
                    .map(|o| o.key.as_str().to_string())
                    .collect();
                let page = plan(&info, &rows, &|k| stored.contains(k));
                let mut pictures = Vec::with_capacity(page.pictures.len());
                for (name, key) in &page.pictures {
                    let data = stage
                        .get(&ObjectKey::new(key.clone())?)
                        .await
                        .with_context(|| format!("reading {key}"))?;
                    pictures.push((name.clone(), data));
                }
                Ok::<_, anyhow::Error>((rows, page, pictures))
            })?
        }
    };
    write_report(&out, &page, &pictures)?;
    print_summary(&job_id, &rows, &page, &out);
    Ok(())
}

/// Writes the pictures, then the page (each file atomically).
fn write_report(
    out: &Path,
    page: &ReportPlan,
    pictures: &[(String, Vec<u8>)],
) -> anyhow::Result<()> {
    let cases = out.join("cases");
    std::fs::create_dir_all(&cases).with_context(|| format!("creating {}", cases.display()))?;
    for (name, data) in pictures {
        let path = cases.join(name);
        medray_core::atomic::write_bytes(&path, data)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let index = out.join("index.html");
    medray_core::atomic::write_bytes(&index, page.html.as_bytes())
        .with_context(|| format!("writing {}", index.display()))?;
    Ok(())
}

fn print_summary(job: &str, rows: &[ResultRow], page: &ReportPlan, out: &Path) {
    let failed = rows
        .iter()
        .filter(|r| r.status == medray_core::results::CaseStatus::Failed)
        .count();
    let index = out.join("index.html");
    let shown = std::fs::canonicalize(&index).unwrap_or(index);
    println!(
        "report of {job}: {} case(s) ({failed} failed), {} picture(s)",
        rows.len(),
        page.pictures.len()
    );
    print!("{}", crate::results::split_summary(rows));
    println!("  {}", shown.display());
}
