//! `medray synth --from-ct SCAN`: breath-hold pairs with a known deformation made from one real
//! chest CT, in the same Learn2Reg layout as the phantoms ([`super::generate`]). A clinic runs
//! it on its own scans to check a registration before trusting it (digital phantoms with a
//! known deformation, as AAPM TG-132 recommends).
//!
//! The scan is taken as the **inspiration** (MOVING, `case_XXX_insp`) image. For each case:
//!
//! 1. the scan (NIfTI, or a folder holding one DICOM series) is reoriented to the model's axes
//!    (toward R, A, S; `grid`), the body and lungs are found on a coarse copy, and a box around
//!    them (the body in-plane; the lungs from 40 mm below to 15 mm above) is resampled onto the
//!    output grid (anti-aliased; the affine gives every output voxel its world position);
//! 2. body and lungs are segmented on the output grid (`segment`; or the given lung mask is
//!    resampled), and the lungs become the breathing model's columns (`thorax`);
//! 3. the same breathing model as the phantoms ([`super::breathing`]: the diaphragm drives it,
//!    the lungs slide along a still chest wall, density follows volume) gets amplitudes drawn
//!    per case from the [`Motion`] preset, calibrated so the landmarks' mean displacement is
//!    the drawn one;
//! 4. the FIXED (expiration, `_exp`) image is the scan at `Φ(p) = p + u(p)`, its parenchyma
//!    denser where compressed; `u` is written as the ground truth (voxels, `warp(moving, u) ~
//!    fixed`); the fixed lung mask is the moving one at `Φ(p)`;
//! 5. landmarks: vessel points `m` of the scan inside the lungs (`landmarks`) and their fixed
//!    positions `f` with `Φ(f) = m`, kept only where `u` is smooth over `f`'s voxel cell (so
//!    warping `f` with the written field, trilinearly, gives `m`).
//!
//! Cases differ by their seed stream only: same anatomy, different breathing.

mod grid;
mod landmarks;
mod morphology;
mod motion;
mod segment;
mod thorax;

use std::path::{Path, PathBuf};

use ndarray::{Array3, Array4};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::breathing::{expiration_hu, Breathing, BreathingParams};
use super::{
    max_magnitude, stats, Motion, MotionStats, SynthCaseSummary, SynthSummary, MAX_LANDMARKS,
};
use crate::keypoints::KeypointPairs;
use crate::nifti_io::{read_volume, Volume};
use crate::{Error, Result};

use grid::{trilinear, Orientation, OutputGrid};
use motion::CtMotion;
use thorax::CtThorax;

/// A scan must span at least this many mm along every axis (a chest CT covers the lungs).
pub const MIN_EXTENT_MM: f64 = 100.0;
/// Both lungs together must hold at least this volume (mL).
pub const MIN_LUNG_ML: f64 = 200.0;
/// Coarse voxel size (mm) of the first segmentation, which only places the output box.
const COARSE_MM: f64 = 4.0;
/// The output box reaches this far below the lungs (mm): the abdomen that follows the
/// diaphragm.
const BELOW_LUNGS_MM: f64 = 40.0;
/// ... and this far above them.
const ABOVE_LUNGS_MM: f64 = 15.0;
/// ... and this far beyond the body in-plane.
const AROUND_BODY_MM: f64 = 5.0;
/// Lung columns shorter than this many times the case's drawn mean displacement (mm) get a
/// proportionally smaller diaphragm rise (the model caps the rise at 55% of the shortest
/// column; see `thorax`) ...
const REFERENCE_HEIGHT_PER_MEAN: f64 = 8.0;
/// ... within these bounds (mm).
const REFERENCE_HEIGHT_MM: (f64, f64) = (40.0, 250.0);
/// In-plane slide over twice the drawn mean displacement (the phantoms: 0.5-0.8). A real
/// lung's sloping walls turn part of the slide into vertical motion along them, so a smaller
/// slide keeps the motion ~85-90% cranio-caudal, as DIR-Lab's.
const SLIDE_RATIO: (f64, f64) = (0.2, 0.4);
/// Parenchyma (HU below this, in the lungs) gets denser in expiration; vessels keep their value.
const PARENCHYMA_HU: f32 = -300.0;

