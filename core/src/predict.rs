//! Single-machine registration of one pair: `medray predict`.
//!
//! The network input is `cat(moving, fixed)`. With a model config (JSON beside the weights or
//! given explicitly) its preprocessing applies (intensity window, resize to the network
//! grid); with bare weights nothing is applied and sizes must already be divisible by 8.
//! The DDF is written as a NIfTI vector image (X, Y, Z, 1, 3), intent 1007, voxel units,
//! component c along array axis c, on the network grid (with the affine of that grid) or,
//! on request, resampled to the original grid.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ndarray::Array3;
use serde::{Deserialize, Serialize};

use crate::evaluate::{evaluate_case, CaseMetrics, CaseTensors, KeypointEval};
use crate::interop::{jacobian_map, log_jac_std, write_itk_transform};
use crate::keypoints::{read_keypoint_pairs, read_keypoints};
use crate::model::{load_model, LoadedModel};
use crate::nifti_io::{
    read_volume, tensor_to_array3, tensor_to_ddf_array, write_ddf, write_volume, Volume,
};
use crate::ops::{self, Padding};
use crate::preprocess::{preprocess_image, preprocess_mask, resample_ddf_to};
use crate::refine::{
    refine_ddf, refine_pyramid, PyramidInput, RefineOptions, RefineReport, RefineSim,
};
use crate::registration::{LossPreset, PairBatch, RegistrationLoss};
use crate::{Error, Result};

/// Which grid the written DDF and warped image live on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputGrid {
    /// The network's grid (the preprocessed size).
    #[default]
    Network,
    /// The fixed image's original grid and affine.
    Original,
}

/// Keypoints given to `predict`: one file of pairs, or one file per image.
#[derive(Clone, Debug, PartialEq)]
pub enum KeypointFiles {
    /// A 6-column CSV: fixed point, then its moving correspondence.
    Pairs(PathBuf),
    /// Two 3-column CSVs with the same number of rows.
    Separate {
        /// Fixed-image keypoints.
        fixed: PathBuf,
        /// Moving-image keypoints.
        moving: PathBuf,
    },
}

/// Everything `predict` needs.
#[derive(Clone, Debug)]
pub struct PredictRequest {
    /// LocalNet weights (safetensors, MONAI names).
    pub weights: PathBuf,
    /// Model config; default: the `.json` beside the weights if it exists.
    pub model_config: Option<PathBuf>,
    /// Fixed (expiration) image.
    pub fixed: PathBuf,
    /// Moving (inspiration) image.
    pub moving: PathBuf,
    /// Lung mask of the fixed image.
    pub fixed_mask: Option<PathBuf>,
    /// Lung mask of the moving image.
    pub moving_mask: Option<PathBuf>,
    /// Keypoints (voxel coordinates of the original images).
    pub keypoints: Option<KeypointFiles>,
    /// Where to write the DDF.
    pub out_ddf: PathBuf,
    /// Where to write the warped moving image.
    pub out_warped: Option<PathBuf>,
    /// Where to write the ITK/ANTs/Slicer displacement field transform (mm, LPS; original
    /// grid only, [`crate::interop::write_itk_transform`]).
    pub out_transform: Option<PathBuf>,
    /// Where to write the Jacobian determinant map (on the grid of the DDF).
    pub out_jacobian: Option<PathBuf>,
    /// Grid of the written outputs.
    pub output_grid: OutputGrid,
    /// Adam steps of instance optimisation on the DDF ([`crate::refine`]); 0: none.
    pub refine_steps: usize,
    /// How the instance optimisation runs (its `steps` is replaced by `refine_steps`).
    pub refine: RefineOptions,
}

/// What `predict` reports (`--json` prints it).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PredictReport {
    /// Quality metrics, on the network grid (TRE on the original grid, in mm).
    #[serde(flatten)]
    pub metrics: CaseMetrics,
    /// Wall time of loading, preprocessing, inference, metrics and writing, ms.
    pub runtime_ms: f64,
    /// Wall time of the network forward pass alone, ms.
    pub inference_ms: f64,
    /// Size of the images as stored.
    pub original_size: [usize; 3],
    /// Size the network ran on.
    pub network_size: [usize; 3],
    /// The device the network ran on.
    pub device: String,
    /// Where the DDF was written.
    pub out_ddf: PathBuf,
    /// Where the warped image was written.
    pub out_warped: Option<PathBuf>,
    /// What the instance optimisation did, if it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refine: Option<RefineReport>,
}

