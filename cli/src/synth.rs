//! `medray synth`: synthetic lung CT phantoms in the Learn2Reg layout.

use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use medray_core::synth::{generate, SynthConfig};

/// Arguments of `medray synth`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output directory (gets scans/, lungMasks/, keypoints/, groundtruth/).
    #[arg(long)]
    out: PathBuf,
    /// Number of cases.
    #[arg(long, default_value_t = 20)]
    cases: usize,
    /// Grid size X Y Z in voxels.
    #[arg(long, num_args = 3, value_names = ["X", "Y", "Z"], default_values_t = [192, 192, 208])]
    size: Vec<usize>,
    /// Random seed (the output is identical for the same seed and size).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Multiplies the breathing motion (1: the diaphragm descends ~16 voxels at 192x192x208;
    /// at most 4).
    #[arg(long, default_value_t = 1.0)]
    motion_scale: f64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.cases == 0 {
        anyhow::bail!("--cases must be at least 1");
    }
    let size: [usize; 3] = args
        .size
        .as_slice()
        .try_into()
        .context("--size takes three numbers")?;
    let config = SynthConfig::default()
        .with_cases(args.cases)
        .with_size(size)
        .with_seed(args.seed);
    let config = medray_core::synth::SynthConfig {
        amplitude_scale: args.motion_scale,
        ..config
    };
    let bar = ProgressBar::new(args.cases as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} cases ({elapsed}, ETA {eta})")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_message("synthesising");
    let summary = generate(&config, &args.out, |done, _| bar.set_position(done as u64))
        .with_context(|| format!("writing phantoms to {}", args.out.display()))?;
    bar.finish_and_clear();
    let keypoints: usize = summary.cases.iter().map(|c| c.keypoints).sum();
    println!(
        "wrote {} cases ({}x{}x{}, {} keypoint pairs) to {}",
        summary.cases.len(),
        size[0],
        size[1],
        size[2],
        keypoints,
        args.out.display()
    );
    Ok(())
}
