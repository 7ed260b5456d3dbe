//! Tests of the phantom generator: volumes on small grids (32^3 to 64^3), landmarks and the
//! breathing model at full size without volumes.

use candle_core::{Device, Tensor};

use super::breathing::Thorax;
use super::*;
use crate::keypoints::read_keypoint_pairs;
use crate::nifti_io::read_volume;
use crate::ops;

fn small(size: usize) -> SynthConfig {
    SynthConfig::default()
        .with_cases(2)
        .with_size([size, size, size + 4])
        .with_seed(11)
}

/// Trilinear interpolation of component `c` of a `[3, H, W, D]` field at a continuous point.
fn sample(ddf: &Array4<f32>, c: usize, p: [f64; 3]) -> f64 {
    let (_, h, w, d) = ddf.dim();
    let dims = [h, w, d];
    let base = [0, 1, 2].map(|a| (p[a].floor() as usize).min(dims[a] - 2));
    let t = [0, 1, 2].map(|a| p[a] - base[a] as f64);
    let mut v = 0.0;
    for corner in 0..8 {
        let o = [corner & 1, (corner >> 1) & 1, (corner >> 2) & 1];
        let weight: f64 = (0..3)
            .map(|a| if o[a] == 1 { t[a] } else { 1.0 - t[a] })
            .product();
        v += weight * ddf[[c, base[0] + o[0], base[1] + o[1], base[2] + o[2]]] as f64;
    }
    v
}

#[test]
fn cases_are_deterministic_and_differ() {
    let config = small(32);
    let a = generate_case(&config, 0).unwrap();
    let b = generate_case(&config, 0).unwrap();
    assert_eq!(a.fixed, b.fixed);
    assert_eq!(a.moving, b.moving);
    assert_eq!(a.ddf, b.ddf);
    assert_eq!(a.keypoints, b.keypoints);
    let other_case = generate_case(&config, 1).unwrap();
    assert_ne!(a.moving_mask, other_case.moving_mask);
    assert_ne!(a.ddf, other_case.ddf);
    let other_seed = generate_case(&config.clone().with_seed(12), 0).unwrap();
    assert_ne!(a.moving, other_seed.moving);
}

#[test]
fn writes_the_learn2reg_layout_and_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let config = small(32);
    let mut calls = Vec::new();
    let summary = generate(&config, dir.path(), |done, total| calls.push((done, total))).unwrap();
    assert_eq!(calls, vec![(1, 2), (2, 2)]);
    assert_eq!(summary.cases.len(), 2);
    let root = dir.path();
    for case in ["case_001", "case_002"] {
        for phase in ["exp", "insp"] {
            let scan = read_volume(root.join(format!("scans/{case}_{phase}.nii.gz"))).unwrap();
            assert_eq!(scan.shape(), [32, 32, 36]);
            // The fixed field of view: 336 x 240 x 364 mm over the grid.
            let expected = [10.5, 7.5, 364.0 / 36.0];
            assert!((0..3).all(|a| (scan.spacing[a] - expected[a]).abs() < 1e-5));
            assert_eq!(scan.header.datatype, 4, "scans are int16");
            let mask = read_volume(root.join(format!("lungMasks/{case}_{phase}.nii.gz"))).unwrap();
            assert_eq!(mask.header.datatype, 2, "masks are uint8");
            assert!(mask.data.iter().all(|&v| v == 0.0 || v == 1.0));
            assert!(mask.data.iter().any(|&v| v == 1.0));
        }
        let pairs = read_keypoint_pairs(root.join(format!("keypoints/{case}.csv"))).unwrap();
        assert!(pairs.len() >= 300, "{case}: only {} landmarks", pairs.len());
        let ddf_bytes = std::fs::read(root.join(format!("groundtruth/{case}_ddf.nii.gz"))).unwrap();
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&ddf_bytes[..]), &mut raw)
            .unwrap();
        let header = nifti::NiftiHeader::from_reader(&raw[..]).unwrap();
        assert_eq!(header.dim, [5, 32, 32, 36, 1, 3, 1, 1]);
    }
    assert_eq!(summary.cases[0].case_id, "case_001");
    for case in &summary.cases {
        // Inspiration lungs are larger than expiration lungs, and overlap well.
        assert!(case.lung_voxels[1] > case.lung_voxels[0], "{case:?}");
        assert!((0.8..1.0).contains(&case.lung_dice), "{case:?}");
        assert!((5.5..16.0).contains(&case.motion.mean_mm), "{case:?}");
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("synth.json")).unwrap()).unwrap();
    assert_eq!(json["motion"], "dirlab");
    let first = &json["cases"][0];
    assert_eq!(first["keypoints"], summary.cases[0].keypoints);
    for (key, value) in [
        ("mean_mm", summary.cases[0].motion.mean_mm),
        ("p95_mm", summary.cases[0].motion.p95_mm),
        ("max_mm", summary.cases[0].motion.max_mm),
    ] {
        assert!((first["motion"][key].as_f64().unwrap() - value).abs() < 1e-9);
    }
    assert!((first["lung_dice"].as_f64().unwrap() - summary.cases[0].lung_dice).abs() < 1e-9);
}

