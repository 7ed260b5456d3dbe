//! Synthetic lung CT pairs with a known deformation, in the Learn2Reg 2020 "CT Lung" layout.
//!
//! Used when the real dataset (Zenodo 3835682) is absent, and by tests and benchmarks, because
//! unlike the real data the phantom comes with the exact answer. For each case:
//!
//! * the **inspiration** anatomy (body, fat, ribs, spine, lungs under a diaphragm dome,
//!   branching vessel trees; see [`anatomy`]) is a continuous function `A(q)`; the MOVING image
//!   is `A` sampled on the grid, lung parenchyma at [`SynthConfig::lung_hu_insp`];
//! * a smooth breathing field `u` on the fixed grid ([`breathing`]) describes where each
//!   expiration point lies in inspiration; the FIXED (expiration) image is `A(p + u(p))` with
//!   the denser expiration parenchyma [`SynthConfig::lung_hu_exp`]. So `u` is exactly the
//!   backward DDF of MONAI's `Warp`: `warp(moving, u) ~ fixed`, and it is written as the
//!   ground truth;
//! * landmarks are the vessel branch points `m_k` (moving space) and the fixed points `f_k`
//!   with `f_k + u(f_k) = m_k`;
//! * lung masks are the lungs of each phase, 0/1;
//! * gaussian noise is added to both scans, which are stored as int16 HU.
//!
//! Everything is deterministic for a seed (ChaCha8: one stream per case, one per noise slab),
//! independent of the number of threads; the slabs along array axis 0 are computed in
//! parallel with rayon.

mod anatomy;
mod breathing;
mod vec3;
mod vessels;

use std::path::{Path, PathBuf};

use ndarray::{Array3, Array4};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::keypoints::{write_keypoint_pairs, KeypointPairs};
use crate::nifti_io::{write_ddf, write_volume_as, StoredType};
use crate::{Error, Result};

use anatomy::Anatomy;
use breathing::Breathing;

/// What to generate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SynthConfig {
    /// Number of cases (`case_001` ..).
    pub cases: usize,
    /// Grid size `[H, W, D]` in voxels; axis 2 is cranio-caudal (apex at high indices).
    pub size: [usize; 3],
    /// Seed of every random choice.
    pub seed: u64,
    /// Voxel size in mm, written to the affine.
    pub spacing: [f64; 3],
    /// Standard deviation of the gaussian image noise (HU).
    pub noise_hu: f32,
    /// Lung parenchyma at inspiration (HU).
    pub lung_hu_insp: f32,
    /// Lung parenchyma at expiration (HU), denser than at inspiration.
    pub lung_hu_exp: f32,
    /// Multiplies the breathing amplitude (1: the diaphragm descends ~16 voxels at 192x192x208).
    pub amplitude_scale: f64,
}

