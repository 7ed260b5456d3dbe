//! `medray synth`: synthetic breath-hold lung CT phantoms in the Learn2Reg layout.

use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use medray_core::synth::{generate, Motion, SynthConfig, SynthSummary};

mod from_ct;

/// Arguments of `medray synth`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output directory (gets scans/, lungMasks/, keypoints/, groundtruth/, synth.json).
    #[arg(long)]
    out: PathBuf,
    /// Number of cases.
    #[arg(long, default_value_t = 20)]
    cases: usize,
    /// Grid size X Y Z in voxels. The patient always spans 336 x 240 x 364 mm, so the
    /// spacing is that extent over the size (1.75 x 1.25 x 1.75 mm at 192 192 208).
    #[arg(long, num_args = 3, value_names = ["X", "Y", "Z"], default_values_t = [192, 192, 208])]
    size: Vec<usize>,
    /// Random seed (the output is identical for the same seed and size).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Breathing motion between the phases: dirlab (mean landmark displacement 6-15 mm per
    /// case, as DIR-Lab 4D CT), copd (15-30 mm) or small (1-2.5 mm, earlier phantoms).
    #[arg(long, default_value = "dirlab", value_parser = parse_motion)]
    motion: Motion,
    /// Multiplies the breathing motion drawn for each case (at most 4).
    #[arg(long, default_value_t = 1.0)]
    motion_scale: f64,
    /// Make the pairs from this real chest CT instead (NIfTI file or DICOM series folder; it
    /// is the inspiration image): body and lungs segmented, the same breathing model applied,
    /// the box around the body and lungs resampled to --size.
    #[arg(long, value_name = "SCAN")]
    from_ct: Option<PathBuf>,
    /// With --from-ct: a lung mask on the scan's grid (non-zero = lung) instead of thresholds.
    #[arg(long, value_name = "FILE", requires = "from_ct")]
    ct_lung_mask: Option<PathBuf>,
}

fn parse_motion(s: &str) -> Result<Motion, String> {
    s.parse::<Motion>().map_err(|e| e.to_string())
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
    if let Some(scan) = &args.from_ct {
        return from_ct::run(&args, scan, size);
    }
    let config = SynthConfig {
        amplitude_scale: args.motion_scale,
        ..SynthConfig::default()
            .with_cases(args.cases)
            .with_size(size)
            .with_seed(args.seed)
            .with_motion(args.motion)
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
    print!("{}", table(&summary));
    let keypoints: usize = summary.cases.iter().map(|c| c.keypoints).sum();
    println!(
        "wrote {} cases ({}x{}x{} voxels of {:.2}x{:.2}x{:.2} mm, motion {}, {} keypoint pairs) to {}",
        summary.cases.len(),
        size[0],
        size[1],
        size[2],
        summary.spacing_mm[0],
        summary.spacing_mm[1],
        summary.spacing_mm[2],
        summary.motion,
        keypoints,
        args.out.display()
    );
    Ok(())
}

/// The per-case table, a mean row, and the published reference values.
pub(crate) fn table(summary: &SynthSummary) -> String {
    let mut out = format!(
        "{:<10} {:>9} {:>9} {:>8} {:>8} {:>6} {:>9} {:>9}\n",
        "case", "landmarks", "mean mm", "p95 mm", "max mm", "CC %", "lung Dice", "exp/insp"
    );
    let row = |id: &str, n: f64, m: [f64; 4], dice: f64, ratio: f64| {
        format!(
            "{id:<10} {n:>9.0} {:>9.2} {:>8.2} {:>8.2} {:>6.0} {dice:>9.3} {ratio:>9.2}\n",
            m[0],
            m[1],
            m[2],
            100.0 * m[3]
        )
    };
    for c in &summary.cases {
        let m = &c.motion;
        out += &row(
            &c.case_id,
            c.keypoints as f64,
            [m.mean_mm, m.p95_mm, m.max_mm, m.cranio_caudal_fraction],
            c.lung_dice,
            c.lung_volume_ratio,
        );
    }
    let n = summary.cases.len().max(1) as f64;
    let mean = |f: &dyn Fn(&medray_core::synth::SynthCaseSummary) -> f64| {
        summary.cases.iter().map(f).sum::<f64>() / n
    };
    out += &row(
        "mean",
        mean(&|c| c.keypoints as f64),
        [
            mean(&|c| c.motion.mean_mm),
            mean(&|c| c.motion.p95_mm),
            mean(&|c| c.motion.max_mm),
            mean(&|c| c.motion.cranio_caudal_fraction),
        ],
        mean(&|c| c.lung_dice),
        mean(&|c| c.lung_volume_ratio),
    );
    out +=
        "published: DIR-Lab 4D CT landmarks mean 3.9-15.0 mm (8.5), p95 10-28 mm, max <= 31 mm, \
            ~90% CC; Learn2Reg 2020 lung Dice 0.85 (0.71-0.94), exp/insp volume 0.83 (0.55-0.94)\n";
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn motion_defaults_to_dirlab_and_bad_values_name_the_option() {
        let ok = Cli::try_parse_from(["synth", "--out", "x", "--motion", "copd"]).unwrap();
        assert_eq!(ok.args.motion, Motion::Copd);
        let default = Cli::try_parse_from(["synth", "--out", "x"]).unwrap();
        assert_eq!(default.args.motion, Motion::Dirlab);
        let err = Cli::try_parse_from(["synth", "--out", "x", "--motion", "fast"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--motion") && err.contains("dirlab"), "{err}");
    }
}
