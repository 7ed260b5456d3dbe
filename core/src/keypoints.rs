//! Landmark files: CSV lists of voxel coordinates used for the target registration error.
//!
//! Coordinates are in voxels of the image they belong to, along array axes 0, 1, 2 (the same
//! axes as [`crate::nifti_io::Volume::data`] and as the DDF channels), as floats. A file has
//! either 3 columns (`x,y,z`: one point set, [`Keypoints`]) or 6 columns
//! (`fixed_x,fixed_y,fixed_z,moving_x,moving_y,moving_z`: corresponding pairs,
//! [`KeypointPairs`]), with or without a header line (a first line that is not numeric).
//! Blank lines are ignored. Errors name the file and the 1-based line.

use std::path::Path;

use crate::{Error, Result};

/// Header line written by [`write_keypoint_pairs`].
pub const PAIRS_HEADER: &str = "fixed_x,fixed_y,fixed_z,moving_x,moving_y,moving_z";
/// Header line written by [`write_keypoints`].
pub const POINTS_HEADER: &str = "x,y,z";

/// A set of points in voxel coordinates (N x 3).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Keypoints {
    /// The points, `[axis0, axis1, axis2]` in voxels.
    pub points: Vec<[f64; 3]>,
}

/// Corresponding points: `fixed[n]` in the fixed image matches `moving[n]` in the moving one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeypointPairs {
    /// Points in fixed-image voxel coordinates.
    pub fixed: Vec<[f64; 3]>,
    /// Their correspondences in moving-image voxel coordinates.
    pub moving: Vec<[f64; 3]>,
}

impl KeypointPairs {
    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.fixed.len()
    }

    /// Whether there is no pair.
    pub fn is_empty(&self) -> bool {
        self.fixed.is_empty()
    }
}

/// Reads a 3-column keypoint file.
///
/// # Errors
/// [`Error::Io`] if it cannot be read; [`Error::Keypoints`] with the line number if a row
/// does not have 3 finite numbers.
pub fn read_keypoints(path: impl AsRef<Path>) -> Result<Keypoints> {
    let rows = read_rows(path.as_ref(), 3)?;
    Ok(Keypoints {
        points: rows.iter().map(|r| [r[0], r[1], r[2]]).collect(),
    })
}

/// Reads a 6-column file of corresponding pairs (fixed point, then moving point).
///
/// # Errors
/// [`Error::Io`] if it cannot be read; [`Error::Keypoints`] with the line number if a row
/// does not have 6 finite numbers.
pub fn read_keypoint_pairs(path: impl AsRef<Path>) -> Result<KeypointPairs> {
    let rows = read_rows(path.as_ref(), 6)?;
    Ok(KeypointPairs {
        fixed: rows.iter().map(|r| [r[0], r[1], r[2]]).collect(),
        moving: rows.iter().map(|r| [r[3], r[4], r[5]]).collect(),
    })
}

/// Writes a 3-column keypoint file with a header line.
///
/// # Errors
/// [`Error::Io`] naming the file.
pub fn write_keypoints(path: impl AsRef<Path>, keypoints: &Keypoints) -> Result<()> {
    let mut text = format!("{POINTS_HEADER}\n");
    for p in &keypoints.points {
        text.push_str(&format_row(p));
        text.push('\n');
    }
    write_text(path.as_ref(), &text)
}

/// Writes a 6-column pairs file with the header line [`PAIRS_HEADER`].
///
/// # Errors
/// [`Error::InvalidArgument`] if `fixed` and `moving` differ in length; [`Error::Io`].
pub fn write_keypoint_pairs(path: impl AsRef<Path>, pairs: &KeypointPairs) -> Result<()> {
    if pairs.fixed.len() != pairs.moving.len() {
        return Err(Error::invalid(
            "keypoint pairs",
            format!(
                "{} fixed points but {} moving points",
                pairs.fixed.len(),
                pairs.moving.len()
            ),
        ));
    }
    let mut text = format!("{PAIRS_HEADER}\n");
    for (f, m) in pairs.fixed.iter().zip(&pairs.moving) {
        text.push_str(&format_row(f));
        text.push(',');
        text.push_str(&format_row(m));
        text.push('\n');
    }
    write_text(path.as_ref(), &text)
}

