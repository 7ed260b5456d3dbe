//! Tests of the 3D convolutions against direct f64 loops written from PyTorch's definitions
//! (`torch.nn.Conv3d` / `torch.nn.ConvTranspose3d` docs), and of their gradients against
//! central finite differences.

#![allow(clippy::unwrap_used)]

use super::*;
use crate::ops::simd::{with_simd_limit, SimdLevel};
use candle_core::{DType, Device, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type Conv = fn(&Tensor, &Tensor, Option<&Tensor>) -> candle_core::Result<Tensor>;
type ConvT = fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>;

/// [`conv3d`] on the direct tap loops whatever the kernel size.
fn conv3d_direct(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    conv3d_with(x, w, bias, Algorithm::Direct)
}

/// [`conv3d`] on the FFT tiles for kernels of 5 and up.
fn conv3d_fft(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    conv3d_with(x, w, bias, Algorithm::Fft)
}

fn random(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// PyTorch Conv3d by definition: `out[o,h,w,d] = bias[o] + sum x[i, h+a-p, w+b-p, d+c-p] *
/// wt[o,i,a,b,c]`, zero outside the volume.
fn naive_conv3d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Vec<f64> {
    let (bn, ci, h, wd, d) = x.dims5().unwrap();
    let (co, _, k, _, _) = w.dims5().unwrap();
    let p = (k - 1) as isize / 2;
    let (xv, wv) = (values(x), values(w));
    let bv = bias.map(values).unwrap_or_else(|| vec![0.0; co]);
    let mut out = vec![0.0; bn * co * h * wd * d];
    let xi = |b, i, u: usize, v: usize, s: usize| (((b * ci + i) * h + u) * wd + v) * d + s;
    for b in 0..bn {
        for o in 0..co {
            for u in 0..h {
                for v in 0..wd {
                    for s in 0..d {
                        let mut acc = bv[o];
                        for i in 0..ci {
                            for a in 0..k {
                                for bb in 0..k {
                                    for c in 0..k {
                                        let (uu, vv, ss) = (
                                            u as isize + a as isize - p,
                                            v as isize + bb as isize - p,
                                            s as isize + c as isize - p,
                                        );
                                        if uu < 0
                                            || vv < 0
                                            || ss < 0
                                            || uu >= h as isize
                                            || vv >= wd as isize
                                            || ss >= d as isize
                                        {
                                            continue;
                                        }
                                        acc += xv[xi(b, i, uu as usize, vv as usize, ss as usize)]
                                            * wv[(((o * ci + i) * k + a) * k + bb) * k + c];
                                    }
                                }
                            }
                        }
                        out[(((b * co + o) * h + u) * wd + v) * d + s] = acc;
                    }
                }
            }
        }
    }
    out
}

/// PyTorch ConvTranspose3d(k=3, s=2, p=1, output_padding=1) by definition, as a scatter:
/// `out[o, 2u-1+a, 2v-1+b, 2s-1+c] += x[i, u, v, s] * w[i, o, a, b, c]`, dropping the
/// positions outside `(2H, 2W, 2D)`.
fn naive_conv_transpose3d(x: &Tensor, w: &Tensor) -> Vec<f64> {
    let (bn, ci, h, wd, d) = x.dims5().unwrap();
    let co = w.dim(1).unwrap();
    let (oh, ow, od) = (2 * h, 2 * wd, 2 * d);
    let (xv, wv) = (values(x), values(w));
    let mut out = vec![0.0; bn * co * oh * ow * od];
    for b in 0..bn {
        for i in 0..ci {
            for u in 0..h {
                for v in 0..wd {
                    for s in 0..d {
                        let xval = xv[(((b * ci + i) * h + u) * wd + v) * d + s];
                        for o in 0..co {
                            for a in 0..3 {
                                for bb in 0..3 {
                                    for c in 0..3 {
                                        let (tu, tv, ts) = (2 * u + a, 2 * v + bb, 2 * s + c);
                                        if tu < 1 || tv < 1 || ts < 1 {
                                            continue;
                                        }
                                        let (tu, tv, ts) = (tu - 1, tv - 1, ts - 1);
                                        if tu >= oh || tv >= ow || ts >= od {
                                            continue;
                                        }
                                        out[(((b * co + o) * oh + tu) * ow + tv) * od + ts] +=
                                            xval * wv[(((i * co + o) * 3 + a) * 3 + bb) * 3 + c];
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    for (idx, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * scale,
            "{what}: element {idx}: got {g}, want {w}"
        );
    }
}

#[test]
fn conv3d_matches_direct_loops_k3_and_k7() {
    for (conv, name) in [
        (conv3d_direct as Conv, "direct"),
        (conv3d_fft as Conv, "fft"),
        (conv3d_generic as Conv, "generic"),
    ] {
        for (k, size) in [(3, [6, 5, 7]), (7, [8, 8, 8]), (1, [3, 4, 5])] {
            for dtype in [DType::F64, DType::F32] {
                let x = random(&[2, 3, size[0], size[1], size[2]], 1, dtype);
                let w = random(&[4, 3, k, k, k], 2, dtype);
                let bias = random(&[4], 3, dtype);
                let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
                for b in [None, Some(&bias)] {
                    let y = conv(&x, &w, b).unwrap();
                    assert_eq!(y.dims(), &[2, 4, size[0], size[1], size[2]]);
                    assert_eq!(y.dtype(), dtype);
                    let what = format!("{name} k={k} {dtype:?} bias={}", b.is_some());
                    assert_close(&values(&y), &naive_conv3d(&x, &w, b), tol, &what);
                }
            }
        }
    }
}

#[test]
fn conv3d_accepts_non_contiguous_inputs() {
    let x = random(&[2, 5, 6, 3, 7], 4, DType::F64)
        .transpose(1, 3)
        .unwrap();
    let w = random(&[3, 4, 3, 3, 3], 5, DType::F64)
        .transpose(0, 1)
        .unwrap();
    let want = naive_conv3d(&x, &w, None);
    assert_close(
        &values(&conv3d(&x, &w, None).unwrap()),
        &want,
        1e-12,
        "strided",
    );
}

#[test]
fn conv_transpose3d_matches_scatter_reference() {
    for (conv, name) in [
        (conv_transpose3d as ConvT, "fast"),
        (conv_transpose3d_generic as ConvT, "generic"),
    ] {
        for dtype in [DType::F64, DType::F32] {
            let x = random(&[2, 3, 3, 4, 2], 6, dtype);
            let w = random(&[3, 5, 3, 3, 3], 7, dtype);
            let y = conv(&x, &w).unwrap();
            assert_eq!(y.dims(), &[2, 5, 6, 8, 4], "{name}");
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            assert_close(
                &values(&y),
                &naive_conv_transpose3d(&x, &w),
                tol,
                &format!("{name} {dtype:?}"),
            );
        }
    }
}

/// Checks the autograd gradients of `loss(inputs)` against central differences at a few
/// entries of every input. The losses here are linear in each input, so the differences
/// are exact up to rounding.
fn check_gradients(inputs: &[Tensor], loss: &dyn Fn(&[Tensor]) -> Tensor, what: &str) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = loss(&tensors).backward().unwrap();
    let eps = 1e-4;
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    for (n, var) in vars.iter().enumerate() {
        let analytic = values(grads.get(var).expect("a gradient for every input"));
        let base = values(var.as_tensor());
        assert_eq!(analytic.len(), base.len());
        let picks: Vec<usize> = if base.len() <= 40 {
            (0..base.len()).collect()
        } else {
            (0..40).map(|_| rng.gen_range(0..base.len())).collect()
        };
        for idx in picks {
            let eval = |delta: f64| {
                let mut v = base.clone();
                v[idx] += delta;
                let t = Tensor::from_vec(v, inputs[n].shape(), &Device::Cpu).unwrap();
                let mut args = inputs.to_vec();
                args[n] = t;
                loss(&args).to_scalar::<f64>().unwrap()
            };
            let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
            assert!(
                (numeric - analytic[idx]).abs() <= 1e-7 * (1.0 + numeric.abs()),
                "{what}: input {n} element {idx}: autograd {} vs finite difference {numeric}",
                analytic[idx]
            );
        }
    }
}

#[test]
fn conv3d_gradients_match_finite_differences() {
    for (conv, name) in [
        (conv3d as Conv, "fast"),
        (conv3d_generic as Conv, "generic"),
    ] {
        for (k, size) in [(3, [6, 5, 7]), (7, [8, 8, 8])] {
            let x = random(&[2, 3, size[0], size[1], size[2]], 10, DType::F64);
            let w = random(&[2, 3, k, k, k], 11, DType::F64);
            let bias = random(&[2], 12, DType::F64);
            let r = random(&[2, 2, size[0], size[1], size[2]], 13, DType::F64);
            let loss = |t: &[Tensor]| {
                conv(&t[0], &t[1], Some(&t[2]))
                    .unwrap()
                    .mul(&r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            check_gradients(&[x, w, bias], &loss, &format!("{name} k={k}"));
        }
    }
}

#[test]
fn conv_transpose3d_gradients_match_finite_differences() {
    for (conv, name) in [
        (conv_transpose3d as ConvT, "fast"),
        (conv_transpose3d_generic as ConvT, "generic"),
    ] {
        let x = random(&[2, 3, 3, 4, 2], 20, DType::F64);
        let w = random(&[3, 2, 3, 3, 3], 21, DType::F64);
        let r = random(&[2, 2, 6, 8, 4], 22, DType::F64);
        let loss = |t: &[Tensor]| {
            conv(&t[0], &t[1])
                .unwrap()
                .mul(&r)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        check_gradients(&[x, w], &loss, name);
    }
}

#[test]
fn generic_path_equals_fast_path_with_gradients() {
    let x = random(&[2, 4, 5, 6, 4], 30, DType::F32);
    let w = random(&[3, 4, 3, 3, 3], 31, DType::F32);
    let bias = random(&[3], 32, DType::F32);
    let r = random(&[2, 3, 5, 6, 4], 33, DType::F32);
    let run = |conv: Conv| {
        let (xv, wv, bv) = (
            Var::from_tensor(&x).unwrap(),
            Var::from_tensor(&w).unwrap(),
            Var::from_tensor(&bias).unwrap(),
        );
        let y = conv(xv.as_tensor(), wv.as_tensor(), Some(bv.as_tensor())).unwrap();
        let grads = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        let mut all = vec![values(&y)];
        for v in [&xv, &wv, &bv] {
            all.push(values(grads.get(v).unwrap()));
        }
        all
    };
    let (fast, generic) = (run(conv3d), run(conv3d_generic));
    for (n, (f, g)) in fast.iter().zip(&generic).enumerate() {
        assert_close(f, g, 1e-5, &format!("output/grad {n}"));
    }
}

/// f32 convolutions whose output channels (or, for the input gradient, input channels)
/// are a multiple of 32 run the AVX-512 register tiles (`avx512.rs`), a multiple of 16 the
/// AVX2 ones (`avx2.rs`): each SIMD level this CPU has ([`SimdLevel::supported`], capped
/// with `with_simd_limit`) against the generic path, values and gradients. Rows of 13
/// voxels need full tiles and a partial one at both widths (6 and 12 voxels).
#[test]
fn simd_tiles_equal_generic_with_gradients() {
    let levels = SimdLevel::supported();
    eprintln!("SIMD levels tested: {levels:?}");
    for level in levels {
        with_simd_limit(level, || simd_tiles_equal_generic(level));
    }
}

fn simd_tiles_equal_generic(level: SimdLevel) {
    // Ci = 32 and 64 take the constant-stride tiles, Ci = 3 (odd inner dimension) and 16
    // the general one; the input gradient runs the tiles with Ci and Co swapped.
    // The last case is large enough for the weight gradient's position chunks (256) to
    // repeat within each parallel block.
    for (ci, co, k, [h, wd, d]) in [
        (16, 32, 3, [4, 3, 13]),
        (3, 16, 5, [4, 3, 13]),
        (32, 16, 3, [4, 3, 13]),
        (64, 32, 3, [4, 3, 13]),
        (3, 64, 3, [4, 3, 13]),
        (8, 32, 3, [12, 11, 13]),
    ] {
        let x = random(&[2, ci, h, wd, d], 90, DType::F32);
        let w = random(&[co, ci, k, k, k], 91, DType::F32);
        let r = random(&[2, co, h, wd, d], 92, DType::F32);
        let run = |conv: Conv| {
            let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
            let y = conv(xv.as_tensor(), wv.as_tensor(), None).unwrap();
            let grads = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
            vec![
                values(&y),
                values(grads.get(&xv).unwrap()),
                values(grads.get(&wv).unwrap()),
            ]
        };
        let (fast, generic) = (run(conv3d_direct), run(conv3d_generic));
        for (n, (f, g)) in fast.iter().zip(&generic).enumerate() {
            assert_close(
                f,
                g,
                1e-5,
                &format!("{level}: ci={ci} co={co} k={k} output/grad {n}"),
            );
        }
    }
}

/// `conv3d_fused` (eval-mode BatchNorm folded into the conv) against the conv followed by
/// the per-channel map and ReLU in candle ops: on the AVX2 (`Co` = 16) and `gemm`
/// (`Co` = 3) paths, with and without ReLU, and on the differentiable fallback taken when
/// the input tracks a variable.
#[test]
fn fused_epilogue_equals_conv_then_affine_and_relu() {
    for co in [16, 3] {
        let x = random(&[1, 4, 5, 6, 7], 100, DType::F32);
        let w = random(&[co, 4, 3, 3, 3], 101, DType::F32);
        let scale: Vec<f64> = (0..co).map(|o| 0.5 + 0.1 * o as f64).collect();
        let shift: Vec<f64> = (0..co).map(|o| 0.3 - 0.05 * o as f64).collect();
        for relu in [false, true] {
            let epilogue = Epilogue {
                scale: scale.clone(),
                shift: shift.clone(),
                relu,
            };
            let channel = |v: &[f64]| {
                Tensor::new(v, &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .reshape((1, co, 1, 1, 1))
                    .unwrap()
            };
            let want = conv3d(&x, &w, None)
                .unwrap()
                .broadcast_mul(&channel(&scale))
                .unwrap()
                .broadcast_add(&channel(&shift))
                .unwrap();
            let want = if relu { want.relu().unwrap() } else { want };
            let got = conv3d_fused(&x, &w, &epilogue).unwrap();
            assert!(!got.track_op());
            assert_close(
                &values(&got),
                &values(&want),
                1e-6,
                &format!("co={co} relu={relu}"),
            );
            if relu {
                assert!(values(&got).iter().all(|v| *v >= 0.0));
                assert!(values(&want).contains(&0.0), "the ReLU clips something");
            }
            let xv = Var::from_tensor(&x).unwrap();
            let tracked = conv3d_fused(xv.as_tensor(), &w, &epilogue).unwrap();
            assert!(tracked.track_op());
            assert_close(
                &values(&tracked),
                &values(&want),
                1e-6,
                "differentiable fallback",
            );
        }
    }
    let x = random(&[1, 4, 5, 6, 7], 100, DType::F32);
    let w = random(&[16, 4, 3, 3, 3], 101, DType::F32);
    let short = Epilogue {
        scale: vec![1.0; 15],
        shift: vec![0.0; 16],
        relu: false,
    };
    let err = conv3d_fused(&x, &w, &short).unwrap_err().to_string();
    assert!(
        err.contains("15 scales") && err.contains("16 output channels"),
        "{err}"
    );
}

/// Both CPU layouts against the generic path, values and gradients (f64): few input
/// channels fold a kernel axis into the channels (`ConvDims::folds`), many do not.
#[test]
fn folded_and_unfolded_fast_paths_equal_generic() {
    for (ci, k) in [(2, 7), (3, 3), (12, 3), (5, 7)] {
        let dims = ConvDims {
            batch: 2,
            in_channels: ci,
            out_channels: 3,
            size: [5, 4, 6],
            kernel: k,
        };
        let x = random(&[2, ci, 5, 4, 6], 80, DType::F64);
        let w = random(&[3, ci, k, k, k], 81, DType::F64);
        let r = random(&[2, 3, 5, 4, 6], 82, DType::F64);
        let run = |conv: Conv| {
            let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
            let y = conv(xv.as_tensor(), wv.as_tensor(), None).unwrap();
            let grads = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
            vec![
                values(&y),
                values(grads.get(&xv).unwrap()),
                values(grads.get(&wv).unwrap()),
            ]
        };
        let (fast, generic) = (run(conv3d), run(conv3d_generic));
        for (n, (f, g)) in fast.iter().zip(&generic).enumerate() {
            assert_close(
                f,
                g,
                1e-12,
                &format!("ci={ci} k={k} folds={} output/grad {n}", dims.folds()),
            );
        }
    }
}

/// The phase-decomposed CPU `conv_transpose3d` against the zero-insertion generic path:
/// values and both gradients, f32 and f64, batch 2, uneven sizes (a size of 1 included).
#[test]
fn conv_transpose3d_fast_path_equals_generic_with_gradients() {
    for dtype in [DType::F64, DType::F32] {
        for (ci, co, size) in [(4, 3, [3, 5, 2]), (2, 5, [1, 4, 3])] {
            let x = random(&[2, ci, size[0], size[1], size[2]], 60, dtype);
            let w = random(&[ci, co, 3, 3, 3], 61, dtype);
            let r = random(&[2, co, 2 * size[0], 2 * size[1], 2 * size[2]], 62, dtype);
            let run = |conv: ConvT| {
                let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
                let y = conv(xv.as_tensor(), wv.as_tensor()).unwrap();
                let grads = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
                vec![
                    values(&y),
                    values(grads.get(&xv).unwrap()),
                    values(grads.get(&wv).unwrap()),
                ]
            };
            let (fast, generic) = (run(conv_transpose3d), run(conv_transpose3d_generic));
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            for (n, (f, g)) in fast.iter().zip(&generic).enumerate() {
                assert_close(
                    f,
                    g,
                    tol,
                    &format!("{dtype:?} {ci}->{co} {size:?} output/grad {n}"),
                );
            }
        }
    }
}

/// An input that no variable depends on gets no gradient, and the weight gradient is the
/// same as when the input is a variable (conv3d and conv_transpose3d).
#[test]
fn untracked_inputs_skip_their_gradient() {
    let x = random(&[1, 2, 4, 3, 5], 70, DType::F64);
    let w = random(&[3, 2, 3, 3, 3], 71, DType::F64);
    let wt = random(&[2, 3, 3, 3, 3], 72, DType::F64);
    let weight_grad = |track_x: bool, transposed: bool| {
        let wv = Var::from_tensor(if transposed { &wt } else { &w }).unwrap();
        let xv = Var::from_tensor(&x).unwrap();
        let input = if track_x {
            xv.as_tensor().clone()
        } else {
            x.clone()
        };
        let y = if transposed {
            conv_transpose3d(&input, wv.as_tensor()).unwrap()
        } else {
            conv3d(&input, wv.as_tensor(), None).unwrap()
        };
        let probe = random(y.dims(), 73, DType::F64);
        let grads = y
            .mul(&probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(grads.get(&xv).is_some(), track_x);
        values(grads.get(&wv).unwrap())
    };
    for transposed in [false, true] {
        assert_close(
            &weight_grad(false, transposed),
            &weight_grad(true, transposed),
            1e-12,
            &format!("transposed={transposed}"),
        );
    }
}

#[test]
fn invalid_shapes_are_rejected_with_the_op_name() {
    let x = random(&[1, 3, 4, 4, 4], 40, DType::F32);
    let cases = [
        (random(&[2, 4, 3, 3, 3], 41, DType::F32), "channels"),
        (random(&[2, 3, 2, 2, 2], 42, DType::F32), "odd"),
        (random(&[2, 3, 3, 3, 5], 43, DType::F32), "cubic"),
    ];
    for (w, why) in cases {
        let err = conv3d(&x, &w, None).unwrap_err().to_string();
        assert!(err.contains("conv3d"), "{why}: {err}");
    }
    let w = random(&[2, 3, 3, 3, 3], 44, DType::F32);
    let flat = random(&[3, 4, 4, 4], 45, DType::F32);
    assert!(conv3d(&flat, &w, None).is_err());
    let bad_bias = random(&[3], 46, DType::F32);
    assert!(conv3d(&x, &w, Some(&bad_bias)).is_err());
    let f64_w = w.to_dtype(DType::F64).unwrap();
    assert!(conv3d(&x, &f64_w, None).is_err());
    let wt = random(&[4, 2, 3, 3, 3], 47, DType::F32);
    let err = conv_transpose3d(&x, &wt).unwrap_err().to_string();
    assert!(err.contains("conv_transpose3d"), "{err}");
}

/// Prints the speed of the CPU path on a LocalNet level-0 sized problem:
/// `cargo test -p medray-core --release --lib conv3d::tests::timing -- --ignored --nocapture`.
#[test]
#[ignore = "timing probe: prints conv3d forward/backward seconds; run with --ignored --nocapture"]
fn timing() {
    let x = random(&[1, 32, 64, 64, 64], 50, DType::F32);
    let w = random(&[32, 32, 7, 7, 7], 51, DType::F32);
    let xv = Var::from_tensor(&x).unwrap();
    let wv = Var::from_tensor(&w).unwrap();
    for (conv, name) in [
        (conv3d_direct as Conv, "direct"),
        (conv3d_fft as Conv, "fft"),
    ] {
        for _ in 0..3 {
            let t0 = std::time::Instant::now();
            let y = conv(xv.as_tensor(), wv.as_tensor(), None).unwrap();
            let t1 = std::time::Instant::now();
            let grads = y.sum_all().unwrap().backward().unwrap();
            let t2 = std::time::Instant::now();
            assert!(grads.get(&wv).is_some());
            println!(
                "conv3d {name} B=1 Ci=Co=32 k=7 64^3 f32: forward {:.3} s, backward {:.3} s ({} threads)",
                (t1 - t0).as_secs_f64(),
                (t2 - t1).as_secs_f64(),
                rayon::current_num_threads()
            );
        }
    }
}

/// The cuDNN path (feature `cudnn`) against the CPU fast path: `conv3d` (k = 3 and 7,
/// Co = 3 and 16) and `conv_transpose3d`, values and both gradients, in f64 (exact up to
/// summation order) and f32 (cuDNN may run TF32 tensor cores, so 1% of the largest value).
/// Needs a CUDA GPU: `cargo test -p medray-core --features cudnn cudnn -- --ignored`.
#[cfg(feature = "cudnn")]
#[test]
#[ignore = "needs a CUDA GPU; run with --features cudnn -- --ignored cudnn"]
fn cudnn_matches_cpu_with_gradients() {
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    let grads_of = |y: Tensor, r: &Tensor, vars: &[&Var]| -> Vec<Vec<f64>> {
        let grads = y
            .mul(&r.to_device(y.device()).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut out = vec![values(&y.to_device(&Device::Cpu).unwrap())];
        for v in vars {
            let g = grads.get(v).expect("a gradient");
            out.push(values(&g.to_device(&Device::Cpu).unwrap()));
        }
        out
    };
    let compare = |gpu_out: &[Vec<f64>], cpu_out: &[Vec<f64>], rel: f64, what: &str| {
        for (n, (g, c)) in gpu_out.iter().zip(cpu_out).enumerate() {
            assert_close(g, c, rel, &format!("{what} output/grad {n}"));
        }
    };
    for (dtype, rel) in [(DType::F64, 1e-10), (DType::F32, 1e-2)] {
        for (ci, co, k) in [(4, 16, 3), (2, 3, 7), (16, 16, 3)] {
            let x = random(&[2, ci, 5, 6, 7], 110, dtype);
            let w = random(&[co, ci, k, k, k], 111, dtype);
            let r = random(&[2, co, 5, 6, 7], 112, dtype);
            let run = |device: &Device| {
                let xv = Var::from_tensor(&x.to_device(device).unwrap()).unwrap();
                let wv = Var::from_tensor(&w.to_device(device).unwrap()).unwrap();
                let y = conv3d(xv.as_tensor(), wv.as_tensor(), None).unwrap();
                grads_of(y, &r, &[&xv, &wv])
            };
            let what = format!("conv3d {dtype:?} ci={ci} co={co} k={k}");
            compare(&run(&gpu), &run(&Device::Cpu), rel, &what);
        }
        let x = random(&[2, 8, 3, 4, 5], 113, dtype);
        let w = random(&[8, 4, 3, 3, 3], 114, dtype);
        let r = random(&[2, 4, 6, 8, 10], 115, dtype);
        let run = |device: &Device| {
            let xv = Var::from_tensor(&x.to_device(device).unwrap()).unwrap();
            let wv = Var::from_tensor(&w.to_device(device).unwrap()).unwrap();
            let y = conv_transpose3d(xv.as_tensor(), wv.as_tensor()).unwrap();
            grads_of(y, &r, &[&xv, &wv])
        };
        let what = format!("conv_transpose3d {dtype:?}");
        compare(&run(&gpu), &run(&Device::Cpu), rel, &what);
    }
}

/// The FFT tiles (`fft.rs`) against the direct tap loops, f32, values and both gradients:
/// kernels 5 and 7, batch 2, uneven sizes that need 1 to 3 tiles per axis with a clipped
/// last tile (30 x 9 x 40 at k = 7 runs blocks of 24 x 16 x 32), few and many channels.
#[test]
fn fft_tiles_equal_direct_with_gradients() {
    for level in SimdLevel::supported() {
        with_simd_limit(level, || fft_tiles_equal_direct(level));
    }
}

/// [`fft_tiles_equal_direct_with_gradients`] with the FFT products at `level` (the
/// direct reference runs at the same level; the tiles test checks it against generic).
fn fft_tiles_equal_direct(level: SimdLevel) {
    for (ci, co, k, size) in [
        (3, 5, 7, [30, 9, 40]),
        (16, 16, 5, [12, 29, 7]),
        (2, 32, 7, [9, 10, 11]),
        (4, 3, 5, [1, 33, 2]),
    ] {
        let [h, wd, d] = size;
        let x = random(&[2, ci, h, wd, d], 110, DType::F32);
        let w = random(&[co, ci, k, k, k], 111, DType::F32);
        let bias = random(&[co], 112, DType::F32);
        let r = random(&[2, co, h, wd, d], 113, DType::F32);
        let run = |conv: Conv| {
            let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
            let y = conv(xv.as_tensor(), wv.as_tensor(), Some(&bias)).unwrap();
            let grads = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
            vec![
                values(&y),
                values(grads.get(&xv).unwrap()),
                values(grads.get(&wv).unwrap()),
            ]
        };
        let (fft, direct) = (run(conv3d_fft), run(conv3d_direct));
        for (n, (f, g)) in fft.iter().zip(&direct).enumerate() {
            let what = format!("{level}: ci={ci} co={co} k={k} size={size:?} output/grad {n}");
            assert_close(f, g, 2e-6, &what);
        }
    }
}

/// The FFT forward with a fused eval-mode BatchNorm + ReLU equals the direct convolution
/// followed by the map; and `MEDRAY_CONV3D` unset means [`Algorithm::Auto`] takes the
/// FFT tiles (the two paths round differently, so the outputs are not bit-equal).
#[test]
fn fft_forward_with_epilogue_and_auto_choice() {
    let x = random(&[1, 8, 14, 27, 9], 120, DType::F32);
    let w = random(&[16, 8, 7, 7, 7], 121, DType::F32);
    let co = 16;
    let epilogue = Epilogue {
        scale: (0..co).map(|o| 0.5 + 0.1 * o as f64).collect(),
        shift: (0..co).map(|o| 0.3 - 0.05 * o as f64).collect(),
        relu: true,
    };
    let direct = values(&conv3d_direct(&x, &w, None).unwrap());
    let vox = 14 * 27 * 9;
    let want: Vec<f64> = direct
        .iter()
        .enumerate()
        .map(|(i, v)| (v * epilogue.scale[i / vox] + epilogue.shift[i / vox]).max(0.0))
        .collect();
    let got = values(&conv3d_fused(&x, &w, &epilogue).unwrap());
    assert_close(&got, &want, 2e-6, "fused FFT forward");
    assert!(want.contains(&0.0), "the ReLU clips something");
    if std::env::var_os("MEDRAY_CONV3D").is_none() {
        // LocalNet's level-0 convolutions: 32 -> 32 gains from FFT, 2 -> 32 does not;
        // kernels of 3 never take it.
        assert!(conv3d_auto_uses_fft(32, 32, 7) && conv3d_auto_uses_fft(8, 16, 7));
        assert!(!conv3d_auto_uses_fft(2, 32, 7) && !conv3d_auto_uses_fft(256, 256, 3));
        assert!(with_conv3d_algorithm(Algorithm::Fft, || {
            conv3d_auto_uses_fft(2, 32, 7)
        }));
        assert!(!with_conv3d_algorithm(Algorithm::Direct, || {
            conv3d_auto_uses_fft(32, 32, 7)
        }));
        let auto = values(&conv3d(&x, &w, None).unwrap());
        let fft = values(&conv3d_fft(&x, &w, None).unwrap());
        assert_eq!(auto, fft, "Auto takes the FFT tiles for k = 7");
        assert_ne!(
            auto, direct,
            "the FFT tiles round differently from the tap loops"
        );
    }
}