/// What `synth --from-ct` makes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FromCtConfig {
    /// The inspiration CT: a NIfTI file or a folder holding one DICOM series.
    pub scan: PathBuf,
    /// A lung mask on the scan's grid (non-zero = lung) instead of the thresholds.
    pub lung_mask: Option<PathBuf>,
    /// Number of cases (`case_001` ..), each with its own breathing.
    pub cases: usize,
    /// Output grid `[H, W, D]` (axes toward R, A, S); the spacing is the box over the size.
    pub size: [usize; 3],
    /// Seed of every random choice.
    pub seed: u64,
    /// How much the lungs move.
    pub motion: Motion,
    /// Multiplies the drawn breathing amplitude (at most 4).
    pub amplitude_scale: f64,
    /// Expiration parenchyma is denser where compressed (tissue mass kept per voxel).
    pub density_follows_volume: bool,
}

impl FromCtConfig {
    /// Defaults for `scan`: 4 cases of 192 x 192 x 160 voxels, DIR-Lab motion.
    pub fn new(scan: impl Into<PathBuf>) -> Self {
        FromCtConfig {
            scan: scan.into(),
            lung_mask: None,
            cases: 4,
            size: [192, 192, 160],
            seed: 0,
            motion: Motion::Dirlab,
            amplitude_scale: 1.0,
            density_follows_volume: true,
        }
    }

    /// Sets the given lung mask.
    pub fn with_lung_mask(mut self, mask: impl Into<PathBuf>) -> Self {
        self.lung_mask = Some(mask.into());
        self
    }

    /// Sets the number of cases.
    pub fn with_cases(mut self, cases: usize) -> Self {
        self.cases = cases;
        self
    }

    /// Sets the output grid size.
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

    fn validate(&self) -> Result<()> {
        if self.cases == 0 {
            return Err(Error::invalid("--cases", "must be at least 1"));
        }
        if self.size.iter().any(|&n| !(16..=1024).contains(&n)) {
            return Err(Error::invalid(
                "--size",
                format!("{:?}: every size must be in 16..=1024", self.size),
            ));
        }
        if !self.amplitude_scale.is_finite() || !(0.0..=4.0).contains(&self.amplitude_scale) {
            return Err(Error::invalid(
                "--motion-scale",
                format!("{} must be in 0..=4", self.amplitude_scale),
            ));
        }
        Ok(())
    }
}

/// What [`generate_from_ct`] wrote (also saved as `synth.json`; its fields are those of a
/// [`SynthSummary`] plus the scan's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FromCtSummary {
    /// The per-case table, as the phantoms'.
    #[serde(flatten)]
    pub synth: SynthSummary,
    /// The scan the pairs come from.
    pub scan: PathBuf,
    /// The lung mask used instead of the thresholds, if any.
    pub lung_mask: Option<PathBuf>,
    /// Output grid `[H, W, D]`.
    pub size: [usize; 3],
    /// Voxel-to-world affine of every written image.
    pub affine: [[f64; 4]; 4],
    /// Body volume on the output grid (mL).
    pub body_ml: f64,
    /// Volume of each lung on the output grid (mL), lower axis-0 (right) first.
    pub lung_ml: Vec<f64>,
    /// Vessel points found in the lungs (each case keeps those that invert cleanly).
    pub vessel_points: usize,
}

/// The scan on the output grid, segmented, with what every case shares.
struct Prepared {
    grid: OutputGrid,
    /// The reoriented scan (HU), anti-aliased for the output spacing.
    scan: Array3<f32>,
    moving: Array3<f32>,
    moving_mask: Array3<f32>,
    thorax: CtThorax,
    /// Vessel points (mm from output voxel 0).
    vessels: Vec<[f64; 3]>,
    body_ml: f64,
    lung_ml: Vec<f64>,
}

