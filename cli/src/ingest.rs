//! `medray ingest`: fetch or read a dataset, validate it, store it encrypted in the stage and
//! publish it in the catalog (see `medray_core::ingest`).

use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use medray_core::catalog::{DatasetName, PublishOutcome};
use medray_core::ingest::{
    ingest_dir, ingest_dirlab, ingest_learn2reg, ingest_manifest, ingest_nlst, ingest_synthetic,
    DirLabConfig, DirLabTable, DownloadConfig, ExtractLimits, IngestOptions, IngestPhase,
    IngestReport, Learn2RegConfig, NlstConfig, DIRLAB_HU_OFFSET, LEARN2REG_URL,
};
use medray_core::synth::SynthConfig;

use crate::cluster::client::ClientArgs;
use crate::data_dir::{runtime, DataArgs, Target};
use medray_proto::v1::ingest_spec::Source as WireSource;
use medray_proto::v1::{
    DirLabSource, DirSource, IngestSpec, Learn2RegSource, NlstSource, SyntheticSource,
};

/// Arguments of `medray ingest`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    client: ClientArgs,
    /// On a cluster: print the job id and return instead of following the job.
    #[arg(long, global = true)]
    no_wait: bool,
    #[command(subcommand)]
    source: Source,
}

fn absolute(path: &std::path::Path) -> anyhow::Result<String> {
    Ok(path
        .canonicalize()
        .with_context(|| format!("{}", path.display()))?
        .display()
        .to_string())
}

