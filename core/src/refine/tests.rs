//! Tests of the instance optimisation: the network-grid refinement against the model's
//! loss, and the pyramid on a textured volume with a known, large, smooth displacement.
#![allow(clippy::unwrap_used)]

use super::*;
use crate::metrics::{mean_std, target_registration_error, tre_before};
use crate::registration::LossPreset;
use candle_core::{DType, Device};
use rand::{Rng, SeedableRng};

fn blob(shift: f64) -> Tensor {
    // A smooth bump, shifted along the first axis.
    let n = 16usize;
    let mut v = Vec::with_capacity(n * n * n);
    for i in 0..n {
        for j in 0..n {
            for k in 0..n {
                let d = (i as f64 - 7.5 - shift).powi(2)
                    + (j as f64 - 7.5).powi(2)
                    + (k as f64 - 7.5).powi(2);
                v.push((-d / 18.0).exp() as f32);
            }
        }
    }
    Tensor::from_vec(v, (1, 1, n, n, n), &Device::Cpu).unwrap()
}

#[test]
fn refinement_lowers_the_objective_and_zero_steps_change_nothing() {
    let batch = PairBatch {
        fixed: blob(0.0),
        moving: blob(1.5),
        fixed_mask: None,
        moving_mask: None,
        keypoints: None,
    };
    let ddf = Tensor::zeros((1, 3, 16, 16, 16), DType::F32, &Device::Cpu).unwrap();
    let loss = RegistrationLoss::new(LossPreset::MiBe);
    let (same, r0) = refine_ddf(&ddf, &batch, &loss, 0).unwrap();
    assert_eq!(r0.loss_before, r0.loss_after);
    let diff: f32 = (same - &ddf)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(diff, 0.0);
    let (refined, r) = refine_ddf(&ddf, &batch, &loss, 10).unwrap();
    assert!(r.loss_after < r.loss_before, "{r:?}");
    let moved: f32 = (refined - &ddf)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(moved > 0.0);
    assert!(refine_ddf(&ddf, &batch, &loss, MAX_REFINE_STEPS + 1).is_err());
    // The masked objective refuses a pair without masks.
    let dice = RegistrationLoss::new(LossPreset::MseDiceBe);
    assert!(refine_ddf(&ddf, &batch, &dice, 1).is_err());
}

const N: usize = 40;
const SPACING: [f64; 3] = [1.5, 1.0, 2.0];

/// Smooth random texture on an N³ grid, values in about [0, 1].
fn texture() -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let v: Vec<f32> = (0..N * N * N).map(|_| rng.gen::<f32>()).collect();
    let mut t = Tensor::from_vec(v, (1, 1, N, N, N), &Device::Cpu).unwrap();
    // A few binomial blurs: structures of a few voxels, as lung vessels at this size.
    for _ in 0..3 {
        for dim in 2..5 {
            let p = t.pad_with_same(dim, 1, 1).unwrap();
            t = ((p.narrow(dim, 0, N).unwrap() + p.narrow(dim, 2, N).unwrap()).unwrap() * 0.25)
                .unwrap()
                .add(&(p.narrow(dim, 1, N).unwrap() * 0.5).unwrap())
                .unwrap();
        }
    }
    let lo = t.min_all().unwrap().to_scalar::<f32>().unwrap();
    let hi = t.max_all().unwrap().to_scalar::<f32>().unwrap();
    ((t - f64::from(lo)).unwrap() / f64::from(hi - lo)).unwrap()
}

/// A smooth displacement of up to about 4 voxels (6-8 mm), mostly along axis 2 as a
/// diaphragm would move, in voxels.
fn known_ddf() -> Tensor {
    let mut v = Vec::with_capacity(3 * N * N * N);
    let s = |x: usize| x as f64 / (N - 1) as f64;
    for c in 0..3 {
        for i in 0..N {
            for j in 0..N {
                for k in 0..N {
                    let (x, y, z) = (s(i), s(j), s(k));
                    let bump = (std::f64::consts::PI * x).sin() * (std::f64::consts::PI * y).sin();
                    let u = match c {
                        0 => 1.5 * (2.0 * z - 1.0) * bump,
                        1 => 1.0 * (3.0 * x).sin() * (std::f64::consts::PI * z).sin(),
                        _ => 4.0 * bump * (std::f64::consts::PI * z).sin(),
                    };
                    v.push(u as f32);
                }
            }
        }
    }
    Tensor::from_vec(v, (1, 3, N, N, N), &Device::Cpu).unwrap()
}

