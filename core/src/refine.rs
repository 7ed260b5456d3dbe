//! Instance optimisation: after the network has predicted a DDF for one pair, a few Adam
//! steps on the DDF itself (not on the network's weights) against the registration
//! objective, as the best Learn2Reg methods do at test time (e.g. Siebert, Hansen and
//! Heinrich, "Fast 3D registration with accurate optimisation and little learning for
//! Learn2Reg 2021", 2021).
//!
//! The DDF is a [`candle_core::Var`] on the network grid, initialised with the network's
//! prediction; each step computes the model's loss ([`RegistrationLoss`]: MI + bending
//! energy, or MSE + multi-scale Dice on the masks + bending energy) and applies PyTorch's
//! Adam ([`crate::optim::Adam`]) with a fixed learning rate in voxels.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::optim::{Adam, AdamConfig};
use crate::registration::{PairBatch, RegistrationLoss};
use crate::Result;

/// Adam's learning rate on the DDF, in voxels of the network grid: each of the first steps
/// moves a displacement by about this much.
pub const REFINE_LR: f64 = 0.05;

/// Most refinement steps accepted.
pub const MAX_REFINE_STEPS: usize = 10_000;

/// What a refinement did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RefineReport {
    /// Adam steps taken.
    pub steps: usize,
    /// Learning rate, voxels.
    pub lr: f64,
    /// The objective (`loss` preset name).
    pub loss: String,
    /// The objective at the network's DDF.
    pub loss_before: f64,
    /// The objective at the refined DDF.
    pub loss_after: f64,
    /// Wall time of the steps, ms.
    pub refine_ms: f64,
}

/// Runs `steps` Adam steps on a copy of `ddf` (1, 3, H, W, D) against `loss` on `batch`
/// (tensors on the same grid as the DDF) and returns the refined DDF (detached).
///
/// # Errors
/// [`crate::Error::InvalidArgument`] if `steps` exceeds [`MAX_REFINE_STEPS`] or the loss
/// needs masks that `batch` lacks; a candle error from the loss or its gradient.
pub fn refine_ddf(
    ddf: &Tensor,
    batch: &PairBatch,
    loss: &RegistrationLoss,
    steps: usize,
) -> Result<(Tensor, RefineReport)> {
    if steps > MAX_REFINE_STEPS {
        return Err(crate::Error::invalid(
            "refine steps",
            format!("{steps}: at most {MAX_REFINE_STEPS}"),
        ));
    }
    let start = std::time::Instant::now();
    let var = Var::from_tensor(&ddf.detach())?;
    let mut adam = Adam::new(
        vec![("ddf".to_string(), var.clone())],
        AdamConfig::with_lr(REFINE_LR),
    )?;
    let loss_before = loss.forward(var.as_tensor(), batch)?.values()?.0;
    for _ in 0..steps {
        let parts = loss.forward(var.as_tensor(), batch)?;
        let grads = parts.total.backward()?;
        adam.step(&grads)?;
    }
    let refined = var.as_tensor().detach();
    let loss_after = loss.forward(&refined, batch)?.values()?.0;
    Ok((
        refined,
        RefineReport {
            steps,
            lr: REFINE_LR,
            loss: loss.preset().name().to_string(),
            loss_before,
            loss_after,
            refine_ms: start.elapsed().as_secs_f64() * 1e3,
        },
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::registration::LossPreset;
    use candle_core::{DType, Device};

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
}
