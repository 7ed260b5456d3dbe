//! `medray train-local`: training on one machine, in one process, by the cluster's own
//! training loop: the coordinator, its step state machine and checkpointer
//! (`medray_head::local`) drive one replica in this process
//! (`medray_worker::train::run_in_process`) over channels. The run's data directory
//! (`<out>/medray/`: job table, catalog, registry, stage) is laid out like a head's; the
//! weights, `state.json` and `history.csv` are copied to `<out>` at the end.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::Device;
use medray_core::catalog::DatasetName;
use medray_core::ingest::{ingest_dir, IngestOptions};
use medray_core::localnet::Preset;
use medray_core::model::ModelConfig;
use medray_core::preprocess::Window;
use medray_core::registration::LossPreset;
use medray_core::train::{history_csv, EpochSummary, TrainConfig};
use medray_head::ids::JobId;
use medray_head::local::{LocalTrainer, LogRow};
use medray_proto::v1::TrainSpec;

use crate::cluster::train::StepBar;

/// Arguments of `medray train-local`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Dataset folder in the Learn2Reg layout (scans/, lungMasks/, keypoints/).
    #[arg(long)]
    data: PathBuf,
    /// Network preset: `seed` (`extract_levels` `[3]`, the quickstart's) or `full` (`[0,1,2,3]`).
    #[arg(long, default_value = "seed")]
    preset: Preset,
    /// Objective: `mi-be` (MI + bending energy), `mse-dice-be` (needs masks),
    /// `lncc-dice-diff` (LNCC + Dice on masks when present + diffusion), `mind-diff`
    /// (MIND-SSC SSD + diffusion) or `mse-dice-kp-be` (`mse-dice-be` + the mean TRE in mm of
    /// each training case's keypoint pairs: needs masks and keypoints on the training cases;
    /// validation cases' keypoints are never used).
    #[arg(long, default_value = "mi-be")]
    loss: LossPreset,
    /// Epochs in total (with --resume: up to this many).
    #[arg(long, default_value_t = 25)]
    epochs: usize,
    /// Cases per optimiser step.
    #[arg(long, default_value_t = 2)]
    batch_size: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Network grid X Y Z (each divisible by 8).
    #[arg(long, num_args = 3, value_names = ["X", "Y", "Z"], default_values_t = [96, 96, 104])]
    size: Vec<usize>,
    /// Intensity window A_MIN A_MAX mapped to [0, 1].
    #[arg(long, num_args = 2, value_names = ["A_MIN", "A_MAX"], default_values_t = [-1000.0, 500.0], allow_negative_numbers = true)]
    window: Vec<f32>,
    /// Channels of the first level (32 in MONAI's presets; smaller trains faster).
    #[arg(long, default_value_t = 32)]
    channels: usize,
    /// Fraction of the cases (the last ones) kept for validation.
    #[arg(long, default_value_t = 0.2)]
    val_fraction: f64,
    /// Seed of the initialisation and the shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep a numbered checkpoint every N epochs (last and best are always written).
    #[arg(long, default_value_t = 10)]
    checkpoint_every: usize,
    /// Output folder for checkpoints, weights and history.
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
}

/// The run's job, in `<out>/run.json`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct RunFile {
    job_id: String,
}

/// The name of the dataset and of the model inside a run's data directory.
const NAME: &str = "train-local";

/// What a run leaves.
pub(crate) struct LocalRun {
    /// One line per epoch, of the whole run.
    pub history: Vec<EpochSummary>,
    /// Optimiser steps in all.
    pub steps: u64,
    /// The best epoch's weights (`<out>/best.safetensors`, config in `best.json`).
    pub best_weights: PathBuf,
    /// The last epoch's weights.
    pub last_weights: PathBuf,
}

fn spec_of(config: &TrainConfig) -> TrainSpec {
    TrainSpec {
        dataset: NAME.into(),
        model: NAME.into(),
        workers: 1,
        ..TrainSpec::from(config)
    }
}

