//! `medray`: the command-line tool. Thin: parse arguments, set up logging, call the library.
// The doc comments of the argument structs are the `--help` texts, which name placeholders
// the way command-line help does (`<data-dir>/stage`): not HTML.
#![allow(rustdoc::invalid_html_tags)]

mod bench;
mod bench_allreduce;
mod bench_quality;
mod bench_transfer;
mod cluster;
mod data_dir;
mod datasets;
mod demo;
mod ingest;
mod models;
mod predict;
mod refine_args;
mod remote;
mod report;
mod results;
mod stage;
mod synth;
mod train_local;

use clap::{Parser, Subcommand};

/// Deformable registration of paired lung CT (MONAI LocalNet in Rust).
///
/// A cluster: `medray up --workers N` (or `medray head` + `medray worker` on each machine),
/// then `medray status`, `medray selftest`, `medray train`, `medray infer`, `medray job ...`.
/// Single-process tools: `synth`, `predict`, `train-local`, `bench`. On a local data
/// directory or through the head: `ingest`, `datasets`, `models`, `stage`, `results`, `sql`.
#[derive(Debug, Parser)]
#[command(name = "medray", version, about, long_about = None)]
pub(crate) struct Cli {
    /// Run on this device: `cpu` or `cuda:N` (needs a build with `--features cuda`).
    #[arg(long, global = true, default_value = "cpu", env = "MEDRAY_DEVICE")]
    device: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate synthetic paired lung CT phantoms with a known deformation.
    Synth(synth::Args),
    /// Register one fixed/moving pair with trained weights and report its quality.
    Predict(predict::Args),
    /// Train LocalNet in this process on a Learn2Reg-layout folder.
    TrainLocal(train_local::Args),
    /// Time the LocalNet train step and inference (optionally beside MONAI).
    Bench(bench::Args),
    /// Validate a dataset, store it encrypted in the stage and publish it in the catalog.
    Ingest(ingest::Args),
    /// List and show the datasets in the catalog.
    Datasets(datasets::Args),
    /// The model registry: list, show, export, import, alias and delete model versions.
    Models(models::Args),
    /// List, read and write (encrypted) objects of the stage.
    Stage(stage::Args),
    /// Time object transfer head -> worker (gRPC) against a raw TCP copy, on loopback.
    BenchTransfer(bench_transfer::Args),
    /// Time the training all-reduce through the head against a raw TCP exchange, on loopback.
    BenchAllreduce(bench_allreduce::Args),
    /// Run the cluster's head (gRPC server, scheduler, job manager, worker registry).
    Head(cluster::head::Args),
    /// Run a worker that joins the head at --address.
    Worker(cluster::worker::Args),
    /// Print the worker token derived from the client token (MEDRAY_TOKEN): give workers
    /// this, never the client token.
    WorkerToken(cluster::worker::TokenArgs),
    /// Start a local cluster (head + N workers) on this machine.
    Up(cluster::up::UpArgs),
    /// Stop the cluster `medray up` started from this directory.
    Down(cluster::up::DownArgs),
    /// Workers and recent jobs of the cluster.
    Status(cluster::status::Args),
    /// List, inspect, follow and cancel jobs.
    Job(cluster::job::Args),
    /// Check every worker: fetch a case, LocalNet forward, warp; report times and devices.
    Selftest(cluster::selftest::Args),
    /// Train LocalNet on the cluster's workers (data-parallel) and register the model.
    Train(cluster::train::Args),
    /// Register every case of a dataset with a model version on the cluster's workers.
    Infer(cluster::infer::Args),
    /// The results table of inference: filter, order, print as a table, CSV or JSON.
    Results(results::ResultsArgs),
    /// Run one read-only SQL statement on the catalog (e.g. on the results table).
    Sql(results::SqlArgs),
    /// Write the HTML report of an inference job (summary, per-case table, pictures).
    Report(report::Args),
    /// The whole pipeline on this machine: phantoms (or your data), a local cluster,
    /// ingest, training, inference, the results table and the report.
    Demo(demo::Args),
}

/// Parses `cpu` or `cuda:N`.
fn parse_device(spec: &str) -> anyhow::Result<candle_core::Device> {
    match spec {
        "cpu" => Ok(candle_core::Device::Cpu),
        s if s.starts_with("cuda") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n.parse::<usize>().map_err(|_| {
                    anyhow::anyhow!("--device {s}: expected cuda:N with N a number")
                })?,
                None if s == "cuda" => 0,
                None => anyhow::bail!("--device {s}: expected `cpu` or `cuda:N`"),
            };
            if !candle_core::utils::cuda_is_available() {
                anyhow::bail!(
                    "--device {s}: this medray was built without CUDA support (rebuild with --features cuda)"
                );
            }
            Ok(candle_core::Device::new_cuda(ordinal)?)
        }
        other => anyhow::bail!("--device {other}: expected `cpu` or `cuda:N`"),
    }
}

/// Runs a parsed command line (`medray demo` runs its steps through here too).
pub(crate) fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let device = parse_device(&cli.device)?;
    match cli.command {
        Command::Synth(args) => synth::run(args),
        Command::Predict(args) => predict::run(args, &device),
        Command::TrainLocal(args) => train_local::run(args, &device),
        Command::Bench(args) => bench::run(args, &device),
        Command::Ingest(args) => ingest::run(args),
        Command::Datasets(args) => datasets::run(args),
        Command::Models(args) => models::run(args),
        Command::Stage(args) => stage::run(args),
        Command::BenchTransfer(args) => bench_transfer::run(args),
        Command::Head(args) => cluster::head::run(args),
        Command::Worker(args) => cluster::worker::run(args, &cli.device),
        Command::WorkerToken(args) => cluster::worker::print_worker_token(&args),
        Command::Up(args) => cluster::up::up(args, &cli.device),
        Command::Down(args) => cluster::up::down(args),
        Command::Status(args) => cluster::status::run(args),
        Command::Job(args) => cluster::job::run(args),
        Command::Selftest(args) => cluster::selftest::run(args),
        Command::BenchAllreduce(args) => bench_allreduce::run(args),
        Command::Train(args) => cluster::train::run(args),
        Command::Infer(args) => cluster::infer::run(args),
        Command::Results(args) => results::run_results(args),
        Command::Sql(args) => results::run_sql(args),
        Command::Report(args) => report::run(args),
        Command::Demo(args) => demo::run(args, &cli.device),
    }
}

/// Fault injection for the fault-injection tests: `FAILPOINTS="name=actions;..."` (the
/// `fail` crate's syntax, e.g. `replica-commit=return(5)`) arms the named points; unset, every
/// point is inert. See ARCHITECTURE.md, "Fault injection".
fn configure_failpoints() -> Result<(), String> {
    let Ok(spec) = std::env::var("FAILPOINTS") else {
        return Ok(());
    };
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, actions) = entry
            .split_once('=')
            .ok_or_else(|| format!("FAILPOINTS: `{entry}` is not name=actions"))?;
        fail::cfg(name.trim(), actions.trim())
            .map_err(|e| format!("FAILPOINTS: `{entry}`: {e}"))?;
        tracing::warn!(
            failpoint = name.trim(),
            actions = actions.trim(),
            "fault injection armed"
        );
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    medray_core::memory::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    medray_proto::tls::install_crypto_provider();
    if let Err(e) = configure_failpoints() {
        eprintln!("error: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let result = dispatch(Cli::parse());
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
