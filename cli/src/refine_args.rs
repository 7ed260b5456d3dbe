//! The instance-optimisation options shared by `medray predict` (one pair here) and `medray
//! infer` (every case of a dataset on the cluster's workers): one set of flags, one meaning.

use medray_core::refine::{RefineOptions, RefineOverrides};

/// `--refine` and the `--refine-*` options.
#[derive(Debug, Clone, clap::Args)]
pub struct RefineArgs {
    /// Instance optimisation: Adam steps per pyramid level on the displacement, started from
    /// the network's DDF (see `--refine-sim`); 0: the network alone.
    #[arg(long = "refine", default_value_t = 0, value_name = "STEPS")]
    pub steps: usize,
    /// Similarity of the refinement: `mind` (MIND-SSC SSD) or `lncc` in a multi-level
    /// pyramid on the original images, or `model` (the model's training loss on the network
    /// grid).
    #[arg(long = "refine-sim", default_value = "mind", value_name = "SIM")]
    pub sim: String,
    /// Pyramid levels of the refinement (1: half resolution only; 2: a quarter, then a half).
    #[arg(long = "refine-levels", default_value_t = RefineOptions::default().levels, value_name = "N")]
    pub levels: usize,
    /// Weight of the refinement's diffusion regulariser (mean squared strain).
    #[arg(long = "refine-lambda", default_value_t = RefineOptions::default().lambda, allow_negative_numbers = true, value_name = "LAMBDA")]
    pub lambda: f64,
    /// Control-point spacing of the refinement, voxels of each level.
    #[arg(long = "refine-grid", default_value_t = RefineOptions::default().grid_spacing, value_name = "VOXELS")]
    pub grid: usize,
    /// Adam learning rate of the refinement, voxels of each level.
    #[arg(long = "refine-lr", default_value_t = RefineOptions::default().lr, allow_negative_numbers = true, value_name = "LR")]
    pub lr: f64,
    /// Weight the refinement's similarity by the fixed lung mask (needs the masks).
    #[arg(long = "refine-mask")]
    pub mask: bool,
}

impl RefineArgs {
    /// The options, validated (errors name the option).
    ///
    /// # Errors
    /// An invalid value, named by its option.
    pub fn options(&self) -> anyhow::Result<RefineOptions> {
        let overrides = RefineOverrides {
            sim: Some(self.sim.clone()),
            levels: Some(u32::try_from(self.levels).unwrap_or(u32::MAX)),
            lambda: Some(self.lambda),
            grid: Some(u32::try_from(self.grid).unwrap_or(u32::MAX)),
            lr: Some(self.lr),
            mask: self.mask,
        };
        Ok(overrides.options(self.steps)?)
    }
}