/// The ingest job for the head (paths made absolute: the head runs on this machine or sees
/// the same file system).
fn ingest_spec(source: &Source) -> anyhow::Result<IngestSpec> {
    let common = match source {
        Source::Learn2reg { common, .. }
        | Source::Dir { common, .. }
        | Source::Dirlab { common, .. }
        | Source::Nlst { common, .. }
        | Source::Synthetic { common, .. } => common,
    };
    let wire = match source {
        Source::Learn2reg { source, .. } => WireSource::Learn2reg(Learn2RegSource {
            url: source.url.clone(),
            sha256: source.sha256.clone().unwrap_or_default(),
            md5: source.md5.clone().unwrap_or_default(),
        }),
        Source::Dir {
            manifest: Some(m), ..
        } => WireSource::Dir(DirSource { path: absolute(m)? }),
        Source::Dir { path: Some(p), .. } => WireSource::Dir(DirSource { path: absolute(p)? }),
        Source::Dir { .. } => anyhow::bail!("ingest dir: give a PATH or --manifest FILE"),
        Source::Dirlab {
            path,
            cases,
            table,
            hu_offset,
            ..
        } => WireSource::Dirlab(DirLabSource {
            path: absolute(path)?,
            cases: cases.clone(),
            table: table
                .as_deref()
                .map(absolute)
                .transpose()?
                .unwrap_or_default(),
            hu_offset: Some(*hu_offset),
        }),
        Source::Nlst { path, pairs, .. } => WireSource::Nlst(NlstSource {
            path: absolute(path)?,
            pair_lists: pairs.clone(),
        }),
        Source::Synthetic {
            cases, size, seed, ..
        } => WireSource::Synthetic(SyntheticSource {
            cases: u32::try_from(*cases).context("--cases")?,
            size: size.iter().map(|v| *v as u32).collect(),
            seed: *seed,
        }),
    };
    Ok(IngestSpec {
        name: common.name.clone().unwrap_or_default(),
        skip_bad: common.skip_bad,
        replace: common.replace,
        source: Some(wire),
    })
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
    /// The DIR-Lab benchmarks: 4D CT cases 1-10 and COPDGene copd1-copd10 as distributed
    /// (raw int16 .img volumes, 300 landmarks per phase).
    ///
    /// PATH is a folder holding the case folders (Case1Pack/Images/case1_T00_s.img,
    /// Case1Pack/ExtremePhases/Case1_300_T00_xyz.txt, copd1/copd1_iBHCT.img,
    /// copd1/copd1_300_iBH_xyz_r1.txt, ...; searched 4 levels deep) or one case's folder.
    /// Each case's size and spacing come from the benchmark's table (Castillo et al. 2009,
    /// 2010, 2013); a file of another size is refused. Expiration (T50, eBH) is stored as
    /// the fixed scan, inspiration (T00, iBH) as the moving one, as int16 NIfTI in HU
    /// (value - 1024), voxels as in the file, affine diag(-sx, -sy, -sz) (axes toward L, P,
    /// I); the landmarks become keypoint pairs in 0-based voxels (each coordinate - 1).
    Dirlab {
        /// The folder holding the cases.
        path: PathBuf,
        /// Cases to ingest, comma separated, e.g. `1,4,copd2` (a bare number is a 4D CT case);
        /// default: every case found.
        #[arg(long, value_delimiter = ',', value_name = "CASE,...")]
        cases: Vec<String>,
        /// A table file overriding or adding sizes and spacings, CSV with the header
        /// `case,size_x,size_y,size_z,spacing_x_mm,spacing_y_mm,spacing_z_mm`.
        #[arg(long, value_name = "FILE")]
        table: Option<PathBuf>,
        /// HU = stored value - OFFSET (the benchmark stores HU + 1024).
        #[arg(long, value_name = "OFFSET", default_value_t = DIRLAB_HU_OFFSET, allow_negative_numbers = true)]
        hu_offset: i32,
        #[command(flatten)]
        common: Common,
    },
    /// The Learn2Reg 2022 NLST layout: NLST_dataset.json, imagesTr/, masksTr/, keypointsTr/.
    ///
    /// The pairs are those the JSON lists (by default under `training_paired_images` and
    /// `registration_val`), its `fixed` image (the baseline, _0000) stored as the fixed scan
    /// and its `moving` one (the follow-up, _0001) as the moving scan, each with its lung
    /// mask and keypoints when present; an image the JSON names but the folder lacks is
    /// refused.
    Nlst {
        /// The folder holding NLST_dataset.json (or the JSON file itself).
        path: PathBuf,
        /// JSON pair lists to ingest, comma separated (e.g. `registration_test`); default:
        /// `training_paired_images,registration_val`.
        #[arg(long, value_delimiter = ',', value_name = "KEY,...")]
        pairs: Vec<String>,
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
                IngestPhase::Convert => (
                    "converting",
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
    if let Target::Head = args.data.target(&args.client)? {
        return crate::remote::ingest(&args.client, ingest_spec(&args.source)?, args.no_wait);
    }
    let stage = args.data.open_stage()?;
    let mut catalog = args.data.open_catalog()?;
    let rt = runtime()?;
    let report = match &args.source {
        Source::Learn2reg { source, common } => {
            let options = IngestOptions::try_from(common)?;
            let config = source.config(args.data.dir().join("downloads"));
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
        Source::Dirlab {
            path,
            cases,
            table,
            hu_offset,
            common,
        } => {
            let options = IngestOptions::try_from(common)?;
            let mut config = DirLabConfig::new(path)
                .with_cases(cases.clone())
                .with_hu_offset(*hu_offset);
            if let Some(table) = table {
                let extra = DirLabTable::read_csv(table)
                    .with_context(|| format!("reading the table {}", table.display()))?;
                config = config.with_table(DirLabTable::benchmark().with_overrides(&extra));
            }
            rt.block_on(ingest_dirlab(
                &stage,
                &mut catalog,
                &config,
                &options,
                progress_bar(),
            ))
            .with_context(|| format!("ingesting {}", path.display()))?
        }
        Source::Nlst {
            path,
            pairs,
            common,
        } => {
            let options = IngestOptions::try_from(common)?;
            let config = NlstConfig::new(path).with_pair_lists(pairs.clone());
            rt.block_on(ingest_nlst(
                &stage,
                &mut catalog,
                &config,
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
