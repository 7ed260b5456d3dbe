//! BatchNorm, optionally followed by a ReLU, as one CPU custom op with a hand-written
//! backward pass.
//!
//! Composed from candle ops, a training-mode BatchNorm + ReLU keeps four full-size
//! intermediates alive for the backward pass (`x - mean`, its square, `x * alpha`, the
//! pre-ReLU sum) and makes about a dozen passes over the volume; the fused op makes two
//! read passes for the statistics and one write pass, and keeps nothing but its input and
//! output, which the graph holds anyway.
//!
//! With a residual `r` (the tail of MONAI's residual block, `relu(bn(x) + r)`), the op also
//! takes `r` and returns its gradient, the masked `g`; composed, that tail keeps two more
//! full-size tensors (`bn(x)` and the sum).
//!
//! With `xhat = (x - mean) * inv_std`, `y = relu?(weight * xhat + bias [+ r])` and `g` the
//! upstream gradient masked by `y > 0` (PyTorch's `threshold_backward` on the result), the
//! backward pass is, per channel over its `N` values,
//!
//! ```text
//! dbias   = Σ g
//! dweight = Σ g · xhat
//! dx      = weight · inv_std · (g - dbias / N - xhat · dweight / N)   (batch statistics)
//! dx      = weight · inv_std · g                                       (running statistics)
//! ```
//!
//! Sums are accumulated in f64, eight lanes at a time, so that f32 volumes of millions of
//! voxels do not drift (PyTorch also accumulates the CPU statistics in a wider type).

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::lanes;
use crate::ops::kernel::{run_cpu, CpuKernel, Float};
use crate::ops::simd::simd_level;

/// Per-channel statistics of a `(B, C, ...)` volume.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ChannelStats {
    /// Mean over everything but the channel axis.
    pub mean: Vec<f64>,
    /// Biased variance (divided by the count).
    pub var: Vec<f64>,
    /// Values per channel.
    pub count: usize,
}

/// The mean and biased variance of every channel of the contiguous CPU tensor `x`
/// `(B, C, ...)`, in two passes (mean, then squared deviations) accumulated in f64.
pub(super) fn channel_stats(x: &Tensor) -> candle_core::Result<ChannelStats> {
    let dims = x.dims();
    if dims.len() < 2 {
        bail!("batch_norm3d: expected (B, C, ...), got {dims:?}");
    }
    let (batch, channels) = (dims[0], dims[1]);
    let per_item: usize = dims[2..].iter().product();
    let (storage, layout) = x.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("batch_norm3d: statistics need a contiguous tensor");
    };
    let (mean, var) = match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => stats_f32(&v[start..end], batch, channels, per_item),
        Storage::Cpu(CpuStorage::F64(v)) => stats(&v[start..end], batch, channels, per_item),
        _ => bail!("batch_norm3d: statistics need an f32 or f64 CPU tensor"),
    };
    Ok(ChannelStats {
        mean,
        var,
        count: batch * per_item,
    })
}

fn stats<T: Float>(data: &[T], batch: usize, channels: usize, n: usize) -> (Vec<f64>, Vec<f64>) {
    let count = (batch * n) as f64;
    let slices = |c: usize| (0..batch).map(move |b| &data[(b * channels + c) * n..][..n]);
    (0..channels)
        .into_par_iter()
        .map(|c| {
            let mean = slices(c).map(|s| sum_lanes(s, |v| v)).sum::<f64>() / count;
            let var = slices(c)
                .map(|s| sum_lanes(s, |v| (v - mean) * (v - mean)))
                .sum::<f64>()
                / count;
            (mean, var)
        })
        .unzip()
}

