//! Reading a DICOM series (one folder of single-frame slices) as a [`Volume`], the type
//! [`read_volume`](crate::nifti_io::read_volume) returns for a NIfTI file: the same voxel
//! layout, spacing and a voxel-to-world affine in the same RAS+ world (mm).
//!
//! Files are parsed by dicom-rs (`dicom-object`, pixel values by `dicom-pixeldata`); only the
//! native (uncompressed) transfer syntaxes are read (implicit VR little endian, explicit VR
//! little and big endian): a compressed series (JPEG, JPEG-LS, JPEG 2000, RLE, deflate) is
//! refused with the name of its transfer syntax, to be decompressed first (e.g.
//! `gdcmconv --raw` or `dcmdjpeg`).
//!
//! What is in the folder:
//! * every regular file is looked at; hidden files (`.name`), subfolders and files named
//!   `DICOMDIR` are ignored, and so are files that are not DICOM part-10 files (no `DICM` at
//!   byte 128, as README, `Thumbs.db` or a report) and DICOMDIR objects under another name
//!   (SOP class Media Storage Directory); every other file must be a readable slice;
//! * all slices belong to one series (one `SeriesInstanceUID`), have one frame, one sample per
//!   pixel, pixel data, and the same `Rows`, `Columns`, `PixelSpacing` and
//!   `ImageOrientationPatient` (within [`ORIENTATION_TOLERANCE`]).
//!
//! Geometry (DICOM PS3.3 C.7.6.2): `ImageOrientationPatient` gives the row direction `r`
//! (along which the column index grows) and the column direction `c`; the slices are sorted by
//! `ImagePositionPatient · (r × c)`. Voxel `(i, j, k)` of the volume is column `i`, row `j` of
//! the `k`-th slice in that order, so the volume's axes run along `r`, `c` and `r × c`, as
//! dcm2niix and the NIfTI conversions of DICOM CT commonly store them. Consecutive positions
//! must differ by the same step vector within [`SPACING_TOLERANCE`] (a missing slice, a
//! duplicated position or an irregular series is refused). The affine in DICOM patient
//! coordinates (LPS+) has columns `r · PixelSpacing[1]`, `c · PixelSpacing[0]`, the mean step
//! `(P_last - P_first) / (n - 1)` and the translation `P_first`; its first two rows are
//! negated to give RAS+, the world of NIfTI. The voxel values are the stored values after
//! `RescaleSlope`/`RescaleIntercept` (Hounsfield units for CT), slice by slice.
//!
//! [`Volume::header`] is the header medray would write for the volume: `int16` when every
//! value is an integer in its range (CT in HU), `float32` otherwise; [`stored_type`] gives
//! the matching [`StoredType`] for converting the series to NIfTI.

mod geometry;
mod slice;

use std::path::{Path, PathBuf};

use ndarray::{Array3, Axis};
use rayon::prelude::*;

use crate::nifti_io::{header_for, StoredType, Volume};
use crate::{Error, Result};

use slice::Slice;

/// Largest relative deviation of a step between consecutive slice positions from the
/// series' median step (`|step - median| <= SPACING_TOLERANCE * |median|`, plus 1 µm for
/// rounding in the files): 1 %.
pub const SPACING_TOLERANCE: f64 = 0.01;

/// Largest difference between two slices' `ImageOrientationPatient` direction cosines, and
/// largest `|r · c|` of one slice's row and column directions.
pub const ORIENTATION_TOLERANCE: f64 = 1e-3;

/// Reads the DICOM series in the folder `dir` as one volume (see the module docs).
///
/// # Errors
/// [`Error::Dicom`] naming the folder (empty, no DICOM file, several series, missing,
/// duplicated or unevenly spaced slices, a single slice) or the file (not readable as DICOM,
/// compressed transfer syntax, no pixel data, a missing or invalid geometry attribute,
/// several frames, rows, columns, spacing or orientation other than the first slice's);
/// [`Error::Io`] if the folder cannot be listed.
pub fn read_series(dir: impl AsRef<Path>) -> Result<Volume> {
    let dir = dir.as_ref();
    let listing = list_folder(dir)?;
    let read: Vec<Result<Option<Slice>>> = listing.files.par_iter().map(slice::read).collect();
    let mut slices = Vec::with_capacity(read.len());
    let mut not_dicom = Vec::new();
    for (path, slice) in listing.files.iter().zip(read) {
        match slice? {
            Some(s) => slices.push(s),
            None => not_dicom.push(path.clone()),
        }
    }
    if slices.is_empty() {
        return Err(dicom_error(dir, nothing_found(&listing, &not_dicom)));
    }
    if !not_dicom.is_empty() {
        tracing::debug!(folder = %dir.display(), skipped = not_dicom.len(), "non-DICOM files ignored");
    }
    check_one_series(dir, &slices)?;
    geometry::check_consistent(&slices)?;
    let (order, affine) = geometry::sort_and_affine(dir, &slices)?;
    let data = pixels(&slices, &order)?;
    let spacing = [0, 1, 2].map(|c| (0..3).map(|r| affine[r][c].powi(2)).sum::<f64>().sqrt());
    let stored = natural_type(&data);
    let (h, w, d) = data.dim();
    let header = header_for([h, w, d], &affine, stored)?;
    Ok(Volume {
        data,
        affine,
        spacing,
        header,
    })
}

