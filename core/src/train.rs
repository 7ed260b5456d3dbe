//! Training: its config, the per-case inputs, the epoch order and the epoch summary.
//!
//! There is one training loop, the cluster's: the coordinator in `head/src/train/` drives
//! replicas ([`replica::Replica`]) through steps decided by [`dist::round::StepRound`]; a
//! replica computes its shard's gradient and applies the committed mean with Adam.
//! `medray train-local` runs the same coordinator with one replica in its own process
//! (`head/src/local.rs`).
//!
//! Each epoch shuffles the training cases with a generator seeded by `(seed, epoch)` (so a
//! resumed run sees the same order) and takes global batches of `batch_size`. After each
//! epoch the validation cases are registered in eval mode and scored; the learning rate
//! follows ReduceLROnPlateau(factor 0.5, patience 5) on the validation Dice (or on the
//! training loss when there is no validation case).

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::dataset::CaseFiles;
use crate::keypoints::read_keypoint_pairs;
use crate::localnet::{LocalNetConfig, Preset};
use crate::losses::KeypointTargets;
use crate::model::ModelConfig;
use crate::optim::PlateauMode;
use crate::preprocess::{load_image, load_image_with_volume, load_mask, PreprocessConfig, Window};
use crate::registration::{LossPreset, PairBatch};
use crate::{Error, Result};

pub mod dist;
pub mod replica;

/// Settings of a training run; the defaults are the quickstart's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Network preset.
    pub preset: Preset,
    /// Channels of the first level (32 in MONAI's presets).
    pub num_channel_initial: usize,
    /// Objective.
    pub loss: LossPreset,
    /// Epochs to train (in total, including epochs before a resume).
    pub epochs: usize,
    /// Cases per optimiser step.
    pub batch_size: usize,
    /// Initial Adam learning rate.
    pub lr: f64,
    /// Network grid size (each divisible by 8).
    pub size: [usize; 3],
    /// Intensity window mapped to [0, 1].
    pub window: Window,
    /// Fraction of cases (the last ones) used for validation.
    pub val_fraction: f64,
    /// Seed of the initialisation and of the shuffling.
    pub seed: u64,
    /// Write a numbered checkpoint every this many epochs (the last and best are always kept).
    pub checkpoint_every: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            preset: Preset::Seed,
            num_channel_initial: 32,
            loss: LossPreset::MiBe,
            epochs: 25,
            batch_size: 2,
            lr: 1e-4,
            size: [96, 96, 104],
            window: Window::QUICKSTART,
            val_fraction: 0.2,
            seed: 0,
            checkpoint_every: 1,
        }
    }
}

impl TrainConfig {
    /// Checks every field.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(Error::invalid("epochs", "must be at least 1"));
        }
        if self.batch_size == 0 {
            return Err(Error::invalid("batch_size", "must be at least 1"));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(Error::invalid(
                "lr",
                format!("must be > 0, got {}", self.lr),
            ));
        }
        if self.checkpoint_every == 0 {
            return Err(Error::invalid("checkpoint_every", "must be at least 1"));
        }
        self.window.validate()?;
        self.model_config().preprocess.validate()?;
        self.model_config().network.validate()
    }

    /// The model config the trained weights are saved with.
    pub fn model_config(&self) -> ModelConfig {
        ModelConfig {
            network: LocalNetConfig::preset(self.preset)
                .with_num_channel_initial(self.num_channel_initial),
            preprocess: PreprocessConfig {
                window: Some(self.window),
                size: Some(self.size),
            },
            loss: Some(self.loss),
        }
    }
}

/// One epoch's figures: the quickstart's line plus validation quality.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochSummary {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean total training loss.
    pub total_loss: f64,
    /// Mean similarity term.
    pub similarity_loss: f64,
    /// Mean regularisation term.
    pub regularisation_loss: f64,
    /// Mean validation soft Dice (the quickstart's validation Dice).
    pub val_soft_dice: Option<f64>,
    /// Mean validation binary Dice (nearest-warped masks).
    pub val_dice: Option<f64>,
    /// Mean validation Dice without registration (the identity baseline).
    pub val_dice_before: Option<f64>,
    /// Mean validation MI loss.
    pub val_mi_loss: Option<f64>,
    /// Mean validation folding percentage.
    pub val_folding_pct: Option<f64>,
    /// Learning rate used in this epoch.
    pub lr: f64,
    /// Wall time of the epoch, seconds.
    pub seconds: f64,
}

impl EpochSummary {
    /// The quickstart's epoch line, with validation quality, learning rate and time.
    pub fn line(&self) -> String {
        let f = |v: Option<f64>| v.map_or_else(|| "n/a".to_string(), |d| format!("{d:.4}"));
        format!(
            "epoch {:>3}  total loss {:.4}  similarity loss {:.4}  regularisation loss {:.4}  val dice {} (binary {}, unregistered {})  lr {:.1e}  {:.1}s",
            self.epoch,
            self.total_loss,
            self.similarity_loss,
            self.regularisation_loss,
            f(self.val_soft_dice),
            f(self.val_dice),
            f(self.val_dice_before),
            self.lr,
            self.seconds
        )
    }
}

/// A case loaded and preprocessed onto the network grid.
pub(crate) struct LoadedCase {
    pub(crate) fixed: Tensor,
    pub(crate) moving: Tensor,
    pub(crate) fixed_mask: Option<Tensor>,
    pub(crate) moving_mask: Option<Tensor>,
    /// The case's keypoint pairs on the network grid, loaded only for an objective that
    /// uses them (and only for training cases: see [`load_case`]).
    pub(crate) keypoints: Option<KeypointTargets>,
}

