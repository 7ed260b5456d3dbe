//! What a model version was trained on, and whether a case was among it.
//!
//! A training job records, with the version it registers, the dataset (name and content
//! version) and every training and validation case with the sha256 of its two images
//! ([`TrainingData`]). An inference result is then labelled by [`case_split`]:
//!
//! * `train`: one of the case's images (fixed or moving) is an image of a training case;
//! * `validation`: otherwise, one of them is an image of a validation case (not trained on,
//!   but used to select the best epoch);
//! * `held-out`: neither image was seen in training or validation;
//! * unknown (`None`): the version records no training data (imported weights, versions
//!   registered before medray recorded it). Never guessed.
//!
//! The comparison is by image content, not by names: a case of another dataset with the
//! same case id but other images is held-out, and the same images ingested again under
//! another dataset name (or in a replaced dataset) are still recognised as trained on. A
//! case sharing only one image with a training case counts as `train`, so held-out figures
//! never include an image the network has seen.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::catalog::{CaseId, CaseRecord, DatasetName};
use crate::{Error, Result};

/// Whether a result's case was among the data its model was trained on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Split {
    /// Trained on.
    #[serde(rename = "train")]
    Train,
    /// Validated on: not trained on, but used to select the weights.
    #[serde(rename = "validation")]
    Validation,
    /// Neither trained nor validated on.
    #[serde(rename = "held-out")]
    HeldOut,
}

impl Split {
    /// Every split, held-out first (the order reports show them in).
    pub const ALL: [Split; 3] = [Split::HeldOut, Split::Validation, Split::Train];

    /// `train`, `validation` or `held-out` (the `split` column of the results table).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::HeldOut => "held-out",
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Split {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "train" => Ok(Split::Train),
            "validation" => Ok(Split::Validation),
            "held-out" => Ok(Split::HeldOut),
            other => Err(Error::invalid(
                "split",
                format!("`{other}` is not one of: train, validation, held-out"),
            )),
        }
    }
}

/// One case a model was trained or validated on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainedCase {
    /// Its id in the training dataset.
    pub case_id: String,
    /// sha256 of its fixed image's plaintext, hex.
    pub fixed_sha256: String,
    /// sha256 of its moving image's plaintext, hex.
    pub moving_sha256: String,
}

impl TrainedCase {
    /// The case of a catalog record.
    #[must_use]
    pub fn of(record: &CaseRecord) -> Self {
        Self {
            case_id: record.case_id.to_string(),
            fixed_sha256: record.fixed.sha256.clone(),
            moving_sha256: record.moving.sha256.clone(),
        }
    }
}