/// DIR-Lab's published cases: mean landmark displacement 3.9-15 mm, 95th percentile
/// 10-28 mm, maximum up to 31 mm, ~90% cranio-caudal; at least 300 landmarks per case.
#[test]
fn landmark_motion_matches_the_presets_at_full_size() {
    for (motion, mean_range) in [
        (Motion::Dirlab, 5.5..16.0),
        (Motion::Copd, 14.0..32.0),
        (Motion::Small, 0.8..3.0),
    ] {
        let config = SynthConfig::default().with_motion(motion).with_seed(3);
        for index in 0..3 {
            let case = case_landmarks(&config, index).unwrap();
            let m = case.motion;
            assert!(m.landmarks >= 300, "{motion}: {m:?}");
            assert!(mean_range.contains(&m.mean_mm), "{motion}: {m:?}");
            assert!(
                m.p95_mm > 1.5 * m.mean_mm && m.max_mm < 5.0 * m.mean_mm,
                "{m:?}"
            );
            assert!(m.cranio_caudal_fraction > 0.75, "{motion}: {m:?}");
            if motion == Motion::Dirlab {
                assert!((8.0..40.0).contains(&m.p95_mm), "{m:?}");
                assert!(m.max_mm < 45.0, "{m:?}");
            }
        }
    }
}

/// The lungs slide along the chest wall: across the lateral pleura the displacement jumps
/// tangentially (cranio-caudally) with no normal jump, and the ribs stay still.
#[test]
fn lungs_slide_along_a_still_chest_wall() {
    let config = SynthConfig::default().with_seed(5);
    let model = CaseModel::new(&config, 0);
    let chest = model.breathing.thorax();
    for lung in 0..2 {
        let (c, h) = chest.footprint_frame(lung);
        let side = if c[0] > EXTENT_MM[0] / 2.0 { 1.0 } else { -1.0 };
        let z = 0.5 * (chest.top(lung, c[0], c[1]) + chest.base(lung, c[0], c[1])) - 30.0;
        let at = |offset_mm: f64| [c[0] + side * (h[0] + offset_mm), c[1], z];
        let (inner, outer) = (at(-0.3), at(0.3));
        assert!(model.breathing.expiration_lung(inner).is_some());
        assert!(model.breathing.expiration_lung(outer).is_none());
        let (u_in, u_out) = (
            model.breathing.displacement(inner),
            model.breathing.displacement(outer),
        );
        let normal_jump = (u_in[0] - u_out[0]).abs();
        let tangential_jump = (u_in[2] - u_out[2]).abs();
        assert!(tangential_jump > 3.0, "{u_in:?} vs {u_out:?}");
        assert!(normal_jump < 0.1 * tangential_jump, "{u_in:?} vs {u_out:?}");
        // Ribs (and everything beyond the chest wall) do not move.
        let rib = [c[0] + side * (h[0] + 25.0), c[1], z - 80.0];
        let u_rib = model.breathing.displacement(rib);
        assert!(vec3::norm(u_rib) < 0.5, "rib moves {u_rib:?}");
    }
}

