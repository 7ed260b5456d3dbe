//! What `medray synth` generates: [`SynthConfig`] and the [`Motion`] presets.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::anatomy::EXTENT_MM;
use crate::{Error, Result};

/// How much the lungs move between the two breath-holds of a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Motion {
    /// DIR-Lab 4D CT-like: mean landmark displacement drawn in 6-15 mm per case (the
    /// published cases: 3.9-15 mm), up to ~35 mm at the diaphragm, mostly cranio-caudal.
    #[default]
    Dirlab,
    /// COPDgene breath-hold-like: mean landmark displacement drawn in 15-30 mm.
    Copd,
    /// Small motion (mean 1-2.5 mm, max ~5 mm): the phantoms of earlier medray versions.
    Small,
}

impl Motion {
    /// Every preset, in the order the CLI lists them.
    pub const ALL: [Motion; 3] = [Motion::Dirlab, Motion::Copd, Motion::Small];

    /// The range (mm) the per-case mean landmark displacement is drawn from.
    pub fn mean_displacement_range_mm(self) -> (f64, f64) {
        match self {
            Motion::Dirlab => (6.0, 15.0),
            Motion::Copd => (15.0, 30.0),
            Motion::Small => (1.0, 2.5),
        }
    }

    /// The preset's name (as `--motion` takes it).
    pub fn name(self) -> &'static str {
        match self {
            Motion::Dirlab => "dirlab",
            Motion::Copd => "copd",
            Motion::Small => "small",
        }
    }
}

impl fmt::Display for Motion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Motion {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Motion::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                Error::invalid(
                    "--motion",
                    format!("unknown motion {s:?}: expected dirlab, copd or small"),
                )
            })
    }
}

/// What to generate. The patient always spans [`EXTENT_MM`] (336 x 240 x 364 mm, Learn2Reg's
/// field of view); the grid size only sets the spacing ([`SynthConfig::spacing`]), so every
/// size shows the same body and the same motion in mm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SynthConfig {
    /// Number of cases (`case_001` ..).
    pub cases: usize,
    /// Grid size `[H, W, D]` in voxels; axis 2 is cranio-caudal (apex at high indices).
    pub size: [usize; 3],
    /// Seed of every random choice.
    pub seed: u64,
    /// How much the lungs move.
    pub motion: Motion,
    /// Standard deviation of the gaussian image noise (HU).
    pub noise_hu: f32,
    /// Lung parenchyma at inspiration (HU).
    pub lung_hu_insp: f32,
    /// Expiration parenchyma is denser where the motion compresses it (tissue mass kept per
    /// voxel); when false it keeps the inspiration value.
    pub density_follows_volume: bool,
    /// Multiplies the drawn breathing amplitude (1: the preset's statistics; at most 4, and
    /// the model caps the diaphragm descent at 55% of the lung height).
    pub amplitude_scale: f64,
}

impl Default for SynthConfig {
    /// Learn2Reg-like: 192 x 192 x 208 voxels of 1.75 x 1.25 x 1.75 mm, DIR-Lab motion.
    fn default() -> Self {
        SynthConfig {
            cases: 20,
            size: [192, 192, 208],
            seed: 0,
            motion: Motion::Dirlab,
            noise_hu: 20.0,
            lung_hu_insp: -850.0,
            density_follows_volume: true,
            amplitude_scale: 1.0,
        }
    }
}

impl SynthConfig {
    /// Sets the number of cases.
    pub fn with_cases(mut self, cases: usize) -> Self {
        self.cases = cases;
        self
    }

    /// Sets the grid size.
    pub fn with_size(mut self, size: [usize; 3]) -> Self {
        self.size = size;
        self
    }

    /// Sets the seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets the motion preset.
    pub fn with_motion(mut self, motion: Motion) -> Self {
        self.motion = motion;
        self
    }

    /// Checks sizes and intensities.
    pub fn validate(&self) -> Result<()> {
        if self.size.iter().any(|&n| !(16..=1024).contains(&n)) {
            return Err(Error::invalid(
                "synth size",
                format!("{:?}: every size must be in 16..=1024", self.size),
            ));
        }
        let finite = [self.noise_hu, self.lung_hu_insp]
            .iter()
            .all(|v| v.is_finite());
        if !finite || self.noise_hu < 0.0 || !(-1000.0..=-300.0).contains(&self.lung_hu_insp) {
            return Err(Error::invalid(
                "synth intensities",
                "noise must be finite and non-negative, lung_hu_insp in -1000..=-300",
            ));
        }
        if !self.amplitude_scale.is_finite() || !(0.0..=4.0).contains(&self.amplitude_scale) {
            return Err(Error::invalid(
                "synth amplitude_scale",
                format!("{} must be in 0..=4", self.amplitude_scale),
            ));
        }
        Ok(())
    }

    /// Voxel size in mm: the fixed extent over the grid size (1.75 x 1.25 x 1.75 mm at
    /// 192 x 192 x 208).
    pub fn spacing(&self) -> [f64; 3] {
        [0, 1, 2].map(|a| EXTENT_MM[a] / self.size[a].max(1) as f64)
    }

    /// Voxel-to-world affine: `diag(spacing)`, origin at voxel 0.
    pub fn affine(&self) -> [[f64; 4]; 4] {
        let [sx, sy, sz] = self.spacing();
        [
            [sx, 0.0, 0.0, 0.0],
            [0.0, sy, 0.0, 0.0],
            [0.0, 0.0, sz, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    }
}
