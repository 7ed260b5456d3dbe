//! The multi-level instance optimisation: a displacement optimised on the physical
//! geometry of the original images, coarse to fine (ConvexAdam's instance optimisation,
//! Siebert, Hansen and Heinrich 2021, without its discrete step, started from the
//! network's DDF instead).
//!
//! Level `l` (0 the finest) resamples the windowed original images by `2^(l+1)` (a
//! `[1/4, 1/2, 1/4]` binomial blur then trilinear resizing with aligned corners, once per
//! halving). Its displacement lives on a control grid of one point every
//! `grid_spacing` level voxels and reaches the level grid by trilinear upsampling. Adam
//! minimises `similarity + λ · diffusion`, where the diffusion term
//! ([`crate::losses::DiffusionLoss`]) is taken on the control grid in millimetres (strain,
//! so anisotropic voxels count what they measure) and the similarity is the SSD of MIND-SSC
//! descriptors ([`super::feature_ssd`]) or LNCC of the images. Each level starts from the
//! previous one's result; the coarsest from the network's DDF. Displacements are in voxels
//! of the grid they are defined on and are rescaled by `(n' - 1) / (n - 1)` whenever they
//! change grid.

use std::time::Instant;

use candle_core::{DType, Tensor, Var};

use super::feature_ssd::FeatureSsd;
use super::{LevelReport, RefineOptions, RefineSim};
use crate::losses::{mind_ssc, DiffusionLoss, LocalNormalizedCrossCorrelationLoss};
use crate::ops::{self, Padding};
use crate::optim::{Adam, AdamConfig};
use crate::Result;

/// The images the pyramid works on: the original volumes as tensors (1, 1, N0, N1, N2),
/// already windowed, and their voxel spacing.
#[derive(Clone, Debug)]
pub struct PyramidInput<'a> {
    /// Fixed image on its original grid.
    pub fixed: &'a Tensor,
    /// Moving image on the same grid.
    pub moving: &'a Tensor,
    /// Fixed lung mask (0/1) on any grid covering the same extent (resized with nearest
    /// sampling), to weight the similarity, if any.
    pub fixed_mask: Option<&'a Tensor>,
    /// Voxel spacing of the original grid, mm.
    pub spacing_mm: [f64; 3],
}

/// Resizes a displacement field `(1, 3, ..)` in voxels of a grid of `unit_from` samples to
/// `size` samples, in voxels of a grid of `unit_to` samples.
pub fn resample_field(
    field: &Tensor,
    size: [usize; 3],
    unit_from: [usize; 3],
    unit_to: [usize; 3],
) -> Result<Tensor> {
    let scales: Vec<f64> = (0..3)
        .map(|c| {
            if unit_from[c] > 1 {
                (unit_to[c] as f64 - 1.0) / (unit_from[c] as f64 - 1.0)
            } else {
                1.0
            }
        })
        .collect();
    let scales = Tensor::new(scales.as_slice(), field.device())?
        .to_dtype(field.dtype())?
        .reshape((1, 3, 1, 1, 1))?;
    let (_, _, a, b, c) = field.dims5()?;
    let resized = if [a, b, c] == size {
        field.clone()
    } else {
        ops::resize_trilinear(field, size)?
    };
    Ok(resized.broadcast_mul(&scales)?)
}

/// Halves an image (1, C, ..) after a binomial blur with replicated borders.
fn downsample(x: &Tensor) -> Result<Tensor> {
    let (_, _, a, b, c) = x.dims5()?;
    let mut blurred = x.clone();
    for dim in 2..5 {
        let n = blurred.dim(dim)?;
        if n < 3 {
            continue;
        }
        let padded = blurred.pad_with_same(dim, 1, 1)?;
        blurred = ((padded.narrow(dim, 0, n)? + padded.narrow(dim, 2, n)?)? * 0.25)?
            .add(&(padded.narrow(dim, 1, n)? * 0.5)?)?;
    }
    let half = [a, b, c].map(|n| n.div_ceil(2).max(2));
    Ok(ops::resize_trilinear(&blurred, half)?)
}

