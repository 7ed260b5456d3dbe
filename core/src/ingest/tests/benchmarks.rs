//! `dirlab` and `nlst` ingests on tiny files written in the benchmarks' exact layouts.

use std::path::{Path, PathBuf};

use super::*;
use crate::ingest::dirlab::{DirLabEntry, DirLabTable, LANDMARK_COUNT};
use crate::keypoints::{read_keypoint_pairs, KeypointPairs};
use crate::nifti_io::{read_volume, write_volume_as, Volume};

/// A stage and catalog without any dataset.
struct Empty {
    dir: tempfile::TempDir,
    stage: Stage,
    stage_dir: PathBuf,
    catalog: Catalog,
}

fn empty() -> Empty {
    let dir = tempfile::tempdir().unwrap();
    let stage_dir = dir.path().join("stage");
    let stage = Stage::open(
        StageLocation::Local(stage_dir.clone()),
        Some(StageKey::from_bytes([7; 32])),
    )
    .unwrap();
    let catalog = Catalog::open(&dir.path().join("catalog.db")).unwrap();
    Empty {
        dir,
        stage,
        stage_dir,
        catalog,
    }
}

impl Empty {
    async fn assert_nothing_published(&self) {
        assert!(self.catalog.datasets().unwrap().is_empty());
        assert!(keys(&self.stage).await.is_empty());
        assert!(
            walk(&self.stage_dir).is_empty(),
            "{:?}",
            walk(&self.stage_dir)
        );
    }

    /// The stored object `key` read back as a volume.
    async fn volume(&self, key: &ObjectKey) -> Volume {
        let path = self
            .dir
            .path()
            .join(format!("read-{}", key.as_str().replace('/', "_")));
        std::fs::write(&path, self.stage.get(key).await.unwrap()).unwrap();
        read_volume(&path).unwrap()
    }

