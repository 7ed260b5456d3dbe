//! DICOM scans in an ingest: a fixed or moving scan given as a folder holding one DICOM series
//! is read ([`crate::dicom::read_series`]) and written as NIfTI into the ingest's work folder
//! before validation, so that validation, hashing and the stage see the `.nii.gz` file that
//! is stored (`<case>_exp.nii.gz`, `<case>_insp.nii.gz`, int16 for CT in HU, else float32;
//! the affine is the series' in RAS+). Masks are NIfTI files and are taken as they are.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::validate::{reason_of, validate_case, BadCase, ValidCase};
use crate::dataset::CaseFiles;
use crate::dicom;
use crate::nifti_io::write_volume_as;
use crate::Result;

/// Validates `case` like [`validate_case`], first converting each scan that is a DICOM series
/// folder to a NIfTI file under `work` (the validated and stored file). A refusal names the
/// series folder, not the converted file.
///
/// # Errors
/// The [`BadCase`] of the series (unreadable, see [`crate::dicom`]) or of the validation.
pub fn validate_converting(
    case: &CaseFiles,
    work: &Path,
) -> std::result::Result<ValidCase, BadCase> {
    let mut converted = case.clone();
    let mut sources: Vec<(PathBuf, PathBuf)> = Vec::new();
    // A folder per case, named after a hash of its id: ids are not validated yet.
    let folder = work.join(&hex::encode(Sha256::digest(case.id.as_bytes()))[..16]);
    for (scan, phase) in [
        (&mut converted.fixed, "exp"),
        (&mut converted.moving, "insp"),
    ] {
        if !scan.is_dir() {
            continue;
        }
        let target = folder.join(format!("{phase}.nii.gz"));
        convert_series(scan, &target).map_err(|e| BadCase {
            case_id: case.id.clone(),
            file: Some(scan.clone()),
            reason: reason_of(e),
        })?;
        sources.push((target.clone(), scan.clone()));
        *scan = target;
    }
    validate_case(&converted).map_err(|mut bad| {
        if let Some((_, source)) = sources.iter().find(|(t, _)| Some(t) == bad.file.as_ref()) {
            bad.file = Some(source.clone());
        }
        bad
    })
}

/// Reads the DICOM series `series` and writes it as the NIfTI file `target`.
///
/// # Errors
/// [`crate::Error::Dicom`] for the series, [`crate::Error::Io`] if writing fails.
pub fn convert_series(series: &Path, target: &Path) -> Result<()> {
    let volume = dicom::read_series(series)?;
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|e| crate::Error::io(parent, e))?;
    }
    write_volume_as(
        target,
        &volume.data,
        &volume.affine,
        dicom::stored_type(&volume),
    )?;
    tracing::info!(series = %series.display(), nifti = %target.display(), shape = ?volume.shape(), "DICOM series converted for the ingest");
    Ok(())
}
