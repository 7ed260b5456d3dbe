//! Synthetic breath-hold lung CT pairs with a known deformation, in the Learn2Reg 2020
//! "CT Lung" layout.
//!
//! Used when the real dataset (Zenodo 3835682) is absent, and by tests and benchmarks, because
//! unlike the real data the phantom comes with the exact answer. Everything is defined in
//! physical space (mm) over a fixed field of view, [`EXTENT_MM`] = 336 x 240 x 364 mm, and
//! sampled on the grid: the spacing is the extent over the grid size, so 96 x 96 x 104 voxels
//! show the same patient as 192 x 192 x 208 at twice the spacing. For each case:
//!
//! * the **inspiration** anatomy (body, fat, ribs, spine, two lungs over diaphragm domes,
//!   dense vessel trees; see `anatomy`) is a continuous function `A(q)`; the MOVING image is
//!   `A` sampled on the grid, lung parenchyma at [`SynthConfig::lung_hu_insp`];
//! * the breath-hold motion ([`breathing`]: the diaphragm rises in expiration, the lungs slide
//!   along a still chest wall, the abdomen follows the diaphragm) maps each expiration point
//!   `p` to its inspiration position `Φ(p) = p + u(p)`. The FIXED (expiration) image is
//!   `A(Φ(p))`, with the parenchyma denser where it is compressed
//!   ([`breathing::expiration_hu`]). So `u` is exactly the backward DDF of MONAI's `Warp`:
//!   `warp(moving, u) ~ fixed`; it is written (in voxels) as the ground truth;
//! * its amplitude is drawn per case from the [`Motion`] preset (DIR-Lab-like by default:
//!   mean landmark displacement 6-15 mm) and calibrated on the case's own landmarks, so the
//!   drawn mean is what the landmark table shows (before [`SynthConfig::amplitude_scale`]);
//! * landmarks are the vessel branch points `m_k` (moving space; several hundred per case,
//!   at most [`MAX_LANDMARKS`]) and the fixed points `f_k` with `Φ(f_k) = m_k`;
//! * lung masks are the lungs of each phase, 0/1;
//! * gaussian noise is added to both scans, which are stored as int16 HU.
//!
//! [`generate`] also writes `synth.json` (a [`SynthSummary`]: per case the landmark
//! displacement mean, 95th percentile and maximum in mm, and the lung Dice before
//! registration), to compare with published tables.
//!
//! Everything is deterministic for a seed (ChaCha8: one stream per case, one per noise slab),
//! independent of the number of threads; the slabs along array axis 0 are computed in
//! parallel with rayon.

mod anatomy;
pub mod breathing;
mod config;
pub mod from_ct;
mod sample;
mod stats;
mod vec3;
mod vessels;

use std::path::{Path, PathBuf};

use ndarray::{Array3, Array4};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::keypoints::{write_keypoint_pairs, KeypointPairs};
use crate::nifti_io::{write_ddf, write_volume_as, StoredType};
use crate::{Error, Result};

use anatomy::{Anatomy, Chest};
use breathing::{Breathing, BreathingParams};

pub use anatomy::EXTENT_MM;
pub use config::{Motion, SynthConfig};
pub use stats::MotionStats;

/// At most this many landmark pairs are written per case (evenly thinned over both lungs).
pub const MAX_LANDMARKS: usize = 1000;

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
    /// Vessel branch points: fixed point and its moving correspondence (voxels).
    pub keypoints: KeypointPairs,
    /// Displacement statistics of `keypoints` (mm).
    pub motion: MotionStats,
}

/// The landmarks of a case without its volumes ([`case_landmarks`]).
#[derive(Debug, Clone)]
pub struct CaseLandmarks {
    /// Landmark pairs (voxels), as [`SynthCase::keypoints`].
    pub keypoints: KeypointPairs,
    /// Their displacement statistics (mm).
    pub motion: MotionStats,
    /// The breathing parameters in use (after calibration and caps).
    pub breathing: BreathingParams,
}

/// What one case contains, as reported by [`generate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SynthCaseSummary {
    /// `case_XXX`.
    pub case_id: String,
    /// Number of landmark pairs written.
    pub keypoints: usize,
    /// Largest displacement magnitude over the whole DDF (voxels).
    pub max_displacement_vox: f32,
    /// Lung voxels in the fixed and moving masks.
    pub lung_voxels: [usize; 2],
    /// Landmark displacement statistics (mm).
    pub motion: MotionStats,
    /// Dice of the fixed and moving lung masks (before registration).
    pub lung_dice: f64,
    /// Expiration over inspiration lung volume.
    pub lung_volume_ratio: f64,
}

