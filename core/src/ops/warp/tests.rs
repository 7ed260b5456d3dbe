//! Tests of the warp ops; references are named in each test.
#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

use super::*;
use crate::ops::grad_check::{check_grad, smooth_tensor, value_at};
use candle_core::Var;

/// A rank-5 f64 tensor from a closed form `f(b, c, i, j, k)`.
fn volume(shape: [usize; 5], f: impl Fn([usize; 5]) -> f64) -> Tensor {
    let mut values = Vec::with_capacity(shape.iter().product());
    for b in 0..shape[0] {
        for c in 0..shape[1] {
            for i in 0..shape[2] {
                for j in 0..shape[3] {
                    for k in 0..shape[4] {
                        values.push(f([b, c, i, j, k]));
                    }
                }
            }
        }
    }
    Tensor::from_vec(values, &shape[..], &Device::Cpu).unwrap()
}

/// The inputs of monai-spec.md §8 "Warp golden", f32: image (1,1,16,16,24) =
/// sin(0.3i + 0.5c + 0.7b) cos(0.2j - 0.1k), ddf[c] = 2.5 sin(0.4i + 0.3j + c) cos(0.2k + 0.5c).
fn golden_inputs() -> (Tensor, Tensor) {
    let image = volume([1, 1, 16, 16, 24], |[b, c, i, j, k]| {
        let (b, c, i, j, k) = (b as f64, c as f64, i as f64, j as f64, k as f64);
        (0.3 * i + 0.5 * c + 0.7 * b).sin() * (0.2 * j - 0.1 * k).cos()
    });
    let ddf = volume([1, 3, 16, 16, 24], |[_, c, i, j, k]| {
        let (c, i, j, k) = (c as f64, i as f64, j as f64, k as f64);
        2.5 * (0.4 * i + 0.3 * j + c).sin() * (0.2 * k + 0.5 * c).cos()
    });
    (
        image.to_dtype(DType::F32).unwrap(),
        ddf.to_dtype(DType::F32).unwrap(),
    )
}

fn sum_f64(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn border_matches_monai_golden_values() {
    // Reference: monai-spec.md §8, MONAI 1.6.1 Warp() on torch 2.x CPU, f32.
    let (image, ddf) = golden_inputs();
    let out = warp(&image, &ddf, Padding::Border).unwrap();
    assert_eq!(out.dtype(), DType::F32);
    // The golden sum is printed to 8 digits (f32); our f64 sum of the f32 output differs by
    // 3e-5 through summation order only.
    assert!(
        (sum_f64(&out) - 894.24524).abs() < 1e-4,
        "{}",
        sum_f64(&out)
    );
    assert!((value_at(&out, [0, 0, 7, 8, 9]) - 0.46783036).abs() < 1e-8);
    assert!((value_at(&out, [0, 0, 15, 15, 23]) - -0.83191288).abs() < 1e-8);
}

#[test]
fn zeros_matches_monai_golden_value() {
    // Reference: monai-spec.md §8, MONAI Warp(padding_mode="zeros"), f32.
    let (image, ddf) = golden_inputs();
    let out = warp(&image, &ddf, Padding::Zeros).unwrap();
    assert!(
        (sum_f64(&out) - 840.91064).abs() < 1e-4,
        "{}",
        sum_f64(&out)
    );
}

#[test]
fn f64_matches_f32_closely() {
    let (image, ddf) = golden_inputs();
    let as64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    for padding in [Padding::Border, Padding::Zeros] {
        let a = warp(&image, &ddf, padding).unwrap();
        let b = warp(&as64(&image), &as64(&ddf), padding).unwrap();
        let diff = (as64(&a) - b).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f64>().unwrap() < 1e-5);
    }
}

