//! `medray demo`: the whole pipeline on one machine, in one command. It runs, in order and
//! printing each as the command a user would type, the same subcommands:
//!
//! 1. `synth`: paired lung-CT phantoms with a known breathing deformation (or `--data`:
//!    a folder of real scans in the Learn2Reg layout or with a manifest);
//! 2. `up --detach`: a local cluster, a head and `--workers` workers;
//! 3. `ingest dir`: the training cases as dataset `demo-train` and every case as `demo`,
//!    into the cluster's encrypted stage and catalog;
//! 4. `train`: LocalNet data-parallel on the workers on `demo-train` (its first 80% train,
//!    the rest validate), registered in the model registry with the images it saw;
//! 5. `infer`: every case of `demo` registered on the workers, the results table printed;
//! 6. `report`: the HTML report of the inference job;
//! 7. `down` (unless `--keep-running`).
//!
//! **Held-out cases.** `--held-out N` more cases (synthesised beyond `--cases`, or the last
//! N of `--data`) are never in `demo-train`: neither trained on nor used to select the
//! epoch. Every result row says whether its case's images were trained on (`split`:
//! `train`, `validation`, `held-out`), and the demo's headline is the held-out figures,
//! with the validation and training figures apart and labelled.
//!
//! Everything goes to `--dir`. The cluster is stopped on an error and on Ctrl-C too.

mod split;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use medray_core::report::split_summaries;
use medray_core::results::{ResultFilter, ResultRow, Split};
use medray_proto::v1::ListJobsRequest;

use crate::cluster::client::{read_cluster_file, status_error, ClientArgs};
use crate::cluster::up::{down, DownArgs};

/// Arguments of `medray demo`. The defaults finish in about 10 minutes on 2 CPU cores.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Folder for the data, the cluster's data directory, logs and the report (created).
    #[arg(long, default_value = "medray-demo")]
    pub dir: PathBuf,
    /// Workers in the local cluster.
    #[arg(long, default_value_t = 2)]
    pub workers: u32,
    /// Real data instead of phantoms: a folder in the Learn2Reg layout (scans/,
    /// lungMasks/, keypoints/) or with a manifest.csv (see `medray ingest dir --help`).
    #[arg(long, value_name = "FOLDER")]
    pub data: Option<PathBuf>,
    /// Number of synthetic cases the model is trained on (its first 80% train, the rest
    /// validate).
    #[arg(long, default_value_t = 12)]
    pub cases: usize,
    /// Cases held out of training altogether: synthesised in addition to `--cases`, or the
    /// last N cases of `--data`. Inference runs on every case; the headline is theirs.
    #[arg(long, default_value_t = 3)]
    pub held_out: usize,
    /// Network grid X Y Z (the size cases are resampled to); also the size of the
    /// synthetic scans.
    #[arg(long, num_args = 3, value_names = ["X", "Y", "Z"], default_values_t = [48, 48, 48])]
    pub size: Vec<usize>,
    /// Training epochs.
    #[arg(long, default_value_t = 40)]
    pub epochs: u32,
    /// LocalNet preset: `seed` (the quickstart's network) or `full`.
    #[arg(long, default_value = "full")]
    pub preset: String,
    /// Channels of the first LocalNet level (the quickstart uses 32; 8 keeps the demo
    /// fast on a CPU).
    #[arg(long, default_value_t = 8)]
    pub channels: u32,
    /// Learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Instance optimisation steps per case at inference (0: none).
    #[arg(long, default_value_t = 0)]
    pub refine: u32,
    /// Leave the cluster running at the end (stop it with `medray down` in --dir), so the
    /// head keeps serving the report.
    #[arg(long)]
    pub keep_running: bool,
    /// Random seed of the phantoms and the training.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Every case: what inference runs on.
const DATASET: &str = "demo";
/// The training cases only (all of `DATASET` when nothing is held out).
const TRAIN_DATASET: &str = "demo-train";
const MODEL: &str = "demo";

/// Stops the demo's cluster when dropped (errors, early returns).
struct ClusterGuard {
    armed: bool,
}

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        if self.armed {
            eprintln!("stopping the demo's cluster...");
            if let Err(e) = down(DownArgs { timeout_s: 60 }) {
                eprintln!("warning: stopping the cluster: {e:#}");
            }
        }
    }
}

fn check(args: &Args) -> anyhow::Result<()> {
    if !(1..=16).contains(&args.workers) {
        anyhow::bail!("--workers {}: expected 1..=16 on one machine", args.workers);
    }
    if args.data.is_none() && !(2..=1000).contains(&args.cases) {
        anyhow::bail!("--cases {}: expected 2..=1000", args.cases);
    }
    if args.held_out > 1000 {
        anyhow::bail!("--held-out {}: expected 0..=1000", args.held_out);
    }
    if let Some(bad) = args.size.iter().find(|&&s| !(16..=512).contains(&s)) {
        anyhow::bail!("--size: {bad} is outside 16..=512 voxels");
    }
    if args.epochs == 0 {
        anyhow::bail!("--epochs must be at least 1");
    }
    if let Some(d) = &args.data {
        if !d.exists() {
            anyhow::bail!("--data {}: no such file or folder", d.display());
        }
    }
    Ok(())
}

