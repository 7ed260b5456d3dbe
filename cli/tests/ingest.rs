//! `medray ingest`, `medray datasets` and `medray stage` end to end with the real binary on
//! tiny synthetic phantoms (16x16x20) in a temporary data directory.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly by design

use std::path::{Path, PathBuf};
use std::process::Command;

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run(data_dir: &Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_medray"))
        .args(args)
        .env("MEDRAY_DATA_DIR", data_dir)
        .env_remove("MEDRAY_STAGE")
        .env_remove("MEDRAY_STAGE_KEY")
        .output()
        .expect("medray runs");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(data_dir: &Path, args: &[&str]) -> Run {
    let r = run(data_dir, args);
    assert!(r.ok, "medray {args:?} failed:\n{}\n{}", r.stdout, r.stderr);
    r
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Files under `dir`, recursively (staging files included).
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
    out.sort();
    out
}

fn synth(dir: &Path, cases: usize) {
    let out = Command::new(env!("CARGO_BIN_EXE_medray"))
        .args(["synth", "--out", s(dir), "--cases", &cases.to_string()])
        .args(["--size", "16", "16", "20", "--seed", "5"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ingest_dir_then_list_show_and_stage_ls() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let l2r = tmp.path().join("l2r");
    synth(&l2r, 2);
    let r = ok(&data, &["ingest", "dir", s(&l2r), "--name", "lung"]);
    assert!(
        r.stdout.contains("published dataset lung: 2 cases"),
        "{}",
        r.stdout
    );
    assert!(data.join("catalog.db").is_file());
    assert!(data.join("stage.key").is_file());

    let list = ok(&data, &["datasets", "list"]);
    assert!(
        list.stdout.lines().any(|l| l.starts_with("lung\t2\t")),
        "{}",
        list.stdout
    );
    let show = ok(&data, &["datasets", "show", "lung"]);
    assert!(
        show.stdout.contains("case_001\t16x16x20"),
        "{}",
        show.stdout
    );
    assert!(show
        .stdout
        .contains("datasets/lung/scansExp/case_001_exp.nii.gz"));

    let ls = ok(&data, &["stage", "ls", "datasets/lung/scansInsp"]);
    assert_eq!(ls.stdout.lines().count(), 2, "{}", ls.stdout);
    assert!(ls
        .stdout
        .contains("datasets/lung/scansInsp/case_002_insp.nii.gz"));

    let missing = run(&data, &["datasets", "show", "nope"]);
    assert!(!missing.ok);
    assert!(
        missing.stderr.contains("no dataset named `nope`"),
        "{}",
        missing.stderr
    );
}

#[test]
fn re_ingesting_identical_synthetic_content_leaves_one_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let args = [
        "ingest",
        "synthetic",
        "--cases",
        "2",
        "--size",
        "16",
        "16",
        "16",
        "--seed",
        "7",
    ];
    let first = ok(&data, &args);
    assert!(
        first
            .stdout
            .contains("published dataset synthetic-2c-16x16x16-s7"),
        "{}",
        first.stdout
    );
    let files = walk(&data.join("stage"));
    assert_eq!(files.len(), 10, "{files:?}");
    let second = ok(&data, &args);
    assert!(second.stdout.contains("nothing to do"), "{}", second.stdout);
    assert_eq!(walk(&data.join("stage")), files);
    let list = ok(&data, &["datasets", "list"]);
    assert_eq!(list.stdout.lines().count(), 2, "{}", list.stdout);
}

#[test]
fn a_corrupt_nifti_is_refused_with_its_name_and_nothing_is_published_or_left() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let l2r = tmp.path().join("l2r");
    synth(&l2r, 2);
    let victim = l2r.join("scans/case_002_exp.nii.gz");
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() / 3]).unwrap();

    let r = run(&data, &["ingest", "dir", s(&l2r), "--name", "bad"]);
    assert!(!r.ok, "{}", r.stdout);
    assert!(r.stderr.contains("case_002_exp.nii.gz"), "{}", r.stderr);
    assert!(r.stderr.contains("nothing published"), "{}", r.stderr);
    assert!(walk(&data.join("stage")).is_empty());
    let list = ok(&data, &["datasets", "list"]);
    assert_eq!(list.stdout.lines().count(), 1, "{}", list.stdout);

    // --skip-bad publishes the other case and names the bad one.
    let r = ok(
        &data,
        &["ingest", "dir", s(&l2r), "--name", "bad", "--skip-bad"],
    );
    assert!(r.stdout.contains("1 cases"), "{}", r.stdout);
    assert!(
        r.stderr.contains("skipped bad case case_002"),
        "{}",
        r.stderr
    );
    assert_eq!(walk(&data.join("stage")).len(), 5);
}

