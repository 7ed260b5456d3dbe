//! `medray ingest`: validate a dataset, store it encrypted in the stage and publish it in the
//! catalog (see `medray_core::ingest`).

use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use medray_core::catalog::{DatasetName, PublishOutcome};
use medray_core::ingest::{ingest_dir, ingest_synthetic, IngestOptions, IngestPhase, IngestReport};
use medray_core::synth::SynthConfig;

use crate::data_dir::{runtime, DataArgs};

/// Arguments of `medray ingest`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    data: DataArgs,
    #[command(subcommand)]
    source: Source,
}

/// Options every source takes.
#[derive(Debug, clap::Args)]
struct Common {
    /// Dataset name (default: the source's name).
    #[arg(long)]
    name: Option<String>,
    /// Publish the valid cases and list the bad ones, instead of refusing the dataset.
    #[arg(long)]
    skip_bad: bool,
    /// Replace a dataset of the same name that has other content.
    #[arg(long)]
    replace: bool,
}

impl TryFrom<&Common> for IngestOptions {
    type Error = anyhow::Error;
    fn try_from(c: &Common) -> anyhow::Result<Self> {
        let mut o = IngestOptions::default()
            .with_skip_bad(c.skip_bad)
            .with_replace(c.replace);
        if let Some(n) = &c.name {
            o = o.with_name(DatasetName::new(n.clone())?);
        }
        Ok(o)
    }
}

#[derive(Debug, clap::Subcommand)]
enum Source {
    /// A Learn2Reg-layout folder (scans/, lungMasks/, keypoints/, or training/...).
    Dir {
        /// The folder.
        path: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Synthetic phantoms generated on the fly (as `medray synth`).
    Synthetic {
        /// Number of cases.
        #[arg(long)]
        cases: usize,
        /// Grid size X Y Z in voxels.
        #[arg(long, num_args = 3, value_names = ["X", "Y", "Z"], default_values_t = [192, 192, 208])]
        size: Vec<usize>,
        /// Random seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[command(flatten)]
        common: Common,
    },
}

fn progress_bar() -> impl FnMut(IngestPhase, u64, u64) {
    let bar = ProgressBar::new(0);
    let mut phase = None;
    move |p: IngestPhase, done: u64, total: u64| {
        if phase != Some(p) {
            phase = Some(p);
            let (msg, template) = match p {
                IngestPhase::Generate => (
                    "generating",
                    "{msg} [{bar:30}] {pos}/{len} cases ({elapsed}, ETA {eta})",
                ),
                IngestPhase::Validate => (
                    "validating",
                    "{msg} [{bar:30}] {pos}/{len} cases ({elapsed}, ETA {eta})",
                ),
                IngestPhase::Store => (
                    "storing",
                    "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, ETA {eta})",
                ),
            };
            bar.set_style(
                ProgressStyle::with_template(template)
                    .expect("static template")
                    .progress_chars("=> "),
            );
            bar.set_message(msg);
            bar.reset();
        }
        bar.set_length(total);
        bar.set_position(done);
        if p == IngestPhase::Store && done == total {
            bar.finish_and_clear();
        }
    }
}

fn print_report(r: &IngestReport) {
    for b in &r.bad {
        eprintln!("skipped bad case {b}");
    }
    match &r.outcome {
        PublishOutcome::Unchanged => println!(
            "dataset {} already holds this content ({} cases): nothing to do",
            r.name, r.cases
        ),
        PublishOutcome::Created | PublishOutcome::Replaced { .. } => println!(
            "{} dataset {}: {} cases, {} bytes, {} objects (content sha256 {})",
            if r.outcome == PublishOutcome::Created {
                "published"
            } else {
                "replaced"
            },
            r.name,
            r.cases,
            r.bytes,
            r.objects_written,
            r.content_sha256
        ),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let stage = args.data.open_stage()?;
    let mut catalog = args.data.open_catalog()?;
    let rt = runtime()?;
    let report = match &args.source {
        Source::Dir { path, common } => {
            let options = IngestOptions::try_from(common)?;
            rt.block_on(ingest_dir(
                &stage,
                &mut catalog,
                path,
                &options,
                progress_bar(),
            ))
            .with_context(|| format!("ingesting {}", path.display()))?
        }
        Source::Synthetic {
            cases,
            size,
            seed,
            common,
        } => {
            let options = IngestOptions::try_from(common)?;
            let size: [usize; 3] = size
                .as_slice()
                .try_into()
                .context("--size takes three numbers")?;
            let config = SynthConfig::default()
                .with_cases(*cases)
                .with_size(size)
                .with_seed(*seed);
            rt.block_on(ingest_synthetic(
                &stage,
                &mut catalog,
                &config,
                &options,
                progress_bar(),
            ))
            .context("ingesting synthetic phantoms")?
        }
    };
    print_report(&report);
    Ok(())
}
