//! `medray status`: workers and recent jobs of the cluster. A worker that was lost (killed,
//! hung, evicted, left) is listed LOST, with why and when, for the head's
//! `--lost-worker-retention-s` (default 10 minutes) after it went.

use medray_proto::v1::{ClusterStatusRequest, JobState};

use super::client::{status_error, ClientArgs};

/// Arguments of `medray status`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// Prints the cluster's state.
pub fn run(args: Args) -> anyhow::Result<()> {
    let rt = crate::data_dir::runtime()?;
    rt.block_on(async {
        let mut client = args.client.connect().await?;
        let s = client
            .cluster_status(ClusterStatusRequest {})
            .await
            .map_err(|e| status_error("status", e))?
            .into_inner();
        if args.json {
            let workers: Vec<_> = s
                .workers
                .iter()
                .map(|w| {
                    serde_json::json!({
                        "worker_id": w.worker_id, "name": w.name, "device": w.device,
                        "state": w.state, "last_heartbeat_age_s": w.last_heartbeat_age_s,
                        "current_task": w.current_task, "cores": w.cores,
                        "memory_bytes": w.memory_bytes, "version": w.version,
                        "gpu_name": w.gpu_name, "gpu_memory_bytes": w.gpu_memory_bytes,
                        "lost_reason": w.lost_reason, "lost_at": w.lost_at,
                        "lost_age_s": w.lost_age_s,
                    })
                })
                .collect();
            let jobs: Vec<_> = s.jobs.iter().map(super::job::job_json).collect();
            println!(
                "{}",
                serde_json::json!({"version": s.version, "protocol_version": s.protocol_version,
                    "workers": workers, "jobs": jobs})
            );
            return Ok(());
        }
        let lost = s.workers.iter().filter(|w| w.state == "LOST").count();
        println!(
            "head: medray {} (protocol {}), {} worker(s){}",
            s.version,
            s.protocol_version,
            s.workers.len() - lost,
            if lost > 0 {
                format!(", {lost} lost recently")
            } else {
                String::new()
            }
        );
        println!(
            "{:<15} {:<24} {:<8} {:<8} {:>9} {:<24}",
            "WORKER", "NAME", "DEVICE", "STATE", "HEARTBEAT", "TASK"
        );
        for w in &s.workers {
            println!(
                "{:<15} {:<24} {:<8} {:<8} {:>8.1}s {:<24}",
                w.worker_id,
                w.name,
                w.device,
                w.state,
                w.last_heartbeat_age_s,
                if w.current_task.is_empty() {
                    "-"
                } else {
                    &w.current_task
                }
            );
            if !w.gpu_name.is_empty() {
                println!(
                    "{:<15} GPU {} ({:.1} GiB)",
                    "",
                    w.gpu_name,
                    w.gpu_memory_bytes as f64 / (1u64 << 30) as f64
                );
            }
            if w.state == "LOST" {
                println!(
                    "{:<15} lost {:.1} s ago ({}): {}",
                    "", w.lost_age_s, w.lost_at, w.lost_reason
                );
            }
        }
        println!();
        println!(
            "{:<12} {:<9} {:<10} {:>7} REASON",
            "JOB", "KIND", "STATE", "TASKS"
        );
        for j in &s.jobs {
            let state = JobState::try_from(j.state).unwrap_or(JobState::Unspecified);
            println!(
                "{:<12} {:<9} {:<10} {:>3}/{:<3} {}",
                j.id,
                j.kind,
                state.label(),
                j.tasks_succeeded,
                j.tasks_total,
                j.reason
            );
        }
        Ok(())
    })
}
