//! The registration objective: warp the moving image with the predicted DDF and score it
//! against the fixed image, plus a smoothness penalty on the DDF.
//!
//! Presets:
//! * `mi-be` (the quickstart): `GlobalMutualInformationLoss(warped, fixed) + 1.0 *
//!   BendingEnergyLoss(ddf)`; unsupervised, masks unused.
//! * `mse-dice-be` (the MONAI tutorial `paired_lung_ct.ipynb`): `MSE(warped, fixed) + 100 *
//!   MultiScaleLoss(DiceLoss, [0,1,2,4,8,16])(warped_mask, fixed_mask) + 10 *
//!   BendingEnergyLoss(ddf)`, the moving mask warped trilinearly and clamped at 1.
//! * `lncc-dice-diff`: `LNCC_9(warped, fixed) + 1.0 * DiceLoss(warped_mask, fixed_mask)`
//!   (only when the batch has masks) `+ 1.0 * DiffusionLoss(ddf)`; local similarity, robust
//!   to the density change of breathing lungs.
//! * `mind-diff`: `MindSsdLoss(ddf; MIND-SSC radius 1, dilation 2) + 1.0 *
//!   DiffusionLoss(ddf)` (ConvexAdam's cost on the network grid); masks unused.
//!
//! The weights of the last two are VoxelMorph's and ConvexAdam's orders of magnitude, not
//! tuned by training runs here.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::losses::{
    keypoint_loss, mse_loss, BendingEnergyLoss, DiceLoss, DiffusionLoss,
    GlobalMutualInformationLoss, KeypointTargets, LocalNormalizedCrossCorrelationLoss, MindSsdLoss,
    MultiScaleLoss,
};
use crate::ops::{self, Padding};
use crate::{Error, Result};

/// Which objective to train with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LossPreset {
    /// Mutual information + 1.0 x bending energy (the quickstart's loss).
    #[serde(rename = "mi-be")]
    MiBe,
    /// MSE + 100 x multi-scale Dice on warped masks + 10 x bending energy (MONAI tutorial).
    #[serde(rename = "mse-dice-be")]
    MseDiceBe,
    /// LNCC (window 9) + Dice on warped masks when present + diffusion.
    #[serde(rename = "lncc-dice-diff")]
    LnccDiceDiff,
    /// MIND-SSC SSD + diffusion.
    #[serde(rename = "mind-diff")]
    MindDiff,
    /// `mse-dice-be` + the mean TRE in mm of the training cases' keypoint pairs
    /// ([`crate::losses::keypoints`]): needs masks and keypoints on every training case.
    #[serde(rename = "mse-dice-kp-be")]
    MseDiceKpBe,
}

/// Every preset's name, for messages.
pub const LOSS_PRESET_NAMES: &str = "mi-be, mse-dice-be, lncc-dice-diff, mind-diff, mse-dice-kp-be";

/// The LNCC window of `lncc-dice-diff`, voxels per axis.
pub const LNCC_KERNEL: usize = 9;

impl LossPreset {
    /// The preset's command-line name.
    pub fn name(self) -> &'static str {
        match self {
            LossPreset::MiBe => "mi-be",
            LossPreset::MseDiceBe => "mse-dice-be",
            LossPreset::LnccDiceDiff => "lncc-dice-diff",
            LossPreset::MindDiff => "mind-diff",
            LossPreset::MseDiceKpBe => "mse-dice-kp-be",
        }
    }

    /// Whether the preset needs lung masks.
    pub fn needs_masks(self) -> bool {
        matches!(self, LossPreset::MseDiceBe | LossPreset::MseDiceKpBe)
    }

    /// The same objective without its keypoint term (for instance optimisation of a case,
    /// whose keypoints are only for scoring).
    pub fn without_keypoints(self) -> Self {
        match self {
            LossPreset::MseDiceKpBe => LossPreset::MseDiceBe,
            other => other,
        }
    }

    /// Whether the preset needs the training cases' keypoint pairs.
    pub fn needs_keypoints(self) -> bool {
        matches!(self, LossPreset::MseDiceKpBe)
    }
}

impl std::str::FromStr for LossPreset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mi-be" => Ok(LossPreset::MiBe),
            "mse-dice-be" => Ok(LossPreset::MseDiceBe),
            "lncc-dice-diff" => Ok(LossPreset::LnccDiceDiff),
            "mind-diff" => Ok(LossPreset::MindDiff),
            "mse-dice-kp-be" => Ok(LossPreset::MseDiceKpBe),
            other => Err(Error::invalid(
                "loss",
                format!("`{other}` is not one of: {LOSS_PRESET_NAMES}"),
            )),
        }
    }
}

