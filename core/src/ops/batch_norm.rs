//! 3D batch normalisation, as `torch.nn.BatchNorm3d` (eps, affine) used in every conv block
//! of MONAI's LocalNet (`monai/networks/blocks/regunet_block.py`, `ADN` with norm "BATCH").
//!
//! Training mode normalises with the batch statistics over (B, H, W, D) and the biased
//! variance; it also returns the mean and the unbiased variance (detached) so that the
//! caller can update the running statistics (`running = 0.9 running + 0.1 stat`). Eval mode
//! uses the running statistics. Both follow PyTorch's CPU transform
//! (`aten/src/ATen/native/cpu/batch_norm_kernel.cpp`): `alpha = weight / sqrt(var + eps)`,
//! `beta = bias - mean * alpha`, `out = x * alpha + beta`.
//!
//! Sums are taken one spatial axis at a time (D, then W, then H, then B), so that each f32
//! accumulation runs over at most ~100 terms: PyTorch accumulates in f64 on the CPU, and a
//! single f32 running sum over a million voxels would drift.

use candle_core::{bail, Result, Tensor};

use crate::ops::kernel::has_fast_path;

mod fused;
mod lanes;

/// What [`batch_norm3d_train`] returns.
#[derive(Debug, Clone)]
pub struct BatchNormStats {
    /// The normalised, scaled and shifted input, (B, C, H, W, D); differentiable w.r.t.
    /// the input, the weight and the bias.
    pub output: Tensor,
    /// Per-channel batch mean, (C,), detached.
    pub mean: Tensor,
    /// Per-channel unbiased batch variance (divided by n - 1), (C,), detached.
    pub var_unbiased: Tensor,
}

/// Batch norm in training mode: normalises `x` (B, C, H, W, D) with its own per-channel
/// mean and biased variance, then applies `weight` and `bias` (each (C,)).
///
/// Fails when a channel has fewer than 2 values (PyTorch raises "Expected more than 1
/// value per channel when training").
pub fn batch_norm3d_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<BatchNormStats> {
    train(x, weight, bias, eps, false)
}

/// [`batch_norm3d_train`] followed by a ReLU, in one op on the CPU (see `fused.rs`): the
/// `conv -> BatchNorm -> ReLU` tail of every LocalNet block.
pub fn batch_norm_relu3d_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<BatchNormStats> {
    train(x, weight, bias, eps, true)
}

/// `ReLU(batch_norm3d_train(x) + residual)`, in one op on the CPU: the tail of MONAI's
/// residual block. `residual` has the shape of `x` and receives its gradient.
pub fn batch_norm_add_relu3d_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: &Tensor,
    eps: f64,
) -> Result<BatchNormStats> {
    if residual.dims() != x.dims() {
        bail!(
            "batch_norm_add_relu3d_train: residual {:?} must have the shape of x {:?}",
            residual.dims(),
            x.dims()
        );
    }
    if !has_fast_path(&[x, weight, bias, residual]) {
        let stats = batch_norm3d_train_generic(x, weight, bias, eps, false)?;
        return Ok(BatchNormStats {
            output: (stats.output + residual)?.relu()?,
            ..stats
        });
    }
    let (_, c, _, _, _) = x.dims5()?;
    check_channel_param("weight", weight, c)?;
    check_channel_param("bias", bias, c)?;
    let params = Tensor::stack(&[weight, bias], 0)?;
    fused_train(x, &params, &residual.contiguous()?, eps, true, true)
}

/// Batch norm in eval mode: normalises `x` (B, C, H, W, D) with `running_mean` and
/// `running_var` (each (C,)), then applies `weight` and `bias`.
pub fn batch_norm3d_eval(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    eval(x, weight, bias, running_mean, running_var, eps, false)
}

/// [`batch_norm3d_eval`] followed by a ReLU, in one op on the CPU.
pub fn batch_norm_relu3d_eval(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    eval(x, weight, bias, running_mean, running_var, eps, true)
}