/// The data a model version was trained on, as its training job recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainingData {
    /// The training dataset's name.
    pub dataset: String,
    /// Its content version (the catalog's `content_sha256`) when the version was
    /// registered; `None` when the dataset had changed since the job read its cases.
    pub dataset_sha256: Option<String>,
    /// The training cases, in the job's order.
    pub train: Vec<TrainedCase>,
    /// The validation cases.
    pub validation: Vec<TrainedCase>,
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl TrainingData {
    /// Checks the names, ids and hashes; at least one training case, no case id twice.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `training_data` and what is wrong.
    pub fn validate(&self) -> Result<()> {
        let field = "training_data";
        DatasetName::new(self.dataset.clone()).map_err(|e| Error::invalid(field, e.to_string()))?;
        if let Some(sha) = &self.dataset_sha256 {
            if !is_sha256(sha) {
                return Err(Error::invalid(
                    field,
                    format!("dataset_sha256 `{sha}`: expected 64 hex digits"),
                ));
            }
        }
        if self.train.is_empty() {
            return Err(Error::invalid(field, "no training case"));
        }
        let mut ids = HashSet::new();
        for c in self.train.iter().chain(&self.validation) {
            CaseId::new(c.case_id.clone()).map_err(|e| Error::invalid(field, e.to_string()))?;
            if !ids.insert(c.case_id.as_str()) {
                return Err(Error::invalid(
                    field,
                    format!("case `{}` is listed twice", c.case_id),
                ));
            }
            for sha in [&c.fixed_sha256, &c.moving_sha256] {
                if !is_sha256(sha) {
                    return Err(Error::invalid(
                        field,
                        format!(
                            "case `{}`: image sha256 `{sha}` is not 64 hex digits",
                            c.case_id
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The training case ids, in order.
    #[must_use]
    pub fn train_ids(&self) -> Vec<String> {
        self.train.iter().map(|c| c.case_id.clone()).collect()
    }

    /// The validation case ids, in order.
    #[must_use]
    pub fn validation_ids(&self) -> Vec<String> {
        self.validation.iter().map(|c| c.case_id.clone()).collect()
    }

    /// The split of a case whose images have these sha256 (see the module docs).
    #[must_use]
    pub fn split_of(&self, fixed_sha256: &str, moving_sha256: &str) -> Split {
        let seen = |cases: &[TrainedCase]| {
            cases.iter().any(|c| {
                [&c.fixed_sha256, &c.moving_sha256]
                    .iter()
                    .any(|s| s.as_str() == fixed_sha256 || s.as_str() == moving_sha256)
            })
        };
        if seen(&self.train) {
            Split::Train
        } else if seen(&self.validation) {
            Split::Validation
        } else {
            Split::HeldOut
        }
    }
}

/// The split of `case` for a model version trained on `training`; `None` (unknown) when the
/// version records no training data.
#[must_use]
pub fn case_split(training: Option<&TrainingData>, case: &CaseRecord) -> Option<Split> {
    training.map(|t| t.split_of(&case.fixed.sha256, &case.moving.sha256))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::StoredFile;
    use crate::stage::ObjectKey;

    fn sha(tag: &str) -> String {
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(tag.as_bytes()))
    }

    fn record(dataset: &str, id: &str, content: &str) -> CaseRecord {
        let file = |phase: &str| StoredFile {
            key: ObjectKey::new(format!("datasets/{dataset}/scans/{id}_{phase}.nii.gz"))
                .expect("key"),
            sha256: sha(&format!("{content}/{phase}")),
        };
        CaseRecord {
            case_id: CaseId::new(id).expect("id"),
            fixed: file("exp"),
            moving: file("insp"),
            fixed_mask: None,
            moving_mask: None,
            keypoints: None,
            shape: [16, 16, 16],
            spacing_mm: [1.0; 3],
            affine: [[0.0; 4]; 4],
            intensity_min: 0.0,
            intensity_max: 1.0,
            keypoint_count: 0,
        }
    }

    #[test]
    fn cases_are_told_apart_by_content_not_by_id() {
        let trained: Vec<CaseRecord> = ["case_001", "case_002", "case_003"]
            .iter()
            .map(|id| record("a", id, &format!("a/{id}")))
            .collect();
        let training = TrainingData {
            dataset: "a".into(),
            dataset_sha256: Some(sha("a")),
            train: trained[..2].iter().map(TrainedCase::of).collect(),
            validation: vec![TrainedCase::of(&trained[2])],
        };
        training.validate().expect("valid");
        let split = |r: &CaseRecord| case_split(Some(&training), r);
        assert_eq!(split(&trained[0]), Some(Split::Train));
        assert_eq!(split(&trained[2]), Some(Split::Validation));
        // Another dataset with the same case ids but other images: held-out.
        assert_eq!(
            split(&record("b", "case_001", "b/case_001")),
            Some(Split::HeldOut)
        );
        // The same images under another dataset name and case id: still trained on.
        assert_eq!(
            split(&record("copy", "x7", "a/case_002")),
            Some(Split::Train)
        );
        // One image seen in training is enough to not count as held-out.
        let mut mixed = record("b", "case_009", "b/case_009");
        mixed.moving.sha256 = trained[2].fixed.sha256.clone();
        assert_eq!(split(&mixed), Some(Split::Validation));
        // No recorded training data: unknown, never guessed.
        assert_eq!(case_split(None, &trained[0]), None);
        for s in Split::ALL {
            assert_eq!(s.as_str().parse::<Split>().expect("parses"), s);
        }
    }

    #[test]
    fn invalid_training_data_is_refused() {
        let case = TrainedCase::of(&record("a", "case_001", "x"));
        let good = TrainingData {
            dataset: "a".into(),
            dataset_sha256: None,
            train: vec![case.clone()],
            validation: Vec::new(),
        };
        good.validate().expect("valid");
        let mut twice = good.clone();
        twice.validation.push(case.clone());
        let mut bad_sha = good.clone();
        bad_sha.train[0].fixed_sha256 = "abc".into();
        let mut empty = good.clone();
        empty.train.clear();
        for (bad, what) in [
            (twice, "listed twice"),
            (bad_sha, "64 hex"),
            (empty, "no training case"),
        ] {
            let e = bad.validate().expect_err(what);
            assert!(e.to_string().contains(what), "{e}");
        }
    }
}