/// Every region's map is fold-free, lungs expand from expiration to inspiration, and the
/// expiration parenchyma is denser where it is compressed more.
#[test]
fn maps_are_fold_free_and_density_follows_volume() {
    let config = SynthConfig::default()
        .with_motion(Motion::Copd)
        .with_seed(2);
    let model = CaseModel::new(&config, 1);
    let b = &model.breathing;
    let (mut lung_points, mut expanding, mut min_det) = (0, 0, f64::INFINITY);
    let mut max_lung_det = 0.0f64;
    for i in 0..24 {
        for j in 0..24 {
            for k in 0..26 {
                let p = [i, j, k].map(|v| v as f64 + 0.37);
                let p = [p[0] * 14.0, p[1] * 10.0, p[2] * 14.0];
                let region = b.expiration_lung(p);
                let det = b.volume_change(region, p);
                min_det = min_det.min(det);
                if region.is_some() {
                    lung_points += 1;
                    expanding += (det > 1.0) as usize;
                    max_lung_det = max_lung_det.max(det);
                }
            }
        }
    }
    assert!(lung_points > 500);
    assert!(min_det > 0.3, "folding: det {min_det}");
    // The in-plane slide compresses a little on one side; the lungs mostly expand.
    assert!(
        expanding as f64 > 0.8 * lung_points as f64,
        "{expanding} of {lung_points} lung points expand"
    );
    assert!(max_lung_det > 1.1, "lungs barely expand: {max_lung_det}");
    // The mass-preserving density: denser in expiration, more where compressed more.
    let insp = config.lung_hu_insp as f64;
    assert_eq!(breathing::expiration_hu(insp, 1.0), insp);
    assert!(breathing::expiration_hu(insp, 1.2) > breathing::expiration_hu(insp, 1.1));
    // In the images: with density on, the expiration lungs are denser than without.
    let mut config = small(32);
    config.noise_hu = 0.0;
    let with = generate_case(&config, 0).unwrap();
    config.density_follows_volume = false;
    let without = generate_case(&config, 0).unwrap();
    let (mut sum, mut n) = (0.0, 0);
    for ((a, b), m) in with.fixed.iter().zip(&without.fixed).zip(&with.fixed_mask) {
        if *m > 0.5 {
            sum += (a - b) as f64;
            n += 1;
        }
    }
    assert!(
        sum / n as f64 > 5.0,
        "mean densification {}",
        sum / n as f64
    );
    assert_eq!(with.moving, without.moving);
}

/// The same patient at any grid size: identical extent, and the same physical points have
/// the same tissue and landmarks.
#[test]
fn the_body_is_the_same_at_every_grid_size() {
    let mut coarse = SynthConfig::default().with_cases(1).with_size([32, 32, 32]);
    coarse.noise_hu = 0.0;
    let fine = coarse.clone().with_size([64, 64, 64]);
    for (a, extent_mm) in EXTENT_MM.iter().enumerate() {
        let extent = |c: &SynthConfig| c.spacing()[a] * c.size[a] as f64;
        assert!((extent(&coarse) - extent_mm).abs() < 1e-9);
        assert!((extent(&fine) - extent_mm).abs() < 1e-9);
    }
    let (c, f) = (
        generate_case(&coarse, 0).unwrap(),
        generate_case(&fine, 0).unwrap(),
    );
    let (mut same_mask, mut same_tissue, mut total) = (0, 0, 0);
    for ((i, j, k), v) in c.moving.indexed_iter() {
        let shared = [2 * i, 2 * j, 2 * k];
        total += 1;
        same_mask += (c.moving_mask[[i, j, k]] == f.moving_mask[shared]
            && c.fixed_mask[[i, j, k]] == f.fixed_mask[shared]) as usize;
        // Air or lung (below -500 HU) versus soft tissue or bone: only partial-volume
        // voxels at edges differ (the blur follows the voxel size).
        same_tissue += ((*v < -500.0) == (f.moving[shared] < -500.0)) as usize;
    }
    assert!(
        same_mask as f64 > 0.99 * total as f64,
        "{same_mask}/{total}"
    );
    assert!(
        same_tissue as f64 > 0.95 * total as f64,
        "{same_tissue}/{total}"
    );
    // Landmarks are the same physical points.
    let mm = |p: &[f64; 3], cfg: &SynthConfig| [0, 1, 2].map(|a| p[a] * cfg.spacing()[a]);
    assert_eq!(c.keypoints.len(), f.keypoints.len());
    for (a, b) in c.keypoints.moving.iter().zip(&f.keypoints.moving) {
        let (a, b) = (mm(a, &coarse), mm(b, &fine));
        assert!((0..3).all(|i| (a[i] - b[i]).abs() < 1e-9));
    }
    assert!((c.motion.mean_mm - f.motion.mean_mm).abs() < 1e-9);
}

