//! Dataset manifests: a CSV file that lists the files of each case, for folders that do not
//! follow the Learn2Reg layout.
//!
//! ```text
//! case_id,fixed,moving,fixed_mask,moving_mask,keypoints
//! p01,p01/exp.nii.gz,p01/insp.nii.gz,p01/exp_mask.nii.gz,p01/insp_mask.nii.gz,p01/kp.csv
//! ```
//!
//! The header is exactly `case_id,fixed,moving,fixed_mask,moving_mask` with an optional
//! sixth column `keypoints`. Paths are relative to the manifest's folder (absolute paths are
//! taken as they are). Every field is required, except that a `keypoints` cell may be empty
//! for a case without keypoints. Masks must be `.nii` or `.nii.gz` files; a scan (`fixed`,
//! `moving`) is a `.nii`/`.nii.gz` file or a folder holding one DICOM series, which the ingest
//! converts to NIfTI (see [`crate::dicom`] and [`super::convert`]). Errors name the
//! manifest, the line and the column. Cases are returned ordered by id, like
//! [`Learn2RegDataset`](crate::dataset::Learn2RegDataset) does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::catalog::CaseId;
use crate::dataset::CaseFiles;
use crate::{Error, Result};

/// The file name `medray ingest dir` looks for in a folder.
pub const MANIFEST_FILE: &str = "manifest.csv";

/// The required columns, in order.
pub const COLUMNS: [&str; 5] = ["case_id", "fixed", "moving", "fixed_mask", "moving_mask"];
/// The optional last column.
pub const KEYPOINTS_COLUMN: &str = "keypoints";

fn manifest_error(
    path: &Path,
    line: u64,
    column: Option<&str>,
    reason: impl Into<String>,
) -> Error {
    Error::Manifest {
        path: path.to_path_buf(),
        line,
        column: column.map(str::to_string),
        reason: reason.into(),
    }
}