/// Generates `config.cases` pairs from `config.scan` under `out_dir`, in the layout of
/// [`super::generate`] (`scans/`, `lungMasks/`, `keypoints/`, `groundtruth/`, `synth.json`).
/// `progress(done, total, case)` is called after each case.
///
/// # Errors
/// [`Error::Io`] / [`Error::Nifti`] / [`Error::Dicom`] naming a file that cannot be read or
/// written; [`Error::InvalidArgument`] naming the scan when it is too small or no lungs are
/// found in it, naming `--ct-lung-mask` when the mask does not match the scan, or naming the
/// option of an invalid setting.
pub fn generate_from_ct(
    config: &FromCtConfig,
    out_dir: impl AsRef<Path>,
    mut progress: impl FnMut(usize, usize, &SynthCaseSummary),
) -> Result<FromCtSummary> {
    config.validate()?;
    let out_dir = out_dir.as_ref();
    let prepared = prepare(config)?;
    for sub in ["scans", "lungMasks", "keypoints", "groundtruth"] {
        let dir = out_dir.join(sub);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    let mut cases = Vec::with_capacity(config.cases);
    for index in 0..config.cases {
        let case = make_case(config, &prepared, index);
        write_case(out_dir, &case, &prepared)?;
        let lung_voxels = [
            stats::count(&case.fixed_mask),
            stats::count(&prepared.moving_mask),
        ];
        let summary = SynthCaseSummary {
            case_id: case.id.clone(),
            keypoints: case.keypoints.len(),
            max_displacement_vox: max_magnitude(&case.ddf),
            lung_voxels,
            motion: MotionStats::from_pairs(&case.keypoints, prepared.grid.spacing),
            lung_dice: stats::dice(&case.fixed_mask, &prepared.moving_mask),
            lung_volume_ratio: lung_voxels[0] as f64 / lung_voxels[1].max(1) as f64,
        };
        progress(index + 1, config.cases, &summary);
        cases.push(summary);
    }
    let summary = FromCtSummary {
        synth: SynthSummary {
            out_dir: out_dir.to_path_buf(),
            motion: config.motion,
            spacing_mm: prepared.grid.spacing,
            cases,
        },
        scan: config.scan.clone(),
        lung_mask: config.lung_mask.clone(),
        size: config.size,
        affine: prepared.grid.affine,
        body_ml: prepared.body_ml,
        lung_ml: prepared.lung_ml.clone(),
        vessel_points: prepared.vessels.len(),
    };
    let json = serde_json::to_vec_pretty(&summary)
        .map_err(|e| Error::invalid("synth.json", e.to_string()))?;
    crate::atomic::write_bytes(&out_dir.join("synth.json"), &json)?;
    Ok(summary)
}

/// Reads, reorients, crops, resamples and segments the scan (step 1-2 of the module docs).
fn prepare(config: &FromCtConfig) -> Result<Prepared> {
    let path = &config.scan;
    let scan_name = path.display().to_string();
    let volume = read_volume(path)?;
    let shape = volume.shape();
    let extent = [0, 1, 2].map(|a| shape[a] as f64 * volume.spacing[a]);
    if shape.iter().any(|&n| n < 16) || extent.iter().any(|&e| e < MIN_EXTENT_MM) {
        return Err(Error::invalid(
            scan_name,
            format!(
                "scan too small for a chest CT: {shape:?} voxels, {:.0} x {:.0} x {:.0} mm \
                 (need at least 16 voxels and {MIN_EXTENT_MM} mm along every axis)",
                extent[0], extent[1], extent[2]
            ),
        ));
    }
    let orientation = Orientation::of(&volume.affine);
    let ct = orientation.apply(&volume.data);
    let affine = orientation.affine(&volume.affine, shape);
    let spacing = orientation.spacing(volume.spacing);
    let given = match &config.lung_mask {
        Some(mask) => Some(orientation.apply(&read_mask(mask, &volume)?)),
        None => None,
    };
    drop(volume);

    // Coarse segmentation: the output box.
    let factor = spacing.map(|s| ((COARSE_MM / s).floor() as usize).max(1));
    let coarse_spacing = [0, 1, 2].map(|a| spacing[a] * factor[a] as f64);
    let coarse = block_mean(&ct, factor);
    let coarse_body = segment::body_mask(&coarse);
    let coarse_air = match &given {
        Some(mask) => block_mean(mask, factor).mapv(|m| m >= 0.5),
        None => segment::air_in_body(&coarse, &coarse_body),
    };
    let (coarse_lungs, _) = segment::split_lungs(&coarse_air, coarse_spacing);
    let lung_box = bounding_box(&coarse_lungs.mapv(|l| l > 0));
    let body_box = bounding_box(&coarse_body);
    let (Some((lung_lo, lung_hi)), Some((body_lo, body_hi))) = (lung_box, body_box) else {
        return Err(no_lungs(config, 0.0));
    };
    let coarse_ml = coarse_lungs.iter().filter(|&&l| l > 0).count() as f64
        * coarse_spacing.iter().product::<f64>()
        / 1000.0;
    if coarse_ml < MIN_LUNG_ML {
        return Err(no_lungs(config, coarse_ml));
    }
    let to_scan = |c: usize, a: usize, high: bool| {
        (c * factor[a] + if high { factor[a] - 1 } else { 0 }) as f64
    };
    let mut lo = [0.0; 3];
    let mut hi = [0.0; 3];
    for a in 0..3 {
        let (l, h, below, above) = if a < 2 {
            (body_lo[a], body_hi[a], AROUND_BODY_MM, AROUND_BODY_MM)
        } else {
            (lung_lo[a], lung_hi[a], BELOW_LUNGS_MM, ABOVE_LUNGS_MM)
        };
        let last = (ct.shape()[a] - 1) as f64;
        lo[a] = (to_scan(l, a, false) - below / spacing[a])
            .round()
            .clamp(0.0, last);
        hi[a] = (to_scan(h, a, true) + above / spacing[a])
            .round()
            .clamp(lo[a], last);
    }
    let grid = OutputGrid::over(lo, hi, config.size, &affine, spacing);

    // Fine: the scan on the output grid.
    let sigma = grid.step.map(|s| {
        if s > 1.0 {
            0.4 * (s * s - 1.0).sqrt()
        } else {
            0.0
        }
    });
    let scan = morphology::gaussian(&ct, sigma);
    drop(ct);
    let moving = sample_grid(&grid, |v| trilinear(&scan, v));
    let body = segment::body_mask(&moving);
    let air = match &given {
        Some(mask) => sample_grid(&grid, |v| trilinear(mask, v)).mapv(|m| m >= 0.5),
        None => segment::air_in_body(&moving, &body),
    };
    let (labels, lungs) = segment::split_lungs(&air, grid.spacing);
    let voxel_ml = grid.spacing.iter().product::<f64>() / 1000.0;
    let lung_ml: Vec<f64> = (1..=lungs as u8)
        .map(|l| labels.iter().filter(|&&v| v == l).count() as f64 * voxel_ml)
        .collect();
    if lung_ml.iter().sum::<f64>() < MIN_LUNG_ML {
        return Err(no_lungs(config, lung_ml.iter().sum()));
    }
    let thorax = CtThorax::new(&labels, lungs, &moving, grid.spacing);
    let vessels = landmarks::vessel_points(&moving, &labels, grid.spacing, 4 * MAX_LANDMARKS);
    let body_ml = body.iter().filter(|&&b| b).count() as f64 * voxel_ml;
    Ok(Prepared {
        moving_mask: labels.mapv(|l| (l > 0) as u8 as f32),
        grid,
        scan,
        moving,
        thorax,
        vessels,
        body_ml,
        lung_ml,
    })
}

fn no_lungs(config: &FromCtConfig, found_ml: f64) -> Error {
    let field = match &config.lung_mask {
        Some(mask) => format!("--ct-lung-mask {}", mask.display()),
        None => config.scan.display().to_string(),
    };
    let how = if config.lung_mask.is_some() {
        "the mask's non-zero voxels"
    } else {
        "voxels below -400 HU inside the body; pass --ct-lung-mask if the scan needs a mask"
    };
    Error::invalid(
        field,
        format!("no lungs found: {found_ml:.0} mL of lung ({how}), need at least {MIN_LUNG_ML} mL"),
    )
}

/// Reads a lung mask that must lie on `scan`'s grid.
fn read_mask(path: &Path, scan: &Volume) -> Result<Array3<f32>> {
    let field = || format!("--ct-lung-mask {}", path.display());
    let mask = read_volume(path)?;
    if mask.shape() != scan.shape() {
        return Err(Error::invalid(
            field(),
            format!(
                "shape {:?} differs from the scan's {:?}",
                mask.shape(),
                scan.shape()
            ),
        ));
    }
    let worst = (0..3)
        .flat_map(|r| (0..4).map(move |c| (r, c)))
        .map(|(r, c)| (mask.affine[r][c] - scan.affine[r][c]).abs())
        .fold(0.0, f64::max);
    if worst > 0.1 {
        return Err(Error::invalid(
            field(),
            format!("its affine differs from the scan's by up to {worst:.2} mm: not the same grid"),
        ));
    }
    Ok(mask.data.mapv(|v| (v != 0.0) as u8 as f32))
}

/// Mean over blocks of `factor` voxels (the last block per axis may be partial).
fn block_mean(data: &Array3<f32>, factor: [usize; 3]) -> Array3<f32> {
    let (h, w, d) = data.dim();
    let out = [h, w, d]
        .iter()
        .zip(factor)
        .map(|(&n, f)| n.div_ceil(f))
        .collect::<Vec<_>>();
    let mut sum = Array3::<f32>::zeros((out[0], out[1], out[2]));
    let mut count = Array3::<f32>::zeros((out[0], out[1], out[2]));
    for ((i, j, k), &v) in data.indexed_iter() {
        let at = [i / factor[0], j / factor[1], k / factor[2]];
        sum[at] += v;
        count[at] += 1.0;
    }
    sum / count
}

/// Lowest and highest voxel indices of a non-empty mask.
fn bounding_box(mask: &Array3<bool>) -> Option<([usize; 3], [usize; 3])> {
    let mut lo = [usize::MAX; 3];
    let mut hi = [0; 3];
    for ((i, j, k), &m) in mask.indexed_iter() {
        if m {
            for (a, v) in [i, j, k].into_iter().enumerate() {
                lo[a] = lo[a].min(v);
                hi[a] = hi[a].max(v);
            }
        }
    }
    (lo[0] != usize::MAX).then_some((lo, hi))
}

/// `f(scan voxel of v)` for every output voxel `v`, slabs along axis 0 in parallel.
fn sample_grid(grid: &OutputGrid, f: impl Fn([f64; 3]) -> f32 + Sync) -> Array3<f32> {
    let [h, w, d] = grid.size;
    let mut out = vec![0f32; grid.voxels()];
    out.par_chunks_mut(w * d).enumerate().for_each(|(i, slab)| {
        for (n, value) in slab.iter_mut().enumerate() {
            let p = [i, n / d, n % d];
            let mm = [0, 1, 2].map(|a| p[a] as f64 * grid.spacing[a]);
            *value = f(grid.scan_voxel(mm));
        }
    });
    Array3::from_shape_vec((h, w, d), out).expect("vector sized H*W*D")
}

/// One case in memory.
struct Case {
    id: String,
    fixed: Array3<f32>,
    fixed_mask: Array3<f32>,
    ddf: Array4<f32>,
    keypoints: KeypointPairs,
}

fn make_case(config: &FromCtConfig, prepared: &Prepared, index: usize) -> Case {
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    rng.set_stream(index as u64);
    // Drawn as the phantoms draw theirs except for a smaller in-plane slide.
    let (target_mean, params) = BreathingParams::draw(&mut rng, config.motion, SLIDE_RATIO);
    let reference = (REFERENCE_HEIGHT_PER_MEAN * target_mean * config.amplitude_scale)
        .clamp(REFERENCE_HEIGHT_MM.0, REFERENCE_HEIGHT_MM.1);
    let thorax = prepared.thorax.clone().with_reference_height(reference);
    let mut breathing = Breathing::new(thorax, params);
    for _ in 0..4 {
        let pairs = landmark_pairs(&breathing, prepared);
        let mean =
            pairs.iter().map(|(f, m)| distance(f, m)).sum::<f64>() / pairs.len().max(1) as f64;
        if mean <= 0.0 || (mean - target_mean).abs() < 0.01 * target_mean {
            break;
        }
        breathing = breathing.scaled(target_mean / mean);
    }
    let breathing = breathing.scaled(config.amplitude_scale);
    let spacing = prepared.grid.spacing;
    let mut keypoints = KeypointPairs::default();
    let pairs = landmark_pairs(&breathing, prepared);
    let keep = pairs.len().min(MAX_LANDMARKS);
    for n in 0..keep {
        let (f, m) = pairs[n * pairs.len() / keep];
        keypoints.fixed.push([0, 1, 2].map(|a| f[a] / spacing[a]));
        keypoints.moving.push([0, 1, 2].map(|a| m[a] / spacing[a]));
    }
    let motion = CtMotion { breathing };
    let (fixed, fixed_mask, ddf) = sample_case(config, prepared, &motion);
    Case {
        id: format!("case_{:03}", index + 1),
        fixed,
        fixed_mask,
        ddf,
        keypoints,
    }
}

fn distance(a: &[f64; 3], b: &[f64; 3]) -> f64 {
    (0..3).map(|i| (a[i] - b[i]).powi(2)).sum::<f64>().sqrt()
}

/// (fixed, moving) landmark positions (mm): the vessel points that invert exactly inside a
/// lung, whose fixed position lies in the grid with its whole voxel cell in the same lung
/// (the written field is smooth there).
fn landmark_pairs(
    breathing: &Breathing<CtThorax>,
    prepared: &Prepared,
) -> Vec<([f64; 3], [f64; 3])> {
    let spacing = prepared.grid.spacing;
    let size = prepared.grid.size;
    prepared
        .vessels
        .par_iter()
        .filter_map(|&m| {
            let lung = breathing.inspiration_lung(m)?;
            let (f, residual) = breathing.invert(m);
            if residual > 1e-6 {
                return None;
            }
            let v = [0, 1, 2].map(|a| f[a] / spacing[a]);
            if (0..3).any(|a| v[a] < 0.0 || v[a] > (size[a] - 1) as f64) {
                return None;
            }
            let same = (0..8).all(|corner| {
                let c = [0, 1, 2].map(|a| {
                    let base = v[a].floor().min((size[a] - 2) as f64);
                    (base + (corner >> a & 1) as f64) * spacing[a]
                });
                breathing.expiration_lung(c) == Some(lung)
            });
            same.then_some((f, m))
        })
        .collect()
}

/// The fixed image, its lung mask and the DDF (step 4 of the module docs).
fn sample_case(
    config: &FromCtConfig,
    prepared: &Prepared,
    motion: &CtMotion,
) -> (Array3<f32>, Array3<f32>, Array4<f32>) {
    let grid = &prepared.grid;
    let [h, w, d] = grid.size;
    let spacing = grid.spacing;
    let n = grid.voxels();
    let mut fixed = vec![0f32; n];
    let mut mask = vec![0f32; n];
    let mut ddf = vec![0f32; 3 * n];
    let (u0, rest) = ddf.split_at_mut(n);
    let (u1, u2) = rest.split_at_mut(n);
    let slab = w * d;
    fixed
        .par_chunks_mut(slab)
        .zip(mask.par_chunks_mut(slab))
        .zip(u0.par_chunks_mut(slab))
        .zip(u1.par_chunks_mut(slab).zip(u2.par_chunks_mut(slab)))
        .enumerate()
        .for_each(|(i, (((image, lung), u0), (u1, u2)))| {
            for at in 0..slab {
                let p = [
                    i as f64 * spacing[0],
                    (at / d) as f64 * spacing[1],
                    (at % d) as f64 * spacing[2],
                ];
                let (q, region) = motion.map(p);
                let mut hu = trilinear(&prepared.scan, grid.scan_voxel(q));
                let in_lung =
                    trilinear(&prepared.moving_mask, [0, 1, 2].map(|a| q[a] / spacing[a])) >= 0.5;
                if config.density_follows_volume && in_lung && hu < PARENCHYMA_HU {
                    hu = expiration_hu(hu as f64, motion.volume_change(region, p)) as f32;
                }
                image[at] = hu;
                lung[at] = in_lung as u8 as f32;
                u0[at] = ((q[0] - p[0]) / spacing[0]) as f32;
                u1[at] = ((q[1] - p[1]) / spacing[1]) as f32;
                u2[at] = ((q[2] - p[2]) / spacing[2]) as f32;
            }
        });
    let array = |v: Vec<f32>| Array3::from_shape_vec((h, w, d), v).expect("vector sized H*W*D");
    (
        array(fixed),
        array(mask),
        Array4::from_shape_vec((3, h, w, d), ddf).expect("vector sized 3*H*W*D"),
    )
}

fn write_case(out_dir: &Path, case: &Case, prepared: &Prepared) -> Result<()> {
    super::write_case_files(
        out_dir,
        &case.id,
        &super::CaseVolumes {
            fixed: &case.fixed,
            moving: &prepared.moving,
            fixed_mask: &case.fixed_mask,
            moving_mask: &prepared.moving_mask,
            ddf: &case.ddf,
            keypoints: &case.keypoints,
        },
        &prepared.grid.affine,
    )
}

#[cfg(test)]
mod tests;
