//! The diffusion regulariser: the mean squared first differences of a displacement field
//! (VoxelMorph's `Grad('l2')`, ConvexAdam's smoothness term), beside the bending energy.
//!
//! For a DDF `u` (B, 3, H, W, D) and each spatial axis `a`, the forward differences
//! `Δ_a u_c = u_c[.. i+1 ..] - u_c[.. i ..]` are scaled by `component_scale[c] / step[a]`
//! (both 1 by default: voxel units), squared and averaged over every element; the loss is
//! the mean of the three axis means. With `component_scale` the voxel spacing of the DDF's
//! components and `step` the spacing of its grid (both in mm), the differences are
//! physical strains and anisotropic voxels weigh what they measure.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use crate::losses::dims5;
use crate::{Error, Result};

/// Mean squared first differences of a DDF (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DiffusionLoss {
    component_scale: [f64; 3],
    step: [f64; 3],
}

impl Default for DiffusionLoss {
    /// Voxel units on both sides: every factor 1.
    fn default() -> Self {
        Self {
            component_scale: [1.0; 3],
            step: [1.0; 3],
        }
    }
}

impl DiffusionLoss {
    /// A regulariser whose component `c` is multiplied by `component_scale[c]` and whose
    /// differences along axis `a` are divided by `step[a]`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] unless every factor is finite and positive.
    pub fn with_scales(component_scale: [f64; 3], step: [f64; 3]) -> Result<Self> {
        if component_scale
            .iter()
            .chain(step.iter())
            .any(|v| !(v.is_finite() && *v > 0.0))
        {
            return Err(Error::invalid(
                "diffusion scales",
                format!("{component_scale:?} / {step:?}: every factor must be finite and > 0"),
            ));
        }
        Ok(Self {
            component_scale,
            step,
        })
    }

    /// The regulariser of `ddf` (B, 3, H, W, D), a 0-d tensor on the autograd tape. Axes of
    /// length 1 have no differences and contribute 0.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] unless `ddf` is (B, 3, H, W, D).
    pub fn forward(&self, ddf: &Tensor) -> Result<Tensor> {
        let [_, c, ..] = dims5("DiffusionLoss", ddf)?;
        if c != 3 {
            return Err(Error::ShapeMismatch {
                op: "DiffusionLoss",
                expected: "a (B, 3, H, W, D) displacement field".to_string(),
                got: format!("{:?}", ddf.dims()),
            });
        }
        if ddf.device().is_cpu() && matches!(ddf.dtype(), DType::F32 | DType::F64) {
            let op = CpuDiffusion {
                loss: *self,
                grad: crate::ops::stashed::StashedGradient::new("diffusion"),
            };
            return Ok(ddf.contiguous()?.apply_op1(op)?);
        }
        self.forward_generic(ddf)
    }

    /// The same value from candle ops with autograd (any device); [`Self::forward`] uses a
    /// fused loop on CPU tensors.
    ///
    /// # Errors
    /// As [`Self::forward`].
    pub fn forward_generic(&self, ddf: &Tensor) -> Result<Tensor> {
        let scales: Vec<f64> = self.component_scale.to_vec();
        let scales = Tensor::new(scales.as_slice(), ddf.device())?
            .to_dtype(ddf.dtype())?
            .reshape((1, 3, 1, 1, 1))?;
        let u = ddf.broadcast_mul(&scales)?;
        let mut total: Option<Tensor> = None;
        for axis in 0..3 {
            let dim = 2 + axis;
            let n = u.dim(dim)?;
            let term = if n < 2 {
                Tensor::zeros((), ddf.dtype(), ddf.device())?
            } else {
                let diff = (u.narrow(dim, 1, n - 1)? - u.narrow(dim, 0, n - 1)?)?;
                let inv = 1.0 / (self.step[axis] * self.step[axis]);
                (diff.sqr()?.mean_all()? * inv)?
            };
            total = Some(match total {
                None => term,
                Some(t) => (t + term)?,
            });
        }
        Ok((total.expect("three axes") / 3.0)?)
    }
}

/// Value and gradient in one pass over a contiguous CPU DDF; the gradient is kept for the
/// backward pass.
struct CpuDiffusion {
    loss: DiffusionLoss,
    grad: crate::ops::stashed::StashedGradient,
}

