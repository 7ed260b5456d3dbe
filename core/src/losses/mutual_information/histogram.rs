//! The Gaussian Parzen histograms of [`super::GlobalMutualInformationLoss`] as one CPU
//! custom op, multi-threaded over samples, with a hand-written backward pass.
//!
//! For each batch item, with `N` samples, Gaussian weights
//! `wa[n, j] = exp(-t (x_n - c_j)²) / Σ_m exp(-t (x_n - c_m)²)` of `x = clamp(pred, 0, 1)`
//! (and `wb` of the target), the op returns the row
//!
//! ```text
//! [ pa (nb) | pb (nb) | pab (nb x nb, row-major) ]
//! pa_j = Σ_n wa[n, j] / N     pb_k = Σ_n wb[n, k] / N     pab_jk = Σ_n wa[n, j] wb[n, k] / N
//! ```
//!
//! accumulated in f64 over per-thread partial sums and rounded once to the input dtype;
//! the `(N, nb)` weight matrices are never stored. The MI formula on these `nb x nb` values
//! stays in candle ops (autograd gives their gradient). The backward pass recomputes the
//! weights per sample: with upstream gradients `Ga`, `Gb`, `Gab`,
//!
//! ```text
//! dL/dwa[n, j] = (Ga_j + Σ_k Gab_jk wb[n, k]) / N
//! dL/dx_n      = Σ_m (dL/dwa[n, m] - Σ_j dL/dwa[n, j] wa[n, j]) wa[n, m] (-2 t (x_n - c_m))
//! ```
//!
//! times PyTorch's clamp gradient (1 where `0 <= pred <= 1`), and the same for the target.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::ops::kernel::{run_cpu, CpuKernel, Float};

/// Samples per rayon task.
const SAMPLES_PER_TASK: usize = 4096;

/// The custom op: arguments `(pred, target)`, both `(B, ...)` of the same shape, f32 or f64.
#[derive(Debug, Clone)]
pub(super) struct GaussianHistograms {
    /// Bin centres (MONAI's f32 values, widened).
    pub centers: Vec<f64>,
    /// `1 / (2σ²)` (MONAI's f32 value, widened).
    pub preterm: f64,
}

impl GaussianHistograms {
    fn bins(&self) -> usize {
        self.centers.len()
    }

    /// Writes the normalised Gaussian weights of sample `v` (clamped to [0, 1]) to `w`.
    fn window(&self, v: f64, w: &mut [f64]) {
        let x = v.clamp(0.0, 1.0);
        let mut sum = 0.0;
        for (wj, c) in w.iter_mut().zip(&self.centers) {
            let d = x - c;
            *wj = (-self.preterm * d * d).exp();
            sum += *wj;
        }
        for wj in w.iter_mut() {
            *wj /= sum;
        }
    }

    /// `dL/dx` of one sample from `dL/dw` (`gw`) and its weights `w`; 0 outside the clamp.
    fn window_grad(&self, v: f64, w: &[f64], gw: &[f64]) -> f64 {
        if !(0.0..=1.0).contains(&v) {
            return 0.0;
        }
        let dot: f64 = gw.iter().zip(w).map(|(g, w)| g * w).sum();
        gw.iter()
            .zip(w)
            .zip(&self.centers)
            .map(|((g, w), c)| (g - dot) * w * (-2.0 * self.preterm * (v - c)))
            .sum()
    }

    /// `[pa | pb | pab]` of one batch item, in f64.
    fn histograms<T: Float>(&self, pred: &[T], target: &[T]) -> Vec<f64> {
        let nb = self.bins();
        let n = pred.len();
        let sums = pred
            .par_chunks(SAMPLES_PER_TASK)
            .zip(target.par_chunks(SAMPLES_PER_TASK))
            .map(|(p, t)| {
                let mut acc = vec![0.0; nb * (nb + 2)];
                let (mut wa, mut wb) = (vec![0.0; nb], vec![0.0; nb]);
                for (&a, &b) in p.iter().zip(t) {
                    self.window(a.to_f64(), &mut wa);
                    self.window(b.to_f64(), &mut wb);
                    let (marg, joint) = acc.split_at_mut(2 * nb);
                    for j in 0..nb {
                        marg[j] += wa[j];
                        marg[nb + j] += wb[j];
                    }
                    for (row, &aj) in joint.chunks_exact_mut(nb).zip(&wa) {
                        for (r, &bk) in row.iter_mut().zip(&wb) {
                            *r += aj * bk;
                        }
                    }
                }
                acc
            })
            .reduce(
                || vec![0.0; nb * (nb + 2)],
                |mut x, y| {
                    for (a, b) in x.iter_mut().zip(y) {
                        *a += b;
                    }
                    x
                },
            );
        sums.into_iter().map(|s| s / n as f64).collect()
    }