/// monai-spec.md §2: with ddf[:, c] = +1, out[idx] = img[idx + e_c], the last slice repeats
/// the border (border mode) or is 0 (zeros mode); nearest sampling agrees with border.
#[test]
fn unit_shift_moves_along_the_matching_axis() {
    let shape = [2, 2, 4, 5, 6];
    let image = smooth_tensor(&shape, 0.1);
    for axis in 0..3 {
        let ddf = volume(
            [2, 3, 4, 5, 6],
            |[_, c, ..]| if c == axis { 1.0 } else { 0.0 },
        );
        let border = warp(&image, &ddf, Padding::Border).unwrap();
        let zeros = warp(&image, &ddf, Padding::Zeros).unwrap();
        let nearest = warp_nearest(&image, &ddf).unwrap();
        for b in 0..2 {
            for c in 0..2 {
                for i in 0..4 {
                    for j in 0..5 {
                        for k in 0..6 {
                            let mut src = [i, j, k];
                            let outside = src[axis] + 1 >= shape[2 + axis];
                            src[axis] = (src[axis] + 1).min(shape[2 + axis] - 1);
                            let want = value_at(&image, [b, c, src[0], src[1], src[2]]);
                            let idx = [b, c, i, j, k];
                            assert!((value_at(&border, idx) - want).abs() < 1e-12);
                            assert_eq!(value_at(&nearest, idx), want);
                            let want_zeros = if outside { 0.0 } else { want };
                            assert!((value_at(&zeros, idx) - want_zeros).abs() < 1e-12);
                        }
                    }
                }
            }
        }
    }
}

/// The source coordinate reproduces MONAI's f32 normalisation round trip bit for bit:
/// reference computed here in scalar f32 as `((((i * 2) / (n - 1) - 1) + 1) / 2) * (n - 1)`
/// (MONAI warp.py, then PyTorch grid_sampler_unnormalize), which is not always i.
#[test]
fn coordinates_follow_the_f32_round_trip() {
    let spatial = [16, 16, 24];
    let ddf = Tensor::zeros((1, 3, 16, 16, 24), DType::F32, &Device::Cpu).unwrap();
    let q: Vec<f32> = source_coordinate(&ddf, 2, spatial, Padding::Zeros)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let last = 23f32;
    let mut moved = 0;
    for (t, got) in q.iter().enumerate() {
        let i = (t % 24) as f32;
        let want = ((((i * 2.0) / last - 1.0) + 1.0) / 2.0) * last;
        assert_eq!(got.to_bits(), want.to_bits(), "position {t}");
        moved += usize::from(want != i);
    }
    assert!(
        moved > 0,
        "the round trip should move some coordinates in f32"
    );
}

#[test]
fn zero_ddf_is_identity_up_to_the_f32_round_trip() {
    // monai-spec.md §2: MONAI's f32 round trip leaves errors up to ~7.2e-7, not 0.
    let (image, ddf) = golden_inputs();
    let out = warp(&image, &ddf.zeros_like().unwrap(), Padding::Border).unwrap();
    let diff = (out - &image).unwrap().abs().unwrap().max_all().unwrap();
    let diff = diff.to_scalar::<f32>().unwrap();
    assert!(diff < 2e-6, "{diff}");
}

/// Gradient w.r.t. the image and the DDF, f64, central differences. The DDF lies in
/// (0.1, 0.5) + integers, away from the integer kinks of trilinear interpolation.
#[test]
fn gradients_match_finite_differences() {
    let shape = [2, 2, 3, 4, 5];
    let image = smooth_tensor(&shape, 0.2);
    let ddf = volume([2, 3, 3, 4, 5], |[b, c, i, j, k]| {
        let wobble = 0.2 * ((i + 2 * j + 3 * k + c + b) as f64 * 0.7).sin();
        let jump = if (i + j + k + c) % 3 == 0 { -2.0 } else { 1.0 };
        0.3 + wobble + jump
    });
    for padding in [Padding::Border, Padding::Zeros] {
        let f = move |a: &[Tensor]| warp(&a[0], &a[1], padding);
        check_grad(&f, &[image.clone(), ddf.clone()], 0, 1e-6, 1e-7);
        check_grad(&f, &[image.clone(), ddf.clone()], 1, 1e-6, 1e-6);
    }
}

