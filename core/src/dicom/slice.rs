//! One file of a series: its checks and the attributes the volume needs.

use std::path::{Path, PathBuf};

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, FileMetaTable, OpenFileOptions};
use dicom_pixeldata::PixelDecoder;
use dicom_transfer_syntax_registry::TransferSyntaxIndex;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use super::dicom_error;
use crate::{Error, Result};

/// SOP class UID of a DICOMDIR (Media Storage Directory Storage).
const MEDIA_STORAGE_DIRECTORY: &str = "1.2.840.10008.1.3.10";

/// One slice of a series, read in full (its pixel data is decoded later, in slice order).
pub(super) struct Slice {
    /// The file.
    pub path: PathBuf,
    /// `SeriesInstanceUID`.
    pub series_uid: String,
    /// `Rows`.
    pub rows: usize,
    /// `Columns`.
    pub cols: usize,
    /// `ImageOrientationPatient`: row direction (3), then column direction (3), LPS.
    pub orientation: [f64; 6],
    /// `ImagePositionPatient`: the centre of the first transmitted pixel, LPS, mm.
    pub position: [f64; 3],
    /// `PixelSpacing`: between rows (along the column direction), then between columns, mm.
    pub pixel_spacing: [f64; 2],
    object: DefaultDicomObject,
}

/// Reads `path`: `None` if it is not a DICOM part-10 file (no `DICM` at byte 128) or is a
/// DICOMDIR; else the slice, checked.
pub(super) fn read(path: &PathBuf) -> Result<Option<Slice>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if bytes.get(128..132) != Some(b"DICM".as_slice()) {
        return Ok(None);
    }
    let bad = |reason: String| dicom_error(path, reason);
    let body = &bytes[128..];
    let meta = FileMetaTable::from_reader(body).map_err(|e| {
        bad(format!(
            "unreadable DICOM file meta information: {}",
            chain(&e)
        ))
    })?;
    if meta.media_storage_sop_class_uid() == MEDIA_STORAGE_DIRECTORY {
        return Ok(None);
    }
    check_transfer_syntax(meta.transfer_syntax()).map_err(bad)?;
    let object = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Never)
        .from_reader(body)
        .map_err(|e| bad(format!("not readable as DICOM: {}", chain(&e))))?;
    Slice::new(path, object).map(Some)
}

/// An error and its sources, `outer: inner: ...` (dicom-rs puts the detail in the sources).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(&format!(": {e}"));
        source = e.source();
    }
    text
}

/// Only native (uncompressed) pixel data is read: no image codec is built in.
fn check_transfer_syntax(uid: &str) -> std::result::Result<(), String> {
    match TransferSyntaxRegistry.get(uid) {
        Some(ts) if ts.is_codec_free() => Ok(()),
        Some(ts) => Err(format!(
            "transfer syntax {uid} ({}) is not supported: medray reads uncompressed DICOM only \
             (implicit or explicit VR little endian, explicit VR big endian); decompress the \
             series first (e.g. `gdcmconv --raw` or `dcmdjpeg`)",
            ts.name()
        )),
        None => Err(format!(
            "unknown transfer syntax {uid}: medray reads uncompressed DICOM only (implicit or \
             explicit VR little endian, explicit VR big endian)"
        )),
    }
}