/// [`stats`] for f32 volumes, with the vectorised sums of `lanes.rs`.
fn stats_f32(data: &[f32], batch: usize, channels: usize, n: usize) -> (Vec<f64>, Vec<f64>) {
    let level = simd_level();
    let count = (batch * n) as f64;
    let slices = |c: usize| (0..batch).map(move |b| &data[(b * channels + c) * n..][..n]);
    (0..channels)
        .into_par_iter()
        .map(|c| {
            let mean = slices(c).map(|s| lanes::sum(level, s)).sum::<f64>() / count;
            let var = slices(c)
                .map(|s| lanes::squared_deviations(level, s, mean as f32))
                .sum::<f64>()
                / count;
            // The deviations were taken from the f32-rounded mean: remove that offset's
            // square, (mean - m32)^2, which the sum of squares gained.
            let offset = mean - f64::from(mean as f32);
            (mean, (var - offset * offset).max(0.0))
        })
        .unzip()
}

/// `Σ f(v)` over `values` in f64, in eight independent lanes (which the compiler can keep
/// in vector registers).
fn sum_lanes<T: Float>(values: &[T], f: impl Fn(f64) -> f64) -> f64 {
    let mut lanes = [0f64; 8];
    let mut chunks = values.chunks_exact(8);
    for chunk in &mut chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane += f(v.to_f64());
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|v| f(v.to_f64())).sum();
    lanes.iter().sum::<f64>() + tail
}

/// Which computation a [`BatchNormKernel`] runs.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Pass {
    /// Arguments `(x, weight, bias)`, or with a residual `(x, [weight; bias] (2, C), r)`:
    /// the normalised (plus residual, rectified) output.
    Forward,
    /// Arguments `(x, grad, y)`: the upstream gradient masked by the ReLU (the residual's
    /// gradient).
    MaskedGrad,
    /// Arguments `(x, grad, y)`: `(2, C)` rows `Σ g` and `Σ g · xhat`.
    GradSums,
    /// Arguments `(x, grad, y)`: the input gradient, given the weight and the two rows of
    /// [`Pass::GradSums`].
    InputGrad {
        weight: Vec<f64>,
        sums: [Vec<f64>; 2],
    },
}

/// The custom op of the fused BatchNorm (see the module docs).
#[derive(Debug, Clone)]
pub(super) struct BatchNormKernel {
    /// Per-channel mean used to normalise.
    pub mean: Vec<f64>,
    /// Per-channel `1 / sqrt(var + eps)`.
    pub inv_std: Vec<f64>,
    /// Whether `mean` and `inv_std` are the input's own statistics (training mode), so that
    /// the input gradient flows through them too.
    pub batch_stats: bool,
    /// Whether a ReLU follows.
    pub relu: bool,
    /// Whether a residual is added before the ReLU (the third argument of the forward pass;
    /// weight and bias then come stacked as the second).
    pub residual: bool,
    /// Which computation this is.
    pub pass: Pass,
}

impl BatchNormKernel {
    fn with_pass(&self, pass: Pass) -> Self {
        Self {
            pass,
            ..self.clone()
        }
    }

    /// `(batch, channels, values per channel per item)` of `x`, checked against the
    /// statistics.
    fn sizes(&self, layout: &Layout) -> candle_core::Result<(usize, usize, usize)> {
        let dims = layout.shape().dims();
        if dims.len() < 2 || dims[1] != self.mean.len() {
            bail!(
                "{}: x {:?} does not have the {} channels of the statistics",
                self.kernel_name(),
                dims,
                self.mean.len()
            );
        }
        Ok((dims[0], dims[1], dims[2..].iter().product()))
    }

    /// The upstream gradient masked by the ReLU.
    fn masked<T: Float>(&self, g: T, y: T) -> f64 {
        if !self.relu || y.to_f64() > 0.0 {
            g.to_f64()
        } else {
            0.0
        }
    }
}

