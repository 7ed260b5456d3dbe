//! The DIR-Lab benchmarks: the 4D CT cases `case1`-`case10` (Castillo et al., Phys. Med.
//! Biol. 54 (2009) 1849 and 55 (2010) 305) and the COPDGene breath-hold pairs
//! `copd1`-`copd10` (Castillo et al., Phys. Med. Biol. 58 (2013) 2861), as the DIR-Lab web
//! pages distribute them (<https://www.dir-lab.com/>):
//!
//! ```text
//! Case1Pack/Images/case1_T00_s.img            4D CT, inspiration (T00)
//! Case1Pack/Images/case1_T50_s.img            4D CT, expiration (T50)
//! Case1Pack/ExtremePhases/Case1_300_T00_xyz.txt
//! Case1Pack/ExtremePhases/Case1_300_T50_xyz.txt
//! copd1/copd1_iBHCT.img                       COPDGene, inspiration breath hold
//! copd1/copd1_eBHCT.img                       COPDGene, expiration breath hold
//! copd1/copd1_300_iBH_xyz_r1.txt
//! copd1/copd1_300_eBH_xyz_r1.txt
//! ```
//!
//! The folder given may be one case's folder, or any folder above the case folders (searched
//! [`SEARCH_DEPTH`] levels deep, so `copd1/copd1/` as unpacked from the archive is found).
//! Names are matched without regard to case; the variants seen in the distributed archives
//! are accepted: `case6_T00.img` and `case1_T00-ssm.img` beside `case1_T00_s.img` (the
//! `_s` file is preferred when several are present), `extremePhases/` and
//! `case10_dirLab300_T00_xyz.txt`. Other phases (T10-T40, T60-T90), `.mhd` headers and
//! masks are ignored.
//!
//! **Volumes.** The `.img` files are headerless little-endian int16, x fastest, then y, then
//! z; their size and voxel spacing come from the benchmark's per-case table
//! ([`DirLabTable::benchmark`]), which a table file can extend or override
//! ([`DirLabTable::read_csv`]). A file whose size is not `x * y * z * 2` bytes is refused.
//! The stored value is `HU + 1024` (air is about 0), so `HU = value - hu_offset` with
//! [`DIRLAB_HU_OFFSET`] = 1024 by default; the volumes are stored as int16 NIfTI in HU.
//!
//! **Orientation.** Voxels are stored as they are in the file (no axis is flipped), so a
//! landmark's voxel index needs no transformation: NIfTI voxel `(i, j, k)` is file voxel
//! `(x, y, z)`. The affine is `diag(-sx, -sy, -sz)`: in the RAS+ world of NIfTI the voxel
//! axes run toward the patient's left, posterior and inferior (nibabel's axis codes `L P I`).
//! The slices run from head to feet: loaders that register DIR-Lab against DICOM-ordered
//! data flip z (the COPDGene high-resolution scans, the ANTs velocity-flow example for
//! case 1), and the 300 landmarks of every 4D CT case move toward lower z from inspiration to
//! expiration, as the diaphragm rises. The in-plane directions follow the DICOM display
//! order the images were exported in (columns toward the patient's left, rows toward
//! posterior); no file of the benchmark states them. The origin is 0: the benchmark gives
//! none.
//!
//! **Pairs and landmarks.** The pair is the extreme phases with medray's convention (that of
//! the Learn2Reg layout): the expiration scan (T50, eBH) is fixed, the inspiration scan (T00,
//! iBH) is moving. A landmark file holds exactly [`LANDMARK_COUNT`] lines of 1-based voxel
//! indices `x y z` (tab or space separated); line `n` of the two files is the same point. They
//! are stored as medray's keypoint pairs ([`crate::keypoints`]): 0-based voxel indices along
//! the NIfTI axes, fixed point (expiration) then moving point (inspiration), i.e. each
//! coordinate minus 1.

use std::path::{Path, PathBuf};

use ndarray::{Array3, ShapeBuilder};

