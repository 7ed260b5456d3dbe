//! The rows of the catalog: typed names and the records of datasets and cases.

use serde::{Deserialize, Serialize};

use crate::stage::ObjectKey;
use crate::{Error, Result};

fn check_name(field: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!("`{name}`: use 1-128 of A-Z a-z 0-9 _ - . (not starting with `.`)"),
        ))
    }
}

/// The name of a dataset (also its folder in the stage: `datasets/<name>/`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DatasetName(String);

impl DatasetName {
    /// Validates `name`: 1-128 of `A-Z a-z 0-9 _ - .`, not starting with `.`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] otherwise.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        check_name("dataset name", &name)?;
        Ok(Self(name))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for DatasetName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The id of a case inside a dataset, e.g. `case_001`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CaseId(String);

impl CaseId {
    /// Validates `id` with the same rule as [`DatasetName::new`].
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] otherwise.
    pub fn new(id: impl Into<String>) -> Result<Self> {
        let id = id.into();
        check_name("case id", &id)?;
        Ok(Self(id))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for CaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One published dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DatasetRecord {
    /// Its name.
    pub name: DatasetName,
    /// Where it came from (`dir:/path`, `synthetic:cases=..,size=..,seed=..`, a URL).
    pub source: String,
    /// When it was published, RFC 3339 UTC.
    pub created_at: String,
    /// Number of cases.
    pub case_count: usize,
    /// Total plaintext size of its files in bytes.
    pub bytes: u64,
    /// sha256 over the case ids and file hashes, in order: equal content, equal hash.
    pub content_sha256: String,
}

/// A file of a case stored in the stage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFile {
    /// Its object key.
    pub key: ObjectKey,
    /// sha256 of its plaintext content, hex.
    pub sha256: String,
}

/// One case of a dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaseRecord {
    /// Case id.
    pub case_id: CaseId,
    /// Fixed image (expiration), `scansExp/`.
    pub fixed: StoredFile,
    /// Moving image (inspiration), `scansInsp/`.
    pub moving: StoredFile,
    /// Fixed lung mask, `lungMasksExp/`.
    pub fixed_mask: Option<StoredFile>,
    /// Moving lung mask, `lungMasksInsp/`.
    pub moving_mask: Option<StoredFile>,
    /// Keypoint pairs CSV, `keypoints/`.
    pub keypoints: Option<StoredFile>,
    /// Grid size `[H, W, D]` in voxels (the same for all four volumes).
    pub shape: [usize; 3],
    /// Voxel spacing of the fixed image in mm.
    pub spacing_mm: [f64; 3],
    /// Voxel-to-world affine of the fixed image (mm), row-major.
    pub affine: [[f64; 4]; 4],
    /// Smallest intensity over both scans (the Learn2Reg files may not be in HU).
    pub intensity_min: f64,
    /// Largest intensity over both scans.
    pub intensity_max: f64,
    /// Number of keypoint pairs (0 without a keypoint file).
    pub keypoint_count: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_refuse_paths_and_odd_characters() {
        for bad in ["", "a/b", "..", ".hidden", "a b", "é"] {
            assert!(DatasetName::new(bad).is_err(), "{bad}");
        }
        assert!(DatasetName::new("lung-ct_v1.2").is_ok());
        assert!(CaseId::new("case_001").is_ok());
    }
}
