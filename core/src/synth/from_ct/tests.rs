//! `synth --from-ct` on a small real crop (`core/tests/data/popi-small/`, see its README).

use std::path::{Path, PathBuf};

use ndarray::{s, Array3, Array4};

use super::*;
use crate::keypoints::read_keypoint_pairs;
use crate::nifti_io::{write_volume_as, StoredType};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/popi-small/popi_small.nii.gz")
}

/// Reads a DDF written by `write_ddf` (5-D float32, `(H, W, D, 1, 3)`, first index fastest).
fn read_ddf(path: &Path) -> Array4<f32> {
    let bytes = std::fs::read(path).unwrap();
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut raw).unwrap();
    let header = nifti::NiftiHeader::from_reader(&raw[..]).unwrap();
    assert_eq!(header.datatype, 16, "float32");
    let [h, w, d] = [1, 2, 3].map(|a| header.dim[a] as usize);
    assert_eq!(header.dim[5], 3);
    let data = &raw[header.vox_offset as usize..];
    let value = |n: usize| f32::from_le_bytes(data[4 * n..4 * n + 4].try_into().unwrap());
    Array4::from_shape_fn((3, h, w, d), |(c, i, j, k)| {
        value(i + h * (j + w * (k + d * c)))
    })
}

/// Trilinear interpolation of component `c` of `ddf` at voxel `p`.
fn sample(ddf: &Array4<f32>, c: usize, p: [f64; 3]) -> f64 {
    let component = ddf.slice(s![c, .., .., ..]).to_owned();
    grid::trilinear(&component, p) as f64
}

#[test]
fn a_real_crop_gives_a_pair_whose_landmarks_follow_the_written_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = FromCtConfig::new(fixture())
        .with_cases(2)
        .with_size([80, 60, 44]);
    let mut seen = Vec::new();
    let summary = generate_from_ct(&config, dir.path(), |done, total, case| {
        seen.push((done, total, case.case_id.clone()))
    })
    .unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(summary.lung_ml.len(), 2, "{summary:?}");
    // POPI's lungs at end-inspiration: a few litres each.
    for ml in &summary.lung_ml {
        assert!((1000.0..4500.0).contains(ml), "{summary:?}");
    }
    assert!(summary.body_ml > summary.lung_ml.iter().sum::<f64>());
    let root = dir.path();
    let moving = read_volume(root.join("scans/case_001_insp.nii.gz")).unwrap();
    assert_eq!(moving.shape(), [80, 60, 44]);
    assert_eq!(moving.header.datatype, 4, "int16");
    // The affine runs toward R, A and S and places the box inside the source scan.
    let source = read_volume(fixture()).unwrap();
    for a in 0..3 {
        assert!(moving.affine[a][a] > 0.0, "{:?}", moving.affine);
        assert!((moving.spacing[a] - summary.synth.spacing_mm[a]).abs() < 1e-4);
    }
    let centre_world = |v: &Volume| {
        let s = v.shape();
        [0, 1, 2].map(|r| {
            v.affine[r][3]
                + (0..3)
                    .map(|c| v.affine[r][c] * (s[c] - 1) as f64 / 2.0)
                    .sum::<f64>()
        })
    };
    let (a, b) = (centre_world(&moving), centre_world(&source));
    assert!((0..2).all(|r| (a[r] - b[r]).abs() < 60.0), "{a:?} vs {b:?}");
    for case in &summary.synth.cases {
        let id = &case.case_id;
        let fixed = read_volume(root.join(format!("scans/{id}_exp.nii.gz"))).unwrap();
        assert_eq!(fixed.affine, moving.affine);
        let pairs = read_keypoint_pairs(root.join(format!("keypoints/{id}.csv"))).unwrap();
        assert!(pairs.len() >= 20, "{id}: {} landmarks", pairs.len());
        let ddf = read_ddf(&root.join(format!("groundtruth/{id}_ddf.nii.gz")));
        let mut worst = 0.0f64;
        for (f, m) in pairs.fixed.iter().zip(&pairs.moving) {
            for c in 0..3 {
                worst = worst.max((f[c] + sample(&ddf, c, *f) - m[c]).abs());
            }
        }
        assert!(
            worst < 0.1,
            "{id}: warped fixed landmarks miss by {worst} voxels"
        );
        // The drawn DIR-Lab motion, mostly cranio-caudal; lungs overlap less in expiration.
        let m = &case.motion;
        assert!((5.5..16.0).contains(&m.mean_mm), "{case:?}");
        assert!(
            m.cranio_caudal_fraction > 0.7 && m.p95_mm > m.mean_mm,
            "{case:?}"
        );
        assert!((0.6..0.99).contains(&case.lung_dice), "{case:?}");
        assert!(case.lung_volume_ratio < 1.0, "{case:?}");
        // Expiration parenchyma is denser than inspiration parenchyma.
        let mask = read_volume(root.join(format!("lungMasks/{id}_exp.nii.gz"))).unwrap();
        let mean_in = |v: &Volume, m: &Array3<f32>| {
            let (sum, n) = v
                .data
                .iter()
                .zip(m)
                .filter(|(_, &l)| l > 0.5)
                .fold((0.0, 0), |a, (x, _)| (a.0 + *x as f64, a.1 + 1));
            sum / n as f64
        };
        let insp_mask = read_volume(root.join(format!("lungMasks/{id}_insp.nii.gz"))).unwrap();
        assert!(mean_in(&fixed, &mask.data) > mean_in(&moving, &insp_mask.data) + 10.0);
    }
    assert_ne!(summary.synth.cases[0].motion, summary.synth.cases[1].motion);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("synth.json")).unwrap()).unwrap();
    assert_eq!(json["cases"][1]["case_id"], "case_002");
    assert!(json["lung_ml"][0].as_f64().unwrap() > 0.0);
}