use super::validate::BadCase;
use crate::dataset::CaseFiles;
use crate::keypoints::{write_keypoint_pairs, KeypointPairs};
use crate::nifti_io::{write_volume_as, StoredType};
use crate::{Error, Result};

mod table;
pub use table::{DirLabEntry, DirLabTable, TABLE_COLUMNS};

/// What the DIR-Lab `.img` files store for 0 HU: `HU = value - 1024`.
pub const DIRLAB_HU_OFFSET: i32 = 1024;
/// Landmarks per file in both benchmarks.
pub const LANDMARK_COUNT: usize = 300;
/// How many folder levels below the given folder are searched for case files.
pub const SEARCH_DEPTH: usize = 4;

/// The normalised name of a case: `case<N>` or `copd<N>` in lower case without leading
/// zeros; a bare number means the 4D CT case. `Case1`, `1`, `case01` -> `case1`;
/// `COPD2` -> `copd2`.
///
/// # Errors
/// [`Error::InvalidArgument`] for anything else.
pub fn case_name(name: &str) -> Result<String> {
    let lower = name.trim().to_ascii_lowercase();
    let (set, digits) = if let Some(d) = lower.strip_prefix("copd") {
        ("copd", d)
    } else if let Some(d) = lower.strip_prefix("case") {
        ("case", d)
    } else {
        ("case", lower.as_str())
    };
    match digits.parse::<u32>() {
        Ok(n) if !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit()) => {
            Ok(format!("{set}{n}"))
        }
        _ => Err(Error::invalid(
            "DIR-Lab case",
            format!("`{name}`: expected case1..case10 (or just 1..10) or copd1..copd10"),
        )),
    }
}

/// The phase of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Inspiration: T00, iBH (moving).
    Insp,
    /// Expiration: T50, eBH (fixed).
    Exp,
}

/// What a file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Image(Phase),
    Landmarks(Phase),
}

/// Recognises a benchmark file name: `(case, role, preference)`; lower preference wins.
fn classify(file_name: &str) -> Option<(String, Role, u8)> {
    let lower = file_name.to_ascii_lowercase();
    let split_number = |s: &str| -> Option<(u32, String)> {
        let end = s.find(|c: char| !c.is_ascii_digit())?;
        let n = s[..end].parse().ok()?;
        Some((n, s[end..].to_string()))
    };
    if let Some(rest) = lower.strip_prefix("copd") {
        let (n, rest) = split_number(rest)?;
        let (role, pref) = match rest.as_str() {
            "_ibhct.img" => (Role::Image(Phase::Insp), 0),
            "_ebhct.img" => (Role::Image(Phase::Exp), 0),
            "_300_ibh_xyz_r1.txt" => (Role::Landmarks(Phase::Insp), 0),
            "_300_ebh_xyz_r1.txt" => (Role::Landmarks(Phase::Exp), 0),
            _ => return None,
        };
        return Some((format!("copd{n}"), role, pref));
    }
    let rest = lower.strip_prefix("case")?;
    let (n, rest) = split_number(rest)?;
    let phase_of = |p: &str| match p {
        "00" => Some(Phase::Insp),
        "50" => Some(Phase::Exp),
        _ => None,
    };
    let (role, pref) = if let Some(r) = rest.strip_prefix("_t") {
        let phase = phase_of(r.get(..2)?)?;
        let pref = match r.get(2..)? {
            "_s.img" => 0,
            "-ssm.img" => 1,
            ".img" => 2,
            _ => return None,
        };
        (Role::Image(phase), pref)
    } else {
        let r = rest
            .strip_prefix("_300_t")
            .or_else(|| rest.strip_prefix("_dirlab300_t"))?;
        let phase = phase_of(r.get(..2)?)?;
        if r.get(2..)? != "_xyz.txt" {
            return None;
        }
        (Role::Landmarks(phase), 0)
    };
    Some((format!("case{n}"), role, pref))
}