impl CpuKernel for BatchNormKernel {
    fn kernel_name(&self) -> &'static str {
        match self.pass {
            Pass::Forward => "batch_norm3d",
            Pass::MaskedGrad => "batch_norm3d-masked-grad",
            Pass::GradSums => "batch_norm3d-grad-sums",
            Pass::InputGrad { .. } => "batch_norm3d-input-grad",
        }
    }

    fn run<T: Float>(&self, args: &[(&[T], &Layout)]) -> candle_core::Result<(Vec<T>, Shape)> {
        let [(x, lx), (a, _), (b, _)] = args else {
            bail!("{}: expected 3 arguments", self.kernel_name());
        };
        let (_, channels, n) = self.sizes(lx)?;
        if let (Some(x), Some(a), Some(b)) = (T::as_f32(x), T::as_f32(a), T::as_f32(b)) {
            let (out, shape) = self.run_f32(x, a, b, channels, n, lx)?;
            let out = T::from_f32(out).ok_or_else(|| {
                candle_core::Error::Msg(format!("{}: f32 result for f32 input", self.kernel_name()))
            })?;
            return Ok((out, shape));
        }
        let zero = T::default();
        match &self.pass {
            Pass::Forward => {
                // a = weight (C) and b = bias (C); or a = [weight; bias] (2C), b = residual.
                let (weight, bias, residual) = self.forward_params(x, a, b, channels)?;
                let coef: Vec<(f64, f64)> = (0..channels)
                    .map(|c| {
                        let alpha = weight[c].to_f64() * self.inv_std[c];
                        (alpha, bias[c].to_f64() - self.mean[c] * alpha)
                    })
                    .collect();
                let mut out = vec![zero; x.len()];
                out.par_chunks_mut(n)
                    .zip(x.par_chunks(n))
                    .enumerate()
                    .for_each(|(i, (dst, src))| {
                        let (alpha, beta) = coef[i % channels];
                        let r = residual.map(|r| &r[i * n..(i + 1) * n]);
                        for (j, (d, &v)) in dst.iter_mut().zip(src).enumerate() {
                            let mut y = v.to_f64() * alpha + beta;
                            if let Some(r) = r {
                                y += r[j].to_f64();
                            }
                            let y = T::from_f64(y);
                            // `y < 0`, not `!(y > 0)`: a NaN stays NaN, as in PyTorch.
                            *d = if self.relu && y < zero { zero } else { y };
                        }
                    });
                Ok((out, lx.shape().clone()))
            }
            Pass::MaskedGrad => {
                // a = grad, b = y.
                let out = a
                    .par_iter()
                    .zip(b.par_iter())
                    .map(|(g, y)| T::from_f64(self.masked(*g, *y)))
                    .collect();
                Ok((out, lx.shape().clone()))
            }
            Pass::GradSums => {
                // a = grad, b = y; both shaped like x.
                let batch = x.len() / (channels * n).max(1);
                let rows: Vec<(f64, f64)> = (0..channels)
                    .into_par_iter()
                    .map(|c| {
                        let (mean, inv_std) = (self.mean[c], self.inv_std[c]);
                        let mut s0 = 0.0;
                        let mut s1 = 0.0;
                        for item in 0..batch {
                            let at = (item * channels + c) * n;
                            let (x, g, y) = (&x[at..at + n], &a[at..at + n], &b[at..at + n]);
                            let mut l0 = [0f64; 8];
                            let mut l1 = [0f64; 8];
                            for (j, ((xv, gv), yv)) in x.iter().zip(g).zip(y).enumerate() {
                                let g = self.masked(*gv, *yv);
                                l0[j % 8] += g;
                                l1[j % 8] += g * (xv.to_f64() - mean);
                            }
                            s0 += l0.iter().sum::<f64>();
                            s1 += l1.iter().sum::<f64>() * inv_std;
                        }
                        (s0, s1)
                    })
                    .collect();
                let mut out: Vec<T> = rows.iter().map(|r| T::from_f64(r.0)).collect();
                out.extend(rows.iter().map(|r| T::from_f64(r.1)));
                Ok((out, Shape::from((2, channels))))
            }
            Pass::InputGrad { weight, sums } => {
                let count = (x.len() / channels.max(1)) as f64;
                // dx = k·g + c2·(x - mean), with c2 = 0 for running statistics.
                let coef: Vec<(f64, f64, f64)> = (0..channels)
                    .map(|c| {
                        let k = weight[c] * self.inv_std[c];
                        if !self.batch_stats {
                            return (k, 0.0, 0.0);
                        }
                        let c2 = -k * self.inv_std[c] * sums[1][c] / count;
                        (k, c2, -k * sums[0][c] / count)
                    })
                    .collect();
                let mut out = vec![zero; x.len()];
                out.par_chunks_mut(n).enumerate().for_each(|(i, dst)| {
                    let c = i % channels;
                    let (k, c2, c0) = coef[c];
                    let mean = self.mean[c];
                    let at = i * n;
                    let (x, g, y) = (&x[at..at + n], &a[at..at + n], &b[at..at + n]);
                    for (((d, xv), gv), yv) in dst.iter_mut().zip(x).zip(g).zip(y) {
                        let g = self.masked(*gv, *yv);
                        *d = T::from_f64(k * g + c2 * (xv.to_f64() - mean) + c0);
                    }
                });
                Ok((out, lx.shape().clone()))
            }
        }
    }
}