#[test]
fn bad_inputs_name_the_file_or_option() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let message = |config: &FromCtConfig| {
        generate_from_ct(config, &out, |_, _, _| {})
            .unwrap_err()
            .to_string()
    };
    let missing = dir.path().join("missing.nii.gz");
    let err = message(&FromCtConfig::new(&missing));
    assert!(err.contains("missing.nii.gz"), "{err}");

    let affine = [
        [4.0, 0.0, 0.0, 0.0],
        [0.0, 4.0, 0.0, 0.0],
        [0.0, 0.0, 4.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    let small = dir.path().join("small.nii.gz");
    write_volume_as(
        &small,
        &Array3::from_elem((20, 20, 8), -800.0),
        &affine,
        StoredType::Int16,
    )
    .unwrap();
    let err = message(&FromCtConfig::new(&small));
    assert!(
        err.contains("small.nii.gz") && err.contains("too small"),
        "{err}"
    );

    // A body of soft tissue without lungs.
    let solid = dir.path().join("solid.nii.gz");
    let body = Array3::from_shape_fn((40, 40, 40), |(i, j, _)| {
        if (4..36).contains(&i) && (4..36).contains(&j) {
            40.0
        } else {
            -1000.0
        }
    });
    write_volume_as(&solid, &body, &affine, StoredType::Int16).unwrap();
    let err = message(&FromCtConfig::new(&solid));
    assert!(
        err.contains("solid.nii.gz") && err.contains("no lungs"),
        "{err}"
    );

    let mask = dir.path().join("mask.nii.gz");
    write_volume_as(
        &mask,
        &Array3::from_elem((40, 40, 39), 1.0),
        &affine,
        StoredType::Uint8,
    )
    .unwrap();
    let err = message(&FromCtConfig::new(&solid).with_lung_mask(&mask));
    assert!(
        err.contains("--ct-lung-mask") && err.contains("mask.nii.gz") && err.contains("shape"),
        "{err}"
    );

    let err = message(&FromCtConfig::new(fixture()).with_cases(0));
    assert!(err.contains("--cases"), "{err}");
}

/// Makes `core/tests/data/popi-small/popi_small.nii.gz` from the POPI CT (by hand:
/// `MEDRAY_POPI_CT=/path/popi_phase00_ct.nii.gz cargo test -p medray-core --lib
/// make_popi_small -- --ignored`): blocks of 6 x 6 x 3 voxels averaged (5.9 x 5.9 x 6 mm),
/// cropped to the body in-plane and from 54 mm below the lungs to 30 mm above them, int16.
#[test]
#[ignore = "reads the POPI CT outside the repository; run by hand to remake the fixture"]
fn make_popi_small() {
    let Ok(source) = std::env::var("MEDRAY_POPI_CT") else {
        panic!("set MEDRAY_POPI_CT to the POPI phase-00 CT (NIfTI) to remake the fixture");
    };
    let scan = read_volume(&source).unwrap();
    let factor = [6, 6, 3];
    let coarse = block_mean(&scan.data, factor);
    let body = segment::body_mask(&coarse);
    let (mut lo, mut hi) = bounding_box(&body).unwrap();
    let spacing = [0, 1, 2].map(|a| scan.spacing[a] * factor[a] as f64);
    let (lungs, _) = segment::split_lungs(&segment::air_in_body(&coarse, &body), spacing);
    let (lung_lo, lung_hi) = bounding_box(&lungs.mapv(|l| l > 0)).unwrap();
    (lo[2], hi[2]) = (lung_lo[2].saturating_sub(8), lung_hi[2] + 4);
    let shape = coarse.dim();
    let lo = [0, 1, 2].map(|a| lo[a].saturating_sub(1));
    let hi = [0, 1, 2].map(|a| (hi[a] + 1).min([shape.0, shape.1, shape.2][a] - 1));
    let crop = coarse
        .slice(s![lo[0]..=hi[0], lo[1]..=hi[1], lo[2]..=hi[2]])
        .to_owned();
    // Coarse voxel c is the mean of source voxels c*f .. c*f + f - 1: centre c*f + (f-1)/2.
    let mut affine = scan.affine;
    for (row, source) in affine.iter_mut().zip(&scan.affine).take(3) {
        let centre = |a: usize| (lo[a] * factor[a]) as f64 + (factor[a] - 1) as f64 / 2.0;
        row[3] = source[3] + (0..3).map(|a| source[a] * centre(a)).sum::<f64>();
        for a in 0..3 {
            row[a] = source[a] * factor[a] as f64;
        }
    }
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/popi-small/popi_small.nii.gz");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    write_volume_as(&out, &crop, &affine, StoredType::Int16).unwrap();
    println!(
        "{} -> {:?} voxels, {} bytes",
        out.display(),
        crop.dim(),
        std::fs::metadata(&out).unwrap().len()
    );
}
