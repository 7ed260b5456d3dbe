//! Bending energy of a dense displacement field, ported from MONAI
//! `monai/losses/deform.py::BendingEnergyLoss` (spec §4), in both published formulas.
//!
//! * [`BendingEnergyFormula::Monai16`] (MONAI 1.6.x, the default here): compact stencils.
//!   The pure second derivative is `x[i+1] - 2x[i] + x[i-1]`, the mixed one
//!   `(x[+,+] - x[+,-] - x[-,+] + x[-,-]) / 4`; every spatial axis is cropped to `[1:-1]`,
//!   so each spatial size must be > 2.
//! * [`BendingEnergyFormula::Monai15`] (MONAI ≤ 1.5, used by the paired lung CT tutorial):
//!   first-order central differences `(x[i+1] - x[i-1]) / 2` (which crop the other axes to
//!   `[1:-1]`) composed twice, so the pure term has stencil `(x[i+2] - 2x[i] + x[i-2]) / 4`;
//!   each spatial size must be > 4.
//!
//! Both compute `E = Σ_d (∂²u/∂d²)² + 2 Σ_{d1<d2} (∂²u/∂d1∂d2)²` per voxel and channel and
//! return its mean. With `normalize`, channel `c` of a derivative along axes `d1, d2` is scaled
//! by `n_d1·n_d2 / n_c` (`n` = spatial sizes); MONAI computes these factors as float32
//! tensors (`int / int64 tensor`, i.e. `reciprocal(n_c) * int`), and so does this port, also
//! for f64 input.

use candle_core::{DType, Tensor};

use super::dims5;
use crate::ops::stashed::StashedGradient;
use crate::{Error, Result};

mod fused;

/// Which MONAI release's finite-difference formula to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BendingEnergyFormula {
    /// MONAI 1.6.x: compact `[1, -2, 1]` and 4-point mixed stencils; spatial sizes > 2.
    #[default]
    Monai16,
    /// MONAI ≤ 1.5: composed first-order central differences; spatial sizes > 4.
    Monai15,
}

/// MONAI's `BendingEnergyLoss` with `reduction="mean"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BendingEnergyLoss {
    formula: BendingEnergyFormula,
    normalize: bool,
}

impl BendingEnergyLoss {
    /// A loss with the given formula and MONAI's `normalize` flag.
    pub fn new(formula: BendingEnergyFormula, normalize: bool) -> Self {
        Self { formula, normalize }
    }

    /// The formula in use.
    pub fn formula(&self) -> BendingEnergyFormula {
        self.formula
    }

    /// Whether derivatives are scaled by the spatial sizes.
    pub fn normalize(&self) -> bool {
        self.normalize
    }

    /// The spatial sizes of `ddf` after checking that it is `(B, 3, H, W, D)` with every
    /// size large enough for the formula.
    fn checked_sizes(&self, ddf: &Tensor) -> Result<[usize; 3]> {
        let [_, channels, h, w, d] = dims5("BendingEnergyLoss", ddf)?;
        let sizes = [h, w, d];
        if channels != 3 {
            return Err(Error::ShapeMismatch {
                op: "BendingEnergyLoss",
                expected: "3 channels, one displacement component per spatial axis".to_string(),
                got: format!("{channels} channels in {:?}", ddf.dims()),
            });
        }
        let min_size = match self.formula {
            BendingEnergyFormula::Monai16 => 3,
            BendingEnergyFormula::Monai15 => 5,
        };
        if sizes.iter().any(|&n| n < min_size) {
            return Err(Error::ShapeMismatch {
                op: "BendingEnergyLoss",
                expected: format!(
                    "every spatial size > {} for the {:?} formula",
                    min_size - 1,
                    self.formula
                ),
                got: format!("spatial sizes {sizes:?}"),
            });
        }
        Ok(sizes)
    }

    /// The mean bending energy of `ddf`, `(B, 3, H, W, D)`, as a 0-d tensor of its dtype.
    ///
    /// On the CPU (f32, f64) one fused pass computes the value and keeps only its gradient
    /// for the backward pass (`bending_energy/fused.rs`); elsewhere candle ops compose it.
    pub fn forward(&self, ddf: &Tensor) -> Result<Tensor> {
        let sizes = self.checked_sizes(ddf)?;
        if ddf.device().is_cpu() && matches!(ddf.dtype(), DType::F32 | DType::F64) {
            let (crop, terms) = fused::stencils(self.formula, self.normalize, sizes);
            let op = fused::FusedBendingEnergy {
                crop,
                terms,
                grad: StashedGradient::new("bending energy"),
            };
            return Ok(ddf.contiguous()?.apply_op1(op)?);
        }
        self.energy_generic(ddf, sizes)
    }

