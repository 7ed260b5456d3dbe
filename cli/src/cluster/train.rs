//! `medray train`: submit a data-parallel training job to the cluster and follow it with a
//! progress bar and the quickstart's epoch line.

use indicatif::{ProgressBar, ProgressStyle};
use medray_proto::v1::job_spec::Kind;
use medray_proto::v1::{JobSpec, StreamJobLogsRequest, TrainSpec};

use super::client::{status_error, ClientArgs, HeadClient};

/// Arguments of `medray train`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Dataset in the cluster's catalog (see `medray datasets list`).
    #[arg(long, required_unless_present = "resume")]
    pub dataset: Option<String>,
    /// Model name to register the trained weights under.
    #[arg(long, required_unless_present = "resume")]
    pub model: Option<String>,
    /// Version to register (default: the next vN).
    #[arg(long)]
    pub version: Option<String>,
    /// Alias to point at the registered version (e.g. production).
    #[arg(long)]
    pub alias: Option<String>,
    /// Network preset: `seed` (the quickstart's) or `full` (LocalNet with its decoder).
    #[arg(long, default_value = "seed", value_parser = ["seed", "full"])]
    pub preset: String,
    /// Objective: `mi-be` (MI + bending energy), `mse-dice-be` (needs masks),
    /// `lncc-dice-diff` (LNCC + Dice on masks when present + diffusion), `mind-diff`
    /// (MIND-SSC SSD + diffusion) or `mse-dice-kp-be` (`mse-dice-be` + the mean TRE in mm of
    /// each training case's keypoint pairs: needs masks and keypoints on the training cases;
    /// validation cases' keypoints are never used).
    #[arg(long, default_value = "mi-be", value_parser = ["mi-be", "mse-dice-be", "lncc-dice-diff", "mind-diff", "mse-dice-kp-be"])]
    pub loss: String,
    /// Epochs in total [default: 25; with --resume: the resumed job's].
    #[arg(long)]
    pub epochs: Option<u32>,
    /// Global batch: cases per optimiser step, split across the workers.
    #[arg(long, default_value_t = 2)]
    pub batch_size: u32,
    /// Adam learning rate (ReduceLROnPlateau on the validation Dice).
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Network grid X Y Z (each divisible by 8).
    #[arg(long, num_args = 3, value_names = ["X", "Y", "Z"], default_values_t = [96, 96, 104])]
    pub size: Vec<u32>,
    /// Intensity window A_MIN A_MAX mapped to [0, 1].
    #[arg(long, num_args = 2, value_names = ["A_MIN", "A_MAX"], default_values_t = [-1000.0, 500.0], allow_negative_numbers = true)]
    pub window: Vec<f64>,
    /// Channels of the first level (32 in MONAI's presets).
    #[arg(long, default_value_t = 32)]
    pub channels: u32,
    /// Workers to train on (default: every worker registered when the job starts).
    #[arg(long, default_value_t = 0)]
    pub workers: u32,
    /// Fraction of the cases (the last ones) kept for validation.
    #[arg(long, default_value_t = 0.2)]
    pub val_fraction: f64,
    /// Seed of the initialisation and the per-epoch shuffling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Random augmentation of the training pairs.
    #[arg(long)]
    pub augment: bool,
    /// Gradient encoding on the wire: fp32 (exact), fp16 or bf16 (half the bytes).
    #[arg(long, default_value = "fp32", value_parser = ["fp32", "fp16", "bf16"])]
    pub grad_compression: String,
    /// Cases per forward/backward pass within a worker's shard (gradient accumulation;
    /// default: the whole shard at once).
    #[arg(long, default_value_t = 0)]
    pub micro_batch: u32,
    /// Keep a numbered checkpoint every N epochs (the last and the best are always kept).
    #[arg(long, default_value_t = 1)]
    pub checkpoint_every: u32,
    /// Replica failures tolerated before the job fails.
    #[arg(long, default_value_t = 3)]
    pub max_failures: u32,
    /// Seconds a replica may take to answer a step, validation or state request.
    #[arg(long, default_value_t = 300)]
    pub step_timeout: u32,
    /// Seconds to wait for every worker to join before starting with those present.
    #[arg(long, default_value_t = 60)]
    pub gang_timeout: u32,
    /// Continue job JOB from its last checkpoint (its settings are kept; --epochs may
    /// raise the total).
    #[arg(long, value_name = "JOB")]
    pub resume: Option<String>,
    /// Print the job id and return instead of following it.
    #[arg(long)]
    pub no_wait: bool,
}