/// Loads a case onto the network grid; with `keypoints`, also its keypoint pairs (the
/// objective uses them; callers pass `false` for validation cases, whose keypoints must
/// never reach the training).
pub(crate) fn load_case(
    case: &CaseFiles,
    pre: &PreprocessConfig,
    device: &Device,
    keypoints: bool,
) -> Result<LoadedCase> {
    let mask = |p: &Option<PathBuf>| p.as_ref().map(|p| load_mask(p, pre, device)).transpose();
    let (volume, fixed) = load_image_with_volume(&case.fixed, pre, device)?;
    let keypoints = match (keypoints, &case.keypoints) {
        (false, _) => None,
        (true, None) => {
            return Err(Error::invalid(
                "keypoints",
                format!("case {} has no keypoint pairs", case.id),
            ))
        }
        (true, Some(path)) => {
            let pairs = read_keypoint_pairs(path)?;
            let original = volume.data.dim();
            let network = [fixed.dim(2)?, fixed.dim(3)?, fixed.dim(4)?];
            Some(
                KeypointTargets::new(
                    &pairs,
                    [original.0, original.1, original.2],
                    volume.spacing,
                    network,
                    device,
                )
                .map_err(|e| Error::invalid("keypoints", format!("{}: {e}", path.display())))?,
            )
        }
    };
    Ok(LoadedCase {
        fixed,
        moving: load_image(&case.moving, pre, device)?,
        fixed_mask: mask(&case.fixed_mask)?,
        moving_mask: mask(&case.moving_mask)?,
        keypoints,
    })
}

pub(crate) fn batch_of(cases: &[&LoadedCase]) -> Result<PairBatch> {
    let cat = |f: &dyn Fn(&LoadedCase) -> Option<&Tensor>| -> Result<Option<Tensor>> {
        let parts: Option<Vec<&Tensor>> = cases.iter().map(|c| f(c)).collect();
        parts
            .map(|p| Tensor::cat(&p, 0).map_err(Error::from))
            .transpose()
    };
    Ok(PairBatch {
        fixed: cat(&|c| Some(&c.fixed))?.expect("every case has a fixed image"),
        moving: cat(&|c| Some(&c.moving))?.expect("every case has a moving image"),
        fixed_mask: cat(&|c| c.fixed_mask.as_ref())?,
        moving_mask: cat(&|c| c.moving_mask.as_ref())?,
        keypoints: cases.iter().map(|c| c.keypoints.clone()).collect(),
    })
}

/// Refuses an objective that needs lung masks when a training case has none.
pub(crate) fn check_masks(loss: LossPreset, cases: &[CaseFiles]) -> Result<()> {
    if !loss.needs_masks() {
        return check_keypoints(loss, cases);
    }
    match cases
        .iter()
        .find(|c| c.fixed_mask.is_none() || c.moving_mask.is_none())
    {
        Some(c) => Err(Error::invalid(
            "loss",
            format!(
                "{} needs lung masks, but case {} has none",
                loss.name(),
                c.id
            ),
        )),
        None => check_keypoints(loss, cases),
    }
}

/// Refuses an objective that needs keypoint pairs when a training case has none.
fn check_keypoints(loss: LossPreset, cases: &[CaseFiles]) -> Result<()> {
    match cases.iter().find(|c| c.keypoints.is_none()) {
        Some(c) if loss.needs_keypoints() => Err(Error::invalid(
            "loss",
            format!(
                "{} needs keypoint pairs on every training case, but case {} has none",
                loss.name(),
                c.id
            ),
        )),
        _ => Ok(()),
    }
}

/// Which way the plateau scheduler's monitored value improves: each epoch feeds it the
/// validation Dice (higher is better) when some validation case has both lung masks to
/// compute one, else the training loss (lower is better). Choosing by "there are validation
/// cases" instead halved the rate while a mask-less run's loss fell (issue 17, item 6).
pub fn plateau_mode(val_cases_with_masks: usize) -> PlateauMode {
    if val_cases_with_masks > 0 {
        PlateauMode::Max
    } else {
        PlateauMode::Min
    }
}

/// The order of the training cases in `epoch` (1-based): a permutation seeded by
/// `(seed, epoch)`, so it does not depend on what ran before.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
        seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    order.shuffle(&mut rng);
    order
}

/// The history as CSV, one line per epoch.
pub fn history_csv(history: &[EpochSummary]) -> String {
    let opt = |v: Option<f64>| v.map(|v| format!("{v:.6}")).unwrap_or_default();
    let mut text = String::from(
        "epoch,total_loss,similarity_loss,regularisation_loss,val_soft_dice,val_dice,val_dice_before,val_mi_loss,val_folding_pct,lr,seconds\n",
    );
    for h in history {
        text.push_str(&format!(
            "{},{:.6},{:.6},{:.6},{},{},{},{},{},{:e},{:.2}\n",
            h.epoch,
            h.total_loss,
            h.similarity_loss,
            h.regularisation_loss,
            opt(h.val_soft_dice),
            opt(h.val_dice),
            opt(h.val_dice_before),
            opt(h.val_mi_loss),
            opt(h.val_folding_pct),
            h.lr,
            h.seconds
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_order_is_a_deterministic_permutation() {
        let a = epoch_order(10, 3, 2);
        assert_eq!(a, epoch_order(10, 3, 2));
        assert_ne!(a, epoch_order(10, 3, 3));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn the_scheduler_direction_follows_what_it_is_fed() {
        assert_eq!(plateau_mode(0), PlateauMode::Min, "the training loss");
        assert_eq!(plateau_mode(2), PlateauMode::Max, "the validation Dice");
    }

    #[test]
    fn invalid_configs_are_refused() {
        let bad = TrainConfig {
            size: [96, 96, 100],
            ..TrainConfig::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("100"));
        let bad = TrainConfig {
            batch_size: 0,
            ..TrainConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}
