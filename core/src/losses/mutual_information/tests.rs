//! Tests of the global mutual information loss against MONAI 1.6.1 (spec §8).

use candle_core::{DType, Tensor};

use super::*;
use crate::losses::test_support::{check_gradient, grid, image_a, image_b, scalar};

fn gmi(loss: &GlobalMutualInformationLoss, pred: &Tensor, target: &Tensor) -> f64 {
    scalar(&loss.forward(pred, target).unwrap())
}

/// Spec §3: torch.linspace(0, 1, 23) in f32 has 0.40909093618392944 at index 9; MONAI's f32
/// sigma is 0.0227272734 and preterm 967.9999389648438.
#[test]
fn constants_are_built_in_f32() {
    let centers = bin_centers_f32(23);
    assert_eq!(centers[0], 0.0);
    assert_eq!(centers[22], 1.0);
    assert_eq!(f64::from(centers[9]), 0.40909093618392944);
    assert_eq!(gaussian_preterm_f32(&centers, 0.5), 967.9999389648438);
}

/// Reference: spec §8, MONAI GlobalMutualInformationLoss()(A, B): f32 -0.7899865508,
/// f64 -0.7899865602 (f64 input, f32-built constants).
#[test]
fn golden_gaussian_a_b() {
    let loss = GlobalMutualInformationLoss::default();
    let f64_value = gmi(&loss, &image_a(DType::F64), &image_b(DType::F64));
    assert!((f64_value - -0.7899865602).abs() < 1e-9, "f64 {f64_value}");
    // The f32 path reproduces MONAI's f32 value to all 10 given digits.
    let f32_value = gmi(&loss, &image_a(DType::F32), &image_b(DType::F32));
    assert!(
        (f32_value - -0.7899865508).abs() < 1e-7 * 0.79,
        "f32 {f32_value}"
    );
}

/// Reference: spec §8, GMI(A, A) in f32 = -1.8899403811.
#[test]
fn golden_gaussian_a_a() {
    let a = image_a(DType::F32);
    let got = gmi(&GlobalMutualInformationLoss::default(), &a, &a);
    assert!((got - -1.8899403811).abs() < 2e-7 * 1.89, "{got}");
}

/// Reference: spec §8, GMI b-spline(A, B) in f64 = -0.8012393071.
#[test]
fn golden_bspline_a_b() {
    let loss = GlobalMutualInformationLoss::new(23, 0.5, ParzenKernel::BSpline).unwrap();
    let got = gmi(&loss, &image_a(DType::F64), &image_b(DType::F64));
    assert!((got - -0.8012393071).abs() < 1e-9, "{got}");
    let got32 = gmi(&loss, &image_a(DType::F32), &image_b(DType::F32));
    assert!((got32 - -0.8012393071).abs() < 2e-7 * 0.8, "f32 {got32}");
}

/// The b-spline loss is asymmetric (cubic window for pred, order 0 for target).
#[test]
fn bspline_is_asymmetric() {
    let loss = GlobalMutualInformationLoss::new(23, 0.5, ParzenKernel::BSpline).unwrap();
    let (a, b) = (image_a(DType::F64), image_b(DType::F64));
    assert!((gmi(&loss, &a, &b) - gmi(&loss, &b, &a)).abs() > 1e-6);
}

/// Reference: spec §8, GMI(cat([A, B]), cat([B, A])) over channels = -0.7876026354: channels
/// are flattened into samples of one histogram.
#[test]
fn golden_two_channels() {
    let (a, b) = (image_a(DType::F64), image_b(DType::F64));
    let pred = Tensor::cat(&[&a, &b], 1).unwrap();
    let target = Tensor::cat(&[&b, &a], 1).unwrap();
    let got = gmi(&GlobalMutualInformationLoss::default(), &pred, &target);
    assert!((got - -0.7876026354).abs() < 1e-8, "{got}");
}

/// The batch reduction is the mean of per-item MI: a batch of (A,B) and (A,A) averages them.
#[test]
fn batch_items_are_averaged() {
    let (a, b) = (image_a(DType::F64), image_b(DType::F64));
    let loss = GlobalMutualInformationLoss::default();
    let pred = Tensor::cat(&[&a, &a], 0).unwrap();
    let target = Tensor::cat(&[&b, &a], 0).unwrap();
    let mi = loss
        .mutual_information(&pred, &target)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert!((mi[0] - gmi(&loss, &a, &b).abs()).abs() < 1e-12);
    assert!((mi[1] - gmi(&loss, &a, &a).abs()).abs() < 1e-12);
    let mean = gmi(&loss, &pred, &target);
    assert!((mean + (mi[0] + mi[1]) / 2.0).abs() < 1e-12);
}