impl Slice {
    fn new(path: &Path, object: DefaultDicomObject) -> Result<Self> {
        let bad = |reason: String| dicom_error(path, reason);
        if object.get(tags::PIXEL_DATA).is_none() {
            return Err(bad(
                "no PixelData (7FE0,0010): the file is truncated or is not an image slice \
                 (a report, a structured report, a presentation state?)"
                    .into(),
            ));
        }
        let frames = match object.get(tags::NUMBER_OF_FRAMES) {
            Some(e) => e
                .to_int::<i64>()
                .map_err(|e| bad(format!("NumberOfFrames (0028,0008): {e}")))?,
            None => 1,
        };
        if frames != 1 {
            return Err(bad(format!(
                "NumberOfFrames is {frames}: only single-frame slices are supported (enhanced \
                 multi-frame CT is not)"
            )));
        }
        let samples = match object.get(tags::SAMPLES_PER_PIXEL) {
            Some(e) => e
                .to_int::<i64>()
                .map_err(|e| bad(format!("SamplesPerPixel (0028,0002): {e}")))?,
            None => 1,
        };
        if samples != 1 {
            return Err(bad(format!(
                "SamplesPerPixel is {samples}: only grey-level images are supported"
            )));
        }
        let series_uid = object
            .get(tags::SERIES_INSTANCE_UID)
            .map(|e| {
                e.to_str()
                    .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
            })
            .transpose()
            .map_err(|e| bad(format!("SeriesInstanceUID (0020,000E): {e}")))?
            .unwrap_or_default();
        let rows = size(&object, tags::ROWS, "Rows (0028,0010)").map_err(&bad)?;
        let cols = size(&object, tags::COLUMNS, "Columns (0028,0011)").map_err(&bad)?;
        let orientation: [f64; 6] = floats(
            &object,
            tags::IMAGE_ORIENTATION_PATIENT,
            "ImageOrientationPatient (0020,0037)",
        )
        .map_err(&bad)?;
        let orientation = unit_directions(orientation).map_err(&bad)?;
        let position = floats(
            &object,
            tags::IMAGE_POSITION_PATIENT,
            "ImagePositionPatient (0020,0032)",
        )
        .map_err(&bad)?;
        let pixel_spacing: [f64; 2] =
            floats(&object, tags::PIXEL_SPACING, "PixelSpacing (0028,0030)").map_err(&bad)?;
        if pixel_spacing.iter().any(|s| *s <= 0.0) {
            return Err(bad(format!(
                "PixelSpacing (0028,0030) {pixel_spacing:?}: must be positive"
            )));
        }
        Ok(Slice {
            path: path.to_path_buf(),
            series_uid,
            rows,
            cols,
            orientation,
            position,
            pixel_spacing,
            object,
        })
    }

    /// The slice's pixel values after the modality rescale (`RescaleSlope`,
    /// `RescaleIntercept`), row by row.
    pub(super) fn pixel_values(&self) -> Result<Vec<f32>> {
        let bad = |reason: String| dicom_error(&self.path, reason);
        let decoded = self
            .object
            .decode_pixel_data()
            .map_err(|e| bad(format!("cannot decode the pixel data: {}", chain(&e))))?;
        let values: Vec<f32> = decoded
            .to_vec()
            .map_err(|e| bad(format!("cannot convert the pixel data: {}", chain(&e))))?;
        let expected = self.rows * self.cols;
        if values.len() != expected {
            return Err(bad(format!(
                "PixelData holds {} values, Rows x Columns = {} x {} needs {expected}",
                values.len(),
                self.rows,
                self.cols
            )));
        }
        if let Some(v) = values.iter().find(|v| !v.is_finite()) {
            return Err(bad(format!("pixel value {v} is not finite")));
        }
        Ok(values)
    }
}

/// A required positive size attribute (`Rows`, `Columns`).
fn size(object: &DefaultDicomObject, tag: Tag, name: &str) -> std::result::Result<usize, String> {
    let value = object
        .get(tag)
        .ok_or_else(|| format!("{name} is missing"))?
        .to_int::<i64>()
        .map_err(|e| format!("{name}: {e}"))?;
    if value <= 0 {
        return Err(format!("{name} is {value}: must be positive"));
    }
    usize::try_from(value).map_err(|_| format!("{name} is {value}: too large"))
}

/// A required attribute of exactly `N` finite decimal values.
fn floats<const N: usize>(
    object: &DefaultDicomObject,
    tag: Tag,
    name: &str,
) -> std::result::Result<[f64; N], String> {
    let values = object
        .get(tag)
        .ok_or_else(|| format!("{name} is missing: the slice's geometry is unknown"))?
        .to_multi_float64()
        .map_err(|e| format!("{name}: {e}"))?;
    let array: [f64; N] = values
        .as_slice()
        .try_into()
        .map_err(|_| format!("{name} has {} values, expected {N}", values.len()))?;
    if array.iter().any(|v| !v.is_finite()) {
        return Err(format!("{name} {array:?} is not finite"));
    }
    Ok(array)
}

/// The row and column directions normalised; they must be non-zero and orthogonal.
fn unit_directions(iop: [f64; 6]) -> std::result::Result<[f64; 6], String> {
    let name = "ImageOrientationPatient (0020,0037)";
    let mut out = iop;
    for half in out.chunks_exact_mut(3) {
        let norm = half.iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm < 0.5 {
            return Err(format!("{name} {iop:?}: a direction is not a unit vector"));
        }
        half.iter_mut().for_each(|v| *v /= norm);
    }
    let dot: f64 = (0..3).map(|a| out[a] * out[a + 3]).sum();
    if dot.abs() > super::ORIENTATION_TOLERANCE {
        return Err(format!(
            "{name} {iop:?}: the row and column directions are not orthogonal (dot {dot:.2e})"
        ));
    }
    Ok(out)
}