fn check_same_shape(
    a: &Volume,
    a_name: &std::path::Path,
    b: &Volume,
    b_name: &std::path::Path,
) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(Error::ShapeMismatch {
            op: "predict",
            expected: format!(
                "{} to have the shape {:?} of {}",
                b_name.display(),
                a.shape(),
                a_name.display()
            ),
            got: format!("{:?}", b.shape()),
        });
    }
    Ok(())
}

/// The affine of the network grid: voxel i of a grid of n samples resized with
/// `align_corners=True` from N samples lies at original voxel `i (N - 1) / (n - 1)`.
pub fn resized_affine(
    affine: &[[f64; 4]; 4],
    original: [usize; 3],
    size: [usize; 3],
) -> [[f64; 4]; 4] {
    let mut out = *affine;
    for c in 0..3 {
        let s = if size[c] > 1 {
            (original[c] as f64 - 1.0) / (size[c] as f64 - 1.0)
        } else {
            1.0
        };
        for row in out.iter_mut().take(3) {
            row[c] *= s;
        }
    }
    out
}

/// The files of one pair, and the names their errors give them: a file read from a cache
/// is reported under its stage key, a local file under its path.
#[derive(Clone, Debug, Default)]
pub struct PairFiles {
    /// Fixed (expiration) image.
    pub fixed: PathBuf,
    /// Moving (inspiration) image.
    pub moving: PathBuf,
    /// Lung mask of the fixed image.
    pub fixed_mask: Option<PathBuf>,
    /// Lung mask of the moving image.
    pub moving_mask: Option<PathBuf>,
    /// Keypoints (voxel coordinates of the original images).
    pub keypoints: Option<KeypointFiles>,
    /// (path, name) pairs: errors about `path` name `name` instead.
    pub names: Vec<(PathBuf, PathBuf)>,
}

impl PairFiles {
    /// The name errors give `path`.
    #[must_use]
    pub fn name_of<'a>(&'a self, path: &'a Path) -> &'a Path {
        self.names
            .iter()
            .find(|(p, _)| p == path)
            .map_or(path, |(_, n)| n.as_path())
    }

    fn renamed(&self, path: &Path, e: Error) -> Error {
        e.renamed(path, self.name_of(path))
    }

    fn read(&self, path: &Path) -> Result<Volume> {
        read_volume(path).map_err(|e| self.renamed(path, e))
    }
}

/// Corresponding points: (fixed, moving), voxel coordinates.
pub type PointPairs = (Vec<[f64; 3]>, Vec<[f64; 3]>);

/// One pair in memory: the volumes as stored and the network's view of them.
#[derive(Debug)]
pub struct LoadedPair {
    /// The fixed image as stored (its grid and affine are the outputs').
    pub fixed_volume: Volume,
    /// The moving image as stored.
    pub moving_volume: Volume,
    /// The moving mask as stored.
    pub moving_mask_volume: Option<Volume>,
    /// The fixed mask as stored.
    pub fixed_mask_volume: Option<Volume>,
    /// Preprocessed fixed image (1, 1, h, w, d).
    pub fixed: Tensor,
    /// Preprocessed moving image.
    pub moving: Tensor,
    /// Preprocessed fixed mask.
    pub fixed_mask: Option<Tensor>,
    /// Preprocessed moving mask.
    pub moving_mask: Option<Tensor>,
    /// Keypoint pairs (fixed, moving), voxel coordinates of the original grid.
    pub keypoints: Option<PointPairs>,
}

impl LoadedPair {
    /// Size of the images as stored.
    #[must_use]
    pub fn original_size(&self) -> [usize; 3] {
        self.fixed_volume.shape()
    }
}