/// The files found for one case: `[insp, exp]` images and landmarks, with their preference.
#[derive(Clone, Debug, Default)]
struct Found {
    images: [Vec<(u8, PathBuf)>; 2],
    landmarks: [Vec<(u8, PathBuf)>; 2],
}

fn slot(phase: Phase) -> usize {
    match phase {
        Phase::Insp => 0,
        Phase::Exp => 1,
    }
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<(String, Role, u8, PathBuf)>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut paths: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        paths.push(entry.path());
    }
    paths.sort();
    for path in paths {
        if path.is_dir() {
            if depth < SEARCH_DEPTH {
                walk(&path, depth + 1, out)?;
            }
        } else if let Some((case, role, pref)) =
            path.file_name().and_then(|n| n.to_str()).and_then(classify)
        {
            out.push((case, role, pref, path));
        }
    }
    Ok(())
}

/// Where and how to read the benchmark.
#[derive(Clone, Debug, PartialEq)]
pub struct DirLabConfig {
    /// The folder given by the user.
    pub root: PathBuf,
    /// Cases to ingest (any spelling [`case_name`] accepts); empty: every case found.
    pub cases: Vec<String>,
    /// Size and spacing of each case.
    pub table: DirLabTable,
    /// `HU = stored value - hu_offset`.
    pub hu_offset: i32,
}

impl DirLabConfig {
    /// Every case found under `root`, the benchmark's table, [`DIRLAB_HU_OFFSET`].
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            cases: Vec::new(),
            table: DirLabTable::benchmark(),
            hu_offset: DIRLAB_HU_OFFSET,
        }
    }

    /// Sets the cases to ingest.
    pub fn with_cases(mut self, cases: Vec<String>) -> Self {
        self.cases = cases;
        self
    }

    /// Sets the table.
    pub fn with_table(mut self, table: DirLabTable) -> Self {
        self.table = table;
        self
    }

    /// Sets the HU offset.
    pub fn with_hu_offset(mut self, hu_offset: i32) -> Self {
        self.hu_offset = hu_offset;
        self
    }
}

/// A case found under the root, ready to be converted by [`convert_case`].
#[derive(Clone, Debug, PartialEq)]
pub struct DirLabCase {
    /// Normalised case name (also its case id).
    pub case: String,
    /// Its table entry (`None`: the table has no entry for it).
    pub entry: Option<DirLabEntry>,
    /// `[inspiration, expiration]` image, or the path where it was expected.
    pub images: [std::result::Result<PathBuf, PathBuf>; 2],
    /// `[inspiration, expiration]` landmark file, or the path where it was expected.
    pub landmarks: [std::result::Result<PathBuf, PathBuf>; 2],
    /// Several candidates for one file: the reason, naming them.
    pub ambiguous: Option<String>,
}

/// The benchmark's expected name for a missing file, beside the files that were found.
fn expected(case: &str, role: Role, found: &Found, root: &Path) -> PathBuf {
    let any = found
        .images
        .iter()
        .chain(found.landmarks.iter())
        .flat_map(|v| v.iter())
        .map(|(_, p)| p.clone())
        .next();
    let copd = case.starts_with("copd");
    let number = case.trim_start_matches(|c: char| c.is_ascii_alphabetic());
    let phase = |p: Phase| match (copd, p) {
        (true, Phase::Insp) => "i",
        (true, Phase::Exp) => "e",
        (false, Phase::Insp) => "00",
        (false, Phase::Exp) => "50",
    };
    let name = match (copd, role) {
        (true, Role::Image(p)) => format!("copd{number}_{}BHCT.img", phase(p)),
        (true, Role::Landmarks(p)) => format!("copd{number}_300_{}BH_xyz_r1.txt", phase(p)),
        (false, Role::Image(p)) => format!("case{number}_T{}_s.img", phase(p)),
        (false, Role::Landmarks(p)) => format!("Case{number}_300_T{}_xyz.txt", phase(p)),
    };
    let Some(sibling) = any else {
        return root.join(name);
    };
    let folder = sibling.parent().unwrap_or(root).to_path_buf();
    if copd {
        return folder.join(name);
    }
    // 4D CT: images in <pack>/Images/, landmarks in <pack>/ExtremePhases/.
    let folder_name = folder
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let pack = if folder_name == "images" || folder_name == "extremephases" {
        folder.parent().unwrap_or(&folder).to_path_buf()
    } else {
        folder.clone()
    };
    let sub = match role {
        Role::Image(_) => "Images",
        Role::Landmarks(_) => "ExtremePhases",
    };
    if pack == folder {
        folder.join(name)
    } else {
        pack.join(sub).join(name)
    }
}