#[test]
fn stage_put_get_round_trip_stores_ciphertext() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let input = tmp.path().join("in.txt");
    let plain = b"patient 42: lungs look fine\n".repeat(20);
    std::fs::write(&input, &plain).unwrap();
    ok(&data, &["stage", "put", s(&input), "notes/a.txt"]);
    let stored = std::fs::read(data.join("stage/notes/a.txt")).unwrap();
    assert_ne!(stored, plain);
    assert!(!stored.windows(10).any(|w| w == b"patient 42"));
    let out = tmp.path().join("out.txt");
    ok(&data, &["stage", "get", "notes/a.txt", s(&out)]);
    assert_eq!(std::fs::read(&out).unwrap(), plain);

    // Another key is refused with a clear message, and writes nothing.
    let other = Command::new(env!("CARGO_BIN_EXE_medray"))
        .args(["stage", "get", "notes/a.txt", s(&tmp.path().join("x"))])
        .env("MEDRAY_DATA_DIR", &data)
        .env("MEDRAY_STAGE_KEY", "11".repeat(32))
        .output()
        .unwrap();
    assert!(!other.status.success());
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(err.contains("wrong stage.key or MEDRAY_STAGE_KEY"), "{err}");
    assert!(!tmp.path().join("x").exists());

    // A flipped byte is detected.
    let mut t = stored.clone();
    t[40] ^= 1;
    std::fs::write(data.join("stage/notes/a.txt"), &t).unwrap();
    let r = run(
        &data,
        &["stage", "get", "notes/a.txt", s(&tmp.path().join("y"))],
    );
    assert!(!r.ok);
    assert!(r.stderr.contains("modified or truncated"), "{}", r.stderr);
}

/// A multi-threaded runtime that keeps serving while the test thread waits for `medray`.
fn server_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn ingest_learn2reg_from_a_local_url_with_checksums() {
    use sha2::Digest;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let l2r = tmp.path().join("l2r");
    synth(&l2r, 2);
    let zip = medray_testkit::ZipBuilder::new()
        .tree(&l2r, "training")
        .unwrap()
        .finish()
        .unwrap();
    let sha = hex::encode(sha2::Sha256::digest(&zip));
    let rt = server_runtime();
    let server = rt
        .block_on(medray_testkit::RangeServer::start("/training.zip", zip))
        .unwrap();
    let url = server.url();

    // A wrong md5 is refused with both values, and leaves nothing behind.
    let wrong = "0".repeat(32);
    let r = run(
        &data,
        &[
            "ingest",
            "learn2reg",
            "--url",
            &url,
            "--md5",
            &wrong,
            "--name",
            "l2r",
        ],
    );
    assert!(!r.ok, "{}", r.stdout);
    assert!(
        r.stderr.contains(&format!("md5 of {url} is")) && r.stderr.contains(&wrong),
        "{}",
        r.stderr
    );
    assert!(walk(&data.join("stage")).is_empty());
    assert!(walk(&data.join("downloads")).is_empty());

    // The server cuts the first answer half way; the download resumes and completes.
    server.cut_next_after(3_000);
    let r = ok(
        &data,
        &[
            "ingest",
            "learn2reg",
            "--url",
            &url,
            "--sha256",
            &sha,
            "--name",
            "l2r",
        ],
    );
    assert!(
        r.stdout.contains("published dataset l2r: 2 cases"),
        "{}",
        r.stdout
    );
    let requests = server.requests();
    assert_eq!(
        requests.last().and_then(|q| q.range.clone()).as_deref(),
        Some("bytes=3000-"),
        "{requests:?}"
    );
    let show = ok(&data, &["datasets", "show", "l2r"]);
    assert!(show.stdout.contains(&url), "{}", show.stdout);
    assert!(show
        .stdout
        .contains("datasets/l2r/scansInsp/case_002_insp.nii.gz"));
    assert!(walk(&data.join("downloads")).is_empty());
}

