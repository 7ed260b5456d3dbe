//! Timing probe, not a test of correctness: ingest throughput of the synthetic 20-case set
//! at 192x192x208 served as a Learn2Reg zip from a local HTTP server (medray-testkit's
//! `RangeServer` on 127.0.0.1), into a local stage with and without encryption.
//!
//! ```sh
//! cargo test -p medray-core --test ingest_throughput -- --ignored --nocapture
//! ```
//!
//! Each configuration runs once as a warm-up, then three timed runs into a fresh stage and
//! catalog; the median is printed, with the time of each phase (download, extract, validate,
//! store and publish) of the median run. MB/s is the archive's size (the Learn2Reg folders
//! only: the phantoms' true DDFs are left out, as the real archive has none) over the whole
//! ingest, download included.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a probe fails loudly by design

use std::time::{Duration, Instant};

use medray_core::catalog::Catalog;
use medray_core::ingest::{
    ingest_learn2reg, DownloadConfig, IngestOptions, IngestPhase, Learn2RegConfig,
};
use medray_core::stage::{Stage, StageKey, StageLocation};
use medray_core::synth::SynthConfig;
use medray_testkit::{RangeServer, ZipBuilder};

const CASES: usize = 20;
const SIZE: [usize; 3] = [192, 192, 208];
const TIMED_RUNS: usize = 3;

struct Run {
    total: Duration,
    phases: Vec<(IngestPhase, Duration)>,
    dataset_bytes: u64,
}

async fn one_run(url: &str, encrypted: bool) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let key = encrypted.then(StageKey::generate);
    let stage = Stage::open(StageLocation::Local(dir.path().join("stage")), key).unwrap();
    let mut catalog = Catalog::open(&dir.path().join("catalog.db")).unwrap();
    let config =
        Learn2RegConfig::new(dir.path().join("downloads")).with_download(DownloadConfig::new(url));
    let mut starts: Vec<(IngestPhase, Instant)> = Vec::new();
    let start = Instant::now();
    let report = ingest_learn2reg(
        &stage,
        &mut catalog,
        &config,
        &IngestOptions::default(),
        |phase, _, _| {
            if starts.last().is_none_or(|(p, _)| *p != phase) {
                starts.push((phase, Instant::now()));
            }
        },
    )
    .await
    .unwrap();
    let end = Instant::now();
    assert_eq!(report.cases, CASES);
    let phases = starts
        .iter()
        .enumerate()
        .map(|(i, (phase, at))| {
            let until = starts.get(i + 1).map_or(end, |(_, t)| *t);
            (*phase, until - *at)
        })
        .collect();
    Run {
        total: end - start,
        phases,
        dataset_bytes: report.bytes,
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "timing probe: 20 cases at 192x192x208 through a local HTTP server, with and without encryption; run with --ignored --nocapture"]
async fn ingest_throughput_with_and_without_encryption() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("synthetic");
    let config = SynthConfig::default()
        .with_cases(CASES)
        .with_size(SIZE)
        .with_seed(0);
    let generation = Instant::now();
    let out = data.clone();
    tokio::task::spawn_blocking(move || medray_core::synth::generate(&config, &out, |_, _| {}))
        .await
        .unwrap()
        .unwrap();
    std::fs::remove_dir_all(data.join("groundtruth")).unwrap();
    let zip = ZipBuilder::new()
        .tree(&data, "training")
        .unwrap()
        .finish()
        .unwrap();
    let archive_mb = zip.len() as f64 / 1e6;
    println!(
        "{CASES} cases at {}x{}x{}: generated and zipped in {:.1} s; archive {archive_mb:.1} MB",
        SIZE[0],
        SIZE[1],
        SIZE[2],
        generation.elapsed().as_secs_f64()
    );
    let server = RangeServer::start("/training.zip", zip).await.unwrap();
    let url = server.url();

    println!("| stage | median s | MB/s (archive) | MB/s (dataset) | download | extract | validate | store + publish | runs (s) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for encrypted in [true, false] {
        one_run(&url, encrypted).await; // warm-up
        let mut runs = Vec::new();
        for _ in 0..TIMED_RUNS {
            runs.push(one_run(&url, encrypted).await);
        }
        let all: Vec<String> = runs
            .iter()
            .map(|r| format!("{:.2}", r.total.as_secs_f64()))
            .collect();
        runs.sort_by_key(|r| r.total);
        let median = &runs[runs.len() / 2];
        let phase = |p: IngestPhase| {
            median
                .phases
                .iter()
                .filter(|(q, _)| *q == p)
                .map(|(_, d)| d.as_secs_f64())
                .sum::<f64>()
        };
        println!(
            "| {} | {:.2} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
            if encrypted {
                "AES-256-GCM"
            } else {
                "unencrypted"
            },
            median.total.as_secs_f64(),
            archive_mb / median.total.as_secs_f64(),
            median.dataset_bytes as f64 / 1e6 / median.total.as_secs_f64(),
            phase(IngestPhase::Download),
            phase(IngestPhase::Extract),
            phase(IngestPhase::Validate),
            phase(IngestPhase::Store),
            all.join("/"),
        );
        println!(
            "dataset plaintext {:.1} MB",
            median.dataset_bytes as f64 / 1e6
        );
    }
}