impl CpuDiffusion {
    fn run(&self, u: &[f64], dims: [usize; 5]) -> (f64, Vec<f64>) {
        let [b, c, h, w, d] = dims;
        let spatial = [h, w, d];
        let strides = [w * d, d, 1];
        let mut grad = vec![0f64; u.len()];
        let mut total = 0f64;
        for axis in 0..3 {
            let n = spatial[axis];
            if n < 2 {
                continue;
            }
            let count = (b * c * h * w * d / n * (n - 1)) as f64;
            let coef = 1.0 / (3.0 * count * self.loss.step[axis] * self.loss.step[axis]);
            let stride = strides[axis];
            let mut sum = 0f64;
            for bc in 0..b * c {
                let s = self.loss.component_scale[bc % c];
                let base = bc * h * w * d;
                for i in 0..h {
                    for j in 0..w {
                        for k in 0..d {
                            let at = [i, j, k];
                            if at[axis] + 1 >= n {
                                continue;
                            }
                            let x0 = base + i * strides[0] + j * strides[1] + k;
                            let x1 = x0 + stride;
                            let diff = s * (u[x1] - u[x0]);
                            sum += diff * diff;
                            let g = 2.0 * coef * s * diff;
                            grad[x1] += g;
                            grad[x0] -= g;
                        }
                    }
                }
            }
            total += sum * coef;
        }
        (total, grad)
    }
}

impl CustomOp1 for CpuDiffusion {
    fn name(&self) -> &'static str {
        "diffusion"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let [b, c, h, w, d] = *layout.shape().dims() else {
            candle_core::bail!("diffusion: expected a 5-d DDF, got {:?}", layout.shape())
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("diffusion: the DDF must be contiguous")
        };
        let u: Vec<f64> = match storage {
            CpuStorage::F32(v) => v[start..end].iter().map(|&x| f64::from(x)).collect(),
            CpuStorage::F64(v) => v[start..end].to_vec(),
            _ => candle_core::bail!("diffusion: f32 or f64 DDF"),
        };
        let (loss, grad) = self.run(&u, [b, c, h, w, d]);
        self.grad
            .forward(loss, grad, layout.shape(), storage.dtype())
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        self.grad.backward(grad_res)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::losses::test_support::{check_gradient, grid, scalar};
    use candle_core::DType;

    #[test]
    fn value_of_a_linear_field_and_gradient() {
        // u_0 = 0.5 i (along axis 0), u_1 = u_2 = 0: only Δ_0 u_0 = 0.5 is non-zero; it fills
        // one of three components, so the axis-0 mean is 0.25 / 3 and the loss 0.25 / 9.
        let ddf = grid(
            [1, 3, 4, 5, 6],
            |_, c, i, _, _| if c == 0 { 0.5 * i } else { 0.0 },
        );
        let v = scalar(&DiffusionLoss::default().forward(&ddf).unwrap());
        assert!((v - 0.25 / 9.0).abs() < 1e-12, "{v}");
        // Component 0 in 2 mm voxels, grid steps of 4 mm along axis 0: strain 0.5 * 2 / 4.
        let scaled = DiffusionLoss::with_scales([2.0, 1.0, 1.0], [4.0, 1.0, 1.0]).unwrap();
        let v = scalar(&scaled.forward(&ddf).unwrap());
        assert!((v - 0.0625 / 9.0).abs() < 1e-12, "{v}");
        assert!(DiffusionLoss::with_scales([0.0, 1.0, 1.0], [1.0; 3]).is_err());
        let x = grid([1, 3, 3, 4, 5], |_, c, i, j, k| {
            (0.3 * i + 0.2 * c as f64).sin() + 0.1 * j * k
        });
        assert_eq!(x.dtype(), DType::F64);
        for f in [DiffusionLoss::forward, DiffusionLoss::forward_generic] {
            check_gradient(&x, |t| f(&scaled, t).unwrap(), &[0, 7, 29, 61, 150, 179]);
        }
        let fused = scalar(&scaled.forward(&x).unwrap());
        let generic = scalar(&scaled.forward_generic(&x).unwrap());
        assert!(
            (fused - generic).abs() < 1e-12 * generic.abs(),
            "{fused} vs {generic}"
        );
    }
}
