//! `medray job list|status|logs|cancel`, and the wait-and-stream used by every submitting
//! command.

use medray_proto::v1::{
    CancelJobRequest, GetJobRequest, Job, JobSpec, JobState, ListJobsRequest, StreamJobLogsRequest,
    SubmitJobRequest,
};

use super::client::{status_error, ClientArgs, HeadClient};

/// Arguments of `medray job`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// `medray job` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// List recent jobs.
    List {
        /// How many (newest first).
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Show a job (exit status 1 if it failed or was cancelled).
    Status {
        /// Job id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a job's log.
    Logs {
        /// Job id.
        id: String,
        /// Keep printing until the job ends.
        #[arg(long, short)]
        follow: bool,
    },
    /// Cancel a job.
    Cancel {
        /// Job id.
        id: String,
    },
}

/// JSON view of a job.
#[must_use]
pub fn job_json(j: &Job) -> serde_json::Value {
    let state = JobState::try_from(j.state).unwrap_or(JobState::Unspecified);
    serde_json::json!({
        "id": j.id, "kind": j.kind, "state": state.label(), "reason": j.reason,
        "created_at": j.created_at, "started_at": j.started_at, "finished_at": j.finished_at,
        "tasks_total": j.tasks_total, "tasks_succeeded": j.tasks_succeeded,
        "result": serde_json::from_str::<serde_json::Value>(&j.result_json).unwrap_or(serde_json::Value::Null),
    })
}

fn state(j: &Job) -> JobState {
    JobState::try_from(j.state).unwrap_or(JobState::Unspecified)
}

/// Streams a job's log to stdout from `from_seq`; with `follow`, until the job ends.
pub async fn print_logs(client: &mut HeadClient, id: &str, follow: bool) -> anyhow::Result<()> {
    let mut stream = client
        .stream_job_logs(StreamJobLogsRequest {
            job_id: id.to_string(),
            from_seq: 0,
            follow,
        })
        .await
        .map_err(|e| status_error("logs", e))?
        .into_inner();
    while let Some(line) = stream
        .message()
        .await
        .map_err(|e| status_error("logs", e))?
    {
        if line.worker_id.is_empty() {
            println!("{} {}", line.time, line.line);
        } else {
            println!("{} [{}] {}", line.time, line.worker_id, line.line);
        }
    }
    Ok(())
}

/// Fetches a job.
pub async fn get(client: &mut HeadClient, id: &str) -> anyhow::Result<Job> {
    client
        .get_job(GetJobRequest {
            job_id: id.to_string(),
        })
        .await
        .map_err(|e| status_error("job status", e))?
        .into_inner()
        .job
        .ok_or_else(|| anyhow::anyhow!("the head answered without a job"))
}

/// Submits a job and says so on stderr.
pub async fn submit_only(client: &mut HeadClient, spec: JobSpec) -> anyhow::Result<Job> {
    let job = client
        .submit_job(SubmitJobRequest { spec: Some(spec) })
        .await
        .map_err(|e| status_error("submit", e))?
        .into_inner()
        .job
        .ok_or_else(|| anyhow::anyhow!("the head answered without a job"))?;
    eprintln!("submitted {} ({})", job.id, job.kind);
    Ok(job)
}

/// Submits a job; unless `no_wait`, streams its log until it ends and fails when the job
/// does not succeed.
pub async fn submit_and_wait(
    client: &mut HeadClient,
    spec: JobSpec,
    no_wait: bool,
) -> anyhow::Result<Job> {
    let job = submit_only(client, spec).await?;
    if no_wait {
        println!("{}", job.id);
        return Ok(job);
    }
    print_logs(client, &job.id, true).await?;
    let job = get(client, &job.id).await?;
    match state(&job) {
        JobState::Succeeded => Ok(job),
        s => anyhow::bail!("job {} {}: {}", job.id, s.label(), job.reason),
    }
}

/// Runs `medray job ...`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let rt = crate::data_dir::runtime()?;
    rt.block_on(async {
        let mut client = args.client.connect().await?;
        match args.command {
            Command::List { limit } => {
                let jobs = client
                    .list_jobs(ListJobsRequest { limit })
                    .await
                    .map_err(|e| status_error("job list", e))?
                    .into_inner()
                    .jobs;
                println!(
                    "{:<12} {:<9} {:<10} {:>7} {:<25} REASON",
                    "JOB", "KIND", "STATE", "TASKS", "CREATED"
                );
                for j in jobs {
                    println!(
                        "{:<12} {:<9} {:<10} {:>3}/{:<3} {:<25} {}",
                        j.id,
                        j.kind,
                        state(&j).label(),
                        j.tasks_succeeded,
                        j.tasks_total,
                        j.created_at,
                        j.reason
                    );
                }
                Ok(())
            }
            Command::Status { id, json } => {
                let j = get(&mut client, &id).await?;
                if json {
                    println!("{}", job_json(&j));
                } else {
                    println!("job:      {}", j.id);
                    println!("kind:     {}", j.kind);
                    println!("state:    {}", state(&j).label());
                    if !j.reason.is_empty() {
                        println!("reason:   {}", j.reason);
                    }
                    println!(
                        "tasks:    {}/{} succeeded",
                        j.tasks_succeeded, j.tasks_total
                    );
                    println!("created:  {}", j.created_at);
                    println!("started:  {}", j.started_at);
                    println!("finished: {}", j.finished_at);
                    if !j.result_json.is_empty() {
                        println!("result:   {}", j.result_json);
                    }
                }
                match state(&j) {
                    JobState::Failed | JobState::Cancelled => {
                        anyhow::bail!("job {} {}: {}", j.id, state(&j).label(), j.reason)
                    }
                    _ => Ok(()),
                }
            }
            Command::Logs { id, follow } => print_logs(&mut client, &id, follow).await,
            Command::Cancel { id } => {
                let j = client
                    .cancel_job(CancelJobRequest { job_id: id })
                    .await
                    .map_err(|e| status_error("cancel", e))?
                    .into_inner()
                    .job
                    .ok_or_else(|| anyhow::anyhow!("the head answered without a job"))?;
                println!("{} {}", j.id, state(&j).label());
                Ok(())
            }
        }
    })
}
