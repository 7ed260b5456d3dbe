//! The stage's S3 backend against a real S3-compatible server in process (medray-testkit's
//! `S3Server`: s3s + s3s-fs, SigV4-authenticated, path-style, plain HTTP on 127.0.0.1):
//! a full ingest through `s3://bucket/prefix`, read-back, idempotent re-ingest, and tamper
//! and wrong-key detection on objects changed behind the stage's back.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly by design

use medray_core::catalog::{Catalog, DatasetName, PublishOutcome};
use medray_core::ingest::{ingest_dir, IngestOptions};
use medray_core::stage::{ObjectKey, S3Options, Stage, StageKey, StageLocation};
use medray_core::synth::SynthConfig;
use medray_core::Error;
use medray_testkit::S3Server;

fn options(server: &S3Server) -> S3Options {
    S3Options::default()
        .with_endpoint(server.endpoint())
        .with_region(S3Server::REGION)
        .with_allow_http(true)
        .with_credentials(S3Server::ACCESS_KEY, S3Server::SECRET_KEY)
}

fn s3_stage(server: &S3Server, key: [u8; 32]) -> Stage {
    Stage::open_with(
        StageLocation::parse("s3://medray-test/team/a").unwrap(),
        Some(StageKey::from_bytes(key)),
        &options(server),
    )
    .unwrap()
}

#[tokio::test]
async fn ingest_read_back_and_tamper_detection_through_s3() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(&dir.path().join("s3"), &["medray-test"])
        .await
        .unwrap();
    let stage = s3_stage(&server, [7; 32]);
    let mut catalog = Catalog::open(&dir.path().join("catalog.db")).unwrap();
    let data = dir.path().join("l2r");
    let config = SynthConfig::default()
        .with_cases(2)
        .with_size([16, 16, 20])
        .with_seed(3);
    medray_core::synth::generate(&config, &data, |_, _| {}).unwrap();
    let options = IngestOptions::default().with_name(DatasetName::new("lung").unwrap());

    let report = ingest_dir(&stage, &mut catalog, &data, &options, |_, _, _| {})
        .await
        .unwrap();
    assert_eq!(report.outcome, PublishOutcome::Created);
    assert_eq!(report.objects_written, 10);
    let listed = stage.list("datasets/lung").await.unwrap();
    assert_eq!(listed.len(), 10, "{listed:?}");

    // Every object reads back as the original file; on the server it is ciphertext under
    // the stage's prefix.
    let cases = catalog.cases(&report.name).unwrap();
    let key = &cases[1].moving.key;
    assert_eq!(key.as_str(), "datasets/lung/scansInsp/case_002_insp.nii.gz");
    let original = std::fs::read(data.join("scans/case_002_insp.nii.gz")).unwrap();
    assert_eq!(stage.get(key).await.unwrap(), original);
    let on_server = server.object_path("medray-test", &format!("team/a/{key}"));
    let stored = std::fs::read(&on_server).unwrap();
    assert_ne!(stored, original);
    assert!(!stored.windows(64).any(|w| w == &original[..64]));

    // Idempotent through S3 too.
    let again = ingest_dir(&stage, &mut catalog, &data, &options, |_, _, _| {})
        .await
        .unwrap();
    assert_eq!(again.outcome, PublishOutcome::Unchanged);
    assert_eq!(stage.list("").await.unwrap().len(), 10);

    // Another key is refused as such.
    let other = s3_stage(&server, [8; 32]);
    let err = other.get(key).await.unwrap_err();
    assert!(matches!(err, Error::WrongStageKey { .. }), "{err}");

    // A flipped byte on the server is detected and no data is returned.
    let mut tampered = stored.clone();
    let middle = tampered.len() / 2;
    tampered[middle] ^= 0x01;
    std::fs::write(&on_server, &tampered).unwrap();
    let err = stage.get(key).await.unwrap_err();
    assert!(matches!(err, Error::Decrypt { .. }), "{err}");
    assert!(err.to_string().contains(key.as_str()), "{err}");

    // A missing object is an S3 error naming the key, and delete is idempotent.
    let gone = ObjectKey::new("datasets/lung/none.bin").unwrap();
    assert!(!stage.exists(&gone).await.unwrap());
    stage.delete(key).await.unwrap();
    stage.delete(key).await.unwrap();
    let err = stage.get(key).await.unwrap_err();
    assert!(matches!(err, Error::Stage { .. }), "{err}");
}

#[tokio::test]
async fn wrong_credentials_are_refused_by_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(&dir.path().join("s3"), &["medray-test"])
        .await
        .unwrap();
    let stage = Stage::open_with(
        StageLocation::parse("s3://medray-test/x").unwrap(),
        Some(StageKey::from_bytes([1; 32])),
        &options(&server).with_credentials(S3Server::ACCESS_KEY, "not-the-secret"),
    )
    .unwrap();
    let err = stage
        .put(&ObjectKey::new("a/b").unwrap(), b"data")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Stage { .. }), "{err}");
    assert!(err.to_string().contains("a/b"), "{err}");
}
