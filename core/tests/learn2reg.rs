//! `ingest_learn2reg` against a local HTTP server started by each test (medray-testkit's
//! `RangeServer`), serving a Learn2Reg-layout zip built here from tiny synthetic phantoms:
//! full ingest, resumption after a cut (in one run and across runs), restarts when the server
//! ignores the range or the file changed, checksum refusal, hostile archives, a corrupt
//! NIfTI inside, and HTTP errors. In every failure case the catalog and the stage are listed
//! before and after and must be unchanged.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly by design

use std::path::{Path, PathBuf};

use medray_core::catalog::{Catalog, DatasetName, DatasetRecord, PublishOutcome};
use medray_core::ingest::{
    download, ingest_dir, ingest_learn2reg, DownloadConfig, IngestOptions, IngestPhase,
    Learn2RegConfig,
};
use medray_core::stage::{Stage, StageKey, StageLocation};
use medray_core::synth::SynthConfig;
use medray_core::Error;
use medray_testkit::{RangeServer, ZipBuilder};
use sha2::{Digest, Sha256};

struct Env {
    dir: tempfile::TempDir,
    stage: Stage,
    catalog: Catalog,
    /// The synthetic Learn2Reg folder the archive is made of.
    l2r: PathBuf,
    /// The work folder of the downloads.
    work: PathBuf,
}

/// Three 16x16x20 cases, and one dataset (`earlier`) already published, so that "unchanged"
/// means something.
async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let stage = Stage::open(
        StageLocation::Local(dir.path().join("stage")),
        Some(StageKey::from_bytes([5; 32])),
    )
    .unwrap();
    let mut catalog = Catalog::open(&dir.path().join("catalog.db")).unwrap();
    let l2r = dir.path().join("l2r");
    let config = SynthConfig::default()
        .with_cases(3)
        .with_size([16, 16, 20])
        .with_seed(11);
    medray_core::synth::generate(&config, &l2r, |_, _| {}).unwrap();
    let earlier = dir.path().join("earlier");
    let config = config.with_cases(1).with_seed(12);
    medray_core::synth::generate(&config, &earlier, |_, _| {}).unwrap();
    ingest_dir(
        &stage,
        &mut catalog,
        &earlier,
        &IngestOptions::default().with_name(DatasetName::new("earlier").unwrap()),
        |_, _, _| {},
    )
    .await
    .unwrap();
    let work = dir.path().join("downloads");
    Env {
        dir,
        stage,
        catalog,
        l2r,
        work,
    }
}

/// The zip of the synthetic folder, under `training/` like the Zenodo archive.
fn archive_of(dir: &Path) -> Vec<u8> {
    ZipBuilder::new()
        .tree(dir, "training")
        .unwrap()
        .finish()
        .unwrap()
}

fn config(work: &Path, url: &str) -> Learn2RegConfig {
    Learn2RegConfig::new(work).with_download(
        DownloadConfig::new(url)
            .with_retries(3)
            .with_backoff_ms(5, 20)
            .with_timeouts_ms(5_000, 5_000),
    )
}

fn opts() -> IngestOptions {
    IngestOptions::default().with_name(DatasetName::new("l2r").unwrap())
}

/// Everything visible: the stage's keys and stored sizes, the catalog's datasets and cases.
async fn snapshot(env: &Env) -> (Vec<(String, u64)>, Vec<DatasetRecord>, usize) {
    let objects = env
        .stage
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|o| (o.key.as_str().to_string(), o.stored_bytes))
        .collect();
    let datasets = env.catalog.datasets().unwrap();
    let cases = datasets
        .iter()
        .map(|d| env.catalog.cases(&d.name).unwrap().len())
        .sum();
    (objects, datasets, cases)
}

