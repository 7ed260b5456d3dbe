#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use super::*;
use crate::nifti_io::StoredType;
use crate::stage::{StageKey, StageLocation};

struct Env {
    _dir: tempfile::TempDir,
    stage: Stage,
    stage_dir: PathBuf,
    catalog: Catalog,
    data: PathBuf,
}

fn env(cases: usize) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let stage_dir = dir.path().join("stage");
    let stage = Stage::open(
        StageLocation::Local(stage_dir.clone()),
        Some(StageKey::from_bytes([9; 32])),
    )
    .unwrap();
    let catalog = Catalog::open(&dir.path().join("catalog.db")).unwrap();
    let data = dir.path().join("l2r");
    let config = SynthConfig::default()
        .with_cases(cases)
        .with_size([16, 16, 20])
        .with_seed(1);
    crate::synth::generate(&config, &data, |_, _| {}).unwrap();
    Env {
        _dir: dir,
        stage,
        stage_dir,
        catalog,
        data,
    }
}

fn name(s: &str) -> DatasetName {
    DatasetName::new(s).unwrap()
}

async fn keys(stage: &Stage) -> Vec<String> {
    stage
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key.as_str().to_string())
        .collect()
}

fn opts(n: &str) -> IngestOptions {
    IngestOptions::default().with_name(name(n))
}

#[tokio::test]
async fn ingests_a_folder_into_the_four_folders_and_the_catalog() {
    let mut e = env(2);
    let r = ingest_dir(
        &e.stage,
        &mut e.catalog,
        &e.data,
        &opts("lung"),
        |_, _, _| {},
    )
    .await
    .unwrap();
    assert_eq!(r.outcome, PublishOutcome::Created);
    assert_eq!((r.cases, r.objects_written), (2, 10));
    let k = keys(&e.stage).await;
    for want in [
        "datasets/lung/scansExp/case_001_exp.nii.gz",
        "datasets/lung/scansInsp/case_001_insp.nii.gz",
        "datasets/lung/lungMasksExp/case_002_exp.nii.gz",
        "datasets/lung/lungMasksInsp/case_002_insp.nii.gz",
        "datasets/lung/keypoints/case_002.csv",
    ] {
        assert!(k.iter().any(|x| x == want), "{want} not in {k:?}");
    }
    assert_eq!(k.len(), 10);
    let cases = e.catalog.cases(&name("lung")).unwrap();
    assert_eq!(cases.len(), 2);
    assert_eq!(cases[0].shape, [16, 16, 20]);
    assert!(cases[0].intensity_min < cases[0].intensity_max);
    let pairs =
        crate::keypoints::read_keypoint_pairs(e.data.join("keypoints/case_001.csv")).unwrap();
    assert_eq!(cases[0].keypoint_count, pairs.len());
    // The stored object decrypts to the original file.
    let original = std::fs::read(e.data.join("scans/case_001_exp.nii.gz")).unwrap();
    assert_eq!(e.stage.get(&cases[0].fixed.key).await.unwrap(), original);
    assert_eq!(
        hex::encode(Sha256::digest(&original)),
        cases[0].fixed.sha256
    );
}

#[tokio::test]
async fn re_ingesting_identical_content_is_a_no_op() {
    let mut e = env(1);
    let o = opts("d");
    ingest_dir(&e.stage, &mut e.catalog, &e.data, &o, |_, _, _| {})
        .await
        .unwrap();
    let before = keys(&e.stage).await;
    let r = ingest_dir(&e.stage, &mut e.catalog, &e.data, &o, |_, _, _| {})
        .await
        .unwrap();
    assert_eq!(r.outcome, PublishOutcome::Unchanged);
    assert_eq!(r.objects_written, 0);
    assert_eq!(keys(&e.stage).await, before);
    assert_eq!(e.catalog.datasets().unwrap().len(), 1);
}

fn corrupt(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    std::fs::write(path, &bytes[..bytes.len() / 2]).unwrap();
}

#[tokio::test]
async fn a_corrupt_file_refuses_the_dataset_naming_the_file_and_leaves_nothing() {
    let mut e = env(2);
    corrupt(&e.data.join("scans/case_002_insp.nii.gz"));
    let err = ingest_dir(&e.stage, &mut e.catalog, &e.data, &opts("d"), |_, _, _| {})
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("case_002_insp.nii.gz"), "{msg}");
    assert!(e.catalog.datasets().unwrap().is_empty());
    assert!(keys(&e.stage).await.is_empty());
}