/// Reads and checks the manifest at `path` (see the module docs).
///
/// # Errors
/// [`Error::Manifest`] naming the line and column of the first bad row: a wrong header, a
/// wrong number of fields, an empty field, an invalid or duplicate case id, a file that
/// does not exist, a mask that is not `.nii`/`.nii.gz` or a scan that is neither that nor a
/// folder; [`Error::Io`] if the manifest cannot be read.
pub fn read_manifest(path: &Path) -> Result<Vec<CaseFiles>> {
    let base = path.parent().unwrap_or(Path::new("."));
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_path(path)
        .map_err(|e| match e.into_kind() {
            csv::ErrorKind::Io(io) => Error::io(path, io),
            other => manifest_error(path, 1, None, format!("{other:?}")),
        })?;
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| manifest_error(path, 1, None, e.to_string()))?
        .iter()
        .map(str::to_string)
        .collect();
    let has_keypoints = match header.as_slice() {
        h if h == COLUMNS => false,
        h if h.len() == 6 && h[..5] == COLUMNS && h[5] == KEYPOINTS_COLUMN => true,
        _ => {
            return Err(manifest_error(
                path,
                1,
                None,
                format!(
                    "header `{}`: expected `{}` with an optional `,{KEYPOINTS_COLUMN}`",
                    header.join(","),
                    COLUMNS.join(",")
                ),
            ))
        }
    };

    let mut first_line: HashMap<String, u64> = HashMap::new();
    let mut cases = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map_or(0, csv::Position::line);
            manifest_error(path, line, None, e.to_string())
        })?;
        let line = record.position().map_or(0, csv::Position::line);
        let field = |column: usize| record.get(column).unwrap_or("");
        let err = |column: usize, reason: String| {
            manifest_error(path, line, Some(header[column].as_str()), reason)
        };
        for column in 0..COLUMNS.len() {
            if field(column).is_empty() {
                return Err(err(column, "empty field".into()));
            }
        }
        let id = field(0).to_string();
        CaseId::new(id.clone()).map_err(|e| err(0, e.to_string()))?;
        if let Some(first) = first_line.insert(id.clone(), line) {
            return Err(err(
                0,
                format!("duplicate case_id `{id}` (first on line {first})"),
            ));
        }
        let file = |column: usize| -> Result<PathBuf> {
            let resolved = base.join(field(column));
            let volume = column < COLUMNS.len();
            let scan = column == 1 || column == 2;
            if scan && resolved.is_dir() {
                // A DICOM series folder; read (and converted) by validation.
                return Ok(resolved);
            }
            let name = resolved.to_string_lossy();
            if volume && !(name.ends_with(".nii.gz") || name.ends_with(".nii")) {
                let expected = if scan {
                    "a .nii or .nii.gz file or a DICOM series folder"
                } else {
                    "a .nii or .nii.gz file (masks are NIfTI)"
                };
                return Err(err(
                    column,
                    format!("{}: expected {expected}", resolved.display()),
                ));
            }
            if !resolved.is_file() {
                return Err(err(column, format!("no such file: {}", resolved.display())));
            }
            Ok(resolved)
        };
        let keypoints = if has_keypoints && !field(5).is_empty() {
            Some(file(5)?)
        } else {
            None
        };
        cases.push(CaseFiles {
            fixed: file(1)?,
            moving: file(2)?,
            fixed_mask: Some(file(3)?),
            moving_mask: Some(file(4)?),
            keypoints,
            id,
        });
    }
    if cases.is_empty() {
        return Err(manifest_error(path, 1, None, "no cases after the header"));
    }
    cases.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(cases)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const HEADER: &str = "case_id,fixed,moving,fixed_mask,moving_mask,keypoints\n";

    fn setup(rows: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "a/e.nii.gz",
            "a/i.nii.gz",
            "a/em.nii",
            "a/im.nii",
            "a/k.csv",
        ] {
            let p = dir.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        }
        let csv = dir.path().join("m.csv");
        std::fs::write(&csv, rows).unwrap();
        (dir, csv)
    }

    #[test]
    fn reads_rows_relative_to_the_manifest_in_id_order() {
        let (dir, csv) = setup(&format!(
            "{HEADER}p2, a/e.nii.gz,a/i.nii.gz,a/em.nii,a/im.nii,\n\
             p1,a/e.nii.gz,a/i.nii.gz,a/em.nii,a/im.nii,a/k.csv\n"
        ));
        let cases = read_manifest(&csv).unwrap();
        assert_eq!(cases.len(), 2);
        assert_eq!(cases[0].id, "p1");
        assert_eq!(cases[0].fixed, dir.path().join("a/e.nii.gz"));
        assert_eq!(cases[0].keypoints, Some(dir.path().join("a/k.csv")));
        assert_eq!(cases[1].keypoints, None);
        assert_eq!(cases[1].moving_mask, Some(dir.path().join("a/im.nii")));
    }

    #[test]
    fn bad_rows_are_named_by_line_and_column() {
        let row = "a/e.nii.gz,a/i.nii.gz,a/em.nii,a/im.nii,a/k.csv";
        let cases = [
            (
                format!("{HEADER}p1,{row}\np1,{row}\n"),
                "line 3, column `case_id`: duplicate case_id `p1` (first on line 2)",
            ),
            (
                format!("{HEADER}p1,a/e.nii.gz,,a/em.nii,a/im.nii,\n"),
                "line 2, column `moving`: empty field",
            ),
            (
                format!("{HEADER}p1,a/e.nii.gz,a/nope.nii.gz,a/em.nii,a/im.nii,\n"),
                "line 2, column `moving`: no such file",
            ),
            (
                format!("{HEADER}p1,a/k.csv,a/i.nii.gz,a/em.nii,a/im.nii,\n"),
                "line 2, column `fixed`",
            ),
            (
                format!("{HEADER}p1,{row}\np2,a/e.nii.gz,a/i.nii.gz,a/em.nii,a/im.nii,a/x.csv\n"),
                "line 3, column `keypoints`: no such file",
            ),
            (format!("{HEADER}p 1,{row}\n"), "line 2, column `case_id`"),
            (format!("{HEADER}p1,a/e.nii.gz\n"), "line 2"),
            ("case,fixed,moving\np1,a,b\n".to_string(), "line 1: header"),
            (HEADER.to_string(), "no cases"),
        ];
        for (text, want) in cases {
            let (_dir, csv) = setup(&text);
            let msg = read_manifest(&csv).unwrap_err().to_string();
            assert!(msg.contains(want), "{want:?} not in {msg:?}");
            assert!(msg.contains("m.csv"), "{msg}");
        }
    }
}