fn format_row(p: &[f64; 3]) -> String {
    // `{}` prints the shortest representation that reads back to the same f64.
    format!("{},{},{}", p[0], p[1], p[2])
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Parses every data row of `path` into exactly `columns` finite numbers.
fn read_rows(path: &Path, columns: usize) -> Result<Vec<Vec<f64>>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let bad = |line: usize, reason: String| Error::Keypoints {
        path: path.to_path_buf(),
        line,
        reason,
    };
    let mut rows = Vec::new();
    let mut seen_first = false;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let trimmed = raw.trim().trim_start_matches('\u{feff}');
        if trimmed.is_empty() {
            continue;
        }
        let fields: Vec<&str> = trimmed.split(',').map(str::trim).collect();
        let is_first = !seen_first;
        seen_first = true;
        if is_first && fields.iter().any(|f| f.parse::<f64>().is_err()) {
            // A header line: it must still describe the expected number of columns.
            if fields.len() != columns {
                return Err(bad(
                    line,
                    format!("header has {} columns, expected {columns}", fields.len()),
                ));
            }
            continue;
        }
        if fields.len() != columns {
            return Err(bad(
                line,
                format!("{} columns, expected {columns}", fields.len()),
            ));
        }
        let mut row = Vec::with_capacity(columns);
        for (col, field) in fields.iter().enumerate() {
            match field.parse::<f64>() {
                Ok(v) if v.is_finite() => row.push(v),
                _ => {
                    return Err(bad(
                        line,
                        format!("column {}: `{field}` is not a finite number", col + 1),
                    ))
                }
            }
        }
        rows.push(row);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip_through_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("case_001.csv");
        let pairs = KeypointPairs {
            fixed: vec![[1.0, 2.5, 3.25], [0.1, 190.75, 207.0]],
            moving: vec![[1.5, 2.0, 6.125], [1e-3, 191.0, 200.333_333_333_333_3]],
        };
        write_keypoint_pairs(&path, &pairs).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(PAIRS_HEADER));
        assert_eq!(read_keypoint_pairs(&path).unwrap(), pairs);

        let points = Keypoints {
            points: pairs.fixed.clone(),
        };
        let p3 = dir.path().join("points.csv");
        write_keypoints(&p3, &points).unwrap();
        assert_eq!(read_keypoints(&p3).unwrap(), points);
    }

    #[test]
    fn reads_files_without_header_and_with_blank_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.csv");
        std::fs::write(&path, "1,2,3\n\n 4.5 , 5 , -6 \r\n").unwrap();
        let k = read_keypoints(&path).unwrap();
        assert_eq!(k.points, vec![[1.0, 2.0, 3.0], [4.5, 5.0, -6.0]]);
    }

    #[test]
    fn errors_name_the_file_and_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broken.csv");
        let cases = [
            ("x,y,z\n1,2,3\n1,2\n", 3, "2 columns"),
            ("x,y,z\n1,2,3\n\n1,2,abc\n", 4, "`abc`"),
            ("1,2,3\n1,2,nan\n", 2, "not a finite"),
            ("a,b\n1,2,3\n", 1, "header has 2 columns"),
        ];
        for (text, line, needle) in cases {
            std::fs::write(&path, text).unwrap();
            let err = read_keypoints(&path).unwrap_err();
            match &err {
                Error::Keypoints { line: got, .. } => assert_eq!(*got, line, "{text:?}"),
                other => panic!("expected a Keypoints error, got {other:?}"),
            }
            let msg = err.to_string();
            assert!(msg.contains("broken.csv"), "{msg}");
            assert!(msg.contains(needle), "{msg}");
        }
        // A 3-column file is not a pairs file.
        std::fs::write(&path, "1,2,3\n").unwrap();
        assert!(read_keypoint_pairs(&path).is_err());
        let mismatched = KeypointPairs {
            fixed: vec![[0.0; 3]],
            moving: vec![],
        };
        assert!(write_keypoint_pairs(dir.path().join("m.csv"), &mismatched).is_err());
    }
}
