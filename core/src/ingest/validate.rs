//! Validation of one case before anything is stored: every volume is read in full
//! ([`read_volume`]: 3-D, supported datatype, positive finite spacing, finite values), the
//! fixed and moving scans and their masks share one grid, masks hold only 0 and 1, masks
//! come in exp/insp pairs, and the keypoint file parses.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::catalog::CaseId;
use crate::dataset::CaseFiles;
use crate::keypoints::read_keypoint_pairs;
use crate::nifti_io::{read_volume, Volume};
use crate::Error;

/// The role of a file in a case, which is also its folder in the stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// Expiration scan (fixed).
    Fixed,
    /// Inspiration scan (moving).
    Moving,
    /// Expiration lung mask.
    FixedMask,
    /// Inspiration lung mask.
    MovingMask,
    /// Keypoint pairs CSV.
    Keypoints,
}

impl FileKind {
    /// Every kind, in storage order.
    pub const ALL: [FileKind; 5] = [
        FileKind::Fixed,
        FileKind::Moving,
        FileKind::FixedMask,
        FileKind::MovingMask,
        FileKind::Keypoints,
    ];

    /// The stage folder of this kind (the quickstart's four folders and `keypoints`).
    pub fn folder(self) -> &'static str {
        match self {
            FileKind::Fixed => "scansExp",
            FileKind::Moving => "scansInsp",
            FileKind::FixedMask => "lungMasksExp",
            FileKind::MovingMask => "lungMasksInsp",
            FileKind::Keypoints => "keypoints",
        }
    }
}

/// A file that passed validation.
#[derive(Clone, Debug)]
pub struct ValidatedFile {
    /// Its role.
    pub kind: FileKind,
    /// Where it is on disk.
    pub path: PathBuf,
    /// sha256 of its bytes, hex.
    pub sha256: String,
    /// Its size in bytes.
    pub bytes: u64,
}

/// A case that passed validation, with what the catalog records about it.
#[derive(Clone, Debug)]
pub struct ValidCase {
    /// Case id.
    pub case_id: CaseId,
    /// Its files, in [`FileKind::ALL`] order.
    pub files: Vec<ValidatedFile>,
    /// Grid size `[H, W, D]`.
    pub shape: [usize; 3],
    /// Fixed-image voxel spacing in mm.
    pub spacing_mm: [f64; 3],
    /// Fixed-image affine.
    pub affine: [[f64; 4]; 4],
    /// Smallest intensity over both scans.
    pub intensity_min: f64,
    /// Largest intensity over both scans.
    pub intensity_max: f64,
    /// Number of keypoint pairs.
    pub keypoint_count: usize,
}

/// A case refused by validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadCase {
    /// Its id.
    pub case_id: String,
    /// The offending file, when one file is to blame.
    pub file: Option<PathBuf>,
    /// Why it was refused.
    pub reason: String,
}

impl std::fmt::Display for BadCase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.file {
            Some(p) => write!(f, "{}: {}: {}", self.case_id, p.display(), self.reason),
            None => write!(f, "{}: {}", self.case_id, self.reason),
        }
    }
}

fn bad(case: &CaseFiles, file: Option<&Path>, reason: impl Into<String>) -> BadCase {
    BadCase {
        case_id: case.id.clone(),
        file: file.map(Path::to_path_buf),
        reason: reason.into(),
    }
}

/// The message of a file error without the path (the bad case names the file).
pub(super) fn reason_of(e: Error) -> String {
    match e {
        Error::Nifti { reason, .. } | Error::Dicom { reason, .. } => reason,
        Error::Keypoints { line, reason, .. } => format!("line {line}: {reason}"),
        Error::Io { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

fn hash_file(case: &CaseFiles, kind: FileKind, path: &Path) -> Result<ValidatedFile, BadCase> {
    let data = std::fs::read(path).map_err(|e| bad(case, Some(path), e.to_string()))?;
    Ok(ValidatedFile {
        kind,
        path: path.to_path_buf(),
        sha256: hex::encode(Sha256::digest(&data)),
        bytes: data.len() as u64,
    })
}

fn volume(case: &CaseFiles, path: &Path) -> Result<Volume, BadCase> {
    read_volume(path).map_err(|e| bad(case, Some(path), reason_of(e)))
}

/// Validates one case; the error names the case, the file and the reason.
pub fn validate_case(case: &CaseFiles) -> Result<ValidCase, BadCase> {
    let case_id = CaseId::new(case.id.clone()).map_err(|e| bad(case, None, e.to_string()))?;
    let fixed = volume(case, &case.fixed)?;
    let moving = volume(case, &case.moving)?;
    let shape = fixed.shape();
    if moving.shape() != shape {
        return Err(bad(
            case,
            Some(&case.moving),
            format!(
                "shape {:?} differs from the expiration scan's {:?}",
                moving.shape(),
                shape
            ),
        ));
    }
    let mut files = vec![
        hash_file(case, FileKind::Fixed, &case.fixed)?,
        hash_file(case, FileKind::Moving, &case.moving)?,
    ];
    match (&case.fixed_mask, &case.moving_mask) {
        (None, None) => {}
        (Some(_), None) | (None, Some(_)) => {
            return Err(bad(
                case,
                None,
                "lung masks incomplete: need both case_XXX_exp and case_XXX_insp",
            ))
        }
        (Some(fm), Some(mm)) => {
            for (kind, path) in [(FileKind::FixedMask, fm), (FileKind::MovingMask, mm)] {
                let mask = volume(case, path)?;
                if mask.shape() != shape {
                    return Err(bad(
                        case,
                        Some(path),
                        format!(
                            "mask shape {:?} differs from the scan's {:?}",
                            mask.shape(),
                            shape
                        ),
                    ));
                }
                if let Some(v) = mask.data.iter().find(|&&v| v != 0.0 && v != 1.0) {
                    return Err(bad(
                        case,
                        Some(path),
                        format!("mask is not binary: holds the value {v} (expected only 0 and 1)"),
                    ));
                }
                files.push(hash_file(case, kind, path)?);
            }
        }
    }
    let mut keypoint_count = 0;
    if let Some(kp) = &case.keypoints {
        keypoint_count = read_keypoint_pairs(kp)
            .map_err(|e| bad(case, Some(kp), reason_of(e)))?
            .len();
        files.push(hash_file(case, FileKind::Keypoints, kp)?);
    }
    let (lo, hi) = fixed
        .data
        .iter()
        .chain(moving.data.iter())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    Ok(ValidCase {
        case_id,
        files,
        shape,
        spacing_mm: fixed.spacing,
        affine: fixed.affine,
        intensity_min: lo as f64,
        intensity_max: hi as f64,
        keypoint_count,
    })
}