fn level_sizes(original: [usize; 3], levels: usize) -> Vec<[usize; 3]> {
    let mut out = Vec::with_capacity(levels);
    let mut size = original;
    for _ in 0..levels {
        size = size.map(|n| n.div_ceil(2).max(2));
        out.push(size);
    }
    out
}

/// Control grid of a level grid: one point every `spacing` voxels, both ends included.
fn control_size(level: [usize; 3], spacing: usize) -> [usize; 3] {
    level.map(|n| ((n - 1).div_ceil(spacing) + 1).max(2))
}

/// What a level optimises against.
enum Similarity {
    Features(FeatureSsd),
    Lncc {
        moving: Tensor,
        fixed: Tensor,
        loss: LocalNormalizedCrossCorrelationLoss,
    },
}

impl Similarity {
    fn forward(&self, control: &Tensor, size: [usize; 3]) -> Result<Tensor> {
        match self {
            Similarity::Features(f) => f.forward(control),
            Similarity::Lncc {
                moving,
                fixed,
                loss,
            } => {
                let dense = ops::resize_trilinear(control, size)?;
                let warped = ops::warp(moving, &dense, Padding::Border)?;
                loss.forward(&warped, fixed)
            }
        }
    }
}

/// The refined displacement on the finest level's control grid, with its geometry.
#[derive(Debug)]
pub struct PyramidResult {
    /// Control-grid displacement (1, 3, g0, g1, g2), voxels of `level_size`.
    pub control: Tensor,
    /// The finest level's grid.
    pub level_size: [usize; 3],
    /// One report per level, coarsest first.
    pub levels: Vec<LevelReport>,
    /// The finest level's objective at the initial displacement.
    pub initial_loss: f64,
}

impl PyramidResult {
    /// The displacement on a grid of `size` samples covering the original extent, in
    /// voxels of that grid.
    ///
    /// # Errors
    /// A candle error.
    pub fn field_on(&self, size: [usize; 3]) -> Result<Tensor> {
        resample_field(&self.control, size, self.level_size, size)
    }
}

