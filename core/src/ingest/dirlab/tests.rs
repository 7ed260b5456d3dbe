#![allow(clippy::unwrap_used)]
use super::*;

#[test]
fn case_names_normalise_and_unknown_ones_are_refused() {
    for (given, want) in [
        ("1", "case1"),
        ("Case1", "case1"),
        ("case01", "case1"),
        ("10", "case10"),
        ("COPD2", "copd2"),
        (" copd10 ", "copd10"),
    ] {
        assert_eq!(case_name(given).unwrap(), want, "{given}");
    }
    for bad in ["", "case", "copd", "lung1", "case1a", "-1", "case+1"] {
        let msg = case_name(bad).unwrap_err().to_string();
        assert!(msg.contains(&format!("`{bad}`")), "{msg}");
    }
}

#[test]
fn file_names_of_the_distributed_archives_are_recognised() {
    let img = |p| Role::Image(p);
    let lm = |p| Role::Landmarks(p);
    for (name, case, role, pref) in [
        ("case1_T00_s.img", "case1", img(Phase::Insp), 0),
        ("case1_T50_s.img", "case1", img(Phase::Exp), 0),
        ("case6_T00.img", "case6", img(Phase::Insp), 2),
        ("case3_T50-ssm.img", "case3", img(Phase::Exp), 1),
        ("Case10_300_T00_xyz.txt", "case10", lm(Phase::Insp), 0),
        ("case10_dirLab300_T50_xyz.txt", "case10", lm(Phase::Exp), 0),
        ("copd1_iBHCT.img", "copd1", img(Phase::Insp), 0),
        ("copd10_eBHCT.img", "copd10", img(Phase::Exp), 0),
        ("copd3_300_iBH_xyz_r1.txt", "copd3", lm(Phase::Insp), 0),
        ("copd3_300_eBH_xyz_r1.txt", "copd3", lm(Phase::Exp), 0),
    ] {
        assert_eq!(
            classify(name),
            Some((case.to_string(), role, pref)),
            "{name}"
        );
    }
    for other in [
        "case1_T10_s.img",
        "case1_T00_s.mhd",
        "case1_T00_mask.mhd",
        "Case1_300_T10_xyz.txt",
        "copd1_iBHCT.nii.gz",
        "case_001_exp.nii.gz",
        "readme.txt",
    ] {
        assert_eq!(classify(other), None, "{other}");
    }
}

#[test]
fn the_benchmark_table_has_the_published_grids() {
    let t = DirLabTable::benchmark();
    assert_eq!(t.entries().len(), 20);
    let e = t.get("case1").unwrap();
    assert_eq!((e.size, e.spacing_mm), ([256, 256, 94], [0.97, 0.97, 2.5]));
    let e = t.get("case7").unwrap();
    assert_eq!((e.size, e.spacing_mm), ([512, 512, 136], [0.97, 0.97, 2.5]));
    let e = t.get("copd10").unwrap();
    assert_eq!(
        (e.size, e.spacing_mm),
        ([512, 512, 135], [0.742, 0.742, 2.5])
    );
    // A table file overrides one entry and adds another.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.csv");
    std::fs::write(
        &path,
        format!(
            "{}\nCase1,6,5,4,1.5,1.5,3\ncopd11,8,8,2,0.5,0.5,2.5\n",
            TABLE_COLUMNS.join(",")
        ),
    )
    .unwrap();
    let t = t.with_overrides(&DirLabTable::read_csv(&path).unwrap());
    assert_eq!(t.get("case1").unwrap().size, [6, 5, 4]);
    assert_eq!(t.get("copd11").unwrap().spacing_mm, [0.5, 0.5, 2.5]);
    assert_eq!(t.entries().len(), 21);
    std::fs::write(&path, "case,x\n").unwrap();
    let msg = DirLabTable::read_csv(&path).unwrap_err().to_string();
    assert!(msg.contains("t.csv") && msg.contains("header"), "{msg}");
    std::fs::write(
        &path,
        format!("{}\ncase1,6,0,4,1,1,1\n", TABLE_COLUMNS.join(",")),
    )
    .unwrap();
    let msg = DirLabTable::read_csv(&path).unwrap_err().to_string();
    assert!(msg.contains("line 2") && msg.contains("zero"), "{msg}");
}

