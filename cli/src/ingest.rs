//! `medray ingest`: fetch or read a dataset, validate it, store it encrypted in the stage and
//! publish it in the catalog (see `medray_core::ingest`).

use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use medray_core::catalog::{DatasetName, PublishOutcome};
use medray_core::ingest::{
    ingest_dir, ingest_learn2reg, ingest_manifest, ingest_synthetic, DownloadConfig, ExtractLimits,
    IngestOptions, IngestPhase, IngestReport, Learn2RegConfig, LEARN2REG_URL,
};
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

/// Options of the `learn2reg` source.
#[derive(Debug, clap::Args)]
struct Learn2RegArgs {
    /// Where to download the archive from.
    #[arg(long, env = "MEDRAY_LEARN2REG_URL", default_value = LEARN2REG_URL)]
    url: String,
    /// Expected sha256 of the archive (hex); a mismatch is refused.
    #[arg(long, value_name = "HEX")]
    sha256: Option<String>,
    /// Expected md5 of the archive (hex); a mismatch is refused.
    #[arg(long, value_name = "HEX")]
    md5: Option<String>,
    /// Download attempts after the first before giving up (waits double from 1 s to 60 s).
    #[arg(long, default_value_t = 8)]
    retries: u32,
    /// Give up on an attempt after this many seconds without data.
    #[arg(long, default_value_t = 120)]
    read_timeout_s: u64,
    /// Most bytes the archive may expand to.
    #[arg(long, default_value_t = ExtractLimits::default().max_total_bytes)]
    max_extract_bytes: u64,
    /// Most entries the archive may hold.
    #[arg(long, default_value_t = ExtractLimits::default().max_entries)]
    max_entries: usize,
}

impl Learn2RegArgs {
    fn config(&self, work_dir: PathBuf) -> Learn2RegConfig {
        let mut download = DownloadConfig::new(&self.url).with_retries(self.retries);
        download.read_timeout_ms = self.read_timeout_s.saturating_mul(1_000);
        if let Some(hex) = &self.sha256 {
            download = download.with_sha256(hex);
        }
        if let Some(hex) = &self.md5 {
            download = download.with_md5(hex);
        }
        Learn2RegConfig::new(work_dir)
            .with_download(download)
            .with_limits(
                ExtractLimits::default()
                    .with_max_total_bytes(self.max_extract_bytes)
                    .with_max_entries(self.max_entries),
            )
    }
}

#[derive(Debug, clap::Subcommand)]
enum Source {
    /// The Learn2Reg 2020 lung CT training archive, downloaded (resumably, with retries and
    /// checksum checks), extracted safely and ingested.
    ///
    /// The download goes to <data-dir>/downloads/; an interrupted download is kept there and
    /// resumed (HTTP Range) by the next run with the same URL. Archive entries with `..`, an
    /// absolute path or a symbolic link refuse the archive; only scans/, lungMasks/ and
    /// keypoints/ (optionally under training/) are kept.
    Learn2reg {
        #[command(flatten)]
        source: Learn2RegArgs,
        #[command(flatten)]
        common: Common,
    },
    /// A folder: in the Learn2Reg layout (scans/, lungMasks/, keypoints/, or training/...),
    /// or described by a manifest CSV.
    ///
    /// A manifest (PATH/manifest.csv, PATH itself if it is a .csv file, or --manifest FILE)
    /// has the header `case_id,fixed,moving,fixed_mask,moving_mask[,keypoints]`, one case
    /// per line, paths relative to the manifest's folder.
    Dir {
        /// The folder (or a manifest CSV file).
        #[arg(required_unless_present = "manifest")]
        path: Option<PathBuf>,
        /// A manifest CSV naming each case's files.
        #[arg(long, value_name = "FILE", conflicts_with = "path")]
        manifest: Option<PathBuf>,
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
                IngestPhase::Download if total == 0 => {
                    ("downloading", "{msg} {bytes} ({bytes_per_sec}, {elapsed})")
                }
                IngestPhase::Download => (
                    "downloading",
                    "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, ETA {eta})",
                ),
                IngestPhase::Extract => (
                    "extracting",
                    "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, ETA {eta})",
                ),
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
            // A resumed download starts past 0: the rate counts only what arrives now.
            bar.set_length(total);
            bar.set_position(done);
            bar.reset_eta();
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
        Source::Learn2reg { source, common } => {
            let options = IngestOptions::try_from(common)?;
            let config = source.config(args.data.data_dir.join("downloads"));
            rt.block_on(ingest_learn2reg(
                &stage,
                &mut catalog,
                &config,
                &options,
                progress_bar(),
            ))
            .with_context(|| format!("ingesting {}", source.url))?
        }
        Source::Dir {
            manifest: Some(manifest),
            common,
            ..
        } => {
            let options = IngestOptions::try_from(common)?;
            rt.block_on(ingest_manifest(
                &stage,
                &mut catalog,
                manifest,
                &options,
                progress_bar(),
            ))
            .with_context(|| format!("ingesting {}", manifest.display()))?
        }
        Source::Dir {
            path: Some(path),
            common,
            ..
        } => {
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
        Source::Dir { .. } => anyhow::bail!("ingest dir: give a PATH or --manifest FILE"),
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