#[test]
fn ingest_learn2reg_help_names_the_default_url_and_the_checks() {
    let r = ok(Path::new("unused"), &["ingest", "learn2reg", "--help"]);
    for want in [
        "https://zenodo.org/record/3835682/files/training.zip",
        "--sha256 <HEX>",
        "--md5 <HEX>",
        "--retries",
        "--max-extract-bytes",
        "resumed (HTTP Range)",
    ] {
        assert!(r.stdout.contains(want), "{want} not in\n{}", r.stdout);
    }
}

#[test]
fn ingest_dir_with_a_manifest_names_a_bad_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let l2r = tmp.path().join("l2r");
    synth(&l2r, 2);
    let manifest = tmp.path().join("cases.csv");
    let row = |id: &str, n: &str, kp: &str| {
        format!(
            "{id},l2r/scans/case_{n}_exp.nii.gz,l2r/scans/case_{n}_insp.nii.gz,\
             l2r/lungMasks/case_{n}_exp.nii.gz,l2r/lungMasks/case_{n}_insp.nii.gz,{kp}\n"
        )
    };
    let header = "case_id,fixed,moving,fixed_mask,moving_mask,keypoints\n";
    std::fs::write(
        &manifest,
        format!("{header}{}{}", row("a", "001", ""), row("a", "002", "")),
    )
    .unwrap();
    let r = run(&data, &["ingest", "dir", "--manifest", s(&manifest)]);
    assert!(!r.ok);
    assert!(
        r.stderr
            .contains("cases.csv: line 3, column `case_id`: duplicate case_id `a`"),
        "{}",
        r.stderr
    );
    assert!(walk(&data.join("stage")).is_empty());

    std::fs::write(
        &manifest,
        format!(
            "{header}{}{}",
            row("a", "001", ""),
            row("b", "002", "l2r/keypoints/case_002.csv")
        ),
    )
    .unwrap();
    let r = ok(
        &data,
        &["ingest", "dir", "--manifest", s(&manifest), "--name", "m"],
    );
    assert!(
        r.stdout.contains("published dataset m: 2 cases, "),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains(", 9 objects"), "{}", r.stdout);
    let ls = ok(&data, &["stage", "ls", "datasets/m/keypoints"]);
    assert!(
        ls.stdout.contains("datasets/m/keypoints/b.csv"),
        "{}",
        ls.stdout
    );
}