/// The forward pass's weight, bias and optional residual.
type ForwardParams<'a, T> = (&'a [T], &'a [T], Option<&'a [T]>);

impl BatchNormKernel {
    /// [`CpuKernel::run`] for f32 tensors, with the vectorised loops of `lanes.rs`.
    fn run_f32(
        &self,
        x: &[f32],
        a: &[f32],
        b: &[f32],
        channels: usize,
        n: usize,
        lx: &Layout,
    ) -> candle_core::Result<(Vec<f32>, Shape)> {
        let level = simd_level();
        let relu = self.relu;
        let n = n.max(1);
        match &self.pass {
            Pass::Forward => {
                let (weight, bias, residual) = self.forward_params(x, a, b, channels)?;
                let coef: Vec<(f32, f32)> = (0..channels)
                    .map(|c| {
                        let alpha = f64::from(weight[c]) * self.inv_std[c];
                        (
                            alpha as f32,
                            (f64::from(bias[c]) - self.mean[c] * alpha) as f32,
                        )
                    })
                    .collect();
                let mut out = vec![0f32; x.len()];
                out.par_chunks_mut(n)
                    .zip(x.par_chunks(n))
                    .enumerate()
                    .for_each(|(i, (dst, src))| {
                        let (alpha, beta) = coef[i % channels];
                        let r = residual.map(|r| &r[i * n..(i + 1) * n]);
                        lanes::affine(level, src, r, dst, alpha, beta, relu);
                    });
                Ok((out, lx.shape().clone()))
            }
            Pass::MaskedGrad => {
                let mut out = vec![0f32; x.len()];
                out.par_chunks_mut(n)
                    .zip(a.par_chunks(n).zip(b.par_chunks(n)))
                    .for_each(|(dst, (g, y))| lanes::mask(level, g, y, dst, relu));
                Ok((out, lx.shape().clone()))
            }
            Pass::GradSums => {
                let batch = x.len() / (channels * n);
                let rows: Vec<(f64, f64)> = (0..channels)
                    .into_par_iter()
                    .map(|c| {
                        let (mut s0, mut s1) = (0.0, 0.0);
                        // Deviations from the f32-rounded mean: Σ g' (x - m) = t1 - (m - m32) t0.
                        let mean = self.mean[c] as f32;
                        let offset = self.mean[c] - f64::from(mean);
                        for item in 0..batch {
                            let at = (item * channels + c) * n;
                            let r = at..at + n;
                            let (t0, t1) = lanes::grad_sums(
                                level,
                                &x[r.clone()],
                                &a[r.clone()],
                                &b[r],
                                mean,
                                relu,
                            );
                            s0 += t0;
                            s1 += t1 - offset * t0;
                        }
                        (s0, s1 * self.inv_std[c])
                    })
                    .collect();
                let mut out: Vec<f32> = rows.iter().map(|r| r.0 as f32).collect();
                out.extend(rows.iter().map(|r| r.1 as f32));
                Ok((out, Shape::from((2, channels))))
            }
            Pass::InputGrad { weight, sums } => {
                let count = (x.len() / channels.max(1)) as f64;
                let coef: Vec<lanes::InputGradCoef> = (0..channels)
                    .map(|c| {
                        let k = weight[c] * self.inv_std[c];
                        let (c2, c0) = if self.batch_stats {
                            (
                                -k * self.inv_std[c] * sums[1][c] / count,
                                -k * sums[0][c] / count,
                            )
                        } else {
                            (0.0, 0.0)
                        };
                        // Deviations are taken from the f32-rounded mean m32:
                        // c2 (x - m) + c0 = c2 (x - m32) + c0 - c2 (m - m32).
                        let mean = self.mean[c] as f32;
                        let offset = self.mean[c] - f64::from(mean);
                        lanes::InputGradCoef {
                            k: k as f32,
                            c2: c2 as f32,
                            c0: (c0 - c2 * offset) as f32,
                            mean,
                        }
                    })
                    .collect();
                let mut out = vec![0f32; x.len()];
                out.par_chunks_mut(n).enumerate().for_each(|(i, dst)| {
                    let at = i * n;
                    let r = at..at + n;
                    lanes::input_grad(
                        level,
                        &x[r.clone()],
                        &a[r.clone()],
                        &b[r],
                        dst,
                        coef[i % channels],
                        relu,
                    );
                });
                Ok((out, lx.shape().clone()))
            }
        }
    }