/// monai-spec.md §2 [V]: at integer sample points d out / d u is the forward difference
/// I[i+1] - I[i]; in border mode it is 0 on the border coordinates 0 and n - 1, in zeros mode
/// it is not zeroed at 0.
#[test]
fn ddf_gradient_at_integer_points_and_borders() {
    let shape = [1, 1, 5, 3, 3];
    let image = smooth_tensor(&shape, 0.4);
    let ddf = Var::from_tensor(&Tensor::zeros((1, 3, 5, 3, 3), DType::F64, &Device::Cpu).unwrap())
        .unwrap();
    for padding in [Padding::Border, Padding::Zeros] {
        let out = warp(&image, ddf.as_tensor(), padding).unwrap();
        let grads = out.sum_all().unwrap().backward().unwrap();
        let g = grads.get(ddf.as_tensor()).unwrap();
        for i in 0..5 {
            let got = value_at(g, [0, 0, i, 1, 1]);
            let forward = if i + 1 < 5 {
                value_at(&image, [0, 0, i + 1, 1, 1]) - value_at(&image, [0, 0, i, 1, 1])
            } else {
                0.0
            };
            let want = match padding {
                Padding::Border if i == 0 || i == 4 => 0.0,
                Padding::Zeros if i == 4 => -value_at(&image, [0, 0, 4, 1, 1]),
                _ => forward,
            };
            assert!(
                (got - want).abs() < 1e-9,
                "{padding:?} i={i}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn nearest_rounds_half_to_even() {
    let x = Tensor::new(&[0.5f64, 1.5, 2.5, -0.5, 2.4, 2.6, 3.0], &Device::Cpu).unwrap();
    let r: Vec<f64> = round_half_even(&x).unwrap().to_vec1().unwrap();
    assert_eq!(r, [0.0, 2.0, 2.0, 0.0, 2.0, 3.0, 3.0]);
}

#[test]
fn nearest_picks_the_closest_voxel_with_border_clamp() {
    let shape = [1, 1, 4, 3, 5];
    let image = smooth_tensor(&shape, 0.8);
    // u = +0.4 everywhere along axis 2 -> same voxel; u = -1.6 along axis 0 -> i - 2, clamped.
    let ddf = volume([1, 3, 4, 3, 5], |[_, c, ..]| match c {
        0 => -1.6,
        2 => 0.4,
        _ => 0.0,
    });
    let out = warp_nearest(&image, &ddf).unwrap();
    for i in 0..4usize {
        for j in 0..3 {
            for k in 0..5 {
                let src = i.saturating_sub(2);
                assert_eq!(
                    value_at(&out, [0, 0, i, j, k]),
                    value_at(&image, [0, 0, src, j, k])
                );
            }
        }
    }
}

#[test]
fn rejects_mismatched_ddf() {
    let image = Tensor::zeros((1, 1, 4, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let ddf = Tensor::zeros((1, 2, 4, 4, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(warp(&image, &ddf, Padding::Border).is_err());
    let ddf = Tensor::zeros((1, 3, 4, 4, 4), DType::F64, &Device::Cpu).unwrap();
    assert!(warp(&image, &ddf, Padding::Border).is_err());
}

/// Forward + backward time of a 64^3 warp (B = 1, C = 1, f32), fused and composed, with the
/// gradient w.r.t. the DDF only (training) and w.r.t. both; prints, asserts nothing.
/// Run with `cargo test --release -p medray-core --lib warp_timing -- --ignored --nocapture`.
#[test]
#[ignore = "timing probe: prints warp forward/backward seconds at 64^3; run with --ignored --nocapture"]
fn warp_timing_64() {
    let n = 64;
    let image = smooth_tensor(&[1, 1, n, n, n], 0.1)
        .to_dtype(DType::F32)
        .unwrap();
    let ddf = (smooth_tensor(&[1, 3, n, n, n], 0.5) * 3.0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let ddf = Var::from_tensor(&ddf).unwrap();
    let tracked = Var::from_tensor(&image).unwrap();
    type WarpFn = fn(&Tensor, &Tensor, Padding) -> Result<Tensor>;
    let ops: [(&str, WarpFn); 2] = [("fused", warp), ("composed", warp_composed)];
    for (name, op) in ops {
        for (what, image) in [("ddf", &image), ("ddf+image", tracked.as_tensor())] {
            let mut best = [f64::MAX; 2];
            for _ in 0..5 {
                let start = std::time::Instant::now();
                let out = op(image, ddf.as_tensor(), Padding::Border).unwrap();
                let forward = start.elapsed().as_secs_f64();
                let grads = out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                assert!(grads.get(ddf.as_tensor()).is_some());
                best = [
                    best[0].min(forward),
                    best[1].min(start.elapsed().as_secs_f64()),
                ];
            }
            println!(
                "warp 64^3 {name}, gradient w.r.t. {what}: forward {:.1} ms, forward+backward {:.1} ms (best of 5)",
                best[0] * 1e3,
                best[1] * 1e3
            );
        }
    }
}

/// The fused CPU op gives the composed ops' values bit for bit, and their gradients w.r.t.
/// the image and the DDF to rounding, in f32 and f64, with both paddings, on a batch of two
/// two-channel volumes whose displacements reach well outside the volume, and with an axis of
/// length 1.
#[test]
fn fused_op_matches_the_composed_ops() {
    for shape in [[2, 2, 5, 6, 7], [1, 3, 4, 1, 6]] {
        let [b, _, h, w, d] = shape;
        let image = smooth_tensor(&shape, 0.3);
        let ddf = volume([b, 3, h, w, d], |[b, c, i, j, k]| {
            4.0 * ((i + 2 * j + 3 * k + 5 * c + 7 * b) as f64 * 0.61).sin()
        });
        for dtype in [DType::F32, DType::F64] {
            let image = Var::from_tensor(&image.to_dtype(dtype).unwrap()).unwrap();
            let ddf = Var::from_tensor(&ddf.to_dtype(dtype).unwrap()).unwrap();
            for padding in [Padding::Border, Padding::Zeros] {
                let case = format!("{shape:?} {dtype:?} {padding:?}");
                let fused = warp(image.as_tensor(), ddf.as_tensor(), padding).unwrap();
                let composed = warp_composed(image.as_tensor(), ddf.as_tensor(), padding).unwrap();
                let bits = |t: &Tensor| -> Vec<u64> {
                    let v = t.flatten_all().unwrap().to_dtype(DType::F64).unwrap();
                    v.to_vec1::<f64>()
                        .unwrap()
                        .iter()
                        .map(|x| x.to_bits())
                        .collect()
                };
                assert_eq!(bits(&fused), bits(&composed), "{case}: values");
                // A weighted sum, so that every output voxel sends a different gradient.
                let weights = smooth_tensor(&shape, 0.7).to_dtype(dtype).unwrap();
                let reduce = |t: &Tensor| (t * &weights).unwrap().sum_all().unwrap();
                let gf = reduce(&fused).backward().unwrap();
                let gc = reduce(&composed).backward().unwrap();
                let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
                for (name, var) in [("image", &image), ("ddf", &ddf)] {
                    let a = gf.get(var.as_tensor()).unwrap();
                    let e = gc.get(var.as_tensor()).unwrap();
                    let scale = sum_f64(&e.abs().unwrap()) / e.elem_count() as f64;
                    let diff = (a - e).unwrap().abs().unwrap().max_all().unwrap();
                    let diff = sum_f64(&diff);
                    assert!(scale > 0.0, "{case}: {name} gradient is all zero");
                    assert!(
                        diff <= tol * scale.max(1.0),
                        "{case}: {name} gradient off by {diff}"
                    );
                }
            }
        }
    }
}

/// The fused nearest-voxel warp picks the composed ops' voxels, with displacements in halves
/// (ties, rounded to even), far outside the volume, and an axis of length 1.
#[test]
fn fused_nearest_matches_the_composed_ops() {
    for shape in [[2, 2, 5, 6, 7], [1, 3, 4, 1, 6]] {
        let [b, _, h, w, d] = shape;
        let image = smooth_tensor(&shape, 0.3);
        let ddf = volume([b, 3, h, w, d], |[b, c, i, j, k]| {
            let t = (i + 2 * j + 3 * k + 5 * c + 7 * b) as f64;
            if (i + j + k) % 2 == 0 {
                0.5 * ((t * 0.61).sin() * 12.0).round()
            } else {
                5.0 * (t * 0.43).sin()
            }
        });
        for dtype in [DType::F32, DType::F64] {
            let (image, ddf) = (image.to_dtype(dtype).unwrap(), ddf.to_dtype(dtype).unwrap());
            let fused = warp_nearest(&image, &ddf).unwrap();
            let composed = warp_nearest_composed(&image, &ddf).unwrap();
            let diff = (fused - composed)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert_eq!(sum_f64(&diff), 0.0, "{shape:?} {dtype:?}");
        }
    }
}
