//! The DIR-Lab per-case table: each headerless volume's size and spacing (see the parent
//! module), built in for the 20 benchmark cases and extendable from a CSV file.

use std::path::Path;

use super::case_name;
use crate::{Error, Result};

/// One case's grid: size in voxels and spacing in mm along x, y, z.
#[derive(Clone, Debug, PartialEq)]
pub struct DirLabEntry {
    /// Case name, lower case: `case1`..`case10`, `copd1`..`copd10`.
    pub case: String,
    /// Size `[x, y, z]` in voxels.
    pub size: [usize; 3],
    /// Voxel spacing `[x, y, z]` in mm.
    pub spacing_mm: [f64; 3],
}

/// The per-case table that gives each headerless volume its size and spacing.
#[derive(Clone, Debug, PartialEq)]
pub struct DirLabTable {
    entries: Vec<DirLabEntry>,
}

/// The benchmark's table: `(case, [x, y, z] voxels, in-plane spacing mm)`, slices 2.5 mm.
///
/// Sources: the DIR-Lab 4D CT and COPDGene download pages (<https://www.dir-lab.com/>),
/// Castillo et al. 2009 (Table 1, 4D CT cases 1-5), 2010 (cases 6-10) and 2013 (Table 1,
/// COPDGene). Checked against the per-case constants of public loaders of these files
/// (e.g. `rightpriordir/raw_lung.py` in HengjieLiu/RightPriorDIR, `shapmagn`'s COPD
/// preprocessing) and, for the 4D CT spacings, the published mean landmark displacements.
const BENCHMARK: [(&str, [usize; 3], f64); 20] = [
    ("case1", [256, 256, 94], 0.97),
    ("case2", [256, 256, 112], 1.16),
    ("case3", [256, 256, 104], 1.15),
    ("case4", [256, 256, 99], 1.13),
    ("case5", [256, 256, 106], 1.10),
    ("case6", [512, 512, 128], 0.97),
    ("case7", [512, 512, 136], 0.97),
    ("case8", [512, 512, 128], 0.97),
    ("case9", [512, 512, 128], 0.97),
    ("case10", [512, 512, 120], 0.97),
    ("copd1", [512, 512, 121], 0.625),
    ("copd2", [512, 512, 102], 0.645),
    ("copd3", [512, 512, 126], 0.652),
    ("copd4", [512, 512, 126], 0.590),
    ("copd5", [512, 512, 131], 0.647),
    ("copd6", [512, 512, 119], 0.633),
    ("copd7", [512, 512, 112], 0.625),
    ("copd8", [512, 512, 115], 0.586),
    ("copd9", [512, 512, 116], 0.664),
    ("copd10", [512, 512, 135], 0.742),
];

/// Slice spacing of every benchmark case, mm.
const SLICE_MM: f64 = 2.5;

/// The header of a table file.
pub const TABLE_COLUMNS: [&str; 7] = [
    "case",
    "size_x",
    "size_y",
    "size_z",
    "spacing_x_mm",
    "spacing_y_mm",
    "spacing_z_mm",
];

impl DirLabTable {
    /// The benchmark's 20 cases: 4D CT case1-case10 and COPDGene copd1-copd10, slices 2.5 mm.
    pub fn benchmark() -> Self {
        Self {
            entries: BENCHMARK
                .iter()
                .map(|(case, size, mm)| DirLabEntry {
                    case: (*case).to_string(),
                    size: *size,
                    spacing_mm: [*mm, *mm, SLICE_MM],
                })
                .collect(),
        }
    }

    /// A table of exactly `entries` (case names are normalised, see [`case_name`]).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad case name, a zero size or a spacing that is not
    /// positive and finite.
    pub fn from_entries(entries: Vec<DirLabEntry>) -> Result<Self> {
        let mut table = Self {
            entries: Vec::new(),
        };
        for mut e in entries {
            e.case = case_name(&e.case)?;
            check_entry(&e).map_err(|reason| Error::invalid("DIR-Lab table", reason))?;
            table.set(e);
        }
        Ok(table)
    }