    async fn pairs(&self, key: &ObjectKey) -> KeypointPairs {
        let path = self.dir.path().join("read-kp.csv");
        std::fs::write(&path, self.stage.get(key).await.unwrap()).unwrap();
        read_keypoint_pairs(&path).unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// DIR-Lab
// ---------------------------------------------------------------------------------------------

/// Tiny grids (not cubic, so a swapped axis shows) for two cases of the real table's names.
fn tiny_table() -> DirLabTable {
    DirLabTable::from_entries(vec![
        DirLabEntry {
            case: "case1".into(),
            size: [6, 5, 4],
            spacing_mm: [0.97, 0.97, 2.5],
        },
        DirLabEntry {
            case: "copd2".into(),
            size: [5, 4, 3],
            spacing_mm: [0.645, 0.645, 2.5],
        },
    ])
    .unwrap()
}

/// Stored value of air (HU -1000 with the benchmark's offset).
const AIR: i16 = 24;
/// Stored value of the voxel planted at each pair's first landmark.
const BRIGHT: i16 = 3000;

/// Writes a raw little-endian int16 volume, x fastest, `AIR` everywhere but `bright`.
fn write_raw(path: &Path, size: [usize; 3], bright: [usize; 3]) {
    let mut bytes = Vec::with_capacity(size.iter().product::<usize>() * 2);
    for z in 0..size[2] {
        for y in 0..size[1] {
            for x in 0..size[0] {
                let v = if [x, y, z] == bright { BRIGHT } else { AIR };
                bytes.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// 300 lines of 1-based `x y z` in the files' own style (tabs, CRLF); the first is `first`.
fn write_landmarks(path: &Path, size: [usize; 3], first: [usize; 3]) {
    let mut text = format!("{}\t{}\t{}\r\n", first[0], first[1], first[2]);
    for n in 1..LANDMARK_COUNT {
        let p = [
            1 + n % size[0],
            1 + (n / 7) % size[1],
            1 + (n / 3) % size[2],
        ];
        text.push_str(&format!(" {}\t {}\t {}\t\r\n", p[0], p[1], p[2]));
    }
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// First landmarks (1-based) of each phase; the bright voxels sit there.
const CASE1_EXP: [usize; 3] = [3, 2, 4];
const CASE1_INSP: [usize; 3] = [5, 4, 2];
const COPD2_EXP: [usize; 3] = [2, 3, 1];
const COPD2_INSP: [usize; 3] = [4, 1, 3];

fn zero_based(p: [usize; 3]) -> [usize; 3] {
    [p[0] - 1, p[1] - 1, p[2] - 1]
}

/// `root/4DCT/Case1Pack/...` and `root/COPD/copd2/copd2/...`, as the archives unpack.
fn dirlab_layout(root: &Path) -> DirLabFiles {
    let pack = root.join("4DCT/Case1Pack");
    let copd = root.join("COPD/copd2/copd2");
    let f = DirLabFiles {
        case1_insp: pack.join("Images/case1_T00_s.img"),
        case1_exp: pack.join("Images/case1_T50_s.img"),
        case1_insp_lm: pack.join("ExtremePhases/Case1_300_T00_xyz.txt"),
        case1_exp_lm: pack.join("ExtremePhases/Case1_300_T50_xyz.txt"),
        copd2_insp: copd.join("copd2_iBHCT.img"),
        copd2_exp: copd.join("copd2_eBHCT.img"),
        copd2_insp_lm: copd.join("copd2_300_iBH_xyz_r1.txt"),
        copd2_exp_lm: copd.join("copd2_300_eBH_xyz_r1.txt"),
    };
    let (s1, s2) = ([6, 5, 4], [5, 4, 3]);
    write_raw(&f.case1_insp, s1, zero_based(CASE1_INSP));
    write_raw(&f.case1_exp, s1, zero_based(CASE1_EXP));
    write_landmarks(&f.case1_insp_lm, s1, CASE1_INSP);
    write_landmarks(&f.case1_exp_lm, s1, CASE1_EXP);
    write_raw(&f.copd2_insp, s2, zero_based(COPD2_INSP));
    write_raw(&f.copd2_exp, s2, zero_based(COPD2_EXP));
    write_landmarks(&f.copd2_insp_lm, s2, COPD2_INSP);
    write_landmarks(&f.copd2_exp_lm, s2, COPD2_EXP);
    // Files the ingest must ignore.
    std::fs::write(pack.join("Images/case1_T10_s.img"), b"other phase").unwrap();
    std::fs::write(pack.join("Images/case1_T00_s.mhd"), b"header").unwrap();
    f
}

struct DirLabFiles {
    case1_insp: PathBuf,
    case1_exp: PathBuf,
    case1_insp_lm: PathBuf,
    case1_exp_lm: PathBuf,
    copd2_insp: PathBuf,
    copd2_exp: PathBuf,
    copd2_insp_lm: PathBuf,
    copd2_exp_lm: PathBuf,
}

fn dirlab_config(root: &Path) -> DirLabConfig {
    DirLabConfig::new(root).with_table(tiny_table())
}

#[tokio::test]
async fn dirlab_cases_are_stored_as_nifti_in_hu_with_landmarks_on_their_voxels() {
    let mut e = empty();
    let root = e.dir.path().join("dirlab");
    dirlab_layout(&root);
    let r = ingest_dirlab(
        &e.stage,
        &mut e.catalog,
        &dirlab_config(&root),
        &IngestOptions::default(),
        |_, _, _| {},
    )
    .await
    .unwrap();
    assert_eq!(r.name.as_str(), "dirlab");
    assert_eq!((r.cases, r.objects_written), (2, 6));
    let cases = e.catalog.cases(&name("dirlab")).unwrap();
    let ids: Vec<&str> = cases.iter().map(|c| c.case_id.as_str()).collect();
    assert_eq!(ids, ["case1", "copd2"]);
    let k = keys(&e.stage).await;
    for want in [
        "datasets/dirlab/scansExp/case1_exp.nii.gz",
        "datasets/dirlab/scansInsp/case1_insp.nii.gz",
        "datasets/dirlab/keypoints/copd2.csv",
    ] {
        assert!(k.iter().any(|x| x == want), "{want} not in {k:?}");
    }

    for (case, size, spacing, exp, insp) in [
        (&cases[0], [6, 5, 4], 0.97, CASE1_EXP, CASE1_INSP),
        (&cases[1], [5, 4, 3], 0.645, COPD2_EXP, COPD2_INSP),
    ] {
        assert_eq!(case.shape, size);
        assert_eq!(case.keypoint_count, 300);
        let want_spacing = [spacing, spacing, 2.5];
        let close = |got: [f64; 3]| {
            got.iter()
                .zip(want_spacing)
                .all(|(g, w)| (g - w).abs() < 1e-6)
        };
        assert!(close(case.spacing_mm), "{:?}", case.spacing_mm);
        // HU: air stored as 24 is -1000 HU; the planted voxel 3000 is 1976 HU.
        assert_eq!(case.intensity_min, f64::from(AIR) - 1024.0);
        assert_eq!(case.intensity_max, f64::from(BRIGHT) - 1024.0);
        let fixed = e.volume(&case.fixed.key).await;
        let moving = e.volume(&case.moving.key).await;
        for v in [&fixed, &moving] {
            assert_eq!(v.shape(), size);
            assert!(close(v.spacing), "{:?}", v.spacing);
            assert_eq!(v.header.datatype, 4, "int16");
            // RAS+ affine, voxel axes toward L, P, I, origin 0.
            let want = crate::ingest::dirlab::dirlab_affine(want_spacing);
            assert_eq!(want[0][0], -spacing, "the x axis runs toward L");
            assert_eq!(want[2][2], -2.5, "the slices run toward I");
            for (got, want) in v.affine.iter().flatten().zip(want.iter().flatten()) {
                assert!((got - want).abs() < 1e-6, "{:?}", v.affine);
            }
        }
        // Fixed is expiration, moving inspiration; keypoint pair 0 is the first line of each
        // landmark file minus 1, and lands on the bright voxel planted at that line.
        let pairs = e.pairs(&case.keypoints.as_ref().unwrap().key).await;
        assert_eq!(pairs.len(), 300);
        let f0 = zero_based(exp).map(|c| c as f64);
        let m0 = zero_based(insp).map(|c| c as f64);
        assert_eq!((pairs.fixed[0], pairs.moving[0]), (f0, m0));
        let at = |v: &Volume, p: [f64; 3]| v.data[[p[0] as usize, p[1] as usize, p[2] as usize]];
        assert_eq!(at(&fixed, pairs.fixed[0]), f32::from(BRIGHT) - 1024.0);
        assert_eq!(at(&moving, pairs.moving[0]), f32::from(BRIGHT) - 1024.0);
        assert_eq!(at(&fixed, pairs.moving[0]), f32::from(AIR) - 1024.0);
    }

    // The conversion is deterministic: the same folder again is a no-op.
    let again = ingest_dirlab(
        &e.stage,
        &mut e.catalog,
        &dirlab_config(&root),
        &IngestOptions::default(),
        |_, _, _| {},
    )
    .await
    .unwrap();
    assert_eq!(again.outcome, PublishOutcome::Unchanged);
}

#[tokio::test]
async fn dirlab_cases_can_be_picked_and_unknown_or_absent_ones_are_refused() {
    let mut e = empty();
    let root = e.dir.path().join("dirlab");
    dirlab_layout(&root);
    let config = dirlab_config(&root).with_cases(vec!["COPD2".into()]);
    let r = ingest_dirlab(&e.stage, &mut e.catalog, &config, &opts("c"), |_, _, _| {})
        .await
        .unwrap();
    assert_eq!(r.cases, 1);
    assert_eq!(
        e.catalog.cases(&name("c")).unwrap()[0].case_id.as_str(),
        "copd2"
    );

    let mut e = empty();
    dirlab_layout(&root);
    for (cases, needle) in [
        (
            vec!["1".to_string(), "case11".to_string()],
            "`case11`: not in the DIR-Lab table",
        ),
        (vec!["lung7".to_string()], "`lung7`"),
    ] {
        let config = dirlab_config(&root).with_cases(cases);
        let msg = ingest_dirlab(&e.stage, &mut e.catalog, &config, &opts("c"), |_, _, _| {})
            .await
            .unwrap_err()
            .to_string();
        assert!(msg.contains(needle), "{msg}");
        e.assert_nothing_published().await;
    }
    // In the benchmark's table, but not in the folder.
    let config = DirLabConfig::new(&root).with_cases(vec!["case4".into()]);
    let msg = ingest_dirlab(&e.stage, &mut e.catalog, &config, &opts("c"), |_, _, _| {})
        .await
        .unwrap_err()
        .to_string();
    assert!(msg.contains("case4: no file of it under"), "{msg}");
    e.assert_nothing_published().await;
}

/// Breaks one file of a good layout, ingests, and returns the error text after checking
/// that nothing was published.
async fn dirlab_refusal(breakage: impl FnOnce(&DirLabFiles)) -> String {
    let mut e = empty();
    let root = e.dir.path().join("dirlab");
    let files = dirlab_layout(&root);
    breakage(&files);
    let err = ingest_dirlab(
        &e.stage,
        &mut e.catalog,
        &dirlab_config(&root),
        &IngestOptions::default(),
        |_, _, _| {},
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::BadCases { .. }), "{err:?}");
    e.assert_nothing_published().await;
    err.to_string()
}

#[tokio::test]
async fn a_dirlab_volume_of_the_wrong_size_is_refused_naming_it() {
    let msg = dirlab_refusal(|f| {
        let bytes = std::fs::read(&f.case1_insp).unwrap();
        std::fs::write(&f.case1_insp, &bytes[..bytes.len() - 2]).unwrap();
    })
    .await;
    assert!(msg.contains("case1_T00_s.img"), "{msg}");
    assert!(msg.contains("238 bytes, expected 240"), "{msg}");
    assert!(msg.contains("6x5x4"), "{msg}");
}

#[tokio::test]
async fn a_short_or_malformed_dirlab_landmark_file_is_refused_naming_it() {
    let msg = dirlab_refusal(|f| {
        let text = std::fs::read_to_string(&f.case1_exp_lm).unwrap();
        let short: Vec<&str> = text.lines().take(299).collect();
        std::fs::write(&f.case1_exp_lm, short.join("\n")).unwrap();
    })
    .await;
    assert!(msg.contains("Case1_300_T50_xyz.txt"), "{msg}");
    assert!(msg.contains("299 landmarks, expected 300"), "{msg}");

    let msg = dirlab_refusal(|f| {
        let mut lines: Vec<String> = std::fs::read_to_string(&f.copd2_insp_lm)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        lines[6] = "2\tx2\t1".into();
        std::fs::write(&f.copd2_insp_lm, lines.join("\n")).unwrap();
    })
    .await;
    assert!(msg.contains("copd2_300_iBH_xyz_r1.txt"), "{msg}");
    assert!(msg.contains("line 7: `x2` is not a number"), "{msg}");
}

#[tokio::test]
async fn a_missing_dirlab_file_is_refused_naming_where_it_was_expected() {
    let msg = dirlab_refusal(|f| std::fs::remove_file(&f.copd2_exp_lm).unwrap()).await;
    let expected = "COPD/copd2/copd2/copd2_300_eBH_xyz_r1.txt: file not found";
    assert!(msg.contains(expected), "{msg}");

    let msg = dirlab_refusal(|f| std::fs::remove_file(&f.case1_insp_lm).unwrap()).await;
    let expected = "Case1Pack/ExtremePhases/Case1_300_T00_xyz.txt: file not found";
    assert!(msg.contains(expected), "{msg}");

    let msg = dirlab_refusal(|f| std::fs::remove_file(&f.case1_exp).unwrap()).await;
    let expected = "Case1Pack/Images/case1_T50_s.img: file not found";
    assert!(msg.contains(expected), "{msg}");
}

#[tokio::test]
async fn skip_bad_leaves_out_a_broken_dirlab_case() {
    let mut e = empty();
    let root = e.dir.path().join("dirlab");
    let f = dirlab_layout(&root);
    std::fs::write(&f.copd2_exp, b"short").unwrap();
    let r = ingest_dirlab(
        &e.stage,
        &mut e.catalog,
        &dirlab_config(&root),
        &IngestOptions::default().with_skip_bad(true),
        |_, _, _| {},
    )
    .await
    .unwrap();
    assert_eq!(r.cases, 1);
    assert_eq!(r.bad.len(), 1);
    assert_eq!(r.bad[0].case_id, "copd2");
    assert_eq!(r.bad[0].file.as_deref(), Some(f.copd2_exp.as_path()));
}

// ---------------------------------------------------------------------------------------------
// NLST
// ---------------------------------------------------------------------------------------------

/// An NLST-layout folder with pairs 0001 (training) and 0101 (validation), 6x5x4 volumes.
fn nlst_layout(root: &Path) {
    for dir in ["imagesTr", "masksTr", "keypointsTr"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    let affine = [
        [1.5, 0.0, 0.0, 0.0],
        [0.0, 1.5, 0.0, 0.0],
        [0.0, 0.0, 1.5, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    for id in ["0001", "0101"] {
        for t in ["0000", "0001"] {
            let seed: f32 = if t == "0000" { 0.0 } else { 10.0 };
            let data = ndarray::Array3::from_shape_fn((6, 5, 4), |(x, y, z)| {
                -1000.0 + seed + (x + 10 * y + 100 * z) as f32
            });
            let img = root.join(format!("imagesTr/NLST_{id}_{t}.nii.gz"));
            write_volume_as(&img, &data, &affine, StoredType::Int16).unwrap();
            let mask = ndarray::Array3::from_shape_fn((6, 5, 4), |(x, _, _)| f32::from(x > 1));
            let m = root.join(format!("masksTr/NLST_{id}_{t}.nii.gz"));
            write_volume_as(&m, &mask, &affine, StoredType::Uint8).unwrap();
            let shift = if t == "0000" { 0.0 } else { 0.5 };
            let kp: String = (0..5)
                .map(|n| format!("{},{},{}\n", n as f64 + shift, 1.25, 3.0 - shift))
                .collect();
            std::fs::write(root.join(format!("keypointsTr/NLST_{id}_{t}.csv")), kp).unwrap();
        }
    }
    let json = serde_json::json!({
        "name": "NLST",
        "pairings": "paired",
        "registration_direction": {"fixed": 0, "moving": 1},
        "tensorImageShape": {"0": [6, 5, 4]},
        "numTraining": 4,
        "training": [
            {"image": "./imagesTr/NLST_0001_0000.nii.gz",
             "keypoints": "./keypointsTr/NLST_0001_0000.csv",
             "mask": "./masksTr/NLST_0001_0000.nii.gz"},
            {"image": "./imagesTr/NLST_0001_0001.nii.gz",
             "keypoints": "./keypointsTr/NLST_0001_0001.csv",
             "mask": "./masksTr/NLST_0001_0001.nii.gz"},
            {"image": "./imagesTr/NLST_0101_0000.nii.gz",
             "keypoints": "./keypointsTr/NLST_0101_0000.csv",
             "mask": "./masksTr/NLST_0101_0000.nii.gz"},
            {"image": "./imagesTr/NLST_0101_0001.nii.gz",
             "keypoints": "./keypointsTr/NLST_0101_0001.csv",
             "mask": "./masksTr/NLST_0101_0001.nii.gz"}
        ],
        "test": [],
        "numPairedTraining": 1,
        "training_paired_images": [
            {"fixed": "./imagesTr/NLST_0001_0000.nii.gz",
             "moving": "./imagesTr/NLST_0001_0001.nii.gz"}
        ],
        "registration_val": [
            {"fixed": "./imagesTr/NLST_0101_0000.nii.gz",
             "moving": "./imagesTr/NLST_0101_0001.nii.gz"}
        ],
        "registration_test": [],
        "numRegistration_val": 1,
        "numRegistration_test": 0
    });
    std::fs::write(
        root.join("NLST_dataset.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
}

#[tokio::test]
async fn nlst_pairs_are_ingested_as_the_json_lists_them() {
    let mut e = empty();
    let root = e.dir.path().join("NLST");
    nlst_layout(&root);
    let r = ingest_nlst(
        &e.stage,
        &mut e.catalog,
        &NlstConfig::new(&root),
        &IngestOptions::default(),
        |_, _, _| {},
    )
    .await
    .unwrap();
    assert_eq!(r.name.as_str(), "nlst");
    assert_eq!((r.cases, r.objects_written), (2, 10));
    let cases = e.catalog.cases(&name("nlst")).unwrap();
    let ids: Vec<&str> = cases.iter().map(|c| c.case_id.as_str()).collect();
    assert_eq!(ids, ["NLST_0001", "NLST_0101"]);
    for case in &cases {
        let id = case.case_id.as_str();
        // Fixed is the JSON's fixed (baseline _0000), stored byte for byte.
        let baseline = std::fs::read(root.join(format!("imagesTr/{id}_0000.nii.gz"))).unwrap();
        assert_eq!(e.stage.get(&case.fixed.key).await.unwrap(), baseline);
        let followup = std::fs::read(root.join(format!("imagesTr/{id}_0001.nii.gz"))).unwrap();
        assert_eq!(e.stage.get(&case.moving.key).await.unwrap(), followup);
        assert!(case.fixed_mask.is_some() && case.moving_mask.is_some());
        assert_eq!(case.spacing_mm, [1.5, 1.5, 1.5]);
        let pairs = e.pairs(&case.keypoints.as_ref().unwrap().key).await;
        assert_eq!(pairs.len(), 5);
        assert_eq!(pairs.fixed[2], [2.0, 1.25, 3.0]);
        assert_eq!(pairs.moving[2], [2.5, 1.25, 2.5]);
    }
    let record = e.catalog.dataset(&name("nlst")).unwrap().unwrap();
    assert!(
        record
            .source
            .ends_with("pairs=training_paired_images,registration_val"),
        "{}",
        record.source
    );

    // Only the validation pairs.
    let mut e2 = empty();
    let config = NlstConfig::new(root.join("NLST_dataset.json"))
        .with_pair_lists(vec!["registration_val".into()]);
    let r = ingest_nlst(
        &e2.stage,
        &mut e2.catalog,
        &config,
        &opts("val"),
        |_, _, _| {},
    )
    .await
    .unwrap();
    assert_eq!(r.cases, 1);
    let msg = ingest_nlst(
        &e2.stage,
        &mut e2.catalog,
        &NlstConfig::new(&root).with_pair_lists(vec!["registration_tset".into()]),
        &opts("x"),
        |_, _, _| {},
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("NLST_dataset.json") && msg.contains("`registration_tset`"),
        "{msg}"
    );
    assert!(msg.contains("registration_val"), "lists the lists: {msg}");
}

/// Breaks a good NLST layout, ingests, checks that nothing was published, returns the error.
async fn nlst_refusal(breakage: impl FnOnce(&Path)) -> String {
    let mut e = empty();
    let root = e.dir.path().join("NLST");
    nlst_layout(&root);
    breakage(&root);
    let err = ingest_nlst(
        &e.stage,
        &mut e.catalog,
        &NlstConfig::new(&root),
        &IngestOptions::default(),
        |_, _, _| {},
    )
    .await
    .unwrap_err();
    e.assert_nothing_published().await;
    err.to_string()
}

#[tokio::test]
async fn an_nlst_pair_the_folder_lacks_is_refused_naming_the_file() {
    let msg = nlst_refusal(|root| {
        std::fs::remove_file(root.join("imagesTr/NLST_0101_0001.nii.gz")).unwrap();
    })
    .await;
    assert!(msg.contains("imagesTr/NLST_0101_0001.nii.gz"), "{msg}");
    assert!(
        msg.contains("listed in NLST_dataset.json (`registration_val`) but not in the folder"),
        "{msg}"
    );

    let msg = nlst_refusal(|root| {
        std::fs::remove_file(root.join("masksTr/NLST_0001_0000.nii.gz")).unwrap();
    })
    .await;
    assert!(msg.contains("masksTr/NLST_0001_0000.nii.gz"), "{msg}");

    let msg = nlst_refusal(|root| {
        std::fs::write(root.join("keypointsTr/NLST_0001_0001.csv"), "1,2,3\n4,5\n").unwrap();
    })
    .await;
    assert!(
        msg.contains("keypointsTr/NLST_0001_0001.csv: line 2"),
        "{msg}"
    );

    let msg = nlst_refusal(|root| {
        let path = root.join("NLST_dataset.json");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            text.replace("./imagesTr/NLST_0001_0001", "../imagesTr/x"),
        )
        .unwrap();
    })
    .await;
    assert!(msg.contains("leaves the dataset folder"), "{msg}");
}