/// Training-mode batch norm (and ReLU with `relu`) composed from candle ops, for every
/// device; CPU f32/f64 tensors take the fused op instead. Public so that tests can compare
/// the two.
pub fn batch_norm3d_train_generic(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<BatchNormStats> {
    let (b, c, h, w, d) = x.dims5()?;
    check_channel_param("weight", weight, c)?;
    check_channel_param("bias", bias, c)?;
    let count = check_count(b * h * w * d)?;
    let mean = channel_mean(x)?; // (1, C, 1, 1, 1)
    let centered = x.broadcast_sub(&mean)?;
    let var = channel_mean(&centered.sqr()?)?;
    let output = normalise(x, weight, bias, &mean, &var, eps)?;
    let output = if relu { output.relu()? } else { output };
    let var_unbiased = var.affine(count as f64 / (count - 1) as f64, 0.0)?;
    Ok(BatchNormStats {
        output,
        mean: mean.flatten_all()?.detach(),
        var_unbiased: var_unbiased.flatten_all()?.detach(),
    })
}

fn check_count(count: usize) -> Result<usize> {
    if count < 2 {
        bail!("batch_norm3d_train: expected more than 1 value per channel, got {count}")
    }
    Ok(count)
}

fn train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<BatchNormStats> {
    if !has_fast_path(&[x, weight, bias]) {
        return batch_norm3d_train_generic(x, weight, bias, eps, relu);
    }
    let c = x.dims5()?.1;
    check_channel_param("weight", weight, c)?;
    check_channel_param("bias", bias, c)?;
    fused_train(
        x,
        &weight.contiguous()?,
        &bias.contiguous()?,
        eps,
        relu,
        false,
    )
}

/// The fused op in training mode on checked arguments: `(x, weight, bias)`, or with
/// `residual` `(x, [weight; bias] (2, C), residual)`.
fn fused_train(
    x: &Tensor,
    second: &Tensor,
    third: &Tensor,
    eps: f64,
    relu: bool,
    residual: bool,
) -> Result<BatchNormStats> {
    let (b, _, h, w, d) = x.dims5()?;
    let count = check_count(b * h * w * d)?;
    let x = x.contiguous()?;
    let stats = fused::channel_stats(&x)?;
    let kernel = fused::BatchNormKernel {
        inv_std: stats.var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect(),
        mean: stats.mean.clone(),
        batch_stats: true,
        relu,
        residual,
        pass: fused::Pass::Forward,
    };
    let output = x.apply_op3(second, third, kernel)?;
    let unbias = count as f64 / (count - 1) as f64;
    let var_unbiased: Vec<f64> = stats.var.iter().map(|v| v * unbias).collect();
    let channel_tensor = |v: &[f64]| Tensor::new(v, x.device())?.to_dtype(x.dtype());
    Ok(BatchNormStats {
        output,
        mean: channel_tensor(&stats.mean)?,
        var_unbiased: channel_tensor(&var_unbiased)?,
    })
}

fn eval(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<Tensor> {
    let c = x.dims5()?.1;
    check_channel_param("weight", weight, c)?;
    check_channel_param("bias", bias, c)?;
    check_channel_param("running_mean", running_mean, c)?;
    check_channel_param("running_var", running_var, c)?;
    if has_fast_path(&[x, weight, bias, running_mean, running_var]) {
        let values = |t: &Tensor| t.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>();
        let kernel = fused::BatchNormKernel {
            mean: values(running_mean)?,
            inv_std: values(running_var)?
                .iter()
                .map(|v| 1.0 / (v + eps).sqrt())
                .collect(),
            batch_stats: false,
            relu,
            residual: false,
            pass: fused::Pass::Forward,
        };
        return x
            .contiguous()?
            .apply_op3(&weight.contiguous()?, &bias.contiguous()?, kernel);
    }
    let as_channels = |t: &Tensor| t.reshape((1, c, 1, 1, 1));
    let y = normalise(
        x,
        weight,
        bias,
        &as_channels(running_mean)?,
        &as_channels(running_var)?,
        eps,
    )?;
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// `x * alpha + beta` with `alpha = weight / sqrt(var + eps)`, `beta = bias - mean * alpha`;
/// `mean` and `var` are (1, C, 1, 1, 1).
fn normalise(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let c = x.dims5()?.1;
    let inv_std = var.affine(1.0, eps)?.sqrt()?.recip()?;
    let alpha = inv_std.broadcast_mul(&weight.reshape((1, c, 1, 1, 1))?)?;
    let beta = bias.reshape((1, c, 1, 1, 1))?.sub(&mean.mul(&alpha)?)?;
    x.broadcast_mul(&alpha)?.broadcast_add(&beta)
}

/// Per-channel mean over (B, H, W, D), shaped (1, C, 1, 1, 1), summed axis by axis.
fn channel_mean(x: &Tensor) -> Result<Tensor> {
    let (b, _, h, w, d) = x.dims5()?;
    let sum = x
        .sum_keepdim(4)?
        .sum_keepdim(3)?
        .sum_keepdim(2)?
        .sum_keepdim(0)?;
    sum.affine(1.0 / (b * h * w * d) as f64, 0.0)
}

fn check_channel_param(name: &str, t: &Tensor, channels: usize) -> Result<()> {
    if t.dims() != [channels] {
        bail!(
            "batch_norm3d: {name} must have shape ({channels},), got {:?}",
            t.dims()
        )
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)
mod tests {
    use super::*;
    use crate::ops::grad_check::{check_grad, smooth_tensor, value_at};
    use candle_core::{DType, Device};

    const SHAPE: [usize; 5] = [2, 3, 2, 3, 4];

    /// Naive f64 reference written from the PyTorch docs: per channel, mean and biased
    /// variance over all (b, i, j, k), `(x - mean) / sqrt(var + eps) * w + b`.
    fn naive(x: &Tensor, w: &[f64], bias: &[f64], eps: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let [b, c, h, wd, d] = SHAPE;
        let n = (b * h * wd * d) as f64;
        let mut means = vec![];
        let mut vars = vec![];
        let mut out = vec![0.0; x.elem_count()];
        for ch in 0..c {
            let mut vals = vec![];
            for bi in 0..b {
                for i in 0..h {
                    for j in 0..wd {
                        for k in 0..d {
                            vals.push(((bi, i, j, k), value_at(x, [bi, ch, i, j, k])));
                        }
                    }
                }
            }
            let mean = vals.iter().map(|v| v.1).sum::<f64>() / n;
            let var = vals.iter().map(|v| (v.1 - mean).powi(2)).sum::<f64>() / n;
            for ((bi, i, j, k), v) in vals {
                let flat = (((bi * c + ch) * h + i) * wd + j) * d + k;
                out[flat] = (v - mean) / (var + eps).sqrt() * w[ch] + bias[ch];
            }
            means.push(mean);
            vars.push(var * n / (n - 1.0));
        }
        (out, means, vars)
    }

    fn params() -> (Tensor, Tensor) {
        let w = Tensor::new(&[1.2f64, 0.7, -0.4], &Device::Cpu).unwrap();
        let b = Tensor::new(&[0.1f64, -0.3, 0.5], &Device::Cpu).unwrap();
        (w, b)
    }

    #[test]
    fn train_matches_naive_reference_with_unbiased_var() {
        let x = smooth_tensor(&SHAPE, 0.2);
        let (w, b) = params();
        let stats = batch_norm3d_train(&x, &w, &b, 1e-5).unwrap();
        let (out, means, vars) = naive(&x, &[1.2, 0.7, -0.4], &[0.1, -0.3, 0.5], 1e-5);
        let got: Vec<f64> = stats.output.flatten_all().unwrap().to_vec1().unwrap();
        for (g, r) in got.iter().zip(&out) {
            assert!((g - r).abs() < 1e-12, "{g} vs {r}");
        }
        let got_means: Vec<f64> = stats.mean.to_vec1().unwrap();
        let got_vars: Vec<f64> = stats.var_unbiased.to_vec1().unwrap();
        for c in 0..3 {
            assert!((got_means[c] - means[c]).abs() < 1e-13);
            assert!((got_vars[c] - vars[c]).abs() < 1e-13, "var must use n - 1");
        }
    }

    #[test]
    fn eval_uses_running_stats() {
        let x = smooth_tensor(&SHAPE, 0.5);
        let (w, b) = params();
        let rm = Tensor::new(&[0.2f64, -0.1, 0.0], &Device::Cpu).unwrap();
        let rv = Tensor::new(&[1.5f64, 0.5, 2.0], &Device::Cpu).unwrap();
        let y = batch_norm3d_eval(&x, &w, &b, &rm, &rv, 1e-5).unwrap();
        let (wv, bv, mv, vv) = (
            [1.2, 0.7, -0.4],
            [0.1, -0.3, 0.5],
            [0.2, -0.1, 0.0],
            [1.5, 0.5, 2.0],
        );
        for idx in [[0, 0, 1, 2, 3], [1, 2, 0, 1, 0], [1, 1, 1, 0, 2]] {
            let c = idx[1];
            let want = (value_at(&x, idx) - mv[c]) / (vv[c] + 1e-5f64).sqrt() * wv[c] + bv[c];
            assert!((value_at(&y, idx) - want).abs() < 1e-13);
        }
    }

    #[test]
    fn f32_stats_are_accurate_on_large_volumes() {
        // A 1-channel 64^3 volume with a large offset: an f32 running sum would drift.
        let x = (smooth_tensor(&[1, 1, 64, 64, 64], 0.0) + 100.0).unwrap();
        let (w, b) = (
            Tensor::new(&[1f32], &Device::Cpu).unwrap(),
            Tensor::new(&[0f32], &Device::Cpu).unwrap(),
        );
        let stats = batch_norm3d_train(&x.to_dtype(DType::F32).unwrap(), &w, &b, 1e-5).unwrap();
        let mean64 = x.mean_all().unwrap().to_scalar::<f64>().unwrap();
        let mean32 = stats.mean.to_vec1::<f32>().unwrap()[0] as f64;
        assert!((mean32 - mean64).abs() < 1e-4, "{mean32} vs {mean64}");
    }

    #[test]
    fn train_gradients_match_finite_differences_with_and_without_relu() {
        let x = smooth_tensor(&[2, 2, 2, 2, 3], 0.2);
        let w = Tensor::new(&[1.2f64, -0.6], &Device::Cpu).unwrap();
        let b = Tensor::new(&[0.1f64, 0.4], &Device::Cpu).unwrap();
        for train in [batch_norm3d_train, batch_norm_relu3d_train] {
            let f = |a: &[Tensor]| Ok(train(&a[0], &a[1], &a[2], 1e-5)?.output);
            let inputs = [x.clone(), w.clone(), b.clone()];
            for wrt in 0..3 {
                check_grad(&f, &inputs, wrt, 1e-6, 1e-6);
            }
        }
    }

    #[test]
    fn eval_gradients_match_finite_differences_with_and_without_relu() {
        let x = smooth_tensor(&[2, 2, 2, 2, 3], 0.7);
        let w = Tensor::new(&[0.9f64, -1.3], &Device::Cpu).unwrap();
        let b = Tensor::new(&[-0.2f64, 0.3], &Device::Cpu).unwrap();
        let rm = Tensor::new(&[0.1f64, -0.2], &Device::Cpu).unwrap();
        let rv = Tensor::new(&[0.8f64, 1.7], &Device::Cpu).unwrap();
        for relu in [false, true] {
            let f = |a: &[Tensor]| {
                let eval = if relu {
                    batch_norm_relu3d_eval
                } else {
                    batch_norm3d_eval
                };
                eval(&a[0], &a[1], &a[2], &rm, &rv, 1e-5)
            };
            let inputs = [x.clone(), w.clone(), b.clone()];
            for wrt in 0..3 {
                check_grad(&f, &inputs, wrt, 1e-6, 1e-6);
            }
        }
    }

    /// The fused CPU op against the composition of candle ops, in f32 on a LocalNet-like
    /// volume, at every SIMD level: outputs, statistics and all gradients, without a tail,
    /// with a ReLU and with a residual plus ReLU.
    #[test]
    fn fused_matches_the_composed_ops_in_f32() {
        let shape = [1, 4, 12, 10, 8];
        let x = smooth_tensor(&shape, 0.3)
            .affine(3.0, 0.5)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let x = candle_core::Var::from_tensor(&x).unwrap();
        let w = candle_core::Var::new(&[1.1f32, -0.5, 0.8, 2.0], &Device::Cpu).unwrap();
        let b = candle_core::Var::new(&[0.2f32, 0.1, -0.3, 0.0], &Device::Cpu).unwrap();
        let probe = smooth_tensor(&shape, 1.1).to_dtype(DType::F32).unwrap();
        // Relative to the largest magnitude: the composed ops sum in f32, the fused op in
        // f64, so sums over a channel differ in their last f32 digits.
        let max_abs = |t: &Tensor| {
            let t = t.abs().unwrap().flatten_all().unwrap();
            t.max(0).unwrap().to_scalar::<f32>().unwrap()
        };
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let diff = max_abs(&(a - b).unwrap());
            let scale = max_abs(b).max(1.0);
            assert!(
                diff < 2e-6 * scale,
                "{what}: max difference {diff} (scale {scale})"
            );
        };
        let r = candle_core::Var::from_tensor(
            &smooth_tensor(&shape, 0.7).to_dtype(DType::F32).unwrap(),
        )
        .unwrap();
        // Every SIMD level this machine has runs the fused op's f32 loops.
        for level in crate::ops::simd::SimdLevel::supported() {
            crate::ops::simd::with_simd_limit(level, || {
                for tail in ["none", "relu", "add-relu"] {
                    let (fused, composed) = match tail {
                        "none" => (
                            batch_norm3d_train(&x, &w, &b, 1e-5).unwrap(),
                            batch_norm3d_train_generic(&x, &w, &b, 1e-5, false).unwrap(),
                        ),
                        "relu" => (
                            batch_norm_relu3d_train(&x, &w, &b, 1e-5).unwrap(),
                            batch_norm3d_train_generic(&x, &w, &b, 1e-5, true).unwrap(),
                        ),
                        _ => {
                            let plain = batch_norm3d_train_generic(&x, &w, &b, 1e-5, false);
                            let plain = plain.unwrap();
                            let output = (&plain.output + r.as_tensor()).unwrap().relu().unwrap();
                            (
                                batch_norm_add_relu3d_train(&x, &w, &b, &r, 1e-5).unwrap(),
                                BatchNormStats { output, ..plain },
                            )
                        }
                    };
                    let what = |name: &str| format!("{level} {tail} {name}");
                    close(&fused.output, &composed.output, &what("output"));
                    close(&fused.mean, &composed.mean, &what("mean"));
                    close(&fused.var_unbiased, &composed.var_unbiased, &what("var"));
                    let loss = |y: &Tensor| (y * &probe).unwrap().sum_all().unwrap();
                    let gf = loss(&fused.output).backward().unwrap();
                    let gc = loss(&composed.output).backward().unwrap();
                    let mut wrt = vec![("dx", x.as_tensor()), ("dw", &w), ("db", &b)];
                    if tail == "add-relu" {
                        wrt.push(("dr", r.as_tensor()));
                    }
                    for (name, v) in wrt {
                        close(gf.get(v).unwrap(), gc.get(v).unwrap(), &what(name));
                    }
                }
            });
        }
    }

    #[test]
    fn relu_keeps_nan_like_pytorch() {
        let x = Tensor::new(&[1f32, f32::NAN, -1.0], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 3, 1, 1))
            .unwrap();
        let one = Tensor::new(&[1f32], &Device::Cpu).unwrap();
        let zero = Tensor::new(&[0f32], &Device::Cpu).unwrap();
        let y = batch_norm_relu3d_eval(&x, &one, &zero, &zero, &one, 0.0).unwrap();
        let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(y[0], 1.0);
        assert!(y[1].is_nan());
        assert_eq!(y[2], 0.0);
    }

    #[test]
    fn add_relu_train_gradients_match_finite_differences() {
        let x = smooth_tensor(&[2, 2, 2, 2, 3], 0.2);
        let w = Tensor::new(&[1.2f64, -0.6], &Device::Cpu).unwrap();
        let b = Tensor::new(&[0.1f64, 0.4], &Device::Cpu).unwrap();
        let r = smooth_tensor(&[2, 2, 2, 2, 3], 1.7);
        let f = |a: &[Tensor]| {
            Ok(batch_norm_add_relu3d_train(&a[0], &a[1], &a[2], &a[3], 1e-5)?.output)
        };
        let inputs = [x.clone(), w.clone(), b.clone(), r.clone()];
        for wrt in 0..4 {
            check_grad(&f, &inputs, wrt, 1e-6, 1e-6);
        }
        // The same values as the composition, and the residual's shape is checked.
        let fused = batch_norm_add_relu3d_train(&x, &w, &b, &r, 1e-5).unwrap();
        let composed = (batch_norm3d_train_generic(&x, &w, &b, 1e-5, false)
            .unwrap()
            .output
            + &r)
            .unwrap()
            .relu()
            .unwrap();
        let diff = (fused.output - composed)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(diff < 1e-12, "{diff}");
        let short = smooth_tensor(&[2, 2, 2, 2, 2], 0.0);
        let err = batch_norm_add_relu3d_train(&x, &w, &b, &short, 1e-5)
            .unwrap_err()
            .to_string();
        assert!(err.contains("residual"), "{err}");
    }

    #[test]
    fn rejects_bad_parameter_shapes() {
        let x = smooth_tensor(&SHAPE, 0.0);
        let (w, _) = params();
        let short = Tensor::new(&[0f64, 0.0], &Device::Cpu).unwrap();
        assert!(batch_norm3d_train(&x, &w, &short, 1e-5).is_err());
    }
}