/// What [`generate`] wrote (also saved as `synth.json` in the output folder).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SynthSummary {
    /// The dataset root (contains `scans/`, `lungMasks/`, `keypoints/`, `groundtruth/`).
    pub out_dir: PathBuf,
    /// The motion preset.
    pub motion: Motion,
    /// Voxel size (mm).
    pub spacing_mm: [f64; 3],
    /// One entry per case, in order.
    pub cases: Vec<SynthCaseSummary>,
}

/// Generates `config.cases` cases under `out_dir` in the Learn2Reg layout:
/// `scans/case_XXX_{exp,insp}.nii.gz` (int16 HU; exp = fixed, insp = moving),
/// `lungMasks/case_XXX_{exp,insp}.nii.gz` (uint8 0/1), `keypoints/case_XXX.csv` (6-column
/// pairs, fixed then moving, voxels) and `groundtruth/case_XXX_ddf.nii.gz` (the true DDF,
/// see [`crate::nifti_io::write_ddf`]), plus `synth.json` (the returned [`SynthSummary`],
/// written atomically at the end). `progress(done, total)` is called after each case.
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
        write_case_files(
            out_dir,
            &case.case_id,
            &CaseVolumes {
                fixed: &case.fixed,
                moving: &case.moving,
                fixed_mask: &case.fixed_mask,
                moving_mask: &case.moving_mask,
                ddf: &case.ddf,
                keypoints: &case.keypoints,
            },
            &affine,
        )?;

        let lung_voxels = [
            stats::count(&case.fixed_mask),
            stats::count(&case.moving_mask),
        ];
        cases.push(SynthCaseSummary {
            case_id: case.case_id.clone(),
            keypoints: case.keypoints.len(),
            max_displacement_vox: max_magnitude(&case.ddf),
            lung_voxels,
            motion: case.motion,
            lung_dice: stats::dice(&case.fixed_mask, &case.moving_mask),
            lung_volume_ratio: lung_voxels[0] as f64 / lung_voxels[1].max(1) as f64,
        });
        tracing::debug!(case = %case.case_id, "synthetic case written");
        progress(index + 1, config.cases);
    }
    let summary = SynthSummary {
        out_dir: out_dir.to_path_buf(),
        motion: config.motion,
        spacing_mm: config.spacing(),
        cases,
    };
    let json = serde_json::to_vec_pretty(&summary)
        .map_err(|e| Error::invalid("synth.json", e.to_string()))?;
    crate::atomic::write_bytes(&out_dir.join("synth.json"), &json)?;
    Ok(summary)
}

/// The arrays of one case, as [`write_case_files`] writes them.
pub(crate) struct CaseVolumes<'a> {
    pub(crate) fixed: &'a Array3<f32>,
    pub(crate) moving: &'a Array3<f32>,
    pub(crate) fixed_mask: &'a Array3<f32>,
    pub(crate) moving_mask: &'a Array3<f32>,
    pub(crate) ddf: &'a Array4<f32>,
    pub(crate) keypoints: &'a KeypointPairs,
}

/// Writes one case in the Learn2Reg layout under `out_dir` (the folders exist):
/// `scans/<id>_{exp,insp}.nii.gz` (int16), `lungMasks/<id>_{exp,insp}.nii.gz` (uint8),
/// `groundtruth/<id>_ddf.nii.gz` and `keypoints/<id>.csv`, the six files in parallel.
pub(crate) fn write_case_files(
    out_dir: &Path,
    id: &str,
    case: &CaseVolumes<'_>,
    affine: &[[f64; 4]; 4],
) -> Result<()> {
    let scan = |phase: &str| out_dir.join("scans").join(format!("{id}_{phase}.nii.gz"));
    let mask = |phase: &str| {
        out_dir
            .join("lungMasks")
            .join(format!("{id}_{phase}.nii.gz"))
    };
    let writes: Vec<Box<dyn Fn() -> Result<()> + Sync + '_>> = vec![
        Box::new(|| write_volume_as(scan("exp"), case.fixed, affine, StoredType::Int16)),
        Box::new(|| write_volume_as(scan("insp"), case.moving, affine, StoredType::Int16)),
        Box::new(|| write_volume_as(mask("exp"), case.fixed_mask, affine, StoredType::Uint8)),
        Box::new(|| write_volume_as(mask("insp"), case.moving_mask, affine, StoredType::Uint8)),
        Box::new(|| {
            let path = out_dir.join("groundtruth").join(format!("{id}_ddf.nii.gz"));
            write_ddf(path, case.ddf, affine)
        }),
        Box::new(|| {
            let path = out_dir.join("keypoints").join(format!("{id}.csv"));
            write_keypoint_pairs(path, case.keypoints)
        }),
    ];
    writes
        .par_iter()
        .map(|w| w())
        .collect::<Result<Vec<()>>>()?;
    Ok(())
}