    /// Gradients of pred and target of one batch item from the upstream `[Ga | Gb | Gab]`.
    fn backward<T: Float>(
        &self,
        pred: &[T],
        target: &[T],
        grad: &[f64],
        dpred: &mut [T],
        dtarget: &mut [T],
    ) {
        let nb = self.bins();
        let scale = 1.0 / pred.len() as f64;
        let (ga, rest) = grad.split_at(nb);
        let (gb, gab) = rest.split_at(nb);
        pred.par_chunks(SAMPLES_PER_TASK)
            .zip(target.par_chunks(SAMPLES_PER_TASK))
            .zip(dpred.par_chunks_mut(SAMPLES_PER_TASK))
            .zip(dtarget.par_chunks_mut(SAMPLES_PER_TASK))
            .for_each(|(((p, t), dp), dt)| {
                let (mut wa, mut wb) = (vec![0.0; nb], vec![0.0; nb]);
                let (mut gwa, mut gwb) = (vec![0.0; nb], vec![0.0; nb]);
                for (((&a, &b), da), db) in p.iter().zip(t).zip(dp).zip(dt) {
                    let (a, b) = (a.to_f64(), b.to_f64());
                    self.window(a, &mut wa);
                    self.window(b, &mut wb);
                    gwb.copy_from_slice(gb);
                    for (j, row) in gab.chunks_exact(nb).enumerate() {
                        let mut s = ga[j];
                        for ((g, &bk), gk) in row.iter().zip(&wb).zip(gwb.iter_mut()) {
                            s += g * bk;
                            *gk += g * wa[j];
                        }
                        gwa[j] = s * scale;
                    }
                    for g in gwb.iter_mut() {
                        *g *= scale;
                    }
                    *da = T::from_f64(self.window_grad(a, &wa, &gwa));
                    *db = T::from_f64(self.window_grad(b, &wb, &gwb));
                }
            });
    }

    fn forward_cpu<T: Float>(
        &self,
        pred: &[T],
        lp: &Layout,
        target: &[T],
        lt: &Layout,
    ) -> candle_core::Result<(Vec<T>, Shape)> {
        let batch = batch_size(lp, lt)?;
        let nb = self.bins();
        let per_item = pred.len() / batch;
        let mut out = Vec::with_capacity(batch * nb * (nb + 2));
        for (p, t) in pred
            .chunks_exact(per_item)
            .zip(target.chunks_exact(per_item))
        {
            out.extend(self.histograms(p, t).into_iter().map(T::from_f64));
        }
        Ok((out, Shape::from((batch, nb * (nb + 2)))))
    }
}

/// The batch size of `pred` and `target`, which must share one non-empty batched shape.
fn batch_size(lp: &Layout, lt: &Layout) -> candle_core::Result<usize> {
    if lp.shape() != lt.shape() || lp.shape().rank() == 0 {
        bail!(
            "mutual information histograms: pred {:?} and target {:?} must have one batched shape",
            lp.shape(),
            lt.shape()
        );
    }
    let batch = lp.shape().dims()[0];
    if batch == 0 || lp.shape().elem_count() == 0 {
        bail!(
            "mutual information histograms: empty input {:?}",
            lp.shape()
        );
    }
    Ok(batch)
}

impl CpuKernel for GaussianHistograms {
    fn kernel_name(&self) -> &'static str {
        "mi-gaussian-histograms"
    }

    fn run<T: Float>(&self, args: &[(&[T], &Layout)]) -> candle_core::Result<(Vec<T>, Shape)> {
        let [(pred, lp), (target, lt)] = args else {
            bail!("{}: expected 2 arguments", self.kernel_name());
        };
        self.forward_cpu(pred, lp, target, lt)
    }
}

impl CustomOp2 for GaussianHistograms {
    fn name(&self) -> &'static str {
        self.kernel_name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        run_cpu(self, &[(s1, l1), (s2, l2)])
    }

    fn bwd(
        &self,
        pred: &Tensor,
        target: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if !pred.track_op() && !target.track_op() {
            return Ok((None, None));
        }
        let dtype = pred.dtype();
        let grad = grad.to_dtype(candle_core::DType::F64)?.to_vec2::<f64>()?;
        let pred_c = pred.contiguous()?;
        let target_c = target.contiguous()?;
        let (dp, dt) = match dtype {
            candle_core::DType::F32 => {
                let (p, t) = (
                    pred_c.flatten_all()?.to_vec1::<f32>()?,
                    target_c.flatten_all()?.to_vec1::<f32>()?,
                );
                let (dp, dt) = self.backward_all(&p, &t, &grad);
                (
                    Tensor::from_vec(dp, pred.shape(), pred.device())?,
                    Tensor::from_vec(dt, target.shape(), target.device())?,
                )
            }
            candle_core::DType::F64 => {
                let (p, t) = (
                    pred_c.flatten_all()?.to_vec1::<f64>()?,
                    target_c.flatten_all()?.to_vec1::<f64>()?,
                );
                let (dp, dt) = self.backward_all(&p, &t, &grad);
                (
                    Tensor::from_vec(dp, pred.shape(), pred.device())?,
                    Tensor::from_vec(dt, target.shape(), target.device())?,
                )
            }
            other => bail!("mutual information histograms: unsupported dtype {other:?}"),
        };
        Ok((
            pred.track_op().then_some(dp),
            target.track_op().then_some(dt),
        ))
    }
}

impl GaussianHistograms {
    /// Both gradients for a whole batch; `grad[b]` is batch item b's upstream row.
    fn backward_all<T: Float>(
        &self,
        pred: &[T],
        target: &[T],
        grad: &[Vec<f64>],
    ) -> (Vec<T>, Vec<T>) {
        let per_item = pred.len() / grad.len().max(1);
        let mut dp = vec![T::default(); pred.len()];
        let mut dt = vec![T::default(); target.len()];
        for ((((p, t), g), dpb), dtb) in pred
            .chunks_exact(per_item)
            .zip(target.chunks_exact(per_item))
            .zip(grad)
            .zip(dp.chunks_exact_mut(per_item))
            .zip(dt.chunks_exact_mut(per_item))
        {
            self.backward(p, t, g, dpb, dtb);
        }
        (dp, dt)
    }
}