/// Finds the cases under `config.root` (see the module docs).
///
/// # Errors
/// [`Error::InvalidArgument`] if the root is not a folder, a case asked for is not a known
/// name or has no file under the root, or no case is found; [`Error::Io`] if a folder
/// cannot be read.
pub fn find_cases(config: &DirLabConfig) -> Result<Vec<DirLabCase>> {
    let root = &config.root;
    if !root.is_dir() {
        return Err(Error::invalid(
            "DIR-Lab folder",
            format!("{}: not a folder", root.display()),
        ));
    }
    let mut files = Vec::new();
    walk(root, 0, &mut files)?;
    let mut found: Vec<(String, Found)> = Vec::new();
    for (case, role, pref, path) in files {
        let i = match found.iter().position(|(c, _)| *c == case) {
            Some(i) => i,
            None => {
                found.push((case, Found::default()));
                found.len() - 1
            }
        };
        let f = &mut found[i].1;
        match role {
            Role::Image(p) => f.images[slot(p)].push((pref, path)),
            Role::Landmarks(p) => f.landmarks[slot(p)].push((pref, path)),
        }
    }

    let wanted: Vec<String> = if config.cases.is_empty() {
        // Table order first, then cases the table lacks, by name.
        let mut names: Vec<String> = config
            .table
            .entries()
            .iter()
            .map(|e| e.case.clone())
            .filter(|c| found.iter().any(|(f, _)| f == c))
            .collect();
        let mut extra: Vec<String> = found
            .iter()
            .map(|(c, _)| c.clone())
            .filter(|c| config.table.get(c).is_none())
            .collect();
        extra.sort();
        names.extend(extra);
        names
    } else {
        let mut names = Vec::new();
        for c in &config.cases {
            let name = case_name(c)?;
            if config.table.get(&name).is_none() {
                let known: Vec<&str> = config
                    .table
                    .entries()
                    .iter()
                    .map(|e| e.case.as_str())
                    .collect();
                return Err(Error::invalid(
                    "DIR-Lab case",
                    format!(
                        "`{c}`: not in the DIR-Lab table (known: {}); give its size and spacing in a table file",
                        known.join(", ")
                    ),
                ));
            }
            if !found.iter().any(|(f, _)| *f == name) {
                return Err(Error::invalid(
                    "DIR-Lab case",
                    format!(
                        "{name}: no file of it under {} (expected e.g. {})",
                        root.display(),
                        expected(&name, Role::Image(Phase::Insp), &Found::default(), root)
                            .display()
                    ),
                ));
            }
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
    };
    if wanted.is_empty() {
        return Err(Error::invalid(
            "DIR-Lab folder",
            format!(
                "{}: no DIR-Lab case found (expected Case1Pack/Images/case1_T00_s.img, copd1/copd1_iBHCT.img and their landmark files)",
                root.display()
            ),
        ));
    }

    let mut cases = Vec::new();
    for name in wanted {
        let f = found
            .iter()
            .find(|(c, _)| *c == name)
            .map(|(_, f)| f.clone())
            .unwrap_or_default();
        let mut ambiguous = None;
        let mut pick = |candidates: &[(u8, PathBuf)], role: Role| {
            let Some(best) = candidates.iter().map(|(p, _)| *p).min() else {
                return Err(expected(&name, role, &f, root));
            };
            let top: Vec<&PathBuf> = candidates
                .iter()
                .filter(|(p, _)| *p == best)
                .map(|(_, path)| path)
                .collect();
            if top.len() > 1 && ambiguous.is_none() {
                ambiguous = Some(format!(
                    "several candidate files: {}; keep one",
                    top.iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            Ok(top[0].clone())
        };
        let images = [
            pick(&f.images[0], Role::Image(Phase::Insp)),
            pick(&f.images[1], Role::Image(Phase::Exp)),
        ];
        let landmarks = [
            pick(&f.landmarks[0], Role::Landmarks(Phase::Insp)),
            pick(&f.landmarks[1], Role::Landmarks(Phase::Exp)),
        ];
        cases.push(DirLabCase {
            entry: config.table.get(&name).cloned(),
            case: name,
            images,
            landmarks,
            ambiguous,
        });
    }
    Ok(cases)
}

fn bad_case(case: &str, file: Option<&Path>, reason: impl Into<String>) -> BadCase {
    BadCase {
        case_id: case.to_string(),
        file: file.map(Path::to_path_buf),
        reason: reason.into(),
    }
}

/// Converts one found case into `work/<case>/`: both volumes as int16 NIfTI in HU
/// (`exp.nii.gz` fixed, `insp.nii.gz` moving) and the landmarks as a keypoint-pairs CSV
/// (`keypoints.csv`), and returns its files for validation.
///
/// # Errors
/// The [`BadCase`] naming the file: missing, ambiguous, of the wrong size for the table
/// entry, or a landmark file without exactly [`LANDMARK_COUNT`] valid lines inside the grid.
pub fn convert_case(
    case: &DirLabCase,
    hu_offset: i32,
    work: &Path,
) -> std::result::Result<CaseFiles, BadCase> {
    let name = case.case.as_str();
    if let Some(reason) = &case.ambiguous {
        return Err(bad_case(name, None, reason.clone()));
    }
    let present =
        |r: &std::result::Result<PathBuf, PathBuf>| -> std::result::Result<PathBuf, BadCase> {
            match r {
                Ok(p) => Ok(p.clone()),
                Err(expected) => Err(bad_case(name, Some(expected), "file not found")),
            }
        };
    let images = [present(&case.images[0])?, present(&case.images[1])?];
    let landmarks = [present(&case.landmarks[0])?, present(&case.landmarks[1])?];
    let Some(entry) = &case.entry else {
        return Err(bad_case(
            name,
            Some(&images[0]),
            format!("{name} has no entry in the DIR-Lab table: give its size and spacing in a table file"),
        ));
    };
    let folder = work.join(name);
    std::fs::create_dir_all(&folder).map_err(|e| bad_case(name, Some(&folder), e.to_string()))?;
    let mut points = Vec::with_capacity(2);
    for path in &landmarks {
        points.push(read_landmarks(path, entry.size).map_err(|e| match e {
            Error::Keypoints { line, reason, .. } if line > 0 => {
                bad_case(name, Some(path), format!("line {line}: {reason}"))
            }
            Error::Keypoints { reason, .. } => bad_case(name, Some(path), reason),
            other => bad_case(name, Some(path), super::validate::reason_of(other)),
        })?);
    }
    let targets = [folder.join("insp.nii.gz"), folder.join("exp.nii.gz")];
    for (source, target) in images.iter().zip(&targets) {
        convert_volume(source, target, entry, hu_offset)
            .map_err(|e| bad_case(name, Some(source), super::validate::reason_of(e)))?;
    }
    let keypoints = folder.join("keypoints.csv");
    let [insp_points, exp_points] = [points[0].clone(), points[1].clone()];
    write_keypoint_pairs(
        &keypoints,
        &KeypointPairs {
            fixed: exp_points,
            moving: insp_points,
        },
    )
    .map_err(|e| bad_case(name, Some(&keypoints), super::validate::reason_of(e)))?;
    let [insp, exp] = targets;
    Ok(CaseFiles {
        id: name.to_string(),
        fixed: exp,
        moving: insp,
        fixed_mask: None,
        moving_mask: None,
        keypoints: Some(keypoints),
    })
}

/// The affine of a DIR-Lab volume: RAS+ world, voxel axes toward L, P, I, origin 0.
pub fn dirlab_affine(spacing_mm: [f64; 3]) -> [[f64; 4]; 4] {
    [
        [-spacing_mm[0], 0.0, 0.0, 0.0],
        [0.0, -spacing_mm[1], 0.0, 0.0],
        [0.0, 0.0, -spacing_mm[2], 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
}

/// Reads the raw volume `source` for `entry` and writes it as int16 NIfTI in HU.
///
/// # Errors
/// [`Error::Nifti`] naming `source` if its size is not `x * y * z * 2` bytes;
/// [`Error::Io`].
pub fn convert_volume(
    source: &Path,
    target: &Path,
    entry: &DirLabEntry,
    hu_offset: i32,
) -> Result<()> {
    let [x, y, z] = entry.size;
    let voxels = x * y * z;
    let expected = voxels as u64 * 2;
    let bytes = std::fs::metadata(source)
        .map_err(|e| Error::io(source, e))?
        .len();
    if bytes != expected {
        return Err(Error::Nifti {
            path: source.to_path_buf(),
            reason: format!(
                "{bytes} bytes, expected {expected} for {} ({x}x{y}x{z} int16 voxels, from the DIR-Lab table); wrong case or a damaged file",
                entry.case
            ),
        });
    }
    let raw = std::fs::read(source).map_err(|e| Error::io(source, e))?;
    let offset = hu_offset as f32;
    let values: Vec<f32> = raw
        .chunks_exact(2)
        .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) - offset)
        .collect();
    // The file is x fastest: exactly the column-major ("Fortran") order of an (x, y, z) array.
    let data = Array3::from_shape_vec((x, y, z).f(), values).map_err(|e| Error::Nifti {
        path: source.to_path_buf(),
        reason: format!("cannot shape the voxels: {e}"),
    })?;
    write_volume_as(
        target,
        &data,
        &dirlab_affine(entry.spacing_mm),
        StoredType::Int16,
    )
}

/// Reads a DIR-Lab landmark file: exactly [`LANDMARK_COUNT`] non-blank lines of three
/// 1-based voxel indices `x y z` inside a grid of `size`; returns them 0-based (each minus 1).
///
/// # Errors
/// [`Error::Io`]; [`Error::Keypoints`] naming the file and the line (line 0 for a wrong
/// count).
pub fn read_landmarks(path: &Path, size: [usize; 3]) -> Result<Vec<[f64; 3]>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let bad = |line: usize, reason: String| Error::Keypoints {
        path: path.to_path_buf(),
        line,
        reason,
    };
    let mut points = Vec::with_capacity(LANDMARK_COUNT);
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let fields: Vec<&str> = raw.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        if fields.len() != 3 {
            return Err(bad(
                line,
                format!("{} fields, expected 3 (1-based voxel x y z)", fields.len()),
            ));
        }
        let mut p = [0f64; 3];
        for (a, field) in fields.iter().enumerate() {
            let v: f64 = match field.parse() {
                Ok(v) if f64::is_finite(v) => v,
                _ => return Err(bad(line, format!("`{field}` is not a number"))),
            };
            if v < 1.0 || v > size[a] as f64 {
                return Err(bad(
                    line,
                    format!(
                        "{} = {v} is outside the image (1..={} in 1-based voxels)",
                        ["x", "y", "z"][a],
                        size[a]
                    ),
                ));
            }
            p[a] = v - 1.0;
        }
        points.push(p);
    }
    if points.len() != LANDMARK_COUNT {
        return Err(bad(
            0,
            format!("{} landmarks, expected {LANDMARK_COUNT}", points.len()),
        ));
    }
    Ok(points)
}

#[cfg(test)]
mod tests;
