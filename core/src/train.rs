//! Single-process LocalNet training (`medray train-local`): the quickstart's training loop,
//! with atomic checkpoints and exact resume.
//!
//! Each epoch shuffles the training cases with a generator seeded by `(seed, epoch)` (so a
//! resumed run sees the same order), takes batches of `batch_size`, and runs forward (BN in
//! training mode), warp, loss, backward and an Adam step. After each epoch the validation
//! cases are registered in eval mode and scored; the learning rate follows
//! ReduceLROnPlateau(factor 0.5, patience 5) on the validation Dice (or on the training loss
//! when there is no validation case).
//!
//! Output directory:
//! ```text
//! OUT/state.json                     commit point: last completed epoch, scheduler, history
//! OUT/checkpoints/epoch-NNNN/        weights.safetensors + weights.json + optimizer.safetensors
//! OUT/last.safetensors, last.json    the latest weights and model config
//! OUT/best.safetensors, best.json    the best by validation Dice (binary; soft without masks)
//! OUT/history.csv                    one line per epoch
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::dataset::{CaseFiles, Learn2RegDataset};
use crate::evaluate::{evaluate_case, CaseTensors};
use crate::keypoints::read_keypoint_pairs;
use crate::localnet::{LocalNet, LocalNetConfig, Preset};
use crate::losses::KeypointTargets;
use crate::model::ModelConfig;
use crate::optim::{Adam, AdamConfig, PlateauMode, ReduceLrOnPlateau};
use crate::preprocess::{load_image, load_image_with_volume, load_mask, PreprocessConfig, Window};
use crate::registration::{LossPreset, PairBatch, RegistrationLoss};
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

/// Progress callbacks; the CLI draws bars with them.
pub trait TrainObserver {
    /// Training starts at `first_epoch` (1-based; > 1 after a resume) with `steps_per_epoch`.
    fn on_start(
        &mut self,
        _first_epoch: usize,
        _steps_per_epoch: usize,
        _resumed_from: Option<u64>,
    ) {
    }
    /// An optimiser step finished: (epoch, global step, total, similarity, regularisation).
    fn on_step(&mut self, _epoch: usize, _step: u64, _losses: (f64, f64, f64)) {}
    /// Validation of an epoch begins.
    fn on_validation(&mut self, _epoch: usize, _cases: usize) {}
    /// An epoch finished and its checkpoint is on disk.
    fn on_epoch(&mut self, _summary: &EpochSummary) {}
}

/// An observer that ignores everything.
#[derive(Debug, Default)]
pub struct Silent;
impl TrainObserver for Silent {}

/// The persistent training state (`state.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct TrainState {
    config: TrainConfig,
    epochs_done: usize,
    step: u64,
    lr: f64,
    best_val: Option<f64>,
    scheduler: ReduceLrOnPlateau,
    checkpoint: PathBuf,
    history: Vec<EpochSummary>,
}

/// The outcome of a training run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Every epoch, including those before a resume.
    pub history: Vec<EpochSummary>,
    /// Path of the best weights.
    pub best_weights: PathBuf,
    /// Path of the last weights.
    pub last_weights: PathBuf,
    /// Optimiser steps taken in total.
    pub steps: u64,
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

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = values.collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    crate::atomic::write_bytes(path, text.as_bytes())
}

fn save_weights(net: &LocalNet, config: &ModelConfig, weights: &Path) -> Result<()> {
    net.save_safetensors(weights)?;
    config.write(&ModelConfig::path_for(weights))
}

fn save_optimizer(adam: &Adam, path: &Path) -> Result<()> {
    let (tensors, _) = adam.state_tensors();
    crate::atomic::write_with(path, |tmp| {
        candle_core::safetensors::save(&tensors, tmp).map_err(Error::from)
    })
}

