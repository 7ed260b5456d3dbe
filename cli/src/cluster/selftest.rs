//! `medray selftest`: every worker fetches a case through the head, runs a LocalNet
//! forward and a warp, and reports its time and device.

use medray_proto::v1::job_spec::Kind;
use medray_proto::v1::{JobSpec, SelftestSpec};

use super::client::ClientArgs;

/// Arguments of `medray selftest`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Dataset to take a case from (default: a small synthetic case).
    #[arg(long)]
    pub dataset: Option<String>,
    /// Number of workers that must run it (default: every registered worker).
    #[arg(long, default_value_t = 0)]
    pub workers: u32,
    /// Edge of the cubic LocalNet input, voxels (multiple of 4, 16-128).
    #[arg(long, default_value_t = 32)]
    pub size: u32,
    /// Diagnostics: keep each task running at least this long, ms.
    #[arg(long, default_value_t = 0)]
    pub hold_ms: u32,
    /// Diagnostics: numbered log lines each task prints.
    #[arg(long, default_value_t = 0)]
    pub log_lines: u32,
    /// Print the job id and return instead of streaming its log.
    #[arg(long)]
    pub no_wait: bool,
}

/// Submits the selftest and (by default) waits for it.
pub fn run(args: Args) -> anyhow::Result<()> {
    let rt = crate::data_dir::runtime()?;
    rt.block_on(async {
        let mut client = args.client.connect().await?;
        let spec = JobSpec {
            kind: Some(Kind::Selftest(SelftestSpec {
                dataset: args.dataset.unwrap_or_default(),
                workers: args.workers,
                size: args.size,
                hold_ms: args.hold_ms,
                log_lines: args.log_lines,
            })),
        };
        let job = super::job::submit_and_wait(&mut client, spec, args.no_wait).await?;
        if !args.no_wait {
            let results: serde_json::Value =
                serde_json::from_str(&job.result_json).unwrap_or(serde_json::Value::Null);
            println!(
                "{:<8} {:<15} {:<8} {:>10} {:>11} {:>9}",
                "TASK", "WORKER", "DEVICE", "FETCH ms", "FORWARD ms", "WARP ms"
            );
            for r in results.as_array().into_iter().flatten() {
                let v = &r["result"];
                println!(
                    "{:<8} {:<15} {:<8} {:>10.1} {:>11.1} {:>9.1}",
                    r["task"].as_str().unwrap_or("?"),
                    r["worker"].as_str().unwrap_or("?"),
                    v["device"].as_str().unwrap_or("?"),
                    v["fetch_ms"].as_f64().unwrap_or(f64::NAN),
                    v["forward_ms"].as_f64().unwrap_or(f64::NAN),
                    v["warp_ms"].as_f64().unwrap_or(f64::NAN),
                );
            }
        }
        Ok(())
    })
}
