//! The Learn2Reg 2022 NLST task (lung CT, baseline and follow-up scans of the National Lung
//! Screening Trial), as its archive unpacks:
//!
//! ```text
//! NLST_dataset.json                    the pairs, and each image's mask and keypoints
//! imagesTr/NLST_0001_0000.nii.gz       baseline scan
//! imagesTr/NLST_0001_0001.nii.gz       follow-up scan
//! masksTr/NLST_0001_0000.nii.gz        lung masks (optional)
//! keypointsTr/NLST_0001_0000.csv       keypoints of each image, `x,y,z` per line (optional)
//! ```
//!
//! The pairs are the ones the JSON lists under [`DEFAULT_PAIR_LISTS`]
//! (`training_paired_images` and `registration_val`, the training and validation pairs), or
//! under the keys the caller names (e.g. `registration_test` for the test release); each item
//! is `{"fixed": "./imagesTr/…", "moving": "./imagesTr/…"}`, paths relative to the JSON's
//! folder, and the JSON's fixed image is medray's fixed image (for NLST the baseline
//! `_0000`, the follow-up `_0001` moving). A pair listed twice is ingested once.
//!
//! An image's mask and keypoints are those its `training` (or `test`) entry names
//! (`{"image": …, "mask": …, "keypoints": …}`), which must then exist, else
//! `masksTr/<image file name>` and `keypointsTr/<image name>.csv` when present. The keypoint
//! files hold 0-based voxel indices of their image along the NIfTI axes (the Learn2Reg
//! evaluation samples the displacement at them directly), which is medray's convention: the
//! fixed image's row `n` and the moving image's row `n` become keypoint pair `n` as they are.
//!
//! The case id is the images' common prefix (`NLST_0001`), or `<fixed>_<moving>` file stems
//! when they differ or the prefix is taken. Paths in the JSON must stay inside its folder
//! (no `..`, not absolute).

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

use serde_json::Value;

use super::validate::{reason_of, BadCase};
use crate::dataset::CaseFiles;
use crate::keypoints::{read_keypoints, write_keypoint_pairs, KeypointPairs};
use crate::{Error, Result};

/// The dataset description at the root of the layout.
pub const NLST_JSON: &str = "NLST_dataset.json";
/// The pair lists read by default: training and validation pairs.
pub const DEFAULT_PAIR_LISTS: [&str; 2] = ["training_paired_images", "registration_val"];

/// Where and what to read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NlstConfig {
    /// The folder holding [`NLST_JSON`] (or the JSON file itself).
    pub root: PathBuf,
    /// The JSON keys whose pairs are ingested; empty: those of [`DEFAULT_PAIR_LISTS`] the
    /// JSON has.
    pub pair_lists: Vec<String>,
}

impl NlstConfig {
    /// The default pair lists of the folder (or JSON file) `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            pair_lists: Vec::new(),
        }
    }

    /// Sets the pair lists.
    pub fn with_pair_lists(mut self, lists: Vec<String>) -> Self {
        self.pair_lists = lists;
        self
    }

    /// The JSON file and the folder its paths are relative to.
    pub fn json_and_folder(&self) -> (PathBuf, PathBuf) {
        if self.root.is_file() {
            let folder = self
                .root
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf();
            (self.root.clone(), folder)
        } else {
            (self.root.join(NLST_JSON), self.root.clone())
        }
    }
}

/// One pair the JSON lists, with its files resolved (a missing file is reported by
/// [`convert_pair`], naming it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NlstPair {
    /// Case id.
    pub case: String,
    /// The JSON list it came from (first one, if listed twice).
    pub list: String,
    /// Fixed image.
    pub fixed: PathBuf,
    /// Moving image.
    pub moving: PathBuf,
    /// Masks `[fixed, moving]`: `(path, required)`; required when the JSON names it, else
    /// the conventional path, used when it exists.
    pub masks: [(PathBuf, bool); 2],
    /// Keypoint files `[fixed, moving]`: `(path, required)`, as `masks`.
    pub keypoints: [(PathBuf, bool); 2],
}

fn json_error(json: &Path, reason: impl Into<String>) -> Error {
    Error::invalid(
        "NLST dataset JSON",
        format!("{}: {}", json.display(), reason.into()),
    )
}