#[test]
fn rejects_bad_inputs() {
    let a = image_a(DType::F32);
    let loss = GlobalMutualInformationLoss::default();
    assert!(matches!(
        loss.forward(&a, &a.narrow(3, 0, 5).unwrap()),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(loss.forward(&a, &image_a(DType::F64)).is_err());
    assert!(GlobalMutualInformationLoss::new(4, 0.5, ParzenKernel::BSpline).is_err());
    assert!(GlobalMutualInformationLoss::new(23, 0.0, ParzenKernel::Gaussian).is_err());
}

fn gradient_inputs() -> (Tensor, Tensor) {
    let shape = [1, 1, 5, 6, 7];
    // Values kept strictly inside (0, 1) so the clamp is inactive and the loss smooth.
    let pred = grid(shape, |_, _, i, j, k| {
        0.5 + 0.4 * (0.9 * i + 0.5 * j - 0.3 * k).sin()
    });
    let target = grid(shape, |_, _, i, j, k| {
        0.5 + 0.3 * (0.4 * i - 0.6 * j + 0.2 * k).cos()
    });
    (pred, target)
}

#[test]
fn gaussian_gradient_matches_finite_differences() {
    let (pred, target) = gradient_inputs();
    let loss = GlobalMutualInformationLoss::default();
    check_gradient(
        &pred,
        |x| loss.forward(x, &target).unwrap(),
        &[0, 13, 77, 150, 209],
    );
}

#[test]
fn bspline_gradient_matches_finite_differences() {
    let (pred, target) = gradient_inputs();
    let loss = GlobalMutualInformationLoss::new(23, 0.5, ParzenKernel::BSpline).unwrap();
    // Probes avoid the batch min/max voxels, where MONAI's max() gradient is a subgradient.
    let flat = pred.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let (lo, hi) = flat
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    let probes: Vec<usize> = [3, 20, 64, 101, 177]
        .into_iter()
        .filter(|&p| flat[p] != lo && flat[p] != hi)
        .collect();
    check_gradient(&pred, |x| loss.forward(x, &target).unwrap(), &probes);
}

/// Clamp gradient as in PyTorch: pixels exactly at 0 still pass gradient.
#[test]
fn gradient_flows_at_clamp_bound() {
    let shape = [1, 1, 4, 4, 4];
    let pred = grid(shape, |_, _, i, j, _| {
        if i == 0.0 {
            0.0
        } else {
            0.1 * (i + j) / 7.0 + 0.3
        }
    });
    let target = grid(shape, |_, _, i, j, k| 0.2 + 0.1 * (i + j + k) / 9.0);
    let var = candle_core::Var::from_tensor(&pred).unwrap();
    let loss = GlobalMutualInformationLoss::default()
        .forward(var.as_tensor(), &target)
        .unwrap();
    let grads = loss.backward().unwrap();
    let g = grads
        .get(var.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    // Voxel 0 sits exactly on the bound 0; a smooth one-sided derivative exists there.
    assert!(g[0].abs() > 1e-9, "{}", g[0]);
}

/// The fused CPU histogram op against the composed candle ops: MI values per batch item and
/// the gradients of both inputs, f32 and f64, batch 2, with values outside [0, 1] so that
/// the clamp is active.
#[test]
fn fused_gaussian_matches_composed_ops() {
    let shape = [2, 1, 6, 7, 5];
    let pred = grid(shape, |b, _, i, j, k| {
        0.5 + 0.6 * (0.9 * i + 0.5 * j - 0.3 * k + b as f64).sin()
    });
    let target = grid(shape, |b, _, i, j, k| {
        0.45 + 0.5 * (0.4 * i - 0.6 * j + 0.2 * k - b as f64).cos()
    });
    let loss = GlobalMutualInformationLoss::default();
    for dtype in [DType::F64, DType::F32] {
        let run = |fused: bool| {
            let p = candle_core::Var::from_tensor(&pred.to_dtype(dtype).unwrap()).unwrap();
            let t = candle_core::Var::from_tensor(&target.to_dtype(dtype).unwrap()).unwrap();
            let mi = if fused {
                loss.mutual_information(p.as_tensor(), t.as_tensor())
            } else {
                loss.mutual_information_composed(p.as_tensor(), t.as_tensor())
            }
            .unwrap();
            let probe = Tensor::new(&[0.7f64, -1.3], &candle_core::Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let grads = (&mi * probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let v = |t: &Tensor| {
                t.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            };
            [
                v(&mi),
                v(grads.get(p.as_tensor()).unwrap()),
                v(grads.get(t.as_tensor()).unwrap()),
            ]
        };
        let (fused, composed) = (run(true), run(false));
        for (n, (f, c)) in fused.iter().zip(&composed).enumerate() {
            let scale = c.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            for (i, (a, b)) in f.iter().zip(c).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * scale,
                    "{dtype:?} part {n} element {i}: fused {a} vs composed {b} (scale {scale})"
                );
            }
        }
    }
}

/// The fused op leaves an input that no variable depends on without a gradient.
#[test]
fn fused_gaussian_gradient_only_for_tracked_inputs() {
    let (pred, target) = gradient_inputs();
    let p = candle_core::Var::from_tensor(&pred).unwrap();
    let loss = GlobalMutualInformationLoss::default()
        .forward(p.as_tensor(), &target)
        .unwrap();
    let grads = loss.backward().unwrap();
    assert!(grads.get(p.as_tensor()).is_some());
    assert!(grads.get(&target).is_none());
}