/// Trains on the Learn2Reg-layout dataset in `data` into `out` (with `resume`, continues
/// the run there up to `config.epochs`; its recorded config wins otherwise). Each log line
/// of the run goes to `show`.
pub(crate) fn train_in_process(
    data: &Path,
    out: &Path,
    config: &TrainConfig,
    resume: bool,
    device: &Device,
    show: &(dyn Fn(&LogRow) + Sync),
) -> anyhow::Result<LocalRun> {
    let run_file = out.join("run.json");
    if !resume && (run_file.exists() || out.join("state.json").exists()) {
        bail!(
            "{} already holds a training run: pass --resume to continue it, or choose another --out",
            out.display()
        );
    }
    if resume && !run_file.exists() {
        bail!(
            "--resume: {} holds no training run ({} is missing)",
            out.display(),
            run_file.display()
        );
    }
    config.validate()?;
    let trainer = LocalTrainer::open(&out.join("medray"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let (job, spec) = if resume {
        let text = std::fs::read_to_string(&run_file)
            .with_context(|| format!("reading {}", run_file.display()))?;
        let run: RunFile = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a run file", run_file.display()))?;
        let job = JobId(run.job_id);
        let mut spec = trainer.spec(&job)?;
        spec.epochs = config.epochs as u32;
        (job, spec)
    } else {
        let name = DatasetName::new(NAME)?;
        let stage = trainer.stage();
        let mut catalog = trainer.catalog()?;
        runtime
            .block_on(ingest_dir(
                &stage,
                &mut catalog,
                data,
                &IngestOptions::default().with_name(name).with_replace(true),
                |_, _, _| {},
            ))
            .with_context(|| format!("reading the dataset in {}", data.display()))?;
        let spec = spec_of(config);
        let job = trainer.new_job(spec.clone())?;
        let run = serde_json::to_vec(&RunFile {
            job_id: job.to_string(),
        })?;
        medray_core::atomic::write_bytes(&run_file, &run)?;
        (job, spec)
    };
    let before = runtime.block_on(trainer.committed_state(&job))?;
    if let Some(state) = &before {
        show(&LogRow {
            seq: 0,
            time: String::new(),
            worker_id: String::new(),
            line: format!(
                "resuming at epoch {}, after step {}",
                state.epochs_done + 1,
                state.step
            ),
            progress: None,
        });
    }
    let result = runtime.block_on(async {
        let logs = trainer.logs();
        // A resumed run shows its new lines only.
        let mut from_seq = 0;
        let mut earlier = logs.read(job.clone(), 0, false);
        while let Some(Ok(row)) = earlier.recv().await {
            from_seq = row.seq + 1;
        }
        let mut lines = logs.read(job.clone(), from_seq, true);
        let follow = async {
            while let Some(row) = lines.recv().await {
                if let Ok(row) = row {
                    show(&row);
                }
            }
        };
        let stage = trainer.stage();
        let cache = out.join("medray").join("cache");
        let device = device.clone();
        let handle = tokio::runtime::Handle::current();
        let replica_logs = trainer.logs();
        let replica_job = job.clone();
        let train = trainer.run(&job, spec, move |link| {
            tokio::task::spawn_blocking(move || {
                medray_worker::train::run_in_process(
                    medray_worker::train::InProcessLink {
                        down: link.down,
                        up: link.up,
                    },
                    &device,
                    &stage,
                    &cache,
                    &handle,
                    move |line| {
                        let _ = replica_logs.append(
                            &replica_job,
                            medray_worker::train::IN_PROCESS_WORKER,
                            &[line],
                        );
                    },
                )
            })
        });
        let (result, ()) = tokio::join!(train, follow);
        result
    })?;
    if let Err(reason) = result {
        bail!("training failed: {reason}");
    }
    let (state, last, best) = runtime
        .block_on(trainer.committed(&job))?
        .context("the run ended without a checkpoint")?;
    // The user's copies: weights with their config JSON, the state and the history.
    let model = state.config.model_config();
    let write = |name: &str, bytes: &[u8]| -> anyhow::Result<PathBuf> {
        let path = out.join(name);
        medray_core::atomic::write_bytes(&path, bytes)?;
        Ok(path)
    };
    let best_weights = write("best.safetensors", &best)?;
    model.write(&ModelConfig::path_for(&best_weights))?;
    let last_weights = write("last.safetensors", &last)?;
    model.write(&ModelConfig::path_for(&last_weights))?;
    write("history.csv", history_csv(&state.history).as_bytes())?;
    write("state.json", &serde_json::to_vec_pretty(&state)?)?;
    Ok(LocalRun {
        history: state.history,
        steps: state.step,
        best_weights,
        last_weights,
    })
}

pub fn run(args: Args, device: &Device) -> anyhow::Result<()> {
    let size: [usize; 3] = args
        .size
        .as_slice()
        .try_into()
        .context("--size takes three numbers")?;
    let window = Window {
        a_min: args.window[0],
        a_max: args.window[1],
    };
    let config = TrainConfig {
        preset: args.preset,
        num_channel_initial: args.channels,
        loss: args.loss,
        epochs: args.epochs,
        batch_size: args.batch_size,
        lr: args.lr,
        size,
        window,
        val_fraction: args.val_fraction,
        seed: args.seed,
        checkpoint_every: args.checkpoint_every,
    };
    let bar = StepBar::new();
    let summary = train_in_process(
        &args.data,
        &args.out,
        &config,
        args.resume,
        device,
        &|row: &LogRow| {
            bar.show(&row.worker_id, &row.line, row.train_progress().as_ref());
        },
    );
    bar.finish();
    let summary = summary?;
    let best = summary
        .history
        .iter()
        .filter_map(|h| h.val_dice.or(h.val_soft_dice).map(|d| (h.epoch, d)))
        .max_by(|a, b| a.1.total_cmp(&b.1));
    match best {
        Some((epoch, dice)) => println!(
            "done: {} steps; best validation Dice {dice:.4} at epoch {epoch}; weights {}",
            summary.steps,
            summary.best_weights.display()
        ),
        None => println!(
            "done: {} steps; no validation cases; weights {}",
            summary.steps,
            summary.last_weights.display()
        ),
    }
    Ok(())
}