/// `./imagesTr/x.nii.gz` -> `imagesTr/x.nii.gz`, refusing paths that leave the folder.
fn relative(json: &Path, path: &str) -> Result<PathBuf> {
    let p = Path::new(path);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::Normal(part) => out.push(part),
            _ => {
                return Err(json_error(
                    json,
                    format!("path `{path}` leaves the dataset folder (`..` or absolute)"),
                ))
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(json_error(json, "an empty path"));
    }
    Ok(out)
}

fn stem(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.strip_suffix(".nii.gz")
        .or_else(|| name.strip_suffix(".nii"))
        .unwrap_or(&name)
        .to_string()
}

/// `NLST_0001_0000` -> `NLST_0001` (the part before a final `_<digits>`).
fn prefix(stem: &str) -> Option<&str> {
    let (head, tail) = stem.rsplit_once('_')?;
    (!head.is_empty() && !tail.is_empty() && tail.chars().all(|c| c.is_ascii_digit()))
        .then_some(head)
}

/// Reads the JSON and lists its pairs (see the module docs).
///
/// # Errors
/// [`Error::Io`] / [`Error::Json`] for the JSON file; [`Error::InvalidArgument`] naming the
/// JSON for a missing pair list, a malformed item or a path outside the folder, or when no
/// pair is listed.
pub fn read_pairs(config: &NlstConfig) -> Result<Vec<NlstPair>> {
    let (json, folder) = config.json_and_folder();
    let text = std::fs::read_to_string(&json).map_err(|e| Error::io(&json, e))?;
    let doc: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: json.clone(),
        source,
    })?;
    let Some(top) = doc.as_object() else {
        return Err(json_error(&json, "not a JSON object"));
    };
    let lists: Vec<String> = if config.pair_lists.is_empty() {
        let present: Vec<String> = DEFAULT_PAIR_LISTS
            .iter()
            .filter(|k| top.contains_key(**k))
            .map(|k| k.to_string())
            .collect();
        if present.is_empty() {
            return Err(json_error(
                &json,
                format!("no `{}` list", DEFAULT_PAIR_LISTS.join("` or `")),
            ));
        }
        present
    } else {
        config.pair_lists.clone()
    };

    // Each image's own entry (mask, keypoints), keyed by its relative path.
    let mut entries: Vec<(PathBuf, &serde_json::Map<String, Value>)> = Vec::new();
    for key in ["training", "test"] {
        if let Some(items) = top.get(key).and_then(Value::as_array) {
            for item in items.iter().filter_map(Value::as_object) {
                if let Some(image) = item.get("image").and_then(Value::as_str) {
                    entries.push((relative(&json, image)?, item));
                }
            }
        }
    }
    let own = |image: &Path, field: &str, fallback: PathBuf| -> Result<(PathBuf, bool)> {
        let named = entries
            .iter()
            .find(|(p, _)| p == image)
            .and_then(|(_, e)| e.get(field))
            .and_then(Value::as_str);
        Ok(match named {
            Some(path) => (folder.join(relative(&json, path)?), true),
            None => (fallback, false),
        })
    };

    let mut seen: HashSet<(PathBuf, PathBuf)> = HashSet::new();
    let mut ids: HashSet<String> = HashSet::new();
    let mut pairs = Vec::new();
    for list in &lists {
        let Some(value) = top.get(list) else {
            let available: Vec<&str> = top
                .iter()
                .filter(|(_, v)| v.is_array())
                .map(|(k, _)| k.as_str())
                .collect();
            return Err(json_error(
                &json,
                format!(
                    "no pair list `{list}` (lists in the file: {})",
                    available.join(", ")
                ),
            ));
        };
        let Some(items) = value.as_array() else {
            return Err(json_error(&json, format!("`{list}` is not a list")));
        };
        for (index, item) in items.iter().enumerate() {
            let field = |name: &str| -> Result<PathBuf> {
                let s = item.get(name).and_then(Value::as_str).ok_or_else(|| {
                    json_error(&json, format!("`{list}` item {index}: no `{name}` path"))
                })?;
                relative(&json, s)
            };
            let (fixed, moving) = (field("fixed")?, field("moving")?);
            if !seen.insert((fixed.clone(), moving.clone())) {
                continue;
            }
            let (fs, ms) = (stem(&fixed), stem(&moving));
            let mut case = match (prefix(&fs), prefix(&ms)) {
                (Some(a), Some(b)) if a == b => a.to_string(),
                _ => format!("{fs}_{ms}"),
            };
            if ids.contains(&case) {
                case = format!("{fs}_{ms}");
            }
            ids.insert(case.clone());
            let mask_of = |image: &Path| -> Result<(PathBuf, bool)> {
                let name = image.file_name().unwrap_or_default();
                own(image, "mask", folder.join("masksTr").join(name))
            };
            let keypoints_of = |image: &Path| -> Result<(PathBuf, bool)> {
                own(
                    image,
                    "keypoints",
                    folder
                        .join("keypointsTr")
                        .join(format!("{}.csv", stem(image))),
                )
            };
            pairs.push(NlstPair {
                case,
                list: list.clone(),
                masks: [mask_of(&fixed)?, mask_of(&moving)?],
                keypoints: [keypoints_of(&fixed)?, keypoints_of(&moving)?],
                fixed: folder.join(fixed),
                moving: folder.join(moving),
            });
        }
    }
    if pairs.is_empty() {
        return Err(json_error(
            &json,
            format!("no pair listed under `{}`", lists.join("`, `")),
        ));
    }
    Ok(pairs)
}