/// Reads and validates a pair (same shapes, both masks or neither, keypoints) and
/// preprocesses it for the network; errors name the file.
///
/// # Errors
/// [`Error::Nifti`] / [`Error::Io`] / [`Error::Keypoints`] naming the file,
/// [`Error::ShapeMismatch`] naming both files, [`Error::InvalidArgument`] for one mask.
pub fn load_pair(
    files: &PairFiles,
    pre: &crate::preprocess::PreprocessConfig,
    device: &Device,
) -> Result<LoadedPair> {
    let fixed_volume = files.read(&files.fixed)?;
    let moving_volume = files.read(&files.moving)?;
    let name = |p: &Path| files.name_of(p).to_path_buf();
    check_same_shape(
        &fixed_volume,
        &name(&files.fixed),
        &moving_volume,
        &name(&files.moving),
    )?;
    let as_file_error = |p: &Path, e: Error| match e {
        Error::ShapeMismatch { .. } | Error::InvalidArgument { .. } => Error::Nifti {
            path: name(p),
            reason: e.to_string(),
        },
        other => other,
    };
    let fixed =
        preprocess_image(&fixed_volume, pre, device).map_err(|e| as_file_error(&files.fixed, e))?;
    let moving = preprocess_image(&moving_volume, pre, device)
        .map_err(|e| as_file_error(&files.moving, e))?;
    let (fixed_mask, moving_mask, mask_volumes) = match (&files.fixed_mask, &files.moving_mask) {
        (Some(fm), Some(mm)) => {
            let mut out = Vec::with_capacity(2);
            for (path, image_path, image) in [
                (fm, &files.fixed, &fixed_volume),
                (mm, &files.moving, &moving_volume),
            ] {
                let vol = files.read(path)?;
                check_same_shape(image, &name(image_path), &vol, &name(path))?;
                let t = preprocess_mask(&vol, pre, device).map_err(|e| as_file_error(path, e))?;
                out.push((t, vol));
            }
            let (moving_t, moving_v) = out.pop().expect("two masks were read");
            let (fixed_t, fixed_v) = out.pop().expect("two masks were read");
            (Some(fixed_t), Some(moving_t), Some((fixed_v, moving_v)))
        }
        (None, None) => (None, None, None),
        _ => {
            return Err(Error::invalid(
                "masks",
                "give both --fixed-mask and --moving-mask, or neither",
            ))
        }
    };
    let keypoints = match &files.keypoints {
        None => None,
        Some(KeypointFiles::Pairs(p)) => {
            let k = read_keypoint_pairs(p).map_err(|e| files.renamed(p, e))?;
            Some((k.fixed, k.moving))
        }
        Some(KeypointFiles::Separate { fixed, moving }) => {
            let f = read_keypoints(fixed).map_err(|e| files.renamed(fixed, e))?;
            let m = read_keypoints(moving).map_err(|e| files.renamed(moving, e))?;
            if f.points.len() != m.points.len() {
                return Err(Error::invalid(
                    "keypoints",
                    format!(
                        "{} has {} points but {} has {}",
                        name(fixed).display(),
                        f.points.len(),
                        name(moving).display(),
                        m.points.len()
                    ),
                ));
            }
            Some((f.points, m.points))
        }
    };
    let (fixed_mask_volume, moving_mask_volume) = mask_volumes.unzip();
    Ok(LoadedPair {
        fixed_volume,
        moving_volume,
        moving_mask_volume,
        fixed_mask_volume,
        fixed,
        moving,
        fixed_mask,
        moving_mask,
        keypoints,
    })
}

/// How [`register_pair`] runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegisterOptions {
    /// Adam steps of instance optimisation on the DDF ([`crate::refine`]); 0: none.
    pub refine_steps: usize,
    /// Also resample the DDF to the original grid (it is anyway when keypoints exist).
    pub original_grid: bool,
}

/// A registered pair: the DDF and its quality.
#[derive(Debug)]
pub struct Registration {
    /// Quality metrics, on the network grid (TRE on the original grid, in mm).
    pub metrics: CaseMetrics,
    /// The DDF (1, 3, h, w, d) on the network grid, voxels (refined if asked; a pyramid
    /// refinement's result resampled to this grid).
    pub ddf: Tensor,
    /// The DDF on the original grid (1, 3, H, W, D), original voxels: the network's DDF
    /// resampled, or the pyramid refinement's result.
    pub ddf_original: Option<Tensor>,
    /// `det J` of `x -> x + u(x)` on the grid of `ddf_original` when it is set, else of
    /// `ddf` ([`crate::interop::jacobian_map`]).
    pub jacobian: Array3<f32>,
    /// Wall time of the network forward pass alone, ms.
    pub inference_ms: f64,
    /// What the refinement did, if it ran.
    pub refine: Option<RefineReport>,
    /// Size the network ran on.
    pub network_size: [usize; 3],
}

