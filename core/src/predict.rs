//! Single-machine registration of one pair: `medray predict`.
//!
//! The network input is `cat(moving, fixed)`. With a model config (JSON beside the weights or
//! given explicitly) its preprocessing applies (intensity window, resize to the network
//! grid); with bare weights nothing is applied and sizes must already be divisible by 8.
//! The DDF is written as a NIfTI vector image (X, Y, Z, 1, 3), intent 1007, voxel units,
//! component c along array axis c, on the network grid (with the affine of that grid) or,
//! on request, resampled to the original grid.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::evaluate::{evaluate_case, CaseMetrics, CaseTensors, KeypointEval};
use crate::keypoints::{read_keypoint_pairs, read_keypoints};
use crate::model::load_model;
use crate::nifti_io::{
    read_volume, tensor_to_array3, tensor_to_ddf_array, write_ddf, write_volume, Volume,
};
use crate::ops::{self, Padding};
use crate::preprocess::{preprocess_image, preprocess_mask, resample_ddf_to};
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
    /// Grid of the written outputs.
    pub output_grid: OutputGrid,
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
}

fn check_same_shape(
    a: &Volume,
    a_path: &std::path::Path,
    b: &Volume,
    b_path: &std::path::Path,
) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(Error::ShapeMismatch {
            op: "predict",
            expected: format!(
                "{} to have the shape {:?} of {}",
                b_path.display(),
                a.shape(),
                a_path.display()
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

/// Registers one pair, writes the outputs and returns the report.
pub fn predict(request: &PredictRequest, device: &Device) -> Result<PredictReport> {
    let start = Instant::now();
    let model = load_model(
        &request.weights,
        request.model_config.as_deref(),
        DType::F32,
        device,
    )?;
    let pre = &model.config.preprocess;
    let fixed_vol = read_volume(&request.fixed)?;
    let moving_vol = read_volume(&request.moving)?;
    check_same_shape(&fixed_vol, &request.fixed, &moving_vol, &request.moving)?;
    let name = |p: &std::path::Path, e: Error| match e {
        Error::ShapeMismatch { .. } | Error::InvalidArgument { .. } => Error::Nifti {
            path: p.to_path_buf(),
            reason: e.to_string(),
        },
        other => other,
    };
    let fixed = preprocess_image(&fixed_vol, pre, device).map_err(|e| name(&request.fixed, e))?;
    let moving =
        preprocess_image(&moving_vol, pre, device).map_err(|e| name(&request.moving, e))?;
    let mut masks = Vec::new();
    for (path, image_path, image) in [
        (&request.fixed_mask, &request.fixed, &fixed_vol),
        (&request.moving_mask, &request.moving, &moving_vol),
    ] {
        if let Some(path) = path {
            let vol = read_volume(path)?;
            check_same_shape(image, image_path, &vol, path)?;
            masks.push(preprocess_mask(&vol, pre, device).map_err(|e| name(path, e))?);
        }
    }
    let (fixed_mask, moving_mask) =
        match (request.fixed_mask.is_some(), request.moving_mask.is_some()) {
            (true, true) => (Some(&masks[0]), Some(&masks[1])),
            (false, false) => (None, None),
            _ => {
                return Err(Error::invalid(
                    "masks",
                    "give both --fixed-mask and --moving-mask, or neither",
                ))
            }
        };
    let original = fixed_vol.shape();
    let network_size = [fixed.dim(2)?, fixed.dim(3)?, fixed.dim(4)?];

    let input = Tensor::cat(&[&moving, &fixed], 1)?;
    let t0 = Instant::now();
    let ddf = model.net.forward_t(&input, false)?.detach();
    let inference_ms = t0.elapsed().as_secs_f64() * 1e3;

    let needs_original = request.output_grid == OutputGrid::Original || request.keypoints.is_some();
    let ddf_original = if !needs_original {
        None
    } else if original == network_size {
        Some(ddf.clone())
    } else {
        Some(resample_ddf_to(&ddf, original)?)
    };
    let pairs = match &request.keypoints {
        None => None,
        Some(KeypointFiles::Pairs(p)) => {
            let k = read_keypoint_pairs(p)?;
            Some((k.fixed, k.moving))
        }
        Some(KeypointFiles::Separate { fixed, moving }) => {
            let (f, m) = (read_keypoints(fixed)?, read_keypoints(moving)?);
            if f.points.len() != m.points.len() {
                return Err(Error::invalid(
                    "keypoints",
                    format!(
                        "{} has {} points but {} has {}",
                        fixed.display(),
                        f.points.len(),
                        moving.display(),
                        m.points.len()
                    ),
                ));
            }
            Some((f.points, m.points))
        }
    };
    let kp_eval = match (&pairs, &ddf_original) {
        (Some((f, m)), Some(d)) => Some(KeypointEval {
            fixed: f,
            moving: m,
            ddf: d,
            spacing_mm: fixed_vol.spacing,
        }),
        _ => None,
    };
    let metrics = evaluate_case(
        &CaseTensors {
            fixed: &fixed,
            moving: &moving,
            ddf: &ddf,
            fixed_mask,
            moving_mask,
        },
        kp_eval.as_ref(),
    )?;

    match (request.output_grid, &ddf_original) {
        (OutputGrid::Original, Some(d)) => {
            write_ddf(
                &request.out_ddf,
                &tensor_to_ddf_array(d)?,
                &fixed_vol.affine,
            )?;
            if let Some(out) = &request.out_warped {
                let raw = crate::nifti_io::to_tensor(&moving_vol, device)?;
                let warped = ops::warp(&raw, d, Padding::Border)?;
                write_volume(out, &tensor_to_array3(&warped)?, &fixed_vol.affine)?;
            }
        }
        _ => {
            let affine = resized_affine(&fixed_vol.affine, original, network_size);
            write_ddf(&request.out_ddf, &tensor_to_ddf_array(&ddf)?, &affine)?;
            if let Some(out) = &request.out_warped {
                let warped = ops::warp(&moving, &ddf, Padding::Border)?;
                write_volume(out, &tensor_to_array3(&warped)?, &affine)?;
            }
        }
    }
    Ok(PredictReport {
        metrics,
        runtime_ms: start.elapsed().as_secs_f64() * 1e3,
        inference_ms,
        original_size: original,
        network_size,
        device: format!("{device:?}"),
        out_ddf: request.out_ddf.clone(),
        out_warped: request.out_warped.clone(),
    })
}