/// Checks that the pair's files exist and writes its keypoint pairs (when both images have
/// keypoints) to `work/<case>/keypoints.csv`; returns its files for validation.
///
/// # Errors
/// The [`BadCase`] naming the file: an image or a file the JSON names that the folder lacks,
/// keypoints for one image only, unreadable keypoints or two keypoint files of different
/// lengths.
pub fn convert_pair(pair: &NlstPair, work: &Path) -> std::result::Result<CaseFiles, BadCase> {
    let bad = |file: &Path, reason: String| BadCase {
        case_id: pair.case.clone(),
        file: Some(file.to_path_buf()),
        reason,
    };
    let listed = format!(
        "listed in {NLST_JSON} (`{}`) but not in the folder",
        pair.list
    );
    for image in [&pair.fixed, &pair.moving] {
        if !image.is_file() {
            return Err(bad(image, listed.clone()));
        }
    }
    let mut masks = [None, None];
    let mut keypoints = [None, None];
    for (from, to) in [(&pair.masks, &mut masks), (&pair.keypoints, &mut keypoints)] {
        for (slot, (path, required)) in from.iter().enumerate() {
            if path.is_file() {
                to[slot] = Some(path.clone());
            } else if *required {
                return Err(bad(path, listed.clone()));
            }
        }
    }
    let pairs_file = match keypoints {
        [None, None] => None,
        [Some(f), Some(m)] => {
            let read = |p: &Path| read_keypoints(p).map_err(|e| bad(p, reason_of(e)));
            let (fixed, moving) = (read(&f)?, read(&m)?);
            if fixed.points.len() != moving.points.len() {
                return Err(bad(
                    &m,
                    format!(
                        "{} keypoints, but the fixed image's {} has {}",
                        moving.points.len(),
                        f.display(),
                        fixed.points.len()
                    ),
                ));
            }
            let folder = work.join(&pair.case);
            std::fs::create_dir_all(&folder).map_err(|e| bad(&folder, e.to_string()))?;
            let out = folder.join("keypoints.csv");
            write_keypoint_pairs(
                &out,
                &KeypointPairs {
                    fixed: fixed.points,
                    moving: moving.points,
                },
            )
            .map_err(|e| bad(&out, reason_of(e)))?;
            Some(out)
        }
        [Some(present), None] | [None, Some(present)] => {
            let missing = if pair.keypoints[0].0 == present {
                &pair.keypoints[1].0
            } else {
                &pair.keypoints[0].0
            };
            return Err(bad(
                missing,
                format!(
                    "not found, but the other image of the pair has keypoints ({}): need both, or neither",
                    present.display()
                ),
            ));
        }
    };
    let [fixed_mask, moving_mask] = masks;
    Ok(CaseFiles {
        id: pair.case.clone(),
        fixed: pair.fixed.clone(),
        moving: pair.moving.clone(),
        fixed_mask,
        moving_mask,
        keypoints: pairs_file,
    })
}
