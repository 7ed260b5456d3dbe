//! Instance optimisation: after the network has predicted a DDF for one pair, Adam steps
//! on a displacement itself (not on the network's weights), as the best Learn2Reg methods
//! do at test time (Siebert, Hansen and Heinrich, "Fast 3D registration with accurate
//! optimisation and little learning for Learn2Reg 2021", 2021).
//!
//! Two ways, chosen by [`RefineSim`]:
//! * `mind` (default) and `lncc`: the multi-level pyramid of [`pyramid`] on the original
//!   images' geometry (half resolution and coarser, a coarse control grid, MIND-SSC SSD or
//!   LNCC + a diffusion regulariser in mm), started from the network's DDF; the result is
//!   resampled to the original grid (TRE, outputs) and to the network grid (the other
//!   metrics).
//! * `model`: [`refine_ddf`], Adam on the dense DDF on the network grid against the model's
//!   training loss ([`RegistrationLoss`]), the earlier behaviour.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::optim::{Adam, AdamConfig};
use crate::registration::{PairBatch, RegistrationLoss};
use crate::{Error, Result};

pub mod feature_ssd;
pub mod pyramid;
#[cfg(test)]
mod tests;

pub use pyramid::{refine_pyramid, resample_field, PyramidInput, PyramidResult};

/// Adam's learning rate on the DDF, in voxels of the network grid: each of the first steps
/// moves a displacement by about this much.
pub const REFINE_LR: f64 = 0.05;

/// Most refinement steps accepted.
pub const MAX_REFINE_STEPS: usize = 10_000;

/// The similarity of the instance optimisation (`--refine-sim`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RefineSim {
    /// MIND-SSC descriptors, SSD, in the pyramid.
    #[default]
    Mind,
    /// Local normalised cross-correlation of the images, in the pyramid.
    Lncc,
    /// The model's training loss on the network grid ([`refine_ddf`]).
    Model,
}

impl RefineSim {
    /// The option value.
    pub fn name(self) -> &'static str {
        match self {
            RefineSim::Mind => "mind",
            RefineSim::Lncc => "lncc",
            RefineSim::Model => "model",
        }
    }
}

impl std::str::FromStr for RefineSim {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mind" => Ok(RefineSim::Mind),
            "lncc" => Ok(RefineSim::Lncc),
            "model" => Ok(RefineSim::Model),
            other => Err(Error::invalid(
                "refine-sim",
                format!("`{other}` is not one of: mind, lncc, model"),
            )),
        }
    }
}

/// Most pyramid levels.
pub const MAX_REFINE_LEVELS: usize = 4;

/// How the instance optimisation runs (`--refine`, `--refine-sim`, `--refine-levels`,
/// `--refine-lambda`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RefineOptions {
    /// Adam steps per level (the `model` way: steps in all); 0: no refinement.
    pub steps: usize,
    /// The similarity.
    pub sim: RefineSim,
    /// Pyramid levels: 1 optimises at half the original resolution only, 2 at a quarter then
    /// a half, and so on.
    pub levels: usize,
    /// Weight of the diffusion regulariser (mean squared strain).
    pub lambda: f64,
    /// Control-point spacing in voxels of each level.
    pub grid_spacing: usize,
    /// Adam's learning rate, voxels of each level.
    pub lr: f64,
    /// LNCC window, voxels per axis (`lncc` only).
    pub lncc_kernel: usize,
    /// Weight the similarity by the fixed lung mask when the pair has masks.
    pub mask: bool,
}

impl Default for RefineOptions {
    /// No steps; when steps are given: MIND, 2 levels, λ 5, a control point every 2
    /// voxels, lr 0.5 (chosen on 192x192x208 phantoms and pairs from a real CT: λ 5 is the
    /// smallest weight that keeps folding under 0.1 % on all three benchmark sets, see
    /// BENCHMARKS.md).
    fn default() -> Self {
        Self {
            steps: 0,
            sim: RefineSim::Mind,
            levels: 2,
            lambda: 5.0,
            grid_spacing: 2,
            lr: 0.5,
            lncc_kernel: 5,
            mask: false,
        }
    }
}

impl RefineOptions {
    /// Default options with `steps` Adam steps per level.
    pub fn with_steps(steps: usize) -> Self {
        Self {
            steps,
            ..Self::default()
        }
    }