/// Registers a loaded pair with a model: the network's DDF, refined if asked, resampled to
/// the original grid when needed, and the metrics. `medray predict` and the cluster's
/// inference tasks both call this, so they report the same numbers for the same case.
/// The refinement runs with [`RefineOptions`]' defaults and `options.refine_steps` steps;
/// [`register_pair_with`] takes every refinement option.
///
/// # Errors
/// A tensor error, or [`Error::InvalidArgument`] when the refinement's loss needs masks the
/// pair lacks.
pub fn register_pair(
    model: &LoadedModel,
    pair: &LoadedPair,
    options: &RegisterOptions,
) -> Result<Registration> {
    register_pair_with(
        model,
        pair,
        options.original_grid,
        &RefineOptions::with_steps(options.refine_steps),
    )
}

/// [`register_pair`] with explicit refinement options (`refine.steps` 0: none).
///
/// With a pyramid similarity ([`RefineSim::Mind`], [`RefineSim::Lncc`]) the refinement
/// works on the windowed original images and its result is resampled both to the original
/// grid (`ddf_original`, always set then: TRE and the outputs) and to the network grid
/// (`ddf`: the other metrics). With [`RefineSim::Model`] the DDF is refined on the network
/// grid against the model's training loss.
///
/// # Errors
/// As [`register_pair`]; [`Error::InvalidArgument`] naming the option for invalid
/// refinement options.
pub fn register_pair_with(
    model: &LoadedModel,
    pair: &LoadedPair,
    original_grid: bool,
    refine_options: &RefineOptions,
) -> Result<Registration> {
    refine_options.validate()?;
    let network_size = [pair.fixed.dim(2)?, pair.fixed.dim(3)?, pair.fixed.dim(4)?];
    let original = pair.original_size();
    let input = Tensor::cat(&[&pair.moving, &pair.fixed], 1)?;
    let t0 = Instant::now();
    let mut ddf = model.net.forward_t(&input, false)?.detach();
    let inference_ms = t0.elapsed().as_secs_f64() * 1e3;

    let mut refine = None;
    let mut refined_original = None;
    if refine_options.steps > 0 {
        if refine_options.sim == RefineSim::Model {
            // The case's own keypoints are for scoring, never for optimising: a model trained
            // with keypoint supervision is refined against its image terms alone.
            let preset = model
                .config
                .loss
                .unwrap_or(LossPreset::MiBe)
                .without_keypoints();
            let batch = PairBatch {
                fixed: pair.fixed.clone(),
                moving: pair.moving.clone(),
                fixed_mask: pair.fixed_mask.clone(),
                moving_mask: pair.moving_mask.clone(),
                keypoints: None,
            };
            let (refined, report) = refine_ddf(
                &ddf,
                &batch,
                &RegistrationLoss::new(preset),
                refine_options.steps,
            )?;
            ddf = refined;
            refine = Some(report);
        } else {
            let start = Instant::now();
            let device = pair.fixed.device();
            let windowed = |v: &Volume| -> Result<Tensor> {
                let t = crate::nifti_io::to_tensor(v, device)?;
                Ok(match &model.config.preprocess.window {
                    Some(w) => w.apply(&t)?,
                    None => t,
                })
            };
            let (fixed, moving) = (
                windowed(&pair.fixed_volume)?,
                windowed(&pair.moving_volume)?,
            );
            let result = refine_pyramid(
                &ddf,
                &PyramidInput {
                    fixed: &fixed,
                    moving: &moving,
                    fixed_mask: pair.fixed_mask.as_ref().filter(|_| refine_options.mask),
                    spacing_mm: pair.fixed_volume.spacing,
                },
                refine_options,
            )?;
            ddf = result.field_on(network_size)?.to_dtype(ddf.dtype())?;
            refined_original = Some(result.field_on(original)?.to_dtype(ddf.dtype())?);
            let finest = result.levels.last().expect("at least one level");
            refine = Some(RefineReport {
                steps: refine_options.steps,
                lr: refine_options.lr,
                loss: refine_options.sim.name().to_string(),
                loss_before: result.initial_loss,
                loss_after: finest.loss_after,
                refine_ms: start.elapsed().as_secs_f64() * 1e3,
                levels: result.levels.clone(),
                lambda: Some(refine_options.lambda),
            });
        }
    }

    let ddf_original = if let Some(d) = refined_original {
        Some(d)
    } else if !(original_grid || pair.keypoints.is_some()) {
        None
    } else if original == network_size {
        Some(ddf.clone())
    } else {
        Some(resample_ddf_to(&ddf, original)?)
    };
    let kp_eval = match (&pair.keypoints, &ddf_original) {
        (Some((f, m)), Some(d)) => Some(KeypointEval {
            fixed: f,
            moving: m,
            ddf: d,
            spacing_mm: pair.fixed_volume.spacing,
        }),
        _ => None,
    };
    let mut metrics = evaluate_case(
        &CaseTensors {
            fixed: &pair.fixed,
            moving: &pair.moving,
            ddf: &ddf,
            fixed_mask: pair.fixed_mask.as_ref(),
            moving_mask: pair.moving_mask.as_ref(),
        },
        kp_eval.as_ref(),
    )?;
    // det J and the spread of log det J on the output grid, over the fixed mask if any.
    let (jacobian, dets) = jacobian_map(ddf_original.as_ref().unwrap_or(&ddf))?;
    let mask: Option<Vec<bool>> = match &ddf_original {
        Some(_) => pair
            .fixed_mask_volume
            .as_ref()
            .map(|v| v.data.iter().map(|&x| x >= 0.5).collect()),
        None => match &pair.fixed_mask {
            Some(m) => Some(
                m.flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?
                    .into_iter()
                    .map(|x| x >= 0.5)
                    .collect(),
            ),
            None => None,
        },
    };
    metrics.log_jac_std = log_jac_std(&dets, mask.as_deref())?;
    Ok(Registration {
        metrics,
        ddf,
        ddf_original,
        jacobian,
        inference_ms,
        refine,
        network_size,
    })
}

