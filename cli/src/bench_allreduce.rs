//! `medray bench-allreduce`: the data-parallel all-reduce through the head on loopback,
//! against a raw TCP exchange of the same bytes in the same run.
//!
//! For each replica count it starts a local cluster (`medray up`, head + N workers as
//! processes, in a temporary folder), ingests tiny synthetic cases, and trains one epoch of
//! LocalNet with N replicas. The network is the seed preset (32 channels: a 12.6 MB fp32
//! gradient) on a 16^3 grid, so that the step is short and the all-reduce is what is
//! timed. The head logs, per step, the time from the moment the last replica started
//! sending its gradient until the last averaged chunk was handed to the streams, and the
//! replicas' compute time; the medians are reported.
//!
//! The baseline: N client threads connect to one loopback TCP server; each sends the
//! gradient's bytes, the server reads all of them, then sends the same number of bytes back
//! to each client: the traffic pattern of an all-reduce through one node, with no
//! encoding, no averaging and no gRPC.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::Context;

/// Arguments of `medray bench-allreduce`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Replica counts to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [2u32, 3])]
    workers: Vec<u32>,
    /// Channels of LocalNet's first level (32: the seed preset's 12.6 MB gradient).
    #[arg(long, default_value_t = 32)]
    channels: u32,
    /// Optimizer steps timed per replica count.
    #[arg(long, default_value_t = 8)]
    steps: u32,
    /// Gradient encoding on the wire.
    #[arg(long, default_value = "fp32", value_parser = ["fp32", "fp16", "bf16"])]
    grad_compression: String,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `medray ARGS` in `dir`; its stdout, or an error with its stderr.
fn medray(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("cannot find the medray binary")?;
    let out = Command::new(exe)
        .args(args)
        .current_dir(dir)
        .env_remove("MEDRAY_ADDRESS")
        .env_remove("MEDRAY_TOKEN")
        .env_remove("MEDRAY_DATA_DIR")
        .output()
        .with_context(|| format!("medray {}", args.join(" ")))?;
    if !out.status.success() {
        anyhow::bail!(
            "medray {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Per-step figures of a training job's log: (all-reduce ms, compute ms, parameters).
fn parse_log(log: &str) -> (Vec<f64>, Vec<f64>, Option<u64>) {
    let mut allreduce = Vec::new();
    let mut compute = Vec::new();
    let mut params = None;
    for line in log.lines() {
        if let Some((_, rest)) = line.split_once("admitted: ") {
            params = params.or_else(|| rest.split_whitespace().next()?.parse().ok());
        }
        if !line.contains(" of epoch ") {
            continue;
        }
        let number_before = |marker: &str| -> Option<f64> {
            let (_, rest) = line.split_once(marker)?;
            rest.split_whitespace().next()?.parse().ok()
        };
        if let (Some(c), Some(a)) = (number_before("compute "), number_before("all-reduce ")) {
            compute.push(c);
            allreduce.push(a);
        }
    }
    (allreduce, compute, params)
}

/// One exchange: every client sends `bytes`, the server reads everything, then sends
/// `bytes` back to each. Returns seconds until the last client has its bytes back.
fn raw_exchange(clients: usize, bytes: usize) -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let mut streams = Vec::new();
        for _ in 0..clients {
            streams.push(listener.accept()?.0);
        }
        let mut buf = vec![0u8; bytes];
        for s in &mut streams {
            s.read_exact(&mut buf)?;
        }
        for s in &mut streams {
            s.write_all(&buf)?;
        }
        Ok(())
    });
    let started = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut s = TcpStream::connect(addr)?;
                s.set_nodelay(true)?;
                let data = vec![7u8; bytes];
                s.write_all(&data)?;
                let mut back = vec![0u8; bytes];
                s.read_exact(&mut back)?;
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
    }
    let secs = started.elapsed().as_secs_f64();
    server
        .join()
        .map_err(|_| anyhow::anyhow!("the server thread panicked"))??;
    Ok(secs)
}

/// Runs the benchmark.
pub fn run(args: Args) -> anyhow::Result<()> {
    if args.workers.is_empty() || args.workers.iter().any(|&w| !(1..=16).contains(&w)) {
        anyhow::bail!("--workers: each count must be 1..=16");
    }
    if !(1..=1000).contains(&args.steps) {
        anyhow::bail!("--steps must be 1..=1000");
    }
    println!(
        "{:>8} {:>10} {:>14} {:>14} {:>14} {:>8} {:>13}",
        "workers", "grad MB", "all-reduce ms", "raw TCP ms", "compute ms", "ratio", "comm/compute"
    );
    for &n in &args.workers {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let listen = format!("127.0.0.1:{port}");
        medray(
            dir.path(),
            &[
                "up",
                "--detach",
                "--workers",
                &n.to_string(),
                "--listen",
                &listen,
            ],
        )?;
        let result = (|| -> anyhow::Result<(Vec<f64>, Vec<f64>, Option<u64>)> {
            let cases = (n * args.steps).to_string();
            medray(
                dir.path(),
                &[
                    "ingest",
                    "synthetic",
                    "--name",
                    "bench",
                    "--cases",
                    &cases,
                    "--size",
                    "16",
                    "16",
                    "16",
                ],
            )?;
            let id = medray(
                dir.path(),
                &[
                    "train",
                    "--no-wait",
                    "--dataset",
                    "bench",
                    "--model",
                    "bench",
                    "--size",
                    "16",
                    "16",
                    "16",
                    "--channels",
                    &args.channels.to_string(),
                    "--workers",
                    &n.to_string(),
                    "--batch-size",
                    &n.to_string(),
                    "--epochs",
                    "1",
                    "--val-fraction",
                    "0",
                    "--grad-compression",
                    &args.grad_compression,
                ],
            )?;
            let id = id.trim();
            let log = medray(dir.path(), &["job", "logs", "--follow", id])?;
            medray(dir.path(), &["job", "status", id]).with_context(|| format!("log:\n{log}"))?;
            Ok(parse_log(&log))
        })();
        let _ = medray(dir.path(), &["down"]);
        let (allreduce, compute, params) = result?;
        let params = params.context("the training log names no parameter count")?;
        let bytes_per_value = if args.grad_compression == "fp32" {
            4
        } else {
            2
        };
        let bytes = params as usize * bytes_per_value;
        let raw: Vec<f64> = (0..args.steps.max(3))
            .map(|_| raw_exchange(n as usize, bytes).map(|s| s * 1e3))
            .collect::<anyhow::Result<_>>()?;
        let (a, r, c) = (median(allreduce), median(raw), median(compute));
        println!(
            "{:>8} {:>10.1} {:>14.1} {:>14.1} {:>14.1} {:>8.2} {:>13.2}",
            n,
            bytes as f64 / 1e6,
            a,
            r,
            c,
            a / r,
            a / c
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_lines_are_parsed() {
        let log = "2026 replica r001 on worker w (cpu) admitted: 3145728 parameters, cases\n\
                   2026 step 1/2 of epoch 1/1: loss -1.6 (similarity -1.6, regularisation 0.0) on 2 replica(s), compute 418 ms, all-reduce 14 ms\n\
                   2026 epoch 1: per step 406 ms compute, 46 ms all-reduce";
        let (a, c, p) = parse_log(log);
        assert_eq!(a, vec![14.0]);
        assert_eq!(c, vec![418.0]);
        assert_eq!(p, Some(3_145_728));
    }

    #[test]
    fn the_raw_exchange_moves_the_bytes() {
        assert!(raw_exchange(2, 1 << 16).expect("exchange") > 0.0);
    }
}