impl Default for SynthConfig {
    /// Learn2Reg-like: 192 x 192 x 208 voxels of 1.75 x 1.25 x 1.75 mm.
    fn default() -> Self {
        SynthConfig {
            cases: 20,
            size: [192, 192, 208],
            seed: 0,
            spacing: [1.75, 1.25, 1.75],
            noise_hu: 20.0,
            lung_hu_insp: -850.0,
            lung_hu_exp: -750.0,
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

    /// Checks sizes, spacing and intensities.
    pub fn validate(&self) -> Result<()> {
        if self.size.iter().any(|&n| !(16..=1024).contains(&n)) {
            return Err(Error::invalid(
                "synth size",
                format!("{:?}: every size must be in 16..=1024", self.size),
            ));
        }
        if self.spacing.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            return Err(Error::invalid(
                "synth spacing",
                format!("{:?}: must be finite and positive", self.spacing),
            ));
        }
        let finite = [self.noise_hu, self.lung_hu_insp, self.lung_hu_exp]
            .iter()
            .all(|v| v.is_finite());
        if !finite || self.noise_hu < 0.0 {
            return Err(Error::invalid(
                "synth intensities",
                "noise and lung values must be finite, noise non-negative",
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

    /// Voxel-to-world affine: `diag(spacing)`, origin at voxel 0.
    pub fn affine(&self) -> [[f64; 4]; 4] {
        let [sx, sy, sz] = self.spacing;
        [
            [sx, 0.0, 0.0, 0.0],
            [0.0, sy, 0.0, 0.0],
            [0.0, 0.0, sz, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    }
}

/// One generated case in memory.
#[derive(Debug, Clone)]
pub struct SynthCase {
    /// `case_XXX`.
    pub case_id: String,
    /// Expiration scan (HU, before int16 rounding).
    pub fixed: Array3<f32>,
    /// Inspiration scan (HU, before int16 rounding).
    pub moving: Array3<f32>,
    /// Expiration lung mask (0/1).
    pub fixed_mask: Array3<f32>,
    /// Inspiration lung mask (0/1).
    pub moving_mask: Array3<f32>,
    /// True backward DDF on the fixed grid, `[3, H, W, D]`, voxels.
    pub ddf: Array4<f32>,
    /// Vessel branch points: fixed point and its moving correspondence.
    pub keypoints: KeypointPairs,
}

/// What one case contains, as reported by [`generate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SynthCaseSummary {
    /// `case_XXX`.
    pub case_id: String,
    /// Number of landmark pairs written.
    pub keypoints: usize,
    /// Largest displacement magnitude (voxels).
    pub max_displacement_vox: f32,
    /// Lung voxels in the fixed and moving masks.
    pub lung_voxels: [usize; 2],
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SynthSummary {
    /// The dataset root (contains `scans/`, `lungMasks/`, `keypoints/`, `groundtruth/`).
    pub out_dir: PathBuf,
    /// One entry per case, in order.
    pub cases: Vec<SynthCaseSummary>,
}

/// Generates `config.cases` cases under `out_dir` in the Learn2Reg layout:
/// `scans/case_XXX_{exp,insp}.nii.gz` (int16 HU; exp = fixed, insp = moving),
/// `lungMasks/case_XXX_{exp,insp}.nii.gz` (uint8 0/1), `keypoints/case_XXX.csv` (6-column
/// pairs, fixed then moving, voxels) and `groundtruth/case_XXX_ddf.nii.gz` (the true DDF,
/// see [`crate::nifti_io::write_ddf`]). `progress(done, total)` is called after each case.
///
/// # Errors
/// [`Error::InvalidArgument`] for an invalid configuration, [`Error::Io`] if a file cannot be
/// written.
pub fn generate(
    config: &SynthConfig,
    out_dir: impl AsRef<Path>,
    mut progress: impl FnMut(usize, usize),
) -> Result<SynthSummary> {
    config.validate()?;
    let out_dir = out_dir.as_ref();
    for sub in ["scans", "lungMasks", "keypoints", "groundtruth"] {
        let dir = out_dir.join(sub);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    let affine = config.affine();
    let mut cases = Vec::with_capacity(config.cases);
    for index in 0..config.cases {
        let case = generate_case(config, index)?;
        let id = &case.case_id;
        let scan = |phase: &str| out_dir.join("scans").join(format!("{id}_{phase}.nii.gz"));
        let mask = |phase: &str| {
            out_dir
                .join("lungMasks")
                .join(format!("{id}_{phase}.nii.gz"))
        };
        let writes: Vec<Box<dyn Fn() -> Result<()> + Sync + '_>> = vec![
            Box::new(|| write_volume_as(scan("exp"), &case.fixed, &affine, StoredType::Int16)),
            Box::new(|| write_volume_as(scan("insp"), &case.moving, &affine, StoredType::Int16)),
            Box::new(|| write_volume_as(mask("exp"), &case.fixed_mask, &affine, StoredType::Uint8)),
            Box::new(|| {
                write_volume_as(mask("insp"), &case.moving_mask, &affine, StoredType::Uint8)
            }),
            Box::new(|| {
                let path = out_dir.join("groundtruth").join(format!("{id}_ddf.nii.gz"));
                write_ddf(path, &case.ddf, &affine)
            }),
            Box::new(|| {
                let path = out_dir.join("keypoints").join(format!("{id}.csv"));
                write_keypoint_pairs(path, &case.keypoints)
            }),
        ];
        writes
            .par_iter()
            .map(|w| w())
            .collect::<Result<Vec<()>>>()?;

        let max_displacement_vox = max_magnitude(&case.ddf);
        let count = |m: &Array3<f32>| m.iter().filter(|&&v| v > 0.5).count();
        cases.push(SynthCaseSummary {
            case_id: case.case_id.clone(),
            keypoints: case.keypoints.len(),
            max_displacement_vox,
            lung_voxels: [count(&case.fixed_mask), count(&case.moving_mask)],
        });
        tracing::debug!(case = %case.case_id, "synthetic case written");
        progress(index + 1, config.cases);
    }
    Ok(SynthSummary {
        out_dir: out_dir.to_path_buf(),
        cases,
    })
}

/// Generates case number `index` (0-based; named `case_{index+1:03}`) in memory.
///
/// # Errors
/// [`Error::InvalidArgument`] for an invalid configuration.
pub fn generate_case(config: &SynthConfig, index: usize) -> Result<SynthCase> {
    config.validate()?;
    let size = config.size;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    rng.set_stream(index as u64);
    let anatomy = Anatomy::random(size, &mut rng);
    let breathing = random_breathing(config, &anatomy, &mut rng);

    let slab = size[1] * size[2];
    let voxels = size[0] * slab;
    let noise = |phase: u64, i: usize| {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        rng.set_stream((1 << 63) | ((index as u64) << 32) | (phase << 24) | i as u64);
        move || gaussian(&mut rng) * config.noise_hu as f64
    };

    // Moving (inspiration): the anatomy on the grid.
    let mut moving = vec![0f32; voxels];
    let mut moving_mask = vec![0f32; voxels];
    moving
        .par_chunks_mut(slab)
        .zip(moving_mask.par_chunks_mut(slab))
        .enumerate()
        .for_each(|(i, (image, mask))| {
            let mut next_noise = noise(0, i);
            for j in 0..size[1] {
                for k in 0..size[2] {
                    let p = [i as f64, j as f64, k as f64];
                    let at = j * size[2] + k;
                    image[at] =
                        (anatomy.hounsfield(p, config.lung_hu_insp as f64) + next_noise()) as f32;
                    mask[at] = (anatomy.lung_fraction(p) >= 0.5) as u8 as f32;
                }
            }
        });

    // Fixed (expiration): the anatomy at p + u(p), and u itself.
    let mut fixed = vec![0f32; voxels];
    let mut fixed_mask = vec![0f32; voxels];
    let mut ddf = vec![0f32; 3 * voxels];
    let (ddf0, rest) = ddf.split_at_mut(voxels);
    let (ddf1, ddf2) = rest.split_at_mut(voxels);
    fixed
        .par_chunks_mut(slab)
        .zip(fixed_mask.par_chunks_mut(slab))
        .zip(ddf0.par_chunks_mut(slab))
        .zip(ddf1.par_chunks_mut(slab).zip(ddf2.par_chunks_mut(slab)))
        .enumerate()
        .for_each(|(i, (((image, mask), u0), (u1, u2)))| {
            let mut next_noise = noise(1, i);
            for j in 0..size[1] {
                for k in 0..size[2] {
                    let p = [i as f64, j as f64, k as f64];
                    let u = breathing.displacement(p);
                    let q = [p[0] + u[0], p[1] + u[1], p[2] + u[2]];
                    let at = j * size[2] + k;
                    image[at] =
                        (anatomy.hounsfield(q, config.lung_hu_exp as f64) + next_noise()) as f32;
                    mask[at] = (anatomy.lung_fraction(q) >= 0.5) as u8 as f32;
                    u0[at] = u[0] as f32;
                    u1[at] = u[1] as f32;
                    u2[at] = u[2] as f32;
                }
            }
        });

    let keypoints = landmarks(&anatomy, &breathing, size);
    let shape = (size[0], size[1], size[2]);
    let array = |v: Vec<f32>| Array3::from_shape_vec(shape, v).expect("vector sized H*W*D");
    Ok(SynthCase {
        case_id: format!("case_{:03}", index + 1),
        fixed: array(fixed),
        moving: array(moving),
        fixed_mask: array(fixed_mask),
        moving_mask: array(moving_mask),
        ddf: Array4::from_shape_vec((3, size[0], size[1], size[2]), ddf)
            .expect("vector sized 3*H*W*D"),
        keypoints,
    })
}

/// The breathing field of a case, proportional to the grid size: at 192x192x208 with 1.75 mm
/// voxels the diaphragm descends about 16 voxels (28 mm) and the bases widen by 5-6 voxels,
/// the range of breath-hold inspiration/expiration pairs (identity lung Dice about 0.8).
fn random_breathing(config: &SynthConfig, anatomy: &Anatomy, rng: &mut ChaCha8Rng) -> Breathing {
    let s = config.amplitude_scale * rng.gen_range(0.7..1.3);
    let size = config.size.map(|n| n as f64);
    let amplitude = [
        5.0 * s * size[0] / 192.0,
        6.0 * s * size[1] / 192.0,
        16.0 * s * size[2] / 208.0,
    ];
    let lungs = &anatomy.lungs;
    let base = lungs[0].center[2] - 0.5 * lungs[0].radii[2];
    Breathing::new(anatomy.body, amplitude, base, 0.3 * lungs[0].radii[2])
}

/// Vessel branch points inside the grid, with their fixed-space positions.
fn landmarks(anatomy: &Anatomy, breathing: &Breathing, size: [usize; 3]) -> KeypointPairs {
    let inside = |p: [f64; 3]| (0..3).all(|a| p[a] >= 0.0 && p[a] <= (size[a] - 1) as f64);
    let mut pairs = KeypointPairs::default();
    for &m in &anatomy.vessels.branch_points {
        let (f, residual) = breathing.invert(m);
        if residual < 1e-6 && inside(f) && inside(m) {
            pairs.fixed.push(f);
            pairs.moving.push(m);
        }
    }
    pairs
}

/// A standard normal sample (Box-Muller).
fn gaussian(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>(); // (0, 1]
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn max_magnitude(ddf: &Array4<f32>) -> f32 {
    let (_, h, w, d) = ddf.dim();
    let n = h * w * d;
    let flat = ddf.as_slice().expect("generated DDFs are contiguous");
    (0..n)
        .map(|v| (flat[v].powi(2) + flat[n + v].powi(2) + flat[2 * n + v].powi(2)).sqrt())
        .fold(0.0, f32::max)
}

#[cfg(test)]
mod tests;
