//! The diffusion regulariser: the mean squared first differences of a displacement field
//! (VoxelMorph's `Grad('l2')`, ConvexAdam's smoothness term), beside the bending energy.
//!
//! For a DDF `u` (B, 3, H, W, D) and each spatial axis `a`, the forward differences
//! `Δ_a u_c = u_c[.. i+1 ..] - u_c[.. i ..]` are scaled by `component_scale[c] / step[a]`
//! (both 1 by default: voxel units), squared and averaged over every element; the loss is
//! the mean of the three axis means. With `component_scale` the voxel spacing of the DDF's
//! components and `step` the spacing of its grid (both in mm), the differences are
//! physical strains and anisotropic voxels weigh what they measure.

use candle_core::Tensor;

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
        check_gradient(
            &x,
            |t| scaled.forward(t).unwrap(),
            &[0, 7, 29, 61, 150, 179],
        );
    }
}
