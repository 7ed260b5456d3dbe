//! Outputs for the tools registration users already have (issue 19): ITK, ANTs, 3D Slicer,
//! elastix users and the Learn2Reg evaluation.
//!
//! medray's DDF is MONAI's: voxels of the fixed grid, channel `c` along array axis `c`, and
//! a backward map, `warped(x) = moving(x + u(x))` (`docs/monai-spec.md` §2; [`crate::ops::warp`]).
//! So `x + u(x)` is the moving-image point that fixed voxel `x` sees.
//!
//! * **Displacement field transform** ([`write_itk_transform`], `<case>_transform_lps_mm.nii.gz`):
//!   the same map in physical space, as ITK's `DisplacementFieldTransform` defines it:
//!   `T(p) = p + v(p)` sends a fixed-space point `p` to the moving-space point, the transform
//!   a resampler uses to pull the moving image onto the fixed grid (ITK Doxygen,
//!   `itk::DisplacementFieldTransform`: "Transformation is performed at a given point by
//!   adding the displacement at that point to the input point"). `v` is in mm in ITK's LPS
//!   frame: `v_RAS = A[:3,:3] · u` with `A` the fixed image's NIfTI (RAS+) affine, then the
//!   x and y components change sign. It is stored as a 5-D `(X, Y, Z, 1, 3)` float32 NIfTI
//!   with intent 1007 (`NIFTI_INTENT_VECTOR`) on the fixed image's grid and affine: the
//!   layout ANTs writes for its `*Warp.nii.gz`. ITK reads intent-1007 vectors as stored (in
//!   LPS) and converts only intent 1006 (`NIFTI_INTENT_DISPVECT`) from RAS (ITK pull
//!   request 3884, "Fix read/write of displacement field in NIFTI file format", backported
//!   to Slicer in Slicer pull request 6799). `scripts/interop-check.py` applies the file
//!   with SimpleITK and compares with medray's warped image and TRE.
//! * **Jacobian determinant map** ([`jacobian_map`], `<case>_jacobian.nii.gz`): `det J` of
//!   `x -> x + u(x)` at every fixed voxel ([`crate::metrics::jacobian_determinant`]: central
//!   differences, one-sided on the border), like `transformix -jac`. The determinant is the
//!   same in voxel and physical coordinates (the affine's factors cancel).
//! * **`log_jac_std`** ([`log_jac_std`]): the standard deviation (population, numpy's
//!   default) of `log(max(det J, 1e-9))` over the fixed mask, or every voxel without one.
//!   The clamp is the Learn2Reg evaluation's (`MDL-UzL/L2R`, `evaluation/evaluation.py`:
//!   `clip(0.000000001, 1000000000)` then `np.log`, std over the mask). Unlike that script
//!   the 2-voxel border is kept (one-sided differences there instead of its zero padding and
//!   crop), so figures on the same field differ slightly near the border.
//! * **Learn2Reg displacement file** ([`write_learn2reg_disp`]): the voxel DDF unchanged as a
//!   4-D `(X, Y, Z, 3)` float32 NIfTI, which the L2R evaluation reads with
//!   `nib.load(..).get_fdata()`, checks against the task's `expected_shape` and applies as
//!   `map_coordinates(moving, identity + disp)` and `fix_lms + disp` (its `compute_tre`):
//!   the same backward voxel map as medray's. Its name is [`learn2reg_name`].

use std::path::Path;

use candle_core::Tensor;
use ndarray::{Array3, Array4};

use crate::nifti_io::{write_vector_field, VectorLayout};
use crate::{Error, Result};

/// Smallest `det J` before the logarithm of [`log_jac_std`] (the Learn2Reg clamp).
pub const LOG_JAC_CLAMP: f64 = 1e-9;

/// The voxel DDF `[3, H, W, D]` (MONAI convention, fixed grid) as displacements in mm in
/// ITK's LPS frame: `v = diag(-1, -1, 1) · A[:3,:3] · u`.
#[must_use]
pub fn ddf_to_lps_mm(ddf: &Array4<f32>, affine: &[[f64; 4]; 4]) -> Array4<f32> {
    let (_, h, w, d) = ddf.dim();
    let sign = [-1.0, -1.0, 1.0];
    let mut out = Array4::<f32>::zeros((3, h, w, d));
    for i in 0..h {
        for j in 0..w {
            for k in 0..d {
                let u = [0, 1, 2].map(|c| f64::from(ddf[[c, i, j, k]]));
                for r in 0..3 {
                    let ras = affine[r][0] * u[0] + affine[r][1] * u[1] + affine[r][2] * u[2];
                    out[[r, i, j, k]] = (sign[r] * ras) as f32;
                }
            }
        }
    }
    out
}