/// Submits the training job and (by default) follows it to its end.
pub fn run(args: Args) -> anyhow::Result<()> {
    if args.augment {
        anyhow::bail!(
            "--augment: augmentation is not implemented yet (the quickstart's final version trains without it); run without --augment"
        );
    }
    let rt = crate::data_dir::runtime()?;
    rt.block_on(async {
        let mut client = args.client.connect().await?;
        let spec = match &args.resume {
            Some(job) => resume_spec(&mut client, job, args.epochs).await?,
            None => TrainSpec {
                dataset: args.dataset.clone().unwrap_or_default(),
                model: args.model.clone().unwrap_or_default(),
                version: args.version.clone().unwrap_or_default(),
                preset: args.preset.clone(),
                loss: args.loss.clone(),
                epochs: args.epochs.unwrap_or(25),
                batch_size: args.batch_size,
                lr: args.lr,
                size: args.size.clone(),
                window: args.window.clone(),
                workers: args.workers,
                val_fraction: args.val_fraction,
                val_fraction_set: true,
                seed: args.seed,
                channels: args.channels,
                checkpoint_every: args.checkpoint_every,
                micro_batch: args.micro_batch,
                grad_compression: args.grad_compression.clone(),
                max_failures: args.max_failures,
                step_timeout_s: args.step_timeout,
                resume_from: String::new(),
                alias: args.alias.clone().unwrap_or_default(),
                gang_timeout_s: args.gang_timeout,
            },
        };
        let job = super::job::submit_only(
            &mut client,
            JobSpec {
                kind: Some(Kind::Train(spec)),
            },
        )
        .await?;
        if args.no_wait {
            println!("{}", job.id);
            return Ok(());
        }
        follow(&mut client, &job.id).await?;
        let job = super::job::get(&mut client, &job.id).await?;
        let state = medray_proto::v1::JobState::try_from(job.state)
            .unwrap_or(medray_proto::v1::JobState::Unspecified);
        if state != medray_proto::v1::JobState::Succeeded {
            anyhow::bail!(
                "job {} {}: {} (resume it with `medray train --resume {}`)",
                job.id,
                state.label(),
                job.reason,
                job.id
            );
        }
        let r: serde_json::Value =
            serde_json::from_str(&job.result_json).unwrap_or(serde_json::Value::Null);
        println!(
            "done: {} epochs, {} steps; registered {}; best validation Dice {} at epoch {}",
            r["epochs"],
            r["steps"],
            r["model"].as_str().unwrap_or("?"),
            r["best_val_dice"]
                .as_f64()
                .map_or_else(|| "n/a".to_string(), |d| format!("{d:.4}")),
            r["best_epoch"]
        );
        println!(
            "curves: `medray stage get jobs/{id}/history.csv OUT.csv` and jobs/{id}/curves.png; checkpoints under jobs/{id}/checkpoints/",
            id = job.id
        );
        Ok(())
    })
}

/// The spec of a resumed job: the original's, pointing at it, with more epochs if asked.
async fn resume_spec(
    client: &mut HeadClient,
    job: &str,
    epochs: Option<u32>,
) -> anyhow::Result<TrainSpec> {
    let old = super::job::get(client, job).await?;
    let Some(Kind::Train(mut spec)) = old.spec.and_then(|s| s.kind) else {
        anyhow::bail!("--resume {job}: that job is not a training job");
    };
    spec.resume_from = job.to_string();
    if let Some(e) = epochs {
        spec.epochs = e;
    }
    Ok(spec)
}

/// Follows the job's log: step lines move the bar, every other line is printed.
async fn follow(client: &mut HeadClient, id: &str) -> anyhow::Result<()> {
    let mut stream = client
        .stream_job_logs(StreamJobLogsRequest {
            job_id: id.to_string(),
            from_seq: 0,
            follow: true,
        })
        .await
        .map_err(|e| status_error("logs", e))?
        .into_inner();
    let bar = StepBar::new();
    while let Some(line) = stream
        .message()
        .await
        .map_err(|e| status_error("logs", e))?
    {
        bar.show(&line.worker_id, &line.line, line.progress.as_ref());
    }
    bar.finish();
    Ok(())
}

/// A training job's log as the user sees it: step lines move a progress bar (from their
/// typed progress), every other line is printed above it (worker lines prefixed with the
/// worker); without a terminal, every line is printed.
pub(crate) struct StepBar {
    bar: ProgressBar,
}

impl StepBar {
    pub(crate) fn new() -> Self {
        Self {
            bar: ProgressBar::new(1).with_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {pos}/{len} steps ({elapsed}, ETA {eta})",
                )
                .expect("static template")
                .progress_chars("=> "),
            ),
        }
    }

    /// One log line.
    pub(crate) fn show(
        &self,
        worker_id: &str,
        line: &str,
        progress: Option<&medray_proto::v1::TrainProgress>,
    ) {
        let text = if worker_id.is_empty() {
            line.to_string()
        } else {
            format!("[{worker_id}] {line}")
        };
        match (self.bar.is_hidden(), progress) {
            (false, Some(p)) => {
                self.bar.set_length(p.steps_in_epoch);
                self.bar.set_position(p.step_in_epoch);
                self.bar.set_message(format!(
                    "epoch {}/{} loss {:.4} on {} replica(s)",
                    p.epoch, p.epochs, p.loss, p.replicas
                ));
            }
            (false, None) => self.bar.println(text),
            (true, _) => println!("{text}"),
        }
    }

    /// Removes the bar.
    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