/// Runs the pyramid from `init` (1, 3, h, w, d), a displacement in voxels of its own grid
/// covering the same extent as the original images.
///
/// # Errors
/// [`crate::Error::InvalidArgument`] for options that [`RefineOptions::validate`] refuses
/// or for [`RefineSim::Model`] (not a pyramid similarity); a candle error.
pub fn refine_pyramid(
    init: &Tensor,
    input: &PyramidInput<'_>,
    options: &RefineOptions,
) -> Result<PyramidResult> {
    options.validate()?;
    let original = {
        let (_, _, a, b, c) = input.fixed.dims5()?;
        [a, b, c]
    };
    let init_size = {
        let (_, _, a, b, c) = init.dims5()?;
        [a, b, c]
    };
    let sizes = level_sizes(original, options.levels);
    // Image pyramids, finest first.
    let mut fixed_levels = Vec::with_capacity(sizes.len());
    let mut moving_levels = Vec::with_capacity(sizes.len());
    let mut mask_levels = Vec::with_capacity(sizes.len());
    let (mut f, mut m) = (
        input.fixed.to_dtype(DType::F32)?,
        input.moving.to_dtype(DType::F32)?,
    );
    for size in &sizes {
        f = downsample(&f)?;
        m = downsample(&m)?;
        debug_assert_eq!(f.dims()[2..], size[..]);
        fixed_levels.push(f.clone());
        moving_levels.push(m.clone());
        mask_levels.push(match input.fixed_mask {
            Some(mask) => Some(
                ops::upsample_nearest3d_to(&mask.to_dtype(DType::F32)?, *size)?
                    .ge(0.5)?
                    .to_dtype(DType::F32)?,
            ),
            None => None,
        });
    }

    let mut control: Option<(Tensor, [usize; 3])> = None; // (field, its level size)
    let mut reports = Vec::with_capacity(sizes.len());
    let mut initial_loss = f64::NAN;
    for l in (0..sizes.len()).rev() {
        let start = Instant::now();
        let size = sizes[l];
        let grid = control_size(size, options.grid_spacing);
        let theta = match &control {
            None => resample_field(&init.to_dtype(DType::F32)?, grid, init_size, size)?,
            Some((c, prev)) => resample_field(c, grid, *prev, size)?,
        };
        let t_feat = Instant::now();
        let similarity = match options.sim {
            RefineSim::Mind => {
                let mf = mind_ssc(&moving_levels[l], 1, 1)?;
                let ff = mind_ssc(&fixed_levels[l], 1, 1)?;
                Similarity::Features(FeatureSsd::new(&mf, &ff, mask_levels[l].as_ref())?)
            }
            RefineSim::Lncc => Similarity::Lncc {
                moving: moving_levels[l].clone(),
                fixed: fixed_levels[l].clone(),
                loss: LocalNormalizedCrossCorrelationLoss::new(options.lncc_kernel)?,
            },
            RefineSim::Model => {
                return Err(crate::Error::invalid(
                    "refine-sim",
                    "`model` refines on the network grid, not in the pyramid",
                ))
            }
        };
        let features_ms = t_feat.elapsed().as_secs_f64() * 1e3;
        // Component c of the control displacement in mm; control steps along axis a in mm.
        let voxel_mm: [f64; 3] = std::array::from_fn(|c| {
            input.spacing_mm[c] * (original[c] as f64 - 1.0) / (size[c] as f64 - 1.0)
        });
        let step_mm: [f64; 3] =
            std::array::from_fn(|a| voxel_mm[a] * (size[a] as f64 - 1.0) / (grid[a] as f64 - 1.0));
        let diffusion = DiffusionLoss::with_scales(voxel_mm, step_mm)?;
        let objective = |t: &Tensor| -> Result<(Tensor, Tensor)> {
            let sim = similarity.forward(t, size)?;
            let reg = (diffusion.forward(t)? * options.lambda)?;
            Ok(((&sim + &reg)?, sim))
        };
        let var = Var::from_tensor(&theta)?;
        let mut adam = Adam::new(
            vec![("control".to_string(), var.clone())],
            AdamConfig::with_lr(options.lr),
        )?;
        let scalar =
            |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
        if l == 0 {
            let start_field = resample_field(&init.to_dtype(DType::F32)?, grid, init_size, size)?;
            initial_loss = scalar(&objective(&start_field)?.0)?;
        }
        let (total0, sim0) = objective(var.as_tensor())?;
        let (loss_before, sim_before) = (scalar(&total0)?, scalar(&sim0)?);
        let (mut tf, mut tb, mut ta) = (0.0, 0.0, 0.0);
        for _ in 0..options.steps {
            let t = Instant::now();
            let (total, _) = objective(var.as_tensor())?;
            tf += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let grads = total.backward()?;
            tb += t.elapsed().as_secs_f64();
            let t = Instant::now();
            adam.step(&grads)?;
            ta += t.elapsed().as_secs_f64();
        }
        tracing::debug!(
            level = l,
            features_ms,
            forward_s = tf,
            backward_s = tb,
            adam_s = ta,
            "refine level"
        );
        let refined = var.as_tensor().detach();
        let (total1, sim1) = objective(&refined)?;
        reports.push(LevelReport {
            size,
            control_grid: grid,
            steps: options.steps,
            loss_before,
            loss_after: scalar(&total1)?,
            similarity_before: sim_before,
            similarity_after: scalar(&sim1)?,
            ms: start.elapsed().as_secs_f64() * 1e3,
        });
        control = Some((refined, size));
    }
    let (control, level_size) = control.expect("at least one level");
    Ok(PyramidResult {
        control,
        level_size,
        levels: reports,
        initial_loss,
    })
}