/// Runs one subcommand in this process, after printing it.
fn step(n: usize, title: &str, argv: &[String], device: &str) -> anyhow::Result<()> {
    println!("\n== {n}/7 {title}");
    println!("$ medray {}", shell_words(argv));
    let mut full = vec!["medray".to_string(), "--device".into(), device.into()];
    full.extend_from_slice(argv);
    let cli = crate::Cli::try_parse_from(&full).map_err(|e| anyhow::anyhow!("{e}"))?;
    crate::dispatch(cli)
}

/// Arguments quoted where a shell would need it, for printing.
fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "'\"$`\\".contains(c)) {
                format!("'{}'", a.replace('\'', r"'\''"))
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(ToString::to_string).collect()
}

/// The newest inference job of the demo's cluster.
fn newest_infer_job() -> anyhow::Result<String> {
    let client = ClientArgs {
        address: None,
        token: None,
        token_file: None,
        tls_ca: None,
    };
    let rt = crate::data_dir::runtime()?;
    rt.block_on(async {
        let mut c = client.connect().await?;
        let jobs = c
            .list_jobs(ListJobsRequest { limit: 20 })
            .await
            .map_err(|e| status_error("job list", e))?
            .into_inner()
            .jobs;
        jobs.into_iter()
            .find(|j| j.kind == "infer")
            .map(|j| j.id)
            .context("the cluster has no inference job")
    })
}

/// The results rows of an inference job of the demo's cluster.
fn job_rows(job: &str) -> anyhow::Result<Vec<ResultRow>> {
    let client = ClientArgs {
        address: None,
        token: None,
        token_file: None,
        tls_ca: None,
    };
    let rt = crate::data_dir::runtime()?;
    rt.block_on(async {
        let mut c = client.connect().await?;
        let filter = ResultFilter {
            job_id: Some(job.to_string()),
            ..ResultFilter::default()
        };
        crate::results::remote_results(&mut c, &filter).await
    })
}

/// The demo's headline: the held-out figures, then the validation and training figures
/// apart and labelled (never mixed into the headline).
fn headline(rows: &[ResultRow]) -> String {
    let summaries = split_summaries(rows);
    let mut out =
        String::from("held-out cases (never trained on, not used to select the model):\n");
    match summaries.iter().find(|s| s.split == Some(Split::HeldOut)) {
        Some(s) => out.push_str(&format!("  {}\n", s.line())),
        None => out.push_str(
            "  none (--held-out 0): every figure below is on cases that trained or selected the model\n",
        ),
    }
    let others: Vec<_> = summaries
        .iter()
        .filter(|s| s.split != Some(Split::HeldOut))
        .collect();
    if !others.is_empty() {
        out.push_str("apart, not a measure of generalisation:\n");
    }
    for s in others {
        let why = match s.split {
            Some(Split::Validation) => "not trained on, but used to pick the best epoch",
            Some(Split::Train) => "trained on: optimistic",
            _ => "the model records no training data",
        };
        out.push_str(&format!("  {} ({why})\n", s.line()));
    }
    out
}

