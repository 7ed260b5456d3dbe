//! `medray results export --format learn2reg --job ID --out DIR`: the displacement files a
//! Learn2Reg submission holds, one per succeeded case of an inference job.
//!
//! Each case's DDF is read from the stage (through the head, or from a local data
//! directory) and written unchanged in value as `(X, Y, Z, 3)` float32 NIfTI: voxels of the
//! fixed image's grid, `fixed point + disp = moving point`, which is how the Learn2Reg
//! evaluation applies it ([`medray_core::interop`]). Names follow
//! [`medray_core::interop::learn2reg_name`].

use std::path::{Path, PathBuf};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use medray_core::interop::{learn2reg_name, write_learn2reg_disp};
use medray_core::nifti_io::read_ddf_bytes;
use medray_core::results::{list_results, CaseStatus, ResultFilter, ResultRow};
use medray_core::stage::ObjectKey;
use medray_head::ids::JobId;
use medray_head::report::stored_report_job;
use medray_proto::v1::GetJobRequest;

use crate::cluster::client::{status_error, ClientArgs};
use crate::data_dir::{DataArgs, Target};
use crate::remote::fetch_object;
use crate::results::remote_results;

/// What `medray results export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// Learn2Reg submission files: `disp_<fixed>_<moving>.nii.gz`, (X, Y, Z, 3) float32,
    /// voxel displacements on the fixed grid.
    Learn2reg,
}

/// Arguments of `medray results export`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Naming: a case id with one 4-digit number (NLST_0101, as the nlst \
ingest source names a subject's pair) is written as disp_0101_0101.nii.gz; one with four \
(NLST_0101_0000_NLST_0102_0000, two image names) as disp_0101_0102.nii.gz, or \
disp_0101_0000_0102_0001.nii.gz when the modalities differ, as the Learn2Reg evaluation looks \
them up. Any other case id (case_001) is written as disp_<case>.nii.gz, which the Learn2Reg \
evaluation will not find: rename those files to the task's pair names yourself (the command \
lists them)."
)]
pub struct ExportArgs {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    client: ClientArgs,
    /// The file format.
    #[arg(long, value_enum)]
    format: ExportFormat,
    /// The inference job (as `medray infer` and `medray job list` print it).
    #[arg(long)]
    job: String,
    /// Folder to write the files into (created; files of the same names are replaced).
    #[arg(long)]
    out: PathBuf,
}

fn filter(job: &str) -> ResultFilter {
    ResultFilter {
        job_id: Some(job.to_string()),
        order_by: Some("case_id".into()),
        ..ResultFilter::default()
    }
}

/// The succeeded cases with their DDF keys, and their file names; errors for a job without
/// one, or two cases that would share a file.
fn plan(job: &str, rows: &[ResultRow]) -> anyhow::Result<Vec<(String, String, bool)>> {
    let mut out: Vec<(String, String, bool)> = Vec::new();
    for r in rows.iter().filter(|r| r.status == CaseStatus::Succeeded) {
        let Some(key) = r.output_ddf.clone() else {
            anyhow::bail!("case {}: the results row has no DDF key", r.case_id);
        };
        let (name, pair) = learn2reg_name(r.case_id.as_str());
        if let Some((other, ..)) = out.iter().find(|(_, n, _)| *n == name) {
            anyhow::bail!(
                "case {} and the case of {other} would both be written as {name}",
                r.case_id
            );
        }
        out.push((key, name, pair));
    }
    if out.is_empty() {
        anyhow::bail!(
            "job {job}: no succeeded case to export ({} result row(s))",
            rows.len()
        );
    }
    Ok(out)
}

fn progress(n: usize) -> ProgressBar {
    let bar = ProgressBar::new(n as u64);
    if n < 10 {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .expect("a valid progress template"),
    );
    bar
}

/// Writes one file from a DDF's bytes.
fn write_one(out: &Path, key: &str, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let (ddf, affine) = read_ddf_bytes(bytes, Path::new(key))?;
    let path = out.join(name);
    write_learn2reg_disp(&path, &ddf, &affine)
        .with_context(|| format!("writing {}", path.display()))
}

/// Runs `medray results export`.
pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    let ExportFormat::Learn2reg = args.format;
    let job = args.job.clone();
    if job.is_empty()
        || job.len() > 64
        || !job.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        anyhow::bail!("--job `{job}`: not a job id (e.g. job-000012)");
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let rt = crate::data_dir::runtime()?;
    let files = match args.data.target(&args.client)? {
        Target::Head => rt.block_on(async {
            let mut c = args.client.connect().await?;
            let reply = c
                .get_job(GetJobRequest {
                    job_id: job.clone(),
                })
                .await
                .map_err(|e| status_error("results export", e))?
                .into_inner()
                .job
                .context("the head sent no job")?;
            medray_core::report::ReportJob::try_from(&reply)?;
            let files = plan(&job, &remote_results(&mut c, &filter(&job)).await?)?;
            let bar = progress(files.len());
            for (key, name, _) in &files {
                bar.set_message(name.clone());
                write_one(&args.out, key, name, &fetch_object(&mut c, key).await?)?;
                bar.inc(1);
            }
            bar.finish_and_clear();
            Ok::<_, anyhow::Error>(files)
        })?,
        Target::Local => {
            let dir = args.data.dir();
            let path = dir.join("catalog.db");
            stored_report_job(&dir, &JobId(job.clone()))
                .with_context(|| format!("reading job `{job}` from {}", path.display()))?
                .with_context(|| format!("job `{job}` not found in {}", path.display()))?;
            let files = plan(
                &job,
                &list_results(&args.data.open_catalog()?, &filter(&job))?,
            )?;
            let stage = args.data.open_stage()?;
            let bar = progress(files.len());
            rt.block_on(async {
                for (key, name, _) in &files {
                    bar.set_message(name.clone());
                    let bytes = stage
                        .get(&ObjectKey::new(key.clone())?)
                        .await
                        .with_context(|| format!("reading {key}"))?;
                    write_one(&args.out, key, name, &bytes)?;
                    bar.inc(1);
                }
                Ok::<_, anyhow::Error>(())
            })?;
            bar.finish_and_clear();
            files
        }
    };
    println!(
        "exported {} Learn2Reg displacement file(s) of {job} to {}",
        files.len(),
        args.out.display()
    );
    let unnamed: Vec<&str> = files
        .iter()
        .filter(|(.., pair)| !pair)
        .map(|(_, n, _)| n.as_str())
        .collect();
    if !unnamed.is_empty() {
        println!(
            "  {} file(s) are named after medray case ids, not Learn2Reg pair ids (rename them \
             to the task's disp_<fixed>_<moving>.nii.gz): {}",
            unnamed.len(),
            unnamed.join(", ")
        );
    }
    Ok(())
}