/// Files left in the work folder (partial downloads, archives, extraction folders).
fn leftovers(work: &Path) -> Vec<String> {
    std::fs::read_dir(work)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs an ingest that must fail; checks that the stage and the catalog are exactly as they
/// were, and returns the error.
async fn refused(env: &mut Env, cfg: &Learn2RegConfig) -> Error {
    let before = snapshot(env).await;
    let err = ingest_learn2reg(&env.stage, &mut env.catalog, cfg, &opts(), |_, _, _| {})
        .await
        .unwrap_err();
    assert_eq!(snapshot(env).await, before, "{err}");
    err
}

fn assert_no_leftovers(work: &Path) {
    assert!(leftovers(work).is_empty(), "{:?}", leftovers(work));
}

#[tokio::test]
async fn full_ingest_from_a_local_http_server() {
    let mut env = env().await;
    let zip = archive_of(&env.l2r);
    let sha = hex::encode(Sha256::digest(&zip));
    let server = RangeServer::start("/training.zip", zip.clone())
        .await
        .unwrap();
    let mut cfg = config(&env.work, &server.url());
    cfg.download = cfg.download.with_sha256(&sha);
    let mut downloaded = 0;
    let report = ingest_learn2reg(
        &env.stage,
        &mut env.catalog,
        &cfg,
        &opts(),
        |phase, done, _| {
            if phase == IngestPhase::Download {
                downloaded = done;
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(downloaded, zip.len() as u64);
    assert_eq!(report.outcome, PublishOutcome::Created);
    assert_eq!((report.cases, report.objects_written), (3, 15));
    let record = env.catalog.dataset(&report.name).unwrap().unwrap();
    assert!(record.source.contains(&server.url()), "{}", record.source);
    assert!(record.source.contains(&sha), "{}", record.source);
    let cases = env.catalog.cases(&report.name).unwrap();
    assert_eq!(
        cases[2].fixed.key.as_str(),
        "datasets/l2r/scansExp/case_003_exp.nii.gz"
    );
    let original = std::fs::read(env.l2r.join("scans/case_003_exp.nii.gz")).unwrap();
    assert_eq!(env.stage.get(&cases[2].fixed.key).await.unwrap(), original);
    let requests = server.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].range, None);
    assert!(
        leftovers(&env.work).is_empty(),
        "{:?}",
        leftovers(&env.work)
    );
}

#[tokio::test]
async fn a_cut_download_resumes_with_a_range_request() {
    let mut env = env().await;
    let zip = archive_of(&env.l2r);
    let half = zip.len() as u64 / 2;
    let server = RangeServer::start("/training.zip", zip.clone())
        .await
        .unwrap();
    server.cut_next_after(half);
    let cfg = config(&env.work, &server.url());
    let report = ingest_learn2reg(&env.stage, &mut env.catalog, &cfg, &opts(), |_, _, _| {})
        .await
        .unwrap();
    assert_eq!(report.cases, 3);
    let requests = server.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(requests[0].range, None);
    assert_eq!(
        requests[1].range.as_deref(),
        Some(format!("bytes={half}-").as_str())
    );
    assert!(requests[1].if_range.is_some(), "{requests:?}");
    assert_eq!(requests[1].status, 206);
    // The published files are the original ones, byte for byte.
    for case in env.catalog.cases(&report.name).unwrap() {
        let stored = env.stage.get(&case.moving.key).await.unwrap();
        assert_eq!(hex::encode(Sha256::digest(&stored)), case.moving.sha256);
    }
}

#[tokio::test]
async fn the_download_reports_where_each_attempt_started() {
    let env = env().await;
    let zip = archive_of(&env.l2r);
    let server = RangeServer::start("/training.zip", zip.clone())
        .await
        .unwrap();
    server.cut_next_after(1_000);
    server.cut_next_after(2_000);
    let cfg = config(&env.work, &server.url());
    let dest = env.work.join("a.zip");
    let d = download(&cfg.download, &dest, |_, _| {}).await.unwrap();
    assert_eq!(d.attempts, 3);
    assert_eq!(d.attempt_starts, [0, 1_000, 3_000]);
    assert_eq!(std::fs::read(&dest).unwrap(), zip);
    assert_eq!(d.sha256, hex::encode(Sha256::digest(&zip)));
}

#[tokio::test]
async fn an_interrupted_download_is_kept_and_resumed_by_the_next_run() {
    let mut env = env().await;
    let zip = archive_of(&env.l2r);
    let cut = zip.len() as u64 / 3;
    let server = RangeServer::start("/training.zip", zip).await.unwrap();
    server.cut_next_after(cut);
    let mut cfg = config(&env.work, &server.url());
    cfg.download = cfg.download.with_retries(0);
    let err = refused(&mut env, &cfg).await;
    let msg = err.to_string();
    assert!(matches!(err, Error::Download { attempts: 1, .. }), "{msg}");
    assert!(msg.contains(&server.url()), "{msg}");
    assert!(msg.contains(&format!("after {cut} of")), "{msg}");
    let part = medray_core::ingest::download::part_path(&cfg.archive_path());
    assert_eq!(std::fs::metadata(&part).unwrap().len(), cut);

    ingest_learn2reg(&env.stage, &mut env.catalog, &cfg, &opts(), |_, _, _| {})
        .await
        .unwrap();
    let requests = server.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(
        requests[1].range.as_deref(),
        Some(format!("bytes={cut}-").as_str())
    );
    assert!(
        leftovers(&env.work).is_empty(),
        "{:?}",
        leftovers(&env.work)
    );
}

#[tokio::test]
async fn a_server_without_ranges_or_a_changed_file_restarts_from_zero() {
    let env = env().await;
    let zip = archive_of(&env.l2r);
    let server = RangeServer::start("/training.zip", zip.clone())
        .await
        .unwrap();
    let cfg = config(&env.work, &server.url());

    // No range support: the second answer is a 200 with the whole file.
    server.set_ignore_range(true);
    server.cut_next_after(1_500);
    let dest = env.work.join("a.zip");
    let d = download(&cfg.download, &dest, |_, _| {}).await.unwrap();
    assert_eq!(d.attempt_starts, [0, 0]);
    assert_eq!(std::fs::read(&dest).unwrap(), zip);
    assert_eq!(server.requests()[1].status, 200);

    // The file changes between two attempts: If-Range gets the new file whole.
    server.set_ignore_range(false);
    server.cut_next_after(1_500);
    let mut other = zip.clone();
    other.extend_from_slice(b"trailing bytes that change the file");
    let other_for_server = other.clone();
    let dest = env.work.join("b.zip");
    let mut changed = false;
    let d = download(&cfg.download, &dest, |done, _| {
        if done == 1_500 && !changed {
            server.set_body(other_for_server.clone());
            changed = true;
        }
    })
    .await
    .unwrap();
    assert_eq!(d.attempt_starts, [0, 0]);
    assert_eq!(std::fs::read(&dest).unwrap(), other);
    let last = server.requests().pop().unwrap();
    assert_eq!(last.range.as_deref(), Some("bytes=1500-"));
    assert_eq!(last.status, 200, "{last:?}");
}

#[tokio::test]
async fn a_checksum_mismatch_is_refused_and_changes_nothing() {
    let mut env = env().await;
    let zip = archive_of(&env.l2r);
    let sha = hex::encode(Sha256::digest(&zip));
    let server = RangeServer::start("/training.zip", zip).await.unwrap();
    let wrong = "0".repeat(64);
    let mut cfg = config(&env.work, &server.url());
    cfg.download = cfg.download.with_sha256(&wrong);
    let err = refused(&mut env, &cfg).await;
    let msg = err.to_string();
    assert!(matches!(err, Error::ChecksumMismatch { .. }), "{msg}");
    assert!(msg.contains(&wrong) && msg.contains(&sha), "{msg}");
    assert_no_leftovers(&env.work);

    let mut cfg = config(&env.work, &server.url());
    cfg.download = cfg.download.with_md5("F".repeat(32));
    let msg = refused(&mut env, &cfg).await.to_string();
    assert!(
        msg.contains("md5") && msg.contains(&"f".repeat(32)),
        "{msg}"
    );
}

#[tokio::test]
async fn an_archive_with_a_parent_entry_is_refused_and_changes_nothing() {
    let mut env = env().await;
    let zip = ZipBuilder::new()
        .tree(&env.l2r, "training")
        .unwrap()
        .file("../escaped.csv", b"1,2,3,4,5,6\n")
        .unwrap()
        .finish()
        .unwrap();
    let server = RangeServer::start("/training.zip", zip).await.unwrap();
    let cfg = config(&env.work, &server.url());
    let err = refused(&mut env, &cfg).await;
    let msg = err.to_string();
    assert!(matches!(err, Error::Archive { .. }), "{msg}");
    assert!(msg.contains("entry `../escaped.csv`"), "{msg}");
    assert_no_leftovers(&env.work);
    assert!(!env.dir.path().join("escaped.csv").exists());
}

#[tokio::test]
async fn a_corrupt_nifti_inside_is_refused_with_its_name_and_changes_nothing() {
    let mut env = env().await;
    let victim = env.l2r.join("scans/case_002_insp.nii.gz");
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() / 2]).unwrap();
    let server = RangeServer::start("/training.zip", archive_of(&env.l2r))
        .await
        .unwrap();
    let cfg = config(&env.work, &server.url());
    let err = refused(&mut env, &cfg).await;
    let msg = err.to_string();
    assert!(matches!(err, Error::BadCases { .. }), "{msg}");
    assert!(msg.contains("case_002_insp.nii.gz"), "{msg}");
    assert_no_leftovers(&env.work);
}

#[tokio::test]
async fn http_errors_fail_at_once_or_after_the_retries_naming_the_url() {
    let mut env = env().await;
    let server = RangeServer::start("/training.zip", archive_of(&env.l2r))
        .await
        .unwrap();
    let missing = server.url().replace("training.zip", "nope.zip");
    let cfg = config(&env.work, &missing);
    let err = refused(&mut env, &cfg).await;
    let msg = err.to_string();
    assert!(matches!(err, Error::Download { attempts: 1, .. }), "{msg}");
    assert!(msg.contains(&missing) && msg.contains("404"), "{msg}");

    for _ in 0..4 {
        server.fail_next(503);
    }
    let cfg = config(&env.work, &server.url());
    let err = refused(&mut env, &cfg).await;
    let msg = err.to_string();
    assert!(matches!(err, Error::Download { attempts: 4, .. }), "{msg}");
    assert!(msg.contains("503"), "{msg}");
}