/// A free TCP port on loopback for the head.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Runs `medray demo`.
pub fn run(args: Args, device: &str) -> anyhow::Result<()> {
    check(&args)?;
    let started = Instant::now();
    // Every step talks to the demo's own cluster (found through .medray/cluster.json in
    // --dir), never to one named in the environment. Nothing else runs yet in this process.
    for var in ["MEDRAY_ADDRESS", "MEDRAY_TOKEN", "MEDRAY_TLS_CA"] {
        std::env::remove_var(var);
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let data = match &args.data {
        Some(d) => {
            Some(std::fs::canonicalize(d).with_context(|| format!("--data {}", d.display()))?)
        }
        None => None,
    };
    std::env::set_current_dir(&args.dir)
        .with_context(|| format!("entering {}", args.dir.display()))?;
    let dir = std::env::current_dir()?;
    if let Some(file) = read_cluster_file()? {
        if file.pids.iter().any(|&p| crate::cluster::up::alive(p)) {
            anyhow::bail!(
                "a cluster started from {} is still running ({}): stop it with `medray down` there",
                dir.display(),
                file.address
            );
        }
    }
    let size: Vec<String> = args.size.iter().map(ToString::to_string).collect();
    println!(
        "medray demo in {}: {} worker(s), {}, network {} voxels, {} epoch(s), preset {} with {} channels",
        dir.display(),
        args.workers,
        match &data {
            Some(d) => format!("cases from {} (the last {} held out)", d.display(), args.held_out),
            None => format!(
                "{} synthetic training cases + {} held out",
                args.cases, args.held_out
            ),
        },
        size.join("x"),
        args.epochs,
        args.preset,
        args.channels
    );

    let source: PathBuf = match &data {
        Some(d) => {
            println!("\n== 1/7 real data: {}", d.display());
            d.clone()
        }
        None => {
            let mut argv = strings(&["synth", "--out", "data", "--cases"]);
            argv.push((args.cases + args.held_out).to_string());
            argv.push("--size".into());
            argv.extend(size.iter().cloned());
            argv.extend(["--seed".into(), args.seed.to_string()]);
            step(1, "synthesising paired lung-CT phantoms", &argv, device)?;
            dir.join("data")
        }
    };

    // The training cases: all but the held-out ones, as a folder of their own.
    let all = split::list_cases(&source)?;
    let n_train = all
        .len()
        .checked_sub(args.held_out)
        .filter(|&n| n >= 2)
        .with_context(|| {
            format!(
                "--held-out {}: {} has {} case(s); at least 2 must remain to train on",
                args.held_out,
                source.display(),
                all.len()
            )
        })?;
    let train_source = if args.held_out > 0 {
        let out = split::write_subset(&all[..n_train], &dir.join("data-train"))?;
        println!(
            "training cases: {} of {} ({} to {}) in {}; held out: {}",
            n_train,
            all.len(),
            all[0].id,
            all[n_train - 1].id,
            out.display(),
            all[n_train..]
                .iter()
                .map(|c| c.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        Some(out)
    } else {
        None
    };

    // Ctrl-C: stop the cluster (its processes run in their own process groups).
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: stopping the demo's cluster...");
        let _ = down(DownArgs { timeout_s: 30 });
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")?;
    let port = free_port()?;
    let mut argv = strings(&["up", "--workers"]);
    argv.push(args.workers.to_string());
    argv.extend([
        "--detach".into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--data-dir".into(),
        "cluster-data".into(),
    ]);
    step(2, "starting a local cluster", &argv, device)?;
    let mut guard = ClusterGuard { armed: true };

    let train_dataset = match &train_source {
        Some(folder) => {
            let mut argv = strings(&["ingest", "dir"]);
            argv.push(folder.display().to_string());
            argv.extend(strings(&["--name", TRAIN_DATASET, "--replace"]));
            step(
                3,
                "ingesting the training cases into the cluster's stage",
                &argv,
                device,
            )?;
            TRAIN_DATASET
        }
        None => DATASET,
    };
    let mut argv = strings(&["ingest", "dir"]);
    argv.push(source.display().to_string());
    argv.extend(strings(&["--name", DATASET, "--replace"]));
    step(
        3,
        "ingesting every case, held-out ones included, into the cluster's stage",
        &argv,
        device,
    )?;

    let mut argv = strings(&[
        "train",
        "--dataset",
        train_dataset,
        "--model",
        MODEL,
        "--preset",
    ]);
    argv.push(args.preset.clone());
    argv.extend(["--channels".into(), args.channels.to_string()]);
    argv.extend(strings(&["--loss", "mi-be", "--batch-size", "2"]));
    argv.extend(["--epochs".into(), args.epochs.to_string()]);
    argv.extend(["--lr".into(), args.lr.to_string()]);
    argv.push("--size".into());
    argv.extend(size.iter().cloned());
    argv.extend(["--seed".into(), args.seed.to_string()]);
    argv.extend(["--workers".into(), args.workers.to_string()]);
    step(4, "training LocalNet on the workers", &argv, device)?;

    let mut argv = strings(&["infer", "--dataset", DATASET, "--model", MODEL]);
    if args.refine > 0 {
        argv.extend(["--refine".into(), args.refine.to_string()]);
    }
    step(5, "registering every case on the workers", &argv, device)?;

    let job = newest_infer_job()?;
    let rows = job_rows(&job)?;
    let argv = vec![
        "report".into(),
        "--job".into(),
        job.clone(),
        "--out".into(),
        "report".into(),
    ];
    step(6, "writing the report", &argv, device)?;
    let http = read_cluster_file()?.and_then(|f| f.http);

    println!("\n== 7/7 done in {:.0} s", started.elapsed().as_secs_f64());
    print!("{}", headline(&rows));
    print_where(&dir, &job, http.as_deref(), args.keep_running);
    if args.keep_running {
        guard.armed = false;
    } else {
        println!("$ medray down");
        guard.armed = false;
        down(DownArgs { timeout_s: 60 })?;
    }
    Ok(())
}

fn print_where(dir: &Path, job: &str, http: Option<&str>, running: bool) {
    println!(
        "report:  {}",
        dir.join("report").join("index.html").display()
    );
    match (http, running) {
        (Some(h), true) => {
            println!(
                "served:  cd {} && medray report --job {job} --link (a signed link to the page on http://{h}; the cluster keeps running)",
                dir.display()
            );
            println!("stop it: cd {} && medray down", dir.display());
        }
        _ => println!(
            "(with --keep-running the head also serves it at /jobs/{job}/report/ on its HTTP port, opened by `medray report --job {job} --link`)"
        ),
    }
    println!(
        "query:   cd {} && medray sql \"SELECT case_id, split, dice_before, dice_score, tre_mm FROM results WHERE dataset = 'demo' ORDER BY split, dice_score DESC\" --data-dir cluster-data",
        dir.display()
    );
}