/// Writes the voxel DDF `[3, H, W, D]` as an ITK/ANTs/Slicer displacement field transform:
/// mm, LPS, 5-D intent 1007, on the fixed grid with the fixed `affine` (module docs).
///
/// # Errors
/// As [`write_vector_field`].
pub fn write_itk_transform(
    path: impl AsRef<Path>,
    ddf: &Array4<f32>,
    affine: &[[f64; 4]; 4],
) -> Result<()> {
    write_vector_field(
        path,
        &ddf_to_lps_mm(ddf, affine),
        affine,
        VectorLayout::Nifti5d,
    )
}

/// Writes the voxel DDF `[3, H, W, D]` as a Learn2Reg submission file: 4-D `(X, Y, Z, 3)`
/// float32, voxels, the fixed `affine`.
///
/// # Errors
/// As [`write_vector_field`].
pub fn write_learn2reg_disp(
    path: impl AsRef<Path>,
    ddf: &Array4<f32>,
    affine: &[[f64; 4]; 4],
) -> Result<()> {
    write_vector_field(path, ddf, affine, VectorLayout::Plain4d)
}

/// The Learn2Reg file name of a case, and whether it is a Learn2Reg pair name. The
/// evaluation (`MDL-UzL/L2R`, `evaluation/evaluation.py`) looks for
/// `disp_<fixed subject>_<moving subject>.nii.gz` when both images have the same modality
/// (or fixed `0000`, moving `0001`), else `disp_<fs>_<fm>_<ms>_<mm>.nii.gz`, with the 4-digit
/// subject and modality numbers of the image names (`NLST_0101_0000.nii.gz`). medray's case
/// ids keep them ([`crate::ingest`]'s `nlst` source): a case id with one 4-digit number
/// (`NLST_0101`, the pair of one subject's two scans) gives `disp_0101_0101.nii.gz`; one
/// with four (`NLST_0101_0000_NLST_0102_0000`, two image stems) gives the name above. Any
/// other id gives `disp_<case>.nii.gz` and `false`: the evaluation will not find that file.
#[must_use]
pub fn learn2reg_name(case: &str) -> (String, bool) {
    let numbers: Vec<&str> = case
        .split(['_', '-'])
        .filter(|p| p.len() == 4 && p.bytes().all(|b| b.is_ascii_digit()))
        .collect();
    match numbers[..] {
        [s] => (format!("disp_{s}_{s}.nii.gz"), true),
        [fs, fm, ms, mm] if fm == mm || (fm == "0000" && mm == "0001") => {
            (format!("disp_{fs}_{ms}.nii.gz"), true)
        }
        [fs, fm, ms, mm] => (format!("disp_{fs}_{fm}_{ms}_{mm}.nii.gz"), true),
        _ => (format!("disp_{case}.nii.gz"), false),
    }
}

/// `det J` of `x -> x + u(x)` at every voxel of a DDF `(1, 3, H, W, D)` as an `(H, W, D)`
/// map ([`crate::metrics::jacobian_determinant`]), and the determinants themselves.
///
/// # Errors
/// As [`crate::metrics::jacobian_determinant`] (a wrong shape, a size under 2).
pub fn jacobian_map(ddf: &Tensor) -> Result<(Array3<f32>, Vec<f64>)> {
    let dets = crate::metrics::jacobian_determinant(ddf)?;
    let r = ddf.dims().len();
    let shape = (ddf.dims()[r - 3], ddf.dims()[r - 2], ddf.dims()[r - 1]);
    let map = Array3::from_shape_vec(shape, dets.iter().map(|&d| d as f32).collect())
        .expect("one determinant per voxel");
    Ok((map, dets))
}

/// Population standard deviation of `log(max(det J, 1e-9))` over the voxels where `mask`
/// is set (every voxel without a mask); `None` for an empty mask.
///
/// # Errors
/// [`Error::ShapeMismatch`] if the mask has another number of voxels.
pub fn log_jac_std(dets: &[f64], mask: Option<&[bool]>) -> Result<Option<f64>> {
    if let Some(m) = mask.filter(|m| m.len() != dets.len()) {
        return Err(Error::ShapeMismatch {
            op: "log_jac_std",
            expected: format!("a mask of {} voxels", dets.len()),
            got: format!("{} voxels", m.len()),
        });
    }
    let logs: Vec<f64> = dets
        .iter()
        .enumerate()
        .filter(|(i, _)| mask.is_none_or(|m| m[*i]))
        .map(|(_, &d)| d.max(LOG_JAC_CLAMP).ln())
        .collect();
    if logs.is_empty() {
        return Ok(None);
    }
    let n = logs.len() as f64;
    let mean = logs.iter().sum::<f64>() / n;
    Ok(Some(
        (logs.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt(),
    ))
}

#[cfg(test)]
#[path = "interop/tests.rs"]
mod tests;