impl Registration {
    fn original(&self) -> Result<&Tensor> {
        self.ddf_original.as_ref().ok_or_else(|| {
            Error::invalid(
                "output grid",
                "the DDF was not resampled to the original grid (RegisterOptions::original_grid)",
            )
        })
    }

    /// The moving image as stored, warped trilinearly (border padding) with the DDF on the
    /// original grid: the registered image, on the fixed image's grid.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] without an original-grid DDF; a tensor error.
    pub fn warped_image_original(&self, pair: &LoadedPair) -> Result<Array3<f32>> {
        let d = self.original()?;
        let raw = crate::nifti_io::to_tensor(&pair.moving_volume, d.device())?;
        tensor_to_array3(&ops::warp(&raw, d, Padding::Border)?)
    }

    /// The moving mask as stored, warped with nearest-neighbour sampling (labels keep their
    /// values) with the DDF on the original grid; `None` without masks.
    ///
    /// # Errors
    /// As [`Self::warped_image_original`].
    pub fn warped_label_original(&self, pair: &LoadedPair) -> Result<Option<Array3<f32>>> {
        let Some(mask) = &pair.moving_mask_volume else {
            return Ok(None);
        };
        let d = self.original()?;
        let raw = crate::nifti_io::to_tensor(mask, d.device())?;
        Ok(Some(tensor_to_array3(&ops::warp_nearest(&raw, d)?)?))
    }

    /// The case picture ([`crate::viz::case_png`]) on the original grid: mid slices of the
    /// fixed, moving and `warped` images (as [`Self::warped_image_original`] returns), their
    /// differences and the displacement magnitude in mm.
    ///
    /// # Errors
    /// As [`Self::warped_image_original`]; [`Error::ShapeMismatch`] when `warped` is not on
    /// the fixed image's grid.
    pub fn case_png(&self, pair: &LoadedPair, warped: &Array3<f32>) -> Result<Vec<u8>> {
        let ddf = tensor_to_ddf_array(self.original()?)?;
        let (h, w, d) = pair.fixed_volume.data.dim();
        if ddf.dim() != (3, h, w, d) {
            return Err(Error::ShapeMismatch {
                op: "case picture",
                expected: format!("a DDF of (3, {h}, {w}, {d})"),
                got: format!("{:?}", ddf.dim()),
            });
        }
        let spacing = pair.fixed_volume.spacing;
        let magnitude = Array3::from_shape_fn(pair.fixed_volume.data.dim(), |(i, j, k)| {
            (0..3)
                .map(|c| (f64::from(ddf[[c, i, j, k]]) * spacing[c]).powi(2))
                .sum::<f64>()
                .sqrt() as f32
        });
        crate::viz::case_png(&crate::viz::CaseViews {
            fixed: &pair.fixed_volume.data,
            moving: &pair.moving_volume.data,
            warped,
            ddf_magnitude: &magnitude,
            spacing,
        })
    }
}