    /// The same value from candle ops with autograd (any device); [`Self::forward`] uses one
    /// fused pass on CPU tensors, which keeps only the gradient for the backward pass.
    ///
    /// # Errors
    /// As [`Self::forward`].
    pub fn forward_generic(&self, ddf: &Tensor) -> Result<Tensor> {
        let sizes = self.checked_sizes(ddf)?;
        self.energy_generic(ddf, sizes)
    }

    fn energy_generic(&self, ddf: &Tensor, sizes: [usize; 3]) -> Result<Tensor> {
        let energy = match self.formula {
            BendingEnergyFormula::Monai16 => self.energy_monai16(ddf, sizes)?,
            BendingEnergyFormula::Monai15 => self.energy_monai15(ddf, sizes)?,
        };
        Ok(energy.mean_all()?)
    }

    /// Energy map `(B, 3, H-2, W-2, D-2)` of the MONAI 1.6 formula.
    fn energy_monai16(&self, x: &Tensor, sizes: [usize; 3]) -> Result<Tensor> {
        let mut energy: Option<Tensor> = None;
        for a in 0..3 {
            let mut pure = compact_second_derivative(x, a, a)?;
            if self.normalize {
                pure = pure.broadcast_mul(&channel_factors(x, sizes, sizes[a] * sizes[a])?)?;
            }
            accumulate(&mut energy, pure.sqr()?)?;
            for b in a + 1..3 {
                let mut mixed = compact_second_derivative(x, a, b)?;
                if self.normalize {
                    mixed =
                        mixed.broadcast_mul(&channel_factors(x, sizes, sizes[a] * sizes[b])?)?;
                }
                accumulate(&mut energy, (mixed.sqr()? * 2.0)?)?;
            }
        }
        Ok(energy.expect("three spatial axes give at least one term"))
    }

    /// Energy map `(B, 3, H-4, W-4, D-4)` of the MONAI ≤ 1.5 formula.
    fn energy_monai15(&self, x: &Tensor, sizes: [usize; 3]) -> Result<Tensor> {
        let mut energy: Option<Tensor> = None;
        for a in 0..3 {
            let mut grad = central_gradient(x, a)?;
            if self.normalize {
                // MONAI: g *= n_a / spatial_dims (a float32 tensor), then each derivative of g
                // along axis d is multiplied by the integer n_d before squaring.
                grad = grad.broadcast_mul(&channel_factors(x, sizes, sizes[a])?)?;
            }
            let scale = |t: Tensor, axis: usize| -> candle_core::Result<Tensor> {
                if self.normalize {
                    t * sizes[axis] as f64
                } else {
                    Ok(t)
                }
            };
            let pure = scale(central_gradient(&grad, a)?, a)?;
            accumulate(&mut energy, pure.sqr()?)?;
            for b in a + 1..3 {
                let mixed = scale(central_gradient(&grad, b)?, b)?;
                accumulate(&mut energy, (mixed.sqr()? * 2.0)?)?;
            }
        }
        Ok(energy.expect("three spatial axes give at least one term"))
    }
}

/// Adds `term` to the running energy map.
fn accumulate(energy: &mut Option<Tensor>, term: Tensor) -> candle_core::Result<()> {
    *energy = Some(match energy.take() {
        Some(e) => (e + term)?,
        None => term,
    });
    Ok(())
}

/// The float32 factors `numerator / n_c` for channels c = 0, 1, 2, shaped `(1, 3, 1, 1, 1)`
/// in `like`'s dtype and device.
///
/// MONAI writes `int / spatial_dims` with an int64 tensor; PyTorch evaluates that as
/// `spatial_dims.reciprocal() * int`, in float32: the reciprocal is rounded first, then the
/// product. The golden values only match with this exact rounding.
fn channel_factors(like: &Tensor, sizes: [usize; 3], numerator: usize) -> Result<Tensor> {
    let factors: Vec<f32> = sizes
        .iter()
        .map(|&n_c| (1.0f32 / n_c as f32) * numerator as f32)
        .collect();
    Ok(Tensor::from_vec(factors, (1, 3, 1, 1, 1), like.device())?.to_dtype(like.dtype())?)
}

