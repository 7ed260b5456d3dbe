//! A paired lung-CT dataset in the Learn2Reg 2020 layout, on local disk:
//!
//! ```text
//! DIR/scans/case_001_exp.nii.gz       fixed  (expiration)
//! DIR/scans/case_001_insp.nii.gz      moving (inspiration)
//! DIR/lungMasks/case_001_exp.nii.gz   optional lung masks
//! DIR/lungMasks/case_001_insp.nii.gz
//! DIR/keypoints/case_001.csv          optional keypoint pairs (fixed xyz, moving xyz)
//! ```
//!
//! A scan may also be a folder holding one DICOM series (`DIR/scans/case_001_exp/`, read by
//! [`crate::dicom`]; `medray ingest` stores it as NIfTI); masks are NIfTI files.
//! `DIR/training/...` (the layout of the Zenodo archive) is accepted too. Cases are ordered
//! by id; an expiration scan without its inspiration partner (or the reverse) is an error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The files of one case.
#[derive(Clone, Debug, PartialEq)]
pub struct CaseFiles {
    /// Case id, e.g. `case_001`.
    pub id: String,
    /// Fixed image (expiration).
    pub fixed: PathBuf,
    /// Moving image (inspiration).
    pub moving: PathBuf,
    /// Fixed lung mask.
    pub fixed_mask: Option<PathBuf>,
    /// Moving lung mask.
    pub moving_mask: Option<PathBuf>,
    /// Keypoint pairs.
    pub keypoints: Option<PathBuf>,
}

/// The cases found in a dataset directory.
#[derive(Clone, Debug)]
pub struct Learn2RegDataset {
    /// The directory that holds `scans/`.
    pub root: PathBuf,
    /// Cases ordered by id.
    pub cases: Vec<CaseFiles>,
}

fn strip_nifti(name: &str) -> Option<&str> {
    name.strip_suffix(".nii.gz")
        .or_else(|| name.strip_suffix(".nii"))
}

impl Learn2RegDataset {
    /// Scans `dir` for cases.
    pub fn open(dir: &Path) -> Result<Self> {
        let root = if dir.join("scans").is_dir() {
            dir.to_path_buf()
        } else if dir.join("training/scans").is_dir() {
            dir.join("training")
        } else {
            return Err(Error::invalid(
                "dataset",
                format!(
                    "{}: no scans/ folder (expected the Learn2Reg layout: scans/case_XXX_exp.nii.gz, scans/case_XXX_insp.nii.gz)",
                    dir.display()
                ),
            ));
        };
        let scans = root.join("scans");
        let mut pairs: BTreeMap<String, (Option<PathBuf>, Option<PathBuf>)> = BTreeMap::new();
        let entries = std::fs::read_dir(&scans).map_err(|e| Error::io(&scans, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&scans, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // A folder `case_001_exp/` is a DICOM series (converted to NIfTI by the ingest).
            let series = entry.path().is_dir();
            let Some(stem) = (if series {
                Some(name.as_str())
            } else {
                strip_nifti(&name)
            }) else {
                continue;
            };
            if let Some(id) = stem.strip_suffix("_exp") {
                pairs.entry(id.to_string()).or_default().0 = Some(entry.path());
            } else if let Some(id) = stem.strip_suffix("_insp") {
                pairs.entry(id.to_string()).or_default().1 = Some(entry.path());
            }
        }
        let mut cases = Vec::new();
        for (id, (exp, insp)) in pairs {
            let (Some(fixed), Some(moving)) = (exp, insp) else {
                return Err(Error::invalid(
                    "dataset",
                    format!(
                        "{}: case {id} lacks its {} scan",
                        scans.display(),
                        "expiration/inspiration partner"
                    ),
                ));
            };
            let find = |dir: &str, suffix: &str| -> Option<PathBuf> {
                [".nii.gz", ".nii"]
                    .iter()
                    .map(|ext| root.join(dir).join(format!("{id}{suffix}{ext}")))
                    .find(|p| p.is_file())
            };
            let keypoints = root.join("keypoints").join(format!("{id}.csv"));
            cases.push(CaseFiles {
                fixed_mask: find("lungMasks", "_exp"),
                moving_mask: find("lungMasks", "_insp"),
                keypoints: keypoints.is_file().then_some(keypoints),
                id,
                fixed,
                moving,
            });
        }
        if cases.is_empty() {
            return Err(Error::invalid(
                "dataset",
                format!("{}: no case_XXX_exp / case_XXX_insp pairs", scans.display()),
            ));
        }
        Ok(Self { root, cases })
    }

    /// Splits the cases: the first `ceil(n * (1 - val_fraction))` train, the rest validate
    /// (the quickstart's "first 80% train"). At least one case trains.
    pub fn split(&self, val_fraction: f64) -> Result<(Vec<CaseFiles>, Vec<CaseFiles>)> {
        if !(0.0..1.0).contains(&val_fraction) {
            return Err(Error::invalid(
                "val_fraction",
                format!("must be in [0, 1), got {val_fraction}"),
            ));
        }
        let n_train = train_count(self.cases.len(), val_fraction)?;
        Ok((
            self.cases[..n_train].to_vec(),
            self.cases[n_train..].to_vec(),
        ))
    }
}

/// How many of `n` cases train when `val_fraction` validate: `round(n * (1 - f))`, at least
/// one (the quickstart's "first 80% train").
pub fn train_count(n: usize, val_fraction: f64) -> Result<usize> {
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(Error::invalid(
            "val_fraction",
            format!("must be in [0, 1), got {val_fraction}"),
        ));
    }
    Ok(((n as f64 * (1.0 - val_fraction)).round() as usize).clamp(1, n.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"x").unwrap();
    }

    #[test]
    fn finds_cases_masks_and_keypoints_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path().join("training");
        for id in ["case_002", "case_001"] {
            touch(&r.join(format!("scans/{id}_exp.nii.gz")));
            touch(&r.join(format!("scans/{id}_insp.nii.gz")));
        }
        touch(&r.join("lungMasks/case_001_exp.nii.gz"));
        touch(&r.join("lungMasks/case_001_insp.nii.gz"));
        touch(&r.join("keypoints/case_002.csv"));
        let ds = Learn2RegDataset::open(dir.path()).unwrap();
        let ids: Vec<_> = ds.cases.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["case_001", "case_002"]);
        assert!(ds.cases[0].fixed_mask.is_some() && ds.cases[0].keypoints.is_none());
        assert!(ds.cases[1].fixed_mask.is_none() && ds.cases[1].keypoints.is_some());
        let (train, val) = ds.split(0.5).unwrap();
        assert_eq!((train.len(), val.len()), (1, 1));
    }

    #[test]
    fn an_unpaired_scan_is_an_error_naming_the_case() {
        let dir = tempfile::tempdir().unwrap();
        touch(&dir.path().join("scans/case_007_exp.nii.gz"));
        let err = Learn2RegDataset::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("case_007"), "{err}");
        let empty = tempfile::tempdir().unwrap();
        assert!(Learn2RegDataset::open(empty.path()).is_err());
    }
}