/// The true DDF registers the pair: with equal parenchyma density and no noise, warping the
/// moving image with `u` leaves only the trilinear interpolation error of a 48^3 grid.
#[test]
fn true_ddf_registers_moving_onto_fixed() {
    let mut config = small(48);
    config.noise_hu = 0.0;
    config.density_follows_volume = false;
    let case = generate_case(&config, 0).unwrap();
    let dev = Device::Cpu;
    let moving = crate::nifti_io::array3_to_tensor(&case.moving, &dev).unwrap();
    let (h, w, d) = case.fixed.dim();
    let ddf = Tensor::from_slice(case.ddf.as_slice().unwrap(), (1, 3, h, w, d), &dev).unwrap();
    let error = |factor: f64| {
        let scaled = (&ddf * factor).unwrap();
        let warped = ops::warp(&moving, &scaled, ops::Padding::Border).unwrap();
        let warped = crate::nifti_io::tensor_to_array3(&warped).unwrap();
        let diff: f64 = warped
            .iter()
            .zip(case.fixed.iter())
            .map(|(a, b)| (a - b).abs() as f64)
            .sum();
        diff / warped.len() as f64
    };
    let (none, half, exact, more) = (error(0.0), error(0.5), error(1.0), error(1.5));
    assert!(exact < 0.5 * none, "{exact} vs {none}");
    assert!(exact < half && exact < more, "{half} {exact} {more}");
    // The masks agree too: Dice of the warped moving mask.
    let mmask = crate::nifti_io::array3_to_tensor(&case.moving_mask, &dev).unwrap();
    let wmask = ops::warp_nearest(&mmask, &ddf).unwrap();
    let wmask = crate::nifti_io::tensor_to_array3(&wmask).unwrap();
    let dice_before = stats::dice(&case.moving_mask, &case.fixed_mask);
    let dice_after = stats::dice(&wmask, &case.fixed_mask);
    assert!(
        dice_after > 0.97 && dice_after > dice_before + 0.01,
        "{dice_before} -> {dice_after}"
    );
}

#[test]
fn keypoints_follow_the_true_ddf() {
    let config = small(48);
    let case = generate_case(&config, 1).unwrap();
    let (mut checked, mut in_masks) = (0, 0);
    for (f, m) in case.keypoints.fixed.iter().zip(&case.keypoints.moving) {
        let at = |p: &[f64; 3]| p.map(|v| v.round() as usize);
        let [i, j, k] = at(f);
        let [a, b, c] = at(m);
        in_masks +=
            (case.fixed_mask[[i, j, k]] == 1.0 && case.moving_mask[[a, b, c]] == 1.0) as usize;
        // m = f + u(f), with u read from the written grid (trilinear), where the 8
        // neighbours are all in the lung (the DDF jumps across the pleura).
        let base = f.map(|v| v.floor() as usize);
        let all_lung = (0..8).all(|corner| {
            let o = [corner & 1, (corner >> 1) & 1, (corner >> 2) & 1];
            case.fixed_mask[[base[0] + o[0], base[1] + o[1], base[2] + o[2]]] == 1.0
        });
        if all_lung {
            checked += 1;
            for c in 0..3 {
                let predicted = f[c] + sample(&case.ddf, c, *f);
                assert!(
                    (predicted - m[c]).abs() < 0.05,
                    "axis {c}: f {f:?} + u = {predicted}, m {m:?}"
                );
            }
        }
    }
    let n = case.keypoints.len();
    assert!(checked * 2 > n, "{checked} of {n} checked");
    assert!(in_masks * 10 > 9 * n, "{in_masks} of {n} in the lung masks");
    assert!(case.motion.mean_mm > 1.0, "landmarks must move");
}

#[test]
fn motion_names_parse_and_bad_ones_name_the_option() {
    for m in Motion::ALL {
        assert_eq!(m.name().parse::<Motion>().unwrap(), m);
    }
    let err = "fast".parse::<Motion>().unwrap_err().to_string();
    assert!(err.contains("--motion") && err.contains("dirlab"), "{err}");
}

/// Not a test of correctness: prints the time of one full-size case
/// (`cargo test -p medray-core --lib synth -- --ignored --nocapture`).
#[test]
#[ignore = "timing probe: one full-size 192x192x208 case; run with --ignored --nocapture"]
fn full_size_case_timing() {
    let dir = tempfile::tempdir().unwrap();
    let config = SynthConfig::default().with_cases(1);
    let start = std::time::Instant::now();
    let case = generate_case(&config, 0).unwrap();
    let generated = start.elapsed();
    generate(&config, dir.path(), |_, _| {}).unwrap();
    println!(
        "192x192x208: generate_case {generated:?}, generate+write {:?}, {} landmarks, {:?}",
        start.elapsed() - generated,
        case.keypoints.len(),
        case.motion
    );
}