/// Offset of a slice along one spatial axis: `[2:]`, `[1:-1]` or `[:-2]`.
#[derive(Clone, Copy)]
enum Shift {
    Plus,
    Centre,
    Minus,
}

/// `x` sliced with `shifts[a]` on spatial axis `a` (tensor dim `2 + a`).
fn slice3(x: &Tensor, shifts: [Shift; 3]) -> candle_core::Result<Tensor> {
    let mut out = x.clone();
    for (axis, shift) in shifts.into_iter().enumerate() {
        let dim = 2 + axis;
        let len = out.dim(dim)? - 2;
        let start = match shift {
            Shift::Minus => 0,
            Shift::Centre => 1,
            Shift::Plus => 2,
        };
        out = out.narrow(dim, start, len)?;
    }
    Ok(out)
}

/// MONAI ≤ 1.5 `spatial_gradient`: `(x[i+1] - x[i-1]) / 2` along `axis`, other axes `[1:-1]`.
fn central_gradient(x: &Tensor, axis: usize) -> candle_core::Result<Tensor> {
    let mut plus = [Shift::Centre; 3];
    let mut minus = [Shift::Centre; 3];
    plus[axis] = Shift::Plus;
    minus[axis] = Shift::Minus;
    (slice3(x, plus)? - slice3(x, minus)?)? / 2.0
}