#[tokio::test]
async fn skip_bad_publishes_the_valid_cases_and_lists_the_bad_ones() {
    let mut e = env(2);
    // A non-binary mask.
    let mask = e.data.join("lungMasks/case_001_exp.nii.gz");
    let v = crate::nifti_io::read_volume(&mask).unwrap();
    let mut data = v.data.clone();
    data[[0, 0, 0]] = 2.0;
    crate::nifti_io::write_volume(&mask, &data, &v.affine).unwrap();
    let r = ingest_dir(
        &e.stage,
        &mut e.catalog,
        &e.data,
        &opts("d").with_skip_bad(true),
        |_, _, _| {},
    )
    .await
    .unwrap();
    assert_eq!(r.cases, 1);
    assert_eq!(r.bad.len(), 1);
    assert_eq!(r.bad[0].case_id, "case_001");
    assert!(r.bad[0].reason.contains("not binary"), "{}", r.bad[0]);
    let cases = e.catalog.cases(&name("d")).unwrap();
    assert_eq!(cases.len(), 1);
    assert_eq!(cases[0].case_id.as_str(), "case_002");
    assert_eq!(keys(&e.stage).await.len(), 5);
}

#[tokio::test]
async fn other_content_needs_replace_and_replacement_leaves_no_old_objects() {
    let mut e = env(2);
    ingest_dir(&e.stage, &mut e.catalog, &e.data, &opts("d"), |_, _, _| {})
        .await
        .unwrap();
    let first = e.catalog.dataset(&name("d")).unwrap().unwrap();
    std::fs::remove_file(e.data.join("keypoints/case_002.csv")).unwrap();
    let err = ingest_dir(&e.stage, &mut e.catalog, &e.data, &opts("d"), |_, _, _| {})
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DatasetExists { .. }), "{err}");
    assert_eq!(e.catalog.dataset(&name("d")).unwrap().unwrap(), first);
    assert_eq!(keys(&e.stage).await.len(), 10);

    let r = ingest_dir(
        &e.stage,
        &mut e.catalog,
        &e.data,
        &opts("d").with_replace(true),
        |_, _, _| {},
    )
    .await
    .unwrap();
    assert!(matches!(r.outcome, PublishOutcome::Replaced { .. }));
    let k = keys(&e.stage).await;
    assert_eq!(k.len(), 9, "{k:?}");
    let cases = e.catalog.cases(&name("d")).unwrap();
    let referenced: Vec<String> = cases
        .iter()
        .flat_map(case_keys)
        .map(|k| k.as_str().to_string())
        .collect();
    let mut sorted = referenced.clone();
    sorted.sort();
    assert_eq!(sorted, k);
}