    /// Reads a table file: a CSV with the header [`TABLE_COLUMNS`]
    /// (`case,size_x,size_y,size_z,spacing_x_mm,spacing_y_mm,spacing_z_mm`), one case a line.
    ///
    /// # Errors
    /// [`Error::Io`]; [`Error::Manifest`] naming the file, the line and the column.
    pub fn read_csv(path: &Path) -> Result<Self> {
        let bad = |line: u64, column: Option<&str>, reason: String| Error::Manifest {
            path: path.to_path_buf(),
            line,
            column: column.map(str::to_string),
            reason,
        };
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .trim(csv::Trim::All)
            .from_path(path)
            .map_err(|e| match e.into_kind() {
                csv::ErrorKind::Io(io) => Error::io(path, io),
                other => bad(1, None, format!("{other:?}")),
            })?;
        let header: Vec<String> = reader
            .headers()
            .map_err(|e| bad(1, None, e.to_string()))?
            .iter()
            .map(str::to_string)
            .collect();
        if header != TABLE_COLUMNS {
            return Err(bad(
                1,
                None,
                format!(
                    "header `{}`: expected `{}`",
                    header.join(","),
                    TABLE_COLUMNS.join(",")
                ),
            ));
        }
        let mut table = Self {
            entries: Vec::new(),
        };
        for record in reader.records() {
            let record = record.map_err(|e| {
                let line = e.position().map_or(0, csv::Position::line);
                bad(line, None, e.to_string())
            })?;
            let line = record.position().map_or(0, csv::Position::line);
            let field = |i: usize| record.get(i).unwrap_or("");
            let case = case_name(field(0)).map_err(|e| bad(line, Some("case"), e.to_string()))?;
            let mut size = [0usize; 3];
            for (a, s) in size.iter_mut().enumerate() {
                *s = field(1 + a).parse().map_err(|_| {
                    bad(
                        line,
                        Some(TABLE_COLUMNS[1 + a]),
                        format!("`{}` is not a whole number", field(1 + a)),
                    )
                })?;
            }
            let mut spacing_mm = [0f64; 3];
            for (a, s) in spacing_mm.iter_mut().enumerate() {
                *s = field(4 + a).parse().map_err(|_| {
                    bad(
                        line,
                        Some(TABLE_COLUMNS[4 + a]),
                        format!("`{}` is not a number", field(4 + a)),
                    )
                })?;
            }
            let entry = DirLabEntry {
                case,
                size,
                spacing_mm,
            };
            check_entry(&entry).map_err(|reason| bad(line, None, reason))?;
            table.set(entry);
        }
        Ok(table)
    }

    /// This table with `other`'s entries added, replacing those of the same case.
    pub fn with_overrides(mut self, other: &DirLabTable) -> Self {
        for e in &other.entries {
            self.set(e.clone());
        }
        self
    }

    /// The entry of `case` (a normalised name, see [`case_name`]).
    pub fn get(&self, case: &str) -> Option<&DirLabEntry> {
        self.entries.iter().find(|e| e.case == case)
    }

    /// Every entry, in table order.
    pub fn entries(&self) -> &[DirLabEntry] {
        &self.entries
    }

    fn set(&mut self, entry: DirLabEntry) {
        match self.entries.iter_mut().find(|e| e.case == entry.case) {
            Some(e) => *e = entry,
            None => self.entries.push(entry),
        }
    }
}

fn check_entry(e: &DirLabEntry) -> std::result::Result<(), String> {
    if e.size.contains(&0) {
        return Err(format!("{}: size {:?} has a zero", e.case, e.size));
    }
    if e.spacing_mm.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
        return Err(format!(
            "{}: spacing {:?} mm must be positive",
            e.case, e.spacing_mm
        ));
    }
    Ok(())
}