/// Mean TRE (mm) of `ddf` over interior keypoints of the known displacement.
fn tre(ddf: &Tensor, truth: &Tensor) -> (f64, f64) {
    let truth_values = crate::nifti_io::tensor_to_ddf_array(truth).unwrap();
    let (mut fixed, mut moving) = (Vec::new(), Vec::new());
    for i in (6..N - 6).step_by(4) {
        for j in (6..N - 6).step_by(4) {
            for k in (6..N - 6).step_by(4) {
                let p = [i as f64, j as f64, k as f64];
                fixed.push(p);
                moving.push(std::array::from_fn(|c| {
                    p[c] + f64::from(truth_values[[c, i, j, k]])
                }));
            }
        }
    }
    let after = target_registration_error(ddf, &fixed, &moving, SPACING).unwrap();
    let before = tre_before(&fixed, &moving, SPACING).unwrap();
    (mean_std(&after).0, mean_std(&before).0)
}

#[test]
fn pyramid_from_identity_recovers_a_large_known_motion() {
    let moving = texture();
    let truth = known_ddf();
    // fixed(x) = moving(x + u(x)): u is the DDF that registers moving onto fixed.
    let fixed = crate::ops::warp(&moving, &truth, crate::ops::Padding::Border).unwrap();
    let zero = Tensor::zeros((1, 3, 16, 16, 16), DType::F32, &Device::Cpu).unwrap();
    let input = PyramidInput {
        fixed: &fixed,
        moving: &moving,
        fixed_mask: None,
        spacing_mm: SPACING,
    };
    for sim in [RefineSim::Mind, RefineSim::Lncc] {
        let options = RefineOptions {
            steps: 60,
            sim,
            lambda: 0.1,
            lr: 0.3,
            ..RefineOptions::default()
        };
        let result = refine_pyramid(&zero, &input, &options).unwrap();
        assert_eq!(result.levels.len(), 2);
        for level in &result.levels {
            assert!(
                level.similarity_after < level.similarity_before,
                "{sim:?} {level:?}"
            );
        }
        let ddf = result.field_on([N; 3]).unwrap();
        let (after, before) = tre(&ddf, &truth);
        assert!(before > 3.0, "the motion is large: {before} mm");
        assert!(
            after < 0.35 * before,
            "{sim:?}: TRE {after} mm, identity {before} mm"
        );
    }
}

#[test]
fn bad_refine_options_name_the_option() {
    let e = "foo".parse::<RefineSim>().unwrap_err().to_string();
    assert!(e.contains("refine-sim") && e.contains("foo"), "{e}");
    let bad = |o: RefineOptions| o.validate().unwrap_err().to_string();
    let e = bad(RefineOptions {
        lambda: -1.0,
        ..RefineOptions::with_steps(5)
    });
    assert!(e.contains("refine-lambda"), "{e}");
    let e = bad(RefineOptions {
        levels: 0,
        ..RefineOptions::with_steps(5)
    });
    assert!(e.contains("refine-levels"), "{e}");
    let e = bad(RefineOptions::with_steps(MAX_REFINE_STEPS + 1));
    assert!(e.contains("refine"), "{e}");
    assert!(RefineOptions::with_steps(5).validate().is_ok());
}

#[test]
fn overrides_fill_unset_fields_with_the_defaults_and_round_trip() {
    let none = RefineOverrides::default().options(7).unwrap();
    assert_eq!(none, RefineOptions::with_steps(7));
    let set = RefineOverrides {
        sim: Some("lncc".into()),
        levels: Some(1),
        lambda: Some(0.0),
        grid: Some(3),
        lr: Some(0.2),
        mask: true,
    };
    let o = set.options(4).unwrap();
    assert_eq!(
        (
            o.steps,
            o.sim,
            o.levels,
            o.lambda,
            o.grid_spacing,
            o.lr,
            o.mask
        ),
        (4, RefineSim::Lncc, 1, 0.0, 3, 0.2, true)
    );
    assert_eq!(
        RefineOverrides::new(
            Some("lncc".into()),
            Some(1),
            Some(0.0),
            Some(3),
            Some(0.2),
            true
        ),
        set
    );
    let e = RefineOverrides {
        sim: Some("ssd".into()),
        ..RefineOverrides::default()
    }
    .options(1)
    .unwrap_err()
    .to_string();
    assert!(e.contains("refine-sim") && e.contains("ssd"), "{e}");
    let e = RefineOverrides {
        grid: Some(99),
        ..RefineOverrides::default()
    }
    .options(1)
    .unwrap_err()
    .to_string();
    assert!(e.contains("refine-grid"), "{e}");
}