/// Generates case number `index` (0-based; named `case_{index+1:03}`) in memory.
///
/// # Errors
/// [`Error::InvalidArgument`] for an invalid configuration.
pub fn generate_case(config: &SynthConfig, index: usize) -> Result<SynthCase> {
    config.validate()?;
    let model = CaseModel::new(config, index);
    let volumes = sample::sample(config, index, &model.anatomy, &model.breathing);
    let keypoints = model.keypoints(config);
    Ok(SynthCase {
        case_id: format!("case_{:03}", index + 1),
        fixed: volumes.fixed,
        moving: volumes.moving,
        fixed_mask: volumes.fixed_mask,
        moving_mask: volumes.moving_mask,
        ddf: volumes.ddf,
        motion: MotionStats::from_pairs(&keypoints, config.spacing()),
        keypoints,
    })
}

/// The landmarks and motion statistics of case `index`, as [`generate_case`] makes them, but
/// without sampling any volume (fast at any grid size).
///
/// # Errors
/// [`Error::InvalidArgument`] for an invalid configuration.
pub fn case_landmarks(config: &SynthConfig, index: usize) -> Result<CaseLandmarks> {
    config.validate()?;
    let model = CaseModel::new(config, index);
    let keypoints = model.keypoints(config);
    Ok(CaseLandmarks {
        motion: MotionStats::from_pairs(&keypoints, config.spacing()),
        keypoints,
        breathing: model.breathing.params().clone(),
    })
}

/// The anatomy and breathing of one case, and its landmarks in mm.
struct CaseModel {
    anatomy: Anatomy,
    breathing: Breathing<Chest>,
    /// (expiration, inspiration) landmark positions, mm.
    landmarks: Vec<([f64; 3], [f64; 3])>,
}

impl CaseModel {
    /// Draws the anatomy and the motion of case `index` (nothing here depends on the grid).
    fn new(config: &SynthConfig, index: usize) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        rng.set_stream(index as u64);
        let anatomy = Anatomy::random(&mut rng);
        let (target_mean, params) = BreathingParams::draw(&mut rng, config.motion, (0.5, 0.8));
        // Calibrate the amplitude on the case's own landmarks (the mean is nearly linear in
        // it), then apply the user's scale.
        let mut breathing = Breathing::new(anatomy.chest.clone(), params);
        for _ in 0..3 {
            let mean = mean_displacement(&breathing, &anatomy);
            if mean <= 0.0 || (mean - target_mean).abs() < 0.01 * target_mean {
                break;
            }
            breathing = breathing.scaled(target_mean / mean);
        }
        let breathing = breathing.scaled(config.amplitude_scale);
        let landmarks = landmark_pairs(&breathing, &anatomy);
        CaseModel {
            anatomy,
            breathing,
            landmarks,
        }
    }

    /// The landmarks inside the grid, in voxels, thinned evenly to [`MAX_LANDMARKS`].
    fn keypoints(&self, config: &SynthConfig) -> KeypointPairs {
        let spacing = config.spacing();
        let to_voxels = |p: [f64; 3]| [0, 1, 2].map(|a| p[a] / spacing[a]);
        let inside =
            |p: [f64; 3]| (0..3).all(|a| p[a] >= 0.0 && p[a] <= (config.size[a] - 1) as f64);
        let all: Vec<_> = self
            .landmarks
            .iter()
            .map(|&(f, m)| (to_voxels(f), to_voxels(m)))
            .filter(|&(f, m)| inside(f) && inside(m))
            .collect();
        let mut pairs = KeypointPairs::default();
        let n = all.len();
        let keep = n.min(MAX_LANDMARKS);
        for i in 0..keep {
            let (f, m) = all[i * n / keep];
            pairs.fixed.push(f);
            pairs.moving.push(m);
        }
        pairs
    }
}

/// Vessel branch points (inspiration, mm) with their expiration positions, for those that
/// invert exactly inside a lung.
fn landmark_pairs(breathing: &Breathing<Chest>, anatomy: &Anatomy) -> Vec<([f64; 3], [f64; 3])> {
    anatomy
        .vessels
        .branch_points
        .iter()
        .filter_map(|&m| {
            breathing.inspiration_lung(m)?;
            let (f, residual) = breathing.invert(m);
            (residual < 1e-6 && breathing.expiration_lung(f).is_some()).then_some((f, m))
        })
        .collect()
}

fn mean_displacement(breathing: &Breathing<Chest>, anatomy: &Anatomy) -> f64 {
    let pairs = landmark_pairs(breathing, anatomy);
    let total: f64 = pairs
        .iter()
        .map(|(f, m)| vec3::norm(vec3::sub(*m, *f)))
        .sum();
    total / pairs.len().max(1) as f64
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
