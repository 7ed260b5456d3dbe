//! `medray train-local`: one-process LocalNet training with a progress bar and the
//! quickstart's per-epoch line.

use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use medray_core::localnet::Preset;
use medray_core::preprocess::Window;
use medray_core::registration::LossPreset;
use medray_core::train::{train_local, EpochSummary, TrainConfig, TrainObserver};

/// Arguments of `medray train-local`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Dataset folder in the Learn2Reg layout (scans/, lungMasks/, keypoints/).
    #[arg(long)]
    data: PathBuf,
    /// Network preset: `seed` (extract_levels [3], the quickstart's) or `full` ([0,1,2,3]).
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

struct Bars {
    bar: ProgressBar,
}

impl Bars {
    /// A line above the bar; plain stdout when the bar is hidden (not a terminal).
    fn line(&self, text: String) {
        if self.bar.is_hidden() {
            println!("{text}");
        } else {
            self.bar.println(text);
        }
    }
}

impl TrainObserver for Bars {
    fn on_start(&mut self, first_epoch: usize, steps_per_epoch: usize, resumed_from: Option<u64>) {
        if let Some(step) = resumed_from {
            self.line(format!(
                "resuming at epoch {first_epoch}, after step {step}"
            ));
        }
        self.bar.set_length(steps_per_epoch as u64);
        self.bar.set_position(0);
        self.bar.set_message(format!("epoch {first_epoch}"));
    }

    fn on_step(&mut self, epoch: usize, _step: u64, losses: (f64, f64, f64)) {
        self.bar.inc(1);
        self.bar
            .set_message(format!("epoch {epoch} loss {:.4}", losses.0));
    }

    fn on_validation(&mut self, epoch: usize, cases: usize) {
        self.bar
            .set_message(format!("epoch {epoch} validating {cases} cases"));
    }

    fn on_epoch(&mut self, s: &EpochSummary) {
        self.line(s.line());
        self.bar.set_position(0);
        self.bar.set_message(format!("epoch {}", s.epoch + 1));
    }
}

pub fn run(args: Args, device: &candle_core::Device) -> anyhow::Result<()> {
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
    let bar = ProgressBar::new(1).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps ({elapsed}, ETA {eta})")
            .expect("static template")
            .progress_chars("=> "),
    );
    let mut bars = Bars { bar };
    let summary = train_local(
        &args.data,
        &args.out,
        &config,
        args.resume,
        device,
        &mut bars,
    )
    .context("training failed")?;
    bars.bar.finish_and_clear();
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