    /// The forward pass's `(weight, bias, residual)` from its arguments: `(x, weight, bias)`,
    /// or with a residual `(x, [weight; bias], residual)`.
    fn forward_params<'a, T>(
        &self,
        x: &[T],
        a: &'a [T],
        b: &'a [T],
        channels: usize,
    ) -> candle_core::Result<ForwardParams<'a, T>> {
        if self.residual {
            if a.len() != 2 * channels || b.len() != x.len() {
                bail!(
                    "{}: expected [weight; bias] of 2 x {channels} and a residual shaped like x",
                    self.kernel_name()
                );
            }
            return Ok((&a[..channels], &a[channels..], Some(b)));
        }
        if a.len() != channels || b.len() != channels {
            bail!(
                "{}: weight and bias must have {channels} values",
                self.kernel_name()
            );
        }
        Ok((a, b, None))
    }
}

impl CustomOp3 for BatchNormKernel {
    fn name(&self) -> &'static str {
        self.kernel_name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        run_cpu(self, &[(s1, l1), (s2, l2), (s3, l3)])
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        third: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.pass != Pass::Forward {
            bail!("{}: no second-order gradient", self.kernel_name());
        }
        // Without a residual: (x, weight, bias). With one: (x, [weight; bias], residual).
        let params_tracked = params.track_op() || (!self.residual && third.track_op());
        if !(x.track_op() || params_tracked || (self.residual && third.track_op())) {
            return Ok((None, None, None));
        }
        let grad = grad.contiguous()?;
        let sums = x.apply_op3_no_bwd(&grad, y, &self.with_pass(Pass::GradSums))?;
        let dx = if x.track_op() {
            let rows = sums.to_dtype(DType::F64)?.to_vec2::<f64>()?;
            let [s0, s1]: [Vec<f64>; 2] = rows
                .try_into()
                .map_err(|_| candle_core::Error::Msg("batch_norm3d: sums are not 2 rows".into()))?;
            let weight = if self.residual {
                params.get(0)?
            } else {
                params.clone()
            };
            let pass = Pass::InputGrad {
                weight: weight.to_dtype(DType::F64)?.to_vec1::<f64>()?,
                sums: [s0, s1],
            };
            Some(x.apply_op3_no_bwd(&grad, y, &self.with_pass(pass))?)
        } else {
            None
        };
        let (dweight, dbias) = (sums.get(1)?, sums.get(0)?);
        if self.residual {
            let dparams = params
                .track_op()
                .then(|| Tensor::stack(&[&dweight, &dbias], 0))
                .transpose()?;
            let dresidual = third
                .track_op()
                .then(|| x.apply_op3_no_bwd(&grad, y, &self.with_pass(Pass::MaskedGrad)))
                .transpose()?;
            return Ok((dx, dparams, dresidual));
        }
        Ok((
            dx,
            params.track_op().then_some(dweight),
            third.track_op().then_some(dbias),
        ))
    }
}