/// The hand-computed example: DIR-Lab line `3\t2\t4` (1-based x y z) is medray's 0-based
/// voxel (2, 1, 3), i.e. byte offset 2 * (2 + 6 * (1 + 5 * 3)) = 196 of a 6x5x4 raw file,
/// and NIfTI voxel (2, 1, 3) of the converted volume; the stored pair row puts the
/// expiration (fixed) point first.
#[test]
fn a_landmark_converts_to_the_voxel_of_the_same_raw_sample() {
    let dir = tempfile::tempdir().unwrap();
    let size = [6, 5, 4];
    let mut lines = vec!["3\t2\t4\r".to_string()];
    lines.extend((1..LANDMARK_COUNT).map(|n| format!(" {}\t {}\t {}\t\r", 1 + n % 6, 1, 1)));
    let lm = dir.path().join("Case1_300_T50_xyz.txt");
    std::fs::write(&lm, lines.join("\n")).unwrap();
    let points = read_landmarks(&lm, size).unwrap();
    assert_eq!(points.len(), 300);
    assert_eq!(points[0], [2.0, 1.0, 3.0]);
    assert_eq!(points[1], [1.0, 0.0, 0.0]);

    let mut raw = vec![0u8; 6 * 5 * 4 * 2];
    raw[196..198].copy_from_slice(&3000i16.to_le_bytes());
    raw[0..2].copy_from_slice(&(-10i16).to_le_bytes());
    let img = dir.path().join("case1_T50_s.img");
    std::fs::write(&img, &raw).unwrap();
    let entry = DirLabEntry {
        case: "case1".into(),
        size,
        spacing_mm: [0.97, 0.97, 2.5],
    };
    let out = dir.path().join("exp.nii.gz");
    convert_volume(&img, &out, &entry, DIRLAB_HU_OFFSET).unwrap();
    let v = crate::nifti_io::read_volume(&out).unwrap();
    assert_eq!(v.shape(), [6, 5, 4]);
    assert_eq!(v.data[[2, 1, 3]], 3000.0 - 1024.0);
    assert_eq!(v.data[[0, 0, 0]], -10.0 - 1024.0);
    assert_eq!(v.data[[1, 0, 0]], -1024.0);
    let hottest = v
        .data
        .indexed_iter()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap();
    assert_eq!(hottest, (2, 1, 3));
    let s = [0.97f32 as f64, 0.97f32 as f64, 2.5];
    assert_eq!(v.spacing, s);
    for (r, row) in v.affine.iter().take(3).enumerate() {
        for (c, value) in row.iter().enumerate() {
            let want = if r == c { -s[r] } else { 0.0 };
            assert!((value - want).abs() < 1e-6, "affine {:?}", v.affine);
        }
    }
}

#[test]
fn landmark_files_need_exactly_300_valid_lines_inside_the_grid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lm.txt");
    let good = |n: usize| -> Vec<String> { (0..n).map(|_| "1\t1\t1".to_string()).collect() };
    let cases: Vec<(Vec<String>, usize, &str)> = vec![
        (good(299), 0, "299 landmarks, expected 300"),
        (good(301), 0, "301 landmarks, expected 300"),
        (
            {
                let mut l = good(300);
                l[6] = "2 abc 3".into();
                l
            },
            7,
            "`abc` is not a number",
        ),
        (
            {
                let mut l = good(300);
                l[9] = "1 2".into();
                l
            },
            10,
            "2 fields, expected 3",
        ),
        (
            {
                let mut l = good(300);
                l[0] = "7 1 1".into();
                l
            },
            1,
            "x = 7 is outside the image",
        ),
        (
            {
                let mut l = good(300);
                l[0] = "1 1 0".into();
                l
            },
            1,
            "z = 0 is outside",
        ),
    ];
    for (lines, line, needle) in cases {
        std::fs::write(&path, lines.join("\n")).unwrap();
        match read_landmarks(&path, [6, 5, 4]).unwrap_err() {
            Error::Keypoints {
                line: got, reason, ..
            } => {
                assert_eq!(got, line, "{reason}");
                assert!(reason.contains(needle), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
}