/// Registers one pair, writes the outputs and returns the report.
pub fn predict(request: &PredictRequest, device: &Device) -> Result<PredictReport> {
    let start = Instant::now();
    let model = load_model(
        &request.weights,
        request.model_config.as_deref(),
        DType::F32,
        device,
    )?;
    let files = PairFiles {
        fixed: request.fixed.clone(),
        moving: request.moving.clone(),
        fixed_mask: request.fixed_mask.clone(),
        moving_mask: request.moving_mask.clone(),
        keypoints: request.keypoints.clone(),
        names: Vec::new(),
    };
    let pair = load_pair(&files, &model.config.preprocess, device)?;
    if request.out_transform.is_some() && request.output_grid != OutputGrid::Original {
        return Err(Error::invalid(
            "out_transform",
            "the transform is written on the fixed image's own grid: add --original-grid",
        ));
    }
    let reg = register_pair_with(
        &model,
        &pair,
        request.output_grid == OutputGrid::Original,
        &RefineOptions {
            steps: request.refine_steps,
            ..request.refine
        },
    )?;
    let original = pair.original_size();
    match request.output_grid {
        OutputGrid::Original => {
            let d = tensor_to_ddf_array(reg.original()?)?;
            write_ddf(&request.out_ddf, &d, &pair.fixed_volume.affine)?;
            if let Some(out) = &request.out_transform {
                write_itk_transform(out, &d, &pair.fixed_volume.affine)?;
            }
            if let Some(out) = &request.out_jacobian {
                write_volume(out, &reg.jacobian, &pair.fixed_volume.affine)?;
            }
            if let Some(out) = &request.out_warped {
                write_volume(
                    out,
                    &reg.warped_image_original(&pair)?,
                    &pair.fixed_volume.affine,
                )?;
            }
        }
        OutputGrid::Network => {
            let affine = resized_affine(&pair.fixed_volume.affine, original, reg.network_size);
            write_ddf(&request.out_ddf, &tensor_to_ddf_array(&reg.ddf)?, &affine)?;
            if let Some(out) = &request.out_jacobian {
                write_volume(out, &reg.jacobian, &affine)?;
            }
            if let Some(out) = &request.out_warped {
                let warped = ops::warp(&pair.moving, &reg.ddf, Padding::Border)?;
                write_volume(out, &tensor_to_array3(&warped)?, &affine)?;
            }
        }
    }
    Ok(PredictReport {
        metrics: reg.metrics,
        runtime_ms: start.elapsed().as_secs_f64() * 1e3,
        inference_ms: reg.inference_ms,
        original_size: original,
        network_size: reg.network_size,
        device: format!("{device:?}"),
        out_ddf: request.out_ddf.clone(),
        out_warped: request.out_warped.clone(),
        refine: reg.refine,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn load_pair_errors_name_the_file_as_the_caller_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let cached = dir.path().join("0123abcd");
        std::fs::write(&cached, b"not a NIfTI file").unwrap();
        let files = PairFiles {
            fixed: cached.clone(),
            moving: cached.clone(),
            names: vec![(
                cached.clone(),
                PathBuf::from("datasets/d/scansExp/case_001_exp.nii.gz"),
            )],
            ..PairFiles::default()
        };
        let e = load_pair(
            &files,
            &crate::preprocess::PreprocessConfig::default(),
            &Device::Cpu,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("datasets/d/scansExp/case_001_exp.nii.gz"), "{e}");
        assert!(!e.contains("0123abcd"), "{e}");
        // Without a name, the path itself.
        let files = PairFiles {
            names: Vec::new(),
            ..files
        };
        let e = load_pair(
            &files,
            &crate::preprocess::PreprocessConfig::default(),
            &Device::Cpu,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("0123abcd"), "{e}");
    }
}