#[tokio::test]
async fn a_failure_while_storing_deletes_the_objects_already_written() {
    let mut e = env(2);
    let victim = e.data.join("keypoints/case_002.csv");
    let err = ingest_dir(
        &e.stage,
        &mut e.catalog,
        &e.data,
        &opts("d"),
        |phase, done, total| {
            // The file changes between validation and storage.
            if phase == IngestPhase::Validate && done == total {
                std::fs::write(&victim, "1,2,3,4,5,6\n").unwrap();
            }
        },
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("changed after validation"),
        "{err}"
    );
    assert!(keys(&e.stage).await.is_empty());
    assert!(e.catalog.datasets().unwrap().is_empty());
    // No stray staging files either.
    let files = walk(&e.stage_dir);
    assert!(files.is_empty(), "{files:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for entry in rd.flatten() {
            let p = entry.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test]
async fn synthetic_ingest_twice_leaves_one_copy() {
    let mut e = env(1);
    let config = SynthConfig::default()
        .with_cases(2)
        .with_size([16, 16, 16])
        .with_seed(3);
    let o = IngestOptions::default();
    let a = ingest_synthetic(&e.stage, &mut e.catalog, &config, &o, |_, _, _| {})
        .await
        .unwrap();
    assert_eq!(a.name.as_str(), "synthetic-2c-16x16x16-s3");
    assert_eq!(a.outcome, PublishOutcome::Created);
    let b = ingest_synthetic(&e.stage, &mut e.catalog, &config, &o, |_, _, _| {})
        .await
        .unwrap();
    assert_eq!(b.outcome, PublishOutcome::Unchanged);
    assert_eq!(keys(&e.stage).await.len(), 10);
    assert_eq!(e.catalog.datasets().unwrap().len(), 1);
}

/// Moves the synthetic files into one folder per case with other names, and writes a
/// manifest for them.
fn to_manifest_layout(data: &Path, cases: &[&str], with_keypoints: bool) -> PathBuf {
    let root = data.join("by-patient");
    let mut csv = String::from("case_id,fixed,moving,fixed_mask,moving_mask");
    csv.push_str(if with_keypoints { ",keypoints\n" } else { "\n" });
    for (i, case) in cases.iter().enumerate() {
        let id = format!("case_{:03}", i + 1);
        let folder = root.join(case);
        std::fs::create_dir_all(&folder).unwrap();
        for (from, to) in [
            (format!("scans/{id}_exp.nii.gz"), "ct_exp.nii.gz"),
            (format!("scans/{id}_insp.nii.gz"), "ct_insp.nii.gz"),
            (format!("lungMasks/{id}_exp.nii.gz"), "mask_exp.nii.gz"),
            (format!("lungMasks/{id}_insp.nii.gz"), "mask_insp.nii.gz"),
            (format!("keypoints/{id}.csv"), "points.csv"),
        ] {
            std::fs::copy(data.join(from), folder.join(to)).unwrap();
        }
        csv.push_str(&format!(
            "{case},{case}/ct_exp.nii.gz,{case}/ct_insp.nii.gz,{case}/mask_exp.nii.gz,{case}/mask_insp.nii.gz"
        ));
        csv.push_str(&if with_keypoints {
            format!(",{case}/points.csv\n")
        } else {
            "\n".into()
        });
    }
    std::fs::write(root.join(MANIFEST_FILE), csv).unwrap();
    root
}

#[tokio::test]
async fn a_manifest_folder_is_ingested_under_case_named_objects() {
    let mut e = env(2);
    let root = to_manifest_layout(&e.data, &["patient-b", "patient-a"], true);
    // `ingest_dir` finds manifest.csv; the default name is the folder's.
    let r = ingest_dir(
        &e.stage,
        &mut e.catalog,
        &root,
        &IngestOptions::default(),
        |_, _, _| {},
    )
    .await
    .unwrap();
    assert_eq!(r.name.as_str(), "by-patient");
    assert_eq!((r.cases, r.objects_written), (2, 10));
    let k = keys(&e.stage).await;
    for want in [
        "datasets/by-patient/scansExp/patient-a_exp.nii.gz",
        "datasets/by-patient/lungMasksInsp/patient-b_insp.nii.gz",
        "datasets/by-patient/keypoints/patient-a.csv",
    ] {
        assert!(k.iter().any(|x| x == want), "{want} not in {k:?}");
    }
    let record = e.catalog.dataset(&r.name).unwrap().unwrap();
    assert!(record.source.starts_with("manifest:"), "{}", record.source);
    // patient-a is case_002 of the synthetic set.
    let cases = e.catalog.cases(&r.name).unwrap();
    assert_eq!(cases[0].case_id.as_str(), "patient-a");
    let original = std::fs::read(e.data.join("scans/case_002_exp.nii.gz")).unwrap();
    assert_eq!(e.stage.get(&cases[0].fixed.key).await.unwrap(), original);

    // The same content through --manifest FILE under the same name: nothing to do.
    let again = ingest_manifest(
        &e.stage,
        &mut e.catalog,
        &root.join(MANIFEST_FILE),
        &opts("by-patient"),
        |_, _, _| {},
    )
    .await
    .unwrap();
    assert_eq!(again.outcome, PublishOutcome::Unchanged);
}

#[tokio::test]
async fn a_bad_manifest_row_is_named_and_nothing_is_stored() {
    let mut e = env(2);
    let root = to_manifest_layout(&e.data, &["p1", "p2"], false);
    let manifest = root.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        text.replace("p2/ct_insp.nii.gz", "p2/missing.nii.gz"),
    )
    .unwrap();
    let err = ingest_dir(&e.stage, &mut e.catalog, &root, &opts("m"), |_, _, _| {})
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Manifest { line: 3, .. }), "{msg}");
    assert!(
        msg.contains("column `moving`") && msg.contains("missing.nii.gz"),
        "{msg}"
    );
    assert!(keys(&e.stage).await.is_empty());
    assert!(e.catalog.datasets().unwrap().is_empty());

    // A corrupt volume named by the manifest is refused by validation, naming the file.
    std::fs::write(&manifest, text).unwrap();
    corrupt(&root.join("p1/mask_insp.nii.gz"));
    let msg = ingest_dir(&e.stage, &mut e.catalog, &root, &opts("m"), |_, _, _| {})
        .await
        .unwrap_err()
        .to_string();
    assert!(msg.contains("p1/mask_insp.nii.gz"), "{msg}");
    assert!(keys(&e.stage).await.is_empty());
}