/// A DIR-Lab 4D CT case and a COPDGene case in the distributed layouts, on tiny grids
/// (case1 6x5x4, copd2 5x4x3) given by a table file; returns the table file.
fn dirlab_layout(root: &Path) -> PathBuf {
    let raw = |path: &Path, size: [usize; 3]| {
        let n = size.iter().product::<usize>();
        let bytes: Vec<u8> = (0..n).flat_map(|i| (i as i16 + 24).to_le_bytes()).collect();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    };
    let landmarks = |path: &Path, size: [usize; 3]| {
        let text: String = (0..300)
            .map(|n| {
                format!(
                    "{}\t{}\t{}\r\n",
                    1 + n % size[0],
                    1 + n % size[1],
                    1 + n % size[2]
                )
            })
            .collect();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    let pack = root.join("Case1Pack");
    raw(&pack.join("Images/case1_T00_s.img"), [6, 5, 4]);
    raw(&pack.join("Images/case1_T50_s.img"), [6, 5, 4]);
    landmarks(&pack.join("ExtremePhases/Case1_300_T00_xyz.txt"), [6, 5, 4]);
    landmarks(&pack.join("ExtremePhases/Case1_300_T50_xyz.txt"), [6, 5, 4]);
    let copd = root.join("copd2");
    raw(&copd.join("copd2_iBHCT.img"), [5, 4, 3]);
    raw(&copd.join("copd2_eBHCT.img"), [5, 4, 3]);
    landmarks(&copd.join("copd2_300_iBH_xyz_r1.txt"), [5, 4, 3]);
    landmarks(&copd.join("copd2_300_eBH_xyz_r1.txt"), [5, 4, 3]);
    let table = root.join("tiny-table.csv");
    std::fs::write(
        &table,
        "case,size_x,size_y,size_z,spacing_x_mm,spacing_y_mm,spacing_z_mm\n\
         case1,6,5,4,0.97,0.97,2.5\ncopd2,5,4,3,0.645,0.645,2.5\n",
    )
    .unwrap();
    table
}

#[test]
fn ingest_dirlab_with_a_table_file_and_a_wrong_size_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let root = tmp.path().join("DIRLAB");
    let table = dirlab_layout(&root);
    let r = ok(
        &data,
        &[
            "ingest",
            "dirlab",
            s(&root),
            "--table",
            s(&table),
            "--cases",
            "1,copd2",
        ],
    );
    assert!(
        r.stdout.contains("published dataset dirlab: 2 cases, "),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains(", 6 objects"), "{}", r.stdout);
    let ls = ok(&data, &["stage", "ls", "datasets/dirlab"]);
    for want in [
        "datasets/dirlab/scansExp/case1_exp.nii.gz",
        "datasets/dirlab/scansInsp/copd2_insp.nii.gz",
        "datasets/dirlab/keypoints/copd2.csv",
    ] {
        assert!(ls.stdout.contains(want), "{want} not in\n{}", ls.stdout);
    }

    // Without the table, the benchmark's 256x256x94 grid does not fit the tiny file.
    let r = run(
        &data,
        &[
            "ingest",
            "dirlab",
            s(&root),
            "--name",
            "real",
            "--cases",
            "case1",
        ],
    );
    assert!(!r.ok, "{}", r.stdout);
    assert!(r.stderr.contains("case1_T00_s.img"), "{}", r.stderr);
    assert!(
        r.stderr.contains("240 bytes, expected 12320768"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("nothing published"), "{}", r.stderr);
    let list = ok(&data, &["datasets", "list"]);
    assert!(!list.stdout.contains("real"), "{}", list.stdout);

    let r = run(&data, &["ingest", "dirlab", s(&root), "--cases", "copd11"]);
    assert!(!r.ok);
    assert!(
        r.stderr.contains("`copd11`: not in the DIR-Lab table"),
        "{}",
        r.stderr
    );
}

/// Rearranges `medray synth` output into the Learn2Reg 2022 NLST layout (one pair).
fn nlst_layout(tmp: &Path) -> PathBuf {
    let l2r = tmp.join("l2r");
    synth(&l2r, 1);
    let root = tmp.join("NLST");
    for dir in ["imagesTr", "masksTr", "keypointsTr"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    for (phase, t) in [("exp", "0000"), ("insp", "0001")] {
        let name = format!("NLST_0001_{t}.nii.gz");
        std::fs::copy(
            l2r.join(format!("scans/case_001_{phase}.nii.gz")),
            root.join("imagesTr").join(&name),
        )
        .unwrap();
        std::fs::copy(
            l2r.join(format!("lungMasks/case_001_{phase}.nii.gz")),
            root.join("masksTr").join(&name),
        )
        .unwrap();
    }
    let pairs = std::fs::read_to_string(l2r.join("keypoints/case_001.csv")).unwrap();
    let (mut fixed, mut moving) = (String::new(), String::new());
    for line in pairs.lines().skip(1) {
        let v: Vec<&str> = line.split(',').collect();
        fixed.push_str(&format!("{}\n", v[..3].join(",")));
        moving.push_str(&format!("{}\n", v[3..].join(",")));
    }
    std::fs::write(root.join("keypointsTr/NLST_0001_0000.csv"), fixed).unwrap();
    std::fs::write(root.join("keypointsTr/NLST_0001_0001.csv"), moving).unwrap();
    let json = serde_json::json!({
        "name": "NLST",
        "training": [],
        "training_paired_images": [
            {"fixed": "./imagesTr/NLST_0001_0000.nii.gz",
             "moving": "./imagesTr/NLST_0001_0001.nii.gz"}
        ],
        "registration_val": [
            {"fixed": "./imagesTr/NLST_0002_0000.nii.gz",
             "moving": "./imagesTr/NLST_0002_0001.nii.gz"}
        ]
    });
    std::fs::write(root.join("NLST_dataset.json"), json.to_string()).unwrap();
    root
}

#[test]
fn ingest_nlst_takes_the_json_pairs_and_names_a_missing_image() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let root = nlst_layout(tmp.path());
    // The validation pair is listed but its images are not in the folder.
    let r = run(&data, &["ingest", "nlst", s(&root)]);
    assert!(!r.ok, "{}", r.stdout);
    assert!(
        r.stderr.contains("imagesTr/NLST_0002_0000.nii.gz: listed in NLST_dataset.json (`registration_val`) but not in the folder"),
        "{}",
        r.stderr
    );
    assert!(walk(&data.join("stage")).is_empty());

    let r = ok(
        &data,
        &[
            "ingest",
            "nlst",
            s(&root),
            "--pairs",
            "training_paired_images",
        ],
    );
    assert!(
        r.stdout.contains("published dataset nlst: 1 cases, "),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains(", 5 objects"), "{}", r.stdout);
    let ls = ok(&data, &["stage", "ls", "datasets/nlst"]);
    for want in [
        "datasets/nlst/scansExp/NLST_0001_exp.nii.gz",
        "datasets/nlst/lungMasksInsp/NLST_0001_insp.nii.gz",
        "datasets/nlst/keypoints/NLST_0001.csv",
    ] {
        assert!(ls.stdout.contains(want), "{want} not in\n{}", ls.stdout);
    }
}

#[test]
fn ingest_help_describes_the_benchmark_sources() {
    let r = ok(Path::new("unused"), &["ingest", "--help"]);
    for want in ["dirlab", "nlst", "DIR-Lab", "NLST"] {
        assert!(r.stdout.contains(want), "{want} not in\n{}", r.stdout);
    }
    let r = ok(Path::new("unused"), &["ingest", "dirlab", "--help"]);
    for want in [
        "--cases <CASE,...>",
        "--table <FILE>",
        "case,size_x,size_y,size_z,spacing_x_mm,spacing_y_mm,spacing_z_mm",
        "--hu-offset <OFFSET>",
        "[default: 1024]",
        "Case1Pack/ExtremePhases/Case1_300_T00_xyz.txt",
        "copd1/copd1_iBHCT.img",
    ] {
        assert!(r.stdout.contains(want), "{want} not in\n{}", r.stdout);
    }
    let r = ok(Path::new("unused"), &["ingest", "nlst", "--help"]);
    for want in ["NLST_dataset.json", "--pairs <KEY,...>", "registration_val"] {
        assert!(r.stdout.contains(want), "{want} not in\n{}", r.stdout);
    }
}