/// Trains on the dataset in `data_dir`, writing checkpoints to `out_dir`. With `resume`,
/// continues from `out_dir/state.json` (the config recorded there wins, except `epochs`).
pub fn train_local(
    data_dir: &Path,
    out_dir: &Path,
    config: &TrainConfig,
    resume: bool,
    device: &Device,
    observer: &mut dyn TrainObserver,
) -> Result<TrainSummary> {
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let state_path = out_dir.join("state.json");
    let previous: Option<TrainState> = if resume {
        let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
        Some(serde_json::from_str(&text).map_err(|source| Error::Json {
            path: state_path.clone(),
            source,
        })?)
    } else {
        if state_path.exists() {
            return Err(Error::invalid(
                "out",
                format!(
                    "{} already holds a training run: pass --resume to continue it, or choose another --out",
                    out_dir.display()
                ),
            ));
        }
        None
    };
    let config = match &previous {
        Some(p) => TrainConfig {
            epochs: config.epochs,
            ..p.config.clone()
        },
        None => config.clone(),
    };
    config.validate()?;
    let model_config = config.model_config();

    let dataset = Learn2RegDataset::open(data_dir)?;
    let (train_files, val_files) = dataset.split(config.val_fraction)?;
    check_masks(config.loss, &train_files)?;
    let pre = &model_config.preprocess;
    let train_cases = train_files
        .iter()
        .map(|c| load_case(c, pre, device, config.loss.needs_keypoints()))
        .collect::<Result<Vec<_>>>()?;
    let val_cases = val_files
        .iter()
        .map(|c| load_case(c, pre, device, false))
        .collect::<Result<Vec<_>>>()?;

    let net = LocalNet::new(&model_config.network, config.seed, DType::F32, device)?;
    let mut adam = Adam::new(net.parameters(), AdamConfig::with_lr(config.lr))?;
    let mut scheduler = ReduceLrOnPlateau::new(plateau_mode(
        val_files
            .iter()
            .filter(|c| c.fixed_mask.is_some() && c.moving_mask.is_some())
            .count(),
    ));
    let (mut history, mut step, mut best_val, first_epoch) = (Vec::new(), 0u64, None, 1);
    let mut first_epoch = first_epoch;
    if let Some(p) = &previous {
        let dir = out_dir.join(&p.checkpoint);
        let weights = dir.join("weights.safetensors");
        let tensors = crate::localnet::read_safetensors(&weights, device)?;
        net.load_tensors(&tensors, &weights)?;
        let opt_path = dir.join("optimizer.safetensors");
        let opt = crate::localnet::read_safetensors(&opt_path, device)?;
        adam.load_state_tensors(&opt, p.step, &opt_path)?;
        adam.set_lr(p.lr);
        scheduler = p.scheduler.clone();
        history = p.history.clone();
        step = p.step;
        best_val = p.best_val;
        first_epoch = p.epochs_done + 1;
    }
    // The numbered checkpoint state.json points at; superseded ones are pruned.
    let mut current_checkpoint = previous.as_ref().map(|p| out_dir.join(&p.checkpoint));
    let objective = RegistrationLoss::new(config.loss);
    let steps_per_epoch = train_cases.len().div_ceil(config.batch_size);
    observer.on_start(
        first_epoch,
        steps_per_epoch,
        previous.as_ref().map(|p| p.step),
    );

    for epoch in first_epoch..=config.epochs {
        let started = Instant::now();
        let lr = adam.lr();
        let order = epoch_order(train_cases.len(), config.seed, epoch);
        let mut sums = (0.0, 0.0, 0.0);
        for chunk in order.chunks(config.batch_size) {
            let cases: Vec<&LoadedCase> = chunk.iter().map(|&i| &train_cases[i]).collect();
            let batch = batch_of(&cases)?;
            let ddf = net.forward_t(&batch.network_input()?, true)?;
            let parts = objective.forward(&ddf, &batch)?;
            let values = parts.values()?;
            if !values.0.is_finite() {
                return Err(Error::invalid(
                    "training",
                    format!(
                        "the loss became {} at epoch {epoch}, step {}",
                        values.0,
                        step + 1
                    ),
                ));
            }
            adam.step(&parts.total.backward()?)?;
            step += 1;
            sums = (sums.0 + values.0, sums.1 + values.1, sums.2 + values.2);
            observer.on_step(epoch, step, values);
        }
        let n = steps_per_epoch as f64;
        observer.on_validation(epoch, val_cases.len());
        let mut val = Vec::with_capacity(val_cases.len());
        for case in &val_cases {
            let input = Tensor::cat(&[&case.moving, &case.fixed], 1)?;
            let ddf = net.forward_t(&input, false)?.detach();
            val.push(evaluate_case(
                &CaseTensors {
                    fixed: &case.fixed,
                    moving: &case.moving,
                    ddf: &ddf,
                    fixed_mask: case.fixed_mask.as_ref(),
                    moving_mask: case.moving_mask.as_ref(),
                },
                None,
            )?);
        }
        let summary = EpochSummary {
            epoch,
            total_loss: sums.0 / n,
            similarity_loss: sums.1 / n,
            regularisation_loss: sums.2 / n,
            val_soft_dice: mean(val.iter().filter_map(|m| m.soft_dice)),
            val_dice: mean(val.iter().filter_map(|m| m.dice)),
            val_dice_before: mean(val.iter().filter_map(|m| m.dice_before)),
            val_mi_loss: mean(val.iter().map(|m| m.mi_loss)),
            val_folding_pct: mean(val.iter().map(|m| m.folding_pct)),
            lr,
            seconds: started.elapsed().as_secs_f64(),
        };
        // Binary Dice (nearest-warped masks) ranks checkpoints and drives the scheduler; the
        // soft Dice of trilinearly warped masks penalises any sub-voxel motion of the mask edge.
        let val_score = summary.val_dice.or(summary.val_soft_dice);
        let monitored = val_score.unwrap_or(summary.total_loss);
        adam.set_lr(scheduler.step(monitored, lr));

        // Checkpoint: files first, each atomic, then state.json as the commit point.
        let rel = PathBuf::from(format!("checkpoints/epoch-{epoch:04}"));
        let dir = out_dir.join(&rel);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        save_weights(&net, &model_config, &dir.join("weights.safetensors"))?;
        save_optimizer(&adam, &dir.join("optimizer.safetensors"))?;
        save_weights(&net, &model_config, &out_dir.join("last.safetensors"))?;
        let improved = match (val_score, best_val) {
            (Some(v), Some(b)) => v > b,
            (Some(_), None) => true,
            (None, _) => true,
        };
        if improved {
            best_val = val_score.or(best_val);
            save_weights(&net, &model_config, &out_dir.join("best.safetensors"))?;
        }
        history.push(summary.clone());
        write_json(
            &state_path,
            &TrainState {
                config: config.clone(),
                epochs_done: epoch,
                step,
                lr: adam.lr(),
                best_val,
                scheduler: scheduler.clone(),
                checkpoint: rel.clone(),
                history: history.clone(),
            },
        )?;
        write_history_csv(&out_dir.join("history.csv"), &history)?;
        // Keep every `checkpoint_every`-th numbered checkpoint; drop the others once superseded.
        if let Some(prev) = current_checkpoint.replace(dir.clone()) {
            if prev != dir && !keep_checkpoint(&prev, config.checkpoint_every) {
                std::fs::remove_dir_all(&prev).map_err(|e| Error::io(&prev, e))?;
            }
        }
        observer.on_epoch(&summary);
    }
    Ok(TrainSummary {
        history,
        best_weights: out_dir.join("best.safetensors"),
        last_weights: out_dir.join("last.safetensors"),
        steps: step,
    })
}

fn keep_checkpoint(dir: &Path, every: usize) -> bool {
    dir.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("epoch-"))
        .and_then(|n| n.parse::<usize>().ok())
        .is_some_and(|epoch| epoch % every == 0)
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

fn write_history_csv(path: &Path, history: &[EpochSummary]) -> Result<()> {
    crate::atomic::write_bytes(path, history_csv(history).as_bytes())
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