/// How a volume read by [`read_series`] is best stored as NIfTI: [`StoredType::Int16`] if
/// its header says `int16` (every value an integer in range), else [`StoredType::Float32`].
/// Both are exact.
pub fn stored_type(volume: &Volume) -> StoredType {
    if volume.header.datatype == nifti::NiftiType::Int16 as i16 {
        StoredType::Int16
    } else {
        StoredType::Float32
    }
}

/// `Int16` when every value is an integer that `i16` holds, else `Float32`.
fn natural_type(data: &Array3<f32>) -> StoredType {
    let integral = data
        .iter()
        .all(|&v| v.fract() == 0.0 && (f32::from(i16::MIN)..=f32::from(i16::MAX)).contains(&v));
    if integral {
        StoredType::Int16
    } else {
        StoredType::Float32
    }
}

pub(crate) fn dicom_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::Dicom {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The entries of a series folder: candidate files in name order, and what was ignored.
struct Listing {
    files: Vec<PathBuf>,
    ignored: Vec<PathBuf>,
}

fn list_folder(dir: &Path) -> Result<Listing> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut files = Vec::new();
    let mut ignored = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        // `metadata` follows symbolic links: a link to a slice is a slice.
        let is_file = std::fs::metadata(&path).is_ok_and(|m| m.is_file());
        if !is_file || name.starts_with('.') || name.eq_ignore_ascii_case("DICOMDIR") {
            ignored.push(path);
        } else {
            files.push(path);
        }
    }
    files.sort();
    ignored.sort();
    Ok(Listing { files, ignored })
}

/// Why a folder yielded no slice.
fn nothing_found(listing: &Listing, not_dicom: &[PathBuf]) -> String {
    let names = |paths: &[PathBuf]| {
        let shown: Vec<String> = paths
            .iter()
            .take(3)
            .map(|p| {
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        let more = if paths.len() > 3 { ", ..." } else { "" };
        format!("{}{more}", shown.join(", "))
    };
    match (listing.files.is_empty(), listing.ignored.is_empty()) {
        (true, true) => "the folder is empty: expected the files of one DICOM series".into(),
        (true, false) => format!(
            "no DICOM file in the folder (only ignored entries: {}); a series' files must be \
             directly in the folder given, not in subfolders",
            names(&listing.ignored)
        ),
        (false, _) => format!(
            "no DICOM file in the folder: none of its {} file(s) is a DICOM part-10 file (no \
             `DICM` at byte 128), e.g. {}",
            listing.files.len(),
            names(not_dicom)
        ),
    }
}

/// Every slice must have the first slice's `SeriesInstanceUID`.
fn check_one_series(dir: &Path, slices: &[Slice]) -> Result<()> {
    let mut series: Vec<(&str, usize, &Path)> = Vec::new();
    for s in slices {
        match series.iter_mut().find(|(uid, _, _)| *uid == s.series_uid) {
            Some((_, count, _)) => *count += 1,
            None => series.push((&s.series_uid, 1, &s.path)),
        }
    }
    if series.len() == 1 {
        return Ok(());
    }
    let list: Vec<String> = series
        .iter()
        .map(|(uid, count, first)| {
            format!(
                "{uid} ({count} file(s), e.g. {})",
                first.file_name().unwrap_or_default().to_string_lossy()
            )
        })
        .collect();
    Err(dicom_error(
        dir,
        format!(
            "the folder holds {} DICOM series (SeriesInstanceUID {}); put each series in its \
             own folder",
            series.len(),
            list.join(", ")
        ),
    ))
}

/// The rescaled pixel values, `[columns, rows, slices]` with the slices in `order`.
fn pixels(slices: &[Slice], order: &[usize]) -> Result<Array3<f32>> {
    let first = &slices[order[0]];
    let (rows, cols) = (first.rows, first.cols);
    let frames: Vec<Result<Vec<f32>>> = order
        .par_iter()
        .map(|&i| slices[i].pixel_values())
        .collect();
    // Voxel (i, j, k) = column i, row j of the k-th slice.
    let mut data = Array3::<f32>::zeros((cols, rows, order.len()));
    for (k, frame) in frames.into_iter().enumerate() {
        let frame = frame?;
        let frame = ndarray::ArrayView2::from_shape((rows, cols), &frame)
            .expect("pixel_values checked the length against rows x columns");
        data.index_axis_mut(Axis(2), k).assign(&frame.t());
    }
    Ok(data)
}

#[cfg(test)]
mod tests;