/// MONAI 1.6 `spatial_gradient_squared`: compact second derivative along axes `a`, `b`, every
/// axis cropped to `[1:-1]`.
fn compact_second_derivative(x: &Tensor, a: usize, b: usize) -> candle_core::Result<Tensor> {
    let at = |pairs: &[(usize, Shift)]| {
        let mut shifts = [Shift::Centre; 3];
        for &(axis, shift) in pairs {
            shifts[axis] = shift;
        }
        slice3(x, shifts)
    };
    if a == b {
        let centre = at(&[])?;
        (at(&[(a, Shift::Plus)])? - (centre * 2.0)?)? + at(&[(a, Shift::Minus)])?
    } else {
        let pp = at(&[(a, Shift::Plus), (b, Shift::Plus)])?;
        let pm = at(&[(a, Shift::Plus), (b, Shift::Minus)])?;
        let mp = at(&[(a, Shift::Minus), (b, Shift::Plus)])?;
        let mm = at(&[(a, Shift::Minus), (b, Shift::Minus)])?;
        (((pp - pm)? - mp)? + mm)? / 4.0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (docs/STYLE.md)
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::losses::test_support::{bending_field, check_gradient, grid, scalar};

    fn energy(formula: BendingEnergyFormula, normalize: bool, ddf: &Tensor) -> f64 {
        scalar(
            &BendingEnergyLoss::new(formula, normalize)
                .forward(ddf)
                .unwrap(),
        )
    }

    /// Reference values: spec §8 table "BendingEnergy", MONAI 1.6.1 and 1.5.0 in float64 on
    /// the closed-form §8 field.
    #[test]
    fn golden_values_of_both_formulas() {
        let ddf = bending_field();
        let cases = [
            (BendingEnergyFormula::Monai15, false, 0.045149141854),
            (BendingEnergyFormula::Monai15, true, 13.752749783),
            (BendingEnergyFormula::Monai16, false, 0.050698587611),
            (BendingEnergyFormula::Monai16, true, 15.146288889),
        ];
        for (formula, normalize, expected) in cases {
            let got = energy(formula, normalize, &ddf);
            assert!(
                (got - expected).abs() <= 1e-9 * expected,
                "{formula:?} normalize={normalize}: {got} vs MONAI {expected}"
            );
        }
    }

    /// f32 input gives the f64 value to f32 accuracy.
    #[test]
    fn f32_matches_f64() {
        let ddf = bending_field();
        let f32_value = energy(
            BendingEnergyFormula::Monai16,
            true,
            &ddf.to_dtype(DType::F32).unwrap(),
        );
        let f64_value = energy(BendingEnergyFormula::Monai16, true, &ddf);
        assert!((f32_value - f64_value).abs() <= 1e-5 * f64_value);
    }

    /// Spec §4: on u0 = i² (other channels zero) both formulas give 4/3 (second derivative 2
    /// in channel 0 only, mean over the 3 channels).
    #[test]
    fn quadratic_field_gives_four_thirds_in_both_formulas() {
        let ddf = grid(
            [1, 3, 8, 7, 9],
            |_, c, i, _, _| if c == 0 { i * i } else { 0.0 },
        );
        for formula in [BendingEnergyFormula::Monai15, BendingEnergyFormula::Monai16] {
            let got = energy(formula, false, &ddf);
            assert!((got - 4.0 / 3.0).abs() < 1e-12, "{formula:?}: {got}");
        }
    }

    /// An affine field has no bending energy.
    #[test]
    fn affine_field_has_zero_energy() {
        let ddf = grid([2, 3, 6, 7, 8], |b, c, i, j, k| {
            0.3 * i - 0.2 * j + 0.1 * k * (c as f64 + 1.0) + b as f64
        });
        for formula in [BendingEnergyFormula::Monai15, BendingEnergyFormula::Monai16] {
            assert!(energy(formula, true, &ddf).abs() < 1e-20);
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        let dev = Device::Cpu;
        let loss = BendingEnergyLoss::default();
        let two_channels = Tensor::zeros((1, 2, 8, 8, 8), DType::F32, &dev).unwrap();
        assert!(matches!(
            loss.forward(&two_channels),
            Err(Error::ShapeMismatch { .. })
        ));
        let four_d = Tensor::zeros((3, 8, 8, 8), DType::F32, &dev).unwrap();
        assert!(matches!(
            loss.forward(&four_d),
            Err(Error::ShapeMismatch { .. })
        ));
        // 4 voxels are enough for 1.6 (> 2) but not for 1.5 (> 4).
        let small = Tensor::zeros((1, 3, 4, 8, 8), DType::F32, &dev).unwrap();
        assert!(loss.forward(&small).is_ok());
        let old = BendingEnergyLoss::new(BendingEnergyFormula::Monai15, false);
        assert!(matches!(
            old.forward(&small),
            Err(Error::ShapeMismatch { .. })
        ));
        let tiny = Tensor::zeros((1, 3, 2, 8, 8), DType::F32, &dev).unwrap();
        assert!(loss.forward(&tiny).is_err());
    }

    /// The fused CPU pass and the composed candle ops agree in value and gradient, for both
    /// formulas, with and without normalisation, in f64 and f32, on a batch of two.
    #[test]
    fn fused_pass_matches_the_composed_ops() {
        let ddf = grid([2, 3, 7, 6, 9], |b, c, i, j, k| {
            (0.5 * i + 0.3 * j * (c as f64 + 1.0) + b as f64).sin() * (0.4 * k).cos() + 0.02 * i * k
        });
        for dtype in [DType::F64, DType::F32] {
            let x = candle_core::Var::from_tensor(&ddf.to_dtype(dtype).unwrap()).unwrap();
            for formula in [BendingEnergyFormula::Monai15, BendingEnergyFormula::Monai16] {
                for normalize in [false, true] {
                    let loss = BendingEnergyLoss::new(formula, normalize);
                    let fused = loss.forward(x.as_tensor()).unwrap();
                    let generic = loss.forward_generic(x.as_tensor()).unwrap();
                    let (vf, vg) = (scalar(&fused), scalar(&generic));
                    let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
                    let case = format!("{dtype:?} {formula:?} normalize={normalize}");
                    assert!((vf - vg).abs() <= tol * vg.abs(), "{case}: {vf} vs {vg}");
                    let gf = fused.backward().unwrap().remove(x.as_tensor()).unwrap();
                    let gg = generic.backward().unwrap().remove(x.as_tensor()).unwrap();
                    let scale = scalar(&gg.abs().unwrap().max_all().unwrap());
                    let diff = scalar(&(gf - gg).unwrap().abs().unwrap().max_all().unwrap());
                    assert!(
                        scale > 0.0 && diff <= tol * scale,
                        "{case}: gradient {diff} of {scale}"
                    );
                }
            }
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let ddf = grid([1, 3, 6, 7, 8], |_, c, i, j, k| {
            (0.7 * i + 0.4 * j * (c as f64 + 1.0)).sin() * (0.3 * k).cos()
        });
        let probes = [0, 17, 100, 200, 333, 500, 1007];
        for formula in [BendingEnergyFormula::Monai15, BendingEnergyFormula::Monai16] {
            for normalize in [false, true] {
                let loss = BendingEnergyLoss::new(formula, normalize);
                check_gradient(&ddf, |x| loss.forward(x).unwrap(), &probes);
                check_gradient(&ddf, |x| loss.forward_generic(x).unwrap(), &probes);
            }
        }
    }
}
