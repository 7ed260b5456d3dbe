//! Tests of the phantom generator on small grids (32^3 to 48^3).

use candle_core::{Device, Tensor};

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

/// Mean of `|a - b|` over the voxels where `mask` is 1.
fn masked_mean_abs_diff(a: &Array3<f32>, b: &Array3<f32>, mask: &Array3<f32>) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for ((x, y), m) in a.iter().zip(b.iter()).zip(mask.iter()) {
        if *m > 0.5 {
            sum += (x - y).abs() as f64;
            n += 1;
        }
    }
    assert!(n > 0, "empty mask");
    sum / n as f64
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
fn writes_the_learn2reg_layout() {
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
            assert_eq!(scan.spacing, [1.75, 1.25, 1.75]);
            assert_eq!(scan.header.datatype, 4, "scans are int16");
            let mask = read_volume(root.join(format!("lungMasks/{case}_{phase}.nii.gz"))).unwrap();
            assert_eq!(mask.header.datatype, 2, "masks are uint8");
            assert!(mask.data.iter().all(|&v| v == 0.0 || v == 1.0));
            assert!(mask.data.iter().any(|&v| v == 1.0));
        }
        let pairs = read_keypoint_pairs(root.join(format!("keypoints/{case}.csv"))).unwrap();
        assert!(pairs.len() >= 5, "{case}: only {} landmarks", pairs.len());
        let ddf_bytes = std::fs::read(root.join(format!("groundtruth/{case}_ddf.nii.gz"))).unwrap();
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&ddf_bytes[..]), &mut raw)
            .unwrap();
        let header = nifti::NiftiHeader::from_reader(&raw[..]).unwrap();
        assert_eq!(header.dim, [5, 32, 32, 36, 1, 3, 1, 1]);
    }
    assert_eq!(summary.cases[0].case_id, "case_001");
    // Inspiration lungs are larger than expiration lungs.
    for case in &summary.cases {
        assert!(case.lung_voxels[1] > case.lung_voxels[0], "{case:?}");
    }
}

#[test]
fn intensities_and_motion_are_plausible() {
    let config = small(48);
    let case = generate_case(&config, 0).unwrap();
    let mean_in = |img: &Array3<f32>, mask: &Array3<f32>| {
        let (s, n) = img
            .iter()
            .zip(mask.iter())
            .filter(|(_, m)| **m > 0.5)
            .fold((0.0f64, 0usize), |(s, n), (v, _)| (s + *v as f64, n + 1));
        s / n as f64
    };
    // Parenchyma -850 / -750 HU plus a few percent of vessels at +50 HU.
    let insp = mean_in(&case.moving, &case.moving_mask);
    let exp = mean_in(&case.fixed, &case.fixed_mask);
    assert!(
        (-860.0..-700.0).contains(&insp),
        "inspiration lung mean {insp}"
    );
    assert!(
        (-760.0..-600.0).contains(&exp),
        "expiration lung mean {exp}"
    );
    assert!(exp > insp + 50.0);
    // The corner of the grid is air.
    assert!((case.moving[[0, 0, 0]] + 1000.0).abs() < 6.0 * config.noise_hu);
    // Bone exists (ribs, spine).
    assert!(case.moving.iter().any(|&v| v > 500.0));
    // Breathing motion scaled to the grid (16 voxels at 208 -> ~3.7 at 48, times 0.7..1.3).
    let max = max_magnitude(&case.ddf);
    assert!((1.5..8.0).contains(&max), "max displacement {max}");
    // The body wall and the air outside do not move.
    for c in 0..3 {
        assert_eq!(case.ddf[[c, 0, 24, 24]], 0.0);
    }
}