    /// Checks every field; errors name the command-line option.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the option.
    pub fn validate(&self) -> Result<()> {
        if self.steps > MAX_REFINE_STEPS {
            return Err(Error::invalid(
                "refine",
                format!("{} steps: at most {MAX_REFINE_STEPS}", self.steps),
            ));
        }
        if self.levels == 0 || self.levels > MAX_REFINE_LEVELS {
            return Err(Error::invalid(
                "refine-levels",
                format!("{}: between 1 and {MAX_REFINE_LEVELS}", self.levels),
            ));
        }
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            return Err(Error::invalid(
                "refine-lambda",
                format!("{}: must be finite and >= 0", self.lambda),
            ));
        }
        if self.grid_spacing == 0 || self.grid_spacing > 16 {
            return Err(Error::invalid(
                "refine-grid",
                format!("{}: between 1 and 16 voxels", self.grid_spacing),
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::invalid(
                "refine-lr",
                format!("{}: must be finite and > 0", self.lr),
            ));
        }
        if self.lncc_kernel == 0 || self.lncc_kernel.is_multiple_of(2) {
            return Err(Error::invalid(
                "refine-lncc-kernel",
                format!("{}: must be odd", self.lncc_kernel),
            ));
        }
        Ok(())
    }
}

/// Refinement options as a remote request carries them (`medray infer` to the head to the
/// workers): each field `None` takes [`RefineOptions`]' default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RefineOverrides {
    /// `--refine-sim`.
    pub sim: Option<String>,
    /// `--refine-levels`.
    pub levels: Option<u32>,
    /// `--refine-lambda`.
    pub lambda: Option<f64>,
    /// `--refine-grid`.
    pub grid: Option<u32>,
    /// `--refine-lr`.
    pub lr: Option<f64>,
    /// `--refine-mask`.
    pub mask: bool,
}

impl RefineOverrides {
    /// The overrides from a request's fields (in [`RefineOverrides`]' order), so that each
    /// protocol's message maps onto them in one line.
    pub fn new(
        sim: Option<String>,
        levels: Option<u32>,
        lambda: Option<f64>,
        grid: Option<u32>,
        lr: Option<f64>,
        mask: bool,
    ) -> Self {
        Self {
            sim,
            levels,
            lambda,
            grid,
            lr,
            mask,
        }
    }

    /// The full options for `steps` Adam steps, validated.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the option (`refine-sim`, `refine-levels`, ...).
    pub fn options(&self, steps: usize) -> Result<RefineOptions> {
        let d = RefineOptions::with_steps(steps);
        let options = RefineOptions {
            sim: match &self.sim {
                Some(s) => s.parse()?,
                None => d.sim,
            },
            levels: self.levels.map_or(d.levels, |v| v as usize),
            lambda: self.lambda.unwrap_or(d.lambda),
            grid_spacing: self.grid.map_or(d.grid_spacing, |v| v as usize),
            lr: self.lr.unwrap_or(d.lr),
            mask: self.mask,
            ..d
        };
        options.validate()?;
        Ok(options)
    }
}

/// What one pyramid level did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LevelReport {
    /// The level's image grid.
    pub size: [usize; 3],
    /// Its control grid.
    pub control_grid: [usize; 3],
    /// Adam steps taken.
    pub steps: usize,
    /// Objective (similarity + λ diffusion) at the level's start.
    pub loss_before: f64,
    /// Objective at its end.
    pub loss_after: f64,
    /// Similarity alone at the start.
    pub similarity_before: f64,
    /// Similarity alone at the end.
    pub similarity_after: f64,
    /// Wall time of the level (features, steps), ms.
    pub ms: f64,
}

/// What a refinement did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RefineReport {
    /// Adam steps taken (per level in the pyramid).
    pub steps: usize,
    /// Learning rate, voxels.
    pub lr: f64,
    /// The objective: the `loss` preset name (`model`), or `mind` / `lncc` (pyramid).
    pub loss: String,
    /// The objective at the network's DDF (the pyramid: at its finest level).
    pub loss_before: f64,
    /// The objective at the refined DDF.
    pub loss_after: f64,
    /// Wall time of the refinement, ms.
    pub refine_ms: f64,
    /// The pyramid's levels, coarsest first (empty for `model`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub levels: Vec<LevelReport>,
    /// Diffusion weight λ (pyramid only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lambda: Option<f64>,
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
            levels: Vec::new(),
            lambda: None,
        },
    ))
}