/// A manifest case whose fixed scan is the DICOM fixture `core/tests/data/popi-crop/dicom`
/// (moving: the same voxels as NIfTI, masks: a threshold of them).
fn dicom_manifest(root: &Path, fixed: &Path) -> PathBuf {
    let popi = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/popi-crop");
    let ct = crate::nifti_io::read_volume(popi.join("popi_crop.nii.gz")).unwrap();
    let mask = ct.data.mapv(|hu| f32::from(u8::from(hu < -400.0)));
    let mask_path = root.join("mask.nii.gz");
    crate::nifti_io::write_volume_as(&mask_path, &mask, &ct.affine, StoredType::Uint8).unwrap();
    let csv = root.join(MANIFEST_FILE);
    let row = format!(
        "p1,{},{},mask.nii.gz,mask.nii.gz\n",
        fixed.display(),
        popi.join("popi_crop.nii.gz").display()
    );
    std::fs::write(&csv, format!("{}\n{row}", manifest::COLUMNS.join(","))).unwrap();
    csv
}

#[tokio::test]
async fn a_dicom_series_in_a_manifest_is_stored_as_nifti() {
    let mut e = env(1);
    let root = e.data.join("dicom-case");
    std::fs::create_dir_all(&root).unwrap();
    let series = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/popi-crop/dicom");
    let csv = dicom_manifest(&root, &series);
    let r = ingest_manifest(&e.stage, &mut e.catalog, &csv, &opts("popi"), |_, _, _| {})
        .await
        .unwrap();
    assert_eq!((r.cases, r.objects_written), (1, 4));
    let cases = e.catalog.cases(&r.name).unwrap();
    assert_eq!(
        cases[0].fixed.key.as_str(),
        "datasets/popi/scansExp/p1_exp.nii.gz"
    );
    // The stored object is the series as NIfTI: the voxels and geometry of the NIfTI crop.
    let stored = root.join("stored.nii.gz");
    std::fs::write(&stored, e.stage.get(&cases[0].fixed.key).await.unwrap()).unwrap();
    let got = crate::nifti_io::read_volume(&stored).unwrap();
    let want = crate::nifti_io::read_volume(series.with_file_name("popi_crop.nii.gz")).unwrap();
    assert!(got.data == want.data);
    assert_eq!(got.header.datatype, 4, "int16");
    for (g, w) in got
        .affine
        .iter()
        .flatten()
        .zip(want.affine.iter().flatten())
    {
        assert!(
            (g - w).abs() < 1e-3,
            "{:?} vs {:?}",
            got.affine,
            want.affine
        );
    }
    assert_eq!(cases[0].shape, [64, 48, 16]);
    // The conversion is deterministic: the same series again is the same content.
    let again = ingest_manifest(&e.stage, &mut e.catalog, &csv, &opts("popi"), |_, _, _| {})
        .await
        .unwrap();
    assert_eq!(again.outcome, PublishOutcome::Unchanged);

    // A bad series refuses the case, naming the folder.
    let empty = root.join("empty-series");
    std::fs::create_dir_all(&empty).unwrap();
    let csv = dicom_manifest(&root, &empty);
    let err = ingest_manifest(&e.stage, &mut e.catalog, &csv, &opts("bad"), |_, _, _| {})
        .await
        .unwrap_err();
    let Error::BadCases { cases } = err else {
        panic!("expected BadCases, got {err}");
    };
    assert_eq!(cases[0].file.as_deref(), Some(empty.as_path()));
    assert!(cases[0].reason.contains("empty"), "{}", cases[0].reason);
}

mod benchmarks;