/// The true DDF registers the pair: with equal parenchyma density and no noise, warping the
/// moving image with `u` leaves only the trilinear interpolation error of a 48^3 grid.
/// (Checked while writing: `fixed` equals the anatomy at `p + u(p)` to 1e-5 HU, and ops::warp
/// equals a local trilinear sampler; the remaining error is interpolation of sharp edges.)
#[test]
fn true_ddf_registers_moving_onto_fixed() {
    let mut config = small(48);
    config.noise_hu = 0.0;
    config.lung_hu_exp = config.lung_hu_insp;
    config.amplitude_scale = 1.3;
    let case = generate_case(&config, 0).unwrap();
    let dev = Device::Cpu;
    let moving = crate::nifti_io::array3_to_tensor(&case.moving, &dev).unwrap();
    let (h, w, d) = case.fixed.dim();
    let ddf = Tensor::from_slice(case.ddf.as_slice().unwrap(), (1, 3, h, w, d), &dev).unwrap();
    let error = |factor: f64, mask: &Array3<f32>| {
        let scaled = (&ddf * factor).unwrap();
        let warped = ops::warp(&moving, &scaled, ops::Padding::Border).unwrap();
        let warped = crate::nifti_io::tensor_to_array3(&warped).unwrap();
        masked_mean_abs_diff(&warped, &case.fixed, mask)
    };
    let lungs = &case.fixed_mask;
    let (before, after) = (error(0.0, lungs), error(1.0, lungs));
    assert!(
        after < 0.5 * before,
        "lungs: mean |warp(moving) - fixed| {after:.1} HU vs |moving - fixed| {before:.1} HU"
    );
    // Over the whole volume u beats no motion by far, and beats a too weak or too strong u.
    let all = Array3::from_elem(case.fixed.dim(), 1.0f32);
    let at = |f: f64| error(f, &all);
    let (none, half, exact, more) = (at(0.0), at(0.5), at(1.0), at(1.5));
    assert!(exact < 0.4 * none, "{exact} vs {none}");
    assert!(exact < half && exact < more, "{half} {exact} {more}");
    // The masks agree too: Dice of the warped moving mask.
    let mmask = crate::nifti_io::array3_to_tensor(&case.moving_mask, &dev).unwrap();
    let wmask = ops::warp_nearest(&mmask, &ddf).unwrap();
    let wmask = crate::nifti_io::tensor_to_array3(&wmask).unwrap();
    let dice = |a: &Array3<f32>, b: &Array3<f32>| {
        let inter: f32 = a.iter().zip(b.iter()).map(|(x, y)| x * y).sum();
        2.0 * inter / (a.sum() + b.sum())
    };
    let dice_before = dice(&case.moving_mask, &case.fixed_mask);
    let dice_after = dice(&wmask, &case.fixed_mask);
    assert!(
        dice_after > 0.96 && dice_after > dice_before + 0.01,
        "{dice_before} -> {dice_after}"
    );
}

#[test]
fn keypoints_follow_the_true_ddf() {
    let config = small(48);
    let case = generate_case(&config, 1).unwrap();
    assert!(case.keypoints.len() >= 5);
    let mut moved = 0;
    for (f, m) in case.keypoints.fixed.iter().zip(&case.keypoints.moving) {
        // m = f + u(f), with u read from the written grid (trilinear).
        for c in 0..3 {
            let predicted = f[c] + sample(&case.ddf, c, *f);
            assert!(
                (predicted - m[c]).abs() < 0.02,
                "axis {c}: f {f:?} + u = {predicted}, m {m:?}"
            );
        }
        // Landmarks are vessel branch points inside the lungs, in both phases.
        let at = |p: &[f64; 3]| p.map(|v| v.round() as usize);
        let [i, j, k] = at(f);
        assert_eq!(
            case.fixed_mask[[i, j, k]],
            1.0,
            "fixed landmark {f:?} outside the lung"
        );
        let [i, j, k] = at(m);
        assert_eq!(
            case.moving_mask[[i, j, k]],
            1.0,
            "moving landmark {m:?} outside the lung"
        );
        if (0..3).map(|c| (f[c] - m[c]).powi(2)).sum::<f64>() > 0.01 {
            moved += 1;
        }
    }
    assert!(moved > 0, "landmarks must move");
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
        "192x192x208: generate_case {generated:?}, generate+write {:?}, {} landmarks",
        start.elapsed() - generated,
        case.keypoints.len()
    );
}