/// A batch of image pairs, each (B, 1, H, W, D) on the same grid, intensities in [0, 1].
#[derive(Clone, Debug)]
pub struct PairBatch {
    /// Fixed (expiration) images.
    pub fixed: Tensor,
    /// Moving (inspiration) images.
    pub moving: Tensor,
    /// Fixed lung masks (0/1), if any.
    pub fixed_mask: Option<Tensor>,
    /// Moving lung masks (0/1), if any.
    pub moving_mask: Option<Tensor>,
    /// Each case's keypoint targets, when every case of the batch has them and the objective
    /// uses them (`mse-dice-kp-be`).
    pub keypoints: Option<Vec<KeypointTargets>>,
}

impl PairBatch {
    /// The network input `cat(moving, fixed)` on the channel axis.
    pub fn network_input(&self) -> Result<Tensor> {
        Ok(Tensor::cat(&[&self.moving, &self.fixed], 1)?)
    }
}

/// The parts of the objective for one batch; `total = similarity + regularisation`.
#[derive(Clone, Debug)]
pub struct LossParts {
    /// The value that is differentiated.
    pub total: Tensor,
    /// Image (and label) similarity term, weighted.
    pub similarity: Tensor,
    /// Smoothness term, weighted.
    pub regularisation: Tensor,
}

impl LossParts {
    /// The three scalars as f64: (total, similarity, regularisation).
    pub fn values(&self) -> Result<(f64, f64, f64)> {
        let v = |t: &Tensor| -> Result<f64> {
            Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
        };
        Ok((
            v(&self.total)?,
            v(&self.similarity)?,
            v(&self.regularisation)?,
        ))
    }
}

/// The registration objective of a [`LossPreset`].
#[derive(Clone, Debug)]
pub struct RegistrationLoss {
    preset: LossPreset,
    mi: GlobalMutualInformationLoss,
    bending: BendingEnergyLoss,
    multi_scale: MultiScaleLoss,
    lncc: LocalNormalizedCrossCorrelationLoss,
    mind: MindSsdLoss,
    diffusion: DiffusionLoss,
}

impl RegistrationLoss {
    /// The objective of `preset` with MONAI's default loss settings.
    pub fn new(preset: LossPreset) -> Self {
        Self {
            preset,
            mi: GlobalMutualInformationLoss::default(),
            bending: BendingEnergyLoss::default(),
            multi_scale: MultiScaleLoss::default(),
            lncc: LocalNormalizedCrossCorrelationLoss::new(LNCC_KERNEL)
                .expect("the LNCC window is odd"),
            mind: MindSsdLoss::default(),
            diffusion: DiffusionLoss::default(),
        }
    }

    /// The preset.
    pub fn preset(&self) -> LossPreset {
        self.preset
    }

    /// Scores `ddf` (B, 3, H, W, D) on `batch`.
    pub fn forward(&self, ddf: &Tensor, batch: &PairBatch) -> Result<LossParts> {
        let warp = || ops::warp(&batch.moving, ddf, Padding::Border);
        let (similarity, regularisation) = match self.preset {
            LossPreset::MiBe => (
                self.mi.forward(&warp()?, &batch.fixed)?,
                self.bending.forward(ddf)?,
            ),
            LossPreset::MseDiceBe | LossPreset::MseDiceKpBe => {
                let name = self.preset.name();
                let (Some(fixed_mask), Some(moving_mask)) = (&batch.fixed_mask, &batch.moving_mask)
                else {
                    return Err(Error::invalid(
                        "loss",
                        format!("{name} needs fixed and moving lung masks"),
                    ));
                };
                let warped_mask = ops::warp(moving_mask, ddf, Padding::Border)?.clamp(0.0, 1.0)?;
                let dice = self.multi_scale.forward(&warped_mask, fixed_mask)?;
                let mse = mse_loss(&warp()?, &batch.fixed)?;
                let bending = self.bending.forward(ddf)?;
                let mut similarity = (mse + (dice * 100.0)?)?;
                if self.preset == LossPreset::MseDiceKpBe {
                    let Some(targets) = &batch.keypoints else {
                        return Err(Error::invalid(
                            "loss",
                            format!("{name} needs keypoint pairs on every training case"),
                        ));
                    };
                    similarity = (similarity + keypoint_loss(ddf, targets)?)?;
                }
                (similarity, (bending * 10.0)?)
            }
            LossPreset::LnccDiceDiff => {
                let mut similarity = self.lncc.forward(&warp()?, &batch.fixed)?;
                if let (Some(fixed_mask), Some(moving_mask)) =
                    (&batch.fixed_mask, &batch.moving_mask)
                {
                    let warped_mask =
                        ops::warp(moving_mask, ddf, Padding::Border)?.clamp(0.0, 1.0)?;
                    let dice = DiceLoss::default().forward(&warped_mask, fixed_mask)?;
                    similarity = (similarity + dice)?;
                }
                (similarity, self.diffusion.forward(ddf)?)
            }
            LossPreset::MindDiff => (
                self.mind.forward(ddf, &batch.moving, &batch.fixed)?,
                self.diffusion.forward(ddf)?,
            ),
        };
        Ok(LossParts {
            total: (&similarity + &regularisation)?,
            similarity,
            regularisation,
        })
    }
}
